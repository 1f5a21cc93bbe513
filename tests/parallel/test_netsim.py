"""The bandwidth-limited benchmark's quick mode: a real 2-worker cluster in network namespaces
with tbf-limited links, so the harness cannot rot. Needs root (CI runs as root)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() != 0,
    reason="network namespaces and tc need root; CI runs as root",
)
def test_quick_run_writes_curves_plots_and_table(tmp_path):
    md = tmp_path / "RESULTS.md"
    md.write_text("# kept\n\n<!-- netsim:other -->\nanother section\n<!-- /netsim:other -->\n")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "netsim.py"), "--quick"]
    done = subprocess.run(
        [*cmd, "--out-dir", str(tmp_path), "--results-md", str(md)],
        capture_output=True,
        text=True,
        timeout=230,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    stem = tmp_path / "netsim_synthetic_100mbit_2w_quick"
    results = json.loads(stem.with_suffix(".json").read_text())
    assert list(results["methods"]) == ["parallel-sgd", "pr-sgd", "qpr-4bit-auto"]
    base = results["methods"]["parallel-sgd"]
    qpr = results["methods"]["qpr-4bit-auto"]
    for r in results["methods"].values():
        times = [p["time"] for p in r["curve"]]
        assert times == sorted(times) and r["steps"] > 0 and len(r["curve"]) >= 3
        assert 0.0 <= r["final_accuracy"] <= 1.0
    # the link is really limited: fp32 all-reduces cannot beat 100 Mbit/s (12.5 MB/s)
    assert base["wire_bytes"] / base["wall_seconds"] < 12.5e6 * 1.05
    assert qpr["wire_bytes"] < base["wire_bytes"] / 20
    assert results["target_accuracy"] == pytest.approx(base["final_accuracy"] - 0.005)
    for name in ("time", "bytes"):
        png = stem.with_name(f"{stem.name}_{name}.png")
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = md.read_text()
    assert "another section" in text and "| qpr-4bit-auto | 8 |" in text
    assert text.count("<!-- netsim:netsim_synthetic_100mbit_2w_quick -->") == 1
    assert not _namespaces_of(done.stdout)


def _namespaces_of(output: str) -> list[str]:
    """Namespaces (and /etc/netns folders) left by the run that printed output."""
    tag = re.search(r"cluster (q\d+)", output).group(1)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = [line.split()[0] for line in listed.splitlines() if line.startswith(f"{tag}-")]
    return names + [str(p) for p in Path("/etc/netns").glob(f"{tag}-*")]


@pytest.mark.timeout(120)
@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() != 0,
    reason="network namespaces and tc need root; CI runs as root",
)
def test_interrupted_run_tears_the_cluster_down(tmp_path):
    cmd = [sys.executable, str(ROOT / "benchmarks" / "netsim.py"), "--quick"]
    proc = subprocess.Popen(
        [*cmd, "--out-dir", str(tmp_path), "--results-md", str(tmp_path / "R.md")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = ""
    for line in proc.stdout:  # interrupt while the first method trains
        seen += line
        if "parallel-sgd" in line and "step" in line:
            proc.send_signal(signal.SIGINT)
            break
    seen += proc.communicate(timeout=60)[0]
    assert proc.returncode != 0
    assert not _namespaces_of(seen), seen[-2000:]
    assert not (tmp_path / "R.md").exists()
