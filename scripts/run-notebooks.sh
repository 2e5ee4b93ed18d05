#!/usr/bin/env bash
# Executes every notebook in notebooks/ headlessly on the real evcxr kernel, small
# (MFAC_LAB_QUICK=1). Fails on any cell error, and on a notebook that produced no image.
# Installs what it needs at pinned versions, skipping what is already there:
#   evcxr_jupyter (cargo install --locked), Jupyter's headless runner (a venv, from PyPI).
# Executed copies go to target/notebooks/ (the committed notebooks stay without outputs).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

EVCXR_VERSION=0.22.0
PY_PKGS=(nbconvert==7.17.2 nbclient==0.11.0 jupyter_client==8.10.0 jupyter_core==5.9.1 nbformat==5.11.1)
VENV=${MFAC_LAB_JUPYTER_VENV:-$HOME/.cache/mfac-lab-jupyter}

export PATH="$HOME/.cargo/bin:$PATH"
if ! cargo install --list | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
  echo "installing evcxr_jupyter $EVCXR_VERSION (about 10 minutes on 2 cores)"
  cargo install --locked evcxr_jupyter --version "$EVCXR_VERSION"
fi

need_py=0
[ -x "$VENV/bin/jupyter" ] || need_py=1
if [ $need_py = 0 ]; then
  frozen=$("$VENV/bin/pip" freeze 2>/dev/null | tr 'A-Z-' 'a-z_')
  for p in "${PY_PKGS[@]}"; do
    grep -qx "$(echo "$p" | tr 'A-Z-' 'a-z_')" <<<"$frozen" || need_py=1
  done
fi
if [ $need_py = 1 ]; then
  echo "installing Jupyter's headless runner into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${PY_PKGS[@]}"
fi

# The kernelspec goes into a folder of ours, not the user's.
export JUPYTER_PATH="$ROOT/target/jupyter"
mkdir -p "$JUPYTER_PATH"
evcxr_jupyter --install >/dev/null

export MFAC_LAB_QUICK=1
# One compile cache for all notebooks, run one after the other (evcxr ignores CARGO_TARGET_DIR).
export EVCXR_TMPDIR="$ROOT/target/evcxr"
mkdir -p "$EVCXR_TMPDIR" "$ROOT/target/notebooks"

status=0
for nb in notebooks/*.ipynb; do
  name=$(basename "$nb")
  echo "== $name"
  start=$(date +%s)
  if ! "$VENV/bin/jupyter" nbconvert --to notebook --execute \
      --ExecutePreprocessor.timeout=3600 --ExecutePreprocessor.kernel_name=rust \
      --output-dir "$ROOT/target/notebooks" "$nb"; then
    echo "FAILED: $name (a cell raised an error; see above)"
    status=1
    continue
  fi
  "$VENV/bin/python" - "$ROOT/target/notebooks/$name" <<'PY' || status=1
import json, sys
nb = json.load(open(sys.argv[1]))
images, errors = 0, []
for i, c in enumerate(nb["cells"]):
    for o in c.get("outputs", []):
        if o.get("output_type") == "error":
            errors.append(f"cell {i}: {o.get('ename')}: {o.get('evalue')}")
        data = o.get("data", {})
        if "image/svg+xml" in data or "image/png" in data:
            images += 1
name = sys.argv[1].rsplit("/", 1)[-1]
if errors:
    print(f"FAILED: {name}: " + "; ".join(errors)); sys.exit(1)
if images == 0:
    print(f"FAILED: {name} produced no image"); sys.exit(1)
print(f"ok: {name}: {images} image(s)")
PY
  echo "   ($(( $(date +%s) - start )) s)"
done
exit $status
