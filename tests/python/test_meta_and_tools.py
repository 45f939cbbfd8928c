"""Clients beyond the classic Python ones, on both backends: meta-memcache (meta protocol),
pylibmc (libmemcached, text protocol) and libmemcached's command-line tools."""

import shutil
import subprocess

import pylibmc
import pytest
from meta_memcache import (
    CacheClient,
    Key,
    LeasePolicy,
    ServerAddress,
    SetMode,
    connection_pool_factory_builder,
)

from test_clients import wait_until


def meta_client(server):
    return CacheClient.cache_client_from_servers(
        servers=[ServerAddress(host=server.address[0], port=server.address[1])],
        connection_pool_factory_fn=connection_pool_factory_builder(recv_timeout=20),
    )


def test_meta_memcache(server):
    c = meta_client(server)
    assert c.set(key=Key("m"), value={"a": [1, 2]}, ttl=100)
    assert c.get(key=Key("m")) == {"a": [1, 2]}
    assert c.get(key=Key("absent")) is None
    assert c.set(key=Key("m"), value="x", ttl=100, set_mode=SetMode.ADD) is False
    value, cas = c.get_cas(key=Key("m"))
    assert value == {"a": [1, 2]} and cas
    assert c.set(key=Key("m"), value="new", ttl=100, cas_token=cas)
    assert c.set(key=Key("m"), value="stale", ttl=100, cas_token=cas) is False
    assert c.get(key=Key("m")) == "new"
    assert c.delta_initialize_and_get(key=Key("n"), delta=1, initial_value=10, initial_ttl=100) == 10
    assert c.delta_and_get(key=Key("n"), delta=5) == 15
    assert c.delta(key=Key("absent"), delta=1) is False
    assert c.touch(key=Key("m"), ttl=200)
    many = c.multi_get(keys=[Key("m"), Key("n"), Key("absent")])
    assert many[Key("m")] == "new" and many[Key("absent")] is None
    big = b"\x00\xff" * 400_000
    assert c.set(key=Key("big"), value=big, ttl=0)
    assert c.get(key=Key("big")) == big
    # Keys with spaces or non-ASCII travel base64-encoded (the b flag).
    odd = Key("ключ с пробелами\t" + "ü" * 10)
    assert c.set(key=odd, value=[1], ttl=100)
    assert c.get(key=odd) == [1]
    assert c.delete(key=Key("m"))
    assert c.get(key=Key("m")) is None
    assert c.set(key=Key("short"), value=1, ttl=2)
    assert c.get(key=Key("short")) == 1
    assert wait_until(lambda: c.get(key=Key("short")) is None, timeout=8)


def test_meta_memcache_lease_and_invalidate(server):
    c = meta_client(server)
    # The first reader of a missing key wins the lease (N flag -> W), a second one is told
    # another client holds it (Z) and gets nothing after its bounded retries.
    assert c.get_or_lease(key=Key("lease"), lease_policy=LeasePolicy(ttl=30)) is None
    waits = []
    assert (
        c.get_or_lease(
            key=Key("lease"),
            lease_policy=LeasePolicy(ttl=30, miss_retries=2, miss_retry_wait=0.01),
            lease_wait_fn=waits.append,
        )
        is None
    )
    assert len(waits) >= 1
    assert c.set(key=Key("lease"), value="filled", ttl=100)
    assert c.get(key=Key("lease")) == "filled"
    # Invalidate marks it stale (md I): still readable for the recacher.
    assert c.invalidate(key=Key("lease"))


def test_pylibmc_pipelines(server):
    mc = pylibmc.Client([f"{server.address[0]}:{server.address[1]}"], binary=False)
    mc.behaviors = {"tcp_nodelay": True}
    mc.set_multi({f"p{i}": i for i in range(100)})
    assert mc.get_multi([f"p{i}" for i in range(100)]) == {f"p{i}": i for i in range(100)}
    mc.set("s", "ü" * 1000, time=100)
    assert mc.get("s") == "ü" * 1000
    assert mc.add("s", "x") is False
    assert mc.incr("p5", 10) == 15
    assert mc.delete("s")
    mc.flush_all()
    assert mc.get("p1") is None


def tool(name):
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} is not installed (libmemcached-tools; bash .ci/run installs it)")
    return path


def run_tool(name, server, *args, input=None):
    servers = f"--servers={server.address[0]}:{server.address[1]}"
    return subprocess.run(
        [tool(name), servers, *args], capture_output=True, timeout=60, input=input
    )


def test_libmemcached_tools(server, tmp_path):
    f = tmp_path / "payload.txt"
    f.write_bytes(b"tool payload\n" * 100)
    assert run_tool("memccp", server, str(f)).returncode == 0
    got = run_tool("memccat", server, "payload.txt")
    assert got.returncode == 0 and got.stdout == f.read_bytes() + b"\n"  # memccat adds a newline
    assert run_tool("memcexist", server, "payload.txt").returncode == 0
    assert run_tool("memcrm", server, "payload.txt").returncode == 0
    assert run_tool("memcexist", server, "payload.txt").returncode != 0
    stat = run_tool("memcstat", server)
    assert stat.returncode == 0 and b"curr_connections" in stat.stdout
    assert run_tool("memccp", server, str(f)).returncode == 0
    assert run_tool("memcflush", server).returncode == 0
    assert run_tool("memccat", server, "payload.txt").returncode != 0
    ping = run_tool("memcping", server)
    assert ping.returncode == 0, ping.stderr
