//! Operations: S3 requests counted by price class against what the S3 server
//! received, encryption headers on every PUT, /healthz and /readyz with the store up and
//! down, and `s3cached lifecycle --apply` read back from the bucket. Needs the local S3
//! server that tests/run starts.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use aws_sdk_s3::config::{Credentials, Region};
use common::proxy::{Mode, Proxy};
use common::{s3_endpoint, unique_prefix, Backend, TestServer, TEST_BUCKET};
use s3cached::store::s3::RequestClass;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn raw_client() -> aws_sdk_s3::Client {
    let conf = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(s3_endpoint())
        .force_path_style(true)
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// A server whose S3 traffic goes through `proxy`; no background S3 traffic (the flush
/// epoch is re-read once an hour, the culler is off) unless `extra` asks for it.
async fn server_via(proxy: &Proxy, name: &str, extra: &str) -> TestServer {
    let extra = format!("revalidate_after_ms = 3600000\n{extra}");
    TestServer::behind(proxy, &unique_prefix(name), &extra).await
}

/// The price class of a request the proxy saw, from its request line.
fn class_of(head: &str) -> RequestClass {
    let line = head.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let method = parts.next().unwrap_or_default();
    let target = parts.next().unwrap_or_default();
    let query = target.split_once('?').map_or("", |(_, q)| q);
    RequestClass::of(method, query)
}

/// (get, put, delete) requests counted by the server so far.
fn counted(server: &TestServer) -> [u64; 3] {
    let s3 = server.app.ctx.stats.s3.as_ref().expect("S3 request counts");
    [
        s3.get.load(Relaxed),
        s3.put.load(Relaxed),
        s3.delete.load(Relaxed),
    ]
}

fn seen(heads: &[String]) -> [u64; 3] {
    let mut n = [0u64; 3];
    for head in heads {
        n[match class_of(head) {
            RequestClass::Get => 0,
            RequestClass::Put => 1,
            RequestClass::Delete => 2,
        }] += 1;
    }
    n
}

#[tokio::test]
async fn s3_requests_by_class_match_what_the_server_received() {
    let proxy = Proxy::start(&s3_endpoint()).await;
    // Strict reads: every get asks the store.
    let server = server_via(&proxy, "count", "ram_cache_bytes = 0\n").await;
    // Startup (bucket check, conditional-write probe, flush epoch) is counted as well.
    assert_eq!(counted(&server), seen(&proxy.heads()), "after startup");
    let before = (counted(&server), proxy.heads().len());
    let mut c = server.client().await;
    for i in 0..10 {
        c.roundtrip(format!("set k{i} 0 0 1\r\nv\r\n").as_bytes(), b"STORED\r\n")
            .await;
    }
    for i in 0..10 {
        let want = format!("VALUE k{i} 0 1\r\nv\r\nEND\r\n");
        c.roundtrip(format!("get k{i}\r\n").as_bytes(), want.as_bytes())
            .await;
    }
    for i in 0..5 {
        c.roundtrip(format!("get missing{i}\r\n").as_bytes(), b"END\r\n")
            .await;
    }
    for i in 0..3 {
        c.roundtrip(format!("delete k{i}\r\n").as_bytes(), b"DELETED\r\n")
            .await;
    }
    let after = counted(&server);
    let heads = proxy.heads();
    let workload: Vec<String> = heads[before.1..].to_vec();
    let delta = [
        after[0] - before.0[0],
        after[1] - before.0[1],
        after[2] - before.0[2],
    ];
    assert_eq!(delta, seen(&workload), "server's count vs the S3 server's");
    // 10 PUTs; 15 GETs, 3 HEADs before the deletes; 3 DELETEs (in this store's protocol).
    assert_eq!(delta, [18, 10, 3], "{workload:#?}");
    // stats shows them, with the cost at AWS list prices: 18 x 400 + 10 x 5000 nano-USD
    // on top of the startup requests.
    c.send(b"stats\r\n").await;
    let stats = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    let row = |name: &str| -> u64 {
        let prefix = format!("STAT {name} ");
        let line = stats.lines().find(|l| l.starts_with(&prefix)).unwrap();
        line[prefix.len()..].parse().unwrap()
    };
    assert_eq!(row("s3_get_requests"), after[0]);
    assert_eq!(row("s3_put_requests"), after[1]);
    assert_eq!(row("s3_delete_requests"), after[2]);
    assert_eq!(row("s3_cost_nanousd"), after[0] * 400 + after[1] * 5000);
}

/// The object PUTs among the request heads (not the bucket's creation), and how many carry
/// `header: value`.
fn puts_with(heads: &[String], header: &str, value: &str) -> (usize, usize) {
    let puts: Vec<&String> = heads
        .iter()
        .filter(|h| h.starts_with("PUT ") && h.lines().next().unwrap().contains("x-id=PutObject"))
        .collect();
    let want = format!(
        "{}: {}",
        header.to_ascii_lowercase(),
        value.to_ascii_lowercase()
    );
    let with = puts
        .iter()
        .filter(|h| h.to_ascii_lowercase().lines().any(|l| l.trim() == want))
        .count();
    (puts.len(), with)
}

#[tokio::test]
async fn encryption_headers_reach_the_store_on_every_put_and_objects_read_back() {
    let proxy = Proxy::start(&s3_endpoint()).await;
    let server = server_via(&proxy, "sse", "server_side_encryption = \"AES256\"\n").await;
    let mut c = server.client().await;
    c.roundtrip(b"set enc 0 0 6\r\nsecret\r\n", b"STORED\r\n")
        .await;
    c.roundtrip(b"add enc2 0 0 1\r\nx\r\n", b"STORED\r\n").await;
    c.roundtrip(b"flush_all\r\n", b"OK\r\n").await; // a control object
    c.roundtrip(b"set enc 0 0 6\r\nsecret\r\n", b"STORED\r\n")
        .await;
    c.roundtrip(b"get enc\r\n", b"VALUE enc 0 6\r\nsecret\r\nEND\r\n")
        .await;
    let heads = proxy.heads();
    let (puts, with) = puts_with(&heads, "x-amz-server-side-encryption", "AES256");
    // The startup probe (2), set, add, the flush epoch, set again.
    assert!(puts >= 6, "{heads:#?}");
    assert_eq!(with, puts, "every PUT asks for encryption: {heads:#?}");
    let control = heads
        .iter()
        .find(|h| h.starts_with("PUT ") && h.contains("/_s3cached/"))
        .expect("a control object PUT");
    assert!(control
        .to_ascii_lowercase()
        .contains("x-amz-server-side-encryption: aes256"));
    // The store kept the object encrypted.
    let name = format!(
        "{}{}",
        s3cached::store::normalize_prefix(&server.config.location),
        s3cached::store::key_hash(b"enc")
    );
    let head = raw_client()
        .await
        .head_object()
        .bucket(TEST_BUCKET)
        .key(&name)
        .send()
        .await
        .unwrap();
    assert_eq!(
        head.server_side_encryption().map(|s| s.as_str()),
        Some("AES256")
    );
}

#[tokio::test]
async fn kms_encryption_sends_the_key_id() {
    let proxy = Proxy::start(&s3_endpoint()).await;
    let extra = "server_side_encryption = \"aws:kms\"\nsse_kms_key_id = \"alias/s3cached-test\"\n";
    let server = server_via(&proxy, "kms", extra).await;
    let mut c = server.client().await;
    c.roundtrip(b"set k 0 0 1\r\nv\r\n", b"STORED\r\n").await;
    c.roundtrip(b"get k\r\n", b"VALUE k 0 1\r\nv\r\nEND\r\n")
        .await;
    let heads = proxy.heads();
    let (puts, with) = puts_with(&heads, "x-amz-server-side-encryption", "aws:kms");
    assert!(puts >= 3 && with == puts, "{heads:#?}");
    let (_, keyed) = puts_with(
        &heads,
        "x-amz-server-side-encryption-aws-kms-key-id",
        "alias/s3cached-test",
    );
    assert_eq!(keyed, puts, "{heads:#?}");
}

/// One HTTP GET on the admin listener: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut response))
        .await
        .expect("an answer in time")
        .unwrap();
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (status, body)
}

#[tokio::test]
async fn readyz_follows_the_store_and_healthz_the_process() {
    let proxy = Proxy::start(&s3_endpoint()).await;
    let dir = tempfile::tempdir().unwrap();
    let extra = "admin_listen = \"127.0.0.1:0\"\nrevalidate_after_ms = 3600000\n";
    let mut config = common::config(Backend::S3, &unique_prefix("ready"), dir.path(), extra);
    config.endpoint_url = proxy.url();
    config.s3_attempt_timeout_ms = 500;
    config.s3_operation_timeout_ms = 1000;
    config.s3_max_attempts = 1;
    let server = TestServer::start_config(config, dir).await;
    let admin = server.app.admin_addr.expect("admin listener");
    assert!(admin.ip().is_loopback());
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    // A second probe within the second is answered from the cache: no S3 request.
    let before = proxy.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let after = proxy.requests.load(std::sync::atomic::Ordering::SeqCst);
    assert!(after - before <= 1, "readyz probes are cached");
    proxy.set(Mode::Status(503, "ServiceUnavailable"));
    // Not ready once the cached verdict ages (1 s); bounded wait.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let (status, body) = loop {
        let (status, body) = http_get(admin, "/readyz").await;
        if status != 200 || tokio::time::Instant::now() > deadline {
            break (status, body);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("store unavailable"), "{body}");
    assert_eq!(
        http_get(admin, "/healthz").await.0,
        200,
        "alive while the store is down"
    );
    proxy.set(Mode::Forward(Duration::ZERO));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (status, _) = http_get(admin, "/readyz").await;
        if status == 200 || tokio::time::Instant::now() > deadline {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status, 200, "ready again once the store answers");
    assert_eq!(http_get(admin, "/nowhere").await.0, 404);
}

#[tokio::test]
async fn the_admin_listener_is_off_by_default() {
    let server = TestServer::start(Backend::Dir, "noadmin", "").await;
    assert!(server.app.admin_addr.is_none());
    assert_eq!(server.config.admin_listen, "");
}

#[tokio::test]
async fn lifecycle_apply_installs_rules_that_read_back_and_keeps_other_rules() {
    let bucket = "s3cached-lifecycle-test";
    let s3 = raw_client().await;
    let _ = s3.create_bucket().bucket(bucket).send().await;
    // A rule of the bucket's owner, to be kept.
    use aws_sdk_s3::types::*;
    let theirs = LifecycleRule::builder()
        .id("owner-logs")
        .filter(LifecycleRuleFilter::builder().prefix("logs/").build())
        .status(ExpirationStatus::Enabled)
        .expiration(LifecycleExpiration::builder().days(90).build())
        .build()
        .unwrap();
    s3.put_bucket_lifecycle_configuration()
        .bucket(bucket)
        .lifecycle_configuration(
            BucketLifecycleConfiguration::builder()
                .rules(theirs)
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let run = |days: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
            .args(["lifecycle", "--apply", "--days", days])
            .env("S3CACHED_STORAGE_BUCKET_NAME", bucket)
            .env("S3CACHED_ENDPOINT_URL", s3_endpoint())
            .env("S3CACHED_FORCE_PATH_STYLE", "true")
            .env("S3CACHED_REGION", "us-east-1")
            .env("S3CACHED_ACCESS_KEY_ID", "test")
            .env("S3CACHED_SECRET_ACCESS_KEY", "test")
            .env("S3CACHED_LOCATION", "cache")
            .output()
            .unwrap()
    };
    for days in ["7", "3"] {
        let out = run(days);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains("16 rules"), "{text}");
    }
    let rules = s3
        .get_bucket_lifecycle_configuration()
        .bucket(bucket)
        .send()
        .await
        .unwrap()
        .rules()
        .to_vec();
    let prefix = |r: &LifecycleRule| {
        r.filter()
            .and_then(|f| f.prefix())
            .unwrap_or_default()
            .to_owned()
    };
    let ours: Vec<_> = rules
        .iter()
        .filter(|r| prefix(r).starts_with("cache/"))
        .collect();
    assert_eq!(
        ours.len(),
        16,
        "applying twice replaces, not adds: {rules:#?}"
    );
    assert!(ours
        .iter()
        .all(|r| r.expiration().and_then(|e| e.days()) == Some(3)));
    assert!(ours.iter().all(|r| !prefix(r).starts_with("cache/_")));
    assert!(
        rules.iter().any(|r| r.id() == Some("owner-logs")),
        "{rules:#?}"
    );
}

#[tokio::test]
async fn check_sets_through_one_replica_and_reads_through_the_other() {
    let dir_a = tempfile::tempdir().unwrap();
    let prefix = unique_prefix("check2");
    let a = TestServer::start_config(
        common::config(Backend::S3, &prefix, dir_a.path(), ""),
        dir_a,
    )
    .await;
    let dir_b = tempfile::tempdir().unwrap();
    let b = TestServer::start_config(
        common::config(Backend::S3, &prefix, dir_b.path(), ""),
        dir_b,
    )
    .await;
    let (a_addr, b_addr) = (a.addr.to_string(), b.addr.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
            .args(["check", "--addr", &a_addr, "--read-addr", &b_addr])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("(read through {})", b.addr)),
        "{text}"
    );
    // Replica b really served it: it counted the hit and the delete.
    assert_eq!(b.app.ctx.stats.get_hits.load(Relaxed), 1);
    assert_eq!(b.app.ctx.stats.delete_hits.load(Relaxed), 1);
    assert_eq!(a.app.ctx.stats.cmd_set.load(Relaxed), 1);
    assert_eq!(a.app.ctx.stats.cmd_get.load(Relaxed), 0);

    // Replicas on different prefixes share nothing: the read through the other fails.
    let dir_c = tempfile::tempdir().unwrap();
    let c = TestServer::start_config(
        common::config(Backend::S3, &unique_prefix("check3"), dir_c.path(), ""),
        dir_c,
    )
    .await;
    let (a_addr, c_addr) = (a.addr.to_string(), c.addr.to_string());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
            .args(["check", "--addr", &a_addr, "--read-addr", &c_addr])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAILED at get"));
}

#[test]
fn lifecycle_print_needs_no_bucket_and_excludes_control_objects() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
        .args(["lifecycle", "--print", "--days", "9"])
        .env("S3CACHED_LOCATION", "/cache/")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\"Days\": 9").count(), 16, "{text}");
    assert!(text.contains("\"Prefix\": \"cache/0\""), "{text}");
    assert!(text.contains("\"Prefix\": \"cache/f\""), "{text}");
    assert!(!text.contains("_s3cached"), "{text}");
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
        .args(["lifecycle", "--apply"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "--apply without a bucket");
    let zero = std::process::Command::new(env!("CARGO_BIN_EXE_s3cached"))
        .args(["lifecycle", "--days", "0"])
        .output()
        .unwrap();
    assert!(!zero.status.success(), "--days 0 is refused");
}
