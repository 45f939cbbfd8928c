//! Benchmark of the protocol alone: parsing requests off a read buffer and encoding replies.
//!
//! Wall clock (criterion): `cargo bench --bench parse`.
//!
//! Instructions (callgrind; repeatable on a busy machine, where wall clock is not): build with
//! `cargo bench --bench parse --no-run`, then for each CASE of `get get_10_keys set_1k
//! mg_flags batch_100 encode_value encode_meta`:
//!
//! ```text
//! valgrind --tool=callgrind --callgrind-out-file=cg.out --toggle-collect='parse::measure_*' \
//!     target/release/deps/parse-<hash> --count CASE 10000
//! callgrind_annotate cg.out | grep 'PROGRAM TOTALS'    # divide by 10000
//! ```
//!
//! Only instructions inside `measure_parse` / `measure_encode` are counted (appending the
//! input to the read buffer is not), so the total over 10,000 iterations divided by 10,000
//! is the cost of one iteration. A parse iteration is what the connection does per request:
//! its read buffer, kept from one read to the next, holds the input; the request (all 100
//! for `batch_100`) is taken off its front and dropped. (Criterion's figures include the
//! append.)

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{Criterion, Throughput};
use s3cached::protocol::{self, Limits, MetaFlag, MetaReply, MetaStatus, Parsed, Response, Value};

/// Takes the next request off the front of `buf`, as the connection does.
fn take(buf: &mut BytesMut, limits: &Limits) -> Option<Parsed> {
    protocol::parse_resumed(buf, limits, None)
}

/// Takes `requests` requests off `buf` and drops them: one measured parse iteration.
#[inline(never)]
fn measure_parse(buf: &mut BytesMut, limits: &Limits, requests: usize) {
    for _ in 0..requests {
        black_box(take(buf, limits).expect("complete"));
    }
}

/// Encodes `response` into a cleared `out`: one measured encode iteration.
#[inline(never)]
fn measure_encode(response: &Response, out: &mut BytesMut) {
    out.clear();
    black_box(response).encode(out);
    black_box(out.len());
}

/// A pipelined batch: 100 requests of the kinds clients send most.
fn batch() -> Vec<u8> {
    let mut input = Vec::new();
    let value = vec![b'v'; 100];
    for i in 0..20 {
        input.extend_from_slice(format!("get user:{i:08}\r\n").as_bytes());
        input.extend_from_slice(format!("set user:{i:08} 0 0 100\r\n").as_bytes());
        input.extend_from_slice(&value);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(format!("mg user:{i:08} v f t\r\n").as_bytes());
        input.extend_from_slice(format!("ms user:{i:08} 100 T60\r\n").as_bytes());
        input.extend_from_slice(&value);
        input.extend_from_slice(b"\r\n");
        input.extend_from_slice(format!("delete user:{i:08} noreply\r\n").as_bytes());
    }
    input
}

/// The parse cases: name, input, requests in it.
fn parse_cases() -> Vec<(&'static str, Vec<u8>, usize)> {
    let keys: Vec<String> = (0..10).map(|i| format!("user:{i:010}")).collect();
    let mut set = b"set user:1234567890 0 0 1024\r\n".to_vec();
    set.extend_from_slice(&[b'x'; 1024]);
    set.extend_from_slice(b"\r\n");
    vec![
        ("get", b"get user:1234567890\r\n".to_vec(), 1),
        (
            "get_10_keys",
            format!("get {}\r\n", keys.join(" ")).into_bytes(),
            1,
        ),
        ("set_1k", set, 1),
        (
            "mg_flags",
            b"mg user:1234567890 s v f t c k O1234 q\r\n".to_vec(),
            1,
        ),
        ("batch_100", batch(), 100),
    ]
}

/// The encode cases: a 1 KiB `VALUE` reply with its cas, and a meta hit with flags.
fn encode_cases() -> Vec<(&'static str, Response)> {
    let value = Response::Values {
        values: vec![Value {
            key: Bytes::from_static(b"user:1234567890"),
            flags: 0,
            cas: 123_456,
            data: Bytes::from(vec![b'x'; 1024]),
            stream: None,
        }],
        with_cas: true,
        end: true,
    };
    let meta = Response::Meta(MetaReply {
        value: Some(Bytes::from(vec![b'x'; 100])),
        ..MetaReply::new(
            MetaStatus::Va,
            vec![
                MetaFlag::ClientFlags(0),
                MetaFlag::Ttl(-1),
                MetaFlag::Cas(123_456),
                MetaFlag::Key {
                    key: Bytes::from_static(b"user:1234567890"),
                    base64: false,
                },
            ],
        )
    });
    vec![("encode_value", value), ("encode_meta", meta)]
}

fn parsing(c: &mut Criterion) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("parse");
    for (name, input, requests) in parse_cases() {
        group.throughput(Throughput::Elements(requests as u64));
        let mut buf = BytesMut::with_capacity(input.len());
        group.bench_function(name, |b| {
            b.iter(|| {
                buf.extend_from_slice(&input);
                measure_parse(&mut buf, &limits, requests);
            })
        });
        assert!(buf.is_empty());
    }
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let mut out = BytesMut::with_capacity(4096);
    for (name, response) in encode_cases() {
        let name = name.trim_start_matches("encode_");
        group.bench_function(name, |b| b.iter(|| measure_encode(&response, &mut out)));
    }
    group.finish();
}

/// `--count CASE N`: N iterations of one case and nothing else, for callgrind.
fn count(case: &str, iterations: usize) {
    let limits = Limits::default();
    if let Some((_, input, requests)) = parse_cases().into_iter().find(|c| c.0 == case) {
        let mut buf = BytesMut::with_capacity(input.len());
        for _ in 0..iterations {
            buf.extend_from_slice(&input);
            measure_parse(&mut buf, &limits, requests);
        }
        assert!(buf.is_empty());
        return;
    }
    let (_, response) = encode_cases()
        .into_iter()
        .find(|c| c.0 == case)
        .unwrap_or_else(|| panic!("no case {case}"));
    let mut out = BytesMut::with_capacity(4096);
    for _ in 0..iterations {
        measure_encode(&response, &mut out);
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--count") {
        let case = args.get(at + 1).expect("--count CASE N");
        let n = args.get(at + 2).and_then(|n| n.parse().ok());
        return count(case, n.expect("--count CASE N"));
    }
    let mut criterion = Criterion::default().configure_from_args();
    parsing(&mut criterion);
    encoding(&mut criterion);
    criterion.final_summary();
}
