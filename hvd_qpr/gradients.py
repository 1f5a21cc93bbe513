"""Gradient averaging before the wrapped optimizer's step: ``local_steps=1`` and the warm-up.

This is Horovod's meaning of a distributed optimizer (Sergeev & Del Balso, "Horovod: fast and
easy distributed deep learning in TensorFlow", 2018): a hook on every parameter launches the
all-reduce of its gradient as soon as ``backward_passes_per_step`` backward passes have
accumulated it, and :meth:`GradientAverager.synchronize` waits for all of them and writes the
averages into ``.grad``. Dense parameters travel one by one (Horovod fuses them); with a
compressor that is not sum-compatible, the fused buckets of the :class:`~hvd_qpr.layout.Layout`
travel through the aggregation mode instead, seeded by rank, step and bucket.

Example:
    >>> grads = GradientAverager(layout, comm, schedule, progress, "packed-sum", hvd.Average)
    >>> grads.register_hooks(lambda: None)
    >>> loss.backward()  # the dense all-reduces start here
    >>> collectives.run(grads.synchronize())
"""

from __future__ import annotations

from collections.abc import Callable

import horovod.torch as hvd
import torch

from hvd_qpr import collectives
from hvd_qpr.collectives import Comm, Pipeline
from hvd_qpr.compression import Compression
from hvd_qpr.layout import Layout, Part
from hvd_qpr.schedule import Progress, SyncSchedule
from hvd_qpr.seeds import derive_seed


class GradientAverager:
    """The gradient hooks, the all-reduces in flight and Horovod's synchronize bookkeeping.

    Args:
        layout: the model's parts.
        comm: the collectives.
        schedule: which steps average gradients, and whether compressed.
        progress: the optimizer's position (read for the step count).
        aggregation: the mode compressed buckets travel in.
        op: ``hvd.Average`` or ``hvd.Sum``.
        predivide: Horovod's ``gradient_predivide_factor``.
        seed: seeds the stochastic rounding with rank, step and bucket.
        backward_passes: backward passes accumulated before gradients are averaged.
    """

    def __init__(
        self,
        layout: Layout,
        comm: Comm,
        schedule: SyncSchedule,
        progress: Progress,
        aggregation: str,
        op: object = hvd.Average,
        predivide: float = 1.0,
        seed: int = 0,
        backward_passes: int = 1,
    ) -> None:
        self.layout, self.comm, self.schedule, self.progress = layout, comm, schedule, progress
        self.aggregation, self.op, self.predivide, self.seed = aggregation, op, predivide, seed
        self.backward_passes = backward_passes
        self.dense = {p: part for part in layout.dense for p in part.tensors}
        self.delay = {p: backward_passes for p in layout.params}
        self.pending: dict[torch.Tensor, Pipeline] = {}
        self.synchronized = False  # synchronize() ran since the last step
        self.should_synchronize = True  # False inside skip_synchronize()
        self._before_first: Callable[[], None] = lambda: None

    def register_hooks(self, before_first_collective: Callable[[], None]) -> None:
        """Hooks every trained parameter; before_first_collective runs before any is launched
        (the configuration check)."""
        self._before_first = before_first_collective
        if self.comm.included:
            for p in self.layout.params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def reset(self) -> None:
        """Forgets gradients in flight (after ``load_state_dict``)."""
        self.pending.clear()
        self.synchronized = False
        self.should_synchronize = True
        for p in self.delay:
            self.delay[p] = self.backward_passes

    def _compressed(self) -> bool:
        return self.schedule.compresses_gradients(self.progress.step)

    def _on_grad(self, p: torch.Tensor) -> None:
        self._before_first()
        if not self.schedule.averages_gradients(self.progress.step):
            return
        if p in self.pending and self.delay[p] <= 0:
            raise AssertionError(
                "Gradients were computed more than backward_passes_per_step times before call "
                "to step(). Increase backward_passes_per_step to accumulate gradients locally."
            )
        self.delay[p] -= 1
        if self.delay[p] == 0 and (not self._compressed() or p in self.dense):
            self.pending[p] = self._launch_dense(p)

    def _launch_dense(self, p: torch.Tensor) -> Pipeline:
        if p.grad is None:  # unused on this rank; another may have a gradient
            p.grad = torch.zeros_like(p)
        compressed = self._compressed()
        compressor = self.layout.dense_compressor if compressed else Compression.none
        average = self.op == hvd.Average
        name = self.layout.name(p)
        pipeline = collectives.allreduce_dense(
            p.grad,
            compressor,
            self.comm,
            f"hvd_qpr.grad.{name}",
            [(name, p.numel())],
            op=self.op,
            prescale_factor=1.0 / self.predivide if average else 1.0,
            postscale_factor=self.predivide if average else 1.0,
        )
        return collectives.launch(pipeline)  # now, overlapping the rest of the backward pass

    def _bucket_pipeline(self, part: Part) -> Pipeline:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in part.tensors]
        seed = derive_seed(self.seed, self.comm.rank, self.progress.step, part.index)
        return collectives.aggregate(
            self.aggregation,
            part.flatten(grads),
            part.compressor,
            self.comm,
            part.name,
            part.segments,
            seed,
            self.op == hvd.Average,
        )

    def synchronize(self) -> Pipeline:
        """Waits for the gradients' averages and writes them into ``.grad``; nothing on steps
        that only take a local step."""
        if not self.comm.included or not self.schedule.averages_gradients(self.progress.step):
            self.synchronized = True
            return
        compressed = self._compressed()
        for p in self.layout.params:
            if p not in self.pending and (not compressed or p in self.dense):
                self.pending[p] = self._launch_dense(p)
        buckets = self.layout.buckets if compressed else []
        # each average with where it goes: a bucket's into its parameters' .grad, a dense one
        # becomes its parameter's .grad
        jobs: list[tuple[Part | torch.Tensor, Pipeline]] = [
            (part, self._bucket_pipeline(part)) for part in buckets
        ]
        jobs += list(self.pending.items())
        results = yield from collectives.gather(pipeline for _, pipeline in jobs)
        for (target, _), avg in zip(jobs, results, strict=True):
            if isinstance(target, Part):
                for p, value in zip(target.tensors, target.split(avg), strict=True):
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    p.grad.copy_(value)
            else:
                target.grad.set_(avg)
        for p in self.delay:
            self.delay[p] = self.backward_passes
        self.pending.clear()
        self.synchronized = True
