"""Compressors in Horovod's compress/decompress contract, with declared properties, a registry of
names and one error-feedback wrapper.

Example:
    >>> import hvd_qpr
    >>> hvd_qpr.Compression.from_name("qsgd", bits=4).traits.shared_scale
    True
"""

from __future__ import annotations

import torch

from hvd_qpr.compression.base import (
    Compressor,
    CompressorTraits,
    HorovodCompressorAdapter,
    Segments,
    as_compressor,
)
from hvd_qpr.compression.casts import CastCompressor, NoneCompressor
from hvd_qpr.compression.error_feedback import ErrorFeedback
from hvd_qpr.compression.opaque import OpaqueCompressor
from hvd_qpr.compression.qsgd import QSGDCompressor
from hvd_qpr.compression.registry import from_name, names, register
from hvd_qpr.compression.sign import EFSignCompressor, TernGradCompressor
from hvd_qpr.compression.sparse import (
    AdaptiveTopKCompressor,
    NormFractionPolicy,
    RandomKCompressor,
    SparseCompressor,
    TopKCompressor,
)

_NONE = NoneCompressor()
_FP16 = CastCompressor(torch.float16)
_BF16 = CastCompressor(torch.bfloat16)

register("none")(lambda: _NONE)
register("fp16")(lambda: _FP16)
register("bf16")(lambda: _BF16)
register("qsgd")(QSGDCompressor)
register("topk")(TopKCompressor)
register("adaptive_topk")(AdaptiveTopKCompressor)
register("randomk")(RandomKCompressor)
register("terngrad")(TernGradCompressor)
register("efsign")(EFSignCompressor)


class Compression:
    """The compressors, as Horovod's ``hvd.Compression`` offers its own.

    Attributes:
        none: no compression.
        fp16: float16 casts (Horovod's fp16).
        bf16: bfloat16 casts.

    Example:
        >>> opt = hvd_qpr.DistributedOptimizer(opt, compression=hvd_qpr.Compression.qsgd(bits=4))
    """

    none: Compressor = _NONE
    fp16: Compressor = _FP16
    bf16: Compressor = _BF16

    @staticmethod
    def qsgd(
        bits: int = 4, bucket_size: int = 512, norm: str = "max", elias: bool = False, seed: int = 0
    ) -> QSGDCompressor:
        """QSGD (Alistarh et al., NeurIPS 2017); see :class:`QSGDCompressor`."""
        return QSGDCompressor(bits, bucket_size, norm, elias, seed)

    @staticmethod
    def topk(ratio: float = 0.01, approximate: bool = False) -> TopKCompressor:
        """Top-k sparsification; see :class:`TopKCompressor`."""
        return TopKCompressor(ratio, approximate)

    @staticmethod
    def adaptive_topk(policy: object = None) -> AdaptiveTopKCompressor:
        """Top-k with k agreed every round from a policy; see :class:`AdaptiveTopKCompressor`."""
        return AdaptiveTopKCompressor(policy)

    @staticmethod
    def randomk(ratio: float = 0.01, seed: int = 0) -> RandomKCompressor:
        """Random-k sparsification, unbiased; see :class:`RandomKCompressor`."""
        return RandomKCompressor(ratio, seed)

    @staticmethod
    def terngrad(bucket_size: int = 512) -> TernGradCompressor:
        """TernGrad (Wen et al., NeurIPS 2017); see :class:`TernGradCompressor`."""
        return TernGradCompressor(bucket_size)

    @staticmethod
    def efsign(bucket_size: int = 512) -> EFSignCompressor:
        """EF-signSGD (Karimireddy et al., ICML 2019); use with error feedback."""
        return EFSignCompressor(bucket_size)

    from_name = staticmethod(from_name)
    names = staticmethod(names)


__all__ = [
    "AdaptiveTopKCompressor",
    "NormFractionPolicy",
    "CastCompressor",
    "Compression",
    "Compressor",
    "CompressorTraits",
    "EFSignCompressor",
    "ErrorFeedback",
    "HorovodCompressorAdapter",
    "NoneCompressor",
    "OpaqueCompressor",
    "QSGDCompressor",
    "RandomKCompressor",
    "SparseCompressor",
    "TernGradCompressor",
    "TopKCompressor",
    "Segments",
    "as_compressor",
    "from_name",
    "names",
    "register",
]
