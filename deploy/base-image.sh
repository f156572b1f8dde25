#!/usr/bin/env bash
# Makes the base image forger's Dockerfiles build on, for machines with no image registry:
# a minimal Debian 12 (bookworm) root filesystem from debootstrap, imported with
# `docker import` and tagged forger-base:bookworm. Where a registry is reachable, pass
# BASE=debian:bookworm-slim (or a CUDA base) to deploy/build-images.sh instead.
#
# The root filesystem is cached as a tarball under $FORGER_CACHE/images, so a Docker engine
# that lost its images imports it again without downloading anything.
# Usage: deploy/base-image.sh [TAG]   (default forger-base:bookworm)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
tag="${1:-forger-base:bookworm}"
tarball="$FORGER_CACHE/images/debian-bookworm-minbase.tar"

if docker image inspect "$tag" >/dev/null 2>&1; then
  echo "base image: $tag already present"
  exit 0
fi

if [ ! -s "$tarball" ]; then
  if ! command -v debootstrap >/dev/null && [ ! -x /usr/sbin/debootstrap ]; then
    echo "installing debootstrap from Debian's packages"
    apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
  fi
  root="$(mktemp -d)"
  trap 'rm -rf "$root"' EXIT
  echo "base image: debootstrap of Debian bookworm (minbase) into $root"
  # Lists and package archives are only needed to install more packages; documentation,
  # manuals and translations are not read by anything in the images.
  PATH="$PATH:/usr/sbin" debootstrap --variant=minbase bookworm "$root/fs" http://deb.debian.org/debian >"$root/log" 2>&1 ||
    { tail -20 "$root/log" >&2; echo "error: debootstrap failed (log above)" >&2; exit 1; }
  rm -rf "$root/fs"/var/cache/apt/archives/*.deb "$root/fs"/var/lib/apt/lists/* \
    "$root/fs"/usr/share/doc/* "$root/fs"/usr/share/man/* "$root/fs"/usr/share/locale/*
  mkdir -p "$(dirname "$tarball")"
  # Device nodes and kernel file systems are the container runtime's to provide.
  tar -C "$root/fs" --exclude=./dev/* --exclude=./proc/* --exclude=./sys/* -cf "$tarball.partial" .
  mv "$tarball.partial" "$tarball"
fi
echo "base image: importing $tarball as $tag"
docker import --change 'CMD ["/bin/bash"]' "$tarball" "$tag" >/dev/null
docker image inspect --format '{{.Id}} {{.Size}}' "$tag"
