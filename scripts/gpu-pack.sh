#!/usr/bin/env bash
# Builds what scripts/gpu-check.sh runs on a GPU machine and packs it into ONE git-ignored
# folder, gpu-pack/ (carried by the device tool: at most 64 MiB with the checkout):
#   gpu-pack/bin/gpu_check.xz   examples/gpu_check.rs, release, `cuda` feature, stripped, xz'd
#   gpu-pack/bin/mfac-lab.xz    the CLI (for `mfac-lab compare --device cuda`), when it fits
# (xz, not gzip: 95 MB of CLI is 15 MB in xz, 27 MB in gzip, and all three binaries then fit.
# gpu-check-lib.sh's unpack takes either, with Python's lzma where the machine has no xz.)
#   gpu-pack/fixtures/...       the files of scripts/gpu-pack.files, from ../shared/fixtures
#   gpu-pack/MANIFEST           what is in it, the commit and the build date
# Usage: scripts/gpu-pack.sh [--no-build] [--no-cli]
#   --no-build  pack what target-cuda/release already holds (after a build)
set -euo pipefail
cd "$(dirname "$0")/.."
PACK=${GPU_PACK_DIR:-gpu-pack}
SHARED=${SHARED_DIR:-../shared}
# The checkout travels too (~2 MiB tracked files); keep the pack under 60 MiB.
LIMIT=$((60 * 1024 * 1024))
BUILD=1 CLI=1
for a in "$@"; do
  case $a in
    --no-build) BUILD=0 ;;
    --no-cli) CLI=0 ;;
    *) echo "unknown option $a" >&2; exit 2 ;;
  esac
done
OUTDIR=${CARGO_TARGET_DIR:-$PWD/target-cuda}/release
if [ "$BUILD" = 1 ]; then
  if [ "$CLI" = 1 ]; then
    scripts/cuda-build.sh build --release --example gpu_check --example gpu_pass_check --bin mfac-lab
  else
    scripts/cuda-build.sh build --release --example gpu_check --example gpu_pass_check
  fi
fi
rm -rf "$PACK"
mkdir -p "$PACK/bin" "$PACK/fixtures"
pack_bin() {  # pack_bin SRC NAME
  strip -o "$PACK/bin/$2" "$1"
  xz -9 -T2 -f "$PACK/bin/$2"
}
pack_bin "$OUTDIR/examples/gpu_check" gpu_check
# issue 13: the CUDA pass check (scripts/gpu-check-pass.sh); it reads no fixture but bert-micro-random
[ -x "$OUTDIR/examples/gpu_pass_check" ] && pack_bin "$OUTDIR/examples/gpu_pass_check" gpu_pass_check
grep -v '^#' scripts/gpu-pack.files | while read -r f; do
  [ -n "$f" ] || continue
  mkdir -p "$PACK/fixtures/$(dirname "$f")"
  cp "$SHARED/fixtures/$f" "$PACK/fixtures/$f"
done
size() { du -sb "$PACK" | cut -f1; }
if [ "$CLI" = 1 ] && [ -x "$OUTDIR/mfac-lab" ]; then
  pack_bin "$OUTDIR/mfac-lab" mfac-lab
  if [ "$(size)" -gt "$LIMIT" ]; then
    echo "the CLI does not fit in ${LIMIT} bytes with the rest: left out"
    rm "$PACK/bin/mfac-lab.xz"
  fi
fi
{
  echo "gpu-pack of mfac-lab $(git rev-parse --short HEAD 2>/dev/null || echo '?')$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)'), built $(date -u +%FT%TZ)"
  (cd "$PACK" && find . -type f ! -name MANIFEST -printf '%10s  %p\n' | sort -k2)
} >"$PACK/MANIFEST"
cat "$PACK/MANIFEST"
total=$(size)
echo "total: $total bytes (limit $LIMIT)"
if [ "$total" -gt "$LIMIT" ]; then
  echo "gpu-pack/ is over the limit" >&2
  exit 1
fi
