//! The adaptive loop end to end: a `wanmig-planner serve` (in-process here)
//! publishes the plan in a shared segment; the engine migrates a running
//! guest with it and publishes telemetry; the emulated WAN's rate is halved
//! while pre-copy runs; the planner sees the measured bandwidth depart and
//! re-plans; the engine applies the newer generation at a round boundary,
//! and the guest arrives intact.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use wanmig_datapath::backend::qemu::GuestSpec;
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::plan_channel::Phase;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, Planning, run_over_wan};
use wanmig_planner::model::{Link, ModelParams};
use wanmig_planner::profile::{ClassProfile, Profile};
use wanmig_planner::search::SearchOptions;
use wanmig_planner::segment::Segment;
use wanmig_planner::serve::{ReplanPolicy, ReplanReason, Server};
use wanmig_planner::synth::{SynthConfig, Workload, write_profile};
use wanmig_wan::{Wan, WanConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn halving_the_link_mid_precopy_changes_the_plan_the_engine_applies() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let pid = std::process::id();
    let dir = std::env::temp_dir().join(format!("wanmig-test-adaptive{pid}"));
    std::fs::create_dir_all(&dir).unwrap();
    // A memory-heavy profile of a 256 MiB guest, n = 20 x 250 ms.
    let path = dir.join("profile.wmp");
    let mut cfg = SynthConfig::new(256 << 20, 0, Workload::MemoryHeavy);
    cfg.samples = 20;
    cfg.interval_ns = 250_000_000;
    write_profile(&cfg, std::fs::File::create(&path).unwrap()).unwrap();
    let profile = Profile::open(&path).unwrap();
    let classes = ClassProfile::from_profile(&profile).unwrap();
    let seg_name = format!("wmtest-adapt-{pid}");
    let segment = Segment::create(&seg_name).unwrap();
    // Slow enough that round 0 lasts several seconds: the halving, the
    // planner's measurement and re-plan must all land before the freeze.
    let (full, half) = ("40mbit".parse().unwrap(), "20mbit".parse().unwrap());
    let rtt = Duration::from_millis(2);
    let wan = Wan::up(WanConfig::new("tad", full, rtt)).unwrap();
    let guest = GuestSpec::builtin(256, "wanmig.workload=pagecheck wanmig.mib=16 wanmig.rate=8")
        .expect("run scripts/setup");
    let tag = format!("tad{pid}");
    let spec = LocalMigration {
        guest,
        planning: Planning::Segment {
            name: seg_name.clone(),
            profile: path.clone(),
        },
        source: SourceConfig::default(),
        dest: DestConfig::default(),
        link: LinkConfig::default(),
        run_dir: dir.join("run"),
        tag,
        warmup_heartbeats: 3,
        warmup_disk_heartbeats: 0,
        observe_heartbeats: 3,
    };
    let stop = AtomicBool::new(false);
    let mut server = Server::start(
        &classes,
        Some(&profile),
        &segment,
        Link::new(full, rtt),
        ModelParams::default(),
        SearchOptions::default(),
        ReplanPolicy {
            min_interval: Duration::from_millis(200),
            ..ReplanPolicy::default()
        },
    )
    .unwrap();
    let first = server.generation();
    let first_total = server.plan().prediction.total_s;
    let (outcome, events, halved_at) = std::thread::scope(|sc| {
        let planner = sc.spawn(|| {
            let mut events = Vec::new();
            server.run(&stop, Duration::from_millis(20), |e| {
                if let Ok(e) = e {
                    events.push(e.clone());
                }
            });
            events
        });
        // Halve the link once round 0 is under way.
        let halver = sc.spawn(|| {
            let deadline = Instant::now() + Duration::from_secs(180);
            loop {
                let t = segment.read_telemetry().unwrap();
                if t.is_some_and(|t| t.phase == Phase::Precopy) {
                    break;
                }
                if Instant::now() > deadline || stop.load(Ordering::Acquire) {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            wan.set_rate(half).unwrap();
            Some(Instant::now())
        });
        let outcome = run_over_wan(&spec, &wan);
        stop.store(true, Ordering::Release);
        (outcome, planner.join().unwrap(), halver.join().unwrap())
    });
    let o = outcome.unwrap_or_else(|e| panic!("migration failed: {e:?}"));
    assert!(halved_at.is_some(), "pre-copy never began");
    // The planner re-planned for the measured bandwidth...
    let bw = events
        .iter()
        .find(|e| {
            e.reasons
                .iter()
                .any(|r| matches!(r, ReplanReason::Bandwidth { .. }))
        })
        .unwrap_or_else(|| panic!("no bandwidth re-plan: {events:?}"));
    assert!(bw.generation > first);
    let b = bw.link.bandwidth * 8.0;
    assert!(b > 12e6 && b < 30e6, "re-planned for {b} bit/s");
    // The plan for that link predicts a longer migration (the server's
    // latest plan may be a later re-plan, for a later measurement).
    let replanned = wanmig_planner::plan::make_plan(
        &classes,
        Some(&profile),
        bw.link,
        ModelParams {
            write_scale: bw.write_scale,
            ..ModelParams::default()
        },
        &SearchOptions::default(),
    )
    .unwrap()
    .prediction
    .total_s;
    assert!(
        replanned > first_total * 1.25,
        "half the bandwidth, a longer migration: {replanned} vs {first_total} at {b} bit/s"
    );
    // ...and the engine took it at a round boundary.
    let applied = &o.report.source.plans_applied;
    println!(
        "re-plans: {events:?}\napplied: {applied:?}\nrounds: {:?}",
        o.report.source.rounds
    );
    assert!(
        applied
            .iter()
            .any(|a| a.generation >= bw.generation && a.round >= 1),
        "{applied:?} (events {events:?})"
    );
    let i = o.report.integrity;
    assert_eq!(i.pages_differing, 0, "{i:?}");
    assert_eq!(i.checker_errors, 0, "{i:?}");
    o.cleanup();
    drop(wan);
    let _ = std::fs::remove_dir_all(&dir);
}
