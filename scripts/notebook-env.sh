# Sourced by scripts/notebook-setup.sh and scripts/run-notebooks.sh: the pinned tools and the
# folders of the notebooks' build. Not meant to be run by itself.
# shellcheck shell=bash

# The kernel, built with `cargo install --locked` at this version.
EVCXR_VERSION=0.22.0
# Jupyter's headless runner (the set-up's pre-build and CI's notebook run), in a venv of ours.
PY_PKGS=(nbconvert==7.17.2 nbclient==0.11.0 jupyter_client==8.10.0 jupyter_core==5.9.1 nbformat==5.11.1)
VENV=${MFAC_LAB_JUPYTER_VENV:-$HOME/.cache/mfac-lab-jupyter}
# The one compile folder of every notebook (notebooks/evcxr.toml names it as `tmpdir`), inside a
# folder of ours that holds the vendored copy of Cargo.lock's crates and the cargo config that
# makes it the build's crates.io source: .cargo/config.toml here, one level above the compile
# folder, since evcxr rewrites the compile folder's own .cargo/config.toml ([net] offline) on
# every cell, and cargo merges the configs of all parent folders.
BUILD_ROOT="$ROOT/target/notebook-build"
COMPILE_DIR="$BUILD_ROOT/evcxr"
VENDOR_DIR="$BUILD_ROOT/vendor"
export PATH="$HOME/.cargo/bin:$PATH"
