//! The Xen backends and the save/restore sides end to end over loopback,
//! on a simulated hypervisor (the nested Xen lab runs the real one).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::sim::{Event, SimXen};
use super::*;
use crate::wire::Handoff;

const SRC: u32 = 1;
const DST: u32 = 2;
const PFNS: u64 = 4096;

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "wanmig-xen-{tag}-{}-{:x}",
            std::process::id(),
            crate::wire::MigrationId::random().0[0] as u64
                | (u64::from(crate::wire::MigrationId::random().0[1]) << 8)
        ));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn key(&self, name: &str) -> PathBuf {
        let path = self.0.join(name);
        crate::wire::PskKey::generate().write_new(&path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A page that says which pfn and version it is.
fn page(pfn: u64, version: u64) -> Vec<u8> {
    let mut p = vec![0u8; XEN_PAGE_SIZE];
    for (i, chunk) in p.chunks_mut(16).enumerate() {
        chunk[..8].copy_from_slice(&pfn.to_le_bytes());
        chunk[8..].copy_from_slice(&(version ^ i as u64).to_le_bytes());
    }
    p
}

/// A PVH-like guest: RAM at 0..3000 (every 7th page zero), special pages at
/// the top of its pfn space, holes in between.
fn guest(sim: &SimXen) -> BTreeSet<u64> {
    sim.add(SRC, PFNS, true);
    sim.add(DST, PFNS, true);
    sim.with(SRC, |d| {
        for p in (0..3000).chain(PFNS - 6..PFNS) {
            if p % 7 == 3 {
                d.write(p, &[0u8; XEN_PAGE_SIZE]);
            } else {
                d.write(p, &page(p, 0));
            }
        }
        d.populated.clone()
    })
}

struct Outcome {
    save: Result<SaveReport, XenMigrationError>,
    restore: Result<RestoreReport, XenMigrationError>,
    reported: Vec<u64>,
    handoff: Handoff,
}

fn migrate(sim: &Arc<SimXen>, save_opts: &str, restore_opts: &str) -> Outcome {
    migrate_with(sim, save_opts, restore_opts, |_| {})
}

fn migrate_with(
    sim: &Arc<SimXen>,
    save_opts: &str,
    restore_opts: &str,
    before_restore: impl FnOnce(&Handoff),
) -> Outcome {
    let hv: Arc<dyn Hypervisor> = sim.clone();
    let mut save = XenSave::open(hv.clone(), SRC, save_opts).expect("save open");
    let bytes = save.handoff().expect("handoff");
    let handoff = save.handoff_info().clone();
    before_restore(&handoff);
    let ropts = restore_opts.to_string();
    let restore = std::thread::spawn(move || {
        let mut r = XenRestore::open(hv, DST, &ropts)?;
        let mut got = Vec::new();
        let rep = r.receive_memory(&bytes, &mut |pfns| {
            got.extend_from_slice(pfns);
            Ok(())
        })?;
        Ok::<_, XenMigrationError>((rep, got))
    });
    let s = sim.clone();
    let save = save.send_memory(Box::new(move || {
        s.with(SRC, |d| d.suspended = true);
        Ok(())
    }));
    let (restore, reported) = match restore.join().expect("restore thread") {
        Ok((r, got)) => (Ok(r), got),
        Err(e) => (Err(e), Vec::new()),
    };
    Outcome {
        save,
        restore,
        reported,
        handoff,
    }
}

/// The destination holds exactly the source's frames.
fn assert_same_memory(sim: &SimXen) {
    let src = sim.with(SRC, |d| {
        d.populated
            .iter()
            .map(|&p| (p, d.read(p)))
            .collect::<Vec<_>>()
    });
    let dst = sim.with(DST, |d| {
        d.populated
            .iter()
            .map(|&p| (p, d.read(p)))
            .collect::<Vec<_>>()
    });
    let src_pfns: Vec<u64> = src.iter().map(|x| x.0).collect();
    let dst_pfns: Vec<u64> = dst.iter().map(|x| x.0).collect();
    assert_eq!(src_pfns, dst_pfns, "populated pfns differ");
    for ((p, a), (_, b)) in src.iter().zip(&dst) {
        assert!(a == b, "pfn {p:#x} differs");
    }
}

#[test]
fn a_running_guest_moves_intact_with_every_frame_and_hole_in_place() {
    let sim = SimXen::new();
    guest(&sim);
    let mut version = 1;
    // The guest writes while the engine reads: some pages at every round
    // boundary and between mappings, a page given back, a hole filled.
    *sim.activity.lock().unwrap() = Some((
        SRC,
        Box::new(move |d, e| {
            version += 1;
            match e {
                Event::Clean(n) if n <= 4 => {
                    for i in 0..40 {
                        let p = (n * 97 + i * 31) % 3000;
                        d.write(p, &page(p, version));
                    }
                    if n == 1 {
                        // Given back, and a hole filled (which the dirty
                        // log does not report), while round 1 runs.
                        d.balloon_out(100);
                        d.balloon_in(3500, &page(3500, version));
                    }
                }
                Event::Map(n) if n % 3 == 0 => {
                    let p = (n * 13) % 3000;
                    d.write(p, &page(p, version));
                }
                _ => {}
            }
        }),
    ));
    let dir = TempDir::new("e2e");
    let key = dir.key("key");
    let report = dir.0.join("save.json");
    let o = migrate(
        &sim,
        &format!(
            "key={},listen=127.0.0.1:0,verify=1,downtime-ms=0,max-rounds=3,report={}",
            key.display(),
            report.display()
        ),
        &format!("key={},verify=1", key.display()),
    );
    let s = o.save.expect("save");
    let r = o.restore.expect("restore");
    assert_same_memory(&sim);
    let populated = sim.with(SRC, |d| d.populated.clone());
    assert!(populated.contains(&3500) && !populated.contains(&100));
    assert_eq!(s.populated_pages, populated.len() as u64);
    assert_eq!(r.pfns_populated, populated.len() as u64);
    assert_eq!(o.reported, populated.iter().copied().collect::<Vec<_>>());
    assert!(r.integrity.checked);
    assert_eq!(r.integrity.pages_compared, populated.len() as u64);
    assert_eq!(r.integrity.pages_differing, 0);
    assert_eq!(r.integrity.holes_compared, PFNS - populated.len() as u64);
    assert!(
        s.rounds.len() >= 2,
        "the writes forced more rounds: {:?}",
        s.rounds
    );
    // Frames were mapped only where the last scan saw data (both sides, the
    // destination's integrity reads included): the one hole ever asked for
    // is the pfn given back after round 0's scan.
    assert_eq!(
        *sim.holes_mapped.lock().unwrap(),
        BTreeSet::from([(SRC, 100)])
    );
    assert_eq!(s.pages, PFNS);
    assert!(s.pages_sent > populated.len() as u64);
    assert!(s.suspended_unix_ns >= s.started_unix_ns && s.finished_unix_ns >= s.suspended_unix_ns);
    assert_eq!(o.handoff.host, "127.0.0.1");
    // The report file holds the same figures.
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(json["populated_pages"], s.populated_pages);
    assert_eq!(json["pages_sent"], s.pages_sent);
}

#[test]
fn a_write_the_dirty_log_misses_is_caught_by_the_integrity_check() {
    let sim = SimXen::new();
    guest(&sim);
    sim.with(SRC, |d| {
        d.unlogged.insert(10);
    });
    *sim.activity.lock().unwrap() = Some((
        SRC,
        Box::new(|d, e| {
            if e == Event::Clean(1) {
                d.write(10, &page(10, 99));
            }
        }),
    ));
    let dir = TempDir::new("sabotage");
    let key = dir.key("key");
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0,verify=1", key.display()),
        &format!("key={}", key.display()),
    );
    match o.restore {
        Err(XenMigrationError::Integrity { differing, .. }) => assert_eq!(differing, 1),
        other => panic!("expected an integrity failure, got {other:?}"),
    }
}

#[test]
fn without_verify_nothing_is_checked_and_the_report_says_so() {
    let sim = SimXen::new();
    guest(&sim);
    let dir = TempDir::new("noverify");
    let key = dir.key("key");
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0", key.display()),
        &format!("key={}", key.display()),
    );
    o.save.expect("save");
    let r = o.restore.expect("restore");
    assert!(!r.integrity.checked);
    assert_eq!(r.integrity.pages_compared, 0);
    assert_same_memory(&sim);
    // A destination that insists on the check refuses such a stream.
    let sim = SimXen::new();
    guest(&sim);
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0", key.display()),
        &format!("key={},verify=1", key.display()),
    );
    assert!(
        matches!(o.restore, Err(XenMigrationError::NotChecked)),
        "{:?}",
        o.restore
    );
}

#[test]
fn a_frame_that_will_not_map_fails_the_migration_instead_of_going_out_as_zeros() {
    let sim = SimXen::new();
    guest(&sim);
    sim.with(SRC, |d| {
        d.unmappable.insert(42);
    });
    let dir = TempDir::new("unmappable");
    let key = dir.key("key");
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0", key.display()),
        &format!("key={}", key.display()),
    );
    let e = o.save.unwrap_err();
    let chain = crate::error_chain(&e);
    assert!(chain.contains("mapping a populated frame"), "{chain}");
    assert!(o.restore.is_err());
    assert!(!sim.with(SRC, |d| d.suspended));
}

#[test]
fn a_stray_connection_does_not_end_the_migration() {
    let sim = SimXen::new();
    guest(&sim);
    let dir = TempDir::new("stray");
    let key = dir.key("key");
    let o = migrate_with(
        &sim,
        &format!("key={},listen=127.0.0.1:0", key.display()),
        &format!("key={}", key.display()),
        |h| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
            s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
            drop(std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap());
        },
    );
    let s = o.save.expect("save");
    o.restore.expect("restore");
    assert!(s.refused_connections >= 1, "{}", s.refused_connections);
    assert_same_memory(&sim);
    // Only frames with data were ever mapped (as libxenguest does), never
    // the holes between them.
    assert!(sim.holes_mapped.lock().unwrap().is_empty());
}

#[test]
fn a_destination_with_another_key_fails_cleanly_and_the_guest_is_never_suspended() {
    let sim = SimXen::new();
    guest(&sim);
    let dir = TempDir::new("key");
    let (k1, k2) = (dir.key("k1"), dir.key("k2"));
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0,timeout-s=3", k1.display()),
        &format!("key={},timeout-s=3", k2.display()),
    );
    assert!(
        matches!(o.restore, Err(XenMigrationError::Network(_))),
        "{:?}",
        o.restore
    );
    // The source waited for its destination, refused the impostor, and
    // says both.
    match &o.save {
        Err(e @ XenMigrationError::NoDestination { refused: 1, .. }) => {
            let chain = crate::error_chain(e);
            assert!(chain.contains("no migration connected"), "{chain}");
            assert!(chain.contains("authentication"), "{chain}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!sim.with(SRC, |d| d.suspended));
    assert!(sim.with(DST, |d| d.populated.is_empty()));
}

#[test]
fn a_failed_suspend_fails_the_save_with_its_reason() {
    let sim = SimXen::new();
    guest(&sim);
    let dir = TempDir::new("suspend");
    let key = dir.key("key");
    let hv: Arc<dyn Hypervisor> = sim.clone();
    let mut save = XenSave::open(
        hv.clone(),
        SRC,
        &format!("key={},listen=127.0.0.1:0", key.display()),
    )
    .unwrap();
    let bytes = save.handoff().unwrap();
    let k = key.clone();
    let restore = std::thread::spawn(move || {
        XenRestore::open(hv, DST, &format!("key={}", k.display()))
            .unwrap()
            .receive_memory(&bytes, &mut |_| Ok(()))
    });
    let e = save
        .send_memory(Box::new(|| Err("the guest did not answer".into())))
        .unwrap_err();
    assert!(
        matches!(&e, XenMigrationError::Suspend(why) if why.contains("did not answer")),
        "{e:?}"
    );
    assert!(restore.join().unwrap().is_err());
}

#[test]
fn bad_domains_options_and_calls_get_typed_errors() {
    let sim = SimXen::new();
    sim.add(5, 64, false);
    sim.add(6, 64, true);
    sim.with(6, |d| d.dying = true);
    sim.add(7, 64, true);
    sim.with(7, |d| {
        d.write(0, &page(0, 0));
        d.no_log_dirty = true;
    });
    let dir = TempDir::new("bad");
    let key = dir.key("key");
    let hv: Arc<dyn Hypervisor> = sim.clone();
    let opts = format!("key={},listen=127.0.0.1:0", key.display());
    let err = |domid, o: &str| XenSave::open(hv.clone(), domid, o).unwrap_err();
    assert!(matches!(
        err(9, &opts),
        XenMigrationError::Xen(XenError::NoDomain { domid: 9 })
    ));
    assert!(matches!(
        err(0, &opts),
        XenMigrationError::Xen(XenError::Unsupported { .. })
    ));
    assert!(matches!(
        err(5, &opts),
        XenMigrationError::Xen(XenError::Unsupported { .. })
    ));
    assert!(matches!(
        err(6, &opts),
        XenMigrationError::Xen(XenError::Unsupported { .. })
    ));
    for (o, name) in [
        ("", "key"),
        ("m=1", "key"),
        ("key=/x,bogus=1", "bogus"),
        ("key=/x,m=2", "m"),
        ("key=/x,m", "m"),
        ("key=/x,key=/y", "key"),
        ("key=/x,verify=maybe", "verify"),
        ("key=/x,segment=s", "segment"),
        ("key=/x,listen=nowhere", "listen"),
        ("key=/x,advertise=a b", "advertise"),
    ] {
        match err(7, o) {
            XenMigrationError::Option { name: n, .. } => assert_eq!(n, name, "{o}"),
            e => panic!("{o}: {e:?}"),
        }
    }
    assert!(matches!(
        err(7, "key=/x,m=0.5"),
        XenMigrationError::Unsupported(_)
    ));
    assert!(matches!(
        err(7, "key=/x,s=0.5"),
        XenMigrationError::Unsupported(_)
    ));
    assert!(matches!(
        err(7, "key=/nonexistent/key"),
        XenMigrationError::Key { .. }
    ));
    // A report file that cannot be written fails the open, before anything
    // is migrated (not the migration once it is done).
    assert!(matches!(
        err(7, &format!("{opts},report=/nonexistent/dir/save.json")),
        XenMigrationError::Report { .. }
    ));
    // Out of order; then nobody dials.
    let mut save = XenSave::open(hv.clone(), 7, &opts).unwrap();
    assert!(matches!(
        save.send_memory(Box::new(|| Ok(()))),
        Err(XenMigrationError::State(_))
    ));
    let mut save = XenSave::open(hv.clone(), 7, &format!("{opts},timeout-s=1")).unwrap();
    save.handoff().unwrap();
    // Nobody dials: the wait ends, the guest was never touched.
    assert!(matches!(
        save.send_memory(Box::new(|| Ok(()))),
        Err(XenMigrationError::Network(_))
    ));
    assert!(matches!(save.handoff(), Err(XenMigrationError::State(_))));
    // The restore side: a hand-off that is not one, and one that claims a
    // pfn space this domain could never have.
    let mut r = XenRestore::open(hv.clone(), 7, &format!("key={}", key.display())).unwrap();
    assert!(matches!(
        r.receive_memory(b"not a hand-off", &mut |_| Ok(())),
        Err(XenMigrationError::Handoff(_))
    ));
    let huge = Handoff {
        migration_id: crate::wire::MigrationId([1; 16]),
        geometry: crate::wire::Geometry::new(4096, 1 << 40, 1 << 16, 0, 0),
        host: "127.0.0.1".into(),
        port: 9,
    }
    .encode()
    .unwrap();
    let mut r = XenRestore::open(hv.clone(), 7, &format!("key={}", key.display())).unwrap();
    match r.receive_memory(&huge, &mut |_| Ok(())) {
        Err(XenMigrationError::Unsupported(why)) => assert!(why.contains("pfns"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_hypervisor_without_log_dirty_fails_the_save_before_any_suspend() {
    let sim = SimXen::new();
    guest(&sim);
    sim.with(SRC, |d| d.no_log_dirty = true);
    let dir = TempDir::new("nold");
    let key = dir.key("key");
    let o = migrate(
        &sim,
        &format!("key={},listen=127.0.0.1:0", key.display()),
        &format!("key={}", key.display()),
    );
    let e = o.save.unwrap_err();
    let chain = crate::error_chain(&e);
    assert!(chain.contains("log-dirty"), "{chain}");
    assert!(o.restore.is_err());
    assert!(!sim.with(SRC, |d| d.suspended));
}

#[test]
fn the_dest_batches_pages_and_a_rewritten_page_keeps_its_last_contents() {
    let sim = SimXen::new();
    sim.add(DST, 1024, true);
    let hv: Arc<dyn Hypervisor> = sim.clone();
    let mut d = XenDest::new(hv, DST, 1024).unwrap();
    use crate::backend::DestBackend;
    for p in 0..600 {
        d.write_page(p, &page(p, 1)).unwrap();
    }
    d.write_page(5, &page(5, 2)).unwrap();
    d.zero_page(700, false).unwrap();
    d.write_page(800, &page(800, 1)).unwrap();
    d.hole_page(800, true).unwrap();
    d.track_writes().unwrap();
    sim.with(DST, |s| {
        assert_eq!(s.populated.len(), 601);
        assert_eq!(s.read(5), page(5, 2));
        assert_eq!(s.read(599), page(599, 1));
        assert!(s.populated.contains(&700) && !s.populated.contains(&800));
    });
    let mut out = vec![0u8; XEN_PAGE_SIZE];
    d.read_page(5, &mut out).unwrap();
    assert_eq!(out, page(5, 2));
    assert!(d.is_hole(800) && !d.is_hole(700));
    assert!(d.write_page(1024, &page(0, 0)).is_err());
}
