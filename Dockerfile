# hvd_qpr for multi-GPU horovodrun jobs: CUDA, PyTorch built for CUDA, Horovod built with NCCL (GPU
# collectives) and Gloo (the launcher's rendezvous and CPU tensors), and this package built from
# the checked-out source. Build and run (README, "Docker"):
#   docker build -t hvd_qpr .
#   docker run --gpus all --rm --ipc=host hvd_qpr \
#       horovodrun -np 8 -H localhost:8 python examples/train.py --local-steps 8 --bits 4
FROM nvidia/cuda:12.4.1-cudnn-devel-ubuntu22.04

ARG TORCH_VERSION=2.5.1
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG HOROVOD_VERSION=0.28.1
# Ampere, Ada and Hopper; override with --build-arg for other GPUs
ARG TORCH_CUDA_ARCH_LIST="8.0;8.6;8.9;9.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# The distribution's packages follow the base image's Ubuntu 22.04 release; everything that
# decides numerics (CUDA, PyTorch, NCCL, Horovod) is pinned exactly.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev g++ make cmake git openssh-client \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && useradd --create-home --uid 1000 --shell /bin/bash hvd

# PyTorch for CUDA 12.4; its nvidia-nccl-cu12 wheel also supplies the NCCL Horovod links to.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install "numpy<2.3" "scikit-learn==1.5.2" "cloudpickle==3.1.0" "psutil==6.1.0" \
        "pyyaml==6.0.2" "packaging==24.2" "cffi==1.17.1" "ninja==1.11.1.1" "wheel==0.45.1" \
        "setuptools==75.6.0"

# Horovod from source: NCCL for GPU tensors, Gloo for the rest, C++17 for PyTorch 2.x headers
# (DESIGN.md 4: the toolchain file raises Horovod's C++14 to C++17).
COPY scripts/horovod_cxx17.cmake scripts/horovod_cxx17_project.cmake /tmp/horovod-build/
RUN NCCL_HOME="$(python -c 'import nvidia.nccl, os; print(os.path.dirname(nvidia.nccl.__file__))')" \
    && ln -s "$NCCL_HOME/lib/libnccl.so.2" "$NCCL_HOME/lib/libnccl.so" \
    && CMAKE_TOOLCHAIN_FILE=/tmp/horovod-build/horovod_cxx17.cmake \
        HOROVOD_GPU_OPERATIONS=NCCL \
        HOROVOD_NCCL_HOME="$NCCL_HOME" \
        HOROVOD_WITH_PYTORCH=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 \
        MAKEFLAGS="-j$(nproc)" \
        pip install --no-build-isolation --no-deps "horovod==${HOROVOD_VERSION}" \
    && rm -rf /tmp/horovod-build \
    && horovodrun --check-build

# This checkout, built against the PyTorch above (its CUDA sources, when present, for
# TORCH_CUDA_ARCH_LIST).
WORKDIR /home/hvd/hvd_qpr
COPY --chown=hvd:hvd . .
RUN pip install --no-build-isolation --no-deps . \
    && python -c "import hvd_qpr, horovod.torch; print('hvd_qpr', hvd_qpr.__version__)"

USER 1000:1000
CMD ["horovodrun", "--check-build"]
