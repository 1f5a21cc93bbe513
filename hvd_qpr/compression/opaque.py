"""Horovod's compress/decompress contract for compressors whose payload is opaque bytes (QSGD,
Top-k, Random-k, EF-sign): a round trip that works, and a clear error where Horovod would sum it.
"""

from __future__ import annotations

import dataclasses
import sys

import torch

from hvd_qpr.compression.base import Compressor
from hvd_qpr.seeds import derive_seed

_SUMMED_BY_HOROVOD = (
    "{name} produces an opaque payload that Horovod's allreduce cannot sum (it would send wrong "
    "sums); hvd.DistributedOptimizer and hvd.allreduce only work with sum-compatible "
    "compressors. Use hvd_qpr.DistributedOptimizer(optimizer, compression=...), which aggregates "
    "such payloads with packed-sum, scatter-gather or allgather"
)
_PAYLOAD_MODIFIED = (
    "the {name} payload changed between compress() and decompress(): a collective summed or "
    "averaged its bytes (for example hvd.DistributedOptimizer or hvd.allreduce). Such payloads "
    "cannot be summed that way; use hvd_qpr.DistributedOptimizer(compression=...), which "
    "aggregates them with packed-sum, scatter-gather or allgather"
)


@dataclasses.dataclass(frozen=True)
class _Context:
    shape: torch.Size
    dtype: torch.dtype
    sent: torch.Tensor | None  # the payload as compress() returned it; None: passed through


class OpaqueCompressor(Compressor):
    """Base of compressors with ``encode`` / ``decode`` byte payloads.

    ``compress`` encodes float32/16/bf16 tensors (others pass through) with a fresh seed per call
    derived from ``self.seed``; called by Horovod (``hvd.DistributedOptimizer``,
    ``hvd.allreduce``), which would sum the bytes, it raises a ValueError pointing to
    :func:`hvd_qpr.DistributedOptimizer`, and ``decompress`` raises if the payload changed.

    Example:
        >>> c = hvd_qpr.Compression.qsgd(bits=4)
        >>> payload, ctx = c.compress(torch.randn(100))
        >>> c.decompress(payload, ctx).shape
        torch.Size([100])
    """

    seed: int = 0
    _calls: int = 0

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        # Horovod calls compress() only to all-reduce the result, which would be wrong here.
        if sys._getframe(1).f_globals.get("__name__", "").startswith("horovod."):
            raise ValueError(_SUMMED_BY_HOROVOD.format(name=self.name))
        if not tensor.dtype.is_floating_point or tensor.dtype == torch.float64:
            return tensor, _Context(tensor.shape, tensor.dtype, None)
        payload = self.encode(tensor.reshape(-1), derive_seed(self.seed, self._calls))
        self._calls += 1
        return payload, _Context(tensor.shape, tensor.dtype, payload.clone())

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        if not isinstance(ctx, _Context):
            raise TypeError(
                f"{self.name}: decompress needs the context compress() returned, got {ctx!r}"
            )
        if ctx.sent is None:
            return tensor
        if tensor.shape != ctx.sent.shape or not torch.equal(tensor, ctx.sent):
            raise ValueError(_PAYLOAD_MODIFIED.format(name=self.name))
        return self.decode(tensor, ctx.shape.numel()).view(ctx.shape).to(ctx.dtype)
