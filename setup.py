"""Build of hvd_qpr and its native extension hvd_qpr._C.

The C++ sources always build; the CUDA sources (csrc/cuda/*.cu) build as well when PyTorch has
CUDA and nvcc is found. TORCH_CUDA_ARCH_LIST selects the GPU architectures, as for any PyTorch
extension (default here: sm_80 and sm_90; sm_80 is the oldest the kernels support).
"""

import glob
import os
import shutil

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
# No contraction into fused multiply-adds (bit-exact with the reference and the GPU); no errno or
# trap semantics, which would keep the compiler from vectorizing floor and selects.
CXX_FLAGS = [
    "-O3",
    "-std=c++17",
    "-ffp-contract=off",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-Wall",
    # at::parallel_for is a header template that splits work with `#pragma omp parallel`: without
    # OpenMP it runs serially. PyTorch's libgomp is loaded first, so the extension shares it (and
    # torch.set_num_threads).
    "-fopenmp",
]
# No fused multiply-adds and IEEE division/sqrt, so the GPU rounds as the CPU does.
NVCC_FLAGS = ["-O3", "-std=c++17", "-fmad=false", "-prec-div=true", "-prec-sqrt=true"]


# The kernels' warp reductions (__reduce_or_sync, __reduce_max_sync) need compute capability 8.0.
_OLD_ARCH_NAMES = {"kepler", "maxwell", "pascal", "volta", "turing"}


def _check_cuda_arch_list(value: str) -> None:
    """Refuses a TORCH_CUDA_ARCH_LIST naming GPUs older than sm_80, with the reason."""
    for entry in value.replace(",", ";").replace(" ", ";").split(";"):
        arch = entry.strip().lower().removesuffix("+ptx")
        if not arch:
            continue
        version = arch.rstrip("abf")
        old = arch in _OLD_ARCH_NAMES or (
            version.replace(".", "", 1).isdigit() and float(version) < 8.0
        )
        if old:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST={value!r} names {entry.strip()!r}: hvd_qpr's CUDA kernels "
                "use warp reductions of compute capability 8.0 and later (Ampere, Hopper, ...)"
            )


def _cuda_available() -> bool:
    return torch.version.cuda is not None and (
        shutil.which("nvcc") is not None or os.environ.get("CUDA_HOME") is not None
    )


def _extension():
    cpp = sorted(glob.glob("csrc/cpu/*.cpp")) + ["csrc/bindings.cpp"]
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    include_dirs = [os.path.join(ROOT, "csrc"), os.path.join(ROOT, "csrc", "include")]
    if cu and _cuda_available():
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        _check_cuda_arch_list(os.environ["TORCH_CUDA_ARCH_LIST"])
        return CUDAExtension(
            "hvd_qpr._C",
            cpp + cu,
            include_dirs=include_dirs,
            define_macros=[("QPR_WITH_CUDA", "1")],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "hvd_qpr._C",
        cpp,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": CXX_FLAGS},
        extra_link_args=["-fopenmp"],
    )


setup(
    name="hvd_qpr",
    version="0.1.0",
    description="Quantized Parallel-Restarted SGD for Horovod and PyTorch",
    packages=find_packages(include=["hvd_qpr", "hvd_qpr.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4"],
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
