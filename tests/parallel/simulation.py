"""A single-process simulation of M workers running (Q)PR-SGD, built from hvd_qpr.reference.

It restates DESIGN.md 2.3 independently of the optimizer's code: every worker takes K local steps
on its own batches, the compressible parameters (fused in order into one bucket) are quantized
with the reference quantizer under the seeds of hvd_qpr.seeds, and the average is formed as
each aggregation mode defines it. Tests run it inside every Horovod rank and compare.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

import hvd_qpr.reference as ref
from hvd_qpr.compression import QSGDCompressor
from hvd_qpr.seeds import PHASE_REQUANTIZE, PHASE_SEND, derive_seed

Batch = tuple[torch.Tensor, torch.Tensor]


class SmallNet(torch.nn.Module):
    """Two compressible weights, small biases, a frozen and an unused parameter: what the
    optimizer tests train (sizes chosen per test)."""

    def __init__(self, inputs: int, hidden: int, classes: int, frozen: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(inputs, hidden)
        self.fc2 = torch.nn.Linear(hidden, classes)
        self.frozen = torch.nn.Parameter(torch.randn(frozen), requires_grad=False)
        self.unused = torch.nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)) + self.frozen.sum())


def random_batch(rank: int, step: int, rows: int, inputs: int, classes: int) -> Batch:
    """Rank's batch of a step: Gaussian inputs, uniform labels, reproducible."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(rows, inputs, generator=g), torch.randint(0, classes, (rows,), generator=g)


class RecordingQSGD(QSGDCompressor):
    """QSGD that remembers what it sent: packed-sum fields and encoded payloads."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.sent: list[torch.Tensor] = []

    def quantize_fields(self, x, scales, seed):
        fields = super().quantize_fields(x, scales, seed)
        self.sent.append(fields.clone())
        return fields

    def encode(self, x, seed):
        payload = super().encode(x, seed)
        self.sent.append(payload.clone())
        return payload


def chunk_edges(numel: int, parts: int, block: int) -> list[tuple[int, int]]:
    blocks = -(-numel // block)
    edges = [min(numel, (blocks * j // parts) * block) for j in range(parts + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def serialize(q) -> torch.Tensor:
    """The fixed-length QSGD payload: float32 scales, then the packed fields."""
    return torch.cat([q.scales.view(torch.uint8), q.packed])


class Simulation:
    """M workers, each with a copy of model and its own optimizer.

    Args:
        model: the initial model (copied per worker).
        make_optimizer: builds a worker's optimizer from its parameters.
        batch: batch(rank, step) -> (inputs, targets).
        loss_fn: loss of outputs and targets.
        world: M.
        local_steps, warmup_steps: as the optimizer's.
        bits, bucket_size: the quantizer's; bits None means no compression (PR-SGD).
        mode: "packed-sum", "scatter-gather" or "allgather".
        min_compress_numel: smaller tensors are averaged uncompressed.
        seed: the optimizer's seed.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        make_optimizer: Callable,
        batch: Callable[[int, int], Batch],
        loss_fn: Callable,
        world: int,
        local_steps: int,
        warmup_steps: int = 0,
        bits: int | None = None,
        bucket_size: int = 512,
        mode: str = "packed-sum",
        min_compress_numel: int = 1024,
        seed: int = 0,
    ) -> None:
        self.models = [copy.deepcopy(model) for _ in range(world)]
        self.opts = [make_optimizer(m.parameters()) for m in self.models]
        self.batch, self.loss_fn, self.world = batch, loss_fn, world
        self.k, self.warmup = local_steps, warmup_steps
        self.bits, self.bucket_size, self.mode = bits, bucket_size, mode
        self.min_numel, self.seed = min_compress_numel, seed
        self.step_index, self.round, self.local_count = 0, 0, 0
        self.anchor: list[torch.Tensor] | None = None
        self.sent: list[list[torch.Tensor]] = [[] for _ in range(world)]  # payloads per worker

    def params(self, w: int) -> list[torch.Tensor]:
        return [p for p in self.models[w].parameters() if p.requires_grad]

    def _grads(self) -> None:
        for w, (model, opt) in enumerate(zip(self.models, self.opts, strict=True)):
            opt.zero_grad()
            x, y = self.batch(w, self.step_index)
            self.loss_fn(model(x), y).backward()

    def step(self) -> None:
        self._grads()
        if self.step_index < self.warmup:  # averaged uncompressed gradients
            for group in zip(*(self.params(w) for w in range(self.world)), strict=True):
                for p in group:  # unused parameters average zeros, as Horovod's optimizer does
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                total = group[0].grad.clone()
                for p in group[1:]:
                    total += p.grad
                for p in group:
                    p.grad = total / self.world
            for opt in self.opts:
                opt.step()
        else:
            if self.anchor is None:
                self.anchor = [p.detach().clone() for p in self.params(0)]
            for opt in self.opts:
                opt.step()
            self.local_count += 1
        self.step_index += 1
        if self.step_index > self.warmup and self.local_count == self.k:
            self.average()

    def _compressible(self, p: torch.Tensor) -> bool:
        return self.bits is not None and p.numel() >= self.min_numel

    def average(self) -> None:
        m = self.world
        anchor = self.anchor
        plist = [self.params(w) for w in range(m)]
        fused = [i for i, p in enumerate(plist[0]) if self._compressible(p)]
        new = [None] * len(anchor)
        for i, a in enumerate(anchor):  # uncompressed tensors: plain average of the differences
            if i in fused:
                continue
            total = plist[0][i].detach() - a
            for w in range(1, m):
                total = total + (plist[w][i].detach() - a)
            new[i] = a + total / m
        if fused:
            deltas = [
                torch.cat([(plist[w][i].detach() - anchor[i]).reshape(-1) for i in fused])
                for w in range(m)
            ]
            mean = self._aggregate(deltas)
            offset = 0
            for i in fused:
                n = anchor[i].numel()
                new[i] = (anchor[i] + mean[offset : offset + n].view_as(anchor[i])).to(
                    anchor[i].dtype
                )
                offset += n
        with torch.no_grad():
            for w in range(m):
                for p, value in zip(plist[w], new, strict=True):
                    p.copy_(value)
        self.anchor = [v.clone() for v in new]
        self.round += 1
        self.local_count = 0

    def _seed(self, w: int) -> int:
        return derive_seed(self.seed, w, self.round, 0)

    def _aggregate(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        m, bits, d = self.world, self.bits, self.bucket_size
        n = deltas[0].numel()
        s = 2 ** (bits - 1) - 1
        if self.mode == "packed-sum":
            nb = -(-n // d)
            peaks = [
                torch.cat([x.abs(), x.new_zeros(nb * d - n)]).view(nb, d).amax(1) for x in deltas
            ]
            shared = torch.stack(peaks).amax(0)
            total = torch.zeros(n, dtype=torch.int64)
            for w, x in enumerate(deltas):
                q = ref.quantize(x, bits, d, "max", derive_seed(self._seed(w), PHASE_SEND), shared)
                self.sent[w].append(ref.unpack_bits(q.packed, bits, n, torch.uint8))
                total += ref.levels(q)
            step = (shared / s).repeat_interleave(d)[:n]
            return total.to(torch.float32) * step / m
        if self.mode == "allgather":
            total = torch.zeros(n)
            for w, x in enumerate(deltas):
                q = ref.quantize(x, bits, d, "max", derive_seed(self._seed(w), PHASE_SEND))
                self.sent[w].append(serialize(q))
                total += ref.dequantize(q, torch.float32)
            return total / m
        if self.mode == "scatter-gather":
            bounds = chunk_edges(n, m, d)
            chunks = [  # chunks[w][j]: worker w's quantized chunk j
                [
                    ref.quantize(x[a:b], bits, d, "max", derive_seed(self._seed(w), PHASE_SEND, j))
                    for j, (a, b) in enumerate(bounds)
                ]
                for w, x in enumerate(deltas)
            ]
            out = []
            for j, (a, b) in enumerate(bounds):  # worker j reduces chunk j and requantizes it
                total = torch.zeros(b - a)
                for w in range(m):
                    total += ref.dequantize(chunks[w][j], torch.float32)
                seed = derive_seed(self._seed(j), PHASE_REQUANTIZE, j)
                q2 = ref.quantize(total / m, bits, d, "max", seed)
                self.sent[j] += [serialize(q) for q in chunks[j]] + [serialize(q2)]
                out.append(ref.dequantize(q2, torch.float32))
            return torch.cat(out)
        raise ValueError(self.mode)


# ---- gossip (DESIGN.md 2.4) ---------------------------------------------------------------------


def simulate_gossip(
    xs: list[torch.Tensor],
    weights: Callable[[int], torch.Tensor],
    rounds: int,
    bits: int | None,
    gamma: float,
    mode: str = "choco",
    bucket_size: int = 512,
    seed: int = 0,
    time_varying: bool = False,
) -> list[torch.Tensor]:
    """M workers' flat values after rounds of gossip with mixing matrices weights(r).

    CHOCO-SGD: hat[i, j] is worker i's public copy as worker j knows it (both hold it), started
    from an exact exchange; each round worker i sends q = eta Q(x_i - hat[i, j]), eta the
    least-squares step <Q(e), e> / <Q(e), Q(e)> (one q for all
    neighbours of a static graph), both sides add it, and x_i += gamma * sum_j W_ij (hat[j, i] -
    hat[i, j]). The baseline ("quantized-average") sets x_i = W_ii x_i + sum_j W_ij Q(x_j).
    """
    m = len(xs)
    xs = [x.clone() for x in xs]

    def quantized(x: torch.Tensor, w: int, r: int) -> torch.Tensor:
        if bits is None:
            return x.clone()
        s = derive_seed(seed, w, r, 0, PHASE_SEND)
        return ref.dequantize(ref.quantize(x, bits, bucket_size, "max", s), torch.float32)

    def step(e: torch.Tensor, w: int, r: int) -> torch.Tensor:
        """Q(e) scaled by the least-squares step <Q(e), e> / <Q(e), Q(e)>."""
        q = quantized(e, w, r)
        if bits is None:
            return q
        qq = torch.dot(q, q)
        return q * (torch.dot(q, e) / qq) if float(qq) else q * qq

    def peers(w_matrix: torch.Tensor, i: int) -> list[int]:
        return [j for j in range(m) if j != i and w_matrix[i, j] > 0]

    edges = {(i, j) for r in range(rounds) for i in range(m) for j in peers(weights(r), i)}
    hat = {(i, j): xs[i].clone() for i, j in edges}
    for r in range(rounds):
        w = weights(r)
        if mode == "choco":
            for i in range(m):
                targets = peers(w, i)
                if not targets:
                    continue
                if time_varying:
                    for j in targets:
                        hat[i, j] += step(xs[i] - hat[i, j], i, r)
                else:
                    q = step(xs[i] - hat[i, targets[0]], i, r)
                    for j in targets:
                        hat[i, j] += q
            new = []
            for i in range(m):
                mix = torch.zeros_like(xs[i])
                for j in peers(w, i):
                    mix += float(w[i, j]) * (hat[j, i] - hat[i, j])
                new.append(xs[i] + gamma * mix)
        else:
            sent = [quantized(xs[j], j, r) for j in range(m)]
            new = []
            for i in range(m):
                mixed = float(w[i, i]) * xs[i]
                for j in peers(w, i):
                    mixed += float(w[i, j]) * sent[j]
                new.append(mixed)
        xs = new
    return xs


# ---- Overlap-Local-SGD (DESIGN.md 2.5) -----------------------------------------------------------


class OverlapSimulation(Simulation):
    """M workers running Overlap-Local-SGD with tau = local_steps: at every tau-th local step,
    a = the average started at the previous sync point (z at the first), v = beta v + (a - z),
    z += v, the average of the current models starts (z + the aggregated Q(x_i - z), formed here
    at once: its value does not depend on when it is collected), and x_i += alpha (z - x_i)."""

    def __init__(self, *args, alpha: float, beta: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.alpha, self.beta = alpha, beta
        self.z: list[torch.Tensor] | None = None
        self.v: list[torch.Tensor] | None = None
        self.started: list[torch.Tensor] | None = None

    def step(self) -> None:
        self._grads()
        if self.z is None:
            self.z = [p.detach().clone() for p in self.params(0)]
            self.v = [torch.zeros_like(z) for z in self.z]
        for opt in self.opts:
            opt.step()
        self.local_count += 1
        self.step_index += 1
        if self.local_count == self.k:
            self.sync()

    def sync(self) -> None:
        m = self.world
        a = self.started if self.started is not None else self.z
        for z, v, avg in zip(self.z, self.v, a, strict=True):
            v.mul_(self.beta).add_(avg - z)
            z.add_(v)
        plist = [self.params(w) for w in range(m)]
        deltas = [
            torch.cat([(p.detach() - z).reshape(-1) for p, z in zip(plist[w], self.z, strict=True)])
            for w in range(m)
        ]
        mean = self._aggregate(deltas) if self.bits is not None else sum(deltas) / m
        started, offset = [], 0
        for z in self.z:
            d = mean[offset : offset + z.numel()].view_as(z)
            started.append((z.to(torch.float32) + d).to(z.dtype))
            offset += z.numel()
        self.started = started
        with torch.no_grad():
            for w in range(m):
                for p, z in zip(plist[w], self.z, strict=True):
                    p.add_(z - p, alpha=self.alpha)
        self.round += 1
        self.local_count = 0
