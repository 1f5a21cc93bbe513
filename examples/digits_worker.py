"""One Horovod rank of the demo: data-parallel training of an MLP on scikit-learn's digits with
``hvd.DistributedOptimizer``, measuring on every step what the same gradients would cost on the
wire as 4-bit QSGD (bit-packed, and Elias-coded) with ``hvd_qpr.ops``.

Run through ``examples/demo.py`` (or ``horovodrun --gloo -np 2 python examples/digits_worker.py``).
"""

from __future__ import annotations

import argparse

import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits

import hvd_qpr.ops as ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=32, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--bits", type=int, default=4)
    args = parser.parse_args()

    hvd.init()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16
    y = torch.tensor(data.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = order[:360], order[360:]
    shard = train[hvd.rank() :: hvd.size()]

    model = torch.nn.Sequential(
        torch.nn.Linear(64, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 512),
        torch.nn.ReLU(),
        torch.nn.Linear(512, 10),
    )
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9),
        named_parameters=model.named_parameters(),
    )

    fp32_bytes = packed_bytes = elias_bytes = steps = 0
    g = torch.Generator().manual_seed(1 + hvd.rank())
    for _epoch in range(args.epochs):
        perm = shard[torch.randperm(len(shard), generator=g)]
        for start in range(0, len(perm) - args.batch_size + 1, args.batch_size):
            batch = perm[start : start + args.batch_size]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.synchronize()  # the averaged fp32 gradients, as Horovod sent them
            for p in model.parameters():
                q = ops.quantize(p.grad, args.bits, 512, "max", seed=steps)
                fp32_bytes += p.grad.numel() * 4
                packed_bytes += q.packed.numel() + 4 * q.scales.numel()
                elias_bytes += ops.elias_encode(q).numel()
            with opt.skip_synchronize():
                opt.step()
            steps += 1

    model.eval()
    with torch.no_grad():
        accuracy = (model(x[test]).argmax(1) == y[test]).float().mean().item()
    if hvd.rank() == 0:
        params = sum(p.numel() for p in model.parameters())
        print(f"workers {hvd.size()}, MLP of {params} parameters, {steps} steps a worker")
        print(f"test accuracy with hvd.DistributedOptimizer (fp32 gradients): {accuracy:.3f}")
        print("gradient payload each worker hands to Horovod per step, on these gradients:")
        for name, total in (
            ("fp32 (plain Horovod)", fp32_bytes),
            (f"QSGD {args.bits}-bit, bit-packed", packed_bytes),
            (f"QSGD {args.bits}-bit, Elias-coded", elias_bytes),
        ):
            print(
                f"  {name:32s} {total / steps / 1e3:9.1f} kB  "
                f"({8 * total / steps / params:.2f} bits/param, {total / fp32_bytes:.1%} of fp32)"
            )
        print(
            "Training with the compressed payloads (hvd_qpr.DistributedOptimizer, QPR-SGD) arrives "
            "with the distributed-optimizer issue; this run shows the kernels on real gradients."
        )
    hvd.shutdown()


if __name__ == "__main__":
    main()
