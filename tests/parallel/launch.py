"""Runs a check worker under a real horovodrun (Gloo, CPU) and asserts every rank passed every
check; shared by the parallel test modules."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_checks(worker: Path, np_: int, min_checks: int, timeout: float = 280) -> None:
    """Launches worker on np_ ranks; fails with the output when a rank failed, ran fewer than
    min_checks checks or did not report all of them as passed."""
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    cmd = [str(bindir / "horovodrun"), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}"]
    done = subprocess.run(
        [*cmd, sys.executable, str(worker)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = done.stdout + done.stderr
    failed = re.findall(r"rank \d+/\d+: FAIL .*", output)
    assert not failed, "\n".join(failed) + "\n" + output[-5000:]
    assert done.returncode == 0, output[-5000:]
    passed = set(re.findall(r"rank (\d+)/\d+: PASS (\S+)", output))
    counts = dict(re.findall(r"rank (\d+)/\d+: ran (\d+) checks", output))
    for rank in range(np_):
        names = {name for r, name in passed if int(r) == rank}
        ran = int(counts.get(str(rank), 0))
        assert ran >= min_checks and len(names) == ran, (rank, ran, sorted(names))
