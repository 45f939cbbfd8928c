//! A small HTTP fault-injection proxy between s3cached and the S3 server, on loopback.
//!
//! Each client request is read whole (head and Content-Length body), then, depending on the
//! current [`Mode`], forwarded (optionally after a delay, optionally with headers removed)
//! over a fresh upstream connection, or answered with a fault. Write faults can come after the
//! store has applied the write (the answer is then dropped, delayed or replaced), to test
//! that a write whose answer was lost is not applied twice. The proxy counts requests, the
//! most that were in flight at once and the response bytes it delivered, and keeps the head
//! (request line and headers) of every request it received.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::s3::{head_end, read_message};

/// Most request heads kept (a bound for long tests; later heads are not kept).
pub const MAX_HEADS_KEPT: usize = 20_000;

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
    /// Apply `fault` to the next `writes` PUT or DELETE requests, then forward everything
    /// again; other requests are forwarded meanwhile.
    OnWrites { fault: WriteFault, writes: usize },
    /// Forward everything, and close the connection instead of answering this many in a
    /// thousand PUTs and DELETEs, chosen at random, after the store answered them (applied
    /// or refused): lost answers under a load.
    LoseWriteAnswers { per_mille: u32 },
    /// Answer this many in a thousand requests, chosen at random, `503 SlowDown` without
    /// forwarding them (S3 throttling a prefix); forward the others.
    Throttle { per_mille: u32 },
    /// A latency with a tail: forward each request after `slow` for `slow_per_mille` in a
    /// thousand of them, chosen at random, after `fast` for the others.
    Tail {
        fast: Duration,
        slow: Duration,
        slow_per_mille: u32,
    },
    /// Forward everything, but send only the first `after` bytes of each answer to a GET,
    /// then close: a read cut midway.
    CutBodies { after: usize },
    /// Forward the next `requests` requests whose method is `method` after `delay`, every
    /// other request at once; then forward everything at once.
    DelayNext {
        method: &'static str,
        requests: usize,
        delay: Duration,
    },
}

/// What happens to a PUT or DELETE under [`Mode::OnWrites`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFault {
    /// Forward it (the store applies it), then close the connection without an answer.
    DropAnswer,
    /// Forward it, then hold the answer this long (past the client's attempt deadline).
    DelayAnswer(Duration),
    /// Forward it, then answer this status instead of the store's answer.
    ReplaceAnswer(u16, &'static str),
    /// Answer this status without forwarding (the write is not applied).
    Refuse(u16, &'static str),
}

pub struct Proxy {
    pub addr: SocketAddr,
    mode: Arc<Mutex<Mode>>,
    pub requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    pub max_in_flight: Arc<AtomicUsize>,
    /// Response bytes written to clients.
    pub bytes_out: Arc<AtomicUsize>,
    /// Answers to writes dropped under [`Mode::LoseWriteAnswers`].
    pub answers_lost: Arc<AtomicUsize>,
    /// Requests whose client hung up before they were answered (a hedged GET's loser).
    pub abandoned: Arc<AtomicUsize>,
    /// The head of every request received, in order (request line and headers, as sent).
    pub heads: Arc<Mutex<Vec<String>>>,
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
        let bytes_out = Arc::new(AtomicUsize::new(0));
        let answers_lost = Arc::new(AtomicUsize::new(0));
        let abandoned = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(Mutex::new(Vec::new()));
        let shared = Counters {
            heads: heads.clone(),
            mode: mode.clone(),
            requests: requests.clone(),
            in_flight: in_flight.clone(),
            max_in_flight: max_in_flight.clone(),
            bytes_out: bytes_out.clone(),
            answers_lost: answers_lost.clone(),
            abandoned: abandoned.clone(),
        };
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let shared = shared.clone();
                tokio::spawn(async move {
                    let _ = serve(client, upstream, shared).await;
                });
            }
        });
        Proxy {
            addr,
            mode,
            requests,
            in_flight,
            max_in_flight,
            bytes_out,
            answers_lost,
            abandoned,
            heads,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Sets the mode; returns the one it replaces (to see that counted faults were used).
    pub fn set_and_get(&self, mode: Mode) -> Mode {
        std::mem::replace(&mut *self.mode.lock().unwrap(), mode)
    }

    /// The heads of the requests received so far.
    pub fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    pub fn reset_counters(&self) {
        self.requests.store(0, SeqCst);
        self.max_in_flight
            .store(self.in_flight.load(SeqCst), SeqCst);
    }
}

/// Rewrites the request head: `Connection: close`, minus the named headers.
fn rewrite(request: &[u8], drop: &[&str]) -> Vec<u8> {
    let end = head_end(request).unwrap();
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

#[derive(Clone)]
struct Counters {
    mode: Arc<Mutex<Mode>>,
    requests: Arc<AtomicUsize>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    bytes_out: Arc<AtomicUsize>,
    answers_lost: Arc<AtomicUsize>,
    abandoned: Arc<AtomicUsize>,
    heads: Arc<Mutex<Vec<String>>>,
}

/// The mode for this request; counts down [`Mode::OnWrites`].
fn take_mode(mode: &Mutex<Mode>, request: &[u8]) -> Mode {
    let mut mode = mode.lock().unwrap();
    let current = mode.clone();
    match current {
        Mode::OnWrites { fault, writes }
            if request.starts_with(b"PUT ") || request.starts_with(b"DELETE ") =>
        {
            *mode = if writes > 1 {
                Mode::OnWrites {
                    fault: fault.clone(),
                    writes: writes - 1,
                }
            } else {
                Mode::Forward(Duration::ZERO)
            };
            Mode::OnWrites { fault, writes: 1 }
        }
        Mode::OnWrites { .. } => Mode::Forward(Duration::ZERO),
        Mode::DelayNext {
            method,
            requests,
            delay,
        } if request.starts_with(format!("{method} ").as_bytes()) => {
            *mode = if requests > 1 {
                Mode::DelayNext {
                    method,
                    requests: requests - 1,
                    delay,
                }
            } else {
                Mode::Forward(Duration::ZERO)
            };
            Mode::Forward(delay)
        }
        Mode::DelayNext { .. } => Mode::Forward(Duration::ZERO),
        other => other,
    }
}

async fn serve(
    mut client: TcpStream,
    upstream: SocketAddr,
    counters: Counters,
) -> std::io::Result<()> {
    let mut buf = Vec::new();
    while let Some(request) = read_message(&mut client, &mut buf).await? {
        counters.requests.fetch_add(1, SeqCst);
        let end = head_end(&request).unwrap_or(request.len());
        let head = String::from_utf8_lossy(&request[..end]).into_owned();
        {
            let mut heads = counters.heads.lock().unwrap();
            if heads.len() < MAX_HEADS_KEPT {
                heads.push(head);
            }
        }
        let now = counters.in_flight.fetch_add(1, SeqCst) + 1;
        counters.max_in_flight.fetch_max(now, SeqCst);
        let current = take_mode(&counters.mode, &request);
        let cut = match current {
            Mode::CutBodies { after } if request.starts_with(b"GET ") => Some(after),
            _ => None,
        };
        let result = tokio::select! {
            result = answer(&request, upstream, current, &counters.answers_lost) => result,
            () = hung_up(&client) => {
                counters.in_flight.fetch_sub(1, SeqCst);
                counters.abandoned.fetch_add(1, SeqCst);
                return Ok(());
            }
        };
        counters.in_flight.fetch_sub(1, SeqCst);
        let Some(response) = result else {
            return Ok(()); // reset
        };
        let sent = &response[..cut.unwrap_or(usize::MAX).min(response.len())];
        for chunk in sent.chunks(64 * 1024) {
            client.write_all(chunk).await?;
            counters.bytes_out.fetch_add(chunk.len(), SeqCst);
        }
        if sent.len() < response.len() {
            return Ok(());
        }
    }
    Ok(())
}

/// Completes when the client closes its connection (it sends nothing more while it waits
/// for an answer).
async fn hung_up(client: &TcpStream) {
    let mut byte = [0u8; 1];
    match client.peek(&mut byte).await {
        Ok(0) | Err(_) => {}
        Ok(_) => futures::future::pending().await,
    }
}

async fn answer(
    request: &[u8],
    upstream: SocketAddr,
    mode: Mode,
    answers_lost: &AtomicUsize,
) -> Option<Vec<u8>> {
    let head = String::from_utf8_lossy(&request[..head_end(request).unwrap()]).to_ascii_lowercase();
    let drop: &[&str] = match mode {
        Mode::Forward(delay) => {
            tokio::time::sleep(delay).await;
            &[]
        }
        Mode::CutBodies { .. } => &[],
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
        Mode::Tail {
            fast,
            slow,
            slow_per_mille,
        } => {
            let slow_one = rand::random::<u32>() % 1000 < slow_per_mille;
            tokio::time::sleep(if slow_one { slow } else { fast }).await;
            &[]
        }
        Mode::DelayNext { .. } => unreachable!("take_mode turns it into Forward"),
        Mode::Throttle { per_mille } => {
            if rand::random::<u32>() % 1000 < per_mille {
                return Some(error_response(503, "SlowDown"));
            }
            &[]
        }
        Mode::LoseWriteAnswers { per_mille } => {
            let response = forward(request, upstream, &[]).await?;
            let write = head.starts_with("put ") || head.starts_with("delete ");
            if write && rand::random::<u32>() % 1000 < per_mille {
                answers_lost.fetch_add(1, SeqCst);
                return None;
            }
            return Some(response);
        }
        Mode::OnWrites { fault, .. } => {
            if let WriteFault::Refuse(status, code) = fault {
                return Some(error_response(status, code));
            }
            let response = forward(request, upstream, &[]).await?;
            assert!(
                response.starts_with(b"HTTP/1.1 2"),
                "the faulted write was applied: {:?}",
                String::from_utf8_lossy(&response[..response.len().min(200)])
            );
            return match fault {
                WriteFault::DropAnswer => None,
                WriteFault::DelayAnswer(delay) => {
                    tokio::time::sleep(delay).await;
                    Some(response)
                }
                WriteFault::ReplaceAnswer(status, code) => Some(error_response(status, code)),
                WriteFault::Refuse(..) => unreachable!(),
            };
        }
    };
    forward(request, upstream, drop).await
}

/// Sends the request upstream on a fresh connection; the whole response.
async fn forward(request: &[u8], upstream: SocketAddr, drop: &[&str]) -> Option<Vec<u8>> {
    let mut up = TcpStream::connect(upstream).await.ok()?;
    up.write_all(&rewrite(request, drop)).await.ok()?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).await.ok()?;
    Some(response)
}
