#!/usr/bin/env bash
# The notebooks' one set-up command: run it once (and again after Cargo.lock or a pull changes
# the crate); then any notebook opens and runs its first cells in seconds.
#
#   scripts/notebook-setup.sh          # CPU
#   scripts/notebook-setup.sh --cuda   # also pre-build the `cuda` variant (needs nvcc; a GPU
#                                      # machine); then give a notebook's first cell the line
#                                      # it shows: :dep mfac-lab = { path = "..", features = ["cuda"] }
#
# What it does (each step skipped when already done):
#  1. installs the evcxr Jupyter kernel, pinned (cargo install --locked evcxr_jupyter 0.22.0),
#     and its kernelspec (`evcxr_jupyter --install`; into $JUPYTER_PATH when set);
#  2. installs Jupyter's headless runner (nbclient, pinned) into a venv ($VENV below);
#  3. vendors Cargo.lock's crates (`cargo vendor --locked`) into target/notebook-build/vendor
#     and makes them the only crates.io source of the compile folder target/notebook-build/evcxr
#     (target/notebook-build/.cargo/config.toml): the notebook build can only compile Cargo.lock's
#     versions, whatever evcxr resolves; the same file compiles the dependencies as a release
#     build does (opt-level 3, no debug assertions: training steps 3.2x faster than evcxr's
#     profile);
#  4. runs the notebooks' first two cells on the kernel itself, with notebooks/evcxr.toml (the
#     compile folder, the opt-level), so the compile folder holds what the notebooks need;
#  5. checks the compile folder's lock against Cargo.lock (scripts/notebook-lock-check.sh).
# It writes under target/, the venv, ~/.cargo/bin (the kernel) and Jupyter's kernel folder;
# notebooks/ and Cargo.lock are read, never written. Run it with no notebook kernel running
# (kernels share the compile folder).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
# shellcheck source=notebook-env.sh
source scripts/notebook-env.sh

cuda=0
for arg in "$@"; do
  case "$arg" in
    --cuda) cuda=1 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "notebook-setup: unknown argument '$arg' (known: --cuda)" >&2; exit 2 ;;
  esac
done
start=$(date +%s)

# 1. The kernel.
if ! cargo install --list | grep -q "^evcxr_jupyter v$EVCXR_VERSION:"; then
  echo "installing evcxr_jupyter $EVCXR_VERSION (about 10 minutes on 2 cores)"
  cargo install --locked evcxr_jupyter --version "$EVCXR_VERSION"
fi
evcxr_jupyter --install >/dev/null

# 2. The headless runner.
need_py=0
[ -x "$VENV/bin/python" ] || need_py=1
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

# The compile folder must be the one notebooks/evcxr.toml names.
tmpdir=$(sed -n 's/^tmpdir *= *"\(.*\)"/\1/p' notebooks/evcxr.toml)
if [ -z "$tmpdir" ] || [ "$(cd notebooks && realpath -m "$tmpdir")" != "$COMPILE_DIR" ]; then
  echo "notebook-setup: notebooks/evcxr.toml's tmpdir ('$tmpdir') is not $COMPILE_DIR;" \
       "restore it (git checkout notebooks/evcxr.toml)" >&2
  exit 1
fi

# 3. Cargo.lock's crates, vendored, as the compile folder's only crates.io source.
mkdir -p "$BUILD_ROOT/.cargo" "$COMPILE_DIR"
lock_sum=$(sha256sum Cargo.lock | cut -d' ' -f1)
if [ "$(cat "$VENDOR_DIR/.cargo-lock-sha256" 2>/dev/null)" != "$lock_sum" ]; then
  echo "vendoring Cargo.lock's crates into $VENDOR_DIR"
  rm -rf "$VENDOR_DIR.tmp"
  cargo vendor --locked --versioned-dirs --quiet "$VENDOR_DIR.tmp" >/dev/null
  echo "$lock_sum" > "$VENDOR_DIR.tmp/.cargo-lock-sha256"
  rm -rf "$VENDOR_DIR"
  mv "$VENDOR_DIR.tmp" "$VENDOR_DIR"
fi
cat > "$BUILD_ROOT/.cargo/config.toml.tmp" <<TOML
# Written by scripts/notebook-setup.sh. The notebooks' build (evcxr, in evcxr/ below) takes
# crates.io packages only from the vendored copy of Cargo.lock's versions: it compiles exactly
# what \`cargo test --locked\` compiles, whatever evcxr's own resolution would pick.
[source.crates-io]
replace-with = "mfac-lab-cargo-lock"

[source.mfac-lab-cargo-lock]
directory = "$VENDOR_DIR"

# The dependencies (mfac-lab included) as a release build compiles them: a training step runs
# 3.2x faster than with evcxr's own profile (opt-level 2 with debug assertions and overflow
# checks), for 15 % more build time, once (docs/PERFORMANCE.md, "Notebooks"). The cells' own
# code keeps evcxr's profile (notebooks/evcxr.toml). Cargo gives config profiles precedence over
# the manifest evcxr writes.
[profile.dev.package."*"]
opt-level = 3
debug-assertions = false
overflow-checks = false
TOML
mv "$BUILD_ROOT/.cargo/config.toml.tmp" "$BUILD_ROOT/.cargo/config.toml"

# 4. The notebooks' first two cells, on the kernel (evcxr.toml is read from notebooks/).
cells=(":dep mfac-lab = { path = \"..\" }")
[ $cuda = 1 ] && cells+=(":dep mfac-lab = { path = \"..\", features = [\"cuda\"] }")
for dep in "${cells[@]}"; do
  echo "pre-building the notebooks' dependency on the evcxr kernel: $dep"
  "$VENV/bin/python" scripts/run_notebooks.py prebuild --dep "$dep"
done

# 5. The versions the notebook build compiled.
bash scripts/notebook-lock-check.sh Cargo.lock "$COMPILE_DIR/Cargo.lock"

echo "notebook set-up done in $(( $(date +%s) - start )) s. Open the notebooks with:"
echo "  pip install jupyterlab && jupyter lab notebooks/"
