"""The Elias kernels under AddressSanitizer and UBSan: tens of thousands of mutated streams, every
buffer at its exact size, for each instruction-set build. An out-of-bounds read or write, or
undefined behaviour, fails the run (tests/native/fuzz_elias.cpp)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.sanitized_build import build_sanitized

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(600)
def test_elias_kernels_are_memory_safe(tmp_path):
    sources = [ROOT / "tests" / "native" / "fuzz_elias.cpp"] + sorted(
        (ROOT / "csrc" / "cpu").glob("kernels_*.cpp")
    )
    binary = build_sanitized(sources, tmp_path / "fuzz_elias")
    done = subprocess.run([str(binary), "20000", "7"], capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines and lines[0].startswith("base: decoded"), done.stdout
    for line in lines:
        decoded, rejected = (int(word) for word in line.split()[2::2])
        assert decoded > 1000 and rejected > 1000, line
