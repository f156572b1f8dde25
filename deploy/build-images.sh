#!/usr/bin/env bash
# Builds forger's two images from the workspace's release build (the binaries the tests run):
#   forger-coordinator:VERSION   the coordinator alone, about 100 MB
#   forger-worker:VERSION        the worker and the libtorch it loads (about 3 GB: PyTorch's
#                                wheel links the CUDA runtime even into its CPU library)
#   forger-worker:VERSION-cuda   with --cuda: also the libraries libtorch opens only on a GPU
# The base is forger-base:bookworm, made locally by deploy/base-image.sh when it is missing;
# --base IMAGE (e.g. debian:bookworm-slim, or an nvidia/cuda runtime image) uses another.
# An image whose inputs (binary, libraries, Dockerfile, base) have not changed is kept.
# Usage: deploy/build-images.sh [--cuda] [--base IMAGE]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

variant=cpu
base=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cuda) variant=cuda ;;
    --base) base="${2:?--base needs an image}"; shift ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

if ! docker info >/dev/null 2>&1; then
  echo "error: no Docker engine answers (docker info failed)" >&2
  exit 1
fi
version="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
bin="${CARGO_TARGET_DIR:-target}/release"
if [ ! -x "$bin/forger-coordinator" ] || [ ! -x "$bin/forger-worker" ]; then
  scripts/setup.sh
fi
if [ -z "$base" ]; then
  base=forger-base:bookworm
  deploy/base-image.sh "$base"
fi
base_id="$(docker image inspect --format '{{.Id}}' "$base" 2>/dev/null)" ||
  { echo "error: the base image $base is not present (pull it, or leave --base out)" >&2; exit 1; }

# A folder of this build's own, so that two builds sharing the cache do not meet.
mkdir -p "$FORGER_CACHE/images"
contexts="$(mktemp -d "$FORGER_CACHE/images/context.XXXXXX")"
trap 'rm -rf "$contexts"' EXIT
mkdir -p "$contexts/coordinator/bin" "$contexts/worker/bin" "$contexts/worker/lib" "$contexts/worker/lib-gpu"

# A hard link costs nothing where the cache and the build share a file system.
stage() { ln -f "$1" "$2" 2>/dev/null || cp -f "$1" "$2"; }

stage "$bin/forger-coordinator" "$contexts/coordinator/bin/forger-coordinator"
stage "$bin/forger-worker" "$contexts/worker/bin/forger-worker"
# The libraries the worker loads from the wheel; the C and C++ runtimes come from the base.
missing="$(ldd "$bin/forger-worker" | awk '/not found/ {print $1}')"
if [ -n "$missing" ]; then
  echo "error: forger-worker cannot find: $missing" >&2
  exit 1
fi
ldd "$bin/forger-worker" | awk -v venv="$FORGER_VENV" 'index($3, venv) == 1 {print $1, $3}' |
  while read -r name path; do stage "$(realpath "$path")" "$contexts/worker/lib/$name"; done
if [ "$variant" = cuda ]; then
  # Everything else the wheel ships as a shared library: cuDNN's engines and NVRTC's
  # builtins are opened with dlopen, so ldd does not list them.
  site="$(dirname "$(dirname "$(realpath "$FORGER_VENV/lib/python3"*/site-packages/torch/lib/libtorch.so)")")"
  find "$site/torch/lib" "$site/nvidia" -name '*.so*' -type f | while read -r path; do
    name="$(basename "$path")"
    [ -e "$contexts/worker/lib/$name" ] || stage "$path" "$contexts/worker/lib-gpu/$name"
  done
fi

# Builds $1 from deploy/docker/$2.Dockerfile unless an image with the same inputs exists.
build() {
  local tag="$1" dockerfile="deploy/docker/$2.Dockerfile" context="$contexts/$2" inputs have
  inputs="$( (cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum; \
    sha256sum "$OLDPWD/$dockerfile"; echo "$base_id $variant $version") | sha256sum | cut -d' ' -f1)"
  have="$(docker image inspect --format '{{index .Config.Labels "org.forger.inputs"}}' "$tag" 2>/dev/null || true)"
  if [ "$have" = "$inputs" ]; then
    echo "image $tag: up to date"
    return
  fi
  echo "image $tag: building from $dockerfile on $base ($(du -sh "$context" | cut -f1) of context)"
  docker build --quiet --file "$dockerfile" --tag "$tag" \
    --build-arg BASE="$base" --build-arg VERSION="$version" --build-arg VARIANT="$variant" \
    --label org.forger.inputs="$inputs" "$context" >/dev/null
  docker image inspect --format "image $tag: {{.Size}} bytes" "$tag"
}

build "forger-coordinator:$version" coordinator
worker_tag="forger-worker:$version"
[ "$variant" = cuda ] && worker_tag="$worker_tag-cuda"
build "$worker_tag" worker
rm -rf "$contexts"
