"""A raw client for memcached's binary protocol: frames out, parsed frames back."""

import socket
import struct

HEADER = struct.Struct(">BBHBBHIIQ")
REPLY_TIMEOUT_SECS = 10


def frame(opcode, key=b"", extras=b"", value=b"", opaque=0, cas=0, magic=0x80, body_len=None):
    body = len(key) + len(extras) + len(value) if body_len is None else body_len
    return HEADER.pack(magic, opcode, len(key), len(extras), 0, 0, body, opaque, cas) + extras + key + value


def set_extras(flags=0, exptime=0):
    return struct.pack(">II", flags, exptime)


def incr_extras(delta=1, initial=0, exptime=0):
    return struct.pack(">QQI", delta, initial, exptime)


class BinWire:
    """One binary connection; `send` writes frames, `replies` reads what comes back."""

    def __init__(self, address):
        self.sock = socket.create_connection(address, timeout=REPLY_TIMEOUT_SECS)
        self.buf = b""

    def close(self):
        self.sock.close()

    def _fill(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed")
            self.buf += chunk

    def reply(self):
        """One reply: (opcode, status, opaque, cas, extras, key, value)."""
        self._fill(24)
        magic, op, klen, elen, _dt, status, blen, opaque, cas = HEADER.unpack(self.buf[:24])
        assert magic == 0x81, self.buf[:24]
        self._fill(24 + blen)
        body = self.buf[24 : 24 + blen]
        self.buf = self.buf[24 + blen :]
        return (op, status, opaque, cas, body[:elen], body[elen : elen + klen], body[elen + klen :])

    def closed(self):
        """Whether the server closed the connection (after any replies already read)."""
        try:
            self.sock.settimeout(2)
            return self.buf == b"" and self.sock.recv(1) == b""
        except (ConnectionResetError, socket.timeout):
            return False
        finally:
            self.sock.settimeout(REPLY_TIMEOUT_SECS)

    def roundtrip(self, data, sentinel=0x0A):
        """Sends frames followed by a sentinel frame (a noop; a version before a SASL login);
        returns every reply before the sentinel's."""
        self.sock.sendall(data + frame(sentinel, opaque=0xFFFFFFFF))
        out = []
        while True:
            r = self.reply()
            if r[0] == sentinel and r[2] == 0xFFFFFFFF:
                return out
            out.append(r)
