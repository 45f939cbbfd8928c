//! The layer under both text parsers (classic in `parse`, meta in `meta`): the limits
//! they enforce and what a parse yields, lines, tokens and frames, and numbers read as
//! memcached reads them. It knows no command.

use std::ops::{Deref, Range};

use bytes::{Buf, Bytes, BytesMut};
use nom::bytes::complete::{tag as whole_tag, take_till1, take_while};
use nom::bytes::streaming::{tag, take, take_until};
use nom::sequence::{preceded, terminated};
use nom::{IResult, Parser};

use super::{ProtocolError, Request};

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
    /// Data blocks longer than this are streamed (a classic `set`) or refused as too large
    /// (every other command): never buffered whole.
    pub stream_above: usize,
    /// Longest command line other than a multi-key retrieval.
    pub max_line_bytes: usize,
    /// Longest multi-key retrieval line.
    pub max_multiget_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_item_bytes: DEFAULT_MAX_ITEM_BYTES,
            stream_above: usize::MAX,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            max_multiget_line_bytes: DEFAULT_MAX_MULTIGET_LINE_BYTES,
        }
    }
}

impl Limits {
    /// The most bytes the connection ever needs to hold to parse one request.
    pub fn max_frame_bytes(&self) -> usize {
        self.max_multiget_line_bytes
            .max(self.max_line_bytes + self.whole_item_bytes() + 2)
    }

    /// The longest data block held whole: longer ones are streamed or refused.
    pub fn whole_item_bytes(&self) -> usize {
        self.max_item_bytes.min(self.stream_above)
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
    /// The data block of a streamed `set`: this many more bytes (the value, then `\r\n`),
    /// which the connection hands to the request as they arrive.
    Stream(usize),
}

/// Where a retrieval line longer than the parser's window was cut: the next parse goes on
/// with its keys. The connection keeps it between frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongRetrieval {
    /// `gets`/`gats`: values carry their cas.
    pub cas: bool,
    /// `gat`/`gats`: the new exptime.
    pub exptime: Option<i64>,
}

/// One parsed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parsed {
    pub request: Request,
    /// Bytes of the buffer this frame used (already taken off it by [`parse_resumed`]).
    pub consumed: usize,
    /// What to discard after it.
    pub skip: Skip,
    /// Set when this frame is a piece of a long retrieval line that goes on.
    pub resume: Option<LongRetrieval>,
}

impl Parsed {
    pub(super) fn new(request: Request, consumed: usize) -> Self {
        Parsed {
            request,
            consumed,
            skip: Skip::None,
            resume: None,
        }
    }
    pub(super) fn invalid(error: ProtocolError, consumed: usize) -> Self {
        Parsed::new(Request::Invalid(error), consumed)
    }
    /// An error that also discards the rest of the current line.
    pub(super) fn invalid_line(error: ProtocolError, consumed: usize) -> Self {
        Parsed {
            skip: Skip::Line,
            ..Parsed::invalid(error, consumed)
        }
    }
}

/// Where the parser's `Bytes` come from.
#[derive(Clone, Copy)]
pub(super) enum Source<'a> {
    /// The frame, taken off the read buffer: keys and values are shared slices of it.
    Frame(&'a Bytes),
    /// A storage command read on the borrowed buffer before its frame is taken: the parts
    /// that are slices of the frame are left empty here and cut from it afterwards.
    Buffer,
}

impl Source<'_> {
    /// `slice` (a part of the frame) as `Bytes`, without a copy.
    pub(super) fn bytes(self, slice: &[u8]) -> Bytes {
        match self {
            Source::Frame(frame) => frame.slice_ref(slice),
            Source::Buffer => Bytes::new(),
        }
    }
}

/// A command line through its `\n` (streaming: incomplete until the `\n` arrives).
pub(super) fn line(input: &[u8]) -> IResult<&[u8], &[u8]> {
    terminated(take_until("\n"), tag("\n")).parse(input)
}

/// Length of the line at the start of `buf` through its `\n`, if the `\n` has arrived: the
/// crate's one newline finder (the connection skips refused lines with it).
pub fn line_end(buf: &[u8]) -> Option<usize> {
    line(buf).ok().map(|(_, raw)| raw.len() + 1)
}

/// One space-separated token, after any spaces; a NUL ends it (memcached reads a line only
/// up to a NUL byte).
pub(super) fn token(input: &[u8]) -> IResult<&[u8], &[u8]> {
    preceded(
        take_while(|b| b == b' '),
        take_till1(|b| b == b' ' || b == 0),
    )
    .parse(input)
}

/// Tokens a line holds without allocating (memcached's own `MAX_TOKENS`); a line with
/// more (a long multi-get) moves them to a `Vec`.
const INLINE_TOKENS: usize = 24;

/// The space-separated tokens of a line, read as memcached reads them: without its `\r`,
/// and only up to a NUL byte.
pub(super) struct Tokens<'a> {
    inline: [&'a [u8]; INLINE_TOKENS],
    len: usize,
    /// All the tokens, once there are more than `INLINE_TOKENS`.
    spilled: Vec<&'a [u8]>,
}

impl<'a> Tokens<'a> {
    fn push(&mut self, token: &'a [u8]) {
        if self.len < INLINE_TOKENS {
            self.inline[self.len] = token;
            self.len += 1;
            return;
        }
        if self.spilled.is_empty() {
            self.spilled.extend_from_slice(&self.inline);
        }
        self.spilled.push(token);
    }
}

impl<'a> Deref for Tokens<'a> {
    type Target = [&'a [u8]];
    fn deref(&self) -> &Self::Target {
        if self.spilled.is_empty() {
            &self.inline[..self.len]
        } else {
            &self.spilled
        }
    }
}

/// Splits a line (without its `\n`) into its tokens: [`token`] in a loop.
pub(super) fn tokenize(raw_line: &[u8]) -> Tokens<'_> {
    let mut tokens = Tokens {
        inline: [&[]; INLINE_TOKENS],
        len: 0,
        spilled: Vec::new(),
    };
    let mut rest = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
    while let Ok((after, found)) = token(rest) {
        tokens.push(found);
        if after.first() == Some(&0) {
            break;
        }
        rest = after;
    }
    tokens
}

/// The first token of a line (empty for a blank line).
pub(super) fn first_token(raw_line: &[u8]) -> &[u8] {
    let text = raw_line.strip_suffix(b"\r").unwrap_or(raw_line);
    token(text).map_or(&[][..], |(_, t)| t)
}

/// Where `part` (a slice of `whole`) lies in it: the frame taken later holds the same
/// bytes at the same offsets.
pub(super) fn offsets(whole: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - whole.as_ptr() as usize;
    start..start + part.len()
}

/// `frame` cut down to `at`: the frame itself becomes its last key or its value, which
/// saves counting one more reference to it up and down again.
pub(super) fn narrow(mut frame: Bytes, at: Range<usize>) -> Bytes {
    frame.truncate(at.end);
    frame.advance(at.start);
    frame
}

/// Takes `len` bytes off `buf` as a frozen frame.
pub(super) fn take_frame(buf: &mut BytesMut, len: usize) -> Bytes {
    buf.split_to(len).freeze()
}

/// The `len` data bytes and their `\r\n`: `None` = incomplete, `Some(None)` = bad terminator.
/// The whole block is awaited before its terminator is looked at, as memcached does.
pub(super) fn data_block(rest: &[u8], len: usize) -> Option<Option<&[u8]>> {
    let block: IResult<&[u8], &[u8]> = take(len + 2).parse(rest);
    let (_, block) = block.ok()?;
    let data: IResult<&[u8], &[u8]> = terminated(take(len), whole_tag("\r\n")).parse(block);
    Some(data.ok().map(|(_, data)| data))
}

/// C's `isspace`, which ends a number for memcached's `safe_strto*` helpers.
pub(super) fn c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// What C's `strtol` family reads from a token: leading blanks, an optional sign, decimal
/// digits, then nothing or a blank. Returns the sign and the magnitude (`None` = beyond
/// 2^64, C's ERANGE); `None` overall when there are no digits or junk follows them.
fn c_digits(token: &[u8]) -> Option<(bool, Option<u64>)> {
    let blanks = token.iter().take_while(|&&b| c_space(b)).count();
    let (negative, digits) = match &token[blanks..] {
        [b'-', digits @ ..] => (true, digits),
        [b'+', digits @ ..] => (false, digits),
        digits => (false, digits),
    };
    let mut magnitude = Some(0u64);
    let mut count = 0;
    for &b in digits {
        if !b.is_ascii_digit() {
            break;
        }
        let digit = u64::from(b - b'0');
        magnitude = magnitude.and_then(|v| v.checked_mul(10)?.checked_add(digit));
        count += 1;
    }
    if count == 0 || digits.get(count).is_some_and(|&b| !c_space(b)) {
        return None;
    }
    Some((negative, magnitude))
}

/// memcached's `safe_strtoul` for a 32-bit field; values above 2^32-1 are refused (a
/// documented difference: memcached truncates them).
pub(super) fn parse_u32(token: &[u8]) -> Option<u32> {
    u32::try_from(parse_u64(token)?).ok()
}

/// memcached's `safe_strtoull`: an unsigned 64-bit number; `-N` wraps as in C unless the
/// result looks negative, which is refused.
pub(super) fn parse_u64(token: &[u8]) -> Option<u64> {
    let (negative, magnitude) = c_digits(token)?;
    let magnitude = magnitude?;
    if !negative {
        return Some(magnitude);
    }
    let value = magnitude.wrapping_neg();
    (value as i64 >= 0).then_some(value)
}

/// memcached's `safe_strtol` into an `int32_t` (exptimes, data lengths, meta `T`/`N`/`R`):
/// read as a 64-bit C long (overflow refused), then truncated to 32 bits, so `4294967295`
/// reads as -1 and `4294967296` as 0, exactly as memcached 1.6 reads them.
pub(super) fn parse_i32(token: &[u8]) -> Option<i64> {
    let (negative, magnitude) = c_digits(token)?;
    let magnitude = magnitude?;
    let long = if negative {
        if magnitude > 1 << 63 {
            return None;
        }
        (magnitude as i64).wrapping_neg()
    } else {
        i64::try_from(magnitude).ok()?
    };
    Some(i64::from(long as i32))
}

/// A declared data length as memcached accepts it: `safe_strtol`, then 0..=INT_MAX-2.
pub(super) fn parse_length(token: &[u8]) -> Option<usize> {
    let len = parse_i32(token)?;
    if !(0..=i64::from(i32::MAX) - 2).contains(&len) {
        return None;
    }
    usize::try_from(len).ok()
}

/// An error whose reply `noreply` suppresses, as memcached does for a bad data chunk.
pub(super) fn quiet_error(error: ProtocolError, noreply: bool) -> Request {
    if noreply {
        Request::Silent
    } else {
        Request::Invalid(error)
    }
}
