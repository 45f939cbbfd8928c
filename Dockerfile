# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run in a small Debian image as a non-root user.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml ./
COPY src ./src
COPY benches ./benches
COPY config.example.toml ./
RUN cargo build --release --bin s3cached \
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
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
    CMD ["bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/11211 && printf 'version\\r\\n' >&3 && read -r -t 2 line <&3 && [[ $line == VERSION* ]]"]
ENTRYPOINT ["/usr/local/bin/s3cached"]
