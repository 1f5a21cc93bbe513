"""How compressed tensors are aggregated through Horovod's collectives, and what that costs.

Aggregations (DESIGN.md 2.3), each a generator that launches asynchronous Horovod collectives,
yields what it launched, and on the next ``next()`` waits for it, so :func:`run_pipelines` can
launch every bucket's collectives before waiting for any (Horovod then fuses them), and
:class:`InFlight` can advance a chain of collectives from ``step()`` calls without blocking:

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

:class:`Comm` counts bytes as DESIGN.md 2.3 defines them: *payload* (what this worker hands to
Horovod) and *wire* (what it sends under the collective's algorithm: ring all-reduce
``2(M-1)/M`` of the payload, ring allgather ``(M-1)/M`` of the gathered total, alltoall the bytes
addressed to other ranks). :func:`choose_aggregation` is the cost model behind ``"auto"``.

Example:
    >>> comm = Comm(hvd.global_process_set)
    >>> pipeline = aggregate("packed-sum", x, qsgd, comm, "b0", [("w", x.numel())], seed=1)
    >>> mean = finish(pipeline)  # the same on every rank
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Generator, Iterable, Sequence

import horovod.torch as hvd
import torch

from hvd_qpr.compression.base import Compressor, Segments
from hvd_qpr.seeds import PHASE_REQUANTIZE, PHASE_SEND, derive_seed

AGGREGATIONS = ("allreduce", "packed-sum", "scatter-gather", "allgather", "gtopk")
# scatter-gather quantizes twice, and requantizing the average adds about as much variance as all
# M first quantizations together (each contributes 1/M of its own to the mean). Its estimated time
# counts double when choosing, so one quantization wins unless it costs twice the time.
SECOND_QUANTIZATION_PENALTY = 2.0
_WORD_BITS = 63  # fields per int64 word stay below the sign bit, so sums never overflow

# A pipeline yields the (kind, handle) of the collective it launched and waits on it when resumed.
Pipeline = Generator[tuple[str, int], None, torch.Tensor]


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


class Comm:
    """Horovod's asynchronous collectives on one process set, counting bytes and waiting time."""

    def __init__(self, process_set: hvd.ProcessSet, stats: CommStats | None = None) -> None:
        self.process_set = process_set
        self.stats = stats if stats is not None else CommStats()

    @property
    def size(self) -> int:
        return self.process_set.size()

    @property
    def rank(self) -> int:
        return self.process_set.rank()

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
    ) -> tuple[str, int]:
        """In-place asynchronous all-reduce (ring: 2(M-1)/M of the payload on the wire)."""
        nbytes = tensor.numel() * tensor.element_size()
        self._count(nbytes, ring_allreduce_wire_bytes(nbytes, self.size))
        handle = hvd.allreduce_async_(
            tensor,
            name=name,
            op=op,
            prescale_factor=prescale_factor,
            postscale_factor=postscale_factor,
            process_set=self.process_set,
        )
        return ("allreduce", handle)

    def allgather(self, tensor: torch.Tensor, name: str) -> tuple[str, int]:
        """Asynchronous allgather; wire bytes are counted when the gathered size is known."""
        self._count(tensor.numel() * tensor.element_size(), 0.0)
        return ("allgather", hvd.allgather_async(tensor, name=name, process_set=self.process_set))

    def alltoall(self, tensor: torch.Tensor, splits: Sequence[int], name: str) -> tuple[str, int]:
        """Asynchronous alltoall; the wire carries what is addressed to the other ranks."""
        elem = tensor.element_size()
        total = tensor.numel() * elem
        self._count(total, total - splits[self.rank] * elem)
        handle = hvd.alltoall_async(
            tensor,
            splits=torch.tensor(list(splits), dtype=torch.int32),
            name=name,
            process_set=self.process_set,
        )
        return ("alltoall", handle)

    @staticmethod
    def ready(pending: tuple[str, int]) -> bool:
        """Whether a launched collective has completed (a wait on it would not block)."""
        return bool(hvd.poll(pending[1]))

    def wait(self, pending: tuple[str, int]) -> object:
        kind, handle = pending
        start = time.perf_counter()
        out = hvd.synchronize(handle)
        self.stats.wait_seconds += time.perf_counter() - start
        if kind == "allgather":
            m = self.size
            self.stats.wire_bytes += (m - 1) / m * out.numel() * out.element_size()
        return out


class InFlight:
    """Pipelines launched together and advanced without blocking: :meth:`poll` resumes each one
    whose collective has completed (so it launches its next stage, or returns), :meth:`wait`
    runs all to their end. Overlap-Local-SGD keeps one of these across local steps.

    Example:
        >>> flight = InFlight([aggregate("allgather", x, qsgd, comm, "b0", [], 1)])
        >>> while not flight.poll():
        ...     train_one_step()
        >>> (mean,) = flight.wait()
    """

    def __init__(self, pipelines: Iterable[Pipeline]) -> None:
        self._active = list(pipelines)
        self._results: list[torch.Tensor | None] = [None] * len(self._active)
        self._pending: dict[int, tuple[str, int]] = {}
        for i in range(len(self._active)):
            self._resume(i)

    def _resume(self, i: int) -> None:
        try:
            self._pending[i] = next(self._active[i])
        except StopIteration as done:
            self._pending.pop(i, None)
            self._results[i] = done.value

    def poll(self) -> bool:
        """Advances every pipeline whose collective is done; whether all have finished."""
        for i in list(self._pending):
            while i in self._pending and Comm.ready(self._pending[i]):
                self._resume(i)
        return not self._pending

    def wait(self) -> list[torch.Tensor]:
        """Runs every pipeline to its end, one phase of each at a time; their results in order."""
        while self._pending:
            for i in list(self._pending):
                self._resume(i)
        return self._results  # type: ignore[return-value]


def run_pipelines(pipelines: Iterable[Pipeline]) -> list[torch.Tensor]:
    """Advances every pipeline one phase at a time (all launch before any waits); their results."""
    return InFlight(pipelines).wait()


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
    payload, ctx = compressor.compress(corrected)
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


def _sparse_bytes(index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    return torch.cat([index.to(torch.int32).view(torch.uint8), value.view(torch.uint8)])


def _sparse_entries(payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
    if payload.numel() % 8:
        raise ValueError(f"gtopk: a sparse payload of {payload.numel()} bytes")
    k = payload.numel() // 8
    body = payload.clone()
    index = body[: 4 * k].view(torch.int32).to(torch.int64)
    if k and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"gtopk: a payload index lies outside 0..{numel - 1}")
    return index, body[4 * k :].view(torch.float32)


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
            _sparse_bytes(*current) if send_to is not None else flat.new_zeros(0, dtype=torch.uint8)
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
        theirs = _sparse_entries(data, n)
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
        ValueError: an unknown mode, or one the compressor's traits do not allow.
    """
    if mode == "packed-sum" and not compressor.traits.shared_scale:
        raise ValueError(
            f"aggregation 'packed-sum' needs a shared-scale compressor, not {compressor}"
        )
    fns = {
        "packed-sum": packed_sum,
        "scatter-gather": scatter_gather,
        "allgather": allgather,
        "gtopk": gtopk,
    }
    if mode not in fns:
        raise ValueError(f"aggregation must be one of {sorted(fns)} here, got {mode!r}")
    return fns[mode](x, compressor, comm, name, segments, seed, average)


# ---- cost model ---------------------------------------------------------------------------------


def _gtopk_exchanges(world_size: int) -> int:
    """log2 P rounds of recursive doubling, P the largest power of two <= M, two more to fold."""
    p = 1 << (world_size.bit_length() - 1)
    return (p.bit_length() - 1) + (2 if world_size > p else 0)


def estimate_wire_bytes(mode: str, compressor: Compressor, numel: int, world_size: int) -> float:
    """Bytes one worker puts on the wire to aggregate numel values under mode (DESIGN.md 2.3).

    Ring all-reduce and scatter-gather send 2(M-1)/M of the payload, allgather (M-1) payloads
    (k·M for a sparsifier), gTop-k one k-entry payload per exchange (k·log2 M).

    Example:
        >>> topk = Compression.topk(0.001)
        >>> estimate_wire_bytes("allgather", topk, 10**6, 1024) / estimate_wire_bytes(
        ...     "gtopk", topk, 10**6, 1024
        ... )
        102.3
    """
    m = world_size
    if m == 1:
        return 0.0
    ring = 2 * (m - 1) / m
    payload = compressor.payload_bytes(numel)
    if mode in ("allreduce", "scatter-gather"):
        return ring * payload
    if mode == "packed-sum":
        per_word = _WORD_BITS // field_width(compressor.levels_max, m)
        nb = -(-numel // compressor.bucket_size)
        return ring * (4 * nb + 8 * -(-numel // per_word))
    if mode == "allgather":
        return (m - 1) * payload
    if mode == "gtopk":
        return _gtopk_exchanges(m) * payload
    raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def estimate_seconds(
    mode: str, compressor: Compressor, numel: int, world_size: int, link: Link
) -> float:
    """Seconds one worker spends sending numel values under mode (bandwidth + latency terms).

    A ring all-reduce or allgather takes M-1 latency steps, an alltoall M-1 messages; packed-sum
    runs two all-reduces (scales, then fields), scatter-gather an alltoall and an allgather;
    gTop-k one latency per exchange.
    """
    m = world_size
    if m == 1:
        return 0.0
    transfer = estimate_wire_bytes(mode, compressor, numel, m) / link.bandwidth
    steps = (m - 1) * link.latency
    latency = {"allreduce": 2 * steps, "packed-sum": 4 * steps, "scatter-gather": 2 * steps}
    if mode == "allgather":
        return transfer + steps
    if mode == "gtopk":
        return transfer + _gtopk_exchanges(m) * link.latency
    return transfer + latency[mode]


def feasible_aggregations(compressor: Compressor) -> list[str]:
    """The modes a compressor's traits allow."""
    if compressor.traits.sum_compatible:
        return ["allreduce"]
    modes = ["scatter-gather", "allgather"]
    if compressor.traits.adaptive:  # one k for the whole tensor: no per-chunk payloads
        return ["gtopk", "allgather"]
    if compressor.traits.sparse:
        return ["gtopk", *modes]
    # packed-sum sends fixed-width fields: it would drop a variable-length (Elias) coding
    traits = compressor.traits
    return ["packed-sum", *modes] if traits.shared_scale and not traits.variable_length else modes


def choose_aggregation(
    compressor: Compressor, numel: int, world_size: int, link: Link | None = None
) -> str:
    """The feasible mode with the least estimated time (scatter-gather's times
    SECOND_QUANTIZATION_PENALTY, for its extra quantization error).

    Example:
        >>> choose_aggregation(Compression.qsgd(bits=4), 10**6, 2)
        'allgather'
        >>> choose_aggregation(Compression.qsgd(bits=4), 10**6, 4)
        'packed-sum'
    """
    link = link or Link()

    def cost(mode: str) -> float:
        t = estimate_seconds(mode, compressor, numel, world_size, link)
        return t * SECOND_QUANTIZATION_PENALTY if mode == "scatter-gather" else t

    return min(feasible_aggregations(compressor), key=cost)
