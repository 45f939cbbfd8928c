//! The streaming request parser: bytes in, a typed [`Request`] (or "need more") out.
//!
//! Three outcomes, as in mini-redis: a request and the bytes it used, `None` (read more;
//! never an error), or an error request the client is told about. Every path is bounded by
//! [`Limits`], so no client can make a connection buffer grow past them.
//!
//! The parser is written with nom's streaming combinators over the connection's read buffer
//! and copies nothing: a complete frame is split off the buffer and frozen, and every key,
//! value and opaque of its request is a shared slice of it. Every line is tokenized once
//! (its first token is peeked to tell a storage command from the rest): a line without a
//! data block is taken as its frame and read; a storage command's line is read on the
//! borrowed buffer, and once its outcome is known (its data block arrived, or an error that
//! does not wait for it) the frame is taken and its key and value are cut from it at the
//! offsets the reading found.

use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};
use nom::branch::alt;
use nom::bytes::complete::{tag as whole_tag, take_while};
use nom::sequence::preceded;
use nom::{IResult, Parser};

use super::lex::{
    data_block, first_token, line_end, narrow, offsets, parse_i32, parse_length, parse_u32,
    parse_u64, quiet_error, take_frame, tokenize, Limits, LongRetrieval, Parsed, Skip, Source,
};
use super::{admin, meta};
use super::{valid_key, ProtocolError, Request, StoreMode};

/// The first magic byte of a binary-protocol request.
const BINARY_REQUEST_MAGIC: u8 = 0x80;

/// Parses the next request from `buf` (copied once: for tests and tools holding a slice;
/// the connection uses [`parse_resumed`]). `None` means more bytes are needed.
pub fn parse(buf: &[u8], limits: &Limits) -> Option<Parsed> {
    parse_resumed(&mut BytesMut::from(buf), limits, None)
}

/// Takes the next request off the front of `buf`, going on with the keys of a long
/// retrieval line if `resume` says the previous frame was cut from one. `None` means more
/// bytes are needed, and `buf` is left as it was.
pub fn parse_resumed(
    buf: &mut BytesMut,
    limits: &Limits,
    resume: Option<LongRetrieval>,
) -> Option<Parsed> {
    if let Some(at) = resume {
        return retrieval_piece(buf, limits, at);
    }
    if buf.first() == Some(&BINARY_REQUEST_MAGIC) {
        let consumed = buf.len();
        buf.clear();
        return Some(Parsed::new(
            Request::Hangup("binary protocol is not supported"),
            consumed,
        ));
    }
    let window = &buf[..buf.len().min(limits.max_multiget_line_bytes + 1)];
    let Some(line_len) = line_end(window) else {
        return incomplete_line(buf, limits);
    };
    let raw_line = &buf[..line_len - 1];
    if line_len > limits.max_line_bytes && !is_retrieval(raw_line) {
        buf.advance(line_len);
        return Some(Parsed::invalid(ProtocolError::LINE_TOO_LONG, line_len));
    }
    let mode = match first_token(raw_line) {
        b"set" => StoreMode::Set,
        b"add" => StoreMode::Add,
        b"replace" => StoreMode::Replace,
        b"append" => StoreMode::Append,
        b"prepend" => StoreMode::Prepend,
        b"cas" => StoreMode::Cas,
        b"ms" => return meta::parse_set(buf, line_len, limits),
        _ => {
            let frame = take_frame(buf, line_len);
            return Some(Parsed::new(request(frame), line_len));
        }
    };
    storage(buf, mode, line_len, limits)
}

/// How many bytes the request at the front of `buf` takes in all, once its line is in and
/// it carries a data block the connection will buffer (a storage command or `ms` within the
/// item limit); `None` otherwise. The connection sizes its read buffer by it in one step.
pub fn awaited_len(buf: &[u8], limits: &Limits) -> Option<usize> {
    let window = &buf[..buf.len().min(limits.max_line_bytes)];
    let line_len = line_end(window)?;
    let line = &buf[..line_len - 1];
    let data_len = match first_token(line) {
        b"ms" => meta::read_set(&tokenize(line)).ok()?.0,
        b"set" | b"add" | b"replace" | b"append" | b"prepend" => {
            storage_line(StoreMode::Set, line).ok()?.len
        }
        b"cas" => storage_line(StoreMode::Cas, line).ok()?.len,
        _ => return None,
    };
    (data_len <= limits.whole_item_bytes()).then_some(line_len + data_len + 2)
}

/// The request of a line without a data block, taken off the buffer as `frame`.
fn request(frame: Bytes) -> Request {
    let tokens = tokenize(&frame[..frame.len() - 1]);
    let src = Source::Frame(&frame);
    let Some(&command) = tokens.first() else {
        return Request::Invalid(ProtocolError::UnknownCommand);
    };
    let touch = match command {
        b"get" | b"gets" => false,
        b"gat" | b"gats" => true,
        b"mg" | b"md" | b"ma" | b"mn" | b"me" => return meta::parse(src, command, &tokens),
        _ => return other(src, &tokens),
    };
    let (mut request, last_key) = retrieval(&frame, &tokens, touch);
    drop(tokens);
    if let (Request::Get { keys, .. } | Request::Gat { keys, .. }, Some(at)) =
        (&mut request, last_key)
    {
        keys.push(narrow(frame, at));
    }
    request
}

/// No `\n` within the window: wait, cut a long retrieval into a first piece, or refuse a
/// line longer than allowed. A refused line consumes only what was searched; the
/// connection discards the rest through its `\n`, so commands after it survive.
fn incomplete_line(buf: &mut BytesMut, limits: &Limits) -> Option<Parsed> {
    let window = buf.len().min(limits.max_multiget_line_bytes + 1);
    if is_retrieval(buf) {
        if buf.len() <= limits.max_multiget_line_bytes {
            return None;
        }
        return Some(first_piece(buf, window.min(limits.max_multiget_line_bytes)));
    }
    if buf.len() > limits.max_line_bytes {
        buf.advance(window);
        return Some(Parsed::invalid_line(ProtocolError::LINE_TOO_LONG, window));
    }
    None
}

/// The length of the complete tokens of a cut line: everything through its last space.
fn cut(window: &[u8]) -> Option<usize> {
    Some(window.iter().rposition(|&b| b == b' ')? + 1)
}

/// The start of a retrieval line longer than the window.
fn first_piece(buf: &mut BytesMut, window: usize) -> Parsed {
    let consumed = cut(&buf[..window]).filter(|&n| !first_token(&buf[..n - 1]).is_empty());
    let Some(consumed) = consumed else {
        buf.advance(window);
        return Parsed::invalid_line(ProtocolError::BAD_FORMAT, window);
    };
    let frame = take_frame(buf, consumed);
    let tokens = tokenize(&frame[..consumed - 1]);
    let touch = tokens[0].starts_with(b"ga");
    let cas = tokens[0].ends_with(b"s");
    let exptime = if touch {
        match tokens.get(1).map(|t| parse_i32(t)) {
            Some(Some(e)) => Some(e),
            _ => return Parsed::invalid_line(INVALID_EXPTIME, consumed),
        }
    } else {
        None
    };
    let keys = &tokens[if touch { 2 } else { 1 }..];
    let at = LongRetrieval { cas, exptime };
    piece(Source::Frame(&frame), keys, at, consumed, false)
}

/// The next piece of a long retrieval line: its keys up to the `\n` or the window's last
/// space.
fn retrieval_piece(buf: &mut BytesMut, limits: &Limits, at: LongRetrieval) -> Option<Parsed> {
    let window = buf.len().min(limits.max_multiget_line_bytes);
    let (consumed, end) = match line_end(&buf[..window]) {
        Some(n) => (n, true),
        None if buf.len() <= limits.max_multiget_line_bytes => return None,
        None => match cut(&buf[..window]) {
            Some(n) => (n, false),
            None => {
                buf.advance(window);
                return Some(Parsed::invalid_line(ProtocolError::BAD_FORMAT, window));
            }
        },
    };
    let frame = take_frame(buf, consumed);
    let tokens = tokenize(&frame[..consumed - 1]);
    Some(piece(Source::Frame(&frame), &tokens, at, consumed, end))
}

/// A retrieval request for `keys`, one piece of a line; `end` for the last piece.
fn piece(src: Source, keys: &[&[u8]], at: LongRetrieval, consumed: usize, end: bool) -> Parsed {
    if !keys.iter().all(|k| valid_key(k)) {
        let parsed = Parsed::invalid(ProtocolError::BAD_FORMAT, consumed);
        return if end {
            parsed
        } else {
            Parsed {
                skip: Skip::Line,
                ..parsed
            }
        };
    }
    let keys = keys.iter().map(|k| src.bytes(k)).collect();
    let request = match at.exptime {
        Some(exptime) => Request::Gat {
            exptime,
            keys,
            cas: at.cas,
            end,
        },
        None => Request::Get {
            keys,
            cas: at.cas,
            end,
        },
    };
    Parsed {
        resume: (!end).then_some(at),
        ..Parsed::new(request, consumed)
    }
}

/// Whether a line starts (after spaces) with a retrieval command and a space.
fn is_retrieval(line: &[u8]) -> bool {
    let command = alt((
        whole_tag("get "),
        whole_tag("gets "),
        whole_tag("gat "),
        whole_tag("gats "),
    ));
    let found: IResult<&[u8], &[u8]> = preceded(take_while(|b| b == b' '), command).parse(line);
    found.is_ok()
}

fn noreply(tokens: &[&[u8]]) -> bool {
    tokens.last() == Some(&&b"noreply"[..])
}

/// `get <key>*`, `gets <key>*`, `gat <exptime> <key>*`, `gats <exptime> <key>*` on their
/// `frame`: the request with every key but the last, and where the last one lies (the
/// caller makes it of the frame itself).
fn retrieval(frame: &Bytes, tokens: &[&[u8]], touch: bool) -> (Request, Option<Range<usize>>) {
    if tokens.len() < 2 {
        return (Request::Invalid(ProtocolError::UnknownCommand), None);
    }
    let cas = tokens[0].ends_with(b"s");
    let (exptime, key_tokens) = if touch {
        match parse_i32(tokens[1]) {
            Some(e) => (e, &tokens[2..]),
            None => return (Request::Invalid(INVALID_EXPTIME), None),
        }
    } else {
        (0, &tokens[1..])
    };
    if !key_tokens.iter().all(|k| valid_key(k)) {
        return (Request::Invalid(ProtocolError::BAD_FORMAT), None);
    }
    let mut keys = Vec::with_capacity(key_tokens.len());
    let last = key_tokens.split_last().map(|(last, others)| {
        keys.extend(others.iter().map(|k| frame.slice_ref(k)));
        offsets(frame, last)
    });
    let request = if touch {
        Request::Gat {
            exptime,
            keys,
            cas,
            end: true,
        }
    } else {
        Request::Get {
            keys,
            cas,
            end: true,
        }
    };
    (request, last)
}

/// A storage command line, read: the key's place in the line and the numbers.
struct StorageLine {
    key: Range<usize>,
    flags: u32,
    exptime: i64,
    len: usize,
    cas_unique: u64,
    noreply: bool,
}

/// Reads `<cmd> <key> <flags> <exptime> <bytes> [<cas>] [noreply]` (without its `\n`), or
/// the error it gets (and whether `noreply` hides it), which consumes only the line.
fn storage_line(mode: StoreMode, line: &[u8]) -> Result<StorageLine, (ProtocolError, bool)> {
    let tokens = tokenize(line);
    let base = if mode == StoreMode::Cas { 6 } else { 5 };
    if tokens.len() != base && tokens.len() != base + 1 {
        return Err((ProtocolError::UnknownCommand, false));
    }
    let noreply = noreply(&tokens);
    let numbers = || {
        let key = Some(tokens[1]).filter(|k| valid_key(k))?;
        Some(StorageLine {
            key: offsets(line, key),
            flags: parse_u32(tokens[2])?,
            exptime: parse_i32(tokens[3])?,
            len: parse_length(tokens[4])?,
            cas_unique: if mode == StoreMode::Cas {
                parse_u64(tokens[5])?
            } else {
                0
            },
            noreply,
        })
    };
    // As memcached: the data line is not swallowed, and noreply hides the error.
    numbers().ok_or((ProtocolError::BAD_FORMAT, noreply))
}

/// A storage command and its data block, read on the borrowed buffer; the frame is taken
/// once the outcome is known.
fn storage(
    buf: &mut BytesMut,
    mode: StoreMode,
    line_len: usize,
    limits: &Limits,
) -> Option<Parsed> {
    let line = match storage_line(mode, &buf[..line_len - 1]) {
        Ok(line) => line,
        Err((error, noreply)) => {
            buf.advance(line_len);
            return Some(Parsed::new(quiet_error(error, noreply), line_len));
        }
    };
    let noreply = line.noreply;
    if line.len > limits.whole_item_bytes() {
        let frame = take_frame(buf, line_len);
        let key = frame.slice(line.key);
        // Only a plain `set` is streamed: every other command reads the old item or writes
        // under a condition, and holds its value whole.
        let streamed = mode == StoreMode::Set && line.len <= limits.max_item_bytes;
        let (request, skip) = match streamed {
            true => (
                Request::StoreStreamed {
                    key,
                    flags: line.flags,
                    exptime: line.exptime,
                    len: line.len,
                    noreply,
                },
                Skip::Stream(line.len + 2),
            ),
            false => (
                Request::TooLarge {
                    key,
                    remove_old: mode == StoreMode::Set,
                    noreply,
                },
                Skip::Bytes(line.len + 2),
            ),
        };
        return Some(Parsed {
            skip,
            ..Parsed::new(request, line_len)
        });
    }
    let complete = data_block(&buf[line_len..], line.len)?.is_some();
    let consumed = line_len + line.len + 2;
    if !complete {
        buf.advance(consumed);
        let error = quiet_error(ProtocolError::BAD_DATA_CHUNK, noreply);
        return Some(Parsed::new(error, consumed));
    }
    let frame = take_frame(buf, consumed);
    let request = Request::Store {
        mode,
        key: frame.slice(line.key),
        flags: line.flags,
        exptime: line.exptime,
        data: narrow(frame, line_len..consumed - 2),
        cas_unique: line.cas_unique,
        noreply,
    };
    Some(Parsed::new(request, consumed))
}

/// Every command without a data block other than retrievals.
fn other(src: Source, tokens: &[&[u8]]) -> Request {
    let n = tokens.len();
    let unknown = Request::Invalid(ProtocolError::UnknownCommand);
    match tokens[0] {
        b"delete" => delete(src, tokens),
        b"incr" | b"decr" if n == 3 || n == 4 => arith(src, tokens),
        b"touch" if n == 3 || n == 4 => touch(src, tokens),
        b"flush_all" if n <= 3 => flush_all(tokens),
        b"version" => Request::Version,
        b"quit" => Request::Quit,
        b"verbosity" => admin::verbosity(tokens),
        b"cache_memlimit" => admin::cache_memlimit(tokens),
        b"shutdown" => admin::shutdown(tokens),
        b"lru_crawler" => admin::lru_crawler(tokens),
        b"slabs" if n >= 3 && tokens[1] == b"automove" => slabs_automove(tokens),
        b"stats" => Request::Stats {
            arg: (n > 1).then(|| String::from_utf8_lossy(&tokens[1..].join(&b' ')).into_owned()),
        },
        _ if n >= 2 && tokens[n - 1].starts_with(b"HTTP/") => {
            Request::Hangup("HTTP request on the memcached port")
        }
        _ => unknown,
    }
}

/// `delete <key> [0] [noreply]`; memcached reads `noreply` only past the key.
fn delete(src: Source, tokens: &[&[u8]]) -> Request {
    let n = tokens.len();
    if !(2..=4).contains(&n) {
        return Request::Invalid(ProtocolError::UnknownCommand);
    }
    let noreply = n > 2 && noreply(tokens);
    if n > 2 {
        let hold_is_zero = tokens[2] == b"0";
        let valid = (n == 3 && (hold_is_zero || noreply)) || (n == 4 && hold_is_zero && noreply);
        if !valid {
            return quiet_error(
                ProtocolError::Client("bad command line format.  Usage: delete <key> [noreply]"),
                noreply,
            );
        }
    }
    if !valid_key(tokens[1]) {
        return quiet_error(ProtocolError::BAD_FORMAT, noreply);
    }
    Request::Delete {
        key: src.bytes(tokens[1]),
        noreply,
    }
}

/// `incr|decr <key> <delta> [noreply]`.
fn arith(src: Source, tokens: &[&[u8]]) -> Request {
    let noreply = noreply(tokens);
    if !valid_key(tokens[1]) {
        return quiet_error(ProtocolError::BAD_FORMAT, noreply);
    }
    let Some(delta) = parse_u64(tokens[2]) else {
        return quiet_error(
            ProtocolError::Client("invalid numeric delta argument"),
            noreply,
        );
    };
    Request::Arith {
        key: src.bytes(tokens[1]),
        delta,
        incr: tokens[0] == b"incr",
        noreply,
    }
}

/// `touch <key> <exptime> [noreply]`.
fn touch(src: Source, tokens: &[&[u8]]) -> Request {
    let noreply = noreply(tokens);
    if !valid_key(tokens[1]) {
        return quiet_error(ProtocolError::BAD_FORMAT, noreply);
    }
    let Some(exptime) = parse_i32(tokens[2]) else {
        return quiet_error(INVALID_EXPTIME, noreply);
    };
    Request::Touch {
        key: src.bytes(tokens[1]),
        exptime,
        noreply,
    }
}

const INVALID_EXPTIME: ProtocolError = ProtocolError::Client("invalid exptime argument");

/// `flush_all [delay] [noreply]`.
fn flush_all(tokens: &[&[u8]]) -> Request {
    let noreply = noreply(tokens);
    let delay = if tokens.len() == (if noreply { 2 } else { 1 }) {
        0
    } else {
        match parse_i32(tokens[1]) {
            Some(d) => d,
            None => return quiet_error(INVALID_EXPTIME, noreply),
        }
    };
    Request::FlushAll { delay, noreply }
}

/// `slabs automove <0|1|2>` or `slabs automove ratio <x>`: accepted, nothing to tune here.
fn slabs_automove(tokens: &[&[u8]]) -> Request {
    let noreply = noreply(tokens);
    let ok = Request::Verbosity {
        level: None,
        noreply,
    };
    if tokens[2] == b"ratio" {
        let ratio = tokens
            .get(3)
            .filter(|_| tokens.len() >= 4)
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| t.parse::<f64>().ok());
        return match ratio {
            Some(_) => ok,
            None => quiet_error(ProtocolError::UnknownCommand, noreply),
        };
    }
    match parse_u64(tokens[2]).map(|l| l as u32) {
        Some(0..=2) => ok,
        Some(_) => quiet_error(ProtocolError::UnknownCommand, noreply),
        None => quiet_error(ProtocolError::BAD_FORMAT, noreply),
    }
}

#[cfg(test)]
mod tests;
