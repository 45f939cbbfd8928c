//! The text protocol's driver: parse requests, pipeline them, write the replies in order.
//!
//! Requests of one connection run concurrently against the store (a pipeline of sets or a
//! burst of gets costs about one backend round trip, not one each), yet replies leave in
//! request order and requests on the same key run in order ([`super::pipeline`]). Barrier
//! commands (`flush_all`, `quit`) wait for everything before them; a dump is a barrier that
//! goes on page by page, each page written before the next is read. Each request is admitted
//! by the memory budget before it starts ([`super::admission`]): a connection past its share,
//! or refused by the budget, stops reading and dispatching until its replies drain or memory
//! is granted, within the request timeout (then `SERVER_ERROR out of memory`). A request that is not complete within the request timeout ends the connection once
//! what is in flight is answered; replies not written within the write timeout end it at once
//! ([`super::io`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use futures::future::FutureExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::admission::Admission;
use super::io::{sleep_until, Buffers, WRITE_HIGH_WATER_BYTES};
use super::login::{Login, UNAUTHENTICATED};
use super::pipeline::Pipeline;
use super::ConnectionConfig;
use crate::budget::meter::{self, Meter};
use crate::budget::{Charge, Grant};
use crate::command::upload::{self, Feeder};
use crate::command::{self, Ctx};
use crate::conns::Registered;
use crate::protocol::{
    self, Limits, LongRetrieval, Parsed, ProtocolError, Request, Response, Skip,
};
use crate::stats::Stats;

/// `request` executing, arrived now, as a future that owns what it needs; a retrieval's
/// values are charged to `meter` as they arrive, and it comes back with the reply (what it
/// holds goes back to the budget if the reply is dropped unwritten).
fn execute(
    ctx: &Arc<Ctx>,
    request: Request,
    meter: Option<Arc<Meter>>,
) -> impl Future<Output = (Response, Option<Arc<Meter>>)> + Send + 'static {
    let ctx = ctx.clone();
    let arrived = tokio::time::Instant::now();
    async move {
        let run = command::execute_arrived(&ctx, request, arrived);
        match meter {
            Some(meter) => (meter::scope(meter.clone(), run).await, Some(meter)),
            None => (run.await, None),
        }
    }
}

/// A finished request: its reply, what it was admitted with, and the meter its values were
/// charged to.
type Finished = (Response, Charge, Option<Arc<Meter>>);

/// Serves a text-protocol client whose first bytes are in `first` (a buffer of
/// [`super::io::INITIAL_BUFFER_BYTES`]) until it quits, errs, idles out or the server shuts
/// down; `registered` is its row in `stats conns`. While SASL is on without `text_auth`, the
/// client is told it is unauthenticated and closed.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    socket: &mut S,
    ctx: Arc<Ctx>,
    config: &ConnectionConfig,
    first: BytesMut,
    shutdown: &CancellationToken,
    registered: Option<Registered>,
) -> std::io::Result<()> {
    if config.sasl.is_some() && !config.text_auth {
        let _ = socket.write_all(UNAUTHENTICATED).await;
        return Ok(());
    }
    let login = Login::new(config, ctx.stats.clone());
    let mut admission = Admission::new(config.budget.clone(), config.limits, ctx.stats.clone());
    let io = Buffers::new(first, config, ctx.stats.clone(), &mut admission, registered);
    let mut conn = Connection {
        ctx,
        limits: config.limits,
        login,
        io,
        pipeline: Pipeline::new(),
        skip_bytes: 0,
        skip_line: false,
        long_retrieval: None,
        closing: false,
        admission,
        waiting: None,
        queued: VecDeque::new(),
        feeding: None,
        feed_blocked: false,
        upload: None,
    };
    // The first read happened before the protocol was known: run what it brought.
    conn.advance().await;
    conn.flush(socket).await?;
    conn.run(socket, shutdown).await
}

/// Work held back until the memory budget can take it.
enum Want {
    /// A parsed request, its keys, and the units it is to hold.
    Request(Box<Request>, Vec<Bytes>, u32),
    /// Room in the read buffer: its new capacity, and the units that takes.
    ReadRoom(usize, u32),
}

/// What a connection waits for: a grant of budget, or (no grant) its own replies to drain.
struct Waiting {
    /// The work held back.
    want: Want,
    /// The budget's grant to wait for; `None`: wait for this connection's replies to drain,
    /// then ask again.
    grant: Option<Grant>,
    /// When the wait began: a request waits for budget no longer than the request timeout.
    since: Instant,
}

/// A text-protocol connection's state.
struct Connection {
    /// What requests run against: the store, the near tier, the stats.
    ctx: Arc<Ctx>,
    /// The parser's limits.
    limits: Limits,
    /// SASL is on and this text connection has not logged in (memcached's `-Y` text auth).
    login: Login,
    /// The read and write buffers, and the input's deadlines.
    io: Buffers,
    /// Requests running, and a barrier waiting for them.
    pipeline: Pipeline<Finished, Request>,
    /// Bytes of a refused data block still to discard.
    skip_bytes: usize,
    /// Discarding the rest of an over-long line.
    skip_line: bool,
    /// Inside a retrieval line longer than the parser's window: its next keys come next.
    long_retrieval: Option<LongRetrieval>,
    /// Stop reading: the client quit, hung up, or the server is shutting down.
    closing: bool,
    /// What this connection holds of the memory budget, and how it takes more.
    admission: Admission,
    /// Work held back for the budget; nothing more is read or dispatched meanwhile.
    waiting: Option<Waiting>,
    /// Parsed requests not yet started: the pieces of a retrieval split to fit the budget.
    queued: VecDeque<Request>,
    /// Inside a streamed `set`'s data block: its bytes go to the request as they arrive.
    feeding: Option<Feeder>,
    /// The streamed `set`'s pipe is full: nothing is read until it has room.
    feed_blocked: bool,
    /// The value of the streamed `set` not yet started, for it to take when it starts.
    upload: Option<upload::Value>,
}

impl Connection {
    /// Reads, runs and answers until the connection closes.
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        socket: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        // Made once: a wait on the token registers with it, and leaving it unregisters.
        let mut cancelled = std::pin::pin!(shutdown.cancelled());
        loop {
            if self.closing && self.in_flight() == 0 {
                return self.flush(socket).await;
            }
            if self.pipeline.holds_barrier() && self.pipeline.is_empty() && self.waiting.is_none() {
                self.next_page(socket, shutdown).await?;
                continue;
            }
            if self.in_flight() == 0 {
                self.io.waiting();
            }
            let can_read = self.may_read() && self.make_read_room();
            let waiting_for_client = self.io.has_input()
                || self.skip_bytes > 0
                || self.skip_line
                || self.feeding.is_some();
            // A request begun must be complete in time, whether its bytes are being read or
            // the read buffer waits for room to take them.
            let reading = can_read || self.awaiting_read_room();
            let request_deadline = self.io.request_deadline(reading && waiting_for_client);
            let grant_deadline = self.grant_deadline();
            let idle_deadline = self.io.idle_deadline();
            let idle_armed = idle_deadline.is_some() && self.pipeline.is_empty();
            let granting = self.waiting.as_ref().is_some_and(|w| w.grant.is_some());
            tokio::select! {
                Some((response, charge, meter)) = self.pipeline.next(), if !self.pipeline.is_empty() => {
                    self.finish(response, charge, meter);
                    // Take every other reply that is already done, then write once.
                    while let Some((response, charge, meter)) = self.pipeline.ready() {
                        self.finish(response, charge, meter);
                    }
                    self.advance().await;
                    if self.pipeline.is_empty() || self.io.pending_output() >= WRITE_HIGH_WATER_BYTES {
                        self.flush(socket).await?;
                    }
                }
                () = feed_ready(&self.feeding), if self.feed_blocked => {
                    self.feed_blocked = false;
                    self.discard_skipped();
                    self.go_on(socket).await?;
                }
                permit = wait_grant(&mut self.waiting), if granting => {
                    self.granted(permit);
                    self.go_on(socket).await?;
                }
                read = self.io.read(socket), if can_read => {
                    if read? == 0 {
                        self.closing = true;
                        // A streamed set whose client went away stores nothing.
                        self.feeding = None;
                        self.feed_blocked = false;
                        continue;
                    }
                    self.discard_skipped();
                    self.advance().await;
                    self.io.tidy(&mut self.admission);
                    if self.pipeline.is_empty() {
                        self.flush(socket).await?;
                    }
                }
                _ = sleep_until(idle_deadline), if idle_armed && !self.closing => {
                    Stats::incr(&self.ctx.stats.idle_kicks);
                    tracing::debug!("closing idle connection");
                    self.closing = true;
                }
                _ = sleep_until(request_deadline), if request_deadline.is_some() => {
                    Stats::incr(&self.ctx.stats.request_timeouts);
                    tracing::debug!("closing a connection whose request did not complete in time");
                    self.stop_reading();
                }
                _ = sleep_until(grant_deadline), if grant_deadline.is_some() => {
                    self.out_of_memory();
                    self.go_on(socket).await?;
                }
                () = cancelled.as_mut(), if !self.closing => {
                    self.closing = true;
                    // A streamed set cut off by the shutdown stores nothing.
                    self.feeding = None;
                    self.feed_blocked = false;
                }
            }
        }
    }

    /// Starts what can start, and writes the replies if nothing is left running.
    async fn go_on<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        self.advance().await;
        if self.pipeline.is_empty() {
            self.flush(socket).await?;
        }
        Ok(())
    }

    /// Runs the next page of a dump (a barrier that `advance` left) once the last page is
    /// written; at shutdown the dump ends there.
    async fn next_page<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        self.flush(socket).await?;
        if shutdown.is_cancelled() {
            drop(self.pipeline.take_barrier());
            self.closing = true;
            return Ok(());
        }
        self.advance().await;
        // The last page, and what ran after it, unless requests are still running.
        if self.pipeline.is_empty() {
            self.flush(socket).await?;
        }
        Ok(())
    }

    /// Requests started or held back and not yet answered.
    fn in_flight(&self) -> usize {
        self.pipeline.len()
            + self.queued.len()
            + usize::from(self.pipeline.holds_barrier())
            + usize::from(self.waiting.is_some())
    }

    /// Whether the connection may take more input, budget aside.
    fn may_read(&self) -> bool {
        !self.closing
            && !self.feed_blocked
            && self.pipeline.has_room()
            && self.waiting.is_none()
            && !self.over_share()
    }

    /// Past its share of the budget with replies still to come: wait for them first.
    fn over_share(&self) -> bool {
        self.admission.over_share(!self.pipeline.is_empty())
    }

    /// Stops taking input and ends the connection once what is in flight is answered.
    fn stop_reading(&mut self) {
        self.closing = true;
        self.io.input().clear();
        self.skip_bytes = 0;
        self.skip_line = false;
        // A streamed set cut off here stores nothing.
        self.feeding = None;
        self.feed_blocked = false;
        if self.awaiting_read_room() {
            self.waiting = None;
        }
    }

    /// Whether the read buffer waits for the budget to grant it room.
    fn awaiting_read_room(&self) -> bool {
        matches!(
            self.waiting,
            Some(Waiting {
                want: Want::ReadRoom(..),
                ..
            })
        )
    }

    /// When a request waiting for a grant of budget gives up: the request timeout after the
    /// wait began.
    fn grant_deadline(&self) -> Option<Instant> {
        match &self.waiting {
            Some(Waiting {
                want: Want::Request(..),
                grant: Some(_),
                since,
            }) => self.io.request_timeout().map(|t| *since + t),
            _ => None,
        }
    }

    /// The budget did not grant a waiting request in time: it is answered as memcached
    /// answers when it cannot allocate, in its place among the replies, and the connection
    /// goes on.
    fn out_of_memory(&mut self) {
        let Some(Waiting {
            want: Want::Request(request, keys, _),
            ..
        }) = self.waiting.take()
        else {
            return;
        };
        if matches!(*request, Request::StoreStreamed { .. }) {
            // Its data block is discarded as it comes.
            self.upload = None;
        }
        Stats::incr(&self.ctx.stats.budget_timeouts);
        let refused = Response::Error(ProtocolError::Server("out of memory"));
        let nothing = Charge {
            units: 0,
            lane: false,
        };
        self.pipe(keys, async move { (refused, None) }, nothing);
    }

    /// Makes sure the read buffer has room for a read; returns false when the budget cannot
    /// give it now (a grant is then awaited).
    fn make_read_room(&mut self) -> bool {
        let skipping = self.skip_bytes > 0
            || self.skip_line
            || self.long_retrieval.is_some()
            || self.feeding.is_some();
        let awaited = match self.io.has_input() && !skipping {
            true => protocol::awaited_len(self.io.input(), &self.limits),
            false => None,
        };
        let Some(room) = self.io.make_read_room(&mut self.admission, awaited) else {
            return true;
        };
        self.waiting = Some(Waiting {
            want: Want::ReadRoom(room.capacity, room.units),
            grant: Some(room.grant),
            since: Instant::now(),
        });
        false
    }

    /// Books a grant for the work that waited for it.
    fn granted(&mut self, permit: tokio::sync::OwnedSemaphorePermit) {
        let Some(waiting) = self.waiting.take() else {
            return;
        };
        match waiting.want {
            Want::Request(request, keys, _) => {
                let charge = self.admission.granted(permit);
                let running = self.running(*request, charge);
                self.pipe(keys, running, charge);
            }
            Want::ReadRoom(capacity, _) => {
                (self.io).granted_read_room(permit, capacity, &mut self.admission);
            }
        }
    }

    /// Writes a finished request's reply; what the request held pays for the write buffer
    /// and the rest is given back.
    fn finish(&mut self, response: Response, charge: Charge, meter: Option<Arc<Meter>>) {
        self.admission.finish(charge);
        if let Some(meter) = meter {
            self.admission.adopt(meter.settle());
        }
        self.emit(response);
    }

    /// Encodes a reply; a `Close` reply stops the connection after what is already queued.
    fn emit(&mut self, response: Response) {
        if response == Response::Close {
            self.closing = true;
            self.io.input().clear();
        }
        self.io.encode_reply(&response);
        self.io.sync(&mut self.admission);
    }

    /// Writes every waiting reply within the write timeout. A place in the budget's queue
    /// is given up first, and taken again at its end: a connection blocked writing to a
    /// client that does not read must not hold up the grants of everyone behind it.
    async fn flush<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        if self.io.pending_output() > 0 {
            if let Some(Waiting {
                want,
                grant: grant @ Some(_),
                ..
            }) = &mut self.waiting
            {
                *grant = Some(match want {
                    Want::Request(_, _, units) => self.admission.requeue(*units, true),
                    Want::ReadRoom(_, units) => self.admission.requeue(*units, false),
                });
            }
        }
        // A failed login is answered no sooner than its pause and its address's turn.
        if let Some(until) = self.login.hold_replies() {
            tokio::time::sleep_until(until).await;
        }
        self.io.flush(socket, &mut self.admission).await
    }

    /// Drops input that belongs to a refused data block or an over-long line; hands a
    /// streamed set's data block to its request.
    fn discard_skipped(&mut self) {
        if let Some(feeder) = &mut self.feeding {
            self.feed_blocked = !feeder.feed(self.io.input());
            if feeder.progressed() {
                // Each MiB of a long value is progress: the request timeout starts again.
                self.io.progress();
            }
            if feeder.is_done() {
                self.feeding = None;
            }
        }
        if self.skip_bytes > 0 {
            let input = self.io.input();
            let n = self.skip_bytes.min(input.len());
            input.advance(n);
            self.skip_bytes -= n;
        }
        if self.skip_line {
            let input = self.io.input();
            match protocol::line_end(input) {
                Some(len) => {
                    input.advance(len);
                    self.skip_line = false;
                }
                None => input.clear(),
            }
        }
    }

    /// Starts buffered requests; whenever the pipeline has drained in front of a barrier,
    /// runs the barrier and carries on.
    async fn advance(&mut self) {
        loop {
            self.dispatch();
            if !self.pipeline.is_empty() || self.waiting.is_some() {
                return;
            }
            let Some(barrier) = self.pipeline.take_barrier() else {
                return;
            };
            let response = command::execute(&self.ctx, barrier).await;
            // A dump goes on: its next page waits, as a barrier, until this one is written.
            if let Response::Dump {
                more: Some(next), ..
            } = &response
            {
                self.pipeline.hold((**next).clone());
                self.emit(response);
                return;
            }
            self.emit(response);
        }
    }

    /// Parses and starts as many buffered requests as the pipeline and the budget allow.
    fn dispatch(&mut self) {
        while self.start_queued()
            && !self.closing
            && self.skip_bytes == 0
            && !self.skip_line
            && self.feeding.is_none()
            && self.upload.is_none()
        {
            // The parser takes the frame off the buffer; the request holds slices of it.
            let Some(Parsed {
                request,
                skip,
                resume,
                ..
            }) = protocol::parse_resumed(self.io.input(), &self.limits, self.long_retrieval)
            else {
                return;
            };
            self.io.progress();
            self.long_retrieval = resume;
            match skip {
                Skip::None => {}
                Skip::Bytes(n) => self.skip_bytes = n,
                Skip::Line => self.skip_line = true,
                // Not logged in: refused below, its block discarded.
                Skip::Stream(n) if self.login.required() => self.skip_bytes = n,
                Skip::Stream(n) => {
                    let (feeder, value) = upload::pipe(n - 2);
                    self.feeding = Some(feeder);
                    self.upload = Some(value);
                }
            }
            self.discard_skipped();
            if self.login.required() {
                let response = self.login.text(request);
                self.emit(response);
                continue;
            }
            // Pieces of a connection's share: several connections' large gets run at once.
            self.admission.queue(request, &mut self.queued);
        }
    }

    /// Starts queued requests while the pipeline, barriers and the budget allow; returns
    /// whether more may be parsed.
    fn start_queued(&mut self) -> bool {
        if !self.retry_waiting() {
            return false;
        }
        loop {
            if !self.pipeline.has_room() {
                return false;
            }
            let Some(request) = self.queued.pop_front() else {
                return true;
            };
            self.start(request);
            if self.waiting.is_some() {
                return false;
            }
        }
    }

    /// Starts one request: a barrier waits for the pipeline; any other runs once the budget
    /// has granted the most its reply can take.
    fn start(&mut self, request: Request) {
        if request.is_barrier() {
            if matches!(request, Request::Quit | Request::Hangup(_)) {
                self.io.input().clear();
            }
            self.pipeline.hold(request);
            return;
        }
        let units = self.admission.units(&request);
        // With nothing in flight before it, a request runs here: a hit in the near tier is
        // answered with no task, channel or allocation beyond the reply; any other request
        // is polled once, and only one that waits (a store read, an S3 write) goes to the
        // pipeline. A write the store takes at once (a small set on the directory store)
        // needs no ordering entry. Past the write high-water mark the pipeline takes over,
        // which is bounded and flushes.
        if self.pipeline.is_empty() && self.io.pending_output() < WRITE_HIGH_WATER_BYTES {
            // A hit in the near tier is charged what its reply takes, not the most any
            // reply could: small answers get through while large ones wait.
            let admission = &mut self.admission;
            let mut charged = None;
            let arrived = self.io.last_read();
            let answer = command::answer_from_tier(&self.ctx, &request, arrived, |reply| {
                charged = admission.try_admit(admission.reply_units(reply));
                charged.is_some()
            });
            if let (Some(response), Some(charge)) = (answer, charged) {
                self.admission.finish(charge);
                self.emit(response);
                return;
            }
            if let Some(charge) = self.admission.try_admit(units) {
                let keys = request.keys();
                let mut running = self.running(request, charge).boxed();
                let mut cx = Context::from_waker(futures::task::noop_waker_ref());
                match running.poll_unpin(&mut cx) {
                    Poll::Ready((response, meter)) => {
                        self.finish(response, charge, meter);
                    }
                    // Pushed into the pipeline, it is polled again with a real waker.
                    Poll::Pending => self.pipe(keys, running, charge),
                }
                return;
            }
        }
        let keys = request.keys();
        self.start_or_wait(request, keys, units);
    }

    /// `request`, admitted with `charge`, running: a large retrieval's values are charged
    /// as they arrive.
    fn running(
        &mut self,
        request: Request,
        charge: Charge,
    ) -> impl Future<Output = (Response, Option<Arc<Meter>>)> + Send + 'static {
        if let Request::StoreStreamed {
            key,
            flags,
            exptime,
            noreply,
            ..
        } = request
        {
            let ctx = self.ctx.clone();
            let value = self.upload.take();
            return futures::future::Either::Left(async move {
                let Some(value) = value else {
                    let lost = ProtocolError::Server("streamed set without its data");
                    return (Response::Error(lost), None);
                };
                let item = crate::store::Entry {
                    key,
                    flags,
                    expires_at: ctx.clock.expires_at(exptime),
                    ..Default::default()
                };
                let response = upload::store_streamed(&ctx, item, value, noreply).await;
                (response, None)
            });
        }
        let deadline = self.io.request_timeout().map(|t| Instant::now() + t);
        let meter = self.admission.meter(&request, charge, deadline);
        futures::future::Either::Right(execute(&self.ctx, request, meter))
    }

    /// Puts `running`, which holds `charge`, in the pipeline behind earlier requests on
    /// `keys`.
    fn pipe<F>(&mut self, keys: Vec<Bytes>, running: F, charge: Charge)
    where
        F: Future<Output = (Response, Option<Arc<Meter>>)> + Send + 'static,
    {
        self.pipeline.start(keys, async move {
            let (response, meter) = running.await;
            (response, charge, meter)
        });
    }

    /// Tries again a request that waited for this connection's own replies to drain;
    /// returns whether nothing waits any more.
    fn retry_waiting(&mut self) -> bool {
        match self.waiting.take() {
            None => true,
            Some(Waiting {
                want: Want::Request(request, keys, units),
                grant: None,
                ..
            }) => {
                self.start_or_wait(*request, keys, units);
                self.waiting.is_none()
            }
            Some(other) => {
                self.waiting = Some(other);
                false
            }
        }
    }

    /// Starts a request if the budget grants its `units` now; otherwise holds it back until
    /// this connection's replies drain (past its share) or the budget grants them.
    fn start_or_wait(&mut self, request: Request, keys: Vec<Bytes>, units: u32) {
        let grant = if self.admission.must_drain(units, !self.pipeline.is_empty()) {
            None
        } else {
            match self.admission.admit_or_grant(units) {
                Ok(charge) => {
                    let running = self.running(request, charge);
                    self.pipe(keys, running, charge);
                    return;
                }
                Err(grant) => Some(grant),
            }
        };
        self.waiting = Some(Waiting {
            want: Want::Request(Box::new(request), keys, units),
            grant,
            since: Instant::now(),
        });
    }
}

/// Waits until a streamed set's pipe has room.
async fn feed_ready(feeding: &Option<Feeder>) {
    match feeding {
        Some(feeder) => feeder.ready().await,
        None => futures::future::pending().await,
    }
}

/// Waits for the grant the connection is waiting for, if any.
async fn wait_grant(waiting: &mut Option<Waiting>) -> tokio::sync::OwnedSemaphorePermit {
    match waiting {
        Some(Waiting {
            grant: Some(grant), ..
        }) => grant.await,
        _ => futures::future::pending().await,
    }
}
