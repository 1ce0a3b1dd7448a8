//! Migrations that fail before the commit, with real QEMU guests: the guest
//! must go on running at the source, intact (its page checker keeps its
//! heartbeat with 0 errors), and nothing may hang or leak.
//!
//! - A destination QEMU that refuses the device state (it lacks a device the
//!   source has): the destination answers `Abort` instead of `Loaded`, the
//!   source never commits and resumes the guest.
//! - A source that cannot connect: `run_local` returns at once (the
//!   destination stops waiting for connections) and hands the running source
//!   QEMU back inside the error, its RAM file still there; the destination's
//!   files are gone. The same guest then survives a device-state save that
//!   fails while QEMU's migration is under way: that migration is cancelled
//!   and over before the guest is resumed.
//!
//! - A bulk connection that breaks after the commit, half-way through the
//!   post-copy push: the destination owns the guest, fetches every page
//!   still missing over the fault connection, releases the guest, and the
//!   guest's checker finds every page intact.
//!
//! Loopback connections, small guests: these tests are about correctness.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wanmig_datapath::backend::qemu::{
    GuestSpec, QemuDest, QemuPaths, QemuSource, SerialLog, devstate,
};
use wanmig_datapath::backend::{BackendError, SourceBackend};
use wanmig_datapath::connection::{self, ConnectError, LinkConfig};
use wanmig_datapath::engine::{
    DestConfig, EngineError, PageOrder, SourceConfig, run_destination, run_source,
};
use wanmig_datapath::migration::{LocalMigration, MigrationError, Planning, run_local};
use wanmig_datapath::qemu::{MigrationStatus, RunState};
use wanmig_datapath::wire::{AbortReason, ConnKind, Geometry, MigrationId, PskKey, ServerPolicy};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const PARAMS: &str = "wanmig.workload=pagecheck wanmig.rate=4";

fn guest() -> GuestSpec {
    GuestSpec::builtin(256, PARAMS).expect("run scripts/setup to build the guest image")
}

fn run_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("wanmig-test-{tag}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Removes files when dropped (a failing test leaves no RAM file behind).
struct Files(Vec<std::path::PathBuf>);

impl Drop for Files {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The guest at the source runs, and its checker goes on with 0 errors.
fn assert_runs_intact(source: &mut QemuSource, log: &mut SerialLog) {
    let status = source.process().qmp().query_status().unwrap();
    assert_eq!(status.status, RunState::Running);
    let after = Instant::now();
    assert!(
        log.wait_heartbeats(2, after, Duration::from_secs(30))
            .unwrap(),
        "the source guest does not run"
    );
    assert_eq!(log.last_heartbeat().unwrap().errors, 0);
    assert_eq!(
        log.error_lines().count(),
        0,
        "{:?}",
        log.error_lines().collect::<Vec<_>>()
    );
}

#[test]
fn a_destination_that_refuses_the_device_state_leaves_the_guest_running_at_the_source() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("tload{}", std::process::id());
    let dir = run_dir(&tag);
    let dest_guest = guest();
    // The source has a device the destination lacks: QEMU refuses the stream.
    let mut source_guest = dest_guest.clone();
    source_guest.extra_args = vec!["-device".into(), "virtio-rng-pci".into()];
    let (sp, dp) = (
        QemuPaths::new(&dir, &tag, "source"),
        QemuPaths::new(&dir, &tag, "destination"),
    );
    let _files = Files(vec![sp.ram.clone(), dp.ram.clone()]);
    let mut source = QemuSource::start(&source_guest, &sp, &dir).unwrap();
    let mut log = SerialLog::new(&sp.serial);
    assert!(
        log.wait_heartbeats(1, Instant::now(), Duration::from_secs(120))
            .unwrap()
    );
    let mut dest = QemuDest::start(&dest_guest, &dp, &dir).unwrap();

    let pages = source.page_count();
    let geometry = Geometry::new(4096, pages, 64 << 10, 1, source.device_state_max());
    let (key, id) = (PskKey::generate(), MigrationId::random());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let k2 = key.clone();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let pair =
                connection::accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
                    .unwrap();
            run_destination(&mut dest, pair, &DestConfig::default())
        });
        let pair = connection::connect(addr, id, geometry, &key, &LinkConfig::default()).unwrap();
        let order = PageOrder::by_address(pages, 0.5).unwrap();
        let s = run_source(&mut source, pair, &order, &SourceConfig::default());
        (s, d.join().unwrap())
    });
    assert!(
        matches!(
            s,
            Err(EngineError::Aborted {
                peer: "destination",
                reason: AbortReason::DestinationFailed
            })
        ),
        "source: {s:?}"
    );
    assert!(
        matches!(d, Err(EngineError::Backend(_))),
        "destination: {d:?}"
    );
    assert_runs_intact(&mut source, &mut log);
    drop((source, dest));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_source_that_cannot_connect_keeps_its_guest_and_a_failed_save_leaves_it_resumable() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("tconn{}", std::process::id());
    let dir = run_dir(&tag);
    let spec = LocalMigration {
        guest: guest(),
        planning: Planning::Fixed { m: 0.5, s: 0.0 },
        source: SourceConfig::default(),
        dest: DestConfig::default(),
        link: LinkConfig::default(),
        run_dir: dir.clone(),
        tag: tag.clone(),
        warmup_heartbeats: 1,
        warmup_disk_heartbeats: 0,
        observe_heartbeats: 1,
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    // run_local in a thread: a destination stuck waiting for connections
    // that never come must not hang the caller.
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    let spec2 = spec.clone();
    let started = Instant::now();
    std::thread::spawn(move || {
        let r = run_local(
            &spec2,
            listener,
            |addr: SocketAddr, _, _: Geometry, _: &PskKey, _| {
                Err(ConnectError::Tcp {
                    conn: ConnKind::Bulk,
                    peer: addr,
                    source: std::io::ErrorKind::ConnectionRefused.into(),
                })
            },
        );
        let _ = done_tx.send((r, Instant::now()));
    });
    let (r, failed_at) = done_rx
        .recv_timeout(Duration::from_secs(150))
        .expect("run_local hangs when the source cannot connect");
    let e = r.unwrap_err();
    let MigrationError::SourceKept { cause, kept } = e else {
        panic!("the source guest was not handed back: {e:?}");
    };
    assert!(
        matches!(*cause, MigrationError::Connect(ConnectError::Tcp { .. })),
        "{cause:?}"
    );
    // Nothing of the destination is left; the source's RAM file is in use.
    let (sp, dp) = (
        QemuPaths::new(&dir, &tag, "source"),
        QemuPaths::new(&dir, &tag, "destination"),
    );
    for gone in [&dp.ram, &dp.uffd_sock, &sp.uffd_sock] {
        assert!(!gone.exists(), "{} left behind", gone.display());
    }
    assert!(sp.ram.exists());
    let mut kept = *kept;
    // Well before the destination's own accept deadline (60 s): the failed
    // connect called it off.
    let took = failed_at.duration_since(started);
    assert!(took < Duration::from_secs(45), "run_local took {took:?}");
    assert_runs_intact(&mut kept.source, &mut kept.source_log);

    // The same guest, paused for a device-state save that fails while QEMU's
    // migration is under way (here: QEMU does not connect within the
    // limit): that migration is over when the save returns, and the guest
    // resumes.
    kept.source.pause().unwrap();
    let sock = dir.join("source.migrate");
    let saved = devstate::save(
        kept.source.process().qmp(),
        &sock,
        Duration::from_millis(1),
        &mut |_piece| Err(BackendError::new("test", "sending", "the link broke")),
    );
    assert!(saved.is_err());
    let status = kept.source.process().qmp().query_migrate().unwrap().status;
    assert!(
        matches!(
            status,
            None | Some(
                MigrationStatus::Cancelled | MigrationStatus::Failed | MigrationStatus::Completed
            )
        ),
        "QEMU's migration still runs: {status:?}"
    );
    kept.source.resume().unwrap();
    assert_runs_intact(&mut kept.source, &mut kept.source_log);

    let ram = kept.paths.ram.clone();
    drop(kept);
    assert!(!ram.exists(), "the source RAM file outlives its QEMU");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Forwards `from` to `to`; the source-to-destination direction of the bulk
/// connection (`limit`) is cut, both ways, after that many bytes.
fn pump(mut from: TcpStream, mut to: TcpStream, limit: Option<u64>) {
    let mut buf = vec![0u8; 64 << 10];
    let mut forwarded = 0u64;
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if limit.is_some_and(|l| forwarded + n as u64 > l) {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        if to.write_all(&buf[..n]).is_err() {
            return;
        }
        forwarded += n as u64;
    }
}

#[test]
fn a_bulk_connection_broken_after_the_commit_is_made_up_for_over_the_fault_connection() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("tcut{}", std::process::id());
    let dir = run_dir(&tag);
    let (sp, dp) = (
        QemuPaths::new(&dir, &tag, "source"),
        QemuPaths::new(&dir, &tag, "destination"),
    );
    let _files = Files(vec![sp.ram.clone(), dp.ram.clone()]);
    let mut source = QemuSource::start(&guest(), &sp, &dir).unwrap();
    let mut source_log = SerialLog::new(&sp.serial);
    assert!(
        source_log
            .wait_heartbeats(1, Instant::now(), Duration::from_secs(120))
            .unwrap()
    );
    let mut dest = QemuDest::start(&guest(), &dp, &dir).unwrap();

    let pages = source.page_count();
    let geometry = Geometry::new(4096, pages, 64 << 10, 1, source.device_state_max());
    let (key, id) = (PskKey::generate(), MigrationId::random());
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let dest_addr = l.local_addr().unwrap();
    // A proxy in front of the destination. With M = 0 almost everything on
    // the bulk connection is the push after the commit: cut it 4 MiB in.
    let proxy = TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = proxy.local_addr().unwrap();
    std::thread::spawn(move || {
        for i in 0..2 {
            let (down, _) = proxy.accept().unwrap();
            let up = TcpStream::connect(dest_addr).unwrap();
            let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let limit = (i == 0).then_some(4 << 20);
            std::thread::spawn(move || pump(down, up, limit));
            std::thread::spawn(move || pump(u2, d2, None));
        }
    });
    let k2 = key.clone();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let pair =
                connection::accept(&l, &ServerPolicy::default(), &k2, &LinkConfig::default())
                    .unwrap();
            run_destination(&mut dest, pair, &DestConfig::default())
        });
        let pair =
            connection::connect(proxy_addr, id, geometry, &key, &LinkConfig::default()).unwrap();
        let order = PageOrder::by_address(pages, 0.0).unwrap();
        let s = run_source(&mut source, pair, &order, &SourceConfig::default());
        (s, d.join().unwrap())
    });
    assert!(s.is_err(), "the source saw its bulk connection break");
    let d = d.unwrap_or_else(|e| panic!("the destination gave up: {e}"));
    assert!(d.swept_pages > 0, "nothing was left to fetch: {d:#?}");
    assert!(d.late_error.is_some() && d.integrity.is_none(), "{d:#?}");

    // The guest runs on at the destination, every page intact.
    let resumed = d.times.unwrap().resumed;
    let mut log = SerialLog::new(&dp.serial);
    assert!(
        log.wait_heartbeats(3, resumed, Duration::from_secs(60))
            .unwrap(),
        "the guest does not run at the destination"
    );
    let last_src = source_log.last_heartbeat().unwrap();
    let hb = log.last_heartbeat().unwrap();
    assert!(hb.n > last_src.n, "the heartbeat goes on where it was");
    assert_eq!(hb.errors, 0);
    assert_eq!(
        log.error_lines().count(),
        0,
        "{:?}",
        log.error_lines().collect::<Vec<_>>()
    );
    drop((source, dest));
    let _ = std::fs::remove_dir_all(&dir);
}
