//! The binary protocol's driver: decode frames, run them in order, write replies per batch.
//!
//! Consecutive plain gets (as libmemcached sends a multi-get: getkq... noop) run concurrently,
//! as many at once as a text multi-get fans out, and answer in order; every other frame runs
//! after everything before it. Quiet frames answer nothing on success (gets: on a miss);
//! replies are written when the input runs dry or past a high-water mark, so a noop or any
//! loud frame after quiet ones flushes them.
//!
//! Memory: the connection is admitted as a text connection is ([`super::admission`]): before a
//! frame or a run of gets runs, or a get is answered from the near tier, it is charged what
//! the same requests are charged on the text protocol (waiting, in arrival order with every
//! other connection, when the budget is spent, within the request timeout, then answered
//! "out of memory"); the charge pays for the write buffer until it
//! is written, and a run of gets is cut to what one connection's share can hold, as a text
//! multi-get is. The buffers, their charges and the request, idle and write timeouts are the
//! text protocol's ([`super::io`]).

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use super::io::{sleep_until, Buffers, WRITE_HIGH_WATER_BYTES};
use super::login::Login;
use super::ConnectionConfig;
use crate::budget::Charge;
use crate::command::{self, Ctx};
use crate::conns::Registered;
use crate::protocol::binary::{self, Action, Frame};
use crate::protocol::{MetaRequest, ProtocolError, Request, Response};
use crate::stats::Stats;

/// A binary-protocol connection's state.
struct Conn<'a> {
    /// What requests run against: the store, the near tier, the stats.
    ctx: &'a Arc<Ctx>,
    /// The connection's settings: the parser's limits above all.
    config: &'a ConnectionConfig,
    /// The read and write buffers, and the input's deadlines.
    io: Buffers,
    /// What this connection holds of the memory budget, and how it takes more.
    admission: Admission,
    /// Whether the client has logged in, when SASL is on.
    login: Login,
    /// Bytes of a refused body still to discard.
    skip: usize,
    /// Stop once this batch is answered: the client quit, or failed to log in once too often.
    closing: bool,
}

/// Serves a connection whose first bytes (already read into `first`, a buffer of
/// [`super::io::INITIAL_BUFFER_BYTES`]) start a binary frame; `registered` is its row in
/// `stats conns`.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    socket: &mut S,
    ctx: &Arc<Ctx>,
    config: &ConnectionConfig,
    first: BytesMut,
    shutdown: &CancellationToken,
    registered: Option<Registered>,
) -> std::io::Result<()> {
    let mut admission = Admission::new(config.budget.clone(), config.limits, ctx.stats.clone());
    let io = Buffers::new(first, config, ctx.stats.clone(), &mut admission, registered);
    let mut conn = Conn {
        ctx,
        config,
        io,
        admission,
        login: Login::new(config, ctx.stats.clone()),
        skip: 0,
        closing: false,
    };
    conn.serve(socket, shutdown).await
}

/// The reply to a request the budget did not grant within the request timeout: memcached's
/// out-of-memory status.
fn out_of_memory() -> Response {
    Response::Error(ProtocolError::Server("out of memory"))
}

/// The request a frame runs, if it runs one.
fn runnable(frame: &Frame) -> Option<&Request> {
    match &frame.action {
        Action::Run(request) => Some(request),
        _ => None,
    }
}

/// A get that reads only, so it may run alongside its neighbours.
fn plain_get(frame: &Frame) -> bool {
    matches!(
        &frame.action,
        Action::Run(Request::Meta(MetaRequest::Get { flags, .. })) if flags.ttl.is_none()
    )
}

impl Conn<'_> {
    /// Answers what each read brings until the client leaves, stalls or idles out, or the
    /// server shuts down.
    async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        loop {
            self.run_buffered(socket).await?;
            self.io.tidy(&mut self.admission);
            self.flush(socket).await?;
            if self.closing {
                return Ok(());
            }
            self.io.waiting();
            // A frame begun must be complete within the request timeout, whether its bytes
            // are being read or the read buffer waits for room to take them; an empty buffer
            // may idle for the idle timeout.
            let partial = self.io.has_input() || self.skip > 0;
            let request_deadline = self.io.request_deadline(partial);
            if !self.make_read_room(shutdown, request_deadline).await {
                return Ok(());
            }
            let deadline = match partial {
                true => request_deadline,
                false => self.io.idle_deadline(),
            };
            tokio::select! {
                biased;
                read = self.io.read(socket) => {
                    if read? == 0 {
                        return Ok(());
                    }
                }
                _ = sleep_until(deadline) => {
                    let stats = &self.ctx.stats;
                    Stats::incr(if partial { &stats.request_timeouts } else { &stats.idle_kicks });
                    tracing::debug!(idle = !partial, "closing a stalled or idle binary connection");
                    return Ok(());
                }
                _ = shutdown.cancelled() => return Ok(()),
            }
        }
    }

    /// Makes room in the read buffer (for the whole frame being read, when its header is
    /// in), waiting for the budget to grant it if it must; false if the server shuts down or
    /// the frame's `deadline` passes first.
    async fn make_read_room(
        &mut self,
        shutdown: &CancellationToken,
        deadline: Option<tokio::time::Instant>,
    ) -> bool {
        let awaited = match self.skip == 0 {
            true => {
                binary::awaited_len(self.io.input(), &self.config.limits, self.login.required())
            }
            false => None,
        };
        let Some(room) = self.io.make_read_room(&mut self.admission, awaited) else {
            return true;
        };
        tokio::select! {
            permit = room.grant => {
                (self.io).granted_read_room(permit, room.capacity, &mut self.admission);
                true
            }
            _ = sleep_until(deadline) => {
                Stats::incr(&self.ctx.stats.request_timeouts);
                tracing::debug!("closing a binary connection whose frame did not come in time");
                false
            }
            _ = shutdown.cancelled() => false,
        }
    }

    /// Takes `units` for a request, waiting for the budget if it must: first writing what is
    /// waiting (a connection blocked writing holds no place in the budget's queue), then no
    /// longer than the request timeout. `None`: not granted in time.
    async fn admit<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        units: u32,
    ) -> std::io::Result<Option<Charge>> {
        let grant = match self.admission.admit_or_grant(units) {
            Ok(charge) => return Ok(Some(charge)),
            Err(grant) => grant,
        };
        self.flush(socket).await?;
        let permit = match self.io.request_timeout() {
            Some(limit) => tokio::time::timeout(limit, grant).await.ok(),
            None => Some(grant.await),
        };
        if permit.is_none() {
            Stats::incr(&self.ctx.stats.budget_timeouts);
        }
        Ok(permit.map(|permit| self.admission.granted(permit)))
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
            let limits = &self.config.limits;
            let Some(decoded) = binary::decode(self.io.input(), limits, self.login.required())
            else {
                break;
            };
            self.io.input().advance(decoded.consumed);
            self.io.progress();
            self.skip = decoded.skip;
            if plain_get(&decoded.frame) {
                // A hit in the near tier with nothing before it is answered here, as in
                // the text protocol, with no store call.
                if gets.is_empty() && self.answer_from_tier(&decoded.frame) {
                    self.flush_past_high_water(socket).await?;
                    continue;
                }
                if gets.len() >= self.max_gets() {
                    self.run_gets(socket, &mut gets).await?;
                    self.flush_past_high_water(socket).await?;
                }
                gets.push(decoded.frame);
                continue;
            }
            self.run_gets(socket, &mut gets).await?;
            self.run(socket, decoded.frame).await?;
            self.flush_past_high_water(socket).await?;
        }
        self.run_gets(socket, &mut gets).await?;
        Ok(())
    }

    /// Answers a get from the near tier alone when its item is there and fresh. The reply
    /// is charged what it takes, as a text `get` answered from the tier is, and only if the
    /// budget has it free now; otherwise the get runs with those after it, waiting for its
    /// charge.
    fn answer_from_tier(&mut self, frame: &Frame) -> bool {
        let get = Request::Get {
            keys: vec![frame.key.clone()],
            cas: true,
            end: true,
        };
        let admission = &mut self.admission;
        let mut charged = None;
        let arrived = self.io.last_read();
        let answer = command::answer_from_tier(self.ctx, &get, arrived, |reply| {
            charged = admission.try_admit(admission.reply_units(reply));
            charged.is_some()
        });
        let (Some(response), Some(charge)) = (answer, charged) else {
            return false;
        };
        self.admission.finish(charge);
        self.emit(frame, &response);
        self.io.sync(&mut self.admission);
        true
    }

    fn discard_skipped(&mut self) {
        let input = self.io.input();
        let n = self.skip.min(input.len());
        input.advance(n);
        self.skip -= n;
    }

    /// Runs a run of gets concurrently and encodes their replies in order.
    async fn run_gets<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        gets: &mut Vec<Frame>,
    ) -> std::io::Result<()> {
        if gets.is_empty() {
            return Ok(());
        }
        let requests: Vec<Request> = gets.iter().filter_map(runnable).cloned().collect();
        let units = self.admission.units_of(&requests);
        let Some(charge) = self.admit(socket, units).await? else {
            for frame in gets.drain(..) {
                self.emit(&frame, &out_of_memory());
            }
            self.io.sync(&mut self.admission);
            return Ok(());
        };
        let arrived = tokio::time::Instant::now();
        let ctx = self.ctx;
        let replies = futures::future::join_all(
            (requests.into_iter()).map(|request| command::execute_arrived(ctx, request, arrived)),
        )
        .await;
        self.admission.finish(charge);
        for (frame, response) in gets.drain(..).zip(replies) {
            self.emit(&frame, &response);
        }
        self.io.sync(&mut self.admission);
        Ok(())
    }

    /// Runs one frame and encodes its reply.
    async fn run<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        frame: Frame,
    ) -> std::io::Result<()> {
        match &frame.action {
            Action::Run(request) => {
                let units = self.admission.units(request);
                let Some(charge) = self.admit(socket, units).await? else {
                    self.emit(&frame, &out_of_memory());
                    self.io.sync(&mut self.admission);
                    return Ok(());
                };
                let response = command::execute(self.ctx, request.clone()).await;
                if response == Response::Close {
                    self.closing = true;
                }
                self.admission.finish(charge);
                self.emit(&frame, &response);
            }
            Action::Reply(reply) => {
                self.closing |= reply.close;
                binary::encode_reply(&frame, reply, self.io.output());
            }
            Action::SaslListMechs => {
                let reply = self.login.mechanisms();
                binary::encode_reply(&frame, &reply, self.io.output());
            }
            Action::SaslAuth { mech, data, step } => {
                let reply = self.login.sasl(mech, data, *step).await;
                self.closing |= reply.close;
                binary::encode_reply(&frame, &reply, self.io.output());
            }
        }
        self.io.sync(&mut self.admission);
        Ok(())
    }

    /// Encodes the reply to `frame` (charged by the next [`Buffers::sync`]).
    fn emit(&mut self, frame: &Frame, response: &Response) {
        self.io.reserve_reply(response);
        binary::encode(frame, response, self.io.output());
    }

    /// Writes every waiting reply within the write timeout.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        self.io.flush(socket, &mut self.admission).await
    }

    /// Writes the waiting replies if they have passed the high-water mark.
    async fn flush_past_high_water<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
    ) -> std::io::Result<()> {
        if self.io.pending_output() >= WRITE_HIGH_WATER_BYTES {
            self.flush(socket).await?;
        }
        Ok(())
    }
}
