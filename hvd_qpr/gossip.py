"""Gossip-paradigm (Q)PR-SGD: topologies, their mixing matrices, and error-controlled gossip.

Every ``local_steps`` local steps each worker mixes its model only with its neighbours'
(DESIGN.md 2.4). Sending quantized models and averaging them accumulates the quantization error;
the error-controlled scheme of CHOCO-SGD (Koloskova, Stich & Jaggi, "Decentralized Stochastic
Optimization and Gossip Algorithms with Compressed Communication", ICML 2019) keeps *public
copies* x̂ instead: worker i sends q_i = Q(x_i − x̂_i), everyone who holds a copy of x̂_i adds q_i
to it, and then

    x_i ← x_i + γ Σ_j W_ij (x̂_j − x̂_i)

with the consensus step γ. Whatever Q drops stays in x_i − x̂_i and is sent in later rounds, so
no error feedback is needed. The seed paper of this project (Jiang & Agrawal, NeurIPS 2018)
defines QPR-SGD for this serverless paradigm as well as for ring all-reduce.

Neighbour exchange is one ``hvd.alltoall`` a round with non-zero splits only for neighbours.

Example:
    >>> t = make_topology("ring", 8)
    >>> t.neighbors(0, 0)
    [1, 7]
    >>> round(t.spectral_gap(), 4)
    0.1953
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable, Sequence

import torch

from hvd_qpr.collectives import Comm, Pipeline, decode_frame, encode_frame
from hvd_qpr.compression.base import Compressor
from hvd_qpr.seeds import PHASE_SEND, derive_seed

TOPOLOGIES = ("ring", "torus", "exponential", "one-peer", "complete")
GOSSIP_MODES = ("choco", "quantized-average")
_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True, eq=False)
class Topology:
    """A communication graph of M workers and its mixing matrices, one per round of its period.

    Every matrix is symmetric and doubly stochastic; ``W[r][i, j] > 0`` for j ≠ i means that in
    round r workers i and j exchange models, with weight ``W[r][i, j]``.

    Attributes:
        name: ``"ring"``, ``"torus"``, ``"exponential"``, ``"one-peer"``, ``"complete"`` or
            ``"matrix"`` (given by the user).
        matrices: the M×M float64 mixing matrices of one period (one for a static graph).

    Example:
        >>> t = make_topology("one-peer", 4)
        >>> t.period, t.neighbors(0, 0), t.neighbors(0, 1)
        (2, [1], [2])
    """

    name: str
    matrices: tuple[torch.Tensor, ...]

    @property
    def size(self) -> int:
        """M, the number of workers."""
        return self.matrices[0].shape[0]

    @property
    def period(self) -> int:
        """Rounds after which the graph repeats (1 for a static graph)."""
        return len(self.matrices)

    def weights(self, round_index: int) -> torch.Tensor:
        """The mixing matrix W of a round."""
        return self.matrices[round_index % self.period]

    def neighbors(self, rank: int, round_index: int) -> list[int]:
        """The workers rank exchanges with in a round, ascending."""
        row = self.weights(round_index)[rank]
        return [j for j in range(self.size) if j != rank and row[j] > 0]

    def all_neighbors(self, rank: int) -> list[int]:
        """Every worker rank exchanges with in some round of the period, ascending."""
        return sorted({j for r in range(self.period) for j in self.neighbors(rank, r)})

    def spectral_gap(self) -> float:
        """1 − ‖Π_r W_r − 11ᵀ/M‖₂ over one period: how much one period contracts the spread of the
        workers' models (1 for exact averaging, near 0 for a poorly connected graph). For a single
        symmetric W it is 1 − max(|λ₂|, |λ_M|)."""
        m = self.size
        product = torch.eye(m, dtype=torch.float64)
        for w in self.matrices:
            product = w @ product
        consensus = torch.full((m, m), 1.0 / m, dtype=torch.float64)
        return 1.0 - float(torch.linalg.matrix_norm(product - consensus, ord=2))

    def signature(self) -> int:
        """A checksum of the matrices, compared across ranks before the first round."""
        data = b"".join(w.contiguous().numpy().tobytes() for w in self.matrices)
        return zlib.crc32(self.name.encode() + data)

    def describe(self) -> str:
        """The graph as text: each worker's neighbours and weights, per round of the period.

        Example:
            >>> print(make_topology("ring", 3).describe().splitlines()[1])
              0: self 0.333, 1 0.333, 2 0.333
        """
        lines = [repr(self)]
        for r, w in enumerate(self.matrices):
            if self.period > 1:
                lines.append(f" round {r} (mod {self.period}):")
            for i in range(self.size):
                peers = ", ".join(f"{j} {float(w[i, j]):.3g}" for j in self.neighbors(i, r))
                lines.append(f"  {i}: self {float(w[i, i]):.3g}, {peers}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        degree = len(self.neighbors(0, 0))
        return (
            f"Topology({self.name!r}, M={self.size}, degree={degree}, period={self.period}, "
            f"spectral_gap={self.spectral_gap():.4g})"
        )


def _uniform(size: int, offsets_of: Callable[[int], list[int]]) -> torch.Tensor:
    """W of a regular graph: 1/(d+1) to self and to each of the d distinct neighbours."""
    w = torch.zeros(size, size, dtype=torch.float64)
    for i in range(size):
        peers = sorted({j % size for j in offsets_of(i)} - {i})
        for j in [i, *peers]:
            w[i, j] = 1.0 / (len(peers) + 1)
    return w


def _torus_shape(size: int) -> tuple[int, int]:
    rows = max((a for a in range(2, math.isqrt(size) + 1) if size % a == 0), default=None)
    if rows is None:
        raise ValueError(
            f"topology 'torus' needs M to be a product of two factors > 1; M={size} is not"
        )
    return rows, size // rows


def check_mixing_matrix(w: torch.Tensor, size: int) -> torch.Tensor:
    """A user's mixing matrix as float64, checked: M×M, finite, non-negative, symmetric, rows
    summing to 1.

    Raises:
        ValueError: naming the first property that fails.
    """
    w = torch.as_tensor(w, dtype=torch.float64).detach().cpu()
    if w.shape != (size, size):
        raise ValueError(
            f"the mixing matrix must be {size}x{size} (M={size}), got {tuple(w.shape)}"
        )
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the mixing matrix holds NaN or Inf")
    if bool((w < 0).any()):
        raise ValueError("the mixing matrix has negative weights")
    if not torch.allclose(w, w.T, atol=_TOLERANCE, rtol=0):
        raise ValueError("the mixing matrix must be symmetric")
    sums = w.sum(1)
    if not torch.allclose(sums, torch.ones_like(sums), atol=_TOLERANCE, rtol=0):
        bad = int((sums - 1).abs().argmax())
        raise ValueError(
            f"the mixing matrix must be doubly stochastic; row {bad} sums to {float(sums[bad]):.6g}"
        )
    return w


def make_topology(spec: str | torch.Tensor | Sequence[Sequence[float]], size: int) -> Topology:
    """The topology a name (or a mixing matrix) gives for M workers.

    Args:
        spec: ``"ring"`` (1/3 to self and each neighbour), ``"torus"`` (2-D, M = a·b, a, b > 1),
            ``"exponential"`` (peers at distances 2^k both ways), ``"one-peer"`` (round r pairs
            i with i XOR 2^(r mod log2 M), M a power of two), ``"complete"`` (exact averaging), or
            a symmetric doubly-stochastic M×M matrix.
        size: M.

    Raises:
        ValueError: an unknown name, an M the topology cannot have, or an invalid matrix.

    Example:
        >>> make_topology("exponential", 8).neighbors(0, 0)
        [1, 2, 4, 6, 7]
    """
    if size < 1:
        raise ValueError(f"a topology needs at least one worker, got M={size}")
    if not isinstance(spec, str):
        return Topology("matrix", (check_mixing_matrix(spec, size),))
    if spec == "ring":
        return Topology("ring", (_uniform(size, lambda i: (i - 1, i + 1)),))
    if spec == "torus":
        rows, cols = _torus_shape(size)

        def grid(i: int) -> list[int]:
            r, c = divmod(i, cols)
            return [
                ((r - 1) % rows) * cols + c,
                ((r + 1) % rows) * cols + c,
                r * cols + (c - 1) % cols,
                r * cols + (c + 1) % cols,
            ]

        return Topology("torus", (_uniform(size, grid),))
    if spec == "exponential":
        hops = [1 << k for k in range(max(size - 1, 1).bit_length()) if (1 << k) < size]
        return Topology(
            "exponential",
            (_uniform(size, lambda i: [i + h for h in hops] + [i - h for h in hops]),),
        )
    if spec == "one-peer":
        if size & (size - 1):
            raise ValueError(f"topology 'one-peer' needs M to be a power of two, got M={size}")
        if size == 1:
            return Topology("one-peer", (torch.ones(1, 1, dtype=torch.float64),))
        rounds = []
        for r in range(size.bit_length() - 1):
            rounds.append(_uniform(size, lambda i, r=r: [i ^ (1 << r)]))
        return Topology("one-peer", tuple(rounds))
    if spec == "complete":
        return Topology("complete", (torch.full((size, size), 1.0 / size, dtype=torch.float64),))
    raise ValueError(
        f"unknown topology {spec!r}; choose one of {list(TOPOLOGIES)} or pass a matrix"
    )


def consensus_distance(models: torch.Tensor) -> float:
    """Root mean squared distance of the rows of an M×n table of models from their mean."""
    return float((models - models.mean(0)).pow(2).sum(1).mean().sqrt())


@dataclasses.dataclass
class GossipGroup:
    """One flat group of values that gossips as a unit (a fused bucket, or one small tensor).

    Attributes:
        name: keys the group's collectives and its state.
        numel: values in the group.
        compressor: what q (or the model, in the baseline) is sent with; None sends the group's
            values exactly, in its own dtype.
        dtype: the dtype values are held in (float32 for compressed groups).
    """

    name: str
    numel: int
    compressor: Compressor | None
    dtype: torch.dtype = torch.float32


class GossipState:
    """Public copies of one worker (CHOCO-SGD): its own x̂ and its neighbours', per group.

    In a static graph one x̂_i serves every neighbour. In a time-varying graph (one-peer) a
    neighbour hears from this worker only in some rounds, so each edge keeps its own copy of
    x̂_i. The copies start from the common model (checked by checksums) or, when the workers
    start from different models, from one exact exchange of them.

    Example:
        >>> state = GossipState(make_topology("ring", 4), rank=0, gamma=0.5)
        >>> state.initialized
        False
    """

    def __init__(
        self, topology: Topology, rank: int, gamma: float, mode: str = "choco", seed: int = 0
    ) -> None:
        if mode not in GOSSIP_MODES:
            raise ValueError(f"gossip mode must be one of {list(GOSSIP_MODES)}, got {mode!r}")
        if not (isinstance(gamma, (int, float)) and 0.0 < gamma <= 1.0):
            raise ValueError(f"consensus_step (gamma) must be in (0, 1], got {gamma!r}")
        self.topology, self.rank, self.gamma, self.mode, self.seed = (
            topology,
            rank,
            float(gamma),
            mode,
            seed,
        )
        # mine[edge][g]: this worker's public copy as edge's holders know it (edge -1 when shared)
        self.mine: dict[int, list[torch.Tensor]] = {}
        # theirs[j][g]: this worker's copy of neighbour j's public copy
        self.theirs: dict[int, list[torch.Tensor]] = {}

    @property
    def initialized(self) -> bool:
        return bool(self.mine) or self.mode != "choco" or self.topology.size == 1

    def _edge(self, peer: int) -> int:
        return peer if self.topology.period > 1 else -1

    # ---- one round --------------------------------------------------------------------------

    def round(
        self, groups: Sequence[GossipGroup], xs: Sequence[torch.Tensor], comm: Comm, index: int
    ) -> Pipeline:
        """One gossip round of every group's values xs (flat): exchange, then mix. Returns the
        new values. CHOCO's public copies must have been started (:meth:`start`)."""
        if not self.initialized:
            raise RuntimeError("GossipState.round: start() the public copies first")
        peers = self.topology.neighbors(self.rank, index)
        w = self.topology.weights(index)
        frames: dict[int, list[torch.Tensor]] = {}
        for g, (group, x) in enumerate(zip(groups, xs, strict=True)):
            seed = derive_seed(self.seed, self.rank, index, g, PHASE_SEND)
            for peer in peers if self.topology.period > 1 else peers[:1]:
                if self.mode == "choco":
                    public = self.mine[self._edge(peer)][g]
                    frame, step = _encode_step(group, x - public, seed)
                    public += step  # exactly what the neighbours will add
                else:  # the baseline: the (quantized) model itself
                    frame = _encode(group, x, seed)
                frames.setdefault(peer, []).append(frame)
        if self.topology.period == 1:
            frames = {peer: frames[peers[0]] for peer in peers} if peers else {}
        name = f"hvd_qpr.gossip.r{index}"
        received = yield from exchange(frames, comm, name, len(groups), xs[0].device)
        out = []
        for g, (group, x) in enumerate(zip(groups, xs, strict=True)):
            if self.mode == "choco":
                for peer in peers:
                    self.theirs[peer][g] += _decode_step(group, received[peer][g])
                mix = torch.zeros_like(x)
                for peer in peers:
                    mix += float(w[self.rank, peer]) * (
                        self.theirs[peer][g] - self.mine[self._edge(peer)][g]
                    )
                out.append(x + self.gamma * mix)
            else:
                mixed = float(w[self.rank, self.rank]) * x
                for peer in peers:
                    mixed += float(w[self.rank, peer]) * _decode(group, received[peer][g])
                out.append(mixed)
        return out

    def start(
        self, groups: Sequence[GossipGroup], xs: Sequence[torch.Tensor], comm: Comm
    ) -> Pipeline:
        """Starts the public copies from the models before training (x̂ = x_0). When every rank
        holds the same model (the usual case, after ``hvd.broadcast_parameters``: checked by one
        allgather of checksums) each copy starts from it; otherwise the models are exchanged
        exactly once. Nothing to do for the quantized-average baseline."""
        if self.initialized:
            return
        peers = self.topology.all_neighbors(self.rank)
        edges = peers if self.topology.period > 1 else [-1]
        digest = torch.tensor([[_checksum(x) for x in xs]], dtype=torch.int64)
        pending = comm.allgather(digest, "hvd_qpr.gossip.checksums")
        yield pending
        table = comm.wait(pending)
        if bool((table == table[0]).all()):
            self.mine = {e: [x.clone() for x in xs] for e in edges}
            self.theirs = {peer: [x.clone() for x in xs] for peer in peers}
            return
        exact = [dataclasses.replace(group, compressor=None) for group in groups]
        frames = {
            peer: [_encode(g, x, 0) for g, x in zip(exact, xs, strict=True)] for peer in peers
        }
        received = yield from exchange(
            frames, comm, "hvd_qpr.gossip.init", len(groups), xs[0].device
        )
        self.mine = {e: [x.clone() for x in xs] for e in edges}
        self.theirs = {
            peer: [_decode(g, f) for g, f in zip(exact, received[peer], strict=True)]
            for peer in peers
        }

    # ---- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, object]:
        return {
            "mine": {e: [t.clone() for t in ts] for e, ts in self.mine.items()},
            "theirs": {j: [t.clone() for t in ts] for j, ts in self.theirs.items()},
        }

    def load_state_dict(self, state: dict[str, object], groups: Sequence[GossipGroup]) -> None:
        def checked(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
            if [t.numel() for t in tensors] != [g.numel for g in groups]:
                raise ValueError("load_state_dict: the saved public copies do not fit this model")
            return [t.detach().clone().to(g.dtype) for t, g in zip(tensors, groups, strict=True)]

        self.mine = {int(e): checked(ts) for e, ts in state["mine"].items()}
        self.theirs = {int(j): checked(ts) for j, ts in state["theirs"].items()}


def least_squares_step(q: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """η = <q, e> / <q, q> (float32, 0 when q = 0): the multiple of the compressed difference q
    closest to the true difference e, so ‖e − ηq‖ ≤ ‖e‖ always.

    Example:
        >>> least_squares_step(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0]))
        tensor(0.5000)
    """
    qq = torch.dot(q, q)
    if float(qq) == 0.0:
        return qq
    return torch.dot(q, e) / qq


def _encode_step(
    group: GossipGroup, e: torch.Tensor, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """CHOCO's message for the difference e = x − x̂ and the step it applies to the copies.

    A compressed q is scaled by the least-squares η, sent first as 4 bytes: an unbiased
    quantizer whose relative variance exceeds 1 (2-bit QSGD) would otherwise make the public
    copies drift away from the models (‖e − Q(e)‖ > ‖e‖ on average), whatever γ is.
    """
    frame = _encode(group, e, seed)
    q = _decode(group, frame)
    if group.compressor is None:
        return frame, q
    eta = least_squares_step(q, e.reshape(-1).to(torch.float32))
    return torch.cat([eta.reshape(1).view(torch.uint8), frame]), eta * q


def _decode_step(group: GossipGroup, message: torch.Tensor) -> torch.Tensor:
    if group.compressor is None:
        return _decode(group, message)
    if message.numel() < 4:
        raise ValueError(f"hvd_qpr gossip: a message of {message.numel()} bytes for {group.name}")
    eta = message[:4].clone().view(torch.float32)
    return eta * _decode(group, message[4:])


def _checksum(x: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes."""
    return zlib.crc32(x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _encode(group: GossipGroup, x: torch.Tensor, seed: int) -> torch.Tensor:
    if group.compressor is None:  # exact, in the group's own dtype
        return x.reshape(-1).to(group.dtype).contiguous().view(torch.uint8)
    if group.compressor.traits.adaptive:  # each message carries its own k: no agreement needed
        group.compressor.agree_k(group.compressor.propose_k(x))
    return encode_frame(group.compressor, x.reshape(-1), seed)


def _decode(group: GossipGroup, frame: torch.Tensor) -> torch.Tensor:
    if group.compressor is None:
        size = torch.empty(0, dtype=group.dtype).element_size()
        if frame.numel() != group.numel * size:
            raise ValueError(
                f"hvd_qpr gossip: {frame.numel()} bytes received for {group.name}, "
                f"expected {group.numel * size}"
            )
        return frame.clone().view(group.dtype)
    return decode_frame(group.compressor, frame, group.numel)


def exchange(
    frames: dict[int, list[torch.Tensor]],
    comm: Comm,
    name: str,
    count: int,
    device: torch.device | str = "cpu",
) -> Pipeline:
    """Sends each neighbour its frames (one ``alltoall``: empty splits for everyone else) and
    returns what each neighbour sent, split into count frames. Exact (uncompressed) groups
    travel as their raw bytes, so they are framed here with their length."""
    m = comm.size
    chunks, splits = [], [0] * m
    for peer in sorted(frames):
        message = torch.cat([_length_prefixed(f) for f in frames[peer]])
        chunks.append(message)
        splits[peer] = message.numel()
    data = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8, device=device)
    pending = comm.alltoall(data, splits, name)
    yield pending
    received, sizes = comm.wait(pending)
    out: dict[int, list[torch.Tensor]] = {}
    for peer, part in enumerate(received.split(sizes.tolist())):
        if part.numel():
            out[peer] = _split_length_prefixed(part, count, peer)
    missing = sorted(set(frames) - set(out))
    if missing:
        raise ValueError(
            f"hvd_qpr gossip: nothing arrived from neighbour(s) {missing}; every rank must use "
            "the same topology"
        )
    return out


def _length_prefixed(frame: torch.Tensor) -> torch.Tensor:
    length = torch.tensor([frame.numel()], dtype=torch.int64, device=frame.device)
    return torch.cat([length.view(torch.uint8), frame])


def _split_length_prefixed(buffer: torch.Tensor, count: int, peer: int) -> list[torch.Tensor]:
    frames, offset = [], 0
    for _ in range(count):
        if offset + 8 > buffer.numel():
            raise ValueError(f"hvd_qpr gossip: the message from rank {peer} is truncated")
        length = int(buffer[offset : offset + 8].clone().view(torch.int64))
        if length < 0 or offset + 8 + length > buffer.numel():
            raise ValueError(f"hvd_qpr gossip: the message from rank {peer} is truncated")
        frames.append(buffer[offset + 8 : offset + 8 + length])
        offset += 8 + length
    if offset != buffer.numel():
        raise ValueError(f"hvd_qpr gossip: the message from rank {peer} has trailing bytes")
    return frames
