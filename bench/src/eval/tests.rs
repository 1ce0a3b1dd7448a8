//! The evaluation's bookkeeping: medians, floored errors, failed and
//! unchecked runs, regret and recovery, and what the report shows.

use super::*;

fn figures(gamma: f64) -> Figures {
    Figures {
        total_s: 30.0,
        uptime_s: 10.0,
        downtime_s: 0.25,
        penalty_s: 2.0,
        faults: 100,
        bytes_sent: 200_000_000,
        gamma,
    }
}

fn checked() -> ModeIntegrity {
    ModeIntegrity {
        checked: true,
        pages_compared: 1000,
        ..ModeIntegrity::default()
    }
}

fn ok(gamma: f64) -> RunResult {
    let mut r = RunResult::completed(figures(gamma), checked(), String::new());
    r.plan = Some(PlanMs { m: 0.1, s: 0.4 });
    r.predicted = Some(figures(gamma).into());
    r
}

fn workload(modes: &[(&str, Vec<RunResult>)], repeat: u32) -> WorkloadResult {
    let w = Workload {
        name: "mixed".into(),
        params: String::new(),
        disk_mib: 0,
    };
    let modes = modes
        .iter()
        .map(|(n, runs)| (n.to_string(), ModeResult::of(runs.clone())))
        .collect();
    workload_result(&w, modes, None, Vec::new(), None, repeat)
}

#[test]
fn the_median_is_the_usual_one() {
    assert_eq!(median(&[]), None);
    assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
    assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
}

#[test]
fn errors_are_floored_per_figure() {
    let p = Headline {
        total_s: 11.0,
        uptime_s: 0.3,
        downtime_s: 0.293,
        penalty_s: 0.403,
        gamma: 0.9,
    };
    let m = Headline {
        total_s: 10.0,
        uptime_s: 0.0,
        downtime_s: 0.086,
        penalty_s: 0.0,
        gamma: 0.9,
    };
    let e = PredictionError::of(&p, &m);
    assert!((e.total_s - 0.1).abs() < 1e-12);
    // U floored at 1 s, D at 100 ms, P at 500 ms.
    assert!((e.uptime_s - 0.3).abs() < 1e-12);
    assert!((e.downtime_s - 0.207 / 0.1).abs() < 1e-9);
    assert!((e.penalty_s - 0.806).abs() < 1e-12);
    let under = PredictionError::of(&m, &p).abs();
    assert!(under.all().iter().all(|x| *x >= 0.0));
}

/// A QEMU run whose guest checker verified no page at the destination did
/// not check its memory: unchecked, however equal its disks.
#[test]
fn a_qemu_run_whose_page_checker_verified_nothing_is_unchecked() {
    let report = |verified: u64| QemuReport {
        mode: QemuMode::Hybrid,
        measured: figures(0.9),
        window_stalls: crate::qemu_native::WindowStalls::Exact,
        qemu_downtime_ms: None,
        suspended_after_s: None,
        postcopy_after_s: None,
        ram_bytes: 1,
        disk_bytes: 1 << 20,
        mirror_ready_s: 0.0,
        disk_bytes_compared: 1 << 20,
        disk_blocks_differing: 0,
        checker_errors: 0,
        pages_verified_after_resume: verified,
        steps_in_downtime: Vec::new(),
    };
    let silent = ModeIntegrity::of_qemu(&report(0), 1 << 20);
    assert!(!silent.checked && !silent.holds(), "{silent:?}");
    assert!(!report(0).intact());
    let read = ModeIntegrity::of_qemu(&report(512), 1 << 20);
    assert!(read.checked && read.holds(), "{read:?}");
    assert_eq!(read.guest_pages_verified, 512);
    // Its disks not all compared: unchecked too.
    assert!(!ModeIntegrity::of_qemu(&report(512), 2 << 20).checked);
}

#[test]
fn a_failed_or_unchecked_run_counts_as_gamma_zero() {
    let unchecked = RunResult::completed(figures(0.95), ModeIntegrity::default(), String::new());
    assert!(unchecked.failed);
    assert_eq!(unchecked.gamma(), 0.0);
    assert!(unchecked.error.as_deref().unwrap().contains("not checked"));
    let corrupt = RunResult::completed(
        figures(0.95),
        ModeIntegrity {
            pages_differing: 2,
            ..checked()
        },
        String::new(),
    );
    assert_eq!(corrupt.gamma(), 0.0);
    let m = ModeResult::of(vec![ok(0.9), RunResult::failed("boom".into()), ok(0.8)]);
    assert!(m.failed);
    assert_eq!(m.error.as_deref(), Some("boom"));
    assert_eq!(m.gamma, 0.8);
    assert_eq!(m.gamma_spread, Spread { min: 0.0, max: 0.9 });
    // The figures shown are a real run's: the median of those that held.
    assert_eq!(m.measured.unwrap().gamma, 0.9);
    assert!(m.integrity.checked);
    let none = ModeResult::of(vec![RunResult::failed("boom".into())]);
    assert_eq!((none.gamma, none.measured), (0.0, None));
    assert!(!none.integrity.checked);
}

#[test]
fn a_failed_baseline_counts_and_the_targets_are_judged() {
    let w = workload(
        &[
            (PLANNED, vec![ok(0.80)]),
            ("wanmig_precopy", vec![ok(0.79)]),
            ("qemu_precopy", vec![ok(0.60)]),
            // The best QEMU mode, had it not failed.
            (
                "qemu_postcopy",
                vec![RunResult::failed("QEMU's migration ended".into())],
            ),
            ("qemu_hybrid", vec![ok(0.70)]),
        ],
        1,
    );
    assert_eq!(w.gamma["qemu_postcopy"], 0.0);
    assert!(w.modes["qemu_postcopy"].failed);
    assert!((w.gamma_regret - -0.01).abs() < 1e-12);
    assert!(w.targets.gamma_regret);
    // (0.8 - 0.7) / (1 - 0.7)
    assert!((w.gamma_recovered.unwrap() - 1.0 / 3.0).abs() < 1e-12);
    assert_eq!(w.targets.gamma_recovered, Some(false));
    assert!(w.intact);
    assert_eq!(w.plan, Some(PlanMs { m: 0.1, s: 0.4 }));
    assert_eq!(w.prediction_error_floored.unwrap().all(), [0.0; 4]);

    // A fixed mode ahead by more than the bound; a best QEMU mode at
    // 0.98 or more is met within 0.005.
    let w = workload(
        &[
            (PLANNED, vec![ok(0.978)]),
            ("wanmig_postcopy", vec![ok(0.99)]),
            ("qemu_precopy", vec![ok(0.982)]),
        ],
        3,
    );
    assert!(!w.targets.gamma_regret);
    assert_eq!(w.targets.gamma_recovered, Some(true));
    assert!(regret_bound(3) < regret_bound(1));
}

#[test]
fn the_report_and_markdown_show_failures_and_unchecked_runs() {
    let unchecked = RunResult::completed(figures(0.95), ModeIntegrity::default(), String::new());
    let w = workload(
        &[
            (PLANNED, vec![ok(0.9)]),
            ("wanmig_precopy", vec![unchecked]),
            ("qemu_hybrid", vec![RunResult::failed("boom".into())]),
        ],
        1,
    );
    assert!(!w.intact, "an unchecked run is not intact");
    let o = EvalOptions {
        workloads: Vec::new(),
        rate: "40mbit".parse().unwrap(),
        rtt: Duration::from_millis(5),
        samples: 20,
        interval: Duration::from_millis(250),
        memory_mib: 256,
        dir: PathBuf::new(),
        predictability_horizon: None,
        downtime_target: Duration::from_millis(300),
        qemu_modes: Vec::new(),
        qemu_precopy_timeout: Duration::from_secs(120),
        repeat: 1,
        plot_workload: None,
        plot_dir: PathBuf::new(),
    };
    let r = report(&o, 1, vec![w]);
    assert!(!r.all_targets_met);
    assert_eq!(r.median_prediction_error_floored, Some(0.0));
    let md = markdown(&r);
    assert!(md.contains("| wanmig_precopy | | | | | | | 0.000 | 0.000-0.000 | NOT CHECKED | failed: integrity not checked |"), "{md}");
    assert!(
        md.contains(
            "| qemu_hybrid | | | | | | | 0.000 | 0.000-0.000 | NOT CHECKED | failed: boom |"
        ),
        "{md}"
    );
    assert!(
        md.contains("| wanmig_postcopy | | | | | | | not run |"),
        "{md}"
    );
    assert!(md.contains("Every target met: no."), "{md}");
    let json = serde_json::to_value(&r).unwrap();
    let w = &json["workloads"][0];
    assert_eq!(w["modes"]["qemu_hybrid"]["failed"], true);
    assert_eq!(w["modes"]["wanmig_precopy"]["integrity"]["checked"], false);
    assert!(
        w["gamma_regret"].is_number() && w["prediction_error_floored"]["penalty_s"].is_number()
    );
}
