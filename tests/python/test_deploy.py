"""The deployment files, read without a container engine: hadolint lints the Dockerfile, and
the compose file is read for what docs/operations.md promises (two replicas on one bucket, a
cross-replica check, read-only non-root containers, ports on the host's loopback by
default). tests/containers/ runs them where a Docker engine answers."""

import os
import re
import shutil
import subprocess

import yaml

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")


def read(name):
    with open(os.path.join(ROOT, name)) as f:
        return f.read()


def test_hadolint_passes():
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -r tests/python/requirements.txt"
    done = subprocess.run(
        [hadolint, os.path.join(ROOT, "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_image_runs_as_a_non_root_user():
    users = re.findall(r"^USER\s+(\S+)", read("Dockerfile"), re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")


def test_compose_runs_two_replicas_on_one_bucket_and_a_cross_replica_check():
    compose = yaml.safe_load(read("docker-compose.yml"))
    services = compose["services"]
    a, b, check = services["s3cached-a"], services["s3cached-b"], services["check"]
    for replica in (a, b):
        env = replica["environment"]
        assert env["S3CACHED_STORAGE_BUCKET_NAME"] == "s3cached"
        assert env["S3CACHED_LOCATION"] == "cache"
        assert replica["read_only"] is True
        assert replica["cap_drop"] == ["ALL"]
        for port in replica["ports"]:
            # Loopback unless the user names another address.
            assert port.startswith("${S3CACHED_PUBLISH_ADDR:-127.0.0.1}:"), port
        assert env["S3CACHED_CREATE_BUCKET"] == "true"
        assert replica["depends_on"]["minio"]["condition"] == "service_healthy"
    assert a["environment"] == b["environment"]
    command = check["command"]
    assert command[:1] == ["check"]
    assert command[command.index("--addr") + 1] == "s3cached-a:11211"
    assert command[command.index("--read-addr") + 1] == "s3cached-b:11211"
    assert check["read_only"] is True
    for replica in ("s3cached-a", "s3cached-b"):
        assert check["depends_on"][replica]["condition"] == "service_healthy"
