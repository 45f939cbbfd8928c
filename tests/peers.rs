//! Replicas as one cache: three replicas on one bucket of a real S3 server on loopback, each
//! telling the others what it wrote, over peer listeners on loopback.
//!
//! Each replica serves an entry for 1 s (`revalidate_after_ms`) unless every peer is heard
//! from, and then for 60 s (`peer_revalidate_after_ms`): a change through one replica that
//! another sees well within a second was announced, not found by revalidating.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{unique_prefix, Backend, Client, TestServer};
use futures::{SinkExt, StreamExt};
use s3cached::peers::wire;
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const SHORT_MS: u64 = 1000;
const LONG_MS: u64 = 60_000;
const SECRET: &str = "s3cret";

/// Three replicas on one prefix, each linked to the other two, every peer heard.
async fn three(name: &str) -> Vec<TestServer> {
    let prefix = unique_prefix(name);
    let extra = format!(
        "revalidate_after_ms = {SHORT_MS}\npeer_revalidate_after_ms = {LONG_MS}\n\
         peer_listen = \"127.0.0.1:0\"\npeer_secret = \"{SECRET}\"\n"
    );
    let mut servers = Vec::new();
    for _ in 0..3 {
        let dir = tempfile::tempdir().unwrap();
        let config = common::config(Backend::S3, &prefix, dir.path(), &extra);
        // Boxed: three servers' start futures inline overflow a test thread's stack.
        servers.push(Box::pin(TestServer::start_config(config, dir)).await);
    }
    for i in 0..3 {
        let others: Vec<SocketAddr> = (0..3)
            .filter(|j| *j != i)
            .map(|j| peer_addr(&servers[j]))
            .collect();
        link(&servers[i], &others);
    }
    for server in &servers {
        await_stat(&mut server.client().await, "tier_window_ms", LONG_MS).await;
    }
    servers
}

fn peer_addr(server: &TestServer) -> SocketAddr {
    let peers = server.app.peers.as_ref().expect("peers on");
    peers.listening().expect("a peer listener")
}

/// Links `server` to exactly `addrs` (what resolving its `peers` names would give).
fn link(server: &TestServer, addrs: &[SocketAddr]) {
    server.app.peers.as_ref().unwrap().set_addresses(addrs);
}

/// Waits (at most 10 s) until `stat` is `want`.
async fn await_stat(c: &mut Client, stat: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = c.stat(stat).await;
        if now == want {
            return;
        }
        assert!(Instant::now() < deadline, "{stat} stayed {now}, not {want}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `key` through `c` until it is `want`; returns how long that took after `since`,
/// failing past `within`. Anything else read meanwhile must be `old`.
async fn seen(
    c: &mut Client,
    key: &str,
    want: Option<&str>,
    old: Option<&str>,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        let value = c.get_value(key).await;
        if value.as_deref() == want {
            return since.elapsed();
        }
        assert_eq!(value.as_deref(), old, "only the old or the new value");
        assert!(
            since.elapsed() < within,
            "{key}: still {old:?} after {:?}",
            since.elapsed()
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_write_through_one_replica_is_seen_through_the_others_at_once() {
    if !common::have_s3() {
        return;
    }
    let servers = Box::pin(three("peers-write")).await;
    let mut c: Vec<Client> = Vec::new();
    for server in &servers {
        c.push(server.client().await);
    }
    // B and C hold k in RAM, for the long window.
    c[0].roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n")
        .await;
    for other in &mut c[1..] {
        assert_eq!(other.get_value("k").await.as_deref(), Some("v1"));
    }
    let hits = c[1].stat("tier_hits").await;
    assert_eq!(c[1].get_value("k").await.as_deref(), Some("v1"));
    assert_eq!(c[1].stat("tier_hits").await, hits + 1, "served from RAM");
    // A write through A: announced, so B and C drop k well within the short window.
    let within = Duration::from_millis(SHORT_MS / 2);
    c[0].roundtrip(b"set k 0 0 2\r\nv2\r\n", b"STORED\r\n")
        .await;
    let written = Instant::now();
    let took = seen(&mut c[1], "k", Some("v2"), Some("v1"), written, within).await;
    seen(&mut c[2], "k", Some("v2"), Some("v1"), written, within).await;
    println!("a write through A was read through B {took:?} after A acknowledged it");
    Box::pin(deletes_and_counters(&mut c)).await;
    Box::pin(flushes(&mut c)).await;
}

// The test above goes on in parts, each boxed: one future with all of them needs more
// stack than a debug build's test thread has.

async fn deletes_and_counters(c: &mut [Client]) {
    let within = Duration::from_millis(SHORT_MS / 2);
    // A delete, and an incr, the same way.
    c[0].roundtrip(b"delete k\r\n", b"DELETED\r\n").await;
    let deleted = Instant::now();
    seen(&mut c[1], "k", None, Some("v2"), deleted, within).await;
    c[1].roundtrip(b"set n 0 0 1\r\n5\r\n", b"STORED\r\n").await;
    assert_eq!(c[2].get_value("n").await.as_deref(), Some("5"));
    assert_eq!(c[0].line(b"incr n 1\r\n").await, "6\r\n");
    let counted = Instant::now();
    seen(&mut c[2], "n", Some("6"), Some("5"), counted, within).await;
}

async fn flushes(c: &mut [Client]) {
    let within = Duration::from_millis(SHORT_MS / 2);
    // flush_all through A: hidden on B and C.
    c[0].roundtrip(b"set f 0 0 1\r\nx\r\n", b"STORED\r\n").await;
    for other in &mut c[1..] {
        assert_eq!(other.get_value("f").await.as_deref(), Some("x"));
    }
    c[0].roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    let flushed = Instant::now();
    for other in &mut c[1..] {
        seen(other, "f", None, Some("x"), flushed, within).await;
    }
    // Counted on both sides; each peer listed.
    assert!(c[0].stat("peer_invalidations_sent").await >= 2 * 4);
    assert!(c[1].stat("peer_invalidations_applied").await >= 3);
    assert_eq!(c[1].stat("peer_invalidations_dropped").await, 0);
    c[1].send(b"stats peers\r\n").await;
    let rows = String::from_utf8(c[1].read_until(b"END\r\n").await).unwrap();
    assert_eq!(rows.matches(" up\r\n").count(), 2, "{rows}");
}

#[tokio::test]
async fn a_replica_cut_off_from_a_peer_is_stale_for_the_short_window_at_most() {
    if !common::have_s3() {
        return;
    }
    let servers = Box::pin(three("peers-cut")).await;
    let (mut a, mut b) = (servers[0].client().await, servers[1].client().await);
    a.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    // A stops talking to B: B no longer hears every peer, and falls back to the short
    // window (its own links are still up).
    let c_addr = peer_addr(&servers[2]);
    link(&servers[0], &[c_addr]);
    await_stat(&mut b, "tier_window_ms", SHORT_MS).await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    a.roundtrip(b"set k 0 0 2\r\nv2\r\n", b"STORED\r\n").await;
    let written = Instant::now();
    // Not announced to B: found by revalidating, within the short window.
    let short = Duration::from_millis(SHORT_MS) + Duration::from_secs(2);
    let took = seen(&mut b, "k", Some("v2"), Some("v1"), written, short).await;
    println!("cut off, B read A's write {took:?} after it");
    // The link back: B hears A again, revalidates what it holds once, and is back on the
    // long window with announcements.
    link(&servers[0], &[peer_addr(&servers[1]), c_addr]);
    await_stat(&mut b, "tier_window_ms", LONG_MS).await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v2"));
    a.roundtrip(b"set k 0 0 2\r\nv3\r\n", b"STORED\r\n").await;
    let within = Duration::from_millis(SHORT_MS / 2);
    seen(&mut b, "k", Some("v3"), Some("v2"), Instant::now(), within).await;
}

#[tokio::test]
async fn batches_without_the_shared_secret_are_refused() {
    if !common::have_s3() {
        return;
    }
    let servers = Box::pin(three("peers-secret")).await;
    let mut b = servers[1].client().await;
    b.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    let change = wire::Change::Item {
        key: bytes::Bytes::from_static(b"k"),
        write: None,
    };
    for secret in [Some(&b"wrong"[..]), None] {
        let stream = tokio::net::TcpStream::connect(peer_addr(&servers[1]))
            .await
            .unwrap();
        let mut conn = Framed::new(stream, LengthDelimitedCodec::new());
        let hello = conn.next().await.unwrap().unwrap();
        assert!(wire::decode_hello(&hello).is_ok());
        let forged = wire::encode_batch(1, 1, std::slice::from_ref(&change), secret);
        conn.send(forged).await.unwrap();
        assert!(conn.next().await.is_none(), "closed, not acknowledged");
    }
    assert_eq!(b.stat("peer_invalidations_dropped").await, 2);
    assert_eq!(b.stat("peer_invalidations_applied").await, 0);
    let hits = b.stat("tier_hits").await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    assert_eq!(b.stat("tier_hits").await, hits + 1, "still in RAM");
    // Signed with the secret, the same batch drops k.
    let stream = tokio::net::TcpStream::connect(peer_addr(&servers[1]))
        .await
        .unwrap();
    let mut conn = Framed::new(stream, LengthDelimitedCodec::new());
    conn.next().await.unwrap().unwrap();
    let signed = wire::encode_batch(1, 1, &[change], Some(SECRET.as_bytes()));
    conn.send(signed).await.unwrap();
    let ack = conn.next().await.unwrap().unwrap();
    assert_eq!(wire::decode_ack(&ack), Ok(1));
    assert_eq!(b.stat("peer_invalidations_applied").await, 1);
}

#[test]
fn a_peer_listener_needs_a_bucket_and_beyond_loopback_a_secret() {
    let bucket = "storage_bucket_name = \"b\"\n";
    let open =
        s3cached::config::Config::from_toml(&format!("{bucket}peer_listen = \"0.0.0.0:11212\"\n"));
    let err = open.expect_err("refused").to_string();
    assert!(err.contains("peer_secret"), "{err}");
    let signed = "peer_listen = \"0.0.0.0:11212\"\npeer_secret = \"x\"\n";
    assert!(s3cached::config::Config::from_toml(&format!("{bucket}{signed}")).is_ok());
    let bad = format!("{bucket}peers = \"host-without-port\"\n");
    assert!(s3cached::config::Config::from_toml(&bad).is_err());
    // The directory store has one server: no peers.
    let err = s3cached::config::Config::from_toml(signed).expect_err("refused");
    assert!(err.to_string().contains("bucket"), "{err}");
}

#[tokio::test]
async fn a_skipped_batch_makes_every_entry_revalidate_once() {
    if !common::have_s3() {
        return;
    }
    let servers = Box::pin(three("peers-gap")).await;
    let mut b = servers[1].client().await;
    b.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    let revalidations = b.stat("backend_revalidations").await;
    // A sender whose batch 2 never arrived: 1, then 3.
    let stream = tokio::net::TcpStream::connect(peer_addr(&servers[1]))
        .await
        .unwrap();
    let mut conn = Framed::new(stream, LengthDelimitedCodec::new());
    conn.next().await.unwrap().unwrap();
    for seq in [1, 3] {
        let change = wire::Change::Item {
            key: bytes::Bytes::from(format!("other{seq}")),
            write: None,
        };
        let batch = wire::encode_batch(77, seq, &[change], Some(SECRET.as_bytes()));
        conn.send(batch).await.unwrap();
        let ack = conn.next().await.unwrap().unwrap();
        assert_eq!(wire::decode_ack(&ack), Ok(seq));
    }
    // k was not named, yet it may have been in batch 2: it is checked with the store once.
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    assert_eq!(b.get_value("k").await.as_deref(), Some("v1"));
    assert_eq!(b.stat("backend_revalidations").await, revalidations + 1);
}

#[tokio::test]
async fn a_replica_alone_on_its_bucket_never_revalidates() {
    if !common::have_s3() {
        return;
    }
    let window = Duration::from_millis(50);
    let extra = format!(
        "peers = \"none\"\nrevalidate_after_ms = {}\n",
        window.as_millis()
    );
    let server = TestServer::start(Backend::S3, "peers-alone", &extra).await;
    let mut c = server.client().await;
    let authoritative = s3cached::tier::AUTHORITATIVE.as_millis() as u64;
    assert_eq!(c.stat("tier_window_ms").await, authoritative);
    c.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    // Past the configured window, which a replica alone does not need.
    tokio::time::sleep(2 * window).await;
    assert_eq!(c.get_value("k").await.as_deref(), Some("v1"));
    assert_eq!(c.stat("backend_revalidations").await, 0);
    assert_eq!(c.stat("backend_gets").await, 0, "answered from RAM");
}
