//! The real binary, end to end: synth, plan (--json), predict, summary,
//! heatmap, serve (SIGTERM cleans up), and clear errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;
use wanmig_planner::segment::Segment;

const BIN: &str = env!("CARGO_BIN_EXE_wanmig-planner");

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("wanmig-cli-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run wanmig-planner")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn synth(dir: &TempDir, workload: &str) -> PathBuf {
    let f = dir.path(&format!("{workload}.wmp"));
    ok(&[
        "synth",
        "--ram",
        "64MiB",
        "--disk",
        "256MiB",
        "--workload",
        workload,
        "--out",
        f.to_str().unwrap(),
        "--seed",
        "7",
    ]);
    f
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut x = v;
    for k in path {
        x = &x[*k];
    }
    x.as_f64()
        .unwrap_or_else(|| panic!("{path:?} is not a number in {v}"))
}

#[test]
fn plan_json_has_the_documented_keys() {
    let dir = TempDir::new("plan");
    let f = synth(&dir, "web");
    let text = ok(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&text).unwrap();
    let (m, s) = (num(&v, &["m"]), num(&v, &["s"]));
    assert!((0.0..=1.0).contains(&m) && (0.0..=1.0).contains(&s));
    for k in ["total_s", "uptime_s", "downtime_s", "penalty_s", "gamma"] {
        assert!(num(&v, &["predicted", k]) >= 0.0, "{k}");
    }
    for part in ["grid", "ternary"] {
        for k in ["m", "s", "gamma"] {
            num(&v, &[part, k]);
        }
    }
    assert!(num(&v, &["elapsed_ms"]) > 0.0);
    assert_eq!(v["live_possible"], Value::Bool(true));
    assert!(v["ternary"]["global"].is_boolean());
    assert!(v["rules"]["pages"]["mode"].is_string());
    assert!(num(&v, &["grid", "gamma"]) >= num(&v, &["ternary", "gamma"]) - 1e-12);
    let gamma = num(&v, &["predicted", "gamma"]);
    let (d, dt) = (
        num(&v, &["predicted", "downtime_s"]),
        num(&v, &["predicted", "delta_t_s"]),
    );
    assert!((gamma - 20.0 / (d + dt)).abs() < 1e-12);

    // The human form.
    let human = ok(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
    ]);
    assert!(human.contains("plan: M = "), "{human}");

    // A downtime target is honoured.
    let text = ok(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
        "--downtime-target",
        "500ms",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert!(num(&v, &["predicted", "downtime_s"]) <= 0.5);
}

/// `--wire-ratios`: units that compress 2x cross the link in half the time;
/// malformed ratios are refused.
#[test]
fn wire_ratios_price_the_link() {
    let dir = TempDir::new("wire");
    let f = synth(&dir, "web");
    let predict = |extra: &[&str]| {
        let mut args = vec![
            "predict",
            "--profile",
            f.to_str().unwrap(),
            "--bandwidth",
            "40mbit",
            "--rtt",
            "5ms",
            "--m",
            "0",
            "--s",
            "0",
            "--json",
        ];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(&ok(&args)).unwrap();
        num(&v, &["predicted", "uptime_s"])
    };
    let (plain, half) = (predict(&[]), predict(&["--wire-ratios", "2,2,2,2"]));
    assert!(plain > 1.0, "{plain}");
    assert!((half / plain - 0.5).abs() < 1e-9, "{half} vs {plain}");
    for bad in ["2,2,2", "2,0,2,2", "2,x,2,2"] {
        let out = run(&[
            "plan",
            "--profile",
            f.to_str().unwrap(),
            "--bandwidth",
            "40mbit",
            "--rtt",
            "5ms",
            "--wire-ratios",
            bad,
        ]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--wire-ratios"),
            "{bad}"
        );
    }
}

#[test]
fn predict_summary_and_heatmap() {
    let dir = TempDir::new("predict");
    let f = synth(&dir, "io-heavy");
    let fs = f.to_str().unwrap();
    let text = ok(&[
        "predict",
        "--profile",
        fs,
        "--m",
        "0.6",
        "--s",
        "0.5",
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
        "--json",
    ]);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(num(&v, &["m"]), 0.6);
    assert_eq!(num(&v, &["s"]), 0.5);
    let t = num(&v, &["predicted", "total_s"]);
    let parts = num(&v, &["prediction", "precopy_s"])
        + num(&v, &["predicted", "downtime_s"])
        + num(&v, &["predicted", "uptime_s"]);
    assert!((t - parts).abs() < 1e-9 * t);

    // Summary, then plan from the summary: same answer, unresolved cutoffs.
    // (io-heavy at 40 Mbit/s: its hottest storage is rewritten faster than
    // the link sends it, so live migration is impossible: status 2 both
    // times.)
    let sum = dir.path("s.json");
    ok(&["summary", "--profile", fs, "--out", sum.to_str().unwrap()]);
    let plan = |profile: &str| -> Value {
        let out = run(&[
            "plan",
            "--profile",
            profile,
            "--bandwidth",
            "40mbit",
            "--rtt",
            "5ms",
            "--json",
        ]);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let a = plan(fs);
    let b = plan(sum.to_str().unwrap());
    assert_eq!(a["live_possible"], Value::Bool(false));
    assert_eq!(a["profile"]["fingerprint"], b["profile"]["fingerprint"]);
    assert_eq!(
        (a["m"].clone(), a["s"].clone()),
        (b["m"].clone(), b["s"].clone())
    );
    assert_eq!(a["predicted"], b["predicted"]);
    if b["rules"]["pages"]["mode"] == "boundary" && b["rules"]["pages"]["take"] != 0 {
        assert!(b["rules"]["pages"]["cutoff"].is_null());
        assert!(a["rules"]["pages"]["cutoff"].is_u64());
    }

    let png = dir.path("gamma.png");
    ok(&[
        "heatmap",
        "--profile",
        fs,
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
        "--out",
        png.to_str().unwrap(),
        "--width",
        "480",
        "--height",
        "400",
    ]);
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let out = run(&[
        "heatmap",
        "--profile",
        fs,
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
        "--out",
        png.to_str().unwrap(),
        "--font",
        "/nonexistent/font.ttf",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("fonts-dejavu-core"));
}

#[test]
fn errors_are_clear() {
    let dir = TempDir::new("errors");
    let bad = dir.path("bad.wmp");
    std::fs::write(&bad, vec![7u8; 300]).unwrap();
    let out = run(&[
        "plan",
        "--profile",
        bad.to_str().unwrap(),
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad magic"));

    let f = synth(&dir, "idle");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes.truncate(bytes.len() - 10);
    std::fs::write(&bad, bytes).unwrap();
    let out = run(&[
        "plan",
        "--profile",
        bad.to_str().unwrap(),
        "--bandwidth",
        "40mbit",
        "--rtt",
        "5ms",
    ]);
    assert!(!out.status.success(), "a truncated profile must fail");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("truncated"), "{err}");
    // Each cause once, on one line.
    assert_eq!(err.matches("truncated").count(), 1, "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");

    let out = run(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "40mbps",
        "--rtt",
        "5ms",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ambiguous"));

    // Live migration impossible: 1 GiB of device state over 1 Mbit. The
    // plan is still printed, and the exit status is 2.
    let out = run(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "1mbit",
        "--rtt",
        "5ms",
        "--state",
        "1GiB",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["live_possible"], Value::Bool(false));
    assert!(v["live_reason"].as_str().unwrap().contains("impossible"));
    assert!(v["liveness"]["max_live_s"].is_null());
    assert!(String::from_utf8_lossy(&out.stderr).contains("impossible"));
    // The same guest on a fast link: possible, status 0.
    let out = run(&[
        "plan",
        "--profile",
        f.to_str().unwrap(),
        "--bandwidth",
        "1gbit",
        "--rtt",
        "5ms",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["live_possible"], Value::Bool(true));
    assert!(v["liveness"]["max_live_s"].as_f64().unwrap() >= 0.01);
}

fn wait_for(path: &Path, timeout: Duration) -> Segment {
    let start = Instant::now();
    loop {
        if let Ok(s) = Segment::open(path.to_str().unwrap()) {
            if matches!(s.read_plan(), Ok(Some(_))) {
                return s;
            }
        }
        assert!(start.elapsed() < timeout, "no plan published in {path:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn serve_publishes_and_cleans_up_on_sigterm() {
    let dir = TempDir::new("serve");
    let f = synth(&dir, "memory-heavy");
    let seg = dir.path("segment");
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--segment",
            seg.to_str().unwrap(),
            "--profile",
            f.to_str().unwrap(),
            "--bandwidth",
            "40mbit",
            "--rtt",
            "5ms",
            "--poll",
            "10ms",
        ])
        .spawn()
        .unwrap();
    let s = wait_for(&seg, Duration::from_secs(60));
    let plan = s.read_plan().unwrap().unwrap();
    assert_eq!(plan.generation, 1);
    assert_eq!(plan.link.bandwidth, 5e6);
    assert!(plan.page_rule.is_resolved());
    drop(s);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    let exit = loop {
        if let Some(e) = child.try_wait().unwrap() {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "serve ignores SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(exit.success(), "{exit}");
    assert!(!seg.exists(), "segment left behind");
}

fn kill_term_and_wait(child: &mut std::process::Child) -> std::process::ExitStatus {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let start = Instant::now();
    loop {
        if let Some(e) = child.try_wait().unwrap() {
            break e;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "serve ignores SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Kills the child on drop (a failed test must not leave `serve` behind).
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Rewriting the profile under a running `serve` cannot crash it: it does
/// not map the file. An atomic rewrite (our writer renames a new file into
/// place) is invisible to the open file, so a re-plan succeeds; a
/// truncation in place of the very file serve has open (what another
/// program reusing it could do) makes the next re-plan fail with a clear
/// warning while the previous plan stays published. Either way serve keeps
/// running and exits cleanly.
#[test]
fn serve_survives_the_profile_being_rewritten() {
    use wanmig_planner::segment::{Phase, Telemetry};
    let dir = TempDir::new("rewrite");
    let f = synth(&dir, "web");
    let seg = dir.path("segment");
    let child = Command::new(BIN)
        .args([
            "serve",
            "--segment",
            seg.to_str().unwrap(),
            "--profile",
            f.to_str().unwrap(),
            "--bandwidth",
            "40mbit",
            "--rtt",
            "5ms",
            "--poll",
            "10ms",
            "--min-replan-interval",
            "0",
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut child = Reaper(child);
    let mut stderr = child.0.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    let engine = wait_for(&seg, Duration::from_secs(60));
    let first = engine.read_plan().unwrap().unwrap();
    assert!(first.page_rule.is_resolved());
    let replan = |bandwidth_bps: u64, stamp: u64| {
        engine
            .publish_telemetry(&Telemetry {
                phase: Phase::Precopy,
                plan_generation: first.generation,
                bandwidth_bps,
                updated_unix_ns: stamp,
                ..Telemetry::default()
            })
            .unwrap();
    };

    // 1. Rewritten atomically (another synthetic profile at the same
    // path), then a re-plan: serve still reads the file it opened.
    ok(&[
        "synth",
        "--ram",
        "64MiB",
        "--disk",
        "256MiB",
        "--workload",
        "idle",
        "--out",
        f.to_str().unwrap(),
    ]);
    replan(80_000_000, 1);
    let start = Instant::now();
    let second = loop {
        let p = engine.read_plan().unwrap().unwrap();
        if p.generation > 1 {
            break p;
        }
        assert!(child.0.try_wait().unwrap().is_none(), "serve died");
        assert!(start.elapsed() < Duration::from_secs(60), "no re-plan");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(second.link.bandwidth, 10e6);
    assert_eq!(second.profile_fingerprint, first.profile_fingerprint);
    assert!(second.page_rule.is_resolved());

    // 2. The file serve has open (now unlinked) truncated in place through
    // /proc, then a re-plan.
    let fd_dir = format!("/proc/{}/fd", child.0.id());
    let open_profile = std::fs::read_dir(&fd_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| {
            std::fs::read_link(e.path())
                .is_ok_and(|t| t.to_string_lossy().contains("web.wmp (deleted)"))
        })
        .expect("serve keeps the old profile open")
        .path();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&open_profile)
        .unwrap();
    file.set_len(1000).unwrap();
    drop(file);
    replan(160_000_000, 2);
    std::thread::sleep(Duration::from_millis(500));
    assert!(child.0.try_wait().unwrap().is_none(), "serve died");
    assert_eq!(engine.read_plan().unwrap().unwrap().generation, 2);

    drop(engine);
    let exit = kill_term_and_wait(&mut child.0);
    assert!(exit.success(), "{exit}");
    let err = log.join().unwrap();
    assert!(
        err.contains("changed while being read") && err.contains("previous plan stays published"),
        "{err}"
    );
}
