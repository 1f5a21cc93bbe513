"""hvd_qpr.DistributedOptimizer: Horovod's DistributedOptimizer with compression and K local steps.

With ``local_steps=1`` it averages (compressed) gradients before every step, as Horovod does; with
``local_steps=K > 1`` it runs Quantized Parallel-Restarted SGD (Jiang & Agrawal, "A Linear Speedup
Analysis of Distributed Deep Learning with Sparse and Quantized Communication", NeurIPS 2018;
Yu, Jin & Yang, "Parallel Restarted SGD with Faster Convergence and Less Communication", AAAI
2019): K local steps, then the compressed average of the model differences since the last
average, from which every worker restarts (DESIGN.md 2.3).

The wiring lives here; *when* to communicate is :mod:`hvd_qpr.schedule`, *how* is
:mod:`hvd_qpr.collectives`, and the compressor is only known through its declared traits.
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Iterable
from contextlib import contextmanager
from typing import Any

import horovod.torch as hvd
import horovod.torch.optimizer as hvd_optimizer
import torch

from hvd_qpr import collectives
from hvd_qpr.collectives import AGGREGATIONS, Comm, CommStats, InFlight, Link, Pipeline
from hvd_qpr.compression import Compression, Compressor, ErrorFeedback, as_compressor
from hvd_qpr.gossip import (
    GOSSIP_MODES,
    GossipGroup,
    GossipState,
    Topology,
    make_topology,
)
from hvd_qpr.overlap import OverlapState
from hvd_qpr.schedule import SyncSchedule
from hvd_qpr.seeds import derive_seed

_COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)
_STATE_KEY = "hvd_qpr"


class _Bucket:
    """Compressible parameters fused into one flat float32 buffer."""

    def __init__(self, index: int, params: list[torch.Tensor], names: list[str]) -> None:
        self.index = index
        self.params = params
        self.segments = [(n, p.numel()) for n, p in zip(names, params, strict=True)]
        self.name = f"hvd_qpr.bucket{index}"

    def flatten(self, tensors: Iterable[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        pieces = flat.split([p.numel() for p in self.params])
        return [piece.view(p.shape) for piece, p in zip(pieces, self.params, strict=True)]


class _DistributedOptimizer(torch.optim.Optimizer):
    """Methods copied onto a subclass of the wrapped optimizer's class (as Horovod does)."""

    # ---- set-up ----------------------------------------------------------------------------------

    def _qpr_setup(
        self,
        named_parameters: Iterable[tuple[str, torch.Tensor]] | None,
        compression: Compressor,
        schedule: SyncSchedule,
        aggregation: str,
        backward_passes_per_step: int,
        op: Any,
        gradient_predivide_factor: float,
        process_set: hvd.ProcessSet,
        seed: int,
        named_buffers: Iterable[tuple[str, torch.Tensor]] | None,
        bucket_bytes: int,
        min_compress_numel: int,
        link: Link | None,
        gossip: GossipState | None = None,
        overlap: OverlapState | None = None,
    ) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        names = _parameter_names(named_parameters, self.param_groups)
        self._qpr_names = {p: names[id(p)] for p in params}
        self._qpr_params = [p for p in params if p.requires_grad]
        self._qpr_buffers = [(n, b) for n, b in (named_buffers or []) if b.dtype.is_floating_point]
        self._qpr_compressor = compression
        self._qpr_schedule = schedule
        self._qpr_op = op
        self._qpr_predivide = gradient_predivide_factor
        self._qpr_process_set = process_set
        self._qpr_seed = seed
        self._qpr_comm = Comm(process_set, CommStats())
        self._qpr_backward_passes = backward_passes_per_step
        self._qpr_delay = {p: backward_passes_per_step for p in self._qpr_params}
        self._qpr_pending: dict[torch.Tensor, Pipeline] = {}
        self._qpr_synchronized = False
        self._qpr_should_synchronize = True
        self._qpr_checked = False
        self._qpr_step = 0  # step() calls completed
        self._qpr_round = 0  # model averages done
        self._qpr_local_count = 0  # local steps since the last model average
        self._qpr_anchor: list[torch.Tensor] | None = None  # the last averaged model
        self._qpr_gossip = gossip
        self._qpr_overlap = overlap

        # Tiny, non-float and float64 tensors, and all tensors of a sum-compatible compressor,
        # are all-reduced one by one (Horovod fuses them); the rest is fused into buckets.
        fused = not compression.traits.sum_compatible
        self._qpr_dense = [
            p
            for p in self._qpr_params
            if not (fused and p.dtype in _COMPRESSIBLE and p.numel() >= min_compress_numel)
        ]
        dense_ids = {id(p) for p in self._qpr_dense}
        self._qpr_dense_ids = dense_ids
        self._qpr_buckets: list[_Bucket] = []
        current: list[torch.Tensor] = []
        for p in self._qpr_params:
            if id(p) in dense_ids:
                continue
            if current and 4 * (sum(q.numel() for q in current) + p.numel()) > bucket_bytes:
                self._qpr_add_bucket(current)
                current = []
            current.append(p)
        if current:
            self._qpr_add_bucket(current)
        size = process_set.size() if process_set.included() else 1
        numel = max((sum(q.numel() for q in b.params) for b in self._qpr_buckets), default=0)
        if gossip is not None:
            aggregation = "gossip"  # neighbour exchange; no aggregation mode applies
        elif aggregation == "auto":
            aggregation = collectives.choose_aggregation(compression, numel, size, link)
        elif aggregation not in collectives.feasible_aggregations(compression):
            raise ValueError(
                f"hvd_qpr.DistributedOptimizer: aggregation {aggregation!r} does not work with "
                f"{compression}; choose one of "
                f"{['auto', *collectives.feasible_aggregations(compression)]}"
            )
        self._qpr_aggregation = aggregation
        # The dense path compresses only with a sum-compatible compressor.
        self._qpr_dense_compressor = compression if not fused else Compression.none
        self._qpr_gossip_groups = self._qpr_make_gossip_groups() if gossip is not None else []
        if process_set.included():
            for p in self._qpr_params:
                p.register_post_accumulate_grad_hook(self._qpr_on_grad)

    def _qpr_add_bucket(self, params: list[torch.Tensor]) -> None:
        names = [self._qpr_names[p] for p in params]
        self._qpr_buckets.append(_Bucket(len(self._qpr_buckets), params, names))

    def _qpr_make_gossip_groups(self) -> list[GossipGroup]:
        """Buckets gossip with the compressor; small tensors with a sum-compatible one (fp16)
        or exactly; floating-point buffers exactly."""
        groups = [
            GossipGroup(b.name, sum(p.numel() for p in b.params), self._qpr_compressor)
            for b in self._qpr_buckets
        ]
        cast = self._qpr_dense_compressor
        for p in self._qpr_dense:
            exact = p.dtype not in _COMPRESSIBLE or cast is Compression.none
            compressor = None if exact else cast
            dtype = p.dtype if exact else torch.float32
            groups.append(GossipGroup(self._qpr_names[p], p.numel(), compressor, dtype))
        for name, buf in self._qpr_buffers:
            groups.append(GossipGroup(f"buffer.{name}", buf.numel(), None, buf.dtype))
        return groups

    # ---- consistency across ranks ----------------------------------------------------------------

    def _qpr_signature(self) -> list[tuple[str, int, str]]:
        """(field, integer code, readable value) of everything the ranks must agree on."""

        def crc(text: str) -> int:
            return zlib.crc32(text.encode())

        layout = ";".join(
            f"{self._qpr_names[p]}:{tuple(p.shape)}:{p.dtype}" for p in self._qpr_params
        )
        schedule = self._qpr_schedule
        total = sum(p.numel() for p in self._qpr_params)
        return [
            ("compression", crc(self._qpr_compressor.name), self._qpr_compressor.name),
            ("local_steps", schedule.local_steps, str(schedule.local_steps)),
            ("warmup_steps", schedule.warmup_steps, str(schedule.warmup_steps)),
            ("aggregation", crc(self._qpr_aggregation), self._qpr_aggregation),
            (
                "backward_passes_per_step",
                self._qpr_backward_passes,
                str(self._qpr_backward_passes),
            ),
            ("op", crc(str(self._qpr_op)), str(self._qpr_op)),
            (
                "parameter names, shapes and dtypes",
                crc(layout),
                f"{len(self._qpr_params)} tensors of {total} values",
            ),
            ("buckets", len(self._qpr_buckets), str(len(self._qpr_buckets))),
            *self._qpr_paradigm_signature(),
        ]

    def _qpr_paradigm_signature(self) -> list[tuple[str, int, str]]:
        def crc(text: str) -> int:
            return zlib.crc32(text.encode())

        gossip, overlap = self._qpr_gossip, self._qpr_overlap
        topology = gossip.topology if gossip is not None else None
        fields = [
            ("topology", topology.signature() if topology else 0, repr(topology)),
            (
                "gossip mode",
                crc(gossip.mode) if gossip else 0,
                gossip.mode if gossip else "-",
            ),
            (
                "consensus_step",
                crc(repr(gossip.gamma)) if gossip else 0,
                repr(gossip and gossip.gamma),
            ),
            ("overlap", int(overlap is not None), str(overlap is not None)),
            # present on every rank, so the table has the same width everywhere
            (
                "pullback",
                crc(repr(overlap.alpha)) if overlap else 0,
                repr(overlap and overlap.alpha),
            ),
            (
                "anchor_momentum",
                crc(repr(overlap.beta)) if overlap else 0,
                repr(overlap and overlap.beta),
            ),
        ]
        return fields

    def _qpr_check_config(self) -> None:
        """Compares the configuration of all ranks once, before the first collective; raises on
        every rank when they differ (each rank holds the whole table, so none hangs)."""
        if self._qpr_checked or not self._qpr_process_set.included():
            return
        self._qpr_checked = True
        signature = self._qpr_signature()
        codes = torch.tensor([[code for _, code, _ in signature]], dtype=torch.int64)
        comm = self._qpr_comm  # counted in comm_stats like every byte the library sends
        table = comm.wait(comm.allgather(codes, "hvd_qpr.config"))
        rank = self._qpr_process_set.rank()
        for column, (field, _, value) in enumerate(signature):
            values = table[:, column].tolist()
            if len(set(values)) > 1:
                groups: dict[int, list[int]] = {}
                for r, v in enumerate(values):
                    groups.setdefault(v, []).append(r)
                who = "; ".join(f"ranks {rs}" for rs in groups.values())
                raise ValueError(
                    f"hvd_qpr.DistributedOptimizer: ranks disagree on {field} ({who} agree among "
                    f"themselves); rank {rank} has {value}. Every rank must wrap the same model "
                    "with the same arguments"
                )

    # ---- gradient averaging (local_steps == 1, and the warm-up) ----------------------------------

    def _qpr_on_grad(self, p: torch.Tensor) -> None:
        self._qpr_check_config()
        if not self._qpr_schedule.averages_gradients(self._qpr_step):
            return
        if p in self._qpr_pending and self._qpr_delay[p] <= 0:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call "
                "to step(). Increase backward_passes_per_step to accumulate gradients locally."
            )
        self._qpr_delay[p] -= 1
        if self._qpr_delay[p] == 0 and self._qpr_is_dense_now(p):
            self._qpr_pending[p] = self._qpr_launch_dense_grad(p)

    def _qpr_is_dense_now(self, p: torch.Tensor) -> bool:
        compressed = self._qpr_schedule.compresses_gradients(self._qpr_step)
        return not compressed or id(p) in self._qpr_dense_ids

    def _qpr_launch_dense_grad(self, p: torch.Tensor) -> Pipeline:
        if p.grad is None:  # unused on this rank; another may have a gradient
            p.grad = torch.zeros_like(p)
        compressed = self._qpr_schedule.compresses_gradients(self._qpr_step)
        compressor = self._qpr_dense_compressor if compressed else Compression.none
        average = self._qpr_op == hvd.Average
        pipeline = collectives.allreduce_dense(
            p.grad,
            compressor,
            self._qpr_comm,
            f"hvd_qpr.grad.{self._qpr_names[p]}",
            [(self._qpr_names[p], p.numel())],
            op=self._qpr_op,
            prescale_factor=1.0 / self._qpr_predivide if average else 1.0,
            postscale_factor=self._qpr_predivide if average else 1.0,
        )
        next(pipeline)  # launch now, overlapping the rest of the backward pass
        return pipeline

    def synchronize(self) -> None:
        """Waits for the gradients' averages and writes them into ``.grad`` (Horovod's meaning;
        call it before clipping gradients, then ``step()`` inside ``skip_synchronize()``).
        Does nothing on steps that only take a local step."""
        if not self._qpr_process_set.included():
            self._qpr_synchronized = True
            return
        self._qpr_check_config()
        if not self._qpr_schedule.averages_gradients(self._qpr_step):
            self._qpr_synchronized = True
            return
        compressed = self._qpr_schedule.compresses_gradients(self._qpr_step)
        fresh: list[tuple[object, Pipeline]] = []
        dense = self._qpr_dense if compressed else self._qpr_params
        for p in dense:
            if p not in self._qpr_pending:
                self._qpr_pending[p] = self._qpr_launch_dense_grad(p)
        if compressed:
            rank = self._qpr_process_set.rank()
            for bucket in self._qpr_buckets:
                grads = [
                    p.grad if p.grad is not None else torch.zeros_like(p) for p in bucket.params
                ]
                seed = derive_seed(self._qpr_seed, rank, self._qpr_step, bucket.index)
                average = self._qpr_op == hvd.Average
                pipeline = self._qpr_aggregate(bucket, bucket.flatten(grads), seed, average)
                fresh.append((bucket, pipeline))
        started = list(self._qpr_pending.items())
        results = collectives.run_pipelines([pl for _, pl in fresh] + [pl for _, pl in started])
        for (bucket, _), flat in zip(fresh, results[: len(fresh)], strict=True):
            for p, avg in zip(bucket.params, bucket.split(flat), strict=True):
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.copy_(avg)
        for (p, _), avg in zip(started, results[len(fresh) :], strict=True):
            p.grad.set_(avg)
        for p in self._qpr_delay:
            self._qpr_delay[p] = self._qpr_backward_passes
        self._qpr_pending.clear()
        self._qpr_synchronized = True

    def _qpr_aggregate(
        self, bucket: _Bucket, flat: torch.Tensor, seed: int, average: bool
    ) -> Pipeline:
        return collectives.aggregate(
            self._qpr_aggregation,
            flat,
            self._qpr_compressor,
            self._qpr_comm,
            bucket.name,
            bucket.segments,
            seed,
            average,
        )

    @contextmanager
    def skip_synchronize(self):
        """Within it, ``step()`` does not synchronize (it was done by hand before clipping)."""
        self._qpr_should_synchronize = False
        try:
            yield
        finally:
            self._qpr_should_synchronize = True

    # ---- the step --------------------------------------------------------------------------------

    def step(self, closure=None):
        """One step: gradients averaged first when the schedule says so, else a local step; after
        every ``local_steps`` local steps, the models are averaged."""
        schedule = self._qpr_schedule
        if schedule.averages_gradients(self._qpr_step):
            if self._qpr_should_synchronize:
                if self._qpr_synchronized:
                    warnings.warn(
                        "optimizer.step() called without optimizer.skip_synchronize() context "
                        "after optimizer.synchronize(). This can cause training slowdown.",
                        stacklevel=2,
                    )
                self.synchronize()
            self._qpr_synchronized = False
            loss = super(self.__class__, self).step(closure)
        else:
            self._qpr_check_config()
            self._qpr_before_local_step()
            self._qpr_synchronized = False
            loss = super(self.__class__, self).step(closure)
            self._qpr_local_count += 1
            if self._qpr_overlap is not None:
                self._qpr_overlap.poll()  # the average in flight moves on to its next collective
        self._qpr_step += 1
        if schedule.syncs_after(self._qpr_local_count):
            self._qpr_sync_round()
        return loss

    def _qpr_before_local_step(self) -> None:
        """What the first local step needs: the last averaged model (ring all-reduce), the anchor
        z (Overlap-Local-SGD) or the public copies (gossip), all from the common start."""
        if self._qpr_overlap is not None:
            if not self._qpr_overlap.started:
                self._qpr_overlap.start(self._qpr_params)
        elif self._qpr_gossip is not None:
            if not self._qpr_gossip.initialized:
                self._qpr_start_gossip()
        elif self._qpr_anchor is None:
            self._qpr_anchor = [p.detach().clone() for p in self._qpr_params]

    def _qpr_sync_round(self) -> None:
        if self._qpr_gossip is not None:
            self._qpr_gossip_round()
        elif self._qpr_overlap is not None:
            self._qpr_overlap_round()
        else:
            self._qpr_average_models()
        self._qpr_round += 1
        self._qpr_local_count = 0

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
        if self._qpr_gossip is None and self._qpr_overlap is None:
            if self._qpr_local_count > 0:
                self._qpr_average_models()
                self._qpr_round += 1
                self._qpr_local_count = 0
            return
        overlap = self._qpr_overlap
        if overlap is not None and overlap.started:
            average = overlap.collect(self._qpr_overlap_average)
            self._qpr_check_average(average)
            overlap.update_anchor(average)
        if self._qpr_process_set.included():
            pipelines = [
                collectives.allreduce_dense(
                    t.detach().clone(),
                    Compression.none,
                    self._qpr_comm,
                    f"hvd_qpr.sync.{name}",
                    [],
                )
                for name, t in self._qpr_named_state()
            ]
            with torch.no_grad():
                for (_, t), avg in zip(
                    self._qpr_named_state(),
                    collectives.run_pipelines(pipelines),
                    strict=True,
                ):
                    t.copy_(avg)
        if overlap is not None and overlap.started:
            overlap.anchor = [p.detach().clone() for p in self._qpr_params]
        self._qpr_local_count = 0

    def _qpr_named_state(self) -> list[tuple[str, torch.Tensor]]:
        """Trained parameters and floating-point buffers, by name."""
        named = [(self._qpr_names[p], p) for p in self._qpr_params]
        return named + [(f"buffer.{n}", b) for n, b in self._qpr_buffers]

    def _qpr_check_finite(self) -> None:
        flags = torch.tensor(
            [[0 if bool(torch.isfinite(p).all()) else 1 for p in self._qpr_params]],
            dtype=torch.uint8,
        )
        table = self._qpr_comm.wait(self._qpr_comm.allgather(flags, "hvd_qpr.finite"))
        bad = table.nonzero().tolist()
        if bad:
            column = bad[0][1]
            ranks = sorted({r for r, c in bad if c == column})
            name = self._qpr_names[self._qpr_params[column]]
            raise FloatingPointError(
                f"hvd_qpr.DistributedOptimizer: the model difference of parameter {name!r} holds "
                f"NaN or Inf on rank(s) {ranks} after {self._qpr_local_count} local steps "
                f"(round {self._qpr_round}); nothing was averaged. Lower the learning rate or "
                "clip gradients"
            )

    def _qpr_difference_pipelines(self, anchor: list[torch.Tensor], tag: str) -> list[Pipeline]:
        """Averages of x_i − anchor: one aggregation per bucket (compressed, seeded by rank,
        round and bucket) and one all-reduce per small tensor, in that order."""
        anchors = {id(p): a for p, a in zip(self._qpr_params, anchor, strict=True)}
        rank = self._qpr_process_set.rank()
        pipelines: list[Pipeline] = []
        for bucket in self._qpr_buckets:
            delta = bucket.flatten(bucket.params) - bucket.flatten(
                anchors[id(p)] for p in bucket.params
            )
            seed = derive_seed(self._qpr_seed, rank, self._qpr_round, bucket.index)
            pipelines.append(self._qpr_aggregate(bucket, delta, seed, True))
        for p in self._qpr_dense:
            name = self._qpr_names[p]
            pipelines.append(
                collectives.allreduce_dense(
                    (p.detach() - anchors[id(p)]).contiguous(),
                    self._qpr_dense_compressor,
                    self._qpr_comm,
                    f"hvd_qpr.{tag}.{name}",
                    [(name, p.numel())],
                )
            )
        return pipelines

    def _qpr_anchor_plus(
        self, anchor: list[torch.Tensor], results: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """anchor + the averaged differences of :meth:`_qpr_difference_pipelines`, one tensor
        per parameter (buckets summed in float32, then cast back)."""
        anchors = {id(p): a for p, a in zip(self._qpr_params, anchor, strict=True)}
        out: dict[int, torch.Tensor] = {}
        nb = len(self._qpr_buckets)
        for bucket, mean in zip(self._qpr_buckets, results[:nb], strict=True):
            for p, d in zip(bucket.params, bucket.split(mean), strict=True):
                out[id(p)] = (anchors[id(p)].to(torch.float32) + d).to(p.dtype)
        for p, d in zip(self._qpr_dense, results[nb:], strict=True):
            out[id(p)] = anchors[id(p)] + d
        return [out[id(p)] for p in self._qpr_params]

    def _qpr_average_models(self) -> None:
        """x_bar += average of Q(x_i - x_bar); every worker restarts from x_bar (DESIGN.md 2.3)."""
        anchor = self._qpr_anchor
        assert anchor is not None
        if self._qpr_process_set.included():
            self._qpr_check_finite()
            pipelines = self._qpr_difference_pipelines(anchor, "model")
            for name, buf in self._qpr_buffers:
                pipelines.append(
                    collectives.allreduce_dense(
                        buf.data,
                        Compression.none,
                        self._qpr_comm,
                        f"hvd_qpr.buffer.{name}",
                        [],
                    )
                )
            results = collectives.run_pipelines(pipelines)
            nm = len(pipelines) - len(self._qpr_buffers)
            with torch.no_grad():
                for p, value in zip(
                    self._qpr_params,
                    self._qpr_anchor_plus(anchor, results[:nm]),
                    strict=True,
                ):
                    p.copy_(value)
                for (_, buf), avg in zip(self._qpr_buffers, results[nm:], strict=True):
                    buf.copy_(avg)
        self._qpr_anchor = [p.detach().clone() for p in self._qpr_params]

    # ---- gossip (DESIGN.md 2.4) ------------------------------------------------------------------

    def _qpr_gossip_values(self) -> list[torch.Tensor]:
        """The flat values of every gossip group (buckets, small tensors, buffers)."""
        values = [b.flatten(b.params) for b in self._qpr_buckets]
        values += [p.detach().reshape(-1).clone() for p in self._qpr_dense]
        return values + [buf.detach().reshape(-1).clone() for _, buf in self._qpr_buffers]

    def _qpr_start_gossip(self) -> None:
        """CHOCO's public copies start from the model before the first local step."""
        gossip = self._qpr_gossip
        assert gossip is not None
        if self._qpr_process_set.included():
            values = self._qpr_gossip_values()
            collectives.finish(gossip.start(self._qpr_gossip_groups, values, self._qpr_comm))

    def _qpr_gossip_round(self) -> None:
        """One round of (error-controlled) gossip with this round's neighbours."""
        gossip = self._qpr_gossip
        assert gossip is not None
        if not self._qpr_process_set.included():
            return
        self._qpr_check_finite()
        values = self._qpr_gossip_values()
        new = collectives.finish(
            gossip.round(self._qpr_gossip_groups, values, self._qpr_comm, self._qpr_round)
        )
        nb, nd = len(self._qpr_buckets), len(self._qpr_dense)
        with torch.no_grad():
            for bucket, flat in zip(self._qpr_buckets, new[:nb], strict=True):
                for p, v in zip(bucket.params, bucket.split(flat), strict=True):
                    p.copy_(v.to(p.dtype))
            for p, flat in zip(self._qpr_dense, new[nb : nb + nd], strict=True):
                p.copy_(flat.view_as(p).to(p.dtype))
            for (_, buf), flat in zip(self._qpr_buffers, new[nb + nd :], strict=True):
                buf.copy_(flat.view_as(buf).to(buf.dtype))

    # ---- Overlap-Local-SGD (DESIGN.md 2.5) -------------------------------------------------------

    def _qpr_overlap_round(self) -> None:
        """Finish the average started a round ago, update the anchor, start averaging the current
        models in the background, pull back towards the anchor."""
        overlap = self._qpr_overlap
        assert overlap is not None and overlap.anchor is not None
        average = overlap.collect(self._qpr_overlap_average)
        self._qpr_check_average(average)
        overlap.update_anchor(average)
        if self._qpr_process_set.included():
            overlap.launch(InFlight(self._qpr_difference_pipelines(overlap.anchor, "overlap")))
        overlap.pull_back(self._qpr_params)

    def _qpr_overlap_average(self, results: list[torch.Tensor]) -> list[torch.Tensor]:
        """a = z + the averaged differences (z has not moved since they were launched)."""
        overlap = self._qpr_overlap
        assert overlap is not None and overlap.anchor is not None
        return self._qpr_anchor_plus(overlap.anchor, results)

    def _qpr_check_average(self, average: list[torch.Tensor] | None) -> None:
        """Every rank sees the same average: a NaN or Inf in it raises on all of them."""
        if average is None:
            return
        for p, a in zip(self._qpr_params, average, strict=True):
            if not bool(torch.isfinite(a).all()):
                raise FloatingPointError(
                    f"hvd_qpr.DistributedOptimizer: the average of parameter "
                    f"{self._qpr_names[p]!r} started at round {self._qpr_round - 1} holds NaN or "
                    "Inf: some rank's model diverged. Lower the learning rate or clip gradients"
                )

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._qpr_pending:
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
        return self._qpr_aggregation

    @property
    def topology(self) -> Topology | None:
        """The gossip graph (its ``repr`` shows the spectral gap), or None."""
        return None if self._qpr_gossip is None else self._qpr_gossip.topology

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state plus this rank's schedule position, residuals and last
        averaged model, so a run resumed on every rank from its own state continues exactly."""
        state = super(self.__class__, self).state_dict()
        compressor = self._qpr_compressor
        overlap = self._qpr_overlap
        if overlap is not None and overlap.started:
            # an average in flight is finished now (its values do not depend on when), so the
            # saved state holds its result; call state_dict() on every rank
            overlap.collect(self._qpr_overlap_average)
        state[_STATE_KEY] = {
            "step": self._qpr_step,
            "round": self._qpr_round,
            "local_count": self._qpr_local_count,
            "anchor": None if self._qpr_anchor is None else [a.clone() for a in self._qpr_anchor],
            "residuals": compressor.state_dict() if isinstance(compressor, ErrorFeedback) else {},
            "gossip": None if self._qpr_gossip is None else self._qpr_gossip.state_dict(),
            "overlap": None if overlap is None else overlap.state_dict(),
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(_STATE_KEY, None)
        self._qpr_pending.clear()
        self._qpr_synchronized = False
        self._qpr_should_synchronize = True
        for p in self._qpr_delay:
            self._qpr_delay[p] = self._qpr_backward_passes
        super(self.__class__, self).load_state_dict(state_dict)
        if ours is None:
            return
        self._qpr_step = int(ours["step"])
        self._qpr_round = int(ours["round"])
        self._qpr_local_count = int(ours["local_count"])
        anchor = ours["anchor"]
        if anchor is not None:
            if [tuple(a.shape) for a in anchor] != [tuple(p.shape) for p in self._qpr_params]:
                raise ValueError("load_state_dict: the saved model's shapes differ from this one's")
            anchor = [
                a.detach().clone().to(p.device, p.dtype)
                for a, p in zip(anchor, self._qpr_params, strict=True)
            ]
        self._qpr_anchor = anchor
        if isinstance(self._qpr_compressor, ErrorFeedback):
            self._qpr_compressor.load_state_dict(ours["residuals"])
        for key, part in (("gossip", self._qpr_gossip), ("overlap", self._qpr_overlap)):
            saved = ours.get(key)
            if (saved is None) != (part is None):
                raise ValueError(
                    f"load_state_dict: the state was saved {'with' if saved else 'without'} "
                    f"{key} and this optimizer runs {'with' if part else 'without'} it"
                )
        if self._qpr_gossip is not None:
            self._qpr_gossip.load_state_dict(ours["gossip"], self._qpr_gossip_groups)
        if self._qpr_overlap is not None:
            self._qpr_overlap.load_state_dict(ours["overlap"], self._qpr_params)


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
    size = process_set.size() if process_set.included() else 1
    gossip_state, overlap_state = _paradigm(
        topology,
        consensus_step,
        gossip,
        overlap,
        pullback,
        anchor_momentum,
        aggregation,
        compressor,
        size,
        process_set.rank() if process_set.included() else 0,
        seed,
    )
    if overlap_state is not None and local_steps == 1:
        local_steps = 2  # tau
    schedule = SyncSchedule(
        local_steps, warmup_steps, mixes_models=gossip_state is not None or overlap
    )
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
    wrapped._qpr_setup(
        named_parameters,
        compressor,
        schedule,
        aggregation,
        backward_passes_per_step,
        op,
        gradient_predivide_factor,
        process_set,
        seed,
        named_buffers,
        bucket_bytes,
        min_compress_numel,
        link,
        gossip_state,
        overlap_state,
    )
    return wrapped


def _paradigm(
    topology: str | torch.Tensor | Topology | None,
    consensus_step: float | None,
    gossip: str,
    overlap: bool,
    pullback: float,
    anchor_momentum: float,
    aggregation: str,
    compressor: Compressor,
    size: int,
    rank: int,
    seed: int,
) -> tuple[GossipState | None, OverlapState | None]:
    """The gossip or Overlap-Local-SGD state the arguments ask for (neither: ring all-reduce)."""
    if not isinstance(overlap, bool):
        raise TypeError(f"overlap must be a bool, got {overlap!r}")
    if topology is None:
        if consensus_step is not None or gossip != "choco":
            raise ValueError("consensus_step and gossip apply only with a topology")
        if not overlap:
            if (pullback, anchor_momentum) != (0.6, 0.0):
                raise ValueError("pullback and anchor_momentum apply only with overlap=True")
            return None, None
        return None, OverlapState(pullback, anchor_momentum)
    if overlap:
        raise ValueError("choose gossip (topology=...) or overlap=True, not both")
    if aggregation != "auto":
        raise ValueError(
            f"aggregation={aggregation!r} does not apply to gossip, which exchanges with "
            "neighbours only; leave it at 'auto' with a topology"
        )
    if gossip not in GOSSIP_MODES:
        raise ValueError(f"gossip must be one of {list(GOSSIP_MODES)}, got {gossip!r}")
    graph = topology if isinstance(topology, Topology) else make_topology(topology, size)
    if graph.size != size:
        raise ValueError(f"the topology has {graph.size} workers, the process set {size}")
    if consensus_step is None:
        consensus_step = 1.0 if compressor.traits.sum_compatible else 0.5 * compressor.contraction()
    return GossipState(graph, rank, consensus_step, gossip, seed), None
