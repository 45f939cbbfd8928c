//! The memcached wire protocol: typed requests, a streaming parser and a response encoder.
//!
//! This module is pure: it knows nothing of sockets, tokio or storage, so it can be tested,
//! fuzzed and benchmarked alone. The connection feeds it bytes; it answers with a
//! [`Parsed`] frame or asks for more.

mod admin;
pub mod binary;
mod lex;
mod meta;
mod meta_reply;
mod parse;
mod response;

pub use admin::{Crawler, DumpFormat, DumpItem, ShutdownMode, SlabClasses};
pub use lex::{line_end, Limits, LongRetrieval, Parsed, Skip};
pub use meta::{MetaArithMode, MetaFlags, MetaRequest, MetaSetMode, ReturnFlag};
pub use meta_reply::{encode_key, Markers, MetaDebug, MetaFlag, MetaReply, MetaStatus};
pub use parse::{awaited_len, parse, parse_resumed};
pub use response::{Piece, Pieces, Response, Streamed, Value};

use bytes::{BufMut, Bytes, BytesMut};

/// Appends `n` in decimal: every value header and meta flag carries numbers, and `itoa`
/// writes one in a few dozen instructions where `format!` takes hundreds and an allocation.
pub(crate) fn put_decimal<N: itoa::Integer>(out: &mut BytesMut, n: N) {
    out.put_slice(itoa::Buffer::new().format(n).as_bytes());
}

/// Longest key memcached accepts, in bytes.
pub const MAX_KEY_BYTES: usize = 250;

/// What a storage command asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreMode {
    /// `set`: store unconditionally.
    Set,
    /// `add`: store only if no live item exists.
    Add,
    /// `replace`: store only if a live item exists.
    Replace,
    /// `append`: add data after an existing item's data.
    Append,
    /// `prepend`: add data before an existing item's data.
    Prepend,
    /// `cas`: store only if the item's cas unique still matches.
    Cas,
}

/// One complete request from a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// `get`/`gets` (`cas` = true for `gets`): one or more keys.
    Get {
        keys: Vec<Bytes>,
        cas: bool,
        /// The last (or only) piece of its line: the reply ends with `END`.
        end: bool,
    },
    /// `gat`/`gats`: fetch and set a new expiration time.
    Gat {
        exptime: i64,
        keys: Vec<Bytes>,
        cas: bool,
        /// The last (or only) piece of its line: the reply ends with `END`.
        end: bool,
    },
    /// `set`, `add`, `replace`, `append`, `prepend`, `cas`.
    Store {
        mode: StoreMode,
        key: Bytes,
        flags: u32,
        exptime: i64,
        data: Bytes,
        /// The client's cas unique (only for `cas`).
        cas_unique: u64,
        noreply: bool,
    },
    /// A `set` whose data block is longer than `stream_above`: the block follows and is
    /// streamed to the store as it arrives ([`Skip::Stream`]).
    StoreStreamed {
        key: Bytes,
        flags: u32,
        exptime: i64,
        /// The value's length.
        len: usize,
        noreply: bool,
    },
    /// A storage command whose data exceeded the item size limit; its data is skipped.
    TooLarge {
        key: Bytes,
        /// memcached removes the old item when a `set` fails this way.
        remove_old: bool,
        noreply: bool,
    },
    Delete {
        key: Bytes,
        noreply: bool,
    },
    /// `incr` (`incr` = true) or `decr`.
    Arith {
        key: Bytes,
        delta: u64,
        incr: bool,
        noreply: bool,
    },
    Touch {
        key: Bytes,
        exptime: i64,
        noreply: bool,
    },
    FlushAll {
        delay: i64,
        noreply: bool,
    },
    Version,
    /// `verbosity <level>` (`level` set) and `slabs automove` (`None`: nothing to tune
    /// here); `OK`.
    Verbosity {
        level: Option<u32>,
        noreply: bool,
    },
    /// `cache_memlimit <megabytes>`: the near tier's RAM size.
    CacheMemlimit {
        megabytes: u32,
        noreply: bool,
    },
    /// `shutdown [graceful]`.
    Shutdown(ShutdownMode),
    /// `lru_crawler ...`.
    LruCrawler(Crawler),
    /// `stats` with an optional sub-command (`settings`, `reset`, ...).
    Stats {
        arg: Option<String>,
    },
    Quit,
    Meta(MetaRequest),
    /// Input that gets an error reply; the connection goes on.
    Invalid(ProtocolError),
    /// Bad input whose error reply `noreply` suppressed: answered with nothing.
    Silent,
    /// Input after which the connection must be closed (binary protocol, HTTP).
    Hangup(&'static str),
}

/// Errors a client is told about, with memcached's exact wording.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// `ERROR`: unknown command or wrong argument count.
    UnknownCommand,
    /// `CLIENT_ERROR <text>`.
    Client(&'static str),
    /// `SERVER_ERROR <text>`.
    Server(&'static str),
}

impl ProtocolError {
    pub const BAD_FORMAT: Self = Self::Client("bad command line format");
    pub const BAD_DATA_CHUNK: Self = Self::Client("bad data chunk");
    pub const LINE_TOO_LONG: Self = Self::Client("line too long");
    pub const TOO_LARGE: Self = Self::Server("object too large for cache");
}

impl Request {
    /// Whether the request must wait for everything before it on its connection (and
    /// everything after it waits for it).
    pub fn is_barrier(&self) -> bool {
        // `stats` counts what the commands before it did, as in memcached.
        // A dump goes on page by page after its first reply (see `Response::Dump`);
        // `shutdown` answers what came before it, then closes.
        matches!(
            self,
            Request::Stats { .. }
                | Request::FlushAll { .. }
                | Request::Shutdown(_)
                | Request::LruCrawler(_)
                | Request::Quit
                | Request::Hangup(_)
        )
    }

    /// The keys a request touches, for ordering the requests of one connection that are
    /// not barriers.
    pub fn keys(&self) -> Vec<Bytes> {
        match self {
            Request::Get { keys, .. } | Request::Gat { keys, .. } => keys.clone(),
            Request::Store { key, .. }
            | Request::TooLarge { key, .. }
            | Request::StoreStreamed { key, .. }
            | Request::Delete { key, .. }
            | Request::Arith { key, .. }
            | Request::Touch { key, .. } => vec![key.clone()],
            Request::Meta(m) => m.key().into_iter().cloned().collect(),
            Request::Version
            | Request::Verbosity { .. }
            | Request::CacheMemlimit { .. }
            | Request::Invalid(_)
            | Request::Silent
            // Barriers: ordered by waiting for everything else.
            | Request::Stats { .. }
            | Request::FlushAll { .. }
            | Request::Shutdown(_)
            | Request::LruCrawler(_)
            | Request::Quit
            | Request::Hangup(_) => Vec::new(),
        }
    }
}

/// A decimal 32-bit unsigned number as memcached's `safe_strtoul` reads it (for command
/// arguments parsed outside the protocol module, such as `stats cachedump`).
pub fn parse_u32_field(token: &[u8]) -> Option<u32> {
    lex::parse_u32(token)
}

/// A counter's data as memcached's incr reads it (`safe_strtoull` on the item's bytes as a
/// C string): blanks, digits, then nothing, a blank or a NUL; anything may follow that.
pub fn parse_counter(data: &[u8]) -> Option<u64> {
    let text = data.split(|&b| b == 0).next().unwrap_or(data);
    lex::parse_u64(text)
}

/// Whether a key is acceptable: 1 to 250 bytes, no whitespace or control characters.
pub fn valid_key(key: &[u8]) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_BYTES && key.iter().all(|&b| b > b' ' && b != 0x7f)
}
