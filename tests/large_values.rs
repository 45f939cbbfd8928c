//! Values longer than `stream_above_bytes`, streamed both ways on the directory store and
//! on S3 (moto, through the fault proxy where a test breaks S3 mid-value): round trips
//! byte for byte, multi-gets mixing short and long values in order, a reader that stops
//! reading, an S3 failure midway in each direction, a client gone mid-set (its upload
//! aborted), a data block that ends badly, and the commands that refuse a long value.

mod common;

use std::time::Duration;

use common::proxy::{Mode, Proxy};
use common::{Backend, Client, TestServer};

const MIB: usize = 1024 * 1024;

/// Long values stream above 256 KiB; items up to 64 MiB.
const STREAMING: &str = "stream_above_bytes = 262144\nmax_item_size = 67108864\n\
                         memory_limit_bytes = 268435456\n";

/// A value of `len` bytes that differs at every offset a short or shifted copy would show.
fn value(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| b'a' + ((i / 7 + i % 13 + usize::from(seed)) % 26) as u8)
        .collect()
}

/// A `set` of `data` under `key` and its reply.
async fn set(c: &mut Client, key: &str, data: &[u8]) -> String {
    c.send(format!("set {key} 7 0 {}\r\n", data.len()).as_bytes())
        .await;
    c.send(data).await;
    c.send(b"\r\n").await;
    line(c).await
}

/// One line of reply, read a byte at a time (nothing after it is taken).
async fn line(c: &mut Client) -> String {
    let mut out = Vec::new();
    while !out.ends_with(b"\r\n") {
        out.extend(c.read_exact(1).await);
        assert!(
            out.len() < 4096,
            "no line end: {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    String::from_utf8(out).unwrap()
}

/// The value a `get` of `key` returns, read exactly by its announced length.
async fn get(c: &mut Client, key: &str) -> Option<Vec<u8>> {
    c.send(format!("get {key}\r\n").as_bytes()).await;
    read_values(c).await.pop().map(|(_, v)| v)
}

/// Reads a retrieval's reply: every `(key, value)`, then `END`.
async fn read_values(c: &mut Client) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let line = line(c).await;
        if line == "END\r\n" {
            return out;
        }
        let parts: Vec<&str> = line.trim_end().split(' ').collect();
        assert_eq!(parts[0], "VALUE", "{line:?}");
        let len: usize = parts[3].parse().unwrap();
        let mut data = c.read_exact(len + 2).await;
        assert_eq!(&data[len..], b"\r\n");
        data.truncate(len);
        out.push((parts[1].to_owned(), data));
    }
}

async fn round_trip(backend: Backend) {
    let server = TestServer::start(backend, "large-round-trip", STREAMING).await;
    let mut c = server.client().await;
    // One part and a bit, and several parts with a short last one.
    for (key, len) in [("one", 300 * 1024), ("many", 20 * MIB + 12_345)] {
        let data = value(len, len as u8);
        assert_eq!(set(&mut c, key, &data).await, "STORED\r\n");
        assert!(
            get(&mut c, key).await == Some(data),
            "{key} read back whole"
        );
    }
    // Read again: the near tier keeps only its header, the value comes from the store.
    let again = get(&mut c, "many").await.expect("a hit");
    assert!(again == value(20 * MIB + 12_345, (20 * MIB + 12_345) as u8));
    assert_eq!(c.stat("streamed_sets").await, 2);
    assert!(c.stat("streamed_gets").await >= 3);
    // Overwritten with a short value: the short one is served.
    assert_eq!(set(&mut c, "many", b"short").await, "STORED\r\n");
    assert_eq!(get(&mut c, "many").await.as_deref(), Some(&b"short"[..]));
}

#[tokio::test]
async fn a_long_value_round_trips_streamed_on_the_directory_store() {
    round_trip(Backend::Dir).await;
}

#[tokio::test]
async fn a_long_value_round_trips_streamed_on_s3() {
    if !common::have_s3() {
        return;
    }
    round_trip(Backend::S3).await;
}

#[tokio::test]
async fn a_multi_get_mixing_short_and_long_values_keeps_its_order() {
    let server = TestServer::start(Backend::Dir, "large-order", STREAMING).await;
    let mut c = server.client().await;
    let keys = ["a", "long1", "b", "long2", "c"];
    let lens = [3, 2 * MIB, 10, 700 * 1024, 1];
    for (i, (key, len)) in keys.iter().zip(lens).enumerate() {
        assert_eq!(set(&mut c, key, &value(len, i as u8)).await, "STORED\r\n");
    }
    c.send(b"get a long1 missing b long2 c long1\r\n").await;
    let got = read_values(&mut c).await;
    let names: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(names, ["a", "long1", "b", "long2", "c", "long1"]);
    for (key, data) in &got {
        let i = keys.iter().position(|k| k == key).unwrap();
        assert!(*data == value(lens[i], i as u8), "{key}");
    }
    // Pipelined behind a long value: the replies keep their order too.
    c.send(b"get long2\r\nget a\r\n").await;
    assert_eq!(read_values(&mut c).await[0].1.len(), 700 * 1024);
    assert_eq!(read_values(&mut c).await[0].1, value(3, 0));
}

#[tokio::test]
async fn readers_that_stop_reading_long_values_hold_little_and_others_are_served() {
    // The smallest budget that streams: 8 x 32 MiB.
    let extra = "stream_above_bytes = 262144\nmax_item_size = 67108864\n\
                 memory_limit_bytes = 268435456\nwrite_timeout_secs = 60\n";
    let server = TestServer::start(Backend::Dir, "large-stalled", extra).await;
    let mut c = server.client().await;
    assert_eq!(set(&mut c, "big", &value(24 * MIB, 1)).await, "STORED\r\n");
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut s = server.client().await;
        s.send(b"get big\r\n").await;
        // The reply's head arrives: the value is on its way, and then stops.
        assert!(line(&mut s).await.starts_with("VALUE big 7 "));
        stalled.push(s);
    }
    let budget = server.app.ctx.stats.clone();
    let used = || {
        budget
            .memory_used_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    // Each stalled reader holds a piece or two of its value, not the value.
    assert!(used() < 16 * MIB as u64, "budget used: {}", used());
    let mut other = server.client().await;
    let started = tokio::time::Instant::now();
    assert_eq!(set(&mut other, "small", b"hello").await, "STORED\r\n");
    assert_eq!(
        get(&mut other, "small").await.as_deref(),
        Some(&b"hello"[..])
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(stalled);
}

#[tokio::test]
async fn a_read_cut_midway_by_s3_closes_the_connection_and_nothing_else() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&common::s3_endpoint()).await;
    let prefix = common::unique_prefix("large-cut-read");
    let server = TestServer::behind(&proxy, &prefix, STREAMING).await;
    let mut c = server.client().await;
    let data = value(4 * MIB, 3);
    assert_eq!(set(&mut c, "k", &data).await, "STORED\r\n");
    proxy.set(Mode::CutBodies { after: MIB });
    let mut reader = server.client().await;
    reader.send(b"get k\r\n").await;
    assert_eq!(
        line(&mut reader).await,
        format!("VALUE k 7 {}\r\n", data.len())
    );
    assert!(
        reader.closed_after_reading().await < data.len(),
        "the value is cut short"
    );
    proxy.set(Mode::Forward(Duration::ZERO));
    // The server goes on, and the value is whole in the store.
    assert_eq!(c.stat("stream_failures").await, 1);
    assert!(get(&mut c, "k").await == Some(data));
}

#[tokio::test]
async fn a_write_refused_by_s3_midway_stores_nothing_and_the_connection_goes_on() {
    if !common::have_s3() {
        return;
    }
    let proxy = Proxy::start(&common::s3_endpoint()).await;
    let prefix = common::unique_prefix("large-cut-write");
    let server = TestServer::behind(&proxy, &prefix, STREAMING).await;
    let mut c = server.client().await;
    proxy.set(Mode::OnWrites {
        fault: common::proxy::WriteFault::Refuse(500, "InternalError"),
        writes: 1_000,
    });
    let reply = set(&mut c, "k", &value(20 * MIB, 4)).await;
    assert!(reply.starts_with("SERVER_ERROR"), "{reply:?}");
    proxy.set(Mode::Forward(Duration::ZERO));
    assert_eq!(get(&mut c, "k").await, None);
    assert_eq!(set(&mut c, "k", b"after").await, "STORED\r\n");
}

#[tokio::test]
async fn a_client_gone_mid_set_leaves_no_object_and_no_upload() {
    if !common::have_s3() {
        return;
    }
    let prefix = common::unique_prefix("large-gone");
    let dir = tempfile::tempdir().unwrap();
    let config = common::config(Backend::S3, &prefix, dir.path(), STREAMING);
    let server = TestServer::start_config(config, dir).await;
    let mut c = server.client().await;
    c.send(format!("set k 0 0 {}\r\n", 30 * MIB).as_bytes())
        .await;
    c.send(&value(20 * MIB, 5)).await;
    let s3 = common::s3::sdk_client(&common::s3_endpoint());
    let uploads = || async {
        let out = s3
            .list_multipart_uploads()
            .bucket(common::TEST_BUCKET)
            .prefix(&prefix)
            .send()
            .await
            .unwrap();
        out.uploads().len()
    };
    // Parts are on their way: an upload is open.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while uploads().await == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no upload began");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(c);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while uploads().await > 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the upload was not aborted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut other = server.client().await;
    assert_eq!(get(&mut other, "k").await, None);
}

#[tokio::test]
async fn a_long_data_block_that_ends_badly_is_refused_and_stores_nothing() {
    let server = TestServer::start(Backend::Dir, "large-bad-end", STREAMING).await;
    let mut c = server.client().await;
    c.send(format!("set k 0 0 {}\r\n", MIB).as_bytes()).await;
    c.send(&value(MIB, 6)).await;
    c.send(b"XX").await;
    assert_eq!(line(&mut c).await, "CLIENT_ERROR bad data chunk\r\n");
    assert_eq!(get(&mut c, "k").await, None);
}

#[tokio::test]
async fn commands_that_need_a_long_value_whole_refuse_it() {
    let server = TestServer::start(Backend::Dir, "large-refused", STREAMING).await;
    let mut c = server.client().await;
    let data = value(MIB, 7);
    assert_eq!(set(&mut c, "k", &data).await, "STORED\r\n");
    let too_large = "SERVER_ERROR object too large for cache\r\n";
    // Only `set` streams: other storage commands above stream_above_bytes are refused.
    c.send(format!("add k2 0 0 {}\r\n", data.len()).as_bytes())
        .await;
    c.send(&data).await;
    c.send(b"\r\n").await;
    assert_eq!(line(&mut c).await, too_large);
    assert_eq!(c.line(b"append k 0 0 1\r\nx\r\n").await, too_large);
    assert_eq!(c.line(b"touch k 100\r\n").await, too_large);
    // A new TTL writes the item back.
    assert_eq!(c.line(b"mg k v T30\r\n").await, too_large);
    // A long value is no number; delete needs no value.
    assert_eq!(
        c.line(b"incr k 1\r\n").await,
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n"
    );
    let me = c.line(b"me k\r\n").await;
    assert!(me.contains(&format!("size={MIB}")), "{me:?}");
    assert_eq!(c.line(b"delete k\r\n").await, "DELETED\r\n");
    // Over max_item_size, as memcached.
    c.send(format!("set k 0 0 {}\r\n", 65 * MIB).as_bytes())
        .await;
    assert_eq!(line(&mut c).await, too_large);
}

#[tokio::test]
async fn a_long_value_changed_behind_a_replica_is_read_at_its_new_version() {
    if !common::have_s3() {
        return;
    }
    let prefix = common::unique_prefix("large-replicas");
    let start = |extra: String| {
        let dir = tempfile::tempdir().unwrap();
        let config = common::config(Backend::S3, &prefix, dir.path(), &extra);
        TestServer::start_config(config, dir)
    };
    let a = start(STREAMING.to_owned()).await;
    // B trusts what RAM knows for a minute: only a failed open tells it the value changed.
    let b = start(format!("{STREAMING}revalidate_after_ms = 60000\n")).await;
    let (mut ca, mut cb) = (a.client().await, b.client().await);
    assert_eq!(set(&mut ca, "k", &value(MIB, 1)).await, "STORED\r\n");
    assert!(get(&mut cb, "k").await == Some(value(MIB, 1)));
    assert_eq!(set(&mut ca, "k", &value(2 * MIB, 2)).await, "STORED\r\n");
    assert!(
        get(&mut cb, "k").await == Some(value(2 * MIB, 2)),
        "the new version"
    );
    assert_eq!(ca.line(b"delete k\r\n").await, "DELETED\r\n");
    assert_eq!(get(&mut cb, "k").await, None, "gone behind B: a miss");
}

#[tokio::test]
async fn a_meta_get_streams_a_long_value_with_its_flags() {
    let server = TestServer::start(Backend::Dir, "large-meta", STREAMING).await;
    let mut c = server.client().await;
    let data = value(3 * MIB, 8);
    assert_eq!(set(&mut c, "k", &data).await, "STORED\r\n");
    c.send(b"mg k s f v k Oab\r\nmg k s\r\nmn\r\n").await;
    let head = line(&mut c).await;
    assert_eq!(
        head,
        format!("VA {} s{} f7 kk Oab\r\n", data.len(), data.len())
    );
    let mut got = c.read_exact(data.len() + 2).await;
    assert_eq!(&got[data.len()..], b"\r\n");
    got.truncate(data.len());
    assert!(got == data, "the value whole");
    assert_eq!(line(&mut c).await, format!("HD s{}\r\n", data.len()));
    assert_eq!(line(&mut c).await, "MN\r\n");
}

#[tokio::test]
async fn a_binary_get_of_a_long_value_says_too_large_even_when_quiet() {
    let server = TestServer::start(Backend::Dir, "large-binary", STREAMING).await;
    let mut text = server.client().await;
    assert_eq!(set(&mut text, "k", &value(MIB, 9)).await, "STORED\r\n");
    let mut c = server.client().await;
    // GET, then GETQ (quiet: silent on a miss, never on an error), then NOOP.
    let mut frames = common::binary::frame(0x00, b"k", &[], &[], 0, 1);
    frames.extend(common::binary::frame(0x09, b"k", &[], &[], 0, 2));
    frames.extend(common::binary::frame(0x0a, b"", &[], &[], 0, 3));
    c.send(&frames).await;
    for opaque in 1..=3u32 {
        let head = c.read_exact(24).await;
        let status = u16::from_be_bytes([head[6], head[7]]);
        let body = u32::from_be_bytes(head[8..12].try_into().unwrap()) as usize;
        c.read_exact(body).await;
        assert_eq!(u32::from_be_bytes(head[12..16].try_into().unwrap()), opaque);
        let expected = if opaque == 3 { 0 } else { 0x03 };
        assert_eq!(
            status, expected,
            "frame {opaque}: 0x03 is memcached's too large"
        );
    }
}
