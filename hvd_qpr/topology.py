"""Gossip topologies: communication graphs of M workers and their mixing matrices (DESIGN.md 2.4).

Every matrix is symmetric and doubly stochastic (Koloskova, Stich & Jaggi, ICML 2019; the static
exponential graph and the one-peer hypercube of Assran et al., ICML 2019 and Ying et al.,
NeurIPS 2021). :mod:`hvd_qpr.gossip` mixes models over them.

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

TOPOLOGIES = ("ring", "torus", "exponential", "one-peer", "complete")
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
