//! Criterion benchmark of the protocol alone: parsing requests off a read buffer and encoding replies.
//!
//! Run: `cargo bench --bench parse`. Each parse case measures what the connection does per
//! request: take one frame off the front of its read buffer (a fresh `BytesMut` holding the
//! input, built outside the timing) and drop the parsed request.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use s3cached::protocol::{self, Limits, MetaFlag, MetaReply, MetaStatus, Parsed, Response, Value};

/// Takes the next request off the front of `buf`, as the connection does.
fn take(buf: &mut BytesMut, limits: &Limits) -> Option<Parsed> {
    protocol::parse_resumed(buf, limits, None)
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

fn parse_one(c: &mut Criterion, name: &str, input: &[u8]) {
    let limits = Limits::default();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function(name, |b| {
        b.iter_batched_ref(
            || BytesMut::from(input),
            |buf| {
                let parsed = take(buf, &limits).expect("complete");
                assert!(buf.is_empty());
                black_box(parsed);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn parsing(c: &mut Criterion) {
    parse_one(c, "get", b"get user:1234567890\r\n");
    let keys: Vec<String> = (0..10).map(|i| format!("user:{i:010}")).collect();
    parse_one(
        c,
        "get_10_keys",
        format!("get {}\r\n", keys.join(" ")).as_bytes(),
    );
    let mut set = b"set user:1234567890 0 0 1024\r\n".to_vec();
    set.extend_from_slice(&[b'x'; 1024]);
    set.extend_from_slice(b"\r\n");
    parse_one(c, "set_1k", &set);
    parse_one(c, "mg_flags", b"mg user:1234567890 s v f t c k O1234 q\r\n");

    let input = batch();
    let limits = Limits::default();
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(100));
    group.bench_function("batch_100", |b| {
        b.iter_batched_ref(
            || BytesMut::from(&input[..]),
            |buf| {
                let mut n = 0;
                while let Some(parsed) = take(buf, &limits) {
                    black_box(parsed);
                    n += 1;
                }
                assert_eq!(n, 100);
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn encoding(c: &mut Criterion) {
    let mut group = c.benchmark_group("encode");
    let value = Response::Values {
        values: vec![Value {
            key: Bytes::from_static(b"user:1234567890"),
            flags: 0,
            cas: 123_456,
            data: Bytes::from(vec![b'x'; 1024]),
        }],
        with_cas: true,
        end: true,
    };
    let mut out = BytesMut::with_capacity(4096);
    group.bench_function("value", |b| {
        b.iter(|| {
            out.clear();
            black_box(&value).encode(&mut out);
            black_box(out.len());
        })
    });
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
    group.bench_function("meta", |b| {
        b.iter(|| {
            out.clear();
            black_box(&meta).encode(&mut out);
            black_box(out.len());
        })
    });
    group.finish();
}

criterion_group!(benches, parsing, encoding);
criterion_main!(benches);
