"""Every aggregation mode of hvd_qpr.collectives on the in-process world (tests/inprocess.py) at
M = 1, 2, 3, 4, 5, 8, against single-process computations that do not use the pipelines' code:

* dense all-reduce against the exact (float64) value of Horovod's rule;
* packed-sum, scatter-gather and allgather against ``Simulation._aggregate`` of
  tests/parallel/simulation.py (the horovodrun tests' oracle, built on hvd_qpr.reference), bit for
  bit: each mode fixes its summation order (integer fields; decoded payloads in rank order; one
  chunk owner per chunk), and Elias coding is lossless, so its decoded values are the same;
* gTop-k against a direct simulation of the recursive-doubling schedule, bit for bit (each merge
  adds two float32 values, which is commutative).

Each rank has its own Comm and, where state matters (error feedback, an agreed k), its own
compressor. Inputs differ per rank and are never zero.
"""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch

import hvd_qpr.reference as ref
from hvd_qpr import collectives as C
from hvd_qpr.compression import Compression, ErrorFeedback, NormFractionPolicy
from hvd_qpr.seeds import PHASE_SEND, derive_seed
from tests.conftest import random_input
from tests.inprocess import HOROVOD_DTYPES, RankFailed, World
from tests.parallel.simulation import Simulation, chunk_edges

WORLDS = (1, 2, 3, 4, 5, 8)
SIZES = (1, 511, 513, 2999)  # 2999: six buckets of 512, fewer than M = 8 chunk owners
BUCKET = 512
BASE_SEED = 11
QUANTIZED = ("packed-sum", "scatter-gather", "allgather")


def segments(n: int) -> list[tuple[str, int]]:
    """Two parameters fused into one bucket where there is room for two."""
    return [("w", n)] if n < 2 else [("w", n // 3 + 1), ("b", n - n // 3 - 1)]


def inputs(m: int, n: int, round_: int = 0) -> list[torch.Tensor]:
    return [random_input(n, seed=10_000 * round_ + 100 * r + n) for r in range(m)]


def rank_seed(r: int, round_: int) -> int:
    """The seed the optimizer hands rank r's pipeline, as Simulation._seed derives it."""
    return derive_seed(BASE_SEED, r, round_, 0)


def run_mode(world, mode, xs, compressors, round_=0, average=True):
    comms = [world.comm(r) for r in range(world.size)]
    n = xs[0].numel()
    pipelines = [
        C.aggregate(mode, x.clone(), c, comm, "bucket0", segments(n), rank_seed(r, round_), average)
        for r, (x, c, comm) in enumerate(zip(xs, compressors, comms, strict=True))
    ]
    out = world.run(pipelines)
    assert world.in_flight() == [] and world.unsynchronized() == []
    return out


def simulate(mode: str, xs: list[torch.Tensor], bits: int, round_: int = 0) -> torch.Tensor:
    """The mean as Simulation._aggregate defines each mode (its round sets the seeds)."""
    sim = Simulation(
        torch.nn.Linear(1, 1),
        lambda params: torch.optim.SGD(params, lr=0.0),
        batch=None,
        loss_fn=None,
        world=len(xs),
        local_steps=1,
        bits=bits,
        bucket_size=BUCKET,
        mode=mode,
        seed=BASE_SEED,
    )
    sim.round = round_
    return sim._aggregate([x.to(torch.float32) for x in xs])


def own_decoded(mode: str, xs: list[torch.Tensor], r: int, bits: int, round_: int) -> torch.Tensor:
    """What rank r's own payload decodes to (what error feedback subtracts)."""
    seed = rank_seed(r, round_)
    x = xs[r]
    if mode == "packed-sum":
        n = x.numel()
        nb = -(-n // BUCKET)
        peaks = [torch.cat([y.abs(), y.new_zeros(nb * BUCKET - n)]).view(nb, -1) for y in xs]
        shared = torch.stack([p.amax(1) for p in peaks]).amax(0)
        q = ref.quantize(x, bits, BUCKET, "max", derive_seed(seed, PHASE_SEND), shared)
        return ref.dequantize(q, torch.float32)
    if mode == "allgather":
        q = ref.quantize(x, bits, BUCKET, "max", derive_seed(seed, PHASE_SEND))
        return ref.dequantize(q, torch.float32)
    parts = [
        ref.dequantize(ref.quantize(x[a:b], bits, BUCKET, "max", derive_seed(seed, PHASE_SEND, j)))
        for j, (a, b) in enumerate(chunk_edges(x.numel(), len(xs), BUCKET))
    ]
    return torch.cat(parts).to(torch.float32)


def assert_same_on_every_rank(out: list[torch.Tensor]) -> None:
    for r, o in enumerate(out):
        torch.testing.assert_close(o, out[0], rtol=0, atol=0, equal_nan=True, msg=f"rank {r}")


# ---- dense all-reduce ----------------------------------------------------------------------------

DENSE = {"none": Compression.none, "fp16": Compression.fp16, "bf16": Compression.bf16}
SCALINGS = [
    ("Average", 1.0, 1.0),
    ("Sum", 1.0, 1.0),
    ("Average", 2.0, 0.5),
    ("Sum", 0.5, 0.25),
]


def dense_expected(xs, wire, op, pre, post):
    """Horovod's rule on the wire payloads, exactly (float64), and a bound of the rounding of
    the wire dtype: Horovod scales and sums in it, in a ring order it does not specify."""
    payloads = [x.to(wire).to(torch.float64) for x in xs]
    post = post / len(xs) if op == "Average" else post
    exact = sum(pre * p for p in payloads) * post
    magnitude = sum((pre * p).abs() for p in payloads) * abs(post)
    finfo = torch.finfo(wire)
    bound = (len(xs) + 2) * finfo.eps * magnitude + len(xs) * finfo.smallest_normal
    return exact, bound


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize("codec", DENSE)
@pytest.mark.parametrize("op,pre,post", SCALINGS)
def test_dense_allreduce(m, codec, op, pre, post):
    # bfloat16 arithmetic is checked on a world that accepts it: Horovod 0.28.1 does not (below)
    world = World(m, dtypes=HOROVOD_DTYPES | {torch.bfloat16})
    comms = [world.comm(r) for r in range(m)]
    wire = {"none": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[codec]
    for n in SIZES:
        xs = inputs(m, n)
        pipelines = [
            C.allreduce_dense(
                x.clone(), DENSE[codec], comm, f"d{n}", segments(n), getattr(hvd, op), pre, post
            )
            for x, comm in zip(xs, comms, strict=True)
        ]
        out = world.run(pipelines)
        exact, bound = dense_expected(xs, wire, op, pre, post)
        assert out[0].dtype == torch.float32
        assert bool(((out[0].to(torch.float64) - exact).abs() <= bound).all()), (codec, n)
        assert_same_on_every_rank(out)


def test_dense_bf16_is_refused_as_horovod_refuses_it():
    """Horovod 0.28.1 refuses bfloat16 tensors ('Tensor type torch.BFloat16Tensor is not
    supported'), so Compression.bf16's dense all-reduce fails with that clear error under
    horovodrun; the in-process world refuses it the same way instead of summing it."""
    world = World(2)
    xs = inputs(2, 16)
    with pytest.raises(RankFailed, match="torch.bfloat16 tensor, which Horovod does not support"):
        world.run(
            [
                C.allreduce_dense(x, Compression.bf16, world.comm(r), "bf", [("w", 16)])
                for r, x in enumerate(xs)
            ]
        )


@pytest.mark.parametrize("codec", ["none", "fp16"])
def test_dense_error_feedback_keeps_what_the_cast_dropped(codec):
    m, n = 3, 513
    world = World(m)
    comms = [world.comm(r) for r in range(m)]
    efs = [ErrorFeedback(DENSE[codec]) for _ in range(m)]
    wire = {"none": torch.float32, "fp16": torch.float16}[codec]
    residual = [torch.zeros(n) for _ in range(m)]
    for round_ in range(2):
        xs = inputs(m, n, round_)
        corrected = [x + e for x, e in zip(xs, residual, strict=True)]
        out = world.run(
            [
                C.allreduce_dense(x.clone(), ef, comm, "ef", segments(n))
                for x, ef, comm in zip(xs, efs, comms, strict=True)
            ]
        )
        exact, bound = dense_expected(corrected, wire, "Average", 1.0, 1.0)
        assert bool(((out[0].to(torch.float64) - exact).abs() <= bound).all())
        for r in range(m):
            residual[r] = corrected[r] - corrected[r].to(wire).to(torch.float32)
            stored = torch.cat([efs[r].residuals[name] for name, _ in segments(n)])
            assert torch.equal(stored, residual[r])


# ---- QSGD: packed-sum, scatter-gather, allgather -------------------------------------------------


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("mode", QUANTIZED)
def test_quantized_modes_match_the_simulation_bit_for_bit(m, bits, mode):
    world = World(m)
    qsgd = [Compression.qsgd(bits=bits, bucket_size=BUCKET) for _ in range(m)]
    for n in SIZES:
        xs = inputs(m, n)
        out = run_mode(world, mode, xs, qsgd)
        expected = simulate(mode, xs, bits)
        for r in range(m):
            assert torch.equal(out[r], expected), (mode, n, r)
        if mode != "scatter-gather":  # the sum is the mean before its one division by M
            total = run_mode(world, mode, xs, qsgd, average=False)
            assert torch.equal(total[0] / m, expected), (mode, n)


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize("mode", ["scatter-gather", "allgather"])
def test_elias_coded_payloads_decode_to_the_same_mean(m, mode):
    world = World(m)
    elias = [Compression.qsgd(bucket_size=BUCKET, elias=True) for _ in range(m)]  # 4 bits
    for n in SIZES:
        xs = inputs(m, n)
        out = run_mode(world, mode, xs, elias)
        expected = simulate(mode, xs, 4)  # Elias coding is lossless: same levels, same scales
        for r in range(m):
            assert torch.equal(out[r], expected), (mode, n, r)


@pytest.mark.parametrize("m", [1, 3, 4])
@pytest.mark.parametrize("mode", QUANTIZED)
def test_error_feedback_stores_corrected_input_minus_own_payload(m, mode):
    bits, n = 2, 1300
    world = World(m)
    efs = [ErrorFeedback(Compression.qsgd(bits=bits, bucket_size=BUCKET)) for _ in range(m)]
    residual = [torch.zeros(n) for _ in range(m)]
    for round_ in range(2):
        xs = inputs(m, n, round_)
        corrected = [x + e for x, e in zip(xs, residual, strict=True)]
        out = run_mode(world, mode, xs, efs, round_)
        expected = simulate(mode, corrected, bits, round_)
        for r in range(m):
            assert torch.equal(out[r], expected), (round_, r)
            residual[r] = corrected[r] - own_decoded(mode, corrected, r, bits, round_)
            stored = torch.cat([efs[r].residuals[name] for name, _ in segments(n)])
            assert torch.equal(stored, residual[r]), (round_, r)
        assert any(bool(e.abs().max() > 0) for e in residual)


# ---- gTop-k --------------------------------------------------------------------------------------


def _top(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A sparse vector as (dense values, support mask)."""
    keep = torch.zeros(x.numel(), dtype=torch.bool)
    keep[x.abs().topk(k).indices] = True
    return torch.where(keep, x, torch.zeros_like(x)), keep


def _merge(a, b, k: int):
    """Sum of two sparse vectors cut to the k largest magnitudes of the union."""
    value, support = a[0] + b[0], a[1] | b[1]
    if int(support.sum()) > k:
        magnitude = torch.where(support, value.abs(), torch.full_like(value, -1.0))
        support = torch.zeros_like(support)
        support[magnitude.topk(k).indices] = True
        value = torch.where(support, value, torch.zeros_like(value))
    return value, support


def simulate_gtopk(xs: list[torch.Tensor], k: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """gTop-k by recursive doubling over M ranks: ranks >= P (the largest power of two <= M)
    fold into rank - P first, then log2 P pairwise rounds, then the folded ranks get the result.
    Returns the summed sparse result (dense) and each rank's own top-k support."""
    m = len(xs)
    own = [_top(x, k) for x in xs]
    vec = list(own)
    p = 1 << (m.bit_length() - 1)
    for r in range(p, m):
        vec[r - p] = _merge(vec[r - p], vec[r], k)
    j = 1
    while j < p:
        vec = [_merge(vec[r], vec[r ^ j], k) if r < p else vec[r] for r in range(m)]
        j <<= 1
    return vec[0][0], [support for _, support in own]


def correlated_inputs(m: int, n: int, round_: int = 0) -> list[torch.Tensor]:
    """A common part plus noise per rank, so that top-k sets overlap and merges sum entries."""
    common = random_input(n, seed=7 + round_)
    return [common + 0.3 * x for x in inputs(m, n, round_)]


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize("ratio", [0.05, 0.5])
def test_gtopk_matches_recursive_doubling(m, ratio):
    world = World(m)
    topk = [Compression.topk(ratio) for _ in range(m)]
    for n in SIZES:
        xs = correlated_inputs(m, n)
        out = run_mode(world, "gtopk", xs, topk)
        k = topk[0].k(n)
        total, _ = simulate_gtopk(xs, k)
        for r in range(m):
            assert torch.equal(out[r], total / m), (n, r)
        assert int(out[0].count_nonzero()) == k


class _RankPolicy:
    """Proposes a k that depends on the rank, so the agreement (the largest) matters."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def __call__(self, x: torch.Tensor) -> int:
        return min(x.numel(), 3 + 2 * self.rank)


@pytest.mark.parametrize("m", WORLDS)
def test_adaptive_gtopk_agrees_on_the_largest_k(m):
    world = World(m)
    for policy in ("norm", "rank"):
        comps = [
            Compression.adaptive_topk(
                NormFractionPolicy(0.5) if policy == "norm" else _RankPolicy(r)
            )
            for r in range(m)
        ]
        for n in SIZES:
            xs = correlated_inputs(m, n)
            out = run_mode(world, "gtopk", xs, comps)
            k = max(c.policy(x) for c, x in zip(comps, xs, strict=True))
            assert all(c.k(n) == k for c in comps)
            total, _ = simulate_gtopk(xs, k)
            for r in range(m):
                assert torch.equal(out[r], total / m), (policy, n, r)


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5])
def test_gtopk_error_feedback_keeps_what_did_not_survive(m):
    n, ratio = 1300, 0.05
    world = World(m)
    efs = [ErrorFeedback(Compression.topk(ratio)) for _ in range(m)]
    residual = [torch.zeros(n) for _ in range(m)]
    for round_ in range(2):
        xs = correlated_inputs(m, n, round_)
        corrected = [x + e for x, e in zip(xs, residual, strict=True)]
        out = run_mode(world, "gtopk", xs, efs, round_)
        k = efs[0].k(n)
        total, own = simulate_gtopk(corrected, k)
        survived = total != 0
        for r in range(m):
            assert torch.equal(out[r], total / m), (round_, r)
            sent = torch.where(own[r] & survived, corrected[r], torch.zeros(n))
            residual[r] = corrected[r] - sent
            stored = torch.cat([efs[r].residuals[name] for name, _ in segments(n)])
            assert torch.equal(stored, residual[r]), (round_, r)
        if m <= 2:
            # one merge: what was applied plus what is left is the inputs' sum. From M = 3 on an
            # index can be cut in one merge and come back from another pair, so a rank whose
            # value was cut still counts it as sent (gTop-k's residual is by index, as Shi et
            # al.'s): the sum is not conserved there
            left = sum(residual)
            torch.testing.assert_close(total + left, sum(corrected), rtol=1e-5, atol=1e-5)


# ---- non-finite input on one rank ----------------------------------------------------------------

NONFINITE_CASES = {
    "dense-none": ("allreduce", lambda: Compression.none),
    "dense-fp16": ("allreduce", lambda: Compression.fp16),
    "packed-sum-ef": ("packed-sum", lambda: ErrorFeedback(Compression.qsgd(bits=4))),
    "scatter-gather": ("scatter-gather", lambda: Compression.qsgd(bits=4)),
    "scatter-gather-elias-ef": (
        "scatter-gather",
        lambda: ErrorFeedback(Compression.qsgd(bits=2, elias=True)),
    ),
    "allgather-elias": ("allgather", lambda: Compression.qsgd(bits=4, elias=True)),
    "gtopk-ef": ("gtopk", lambda: ErrorFeedback(Compression.topk(0.05))),
}


@pytest.mark.parametrize("m", [2, 3, 5])
@pytest.mark.parametrize("case", NONFINITE_CASES)
def test_non_finite_input_reaches_every_rank(m, case):
    mode, make = NONFINITE_CASES[case]
    n = 1300
    world = World(m)
    xs = inputs(m, n)
    xs[m - 1][5] = float("nan")  # one rank's NaN
    xs[m - 1][n - 1] = float("inf")  # and its +Inf, in another chunk
    comps = [make() for _ in range(m)]
    comms = [world.comm(r) for r in range(m)]
    if mode == "allreduce":
        pipelines = [
            C.allreduce_dense(x.clone(), c, comm, "nf", segments(n))
            for x, c, comm in zip(xs, comps, comms, strict=True)
        ]
        out = world.run(pipelines)  # returns: no rank waits forever
    else:
        out = run_mode(world, mode, xs, comps)
    assert_same_on_every_rank(out)
    assert bool(torch.isnan(out[0][5])) and float(out[0][n - 1]) == float("inf")
    rest = torch.ones(n, dtype=torch.bool)
    rest[[5, n - 1]] = False
    assert bool(torch.isfinite(out[0][rest]).all())
