//! The accept loop: a connection permit before each accept, one task per connection.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::command::Ctx;
use crate::connection::{self, ConnectionConfig};
use crate::stats::Stats;

/// Accepts clients until `shutdown` fires; returns the tracker of live connections so the
/// caller can wait for them to drain.
pub async fn run(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    config: ConnectionConfig,
    max_connections: usize,
    shutdown: CancellationToken,
) -> TaskTracker {
    let permits = Arc::new(Semaphore::new(max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => permit.expect("semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let (socket, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::error!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = socket.set_nodelay(true);
        let ctx = ctx.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            Stats::incr(&ctx.stats.total_connections);
            Stats::incr(&ctx.stats.curr_connections);
            tracing::debug!(%peer, "connection opened");
            connection::serve(socket, ctx.clone(), config, shutdown).await;
            ctx.stats
                .curr_connections
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            tracing::debug!(%peer, "connection closed");
            drop(permit);
        });
    }
    connections.close();
    connections
}
