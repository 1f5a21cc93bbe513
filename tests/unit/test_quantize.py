"""quantize / dequantize: bit-exact against the reference, and QSGD's statistical properties."""

from __future__ import annotations

import math

import pytest
import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref
from tests.conftest import DTYPES, ODD_SIZES, random_input


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", ["max", "l2"])
def test_matches_reference_all_bits(kernel_set, n, dtype, norm):
    x = random_input(n, dtype, seed=n)
    for bits in range(2, 9):
        for bucket_size in (512, 511, 6):
            seed = 1000 * bits + bucket_size
            q = ops.quantize(x, bits, bucket_size, norm, seed)
            expected = ref.quantize(x, bits, bucket_size, norm, seed)
            assert q == expected, (bits, bucket_size)
            assert torch.equal(ops.dequantize(q), ref.dequantize(expected))


def test_fields_and_metadata():
    x = random_input(3 * 5 * 7).view(3, 5, 7)
    q = ops.quantize(x, bits=3, bucket_size=16, norm="l2", seed=9)
    assert (q.numel, q.shape, q.dtype, q.bits, q.bucket_size, q.norm) == (
        105,
        torch.Size([3, 5, 7]),
        torch.float32,
        3,
        16,
        "l2",
    )
    assert q.packed.dtype == torch.uint8 and q.packed.numel() == math.ceil(105 * 3 / 8)
    assert q.scales.dtype == torch.float32 and q.scales.numel() == 7
    assert ops.dequantize(q).shape == x.shape
    with pytest.raises(AttributeError):
        q.bits = 4  # frozen


def test_levels_and_scales_follow_qsgd():
    x = random_input(2000, seed=3)
    for bits in range(2, 9):
        s = 2 ** (bits - 1) - 1
        q = ops.quantize(x, bits, 500, "max", seed=bits)
        levels = ref.levels(q).view(4, 500)
        assert levels.abs().max() <= s
        assert torch.equal(q.scales, x.view(4, 500).abs().amax(dim=1))
        # each value rounds to one of its two neighbouring levels, with the sign of the value
        t = x.view(4, 500).abs() / q.scales[:, None] * s
        assert ((levels.abs() - t).abs() < 1 + 1e-5).all()
        nonzero = levels != 0
        assert torch.equal(levels[nonzero].sign(), x.view(4, 500)[nonzero].sign().long())
    q2 = ops.quantize(x, 2, 2000, "l2", seed=1)
    assert torch.allclose(q2.scales, x.norm().reshape(1), rtol=1e-6)


def test_noncontiguous_and_empty(kernel_set):
    base = random_input(64 * 33).view(64, 33)
    x = base.t()[:, ::2]
    assert not x.is_contiguous()
    q = ops.quantize(x, 4, 100, "max", 5)
    assert q == ops.quantize(x.contiguous(), 4, 100, "max", 5)
    assert q == ref.quantize(x, 4, 100, "max", 5)
    empty = ops.quantize(torch.empty(0, 3), 4)
    assert empty.numel == 0 and empty.packed.numel() == 0 and empty.scales.numel() == 0
    assert ops.dequantize(empty).shape == (0, 3)
    zero_bucket = ops.quantize(torch.zeros(10), 4)
    assert torch.equal(ops.dequantize(zero_bucket), torch.zeros(10))


def test_seed_and_threads_determine_output():
    x = random_input(300_000, seed=4)
    a = ops.quantize(x, 4, seed=7)
    assert a == ops.quantize(x, 4, seed=7)
    assert not torch.equal(a.packed, ops.quantize(x, 4, seed=8).packed)
    assert ops.quantize(x[:1000], 4, seed=2**64 - 1) == ref.quantize(x[:1000], 4, seed=2**64 - 1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.quantize(x, 3, 511, "l2", seed=3)
        torch.set_num_threads(2)
        two = ops.quantize(x, 3, 511, "l2", seed=3)
    finally:
        torch.set_num_threads(threads)
    assert one == two


def test_out_buffers_are_reused():
    x = random_input(5000, seed=8)
    first = ops.quantize(x, 4, seed=1)
    again = ops.quantize(x * 2, 4, seed=2, out=first)
    assert again.packed.data_ptr() == first.packed.data_ptr()
    assert again == ops.quantize(x * 2, 4, seed=2)
    decoded = ops.elias_decode(ops.elias_encode(again), out=first)
    assert decoded == again and decoded.packed.data_ptr() == first.packed.data_ptr()
    with pytest.raises(ValueError, match="elias_decode: packed must be"):
        ops.elias_decode(ops.elias_encode(ops.quantize(x[:10], 4)), out=first)
    out = torch.empty(5000)
    assert ops.dequantize(again, out=out) is out
    assert torch.equal(out, ops.dequantize(again))
    with pytest.raises(ValueError, match="packed must be"):
        ops.quantize(random_input(10), 4, out=first)
    with pytest.raises(ValueError, match="out has"):
        ops.dequantize(again, out=torch.empty(3))


def _expectation(x: torch.Tensor, q: ops.QuantizedTensor):
    """Exact mean and variance of each quantized value: a Bernoulli between two levels."""
    s = q.levels_max
    d = q.bucket_size
    scales = q.scales.repeat_interleave(d)[: x.numel()]
    t = torch.clamp_max((x.abs() / scales) * s, s)
    p = (t - t.floor()).double()
    step = (scales / s).double()
    mean = x.sign().double() * (t.floor().double() + p) * step
    var = step.square() * p * (1 - p)
    lower = x.sign() * t.floor() * (scales / s)  # the kernel's float32 value when p == 0
    return mean, var, lower.double()


@pytest.mark.parametrize("norm", ["max", "l2"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_unbiased_with_exact_variance(norm, bits):
    """Over many seeds, the mean of Q(x) is x within the exact Bernoulli standard errors, and
    the mean squared error equals the exact variance: a biased or mis-scaled rounding fails."""
    x = random_input(4096, seed=bits)
    trials = 400
    q0 = ops.quantize(x, bits, 512, norm, 0)
    mean, var, lower = _expectation(x, q0)
    assert torch.allclose(mean, x.double(), rtol=1e-5, atol=1e-6)  # E[Q(x)] = x
    samples = torch.stack(
        [ops.dequantize(ops.quantize(x, bits, 512, norm, seed)).double() for seed in range(trials)]
    )
    random = var > 0
    z = (samples.mean(0) - mean)[random] / (var[random] / trials).sqrt()
    m = int(random.sum())
    assert abs(z.mean()) < 5 / math.sqrt(m)
    assert abs(z.square().mean() - 1) < 5 * math.sqrt(2 / m)
    assert torch.equal(samples[:, ~random], lower[~random].expand(trials, -1))
    sq_err = (samples - x.double()).square().sum(1)
    expected = var.sum()
    assert abs(sq_err.mean() - expected) < 5 * sq_err.std() / math.sqrt(trials)


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_qsgd_variance_and_sparsity_bounds(bits):
    """Lemma 3.1 of QSGD with l2 scaling: E||Q(v)-v||^2 <= min(d/s^2, sqrt(d)/s) ||v||^2 and
    E||Q(v)||_0 <= s(s + sqrt(d)), per bucket."""
    d = 512
    s = 2 ** (bits - 1) - 1
    x = random_input(8 * d, seed=11)
    buckets = x.view(8, d).double()
    errors, nonzeros = [], []
    for seed in range(200):
        q = ops.quantize(x, bits, d, "l2", seed)
        errors.append((ops.dequantize(q).view(8, d).double() - buckets).square().sum(1))
        nonzeros.append((ref.levels(q).view(8, d) != 0).sum(1).double())
    bound = min(d / s**2, math.sqrt(d) / s) * buckets.square().sum(1)
    assert (torch.stack(errors).mean(0) <= bound).all()
    assert (torch.stack(nonzeros).mean(0) <= s * (s + math.sqrt(d))).all()


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_given_scales_match_reference(kernel_set, n, dtype):
    x = random_input(n, dtype, seed=n + 1)
    for bits in range(2, 9):
        for bucket_size in (512, 511, 6):
            nb = -(-n // bucket_size)
            own = ref.quantize(x, bits, bucket_size, "max", 0).scales
            # a scale agreed across workers: at least this worker's own bucket maximum
            shared = own * (1 + torch.rand(nb, generator=torch.Generator().manual_seed(bits)))
            seed = 77 * bits + bucket_size
            q = ops.quantize(x, bits, bucket_size, "max", seed, scales=shared)
            expected = ref.quantize(x, bits, bucket_size, "max", seed, scales=shared)
            assert q == expected, (bits, bucket_size)
            assert q.scales is shared
            out = ops.quantize(x, bits, bucket_size, "max", seed + 1)
            q2 = ops.quantize(x, bits, bucket_size, "max", seed, out=out, scales=shared)
            assert q2 == expected and q2.packed is out.packed


def test_given_scales_are_checked():
    x = random_input(1000, seed=5)
    own = ops.quantize(x, 4, 100).scales
    with pytest.raises(ValueError, match="bucket 3 holds a value of magnitude .* above its given"):
        low = own.clone()
        low[3] *= 0.5
        ops.quantize(x, 4, 100, scales=low)
    with pytest.raises(ValueError, match="finite and non-negative"):
        ops.quantize(x, 4, 100, scales=torch.full_like(own, float("nan")))
    with pytest.raises(ValueError, match="finite and non-negative"):
        ops.quantize(x, 4, 100, scales=-own)
    with pytest.raises(ValueError, match="scales must be a 1-D tensor of 10 values"):
        ops.quantize(x, 4, 100, scales=own[:9])
    with pytest.raises(TypeError, match="scales"):
        ops.quantize(x, 4, 100, scales=own.double())
