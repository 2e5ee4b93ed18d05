#!/usr/bin/env bash
# Build (or check) mfac-lab with candle's CUDA backend here, on a machine without a GPU.
# Usage: scripts/cuda-build.sh [cargo subcommand and args]   (default: build --release)
#   e.g. scripts/cuda-build.sh check --all-targets
# The toolchain (CUDA 13.0 from PyPI wheels + a link-time driver stub) goes to .cuda-toolchain/,
# the build to target-cuda/ so the CPU build in target/ is untouched. Never run this in CI.
set -euo pipefail
cd "$(dirname "$0")/.."
TC=${CUDA_TOOLCHAIN_DIR:-$PWD/.cuda-toolchain}
cargo fetch --locked
[ -f "$TC/env.sh" ] || bash ../shared/tools/cuda-toolchain.sh "$TC"
# shellcheck disable=SC1091
source "$TC/env.sh"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}
if [ $# -eq 0 ]; then set -- build --release; fi
cargo "$@" --locked --features cuda
