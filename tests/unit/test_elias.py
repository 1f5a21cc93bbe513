"""Elias coding: bit-exact streams against the reference, round trips, and a decoder that
rejects every malformed stream with a ValueError and never reads or writes out of bounds."""

from __future__ import annotations

import struct

import pytest
import torch

import hvd_qpr.ops as ops
import hvd_qpr.reference as ref
from tests.conftest import DTYPES, random_input


def _sparse_input(n: int, seed: int) -> torch.Tensor:
    x = random_input(n, seed=seed)
    return x * (torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.3)


@pytest.mark.parametrize("n", [1, 7, 511, 513, 4099])
@pytest.mark.parametrize("norm", ["max", "l2"])
def test_stream_matches_reference(kernel_set, n, norm):
    for bits in range(2, 9):
        for bucket_size, make in ((512, random_input), (511, _sparse_input), (5, random_input)):
            q = ops.quantize(make(n, seed=bits), bits, bucket_size, norm, seed=bits)
            stream = ops.elias_encode(q)
            assert torch.equal(stream, ref.elias_encode(q)), (bits, bucket_size)
            assert ops.elias_decode(stream) == q
            assert ref.elias_decode(stream) == q


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_large_and_shaped(kernel_set, dtype):
    x = random_input(100003, dtype, seed=5).view(1, 100003, 1)
    for bits in (2, 4, 8):
        for norm in ("max", "l2"):
            q = ops.quantize(x, bits, 512, norm, seed=bits)
            back = ops.elias_decode(ops.elias_encode(q))
            assert back == q and back.shape == x.shape and back.dtype == dtype


def test_threads_do_not_change_the_stream():
    q = ops.quantize(_sparse_input(2**20 + 3, seed=6), 3, 511, "l2", seed=1)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.elias_encode(q)
        torch.set_num_threads(2)
        two = ops.elias_encode(q)
        assert ops.elias_decode(two) == q
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_empty_scalar_and_long_gaps():
    for x in (torch.empty(0), torch.tensor(2.5), torch.zeros(3, 0, 2)):
        q = ops.quantize(x, 4)
        assert ops.elias_decode(ops.elias_encode(q)) == q
    x = torch.zeros(5_000_000)
    x[[0, 4_999_999]] = torch.tensor([1.0, -1.0])  # a gap needing more than 20 zero bits
    q = ops.quantize(x, 4, bucket_size=5_000_000)
    stream = ops.elias_encode(q)
    assert torch.equal(stream, ref.elias_encode(q))
    assert ops.elias_decode(stream) == q


def test_header_layout():
    q = ops.quantize(random_input(1000).view(10, 100), 3, 256, "l2", seed=2)
    stream = bytes(ops.elias_encode(q).tolist())
    magic, version, bits, norm, dtype, ndim = struct.unpack_from("<4sBBBBB", stream)
    bucket_size, numel, code_bits = struct.unpack_from("<IQQ", stream, 12)
    assert (magic, version, bits, norm, dtype, ndim) == (b"QPRE", 1, 3, 1, 0, 2)
    assert (bucket_size, numel) == (256, 1000)
    assert struct.unpack_from("<2q", stream, 32) == (10, 100)
    assert struct.unpack_from("<4f", stream, 48) == tuple(q.scales.tolist())
    offsets = struct.unpack_from("<4I", stream, 64)
    assert offsets[0] == 0 and list(offsets) == sorted(offsets)
    assert len(stream) == 80 + (code_bits + 7) // 8


def test_sizes_near_qsgd_bound():
    """With s ~ sqrt(d) and l2 scaling, QSGD's code needs at most about 2.8 d + 32 bits a
    bucket; gamma codes with this stream's per-bucket offset stay within that."""
    d = 4096
    x = random_input(64 * d, seed=9)
    q = ops.quantize(x, 8, d, "l2", seed=1)  # s = 127 ~ 2 sqrt(d)
    stream = ops.elias_encode(q)
    code_bits = struct.unpack_from("<Q", bytes(stream[24:32].tolist()))[0]
    assert code_bits + 64 * 64 <= 64 * (2.8 * d + 32)


def _malformed(stream: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ops.elias_decode(stream)
    with pytest.raises(ValueError, match="malformed stream"):
        ref.elias_decode(stream)


def test_specific_corruptions():
    q = ops.quantize(random_input(2000, seed=3), 4, 512, "max", seed=3)
    good = ops.elias_encode(q)
    _malformed(good[:20], "truncated header")
    _malformed(good[:-1], "length")
    _malformed(torch.cat([good, torch.zeros(1, dtype=torch.uint8)]), "length")
    bad = good.clone()
    bad[0] = ord("X")
    _malformed(bad, "wrong magic")
    bad = good.clone()
    bad[4] = 9
    _malformed(bad, "version")
    bad = good.clone()
    bad[5] = 9
    _malformed(bad, "bits 9 outside 2..8")
    bad = good.clone()
    bad[10] = 1
    _malformed(bad, "reserved")
    bad = good.clone()
    bad[16] += 1
    _malformed(bad, "shape")
    bad = good.clone()
    bad[40 + 3] = 0x7F  # first scale: 0x7FC0.... is NaN
    bad[40 + 2] = 0xC0
    _malformed(bad, "scale of bucket 0")
    offsets_at = 40 + 4 * 4
    bad = good.clone()
    bad[offsets_at + 4 : offsets_at + 8] = torch.tensor([255, 255, 255, 0], dtype=torch.uint8)
    _malformed(bad, "offset of bucket 1")
    bad = good.clone()
    bad[offsets_at + 4 : offsets_at + 8] = 0
    # bucket 0 now has no code and bucket 1 starts with bucket 0's: too many entries
    _malformed(bad, "bucket 1: gap runs past the end of the bucket")
    bad = good.clone()
    bad[-1] ^= 0xFF  # last code byte: codes that overrun, or padding that is not zero
    _malformed(bad, "bucket 3|padding")
    for n in range(2, 50):
        padded = ops.elias_encode(ops.quantize(random_input(n, seed=n), 4))
        if int.from_bytes(bytes(padded[24:32].tolist()), "little") % 8 in (1, 2, 3, 4, 5, 6):
            break
    bad = padded.clone()
    bad[-1] |= 0x80
    _malformed(bad, "padding bits after the code are not zero")
    with pytest.raises(TypeError, match="stream must be torch.uint8"):
        ops.elias_decode(good.to(torch.int32))


def test_random_corruptions_never_crash():
    """Thousands of mutated streams (bit flips, byte overwrites, truncation, extension): each
    decodes to a valid QuantizedTensor or raises ValueError; a sample is checked against the
    reference decoder, which must agree."""
    g = torch.Generator().manual_seed(12345)
    sources = [
        ops.elias_encode(ops.quantize(_sparse_input(600, seed=1), 3, 64, "l2", seed=1)),
        ops.elias_encode(ops.quantize(random_input(300, seed=2), 8, 100, "max", seed=2)),
        ops.elias_encode(ops.quantize(random_input(70, seed=3), 2, 7, "max", seed=3)),
    ]
    outcomes = {"error": 0, "decoded": 0}
    for trial in range(6000):
        stream = sources[trial % len(sources)].clone()
        kind = trial % 4
        if kind == 0:  # flip 1-3 bits anywhere
            for _ in range(int(torch.randint(1, 4, (1,), generator=g))):
                i = int(torch.randint(0, stream.numel(), (1,), generator=g))
                stream[i] ^= 1 << int(torch.randint(0, 8, (1,), generator=g))
        elif kind == 1:  # overwrite a byte
            i = int(torch.randint(0, stream.numel(), (1,), generator=g))
            stream[i] = int(torch.randint(0, 256, (1,), generator=g))
        elif kind == 2:  # truncate
            stream = stream[: int(torch.randint(0, stream.numel(), (1,), generator=g))]
        else:  # append random bytes
            length = int(torch.randint(1, 9, (1,), generator=g))
            tail = torch.randint(0, 256, (length,), generator=g, dtype=torch.uint8)
            stream = torch.cat([stream, tail])
        try:
            q = ops.elias_decode(stream)
        except ValueError as e:
            assert "elias_decode" in str(e)
            outcomes["error"] += 1
            if trial % 20 == 0:
                with pytest.raises(ValueError):
                    ref.elias_decode(stream)
            continue
        outcomes["decoded"] += 1
        assert q.packed.numel() == (q.numel * q.bits + 7) // 8
        assert torch.isfinite(ops.dequantize(q, dtype=torch.float32)).all()
        assert torch.equal(ops.elias_encode(q), stream)  # only canonical streams decode
        if trial % 20 == 0:
            assert ref.elias_decode(stream) == q
    assert outcomes["error"] > 3000 and outcomes["decoded"] > 0, outcomes
