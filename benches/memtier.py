#!/usr/bin/env python3
"""s3cached against memcached under memtier_benchmark, in one run: the benchmark of record.

Starts memcached (`-t 1`) and s3cached (release build, directory store, near tier on) on
loopback ports they pick, each pinned to one core with taskset, and drives both with the
`memtier_benchmark` on PATH from another core, workload by workload, alternating servers.
Each workload runs RUNS times per server; the table gives the median run (by ops/s) of
each, with p99 latency and each server's CPU time per operation (from /proc/PID/stat).

    cargo build --release && python3 benches/memtier.py            # every workload, 3 runs
    RUNS=1 TEST_TIME=5 ONLY=90/10 python3 benches/memtier.py       # a quick look

Environment: S3CACHED_BIN (default target/release/s3cached), RUNS (3), TEST_TIME
(seconds per run, 15), ONLY (run the workloads whose names contain it), SERVER_CPU (1),
CLIENT_CPU (0), S3CACHED_TARGET=HOST:PORT and S3CACHED_TARGET_PID (measure a server that
is already running, under perf say, instead of starting one), KEEP=1 (leave the data
directory). Every run is bounded by TEST_TIME; the prefill by its key count.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = int(os.environ.get("RUNS", "3"))
TEST_TIME = int(os.environ.get("TEST_TIME", "15"))
ONLY = os.environ.get("ONLY", "")
SERVER_CPU = os.environ.get("SERVER_CPU", "1")
CLIENT_CPU = os.environ.get("CLIENT_CPU", "0")
# Both servers get the same memory for items: memcached's -m and s3cached's RAM tier.
ITEM_MEMORY_MIB = 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

# name, keys, value bytes, memtier arguments. 4 connections (1 thread x 4 clients) unless
# the workload says otherwise; keys uniform at random unless it says Gaussian.
WORKLOADS = [
    ("90/10 get/set 1 KiB", 10_000, 1024, ["--ratio=1:9"]),
    ("90/10 pipelined 16 deep", 10_000, 1024, ["--ratio=1:9", "--pipeline=16"]),
    ("10-key multi-get", 10_000, 1024, ["--ratio=1:9", "--multi-key-get=10"]),
    ("set only 1 KiB", 10_000, 1024, ["--ratio=1:0"]),
    ("50/50 100 KiB", 1_000, 102_400, ["--ratio=1:1"]),
    ("90/10 Gaussian keys", 10_000, 1024, ["--ratio=1:9", "--key-pattern=G:G"]),
    ("90/10 200 connections", 10_000, 1024, ["--ratio=1:9", "--clients=200"]),
]


def need(tool):
    path = shutil.which(tool)
    if not path:
        sys.exit(f"{tool} is not on PATH (see docs/benchmarks.md for how to get it)")
    return path


def wait_for(path, proc, what):
    """Waits (at most 10 s) for a server to write its address file."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before listening")
        try:
            with open(path) as f:
                text = f.read()
            if text.endswith("\n"):
                return text
        except FileNotFoundError:
            pass
        time.sleep(0.02)
    sys.exit(f"{what} wrote no address within 10 s")


class Server:
    def __init__(self, name, argv, env, addr_file, parse):
        self.name = name
        self.proc = subprocess.Popen(
            ["taskset", "-c", SERVER_CPU] + argv,
            env={**os.environ, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.port = parse(wait_for(addr_file, self.proc, name))
        self.pid = self.proc.pid

    def cpu_seconds(self):
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


class Target:
    """A server already running (S3CACHED_TARGET): measured, not started or stopped."""

    def __init__(self, name, addr, pid):
        self.name = name
        self.port = int(addr.rsplit(":", 1)[1])
        self.pid = int(pid) if pid else None

    def cpu_seconds(self):
        return Server.cpu_seconds(self) if self.pid else 0.0

    def stop(self):
        pass


def start_memcached(work):
    port_file = os.path.join(work, "memcached.port")
    argv = [need("memcached"), "-t", "1", "-p", "-1", "-U", "0", "-l", "127.0.0.1"]
    argv += ["-m", str(ITEM_MEMORY_MIB), "-c", "1024"]
    if os.geteuid() == 0:
        argv += ["-u", "root"]  # memcached will not run as root without it

    def parse(text):
        for line in text.splitlines():
            if line.startswith("TCP INET:"):
                return int(line.split(":")[1])
        sys.exit(f"memcached port file: {text!r}")

    return Server("memcached", argv, {"MEMCACHED_PORT_FILENAME": port_file}, port_file, parse)


def start_s3cached(work):
    if os.environ.get("S3CACHED_TARGET"):
        return Target("s3cached", os.environ["S3CACHED_TARGET"], os.environ.get("S3CACHED_TARGET_PID"))
    binary = os.environ.get("S3CACHED_BIN", os.path.join(ROOT, "target/release/s3cached"))
    if not os.access(binary, os.X_OK):
        sys.exit(f"{binary} not found: run `cargo build --release` first")
    addr_file = os.path.join(work, "s3cached.addr")
    argv = [binary, "--listen", "127.0.0.1:0", "--addr-file", addr_file]
    argv += ["--data-dir", os.path.join(work, "data"), "--max-entries", "0", "--max-bytes", "0"]
    argv += ["--ram-cache-bytes", str(ITEM_MEMORY_MIB << 20), "--max-connections", "1024"]
    argv += ["--log-level", "warn"]

    def parse(text):
        for line in text.splitlines():
            if line.startswith("listen "):
                return int(line.rsplit(":", 1)[1])
        sys.exit(f"s3cached address file: {text!r}")

    return Server("s3cached", argv, {}, addr_file, parse)


def memtier(port, args, out):
    argv = ["taskset", "-c", CLIENT_CPU, need("memtier_benchmark"), "-s", "127.0.0.1"]
    argv += ["-p", str(port), "-P", "memcache_text", "--hide-histogram", "--threads=1"]
    argv += args + ["--json-out-file", out]
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with open(out) as f:
        return json.load(f)


def prefill(server, keys, size, work):
    """Writes every key once, in order, so gets hit from the first run."""
    args = ["--clients=4", f"--key-maximum={keys}", f"--data-size={size}", "--ratio=1:0"]
    args += ["--key-pattern=P:P", f"--requests={keys // 4 + 1}"]
    memtier(server.port, args, os.path.join(work, "prefill.json"))


def run(server, keys, size, extra, work):
    args = [f"--key-maximum={keys}", f"--data-size={size}", f"--test-time={TEST_TIME}"]
    if not any(a.startswith("--clients") for a in extra):
        args.append("--clients=4")
    before = server.cpu_seconds()
    result = memtier(server.port, args + extra, os.path.join(work, "run.json"))
    cpu = server.cpu_seconds() - before
    totals = result["ALL STATS"]["Totals"]
    ops = totals["Ops/sec"]
    count = ops * result["ALL STATS"]["Runtime"]["Total duration"] / 1000.0
    p99 = totals["Percentile Latencies"]["p99.00"]
    return {"ops": ops, "p99_ms": p99, "cpu_us": cpu * 1e6 / count if count else 0.0}


def median_run(runs):
    return sorted(runs, key=lambda r: r["ops"])[len(runs) // 2]


def main():
    work = tempfile.mkdtemp(prefix="s3cached-memtier-")
    servers = [start_memcached(work), start_s3cached(work)]
    rows = []
    try:
        for name, keys, size, extra in WORKLOADS:
            if ONLY and ONLY not in name:
                continue
            for s in servers:
                prefill(s, keys, size, work)
            results = {s.name: [] for s in servers}
            for _ in range(RUNS):
                for s in servers:
                    results[s.name].append(run(s, keys, size, extra, work))
            mc, s3c = (median_run(results[s.name]) for s in servers)
            rows.append((name, mc, s3c))
            print(f"{name}: memcached {mc['ops']:,.0f} ops/s, s3cached {s3c['ops']:,.0f} ops/s,"
                  f" ratio {s3c['ops'] / mc['ops']:.2f}", file=sys.stderr, flush=True)
    finally:
        for s in servers:
            s.stop()
        if os.environ.get("KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)

    print("| workload | mc ops/s | s3c ops/s | ratio | mc p99 ms | s3c p99 ms | p99 ratio"
          " | mc CPU µs/op | s3c CPU µs/op | CPU ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, mc, s3c in rows:
        ratio = s3c["ops"] / mc["ops"]
        p99 = s3c["p99_ms"] / mc["p99_ms"] if mc["p99_ms"] else 0.0
        cpu = s3c["cpu_us"] / mc["cpu_us"] if mc["cpu_us"] else 0.0
        print(f"| {name} | {mc['ops']:,.0f} | {s3c['ops']:,.0f} | {ratio:.2f} | {mc['p99_ms']:.3f}"
              f" | {s3c['p99_ms']:.3f} | {p99:.2f} | {mc['cpu_us']:.1f} | {s3c['cpu_us']:.1f}"
              f" | {cpu:.2f} |")


if __name__ == "__main__":
    main()
