"""Scale projections of (Q)PR-SGD from the cost model behind ``aggregation="auto"``.

DESIGN.md 2.3 describes the cost model in :mod:`hvd_qpr.collectives` (bytes on the wire, number of
collectives, latency and bandwidth per link) that chooses an aggregation mode; it is "also what the
scale projections in benchmarks use". This script feeds that model with measured kernel
throughput (``benchmarks/kernels.py`` JSON) and a link (bandwidth, latency), and predicts one
synchronization round and one epoch of each method for M = 2 .. 1024 workers at 1, 10 and
100 Gbit/s:

* ``round = K * compute_per_step + codec + comm``, where ``comm`` is
  :func:`hvd_qpr.collectives.estimate_seconds` of the mode and compressor, and ``codec`` the
  quantize / dequantize passes that mode performs (its record's ``codec_passes`` in
  :data:`hvd_qpr.collectives.MODES`) at the measured single-thread native throughput;
* ``epoch = dataset_steps / M / K * round``: a fixed dataset of ``dataset_steps`` mini-batches is
  split among M workers.

It then checks the model against the network-simulation harness (``netsim_*.json``: measured
seconds per step at M = 2 and 4) and reports the prediction error, and plots the projections.
A method is the harness's own :class:`netsim_methods.Method`: the projected ones are built here,
the harness's are read back from its result files with :meth:`~netsim_methods.Method.from_dict`.

Inputs and outputs (``--out-dir``): ``scale_model.json`` (every prediction and the validation),
``scale_epoch_{1,10,100}gbit.png`` (epoch time against M, log-log),
``scale_model_validation.md`` (when harness results exist) and, with ``--markdown``, a report
section (:func:`markdown_report`).

Example::

    python benchmarks/scale_model.py --markdown benchmarks/results/scale_model.md
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netsim_methods import Method  # noqa: E402
from results_md import update_results_md  # noqa: E402

from hvd_qpr.collectives import (
    Link,
    aggregation_mode,
    choose_aggregation,
    estimate_seconds,
    estimate_wire_bytes,
    feasible_aggregations,
)
from hvd_qpr.compression import Compressor

RESULTS = Path(__file__).resolve().parent / "results"
WORKERS: tuple[int, ...] = tuple(2**k for k in range(1, 11))
BANDWIDTHS_GBIT: tuple[float, ...] = (1.0, 10.0, 100.0)
REPORT_WORKERS: tuple[int, ...] = (2, 16, 128, 1024)
WIRE_WORKERS: tuple[int, ...] = (2, 4, 16, 64, 256, 1024)
QPR_MODES: tuple[str, ...] = ("packed-sum", "scatter-gather", "allgather", "auto")
SPARSE_MODES: tuple[str, ...] = ("allgather", "gtopk")
# Used when neither a harness result nor a flag gives them: ResNet-50 on ImageNet, 32 images a
# worker and step (1,281,167 images), 100 ms a step.
DEFAULT_PARAMETERS = 25_557_032
DEFAULT_DATASET_STEPS = 40_037
DEFAULT_COMPUTE_MS = 100.0
DEFAULT_LATENCY_US = 100.0


# The projected methods, named as their rows; the QPR-SGD ones are expanded over QPR_MODES, the
# sparse one over SPARSE_MODES. K = 16 as the bandwidth-limited harness runs them by default;
# Top-k at K = 1 on gradients, as in the gTop-k paper (Shi et al., ICDCS 2019).
METHODS: tuple[Method, ...] = (
    Method("parallel SGD fp32", "horovod", aggregation="allreduce"),
    Method("parallel SGD fp16", "horovod", compression="fp16", aggregation="allreduce"),
    Method("PR-SGD", local_steps=16, aggregation="allreduce"),
    Method("QPR-SGD 4-bit", compression="qsgd", bits=4, local_steps=16),
    Method("QPR-SGD 2-bit", compression="qsgd", bits=2, local_steps=16),
    Method(
        "Top-k 0.001 EF", compression="topk", ratio=0.001, approximate=True, error_feedback=True
    ),
)


@dataclasses.dataclass(frozen=True)
class KernelThroughput:
    """Seconds per value of each kernel at each bit width (native, one thread).

    Attributes:
        per_value: ``{op: {bits: seconds per value}}``.
        source: where the numbers come from.

    Example:
        >>> kt = KernelThroughput({"quantize": {2: 0.25, 4: 0.75}})
        >>> kt.seconds("quantize", 3, 2)
        1.0
    """

    per_value: dict[str, dict[int, float]]
    source: str = ""
    select_per_value: dict[str, dict[float, float]] = dataclasses.field(default_factory=dict)

    def select_seconds(self, approximate: bool, density: float, numel: float) -> float:
        """Seconds of one Top-k selection (the measured density nearest on a log scale).

        Raises:
            ValueError: that selection was not measured.
        """
        impl = "approximate" if approximate else "exact"
        table = self.select_per_value.get(impl)
        if not table:
            raise ValueError(
                f"no one-thread {impl} topk_select records in {self.source or 'input'}"
            )
        nearest = min(table, key=lambda d: abs(math.log(d / density)))
        return table[nearest] * numel

    def seconds(self, op: str, bits: int, numel: float) -> float:
        """Seconds to run op on numel values at bits (linear in bits between measured widths,
        the nearest measured width outside them).

        Raises:
            ValueError: op was not measured.
        """
        table = self.per_value.get(op)
        if not table:
            raise ValueError(f"no native single-thread {op!r} records in {self.source or 'input'}")
        known = sorted(table)
        lo = max([b for b in known if b <= bits], default=known[0])
        hi = min([b for b in known if b >= bits], default=known[-1])
        if lo == hi:
            return table[lo] * numel
        t = (bits - lo) / (hi - lo)
        return ((1 - t) * table[lo] + t * table[hi]) * numel


@dataclasses.dataclass(frozen=True)
class Workload:
    """What one training run costs apart from communication.

    Attributes:
        parameters: n, values synchronized a round.
        compute_per_step: seconds of one local step (forward, backward, update).
        dataset_steps: mini-batches in one pass over the data for one worker alone.
        latency: seconds per message step of a collective.
        source: where the numbers come from.
    """

    parameters: int = DEFAULT_PARAMETERS
    compute_per_step: float = DEFAULT_COMPUTE_MS / 1e3
    dataset_steps: float = DEFAULT_DATASET_STEPS
    latency: float = DEFAULT_LATENCY_US / 1e6
    source: str = "defaults"


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One predicted synchronization round and epoch (all times in seconds).

    Attributes:
        mode: the aggregation requested; ``chosen`` is what runs (differs for ``"auto"``).
    """

    method: str
    mode: str
    chosen: str
    workers: int
    bandwidth_gbit: float
    local_steps: int
    compute_seconds: float
    codec_seconds: float
    comm_seconds: float
    round_seconds: float
    epoch_seconds: float
    wire_bytes: float


def load_kernel_throughput(
    path: str | Path, select_path: str | Path | None = None
) -> KernelThroughput:
    """Seconds per value of each native kernel, from ``benchmarks/kernels.py`` JSON records.

    Uses the native records at one thread (the fewest threads measured if none has one) and, per
    op and bit width, the largest numel (the cache-cold, streaming rate).

    Args:
        path: the kernel benchmark JSON (a list of records).
        select_path: the Top-k selection records (:func:`load_select_throughput`), if any.

    Returns:
        Per-op, per-bits seconds a value.

    Example:
        >>> kt = load_kernel_throughput("benchmarks/results/kernels_cpu.json")
        >>> sorted(kt.per_value["quantize"])
        [2, 4, 8]
    """
    records = [r for r in json.loads(Path(path).read_text()) if r.get("impl") == "native"]
    if not records:
        raise ValueError(f"{path}: no native kernel records")
    threads = min(r["threads"] for r in records)
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        if r.get("bits") is None:
            continue
        key = (r["op"], int(r["bits"]))
        if r["threads"] == threads and (key not in best or r["numel"] > best[key]["numel"]):
            best[key] = r
    per_value: dict[str, dict[int, float]] = {}
    for (op, bits), r in best.items():
        per_value.setdefault(op, {})[bits] = r["seconds"] / r["numel"]
    return KernelThroughput(per_value, str(path), load_select_throughput(select_path))


def load_select_throughput(path: str | Path | None) -> dict[str, dict[float, float]]:
    """Seconds per value of Top-k selection (``{impl: {density: s}}``, one thread, largest numel)
    from ``benchmarks/kernels.py --topk-densities`` records; empty when path is None or absent.

    Example:
        >>> sorted(load_select_throughput("benchmarks/results/topk_select_cpu.json"))
        ['approximate', 'exact']
    """
    if path is None or not Path(path).exists():
        return {}
    records = [r for r in json.loads(Path(path).read_text()) if r.get("op") == "topk_select"]
    best: dict[tuple[str, float], dict[str, Any]] = {}
    for r in records:
        key = (r["impl"], float(r["density"]))
        if r["threads"] == 1 and (key not in best or r["numel"] > best[key]["numel"]):
            best[key] = r
    out: dict[str, dict[float, float]] = {}
    for (impl, density), r in best.items():
        out.setdefault(impl, {})[density] = r["seconds"] / r["numel"]
    return out


def resolve_mode(
    method: Method, compressor: Compressor, numel: int, workers: int, link: Link
) -> str:
    """The aggregation that runs: ``"auto"`` resolved by the optimizer's own cost model.

    Raises:
        ValueError: the mode is not feasible for the compressor.

    Example:
        >>> resolve_mode(Method(), Method().compressor(), 10**6, 4, Link())
        'allreduce'
    """
    if method.aggregation == "auto":
        return choose_aggregation(compressor, numel, workers, link)
    if method.aggregation not in feasible_aggregations(compressor):
        raise ValueError(f"aggregation {method.aggregation!r} is not feasible for {compressor}")
    return method.aggregation


def codec_seconds(
    mode: str, method: Method, numel: int, workers: int, throughput: KernelThroughput
) -> float:
    """Seconds one worker spends quantizing and decoding in one round (the mode record's
    ``codec_passes``, :data:`hvd_qpr.collectives.MODES`).

    Example:
        >>> kt = KernelThroughput({"quantize": {4: 1e-9}, "dequantize": {4: 1e-9}})
        >>> codec_seconds("allgather", Method(compression="qsgd", bits=4), 1000, 4, kt)
        5e-06
    """
    if method.compression == "topk" and mode in SPARSE_MODES:
        # one selection a round; merging and scattering k·log M or k·M entries is left out
        return throughput.select_seconds(method.approximate, method.ratio or 0.01, numel)
    passes = aggregation_mode(mode).codec_passes(workers, method.error_feedback)
    quantize_only, encoded, decoded = passes
    if method.compression != "qsgd" or encoded + decoded == 0:
        return 0.0
    bits = method.bits or 4
    encode = throughput.seconds("quantize", bits, numel)
    decode = throughput.seconds("dequantize", bits, numel)
    plain = encode
    if method.elias:
        encode += throughput.seconds("elias_encode", bits, numel)
        decode += throughput.seconds("elias_decode", bits, numel)
    return quantize_only * plain + encoded * encode + decoded * decode


def predict_round(
    method: Method,
    workers: int,
    link: Link,
    workload: Workload,
    throughput: KernelThroughput,
) -> Prediction:
    """One synchronization round (K local steps, codec, communication) and the epoch it implies.

    Args:
        method: what runs; its name is carried into the result.
        workers: M.
        link: bandwidth (bytes/s) and latency of each worker's link.
        workload: parameters, compute per step, dataset size.
        throughput: kernel seconds per value.

    Returns:
        The prediction; ``epoch_seconds = dataset_steps / M / K * round_seconds``.

    Example:
        >>> kt = KernelThroughput({"quantize": {4: 1e-9}, "dequantize": {4: 1e-9}})
        >>> p = predict_round(Method("PR-SGD", local_steps=8), 4, Link(), Workload(), kt)
        >>> p.compute_seconds
        0.8
    """
    n = workload.parameters
    compressor = method.compressor()
    chosen = resolve_mode(method, compressor, n, workers, link)
    compute = method.local_steps * workload.compute_per_step
    codec = codec_seconds(chosen, method, n, workers, throughput)
    comm = estimate_seconds(chosen, compressor, n, workers, link)
    round_seconds = compute + codec + comm
    rounds = workload.dataset_steps / workers / method.local_steps
    return Prediction(
        method=method.name,
        mode=method.aggregation,
        chosen=chosen,
        workers=workers,
        bandwidth_gbit=round(link.bandwidth * 8 / 1e9, 9),
        local_steps=method.local_steps,
        compute_seconds=compute,
        codec_seconds=codec,
        comm_seconds=comm,
        round_seconds=round_seconds,
        epoch_seconds=rounds * round_seconds,
        wire_bytes=estimate_wire_bytes(chosen, compressor, n, workers),
    )


def projected_methods() -> list[Method]:
    """:data:`METHODS` with each quantized method under every mode of :data:`QPR_MODES` (the
    sparse one under every mode of :data:`SPARSE_MODES`).

    Example:
        >>> len(projected_methods())
        13
    """
    out: list[Method] = []
    for m in METHODS:
        modes = {"qsgd": QPR_MODES, "topk": SPARSE_MODES}.get(m.compression, (m.aggregation,))
        out += [dataclasses.replace(m, aggregation=mode) for mode in modes]
    return out


def sweep(
    workload: Workload,
    throughput: KernelThroughput,
    workers: Sequence[int] = WORKERS,
    bandwidths_gbit: Sequence[float] = BANDWIDTHS_GBIT,
) -> list[Prediction]:
    """Predictions of every projected method at every M and bandwidth.

    Example:
        >>> kt = load_kernel_throughput("benchmarks/results/kernels_cpu.json")
        >>> len(sweep(Workload(), kt))
        390
    """
    return [
        predict_round(method, m, Link(gbit * 1e9 / 8, workload.latency), workload, throughput)
        for gbit in bandwidths_gbit
        for method in projected_methods()
        for m in workers
    ]


# ---- harness results ----------------------------------------------------------------------------


def load_harness(pattern: str) -> list[tuple[str, dict[str, Any]]]:
    """The harness results matching a glob, as (path, contents), sorted by path.

    Example:
        >>> load_harness("/nonexistent/netsim_*.json")
        []
    """
    return [(p, json.loads(Path(p).read_text())) for p in sorted(glob.glob(pattern))]


def baseline_compute_per_step(result: dict[str, Any]) -> float | None:
    """Compute seconds a step of the harness's parallel-SGD method (fp32, K = 1; else any K = 1
    method, else any), or None when no method reports compute time.

    Example:
        >>> spec = {"compression": "none", "local_steps": 1}
        >>> r = {"methods": {"p": {"spec": spec, "steps": 10, "compute_seconds": 2.0}}}
        >>> baseline_compute_per_step(r)
        0.2
    """
    methods = [m for m in result.get("methods", {}).values() if m.get("steps")]
    methods = [m for m in methods if m.get("compute_seconds") is not None]

    def rank(m: dict[str, Any]) -> tuple[bool, bool, bool]:
        spec = Method.from_dict(m.get("spec", {}))
        return (spec.local_steps != 1, spec.compression != "none", spec.optimizer != "horovod")

    if not methods:
        return None
    best = min(methods, key=rank)
    return best["compute_seconds"] / best["steps"]


def workload_from_harness(
    result: dict[str, Any] | None,
    parameters: int | None = None,
    compute_ms: float | None = None,
    dataset_steps: float | None = None,
    latency_us: float = DEFAULT_LATENCY_US,
) -> Workload:
    """The workload: flags first, then the harness result, then the defaults.

    Example:
        >>> workload_from_harness(None, compute_ms=20.0).compute_per_step
        0.02
    """
    config = (result or {}).get("config", {})
    compute = baseline_compute_per_step(result) if result else None
    harness_steps = None
    if config.get("steps_per_epoch") and config.get("workers"):
        harness_steps = config["steps_per_epoch"] * config["workers"]
    return Workload(
        parameters=int(parameters or config.get("parameters") or DEFAULT_PARAMETERS),
        compute_per_step=(
            compute_ms / 1e3 if compute_ms is not None else compute or DEFAULT_COMPUTE_MS / 1e3
        ),
        dataset_steps=float(dataset_steps or harness_steps or DEFAULT_DATASET_STEPS),
        latency=latency_us / 1e6,
        source=(
            "the given workload"
            if parameters or compute_ms is not None or dataset_steps
            else config.get("workload", "defaults")
            if result
            else "defaults"
        ),
    )


def validate(
    result: dict[str, Any],
    throughput: KernelThroughput,
    latency_us: float = DEFAULT_LATENCY_US,
    compute_ms: float | None = None,
) -> list[dict[str, Any]]:
    """Predicted against measured seconds a step for every method of one harness result.

    The prediction uses the result's own M, bandwidth, n, K and mode, and the compute time a
    step of its parallel-SGD method (``compute_ms`` when it reports none); a step costs
    ``round / K``.

    Returns:
        One row per method: method, mode, workers, bandwidth_mbit, predicted and measured seconds
        a step, and ``error_pct = 100 * (predicted - measured) / measured``.

    Example:
        >>> result = json.loads(Path("benchmarks/results/netsim_m2.json").read_text())
        >>> rows = validate(result, kt)
        >>> rows[0]["workers"], rows[0]["bandwidth_mbit"]
        (2, 1000.0)
    """
    config = result["config"]
    own = baseline_compute_per_step(result)
    workload = workload_from_harness(
        result, compute_ms=None if own is not None else compute_ms, latency_us=latency_us
    )
    link = Link(config["bandwidth_mbit"] * 1e6 / 8, workload.latency)
    rows = []
    for name, run in result["methods"].items():
        if not run.get("steps"):  # stopped before its first step: nothing measured
            continue
        method = dataclasses.replace(Method.from_dict(run["spec"]), name=name)
        if method.mixes_locally:
            continue  # gossip and Overlap-Local-SGD are not in the ring all-reduce cost model
        p = predict_round(method, config["workers"], link, workload, throughput)
        predicted = p.round_seconds / method.local_steps
        measured = run["wall_seconds"] / run["steps"]
        rows.append(
            {
                "method": name,
                "mode": method.aggregation,
                "chosen": p.chosen,
                "workers": config["workers"],
                "bandwidth_mbit": config["bandwidth_mbit"],
                "predicted_s_per_step": predicted,
                "measured_s_per_step": measured,
                "error_pct": 100.0 * (predicted - measured) / measured,
            }
        )
    return rows


# ---- reports ------------------------------------------------------------------------------------


def validation_table(rows: Sequence[dict[str, Any]]) -> str:
    """The validation rows as a markdown table.

    Example:
        >>> validation_table([]).splitlines()[0]
        '| method | mode | M | bandwidth (Mbit/s) | predicted s/step | measured s/step | error % |'
    """
    lines = [
        "| method | mode | M | bandwidth (Mbit/s) | predicted s/step | measured s/step | error % |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        mode = r["mode"] if r["mode"] == r["chosen"] else f"{r['mode']} ({r['chosen']})"
        lines.append(
            f"| {r['method']} | {mode} | {r['workers']} | {r['bandwidth_mbit']:g} | "
            f"{r['predicted_s_per_step']:.4g} | {r['measured_s_per_step']:.4g} | "
            f"{r['error_pct']:+.1f} |"
        )
    return "\n".join(lines)


def projection_table(
    predictions: Sequence[Prediction], workers: Sequence[int] = REPORT_WORKERS
) -> str:
    """Epoch seconds of each method and mode at a few M, for each bandwidth (markdown).

    Example:
        >>> projection_table(sweep(Workload(), kt)).splitlines()[0][:30]
        '| method | mode | 1G M=2 | 1G M'
    """
    bandwidths = sorted({p.bandwidth_gbit for p in predictions})
    index = {(p.method, p.mode, p.bandwidth_gbit, p.workers): p for p in predictions}
    columns = [(g, m) for g in bandwidths for m in workers]
    head = " | ".join(f"{g:g}G M={m}" for g, m in columns)
    lines = [f"| method | mode | {head} |", "|---|---|" + "---:|" * len(columns)]
    rows = dict.fromkeys((p.method, p.mode) for p in predictions)
    for method, mode in rows:
        cells = []
        for g, m in columns:
            p = index.get((method, mode, g, m))
            cells.append(f"{p.epoch_seconds:.3g}" if p else "")
        lines.append(f"| {method} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wire_table(predictions: Sequence[Prediction], workers: Sequence[int] = WIRE_WORKERS) -> str:
    """Megabytes one worker sends a round, per method and mode, at a few M (markdown; the bytes
    do not depend on the bandwidth). The sparse rows show allgather's k·M against gTop-k's k·log M.

    Example:
        >>> wire_table(sweep(Workload(), kt)).splitlines()[0]
        '| method | mode | M=2 | M=4 | M=16 | M=64 | M=256 | M=1024 |'
    """
    index = {(p.method, p.mode, p.workers): p.wire_bytes for p in predictions}
    lines = [
        "| method | mode | " + " | ".join(f"M={m}" for m in workers) + " |",
        "|---|---|" + "---:|" * len(workers),
    ]
    # "auto" is left out: what it picks, so what it sends, depends on the bandwidth
    for method, mode in dict.fromkeys((p.method, p.mode) for p in predictions if p.mode != "auto"):
        cells = [index.get((method, mode, m)) for m in workers]
        text = ["" if c is None else f"{c / 1e6:.3g}" for c in cells]
        lines.append(f"| {method} | {mode} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def markdown_report(
    predictions: Sequence[Prediction],
    validation: Sequence[dict[str, Any]],
    workload: Workload,
) -> str:
    """A markdown section: the projection table and the validation table.

    Example:
        >>> markdown_report(sweep(Workload(), kt), [], Workload()).splitlines()[0]
        '### Scale projections (cost model, DESIGN.md 2.3)'
    """
    parts = [
        "### Scale projections (cost model, DESIGN.md 2.3)",
        "",
        f"Epoch seconds of {workload.source}: n = {workload.parameters:,} parameters, "
        f"{workload.compute_per_step * 1e3:.3g} ms compute a step, "
        f"{workload.dataset_steps:,.0f} mini-batches an epoch split among M workers, "
        f"{workload.latency * 1e6:g} us latency; QPR-SGD and PR-SGD with K = 16.",
        "",
        projection_table(predictions),
        "",
        "#### Megabytes a worker sends a round",
        "",
        wire_table(predictions),
        "",
        "#### Validation against the harness (seconds a step)",
        "",
    ]
    if validation:
        errors = [abs(r["error_pct"]) for r in validation]
        parts += [
            validation_table(validation),
            "",
            f"Mean absolute error {sum(errors) / len(errors):.1f} %, largest {max(errors):.1f} %.",
        ]
    else:
        parts.append("No harness results given (--netsim): not validated.")
    return "\n".join(parts) + "\n"


def line_style(method: str, mode: str) -> dict[str, Any]:
    """Colour by method, line style by aggregation mode."""
    colours = {m.name: f"C{i}" for i, m in enumerate(METHODS)}
    dashes = {
        "allreduce": "-",
        "packed-sum": "-",
        "scatter-gather": "--",
        "allgather": ":",
        "gtopk": "-.",
    }
    style = {"color": colours.get(method, "k"), "linestyle": dashes.get(mode, "-")}
    if mode == "auto":  # a wide pale band under the mode it picks
        style.update(linewidth=6, alpha=0.25, marker=None)
    return style


def plot_projections(predictions: Sequence[Prediction], out_dir: Path, tag: str = "") -> list[Path]:
    """One log-log plot of epoch seconds against M for each bandwidth; the PNG paths.

    Example:
        >>> plot_projections(sweep(Workload(), kt), Path("/tmp"))[0].name
        'scale_epoch_1gbit.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for gbit in sorted({p.bandwidth_gbit for p in predictions}):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        lines: dict[tuple[str, str], list[Prediction]] = {}
        for p in predictions:
            if p.bandwidth_gbit == gbit:
                lines.setdefault((p.method, p.mode), []).append(p)
        for (method, mode), points in lines.items():
            points.sort(key=lambda p: p.workers)
            label = method if mode == "allreduce" else f"{method}, {mode}"
            xs, ys = [p.workers for p in points], [p.epoch_seconds for p in points]
            style = {"marker": "o", "markersize": 3, **line_style(method, mode)}
            ax.plot(xs, ys, label=label, **style)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("workers M")
        ax.set_ylabel("epoch seconds (predicted)")
        ax.set_title(f"Projected epoch time at {gbit:g} Gbit/s")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / f"scale_epoch_{tag + '_' if tag else ''}{gbit:g}gbit.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_wire_bytes(predictions: Sequence[Prediction], out_dir: Path, tag: str = "") -> Path:
    """Log-log plot of the bytes one worker sends a round against M; the PNG path.

    Example:
        >>> plot_wire_bytes(sweep(Workload(), kt), Path("/tmp")).name
        'scale_wire_bytes.png'
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    first = min(p.bandwidth_gbit for p in predictions)
    lines: dict[tuple[str, str], list[Prediction]] = {}
    for p in predictions:
        if p.bandwidth_gbit == first and p.mode != "auto":
            lines.setdefault((p.method, p.mode), []).append(p)
    for (method, mode), points in lines.items():
        points.sort(key=lambda p: p.workers)
        label = method if mode == "allreduce" else f"{method}, {mode}"
        style = {"marker": "o", "markersize": 3, **line_style(method, mode)}
        ax.plot([p.workers for p in points], [p.wire_bytes for p in points], label=label, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("workers M")
    ax.set_ylabel("bytes a worker sends a round")
    ax.set_title("Wire bytes a round (DESIGN.md 2.3)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = out_dir / f"scale_wire_bytes{'_' + tag if tag else ''}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernels", default=str(RESULTS / "kernels_cpu.json"))
    parser.add_argument(
        "--topk-select",
        default=str(RESULTS / "topk_select_cpu.json"),
        help="Top-k selection records (kernels.py --topk-densities)",
    )
    parser.add_argument("--netsim", default=str(RESULTS / "netsim_*.json"), help="glob")
    parser.add_argument("--parameters", type=int, help="n (default: harness, else ResNet-50)")
    parser.add_argument("--compute-ms", type=float, help="compute a local step (default: harness)")
    parser.add_argument("--dataset-steps", type=float, help="mini-batches an epoch at M = 1")
    parser.add_argument("--latency-us", type=float, default=DEFAULT_LATENCY_US)
    parser.add_argument("--out-dir", default=str(RESULTS))
    parser.add_argument("--markdown", help="also write the report section here")
    parser.add_argument("--tag", default="", help="names the outputs (scale_epoch_TAG_1gbit.png)")
    parser.add_argument(
        "--results-md", help="also replace the section scale_model_TAG of this results file"
    )
    parser.add_argument("--title", default="", help="appended to the section's heading")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Projects, validates, plots and writes the results; 0 on success.

    Example:
        >>> main(["--out-dir", "/tmp/scale", "--compute-ms", "50"])
        0
    """
    args = parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    throughput = load_kernel_throughput(args.kernels, args.topk_select)
    harness = load_harness(args.netsim)
    workload = workload_from_harness(
        harness[0][1] if harness else None,
        args.parameters,
        args.compute_ms,
        args.dataset_steps,
        args.latency_us,
    )
    predictions = sweep(workload, throughput)
    validation = [
        row for _, r in harness for row in validate(r, throughput, args.latency_us, args.compute_ms)
    ]
    if validation:
        table = validation_table(validation)
        print(table)
        (out_dir / f"scale_model_validation{'_' + args.tag if args.tag else ''}.md").write_text(
            table + "\n"
        )
    else:
        print(f"note: no harness results match {args.netsim}; validation skipped")
    document = {
        "inputs": {
            "kernels": args.kernels,
            "netsim": [p for p, _ in harness],
            "workload": dataclasses.asdict(workload),
            "kernel_seconds_per_value": throughput.per_value,
        },
        "predictions": [dataclasses.asdict(p) for p in predictions],
        "validation": validation,
    }
    tag = args.tag
    (out_dir / f"scale_model{'_' + tag if tag else ''}.json").write_text(
        json.dumps(document, indent=1) + "\n"
    )
    pngs = [
        *plot_projections(predictions, out_dir, tag),
        plot_wire_bytes(predictions, out_dir, tag),
    ]
    for path in pngs:
        print(f"wrote {path}")
    report = markdown_report(predictions, validation, workload)
    if args.title:
        heading, _, rest = report.partition("\n")
        report = (
            heading.replace("Scale projections", f"Scale projections, {args.title}") + "\n" + rest
        )
    if args.markdown:
        Path(args.markdown).write_text(report)
    if args.results_md:
        results_md = Path(args.results_md)
        images = "".join(f"![{p.stem}]({os.path.relpath(p, results_md.parent)})\n" for p in pngs)
        update_results_md(results_md, f"scale_model_{tag or 'default'}", f"{report}\n{images}")
    print(projection_table(predictions))
    return 0 if all(math.isfinite(p.round_seconds) for p in predictions) else 1


if __name__ == "__main__":
    sys.exit(main())
