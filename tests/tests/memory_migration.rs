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

use wanmig_datapath::backend::qemu::GuestSpec;
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, LocalOutcome, Planning, run_over_wan};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn migrate(name: &str, m: f64, params: &str, hold: bool) -> LocalOutcome {
    migrate_with(name, Planning::Fixed { m, s: 0.0 }, params, hold)
}

fn migrate_with(name: &str, planning: Planning, params: &str, hold: bool) -> LocalOutcome {
    let guest =
        GuestSpec::builtin(256, params).expect("run scripts/setup to build the guest image");
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
        warmup_disk_heartbeats: 0,
        observe_heartbeats: 3,
    };
    let wan = Wan::up(WanConfig::new(
        name,
        "400mbit".parse().unwrap(),
        Duration::from_millis(2),
    ))
    .unwrap();
    run_over_wan(&spec, &wan).unwrap_or_else(|e| panic!("migration failed: {e}"))
}

/// What every migration must show.
fn assert_intact(o: &LocalOutcome) {
    let i = o.report.integrity;
    assert_eq!(i.pages_differing, 0, "{:#?}", o.report);
    assert_eq!(i.checker_errors, 0, "{:#?}", o.report);
    // Most of the 65536 pages are compared (the rest the guest rewrote since).
    assert!(i.pages_compared > 40_000, "too few pages compared: {i:?}");
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

#[test]
fn m1_is_classic_precopy_heavy_workload() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let o = migrate("tm1h", 1.0, HEAVY, false);
    assert_intact(&o);
    let s = &o.report.source;
    assert_eq!(s.postcopy_pushed + s.postcopy_skipped, 0);
    assert_eq!(o.report.measured.faults, 0, "classic pre-copy never faults");
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
    assert_intact(&o);
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
    assert_intact(&o);
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
