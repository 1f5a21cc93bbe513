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
from hvd_qpr.compression.qsgd import QSGDCompressor
from hvd_qpr.compression.registry import from_name, names, register

_NONE = NoneCompressor()
_FP16 = CastCompressor(torch.float16)
_BF16 = CastCompressor(torch.bfloat16)

register("none")(lambda: _NONE)
register("fp16")(lambda: _FP16)
register("bf16")(lambda: _BF16)
register("qsgd")(QSGDCompressor)


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

    from_name = staticmethod(from_name)
    names = staticmethod(names)


__all__ = [
    "CastCompressor",
    "Compression",
    "Compressor",
    "CompressorTraits",
    "ErrorFeedback",
    "HorovodCompressorAdapter",
    "NoneCompressor",
    "QSGDCompressor",
    "Segments",
    "as_compressor",
    "from_name",
    "names",
    "register",
]
