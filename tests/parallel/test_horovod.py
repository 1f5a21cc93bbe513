"""Kernels under a real horovodrun (Gloo, CPU): one launch runs all the worker's checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("kernels_worker.py")
ROOT = WORKER.parents[2]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("np_", [3])
def test_kernel_payloads_through_horovod(np_):
    bindir = Path(sys.executable).parent
    env = dict(os.environ, PYTHONPATH=str(ROOT), PATH=f"{bindir}:{os.environ.get('PATH', '')}")
    cmd = [
        str(bindir / "horovodrun"),
        "--gloo",
        "-np",
        str(np_),
        "-H",
        f"localhost:{np_}",
        sys.executable,
        str(WORKER),
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=280)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    for rank in range(np_):
        assert f"rank {rank}/{np_}: kernels over horovod OK" in output, output
