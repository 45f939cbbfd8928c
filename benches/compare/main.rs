//! Side-by-side benchmark: s3cached (directory store, and S3 when an endpoint is given)
//! against a real memcached, in one run, on loopback; results as ratios.
//!
//! Run: `cargo bench --bench compare` (needs `memcached` on PATH; `taskset`, from util-linux,
//! pins the servers to one core). `S3CACHED_BENCH_ONLY=memory` runs only the resident
//! memory with idle connections, `S3CACHED_BENCH_ONLY=latency` only the near tier behind
//! 20 ms of S3 latency, `S3CACHED_BENCH_ONLY=tail` only cold gets behind S3 latency with a
//! tail, hedged and not, `S3CACHED_BENCH_ONLY=throttle` only set+get pairs while S3
//! answers 20 % of requests 503 SlowDown, `S3CACHED_BENCH_ONLY=peers` only three replicas
//! with peers and without. Throughput under load is memtier_benchmark's (benches/memtier.py):
//! this benchmark's own load generator, which disagreed with memtier by more than the 15 %
//! allowed, is gone. With
//! `S3CACHED_TEST_S3_ENDPOINT=http://127.0.0.1:PORT` (a local S3 server, as tests/run
//! starts) it also measures S3 latency through s3cached against direct SDK calls, the
//! 100-key get and 100 pipelined sets behind 20 ms of injected latency, and, with
//! `S3CACHED_BENCH_CULL_ENTRIES=N`, one culler pass over N objects.
//! Every loop is bounded in count; all traffic stays on 127.0.0.1.
#![allow(
    clippy::disallowed_types,
    reason = "a benchmark measures wall-clock time"
)]

#[path = "../../tests/common/proxy.rs"]
#[allow(dead_code)]
mod proxy;
#[path = "../../tests/common/s3.rs"]
mod s3;

mod fast_s3;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::stream::{self, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const VALUE_BYTES: usize = 100;
const SEQUENTIAL_OPS: usize = 2000;
const CONNECTIONS: usize = 8;
const OPS_PER_CONNECTION: usize = 1000;
const MULTIGET_KEYS: usize = 100;
const MULTIGET_ROUNDS: usize = 50;
const S3_OPS: usize = 200;
const INJECTED_LATENCY: Duration = Duration::from_millis(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Proc {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    /// Peak and current resident memory, in KiB, from /proc.
    fn memory_kib(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmHWM:"), field("VmRSS:"))
    }
}

async fn wait_listening(addr: SocketAddr, log: Option<&std::path::Path>) {
    for _ in 0..300 {
        if TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let log = log
        .and_then(|p| std::fs::read_to_string(p).ok())
        .unwrap_or_default();
    panic!("nothing listening on {addr}\n{log}");
}

/// The core servers are pinned to; the load runs on the others.
const SERVER_CORE: &str = "1";

/// A command for `program`, pinned to [`SERVER_CORE`] when `taskset` is there.
fn pinned(program: &str) -> Command {
    if Command::new("taskset").arg("-V").output().is_ok() {
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", SERVER_CORE, program]);
        cmd
    } else {
        Command::new(program)
    }
}

/// Keeps this process (the load generator) off the servers' core.
fn pin_self_away() {
    let _ = Command::new("taskset")
        .args(["-a", "-p", "-c", "0", &std::process::id().to_string()])
        .stdout(Stdio::null())
        .status();
}

async fn start_memcached() -> Proc {
    let port = free_port();
    let child = pinned("memcached")
        .args([
            "-p",
            &port.to_string(),
            "-l",
            "127.0.0.1",
            "-U",
            "0",
            "-m",
            "256",
            "-u",
            "root",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("memcached on PATH");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, None).await;
    Proc { child, addr }
}

async fn start_s3cached(env: &[(&str, String)]) -> Proc {
    let port = free_port();
    let log = std::env::temp_dir().join(format!("s3cached-bench-{port}.log"));
    let mut cmd = pinned(env!("CARGO_BIN_EXE_s3cached"));
    cmd.env("S3CACHED_LISTEN", format!("127.0.0.1:{port}"))
        .env("S3CACHED_MAX_ENTRIES", "0")
        .env("S3CACHED_LOG_LEVEL", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd.spawn().expect("s3cached binary");
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    wait_listening(addr, Some(&log)).await;
    Proc { child, addr }
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        Conn {
            stream,
            buf: Vec::with_capacity(1 << 16),
        }
    }

    /// Sends `req` and reads until the reply ends with `end`.
    async fn call(&mut self, req: &[u8], end: &[u8]) {
        self.stream.write_all(req).await.unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 65536];
        while !self.buf.ends_with(end) {
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
        assert!(
            !self.buf.starts_with(b"SERVER_ERROR"),
            "{}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

impl Conn {
    /// Sends `req`; true if the reply ends with `want`, false if it is a `SERVER_ERROR`.
    async fn answered(&mut self, req: &[u8], want: &[u8]) -> bool {
        self.stream.write_all(req).await.unwrap();
        self.buf.clear();
        let mut chunk = [0u8; 65536];
        loop {
            if self.buf.ends_with(want) {
                return true;
            }
            if self.buf.starts_with(b"SERVER_ERROR") && self.buf.ends_with(b"\r\n") {
                return false;
            }
            let n = self.stream.read(&mut chunk).await.unwrap();
            assert!(n > 0, "server closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[derive(Default, Clone)]
struct Stat {
    ops_per_sec: f64,
    p50_us: f64,
    p99_us: f64,
}

fn summarize(mut lat: Vec<Duration>, wall: Duration) -> Stat {
    lat.sort();
    let pct =
        |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)].as_secs_f64() * 1e6;
    Stat {
        ops_per_sec: lat.len() as f64 / wall.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
    }
}

fn set_request(key: &str) -> Vec<u8> {
    let mut r = format!("set {key} 0 0 {VALUE_BYTES}\r\n").into_bytes();
    r.extend(std::iter::repeat_n(b'v', VALUE_BYTES));
    r.extend_from_slice(b"\r\n");
    r
}

async fn sequential(addr: SocketAddr, ops: usize, get: bool) -> Stat {
    let mut c = Conn::open(addr).await;
    let mut lat = Vec::with_capacity(ops);
    let start = Instant::now();
    for i in 0..ops {
        let key = format!("bench-{}", i % 500);
        let t = Instant::now();
        if get {
            c.call(format!("get {key}\r\n").as_bytes(), b"END\r\n")
                .await;
        } else {
            c.call(&set_request(&key), b"STORED\r\n").await;
        }
        lat.push(t.elapsed());
    }
    summarize(lat, start.elapsed())
}

async fn concurrent_gets(addr: SocketAddr) -> Stat {
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONNECTIONS)
        .map(|n| {
            tokio::spawn(async move {
                let mut c = Conn::open(addr).await;
                let mut lat = Vec::with_capacity(OPS_PER_CONNECTION);
                for i in 0..OPS_PER_CONNECTION {
                    let t = Instant::now();
                    c.call(
                        format!("get bench-{}\r\n", (i * 7 + n) % 500).as_bytes(),
                        b"END\r\n",
                    )
                    .await;
                    lat.push(t.elapsed());
                }
                lat
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    summarize(all, start.elapsed())
}

async fn multiget(addr: SocketAddr, rounds: usize) -> Stat {
    let mut c = Conn::open(addr).await;
    let keys: Vec<String> = (0..MULTIGET_KEYS).map(|i| format!("bench-{i}")).collect();
    let req = format!("get {}\r\n", keys.join(" "));
    let mut lat = Vec::new();
    let start = Instant::now();
    for _ in 0..rounds {
        let t = Instant::now();
        c.call(req.as_bytes(), b"END\r\n").await;
        lat.push(t.elapsed());
    }
    summarize(lat, start.elapsed())
}

async fn pipelined_sets(addr: SocketAddr, n: usize) -> Duration {
    let mut c = Conn::open(addr).await;
    let mut req = Vec::new();
    for i in 0..n {
        req.extend(set_request(&format!("pipe-{i}")));
    }
    let expect = b"STORED\r\n".repeat(n);
    let t = Instant::now();
    c.call(&req, &expect).await;
    t.elapsed()
}

fn row(name: &str, mc: &Stat, ours: &Stat) {
    println!(
        "{name:<28} {:>10.0} {:>10.0} {:>7.2} | {:>8.0} {:>8.0} {:>7.2} | {:>8.0} {:>8.0}",
        mc.ops_per_sec,
        ours.ops_per_sec,
        ours.ops_per_sec / mc.ops_per_sec,
        mc.p50_us,
        ours.p50_us,
        ours.p50_us / mc.p50_us,
        mc.p99_us,
        ours.p99_us,
    );
}

async fn local_comparison() {
    let memcached = start_memcached().await;
    let dir = tempfile::tempdir().unwrap();
    let ours = start_s3cached(&[("S3CACHED_DATA_DIR", dir.path().display().to_string())]).await;
    println!("\n== memcached vs s3cached (directory store) on loopback ==");
    println!(
        "{:<28} {:>10} {:>10} {:>7} | {:>8} {:>8} {:>7} | {:>8} {:>8}",
        "workload",
        "mc ops/s",
        "s3c ops/s",
        "ratio",
        "mc p50",
        "s3c p50",
        "ratio",
        "mc p99",
        "s3c p99"
    );
    for (name, get) in [
        ("set, 1 conn, sequential", false),
        ("get, 1 conn, sequential", true),
    ] {
        let a = sequential(memcached.addr, SEQUENTIAL_OPS, get).await;
        let b = sequential(ours.addr, SEQUENTIAL_OPS, get).await;
        row(name, &a, &b);
    }
    let a = concurrent_gets(memcached.addr).await;
    let b = concurrent_gets(ours.addr).await;
    row(&format!("get, {CONNECTIONS} conns"), &a, &b);
    let a = multiget(memcached.addr, MULTIGET_ROUNDS).await;
    let b = multiget(ours.addr, MULTIGET_ROUNDS).await;
    row(&format!("get {MULTIGET_KEYS} keys"), &a, &b);
    let (mc_peak, mc_rss) = memcached.memory_kib();
    let (s_peak, s_rss) = ours.memory_kib();
    println!(
        "memory KiB: memcached peak {mc_peak} now {mc_rss}; s3cached peak {s_peak} now {s_rss}; peak ratio {:.2}",
        s_peak as f64 / mc_peak.max(1) as f64
    );
}

/// The bench bucket, and the S3 test server's options with longer deadlines.
const BENCH_BUCKET: &str = "s3cached-bench";

fn s3_env(endpoint: &str, prefix: &str) -> Vec<(&'static str, String)> {
    let mut env = s3::s3_env(BENCH_BUCKET, endpoint, prefix);
    env.push(("S3CACHED_S3_OPERATION_TIMEOUT_MS", "30000".into()));
    env.push(("S3CACHED_S3_ATTEMPT_TIMEOUT_MS", "10000".into()));
    env
}

async fn direct_s3(client: &aws_sdk_s3::Client, get: bool) -> Stat {
    let body = Bytes::from(vec![b'v'; VALUE_BYTES + 60]);
    let mut lat = Vec::new();
    let start = Instant::now();
    for i in 0..S3_OPS {
        let key = format!("direct/bench-{}", i % 100);
        let t = Instant::now();
        if get {
            let out = client
                .get_object()
                .bucket("s3cached-bench")
                .key(&key)
                .send()
                .await
                .unwrap();
            out.body.collect().await.unwrap();
        } else {
            client
                .put_object()
                .bucket("s3cached-bench")
                .key(&key)
                .body(body.clone().into())
                .send()
                .await
                .unwrap();
        }
        lat.push(t.elapsed());
    }
    summarize(lat, start.elapsed())
}

async fn s3_comparison(endpoint: &str) {
    let ours = start_s3cached(&s3_env(endpoint, "bench-latency")).await;
    let client = s3::sdk_client(endpoint);
    println!("\n== S3 backend at {endpoint}: through s3cached vs direct SDK calls ==");
    println!(
        "{:<28} {:>10} {:>10} {:>7} | {:>8} {:>8} {:>7} | {:>8} {:>8}",
        "workload",
        "sdk ops/s",
        "s3c ops/s",
        "ratio",
        "sdk p50",
        "s3c p50",
        "ratio",
        "sdk p99",
        "s3c p99"
    );
    let direct_set = direct_s3(&client, false).await;
    let via_set = sequential(ours.addr, S3_OPS, false).await;
    row("set vs PutObject", &direct_set, &via_set);
    let direct_get = direct_s3(&client, true).await;
    let via_get = sequential(ours.addr, S3_OPS, true).await;
    row("get vs GetObject", &direct_get, &via_get);
}

/// The 100-key get and 100 pipelined sets with 20 ms added to every S3 request.
async fn hidden_latency(endpoint: &str, label: &str) {
    let proxy = proxy::Proxy::start(endpoint).await;
    proxy.set(proxy::Mode::Forward(INJECTED_LATENCY));
    let ours = start_s3cached(&s3_env(&proxy.url(), "bench-hidden")).await;
    pipelined_sets(ours.addr, 100).await; // warm the HTTP connection pool
    let mut seq_sets = Duration::ZERO;
    {
        let mut c = Conn::open(ours.addr).await;
        for i in 0..100 {
            let t = Instant::now();
            c.call(&set_request(&format!("seq-{i}")), b"STORED\r\n")
                .await;
            seq_sets += t.elapsed();
        }
    }
    // pipe-0..99 written now, then read at once through the same replica: the near tier
    // answers, well inside its window.
    let pipe = pipelined_sets(ours.addr, 100).await;
    let multi = {
        let mut c = Conn::open(ours.addr).await;
        let keys: Vec<String> = (0..100).map(|i| format!("pipe-{i}")).collect();
        let req = format!("get {}\r\n", keys.join(" "));
        let mut lat = Vec::new();
        let t = Instant::now();
        for _ in 0..5 {
            let s = Instant::now();
            c.call(req.as_bytes(), b"END\r\n").await;
            lat.push(s.elapsed());
        }
        summarize(lat, t.elapsed())
    };
    let hot = {
        let mut c = Conn::open(ours.addr).await;
        let mut lat = Vec::new();
        let t = Instant::now();
        for i in 0..200 {
            let s = Instant::now();
            c.call(format!("get pipe-{}\r\n", i % 10).as_bytes(), b"END\r\n")
                .await;
            lat.push(s.elapsed());
        }
        summarize(lat, t.elapsed())
    };
    proxy.reset_counters();
    let miss = {
        let mut c = Conn::open(ours.addr).await;
        let t = Instant::now();
        for i in 0..10 {
            c.call(format!("get absent-{i}\r\n").as_bytes(), b"END\r\n")
                .await;
        }
        t.elapsed() / 10
    };
    let miss_requests = proxy.requests.load(std::sync::atomic::Ordering::SeqCst) as f64 / 10.0;
    println!(
        "\n== {label}, with {} ms injected per S3 request ==",
        INJECTED_LATENCY.as_millis()
    );
    println!(
        "hot get (near tier): p50 {:.3} ms, p99 {:.3} ms",
        hot.p50_us / 1e3,
        hot.p99_us / 1e3
    );
    println!(
        "100-key get of keys just written: p50 {:.2} ms",
        multi.p50_us / 1e3
    );
    println!(
        "cold miss: {:.1} ms, {miss_requests:.1} S3 requests each",
        miss.as_secs_f64() * 1e3
    );
    println!(
        "100 pipelined sets: {:.1} ms  vs 100 sequential sets: {:.1} ms  (speed-up {:.1}x, {:.2} round trips)",
        pipe.as_secs_f64() * 1e3,
        seq_sets.as_secs_f64() * 1e3,
        seq_sets.as_secs_f64() / pipe.as_secs_f64(),
        pipe.as_secs_f64() / miss.as_secs_f64()
    );
}

/// Cold single-key gets behind S3 latency with a tail: the test proxy's model, each
/// request forwarded after 20 ms, or after 400 ms for 5 % of them chosen at random, in
/// front of the in-process responder. A reader with no RAM tier (every get asks S3) and
/// hedging off, then one with the default hedging; 8 clients, each reading its own keys
/// one at a time, after 128 gets that let the hedge delay settle.
async fn tail_latency(endpoint: &str) {
    const CLIENTS: usize = 8;
    const GETS: usize = 100;
    let proxy = proxy::Proxy::start(endpoint).await;
    let writer = start_s3cached(&s3_env(&proxy.url(), "bench-tail")).await;
    {
        let mut c = Conn::open(writer.addr).await;
        let mut sets = Vec::new();
        for i in 0..CLIENTS * GETS {
            sets.extend(set_request(&format!("tail-{i}")));
        }
        c.call(&sets, &b"STORED\r\n".repeat(CLIENTS * GETS)).await;
    }
    proxy.set(proxy::Mode::Tail {
        fast: Duration::from_millis(20),
        slow: Duration::from_millis(400),
        slow_per_mille: 50,
    });
    println!("\n== cold single-key gets, each S3 request 20 ms (95 %) or 400 ms (5 %) ==");
    for (label, percent) in [
        ("hedging off", "0"),
        ("hedging on (20 %, the default)", "20"),
    ] {
        let mut env = s3_env(&proxy.url(), "bench-tail");
        env.push(("S3CACHED_RAM_CACHE_BYTES", "0".into()));
        env.push(("S3CACHED_S3_HEDGE_PERCENT", percent.into()));
        let reader = start_s3cached(&env).await;
        let read = |warm: bool| {
            let addr = reader.addr;
            async move {
                let clients = (0..CLIENTS).map(|c| async move {
                    let mut conn = Conn::open(addr).await;
                    let mut lat = Vec::new();
                    for i in 0..if warm { 16 } else { GETS } {
                        let s = Instant::now();
                        let key = format!("tail-{}", c * GETS + i);
                        conn.call(format!("get {key}\r\n").as_bytes(), b"END\r\n")
                            .await;
                        lat.push(s.elapsed());
                    }
                    lat
                });
                futures::future::join_all(clients).await.concat()
            }
        };
        read(true).await;
        let t = Instant::now();
        let lat = read(false).await;
        let stat = summarize(lat, t.elapsed());
        println!(
            "{label}: p50 {:.1} ms, p99 {:.1} ms, p99/p50 {:.1}",
            stat.p50_us / 1e3,
            stat.p99_us / 1e3,
            stat.p99_us / stat.p50_us
        );
        // 100-key gets, one at a time: each is 100 cold GETs.
        let mut conn = Conn::open(reader.addr).await;
        let mut lat = Vec::new();
        for round in 0..20 {
            let keys: Vec<String> = (0..100)
                .map(|i| format!("tail-{}", (round * 100 + i) % (CLIENTS * GETS)))
                .collect();
            let s = Instant::now();
            conn.call(format!("get {}\r\n", keys.join(" ")).as_bytes(), b"END\r\n")
                .await;
            lat.push(s.elapsed());
        }
        lat.sort();
        println!(
            "{label}, 100-key gets: median {:.1} ms, worst of 20 {:.1} ms",
            lat[10].as_secs_f64() * 1e3,
            lat[19].as_secs_f64() * 1e3
        );
    }
    // What a 100-key get is held to: 100 parallel GETs sent straight to the same server,
    // each a flat 20 ms, no tail.
    proxy.set(proxy::Mode::Forward(Duration::from_millis(20)));
    let client = s3::sdk_client(&proxy.url());
    let body = Bytes::from(vec![b'v'; VALUE_BYTES + 60]);
    for i in 0..100 {
        let put = client.put_object().bucket(BENCH_BUCKET);
        let put = put
            .key(format!("direct/parallel-{i}"))
            .body(body.clone().into());
        put.send().await.unwrap();
    }
    let mut lat = Vec::new();
    for _ in 0..20 {
        let s = Instant::now();
        let gets = (0..100).map(|i| {
            let get = client.get_object().bucket(BENCH_BUCKET);
            let get = get.key(format!("direct/parallel-{i}")).send();
            async move { get.await.unwrap().body.collect().await.unwrap() }
        });
        futures::future::join_all(gets).await;
        lat.push(s.elapsed());
    }
    lat.sort();
    println!(
        "100 parallel GETs straight to S3 (flat 20 ms): median {:.1} ms, worst of 20 {:.1} ms",
        lat[10].as_secs_f64() * 1e3,
        lat[19].as_secs_f64() * 1e3
    );
}

/// S3 throttling a prefix: 20 % of requests answered `503 SlowDown` for 10 s, while 8
/// clients each send set+get pairs, every command given 5 s (a client's usual timeout).
async fn throttled(endpoint: &str) {
    const CLIENTS: usize = 8;
    const PERIOD: Duration = Duration::from_secs(10);
    const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
    let proxy = proxy::Proxy::start(endpoint).await;
    let mut env = s3_env(&proxy.url(), "bench-throttle");
    // Every read asks S3, so reads meet the throttling too.
    env.push(("S3CACHED_REVALIDATE_AFTER_MS", "0".into()));
    let server = start_s3cached(&env).await;
    proxy.set(proxy::Mode::Throttle { per_mille: 200 });
    println!("\n== 20 % of S3 requests answered 503 SlowDown for 10 s, 8 clients of set+get ==");
    let started = Instant::now();
    let addr = server.addr;
    let clients = (0..CLIENTS).map(|c| async move {
        let mut conn = Conn::open(addr).await;
        let (mut ok, mut failed, mut slowest) = (0usize, 0usize, Duration::ZERO);
        for n in 0..100_000 {
            if started.elapsed() >= PERIOD {
                break;
            }
            let key = format!("throttled-{c}-{}", n % 1000);
            let get = format!("get {key}\r\n").into_bytes();
            for (req, want) in [(set_request(&key), &b"STORED\r\n"[..]), (get, b"END\r\n")] {
                let t = Instant::now();
                let answered = tokio::time::timeout(CLIENT_TIMEOUT, conn.answered(&req, want));
                match answered.await {
                    Ok(true) => ok += 1,
                    Ok(false) => failed += 1,
                    Err(_) => {
                        failed += 1;
                        conn = Conn::open(addr).await;
                    }
                }
                slowest = slowest.max(t.elapsed());
            }
        }
        (ok, failed, slowest)
    });
    let results = futures::future::join_all(clients).await;
    proxy.set(proxy::Mode::Forward(Duration::ZERO));
    let ok: usize = results.iter().map(|r| r.0).sum();
    let failed: usize = results.iter().map(|r| r.1).sum();
    let slowest = results.iter().map(|r| r.2).max().unwrap_or_default();
    println!(
        "commands answered {ok}, failed or past 5 s {failed}, slowest {:.0} ms; S3 requests {}",
        slowest.as_secs_f64() * 1e3,
        proxy.requests.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// A counter from `stats` through `conn`.
async fn stat(conn: &mut Conn, name: &str) -> u64 {
    conn.call(b"stats\r\n", b"END\r\n").await;
    let text = String::from_utf8_lossy(&conn.buf).into_owned();
    let prefix = format!("STAT {name} ");
    let line = text.lines().find_map(|l| l.strip_prefix(prefix.as_str()));
    line.and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("stat {name}"))
}

/// Reads `key` through `conn` until its reply satisfies `done` (at most 5 s); the time it
/// took.
async fn until_seen(conn: &mut Conn, key: &str, done: impl Fn(&[u8]) -> bool) -> Duration {
    let start = Instant::now();
    let get = format!("get {key}\r\n");
    loop {
        conn.call(get.as_bytes(), b"END\r\n").await;
        if done(&conn.buf) || start.elapsed() > Duration::from_secs(5) {
            return start.elapsed();
        }
    }
}

/// Three replicas on one bucket, with peers and without: how soon a write or a `flush_all`
/// through one is read through another (S3 on loopback, no latency added), and how many S3
/// revalidations a hot-key read load spread over the three costs (each S3 request 20 ms).
async fn peer_replicas(endpoint: &str) {
    const HOT_KEYS: usize = 10;
    const LOAD: Duration = Duration::from_secs(10);
    let proxy = proxy::Proxy::start(endpoint).await;
    println!("\n== three replicas on one bucket: a write through one, read through another ==");
    for with_peers in [false, true] {
        let prefix = format!("bench-peers-{with_peers}-{}", std::process::id());
        let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let names: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut replicas = Vec::new();
        for port in &ports {
            let mut env = s3_env(&proxy.url(), &prefix);
            if with_peers {
                env.push(("S3CACHED_PEERS", names.join(",")));
                env.push(("S3CACHED_PEER_LISTEN", format!("127.0.0.1:{port}")));
                env.push(("S3CACHED_PEER_SECRET", "bench".into()));
            }
            replicas.push(start_s3cached(&env).await);
        }
        let mut conns = Vec::new();
        for r in &replicas {
            conns.push(Conn::open(r.addr).await);
        }
        if with_peers {
            for c in conns.iter_mut() {
                for _ in 0..500 {
                    if stat(c, "tier_window_ms").await == 30_000 {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
        proxy.set(proxy::Mode::Forward(Duration::ZERO));
        let rounds = if with_peers { 200 } else { 20 };
        let (mut writes, mut flushes) = (Vec::new(), Vec::new());
        for i in 0..rounds {
            let (a, b) = (i % 3, (i + 1) % 3);
            let value = format!("{i:0100}");
            let set = format!("set vis 0 0 100\r\n{value}\r\n");
            conns[a].call(set.as_bytes(), b"STORED\r\n").await;
            let holds = |reply: &[u8]| reply.windows(100).any(|w| w == value.as_bytes());
            writes.push(until_seen(&mut conns[b], "vis", holds).await);
            if i % 4 == 0 {
                conns[a].call(b"flush_all\r\n", b"OK\r\n").await;
                let gone = |reply: &[u8]| reply == b"END\r\n";
                flushes.push(until_seen(&mut conns[b], "vis", gone).await);
            }
        }
        let pct = |v: &mut Vec<Duration>, p: usize| {
            v.sort();
            v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e3
        };
        let label = if with_peers {
            "with peers"
        } else {
            "without peers"
        };
        println!(
            "{label}: a write read through another replica after p50 {:.1} ms, p99 {:.1} ms \
             ({rounds} writes); flush_all hidden after p50 {:.1} ms, p99 {:.1} ms",
            pct(&mut writes, 50),
            pct(&mut writes, 99),
            pct(&mut flushes, 50),
            pct(&mut flushes, 99)
        );
        // Hot keys read through all three replicas for LOAD: S3 revalidations they cost.
        proxy.set(proxy::Mode::Forward(Duration::from_millis(20)));
        for k in 0..HOT_KEYS {
            let set = format!("set hot{k} 0 0 100\r\n{:0100}\r\n", k);
            conns[0].call(set.as_bytes(), b"STORED\r\n").await;
        }
        let mut before = 0;
        for c in conns.iter_mut() {
            before += stat(c, "backend_revalidations").await;
        }
        let started = Instant::now();
        let mut reads = 0u64;
        while started.elapsed() < LOAD && reads < 10_000_000 {
            for c in conns.iter_mut() {
                let get = format!("get hot{}\r\n", reads as usize % HOT_KEYS);
                c.call(get.as_bytes(), b"END\r\n").await;
                reads += 1;
            }
        }
        let mut after = 0;
        for c in conns.iter_mut() {
            after += stat(c, "backend_revalidations").await;
        }
        println!(
            "{label}: {reads} reads of {HOT_KEYS} hot keys over the three in {} s (S3 20 ms away) \
             cost {} S3 revalidations",
            LOAD.as_secs(),
            after - before
        );
    }
}

async fn cull_cost(endpoint: &str, entries: usize) {
    use s3cached::clock::Clock;
    use s3cached::culler::{Culler, CullerConfig, WriteHint};
    use s3cached::flush::Flush;
    use s3cached::stats::Stats;
    use s3cached::store::s3::S3Store;
    use s3cached::store::{Entry, PutMode, Store};
    let prefix = format!("bench-cull-{entries}-{}", std::process::id());
    let config = s3cached::config::Config::from_toml(&format!(
        "{}s3_operation_timeout_ms = 60000\ns3_attempt_timeout_ms = 30000\n",
        s3::s3_toml(BENCH_BUCKET, endpoint, &prefix)
    ))
    .unwrap();
    let store: Arc<dyn Store> = Arc::new(S3Store::connect(config.s3_settings()).await.unwrap());
    let fill = Instant::now();
    stream::iter(0..entries)
        .map(|i| {
            let store = store.clone();
            async move {
                let e = Entry {
                    key: Bytes::from(format!("k{i}")),
                    value: Bytes::from("v"),
                    cas: 1,
                    ..Entry::default()
                };
                store.put(&e, PutMode::Overwrite).await.unwrap();
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<_>>()
        .await;
    println!(
        "\n== culler: one pass over {entries} objects (filled in {:.1} s) ==",
        fill.elapsed().as_secs_f64()
    );
    let flush = Arc::new(Flush::load(store.clone(), Duration::ZERO).await.unwrap());
    let culler = Culler::new(
        store.clone(),
        flush.clone(),
        Arc::new(Stats::default()),
        Clock::System,
        CullerConfig {
            max_entries: entries as u64,
            cull_frequency: 3,
            max_bytes: 0,
            interval: Duration::from_secs(3600),
        },
        Arc::new(WriteHint::new(entries as u64)),
    );
    let t = Instant::now();
    let report = culler.pass().await.unwrap();
    println!(
        "cull to max_entries: {:.2} s, {} S3 requests, listed {}, culled {}",
        t.elapsed().as_secs_f64(),
        report.requests,
        report.listed,
        report.culled
    );
    let t = Instant::now();
    flush.flush(Clock::System.now_us()).await.unwrap();
    println!(
        "flush_all epoch write: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let t = Instant::now();
    let report = culler.pass().await.unwrap();
    println!(
        "pass removing flushed objects: {:.2} s, {} S3 requests, removed {}",
        t.elapsed().as_secs_f64(),
        report.requests,
        report.flushed_removed
    );
}

/// Resident memory of s3cached with 1,000 idle connections.
async fn idle_memory() {
    let dir = tempfile::tempdir().unwrap();
    let ours = start_s3cached(&[("S3CACHED_DATA_DIR", dir.path().display().to_string())]).await;
    let mut idle = Vec::new();
    for _ in 0..IDLE_CONNECTIONS {
        idle.push(TcpStream::connect(ours.addr).await.unwrap());
    }
    // Every connection answered: all 1,000 are open on the server.
    for c in idle.iter_mut().step_by(100) {
        c.write_all(b"version\r\n").await.unwrap();
        let mut buf = [0u8; 64];
        let _ = c.read(&mut buf).await.unwrap();
    }
    let (_, rss) = ours.memory_kib();
    println!(
        "\ns3cached resident with {IDLE_CONNECTIONS} idle connections: {} MiB (tier bound {} MiB)",
        rss / 1024,
        s3cached::tier::DEFAULT_RAM_CACHE_BYTES >> 20
    );
}

const IDLE_CONNECTIONS: usize = 1000;

fn main() {
    pin_self_away();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        match std::env::var("S3CACHED_BENCH_ONLY").as_deref() {
            Ok("memory") => return idle_memory().await,
            Ok("latency") => {
                let fast = format!("http://{}", fast_s3::start().await);
                return hidden_latency(&fast, "in-process S3 responder (parallel, instant)").await;
            }
            Ok("tail") => {
                return tail_latency(&format!("http://{}", fast_s3::start().await)).await;
            }
            Ok("peers") => {
                return peer_replicas(&format!("http://{}", fast_s3::start().await)).await;
            }
            Ok("throttle") => {
                return throttled(&format!("http://{}", fast_s3::start().await)).await;
            }
            _ => {}
        }
        local_comparison().await;
        idle_memory().await;
        let fast = format!("http://{}", fast_s3::start().await);
        hidden_latency(&fast, "in-process S3 responder (parallel, instant)").await;
        tail_latency(&fast).await;
        throttled(&fast).await;
        peer_replicas(&fast).await;
        if let Ok(endpoint) = std::env::var("S3CACHED_TEST_S3_ENDPOINT") {
            s3_comparison(&endpoint).await;
            hidden_latency(&endpoint, "local S3 server (moto)").await;
            if let Some(n) = std::env::var("S3CACHED_BENCH_CULL_ENTRIES").ok().and_then(|n| n.parse().ok()) {
                cull_cost(&endpoint, n).await;
            }
        } else {
            println!("\n(set S3CACHED_TEST_S3_ENDPOINT to a local S3 server to benchmark the S3 backend)");
        }
    });
}
