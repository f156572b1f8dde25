# The worker image: forger-worker and the libtorch it loads.
#
# The context is prepared by deploy/build-images.sh: bin/forger-worker from the workspace's
# release build (the binary the tests ran), lib/ with every shared library it loads from
# PyTorch's wheel (libtorch and the CUDA runtime libraries the wheel bundles: libtorch_cpu
# itself needs libcudart, so even a CPU-only worker carries them), and for VARIANT=cuda also
# lib-gpu/ with the libraries libtorch opens only when it uses a GPU (cuDNN's engines, NVRTC's
# builtins). The GPU driver is not in the image: the NVIDIA container toolkit mounts it.
# BASE is any glibc Debian or Ubuntu image (forger-base:bookworm where no registry is
# reachable; debian:bookworm-slim or an nvidia/cuda base where one is).
# Written for the classic builder as well as BuildKit: no heredocs, no RUN --mount.
ARG BASE=debian:bookworm-slim

# Stage 1: the bundle, checked in the base it will run on before anything is tagged.
FROM ${BASE} AS bundle
ARG VARIANT=cpu
COPY bin/forger-worker /opt/forger/bin/forger-worker
COPY lib/ /opt/forger/lib/
COPY lib-gpu/ /opt/forger/lib-gpu/
RUN set -eu; \
    case "$VARIANT" in \
      cpu) ;; \
      cuda) [ -n "$(ls /opt/forger/lib-gpu)" ] || { echo "VARIANT=cuda needs lib-gpu/ (build-images.sh --cuda)" >&2; exit 1; }; \
            mv /opt/forger/lib-gpu/* /opt/forger/lib/ ;; \
      *) echo "VARIANT must be cpu or cuda, not $VARIANT" >&2; exit 1 ;; \
    esac; \
    rm -rf /opt/forger/lib-gpu
ENV LD_LIBRARY_PATH=/opt/forger/lib
# Loading the binary loads every library it needs: a missing one fails the build here.
RUN ["/opt/forger/bin/forger-worker", "--version"]

# Stage 2: the runtime.
FROM ${BASE}
ARG VERSION=0.1.0
ARG VARIANT=cpu
LABEL org.opencontainers.image.title="forger-worker" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="forger's worker (libtorch, ${VARIANT})"
COPY --from=bundle /opt/forger /opt/forger
RUN ln -s /opt/forger/bin/forger-worker /usr/local/bin/forger-worker \
 && groupadd --system --gid 10001 forger \
 && useradd --system --uid 10001 --gid forger --home-dir /var/lib/forger --create-home forger
USER forger
# LD_LIBRARY_PATH wins over the binary's RUNPATH, which names the build machine's folder.
# NVIDIA_DRIVER_CAPABILITIES asks the container toolkit for the driver's compute library when
# the container is given GPUs (`--gpus`, or compose's device reservations); without GPUs it
# does nothing. Which GPUs a container gets is left to those requests.
ENV LD_LIBRARY_PATH=/opt/forger/lib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
ENTRYPOINT ["forger-worker"]
