"""Real memcached clients against s3cached, over the directory store and over S3:
pymemcache (Client and HashClient) and Django's cache API through PyMemcacheCache."""

import pickle
import time

import django
import pymemcache
import pytest
from django.conf import settings
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient

if not settings.configured:
    settings.configure(CACHES={}, USE_TZ=True)
    django.setup()

from django.core.cache.backends.memcached import PyLibMCCache, PyMemcacheCache  # noqa: E402

ITEM_LIMIT = 1024 * 1024


def wait_until(predicate, timeout=10.0, step=0.05):
    """Polls a condition (TTLs are wall-clock: a real server cannot pause time)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


# ---- pymemcache -------------------------------------------------------------------------


def test_pymemcache_basics(server):
    c = Client(server.address, connect_timeout=5, timeout=20)
    assert c.set("k", b"v", noreply=False)
    assert c.get("k") == b"v"
    assert c.add("k", b"other", noreply=False) is False
    assert c.replace("k", b"w", noreply=False)
    assert c.append("k", b"!", noreply=False)
    assert c.prepend("k", b"<", noreply=False)
    assert c.get("k") == b"<w!"
    value, cas = c.gets("k")
    assert value == b"<w!"
    assert c.cas("k", b"new", cas, noreply=False)
    assert c.cas("k", b"stale", cas, noreply=False) is False
    assert c.get("k") == b"new"
    assert c.set("n", b"10", noreply=False)
    assert c.incr("n", 5) == 15
    assert c.decr("n", 20) == 0
    assert c.incr("missing", 1) is None
    assert c.touch("k", 100, noreply=False)
    assert c.delete("k", noreply=False)
    assert c.get("k") is None
    assert c.version().startswith(b"1.6")
    stats = c.stats()
    assert stats[b"cmd_get"] >= 3


def test_pymemcache_many_and_pipelined_noreply(server):
    c = Client(server.address, connect_timeout=5, timeout=20)
    items = {f"key-{i}": f"value-{i}".encode() for i in range(150)}
    assert c.set_many(items) == []  # noreply pipeline: nothing failed
    got = c.get_many(list(items) + ["absent"])
    assert got == items
    c.delete_many(list(items)[:50])
    assert len(c.get_many(list(items))) == 100


def test_pymemcache_binary_and_large_values(server):
    c = Client(server.address, connect_timeout=5, timeout=30)
    binary = bytes(range(256)) * 4 + b"\r\nEND\r\n"
    assert c.set("bin", binary, noreply=False)
    assert c.get("bin") == binary
    near = b"z" * (ITEM_LIMIT - 1)
    assert c.set("near", near, noreply=False)
    assert c.get("near") == near
    with pytest.raises(pymemcache.exceptions.MemcacheServerError, match="too large"):
        c.set("over", b"z" * (ITEM_LIMIT + 1), noreply=False)
    # The connection and the server go on.
    assert c.get("bin") == binary


@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_long_values_stream_through_pymemcache_and_django(backend):
    """Items up to 16 MiB, streamed above 256 KiB: round trips byte for byte, a multi-get
    mixing short and long values, and Django's cache API on a long value."""
    from conftest import Server

    s = Server(
        backend,
        extra_env={
            "S3CACHED_MAX_ITEM_SIZE": str(16 * ITEM_LIMIT),
            "S3CACHED_STREAM_ABOVE_BYTES": str(256 * 1024),
        },
    )
    try:
        c = Client(s.address, connect_timeout=5, timeout=60)
        long_value = bytes(i % 251 for i in range(10 * ITEM_LIMIT + 7))
        assert c.set("long", long_value, noreply=False)
        assert c.set("short", b"s", noreply=False)
        assert c.get("long") == long_value
        assert c.get_many(["short", "long", "none"]) == {"short": b"s", "long": long_value}
        with pytest.raises(pymemcache.exceptions.MemcacheServerError, match="too large"):
            c.set("over", b"z" * (16 * ITEM_LIMIT + 1), noreply=False)
        assert c.get("short") == b"s"
        stats = c.stats()
        assert int(stats[b"streamed_sets"]) == 1 and int(stats[b"streamed_gets"]) >= 2
        cache = PyMemcacheCache(f"127.0.0.1:{s.port}", {"OPTIONS": {"timeout": 60}})
        page = "x" * (3 * ITEM_LIMIT)
        cache.set("page", page, 60)
        assert cache.get("page") == page
        cache.close()
    finally:
        s.stop()


def test_pymemcache_ttl(server):
    c = Client(server.address, connect_timeout=5, timeout=20)
    # A TTL of 1 may expire at once (time moves in whole seconds); 2 lives at least 1 s.
    assert c.set("short", b"v", expire=2, noreply=False)
    assert c.set("long", b"v", expire=100, noreply=False)
    assert c.get("short") == b"v"
    assert wait_until(lambda: c.get("short") is None, timeout=8)
    assert c.get("long") == b"v"


def test_pymemcache_hashclient_spreads_over_two_servers(server):
    # Two s3cached processes over the same store: keys hash to either, reads agree.
    from conftest import Server

    if server.backend == "dir":
        # A directory is one server's: its near tier trusts what it holds.
        with pytest.raises(RuntimeError, match="exited with 1"):
            Server("dir", location=server.location, extra_env={"S3CACHED_DATA_DIR": server.data_dir})
        return
    other = Server(server.backend, location=server.location, extra_env={
        "S3CACHED_DATA_DIR": server.data_dir,
    })
    try:
        hc = HashClient([server.address, other.address], connect_timeout=5, timeout=20)
        for i in range(40):
            assert hc.set(f"h{i}", str(i).encode(), noreply=False)
        assert hc.get_many([f"h{i}" for i in range(40)]) == {
            f"h{i}": str(i).encode() for i in range(40)
        }
        # Each server sees every key: they share one store.
        for addr in (server.address, other.address):
            assert Client(addr).get("h7") == b"7"
    finally:
        other.stop()


# ---- Django -----------------------------------------------------------------------------


def django_cache(server, backend=PyMemcacheCache):
    return backend(f"{server.address[0]}:{server.address[1]}", {"TIMEOUT": 300})


class Thing:
    def __init__(self, name, tags):
        self.name, self.tags = name, tags

    def __eq__(self, other):
        return (self.name, self.tags) == (other.name, other.tags)


@pytest.mark.parametrize("backend", [PyMemcacheCache, PyLibMCCache])
def test_django_cache_api(server, backend):
    cache = django_cache(server, backend)
    try:
        cache.set("a", 1)
        assert cache.get("a") == 1
        assert cache.get("nope", "default") == "default"
        assert cache.add("a", 2) is False
        assert cache.add("b", 2) is True
        assert cache.has_key("b")
        assert cache.incr("a") == 2
        assert cache.decr("a", 5) == 0
        with pytest.raises(ValueError):
            cache.incr("absent")
        cache.set_many({"x": "ex", "y": [1, 2, {"z": 3}]})
        assert cache.get_many(["x", "y", "absent"]) == {"x": "ex", "y": [1, 2, {"z": 3}]}
        cache.delete_many(["x", "y"])
        assert cache.get_many(["x", "y"]) == {}
        assert cache.delete("b") is True
        assert cache.delete("b") is False
        obj = Thing("thing", {"a", "b"})
        cache.set("obj", obj)
        assert cache.get("obj") == obj
        assert cache.get_or_set("gs", lambda: "computed") == "computed"
        assert cache.get("gs") == "computed"
        unicode_key = "ключ-日本語-ü"
        cache.set(unicode_key, "значение")
        assert cache.get(unicode_key) == "значение"
        big = "y" * (900 * 1024)
        cache.set("big", big)
        assert cache.get("big") == big
        assert cache.touch("a", 100) is True
        assert cache.touch("absent", 100) is False
        cache.clear()
        assert cache.get("a") is None and cache.get("obj") is None
        cache.set("after-clear", "ok")
        assert cache.get("after-clear") == "ok"
    finally:
        cache.close()


def test_django_timeouts(server):
    cache = django_cache(server)
    try:
        cache.set("t1", "v", timeout=2)
        cache.set("forever", "v", timeout=None)
        cache.set("zero", "v", timeout=0)
        assert cache.get("zero") is None  # Django: timeout 0 expires at once
        assert cache.get("t1") == "v"
        assert wait_until(lambda: cache.get("t1") is None, timeout=8)
        assert cache.get("forever") == "v"
    finally:
        cache.close()
