#!/usr/bin/env bash
# Installs a CUDA 13.0 toolkit from NVIDIA's packages on PyPI, with no GPU and no root, so that
# `cargo check --features cuda --all-targets` can build candle-kernels (nvcc) and cudarc (which
# reads the CUDA version from `nvcc --version`) on a CI machine.
#
# Idempotent: a second run reuses the venv. Prints the environment to use:
#   eval "$(scripts/cuda_toolkit.sh)"
#   cargo check --features cuda --all-targets
#
# Why 13.0: cudarc 0.19 has bindings for it (its `cuda-13000` feature), it targets sm_90
# (H100/H200), and it is the first release whose PyPI nvcc package carries nvcc itself (the
# CUDA 12 `-cu12` wheels ship only ptxas). Every package is pinned, the dependencies nvcc pulls
# in (nvvm, crt) included, so the toolkit does not drift to a release cudarc does not know.
set -euo pipefail

ROOT="${SPIKECLIP_CUDA_HOME:-$HOME/.cache/spikeclip-cuda}"
VENV="$ROOT/venv"
PACKAGES=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
    nvidia-cuda-nvrtc==13.0.88
    nvidia-cublas==13.0.2.14
    nvidia-curand==10.4.0.35
)
STAMP="$ROOT/.installed"

if [[ ! -f "$STAMP" ]] || [[ "$(cat "$STAMP")" != "${PACKAGES[*]}" ]]; then
    # Progress goes to stderr: stdout carries only the environment, for `eval`.
    {
        rm -rf "$VENV"
        python3 -m venv "$VENV"
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
    } >&2
fi
CUDA="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13"
if [[ ! -f "$STAMP" ]] || [[ "$(cat "$STAMP")" != "${PACKAGES[*]}" ]]; then
    {
        # The wheels ship only versioned sonames; the linker asks for the plain names, and
        # candle-kernels' build looks in lib64/.
        for lib in "$CUDA"/lib/lib*.so.*; do
            plain="${lib%%.so.*}.so"
            [[ -e "$plain" ]] || ln -s "$(basename "$lib")" "$plain"
        done
        [[ -e "$CUDA/lib64" ]] || ln -s lib "$CUDA/lib64"
        "$CUDA/bin/nvcc" --version | tail -n 2
        printf '%s' "${PACKAGES[*]}" >"$STAMP"
    } >&2
fi

cat <<ENV
export CUDA_HOME="$CUDA"
export CUDA_ROOT="$CUDA"
export CUDA_PATH="$CUDA"
export NVCC="$CUDA/bin/nvcc"
export PATH="$CUDA/bin:\$PATH"
export LIBRARY_PATH="$CUDA/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$CUDA/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
ENV
