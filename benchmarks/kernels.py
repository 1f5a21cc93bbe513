"""Micro-benchmarks of the hvd_qpr kernels against the pure-PyTorch reference and a memory copy.

For every size (``--sizes``, log2 of the element count), bit width (``--bits``) and thread count
(``--threads``) it times, on Gaussian float32 input:

* ``quantize``, ``dequantize``, ``elias_encode`` and ``elias_decode`` from ``hvd_qpr.ops``
  (impl ``native``); quantize, dequantize and elias_decode write into preallocated outputs
  (``out=``), as the
  copy does, since a fresh output costs page faults that dwarf the kernel (``x.clone()`` of
  2**24 floats takes about 8 copies' time here);
* the same four functions from ``hvd_qpr.reference`` (impl ``reference``). The reference Elias coder
  is pure Python and very slow, so it is timed only up to ``--reference-elias-max-log2``;
* ``out.copy_(x)`` of the same input into a preallocated float32 tensor (op and impl ``copy``):
  the memory-bandwidth anchor every other number is compared with.

Each number is the median of at least ``--repeats`` timed calls after warm-up calls (more calls
for fast ops, up to a time budget). Inputs larger than the last-level cache are rotated between
several distinct tensors so that no call reads data a previous call left in the cache.

The JSON output (``--json``) is a list of records with the keys ``op``, ``impl``, ``device``,
``numel``, ``bits``, ``bucket_size``, ``threads``, ``seconds``, ``gbytes_per_s`` and ``machine``,
where ``gbytes_per_s`` is ``numel * 4 / seconds / 1e9`` for every op (the float32 size of the
input, whatever the op really reads and writes), and ``bits``/``bucket_size`` are ``null`` for the
copy. A readable table with the time ratios native/copy and native/reference goes to stdout.

Example::

    python benchmarks/kernels.py --device cpu --json benchmarks/results/kernels_cpu.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

OPS: tuple[str, ...] = ("quantize", "dequantize", "elias_encode", "elias_decode")
NORM = "max"
INPUT_SEED = 20240611
# Inputs at least this many times the last-level cache are timed cold, rotating between
# ROTATING_INPUTS distinct tensors (with their outputs in between, the working set of the other
# tensors evicts each input before it is read again).
ROTATING_INPUTS = 3
DEFAULT_LLC_BYTES = 32 * 2**20
WARMUP_SECONDS = 0.2
MAX_WARMUP_CALLS = 3
MEASURE_SECONDS = 1.0
MAX_REPEATS = 200


@dataclass(frozen=True)
class Record:
    """One timed measurement, as written to the JSON file."""

    op: str
    impl: str
    device: str
    numel: int
    bits: int | None
    bucket_size: int | None
    threads: int
    seconds: float
    gbytes_per_s: float
    machine: str
    density: float | None = None  # Top-k selection records only


@dataclass(frozen=True)
class Impl:
    """An implementation of the four kernels under a name (``native`` or ``reference``)."""

    name: str
    quantize: Callable[..., Any]
    dequantize: Callable[..., torch.Tensor]
    elias_encode: Callable[[Any], Any]
    elias_decode: Callable[[Any], Any]
    takes_out: bool = False  # quantize and dequantize accept preallocated outputs (out=)


def impl_from_module(name: str, module: ModuleType, takes_out: bool = False) -> Impl:
    """Collects the four kernel functions of ``module``."""
    return Impl(name, *(getattr(module, op) for op in OPS), takes_out=takes_out)


def machine_name(device: torch.device) -> str:
    """The CPU model (from /proc/cpuinfo where there is one) or the CUDA device name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def last_level_cache_bytes(device: torch.device) -> int:
    """The size of the largest cache of the device (CPU: from sysfs), or a default."""
    if device.type == "cuda":
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)
        return int(size) or DEFAULT_LLC_BYTES
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    best = 0
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip()
        try:
            best = max(best, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except ValueError:
            continue
    return best or DEFAULT_LLC_BYTES


def synchronize(device: torch.device) -> None:
    """Waits for all queued work on ``device``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[int], object], call: int, device: torch.device) -> float:
    """Seconds one call ``fn(call)`` takes, from start to the end of its device work."""
    if device.type == "cuda":
        synchronize(device)
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(call)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn(call)
    return time.perf_counter() - begin


def median_seconds(fn: Callable[[int], object], device: torch.device, min_repeats: int) -> float:
    """Median time of ``fn(i)``: warm-up calls, then at least ``min_repeats`` timed calls.

    ``fn`` gets the call number (callers use it to pick the input and the seed). Fast functions are
    called more often, until about ``MEASURE_SECONDS`` have been spent (at most ``MAX_REPEATS``).
    """
    call = 0
    spent = 0.0
    first = math.inf
    while call < MAX_WARMUP_CALLS and (call == 0 or spent < WARMUP_SECONDS):
        elapsed = time_call(fn, call, device)
        first = min(first, elapsed)
        spent += elapsed
        call += 1
    repeats = max(min_repeats, min(MAX_REPEATS, int(MEASURE_SECONDS / max(first, 1e-9))))
    samples = [time_call(fn, call + i, device) for i in range(repeats)]
    return statistics.median(samples)


def make_inputs(numel: int, count: int, device: torch.device) -> list[torch.Tensor]:
    """``count`` distinct standard-Gaussian float32 tensors, the same on every run and device."""
    generator = torch.Generator().manual_seed(INPUT_SEED)
    return [torch.randn(numel, generator=generator).to(device) for _ in range(count)]


def bench_impl(
    impl: Impl,
    inputs: Sequence[torch.Tensor],
    bits: int,
    bucket_size: int,
    device: torch.device,
    repeats: int,
    with_elias: bool,
) -> dict[str, float]:
    """Median seconds of each kernel of ``impl`` (Elias coding only if ``with_elias``)."""
    n = len(inputs)

    def quantize(call: int, **out: Any) -> Any:
        return impl.quantize(
            inputs[call % n], bits=bits, bucket_size=bucket_size, norm=NORM, seed=call, **out
        )

    quantized = [quantize(i) for i in range(n)]
    if impl.takes_out:
        q_out = quantize(0)
        x_out = torch.empty_like(inputs[0])
        results = {"quantize": median_seconds(lambda c: quantize(c, out=q_out), device, repeats)}
        results["dequantize"] = median_seconds(
            lambda call: impl.dequantize(quantized[call % n], out=x_out), device, repeats
        )
    else:
        results = {"quantize": median_seconds(quantize, device, repeats)}
        results["dequantize"] = median_seconds(
            lambda call: impl.dequantize(quantized[call % n]), device, repeats
        )
    if with_elias:
        results["elias_encode"] = median_seconds(
            lambda call: impl.elias_encode(quantized[call % n]), device, repeats
        )
        encoded = [impl.elias_encode(q) for q in quantized]
        synchronize(device)
        if impl.takes_out:
            results["elias_decode"] = median_seconds(
                lambda call: impl.elias_decode(encoded[call % n], out=q_out), device, repeats
            )
        else:
            results["elias_decode"] = median_seconds(
                lambda call: impl.elias_decode(encoded[call % n]), device, repeats
            )
    return results


def bench_copy(inputs: Sequence[torch.Tensor], device: torch.device, repeats: int) -> float:
    """Median seconds of ``out.copy_(x)`` into a preallocated float32 tensor."""
    out = torch.empty_like(inputs[0])
    n = len(inputs)
    return median_seconds(lambda call: out.copy_(inputs[call % n]), device, repeats)


def bench_topk(
    inputs: Sequence[torch.Tensor], density: float, device: torch.device, repeats: int
) -> dict[str, float]:
    """Median seconds of Top-k selection (indices and values of the k largest magnitudes):
    ``torch.topk`` over everything against the sampled threshold (``approximate=True``)."""
    from hvd_qpr.compression import TopKCompressor

    n = len(inputs)
    k = TopKCompressor(density).k(inputs[0].numel())
    results = {}
    for impl, compressor in (
        ("exact", TopKCompressor(density)),
        ("approximate", TopKCompressor(density, approximate=True)),
    ):
        results[impl] = median_seconds(
            lambda call, c=compressor: c.select(inputs[call % n], k, call), device, repeats
        )
    return results


def gbytes_per_s(numel: int, seconds: float) -> float:
    """Throughput counted as the float32 input size: ``numel * 4 / seconds / 1e9``."""
    return numel * 4 / seconds / 1e9


def format_seconds(seconds: float | None) -> str:
    """A time in engineering units, or ``-`` for a skipped measurement."""
    if seconds is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def format_ratio(numerator: float | None, denominator: float | None) -> str:
    """``numerator / denominator`` to three digits, or ``-`` when either is missing."""
    if numerator is None or denominator is None:
        return "-"
    return f"{numerator / denominator:.3g}"


def print_table(
    numel: int,
    bits: int,
    bucket_size: int,
    threads: int,
    copy_seconds: float,
    times: dict[str, dict[str, float]],
    notes: Sequence[str],
) -> None:
    """Prints one group of measurements: per op the times, the native throughput and ratios."""
    native = times.get("native", {})
    reference = times.get("reference", {})
    print(
        f"\nnumel=2**{int(math.log2(numel))} ({numel})  bits={bits}  bucket_size={bucket_size}  "
        f"threads={threads}  copy: {format_seconds(copy_seconds)} "
        f"({gbytes_per_s(numel, copy_seconds):.2f} GB/s)"
    )
    header = (
        f"  {'op':<13}{'native':>11}{'reference':>12}{'native GB/s':>13}"
        f"{'native/copy':>13}{'native/ref':>12}"
    )
    print(header)
    print("  " + "-" * (len(header) - 2))
    for op in OPS:
        t_native = native.get(op)
        t_reference = reference.get(op)
        throughput = f"{gbytes_per_s(numel, t_native):.2f}" if t_native is not None else "-"
        print(
            f"  {op:<13}{format_seconds(t_native):>11}{format_seconds(t_reference):>12}"
            f"{throughput:>13}{format_ratio(t_native, copy_seconds):>13}"
            f"{format_ratio(t_native, t_reference):>12}"
        )
    for note in notes:
        print(f"  note: {note}")


def make_record(
    op: str,
    impl: str,
    seconds: float,
    bits: int | None,
    bucket_size: int | None,
    common: dict[str, Any],
) -> Record:
    """A record of one measurement; ``common`` holds device, numel, threads and machine."""
    return Record(
        op=op,
        impl=impl,
        bits=bits,
        bucket_size=bucket_size,
        seconds=seconds,
        gbytes_per_s=gbytes_per_s(common["numel"], seconds),
        **common,
    )


def write_json(path: Path, records: Sequence[Record]) -> None:
    """Writes ``records`` as a JSON list (rewritten after every group, so partial runs survive)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    tmp.replace(path)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[20, 24], help="log2 of numel (default: 20 24)"
    )
    parser.add_argument("--bits", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--bucket-size", type=int, default=512)
    parser.add_argument(
        "--topk-densities",
        type=float,
        nargs="*",
        default=[0.001, 0.01],
        help="Top-k selection densities to time (default: 0.001 0.01; none to skip)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        help="torch.set_num_threads values to measure on the CPU (default: the current one)",
    )
    parser.add_argument(
        "--repeats", type=int, default=7, help="least number of timed calls (default: 7, min 5)"
    )
    parser.add_argument(
        "--no-reference", action="store_true", help="do not time the hvd_qpr.reference kernels"
    )
    parser.add_argument(
        "--no-elias", action="store_true", help="do not time the Elias coders (no CUDA coder yet)"
    )
    parser.add_argument(
        "--reference-elias-max-log2",
        type=int,
        default=20,
        help="time the (pure Python) reference Elias coder only up to numel 2**N (default: 20)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark; returns the exit status."""
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available", file=sys.stderr)
        return 2

    import hvd_qpr.ops

    impls = [impl_from_module("native", hvd_qpr.ops, takes_out=True)]
    if not args.no_reference:
        import hvd_qpr.reference

        impls.append(impl_from_module("reference", hvd_qpr.reference))

    machine = machine_name(device)
    llc = last_level_cache_bytes(device)
    if device.type == "cpu":
        thread_counts = args.threads or [torch.get_num_threads()]
    else:
        if args.threads:
            print("note: --threads applies to the CPU only; ignored for", device)
        thread_counts = [torch.get_num_threads()]
    print(f"machine: {machine}  device: {device}  last-level cache: {llc / 2**20:.0f} MiB")
    print(f"torch {torch.__version__}; times are medians; ratios are of times (lower is faster)")

    records: list[Record] = []
    for log2 in args.sizes:
        numel = 2**log2
        n_inputs = ROTATING_INPUTS if numel * 4 >= llc else 1
        inputs = make_inputs(numel, n_inputs, device)
        base_notes = [
            f"inputs rotate between {n_inputs} tensors larger than the last-level cache"
            if n_inputs > 1
            else "the input fits in the last-level cache (one tensor, timed warm)"
        ]
        for threads in thread_counts:
            if device.type == "cpu":
                torch.set_num_threads(threads)

            common: dict[str, Any] = {
                "device": str(device),
                "numel": numel,
                "threads": threads,
                "machine": machine,
            }
            copy_seconds = bench_copy(inputs, device, args.repeats)
            records.append(make_record("copy", "copy", copy_seconds, None, None, common))
            for bits in args.bits:
                notes = list(base_notes)
                times: dict[str, dict[str, float]] = {}
                for impl in impls:
                    with_elias = not args.no_elias and (
                        impl.name == "native" or log2 <= args.reference_elias_max_log2
                    )
                    if args.no_elias:
                        notes.append("Elias coders not timed (--no-elias)")
                    elif not with_elias:
                        notes.append(
                            f"reference Elias coder not timed above 2**"
                            f"{args.reference_elias_max_log2} (--reference-elias-max-log2)"
                        )
                    times[impl.name] = bench_impl(
                        impl, inputs, bits, args.bucket_size, device, args.repeats, with_elias
                    )
                    records.extend(
                        make_record(op, impl.name, seconds, bits, args.bucket_size, common)
                        for op, seconds in times[impl.name].items()
                    )
                if args.no_reference:
                    notes.append("reference not timed (--no-reference)")
                print_table(numel, bits, args.bucket_size, threads, copy_seconds, times, notes)
                if args.json:
                    write_json(args.json, records)
            for density in args.topk_densities:
                topk = bench_topk(inputs, density, device, args.repeats)
                for impl, seconds in topk.items():
                    record = make_record("topk_select", impl, seconds, None, None, common)
                    records.append(replace(record, density=density))
                print(
                    f"top-k selection, density {density:g}, {numel} values, {threads} thread(s): "
                    + ", ".join(
                        f"{impl} {format_seconds(t)} ({format_ratio(t, copy_seconds)} of copy)"
                        for impl, t in topk.items()
                    )
                )
                if args.json:
                    write_json(args.json, records)
        del inputs
    if args.json:
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
