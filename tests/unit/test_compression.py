"""Compressors: Horovod's contract, declared traits, the registry and error feedback."""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch

import hvd_qpr
import hvd_qpr.reference as ref
from hvd_qpr.compression import (
    ErrorFeedback,
    HorovodCompressorAdapter,
    QSGDCompressor,
    as_compressor,
    register,
)
from tests.conftest import DTYPES, ODD_SIZES, random_input


def test_ready_made_compressors_and_traits():
    c = hvd_qpr.Compression
    assert c.none.traits.sum_compatible and c.fp16.traits.sum_compatible
    assert c.bf16.traits.sum_compatible and not c.bf16.traits.variable_length
    q = c.qsgd(bits=3)
    assert (q.traits.sum_compatible, q.traits.variable_length, q.traits.shared_scale) == (
        False,
        False,
        True,
    )
    assert c.qsgd(elias=True).traits.variable_length
    assert c.from_name("qsgd", bits=2, bucket_size=7).bucket_size == 7
    assert c.from_name("fp16") is c.fp16
    assert set(c.names()) >= {"none", "fp16", "bf16", "qsgd"}


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match=r"unknown compressor 'topq'; registered .*'bf16'.*'qsgd'"):
        hvd_qpr.Compression.from_name("topq")
    with pytest.raises(ValueError, match="already registered"):
        register("qsgd")(QSGDCompressor)


@pytest.mark.parametrize("dtype", DTYPES)
def test_casts_round_trip(dtype):
    x = random_input(513, dtype)
    for comp, wire in (
        (hvd_qpr.Compression.fp16, torch.float16),
        (hvd_qpr.Compression.bf16, torch.bfloat16),
    ):
        payload, ctx = comp.compress(x)
        assert payload.dtype == wire
        out = comp.decompress(payload, ctx)
        assert out.dtype == dtype and torch.equal(out, x.to(wire).to(dtype))
    ints = torch.arange(5)
    assert hvd_qpr.Compression.fp16.compress(ints)[0] is ints


def test_horovod_compressors_are_accepted():
    for hc in (hvd.Compression.none, hvd.Compression.fp16):
        c = as_compressor(hc)
        assert isinstance(c, HorovodCompressorAdapter) and c.traits.sum_compatible
        x = random_input(100)
        payload, ctx = c.compress(x)
        assert torch.equal(c.decompress(payload, ctx), hc.decompress(*hc.compress(x)))
    assert as_compressor(hvd.Compression.fp16).payload_bytes(10) == 20
    with pytest.raises(TypeError, match="compression must be an hvd_qpr compressor"):
        as_compressor("qsgd")


@pytest.mark.parametrize("n", ODD_SIZES)
@pytest.mark.parametrize("elias", [False, True])
def test_qsgd_payload_is_the_reference_quantization(n, elias):
    for bits in (2, 4, 8):
        c = QSGDCompressor(bits=bits, bucket_size=511, elias=elias)
        x = random_input(n, seed=bits)
        payload = c.encode(x, seed=99)
        q = ref.quantize(x, bits, 511, "max", 99)
        expected = (
            ref.elias_encode(q) if elias else torch.cat([q.scales.view(torch.uint8), q.packed])
        )
        assert torch.equal(payload, expected)
        assert torch.equal(c.decode(payload, n), ref.dequantize(q, torch.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_qsgd_horovod_contract(dtype):
    c = hvd_qpr.Compression.qsgd(bits=4, bucket_size=100, norm="l2")
    x = random_input(7 * 111, dtype).view(7, 111)
    payload, ctx = c.compress(x)
    out = c.decompress(payload, ctx)
    assert out.shape == x.shape and out.dtype == dtype
    payload2, _ = c.compress(x)
    assert not torch.equal(payload, payload2)  # every call draws fresh noise
    bad = payload.clone()
    bad[-1] ^= 1
    with pytest.raises(ValueError, match="changed between compress\\(\\) and decompress\\(\\)"):
        c.decompress(bad, ctx)
    ints = torch.arange(4)
    p, ctx = c.compress(ints)
    assert c.decompress(p, ctx) is ints


def test_qsgd_is_unbiased():
    c = hvd_qpr.Compression.qsgd(bits=2, bucket_size=64)
    x = random_input(640, seed=4)
    mean = torch.stack([c.decode(c.encode(x, seed=s), 640) for s in range(400)]).mean(0)
    scale = x.view(10, 64).abs().amax(1).repeat_interleave(64)
    # each estimate has variance <= scale^2/4; 400 draws put the mean within 5 sigma
    assert ((mean - x).abs() <= 5 * scale / 2 / 20).all()


def test_qsgd_bad_arguments_and_payloads():
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        QSGDCompressor(bits=9)
    with pytest.raises(ValueError, match="bucket_size must be a positive int"):
        QSGDCompressor(bucket_size=0)
    with pytest.raises(ValueError, match="norm must be one of"):
        QSGDCompressor(norm="l1")
    c = QSGDCompressor(bits=4, bucket_size=10)
    payload = c.encode(random_input(95), 1)
    with pytest.raises(ValueError, match="must be a 1-D uint8 tensor of 88 bytes"):
        c.decode(payload[:-1], 95)
    e = QSGDCompressor(bits=4, bucket_size=10, elias=True)
    with pytest.raises(ValueError, match="expected 96 values"):
        e.decode(e.encode(random_input(95), 1), 96)


def test_shared_scale_fields_sum():
    c = QSGDCompressor(bits=3, bucket_size=50)
    xs = [random_input(333, seed=s) for s in range(3)]
    shared = torch.stack([c.bucket_scales(x) for x in xs]).amax(0)
    fields = [c.quantize_fields(x, shared, seed=i) for i, x in enumerate(xs)]
    assert all(int(f.min()) >= 0 and int(f.max()) <= 2 * c.levels_max for f in fields)
    total = c.dequantize_field_sum(sum(f.long() for f in fields), 3, shared)
    each = sum(c.dequantize_field_sum(f, 1, shared) for f in fields)
    assert torch.allclose(total, each, rtol=1e-6, atol=1e-7)
    l2 = QSGDCompressor(bits=3, bucket_size=50, norm="l2")
    assert (l2.bucket_scales(xs[0]) >= c.bucket_scales(xs[0])).all()


def test_error_feedback_keeps_what_was_not_sent():
    ef = ErrorFeedback(hvd_qpr.Compression.qsgd(bits=2, bucket_size=16))
    segments = [("a", 40), ("b", 60)]
    x = random_input(100, seed=3)
    corrected = ef.add_residual(x, segments)
    assert torch.equal(corrected, x)  # no residual yet
    sent = ef.decode(ef.encode(corrected, 5), 100)
    ef.store_residual(corrected, sent, segments)
    assert torch.equal(ef.residuals["a"], (corrected - sent)[:40])
    again = ef.add_residual(x, segments)
    assert torch.equal(again, x + torch.cat([ef.residuals["a"], ef.residuals["b"]]))
    state = ef.state_dict()
    fresh = ErrorFeedback(hvd_qpr.Compression.qsgd(bits=2, bucket_size=16))
    fresh.load_state_dict(state)
    assert torch.equal(fresh.add_residual(x, segments), again)
    with pytest.raises(ValueError, match="has 30 values but its residual 40"):
        ef.add_residual(x, [("a", 30), ("b", 70)])
    assert ef.levels_max == 1 and ef.traits.shared_scale


def test_error_feedback_through_horovods_contract():
    ef = ErrorFeedback(hvd.Compression.fp16)
    x = random_input(10) / 3
    with pytest.raises(
        ValueError, match="hvd_qpr.DistributedOptimizer\\(..., error_feedback=True\\)"
    ):
        ef.compress(x)
    payload, ctx = ef.compress(x, name="w")
    assert torch.equal(ef.residuals["w"], x - payload.float())
    with pytest.raises(ValueError, match="already has error feedback"):
        ErrorFeedback(ef)
