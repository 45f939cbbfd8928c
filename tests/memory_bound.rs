//! The memory bound: the server binary's resident memory stays within its memory
//! budget plus a fixed overhead under a client that pipelines `get` of many distinct 1 MiB
//! items and never reads, and under 1,000 connections doing the same; other clients are
//! served meanwhile. RSS is read from /proc/<pid>/status (VmRSS now, VmHWM the peak).
//!
//! Run: `cargo test --test memory_bound -- --nocapture` (prints the measured peaks).

// A blocking test (std sockets and threads, no tokio runtime): std's clock and a short poll
// while the server binary starts listening.
#![allow(clippy::disallowed_types, clippy::disallowed_methods)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MIB: u64 = 1024 * 1024;
/// A value just under the default 1 MiB item limit.
const VALUE_BYTES: usize = 1024 * 1024 - 1024;
/// Distinct 1 MiB items the attack asks for.
const ITEMS: usize = 64;
/// What the process may hold beyond the budget: the runtime, its threads' stacks and
/// allocator arenas, per-connection tasks and sockets, and the allocator's slack. Measured
/// at about 20 to 40 MiB here (see the printed figures); the margin is for other machines.
const FIXED_OVERHEAD_BYTES: u64 = 96 * MIB;

/// A server binary on a free loopback port with its own data directory.
struct Server {
    child: Child,
    addr: SocketAddr,
    /// Its log: warnings, and why each connection ended (printed if the test fails).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start(memory_limit: u64) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        let addr_file = dir.path().join("addr");
        let mut child = Command::new(env!("CARGO_BIN_EXE_s3cached"))
            .args(["--listen", "127.0.0.1:0"])
            .arg("--addr-file")
            .arg(&addr_file)
            .args(["--data-dir", dir.path().join("data").to_str().unwrap()])
            .args(["--memory-limit-bytes", &memory_limit.to_string()])
            // The near tier has a budget of its own: off, so what is measured is this one.
            .args(["--ram-cache-bytes", "0"])
            .args(["--max-connections", "2000"])
            .args(["--log-level", "warn,s3cached::connection=debug"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start the server binary");
        let addr = wait_for_addr_file(&addr_file, &mut child);
        Server {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    /// (VmRSS, VmHWM) in bytes.
    fn rss(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read /proc status");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().trim_end_matches(" kB").parse::<u64>().ok())
                .expect("field in /proc status")
                * 1024
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn client(&self) -> TcpStream {
        let c = TcpStream::connect(self.addr).unwrap();
        c.set_nodelay(true).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        c
    }
}

/// The address the server wrote once listening: it binds port 0 itself, so no port is
/// probed before the server holds it.
fn wait_for_addr_file(path: &std::path::Path, child: &mut Child) -> SocketAddr {
    let start = Instant::now();
    loop {
        if let Ok(text) = std::fs::read_to_string(path) {
            let listen = text.lines().find_map(|l| l.strip_prefix("listen "));
            return listen.expect("a listen line").parse().unwrap();
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the server exited at start: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "server never listened"
        );
        // Polled: the file is renamed into place whole once every listener is bound.
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!("server log, last lines:");
            for line in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("  {line}");
            }
        }
    }
}

fn read_until(c: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    while !out.ends_with(end) {
        let n = c.read(&mut buf).expect("reply in time");
        assert!(n > 0, "connection closed");
        out.extend_from_slice(&buf[..n]);
    }
    out
}

fn store_items(server: &Server) {
    let mut c = server.client();
    let value = vec![b'v'; VALUE_BYTES];
    for i in 0..ITEMS {
        let mut req = format!("set big{i} 0 0 {VALUE_BYTES}\r\n").into_bytes();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\n");
        c.write_all(&req).unwrap();
        assert_eq!(read_until(&mut c, b"\r\n"), b"STORED\r\n");
    }
}

/// One pipelined burst of the attack: `lines` gets of all the distinct items.
fn attack_burst(lines: usize) -> Vec<u8> {
    let keys: String = (0..ITEMS).map(|i| format!(" big{i}")).collect();
    format!("get{keys}\r\n").repeat(lines).into_bytes()
}

/// A client that is served while the attack goes on: each roundtrip must be prompt.
fn served(server: &Server, rounds: usize) -> Duration {
    let mut c = server.client();
    let mut slowest = Duration::ZERO;
    for i in 0..rounds {
        let started = Instant::now();
        c.write_all(format!("set s{i} 0 0 2\r\nok\r\nget s{i}\r\n").as_bytes())
            .unwrap();
        let reply = read_until(&mut c, b"END\r\n");
        assert_eq!(
            reply,
            format!("STORED\r\nVALUE s{i} 0 2\r\nok\r\nEND\r\n").as_bytes()
        );
        slowest = slowest.max(started.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(5),
        "slowest reply {slowest:?}"
    );
    slowest
}

/// The server's `memory_used_bytes` and `memory_peak_bytes`.
fn budget_stats(server: &Server) -> (u64, u64) {
    let mut c = server.client();
    c.write_all(b"stats\r\n").unwrap();
    let text = String::from_utf8(read_until(&mut c, b"END\r\n")).unwrap();
    let stat = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("STAT {name} ")))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("stat {name}"))
    };
    (stat("memory_used_bytes"), stat("memory_peak_bytes"))
}

/// Samples RSS for `period`, serving another client meanwhile; returns the peak (VmHWM).
fn watch(server: &Server, period: Duration) -> u64 {
    let start = Instant::now();
    while start.elapsed() < period {
        served(server, 5);
    }
    server.rss().1
}

#[test]
fn rss_stays_within_the_budget_under_a_client_that_never_reads() {
    let budget = 64 * MIB;
    let server = Server::start(budget);
    store_items(&server);
    let (baseline, _) = server.rss();
    // Before the budget, 16 such lines (2.6 KB of input) pinned 1 GiB.
    let mut attacker = server.client();
    attacker.write_all(&attack_burst(64)).unwrap();
    let peak = watch(&server, Duration::from_secs(5));
    let (used, budget_peak) = budget_stats(&server);
    println!(
        "never-reading client: baseline RSS {} MiB, peak RSS (VmHWM) {} MiB, budget {} MiB, \
         budget peak {} MiB, used now {} MiB",
        baseline / MIB,
        peak / MIB,
        budget / MIB,
        budget_peak / MIB,
        used / MIB
    );
    assert!(budget_peak <= budget, "budget peak {budget_peak}");
    // A connection's share is a quarter of the budget: the attack holds at least half of it.
    assert!(
        budget_peak >= budget / 8,
        "the attack never reached its share"
    );
    assert!(
        peak <= baseline + budget + FIXED_OVERHEAD_BYTES,
        "peak RSS {peak} over baseline {baseline} + budget + overhead"
    );
    drop(attacker);
}

#[test]
fn rss_stays_within_the_budget_under_a_thousand_connections() {
    let budget = 64 * MIB;
    let server = Server::start(budget);
    store_items(&server);
    let (baseline, _) = server.rss();
    let mut clients = Vec::with_capacity(1000);
    for i in 0..1000 {
        let mut c = server.client();
        // Every connection asks for 4 MiB and never reads; every tenth pipelines a burst.
        let lines = if i % 10 == 0 { 4 } else { 1 };
        let keys: String = (0..4).map(|k| format!(" big{}", (i + k) % ITEMS)).collect();
        c.write_all(format!("get{keys}\r\n").repeat(lines).as_bytes())
            .unwrap();
        clients.push(c);
    }
    let peak = watch(&server, Duration::from_secs(5));
    let (used, budget_peak) = budget_stats(&server);
    println!(
        "1,000 never-reading connections: baseline RSS {} MiB, peak RSS (VmHWM) {} MiB, \
         budget {} MiB, budget peak {} MiB, used now {} MiB",
        baseline / MIB,
        peak / MIB,
        budget / MIB,
        budget_peak / MIB,
        used / MIB
    );
    // A new connection's two 16 KiB buffers are charged but never refused.
    let buffers = 1001 * 32 * 1024;
    assert!(budget_peak <= budget + buffers, "budget peak {budget_peak}");
    assert!(
        peak <= baseline + budget + FIXED_OVERHEAD_BYTES,
        "peak RSS {peak} over baseline {baseline} + budget + overhead"
    );
    drop(clients);
}

/// A binary-protocol GETQ of `key` (quiet: a hit answers, a miss is silent).
fn binary_getq(key: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80, 0x09];
    frame.extend_from_slice(&(key.len() as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0, 0, 0]);
    frame.extend_from_slice(&(key.len() as u32).to_be_bytes());
    frame.extend_from_slice(&[0; 12]);
    frame.extend_from_slice(key);
    frame
}

#[test]
fn rss_stays_within_the_budget_under_a_binary_client_that_never_reads() {
    let budget = 64 * MIB;
    let server = Server::start(budget);
    store_items(&server);
    let (baseline, _) = server.rss();
    // The same attack in binary frames: 64 rounds of GETQ of every 1 MiB item, never read.
    let round: Vec<u8> = (0..ITEMS)
        .flat_map(|i| binary_getq(format!("big{i}").as_bytes()))
        .collect();
    let mut attacker = server.client();
    attacker.write_all(&round.repeat(64)).unwrap();
    let peak = watch(&server, Duration::from_secs(5));
    let (used, budget_peak) = budget_stats(&server);
    println!(
        "never-reading binary client: baseline RSS {} MiB, peak RSS (VmHWM) {} MiB, \
         budget {} MiB, budget peak {} MiB, used now {} MiB",
        baseline / MIB,
        peak / MIB,
        budget / MIB,
        budget_peak / MIB,
        used / MIB
    );
    assert!(budget_peak <= budget, "budget peak {budget_peak}");
    assert!(
        budget_peak >= budget / 8,
        "the attack never reached its share"
    );
    assert!(
        peak <= baseline + budget + FIXED_OVERHEAD_BYTES,
        "peak RSS {peak} over baseline {baseline} + budget + overhead"
    );
    drop(attacker);
}
