# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root
# user. The running container needs no writable path when it serves from S3: run it with a
# read-only root filesystem (docker run --read-only; `read_only: true` in compose).
#
# The base images are build arguments; their defaults are the public images:
#   docker build -t s3cached .
# To package a binary built outside (cargo build --release), no Rust image is needed:
#   docker build --build-arg PREBUILT=target/release/s3cached \
#                --build-arg RUST_IMAGE=debian:bookworm-slim -t s3cached .
# Either way the runtime stage below is the same.
ARG RUST_IMAGE=rust:1.95-bookworm
ARG RUNTIME_IMAGE=debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
# A path in the build context to a Linux x86_64 binary built outside, or empty to compile.
ARG PREBUILT=""
WORKDIR /src
# .dockerignore lets in the sources, Cargo.lock when present, and the two built binaries.
COPY . .
# A Cargo.lock in the build context pins every dependency (docs/operations.md, "Pin a
# build"); the build then insists on it with --locked.
RUN if [ -n "$PREBUILT" ]; then \
        install -m 0755 "$PREBUILT" /s3cached; \
    elif [ -f Cargo.lock ]; then \
        cargo build --release --bin s3cached --locked \
        && strip -o /s3cached target/release/s3cached; \
    else \
        cargo build --release --bin s3cached \
        && strip -o /s3cached target/release/s3cached; \
    fi

FROM ${RUNTIME_IMAGE}
# ca-certificates: TLS to AWS S3. The image gets no other package. Not pinned to a version:
# the trust store should be the current one, and a pin breaks the build when Debian updates it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/s3cached --create-home s3cached \
    && install -d -o 10001 -g 10001 /var/lib/s3cached/data /var/lib/s3cached/disk
COPY --from=build /s3cached /usr/local/bin/s3cached
USER 10001:10001
WORKDIR /var/lib/s3cached
# In a container the ports must be reachable from outside it; publish them on the host with
# care (memcached has no authentication, nor has the admin listener).
# The directory store (no bucket set) writes under /var/lib/s3cached/data, the disk tier
# where disk_cache_dir says (/var/lib/s3cached/disk is ready for it): give each a volume.
# Both exist in the image, owned by the user, so a new named volume mounted there is too.
ENV S3CACHED_LISTEN=0.0.0.0:11211 \
    S3CACHED_DATA_DIR=/var/lib/s3cached/data
EXPOSE 11211 9211
# Liveness: the server answers `version` on its listen address (0.0.0.0 is read as loopback).
# Drop --version-only to check a set/get/delete round trip through the store as well.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["/usr/local/bin/s3cached", "check", "--version-only", "--timeout-ms", "2000"]
ENTRYPOINT ["/usr/local/bin/s3cached"]
