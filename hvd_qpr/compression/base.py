"""The compressor interface: Horovod's compress/decompress contract plus declared properties.

A compressor says what its payload allows through :class:`CompressorTraits`; the optimizer and the
collectives pick an aggregation from these traits alone, never from the compressor's type.

Methods beyond Horovod's contract, used by :mod:`hvd_qpr.collectives` (each trait promises some):

* every compressor: ``add_residual`` / ``store_residual`` (no-ops here; :class:`ErrorFeedback`
  overrides them), ``payload_bytes`` (an estimate for the cost model).
* not ``sum_compatible``: ``encode(x, seed) -> uint8 payload`` and ``decode(payload, numel)``.
* ``shared_scale``: ``bucket_scales``, ``quantize_fields`` (integer fields ``0..2*levels_max``
  against scales agreed by all workers) and ``dequantize_field_sum``, so integer fields of all
  workers can be summed by an ordinary all-reduce (DESIGN.md 2.3, packed-sum).
"""

from __future__ import annotations

import dataclasses

import torch
from horovod.torch.compression import Compressor as HorovodCompressor

Segments = list[tuple[str, int]]
"""Which parameter owns which stretch of a fused flat buffer: (name, numel) in order."""


@dataclasses.dataclass(frozen=True)
class CompressorTraits:
    """What a compressor's payload allows.

    Attributes:
        sum_compatible: payloads of several workers can be summed elementwise by an all-reduce
            and decompressed afterwards (casts like fp16). When False, the payload is opaque bytes.
        variable_length: the payload's size depends on the data (Elias codes), so collectives
            must carry lengths.
        shared_scale: the compressor can quantize against per-bucket scales agreed across
            workers, which makes integer levels summable (packed-sum aggregation).
        sparse: the payload is (indices, values) of a few entries (Top-k, Random-k).
        needs_error_feedback: biased on its own (sign compression); the optimizer warns when
            it runs without :class:`ErrorFeedback`.
        adaptive: the payload size (k) is agreed by all ranks every round: the aggregation
            all-reduces ``propose_k`` (max) and calls ``agree_k`` before encoding.
    """

    sum_compatible: bool
    variable_length: bool = False
    shared_scale: bool = False
    sparse: bool = False
    needs_error_feedback: bool = False
    adaptive: bool = False


class Compressor(HorovodCompressor):
    """Base class of hvd_qpr's compressors (a Horovod ``Compressor``).

    Subclasses set ``traits`` and ``name`` and implement the methods their traits promise.

    Example:
        >>> c = hvd_qpr.Compression.fp16
        >>> payload, ctx = c.compress(torch.randn(10))
        >>> c.decompress(payload, ctx).dtype
        torch.float32
    """

    traits: CompressorTraits = CompressorTraits(sum_compatible=True)
    name: str = "compressor"

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        raise NotImplementedError

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        raise NotImplementedError

    # -- error feedback hooks (identity unless wrapped by ErrorFeedback) --------------------------

    def add_residual(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """x plus what earlier rounds failed to send for these parameters."""
        return x

    def store_residual(
        self, corrected: torch.Tensor, sent: torch.Tensor, segments: Segments
    ) -> None:
        """Remembers corrected - sent, where sent is what this worker's payload decodes to."""

    @property
    def without_residuals(self) -> Compressor:
        """The compressor that compresses once the residual was added (itself, unless wrapped
        by :class:`ErrorFeedback`)."""
        return self

    @property
    def needs_residual(self) -> bool:
        """Whether store_residual wants the decoded local payload (saves a decode when not)."""
        return False

    # -- opaque payloads ---------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        """A flat tensor as a 1-D uint8 payload; seed drives any stochastic rounding."""
        raise NotImplementedError(f"{self.name} has no opaque payload encoding")

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        """A payload back to a flat float32 tensor of numel values."""
        raise NotImplementedError(f"{self.name} has no opaque payload encoding")

    def payload_bytes(self, numel: int) -> float:
        """Expected payload size for numel float32 values (the cost model's estimate)."""
        return 4.0 * numel

    def contraction(self) -> float:
        """δ in (0, 1], an estimate of how much of a vector e survives compression, scaled by
        the least-squares step: E‖e − ηC(e)‖² ≈ (1 − δ)‖e‖² for Gaussian-like e (Koloskova et
        al., ICML 2019, call δ the compression quality). Gossip takes its default consensus
        step from it. 1 for lossless payloads."""
        return 1.0

    def __repr__(self) -> str:
        return self.name


def encode_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A flat tensor cast to dtype, as bytes (the opaque payload of a sum-compatible cast)."""
    return x.reshape(-1).to(dtype).contiguous().view(torch.uint8)


def decode_cast(payload: torch.Tensor, numel: int, dtype: torch.dtype, name: str) -> torch.Tensor:
    """Inverse of :func:`encode_cast`, to float32; ValueError when the size does not match."""
    expected = numel * torch.empty(0, dtype=dtype).element_size()
    if payload.dtype != torch.uint8 or payload.numel() != expected:
        raise ValueError(
            f"{name}: a payload of {payload.numel()} {payload.dtype} values cannot hold {numel} "
            f"{dtype} values ({expected} bytes)"
        )
    return payload.clone().view(dtype).to(torch.float32)


class HorovodCompressorAdapter(Compressor):
    """Horovod's own compressors (``hvd.Compression.none``, ``hvd.Compression.fp16``): their
    payloads are meant to be all-reduced, so they are sum-compatible.

    Example:
        >>> c = HorovodCompressorAdapter(hvd.Compression.fp16)
        >>> c.traits.sum_compatible
        True
    """

    def __init__(self, inner: type[HorovodCompressor] | HorovodCompressor) -> None:
        self.inner = inner
        self.name = f"horovod:{getattr(inner, '__name__', type(inner).__name__)}"
        self.traits = CompressorTraits(sum_compatible=True)
        self._wire_dtype = inner.compress(torch.zeros(1))[0].dtype

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        return self.inner.compress(tensor)

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        return self.inner.decompress(tensor, ctx)

    def payload_bytes(self, numel: int) -> float:
        return float(torch.empty(0, dtype=self._wire_dtype).element_size() * numel)

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return encode_cast(x, self._wire_dtype)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return decode_cast(payload, numel, self._wire_dtype, self.name)


def as_compressor(obj: object) -> Compressor:
    """Accepts an hvd_qpr compressor or one of Horovod's (class or instance).

    Raises:
        TypeError: obj is neither.
    """
    if isinstance(obj, Compressor):
        return obj
    if isinstance(obj, HorovodCompressor) or (
        isinstance(obj, type) and issubclass(obj, HorovodCompressor)
    ):
        return HorovodCompressorAdapter(obj)
    raise TypeError(
        "compression must be an hvd_qpr compressor (hvd_qpr.Compression.none, .fp16, .bf16, "
        f".qsgd(...)) or one of Horovod's (hvd.Compression.none, .fp16), got {obj!r}"
    )
