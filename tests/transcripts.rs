//! Wire transcripts: (send, expect) tables against a real server on 127.0.0.1:0, over the
//! directory store and over a real S3-compatible server.

mod common;

use common::{Backend, TestServer};

/// Each row: bytes sent, exact bytes expected back. Rows run in order on one connection.
const CLASSIC: &[(&str, &str)] = &[
    ("set k 5 0 2\r\nhi\r\n", "STORED\r\n"),
    ("get k\r\n", "VALUE k 5 2\r\nhi\r\nEND\r\n"),
    (
        "get k missing k\r\n",
        "VALUE k 5 2\r\nhi\r\nVALUE k 5 2\r\nhi\r\nEND\r\n",
    ),
    ("get k missing\n", "VALUE k 5 2\r\nhi\r\nEND\r\n"),
    ("add k 0 0 1\r\nx\r\n", "NOT_STORED\r\n"),
    ("replace nokey 0 0 1\r\nx\r\n", "NOT_STORED\r\n"),
    ("append k 0 0 1\r\n!\r\n", "STORED\r\n"),
    ("prepend k 0 0 1\r\n<\r\n", "STORED\r\n"),
    ("get k\r\n", "VALUE k 5 4\r\n<hi!\r\nEND\r\n"),
    ("set n 0 0 2\r\n10\r\n", "STORED\r\n"),
    ("incr n 5\r\n", "15\r\n"),
    ("decr n 100\r\n", "0\r\n"),
    (
        "incr n 18446744073709551615\r\n",
        "18446744073709551615\r\n",
    ),
    ("incr n 2\r\n", "1\r\n"),
    ("incr nokey 1\r\n", "NOT_FOUND\r\n"),
    (
        "incr k 1\r\n",
        "CLIENT_ERROR cannot increment or decrement non-numeric value\r\n",
    ),
    (
        "incr n abc\r\n",
        "CLIENT_ERROR invalid numeric delta argument\r\n",
    ),
    ("touch k 100\r\n", "TOUCHED\r\n"),
    ("touch nokey 100\r\n", "NOT_FOUND\r\n"),
    (
        "touch k abc\r\n",
        "CLIENT_ERROR invalid exptime argument\r\n",
    ),
    ("gat 100 k nokey\r\n", "VALUE k 5 4\r\n<hi!\r\nEND\r\n"),
    ("delete k\r\n", "DELETED\r\n"),
    ("delete k\r\n", "NOT_FOUND\r\n"),
    ("delete k 0\r\n", "NOT_FOUND\r\n"),
    (
        "delete k 1\r\n",
        "CLIENT_ERROR bad command line format.  Usage: delete <key> [noreply]\r\n",
    ),
    (
        "set q 0 0 1 noreply\r\na\r\nget q\r\n",
        "VALUE q 0 1\r\na\r\nEND\r\n",
    ),
    ("set e 0 -1 1\r\na\r\nget e\r\n", "STORED\r\nEND\r\n"),
    ("cas q 0 0 1 1\r\nb\r\n", "EXISTS\r\n"),
    ("cas nokey 0 0 1 1\r\nb\r\n", "NOT_FOUND\r\n"),
    ("verbosity 1\r\n", "OK\r\n"),
    ("verbosity\r\n", "ERROR\r\n"),
    ("bogus\r\n", "ERROR\r\n"),
    ("\r\n", "ERROR\r\n"),
    ("get\r\n", "ERROR\r\n"),
    ("set k 0 0\r\n", "ERROR\r\n"),
    (
        "set k abc 0 1\r\na\r\n",
        "CLIENT_ERROR bad command line format\r\nERROR\r\n",
    ),
    (
        "set k 0 0 1\r\nab\r\n",
        "CLIENT_ERROR bad data chunk\r\nERROR\r\n",
    ),
    (
        "set k 0 0 -1\r\n",
        "CLIENT_ERROR bad command line format\r\n",
    ),
    (
        "flush_all x\r\n",
        "CLIENT_ERROR invalid exptime argument\r\n",
    ),
    ("mn\r\n", "MN\r\n"),
    ("flush_all\r\n", "OK\r\n"),
    ("get q n\r\n", "END\r\n"),
    (
        "set after 0 0 1\r\nz\r\nget after\r\n",
        "STORED\r\nVALUE after 0 1\r\nz\r\nEND\r\n",
    ),
];

/// Meta commands whose replies do not depend on cas values.
const META: &[(&str, &str)] = &[
    ("ms mk 2 T0 F5\r\nhi\r\n", "HD\r\n"),
    (
        "mg mk v f t s k O123\r\n",
        "VA 2 f5 t-1 s2 kmk O123\r\nhi\r\n",
    ),
    ("mg missing v\r\n", "EN\r\n"),
    ("mg missing v q\r\nmn\r\n", "MN\r\n"),
    ("ms mk 2 q\r\nho\r\nmn\r\n", "MN\r\n"),
    ("ms mk 2 ME\r\nhi\r\n", "NS\r\n"),
    ("ms nokey 2 MR O7\r\nhi\r\n", "NS O7\r\n"),
    ("ms mk 1 MA\r\n!\r\nmg mk v\r\n", "HD\r\nVA 3\r\nho!\r\n"),
    // E sets the cas explicitly; C compares against it.
    (
        "ms ek 1 E4242\r\na\r\nmg ek c v\r\n",
        "HD\r\nVA 1 c4242\r\na\r\n",
    ),
    ("ms ek 1 C4241\r\nb\r\n", "EX\r\n"),
    ("ms ek 1 C4242 E5000 c\r\nb\r\n", "HD c5000\r\n"),
    ("md ek C1\r\n", "EX\r\n"),
    ("md ek C5000 q\r\nmg ek v\r\n", "EN\r\n"),
    ("ma cnt\r\n", "NF\r\n"),
    ("ma cnt N0 J5 v\r\n", "VA 1\r\n5\r\n"),
    ("ma cnt v D10 MD\r\n", "VA 1\r\n0\r\n"),
    ("ma cnt v MI D3 E77 c\r\n", "VA 1 c77\r\n3\r\n"),
    ("ma cnt C1\r\n", "EX\r\n"),
    (
        "me cnt\r\n",
        "ME cnt exp=-1 la=0 cas=77 fetch=no cls=1 size=1\r\n",
    ),
    ("me nokey\r\n", "EN\r\n"),
    ("mg new N30 v t\r\n", "VA 0 t30 W\r\n\r\n"),
    ("mg new N30 v\r\n", "VA 0 Z\r\n\r\n"),
    (
        "ms new 3 T30\r\nnew\r\nmg new v\r\n",
        "HD\r\nVA 3\r\nnew\r\n",
    ),
    ("md new I T30\r\nmg new v\r\n", "HD\r\nVA 3 X W\r\nnew\r\n"),
    ("mg new v\r\n", "VA 3 Z X\r\nnew\r\n"),
    (
        "ms ttl 1 T100\r\na\r\nmg ttl v R200\r\n",
        "HD\r\nVA 1 W\r\na\r\n",
    ),
    ("mg ttl v R200\r\n", "VA 1 Z\r\na\r\n"),
    ("mg AAEC b v k\r\n", "EN\r\n"),
    (
        "ms AAEC 1 b\r\nz\r\nmg AAEC b v k\r\n",
        "HD\r\nVA 1 kAAEC b\r\nz\r\n",
    ),
    ("mg mk zz\r\n", "CLIENT_ERROR invalid flag\r\n"),
    ("mg mk q zz\r\n", "CLIENT_ERROR invalid flag\r\n"),
    (
        "ms mk 2 MZ\r\nhi\r\nmn\r\n",
        "CLIENT_ERROR invalid mode for ms M token\r\nMN\r\n",
    ),
    ("get mk\r\n", "VALUE mk 0 3\r\nho!\r\nEND\r\n"),
];

#[tokio::test]
async fn meta_commands_on_dir() {
    run_table(Backend::Dir, META).await;
}

#[tokio::test]
async fn meta_commands_on_s3() {
    run_table(Backend::S3, META).await;
}

async fn run_table(backend: Backend, table: &[(&str, &str)]) {
    let server = TestServer::start(backend, "transcript", "").await;
    let mut c = server.client().await;
    for (send, expect) in table {
        c.roundtrip(send.as_bytes(), expect.as_bytes()).await;
    }
}

#[tokio::test]
async fn classic_commands_on_dir() {
    run_table(Backend::Dir, CLASSIC).await;
}

#[tokio::test]
async fn classic_commands_on_s3() {
    run_table(Backend::S3, CLASSIC).await;
}

/// Inputs that must not close the connection nor grow buffers without bound.
async fn bad_input_keeps_connection(backend: Backend) {
    let server = TestServer::start(backend, "badinput", "max_item_size = 2048\n").await;
    let mut c = server.client().await;
    // Too large: refused, its data skipped, the connection goes on; a set removes the old item.
    c.roundtrip(b"set big 0 0 1\r\nx\r\n", b"STORED\r\n").await;
    let mut send = b"set big 0 0 5000\r\n".to_vec();
    send.extend(vec![b'x'; 5000]);
    send.extend_from_slice(b"\r\nget big\r\n");
    c.roundtrip(&send, b"SERVER_ERROR object too large for cache\r\nEND\r\n")
        .await;
    // An over-long line.
    let mut long = vec![b'z'; 10_000];
    long.extend_from_slice(b"\r\nversion\r\n");
    c.roundtrip(
        &long,
        b"CLIENT_ERROR line too long\r\nVERSION 1.6.18-s3cached-0.1.0\r\n",
    )
    .await;
    // Keys: too long, or with control characters.
    let long_key = format!("get {}\r\n", "k".repeat(251));
    c.roundtrip(
        long_key.as_bytes(),
        b"CLIENT_ERROR bad command line format\r\n",
    )
    .await;
    // Random garbage never kills the server.
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8 | 1)
        .collect();
    c.send(&garbage).await;
    c.send(b"\r\nversion\r\n").await;
    let out = c.read_until(b"VERSION 1.6.18-s3cached-0.1.0\r\n").await;
    assert!(!out.is_empty());
    // A long multi-get line is fine.
    let mut get = b"get".to_vec();
    for i in 0..400 {
        get.extend_from_slice(format!(" key-{i:0>200}").as_bytes());
    }
    get.extend_from_slice(b"\r\n");
    c.roundtrip(&get, b"END\r\n").await;
}

#[tokio::test]
async fn bad_input_on_dir() {
    bad_input_keeps_connection(Backend::Dir).await;
}

#[tokio::test]
async fn bad_input_on_s3() {
    bad_input_keeps_connection(Backend::S3).await;
}

#[tokio::test]
async fn quit_and_binary_protocol_close_the_connection() {
    let server = TestServer::start(Backend::Dir, "quit", "").await;
    let mut c = server.client().await;
    c.send(b"set a 0 0 1\r\na\r\nquit\r\nget a\r\n").await;
    assert_eq!(c.read_exact(8).await, b"STORED\r\n");
    assert!(c.closed().await);
    let mut b = server.client().await;
    // A binary-protocol GET header.
    b.send(&[
        0x80, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, b'a',
    ])
    .await;
    assert!(b.closed().await);
    // The server is still fine.
    let mut c = server.client().await;
    c.roundtrip(b"get a\r\n", b"VALUE a 0 1\r\na\r\nEND\r\n")
        .await;
}

#[tokio::test]
async fn pipelined_requests_reply_in_order_and_keep_per_key_order() {
    let server = TestServer::start(Backend::Dir, "pipeline", "").await;
    let mut c = server.client().await;
    let mut send = Vec::new();
    let mut expect = Vec::new();
    for i in 0..300 {
        send.extend_from_slice(
            format!("set k{} 0 0 {}\r\n{}\r\n", i % 7, i.to_string().len(), i).as_bytes(),
        );
        expect.extend_from_slice(b"STORED\r\n");
        send.extend_from_slice(format!("get k{}\r\n", i % 7).as_bytes());
        expect.extend_from_slice(
            format!(
                "VALUE k{} 0 {}\r\n{}\r\nEND\r\n",
                i % 7,
                i.to_string().len(),
                i
            )
            .as_bytes(),
        );
    }
    c.roundtrip(&send, &expect).await;
}

#[tokio::test]
async fn stats_settings_hide_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = common::config(Backend::Dir, "p", dir.path(), "");
    config.access_key_id = "AKIASECRETID".parse().unwrap();
    config.secret_access_key = "verysecretkey".parse().unwrap();
    let server = TestServer::start_config(config, dir).await;
    let mut c = server.client().await;
    c.send(b"stats settings\r\n").await;
    let out = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    assert!(out.contains("STAT max_entries 0\r\n"), "{out}");
    assert!(!out.contains("AKIASECRETID") && !out.contains("verysecretkey"));
}

#[tokio::test]
async fn over_the_connection_cap_a_client_is_refused_at_once() {
    let server = TestServer::start(Backend::Dir, "cap", "max_connections = 2\n").await;
    let mut a = server.client().await;
    let mut b = server.client().await;
    a.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
        .await;
    b.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
        .await;
    // A third connection is told why and closed, as memcached does, even after a request.
    let mut third = server.client().await;
    third.send(b"version\r\n").await;
    assert_eq!(
        third.read_until(b"\r\n").await,
        b"ERROR Too many open connections\r\n"
    );
    assert!(third.closed().await);
    // Once a slot is free again (its task has seen the close), new clients are served.
    drop(a);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let mut next = server.client().await;
        if next.line(b"version\r\n").await.starts_with("VERSION ") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no slot freed");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    b.send(b"stats\r\n").await;
    let stats = String::from_utf8(b.read_until(b"END\r\n").await).unwrap();
    assert!(stats.contains("STAT rejected_connections "), "{stats}");
    assert!(
        !stats.contains("STAT rejected_connections 0\r\n"),
        "{stats}"
    );
}

#[tokio::test]
async fn consecutive_barriers_all_run() {
    let server = TestServer::start(Backend::Dir, "barriers", "").await;
    let mut c = server.client().await;
    c.roundtrip(
        b"flush_all\r\nflush_all\r\nflush_all 0\r\nversion\r\n",
        b"OK\r\nOK\r\nOK\r\nVERSION 1.6.18-s3cached-0.1.0\r\n",
    )
    .await;
    c.roundtrip(
        b"set a 0 0 1\r\na\r\nflush_all\r\nflush_all\r\nget a\r\n",
        b"STORED\r\nOK\r\nOK\r\nEND\r\n",
    )
    .await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_timeout() {
    let server = TestServer::start(Backend::Dir, "idle", "idle_timeout_secs = 1\n").await;
    let mut c = server.client().await;
    c.roundtrip(b"version\r\n", b"VERSION 1.6.18-s3cached-0.1.0\r\n")
        .await;
    assert!(c.closed().await, "an idle connection stays open");
    let mut c = server.client().await;
    c.send(b"stats\r\n").await;
    let stats = String::from_utf8(c.read_until(b"END\r\n").await).unwrap();
    assert!(stats.contains("STAT idle_kicks 1\r\n"), "{stats}");
}

#[tokio::test]
async fn shutdown_finishes_started_commands_then_closes() {
    let server = TestServer::start(Backend::Dir, "shutdown", "").await;
    let mut c = server.client().await;
    let mut pipeline = Vec::new();
    for i in 0..50 {
        pipeline.extend_from_slice(format!("set k{i} 0 0 1\r\nv\r\n").as_bytes());
    }
    c.send(&pipeline).await;
    // Wait for the first reply so the pipeline is under way, then shut down.
    assert_eq!(c.read_exact(8).await, b"STORED\r\n");
    server
        .app
        .shutdown(std::time::Duration::from_secs(10))
        .await;
    let rest = c.read_exact(8 * 49).await;
    assert_eq!(rest, b"STORED\r\n".repeat(49));
    assert!(c.closed().await);
}
