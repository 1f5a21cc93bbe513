"""Every CUDA source compiles with nvcc for sm_90 (compile only: no GPU here), with the flags the
extension build uses, so a syntax or type error in csrc/cuda fails `make test` on machines
without a GPU. Warnings from our own sources fail too; warnings from PyTorch's headers are shown.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import include_paths

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))

# CPU builds of PyTorch ship c10/cuda without this generated header; its CUDA builds define the
# one macro below (shared libraries), which is all the header holds.
CMAKE_MACROS = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"


def nvcc_flags() -> list[str]:
    """setup.py's NVCC_FLAGS, read from its one-line definition (setup.py cannot be imported)."""
    text = (ROOT / "setup.py").read_text()
    start = text.index("NVCC_FLAGS = ")
    namespace: dict = {}
    exec(text[start : text.index("\n", start)], namespace)
    return list(namespace["NVCC_FLAGS"])


def test_there_are_cuda_sources():
    assert SOURCES, "csrc/cuda has no .cu files"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("source", SOURCES, ids=[s.name for s in SOURCES])
def test_cuda_source_compiles_for_sm90(source, tmp_path):
    nvcc = shutil.which("nvcc")
    assert nvcc, "nvcc is not on PATH (the CUDA toolkit's compiler is needed to check csrc/cuda)"
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text(CMAKE_MACROS)
    includes = [ROOT / "csrc", ROOT / "csrc" / "include", *include_paths()]
    includes += [sysconfig.get_paths()["include"], tmp_path / "stub"]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        nvcc,
        "-c",
        str(source),
        "-o",
        str(tmp_path / (source.stem + ".o")),
        "-arch=sm_90",
        *nvcc_flags(),
        *(f"-I{p}" for p in includes),
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-DTORCH_EXTENSION_NAME=_C",
        "-DQPR_WITH_CUDA=1",
        "-Xcompiler",
        "-fPIC",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    output = done.stdout + done.stderr
    if output.strip():
        print(output)  # shown with -rA or on failure
    assert done.returncode == 0, f"nvcc failed on {source.name}:\n{output[-8000:]}"
    ours = [
        line for line in output.splitlines() if "warning" in line and str(ROOT / "csrc") in line
    ]
    ours += [line for line in output.splitlines() if "warning" in line and line.startswith("csrc/")]
    assert not ours, "nvcc warnings in our sources:\n" + "\n".join(ours)
