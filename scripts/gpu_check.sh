#!/usr/bin/env bash
# The check the lent GPU machine runs in one call (device tool: `bash scripts/gpu_check.sh`):
# builds the extension with its CUDA sources, runs the CUDA-vs-CPU kernel tests and the kernel
# unit tests, benchmarks the kernels on the GPU, then reruns two tests under compute-sanitizer.
# Everything it prints also goes to $OUT.
# The GPU machine has a CUDA build of PyTorch and nvcc but no Horovod; hvd_qpr.ops needs neither.
set -euo pipefail

OUT="${OUT:-$PWD/gpu_out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

nvidia-smi || true
PY="${PYTHON:-python3}"
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
          torch.cuda.get_device_name())'

export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
# nothing can be fetched there: the image already holds what the tests import
"$PY" -c 'import numpy, pytest, pytest_timeout' || { echo "missing test packages" >&2; exit 1; }
start=$SECONDS
"$PY" setup.py build_ext --inplace
echo "built in $((SECONDS - start)) s"
"$PY" -c 'from hvd_qpr import _C; assert _C.with_cuda, "the CUDA sources were not built"'

"$PY" -m pytest -q -p no:cacheprovider tests/gpu tests/unit/test_quantize.py \
    tests/unit/test_pack_bits.py tests/unit/test_rng.py tests/unit/test_elias.py \
    --junitxml="$OUT/pytest.xml" || status=$?

"$PY" benchmarks/kernels.py --device cuda --sizes 20 26 --bits 2 4 8 \
    --topk-densities 0.001 0.01 --json "$OUT/kernels_cuda.json"

# Last, and bounded: the corrupt-stream and unaligned-output tests under compute-sanitizer's
# memcheck, which would name any out-of-bounds or misaligned device access.
if command -v compute-sanitizer >/dev/null; then
    timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$PY" -m pytest -q \
        -p no:cacheprovider tests/gpu -k "corrupt or unaligned" || status=$?
fi
exit "${status:-0}"
