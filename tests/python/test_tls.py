"""TLS on the memcached port: pymemcache over TLS on both backends, client certificates,
plain-text clients, the handshake deadline and certificate reload on SIGHUP.

Certificates are made here with the openssl command-line tool: a CA, a server certificate
for 127.0.0.1 and a client certificate, all signed by the CA."""

import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import time

import pytest
from pymemcache.client.base import Client
from pymemcache.exceptions import MemcacheUnexpectedCloseError

from conftest import Server

DEADLINE_SECS = 10


class Pki:
    """A CA and the certificates it issued, as PEM files in a directory."""

    def __init__(self, directory):
        self.dir = directory
        self.serial = 0
        self.openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=s3cached test CA",
        )

    def path(self, name):
        return os.path.join(self.dir, name)

    def openssl(self, *args):
        subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True)

    def issue(self, name, usage):
        """Writes name.pem and name.key, a certificate for 127.0.0.1 for `usage`."""
        self.serial += 1
        with open(self.path(f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage={usage}\n")
        self.openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        )
        self.openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-set_serial", str(self.serial), "-days", "2", "-extfile", f"{name}.ext",
            "-out", f"{name}.pem",
        )

    def client_context(self, cert=None):
        """A client context that trusts the CA and checks the server's name (127.0.0.1)."""
        ctx = ssl.create_default_context(cafile=self.path("ca.pem"))
        if cert:
            ctx.load_cert_chain(self.path(f"{cert}.pem"), self.path(f"{cert}.key"))
        return ctx

    def server_env(self, ca=False, **extra):
        env = {
            "S3CACHED_TLS_CERT": self.path("server.pem"),
            "S3CACHED_TLS_KEY": self.path("server.key"),
        }
        if ca:
            env["S3CACHED_TLS_CA"] = self.path("ca.pem")
        env.update(extra)
        return env


@pytest.fixture(scope="module")
def pki():
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is not installed (Debian's openssl package)")
    directory = tempfile.mkdtemp(prefix="s3cached-tls-")
    p = Pki(directory)
    p.issue("server", "serverAuth")
    p.issue("client", "clientAuth")
    yield p
    shutil.rmtree(directory, ignore_errors=True)


def tls_client(server, ctx):
    return Client(server.address, tls_context=ctx, connect_timeout=5, timeout=5)


def served_certificate(server, pki):
    """The certificate the server shows in a handshake, in DER."""
    ctx = pki.client_context()
    with socket.create_connection(server.address, timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            return tls.getpeercert(binary_form=True)


def pem_to_der(path):
    with open(path) as f:
        return ssl.PEM_cert_to_DER_cert(f.read())


def read_until_closed(sock):
    """Everything the server sends until it closes; fails if it does not within the deadline."""
    sock.settimeout(DEADLINE_SECS)
    data = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.parametrize("backend", ["dir", "s3"])
def test_pymemcache_over_tls_on_each_backend(backend, pki):
    server = Server(backend, extra_env=pki.server_env())
    try:
        client = tls_client(server, pki.client_context())
        big = os.urandom(600 * 1024)
        assert client.set("tls-key", b"over tls")
        assert client.get("tls-key") == b"over tls"
        assert client.set("tls-big", big)
        assert client.get("tls-big") == big
        assert client.add("tls-key", b"again", noreply=False) is False
        value, cas = client.gets("tls-key")
        assert value == b"over tls"
        assert client.cas("tls-key", b"swapped", cas) is True
        assert client.set("tls-n", b"41")
        assert client.incr("tls-n", 1) == 42
        client.set_many({"tls-a": b"1", "tls-b": b"2"}, noreply=True)
        assert client.get_many(["tls-a", "tls-b", "tls-key"]) == {
            "tls-a": b"1",
            "tls-b": b"2",
            "tls-key": b"swapped",
        }
        assert client.delete("tls-key") is True
        assert client.get("tls-key") is None
        assert client.version()
        assert int(client.stats()[b"curr_connections"]) >= 1
        client.close()
    finally:
        server.stop()


def test_client_certificates_are_required_when_tls_ca_is_set(pki):
    server = Server("dir", extra_env=pki.server_env(ca=True))
    try:
        refused = tls_client(server, pki.client_context())
        with pytest.raises((ssl.SSLError, OSError, MemcacheUnexpectedCloseError)):
            refused.set("no-cert", b"should not be stored")
            refused.get("no-cert")
        refused.close()
        allowed = tls_client(server, pki.client_context(cert="client"))
        assert allowed.get("no-cert") is None
        assert allowed.set("with-cert", b"ok")
        assert allowed.get("with-cert") == b"ok"
        allowed.close()
    finally:
        server.stop()


def test_a_client_certificate_from_another_ca_is_refused(pki):
    other_dir = tempfile.mkdtemp(prefix="s3cached-tls-other-")
    server = Server("dir", extra_env=pki.server_env(ca=True))
    try:
        other = Pki(other_dir)
        other.issue("client", "clientAuth")
        ctx = pki.client_context()
        ctx.load_cert_chain(other.path("client.pem"), other.path("client.key"))
        with socket.create_connection(server.address, timeout=5) as raw:
            with pytest.raises((ssl.SSLError, ConnectionResetError)):
                with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                    tls.sendall(b"version\r\n")
                    # TLS 1.3: the refusal arrives after the client's side of the handshake.
                    assert b"VERSION" not in read_until_closed(tls)
                    raise ssl.SSLError("closed without a reply")
    finally:
        server.stop()
        shutil.rmtree(other_dir, ignore_errors=True)


def test_a_plain_text_client_on_a_tls_port_fails_cleanly(pki):
    server = Server("dir", extra_env=pki.server_env())
    try:
        with socket.create_connection(server.address, timeout=5) as plain:
            plain.sendall(b"set k 0 0 1\r\nx\r\nget k\r\nversion\r\n")
            data = read_until_closed(plain)
        # At most a TLS alert record (content type 21), never a memcached reply.
        assert data == b"" or data[0] == 21, data
        assert b"STORED" not in data and b"VERSION" not in data
        # The server goes on serving TLS clients.
        client = tls_client(server, pki.client_context())
        assert client.get("k") is None
        assert client.version()
        client.close()
    finally:
        server.stop()


def test_a_silent_client_is_dropped_at_the_handshake_deadline_and_frees_its_slot(pki):
    env = pki.server_env(
        S3CACHED_TLS_HANDSHAKE_TIMEOUT_MS="300", S3CACHED_MAX_CONNECTIONS="1"
    )
    server = Server("dir", extra_env=env)
    try:
        deadline = time.monotonic() + DEADLINE_SECS
        while True:
            with socket.create_connection(server.address, timeout=5) as silent:
                began = time.monotonic()
                data = read_until_closed(silent)
                took = time.monotonic() - began
            # The startup probe's slot is freed once its task ends, which may lag its close.
            if data.startswith(b"ERROR Too many open connections") and time.monotonic() < deadline:
                continue
            break
        assert data == b""
        # Closed at the deadline: not at once (it was given its 300 ms), not never.
        assert 0.25 <= took < DEADLINE_SECS
        # The only slot is free again: a TLS client gets in.
        deadline = time.monotonic() + DEADLINE_SECS
        while True:
            client = tls_client(server, pki.client_context())
            try:
                assert client.version()
                break
            except (ssl.SSLError, OSError, MemcacheUnexpectedCloseError):
                # The slot is freed once the server's task has ended; it may lag the close.
                if time.monotonic() > deadline:
                    raise
            finally:
                client.close()
    finally:
        server.stop()


def test_sighup_reloads_the_certificate_and_a_bad_one_keeps_the_old(pki):
    cert_dir = tempfile.mkdtemp(prefix="s3cached-tls-reload-")
    log = tempfile.NamedTemporaryFile(prefix="s3cached-tls-log-", suffix=".log")
    for name in ("server.pem", "server.key"):
        shutil.copy(pki.path(name), os.path.join(cert_dir, name))
    env = {
        "S3CACHED_TLS_CERT": os.path.join(cert_dir, "server.pem"),
        "S3CACHED_TLS_KEY": os.path.join(cert_dir, "server.key"),
        "S3CACHED_LOG_LEVEL": "info",
    }
    server = Server("dir", extra_env=env, log=log)
    try:
        first = served_certificate(server, pki)
        assert first == pem_to_der(pki.path("server.pem"))

        pki.issue("renewed", "serverAuth")
        for ext in ("pem", "key"):
            shutil.copy(pki.path(f"renewed.{ext}"), os.path.join(cert_dir, f"server.{ext}"))
        renewed = pem_to_der(pki.path("renewed.pem"))
        assert renewed != first
        server.proc.send_signal(signal.SIGHUP)
        wait_for_log(log.name, "TLS certificates reloaded", 1)
        assert served_certificate(server, pki) == renewed

        with open(os.path.join(cert_dir, "server.pem"), "w") as f:
            f.write("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
        server.proc.send_signal(signal.SIGHUP)
        wait_for_log(log.name, "TLS reload failed", 1)
        assert server.proc.poll() is None
        assert served_certificate(server, pki) == renewed
        client = tls_client(server, pki.client_context())
        assert client.set("after-reload", b"1")
        assert client.get("after-reload") == b"1"
        client.close()
    finally:
        server.stop()
        log.close()
        shutil.rmtree(cert_dir, ignore_errors=True)


def wait_for_log(path, text, count):
    """Waits until the server's log holds `text` `count` times (a reload is asynchronous)."""
    deadline = time.monotonic() + DEADLINE_SECS
    while True:
        with open(path, errors="replace") as f:
            if f.read().count(text) >= count:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"the log never said {text!r}")
        time.sleep(0.05)


def test_check_config_reads_the_certificates(pki, tmp_path):
    from conftest import s3cached_binary

    env = dict(os.environ, **pki.server_env(ca=True))
    good = subprocess.run(
        [s3cached_binary(), "--check-config"], env=env, capture_output=True, timeout=30
    )
    assert good.returncode == 0, good.stderr
    assert b"tls_ca = " in good.stdout
    bad = tmp_path / "bad.pem"
    bad.write_text("no certificate here\n")
    env["S3CACHED_TLS_CERT"] = str(bad)
    refused = subprocess.run(
        [s3cached_binary(), "--check-config"], env=env, capture_output=True, timeout=30
    )
    assert refused.returncode == 2
    assert str(bad).encode() in refused.stderr


def test_the_binary_protocol_is_served_inside_tls(pki):
    """The first decrypted byte picks the protocol, as on a plain port: a binary set, get and
    version inside TLS."""
    header = struct.Struct(">BBHBBHIIQ")

    def frame(opcode, key=b"", extras=b"", value=b"", opaque=0):
        body = len(key) + len(extras) + len(value)
        return header.pack(0x80, opcode, len(key), len(extras), 0, 0, body, opaque, 0) + extras + key + value

    def reply(sock):
        data = b""
        while len(data) < 24:
            chunk = sock.recv(24 - len(data))
            assert chunk, "closed before a reply"
            data += chunk
        magic, op, klen, elen, _dt, status, blen, opaque, _cas = header.unpack(data)
        body = b""
        while len(body) < blen:
            chunk = sock.recv(blen - len(body))
            assert chunk, "closed inside a reply"
            body += chunk
        return magic, op, status, opaque, body[elen + klen :]

    server = Server("dir", extra_env=pki.server_env())
    try:
        ctx = pki.client_context()
        with socket.create_connection(server.address, timeout=DEADLINE_SECS) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(
                    frame(0x01, b"bin-tls", struct.pack(">II", 7, 0), b"binary value", opaque=1)
                    + frame(0x00, b"bin-tls", opaque=2)
                    + frame(0x0B, opaque=3)
                )
                assert reply(tls)[:4] == (0x81, 0x01, 0, 1)
                magic, op, status, opaque, value = reply(tls)
                assert (magic, op, status, opaque, value) == (0x81, 0x00, 0, 2, b"binary value")
                magic, op, status, opaque, version = reply(tls)
                assert (magic, op, status, opaque) == (0x81, 0x0B, 0, 3)
                assert version.startswith(b"1.6")
    finally:
        server.stop()
