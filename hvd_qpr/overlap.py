"""Overlap-Local-SGD (Wang, Liang & Joshi, "Overlap Local-SGD: An Algorithmic Approach to Hide
Communication Delays in Distributed SGD", ICASSP 2020): the average of the local models travels
while the next τ local steps compute, and each worker is pulled towards an anchor model instead of
waiting for the average (DESIGN.md 2.5).

Every worker holds its local model x_i, an anchor z (the same on all workers) and an anchor
velocity v. At every τ-th step, after the local update:

1. finish the average a started at the previous sync point (a = z at the first one);
2. v ← βv + (a − z); z ← z + v;
3. start averaging the current x_i in the background (compressed as z + mean Q(x_i − z));
4. pull back: x_i ← x_i + α(z − x_i).

:class:`OverlapState` is the arithmetic of steps 2 and 4; :class:`Overlap` is the averager the
optimizer holds: it owns that state and the average in flight, which advances from ``step()``
calls (:meth:`Overlap.after_local_step` polls it) without a thread.

Example:
    >>> state = OverlapState(pullback=0.6, anchor_momentum=0.0)
    >>> state.start([torch.zeros(3)])
    >>> state.update_anchor(None)  # no average yet: a = z
    >>> x = [torch.ones(3)]
    >>> state.pull_back(x)
    >>> x[0]
    tensor([0.4000, 0.4000, 0.4000])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from hvd_qpr.averaging import (
    Averager,
    Field,
    Round,
    difference_pipelines,
    exact_average,
    paradigm_fields,
)
from hvd_qpr.collectives import Comm, InFlight
from hvd_qpr.layout import Layout, Part


class OverlapState:
    """The anchor z and its velocity v of one worker (steps 2 and 4).

    Args:
        pullback: α in [0, 1]; 0 never mixes the workers (each runs plain local SGD).
        anchor_momentum: β in [0, 1); 0 is the plain algorithm, β > 0 its momentum variant.

    Raises:
        ValueError: α or β out of range.
    """

    def __init__(self, pullback: float = 0.6, anchor_momentum: float = 0.0) -> None:
        if not (isinstance(pullback, (int, float)) and 0.0 <= pullback <= 1.0):
            raise ValueError(f"pullback (alpha) must be in [0, 1], got {pullback!r}")
        if not (isinstance(anchor_momentum, (int, float)) and 0.0 <= anchor_momentum < 1.0):
            raise ValueError(f"anchor_momentum (beta) must be in [0, 1), got {anchor_momentum!r}")
        self.alpha = float(pullback)
        self.beta = float(anchor_momentum)
        self.anchor: list[torch.Tensor] | None = None
        self.velocity: list[torch.Tensor] | None = None

    @property
    def started(self) -> bool:
        return self.anchor is not None

    def start(self, params: Sequence[torch.Tensor]) -> None:
        """z = the common starting model, v = 0."""
        self.anchor = [p.detach().clone() for p in params]
        self.velocity = [torch.zeros_like(p) for p in self.anchor]

    def update_anchor(self, average: Sequence[torch.Tensor] | None) -> None:
        """Steps 1–2: v ← βv + (a − z), z ← z + v, with a the finished average (z if None)."""
        assert self.anchor is not None and self.velocity is not None
        if average is None:
            average = self.anchor
        for z, v, a in zip(self.anchor, self.velocity, average, strict=True):
            v.mul_(self.beta).add_(a.to(z.dtype) - z)
            z.add_(v)

    def pull_back(self, params: Sequence[torch.Tensor]) -> None:
        """Step 4: x ← x + α(z − x) (exactly x when α = 0)."""
        assert self.anchor is not None
        with torch.no_grad():
            for p, z in zip(params, self.anchor, strict=True):
                p.add_(z - p, alpha=self.alpha)


class Overlap(Averager):
    """Overlap-Local-SGD's averager: the anchor and its velocity (:class:`OverlapState`) and
    the average of the models in flight between sync points.

    Args:
        layout: the model's parts.
        comm: the collectives.
        aggregation: the mode buckets travel in (resolved, not ``"auto"``).
        seed: seeds the stochastic rounding with rank, round and bucket.
        pullback: α in [0, 1].
        anchor_momentum: β in [0, 1).
    """

    paradigm = "Overlap-Local-SGD"
    state_key = "overlap"

    def __init__(
        self,
        layout: Layout,
        comm: Comm,
        aggregation: str,
        seed: int,
        pullback: float = 0.6,
        anchor_momentum: float = 0.0,
    ) -> None:
        self.state = OverlapState(pullback, anchor_momentum)
        self.layout, self.comm, self.aggregation, self.seed = layout, comm, aggregation, seed
        self.flight: InFlight | None = None  # the average started at the last sync point
        self._parts: list[Part] = []  # the parts of its pipelines, in order
        self.finished: list[torch.Tensor] | None = None  # its result, when waited for early

    def signature(self) -> list[Field]:
        state = self.state
        return paradigm_fields(overlap=True, alpha=state.alpha, beta=state.beta)

    def before_local_step(self) -> Round:
        """z = the common starting model, v = 0."""
        if not self.state.started:
            self.state.start(self.layout.params)
        return
        yield

    def after_local_step(self) -> None:
        """The average in flight moves on to its next collective (never blocks)."""
        if self.flight is not None:
            self.flight.poll(self.comm)

    def _collect(self) -> Round:
        """a, the average in flight (waited for if needed), or None if none was started. It
        stays available until the anchor is updated."""
        if self.flight is not None:
            results = yield from self.flight.finish()
            self.flight = None
            means = list(zip(self._parts, results, strict=True))
            self.finished = self.layout.plus(self.state.anchor, means)
        return self.finished

    def _update_anchor(self, index: int) -> Round:
        """Steps 1-2; a NaN or Inf in the average raises on every rank (all see the same)."""
        average = yield from self._collect()
        named = zip(self.layout.params, average, strict=True) if average is not None else []
        for p, a in named:
            if not bool(torch.isfinite(a).all()):
                raise FloatingPointError(
                    f"hvd_qpr.DistributedOptimizer: the average of parameter "
                    f"{self.layout.name(p)!r} started at round {index - 1} holds NaN or Inf: "
                    "some rank's model diverged. Lower the learning rate or clip gradients"
                )
        self.state.update_anchor(average)
        self.finished = None

    def round(self, index: int, local_count: int) -> Round:
        """Finish the average started a round ago, update the anchor, start averaging the
        current models in the background, pull back towards the anchor."""
        assert self.state.started
        yield from self._update_anchor(index)
        if self.comm.included:
            pipelines = difference_pipelines(
                self.layout,
                self.state.anchor,
                self.comm,
                self.aggregation,
                self.seed,
                index,
                "overlap",
            )
            self._parts = [part for part, _ in pipelines]
            self.flight = InFlight(pl for _, pl in pipelines)
        self.state.pull_back(self.layout.params)

    def sync(self, index: int, local_count: int) -> Round:
        """Finishes the average in flight and updates the anchor, then takes one exact average
        of models and buffers as the anchor."""
        started = self.state.started
        if started:
            yield from self._update_anchor(index)
        yield from exact_average(self.layout, self.comm)
        if started:
            self.state.anchor = self.layout.snapshot()
        return False

    def settle(self) -> Round:
        """The average in flight is finished now (its values do not depend on when), so the
        saved state holds its result."""
        if self.state.started:
            yield from self._collect()

    def state_dict(self) -> dict[str, Any]:
        """Anchor, velocity and the finished average (:meth:`settle` first)."""
        assert self.flight is None, "settle() the average in flight before saving"

        def copy(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.clone() for t in ts]

        return {
            "anchor": copy(self.state.anchor),
            "velocity": copy(self.state.velocity),
            "finished": copy(self.finished),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.anchor = self.layout.check_anchor(state["anchor"], "anchor")
        self.state.velocity = self.layout.check_anchor(state["velocity"], "anchor velocity")
        finished = state["finished"]
        self.finished = None if finished is None else [t.detach().clone() for t in finished]
        self.flight = None
