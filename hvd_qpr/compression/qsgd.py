"""The QSGD compressor (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017): stochastic quantization to ``2s+1`` levels per bucket,
bit-packed, optionally Elias-coded, through the native kernels in :mod:`hvd_qpr.ops`."""

from __future__ import annotations

import math

import torch

from hvd_qpr import ops
from hvd_qpr.compression.base import CompressorTraits
from hvd_qpr.compression.opaque import OpaqueCompressor


class QSGDCompressor(OpaqueCompressor):
    """QSGD quantization as a Horovod compressor.

    Through Horovod's contract, ``compress`` returns an opaque uint8 payload (per-bucket float32
    scales followed by the packed levels, or a self-describing Elias stream) and ``decompress``
    turns it back into an unbiased estimate of the input. The payload is not sum-compatible:
    ``compress`` called by Horovod (``hvd.DistributedOptimizer``, ``hvd.allreduce``), which would
    sum it, raises a ValueError pointing to :func:`hvd_qpr.DistributedOptimizer`, and so does
    ``decompress`` if a payload was changed in between. Non-float tensors pass through.

    Args:
        bits: 2..8 bits a level (levels ``-s..s``, ``s = 2**(bits-1) - 1``).
        bucket_size: values sharing one scale.
        norm: ``"max"`` or ``"l2"`` (the paper's).
        elias: Elias-code the levels (variable-length payload, smaller for sparse levels).
        seed: seed of the rounding when used through ``compress``; calls draw fresh noise.

    Example:
        >>> c = QSGDCompressor(bits=4)
        >>> payload, ctx = c.compress(torch.randn(1000))
        >>> payload.dtype, c.decompress(payload, ctx).shape
        (torch.uint8, torch.Size([1000]))
    """

    def __init__(
        self,
        bits: int = 4,
        bucket_size: int = 512,
        norm: str = "max",
        elias: bool = False,
        seed: int = 0,
    ) -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"qsgd: bits must be an int in 2..8, got {bits!r}")
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"qsgd: bucket_size must be a positive int, got {bucket_size!r}")
        ops.norm_code(norm, "qsgd")
        self.bits, self.bucket_size, self.norm, self.elias = bits, bucket_size, norm, bool(elias)
        self.seed = ops.seed_to_int64(seed, "qsgd") % 2**64
        self.levels_max = 2 ** (bits - 1) - 1
        self.traits = CompressorTraits(
            sum_compatible=False, variable_length=self.elias, shared_scale=True
        )
        self.name = (
            f"qsgd(bits={bits}, bucket_size={bucket_size}, norm={norm!r}, elias={self.elias})"
        )
        self._calls = 0

    # -- opaque payloads ---------------------------------------------------------------------------

    def _scale_bytes(self, numel: int) -> int:
        return 4 * -(-numel // self.bucket_size)

    def contraction(self) -> float:
        """1 / (1 + ω), ω the relative variance: (max/s)²/4 a value against a bucket of
        Gaussian values whose max is about 3.5σ for the max norm, min(d/s², √d/s) for l2."""
        s = self.levels_max
        if self.norm == "max":
            omega = 3.5**2 / (4 * s * s)
        else:
            d = self.bucket_size
            omega = min(d / s**2, math.sqrt(d) / s)
        return 1.0 / (1.0 + omega)

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        q = ops.quantize(x, self.bits, self.bucket_size, self.norm, seed)
        if self.elias:
            return ops.elias_encode(q)
        return torch.cat([q.scales.view(torch.uint8), q.packed])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        if self.elias:
            q = ops.elias_decode(payload)
            if (q.numel, q.bits, q.bucket_size) != (numel, self.bits, self.bucket_size):
                raise ValueError(
                    f"qsgd: the Elias stream holds {q.numel} values of {q.bits} bits in buckets "
                    f"of {q.bucket_size}; expected {numel} values of {self.bits} bits in buckets "
                    f"of {self.bucket_size}"
                )
            return ops.dequantize(q, torch.float32).reshape(-1)
        head = self._scale_bytes(numel)
        expected = head + (numel * self.bits + 7) // 8
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise ValueError(
                f"qsgd: a payload of {numel} values must be a 1-D uint8 tensor of {expected} "
                f"bytes, got {payload.dtype} of shape {tuple(payload.shape)}"
            )
        scales = payload[:head].clone().view(torch.float32)  # clone: the slice may be unaligned
        q = ops.QuantizedTensor(
            payload[head:],
            scales,
            numel,
            torch.Size([numel]),
            torch.float32,
            self.bits,
            self.bucket_size,
            self.norm,
        )
        return ops.dequantize(q, torch.float32)

    def payload_bytes(self, numel: int) -> float:
        # Elias streams are usually smaller; the packed size bounds them for the cost model.
        return self._scale_bytes(numel) + numel * self.bits / 8

    # -- shared scales (packed-sum) ----------------------------------------------------------------

    def bucket_scales(self, x: torch.Tensor) -> torch.Tensor:
        """This worker's scale of each bucket (float32): its largest magnitude, or its l2 norm,
        as the quantizer computes them (so each is at least every |value| in its bucket)."""
        return ops.quantize(x, self.bits, self.bucket_size, self.norm, 0).scales

    def quantize_fields(self, x: torch.Tensor, scales: torch.Tensor, seed: int) -> torch.Tensor:
        """Fields ``level + s`` (uint8, in 0..2s) of x quantized against agreed scales."""
        q = ops.quantize(x, self.bits, self.bucket_size, self.norm, seed, scales=scales)
        return ops.unpack_bits(q.packed, self.bits, x.numel(), torch.uint8)

    def dequantize_field_sum(
        self, field_sum: torch.Tensor, count: int, scales: torch.Tensor
    ) -> torch.Tensor:
        """Sum over count workers of their dequantized values, from the sum of their fields."""
        step = scales / self.levels_max  # one float32 division per bucket, as the kernels
        per_value = step.repeat_interleave(self.bucket_size)[: field_sum.numel()]
        # exact: sums of fields stay far below 2**24
        return (field_sum.to(torch.float32) - count * self.levels_max) * per_value
