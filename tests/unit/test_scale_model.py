"""The scale model (benchmarks/scale_model.py): numbers worked out by hand from DESIGN.md 2.3's
cost model, synthetic kernel throughput and a synthetic harness result; no Horovod launch."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_module():
    spec = importlib.util.spec_from_file_location("scale_model", ROOT / "benchmarks/scale_model.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["scale_model"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


sm = _load_module()

QUANTIZE_S = 1e-9  # seconds a value, every bit width
DEQUANTIZE_S = 0.5e-9
N = 1_000_000


def _record(op, impl, numel, bits, threads, seconds):
    return {
        "op": op,
        "impl": impl,
        "device": "cpu",
        "numel": numel,
        "bits": bits,
        "bucket_size": None if bits is None else 512,
        "threads": threads,
        "seconds": seconds,
        "gbytes_per_s": numel * 4 / seconds / 1e9,
        "machine": "test",
    }


def write_kernels(path: Path) -> Path:
    """Native single-thread records at 2**20 values; decoys that must be ignored: a smaller
    size, two threads, the reference implementation, the copy."""
    big, small = 2**20, 2**12
    records = [_record("copy", "copy", big, None, 1, 1e-5)]
    for bits in (2, 4, 8):
        records += [
            _record("quantize", "native", big, bits, 1, QUANTIZE_S * big),
            _record("dequantize", "native", big, bits, 1, DEQUANTIZE_S * big),
            _record("quantize", "native", small, bits, 1, 100 * QUANTIZE_S * small),
            _record("quantize", "native", big, bits, 2, 0.1 * QUANTIZE_S * big),
            _record("quantize", "reference", big, bits, 1, 50 * QUANTIZE_S * big),
        ]
    path.write_text(json.dumps(records))
    return path


SELECT_S = {"approximate": {0.001: 3e-9, 0.01: 4e-9}, "exact": {0.001: 9e-9, 0.01: 16e-9}}


def write_select(path: Path) -> Path:
    """Top-k selection records at 2**20 values, one thread; decoys: two threads, a smaller size."""
    big = 2**20
    records = []
    for impl, table in SELECT_S.items():
        for density, per_value in table.items():
            for numel, threads, scale in ((big, 1, 1.0), (big, 2, 0.5), (2**10, 1, 9.0)):
                r = _record("topk_select", impl, numel, None, threads, scale * per_value * numel)
                records.append(r | {"density": density})
    path.write_text(json.dumps(records))
    return path


def _method(spec, steps, wall, compute=None):
    out = {"spec": spec, "steps": steps, "wall_seconds": wall, "wait_seconds": 0.0}
    out.update(compute_seconds=compute if compute is not None else 0.5 * wall, wire_bytes=0.0)
    return out | {"sync_rounds": steps // spec["local_steps"], "final_accuracy": 0.9, "curve": []}


def _spec(optimizer, compression, bits, k, aggregation, ef=False):
    return {
        "optimizer": optimizer,
        "compression": compression,
        "bits": bits,
        "elias": False,
        "local_steps": k,
        "aggregation": aggregation,
        "error_feedback": ef,
    }


# Hand-worked predictions at M = 2, 1000 Mbit/s, 100 us, n = 10**6, 10 ms compute a step:
# parallel SGD: ring factor 1, 4e6 B / 125e6 B/s + 2 * 1e-4 = 0.0322 s comm; 0.0422 s a step.
# QPR 4-bit packed-sum, K = 8: fields of bit_length(2*7*2) = 5 bits, 12 to a word,
#   4*1954 + 8*83334 = 674488 B -> 0.005395904 s + 4e-4 s latency = 0.005795904 s comm;
#   codec 2 quantizes + 1 dequantize of 1e6 values = 0.0025 s; (0.08 + 0.0025 + 0.005795904) / 8.
# QPR 2-bit allgather with error feedback, K = 8: payload 4*1954 + 250000 = 257816 B,
#   (M-1) * 257816 / 125e6 + 1e-4 = 0.002162528 s comm; codec 1e-3 + 2 * 0.5e-3 = 0.002 s.
PREDICTED = {
    "parallel SGD": 0.0422,
    "QPR 4-bit packed-sum": (0.08 + 0.0025 + 0.005795904) / 8,
    "QPR 2-bit allgather EF": (0.08 + 0.002 + 0.002162528) / 8,
}
MEASURED_OVER_PREDICTED = {
    "parallel SGD": 2.0,
    "QPR 4-bit packed-sum": 0.8,
    "QPR 2-bit allgather EF": 1.0,
}
EXPECTED_ERROR = {
    "parallel SGD": -50.0,
    "QPR 4-bit packed-sum": 25.0,
    "QPR 2-bit allgather EF": 0.0,
}


def write_harness(path: Path) -> Path:
    specs = {
        "QPR 4-bit packed-sum": (_spec("hvd_qpr", "qsgd", 4, 8, "packed-sum"), 800),
        "QPR 2-bit allgather EF": (_spec("hvd_qpr", "qsgd", 2, 8, "allgather", ef=True), 800),
        "parallel SGD": (_spec("horovod", "none", None, 1, "allreduce"), 100),
    }
    methods = {}
    for name, (spec, steps) in specs.items():
        wall = PREDICTED[name] * MEASURED_OVER_PREDICTED[name] * steps
        # only the parallel-SGD method's compute time (0.01 s a step) may be used
        compute = 0.01 * steps if name == "parallel SGD" else 0.05 * steps
        methods[name] = _method(spec, steps, wall, compute)
    result = {
        "config": {
            "workers": 2,
            "bandwidth_mbit": 1000.0,
            "workload": "synthetic",
            "parameters": N,
            "batch_size": 32,
            "epochs": 1,
            "steps_per_epoch": 50,
            "machine": "test",
        },
        "target_accuracy": 0.9,
        "methods": methods,
    }
    path.write_text(json.dumps(result))
    return path


@pytest.fixture
def kernels(tmp_path):
    return sm.load_kernel_throughput(
        write_kernels(tmp_path / "kernels.json"), write_select(tmp_path / "select.json")
    )


def test_kernel_throughput_uses_native_single_thread_largest_size(kernels):
    assert kernels.seconds("quantize", 4, 1000) == pytest.approx(1e-6)
    assert kernels.seconds("dequantize", 2, 1000) == pytest.approx(0.5e-6)
    assert set(kernels.per_value) == {"quantize", "dequantize"}
    with pytest.raises(ValueError, match="elias_encode"):
        kernels.seconds("elias_encode", 4, 10)


def test_kernel_throughput_interpolates_bits():
    kt = sm.KernelThroughput({"quantize": {2: 1.0, 4: 3.0, 8: 11.0}})
    assert kt.seconds("quantize", 3, 1) == pytest.approx(2.0)
    assert kt.seconds("quantize", 6, 2) == pytest.approx(14.0)
    assert kt.seconds("quantize", 1, 1) == 1.0  # nearest below the smallest
    assert kt.seconds("quantize", 9, 1) == 11.0


def test_repository_kernel_results_load():
    kt = sm.load_kernel_throughput(ROOT / "benchmarks/results/kernels_cpu.json")
    for op in ("quantize", "dequantize"):
        for bits in (2, 4, 8):
            assert 1e-12 < kt.per_value[op][bits] < 1e-7  # seconds a value


def test_codec_passes(kernels):
    qsgd = sm.Method(compression="qsgd", bits=4, local_steps=8)
    n, m = N, 8
    assert sm.codec_seconds("packed-sum", qsgd, n, m, kernels) == pytest.approx(2e-3 + 0.5e-3)
    sg = sm.codec_seconds("scatter-gather", qsgd, n, m, kernels)
    assert sg == pytest.approx(1e-3 * (1 + 1 / m) + 2 * 0.5e-3)
    assert sm.codec_seconds("allgather", qsgd, n, m, kernels) == pytest.approx(1e-3 + m * 0.5e-3)
    assert sm.codec_seconds("allreduce", sm.Method(compression="fp16"), n, m, kernels) == 0.0


def test_codec_passes_come_from_the_mode_records(kernels, monkeypatch):
    from hvd_qpr import collectives as C

    qsgd = sm.Method(compression="qsgd", bits=4, error_feedback=True)
    for mode in ("packed-sum", "scatter-gather", "allgather"):
        quantize_only, encoded, decoded = C.MODES[mode].codec_passes(8, True)
        expected = (quantize_only + encoded) * 1e-3 + decoded * 0.5e-3
        assert sm.codec_seconds(mode, qsgd, N, 8, kernels) == pytest.approx(expected)
    # a mode added to the registry is priced without editing the scale model
    fake = dataclasses.replace(
        C.MODES["allgather"], name="fake", codec_passes=lambda m, ef: (m, 0, 1)
    )
    monkeypatch.setitem(C.MODES, "fake", fake)
    assert sm.codec_seconds("fake", qsgd, N, 4, kernels) == pytest.approx(4e-3 + 0.5e-3)


def test_the_scale_model_reads_the_harness_method():
    import netsim_methods

    assert sm.Method is netsim_methods.Method and not hasattr(sm, "Spec")
    assert all(isinstance(m, sm.Method) and m.name for m in sm.METHODS)
    # every harness result file in the repository, old ones too, reads back field for field
    paths = sorted((ROOT / "benchmarks/results").glob("netsim_*.json"))
    assert paths
    for path in paths:
        for name, run in json.loads(path.read_text())["methods"].items():
            method = sm.Method.from_dict(run["spec"])
            given = {k: v for k, v in run["spec"].items() if v is not None}
            assert {k: getattr(method, k) for k in given} == given, (path.name, name)
    assert sm.Method.from_dict({"local_steps": 4, "unknown": 1, "bits": None}).bits is None


def test_predictions_positive_finite_and_consistent(kernels):
    workload = sm.Workload(parameters=N, compute_per_step=0.02, dataset_steps=10_000)
    predictions = sm.sweep(workload, kernels)
    assert len(predictions) == 13 * len(sm.WORKERS) * len(sm.BANDWIDTHS_GBIT)
    assert {p.workers for p in predictions} == {2**k for k in range(1, 11)}
    assert {p.bandwidth_gbit for p in predictions} == {1.0, 10.0, 100.0}
    for p in predictions:
        parts = (p.compute_seconds, p.codec_seconds, p.comm_seconds)
        assert all(math.isfinite(x) and x >= 0 for x in parts)
        assert p.comm_seconds > 0 and p.round_seconds > 0
        assert p.round_seconds == pytest.approx(sum(parts))
        rounds = 10_000 / p.workers / p.local_steps
        assert p.epoch_seconds == pytest.approx(rounds * p.round_seconds)
        if p.method.startswith("QPR"):
            assert p.codec_seconds > 0 and p.local_steps == 16
        elif p.method.startswith("Top-k"):  # one approximate selection at density 0.001
            assert p.codec_seconds == pytest.approx(3e-9 * N) and p.local_steps == 1
        else:
            assert p.codec_seconds == 0
    # parallel SGD at M = 4, 10 Gbit/s: 1.5 * 4e6 / 1.25e9 + 2 * 3 * 1e-4 = 0.0054 s comm
    p = next(
        p
        for p in predictions
        if (p.method, p.workers, p.bandwidth_gbit) == ("parallel SGD fp32", 4, 10.0)
    )
    assert p.comm_seconds == pytest.approx(0.0054)
    assert p.epoch_seconds == pytest.approx(10_000 / 4 * (0.02 + 0.0054))


def _comm(predictions, method, mode, m, gbit=1.0):
    (p,) = [
        p
        for p in predictions
        if (p.method, p.mode, p.workers, p.bandwidth_gbit) == (method, mode, m, gbit)
    ]
    return p.comm_seconds


def test_allgather_comm_grows_faster_than_ring_modes(kernels):
    predictions = sm.sweep(sm.Workload(), kernels)
    method = "QPR-SGD 4-bit"
    allgather = _comm(predictions, method, "allgather", 1024) / _comm(
        predictions, method, "allgather", 128
    )
    assert allgather > 7.5  # (M-1) payloads: almost linear in M
    for mode in ("packed-sum", "scatter-gather"):
        ring = _comm(predictions, method, mode, 1024) / _comm(predictions, method, mode, 128)
        assert ring < 4 and allgather > 2 * ring
        assert _comm(predictions, method, "allgather", 1024) > 50 * _comm(
            predictions, method, mode, 1024
        )
    # auto follows the cheapest: never the allgather at large M
    auto = [p for p in predictions if p.mode == "auto" and p.workers >= 64]
    assert auto and all(p.chosen != "allgather" for p in auto)


def test_sparse_wire_bytes_grow_as_k_log_m_for_gtopk_and_k_m_for_allgather(kernels):
    predictions = sm.sweep(sm.Workload(parameters=N), kernels)
    payload = 8 * 1000  # k = 0.001 n entries of an int32 index and a float32 value
    sparse = {
        (p.mode, p.workers): p.wire_bytes
        for p in predictions
        if p.method.startswith("Top-k") and p.bandwidth_gbit == 1.0
    }
    for m in sm.WORKERS:
        assert sparse[("allgather", m)] == pytest.approx((m - 1) * payload)
        assert sparse[("gtopk", m)] == pytest.approx(math.log2(m) * payload)
    assert sparse[("allgather", 1024)] / sparse[("gtopk", 1024)] == pytest.approx(102.3)
    # not a power of two: fold the extra rank in and back out, two more exchanges
    topk = sm.Method(compression="topk", ratio=0.001).compressor()
    assert sm.estimate_wire_bytes("gtopk", topk, N, 5) == pytest.approx(4 * payload)
    # so from 32 to 1024 workers gTop-k's communication time doubles, the allgather's is 33x
    name = "Top-k 0.001 EF"
    gtopk = _comm(predictions, name, "gtopk", 1024) / _comm(predictions, name, "gtopk", 32)
    gathered = _comm(predictions, name, "allgather", 1024) / _comm(
        predictions, name, "allgather", 32
    )
    assert gtopk == pytest.approx(2.0) and gathered > 30


def test_select_throughput_nearest_density_and_missing(kernels):
    assert kernels.select_seconds(True, 0.002, 1000) == pytest.approx(3e-6)
    assert kernels.select_seconds(False, 0.005, 1000) == pytest.approx(16e-6)
    with pytest.raises(ValueError, match="approximate topk_select"):
        sm.KernelThroughput({}).select_seconds(True, 0.001, 10)
    assert sm.load_select_throughput(None) == {}


def test_qpr_at_100_gbit_is_compute_and_codec_bound(kernels):
    predictions = sm.sweep(sm.Workload(), kernels)
    qpr = [p for p in predictions if p.method.startswith("QPR") and p.bandwidth_gbit == 100.0]
    for p in qpr:
        if p.mode != "allgather" or p.workers <= 64:
            assert p.comm_seconds < p.compute_seconds + p.codec_seconds, p
    # ...whereas at 1 Gbit/s plain parallel SGD is communication-bound
    fp32 = [p for p in predictions if p.method == "parallel SGD fp32" and p.bandwidth_gbit == 1.0]
    assert all(p.comm_seconds > 5 * (p.compute_seconds + p.codec_seconds) for p in fp32)


def test_validation_reports_the_error(tmp_path, kernels):
    result = json.loads(write_harness(tmp_path / "netsim_m2.json").read_text())
    assert sm.baseline_compute_per_step(result) == pytest.approx(0.01)
    rows = {r["method"]: r for r in sm.validate(result, kernels)}
    assert set(rows) == set(PREDICTED)
    for name, row in rows.items():
        assert row["predicted_s_per_step"] == pytest.approx(PREDICTED[name], rel=1e-9)
        assert row["error_pct"] == pytest.approx(EXPECTED_ERROR[name], abs=1e-6)
        assert (row["workers"], row["bandwidth_mbit"]) == (2, 1000.0)
    table = sm.validation_table(list(rows.values()))
    assert "| parallel SGD | allreduce | 2 | 1000 | 0.0422 | 0.0844 | -50.0 |" in table
    assert "+25.0 |" in table


def test_cli_writes_json_plots_and_markdown(tmp_path, capsys):
    kernels = write_kernels(tmp_path / "kernels.json")
    write_harness(tmp_path / "netsim_m2.json")
    out = tmp_path / "out"
    report = tmp_path / "report.md"
    select = write_select(tmp_path / "select.json")
    argv = ["--kernels", str(kernels), "--netsim", str(tmp_path / "netsim_*.json")]
    argv += ["--topk-select", str(select)]
    assert sm.main([*argv, "--out-dir", str(out), "--markdown", str(report)]) == 0

    document = json.loads((out / "scale_model.json").read_text())
    predictions = document["predictions"]
    assert len(predictions) == 390
    keys = {"method", "mode", "workers", "bandwidth_gbit", "round_seconds", "epoch_seconds"}
    assert all(
        keys | {"comm_seconds", "codec_seconds", "compute_seconds"} <= set(p) for p in predictions
    )
    # the harness gives the workload: n = 1e6, 10 ms a step, 50 steps * 2 workers an epoch
    (p,) = [
        p
        for p in predictions
        if (p["method"], p["workers"], p["bandwidth_gbit"]) == ("parallel SGD fp32", 4, 10.0)
    ]
    assert p["round_seconds"] == pytest.approx(0.01 + 0.0054)
    assert p["epoch_seconds"] == pytest.approx(100 / 4 * 0.0154)
    errors = sorted(r["error_pct"] for r in document["validation"])
    assert errors == pytest.approx([-50.0, 0.0, 25.0], abs=1e-6)

    import matplotlib.image

    for gbit in (1, 10, 100):
        png = out / f"scale_epoch_{gbit}gbit.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        height, width = matplotlib.image.imread(png).shape[:2]
        assert height > 300 and width > 400

    text = report.read_text()
    assert text == sm.markdown_report(
        [sm.Prediction(**p) for p in predictions],
        document["validation"],
        sm.Workload(**document["inputs"]["workload"]),
    )
    assert "| 1G M=2 | 1G M=16 | 1G M=128 | 1G M=1024 |" in text
    assert "| 100G M=1024 |" in text
    assert "-50.0" in text and "+25.0" in text
    assert "-50.0" in (out / "scale_model_validation.md").read_text()
    assert "-50.0" in capsys.readouterr().out


def test_cli_without_harness_skips_validation(tmp_path, capsys):
    kernels = write_kernels(tmp_path / "kernels.json")
    out = tmp_path / "out"
    argv = ["--kernels", str(kernels), "--netsim", str(tmp_path / "none_*.json")]
    assert (
        sm.main([*argv, "--out-dir", str(out), "--compute-ms", "20", "--parameters", "1000"]) == 0
    )
    assert "validation skipped" in capsys.readouterr().out
    document = json.loads((out / "scale_model.json").read_text())
    assert document["validation"] == []
    assert document["inputs"]["workload"]["compute_per_step"] == pytest.approx(0.02)
    assert document["inputs"]["workload"]["parameters"] == 1000
    assert not (out / "scale_model_validation.md").exists()
    assert "not validated" in sm.markdown_report([], [], sm.Workload())


def test_cli_tag_names_outputs_and_replaces_its_results_section(tmp_path):
    kernels = write_kernels(tmp_path / "kernels.json")
    select = write_select(tmp_path / "select.json")
    out = tmp_path / "results"
    md = tmp_path / "RESULTS.md"
    md.write_text(
        "# results\n\n<!-- netsim:scale_model_big -->\nold\n<!-- /netsim:scale_model_big -->\n"
    )
    argv = ["--kernels", str(kernels), "--topk-select", str(select), "--netsim", "none"]
    argv += ["--out-dir", str(out), "--tag", "big", "--title", "a big model"]
    argv += ["--parameters", "5000000", "--compute-ms", "20", "--results-md", str(md)]
    for _ in range(2):  # a rerun replaces the section instead of adding one
        assert sm.main(argv) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "scale_model_big.json",
        "scale_wire_bytes_big.png",
        "scale_epoch_big_1gbit.png",
    } <= names
    text = md.read_text()
    assert text.count("<!-- netsim:scale_model_big -->") == 1 and "old" not in text
    assert "### Scale projections, a big model (cost model" in text
    assert "![scale_wire_bytes_big](results/scale_wire_bytes_big.png)" in text
    assert "| Top-k 0.001 EF | gtopk |" in text
