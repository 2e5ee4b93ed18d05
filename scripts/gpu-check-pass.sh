#!/usr/bin/env bash
# The GPU check of the CUDA pass (issue 13): examples/gpu_pass_check.rs, run on the GPU machine
# from gpu-pack/ (built here by scripts/gpu-pack.sh, which packs bin/gpu_pass_check.xz).
#
# Standalone:      bash scripts/gpu-check-pass.sh  (device tool: carry ["gpu-pack"], timeout_s 300)
# Usually not alone: scripts/gpu-check.sh runs these stages too, in one run of ≤ 8 minutes.
# From gpu-check:  sourced by it (uses its $BIN, $PACK, $JSON and scripts/gpu-check-lib.sh's stage)
#
# Stages (checks first, then timings):
#   pass-parity   logits, loss, all 41 gradients vs the CPU pass, dropout off (worst rel err per
#                 tensor printed), bert-tiny random+perturbed at B8 padded and B32 S128, and the
#                 bert-micro-random fixture from the pack; an out-of-range id is an error
#   pass-dropout  keep rate, independence across sites and neighbours, same seed → same masks
#   pass-replay   20 AdamW steps (clip 1.0, linear schedule) CUDA pass vs CPU pass
#   pass-bench    step ms for B32 S128 and an MNLI-like length mix, AdamW and M-FAC, CudaPass vs
#                 Graph; eval forward; the 5-epoch projection (targets: ≤ 5 min AdamW, ≤ 15 min
#                 M-FAC m = 1024)
# A/B: MFAC_LAB_CUDA_PASS=off makes Engine::for_model pick the graph on CUDA again.
# Each stage on its own, so gpu-check.sh can interleave them with its own, most telling first.
pass_bin() {
  P="$BIN/gpu_pass_check"
  unpack gpu_pass_check
  if [ ! -x "$P" ]; then
    echo "no $P: the pack lacks bin/gpu_pass_check.xz (scripts/gpu-pack.sh builds it)"
    FAILED+=("pass (no binary)")
    return 1
  fi
}
pass_parity() {
  pass_bin || return
  local micro=() F="$PACK/fixtures"
  [ -f "$F/bert-micro-random/model.safetensors" ] && micro=(--model "$F/bert-micro-random")
  stage pass-parity 60 "$P" parity "${micro[@]}" --json "$JSON"
}
pass_dropout() { pass_bin && stage pass-dropout 30 "$P" dropout --json "$JSON"; }
pass_replay() { pass_bin && stage pass-replay 45 "$P" replay --steps 20 --json "$JSON"; }
pass_bench() { pass_bin && stage pass-bench 90 "$P" bench --steps 30 --m 1024 --json "$JSON"; }
pass_stages() {
  pass_parity
  pass_dropout
  pass_replay
  pass_bench
}

# Standalone run: the same preamble as gpu-check.sh, then the pass stages.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -uo pipefail
  cd "$(dirname "$0")/.."
  START=$SECONDS
  BUDGET=${GPU_CHECK_BUDGET:-270}
  PACK=${GPU_PACK_DIR:-gpu-pack}
  OUT=${OUT:-$PWD/gpu-check-out}
  mkdir -p "$OUT"
  LOG=$OUT/gpu-check-pass.log
  JSON=$OUT/results-pass.jsonl
  : >"$JSON"
  FAILED=()
  # shellcheck source=scripts/gpu-check-lib.sh
  source scripts/gpu-check-lib.sh
  {
    say "machine"
    nvidia-smi || true
    cuda_libraries
    BIN=/tmp/gpu-check-pass-bin
    rm -rf "$BIN" && mkdir -p "$BIN"
    pass_stages
    say "summary"
    grep -h '^RESULT' "$LOG" 2>/dev/null | tail -n 80 || true
    if [ ${#FAILED[@]} -gt 0 ]; then printf 'FAILED: %s\n' "${FAILED[@]}"; exit 1; fi
    echo "all pass stages passed"
  } 2>&1 | tee "$LOG"
  exit "${PIPESTATUS[0]}"
fi
