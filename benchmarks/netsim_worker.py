"""One Horovod rank of the bandwidth-limited benchmark: trains one method and, on rank 0, writes
its curve (wall time, step, wire bytes, train loss, test accuracy) as JSON.

The clock excludes evaluation. Every ``eval_every`` steps (a multiple of every method's K, so
QPR-SGD models are averaged there) all ranks evaluate the same model and agree, with one tiny
all-reduce, whether the time budget is spent.

Run by ``benchmarks/netsim.py`` inside a worker's network namespace.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from netsim_methods import Method  # noqa: E402
from netsim_workloads import workload  # noqa: E402

import hvd_qpr  # noqa: E402
from hvd_qpr.collectives import ring_allreduce_wire_bytes  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--spec", required=True, help="the Method's fields as JSON")
    p.add_argument("--workload", default="digits")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--eval-every", type=int, default=24)
    p.add_argument("--time-budget", type=float, default=float("inf"), help="seconds")
    p.add_argument("--link-mbit", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, required=True)
    return p.parse_args(argv)


def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def averaged_copy(model: torch.nn.Module, tag: str) -> torch.nn.Module:
    """The workers' average model, for evaluating gossip and Overlap-Local-SGD, whose models
    differ between rounds, without changing their training (an uncounted all-reduce)."""
    copy_ = copy.deepcopy(model)
    with torch.no_grad():
        for name, t in copy_.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(hvd.allreduce(t, op=hvd.Average, name=f"eval.{tag}.{name}"))
    return copy_


def main() -> None:
    args = parse()
    hvd.init()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    m = Method.from_dict(json.loads(args.spec))
    data = workload(args.workload, args.hidden)
    model = data.make_model()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    link = hvd_qpr.Link(bandwidth=args.link_mbit * 1e6 / 8)
    opt = m.wrap(opt, model, link)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    rank, size = hvd.rank(), hvd.size()
    shard = torch.arange(rank, len(data.y_train), size)
    steps_per_epoch = len(shard) // args.batch_size
    grad_bytes = sum(p.numel() * (2 if m.compression == "fp16" else 4) for p in model.parameters())
    g = torch.Generator().manual_seed(1000 + rank)
    clock = compute = stepping = baseline_wire = loss_sum = 0.0
    loss_count = step = 0

    def evaluate(tag: str) -> float:
        judged = averaged_copy(model, tag) if m.mixes_locally else model
        return accuracy(judged, data.x_test, data.y_test)

    curve = [
        dict(
            time=0.0,
            step=0,
            wire_bytes=0.0,
            train_loss=None,
            test_accuracy=evaluate("start"),
        )
    ]

    def wire() -> float:
        return baseline_wire if m.optimizer == "horovod" else opt.comm_stats()["wire_bytes"]

    done = False
    for epoch in range(args.epochs):
        perm = shard[torch.randperm(len(shard), generator=g)]
        for i in range(steps_per_epoch):
            batch = perm[i * args.batch_size : (i + 1) * args.batch_size]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            clock += t2 - t0
            compute += t1 - t0
            stepping += t2 - t1
            loss_sum += loss.item()
            loss_count += 1
            step += 1
            if m.optimizer == "horovod":
                baseline_wire += ring_allreduce_wire_bytes(grad_bytes, size)
            last = epoch + 1 == args.epochs and i + 1 == steps_per_epoch
            if step % args.eval_every == 0 or last:
                if m.optimizer == "hvd_qpr" and not m.mixes_locally:
                    t0 = time.perf_counter()
                    opt.sync_models()  # a no-op when K divides eval_every
                    clock += time.perf_counter() - t0
                acc = evaluate(str(step))
                curve.append(
                    dict(
                        time=clock,
                        step=step,
                        wire_bytes=wire(),
                        train_loss=loss_sum / loss_count,
                        test_accuracy=acc,
                    )
                )
                loss_sum, loss_count = 0.0, 0
                if rank == 0:
                    print(
                        f"  {m.name:24s} step {step:5d} epoch {epoch + 1:3d}  "
                        f"{clock:7.1f} s  {wire() / 1e6:9.1f} MB  acc {acc:.3f}",
                        flush=True,
                    )
                over = torch.tensor([1.0 if clock > args.time_budget else 0.0])
                if hvd.allreduce(over, op=hvd.Max, name=f"budget.{step}").item() > 0:
                    done = True
                    break
        if done:
            break

    stats = opt.comm_stats() if m.optimizer == "hvd_qpr" else {}
    result = {
        "spec": m.spec(getattr(opt, "aggregation", None)),
        "curve": curve,
        "steps": step,
        "steps_per_epoch": steps_per_epoch,
        "wall_seconds": clock,
        "compute_seconds": compute,
        "step_seconds": stepping,
        "wait_seconds": stats.get("wait_seconds", float("nan")),
        "wire_bytes": wire(),
        "payload_bytes": stats.get("payload_bytes", float("nan")),
        "sync_rounds": (step // m.local_steps) if m.optimizer == "hvd_qpr" else step,
        "final_accuracy": curve[-1]["test_accuracy"],
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if rank == 0:
        args.out.write_text(json.dumps(result))
    hvd.shutdown()


if __name__ == "__main__":
    main()
