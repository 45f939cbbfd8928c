//! A binary-protocol connection: decode frames, run them through the command layer in order,
//! write the replies once per batch of input.
//!
//! Consecutive plain gets (as libmemcached sends a multi-get: getkq... noop) run concurrently,
//! as many at once as a text multi-get fans out, and answer in order; every other frame runs after everything before it. Quiet frames
//! answer nothing on success (gets: on a miss); replies are written when the input runs dry
//! or past a high-water mark, so a noop or any loud frame after quiet ones flushes them.
//!
//! Memory: the connection is admitted as a text connection is ([`super::admission`]): before
//! a frame or a run of gets runs, it is charged what the same requests are charged on the
//! text protocol (waiting, in arrival order with every other connection, when the budget is
//! spent); the charge pays for the write buffer until it is written, and a run of gets is
//! cut to what one connection's share can hold, as a text multi-get is. The request and
//! write timeouts apply as on the text protocol.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use super::login::Login;
use super::ConnectionConfig;
use crate::command::{self, Ctx};
use crate::protocol::binary::{self, Command, Frame};
use crate::protocol::{MetaRequest, Request, Response};
use crate::stats::Stats;

/// Flush replies once this many bytes are waiting, even mid-batch.
const WRITE_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Capacity a write buffer grown by large replies shrinks back to once written.
const WRITE_BUFFER_BYTES: usize = 16 * 1024;

struct Conn<'a> {
    ctx: &'a Arc<Ctx>,
    config: &'a ConnectionConfig,
    read_buf: BytesMut,
    write_buf: BytesMut,
    /// Bytes of a refused body still to discard.
    skip: usize,
    /// SASL is on and this connection has not logged in yet.
    login: Login,
    closing: bool,
    /// What this connection holds of the memory budget, and how it takes more.
    admission: Admission,
    /// When the oldest incomplete frame in the read buffer began arriving.
    partial_since: Option<tokio::time::Instant>,
}

/// Serves a connection whose first bytes (already read into `read_buf`) start a binary frame.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut S,
    ctx: &Arc<Ctx>,
    config: &ConnectionConfig,
    read_buf: BytesMut,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let mut conn = Conn {
        ctx,
        config,
        read_buf,
        write_buf: BytesMut::with_capacity(16 * 1024),
        skip: 0,
        login: Login::new(config.sasl.clone(), ctx.stats.clone()),
        closing: false,
        admission: Admission::new(config.budget.clone(), config.limits, ctx.stats.clone()),
        partial_since: None,
    };
    conn.sync_buffers();
    conn.serve(socket, shutdown).await
}

/// The request a frame runs, if it runs one.
fn runnable(frame: &Frame) -> Option<&Request> {
    match &frame.command {
        Command::Run(request) => Some(request),
        _ => None,
    }
}

/// A get that reads only, so it may run alongside its neighbours.
fn plain_get(frame: &Frame) -> bool {
    matches!(
        &frame.command,
        Command::Run(Request::Meta(MetaRequest::Get { flags, .. })) if flags.ttl.is_none()
    )
}

impl Conn<'_> {
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            self.run_buffered(socket).await?;
            self.flush(socket).await?;
            if self.closing {
                return Ok(());
            }
            if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK_BYTES / 4 {
                self.read_buf.reserve(READ_CHUNK_BYTES);
                self.sync_buffers();
            }
            let (deadline, idle) = self.read_deadline();
            let read = async {
                match deadline {
                    Some(at) => tokio::time::timeout_at(at, socket.read_buf(&mut self.read_buf))
                        .await
                        .map_err(|_| ()),
                    None => Ok(socket.read_buf(&mut self.read_buf).await),
                }
            };
            tokio::select! {
                read = read => match read {
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(n)) => Stats::add(&self.ctx.stats.bytes_read, n as u64),
                    Ok(Err(e)) => return Err(e),
                    Err(()) => {
                        let counter = if idle { &self.ctx.stats.idle_kicks } else { &self.ctx.stats.request_timeouts };
                        Stats::incr(counter);
                        tracing::debug!(idle, "closing a stalled or idle binary connection");
                        return Ok(());
                    }
                },
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// When the next read must have brought something: a frame begun must be complete within
    /// the request timeout; an empty buffer may idle for the idle timeout. `true`: idle.
    fn read_deadline(&mut self) -> (Option<tokio::time::Instant>, bool) {
        let now = tokio::time::Instant::now();
        if self.read_buf.is_empty() && self.skip == 0 {
            self.partial_since = None;
            return (self.config.idle_timeout.map(|d| now + d), true);
        }
        let since = *self.partial_since.get_or_insert(now);
        (self.config.request_timeout.map(|d| since + d), false)
    }

    /// Charges the buffers' capacity to the budget.
    fn sync_buffers(&mut self) {
        let bytes = self.read_buf.capacity() + self.write_buf.capacity();
        self.admission.set_buffers(bytes);
    }

    /// Gets one run may hold at once: what fits a connection's share, at least one, and no
    /// more than a text multi-get fans out.
    fn max_gets(&self) -> usize {
        self.admission.keys_per_share().min(command::MAX_GET_FANOUT)
    }

    /// Runs every complete frame in the read buffer.
    async fn run_buffered<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        let mut gets: Vec<Frame> = Vec::new();
        while !self.closing {
            self.discard_skipped();
            if self.skip > 0 {
                break;
            }
            let Some(decoded) =
                binary::decode(&self.read_buf, &self.config.limits, self.login.required())
            else {
                break;
            };
            self.read_buf.advance(decoded.consumed);
            self.skip = decoded.skip;
            if plain_get(&decoded.frame) {
                // A hit in the near tier with nothing before it is answered here, as in
                // the text protocol, with no store call.
                if gets.is_empty() && self.answer_from_tier(&decoded.frame) {
                    continue;
                }
                if gets.len() >= self.max_gets() {
                    self.run_gets(&mut gets).await;
                    if self.write_buf.len() >= WRITE_HIGH_WATER_BYTES {
                        self.flush(socket).await?;
                    }
                }
                gets.push(decoded.frame);
                continue;
            }
            self.run_gets(&mut gets).await;
            self.run(decoded.frame).await;
            if self.write_buf.len() >= WRITE_HIGH_WATER_BYTES {
                self.flush(socket).await?;
            }
        }
        self.run_gets(&mut gets).await;
        Ok(())
    }

    /// Answers a get from the near tier alone when its item is there and fresh.
    fn answer_from_tier(&mut self, frame: &Frame) -> bool {
        let get = Request::Get {
            keys: vec![frame.key.clone()],
            cas: true,
            end: true,
        };
        match command::answer_from_tier(self.ctx, &get) {
            Some(response) => {
                binary::encode(frame, &response, &mut self.write_buf);
                true
            }
            None => false,
        }
    }

    fn discard_skipped(&mut self) {
        let n = self.skip.min(self.read_buf.len());
        self.read_buf.advance(n);
        self.skip -= n;
    }

    /// Runs a run of gets concurrently and encodes their replies in order.
    async fn run_gets(&mut self, gets: &mut Vec<Frame>) {
        if gets.is_empty() {
            return;
        }
        let requests: Vec<Request> = gets.iter().filter_map(runnable).cloned().collect();
        let units = self.admission.units_of(&requests);
        let charge = self.admission.admit(units).await;
        let arrived = tokio::time::Instant::now();
        let ctx = self.ctx;
        let replies = futures::future::join_all(
            (requests.into_iter()).map(|request| command::execute_arrived(ctx, request, arrived)),
        )
        .await;
        for (frame, response) in gets.drain(..).zip(replies) {
            binary::encode(&frame, &response, &mut self.write_buf);
        }
        self.admission.finish(charge);
        self.sync_buffers();
    }

    /// Runs one frame and encodes its reply.
    async fn run(&mut self, frame: Frame) {
        match &frame.command {
            Command::Run(request) => {
                let charge = self.admission.admit(self.admission.units(request)).await;
                let response = command::execute(self.ctx, request.clone()).await;
                if response == Response::Close {
                    self.closing = true;
                }
                binary::encode(&frame, &response, &mut self.write_buf);
                self.admission.finish(charge);
                self.sync_buffers();
            }
            Command::Reply(reply) => {
                self.closing |= reply.close;
                binary::encode_reply(&frame, reply, &mut self.write_buf);
            }
            Command::SaslListMechs => {
                let reply = self.login.mechanisms();
                binary::encode_reply(&frame, &reply, &mut self.write_buf);
            }
            Command::SaslAuth { mech, data, step } => {
                let reply = self.login.sasl(mech, data, *step).await;
                self.closing |= reply.close;
                binary::encode_reply(&frame, &reply, &mut self.write_buf);
            }
        }
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        let (timeout, stats) = (self.config.write_timeout, &self.ctx.stats);
        super::write_replies(socket, &mut self.write_buf, timeout, stats).await?;
        if self.write_buf.capacity() > WRITE_BUFFER_BYTES {
            self.write_buf = BytesMut::with_capacity(WRITE_BUFFER_BYTES);
        }
        self.sync_buffers();
        Ok(())
    }
}
