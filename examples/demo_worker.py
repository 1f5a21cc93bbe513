"""One rank of the main job: the same MLP on scikit-learn's digits trained with plain
``hvd.DistributedOptimizer`` (fp32 gradients every step) and with ``hvd_qpr.DistributedOptimizer``
(QPR-SGD: 8 local steps, then 4-bit QSGD model differences, through ring all-reduce, through
gossip, and overlapped with the next local steps), then one table.

Run through ``examples/demo.py`` (``make demo``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import horovod.torch as hvd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train import parser, train  # noqa: E402

QPR = ["--optimizer", "hvd_qpr", "--compression", "qsgd", "--bits", "4", "--local-steps", "8"]
RUNS = (
    ("parallel SGD (plain Horovod)", ["--optimizer", "horovod"]),
    ("QPR-SGD, ring all-reduce (hvd_qpr)", QPR),
    ("QPR-SGD, gossip on a ring with public copies (hvd_qpr)", [*QPR, "--topology", "ring"]),
    ("Overlap-Local-SGD, 4-bit averages in the background (hvd_qpr)", [*QPR, "--overlap"]),
)


def main() -> None:
    hvd.init()
    torch.set_num_threads(1)
    results = []
    for title, flags in RUNS:
        if hvd.rank() == 0:
            print(f"== {title}", flush=True)
        results.append(train(parser().parse_args([*flags, *sys.argv[1:]])))
    if hvd.rank() == 0:
        base = results[0]
        print(
            f"\n{base['workers']} workers (horovodrun --gloo, CPU), digits MLP of "
            f"{base['parameters']:,} parameters, {base['steps']} steps a worker"
        )
        header = (
            f"{'method':46s} {'wall s':>7s} {'wire MB/worker':>15s} {'less':>7s} {'test acc':>9s}"
        )
        print(header)
        print("-" * len(header))
        for r in results:
            wire = r["wire_bytes_per_worker"]
            print(
                f"{r['method']:46s} {r['wall_seconds']:7.1f} {wire / 1e6:15.3f} "
                f"{base['wire_bytes_per_worker'] / wire:6.1f}x {r['test_accuracy']:9.3f}"
            )
    hvd.shutdown()


if __name__ == "__main__":
    main()
