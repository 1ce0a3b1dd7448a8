//! Property tests: round trips of every frame type, streaming over arbitrary
//! splits, and arbitrary bytes never making the decoder panic.

use proptest::collection::vec;
use proptest::prelude::*;

use super::geometry::tests::test_geometry;
use super::*;

fn limits() -> Limits {
    Limits::from_geometry(&test_geometry()).unwrap()
}

fn decoder() -> FrameDecoder {
    FrameDecoder::new(limits(), PROTOCOL_VERSION)
}

/// Unit contents: zeros, noise, compressible text, or zeros with a few bytes set.
fn contents(len: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(vec![0u8; len]),
        vec(any::<u8>(), len),
        vec(any::<u8>(), 1..16).prop_map(move |pat| pat
            .iter()
            .copied()
            .cycle()
            .take(len)
            .collect()),
        vec((0..len, any::<u8>()), 1..8).prop_map(move |pokes| {
            let mut v = vec![0u8; len];
            for (i, b) in pokes {
                v[i] = b | 1;
            }
            v
        }),
    ]
}

fn unit_frame() -> impl Strategy<Value = Frame> {
    let l = limits();
    let page = (0..l.index_limit(UnitKind::Page), contents(4096))
        .prop_map(|(index, data)| (UnitKind::Page, index, data));
    let chunk = (0..l.index_limit(UnitKind::Chunk), 1..=(64usize << 10))
        .prop_flat_map(|(index, len)| (Just(index), contents(len)))
        .prop_map(|(index, data)| (UnitKind::Chunk, index, data));
    let dsm = test_geometry().device_state_max();
    let device = (0..l.index_limit(UnitKind::DeviceState))
        .prop_flat_map(move |index| {
            let room = dsm - index * u64::from(DEVICE_STATE_PIECE);
            let max = room.min(20_000) as usize;
            (Just(index), (1..=max).prop_flat_map(contents))
        })
        .prop_map(|(index, data)| (UnitKind::DeviceState, index, data));
    prop_oneof![page, chunk, device].prop_map(|(kind, index, data)| Frame::Unit {
        kind,
        index,
        data,
    })
}

fn control_code() -> impl Strategy<Value = ControlCode> {
    let dsm = test_geometry().device_state_max();
    let pages = test_geometry().page_count();
    let chunks = test_geometry().chunk_count();
    let reason = prop_oneof![
        Just(AbortReason::Cancelled),
        Just(AbortReason::SourceFailed),
        Just(AbortReason::DestinationFailed),
        Just(AbortReason::Timeout),
        Just(AbortReason::ProtocolError),
    ];
    prop_oneof![
        any::<u64>().prop_map(|round| ControlCode::RoundBegin { round }),
        (any::<u64>(), any::<u64>())
            .prop_map(|(round, units_sent)| ControlCode::RoundEnd { round, units_sent }),
        Just(ControlCode::Freeze),
        (0..=dsm).prop_map(|total_bytes| ControlCode::DeviceStateEnd { total_bytes }),
        Just(ControlCode::PostcopyBegin),
        any::<u64>().prop_map(|units_total| ControlCode::Done { units_total }),
        reason.prop_map(|reason| ControlCode::Abort { reason }),
        (0..pages)
            .prop_flat_map(move |first| (Just(first), 1..=pages - first))
            .prop_map(|(first, count)| ControlCode::ZeroPages { first, count }),
        (0..pages)
            .prop_flat_map(move |first| (Just(first), 1..=pages - first))
            .prop_map(|(first, count)| ControlCode::AbsentPages { first, count }),
        (0..chunks)
            .prop_flat_map(move |first| (Just(first), 1..=chunks - first))
            .prop_map(|(first, count)| ControlCode::AbsentChunks { first, count }),
        Just(ControlCode::Resumed),
        Just(ControlCode::Loaded),
    ]
}

fn data_frame() -> impl Strategy<Value = Frame> {
    let l = limits();
    let request = prop_oneof![Just(UnitKind::Page), Just(UnitKind::Chunk)]
        .prop_flat_map(move |kind| (Just(kind), 0..l.index_limit(kind)))
        .prop_flat_map(move |(kind, index)| {
            let room = (l.index_limit(kind) - index).min(u64::from(MAX_REQUEST_UNITS)) as u32;
            (Just(kind), Just(index), 1..=room)
        })
        .prop_map(|(kind, index, count)| Frame::Request { kind, index, count });
    let ping = (any::<u64>(), any::<u64>()).prop_map(|(nonce, sent_ns)| PingMsg { nonce, sent_ns });
    let digest = prop_oneof![Just(UnitKind::Page), Just(UnitKind::Chunk)]
        .prop_flat_map(move |kind| (Just(kind), 0..l.index_limit(kind)))
        .prop_flat_map(move |(kind, first)| {
            let room = (l.index_limit(kind) - first).min(64) as usize;
            (
                Just(kind),
                Just(first),
                proptest::collection::vec(any::<u32>(), 1..=room),
            )
        })
        .prop_map(|(kind, first, crcs)| Frame::Digest { kind, first, crcs });
    prop_oneof![
        1 => digest,
        4 => unit_frame(),
        1 => request,
        1 => control_code().prop_map(Frame::Control),
        1 => ping.clone().prop_map(Frame::Ping),
        1 => ping.prop_map(Frame::Pong),
        1 => Just(Frame::Goodbye),
    ]
}

fn geometry() -> impl Strategy<Value = Geometry> {
    (
        any::<u32>(),
        any::<u64>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(a, b, c, d, e)| Geometry::new(a, b, c, d, e))
}

fn handshake_frame() -> impl Strategy<Value = Frame> {
    let conn = prop_oneof![Just(ConnKind::Bulk), Just(ConnKind::Fault)];
    let hello = (
        any::<u16>(),
        any::<u16>(),
        conn,
        any::<[u8; 16]>(),
        any::<[u8; 32]>(),
        geometry(),
    )
        .prop_map(
            |(min_version, max_version, conn, id, client_nonce, geometry)| {
                Frame::Hello(Hello {
                    min_version,
                    max_version,
                    conn,
                    migration_id: MigrationId(id),
                    client_nonce,
                    geometry,
                })
            },
        );
    let challenge = (any::<u16>(), any::<[u8; 32]>(), any::<[u8; 32]>()).prop_map(
        |(version, server_nonce, server_proof)| {
            Frame::Challenge(Challenge {
                version,
                server_nonce,
                server_proof,
            })
        },
    );
    let auth = any::<[u8; 32]>().prop_map(|client_proof| Frame::Auth(Auth { client_proof }));
    let reason = prop_oneof![
        Just(RejectReason::Protocol),
        Just(RejectReason::VersionMismatch),
        Just(RejectReason::AuthFailed),
        Just(RejectReason::MigrationIdMismatch),
        Just(RejectReason::GeometryMismatch),
        Just(RejectReason::InvalidGeometry),
        Just(RejectReason::ConnNotAccepted),
    ];
    let reject =
        (reason, any::<u16>(), any::<u16>()).prop_map(|(reason, min_version, max_version)| {
            Frame::Reject(Reject {
                reason,
                min_version,
                max_version,
            })
        });
    prop_oneof![hello, challenge, auth, Just(Frame::Accept), reject]
}

fn round_trip(d: &FrameDecoder, frame: &Frame) -> Result<(), TestCaseError> {
    let bytes = frame.encode_to_vec().unwrap();
    match d.decode(&bytes).unwrap() {
        Decoded::Frame {
            frame: decoded,
            consumed,
        } => {
            prop_assert_eq!(consumed, bytes.len());
            prop_assert_eq!(decoded.frame_type(), frame.frame_type());
            prop_assert_eq!(&decoded.to_frame().unwrap(), frame);
        }
        other => prop_assert!(false, "{:?}", other),
    }
    // Every strict prefix asks for more.
    for cut in [0, bytes.len() / 2, bytes.len() - 1] {
        let need = match d.decode(&bytes[..cut]) {
            Ok(Decoded::NeedMore { at_least }) => at_least,
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert!(need > cut && need <= bytes.len());
    }
    Ok(())
}

proptest! {
    #[test]
    fn data_frames_round_trip(frame in data_frame()) {
        round_trip(&decoder(), &frame)?;
    }

    #[test]
    fn handshake_frames_round_trip(frame in handshake_frame()) {
        round_trip(&FrameDecoder::handshake(), &frame)?;
    }

    #[test]
    fn units_round_trip_with_both_compressions(
        frame in unit_frame(),
        lz4 in any::<bool>(),
    ) {
        let Frame::Unit { kind, index, data } = frame else { unreachable!() };
        let c = if lz4 { Compression::Lz4 } else { Compression::None };
        let mut out = vec![0; encode_buffer_len(data.len(), c)];
        let e = encode_unit(&mut out, kind, index, &data, c).unwrap();
        prop_assert!(e.len <= max_frame_len(data.len()));
        prop_assert_eq!(e.len, HEADER_LEN + e.payload_len);
        if is_zero(&data) {
            prop_assert_eq!(e.encoding, Encoding::Zero);
        } else if !lz4 {
            prop_assert_eq!(e.encoding, Encoding::Raw);
        }
        let Decoded::Frame { frame: FrameRef::Unit { kind: k, index: i, payload }, consumed } =
            decoder().decode(&out[..e.len]).unwrap()
        else {
            return Err(TestCaseError::fail("not a unit"));
        };
        prop_assert_eq!((k, i, consumed), (kind, index, e.len));
        prop_assert_eq!(payload.encoding(), e.encoding);
        let mut dst = vec![0x5a; data.len()];
        payload.unpack_into(&mut dst).unwrap();
        prop_assert_eq!(dst, data);
    }

    #[test]
    fn stream_split_anywhere_yields_frames_in_order(
        frames in vec(data_frame(), 1..12),
        splits in vec(1usize..5000, 1..40),
    ) {
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.encode_to_vec().unwrap());
        }
        let d = decoder();
        let mut buf: Vec<u8> = Vec::new();
        let mut got = Vec::new();
        let mut pos = 0;
        let mut split = splits.iter().cycle();
        while pos < stream.len() {
            let end = (pos + split.next().unwrap()).min(stream.len());
            buf.extend_from_slice(&stream[pos..end]);
            pos = end;
            loop {
                match d.decode(&buf).unwrap() {
                    Decoded::Frame { frame, consumed } => {
                        got.push(frame.to_frame().unwrap());
                        buf.drain(..consumed);
                    }
                    Decoded::NeedMore { at_least } => {
                        prop_assert!(at_least > buf.len());
                        prop_assert!(at_least <= d.max_frame_len());
                        break;
                    }
                }
            }
        }
        prop_assert!(buf.is_empty());
        prop_assert_eq!(got, frames);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..3000)) {
        for d in [decoder(), FrameDecoder::handshake()] {
            poke(&d, &bytes);
        }
    }

    #[test]
    fn arbitrary_headers_after_valid_magic_never_panic(
        mut header in any::<[u8; 32]>(),
        frame_type in prop::sample::select(vec![1u8, 2, 3, 4, 5, 0x10, 0x11, 0x20, 0x21, 0x22, 0x30]),
        kind in 1u8..=4,
        flags in 0u8..4,
        payload in vec(any::<u8>(), 0..5000),
        reseal in any::<bool>(),
    ) {
        header[..4].copy_from_slice(&MAGIC);
        header[4..6].copy_from_slice(&1u16.to_le_bytes());
        header[6] = frame_type;
        header[7] = flags;
        header[8] = kind;
        header[9..12].fill(0);
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(&payload);
        if reseal {
            bytes = resealed(bytes);
        }
        for d in [decoder(), FrameDecoder::handshake()] {
            poke(&d, &bytes);
        }
    }

    #[test]
    fn mutated_valid_frames_never_panic(
        frame in data_frame(),
        flips in vec((any::<usize>(), any::<u8>()), 1..6),
        reseal in any::<bool>(),
    ) {
        let mut bytes = frame.encode_to_vec().unwrap();
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x;
        }
        if reseal {
            bytes = resealed(bytes);
        }
        poke(&decoder(), &bytes);
    }
}

/// Recomputes the CRC (and `payload_len`) so the mutation gets past the CRC check.
fn resealed(mut bytes: Vec<u8>) -> Vec<u8> {
    use zerocopy::{FromBytes, IntoBytes};
    let Ok((mut h, _)) = Header::read_from_prefix(&bytes) else {
        return bytes;
    };
    h.payload_len = zerocopy::little_endian::U32::new((bytes.len() - HEADER_LEN) as u32);
    h.seal(&bytes[HEADER_LEN..]);
    bytes[..HEADER_LEN].copy_from_slice(h.as_bytes());
    bytes
}

/// Decodes `bytes` and, for units, unpacks into right- and wrong-sized buffers;
/// only `Ok`/`Err` may come out.
fn poke(d: &FrameDecoder, bytes: &[u8]) {
    if let Ok(Decoded::Frame { frame, consumed }) = d.decode(bytes) {
        assert!(consumed <= bytes.len());
        if let FrameRef::Unit { payload, .. } = frame {
            let len = payload.unit_len() as usize;
            let _ = payload.unpack_into(&mut vec![0; len]);
            let _ = payload.unpack_into(&mut vec![0; len / 2]);
        }
        let _ = frame.to_frame();
    }
}
