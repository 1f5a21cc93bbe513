"""Data-parallel training of an MLP classifier on scikit-learn's digits, with plain Horovod or with
hvd_qpr (QPR-SGD: K local steps, compressed model differences). Every option is a flag; run it
under any horovodrun command line.

Example::

    horovodrun --gloo -np 2 -H localhost:2 python examples/train.py \\
        --optimizer hvd_qpr --compression qsgd --bits 4 --local-steps 8
    horovodrun --gloo -np 4 -H localhost:4 python examples/train.py --topology ring --local-steps 2
    horovodrun --gloo -np 4 -H localhost:4 python examples/train.py --overlap --local-steps 2

The one-line change from Horovod, as this script makes it::

    opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())
    opt = hvd_qpr.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                       compression=hvd_qpr.Compression.qsgd(bits=4), local_steps=8)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hvd_qpr  # noqa: E402
from hvd_qpr.collectives import AGGREGATIONS, ring_allreduce_wire_bytes  # noqa: E402
from hvd_qpr.gossip import GOSSIP_MODES  # noqa: E402
from hvd_qpr.topology import TOPOLOGIES  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", choices=["horovod", "hvd_qpr"], default="hvd_qpr")
    p.add_argument("--compression", default="qsgd", help=f"one of {hvd_qpr.Compression.names()}")
    p.add_argument("--bits", type=int, default=4, help="QSGD bits a level")
    p.add_argument("--bucket-size", type=int, default=512, help="QSGD values per scale")
    p.add_argument("--norm", choices=["max", "l2"], default="max")
    p.add_argument("--elias", action="store_true", help="Elias-code the QSGD levels")
    p.add_argument("--local-steps", type=int, default=8, help="K; 1 averages gradients")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--aggregation", choices=["auto", *AGGREGATIONS], default="auto")
    p.add_argument("--error-feedback", action="store_true")
    p.add_argument(
        "--topology",
        choices=list(TOPOLOGIES),
        help="gossip with neighbours instead of ring all-reduce",
    )
    p.add_argument("--consensus-step", type=float, help="gossip's gamma (default from the codec)")
    p.add_argument("--gossip", choices=list(GOSSIP_MODES), default="choco")
    p.add_argument("--overlap", action="store_true", help="Overlap-Local-SGD (tau = local steps)")
    p.add_argument("--pullback", type=float, default=0.6, help="Overlap-Local-SGD's alpha")
    p.add_argument("--anchor-momentum", type=float, default=0.0, help="Overlap-Local-SGD's beta")
    p.add_argument("--backward-passes-per-step", type=int, default=1)
    p.add_argument("--op", choices=["average", "sum"], default="average", help="gradient reduction")
    p.add_argument("--gradient-predivide-factor", type=float, default=1.0)
    p.add_argument("--bucket-bytes", type=int, default=64 * 2**20, help="fused buffer size")
    p.add_argument("--min-compress-numel", type=int, default=1024, help="smaller: uncompressed")
    p.add_argument("--link-mbit", type=float, default=1000.0, help="link for aggregation=auto")
    p.add_argument("--link-latency-us", type=float, default=100.0, help="link for aggregation=auto")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=32, help="per worker")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--hidden", type=int, default=512, help="width of the two hidden layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="rank 0 writes the result here")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1437 training and 360 test images of 8x8 pixels."""
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    return x[train], y[train], x[test], y[test]


def progress(done: int, total: int, text: str, quiet: bool) -> None:
    if quiet or hvd.rank() != 0:
        return
    width = 30
    filled = width * done // total
    print(f"[{'#' * filled}{'.' * (width - filled)}] {text}", flush=True)


def paradigm(args: argparse.Namespace) -> dict[str, object]:
    """The optimizer arguments of gossip (--topology) or Overlap-Local-SGD (--overlap)."""
    if args.topology:
        return dict(topology=args.topology, consensus_step=args.consensus_step, gossip=args.gossip)
    if args.overlap:
        return dict(overlap=True, pullback=args.pullback, anchor_momentum=args.anchor_momentum)
    return {}


def train(args: argparse.Namespace) -> dict[str, float | str]:
    """Trains on every rank; returns rank 0's summary (all ranks return theirs)."""
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits()
    shard = torch.arange(hvd.rank(), len(y_train), hvd.size())
    model = torch.nn.Sequential(
        torch.nn.Linear(64, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, args.hidden),
        torch.nn.ReLU(),
        torch.nn.Linear(args.hidden, 10),
    )
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    common = dict(
        backward_passes_per_step=args.backward_passes_per_step,
        op=hvd.Average if args.op == "average" else hvd.Sum,
        gradient_predivide_factor=args.gradient_predivide_factor,
    )
    if args.optimizer == "horovod":
        opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **common)
        label = "hvd.DistributedOptimizer, fp32"
    else:
        kwargs = {}
        if args.compression == "qsgd":
            kwargs = dict(
                bits=args.bits, bucket_size=args.bucket_size, norm=args.norm, elias=args.elias
            )
        compression = hvd_qpr.Compression.from_name(args.compression, **kwargs)
        opt = hvd_qpr.DistributedOptimizer(
            opt,
            named_parameters=model.named_parameters(),
            compression=compression,
            local_steps=args.local_steps,
            warmup_steps=args.warmup_steps,
            aggregation=args.aggregation,
            error_feedback=args.error_feedback,
            seed=args.seed,
            named_buffers=model.named_buffers(),
            bucket_bytes=args.bucket_bytes,
            min_compress_numel=args.min_compress_numel,
            link=hvd_qpr.Link(args.link_mbit * 1e6 / 8, args.link_latency_us * 1e-6),
            **paradigm(args),
            **common,
        )
        name = f"qsgd {args.bits}-bit" if args.compression == "qsgd" else args.compression
        label = f"hvd_qpr K={args.local_steps}, {name}, {opt.aggregation}"
        if args.topology:
            label = f"hvd_qpr K={args.local_steps}, {name}, gossip on a {args.topology}"
        elif args.overlap:
            label = f"hvd_qpr K={args.local_steps}, {name}, overlapped {opt.aggregation}"
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)

    baseline_wire = 0.0  # plain Horovod: the ring all-reduce formula on what it all-reduces
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    steps_per_epoch = len(shard) // args.batch_size
    g = torch.Generator().manual_seed(1000 + hvd.rank())
    start = time.perf_counter()
    passes = args.backward_passes_per_step
    for epoch in range(args.epochs):
        model.train()
        perm = shard[torch.randperm(len(shard), generator=g)]
        for i in range(steps_per_epoch):
            batch = perm[i * args.batch_size : (i + 1) * args.batch_size]
            opt.zero_grad()
            for micro in batch.chunk(passes):  # gradients of the micro-batches accumulate
                out = model(x_train[micro])
                loss = torch.nn.functional.cross_entropy(out, y_train[micro]) / passes
                loss.backward()
            opt.step()
            if args.optimizer == "horovod":
                baseline_wire += ring_allreduce_wire_bytes(grad_bytes, hvd.size())
        progress(
            epoch + 1,
            args.epochs,
            f"epoch {epoch + 1}/{args.epochs} loss {float(loss.detach()) * passes:.3f}",
            args.quiet,
        )
    if args.optimizer == "hvd_qpr":
        opt.sync_models()  # training ends with every rank holding the same model
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    if args.optimizer == "horovod":
        wire, waited = baseline_wire, float("nan")
    else:
        wire, waited = opt.comm_stats()["wire_bytes"], opt.comm_stats()["wait_seconds"]
    return {
        "method": label,
        "workers": hvd.size(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "steps": args.epochs * steps_per_epoch,
        "wall_seconds": wall,
        "wire_bytes_per_worker": wire,
        "wait_seconds": waited,
        "test_accuracy": accuracy,
    }


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    hvd.init()
    torch.set_num_threads(1)
    result = train(args)
    if hvd.rank() == 0:
        print(json.dumps(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    hvd.shutdown()


if __name__ == "__main__":
    main()
