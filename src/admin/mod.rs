//! The admin listener (`admin_listen`, off by default): `/metrics` for Prometheus,
//! `/healthz` (the process answers) and `/readyz` (the store answers), over HTTP/1.1.
//!
//! `/readyz` asks the store for a control object that never exists, a request as cheap as
//! S3 has (one GET answered 404), and keeps the verdict for [`READY_CACHE_MS`] so that
//! probes from many places cost one request a second at most.

mod metrics;

use std::convert::Infallible;
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
/// Most admin connections served at once; more wait in the accept queue.
const MAX_ADMIN_CONNECTIONS: usize = 16;
/// An admin connection that sends no complete request for this long is closed.
const HEADER_TIMEOUT_SECS: u64 = 10;

/// What the handlers share.
struct Admin {
    ctx: Arc<Ctx>,
    registry: Registry,
    /// The last readiness verdict and when it was made.
    ready: Mutex<Option<(Instant, Result<(), String>)>>,
}

/// Serves the admin endpoints on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let admin = Arc::new(Admin {
        registry: metrics::registry(ctx.clone()),
        ctx,
        ready: Mutex::new(None),
    });
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_ADMIN_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            _ = shutdown.cancelled() => return,
        };
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
        let admin = admin.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.handle(req).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(HEADER_TIMEOUT_SECS))
                .serve_connection(TokioIo::new(socket), service);
            tokio::select! {
                r = conn => if let Err(e) = r {
                    tracing::debug!(cause = %e, "admin connection ended with an error");
                },
                _ = shutdown.cancelled() => {}
            }
        });
    }
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
