//! Tests of the binary-protocol codec: frames decoded and replies encoded byte for byte.

use super::*;
use crate::protocol::{MetaFlag, MetaReply};
use proptest::prelude::*;

const LIMITS: Limits = Limits {
    max_item_bytes: 1024,
    stream_above: usize::MAX,
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
fn the_length_of_a_frame_is_known_from_its_header() {
    let set = frame(opcode::SET, b"k", &[0; 8], &[b'v'; 100], 0);
    for cut in [HEADER_BYTES, HEADER_BYTES + 9, set.len() - 1] {
        assert_eq!(awaited_len(&set[..cut], &LIMITS, false), Some(set.len()));
    }
    assert_eq!(awaited_len(&set[..HEADER_BYTES - 1], &LIMITS, false), None);
    // Over the item limit the value is discarded as it comes, never buffered.
    let huge = frame(opcode::SET, b"k", &[0; 8], &[b'v'; 2000], 0);
    assert_eq!(awaited_len(&huge[..HEADER_BYTES], &LIMITS, false), None);
    // Before a login, nothing larger than a login needs.
    let auth = frame(opcode::SASL_AUTH, b"PLAIN", &[], &[b'p'; 5000], 0);
    let head = &auth[..HEADER_BYTES + 5];
    assert_eq!(awaited_len(head, &LIMITS, true), None);
    let refused = decode(head, &LIMITS, true).expect("refused from its header");
    assert_eq!(refused.frame.action, Reply::error(Status::Invalid, true));
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
    let Action::Run(Request::Meta(MetaRequest::Set { key, data, flags })) = d.frame.action else {
        panic!("not a set: {:?}", d.frame.action)
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
    let Action::Run(Request::Meta(MetaRequest::Arith { flags, .. })) = d.frame.action else {
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
            stream: None,
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
    let reply = |bytes: &[u8]| match decoded(bytes).frame.action {
        Action::Reply(r) => (r.status, r.close),
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
        d.frame.action,
        Action::Reply(Reply {
            status: Status::AuthError,
            close: true,
            ..
        })
    ));
    let version = frame(opcode::VERSION, b"", &[], b"", 0);
    assert!(matches!(
        decode(&version, &LIMITS, true).unwrap().frame.action,
        Action::Run(Request::Version)
    ));
}

#[test]
fn an_oversized_value_is_answered_from_the_head_and_skipped() {
    let value = vec![b'x'; 2000];
    let whole = frame(opcode::SET, b"k", &[0; 8], &value, 0);
    let d = decode(&whole[..100], &LIMITS, false).expect("answered before the value arrives");
    assert_eq!(d.consumed + d.skip, whole.len());
    assert!(matches!(
        d.frame.action,
        Action::Run(Request::TooLarge {
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
        let Action::Run(Request::Meta(MetaRequest::Set { data, flags: f, .. })) = d.frame.action else {
            return Err(TestCaseError::fail("not a set"));
        };
        prop_assert_eq!(&data[..], &value[..]);
        prop_assert_eq!(f.client_flags, Some(flags));
        let next = decode(&stream[first..], &LIMITS, false).unwrap();
        let is_get = matches!(next.frame.action, Action::Run(Request::Meta(MetaRequest::Get { .. })));
        prop_assert!(is_get, "not a get");
    }
}
