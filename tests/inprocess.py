"""An in-process communicator: M simulated Horovod ranks in one process (DESIGN.md 3).

:class:`World` holds the table of collectives; :meth:`World.comm` gives each simulated rank a
real :class:`hvd_qpr.collectives.Comm` over a :class:`FakeBackend`, so the byte counting under
test is the library's own. Collectives are matched by name, as Horovod matches them, never by
the order of the calls; one completes when all M ranks have launched it, and its results are
computed then. What Horovod would refuse or hang on raises here, naming the collective, the
field and the ranks: ranks that disagree on a collective's kind, op, dtype, shape or scale
factors, a name launched twice while in flight, a wait that would never return.

:meth:`World.run` drives one pipeline generator per rank (the generators of
:mod:`hvd_qpr.collectives`: each yields the ``(kind, handle)`` it launched and waits on it when
resumed) in lockstep, resuming a rank only once what it waits on is complete.

Arithmetic, as Horovod's CPU (Gloo) operations define it: an all-reduce is
``postscale * reduce(prescale * x_r)`` with Average the sum divided by M; floating-point sums are
accumulated in float64 in rank order and rounded once to the tensor's dtype (Horovod's ring
order is unspecified, so nothing may rely on the order of a float sum); integer tensors sum
exactly (an overflow of their dtype raises instead of wrapping) and scale factors other than 1
truncate toward zero, as Horovod's ``ScaleBuffer`` does for integers.

Example:
    >>> world = World(2)
    >>> comms = [world.comm(r) for r in range(2)]
    >>> def mean(r):
    ...     pending = comms[r].allreduce_(torch.tensor([float(r)]), "x", op=hvd.Average)
    ...     yield pending
    ...     return comms[r].wait(pending)
    >>> world.run([mean(0), mean(1)])
    [tensor([0.5000]), tensor([0.5000])]
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Generator, Sequence

import horovod.torch as hvd
import torch

from hvd_qpr.collectives import Comm, CommStats

__all__ = [
    "DeadlockError",
    "FakeBackend",
    "Handle",
    "HOROVOD_DTYPES",
    "InProcessError",
    "MismatchError",
    "RankFailed",
    "World",
]

# What Horovod 0.28.1's torch adapter accepts (horovod/torch/adapter_v2.cc); bfloat16 and bool
# raise "Invalid tensor type" there, so by default they raise here too.
HOROVOD_DTYPES = frozenset(
    {
        torch.uint8,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.float16,
        torch.float32,
        torch.float64,
    }
)

_OP_NAMES = {hvd.Sum: "Sum", hvd.Average: "Average", hvd.Max: "Max", hvd.Min: "Min"}
if hasattr(hvd, "Product"):
    _OP_NAMES[hvd.Product] = "Product"


class InProcessError(RuntimeError):
    """Base of what the in-process world raises."""


class MismatchError(InProcessError):
    """Ranks launched a collective of one name with different kinds, ops, dtypes or shapes, or
    one rank launched a name twice while it was in flight."""


class DeadlockError(InProcessError):
    """A wait that would never return: some rank has not launched what another waits on."""


class RankFailed(InProcessError):
    """A rank's generator raised; the original exception is chained as ``__cause__``.

    Attributes:
        rank: the rank whose generator raised.
    """

    def __init__(self, rank: int, message: str) -> None:
        super().__init__(message)
        self.rank = rank


@dataclasses.dataclass
class _Launch:
    """One rank's side of a collective, as launched (the tensor is kept for the in-place write
    of an all-reduce, the snapshot is what the result is computed from)."""

    tensor: torch.Tensor
    snapshot: torch.Tensor
    op: object = None
    prescale_factor: float = 1.0
    postscale_factor: float = 1.0
    splits: tuple[int, ...] = ()


@dataclasses.dataclass(eq=False)
class _Collective:
    serial: int
    name: str
    kind: str
    first: int  # the rank that launched it first: the others are compared with it
    launches: dict[int, _Launch] = dataclasses.field(default_factory=dict)
    results: dict[int, object] | None = None
    synchronized: set[int] = dataclasses.field(default_factory=set)

    @property
    def complete(self) -> bool:
        return self.results is not None

    def describe(self) -> str:
        return f"{self.kind} {self.name!r}"


@dataclasses.dataclass(frozen=True, eq=False)
class Handle:
    """What a :class:`FakeBackend` returns for a launched collective (Horovod's handle)."""

    world: World
    rank: int
    collective: _Collective

    def __repr__(self) -> str:
        state = "complete" if self.collective.complete else "in flight"
        return f"Handle(rank={self.rank}, {self.collective.describe()}, {state})"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a tensor, so that comparisons see NaN payloads and signed zeros exactly."""
    # a fresh 1-D buffer: a one-element tensor may be "contiguous" with any stride
    flat = torch.empty(t.numel(), dtype=t.dtype, device=t.device).copy_(t.detach().reshape(-1))
    return flat.view(torch.uint8)


class World:
    """M simulated ranks of one process set and the table of their collectives.

    Args:
        size: M, the number of ranks.
        dtypes: tensor dtypes the collectives accept (default: those of Horovod 0.28.1, which
            has no bfloat16); pass a larger set to test arithmetic Horovod itself would refuse.

    Example:
        >>> world = World(3)
        >>> comm = world.comm(1)
        >>> comm.size, comm.rank
        (3, 1)
    """

    def __init__(self, size: int, dtypes: frozenset[torch.dtype] = HOROVOD_DTYPES) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"World: size must be a positive int, got {size!r}")
        self.size = size
        self.dtypes = frozenset(dtypes)
        self._open: dict[str, _Collective] = {}  # launched by some ranks, not all: by name
        self._done: dict[int, _Collective] = {}  # complete, not yet synchronized by every rank
        self._serials = itertools.count()

    # -- ranks -------------------------------------------------------------------------------------

    def backend(self, rank: int) -> FakeBackend:
        """The transport of one rank."""
        return FakeBackend(self, rank)

    def comm(self, rank: int, stats: CommStats | None = None) -> Comm:
        """A real :class:`~hvd_qpr.collectives.Comm` of one rank over this world.

        Example:
            >>> comms = [World(2).comm(r) for r in range(2)]
        """
        return Comm(self.backend(rank), stats)

    # -- the table ---------------------------------------------------------------------------------

    def in_flight(self) -> list[str]:
        """Names of the collectives some ranks have launched and others not yet."""
        return sorted(self._open)

    def unsynchronized(self) -> list[str]:
        """Names of the completed collectives some rank has not synchronized yet."""
        return sorted(c.name for c in self._done.values())

    def _launch(
        self,
        rank: int,
        kind: str,
        name: str,
        tensor: torch.Tensor,
        **fields: object,
    ) -> Handle:
        if not isinstance(name, str) or not name:
            raise MismatchError(
                f"rank {rank}: a {kind} needs a name (collectives are matched by name)"
            )
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"rank {rank}: {kind} {name!r} of a {type(tensor).__name__}")
        if tensor.dtype not in self.dtypes:
            raise MismatchError(
                f"rank {rank}: {kind} {name!r} of a {tensor.dtype} tensor, which Horovod "
                f"does not support (it accepts {sorted(str(d) for d in self.dtypes)})"
            )
        launch = _Launch(tensor, tensor.detach().clone(), **fields)
        if kind != "allreduce" and tensor.dim() == 0:
            raise MismatchError(f"rank {rank}: {kind} {name!r} of a 0-dimensional tensor")
        if kind == "alltoall":
            self._check_splits(rank, name, tensor, launch.splits)
        coll = self._open.get(name)
        if coll is None:
            coll = _Collective(next(self._serials), name, kind, rank)
            self._open[name] = coll
        elif rank in coll.launches:
            raise MismatchError(
                f"rank {rank} launched {coll.describe()} twice while it was in flight (Horovod "
                f"refuses a name that is already in its queue); still missing: ranks "
                f"{self._missing(coll)}"
            )
        else:
            self._check_match(coll, rank, kind, launch)
        coll.launches[rank] = launch
        if len(coll.launches) == self.size:
            del self._open[name]
            self._complete(coll)
            self._done[coll.serial] = coll
        return Handle(self, rank, coll)

    def _check_splits(
        self, rank: int, name: str, tensor: torch.Tensor, splits: tuple[int, ...]
    ) -> None:
        if len(splits) != self.size:
            raise MismatchError(
                f"rank {rank}: alltoall {name!r} has {len(splits)} splits for {self.size} ranks"
            )
        if any(s < 0 for s in splits) or sum(splits) != tensor.shape[0]:
            raise MismatchError(
                f"rank {rank}: alltoall {name!r} splits {list(splits)} do not add up to the "
                f"tensor's dim 0 ({tensor.shape[0]})"
            )

    def _check_match(self, coll: _Collective, rank: int, kind: str, launch: _Launch) -> None:
        ref = coll.launches[coll.first]

        def differ(field: str, theirs: object, mine: object) -> MismatchError:
            return MismatchError(
                f"collective {coll.name!r}: ranks disagree on its {field}: rank {coll.first} "
                f"launched {theirs}, rank {rank} {mine}"
            )

        if kind != coll.kind:
            raise differ("kind", coll.kind, kind)
        a, b = ref.snapshot, launch.snapshot
        if a.dtype != b.dtype:
            raise differ("dtype", a.dtype, b.dtype)
        if kind == "allreduce":
            if a.shape != b.shape:
                raise differ("shape", tuple(a.shape), tuple(b.shape))
            if ref.op != launch.op:
                names = (_OP_NAMES.get(ref.op, ref.op), _OP_NAMES.get(launch.op, launch.op))
                raise differ("op", *names)
            for field in ("prescale_factor", "postscale_factor"):
                if getattr(ref, field) != getattr(launch, field):
                    raise differ(field, getattr(ref, field), getattr(launch, field))
        elif a.shape[1:] != b.shape[1:]:
            raise differ("shape beyond dim 0", tuple(a.shape), tuple(b.shape))

    def _missing(self, coll: _Collective) -> list[int]:
        return [r for r in range(self.size) if r not in coll.launches]

    # -- results -----------------------------------------------------------------------------------

    def _complete(self, coll: _Collective) -> None:
        launches = [coll.launches[r] for r in range(self.size)]
        for r, launch in enumerate(launches):
            # Horovod reads the tensor at some time after the launch: changing it is a race
            if not torch.equal(_bits(launch.tensor), _bits(launch.snapshot)):
                raise MismatchError(
                    f"rank {r} changed the tensor of {coll.describe()} after launching it "
                    "(Horovod reads it at an unspecified time after the launch)"
                )
        if coll.kind == "allreduce":
            result = self._reduce(coll, launches)
            coll.results = {}
            for r, launch in enumerate(launches):
                launch.tensor.copy_(result)  # in place, as allreduce_async_
                coll.results[r] = launch.tensor
        elif coll.kind == "allgather":
            gathered = torch.cat([launch.snapshot for launch in launches])
            coll.results = {r: gathered.clone() for r in range(self.size)}
        else:
            coll.results = {r: self._received(launches, r) for r in range(self.size)}
        for launch in launches:
            launch.snapshot = launch.tensor = None  # results hold what is needed

    def _reduce(self, coll: _Collective, launches: list[_Launch]) -> torch.Tensor:
        first = launches[0]
        dtype, op = first.snapshot.dtype, first.op
        pre, post = float(first.prescale_factor), float(first.postscale_factor)
        if op == hvd.Average:
            post /= self.size
        elif op not in _OP_NAMES:
            raise MismatchError(f"{coll.describe()}: op {op!r} is not supported in process")
        floating = dtype.is_floating_point
        wide = torch.float64 if floating else torch.int64

        def scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
            if factor == 1.0:
                return t
            out = t.to(torch.float64) * factor
            return out if floating else out.trunc().to(torch.int64)

        values = [scaled(launch.snapshot.to(wide), pre) for launch in launches]
        if op in (hvd.Sum, hvd.Average):
            total = values[0].clone()
            for v in values[1:]:  # rank order
                total += v
        elif op == hvd.Max:
            total = torch.stack(values).amax(0)
        elif op == hvd.Min:
            total = torch.stack(values).amin(0)
        else:
            total = torch.stack(values).prod(0)
        total = scaled(total, post)
        if not floating:
            info = torch.iinfo(dtype)
            if total.numel() and (int(total.min()) < info.min or int(total.max()) > info.max):
                raise MismatchError(
                    f"{coll.describe()}: the {_OP_NAMES[op]} overflows {dtype} (Horovod would "
                    "wrap around silently)"
                )
        return total.to(dtype)

    def _received(self, launches: list[_Launch], rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, sizes = [], []
        for launch in launches:
            offset = sum(launch.splits[:rank])
            count = launch.splits[rank]
            rows.append(launch.snapshot[offset : offset + count])
            sizes.append(count)
        return torch.cat(rows).clone(), torch.tensor(sizes, dtype=torch.int32)

    def _synchronize(self, handle: Handle) -> object:
        coll, rank = handle.collective, handle.rank
        if not coll.complete:
            raise DeadlockError(
                f"rank {rank} waits on {coll.describe()}, which ranks {self._missing(coll)} have "
                "not launched: in one process this wait would never return (drive the ranks "
                "with World.run, which resumes a rank only once its collective is complete)"
            )
        if rank in coll.synchronized:
            raise InProcessError(f"rank {rank} synchronized {coll.describe()} twice")
        coll.synchronized.add(rank)
        result = coll.results.pop(rank)
        if len(coll.synchronized) == self.size:  # nobody needs the entry any more
            del self._done[coll.serial]
        return result

    # -- driving ranks -----------------------------------------------------------------------------

    def run(self, generators: Sequence[Generator]) -> list[object]:
        """Drives one generator per rank in lockstep and returns their values in rank order.

        A rank's generator is resumed while the collective it last yielded is complete (or
        before its first step); when it yields one that is not, the next rank goes on. A
        collective launched and never waited on stays in flight for a later ``run``.

        Args:
            generators: M generators, rank order, each yielding ``(kind, handle)`` pairs from
                its rank's :class:`~hvd_qpr.collectives.Comm`.

        Returns:
            What each generator returned.

        Raises:
            DeadlockError: a full pass over the ranks resumed none of them.
            RankFailed: a rank's generator raised (chained).

        Example:
            >>> world.run([collectives.allgather(x[r], c[r], comms[r], "b", [], 1) for r in R])
        """
        gens = list(generators)
        if len(gens) != self.size:
            raise ValueError(f"World.run: {len(gens)} generators for {self.size} ranks")
        waiting: list[Handle | None] = [None] * self.size
        done = [False] * self.size
        results: list[object] = [None] * self.size
        while not all(done):
            progressed = False
            for rank, gen in enumerate(gens):
                while not done[rank] and (
                    waiting[rank] is None or waiting[rank].collective.complete
                ):
                    progressed = True
                    try:
                        pending = next(gen)
                    except StopIteration as stop:
                        done[rank], results[rank] = True, stop.value
                        break
                    except Exception as exc:
                        raise RankFailed(
                            rank, f"rank {rank} raised {type(exc).__name__}: {exc}"
                        ) from exc
                    waiting[rank] = self._handle_of(rank, pending)
            if not progressed:
                raise DeadlockError(self._deadlock_report(waiting, done))
        return results

    def _handle_of(self, rank: int, pending: object) -> Handle:
        handle = pending[1] if isinstance(pending, tuple) and len(pending) == 2 else None
        if not isinstance(handle, Handle) or handle.world is not self or handle.rank != rank:
            raise RankFailed(
                rank, f"rank {rank} yielded {pending!r}, not a (kind, handle) of its own Comm"
            )
        return handle

    def _deadlock_report(self, waiting: list[Handle | None], done: list[bool]) -> str:
        def state(r: int) -> str:
            if done[r]:
                return "finished"
            return f"waiting on {waiting[r].collective.describe()}"

        lines = ["deadlock: no rank can go on (horovodrun would hang here)"]
        for r in range(self.size):
            if done[r]:
                lines.append(f"  rank {r}: finished")
                continue
            coll = waiting[r].collective
            missing = ", ".join(f"rank {m} ({state(m)})" for m in self._missing(coll))
            lines.append(f"  rank {r}: waits on {coll.describe()}, not launched by {missing}")
        return "\n".join(lines)


class FakeBackend:
    """One rank's transport in a :class:`World`: the backend interface of
    :class:`hvd_qpr.collectives.Comm` (``size``, ``rank``, ``included``, the three asynchronous
    collectives, ``poll``, ``synchronize``) with Horovod's meaning.

    Example:
        >>> backend = FakeBackend(World(2), 0)
        >>> Comm(backend).size
        2
    """

    def __init__(self, world: World, rank: int) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world.size:
            raise ValueError(f"FakeBackend: rank must be in 0..{world.size - 1}, got {rank!r}")
        self.world, self._rank = world, rank

    @property
    def size(self) -> int:
        return self.world.size

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def included(self) -> bool:
        return True

    def allreduce_async_(
        self,
        tensor: torch.Tensor,
        name: str,
        op: object,
        prescale_factor: float,
        postscale_factor: float,
    ) -> Handle:
        return self.world._launch(
            self._rank,
            "allreduce",
            name,
            tensor,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
        )

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Handle:
        return self.world._launch(self._rank, "allgather", name, tensor)

    def alltoall_async(self, tensor: torch.Tensor, splits: torch.Tensor, name: str) -> Handle:
        sizes = tuple(int(s) for s in torch.as_tensor(splits).reshape(-1).tolist())
        return self.world._launch(self._rank, "alltoall", name, tensor, splits=sizes)

    def poll(self, handle: Handle) -> bool:
        self._own(handle)
        return handle.collective.complete

    def synchronize(self, handle: Handle) -> object:
        self._own(handle)
        return self.world._synchronize(handle)

    def _own(self, handle: object) -> None:
        if not isinstance(handle, Handle) or handle.world is not self.world:
            raise InProcessError(f"rank {self._rank}: {handle!r} is not a handle of this world")
        if handle.rank != self._rank:
            raise InProcessError(f"rank {self._rank} was given rank {handle.rank}'s {handle!r}")
