"""Top-k, Random-k, TernGrad and EF-sign compressors: payloads, statistics, bad input."""

from __future__ import annotations

import pytest
import torch

import hvd_qpr
import hvd_qpr.ops as ops
import hvd_qpr.reference as ref
from hvd_qpr.compression import RandomKCompressor, TopKCompressor
from tests.conftest import DTYPES, ODD_SIZES, random_input


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_keeps_the_largest_magnitudes(n, dtype):
    x = random_input(n, dtype, seed=n)
    for ratio in (0.001, 0.01, 0.5, 1.0):
        c = hvd_qpr.Compression.topk(ratio)
        k = c.k(n)
        out = c.decode(c.encode(x, seed=1), n)
        kept = out != 0
        assert int(kept.sum()) == k
        assert torch.equal(out[kept], x.float()[kept])
        if k < n:  # everything kept is at least as large as everything dropped
            assert x.float().abs()[kept].min() >= x.float().abs()[~kept].max()


@pytest.mark.parametrize("ratio", [0.001, 0.01, 0.1])
def test_approximate_topk_selects_the_same_entries(ratio):
    for n in (5000, 100003):
        x = random_input(n, seed=int(ratio * 1000) + n)
        exact = TopKCompressor(ratio).encode(x, 3)
        approx = TopKCompressor(ratio, approximate=True, sample_size=1024).encode(x, 3)
        c = TopKCompressor(ratio)
        assert torch.equal(c.decode(exact, n), c.decode(approx, n))


def test_randomk_is_unbiased_and_a_biased_variant_fails():
    x = random_input(200, seed=2)
    c = hvd_qpr.Compression.randomk(0.1)
    draws = torch.stack([c.decode(c.encode(x, seed=s), 200) for s in range(3000)])
    # each estimate is x_i * 10 with probability 0.1, else 0: variance 9 x_i^2
    bound = 5 * 3 * x.abs() / 3000**0.5
    assert ((draws.mean(0) - x).abs() <= bound).all()
    unscaled = draws * 0.1  # Random-k without the numel/k rescaling is biased
    assert not ((unscaled.mean(0) - x).abs() <= bound).all()
    assert int((draws[0] != 0).sum()) == 20


def test_terngrad_is_two_bit_qsgd_and_unbiased():
    x = random_input(1000, seed=4)
    c = hvd_qpr.Compression.terngrad(bucket_size=100)
    q = ref.quantize(x, 2, 100, "max", 9)
    assert torch.equal(c.encode(x, 9), torch.cat([q.scales.view(torch.uint8), q.packed]))
    levels = ref.levels(q)
    assert set(levels.unique().tolist()) <= {-1, 0, 1}
    mean = torch.stack([c.decode(c.encode(x, s), 1000) for s in range(2000)]).mean(0)
    scale = x.view(10, 100).abs().amax(1).repeat_interleave(100)
    assert ((mean - x).abs() <= 5 * scale / 2 / 2000**0.5).all()
    nearest = torch.round(x / scale) * scale  # deterministic rounding: the biased variant
    assert not ((nearest - x).abs() <= 5 * scale / 2 / 2000**0.5).all()


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_efsign_matches_the_reference(n, dtype):
    x = random_input(n, dtype, seed=n + 3)
    x[0] = 0  # zero counts as positive
    for bucket in (512, 7):
        c = hvd_qpr.Compression.efsign(bucket)
        payload = c.encode(x, 0)
        scales, signs = ref.efsign(x, bucket)
        nb = scales.numel()
        assert torch.allclose(payload[: 4 * nb].view(torch.float32), scales, rtol=1e-6)
        assert torch.equal(ops.unpack_bits(payload[4 * nb :], 1, n, torch.uint8), signs)
        out = c.decode(payload, n)
        assert torch.equal(out.abs(), scales.repeat_interleave(bucket)[:n])
        nonzero = out != 0  # a bucket of zeros has scale 0
        assert torch.equal(out.sign()[nonzero], torch.where(signs.bool(), 1.0, -1.0)[nonzero])
        assert c.payload_bytes(n) == payload.numel()
    assert c.traits.needs_error_feedback


def test_bad_input_is_named():
    for ratio in (0, -0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="ratio must be a number in \\(0, 1\\]"):
            TopKCompressor(ratio)
        with pytest.raises(ValueError, match="ratio must be a number"):
            RandomKCompressor(ratio)
    c = TopKCompressor(0.1)
    payload = c.encode(random_input(100), 0)
    with pytest.raises(ValueError, match="must be a 1-D uint8 tensor of 80 bytes"):
        c.decode(payload[:-1], 100)
    bad = payload.clone()
    bad[:4] = torch.tensor([200, 0, 0, 0], dtype=torch.uint8)
    with pytest.raises(ValueError, match="index lies outside 0..99"):
        c.decode(bad, 100)
    with pytest.raises(ValueError, match="efsign: a payload of 10 values"):
        hvd_qpr.Compression.efsign().decode(torch.zeros(3, dtype=torch.uint8), 10)
    with pytest.raises(ValueError, match="sample_size must be a positive int"):
        TopKCompressor(0.1, approximate=True, sample_size=0)


def test_registry_and_traits():
    names = hvd_qpr.Compression.names()
    assert {"topk", "randomk", "terngrad", "efsign"} <= set(names)
    topk = hvd_qpr.Compression.from_name("topk", ratio=0.05)
    assert topk.traits.sparse and not topk.traits.sum_compatible and topk.k(1000) == 50
    assert hvd_qpr.Compression.from_name("terngrad").traits.shared_scale
    p, ctx = topk.compress(random_input(300).view(3, 100))
    assert topk.decompress(p, ctx).shape == (3, 100)


def test_norm_fraction_policy():
    from hvd_qpr.compression import NormFractionPolicy

    x = torch.tensor([3.0, -1.0, 1.0, 1.0, 0.0])  # squared: 9, 1, 1, 1 of 12
    assert NormFractionPolicy(0.75)(x) == 1
    assert NormFractionPolicy(0.76)(x) == 2
    assert NormFractionPolicy(1.0)(x) == 4
    assert NormFractionPolicy(1.0, max_bytes=16)(x) == 2
    assert NormFractionPolicy(0.5)(torch.zeros(7)) == 1
    g = torch.Generator().manual_seed(0)
    y = torch.randn(10_000, generator=g)
    k = NormFractionPolicy(0.9)(y)
    top = y.square().sort(descending=True).values
    assert top[:k].sum() >= 0.9 * top.sum() > top[: k - 1].sum()
    with pytest.raises(ValueError, match="fraction must be in"):
        NormFractionPolicy(0)
    with pytest.raises(ValueError, match="max_bytes must be >= 8"):
        NormFractionPolicy(0.5, max_bytes=4)


def test_adaptive_topk_checks_its_policy():
    from hvd_qpr.compression import AdaptiveTopKCompressor

    x = random_input(100)
    for bad in (0, 101, 2.5, True):
        c = AdaptiveTopKCompressor(policy=lambda v, bad=bad: bad)
        with pytest.raises(ValueError, match=f"returned k={bad!r} for a tensor of 100 values"):
            c.propose_k(x)
    c = hvd_qpr.Compression.adaptive_topk()
    with pytest.raises(RuntimeError, match="no k agreed yet"):
        c.k(100)
    payload = c.encode(x, 0)  # alone: its own proposal
    assert payload.numel() == 8 * c.k(100) and c.traits.adaptive
    c.agree_k(7)
    assert c.encode(x, 0).numel() == 56
    with pytest.raises(TypeError, match="policy must be callable"):
        AdaptiveTopKCompressor(policy=3)
    assert hvd_qpr.Compression.from_name("adaptive_topk").traits.sparse


def test_empty_tensors():
    C = hvd_qpr.Compression
    for c in (C.topk(0.1), C.topk(0.1, approximate=True), C.randomk(0.1), C.terngrad(), C.efsign()):
        payload = c.encode(torch.zeros(0), 1)
        assert c.decode(payload, 0).numel() == 0, c


def test_one_sparse_payload_definition():
    from hvd_qpr import collectives
    from hvd_qpr.compression import sparse

    index, value = torch.tensor([7, 0, 3]), torch.tensor([1.5, -2.0, 0.25])
    payload = sparse.encode_sparse(index, value)
    layout = torch.cat([index.to(torch.int32).view(torch.uint8), value.view(torch.uint8)])
    assert payload.dtype == torch.uint8 and torch.equal(payload, layout)
    assert payload.numel() == sparse.SPARSE_ENTRY_BYTES * 3
    for k in (3, None):  # None: as many entries as the payload holds
        got = sparse.decode_sparse(payload, 10, k)
        assert torch.equal(got[0], index) and torch.equal(got[1], value)
    shifted = torch.cat([torch.zeros(1, dtype=torch.uint8), payload])[1:]  # unaligned slice
    assert torch.equal(sparse.decode_sparse(shifted, 10)[1], value)
    # the compressors and gTop-k's exchanges use it
    c = TopKCompressor(0.3)
    x = random_input(10, seed=5)
    assert torch.equal(c.encode(x, 0), sparse.encode_sparse(*c.select(x, c.k(10), 0)))
    assert c.payload_bytes(10) == c.encode(x, 0).numel()
    assert collectives.encode_sparse is sparse.encode_sparse
    assert collectives.decode_sparse is sparse.decode_sparse
    with pytest.raises(ValueError, match="gtopk: a sparse payload of 12 bytes"):
        sparse.decode_sparse(payload[:12], 10, owner="gtopk")
    with pytest.raises(ValueError, match="gtopk: a payload index lies outside 0..6"):
        sparse.decode_sparse(payload, 7, owner="gtopk")
    with pytest.raises(ValueError, match="topk: a payload of 10 values must be a 1-D uint8 tensor"):
        sparse.decode_sparse(payload.view(torch.int32), 10, 3, owner="topk")
