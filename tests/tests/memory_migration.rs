//! A running QEMU guest migrated across the emulated WAN by the project's own
//! engine (memory: pre-copy of M, freeze, post-copy of the rest), with the
//! guest's page checker running inside. Every test asserts what the guest and
//! the memory say, not what the engine's counters say:
//! - the checker reports 0 errors and keeps its heartbeat at the destination;
//! - the report's integrity section (destination pages the guest has not
//!   written since the resume, against digests of the source's frozen pages)
//!   shows 0 differing pages;
//! - with the destination held paused until every page arrived, its RAM file
//!   equals the source's frozen RAM file byte for byte.
//!
//! M = 1 and M = 0 each run under a light writer (4 MiB/s) and a heavy one
//! (96 MiB rewritten at 48 MiB/s); M = 0.5 under the heavy one, stress-ng's
//! vm stressor and (held) a 16 MiB/s writer.
//!
//! The link runs at 400 Mbit/s, 2 ms: these tests are about correctness, the
//! WAN timing is the benchmarks' business. They run one at a time (each runs
//! two TCG guests on a 2-core machine).

use std::os::unix::fs::FileExt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{
    FreezePolicy, LocalMigration, LocalOutcome, Planning, run_over_wan,
};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn migrate(name: &str, m: f64, params: &str, hold: bool) -> LocalOutcome {
    migrate_with(name, Planning::Fixed { m, s: 0.0 }, params, hold)
}

fn migrate_with(name: &str, planning: Planning, params: &str, hold: bool) -> LocalOutcome {
    migrate_over(
        name,
        planning,
        params,
        hold,
        "400mbit",
        Duration::from_millis(2),
    )
}

fn migrate_over(
    name: &str,
    planning: Planning,
    params: &str,
    hold: bool,
    rate: &str,
    rtt: Duration,
) -> LocalOutcome {
    migrate_guest(name, planning, params, 0, hold, rate, rtt)
}

/// [`migrate_over`] for a guest with a disk of `disk_mib` MiB (0: none).
fn migrate_guest(
    name: &str,
    planning: Planning,
    params: &str,
    disk_mib: u64,
    hold: bool,
    rate: &str,
    rtt: Duration,
) -> LocalOutcome {
    let mut guest =
        GuestSpec::builtin(256, params).expect("run scripts/setup to build the guest image");
    if disk_mib > 0 {
        guest.disks.push(DiskSpec {
            size: disk_mib << 20,
            image: None,
        });
    }
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
        warmup_disk_heartbeats: usize::from(disk_mib > 0) * 2,
        observe_heartbeats: 3,
    };
    let wan = Wan::up(WanConfig::new(name, rate.parse().unwrap(), rtt)).unwrap();
    run_over_wan(&spec, &wan).unwrap_or_else(|e| panic!("migration failed: {e}"))
}

/// What every migration must show.
fn assert_intact(o: &LocalOutcome) {
    // Most of the 65536 pages are compared, populated pages and holes (the
    // rest the guest rewrote since).
    assert_intact_comparing(o, 40_000)
}

/// [`assert_intact`], with more than `compared` pages and holes compared.
fn assert_intact_comparing(o: &LocalOutcome, compared: u64) {
    let i = o.report.integrity;
    assert!(i.holds(), "{:?}: {:#?}", i.failures(), o.report);
    assert_eq!(i.pages_differing, 0, "{:#?}", o.report);
    assert_eq!(i.checker_errors, 0, "{:#?}", o.report);
    assert!(
        i.pages_compared + i.holes_compared > compared,
        "too few pages compared: {i:?}"
    );
    // The source's own downtime figure (no shared clock: its pause to the
    // destination's Resumed, minus half the RTT) agrees with the same-clock
    // one, within scheduling noise.
    let est = o
        .report
        .source
        .downtime_estimate_s
        .expect("Resumed was seen");
    let d = o.report.measured.downtime_s;
    assert!(
        est > 0.0 && (est - d).abs() < 0.1,
        "source estimate {est:.4} s vs measured {d:.4} s"
    );
    // Nothing went wrong on the way, not even harmlessly.
    let d = &o.report.destination;
    assert!(d.late_error.is_none(), "{:?}", d.late_error);
    assert_eq!(d.swept_pages, 0, "the push ended early");
    assert_eq!(
        o.dest_log.error_lines().count(),
        0,
        "{:?}",
        o.dest_log.error_lines().collect::<Vec<_>>()
    );
    // The heartbeat goes on where the source left it.
    let last_src = o.source_log.last_heartbeat().unwrap();
    let first_dst = o
        .dest_log
        .heartbeats()
        .iter()
        .map(|(_, h)| *h)
        .find(|h| h.n > last_src.n)
        .expect("the destination heartbeat continues the source's");
    assert!(first_dst.written >= last_src.written && first_dst.verified >= last_src.verified);
}

#[test]
fn m1_is_classic_precopy_light_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tm1", 1.0, "wanmig.workload=pagecheck wanmig.rate=4", false);
    assert_intact(&o);
    let s = &o.report.source;
    assert_eq!(
        s.postcopy_pushed + s.postcopy_skipped,
        0,
        "nothing is left for post-copy"
    );
    assert_eq!(o.report.measured.faults, 0, "classic pre-copy never faults");
    assert!(
        s.rounds[0].pages > 20_000,
        "round 0 sends the populated memory: {:?}",
        s.rounds
    );
    o.cleanup();
}

#[test]
fn m0_is_classic_postcopy_light_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tm0", 0.0, "wanmig.workload=pagecheck wanmig.rate=4", false);
    assert_intact(&o);
    let s = &o.report.source;
    assert_eq!(s.rounds.len(), 1);
    assert_eq!(s.rounds[0].pages, 0, "nothing is pre-copied");
    assert_eq!(s.remainder_pages, 0);
    assert!(
        o.report.measured.faults > 0,
        "a running checker faults in post-copy"
    );
    assert!(s.postcopy_pushed > 20_000);
    o.cleanup();
}

/// The checker's heavy setting: 96 MiB rewritten at 48 MiB/s, read at 64.
const HEAVY: &str = "wanmig.workload=pagecheck wanmig.mib=96 wanmig.rate=48 wanmig.readrate=64";

/// Populated pages compared under [`HEAVY`]: the checker rewrites its
/// 96 MiB (24 576 pages) after the resume too, and those are not compared;
/// of the 65 536 pages some 9 000 hold nothing (compared apart).
const HEAVY_COMPARED: u64 = 25_000;

#[test]
fn m1_is_classic_precopy_heavy_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tm1h", 1.0, HEAVY, false);
    assert_intact_comparing(&o, HEAVY_COMPARED);
    let s = &o.report.source;
    assert_eq!(s.postcopy_pushed + s.postcopy_skipped, 0);
    assert_eq!(o.report.measured.faults, 0, "classic pre-copy never faults");
    // --m 1 is the baseline: its freeze sends everything dirty.
    assert_eq!(s.freeze_policy, FreezePolicy::Classic);
    assert_eq!((s.overflow_pages, s.freeze_budget_bytes), (0, None));
    assert!(
        s.rounds.len() >= 2 || s.remainder_pages > 0,
        "a heavy writer dirties pages during pre-copy: {:?}",
        s.rounds
    );
    o.cleanup();
}

#[test]
fn m0_is_classic_postcopy_heavy_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tm0h", 0.0, HEAVY, false);
    assert_intact_comparing(&o, HEAVY_COMPARED);
    let s = &o.report.source;
    assert_eq!(s.rounds[0].pages, 0, "nothing is pre-copied");
    assert_eq!(s.remainder_pages, 0);
    assert!(o.report.measured.faults > 0);
    o.cleanup();
}

#[test]
fn half_precopy_with_a_heavy_dirtying_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tmh", 0.5, HEAVY, false);
    assert_intact_comparing(&o, HEAVY_COMPARED);
    let r = &o.report;
    assert!(
        r.source.rounds.len() >= 2 || r.source.remainder_pages > 0,
        "a heavy writer dirties pages during pre-copy: {:?}",
        r.source
    );
    assert!(r.measured.faults > 0);
    o.cleanup();
}

#[test]
fn half_precopy_stress_vm() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tms", 0.5, "wanmig.workload=stress-vm", false);
    assert_intact(&o);
    o.cleanup();
}

#[test]
fn a_held_destination_equals_the_frozen_source_byte_for_byte() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut o = migrate(
        "tmhold",
        0.5,
        "wanmig.workload=pagecheck wanmig.rate=16",
        true,
    );
    // The source is paused with its frozen RAM; the destination is paused
    // with every page in place. Compare the two RAM files page by page.
    let src = std::fs::File::open(&o.source_paths.ram).unwrap();
    let dst = std::fs::File::open(&o.dest_paths.ram).unwrap();
    let len = src.metadata().unwrap().len();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut differing = Vec::new();
    let mut off = 0;
    while off < len {
        src.read_exact_at(&mut a, off).unwrap();
        dst.read_exact_at(&mut b, off).unwrap();
        for (i, (pa, pb)) in a.chunks(4096).zip(b.chunks(4096)).enumerate() {
            if pa != pb {
                differing.push(off / 4096 + i as u64);
            }
        }
        off += a.len() as u64;
    }
    assert!(
        differing.is_empty(),
        "{} pages differ: {:?}",
        differing.len(),
        &differing[..differing.len().min(20)]
    );
    // Then it runs, intact.
    o.dest.process().qmp().cont().unwrap();
    let after = Instant::now();
    assert!(
        o.dest_log
            .wait_heartbeats(3, after, Duration::from_secs(60))
            .unwrap(),
        "the held guest does not run"
    );
    assert_eq!(o.dest_log.last_heartbeat().unwrap().errors, 0);
    assert_eq!(o.dest_log.error_lines().count(), 0);
    o.cleanup();
}

#[test]
fn a_profiled_and_planned_migration_carries_the_planners_prediction() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let profile =
        std::env::temp_dir().join(format!("wanmig-test-profile-{}.wmp", std::process::id()));
    let planning = Planning::ProfileNow {
        path: profile.clone(),
        samples: 8,
        interval: Duration::from_millis(250),
        rate: "400mbit".parse().unwrap(),
        rtt: Duration::from_millis(2),
        downtime_target: Some(Duration::from_millis(300)),
    };
    let o = migrate_with(
        "tmplan",
        planning,
        "wanmig.workload=pagecheck wanmig.rate=8",
        false,
    );
    assert_intact(&o);
    let r = &o.report;
    let p = r
        .predicted
        .expect("a planned migration reports the planner's prediction");
    assert!(p.gamma > 0.0 && p.gamma <= 1.0 && p.total_s > 0.0, "{p:?}");
    assert!(r.plan_origin.contains("planner"), "{}", r.plan_origin);
    // The planner priced the link by what the profiler measured: the
    // checker's pages (random payload) barely compress, the rest of RAM
    // (kernel, page cache, zero-filled tails) does.
    let wire = r.planner_link.expect("planned in process").wire;
    assert!(
        wire.page_written > 0.9 && wire.page_unwritten < 0.8 * wire.page_written,
        "{wire:?}"
    );
    assert!(
        r.plan_origin.contains("on the wire pages compress"),
        "{}",
        r.plan_origin
    );
    // The plan's M is what the engine pre-copied.
    let pre = r.source.precopy_pages as f64 / r.source.pages as f64;
    assert!((pre - r.plan.m).abs() < 1e-9);
    // The profile it planned from is the planner's format, for this guest.
    let prof = wanmig_planner::profile::Profile::open(&profile).unwrap();
    assert_eq!(prof.header().page_count, r.source.pages);
    assert_eq!(prof.header().samples, 8);
    let _ = std::fs::remove_file(&profile);
    o.cleanup();
}

/// All of memory pre-copied under a writer that outpaces the link (the
/// heavy checker over 100 Mbit/s): pre-copy does not converge, and the
/// freeze would take seconds with everything dirty. The overflow policy
/// sends the hottest dirty pages that fit the 300 ms target and post-copies
/// the rest: the measured downtime stays near the target, the pages left
/// behind are pushed or fetched after the resume, and the guest arrives
/// intact (no page differs from the frozen source, the checker sees no
/// error).
#[test]
fn a_freeze_that_overflows_keeps_the_downtime_target() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate_over(
        "tmov",
        Planning::precopy_overflow(),
        HEAVY,
        false,
        "100mbit",
        Duration::from_millis(5),
    );
    let r = &o.report;
    let s = &r.source;
    let target = SourceConfig::default().downtime_target.as_secs_f64();
    let d = r.measured.downtime_s;
    eprintln!(
        "downtime {:.0} ms (target {:.0} ms), stop: {}, {} pages ({} bytes) in the freeze (budget {:?} bytes), {} post-copied ({} pushed, {} fetched first; {} faults), integrity {:?}",
        d * 1e3,
        target * 1e3,
        s.stop_reason,
        s.remainder_pages,
        s.remainder_bytes,
        s.freeze_budget_bytes,
        s.overflow_pages,
        s.postcopy_pushed,
        s.postcopy_skipped,
        r.measured.faults,
        r.integrity
    );
    assert_intact_comparing(&o, HEAVY_COMPARED);
    assert_eq!(s.freeze_policy, FreezePolicy::Overflow);
    assert_eq!(s.precopy_pages, s.pages, "all of memory is pre-copied");
    assert!(
        s.overflow_pages > 0,
        "the test needs a dirty set that does not fit: {s:#?}"
    );
    // What went in the freeze fits its budget.
    let budget = s
        .freeze_budget_bytes
        .expect("the overflow policy has a budget");
    assert!(
        s.remainder_pages > 0 && s.remainder_bytes <= budget,
        "{} pages ({} bytes) sent in a budget of {budget} bytes",
        s.remainder_pages,
        s.remainder_bytes
    );
    // Near the target: the budget is the target less the RTT and the
    // device state's estimate; what the budget does not hold is pausing
    // the guest, saving and loading the device state and resuming it
    // (15-120 ms under TCG here). The classic freeze of the same dirty set
    // (some 24 000 pages, 100 MB) would take 8 s.
    assert!(d <= target + 0.2, "downtime {d:.3} s, target {target} s");
    // The pages left behind are the post-copy phase (nothing else is
    // post-copied at M = 1): each pushed once, or fetched first.
    assert_eq!(s.postcopy_pushed + s.postcopy_skipped, s.overflow_pages);
    o.cleanup();
}

/// The same with a disk whose checker rewrites 32 MiB of it at random at
/// 8 MiB/s: the dirty set at the freeze holds chunks too (with a fixed plan,
/// in address order, chunks rank after every page, so they are the first
/// to leave the freeze). The freeze keeps the target; the chunks left
/// behind become absent in the destination's image and are pushed or
/// fetched; memory and disk arrive intact and both checkers go on without
/// an error.
#[test]
fn a_freeze_that_overflows_keeps_the_downtime_target_with_a_disk() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let params = format!(
        "{HEAVY} wanmig.disk=check wanmig.diskmib=32 wanmig.diskrate=8 wanmig.diskpattern=rand"
    );
    let o = migrate_guest(
        "tmovd",
        Planning::precopy_overflow(),
        &params,
        64,
        false,
        "100mbit",
        Duration::from_millis(5),
    );
    let r = &o.report;
    let s = &r.source;
    let st = s.storage.as_ref().expect("the guest has a disk");
    let target = SourceConfig::default().downtime_target.as_secs_f64();
    let d = r.measured.downtime_s;
    eprintln!(
        "downtime {:.0} ms (target {:.0} ms), stop: {}, {} pages and {} chunks ({} bytes) in the freeze (budget {:?}), {} pages and {} chunks post-copied ({} chunks pushed, {} fetched first), integrity {:?}",
        d * 1e3,
        target * 1e3,
        s.stop_reason,
        s.remainder_pages,
        st.remainder_chunks,
        s.remainder_bytes,
        s.freeze_budget_bytes,
        s.overflow_pages,
        st.overflow_chunks,
        st.chunks_pushed,
        st.fault_chunks_served,
        r.integrity
    );
    assert_intact_comparing(&o, HEAVY_COMPARED);
    let i = r.integrity;
    assert!(i.chunks_compared > 0 && i.chunks_differing == 0, "{i:?}");
    assert_eq!(s.freeze_policy, FreezePolicy::Overflow);
    assert_eq!(
        st.precopy_chunks, st.chunks,
        "all of the disk is pre-copied"
    );
    assert!(
        st.overflow_chunks > 0,
        "the test needs dirty chunks the freeze leaves behind: {st:#?}"
    );
    let budget = s
        .freeze_budget_bytes
        .expect("the overflow policy has a budget");
    assert!(
        s.remainder_bytes <= budget,
        "{} > {budget}",
        s.remainder_bytes
    );
    assert!(d <= target + 0.2, "downtime {d:.3} s, target {target} s");
    // At S = 1 the only post-copied chunks are the freeze's: each pushed
    // once, or fetched first.
    assert!(
        st.chunks_pushed + st.chunks_skipped >= st.overflow_chunks,
        "{st:#?}"
    );
    // The disk checker goes on at the destination: three heartbeats after
    // the source's last, none with an error, and it verified blocks since.
    let mut o = o;
    let last_src = o
        .source_log
        .disk_heartbeats()
        .last()
        .map(|(_, h)| *h)
        .expect("a disk heartbeat at the source");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        o.dest_log.poll().unwrap();
        let after: Vec<_> = o
            .dest_log
            .disk_heartbeats()
            .iter()
            .map(|(_, h)| *h)
            .filter(|h| h.n > last_src.n)
            .collect();
        if after.len() >= 3 {
            assert!(after.iter().all(|h| h.errors == 0), "{after:?}");
            assert!(after.last().unwrap().verified > last_src.verified);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the disk checker stalled at the destination: {after:?} after {last_src:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    o.cleanup();
}
