//! memtier-style load, both servers in one run: connections issuing a get/set mix over a hot
//! key set, optionally pipelined or as multi-key gets; ops/s, latency percentiles, and the
//! server's CPU time per operation read from /proc. Servers are pinned to one core (taskset)
//! and the load runs on the others, so the server, not the client, is what saturates.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The most one workload may take, whatever its op count.
const WORKLOAD_TIME_LIMIT: Duration = Duration::from_secs(20);

/// One workload, run identically against each server.
#[derive(Debug, Clone, Copy)]
pub struct Workload {
    pub name: &'static str,
    pub connections: usize,
    /// Requests (batches of `pipeline`) each connection sends.
    pub batches_per_connection: usize,
    /// Requests sent together before reading the replies.
    pub pipeline: usize,
    /// Keys per get (1 = a plain get).
    pub keys_per_get: usize,
    /// Of 100 requests, how many are gets.
    pub gets_per_100: u32,
    pub value_bytes: usize,
    /// Distinct keys, all written before the measurement.
    pub keys: usize,
}

/// What one server did under a workload.
#[derive(Debug, Clone, Copy, Default)]
pub struct Outcome {
    /// Operations per second (a get of N keys counts as one).
    pub ops_per_sec: f64,
    pub p50_us: f64,
    pub p99_us: f64,
    /// Server CPU (user + system) per operation.
    pub cpu_us_per_op: f64,
}

/// CPU time (user + system) of process `pid`, in microseconds.
pub fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit(") ").next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after the name.
    (ticks(11) + ticks(12)) * 1_000_000 / clock_ticks_per_sec()
}

fn clock_ticks_per_sec() -> u64 {
    // USER_HZ is 100 on every Linux this runs on; getconf says so when present.
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100)
}

fn key(i: usize) -> String {
    format!("load:{i:08}")
}

/// A small deterministic generator, so both servers see the same request stream.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Writes every key once, so every get in the measurement is a hit of known size.
async fn populate(addr: SocketAddr, w: &Workload) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let value = vec![b'v'; w.value_bytes];
    for chunk in (0..w.keys).collect::<Vec<_>>().chunks(50) {
        let mut req = Vec::new();
        for &i in chunk {
            req.extend_from_slice(format!("set {} 0 0 {}\r\n", key(i), w.value_bytes).as_bytes());
            req.extend_from_slice(&value);
            req.extend_from_slice(b"\r\n");
        }
        stream.write_all(&req).await.unwrap();
        let mut reply = vec![0; chunk.len() * b"STORED\r\n".len()];
        stream.read_exact(&mut reply).await.unwrap();
        assert!(
            reply.starts_with(b"STORED"),
            "{}",
            String::from_utf8_lossy(&reply)
        );
    }
}

/// One batch of requests and the exact length of their replies.
fn batch(w: &Workload, rng: &mut XorShift, value: &[u8]) -> (Vec<u8>, usize) {
    let mut req = Vec::new();
    let mut reply_len = 0;
    for _ in 0..w.pipeline {
        if (rng.next() % 100) < u64::from(w.gets_per_100) {
            req.extend_from_slice(b"get");
            for _ in 0..w.keys_per_get {
                let k = key(rng.next() as usize % w.keys);
                req.extend_from_slice(b" ");
                req.extend_from_slice(k.as_bytes());
                reply_len += format!("VALUE {k} 0 {}\r\n", w.value_bytes).len() + w.value_bytes + 2;
            }
            req.extend_from_slice(b"\r\n");
            reply_len += b"END\r\n".len();
        } else {
            let k = key(rng.next() as usize % w.keys);
            req.extend_from_slice(format!("set {k} 0 0 {}\r\n", w.value_bytes).as_bytes());
            req.extend_from_slice(value);
            req.extend_from_slice(b"\r\n");
            reply_len += b"STORED\r\n".len();
        }
    }
    (req, reply_len)
}

async fn connection(addr: SocketAddr, w: Workload, seed: u64, deadline: Instant) -> Vec<Duration> {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let mut rng = XorShift(seed | 1);
    let value = vec![b'v'; w.value_bytes];
    let mut reply = Vec::new();
    let mut latencies = Vec::with_capacity(w.batches_per_connection);
    for _ in 0..w.batches_per_connection {
        if Instant::now() > deadline {
            break;
        }
        let (req, reply_len) = batch(&w, &mut rng, &value);
        let t = Instant::now();
        stream.write_all(&req).await.unwrap();
        reply.resize(reply_len, 0);
        tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut reply))
            .await
            .expect("reply within 10 s")
            .expect("full reply");
        latencies.push(t.elapsed());
    }
    assert!(
        !reply.starts_with(b"SERVER_ERROR") && !reply.starts_with(b"CLIENT_ERROR"),
        "{}",
        String::from_utf8_lossy(&reply[..reply.len().min(200)])
    );
    latencies
}

/// Runs `w` against the server at `addr` (process `pid`).
pub async fn run(addr: SocketAddr, pid: u32, w: &Workload) -> Outcome {
    populate(addr, w).await;
    let deadline = Instant::now() + WORKLOAD_TIME_LIMIT;
    let cpu_before = cpu_us(pid);
    let start = Instant::now();
    let tasks: Vec<_> = (0..w.connections)
        .map(|c| tokio::spawn(connection(addr, *w, 0x9E37_79B9 + c as u64, deadline)))
        .collect();
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let wall = start.elapsed();
    let cpu = cpu_us(pid).saturating_sub(cpu_before);
    latencies.sort();
    let ops = (latencies.len() * w.pipeline) as f64;
    let pct = |p: f64| {
        latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)].as_secs_f64()
            * 1e6
    };
    Outcome {
        ops_per_sec: ops / wall.as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        cpu_us_per_op: cpu as f64 / ops,
    }
}

/// The workloads of docs/benchmarks.md's table.
pub fn workloads() -> Vec<Workload> {
    let base = Workload {
        name: "90/10 get/set 1 KiB, 4 conns",
        connections: 4,
        batches_per_connection: 10_000,
        pipeline: 1,
        keys_per_get: 1,
        gets_per_100: 90,
        value_bytes: 1024,
        keys: 1000,
    };
    vec![
        base,
        Workload {
            name: "same, pipelined 16 deep",
            batches_per_connection: 1_500,
            pipeline: 16,
            ..base
        },
        Workload {
            name: "10-key gets (90/10), 4 conns",
            batches_per_connection: 5_000,
            keys_per_get: 10,
            ..base
        },
        Workload {
            name: "set only 1 KiB, 4 conns",
            batches_per_connection: 5_000,
            gets_per_100: 0,
            ..base
        },
        Workload {
            name: "90/10 100 KiB values",
            batches_per_connection: 1_000,
            value_bytes: 100 * 1024,
            keys: 100,
            ..base
        },
    ]
}

/// Prints the table header.
pub fn header() {
    println!(
        "{:<32} {:>9} {:>9} {:>6} | {:>7} {:>7} | {:>7} {:>7} {:>6} | {:>7} {:>7} {:>6}",
        "workload",
        "mc op/s",
        "s3c op/s",
        "ratio",
        "mc p50",
        "s3c p50",
        "mc p99",
        "s3c p99",
        "ratio",
        "mc cpu",
        "s3c cpu",
        "ratio"
    );
}

/// Prints one row: memcached, s3cached and their ratios (µs for latency and CPU per op).
pub fn row(w: &Workload, mc: &Outcome, ours: &Outcome) {
    println!(
        "{:<32} {:>9.0} {:>9.0} {:>6.2} | {:>7.0} {:>7.0} | {:>7.0} {:>7.0} {:>6.2} | {:>7.1} {:>7.1} {:>6.2}",
        w.name,
        mc.ops_per_sec,
        ours.ops_per_sec,
        ours.ops_per_sec / mc.ops_per_sec,
        mc.p50_us,
        ours.p50_us,
        mc.p99_us,
        ours.p99_us,
        ours.p99_us / mc.p99_us,
        mc.cpu_us_per_op,
        ours.cpu_us_per_op,
        ours.cpu_us_per_op / mc.cpu_us_per_op,
    );
}
