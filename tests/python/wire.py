"""A raw memcached wire client for transcript tests."""

import re
import socket

SENTINEL = b"mn\r\n"
SENTINEL_REPLY = b"MN\r\n"


class Wire:
    def __init__(self, address, timeout=20):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.last_cas = "0"

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def exchange(self, request: bytes) -> bytes:
        """Sends `request` then a meta no-op; returns everything before the no-op's reply."""
        request = request.replace(b"{cas}", self.last_cas.encode())
        self.sock.sendall(request + SENTINEL)
        out = b""
        while not out.endswith(SENTINEL_REPLY):
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed after {request!r}; got {out!r}")
            out += chunk
        reply = out[: -len(SENTINEL_REPLY)]
        cas = re.findall(rb"^VALUE \S+ \d+ \d+ (\d+)\r$", reply, re.M) or re.findall(
            rb" c(\d+)", reply
        )
        if cas:
            self.last_cas = cas[-1].decode()
        return reply


def _ttl_bucket(match):
    # A TTL read a moment after it was set may have crossed a second boundary on one server
    # and not the other: compare remaining TTLs to the nearest 5 seconds.
    return b"t%d" % (5 * round(int(match.group(1)) / 5))


def normalize(reply: bytes) -> bytes:
    """Replaces what legitimately differs between servers: cas values, the version, and
    remaining TTLs to within a second."""
    reply = re.sub(rb"(?<= )t(\d+)(?=[ \r])", _ttl_bucket, reply)
    reply = re.sub(rb"^(VALUE \S+ \d+ \d+) \d+\r$", rb"\1 <cas>\r", reply, flags=re.M)
    reply = re.sub(rb"(?<= )c\d+(?=[ \r])", b"c<cas>", reply)
    reply = re.sub(rb"^VERSION .*\r$", b"VERSION <v>\r", reply, flags=re.M)
    return reply


def until_closed(address, data, timeout=10):
    """Sends `data` and returns everything read until the server closes the connection."""
    with socket.create_connection(address, timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return out
            out += chunk
