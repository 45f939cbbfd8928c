//! The S3 store against a real S3-compatible server on loopback: the conformance suite,
//! the seed's options, prefixes, foreign objects, restarts, faults and hidden latency.

mod common;
#[path = "../src/store/conformance.rs"]
mod conformance;

use std::sync::atomic::Ordering::SeqCst;
use std::time::Duration;

use bytes::Bytes;
use common::proxy::{Mode, Proxy, WriteFault};
use common::{s3_endpoint, unique_prefix, Backend, Client, TestServer, TEST_BUCKET};
use s3cached::config::Config;
use s3cached::store::format::Codec;
use s3cached::store::s3::{S3Settings, S3Store};
use s3cached::store::{key_hash, Store};

fn settings(prefix: &str, endpoint: &str) -> S3Settings {
    let config = Config::from_toml(&common::s3::s3_toml(TEST_BUCKET, endpoint, prefix)).unwrap();
    config.s3_settings()
}

/// A plain SDK client, to look at objects behind s3cached's back.
fn raw_client() -> aws_sdk_s3::Client {
    common::s3::sdk_client(&s3_endpoint())
}

#[tokio::test]
async fn conformance_suite_on_s3() {
    if !common::have_s3() {
        return;
    }
    let store = S3Store::connect(settings(&unique_prefix("conf"), &s3_endpoint()))
        .await
        .unwrap();
    assert!(
        store.info().atomic,
        "the test server enforces conditional writes"
    );
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn conformance_suite_on_s3_with_gzip() {
    if !common::have_s3() {
        return;
    }
    let mut s = settings(&unique_prefix("confgz"), &s3_endpoint());
    s.codec = Codec {
        gzip_min_bytes: Some(16),
        max_value_bytes: 2 * 1024 * 1024,
        stream_above: usize::MAX,
    };
    let store = S3Store::connect(s).await.unwrap();
    conformance::run_all(&store).await;
}

#[tokio::test]
async fn objects_are_sha1_names_under_the_prefix_folder() {
    if !common::have_s3() {
        return;
    }
    let prefix = unique_prefix("names");
    let a = S3Store::connect(settings(&prefix, &s3_endpoint()))
        .await
        .unwrap();
    // A sibling prefix that merely starts with the same letters.
    let b = S3Store::connect(settings(&format!("{prefix}2"), &s3_endpoint()))
        .await
        .unwrap();
    let entry = s3cached::store::Entry {
        key: Bytes::from("k"),
        value: Bytes::from("v"),
        cas: 1,
        ..Default::default()
    };
    a.put(&entry, s3cached::store::PutMode::Overwrite)
        .await
        .unwrap();
    b.put(&entry, s3cached::store::PutMode::Overwrite)
        .await
        .unwrap();
    let raw = raw_client();
    let object = raw
        .get_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/{}", key_hash(b"k")))
        .send()
        .await
        .expect("object at <prefix>/<sha1>");
    let body = object.body.collect().await.unwrap().into_bytes();
    assert_eq!(&body[..4], b"S3CD");
    assert_eq!(
        a.list(None, 1000).await.unwrap().objects.len(),
        1,
        "cache never sees cache2/"
    );
    assert_eq!(b.list(None, 1000).await.unwrap().objects.len(), 1);
}

#[tokio::test]
async fn seed_options_reach_s3() {
    if !common::have_s3() {
        return;
    }
    let prefix = unique_prefix("opts");
    let server = TestServer::start_config(
        common::config(Backend::S3, &prefix, std::path::Path::new("/nonexistent"),
            "is_gzipped = true\ngzip_min_bytes = 100\nreduced_redundancy = true\ndefault_acl = \"private\"\n"),
        tempfile::tempdir().unwrap(),
    )
    .await;
    let mut c = server.client().await;
    let value = "abc".repeat(1000);
    c.roundtrip(
        format!("set big 123 0 {}\r\n{value}\r\n", value.len()).as_bytes(),
        b"STORED\r\n",
    )
    .await;
    c.roundtrip(
        b"get big\r\n",
        format!("VALUE big 123 {}\r\n{value}\r\nEND\r\n", value.len()).as_bytes(),
    )
    .await;
    let raw = raw_client();
    let name = format!("{prefix}/{}", key_hash(b"big"));
    let head = raw
        .head_object()
        .bucket(TEST_BUCKET)
        .key(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.storage_class().map(|s| s.as_str()),
        Some("REDUCED_REDUNDANCY")
    );
    let body = raw
        .get_object()
        .bucket(TEST_BUCKET)
        .key(&name)
        .send()
        .await
        .unwrap()
        .body
        .collect()
        .await
        .unwrap()
        .into_bytes();
    assert_eq!(body[5], 1, "stored gzip-compressed");
    assert!(body.len() < value.len() / 4);
}

#[tokio::test]
async fn buckets_that_refuse_acls_are_written_without_them() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let store = S3Store::connect(settings(&unique_prefix("acl"), &proxy.url()))
        .await
        .unwrap();
    proxy.set(Mode::RefuseAcls);
    let entry = s3cached::store::Entry {
        key: Bytes::from("k"),
        value: Bytes::from("v"),
        cas: 1,
        ..Default::default()
    };
    store
        .put(&entry, s3cached::store::PutMode::Overwrite)
        .await
        .expect("written without the ACL");
    assert_eq!(store.get(b"k").await.unwrap().unwrap().entry.value, "v");
    let before = proxy.requests.load(SeqCst);
    store
        .put(&entry, s3cached::store::PutMode::Overwrite)
        .await
        .unwrap();
    assert_eq!(
        proxy.requests.load(SeqCst) - before,
        1,
        "no ACL is tried again"
    );
}

#[tokio::test]
async fn a_store_that_ignores_conditional_writes_is_detected() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    proxy.set(Mode::StripConditionals);
    let store = S3Store::connect(settings(&unique_prefix("noatomic"), &proxy.url()))
        .await
        .unwrap();
    assert!(!store.info().atomic);
    let proxy2 = Proxy::start(&s3_endpoint()).await;
    let store2 = S3Store::connect(settings(&unique_prefix("atomic"), &proxy2.url()))
        .await
        .unwrap();
    assert!(store2.info().atomic);
}

#[tokio::test]
async fn corrupt_and_foreign_objects_read_as_misses() {
    if !common::have_s3() {
        return;
    }
    let server = TestServer::start(Backend::S3, "corrupt", "").await;
    let raw = raw_client();
    let prefix = &server.config.location;
    raw.put_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/{}", key_hash(b"junk")))
        .body(Bytes::from_static(b"not an s3cached object").into())
        .send()
        .await
        .unwrap();
    // A well-formed object whose key is not the one hashed (a collision, or a copy).
    let other = Codec::default().encode(&s3cached::store::Entry {
        key: Bytes::from("other"),
        value: Bytes::from("x"),
        ..Default::default()
    });
    raw.put_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/{}", key_hash(b"mine")))
        .body(other.into())
        .send()
        .await
        .unwrap();
    // A well-formed object for its key with one value byte changed: its checksum fails.
    let mut damaged = Codec::default()
        .encode(&s3cached::store::Entry {
            key: Bytes::from("damaged"),
            value: Bytes::from("right value"),
            ..Default::default()
        })
        .to_vec();
    let at = damaged.len() - 6;
    damaged[at] ^= 0x20;
    raw.put_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/{}", key_hash(b"damaged")))
        .body(Bytes::from(damaged).into())
        .send()
        .await
        .unwrap();
    let mut c = server.client().await;
    c.roundtrip(b"get junk mine damaged\r\n", b"END\r\n").await;
    c.roundtrip(
        b"set junk 0 0 1\r\nj\r\nget junk\r\n",
        b"STORED\r\nVALUE junk 0 1\r\nj\r\nEND\r\n",
    )
    .await;
}

#[tokio::test]
async fn items_and_flushes_survive_a_restart() {
    if !common::have_s3() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(Backend::S3, &unique_prefix("restart"), dir.path(), "");
    let first = TestServer::start_config(config.clone(), tempfile::tempdir().unwrap()).await;
    let mut c = first.client().await;
    c.roundtrip(
        b"set a 1 0 1\r\na\r\nflush_all\r\nset b 2 0 1\r\nb\r\n",
        b"STORED\r\nOK\r\nSTORED\r\n",
    )
    .await;
    first.app.shutdown(Duration::from_secs(5)).await;
    let second = TestServer::start_config(config, dir).await;
    let mut c = second.client().await;
    c.roundtrip(b"get a b\r\n", b"VALUE b 2 1\r\nb\r\nEND\r\n")
        .await;
}

/// A server whose S3 traffic goes through a proxy.
async fn server_via(proxy: &Proxy, extra: &str) -> TestServer {
    start_via(proxy, extra, false).await
}

/// A server behind a fault proxy, with short deadlines so faults answer quickly.
async fn server_behind(proxy: &Proxy, extra: &str) -> TestServer {
    start_via(proxy, extra, true).await
}

async fn start_via(proxy: &Proxy, extra: &str, short_deadlines: bool) -> TestServer {
    TestServer::behind_with(proxy, &unique_prefix("proxied"), extra, |config| {
        if short_deadlines {
            config.s3_attempt_timeout_ms = 400;
            config.s3_operation_timeout_ms = 1500;
            config.s3_max_attempts = 2;
        }
    })
    .await
}

#[tokio::test]
async fn backend_faults_answer_server_error_promptly_and_recover() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // Strict mode: every read asks the backend, so each fault shows.
    let server = server_behind(&proxy, "revalidate_after_ms = 0\n").await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    for mode in [
        Mode::Stall,
        Mode::Reset,
        Mode::Status(503, "SlowDown"),
        Mode::Status(500, "InternalError"),
    ] {
        proxy.set(mode.clone());
        let started = tokio::time::Instant::now();
        for request in [
            &b"get k\r\n"[..],
            b"set k 0 0 1\r\nw\r\n",
            b"incr k 1\r\n",
            b"delete k\r\n",
        ] {
            let line = c.line(request).await;
            assert!(line.starts_with("SERVER_ERROR S3 "), "{mode:?}: {line}");
        }
        // Four commands, each bounded by the operation deadline (1.5 s), not hanging.
        assert!(
            started.elapsed() < Duration::from_secs(4 * 3),
            "{mode:?} took {:?}",
            started.elapsed()
        );
        proxy.set(Mode::Forward(Duration::ZERO));
        c.roundtrip(b"get k\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n")
            .await;
    }
}

#[tokio::test]
async fn backend_gone_then_back() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // Strict mode: every read asks the backend, so its absence shows.
    let server = server_behind(
        &proxy,
        "miss_on_backend_error = true\nrevalidate_after_ms = 0\n",
    )
    .await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    let url = proxy.url();
    drop(proxy); // the listener goes away: connection refused
    c.roundtrip(b"get k\r\n", b"END\r\n").await; // a miss, by the option
    let line = c.line(b"set k 0 0 1\r\nw\r\n").await;
    assert!(line.starts_with("SERVER_ERROR"), "{line}");
    // Bring a proxy back on the same port.
    let addr: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let upstream: std::net::SocketAddr =
        s3_endpoint().trim_start_matches("http://").parse().unwrap();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut outbound = tokio::net::TcpStream::connect(upstream).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    c.roundtrip(b"get k\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n")
        .await;
}

#[tokio::test]
async fn multi_get_and_pipelined_sets_fan_out() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // No RAM tier: the gets must go to the backend to show their fan-out.
    let server = server_via(&proxy, "s3_max_in_flight = 256\nram_cache_bytes = 0\n").await;
    let mut c = server.client().await;
    proxy.set(Mode::Forward(Duration::from_millis(20)));
    let mut sets = Vec::new();
    for i in 0..100 {
        sets.extend_from_slice(format!("set key{i} 0 0 1 noreply\r\nv\r\n").as_bytes());
    }
    proxy.reset_counters();
    c.send(&sets).await;
    c.roundtrip(b"mn\r\n", b"MN\r\n").await;
    let sets_concurrency = proxy.max_in_flight.load(SeqCst);
    // Slow enough that every GET of the multi-get is sent before the first is answered.
    proxy.set(Mode::Forward(Duration::from_millis(500)));
    proxy.reset_counters();
    let keys: Vec<String> = (0..100).map(|i| format!("key{i}")).collect();
    c.send(format!("get {}\r\n", keys.join(" ")).as_bytes())
        .await;
    let reply = c.read_until(b"END\r\n").await;
    assert_eq!(
        String::from_utf8(reply).unwrap().matches("VALUE ").count(),
        100
    );
    let gets_concurrency = proxy.max_in_flight.load(SeqCst);
    // Sequential would be 1 (plus the flush-epoch read); require real fan-out.
    assert!(
        sets_concurrency >= 20,
        "pipelined sets ran {sets_concurrency} at once"
    );
    // All at once: the get is charged its values as they arrive, not 2 MiB per key up
    // front (which cut it into pieces of 31 keys, one after another).
    assert!(
        gets_concurrency >= 100,
        "a 100-key get ran {gets_concurrency} at once"
    );
}

#[tokio::test]
async fn in_flight_requests_are_capped_globally() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(Backend::S3, &unique_prefix("cap"), dir.path(), "");
    config.endpoint_url = proxy.url();
    config.s3_max_in_flight = 4;
    // 200 GETs through 4 slots wait their turn, and the wait counts against each one's
    // deadline: allow for a slow, loaded test server (about 5 s here at 30-40 requests/s).
    config.s3_operation_timeout_ms = 30_000;
    let server = TestServer::start_config(config, dir).await;
    proxy.set(Mode::Forward(Duration::from_millis(10)));
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(Client::connect(server.addr).await);
    }
    proxy.reset_counters();
    let keys: Vec<String> = (0..50).map(|i| format!("k{i}")).collect();
    let line = format!("get {}\r\n", keys.join(" "));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let line = line.clone();
            tokio::spawn(async move { c.roundtrip(line.as_bytes(), b"END\r\n").await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let seen = proxy.max_in_flight.load(SeqCst);
    assert!(seen <= 4, "{seen} S3 requests in flight with a cap of 4");
}

/// Every read-modify-write command, with its write's answer lost once after S3 applied it:
/// each gives memcached's single-node answer, and the value shows it applied once.
async fn commands_apply_once(c: &mut Client, proxy: &Proxy, fault: WriteFault) {
    let lose_one = || {
        proxy.set(Mode::OnWrites {
            fault: fault.clone(),
            writes: 1,
        })
    };
    c.roundtrip(b"set n 0 0 1\r\n5\r\n", b"STORED\r\n").await;
    lose_one();
    c.roundtrip(b"incr n 3\r\n", b"8\r\n").await;
    c.roundtrip(b"get n\r\n", b"VALUE n 0 1\r\n8\r\nEND\r\n")
        .await;

    c.roundtrip(b"set a 0 0 1\r\nx\r\n", b"STORED\r\n").await;
    lose_one();
    c.roundtrip(b"append a 0 0 1\r\ny\r\n", b"STORED\r\n").await;
    c.roundtrip(b"get a\r\n", b"VALUE a 0 2\r\nxy\r\nEND\r\n")
        .await;

    c.line(b"delete fresh\r\n").await;
    lose_one();
    c.roundtrip(b"add fresh 7 0 1\r\nf\r\n", b"STORED\r\n")
        .await;
    c.roundtrip(b"get fresh\r\n", b"VALUE fresh 7 1\r\nf\r\nEND\r\n")
        .await;

    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    c.send(b"gets k\r\n").await;
    let gets = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    let unique: u64 = gets.split_whitespace().nth(4).unwrap().parse().unwrap();
    lose_one();
    c.roundtrip(
        format!("cas k 0 0 1 {unique}\r\nw\r\n").as_bytes(),
        b"STORED\r\n",
    )
    .await;
    c.roundtrip(b"get k\r\n", b"VALUE k 0 1\r\nw\r\nEND\r\n")
        .await;

    lose_one();
    c.roundtrip(b"delete k\r\n", b"DELETED\r\n").await;
    c.roundtrip(b"get k\r\n", b"END\r\n").await;
    assert_eq!(
        proxy.set_and_get(Mode::Forward(Duration::ZERO)),
        Mode::Forward(Duration::ZERO),
        "{fault:?}: every injected fault was used"
    );
}

#[tokio::test]
async fn a_write_whose_answer_is_lost_applies_once() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server_behind(&proxy, "").await;
    let mut c = server.client().await;
    for fault in [
        WriteFault::DropAnswer,
        WriteFault::DelayAnswer(Duration::from_millis(700)),
        WriteFault::ReplaceAnswer(500, "InternalError"),
        WriteFault::ReplaceAnswer(503, "SlowDown"),
    ] {
        commands_apply_once(&mut c, &proxy, fault).await;
    }
}

#[tokio::test]
async fn a_throttled_burst_is_served_slower_not_refused() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // Strict mode: every read asks S3, so reads meet the throttling too.
    let server = server_via(&proxy, "revalidate_after_ms = 0\n").await;
    let limit = server.client().await.stat("s3_in_flight_limit").await;
    // S3 answers 503 SlowDown to a third of all requests, reads and writes alike.
    proxy.set(Mode::Throttle { per_mille: 333 });
    let clients = (0..8).map(|i| {
        let server = &server;
        async move {
            let mut c = server.client().await;
            for n in 0..20 {
                let set = format!("set t{i}-{n} 0 0 2\r\n{n:02}\r\n");
                c.roundtrip(set.as_bytes(), b"STORED\r\n").await;
                let get = format!("get t{i}-{n}\r\n");
                let want = format!("VALUE t{i}-{n} 0 2\r\n{n:02}\r\nEND\r\n");
                c.roundtrip(get.as_bytes(), want.as_bytes()).await;
                // A conditional write sent again after a 503 applies once. Two clients share
                // each counter: contention, yet far fewer writes to one key during a
                // throttled wait than an item's history holds (see docs/design.md,
                // "Exactly once"; a write refused after a 503 is settled by reading it).
                let line = c
                    .line(format!("incr shared{} 1\r\n", i % 4).as_bytes())
                    .await;
                assert!(
                    line.trim_end().parse::<u64>().is_ok(),
                    "incr answered {line:?}"
                );
            }
        }
    });
    let mut c = server.client().await;
    for k in 0..4 {
        c.roundtrip(
            format!("set shared{k} 0 0 1\r\n0\r\n").as_bytes(),
            b"STORED\r\n",
        )
        .await;
    }
    futures::future::join_all(clients).await;
    proxy.set(Mode::Forward(Duration::ZERO));
    for k in 0..4 {
        let key = format!("shared{k}");
        assert_eq!(c.get_value(&key).await.as_deref(), Some("40"), "{key}");
    }
    let throttled = c.stat("s3_throttled").await;
    assert!(throttled > 0, "nothing was throttled");
    let cut = c.stat("s3_in_flight_limit").await;
    assert!(cut <= limit, "the in-flight limit stays within its cap");
    // Answered again, the limit grows back (by one per limit's worth of answers).
    if cut < limit {
        for n in 0..2 * cut {
            let key = format!("t0-{}", n % 20);
            assert!(c.get_value(&key).await.is_some(), "{key} is stored");
        }
        let grown = c.stat("s3_in_flight_limit").await;
        assert!(grown > cut, "the limit stayed at {cut} after the burst");
    }
    println!("throttled burst: {throttled} requests answered 503, every command served");
}

#[tokio::test]
async fn conditional_write_conflicts_are_retried() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server_behind(&proxy, "").await;
    let mut c = server.client().await;
    c.roundtrip(b"set n 0 0 1\r\n5\r\n", b"STORED\r\n").await;
    // S3's answer to concurrent conditional writes on one key: not applied, try again.
    proxy.set(Mode::OnWrites {
        fault: WriteFault::Refuse(409, "ConditionalRequestConflict"),
        writes: 2,
    });
    c.roundtrip(b"incr n 1\r\n", b"6\r\n").await;
    c.roundtrip(b"get n\r\n", b"VALUE n 0 1\r\n6\r\nEND\r\n")
        .await;
}

#[tokio::test]
async fn waiting_for_an_s3_slot_counts_against_the_deadline() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(Backend::S3, &unique_prefix("slots"), dir.path(), "");
    config.endpoint_url = proxy.url();
    config.s3_attempt_timeout_ms = 1000;
    config.s3_operation_timeout_ms = 1000;
    config.s3_max_attempts = 1;
    config.s3_max_in_flight = 2;
    let server = TestServer::start_config(config, dir).await;
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(Client::connect(server.addr).await);
    }
    proxy.set(Mode::Stall);
    // Twelve gets on two slots, each call stalled for its whole deadline: queued in turn
    // they would answer after 1, 2, ... 6 s; every one must answer within about 1 s.
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut c)| {
            tokio::spawn(async move {
                let line = c.line(format!("get key{i}\r\n").as_bytes()).await;
                (line, started.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for t in tasks {
        let (line, took) = t.await.unwrap();
        slowest = slowest.max(took);
        assert!(line.starts_with("SERVER_ERROR S3 "), "{line}");
        assert!(
            took < Duration::from_millis(1800),
            "a reply came after {took:?} with a 1 s deadline"
        );
    }
    eprintln!("12 gets on 2 stalled slots: the slowest reply came after {slowest:?}");
}

#[tokio::test]
async fn oversized_foreign_objects_are_not_downloaded() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&s3_endpoint()).await;
    // max_item_size: 1 MiB; strict mode, so the next request reads the flush epoch.
    let server = server_via(&proxy, "revalidate_after_ms = 0\n").await;
    let prefix = &server.config.location;
    let raw = raw_client();
    let huge = Bytes::from(vec![b'x'; 24 * 1024 * 1024]);
    raw.put_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/{}", key_hash(b"big")))
        .body(huge.clone().into())
        .send()
        .await
        .unwrap();
    let mut c = server.client().await;
    proxy.reset_counters();
    let before = proxy.bytes_out.load(SeqCst);
    let started = tokio::time::Instant::now();
    c.roundtrip(b"get big\r\n", b"END\r\n").await;
    let took = started.elapsed();
    let delivered = proxy.bytes_out.load(SeqCst) - before;
    eprintln!("a 24 MiB foreign object: a miss in {took:?}, {delivered} bytes delivered");
    assert!(
        delivered < 12 * 1024 * 1024,
        "{delivered} bytes of a 24 MiB object reached s3cached"
    );
    assert!(took < Duration::from_secs(3), "the miss took {took:?}");
    // The flush epoch is read on every request: a huge one is an error, never a download.
    raw.put_object()
        .bucket(TEST_BUCKET)
        .key(format!("{prefix}/_s3cached/flush-epoch"))
        .body(huge.into())
        .send()
        .await
        .unwrap();
    let before = proxy.bytes_out.load(SeqCst);
    let line = c.line(b"get k\r\n").await;
    assert!(
        line.starts_with("SERVER_ERROR S3 GetObject: control object"),
        "{line}"
    );
    let delivered = proxy.bytes_out.load(SeqCst) - before;
    assert!(delivered < 12 * 1024 * 1024, "{delivered} bytes delivered");
}
