# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
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
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/s3cached --create-home s3cached
COPY --from=build /src/target/release/s3cached /usr/local/bin/s3cached
USER s3cached
WORKDIR /var/lib/s3cached
# In a container the port must be reachable from outside it; publish it on the host with care.
ENV S3CACHED_LISTEN=0.0.0.0:11211 \
    S3CACHED_DATA_DIR=/var/lib/s3cached/data
EXPOSE 11211
# Liveness: the server answers `version` on its listen address (0.0.0.0 is read as loopback).
# Drop --version-only to check a set/get/delete round trip through the store as well.
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["/usr/local/bin/s3cached", "check", "--version-only", "--timeout-ms", "2000"]
ENTRYPOINT ["/usr/local/bin/s3cached"]
