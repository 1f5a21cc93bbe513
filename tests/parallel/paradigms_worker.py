"""Checks of gossip (topology=...) and Overlap-Local-SGD (overlap=True), run by every rank of one
horovodrun launch (4 processes). Output as in optimizer_worker.py: "rank R/M: PASS name" lines.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hvd_qpr  # noqa: E402
from hvd_qpr import collectives  # noqa: E402
from hvd_qpr.gossip import GossipGroup, GossipState  # noqa: E402
from tests.parallel.simulation import OverlapSimulation, simulate_gossip  # noqa: E402
from tests.parallel.worker_common import (  # noqa: E402
    RANK,
    SIZE,
    HandedToHorovod,
    check,
    distributed_sgd,
    expect_error,
    report_and_exit,
    run,
)

torch.set_num_threads(1)
C = hvd_qpr.Compression


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(24, 48)
        self.fc2 = torch.nn.Linear(48, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_net(seed: int = 1234) -> Net:
    torch.manual_seed(seed)
    return Net()


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(16, 24, generator=g), torch.randint(0, 40, (16,), generator=g)


def train_step(model, opt, step: int) -> None:
    opt.zero_grad()
    x, y = batch(RANK, step)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def gathered(x: torch.Tensor, name: str) -> torch.Tensor:
    return hvd.allgather(x.reshape(1, -1), name=name)


def resumes_exactly(model, opt, make, steps: range, tag: str):
    """Saves model and optimizer, trains on through steps, trains a fresh copy resumed from the
    saved state through the same steps, and checks both end bit for bit equal. Returns the
    resumed optimizer and the saved state."""
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for step in steps:
        train_step(model, opt, step)
    opt.state_dict()  # finishes an average in flight (the model is untouched), freeing its names
    resumed = make_net()
    resumed.load_state_dict(saved_model)
    again = make(resumed)
    again.load_state_dict(saved_opt)
    for step in steps:
        train_step(resumed, again, step)
    check(torch.equal(flat_params(model), flat_params(resumed)), f"{tag}: the resumed run differs")
    return again, saved_opt


# ---- gossip: the exchange against a single-process simulation -----------------------------------


def check_gossip_mixing_equals_simulation() -> None:
    n = 1013
    xs = [torch.randn(n, generator=torch.Generator().manual_seed(70 + r)) for r in range(SIZE)]
    ring = hvd_qpr.make_topology("ring", SIZE)
    custom = torch.full((SIZE, SIZE), 0.1, dtype=torch.float64)  # any symmetric doubly stochastic
    custom += torch.eye(SIZE, dtype=torch.float64) * (1 - 0.1 * SIZE)
    cases = [
        ("ring none", ring, None, 1.0, "choco"),
        ("ring 4-bit", ring, 4, 0.5, "choco"),
        ("exponential 2-bit", hvd_qpr.make_topology("exponential", SIZE), 2, 0.7, "choco"),
        ("torus 4-bit", hvd_qpr.make_topology("torus", SIZE), 4, 0.5, "choco"),
        ("one-peer 4-bit", hvd_qpr.make_topology("one-peer", SIZE), 4, 0.5, "choco"),
        ("matrix 8-bit", hvd_qpr.make_topology(custom, SIZE), 8, 0.9, "choco"),
        ("ring baseline 4-bit", ring, 4, 1.0, "quantized-average"),
    ]
    comm = collectives.Comm(hvd.global_process_set)
    for tag, topology, bits, gamma, mode in cases:
        compressor = None if bits is None else C.qsgd(bits=bits)
        group = GossipGroup("g", n, compressor)
        state = GossipState(topology, RANK, gamma, mode, seed=3)
        x = xs[RANK]
        collectives.finish(state.start([group], [x], comm))
        rounds = 3
        for r in range(rounds):
            (x,) = collectives.finish(state.round([group], [x], comm, r))
        expected = simulate_gossip(
            xs,
            topology.weights,
            rounds,
            bits,
            gamma,
            mode,
            seed=3,
            time_varying=topology.period > 1,
        )[RANK]
        gap = (x - expected).abs().max()
        check(bool(gap <= 1e-6), f"{tag}: differs from the simulation by {gap:.3g}")
    # uncompressed, gamma = 1: one round is exactly X <- W X
    for name in ("ring", "exponential", "one-peer"):
        topology = hvd_qpr.make_topology(name, SIZE)
        state = GossipState(topology, RANK, 1.0, "choco")
        group = GossipGroup("g", n, None)
        collectives.finish(state.start([group], [xs[RANK]], comm))
        (x,) = collectives.finish(state.round([group], [xs[RANK]], comm, 0))
        wx = (topology.weights(0).to(torch.float32) @ torch.stack(xs))[RANK]
        gap = (x - wx).abs().max()
        check(bool(gap <= 1e-5), f"{name}: one round differs from W X by {gap:.3g}")


def check_gossip_complete_equals_ring_allreduce() -> None:
    """Exact gossip on the complete graph every K steps is PR-SGD with the same K."""
    results = []
    for kwargs in (dict(topology="complete"), dict()):
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            momentum=0.9,
            local_steps=2,
            **kwargs,
        )
        for step in range(6):
            train_step(model, opt, step)
        results.append(flat_params(model))
    gap = (results[0] - results[1]).abs().max()
    check(bool(gap <= 1e-5), f"complete-graph gossip differs from PR-SGD by {gap:.3g}")
    table = gathered(results[0], "gossip.complete.same")
    check(bool((table - table[0]).abs().max() <= 1e-6), "complete-graph gossip: ranks differ")


def check_gossip_consensus_shrinks() -> None:
    """No training (lr = 0), different models: with the default consensus step the spread of the
    models shrinks every round with the error-controlled gossip, while averaging quantized models
    stalls at its quantization noise."""
    spread: dict[tuple[str, int], list[float]] = {}
    for mode, bits in (("choco", 4), ("quantized-average", 4), ("choco", 2)):
        model = make_net(seed=100 + RANK)  # every rank starts elsewhere
        opt = distributed_sgd(
            model,
            lr=0.0,
            compression=C.qsgd(bits=bits),
            topology="ring",
            gossip=mode,
            min_compress_numel=64,
        )
        tag = f"{mode}.{bits}"
        curve = [hvd_qpr.consensus_distance(gathered(flat_params(model), f"{tag}.d0"))]
        for step in range(14):
            train_step(model, opt, step)
            curve.append(
                hvd_qpr.consensus_distance(gathered(flat_params(model), f"{tag}.d{step + 1}"))
            )
        spread[mode, bits] = curve
    for key in (("choco", 4), ("choco", 2)):
        curve = spread[key]
        check(
            all(b < a for a, b in zip(curve, curve[1:], strict=False)),
            f"{key}: the consensus distance did not shrink every round: {curve}",
        )
    choco, baseline = spread["choco", 4], spread["quantized-average", 4]
    check(choco[-1] < 0.05 * choco[0], f"choco: spread {choco[-1]:.3g} from {choco[0]:.3g}")
    check(
        choco[-1] < 0.5 * baseline[-1],
        f"choco {choco[-1]:.3g} not below the quantized-average baseline {baseline[-1]:.3g}",
    )


def check_gossip_resume_and_bytes() -> None:
    def make(model):
        return distributed_sgd(
            model,
            lr=0.1,
            momentum=0.9,
            compression=C.qsgd(bits=4, elias=True),
            topology="one-peer",
            min_compress_numel=64,
        )

    model = make_net()
    opt = make(model)
    with HandedToHorovod() as handed:
        for step in range(3):
            train_step(model, opt, step)
    stats = opt.comm_stats()
    check(
        stats["payload_bytes"] == handed.payload,
        f"payload {stats['payload_bytes']} counted, {handed.payload} handed to Horovod",
    )
    wire = handed.total_wire("gossip")
    check(abs(stats["wire_bytes"] - wire) <= 1e-6 * wire, f"wire {stats['wire_bytes']} != {wire}")
    saved_opt = resumes_exactly(model, opt, make, range(3, 7), "gossip")[1]
    check(saved_opt["hvd_qpr"]["gossip"]["theirs"], "no public copies were saved")


def check_gossip_mismatch_and_bad_input() -> None:
    def build(**kwargs):
        def go():
            model = make_net()
            opt = distributed_sgd(model, lr=0.1, **kwargs)
            train_step(model, opt, 0)

        return go

    last = RANK == SIZE - 1
    expect_error(
        build(topology="exponential" if last else "ring"), ValueError, "ranks disagree on topology"
    )
    expect_error(
        build(topology="ring", consensus_step=0.3 if last else 0.5),
        ValueError,
        "ranks disagree on consensus_step",
    )
    expect_error(build(topology="ring", error_feedback=True), ValueError, "error_feedback")
    expect_error(build(topology="hypercube"), ValueError, "unknown topology 'hypercube'")
    expect_error(build(topology="ring", overlap=True), ValueError, "not both")
    expect_error(build(topology="ring", consensus_step=1.5), ValueError, "consensus_step")
    bad = torch.eye(SIZE, dtype=torch.float64) * 0.5
    expect_error(build(topology=bad), ValueError, "doubly stochastic")


# ---- Overlap-Local-SGD --------------------------------------------------------------------------


def check_overlap_alpha_zero_is_local_sgd() -> None:
    model, alone = make_net(), make_net()
    opt = distributed_sgd(
        model,
        lr=0.1,
        momentum=0.9,
        overlap=True,
        pullback=0.0,
        compression=C.qsgd(bits=4),
    )
    own = torch.optim.SGD(alone.parameters(), lr=0.1, momentum=0.9)
    for step in range(9):
        train_step(model, opt, step)
        train_step(alone, own, step)
    check(torch.equal(flat_params(model), flat_params(alone)), "alpha = 0 is not local SGD")
    opt.sync_models()


def check_overlap_equals_simulation() -> None:
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)  # noqa: E731
    for bits, mode, tau, beta in (
        (None, "auto", 2, 0.0),
        (4, "allgather", 2, 0.5),
        (2, "packed-sum", 3, 0.3),
    ):
        model = make_net()
        sim = OverlapSimulation(
            model,
            sgd,
            batch,
            F.cross_entropy,
            SIZE,
            tau,
            bits=bits,
            mode=mode,
            min_compress_numel=1,
            alpha=0.6,
            beta=beta,
        )
        ours = copy.deepcopy(model)
        opt = hvd_qpr.DistributedOptimizer(
            sgd(ours.parameters()),
            ours.named_parameters(),
            compression=C.none if bits is None else C.qsgd(bits=bits),
            aggregation=mode,
            local_steps=tau,
            overlap=True,
            pullback=0.6,
            anchor_momentum=beta,
            min_compress_numel=1,
        )
        for step in range(4 * tau + 1):
            train_step(ours, opt, step)
            sim.step()
        mine = flat_params(ours)
        opt.sync_models()  # finishes the average in flight before the next case reuses its names
        expected = torch.cat([p.detach().reshape(-1) for p in sim.params(RANK)])
        gap = (mine - expected).abs().max()
        check(bool(gap <= 1e-5), f"bits {bits} {mode} tau {tau}: differs by {gap:.3g}")


def check_overlap_with_every_aggregation() -> None:
    """Overlap-Local-SGD runs through every aggregation of the ring path (chains of two or three
    collectives advance by polling), sparse, sign and Elias payloads included."""
    cases = [
        (C.fp16, False, "auto"),
        (C.qsgd(bits=4), False, "packed-sum"),
        (C.qsgd(bits=2, elias=True), True, "scatter-gather"),
        (C.topk(0.05), True, "gtopk"),
        (C.adaptive_topk(), True, "allgather"),
        (C.terngrad(), False, "allgather"),
        (C.efsign(), True, "auto"),
    ]
    for comp, ef, mode in cases:
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            compression=comp,
            error_feedback=ef,
            aggregation=mode,
            overlap=True,
            min_compress_numel=64,
        )
        before = flat_params(model)
        for step in range(7):
            train_step(model, opt, step)
        opt.sync_models()
        table = gathered(flat_params(model), f"overlap.modes.{comp}.{mode}")
        check(bool((table == table[0]).all()), f"{comp} {mode}: ranks differ after sync_models")
        check(not torch.equal(before, flat_params(model)), f"{comp} {mode}: nothing trained")
        check(opt.comm_stats()["payload_bytes"] > 0, f"{comp} {mode}: nothing sent")


def check_overlap_resume_with_average_in_flight() -> None:
    def make(model):
        return distributed_sgd(
            model,
            lr=0.1,
            momentum=0.9,
            compression=C.qsgd(bits=4),
            aggregation="scatter-gather",
            error_feedback=True,
            overlap=True,
            local_steps=3,
            anchor_momentum=0.4,
            min_compress_numel=64,
        )

    model = make_net()
    opt = make(model)
    for step in range(7):  # sync points after steps 3 and 6: an average is in flight
        train_step(model, opt, step)
    again, saved_opt = resumes_exactly(model, opt, make, range(7, 14), "overlap")
    check(saved_opt["hvd_qpr"]["overlap"]["finished"] is not None, "no average was in flight")
    again.sync_models()
    opt.sync_models()
    table = gathered(flat_params(model), "overlap.synced")
    check(bool((table == table[0]).all()), "sync_models left the ranks different")


class WaitSteps:
    """Records, for every collective hvd_qpr launches, the training step that launched it and the
    step whose hvd.synchronize collected it (`step` is set by the training loop)."""

    def __init__(self) -> None:
        self.step = 0
        self.launched: dict[int, int] = {}
        self.waits: list[tuple[int, int]] = []  # (launch step, wait step)
        self.saved = {}

    def __enter__(self) -> WaitSteps:
        def launcher(name):
            def launch(*args, **kwargs):
                handle = self.saved[name](*args, **kwargs)
                self.launched[handle] = self.step
                return handle

            return launch

        def synchronize(handle):
            self.waits.append((self.launched.pop(handle), self.step))
            return self.saved["synchronize"](handle)

        for name in ("allreduce_async_", "allgather_async", "alltoall_async"):
            self.saved[name] = getattr(hvd, name)
            setattr(hvd, name, launcher(name))
        self.saved["synchronize"] = hvd.synchronize
        hvd.synchronize = synchronize
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(hvd, name, fn)


def check_overlap_waits_in_later_steps() -> None:
    """Blocking PR-SGD collects every average in the step that launched it; Overlap-Local-SGD
    launches the average at a sync point and collects it during the next tau steps, so it travels
    while they compute. Decided by which step waited, not by a clock (the benchmark measures the
    time saved: benchmarks/RESULTS.md, section paradigms)."""
    tau = 3
    for overlap in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(300, 200)
        opt = distributed_sgd(
            model, lr=0.01, local_steps=tau, overlap=overlap, compression=C.qsgd(bits=4)
        )
        x = torch.randn(4, 300)
        with WaitSteps() as rec:
            for step in range(4 * tau):
                rec.step = step
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
            rec.step = 4 * tau
            opt.sync_models()
        check(not rec.launched, f"collectives never collected: {rec.launched}")
        # step 0 launches the start-up checks, and step 4 * tau is sync_models()
        sync_points = list(range(tau - 1, 4 * tau, tau))
        averages = [(a, w) for a, w in rec.waits if sync_points[0] <= a < 4 * tau]
        launches = sorted({a for a, _ in averages})
        check(set(sync_points) <= set(launches), f"averages launched at {launches}")
        if not overlap:
            check(all(a == w for a, w in averages), f"blocking PR-SGD deferred a wait: {averages}")
            continue
        # each average is collected after the step that launched it, by the next sync point
        check(
            all(a < w <= (a // tau + 1) * tau + tau - 1 for a, w in averages),
            f"overlap collected an average in the step that launched it: {averages}",
        )


def check_overlap_nan_raises_everywhere() -> None:
    model = make_net()
    opt = distributed_sgd(
        model,
        lr=0.1,
        overlap=True,
        compression=C.qsgd(bits=4),
        min_compress_numel=64,
    )

    def go():
        for step in range(6):
            train_step(model, opt, step)
            if step == 1 and RANK == SIZE - 1:
                with torch.no_grad():
                    model.fc2.weight[0, 0] = float("nan")

    expect_error(go, FloatingPointError, "holds NaN or Inf")


def main() -> None:
    run("gossip_mixing_equals_simulation", check_gossip_mixing_equals_simulation)
    run("gossip_complete_equals_ring_allreduce", check_gossip_complete_equals_ring_allreduce)
    run("gossip_consensus_shrinks", check_gossip_consensus_shrinks)
    run("gossip_resume_and_bytes", check_gossip_resume_and_bytes)
    run("gossip_mismatch_and_bad_input", check_gossip_mismatch_and_bad_input)
    run("overlap_alpha_zero_is_local_sgd", check_overlap_alpha_zero_is_local_sgd)
    run("overlap_equals_simulation", check_overlap_equals_simulation)
    run("overlap_with_every_aggregation", check_overlap_with_every_aggregation)
    run("overlap_resume_with_average_in_flight", check_overlap_resume_with_average_in_flight)
    run("overlap_waits_in_later_steps", check_overlap_waits_in_later_steps)
    run("overlap_nan_raises_everywhere", check_overlap_nan_raises_everywhere)
    report_and_exit()


if __name__ == "__main__":
    main()
