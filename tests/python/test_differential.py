"""Differential tests: the same transcripts go to a real memcached 1.6 and to s3cached
(over the directory store and over S3); the replies must match, up to cas values and the
version string. Deliberate differences are listed in docs/protocol.md and not sent here."""

import contextlib
import re
import socket
import time

import pytest

from conftest import Server, reference_memcached
from wire import Wire, normalize, until_closed

BIG = b"x" * (1024 * 1024 + 10)

TRANSCRIPTS = {
    "storage": [
        b"set k 5 0 2\r\nhi\r\n",
        b"get k\r\n",
        b"gets k\r\n",
        b"get k nokey k\r\n",
        b"add k 0 0 1\r\nx\r\n",
        b"add new 7 0 3\r\nnew\r\n",
        b"replace nokey 0 0 1\r\nx\r\n",
        b"replace k 9 0 3\r\nabc\r\n",
        b"append k 0 0 2\r\n>>\r\n",
        b"prepend k 0 0 2\r\n<<\r\n",
        b"append nokey 0 0 1\r\nx\r\n",
        b"get k new\r\n",
        b"set e 0 0 0\r\n\r\n",
        b"get e\r\n",
        b"set bin 4294967295 0 4\r\n\x00\r\n\xff\r\n",
        b"get bin\r\n",
    ],
    "cas": [
        b"cas nokey 0 0 1 1\r\nx\r\n",
        b"set k 0 0 1\r\na\r\n",
        b"gets k\r\n",
        b"cas k 0 0 1 {cas}\r\nb\r\n",
        b"cas k 0 0 1 1\r\nc\r\n",
        b"get k\r\n",
        b"cas k 0 0 1 99 noreply\r\nd\r\n",
        b"cas k 0 0 1\r\n",
        b"cas k 0 0 1 abc\r\nx\r\n",
    ],
    "arith": [
        b"incr nokey 1\r\n",
        b"decr nokey 1\r\n",
        b"set n 3 0 1\r\n9\r\n",
        b"incr n 1\r\n",
        b"get n\r\n",
        b"incr n 18446744073709551615\r\n",
        b"set m 0 0 2\r\n10\r\n",
        b"decr m 100\r\n",
        b"set t 0 0 3\r\nabc\r\n",
        b"incr t 1\r\n",
        b"incr n abc\r\n",
        b"incr n -1\r\n",
        b"incr n\r\n",
        b"incr n 1 noreply\r\n",
        b"get n\r\n",
    ],
    "touch": [
        b"set k 0 0 1\r\na\r\n",
        b"touch k 100\r\n",
        b"touch nokey 100\r\n",
        b"touch k abc\r\n",
        b"gat 100 k nokey\r\n",
        b"gats 100 k\r\n",
        b"gat abc k\r\n",
        b"gat 10\r\n",
        b"touch k -1\r\n",
        b"get k\r\n",
    ],
    "delete": [
        b"set k 0 0 1\r\na\r\n",
        b"delete k 1\r\n",
        b"delete k 0\r\n",
        b"delete k\r\n",
        b"set k 0 0 1\r\na\r\n",
        b"delete k noreply\r\n",
        b"get k\r\n",
        b"delete\r\n",
    ],
    "expiry_and_flush": [
        b"set gone 0 -1 1\r\na\r\n",
        b"get gone\r\n",
        b"set k 0 0 1\r\na\r\n",
        b"flush_all\r\n",
        b"get k\r\n",
        b"set k 0 0 1\r\nb\r\n",
        b"get k\r\n",
        b"flush_all noreply\r\n",
        b"get k\r\n",
        b"flush_all x\r\n",
    ],
    "noreply": [
        b"set a 0 0 1 noreply\r\na\r\n",
        b"add a 0 0 1 noreply\r\nb\r\n",
        b"replace a 0 0 1 noreply\r\nc\r\n",
        b"append a 0 0 1 noreply\r\nd\r\n",
        b"prepend a 0 0 1 noreply\r\ne\r\n",
        b"get a\r\n",
        b"touch a 10 noreply\r\n",
        b"verbosity 1 noreply\r\n",
    ],
    "errors": [
        b"bogus\r\n",
        b"\r\n",
        b"GET k\r\n",
        b"get\r\n",
        b"gets\r\n",
        b"set k 0 0\r\n",
        b"set k abc 0 1\r\na\r\n",
        b"set k -1 0 1\r\na\r\n",
        b"set k 0 0 -1\r\n",
        b"set k 0 0 1\r\nab\r\n",
        b"set k 0 0 1 noreply\r\nab\r\n",
        b"get k\r\n",
        b"get " + b"a" * 251 + b"\r\n",
        b"set " + b"a" * 251 + b" 0 0 1\r\na\r\n",
        b"set big 0 0 1\r\na\r\n",
        b"set big 0 0 %d\r\n" % len(BIG) + BIG + b"\r\n",
        b"get big\r\n",
        b"verbosity\r\n",
        b"verbosity x\r\n",
        b"verbosity 1\r\n",
        b"version\r\n",
        b"stats bogus\r\n",
        b"stats reset\r\n",
    ],
    "meta": [
        b"ms mk 2 T0 F5\r\nhi\r\n",
        b"mg mk v f t s k O123\r\n",
        b"mg mk v c\r\n",
        b"mg mk\r\n",
        b"mg missing v\r\n",
        b"mg missing v q\r\n",
        b"mg missing v q k O9\r\n",
        b"mg\r\n",
        b"mg mk zz\r\n",
        b"mg mk Tabc\r\n",
        b"ms mk\r\n",
        b"ms mk abc\r\n",
        b"ms mk 2 MZ\r\nhi\r\n",
        b"ms mk 2 q\r\nhi\r\n",
        b"ms mk 2 ME\r\nhi\r\n",
        b"ms nokey 2 MR\r\nhi\r\n",
        b"ms mk 1 MA\r\n!\r\n",
        b"ms mk 1 MP\r\n<\r\n",
        b"mg mk v\r\n",
        b"ms mk 1 C1\r\na\r\n",
        b"mg mk c\r\n",
        b"ms mk 1 C{cas}\r\nz\r\n",
        b"mg mk v\r\n",
        b"ms bWs= 2 b\r\nhi\r\n",
        b"mg bWs= b v\r\n",
        b"ms mk 1 T-1\r\na\r\n",
        b"mg mk v\r\n",
        b"md mk\r\n",
        b"md mk q\r\n",
        b"ms mk 1\r\na\r\n",
        b"md mk q\r\n",
        b"md mk\r\n",
        b"ms mk 1\r\na\r\n",
        b"md mk C1\r\n",
        b"ma cnt\r\n",
        b"ma cnt N0 J5 v\r\n",
        b"ma cnt v D10 MD t\r\n",
        b"ma cnt v MI D3\r\n",
        b"ma cnt q\r\n",
        b"ma cnt v\r\n",
        b"ma mk v\r\n",
        b"ms txt 1\r\nx\r\n",
        b"ma txt\r\n",
        b"ma txt C1\r\n",
        b"ms empty 0\r\n\r\n",
        b"ma empty C1\r\n",
        b"ma empty\r\n",
        b"mg new N30 v t\r\n",
        b"mg new N30 v t\r\n",
        b"ms new 3 T30\r\nnew\r\n",
        b"mg new v t\r\n",
        b"md new I T30\r\n",
        b"mg new v\r\n",
        b"mg new v\r\n",
        b"ms new 1\r\nz\r\n",
        b"mg new v\r\n",
        b"ms ttl 1 T100\r\na\r\n",
        b"mg ttl v R200\r\n",
        b"mg ttl v R200\r\n",
        b"mg ttl T50 t\r\n",
    ],
    # Issue 8: replies s3cached used to give otherwise than memcached.
    "fidelity": [
        b"set e1 0 4294967295 1\r\na\r\n",
        b"get e1\r\n",
        b"set e2 0 4294967296 1\r\na\r\n",
        b"get e2\r\n",
        b"set e3 0 2147483648 1\r\na\r\n",
        b"get e3\r\n",
        b"set e4 0 99999999999999999999 1\r\na\r\n",
        b"touch e2 4294967295\r\n",
        b"get e2\r\n",
        b"set e5 0 0 1\r\na\r\n",
        b"gat 4294967295 e5\r\n",
        b"get e5\r\n",
        b"ms e6 1 T4294967295\r\na\r\n",
        b"mg e6 v\r\n",
        b"set l1 0 0 4294967295\r\nget l1\r\n",
        b"set l1 0 0 -1\r\nget l1\r\n",
        b"set l1 0 0 2147483646\r\nget l1\r\n",
        b"ms l1 4294967295\r\n",
        b"set l2 0 0 4294967296\r\n\r\nget l2\r\n",
        b"delete k 10 noreply\r\n",
        b"incr k abc noreply\r\n",
        b"touch k abc noreply\r\n",
        b"flush_all abc noreply\r\n",
        b"set k abc 0 1 noreply\r\na\r\n",
        b"delete noreply\r\n",
        b"set f5 0 0 1\r\na\r\nflush_all 18446744073710\r\nget f5\r\n",
        b"ms c6 1\r\na\r\nms c6 1 C1 c k O5\r\nb\r\n",
        b"ms c6x 1 C1 c\r\nb\r\n",
        b"ms f6 1 T100 F3 t f s O1 k\r\na\r\n",
        b"mg miss6 s N30 t q\r\n",
        b"mg miss7 k O1 v\r\n",
        b"ms hq 1\r\na\r\nmg hq q\r\nmg hq q s\r\n",
        b"ma ma6 q\r\nma ma6 N0 q\r\nma ma6 q v\r\n",
        b"ms st6 1 T500\r\na\r\nmd st6 I T30\r\nmg st6 v\r\n",
        b"ms st6 1 I C1 T999\r\nb\r\nmg st6 v t\r\n",
        b"ms \xff\xfe 1\r\na\r\nmg \xff\xfe k v O\xfa\xfb\r\n",
        b"set n 0 0 2\r\n10\r\ndecr n 1\r\nget n\r\n",
        b"verbosity junk\r\n",
        b"slabs automove junk\r\nslabs automove 1\r\nslabs automove 9\r\n",
        b"stats cachedump\r\nstats cachedump a b\r\nstats cachedump 64 1\r\n",
        b"stats detail\r\nstats detail junk\r\n",
    ],
}


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_same_replies_as_memcached(name, server, memcached):
    reference = Wire(memcached)
    ours = Wire(server.address)
    try:
        reference.exchange(b"flush_all\r\n")
        for step in TRANSCRIPTS[name]:
            want = normalize(reference.exchange(step))
            got = normalize(ours.exchange(step))
            assert got == want, f"{name}: {step[:80]!r}\n memcached: {want!r}\n s3cached:  {got!r}"
    finally:
        reference.close()
        ours.close()


# ---- operator commands -------------------------------------------------------------------
# They change the server (its memory limit, verbosity, crawler) or stop it, so each test
# has a reference memcached of its own. On S3 the reference runs with its LRU crawler off:
# s3cached's crawler is off there (listing keys on S3 costs a GET per item), and it answers
# as memcached does then.

ADMIN = [
    b"cache_memlimit\r\n",
    b"cache_memlimit abc\r\n",
    b"cache_memlimit 0\r\n",
    b"cache_memlimit 7\r\n",
    b"cache_memlimit -1\r\n",
    b"cache_memlimit 20x\r\n",
    b"cache_memlimit 1000000001\r\n",
    b"cache_memlimit 4294967296\r\n",
    b"cache_memlimit 4294967304\r\n",
    b"cache_memlimit 50 noreply\r\n",
    b"cache_memlimit abc noreply\r\n",
    b"cache_memlimit 7 noreply\r\n",
    b"cache_memlimit 50 x\r\n",
    b"cache_memlimit 50 noreply x\r\n",
    b"cache_memlimit 50 50 50\r\n",
    b"cache_memlimit  64 \r\n",
    b"cache_memlimit +20\r\n",
    b"cache_memlimit 50\r\n",
    b"verbosity\r\n",
    b"verbosity 1 2\r\n",
    b"verbosity 1 2 3\r\n",
    b"verbosity -1\r\n",
    b"verbosity 99\r\n",
    b"verbosity 0 noreply\r\n",
    b"verbosity x noreply\r\n",
    b"verbosity 4294967297\r\n",
    b"misbehave\r\n",
    b"misbehave x\r\n",
    b"debugtime\r\n",
    b"debugtime 1\r\n",
    b"debugtime p\r\n",
    b"debugtime r\r\n",
    b"shutdown\r\n",
    b"shutdown graceful\r\n",
    b"shutdown x\r\n",
    b"shutdown noreply\r\n",
    b"lru_crawler\r\n",
    b"lru_crawler x\r\n",
    b"lru_crawler metadump\r\n",
    b"lru_crawler metadump all x\r\n",
    b"lru_crawler crawl 1 noreply\r\n",
    b"lru_crawler disable noreply\r\n",
    b"lru_crawler tocrawl x\r\n",
    b"lru_crawler tocrawl 5\r\n",
    b"lru_crawler sleep 2000000\r\n",
    b"lru_crawler sleep x\r\n",
    b"lru_crawler sleep 100\r\n",
    b"lru_crawler metadump 0\r\n",
    b"lru_crawler metadump 64\r\n",
    b"lru_crawler metadump x\r\n",
    b"lru_crawler metadump 1,x\r\n",
    b"lru_crawler metadump ,\r\n",
    b"lru_crawler crawl 0\r\n",
    b"stats detail on\r\n",
    b"set a 0 0 1\r\na\r\nquit junk\r\n",
    b"get a\r\nquit\r\nget a\r\n",
    b"mg missing v q\r\nmg a v q\r\nquit\r\nmn\r\n",
    b"set b 0 0 1 noreply\r\nb\r\nquit noreply\r\nget b\r\n",
]

# `stats settings` rows whose values the two servers share; the port differs by nature.
DIFFERENT_BY_NATURE = {"tcpport"}


def own_reference(backend, *extra):
    """A reference memcached for one test: with its crawler off when s3cached's is."""
    crawler = ("-o", "no_lru_crawler") if backend == "s3" else ()
    return contextlib.contextmanager(reference_memcached)("-I", "1m", "-m", "64", *crawler, *extra)


def settings(address):
    with Wire(address) as w:
        rows = w.exchange(b"stats settings\r\n").decode().split("\r\n")
    return dict(r.split(" ", 2)[1:] for r in rows if r.startswith("STAT "))


def test_operator_commands_answer_as_memcached(server):
    with own_reference(server.backend) as memcached:
        reference, ours = Wire(memcached), Wire(server.address)
        with reference, ours:
            for step in ADMIN:
                if b"quit" in step:
                    # quit inside a pipeline: what came before it is answered, then close.
                    want, got = until_closed(memcached, step), until_closed(server.address, step)
                else:
                    want, got = reference.exchange(step), ours.exchange(step)
                assert got == want, f"{step!r}\n memcached: {want!r}\n s3cached:  {got!r}"
        want, got = settings(memcached), settings(server.address)
    shared = sorted(set(want) & set(got) - DIFFERENT_BY_NATURE)
    assert len(shared) >= 20, shared
    assert {k: got[k] for k in shared} == {k: want[k] for k in shared}
    # What the transcript changed shows, as in memcached.
    assert got["maxbytes"] == str(50 << 20) and got["verbosity"] == "1"
    assert got["detail_enabled"] == "yes"
    assert got["ram_cache_bytes"] == got["maxbytes"]


def metadump(address, command=b"lru_crawler metadump all\r\n"):
    """A dump on a connection of its own (memcached drops what is pipelined after one)."""
    with socket.create_connection(address, timeout=20) as s:
        s.sendall(command)
        out = b""
        while not re.search(rb"(^|\n)(END|EN)\r\n$|^[A-Z_]+( [^\r\n]*)?\r\n$", out):
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
    return out


def dumped_items(dump):
    """The items of a metadump, by key: expiry, fetched, class (last access, cas and size
    differ by nature: cas values are each server's own, sizes count each one's overhead)."""
    lines = dump.split(b"\n")
    assert lines[-1] == b"" and lines[-2] == b"END\r", dump
    items = {}
    for line in lines[:-2]:
        fields = dict(f.split(b"=", 1) for f in line.split(b" "))
        assert set(fields) == {b"key", b"exp", b"la", b"cas", b"fetch", b"cls", b"size"}, line
        items[fields[b"key"]] = (int(fields[b"exp"]), fields[b"fetch"], fields[b"cls"], int(fields[b"la"]))
    return items


DUMPED = [
    b"set a 0 0 1\r\na\r\n",
    b"set b%20c 5 100 3\r\nabc\r\n",
    b"set gone 0 -1 1\r\nx\r\n",
    b"set \xc3\xa9t\xc3\xa9 0 0 2\r\nok\r\n",
    b"ms bWs= 2 b T500\r\nhi\r\n",
    b"set x/y+z 0 3000 1\r\nz\r\n",
]


def test_metadump_lists_what_memcached_lists(dir_server):
    with own_reference("dir") as memcached:
        for address in (memcached, dir_server.address):
            with Wire(address) as w:
                for step in DUMPED:
                    w.exchange(step)
        want, got = dumped_items(metadump(memcached)), dumped_items(metadump(dir_server.address))
        assert sorted(got) == sorted(want)
        assert sorted(got) == [b"%C3%A9t%C3%A9", b"a", b"b%2520c", b"mk", b"x%2Fy%2Bz"]
        for key, (exp, fetch, cls, la) in want.items():
            ours = got[key]
            # Absolute times: memcached's clock ticks once a second and starts 2 s back.
            assert abs(ours[0] - exp) <= 3 if exp != -1 else ours[0] == -1, (key, ours, want[key])
            assert ours[1:3] == (fetch, cls), (key, ours, want[key])
            assert abs(ours[3] - la) <= 3, (key, ours, want[key])
        for command in [b"lru_crawler metadump 2\r\n", b"lru_crawler metadump 2,3\r\n"]:
            assert metadump(dir_server.address, command) == metadump(memcached, command) == b"END\r\n"
        assert dumped_items(metadump(dir_server.address, b"lru_crawler metadump 1\r\n")).keys() == want.keys()
        # With the crawler turned off, as memcached's.
        steps = [
            b"lru_crawler enable\r\n",
            b"lru_crawler disable\r\n",
            b"lru_crawler metadump all\r\n",
            b"lru_crawler crawl 1\r\n",
        ]
        reference, ours = Wire(memcached), Wire(dir_server.address)
        with reference, ours:
            for step in steps:
                want, got = settled(reference, step), ours.exchange(step)
                assert got == want, f"{step!r}\n memcached: {want!r}\n s3cached:  {got!r}"


# memcached's crawler thread stops a moment after `lru_crawler disable` answers; a dump
# asked in between gets this, and the same request a moment later the settled answer.
CRAWLER_STOPPING = b"ERROR an unknown error happened\r\n"


def settled(reference, step, attempts=100):
    """The reference's answer to `step` once its crawler is no longer changing state: asked
    again (at most `attempts` times, 20 ms apart) while it answers CRAWLER_STOPPING."""
    for _ in range(attempts):
        answer = reference.exchange(step)
        if answer != CRAWLER_STOPPING:
            return answer
        time.sleep(0.02)
    return answer


def test_on_s3_the_crawler_answers_as_memcached_s_disabled_one():
    steps = [
        b"set a 0 0 1\r\na\r\n",
        b"lru_crawler metadump all\r\n",
        b"lru_crawler metadump 1\r\n",
        b"lru_crawler crawl all\r\n",
        b"lru_crawler disable\r\n",
        b"lru_crawler metadump all\r\n",
    ]
    server = Server("s3")
    try:
        with own_reference("s3") as memcached:
            reference, ours = Wire(memcached), Wire(server.address)
            with reference, ours:
                for step in steps:
                    want, got = reference.exchange(step), ours.exchange(step)
                    assert got == want, f"{step!r}\n memcached: {want!r}\n s3cached:  {got!r}"
    finally:
        server.stop()


def conns(address):
    """`stats conns` asked on a fresh connection, with one more connection that has sent a
    command and one that has sent nothing: each socket's rows, file descriptors and ports
    left out, sorted."""
    with socket.create_connection(address) as served, socket.create_connection(address):
        served.sendall(b"version\r\n")
        served.recv(100)
        time.sleep(0.2)  # the served connection is back to waiting for input
        with Wire(address) as asking:
            reply = asking.exchange(b"stats conns\r\n").decode()
    sockets = {}
    for row in reply.split("\r\n"):
        if not row.startswith("STAT "):
            continue
        name, value = row[5:].split(" ", 1)
        fd, field = name.split(":", 1)
        value = re.sub(r":\d+$", ":<port>", value)
        sockets.setdefault(fd, {})[field] = value
    for rows in sockets.values():
        # Seconds since the last command: 0 for the asking connection; the others' depend
        # on when the server started.
        if rows.get("state") != "conn_parse_cmd":
            rows["secs_since_last_cmd"] = "<secs>"
    return sorted(tuple(sorted(rows.items())) for rows in sockets.values())


def test_stats_conns_lists_the_sockets_as_memcached(server):
    with own_reference(server.backend) as memcached:
        want, got = conns(memcached), conns(server.address)
    assert got == want, f"\n memcached: {want}\n s3cached:  {got}"


@pytest.mark.parametrize("mode", [b"shutdown", b"shutdown graceful"])
@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_an_enabled_shutdown_stops_the_server_as_memcached_s(backend, mode):
    ours = Server(backend, extra_env={"S3CACHED_SHUTDOWN_ENABLED": "true"})
    try:
        with own_reference(backend, "-A") as memcached:
            reference, mine = Wire(memcached), Wire(ours.address)
            with reference, mine:
                for step in [b"shutdown x\r\n", b"shutdown noreply\r\n", b"shutdown graceful x\r\n"]:
                    want, got = reference.exchange(step), mine.exchange(step)
                    assert got == want, f"{step!r}\n memcached: {want!r}\n s3cached:  {got!r}"
            assert settings(ours.address)["shutdown_command"] == settings(memcached)["shutdown_command"] == "yes"
            assert until_closed(ours.address, mode + b"\r\n") == until_closed(memcached, mode + b"\r\n") == b""
            assert ours.proc.wait(timeout=20) == 0, "s3cached drains and exits"
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                try:
                    socket.create_connection(memcached, timeout=1).close()
                except OSError:
                    break
                time.sleep(0.1)
            else:
                pytest.fail("memcached still listens after shutdown")
    finally:
        ours.stop()
