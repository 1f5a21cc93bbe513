"""Which tensors travel how: the fused buckets, the small tensors sent on their own, the buffers.

A :class:`Layout` is built once from the wrapped optimizer's parameters, the model's buffers, the
compressor's traits, ``bucket_bytes`` and ``min_compress_numel`` (DESIGN.md 2.3). It owns the
names, the :class:`Part` each tensor travels in and which compressor that part uses, and it is
the only place that turns tensors into flat values and back: an averager asks it for the
differences to send and hands it the averages to write, part by part, never slicing a list by
position.

* A *bucket* fuses compressible parameters (float32, float16, bfloat16 with at least
  ``min_compress_numel`` values) into one flat float32 vector up to ``bucket_bytes``; it travels
  through an aggregation mode with the compressor.
* A *dense* part is one parameter all-reduced on its own (Horovod fuses those): every parameter
  of a sum-compatible compressor, and the small, float64 or integer ones of the others, which go
  uncompressed.
* A *buffer* part is one floating-point buffer (BatchNorm statistics), averaged exactly.

Example:
    >>> layout = Layout(named_params, [], Compression.qsgd(bits=4), 64 * 2**20, 1024)
    >>> [part.name for part in layout.buckets], [part.name for part in layout.dense]
    (['hvd_qpr.bucket0'], ['fc.bias'])
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import torch

from hvd_qpr.compression import Compression, Compressor
from hvd_qpr.compression.base import Segments

COMPRESSIBLE = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(eq=False)
class Part:
    """Tensors that travel as one flat vector.

    Attributes:
        name: keys the part's collectives and state (``hvd_qpr.bucket0``, a parameter's name, or
            ``buffer.<name>``).
        kind: ``"bucket"``, ``"dense"`` or ``"buffer"``.
        tensors: the live tensors, in order.
        names: their names.
        compressor: what the part is sent with (``Compression.none`` for exact parts).
        index: the bucket's number (seeds the stochastic rounding); -1 for other parts.
    """

    name: str
    kind: str
    tensors: list[torch.Tensor]
    names: list[str]
    compressor: Compressor
    index: int = -1

    @property
    def segments(self) -> Segments:
        """(name, numel) of each tensor, in order: which stretch of the flat vector is whose."""
        return [(n, t.numel()) for n, t in zip(self.names, self.tensors, strict=True)]

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the flat vector: float32 for a bucket, the tensor's own otherwise."""
        return torch.float32 if self.kind == "bucket" else self.tensors[0].dtype

    def flatten(self, tensors: Iterable[torch.Tensor] | None = None) -> torch.Tensor:
        """The part's tensors (or tensors shaped like them) as one new flat vector."""
        tensors = self.tensors if tensors is None else list(tensors)
        if self.kind == "bucket":
            return torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
        (t,) = tensors
        return t.detach().reshape(-1).clone()

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """A flat vector back into views shaped like the part's tensors (dtype unchanged)."""
        pieces = flat.reshape(-1).split([t.numel() for t in self.tensors])
        return [piece.view(t.shape) for piece, t in zip(pieces, self.tensors, strict=True)]

    def write(self, flat: torch.Tensor) -> None:
        """Copies a flat vector into the part's tensors, cast to each tensor's dtype."""
        with torch.no_grad():
            for t, value in zip(self.tensors, self.split(flat), strict=True):
                t.copy_(value.to(t.dtype))


class Layout:
    """The parts one worker's model travels in (see the module docstring).

    Args:
        named_params: the trained parameters (``requires_grad``) with their names, in the
            optimizer's order.
        named_buffers: the model's buffers; only floating-point ones are kept.
        compressor: the compressor of the buckets (and, if sum-compatible, of every parameter).
        bucket_bytes: the most float32 bytes a bucket fuses.
        min_compress_numel: parameters with fewer values travel uncompressed.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, torch.Tensor]],
        named_buffers: Iterable[tuple[str, torch.Tensor]],
        compressor: Compressor,
        bucket_bytes: int,
        min_compress_numel: int,
    ) -> None:
        self.params = [p for _, p in named_params]
        self.names = {p: n for n, p in named_params}
        fused = not compressor.traits.sum_compatible
        # the dense path compresses only with a sum-compatible compressor
        self.dense_compressor = Compression.none if fused else compressor
        self.dense: list[Part] = []
        self.buckets: list[Part] = []
        current: list[torch.Tensor] = []
        for p in self.params:
            if not (fused and p.dtype in COMPRESSIBLE and p.numel() >= min_compress_numel):
                self.dense.append(self._single(p, "dense", self.dense_compressor))
                continue
            if current and 4 * (sum(q.numel() for q in current) + p.numel()) > bucket_bytes:
                self._add_bucket(current, compressor)
                current = []
            current.append(p)
        if current:
            self._add_bucket(current, compressor)
        self.buffers = [
            Part(f"buffer.{n}", "buffer", [b], [n], Compression.none)
            for n, b in named_buffers
            if b.dtype.is_floating_point
        ]

    def _single(self, p: torch.Tensor, kind: str, compressor: Compressor) -> Part:
        name = self.names[p]
        return Part(name, kind, [p], [name], compressor)

    def _add_bucket(self, params: list[torch.Tensor], compressor: Compressor) -> None:
        index = len(self.buckets)
        names = [self.names[p] for p in params]
        self.buckets.append(Part(f"hvd_qpr.bucket{index}", "bucket", params, names, compressor))
        self.buckets[-1].index = index

    # ---- views ----------------------------------------------------------------------------------

    @property
    def parameter_parts(self) -> list[Part]:
        """Buckets, then dense parameters: every trained value exactly once."""
        return self.buckets + self.dense

    @property
    def parts(self) -> list[Part]:
        """Every part: buckets, dense parameters, buffers."""
        return self.buckets + self.dense + self.buffers

    @property
    def largest_bucket(self) -> int:
        """Values in the largest bucket (what the cost model of ``"auto"`` sizes)."""
        return max((b.numel for b in self.buckets), default=0)

    def name(self, p: torch.Tensor) -> str:
        return self.names[p]

    def named_state(self) -> list[tuple[str, torch.Tensor]]:
        """Trained parameters and floating-point buffers, by name (``buffer.`` before a buffer)."""
        named = [(self.names[p], p) for p in self.params]
        return named + [(b.name, b.tensors[0]) for b in self.buffers]

    def signature(self) -> str:
        """Names, shapes and dtypes of the trained parameters, for the cross-rank check."""
        return ";".join(f"{self.names[p]}:{tuple(p.shape)}:{p.dtype}" for p in self.params)

    # ---- model differences ----------------------------------------------------------------------

    def snapshot(self) -> list[torch.Tensor]:
        """A copy of the trained parameters (an anchor), one tensor per parameter."""
        return [p.detach().clone() for p in self.params]

    def _by_param(self, anchor: Sequence[torch.Tensor]) -> dict[torch.Tensor, torch.Tensor]:
        return dict(zip(self.params, anchor, strict=True))

    def differences(self, anchor: Sequence[torch.Tensor]) -> list[tuple[Part, torch.Tensor]]:
        """(part, x − anchor as a flat vector) for every parameter part: buckets in float32,
        dense parameters in their own dtype."""
        anchors = self._by_param(anchor)
        out = []
        for part in self.parameter_parts:
            if part.kind == "bucket":
                delta = part.flatten() - part.flatten(anchors[p] for p in part.tensors)
            else:
                (p,) = part.tensors
                delta = (p.detach() - anchors[p]).reshape(-1).contiguous()
            out.append((part, delta))
        return out

    def plus(
        self, anchor: Sequence[torch.Tensor], means: Sequence[tuple[Part, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """anchor + the averaged differences, one tensor per parameter (a bucket's sum is formed
        in float32, then cast back to the parameter's dtype)."""
        anchors = self._by_param(anchor)
        out: dict[torch.Tensor, torch.Tensor] = {}
        for part, mean in means:
            for p, d in zip(part.tensors, part.split(mean), strict=True):
                a = anchors[p]
                out[p] = (a.to(torch.float32) + d).to(p.dtype) if part.kind == "bucket" else a + d
        return [out[p] for p in self.params]

    def write_average(
        self, anchor: Sequence[torch.Tensor], means: Sequence[tuple[Part, torch.Tensor]]
    ) -> None:
        """Every parameter set to anchor + its averaged difference, every buffer to its average
        (means: (part, average) of every part)."""
        self.load(self.plus(anchor, [(part, m) for part, m in means if part.kind != "buffer"]))
        for part, mean in means:
            if part.kind == "buffer":
                part.write(mean)

    def load(self, values: Sequence[torch.Tensor]) -> None:
        """Copies one tensor per trained parameter into the parameters."""
        with torch.no_grad():
            for p, value in zip(self.params, values, strict=True):
                p.copy_(value)

    def check_anchor(self, anchor: Sequence[torch.Tensor] | None, what: str) -> list | None:
        """A saved anchor (one tensor per parameter) checked against this model and moved to
        its devices and dtypes; ValueError naming what does not fit."""
        if anchor is None:
            return None
        if [tuple(a.shape) for a in anchor] != [tuple(p.shape) for p in self.params]:
            raise ValueError(f"load_state_dict: the saved {what}'s shapes differ from this model's")
        return [
            a.detach().clone().to(p.device, p.dtype)
            for a, p in zip(anchor, self.params, strict=True)
        ]
