//! Opening a migration's two connections over real TCP (TLS 1.3 by default):
//! both sides agree on the session, the destination accepts the connections
//! in either order, and a peer with the wrong key, another migration's id or
//! no TLS is refused before any frame of it is accepted while the
//! destination goes on waiting for its source; waiting for connections has a
//! deadline and can be called off, and so can waiting for frames on an
//! established connection.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wanmig_datapath::connection::{ConnectError, LinkConfig, accept, accept_until, connect};
use wanmig_datapath::transport::tls::{Encryption, TlsHandshake, TlsRole};
use wanmig_datapath::transport::{Flow, RecvEnd, RecvError};
use wanmig_datapath::wire::{
    ClientParams, ConnKind, ControlCode, FrameRef, Geometry, HandshakeError, MigrationId, PskKey,
    ServerPolicy, client_handshake, client_handshake_bound,
};

fn geometry() -> Geometry {
    Geometry::new(4096, 1 << 16, 64 << 10, 1 << 12, 1 << 20)
}

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

#[test]
fn both_connections_authenticate_and_carry_frames_both_ways() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let server_key = key.clone();
    let server = std::thread::spawn(move || {
        let mut pair = accept(
            &l,
            &ServerPolicy::default(),
            &server_key,
            &LinkConfig::default(),
        )
        .unwrap();
        // Echo one control frame on each connection.
        for conn in [&mut pair.bulk, &mut pair.fault] {
            let mut got = None;
            let dec = conn.session.decoder();
            let end = conn
                .rx
                .run(&dec, |f| -> Result<Flow, ()> {
                    if let FrameRef::Control(c) = f {
                        got = Some(c);
                    }
                    Ok(Flow::Stop)
                })
                .unwrap();
            assert_eq!(end, RecvEnd::Stopped);
            conn.tx.send_control(got.unwrap()).unwrap();
            conn.tx.flush().unwrap();
        }
        (pair.bulk.session, pair.fault.session)
    });
    let mut pair = connect(addr, id, geometry(), &key, &LinkConfig::default()).unwrap();
    for (round, conn) in [&mut pair.bulk, &mut pair.fault].into_iter().enumerate() {
        let code = ControlCode::RoundBegin {
            round: round as u64 + 7,
        };
        conn.tx.send_control(code).unwrap();
        conn.tx.flush().unwrap();
        let mut echoed = None;
        let dec = conn.session.decoder();
        conn.rx
            .run(&dec, |f| -> Result<Flow, ()> {
                if let FrameRef::Control(c) = f {
                    echoed = Some(c);
                }
                Ok(Flow::Stop)
            })
            .unwrap();
        assert_eq!(echoed, Some(code));
    }
    let (sb, sf) = server.join().unwrap();
    assert_eq!(sb, pair.bulk.session);
    assert_eq!(sf, pair.fault.session);
    assert_eq!((sb.conn, sf.conn), (ConnKind::Bulk, ConnKind::Fault));
    assert_eq!(sb.migration_id, id);
    assert_eq!(sb.geometry, geometry());
}

/// A source's connection made by hand: TLS, then the handshake bound to
/// it (the session is kept open with the socket).
fn raw_client(
    addr: SocketAddr,
    conn: ConnKind,
    id: MigrationId,
    key: &PskKey,
) -> Result<(TcpStream, TlsHandshake), HandshakeError> {
    let mut s = TcpStream::connect(addr).unwrap();
    let mut tls = TlsHandshake::run(&mut s, TlsRole::Client).unwrap();
    let binding = tls.binding().unwrap();
    client_handshake_bound(
        tls.stream(&mut s),
        &ClientParams {
            conn,
            migration_id: id,
            geometry: geometry(),
        },
        key,
        &binding,
    )?;
    Ok((s, tls))
}

/// A short wait, for tests where the destination must give up.
fn impatient() -> LinkConfig {
    LinkConfig {
        accept_timeout: Duration::from_millis(1500),
        ..LinkConfig::default()
    }
}

#[test]
fn the_destination_accepts_fault_before_bulk() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
    });
    let _f = raw_client(addr, ConnKind::Fault, id, &key).unwrap();
    let _b = raw_client(addr, ConnKind::Bulk, id, &key).unwrap();
    let pair = server.join().unwrap().unwrap();
    assert_eq!(pair.bulk.session.conn, ConnKind::Bulk);
    assert_eq!(pair.fault.session.conn, ConnKind::Fault);
}

#[test]
fn a_wrong_key_is_refused_on_both_sides() {
    let (l, addr) = listener();
    let server = std::thread::spawn(move || {
        accept(
            &l,
            &ServerPolicy::default(),
            &PskKey::generate(),
            &impatient(),
        )
    });
    let client = connect(
        addr,
        MigrationId::random(),
        geometry(),
        &PskKey::generate(),
        &LinkConfig::default(),
    );
    let c = client.unwrap_err();
    assert!(
        matches!(
            &c,
            ConnectError::Handshake {
                conn: ConnKind::Bulk,
                source: HandshakeError::AuthFailed { .. },
                ..
            }
        ),
        "client: {c:?}"
    );
    // The destination refused it and went on waiting, until its deadline.
    let s = server.join().unwrap().unwrap_err();
    assert!(
        matches!(&s, ConnectError::AcceptTimeout { refused: 1, last_refused: Some(why), .. } if why.contains("authentication")),
        "server: {s:?}"
    );
}

#[test]
fn strays_never_end_the_wait_for_the_source() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
    });
    // A port scan (connect, close), garbage, a plaintext engine, the wrong
    // key: each refused.
    drop(TcpStream::connect(addr).unwrap());
    {
        use std::io::Write;
        let mut g = TcpStream::connect(addr).unwrap();
        let _ = g.write_all(b"GET / HTTP/1.0\r\n\r\n");
    }
    let mut plain = TcpStream::connect(addr).unwrap();
    let p = client_handshake(
        &mut plain,
        &ClientParams {
            conn: ConnKind::Bulk,
            migration_id: id,
            geometry: geometry(),
        },
        &key,
    );
    assert!(p.is_err(), "a plaintext peer passed the handshake");
    assert!(raw_client(addr, ConnKind::Bulk, id, &PskKey::generate()).is_err());
    // Then the source.
    let mut pair = connect(addr, id, geometry(), &key, &LinkConfig::default()).unwrap();
    let mut theirs = server.join().unwrap().unwrap();
    assert_eq!(theirs.bulk.session.migration_id, id);
    pair.bulk
        .tx
        .send_control(ControlCode::RoundBegin { round: 3 })
        .unwrap();
    pair.bulk.tx.flush().unwrap();
    let dec = theirs.bulk.session.decoder();
    let mut got = None;
    theirs
        .bulk
        .rx
        .run(&dec, |f| -> Result<Flow, ()> {
            if let FrameRef::Control(c) = f {
                got = Some(c);
            }
            Ok(Flow::Stop)
        })
        .unwrap();
    assert_eq!(got, Some(ControlCode::RoundBegin { round: 3 }));
}

#[test]
fn both_ends_must_agree_on_plaintext() {
    let key = PskKey::generate();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server =
        std::thread::spawn(move || accept(&l, &ServerPolicy::default(), &k2, &impatient()));
    let plaintext = LinkConfig {
        encryption: Encryption::Plaintext,
        ..LinkConfig::default()
    };
    let c = connect(addr, MigrationId::random(), geometry(), &key, &plaintext).unwrap_err();
    assert!(matches!(c, ConnectError::Handshake { .. }), "{c:?}");
    let s = server.join().unwrap().unwrap_err();
    assert!(
        matches!(&s, ConnectError::AcceptTimeout { refused: 1, last_refused: Some(why), .. } if why.contains("TLS")),
        "{s:?}"
    );
    // Both in plaintext: it works, and says so.
    let (l, addr) = listener();
    let k2 = key.clone();
    let p2 = plaintext;
    let server = std::thread::spawn(move || accept(&l, &ServerPolicy::default(), &k2, &p2));
    let pair = connect(addr, MigrationId::random(), geometry(), &key, &plaintext).unwrap();
    let theirs = server.join().unwrap().unwrap();
    assert_eq!(pair.bulk.io_path().cipher, "none");
    assert_eq!(theirs.fault.io_path().cipher_in, "none");
}

#[test]
fn a_second_connection_from_another_migration_is_refused() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
    });
    let _b = raw_client(addr, ConnKind::Bulk, id, &key).unwrap();
    let other = raw_client(addr, ConnKind::Fault, MigrationId::random(), &key);
    assert!(other.is_err(), "a stranger's fault connection was accepted");
    // The migration's own fault connection still completes the pair.
    let _f = raw_client(addr, ConnKind::Fault, id, &key).unwrap();
    let pair = server.join().unwrap().unwrap();
    assert_eq!(pair.fault.session.migration_id, id);
    // AES-128-GCM with AES instructions, else ChaCha20-Poly1305.
    let cipher = pair.bulk.io_path().cipher;
    assert!(
        cipher == "TLS13_AES_128_GCM_SHA256" || cipher == "TLS13_CHACHA20_POLY1305_SHA256",
        "{cipher}"
    );
    assert_eq!(pair.bulk.io_path().cipher_in, "userspace");
}

#[test]
fn accepting_gives_up_at_its_deadline_when_nobody_connects() {
    let (l, _) = listener();
    let cfg = LinkConfig {
        accept_timeout: Duration::from_millis(300),
        ..LinkConfig::default()
    };
    let t = Instant::now();
    let e = accept(&l, &ServerPolicy::default(), &PskKey::generate(), &cfg).unwrap_err();
    let took = t.elapsed();
    assert!(
        matches!(e, ConnectError::AcceptTimeout { .. }),
        "expected a timeout: {e:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "took {took:?}"
    );
    // The listener is usable (and blocking) again afterwards.
    let addr = l.local_addr().unwrap();
    let _c = TcpStream::connect(addr).unwrap();
    let (s, _) = l.accept().unwrap();
    drop(s);
}

#[test]
fn accepting_gives_up_at_its_deadline_after_only_one_connection() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_millis(500);
        accept_until(
            &l,
            &ServerPolicy::default(),
            &k2,
            &LinkConfig::default(),
            deadline,
            &|| false,
        )
    });
    let _b = raw_client(addr, ConnKind::Bulk, id, &key).unwrap();
    let e = server.join().unwrap().unwrap_err();
    assert!(matches!(e, ConnectError::AcceptTimeout { .. }), "{e:?}");
}

#[test]
fn accepting_is_called_off_promptly() {
    let (l, _) = listener();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let server = std::thread::spawn(move || {
        let t = Instant::now();
        let r = accept_until(
            &l,
            &ServerPolicy::default(),
            &PskKey::generate(),
            &LinkConfig::default(),
            Instant::now() + Duration::from_secs(600),
            &|| s2.load(Ordering::Acquire),
        );
        (r, t.elapsed())
    });
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Release);
    let (r, took) = server.join().unwrap();
    assert!(
        matches!(r, Err(ConnectError::AcceptCancelled { .. })),
        "{r:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
}

#[test]
fn a_receive_deadline_leaves_the_connection_usable() {
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let k2 = key.clone();
    let server = std::thread::spawn(move || {
        accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default()).unwrap()
    });
    let mut client = connect(addr, id, geometry(), &key, &LinkConfig::default()).unwrap();
    let mut server = server.join().unwrap();
    let dec = server.bulk.session.decoder();

    // Nothing sent: the deadline ends the wait, and the drained callback ran
    // before it waited.
    let mut drained = 0;
    let t = Instant::now();
    let r = server.bulk.rx.run_with(
        &dec,
        Some(Instant::now() + Duration::from_millis(200)),
        &mut (
            |_: FrameRef<'_>| -> Result<Flow, ()> { Ok(Flow::Continue) },
            || {
                drained += 1;
                Ok(())
            },
        ),
    );
    assert!(matches!(r, Err(RecvError::TimedOut)), "{r:?}");
    assert!(t.elapsed() >= Duration::from_millis(200));
    assert_eq!(drained, 1);

    // Frames sent later still arrive, in order, on the same receiver.
    for round in 0..3 {
        client
            .bulk
            .tx
            .send_control(ControlCode::RoundBegin { round })
            .unwrap();
    }
    client.bulk.tx.flush().unwrap();
    let mut got = Vec::new();
    let r = server.bulk.rx.run_with(
        &dec,
        Some(Instant::now() + Duration::from_secs(10)),
        &mut (
            |f: FrameRef<'_>| -> Result<Flow, ()> {
                if let FrameRef::Control(c) = f {
                    got.push(c);
                }
                Ok(if got.len() == 3 {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            },
            || Ok(()),
        ),
    );
    assert_eq!(r.unwrap(), RecvEnd::Stopped);
    assert_eq!(
        got,
        (0..3)
            .map(|round| ControlCode::RoundBegin { round })
            .collect::<Vec<_>>()
    );
}

#[test]
fn a_stray_trickling_bytes_holds_the_wait_no_longer_than_one_handshake() {
    use std::io::Write;
    let key = PskKey::generate();
    let id = MigrationId::random();
    let (l, addr) = listener();
    let cfg = LinkConfig {
        handshake_timeout: Duration::from_millis(600),
        ..LinkConfig::default()
    };
    let k2 = key.clone();
    let server = std::thread::spawn(move || accept(&l, &ServerPolicy::default(), &k2, &cfg));
    // A TLS record header announcing a 16 KiB handshake record, then a
    // byte of it every 100 ms: each read is in time, the whole never ends.
    let stray = std::thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        let _ = s.write_all(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        for _ in 0..100 {
            if s.write_all(&[0x01]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    std::thread::sleep(Duration::from_millis(50));
    // The source, behind it: its own handshake may time out while the
    // destination is busy with the stray; it tries again.
    let t = Instant::now();
    let pair = wanmig_datapath::connection::connect_with_retry(
        addr,
        id,
        geometry(),
        &key,
        &cfg,
        Instant::now() + Duration::from_secs(20),
    )
    .unwrap();
    let theirs = server.join().unwrap().unwrap();
    assert_eq!(theirs.bulk.session.migration_id, id);
    assert_eq!(pair.fault.session.migration_id, id);
    assert!(t.elapsed() < Duration::from_secs(8), "{:?}", t.elapsed());
    drop(stray);
}
