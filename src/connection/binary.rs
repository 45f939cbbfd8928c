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
//! other connection, when the budget is spent); the charge pays for the write buffer until it
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
use crate::command::{self, Ctx};
use crate::conns::Registered;
use crate::protocol::binary::{self, Action, Frame};
use crate::protocol::{MetaRequest, Request, Response};
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
            if !self.make_read_room(shutdown).await {
                return Ok(());
            }
            // A frame begun must be complete within the request timeout; an empty buffer may
            // idle for the idle timeout.
            let partial = self.io.has_input() || self.skip > 0;
            let request_deadline = self.io.request_deadline(partial);
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

    /// Makes room in the read buffer, waiting for the budget to grant it if it must; false
    /// if the server shuts down first.
    async fn make_read_room(&mut self, shutdown: &CancellationToken) -> bool {
        let Some(room) = self.io.make_read_room(&mut self.admission) else {
            return true;
        };
        tokio::select! {
            permit = room.grant => {
                (self.io).granted_read_room(permit, room.capacity, &mut self.admission);
                true
            }
            _ = shutdown.cancelled() => false,
        }
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
                    continue;
                }
                if gets.len() >= self.max_gets() {
                    self.run_gets(&mut gets).await;
                    self.flush_past_high_water(socket).await?;
                }
                gets.push(decoded.frame);
                continue;
            }
            self.run_gets(&mut gets).await;
            self.run(decoded.frame).await;
            self.flush_past_high_water(socket).await?;
        }
        self.run_gets(&mut gets).await;
        Ok(())
    }

    /// Answers a get from the near tier alone when its item is there and fresh. The reply
    /// is charged first, as a one-key text `get` is, and only if the budget has it free
    /// now; otherwise the get runs with those after it, waiting for its charge.
    fn answer_from_tier(&mut self, frame: &Frame) -> bool {
        let get = Request::Get {
            keys: vec![frame.key.clone()],
            cas: true,
            end: true,
        };
        let Some(charge) = self.admission.try_admit(self.admission.units(&get)) else {
            return false;
        };
        let response = command::answer_from_tier(self.ctx, &get);
        self.admission.finish(charge);
        if let Some(response) = &response {
            self.emit(frame, response);
        }
        self.io.sync(&mut self.admission);
        response.is_some()
    }

    fn discard_skipped(&mut self) {
        let input = self.io.input();
        let n = self.skip.min(input.len());
        input.advance(n);
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
        self.admission.finish(charge);
        for (frame, response) in gets.drain(..).zip(replies) {
            self.emit(&frame, &response);
        }
        self.io.sync(&mut self.admission);
    }

    /// Runs one frame and encodes its reply.
    async fn run(&mut self, frame: Frame) {
        match &frame.action {
            Action::Run(request) => {
                let charge = self.admission.admit(self.admission.units(request)).await;
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
