//! A stable-Rust fuzz target for the binary-protocol codec: seeded, bounded, with invariants.
//!
//! Streams of frames are built from a seed (valid frames of every opcode, then mutated: bytes
//! flipped, lengths skewed, cut short, random bytes spliced in) and fed to the decoder the
//! way a socket delivers them, in random chunks. Invariants: no panic; every decode consumes
//! at least one byte and no more than it was given; the decoder only waits for more within
//! one frame's bounds; a stream decodes to the same frames however it is chunked; every
//! decoded frame encodes, for any reply, into well-formed response frames.
//!
//! The normal test run does 3,000 streams; a longer run:
//!   S3CACHED_FUZZ_ITERATIONS=1000000 S3CACHED_FUZZ_SEED=7 cargo test --release --test fuzz_binary
//! A failure names its seed and iteration; rerun with that seed to reproduce.

#[path = "common/binary.rs"]
mod binary_frame;

use binary_frame::frame;
use bytes::{Bytes, BytesMut};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use s3cached::protocol::binary::{self, Decoded, HEADER_BYTES, RESPONSE_MAGIC};
use s3cached::protocol::{
    Limits, MetaFlag, MetaReply, MetaStatus, ProtocolError, Response, MAX_KEY_BYTES,
};

const DEFAULT_ITERATIONS: u64 = 3_000;
const DEFAULT_SEED: u64 = 20_261_126;
const LIMITS: Limits = Limits {
    max_item_bytes: 4096,
    stream_above: usize::MAX,
    max_line_bytes: 2048,
    max_multiget_line_bytes: 8192,
};
/// The most a decoder may hold while waiting: one header, extras, key and item.
const MAX_WAIT_BYTES: usize = HEADER_BYTES + 255 + 65_535 + 4096;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One frame of a random opcode, well formed most of the time.
fn random_frame(rng: &mut StdRng) -> Vec<u8> {
    let op: u8 = if rng.random_bool(0.9) {
        rng.random_range(0..0x25)
    } else {
        rng.random()
    };
    let key_len = match rng.random_range(0..10) {
        0 => 0,
        1 => MAX_KEY_BYTES + rng.random_range(0..3),
        _ => rng.random_range(1..20),
    };
    let key: Vec<u8> = (0..key_len).map(|_| rng.random()).collect();
    let extras_len = match rng.random_range(0..6) {
        0 => 0,
        1 => 4,
        2 => 8,
        3 => 20,
        _ => rng.random_range(0..32),
    };
    let extras: Vec<u8> = (0..extras_len).map(|_| rng.random()).collect();
    let value_len = match rng.random_range(0..10) {
        0 => LIMITS.max_item_bytes + rng.random_range(0..64),
        1..=4 => 0,
        _ => rng.random_range(0..64),
    };
    let value = vec![b'v'; value_len];
    frame(op, &key, &extras, &value, rng.random(), rng.random())
}

/// Damages a stream: flips bytes, skews a body length, splices random bytes, cuts it short.
fn mutate(rng: &mut StdRng, stream: &mut Vec<u8>) {
    for _ in 0..rng.random_range(0..4) {
        if stream.is_empty() {
            return;
        }
        let at = rng.random_range(0..stream.len());
        match rng.random_range(0..4) {
            0 => stream[at] ^= 1 << rng.random_range(0..8),
            1 => stream[at] = rng.random(),
            2 => {
                let junk: Vec<u8> = (0..rng.random_range(1..16)).map(|_| rng.random()).collect();
                stream.splice(at..at, junk);
            }
            _ => stream.truncate(at),
        }
    }
}

/// Decodes a whole buffer as far as it goes, checking each step's bounds.
fn decode_all(input: &[u8], context: &str) -> Vec<(Decoded, usize)> {
    let mut out = Vec::new();
    let mut at = 0;
    let mut skip = 0;
    loop {
        at = (at + skip).min(input.len());
        let rest = &input[at..];
        let Some(d) = binary::decode(rest, &LIMITS, false) else {
            assert!(
                rest.len() < MAX_WAIT_BYTES,
                "{context}: waits on {} bytes",
                rest.len()
            );
            return out;
        };
        assert!(d.consumed > 0, "{context}: consumed nothing");
        assert!(
            d.consumed <= rest.len(),
            "{context}: consumed past the input"
        );
        skip = d.skip;
        at += d.consumed;
        let closes = matches!(
            &d.frame.action,
            binary::Action::Reply(r) if r.close
        ) || matches!(
            &d.frame.action,
            binary::Action::Run(s3cached::protocol::Request::Hangup(_))
        );
        out.push((d, at));
        if closes {
            return out;
        }
    }
}

/// Decodes as a socket would deliver: in random chunks, keeping what is not yet consumed.
fn decode_chunked(rng: &mut StdRng, input: &[u8], context: &str) -> Vec<binary::Frame> {
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    let mut skip = 0usize;
    loop {
        let n = rng.random_range(1..=64).min(input.len() - fed);
        buf.extend_from_slice(&input[fed..fed + n]);
        fed += n;
        loop {
            let drop = skip.min(buf.len());
            let _ = buf.split_to(drop);
            skip -= drop;
            if skip > 0 {
                break;
            }
            let Some(d) = binary::decode(&buf, &LIMITS, false) else {
                break;
            };
            assert!(
                d.consumed > 0 && d.consumed <= buf.len(),
                "{context}: chunked bounds"
            );
            let _ = buf.split_to(d.consumed);
            skip = d.skip;
            let closes = matches!(&d.frame.action, binary::Action::Reply(r) if r.close)
                || matches!(
                    &d.frame.action,
                    binary::Action::Run(s3cached::protocol::Request::Hangup(_))
                );
            frames.push(d.frame);
            if closes {
                return frames;
            }
        }
        if fed == input.len() {
            return frames;
        }
    }
}

fn replies() -> Vec<Response> {
    let meta = |status, flags: Vec<MetaFlag>, value: Option<&'static str>| {
        let mut reply = MetaReply::new(status, flags);
        reply.value = value.map(|v| Bytes::from_static(v.as_bytes()));
        Response::Meta(reply)
    };
    vec![
        meta(
            MetaStatus::Va,
            vec![MetaFlag::ClientFlags(7), MetaFlag::Cas(9)],
            Some("value"),
        ),
        meta(MetaStatus::Hd, vec![MetaFlag::Cas(1)], None),
        meta(MetaStatus::En, vec![], None),
        meta(MetaStatus::Nf, vec![], None),
        meta(MetaStatus::Ns, vec![], None),
        meta(MetaStatus::Ex, vec![], None),
        Response::Ok,
        Response::Version("1.6.18".into()),
        Response::Stats(vec![("pid".into(), "1".into())]),
        Response::Error(ProtocolError::TOO_LARGE),
        Response::Error(ProtocolError::Client(
            "cannot increment or decrement non-numeric value",
        )),
        Response::ServerError("backend unavailable".into()),
        Response::Stored,
        Response::None,
    ]
}

/// Every byte of `out` belongs to a well-formed response frame.
fn check_encoded(out: &[u8], context: &str) {
    let mut rest = out;
    while !rest.is_empty() {
        assert!(
            rest.len() >= HEADER_BYTES,
            "{context}: short response header"
        );
        assert_eq!(rest[0], RESPONSE_MAGIC, "{context}: response magic");
        let key = u16::from_be_bytes([rest[2], rest[3]]) as usize;
        let extras = rest[4] as usize;
        let body = u32::from_be_bytes([rest[8], rest[9], rest[10], rest[11]]) as usize;
        assert!(
            key + extras <= body,
            "{context}: key and extras within the body"
        );
        assert!(rest.len() >= HEADER_BYTES + body, "{context}: body present");
        rest = &rest[HEADER_BYTES + body..];
    }
}

#[test]
fn binary_codec_fuzz() {
    let seed = env_u64("S3CACHED_FUZZ_SEED", DEFAULT_SEED);
    let iterations = env_u64("S3CACHED_FUZZ_ITERATIONS", DEFAULT_ITERATIONS);
    let replies = replies();
    for i in 0..iterations {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_mul(1_000_003).wrapping_add(i));
        let mut stream = Vec::new();
        for _ in 0..rng.random_range(1..6) {
            stream.extend(random_frame(&mut rng));
        }
        if rng.random_bool(0.5) {
            mutate(&mut rng, &mut stream);
        }
        let context = format!("seed {seed} iteration {i}");
        let whole = decode_all(&stream, &context);
        let chunked = decode_chunked(&mut rng, &stream, &context);
        let whole_frames: Vec<_> = whole.iter().map(|(d, _)| d.frame.clone()).collect();
        // A frame answered from its head alone (an oversized value) may be decoded from
        // less input when chunked, so only compare where the whole decode needed no skip.
        if whole.iter().all(|(d, _)| d.skip == 0) {
            assert_eq!(
                whole_frames, chunked,
                "{context}: chunking changed the frames"
            );
        }
        for frame in &whole_frames {
            for reply in &replies {
                let mut out = BytesMut::new();
                binary::encode(frame, reply, &mut out);
                check_encoded(&out, &context);
            }
            if let binary::Action::Reply(r) = &frame.action {
                let mut out = BytesMut::new();
                binary::encode_reply(frame, r, &mut out);
                check_encoded(&out, &context);
            }
        }
    }
}
