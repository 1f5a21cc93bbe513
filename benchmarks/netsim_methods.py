"""The training methods the bandwidth-limited benchmark compares, in one registry.

A :class:`Method` is the one typed description of how a run averages gradients or models:
``wrap`` turns a torch optimizer into the distributed one, ``compressor`` builds its compressor,
``spec`` is what the harness writes into its result files and :meth:`Method.from_dict` reads
back (the worker from its command line; ``benchmarks/scale_model.py`` from result files, old
ones too), so the harness and the scale model describe a method the same way. Later methods
register here instead of copying the harness.

Example:
    >>> m = method("qpr-4bit-packed-sum", local_steps=8)
    >>> m.spec()["aggregation"]
    'packed-sum'
    >>> method("pr-sgd@32").local_steps
    32
    >>> Method.from_dict(m.spec()) == dataclasses.replace(m, uses_k="")
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import horovod.torch as hvd
import torch

import hvd_qpr
from hvd_qpr.compression import Compressor


@dataclasses.dataclass(frozen=True)
class Method:
    """How one run averages.

    Attributes:
        name: registry name (the scale model's row label).
        optimizer: ``"horovod"`` (plain ``hvd.DistributedOptimizer``) or ``"hvd_qpr"``.
        compression: ``"none"``, ``"fp16"``, ``"bf16"``, ``"qsgd"`` or another registered
            compressor name (built with its defaults, and ``ratio`` for a sparsifier).
        bits: QSGD bits a level (the compressor's default when None).
        elias: Elias-code the QSGD levels.
        local_steps: K (1: gradients averaged every step).
        aggregation: hvd_qpr's aggregation: ``"auto"`` or one of
            :data:`hvd_qpr.collectives.AGGREGATIONS`.
        error_feedback: wrap the compressor in ErrorFeedback (the scale model counts the
            extra decode some modes then do).
        uses_k: whether the harness's ``--local-steps`` (QPR) or ``--pr-local-steps`` (PR)
            sets K: ``"qpr"``, ``"pr"`` or ``""`` (K stays as given).
        ratio: density of a sparsifier (its default when None).
        approximate: Top-k's sampled-threshold selection.
        warmup_steps: first steps averaging dense gradients.
        topology: gossip graph (DESIGN.md 2.4) instead of ring all-reduce; None for RAR.
        gossip: ``"choco"`` (error-controlled) or ``"quantized-average"`` (the baseline).
        overlap: Overlap-Local-SGD (DESIGN.md 2.5) with tau = K and pull-back ``pullback``.
        pullback: Overlap-Local-SGD's alpha.
    """

    name: str = ""
    optimizer: str = "hvd_qpr"
    compression: str = "none"
    bits: int | None = None
    elias: bool = False
    local_steps: int = 1
    aggregation: str = "auto"
    error_feedback: bool = False
    uses_k: str = ""
    ratio: float | None = None
    approximate: bool = False
    warmup_steps: int = 0
    topology: str | None = None
    gossip: str = "choco"
    overlap: bool = False
    pullback: float = 0.6

    @classmethod
    def from_dict(cls, fields: Mapping[str, object]) -> Method:
        """The method a ``spec()`` or ``dataclasses.asdict`` JSON describes. Unknown keys are
        ignored and missing or null ones take their defaults, so the result files of older
        harnesses (fewer fields) still read.

        Example:
            >>> Method.from_dict({"compression": "qsgd", "bits": 4, "local_steps": 8}).bits
            4
        """
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in fields.items() if k in names and v is not None})

    @property
    def mixes_locally(self) -> bool:
        """Whether the workers' models differ between rounds (gossip, Overlap-Local-SGD), so
        the harness evaluates their average instead of calling ``sync_models()``."""
        return self.topology is not None or self.overlap

    def with_local_steps(self, qpr_k: int, pr_k: int) -> Method:
        k = {"qpr": qpr_k, "pr": pr_k}.get(self.uses_k, self.local_steps)
        return dataclasses.replace(self, local_steps=k)

    def compressor(self) -> Compressor:
        """hvd_qpr's compressor of this method, built by name with the fields given (for
        Horovod's fp16 the hvd_qpr cast, which sends the same bytes).

        Example:
            >>> Method(compression="qsgd", bits=2).compressor().payload_bytes(512)
            132.0
        """
        kwargs: dict[str, object] = {}
        if self.bits is not None:
            kwargs["bits"] = self.bits
        if self.elias:
            kwargs["elias"] = True
        if self.ratio is not None:
            kwargs["ratio"] = self.ratio
        if self.approximate:
            kwargs["approximate"] = True
        return hvd_qpr.Compression.from_name(self.compression, **kwargs)

    def wrap(
        self,
        opt: torch.optim.Optimizer,
        model: torch.nn.Module,
        link: hvd_qpr.Link,
    ) -> torch.optim.Optimizer:
        """The distributed optimizer of this method around opt."""
        if self.optimizer == "horovod":
            compression = hvd.Compression.fp16 if self.compression == "fp16" else None
            return hvd.DistributedOptimizer(
                opt,
                named_parameters=model.named_parameters(),
                compression=compression or hvd.Compression.none,
            )
        return hvd_qpr.DistributedOptimizer(
            opt,
            named_parameters=model.named_parameters(),
            compression=self.compressor(),
            local_steps=self.local_steps,
            warmup_steps=self.warmup_steps,
            aggregation=self.aggregation,
            error_feedback=self.error_feedback,
            named_buffers=model.named_buffers(),
            link=link,
            **self._paradigm(),
        )

    def _paradigm(self) -> dict[str, object]:
        if self.topology is not None:
            return dict(topology=self.topology, gossip=self.gossip)
        if self.overlap:
            return dict(overlap=True, pullback=self.pullback)
        return {}

    def spec(self, resolved_aggregation: str | None = None) -> dict[str, object]:
        """The method as JSON-ready fields (aggregation resolved when given)."""
        fields = dataclasses.asdict(self)
        fields.pop("uses_k")
        if self.optimizer == "horovod":
            fields["aggregation"] = "allreduce"
        elif resolved_aggregation is not None:
            fields["aggregation"] = resolved_aggregation
        return fields


_METHODS: dict[str, Method] = {}


def register_method(m: Method) -> Method:
    """Adds a method to the registry (names are unique)."""
    if m.name in _METHODS:
        raise ValueError(f"a method named {m.name!r} is already registered")
    _METHODS[m.name] = m
    return m


def method_names() -> list[str]:
    return list(_METHODS)


def method(name: str, local_steps: int | None = None) -> Method:
    """A registered method; ``NAME@K`` fixes its K (e.g. ``pr-sgd@32``, for a sweep of K in one
    run). ValueError listing the names when unknown."""
    base, _, k = name.partition("@")
    if base not in _METHODS or (k and not k.isdigit()):
        raise ValueError(f"unknown method {name!r}; registered methods: {method_names()}")
    m = _METHODS[base]
    if k:
        m = dataclasses.replace(m, name=name, local_steps=int(k), uses_k="")
    return m if local_steps is None else dataclasses.replace(m, local_steps=local_steps)


def methods(names: Iterable[str], qpr_k: int, pr_k: int) -> list[Method]:
    """The named methods with K set from the harness's flags."""
    return [method(n).with_local_steps(qpr_k, pr_k) for n in names]


def _register_defaults(add: Callable[[Method], Method]) -> None:
    add(Method("parallel-sgd", "horovod"))
    add(Method("fp16", "horovod", compression="fp16"))
    add(Method("pr-sgd", "hvd_qpr", uses_k="pr"))
    for bits in (4, 2):
        for mode in ("auto", "packed-sum", "scatter-gather", "allgather"):
            add(
                Method(
                    f"qpr-{bits}bit-{mode}", "hvd_qpr", "qsgd", bits, aggregation=mode, uses_k="qpr"
                )
            )
        add(Method(f"qpr-{bits}bit-elias", "hvd_qpr", "qsgd", bits, elias=True, uses_k="qpr"))
        add(Method(f"qpr-{bits}bit-ef", "hvd_qpr", "qsgd", bits, error_feedback=True, uses_k="qpr"))


def _register_sparsifiers(add: Callable[[Method], Method]) -> None:
    # on gradients every step (K=1, as the gTop-k paper) and on model differences (K from flags)
    for density, tag in ((0.01, ""), (0.001, "-0.001")):
        for name, mode in (("topk", "allgather"), ("gtopk", "gtopk")):
            m = Method(f"{name}-ef{tag}", "hvd_qpr", "topk", error_feedback=True, ratio=density)
            add(dataclasses.replace(m, aggregation=mode))
    add(Method("adaptive-topk-ef", "hvd_qpr", "adaptive_topk", error_feedback=True))
    for name, mode in (("topk", "allgather"), ("gtopk", "gtopk")):  # with a dense warm-up
        m = Method(f"{name}-ef-0.001-warm", "hvd_qpr", "topk", error_feedback=True, ratio=0.001)
        add(dataclasses.replace(m, aggregation=mode, approximate=True, warmup_steps=33))
    add(Method("topk-ef-pr", "hvd_qpr", "topk", error_feedback=True, uses_k="qpr"))
    add(Method("randomk-pr", "hvd_qpr", "randomk", uses_k="qpr"))
    add(Method("terngrad", "hvd_qpr", "terngrad"))
    add(Method("terngrad-pr", "hvd_qpr", "terngrad", uses_k="qpr"))
    add(Method("efsign-ef", "hvd_qpr", "efsign", error_feedback=True))
    add(Method("efsign-ef-pr", "hvd_qpr", "efsign", error_feedback=True, uses_k="qpr"))


def _register_paradigms(add: Callable[[Method], Method]) -> None:
    # gossip QPR-SGD every K steps (4 workers: "exponential" is the complete graph), with the
    # error-controlled public copies and with the baseline that averages quantized models
    for graph, tag in (("ring", "ring"), ("exponential", "exp")):
        for bits in (4, 2):
            for mode, suffix in (("choco", ""), ("quantized-average", "-naive")):
                q = Method(f"gossip-{tag}-{bits}bit{suffix}", "hvd_qpr", "qsgd", bits, uses_k="qpr")
                add(dataclasses.replace(q, topology=graph, gossip=mode))
    # Overlap-Local-SGD against the blocking PR-SGD / QPR-SGD of the same K (tau)
    add(Method("overlap-pr", "hvd_qpr", uses_k="pr", overlap=True))
    add(Method("overlap-4bit", "hvd_qpr", "qsgd", 4, uses_k="qpr", overlap=True))
    add(Method("overlap-4bit-elias", "hvd_qpr", "qsgd", 4, elias=True, uses_k="qpr", overlap=True))


_register_defaults(register_method)
_register_sparsifiers(register_method)
_register_paradigms(register_method)
