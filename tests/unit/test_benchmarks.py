"""The benchmark scripts run and write well-formed results (tiny sizes, so they cannot rot)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_kernel_benchmark_records(tmp_path):
    out = tmp_path / "kernels.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "kernels.py"),
        "--device",
        "cpu",
        "--json",
        str(out),
        "--sizes",
        "12",
        "--bits",
        "2",
        "4",
        "--threads",
        "1",
        "2",
        "--repeats",
        "5",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads(out.read_text())
    keys = {
        "op",
        "impl",
        "device",
        "numel",
        "bits",
        "bucket_size",
        "threads",
        "seconds",
        "gbytes_per_s",
        "machine",
    }
    assert all(set(r) >= keys for r in records)
    ops = {(r["op"], r["impl"], r["bits"], r["threads"]) for r in records}
    for threads in (1, 2):
        assert ("copy", "copy", None, threads) in ops
        for bits in (2, 4):
            for op in ("quantize", "dequantize", "elias_encode", "elias_decode"):
                assert (op, "native", bits, threads) in ops
                assert (op, "reference", bits, threads) in ops
        for density in (0.001, 0.01):
            for impl in ("exact", "approximate"):
                assert any(
                    (r["op"], r["impl"], r["density"], r["threads"])
                    == ("topk_select", impl, density, threads)
                    for r in records
                )
    for r in records:
        assert r["seconds"] > 0
        expected = r["numel"] * 4 / r["seconds"] / 1e9
        assert abs(r["gbytes_per_s"] - expected) < 1e-6 * expected


def test_elias_size_report(tmp_path):
    out = tmp_path / "sizes.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "elias_sizes.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    gaussian_sqrt_d = [r for r in rows if r["input"] == "Gaussian" and r["s"] == 31]
    assert gaussian_sqrt_d and gaussian_sqrt_d[0]["stream_bits_per_value"] < 2.8 + 32 / 1024


def test_a_method_is_one_description_for_the_harness_its_worker_and_the_scale_model():
    import dataclasses

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from netsim_methods import Method, method, method_names

    for name in method_names():
        m = method(name)
        # what netsim.py hands each worker on its command line, and what the worker reads
        assert Method.from_dict(json.loads(json.dumps(dataclasses.asdict(m)))) == m
        # what the result files record (K resolved, uses_k dropped), which the scale model reads
        read = Method.from_dict(json.loads(json.dumps(m.spec("allgather"))))
        assert read.name == name and read.local_steps == m.local_steps and read.uses_k == ""
        assert type(read.compressor()) is type(m.compressor())
