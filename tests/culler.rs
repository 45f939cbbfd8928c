//! The culler and flush_all against a real S3-compatible server.
#![allow(
    clippy::disallowed_types,
    reason = "these tests run against a real S3 server, in wall-clock time"
)]

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{unique_prefix, Backend, TestServer};
use futures::stream::{self, StreamExt};
use s3cached::store::{Entry, PutMode, Store};

/// Writes `n` items straight into the store, many at once.
async fn fill(store: Arc<dyn Store>, n: usize) {
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64;
    stream::iter(0..n)
        .map(|i| {
            let store = store.clone();
            async move {
                let entry = Entry {
                    key: Bytes::from(format!("item-{i}")),
                    value: Bytes::from("v"),
                    cas: i as u64 + 1,
                    stored_at_us: now_us,
                    ..Entry::default()
                };
                // Setup, not the behaviour under test: an overwrite is idempotent, so a
                // write that timed out on a loaded machine is simply sent again.
                let mut attempt = 1;
                while let Err(e) = store.put(&entry, PutMode::Overwrite).await {
                    assert!(attempt < 5, "fill: {e:?} after {attempt} attempts");
                    attempt += 1;
                }
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<_>>()
        .await;
}

async fn count(store: &dyn Store) -> usize {
    let mut n = 0;
    let mut cursor = None;
    loop {
        let page = store.list(cursor, 1000).await.unwrap();
        n += page.objects.len();
        match page.next {
            Some(next) => cursor = Some(next),
            None => return n,
        }
    }
}

async fn server_sharing(prefix: &str, extra: &str) -> TestServer {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(Backend::S3, prefix, dir.path(), extra);
    TestServer::start_config(config, dir).await
}

const CULL_300: &str = "max_entries = 300\ncull_frequency = 3\ncull_interval_secs = 3600\n";

#[tokio::test]
async fn a_thousand_keys_converge_under_max_entries() {
    if !common::have_s3() {
        return;
    }
    let server = TestServer::start(Backend::S3, "converge", CULL_300).await;
    let mut c = server.client().await;
    let mut sets = Vec::new();
    for i in 0..1000 {
        sets.extend_from_slice(format!("set key{i} 0 0 1 noreply\r\nv\r\n").as_bytes());
    }
    c.send(&sets).await;
    c.roundtrip(b"mn\r\n", b"MN\r\n").await;
    // The writes woke the culler (its interval is an hour): wait for it to finish.
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut remaining = count(&*server.store()).await;
    while remaining > 300 && Instant::now() < deadline {
        let report = server.app.culler.pass().await.unwrap();
        remaining = report.remaining as usize;
    }
    assert!(remaining <= 300, "{remaining} items left");
    // Never more than asked: a pass at n >= 300 leaves at least 2n/3 >= 200.
    assert!(remaining >= 200, "over-culled to {remaining}");
    assert_eq!(count(&*server.store()).await, remaining);
    c.send(b"stats\r\n").await;
    let all = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    assert!(!all.contains("STAT cull_passes 0\r\n"), "{all}");
    assert!(!all.contains("STAT evictions 0\r\n"));
}

#[tokio::test]
async fn cull_frequency_zero_removes_everything() {
    if !common::have_s3() {
        return;
    }
    let server = TestServer::start(
        Backend::S3,
        "cullall",
        "max_entries = 50\ncull_frequency = 0\ncull_interval_secs = 3600\n",
    )
    .await;
    fill(server.store(), 60).await;
    let report = server.app.culler.pass().await.unwrap();
    assert_eq!((report.culled, report.remaining), (60, 0));
    assert_eq!(count(&*server.store()).await, 0);
}

#[tokio::test]
async fn two_replicas_culling_at_once_do_not_over_cull() {
    if !common::have_s3() {
        return;
    }
    let prefix = unique_prefix("twocull");
    let a = server_sharing(&prefix, CULL_300).await;
    let b = server_sharing(&prefix, CULL_300).await;
    fill(a.store(), 450).await;
    let (ra, rb) = tokio::join!(a.app.culler.pass(), b.app.culler.pass());
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(
        ra.skipped != rb.skipped,
        "exactly one replica holds the lease: {ra:?} {rb:?}"
    );
    assert_eq!(ra.culled + rb.culled, 150);
    assert_eq!(count(&*a.store()).await, 300);
}

#[tokio::test]
async fn flush_all_over_ten_thousand_objects() {
    if !common::have_s3() {
        return;
    }
    let prefix = unique_prefix("flush10k");
    // Strict mode: B sees A's flush at once (tests/tier.rs covers the default window).
    let a = server_sharing(&prefix, "revalidate_after_ms = 0\n").await;
    let b = server_sharing(&prefix, "revalidate_after_ms = 0\n").await;
    let fill_started = Instant::now();
    fill(a.store(), 10_000).await;
    eprintln!("filled 10,000 objects in {:?}", fill_started.elapsed());
    let mut ca = a.client().await;
    let mut cb = b.client().await;
    ca.roundtrip(
        b"get item-1 item-9999\r\n",
        b"VALUE item-1 0 1\r\nv\r\nVALUE item-9999 0 1\r\nv\r\nEND\r\n",
    )
    .await;
    let started = Instant::now();
    ca.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    eprintln!(
        "flush_all over 10,000 objects answered in {:?}",
        started.elapsed()
    );
    let keys: Vec<String> = (0..10_000)
        .step_by(97)
        .map(|i| format!("item-{i}"))
        .collect();
    let get = format!("get {}\r\n", keys.join(" "));
    ca.roundtrip(get.as_bytes(), b"END\r\n").await;
    cb.roundtrip(get.as_bytes(), b"END\r\n").await;
    ca.roundtrip(b"set fresh 0 0 1\r\nf\r\n", b"STORED\r\n")
        .await;
    cb.roundtrip(b"get fresh\r\n", b"VALUE fresh 0 1\r\nf\r\nEND\r\n")
        .await;
    // The objects themselves go in the background.
    let pass_started = Instant::now();
    let report = a.app.culler.pass().await.unwrap();
    eprintln!(
        "cull pass removing flushed objects: {:?}, {} S3 requests, report {report:?}",
        pass_started.elapsed(),
        report.requests
    );
    assert_eq!(report.flushed_removed, 10_000);
    assert_eq!(count(&*a.store()).await, 1);
}

#[tokio::test]
async fn flush_all_with_a_delay() {
    if !common::have_s3() {
        return;
    }
    let server = TestServer::start(Backend::S3, "flushdelay", "").await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\nflush_all 2\r\n", b"STORED\r\nOK\r\n")
        .await;
    c.roundtrip(b"get k\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n")
        .await;
    c.roundtrip(b"set k2 0 0 1\r\nw\r\n", b"STORED\r\n").await;
    // Items stored before the flush moment, including k2, disappear when it comes.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        c.send(b"get k k2\r\n").await;
        let reply = c.read_until(b"END\r\n").await;
        if reply == b"END\r\n" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flush with delay never took effect"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.roundtrip(
        b"set k3 0 0 1\r\nx\r\nget k3\r\n",
        b"STORED\r\nVALUE k3 0 1\r\nx\r\nEND\r\n",
    )
    .await;
}

/// How far apart in time two replicas may disagree on a flush moment: each measures the
/// store's `Date` (whole seconds: ±0.5 s after one answer, less after more) plus half a
/// round trip.
const STORE_TIME_BOUND: Duration = Duration::from_millis(1200);

/// Sends `request` until the reply is `expect`, for at most `within`.
async fn within(c: &mut common::Client, within: Duration, request: &[u8], expect: &[u8]) {
    let deadline = Instant::now() + within;
    loop {
        c.send(request).await;
        let reply = c.read_until(b"END\r\n").await;
        if reply == expect {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{:?} still answers {:?}",
            String::from_utf8_lossy(request),
            String::from_utf8_lossy(&reply)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn flush_all_holds_across_replicas_with_skewed_clocks() {
    if !common::have_s3() {
        return;
    }
    let prefix = unique_prefix("skew");
    // Strict mode, so the only delay in seeing a flush is the clocks' disagreement.
    let strict = "revalidate_after_ms = 0\n";
    let a = server_sharing(&prefix, strict).await;
    // Replicas whose clocks are 30 s slow and 30 s fast.
    let slow = server_sharing(&prefix, &format!("{strict}clock_offset_ms = -30000\n")).await;
    let fast = server_sharing(&prefix, &format!("{strict}clock_offset_ms = 30000\n")).await;
    let (mut ca, mut cs, mut cf) = (a.client().await, slow.client().await, fast.client().await);

    // A flush through the slow replica hides what was stored before it, everywhere (by its
    // own clock, the flush moment would be 30 s ago and hide nothing).
    // (Items written within the bound of a flush on another replica may fall either side.)
    ca.roundtrip(b"set k1 0 0 1\r\n1\r\n", b"STORED\r\n").await;
    tokio::time::sleep(STORE_TIME_BOUND).await;
    cs.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    for c in [&mut ca, &mut cs, &mut cf] {
        within(c, STORE_TIME_BOUND, b"get k1\r\n", b"END\r\n").await;
    }

    // What is stored after the flush (beyond the bound) is seen everywhere, whoever wrote it.
    tokio::time::sleep(STORE_TIME_BOUND).await;
    ca.roundtrip(b"set k2 0 0 1\r\n2\r\n", b"STORED\r\n").await;
    cs.roundtrip(b"set k3 0 0 1\r\n3\r\n", b"STORED\r\n").await;
    cf.roundtrip(b"set k4 0 0 1\r\n4\r\n", b"STORED\r\n").await;
    let all = b"VALUE k2 0 1\r\n2\r\nVALUE k3 0 1\r\n3\r\nVALUE k4 0 1\r\n4\r\nEND\r\n";
    for c in [&mut ca, &mut cs, &mut cf] {
        c.roundtrip(b"get k2 k3 k4\r\n", all).await;
    }

    // A flush through the fast replica takes effect now everywhere, not 30 s from now.
    tokio::time::sleep(STORE_TIME_BOUND).await;
    cf.roundtrip(b"flush_all\r\n", b"OK\r\n").await;
    for c in [&mut ca, &mut cs, &mut cf] {
        within(c, STORE_TIME_BOUND, b"get k2 k3 k4\r\n", b"END\r\n").await;
    }
    tokio::time::sleep(STORE_TIME_BOUND).await;
    cs.roundtrip(b"set k5 0 0 1\r\n5\r\n", b"STORED\r\n").await;
    for c in [&mut ca, &mut cs, &mut cf] {
        c.roundtrip(b"get k5\r\n", b"VALUE k5 0 1\r\n5\r\nEND\r\n")
            .await;
    }
}
