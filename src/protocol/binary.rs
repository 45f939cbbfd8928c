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
/// Largest body a frame may carry before the client has logged in: a SASL PLAIN payload
/// (mechanism, user and password) fits many times over. A larger one is refused and the
/// connection closed, so nobody can make the server buffer much before a login.
pub const MAX_UNAUTHENTICATED_BODY_BYTES: u32 = 4096;
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
pub enum Action {
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
    fn error(status: Status, close: bool) -> Action {
        Action::Reply(Reply {
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
    /// What the frame asks of the connection.
    pub action: Action,
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

/// How many bytes the frame at the front of `buf` takes in all, once its header is in and
/// its body is one the connection will buffer (not refused, not over the item limit);
/// `None` otherwise. The connection sizes its read buffer by it in one step.
pub fn awaited_len(buf: &[u8], limits: &Limits, auth_required: bool) -> Option<usize> {
    let h = Header::read(buf)?;
    let well_formed = h.magic == REQUEST_MAGIC
        && u32::from(h.key_len) + u32::from(h.extras_len) <= h.body_len
        && h.body_len <= MAX_BODY_BYTES
        && (!auth_required || h.body_len <= MAX_UNAUTHENTICATED_BODY_BYTES);
    (well_formed && h.value_len() <= limits.whole_item_bytes())
        .then_some(HEADER_BYTES + h.body_len as usize)
}

/// Decodes one frame from the front of `buf`; `None` means more bytes are needed.
/// `auth_required`: SASL is on and this connection has not authenticated yet.
pub fn decode(buf: &[u8], limits: &Limits, auth_required: bool) -> Option<Decoded> {
    let h = Header::read(buf)?;
    let answer = |action: Action, consumed: usize, skip: usize| {
        Some(Decoded {
            frame: Frame {
                opcode: h.opcode,
                opaque: h.opaque,
                key: Bytes::new(),
                action,
            },
            consumed,
            skip,
        })
    };
    if h.magic != REQUEST_MAGIC {
        // memcached closes without a word.
        return answer(
            Action::Run(Request::Hangup("bad binary magic")),
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
    if auth_required && h.body_len > MAX_UNAUTHENTICATED_BODY_BYTES {
        return answer(Reply::error(Status::Invalid, true), buf.len(), 0);
    }
    if h.key_len as usize > MAX_KEY_BYTES {
        return answer(Reply::error(Status::Invalid, true), buf.len(), 0);
    }
    let frame_len = HEADER_BYTES + h.body_len as usize;
    let value_len = h.value_len();
    if value_len > limits.whole_item_bytes() {
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
    let too_large = value_len > limits.whole_item_bytes();
    let action = match checked(h) {
        Err(status) => Reply::error(status, status == Status::Invalid),
        Ok(()) if too_large && carries_value(h.opcode) => Action::Run(Request::TooLarge {
            key: key.clone(),
            remove_old: loud(h.opcode) == opcode::SET,
            noreply: false,
        }),
        Ok(()) if too_large => Reply::error(Status::TooLarge, false),
        Ok(()) => action(h, extras, key.clone(), value),
    };
    Some(Decoded {
        frame: Frame {
            opcode: h.opcode,
            opaque: h.opaque,
            key,
            action,
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

/// What a well-formed frame asks.
fn action(h: &Header, extras: &[u8], key: Bytes, value: impl Fn() -> Bytes) -> Action {
    use opcode::*;
    let cas = (h.cas != 0).then_some(h.cas);
    let meta = |m: MetaRequest| Action::Run(Request::Meta(m));
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
        FLUSH => Action::Run(Request::FlushAll {
            delay: if extras.len() == 4 {
                be_u32(extras) as i64
            } else {
                0
            },
            noreply: false,
        }),
        STAT => Action::Run(Request::Stats {
            arg: (!key.is_empty()).then(|| String::from_utf8_lossy(&key).into_owned()),
        }),
        VERSION => Action::Run(Request::Version),
        NOOP => Action::Reply(Reply {
            status: Status::Success,
            body: Bytes::new(),
            close: false,
        }),
        QUIT => Action::Reply(Reply {
            status: Status::Success,
            body: Bytes::new(),
            close: true,
        }),
        SASL_LIST_MECHS => Action::SaslListMechs,
        SASL_AUTH | SASL_STEP if key.len() > MAX_SASL_MECH_BYTES => {
            Reply::error(Status::Invalid, false)
        }
        SASL_AUTH | SASL_STEP => Action::SaslAuth {
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
        // A classic reply to a get (answered from the near tier): one hit, or a miss the
        // tier remembers.
        // A value streamed is served to text clients only (see docs/operations.md).
        Response::Values { values, .. } if values.len() == 1 && values[0].stream.is_some() => {
            error(out, Status::TooLarge)
        }
        Response::Values { values, .. } if values.len() == 1 => {
            let v = &values[0];
            encode_hit(frame, v.flags, v.cas, &v.data, out)
        }
        Response::Values { values, .. } if values.is_empty() => {
            encode_failure(frame, Status::KeyNotFound, out)
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
/// A reply that is not a success: silent for a quiet read; a miss of GETK/GATK carries the
/// key, others the status's text.
fn encode_failure(frame: &Frame, status: Status, out: &mut BytesMut) {
    use opcode::*;
    let op = loud(frame.opcode);
    if frame.quiet() && matches!(op, GET | GETK | GAT | GATK | TOUCH) {
        return;
    }
    let key: &[u8] = if matches!(op, GETK | GATK) && status == Status::KeyNotFound {
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
}

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
    let is_read = matches!(op, GET | GETK | GAT | GATK | TOUCH);
    if reply.stream.is_some() {
        // A value streamed is served to text clients only (see docs/operations.md); said
        // even to a quiet get, which would otherwise take it for a miss.
        let text = Status::TooLarge.text().as_bytes();
        put_frame(
            out,
            frame.opcode,
            frame.opaque,
            Status::TooLarge,
            0,
            (&[], &[], text),
        );
        return;
    }
    if status != Status::Success {
        encode_failure(frame, status, out);
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
mod tests;
