//! Meta replies, typed: a status, the returned flags and recache markers, and a value; each
//! encodes itself here, base64 keys included (decoded beside them, in the meta parser).

use std::fmt::Write as _;

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};

use super::put_decimal;

/// The two-letter status of a meta reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaStatus {
    /// `HD`: success, no value.
    Hd,
    /// `VA`: success with a value.
    Va,
    /// `EN`: miss.
    En,
    /// `NF`: not found.
    Nf,
    /// `NS`: not stored.
    Ns,
    /// `EX`: cas mismatch.
    Ex,
    /// `MN`: end of a pipeline.
    Mn,
}

impl MetaStatus {
    fn code(self) -> &'static [u8] {
        match self {
            MetaStatus::Hd => b"HD",
            MetaStatus::Va => b"VA",
            MetaStatus::En => b"EN",
            MetaStatus::Nf => b"NF",
            MetaStatus::Ns => b"NS",
            MetaStatus::Ex => b"EX",
            MetaStatus::Mn => b"MN",
        }
    }
}

/// One returned flag with its value, in the order the client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaFlag {
    /// `k`: the key as the client sent it (base64 again, followed by `b`, when it came so).
    Key { key: Bytes, base64: bool },
    /// `O`: the client's opaque token, byte for byte.
    Opaque(Bytes),
    /// `c`: cas unique (0 when nothing was stored).
    Cas(u64),
    /// `f`: client flags.
    ClientFlags(u32),
    /// `s`: value size in bytes.
    Size(usize),
    /// `t`: remaining TTL in seconds (-1 = none).
    Ttl(i64),
    /// `h`: whether the item was read before.
    Hit(bool),
    /// `l`: seconds since the last access.
    LastAccess(u64),
}

/// The recache markers of an `mg` reply, after its flags: `W` (this client won the right to
/// recache), `Z` (another client already won it) and `X` (the item is stale).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Markers {
    pub won: bool,
    pub already_won: bool,
    pub stale: bool,
}

/// A meta reply: status, returned flags, markers and an optional value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaReply {
    pub status: MetaStatus,
    pub flags: Vec<MetaFlag>,
    pub markers: Markers,
    pub value: Option<Bytes>,
    /// A value sent as it arrives, in place of `value` (then `None`).
    pub stream: Option<super::Streamed>,
}

impl MetaReply {
    /// A reply with this status and flags, no markers and no value.
    pub fn new(status: MetaStatus, flags: Vec<MetaFlag>) -> Self {
        MetaReply {
            status,
            flags,
            markers: Markers::default(),
            value: None,
            stream: None,
        }
    }

    /// The returned `c` flag, if any (for protocols that carry the cas elsewhere).
    pub fn cas(&self) -> Option<u64> {
        self.flags.iter().find_map(|f| match f {
            MetaFlag::Cas(cas) => Some(*cas),
            _ => None,
        })
    }

    /// The returned `f` flag, if any.
    pub fn client_flags(&self) -> Option<u32> {
        self.flags.iter().find_map(|f| match f {
            MetaFlag::ClientFlags(flags) => Some(*flags),
            _ => None,
        })
    }

    /// Appends the wire form: `<status> [<size>] <flags> <markers>\r\n[<value>\r\n]`.
    pub fn encode(&self, out: &mut BytesMut) {
        self.encode_sharing(out, &mut |out, piece| match piece {
            super::Piece::Shared(value) => out.put_slice(value),
            super::Piece::Streamed(_) => debug_assert!(false, "a streamed value encoded as bytes"),
        });
    }

    /// [`encode`](MetaReply::encode), handing a streamed value to `share` (see
    /// [`super::Response::encode_sharing`]).
    pub fn encode_sharing(
        &self,
        out: &mut BytesMut,
        share: &mut impl FnMut(&mut BytesMut, super::Piece<'_>),
    ) {
        out.put_slice(self.status.code());
        if let Some(value) = &self.value {
            put_number(out, value.len());
        } else if let Some(stream) = &self.stream {
            put_number(out, stream.len as usize);
        }
        for flag in &self.flags {
            out.put_u8(b' ');
            flag.encode(out);
        }
        let m = self.markers;
        for (on, letter) in [(m.already_won, b'Z'), (m.stale, b'X'), (m.won, b'W')] {
            if on {
                out.put_slice(&[b' ', letter]);
            }
        }
        out.put_slice(b"\r\n");
        if let Some(value) = &self.value {
            out.put_slice(value);
            out.put_slice(b"\r\n");
        } else if let Some(stream) = &self.stream {
            share(out, super::Piece::Streamed(stream));
            out.put_slice(b"\r\n");
        }
    }
}

impl MetaFlag {
    fn encode(&self, out: &mut BytesMut) {
        match self {
            MetaFlag::Key { key, base64 } => {
                out.put_u8(b'k');
                encode_key(key, *base64, out);
                if *base64 {
                    out.put_slice(b" b");
                }
            }
            MetaFlag::Opaque(opaque) => {
                out.put_u8(b'O');
                out.put_slice(opaque);
            }
            MetaFlag::Cas(cas) => number(out, b'c', *cas),
            MetaFlag::ClientFlags(flags) => number(out, b'f', u64::from(*flags)),
            MetaFlag::Size(size) => number(out, b's', *size as u64),
            MetaFlag::Ttl(ttl) => {
                out.put_u8(b't');
                put_decimal(out, *ttl);
            }
            MetaFlag::Hit(hit) => number(out, b'h', u64::from(*hit)),
            MetaFlag::LastAccess(secs) => number(out, b'l', *secs),
        }
    }
}

/// A flag letter and its number.
fn number(out: &mut BytesMut, letter: u8, n: u64) {
    out.put_u8(letter);
    put_decimal(out, n);
}

/// What `me` tells about an item: `ME <key> exp=<ttl> la=0 cas=<cas> fetch=no cls=1 size=<n>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaDebug {
    pub key: Bytes,
    /// The key came base64-encoded, and goes back so.
    pub base64: bool,
    /// Remaining TTL in seconds (-1 = none).
    pub ttl: i64,
    pub cas: u64,
    pub size: usize,
}

impl MetaDebug {
    /// Appends the wire form.
    pub fn encode(&self, out: &mut BytesMut) {
        out.put_slice(b"ME ");
        // Byte for byte, as memcached writes it (a key need not be UTF-8).
        encode_key(&self.key, self.base64, out);
        let _ = write!(
            WriteBytes(out),
            " exp={} la=0 cas={} fetch=no cls=1 size={}\r\n",
            self.ttl,
            self.cas,
            self.size
        );
    }
}

/// Appends a key as a meta reply carries it: base64 when the request's key was base64.
pub fn encode_key(key: &[u8], base64: bool, out: &mut BytesMut) {
    if base64 {
        let text = base64::engine::general_purpose::STANDARD.encode(key);
        out.put_slice(text.as_bytes());
    } else {
        out.put_slice(key);
    }
}

fn put_number(out: &mut BytesMut, n: usize) {
    out.put_u8(b' ');
    put_decimal(out, n);
}

/// `fmt::Write` into a `BytesMut`.
pub(super) struct WriteBytes<'a>(pub(super) &'a mut BytesMut);

impl std::fmt::Write for WriteBytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.put_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(reply: &MetaReply) -> Vec<u8> {
        let mut out = BytesMut::new();
        reply.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn flags_markers_and_value() {
        let reply = MetaReply {
            status: MetaStatus::Va,
            flags: vec![
                MetaFlag::ClientFlags(5),
                MetaFlag::Ttl(-1),
                MetaFlag::Key {
                    key: Bytes::from_static(b"\xff"),
                    base64: true,
                },
                MetaFlag::Opaque(Bytes::from_static(b"op")),
                MetaFlag::Hit(false),
                MetaFlag::LastAccess(0),
            ],
            markers: Markers {
                won: true,
                already_won: false,
                stale: true,
            },
            value: Some(Bytes::from("hi")),
            stream: None,
        };
        assert_eq!(wire(&reply), b"VA 2 f5 t-1 k/w== b Oop h0 l0 X W\r\nhi\r\n");
        assert_eq!((reply.client_flags(), reply.cas()), (Some(5), None));
        let plain = MetaReply::new(MetaStatus::Hd, vec![MetaFlag::Cas(0)]);
        assert_eq!(wire(&plain), b"HD c0\r\n");
        assert_eq!(plain.cas(), Some(0));
        let z = MetaReply {
            markers: Markers {
                already_won: true,
                stale: true,
                won: false,
            },
            ..MetaReply::new(MetaStatus::Hd, Vec::new())
        };
        assert_eq!(wire(&z), b"HD Z X\r\n");
    }

    #[test]
    fn debug_line() {
        let debug = MetaDebug {
            key: Bytes::from_static(b"k"),
            base64: false,
            ttl: -1,
            cas: 7,
            size: 3,
        };
        let mut out = BytesMut::new();
        debug.encode(&mut out);
        assert_eq!(
            &out[..],
            b"ME k exp=-1 la=0 cas=7 fetch=no cls=1 size=3\r\n"
        );
        let raw = MetaDebug {
            key: Bytes::from_static(b"\xff\xfe"),
            ..debug
        };
        let mut out = BytesMut::new();
        raw.encode(&mut out);
        assert!(out.starts_with(b"ME \xff\xfe exp=-1 "), "{out:?}");
    }
}
