//! One test per encoding and decoding error, built by corrupting real frames.

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use super::geometry::tests::test_geometry;
use super::*;

fn limits() -> Limits {
    Limits::from_geometry(&test_geometry()).unwrap()
}

fn decoder() -> FrameDecoder {
    FrameDecoder::new(limits(), PROTOCOL_VERSION)
}

fn unit(kind: UnitKind, index: u64, data: &[u8], c: Compression) -> (Vec<u8>, EncodedUnit) {
    let mut out = vec![0; encode_buffer_len(data.len(), c)];
    let e = encode_unit(&mut out, kind, index, data, c).unwrap();
    out.truncate(e.len);
    (out, e)
}

/// Text-like data that LZ4 compresses well.
fn text(len: usize) -> Vec<u8> {
    b"the quick brown fox jumps over the lazy dog; "
        .iter()
        .copied()
        .cycle()
        .take(len)
        .collect()
}

/// Pseudo-random data that LZ4 cannot compress.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn header_of(frame: &[u8]) -> Header {
    Header::read_from_prefix(frame).unwrap().0
}

/// Rewrites the header with `f`, keeps the payload, and recomputes a valid CRC.
fn patched(frame: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    with_payload(frame, &frame[HEADER_LEN..], f)
}

/// Replaces the payload (fixing `payload_len`), applies `f`, recomputes the CRC.
fn with_payload(frame: &[u8], payload: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = header_of(frame);
    h.payload_len = U32::new(payload.len() as u32);
    f(&mut h);
    h.seal(payload);
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(payload);
    out
}

/// Rewrites the header with `f` without fixing the CRC.
fn raw_patched(frame: &[u8], f: impl FnOnce(&mut Header)) -> Vec<u8> {
    let mut h = header_of(frame);
    f(&mut h);
    let mut out = h.as_bytes().to_vec();
    out.extend_from_slice(&frame[HEADER_LEN..]);
    out
}

fn err(frame: &[u8]) -> DecodeError {
    decoder().decode(frame).unwrap_err()
}

fn unit_payload(frame: &[u8]) -> UnitPayload<'_> {
    match decoder().decode(frame).unwrap() {
        Decoded::Frame {
            frame: FrameRef::Unit { payload, .. },
            ..
        } => payload,
        other => panic!("{other:?}"),
    }
}

fn goodbye() -> Vec<u8> {
    Frame::Goodbye.encode_to_vec().unwrap()
}

fn control(code: ControlCode) -> Vec<u8> {
    Frame::Control(code).encode_to_vec().unwrap()
}

// --- encoding ---------------------------------------------------------------

#[test]
fn encode_chooses_zero_lz4_raw() {
    let (f, e) = unit(UnitKind::Page, 1, &[0; 4096], Compression::Lz4);
    assert_eq!(
        (e.encoding, e.payload_len, e.len, f.len()),
        (Encoding::Zero, 0, 32, 32)
    );
    assert_eq!(header_of(&f).flags, FLAG_ZERO);

    let (f, e) = unit(UnitKind::Page, 2, &text(4096), Compression::Lz4);
    assert_eq!(e.encoding, Encoding::Lz4);
    assert!(e.payload_len < 4096 && e.len == HEADER_LEN + e.payload_len);
    assert_eq!(header_of(&f).unit_len.get(), 4096);

    let (_, e) = unit(UnitKind::Page, 3, &noise(4096, 1), Compression::Lz4);
    assert_eq!((e.encoding, e.payload_len), (Encoding::Raw, 4096));

    let (f, e) = unit(UnitKind::Page, 4, &text(4096), Compression::None);
    assert_eq!((e.encoding, e.len), (Encoding::Raw, max_frame_len(4096)));
    assert_eq!(&f[HEADER_LEN..], text(4096).as_slice());

    let (_, e) = unit(UnitKind::Chunk, 0, &[0; 1], Compression::None);
    assert_eq!(e.encoding, Encoding::Zero);
}

#[test]
fn encode_errors() {
    let mut out = vec![0; 1 << 16];
    assert_eq!(
        encode_unit(&mut out, UnitKind::Control, 0, &[1; 8], Compression::None),
        Err(EncodeError::WrongKind {
            frame_type: FrameType::Unit,
            kind: UnitKind::Control
        })
    );
    assert_eq!(
        encode_unit(&mut out, UnitKind::Chunk, 0, &[], Compression::None),
        Err(EncodeError::EmptyUnit {
            kind: UnitKind::Chunk
        })
    );
    let huge = vec![0; MAX_PAYLOAD as usize + 1];
    assert_eq!(
        encode_unit(&mut out, UnitKind::Chunk, 0, &huge, Compression::None),
        Err(EncodeError::UnitTooLarge {
            kind: UnitKind::Chunk,
            len: huge.len(),
            max: MAX_PAYLOAD
        })
    );
    // LZ4 needs its worst-case scratch even when the result would be raw.
    let mut small = vec![0; max_frame_len(4096)];
    assert_eq!(
        encode_unit(&mut small, UnitKind::Page, 0, &[1; 4096], Compression::Lz4),
        Err(EncodeError::BufferTooSmall {
            needed: encode_buffer_len(4096, Compression::Lz4),
            got: max_frame_len(4096)
        })
    );
    assert!(encode_unit(&mut small, UnitKind::Page, 0, &[1; 4096], Compression::None).is_ok());
    assert_eq!(
        encode_request(&mut out, UnitKind::DeviceState, 0, 1),
        Err(EncodeError::WrongKind {
            frame_type: FrameType::Request,
            kind: UnitKind::DeviceState
        })
    );
    for count in [0, MAX_REQUEST_UNITS + 1] {
        assert_eq!(
            encode_request(&mut out, UnitKind::Page, 0, count),
            Err(EncodeError::RequestCount {
                count,
                max: MAX_REQUEST_UNITS
            })
        );
    }
    let mut tiny = [0; 48];
    assert_eq!(
        encode_control(&mut tiny[..40], ControlCode::Freeze),
        Err(EncodeError::BufferTooSmall {
            needed: 52,
            got: 40
        })
    );
    assert_eq!(
        encode_goodbye(&mut tiny[..31]),
        Err(EncodeError::BufferTooSmall {
            needed: 32,
            got: 31
        })
    );
    let ping = PingMsg {
        nonce: 1,
        sent_ns: 2,
    };
    assert!(encode_ping(&mut tiny[..47], ping).is_err());
    assert_eq!(encode_pong(&mut tiny, ping), Ok(48));
}

#[test]
fn is_zero_sees_every_byte() {
    for len in [0, 1, 15, 16, 63, 64, 65, 200, 4096] {
        assert!(is_zero(&vec![0; len]));
        for pos in 0..len {
            let mut v = vec![0; len];
            v[pos] = 0x80;
            assert!(!is_zero(&v), "len {len} pos {pos}");
        }
    }
}

#[test]
fn need_more_until_complete() {
    let (f, _) = unit(UnitKind::Page, 9, &noise(4096, 3), Compression::Lz4);
    let d = decoder();
    for cut in 0..HEADER_LEN {
        assert_eq!(
            d.decode(&f[..cut]),
            Ok(Decoded::NeedMore {
                at_least: HEADER_LEN
            })
        );
    }
    for cut in [HEADER_LEN, 100, f.len() - 1] {
        assert_eq!(
            d.decode(&f[..cut]),
            Ok(Decoded::NeedMore { at_least: f.len() })
        );
    }
    // Trailing bytes of the next frame are left alone.
    let mut two = f.clone();
    two.extend_from_slice(&goodbye());
    match d.decode(&two).unwrap() {
        Decoded::Frame { consumed, .. } => assert_eq!(consumed, f.len()),
        other => panic!("{other:?}"),
    }
    assert_eq!(d.max_frame_len(), HEADER_LEN + (1 << 20));
    assert_eq!(
        FrameDecoder::handshake().max_frame_len(),
        HEADER_LEN + HELLO_LEN
    );
}

// --- one test per DecodeError variant --------------------------------------

#[test]
fn bad_magic() {
    let mut f = goodbye();
    f[0] = b'X';
    assert_eq!(err(&f), DecodeError::BadMagic { got: *b"XMIG" });
    // Detected from the header alone.
    assert_eq!(
        decoder().decode(&f[..HEADER_LEN]),
        Err(DecodeError::BadMagic { got: *b"XMIG" })
    );
}

#[test]
fn unsupported_version() {
    let f = patched(&goodbye(), |h| h.version = U16::new(2));
    assert_eq!(
        err(&f),
        DecodeError::UnsupportedVersion {
            got: 2,
            expected: PROTOCOL_VERSION
        }
    );
    let hello = Frame::Accept.encode_to_vec().unwrap();
    let hello = patched(&hello, |h| h.version = U16::new(0));
    assert_eq!(
        FrameDecoder::handshake().decode(&hello),
        Err(DecodeError::UnsupportedVersion {
            got: 0,
            expected: HANDSHAKE_VERSION
        })
    );
    // A decoder built for another version refuses version-1 frames.
    assert_eq!(
        FrameDecoder::new(limits(), 2).decode(&goodbye()),
        Err(DecodeError::UnsupportedVersion {
            got: 1,
            expected: 2
        })
    );
}

#[test]
fn unknown_frame_type() {
    for t in [0u8, 6, 0x12, 0x23, 0xff] {
        let f = patched(&goodbye(), |h| h.frame_type = t);
        assert_eq!(err(&f), DecodeError::UnknownFrameType { got: t });
    }
}

#[test]
fn unexpected_frame_in_each_phase() {
    let accept = Frame::Accept.encode_to_vec().unwrap();
    assert_eq!(
        err(&accept),
        DecodeError::UnexpectedFrame {
            frame_type: FrameType::Accept,
            during_handshake: false
        }
    );
    let (u, _) = unit(UnitKind::Page, 0, &[1; 4096], Compression::None);
    assert_eq!(
        FrameDecoder::handshake().decode(&u[..HEADER_LEN]),
        Err(DecodeError::UnexpectedFrame {
            frame_type: FrameType::Unit,
            during_handshake: true
        })
    );
}

#[test]
fn unknown_flags() {
    for flags in [4u8, 0x80, 0xff] {
        let f = patched(&goodbye(), |h| h.flags = flags);
        assert_eq!(err(&f), DecodeError::UnknownFlags { flags });
    }
}

#[test]
fn reserved_not_zero() {
    for i in 0..3 {
        let mut reserved = [0; 3];
        reserved[i] = 1;
        let f = patched(&goodbye(), |h| h.reserved = reserved);
        assert_eq!(err(&f), DecodeError::ReservedNotZero { reserved });
    }
}

#[test]
fn unknown_unit_kind() {
    for kind in [0u8, 5, 0xff] {
        let f = patched(&goodbye(), |h| h.unit_kind = kind);
        assert_eq!(err(&f), DecodeError::UnknownUnitKind { got: kind });
    }
}

#[test]
fn kind_mismatch() {
    let (u, _) = unit(UnitKind::Page, 0, &noise(4096, 9), Compression::None);
    let f = patched(&u, |h| h.unit_kind = UnitKind::Control as u8);
    assert_eq!(
        err(&f),
        DecodeError::KindMismatch {
            frame_type: FrameType::Unit,
            kind: UnitKind::Control
        }
    );
    let req = Frame::Request {
        kind: UnitKind::Page,
        index: 0,
        count: 1,
    }
    .encode_to_vec()
    .unwrap();
    let f = patched(&req, |h| h.unit_kind = UnitKind::DeviceState as u8);
    assert_eq!(
        err(&f),
        DecodeError::KindMismatch {
            frame_type: FrameType::Request,
            kind: UnitKind::DeviceState
        }
    );
    let f = patched(&control(ControlCode::Freeze), |h| {
        h.unit_kind = UnitKind::Page as u8
    });
    assert_eq!(
        err(&f),
        DecodeError::KindMismatch {
            frame_type: FrameType::Control,
            kind: UnitKind::Page
        }
    );
}

#[test]
fn flags_mismatch() {
    let (raw, _) = unit(UnitKind::Page, 0, &noise(4096, 5), Compression::None);
    // ZERO with a payload.
    let f = patched(&raw, |h| h.flags = FLAG_ZERO);
    assert_eq!(
        err(&f),
        DecodeError::FlagsMismatch {
            frame_type: FrameType::Unit,
            flags: FLAG_ZERO,
            payload_len: 4096
        }
    );
    // LZ4 and ZERO together.
    let f = patched(&raw, |h| h.flags = FLAG_LZ4 | FLAG_ZERO);
    assert_eq!(
        err(&f),
        DecodeError::FlagsMismatch {
            frame_type: FrameType::Unit,
            flags: FLAG_LZ4 | FLAG_ZERO,
            payload_len: 4096
        }
    );
    // A raw or LZ4 unit with an empty payload.
    for flags in [0, FLAG_LZ4] {
        let f = with_payload(&raw, &[], |h| h.flags = flags);
        assert_eq!(
            err(&f),
            DecodeError::FlagsMismatch {
                frame_type: FrameType::Unit,
                flags,
                payload_len: 0
            }
        );
    }
    // Flags on a non-unit frame.
    let f = patched(&goodbye(), |h| h.flags = FLAG_LZ4);
    assert_eq!(
        err(&f),
        DecodeError::FlagsMismatch {
            frame_type: FrameType::Goodbye,
            flags: FLAG_LZ4,
            payload_len: 0
        }
    );
}

#[test]
fn payload_too_long_is_refused_from_the_header() {
    let (raw, _) = unit(UnitKind::Chunk, 0, &noise(4096, 5), Compression::None);
    let limit = limits().max_payload();
    for len in [limit + 1, MAX_PAYLOAD, u32::MAX] {
        let f = raw_patched(&raw, |h| h.payload_len = U32::new(len));
        // Only the 32 header bytes are given: no payload is ever asked for.
        assert_eq!(
            decoder().decode(&f[..HEADER_LEN]),
            Err(DecodeError::PayloadTooLong {
                frame_type: FrameType::Unit,
                payload_len: len,
                limit
            })
        );
    }
    // At the limit the decoder asks for the payload (and no more).
    let f = raw_patched(&raw, |h| h.payload_len = U32::new(limit));
    assert_eq!(
        decoder().decode(&f[..HEADER_LEN]),
        Ok(Decoded::NeedMore {
            at_least: HEADER_LEN + limit as usize
        })
    );
}

#[test]
fn bad_payload_length_for_fixed_frames() {
    let c = control(ControlCode::Freeze);
    let mut longer = c[HEADER_LEN..].to_vec();
    longer.push(0);
    let f = with_payload(&c, &longer, |_| {});
    assert_eq!(
        err(&f[..HEADER_LEN]),
        DecodeError::BadPayloadLength {
            frame_type: FrameType::Control,
            payload_len: 21,
            expected: 20
        }
    );
    let f = with_payload(&goodbye(), &[0; 4], |_| {});
    assert_eq!(
        err(&f),
        DecodeError::BadPayloadLength {
            frame_type: FrameType::Goodbye,
            payload_len: 4,
            expected: 0
        }
    );
    let hello = raw_patched(&Frame::Accept.encode_to_vec().unwrap(), |h| {
        h.frame_type = FrameType::Hello as u8;
        h.payload_len = U32::new(1 << 30);
    });
    assert_eq!(
        FrameDecoder::handshake().decode(&hello),
        Err(DecodeError::BadPayloadLength {
            frame_type: FrameType::Hello,
            payload_len: 1 << 30,
            expected: HELLO_LEN as u32
        })
    );
}

#[test]
fn crc_mismatch() {
    let (f, _) = unit(UnitKind::Page, 5, &text(4096), Compression::Lz4);
    let expected = header_of(&f).crc32.get();
    // One payload bit.
    let mut bad = f.clone();
    bad[HEADER_LEN + 3] ^= 0x10;
    let actual = header_of(&bad).compute_crc(&bad[HEADER_LEN..]);
    assert_ne!(actual, expected);
    assert_eq!(err(&bad), DecodeError::CrcMismatch { expected, actual });
    // One header bit (the index: covered by the CRC too).
    let bad = raw_patched(&f, |h| h.unit_index = U64::new(4));
    let actual = header_of(&bad).compute_crc(&bad[HEADER_LEN..]);
    assert_eq!(err(&bad), DecodeError::CrcMismatch { expected, actual });
    // The CRC field itself.
    let bad = raw_patched(&f, |h| h.crc32 = U32::new(expected ^ 1));
    assert_eq!(
        err(&bad),
        DecodeError::CrcMismatch {
            expected: expected ^ 1,
            actual: expected
        }
    );
}

#[test]
fn index_out_of_range() {
    let l = limits();
    for (kind, len) in [
        (UnitKind::Page, 4096),
        (UnitKind::Chunk, 100),
        (UnitKind::DeviceState, 100),
    ] {
        let limit = l.index_limit(kind);
        let (ok, _) = unit(kind, limit - 1, &noise(len, 2), Compression::None);
        assert!(decoder().decode(&ok).is_ok(), "{kind:?}");
        for index in [limit, limit + 1, u64::MAX] {
            let (f, _) = unit(kind, index, &noise(len, 2), Compression::None);
            assert_eq!(err(&f), DecodeError::IndexOutOfRange { kind, index, limit });
        }
    }
    let req = Frame::Request {
        kind: UnitKind::Chunk,
        index: 4096,
        count: 1,
    }
    .encode_to_vec()
    .unwrap();
    assert_eq!(
        err(&req),
        DecodeError::IndexOutOfRange {
            kind: UnitKind::Chunk,
            index: 4096,
            limit: 4096
        }
    );
}

#[test]
fn bad_unit_length() {
    // A page that is not page_size bytes.
    let (f, _) = unit(UnitKind::Page, 1, &noise(4095, 1), Compression::None);
    assert_eq!(
        err(&f),
        DecodeError::BadUnitLength {
            kind: UnitKind::Page,
            index: 1,
            unit_len: 4095,
            min: 4096,
            max: 4096
        }
    );
    // A chunk above chunk_size.
    let (f, _) = unit(UnitKind::Chunk, 2, &noise(65537, 1), Compression::None);
    assert_eq!(
        err(&f),
        DecodeError::BadUnitLength {
            kind: UnitKind::Chunk,
            index: 2,
            unit_len: 65537,
            min: 1,
            max: 65536
        }
    );
    // A zero unit claiming length 0.
    let (z, _) = unit(UnitKind::Chunk, 2, &[0; 10], Compression::None);
    let f = patched(&z, |h| h.unit_len = U32::new(0));
    assert_eq!(
        err(&f),
        DecodeError::BadUnitLength {
            kind: UnitKind::Chunk,
            index: 2,
            unit_len: 0,
            min: 1,
            max: 65536
        }
    );
    // The last device-state piece may not reach past device_state_max
    // (3 MiB + 12345 bytes: piece 3 has room for 12345 bytes).
    let (ok, _) = unit(
        UnitKind::DeviceState,
        3,
        &noise(12345, 1),
        Compression::None,
    );
    assert!(decoder().decode(&ok).is_ok());
    let (f, _) = unit(
        UnitKind::DeviceState,
        3,
        &noise(12346, 1),
        Compression::None,
    );
    assert_eq!(
        err(&f),
        DecodeError::BadUnitLength {
            kind: UnitKind::DeviceState,
            index: 3,
            unit_len: 12346,
            min: 1,
            max: 12345
        }
    );
    // And no piece is above 1 MiB.
    let (z, _) = unit(UnitKind::DeviceState, 0, &[0; 8], Compression::None);
    let f = patched(&z, |h| h.unit_len = U32::new(DEVICE_STATE_PIECE + 1));
    assert_eq!(
        err(&f),
        DecodeError::BadUnitLength {
            kind: UnitKind::DeviceState,
            index: 0,
            unit_len: DEVICE_STATE_PIECE + 1,
            min: 1,
            max: DEVICE_STATE_PIECE
        }
    );
}

#[test]
fn unit_payload_mismatch() {
    let (raw, _) = unit(UnitKind::Chunk, 0, &noise(1000, 1), Compression::None);
    let f = patched(&raw, |h| h.unit_len = U32::new(1001));
    assert_eq!(
        err(&f),
        DecodeError::UnitPayloadMismatch {
            encoding: Encoding::Raw,
            payload_len: 1000,
            unit_len: 1001
        }
    );
    // An "LZ4" payload as long as the unit (the sender must send it raw).
    let f = patched(&raw, |h| h.flags = FLAG_LZ4);
    assert_eq!(
        err(&f),
        DecodeError::UnitPayloadMismatch {
            encoding: Encoding::Lz4,
            payload_len: 1000,
            unit_len: 1000
        }
    );
}

#[test]
fn bad_request_count() {
    let req = |kind, index, count| {
        let f = Frame::Request {
            kind,
            index,
            count: 1,
        }
        .encode_to_vec()
        .unwrap();
        patched(&f, |h| h.unit_len = U32::new(count))
    };
    assert!(decoder().decode(&req(UnitKind::Page, 0, 1024)).is_ok());
    assert!(decoder().decode(&req(UnitKind::Chunk, 4000, 96)).is_ok());
    for (kind, index, count, max) in [
        (UnitKind::Page, 0, 0, 1024),
        (UnitKind::Page, 0, 1025, 1024),
        (UnitKind::Page, 0, u32::MAX, 1024),
        (UnitKind::Chunk, 4000, 97, 96),
        (UnitKind::Chunk, 4095, 2, 1),
    ] {
        assert_eq!(
            err(&req(kind, index, count)),
            DecodeError::BadRequestCount {
                kind,
                index,
                count,
                max
            }
        );
    }
}

#[test]
fn bad_control() {
    let c = control(ControlCode::Freeze);
    let msg = ControlMsg {
        code: U32::new(99),
        arg0: U64::new(1),
        arg1: U64::new(2),
    };
    let f = with_payload(&c, msg.as_bytes(), |_| {});
    assert_eq!(
        err(&f),
        DecodeError::BadControl {
            code: 99,
            arg0: 1,
            arg1: 2
        }
    );
    // Device state larger than the geometry allows.
    let dsm = test_geometry().device_state_max();
    let ok = control(ControlCode::DeviceStateEnd { total_bytes: dsm });
    assert!(decoder().decode(&ok).is_ok());
    let f = control(ControlCode::DeviceStateEnd {
        total_bytes: dsm + 1,
    });
    assert_eq!(
        err(&f),
        DecodeError::BadControl {
            code: 4,
            arg0: dsm + 1,
            arg1: 0
        }
    );
}

#[test]
fn bad_field() {
    let f = patched(&goodbye(), |h| h.unit_index = U64::new(3));
    assert_eq!(
        err(&f),
        DecodeError::BadField {
            frame_type: FrameType::Goodbye,
            field: "unit_index",
            value: 3
        }
    );
    let f = patched(&control(ControlCode::Freeze), |h| h.unit_len = U32::new(7));
    assert_eq!(
        err(&f),
        DecodeError::BadField {
            frame_type: FrameType::Control,
            field: "unit_len",
            value: 7
        }
    );
    // Handshake payload fields.
    let hello = Frame::Hello(Hello {
        min_version: 1,
        max_version: 1,
        conn: ConnKind::Bulk,
        migration_id: MigrationId([1; 16]),
        client_nonce: [2; 32],
        geometry: test_geometry(),
    })
    .encode_to_vec()
    .unwrap();
    let hs = FrameDecoder::handshake();
    let mut payload = hello[HEADER_LEN..].to_vec();
    payload[4] = 9; // conn
    assert_eq!(
        hs.decode(&with_payload(&hello, &payload, |_| {})),
        Err(DecodeError::BadField {
            frame_type: FrameType::Hello,
            field: "conn",
            value: 9
        })
    );
    let mut payload = hello[HEADER_LEN..].to_vec();
    payload[6] = 1; // reserved
    assert_eq!(
        hs.decode(&with_payload(&hello, &payload, |_| {})),
        Err(DecodeError::BadField {
            frame_type: FrameType::Hello,
            field: "reserved",
            value: 0x100
        })
    );
    let reject = Frame::Reject(Reject {
        reason: RejectReason::Protocol,
        min_version: 1,
        max_version: 1,
    })
    .encode_to_vec()
    .unwrap();
    let mut payload = reject[HEADER_LEN..].to_vec();
    payload[0] = 0;
    assert_eq!(
        hs.decode(&with_payload(&reject, &payload, |_| {})),
        Err(DecodeError::BadField {
            frame_type: FrameType::Reject,
            field: "reason",
            value: 0
        })
    );
    let challenge = Frame::Challenge(Challenge {
        version: 1,
        server_nonce: [0; 32],
        server_proof: [0; 32],
    })
    .encode_to_vec()
    .unwrap();
    let mut payload = challenge[HEADER_LEN..].to_vec();
    payload[7] = 0xff;
    assert_eq!(
        hs.decode(&with_payload(&challenge, &payload, |_| {})),
        Err(DecodeError::BadField {
            frame_type: FrameType::Challenge,
            field: "reserved",
            value: 0xff
        })
    );
}

#[test]
fn dst_length() {
    for data in [noise(4096, 4), text(4096), vec![0; 4096]] {
        let (f, _) = unit(UnitKind::Page, 0, &data, Compression::Lz4);
        let p = unit_payload(&f);
        for len in [0, 4095, 4097] {
            assert_eq!(
                p.unpack_into(&mut vec![0; len]),
                Err(DecodeError::DstLength {
                    unit_len: 4096,
                    dst_len: len
                })
            );
        }
        let mut dst = vec![0xee; 4096];
        p.unpack_into(&mut dst).unwrap();
        assert_eq!(dst, data);
    }
}

#[test]
fn lz4_truncated_is_corrupt() {
    let (f, e) = unit(UnitKind::Chunk, 0, &text(4096), Compression::Lz4);
    assert_eq!(e.encoding, Encoding::Lz4);
    // Drop the last bytes of the block and recompute a valid CRC: the frame
    // passes every header check, the damage shows when unpacking.
    let cut = &f[HEADER_LEN..f.len() - 3];
    let bad = with_payload(&f, cut, |_| {});
    let p = unit_payload(&bad);
    assert!(matches!(
        p.unpack_into(&mut vec![0; 4096]),
        Err(DecodeError::Lz4Corrupt {
            unit_len: 4096,
            fault: Lz4Fault::LiteralOutOfBounds | Lz4Fault::ExpectedAnotherByte
        })
    ));
    // A match with offset 0.
    let garbage = [0x10, b'a', 0x00, 0x00];
    let bad = with_payload(&f, &garbage, |_| {});
    assert_eq!(
        unit_payload(&bad).unpack_into(&mut vec![0; 4096]),
        Err(DecodeError::Lz4Corrupt {
            unit_len: 4096,
            fault: Lz4Fault::OffsetZero
        })
    );
    // A match reaching 255 bytes before the start of the output.
    let garbage = [0x0f, 0xff, 0x00, 0x00];
    let bad = with_payload(&f, &garbage, |_| {});
    assert_eq!(
        unit_payload(&bad).unpack_into(&mut vec![0; 4096]),
        Err(DecodeError::Lz4Corrupt {
            unit_len: 4096,
            fault: Lz4Fault::OffsetOutOfBounds
        })
    );
}

#[test]
fn lz4_decompressing_to_the_wrong_length() {
    // 8 KiB of text compressed, announced as a 4 KiB chunk: overrun.
    let (big, _) = unit(UnitKind::Chunk, 0, &text(8192), Compression::Lz4);
    let f = patched(&big, |h| h.unit_len = U32::new(4096));
    assert_eq!(
        unit_payload(&f).unpack_into(&mut vec![0; 4096]),
        Err(DecodeError::Lz4Overrun { unit_len: 4096 })
    );
    // 2 KiB of text compressed, announced as 4 KiB: underrun.
    let (small, _) = unit(UnitKind::Chunk, 0, &text(2048), Compression::Lz4);
    let f = patched(&small, |h| h.unit_len = U32::new(4096));
    assert_eq!(
        unit_payload(&f).unpack_into(&mut vec![0; 4096]),
        Err(DecodeError::Lz4Underrun {
            unit_len: 4096,
            produced: 2048
        })
    );
}

#[test]
fn error_messages_carry_context() {
    let e = DecodeError::IndexOutOfRange {
        kind: UnitKind::Page,
        index: 10,
        limit: 10,
    };
    assert_eq!(e.to_string(), "Page index 10 out of range (limit 10)");
    let e = DecodeError::PayloadTooLong {
        frame_type: FrameType::Unit,
        payload_len: 5,
        limit: 4,
    };
    assert_eq!(e.to_string(), "Unit payload of 5 bytes exceeds the limit 4");
}

#[test]
fn digests_round_trip_and_bad_digests_are_refused() {
    let crcs: Vec<u32> = (0..100u32).map(|i| i.wrapping_mul(0x9E37_79B9)).collect();
    let f = Frame::Digest {
        kind: UnitKind::Page,
        first: 7,
        crcs: crcs.clone(),
    }
    .encode_to_vec()
    .unwrap();
    assert_eq!(f.len(), HEADER_LEN + 400);
    let Decoded::Frame { frame, consumed } = decoder().decode(&f).unwrap() else {
        panic!("incomplete")
    };
    assert_eq!(consumed, f.len());
    let FrameRef::Digest {
        kind,
        first,
        crcs: got,
    } = frame
    else {
        panic!("not a digest: {frame:?}")
    };
    assert_eq!((kind, first, got.len()), (UnitKind::Page, 7, 100));
    assert_eq!(got.iter().collect::<Vec<_>>(), crcs);

    let pages = limits().index_limit(UnitKind::Page);
    // Count that disagrees with the payload, zero count, past the last page.
    let cases = [
        (patched(&f, |h| h.unit_len = U32::new(99)), 7, 99, 400),
        (with_payload(&f, &[], |h| h.unit_len = U32::new(0)), 7, 0, 0),
        (
            patched(&f, |h| h.unit_index = U64::new(pages - 50)),
            pages - 50,
            100,
            400,
        ),
    ];
    for (frame, first, count, payload_len) in cases {
        match err(&frame) {
            DecodeError::BadDigest {
                kind: UnitKind::Page,
                first: f0,
                count: c0,
                payload_len: p0,
                ..
            } => assert_eq!((f0, c0, p0), (first, count, payload_len)),
            other => panic!("expected BadDigest, got {other:?}"),
        }
    }
    // Digests are for pages and chunks only.
    let dev = patched(&f, |h| h.unit_kind = UnitKind::DeviceState as u8);
    assert!(matches!(err(&dev), DecodeError::KindMismatch { .. }));
    let mut out = vec![0u8; 1 << 20];
    assert!(matches!(
        encode_digest(&mut out, UnitKind::DeviceState, 0, &[1]),
        Err(EncodeError::WrongKind { .. })
    ));
    assert!(matches!(
        encode_digest(&mut out, UnitKind::Page, 0, &[]),
        Err(EncodeError::DigestCount { count: 0, .. })
    ));
    let too_many = vec![0u32; MAX_DIGEST_UNITS as usize + 1];
    assert!(matches!(
        encode_digest(&mut out, UnitKind::Page, 0, &too_many),
        Err(EncodeError::DigestCount { .. })
    ));
}

#[test]
fn zero_page_ranges_must_lie_within_the_guest() {
    let pages = limits().index_limit(UnitKind::Page);
    let ok = control(ControlCode::ZeroPages {
        first: pages - 3,
        count: 3,
    });
    assert!(decoder().decode(&ok).is_ok());
    for (first, count) in [(pages - 3, 4), (pages, 1), (0, u64::MAX)] {
        let f = control(ControlCode::ZeroPages { first, count });
        assert_eq!(
            err(&f),
            DecodeError::BadControl {
                code: 8,
                arg0: first,
                arg1: count
            }
        );
        // The freeze's absent pages alike.
        let f = control(ControlCode::AbsentPages { first, count });
        assert_eq!(
            err(&f),
            DecodeError::BadControl {
                code: 11,
                arg0: first,
                arg1: count
            }
        );
    }
    let ok = control(ControlCode::AbsentPages {
        first: pages - 3,
        count: 3,
    });
    assert!(decoder().decode(&ok).is_ok());
    // Chunks against the chunk count.
    let chunks = limits().index_limit(UnitKind::Chunk);
    let ok = control(ControlCode::AbsentChunks {
        first: chunks - 2,
        count: 2,
    });
    assert!(decoder().decode(&ok).is_ok());
    for (first, count) in [(chunks - 2, 3), (chunks, 1), (1, u64::MAX)] {
        let f = control(ControlCode::AbsentChunks { first, count });
        assert_eq!(
            err(&f),
            DecodeError::BadControl {
                code: 12,
                arg0: first,
                arg1: count
            }
        );
    }
    // A zero count is not a range.
    let msg = ControlMsg {
        code: U32::new(8),
        arg0: U64::new(1),
        arg1: U64::new(0),
    };
    let f = with_payload(&ok, msg.as_bytes(), |_| {});
    assert!(matches!(err(&f), DecodeError::BadControl { code: 8, .. }));
    // Resumed carries no arguments.
    let msg = ControlMsg {
        code: U32::new(9),
        arg0: U64::new(1),
        arg1: U64::new(0),
    };
    let f = with_payload(&ok, msg.as_bytes(), |_| {});
    assert!(matches!(err(&f), DecodeError::BadControl { code: 9, .. }));
    // Neither does Loaded.
    assert!(decoder().decode(&control(ControlCode::Loaded)).is_ok());
    for (arg0, arg1) in [(1, 0), (0, 1)] {
        let msg = ControlMsg {
            code: U32::new(10),
            arg0: U64::new(arg0),
            arg1: U64::new(arg1),
        };
        let f = with_payload(&ok, msg.as_bytes(), |_| {});
        assert_eq!(
            err(&f),
            DecodeError::BadControl {
                code: 10,
                arg0,
                arg1
            }
        );
    }
}
