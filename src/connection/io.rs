//! What both protocol drivers hold of the socket: buffers, the writer, input deadlines.
//!
//! The read buffer grows only as the budget grants and shrinks back after a large request; the
//! write buffer is written whole within the write timeout; the client must complete a request
//! within the request timeout and send something within the idle timeout. Every byte of
//! capacity is charged through [`Admission`]: the read buffer by what it has allocated (its
//! capacity shrinks as requests are taken off its front; the allocation does not), the write
//! buffer by its capacity, and the large values a reply sends from their own bytes (shared
//! with the near tier or the store's answer, not copied) by their length.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use super::admission::{reply_len, Admission};
use super::ConnectionConfig;
use crate::budget::{Budget, Grant};
use crate::conns::Registered;
use crate::protocol::{Piece, Response, Streamed};
use crate::stats::Stats;
use crate::store::body::READ_HOLD_BYTES;

/// Flush replies once this many bytes are waiting, even mid-batch.
pub const WRITE_HIGH_WATER_BYTES: usize = 256 * 1024;
/// Room added to the read buffer when it runs short, at least.
const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Capacity of a new connection's read and write buffers, each; what they shrink back to.
pub const INITIAL_BUFFER_BYTES: usize = 16 * 1024;
/// Room the read buffer needs for a read; less, and it is replaced by a larger one. Small
/// next to the initial buffer, so a connection of small requests reads many of them into one
/// allocation (each request parsed takes its bytes from the buffer's front).
const MIN_READ_ROOM_BYTES: usize = INITIAL_BUFFER_BYTES / 4;
/// A drained write buffer larger than this is given back and replaced by a small one.
const WRITE_KEEP_BYTES: usize = 64 * 1024;
/// Values at least this large are written from their own bytes (one more `iovec`), not
/// copied into the write buffer.
pub const SHARE_MIN_BYTES: usize = 8 * 1024;
/// Most slices one vectored write hands the kernel.
const MAX_IOVECS: usize = 64;

/// A connection's buffers and the clocks of its input.
pub struct Buffers {
    /// Bytes read and not yet taken by the parser.
    read: BytesMut,
    /// Bytes allocated for `read` (its capacity shrinks as it is consumed; this doesn't).
    read_alloc: usize,
    /// Encoded replies not yet written: `queued` (whole pieces, in order), then `write`.
    write: BytesMut,
    /// Pieces of replies waiting before `write`: encoded bytes, shared values, streamed
    /// values.
    queued: VecDeque<Queued>,
    /// Bytes in `queued`, each streamed value counted as [`READ_HOLD_BYTES`].
    queued_len: usize,
    /// When the connection last read input or wrote its replies: idle since then.
    last_active: Instant,
    /// When input was last read.
    last_read: Instant,
    /// Since when an incomplete request has been waiting for its remaining bytes.
    partial_since: Option<Instant>,
    /// Close a connection with nothing to do after this long without input.
    idle_timeout: Option<Duration>,
    /// A request begun must be complete within this.
    request_timeout: Option<Duration>,
    /// Waiting replies must be written within this.
    write_timeout: Option<Duration>,
    /// Where bytes read and written, and write timeouts, are counted.
    stats: Arc<Stats>,
    /// This connection's row in `stats conns`: working when input arrives, waiting when
    /// the driver waits for more.
    registered: Option<Registered>,
}

/// Room the read buffer is to grow to once the budget grants it.
pub struct ReadRoom {
    /// The read buffer's new capacity.
    pub capacity: usize,
    /// The units the growth takes.
    pub units: u32,
    /// The budget's grant for the growth.
    pub grant: Grant,
}

impl Buffers {
    /// Buffers holding the connection's first read (in a buffer of [`INITIAL_BUFFER_BYTES`]),
    /// charged to `admission`; they keep the connection's row in `stats conns` up to date.
    pub fn new(
        first: BytesMut,
        config: &ConnectionConfig,
        stats: Arc<Stats>,
        admission: &mut Admission,
        registered: Option<Registered>,
    ) -> Self {
        let buffers = Buffers {
            read_alloc: first.capacity(),
            read: first,
            write: BytesMut::with_capacity(INITIAL_BUFFER_BYTES),
            queued: VecDeque::new(),
            queued_len: 0,
            last_active: Instant::now(),
            last_read: Instant::now(),
            partial_since: None,
            idle_timeout: config.idle_timeout,
            request_timeout: config.request_timeout,
            write_timeout: config.write_timeout,
            stats,
            registered,
        };
        buffers.sync(admission);
        buffers
    }

    /// Input not yet parsed; the parser takes requests off its front.
    pub fn input(&mut self) -> &mut BytesMut {
        &mut self.read
    }

    pub fn has_input(&self) -> bool {
        !self.read.is_empty()
    }

    /// Replies encoded and not yet written; size it with [`Buffers::reserve_reply`] first and
    /// charge it with [`Buffers::sync`] after.
    pub fn output(&mut self) -> &mut BytesMut {
        &mut self.write
    }

    /// Bytes of replies waiting to be written.
    pub fn pending_output(&self) -> usize {
        self.queued_len + self.write.len()
    }

    /// Encodes a reply after those waiting: its large values are queued as they are, not
    /// copied (see [`SHARE_MIN_BYTES`]).
    pub fn encode_reply(&mut self, response: &Response) {
        self.reserve_reply(response);
        let (queued, queued_len) = (&mut self.queued, &mut self.queued_len);
        response.encode_sharing(&mut self.write, SHARE_MIN_BYTES, &mut |write, piece| {
            if !write.is_empty() {
                let encoded = write.split().freeze();
                *queued_len += encoded.len();
                queued.push_back(Queued::Bytes(encoded));
            }
            match piece {
                Piece::Shared(value) => {
                    *queued_len += value.len();
                    queued.push_back(Queued::Bytes(value.clone()));
                }
                Piece::Streamed(value) => {
                    *queued_len += READ_HOLD_BYTES;
                    queued.push_back(Queued::Streamed(value.clone()));
                }
            }
        });
    }

    /// Charges the budget for what the buffers hold allocated now.
    pub fn sync(&self, admission: &mut Admission) {
        admission.set_buffers(self.read_alloc + self.write.capacity() + self.queued_len);
    }

    /// Reads what the socket has into the read buffer; 0 at the end of input. Cancel-safe.
    pub async fn read<S: AsyncRead + Unpin>(&mut self, socket: &mut S) -> std::io::Result<usize> {
        let n = socket.read_buf(&mut self.read).await?;
        if n > 0 {
            Stats::add(&self.stats.bytes_read, n as u64);
            self.last_read = Instant::now();
            self.last_active = self.last_read;
            if let Some(registered) = &self.registered {
                registered.working();
            }
        }
        Ok(n)
    }

    /// Shows the connection in `stats conns` as waiting for its next command.
    pub fn waiting(&self) {
        if let Some(registered) = &self.registered {
            registered.waiting();
        }
    }

    /// Makes sure the read buffer has room for a read, growing it if the budget has room
    /// now; otherwise returns the growth to wait for. `awaited` is the length of the request
    /// being read, when its head tells (a data block's size): the buffer then grows to hold
    /// all of it in one grant, so no connection waits for budget while holding part of what
    /// it needs (partial holdings waiting on each other wedged the budget).
    pub fn make_read_room(
        &mut self,
        admission: &mut Admission,
        awaited: Option<usize>,
    ) -> Option<ReadRoom> {
        let len = self.read.len();
        let room = self.read.capacity() - len;
        let capacity = match awaited {
            Some(total) if total > len + room => total.max(len + MIN_READ_ROOM_BYTES),
            Some(total) if room > 0 && total > len => return None,
            _ if room >= MIN_READ_ROOM_BYTES => return None,
            _ if len < INITIAL_BUFFER_BYTES / 2 => INITIAL_BUFFER_BYTES,
            _ => (len * 2).max(len + READ_CHUNK_BYTES),
        };
        let more = Budget::units(capacity).saturating_sub(Budget::units(self.read_alloc));
        if admission.try_grow_buffers(more) {
            self.regrow_read_buf(capacity, admission);
            return None;
        }
        let grant = admission.grant_buffers(more);
        Some(ReadRoom {
            capacity,
            units: more,
            grant,
        })
    }

    /// Grows the read buffer to `capacity` with the grant the budget gave for it.
    pub fn granted_read_room(
        &mut self,
        permit: OwnedSemaphorePermit,
        capacity: usize,
        admission: &mut Admission,
    ) {
        admission.granted_buffers(permit);
        self.regrow_read_buf(capacity, admission);
    }

    /// Gives back a read buffer grown for a large request once it is mostly consumed.
    pub fn tidy(&mut self, admission: &mut Admission) {
        if self.read_alloc > INITIAL_BUFFER_BYTES + READ_CHUNK_BYTES
            && self.read.len() < INITIAL_BUFFER_BYTES / 2
        {
            self.regrow_read_buf(INITIAL_BUFFER_BYTES, admission);
        }
    }

    /// Moves the read buffer's bytes into a new allocation of `capacity`.
    fn regrow_read_buf(&mut self, capacity: usize, admission: &mut Admission) {
        let mut fresh = BytesMut::with_capacity(capacity.max(self.read.len()));
        fresh.extend_from_slice(&self.read);
        self.read_alloc = fresh.capacity();
        self.read = fresh;
        self.sync(admission);
    }

    /// Sizes the write buffer for `response` at once: to what is pending and the reply, with
    /// room to spare as large again as what is pending (so a run of small replies grows it a
    /// few times, not once each) but never more than the high-water mark. Growing by
    /// doubling could take twice a large reply's size, more than the reply was charged.
    pub fn reserve_reply(&mut self, response: &Response) {
        let need = reply_len(response) - shared_len(response);
        let len = self.write.len();
        if need > self.write.capacity() - len {
            let spare = len.min(WRITE_HIGH_WATER_BYTES);
            let mut grown = BytesMut::with_capacity(len + need + spare);
            grown.extend_from_slice(&self.write);
            self.write = grown;
        }
    }

    /// Writes every waiting reply within the write timeout, then gives back a write buffer
    /// a large reply grew.
    pub async fn flush<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
        admission: &mut Admission,
    ) -> std::io::Result<()> {
        let pending = Pending {
            queued: &mut self.queued,
            queued_len: &mut self.queued_len,
            write: &mut self.write,
            written: 0,
        };
        write_replies(socket, pending, self.write_timeout, &self.stats).await?;
        if self.write.capacity() > WRITE_KEEP_BYTES {
            self.write = BytesMut::with_capacity(INITIAL_BUFFER_BYTES);
        }
        self.sync(admission);
        if self.idle_timeout.is_some() {
            self.last_active = Instant::now();
        }
        Ok(())
    }

    /// When the last input was read: what requests parsed from it arrived at.
    pub fn last_read(&self) -> Instant {
        self.last_read
    }

    /// When the incomplete request in the read buffer must be complete, if the connection
    /// is `waiting` for the client to complete one (not for itself).
    pub fn request_deadline(&mut self, waiting: bool) -> Option<Instant> {
        if !waiting {
            self.partial_since = None;
            return None;
        }
        let since = *self.partial_since.get_or_insert_with(Instant::now);
        self.request_timeout.map(|t| since + t)
    }

    /// A request was taken off the read buffer: the client is making progress, and the
    /// next incomplete one has its own request timeout.
    pub fn progress(&mut self) {
        self.partial_since = None;
    }

    /// How long a request may take to arrive, or wait for budget, if limited.
    pub fn request_timeout(&self) -> Option<Duration> {
        self.request_timeout
    }

    /// When a connection with nothing to do is closed, if no input comes first.
    pub fn idle_deadline(&self) -> Option<Instant> {
        self.idle_timeout.map(|d| self.last_active + d)
    }
}

/// The bytes of a value a reply sends from its own bytes rather than copies.
fn shared_len(response: &Response) -> usize {
    match response {
        Response::Values { values, .. } => values
            .iter()
            .map(|v| v.data.len())
            .filter(|&n| n >= SHARE_MIN_BYTES)
            .sum(),
        _ => 0,
    }
}

/// A piece of the replies waiting before the write buffer.
enum Queued {
    /// Encoded bytes, or a value's own bytes.
    Bytes(Bytes),
    /// A value whose pieces are read as it is written.
    Streamed(Streamed),
}

/// Replies waiting to be written: whole pieces, then the write buffer (from `written`:
/// it is emptied once all is written, keeping its capacity).
struct Pending<'a> {
    queued: &'a mut VecDeque<Queued>,
    queued_len: &'a mut usize,
    write: &'a mut BytesMut,
    written: usize,
}

impl Pending<'_> {
    fn len(&self) -> usize {
        *self.queued_len + self.write.len() - self.written
    }

    /// Up to [`MAX_IOVECS`] slices of what is waiting, in order, up to the first streamed
    /// value.
    fn slices<'s>(&'s self, out: &mut [IoSlice<'s>; MAX_IOVECS]) -> usize {
        let mut stream_ahead = false;
        let pieces = self.queued.iter().map_while(|q| match q {
            Queued::Bytes(b) => Some(&b[..]),
            Queued::Streamed(_) => {
                stream_ahead = true;
                None
            }
        });
        let mut n = 0;
        for piece in pieces.filter(|p| !p.is_empty()).take(MAX_IOVECS) {
            out[n] = IoSlice::new(piece);
            n += 1;
        }
        let tail = &self.write[self.written..];
        if n < MAX_IOVECS && !stream_ahead && !tail.is_empty() {
            out[n] = IoSlice::new(tail);
            n += 1;
        }
        n
    }

    /// Drops `n` written bytes from the front.
    fn advance(&mut self, mut n: usize) {
        while n > 0 {
            let Some(Queued::Bytes(front)) = self.queued.front_mut() else {
                self.written += n;
                return;
            };
            let take = n.min(front.len());
            front.advance(take);
            *self.queued_len -= take;
            n -= take;
            if front.is_empty() {
                self.queued.pop_front();
            }
        }
    }

    /// Writes everything before the next streamed value (everything, if none is left), a
    /// vectored write at a time; returns the bytes written.
    async fn write_bytes<S: AsyncWrite + Unpin>(
        &mut self,
        socket: &mut S,
    ) -> std::io::Result<usize> {
        let mut total = 0;
        loop {
            let written = {
                let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
                let n = self.slices(&mut slices);
                if n == 0 {
                    break;
                }
                socket.write_vectored(&slices[..n]).await?
            };
            if written == 0 {
                return Err(std::io::ErrorKind::WriteZero.into());
            }
            total += written;
            self.advance(written);
        }
        if matches!(self.queued.front(), Some(Queued::Bytes(b)) if b.is_empty()) {
            self.queued.pop_front();
        }
        if self.queued.is_empty() {
            self.write.clear();
            self.written = 0;
        }
        Ok(total)
    }

    /// Takes the streamed value at the front, if one is next.
    fn next_stream(&mut self) -> Option<Streamed> {
        match self.queued.front() {
            Some(Queued::Streamed(_)) => {}
            _ => return None,
        }
        let Some(Queued::Streamed(value)) = self.queued.pop_front() else {
            return None;
        };
        *self.queued_len -= READ_HOLD_BYTES;
        Some(value)
    }
}

/// Runs `write` within `timeout` from the first moment the socket could not take what it
/// writes, counting a timeout in `stats`.
async fn within<T>(
    write: impl std::future::Future<Output = std::io::Result<T>>,
    timeout: Option<Duration>,
    stats: &Stats,
) -> std::io::Result<T> {
    let mut write = std::pin::pin!(write);
    // Most replies fit the socket's buffer: written at once, they need no timer (the
    // deadline starts at the first write the socket could not take).
    match (futures::poll!(write.as_mut()), timeout) {
        (std::task::Poll::Ready(written), _) => written,
        (std::task::Poll::Pending, None) => write.await,
        (std::task::Poll::Pending, Some(limit)) => match tokio::time::timeout(limit, write).await {
            Ok(written) => written,
            Err(_) => {
                Stats::incr(&stats.write_timeouts);
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "client did not read its replies within the write timeout",
                ))
            }
        },
    }
}

/// Writes what is `pending` whole (then empties it), counting the bytes written and a
/// timeout in `stats`. Bytes go within `timeout`; a streamed value goes a piece at a time,
/// each piece written within `timeout` (the store bounds the wait for it): a long value
/// to a client that keeps reading is never cut off, one that stops reading is.
async fn write_replies<S: AsyncWrite + Unpin>(
    socket: &mut S,
    mut pending: Pending<'_>,
    timeout: Option<Duration>,
    stats: &Stats,
) -> std::io::Result<()> {
    if pending.len() == 0 {
        return Ok(());
    }
    loop {
        let written = within(pending.write_bytes(socket), timeout, stats).await?;
        Stats::add(&stats.bytes_written, written as u64);
        let Some(value) = pending.next_stream() else {
            break;
        };
        write_streamed(socket, &value, timeout, stats).await?;
    }
    socket.flush().await
}

/// Sends a streamed value's pieces as they arrive. A value that fails or turns out shorter
/// or longer than announced cannot be taken back: the error closes the connection, and the
/// client sees a reply cut short (`stream_failures` counts it).
async fn write_streamed<S: AsyncWrite + Unpin>(
    socket: &mut S,
    value: &Streamed,
    timeout: Option<Duration>,
    stats: &Stats,
) -> std::io::Result<()> {
    use futures::StreamExt;
    let failed = |why: String| {
        Stats::incr(&stats.stream_failures);
        tracing::warn!(cause = %why, "a streamed value failed midway; closing the connection");
        std::io::Error::other(why)
    };
    let Some(mut pieces) = value.take() else {
        return Err(failed("a streamed value was sent twice".into()));
    };
    let mut left = value.len;
    while let Some(piece) = pieces.next().await {
        let piece = piece.map_err(|e| failed(e.to_string()))?;
        if piece.len() as u64 > left {
            return Err(failed("a streamed value longer than announced".into()));
        }
        left -= piece.len() as u64;
        within(socket.write_all(&piece), timeout, stats).await?;
        Stats::add(&stats.bytes_written, piece.len() as u64);
    }
    if left > 0 {
        return Err(failed("a streamed value shorter than announced".into()));
    }
    Ok(())
}

/// Sleeps until `deadline`; never, without one.
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => futures::future::pending().await,
    }
}
