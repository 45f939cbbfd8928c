"""Test tooling for the client tests: s3cached (over a directory or the local S3 server)
and a reference memcached, each started on a free loopback port."""

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

# pylibmc's wheel carries its own libsasl2, which looks for mechanism plugins where it was
# built; point it at the system's (Debian's libsasl2-modules) so PLAIN is found. libsasl2
# reads SASL_PATH once, so it is set here, before any test module imports pylibmc.
SYSTEM_SASL_PLUGINS = "/usr/lib/x86_64-linux-gnu/sasl2"
if "SASL_PATH" not in os.environ and os.path.isdir(SYSTEM_SASL_PLUGINS):
    os.environ["SASL_PATH"] = SYSTEM_SASL_PLUGINS

S3_ENDPOINT_ENV = "S3CACHED_TEST_S3_ENDPOINT"
STARTUP_SECS = 30


def wait_for_file(path, proc, what):
    """Waits until `path` exists (servers write it whole, by rename, once listening) and
    returns its text; fails at once if `proc` exits first."""
    deadline = time.monotonic() + STARTUP_SECS
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with open(path) as f:
                return f.read()
        except FileNotFoundError:
            time.sleep(0.02)
    raise RuntimeError(f"{what} wrote no {path} within {STARTUP_SECS}s")


def s3cached_binary():
    path = os.environ.get("S3CACHED_BIN") or os.path.join(
        os.path.dirname(__file__), "..", "..", "target", "debug", "s3cached"
    )
    if not os.path.exists(path):
        raise RuntimeError(f"no s3cached binary at {path}: run cargo build (tests/run does)")
    return path


class Server:
    """A running s3cached process."""

    def __init__(self, backend, extra_env=None, location=None, log=None):
        self.backend = backend
        self.tmp = tempfile.mkdtemp(prefix="s3cached-test-")
        self.location = location or f"py-{uuid.uuid4().hex[:12]}"
        self.data_dir = os.path.join(self.tmp, "data")
        addr_file = os.path.join(self.tmp, "addr")
        env = dict(os.environ)
        env.update(
            {
                # Port 0: the server binds a free port itself and writes it to addr_file.
                "S3CACHED_LISTEN": "127.0.0.1:0",
                "S3CACHED_ADDR_FILE": addr_file,
                "S3CACHED_LOCATION": self.location,
                "S3CACHED_DATA_DIR": self.data_dir,
                "S3CACHED_MAX_ENTRIES": "0",
                "S3CACHED_LOG_LEVEL": "warn",
            }
        )
        if backend == "s3":
            endpoint = os.environ.get(S3_ENDPOINT_ENV)
            if not endpoint:
                raise RuntimeError(f"{S3_ENDPOINT_ENV} is not set: run tests/run")
            env.update(
                {
                    "S3CACHED_STORAGE_BUCKET_NAME": "s3cached-test",
                    "S3CACHED_ENDPOINT_URL": endpoint,
                    "S3CACHED_FORCE_PATH_STYLE": "true",
                    "S3CACHED_CREATE_BUCKET": "true",
                    "S3CACHED_REGION": "us-east-1",
                    "S3CACHED_ACCESS_KEY_ID": "test",
                    "S3CACHED_SECRET_ACCESS_KEY": "test",
                }
            )
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [s3cached_binary()],
            env=env,
            stdout=log or subprocess.DEVNULL,  # an open file, to read the server's log
            stderr=subprocess.PIPE,
        )
        addrs = dict(
            line.split(" ", 1) for line in wait_for_file(addr_file, self.proc, "s3cached").split("\n") if line
        )
        self.port = int(addrs["listen"].rsplit(":", 1)[1])
        # The admin listener's URL, when S3CACHED_ADMIN_LISTEN asked for one.
        self.admin = f"http://{addrs['admin']}" if "admin" in addrs else None

    @property
    def address(self):
        return ("127.0.0.1", self.port)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(params=["dir", "s3"])
def server(request):
    """s3cached over the local directory store and over the local S3 server."""
    s = Server(request.param)
    yield s
    s.stop()


@pytest.fixture
def dir_server():
    s = Server("dir")
    yield s
    s.stop()


def reference_memcached(*extra):
    """Starts memcached 1.6 on a free loopback port with `extra` arguments; yields its
    address, stops it after. A generator for the reference fixtures."""
    binary = shutil.which("memcached")
    if binary is None:
        raise RuntimeError("memcached is not installed (bash .ci/run installs it)")
    # Port -1: memcached binds a free port itself and writes it to MEMCACHED_PORT_FILENAME
    # (by rename, once listening), as memcached's own test suite starts it.
    tmp = tempfile.mkdtemp(prefix="memcached-test-")
    ports_file = os.path.join(tmp, "ports")
    args = [binary, "-p", "-1", "-l", "127.0.0.1", "-U", "0", *extra]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    env = dict(os.environ, MEMCACHED_PORT_FILENAME=ports_file)
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ports = wait_for_file(ports_file, proc, "memcached")
    port = int(next(l for l in ports.splitlines() if l.startswith("TCP INET: ")).split(": ")[1])
    shutil.rmtree(tmp, ignore_errors=True)
    yield ("127.0.0.1", port)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def memcached():
    """A reference memcached 1.6 on loopback, for differential tests."""
    yield from reference_memcached("-I", "1m", "-m", "64")
