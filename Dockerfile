# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root
# user. The running container needs no writable path when it serves from S3: run it with a
# read-only root filesystem (docker run --read-only; `read_only: true` in compose).
FROM rust:1.95-bookworm AS build
WORKDIR /src
# A Cargo.lock in the build context pins every dependency (README: "Pin a build"): the
# glob copies it when present, and the build then insists on it with --locked.
COPY Cargo.toml Cargo.lock* ./
COPY src ./src
COPY benches ./benches
COPY config.example.toml ./
RUN if [ -f Cargo.lock ]; then locked=--locked; else locked=; fi \
    && cargo build --release --bin s3cached $locked \
    && strip target/release/s3cached

FROM debian:bookworm-slim
# ca-certificates: TLS to AWS S3. The image gets no other package. Not pinned to a version:
# the trust store should be the current one, and a pin breaks the build when Debian updates it.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/s3cached --create-home s3cached
COPY --from=build /src/target/release/s3cached /usr/local/bin/s3cached
USER 10001:10001
WORKDIR /var/lib/s3cached
# In a container the ports must be reachable from outside it; publish them on the host with
# care (memcached has no authentication, nor has the admin listener).
# The directory store (no bucket set) writes under /var/lib/s3cached/data: give it a volume.
ENV S3CACHED_LISTEN=0.0.0.0:11211 \
    S3CACHED_DATA_DIR=/var/lib/s3cached/data
EXPOSE 11211 9211
# Liveness: the server answers `version` on its listen address (0.0.0.0 is read as loopback).
# Drop --version-only to check a set/get/delete round trip through the store as well.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["/usr/local/bin/s3cached", "check", "--version-only", "--timeout-ms", "2000"]
ENTRYPOINT ["/usr/local/bin/s3cached"]
