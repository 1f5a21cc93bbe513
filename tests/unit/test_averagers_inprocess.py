"""Every averager, and the gradient path, through hvd_qpr.DistributedOptimizer on the in-process
communicator at M = 1, 2, 3, 4, 5, 8, against the single-process simulations of
tests/parallel/simulation.py (which restate DESIGN.md 2.3-2.5 from hvd_qpr.reference).

The horovodrun tests (tests/parallel) prove the Horovod wiring; these run every world size and
mode in a few seconds, with the fake matching collectives by name and refusing what Horovod would
refuse or hang on."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import hvd_qpr
from hvd_qpr.compression import Compression as C
from hvd_qpr.gossip import Gossip, GossipGroup, GossipState
from tests.inprocess import RankFailed, World
from tests.lockstep import Lockstep
from tests.parallel.simulation import (
    OverlapSimulation,
    RecordingQSGD,
    Simulation,
    SmallNet,
    random_batch,
    simulate_gossip,
)

WORLDS = (1, 2, 3, 4, 5, 8)


def make_net() -> SmallNet:
    torch.manual_seed(1234)
    return SmallNet(12, 40, 10, frozen=3)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(rank, step, 8, 12, 10)


def sgd(params):
    return torch.optim.SGD(params, lr=0.2, momentum=0.9)


def lockstep(m: int, model: torch.nn.Module, **kwargs) -> Lockstep:
    """M copies of model, each wrapped with the same arguments (callables of the rank are
    called per rank: every rank needs its own compressor state)."""

    def make_optimizer(net: torch.nn.Module, backend: object) -> torch.optim.Optimizer:
        args = {k: v(backend.rank) if callable(v) else v for k, v in kwargs.items()}
        return hvd_qpr.DistributedOptimizer(
            sgd(net.parameters()), net.named_parameters(), process_set=backend, **args
        )

    return Lockstep(World(m), lambda rank: copy.deepcopy(model), make_optimizer)


def assert_close_to(group: Lockstep, expected: list[list[torch.Tensor]], why: str) -> None:
    for rank in range(group.world.size):
        mine = [p for p in group.models[rank].parameters() if p.requires_grad]
        for p, q in zip(mine, expected[rank], strict=True):
            gap = (p - q).abs().max()
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-6), f"{why}: rank {rank} off by {gap}"


# ---- ring all-reduce: PR-SGD and QPR-SGD in every mode ------------------------------------------

RING_CASES = [
    (None, None, 3, 2),  # PR-SGD after a warm-up of averaged gradients
    ("packed-sum", 4, 3, 0),
    ("scatter-gather", 4, 3, 0),
    ("allgather", 4, 3, 0),
    ("packed-sum", 2, 2, 1),
]


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize(("mode", "bits", "k", "warmup"), RING_CASES)
def test_ring_allreduce_equals_the_simulation(m, mode, bits, k, warmup):
    model = make_net()
    sim = Simulation(
        model,
        sgd,
        batch,
        F.cross_entropy,
        m,
        k,
        warmup,
        bits=bits,
        mode=mode or "packed-sum",
        min_compress_numel=1,
    )
    group = lockstep(
        m,
        model,
        compression=(lambda r: RecordingQSGD(bits=bits)) if bits else C.none,
        local_steps=k,
        warmup_steps=warmup,
        aggregation=mode or "auto",
        min_compress_numel=1,
    )
    for step in range(2 * k + warmup + 1):
        group.step(step, batch, F.cross_entropy)
        sim.step()
        assert_close_to(group, [sim.params(r) for r in range(m)], f"{mode} step {step}")
    if bits is not None:
        for rank, opt in enumerate(group.opts):
            # an empty chunk (M buckets-worth chunks of fewer buckets) is framed, not encoded
            sent = opt._qpr_compressor.sent
            expected = [payload for payload in sim.sent[rank] if payload.numel()]
            assert len(sent) == len(expected)
            assert all(torch.equal(a, b) for a, b in zip(sent, expected, strict=True))


@pytest.mark.parametrize("m", WORLDS)
def test_gradient_path_averages_gradients_before_each_step(m):
    """local_steps=1 with no compression is the average of the gradients before every step
    (the simulation's warm-up), unused parameters included."""
    model = make_net()
    steps = 3
    sim = Simulation(model, sgd, batch, F.cross_entropy, m, 1, steps, min_compress_numel=1)
    group = lockstep(m, model)
    for step in range(steps):
        group.step(step, batch, F.cross_entropy)
        sim.step()
        assert_close_to(group, [sim.params(r) for r in range(m)], f"step {step}")


@pytest.mark.parametrize("m", (2, 3, 5))
@pytest.mark.parametrize(
    ("compression", "error_feedback", "mode", "k"),
    [
        (C.fp16, False, "auto", 1),
        (lambda r: C.qsgd(bits=4), False, "packed-sum", 1),
        (lambda r: C.qsgd(bits=3, elias=True), True, "scatter-gather", 2),
        (lambda r: C.topk(0.05), True, "gtopk", 2),
        (lambda r: C.topk(0.05), True, "gtopk", 1),
        (lambda r: C.adaptive_topk(), True, "allgather", 2),
        (lambda r: C.terngrad(), False, "allgather", 1),
        (lambda r: C.efsign(), True, "auto", 3),
    ],
)
def test_every_compressor_and_mode_keeps_the_ranks_together(
    m, compression, error_feedback, mode, k
):
    model = make_net()
    group = lockstep(
        m,
        model,
        compression=compression,
        error_feedback=error_feedback,
        aggregation=mode,
        local_steps=k,
        min_compress_numel=16,
    )
    before = group.flat_params(0)
    for step in range(2 * k):
        group.step(step, batch, F.cross_entropy)
    table = torch.stack([group.flat_params(r) for r in range(m)])
    assert bool((table == table[0]).all()), "ranks differ after a round"
    assert not torch.equal(before, table[0]), "nothing trained"
    assert all(opt.comm_stats()["payload_bytes"] > 0 for opt in group.opts)
    if error_feedback:
        assert all(opt.state_dict()["hvd_qpr"]["residuals"] for opt in group.opts)


@pytest.mark.parametrize("m", (1, 2, 3, 4))
def test_sync_models_is_a_round_and_a_second_one_is_not(m):
    group = lockstep(m, make_net(), compression=lambda r: C.qsgd(bits=5), local_steps=4)
    group.train(range(3), batch, F.cross_entropy)
    group.sync_models()
    table = torch.stack([group.flat_params(r) for r in range(m)])
    assert bool((table == table[0]).all())
    assert all(opt.state_dict()["hvd_qpr"]["round"] == 1 for opt in group.opts)
    group.sync_models()  # nothing to average: no collective, nothing changes
    assert torch.equal(table[0], group.flat_params(0))
    assert group.world.in_flight() == []


def test_ranks_that_disagree_all_raise_the_same_error():
    model = make_net()
    with pytest.raises(RankFailed, match="ranks disagree on local_steps"):
        lockstep(3, model, local_steps=lambda r: 4 if r == 2 else 2)


def test_nan_in_one_ranks_model_raises_on_every_rank():
    group = lockstep(3, make_net(), compression=lambda r: C.qsgd(bits=4), local_steps=2)
    group.step(0, batch, F.cross_entropy)
    with torch.no_grad():
        group.models[1].fc1.weight[0, 0] = float("nan")
    rounds = [opt._qpr_step() for opt in group.opts]
    for rank, model in enumerate(group.models):
        group.opts[rank].zero_grad()
        x, y = batch(rank, 1)
        F.cross_entropy(model(x), y).backward()
    with pytest.raises(RankFailed, match=r"fc1.weight' holds NaN or Inf on rank\(s\) \[1\]"):
        group.world.run(rounds)


# ---- gossip -------------------------------------------------------------------------------------


def _topologies(m: int) -> list[tuple[str, object, int | None, float, str]]:
    cases = [
        ("ring none", "ring", None, 1.0, "choco"),
        ("ring 4-bit", "ring", 4, 0.5, "choco"),
        ("exponential 2-bit", "exponential", 2, 0.7, "choco"),
        ("ring baseline 4-bit", "ring", 4, 1.0, "quantized-average"),
    ]
    if m & (m - 1) == 0:
        cases.append(("one-peer 4-bit", "one-peer", 4, 0.5, "choco"))
    if m in (4, 8):
        cases.append(("torus 4-bit", "torus", 4, 0.5, "choco"))
    custom = torch.full((m, m), 0.1, dtype=torch.float64)
    custom += torch.eye(m, dtype=torch.float64) * (1 - 0.1 * m)
    if m <= 8:
        cases.append(("matrix 8-bit", custom, 8, 0.9, "choco"))
    return cases


@pytest.mark.parametrize("m", WORLDS)
def test_gossip_rounds_equal_the_simulation(m):
    n = 1013
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(70 + r)) for r in range(m)]
    for tag, spec, bits, gamma, mode in _topologies(m):
        topology = hvd_qpr.make_topology(spec, m)
        world = World(m)
        comms = [world.comm(r) for r in range(m)]
        states = [GossipState(topology, r, gamma, mode, seed=3) for r in range(m)]
        groups = [[GossipGroup("g", n, None if bits is None else C.qsgd(bits=bits))] for _ in xs]
        ranks = list(zip(states, groups, comms, strict=True))
        world.run([s.start(g, [x], c) for (s, g, c), x in zip(ranks, xs, strict=True)])
        values = [[x] for x in xs]
        for r in range(3):
            values = world.run(
                [s.round(g, v, c, r) for (s, g, c), v in zip(ranks, values, strict=True)]
            )
        expected = simulate_gossip(
            xs, topology.weights, 3, bits, gamma, mode, seed=3, time_varying=topology.period > 1
        )
        for rank in range(m):
            gap = (values[rank][0] - expected[rank]).abs().max()
            assert bool(gap <= 1e-6), f"M={m} {tag}: rank {rank} off by {gap:.3g}"


@pytest.mark.parametrize("m", WORLDS)
def test_gossip_on_the_complete_graph_is_pr_sgd(m):
    """Exact gossip on the complete graph every K steps is PR-SGD with the same K."""
    results = []
    for kwargs in (dict(topology="complete"), dict()):
        group = lockstep(m, make_net(), local_steps=2, **kwargs)
        group.train(range(6), batch, F.cross_entropy)
        results.append(torch.stack([group.flat_params(r) for r in range(m)]))
    gap = (results[0] - results[1]).abs().max()
    assert bool(gap <= 1e-5), f"complete-graph gossip differs from PR-SGD by {gap:.3g}"


def test_gossip_is_the_averager_of_a_topology():
    group = lockstep(4, make_net(), local_steps=2, topology="ring")
    assert isinstance(group.opts[0]._qpr_averager, Gossip)
    assert group.opts[0].aggregation == "gossip" and group.opts[0].topology.name == "ring"


# ---- Overlap-Local-SGD --------------------------------------------------------------------------

OVERLAP_CASES = [(None, "auto", 2, 0.0), (4, "allgather", 2, 0.5), (2, "packed-sum", 3, 0.3)]


@pytest.mark.parametrize("m", WORLDS)
@pytest.mark.parametrize(("bits", "mode", "tau", "beta"), OVERLAP_CASES)
def test_overlap_equals_the_simulation(m, bits, mode, tau, beta):
    model = make_net()
    sim = OverlapSimulation(
        model,
        sgd,
        batch,
        F.cross_entropy,
        m,
        tau,
        bits=bits,
        mode=mode,
        min_compress_numel=1,
        alpha=0.6,
        beta=beta,
    )
    group = lockstep(
        m,
        model,
        compression=C.none if bits is None else (lambda r: C.qsgd(bits=bits)),
        aggregation=mode,
        local_steps=tau,
        overlap=True,
        pullback=0.6,
        anchor_momentum=beta,
        min_compress_numel=1,
    )
    for step in range(4 * tau + 1):
        group.step(step, batch, F.cross_entropy)
        sim.step()
    for rank in range(m):
        mine = [p for p in group.models[rank].parameters() if p.requires_grad]
        for p, q in zip(mine, sim.params(rank), strict=True):
            assert bool((p - q).abs().max() <= 1e-5), f"rank {rank} off by {(p - q).abs().max()}"
    group.sync_models()  # finishes the average still in flight
    assert group.world.in_flight() == []


def test_gradient_hooks_launch_during_the_backward_pass():
    """At K = 1 each gradient's all-reduce starts from its hook, overlapping the rest of the
    backward pass (Horovod's design), before step() waits for them."""
    group = lockstep(2, make_net())
    x, y = batch(0, 0)
    F.cross_entropy(group.models[0](x), y).backward()
    launched = group.world.in_flight()
    assert "hvd_qpr.grad.fc1.weight" in launched and "hvd_qpr.grad.fc2.bias" in launched
    assert "hvd_qpr.grad.unused" not in launched  # no gradient: launched by synchronize()
    x, y = batch(1, 0)
    F.cross_entropy(group.models[1](x), y).backward()
    group.world.run([opt._qpr_step() for opt in group.opts])
    assert group.world.in_flight() == []
    assert torch.equal(group.flat_params(0), group.flat_params(1))


@pytest.mark.parametrize("m", (2, 3))
@pytest.mark.parametrize("kwargs", [dict(), dict(topology="ring"), dict(overlap=True)])
def test_floating_point_buffers_are_averaged_and_counters_left_alone(m, kwargs):
    """BatchNorm's running statistics are averaged with the model (every paradigm: at the round
    or at sync_models); its integer batch counter stays local."""

    def make_model(rank: int) -> torch.nn.Module:
        torch.manual_seed(5)
        return torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.BatchNorm1d(20))

    def make_optimizer(net: torch.nn.Module, backend: object) -> torch.optim.Optimizer:
        return hvd_qpr.DistributedOptimizer(
            sgd(net.parameters()),
            net.named_parameters(),
            process_set=backend,
            named_buffers=net.named_buffers(),
            local_steps=2,
            **kwargs,
        )

    group = Lockstep(World(m), make_model, make_optimizer)
    loss = lambda out, y: out.pow(2).mean()  # noqa: E731
    group.step(0, batch, loss)
    group.step(1, batch, loss)
    group.sync_models()
    means = [model[1].running_mean for model in group.models]
    assert not torch.equal(means[0], torch.zeros(20))
    assert all(torch.allclose(mean, means[0], atol=1e-7) for mean in means)
    assert all(int(model[1].num_batches_tracked) == 2 for model in group.models)
