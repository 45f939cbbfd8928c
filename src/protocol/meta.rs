//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`, `mn`): their typed form and their parser.

use base64::Engine;
use bytes::{Buf, Bytes, BytesMut};

use super::lex::{
    data_block, narrow, offsets, parse_i32, parse_length, parse_u32, parse_u64, take_frame,
    tokenize, Limits, Parsed, Skip, Source,
};
use super::{valid_key, ProtocolError, Request, MAX_KEY_BYTES};

/// memcached refuses a meta command of this many tokens or more (its MFLAG_MAX_OPT_LENGTH).
const MAX_META_TOKENS: usize = 20;

/// Longest opaque token memcached copies back.
const MAX_OPAQUE_BYTES: usize = 32;

/// A flag whose value the reply carries, in the order the client asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReturnFlag {
    /// `b`: the returned key is base64.
    Base64,
    /// `c`: cas unique.
    Cas,
    /// `f`: client flags.
    Flags,
    /// `h`: hit before.
    Hit,
    /// `k`: the key.
    Key,
    /// `l`: seconds since last access.
    LastAccess,
    /// `O`: the opaque token.
    Opaque,
    /// `s`: value size.
    Size,
    /// `t`: remaining TTL (-1 = none).
    Ttl,
    /// Where `T` stands: memcached applies it there, so a `t` before it shows the old TTL.
    AtNewTtl,
    /// Where `N` stands: an auto-created item gets its TTL there.
    AtVivify,
    /// Where `R` stands: the recache test sees the TTL as of there.
    AtRecache,
}

/// `M` of `ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetaSetMode {
    #[default]
    Set,
    Add,
    Replace,
    Append,
    Prepend,
}

/// `M` of `ma`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MetaArithMode {
    #[default]
    Incr,
    Decr,
}

/// The flags of one meta command, parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaFlags {
    /// `b`: the key is base64 (already decoded in the request's key).
    pub base64: bool,
    /// `q`: suppress the common-case reply.
    pub quiet: bool,
    /// `v`: return the value.
    pub value: bool,
    /// `u`: don't count as an access.
    pub no_bump: bool,
    /// `I`: invalidate (mark stale) instead of delete / accept older cas.
    pub invalidate: bool,
    /// `O`: opaque token copied back.
    pub opaque: Option<Bytes>,
    /// `T`: new TTL.
    pub ttl: Option<i64>,
    /// `N`: vivify (or auto-create) on miss with this TTL.
    pub vivify: Option<i64>,
    /// `R`: win a recache when the remaining TTL is below this.
    pub recache: Option<i64>,
    /// `C`: compare cas.
    pub compare_cas: Option<u64>,
    /// `E`: explicit new cas.
    pub explicit_cas: Option<u64>,
    /// `F`: client flags to store.
    pub client_flags: Option<u32>,
    /// `D`: arithmetic delta.
    pub delta: Option<u64>,
    /// `J`: arithmetic initial value.
    pub initial: Option<u64>,
    /// The raw `M` letter (0 = none).
    pub mode: u8,
    /// `M` of `ms`.
    pub set_mode: MetaSetMode,
    /// `M` of `ma`.
    pub arith_mode: MetaArithMode,
    /// Flags to return, in request order.
    pub ret: Vec<ReturnFlag>,
    /// Not a meta flag: set by the binary protocol for its GET/GETK, a classic get carried
    /// in meta form, so it is counted and labelled as the text `get` is (memcached counts a
    /// binary get in `stats detail`, a meta get not).
    pub classic: bool,
}

/// One meta command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaRequest {
    Get {
        key: Bytes,
        flags: MetaFlags,
    },
    Set {
        key: Bytes,
        data: Bytes,
        flags: MetaFlags,
    },
    Delete {
        key: Bytes,
        flags: MetaFlags,
    },
    Arith {
        key: Bytes,
        flags: MetaFlags,
    },
    Debug {
        key: Bytes,
        base64: bool,
    },
    Noop,
}

impl MetaRequest {
    pub fn key(&self) -> Option<&Bytes> {
        match self {
            MetaRequest::Get { key, .. }
            | MetaRequest::Set { key, .. }
            | MetaRequest::Delete { key, .. }
            | MetaRequest::Arith { key, .. }
            | MetaRequest::Debug { key, .. } => Some(key),
            MetaRequest::Noop => None,
        }
    }
}

const INVALID_FLAG: ProtocolError = ProtocolError::Client("invalid flag");
const BAD_TOKEN: ProtocolError = ProtocolError::Client("bad token in command line format");

/// Parses a meta command other than `ms` from the `tokens` of its line; keys and opaques
/// are taken from `src`.
pub(super) fn parse(src: Source, command: &[u8], tokens: &[&[u8]]) -> Request {
    let done = Request::Meta;
    let invalid = Request::Invalid;
    if command == b"mn" {
        return done(MetaRequest::Noop);
    }
    if let Err(e) = check_key(tokens) {
        return invalid(e);
    }
    let raw_key = tokens[1];
    if tokens.len() >= MAX_META_TOKENS {
        return invalid(ProtocolError::Client(if command == b"mg" {
            "options flags are too long"
        } else {
            "options flags too long"
        }));
    }
    let which = match command {
        b"mg" => Verb::Get,
        b"md" => Verb::Delete,
        b"ma" => Verb::Arith,
        _ => Verb::Debug,
    };
    let flags = match parse_flags(src, &tokens[2..], raw_key, which) {
        Ok(flags) => flags,
        Err(e) => return invalid(e),
    };
    let key = match decode_key(src, raw_key, flags.base64) {
        Ok(key) => key,
        Err(e) => return invalid(e),
    };
    let request = match command {
        b"mg" => MetaRequest::Get { key, flags },
        b"md" => MetaRequest::Delete { key, flags },
        b"ma" => MetaRequest::Arith { key, flags },
        _ => MetaRequest::Debug {
            key,
            base64: flags.base64,
        },
    };
    done(request)
}

/// What every meta command with a key checks first: that there is one, and its length.
fn check_key(tokens: &[&[u8]]) -> Result<(), ProtocolError> {
    match tokens.get(1) {
        None => Err(ProtocolError::UnknownCommand),
        Some(key) if key.len() > MAX_KEY_BYTES => Err(ProtocolError::BAD_FORMAT),
        Some(_) => Ok(()),
    }
}

/// `ms <key> <datalen> <flags>*` and its data block, read on the borrowed buffer (its
/// `line_len`-byte line is complete); errors after the length swallow the data. The frame
/// is taken once the outcome is known, and the key and opaque are cut from it.
pub(super) fn parse_set(buf: &mut BytesMut, line_len: usize, limits: &Limits) -> Option<Parsed> {
    let tokens = tokenize(&buf[..line_len - 1]);
    let read = read_set(&tokens);
    let key_at = tokens.get(1).map(|k| offsets(buf, k));
    let opaque_at = tokens.get(3..).and_then(|flags| {
        let opaque = flags.iter().find(|f| f[0] == b'O')?;
        Some(offsets(buf, &opaque[1..]))
    });
    drop(tokens);
    let (len, mut key, mut flags) = match read {
        Ok(header) => header,
        Err((error, skip)) => {
            buf.advance(line_len);
            let parsed = Parsed::new(Request::Invalid(error), line_len);
            return Some(Parsed { skip, ..parsed });
        }
    };
    let frame_len = if len > limits.whole_item_bytes() {
        line_len
    } else if data_block(&buf[line_len..], len)?.is_some() {
        line_len + len + 2
    } else {
        buf.advance(line_len + len + 2);
        let error = Request::Invalid(ProtocolError::BAD_DATA_CHUNK);
        return Some(Parsed::new(error, line_len + len + 2));
    };
    let frame = take_frame(buf, frame_len);
    if !flags.base64 {
        key = frame.slice(key_at.expect("a key was read"));
    }
    flags.opaque = opaque_at.map(|at| frame.slice(at));
    if frame_len == line_len {
        // memcached also drops the stored item, so no stale value outlives a failed set.
        let request = Request::TooLarge {
            key,
            remove_old: true,
            noreply: false,
        };
        let skip = Skip::Bytes(len + 2);
        return Some(Parsed {
            skip,
            ..Parsed::new(request, line_len)
        });
    }
    let data = narrow(frame, line_len..line_len + len);
    let request = Request::Meta(MetaRequest::Set { key, data, flags });
    Some(Parsed::new(request, frame_len))
}

/// The line of an `ms`: its data length, key (empty unless decoded from base64) and flags
/// (without the opaque); or the error and what it discards.
pub(super) fn read_set(
    tokens: &[&[u8]],
) -> Result<(usize, Bytes, MetaFlags), (ProtocolError, Skip)> {
    let keep = |e| (e, Skip::None);
    check_key(tokens).map_err(keep)?;
    if tokens.len() < 3 {
        return Err(keep(ProtocolError::BAD_FORMAT));
    }
    if tokens.len() >= MAX_META_TOKENS {
        return Err(keep(ProtocolError::Client("options flags too long")));
    }
    // As memcached: a length it cannot read (or out of 0..=INT_MAX-2) swallows nothing.
    let len = parse_length(tokens[2]).ok_or(keep(ProtocolError::BAD_FORMAT))?;
    let src = Source::Buffer;
    let flags = parse_flags(src, &tokens[3..], tokens[1], Verb::Set);
    let key = flags.and_then(|flags| Ok((decode_key(src, tokens[1], flags.base64)?, flags)));
    let (key, flags) = key.map_err(|e| (e, Skip::Bytes(len + 2)))?;
    Ok((len, key, flags))
}

/// The key as given, or decoded from base64 (the one copy the parser makes: a new key).
fn decode_key(src: Source, raw: &[u8], base64: bool) -> Result<Bytes, ProtocolError> {
    if !base64 {
        return if valid_key(raw) {
            Ok(src.bytes(raw))
        } else {
            Err(ProtocolError::BAD_FORMAT)
        };
    }
    decode_base64(raw)
}

fn decode_base64(raw: &[u8]) -> Result<Bytes, ProtocolError> {
    match base64::engine::general_purpose::STANDARD.decode(raw) {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_BYTES => Ok(Bytes::from(key)),
        _ => Err(ProtocolError::Client("error decoding key")),
    }
}

/// Which meta command a flag list belongs to: its mode letters and its error wording.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Verb {
    Get,
    Set,
    Delete,
    Arith,
    Debug,
}

/// Parses flag tokens as memcached's `_meta_flag_preparse` does: every command knows every
/// flag (unused ones are ignored), an unknown or repeated letter stops at once, and other
/// errors are collected, the last wording winning. `md` and `ma` word them all alike.
/// `raw_key` is decoded where `b` stands, so its error takes its place among the others.
fn parse_flags(
    src: Source,
    tokens: &[&[u8]],
    raw_key: &[u8],
    command: Verb,
) -> Result<MetaFlags, ProtocolError> {
    let result = preparse(src, tokens, raw_key).and_then(|mut f| {
        let mode = f.mode;
        match command {
            Verb::Set => set_mode(&mut f, mode, false)?,
            Verb::Arith => set_mode(&mut f, mode, true)?,
            _ => {}
        }
        let opaque = tokens.iter().find(|t| t[0] == b'O');
        if opaque.is_some_and(|o| o.len() > MAX_OPAQUE_BYTES) {
            return Err(ProtocolError::Client("opaque token too long"));
        }
        Ok(f)
    });
    match (result, command) {
        (Err(ProtocolError::Client(why)), Verb::Delete | Verb::Arith)
            if !why.starts_with("invalid mode") && !why.starts_with("opaque") =>
        {
            Err(ProtocolError::Client("invalid or duplicate flag"))
        }
        (result, _) => result,
    }
}

fn preparse(src: Source, tokens: &[&[u8]], raw_key: &[u8]) -> Result<MetaFlags, ProtocolError> {
    let mut f = MetaFlags::default();
    let mut seen = [false; 128];
    let mut error: Option<ProtocolError> = None;
    for token in tokens {
        let (&flag, arg) = token.split_first().expect("tokens are non-empty");
        if flag >= 127 || std::mem::replace(&mut seen[usize::from(flag)], true) {
            return Err(ProtocolError::Client("duplicate flag"));
        }
        let earlier = error.clone();
        let mut fail = |e: ProtocolError| error = Some(e);
        match flag {
            b'b' => {
                f.base64 = true;
                f.ret.push(ReturnFlag::Base64);
                if let Err(e) = decode_base64(raw_key) {
                    fail(e);
                }
            }
            b'N' | b'T' | b'R' => match parse_i32(arg) {
                Some(v) if flag == b'N' => {
                    f.vivify = Some(v);
                    f.ret.push(ReturnFlag::AtVivify);
                }
                Some(v) if flag == b'T' => {
                    f.ttl = Some(v);
                    f.ret.push(ReturnFlag::AtNewTtl);
                }
                Some(v) => {
                    f.recache = Some(v);
                    f.ret.push(ReturnFlag::AtRecache);
                }
                None => fail(BAD_TOKEN),
            },
            b'c' => f.ret.push(ReturnFlag::Cas),
            b'f' => f.ret.push(ReturnFlag::Flags),
            b'h' => f.ret.push(ReturnFlag::Hit),
            b'k' => f.ret.push(ReturnFlag::Key),
            b'l' => f.ret.push(ReturnFlag::LastAccess),
            b's' => f.ret.push(ReturnFlag::Size),
            b't' => f.ret.push(ReturnFlag::Ttl),
            b'O' => {
                f.opaque = Some(src.bytes(arg));
                f.ret.push(ReturnFlag::Opaque);
            }
            b'q' => f.quiet = true,
            b'u' => f.no_bump = true,
            b'v' => f.value = true,
            b'I' => f.invalidate = true,
            // F leaves the error's wording as it was (memcached sets no text for it).
            b'F' => match parse_u32(arg) {
                Some(v) => f.client_flags = Some(v),
                None => fail(earlier.unwrap_or(ProtocolError::BAD_FORMAT)),
            },
            b'C' | b'E' => match parse_u64(arg) {
                Some(v) if flag == b'C' => f.compare_cas = Some(v),
                Some(v) => f.explicit_cas = Some(v),
                None => fail(BAD_TOKEN),
            },
            b'D' | b'J' => match parse_u64(arg) {
                Some(v) if flag == b'D' => f.delta = Some(v),
                Some(v) => f.initial = Some(v),
                None if flag == b'D' => fail(ProtocolError::Client("invalid numeric delta value")),
                None => fail(ProtocolError::Client("invalid numeric initial value")),
            },
            b'M' if arg.len() == 1 => f.mode = arg[0],
            b'M' => fail(ProtocolError::Client("incorrect length for M token")),
            // `P`/`L` are proxy hints; `S` and `x` (newer memcached) are accepted and ignored.
            b'P' | b'L' | b'S' | b'x' => {}
            _ => return Err(INVALID_FLAG),
        }
    }
    match error {
        Some(e) => Err(e),
        None => Ok(f),
    }
}

/// The `M` letter of `ms` or `ma` (uppercase or a sign, as memcached 1.6.18 takes them).
fn set_mode(f: &mut MetaFlags, mode: u8, arith: bool) -> Result<(), ProtocolError> {
    if arith {
        f.arith_mode = match mode {
            0 | b'I' | b'+' => MetaArithMode::Incr,
            b'D' | b'-' => MetaArithMode::Decr,
            _ => return Err(ProtocolError::Client("invalid mode for ma M token")),
        };
    } else {
        f.set_mode = match mode {
            0 | b'S' => MetaSetMode::Set,
            b'E' => MetaSetMode::Add,
            b'R' => MetaSetMode::Replace,
            b'A' => MetaSetMode::Append,
            b'P' => MetaSetMode::Prepend,
            _ => return Err(ProtocolError::Client("invalid mode for ms M token")),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::parse as parse_request;
    use super::*;

    fn req(input: &[u8]) -> Request {
        parse_request(input, &Limits::default()).unwrap().request
    }

    #[test]
    fn mg_flags_in_order() {
        let Request::Meta(MetaRequest::Get { key, flags }) = req(b"mg foo v f t c O123 q k\r\n")
        else {
            panic!()
        };
        assert_eq!(key, Bytes::from("foo"));
        assert!(flags.value && flags.quiet);
        assert_eq!(flags.opaque, Some(Bytes::from("123")));
        use ReturnFlag::*;
        assert_eq!(flags.ret, vec![Flags, Ttl, Cas, Opaque, Key]);
    }

    #[test]
    fn ms_with_data_and_mode() {
        let parsed = parse_request(b"ms k 2 T10 F5 ME\r\nhi\r\n", &Limits::default()).unwrap();
        assert_eq!(parsed.consumed, 22);
        let Request::Meta(MetaRequest::Set { data, flags, .. }) = parsed.request else {
            panic!()
        };
        assert_eq!(data, Bytes::from("hi"));
        assert_eq!(flags.ttl, Some(10));
        assert_eq!(flags.client_flags, Some(5));
        assert_eq!(flags.set_mode, MetaSetMode::Add);
    }

    #[test]
    fn ms_flag_errors_swallow_the_data() {
        let parsed = parse_request(b"ms k 2 MZ\r\n", &Limits::default()).unwrap();
        assert_eq!(parsed.skip, Skip::Bytes(4));
        assert_eq!(
            parsed.request,
            Request::Invalid(ProtocolError::Client("invalid mode for ms M token"))
        );
    }

    #[test]
    fn ms_opaque_and_base64_key_are_read_before_the_frame_is_taken() {
        let long = format!("ms k 2 O{}\r\nhi\r\n", "x".repeat(MAX_OPAQUE_BYTES));
        let parsed = parse_request(long.as_bytes(), &Limits::default()).unwrap();
        let too_long = ProtocolError::Client("opaque token too long");
        assert_eq!(parsed.request, Request::Invalid(too_long));
        assert_eq!(
            (parsed.consumed, parsed.skip),
            (long.len() - 4, Skip::Bytes(4))
        );
        let parsed = parse_request(b"ms AAEC 2 b O77\r\nhi\r\n", &Limits::default()).unwrap();
        let Request::Meta(MetaRequest::Set { key, data, flags }) = parsed.request else {
            panic!("{:?}", parsed.request)
        };
        assert_eq!((&key[..], &data[..]), (&[0u8, 1, 2][..], &b"hi"[..]));
        assert_eq!(flags.opaque, Some(Bytes::from("77")));
    }

    #[test]
    fn errors() {
        assert_eq!(
            req(b"mg\r\n"),
            Request::Invalid(ProtocolError::UnknownCommand)
        );
        assert_eq!(req(b"mg k zz\r\n"), Request::Invalid(INVALID_FLAG));
        assert_eq!(req(b"mg k Tabc\r\n"), Request::Invalid(BAD_TOKEN));
        assert_eq!(
            req(b"ms k abc\r\n"),
            Request::Invalid(ProtocolError::BAD_FORMAT)
        );
        assert_eq!(
            req(b"mg !!! b\r\n"),
            Request::Invalid(ProtocolError::Client("error decoding key"))
        );
    }

    #[test]
    fn base64_key_is_decoded() {
        let Request::Meta(MetaRequest::Get { key, .. }) = req(b"mg AAEC b v\r\n") else {
            panic!()
        };
        assert_eq!(&key[..], &[0u8, 1, 2]);
    }
}
