//! A streamed `set` (a value longer than `stream_above_bytes`): the connection hands the
//! data block's pieces to a [`Feeder`] as they arrive; the request takes them as the value
//! it streams to the store ([`store_streamed`]). The pipe between them holds a few pieces,
//! so a slow store slows the reading of the socket instead of filling memory.
//!
//! The block ends with `\r\n`, as any data block; a block that ends otherwise, or a client
//! that goes away before its end, stores nothing (the store aborts the upload), and the
//! first is answered `CLIENT_ERROR bad data chunk` as memcached answers it.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::mpsc;

use super::{reply, Ctx};
use crate::protocol::{ProtocolError, Response};
use crate::stats::Stats;
use crate::store::body::Chunks;
use crate::store::{Entry, History, Store, StoreError};

/// Pieces the pipe holds between the connection and the store, at most.
const PIPE_PIECES: usize = 4;
/// Bytes of a block that count as progress against the request timeout: a client must
/// send a MiB of its value per `request_timeout_secs` to keep what its set holds.
const PROGRESS_BYTES: usize = 1024 * 1024;

/// What the connection sends down the pipe.
enum Fed {
    Piece(Bytes),
    /// The block's end: whether it ended with `\r\n`.
    End(bool),
}

/// The connection's end of a streamed `set`'s pipe.
pub struct Feeder {
    tx: mpsc::Sender<Fed>,
    /// Value bytes still to come.
    value_left: usize,
    /// Bytes of the block's `\r\n` read so far.
    ending: Vec<u8>,
    /// The end was sent (or the request is gone): nothing more to feed.
    done: bool,
    /// Bytes taken since the connection last counted progress.
    unreported: usize,
}

/// The request's end of the pipe.
pub struct Value {
    rx: mpsc::Receiver<Fed>,
    /// Set when the block did not end with `\r\n`.
    bad: Arc<AtomicBool>,
    len: usize,
}

/// A pipe for a block holding a value of `len` bytes.
pub fn pipe(len: usize) -> (Feeder, Value) {
    let (tx, rx) = mpsc::channel(PIPE_PIECES);
    let feeder = Feeder {
        tx,
        value_left: len,
        ending: Vec::with_capacity(2),
        done: false,
        unreported: 0,
    };
    let value = Value {
        rx,
        bad: Arc::new(AtomicBool::new(false)),
        len,
    };
    (feeder, value)
}

impl Feeder {
    /// Whether the whole block has been taken.
    pub fn is_done(&self) -> bool {
        self.done
    }

    /// Whether [`PROGRESS_BYTES`] (or the block's end) were taken since the last call that
    /// said so.
    pub fn progressed(&mut self) -> bool {
        if self.unreported >= PROGRESS_BYTES || (self.done && self.unreported > 0) {
            self.unreported = 0;
            return true;
        }
        false
    }

    /// Takes what belongs to the block from the front of `input`; returns false when the
    /// pipe is full (wait for [`Feeder::ready`], then feed again). Once the request is gone
    /// (it failed early), the rest of the block is discarded as it comes.
    pub fn feed(&mut self, input: &mut BytesMut) -> bool {
        while !self.done && !input.is_empty() {
            let gone = self.tx.is_closed();
            if self.value_left > 0 {
                let n = self.value_left.min(input.len());
                if gone {
                    input.advance(n);
                } else {
                    let Ok(permit) = self.tx.try_reserve() else {
                        // Full: wait. Gone meanwhile: discard, next time round.
                        if self.tx.is_closed() {
                            continue;
                        }
                        return false;
                    };
                    permit.send(Fed::Piece(input.split_to(n).freeze()));
                }
                self.value_left -= n;
                self.unreported += n;
                continue;
            }
            let n = (2 - self.ending.len()).min(input.len());
            if self.ending.len() + n == 2 && !gone {
                // The end needs a place in the pipe too.
                let Ok(permit) = self.tx.try_reserve() else {
                    if self.tx.is_closed() {
                        continue;
                    }
                    return false;
                };
                self.ending.extend_from_slice(&input[..n]);
                input.advance(n);
                permit.send(Fed::End(self.ending == b"\r\n"));
            } else {
                self.ending.extend_from_slice(&input[..n]);
                input.advance(n);
            }
            self.unreported += n;
            self.done = self.ending.len() == 2;
        }
        true
    }

    /// Waits until the pipe has room (or the request is gone).
    pub async fn ready(&self) {
        if let Ok(permit) = self.tx.reserve().await {
            drop(permit);
        }
    }
}

impl Value {
    /// The value's pieces as the store takes them: they end when the block ends well, and
    /// with an error when it ends badly or the client goes away first.
    fn chunks(self) -> (Chunks, Arc<AtomicBool>) {
        let bad = self.bad.clone();
        let stream = futures::stream::unfold(Some((self.rx, self.bad)), |state| async move {
            let (mut rx, bad) = state?;
            match rx.recv().await {
                Some(Fed::Piece(piece)) => Some((Ok(piece), Some((rx, bad)))),
                Some(Fed::End(true)) => None,
                Some(Fed::End(false)) => {
                    bad.store(true, Relaxed);
                    Some((Err(cut("the data block did not end with \\r\\n")), None))
                }
                None => Some((Err(cut("the client went away mid-value")), None)),
            }
        });
        (stream.boxed(), bad)
    }
}

fn cut(why: &str) -> StoreError {
    StoreError::Unavailable(format!("streamed set: {why}"))
}

/// A streamed `set`: the item (its value empty) written with the value taken from `value`
/// as it arrives; nothing is acknowledged before the store has all of it.
pub async fn store_streamed(ctx: &Ctx, item: Entry, value: Value, noreply: bool) -> Response {
    Stats::incr(&ctx.stats.cmd_set);
    Stats::incr(&ctx.stats.streamed_sets);
    ctx.detail.set(&item.key);
    let len = value.len as u64;
    let (chunks, bad) = value.chunks();
    let items = super::item::Items::new(ctx, tokio::time::Instant::now());
    let mut entry = items.stamp(item, None, None);
    // A blind write reads nothing: its history starts with it.
    entry.history = History::start(false);
    let written = ctx.store.put_streamed(&entry, len, chunks).await;
    if bad.load(Relaxed) {
        return Response::Error(ProtocolError::BAD_DATA_CHUNK);
    }
    match written {
        Ok(_) => {
            Stats::incr(&ctx.stats.total_items);
            ctx.writes.stored(&entry.key, entry.expires_at);
            reply(noreply, Response::Stored)
        }
        Err(e) => ctx.failure(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything the request's end of the pipe yields, and whether it ended well.
    async fn drain(value: Value) -> (Vec<u8>, Result<(), StoreError>) {
        let (mut chunks, _) = value.chunks();
        let mut got = Vec::new();
        while let Some(piece) = chunks.next().await {
            match piece {
                Ok(piece) => got.extend_from_slice(&piece),
                Err(e) => return (got, Err(e)),
            }
        }
        (got, Ok(()))
    }

    #[tokio::test]
    async fn a_block_fed_in_any_pieces_arrives_whole_and_what_follows_stays() {
        let (mut feeder, value) = pipe(10);
        let reader = tokio::spawn(drain(value));
        let mut input = BytesMut::new();
        for piece in [&b"0123"[..], b"4567", b"89\r", b"\nget k\r\n"] {
            input.extend_from_slice(piece);
            while !feeder.feed(&mut input) {
                feeder.ready().await;
            }
        }
        assert!(feeder.is_done());
        assert!(feeder.progressed(), "the block's end is progress");
        assert!(!feeder.progressed());
        assert_eq!(&input[..], b"get k\r\n", "the next request is left alone");
        let (got, end) = reader.await.unwrap();
        assert_eq!(got, b"0123456789");
        assert!(end.is_ok());
    }

    #[tokio::test]
    async fn a_block_that_ends_badly_or_is_cut_off_ends_the_value_with_an_error() {
        let (mut feeder, value) = pipe(3);
        let bad = value.bad.clone();
        let reader = tokio::spawn(drain(value));
        let mut input = BytesMut::from(&b"abcXY"[..]);
        assert!(feeder.feed(&mut input));
        assert!(feeder.is_done() && input.is_empty());
        assert!(reader.await.unwrap().1.is_err());
        assert!(bad.load(Relaxed), "answered as a bad data chunk");
        let (mut feeder, value) = pipe(100);
        let reader = tokio::spawn(drain(value));
        assert!(feeder.feed(&mut BytesMut::from(&b"partial"[..])));
        drop(feeder);
        let (got, end) = reader.await.unwrap();
        assert_eq!(got, b"partial");
        assert!(end.is_err(), "a client gone mid-value stores nothing");
    }

    #[tokio::test]
    async fn a_full_pipe_stops_the_feed_and_a_request_gone_lets_it_discard() {
        let (mut feeder, value) = pipe(1000);
        let mut input = BytesMut::new();
        for _ in 0..PIPE_PIECES {
            input.extend_from_slice(b"x");
            assert!(feeder.feed(&mut input));
        }
        input.extend_from_slice(b"y");
        assert!(!feeder.feed(&mut input), "the pipe is full");
        assert_eq!(&input[..], b"y");
        assert!(!feeder.progressed(), "less than a MiB is no progress yet");
        drop(value);
        input.extend_from_slice(&[b'z'; 995]);
        input.extend_from_slice(b"\r\nnext");
        assert!(feeder.feed(&mut input));
        assert!(feeder.is_done());
        assert_eq!(&input[..], b"next");
    }
}
