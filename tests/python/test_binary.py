"""The binary protocol and SASL: raw frames compared with a real memcached 1.6 started with
`-B binary` (identical replies up to cas values and the version), pylibmc with binary=True
on both backends, its username/password SASL login, a refused wrong password, and
memcached's text-protocol login (`-Y`) compared with memcached itself."""

import os
import struct
import subprocess
import sys

# SASL_PATH for pylibmc's SASL plugins is set in conftest.py, before any pylibmc import.
import pylibmc  # noqa: E402
import pytest  # noqa: E402

from binwire import BinWire, frame, incr_extras, set_extras  # noqa: E402
from conftest import Server, reference_memcached  # noqa: E402
from wire import Wire  # noqa: E402

BIG = b"x" * (1024 * 1024 + 10)
T100 = struct.pack(">I", 100)
GET, SET, ADD, REPLACE, DELETE, INCR, DECR, QUIT, FLUSH = range(0x00, 0x09)
GETQ, NOOP, VERSION, GETK, GETKQ, APPEND, PREPEND, STAT = range(0x09, 0x11)
SETQ, ADDQ, REPLACEQ, DELETEQ, INCRQ, DECRQ, QUITQ, FLUSHQ, APPENDQ = range(0x11, 0x1A)
TOUCH, GAT, GATQ, GATK, GATKQ = 0x1C, 0x1D, 0x1E, 0x23, 0x24

TRANSCRIPTS = {
    "get_and_set": [
        frame(SET, b"k", set_extras(5, 0), b"hi", opaque=1),
        frame(GET, b"k", opaque=2),
        frame(GETK, b"k", opaque=3),
        frame(GET, b"nokey", opaque=4),
        frame(GETK, b"nokey", opaque=5),
        # A libmemcached multi-get: quiet gets, misses answered with nothing.
        frame(GETQ, b"nokey") + frame(GETKQ, b"nokey") + frame(GETQ, b"k", opaque=9)
        + frame(GETKQ, b"k", opaque=10),
        frame(SET, b"bin", set_extras(0xFFFFFFFF, 0), b"\x00\r\n\xff"),
        frame(GETK, b"bin"),
        frame(SET, b"e", set_extras(), b""),
        frame(GET, b"e"),
        frame(SET, b"k" * 250, set_extras(), b"long key"),
        frame(GETK, b"k" * 250),
    ],
    "store_modes": [
        frame(SET, b"k", set_extras(), b"hi"),
        frame(ADD, b"k", set_extras(), b"x"),
        frame(ADD, b"new", set_extras(7, 0), b"new"),
        frame(REPLACE, b"nokey", set_extras(), b"x"),
        frame(REPLACE, b"k", set_extras(9, 0), b"abc"),
        frame(APPEND, b"k", value=b">>"),
        frame(PREPEND, b"k", value=b"<<"),
        frame(APPEND, b"nokey", value=b"x"),
        frame(PREPEND, b"nokey", value=b"x"),
        frame(GET, b"k") + frame(GET, b"new"),
        # Quiet stores: nothing on success, errors still answered.
        frame(SETQ, b"q", set_extras(), b"v") + frame(ADDQ, b"q", set_extras(), b"v")
        + frame(REPLACEQ, b"nokey", set_extras(), b"v") + frame(APPENDQ, b"q", value=b"2"),
        frame(GET, b"q"),
    ],
    "cas": [
        frame(SET, b"c", set_extras(), b"1", cas=12345),
        frame(REPLACE, b"c", set_extras(), b"1", cas=12345),
        frame(SET, b"c", set_extras(), b"1"),
        frame(SET, b"c", set_extras(), b"2", cas=12345),
        frame(ADD, b"c", set_extras(), b"3", cas=12345),
        frame(APPEND, b"c", value=b"x", cas=12345),
        frame(DELETE, b"c", cas=999),
        frame(GET, b"c"),
    ],
    "delete": [
        frame(SET, b"d", set_extras(), b"1"),
        frame(DELETE, b"d"),
        frame(DELETE, b"d"),
        frame(SET, b"d", set_extras(), b"1"),
        frame(DELETEQ, b"d") + frame(DELETEQ, b"d"),
        frame(GET, b"d"),
    ],
    "arith": [
        frame(INCR, b"n", incr_extras(5, 10, 0)),
        frame(INCR, b"n", incr_extras(5, 10, 0)),
        frame(DECR, b"n", incr_extras(100, 10, 0)),
        frame(INCR, b"m", incr_extras(5, 10, 0xFFFFFFFF)),
        frame(DECR, b"m", incr_extras(5, 10, 0xFFFFFFFF)),
        frame(INCRQ, b"n", incr_extras(1, 0, 0)) + frame(DECRQ, b"n", incr_extras(1, 0, 0)),
        frame(GET, b"n"),
        # 64-bit wrap-around, from a small stored number: memcached's answer on a stored
        # number of 2^63 or more depends on the memory after the item (docs/protocol.md, deliberate differences).
        frame(SET, b"big", set_extras(), b"10"),
        frame(INCR, b"big", incr_extras(2**64 - 1, 0, 0)),
        frame(INCR, b"big", incr_extras(2**63, 0, 0)),
        frame(SET, b"t", set_extras(), b"abc"),
        frame(INCR, b"t", incr_extras(1, 0, 0)),
        frame(INCRQ, b"t", incr_extras(1, 0, 0)),
    ],
    "touch_and_gat": [
        frame(SET, b"t", set_extras(3, 0), b"abc"),
        frame(TOUCH, b"t", T100),
        frame(TOUCH, b"nokey", T100),
        frame(GAT, b"t", T100),
        frame(GATK, b"t", T100),
        frame(GAT, b"nokey", T100),
        frame(GATK, b"nokey", T100),
        frame(GATQ, b"nokey", T100) + frame(GATKQ, b"nokey", T100) + frame(GATQ, b"t", T100),
        frame(SET, b"gone", set_extras(0, 0), b"x"),
        frame(TOUCH, b"gone", struct.pack(">I", 0xFFFFFFFF)),
        frame(GET, b"gone"),
    ],
    "flush_version_stat": [
        frame(SET, b"f", set_extras(), b"1"),
        frame(FLUSH),
        frame(GET, b"f"),
        frame(SET, b"f", set_extras(), b"1"),
        frame(FLUSHQ),
        frame(GET, b"f"),
        frame(FLUSH, extras=struct.pack(">I", 0)),
        frame(VERSION),
        frame(STAT, b"nosuchgroup"),
        frame(STAT, b"reset"),
    ],
    "unknown_and_limits": [
        # (memcached discards an unknown frame's body twice over, so only empty ones here.)
        frame(0x42),
        frame(0x1B, opaque=3),
        frame(SET, b"big", set_extras(), BIG),
        frame(SETQ, b"big", set_extras(), BIG),
        frame(APPEND, b"big", value=BIG),
        frame(GET, b"big"),
        # SASL on a server without it: unknown command, as memcached without -S.
        frame(0x20),
        frame(0x21, b"PLAIN", value=b"\0a\0b"),
    ],
}

# Frames after which memcached answers and closes the connection.
CLOSING = {
    "get_with_extras": frame(GET, b"k", extras=b"\0\0\0\0"),
    "key_too_long": frame(GET, b"k" * 251),
    "set_without_extras": frame(SET, b"k", value=b"v"),
    "incr_short_extras": frame(INCR, b"n", extras=b"\0" * 8),
    "key_longer_than_body": frame(GET, b"key", body_len=1),
    "noop_with_body": frame(NOOP, value=b"x"),
    "quit": frame(QUIT),
    "quietly_quit": frame(QUITQ),
}


def normalize(replies):
    """Cas values only as set or not; the version string stays out."""
    out = []
    for op, status, opaque, cas, extras, key, value in replies:
        if op == VERSION:
            value = b"<version>"
        out.append((op, status, opaque, cas != 0, extras, key, value))
    return out


@pytest.fixture(scope="module")
def memcached_binary():
    """A reference memcached 1.6 that speaks only the binary protocol."""
    yield from reference_memcached("-B", "binary", "-I", "1m")


@pytest.mark.parametrize("name", sorted(TRANSCRIPTS))
def test_same_binary_replies_as_memcached(name, server, memcached_binary):
    reference = BinWire(memcached_binary)
    ours = BinWire(server.address)
    reference.roundtrip(frame(FLUSH))
    try:
        for step in TRANSCRIPTS[name]:
            want = normalize(reference.roundtrip(step))
            got = normalize(ours.roundtrip(step))
            assert got == want, f"{name}: {step[:40].hex()}\n memcached: {want}\n s3cached:  {got}"
    finally:
        reference.close()
        ours.close()


@pytest.mark.parametrize("name", sorted(CLOSING))
def test_same_closing_frames_as_memcached(name, dir_server, memcached_binary):
    results = []
    for address in (memcached_binary, dir_server.address):
        w = BinWire(address)
        w.sock.sendall(CLOSING[name])
        replies = []
        while True:
            try:
                replies.append(w.reply())
            except (EOFError, ConnectionResetError):
                break
        results.append(normalize(replies))
        w.close()
    assert results[1] == results[0], f"{name}\n memcached: {results[0]}\n s3cached:  {results[1]}"


def test_text_connections_still_work_beside_binary_ones(dir_server):
    b = BinWire(dir_server.address)
    assert b.roundtrip(frame(SET, b"shared", set_extras(1, 0), b"v"))[0][1] == 0
    t = Wire(dir_server.address)
    assert t.exchange(b"get shared\r\n") == b"VALUE shared 1 1\r\nv\r\nEND\r\n"


# ---- pylibmc, binary=True ---------------------------------------------------------------


def pylibmc_client(server, **kwargs):
    return pylibmc.Client(
        [f"127.0.0.1:{server.port}"], binary=True, behaviors={"cas": True}, **kwargs
    )


def test_pylibmc_binary_end_to_end(server):
    c = pylibmc_client(server)
    assert c.set("k", "v")
    assert c.get("k") == "v"
    assert c.add("k", "other") is False
    assert c.add("fresh", b"\x00bytes") is True
    with pytest.raises(pylibmc.NotFound):
        c.replace("nokey", "x")
    assert c.append("k", ">") and c.prepend("k", "<")
    assert c.get("k") == "<v>"
    value, cas = c.gets("k")
    assert value == "<v>" and cas
    assert c.cas("k", "new", cas) is True
    assert c.cas("k", "stale", cas) is False
    assert c.get("k") == "new"
    assert c.set("n", "5") and c.incr("n", 3) == 8 and c.decr("n", 10) == 0
    with pytest.raises(pylibmc.NotFound):
        c.incr("missing")
    assert c.set_multi({"a": 1, "b": {"x": [1, 2]}, "c": b"z" * 100_000}) == []
    assert c.get_multi(["a", "b", "c", "nope"]) == {"a": 1, "b": {"x": [1, 2]}, "c": b"z" * 100_000}
    assert c.touch("a", 100)
    assert c.delete("a") is True and c.delete("a") is False
    assert c.delete_multi(["b", "c"])
    assert c.get_multi(["b", "c"]) == {}
    assert b"version" in {k.encode() if isinstance(k, str) else k for k in c.get_stats()[0][1]}
    assert c.flush_all()
    assert c.get("k") is None


def test_pylibmc_binary_many_keys_in_one_multiget(server):
    c = pylibmc_client(server)
    # Past one batch of concurrent gets (64) on the directory store; the local S3 server
    # is slow enough on a busy machine that fewer keys keep the test within its deadlines.
    count = 200 if server.backend == "dir" else 70
    items = {f"key:{i}": f"value {i}" for i in range(count)}
    assert c.set_multi(items) == []
    assert c.get_multi(list(items) + ["absent"]) == items


# ---- SASL -------------------------------------------------------------------------------


def users_file(tmp_path):
    path = tmp_path / "users"
    path.write_text("# users allowed in\nalice:s3cret pass\nbob:hunter2\n")
    return str(path)


@pytest.fixture(params=["dir", "s3"])
def sasl_server(request, tmp_path):
    s = Server(request.param, {"S3CACHED_SASL_USERS_FILE": users_file(tmp_path)})
    yield s
    s.stop()


def auth_stats(server):
    w = BinWire(server.address)
    sasl = frame(0x21, b"PLAIN", value=b"\0bob\0hunter2")
    replies = w.roundtrip(sasl + frame(STAT))
    w.close()
    return {r[5]: int(r[6]) for r in replies if r[5] in (b"auth_cmds", b"auth_errors")}


# libsasl2 is process-global and another test's pylibmc state in this process can leave it
# unable to start a client ("FAILED TO SEND AUTHENTICATION"), so the SASL client runs in a
# process of its own, as an application would.
SASL_CLIENT = """
import sys, pylibmc
port = sys.argv[1]
def client(**kw):
    return pylibmc.Client([f"127.0.0.1:{port}"], binary=True, behaviors={"cas": True}, **kw)
good = client(username="alice", password="s3cret pass")
print("good-set", good.set("k", "v"))
print("good-get", good.get("k"))
for name, kw in (("bad", dict(username="alice", password="wrong")), ("nobody", {})):
    try:
        client(**kw).set("k", "x")
        print(name, "stored")
    except pylibmc.Error as e:
        print(name, "refused", "AUTHENTICATION FAILURE" in str(e))
print("good-get-after", good.get("k"))
"""


def test_pylibmc_sasl_login_and_a_refused_password(sasl_server):
    run = subprocess.run(
        [sys.executable, "-c", SASL_CLIENT, str(sasl_server.port)],
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ.copy(),
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "good-set True",
        "good-get v",
        "bad refused True",
        "nobody refused False",
        "good-get-after v",
    ]
    stats = auth_stats(sasl_server)
    assert stats[b"auth_errors"] >= 1 and stats[b"auth_cmds"] > stats[b"auth_errors"]


def test_sasl_frames(sasl_server):
    w = BinWire(sasl_server.address)
    # Before a login only version and SASL are served.
    before = {"sentinel": VERSION}
    assert [r[1] for r in w.roundtrip(frame(VERSION) + frame(0x20), **before)] == [0, 0]
    assert w.roundtrip(frame(0x20), **before)[0][6] == b"PLAIN"
    wrong = w.roundtrip(frame(0x21, b"PLAIN", value=b"\0alice\0nope"), **before)
    assert [(r[1], r[6]) for r in wrong] == [(0x20, b"Auth failure.")]
    other_mech = w.roundtrip(frame(0x21, b"CRAM-MD5", value=b"x"), **before)
    assert other_mech[0][1] == 0x20
    ok = w.roundtrip(frame(0x21, b"PLAIN", value=b"authz\0alice\0s3cret pass"), **before)
    assert [(r[1], r[6]) for r in ok] == [(0, b"Authenticated")]
    assert w.roundtrip(frame(SET, b"k", set_extras(), b"v"))[0][1] == 0
    w.close()
    # A command before the login: auth error, and the connection is closed.
    w = BinWire(sasl_server.address)
    w.sock.sendall(frame(GET, b"k"))
    assert w.reply()[1] == 0x20
    assert w.closed()


def test_text_clients_are_refused_while_sasl_is_on(tmp_path):
    s = Server("dir", {"S3CACHED_SASL_USERS_FILE": users_file(tmp_path)})
    try:
        t = Wire(s.address)
        t.sock.sendall(b"get k\r\n")
        assert t.sock.recv(100) == b"CLIENT_ERROR unauthenticated\r\n"
        assert t.sock.recv(100) == b""
    finally:
        s.stop()


@pytest.fixture
def memcached_text_auth(tmp_path):
    """memcached with its text-protocol login (-Y), for the same transcript."""
    path = tmp_path / "mc-users"
    path.write_text("alice:secret\n")
    yield from reference_memcached("-Y", str(path))


def test_text_login_as_memcached_does(tmp_path, memcached_text_auth):
    path = tmp_path / "users"
    path.write_text("alice:secret\n")
    s = Server("dir", {"S3CACHED_SASL_USERS_FILE": str(path), "S3CACHED_TEXT_AUTH": "true"})
    steps = [
        b"get a\r\n",
        b"version\r\n",
        b"set x 0 0 9\r\nalice bad\r\n",
        b"get a\r\n",
        b"set x 0 0 12\r\nalice secret\r\n",
        b"set a 0 0 1\r\n1\r\n",
        b"get a\r\n",
    ]
    try:
        ref, ours = Wire(memcached_text_auth), Wire(s.address)
        for step in steps:
            # One request at a time: before the login, memcached's meta no-op is refused too.
            ref.sock.sendall(step)
            ours.sock.sendall(step)
            want, got = ref.sock.recv(1000), ours.sock.recv(1000)
            assert got == want, f"{step!r}\n memcached: {want!r}\n s3cached:  {got!r}"
    finally:
        s.stop()


def test_libmemcached_tools_binary_sasl(tmp_path):
    s = Server("dir", {"S3CACHED_SASL_USERS_FILE": users_file(tmp_path)})
    servers = f"--servers=127.0.0.1:{s.port}"
    try:
        ok = subprocess.run(
            ["memcstat", servers, "--binary", "--username=bob", "--password=hunter2"],
            capture_output=True, timeout=30,
        )
        assert ok.returncode == 0 and b"version: 1.6" in ok.stdout, ok
        wrong = subprocess.run(
            ["memcstat", servers, "--binary", "--username=bob", "--password=wrong"],
            capture_output=True, timeout=30,
        )
        assert b"pid:" not in wrong.stdout, wrong
    finally:
        s.stop()
