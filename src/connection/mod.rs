//! One client connection: its first byte picks the protocol, whose driver then serves it.
//!
//! The text and the binary driver are siblings. They share what lies between the socket and
//! the command layer: the buffers, the writer and the input's deadlines ([`io`]), the memory
//! budget's admission of each request and buffer ([`admission`]), and the login ([`login`]);
//! the text driver runs its requests through the [`pipeline`]. Every buffer is bounded: the
//! read buffer by the parser's limits, the pipeline by [`MAX_PIPELINE_DEPTH`], and all of them
//! together, across connections, by the memory [`Budget`].

mod admission;
mod binary;
mod io;
mod login;
mod pipeline;
mod text;

pub use pipeline::MAX_PIPELINE_DEPTH;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::budget::Budget;
use crate::command::Ctx;
use crate::conns::Registered;
use crate::protocol::{self, Limits};
use crate::sasl::{FailedLogins, Users};
use crate::stats::Stats;
use io::INITIAL_BUFFER_BYTES;

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    /// The parser's limits: key, line and item sizes.
    pub limits: Limits,
    /// Close a connection with nothing in flight after this long without input.
    pub idle_timeout: Option<Duration>,
    /// Close a connection whose started request is not complete after this long, so a
    /// client trickling bytes cannot hold a slot and a buffer forever.
    pub request_timeout: Option<Duration>,
    /// Close a connection whose waiting replies are not all written after this long, so a
    /// client that stops reading cannot hold a slot and its replies forever.
    pub write_timeout: Option<Duration>,
    /// The memory budget every connection draws on.
    pub budget: Arc<Budget>,
    /// SASL users: when set, clients must log in (binary SASL, or text `set` with `text_auth`).
    pub sasl: Option<Arc<Users>>,
    /// Let text-protocol clients log in with memcached's `set <any> 0 0 <n>` + `user password`;
    /// without it, text clients are refused while SASL is on.
    pub text_auth: bool,
    /// The failed-login limits of every client address, shared by all connections.
    pub failed_logins: Arc<FailedLogins>,
    /// This connection's client address, which its failed logins are limited by; set by the
    /// accept loop (`None`, as in tests over in-memory pipes: one address for all).
    pub client: Option<IpAddr>,
}

impl ConnectionConfig {
    /// Settings with the given limits, no timeouts and an unshared budget (for tests).
    pub fn new(limits: Limits, memory_limit_bytes: u64) -> Self {
        ConnectionConfig {
            limits,
            idle_timeout: None,
            request_timeout: None,
            write_timeout: None,
            budget: Budget::new(memory_limit_bytes),
            sasl: None,
            text_auth: false,
            failed_logins: Arc::default(),
            client: None,
        }
    }
}

/// Serves one client until it quits, errs, idles out or the server shuts down, over a TCP
/// socket or a TLS stream; `registered`, its row in `stats conns`, is kept up to date.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut socket: S,
    ctx: Arc<Ctx>,
    config: ConnectionConfig,
    shutdown: CancellationToken,
    registered: Option<Registered>,
) {
    let mut first = BytesMut::with_capacity(INITIAL_BUFFER_BYTES);
    // memcached tells the protocols apart by the first byte of a connection.
    let first_byte = first_read(&mut socket, &mut first, &config, &shutdown)
        .await
        .copied();
    Stats::add(&ctx.stats.bytes_read, first.len() as u64);
    if let (Some(registered), Some(_)) = (&registered, first_byte) {
        registered.working();
    }
    match first_byte {
        Some(protocol::binary::REQUEST_MAGIC) => {
            let served = binary::serve(&mut socket, &ctx, &config, first, &shutdown, registered);
            if let Err(e) = served.await {
                tracing::debug!(cause = %e, "binary connection ended with an error");
            }
        }
        Some(_) => {
            let served = text::serve(&mut socket, ctx, &config, first, &shutdown, registered);
            if let Err(e) = served.await {
                tracing::debug!(cause = %e, "connection ended with an error");
            }
        }
        None => return,
    }
    let _ = socket.shutdown().await;
    linger(&mut socket).await;
}

/// Longest a closed connection keeps reading what its client still sends.
const LINGER: Duration = Duration::from_secs(1);
/// A closed connection whose client sends nothing for this long is let go.
const LINGER_QUIET: Duration = Duration::from_millis(100);

/// Reads and drops what the client still sends after the server closed its side, until the
/// client closes too, goes quiet, or [`LINGER`] passes. Closing a socket with unread input
/// makes the kernel reset the connection, which throws away the replies still on their way
/// (a binary client whose stream ends in garbage lost the tail of the reply before it).
async fn linger<S: AsyncRead + Unpin>(socket: &mut S) {
    let mut buf = vec![0u8; 4096];
    let until = tokio::time::Instant::now() + LINGER;
    while tokio::time::Instant::now() < until {
        match tokio::time::timeout(LINGER_QUIET, socket.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// Reads until the first byte arrives; `None` if the client left, idled out or the server
/// is shutting down first.
async fn first_read<'b, S: AsyncRead + Unpin>(
    socket: &mut S,
    buf: &'b mut BytesMut,
    config: &ConnectionConfig,
    shutdown: &CancellationToken,
) -> Option<&'b u8> {
    let read = async {
        match config.idle_timeout {
            Some(d) => tokio::time::timeout(d, socket.read_buf(buf)).await.ok(),
            None => Some(socket.read_buf(buf).await),
        }
    };
    let n = tokio::select! {
        read = read => read?.ok()?,
        _ = shutdown.cancelled() => return None,
    };
    buf.first().filter(|_| n > 0)
}
