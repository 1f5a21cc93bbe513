"""The in-process communicator itself (tests/inprocess.py): each collective's semantics as
Horovod defines them, matching by name, the errors for what Horovod would refuse or hang on, and
the byte counts of the real Comm over it (DESIGN.md 2.3)."""

from __future__ import annotations

import horovod.torch as hvd
import pytest
import torch

from tests.conftest import random_input
from tests.inprocess import (
    HOROVOD_DTYPES,
    DeadlockError,
    FakeBackend,
    InProcessError,
    MismatchError,
    RankFailed,
    World,
)

OPS = {"Sum": hvd.Sum, "Average": hvd.Average, "Max": hvd.Max, "Min": hvd.Min}


def one_collective(comm, launch):
    """A pipeline of one collective: launch it, yield it, return what the wait gives."""
    pending = launch(comm)
    yield pending
    return comm.wait(pending)


def run_each(world, launch_of_rank):
    comms = [world.comm(r) for r in range(world.size)]
    return world.run(
        [one_collective(c, lambda c, r=r: launch_of_rank(c, r)) for r, c in enumerate(comms)]
    )


# ---- allreduce -----------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("pre,post", [(1.0, 1.0), (0.5, 1.0), (1.0, 0.25), (3.0, -0.5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_allreduce_is_postscale_times_reduce_of_prescaled(op, pre, post, dtype):
    m = 3
    xs = [random_input(37, dtype, seed=r) for r in range(m)]
    tensors = [x.clone() for x in xs]
    out = run_each(World(m), lambda c, r: c.allreduce_(tensors[r], "t", OPS[op], pre, post))
    scaled = torch.stack([x.to(torch.float64) * pre for x in xs])
    reduced = {
        "Sum": scaled.sum(0),
        "Average": scaled.sum(0) / m,
        "Max": scaled.amax(0),
        "Min": scaled.amin(0),
    }[op]
    expected = (reduced * post).to(dtype)
    for r in range(m):
        assert out[r] is tensors[r]  # in place, as allreduce_async_
        assert out[r].dtype == dtype
        torch.testing.assert_close(out[r], expected, rtol=2e-7, atol=0)
        assert torch.equal(out[r], out[0])  # every rank the same bits


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_integer_allreduce_is_exact(dtype):
    m = 5
    big = 2**40 if dtype == torch.int64 else 2**28
    xs = [torch.tensor([big + r, -3 * r, r * r, 7], dtype=dtype) for r in range(m)]
    out = run_each(World(m), lambda c, r: c.allreduce_(xs[r].clone(), "i", hvd.Sum))
    assert out[0].dtype == dtype
    assert out[0].tolist() == [5 * big + 10, -30, 30, 35]
    # Average: the sum scaled by 1/M and truncated toward zero, as Horovod's ScaleBuffer does
    avg = run_each(World(m), lambda c, r: c.allreduce_(xs[r].clone(), "a", hvd.Average))
    assert avg[4].tolist() == [big + 2, -6, 6, 7]
    top = run_each(World(m), lambda c, r: c.allreduce_(xs[r].clone(), "x", hvd.Max))
    assert top[1].tolist() == [big + 4, 0, 16, 7]
    half = run_each(World(2), lambda c, r: c.allreduce_(torch.tensor([3, -5]), "h", hvd.Sum, 0.5))
    assert half[0].tolist() == [2, -4]  # each rank's prescaled values truncated: 1 + 1, -2 - 2


def test_integer_overflow_raises_instead_of_wrapping():
    x = torch.tensor([2**30], dtype=torch.int32)
    with pytest.raises(RankFailed, match=r"allreduce 'o': the Sum overflows torch.int32"):
        run_each(World(2), lambda c, r: c.allreduce_(x.clone(), "o", hvd.Sum))


def test_half_precision_and_bfloat16():
    m = 4
    xs = [random_input(64, torch.float16, seed=r) for r in range(m)]
    out = run_each(World(m), lambda c, r: c.allreduce_(xs[r].clone(), "h", hvd.Average))
    exact = torch.stack([x.to(torch.float64) for x in xs]).mean(0)
    assert out[0].dtype == torch.float16
    assert torch.equal(out[0], exact.to(torch.float16))  # rounded once
    # Horovod 0.28.1 refuses bfloat16 ("Tensor type torch.BFloat16Tensor is not supported")
    b = torch.ones(3, dtype=torch.bfloat16)
    with pytest.raises(RankFailed, match="torch.bfloat16 tensor, which Horovod does not support"):
        run_each(World(2), lambda c, r: c.allreduce_(b.clone(), "b", hvd.Sum))
    wider = World(2, dtypes=HOROVOD_DTYPES | {torch.bfloat16})
    out = run_each(wider, lambda c, r: c.allreduce_(b.clone(), "b", hvd.Sum))
    assert out[1].dtype == torch.bfloat16 and out[1].tolist() == [2.0] * 3


# ---- allgather and alltoall ----------------------------------------------------------------------


def test_allgather_concatenates_rows_of_every_rank_in_rank_order():
    m = 4
    rows = [2, 0, 5, 1]
    xs = [torch.full((n, 3), float(r)) + torch.arange(3.0) for r, n in enumerate(rows)]
    out = run_each(World(m), lambda c, r: c.allgather(xs[r], "g"))
    expected = torch.cat(xs)
    assert out[0].shape == (8, 3)
    for r in range(m):
        assert torch.equal(out[r], expected)
    out[0].zero_()  # every rank owns its result
    assert torch.equal(out[1], expected)


def test_alltoall_uneven_and_zero_splits():
    m = 3
    splits = [[2, 0, 1], [0, 0, 4], [1, 3, 0]]  # splits[src][dst]
    xs = [
        torch.arange(sum(s) * 2, dtype=torch.int64).view(-1, 2) + 100 * r
        for r, s in enumerate(splits)
    ]
    out = run_each(World(m), lambda c, r: c.alltoall(xs[r], splits[r], "a"))
    for dst in range(m):
        received, sizes = out[dst]
        assert sizes.dtype == torch.int32
        assert sizes.tolist() == [splits[src][dst] for src in range(m)]
        parts = []
        for src in range(m):
            start = sum(splits[src][:dst])
            parts.append(xs[src][start : start + splits[src][dst]])
        assert torch.equal(received, torch.cat(parts))
    assert out[1][0].shape == (3, 2)


# ---- matching by name ----------------------------------------------------------------------------


def test_collectives_match_by_name_not_by_order():
    m = 3
    world = World(m)
    comms = [world.comm(r) for r in range(m)]
    names = ["a", "b", "c"]

    def pipeline(r):
        order = names[r:] + names[:r]  # every rank launches in a different order
        pending = {}
        for n in order:
            value = torch.tensor([10.0 * r + names.index(n)])
            pending[n] = comms[r].allreduce_(value, n, hvd.Sum)
        for n in reversed(order):  # and waits in yet another
            yield pending[n]
        return {n: float(comms[r].wait(pending[n])) for n in names}

    out = world.run([pipeline(r) for r in range(m)])
    expected = {n: float(sum(10 * r + i for r in range(m))) for i, n in enumerate(names)}
    assert out == [expected] * m
    assert world.in_flight() == [] and world.unsynchronized() == []


def test_a_collective_left_in_flight_completes_in_a_later_run():
    world = World(2)
    comms = [world.comm(r) for r in range(2)]
    started = {}

    def start(r):  # Overlap-Local-SGD: launch an average and go on without waiting
        started[r] = comms[r].allreduce_(torch.tensor([r + 1.0]), "avg", hvd.Average)
        yield from ()
        return None

    def step_then_finish(r):
        yield started[r]
        return float(comms[r].wait(started[r]))

    world.run([start(0), start(1)])
    assert world.unsynchronized() == ["avg"]
    assert world.comm(0).ready(started[0])
    assert world.run([step_then_finish(0), step_then_finish(1)]) == [1.5, 1.5]
    assert world.unsynchronized() == []


def test_bookkeeping_stays_bounded_and_names_can_be_reused():
    world = World(3)
    for _ in range(50):
        out = run_each(world, lambda c, r: c.allreduce_(torch.tensor([1.0]), "same", hvd.Sum))
        assert float(out[0]) == 3.0
        assert world.in_flight() == [] and world.unsynchronized() == []
    assert not world._open and not world._done


def test_poll_and_synchronize_before_completion():
    world = World(3)
    backends = [FakeBackend(world, r) for r in range(3)]
    h0 = backends[0].allgather_async(torch.ones(1), "p")
    assert not backends[0].poll(h0)
    with pytest.raises(DeadlockError, match=r"allgather 'p', which ranks \[1, 2\] have not"):
        backends[0].synchronize(h0)
    h1 = backends[1].allgather_async(torch.ones(1), "p")
    h2 = backends[2].allgather_async(torch.ones(1), "p")
    assert backends[0].poll(h0) and backends[2].poll(h2)
    assert backends[1].synchronize(h1).tolist() == [1.0] * 3
    with pytest.raises(InProcessError, match="synchronized allgather 'p' twice"):
        backends[1].synchronize(h1)
    with pytest.raises(InProcessError, match="was given rank 0's"):
        backends[1].synchronize(h0)


# ---- what Horovod refuses ------------------------------------------------------------------------


def _launch_both(world, first, second):
    """Rank 0 launches first, rank 1 second (each a function of a backend)."""
    first(world.backend(0))
    second(world.backend(1))


@pytest.mark.parametrize(
    "second,pattern",
    [
        (
            lambda b: b.allgather_async(torch.ones(4), "n"),
            r"collective 'n': ranks disagree on its kind: rank 0 launched allreduce, rank 1 "
            r"allgather",
        ),
        (
            lambda b: b.allreduce_async_(torch.ones(4, dtype=torch.float64), "n", hvd.Sum, 1, 1),
            r"'n': ranks disagree on its dtype: rank 0 launched torch.float32, rank 1 "
            r"torch.float64",
        ),
        (
            lambda b: b.allreduce_async_(torch.ones(2, 2), "n", hvd.Sum, 1, 1),
            r"'n': ranks disagree on its shape: rank 0 launched \(4,\), rank 1 \(2, 2\)",
        ),
        (
            lambda b: b.allreduce_async_(torch.ones(4), "n", hvd.Max, 1, 1),
            r"'n': ranks disagree on its op: rank 0 launched Sum, rank 1 Max",
        ),
        (
            lambda b: b.allreduce_async_(torch.ones(4), "n", hvd.Sum, 2.0, 1),
            r"'n': ranks disagree on its prescale_factor: rank 0 launched 1, rank 1 2.0",
        ),
        (
            lambda b: b.allreduce_async_(torch.ones(4), "n", hvd.Sum, 1, 0.5),
            r"'n': ranks disagree on its postscale_factor: rank 0 launched 1, rank 1 0.5",
        ),
    ],
)
def test_allreduce_mismatches_name_the_collective_the_field_and_the_ranks(second, pattern):
    with pytest.raises(MismatchError, match=pattern):
        _launch_both(
            World(2), lambda b: b.allreduce_async_(torch.ones(4), "n", hvd.Sum, 1, 1), second
        )


def test_allgather_and_alltoall_mismatches():
    with pytest.raises(MismatchError, match=r"'g': ranks disagree on its shape beyond dim 0"):
        _launch_both(
            World(2),
            lambda b: b.allgather_async(torch.ones(3, 2), "g"),
            lambda b: b.allgather_async(torch.ones(3, 4), "g"),
        )
    with pytest.raises(MismatchError, match=r"rank 0: alltoall 'a' splits \[1, 1\] do not add"):
        World(2).backend(0).alltoall_async(torch.ones(3), torch.tensor([1, 1]), "a")
    with pytest.raises(MismatchError, match=r"rank 1: alltoall 'a' has 3 splits for 2 ranks"):
        World(2).backend(1).alltoall_async(torch.ones(3), torch.tensor([1, 1, 1]), "a")
    with pytest.raises(MismatchError, match=r"ranks disagree on its dtype"):
        _launch_both(
            World(2),
            lambda b: b.alltoall_async(torch.ones(2), torch.tensor([1, 1]), "a"),
            lambda b: b.alltoall_async(torch.ones(2, dtype=torch.int32), torch.tensor([1, 1]), "a"),
        )


def test_a_name_launched_twice_in_flight_and_a_tensor_changed_after_launch():
    world = World(3)
    b0 = world.backend(0)
    b0.allgather_async(torch.ones(1), "twice")
    with pytest.raises(MismatchError, match=r"rank 0 launched allgather 'twice' twice .* \[1, 2\]"):
        b0.allgather_async(torch.ones(1), "twice")
    world = World(2)
    x = torch.ones(2)
    world.backend(0).allreduce_async_(x, "race", hvd.Sum, 1.0, 1.0)
    x += 1  # Horovod may already be reading it
    with pytest.raises(MismatchError, match=r"rank 0 changed the tensor of allreduce 'race'"):
        world.backend(1).allreduce_async_(torch.ones(2), "race", hvd.Sum, 1.0, 1.0)


# ---- World.run -----------------------------------------------------------------------------------


def test_deadlock_names_what_each_rank_waits_on_and_who_is_missing():
    world = World(3)
    comms = [world.comm(r) for r in range(3)]

    def rank_pipeline(r):
        if r != 2:  # rank 2 skips the first collective: horovodrun would hang
            p = comms[r].allreduce_(torch.ones(1), "first", hvd.Sum)
            yield p
            comms[r].wait(p)
        if r != 0:
            p = comms[r].allgather(torch.ones(1), "second")
            yield p
            comms[r].wait(p)
        return r

    with pytest.raises(DeadlockError) as info:
        world.run([rank_pipeline(r) for r in range(3)])
    msg = str(info.value)
    assert "horovodrun would hang" in msg
    assert "rank 0: waits on allreduce 'first', not launched by rank 2 (waiting on " in msg
    assert "rank 2: waits on allgather 'second', not launched by rank 0 (waiting on " in msg
    assert "rank 1: waits on allreduce 'first', not launched by rank 2" in msg


def test_a_failing_rank_is_named_and_its_exception_chained():
    world = World(2)
    comms = [world.comm(r) for r in range(2)]

    def pipeline(r):
        p = comms[r].allgather(torch.ones(1), "x")
        yield p
        comms[r].wait(p)
        if r == 1:
            raise ValueError("bad payload")
        return r

    with pytest.raises(RankFailed, match="rank 1 raised ValueError: bad payload") as info:
        world.run([pipeline(0), pipeline(1)])
    assert info.value.rank == 1 and isinstance(info.value.__cause__, ValueError)
    with pytest.raises(ValueError, match="2 generators for 3 ranks"):
        World(3).run([pipeline(0), pipeline(1)])


def test_a_blocking_wait_without_a_yield_is_reported_not_hung():
    world = World(2)
    comms = [world.comm(r) for r in range(2)]

    def blocking(r):  # waits on what it never yielded
        comms[r].wait(comms[r].allgather(torch.ones(1), "blk"))
        yield from ()

    with pytest.raises(RankFailed, match=r"rank 0 waits on allgather 'blk', which ranks \[1\]"):
        world.run([blocking(0), blocking(1)])


# ---- Comm's byte counts (DESIGN.md 2.3) ----------------------------------------------------------


def test_comm_counts_payload_and_wire_bytes_at_three_ranks():
    m = 3
    world = World(m)
    comms = [world.comm(r) for r in range(m)]
    rows = [1, 4, 2]  # allgather rows per rank, 5 float32 values each
    splits = [[2, 1, 0], [0, 3, 3], [1, 1, 1]]

    def pipeline(r):
        c = comms[r]
        a = c.allreduce_(torch.ones(10), "ar", hvd.Sum)  # 40 bytes
        g = c.allgather(torch.ones(rows[r], 5), "ag")
        t = c.alltoall(torch.ones(sum(splits[r]), dtype=torch.float64), splits[r], "a2a")
        for p in (a, g, t):
            yield p
            c.wait(p)

    world.run([pipeline(r) for r in range(m)])
    gathered = sum(rows) * 5 * 4
    for r, c in enumerate(comms):
        alltoall_bytes = sum(splits[r]) * 8
        assert c.stats.collectives == 3
        assert c.stats.payload_bytes == 40 + rows[r] * 20 + alltoall_bytes
        ring = 2 * (m - 1) / m * 40  # ring all-reduce: 2(M-1)/M of the payload
        ring_gather = (m - 1) / m * gathered  # ring allgather: (M-1)/M of the gathered total
        to_others = alltoall_bytes - splits[r][r] * 8  # alltoall: what others receive
        assert c.stats.wire_bytes == pytest.approx(ring + ring_gather + to_others)


def test_comm_counts_alltoall_rows_of_a_two_dimensional_tensor():
    world = World(2)
    comms = [world.comm(r) for r in range(2)]
    splits = [[2, 1], [1, 1]]
    world.run(
        [
            one_collective(
                c, lambda c, r=r: c.alltoall(torch.ones(sum(splits[r]), 4), splits[r], "t")
            )
            for r, c in enumerate(comms)
        ]
    )
    assert comms[0].stats.wire_bytes == 1 * 16  # one row of 4 float32 values to rank 1
