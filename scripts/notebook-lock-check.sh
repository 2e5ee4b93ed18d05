#!/usr/bin/env bash
# Fails unless the notebook build resolved every crates.io package to Cargo.lock's version.
# Usage: scripts/notebook-lock-check.sh OURS.lock NOTEBOOK_BUILD.lock
#   OURS: the repository's Cargo.lock. NOTEBOOK_BUILD: the compile folder's lock
#   (target/notebook-build/evcxr/Cargo.lock after a notebook ran). Every registry package of the notebook build
#   must appear in OURS with the same version, and mfac-lab must be in the build (a lock of a
#   build that never reached our crate proves nothing).
set -euo pipefail
if [ $# -ne 2 ]; then
  echo "usage: $0 OURS.lock NOTEBOOK_BUILD.lock" >&2
  exit 2
fi
for f in "$1" "$2"; do
  if [ ! -f "$f" ]; then
    echo "notebook lock check: $f does not exist (run scripts/notebook-setup.sh first)" >&2
    exit 2
  fi
done
# One "name version source" line per [[package]]; path packages have no source.
packages() {
  awk '
    /^\[\[package\]\]/ { if (name != "") print name, version, (src == "" ? "path" : src); name = ""; version = ""; src = "" }
    /^name = /    { gsub(/"/, "", $3); name = $3 }
    /^version = / { gsub(/"/, "", $3); version = $3 }
    /^source = /  { gsub(/"/, "", $3); src = $3 }
    END { if (name != "") print name, version, (src == "" ? "path" : src) }
  ' "$1"
}
ours=$(packages "$1")
theirs=$(packages "$2")
if ! grep -q '^mfac-lab ' <<<"$theirs"; then
  echo "notebook lock check FAILED: $2 has no mfac-lab: the notebook build never resolved our crate" >&2
  exit 1
fi
bad=0
checked=0
while read -r name version src; do
  [ "$src" = path ] && continue
  checked=$((checked + 1))
  if ! grep -qx "$name $version $src" <<<"$ours"; then
    want=$(awk -v n="$name" '$1 == n { printf "%s%s", sep, $2; sep = ", " }' <<<"$ours")
    echo "  $name $version (Cargo.lock: ${want:-not listed})" >&2
    bad=$((bad + 1))
  fi
done <<<"$theirs"
if [ $bad -gt 0 ]; then
  echo "notebook lock check FAILED: $bad of $checked packages of the notebook build differ from $1 (above)." >&2
  echo "Fix: rerun scripts/notebook-setup.sh (it vendors Cargo.lock's versions into the compile folder)." >&2
  exit 1
fi
echo "notebook lock check: all $checked crates.io packages of the notebook build are Cargo.lock's versions"
