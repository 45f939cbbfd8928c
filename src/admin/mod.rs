//! The admin listener (`admin_listen`, off by default): `/metrics` for Prometheus,
//! `/healthz` (the process answers) and `/readyz` (the store answers), over HTTP/1.1.
//!
//! `/readyz` asks the store for a control object that never exists, a request as cheap as
//! S3 has (one GET answered 404), and keeps the verdict for [`READY_CACHE_MS`] so that
//! probes from many places cost one request a second at most.

mod metrics;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::command::Ctx;
use crate::store::Store;

/// How long a `/readyz` verdict is reused, in milliseconds.
pub const READY_CACHE_MS: u64 = 1000;
/// The control object `/readyz` reads: absent, so the answer is a cheap 404.
const READY_PROBE_OBJECT: &str = "readyz-probe";
/// Most admin connections open at once; a new one past it closes the oldest that is not
/// answering a request.
const MAX_ADMIN_CONNECTIONS: usize = 16;
/// An admin connection that sends no complete request for this long is closed.
const HEADER_TIMEOUT_SECS: u64 = 2;

/// What the handlers share.
struct Admin {
    ctx: Arc<Ctx>,
    registry: Registry,
    /// The last readiness verdict and when it was made.
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

/// One admin connection as the accept loop sees it.
struct Slot {
    /// Closes the connection.
    close: CancellationToken,
    /// A request is being answered: the connection is not to be evicted.
    busy: AtomicBool,
    /// The connection has ended.
    done: AtomicBool,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
///
/// At most [`MAX_ADMIN_CONNECTIONS`] connections are open. A new one that finds them all
/// taken closes the oldest that is not answering a request (silent, or idle between
/// requests): a probe sends its request at once and is answered in milliseconds, so
/// sockets that say nothing cannot starve it. When every slot is answering, the new
/// connection is closed and the client tries again.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let admin = Arc::new(Admin {
        registry: metrics::registry(ctx.clone()),
        ctx,
        ready: Mutex::new(None),
    });
    let mut slots: VecDeque<Arc<Slot>> = VecDeque::new();
    loop {
        let socket = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((socket, _)) => socket,
                Err(e) => {
                    tracing::warn!(cause = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Some(slot) = take_slot(&mut slots, &shutdown) else {
            continue; // every slot is answering a request: this socket is dropped
        };
        tokio::spawn(serve_connection(admin.clone(), socket, slot));
    }
}

/// A slot for a new connection, evicting the oldest one not answering a request when all
/// are taken; `None` when every one is answering.
fn take_slot(slots: &mut VecDeque<Arc<Slot>>, shutdown: &CancellationToken) -> Option<Arc<Slot>> {
    slots.retain(|s| !s.done.load(Relaxed));
    if slots.len() >= MAX_ADMIN_CONNECTIONS {
        let idle = slots.iter().position(|s| !s.busy.load(Relaxed))?;
        if let Some(evicted) = slots.remove(idle) {
            evicted.close.cancel();
        }
    }
    let slot = Arc::new(Slot {
        close: shutdown.child_token(),
        busy: AtomicBool::new(false),
        done: AtomicBool::new(false),
    });
    slots.push_back(slot.clone());
    Some(slot)
}

/// Serves one admin connection until it ends or its slot is closed.
async fn serve_connection(admin: Arc<Admin>, socket: tokio::net::TcpStream, slot: Arc<Slot>) {
    let busy = slot.clone();
    let service = hyper::service::service_fn(move |req| {
        let admin = admin.clone();
        let busy = busy.clone();
        async move {
            busy.busy.store(true, Relaxed);
            let response = admin.handle(req).await;
            busy.busy.store(false, Relaxed);
            Ok::<_, Infallible>(response)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(HEADER_TIMEOUT_SECS))
        .serve_connection(TokioIo::new(socket), service);
    tokio::select! {
        r = conn => if let Err(e) = r {
            tracing::debug!(cause = %e, "admin connection ended with an error");
        },
        _ = slot.close.cancelled() => {}
    }
    slot.done.store(true, Relaxed);
}

impl Admin {
    async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "GET only\n".into());
        }
        match req.uri().path() {
            "/metrics" => {
                let body = metrics::render(&self.registry);
                reply(StatusCode::OK, OPENMETRICS, body)
            }
            "/healthz" => reply(StatusCode::OK, TEXT, "ok\n".into()),
            "/readyz" => match self.ready().await {
                Ok(()) => reply(StatusCode::OK, TEXT, "ready\n".into()),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("store unavailable: {why}\n"),
                ),
            },
            _ => reply(StatusCode::NOT_FOUND, TEXT, "not found\n".into()),
        }
    }

    /// Whether the store answers, asked at most once per [`READY_CACHE_MS`]; concurrent
    /// probes wait for the one request in flight.
    async fn ready(&self) -> Result<(), String> {
        let mut last = self.ready.lock().await;
        if let Some((at, verdict)) = &*last {
            if at.elapsed() < Duration::from_millis(READY_CACHE_MS) {
                return verdict.clone();
            }
        }
        let verdict = match self.ctx.store.get_control(READY_PROBE_OBJECT).await {
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string().lines().next().unwrap_or_default().to_owned()),
        };
        *last = Some((Instant::now(), verdict.clone()));
        verdict
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(content_type),
    );
    response
}
