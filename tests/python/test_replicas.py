"""Two s3cached processes sharing one bucket and prefix give what one memcached gives:
atomic incr, add and cas across them, and flush_all seen by both.

They run in strict mode (revalidate_after_ms = 0), where every read asks the store, so even
plain gets through one replica see the other's writes at once; tests/tier.rs covers the
default window, where plain reads may be one window stale and the atomic commands stay exact."""

import threading

import pytest
from pymemcache.client.base import Client

from conftest import Server

INCRS_PER_THREAD = 25
THREADS_PER_REPLICA = 2


@pytest.fixture
def replicas():
    strict = {"S3CACHED_REVALIDATE_AFTER_MS": "0"}
    first = Server("s3", extra_env=strict)
    second = Server("s3", extra_env=strict, location=first.location)
    yield first, second
    first.stop()
    second.stop()


def client(server):
    return Client(server.address, connect_timeout=5, timeout=60)


def run_threads(targets):
    errors = []

    def guard(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(t,)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a worker hung"
    assert not errors, errors


def test_concurrent_incrs_from_both_replicas_sum_exactly(replicas):
    client(replicas[0]).set("counter", b"0", noreply=False)
    start = threading.Barrier(len(replicas) * THREADS_PER_REPLICA)

    def worker(server):
        def run():
            c = client(server)
            start.wait()
            for _ in range(INCRS_PER_THREAD):
                assert c.incr("counter", 1) is not None

        return run

    run_threads([worker(s) for s in replicas for _ in range(THREADS_PER_REPLICA)])
    expected = len(replicas) * THREADS_PER_REPLICA * INCRS_PER_THREAD
    assert int(client(replicas[1]).get("counter")) == expected
    assert int(client(replicas[0]).get("counter")) == expected


def test_concurrent_adds_store_exactly_once(replicas):
    contenders = 8
    start = threading.Barrier(contenders)
    results = []

    def worker(i):
        def run():
            c = client(replicas[i % 2])
            start.wait()
            results.append(c.add("once", str(i).encode(), noreply=False))

        return run

    run_threads([worker(i) for i in range(contenders)])
    assert results.count(True) == 1, results
    winner = client(replicas[0]).get("once")
    assert winner is not None and client(replicas[1]).get("once") == winner


def test_stale_cas_from_another_replica_is_refused(replicas):
    a, b = client(replicas[0]), client(replicas[1])
    a.set("k", b"v1", noreply=False)
    _, token = a.gets("k")
    b.set("k", b"v2", noreply=False)
    assert a.cas("k", b"v3", token, noreply=False) is False  # EXISTS
    _, fresh = b.gets("k")
    assert a.cas("k", b"v3", fresh, noreply=False) is True
    assert b.get("k") == b"v3"


def test_flush_on_one_replica_hides_items_on_the_other(replicas):
    a, b = client(replicas[0]), client(replicas[1])
    for i in range(20):
        a.set(f"f{i}", b"x", noreply=False)
    assert b.get("f3") == b"x"
    a.flush_all(noreply=False)
    assert b.get_many([f"f{i}" for i in range(20)]) == {}
    b.set("later", b"y", noreply=False)
    assert a.get("later") == b"y"
