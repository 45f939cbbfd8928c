//! What replicas say to each other, as bytes: pure encoding and decoding, no I/O.
//!
//! A connection carries frames, each one length-delimited (tokio-util's
//! `LengthDelimitedCodec`, a 4-byte big-endian length): the listener first sends a hello
//! (its instance id, so a replica that reaches itself through a shared DNS name knows it),
//! then the sender sends batches and the listener answers each with an ack.
//!
//! A batch: `S3CB`, the sender's instance id and the batch's sequence number (u64 each),
//! the number of changes (u32), the changes, then, when a secret is configured, an
//! HMAC-SHA256 of everything before it under the secret (a batch without one, or with a wrong
//! one, is refused). A change is a tag byte and its fields:
//! - 1: an item written: key (u16 length, bytes), then the write's id (u64), newest in the
//!   item's write history;
//! - 2: an item deleted, or written with no id known: key;
//! - 3: a control object written (the flush epoch): name (u16 length, bytes).
//!
//! Hello: `S3CH` and the instance id. Ack: `S3CA` and the batch's sequence number.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{KeyInit, Mac};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Bytes of the MAC at a batch's end, when a secret is configured.
pub const MAC_BYTES: usize = 32;
/// Largest frame a peer accepts: a full batch of 250-byte keys (about 270 KB), with room
/// to spare.
pub const MAX_FRAME_BYTES: usize = 512 * 1024;
/// Most changes in one batch.
pub const MAX_BATCH: usize = 1024;

const BATCH: &[u8; 4] = b"S3CB";
const HELLO: &[u8; 4] = b"S3CH";
const ACK: &[u8; 4] = b"S3CA";

/// One thing that changed in the bucket through a replica.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// An item was written: `write` is the id the write added to its history, if known
    /// (none for a delete).
    Item { key: Bytes, write: Option<u64> },
    /// A control object was written (the flush epoch, the culler's lease).
    Control { name: String },
}

/// A batch as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub sender: u64,
    pub seq: u64,
    pub changes: Vec<Change>,
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a frame of this protocol")]
    Malformed,
    #[error("the batch's HMAC does not match the shared secret")]
    BadMac,
}

/// Encodes a batch of `changes` (at most [`MAX_BATCH`]), signed with `secret` if any.
pub fn encode_batch(sender: u64, seq: u64, changes: &[Change], secret: Option<&[u8]>) -> Bytes {
    let mut out = BytesMut::with_capacity(64 + changes.len() * 64);
    out.put_slice(BATCH);
    out.put_u64(sender);
    out.put_u64(seq);
    out.put_u32(changes.len() as u32);
    for change in changes {
        match change {
            Change::Item {
                key,
                write: Some(id),
            } => {
                out.put_u8(1);
                put_bytes(&mut out, key);
                out.put_u64(*id);
            }
            Change::Item { key, write: None } => {
                out.put_u8(2);
                put_bytes(&mut out, key);
            }
            Change::Control { name } => {
                out.put_u8(3);
                put_bytes(&mut out, name.as_bytes());
            }
        }
    }
    if let Some(secret) = secret {
        let mac = mac(secret, &out);
        out.put_slice(&mac);
    }
    out.freeze()
}

/// Decodes a batch, checking its MAC when `secret` is set.
pub fn decode_batch(frame: &[u8], secret: Option<&[u8]>) -> Result<Batch, WireError> {
    let body = match secret {
        Some(secret) => {
            let split = frame
                .len()
                .checked_sub(MAC_BYTES)
                .ok_or(WireError::Malformed)?;
            let (body, tag) = frame.split_at(split);
            let mut check = HmacSha256::new_from_slice(secret).expect("any key length");
            check.update(body);
            check.verify_slice(tag).map_err(|_| WireError::BadMac)?;
            body
        }
        None => frame,
    };
    let mut buf = body;
    if buf.len() < 24 || &buf[..4] != BATCH {
        return Err(WireError::Malformed);
    }
    buf.advance(4);
    let sender = buf.get_u64();
    let seq = buf.get_u64();
    let count = buf.get_u32() as usize;
    if count > MAX_BATCH {
        return Err(WireError::Malformed);
    }
    let mut changes = Vec::with_capacity(count);
    for _ in 0..count {
        if !buf.has_remaining() {
            return Err(WireError::Malformed);
        }
        let change = match buf.get_u8() {
            1 => {
                let key = get_bytes(&mut buf)?;
                if buf.remaining() < 8 {
                    return Err(WireError::Malformed);
                }
                Change::Item {
                    key,
                    write: Some(buf.get_u64()),
                }
            }
            2 => Change::Item {
                key: get_bytes(&mut buf)?,
                write: None,
            },
            3 => {
                let name = get_bytes(&mut buf)?;
                let name = String::from_utf8(name.to_vec()).map_err(|_| WireError::Malformed)?;
                Change::Control { name }
            }
            _ => return Err(WireError::Malformed),
        };
        changes.push(change);
    }
    if buf.has_remaining() {
        return Err(WireError::Malformed);
    }
    Ok(Batch {
        sender,
        seq,
        changes,
    })
}

/// The listener's first frame: who it is.
pub fn encode_hello(instance: u64) -> Bytes {
    tagged(HELLO, instance)
}

pub fn decode_hello(frame: &[u8]) -> Result<u64, WireError> {
    untag(HELLO, frame)
}

/// The listener's answer to batch `seq`.
pub fn encode_ack(seq: u64) -> Bytes {
    tagged(ACK, seq)
}

pub fn decode_ack(frame: &[u8]) -> Result<u64, WireError> {
    untag(ACK, frame)
}

fn mac(secret: &[u8], body: &[u8]) -> [u8; MAC_BYTES] {
    let mut mac = HmacSha256::new_from_slice(secret).expect("any key length");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

fn tagged(tag: &[u8; 4], n: u64) -> Bytes {
    let mut out = BytesMut::with_capacity(12);
    out.put_slice(tag);
    out.put_u64(n);
    out.freeze()
}

fn untag(tag: &[u8; 4], frame: &[u8]) -> Result<u64, WireError> {
    match frame {
        [a, b, c, d, rest @ ..] if [*a, *b, *c, *d] == *tag && rest.len() == 8 => {
            Ok(u64::from_be_bytes(rest.try_into().expect("8 bytes")))
        }
        _ => Err(WireError::Malformed),
    }
}

fn put_bytes(out: &mut BytesMut, bytes: &[u8]) {
    out.put_u16(bytes.len() as u16);
    out.put_slice(bytes);
}

fn get_bytes(buf: &mut &[u8]) -> Result<Bytes, WireError> {
    if buf.remaining() < 2 {
        return Err(WireError::Malformed);
    }
    let len = buf.get_u16() as usize;
    if buf.remaining() < len {
        return Err(WireError::Malformed);
    }
    let bytes = Bytes::copy_from_slice(&buf[..len]);
    buf.advance(len);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn changes() -> Vec<Change> {
        vec![
            Change::Item {
                key: Bytes::from_static(b"k1"),
                write: Some(42),
            },
            Change::Item {
                key: Bytes::from_static(b"gone"),
                write: None,
            },
            Change::Control {
                name: "flush".into(),
            },
        ]
    }

    #[test]
    fn a_batch_round_trips_with_and_without_a_secret() {
        for secret in [None, Some(&b"s3cret"[..])] {
            let frame = encode_batch(7, 9, &changes(), secret);
            let batch = decode_batch(&frame, secret).unwrap();
            assert_eq!(
                batch,
                Batch {
                    sender: 7,
                    seq: 9,
                    changes: changes()
                }
            );
        }
    }

    #[test]
    fn a_batch_signed_with_another_secret_or_altered_or_unsigned_is_refused() {
        let frame = encode_batch(7, 9, &changes(), Some(b"right"));
        assert_eq!(decode_batch(&frame, Some(b"wrong")), Err(WireError::BadMac));
        let mut altered = frame.to_vec();
        altered[30] ^= 1;
        assert_eq!(
            decode_batch(&altered, Some(b"right")),
            Err(WireError::BadMac)
        );
        let unsigned = encode_batch(7, 9, &changes(), None);
        assert!(decode_batch(&unsigned, Some(b"right")).is_err());
    }

    #[test]
    fn truncated_or_foreign_frames_are_malformed_never_a_panic() {
        let frame = encode_batch(1, 2, &changes(), None);
        for len in 0..frame.len() {
            assert!(decode_batch(&frame[..len], None).is_err(), "{len} bytes");
        }
        assert!(decode_batch(b"GET / HTTP/1.1\r\n\r\n", None).is_err());
        let mut huge = BytesMut::new();
        huge.put_slice(BATCH);
        huge.put_u64(1);
        huge.put_u64(1);
        huge.put_u32(u32::MAX);
        assert_eq!(decode_batch(&huge, None), Err(WireError::Malformed));
    }

    #[test]
    fn hello_and_ack_round_trip() {
        assert_eq!(decode_hello(&encode_hello(u64::MAX)), Ok(u64::MAX));
        assert_eq!(decode_ack(&encode_ack(3)), Ok(3));
        assert!(decode_ack(&encode_hello(3)).is_err());
    }
}
