# The S3 server of the container tests, in MinIO's place: moto with its writes serialised
# (tests/s3server.py), on the locally made Debian base. Built by tests/containers/images.sh,
# which puts the wheels and s3server.py in the build context.
ARG BASE=s3cached-test/debian:bookworm
FROM ${BASE}
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
COPY wheels /tmp/wheels
RUN python3 -m venv /opt/moto \
    && /opt/moto/bin/pip install --no-index --find-links /tmp/wheels --no-cache-dir 'moto[s3,server]' \
    && rm -rf /tmp/wheels
COPY s3server.py /opt/moto/s3server.py
EXPOSE 9000
ENTRYPOINT ["/opt/moto/bin/python", "/opt/moto/s3server.py", "-H", "0.0.0.0", "-p", "9000"]
