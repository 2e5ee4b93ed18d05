# Shared by scripts/gpu-check.sh and scripts/gpu-check-pass.sh (sourced; uses START, BUDGET and
# FAILED from the caller): progress lines, stages under a time budget, the GPU machine's CUDA
# libraries (../shared/docs/gpu.md).

say() { printf '\n=== %s (t=%ds)\n' "$*" $((SECONDS - START)); }

# stage NAME SECONDS COMMAND...: runs under timeout, within what is left of the budget.
stage() {
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 15 ]; then
    say "$name: SKIPPED (the budget of ${BUDGET}s is spent)"
    FAILED+=("$name (skipped: no time left)")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  say "$name (limit ${limit}s)"
  local t0=$SECONDS
  timeout --signal=TERM --kill-after=5 "$limit" "$@"
  local rc=$?
  echo "--- $name: exit $rc after $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ]; then
    [ "$rc" -eq 124 ] && FAILED+=("$name (timed out after ${limit}s)") || FAILED+=("$name (exit $rc)")
  fi
}

# The CUDA libraries of /opt/torch/.venv first, then the system's.
cuda_libraries() {
  local sp=/opt/torch/.venv/lib/python3.12/site-packages
  LD_LIBRARY_PATH="$(ls -d $sp/nvidia/cu13/lib $sp/nvidia/*/lib 2>/dev/null | paste -sd:)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}:/usr/local/cuda/lib64:/usr/local/nvidia/lib64"
  export LD_LIBRARY_PATH
}

# unpack NAME: $PACK/bin/NAME.xz (or .gz) into $BIN/NAME, once, when a stage first needs it
# (unpacking every binary up front costs seconds of GPU time for stages that may never run).
# Without an xz command, Python's lzma module unpacks it.
unpack() {
  local name=$1 src
  [ -x "$BIN/$name" ] && return 0
  if [ -f "$PACK/bin/$name.xz" ]; then
    src=$PACK/bin/$name.xz
    if command -v xz >/dev/null 2>&1; then
      xz -dc "$src" >"$BIN/$name"
    else
      python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$src" "$BIN/$name"
    fi
  elif [ -f "$PACK/bin/$name.gz" ]; then
    gunzip -c "$PACK/bin/$name.gz" >"$BIN/$name"
  else
    return 0
  fi && chmod +x "$BIN/$name"
}
