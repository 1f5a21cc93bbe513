"""Sparsifiers: Top-k (Aji & Heafield, "Sparse Communication for Distributed Gradient Descent",
EMNLP 2017; with error feedback, Stich et al., NeurIPS 2018) and Random-k (Wangni et al.,
NeurIPS 2018). The payload is k int32 indices followed by k float32 values (:func:`encode_sparse`,
:func:`decode_sparse`: the one definition, which gTop-k's exchanges use too)."""

from __future__ import annotations

import math

import torch

from hvd_qpr.compression.base import CompressorTraits
from hvd_qpr.compression.opaque import OpaqueCompressor

SPARSE_ENTRY_BYTES = 8  # an int32 index and a float32 value


def encode_sparse(index: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The sparse payload of k entries: k int32 indices, then k float32 values, as uint8.

    Example:
        >>> encode_sparse(torch.tensor([3, 0]), torch.tensor([1.5, -2.0])).numel()
        16
    """
    index_bytes = index.to(torch.int32).contiguous().view(torch.uint8)
    return torch.cat([index_bytes, value.to(torch.float32).contiguous().view(torch.uint8)])


def decode_sparse(
    payload: torch.Tensor, numel: int, k: int | None = None, owner: str = "sparse"
) -> tuple[torch.Tensor, torch.Tensor]:
    """The (int64 indices, float32 values) of a sparse payload for a tensor of numel values,
    checked: the layout of :func:`encode_sparse`, every index inside ``0..numel-1``.

    Args:
        payload: the bytes (1-D uint8; a slice of a received buffer may be unaligned).
        numel: values of the dense tensor the indices point into.
        k: the entries expected; None takes as many as the payload holds (gTop-k's merged
            payloads shrink below k when the partners' indices coincide).
        owner: names the caller in error messages.

    Raises:
        ValueError: the payload is not 1-D uint8, has the wrong size, or an index lies outside.

    Example:
        >>> decode_sparse(encode_sparse(torch.tensor([3]), torch.tensor([1.5])), 4)
        (tensor([3]), tensor([1.5000]))
    """
    well_typed = payload.dtype == torch.uint8 and payload.dim() == 1
    if k is None:
        if not well_typed or payload.numel() % SPARSE_ENTRY_BYTES:
            raise ValueError(
                f"{owner}: a sparse payload of {payload.numel()} bytes ({payload.dtype}, shape "
                f"{tuple(payload.shape)}) is not 1-D uint8 of {SPARSE_ENTRY_BYTES}-byte entries"
            )
        k = payload.numel() // SPARSE_ENTRY_BYTES
    elif not well_typed or payload.numel() != SPARSE_ENTRY_BYTES * k:
        raise ValueError(
            f"{owner}: a payload of {numel} values must be a 1-D uint8 tensor of "
            f"{SPARSE_ENTRY_BYTES * k} bytes (k = {k}), got {payload.dtype} of shape "
            f"{tuple(payload.shape)}"
        )
    body = payload.clone()  # the slice of a gathered buffer may be unaligned
    index = body[: 4 * k].view(torch.int32).to(torch.int64)
    if k and (int(index.min()) < 0 or int(index.max()) >= numel):
        raise ValueError(f"{owner}: a payload index lies outside 0..{numel - 1}")
    return index, body[4 * k :].view(torch.float32)


def _check_ratio(ratio: object, name: str) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"{name}: ratio must be a number in (0, 1], got {ratio!r}")
    return float(ratio)


class SparseCompressor(OpaqueCompressor):
    """Common payload of Top-k and Random-k: ``k`` int32 indices, then ``k`` float32 values."""

    traits = CompressorTraits(sum_compatible=False, sparse=True)

    def __init__(self, ratio: float, seed: int) -> None:
        self.ratio = _check_ratio(ratio, type(self).__name__)
        self.seed = seed % 2**64
        self._calls = 0

    def k(self, numel: int) -> int:
        """Entries kept of numel: ceil(ratio * numel), at least 1."""
        return min(numel, max(1, math.ceil(self.ratio * numel)))

    def contraction(self) -> float:
        """The density: what a random k-subset keeps (Top-k keeps at least that much)."""
        return self.ratio

    def select(self, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(int64 indices, float32 values) of the k entries to send."""
        raise NotImplementedError(f"{type(self).__name__} must implement select(x, k, seed)")

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        flat = x.reshape(-1).to(torch.float32)
        return encode_sparse(*self.select(flat, self.k(flat.numel()), seed))

    def split(self, payload: torch.Tensor, numel: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The (int64 indices, float32 values) of a payload of exactly k(numel) entries, checked."""
        return decode_sparse(payload, numel, self.k(numel), owner=self.name)

    def decode(self, payload: torch.Tensor, numel: int) -> torch.Tensor:
        index, value = self.split(payload, numel)
        return torch.zeros(numel, device=payload.device).index_put_(
            (index,), value, accumulate=True
        )

    def payload_bytes(self, numel: int) -> float:
        return float(SPARSE_ENTRY_BYTES * self.k(numel))


class TopKCompressor(SparseCompressor):
    """The k entries of largest magnitude (biased: use it with error feedback).

    Args:
        ratio: fraction of entries kept, in (0, 1].
        approximate: estimate the k-th magnitude from a random sample, keep the entries at or
            above it and trim to exactly k (falls back to a full ``torch.topk`` when the estimate
            keeps fewer than k), instead of ``torch.topk`` over the whole tensor.
        sample_size: values sampled for the estimate.
        seed: seeds the sample (and nothing else: the selection is deterministic otherwise).

    Example:
        >>> c = TopKCompressor(ratio=0.01)
        >>> c.decode(c.encode(torch.randn(1000), 0), 1000).count_nonzero()
        tensor(10)
    """

    def __init__(
        self, ratio: float = 0.01, approximate: bool = False, sample_size: int = 4096, seed: int = 0
    ) -> None:
        super().__init__(ratio, seed)
        if isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1:
            raise ValueError(f"topk: sample_size must be a positive int, got {sample_size!r}")
        self.approximate, self.sample_size = bool(approximate), sample_size
        self.name = f"topk(ratio={self.ratio:g}{', approximate' if approximate else ''})"

    def select(self, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        magnitude = x.abs()
        if self.approximate and x.numel() > self.sample_size:
            g = torch.Generator(device=x.device).manual_seed(seed % 2**63)
            sample = magnitude[torch.randint(0, x.numel(), (self.sample_size,), generator=g)]
            # a little below the estimated k-th magnitude, so the candidates usually exceed k
            q = max(0.0, 1.0 - 1.25 * k / x.numel())
            candidates = (magnitude >= torch.quantile(sample, q)).nonzero().squeeze(1)
            if candidates.numel() >= k:
                best = magnitude[candidates].topk(k, sorted=False).indices
                index = candidates[best]
                return index, x[index]
        index = magnitude.topk(k, sorted=False).indices
        return index, x[index]


class RandomKCompressor(SparseCompressor):
    """k entries drawn uniformly without replacement, scaled by numel / k (unbiased).

    Example:
        >>> c = RandomKCompressor(ratio=0.1)
        >>> c.decode(c.encode(torch.ones(100), 7), 100).sum()
        tensor(100.)
    """

    def __init__(self, ratio: float = 0.01, seed: int = 0) -> None:
        super().__init__(ratio, seed)
        self.name = f"randomk(ratio={self.ratio:g})"

    def select(self, x: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator(device=x.device).manual_seed(seed % 2**63)
        index = torch.randperm(x.numel(), generator=g, device=x.device)[:k]
        return index, x[index] * (x.numel() / max(k, 1))


class NormFractionPolicy:
    """Adaptive-k rule: the smallest k whose largest |x| entries keep ``fraction`` of x's squared
    l2 norm, capped at ``max_bytes`` of payload (:data:`SPARSE_ENTRY_BYTES` an entry) and at least
    ``min_k``.

    Another rule (e.g. Ruan et al.'s) is a class with the same ``__call__(x) -> int``.

    Example:
        >>> NormFractionPolicy(0.5)(torch.tensor([3.0, 1.0, 1.0, 1.0]))
        1
    """

    def __init__(self, fraction: float = 0.9, max_bytes: int | None = None, min_k: int = 1) -> None:
        if not 0 < fraction <= 1:
            raise ValueError(f"NormFractionPolicy: fraction must be in (0, 1], got {fraction!r}")
        if max_bytes is not None and max_bytes < SPARSE_ENTRY_BYTES:
            raise ValueError(
                f"NormFractionPolicy: max_bytes must be >= {SPARSE_ENTRY_BYTES}, got {max_bytes!r}"
            )
        self.fraction, self.max_bytes, self.min_k = fraction, max_bytes, min_k

    def __call__(self, x: torch.Tensor) -> int:
        energy = x.to(torch.float32).square().sort(descending=True).values.cumsum(0)
        if energy.numel() == 0 or energy[-1] == 0:
            return self.min_k
        k = int(torch.searchsorted(energy, self.fraction * energy[-1])) + 1
        if self.max_bytes is not None:
            k = min(k, self.max_bytes // SPARSE_ENTRY_BYTES)
        return max(self.min_k, min(k, x.numel()))

    def __repr__(self) -> str:
        return f"NormFractionPolicy(fraction={self.fraction}, max_bytes={self.max_bytes})"


class AdaptiveTopKCompressor(TopKCompressor):
    """Top-k whose k is chosen anew every synchronization (Adaptive Top-K, Ruan et al., arXiv
    2210.13532): each worker's policy proposes a k for its input and the ranks agree on the
    largest proposal with one small all-reduce (the aggregation does it: ``traits.adaptive``).

    Args:
        policy: a callable x -> k; default :class:`NormFractionPolicy` (90% of the norm).

    Example:
        >>> c = AdaptiveTopKCompressor(NormFractionPolicy(0.5))
        >>> c.agree_k(c.propose_k(torch.tensor([3.0, 1.0, 1.0, 1.0])))
        >>> c.k(4)
        1
    """

    traits = CompressorTraits(sum_compatible=False, sparse=True, adaptive=True)

    def __init__(self, policy: object = None, seed: int = 0) -> None:
        super().__init__(ratio=1.0, seed=seed)
        self.policy = policy if policy is not None else NormFractionPolicy()
        if not callable(self.policy):
            raise TypeError(f"adaptive_topk: policy must be callable, got {self.policy!r}")
        self.name = f"adaptive_topk({self.policy!r})"
        self._k: int | None = None

    def contraction(self) -> float:
        """The policy's kept fraction of the squared norm when it has one, else 1%."""
        return float(getattr(self.policy, "fraction", 0.01))

    def propose_k(self, x: torch.Tensor) -> int:
        """This worker's k for x, checked."""
        k = self.policy(x.reshape(-1))
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.numel():
            raise ValueError(
                f"adaptive_topk: policy {self.policy!r} returned k={k!r} for a tensor of "
                f"{x.numel()} values; it must be an int in 1..{x.numel()}"
            )
        return k

    def agree_k(self, k: int) -> None:
        """The k all ranks agreed on, used by the next encode/decode."""
        self._k = int(k)

    def k(self, numel: int) -> int:
        if self._k is None:  # used outside an aggregation: decide alone
            raise RuntimeError("adaptive_topk: no k agreed yet (call agree_k or propose_k first)")
        return min(self._k, numel)

    def encode(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if self._k is None:
            self.agree_k(self.propose_k(x))
        return super().encode(x, seed)

    def payload_bytes(self, numel: int) -> float:
        k = self._k if self._k is not None else max(1, numel // 100)
        return float(SPARSE_ENTRY_BYTES * k)
