//! The io_uring transport over real TCP connections: frames arrive intact and
//! in order on every backend combination, a malformed or truncated stream is a
//! typed error, pacing bounds the bytes queued in the socket, and a sender
//! torn down with a send in flight neither hangs nor frees memory the kernel
//! still uses.

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wanmig_datapath::transport::{
    Flow, FrameReceiver, FrameSender, IoBackend, IoPreference, PacingConfig, RecvConfig, RecvEnd,
    RecvError, SendConfig, SendError, tcp,
};
use wanmig_datapath::unit_stream::UnitSender;
use wanmig_datapath::wire::{
    Compression, ControlCode, DecodeError, FrameDecoder, FrameRef, Geometry, Limits,
    PROTOCOL_VERSION, UnitKind, encode_buffer_len, encode_unit,
};

const PAGE: usize = 4096;

fn pair() -> (TcpStream, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
    let (s, _) = l.accept().unwrap();
    (c, s)
}

fn geometry(pages: u64) -> Geometry {
    Geometry::new(PAGE as u32, pages, 1 << 20, 64, 1 << 20)
}

fn decoder(pages: u64) -> FrameDecoder {
    FrameDecoder::new(
        Limits::from_geometry(&geometry(pages)).unwrap(),
        PROTOCOL_VERSION,
    )
}

/// Deterministic page contents: a mix of zero, compressible and random pages.
fn page_content(index: u64, out: &mut [u8]) {
    match index % 3 {
        0 => out.fill(0),
        1 => {
            let text = format!("page {index} holds some repetitive text; ");
            for (i, b) in out.iter_mut().enumerate() {
                *b = text.as_bytes()[i % text.len()];
            }
        }
        _ => {
            let mut x = index.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for b in out.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
        }
    }
}

fn send_pages(
    sock: TcpStream,
    pages: u64,
    io: IoPreference,
    pacing: Option<PacingConfig>,
) -> FrameSender {
    let cfg = SendConfig {
        io,
        pacing,
        ..SendConfig::default()
    };
    let mut tx = UnitSender::new(FrameSender::new(sock, cfg).unwrap(), Compression::Lz4);
    tx.send_control(ControlCode::RoundBegin { round: 0 })
        .unwrap();
    for i in 0..pages {
        tx.send_unit(UnitKind::Page, i, PAGE, |buf| page_content(i, buf))
            .unwrap();
    }
    tx.send_control(ControlCode::RoundEnd {
        round: 0,
        units_sent: pages,
    })
    .unwrap();
    tx.send_goodbye().unwrap();
    tx.flush().unwrap();
    let stats = tx.stats();
    assert_eq!(stats.units, pages);
    assert_eq!(stats.zero, pages.div_ceil(3));
    assert!(stats.lz4 >= pages / 3, "text pages compress: {stats:?}");
    tx.into_inner()
}

/// Receives until Goodbye, unpacking pages into `memory`; returns the
/// control codes seen, in order.
fn receive_pages(
    sock: TcpStream,
    pages: u64,
    io: IoPreference,
    memory: &mut [u8],
) -> Vec<ControlCode> {
    let mut rx = FrameReceiver::new(
        sock,
        RecvConfig {
            io,
            ..RecvConfig::default()
        },
    )
    .unwrap();
    let dec = decoder(pages);
    let mut controls = Vec::new();
    let mut seen = 0u64;
    let end = rx
        .run(&dec, |frame| -> Result<Flow, DecodeError> {
            match frame {
                FrameRef::Unit {
                    kind: UnitKind::Page,
                    index,
                    payload,
                } => {
                    assert_eq!(index, seen, "frames arrive in order");
                    seen += 1;
                    let at = index as usize * PAGE;
                    payload.unpack_into(&mut memory[at..at + PAGE])?;
                    Ok(Flow::Continue)
                }
                FrameRef::Control(code) => {
                    controls.push(code);
                    Ok(Flow::Continue)
                }
                FrameRef::Goodbye => Ok(Flow::Stop),
                other => panic!("unexpected frame {other:?}"),
            }
        })
        .unwrap();
    assert_eq!(end, RecvEnd::Stopped);
    assert_eq!(seen, pages);
    controls
}

fn round_trip(tx_io: IoPreference, rx_io: IoPreference) {
    let pages = 3000u64;
    let (c, s) = pair();
    let sender =
        std::thread::spawn(move || send_pages(c, pages, tx_io, Some(PacingConfig::default())));
    let mut memory = vec![0xAAu8; pages as usize * PAGE];
    let controls = receive_pages(s, pages, rx_io, &mut memory);
    let tx = sender.join().unwrap();
    assert_eq!(
        controls,
        vec![
            ControlCode::RoundBegin { round: 0 },
            ControlCode::RoundEnd {
                round: 0,
                units_sent: pages
            }
        ]
    );
    let mut expected = vec![0u8; PAGE];
    for i in 0..pages {
        page_content(i, &mut expected);
        let at = i as usize * PAGE;
        assert!(memory[at..at + PAGE] == expected[..], "page {i} differs");
    }
    let want = match tx_io {
        IoPreference::Blocking => IoBackend::Blocking,
        _ => IoBackend::Uring,
    };
    assert_eq!(tx.backend(), want);
    assert_eq!(tx.stats().bytes_sent, tx.stats().bytes_committed);
}

#[test]
fn frames_round_trip_over_io_uring() {
    round_trip(IoPreference::Uring, IoPreference::Uring);
}

#[test]
fn frames_round_trip_between_io_uring_and_blocking_backends() {
    round_trip(IoPreference::Uring, IoPreference::Blocking);
    round_trip(IoPreference::Blocking, IoPreference::Uring);
}

#[test]
fn a_corrupted_byte_is_a_decode_error_at_its_offset() {
    let (mut c, s) = pair();
    let mut bytes = Vec::new();
    let mut frame = vec![0u8; encode_buffer_len(PAGE, Compression::None)];
    for i in 0..4u64 {
        let mut page = vec![0u8; PAGE];
        page_content(2, &mut page); // random, sent raw
        let n = encode_unit(&mut frame, UnitKind::Page, i, &page, Compression::None)
            .unwrap()
            .len;
        bytes.extend_from_slice(&frame[..n]);
    }
    let frame_len = bytes.len() / 4;
    bytes[2 * frame_len + 100] ^= 0x40; // inside the third frame's payload
    std::io::Write::write_all(&mut c, &bytes).unwrap();
    drop(c);
    let mut rx = FrameReceiver::new(s, RecvConfig::default()).unwrap();
    let mut delivered = 0;
    let err = rx
        .run(&decoder(16), |_| -> Result<Flow, ()> {
            delivered += 1;
            Ok(Flow::Continue)
        })
        .unwrap_err();
    assert_eq!(delivered, 2);
    match err {
        RecvError::Decode {
            offset,
            source: DecodeError::CrcMismatch { .. },
        } => {
            assert_eq!(offset, 2 * frame_len as u64)
        }
        other => panic!("expected a CRC mismatch, got {other:?}"),
    }
    // The receiver refuses to go on after a protocol error.
    assert!(matches!(
        rx.run(&decoder(16), |_| -> Result<Flow, ()> { Ok(Flow::Continue) }),
        Err(RecvError::Poisoned)
    ));
}

#[test]
fn a_stream_cut_inside_a_frame_is_truncated_and_a_clean_close_is_closed() {
    let mut frame = vec![0u8; encode_buffer_len(PAGE, Compression::None)];
    let page = vec![1u8; PAGE];
    let n = encode_unit(&mut frame, UnitKind::Page, 0, &page, Compression::None)
        .unwrap()
        .len;
    for cut in [n, n + 10, n + 40] {
        let (mut c, s) = pair();
        let mut bytes = frame[..n].to_vec();
        bytes.extend_from_slice(&frame[..cut - n]);
        std::io::Write::write_all(&mut c, &bytes).unwrap();
        drop(c);
        let mut rx = FrameReceiver::new(s, RecvConfig::default()).unwrap();
        let r = rx.run(&decoder(16), |_| -> Result<Flow, ()> { Ok(Flow::Continue) });
        match (cut - n, r) {
            (0, Ok(RecvEnd::Closed)) => {}
            (k, Err(RecvError::Truncated { offset, buffered })) if k > 0 => {
                assert_eq!((offset, buffered), (n as u64, k));
            }
            (k, r) => panic!("cut {k}: {r:?}"),
        }
    }
}

#[test]
fn frames_larger_than_the_receive_buffer_grow_it() {
    let (c, s) = pair();
    let chunk = 1usize << 20;
    let sender = std::thread::spawn(move || {
        let mut tx = UnitSender::new(
            FrameSender::new(
                c,
                SendConfig {
                    buffer_size: 4 << 20,
                    ..SendConfig::default()
                },
            )
            .unwrap(),
            Compression::None,
        );
        for i in 0..8u64 {
            tx.send_unit(UnitKind::Chunk, i, chunk, |b| b.fill(i as u8 + 1))
                .unwrap();
        }
        tx.send_goodbye().unwrap();
        tx.flush().unwrap();
    });
    let mut rx = FrameReceiver::new(
        s,
        RecvConfig {
            buffer_size: 64 << 10,
            ..RecvConfig::default()
        },
    )
    .unwrap();
    let mut got = Vec::new();
    rx.run(&decoder(16), |f| -> Result<Flow, DecodeError> {
        match f {
            FrameRef::Unit { index, payload, .. } => {
                let mut b = vec![0; chunk];
                payload.unpack_into(&mut b)?;
                assert!(b.iter().all(|&x| x == index as u8 + 1));
                got.push(index);
                Ok(Flow::Continue)
            }
            _ => Ok(Flow::Stop),
        }
    })
    .unwrap();
    sender.join().unwrap();
    assert_eq!(got, (0..8).collect::<Vec<_>>());
}

/// Sends 32 MiB to a receiver that reads slowly and samples the socket's
/// send queue; returns (largest queue seen, largest pacing limit).
fn queue_depth_under_slow_reader(pacing: Option<PacingConfig>) -> (usize, u64) {
    let (c, mut s) = pair();
    let probe = c.try_clone().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let max_q = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (done, max_q) = (done.clone(), max_q.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let q = tcp::outq(probe.as_fd()).unwrap();
                max_q.fetch_max(q, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(200));
            }
        })
    };
    let reader = std::thread::spawn(move || {
        // About 40 MB/s: slow against loopback, so the sender must hold back.
        let mut buf = vec![0u8; 64 << 10];
        let mut total = 0usize;
        loop {
            match std::io::Read::read(&mut s, &mut buf) {
                Ok(0) | Err(_) => break total,
                Ok(n) => total += n,
            }
            std::thread::sleep(Duration::from_micros(1500));
        }
    });
    let cfg = SendConfig {
        pacing,
        ..SendConfig::default()
    };
    let mut tx = FrameSender::new(c, cfg).unwrap();
    let frame = vec![0x5Au8; 32 << 10];
    for _ in 0..1024 {
        tx.send_frame(&frame).unwrap();
    }
    tx.flush().unwrap();
    let limit = tx.stats().max_pacing_limit;
    // The watcher's clone of the socket must go before the reader can see EOF.
    done.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    drop(tx);
    assert_eq!(reader.join().unwrap(), 32 << 20);
    (max_q.load(Ordering::Relaxed), limit)
}

#[test]
fn pacing_bounds_the_bytes_queued_in_the_socket() {
    let cfg = PacingConfig {
        floor: 128 << 10,
        initial: 128 << 10,
        ..PacingConfig::default()
    };
    let (paced, limit) = queue_depth_under_slow_reader(Some(cfg));
    let (unpaced, _) = queue_depth_under_slow_reader(None);
    // A send may take the queue up to the limit; the queue never exceeds it
    // by more than one send's worth of rounding (it is sampled, not exact).
    assert!(limit > 0);
    assert!(
        paced <= limit as usize + (64 << 10),
        "paced queue {paced} above limit {limit}"
    );
    eprintln!("paced queue max {paced} (limit {limit}), unpaced {unpaced}");
    // Without pacing TCP queues megabytes: the bound is the pacer's doing.
    assert!(unpaced > 4 * paced, "unpaced {unpaced} vs paced {paced}");
}

#[test]
fn a_peer_that_vanishes_is_a_closed_error() {
    let (c, s) = pair();
    drop(s);
    let mut tx = FrameSender::new(
        c,
        SendConfig {
            pacing: None,
            ..SendConfig::default()
        },
    )
    .unwrap();
    let frame = vec![1u8; 64 << 10];
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        assert!(
            Instant::now() < deadline,
            "sending to a closed peer never failed"
        );
        if let Err(e) = tx.send_frame(&frame).and_then(|_| tx.flush()) {
            break e;
        }
    };
    assert!(matches!(err, SendError::Closed { .. }), "{err:?}");
    assert!(matches!(tx.send_frame(&frame), Err(SendError::Poisoned)));
}

#[test]
fn dropping_a_sender_with_a_send_in_flight_cancels_it() {
    // The peer never reads: once the socket buffers fill, a send stays in
    // flight. Dropping the sender must cancel it and return promptly.
    let (c, s) = pair();
    let (tx_done, rx_done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = FrameSender::new(
            c,
            SendConfig {
                pacing: None,
                buffer_size: 8 << 20,
                ..SendConfig::default()
            },
        )
        .unwrap();
        let frame = vec![3u8; 8 << 20];
        tx.send_frame(&frame).unwrap();
        tx.send_frame(&frame).unwrap();
        tx.send_frame(&frame).unwrap();
        let in_flight = tx.stats().bytes_sent < tx.stats().bytes_committed;
        drop(tx);
        tx_done.send(in_flight).unwrap();
    });
    let in_flight = rx_done
        .recv_timeout(Duration::from_secs(20))
        .expect("drop hung");
    assert!(
        in_flight,
        "the test needs a send still in flight at drop time"
    );
    drop(s);
}
