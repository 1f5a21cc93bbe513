"""Builds a test program from C++ sources with AddressSanitizer and UBSan (tests/native), with the
project's kernel headers on the include path; used by the unit tests that run such programs."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build_sanitized(sources: list[Path], binary: Path, extra: list[str] = ()) -> Path:
    """Compiles and links `sources` into `binary` (C++17, -O1, any error or sanitizer report
    fatal), passing `extra` flags last; fails the calling test with the compiler's output."""
    compiler = shutil.which("g++")
    assert compiler, "g++ is needed to build the sanitized test programs"
    build = subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-O1",
            "-g",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            f"-I{ROOT / 'csrc'}",
            f"-I{ROOT / 'csrc' / 'include'}",
            *map(str, sources),
            "-o",
            str(binary),
            *extra,
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stderr
    return binary
