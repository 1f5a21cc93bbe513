"""Pure-PyTorch definitions of every native op: the oracle the kernels are tested against.

Written for clarity, not speed (the Elias coder is plain Python). Every function here computes
bit for bit what its twin in ``hvd_qpr.ops`` computes, with the same arguments; it is never used
as a fallback for the native code.

Example:
    >>> import torch, hvd_qpr.ops as ops, hvd_qpr.reference as ref
    >>> x = torch.randn(1000)
    >>> ops.quantize(x, bits=3, seed=5) == ref.quantize(x, bits=3, seed=5)
    True
"""

from __future__ import annotations

import math
import struct

import torch

from hvd_qpr.ops import _DTYPE_CODES, _DTYPES, _NORM_NAMES, NORMS, QuantizedTensor
from hvd_qpr.seeds import MASK64, splitmix64  # the seed expansion is library code, not oracle

MASK32 = 0xFFFFFFFF
ELIAS_MAGIC = b"QPRE"
ELIAS_VERSION = 1
ELIAS_HEADER = struct.Struct("<4sBBBBB3sIQQ")  # magic, version, bits, norm, dtype, ndim, reserved,
#                                               bucket_size, numel, code_bits: 32 bytes
ELIAS_MAX_DIMS = 16

# ---- counter-based generator (csrc/include/qpr/rng.h) ------------------------------------------


def rng_key(seed: int) -> tuple[int, int]:
    """The two 32-bit keys a seed expands to."""
    z = splitmix64(seed & MASK64)
    return z & MASK32, z >> 32


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def _mix(x: torch.Tensor, c1: int, c2: int) -> torch.Tensor:
    """x ^= x >> 16; x *= c1; x ^= x >> 15; x *= c2 (mod 2**32): the core of both hashes."""
    x = x ^ (x >> 16)
    x = _mul32(x, c1)
    x = x ^ (x >> 15)
    return _mul32(x, c2)


def rng_u32(seed: int, index: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit draws (as int64) for flat element indices (int64 tensor)."""
    k0, k1 = rng_key(seed)
    stream = _mix((index >> 32) ^ k1, 0x21F0AAAD, 0xD35A2D97)
    stream = stream ^ (stream >> 15) ^ k0
    x = _mix((index & MASK32) ^ stream, 0x7FEB352D, 0x846CA68B)
    return x ^ (x >> 16)


def rng_unit_float(h: torch.Tensor) -> torch.Tensor:
    """The top 24 bits of a draw as an exact float32 in [0, 1)."""
    return (h >> 8).to(torch.float32) * 2.0**-24


# ---- bit packing --------------------------------------------------------------------------------


def pack_bits(values: torch.Tensor, field_bits: int) -> torch.Tensor:
    """Reference of :func:`hvd_qpr.ops.pack_bits`: fields LSB-first in a byte stream."""
    if not 1 <= field_bits <= 16:
        raise ValueError(f"pack_bits: field_bits must be in 1..16, got {field_bits}")
    v = values.reshape(-1).to(torch.int64)
    if v.numel() and (v.min() < 0 or v.max() >= 2**field_bits):
        raise ValueError(f"pack_bits: values must be in [0, 2**{field_bits})")
    bits = (v[:, None] >> torch.arange(field_bits)) & 1  # row i: field i, least significant first
    stream = bits.reshape(-1)
    stream = torch.cat([stream, stream.new_zeros(-stream.numel() % 8)])
    return (stream.view(-1, 8) << torch.arange(8)).sum(dim=1).to(torch.uint8)


def unpack_bits(
    packed: torch.Tensor, field_bits: int, numel: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Reference of :func:`hvd_qpr.ops.unpack_bits`."""
    if packed.numel() < (numel * field_bits + 7) // 8:
        raise ValueError("unpack_bits: packed is too short")
    stream = ((packed.to(torch.int64)[:, None] >> torch.arange(8)) & 1).reshape(-1)
    bits = stream[: numel * field_bits].view(numel, field_bits)
    return (bits << torch.arange(field_bits)).sum(dim=1).to(dtype)


# ---- QSGD ----------------------------------------------------------------------------------------


def _check_finite(x: torch.Tensor) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        v = float(x[i])
        kind = "NaN" if math.isnan(v) else ("+Inf" if v > 0 else "-Inf")
        raise ValueError(f"quantize: x contains {kind} (first at flat index {i})")


def l2_scales(buckets: torch.Tensor) -> torch.Tensor:
    """l2 norm of each row of a (buckets, d) float32 tensor, summed in the kernels' fixed order:
    32 float64 lanes (lane j takes elements j, j + 32, ...), folded at distances 16, 8, 4, 2, 1."""
    nb, d = buckets.shape
    sq = buckets.to(torch.float64).square()  # exact for float32 inputs
    sq = torch.cat([sq, sq.new_zeros(nb, -d % 32)], dim=1).view(nb, -1, 32)
    lanes = torch.zeros(nb, 32, dtype=torch.float64)
    for row in range(sq.shape[1]):  # sequential, as each lane accumulates
        lanes = lanes + sq[:, row, :]
    for h in (16, 8, 4, 2, 1):
        lanes = torch.cat([lanes[:, :h] + lanes[:, h : 2 * h], lanes[:, h:]], dim=1)
    return lanes[:, 0].sqrt().to(torch.float32)


def quantize(
    x: torch.Tensor,
    bits: int = 4,
    bucket_size: int = 512,
    norm: str = "max",
    seed: int = 0,
    scales: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Reference of :func:`hvd_qpr.ops.quantize` (QSGD, Alistarh et al., NeurIPS 2017)."""
    if x.dtype not in _DTYPE_CODES:
        raise TypeError(f"quantize: x must be float32, float16 or bfloat16, got {x.dtype}")
    if not 2 <= bits <= 8:
        raise ValueError(f"quantize: bits must be in 2..8, got {bits}")
    if bucket_size < 1:
        raise ValueError(f"quantize: bucket_size must be >= 1, got {bucket_size}")
    if norm not in NORMS:
        raise ValueError(f"quantize: norm must be one of {sorted(NORMS)}, got {norm!r}")
    s = 2 ** (bits - 1) - 1
    flat = x.detach().reshape(-1).to(torch.float32)  # exact for all three dtypes
    _check_finite(flat)
    n = flat.numel()
    nb = -(-n // bucket_size)
    buckets = torch.cat([flat, flat.new_zeros(nb * bucket_size - n)]).view(nb, bucket_size)
    if scales is not None:
        if not (torch.isfinite(scales).all() and (scales >= 0).all()):
            raise ValueError("quantize: given scales must be finite and non-negative")
        peak = buckets.abs().amax(dim=1) if n else flat.new_zeros(0)
        if (peak > scales).any():
            b = int((peak > scales).nonzero()[0, 0])
            raise ValueError(
                f"quantize: bucket {b} holds a value of magnitude above its given scale"
            )
    elif norm == "max":
        scales = buckets.abs().amax(dim=1) if n else flat.new_zeros(0)
    else:
        scales = l2_scales(buckets)
    if not torch.isfinite(scales).all():
        raise ValueError("quantize: the l2 norm of a bucket overflows float32; use norm='max'")
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))[:, None]
    t = torch.clamp_max((buckets.abs() / divisor) * s, s)
    low = torch.floor(t)
    u = rng_unit_float(rng_u32(seed, torch.arange(nb * bucket_size).view(nb, bucket_size)))
    level = low.to(torch.int64) + (u < t - low).to(torch.int64)
    level = torch.where(buckets < 0, -level, level)
    fields = (level + s).reshape(-1)[:n]
    return QuantizedTensor(
        pack_bits(fields, bits), scales, n, x.shape, x.dtype, bits, bucket_size, norm
    )


def levels(q: QuantizedTensor) -> torch.Tensor:
    """The signed integer levels of q, flat (int64)."""
    return unpack_bits(q.packed, q.bits, q.numel, torch.int64) - q.levels_max


def dequantize(q: QuantizedTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Reference of :func:`hvd_qpr.ops.dequantize`: level * (scale / s) in float32."""
    lv = levels(q)
    if (lv > q.levels_max).any():
        raise ValueError("dequantize: packed holds a field no level encodes")
    step = q.scales / q.levels_max  # one float32 division per bucket
    per_value = step.repeat_interleave(q.bucket_size)[: q.numel]
    out = (lv.to(torch.float32) * per_value).to(dtype or q.dtype)
    if torch.isinf(out).any():
        raise ValueError("dequantize: a dequantized value overflows the output dtype")
    return out.view(q.shape)


# ---- Elias coding (layout: csrc/include/qpr/elias.h) ---------------------------------------------


def gamma_code(v: int) -> list[int]:
    """Elias gamma code of v >= 1, LSB-first: L zeros, a one, the low L bits of v."""
    n = v.bit_length() - 1
    return [0] * n + [1] + [(v >> k) & 1 for k in range(n)]


def elias_code_bits(q: QuantizedTensor) -> list[list[int]]:
    """The code bits of each bucket of q."""
    lv = levels(q).tolist()
    buckets = []
    for start in range(0, q.numel, q.bucket_size):
        bits: list[int] = []
        prev = -1
        for i, level in enumerate(lv[start : start + q.bucket_size]):
            if level:
                bits += gamma_code(i - prev) + [int(level < 0)] + gamma_code(abs(level))
                prev = i
        buckets.append(bits)
    return buckets


def elias_encode(q: QuantizedTensor) -> torch.Tensor:
    """Reference of :func:`hvd_qpr.ops.elias_encode`."""
    codes = elias_code_bits(q)
    offsets, total = [], 0
    for bits in codes:
        offsets.append(total)
        total += len(bits)
    header = ELIAS_HEADER.pack(
        ELIAS_MAGIC,
        ELIAS_VERSION,
        q.bits,
        NORMS[q.norm],
        _DTYPE_CODES[q.dtype],
        len(q.shape),
        b"\0\0\0",
        q.bucket_size,
        q.numel,
        total,
    )
    flat_bits = torch.tensor([b for bits in codes for b in bits], dtype=torch.int64)
    body = (
        struct.pack(f"<{len(q.shape)}q", *q.shape)
        + struct.pack(f"<{len(codes)}f", *q.scales.tolist())
        + struct.pack(f"<{len(codes)}I", *offsets)
        + bytes(pack_bits(flat_bits, 1).tolist())
    )
    return torch.tensor(list(header + body), dtype=torch.uint8)


def _malformed(why: str) -> ValueError:
    return ValueError(f"elias_decode: malformed stream: {why}")


def _read_gamma(bits: list[int], p: int, end: int, max_value: int) -> tuple[int, int]:
    n = 0
    while p + n < end and bits[p + n] == 0:
        n += 1
    if p + 2 * n + 1 > end or (1 << n) > max_value:
        raise _malformed("bad gamma code")
    v = (1 << n) | sum(bits[p + n + 1 + k] << k for k in range(n))
    return v, p + 2 * n + 1


def elias_decode(stream: torch.Tensor) -> QuantizedTensor:
    """Reference of :func:`hvd_qpr.ops.elias_decode`; ValueError on any malformed stream."""
    data = bytes(stream.tolist())
    if len(data) < ELIAS_HEADER.size:
        raise _malformed("truncated header")
    magic, version, bits, norm, dtype, ndim, reserved, d, n, code_bits = ELIAS_HEADER.unpack_from(
        data
    )
    if magic != ELIAS_MAGIC or version != ELIAS_VERSION or reserved != b"\0\0\0":
        raise _malformed("wrong magic, version or reserved bytes")
    if not 2 <= bits <= 8 or norm not in _NORM_NAMES or dtype not in _DTYPES:
        raise _malformed("bad bits, norm or dtype")
    if ndim > ELIAS_MAX_DIMS or not 1 <= d < 2**31 or code_bits >= 2**32:
        raise _malformed("bad ndim, bucket_size or code length")
    at = ELIAS_HEADER.size
    if len(data) < at + 8 * ndim:
        raise _malformed("truncated shape")
    shape = struct.unpack_from(f"<{ndim}q", data, at)
    if any(s < 0 for s in shape) or math.prod(shape) != n:
        raise _malformed("shape does not match numel")
    nb = -(-n // d)
    at += 8 * ndim
    if len(data) != at + 8 * nb + (code_bits + 7) // 8:
        raise _malformed("wrong length")
    scales = struct.unpack_from(f"<{nb}f", data, at)
    offsets = list(struct.unpack_from(f"<{nb}I", data, at + 4 * nb)) + [code_bits]
    if any(not math.isfinite(v) or v < 0 for v in scales):
        raise _malformed("bad scale")
    if nb and offsets[0] != 0 or any(a > b for a, b in zip(offsets, offsets[1:], strict=False)):
        raise _malformed("bad offsets")
    code = torch.tensor(list(data[at + 8 * nb :]), dtype=torch.uint8)
    all_bits = unpack_bits(code, 1, code.numel() * 8, torch.int64).tolist()
    if any(all_bits[code_bits:]):
        raise _malformed("nonzero padding")
    s = 2 ** (bits - 1) - 1
    lv = [0] * n
    for b in range(nb):
        p, end, count, index = offsets[b], offsets[b + 1], min(d, n - b * d), -1
        while p < end:
            gap, p = _read_gamma(all_bits, p, end, count)
            index += gap
            if index >= count or p >= end:
                raise _malformed(f"bucket {b}: gap past the bucket or truncated entry")
            negative, p = all_bits[p], p + 1
            magnitude, p = _read_gamma(all_bits, p, end, s)
            if magnitude > s:
                raise _malformed(f"bucket {b}: level too large")
            lv[b * d + index] = -magnitude if negative else magnitude
    fields = torch.tensor(lv, dtype=torch.int64) + s
    return QuantizedTensor(
        pack_bits(fields, bits),
        torch.tensor(scales, dtype=torch.float32),
        n,
        torch.Size(shape),
        _DTYPES[dtype],
        bits,
        d,
        _NORM_NAMES[norm],
    )


# ---- EF-sign (Karimireddy et al., ICML 2019) ----------------------------------------------------


def efsign(x: torch.Tensor, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of the EF-sign payload: per-bucket mean |x| (float32) and the sign bits
    (1 where x >= 0), bucket by bucket in plain Python loops over buckets."""
    flat = x.detach().reshape(-1).to(torch.float32)
    scales = [
        flat[start : start + bucket_size].abs().mean()
        for start in range(0, flat.numel(), bucket_size)
    ]
    return torch.stack(scales) if scales else flat.new_zeros(0), (flat >= 0).to(torch.uint8)
