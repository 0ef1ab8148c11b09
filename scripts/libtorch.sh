#!/usr/bin/env bash
#! Installs libtorch 2.11.0 (the PyPI wheel torch==2.11.0) once into a per-user cache outside the
#! repository and prints the libtorch directory (the value for LIBTORCH) on stdout.
#!
#! Idempotent: a finished install is marked and reused; an interrupted one is discarded and redone.
#! The cache lives in $METALOOP_CACHE, else $XDG_CACHE_HOME/metaloop, else ~/.cache/metaloop.
set -euo pipefail

torch_version="2.11.0"
cache="${METALOOP_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metaloop}"
dest="$cache/torch-$torch_version"
marker="$dest/.metaloop-complete"

if [ -f "$marker" ]; then
  echo "$dest/torch"
  exit 0
fi

python="${PYTHON:-python3}"
if ! command -v "$python" >/dev/null 2>&1; then
  echo "error: metaloop needs Python 3 with pip to install libtorch (torch==$torch_version from PyPI);" \
       "'$python' was not found. Install python3 and python3-pip, or set PYTHON=/path/to/python3." >&2
  exit 1
fi
if ! "$python" -m pip --version >/dev/null 2>&1; then
  echo "error: '$python' has no pip module; install pip (e.g. the python3-pip package) so metaloop" \
       "can install torch==$torch_version." >&2
  exit 1
fi

mkdir -p "$cache"
partial="$dest.partial"
rm -rf "$partial"
echo "metaloop: installing libtorch (torch==$torch_version from PyPI, about 4.6 GB) into $dest" >&2
start=$(date +%s)
"$python" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore --no-cache-dir \
  --target "$partial" "torch==$torch_version" >&2
if [ ! -f "$partial/torch/lib/libtorch_cpu.so" ]; then
  echo "error: pip finished but $partial/torch/lib/libtorch_cpu.so is missing" >&2
  exit 1
fi
rm -rf "$dest"
mv "$partial" "$dest"
touch "$marker"
echo "metaloop: libtorch installed in $(( $(date +%s) - start ))s" >&2
echo "$dest/torch"
