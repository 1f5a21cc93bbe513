"""hvd_qpr.DistributedOptimizer under a real horovodrun (Gloo, CPU): one launch per world size
runs every check in optimizer_worker.py on every rank."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("optimizer_worker.py")
ROOT = WORKER.parents[2]
MIN_CHECKS = 19


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", [2, 3, 4])
def test_optimizer_checks_on_every_rank(np_):
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    cmd = [str(bindir / "horovodrun"), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}"]
    done = subprocess.run(
        [*cmd, sys.executable, str(WORKER)], env=env, capture_output=True, text=True, timeout=280
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
        assert ran >= MIN_CHECKS and len(names) == ran, (rank, ran, sorted(names))
