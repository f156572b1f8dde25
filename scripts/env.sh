# Sourced by forger's scripts: where the project's own libtorch lives, and the variables the
# tch build needs to find it. Nothing here is needed to *run* the built binaries: the worker
# carries an rpath to libtorch.
FORGER_CACHE="${FORGER_CACHE:-$HOME/.cache/forger}"
FORGER_TORCH_VERSION="2.13.0"   # tch 0.26 needs exactly this libtorch
FORGER_VENV="$FORGER_CACHE/torch-$FORGER_TORCH_VERSION"
export FORGER_CACHE FORGER_VENV
export VIRTUAL_ENV="$FORGER_VENV"
export PATH="$FORGER_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
