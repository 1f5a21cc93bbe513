"""Sum-compatible compressors: no compression and casts to 16-bit floats (as Horovod's fp16)."""

from __future__ import annotations

import torch

from hvd_qpr.compression.base import Compressor, CompressorTraits, decode_cast, encode_cast


class NoneCompressor(Compressor):
    """Sends tensors as they are (Horovod's default).

    Example:
        >>> NoneCompressor().compress(torch.ones(2))[0]
        tensor([1., 1.])
    """

    name = "none"
    traits = CompressorTraits(sum_compatible=True)

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        return tensor, None

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        return tensor

    def payload_bytes(self, numel: int) -> float:
        return 4.0 * numel

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return encode_cast(x, torch.float32)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return decode_cast(payload, numel, torch.float32, self.name)


class CastCompressor(Compressor):
    """Casts floating-point tensors to a 16-bit float type for the all-reduce and back after
    (Horovod's fp16 compression; bf16 keeps float32's range at the same size). Other dtypes
    pass through.

    Example:
        >>> c = CastCompressor(torch.bfloat16)
        >>> payload, ctx = c.compress(torch.randn(3))
        >>> payload.dtype, c.decompress(payload, ctx).dtype
        (torch.bfloat16, torch.float32)
    """

    traits = CompressorTraits(sum_compatible=True)

    def __init__(self, dtype: torch.dtype) -> None:
        if dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"CastCompressor: dtype must be float16 or bfloat16, got {dtype}")
        self.dtype = dtype
        self.name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]

    def compress(self, tensor: torch.Tensor) -> tuple[torch.Tensor, object]:
        if not tensor.dtype.is_floating_point:
            return tensor, tensor.dtype
        return tensor.to(self.dtype), tensor.dtype

    def decompress(self, tensor: torch.Tensor, ctx: object) -> torch.Tensor:
        assert isinstance(ctx, torch.dtype)
        return tensor.to(ctx) if ctx.is_floating_point else tensor

    def payload_bytes(self, numel: int) -> float:
        return 2.0 * numel

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        return encode_cast(x, self.dtype)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        return decode_cast(payload, numel, self.dtype, self.name)
