//! Shared test tooling: servers on 127.0.0.1:0 over the directory store or a real
//! S3-compatible server, and a raw wire client.
#![allow(dead_code)]

pub mod binary;
pub mod proxy;
pub mod s3;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use s3cached::app::{self, App};
use s3cached::config::Config;
use s3cached::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub use s3::{s3_endpoint, TEST_BUCKET};

/// Whether the S3 tests can run (an endpoint given, or moto started); `false` after
/// one line saying why not. S3 tests begin with `if !common::have_s3() { return; }`.
pub fn have_s3() -> bool {
    s3::endpoint().is_some()
}

/// Which backend a test server uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Dir,
    S3,
}

/// The reply to `version`, line end included.
pub fn version_line() -> String {
    format!("VERSION {}\r\n", s3cached::VERSION)
}

/// A unique object prefix, so tests sharing the bucket never see each other's objects.
pub fn unique_prefix(name: &str) -> String {
    format!("t-{name}-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish()
}

/// A config for a test server: loopback port 0, a temp dir or the test bucket.
pub fn config(backend: Backend, prefix: &str, data_dir: &std::path::Path, extra: &str) -> Config {
    let storage = match backend {
        Backend::Dir => format!(
            "data_dir = {:?}\nlocation = {prefix:?}\n",
            data_dir.display().to_string()
        ),
        Backend::S3 => format!(
            "{}s3_attempt_timeout_ms = 3000\ns3_operation_timeout_ms = 8000\n",
            s3::s3_toml(TEST_BUCKET, &s3_endpoint(), prefix)
        ),
    };
    // Culling is off unless a test asks for it.
    let culling = if extra.contains("max_entries") {
        ""
    } else {
        "max_entries = 0\n"
    };
    let text = format!("listen = \"127.0.0.1:0\"\n{culling}{storage}{extra}");
    Config::from_toml(&text).expect("test config")
}

/// A running server and what keeps its data alive.
pub struct TestServer {
    pub app: App,
    pub addr: SocketAddr,
    pub config: Config,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start(backend: Backend, name: &str, extra: &str) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let config = config(backend, &unique_prefix(name), dir.path(), extra);
        Self::start_config(config, dir).await
    }

    pub async fn start_config(config: Config, dir: tempfile::TempDir) -> TestServer {
        let app = app::start(config.clone()).await.expect("server starts");
        TestServer {
            addr: app.addr,
            app,
            config,
            _dir: dir,
        }
    }

    /// A server on S3 under `prefix` whose S3 traffic goes through `proxy`, with the
    /// test config's fields changed by `tweak` before it starts.
    pub async fn behind_with(
        proxy: &proxy::Proxy,
        prefix: &str,
        extra: &str,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let mut config = config(Backend::S3, prefix, dir.path(), extra);
        config.endpoint_url = proxy.url();
        tweak(&mut config);
        Self::start_config(config, dir).await
    }

    /// A server on S3 under `prefix` whose S3 traffic goes through `proxy`.
    pub async fn behind(proxy: &proxy::Proxy, prefix: &str, extra: &str) -> TestServer {
        Self::behind_with(proxy, prefix, extra, |_| {}).await
    }

    pub fn store(&self) -> Arc<dyn Store> {
        self.app.ctx.store.clone()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr).await
    }
}

/// A raw memcached wire client.
pub struct Client {
    pub stream: TcpStream,
}

/// How long a test waits for a reply before failing.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

impl Client {
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        stream.set_nodelay(true).unwrap();
        Client { stream }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("send");
    }

    /// Reads exactly `n` bytes.
    pub async fn read_exact(&mut self, n: usize) -> Vec<u8> {
        let mut buf = vec![0; n];
        tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_exact(&mut buf))
            .await
            .expect("reply in time")
            .expect("read");
        buf
    }

    /// Reads until the reply ends with `terminator`.
    pub async fn read_until(&mut self, terminator: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        // On the heap: an array here is copied into every awaiting caller's frame in debug builds.
        let mut chunk = vec![0u8; 65536];
        while !out.ends_with(terminator) {
            let n = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read(&mut chunk))
                .await
                .expect("reply in time")
                .expect("read");
            assert!(
                n > 0,
                "connection closed; got so far: {:?}",
                String::from_utf8_lossy(&out)
            );
            out.extend_from_slice(&chunk[..n]);
        }
        out
    }

    /// Sends a request and checks the reply is exactly `expect`.
    pub async fn roundtrip(&mut self, send: &[u8], expect: &[u8]) {
        self.send(send).await;
        let mut got = vec![0; expect.len()];
        let read = tokio::time::timeout(REPLY_TIMEOUT, self.stream.read_exact(&mut got)).await;
        assert!(
            matches!(read, Ok(Ok(_))),
            "no full reply to {:?}: expected {:?}",
            String::from_utf8_lossy(send),
            String::from_utf8_lossy(expect)
        );
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(expect),
            "reply to {:?}",
            String::from_utf8_lossy(send)
        );
    }

    /// Sends `send` and returns one line of reply (through `\r\n`).
    pub async fn line(&mut self, send: &[u8]) -> String {
        self.send(send).await;
        String::from_utf8(self.read_until(b"\r\n").await).unwrap()
    }

    /// Whether the server closed the connection (reads EOF within the timeout).
    /// One `stats` value.
    pub async fn stat(&mut self, name: &str) -> u64 {
        self.send(b"stats\r\n").await;
        let reply = String::from_utf8(self.read_until(b"END\r\n").await).unwrap();
        reply
            .lines()
            .find_map(|l| l.strip_prefix(&format!("STAT {name} ")))
            .unwrap_or_else(|| panic!("no stat {name}"))
            .parse()
            .unwrap()
    }

    /// The value a `get` of `key` returns (as text), or `None` on a miss.
    pub async fn get_value(&mut self, key: &str) -> Option<String> {
        self.send(format!("get {key}\r\n").as_bytes()).await;
        let reply = String::from_utf8(self.read_until(b"END\r\n").await).unwrap();
        let mut lines = reply.split("\r\n");
        let first = lines.next().unwrap();
        first
            .starts_with("VALUE ")
            .then(|| lines.next().unwrap().to_owned())
    }

    /// Reads until the server closes the connection; returns the bytes read.
    pub async fn closed_after_reading(&mut self) -> usize {
        let mut chunk = vec![0u8; 65536];
        let mut total = 0;
        loop {
            match tokio::time::timeout(REPLY_TIMEOUT, self.stream.read(&mut chunk)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return total,
                Ok(Ok(n)) => total += n,
                Err(_) => panic!("the connection stayed open"),
            }
        }
    }

    pub async fn closed(&mut self) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(REPLY_TIMEOUT, self.stream.read(&mut buf)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}
