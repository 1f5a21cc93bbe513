"""The main job: a short data-parallel training on the CPU under horovodrun (2 workers, Gloo),
plain Horovod against hvd_qpr (QPR-SGD by ring all-reduce and by gossip, Overlap-Local-SGD): wall
time, wire bytes per worker, test accuracy.

Example::

    python examples/demo.py            # what `make demo` runs
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    bindir = Path(sys.executable).parent
    env = dict(
        os.environ,
        PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
        PYTHONPATH=f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    )
    workers = 2
    cmd = [
        str(bindir / "horovodrun"),
        "--gloo",
        "-np",
        str(workers),
        "-H",
        f"localhost:{workers}",
        sys.executable,
        str(HERE / "demo_worker.py"),
        *sys.argv[1:],
    ]
    print("$ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
