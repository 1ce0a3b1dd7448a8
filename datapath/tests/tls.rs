//! TLS on the wire: a machine in the middle that modifies, replays,
//! reorders, drops, injects or cuts records after the handshakes is
//! detected by the receiver, which delivers nothing of the bad record or
//! anything after it (so nothing of it could be installed); one that stalls
//! inside a record cannot hold a receiver past its deadline; one that
//! terminates TLS on both sides cannot relay the key's proofs; the bytes on
//! the wire do not contain the frames in the clear; a sender that finishes
//! ends its stream cleanly.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use wanmig_datapath::connection::{ConnectError, ConnectionPair, LinkConfig, accept, connect};
use wanmig_datapath::transport::tls::{TlsError, TlsHandshake, TlsRole};
use wanmig_datapath::transport::{Flow, RecvEnd, RecvError};
use wanmig_datapath::wire::{
    ConnKind, ControlCode, FrameRef, Geometry, HandshakeError, MigrationId, PskKey, ServerPolicy,
};

fn geometry() -> Geometry {
    Geometry::new(4096, 1 << 16, 64 << 10, 1 << 12, 1 << 20)
}

/// What the machine in the middle does to the source's records once armed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Attack {
    /// Flip one bit of the next record's body.
    Flip,
    /// Send the next record twice.
    Replay,
    /// Swap the next two records.
    Reorder,
    /// Drop the next record.
    Drop,
    /// Insert a record of random bytes before the next one.
    Inject,
    /// Forward half of the next record, then close.
    Cut,
    /// Forward half of the next record, then hold the connection open.
    Stall,
}

/// Reads one TLS record (header and body); `None` at end of stream.
fn record(from: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 5];
    from.read_exact(&mut head).ok()?;
    let len = usize::from(u16::from_be_bytes([head[3], head[4]]));
    let mut rec = head.to_vec();
    rec.resize(5 + len, 0);
    from.read_exact(&mut rec[5..]).ok()?;
    Some(rec)
}

/// Forwards the source's records to the destination, attacking once armed;
/// everything it forwarded is kept in `seen`.
fn middle(
    mut from: TcpStream,
    mut to: TcpStream,
    attack: Attack,
    armed: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<u8>>>,
) {
    let mut held: Option<Vec<u8>> = None;
    let mut done = false;
    while let Some(mut rec) = record(&mut from) {
        seen.lock().unwrap().extend_from_slice(&rec);
        if done || !armed.load(Ordering::Acquire) || rec[0] != 23 {
            if to.write_all(&rec).is_err() {
                return;
            }
            continue;
        }
        let out: Vec<Vec<u8>> = match attack {
            Attack::Flip => {
                let i = 5 + (rec.len() - 5) / 2;
                rec[i] ^= 0x10;
                done = true;
                vec![rec]
            }
            Attack::Replay => {
                done = true;
                vec![rec.clone(), rec]
            }
            Attack::Reorder => match held.take() {
                None => {
                    held = Some(rec);
                    vec![]
                }
                Some(first) => {
                    done = true;
                    vec![rec, first]
                }
            },
            Attack::Drop => {
                done = true;
                vec![]
            }
            Attack::Inject => {
                let mut forged = vec![23, 3, 3, 0, 64];
                forged.extend((0..64u8).map(|i| i.wrapping_mul(37)));
                done = true;
                vec![forged, rec]
            }
            Attack::Cut => {
                let half = rec.len() / 2;
                let _ = to.write_all(&rec[..half]);
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Attack::Stall => {
                let half = rec.len() / 2;
                let _ = to.write_all(&rec[..half]);
                std::thread::sleep(Duration::from_secs(30));
                return;
            }
        };
        for r in out {
            if to.write_all(&r).is_err() {
                return;
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 << 10];
    while let Ok(n) = from.read(&mut buf) {
        if n == 0 || to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A source and a destination with the middle on both connections.
fn through_the_middle(
    attack: Attack,
) -> (
    ConnectionPair,
    ConnectionPair,
    Arc<AtomicBool>,
    Arc<Mutex<Vec<u8>>>,
) {
    let key = PskKey::generate();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst: SocketAddr = l.local_addr().unwrap();
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    let armed = Arc::new(AtomicBool::new(false));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (a2, s2) = (armed.clone(), seen.clone());
    std::thread::spawn(move || {
        for _ in 0..2 {
            let (down, _) = proxy.accept().unwrap();
            let up = TcpStream::connect(dst).unwrap();
            let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let (a, s) = (a2.clone(), s2.clone());
            std::thread::spawn(move || middle(down, up, attack, a, s));
            std::thread::spawn(move || pump(u2, d2));
        }
    });
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
    });
    let source = connect(
        proxy_addr,
        MigrationId::random(),
        geometry(),
        &key,
        &LinkConfig::default(),
    )
    .unwrap();
    let dest = server.join().unwrap().unwrap();
    (source, dest, armed, seen)
}

/// Receives on the destination's bulk connection until it stops; returns
/// the rounds delivered and how it ended.
fn receive(dest: &mut ConnectionPair, want: usize) -> (Vec<u64>, Result<(), String>) {
    let dec = dest.bulk.session.decoder();
    let mut got = Vec::new();
    let r = dest.bulk.rx.run(&dec, |f| -> Result<Flow, ()> {
        if let FrameRef::Control(ControlCode::RoundBegin { round }) = f {
            got.push(round);
        }
        Ok(if got.len() >= want {
            Flow::Stop
        } else {
            Flow::Continue
        })
    });
    let end = match r {
        Ok(_) => Ok(()),
        Err(RecvError::Tls { source, .. }) => Err(match source {
            TlsError::Truncated => "truncated".to_string(),
            other => format!("{other}: {}", wanmig_datapath::error_chain(&other)),
        }),
        Err(e) => Err(format!("not a TLS error: {e:?}")),
    };
    (got, end)
}

fn send(src: &mut ConnectionPair, round: u64) {
    src.bulk
        .tx
        .send_control(ControlCode::RoundBegin { round })
        .unwrap();
    src.bulk.tx.flush().unwrap();
}

#[test]
fn every_attack_on_the_records_is_detected_and_nothing_of_it_delivered() {
    for attack in [
        Attack::Flip,
        Attack::Replay,
        Attack::Reorder,
        Attack::Drop,
        Attack::Inject,
        Attack::Cut,
    ] {
        let (mut src, mut dst, armed, _) = through_the_middle(attack);
        // Before the attack: delivered.
        send(&mut src, 1);
        let (got, end) = receive(&mut dst, 1);
        assert_eq!((got, end), (vec![1], Ok(())), "{attack:?}: before");
        // From here the middle attacks; each flush is a record of its own.
        armed.store(true, Ordering::Release);
        send(&mut src, 2);
        send(&mut src, 3);
        send(&mut src, 4);
        let (got, end) = receive(&mut dst, 3);
        let why = end.expect_err(&format!("{attack:?}: accepted, delivered {got:?}"));
        // Nothing from the attacked record on: a dropped or reordered
        // record never lets a later one through either. (A replay's first
        // copy is the genuine record: it may be delivered before its copy
        // is refused.)
        let allowed: &[u64] = if attack == Attack::Replay { &[2] } else { &[] };
        assert!(
            got.is_empty() || got == allowed,
            "{attack:?}: delivered {got:?} ({why})"
        );
        if attack == Attack::Cut {
            assert_eq!(why, "truncated", "{attack:?}");
        } else {
            assert!(
                why.contains("decrypt") || why.contains("record"),
                "{attack:?}: {why}"
            );
        }
        // The receiver stays failed.
        let (got, end) = receive(&mut dst, 1);
        assert!(
            got.is_empty() && end.is_err(),
            "{attack:?}: {got:?} {end:?}"
        );
    }
}

#[test]
fn frames_are_not_on_the_wire_in_the_clear() {
    let (mut src, mut dst, _, seen) = through_the_middle(Attack::Flip);
    // A frame with a recognisable payload: a control code carrying a
    // distinctive 64-bit round number.
    let marker = 0x5eed_cafe_f00d_beef_u64;
    send(&mut src, marker);
    let (got, end) = receive(&mut dst, 1);
    assert_eq!((got, end), (vec![marker], Ok(())));
    let wire = seen.lock().unwrap().clone();
    assert!(wire.len() > 100, "{} bytes seen", wire.len());
    for needle in [marker.to_le_bytes(), marker.to_be_bytes()] {
        assert!(
            !wire.windows(8).any(|w| w == needle),
            "the frame's payload crossed in the clear"
        );
    }
    // Nor the wanmig frame magic of the handshake's Hello.
    assert!(
        !wire.windows(4).any(|w| w == b"WMIG"),
        "a frame header crossed in the clear"
    );
}

#[test]
fn a_record_stalled_halfway_cannot_hold_a_receiver_past_its_deadline() {
    let (mut src, mut dst, armed, _) = through_the_middle(Attack::Stall);
    armed.store(true, Ordering::Release);
    send(&mut src, 9);
    let dec = dst.bulk.session.decoder();
    let t = Instant::now();
    let r = dst.bulk.rx.run_with(
        &dec,
        Some(Instant::now() + Duration::from_millis(500)),
        &mut (
            |_: FrameRef<'_>| -> Result<Flow, ()> { Ok(Flow::Stop) },
            || Ok(()),
        ),
    );
    assert!(matches!(r, Err(RecvError::TimedOut)), "{r:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
}

#[test]
fn a_finished_sender_ends_its_stream_cleanly() {
    let (mut src, mut dst, _, _) = through_the_middle(Attack::Flip);
    send(&mut src, 5);
    drop(src);
    let dec = dst.bulk.session.decoder();
    let mut got = Vec::new();
    let end = dst
        .bulk
        .rx
        .run(&dec, |f| -> Result<Flow, ()> {
            if let FrameRef::Control(ControlCode::RoundBegin { round }) = f {
                got.push(round);
            }
            Ok(Flow::Continue)
        })
        .unwrap();
    assert_eq!((got, end), (vec![5], RecvEnd::Closed));
}

/// A machine in the middle that holds the key's proofs but not the key:
/// it terminates TLS with the source and with the destination and relays
/// the handshake's frames between its two sessions. The proofs cover each
/// session's exporter, so neither side accepts the other's.
#[test]
fn the_key_proofs_cannot_be_relayed_between_two_tls_sessions() {
    let key = PskKey::generate();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dst = l.local_addr().unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").unwrap();
    let relay_addr = relay.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut down, _) = relay.accept().unwrap();
        let mut up = TcpStream::connect(dst).unwrap();
        let mut with_source = TlsHandshake::run(&mut down, TlsRole::Server).unwrap();
        let mut with_dest = TlsHandshake::run(&mut up, TlsRole::Client).unwrap();
        // Hello, Challenge, Auth or Reject, Accept or Reject: one frame
        // (one record) at a time, in turn.
        let mut buf = vec![0u8; 1 << 16];
        for turn in 0..4 {
            let (mut from, mut to) = if turn % 2 == 0 {
                (with_source.stream(&mut down), with_dest.stream(&mut up))
            } else {
                (with_dest.stream(&mut up), with_source.stream(&mut down))
            };
            let Ok(n) = from.read(&mut buf) else { return };
            if n == 0 || to.write_all(&buf[..n]).is_err() {
                return;
            }
        }
    });
    let k2 = key.clone();
    let cfg = LinkConfig {
        accept_timeout: Duration::from_millis(2000),
        ..LinkConfig::default()
    };
    let server = std::thread::spawn(move || accept(&l, &ServerPolicy::default(), &k2, &cfg));
    let c = connect(relay_addr, MigrationId::random(), geometry(), &key, &cfg).unwrap_err();
    assert!(
        matches!(
            c,
            ConnectError::Handshake {
                conn: ConnKind::Bulk,
                source: HandshakeError::AuthFailed { .. },
                ..
            }
        ),
        "the source: {c:?}"
    );
    let s = server.join().unwrap().unwrap_err();
    assert!(
        matches!(&s, ConnectError::AcceptTimeout { refused: 1, last_refused: Some(why), .. } if why.contains("authentication")),
        "the destination: {s:?}"
    );
}
