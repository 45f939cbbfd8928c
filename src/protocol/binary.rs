//! memcached's binary protocol: a pure codec from frames to requests and from replies to frames.
//!
//! Frames decode into the same [`Request`] values the text parser yields (keyed commands as
//! meta requests, which carry what the binary protocol asks for: cas checks, initial values,
//! returned cas), so both protocols share one command layer. Checks follow memcached 1.6's
//! `proto_bin.c` in its order; a malformed frame gets memcached's status, never a panic.

use bytes::{BufMut, Bytes, BytesMut};

use super::{
    Limits, MetaArithMode, MetaFlags, MetaRequest, MetaSetMode, MetaStatus, ProtocolError, Request,
    Response, ReturnFlag, MAX_KEY_BYTES,
};

/// First byte of every request frame.
pub const REQUEST_MAGIC: u8 = 0x80;
/// First byte of every response frame.
pub const RESPONSE_MAGIC: u8 = 0x81;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 24;
/// memcached closes a connection announcing a larger body (its ITEM_SIZE_MAX_UPPER_LIMIT).
pub const MAX_BODY_BYTES: u32 = 1024 * 1024 * 1024;
/// Longest SASL mechanism name memcached accepts.
pub const MAX_SASL_MECH_BYTES: usize = 32;
/// An incr/decr expiry that means "fail on a miss" rather than "create".
const NO_CREATE_EXPIRY: u32 = 0xffff_ffff;

/// Opcodes memcached 1.6 serves.
pub mod opcode {
    pub const GET: u8 = 0x00;
    pub const SET: u8 = 0x01;
    pub const ADD: u8 = 0x02;
    pub const REPLACE: u8 = 0x03;
    pub const DELETE: u8 = 0x04;
    pub const INCREMENT: u8 = 0x05;
    pub const DECREMENT: u8 = 0x06;
    pub const QUIT: u8 = 0x07;
    pub const FLUSH: u8 = 0x08;
    pub const GETQ: u8 = 0x09;
    pub const NOOP: u8 = 0x0a;
    pub const VERSION: u8 = 0x0b;
    pub const GETK: u8 = 0x0c;
    pub const GETKQ: u8 = 0x0d;
    pub const APPEND: u8 = 0x0e;
    pub const PREPEND: u8 = 0x0f;
    pub const STAT: u8 = 0x10;
    pub const SETQ: u8 = 0x11;
    pub const ADDQ: u8 = 0x12;
    pub const REPLACEQ: u8 = 0x13;
    pub const DELETEQ: u8 = 0x14;
    pub const INCREMENTQ: u8 = 0x15;
    pub const DECREMENTQ: u8 = 0x16;
    pub const QUITQ: u8 = 0x17;
    pub const FLUSHQ: u8 = 0x18;
    pub const APPENDQ: u8 = 0x19;
    pub const PREPENDQ: u8 = 0x1a;
    pub const TOUCH: u8 = 0x1c;
    pub const GAT: u8 = 0x1d;
    pub const GATQ: u8 = 0x1e;
    pub const SASL_LIST_MECHS: u8 = 0x20;
    pub const SASL_AUTH: u8 = 0x21;
    pub const SASL_STEP: u8 = 0x22;
    pub const GATK: u8 = 0x23;
    pub const GATKQ: u8 = 0x24;
}

/// Response status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum Status {
    Success = 0x00,
    KeyNotFound = 0x01,
    KeyExists = 0x02,
    TooLarge = 0x03,
    Invalid = 0x04,
    NotStored = 0x05,
    DeltaBadValue = 0x06,
    AuthError = 0x20,
    AuthContinue = 0x21,
    UnknownCommand = 0x81,
    OutOfMemory = 0x82,
    /// A backend failure (the binary form of `SERVER_ERROR`): libmemcached's ETMPFAIL.
    TemporaryFailure = 0x86,
}

impl Status {
    /// memcached's text for an error status.
    pub fn text(self) -> &'static str {
        match self {
            Status::Success | Status::AuthContinue => "",
            Status::KeyNotFound => "Not found",
            Status::KeyExists => "Data exists for key.",
            Status::TooLarge => "Too large.",
            Status::Invalid => "Invalid arguments",
            Status::NotStored => "Not stored.",
            Status::DeltaBadValue => "Non-numeric server-side value for incr or decr",
            Status::AuthError => "Auth failure.",
            Status::UnknownCommand => "Unknown command",
            Status::OutOfMemory => "Out of memory",
            Status::TemporaryFailure => "Temporary failure",
        }
    }
}

/// The fixed 24-byte header of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub magic: u8,
    pub opcode: u8,
    pub key_len: u16,
    pub extras_len: u8,
    pub body_len: u32,
    pub opaque: u32,
    pub cas: u64,
}

impl Header {
    /// Reads a header from the first 24 bytes of `buf`, if there are that many.
    pub fn read(buf: &[u8]) -> Option<Header> {
        let h: &[u8; HEADER_BYTES] = buf.get(..HEADER_BYTES)?.try_into().ok()?;
        Some(Header {
            magic: h[0],
            opcode: h[1],
            key_len: u16::from_be_bytes([h[2], h[3]]),
            extras_len: h[4],
            body_len: u32::from_be_bytes([h[8], h[9], h[10], h[11]]),
            opaque: u32::from_be_bytes([h[12], h[13], h[14], h[15]]),
            cas: u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
        })
    }

    /// Bytes of value after the extras and the key.
    fn value_len(&self) -> usize {
        self.body_len as usize - self.key_len as usize - self.extras_len as usize
    }
}

/// What a frame asks of the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run a request through the command layer and encode its reply with [`encode`].
    Run(Request),
    /// Answer at once with this reply (noop, quit, version, errors found in the frame).
    Reply(Reply),
    /// List the SASL mechanisms.
    SaslListMechs,
    /// `SASL_AUTH` (`step` = false) or `SASL_STEP`: a mechanism and its data.
    SaslAuth {
        mech: Bytes,
        data: Bytes,
        step: bool,
    },
}

/// A reply the codec decides alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: Status,
    /// The body: an error's text, the version, ...
    pub body: Bytes,
    /// Close the connection after this reply.
    pub close: bool,
}

impl Reply {
    fn error(status: Status, close: bool) -> Command {
        Command::Reply(Reply {
            status,
            body: Bytes::from_static(status.text().as_bytes()),
            close,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The opcode as sent (a quiet one stays quiet): the reply carries it back.
    pub opcode: u8,
    pub opaque: u32,
    /// The key, echoed by getk/gatk.
    pub key: Bytes,
    pub command: Command,
}

impl Frame {
    /// Whether success (or, for gets, a miss) is answered with nothing.
    pub fn quiet(&self) -> bool {
        quiet(self.opcode)
    }
}

/// A decoded frame, the bytes it used, and the bytes after them still to discard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoded {
    pub frame: Frame,
    pub consumed: usize,
    /// Bytes of an oversized or refused body not yet received, to be discarded.
    pub skip: usize,
}

/// Whether an opcode is a quiet variant.
pub fn quiet(op: u8) -> bool {
    use opcode::*;
    matches!(
        op,
        GETQ | GETKQ
            | SETQ
            | ADDQ
            | REPLACEQ
            | DELETEQ
            | INCREMENTQ
            | DECREMENTQ
            | QUITQ
            | FLUSHQ
            | APPENDQ
            | PREPENDQ
            | GATQ
            | GATKQ
    )
}

/// The loud form of an opcode (quiet ones map to their plain twin).
fn loud(op: u8) -> u8 {
    use opcode::*;
    match op {
        GETQ => GET,
        GETKQ => GETK,
        SETQ => SET,
        ADDQ => ADD,
        REPLACEQ => REPLACE,
        DELETEQ => DELETE,
        INCREMENTQ => INCREMENT,
        DECREMENTQ => DECREMENT,
        QUITQ => QUIT,
        FLUSHQ => FLUSH,
        APPENDQ => APPEND,
        PREPENDQ => PREPEND,
        GATQ => GAT,
        GATKQ => GATK,
        other => other,
    }
}

/// Whether an opcode may be run before SASL authentication.
fn allowed_unauthenticated(op: u8) -> bool {
    use opcode::*;
    matches!(op, SASL_LIST_MECHS | SASL_AUTH | SASL_STEP | VERSION)
}

/// Whether an opcode carries a value that may be large (its body is bounded by the item limit).
fn carries_value(op: u8) -> bool {
    use opcode::*;
    matches!(loud(op), SET | ADD | REPLACE | APPEND | PREPEND)
}

/// Decodes one frame from the front of `buf`; `None` means more bytes are needed.
/// `auth_required`: SASL is on and this connection has not authenticated yet.
pub fn decode(buf: &[u8], limits: &Limits, auth_required: bool) -> Option<Decoded> {
    let h = Header::read(buf)?;
    let answer = |command: Command, consumed: usize, skip: usize| {
        Some(Decoded {
            frame: Frame {
                opcode: h.opcode,
                opaque: h.opaque,
                key: Bytes::new(),
                command,
            },
            consumed,
            skip,
        })
    };
    if h.magic != REQUEST_MAGIC {
        // memcached closes without a word.
        return answer(
            Command::Run(Request::Hangup("bad binary magic")),
            buf.len(),
            0,
        );
    }
    let head = HEADER_BYTES + h.extras_len as usize + h.key_len as usize;
    if buf.len() < head {
        return None;
    }
    if h.key_len as u32 > h.body_len || h.key_len as u32 + h.extras_len as u32 > h.body_len {
        return answer(Reply::error(Status::UnknownCommand, true), buf.len(), 0);
    }
    if h.body_len > MAX_BODY_BYTES {
        return answer(Reply::error(Status::Invalid, true), buf.len(), 0);
    }
    if auth_required && !allowed_unauthenticated(h.opcode) {
        return answer(Reply::error(Status::AuthError, true), buf.len(), 0);
    }
    if h.key_len as usize > MAX_KEY_BYTES {
        return answer(Reply::error(Status::Invalid, true), buf.len(), 0);
    }
    let frame_len = HEADER_BYTES + h.body_len as usize;
    let value_len = h.value_len();
    if value_len > limits.max_item_bytes {
        // Too large to buffer: answer from the head alone and discard the value as it comes.
        let mut d = decode_head(buf, &h, limits)?;
        d.consumed = buf.len().min(frame_len);
        d.skip = frame_len - d.consumed;
        return Some(d);
    }
    if buf.len() < frame_len {
        return None;
    }
    let mut d = decode_head(&buf[..frame_len], &h, limits)?;
    d.consumed = frame_len;
    Some(d)
}

/// Decodes a frame whose head (and, unless its value is too large, body) is in `frame`.
fn decode_head(frame: &[u8], h: &Header, limits: &Limits) -> Option<Decoded> {
    let extras_end = HEADER_BYTES + h.extras_len as usize;
    let key_end = extras_end + h.key_len as usize;
    let extras = &frame[HEADER_BYTES..extras_end];
    let key = Bytes::copy_from_slice(&frame[extras_end..key_end]);
    let value_len = h.value_len();
    let value = || Bytes::copy_from_slice(&frame[key_end..key_end + value_len]);
    let too_large = value_len > limits.max_item_bytes;
    let command = match checked(h) {
        Err(status) => Reply::error(status, status == Status::Invalid),
        Ok(()) if too_large && carries_value(h.opcode) => Command::Run(Request::TooLarge {
            key: key.clone(),
            remove_old: loud(h.opcode) == opcode::SET,
            noreply: false,
        }),
        Ok(()) if too_large => Reply::error(Status::TooLarge, false),
        Ok(()) => command(h, extras, key.clone(), value),
    };
    Some(Decoded {
        frame: Frame {
            opcode: h.opcode,
            opaque: h.opaque,
            key,
            command,
        },
        consumed: 0,
        skip: 0,
    })
}

/// The per-opcode shape checks of memcached's `dispatch_bin_command`.
fn checked(h: &Header) -> Result<(), Status> {
    use opcode::*;
    let (e, k, b) = (h.extras_len as u32, h.key_len as u32, h.body_len);
    let ok = match loud(h.opcode) {
        VERSION | NOOP | QUIT | SASL_LIST_MECHS => e == 0 && k == 0 && b == 0,
        FLUSH => k == 0 && b == e && (e == 0 || e == 4),
        SET | ADD | REPLACE => e == 8 && k != 0 && b >= k + 8,
        GET | GETK => e == 0 && b == k && k > 0,
        DELETE => k > 0 && e == 0 && b == k,
        INCREMENT | DECREMENT => k > 0 && e == 20 && b == k + e,
        APPEND | PREPEND => k > 0 && e == 0,
        STAT => e == 0,
        SASL_AUTH | SASL_STEP => e == 0 && k != 0,
        TOUCH | GAT | GATK => e == 4 && k != 0,
        _ => return Err(Status::UnknownCommand),
    };
    if ok {
        Ok(())
    } else {
        Err(Status::Invalid)
    }
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be_u64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// The command of a well-formed frame.
fn command(h: &Header, extras: &[u8], key: Bytes, value: impl Fn() -> Bytes) -> Command {
    use opcode::*;
    let cas = (h.cas != 0).then_some(h.cas);
    let meta = |m: MetaRequest| Command::Run(Request::Meta(m));
    match loud(h.opcode) {
        GET | GETK => meta(MetaRequest::Get {
            key,
            flags: get_flags(None, true),
        }),
        TOUCH => meta(MetaRequest::Get {
            key,
            flags: get_flags(Some(be_u32(extras)), false),
        }),
        GAT | GATK => meta(MetaRequest::Get {
            key,
            flags: get_flags(Some(be_u32(extras)), true),
        }),
        SET | ADD | REPLACE | APPEND | PREPEND => meta(MetaRequest::Set {
            key,
            data: value(),
            flags: set_flags(h.opcode, extras, cas),
        }),
        DELETE => meta(MetaRequest::Delete {
            key,
            flags: MetaFlags {
                compare_cas: cas,
                ..MetaFlags::default()
            },
        }),
        INCREMENT | DECREMENT => meta(MetaRequest::Arith {
            key,
            flags: arith_flags(h.opcode, extras, cas),
        }),
        FLUSH => Command::Run(Request::FlushAll {
            delay: if extras.len() == 4 {
                be_u32(extras) as i64
            } else {
                0
            },
            noreply: false,
        }),
        STAT => Command::Run(Request::Stats {
            arg: (!key.is_empty()).then(|| String::from_utf8_lossy(&key).into_owned()),
        }),
        VERSION => Command::Run(Request::Version),
        NOOP => Command::Reply(Reply {
            status: Status::Success,
            body: Bytes::new(),
            close: false,
        }),
        QUIT => Command::Reply(Reply {
            status: Status::Success,
            body: Bytes::new(),
            close: true,
        }),
        SASL_LIST_MECHS => Command::SaslListMechs,
        SASL_AUTH | SASL_STEP if key.len() > MAX_SASL_MECH_BYTES => {
            Reply::error(Status::Invalid, false)
        }
        SASL_AUTH | SASL_STEP => Command::SaslAuth {
            mech: key,
            data: value(),
            step: h.opcode == SASL_STEP,
        },
        _ => Reply::error(Status::UnknownCommand, false),
    }
}

/// `mg` flags for a get (`value`), a touch (`ttl`, no value) or a gat (both).
fn get_flags(ttl: Option<u32>, value: bool) -> MetaFlags {
    let mut ret = vec![ReturnFlag::Flags, ReturnFlag::Cas];
    if ttl.is_some() {
        ret.insert(0, ReturnFlag::AtNewTtl);
    }
    MetaFlags {
        value,
        ttl: ttl.map(i64::from),
        ret,
        classic: ttl.is_none(),
        ..MetaFlags::default()
    }
}

/// `ms` flags: as memcached, a cas on set/add/replace makes it a cas command.
fn set_flags(op: u8, extras: &[u8], cas: Option<u64>) -> MetaFlags {
    use opcode::*;
    let (client_flags, ttl) = if extras.len() == 8 {
        (
            Some(be_u32(&extras[..4])),
            Some(be_u32(&extras[4..]) as i64),
        )
    } else {
        (None, None)
    };
    let set_mode = match (loud(op), cas) {
        (SET | ADD | REPLACE, Some(_)) => MetaSetMode::Set,
        (ADD, None) => MetaSetMode::Add,
        (REPLACE, None) => MetaSetMode::Replace,
        (APPEND, _) => MetaSetMode::Append,
        (PREPEND, _) => MetaSetMode::Prepend,
        _ => MetaSetMode::Set,
    };
    MetaFlags {
        client_flags,
        ttl,
        compare_cas: cas,
        set_mode,
        ret: vec![ReturnFlag::Cas],
        ..MetaFlags::default()
    }
}

/// `ma` flags: delta, initial value, and an expiry that says whether to create on a miss.
fn arith_flags(op: u8, extras: &[u8], cas: Option<u64>) -> MetaFlags {
    let expiry = be_u32(&extras[16..20]);
    MetaFlags {
        delta: Some(be_u64(&extras[..8])),
        initial: Some(be_u64(&extras[8..16])),
        vivify: (expiry != NO_CREATE_EXPIRY).then_some(expiry as i64),
        compare_cas: cas,
        arith_mode: if loud(op) == opcode::DECREMENT {
            MetaArithMode::Decr
        } else {
            MetaArithMode::Incr
        },
        value: true,
        ret: vec![ReturnFlag::Cas],
        ..MetaFlags::default()
    }
}

/// Appends one response frame.
pub fn put_frame(
    out: &mut BytesMut,
    op: u8,
    opaque: u32,
    status: Status,
    cas: u64,
    (extras, key, value): (&[u8], &[u8], &[u8]),
) {
    out.reserve(HEADER_BYTES + extras.len() + key.len() + value.len());
    out.put_u8(RESPONSE_MAGIC);
    out.put_u8(op);
    out.put_u16(key.len() as u16);
    out.put_u8(extras.len() as u8);
    out.put_u8(0);
    out.put_u16(status as u16);
    out.put_u32((extras.len() + key.len() + value.len()) as u32);
    out.put_u32(opaque);
    out.put_u64(cas);
    out.put_slice(extras);
    out.put_slice(key);
    out.put_slice(value);
}

/// Appends a reply the codec decided alone (quiet success suppressed).
pub fn encode_reply(frame: &Frame, reply: &Reply, out: &mut BytesMut) {
    if reply.status == Status::Success && frame.quiet() {
        return;
    }
    put_frame(
        out,
        frame.opcode,
        frame.opaque,
        reply.status,
        0,
        (&[], &[], &reply.body),
    );
}

/// Appends the binary form of the command layer's reply to `frame`.
pub fn encode(frame: &Frame, response: &Response, out: &mut BytesMut) {
    let error = |out: &mut BytesMut, status: Status| {
        let text = status.text().as_bytes();
        put_frame(out, frame.opcode, frame.opaque, status, 0, (&[], &[], text));
    };
    let success = |out: &mut BytesMut, cas: u64, extras: &[u8], value: &[u8]| {
        if !frame.quiet() {
            put_frame(
                out,
                frame.opcode,
                frame.opaque,
                Status::Success,
                cas,
                (extras, &[], value),
            );
        }
    };
    match response {
        Response::Meta(reply) => encode_meta(frame, reply, out),
        // A classic reply to a get (answered from the near tier): one hit.
        Response::Values { values, .. } if values.len() == 1 => {
            let v = &values[0];
            encode_hit(frame, v.flags, v.cas, &v.data, out)
        }
        Response::Ok => success(out, 0, &[], &[]),
        Response::Version(v) => success(out, 0, &[], v.as_bytes()),
        Response::Stats(_) | Response::Reset | Response::Prefixes(_) => {
            encode_stats(frame, response, out)
        }
        Response::Error(ProtocolError::TOO_LARGE) => error(out, Status::TooLarge),
        Response::Error(ProtocolError::UnknownCommand) if frame.opcode == opcode::STAT => {
            error(out, Status::KeyNotFound)
        }
        Response::Error(ProtocolError::Client(why)) if why.contains("not allowed") => {
            // memcached answers a forbidden flush (-F) with an auth error.
            error(out, Status::AuthError)
        }
        Response::Error(ProtocolError::Client(why)) if why.contains("non-numeric") => {
            error(out, Status::DeltaBadValue)
        }
        Response::Error(ProtocolError::Client(why)) if why.contains("invalid numeric") => {
            error(out, Status::Invalid)
        }
        Response::Error(ProtocolError::Client(_)) if frame.opcode == opcode::STAT => {
            error(out, Status::KeyNotFound)
        }
        Response::Error(ProtocolError::Client(_))
        | Response::Error(ProtocolError::UnknownCommand) => error(out, Status::Invalid),
        Response::Error(ProtocolError::Server(why)) => server_error(frame, why, out),
        Response::ServerError(why) => server_error(frame, why, out),
        Response::None | Response::Close => {}
        // Text-only replies never answer a binary frame; say so rather than go silent.
        other => server_error(frame, &format!("unexpected reply {other:?}"), out),
    }
}

/// `stat` replies: one frame per statistic, then an empty one.
fn encode_stats(frame: &Frame, response: &Response, out: &mut BytesMut) {
    let row = |out: &mut BytesMut, name: &[u8], value: &[u8]| {
        put_frame(
            out,
            frame.opcode,
            frame.opaque,
            Status::Success,
            0,
            (&[], name, value),
        )
    };
    match response {
        Response::Stats(rows) => {
            for (name, value) in rows {
                row(out, name.as_bytes(), value.as_bytes());
            }
        }
        Response::Prefixes(rows) => {
            // memcached sends the whole dump as one statistic named "detailed".
            let mut text = Vec::new();
            for (prefix, [get, hit, set, del]) in rows {
                text.extend_from_slice(b"PREFIX ");
                text.extend_from_slice(prefix);
                text.extend_from_slice(
                    format!(" get {get} hit {hit} set {set} del {del}\r\n").as_bytes(),
                );
            }
            text.extend_from_slice(b"END\r\n");
            row(out, b"detailed", &text);
        }
        _ => {}
    }
    row(out, &[], &[]);
}

/// A backend failure: memcached's out-of-memory status for its own "out of memory" text,
/// otherwise a temporary failure carrying the reason.
fn server_error(frame: &Frame, why: &str, out: &mut BytesMut) {
    let status = if why.starts_with("out of memory") {
        Status::OutOfMemory
    } else {
        Status::TemporaryFailure
    };
    put_frame(
        out,
        frame.opcode,
        frame.opaque,
        status,
        0,
        (&[], &[], why.as_bytes()),
    );
}

/// A hit of a get, gat or touch: flags, the key for getk/gatk, the value but for touch.
fn encode_hit(frame: &Frame, flags: u32, cas: u64, value: &[u8], out: &mut BytesMut) {
    let key: &[u8] = if matches!(loud(frame.opcode), opcode::GETK | opcode::GATK) {
        &frame.key
    } else {
        &[]
    };
    put_frame(
        out,
        frame.opcode,
        frame.opaque,
        Status::Success,
        cas,
        (&flags.to_be_bytes(), key, value),
    );
}

/// Encodes the reply of a frame that ran as a meta request.
fn encode_meta(frame: &Frame, reply: &super::MetaReply, out: &mut BytesMut) {
    use opcode::*;
    let op = loud(frame.opcode);
    let cas = reply.cas().unwrap_or(0);
    let status = match (reply.status, op) {
        (MetaStatus::Va | MetaStatus::Hd, _) => Status::Success,
        (MetaStatus::En | MetaStatus::Nf, _) => Status::KeyNotFound,
        (MetaStatus::Ex, _) => Status::KeyExists,
        (MetaStatus::Ns, ADD) => Status::KeyExists,
        (MetaStatus::Ns, REPLACE) => Status::KeyNotFound,
        (MetaStatus::Ns | MetaStatus::Mn, _) => Status::NotStored,
    };
    let returns_key = matches!(op, GETK | GATK);
    let is_read = matches!(op, GET | GETK | GAT | GATK | TOUCH);
    if status != Status::Success {
        if frame.quiet() && is_read {
            return;
        }
        let key: &[u8] = if returns_key && status == Status::KeyNotFound {
            &frame.key
        } else {
            &[]
        };
        let body: &[u8] = if key.is_empty() {
            status.text().as_bytes()
        } else {
            &frame.key
        };
        put_frame(
            out,
            frame.opcode,
            frame.opaque,
            status,
            0,
            (&[], key, &body[key.len()..]),
        );
        return;
    }
    if is_read {
        let flags = reply.client_flags().unwrap_or(0);
        let value: &[u8] = reply.value.as_deref().unwrap_or(&[]);
        encode_hit(frame, flags, cas, value, out);
        return;
    }
    if frame.quiet() {
        return;
    }
    let number;
    let value: &[u8] = match op {
        INCREMENT | DECREMENT => {
            let text = reply.value.as_deref().unwrap_or(b"0");
            let n: u64 = std::str::from_utf8(text)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .unwrap_or(0);
            number = n.to_be_bytes();
            &number
        }
        _ => &[],
    };
    put_frame(
        out,
        frame.opcode,
        frame.opaque,
        Status::Success,
        cas,
        (&[], &[], value),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MetaFlag, MetaReply};
    use proptest::prelude::*;

    const LIMITS: Limits = Limits {
        max_item_bytes: 1024,
        max_line_bytes: 256,
        max_multiget_line_bytes: 1024,
    };

    fn frame(op: u8, key: &[u8], extras: &[u8], value: &[u8], cas: u64) -> Vec<u8> {
        let mut out = vec![REQUEST_MAGIC, op];
        out.extend_from_slice(&(key.len() as u16).to_be_bytes());
        out.push(extras.len() as u8);
        out.extend_from_slice(&[0, 0, 0]);
        let body = (key.len() + extras.len() + value.len()) as u32;
        out.extend_from_slice(&body.to_be_bytes());
        out.extend_from_slice(&0xdead_beef_u32.to_be_bytes());
        out.extend_from_slice(&cas.to_be_bytes());
        out.extend_from_slice(extras);
        out.extend_from_slice(key);
        out.extend_from_slice(value);
        out
    }

    fn decoded(bytes: &[u8]) -> Decoded {
        decode(bytes, &LIMITS, false).expect("a whole frame")
    }

    /// (opcode, status, cas, extras, key, value) of a reply frame.
    type Parts = (u8, u16, u64, Vec<u8>, Vec<u8>, Vec<u8>);

    /// The parts of each reply frame in `out`.
    fn replies(mut out: &[u8]) -> Vec<Parts> {
        let mut all = Vec::new();
        while !out.is_empty() {
            assert_eq!(out[0], RESPONSE_MAGIC);
            let key_len = u16::from_be_bytes([out[2], out[3]]) as usize;
            let extras_len = out[4] as usize;
            let status = u16::from_be_bytes([out[6], out[7]]);
            let body = u32::from_be_bytes([out[8], out[9], out[10], out[11]]) as usize;
            assert_eq!(
                &out[12..16],
                &0xdead_beef_u32.to_be_bytes(),
                "opaque echoed"
            );
            let cas = u64::from_be_bytes(out[16..24].try_into().unwrap());
            let b = &out[24..24 + body];
            all.push((
                out[1],
                status,
                cas,
                b[..extras_len].to_vec(),
                b[extras_len..extras_len + key_len].to_vec(),
                b[extras_len + key_len..].to_vec(),
            ));
            out = &out[24 + body..];
        }
        all
    }

    fn encoded(bytes: &[u8], response: Response) -> Vec<Parts> {
        let d = decoded(bytes);
        let mut out = BytesMut::new();
        encode(&d.frame, &response, &mut out);
        replies(&out)
    }

    /// A meta reply with `f` and `c` flags as given (0 = absent) and an optional value.
    fn meta(status: MetaStatus, flags: u32, cas: u64, value: Option<&'static str>) -> Response {
        let mut returned = Vec::new();
        if flags != 0 {
            returned.push(MetaFlag::ClientFlags(flags));
        }
        if cas != 0 {
            returned.push(MetaFlag::Cas(cas));
        }
        let mut reply = MetaReply::new(status, returned);
        reply.value = value.map(|v| Bytes::from_static(v.as_bytes()));
        Response::Meta(reply)
    }

    #[test]
    fn set_decodes_to_a_meta_set_with_flags_ttl_and_cas() {
        let d = decoded(&frame(
            opcode::SETQ,
            b"k",
            &[0, 0, 0, 5, 0, 0, 0, 9],
            b"hi",
            7,
        ));
        assert!(d.frame.quiet());
        let Command::Run(Request::Meta(MetaRequest::Set { key, data, flags })) = d.frame.command
        else {
            panic!("not a set: {:?}", d.frame.command)
        };
        assert_eq!((&key[..], &data[..]), (&b"k"[..], &b"hi"[..]));
        assert_eq!(flags.client_flags, Some(5));
        assert_eq!(flags.ttl, Some(9));
        assert_eq!(flags.compare_cas, Some(7));
        assert_eq!(flags.set_mode, MetaSetMode::Set);
    }

    #[test]
    fn incr_carries_initial_value_and_no_create_expiry() {
        let mut extras = 3u64.to_be_bytes().to_vec();
        extras.extend_from_slice(&10u64.to_be_bytes());
        extras.extend_from_slice(&u32::MAX.to_be_bytes());
        let d = decoded(&frame(opcode::DECREMENT, b"n", &extras, b"", 0));
        let Command::Run(Request::Meta(MetaRequest::Arith { flags, .. })) = d.frame.command else {
            panic!("not arithmetic")
        };
        assert_eq!(
            (flags.delta, flags.initial, flags.vivify),
            (Some(3), Some(10), None)
        );
        assert_eq!(flags.arith_mode, MetaArithMode::Decr);
    }

    #[test]
    fn replies_carry_status_cas_flags_and_key() {
        let get = frame(opcode::GETK, b"k", &[], &[], 0);
        assert_eq!(
            encoded(&get, meta(MetaStatus::Va, 5, 42, Some("hi"))),
            vec![(
                opcode::GETK,
                0,
                42,
                vec![0, 0, 0, 5],
                b"k".to_vec(),
                b"hi".to_vec()
            )]
        );
        assert_eq!(
            encoded(&get, meta(MetaStatus::En, 0, 0, None)),
            vec![(opcode::GETK, 1, 0, vec![], b"k".to_vec(), vec![])]
        );
        let tier_hit = Response::Values {
            values: vec![crate::protocol::Value {
                key: Bytes::from_static(b"k"),
                flags: 5,
                cas: 42,
                data: Bytes::from_static(b"hi"),
            }],
            with_cas: true,
            end: true,
        };
        assert_eq!(
            encoded(&get, tier_hit),
            vec![(
                opcode::GETK,
                0,
                42,
                vec![0, 0, 0, 5],
                b"k".to_vec(),
                b"hi".to_vec()
            )]
        );
        let getq = frame(opcode::GETQ, b"k", &[], &[], 0);
        assert!(encoded(&getq, meta(MetaStatus::En, 0, 0, None)).is_empty());
        let add = frame(opcode::ADD, b"k", &[0; 8], b"v", 0);
        assert_eq!(encoded(&add, meta(MetaStatus::Ns, 0, 0, None))[0].1, 0x02);
        let addq = frame(opcode::ADDQ, b"k", &[0; 8], b"v", 0);
        assert!(encoded(&addq, meta(MetaStatus::Hd, 0, 1, None)).is_empty());
        assert_eq!(encoded(&addq, meta(MetaStatus::Ns, 0, 0, None))[0].1, 0x02);
        let replace = frame(opcode::REPLACE, b"k", &[0; 8], b"v", 0);
        assert_eq!(
            encoded(&replace, meta(MetaStatus::Ns, 0, 0, None))[0].1,
            0x01
        );
        let append = frame(opcode::APPEND, b"k", &[], b"v", 0);
        assert_eq!(
            encoded(&append, meta(MetaStatus::Ns, 0, 0, None))[0].1,
            0x05
        );
        let incr = frame(opcode::INCREMENT, b"n", &[0; 20], b"", 0);
        assert_eq!(
            encoded(&incr, meta(MetaStatus::Va, 0, 3, Some("15"))),
            vec![(
                opcode::INCREMENT,
                0,
                3,
                vec![],
                vec![],
                15u64.to_be_bytes().to_vec()
            )]
        );
        let stat = frame(opcode::STAT, b"", &[], b"", 0);
        let rows = Response::Stats(vec![("pid".into(), "1".into())]);
        assert_eq!(
            encoded(&stat, rows),
            vec![
                (opcode::STAT, 0, 0, vec![], b"pid".to_vec(), b"1".to_vec()),
                (opcode::STAT, 0, 0, vec![], vec![], vec![])
            ]
        );
    }

    #[test]
    fn malformed_frames_get_memcached_statuses() {
        let reply = |bytes: &[u8]| match decoded(bytes).frame.command {
            Command::Reply(r) => (r.status, r.close),
            other => panic!("not a reply: {other:?}"),
        };
        // A get with extras: invalid, and memcached closes.
        assert_eq!(
            reply(&frame(opcode::GET, b"k", &[0; 4], b"", 0)),
            (Status::Invalid, true)
        );
        // Key longer than 250 bytes.
        let long = vec![b'k'; 251];
        assert_eq!(
            reply(&frame(opcode::GET, &long, &[], b"", 0)),
            (Status::Invalid, true)
        );
        // An unknown opcode: answered, the connection goes on.
        assert_eq!(
            reply(&frame(0x42, b"", &[], b"", 0)),
            (Status::UnknownCommand, false)
        );
        // A key longer than the body.
        let mut bad = frame(opcode::GET, b"k", &[], b"", 0);
        bad[11] = 0;
        assert_eq!(reply(&bad), (Status::UnknownCommand, true));
        // Before a login, only SASL and version are served.
        let get = frame(opcode::GET, b"k", &[], b"", 0);
        let d = decode(&get, &LIMITS, true).unwrap();
        assert!(matches!(
            d.frame.command,
            Command::Reply(Reply {
                status: Status::AuthError,
                close: true,
                ..
            })
        ));
        let version = frame(opcode::VERSION, b"", &[], b"", 0);
        assert!(matches!(
            decode(&version, &LIMITS, true).unwrap().frame.command,
            Command::Run(Request::Version)
        ));
    }

    #[test]
    fn an_oversized_value_is_answered_from_the_head_and_skipped() {
        let value = vec![b'x'; 2000];
        let whole = frame(opcode::SET, b"k", &[0; 8], &value, 0);
        let d = decode(&whole[..100], &LIMITS, false).expect("answered before the value arrives");
        assert_eq!(d.consumed + d.skip, whole.len());
        assert!(matches!(
            d.frame.command,
            Command::Run(Request::TooLarge {
                remove_old: true,
                ..
            })
        ));
        assert!(
            decode(&whole[..30], &LIMITS, false).is_none(),
            "waits for the key"
        );
    }

    fn check_decode(input: &[u8], auth: bool) -> Result<(), TestCaseError> {
        match decode(input, &LIMITS, auth) {
            Some(d) => {
                prop_assert!(d.consumed > 0 && d.consumed <= input.len());
                // Whatever it decoded encodes without a panic, to any reply.
                let mut out = BytesMut::new();
                for r in [
                    Response::Stored,
                    meta(MetaStatus::Va, 1, 2, Some("v")),
                    Response::Ok,
                ] {
                    encode(&d.frame, &r, &mut out);
                }
                if !out.is_empty() {
                    prop_assert_eq!(out[0], RESPONSE_MAGIC);
                }
            }
            // Waiting for more is allowed only within one header, extras, key and item.
            None => prop_assert!(input.len() < HEADER_BYTES + 255 + 65535 + LIMITS.max_item_bytes),
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn never_panics_on_any_bytes(input in proptest::collection::vec(any::<u8>(), 0..512), auth in any::<bool>()) {
            check_decode(&input, auth)?;
        }

        #[test]
        fn never_panics_on_framelike_input(
            op in 0u8..0x30,
            key in proptest::collection::vec(any::<u8>(), 0..300),
            extras in proptest::collection::vec(any::<u8>(), 0..24),
            value in proptest::collection::vec(any::<u8>(), 0..1100),
            cas in any::<u64>(),
            cut in any::<prop::sample::Index>(),
            skew in -3i64..3,
        ) {
            let mut f = frame(op, &key, &extras, &value, cas);
            let body = (f.len() - HEADER_BYTES) as i64 + skew;
            f[8..12].copy_from_slice(&(body.max(0) as u32).to_be_bytes());
            check_decode(&f, false)?;
            check_decode(&f[..cut.index(f.len() + 1)], false)?;
        }

        #[test]
        fn well_formed_frames_decode_whole(
            key in "[a-z]{1,250}",
            value in proptest::collection::vec(any::<u8>(), 0..1024),
            flags in any::<u32>(),
        ) {
            let mut extras = flags.to_be_bytes().to_vec();
            extras.extend_from_slice(&[0; 4]);
            let mut stream = frame(opcode::SET, key.as_bytes(), &extras, &value, 0);
            let first = stream.len();
            stream.extend(frame(opcode::GET, key.as_bytes(), &[], &[], 0));
            let d = decode(&stream, &LIMITS, false).unwrap();
            prop_assert_eq!(d.consumed, first);
            prop_assert_eq!(d.skip, 0);
            let Command::Run(Request::Meta(MetaRequest::Set { data, flags: f, .. })) = d.frame.command else {
                return Err(TestCaseError::fail("not a set"));
            };
            prop_assert_eq!(&data[..], &value[..]);
            prop_assert_eq!(f.client_flags, Some(flags));
            let next = decode(&stream[first..], &LIMITS, false).unwrap();
            let is_get = matches!(next.frame.command, Command::Run(Request::Meta(MetaRequest::Get { .. })));
            prop_assert!(is_get, "not a get");
        }
    }
}
