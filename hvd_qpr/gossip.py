"""Gossip-paradigm (Q)PR-SGD: error-controlled gossip over a topology (:mod:`hvd_qpr.topology`).

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

Neighbour exchange is one ``hvd.alltoall`` a round with non-zero splits only for neighbours;
each group's message is one or two frames of :mod:`hvd_qpr.collectives`' one framing format.
:class:`GossipState` is the public copies and the mixing over flat groups; :class:`Gossip` is
the averager the optimizer holds, over the model's :class:`~hvd_qpr.layout.Layout`.

Example:
    >>> averager = Gossip(layout, comm, make_topology("ring", 8), gamma=0.47, mode="choco")
    >>> collectives.run(averager.before_local_step())  # the public copies start from x_0
    >>> collectives.run(averager.round(0, local_count=16))
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from typing import Any

import torch

from hvd_qpr.averaging import Averager, Field, Round, check_finite, exact_average, paradigm_fields
from hvd_qpr.collectives import (
    Comm,
    Pipeline,
    decode_frame,
    encode_frame,
    frame_body,
    raw_frame,
    split_frames,
)
from hvd_qpr.compression import Compression
from hvd_qpr.compression.base import Compressor
from hvd_qpr.layout import COMPRESSIBLE, Layout, Part
from hvd_qpr.seeds import PHASE_SEND, derive_seed
from hvd_qpr.topology import Topology, consensus_distance, make_topology

__all__ = [
    "Gossip",
    "GossipGroup",
    "GossipState",
    "Topology",
    "consensus_distance",
    "make_topology",
]

GOSSIP_MODES = ("choco", "quantized-average")


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
        frames: dict[int, list[list[torch.Tensor]]] = {}
        for g, (group, x) in enumerate(zip(groups, xs, strict=True)):
            seed = derive_seed(self.seed, self.rank, index, g, PHASE_SEND)
            for peer in peers if self.topology.period > 1 else peers[:1]:
                if self.mode == "choco":
                    public = self.mine[self._edge(peer)][g]
                    message, step = _encode_step(group, x - public, seed)
                    public += step  # exactly what the neighbours will add
                else:  # the baseline: the (quantized) model itself
                    message = [_encode(group, x, seed)]
                frames.setdefault(peer, []).append(message)
        if self.topology.period == 1:
            frames = {peer: frames[peers[0]] for peer in peers} if peers else {}
        counts = [_frames_per_message(group, self.mode) for group in groups]
        name = f"hvd_qpr.gossip.r{index}"
        received = yield from exchange(frames, comm, name, counts, xs[0].device)
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
                    (frame,) = received[peer][g]
                    mixed += float(w[self.rank, peer]) * _decode(group, frame)
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
            peer: [[_encode(g, x, 0)] for g, x in zip(exact, xs, strict=True)] for peer in peers
        }
        received = yield from exchange(
            frames, comm, "hvd_qpr.gossip.init", [1] * len(groups), xs[0].device
        )
        self.mine = {e: [x.clone() for x in xs] for e in edges}
        self.theirs = {
            peer: [_decode(g, m[0]) for g, m in zip(exact, received[peer], strict=True)]
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


def _frames_per_message(group: GossipGroup, mode: str) -> int:
    """CHOCO's compressed messages carry the least-squares step in a frame of its own."""
    return 2 if mode == "choco" and group.compressor is not None else 1


def _encode_step(
    group: GossipGroup, e: torch.Tensor, seed: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """CHOCO's message (its frames) for the difference e = x − x̂, and the step it applies to
    the copies.

    A compressed q is scaled by the least-squares η, sent first in a frame of 4 bytes: an
    unbiased quantizer whose relative variance exceeds 1 (2-bit QSGD) would otherwise make the
    public copies drift away from the models (‖e − Q(e)‖ > ‖e‖ on average), whatever γ is.
    """
    frame = _encode(group, e, seed)
    q = _decode(group, frame)
    if group.compressor is None:
        return [frame], q
    eta = least_squares_step(q, e.reshape(-1).to(torch.float32))
    return [raw_frame(eta.reshape(1).view(torch.uint8)), frame], eta * q


def _decode_step(group: GossipGroup, message: list[torch.Tensor]) -> torch.Tensor:
    if group.compressor is None:
        return _decode(group, message[0])
    eta_frame, frame = message
    eta = frame_body(eta_frame)
    if eta.numel() != 4:
        raise ValueError(f"hvd_qpr gossip: a step of {eta.numel()} bytes for {group.name}")
    return eta.clone().view(torch.float32) * _decode(group, frame)


def _checksum(x: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes."""
    return zlib.crc32(x.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())


def _encode(group: GossipGroup, x: torch.Tensor, seed: int) -> torch.Tensor:
    if group.compressor is None:  # exact, in the group's own dtype
        return raw_frame(x.reshape(-1).to(group.dtype).contiguous().view(torch.uint8))
    if group.compressor.traits.adaptive:  # each message carries its own k: no agreement needed
        group.compressor.agree_k(group.compressor.propose_k(x))
    return encode_frame(group.compressor, x.reshape(-1), seed)


def _decode(group: GossipGroup, frame: torch.Tensor) -> torch.Tensor:
    if group.compressor is None:
        body = frame_body(frame)
        size = torch.empty(0, dtype=group.dtype).element_size()
        if body.numel() != group.numel * size:
            raise ValueError(
                f"hvd_qpr gossip: {body.numel()} bytes received for {group.name}, "
                f"expected {group.numel * size}"
            )
        return body.clone().view(group.dtype)
    return decode_frame(group.compressor, frame, group.numel)


def exchange(
    messages: dict[int, list[list[torch.Tensor]]],
    comm: Comm,
    name: str,
    counts: Sequence[int],
    device: torch.device | str = "cpu",
) -> Pipeline:
    """Sends each neighbour its messages, one a group, each a list of frames (one ``alltoall``:
    empty splits for everyone else), and returns what each neighbour sent, one message a group
    of counts[g] frames."""
    m = comm.size
    chunks, splits = [], [0] * m
    for peer in sorted(messages):
        data = torch.cat([frame for message in messages[peer] for frame in message])
        chunks.append(data)
        splits[peer] = data.numel()
    data = torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8, device=device)
    pending = comm.alltoall(data, splits, name)
    yield pending
    received, sizes = comm.wait(pending)
    out: dict[int, list[list[torch.Tensor]]] = {}
    for peer, part in enumerate(received.split(sizes.tolist())):
        if part.numel():
            try:
                frames = split_frames(part, sum(counts))
            except ValueError as e:
                raise ValueError(f"hvd_qpr gossip: the message from rank {peer}: {e}") from None
            out[peer], offset = [], 0
            for count in counts:
                out[peer].append(frames[offset : offset + count])
                offset += count
    missing = sorted(set(messages) - set(out))
    if missing:
        raise ValueError(
            f"hvd_qpr gossip: nothing arrived from neighbour(s) {missing}; every rank must use "
            "the same topology"
        )
    return out


# ---- the averager ------------------------------------------------------------------------------


def group_of(part: Part) -> GossipGroup:
    """How a part gossips: a bucket with the compressor; a dense parameter with a sum-compatible
    cast (fp16) when there is one, else exactly in its own dtype; a buffer exactly."""
    exact = part.kind != "bucket" and (
        part.dtype not in COMPRESSIBLE or part.compressor is Compression.none
    )
    if exact:
        return GossipGroup(part.name, part.numel, None, part.dtype)
    return GossipGroup(part.name, part.numel, part.compressor)


class Gossip(Averager):
    """Gossip (Q)PR-SGD: every round each worker mixes its model and buffers with its
    neighbours' through the public copies (CHOCO-SGD) or, as a baseline, their quantized models.

    Args:
        layout: the model's parts (every part is a gossip group, buffers included).
        comm: the collectives.
        topology: the graph; its size is the process set's.
        gamma: the consensus step γ in (0, 1].
        mode: ``"choco"`` or ``"quantized-average"``.
        seed: seeds the stochastic rounding with rank, round and group.
    """

    paradigm = "gossip"
    state_key = "gossip"
    aggregation = "gossip"

    def __init__(
        self,
        layout: Layout,
        comm: Comm,
        topology: Topology,
        gamma: float,
        mode: str = "choco",
        seed: int = 0,
    ) -> None:
        self.layout, self.comm = layout, comm
        self.state = GossipState(topology, comm.rank, gamma, mode, seed)
        self.groups = [group_of(part) for part in layout.parts]

    @property
    def topology(self) -> Topology:
        return self.state.topology

    def signature(self) -> list[Field]:
        state = self.state
        return paradigm_fields(topology=state.topology, mode=state.mode, gamma=state.gamma)

    def _values(self) -> list[torch.Tensor]:
        return [part.flatten() for part in self.layout.parts]

    def before_local_step(self) -> Round:
        """CHOCO's public copies start from the model before the first local step."""
        if self.comm.included and not self.state.initialized:
            yield from self.state.start(self.groups, self._values(), self.comm)

    def round(self, index: int, local_count: int) -> Round:
        """One round of (error-controlled) gossip with this round's neighbours."""
        if not self.comm.included:
            return
        yield from check_finite(self.layout, self.comm, local_count, index)
        new = yield from self.state.round(self.groups, self._values(), self.comm, index)
        for part, flat in zip(self.layout.parts, new, strict=True):
            part.write(flat)

    def sync(self, index: int, local_count: int) -> Round:
        """The models differ between rounds: one exact average of models and buffers."""
        yield from exact_average(self.layout, self.comm)
        return False

    def state_dict(self) -> dict[str, Any]:
        return self.state.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state.load_state_dict(state, self.groups)
