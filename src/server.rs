//! The accept loop: one task per connection up to the cap; over it, memcached's refusal.
//!
//! With TLS, a client's handshake holds a place in the handshake pool ([`Tls::enter`]), not a
//! connection slot: only a client whose handshake is done takes one, so sockets that never
//! finish a handshake cannot keep others out of the cap.

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::Ctx;
use crate::connection::{self, ConnectionConfig};
use crate::conns::Registered;
use crate::stats::Stats;
use crate::tls::{Slot, Tls};

/// memcached's reply to a client over the connection cap, sent before closing it.
pub const TOO_MANY_CONNECTIONS: &[u8] = b"ERROR Too many open connections\r\n";
/// Most refused connections draining their input at once; beyond it they close at once.
pub const MAX_DRAINING_REFUSALS: usize = 64;
/// How long a refused connection may drain its input, in milliseconds.
pub const REFUSAL_DRAIN_MS: u64 = 500;
/// Most input bytes drained from a refused connection.
pub const REFUSAL_DRAIN_MAX_BYTES: usize = 64 * 1024;
/// Pause after the first failed accept of a burst, in milliseconds.
pub const ACCEPT_BACKOFF_MIN_MS: u64 = 10;
/// Longest pause between failed accepts, in milliseconds.
pub const ACCEPT_BACKOFF_MAX_MS: u64 = 1000;

/// Accepts clients until `shutdown` fires; returns the tracker of live connections so the
/// caller can wait for them to drain. With `tls`, each client is served inside TLS.
pub async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    config: ConnectionConfig,
    max_connections: usize,
    tls: Option<Arc<Tls>>,
    shutdown: CancellationToken,
) -> TaskTracker {
    let permits = Arc::new(Semaphore::new(max_connections));
    let draining = Arc::new(Semaphore::new(MAX_DRAINING_REFUSALS));
    let connections = TaskTracker::new();
    let mut backoff = AcceptBackoff::default();
    let _listening = listener
        .local_addr()
        .map(|local| ctx.conns.listening(fd_of(&listener), local));
    loop {
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff.succeeded();
                    a
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    Stats::incr(&ctx.stats.accept_errors);
                    let pause = backoff.failed(&e);
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => continue,
                        _ = shutdown.cancelled() => break,
                    }
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // At the cap, the refusal comes before any handshake, in plain text (as memcached).
        if permits.available_permits() == 0 {
            refuse(socket, &ctx.stats, &draining);
            continue;
        }
        let _ = socket.set_nodelay(true);
        let client = Client::new(&ctx, &config, &shutdown, peer);
        match &tls {
            None => match permits.clone().try_acquire_owned() {
                Ok(permit) => {
                    connections.spawn(client.serve(socket, permit));
                }
                Err(_) => refuse(socket, &ctx.stats, &draining),
            },
            Some(tls) => {
                let slot = tls.enter();
                let serving = client.serve_tls(tls.clone(), slot, socket, permits.clone());
                connections.spawn(serving);
            }
        }
    }
    connections.close();
    connections
}

/// An accepted client, and what serving it takes.
struct Client {
    /// What requests run against.
    ctx: Arc<Ctx>,
    /// The connection settings, with this client's address.
    config: ConnectionConfig,
    /// Fires when the server shuts down.
    shutdown: CancellationToken,
    /// Where the client connects from.
    peer: SocketAddr,
}

impl Client {
    /// A client at `peer`, served with `config`.
    fn new(
        ctx: &Arc<Ctx>,
        config: &ConnectionConfig,
        shutdown: &CancellationToken,
        peer: SocketAddr,
    ) -> Client {
        let mut config = config.clone();
        config.client = Some(peer.ip());
        Client {
            ctx: ctx.clone(),
            config,
            shutdown: shutdown.clone(),
            peer,
        }
    }

    /// Serves the client over plain TCP in the connection slot `permit`.
    async fn serve(self, socket: TcpStream, permit: OwnedSemaphorePermit) {
        let registered = self.register(&socket);
        self.serve_connection(socket, registered, permit).await
    }

    /// Runs the TLS handshake in `slot` (under its deadline; abandoned when it gives way to
    /// a newer one, or at shutdown), then serves the client inside TLS in a connection slot
    /// of `permits`; with none left it is refused, inside TLS. A client that fails the
    /// handshake (a plain-text client, a missing or untrusted client certificate) is
    /// closed; the reason is logged at debug level.
    async fn serve_tls(
        self,
        tls: Arc<Tls>,
        slot: Slot,
        socket: TcpStream,
        permits: Arc<Semaphore>,
    ) {
        let accepted = tokio::select! {
            // The handshake first: a client whose bytes are in is heard before a drop is.
            biased;
            accepted = tls.accept_in(&slot, socket) => accepted,
            _ = slot.dropped() => {
                Stats::incr(&self.ctx.stats.tls_handshakes_dropped);
                tracing::debug!(peer = %self.peer, "TLS handshake dropped for a newer one");
                return;
            }
            _ = self.shutdown.cancelled() => return,
        };
        drop(slot);
        let stream = match accepted {
            Ok(stream) => stream,
            Err(e) => return tracing::debug!(cause = %e, "TLS handshake failed"),
        };
        let Ok(permit) = permits.try_acquire_owned() else {
            return refuse_tls(stream, &self.ctx.stats).await;
        };
        let registered = self.register(stream.get_ref().0);
        self.serve_connection(stream, registered, permit).await
    }

    /// Serves the connection until it ends, counted as open meanwhile, then gives back its
    /// slot `permit`; `registered` is its row in `stats conns`.
    async fn serve_connection<S: AsyncRead + AsyncWrite + Unpin + Send>(
        self,
        socket: S,
        registered: Option<Registered>,
        permit: OwnedSemaphorePermit,
    ) {
        let (stats, peer) = (self.ctx.stats.clone(), self.peer);
        Stats::incr(&stats.total_connections);
        Stats::incr(&stats.curr_connections);
        tracing::debug!(%peer, "connection opened");
        connection::serve(socket, self.ctx, self.config, self.shutdown, registered).await;
        stats
            .curr_connections
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, "connection closed");
        drop(permit);
    }

    /// The connection's row in `stats conns`.
    fn register(&self, socket: &TcpStream) -> Option<Registered> {
        let local = socket.local_addr().ok()?;
        Some(self.ctx.conns.open(fd_of(socket), self.peer, local))
    }
}

/// Tells a client whose handshake is done, with no connection slot left for it, why (inside
/// TLS, as it now expects), and closes it; it gets [`REFUSAL_DRAIN_MS`] to take the reply.
async fn refuse_tls(mut stream: TlsStream<TcpStream>, stats: &Stats) {
    Stats::incr(&stats.rejected_connections);
    let tell = async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_DRAIN_MS), tell).await;
}

/// A socket's file descriptor, by which `stats conns` names it (as memcached does).
fn fd_of(socket: &impl AsRawFd) -> u64 {
    u64::try_from(socket.as_raw_fd()).unwrap_or_default()
}

/// Tells a client over the cap why, as memcached does, and closes it. The reply fits an
/// empty send buffer, so the write never waits. Closing a socket with unread input sends a
/// reset that can destroy the reply before the client reads it, so the input is drained
/// first, briefly, by a bounded number of tasks.
fn refuse(socket: TcpStream, stats: &Stats, draining: &Arc<Semaphore>) {
    Stats::incr(&stats.rejected_connections);
    if let Err(e) = socket.try_write(TOO_MANY_CONNECTIONS) {
        tracing::debug!(cause = %e, "could not tell a client over the cap");
        return;
    }
    let Ok(permit) = draining.clone().try_acquire_owned() else {
        return;
    };
    tokio::spawn(async move {
        let mut socket = socket;
        let drain = async {
            socket.shutdown().await?;
            let mut buf = [0u8; 4096];
            let mut left = REFUSAL_DRAIN_MAX_BYTES;
            while left > 0 {
                match socket.read(&mut buf).await? {
                    0 => break,
                    n => left = left.saturating_sub(n),
                }
            }
            Ok::<(), std::io::Error>(())
        };
        let _ = tokio::time::timeout(Duration::from_millis(REFUSAL_DRAIN_MS), drain).await;
        drop(permit);
    });
}

/// Failed accepts in a row: how long to pause, and one log line per burst.
#[derive(Debug, Default)]
struct AcceptBackoff {
    failures: u32,
}

impl AcceptBackoff {
    /// Records a failed accept and returns the pause before the next; logs only the first
    /// failure of a burst.
    fn failed(&mut self, err: &std::io::Error) -> Duration {
        if self.failures == 0 {
            tracing::error!(cause = %err, "accept failed; backing off until an accept succeeds");
        }
        self.failures = self.failures.saturating_add(1);
        accept_pause(self.failures)
    }

    /// Ends a burst of failures, saying how long it was.
    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::warn!(
                failures = self.failures,
                "accepting again after failed accepts"
            );
            self.failures = 0;
        }
    }
}

/// The pause after `failures` failed accepts in a row: doubling from the minimum, capped.
fn accept_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    Duration::from_millis((ACCEPT_BACKOFF_MIN_MS << doublings).min(ACCEPT_BACKOFF_MAX_MS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_pauses_double_up_to_the_cap() {
        let pauses: Vec<u64> = (1..=9)
            .map(|n| accept_pause(n).as_millis() as u64)
            .collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        assert_eq!(accept_pause(u32::MAX), Duration::from_millis(1000));
    }

    #[test]
    fn a_burst_counts_failures_and_a_success_ends_it() {
        let mut backoff = AcceptBackoff::default();
        let err = std::io::Error::other("too many open files");
        assert_eq!(backoff.failed(&err), Duration::from_millis(10));
        assert_eq!(backoff.failed(&err), Duration::from_millis(20));
        assert_eq!(backoff.failures, 2);
        backoff.succeeded();
        assert_eq!(backoff.failures, 0);
        assert_eq!(backoff.failed(&err), Duration::from_millis(10));
    }
}
