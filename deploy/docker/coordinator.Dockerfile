# The coordinator image: forger-coordinator alone (it links nothing but the C library, no
# libtorch), on a small Debian base.
#
# The context is prepared by deploy/build-images.sh: bin/forger-coordinator from the
# workspace's release build, the same binary the tests ran. BASE is any glibc Debian or Ubuntu
# image: forger-base:bookworm (made locally by deploy/base-image.sh) where no registry is
# reachable, debian:bookworm-slim where one is.
# Written for the classic builder as well as BuildKit: no heredocs, no RUN --mount.
ARG BASE=debian:bookworm-slim

# Stage 1: the bundle, checked in the base it will run on before anything is tagged.
FROM ${BASE} AS bundle
COPY bin/forger-coordinator /opt/forger/bin/forger-coordinator
RUN ["/opt/forger/bin/forger-coordinator", "--version"]

# Stage 2: the runtime. Nothing from stage 1 but the binary.
FROM ${BASE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="forger-coordinator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.description="forger's coordinator: shards, all-reduce, checkpoints"
COPY --from=bundle /opt/forger/bin/forger-coordinator /usr/local/bin/forger-coordinator
# An unprivileged user owns the run and credentials directories; a named volume mounted
# there inherits that.
RUN groupadd --system --gid 10001 forger \
 && useradd --system --uid 10001 --gid forger --home-dir /var/lib/forger --no-create-home forger \
 && mkdir -p /var/lib/forger/run /var/lib/forger/credentials /etc/forger \
 && chown -R forger:forger /var/lib/forger
USER forger
# The flags as environment variables (each flag's [env: ...] in --help): a container is
# configured by these, or by arguments after the image name.
ENV FORGER_LISTEN=0.0.0.0:50051 \
    FORGER_SPEC=/etc/forger/spec.toml \
    FORGER_OUT=/var/lib/forger/run
EXPOSE 50051
ENTRYPOINT ["forger-coordinator"]
