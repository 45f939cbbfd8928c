//! The near tier against a real S3-compatible server: what reads cost, single flight, and the
//! coherence statements of docs/design.md ("Tiers and their promises") with two replicas sharing one bucket and prefix.
//! S3 requests are counted where they arrive, at a proxy in front of the server.

mod common;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use common::proxy::{Mode, Proxy};
use common::{s3_endpoint, unique_prefix, Backend, Client, TestServer};
use tokio::time::Instant;

/// Long enough that no revalidation or flush-epoch re-read happens during a test.
const LONG_WINDOW: &str = "revalidate_after_ms = 600000\n";

#[tokio::test]
async fn hits_cost_no_request_a_miss_one_and_a_revalidation_one() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let window = Duration::from_millis(2000);
    let extra = format!("revalidate_after_ms = {}\n", window.as_millis());
    let a = TestServer::behind(&proxy, &unique_prefix("cost"), &extra).await;
    let mut c = a.client().await;
    let mut keys = String::new();
    let mut sets = String::new();
    for i in 0..100 {
        sets.push_str(&format!("set k{i} 0 0 2\r\nv{}\r\n", i % 10));
        keys.push_str(&format!(" k{i}"));
    }
    c.roundtrip(sets.as_bytes(), "STORED\r\n".repeat(100).as_bytes())
        .await;
    // The background re-read of the flush epoch may land at any moment: count item requests.
    let epoch_reads = c.stat("backend_control_gets").await;
    proxy.reset_counters();
    c.send(format!("get{keys}\r\n").as_bytes()).await;
    let reply = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    assert_eq!(reply.matches("VALUE ").count(), 100);
    assert_eq!(c.get_value("k7").await.as_deref(), Some("v7"));
    let epoch_reads_now = c.stat("backend_control_gets").await;
    assert_eq!(
        proxy.requests.load(SeqCst) as u64 - (epoch_reads_now - epoch_reads),
        0,
        "keys just written are served from RAM"
    );
    assert_eq!(c.get_value("absent").await, None);
    let epoch_reads_after_miss = c.stat("backend_control_gets").await;
    assert_eq!(
        proxy.requests.load(SeqCst) as u64 - (epoch_reads_after_miss - epoch_reads),
        1,
        "a miss costs one GET"
    );

    // Past the window, a read revalidates: one conditional GET, answered 304.
    tokio::time::sleep(window).await;
    proxy.reset_counters();
    let unchanged_before = c.stat("tier_revalidated_unchanged").await;
    assert_eq!(c.get_value("k7").await.as_deref(), Some("v7"));
    let requests = proxy.requests.load(SeqCst);
    // The background flush-epoch re-read may also have landed in this interval.
    assert!(
        (1..=2).contains(&requests),
        "{requests} requests for one revalidation"
    );
    assert_eq!(
        c.stat("tier_revalidated_unchanged").await,
        unchanged_before + 1
    );
}

#[tokio::test]
async fn concurrent_reads_of_one_key_share_one_get() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let prefix = unique_prefix("flight");
    let writer = TestServer::behind(&proxy, &prefix, LONG_WINDOW).await;
    let reader = TestServer::behind(&proxy, &prefix, LONG_WINDOW).await;
    writer
        .client()
        .await
        .roundtrip(b"set hot 0 0 3\r\nabc\r\n", b"STORED\r\n")
        .await;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(reader.client().await);
    }
    // A slow backend, so the 16 reads surely overlap.
    proxy.set(Mode::Forward(Duration::from_millis(300)));
    proxy.reset_counters();
    let reads: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                c.roundtrip(b"get hot\r\n", b"VALUE hot 0 3\r\nabc\r\nEND\r\n")
                    .await
            })
        })
        .collect();
    for r in reads {
        r.await.unwrap();
    }
    assert_eq!(
        proxy.requests.load(SeqCst),
        1,
        "16 concurrent reads, one S3 GET"
    );
}

#[tokio::test]
async fn another_replicas_write_is_seen_within_one_window() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let prefix = unique_prefix("window");
    let window = Duration::from_millis(500);
    let extra = format!("revalidate_after_ms = {}\n", window.as_millis());
    let a = TestServer::behind(&proxy, &prefix, &extra).await;
    let b = TestServer::behind(&proxy, &prefix, &extra).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.roundtrip(b"set k 0 0 2\r\nv1\r\n", b"STORED\r\n").await;
    assert_eq!(cb.get_value("k").await.as_deref(), Some("v1"));
    ca.roundtrip(b"set k 0 0 2\r\nv2\r\n", b"STORED\r\n").await;
    let written = Instant::now();
    loop {
        let seen = cb.get_value("k").await;
        if seen.as_deref() == Some("v2") {
            break;
        }
        assert_eq!(seen.as_deref(), Some("v1"), "only the old or the new value");
        assert!(
            written.elapsed() <= window + Duration::from_secs(2),
            "B still serves v1 {:?} after A's write",
            written.elapsed()
        );
        tokio::task::yield_now().await;
    }
    // B served from RAM while its entry was fresh.
    assert!(cb.stat("tier_hits").await > 0);
    // A delete through A is seen by B the same way.
    ca.roundtrip(b"delete k\r\n", b"DELETED\r\n").await;
    let deleted = Instant::now();
    while cb.get_value("k").await.is_some() {
        assert!(deleted.elapsed() <= window + Duration::from_secs(2));
    }
}

#[tokio::test]
async fn atomic_commands_stay_exact_across_replicas_whatever_the_window() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let prefix = unique_prefix("atomic");
    let a = TestServer::behind(&proxy, &prefix, LONG_WINDOW).await;
    let b = TestServer::behind(&proxy, &prefix, LONG_WINDOW).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.roundtrip(b"set n 0 0 1\r\n0\r\n", b"STORED\r\n").await;
    // B holds n in RAM now; every increment below makes that copy stale.
    assert_eq!(cb.get_value("n").await.as_deref(), Some("0"));
    let mut tasks = Vec::new();
    for server in [a.addr, a.addr, b.addr, b.addr] {
        tasks.push(tokio::spawn(async move {
            let mut c = Client::connect(server).await;
            for _ in 0..25 {
                let line = c.line(b"incr n 1\r\n").await;
                assert!(line.trim().parse::<u64>().is_ok(), "{line}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    // incr by 0 reads through the conditional path: exact on either replica.
    assert_eq!(cb.line(b"incr n 0\r\n").await, "100\r\n");
    assert_eq!(ca.line(b"incr n 0\r\n").await, "100\r\n");

    // cas: A's unique wins once; the same unique through B, whose RAM still holds the item
    // as it was before A's cas, loses.
    ca.roundtrip(b"set c 0 0 1\r\nx\r\n", b"STORED\r\n").await;
    assert_eq!(cb.get_value("c").await.as_deref(), Some("x"));
    ca.send(b"gets c\r\n").await;
    let a_view = String::from_utf8(ca.read_until(b"END\r\n").await).unwrap();
    let cas: u64 = a_view.split_whitespace().nth(4).unwrap().parse().unwrap();
    ca.roundtrip(
        format!("cas c 0 0 1 {cas}\r\ny\r\n").as_bytes(),
        b"STORED\r\n",
    )
    .await;
    cb.roundtrip(
        format!("cas c 0 0 1 {cas}\r\nz\r\n").as_bytes(),
        b"EXISTS\r\n",
    )
    .await;
    // add through B of a key A created: refused, though B never read it.
    ca.roundtrip(b"set fresh 0 0 1\r\na\r\n", b"STORED\r\n")
        .await;
    cb.roundtrip(b"add fresh 0 0 1\r\nb\r\n", b"NOT_STORED\r\n")
        .await;
    // append through both lands both.
    cb.roundtrip(b"append fresh 0 0 1\r\nb\r\n", b"STORED\r\n")
        .await;
    ca.roundtrip(b"append fresh 0 0 1\r\nc\r\n", b"STORED\r\n")
        .await;
    assert_eq!(ca.get_value("fresh").await.as_deref(), Some("abc"));
}

#[tokio::test]
async fn a_flush_is_seen_at_once_here_and_within_a_window_elsewhere() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let prefix = unique_prefix("tierflush");
    let window = Duration::from_millis(500);
    let extra = format!("revalidate_after_ms = {}\n", window.as_millis());
    let a = TestServer::behind(&proxy, &prefix, &extra).await;
    let b = TestServer::behind(&proxy, &prefix, &extra).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    ca.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    assert_eq!(cb.get_value("k").await.as_deref(), Some("v"));
    ca.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    let flushed = Instant::now();
    assert_eq!(ca.get_value("k").await, None, "at once on A");
    while cb.get_value("k").await.is_some() {
        // The epoch is re-read once per window; a reading is used for at most two.
        assert!(
            flushed.elapsed() <= window * 2 + Duration::from_secs(2),
            "B serves a flushed item {:?} after the flush",
            flushed.elapsed()
        );
    }
}

/// The directory store is written by this process alone (its directory is locked), so the
/// near tier is authoritative there: an entry or a remembered miss, however old, is served
/// with no store read. A second server on the same directory is refused, and strict mode
/// (a window of 0) still reads the store every time.
#[tokio::test]
async fn on_the_directory_store_the_tier_is_authoritative() {
    let a = TestServer::start(Backend::Dir, "authoritative", "revalidate_after_ms = 1\n").await;
    let mut c = a.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    assert_eq!(c.get_value("absent").await, None);
    assert_eq!(
        c.stat("backend_gets").await,
        1,
        "the first miss reads the store"
    );
    // Twenty windows of 1 ms: on any other store every entry would be stale by now.
    tokio::time::sleep(Duration::from_millis(20)).await;
    for _ in 0..3 {
        assert_eq!(c.get_value("k").await.as_deref(), Some("v"));
        assert_eq!(c.get_value("absent").await, None);
    }
    assert_eq!(c.stat("backend_revalidations").await, 0);
    assert_eq!(c.stat("backend_gets").await, 1);
    assert_eq!(c.stat("tier_hits").await, 6);

    match s3cached::app::start(a.config.clone()).await {
        Ok(_) => panic!("a second server started on a locked directory"),
        Err(e) => assert!(e.to_string().contains("another s3cached"), "{e}"),
    }

    let strict = TestServer::start(Backend::Dir, "strict-dir", "revalidate_after_ms = 0\n").await;
    let mut c = strict.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    for _ in 0..3 {
        assert_eq!(c.get_value("k").await.as_deref(), Some("v"));
    }
    let reads = c.stat("backend_gets").await + c.stat("backend_revalidations").await;
    assert_eq!(reads, 3, "strict mode reads the store for every get");
}

#[tokio::test]
async fn strict_mode_reads_are_never_stale() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let prefix = unique_prefix("strict");
    let strict = "revalidate_after_ms = 0\n";
    let a = TestServer::behind(&proxy, &prefix, strict).await;
    let b = TestServer::behind(&proxy, &prefix, strict).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    for i in 0..5 {
        ca.roundtrip(format!("set k 0 0 2\r\nv{i}\r\n").as_bytes(), b"STORED\r\n")
            .await;
        assert_eq!(
            cb.get_value("k").await.as_deref(),
            Some(format!("v{i}").as_str())
        );
    }
    ca.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    assert_eq!(cb.get_value("k").await, None);
}

#[tokio::test]
async fn the_tier_holds_no_more_than_its_bytes() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let bound: u64 = 1024 * 1024;
    let extra = format!("ram_cache_bytes = {bound}\n{LONG_WINDOW}");
    let a = TestServer::behind(&proxy, &unique_prefix("bound"), &extra).await;
    let mut c = a.client().await;
    let value = "x".repeat(64 * 1024);
    for i in 0..48 {
        c.roundtrip(
            format!("set big{i} 0 0 {}\r\n{value}\r\n", value.len()).as_bytes(),
            b"STORED\r\n",
        )
        .await;
    }
    let bytes = c.stat("tier_bytes").await;
    let items = c.stat("tier_items").await;
    assert!(bytes <= bound, "{bytes} bytes in a {bound}-byte tier");
    assert!(items < 48 && items > 0, "{items} items");
    // Evicted from RAM is not evicted from the cache: the store still answers.
    assert_eq!(
        c.get_value("big0").await.map(|v| v.len()),
        Some(value.len())
    );
}
