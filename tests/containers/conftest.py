"""The compose stack as users run it (docker-compose.yml), with moto in MinIO's place
(compose.moto.yml), one stack per test, its ports published on a loopback address of its
own. Needs the images of tests/containers/images.sh; tests/run makes them and runs these
tests only when a Docker engine answers."""

import itertools
import json
import os
import subprocess
import time
import urllib.error
import urllib.request

import pytest
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
COMPOSE_FILES = [
    os.path.join(ROOT, "docker-compose.yml"),
    os.path.join(ROOT, "tests", "containers", "compose.moto.yml"),
]
# How long a replica may take to report healthy (the image's health check, every second).
HEALTHY_SECS = 60
# Replies a test waits for; a stuck server fails the test rather than hanging it.
CLIENT_TIMEOUT_SECS = 15
_stacks = itertools.count(1)


def run(*args, check=True, timeout=120):
    done = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def docker_answers():
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def wait_until(condition, timeout, what):
    """Polls `condition` (a state nothing signals, such as a container's health) until it
    holds; fails the test after `timeout` seconds. Returns the seconds it took."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"{what}: not within {timeout}s")
        time.sleep(0.1)
    return time.monotonic() - start


class Stack:
    """One compose project: moto, replicas a and b; `extra` is YAML merged over both files."""

    def __init__(self, tmp_path, extra=None):
        n = next(_stacks)
        self.project = f"s3ctest{os.getpid()}n{n}"
        # A loopback address of its own (all of 127/8 is local), so the published ports
        # never meet another server's.
        self.host = f"127.0.{(os.getpid() % 200) + 20}.{n}"
        self.files = list(COMPOSE_FILES)
        if extra:
            path = tmp_path / "compose.extra.yml"
            path.write_text(extra)
            self.files.append(str(path))
        self.env = dict(os.environ, S3CACHED_PUBLISH_ADDR=self.host)

    def compose(self, *args, check=True, timeout=180):
        cmd = ["docker-compose", "-p", self.project]
        for f in self.files:
            cmd += ["-f", f]
        done = subprocess.run(
            cmd + list(args), capture_output=True, text=True, timeout=timeout, env=self.env, cwd=ROOT
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"docker-compose {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
        return done.stdout

    def up(self):
        self.compose("up", "-d", "--no-build", "minio", "s3cached-a", "s3cached-b")
        for service in ("s3cached-a", "s3cached-b"):
            self.wait_healthy(service)

    def down(self):
        self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False)

    def container(self, service):
        cid = self.compose("ps", "-q", service).strip()
        assert cid, f"no container for {service}"
        return cid

    def inspect(self, service):
        return json.loads(run("docker", "inspect", self.container(service)))[0]

    def health(self, service):
        state = self.inspect(service)["State"]
        return state.get("Health", {}).get("Status"), state["Status"]

    def wait_healthy(self, service, timeout=HEALTHY_SECS):
        return wait_until(
            lambda: self.health(service)[0] == "healthy", timeout, f"{service} healthy"
        )

    def storage_network(self):
        return f"{self.project}_storage"

    def address(self, service):
        return (self.host, {"s3cached-a": 11211, "s3cached-b": 11212}[service])

    def admin(self, service):
        return f"http://{self.host}:{ {'s3cached-a': 9211, 's3cached-b': 9212}[service]}"

    def client(self, service):
        return Client(self.address(service), connect_timeout=5, timeout=CLIENT_TIMEOUT_SECS,
                      default_noreply=False)

    def hash_client(self):
        """pymemcache's consistent-hashing client over both replicas: a replica that fails
        is dropped from the ring at once (retry_attempts=0) and tried again after 2 s."""
        return HashClient(
            [self.address("s3cached-a"), self.address("s3cached-b")],
            connect_timeout=2,
            timeout=CLIENT_TIMEOUT_SECS,
            retry_attempts=0,
            dead_timeout=2,
            ignore_exc=False,
            default_noreply=False,
        )

    def ready(self, service):
        """/readyz's status code (0 when the admin listener does not answer)."""
        try:
            with urllib.request.urlopen(self.admin(service) + "/readyz", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def stat(self, service, name):
        stats = self.client(service).stats()
        return int(stats[name.encode()])

    def logs(self):
        return self.compose("logs", "--no-color", "--tail", "60", check=False)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    setattr(item, "rep_" + outcome.get_result().when, outcome.get_result())


@pytest.fixture
def stack_factory(request, tmp_path):
    """Makes stacks (`stack_factory(extra_yaml)`), started; all are removed after the test,
    their logs printed when it failed."""
    if not docker_answers():
        pytest.skip("no Docker engine answers")
    stacks = []

    def make(extra=None):
        s = Stack(tmp_path, extra)
        stacks.append(s)
        s.up()
        return s

    yield make
    for s in stacks:
        rep = getattr(request.node, "rep_call", None)
        if rep is None or rep.failed:
            print(f"--- logs of {s.project}:\n{s.logs()}")
        s.down()


@pytest.fixture
def stack(stack_factory):
    return stack_factory()
