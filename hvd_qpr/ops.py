"""Typed Python entry points to the native kernels (the only module that calls ``hvd_qpr._C``).

The quantizer is QSGD's (Alistarh et al., "QSGD: Communication-Efficient SGD via Gradient
Quantization and Encoding", NeurIPS 2017): values are split into buckets of ``bucket_size``
consecutive elements, each bucket gets a scale (its max magnitude, or its l2 norm as in the
paper), and every value is rounded stochastically to one of the levels ``-s..s`` with
``s = 2**(bits-1) - 1``, unbiasedly. Randomness comes from a counter-based generator keyed by
``seed`` and the element's flat index, so results are reproducible and identical across devices
and thread counts. ``hvd_qpr.reference`` holds the pure-PyTorch definition of every op here.

Packed layout: a level ``l`` is stored as the field ``l + s`` (offset binary, so ``0..2s``; the
all-ones field is never produced), fields of ``bits`` bits laid LSB-first in a byte stream: field
``i`` occupies bits ``[i*bits, (i+1)*bits)``, bit ``k`` of the stream being bit ``k % 8`` of byte
``k // 8``. ``pack_bits`` / ``unpack_bits`` use the same layout for any field width 1..16.

float64 tensors are refused (TypeError): quantizing them is never what the optimizer does, which
leaves float64 parameters uncompressed.

Example:
    >>> import torch, hvd_qpr.ops as ops
    >>> x = torch.randn(1000)
    >>> q = ops.quantize(x, bits=4, bucket_size=512, norm="max", seed=0)
    >>> x_hat = ops.dequantize(q)  # unbiased estimate of x
    >>> q2 = ops.elias_decode(ops.elias_encode(q))
    >>> q2 == q
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator

import torch

from hvd_qpr import _C  # noqa: F401  (loads the library that registers torch.ops.hvd_qpr)

NORMS: dict[str, int] = {"max": 0, "l2": 1}
_NORM_NAMES = {code: name for name, code in NORMS.items()}
_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}
_UNPACK_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)


@dataclasses.dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A QSGD-quantized tensor: bit-packed levels plus one float32 scale per bucket.

    Attributes:
        packed: uint8 tensor of ``ceil(numel * bits / 8)`` bytes, the fields ``level + s``.
        scales: float32 tensor, one scale per bucket of ``bucket_size`` values.
        numel: number of values.
        shape: shape of the original tensor.
        dtype: dtype of the original tensor (float32, float16 or bfloat16).
        bits: bits per level, 2..8.
        bucket_size: values per bucket.
        norm: ``"max"`` or ``"l2"``, how the scales were computed.

    Example:
        >>> q = hvd_qpr.ops.quantize(torch.randn(3, 5), bits=2)
        >>> q.shape, q.packed.numel(), q.scales.numel()
        (torch.Size([3, 5]), 4, 1)
    """

    packed: torch.Tensor
    scales: torch.Tensor
    numel: int
    shape: torch.Size
    dtype: torch.dtype
    bits: int
    bucket_size: int
    norm: str

    @property
    def levels_max(self) -> int:
        """s, the largest level magnitude."""
        return 2 ** (self.bits - 1) - 1

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, QuantizedTensor):
            return NotImplemented
        return (
            (self.numel, tuple(self.shape), self.dtype, self.bits, self.bucket_size, self.norm)
            == (
                other.numel,
                tuple(other.shape),
                other.dtype,
                other.bits,
                other.bucket_size,
                other.norm,
            )
            and torch.equal(self.packed, other.packed)
            and torch.equal(self.scales, other.scales)
        )


def _check_tensor(x: object, op: str, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.device.type not in ("cpu", "meta") and not (x.device.type == "cuda" and _C.with_cuda):
        raise ValueError(
            f"{op}: {name} is on {x.device}, but this build of hvd_qpr has kernels for the CPU"
            + (" and CUDA" if _C.with_cuda else " only")
        )
    return x


def _check_int(value: object, op: str, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    return value


def norm_code(norm: str, op: str = "quantize") -> int:
    """Code of a norm name in the op schemas and the Elias stream; ValueError lists the choices."""
    if norm not in NORMS:
        raise ValueError(f"{op}: norm must be one of {sorted(NORMS)}, got {norm!r}")
    return NORMS[norm]


def seed_to_int64(seed: int, op: str = "quantize") -> int:
    """Maps a seed in [0, 2**64) to the int64 the ops take (same 64 bits)."""
    _check_int(seed, op, "seed")
    if not 0 <= seed < 2**64:
        raise ValueError(f"{op}: seed must be in [0, 2**64), got {seed}")
    return seed - 2**64 if seed >= 2**63 else seed


def quantize(
    x: torch.Tensor,
    bits: int = 4,
    bucket_size: int = 512,
    norm: str = "max",
    seed: int = 0,
    out: QuantizedTensor | None = None,
    scales: torch.Tensor | None = None,
) -> QuantizedTensor:
    """QSGD-quantizes ``x`` bucket by bucket with unbiased stochastic rounding.

    Args:
        x: float32, float16 or bfloat16 tensor of any shape, contiguous or not.
        bits: 2..8; levels are ``-s..s`` with ``s = 2**(bits-1) - 1`` (2 bits is ternary).
        bucket_size: values per bucket, each with its own scale.
        norm: ``"max"`` (scale = max |v| of the bucket) or ``"l2"`` (its l2 norm, the paper's).
        seed: in [0, 2**64); draws depend on (seed, flat index) only.
        out: a QuantizedTensor of the same numel, bits and bucket_size whose packed and scales
            buffers are overwritten and reused (saves allocating fresh memory every call).
        scales: float32 scales, one per bucket, to quantize against instead of computing them
            (the scale all workers agreed on for a packed sum); each must be at least the
            largest magnitude in its bucket. ``norm`` then only records what they are. The
            result's scales are this tensor (out's packed buffer is still reused).

    Returns:
        The QuantizedTensor (sharing out's buffers when out is given).

    Raises:
        TypeError: x is not a tensor of a supported dtype.
        ValueError: bad bits, bucket_size or norm, NaN or Inf in x, an l2 norm that overflows,
            or given scales that are negative, non-finite or below a bucket's maximum. On CUDA
            the data-dependent errors are recorded on the device instead, so that no call waits
            for the GPU: a bucket holding NaN or Inf, or whose l2 norm overflows, gets a NaN
            scale, and a bucket above its given scale gets invalid fields, which
            :func:`dequantize` turns into NaN. (hvd_qpr's optimizer checks the model is finite
            before quantizing, where it synchronizes anyway.)

    Example:
        >>> q = quantize(torch.randn(10_000), bits=4, norm="l2", seed=7)
        >>> dequantize(q).shape
        torch.Size([10000])
    """
    op = "quantize"
    _check_tensor(x, op, "x")
    args = (
        x,
        _check_int(bits, op, "bits"),
        _check_int(bucket_size, op, "bucket_size"),
        norm_code(norm, op),
        seed_to_int64(seed, op),
    )
    if out is not None and not isinstance(out, QuantizedTensor):
        raise TypeError(f"{op}: out must be a QuantizedTensor, got {type(out).__name__}")
    if scales is not None:
        _check_tensor(scales, op, "scales")
        if out is None:
            packed = x.new_empty(((x.numel() * bits + 7) // 8,), dtype=torch.uint8)
        else:
            packed = out.packed
        x_arg, bits_arg, bucket_arg, _, seed_arg = args
        torch.ops.hvd_qpr.quantize_scaled_out(x_arg, scales, bits_arg, bucket_arg, seed_arg, packed)
    elif out is None:
        packed, scales = torch.ops.hvd_qpr.quantize(*args)
    else:
        packed, scales = out.packed, out.scales
        torch.ops.hvd_qpr.quantize_out(*args, packed, scales)
    return QuantizedTensor(packed, scales, x.numel(), x.shape, x.dtype, bits, bucket_size, norm)


def dequantize(
    q: QuantizedTensor, dtype: torch.dtype | None = None, out: torch.Tensor | None = None
) -> torch.Tensor:
    """Expands a QuantizedTensor back to values ``level * scale / s``.

    Args:
        q: the quantized tensor.
        dtype: output dtype (float32, float16 or bfloat16); q.dtype when None.
        out: a contiguous tensor of q.numel elements to write into (its dtype is the output
            dtype; dtype must then be None or the same).

    Returns:
        A tensor of shape q.shape (out itself when given).

    Raises:
        ValueError: inconsistent q (sizes, a negative or non-finite scale, an invalid field), or
            a value that overflows dtype (possible for float16 with l2 scales). On CUDA only the
            sizes are checked, since the rest would wait for the GPU: a NaN scale or an invalid
            field gives NaN, an overflow Inf, a negative scale values of the wrong sign; scales
            from :func:`quantize` are never negative.

    Example:
        >>> x_hat = dequantize(quantize(torch.randn(4, 4)))
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"dequantize: q must be a QuantizedTensor, got {type(q).__name__}")
    op = "dequantize"
    _check_tensor(q.packed, op, "q.packed")
    if out is None:
        return torch.ops.hvd_qpr.dequantize(
            q.packed, q.scales, list(q.shape), q.bits, q.bucket_size, dtype or q.dtype
        )
    _check_tensor(out, op, "out")
    if dtype is not None and dtype != out.dtype:
        raise TypeError(f"{op}: dtype {dtype} differs from out's dtype {out.dtype}")
    if out.numel() != q.numel:
        raise ValueError(f"{op}: out has {out.numel()} elements, q has {q.numel}")
    torch.ops.hvd_qpr.dequantize_out(q.packed, q.scales, q.bucket_size, q.bits, out)
    return out


def elias_encode(q: QuantizedTensor) -> torch.Tensor:
    """Elias-codes a QuantizedTensor into a self-describing uint8 stream (QSGD's Code_s).

    Per bucket the stream holds the float32 scale, the bit offset where its codes start, and for
    each nonzero level the Elias gamma code of the gap from the previous nonzero, a sign bit and
    the gamma code of the level's magnitude. Layout: ``csrc/include/qpr/elias.h``.

    Example:
        >>> buf = elias_encode(quantize(torch.randn(100_000), bits=2, norm="l2"))
        >>> buf.dtype
        torch.uint8
    """
    if not isinstance(q, QuantizedTensor):
        raise TypeError(f"elias_encode: q must be a QuantizedTensor, got {type(q).__name__}")
    _check_tensor(q.packed, "elias_encode", "q.packed")
    return torch.ops.hvd_qpr.elias_encode(
        q.packed,
        q.scales,
        list(q.shape),
        q.bits,
        q.bucket_size,
        norm_code(q.norm, "elias_encode"),
        q.dtype,
    )


def elias_decode(stream: torch.Tensor, out: QuantizedTensor | None = None) -> QuantizedTensor:
    """Decodes a stream made by :func:`elias_encode`, checking every field and every read.

    Args:
        stream: the uint8 stream.
        out: a QuantizedTensor of the stream's numel, bits and bucket_size whose packed and
            scales buffers are overwritten and reused.

    Raises:
        TypeError: stream is not a uint8 tensor.
        ValueError: the stream is malformed or truncated (the message says where). CPU and
            CUDA refuse the same streams; with several faults they may name different ones.

    Example:
        >>> q = quantize(torch.randn(513), bits=3)
        >>> elias_decode(elias_encode(q)) == q
        True
    """
    op = "elias_decode"
    _check_tensor(stream, op, "stream")
    if out is None:
        packed, scales, meta = torch.ops.hvd_qpr.elias_decode(stream)
    else:
        if not isinstance(out, QuantizedTensor):
            raise TypeError(f"{op}: out must be a QuantizedTensor, got {type(out).__name__}")
        packed, scales = out.packed, out.scales
        meta = torch.ops.hvd_qpr.elias_decode_out(stream, packed, scales)
    bits, bucket_size, norm, dtype, _ndim, *shape = meta.tolist()
    return QuantizedTensor(
        packed,
        scales,
        math.prod(shape),
        torch.Size(shape),
        _DTYPES[dtype],
        bits,
        bucket_size,
        _NORM_NAMES[norm],
    )


def pack_bits(values: torch.Tensor, field_bits: int) -> torch.Tensor:
    """Packs non-negative integers into ``field_bits``-bit fields of an LSB-first byte stream.

    Args:
        values: uint8, int16, int32 or int64 tensor, every value in ``[0, 2**field_bits)``.
        field_bits: 1..16.

    Returns:
        uint8 tensor of ``ceil(values.numel() * field_bits / 8)`` bytes; unused bits are zero.

    Example:
        >>> pack_bits(torch.tensor([1, 2, 3]), 2)
        tensor([57], dtype=torch.uint8)
    """
    _check_tensor(values, "pack_bits", "values")
    return torch.ops.hvd_qpr.pack_bits(values, _check_int(field_bits, "pack_bits", "field_bits"))


def unpack_bits(
    packed: torch.Tensor, field_bits: int, numel: int, dtype: torch.dtype = torch.int32
) -> torch.Tensor:
    """Reads back ``numel`` fields written by :func:`pack_bits`.

    Args:
        packed: uint8 tensor of at least ``ceil(numel * field_bits / 8)`` bytes.
        field_bits: 1..16.
        numel: number of fields.
        dtype: uint8, int16, int32 (default) or int64; it must hold ``field_bits`` bits.

    Example:
        >>> unpack_bits(torch.tensor([57], dtype=torch.uint8), 2, 3)
        tensor([1, 2, 3], dtype=torch.int32)
    """
    op = "unpack_bits"
    _check_tensor(packed, op, "packed")
    if dtype not in _UNPACK_DTYPES:
        raise TypeError(f"{op}: dtype must be one of {_UNPACK_DTYPES}, got {dtype}")
    return torch.ops.hvd_qpr.unpack_bits(
        packed, _check_int(field_bits, op, "field_bits"), _check_int(numel, op, "numel"), dtype
    )


def available_kernel_sets() -> list[str]:
    """CPU kernel sets this processor can run, best first (``avx512``, ``avx2``, ``base``)."""
    return list(_C.available_kernel_sets())


def active_kernel_set() -> str:
    """The CPU kernel set the ops use now."""
    return _C.active_kernel_set()


@contextlib.contextmanager
def kernel_set(name: str) -> Iterator[None]:
    """Runs the enclosed ops with one CPU kernel set, e.g. to compare them.

    Example:
        >>> with kernel_set("base"):
        ...     q = quantize(torch.randn(100))
    """
    _C.force_kernel_set(name)
    try:
        yield
    finally:
        _C.force_kernel_set("auto")


def _register_fakes() -> None:
    """Shape functions of the ops, for torch.compile and torch.library.opcheck."""

    @torch.library.register_fake("hvd_qpr::quantize")
    def _(x, bits, bucket_size, norm, seed):
        n = x.numel()
        packed = x.new_empty(((n * bits + 7) // 8,), dtype=torch.uint8)
        return packed, x.new_empty((-(-n // bucket_size),), dtype=torch.float32)

    @torch.library.register_fake("hvd_qpr::quantize_out")
    def _(x, bits, bucket_size, norm, seed, packed, scales):
        return None

    @torch.library.register_fake("hvd_qpr::quantize_scaled_out")
    def _(x, scales, bits, bucket_size, seed, packed):
        return None

    @torch.library.register_fake("hvd_qpr::dequantize_out")
    def _(packed, scales, bucket_size, bits, out):
        return None

    @torch.library.register_fake("hvd_qpr::dequantize")
    def _(packed, scales, shape, bits, bucket_size, dtype):
        return packed.new_empty(shape, dtype=dtype)

    @torch.library.register_fake("hvd_qpr::pack_bits")
    def _(values, field_bits):
        return values.new_empty(((values.numel() * field_bits + 7) // 8,), dtype=torch.uint8)

    @torch.library.register_fake("hvd_qpr::unpack_bits")
    def _(packed, field_bits, numel, dtype):
        return packed.new_empty((numel,), dtype=dtype)

    @torch.library.register_fake("hvd_qpr::elias_encode")
    def _(packed, scales, shape, bits, bucket_size, norm, dtype):
        length = torch.library.get_ctx().new_dynamic_size()
        return packed.new_empty((length,), dtype=torch.uint8)

    @torch.library.register_fake("hvd_qpr::elias_decode_out")
    def _(stream, packed, scales):
        return stream.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)

    @torch.library.register_fake("hvd_qpr::elias_decode")
    def _(stream):
        ctx = torch.library.get_ctx()
        packed = stream.new_empty((ctx.new_dynamic_size(),), dtype=torch.uint8)
        scales = stream.new_empty((ctx.new_dynamic_size(),), dtype=torch.float32)
        meta = stream.new_empty((ctx.new_dynamic_size(),), dtype=torch.int64)
        return packed, scales, meta


_register_fakes()
