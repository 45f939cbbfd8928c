//! Values too long to hold whole (longer than `stream_above_bytes`): read as a stream of
//! pieces ([`Body`]) and written from one ([`Chunks`]), so what a value holds in memory is a
//! piece at a time, whatever its length.
//!
//! A streamed value is checked as it passes: its length against the object's header, and
//! the object's CRC32 once its last byte is through. A failure midway ends the stream with
//! an error; whoever sent part of it on (a reply) cannot take that back and must close.

use bytes::Bytes;
use futures::stream::{BoxStream, StreamExt};

use super::format::CHECKSUM_BYTES;
use super::StoreError;

/// What one streamed write may hold of the memory budget at once: three parts of
/// [`PART_BYTES`] uploading and the next one filling.
pub const STREAM_HOLD_BYTES: usize = 4 * PART_BYTES;
/// A streamed write is sent in parts of this many bytes (S3's multipart uploads take parts
/// of 5 MiB to 5 GiB); an object no longer than one part is sent in one PUT.
pub const PART_BYTES: usize = 8 * 1024 * 1024;
/// What a streamed read is charged while it waits to be sent: the pieces the store's
/// connection buffers ahead of the reply's writer (hyper reads up to 400 KiB ahead).
pub const READ_HOLD_BYTES: usize = 512 * 1024;

/// Pieces of a value, in order; an error ends it.
pub type Chunks = BoxStream<'static, Result<Bytes, StoreError>>;

/// A value read as it arrives: its length, then its bytes.
pub struct Body {
    /// The value's length: the pieces add up to exactly this, or end with an error.
    pub len: u64,
    pub chunks: Chunks,
}

impl std::fmt::Debug for Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Body").field("len", &self.len).finish()
    }
}

impl Body {
    /// A value held whole, as a stream of one piece.
    pub fn whole(value: Bytes) -> Body {
        Body {
            len: value.len() as u64,
            chunks: futures::stream::once(async move { Ok(value) }).boxed(),
        }
    }
}

/// The value in the rest of an object: `rest` follows the head (whose bytes `crc` has
/// taken), and holds `value_len` bytes of value then, when `checksum`, the object's CRC32.
/// Its pieces go on as they come; a short, long or damaged object ends it with an error.
pub fn value_stream(
    crc: crc32fast::Hasher,
    rest: Chunks,
    value_len: u64,
    checksum: bool,
) -> Chunks {
    let state = Check {
        crc,
        rest,
        left: value_len,
        trailer: Vec::with_capacity(CHECKSUM_BYTES),
        checksum,
        done: false,
    };
    futures::stream::unfold(state, |mut state| async move {
        let piece = state.next().await?;
        Some((piece, state))
    })
    .boxed()
}

/// The state of [`value_stream`].
struct Check {
    crc: crc32fast::Hasher,
    rest: Chunks,
    /// Value bytes still to come.
    left: u64,
    /// Bytes after the value.
    trailer: Vec<u8>,
    checksum: bool,
    done: bool,
}

impl Check {
    /// The next piece of value, an error, or `None` at a good end.
    async fn next(&mut self) -> Option<Result<Bytes, StoreError>> {
        if self.done {
            return None;
        }
        loop {
            let Some(chunk) = self.rest.next().await else {
                self.done = true;
                return self.end().err().map(Err);
            };
            let mut chunk = match chunk {
                Ok(chunk) => chunk,
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            };
            let take = (self.left.min(chunk.len() as u64)) as usize;
            let value = chunk.split_to(take);
            self.left -= take as u64;
            self.crc.update(&value);
            self.trailer.extend_from_slice(&chunk);
            let room = if self.checksum { CHECKSUM_BYTES } else { 0 };
            if self.trailer.len() > room {
                self.done = true;
                return Some(Err(damaged("longer than its header says")));
            }
            if !value.is_empty() {
                return Some(Ok(value));
            }
        }
    }

    /// Checks the object's end.
    fn end(&self) -> Result<(), StoreError> {
        if self.left > 0 {
            return Err(damaged("shorter than its header says"));
        }
        if !self.checksum {
            return Ok(());
        }
        let stored: [u8; CHECKSUM_BYTES] = self
            .trailer
            .as_slice()
            .try_into()
            .map_err(|_| damaged("its checksum is cut short"))?;
        if u32::from_be_bytes(stored) != self.crc.clone().finalize() {
            return Err(damaged("checksum mismatch"));
        }
        Ok(())
    }
}

fn damaged(why: &str) -> StoreError {
    StoreError::Unavailable(format!("streamed value damaged: the object is {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::format::{Codec, Head};
    use crate::store::{Entry, History};

    /// An object cut into pieces of `piece` bytes, streamed from its head on.
    async fn stream_of(raw: &[u8], piece: usize) -> Result<Vec<u8>, StoreError> {
        let head: Head = crate::store::format::decode_head(raw).unwrap().unwrap();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&raw[..head.value_at]);
        let pieces: Vec<Result<Bytes, StoreError>> = raw[head.value_at..]
            .chunks(piece)
            .map(|c| Ok(Bytes::copy_from_slice(c)))
            .collect();
        let rest = futures::stream::iter(pieces).boxed();
        let mut chunks = value_stream(crc, rest, head.value_len as u64, head.checksum);
        let mut out = Vec::new();
        while let Some(chunk) = chunks.next().await {
            out.extend_from_slice(&chunk?);
        }
        Ok(out)
    }

    fn object(value: &[u8]) -> Vec<u8> {
        let entry = Entry {
            key: Bytes::from_static(b"key"),
            history: History::start(false),
            value: Bytes::copy_from_slice(value),
            ..Entry::default()
        };
        Codec::default().encode(&entry).to_vec()
    }

    #[tokio::test]
    async fn a_value_streams_whole_in_any_pieces() {
        let value: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let raw = object(&value);
        for piece in [1, 3, 4, 5, 4096, raw.len()] {
            assert_eq!(
                stream_of(&raw, piece).await.unwrap(),
                value,
                "pieces of {piece}"
            );
        }
    }

    #[tokio::test]
    async fn a_short_long_or_damaged_object_ends_with_an_error() {
        let raw = object(&[7u8; 10_000]);
        let short = &raw[..raw.len() - 10];
        assert!(stream_of(short, 512).await.is_err());
        let mut long = raw.clone();
        long.push(0);
        assert!(stream_of(&long, 512).await.is_err());
        let mut flipped = raw.clone();
        flipped[raw.len() / 2] ^= 1;
        let err = stream_of(&flipped, 512).await.unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }
}
