"""hvd_qpr.DistributedOptimizer: Horovod's DistributedOptimizer with compression and K local steps.

With ``local_steps=1`` it averages (compressed) gradients before every step, as Horovod does; with
``local_steps=K > 1`` it runs Quantized Parallel-Restarted SGD (Jiang & Agrawal, "A Linear Speedup
Analysis of Distributed Deep Learning with Sparse and Quantized Communication", NeurIPS 2018;
Yu, Jin & Yang, "Parallel Restarted SGD with Faster Convergence and Less Communication", AAAI
2019): K local steps, then the compressed average of the model differences since the last
average, from which every worker restarts (DESIGN.md 2.3).

This module only wires: the factory builds the :class:`~hvd_qpr.layout.Layout`, picks the
averager of the paradigm (:mod:`hvd_qpr.averaging`, :mod:`hvd_qpr.gossip`,
:mod:`hvd_qpr.overlap`) and the gradient path (:mod:`hvd_qpr.gradients`); the mixin drives them
from ``step()`` as :mod:`hvd_qpr.schedule` says, and wraps their state in ``state_dict()``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import horovod.torch as hvd
import horovod.torch.optimizer as hvd_optimizer
import torch

from hvd_qpr import collectives
from hvd_qpr.averaging import Averager, RingAllReduce, Round
from hvd_qpr.collectives import AGGREGATIONS, Comm, CommStats, Link
from hvd_qpr.compression import Compression, Compressor, ErrorFeedback, as_compressor
from hvd_qpr.consistency import Field, check_same_on_all_ranks, crc
from hvd_qpr.gossip import GOSSIP_MODES, Gossip, Topology, make_topology
from hvd_qpr.gradients import GradientAverager
from hvd_qpr.layout import Layout
from hvd_qpr.overlap import Overlap
from hvd_qpr.schedule import Progress, SyncSchedule

_STATE_KEY = "hvd_qpr"


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods copied onto a subclass of the wrapped optimizer's class (as Horovod does)."""

    def _qpr_setup(
        self,
        layout: Layout,
        comm: Comm,
        compressor: Compressor,
        schedule: SyncSchedule,
        averager: Averager,
        gradients: GradientAverager,
        op: Any,
    ) -> None:
        self._qpr_layout, self._qpr_comm, self._qpr_compressor = layout, comm, compressor
        self._qpr_schedule, self._qpr_averager, self._qpr_gradients = schedule, averager, gradients
        self._qpr_progress = gradients.progress
        self._qpr_op = op
        self._qpr_checked = False
        gradients.register_hooks(self._qpr_check_config)

    # ---- consistency across ranks ----------------------------------------------------------------

    def _qpr_signature(self) -> list[Field]:
        """(field, integer code, readable value) of everything the ranks must agree on."""
        layout, schedule, passes = self._qpr_layout, self._qpr_schedule, self._qpr_gradients
        total = sum(p.numel() for p in layout.params)
        aggregation = self._qpr_averager.aggregation
        return [
            ("compression", crc(self._qpr_compressor.name), self._qpr_compressor.name),
            ("local_steps", schedule.local_steps, str(schedule.local_steps)),
            ("warmup_steps", schedule.warmup_steps, str(schedule.warmup_steps)),
            ("aggregation", crc(aggregation), aggregation),
            (
                "backward_passes_per_step",
                passes.backward_passes,
                str(passes.backward_passes),
            ),
            ("op", crc(str(self._qpr_op)), str(self._qpr_op)),
            (
                "parameter names, shapes and dtypes",
                crc(layout.signature()),
                f"{len(layout.params)} tensors of {total} values",
            ),
            ("buckets", len(layout.buckets), str(len(layout.buckets))),
            *self._qpr_averager.signature(),
        ]

    def _qpr_config_round(self) -> Round:
        """Compares the configuration of all ranks once, before the first collective."""
        if self._qpr_checked or not self._qpr_comm.included:
            return
        self._qpr_checked = True
        yield from check_same_on_all_ranks(self._qpr_comm, self._qpr_signature())

    def _qpr_check_config(self) -> None:
        collectives.run(self._qpr_config_round())

    # ---- gradient averaging (local_steps == 1, and the warm-up) ----------------------------------

    def synchronize(self) -> None:
        """Waits for the gradients' averages and writes them into ``.grad`` (Horovod's meaning;
        call it before clipping gradients, then ``step()`` inside ``skip_synchronize()``).
        Does nothing on steps that only take a local step."""
        collectives.run(self._qpr_synchronize())

    def _qpr_synchronize(self) -> Round:
        yield from self._qpr_config_round()
        yield from self._qpr_gradients.synchronize()

    @contextmanager
    def skip_synchronize(self):
        """Within it, ``step()`` does not synchronize (it was done by hand before clipping)."""
        self._qpr_gradients.should_synchronize = False
        try:
            yield
        finally:
            self._qpr_gradients.should_synchronize = True

    # ---- the step --------------------------------------------------------------------------------

    def step(self, closure=None):
        """One step: gradients averaged first when the schedule says so, else a local step; after
        every ``local_steps`` local steps, the models are averaged."""
        return collectives.run(self._qpr_step(closure))

    def _qpr_step(self, closure=None) -> Round:
        """:meth:`step` as a generator of its collectives (the in-process tests drive M)."""
        progress, grads, averager = self._qpr_progress, self._qpr_gradients, self._qpr_averager
        if self._qpr_schedule.averages_gradients(progress.step):
            if grads.should_synchronize:
                if grads.synchronized:
                    warnings.warn(
                        "optimizer.step() called without optimizer.skip_synchronize() context "
                        "after optimizer.synchronize(). This can cause training slowdown.",
                        stacklevel=4,  # the caller of step(), through run()
                    )
                yield from self._qpr_synchronize()
            grads.synchronized = False
            loss = super(self.__class__, self).step(closure)
        else:
            yield from self._qpr_config_round()
            yield from averager.before_local_step()
            grads.synchronized = False
            loss = super(self.__class__, self).step(closure)
            progress.local_count += 1
            averager.after_local_step()
        progress.step += 1
        if self._qpr_schedule.syncs_after(progress.local_count):
            yield from averager.round(progress.round, progress.local_count)
            progress.round += 1
            progress.local_count = 0
        return loss

    def sync_models(self) -> None:
        """Averages the models now, so that every rank holds the same model, e.g. before
        evaluating or saving a checkpoint, and at the end of training. Call it on every rank.

        With ring all-reduce QPR-SGD it is one round, compressed as configured, and the next
        round counts its local steps from here; a no-op when no local step was taken since the
        last average. With a gossip topology or Overlap-Local-SGD the models differ between
        rounds, so it is one exact (uncompressed) all-reduce average of the models and buffers;
        Overlap-Local-SGD first finishes the average in flight and updates its anchor, then
        takes the exact average as its anchor. Finish Overlap-Local-SGD with it (or with
        ``state_dict()``) before another optimizer sends the same parameter names: Horovod
        refuses a name whose collective is still in flight."""
        collectives.run(self._qpr_sync())

    def _qpr_sync(self) -> Round:
        progress = self._qpr_progress
        if (yield from self._qpr_averager.sync(progress.round, progress.local_count)):
            progress.round += 1
        progress.local_count = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._qpr_gradients.pending:
            raise AssertionError(
                "optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(). This is prohibited as it can cause "
                "a race condition."
            )
        return super(self.__class__, self).zero_grad(set_to_none)

    # ---- accounting and state --------------------------------------------------------------------

    def comm_stats(self) -> dict[str, float]:
        """What this worker sent so far: payload_bytes (handed to Horovod), wire_bytes (sent on
        the network under each collective's algorithm, DESIGN.md 2.3), collectives (count) and
        wait_seconds (time blocked waiting for collectives)."""
        return self._qpr_comm.stats.as_dict()

    def reset_comm_stats(self) -> None:
        """Sets the counts of :meth:`comm_stats` back to zero."""
        self._qpr_comm.stats.reset()

    @property
    def aggregation(self) -> str:
        """The aggregation in use (what ``"auto"`` chose; ``"gossip"`` with a topology)."""
        return self._qpr_averager.aggregation

    @property
    def topology(self) -> Topology | None:
        """The gossip graph (its ``repr`` shows the spectral gap), or None."""
        return self._qpr_averager.topology

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus this rank's schedule position, residuals and the
        averager's state, so a run resumed on every rank from its own state continues exactly.
        Call it on every rank: an average in flight (Overlap-Local-SGD) is finished first."""
        state = super(self.__class__, self).state_dict()
        collectives.run(self._qpr_averager.settle())
        compressor, progress = self._qpr_compressor, self._qpr_progress
        state[_STATE_KEY] = {
            "step": progress.step,
            "round": progress.round,
            "local_count": progress.local_count,
            "residuals": compressor.state_dict() if isinstance(compressor, ErrorFeedback) else {},
            "paradigm": self._qpr_averager.paradigm,
            self._qpr_averager.state_key: self._qpr_averager.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY, None)
        self._qpr_gradients.reset()
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None:
            return
        ours = _upgrade_state(ours)
        paradigm = self._qpr_averager.paradigm
        if ours["paradigm"] != paradigm:
            raise ValueError(
                f"load_state_dict: the state was saved by {ours['paradigm']} and this "
                f"optimizer runs {paradigm}"
            )
        progress = self._qpr_progress
        progress.step, progress.round = int(ours["step"]), int(ours["round"])
        progress.local_count = int(ours["local_count"])
        if isinstance(self._qpr_compressor, ErrorFeedback):
            self._qpr_compressor.load_state_dict(ours["residuals"])
        self._qpr_averager.load_state_dict(ours[self._qpr_averager.state_key])


def _upgrade_state(ours: dict[str, Any]) -> dict[str, Any]:
    """A state saved before it named its paradigm (each paradigm's state under its key, the
    others' None) with the paradigm named."""
    if "paradigm" in ours:
        return ours
    saved = [a for a in (Gossip, Overlap) if ours.get(a.state_key) is not None]
    return {**ours, "paradigm": (saved[0] if saved else RingAllReduce).paradigm}


def _parameter_names(
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
    param_groups: list[dict],
) -> dict[int, str]:
    """Names by id(parameter), checked as Horovod checks them."""
    if named_parameters is None:
        return {
            id(p): f"noname.{i}.{j}"
            for i, group in enumerate(param_groups)
            for j, p in enumerate(group["params"])
        }
    pairs = list(named_parameters)
    if any(not isinstance(pair, tuple) or len(pair) != 2 for pair in pairs):
        raise ValueError(
            "named_parameters should be a sequence of tuples (name, parameter), usually produced "
            "by model.named_parameters()"
        )
    seen: set[str] = set()
    dups = sorted({n for n, _ in pairs if n in seen or seen.add(n)})
    if dups:
        raise ValueError(f"Parameter names in named_parameters must be unique. Duplicates: {dups}")
    names = {id(p): n for n, p in pairs}
    unnamed = [p for g in param_groups for p in g["params"] if id(p) not in names]
    if unnamed:
        raise ValueError(
            f"named_parameters was specified, but {len(unnamed)} of the optimizer's parameters "
            "are not named in it"
        )
    return names


def DistributedOptimizer(  # noqa: N802  (Horovod's name for a factory)
    optimizer: torch.optim.Optimizer,
    named_parameters: Iterable[tuple[str, torch.Tensor]] | None = None,
    compression: object = Compression.none,
    local_steps: int = 1,
    warmup_steps: int = 0,
    aggregation: str = "auto",
    error_feedback: bool = False,
    backward_passes_per_step: int = 1,
    op: Any = hvd.Average,
    gradient_predivide_factor: float = 1.0,
    process_set: hvd.ProcessSet = hvd.global_process_set,
    seed: int = 0,
    named_buffers: Iterable[tuple[str, torch.Tensor]] | None = None,
    bucket_bytes: int = 64 * 2**20,
    min_compress_numel: int = 1024,
    link: Link | None = None,
    topology: str | torch.Tensor | Topology | None = None,
    consensus_step: float | None = None,
    gossip: str = "choco",
    overlap: bool = False,
    pullback: float = 0.6,
    anchor_momentum: float = 0.0,
) -> torch.optim.Optimizer:
    """Wraps a torch optimizer so that workers average compressed gradients or, every
    ``local_steps`` steps, compressed model differences (QPR-SGD).

    A drop-in replacement for ``hvd.DistributedOptimizer``: the result is an instance of a
    subclass of the wrapped optimizer's class (LR schedulers, ``zero_grad``, ``synchronize`` /
    ``skip_synchronize``, ``state_dict`` work as with Horovod), and with the defaults it does
    exactly what Horovod's does. Optimizer state (momentum, Adam moments) stays local.

    Args:
        optimizer: any torch optimizer.
        named_parameters: ``model.named_parameters()``; names key residuals and collectives.
        compression: an hvd_qpr compressor (``hvd_qpr.Compression.qsgd(bits=4)``, ...) or one of
            Horovod's (``hvd.Compression.fp16``).
        local_steps: K. 1 averages gradients every step; K > 1 averages models every K steps.
        warmup_steps: first steps that average uncompressed gradients before switching.
        aggregation: ``"auto"`` (the cost model in :mod:`hvd_qpr.collectives`), ``"allreduce"``
            (sum-compatible compressors), ``"packed-sum"``, ``"scatter-gather"`` or
            ``"allgather"``.
        error_feedback: wrap the compressor in :class:`hvd_qpr.ErrorFeedback`.
        backward_passes_per_step: backward passes accumulated before gradients are averaged.
        op: ``hvd.Average`` or ``hvd.Sum``, for gradient averaging (models are always averaged).
        gradient_predivide_factor: as Horovod's, for the uncompressed all-reduces.
        process_set: the Horovod process set to average over.
        seed: seeds the stochastic rounding, with rank, round and bucket (DESIGN.md 2.3).
        named_buffers: ``model.named_buffers()``: floating-point buffers (BatchNorm statistics)
            are averaged at every model average; integer ones (counters) are left alone.
        bucket_bytes: size of the fused buffers of compressed tensors (float32 bytes).
        min_compress_numel: tensors with fewer values are sent uncompressed.
        link: the network for the ``"auto"`` cost model (default: 1 Gbit/s, 100 us).
        topology: gossip instead of ring all-reduce (DESIGN.md 2.4; Koloskova et al., ICML 2019):
            ``"ring"``, ``"torus"``, ``"exponential"``, ``"one-peer"``, ``"complete"``, a
            symmetric doubly-stochastic M×M mixing matrix, or a :class:`hvd_qpr.Topology`.
            Every ``local_steps`` steps (K = 1 included) each worker exchanges compressed
            model updates with its neighbours only (one ``hvd.alltoall``).
        consensus_step: γ of the error-controlled gossip, in (0, 1]. Default 1.0 for
            sum-compatible compressors (none, fp16, bf16: exact gossip x ← Wx) and
            ``0.5 * compression.contraction()`` for the others (CHOCO-SGD's step shrinks with the
            compression quality δ: 0.47 for 4-bit QSGD, 0.12 for 2-bit, 0.005 for Top-k at
            1%); larger steps make the spread of the models stall or grow.
        gossip: ``"choco"`` (public copies, error-controlled; the default) or
            ``"quantized-average"``, the baseline that averages the neighbours' quantized models
            and accumulates their quantization error.
        overlap: Overlap-Local-SGD (DESIGN.md 2.5; Wang, Liang & Joshi, ICASSP 2020): the
            average of the models travels while the next τ = ``local_steps`` local steps
            compute (τ = 2 when ``local_steps`` is 1). Works with every aggregation and
            compressor of the ring all-reduce path.
        pullback: α of Overlap-Local-SGD, in [0, 1]: how far each model is pulled towards the
            anchor at a sync point (0: the workers never mix).
        anchor_momentum: β of Overlap-Local-SGD, in [0, 1): the anchor's momentum (0: the
            anchor is the last finished average).

    Returns:
        The distributed optimizer. Besides Horovod's methods it has ``sync_models()``,
        ``comm_stats()``, ``reset_comm_stats()``, ``aggregation`` and ``topology``.

    Raises:
        ValueError / TypeError: an argument out of range or a compressor that cannot be used.

    Example:
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        >>> opt = hvd_qpr.DistributedOptimizer(
        ...     opt,
        ...     model.named_parameters(),
        ...     compression=hvd_qpr.Compression.qsgd(bits=4),
        ...     local_steps=8,
        ... )
        >>> hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
        )
    compressor = as_compressor(compression)
    if topology is not None and (error_feedback or isinstance(compressor, ErrorFeedback)):
        raise ValueError(
            "error_feedback does not apply to gossip: its public copies already keep what "
            "compression drops (CHOCO-SGD); leave error_feedback=False with a topology"
        )
    if error_feedback and not isinstance(compressor, ErrorFeedback):
        compressor = ErrorFeedback(compressor)
    _check_paradigm_arguments(
        topology, consensus_step, gossip, overlap, pullback, anchor_momentum, aggregation
    )
    if overlap and local_steps == 1:
        local_steps = 2  # tau
    schedule = SyncSchedule(local_steps, warmup_steps, mixes_models=topology is not None or overlap)
    if compressor.traits.needs_error_feedback and not isinstance(compressor, ErrorFeedback):
        warnings.warn(
            f"{compressor} is biased and meant to run with error feedback; pass "
            "error_feedback=True (or hvd_qpr.ErrorFeedback(compression))",
            stacklevel=2,
        )
    if aggregation != "auto" and aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation must be 'auto' or one of {list(AGGREGATIONS)}, got {aggregation!r}"
        )
    for name, value, low in (
        ("backward_passes_per_step", backward_passes_per_step, 1),
        ("min_compress_numel", min_compress_numel, 1),
        ("bucket_bytes", bucket_bytes, 4),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if op not in (hvd.Average, hvd.Sum):
        raise ValueError("op must be hvd.Average or hvd.Sum (Adasum is not supported)")
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")

    # process_set may also be another collectives backend (the in-process one of the tests)
    comm = Comm(process_set, CommStats())
    names = _parameter_names(named_parameters, optimizer.param_groups)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    layout = Layout(
        [(names[id(p)], p) for p in params],
        named_buffers or [],
        compressor,
        bucket_bytes,
        min_compress_numel,
    )
    if topology is not None:
        graph = topology if isinstance(topology, Topology) else make_topology(topology, comm.size)
        if graph.size != comm.size:
            raise ValueError(f"the topology has {graph.size} workers, the process set {comm.size}")
        if consensus_step is None:
            traits = compressor.traits
            consensus_step = 1.0 if traits.sum_compatible else 0.5 * compressor.contraction()
        averager: Averager = Gossip(layout, comm, graph, consensus_step, gossip, seed)
    else:
        mode = _resolve_aggregation(aggregation, compressor, layout, comm.size, link)
        if overlap:
            averager = Overlap(layout, comm, mode, seed, pullback, anchor_momentum)
        else:
            averager = RingAllReduce(layout, comm, mode, seed)
    gradients = GradientAverager(
        layout,
        comm,
        schedule,
        Progress(),
        averager.aggregation,
        op,
        gradient_predivide_factor,
        seed,
        backward_passes_per_step,
    )

    cls = type(
        optimizer.__class__.__name__,
        (optimizer.__class__,),
        dict(_DistributedOptimizer.__dict__),
    )
    # hvd.broadcast_optimizer_state recognizes a distributed optimizer by its module and then
    # steps the wrapped optimizer directly; without this it would run our step() (communicating
    # and advancing the schedule) to initialize the state.
    cls.__module__ = hvd_optimizer.__name__
    wrapped = cls.__new__(cls)
    wrapped.__dict__.update(optimizer.__dict__)
    wrapped._qpr_setup(layout, comm, compressor, schedule, averager, gradients, op)
    return wrapped


def _resolve_aggregation(
    aggregation: str, compressor: Compressor, layout: Layout, size: int, link: Link | None
) -> str:
    """The mode buckets travel in: what the cost model picks for ``"auto"``, else the one asked
    for, if the compressor allows it."""
    if aggregation == "auto":
        return collectives.choose_aggregation(compressor, layout.largest_bucket, size, link)
    if aggregation not in collectives.feasible_aggregations(compressor):
        raise ValueError(
            f"hvd_qpr.DistributedOptimizer: aggregation {aggregation!r} does not work with "
            f"{compressor}; choose one of "
            f"{['auto', *collectives.feasible_aggregations(compressor)]}"
        )
    return aggregation


def _check_paradigm_arguments(
    topology: object,
    consensus_step: float | None,
    gossip: str,
    overlap: bool,
    pullback: float,
    anchor_momentum: float,
    aggregation: str,
) -> None:
    """Refuses arguments of one paradigm given to another (the averagers check their ranges)."""
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    if topology is None:
        if consensus_step is not None or gossip != "choco":
            raise ValueError("consensus_step and gossip apply only with a topology")
        if not overlap and (pullback, anchor_momentum) != (0.6, 0.0):
            raise ValueError("pullback and anchor_momentum apply only with overlap=True")
        return
    if overlap:
        raise ValueError("choose gossip (topology=...) or overlap=True, not both")
    if aggregation != "auto":
        raise ValueError(
            f"aggregation={aggregation!r} does not apply to gossip, which exchanges with "
            "neighbours only; leave it at 'auto' with a topology"
        )
    if gossip not in GOSSIP_MODES:
        raise ValueError(f"gossip must be one of {list(GOSSIP_MODES)}, got {gossip!r}")
