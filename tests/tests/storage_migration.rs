//! A running QEMU guest with a virtio disk migrated across the emulated WAN:
//! memory and disk under one plan (M, S). The disk is an NBD export of the
//! engine on both sides; the guest's disk checker (`wanmig.disk=check`:
//! tagged 4 KiB blocks written and read with O_DIRECT) runs through the
//! migration beside its page checker. Every test asserts what the guest and
//! the images say:
//! - both checkers report 0 errors and the disk checker keeps its heartbeat
//!   at the destination;
//! - the report's integrity section shows 0 differing pages and 0 differing
//!   chunks (destination chunks the guest has not written since the resume,
//!   against digests of the source's frozen disk);
//! - with the destination held paused until everything arrived, its image
//!   equals the source's frozen image byte for byte;
//! - blind whole-block rewrites at the destination are counted as
//!   whole-block overwrites (no fetch for them), and unaligned (split)
//!   writes go through fetch-then-merge, every byte kept.
//!
//! 256 MiB guests, a 64 MiB disk (32 MiB checked), 400 Mbit/s, 2 ms: these
//! tests are about correctness. One at a time (two TCG guests each).

use std::sync::Mutex;
use std::time::Duration;

use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec, Heartbeat};
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, LocalOutcome, Planning, run_over_wan};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const DISK_MIB: u64 = 64;
const CHUNK: u64 = 64 << 10;

fn migrate(name: &str, m: f64, s: f64, disk_params: &str, hold: bool) -> LocalOutcome {
    let params = format!("wanmig.disk=check wanmig.diskmib=32 {disk_params}");
    migrate_with(name, Planning::Fixed { m, s }, &params, CHUNK, 1, hold)
}

/// [`migrate`] with a second disk, `/dev/vdb`, under sysbench fileio.
fn migrate_two(name: &str, m: f64, s: f64, disk_params: &str, hold: bool) -> LocalOutcome {
    let params = format!(
        "wanmig.disk=check,sysbench wanmig.diskmib=32 wanmig.sbdev=/dev/vdb wanmig.sbmib=32 \
         wanmig.sbrate=100 {disk_params}"
    );
    migrate_with(name, Planning::Fixed { m, s }, &params, CHUNK, 2, hold)
}

/// The guest (page checker beside `disk_params`' disk workloads) with
/// `disks` disks of 64 MiB migrated with `planning` and chunks of
/// `chunk_size`.
fn migrate_with(
    name: &str,
    planning: Planning,
    disk_params: &str,
    chunk_size: u64,
    disks: usize,
    hold: bool,
) -> LocalOutcome {
    let params = format!("wanmig.workload=pagecheck wanmig.mib=32 wanmig.rate=2 {disk_params}");
    let mut guest = GuestSpec::builtin(256, &params).expect("run scripts/setup");
    for _ in 0..disks {
        guest.disks.push(DiskSpec {
            size: DISK_MIB << 20,
            image: None,
        });
    }
    guest.chunk_size = chunk_size;
    let tag = format!("{name}{}", std::process::id());
    let spec = LocalMigration {
        guest,
        planning,
        source: SourceConfig::default(),
        dest: DestConfig {
            hold,
            ..DestConfig::default()
        },
        link: LinkConfig::default(),
        run_dir: std::env::temp_dir().join(format!("wanmig-test-{tag}")),
        tag,
        warmup_heartbeats: 3,
        warmup_disk_heartbeats: 2,
        observe_heartbeats: 3,
    };
    let wan = Wan::up(WanConfig::new(
        name,
        "400mbit".parse().unwrap(),
        Duration::from_millis(2),
    ))
    .unwrap();
    run_over_wan(&spec, &wan).unwrap_or_else(|e| panic!("migration failed: {e:?}"))
}

/// The integrity section, the chunk count and the logs of a migration of
/// 64 MiB disks in chunks of `chunk_size`.
fn assert_same_bytes(o: &LocalOutcome, chunk_size: u64) {
    let r = &o.report;
    let i = r.integrity;
    assert_eq!(i.pages_differing, 0, "{:#?}", r.integrity);
    assert_eq!(i.chunks_differing, 0, "{:#?}", r.integrity);
    assert_eq!(i.checker_errors, 0, "{:#?}", r.integrity);
    assert!(i.chunks_compared > 0, "{i:?}");
    assert!(r.storage.is_some());
    let st = r.source.storage.as_ref().unwrap();
    let disks = o.source_paths.disk_image(1).exists() as u64 + 1;
    assert_eq!(st.chunks, disks * (DISK_MIB << 20) / chunk_size);
    for log in [&o.source_log, &o.dest_log] {
        assert_eq!(
            log.error_lines().count(),
            0,
            "{:?}",
            log.error_lines().collect::<Vec<_>>()
        );
    }
}

/// Which heartbeats of the guest's console.
#[derive(Clone, Copy, Debug)]
enum Beat {
    /// The disk checker's.
    Check,
    /// sysbench's.
    Sysbench,
}

impl Beat {
    fn of(self, log: &wanmig_datapath::backend::qemu::SerialLog) -> Vec<Heartbeat> {
        let all = match self {
            Beat::Check => log.disk_heartbeats(),
            Beat::Sysbench => log.sysbench_heartbeats(),
        };
        all.iter().map(|(_, h)| *h).collect()
    }
}

/// The disk workload's heartbeats after the source's last: at least three
/// at the destination (waited for), none reporting an error.
fn heartbeats_after_resume(o: &mut LocalOutcome, beat: Beat) -> (Heartbeat, Vec<Heartbeat>) {
    let last_src = *beat.of(&o.source_log).last().expect("source heartbeat");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        o.dest_log.poll().unwrap();
        let after: Vec<_> = beat
            .of(&o.dest_log)
            .into_iter()
            .filter(|h| h.n > last_src.n)
            .collect();
        if after.len() >= 3 {
            assert!(after.iter().all(|h| h.errors == 0), "{after:?}");
            assert_eq!(
                o.dest_log.error_lines().count(),
                0,
                "{:?}",
                o.dest_log.error_lines().collect::<Vec<_>>()
            );
            return (last_src, after);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the disk workload ({beat:?}) stalled at the destination: {after:?} after {last_src:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// What every migration with the disk checker must show.
fn assert_intact(o: &mut LocalOutcome, held: bool) {
    assert_same_bytes(o, CHUNK);
    if held {
        // Nothing ran at the destination yet.
        return;
    }
    // The disk checker goes on at the destination, with no error: three
    // heartbeats after the source's last (numbers skip after a stall), and
    // it has verified blocks since.
    let (last_src, after) = heartbeats_after_resume(o, Beat::Check);
    if o.source_log.disk_workloads().contains(&"sysbench") {
        heartbeats_after_resume(o, Beat::Sysbench);
    }
    let last = after.last().unwrap();
    assert!(
        last.verified > last_src.verified,
        "{last:?} after {last_src:?}"
    );
}

#[test]
fn s1_is_classic_precopy_of_the_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate_two(
        "ts1",
        0.5,
        1.0,
        "wanmig.diskrate=1 wanmig.diskreadrate=4",
        false,
    );
    assert_intact(&mut o, false);
    let st = o.report.source.storage.clone().unwrap();
    assert_eq!(st.chunks_pushed + st.chunks_skipped, 0, "{st:?}");
    assert_eq!(o.report.storage.unwrap().chunks_fetched, 0);
    // The run's disks go with it (they live in the run directory).
    let files: Vec<_> = (0..2)
        .flat_map(|i| {
            [
                o.source_paths.disk_image(i),
                o.dest_paths.disk_image(i),
                o.dest_paths.disk_presence(i),
            ]
        })
        .collect();
    assert!(files.iter().all(|f| f.exists()), "{files:?}");
    o.cleanup();
    let left: Vec<_> = files.iter().filter(|f| f.exists()).collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn s0_is_post_copy_of_the_disk_with_on_demand_fetch() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate(
        "ts0",
        0.5,
        0.0,
        "wanmig.diskrate=1 wanmig.diskreadrate=8",
        false,
    );
    assert_intact(&mut o, false);
    let st = o.report.source.storage.clone().unwrap();
    assert_eq!(st.precopy_sends + st.remainder_chunks, 0, "{st:?}");
    assert_eq!(st.chunks_pushed + st.chunks_skipped, st.chunks, "{st:?}");
    o.cleanup();
}

#[test]
fn half_the_disk_precopied_under_a_write_heavy_checker() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate_two(
        "tsh",
        0.5,
        0.5,
        "wanmig.diskrate=8 wanmig.diskreadrate=8 wanmig.diskpattern=rand",
        false,
    );
    assert_intact(&mut o, false);
    let st = o.report.source.storage.clone().unwrap();
    assert!(
        st.precopy_sends > st.precopy_chunks || st.remainder_chunks > 0,
        "a writer rewrites pre-copied chunks: {st:?}"
    );
    o.cleanup();
}

#[test]
fn a_held_destination_image_equals_the_frozen_source_image() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate_two("tshold", 0.5, 0.5, "wanmig.diskrate=2", true);
    assert_intact(&mut o, true);
    // Both disks: the checker's and sysbench's file system.
    for disk in 0..2 {
        let src = std::fs::read(o.source_paths.disk_image(disk)).unwrap();
        let dst = std::fs::read(o.dest_paths.disk_image(disk)).unwrap();
        assert_eq!(src.len(), dst.len());
        let differing = src
            .chunks(4096)
            .zip(dst.chunks(4096))
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing, 0,
            "disk {disk}: blocks differ between the frozen source and the held destination"
        );
        assert!(src.iter().any(|&b| b != 0), "disk {disk} was written");
    }
    o.cleanup();
}

#[test]
fn blind_whole_block_rewrites_need_no_fetch_and_split_writes_merge() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    // Whole 4 KiB blocks rewritten without a read first, reads slow: at the
    // destination most rewrites land on absent blocks.
    let mut o = migrate(
        "tsw",
        0.5,
        0.0,
        "wanmig.diskrate=4 wanmig.diskreadrate=1 wanmig.diskblind=1 wanmig.diskpattern=rand",
        false,
    );
    assert_intact(&mut o, false);
    let s = o.report.storage.unwrap();
    assert!(s.whole_block_overwrites > 0, "{s:?}");
    o.cleanup();
    // Every block written in two direct writes cut at 512-byte boundaries:
    // absent blocks are fetched, then merged.
    let mut o = migrate(
        "tsu",
        0.5,
        0.0,
        "wanmig.diskrate=4 wanmig.diskreadrate=1 wanmig.disksplit=1 wanmig.diskblind=1 \
         wanmig.diskpattern=rand",
        false,
    );
    assert_intact(&mut o, false);
    let s = o.report.storage.unwrap();
    assert!(s.partial_block_merges > 0, "{s:?}");
    o.cleanup();
}

/// sysbench fileio (`wanmig.disk=sysbench`): an ext2 file system on the
/// disk, 4 files of 8 MiB read and rewritten at random in 4 KiB O_DIRECT
/// requests, every read checked against the checksum sysbench wrote.
const SYSBENCH: &str = "wanmig.disk=sysbench wanmig.sbmib=32 wanmig.sbrate=150";

/// What a migration under sysbench must show: the same bytes, and sysbench
/// going on at the destination without a validation error.
fn assert_sysbench_goes_on(o: &mut LocalOutcome, chunk_size: u64) {
    assert_same_bytes(o, chunk_size);
    assert!(
        o.source_log
            .lines()
            .iter()
            .any(|l| l.starts_with("DISKSB-START")),
        "sysbench never started"
    );
    heartbeats_after_resume(o, Beat::Sysbench);
}

#[test]
fn sysbench_fileio_validates_every_read_across_a_post_copy_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate_with(
        "tsb0",
        Planning::Fixed { m: 0.5, s: 0.0 },
        SYSBENCH,
        CHUNK,
        1,
        false,
    );
    assert_sysbench_goes_on(&mut o, CHUNK);
    let st = o.report.storage.unwrap();
    assert!(
        st.chunks_fetched > 0,
        "sysbench reads absent chunks: {st:?}"
    );
    o.cleanup();
}

#[test]
fn a_profiled_plan_ranks_the_chunks_sysbench_uses_and_takes_any_chunk_size() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let chunk = 256 << 10;
    let profile =
        std::env::temp_dir().join(format!("wanmig-test-sbprof{}.wmp", std::process::id()));
    let planning = Planning::ProfileNow {
        path: profile.clone(),
        samples: 8,
        interval: Duration::from_millis(250),
        rate: "400mbit".parse().unwrap(),
        rtt: Duration::from_millis(2),
        downtime_target: None,
    };
    let mut o = migrate_with("tsbp", planning, SYSBENCH, chunk, 1, false);
    assert_sysbench_goes_on(&mut o, chunk);
    // The profile saw the disk: sysbench's chunks read and written.
    let p = wanmig_planner::profile::Profile::open(&profile).unwrap();
    assert_eq!(p.header().chunk_count, (DISK_MIB << 20) / chunk);
    assert_eq!(u64::from(p.header().chunk_size), chunk);
    let mut used = Vec::new();
    p.for_each(wanmig_planner::profile::Kind::Chunk, |c, u| {
        if u.r > 0 || u.w > 0 {
            used.push(c)
        }
    })
    .unwrap();
    assert!(!used.is_empty(), "no chunk read or written while profiling");
    assert!(
        o.report.plan_origin.contains("chunks read"),
        "{}",
        o.report.plan_origin
    );
    // Ranked as in the model: a pre-copy set smaller than the chunks the
    // guest used holds only used chunks; a larger one holds them all.
    let st = o.report.source.storage.clone().unwrap();
    let precopied = o
        .order
        .chunks()
        .expect("chunks in the order")
        .precopy()
        .to_vec();
    assert_eq!(precopied.len() as u64, st.precopy_chunks);
    if precopied.len() <= used.len() {
        assert!(
            precopied.iter().all(|c| used.contains(c)),
            "{precopied:?} vs {used:?}"
        );
    } else {
        assert!(
            used.iter().all(|c| precopied.contains(c)),
            "{precopied:?} vs {used:?}"
        );
    }
    o.cleanup();
    let _ = std::fs::remove_file(&profile);
}
