//! Hostile clients: the memory budget, the write and request timeouts, and
//! duplicate keys read once, against a server on 127.0.0.1:0 over the directory store.

mod common;

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::time::Instant;

use common::{Backend, Client, TestServer};
use tokio::io::AsyncReadExt;

const MIB: usize = 1024 * 1024;
/// A value just under the default 1 MiB item limit.
const BIG_VALUE_BYTES: usize = MIB - 1024;

/// Stores `count` distinct values of `BIG_VALUE_BYTES` as big0, big1, ...
async fn store_big_values(c: &mut Client, count: usize) {
    let value = vec![b'v'; BIG_VALUE_BYTES];
    for i in 0..count {
        let mut req = format!("set big{i} 0 0 {BIG_VALUE_BYTES}\r\n").into_bytes();
        req.extend_from_slice(&value);
        req.extend_from_slice(b"\r\n");
        c.roundtrip(&req, b"STORED\r\n").await;
    }
}

/// Reads until the server closes the connection; returns the bytes read.
async fn drain_to_eof(c: &mut Client) -> usize {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(30), c.stream.read(&mut buf))
            .await
            .expect("the server closes the connection");
        match read {
            Ok(0) | Err(_) => return total,
            Ok(n) => total += n,
        }
    }
}

/// Polls `done` until it holds; fails after `limit`.
async fn eventually(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_client_that_never_reads_stays_within_the_budget_and_is_closed_by_the_write_timeout() {
    let limit = 16 * MIB;
    // The RAM tier off: a reply from it is charged only what it takes, and the attack is to
    // reach the budget.
    let extra =
        format!("memory_limit_bytes = {limit}\nwrite_timeout_secs = 2\nram_cache_bytes = 0\n");
    let server = TestServer::start(Backend::Dir, "neverreads", &extra).await;
    let stats = server.app.ctx.stats.clone();
    let mut setup = server.client().await;
    store_big_values(&mut setup, 16).await;

    // The attack: many pipelined gets of distinct 1 MiB items; never a byte read back.
    let mut attacker = server.client().await;
    let line: String = (0..16).map(|i| format!(" big{i}")).collect();
    let mut pipeline = Vec::new();
    for _ in 0..64 {
        pipeline.extend_from_slice(format!("get{line}\r\n").as_bytes());
    }
    attacker.send(&pipeline).await;

    // Other clients are served meanwhile, each reply promptly.
    let mut other = server.client().await;
    for i in 0..20 {
        let started = Instant::now();
        other
            .roundtrip(
                format!("set small{i} 0 0 2\r\nok\r\nget small{i}\r\n").as_bytes(),
                format!("STORED\r\nVALUE small{i} 0 2\r\nok\r\nEND\r\n").as_bytes(),
            )
            .await;
        assert!(started.elapsed() < Duration::from_secs(5), "slow reply");
    }
    eventually(Duration::from_secs(30), "the write timeout", || {
        stats.write_timeouts.load(Relaxed) >= 1
    })
    .await;
    let peak = stats.memory_peak_bytes.load(Relaxed) as usize;
    assert!(peak <= limit, "peak {peak} over the budget");
    assert!(
        peak >= 4 * MIB,
        "peak {peak}: the attack never reached the budget"
    );
    println!("never-reading client: memory_peak_bytes {peak} with a budget of {limit}");
    // The attacker is gone (what it reads ends) and all it held is given back.
    let drained = drain_to_eof(&mut attacker).await;
    assert!(drained < 64 * 16 * BIG_VALUE_BYTES, "it was not cut short");
    eventually(Duration::from_secs(10), "memory given back", || {
        stats.memory_used_bytes.load(Relaxed) <= 128 * 1024
    })
    .await;
    other
        .roundtrip(b"get small0\r\n", b"VALUE small0 0 2\r\nok\r\nEND\r\n")
        .await;
}

#[tokio::test]
async fn a_large_reply_is_given_back_once_written() {
    let server = TestServer::start(Backend::Dir, "shrink", "").await;
    let stats = server.app.ctx.stats.clone();
    let mut c = server.client().await;
    store_big_values(&mut c, 4).await;
    let idle = stats.memory_used_bytes.load(Relaxed);
    c.send(b"get big0 big1 big2 big3\r\n").await;
    let reply = c.read_until(b"END\r\n").await;
    assert!(reply.len() > 4 * BIG_VALUE_BYTES);
    assert!(stats.memory_peak_bytes.load(Relaxed) as usize >= 4 * BIG_VALUE_BYTES);
    // The connection stays open; its write buffer is back to its small size.
    eventually(
        Duration::from_secs(10),
        "the write buffer to shrink",
        || stats.memory_used_bytes.load(Relaxed) <= idle + 64 * 1024,
    )
    .await;
    c.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
        .await;
}

#[tokio::test]
async fn a_client_trickling_a_request_is_closed_by_the_request_timeout() {
    let server = TestServer::start(Backend::Dir, "trickle", "request_timeout_secs = 1\n").await;
    let stats = server.app.ctx.stats.clone();
    // Complete requests, however slow, are progress: this client is never closed.
    let mut slow = server.client().await;
    // One byte every 200 ms of a request that never ends.
    let mut trickler = server.client().await;
    let started = Instant::now();
    let mut closed = false;
    for byte in b"get ".iter().chain(std::iter::repeat(&b'k')).take(40) {
        if trickler.stream.try_write(&[*byte]).is_err() {
            closed = true;
            break;
        }
        slow.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
            .await;
        let mut buf = [0u8; 16];
        let read =
            tokio::time::timeout(Duration::from_millis(200), trickler.stream.read(&mut buf)).await;
        if matches!(read, Ok(Ok(0)) | Ok(Err(_))) {
            closed = true;
            break;
        }
    }
    assert!(closed, "the trickling client was never closed");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}"
    );
    assert_eq!(stats.request_timeouts.load(Relaxed), 1);
    slow.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
        .await;
}

#[tokio::test]
async fn duplicate_keys_in_one_get_are_read_once() {
    // Strict mode: without the near tier every key asked is a backend read.
    let server = TestServer::start(Backend::Dir, "dupkeys", "revalidate_after_ms = 0\n").await;
    let stats = server.app.ctx.stats.clone();
    let mut c = server.client().await;
    c.roundtrip(
        b"set a 0 0 1\r\n1\r\nset b 0 0 1\r\n2\r\n",
        b"STORED\r\nSTORED\r\n",
    )
    .await;
    let reads = || stats.backend_gets.load(Relaxed) + stats.backend_revalidations.load(Relaxed);
    let (before, hits) = (reads(), stats.get_hits.load(Relaxed));
    c.roundtrip(
        b"get a a b a b\r\n",
        b"VALUE a 0 1\r\n1\r\nVALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\n\
          VALUE a 0 1\r\n1\r\nVALUE b 0 1\r\n2\r\nEND\r\n",
    )
    .await;
    assert_eq!(reads() - before, 2, "a and b, once each");
    assert_eq!(
        stats.get_hits.load(Relaxed) - hits,
        5,
        "counted as memcached counts"
    );
}

/// A binary NOOP frame with `opaque`, and the reply to it.
fn binary_noop(opaque: u8) -> ([u8; 24], [u8; 24]) {
    let mut request = [0u8; 24];
    request[0] = 0x80;
    request[1] = 0x0a;
    request[15] = opaque;
    let mut reply = request;
    reply[0] = 0x81;
    (request, reply)
}

#[tokio::test]
async fn binary_connections_obey_the_request_and_idle_timeouts() {
    let extra = "request_timeout_secs = 1\nidle_timeout_secs = 1\n";
    let server = TestServer::start(Backend::Dir, "binary-timeouts", extra).await;
    let stats = server.app.ctx.stats.clone();
    // A client completing frames, however slowly, makes progress: split across writes so a
    // partial frame is always waiting, 12 frames over 2.4 s are served in full.
    let mut steady = server.client().await;
    let frames: Vec<_> = (0..12).map(binary_noop).collect();
    steady.send(&frames[0].0[..12]).await;
    for (i, (request, reply)) in frames.iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut send = request[12..].to_vec();
        if let Some((next, _)) = frames.get(i + 1) {
            send.extend_from_slice(&next[..12]);
        }
        steady.roundtrip(&send, reply).await;
    }
    assert_eq!(stats.request_timeouts.load(Relaxed), 0);
    drop(steady);
    // A frame that never completes is closed within the request timeout.
    let mut trickler = server.client().await;
    let started = Instant::now();
    trickler.send(&frames[0].0[..12]).await;
    assert!(
        trickler.closed().await,
        "the stalled frame's client stays open"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(900),
        "closed after {elapsed:?}"
    );
    assert_eq!(stats.request_timeouts.load(Relaxed), 1);
    // With nothing to do after its reply, a client is closed by the idle timeout.
    let mut idle = server.client().await;
    let kicks = stats.idle_kicks.load(Relaxed);
    idle.roundtrip(&frames[1].0, &frames[1].1).await;
    assert!(idle.closed().await, "an idle binary connection stays open");
    assert_eq!(stats.idle_kicks.load(Relaxed), kicks + 1);
}
