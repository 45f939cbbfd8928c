//! A small HTTP fault-injection proxy between s3cached and the S3 server, on loopback.
//!
//! Each client request is read whole (head and Content-Length body), then, depending on the
//! current [`Mode`], forwarded (optionally after a delay, optionally with headers removed)
//! over a fresh upstream connection, or answered with a fault. The proxy counts requests
//! and the most that were in flight at once.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does with the next requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Forward after this delay.
    Forward(Duration),
    /// Read the request and never answer.
    Stall,
    /// Close the client connection at once.
    Reset,
    /// Answer every request with this HTTP status and an S3-style error body.
    Status(u16, &'static str),
    /// Forward with S3 conditional headers removed (a store that ignores them).
    StripConditionals,
    /// Refuse PUTs that carry an ACL header, as buckets with ACLs disabled do.
    RefuseAcls,
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    pub requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Starts a proxy on 127.0.0.1:0 in front of `upstream` (`http://host:port`).
    pub async fn start(upstream: &str) -> Proxy {
        let upstream: SocketAddr = upstream
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("upstream host:port");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(Mutex::new(Mode::Forward(Duration::ZERO)));
        let requests = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let shared = (
            mode.clone(),
            requests.clone(),
            in_flight.clone(),
            max_in_flight.clone(),
        );
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let (mode, requests, in_flight, max_in_flight) = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, mode, requests, in_flight, max_in_flight).await;
                });
            }
        });
        Proxy {
            addr,
            mode,
            requests,
            in_flight,
            max_in_flight,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    pub fn reset_counters(&self) {
        self.requests.store(0, SeqCst);
        self.max_in_flight
            .store(self.in_flight.load(SeqCst), SeqCst);
    }
}

/// Reads one request (head and body) from the client; `None` at EOF.
async fn read_request(
    client: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> std::io::Result<Option<Vec<u8>>> {
    loop {
        if let Some(end) = find(buf, b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            let total = end + 4 + len;
            if buf.len() >= total {
                let request: Vec<u8> = buf.drain(..total).collect();
                return Ok(Some(request));
            }
        }
        let mut chunk = [0u8; 65536];
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Rewrites the request head: `Connection: close`, minus the named headers.
fn rewrite(request: &[u8], drop: &[&str]) -> Vec<u8> {
    let end = find(request, b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&request[..end]);
    let mut out = String::new();
    for (i, line) in head.split("\r\n").enumerate() {
        let lower = line.to_ascii_lowercase();
        if i > 0 && (lower.starts_with("connection:") || drop.iter().any(|d| lower.starts_with(d)))
        {
            continue;
        }
        out.push_str(line);
        out.push_str("\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&request[end + 4..]);
    bytes
}

fn error_response(status: u16, code: &str) -> Vec<u8> {
    let body = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected</Message></Error>"
    );
    format!(
        "HTTP/1.1 {status} Injected\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut client, &mut buf).await? {
        requests.fetch_add(1, SeqCst);
        let now = in_flight.fetch_add(1, SeqCst) + 1;
        max_in_flight.fetch_max(now, SeqCst);
        let current = mode.lock().unwrap().clone();
        let result = answer(&request, upstream, current).await;
        in_flight.fetch_sub(1, SeqCst);
        match result {
            Some(response) => client.write_all(&response).await?,
            None => return Ok(()), // reset
        }
    }
    Ok(())
}

async fn answer(request: &[u8], upstream: SocketAddr, mode: Mode) -> Option<Vec<u8>> {
    let head = String::from_utf8_lossy(&request[..find(request, b"\r\n\r\n").unwrap()])
        .to_ascii_lowercase();
    let drop: &[&str] = match mode {
        Mode::Forward(delay) => {
            tokio::time::sleep(delay).await;
            &[]
        }
        Mode::Stall => {
            futures::future::pending::<()>().await;
            unreachable!()
        }
        Mode::Reset => return None,
        Mode::Status(status, code) => return Some(error_response(status, code)),
        Mode::StripConditionals => &["if-match:", "if-none-match:"],
        Mode::RefuseAcls => {
            if head.starts_with("put ") && head.contains("\r\nx-amz-acl:") {
                return Some(error_response(400, "AccessControlListNotSupported"));
            }
            &[]
        }
    };
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.write_all(&rewrite(request, drop)).await.ok()?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).await.ok()?;
    Some(response)
}
