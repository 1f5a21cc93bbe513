"""Pieces of the aggregations that need no Horovod: packing with headroom, chunking, framing, the
cost model, the schedule and the seeds."""

from __future__ import annotations

import dataclasses
import itertools
import types

import pytest
import torch

import hvd_qpr
from hvd_qpr import collectives as C
from hvd_qpr.compression import CompressorTraits
from hvd_qpr.schedule import SyncSchedule
from hvd_qpr.seeds import derive_seed


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("world", [1, 2, 3, 4, 7, 64])
def test_packed_words_sum_without_carries(bits, world):
    s = 2 ** (bits - 1) - 1
    width = C.field_width(s, world)
    assert 2 * s * world < 2**width <= 4 * s * world
    g = torch.Generator().manual_seed(bits * 100 + world)
    n = 1013
    fields = [torch.randint(0, 2 * s + 1, (n,), generator=g) for _ in range(world)]
    fields[0][:50] = 2 * s  # the extreme: every worker at the top level
    for f in fields[1:]:
        f[:50] = 2 * s
    words = sum(C.pack_words(f, width) for f in fields)
    assert words.dtype == torch.int64 and (words >= 0).all()
    assert torch.equal(C.unpack_words(words, width, n), sum(fields))
    assert words.numel() == -(-n // (63 // width))


def test_chunk_bounds_cover_whole_buckets():
    for numel, parts, align in ((1, 4, 512), (1025, 2, 512), (10_000, 3, 7), (5, 8, 1)):
        bounds = C.chunk_bounds(numel, parts, align)
        assert len(bounds) == parts and bounds[0][0] == 0 and bounds[-1][1] == numel
        for (a, b), (c, _) in zip(bounds, bounds[1:], strict=False):
            assert b == c and a % align == 0 and a <= b


def test_frames_round_trip_and_reject_garbage():
    comp = hvd_qpr.Compression.qsgd(bits=4, bucket_size=10)
    x = torch.randn(95)
    bad = x.clone()
    bad[3] = float("inf")
    frames = [
        C.encode_frame(comp, x, 1),
        C.encode_frame(comp, bad, 1),
        C.encode_frame(comp, x[:0], 1),
    ]
    assert not C.frame_is_raw(frames[0]) and C.frame_is_raw(frames[1])
    parts = C.split_frames(torch.cat(frames), 3)
    assert torch.equal(C.decode_frame(comp, parts[0], 95), comp.decode(comp.encode(x, 1), 95))
    assert torch.equal(C.decode_frame(comp, parts[1], 95), bad)  # non-finite values travel raw
    assert C.decode_frame(comp, parts[2], 0).numel() == 0
    with pytest.raises(ValueError, match="truncated"):
        C.split_frames(torch.cat(frames)[:-1], 3)
    with pytest.raises(ValueError, match="do not add up"):
        C.split_frames(torch.cat(frames), 2)
    wrong = parts[0].clone()
    wrong[0] = 7
    with pytest.raises(ValueError, match="unknown payload kind 7"):
        C.decode_frame(comp, wrong, 95)


def test_cost_model_choices():
    q4 = hvd_qpr.Compression.qsgd(bits=4)
    n = 10**6
    assert C.choose_aggregation(hvd_qpr.Compression.fp16, n, 8) == "allreduce"
    assert C.choose_aggregation(q4, n, 2) == "allgather"  # one payload each way, one collective
    assert C.choose_aggregation(q4, n, 4) == "packed-sum"
    assert C.choose_aggregation(q4, n, 32) == "scatter-gather"  # fields too wide by then
    assert C.choose_aggregation(hvd_qpr.Compression.qsgd(elias=True), n, 4) != "packed-sum"
    assert "packed-sum" not in C.feasible_aggregations(hvd_qpr.Compression.qsgd(elias=True))
    link = C.Link(bandwidth=1e6, latency=1.0)  # latency-bound: the fewest message steps wins
    assert C.choose_aggregation(q4, 1000, 4, link) == "allgather"
    for m in (2, 4, 16):
        costs = {mode: C.estimate_seconds(mode, q4, n, m, C.Link()) for mode in C.AGGREGATIONS}
        assert all(t > 0 for t in costs.values())
    with pytest.raises(ValueError, match="bandwidth must be > 0"):
        C.Link(bandwidth=0)
    with pytest.raises(ValueError, match="unknown aggregation"):
        C.estimate_seconds("ring", q4, n, 2, C.Link())


def test_schedule():
    s = SyncSchedule(local_steps=3, warmup_steps=2)
    assert [s.averages_gradients(t) for t in range(4)] == [True, True, False, False]
    assert not any(s.compresses_gradients(t) for t in range(5))
    assert [s.syncs_after(c) for c in range(4)] == [False, False, False, True]
    one = SyncSchedule(local_steps=1, warmup_steps=1)
    assert [one.compresses_gradients(t) for t in range(3)] == [False, True, True]
    assert not one.syncs_after(1)
    with pytest.raises(ValueError, match="local_steps must be >= 1"):
        SyncSchedule(local_steps=0)
    with pytest.raises(TypeError, match="warmup_steps must be an int"):
        SyncSchedule(warmup_steps=1.5)


def test_seeds_are_distinct_and_pinned():
    seeds = {derive_seed(0, r, t, b) for r in range(4) for t in range(50) for b in range(3)}
    assert len(seeds) == 600
    assert derive_seed(0, 1, 2) != derive_seed(0, 2, 1)
    assert all(0 <= s < 2**64 for s in seeds)
    assert derive_seed(7) == derive_seed(7)
    assert derive_seed(0, 0, 0, 0) == 0x4534183A9817A9A3


def test_gtopk_schedule_pairs_every_send_with_a_receive():
    for m in range(1, 10):
        plans = [C.gtopk_schedule(r, m) for r in range(m)]
        assert len({len(p) for p in plans}) == 1  # every rank takes part in every exchange
        for step in range(len(plans[0])):
            for r in range(m):
                send_to, receive_from, _ = plans[r][step]
                if send_to is not None:
                    assert plans[send_to][step][1] == r
                if receive_from is not None:
                    assert plans[receive_from][step][0] == r
        p = 1 << (m.bit_length() - 1)
        assert len(plans[0]) == (p.bit_length() - 1) + (2 if m > p else 0)


def test_merge_topk_is_the_same_on_both_partners():
    g = torch.Generator().manual_seed(3)
    a = (torch.tensor([1, 4, 7, 9]), torch.randn(4, generator=g))
    b = (torch.tensor([0, 4, 9, 12]), torch.randn(4, generator=g))
    index, value = C.merge_topk(a, b, 3)
    dense = torch.zeros(13)
    dense.index_add_(0, a[0], a[1])
    dense.index_add_(0, b[0], b[1])
    keep = dense.abs().topk(3).indices.sort().values
    assert torch.equal(index, keep) and torch.equal(value, dense[keep])
    swapped = C.merge_topk(b, a, 3)
    assert torch.equal(swapped[0], index) and torch.equal(swapped[1], value)
    small = C.merge_topk(a, b, 10)
    assert small[0].tolist() == [0, 1, 4, 7, 9, 12]


def test_cost_model_knows_gtopk():
    topk = hvd_qpr.Compression.topk(0.001)
    n = 10**7
    assert C.feasible_aggregations(topk)[0] == "gtopk"
    for m in (4, 16, 1024):
        gt = C.estimate_seconds("gtopk", topk, n, m, C.Link())
        ag = C.estimate_seconds("allgather", topk, n, m, C.Link())
        assert gt < ag  # k log M against k (M - 1)
        assert C.choose_aggregation(topk, n, m) == "gtopk"
    assert "gtopk" not in C.feasible_aggregations(hvd_qpr.Compression.qsgd())


def _todays_feasible(traits):
    """feasible_aggregations as an if-chain, before the mode records: the records must agree."""
    if traits.sum_compatible:
        return ["allreduce"]
    if traits.adaptive:
        return ["gtopk", "allgather"]
    if traits.sparse:
        return ["gtopk", "scatter-gather", "allgather"]
    if traits.shared_scale and not traits.variable_length:
        return ["packed-sum", "scatter-gather", "allgather"]
    return ["scatter-gather", "allgather"]


def test_every_aggregation_has_one_record():
    assert tuple(C.MODES) == C.AGGREGATIONS
    assert all(record.name == name for name, record in C.MODES.items())
    assert [name for name, record in C.MODES.items() if record.dense] == ["allreduce"]
    assert C.MODES["allreduce"].pipeline is C.allreduce_dense
    assert C.MODES["gtopk"].pipeline is C.gtopk
    for m in (2, 3, 4, 5, 64):
        steps = {name: record.latency_steps(m) for name, record in C.MODES.items()}
        exchanges = len(C.gtopk_schedule(0, m))
        assert steps == {
            "allreduce": 2 * (m - 1),
            "packed-sum": 4 * (m - 1),  # the scales, then the fields
            "scatter-gather": 2 * (m - 1),
            "allgather": m - 1,
            "gtopk": exchanges,
        }
        passes = {name: record.codec_passes(m, True) for name, record in C.MODES.items()}
        assert passes == {
            "allreduce": (0.0, 0.0, 0.0),
            "packed-sum": (1.0, 1.0, 2.0),
            "scatter-gather": (0.0, 1.0 + 1.0 / m, 3.0),
            "allgather": (0.0, 1.0, float(m)),
            "gtopk": (0.0, 0.0, 0.0),
        }
    assert C.MODES["scatter-gather"].codec_passes(4, False) == (0.0, 1.25, 2.0)
    with pytest.raises(ValueError, match="names no trait"):
        dataclasses.replace(C.MODES["packed-sum"], needs=("shared_scales",))


def test_feasibility_is_todays_for_every_combination_of_traits():
    names = [f.name for f in dataclasses.fields(CompressorTraits)]
    for bits in itertools.product((False, True), repeat=len(names)):
        traits = CompressorTraits(**dict(zip(names, bits, strict=True)))
        compressor = types.SimpleNamespace(traits=traits)
        assert C.feasible_aggregations(compressor) == _todays_feasible(traits), traits


def test_aggregate_refuses_dense_unknown_and_untraited_modes():
    x = torch.randn(10)
    for mode in ("allreduce", "ring"):
        with pytest.raises(ValueError, match="aggregation must be one of") as info:
            C.aggregate(mode, x, hvd_qpr.Compression.qsgd(), None, "b", [], 0)
        assert "['allgather', 'gtopk', 'packed-sum', 'scatter-gather']" in str(info.value)
    with pytest.raises(ValueError, match="'packed-sum' needs a shared-scale compressor"):
        C.aggregate("packed-sum", x, hvd_qpr.Compression.topk(0.1), None, "b", [], 0)
    with pytest.raises(ValueError, match="unknown aggregation 'ring'; choose one of"):
        C.aggregation_mode("ring")


def test_a_new_record_is_read_everywhere_without_other_edits(monkeypatch):
    q4 = hvd_qpr.Compression.qsgd(bits=4)
    n, payload = 10**6, q4.payload_bytes(10**6)

    def doubled(x, compressor, comm, name, segments, seed, average=True):
        return 2 * x
        yield  # a generator that launches nothing

    fake = C.AggregationMode(
        name="fake",
        pipeline=doubled,
        wire_bytes=lambda c, numel, m: c.payload_bytes(numel) / m,
        collectives=lambda m: ("exchange", "allgather"),
        codec_passes=lambda m, ef: (0.0, 1.0, 1.0),
        feasible=lambda t: not t.sum_compatible and not t.variable_length,
        preference=-1,
    )
    with monkeypatch.context() as patch:
        patch.setitem(C.MODES, "fake", fake)
        assert C.feasible_aggregations(q4) == ["fake", "packed-sum", "scatter-gather", "allgather"]
        assert "fake" not in C.feasible_aggregations(hvd_qpr.Compression.qsgd(elias=True))
        link = C.Link(bandwidth=1e6, latency=0.5)
        assert C.estimate_wire_bytes("fake", q4, n, 4) == payload / 4
        assert C.estimate_seconds("fake", q4, n, 4, link) == payload / 4 / 1e6 + (1 + 3) * 0.5
        assert C.choose_aggregation(q4, n, 64) == "fake"  # a quarter of a payload or less
        x = torch.randn(7)
        assert torch.equal(C.finish(C.aggregate("fake", x, q4, None, "b", [], 0)), 2 * x)
    assert "fake" not in C.MODES
    assert C.feasible_aggregations(q4) == ["packed-sum", "scatter-gather", "allgather"]
