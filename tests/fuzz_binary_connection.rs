//! Fuzzing the binary protocol's connection states on stable Rust: generated streams of binary
//! frames (valid frames of every opcode, and mutated ones: lengths skewed, bodies cut short,
//! extras of the wrong size, bad magic, bodies over the item limit) split at random points,
//! sent over loopback to servers with the in-memory store, one of them with SASL on.
//!
//! Invariants checked for every stream:
//! - no panic (a connection task that panicked never gives its slot back);
//! - bounded buffers: the memory budget's peak stays within its limit plus connection buffers,
//!   and everything charged is given back once the connections close;
//! - replies are whole response frames, in order: markers (GETK of `markN`, N increasing)
//!   interleaved with the stream come back with N and their opaques increasing; in a stream
//!   of well-formed frames (a third of them), every reply answers a frame sent, in the order
//!   they were sent, and every loud frame and every marker is answered;
//! - the connection either answers or closes: after the stream, a final NOOP is answered or
//!   the connection is closed (bad magic, quit, an invalid frame, the request timeout), in time;
//! - with SASL on (a quarter of the streams), nothing but VERSION and the SASL frames is
//!   served before a login: the first other frame is refused and the connection closed; after
//!   a PLAIN login, frames are served.
//!
//! Every run replays the committed corpus (tests/corpus/binary_connection/*; files named
//! `sasl-*` go to the server with SASL on, whose user is `fuzz` with password `fuzz-pass`)
//! and then generates cases from a seed, bounded in count and time. Knobs, as for
//! tests/fuzz_connection.rs (see docs/protocol.md, "How conformance is tested"):
//! `S3CACHED_FUZZ_CASES` (default 300), `S3CACHED_FUZZ_SECS` (default 15),
//! `S3CACHED_FUZZ_SEED` (default: from the clock, printed), `S3CACHED_FUZZ_REPLAY=<case
//! seed>` (runs one failed case again). A failing case is written to
//! target/fuzz-binary-connection-failures/ so it can be added to the corpus.

#[path = "common/binary.rs"]
mod binary_frame;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use binary_frame::frame;
use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use s3cached::app::{self, App};
use s3cached::clock::Clock;
use s3cached::config::Config;
use s3cached::protocol::binary::{
    opcode::*, quiet, Status, HEADER_BYTES, REQUEST_MAGIC, RESPONSE_MAGIC,
};
use s3cached::protocol::MAX_KEY_BYTES;
use s3cached::store::memory::MemoryStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MEMORY_LIMIT_BYTES: u64 = 16 * 1024 * 1024;
const MAX_ITEM_BYTES: usize = 64 * 1024;
/// Markers set before the cases run; each case asks for some, in increasing order.
const MARKERS: usize = 64;
/// Cases in flight at once (a case whose stream ends inside a frame waits for the timeout).
const PARALLEL_CASES: usize = 16;
/// Longest a case may take to be answered or closed: the 1 s request timeout plus slack for
/// a loaded machine (16 cases at once, some sending bodies of megabytes).
const CASE_DEADLINE: Duration = Duration::from_secs(60);
/// The opaque of the final NOOP; no generated frame carries it.
const FINAL_OPAQUE: u32 = 0xfeed_f00d;
/// How long to wait for the final NOOP's reply before sending it again.
const SENTINEL_WAIT: Duration = Duration::from_secs(3);
/// Most a connection may hold beyond the budget's limit: its read buffer, grown for the
/// largest frame head the codec waits for (header, 255 bytes of extras, 64 KiB of key) and an
/// item, doubled as it grows, and its write buffer past the high-water mark.
const CONNECTION_BUFFER_BYTES: u64 = 1024 * 1024;
/// A body sent whole that is three times the budget: the server must discard it as it arrives.
const BIG_BODY_BYTES: usize = 48 * 1024 * 1024;
/// The SASL server's one user and its password.
const USER: &str = "fuzz";
const PASSWORD: &str = "fuzz-pass";

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// The SASL PLAIN login of the SASL server's user.
fn login_frame(opaque: u32) -> Vec<u8> {
    let data = format!("\0{USER}\0{PASSWORD}");
    frame(SASL_AUTH, b"PLAIN", &[], data.as_bytes(), 0, opaque)
}

/// The reply to the final NOOP, which ends a case answered.
fn final_reply() -> Vec<u8> {
    let mut out = vec![RESPONSE_MAGIC, NOOP, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    out.extend_from_slice(&FINAL_OPAQUE.to_be_bytes());
    out.extend_from_slice(&[0; 8]);
    out
}

/// Opcodes served before a SASL login.
fn allowed_before_login(op: u8) -> bool {
    matches!(op, VERSION | SASL_LIST_MECHS | SASL_AUTH | SASL_STEP)
}

/// The two servers: SASL off and SASL on.
struct Servers {
    plain: App,
    sasl: App,
    /// The SASL server's users file, kept until the end.
    _users: tempfile::NamedTempFile,
}

impl Servers {
    fn addr(&self, sasl: bool) -> SocketAddr {
        if sasl {
            self.sasl.addr
        } else {
            self.plain.addr
        }
    }
}

async fn server(extra: &str, login: bool) -> App {
    let config = Config::from_toml(&format!(
        "listen = \"127.0.0.1:0\"\nmemory_limit_bytes = {MEMORY_LIMIT_BYTES}\n\
         max_item_size = {MAX_ITEM_BYTES}\nrequest_timeout_secs = 1\nwrite_timeout_secs = 10\n\
         max_connections = 4096\nmax_entries = 0\n{extra}"
    ))
    .unwrap();
    let app = app::start_with(config, Arc::new(MemoryStore::new()), Clock::System)
        .await
        .expect("server starts");
    // The markers, set with quiet sets (after a login where one is needed), then a NOOP.
    let mut setup = Vec::new();
    if login {
        setup.extend(login_frame(1));
    }
    for i in 0..MARKERS {
        let key = format!("mark{i}");
        setup.extend(frame(SETQ, key.as_bytes(), &[0; 8], b"M", 0, 2));
    }
    setup.extend(frame(NOOP, &[], &[], &[], 0, FINAL_OPAQUE));
    let mut c = TcpStream::connect(app.addr).await.unwrap();
    c.write_all(&setup).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0; 4096];
    while !got.ends_with(&final_reply()) {
        let n = c.read(&mut buf).await.unwrap();
        assert!(n > 0, "the server closed during the setup");
        got.extend_from_slice(&buf[..n]);
    }
    let replies = parse_replies(&got).unwrap();
    assert!(
        replies.iter().all(|r| r.status == Status::Success as u16),
        "setup refused: {replies:?}"
    );
    app
}

async fn servers() -> Servers {
    let users = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(users.path(), format!("{USER}:{PASSWORD}\n")).unwrap();
    let extra = format!(
        "sasl_users_file = {:?}\n",
        users.path().display().to_string()
    );
    Servers {
        plain: server("", false).await,
        sasl: server(&extra, true).await,
        _users: users,
    }
}

fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Relaxed);
        previous(info);
    }));
}

/// One frame of a generated stream, as sent.
#[derive(Debug, Clone, Copy)]
struct Sent {
    opcode: u8,
    opaque: u32,
    /// A marker, which must be answered.
    marker: bool,
}

/// One stream to send, and what is known of it.
struct Case {
    /// Splits the stream; for a generated case, also the seed it was generated from.
    seed: u64,
    /// Sent to the server with SASL on.
    sasl: bool,
    /// The frames (and whatever else) to send, before the final NOOP.
    stream: Vec<u8>,
    /// Every frame sent, in order, when all are well formed: every reply is checked against them.
    clean: Option<Vec<Sent>>,
    /// The opaque of the marker sent right after a PLAIN login: it must be served.
    after_login: Option<u32>,
}

/// Builds a stream frame by frame, numbering opaques and recording what is sent.
struct Gen {
    /// Every choice, from the case's seed.
    rng: StdRng,
    /// The stream so far.
    out: Vec<u8>,
    /// The frames in it so far, in order (meaningless once one is mutated).
    sent: Vec<Sent>,
    /// The next opaque: frames are numbered from 1 in the order sent.
    opaque: u32,
    /// The next marker number.
    marker: usize,
    /// SASL failures so far: each costs a 250 ms pause, and eight close the connection.
    auth_failures: u32,
    /// Frames may be mutated (and QUIT sent); otherwise every frame is well formed.
    dirty: bool,
}

impl Gen {
    /// Appends a frame to `piece`, numbered and recorded.
    fn frame(&mut self, piece: &mut Vec<u8>, op: u8, key: &[u8], extras: &[u8], value: &[u8]) {
        let cas = match self.rng.random_range(0..8) {
            0 => self.rng.random(),
            1 => 1,
            _ => 0,
        };
        self.opaque += 1;
        piece.extend(frame(op, key, extras, value, cas, self.opaque));
        self.sent.push(Sent {
            opcode: op,
            opaque: self.opaque,
            marker: false,
        });
    }

    /// Appends a marker (GETK of the next `markN`) to the stream; returns its opaque.
    fn marker(&mut self) -> Option<u32> {
        if self.marker >= MARKERS {
            return None;
        }
        self.opaque += 1;
        let key = format!("mark{}", self.marker);
        self.out
            .extend(frame(GETK, key.as_bytes(), &[], &[], 0, self.opaque));
        self.sent.push(Sent {
            opcode: GETK,
            opaque: self.opaque,
            marker: true,
        });
        self.marker += self.rng.random_range(1..3);
        Some(self.opaque)
    }

    /// A failed login: a wrong password, an unknown mechanism, or a step (PLAIN has none).
    fn bad_login(&mut self, piece: &mut Vec<u8>) {
        self.auth_failures += 1;
        match self.rng.random_range(0..3) {
            0 => self.frame(piece, SASL_AUTH, b"PLAIN", &[], b"\0fuzz\0wrong"),
            1 => self.frame(piece, SASL_AUTH, b"CRAM-MD5", &[], b"fuzz"),
            _ => {
                let data = format!("\0{USER}\0{PASSWORD}");
                self.frame(piece, SASL_STEP, b"PLAIN", &[], data.as_bytes())
            }
        }
    }

    /// One generated piece: a well-formed frame of some opcode, or a few.
    fn piece(&mut self) -> Vec<u8> {
        let keys: [&[u8]; 7] = [b"a", b"b", b"c", b"k1", "\u{e9}".as_bytes(), b"x y", b"\0"];
        let long = vec![b'k'; MAX_KEY_BYTES];
        let key = match self.rng.random_range(0..16) {
            0 => &long[..],
            _ => keys[self.rng.random_range(0..keys.len())],
        };
        let small = self.rng.random_range(0..40usize);
        let value = vec![b'd'; small];
        let mut p = Vec::new();
        let mut set_extras = [0u8; 8];
        set_extras[..4].copy_from_slice(&self.rng.random::<u32>().to_be_bytes());
        let ttl: u32 = match self.rng.random_range(0..4) {
            0 => self.rng.random(),
            1 => self.rng.random_range(1..100),
            _ => 0,
        };
        set_extras[4..].copy_from_slice(&ttl.to_be_bytes());
        let ttl = ttl.to_be_bytes();
        let pick = |rng: &mut StdRng, ops: &[u8]| ops[rng.random_range(0..ops.len())];
        match self.rng.random_range(0..30) {
            0..=2 => {
                let op = pick(&mut self.rng, &[GET, GETQ, GETK, GETKQ]);
                self.frame(&mut p, op, key, &[], &[]);
            }
            // A run of quiet gets closed by a NOOP, as libmemcached sends a multi-get.
            3..=4 => {
                for _ in 0..self.rng.random_range(1..40) {
                    let op = pick(&mut self.rng, &[GETQ, GETKQ, GET, GETK]);
                    let key = keys[self.rng.random_range(0..keys.len())];
                    self.frame(&mut p, op, key, &[], &[]);
                }
                self.frame(&mut p, NOOP, &[], &[], &[]);
            }
            5..=7 => {
                let op = pick(&mut self.rng, &[SET, ADD, REPLACE, SETQ, ADDQ, REPLACEQ]);
                self.frame(&mut p, op, key, &set_extras, &value);
            }
            // Over the item limit: answered from the head, its body discarded as it arrives.
            8 => {
                let n = match self.rng.random_range(0..8) {
                    0 => self.rng.random_range(MAX_ITEM_BYTES + 1..1024 * 1024),
                    _ => MAX_ITEM_BYTES + self.rng.random_range(1..64),
                };
                let op = pick(&mut self.rng, &[SET, SETQ, ADD, APPEND]);
                let extras: &[u8] = if op == APPEND { &[] } else { &set_extras };
                self.frame(&mut p, op, key, extras, &vec![b'd'; n]);
            }
            9..=10 => {
                let op = pick(&mut self.rng, &[APPEND, PREPEND, APPENDQ, PREPENDQ]);
                self.frame(&mut p, op, key, &[], &value);
            }
            11 => {
                let op = pick(&mut self.rng, &[DELETE, DELETEQ]);
                self.frame(&mut p, op, key, &[], &[]);
            }
            12..=13 => {
                let op = pick(
                    &mut self.rng,
                    &[INCREMENT, DECREMENT, INCREMENTQ, DECREMENTQ],
                );
                let mut extras = Vec::new();
                extras.extend_from_slice(&self.rng.random_range(0..1000u64).to_be_bytes());
                extras.extend_from_slice(&self.rng.random::<u64>().to_be_bytes());
                let expiry = match self.rng.random_range(0..3) {
                    0 => u32::MAX,
                    1 => self.rng.random_range(0..100),
                    _ => 0,
                };
                extras.extend_from_slice(&expiry.to_be_bytes());
                self.frame(&mut p, op, key, &extras, &[]);
            }
            14..=15 => {
                let op = pick(&mut self.rng, &[TOUCH, GAT, GATQ, GATK, GATKQ]);
                self.frame(&mut p, op, key, &ttl, &[]);
            }
            16..=17 => self.frame(&mut p, NOOP, &[], &[], &[]),
            18 => self.frame(&mut p, VERSION, &[], &[], &[]),
            19 => {
                let args = [
                    "",
                    "settings",
                    "items",
                    "slabs",
                    "conns",
                    "detail dump",
                    "nope",
                ];
                let arg = args[self.rng.random_range(0..args.len())];
                self.frame(&mut p, STAT, arg.as_bytes(), &[], &[]);
            }
            20 if self.rng.random_range(0..4) == 0 => {
                let op = pick(&mut self.rng, &[FLUSH, FLUSHQ]);
                let extras: &[u8] = match self.rng.random_range(0..3) {
                    0 => &[0, 0, 0, 0],
                    1 => &[0, 0, 0, 5],
                    _ => &[],
                };
                self.frame(&mut p, op, &[], extras, &[]);
            }
            21 => self.frame(&mut p, SASL_LIST_MECHS, &[], &[], &[]),
            22 if self.auth_failures < 3 => self.bad_login(&mut p),
            // Opcodes memcached does not serve: answered "unknown command", the connection lives.
            23 => {
                let op = pick(&mut self.rng, &[0x1b, 0x1f, 0x25, 0x30, 0x48, 0xff]);
                self.frame(&mut p, op, &[], &[], &[]);
            }
            24 if self.dirty && self.rng.random_range(0..6) == 0 => {
                let op = pick(&mut self.rng, &[QUIT, QUITQ]);
                self.frame(&mut p, op, &[], &[], &[]);
            }
            25 if self.dirty => {
                p = (0..self.rng.random_range(0..64))
                    .map(|_| self.rng.random::<u8>())
                    .collect();
            }
            _ => {
                let op = pick(&mut self.rng, &[GETK, SET, DELETE, NOOP]);
                let extras: &[u8] = if op == SET { &set_extras } else { &[] };
                let value: &[u8] = if op == SET { &value } else { &[] };
                let key: &[u8] = if op == NOOP { &[] } else { key };
                self.frame(&mut p, op, key, extras, value);
            }
        }
        p
    }

    /// Damages the frame at the front of `piece`.
    fn mutate(&mut self, piece: &mut Vec<u8>) {
        if piece.len() < HEADER_BYTES {
            return;
        }
        let body_len = |p: &[u8]| u32::from_be_bytes([p[8], p[9], p[10], p[11]]);
        let set_body_len = |p: &mut Vec<u8>, n: u32| p[8..12].copy_from_slice(&n.to_be_bytes());
        let rng = &mut self.rng;
        match rng.random_range(0..9) {
            // A body length a little off: the frames after it are read out of step.
            0 => {
                let skew = rng.random_range(1..32u32);
                let n = body_len(piece);
                let n = match rng.random_bool(0.5) {
                    true => n.saturating_add(skew),
                    false => n.saturating_sub(skew),
                };
                set_body_len(piece, n);
            }
            // A body announced over the item limit, of which only part comes.
            1 => {
                let n = rng.random_range(MAX_ITEM_BYTES as u32..64 * 1024 * 1024);
                set_body_len(piece, n);
                let sent = rng.random_range(0..64 * 1024usize);
                piece.extend(std::iter::repeat_n(b'd', sent));
            }
            // Past what memcached accepts at all.
            2 => set_body_len(piece, rng.random_range(1024 * 1024 * 1024 + 1..=u32::MAX)),
            // Cut short, in the header or in the body.
            3 => piece.truncate(rng.random_range(0..piece.len())),
            // Extras of the wrong size.
            4 => piece[4] = piece[4].wrapping_add(rng.random_range(1..=255)),
            // Bad magic: memcached hangs up.
            5 if rng.random_range(0..3) == 0 => {
                piece[0] = rng.random_range(0..0xff);
                if piece[0] == REQUEST_MAGIC {
                    piece[0] = 0xff;
                }
            }
            // A key longer than the body.
            6 => {
                let n = body_len(piece) as u16;
                piece[2..4]
                    .copy_from_slice(&n.saturating_add(rng.random_range(1..300)).to_be_bytes());
            }
            7 => {
                let at = rng.random_range(0..piece.len());
                piece[at] ^= 1 << rng.random_range(0..8);
            }
            _ => {
                let at = rng.random_range(0..=piece.len());
                let junk: Vec<u8> = (0..rng.random_range(1..24)).map(|_| rng.random()).collect();
                piece.splice(at..at, junk);
            }
        }
    }
}

/// The case a seed makes: a stream of frames with markers between them, for the server with
/// SASL off or (a quarter of the time) on; a third of them all well formed.
fn generate(seed: u64) -> Case {
    let mut rng = StdRng::seed_from_u64(seed);
    let sasl = rng.random_range(0..4) == 0;
    let dirty = rng.random_range(0..3) != 0;
    let mut g = Gen {
        rng,
        out: Vec::new(),
        sent: Vec::new(),
        opaque: 0,
        marker: 0,
        auth_failures: 0,
        dirty,
    };
    let mut after_login = None;
    if sasl {
        // Failed attempts first, now and then; then, most of the time, a login.
        for _ in 0..g.rng.random_range(0..4usize).saturating_sub(1) {
            let mut p = Vec::new();
            g.bad_login(&mut p);
            g.out.extend(p);
        }
        if g.rng.random_range(0..4) != 0 {
            g.opaque += 1;
            g.out.extend(login_frame(g.opaque));
            g.sent.push(Sent {
                opcode: SASL_AUTH,
                opaque: g.opaque,
                marker: false,
            });
            after_login = g.marker();
        }
    }
    for _ in 0..g.rng.random_range(1..24) {
        let mut p = g.piece();
        if dirty && g.rng.random_range(0..10) == 0 {
            g.mutate(&mut p);
        }
        // Nothing generated may name a marker: only the markers placed here do, in order.
        for i in 0..p.len().saturating_sub(3) {
            if &p[i..i + 4] == b"mark" {
                p[i + 1] = b'o';
            }
        }
        g.out.extend(p);
        if g.rng.random_range(0..2) == 0 {
            for _ in 0..g.rng.random_range(1..4) {
                g.marker();
            }
        }
    }
    // The first byte picks the protocol: keep this a binary connection.
    if let Some(first) = g.out.first_mut() {
        *first = REQUEST_MAGIC;
    }
    Case {
        seed,
        sasl,
        stream: g.out,
        clean: (!dirty).then_some(g.sent),
        after_login,
    }
}

/// A SET whose body, three times the budget, is sent whole before a marker: a server that
/// buffered it rather than discarding it as it arrives would blow the budget's peak (or wait
/// for a grant that never comes, and miss the case's deadline).
fn big_body_case() -> Case {
    let mut stream = frame(SET, b"big", &[0; 8], &vec![b'd'; BIG_BODY_BYTES], 0, 1);
    stream.extend(frame(GETK, b"mark0", &[], &[], 0, 2));
    Case {
        seed: 0xb16,
        sasl: false,
        stream,
        clean: None,
        after_login: None,
    }
}

/// A response frame's header fields and key.
#[derive(Debug, Clone)]
struct Answer {
    /// The request's opcode, echoed.
    opcode: u8,
    status: u16,
    /// The request's opaque, echoed: it tells which frame this answers.
    opaque: u32,
    /// The key, which GETK's reply carries: it tells a marker's reply.
    key: Vec<u8>,
}

/// Splits replies into response frames; an error if they are not whole, well-formed frames.
fn parse_replies(mut bytes: &[u8]) -> Result<Vec<Answer>, String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let at = out.len();
        if bytes.len() < HEADER_BYTES {
            return Err(format!("reply {at}: a header cut short"));
        }
        if bytes[0] != RESPONSE_MAGIC {
            return Err(format!("reply {at}: magic {:#x}", bytes[0]));
        }
        let key_len = u16::from_be_bytes([bytes[2], bytes[3]]) as usize;
        let extras_len = bytes[4] as usize;
        let body_len = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize;
        if key_len + extras_len > body_len || bytes.len() < HEADER_BYTES + body_len {
            return Err(format!("reply {at}: a body cut short or too small"));
        }
        let key_at = HEADER_BYTES + extras_len;
        out.push(Answer {
            opcode: bytes[1],
            status: u16::from_be_bytes([bytes[6], bytes[7]]),
            opaque: u32::from_be_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]),
            key: bytes[key_at..key_at + key_len].to_vec(),
        });
        bytes = &bytes[HEADER_BYTES + body_len..];
    }
    Ok(out)
}

/// The marker number a reply answers, if it answers a marker.
fn marker_of(answer: &Answer) -> Option<usize> {
    let digits = answer.key.strip_prefix(b"mark")?;
    if answer.opcode != GETK || digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// Markers come back in the order sent: their numbers and opaques increasing.
fn check_markers(answers: &[Answer]) -> Result<(), String> {
    let markers: Vec<(usize, u32)> = answers
        .iter()
        .filter_map(|a| Some((marker_of(a)?, a.opaque)))
        .collect();
    if markers
        .windows(2)
        .any(|w| w[0].0 >= w[1].0 || w[0].1 >= w[1].1)
    {
        return Err(format!("replies out of order: markers {markers:?}"));
    }
    Ok(())
}

/// With SASL on: nothing but the allowed frames is served before a successful login, and the
/// first refusal is the last reply before the connection closes.
fn check_login(answers: &[Answer], closed: bool) -> Result<(), String> {
    let mut logged_in = false;
    for (i, a) in answers.iter().enumerate() {
        if a.opcode == SASL_AUTH && a.status == Status::Success as u16 {
            logged_in = true;
        }
        if logged_in || allowed_before_login(a.opcode) {
            continue;
        }
        if a.status == Status::Success as u16 {
            return Err(format!("opcode {:#x} served before a login", a.opcode));
        }
        if i + 1 != answers.len() || !closed {
            return Err(format!(
                "opcode {:#x} refused before a login, and the connection went on",
                a.opcode
            ));
        }
    }
    if !logged_in && !closed {
        return Err("the final NOOP was served before a login".into());
    }
    Ok(())
}

/// A stream of well-formed frames: every reply answers a frame sent, in order; every loud
/// frame and every marker is answered; with SASL on and no login, the connection is closed
/// at the first frame that needs one, refused.
fn check_clean(
    sent: &[Sent],
    answers: &[Answer],
    closed: bool,
    logged_in: bool,
) -> Result<(), String> {
    let mut expected: Vec<Sent> = sent.to_vec();
    expected.push(Sent {
        opcode: NOOP,
        opaque: FINAL_OPAQUE,
        marker: false,
    });
    if !logged_in {
        // Cut at the refusal, which must close the connection.
        let refused = expected
            .iter()
            .position(|s| !allowed_before_login(s.opcode))
            .expect("the final NOOP needs a login");
        expected.truncate(refused + 1);
        let last = answers.last().ok_or("no refusal before the close")?;
        if last.opaque != expected[refused].opaque || last.status != Status::AuthError as u16 {
            return Err(format!(
                "the first frame before a login was not refused: {last:?}"
            ));
        }
        if !closed {
            return Err("refused before a login, and the connection went on".into());
        }
    } else if closed {
        return Err("closed, though every frame was well formed".into());
    }
    let mut answered = vec![0usize; expected.len()];
    let mut last = 0;
    for a in answers {
        let Some(at) = expected.iter().position(|s| s.opaque == a.opaque) else {
            return Err(format!("a reply to no frame sent: {a:?}"));
        };
        if at < last {
            return Err(format!(
                "reply to frame {at} (opcode {:#x}) after one to frame {last}",
                a.opcode
            ));
        }
        if a.opcode != expected[at].opcode {
            return Err(format!("frame {at}: answered with opcode {:#x}", a.opcode));
        }
        last = at;
        answered[at] += 1;
    }
    for (at, (s, n)) in expected.iter().zip(&answered).enumerate() {
        let want = match (s.marker, quiet(s.opcode), s.opcode) {
            (true, _, _) => 1..=1,
            (_, _, STAT) => 1..=usize::MAX,
            (_, true, _) => 0..=1,
            _ => 1..=1,
        };
        if !want.contains(n) {
            return Err(format!(
                "frame {at} (opcode {:#x}, opaque {}) answered {n} times",
                s.opcode, s.opaque
            ));
        }
    }
    Ok(())
}

/// Every invariant of one case's replies.
fn check(case: &Case, reply: &[u8], closed: bool) -> Result<(), String> {
    let answers = parse_replies(reply)?;
    check_markers(&answers)?;
    if !closed && !reply.ends_with(&final_reply()) {
        return Err("not answered".into());
    }
    if case.sasl {
        check_login(&answers, closed)?;
    }
    if let Some(opaque) = case.after_login {
        let served = answers.iter().any(|a| {
            a.opaque == opaque
                && [Status::Success as u16, Status::KeyNotFound as u16].contains(&a.status)
        });
        if !served {
            return Err("the marker after the login was not served".into());
        }
    }
    if let Some(sent) = &case.clean {
        let logged_in = !case.sasl || case.after_login.is_some();
        check_clean(sent, &answers, closed, logged_in)?;
    }
    Ok(())
}

/// Sends the case's stream split at random points, then the final NOOP; checks the invariants.
async fn run_case(addr: SocketAddr, case: &Case) -> Result<(), String> {
    // The whole exchange is bounded: a server that stops reading blocks the writes too.
    let (reply, closed) = tokio::time::timeout(CASE_DEADLINE, exchange(addr, case))
        .await
        .map_err(|_| "neither answered nor closed in time".to_string())??;
    check(case, &reply, closed)
}

/// A connection for `case`. A SASL case comes from a loopback address of its own (from its
/// seed): failed logins are limited per client address, and one case's failures must not
/// use up another's allowance.
async fn connect(addr: SocketAddr, case: &Case) -> std::io::Result<TcpStream> {
    if !case.sasl {
        return TcpStream::connect(addr).await;
    }
    let [a, b, c, ..] = case.seed.to_le_bytes();
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from(([127, a.max(1), b, c.max(2)], 0)))?;
    socket.connect(addr).await
}

/// Writes the stream and reads the replies until the final NOOP's reply or a close; returns
/// the replies and whether the connection was closed.
async fn exchange(addr: SocketAddr, case: &Case) -> Result<(Vec<u8>, bool), String> {
    let mut rng = StdRng::seed_from_u64(case.seed);
    let socket = connect(addr, case).await.map_err(|e| e.to_string())?;
    socket.set_nodelay(true).unwrap();
    let (mut rx, mut tx) = socket.into_split();
    let end = final_reply();
    let read = async {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match rx.read(&mut buf).await {
                Ok(0) | Err(_) => return (out, true),
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if out.ends_with(&end) {
                return (out, false);
            }
        }
    };
    let final_noop = frame(NOOP, &[], &[], &[], 0, FINAL_OPAQUE);
    let write = async {
        let mut input = case.stream.clone();
        input.extend_from_slice(&final_noop);
        let mut at = 0;
        while at < input.len() {
            let n = rng
                .random_range(1..=input.len() - at)
                .min(match rng.random_range(0..3) {
                    0 => 1,
                    1 => 7,
                    _ => usize::MAX,
                });
            // A closed connection stops the writes; that is one of the allowed outcomes.
            if tx.write_all(&input[at..at + n]).await.is_err() {
                break;
            }
            at += n;
            if rng.random_range(0..4) == 0 {
                tokio::task::yield_now().await;
            }
        }
        // The final NOOP may be taken as part of a body the stream announced: it is sent
        // again until answered, or the connection closes.
        loop {
            tokio::time::sleep(SENTINEL_WAIT).await;
            let _ = tx.write_all(&final_noop).await;
        }
    };
    tokio::select! {
        done = read => Ok(done),
        never = write => never,
    }
}

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/corpus/binary_connection")
}

fn save_failure(case: &Case) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-binary-connection-failures");
    std::fs::create_dir_all(&dir).unwrap();
    let prefix = if case.sasl { "sasl-" } else { "" };
    let path = dir.join(format!("{prefix}{:016x}.bin", case.seed));
    std::fs::write(&path, &case.stream).unwrap();
    path
}

/// Runs the cases, `PARALLEL_CASES` in flight at a time; panics on the first failure.
/// Returns how many ran.
async fn run_all(servers: &Servers, cases: impl Iterator<Item = Case>) -> u64 {
    let mut runs = futures::stream::iter(cases.map(|case| {
        let addr = servers.addr(case.sasl);
        tokio::spawn(async move {
            let result = run_case(addr, &case).await;
            (case, result)
        })
    }))
    .buffer_unordered(PARALLEL_CASES);
    let mut ran = 0;
    while let Some(run) = runs.next().await {
        let (case, result) = run.expect("case task");
        if let Err(why) = result {
            let path = save_failure(&case);
            panic!(
                "case {:#x} (SASL {}) failed: {why}; stream saved to {}",
                case.seed,
                if case.sasl { "on" } else { "off" },
                path.display()
            );
        }
        assert_eq!(PANICS.load(Relaxed), 0, "a panic in the server");
        ran += 1;
    }
    ran
}

/// After every connection is gone: nothing panicked, nothing is still charged, and the peak
/// stayed within the budget (plus the buffers of the connections at once).
async fn check_server(app: &App) {
    let stats = &app.ctx.stats;
    let start = Instant::now();
    while stats.curr_connections.load(Relaxed) > 0 || stats.memory_used_bytes.load(Relaxed) > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "connections {} and {} bytes still held: a connection task died or leaked",
            stats.curr_connections.load(Relaxed),
            stats.memory_used_bytes.load(Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let peak = stats.memory_peak_bytes.load(Relaxed);
    let buffers = PARALLEL_CASES as u64 * CONNECTION_BUFFER_BYTES;
    assert!(
        peak <= MEMORY_LIMIT_BYTES + buffers,
        "budget peak {peak} over the limit"
    );
    assert_eq!(PANICS.load(Relaxed), 0, "a panic in the server");
}

async fn check_servers(servers: &Servers) {
    check_server(&servers.plain).await;
    check_server(&servers.sasl).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_and_generated_frame_streams_keep_the_invariants() {
    count_panics();
    let servers = servers().await;
    // The corpus, each file split with a seed of its own.
    let mut corpus = Vec::new();
    for entry in std::fs::read_dir(corpus_dir()).expect("tests/corpus/binary_connection") {
        let path = entry.unwrap().path();
        let stream = std::fs::read(&path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy();
        corpus.push(Case {
            seed: stream.len() as u64,
            sasl: name.starts_with("sasl-"),
            stream,
            clean: None,
            after_login: None,
        });
    }
    assert!(corpus.len() >= 8, "the corpus is missing");
    corpus.push(big_body_case());
    let replayed = run_all(&servers, corpus.into_iter()).await;
    check_servers(&servers).await;

    // One failed case again, by the seed its failure printed.
    if let Ok(hex) = std::env::var("S3CACHED_FUZZ_REPLAY") {
        let seed = u64::from_str_radix(hex.trim_start_matches("0x"), 16).expect("a hex seed");
        run_all(&servers, std::iter::once(generate(seed))).await;
        check_servers(&servers).await;
        return;
    }
    let cases = env_number("S3CACHED_FUZZ_CASES", 300);
    let budget = Duration::from_secs(env_number("S3CACHED_FUZZ_SECS", 15));
    let seed = env_number(
        "S3CACHED_FUZZ_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    );
    println!("binary connection fuzz: seed {seed} (S3CACHED_FUZZ_SEED={seed} repeats it)");
    let start = Instant::now();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut made = 0;
    let generated = std::iter::from_fn(|| {
        (made < cases && start.elapsed() < budget).then(|| {
            made += 1;
            generate(rng.random())
        })
    });
    let done = run_all(&servers, generated).await;
    check_servers(&servers).await;
    println!(
        "binary connection fuzz: {replayed} corpus streams and {done} generated in {:?}; \
         budget peaks {} and {} bytes",
        start.elapsed(),
        servers.plain.ctx.stats.memory_peak_bytes.load(Relaxed),
        servers.sasl.ctx.stats.memory_peak_bytes.load(Relaxed),
    );
    assert!(done > 0);
}
