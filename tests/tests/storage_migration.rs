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

use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, LocalOutcome, Planning, run_over_wan};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const DISK_MIB: u64 = 64;

fn migrate(name: &str, m: f64, s: f64, disk_params: &str, hold: bool) -> LocalOutcome {
    let params = format!(
        "wanmig.workload=pagecheck wanmig.mib=32 wanmig.rate=2 wanmig.disk=check \
         wanmig.diskmib=32 {disk_params}"
    );
    let mut guest = GuestSpec::builtin(256, &params).expect("run scripts/setup");
    guest.disks.push(DiskSpec {
        size: DISK_MIB << 20,
        image: None,
    });
    let tag = format!("{name}{}", std::process::id());
    let spec = LocalMigration {
        guest,
        planning: Planning::Fixed { m, s },
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

/// What every migration with a disk must show.
fn assert_intact(o: &mut LocalOutcome, held: bool) {
    let r = &o.report;
    let i = r.integrity;
    assert_eq!(i.pages_differing, 0, "{:#?}", r.integrity);
    assert_eq!(i.chunks_differing, 0, "{:#?}", r.integrity);
    assert_eq!(i.checker_errors, 0, "{:#?}", r.integrity);
    assert!(i.chunks_compared > 0, "{i:?}");
    assert!(r.storage.is_some());
    let st = r.source.storage.as_ref().unwrap();
    assert_eq!(st.chunks, DISK_MIB * 16);
    assert_eq!(
        o.dest_log.error_lines().count(),
        0,
        "{:?}",
        o.dest_log.error_lines().collect::<Vec<_>>()
    );
    if held {
        // Nothing ran at the destination yet.
        return;
    }
    // The disk checker goes on at the destination, with no error: three
    // heartbeats after the source's last (numbers skip after a stall).
    let last_src = o.source_log.last_disk_heartbeat().expect("source DHB");
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let after = loop {
        o.dest_log.poll().unwrap();
        let after: Vec<_> = o
            .dest_log
            .disk_heartbeats()
            .iter()
            .map(|(_, h)| *h)
            .filter(|h| h.n > last_src.n)
            .collect();
        if after.len() >= 3 {
            break after;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the disk checker stalled at the destination: {after:?} after {last_src:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let last = after.last().unwrap();
    assert_eq!(last.errors, 0, "{last:?}");
    assert!(
        last.verified > last_src.verified,
        "{last:?} after {last_src:?}"
    );
    assert_eq!(o.dest_log.error_lines().count(), 0);
}

#[test]
fn s1_is_classic_precopy_of_the_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate(
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
    o.cleanup();
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
    let mut o = migrate(
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
    let mut o = migrate("tshold", 0.5, 0.5, "wanmig.diskrate=2", true);
    assert_intact(&mut o, true);
    let src = std::fs::read(o.source_paths.disk_image(0)).unwrap();
    let dst = std::fs::read(o.dest_paths.disk_image(0)).unwrap();
    assert_eq!(src.len(), dst.len());
    let differing = src
        .chunks(4096)
        .zip(dst.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(
        differing, 0,
        "blocks differ between the frozen source and the held destination"
    );
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
