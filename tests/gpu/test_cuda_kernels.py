"""The CUDA kernels against the CPU kernels: bit-identical packed fields and scales for the same
input and seed, over every bit width, dtype, norm and odd size; dequantize and the bit packing;
the device-side error records; the quantizer's statistics on the GPU. Skipped without CUDA (the
GPU machine runs them: scripts/gpu_check.sh)."""

from __future__ import annotations

import pytest
import torch

from hvd_qpr import _C, ops

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and _C.with_cuda), reason="needs a CUDA device and a CUDA build"
)

SIZES = (1, 511, 513, 100_003, 2**24 + 3)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def fresh(n: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * torch.rand(n, generator=g) * 3).to(dtype)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["max", "l2"])
def test_quantize_is_bit_identical_to_the_cpu(n, dtype, norm):
    x = fresh(n, dtype, n)
    for bits in range(2, 9):
        for bucket in (512, 511, 1, 4099, 8):  # 512 and 8: the fused path for most bit widths
            cpu = ops.quantize(x, bits, bucket, norm, seed=1000 + bits)
            gpu = ops.quantize(x.cuda(), bits, bucket, norm, seed=1000 + bits)
            assert torch.equal(gpu.scales.cpu(), cpu.scales), (bits, bucket)
            assert torch.equal(gpu.packed.cpu(), cpu.packed), (bits, bucket)
            if n > 2**20:
                break  # the largest size: one bucket size is enough


@pytest.mark.parametrize("n", SIZES[:4])
def test_quantize_against_given_scales_matches_the_cpu(n):
    x = fresh(n, torch.float32, 7)
    nb = -(-n // 512)
    peaks = torch.cat([x.abs(), x.new_zeros(nb * 512 - n)]).view(nb, 512).amax(1)
    shared = peaks * 1.5
    for bits in (2, 4, 8):
        cpu = ops.quantize(x, bits, 512, seed=3, scales=shared)
        gpu = ops.quantize(x.cuda(), bits, 512, seed=3, scales=shared.cuda())
        assert torch.equal(gpu.packed.cpu(), cpu.packed)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_is_bit_identical_to_the_cpu(n, dtype):
    x = fresh(n, torch.float32, 11)
    for bits in (2, 3, 4, 8):
        q = ops.quantize(x, bits, 512, seed=5)
        cpu = ops.dequantize(q, dtype)
        gpu = ops.dequantize(_to_cuda(q), dtype)
        assert torch.equal(gpu.cpu(), cpu), bits


@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_into_an_unaligned_output_matches_the_cpu(dtype):
    """An output one element past a 16-byte boundary takes the kernel's scalar stores."""
    x = fresh(4099, torch.float32, 13)
    q = ops.quantize(x, 4, 37, seed=2)
    storage = torch.empty(4100, dtype=dtype, device="cuda")
    out = ops.dequantize(_to_cuda(q), out=storage[1:])
    assert torch.equal(out.cpu(), ops.dequantize(q, dtype))


def _to_cuda(q: ops.QuantizedTensor) -> ops.QuantizedTensor:
    return ops.QuantizedTensor(
        q.packed.cuda(), q.scales.cuda(), q.numel, q.shape, q.dtype, q.bits, q.bucket_size, q.norm
    )


@pytest.mark.parametrize("field_bits", [1, 2, 3, 5, 8, 11, 16])
@pytest.mark.parametrize("n", [1, 511, 513, 100_003])
def test_pack_and_unpack_bits_match_the_cpu(field_bits, n):
    g = torch.Generator().manual_seed(n + field_bits)
    values = torch.randint(0, 2**field_bits, (n,), generator=g, dtype=torch.int32)
    packed = ops.pack_bits(values, field_bits)
    assert torch.equal(ops.pack_bits(values.cuda(), field_bits).cpu(), packed)
    out = ops.unpack_bits(packed.cuda(), field_bits, n, torch.int32)
    assert torch.equal(out.cpu(), values)
    with pytest.raises(ValueError, match="values must be in"):
        ops.pack_bits(values.cuda() + 2**field_bits, field_bits)


def test_errors_are_recorded_on_the_device_not_raised():
    x = fresh(2048, torch.float32, 1).cuda()
    x[600] = float("nan")
    q = ops.quantize(x, 4, 512, seed=1)  # no host synchronization, so no exception
    scales = q.scales.cpu()
    assert torch.isnan(scales[1]) and torch.isfinite(scales[[0, 2, 3]]).all()
    out = ops.dequantize(q).cpu()
    assert torch.isnan(out[512:1024]).all() and torch.isfinite(out[:512]).all()
    small = ops.quantize(x.nan_to_num(0.0), 4, 512, seed=1, scales=torch.full((4,), 1e-3).cuda())
    assert torch.isnan(ops.dequantize(small).cpu()).all()  # every bucket exceeds its given scale


def test_cross_device_arguments_are_refused():
    x = fresh(1000, torch.float32, 2).cuda()
    with pytest.raises(ValueError, match="must be on a CUDA device|is on"):
        ops.quantize(x, 4, 512, seed=1, scales=torch.ones(2))


@pytest.mark.parametrize("bits", [2, 4])
def test_quantizer_is_unbiased_on_the_gpu(bits):
    x = fresh(4099, torch.float32, 9).cuda()
    total = torch.zeros_like(x)
    draws = 400
    for seed in range(draws):
        total += ops.dequantize(ops.quantize(x, bits, 512, seed=seed))
    mean = total / draws
    q = ops.quantize(x, bits, 512, seed=0)
    step = (q.scales / (2 ** (bits - 1) - 1)).repeat_interleave(512)[: x.numel()]
    # each value's draws are Bernoulli between two levels: sd <= step / 2 / sqrt(draws)
    z = (mean - x).abs() / (step / 2 / draws**0.5 + 1e-12)
    assert float(z.max()) < 5.5


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_elias_streams_are_identical_and_decode_across_devices(n, bits):
    x = fresh(n, torch.float32, 21 + bits)
    for norm in ("max", "l2"):
        q = ops.quantize(x, bits, 512, norm, seed=bits)
        cpu_stream = ops.elias_encode(q)
        gpu_stream = ops.elias_encode(_to_cuda(q))
        assert gpu_stream.is_cuda and torch.equal(gpu_stream.cpu(), cpu_stream)
        from_cpu = ops.elias_decode(cpu_stream.cuda())  # encoded on the CPU, decoded on the GPU
        assert torch.equal(from_cpu.packed.cpu(), q.packed)
        assert torch.equal(from_cpu.scales.cpu(), q.scales)
        assert ops.elias_decode(gpu_stream.cpu()) == q  # encoded on the GPU, decoded on the CPU


def test_elias_long_gaps_match_the_cpu():
    """A gap of 2^22 (a code longer than one 57-bit read) among values that quantize to 0."""
    n = 2**22 + 2**20 + 77
    x = fresh(n, torch.float32, 5) * 1e-12
    x[torch.tensor([3, 1000, n - 5, n - 1])] = torch.tensor([2.0, -1.0, -3.0, 1.5])
    q = ops.quantize(x, 8, n - 77, seed=9)
    gpu_stream = ops.elias_encode(_to_cuda(q))
    assert torch.equal(gpu_stream.cpu(), ops.elias_encode(q))
    back = ops.elias_decode(gpu_stream)
    assert torch.equal(back.packed.cpu(), q.packed)


def test_corrupt_streams_raise_value_error_on_the_gpu():
    """Random byte changes, truncations and extensions: the GPU decoder raises ValueError
    exactly when the CPU decoder does (never an illegal memory access), else agrees with it."""
    g = torch.Generator().manual_seed(99)
    x = fresh(3001, torch.float32, 5)
    stream = ops.elias_encode(ops.quantize(x, 4, 256, seed=1))
    for trial in range(600):
        s = stream.clone()
        kind = trial % 3
        if kind == 0:
            pos = torch.randint(0, s.numel(), (3,), generator=g)
            s[pos] = torch.randint(0, 256, (3,), generator=g, dtype=torch.uint8)
        elif kind == 1:
            s = s[: int(torch.randint(0, s.numel(), (1,), generator=g))]
        else:
            s = torch.cat([s, torch.randint(0, 256, (5,), generator=g, dtype=torch.uint8)])
        try:
            expected = ops.elias_decode(s)
        except ValueError:
            expected = None
        try:
            got = ops.elias_decode(s.cuda())
        except ValueError as e:
            assert "elias_decode" in str(e)
            got = None
        assert (got is None) == (expected is None), trial
        if got is not None:
            assert torch.equal(got.packed.cpu(), expected.packed), trial
    torch.cuda.synchronize()  # any asynchronous fault would surface here
