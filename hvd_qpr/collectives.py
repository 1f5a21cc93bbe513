"""How compressed tensors are aggregated through Horovod's collectives, and what that costs.

Aggregations (DESIGN.md 2.3), each a generator (a *pipeline*) that launches asynchronous
collectives, yields what it launched, and on the next ``next()`` waits for it, so :func:`gather`
can launch every bucket's collectives before waiting for any (Horovod then fuses them),
:class:`InFlight` can advance a chain of collectives from ``step()`` calls without blocking,
:func:`run` drives one against Horovod, and the in-process communicator of the unit tests drives
M of them in lockstep. Each mode is one :class:`AggregationMode` record in :data:`MODES` (its
pipeline, wire bytes, chain of collectives, codec passes and the traits it needs):

* ``allreduce``: a sum-compatible payload (no compression, fp16, bf16) all-reduced as is.
* ``packed-sum``: all workers agree on one scale per bucket (``allreduce(Max)``), quantize to
  integer fields ``0..2s`` and pack ``63 // w`` fields of ``w = bit_length(2sM)`` bits in each
  int64 word, so Horovod's ring ``allreduce(Sum)`` sums M workers' fields without carries.
* ``scatter-gather``: ``alltoall`` of packed chunks, each worker decodes and averages its chunk,
  requantizes it once and ``allgather`` s it.
* ``allgather``: every worker's (possibly variable-length) payload gathered and decoded by all.
* ``gtopk``: the sparse all-reduce of gTop-k (Shi et al., ICDCS 2019) by recursive doubling:
  log2(M) pairwise exchanges (``alltoall`` with one non-zero split), each partner summing the two
  sparse vectors and keeping the k largest, so every rank ends with the same k entries.

:class:`Comm` (over :class:`HorovodBackend`, or any backend with its methods) counts bytes as
DESIGN.md 2.3 defines them: *payload* (what this worker hands to
Horovod) and *wire* (what it sends under the collective's algorithm: ring all-reduce
``2(M-1)/M`` of the payload, ring allgather ``(M-1)/M`` of the gathered total, alltoall the bytes
addressed to other ranks). :func:`choose_aggregation` is the cost model behind ``"auto"``.
Every variable-length payload travels in one framing format (:func:`encode_frame`,
:func:`raw_frame`, :func:`split_frames`).

Example:
    >>> comm = Comm(hvd.global_process_set)
    >>> pipeline = aggregate("packed-sum", x, qsgd, comm, "b0", [("w", x.numel())], seed=1)
    >>> mean = finish(pipeline)  # the same on every rank
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Generator, Iterable, Sequence

import horovod.torch as hvd
import torch

from hvd_qpr.compression.base import Compressor, CompressorTraits, Segments
from hvd_qpr.compression.sparse import decode_sparse, encode_sparse
from hvd_qpr.seeds import PHASE_REQUANTIZE, PHASE_SEND, derive_seed

# scatter-gather quantizes twice, and requantizing the average adds about as much variance as all
# M first quantizations together (each contributes 1/M of its own to the mean). Its estimated time
# counts double when choosing, so one quantization wins unless it costs twice the time.
SECOND_QUANTIZATION_PENALTY = 2.0
_WORD_BITS = 63  # fields per int64 word stay below the sign bit, so sums never overflow

# A pipeline yields the (kind, handle) of the collective it launched and waits on it when resumed.
Pipeline = Generator[tuple[str, object], None, object]


@dataclasses.dataclass(frozen=True)
class Link:
    """A network link per worker, for the cost model.

    Attributes:
        bandwidth: bytes per second each worker can send (default 1 Gbit/s).
        latency: seconds per message step of a collective (default 100 microseconds).
    """

    bandwidth: float = 125e6
    latency: float = 100e-6

    def __post_init__(self) -> None:
        if not (self.bandwidth > 0 and self.latency >= 0):
            raise ValueError(f"Link: bandwidth must be > 0 and latency >= 0, got {self}")


@dataclasses.dataclass
class CommStats:
    """Cumulative counts of what this worker sent (DESIGN.md 2.3)."""

    payload_bytes: int = 0
    wire_bytes: float = 0.0
    collectives: int = 0
    wait_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    def reset(self) -> None:
        self.payload_bytes, self.wire_bytes, self.collectives, self.wait_seconds = 0, 0.0, 0, 0.0


def ring_allreduce_wire_bytes(nbytes: float, world_size: int) -> float:
    """Bytes one worker sends in a ring all-reduce of nbytes: 2(M-1)/M of them. Also the count
    for a plain-Horovod baseline (what ``hvd.DistributedOptimizer`` all-reduces).

    Example:
        >>> ring_allreduce_wire_bytes(1000, 4)
        1500.0
    """
    return 2 * (world_size - 1) / world_size * nbytes


class HorovodBackend:
    """Horovod's asynchronous collectives on one process set: the transport under :class:`Comm`.

    Another backend (the in-process one of the unit tests) has the same attributes and methods:
    ``size``, ``rank``, ``included``, ``allreduce_async_``, ``allgather_async``,
    ``alltoall_async``, ``poll`` and ``synchronize``, with Horovod's meaning.
    """

    def __init__(self, process_set: hvd.ProcessSet) -> None:
        self.process_set = process_set

    @property
    def included(self) -> bool:
        return bool(self.process_set.included())

    @property
    def size(self) -> int:
        return self.process_set.size() if self.included else 1

    @property
    def rank(self) -> int:
        return self.process_set.rank() if self.included else 0

    def allreduce_async_(
        self,
        tensor: torch.Tensor,
        name: str,
        op: object,
        prescale_factor: float,
        postscale_factor: float,
    ) -> object:
        return hvd.allreduce_async_(
            tensor,
            name=name,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
            process_set=self.process_set,
        )

    def allgather_async(self, tensor: torch.Tensor, name: str) -> object:
        return hvd.allgather_async(tensor, name=name, process_set=self.process_set)

    def alltoall_async(self, tensor: torch.Tensor, splits: torch.Tensor, name: str) -> object:
        return hvd.alltoall_async(tensor, splits=splits, name=name, process_set=self.process_set)

    def poll(self, handle: object) -> bool:
        return bool(hvd.poll(handle))

    def synchronize(self, handle: object) -> object:
        return hvd.synchronize(handle)


class Comm:
    """Asynchronous collectives on one backend (Horovod's process set by default), counting bytes
    and waiting time (DESIGN.md 2.3). Every byte the library sends goes through one of these.

    Example:
        >>> comm = Comm(hvd.global_process_set)
        >>> total = comm.wait(comm.allreduce_(torch.ones(3), "x"))
    """

    def __init__(
        self, process_set: hvd.ProcessSet | object, stats: CommStats | None = None
    ) -> None:
        self.backend = (
            HorovodBackend(process_set) if isinstance(process_set, hvd.ProcessSet) else process_set
        )
        self.stats = stats if stats is not None else CommStats()

    @property
    def size(self) -> int:
        return self.backend.size

    @property
    def rank(self) -> int:
        return self.backend.rank

    @property
    def included(self) -> bool:
        """Whether this worker takes part (a process set may leave it out)."""
        return self.backend.included

    def _count(self, payload: int, wire: float) -> None:
        self.stats.payload_bytes += payload
        self.stats.wire_bytes += wire
        self.stats.collectives += 1

    def allreduce_(
        self,
        tensor: torch.Tensor,
        name: str,
        op: object = hvd.Sum,
        prescale_factor: float = 1.0,
        postscale_factor: float = 1.0,
    ) -> tuple[str, object]:
        """In-place asynchronous all-reduce (ring: 2(M-1)/M of the payload on the wire)."""
        nbytes = tensor.numel() * tensor.element_size()
        self._count(nbytes, ring_allreduce_wire_bytes(nbytes, self.size))
        handle = self.backend.allreduce_async_(tensor, name, op, prescale_factor, postscale_factor)
        return ("allreduce", handle)

    def allgather(self, tensor: torch.Tensor, name: str) -> tuple[str, object]:
        """Asynchronous allgather; wire bytes are counted when the gathered size is known."""
        self._count(tensor.numel() * tensor.element_size(), 0.0)
        return ("allgather", self.backend.allgather_async(tensor, name))

    def alltoall(
        self, tensor: torch.Tensor, splits: Sequence[int], name: str
    ) -> tuple[str, object]:
        """Asynchronous alltoall; the wire carries what is addressed to the other ranks."""
        # splits count rows (Horovod's meaning), of all but the first dimension's values
        row = tensor.element_size() * (tensor[0].numel() if tensor.dim() > 1 else 1)
        total = tensor.numel() * tensor.element_size()
        self._count(total, total - splits[self.rank] * row)
        split_tensor = torch.tensor(list(splits), dtype=torch.int32)
        return ("alltoall", self.backend.alltoall_async(tensor, split_tensor, name))

    def ready(self, pending: tuple[str, object]) -> bool:
        """Whether a launched collective has completed (a wait on it would not block)."""
        return self.backend.poll(pending[1])

    def wait(self, pending: tuple[str, object]) -> object:
        kind, handle = pending
        start = time.perf_counter()
        out = self.backend.synchronize(handle)
        self.stats.wait_seconds += time.perf_counter() - start
        if kind == "allgather":
            m = self.size
            self.stats.wire_bytes += (m - 1) / m * out.numel() * out.element_size()
        return out


def gather(pipelines: Iterable[Pipeline]) -> Pipeline:
    """Runs pipelines together as one: all launch before any waits, then one phase of each at
    a time (so Horovod fuses them); yields every collective before waiting on it and returns
    their results in order. A round of an averager is built from these.

    Example:
        >>> means = run(gather([aggregate("allgather", x, qsgd, comm, "b0", [], 1)]))
    """
    flight = InFlight(pipelines)
    return (yield from flight.finish())


def launch(pipeline: Pipeline) -> Pipeline:
    """Starts a pipeline now (its first collective is launched) and returns it as a pipeline
    that has not started: its first ``next()`` yields that collective without waiting, so it
    can join :func:`gather` later like any other. Gradients launch from their hooks this way."""
    try:
        pending = next(pipeline)
    except StopIteration as done:
        return _returning(done.value)
    return _resumed(pending, pipeline)


def _resumed(pending: tuple[str, object], pipeline: Pipeline) -> Pipeline:
    yield pending
    return (yield from pipeline)


def _returning(value: object) -> Pipeline:
    return value
    yield


def run(round_: Pipeline) -> object:
    """Drives a generator of collectives to its end against a blocking backend (Horovod): each
    collective it yields is waited on when it resumes. The in-process communicator of the
    unit tests drives M of them in lockstep instead."""
    while True:
        try:
            next(round_)
        except StopIteration as done:
            return done.value


class InFlight:
    """Pipelines launched together and advanced without blocking: :meth:`poll` resumes each one
    whose collective has completed (so it launches its next stage, or returns), :meth:`finish`
    runs all to their end. Overlap-Local-SGD keeps one of these across local steps.

    Example:
        >>> flight = InFlight([aggregate("allgather", x, qsgd, comm, "b0", [], 1)])
        >>> while not flight.poll(comm):
        ...     train_one_step()
        >>> (mean,) = run(flight.finish())
    """

    def __init__(self, pipelines: Iterable[Pipeline]) -> None:
        self._active = list(pipelines)
        self._results: list[torch.Tensor | None] = [None] * len(self._active)
        self._pending: dict[int, tuple[str, object]] = {}
        for i in range(len(self._active)):
            self._resume(i)

    def _resume(self, i: int) -> None:
        try:
            self._pending[i] = next(self._active[i])
        except StopIteration as done:
            self._pending.pop(i, None)
            self._results[i] = done.value

    def poll(self, comm: Comm) -> bool:
        """Advances every pipeline whose collective is done; whether all have finished."""
        for i in list(self._pending):
            while i in self._pending and comm.ready(self._pending[i]):
                self._resume(i)
        return not self._pending

    def finish(self) -> Pipeline:
        """Runs every pipeline to its end, one phase of each at a time, yielding each collective
        before it is waited on; their results in order."""
        while self._pending:
            for i in list(self._pending):
                yield self._pending[i]
                self._resume(i)
        return self._results


def run_pipelines(pipelines: Iterable[Pipeline]) -> list[torch.Tensor]:
    """Advances every pipeline one phase at a time (all launch before any waits); their results."""
    return run(gather(pipelines))


def finish(pipeline: Pipeline) -> torch.Tensor:
    """Runs one pipeline to its end."""
    return run_pipelines([pipeline])[0]


# ---- payload helpers ----------------------------------------------------------------------------


def field_width(levels_max: int, world_size: int) -> int:
    """Bits a packed-sum field needs so M fields of 0..2s sum without carrying: bit_length(2sM)."""
    return (2 * levels_max * world_size).bit_length()


def pack_words(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Non-negative integer fields of width bits, 63 // width to an int64 word, lowest first."""
    per_word = _WORD_BITS // width
    n = fields.numel()
    padded = torch.cat([fields, fields.new_zeros(-n % per_word)]).view(-1, per_word)
    words = padded[:, 0].to(torch.int64)
    for j in range(1, per_word):  # column by column: no int64 copy of all the fields
        words |= padded[:, j].to(torch.int64) << (j * width)
    return words


def unpack_words(words: torch.Tensor, width: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_words`: the first numel fields."""
    per_word = _WORD_BITS // width
    shifts = torch.arange(0, per_word * width, width, dtype=torch.int64, device=words.device)
    return ((words[:, None] >> shifts) & ((1 << width) - 1)).reshape(-1)[:numel]


def chunk_bounds(numel: int, parts: int, alignment: int) -> list[tuple[int, int]]:
    """numel values split into parts contiguous chunks of whole alignment-sized blocks."""
    blocks = -(-numel // alignment)
    edges = [min(numel, (blocks * j // parts) * alignment) for j in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


# Every payload of scatter-gather and allgather travels in a frame: a kind byte and its length
# (u64), so gathered payloads can be told apart. A chunk holding NaN or Inf cannot be quantized,
# yet non-finite gradients must reach every worker as they do through Horovod (mixed-precision
# loss scaling looks for them): such a chunk travels raw (float32), and sums propagate it.
_FRAME_HEADER = 9
_KIND_CODED = 0
_KIND_RAW = 1


def _frame(kind: int, body: torch.Tensor) -> torch.Tensor:
    length = torch.tensor([body.numel()], dtype=torch.int64, device=body.device)
    kind_byte = torch.tensor([kind], dtype=torch.uint8, device=body.device)
    return torch.cat([kind_byte, length.view(torch.uint8), body])


def encode_frame(compressor: Compressor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """x as one frame: the compressor's payload, or raw float32 when x is not all finite."""
    if x.numel() == 0:
        return _frame(_KIND_CODED, x.new_zeros(0, dtype=torch.uint8))
    if not bool(torch.isfinite(x).all()):
        return _frame(_KIND_RAW, x.to(torch.float32).contiguous().view(torch.uint8))
    return _frame(_KIND_CODED, compressor.encode(x, seed))


def split_frames(buffer: torch.Tensor, count: int) -> list[torch.Tensor]:
    """Splits count consecutive frames."""
    frames, offset = [], 0
    for _ in range(count):
        if offset + _FRAME_HEADER > buffer.numel():
            raise ValueError("hvd_qpr: received payloads are truncated")
        length = int(buffer[offset + 1 : offset + _FRAME_HEADER].clone().view(torch.int64))
        frames.append(buffer[offset : offset + _FRAME_HEADER + length])
        offset += _FRAME_HEADER + length
    if offset != buffer.numel():
        raise ValueError("hvd_qpr: received payloads do not add up to what arrived")
    return frames


def decode_frame(compressor: Compressor, frame: torch.Tensor, numel: int) -> torch.Tensor:
    """A frame back to numel float32 values."""
    kind, body = int(frame[0]), frame[_FRAME_HEADER:]
    if numel == 0:
        return frame.new_zeros(0, dtype=torch.float32)
    if kind == _KIND_RAW:
        if body.numel() != 4 * numel:
            raise ValueError(f"hvd_qpr: a raw payload of {body.numel()} bytes for {numel} values")
        return body.clone().view(torch.float32)
    if kind != _KIND_CODED:
        raise ValueError(f"hvd_qpr: unknown payload kind {kind}")
    return compressor.decode(body, numel)


def raw_frame(body: torch.Tensor) -> torch.Tensor:
    """Bytes that need no decoding (exact values in their own dtype, a scale) as one frame."""
    return _frame(_KIND_RAW, body)


def frame_body(frame: torch.Tensor) -> torch.Tensor:
    """The bytes a frame carries."""
    return frame[_FRAME_HEADER:]


def frame_is_raw(frame: torch.Tensor) -> bool:
    return int(frame[0]) == _KIND_RAW


# ---- aggregations -------------------------------------------------------------------------------


def _agree_on_k(x: torch.Tensor, compressor: Compressor, comm: Comm, name: str) -> Pipeline:
    """For adaptive compressors: every rank proposes a k for x, all take the largest."""
    if not compressor.traits.adaptive:
        return
    proposal = torch.tensor([compressor.propose_k(x)], dtype=torch.int64, device=x.device)
    pending = comm.allreduce_(proposal, f"{name}.k", op=hvd.Max)
    yield pending
    compressor.agree_k(int(comm.wait(pending)))


def allreduce_dense(
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    op: object = hvd.Average,
    prescale_factor: float = 1.0,
    postscale_factor: float = 1.0,
) -> Pipeline:
    """All-reduce of a sum-compatible payload, Horovod's way (same op and scale factors)."""
    corrected = x
    if compressor.needs_residual:
        corrected = compressor.add_residual(x, segments).view_as(x).to(x.dtype)
    # the residual was added here, by segment: the wrapped compressor's own compress()
    payload, ctx = compressor.without_residuals.compress(corrected)
    if compressor.needs_residual:
        compressor.store_residual(corrected, compressor.decompress(payload.clone(), ctx), segments)
    pending = comm.allreduce_(payload, name, op, prescale_factor, postscale_factor)
    yield pending
    return compressor.decompress(comm.wait(pending), ctx)


def packed_sum(
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    seed: int,
    average: bool = True,
) -> Pipeline:
    """Shared scales, integer fields with headroom, one ring all-reduce of int64 words."""
    m = comm.size
    x = compressor.add_residual(x, segments)  # identity without error feedback
    finite = bool(torch.isfinite(x).all())
    if finite:
        scales = compressor.bucket_scales(x)
    else:
        nb = -(-x.numel() // compressor.bucket_size)
        scales = x.new_zeros(nb, dtype=torch.float32)
    # the last element tells everyone whether some worker holds NaN or Inf
    flagged = torch.cat([scales, scales.new_full((1,), 0.0 if finite else 1.0)])
    pending = comm.allreduce_(flagged, f"{name}.scales", op=hvd.Max)
    yield pending
    reduced = comm.wait(pending)
    if reduced[-1] > 0:  # NaN or Inf somewhere: this round sums raw values, as Horovod would
        raw = x.reshape(-1).to(torch.float32, copy=True)
        pending = comm.allreduce_(raw, f"{name}.raw", op=hvd.Sum)
        yield pending
        total = comm.wait(pending)
        return total / m if average else total
    shared = reduced[:-1]
    fields = compressor.quantize_fields(x, shared, derive_seed(seed, PHASE_SEND))
    if compressor.needs_residual:
        own = compressor.dequantize_field_sum(fields, 1, shared)
        compressor.store_residual(x, own, segments)
    width = field_width(compressor.levels_max, m)
    pending = comm.allreduce_(pack_words(fields, width), f"{name}.fields", op=hvd.Sum)
    yield pending
    total = unpack_words(comm.wait(pending), width, x.numel())
    out = compressor.dequantize_field_sum(total, m, shared)
    return out / m if average else out


def scatter_gather(
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    seed: int,
    average: bool = True,
) -> Pipeline:
    """alltoall of compressed chunks, a reduction per chunk owner, one requantization, allgather."""
    m, rank = comm.size, comm.rank
    x = compressor.add_residual(x, segments)  # identity without error feedback
    yield from _agree_on_k(x, compressor, comm, name)
    flat = x.reshape(-1)
    bounds = chunk_bounds(flat.numel(), m, getattr(compressor, "bucket_size", 1))
    frames = [
        encode_frame(compressor, flat[a:b], derive_seed(seed, PHASE_SEND, j))
        for j, (a, b) in enumerate(bounds)
    ]
    if compressor.needs_residual and not any(frame_is_raw(f) for f in frames):
        sent = [
            decode_frame(compressor, f, b - a) for f, (a, b) in zip(frames, bounds, strict=True)
        ]
        compressor.store_residual(flat, torch.cat(sent), segments)
    splits = [f.numel() for f in frames]
    pending = comm.alltoall(torch.cat(frames), splits, f"{name}.scatter")
    yield pending
    received = comm.wait(pending)
    data, received_splits = received if isinstance(received, tuple) else (received, None)
    sizes = received_splits.tolist() if received_splits is not None else [splits[rank]] * m
    a, b = bounds[rank]
    total = flat.new_zeros(b - a, dtype=torch.float32)
    for part in data.split(sizes):
        total += decode_frame(compressor, part, b - a)
    reduced = total / m if average else total
    mine = encode_frame(compressor, reduced, derive_seed(seed, PHASE_REQUANTIZE, rank))
    pending = comm.allgather(mine, f"{name}.gather")
    yield pending
    parts = split_frames(comm.wait(pending), m)
    decoded = [
        decode_frame(compressor, f, hi - lo) for f, (lo, hi) in zip(parts, bounds, strict=True)
    ]
    return torch.cat(decoded)


def allgather(
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    seed: int,
    average: bool = True,
) -> Pipeline:
    """Every worker's payload gathered and decoded by everyone, summed in rank order."""
    m = comm.size
    x = compressor.add_residual(x, segments)  # identity without error feedback
    yield from _agree_on_k(x, compressor, comm, name)
    n = x.numel()
    frame = encode_frame(compressor, x.reshape(-1), derive_seed(seed, PHASE_SEND))
    pending = comm.allgather(frame, f"{name}.gather")
    yield pending
    decoded = [decode_frame(compressor, f, n) for f in split_frames(comm.wait(pending), m)]
    if compressor.needs_residual and not frame_is_raw(frame):
        compressor.store_residual(x, decoded[comm.rank], segments)
    total = x.new_zeros(n, dtype=torch.float32)
    for part in decoded:
        total += part
    return total / m if average else total


# ---- gTop-k -------------------------------------------------------------------------------------


def merge_topk(
    first: tuple[torch.Tensor, torch.Tensor], second: tuple[torch.Tensor, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of two sparse vectors (values at shared indices added, first's then second's), cut to
    its k largest magnitudes; indices ascending, so both partners of an exchange agree."""
    index = torch.cat([first[0], second[0]])
    value = torch.cat([first[1], second[1]])
    union, where = torch.unique(index, sorted=True, return_inverse=True)
    summed = torch.zeros(union.numel(), dtype=value.dtype, device=value.device)
    summed.index_add_(0, where, value)
    if union.numel() > k:
        keep = summed.abs().topk(k, sorted=False).indices.sort().values
        union, summed = union[keep], summed[keep]
    return union, summed


def gtopk_schedule(rank: int, world_size: int) -> list[tuple[int | None, int | None, bool]]:
    """(send to, receive from, merge) for each exchange of this rank. With P the largest power of
    two <= M, ranks >= P first fold into rank - P; the first P ranks run log2(P) rounds of
    recursive doubling (partner rank XOR 2^j); then the folded ranks get the result back."""
    p = 1 << (world_size.bit_length() - 1)
    extra = world_size - p
    steps: list[tuple[int | None, int | None, bool]] = []
    if extra:
        if rank >= p:
            steps.append((rank - p, None, False))
        else:
            steps.append((None, rank + p if rank < extra else None, True))
    for j in range(p.bit_length() - 1):
        partner = rank ^ (1 << j)
        steps.append((partner, partner, True) if rank < p else (None, None, False))
    if extra:
        if rank >= p:
            steps.append((None, rank - p, False))
        else:
            steps.append((rank + p if rank < extra else None, None, False))
    return steps


def gtopk(
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    seed: int,
    average: bool = True,
) -> Pipeline:
    """gTop-k sparse all-reduce; the residual keeps what of this worker's top-k did not survive."""
    m, rank = comm.size, comm.rank
    x = compressor.add_residual(x, segments)  # identity without error feedback
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    # NaN and Inf rank above every magnitude in topk, so they survive every merge and reach all
    # workers, as they would through Horovod (mixed-precision loss scaling looks for them)
    finite = bool(torch.isfinite(flat).all())
    yield from _agree_on_k(flat, compressor, comm, name)
    k = compressor.k(n)
    index, value = compressor.select(flat, k, derive_seed(seed, PHASE_SEND))
    order = index.argsort()
    mine = (index[order], value[order])
    current = mine
    for step, (send_to, receive_from, merge) in enumerate(gtopk_schedule(rank, m)):
        payload = (
            encode_sparse(*current) if send_to is not None else flat.new_zeros(0, dtype=torch.uint8)
        )
        splits = [0] * m
        if send_to is not None:
            splits[send_to] = payload.numel()
        pending = comm.alltoall(payload, splits, f"{name}.gtopk{step}")
        yield pending
        received = comm.wait(pending)
        data = received[0] if isinstance(received, tuple) else received
        if receive_from is None:
            continue
        theirs = decode_sparse(data, n, owner="gtopk")  # merged payloads may hold < k
        if merge:
            pair = (current, theirs) if rank < receive_from else (theirs, current)
            current = merge_topk(*pair, k)
        else:
            current = theirs
    if compressor.needs_residual and finite:
        survived = torch.isin(mine[0], current[0])
        sent = flat.new_zeros(n)
        sent[mine[0][survived]] = mine[1][survived]
        compressor.store_residual(flat, sent, segments)
    out = flat.new_zeros(n)
    out[current[0]] = current[1]
    return out / m if average else out


# ---- aggregation modes: one record each ---------------------------------------------------------

# Message steps of one collective of each kind on M workers, each paying the link's latency once:
# a ring all-reduce 2(M-1) (reduce-scatter, then allgather), a ring allgather M-1, an alltoall
# M-1 messages, a pairwise exchange (an alltoall with one non-zero split) one.
LATENCY_STEPS: dict[str, Callable[[int], int]] = {
    "allreduce": lambda m: 2 * (m - 1),
    "allgather": lambda m: m - 1,
    "alltoall": lambda m: m - 1,
    "exchange": lambda m: 1,
}


@dataclasses.dataclass(frozen=True)
class AggregationMode:
    """Everything the library and the scale model (benchmarks/scale_model.py) know of one
    aggregation mode: :func:`aggregate`, :func:`estimate_wire_bytes`, :func:`estimate_seconds`,
    :func:`feasible_aggregations` and :func:`choose_aggregation` read it. Adding a mode is adding
    one record to :data:`MODES`.

    Attributes:
        name: what ``aggregation=`` calls it.
        pipeline: the generator function. A compressed mode's is called by :func:`aggregate` as
            ``pipeline(x, compressor, comm, name, segments, seed, average)``; a ``dense`` one has
            :func:`allreduce_dense`'s signature (Horovod's op and scale factors instead of seed
            and average) and runs on the dense path, never through :func:`aggregate`.
        wire_bytes: ``(compressor, numel, M) -> bytes`` one worker sends to aggregate numel
            values on M >= 2 workers (DESIGN.md 2.3's wire bytes).
        collectives: ``M -> kinds`` (keys of :data:`LATENCY_STEPS`) of the dependent collectives
            one worker launches in a round, in order: each waits for the one before.
        codec_passes: ``(M, error_feedback) -> (quantize only, quantize + encode, decode)`` of
            one round, in multiples of n values.
        feasible: ``CompressorTraits -> bool``: whether :func:`feasible_aggregations` offers the
            mode (to ``"auto"`` and to a user's choice) for a compressor with those traits.
        preference: :func:`feasible_aggregations` lists modes by it, lowest first (ties in
            :data:`MODES` order), so :func:`choose_aggregation` breaks ties towards the lower.
        needs: traits (names of :class:`CompressorTraits` fields) the pipeline cannot run
            without; :func:`aggregate` refuses a compressor that lacks one.
        requantizes: quantizes twice, so :func:`choose_aggregation` counts its time
            :data:`SECOND_QUANTIZATION_PENALTY` times.
        dense: a sum-compatible payload all-reduced as is (see ``pipeline``).

    Example:
        >>> MODES["scatter-gather"].collectives(4), MODES["scatter-gather"].latency_steps(4)
        (('alltoall', 'allgather'), 6)
    """

    name: str
    pipeline: Callable[..., Pipeline]
    wire_bytes: Callable[[Compressor, int, int], float]
    collectives: Callable[[int], tuple[str, ...]]
    codec_passes: Callable[[int, bool], tuple[float, float, float]]
    feasible: Callable[[CompressorTraits], bool]
    preference: int
    needs: tuple[str, ...] = ()
    requantizes: bool = False
    dense: bool = False

    def __post_init__(self) -> None:
        traits = {f.name for f in dataclasses.fields(CompressorTraits)}
        if not set(self.needs) <= traits:
            raise ValueError(
                f"AggregationMode {self.name!r}: needs {self.needs} names no trait of "
                f"{sorted(traits)}"
            )

    def latency_steps(self, world_size: int) -> int:
        """Message steps of this mode's chain of collectives on world_size workers."""
        return sum(LATENCY_STEPS[kind](world_size) for kind in self.collectives(world_size))


def _gtopk_exchanges(world_size: int) -> int:
    """log2 P rounds of recursive doubling, P the largest power of two <= M, two more to fold."""
    p = 1 << (world_size.bit_length() - 1)
    return (p.bit_length() - 1) + (2 if world_size > p else 0)


def _packed_sum_wire_bytes(compressor: Compressor, numel: int, world_size: int) -> float:
    """Ring all-reduces of the float32 bucket scales and of the int64 words of fields."""
    per_word = _WORD_BITS // field_width(compressor.levels_max, world_size)
    nb = -(-numel // compressor.bucket_size)
    return ring_allreduce_wire_bytes(4 * nb + 8 * -(-numel // per_word), world_size)


def _ring_wire_bytes(compressor: Compressor, numel: int, world_size: int) -> float:
    """A ring all-reduce's 2(M-1)/M of the payload (scatter-gather moves as much)."""
    return ring_allreduce_wire_bytes(compressor.payload_bytes(numel), world_size)


# Codec passes (the scale model prices them at measured kernel throughput): encode/decode include
# the Elias coder when the compressor has one. packed-sum quantizes twice (once for this worker's
# bucket scales, once against the agreed ones) and decodes the summed fields once; scatter-gather
# encodes n and requantizes its n/M chunk, decodes n received and n gathered values; allgather
# decodes all M payloads. With error feedback packed-sum and scatter-gather decode their own
# payload too. A cast (allreduce) is not counted; gTop-k's one Top-k selection a round is priced
# apart (merging k-entry payloads is left out).
MODES: dict[str, AggregationMode] = {
    mode.name: mode
    for mode in (
        AggregationMode(
            name="allreduce",
            pipeline=allreduce_dense,
            wire_bytes=_ring_wire_bytes,
            collectives=lambda m: ("allreduce",),
            codec_passes=lambda m, ef: (0.0, 0.0, 0.0),
            feasible=lambda t: t.sum_compatible,
            preference=0,
            dense=True,
        ),
        AggregationMode(
            name="packed-sum",
            pipeline=packed_sum,
            wire_bytes=_packed_sum_wire_bytes,
            collectives=lambda m: ("allreduce", "allreduce"),  # the scales, then the fields
            codec_passes=lambda m, ef: (1.0, 1.0, 1.0 + ef),
            # fixed-width fields would drop a variable-length (Elias) coding
            feasible=lambda t: (
                not t.sum_compatible
                and t.shared_scale
                and not (t.variable_length or t.sparse or t.adaptive)
            ),
            preference=0,
            needs=("shared_scale",),
        ),
        AggregationMode(
            name="scatter-gather",
            pipeline=scatter_gather,
            wire_bytes=_ring_wire_bytes,
            collectives=lambda m: ("alltoall", "allgather"),
            codec_passes=lambda m, ef: (0.0, 1.0 + 1.0 / m, 2.0 + ef),
            # an adaptive k is one k for the whole tensor: no per-chunk payloads
            feasible=lambda t: not t.sum_compatible and not t.adaptive,
            preference=1,
            requantizes=True,
        ),
        AggregationMode(
            name="allgather",
            pipeline=allgather,
            wire_bytes=lambda c, n, m: (m - 1) * c.payload_bytes(n),
            collectives=lambda m: ("allgather",),
            codec_passes=lambda m, ef: (0.0, 1.0, float(m)),
            feasible=lambda t: not t.sum_compatible,
            preference=2,
        ),
        AggregationMode(
            name="gtopk",
            pipeline=gtopk,
            wire_bytes=lambda c, n, m: _gtopk_exchanges(m) * c.payload_bytes(n),
            collectives=lambda m: ("exchange",) * _gtopk_exchanges(m),
            codec_passes=lambda m, ef: (0.0, 0.0, 0.0),
            feasible=lambda t: not t.sum_compatible and (t.sparse or t.adaptive),
            preference=0,
        ),
    )
}
AGGREGATIONS: tuple[str, ...] = tuple(MODES)


def aggregation_mode(mode: str) -> AggregationMode:
    """The record of a mode.

    Raises:
        ValueError: an unknown mode (the message lists the known ones).

    Example:
        >>> aggregation_mode("allgather").codec_passes(4, False)
        (0.0, 1.0, 4.0)
    """
    if mode not in MODES:
        raise ValueError(f"unknown aggregation {mode!r}; choose one of {tuple(MODES)}")
    return MODES[mode]


def aggregate(
    mode: str,
    x: torch.Tensor,
    compressor: Compressor,
    comm: Comm,
    name: str,
    segments: Segments,
    seed: int,
    average: bool = True,
) -> Pipeline:
    """The pipeline of one compressed (not sum-compatible) aggregation mode over a flat buffer.

    Raises:
        ValueError: an unknown mode, a dense one (``"allreduce"``: run :func:`allreduce_dense`),
            or one whose pipeline needs a trait the compressor lacks.

    Example:
        >>> mean = finish(aggregate("allgather", x, qsgd, comm, "b0", [("w", x.numel())], seed=1))
    """
    record = MODES.get(mode)
    if record is None or record.dense:
        compressed = sorted(key for key, r in MODES.items() if not r.dense)
        raise ValueError(f"aggregation must be one of {compressed} here, got {mode!r}")
    for trait in record.needs:
        if not getattr(compressor.traits, trait):
            raise ValueError(
                f"aggregation {mode!r} needs a {trait.replace('_', '-')} compressor, "
                f"not {compressor}"
            )
    return record.pipeline(x, compressor, comm, name, segments, seed, average)


# ---- cost model ---------------------------------------------------------------------------------


def estimate_wire_bytes(mode: str, compressor: Compressor, numel: int, world_size: int) -> float:
    """Bytes one worker puts on the wire to aggregate numel values under mode (DESIGN.md 2.3):
    the mode record's ``wire_bytes``, none on one worker.

    Ring all-reduce and scatter-gather send 2(M-1)/M of the payload, allgather (M-1) payloads
    (k·M for a sparsifier), gTop-k one k-entry payload per exchange (k·log2 M).

    Example:
        >>> topk = Compression.topk(0.001)
        >>> estimate_wire_bytes("allgather", topk, 10**6, 1024) / estimate_wire_bytes(
        ...     "gtopk", topk, 10**6, 1024
        ... )
        102.3
    """
    if world_size == 1:
        return 0.0
    return aggregation_mode(mode).wire_bytes(compressor, numel, world_size)


def estimate_seconds(
    mode: str, compressor: Compressor, numel: int, world_size: int, link: Link
) -> float:
    """Seconds one worker spends sending numel values under mode: the wire bytes over the
    bandwidth, plus a latency for each message step of the mode's chain of collectives.

    A ring all-reduce takes 2(M-1) latency steps, an allgather or an alltoall M-1; packed-sum
    runs two all-reduces (scales, then fields), scatter-gather an alltoall and an allgather;
    gTop-k one latency per exchange.

    Example:
        >>> estimate_seconds("allreduce", Compression.fp16, 10**6, 2, Link(1e6, 0.5))
        3.0
    """
    if world_size == 1:
        return 0.0
    record = aggregation_mode(mode)
    transfer = record.wire_bytes(compressor, numel, world_size) / link.bandwidth
    return transfer + record.latency_steps(world_size) * link.latency


def feasible_aggregations(compressor: Compressor) -> list[str]:
    """The modes a compressor's traits allow (each record's ``feasible``), in ``preference``
    order.

    Example:
        >>> feasible_aggregations(Compression.qsgd(bits=4))
        ['packed-sum', 'scatter-gather', 'allgather']
    """
    offered = [mode for mode in MODES.values() if mode.feasible(compressor.traits)]
    return [mode.name for mode in sorted(offered, key=lambda mode: mode.preference)]


def choose_aggregation(
    compressor: Compressor, numel: int, world_size: int, link: Link | None = None
) -> str:
    """The feasible mode with the least estimated time (a requantizing mode's times
    SECOND_QUANTIZATION_PENALTY, for its extra quantization error); ties go to the earlier in
    :func:`feasible_aggregations`.

    Example:
        >>> choose_aggregation(Compression.qsgd(bits=4), 10**6, 2)
        'allgather'
        >>> choose_aggregation(Compression.qsgd(bits=4), 10**6, 4)
        'packed-sum'
    """
    link = link or Link()

    def cost(mode: str) -> float:
        t = estimate_seconds(mode, compressor, numel, world_size, link)
        return t * SECOND_QUANTIZATION_PENALTY if MODES[mode].requantizes else t

    return min(feasible_aggregations(compressor), key=cost)
