"""Low-bit compressors: EF-signSGD (Karimireddy et al., "Error Feedback Fixes SignSGD and other
Gradient Compression Schemes", ICML 2019) and TernGrad (Wen et al., "TernGrad: Ternary Gradients
to Reduce Communication in Distributed Deep Learning", NeurIPS 2017)."""

from __future__ import annotations

import torch

from hvd_qpr import ops
from hvd_qpr.compression.base import CompressorTraits
from hvd_qpr.compression.opaque import OpaqueCompressor
from hvd_qpr.compression.qsgd import QSGDCompressor


class EFSignCompressor(OpaqueCompressor):
    """One bit a value (the sign, packed with ``ops.pack_bits``) and one float32 scale a bucket,
    the mean absolute value: ``x ~ mean|x| * sign(x)`` (zero counts as positive). Biased: meant
    for :class:`hvd_qpr.ErrorFeedback`; the optimizer warns when it runs without.

    Args:
        bucket_size: values sharing one scale.

    Example:
        >>> c = EFSignCompressor(bucket_size=4)
        >>> c.decode(c.encode(torch.tensor([1.0, -3.0, 2.0, -2.0]), 0), 4)
        tensor([ 2., -2.,  2., -2.])
    """

    traits = CompressorTraits(sum_compatible=False, needs_error_feedback=True)

    def __init__(self, bucket_size: int = 512) -> None:
        if isinstance(bucket_size, bool) or not isinstance(bucket_size, int) or bucket_size < 1:
            raise ValueError(f"efsign: bucket_size must be a positive int, got {bucket_size!r}")
        self.bucket_size = bucket_size
        self.name = f"efsign(bucket_size={bucket_size})"
        self._calls = 0

    def contraction(self) -> float:
        """Measured, not derived: on a ring of 4 the spread of the models stalls with a gossip
        step above about 0.05 (a scaled sign keeps ~2/π of a Gaussian's energy, but its error
        is correlated with the signal round after round)."""
        return 0.1

    def _buckets(self, numel: int) -> int:
        return -(-numel // self.bucket_size)

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        flat = x.reshape(-1).to(torch.float32)
        n, nb = flat.numel(), self._buckets(flat.numel())
        padded = torch.cat([flat.abs(), flat.new_zeros(nb * self.bucket_size - n)])
        counts = torch.full((nb,), float(self.bucket_size), device=flat.device)
        if nb:
            counts[-1] = n - (nb - 1) * self.bucket_size
        scales = padded.view(nb, self.bucket_size).sum(1) / counts
        signs = ops.pack_bits((flat >= 0).to(torch.uint8), 1)
        return torch.cat([scales.view(torch.uint8), signs])

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        nb = self._buckets(numel)
        expected = 4 * nb + (numel + 7) // 8
        if payload.dtype != torch.uint8 or payload.dim() != 1 or payload.numel() != expected:
            raise ValueError(
                f"efsign: a payload of {numel} values must be a 1-D uint8 tensor of {expected} "
                f"bytes, got {payload.dtype} of shape {tuple(payload.shape)}"
            )
        scales = payload[: 4 * nb].clone().view(torch.float32)
        bits = ops.unpack_bits(payload[4 * nb :], 1, numel, torch.uint8)
        per_value = scales.repeat_interleave(self.bucket_size)[:numel]
        return torch.where(bits.bool(), per_value, -per_value)

    def payload_bytes(self, numel: int) -> float:
        return 4 * self._buckets(numel) + (numel + 7) // 8


class TernGradCompressor(QSGDCompressor):
    """TernGrad: per-bucket scale max|g|, values in {-1, 0, 1} drawn unbiasedly, 2 bits a value.
    This is exactly 2-bit QSGD with the max norm (s = 1), so it reuses the QSGD kernels.

    Example:
        >>> TernGradCompressor().levels_max
        1
    """

    def __init__(self, bucket_size: int = 512, seed: int = 0) -> None:
        super().__init__(bits=2, bucket_size=bucket_size, norm="max", seed=seed)
        self.name = f"terngrad(bucket_size={bucket_size})"
