#!/usr/bin/env bash
# Executes every notebook in notebooks/ headlessly on the real evcxr kernel, the way a user gets
# them: first the set-up (scripts/notebook-setup.sh: the pinned kernel and runner, Cargo.lock's
# crates vendored, the compile folder pre-built), then each notebook, timed (scripts/run_notebooks.py).
# Small by default (MFAC_LAB_QUICK=1, as CI runs them); --full runs the demo sizes.
# Fails on a cell error, a notebook without an image, without its "device: …" line or without a
# progress line in its longest training cell (and in any cell of 10 s or more), and when the
# compile folder's lock differs from Cargo.lock.
# Executed copies and timings.json go to target/notebooks/ (the committed notebooks stay without
# outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=notebook-env.sh
source scripts/notebook-env.sh

full=0
for arg in "$@"; do
  case "$arg" in
    --full) full=1 ;;
    *) echo "run-notebooks: unknown argument '$arg' (known: --full)" >&2; exit 2 ;;
  esac
done

# The kernelspec goes into a folder of ours, not the user's.
export JUPYTER_PATH="$ROOT/target/jupyter"
mkdir -p "$JUPYTER_PATH" "$ROOT/target/notebooks"
bash scripts/notebook-setup.sh

if [ $full = 0 ]; then export MFAC_LAB_QUICK=1; else unset MFAC_LAB_QUICK; fi
# CI cannot reach the hub: notebook 01 then takes its offline path at once, from the cache,
# instead of after hf-hub's retries. HF_HUB_OFFLINE=0 scripts/run-notebooks.sh tries the hub.
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
status=0
"$VENV/bin/python" scripts/run_notebooks.py run notebooks/*.ipynb --out "$ROOT/target/notebooks" || status=1
# What the notebooks compiled: Cargo.lock's versions, or a failure naming each difference.
bash scripts/notebook-lock-check.sh Cargo.lock "$COMPILE_DIR/Cargo.lock" || status=1
exit $status
