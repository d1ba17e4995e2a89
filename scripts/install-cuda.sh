#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler toolchain (nvcc, nvvm, crt, cccl headers, runtime
# headers) from PyPI into .cuda-venv, for building swk with `--features cuda` on a machine
# without the CUDA toolkit. No GPU is needed to compile.
#
# Why these pins (see shared/CUDA-TOOLCHAIN.md): the GPU machines run driver 580 (CUDA 13.0),
# which loads PTX up to ISA 9.0. `nvidia-cuda-nvcc==13.0.88` alone pulls the newest nvvm/crt,
# whose front end emits PTX 9.5 that the 13.0 ptxas rejects. All five are pinned.
#
# Idempotent: re-running only checks the pins (pip is a no-op when they are satisfied).
# Prints `export NVCC=...` on the last line; build.rs also finds .cuda-venv on its own.
#
# Usage:  scripts/install-cuda.sh            # then: cargo build --features cuda
#         eval "$(scripts/install-cuda.sh | tail -n 1)"   # to set NVCC in this shell
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.cuda-venv
PINS=(
    nvidia-cuda-nvcc==13.0.88
    nvidia-nvvm==13.0.88
    nvidia-cuda-crt==13.0.88
    nvidia-cuda-cccl==13.0.85
    nvidia-cuda-runtime==13.0.96
)

if [ ! -x "$VENV/bin/python" ]; then
    echo "creating $VENV" >&2
    python3 -m venv "$VENV"
fi

# Skip pip entirely when every pin is already installed at the exact version.
have_all=1
for pin in "${PINS[@]}"; do
    name=${pin%%==*}
    want=${pin##*==}
    got=$("$VENV/bin/python" -m pip show "$name" 2>/dev/null | sed -n 's/^Version: //p' || true)
    if [ "$got" != "$want" ]; then
        have_all=0
    fi
done
if [ "$have_all" = 0 ]; then
    echo "installing ${PINS[*]}" >&2
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PINS[@]}" >&2
fi

NVCC=$(find "$PWD/$VENV" -path '*/bin/nvcc' -type f | head -n 1)
if [ -z "$NVCC" ] || [ ! -x "$NVCC" ]; then
    echo "error: nvcc not found under $VENV after installing ${PINS[*]}" >&2
    exit 1
fi
"$NVCC" --version | tail -n 2 >&2

# Check that this toolchain emits PTX the GPU machines' driver loads (ISA <= 9.0).
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
printf 'extern "C" __global__ void k(float* x) { x[threadIdx.x] += 1.0f; }\n' >"$tmp/k.cu"
"$NVCC" --ptx -arch=compute_80 -o "$tmp/k.ptx" "$tmp/k.cu"
ver=$(sed -n 's/^\.version //p' "$tmp/k.ptx" | head -n 1)
echo "nvcc emits PTX ISA $ver" >&2
case "$ver" in
    [0-8].* | 9.0) ;;
    *)
        echo "error: PTX ISA $ver is newer than 9.0 (driver 580 cannot load it): check the pins" >&2
        exit 1
        ;;
esac

echo "export NVCC=$NVCC"
