//! The peer listener: each connection gets a hello, then every batch it sends is checked
//! (its HMAC, when a secret is set), applied to the tier and acknowledged. A frame that does
//! not check out closes its connection (counted in `peer_invalidations_dropped`, logged at
//! most once per [`LOG_EVERY`]). At most [`MAX_PEER_CONNECTIONS`] at once (one more is
//! closed on arrival); a connection silent for [`SILENT_FOR`] (its peer sends a heartbeat far
//! more often) is closed.

use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::link::codec;
use super::{wire, Peers};
use crate::stats::Stats;

/// Peer connections served at once, at most (each holds a frame of at most
/// [`wire::MAX_FRAME_BYTES`]: 8 MiB in all).
pub const MAX_PEER_CONNECTIONS: usize = 16;
/// A peer connection with no frame for this long is closed.
const SILENT_FOR: Duration = Duration::from_secs(10);
/// Refused frames are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

/// Accepts peer connections until shutdown.
pub(super) async fn serve(listener: TcpListener, peers: Arc<Peers>) {
    let slots = Arc::new(Semaphore::new(MAX_PEER_CONNECTIONS));
    let logged = Arc::new(std::sync::Mutex::new(None::<Instant>));
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = peers.shutdown.cancelled() => return,
        };
        let Ok((stream, from)) = accepted else {
            continue;
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let peers = peers.clone();
        let logged = logged.clone();
        tokio::spawn(async move {
            if let Err(why) = connection(stream, &peers).await {
                let mut last = logged.lock().unwrap_or_else(|e| e.into_inner());
                if last.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
                    tracing::warn!(%from, cause = %why, "peer connection refused");
                    *last = Some(Instant::now());
                }
            }
            drop(slot);
        });
    }
}

/// Serves one peer connection; an error says why it was refused.
async fn connection(stream: TcpStream, peers: &Peers) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut conn = Framed::new(stream, codec());
    let hello = wire::encode_hello(peers.instance);
    conn.send(hello).await.map_err(|e| e.to_string())?;
    let secret = peers.settings.secret.as_deref();
    loop {
        let frame = tokio::select! {
            next = tokio::time::timeout(SILENT_FOR, conn.next()) => match next {
                Err(_) | Ok(None) => return Ok(()),
                Ok(Some(Err(e))) => return Err(e.to_string()),
                Ok(Some(Ok(frame))) => frame,
            },
            () = peers.shutdown.cancelled() => return Ok(()),
        };
        let batch = match wire::decode_batch(&frame, secret) {
            Ok(batch) => batch,
            Err(e) => {
                Stats::incr(&peers.stats.peer_invalidations_dropped);
                return Err(e.to_string());
            }
        };
        let seq = batch.seq;
        peers.apply(batch).await;
        let ack = wire::encode_ack(seq);
        conn.send(ack).await.map_err(|e| e.to_string())?;
    }
}
