//! One client connection: read bytes, parse requests, run them, write replies in order.
//!
//! Requests of one connection run concurrently against the store (a pipeline of sets or a
//! burst of gets costs about one backend round trip, not one each), yet replies leave in
//! request order and requests on the same key run in order. Barrier commands (`flush_all`,
//! `quit`) wait for everything before them. Every buffer is bounded: the read buffer by the
//! parser's limits, the pipeline by [`MAX_PIPELINE_DEPTH`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{FuturesOrdered, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::command::{self, Ctx};
use crate::protocol::{
    self, Limits, LongRetrieval, Parsed, ProtocolError, Request, Response, Skip, StoreMode,
};
use crate::sasl::Users;
use crate::stats::Stats;

/// Most requests of one connection in flight at once.
pub const MAX_PIPELINE_DEPTH: usize = 128;
/// Flush replies once this many bytes are waiting, even mid-batch.
const WRITE_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Bytes asked of the socket per read.
const READ_CHUNK_BYTES: usize = 64 * 1024;

/// Per-connection settings.
#[derive(Debug, Clone)]
pub struct ConnectionConfig {
    pub limits: Limits,
    /// Close a connection with nothing in flight after this long without input.
    pub idle_timeout: Option<Duration>,
    /// SASL users: when set, clients must log in (binary SASL, or text `set` with `text_auth`).
    pub sasl: Option<Arc<Users>>,
    /// Let text-protocol clients log in with memcached's `set <any> 0 0 <n>` + `user password`;
    /// without it, text clients are refused while SASL is on.
    pub text_auth: bool,
}

type Done = Shared<BoxFuture<'static, ()>>;
type Pending = BoxFuture<'static, (Response, u64, Vec<Bytes>)>;

/// The requests of a connection that have started but whose replies are not yet written.
struct Pipeline {
    running: FuturesOrdered<Pending>,
    /// For each key, the last request touching it and a future that completes with it.
    key_tails: HashMap<Bytes, (u64, Done)>,
    next_seq: u64,
}

impl Pipeline {
    fn new() -> Self {
        Pipeline {
            running: FuturesOrdered::new(),
            key_tails: HashMap::new(),
            next_seq: 0,
        }
    }

    fn len(&self) -> usize {
        self.running.len()
    }

    /// Starts a request; it waits for earlier requests on the same keys before it runs.
    fn start(&mut self, ctx: &Arc<Ctx>, request: Request, keys: Vec<Bytes>) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let waits: Vec<Done> = keys
            .iter()
            .filter_map(|k| self.key_tails.get(k).map(|(_, done)| done.clone()))
            .collect();
        let (finished, done) = oneshot::channel::<()>();
        let done: Done = done.map(|_| ()).boxed().shared();
        for key in &keys {
            self.key_tails.insert(key.clone(), (seq, done.clone()));
        }
        let ctx = ctx.clone();
        let arrived = tokio::time::Instant::now();
        self.running.push_back(
            async move {
                futures::future::join_all(waits).await;
                let response = command::execute_arrived(&ctx, request, arrived).await;
                drop(finished);
                (response, seq, keys)
            }
            .boxed(),
        );
    }

    /// Forgets key ordering entries that the finished request `seq` was the last holder of.
    fn finish(&mut self, seq: u64, keys: &[Bytes]) {
        for key in keys {
            if self.key_tails.get(key).is_some_and(|(s, _)| *s == seq) {
                self.key_tails.remove(key);
            }
        }
    }
}

/// Serves one client until it quits, errs, idles out or the server shuts down, over a TCP
/// socket or a TLS stream.
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin + Send>(
    mut socket: S,
    ctx: Arc<Ctx>,
    config: ConnectionConfig,
    shutdown: CancellationToken,
) {
    let mut read_buf = BytesMut::with_capacity(16 * 1024);
    // memcached tells the protocols apart by the first byte of a connection.
    match first_read(&mut socket, &mut read_buf, &config, &shutdown).await {
        Some(&first) if first == protocol::binary::REQUEST_MAGIC => {
            let served = crate::binary::serve(&mut socket, &ctx, &config, read_buf, &shutdown);
            if let Err(e) = served.await {
                tracing::debug!(cause = %e, "binary connection ended with an error");
            }
            let _ = socket.shutdown().await;
            return;
        }
        Some(_) if config.sasl.is_some() && !config.text_auth => {
            let _ = socket.write_all(UNAUTHENTICATED).await;
            let _ = socket.shutdown().await;
            return;
        }
        Some(_) => {}
        None => return,
    }
    let auth_required = config.sasl.is_some();
    let mut conn = Connection {
        ctx,
        config,
        auth_required,
        auth_failures: 0,
        read_buf,
        write_buf: BytesMut::with_capacity(16 * 1024),
        pipeline: Pipeline::new(),
        barrier: None,
        skip_bytes: 0,
        skip_line: false,
        long_retrieval: None,
        closing: false,
    };
    // The first read happened before the protocol was known: run what it brought.
    conn.advance().await;
    let served = match conn.flush(&mut socket).await {
        Ok(()) => conn.run(&mut socket, &shutdown).await,
        Err(e) => Err(e),
    };
    if let Err(e) = served {
        tracing::debug!(cause = %e, "connection ended with an error");
    }
    let _ = socket.shutdown().await;
}

/// memcached's answer to a text command before a text-protocol login.
const UNAUTHENTICATED: &[u8] = b"CLIENT_ERROR unauthenticated\r\n";

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

struct Connection {
    ctx: Arc<Ctx>,
    config: ConnectionConfig,
    /// SASL is on and this text connection has not logged in (memcached's `-Y` text auth).
    auth_required: bool,
    auth_failures: u32,
    read_buf: BytesMut,
    write_buf: BytesMut,
    pipeline: Pipeline,
    /// A barrier request waiting for the pipeline to drain.
    barrier: Option<Request>,
    /// Bytes of a refused data block still to discard.
    skip_bytes: usize,
    /// Discarding the rest of an over-long line.
    skip_line: bool,
    /// Inside a retrieval line longer than the parser's window: its next keys come next.
    long_retrieval: Option<LongRetrieval>,
    /// Stop reading: the client quit, hung up, or the server is shutting down.
    closing: bool,
}

impl Connection {
    async fn run<S: AsyncRead + AsyncWrite + Unpin + Send>(
        &mut self,
        socket: &mut S,
        shutdown: &CancellationToken,
    ) -> std::io::Result<()> {
        let idle = self.config.idle_timeout;
        let mut idle_deadline = idle.map(|d| tokio::time::Instant::now() + d);
        loop {
            if self.closing && self.pipeline.len() == 0 && self.barrier.is_none() {
                socket.write_all(&self.write_buf).await?;
                return Ok(());
            }
            let can_read =
                !self.closing && self.barrier.is_none() && self.pipeline.len() < MAX_PIPELINE_DEPTH;
            let idle_armed = idle_deadline.is_some() && self.pipeline.len() == 0;
            tokio::select! {
                Some((response, seq, keys)) = self.pipeline.running.next(), if self.pipeline.len() > 0 => {
                    self.pipeline.finish(seq, &keys);
                    self.emit(response);
                    // Take every other reply that is already done, then write once.
                    while let Some(Some((response, seq, keys))) = self.pipeline.running.next().now_or_never() {
                        self.pipeline.finish(seq, &keys);
                        self.emit(response);
                    }
                    self.advance().await;
                    if self.pipeline.len() == 0 || self.write_buf.len() >= WRITE_HIGH_WATER_BYTES {
                        self.flush(socket).await?;
                    }
                }
                read = socket.read_buf(&mut self.read_buf), if can_read => {
                    let n = read?;
                    if n == 0 {
                        self.closing = true;
                        continue;
                    }
                    Stats::add(&self.ctx.stats.bytes_read, n as u64);
                    if let Some(d) = idle {
                        idle_deadline = Some(tokio::time::Instant::now() + d);
                    }
                    self.discard_skipped();
                    self.advance().await;
                    if self.pipeline.len() == 0 {
                        self.flush(socket).await?;
                    }
                    if self.read_buf.capacity() - self.read_buf.len() < READ_CHUNK_BYTES / 4 {
                        self.read_buf.reserve(READ_CHUNK_BYTES);
                    }
                }
                _ = sleep_until(idle_deadline), if idle_armed && !self.closing => {
                    Stats::incr(&self.ctx.stats.idle_kicks);
                    tracing::debug!("closing idle connection");
                    self.closing = true;
                }
                _ = shutdown.cancelled(), if !self.closing => {
                    self.closing = true;
                }
            }
        }
    }

    /// Encodes a reply; a `Close` reply stops the connection after what is already queued.
    fn emit(&mut self, response: Response) {
        if response == Response::Close {
            self.closing = true;
            self.read_buf.clear();
        }
        response.encode(&mut self.write_buf);
    }

    async fn flush<S: AsyncWrite + Unpin>(&mut self, socket: &mut S) -> std::io::Result<()> {
        if !self.write_buf.is_empty() {
            socket.write_all(&self.write_buf).await?;
            Stats::add(&self.ctx.stats.bytes_written, self.write_buf.len() as u64);
            self.write_buf.clear();
        }
        Ok(())
    }

    /// Drops input that belongs to a refused data block or an over-long line.
    fn discard_skipped(&mut self) {
        if self.skip_bytes > 0 {
            let n = self.skip_bytes.min(self.read_buf.len());
            self.read_buf.advance(n);
            self.skip_bytes -= n;
        }
        if self.skip_line {
            match memchr(b'\n', &self.read_buf) {
                Some(at) => {
                    self.read_buf.advance(at + 1);
                    self.skip_line = false;
                }
                None => self.read_buf.clear(),
            }
        }
    }

    /// Starts buffered requests; whenever the pipeline has drained in front of a barrier,
    /// runs the barrier and carries on.
    async fn advance(&mut self) {
        loop {
            self.dispatch();
            if self.pipeline.len() > 0 {
                return;
            }
            let Some(barrier) = self.barrier.take() else {
                return;
            };
            let response = command::execute(&self.ctx, barrier).await;
            self.emit(response);
        }
    }

    /// Parses and starts as many buffered requests as the pipeline allows.
    fn dispatch(&mut self) {
        while !self.closing
            && self.barrier.is_none()
            && self.pipeline.len() < MAX_PIPELINE_DEPTH
            && self.skip_bytes == 0
            && !self.skip_line
        {
            let Some(Parsed {
                request,
                consumed,
                skip,
                resume,
            }) = protocol::parse_resumed(&self.read_buf, &self.config.limits, self.long_retrieval)
            else {
                return;
            };
            self.read_buf.advance(consumed);
            self.long_retrieval = resume;
            match skip {
                Skip::None => {}
                Skip::Bytes(n) => self.skip_bytes = n,
                Skip::Line => self.skip_line = true,
            }
            self.discard_skipped();
            if self.auth_required {
                let response = self.text_login(request);
                self.emit(response);
                continue;
            }
            // A hit in the near tier with nothing in flight before it is answered here, with
            // no task, channel or allocation beyond the reply.
            // Past the write high-water mark the pipeline takes over, which is bounded and
            // flushes.
            if self.pipeline.len() == 0 && self.write_buf.len() < WRITE_HIGH_WATER_BYTES {
                if let Some(response) = command::answer_from_tier(&self.ctx, &request) {
                    self.emit(response);
                    continue;
                }
            }
            match request.keys() {
                Some(keys) => {
                    let keys = keys.into_iter().cloned().collect();
                    self.pipeline.start(&self.ctx, request, keys);
                }
                None => {
                    if matches!(request, Request::Quit | Request::Hangup(_)) {
                        self.read_buf.clear();
                    }
                    self.barrier = Some(request);
                }
            }
        }
    }
}

impl Connection {
    /// Before a text login, memcached takes only a `set` whose data is `user password`.
    fn text_login(&mut self, request: Request) -> Response {
        let Some(users) = &self.config.sasl else {
            return Response::None;
        };
        match request {
            Request::Store {
                mode: StoreMode::Set,
                data,
                ..
            } => {
                let ok = users.check_text(&data);
                if crate::sasl::record_now(&self.ctx.stats, ok, &mut self.auth_failures) {
                    self.auth_required = !ok;
                    if ok {
                        return Response::Stored;
                    }
                    Response::Error(ProtocolError::Client("authentication failure"))
                } else {
                    Response::Close
                }
            }
            Request::Quit | Request::Hangup(_) => Response::Close,
            _ => Response::Error(ProtocolError::Client("unauthenticated")),
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}

fn memchr(needle: u8, haystack: &[u8]) -> Option<usize> {
    haystack.iter().position(|&b| b == needle)
}
