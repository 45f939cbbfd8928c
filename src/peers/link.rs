//! One link to a peer's listener: connect, learn who answers, then send batches and read
//! each acknowledgement; an idle link sends an empty batch every [`HEARTBEAT`]. On any
//! failure the link is down (batches for it are dropped and counted), says so in the log at
//! most once per [`LOG_EVERY`], and connects again after a pause that doubles up to
//! [`MAX_PAUSE`].

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{timeout, Instant};
use tokio_util::codec::{Framed, LengthDelimitedCodec};

use super::{wire, LinkState, Outgoing, Peers, ACK_WITHIN, HEARTBEAT};
use crate::stats::Stats;

/// How long a connection attempt, or an answer, may take.
const ANSWER_WITHIN: Duration = ACK_WITHIN;
/// The first pause before connecting again, and the longest.
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const MAX_PAUSE: Duration = Duration::from_secs(5);
/// A link that keeps failing is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

type Conn = Framed<TcpStream, LengthDelimitedCodec>;

/// The codec both sides frame with.
pub(super) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(wire::MAX_FRAME_BYTES)
        .new_codec()
}

/// Runs the link to `addr` until it is dropped or its peer turns out to be this replica.
pub(super) async fn run(
    addr: SocketAddr,
    state: Arc<LinkState>,
    mut frames: mpsc::Receiver<Outgoing>,
    peers: Arc<Peers>,
) {
    let mut pause = FIRST_PAUSE;
    let mut logged: Option<Instant> = None;
    loop {
        let failure = match connect(addr, peers.instance).await {
            Ok(None) => {
                state.itself.store(true, Relaxed);
                return;
            }
            Ok(Some(mut conn)) => {
                state.up.store(true, Relaxed);
                pause = FIRST_PAUSE;
                if logged.take().is_some() {
                    tracing::info!(peer = %addr, "peer reachable again");
                }
                let why = serve(&mut conn, &state, &mut frames, &peers).await;
                state.up.store(false, Relaxed);
                why
            }
            Err(why) => why,
        };
        // What was queued while it failed will not be sent: the window covers it.
        while let Ok(lost) = frames.try_recv() {
            Stats::add(&peers.stats.peer_invalidations_dropped, lost.changes);
        }
        if logged.is_none_or(|at| at.elapsed() >= LOG_EVERY) {
            tracing::warn!(peer = %addr, cause = %failure, "peer unreachable: its entries are served for the short window");
            logged = Some(Instant::now());
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = peers.shutdown.cancelled() => return,
        }
        pause = (pause * 2).min(MAX_PAUSE);
    }
}

/// Connects and reads the hello: `None` when the listener is this replica's own.
async fn connect(addr: SocketAddr, instance: u64) -> Result<Option<Conn>, String> {
    let stream = timeout(ANSWER_WITHIN, TcpStream::connect(addr))
        .await
        .map_err(|_| "connect: timed out".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let mut conn = Framed::new(stream, codec());
    let hello = answer(&mut conn).await?;
    let theirs = wire::decode_hello(&hello).map_err(|e| format!("hello: {e}"))?;
    Ok((theirs != instance).then_some(conn))
}

/// Sends batches as they come, and a heartbeat when none has for a while, each awaiting
/// its acknowledgement; returns why it stopped.
async fn serve(
    conn: &mut Conn,
    state: &LinkState,
    frames: &mut mpsc::Receiver<Outgoing>,
    peers: &Peers,
) -> String {
    loop {
        let Outgoing {
            frame,
            seq: sent,
            changes: n,
        } = tokio::select! {
            next = frames.recv() => match next {
                Some(next) => next,
                None => return "stopped".into(),
            },
            () = tokio::time::sleep(HEARTBEAT) => {
                // It carries the last number sent, so a batch this link missed shows.
                let secret = peers.settings.secret.as_deref();
                let seq = peers.seq.load(Relaxed);
                let frame = wire::encode_batch(peers.instance, seq, &[], secret);
                Outgoing { frame, seq, changes: 0 }
            }
            () = peers.shutdown.cancelled() => return "shutting down".into(),
        };
        if let Err(e) = conn.send(frame).await {
            Stats::add(&peers.stats.peer_invalidations_dropped, n);
            return format!("send: {e}");
        }
        let acked = match answer(conn).await {
            Ok(ack) => wire::decode_ack(&ack).map_err(|e| format!("ack: {e}")),
            Err(e) => Err(e),
        };
        match acked {
            Ok(seq) if seq == sent => {
                Stats::add(&peers.stats.peer_invalidations_sent, n);
                *state.last_ack.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            }
            Ok(seq) => return format!("ack for batch {seq}, not {sent}"),
            Err(why) => {
                Stats::add(&peers.stats.peer_invalidations_dropped, n);
                return why;
            }
        }
    }
}

/// The next frame, within [`ANSWER_WITHIN`].
async fn answer(conn: &mut Conn) -> Result<bytes::BytesMut, String> {
    match timeout(ANSWER_WITHIN, conn.next()).await {
        Err(_) => Err("no answer in time".into()),
        Ok(None) => Err("closed".into()),
        Ok(Some(Err(e))) => Err(format!("read: {e}")),
        Ok(Some(Ok(frame))) => Ok(frame),
    }
}
