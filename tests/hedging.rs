//! Hedged reads against a real S3-compatible server, behind a proxy that makes chosen
//! requests slow: a slow GET is sent again and the first answer wins, the loser is
//! cancelled, writes are never sent twice, and hedging can be turned off.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::proxy::{Mode, Proxy};
use common::{s3_endpoint, unique_prefix, TestServer};
use tokio::time::Instant;

/// No RAM tier, so every get asks S3; hedges after at most 100 ms (too few GETs are known
/// for the percentile), as often as GETs are slow.
const HEDGE_EVERY_SLOW_GET: &str =
    "ram_cache_bytes = 0\ns3_hedge_percent = 100\ns3_hedge_min_ms = 50\ns3_hedge_max_ms = 100\n";

/// What a GET stalled behind the proxy waits: far past any hedge delay.
const STALL: Duration = Duration::from_secs(5);

async fn server(proxy: &Proxy, extra: &str) -> TestServer {
    TestServer::behind(proxy, &unique_prefix("hedge"), extra).await
}

/// Waits (at most 5 s) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Stalls the next `stalled` GETs behind the proxy, then gets `k` (holding "v1"), which
/// must answer within 2 s: the stalled GETs were hedged.
async fn get_past_stalled_gets(proxy: &Proxy, c: &mut common::Client, stalled: usize) {
    proxy.set(Mode::DelayNext {
        method: "GET",
        requests: stalled,
        delay: STALL,
    });
    let asked = Instant::now();
    assert_eq!(c.get_value("k").await.as_deref(), Some("v1"));
    let took = asked.elapsed();
    assert!(took < Duration::from_secs(2), "the get took {took:?}");
}

#[tokio::test]
async fn a_stalled_get_is_hedged_and_the_loser_cancelled() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server(&proxy, HEDGE_EVERY_SLOW_GET).await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    get_past_stalled_gets(&proxy, &mut c, 1).await;
    assert_eq!(c.stat("s3_hedged_gets").await, 1);
    assert_eq!(c.stat("s3_hedge_wins").await, 1);
    // The first GET's connection is closed: S3 stops sending it.
    eventually("the stalled GET is abandoned", || {
        proxy.abandoned.load(SeqCst) == 1
    })
    .await;
    // A revalidation-style miss is hedged the same way: a GET of a missing key.
    proxy.set(Mode::DelayNext {
        method: "GET",
        requests: 1,
        delay: STALL,
    });
    assert_eq!(c.get_value("absent").await, None);
    assert_eq!(c.stat("s3_hedged_gets").await, 2);
}

#[tokio::test]
async fn writes_are_never_hedged() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server(&proxy, HEDGE_EVERY_SLOW_GET).await;
    let mut c = server.client().await;
    c.roundtrip(b"set n 0 0 1\r\n1\r\n", b"STORED\r\n").await;
    for (command, want) in [
        (&b"set k 0 0 2\r\nv1\r\n"[..], &b"STORED\r\n"[..]),
        (b"incr n 1\r\n", b"2\r\n"),
        (b"delete k\r\n", b"DELETED\r\n"),
    ] {
        let method = if command.starts_with(b"delete") {
            "DELETE"
        } else {
            "PUT"
        };
        // Slower than the hedge delay, well within the attempt's deadline.
        proxy.set(Mode::DelayNext {
            method,
            requests: 1,
            delay: Duration::from_millis(400),
        });
        let before = proxy.heads().len();
        c.roundtrip(command, want).await;
        let sent = proxy.heads()[before..]
            .iter()
            .filter(|h| h.starts_with(&format!("{method} ")))
            .count();
        assert_eq!(sent, 1, "{method} sent {sent} times for {command:?}");
    }
    assert_eq!(c.stat("s3_hedged_gets").await, 0);
    assert_eq!(c.get_value("n").await.as_deref(), Some("2"));
}

#[tokio::test]
async fn with_hedging_off_a_slow_get_waits() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server(&proxy, "ram_cache_bytes = 0\ns3_hedge_percent = 0\n").await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    let slow = Duration::from_millis(600);
    proxy.set(Mode::DelayNext {
        method: "GET",
        requests: 1,
        delay: slow,
    });
    let asked = Instant::now();
    assert_eq!(c.get_value("k").await.as_deref(), Some("v1"));
    assert!(asked.elapsed() >= slow);
    assert_eq!(c.stat("s3_hedged_gets").await, 0);
    assert_eq!(proxy.abandoned.load(SeqCst), 0);
}

#[tokio::test]
async fn a_stalled_flush_epoch_read_is_hedged_too() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // Strict: every get reads the flush epoch beside its item, and waits for both.
    let extra = format!("{HEDGE_EVERY_SLOW_GET}revalidate_after_ms = 0\n");
    let server = server(&proxy, &extra).await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    let before = proxy.heads().len();
    get_past_stalled_gets(&proxy, &mut c, 2).await;
    let epoch_reads = proxy.heads()[before..]
        .iter()
        .filter(|h| h.starts_with("GET ") && h.contains("flush"))
        .count();
    assert!(epoch_reads >= 2, "the epoch was read {epoch_reads} times");
    assert_eq!(c.stat("s3_hedged_gets").await, 2);
}
