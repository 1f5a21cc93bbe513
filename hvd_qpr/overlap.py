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

This module is the arithmetic and the bookkeeping; the optimizer launches the collectives.

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

from collections.abc import Callable, Sequence

import torch

from hvd_qpr.collectives import InFlight


class OverlapState:
    """Anchor, anchor velocity and the average in flight of one worker.

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
        self.flight: InFlight | None = None  # the average started at the last sync point
        self.finished: list[torch.Tensor] | None = None  # its result, when waited for early

    @property
    def started(self) -> bool:
        return self.anchor is not None

    def start(self, params: Sequence[torch.Tensor]) -> None:
        """z = the common starting model, v = 0."""
        self.anchor = [p.detach().clone() for p in params]
        self.velocity = [torch.zeros_like(p) for p in self.anchor]

    def launch(self, flight: InFlight) -> None:
        self.flight, self.finished = flight, None

    def poll(self) -> None:
        """Lets the average in flight advance to its next collective (never blocks)."""
        if self.flight is not None:
            self.flight.poll()

    def collect(
        self, to_average: Callable[[list[torch.Tensor]], list[torch.Tensor]]
    ) -> list[torch.Tensor] | None:
        """a, the average in flight (waited for if needed; to_average turns the collectives'
        results into one tensor per parameter), or None if none was started. It stays available
        until the anchor is updated."""
        if self.flight is not None:
            self.finished = to_average(self.flight.wait())
            self.flight = None
        return self.finished

    def update_anchor(self, average: Sequence[torch.Tensor] | None) -> None:
        """Steps 1–2: v ← βv + (a − z), z ← z + v, with a the finished average (z if None)."""
        assert self.anchor is not None and self.velocity is not None
        if average is None:
            average = self.anchor
        for z, v, a in zip(self.anchor, self.velocity, average, strict=True):
            v.mul_(self.beta).add_(a.to(z.dtype) - z)
            z.add_(v)
        self.finished = None

    def pull_back(self, params: Sequence[torch.Tensor]) -> None:
        """Step 4: x ← x + α(z − x) (exactly x when α = 0)."""
        assert self.anchor is not None
        with torch.no_grad():
            for p, z in zip(params, self.anchor, strict=True):
                p.add_(z - p, alpha=self.alpha)

    def state_dict(self) -> dict[str, object]:
        """Anchor, velocity and the finished average (the caller finishes one in flight first)."""
        assert self.flight is None, "collect() the average in flight before saving"

        def copy(ts: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
            return None if ts is None else [t.clone() for t in ts]

        return {
            "anchor": copy(self.anchor),
            "velocity": copy(self.velocity),
            "finished": copy(self.finished),
        }

    def load_state_dict(self, state: dict[str, object], params: Sequence[torch.Tensor]) -> None:
        def fit(ts: list[torch.Tensor] | None, like: Sequence[torch.Tensor]) -> list | None:
            if ts is None:
                return None
            if [t.numel() for t in ts] != [p.numel() for p in like]:
                raise ValueError("load_state_dict: the saved anchor does not fit this model")
            return [t.detach().clone().to(p.device) for t, p in zip(ts, like, strict=True)]

        self.anchor = fit(state["anchor"], params)
        self.velocity = fit(state["velocity"], params)
        self.finished = state["finished"]
        if self.finished is not None:
            self.finished = [t.detach().clone() for t in self.finished]
        self.flight = None
