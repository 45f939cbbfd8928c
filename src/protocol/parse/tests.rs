//! Tests of the classic text parser, beside it: transcripts of bytes to requests, and
//! property tests over random streams.

use super::*;
use proptest::prelude::*;

fn p(input: &[u8]) -> Option<Parsed> {
    parse(input, &Limits::default())
}

fn req(input: &[u8]) -> Request {
    p(input).expect("complete").request
}

#[test]
fn incomplete_until_newline() {
    assert_eq!(p(b"get foo"), None);
    assert_eq!(p(b"set foo 0 0 3\r\nab"), None);
    assert_eq!(p(b"set foo 0 0 3\r\nabc\r"), None);
    assert_eq!(p(b""), None);
}

#[test]
fn get_and_gets() {
    let parsed = p(b"get a b\r\nrest").unwrap();
    assert_eq!(parsed.consumed, 9);
    assert_eq!(
        parsed.request,
        Request::Get {
            keys: vec![Bytes::from("a"), Bytes::from("b")],
            cas: false,
            end: true
        }
    );
    assert_eq!(
        req(b"  gets   k  \n"),
        Request::Get {
            keys: vec![Bytes::from("k")],
            cas: true,
            end: true
        }
    );
    assert_eq!(
        req(b"get\r\n"),
        Request::Invalid(ProtocolError::UnknownCommand)
    );
}

#[test]
fn gat_needs_numeric_exptime() {
    assert_eq!(
        req(b"gat abc k\r\n"),
        Request::Invalid(ProtocolError::Client("invalid exptime argument"))
    );
    assert_eq!(
        req(b"gats 10 k\r\n"),
        Request::Gat {
            exptime: 10,
            keys: vec![Bytes::from("k")],
            cas: true,
            end: true
        }
    );
}

#[test]
fn set_with_data() {
    let parsed = p(b"set k 5 -1 3 noreply\r\nabc\r\n").unwrap();
    assert_eq!(parsed.consumed, 27);
    assert_eq!(
        parsed.request,
        Request::Store {
            mode: StoreMode::Set,
            key: Bytes::from("k"),
            flags: 5,
            exptime: -1,
            data: Bytes::from("abc"),
            cas_unique: 0,
            noreply: true
        }
    );
}

#[test]
fn cas_takes_unique() {
    match req(b"cas k 0 0 1 99\r\nx\r\n") {
        Request::Store {
            mode, cas_unique, ..
        } => {
            assert_eq!(mode, StoreMode::Cas);
            assert_eq!(cas_unique, 99);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        req(b"cas k 0 0 1\r\n"),
        Request::Invalid(ProtocolError::UnknownCommand)
    );
}

#[test]
fn bad_data_chunk_consumes_declared_length() {
    let parsed = p(b"set k 0 0 1\r\nab\r\n").unwrap();
    assert_eq!(
        parsed.request,
        Request::Invalid(ProtocolError::BAD_DATA_CHUNK)
    );
    assert_eq!(parsed.consumed, 13 + 3);
}

#[test]
fn too_large_is_skipped() {
    let limits = Limits {
        max_item_bytes: 10,
        ..Limits::default()
    };
    let parsed = parse(b"set k 0 0 11\r\n", &limits).unwrap();
    assert_eq!(parsed.skip, Skip::Bytes(13));
    assert!(matches!(
        parsed.request,
        Request::TooLarge {
            remove_old: true,
            ..
        }
    ));
}

#[test]
fn a_set_longer_than_stream_above_streams_and_other_storage_commands_are_refused() {
    let limits = Limits {
        max_item_bytes: 100,
        stream_above: 10,
        ..Limits::default()
    };
    let set = parse(b"set k 3 0 11 noreply\r\nfirst bytes", &limits).unwrap();
    assert_eq!(set.skip, Skip::Stream(13));
    assert_eq!(set.consumed, 22, "the line alone is taken");
    assert!(matches!(
        set.request,
        Request::StoreStreamed {
            flags: 3,
            len: 11,
            noreply: true,
            ..
        }
    ));
    for refused in [
        &b"add k 0 0 11\r\n"[..],
        b"append k 0 0 11\r\n",
        b"cas k 0 0 11 1\r\n",
    ] {
        let parsed = parse(refused, &limits).unwrap();
        assert_eq!(parsed.skip, Skip::Bytes(13));
        assert!(matches!(
            parsed.request,
            Request::TooLarge {
                remove_old: false,
                ..
            }
        ));
    }
    // Over the item limit, a set is refused too.
    let over = parse(b"set k 0 0 101\r\n", &limits).unwrap();
    assert!(matches!(
        over.request,
        Request::TooLarge {
            remove_old: true,
            ..
        }
    ));
    // A block held whole is awaited whole; a streamed one is not.
    assert_eq!(awaited_len(b"set k 0 0 10\r\n", &limits), Some(26));
    assert_eq!(awaited_len(b"set k 0 0 11\r\n", &limits), None);
    let ms = parse(b"ms k 11\r\n", &limits).unwrap();
    assert!(matches!(ms.request, Request::TooLarge { .. }));
}

#[test]
fn bad_lines() {
    let bad = Request::Invalid(ProtocolError::BAD_FORMAT);
    assert_eq!(req(b"set k -1 0 1\r\n"), bad);
    assert_eq!(req(b"set k 0 0 -1\r\n"), bad);
    assert_eq!(req(b"set k 4294967296 0 1\r\n"), bad);
    assert_eq!(
        req(b"set k 0 0\r\n"),
        Request::Invalid(ProtocolError::UnknownCommand)
    );
    let long_key = format!("get {}\r\n", "a".repeat(251));
    assert_eq!(req(long_key.as_bytes()), bad);
    assert_eq!(
        req(b"\r\n"),
        Request::Invalid(ProtocolError::UnknownCommand)
    );
    assert_eq!(
        req(b"bogus\r\n"),
        Request::Invalid(ProtocolError::UnknownCommand)
    );
    assert_eq!(
        req(b"incr k x\r\n"),
        Request::Invalid(ProtocolError::Client("invalid numeric delta argument"))
    );
}

#[test]
fn delete_forms() {
    assert!(matches!(
        req(b"delete k 0\r\n"),
        Request::Delete { noreply: false, .. }
    ));
    assert!(matches!(
        req(b"delete k noreply\r\n"),
        Request::Delete { noreply: true, .. }
    ));
    assert!(matches!(
        req(b"delete k 1\r\n"),
        Request::Invalid(ProtocolError::Client(_))
    ));
}

#[test]
fn over_long_line_is_refused_and_skipped() {
    let limits = Limits::default();
    let junk = vec![b'x'; limits.max_line_bytes + 1];
    let parsed = parse(&junk, &limits).unwrap();
    assert_eq!(parsed.skip, Skip::Line);
    assert_eq!(parsed.consumed, junk.len());
    // A long multi-get is fine.
    let mut line = b"get".to_vec();
    for i in 0..500 {
        line.extend_from_slice(format!(" key{i:0>100}").as_bytes());
    }
    line.extend_from_slice(b"\r\n");
    assert!(matches!(
        parse(&line, &limits).unwrap().request,
        Request::Get { .. }
    ));
}

#[test]
fn numbers_read_as_memcached_reads_them() {
    // safe_strtol into an int32_t: truncated, overflow refused.
    assert_eq!(parse_i32(b"4294967295"), Some(-1));
    assert_eq!(parse_i32(b"4294967296"), Some(0));
    assert_eq!(parse_i32(b"2147483648"), Some(-2_147_483_648));
    assert_eq!(parse_i32(b"-2147483649"), Some(2_147_483_647));
    assert_eq!(parse_i32(b"18446744073710"), Some(-140_462_610));
    assert_eq!(parse_i32(b"99999999999999999999"), None);
    assert_eq!(parse_i32(b"+5"), Some(5));
    assert_eq!(parse_i32(b"5x"), None);
    assert_eq!(parse_i32(b""), None);
    // safe_strtoull: "-N" is refused unless it wraps to a small value.
    assert_eq!(parse_u64(b"18446744073709551615"), Some(u64::MAX));
    assert_eq!(parse_u64(b"18446744073709551616"), None);
    assert_eq!(parse_u64(b"-1"), None);
    assert_eq!(parse_u64(b"-0"), Some(0));
    // Lengths: 0..=INT_MAX-2 after the 32-bit reading.
    assert_eq!(parse_length(b"4294967295"), None);
    assert_eq!(parse_length(b"2147483646"), None);
    assert_eq!(parse_length(b"4294967296"), Some(0));
    assert_eq!(
        req(b"set k 0 4294967295 1\r\na\r\n"),
        Request::Store {
            mode: StoreMode::Set,
            key: Bytes::from("k"),
            flags: 0,
            exptime: -1,
            data: Bytes::from("a"),
            cas_unique: 0,
            noreply: false
        }
    );
    let refused = p(b"set k 0 0 4294967295\r\nget k\r\n").unwrap();
    assert_eq!(refused.request, Request::Invalid(ProtocolError::BAD_FORMAT));
    assert_eq!((refused.consumed, refused.skip), (22, Skip::None));
    assert_eq!(req(b"set k 0 0 -1 noreply\r\n"), Request::Silent);
    assert_eq!(req(b"delete k 10 noreply\r\n"), Request::Silent);
    assert!(matches!(
        req(b"delete noreply\r\n"),
        Request::Delete { noreply: false, .. }
    ));
}

#[test]
fn long_retrievals_come_in_pieces() {
    let limits = Limits {
        max_multiget_line_bytes: 64,
        ..Limits::default()
    };
    let mut line = b"gets".to_vec();
    for i in 0..40 {
        line.extend_from_slice(format!(" key{i}").as_bytes());
    }
    line.extend_from_slice(b"\r\nversion\r\n");
    let mut rest = BytesMut::from(&line[..]);
    let mut resume = None;
    let mut keys = Vec::new();
    let mut ends = 0;
    while keys.len() < 40 {
        let before = rest.len();
        let parsed = parse_resumed(&mut rest, &limits, resume).expect("complete");
        assert!(parsed.consumed > 0 && parsed.consumed <= 64);
        assert_eq!(before - rest.len(), parsed.consumed);
        let Request::Get { keys: k, cas, end } = parsed.request else {
            panic!("{:?}", parsed.request)
        };
        assert!(cas);
        assert_eq!(end, parsed.resume.is_none());
        ends += usize::from(end);
        keys.extend(k);
        resume = parsed.resume;
    }
    assert_eq!(ends, 1);
    assert_eq!(keys[39], Bytes::from("key39"));
    assert_eq!(
        parse_resumed(&mut rest, &limits, None).unwrap().request,
        Request::Version
    );
    // A gat keeps its exptime across pieces; a bad key ends the line with an error.
    let mut gat = b"gat 100".to_vec();
    for i in 0..20 {
        gat.extend_from_slice(format!(" key{i}").as_bytes());
    }
    let first = parse(&gat, &limits).unwrap();
    assert_eq!(
        first.resume,
        Some(LongRetrieval {
            cas: false,
            exptime: Some(100)
        })
    );
    let bad = [&[b'y'; 70][..], b" k\r\n"].concat();
    let refused = parse_resumed(&mut BytesMut::from(&bad[..]), &limits, first.resume).unwrap();
    assert_eq!(refused.request, Request::Invalid(ProtocolError::BAD_FORMAT));
    assert_eq!(refused.skip, Skip::Line);
}

#[test]
fn refused_line_leaves_what_follows() {
    let limits = Limits::default();
    let mut junk = vec![b'x'; 300_000];
    junk.extend_from_slice(b"\r\nversion\r\n");
    let parsed = parse(&junk, &limits).unwrap();
    assert_eq!(parsed.skip, Skip::Line);
    assert!(
        parsed.consumed < 300_000,
        "the newline and what follows stay"
    );
}

#[test]
fn keys_and_values_are_slices_of_the_buffer() {
    let mut buf = BytesMut::from(&b"get a bb\r\nset k 0 0 3\r\nabc\r\nms m 2 Oxy\r\nhi\r\n"[..]);
    let whole = buf.as_ptr() as usize..buf.as_ptr() as usize + buf.len();
    let inside = |b: &Bytes| whole.contains(&(b.as_ptr() as usize));
    let limits = Limits::default();
    let Request::Get { keys, .. } = parse_resumed(&mut buf, &limits, None).unwrap().request else {
        panic!()
    };
    assert!(keys.iter().all(inside));
    let Request::Store { key, data, .. } = parse_resumed(&mut buf, &limits, None).unwrap().request
    else {
        panic!()
    };
    assert!(inside(&key) && inside(&data));
    assert_eq!(&data[..], b"abc");
    let Request::Meta(crate::protocol::MetaRequest::Set { key, data, flags }) =
        parse_resumed(&mut buf, &limits, None).unwrap().request
    else {
        panic!()
    };
    assert!(inside(&key) && inside(&data) && inside(flags.opaque.as_ref().unwrap()));
    assert!(buf.is_empty());
}

#[test]
fn incomplete_data_leaves_the_buffer_alone() {
    let mut buf = BytesMut::from(&b"set k 0 0 5\r\nabc"[..]);
    assert_eq!(parse_resumed(&mut buf, &Limits::default(), None), None);
    assert_eq!(&buf[..], b"set k 0 0 5\r\nabc");
    assert_eq!(line_end(b"ab\ncd"), Some(3));
    assert_eq!(line_end(b"abcd"), None);
}

#[test]
fn binary_magic_hangs_up() {
    assert!(matches!(req(&[0x80, 0x00, 0x00]), Request::Hangup(_)));
}

#[test]
fn the_length_of_a_request_with_data_is_known_from_its_line() {
    let limits = Limits::default();
    let line = |l: &str| l.len();
    let set = "set k 0 0 100\r\n";
    assert_eq!(
        awaited_len(format!("{set}abc").as_bytes(), &limits),
        Some(line(set) + 102)
    );
    let cas = "cas k 0 0 5 7 noreply\r\n";
    assert_eq!(awaited_len(cas.as_bytes(), &limits), Some(line(cas) + 7));
    let ms = "ms k 10 T0\r\n";
    assert_eq!(awaited_len(ms.as_bytes(), &limits), Some(line(ms) + 12));
    // No line end yet, no data block, a bad line, or over the item limit: not known.
    assert_eq!(awaited_len(b"set k 0 0 100", &limits), None);
    assert_eq!(awaited_len(b"get k\r\n", &limits), None);
    assert_eq!(awaited_len(b"set k x 0 100\r\n", &limits), None);
    let huge = format!("set k 0 0 {}\r\n", limits.max_item_bytes + 1);
    assert_eq!(awaited_len(huge.as_bytes(), &limits), None);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn never_panics_and_stays_in_bounds(input in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let limits = Limits { max_item_bytes: 1024, stream_above: usize::MAX, max_line_bytes: 256, max_multiget_line_bytes: 1024 };
        let mut buf = BytesMut::from(&input[..]);
        if let Some(parsed) = parse_resumed(&mut buf, &limits, None) {
            prop_assert!(parsed.consumed > 0);
            prop_assert!(parsed.consumed <= input.len());
            // Exactly the frame is taken off the buffer.
            prop_assert_eq!(input.len() - buf.len(), parsed.consumed);
            prop_assert_eq!(Some(parsed), parse(&input, &limits));
        } else {
            prop_assert_eq!(buf.len(), input.len());
            // Holding on for more is only allowed while within the frame bound.
            prop_assert!(input.len() <= limits.max_frame_bytes());
        }
    }

    #[test]
    fn commandlike_input_never_panics(
        cmd in prop::sample::select(vec!["get", "gets", "gat", "set", "cas", "incr", "delete", "touch", "flush_all", "mg", "ms", "md", "ma", "me", "mn", "verbosity", "stats"]),
        args in proptest::collection::vec("[ -~]{0,12}", 0..8),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut input = format!("{cmd} {}\r\n", args.join(" ")).into_bytes();
        input.extend_from_slice(&tail);
        let limits = Limits { max_item_bytes: 1024, stream_above: usize::MAX, max_line_bytes: 256, max_multiget_line_bytes: 1024 };
        if let Some(parsed) = parse(&input, &limits) {
            prop_assert!(parsed.consumed > 0 && parsed.consumed <= input.len());
        }
    }
}
