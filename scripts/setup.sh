#!/usr/bin/env bash
# Installs everything forger needs to build, on a fresh machine, and builds it:
# - a Python virtual environment under $FORGER_CACHE (default ~/.cache/forger) holding
#   PyTorch's 2.13.0 wheel, which supplies libtorch (about 5 GB with its CUDA libraries);
# - the Rust workspace (protoc comes from the protoc-bin-vendored crate).
# Everything is built with the release profile: the demo and the tests share one build.
# Usage: scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; install Rust (https://rustup.rs) first" >&2
  exit 1
fi
if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3 with venv support from Debian's packages"
  apt-get update -qq && apt-get install -y -qq python3 python3-venv >/dev/null
fi

if "$FORGER_VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$FORGER_TORCH_VERSION')" 2>/dev/null; then
  echo "libtorch: torch $FORGER_TORCH_VERSION already in $FORGER_VENV"
else
  echo "libtorch: installing torch $FORGER_TORCH_VERSION into $FORGER_VENV"
  mkdir -p "$FORGER_CACHE"
  python3 -m venv "$FORGER_VENV"
  "$FORGER_VENV/bin/pip" install --quiet --progress-bar off --upgrade pip
  "$FORGER_VENV/bin/pip" install --quiet --progress-bar off "torch==$FORGER_TORCH_VERSION"
fi

echo "building the workspace (release profile)"
cargo build --workspace --bins --locked --release
