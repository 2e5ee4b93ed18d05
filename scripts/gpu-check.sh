#!/usr/bin/env bash
# The GPU checks, both in one run (issues 18 and 19): M-FAC's device window and the CUDA pass, on
# a GPU machine (H100/H200, driver with CUDA 13.0, /opt/torch/.venv's CUDA 13 libraries; no Rust,
# no network, no ../shared).
#
# Needs gpu-pack/ (built here by scripts/gpu-pack.sh: the stripped, gzipped binaries and the
# fixtures they read). On the device tool:  run  command "bash scripts/gpu-check.sh"
# carry ["gpu-pack"]  timeout_s 480. The budget (GPU_CHECK_BUDGET, 450 s) keeps one run within
# 8 minutes, so that a fixed rerun still fits in a session's 15 minutes with the machine's start.
# GPU_CHECK_PASS=0 leaves out the CUDA pass's stages (scripts/gpu-check-pass.sh runs them alone).
#
# Stages, most telling first (a stage that finds no time left is reported as skipped):
#   golden (fixtures/mfac, f32/f64/bf16 device windows, device vs CPU, non-finite),
#   sparse (the sparse window: golden cases a, d, e on f64/f32 device windows, device = host on a
#   bert-tiny-sized window, the step at m = 1024, 1 %, f32 and bf16, with its floor),
#   pass-parity (CUDA pass vs CPU pass), replay (an M-FAC trajectory on the device), e2e
#   (Trainer + checkpoint/resume + compare_optimizers on CUDA), mfac-f32 (step at m = 1024, the
#   floor measured in the same run), pass-bench (step ms, the 5-epoch projection), train,
#   bf16, pass-dropout, pass-replay, mfac-bf16, cli (mfac-lab compare --device cuda), copy.
# Binaries are unpacked when a stage first needs one.
# Writes $OUT/gpu-check.log (everything) and $OUT/results.jsonl (one JSON object per result),
# prints the short table last. Exit status: non-zero when a check or a stage failed.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$SECONDS
BUDGET=${GPU_CHECK_BUDGET:-450}          # seconds for everything: one run ≤ 8 minutes
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
unpack gpu_check
ls -l "$PACK/bin" "$BIN"
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
# $G runs gpu_check's stages; the pass's stages (gpu-check-pass.sh) run theirs with $P.
G="$BIN/gpu_check"
F="$PACK/fixtures"
local pass=${GPU_CHECK_PASS:-1}
# shellcheck source=scripts/gpu-check-pass.sh
[ "$pass" = 1 ] && source scripts/gpu-check-pass.sh
stage golden 60 "$G" golden --mfac "$F/mfac" --json "$JSON"
stage sparse 75 "$G" sparse --sparse "$F/sparse-mfac" --m 1024 --steps 30 --json "$JSON"
[ "$pass" = 1 ] && pass_parity
stage replay 40 "$G" replay --traj "$F/trajectories/case5_micro_mfac_mom_wd.safetensors" \
  --model "$F/bert-micro-random" --json "$JSON"
# The end-to-end check runs on the graph (MFAC_LAB_CUDA_PASS=off), so that a fault of the CUDA
# pass (checked by its own stages) cannot hide the window's result.
stage e2e 60 env MFAC_LAB_CUDA_PASS=off "$G" e2e --json "$JSON"
stage mfac-f32 60 "$G" mfac --m 1024 --dtype f32 --steps 30 --json "$JSON"
[ "$pass" = 1 ] && pass_bench
stage train 45 "$G" train --m 1024 --steps 20 --json "$JSON"
stage bf16 40 "$G" bf16 --m 32 --steps 64 --json "$JSON"
[ "$pass" = 1 ] && pass_dropout
[ "$pass" = 1 ] && pass_replay
stage mfac-bf16 45 "$G" mfac --m 1024 --dtype bf16 --steps 30 --json "$JSON"
unpack mfac-lab
if [ -x "$BIN/mfac-lab" ]; then
  stage cli 45 "$BIN/mfac-lab" compare --device cuda --seeds 42 --num_train_epochs 1 \
    --max_train_samples 256 --quiet --output_dir /tmp/gpu-check-cli
fi
stage copy 20 "$G" copy --gib 4 --json "$JSON"
}

# Everything goes to the terminal and to the log; the pipeline waits for tee, so the table
# printed last is in both.
main 2>&1 | tee "$LOG"
exit "${PIPESTATUS[0]}"
