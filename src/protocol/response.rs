//! Replies, each able to encode itself in memcached's wire format.

use bytes::{BufMut, Bytes, BytesMut};

use super::admin::{encode_page, DumpFormat, DumpItem};
use super::meta_reply::{MetaDebug, MetaReply};
use super::{put_decimal, ProtocolError};

/// One item of a retrieval reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Value {
    pub key: Bytes,
    pub flags: u32,
    pub cas: u64,
    pub data: Bytes,
    /// A value sent as it arrives, in place of `data` (which is then empty).
    pub stream: Option<Streamed>,
}

impl Value {
    /// The value's length on the wire.
    pub fn len(&self) -> u64 {
        match &self.stream {
            Some(s) => s.len,
            None => self.data.len() as u64,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The pieces of a streamed value, in order; an error ends it.
pub type Pieces = futures::stream::BoxStream<'static, std::io::Result<Bytes>>;

/// A value whose bytes are still arriving (one longer than `stream_above_bytes`): its
/// length, and its pieces, which the connection's writer takes once, as it sends the value.
#[derive(Clone)]
pub struct Streamed {
    pub len: u64,
    pieces: std::sync::Arc<std::sync::Mutex<Option<Pieces>>>,
}

impl Streamed {
    pub fn new(len: u64, pieces: Pieces) -> Streamed {
        Streamed {
            len,
            pieces: std::sync::Arc::new(std::sync::Mutex::new(Some(pieces))),
        }
    }

    /// The pieces, to the first who asks (`None` after).
    pub fn take(&self) -> Option<Pieces> {
        self.pieces.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl PartialEq for Streamed {
    fn eq(&self, other: &Streamed) -> bool {
        std::sync::Arc::ptr_eq(&self.pieces, &other.pieces)
    }
}

impl Eq for Streamed {}

impl std::fmt::Debug for Streamed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streamed").field("len", &self.len).finish()
    }
}

/// A part of a reply handed to the caller of [`Response::encode_sharing`] rather than
/// copied: a value's own bytes, or a value to stream.
pub enum Piece<'a> {
    Shared(&'a Bytes),
    Streamed(&'a Streamed),
}

/// Everything the server says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    /// Nothing at all (noreply, quiet meta).
    None,
    Stored,
    NotStored,
    Exists,
    NotFound,
    Deleted,
    Touched,
    Ok,
    Reset,
    /// `VALUE ... END` for get/gets/gat/gats (`with_cas` for the `s` forms); without
    /// `END` for a piece of a long line that goes on.
    Values {
        values: Vec<Value>,
        with_cas: bool,
        end: bool,
    },
    /// incr/decr result.
    Number(u64),
    Version(String),
    Stats(Vec<(String, String)>),
    /// `stats detail dump`: `PREFIX <p> get <n> hit <n> set <n> del <n>` lines, then `END`.
    Prefixes(Vec<(Bytes, [u64; 4])>),
    /// `ME <key> <k>=<v>*`.
    Debug(MetaDebug),
    Meta(MetaReply),
    Error(ProtocolError),
    /// `SERVER_ERROR <reason>` for backend failures.
    ServerError(String),
    /// An operator command's status line in memcached's words (`MEMLIMIT_TOO_SMALL ...`,
    /// `BADCLASS ...`, `ERROR: shutdown not enabled`).
    Line(&'static str),
    /// A page of an item dump; `more` is the request that makes the next page, `None` on
    /// the last, which the dump's end marker follows.
    Dump {
        format: DumpFormat,
        items: Vec<DumpItem>,
        more: Option<Box<super::Request>>,
    },
    /// Close the connection without a reply.
    Close,
}

impl Response {
    /// Appends the wire form of this reply to `out`, copying every value.
    pub fn encode(&self, out: &mut BytesMut) {
        // A streamed value has no bytes to copy: only a connection's writer can send it.
        self.encode_sharing(out, usize::MAX, &mut |out, piece| match piece {
            Piece::Shared(value) => out.put_slice(value),
            Piece::Streamed(_) => debug_assert!(false, "a streamed value encoded as bytes"),
        });
    }

    /// Appends the wire form of this reply to `out`, but hands each value of at least
    /// `share_min` bytes to `share` instead of copying it: the caller queues `out`'s bytes so
    /// far, then the value's own bytes, and writes them in that order (as memcached sends a
    /// value from its item).
    pub fn encode_sharing(
        &self,
        out: &mut BytesMut,
        share_min: usize,
        share: &mut impl FnMut(&mut BytesMut, Piece<'_>),
    ) {
        let line = |out: &mut BytesMut, s: &str| {
            out.put_slice(s.as_bytes());
            out.put_slice(b"\r\n");
        };
        match self {
            Response::None | Response::Close => {}
            Response::Stored => line(out, "STORED"),
            Response::NotStored => line(out, "NOT_STORED"),
            Response::Exists => line(out, "EXISTS"),
            Response::NotFound => line(out, "NOT_FOUND"),
            Response::Deleted => line(out, "DELETED"),
            Response::Touched => line(out, "TOUCHED"),
            Response::Ok => line(out, "OK"),
            Response::Reset => line(out, "RESET"),
            Response::Values {
                values,
                with_cas,
                end,
            } => encode_values(values, *with_cas, *end, out, share_min, share),
            Response::Number(n) => {
                put_decimal(out, *n);
                out.put_slice(b"\r\n");
            }
            Response::Version(v) => line(out, &format!("VERSION {v}")),
            Response::Stats(stats) => {
                for (name, value) in stats {
                    line(out, &format!("STAT {name} {value}"));
                }
                line(out, "END");
            }
            Response::Prefixes(rows) => {
                for (prefix, [get, hit, set, del]) in rows {
                    out.put_slice(b"PREFIX ");
                    out.put_slice(prefix);
                    line(out, &format!(" get {get} hit {hit} set {set} del {del}"));
                }
                line(out, "END");
            }
            Response::Debug(debug) => debug.encode(out),
            Response::Meta(reply) => reply.encode_sharing(out, share),
            Response::Error(ProtocolError::UnknownCommand) => line(out, "ERROR"),
            Response::Error(ProtocolError::Client(why)) => {
                line(out, &format!("CLIENT_ERROR {why}"))
            }
            Response::Error(ProtocolError::Server(why)) => {
                line(out, &format!("SERVER_ERROR {why}"))
            }
            Response::ServerError(why) => line(out, &format!("SERVER_ERROR {why}")),
            Response::Line(text) => line(out, text),
            Response::Dump {
                format,
                items,
                more,
            } => encode_page(*format, items, more.is_none(), out),
        }
    }
}

/// A retrieval's `VALUE` lines and data blocks, then `END` if `end`; values of at least
/// `share_min` bytes go to `share` (see [`Response::encode_sharing`]).
fn encode_values(
    values: &[Value],
    with_cas: bool,
    end: bool,
    out: &mut BytesMut,
    share_min: usize,
    share: &mut impl FnMut(&mut BytesMut, Piece<'_>),
) {
    for v in values {
        let shared = v.data.len() >= share_min || v.stream.is_some();
        // Room for what is copied: a shared value takes none.
        out.reserve(v.key.len() + if shared { 0 } else { v.data.len() } + 64);
        out.put_slice(b"VALUE ");
        out.put_slice(&v.key);
        out.put_u8(b' ');
        put_decimal(out, v.flags);
        out.put_u8(b' ');
        put_decimal(out, v.len());
        if with_cas {
            out.put_u8(b' ');
            put_decimal(out, v.cas);
        }
        out.put_slice(b"\r\n");
        if let Some(stream) = &v.stream {
            share(out, Piece::Streamed(stream));
        } else if shared {
            share(out, Piece::Shared(&v.data));
        } else {
            out.put_slice(&v.data);
        }
        out.put_slice(b"\r\n");
    }
    if end {
        out.put_slice(b"END\r\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MetaFlag, MetaStatus};

    fn wire(r: Response) -> Vec<u8> {
        let mut out = BytesMut::new();
        r.encode(&mut out);
        out.to_vec()
    }

    #[test]
    fn a_shared_value_is_handed_over_not_copied_nor_reserved_for() {
        let big = Bytes::from(vec![b'x'; 100_000]);
        let reply = Response::Values {
            values: vec![Value {
                key: Bytes::from("big"),
                flags: 0,
                cas: 0,
                data: big.clone(),
                stream: None,
            }],
            with_cas: false,
            end: true,
        };
        let mut out = BytesMut::with_capacity(64);
        let mut pieces: Vec<Bytes> = Vec::new();
        reply.encode_sharing(&mut out, 8192, &mut |out, piece| {
            pieces.push(out.split().freeze());
            if let Piece::Shared(value) = piece {
                pieces.push(value.clone());
            }
        });
        pieces.push(out.split().freeze());
        assert_eq!(pieces[0], &b"VALUE big 0 100000\r\n"[..]);
        assert_eq!(pieces[1].as_ptr(), big.as_ptr(), "the value's own bytes");
        assert_eq!(pieces[2], &b"\r\nEND\r\n"[..]);
        assert!(
            out.capacity() < 1024,
            "room reserved for the value: {}",
            out.capacity()
        );
        let whole: Vec<u8> = pieces.concat();
        assert_eq!(whole, wire(reply));
    }

    #[test]
    fn values_with_and_without_cas() {
        let v = Value {
            key: Bytes::from("k"),
            flags: 5,
            cas: 9,
            data: Bytes::from("ab"),
            stream: None,
        };
        assert_eq!(
            wire(Response::Values {
                values: vec![v.clone()],
                with_cas: false,
                end: true
            }),
            b"VALUE k 5 2\r\nab\r\nEND\r\n"
        );
        assert_eq!(
            wire(Response::Values {
                values: vec![v],
                with_cas: true,
                end: true
            }),
            b"VALUE k 5 2 9\r\nab\r\nEND\r\n"
        );
    }

    #[test]
    fn errors_and_meta() {
        assert_eq!(
            wire(Response::Error(ProtocolError::UnknownCommand)),
            b"ERROR\r\n"
        );
        assert_eq!(
            wire(Response::Error(ProtocolError::BAD_DATA_CHUNK)),
            b"CLIENT_ERROR bad data chunk\r\n"
        );
        assert_eq!(
            wire(Response::Meta(MetaReply {
                value: Some(Bytes::from("hi")),
                ..MetaReply::new(
                    MetaStatus::Va,
                    vec![MetaFlag::ClientFlags(5), MetaFlag::Ttl(-1)]
                )
            })),
            b"VA 2 f5 t-1\r\nhi\r\n"
        );
        assert_eq!(wire(Response::None), b"");
    }
}
