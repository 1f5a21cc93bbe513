"""Model averagers: one object per paradigm, each owning its state, and ring all-reduce QPR-SGD.

Every averager follows :class:`Averager`: the fields the ranks must agree on (``signature``),
what happens before the first local step, one round after K local steps, an exact average for
``sync_models()``, and ``state_dict`` / ``load_state_dict``. Rounds are generators of
collectives (:mod:`hvd_qpr.collectives`): the optimizer drives one to its end against Horovod,
the in-process communicator of the unit tests drives M of them in lockstep.

:class:`RingAllReduce` is Quantized Parallel-Restarted SGD over ring all-reduce (DESIGN.md 2.3;
Jiang & Agrawal, NeurIPS 2018; Yu, Jin & Yang, AAAI 2019): every worker restarts each round from
``x̄ + mean_i Q(x_i − x̄)``. Gossip (:mod:`hvd_qpr.gossip`) and Overlap-Local-SGD
(:mod:`hvd_qpr.overlap`) are its siblings.

Example:
    >>> averager = RingAllReduce(layout, comm, "packed-sum", seed=0)
    >>> collectives.run(averager.before_local_step())  # x̄ = x_0
    >>> collectives.run(averager.round(0, local_count=8))  # x_i = x̄ everywhere
"""

from __future__ import annotations

import abc
from typing import Any

import torch

from hvd_qpr import collectives
from hvd_qpr.collectives import Comm, Pipeline
from hvd_qpr.compression import Compression
from hvd_qpr.consistency import Field, crc
from hvd_qpr.layout import Layout, Part
from hvd_qpr.seeds import derive_seed

Round = Pipeline
"""A generator of collectives, as a pipeline is (see :func:`hvd_qpr.collectives.run`)."""


class Averager(abc.ABC):
    """What the optimizer asks of a paradigm. Subclasses own all of their state."""

    paradigm: str = ""  # names the paradigm in state_dict() and its errors
    state_key: str = ""  # the key of its state in the optimizer's state_dict()
    aggregation: str = ""  # the aggregation mode (what "auto" chose), or "gossip"
    topology: Any = None  # the gossip graph, where there is one

    def signature(self) -> list[Field]:
        """The paradigm's fields of the cross-rank configuration check (the same columns on
        every rank, whatever the paradigm, so the table has one width)."""
        return paradigm_fields()

    def before_local_step(self) -> Round:
        """Whatever the first local step needs, from the common starting model."""
        return
        yield

    def after_local_step(self) -> None:  # noqa: B027 (most paradigms have nothing to do)
        """Called after every local step (never blocks)."""

    @abc.abstractmethod
    def round(self, index: int, local_count: int) -> Round:
        """One model average after local_count local steps; index counts rounds from 0."""

    @abc.abstractmethod
    def sync(self, index: int, local_count: int) -> Round:
        """``sync_models()``: afterwards every rank holds the same model. Returns whether it
        was a round (which the schedule then counts)."""

    def settle(self) -> Round:
        """Finishes anything still in flight, before the state is saved."""
        return
        yield

    @abc.abstractmethod
    def state_dict(self) -> Any:
        """What a resumed run needs (tensors cloned)."""

    @abc.abstractmethod
    def load_state_dict(self, state: Any) -> None:
        """Restores :meth:`state_dict`'s result, checked against this model."""


def paradigm_fields(
    topology: Any = None,
    mode: str | None = None,
    gamma: float | None = None,
    overlap: bool = False,
    alpha: float | None = None,
    beta: float | None = None,
) -> list[Field]:
    """The paradigm columns of the configuration check; zeros where a paradigm does not apply."""
    return [
        ("topology", topology.signature() if topology else 0, repr(topology)),
        ("gossip mode", crc(mode) if mode else 0, mode or "-"),
        ("consensus_step", crc(repr(gamma)) if gamma is not None else 0, repr(gamma)),
        ("overlap", int(overlap), str(overlap)),
        ("pullback", crc(repr(alpha)) if alpha is not None else 0, repr(alpha)),
        ("anchor_momentum", crc(repr(beta)) if beta is not None else 0, repr(beta)),
    ]


# ---- pieces the paradigms share -----------------------------------------------------------------


def check_finite(layout: Layout, comm: Comm, local_count: int, index: int) -> Round:
    """Raises FloatingPointError on every rank when some rank's model holds NaN or Inf (one
    allgather of flags, so every rank sees the same table)."""
    flags = torch.tensor(
        [[0 if bool(torch.isfinite(p).all()) else 1 for p in layout.params]], dtype=torch.uint8
    )
    pending = comm.allgather(flags, "hvd_qpr.finite")
    yield pending
    bad = comm.wait(pending).nonzero().tolist()
    if bad:
        column = bad[0][1]
        ranks = sorted({r for r, c in bad if c == column})
        name = layout.name(layout.params[column])
        raise FloatingPointError(
            f"hvd_qpr.DistributedOptimizer: the model difference of parameter {name!r} holds "
            f"NaN or Inf on rank(s) {ranks} after {local_count} local steps "
            f"(round {index}); nothing was averaged. Lower the learning rate or clip gradients"
        )


def difference_pipelines(
    layout: Layout,
    anchor: list[torch.Tensor],
    comm: Comm,
    aggregation: str,
    seed: int,
    index: int,
    tag: str,
) -> list[tuple[Part, Pipeline]]:
    """Averages of x_i − anchor: one aggregation per bucket (compressed, seeded by rank, round
    and bucket) and one all-reduce per dense parameter (named ``hvd_qpr.<tag>.<name>``)."""
    out = []
    for part, delta in layout.differences(anchor):
        if part.kind == "bucket":
            s = derive_seed(seed, comm.rank, index, part.index)
            pipeline = collectives.aggregate(
                aggregation, delta, part.compressor, comm, part.name, part.segments, s
            )
        else:
            pipeline = collectives.allreduce_dense(
                delta, part.compressor, comm, f"hvd_qpr.{tag}.{part.name}", part.segments
            )
        out.append((part, pipeline))
    return out


def averaged(parts_and_pipelines: list[tuple[Part, Pipeline]]) -> Round:
    """Runs the pipelines together; (part, result) pairs in their order."""
    parts = [part for part, _ in parts_and_pipelines]
    results = yield from collectives.gather(pl for _, pl in parts_and_pipelines)
    return list(zip(parts, results, strict=True))


def buffer_pipelines(layout: Layout, comm: Comm) -> list[tuple[Part, Pipeline]]:
    """Exact averages of the floating-point buffers, in place."""
    return [
        (
            part,
            collectives.allreduce_dense(
                part.tensors[0].data, Compression.none, comm, f"hvd_qpr.{part.name}", []
            ),
        )
        for part in layout.buffers
    ]


def exact_average(layout: Layout, comm: Comm) -> Round:
    """Every parameter and buffer replaced by its exact (uncompressed) average over ranks."""
    if not comm.included:
        return
    named = layout.named_state()
    pipelines = [
        collectives.allreduce_dense(
            t.detach().clone(), Compression.none, comm, f"hvd_qpr.sync.{name}", []
        )
        for name, t in named
    ]
    results = yield from collectives.gather(pipelines)
    with torch.no_grad():
        for (_, t), avg in zip(named, results, strict=True):
            t.copy_(avg)


# ---- ring all-reduce ----------------------------------------------------------------------------


class RingAllReduce(Averager):
    """(Q)PR-SGD over ring all-reduce: the anchor x̄ (the last averaged model) and its rounds.

    Args:
        layout: the model's parts.
        comm: the collectives.
        aggregation: the mode buckets travel in (resolved, not ``"auto"``).
        seed: seeds the stochastic rounding with rank, round and bucket.
    """

    paradigm = "ring all-reduce"
    state_key = "anchor"

    def __init__(self, layout: Layout, comm: Comm, aggregation: str, seed: int) -> None:
        self.layout, self.comm, self.aggregation, self.seed = layout, comm, aggregation, seed
        self.anchor: list[torch.Tensor] | None = None

    def before_local_step(self) -> Round:
        if self.anchor is None:
            self.anchor = self.layout.snapshot()
        return
        yield

    def round(self, index: int, local_count: int) -> Round:
        """x̄ += mean_i Q(x_i − x̄); every worker restarts from x̄ (buffers averaged exactly)."""
        assert self.anchor is not None
        layout, comm = self.layout, self.comm
        if comm.included:
            yield from check_finite(layout, comm, local_count, index)
            pipelines = difference_pipelines(
                layout, self.anchor, comm, self.aggregation, self.seed, index, "model"
            )
            means = yield from averaged(pipelines + buffer_pipelines(layout, comm))
            layout.write_average(self.anchor, means)
        self.anchor = layout.snapshot()

    def sync(self, index: int, local_count: int) -> Round:
        """One round, compressed as configured, when a local step was taken since the last."""
        if local_count == 0:
            return False
        yield from self.round(index, local_count)
        return True

    def state_dict(self) -> list[torch.Tensor] | None:
        """The anchor (None before the first local step)."""
        return None if self.anchor is None else [a.clone() for a in self.anchor]

    def load_state_dict(self, state: list[torch.Tensor] | None) -> None:
        self.anchor = self.layout.check_anchor(state, "model")
