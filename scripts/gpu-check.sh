#!/usr/bin/env bash
# The GPU check of M-FAC's device window (issue 12): one prepared run on a GPU machine (H100/H200,
# driver with CUDA 13.0, /opt/torch/.venv's CUDA 13 libraries; no Rust, no network, no ../shared).
#
# Needs gpu-pack/ (built here by scripts/gpu-pack.sh: the stripped, gzipped binaries and the
# fixtures they read). On the device tool:  run  command "bash scripts/gpu-check.sh"
# carry ["gpu-pack"]  timeout_s 420. The CUDA pass (issue 13) has its own run:
# "bash scripts/gpu-check-pass.sh" (same carry, timeout_s 360); or both in one run:
# "GPU_CHECK_PASS=1 GPU_CHECK_BUDGET=570 bash scripts/gpu-check.sh" with timeout_s 600.
#
# Stages, each under `timeout` and inside a 6-minute budget in all:
#   checks      golden (fixtures/mfac, f32/f64/bf16 device windows, device vs CPU, non-finite),
#               replay (an M-FAC trajectory on the device), bf16 (vs f32 at bert-tiny's d),
#               e2e (Trainer + checkpoint/resume + compare_optimizers on CUDA), cli (mfac-lab
#               compare --device cuda, when the pack has the CLI)
#   benchmarks  copy (device copy rate), mfac f32 / bf16 at m = 1024 (step, parts, floor = two
#               reads measured in the same run, ratio), train (bert-tiny B32 S128 AdamW and
#               M-FAC steps, eval forward, the 5-epoch projection)
# Writes $OUT/gpu-check.log (everything) and $OUT/results.jsonl (one JSON object per result),
# prints the short table last. Exit status: non-zero when a check or a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-345}          # seconds for everything (the issue: at most 6 minutes)
PACK=${GPU_PACK_DIR:-gpu-pack}
OUT=${OUT:-$PWD/gpu-check-out}
mkdir -p "$OUT"
LOG=$OUT/gpu-check.log
JSON=$OUT/results.jsonl
: >"$JSON"

# shellcheck source=scripts/gpu-check-lib.sh
source scripts/gpu-check-lib.sh

main() {
say "machine"
date -u
nvidia-smi || echo "nvidia-smi failed"
nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.max.sm,clocks.max.mem --format=csv || true
uname -a
nproc

if [ ! -d "$PACK" ]; then
  echo "no $PACK/: build it first with scripts/gpu-pack.sh (on the build machine) and carry it"
  return 2
fi

say "libraries"
cuda_libraries
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
BIN=/tmp/gpu-check-bin
rm -rf "$BIN" && mkdir -p "$BIN"
for gz in "$PACK"/bin/*.gz; do
  name=$(basename "$gz" .gz)
  gunzip -c "$gz" >"$BIN/$name" && chmod +x "$BIN/$name"
done
ls -l "$BIN"
ldd "$BIN/gpu_check" | grep -Ei 'cuda|cublas|curand|cudart|stdc|not found' || true
cat "$PACK/MANIFEST" 2>/dev/null || true

FAILED=()
run_stages
say "summary (full log: $LOG, results: $JSON)"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
echo "command: bash scripts/gpu-check.sh (carry gpu-pack), $(date -u +%F), $((SECONDS - START)) s"
"$BIN/gpu_check" table --json "$JSON"
if [ ${#FAILED[@]} -gt 0 ]; then
  printf 'FAILED: %s\n' "${FAILED[@]}"
  return 1
fi
echo "all stages passed"
}

run_stages() {
G="$BIN/gpu_check"
F="$PACK/fixtures"
# Checks first.
stage golden 100 "$G" golden --mfac "$F/mfac" --json "$JSON"
stage replay 60 "$G" replay --traj "$F/trajectories/case5_micro_mfac_mom_wd.safetensors" \
  --model "$F/bert-micro-random" --json "$JSON"
stage bf16 60 "$G" bf16 --m 32 --steps 64 --json "$JSON"
# The end-to-end check runs on the graph (MFAC_LAB_CUDA_PASS=off), so that a fault of the CUDA
# pass (issue 13, checked by scripts/gpu-check-pass.sh) cannot hide the window's result.
stage e2e 90 env MFAC_LAB_CUDA_PASS=off "$G" e2e --json "$JSON"
if [ -x "$BIN/mfac-lab" ]; then
  stage cli 60 "$BIN/mfac-lab" compare --device cuda --seeds 42 --num_train_epochs 1 \
    --max_train_samples 256 --quiet --output_dir /tmp/gpu-check-cli
fi
# Then the benchmarks.
stage copy 30 "$G" copy --gib 4 --json "$JSON"
stage mfac-f32 90 "$G" mfac --m 1024 --dtype f32 --steps 30 --json "$JSON"
stage mfac-bf16 75 "$G" mfac --m 1024 --dtype bf16 --steps 30 --json "$JSON"
stage train 90 "$G" train --m 1024 --steps 20 --json "$JSON"
# --- issue 13: the CUDA pass's checks and timings (~5 min more). Off by default, so this run
# stays within its 6 minutes: run scripts/gpu-check-pass.sh on its own, or set GPU_CHECK_PASS=1
# with GPU_CHECK_BUDGET=570 (and the device tool's timeout_s 600) for both in one run.
if [ "${GPU_CHECK_PASS:-0}" = 1 ] && [ -x "$BIN/gpu_pass_check" ]; then
  # shellcheck source=scripts/gpu-check-pass.sh
  source scripts/gpu-check-pass.sh && pass_stages
fi
}

# Everything goes to the terminal and to the log; the pipeline waits for tee, so the table
# printed last is in both.
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
