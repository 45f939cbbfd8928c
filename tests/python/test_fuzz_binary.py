"""Differential fuzzer for the binary protocol: frame streams generated from a seed go to a
real memcached 1.6 started with `-B binary` and to s3cached; every reply must be the same up
to cas values (compared as set or not) and the version string.

A bounded run is part of the normal test run: 4 seeds x 600 frames on the directory store,
1 of them on S3. A longer one:
  S3CACHED_BIN_FUZZ_SEEDS=40 S3CACHED_BIN_FUZZ_FRAMES=3000 \\
    python3 -m pytest -q tests/python/test_fuzz_binary.py
(S3CACHED_BIN_FUZZ_SEED_BASE moves the seeds; a failure names its seed and batch.)

The generator avoids memcached's own oddities listed in docs/protocol.md (an unknown opcode's body,
which memcached discards twice over) and timing: TTLs are never, already expired, or days
away. Cas values a server handed out are sent back to that same server. Counters stay below
2^63: memcached 1.6.18 parses a stored number of 2^63 or more with a `strchr` that runs past
the item's end, so its answer depends on the memory after the item (docs/protocol.md, deliberate differences).
"""

import os
import random
import struct

import pytest

from binwire import BinWire, frame, incr_extras, set_extras
from conftest import Server
from test_binary import memcached_binary, normalize  # noqa: F401 (fixture)

SEEDS = int(os.environ.get("S3CACHED_BIN_FUZZ_SEEDS", "4"))
S3_SEEDS = int(os.environ.get("S3CACHED_BIN_FUZZ_S3_SEEDS", str(min(SEEDS, 1))))
FRAMES = int(os.environ.get("S3CACHED_BIN_FUZZ_FRAMES", "600"))
SEED_BASE = int(os.environ.get("S3CACHED_BIN_FUZZ_SEED_BASE", "9000"))

# Key stems; each seed prefixes its own so seeds sharing one memcached never meet.
# Counters (incr/decr) and strings (append/prepend) are kept apart: memcached pads a shrunk
# counter with blanks only when no reply still holds the item, so appending to a counter
# gives `7 18...` or `718...` (a number, or not) depending on write timing.
COUNTERS = [b"n", b"cnt"]
STRINGS = [b"a", b"b", b"\x00bin\xff", b"sp ace", None]
KEYS = COUNTERS + STRINGS
# Never, already expired (an absolute time in the past), days away (relative, absolute).
EXPTIMES = [0, 0, 0, 1_000_000_000, 200_000, 4_000_000_000]
FLAGS = [0, 1, 0xFFFFFFFF, 65535]
# A placeholder for "the last cas this server handed out".
LAST_CAS = object()
CASES = [0, 0, 0, 1, 12345, LAST_CAS, LAST_CAS]


def value(rng, counter):
    # A counter's number stays below 2^63 (see the module's doc); any other key may hold 2^64-1.
    big = b"4611686018427387904" if counter else b"18446744073709551615"
    noise = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
    return rng.choice([b"", b"v", b"12", big, b"abc", b"7 ", noise])


def one_frame(rng, prefix):
    """(opcode, key, extras, value, cas) of one random frame."""
    op = rng.choice(
        [0x00, 0x09, 0x0C, 0x0D] * 3
        + [0x01, 0x11, 0x02, 0x12, 0x03, 0x13, 0x0E, 0x19, 0x0F, 0x1A] * 2
        + [0x04, 0x14, 0x05, 0x15, 0x06, 0x16, 0x1C, 0x1D, 0x1E, 0x23, 0x24, 0x0A, 0x0B, 0x08, 0x42]
    )
    if op in (0x05, 0x15, 0x06, 0x16):
        stem = rng.choice(COUNTERS)
    elif op in (0x0E, 0x19, 0x0F, 0x1A):
        stem = rng.choice(STRINGS)
    else:
        stem = rng.choice(KEYS)
    key = prefix + (b"k" * (250 - len(prefix)) if stem is None else stem)
    cas = rng.choice(CASES)
    if op in (0x00, 0x09, 0x0C, 0x0D):
        return op, key, b"", b"", 0
    if op in (0x01, 0x11, 0x02, 0x12, 0x03, 0x13):
        extras = set_extras(rng.choice(FLAGS), rng.choice(EXPTIMES))
        return op, key, extras, value(rng, stem in COUNTERS), cas
    if op in (0x0E, 0x19, 0x0F, 0x1A):
        return op, key, b"", value(rng, False), cas
    if op in (0x04, 0x14):
        return op, key, b"", b"", cas
    if op in (0x05, 0x15, 0x06, 0x16):
        # Below 2^63 whatever runs (module doc): an incr never wraps here (test_binary.py's
        # `arith` transcript wraps a small number), a decr may ask for any amount.
        incr = op in (0x05, 0x15)
        delta = rng.choice([0, 1, 5, 2**40 if incr else 2**64 - 1])
        initial = rng.choice([0, 10, 2**62])
        expiry = rng.choice([0, 0xFFFFFFFF, 200_000])
        # No cas here: on an empty item memcached reports non-numeric before a cas mismatch
        # and s3cached the other way round (docs/protocol.md, deliberate differences).
        return op, key, incr_extras(delta, initial, expiry), b"", 0
    if op in (0x1C, 0x1D, 0x1E, 0x23, 0x24):
        return op, key, struct.pack(">I", rng.choice(EXPTIMES)), b"", 0
    if op == 0x08:
        return op, b"", b"", b"", 0
    return op, b"", b"", b"", 0


def batches(seed, count):
    rng = random.Random(seed)
    prefix = b"%d:" % seed
    made = 0
    while made < count:
        n = rng.choice([1, 1, 2, 4, 8])
        yield [one_frame(rng, prefix) for _ in range(n)]
        made += n


class Side:
    """One server's connection and the last cas it handed out."""

    def __init__(self, address):
        self.wire = BinWire(address)
        self.last_cas = 0

    def run(self, batch):
        data = b"".join(
            frame(op, key, extras, val, cas=self.last_cas if cas is LAST_CAS else cas)
            for op, key, extras, val, cas in batch
        )
        replies = self.wire.roundtrip(data)
        for r in replies:
            if r[3]:
                self.last_cas = r[3]
        return [unpad(r) for r in normalize(replies)]


def unpad(reply):
    """A counter's padding: memcached pads a shrunk counter in place only when nothing else
    holds the item, so `9 ` and `9` are taken as one (as in the text fuzzer)."""
    op, status, opaque, cas, extras, key, val = reply
    if val.rstrip(b" ").isdigit():
        val = val.rstrip(b" ")
    return (op, status, opaque, cas, extras, key, val)


def run_seed(seed, ours_address, memcached_address):
    reference, ours = Side(memcached_address), Side(ours_address)
    reference.run([(0x08, b"", b"", b"", 0)])
    ours.run([(0x08, b"", b"", b"", 0)])
    history = []
    try:
        for batch in batches(seed, FRAMES):
            history.append(batch)
            want = reference.run(batch)
            got = ours.run(batch)
            if want != got:
                pytest.fail(
                    f"seed {seed}, batch {len(history)}: {batch}\n memcached: {want}\n"
                    f" s3cached:  {got}\n recent: {history[-6:]}"
                )
    finally:
        reference.wire.close()
        ours.wire.close()


FUZZ_CASES = [("dir", s) for s in range(SEED_BASE, SEED_BASE + SEEDS)] + [
    ("s3", s) for s in range(SEED_BASE, SEED_BASE + S3_SEEDS)
]


@pytest.mark.parametrize("backend,seed", FUZZ_CASES)
def test_binary_fuzz_same_replies_as_memcached(backend, seed, memcached_binary):  # noqa: F811
    server = Server(backend)
    try:
        run_seed(seed, server.address, memcached_binary)
    finally:
        server.stop()
