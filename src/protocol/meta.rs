//! Meta commands (`mg`, `ms`, `md`, `ma`, `me`, `mn`): their typed form and their parser.

use base64::Engine;
use bytes::Bytes;

use super::parse::{data_block, parse_i64, parse_u32, parse_u64, Limits, Parsed, Skip};
use super::{valid_key, ProtocolError, Request, MAX_KEY_BYTES};

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
    /// `M` of `ms`.
    pub set_mode: MetaSetMode,
    /// `M` of `ma`.
    pub arith_mode: MetaArithMode,
    /// Flags to return, in request order.
    pub ret: Vec<ReturnFlag>,
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

/// Parses a meta command whose line (`line_len` bytes, split into `tokens`) is complete.
pub(super) fn parse(
    command: &[u8],
    tokens: &[&[u8]],
    line_len: usize,
    rest: &[u8],
    limits: &Limits,
) -> Option<Parsed> {
    let done = |request| {
        Some(Parsed {
            request,
            consumed: line_len,
            skip: Skip::None,
        })
    };
    let invalid = |e| done(Request::Invalid(e));
    if command == b"mn" {
        return done(Request::Meta(MetaRequest::Noop));
    }
    if tokens.len() < 2 {
        return invalid(ProtocolError::UnknownCommand);
    }
    let raw_key = tokens[1];
    if raw_key.len() > MAX_KEY_BYTES * 2 {
        return invalid(ProtocolError::BAD_FORMAT);
    }
    if command == b"ms" {
        return parse_set(tokens, line_len, rest, limits);
    }
    let allowed: &[u8] = match command {
        b"mg" => b"bcfhklOqstuvNRTEPL",
        b"md" => b"bCEIkOqTxPL",
        b"ma" => b"bCENJDTMqtcvkOPL",
        _ => b"b",
    };
    let flags = match parse_flags(&tokens[2..], allowed, command == b"ma") {
        Ok(flags) => flags,
        Err(e) => return invalid(e),
    };
    let key = match decode_key(raw_key, flags.base64) {
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
    done(Request::Meta(request))
}

/// `ms <key> <datalen> <flags>*` and its data block; errors after the length swallow the data.
fn parse_set(tokens: &[&[u8]], line_len: usize, rest: &[u8], limits: &Limits) -> Option<Parsed> {
    let invalid = |e, skip| {
        Some(Parsed {
            request: Request::Invalid(e),
            consumed: line_len,
            skip,
        })
    };
    if tokens.len() < 3 || (!tokens[1].contains(&b'=') && tokens[1].len() > MAX_KEY_BYTES * 2) {
        return invalid(ProtocolError::BAD_FORMAT, Skip::None);
    }
    let Some(len) = parse_i64(tokens[2]).and_then(|l| usize::try_from(l).ok()) else {
        return invalid(ProtocolError::BAD_FORMAT, Skip::None);
    };
    if len > limits.max_item_bytes {
        return invalid(ProtocolError::TOO_LARGE, Skip::Bytes(len + 2));
    }
    let parsed = parse_flags(&tokens[3..], b"bcCEFIkOqTMPLS", false)
        .and_then(|flags| Ok((decode_key(tokens[1], flags.base64)?, flags)));
    let (key, flags) = match parsed {
        Ok(ok) => ok,
        Err(e) => return invalid(e, Skip::Bytes(len + 2)),
    };
    let block = data_block(rest, len)?;
    let consumed = line_len + len + 2;
    let request = match block {
        Some(data) => Request::Meta(MetaRequest::Set {
            key,
            data: Bytes::copy_from_slice(data),
            flags,
        }),
        None => Request::Invalid(ProtocolError::BAD_DATA_CHUNK),
    };
    Some(Parsed {
        request,
        consumed,
        skip: Skip::None,
    })
}

fn decode_key(raw: &[u8], base64: bool) -> Result<Bytes, ProtocolError> {
    if !base64 {
        return if valid_key(raw) {
            Ok(Bytes::copy_from_slice(raw))
        } else {
            Err(ProtocolError::BAD_FORMAT)
        };
    }
    match base64::engine::general_purpose::STANDARD.decode(raw) {
        Ok(key) if !key.is_empty() && key.len() <= MAX_KEY_BYTES => Ok(Bytes::from(key)),
        _ => Err(ProtocolError::Client("error decoding key")),
    }
}

/// Parses flag tokens, each a letter and an optional argument.
fn parse_flags(tokens: &[&[u8]], allowed: &[u8], arith: bool) -> Result<MetaFlags, ProtocolError> {
    let mut f = MetaFlags::default();
    let mut seen = [false; 128];
    // memcached words numeric-token errors of `ma` differently.
    let bad_token = if arith {
        ProtocolError::Client("invalid or duplicate flag")
    } else {
        BAD_TOKEN
    };
    for token in tokens {
        let (&flag, arg) = token.split_first().expect("tokens are non-empty");
        if !allowed.contains(&flag) {
            return Err(INVALID_FLAG);
        }
        if std::mem::replace(&mut seen[usize::from(flag & 0x7f)], true) {
            return Err(ProtocolError::Client("duplicate flag"));
        }
        let num_i64 = || parse_i64(arg).ok_or(bad_token.clone());
        let num_u64 = || parse_u64(arg).ok_or(bad_token.clone());
        match flag {
            b'b' => {
                f.base64 = true;
                f.ret.push(ReturnFlag::Base64);
            }
            b'c' => f.ret.push(ReturnFlag::Cas),
            b'f' => f.ret.push(ReturnFlag::Flags),
            b'h' => f.ret.push(ReturnFlag::Hit),
            b'k' => f.ret.push(ReturnFlag::Key),
            b'l' => f.ret.push(ReturnFlag::LastAccess),
            b's' => f.ret.push(ReturnFlag::Size),
            b't' => f.ret.push(ReturnFlag::Ttl),
            b'O' => {
                if arg.len() > MAX_OPAQUE_BYTES {
                    return Err(ProtocolError::Client("opaque token too long"));
                }
                f.opaque = Some(Bytes::copy_from_slice(arg));
                f.ret.push(ReturnFlag::Opaque);
            }
            b'q' => f.quiet = true,
            b'u' => f.no_bump = true,
            b'v' => f.value = true,
            b'I' => f.invalidate = true,
            b'T' => f.ttl = Some(num_i64()?),
            b'N' => f.vivify = Some(num_i64()?),
            b'R' => f.recache = Some(num_i64()?),
            b'C' => f.compare_cas = Some(num_u64()?),
            b'E' => f.explicit_cas = Some(num_u64()?),
            b'D' => f.delta = Some(num_u64()?),
            b'J' => f.initial = Some(num_u64()?),
            b'F' => f.client_flags = Some(parse_u32(arg).ok_or(ProtocolError::BAD_FORMAT)?),
            b'M' => set_mode(&mut f, arg, arith)?,
            // `P`/`L` are proxy hints; `S` and `x` are accepted and ignored.
            _ => {}
        }
    }
    Ok(f)
}

fn set_mode(f: &mut MetaFlags, arg: &[u8], arith: bool) -> Result<(), ProtocolError> {
    let mode = arg.first().copied().unwrap_or(0);
    if arith {
        f.arith_mode = match mode {
            b'I' | b'i' | b'+' => MetaArithMode::Incr,
            b'D' | b'd' | b'-' => MetaArithMode::Decr,
            _ => return Err(ProtocolError::Client("invalid mode for ma M token")),
        };
    } else {
        f.set_mode = match mode {
            b'S' | b's' => MetaSetMode::Set,
            b'E' | b'e' => MetaSetMode::Add,
            b'R' | b'r' => MetaSetMode::Replace,
            b'A' | b'a' => MetaSetMode::Append,
            b'P' | b'p' => MetaSetMode::Prepend,
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
