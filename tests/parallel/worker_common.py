"""What every horovodrun test worker shares: recorded checks (a failed check is reported at the
end instead of raised, so the other ranks never wait on a rank that left), expected errors, and a
recorder of the bytes handed to Horovod's collectives."""

from __future__ import annotations

import sys
import time
import traceback

import horovod.torch as hvd
import torch

hvd.init()
RANK, SIZE = hvd.rank(), hvd.size()
RESULTS: list[tuple[str, str | None]] = []


def check(cond: bool, why: str) -> None:
    if not cond:
        raise AssertionError(why)


def run(name: str, fn) -> None:
    try:
        fn()
        RESULTS.append((name, None))
    except Exception:
        RESULTS.append((name, traceback.format_exc().strip().splitlines()[-1]))
        traceback.print_exc()


def expect_error(fn, exc: type, pattern: str, limit: float = 60.0) -> None:
    start = time.monotonic()
    try:
        fn()
    except exc as e:
        check(pattern in str(e), f"message {str(e)!r} lacks {pattern!r}")
    else:
        raise AssertionError(f"no {exc.__name__} raised")
    check(time.monotonic() - start < limit, "took too long")


class HandedToHorovod:
    """Records the bytes of every tensor given to Horovod's asynchronous collectives, and what
    DESIGN.md 2.3 says each puts on the wire, independently of Comm's own counting."""

    def __init__(self) -> None:
        self.payload = 0
        self.wire = 0.0
        self.gathered: list[int] = []  # allgather inputs; their totals need the other ranks
        self.saved = {}

    def __enter__(self) -> HandedToHorovod:
        def nbytes(t: torch.Tensor) -> int:
            return t.numel() * t.element_size()

        def allreduce(tensor, *args, **kwargs):
            self.payload += nbytes(tensor)
            self.wire += 2 * (SIZE - 1) / SIZE * nbytes(tensor)
            return self.saved["allreduce_async_"](tensor, *args, **kwargs)

        def allgather(tensor, *args, **kwargs):
            self.payload += nbytes(tensor)
            self.gathered.append(nbytes(tensor))
            return self.saved["allgather_async"](tensor, *args, **kwargs)

        def alltoall(tensor, *args, splits=None, **kwargs):
            self.payload += nbytes(tensor)
            self.wire += nbytes(tensor) - int(splits[RANK]) * tensor.element_size()
            return self.saved["alltoall_async"](tensor, *args, splits=splits, **kwargs)

        for name, fn in (
            ("allreduce_async_", allreduce),
            ("allgather_async", allgather),
            ("alltoall_async", alltoall),
        ):
            self.saved[name] = getattr(hvd, name)
            setattr(hvd, name, fn)
        return self

    def __exit__(self, *exc) -> None:
        for name, fn in self.saved.items():
            setattr(hvd, name, fn)

    def total_wire(self, tag: str) -> float:
        sizes = torch.tensor(self.gathered, dtype=torch.int64)
        table = hvd.allgather(sizes[None], name=f"handed.{tag}")  # same count on every rank
        return self.wire + (SIZE - 1) / SIZE * float(table.sum())


def distributed_sgd(model: torch.nn.Module, lr: float, momentum: float = 0.0, **kwargs):
    """hvd_qpr.DistributedOptimizer around plain SGD over model's named parameters."""
    import hvd_qpr

    return hvd_qpr.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum),
        model.named_parameters(),
        **kwargs,
    )


def report_and_exit() -> None:
    """Prints one PASS/FAIL line a check, shuts Horovod down, exits 1 if any check failed."""
    print(f"rank {RANK}/{SIZE}: ran {len(RESULTS)} checks")
    for name, why in RESULTS:
        print(f"rank {RANK}/{SIZE}: " + (f"PASS {name}" if why is None else f"FAIL {name}: {why}"))
    sys.stdout.flush()
    hvd.shutdown()
    sys.exit(0 if all(why is None for _, why in RESULTS) else 1)
