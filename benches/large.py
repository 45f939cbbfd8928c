#!/usr/bin/env python3
"""Long values through s3cached against the same S3 server directly, in one run.

Starts the local S3 server (tests/s3server.py, moto) and s3cached (release build) on it
with `stream_above_bytes` 1 MiB and `max_item_size` 1 GiB, then, RUNS times each:
- a direct PUT and GET of a SIZE_MIB value with boto3 (one PUT, one GET, the S3 server's own
  pace), and
- a `set` and a `get` of the same value through s3cached (streamed: a multipart upload, a
  streamed GET),
and prints the median throughputs, their ratio, and s3cached's peak resident memory
(VmHWM) against its budget. Then STALLED clients each ask for a different value of half
SIZE and stop reading, and another client's small set and get are timed for 3 s. Every
transfer is bounded by its size; the run by RUNS.

    cargo build --release && python3 benches/large.py
    SIZE_MIB=64 RUNS=1 python3 benches/large.py        # a quick look

Environment: S3CACHED_BIN (default target/release/s3cached), SIZE_MIB (256), RUNS (3),
BUDGET_MIB (the server's memory_limit_bytes, 256), STALLED (8).
"""

import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import boto3

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = int(os.environ.get("SIZE_MIB", "256")) * 1024 * 1024
RUNS = int(os.environ.get("RUNS", "3"))
BUDGET = int(os.environ.get("BUDGET_MIB", "256")) * 1024 * 1024
STALLED = int(os.environ.get("STALLED", "8"))
BIN = os.environ.get("S3CACHED_BIN", os.path.join(ROOT, "target/release/s3cached"))
BUCKET = "bench-large"


def wait_for_file(path, proc, what):
    """Waits (at most 30 s) for a server to write the file it announces itself in."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return open(path).read()
        if proc.poll() is not None:
            sys.exit(f"{what} exited at start")
        time.sleep(0.05)
    sys.exit(f"{what} did not start")


def value():
    """SIZE bytes, each MiB filled with its index."""
    mib = 1024 * 1024
    return b"".join(bytes([i % 251]) * mib for i in range(SIZE // mib))


def recv_exact(sock, n):
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise RuntimeError("connection closed")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def recv_line(sock):
    line = b""
    while not line.endswith(b"\r\n"):
        byte = sock.recv(1)
        if not byte:
            raise RuntimeError("connection closed")
        line += byte
    return line


def peak_rss(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def main():
    work = tempfile.mkdtemp(prefix="s3cached-large-")
    port_file = os.path.join(work, "s3port")
    s3 = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests/s3server.py"), "-p", "0", "--port-file", port_file],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"http://127.0.0.1:{wait_for_file(port_file, s3, 'the S3 server').strip()}"
        client = boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="test",
            aws_secret_access_key="test",
        )
        client.create_bucket(Bucket=BUCKET)
        config = os.path.join(work, "s3cached.toml")
        with open(config, "w") as f:
            f.write(
                f'listen = "127.0.0.1:0"\naddr_file = "{work}/addr"\n'
                f'storage_bucket_name = "{BUCKET}"\nendpoint_url = "{endpoint}"\n'
                'force_path_style = true\nregion = "us-east-1"\n'
                'access_key_id = "test"\nsecret_access_key = "test"\n'
                "max_item_size = 1073741824\nstream_above_bytes = 1048576\n"
                f"memory_limit_bytes = {BUDGET}\nmax_entries = 0\nlog_level = \"warn\"\n"
            )
        server = subprocess.Popen([BIN, "--config", config], stdout=subprocess.DEVNULL)
        try:
            run(client, server, wait_for_file(f"{work}/addr", server, "s3cached"))
        finally:
            server.kill()
            server.wait()
    finally:
        s3.kill()
        s3.wait()


def run(client, server, addr_text):
    listen = next(l.split()[1] for l in addr_text.splitlines() if l.startswith("listen "))
    host, port = listen.rsplit(":", 1)
    data = value()
    mib = SIZE / (1024 * 1024)
    rates = {"direct PUT": [], "direct GET": [], "s3cached set": [], "s3cached get": []}
    for i in range(RUNS):
        started = time.monotonic()
        client.put_object(Bucket=BUCKET, Key=f"direct-{i}", Body=data)
        rates["direct PUT"].append(mib / (time.monotonic() - started))
        started = time.monotonic()
        got = client.get_object(Bucket=BUCKET, Key=f"direct-{i}")["Body"].read()
        rates["direct GET"].append(mib / (time.monotonic() - started))
        assert got == data
        with socket.create_connection((host, int(port))) as sock:
            started = time.monotonic()
            sock.sendall(f"set large-{i} 0 0 {SIZE}\r\n".encode())
            sock.sendall(data)
            sock.sendall(b"\r\n")
            assert recv_line(sock) == b"STORED\r\n"
            rates["s3cached set"].append(mib / (time.monotonic() - started))
            started = time.monotonic()
            sock.sendall(f"get large-{i}\r\n".encode())
            assert recv_line(sock) == f"VALUE large-{i} 0 {SIZE}\r\n".encode()
            got = recv_exact(sock, SIZE + 7)
            rates["s3cached get"].append(mib / (time.monotonic() - started))
            assert got[:SIZE] == data and got[SIZE:] == b"\r\nEND\r\n"
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{SIZE // (1024 * 1024)} MiB values, {RUNS} runs, median MiB/s:")
    for k, v in median.items():
        print(f"  {k:14} {v:8.1f}")
    print(f"  set / PUT      {median['s3cached set'] / median['direct PUT']:8.2f}x")
    print(f"  get / GET      {median['s3cached get'] / median['direct GET']:8.2f}x")
    peak = peak_rss(server.pid)
    print(f"s3cached peak RSS {peak // (1024 * 1024)} MiB, budget {BUDGET // (1024 * 1024)} MiB")
    stalled_readers(host, int(port), server)


def stalled_readers(host, port, server):
    """STALLED clients each ask for a different value of half SIZE and never read past its
    VALUE line; meanwhile another client's small set and get must be answered."""
    half = SIZE // 2
    data = value()[:half]
    with socket.create_connection((host, port)) as sock:
        for i in range(STALLED):
            sock.sendall(f"set stalled-{i} 0 0 {half}\r\n".encode() + data + b"\r\n")
            assert recv_line(sock) == b"STORED\r\n"
    readers = []
    for i in range(STALLED):
        reader = socket.create_connection((host, port))
        reader.sendall(f"get stalled-{i}\r\n".encode())
        assert recv_line(reader).startswith(f"VALUE stalled-{i} ".encode())
        readers.append(reader)
    slowest = 0.0
    with socket.create_connection((host, port)) as sock:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            started = time.monotonic()
            sock.sendall(b"set small 0 0 2\r\nok\r\nget small\r\n")
            assert recv_line(sock) == b"STORED\r\n"
            assert recv_exact(sock, len(b"VALUE small 0 2\r\nok\r\nEND\r\n")).endswith(b"END\r\n")
            slowest = max(slowest, time.monotonic() - started)
    peak = peak_rss(server.pid)
    print(
        f"{STALLED} readers stalled on {half // (1024 * 1024)} MiB values: peak RSS "
        f"{peak // (1024 * 1024)} MiB, another client's slowest set+get {slowest * 1000:.1f} ms"
    )
    for reader in readers:
        reader.close()


if __name__ == "__main__":
    main()
