//! The streaming request parser: bytes in, a typed [`Request`] (or "need more") out.
//!
//! Three outcomes, as in mini-redis: a request and the bytes it used, `None` (read more;
//! never an error), or an error request the client is told about. Every path is bounded by
//! [`Limits`], so no client can make a connection buffer grow past them.

use bytes::Bytes;
use nom::bytes::streaming::{tag, take_until};
use nom::sequence::terminated;
use nom::{IResult, Parser};

use super::meta;
use super::{valid_key, ProtocolError, Request, StoreMode};

/// Default longest command line (memcached's own bound for non-`get` lines).
pub const DEFAULT_MAX_LINE_BYTES: usize = 2048;
/// Default longest `get`/`gets`/`gat`/`gats` line: about a thousand full-length keys.
pub const DEFAULT_MAX_MULTIGET_LINE_BYTES: usize = 256 * 1024;
/// Default item size limit, as memcached's `-I 1m`.
pub const DEFAULT_MAX_ITEM_BYTES: usize = 1024 * 1024;

/// Bounds the parser enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest data block a storage command may carry.
    pub max_item_bytes: usize,
    /// Longest command line other than a multi-key retrieval.
    pub max_line_bytes: usize,
    /// Longest multi-key retrieval line.
    pub max_multiget_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_item_bytes: DEFAULT_MAX_ITEM_BYTES,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_multiget_line_bytes: DEFAULT_MAX_MULTIGET_LINE_BYTES,
        }
    }
}

impl Limits {
    /// The most bytes the connection ever needs to hold to parse one request.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_multiget_line_bytes
            .max(self.max_line_bytes + self.max_item_bytes + 2)
    }
}

/// What the connection must discard after a frame, beyond `consumed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    None,
    /// The data block of a refused item: this many more bytes, which may not have arrived.
    Bytes(usize),
    /// The rest of an over-long line, through its `\n`.
    Line,
}

/// One parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub request: Request,
    /// Bytes of the buffer this frame used.
    pub consumed: usize,
    /// What to discard after it.
    pub skip: Skip,
}

impl Parsed {
    fn new(request: Request, consumed: usize) -> Self {
        Parsed {
            request,
            consumed,
            skip: Skip::None,
        }
    }
    fn invalid(error: ProtocolError, consumed: usize) -> Self {
        Parsed::new(Request::Invalid(error), consumed)
    }
}

/// The first magic byte of a binary-protocol request.
const BINARY_REQUEST_MAGIC: u8 = 0x80;

/// A command line through its `\n` (streaming: incomplete until the `\n` arrives).
fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    terminated(take_until("\n"), tag("\n")).parse(input)
}

/// Parses the next request from `buf`; `None` means more bytes are needed.
pub fn parse(buf: &[u8], limits: &Limits) -> Option<Parsed> {
    if buf.first() == Some(&BINARY_REQUEST_MAGIC) {
        return Some(Parsed::new(
            Request::Hangup("binary protocol is not supported"),
            buf.len(),
        ));
    }
    let window = &buf[..buf.len().min(limits.max_multiget_line_bytes + 1)];
    let raw_line = match line(window) {
        Ok((_, raw)) => raw,
        Err(_) => return incomplete_line(buf, limits),
    };
    let line_len = raw_line.len() + 1;
    if line_len > limits.max_line_bytes && !is_retrieval(raw_line) {
        return Some(Parsed::invalid(ProtocolError::LINE_TOO_LONG, line_len));
    }
    let text = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
    let tokens: Vec<&[u8]> = text
        .split(|&b| b == b' ')
        .filter(|t| !t.is_empty())
        .collect();
    let Some(&command) = tokens.first() else {
        return Some(Parsed::invalid(ProtocolError::UnknownCommand, line_len));
    };
    let rest = &buf[line_len..];
    match command {
        b"get" | b"gets" => Some(Parsed::new(retrieval(&tokens, false), line_len)),
        b"gat" | b"gats" => Some(Parsed::new(retrieval(&tokens, true), line_len)),
        b"set" => storage(StoreMode::Set, &tokens, line_len, rest, limits),
        b"add" => storage(StoreMode::Add, &tokens, line_len, rest, limits),
        b"replace" => storage(StoreMode::Replace, &tokens, line_len, rest, limits),
        b"append" => storage(StoreMode::Append, &tokens, line_len, rest, limits),
        b"prepend" => storage(StoreMode::Prepend, &tokens, line_len, rest, limits),
        b"cas" => storage(StoreMode::Cas, &tokens, line_len, rest, limits),
        b"mg" | b"ms" | b"md" | b"ma" | b"mn" | b"me" => {
            meta::parse(command, &tokens, line_len, rest, limits)
        }
        _ => Some(Parsed::new(other(&tokens), line_len)),
    }
}

/// No `\n` yet: wait, unless the line is already longer than allowed.
fn incomplete_line(buf: &[u8], limits: &Limits) -> Option<Parsed> {
    let limit = if is_retrieval(buf) {
        limits.max_multiget_line_bytes
    } else {
        limits.max_line_bytes
    };
    if buf.len() > limit {
        return Some(Parsed {
            request: Request::Invalid(ProtocolError::LINE_TOO_LONG),
            consumed: buf.len(),
            skip: Skip::Line,
        });
    }
    None
}

fn is_retrieval(line: &[u8]) -> bool {
    let start = line.iter().position(|&b| b != b' ').unwrap_or(line.len());
    let line = &line[start..];
    [&b"get "[..], b"gets ", b"gat ", b"gats "]
        .iter()
        .any(|p| line.starts_with(p))
}

fn noreply(tokens: &[&[u8]]) -> bool {
    tokens.last() == Some(&&b"noreply"[..])
}

/// `get <key>*`, `gets <key>*`, `gat <exptime> <key>*`, `gats <exptime> <key>*`.
fn retrieval(tokens: &[&[u8]], touch: bool) -> Request {
    if tokens.len() < 2 {
        return Request::Invalid(ProtocolError::UnknownCommand);
    }
    let cas = tokens[0].ends_with(b"s");
    let (exptime, key_tokens) = if touch {
        match parse_i64(tokens[1]) {
            Some(e) => (e, &tokens[2..]),
            None => return Request::Invalid(ProtocolError::Client("invalid exptime argument")),
        }
    } else {
        (0, &tokens[1..])
    };
    if !key_tokens.iter().all(|k| valid_key(k)) {
        return Request::Invalid(ProtocolError::BAD_FORMAT);
    }
    let keys = key_tokens
        .iter()
        .map(|k| Bytes::copy_from_slice(k))
        .collect();
    if touch {
        Request::Gat { exptime, keys, cas }
    } else {
        Request::Get { keys, cas }
    }
}

/// `<cmd> <key> <flags> <exptime> <bytes> [<cas>] [noreply]` and its data block.
fn storage(
    mode: StoreMode,
    tokens: &[&[u8]],
    line_len: usize,
    rest: &[u8],
    limits: &Limits,
) -> Option<Parsed> {
    let base = if mode == StoreMode::Cas { 6 } else { 5 };
    if tokens.len() != base && tokens.len() != base + 1 {
        return Some(Parsed::invalid(ProtocolError::UnknownCommand, line_len));
    }
    let header = (|| {
        let key = tokens[1];
        if !valid_key(key) {
            return None;
        }
        let flags = parse_u32(tokens[2])?;
        let exptime = parse_i64(tokens[3])?;
        let len = usize::try_from(parse_i64(tokens[4])?).ok()?;
        let cas_unique = if mode == StoreMode::Cas {
            parse_u64(tokens[5])?
        } else {
            0
        };
        Some((key, flags, exptime, len, cas_unique))
    })();
    let Some((key, flags, exptime, len, cas_unique)) = header else {
        return Some(Parsed::invalid(ProtocolError::BAD_FORMAT, line_len));
    };
    let noreply = noreply(tokens);
    if len > limits.max_item_bytes {
        return Some(Parsed {
            request: Request::TooLarge {
                key: Bytes::copy_from_slice(key),
                remove_old: mode == StoreMode::Set,
                noreply,
            },
            consumed: line_len,
            skip: Skip::Bytes(len + 2),
        });
    }
    let data = data_block(rest, len)?;
    let consumed = line_len + len + 2;
    let Some(data) = data else {
        return Some(Parsed::new(
            quiet_error(ProtocolError::BAD_DATA_CHUNK, noreply),
            consumed,
        ));
    };
    Some(Parsed::new(
        Request::Store {
            mode,
            key: Bytes::copy_from_slice(key),
            flags,
            exptime,
            data: Bytes::copy_from_slice(data),
            cas_unique,
            noreply,
        },
        consumed,
    ))
}

/// The `len` data bytes and their `\r\n`: `None` = incomplete, `Some(None)` = bad terminator.
pub(super) fn data_block(rest: &[u8], len: usize) -> Option<Option<&[u8]>> {
    if rest.len() < len + 2 {
        return None;
    }
    if &rest[len..len + 2] != b"\r\n" {
        return Some(None);
    }
    Some(Some(&rest[..len]))
}

/// An error whose reply `noreply` suppresses, as memcached does for a bad data chunk.
fn quiet_error(error: ProtocolError, noreply: bool) -> Request {
    if noreply {
        Request::Silent
    } else {
        Request::Invalid(error)
    }
}

/// Every command without a data block other than retrievals.
fn other(tokens: &[&[u8]]) -> Request {
    let n = tokens.len();
    let noreply = noreply(tokens);
    let bad = Request::Invalid(ProtocolError::BAD_FORMAT);
    let unknown = Request::Invalid(ProtocolError::UnknownCommand);
    match tokens[0] {
        b"delete" => {
            if !(2..=4).contains(&n) {
                return unknown;
            }
            if n > 2 {
                let hold_is_zero = tokens[2] == b"0";
                let valid =
                    (n == 3 && (hold_is_zero || noreply)) || (n == 4 && hold_is_zero && noreply);
                if !valid {
                    return Request::Invalid(ProtocolError::Client(
                        "bad command line format.  Usage: delete <key> [noreply]",
                    ));
                }
            }
            if !valid_key(tokens[1]) {
                return bad;
            }
            Request::Delete {
                key: Bytes::copy_from_slice(tokens[1]),
                noreply,
            }
        }
        b"incr" | b"decr" => {
            if n != 3 && n != 4 {
                return unknown;
            }
            if !valid_key(tokens[1]) {
                return bad;
            }
            let Some(delta) = parse_u64(tokens[2]) else {
                return Request::Invalid(ProtocolError::Client("invalid numeric delta argument"));
            };
            Request::Arith {
                key: Bytes::copy_from_slice(tokens[1]),
                delta,
                incr: tokens[0] == b"incr",
                noreply,
            }
        }
        b"touch" => {
            if n != 3 && n != 4 {
                return unknown;
            }
            if !valid_key(tokens[1]) {
                return bad;
            }
            let Some(exptime) = parse_i64(tokens[2]) else {
                return Request::Invalid(ProtocolError::Client("invalid exptime argument"));
            };
            Request::Touch {
                key: Bytes::copy_from_slice(tokens[1]),
                exptime,
                noreply,
            }
        }
        b"flush_all" => {
            if n > 3 {
                return unknown;
            }
            let delay = if n == (if noreply { 2 } else { 1 }) {
                0
            } else {
                match parse_i64(tokens[1]) {
                    Some(d) => d,
                    None => {
                        return Request::Invalid(ProtocolError::Client("invalid exptime argument"))
                    }
                }
            };
            Request::FlushAll { delay, noreply }
        }
        b"version" => Request::Version,
        b"quit" => Request::Quit,
        b"verbosity" => {
            if n != 2 && n != 3 {
                return unknown;
            }
            if !noreply && parse_u64(tokens[1]).is_none() {
                return bad;
            }
            Request::Verbosity { noreply }
        }
        b"stats" => Request::Stats {
            arg: (n > 1).then(|| String::from_utf8_lossy(&tokens[1..].join(&b' ')).into_owned()),
        },
        t if n >= 2 && tokens[n - 1].starts_with(b"HTTP/") => {
            let _ = t;
            Request::Hangup("HTTP request on the memcached port")
        }
        _ => unknown,
    }
}

/// A decimal unsigned 32-bit number (an optional leading `+`, as strtoul takes).
pub(super) fn parse_u32(token: &[u8]) -> Option<u32> {
    u32::try_from(parse_u64(token)?).ok()
}

/// A decimal unsigned 64-bit number; no sign but an optional `+`.
pub(super) fn parse_u64(token: &[u8]) -> Option<u64> {
    let digits = token.strip_prefix(b"+").unwrap_or(token);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// A decimal signed 64-bit number.
pub(super) fn parse_i64(token: &[u8]) -> Option<i64> {
    let (negative, digits) = match token.first() {
        Some(b'-') => (true, &token[1..]),
        Some(b'+') => (false, &token[1..]),
        _ => (false, token),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let magnitude: i64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(if negative { -magnitude } else { magnitude })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(input: &[u8]) -> Option<Parsed> {
        parse(input, &Limits::default())
    }

    fn req(input: &[u8]) -> Request {
        p(input).expect("complete").request
    }

    #[test]
    fn incomplete_until_newline() {
        assert_eq!(p(b"get foo"), None);
        assert_eq!(p(b"set foo 0 0 3\r\nab"), None);
        assert_eq!(p(b"set foo 0 0 3\r\nabc\r"), None);
        assert_eq!(p(b""), None);
    }

    #[test]
    fn get_and_gets() {
        let parsed = p(b"get a b\r\nrest").unwrap();
        assert_eq!(parsed.consumed, 9);
        assert_eq!(
            parsed.request,
            Request::Get {
                keys: vec![Bytes::from("a"), Bytes::from("b")],
                cas: false
            }
        );
        assert_eq!(
            req(b"  gets   k  \n"),
            Request::Get {
                keys: vec![Bytes::from("k")],
                cas: true
            }
        );
        assert_eq!(
            req(b"get\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
    }

    #[test]
    fn gat_needs_numeric_exptime() {
        assert_eq!(
            req(b"gat abc k\r\n"),
            Request::Invalid(ProtocolError::Client("invalid exptime argument"))
        );
        assert_eq!(
            req(b"gats 10 k\r\n"),
            Request::Gat {
                exptime: 10,
                keys: vec![Bytes::from("k")],
                cas: true
            }
        );
    }

    #[test]
    fn set_with_data() {
        let parsed = p(b"set k 5 -1 3 noreply\r\nabc\r\n").unwrap();
        assert_eq!(parsed.consumed, 27);
        assert_eq!(
            parsed.request,
            Request::Store {
                mode: StoreMode::Set,
                key: Bytes::from("k"),
                flags: 5,
                exptime: -1,
                data: Bytes::from("abc"),
                cas_unique: 0,
                noreply: true
            }
        );
    }

    #[test]
    fn cas_takes_unique() {
        match req(b"cas k 0 0 1 99\r\nx\r\n") {
            Request::Store {
                mode, cas_unique, ..
            } => {
                assert_eq!(mode, StoreMode::Cas);
                assert_eq!(cas_unique, 99);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            req(b"cas k 0 0 1\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
    }

    #[test]
    fn bad_data_chunk_consumes_declared_length() {
        let parsed = p(b"set k 0 0 1\r\nab\r\n").unwrap();
        assert_eq!(
            parsed.request,
            Request::Invalid(ProtocolError::BAD_DATA_CHUNK)
        );
        assert_eq!(parsed.consumed, 13 + 3);
    }

    #[test]
    fn too_large_is_skipped() {
        let limits = Limits {
            max_item_bytes: 10,
            ..Limits::default()
        };
        let parsed = parse(b"set k 0 0 11\r\n", &limits).unwrap();
        assert_eq!(parsed.skip, Skip::Bytes(13));
        assert!(matches!(
            parsed.request,
            Request::TooLarge {
                remove_old: true,
                ..
            }
        ));
    }

    #[test]
    fn bad_lines() {
        let bad = Request::Invalid(ProtocolError::BAD_FORMAT);
        assert_eq!(req(b"set k -1 0 1\r\n"), bad);
        assert_eq!(req(b"set k 0 0 -1\r\n"), bad);
        assert_eq!(req(b"set k 4294967296 0 1\r\n"), bad);
        assert_eq!(
            req(b"set k 0 0\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
        let long_key = format!("get {}\r\n", "a".repeat(251));
        assert_eq!(req(long_key.as_bytes()), bad);
        assert_eq!(
            req(b"\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
        assert_eq!(
            req(b"bogus\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
        assert_eq!(
            req(b"incr k x\r\n"),
            Request::Invalid(ProtocolError::Client("invalid numeric delta argument"))
        );
    }

    #[test]
    fn delete_forms() {
        assert!(matches!(
            req(b"delete k 0\r\n"),
            Request::Delete { noreply: false, .. }
        ));
        assert!(matches!(
            req(b"delete k noreply\r\n"),
            Request::Delete { noreply: true, .. }
        ));
        assert!(matches!(
            req(b"delete k 1\r\n"),
            Request::Invalid(ProtocolError::Client(_))
        ));
    }

    #[test]
    fn over_long_line_is_refused_and_skipped() {
        let limits = Limits::default();
        let junk = vec![b'x'; limits.max_line_bytes + 1];
        let parsed = parse(&junk, &limits).unwrap();
        assert_eq!(parsed.skip, Skip::Line);
        assert_eq!(parsed.consumed, junk.len());
        // A long multi-get is fine.
        let mut line = b"get".to_vec();
        for i in 0..500 {
            line.extend_from_slice(format!(" key{i:0>100}").as_bytes());
        }
        line.extend_from_slice(b"\r\n");
        assert!(matches!(
            parse(&line, &limits).unwrap().request,
            Request::Get { .. }
        ));
    }

    #[test]
    fn binary_magic_hangs_up() {
        assert!(matches!(req(&[0x80, 0x00, 0x00]), Request::Hangup(_)));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn never_panics_and_stays_in_bounds(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let limits = Limits { max_item_bytes: 1024, max_line_bytes: 256, max_multiget_line_bytes: 1024 };
            if let Some(parsed) = parse(&input, &limits) {
                prop_assert!(parsed.consumed > 0);
                prop_assert!(parsed.consumed <= input.len());
            } else {
                // Holding on for more is only allowed while within the frame bound.
                prop_assert!(input.len() <= limits.max_frame_bytes());
            }
        }

        #[test]
        fn commandlike_input_never_panics(
            cmd in prop::sample::select(vec!["get", "gets", "gat", "set", "cas", "incr", "delete", "touch", "flush_all", "mg", "ms", "md", "ma", "me", "mn", "verbosity", "stats"]),
            args in proptest::collection::vec("[ -~]{0,12}", 0..8),
            tail in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let mut input = format!("{cmd} {}\r\n", args.join(" ")).into_bytes();
            input.extend_from_slice(&tail);
            let limits = Limits { max_item_bytes: 1024, max_line_bytes: 256, max_multiget_line_bytes: 1024 };
            if let Some(parsed) = parse(&input, &limits) {
                prop_assert!(parsed.consumed > 0 && parsed.consumed <= input.len());
            }
        }
    }
}
