"""Checks of hvd_qpr.DistributedOptimizer, run by every rank of one horovodrun launch.

Every check runs on every rank in the same order (they all use collectives); a failed comparison
is recorded and reported at the end instead of raised, so the other ranks never wait on a rank
that left. Output: "rank R/M: PASS name" or "rank R/M: FAIL name: why" lines.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import hvd_qpr  # noqa: E402
from hvd_qpr import collectives  # noqa: E402
from tests.parallel.simulation import RecordingQSGD, Simulation, SmallNet, random_batch  # noqa: E402
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


def make_net() -> SmallNet:
    torch.manual_seed(1234)
    return SmallNet(24, 48, 40, frozen=7)


def batch(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return random_batch(rank, step, 16, 24, 40)


def train_step(model, opt, step: int, clip: bool = False, passes: int = 1) -> None:
    opt.zero_grad()
    for i in range(passes):  # gradients of several micro-batches accumulate
        x, y = batch(RANK, step * passes + i)
        F.cross_entropy(model(x), y).backward()
    if clip:
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        with opt.skip_synchronize():
            opt.step()
    else:
        opt.step()


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_all_ranks(model, name: str) -> bool:
    table = hvd.allgather(flat_params(model)[None], name=name)
    return bool((table == table[0]).all())


# ---- local_steps=1, compression none: Horovod's optimizer, bit for bit --------------------------


def equals_horovod(make_opt, clip: bool, tag: str, passes: int = 1) -> None:
    ref_model, our_model = make_net(), make_net()
    ref_opt = hvd.DistributedOptimizer(
        make_opt(ref_model.parameters()),
        named_parameters=ref_model.named_parameters(),
        backward_passes_per_step=passes,
    )
    our_opt = hvd_qpr.DistributedOptimizer(
        make_opt(our_model.parameters()),
        named_parameters=our_model.named_parameters(),
        backward_passes_per_step=passes,
    )
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    our_sched = torch.optim.lr_scheduler.StepLR(our_opt, step_size=2, gamma=0.5)
    for step in range(6):
        train_step(ref_model, ref_opt, step, clip, passes)
        ref_sched.step()
        train_step(our_model, our_opt, step, clip, passes)
        our_sched.step()
    check(isinstance(our_opt, type(make_opt([torch.zeros(1, requires_grad=True)]))), "type")
    check(our_opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"], "scheduler steps")
    a, b = flat_params(ref_model), flat_params(our_model)
    if SIZE == 2:
        check(torch.equal(a, b), f"{tag}: differs from hvd by {(a - b).abs().max():.3g}")
    else:
        # Horovod's fused ring sums differ in order between the two runs: 1e-6 relative to the
        # parameters' scale
        gap = (a - b).abs().max()
        check(bool(gap <= 1e-6 * a.abs().max()), f"{tag}: differs from hvd by {gap:.3g}")
    check(same_on_all_ranks(our_model, f"eq.{tag}"), "ranks differ")


def check_equals_horovod() -> None:
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=1e-4)  # noqa: E731
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    equals_horovod(sgd, clip=False, tag="sgd")
    equals_horovod(adam, clip=False, tag="adam")
    equals_horovod(sgd, clip=True, tag="sgd-clip")
    equals_horovod(sgd, clip=False, tag="sgd-2-passes", passes=2)


# ---- PR-SGD and QPR-SGD against the single-process simulation ----------------------------------


def check_simulation(mode: str | None, bits: int | None, k: int, warmup: int) -> None:
    steps = 2 * k + warmup + 1
    model = make_net()
    sgd = lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)  # noqa: E731
    # Every tensor is compressed: uncompressed ones would be summed by Horovod's ring in an order
    # the simulation cannot reproduce at M > 2, and later rounds' inputs would differ by rounding.
    min_numel = 1
    sim = Simulation(
        model,
        sgd,
        batch,
        F.cross_entropy,
        SIZE,
        k,
        warmup,
        bits=bits,
        mode=mode or "packed-sum",
        min_compress_numel=min_numel,
    )
    comp = hvd_qpr.Compression.none if bits is None else RecordingQSGD(bits=bits)
    ours = copy.deepcopy(model)
    opt = hvd_qpr.DistributedOptimizer(
        sgd(ours.parameters()),
        ours.named_parameters(),
        compression=comp,
        local_steps=k,
        warmup_steps=warmup,
        aggregation=mode or "auto",
        seed=0,
        min_compress_numel=min_numel,
    )
    for step in range(steps):
        train_step(ours, opt, step)
        sim.step()
        synced = step + 1 >= warmup and (step + 1 - warmup) % k == 0 and step + 1 > warmup
        if step < warmup or synced:
            tag = f"sim.{mode}.{bits}.{step}"
            check(same_on_all_ranks(ours, tag), f"step {step}: ranks differ after averaging")
            mine = [p for p in ours.parameters() if p.requires_grad]
            for p, q in zip(mine, sim.params(RANK), strict=True):
                check(
                    torch.allclose(p, q, rtol=1e-5, atol=1e-6),
                    f"step {step}: differs from the simulation by {(p - q).abs().max():.3g}",
                )
    if bits is not None:
        expected = sim.sent[RANK]
        check(len(comp.sent) == len(expected), f"{len(comp.sent)} payloads, {len(expected)}")
        for i, (a, b) in enumerate(zip(comp.sent, expected, strict=True)):
            check(torch.equal(a, b), f"payload {i} differs from the simulation's levels")


# ---- sync_models and several fused buckets ------------------------------------------------------


def check_sync_models_and_buckets() -> None:
    model = make_net()
    opt = hvd_qpr.DistributedOptimizer(
        torch.optim.Adam(model.parameters(), lr=1e-2),
        model.named_parameters(),
        compression=hvd_qpr.Compression.qsgd(bits=5, bucket_size=100),
        local_steps=4,
        aggregation="scatter-gather",
        error_feedback=True,
        bucket_bytes=4 * 1500,  # fc1.weight and fc2.weight in buckets of their own
        min_compress_numel=1000,
    )
    for step in range(3):
        train_step(model, opt, step)
    check(not same_on_all_ranks(model, "sync.before"), "ranks equal before averaging")
    opt.sync_models()
    check(same_on_all_ranks(model, "sync.after"), "sync_models left ranks apart")
    check(opt.state_dict()["hvd_qpr"]["round"] == 1, "sync_models is a round")
    before = flat_params(model)
    opt.sync_models()  # nothing to average: no collective, nothing changes
    check(torch.equal(before, flat_params(model)), "a second sync_models changed the model")
    for step in range(3, 7):  # the next round has its own K local steps
        train_step(model, opt, step)
    check(opt.state_dict()["hvd_qpr"]["round"] == 2, "round after K more steps")
    check(same_on_all_ranks(model, "sync.k"), "ranks differ after the next average")
    names = sorted(opt.state_dict()["hvd_qpr"]["residuals"])
    check(names == ["fc1.weight", "fc2.weight"], f"residuals of {names}")


# ---- sparsifiers and low-bit compressors --------------------------------------------------------


def check_sparsifiers() -> None:
    C = hvd_qpr.Compression
    comm = collectives.Comm(hvd.global_process_set)
    for comp in (C.topk(0.05), C.efsign(bucket_size=64)):  # nothing is lost
        ef = hvd_qpr.ErrorFeedback(comp)
        g = torch.Generator().manual_seed(RANK + 11)
        x = torch.randn(1013, generator=g)
        pipeline = collectives.allgather(x, ef, comm, f"lost.{comp.name}", [("x", 1013)], RANK)
        mean = collectives.finish(pipeline)
        total_in = hvd.allreduce(x, op=hvd.Sum, name=f"lost.in.{comp.name}")
        left = hvd.allreduce(ef.residuals["x"], op=hvd.Sum, name=f"lost.res.{comp.name}")
        gap = (mean * SIZE + left - total_in).abs().max()
        check(bool(gap < 1e-4), f"{comp}: applied + residuals differ from the inputs by {gap}")
    runs = [
        (C.topk(0.1), True, 1),
        (C.topk(0.1, approximate=True), True, 2),
        (C.randomk(0.2), False, 2),
        (C.terngrad(), False, 1),
        (C.terngrad(), False, 2),
        (C.efsign(), True, 1),
        (C.efsign(), True, 2),
    ]
    for i, (comp, ef, k) in enumerate(runs):
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            compression=comp,
            error_feedback=ef,
            local_steps=k,
        )
        before = flat_params(model)
        for step in range(2):
            train_step(model, opt, step)
        check(same_on_all_ranks(model, f"sparse.{i}"), f"{comp} K={k}: ranks differ")
        check(not torch.equal(before, flat_params(model)), f"{comp} K={k}: nothing changed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_net()
        distributed_sgd(
            model,
            lr=0.1,
            compression=C.efsign(),
        )
    check(any("error feedback" in str(w.message) for w in caught), "efsign alone did not warn")


# ---- gTop-k against a single-process simulation of the same exchange tree ------------------------


def _merge(a: dict, b: dict, k: int) -> dict:
    """Sparse sum (float32 additions, a's value first) cut to the k largest magnitudes."""
    out = dict(a)
    for i, v in b.items():
        out[i] = float(torch.tensor(out[i], dtype=torch.float32) + v) if i in out else v
    keep = sorted(out, key=lambda i: -abs(out[i]))[:k]
    return {i: out[i] for i in keep}


def simulate_gtopk(inputs: list[torch.Tensor], k: int) -> torch.Tensor:
    vecs = []
    for x in inputs:
        top = x.abs().topk(k).indices.tolist()
        vecs.append({i: float(x[i]) for i in top})
    m = len(vecs)
    p = 1 << (m.bit_length() - 1)
    for r in range(p, m):  # the extra ranks fold in first
        vecs[r - p] = _merge(vecs[r - p], vecs[r], k)
    j = 1
    while j < p:
        vecs = [
            _merge(vecs[min(r, r ^ j)], vecs[max(r, r ^ j)], k) if r < p else vecs[r]
            for r in range(m)
        ]
        j <<= 1
    out = torch.zeros(inputs[0].numel())
    for i, v in vecs[0].items():
        out[i] = v
    return out


def check_gtopk() -> None:
    comm = collectives.Comm(hvd.global_process_set)
    n, ratio = 1013, 0.02
    inputs = [torch.randn(n, generator=torch.Generator().manual_seed(50 + r)) for r in range(SIZE)]
    comp = hvd_qpr.Compression.topk(ratio)
    ef = hvd_qpr.ErrorFeedback(comp)
    out = collectives.finish(
        collectives.gtopk(inputs[RANK], ef, comm, "gtopk.sim", [("x", n)], seed=0)
    )
    expected = simulate_gtopk(inputs, comp.k(n)) / SIZE
    check(
        torch.equal(out, expected),
        f"gtopk differs from the simulation by {(out - expected).abs().max()}",
    )
    table = hvd.allgather(out[None], name="gtopk.same")
    check(bool((table == table[0]).all()), "ranks hold different gtopk results")
    # nothing is lost: applied plus residuals equals the inputs' sum
    left = hvd.allreduce(ef.residuals["x"], op=hvd.Sum, name="gtopk.left")
    gap = (out * SIZE + left - sum(inputs)).abs().max()
    check(bool(gap < 1e-4), f"gtopk: applied + residuals differ from the inputs by {gap}")
    before = comm.stats.wire_bytes
    collectives.finish(collectives.gtopk(inputs[RANK], comp, comm, "gtopk.bytes", [], seed=1))
    p = 1 << (SIZE.bit_length() - 1)
    rounds = p.bit_length() - 1
    check(comm.stats.wire_bytes - before <= (rounds + 1) * 8 * comp.k(n), "gtopk sent too much")

    class RankPolicy:  # every rank proposes its own k; they agree on the largest
        def __call__(self, x):
            return 5 + RANK

    adaptive = hvd_qpr.Compression.adaptive_topk(RankPolicy())
    for mode in (collectives.gtopk, collectives.allgather):
        collectives.finish(mode(inputs[RANK], adaptive, comm, f"adaptive.{mode.__name__}", [], 2))
        check(adaptive.k(n) == 4 + SIZE, f"agreed k {adaptive.k(n)}, expected {4 + SIZE}")
    for k, comp in (
        (1, hvd_qpr.Compression.topk(0.05)),
        (3, hvd_qpr.Compression.topk(0.05)),
        (2, hvd_qpr.Compression.adaptive_topk()),
    ):
        # through the optimizer, on gradients and on model differences
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            compression=comp,
            error_feedback=True,
            aggregation="gtopk",
            local_steps=k,
        )
        for step in range(3):
            train_step(model, opt, step)
            if k == 1 or step + 1 == k:
                check(same_on_all_ranks(model, f"gtopk.train{k}.{step}"), "ranks differ")


# ---- packed-sum: the packed integer sum equals the exact sum of the fields ----------------------


def check_packed_sum_exact() -> None:
    comm = collectives.Comm(hvd.global_process_set)
    for bits in range(2, 9):
        comp = RecordingQSGD(bits=bits, bucket_size=100)
        g = torch.Generator().manual_seed(RANK * 31 + bits)
        x = torch.randn(1013, generator=g) * torch.exp(torch.randn(1013, generator=g))
        pipeline = collectives.packed_sum(x, comp, comm, f"ps{bits}", [("x", 1013)], seed=bits)
        result = collectives.finish(pipeline)
        fields = comp.sent[-1]
        table = hvd.allgather(fields[None], name=f"ps.fields{bits}")
        check(table.max() <= 2 * comp.levels_max, "a field beyond 2s")
        check(fields.max() == 2 * comp.levels_max or fields.min() == 0, "fields use the range")
        scales = hvd.allreduce(comp.bucket_scales(x), op=hvd.Max, name=f"ps.scales{bits}")
        exact = comp.dequantize_field_sum(table.sum(0), SIZE, scales) / SIZE
        check(torch.equal(result, exact), f"bits {bits}: packed-sum != exact sum of the fields")
        width = collectives.field_width(comp.levels_max, SIZE)
        words = collectives.pack_words(table.sum(0), width)
        check(torch.equal(collectives.unpack_words(words, width, 1013), table.sum(0)), "words")


# ---- resume from state_dict mid-run -------------------------------------------------------------


def check_resume() -> None:
    def build():
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.2,
            momentum=0.9,
            compression=hvd_qpr.Compression.qsgd(bits=3),
            local_steps=3,
            error_feedback=True,
            seed=7,
            # all tensors compressed: Horovod's fused float sums of uncompressed ones may round
            # differently from run to run at M > 2 (its fusion buffers vary), ours never do
            min_compress_numel=1,
        )
        return model, opt

    model, opt = build()
    saved = None
    for step in range(11):
        if step == 5:  # mid-round: 2 local steps since the last average
            saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()))
        train_step(model, opt, step)
    check(opt.state_dict()["hvd_qpr"]["residuals"], "error feedback kept no residuals")
    model2, opt2 = build()
    model2.load_state_dict(saved[0])
    opt2.load_state_dict(saved[1])
    for step in range(5, 11):
        train_step(model2, opt2, step)
    check(torch.equal(flat_params(model), flat_params(model2)), "resumed run differs")


# ---- hvd.broadcast_optimizer_state keeps its meaning -------------------------------------------


def check_broadcast_optimizer_state() -> None:
    model = make_net()
    opt = distributed_sgd(
        model,
        lr=0.1,
        momentum=0.9,
        compression=hvd_qpr.Compression.qsgd(bits=4),
        local_steps=2,
        error_feedback=True,
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    state = opt.state_dict()["hvd_qpr"]
    check(state["step"] == 0 and state["round"] == 0, "broadcast_optimizer_state advanced steps")
    check(opt.comm_stats()["collectives"] == 0, "broadcast_optimizer_state ran our collectives")
    for step in range(2):
        train_step(model, opt, step)
    residuals = {k: v.clone() for k, v in opt.state_dict()["hvd_qpr"]["residuals"].items()}
    for group in opt.param_groups:  # momentum differs per rank after local steps
        for p in group["params"]:
            if "momentum_buffer" in opt.state[p]:
                opt.state[p]["momentum_buffer"].fill_(float(RANK))
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    after = opt.state_dict()
    momenta = [s["momentum_buffer"] for s in after["state"].values() if "momentum_buffer" in s]
    check(all(bool((m == 0).all()) for m in momenta), "wrapped state not taken from the root")
    for k, v in after["hvd_qpr"]["residuals"].items():
        check(torch.equal(v, residuals[k]), f"residual of {k} overwritten")
    check(after["hvd_qpr"]["step"] == 2, "schedule advanced")


# ---- comm_stats ---------------------------------------------------------------------------------


def check_comm_stats() -> None:
    model = make_net()
    opt = hvd_qpr.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
    )
    train_step(model, opt, 0)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)
    stats = opt.comm_stats()
    config = 8 * len(opt._qpr_signature())  # the one-time configuration check (int64 fields)
    payload = 4 * numel + config
    check(stats["payload_bytes"] == payload, f"payload {stats['payload_bytes']} != {payload}")
    # ring all-reduce 2(M-1)/M of the payload; ring allgather (M-1)/M of the gathered total
    expected = 2 * (SIZE - 1) / SIZE * 4 * numel + (SIZE - 1) / SIZE * config * SIZE
    check(abs(stats["wire_bytes"] - expected) < 1e-6, f"wire {stats['wire_bytes']} != {expected}")
    check(stats["collectives"] == 6, f"{stats['collectives']} collectives, 5 parameters + check")
    opt.reset_comm_stats()
    check(opt.comm_stats()["payload_bytes"] == 0, "reset")


def check_payload_is_what_horovod_gets() -> None:
    C = hvd_qpr.Compression
    runs = [
        (C.topk(0.05), True, "allgather", 1),
        (C.topk(0.05, approximate=True), True, "gtopk", 2),
        (C.adaptive_topk(), True, "gtopk", 1),
        (C.randomk(0.2), False, "allgather", 2),
        (C.terngrad(), False, "auto", 1),
        (C.efsign(), True, "allgather", 2),
        (C.qsgd(bits=4, elias=True), False, "allgather", 2),
        (C.qsgd(bits=2), False, "packed-sum", 2),
        (C.qsgd(bits=4), False, "scatter-gather", 2),
    ]
    for i, (comp, ef, mode, k) in enumerate(runs):
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            compression=comp,
            error_feedback=ef,
            aggregation=mode,
            local_steps=k,
            min_compress_numel=64,
        )
        with HandedToHorovod() as handed:
            for step in range(2 * k):
                train_step(model, opt, step)
        stats = opt.comm_stats()
        what = f"{comp} {mode} K={k}"
        check(
            stats["payload_bytes"] == handed.payload,
            f"{what}: payload {stats['payload_bytes']} counted, {handed.payload} handed to Horovod",
        )
        wire = handed.total_wire(str(i))
        check(
            abs(stats["wire_bytes"] - wire) <= 1e-6 * wire,
            f"{what}: wire {stats['wire_bytes']} counted, {wire} by DESIGN.md 2.3",
        )


# ---- buffers are averaged at each model average --------------------------------------------------


def check_buffers() -> None:
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.BatchNorm1d(32))
    opt = distributed_sgd(
        model,
        lr=0.1,
        local_steps=2,
        named_buffers=model.named_buffers(),
    )
    for step in range(2):
        opt.zero_grad()
        x, _ = batch(RANK, step)
        model(x).square().mean().backward()
        if step == 1:
            before = model[1].running_mean.clone()
        opt.step()
    mean = hvd.allreduce(before, op=hvd.Average, name="bn.expected")
    check(torch.allclose(model[1].running_mean, mean), "running_mean not averaged")
    table = hvd.allgather(model[1].running_var[None], name="bn.var")
    check(bool((table == table[0]).all()), "running_var differs across ranks")


# ---- errors on every rank, never a hang ---------------------------------------------------------


def check_mismatches() -> None:
    last = RANK == SIZE - 1

    def mismatched(**kwargs):
        def go():
            model = make_net()
            opt = distributed_sgd(model, lr=0.1, **kwargs)
            train_step(model, opt, 0)

        return go

    k = 4 if last else 2
    expect_error(mismatched(local_steps=k), ValueError, "ranks disagree on local_steps")
    comp = hvd_qpr.Compression.qsgd(bits=2 if last else 4)
    expect_error(mismatched(compression=comp, local_steps=2), ValueError, "disagree on compression")

    def shapes():
        torch.manual_seed(0)
        model = torch.nn.Linear(24, 40 + (1 if last else 0))
        opt = hvd_qpr.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters()
        )
        opt.zero_grad()
        model(torch.randn(2, 24)).sum().backward()
        opt.step()

    expect_error(shapes, ValueError, "disagree on parameter names, shapes and dtypes")


def check_nan_model_difference() -> None:
    model = make_net()
    opt = distributed_sgd(
        model,
        lr=0.1,
        compression=hvd_qpr.Compression.qsgd(bits=4),
        local_steps=2,
    )

    def go():
        for step in range(2):
            opt.zero_grad()
            x, y = batch(RANK, step)
            F.cross_entropy(model(x), y).backward()
            if RANK == SIZE - 1 and step == 1:
                model.fc2.weight.grad[0, 0] = float("nan")
            opt.step()

    expect_error(go, FloatingPointError, "parameter 'fc2.weight' holds NaN or Inf on rank(s)")


def check_nan_gradients_pass_through() -> None:
    for comp in (hvd_qpr.Compression.none, hvd_qpr.Compression.qsgd(bits=4)):
        model = make_net()
        opt = distributed_sgd(
            model,
            lr=0.1,
            compression=comp,
        )
        opt.zero_grad()
        x, y = batch(RANK, 0)
        F.cross_entropy(model(x), y).backward()
        if RANK == 0:
            model.fc1.weight.grad[3, 3] = float("inf")
        opt.synchronize()
        check(not bool(torch.isfinite(model.fc1.weight.grad).all()), f"{comp}: Inf lost")
        check(bool(torch.isfinite(model.fc2.weight.grad).all()), f"{comp}: NaN spread")
        with opt.skip_synchronize():
            opt.step()


def check_qsgd_refused_by_horovod() -> None:
    model = make_net()
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        named_parameters=model.named_parameters(),
        compression=hvd_qpr.Compression.qsgd(bits=4),
    )
    expect_error(lambda: train_step(model, opt, 0), ValueError, "hvd_qpr.DistributedOptimizer")
    # Horovod's own compressors are accepted by ours
    model = make_net()
    opt = distributed_sgd(
        model,
        lr=0.1,
        compression=hvd.Compression.fp16,
        local_steps=2,
    )
    for step in range(2):
        train_step(model, opt, step)
    check(same_on_all_ranks(model, "hvd.fp16"), "fp16 model average differs across ranks")


def main() -> None:
    run("equals_horovod", check_equals_horovod)
    run("pr_sgd_warmup", lambda: check_simulation(None, None, k=3, warmup=2))
    for mode in ("packed-sum", "scatter-gather", "allgather"):
        run(f"qpr_sgd_{mode}_4bit", lambda mode=mode: check_simulation(mode, 4, k=3, warmup=0))
    run("qpr_sgd_packed-sum_2bit", lambda: check_simulation("packed-sum", 2, k=2, warmup=1))
    run("sync_models_and_buckets", check_sync_models_and_buckets)
    run("sparsifiers", check_sparsifiers)
    run("gtopk", check_gtopk)
    run("packed_sum_exact", check_packed_sum_exact)
    run("resume", check_resume)
    run("broadcast_optimizer_state", check_broadcast_optimizer_state)
    run("comm_stats", check_comm_stats)
    run("payload_is_what_horovod_gets", check_payload_is_what_horovod_gets)
    run("buffers", check_buffers)
    run("mismatches", check_mismatches)
    run("nan_model_difference", check_nan_model_difference)
    run("nan_gradients_pass_through", check_nan_gradients_pass_through)
    run("qsgd_refused_by_horovod", check_qsgd_refused_by_horovod)
    report_and_exit()


if __name__ == "__main__":
    main()
