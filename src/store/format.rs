//! The object format shared by every persistent backend: a fixed header, the key, (from
//! version 3) the write history, the value, and (from version 2) a checksum.
//!
//! ```text
//! offset size field
//!  0     4    magic "S3CD"
//!  4     1    format version (3; 1 and 2 are still read)
//!  5     1    compression (0 none, 1 gzip)
//!  6     1    state bits (1 stale, 2 recache win handed out, 4 history whole since a create)
//!  7     1    version 3: history length n (at most HISTORY_LEN); before: reserved (0)
//!  8     2    key length
//! 10     4    client flags
//! 14     8    expiry, Unix seconds (0 = never)
//! 22     8    time stored, Unix microseconds
//! 30     8    cas unique
//! 38     4    stored value length (after compression)
//! 42     -    key
//!  -     8n   version 3: write ids, newest (this object's own) first
//!  -     -    value
//!  -     4    version 2 and 3: CRC32 (IEEE) of every byte before it
//! ```
//! All integers are big-endian. The key is kept so that a SHA-1 collision is detected on read
//! and tools can list keys; the value length catches truncated objects, and the checksum
//! catches objects whose bytes changed (a rewrite torn by a power cut mixes old and new
//! bytes): such an object is [`FormatError::Corrupt`], which every store reads as a miss.
//! Version 1 objects (no checksum) and version 2 (no history) are still read; only version 3
//! is written. The history is what settles a write whose answer was lost (see
//! [`History`](super::History)).

use std::io::{Read, Write};

use bytes::{BufMut, Bytes, BytesMut};
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use flate2::Compression;

use super::{Entry, History, HISTORY_LEN};

pub const MAGIC: &[u8; 4] = b"S3CD";
/// The version written; [`FORMAT_V1`] (no checksum) and [`FORMAT_V2`] (no history) are
/// still read.
pub const FORMAT_VERSION: u8 = 3;
pub const FORMAT_V1: u8 = 1;
pub const FORMAT_V2: u8 = 2;
pub const HEADER_BYTES: usize = 42;
/// The CRC32 after the value in a version 2 object.
pub const CHECKSUM_BYTES: usize = 4;

const COMPRESSION_NONE: u8 = 0;
const COMPRESSION_GZIP: u8 = 1;
const STATE_STALE: u8 = 1;
const STATE_WIN_SENT: u8 = 2;
const STATE_FROM_CREATE: u8 = 4;
/// Bytes of one write id in the history.
const ID_BYTES: usize = 8;

/// Why an object could not be read as an item.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("not an s3cached object")]
    BadMagic,
    #[error("unknown format version {0}")]
    Version(u8),
    #[error("unknown compression {0}")]
    Compression(u8),
    #[error("truncated object")]
    Truncated,
    #[error("value does not decompress within the size limit")]
    BadGzip,
    #[error("checksum mismatch: the object is damaged")]
    Corrupt,
}

/// How values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Codec {
    /// Gzip values of at least this many bytes (`None`: never compress).
    pub gzip_min_bytes: Option<usize>,
    /// Largest value accepted when reading, after decompression.
    pub max_value_bytes: usize,
    /// Values longer than this are streamed ([`super::body`]): never gzipped, and read
    /// whole only when asked to.
    pub stream_above: usize,
}

impl Default for Codec {
    fn default() -> Self {
        Codec {
            gzip_min_bytes: None,
            max_value_bytes: 64 * 1024 * 1024,
            stream_above: usize::MAX,
        }
    }
}

impl Codec {
    /// The largest object [`encode`](Codec::encode) can make of a value this codec accepts:
    /// anything larger under an item's name is not an item, and is not read.
    pub fn max_object_bytes(&self) -> usize {
        // A value is stored gzipped only when that makes it smaller.
        HEADER_BYTES
            + crate::protocol::MAX_KEY_BYTES
            + HISTORY_LEN * ID_BYTES
            + self.max_value_bytes
            + CHECKSUM_BYTES
    }

    /// Serializes an entry.
    pub fn encode(&self, entry: &Entry) -> Bytes {
        let compressed = match self.gzip_min_bytes {
            Some(min) if (min..=self.stream_above).contains(&entry.value.len()) => {
                gzip(&entry.value)
            }
            _ => None,
        };
        let (compression, value) = match &compressed {
            Some(z) => (COMPRESSION_GZIP, &z[..]),
            None => (COMPRESSION_NONE, &entry.value[..]),
        };
        let mut out = BytesMut::with_capacity(head_len(entry) + value.len() + CHECKSUM_BYTES);
        put_head(&mut out, entry, compression, value.len());
        out.put_slice(value);
        let checksum = crc32fast::hash(&out);
        out.put_u32(checksum);
        out.freeze()
    }

    /// Reads the object `name` as the item for `key`: `None` (logged) when it is not an
    /// s3cached object, is damaged, or holds another key (a SHA-1 collision or a copy).
    pub fn decode_item(&self, raw: &Bytes, key: &[u8], name: &str) -> Option<Entry> {
        match self.decode(raw) {
            Ok(entry) if entry.key == key => Some(entry),
            Ok(_) => {
                tracing::warn!(object = %name, "SHA-1 collision or foreign key; treated as a miss");
                None
            }
            Err(e) => {
                tracing::warn!(object = %name, cause = %e, "unreadable object; treated as a miss");
                None
            }
        }
    }

    /// Parses an object written by [`encode`](Codec::encode).
    pub fn decode(&self, raw: &Bytes) -> Result<Entry, FormatError> {
        let header = Header::read(raw)?;
        let value_at = header.value_at();
        let body_len = value_at + header.value_len;
        if raw.len() != body_len + header.trailer {
            return Err(FormatError::Truncated);
        }
        if header.trailer > 0 && crc32fast::hash(&raw[..body_len]) != be32(raw, body_len) {
            return Err(FormatError::Corrupt);
        }
        let stored = raw.slice(value_at..body_len);
        let value = match raw[5] {
            COMPRESSION_NONE => stored,
            COMPRESSION_GZIP => gunzip(&stored, self.max_value_bytes)?,
            other => return Err(FormatError::Compression(other)),
        };
        Ok(Entry {
            key: raw.slice(HEADER_BYTES..HEADER_BYTES + header.key_len),
            history: header.history(raw),
            value,
            ..header.entry
        })
    }
}

/// Bytes before the value of `entry`'s object: the header, the key and the history.
pub fn head_len(entry: &Entry) -> usize {
    HEADER_BYTES + entry.key.len() + entry.history.ids().len() * ID_BYTES
}

/// The head of an uncompressed object whose value (of `value_len` bytes) is written after
/// it as it arrives, then the CRC32 of every byte before it ([`Checksum`]).
pub fn encode_head(entry: &Entry, value_len: usize) -> BytesMut {
    let mut out = BytesMut::with_capacity(head_len(entry));
    put_head(&mut out, entry, COMPRESSION_NONE, value_len);
    out
}

/// Writes the fixed header, the key and the history.
fn put_head(out: &mut BytesMut, entry: &Entry, compression: u8, value_len: usize) {
    let ids = entry.history.ids();
    out.put_slice(MAGIC);
    out.put_u8(FORMAT_VERSION);
    out.put_u8(compression);
    out.put_u8(
        (if entry.stale { STATE_STALE } else { 0 })
            | (if entry.win_sent { STATE_WIN_SENT } else { 0 })
            | (if entry.history.from_create {
                STATE_FROM_CREATE
            } else {
                0
            }),
    );
    out.put_u8(ids.len() as u8);
    out.put_u16(entry.key.len() as u16);
    out.put_u32(entry.flags);
    out.put_u64(entry.expires_at);
    out.put_u64(entry.stored_at_us);
    out.put_u64(entry.cas);
    out.put_u32(value_len as u32);
    out.put_slice(&entry.key);
    for &id in ids {
        out.put_u64(id);
    }
}

/// The longest head an item object can have: header, the longest key, a whole history.
pub const MAX_HEAD_BYTES: usize =
    HEADER_BYTES + crate::protocol::MAX_KEY_BYTES + HISTORY_LEN * ID_BYTES;

/// The start of an object whose value is not read with it (a value streamed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// The entry, its value left empty.
    pub entry: Entry,
    /// Where the value starts.
    pub value_at: usize,
    /// The stored value's length.
    pub value_len: usize,
    /// A CRC32 of every byte before it follows the value (versions 2 and 3).
    pub checksum: bool,
    /// The value is gzipped.
    pub gzipped: bool,
}

impl Head {
    /// The whole object's length.
    pub fn object_len(&self) -> usize {
        self.value_at + self.value_len + if self.checksum { CHECKSUM_BYTES } else { 0 }
    }
}

/// Reads the head of an object from its first bytes: `Ok(None)` while `raw` stops before
/// the value.
pub fn decode_head(raw: &[u8]) -> Result<Option<Head>, FormatError> {
    let header = match Header::read(raw) {
        Err(FormatError::Truncated) => return Ok(None),
        other => other?,
    };
    let value_at = header.value_at();
    let Some(head) = raw.get(..value_at) else {
        return Ok(None);
    };
    let gzipped = match raw[5] {
        COMPRESSION_NONE => false,
        COMPRESSION_GZIP => true,
        other => return Err(FormatError::Compression(other)),
    };
    Ok(Some(Head {
        entry: Entry {
            key: Bytes::copy_from_slice(&raw[HEADER_BYTES..HEADER_BYTES + header.key_len]),
            history: header.history(head),
            ..header.entry
        },
        value_at,
        value_len: header.value_len,
        checksum: header.trailer > 0,
        gzipped,
    }))
}

/// Reads the header and key at the start of an object, for a listing of items: the entry
/// with an empty value. `raw` may stop after the key; the value is not read, so a damaged
/// value (which [`Codec::decode`] catches by the checksum) goes unnoticed here.
pub fn decode_header(raw: &[u8]) -> Result<Entry, FormatError> {
    let header = Header::read(raw)?;
    let key = raw
        .get(HEADER_BYTES..HEADER_BYTES + header.key_len)
        .ok_or(FormatError::Truncated)?;
    let history = match raw.get(..header.value_at()) {
        Some(head) => header.history(head),
        None => History::default(),
    };
    Ok(Entry {
        key: Bytes::copy_from_slice(key),
        history,
        ..header.entry
    })
}

/// The fixed header of an object.
struct Header {
    /// Every field but the key and the value.
    entry: Entry,
    key_len: usize,
    /// Write ids after the key (version 3).
    history_len: usize,
    /// The stored value's length (after compression).
    value_len: usize,
    /// Bytes after the value: the checksum of a version 2 object.
    trailer: usize,
}

impl Header {
    fn read(raw: &[u8]) -> Result<Header, FormatError> {
        if raw.len() < HEADER_BYTES {
            return Err(if raw.starts_with(&MAGIC[..raw.len().min(4)]) {
                FormatError::Truncated
            } else {
                FormatError::BadMagic
            });
        }
        if &raw[0..4] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        let (trailer, history_len) = match raw[4] {
            FORMAT_V1 => (0, 0),
            FORMAT_V2 => (CHECKSUM_BYTES, 0),
            FORMAT_VERSION => (CHECKSUM_BYTES, raw[7] as usize),
            other => return Err(FormatError::Version(other)),
        };
        if history_len > HISTORY_LEN {
            return Err(FormatError::Corrupt);
        }
        let be64 = |at: usize| u64::from_be_bytes(raw[at..at + 8].try_into().expect("8 bytes"));
        Ok(Header {
            entry: Entry {
                flags: be32(raw, 10),
                expires_at: be64(14),
                stored_at_us: be64(22),
                cas: be64(30),
                stale: raw[6] & STATE_STALE != 0,
                win_sent: raw[6] & STATE_WIN_SENT != 0,
                ..Entry::default()
            },
            key_len: u16::from_be_bytes([raw[8], raw[9]]) as usize,
            history_len,
            value_len: be32(raw, 38) as usize,
            trailer,
        })
    }

    /// Where the value starts: after the key and the history.
    fn value_at(&self) -> usize {
        HEADER_BYTES + self.key_len + self.history_len * ID_BYTES
    }

    /// The history; `raw` holds at least everything before the value.
    fn history(&self, raw: &[u8]) -> History {
        let at = HEADER_BYTES + self.key_len;
        let ids = raw[at..at + self.history_len * ID_BYTES]
            .chunks_exact(ID_BYTES)
            .map(|id| u64::from_be_bytes(id.try_into().expect("8 bytes")))
            .collect();
        History::from_ids(ids, raw[6] & STATE_FROM_CREATE != 0)
    }
}

/// The big-endian `u32` at `at`.
fn be32(raw: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(raw[at..at + 4].try_into().expect("4 bytes"))
}

/// Gzips `value`, or `None` when that would not make it smaller.
fn gzip(value: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::with_capacity(value.len() / 2), Compression::fast());
    encoder.write_all(value).ok()?;
    let z = encoder.finish().ok()?;
    (z.len() < value.len()).then_some(z)
}

fn gunzip(stored: &[u8], limit: usize) -> Result<Bytes, FormatError> {
    let mut out = Vec::new();
    let mut decoder = GzDecoder::new(stored).take(limit as u64 + 1);
    decoder
        .read_to_end(&mut out)
        .map_err(|_| FormatError::BadGzip)?;
    if out.len() > limit {
        return Err(FormatError::BadGzip);
    }
    Ok(Bytes::from(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(value: &[u8]) -> Entry {
        Entry {
            key: Bytes::from("the key"),
            flags: 0xdead_beef,
            expires_at: 1_700_000_000,
            stored_at_us: 1_700_000_000_123_456,
            cas: u64::MAX - 3,
            stale: true,
            win_sent: false,
            history: History::default(),
            value: Bytes::copy_from_slice(value),
        }
    }

    #[test]
    fn round_trip_plain_and_gzip() {
        let value = vec![b'z'; 10_000];
        for gzip_min_bytes in [None, Some(100)] {
            let codec = Codec {
                gzip_min_bytes,
                ..Codec::default()
            };
            let raw = codec.encode(&entry(&value));
            assert_eq!(&raw[0..4], MAGIC);
            assert_eq!(raw[5], u8::from(gzip_min_bytes.is_some()));
            assert_eq!(codec.decode(&raw).unwrap(), entry(&value));
        }
    }

    /// A version 1 object built by hand from the layout above, not by `encode`.
    fn v1_object(e: &Entry) -> Vec<u8> {
        let mut raw = b"S3CD".to_vec();
        raw.extend([FORMAT_V1, COMPRESSION_NONE, STATE_STALE, 0]);
        raw.extend((e.key.len() as u16).to_be_bytes());
        raw.extend(e.flags.to_be_bytes());
        raw.extend(e.expires_at.to_be_bytes());
        raw.extend(e.stored_at_us.to_be_bytes());
        raw.extend(e.cas.to_be_bytes());
        raw.extend((e.value.len() as u32).to_be_bytes());
        raw.extend(&e.key[..]);
        raw.extend(&e.value[..]);
        raw
    }

    /// `e` with a history of three writes, the chain whole since a create.
    fn with_history(e: Entry) -> Entry {
        Entry {
            history: History::from_ids(vec![3, 2, u64::MAX], true),
            ..e
        }
    }

    #[test]
    fn version_3_holds_the_history_after_the_key_and_ends_with_a_crc32() {
        let e = with_history(entry(b"the value"));
        let raw = Codec::default().encode(&e);
        assert_eq!(raw[4], 3);
        assert_eq!(raw[6], STATE_STALE | STATE_FROM_CREATE);
        assert_eq!(raw[7], 3, "history length");
        let body = raw.len() - CHECKSUM_BYTES;
        assert_eq!(body, HEADER_BYTES + e.key.len() + 3 * 8 + e.value.len());
        // The same layout as version 1 with the history between key and value.
        let v1 = v1_object(&e);
        let key_end = HEADER_BYTES + e.key.len();
        assert_eq!(raw[8..key_end], v1[8..key_end]);
        let mut ids = Vec::new();
        for id in [3u64, 2, u64::MAX] {
            ids.extend(id.to_be_bytes());
        }
        assert_eq!(raw[key_end..key_end + 24], ids[..]);
        assert_eq!(raw[key_end + 24..body], e.value[..]);
        // 0xCBF43926 is CRC32 (IEEE) of "123456789": the trailer is that CRC, big-endian.
        assert_eq!(crc32fast::hash(b"123456789"), 0xCBF4_3926);
        assert_eq!(raw[body..], crc32fast::hash(&raw[..body]).to_be_bytes());
        assert_eq!(Codec::default().decode(&raw), Ok(e.clone()));
        let head = decode_header(&raw[..key_end + 24]).unwrap();
        assert_eq!(head.history, e.history);
    }

    #[test]
    fn version_2_is_still_read_without_a_history() {
        let e = entry(b"written before histories");
        let mut raw = v1_object(&e);
        raw[4] = FORMAT_V2;
        let crc = crc32fast::hash(&raw);
        raw.extend(crc.to_be_bytes());
        assert_eq!(Codec::default().decode(&Bytes::from(raw)), Ok(e));
    }

    #[test]
    fn a_history_longer_than_kept_is_not_an_object() {
        let mut raw = Codec::default().encode(&entry(b"v")).to_vec();
        raw[7] = HISTORY_LEN as u8 + 1;
        assert!(Codec::default().decode(&Bytes::from(raw)).is_err());
    }

    #[test]
    fn version_1_is_still_read() {
        let e = entry(b"written before checksums");
        let raw = Bytes::from(v1_object(&e));
        assert_eq!(Codec::default().decode(&raw), Ok(e));
        // Its length check still holds: a v1 object with a trailer is not an object.
        let mut long = raw.to_vec();
        long.extend([0; CHECKSUM_BYTES]);
        assert_eq!(
            Codec::default().decode(&Bytes::from(long)),
            Err(FormatError::Truncated)
        );
    }

    #[test]
    fn a_changed_byte_in_header_key_value_or_checksum_is_corrupt() {
        for gzip_min_bytes in [None, Some(1)] {
            let codec = Codec {
                gzip_min_bytes,
                ..Codec::default()
            };
            let e = with_history(entry(&[b'v'; 300]));
            let raw = codec.encode(&e);
            let key_at = HEADER_BYTES;
            let value_at = key_at + e.key.len() + 3 * 8;
            // Header fields whose change leaves the lengths and version intact: compression,
            // state (5..7), flags, expiry, time stored, cas (10..38).
            let header = (5..7).chain(10..38);
            let key = key_at..value_at;
            let value = value_at..raw.len() - CHECKSUM_BYTES;
            let trailer = raw.len() - CHECKSUM_BYTES..raw.len();
            assert!(value.len() > 1, "the value is stored");
            for at in header.chain(key).chain(value).chain(trailer) {
                let mut bad = raw.to_vec();
                bad[at] ^= 0x10;
                assert_eq!(
                    codec.decode(&Bytes::from(bad)),
                    Err(FormatError::Corrupt),
                    "byte {at} changed, gzip {gzip_min_bytes:?}"
                );
            }
        }
    }

    #[test]
    fn no_single_bit_flip_decodes() {
        let codec = Codec::default();
        let raw = codec.encode(&entry(b"abc"));
        for bit in 0..raw.len() * 8 {
            let mut bad = raw.to_vec();
            bad[bit / 8] ^= 1 << (bit % 8);
            assert!(codec.decode(&Bytes::from(bad)).is_err(), "bit {bit}");
        }
    }

    #[test]
    fn a_header_reads_without_the_value() {
        let e = entry(b"the value");
        let raw = Codec::default().encode(&e);
        let header_and_key = &raw[..HEADER_BYTES + e.key.len()];
        let without_value = Entry {
            value: Bytes::new(),
            ..e.clone()
        };
        assert_eq!(decode_header(header_and_key), Ok(without_value.clone()));
        assert_eq!(decode_header(&raw), Ok(without_value));
        assert_eq!(
            decode_header(&raw[..HEADER_BYTES + 1]),
            Err(FormatError::Truncated)
        );
        assert_eq!(decode_header(b"hello"), Err(FormatError::BadMagic));
    }

    #[test]
    fn incompressible_values_stay_plain() {
        let codec = Codec {
            gzip_min_bytes: Some(1),
            ..Codec::default()
        };
        let raw = codec.encode(&entry(b"ab"));
        assert_eq!(raw[5], COMPRESSION_NONE);
    }

    #[test]
    fn foreign_and_broken_objects_are_errors() {
        let codec = Codec::default();
        assert_eq!(
            codec.decode(&Bytes::from("hello")),
            Err(FormatError::BadMagic)
        );
        let raw = codec.encode(&entry(b"abc"));
        assert_eq!(
            codec.decode(&raw.slice(..raw.len() - 1)),
            Err(FormatError::Truncated)
        );
        let mut bad = raw.to_vec();
        bad[4] = 9;
        assert_eq!(
            codec.decode(&Bytes::from(bad)),
            Err(FormatError::Version(9))
        );
    }

    #[test]
    fn largest_item_fits_the_object_bound() {
        let codec = Codec {
            gzip_min_bytes: Some(1),
            max_value_bytes: 4096,
            stream_above: usize::MAX,
        };
        let mut e = entry(&[7u8; 4096]);
        e.key = Bytes::from(vec![b'k'; crate::protocol::MAX_KEY_BYTES]);
        e.history = History::from_ids(vec![7; HISTORY_LEN], false);
        let raw = Codec::default().encode(&e);
        assert_eq!(raw.len(), codec.max_object_bytes());
    }

    #[test]
    fn gzip_bomb_is_refused() {
        let big = Codec {
            gzip_min_bytes: Some(1),
            ..Codec::default()
        };
        let raw = big.encode(&entry(&vec![0u8; 100_000]));
        let small = Codec {
            max_value_bytes: 1000,
            ..Codec::default()
        };
        assert_eq!(small.decode(&raw), Err(FormatError::BadGzip));
    }

    proptest! {
        #[test]
        fn decode_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = Codec::default().decode(&Bytes::from(raw));
        }
    }
}
