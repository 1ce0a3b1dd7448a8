//! The evaluation (the seed's Table III): for each workload in the built-in
//! guest, profile, plan, migrate with the planned `(M, S)`, and compare the
//! planner's prediction with what was measured; migrate again as classic
//! pre-copy (`M = S = 1`) and classic post-copy (`M = S = 0`) through the
//! same engine on the same emulated WAN, and set every mode's Gamma side by
//! side.
//!
//! Per workload it also measures per-unit predictability (the seed's
//! Tables I and II, see [`crate::predictability`]) on a guest of its own.
//!
//! This version runs wanmig's own modes only: QEMU's own migration
//! modes (pre-copy with drive-mirror, post-copy, pre-copy then post-copy)
//! are not measured yet, so `gamma_ratio_vs_best_qemu` is `null` and the
//! Markdown says so.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, Planning, run_over_wan};
use wanmig_datapath::report::{Figures, MigrationReport};
use wanmig_planner::units::Rate;
use wanmig_wan::{Wan, WanConfig};

use crate::predictability::{self, Predictability, PredictabilityOptions, UnitPredictionAccuracy};

/// A workload in the built-in guest.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// Its name.
    pub name: String,
    /// Guest kernel parameters.
    pub params: String,
    /// A disk of this many MiB (0: none).
    pub disk_mib: u64,
}

impl Workload {
    /// The built-in set: memory-heavy (the page checker rewriting 64 MiB at
    /// 16 MiB/s), idle-ish, I/O-heavy (sysbench fileio with checksums) and
    /// mixed (page checker and disk checker).
    pub fn builtin() -> Vec<Workload> {
        let w = |name: &str, params: &str, disk_mib| Workload {
            name: name.into(),
            params: params.into(),
            disk_mib,
        };
        vec![
            w(
                "memory",
                "wanmig.workload=pagecheck wanmig.mib=64 wanmig.rate=16",
                0,
            ),
            w("idle", "wanmig.workload=idle", 0),
            w(
                "io",
                "wanmig.workload=idle wanmig.disk=sysbench wanmig.sbmib=32 wanmig.sbrate=200",
                64,
            ),
            w(
                "mixed",
                "wanmig.workload=pagecheck wanmig.mib=32 wanmig.rate=8 wanmig.disk=check \
                 wanmig.diskmib=32 wanmig.diskrate=2",
                64,
            ),
        ]
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Workloads.
    pub workloads: Vec<Workload>,
    /// Link rate.
    pub rate: Rate,
    /// Link RTT.
    pub rtt: Duration,
    /// Profile intervals.
    pub samples: u32,
    /// Profile interval length.
    pub interval: Duration,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// Run directory.
    pub dir: PathBuf,
    /// Measure per-unit predictability (a guest alone, profiled, then
    /// observed for this horizon), `None`: skip.
    pub predictability_horizon: Option<Duration>,
}

/// The four headline figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Headline {
    /// T, s.
    pub total_s: f64,
    /// U, s.
    pub uptime_s: f64,
    /// D, s.
    pub downtime_s: f64,
    /// P, s.
    pub penalty_s: f64,
    /// Gamma.
    pub gamma: f64,
}

impl From<Figures> for Headline {
    fn from(f: Figures) -> Self {
        Headline {
            total_s: f.total_s,
            uptime_s: f.uptime_s,
            downtime_s: f.downtime_s,
            penalty_s: f.penalty_s,
            gamma: f.gamma,
        }
    }
}

/// Relative errors `(predicted - measured) / measured`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PredictionError {
    /// Of T.
    pub total_s: f64,
    /// Of U.
    pub uptime_s: f64,
    /// Of D.
    pub downtime_s: f64,
    /// Of P.
    pub penalty_s: f64,
}

fn rel(p: f64, m: f64) -> f64 {
    if m == 0.0 {
        if p == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (p - m) / m
    }
}

impl PredictionError {
    fn of(p: &Headline, m: &Headline) -> Self {
        PredictionError {
            total_s: rel(p.total_s, m.total_s),
            uptime_s: rel(p.uptime_s, m.uptime_s),
            downtime_s: rel(p.downtime_s, m.downtime_s),
            penalty_s: rel(p.penalty_s, m.penalty_s),
        }
    }

    fn all(&self) -> [f64; 4] {
        [self.total_s, self.uptime_s, self.downtime_s, self.penalty_s]
    }
}

/// The plan's `(M, S)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlanMs {
    /// M.
    pub m: f64,
    /// S.
    pub s: f64,
}

/// One workload's results.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// The workload.
    pub name: String,
    /// The planned `(M, S)`.
    pub plan: PlanMs,
    /// The planner's prediction for it.
    pub predicted: Headline,
    /// What the planned migration measured.
    pub measured: Headline,
    /// Relative prediction errors.
    pub prediction_error: PredictionError,
    /// Measured Gamma of every mode (`null`: not run).
    pub gamma: BTreeMap<String, Option<f64>>,
    /// The adaptive plan's Gamma over the best QEMU mode's (`null`: QEMU's
    /// modes not run yet).
    pub gamma_ratio_vs_best_qemu: Option<f64>,
    /// Every run's integrity held (0 differing pages and chunks, 0 checker
    /// errors).
    pub intact: bool,
    /// The seed's Tables I and II for this workload (`null`: not measured).
    pub unit_prediction_accuracy: Option<UnitPredictionAccuracy>,
}

/// The evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Link rate, bit/s.
    pub rate_bps: f64,
    /// Link RTT, s.
    pub rtt_s: f64,
    /// Per workload.
    pub workloads: Vec<WorkloadResult>,
    /// Median absolute relative prediction error over T, U, D, P of every
    /// workload.
    pub median_abs_prediction_error: f64,
    /// The largest.
    pub max_abs_prediction_error: f64,
}

/// The evaluation failed.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// A migration or the WAN.
    #[error("{workload} ({mode}): {message}")]
    Run {
        /// The workload.
        workload: String,
        /// The mode.
        mode: String,
        /// What failed.
        message: String,
    },
}

const MODES: [&str; 6] = [
    "wanmig_planned",
    "wanmig_precopy",
    "wanmig_postcopy",
    "qemu_precopy",
    "qemu_postcopy",
    "qemu_hybrid",
];

/// The built-in guest running `w`, with its disk.
fn guest_of(w: &Workload, memory_mib: u64) -> Result<GuestSpec, String> {
    let mut guest = GuestSpec::builtin(memory_mib, &w.params).map_err(|e| e.to_string())?;
    if w.disk_mib > 0 {
        guest.disks.push(DiskSpec {
            size: w.disk_mib << 20,
            image: None,
        });
    }
    Ok(guest)
}

fn intact(r: &MigrationReport) -> bool {
    let i = r.integrity;
    i.pages_differing == 0 && i.chunks_differing == 0 && i.checker_errors == 0
}

/// Runs the evaluation.
pub fn run(o: &EvalOptions) -> Result<EvalReport, EvalError> {
    let err = |w: &str, mode: &str| {
        let (w, mode) = (w.to_string(), mode.to_string());
        move |message: String| EvalError::Run {
            workload: w.clone(),
            mode: mode.clone(),
            message,
        }
    };
    let wan = Wan::up(WanConfig::new("eval", o.rate, o.rtt))
        .map_err(|e| err("-", "wan")(e.to_string()))?;
    let mut results = Vec::new();
    for w in &o.workloads {
        let mut gamma: BTreeMap<String, Option<f64>> =
            MODES.iter().map(|m| (m.to_string(), None)).collect();
        let mut all_intact = true;
        let mut planned = None;
        for mode in &MODES[..3] {
            let planning = match *mode {
                "wanmig_planned" => Planning::ProfileNow {
                    path: o.dir.join(format!("{}.wmp", w.name)),
                    samples: o.samples,
                    interval: o.interval,
                    rate: o.rate,
                    rtt: o.rtt,
                    downtime_target: Some(Duration::from_millis(300)),
                },
                "wanmig_precopy" => Planning::Fixed { m: 1.0, s: 1.0 },
                _ => Planning::Fixed { m: 0.0, s: 0.0 },
            };
            let guest = guest_of(w, o.memory_mib).map_err(err(&w.name, mode))?;
            let tag = format!("ev{}{}", &mode[7..9], std::process::id());
            let spec = LocalMigration {
                guest,
                planning,
                source: SourceConfig::default(),
                dest: DestConfig::default(),
                link: LinkConfig::default(),
                run_dir: o.dir.join(format!("{}-{mode}", w.name)),
                tag,
                // Every workload runs the page checker (idle's slowly).
                warmup_heartbeats: 3,
                warmup_disk_heartbeats: usize::from(w.disk_mib > 0) * 2,
                observe_heartbeats: 3,
            };
            let out = run_over_wan(&spec, &wan).map_err(|e| err(&w.name, mode)(e.to_string()))?;
            let r = out.report.clone();
            out.cleanup();
            all_intact &= intact(&r);
            gamma.insert(mode.to_string(), Some(r.measured.gamma));
            if *mode == "wanmig_planned" {
                planned = Some(r);
            }
        }
        let unit_prediction_accuracy = match o.predictability_horizon {
            Some(h) => {
                let guest = guest_of(w, o.memory_mib).map_err(err(&w.name, "predictability"))?;
                let horizon_interval = Duration::from_secs(1).min(h);
                let opts = PredictabilityOptions {
                    samples: o.samples,
                    interval: o.interval,
                    horizon_samples: (h.as_secs_f64() / horizon_interval.as_secs_f64())
                        .round()
                        .max(1.0) as u32,
                    horizon_interval,
                };
                let dir = o.dir.join(format!("{}-predictability", w.name));
                let tag = format!("evpr{}", std::process::id());
                Some(
                    predictability::measure(&guest, &opts, &dir, &tag)
                        .map_err(|e| err(&w.name, "predictability")(e.to_string()))?,
                )
            }
            None => None,
        };
        let r = planned.expect("the planned mode runs first");
        let predicted: Headline = r
            .predicted
            .ok_or_else(|| err(&w.name, MODES[0])("no prediction".into()))?
            .into();
        let measured: Headline = r.measured.into();
        results.push(WorkloadResult {
            name: w.name.clone(),
            plan: PlanMs {
                m: r.plan.m,
                s: r.plan.s,
            },
            prediction_error: PredictionError::of(&predicted, &measured),
            predicted,
            measured,
            gamma,
            gamma_ratio_vs_best_qemu: None,
            intact: all_intact,
            unit_prediction_accuracy,
        });
    }
    drop(wan);
    let mut errs: Vec<f64> = results
        .iter()
        .flat_map(|w| w.prediction_error.all())
        .map(f64::abs)
        .collect();
    errs.sort_by(f64::total_cmp);
    let median = if errs.is_empty() {
        0.0
    } else {
        errs[errs.len() / 2]
    };
    Ok(EvalReport {
        rate_bps: o.rate.bytes_per_second() * 8.0,
        rtt_s: o.rtt.as_secs_f64(),
        max_abs_prediction_error: errs.last().copied().unwrap_or(0.0),
        median_abs_prediction_error: median,
        workloads: results,
    })
}

/// The Markdown tables: per workload, predicted vs measured with the
/// relative error, and every mode's Gamma.
pub fn markdown(r: &EvalReport) -> String {
    let mut s = String::new();
    for w in &r.workloads {
        s.push_str(&format!(
            "### {} (M = {:.2}, S = {:.2}){}\n\n| figure | predicted | measured | error |\n|---|---:|---:|---:|\n",
            w.name,
            w.plan.m,
            w.plan.s,
            if w.intact { "" } else { " — INTEGRITY FAILED" }
        ));
        let e = &w.prediction_error;
        for (name, p, m, err) in [
            ("T (s)", w.predicted.total_s, w.measured.total_s, e.total_s),
            (
                "U (s)",
                w.predicted.uptime_s,
                w.measured.uptime_s,
                e.uptime_s,
            ),
            (
                "D (s)",
                w.predicted.downtime_s,
                w.measured.downtime_s,
                e.downtime_s,
            ),
            (
                "P (s)",
                w.predicted.penalty_s,
                w.measured.penalty_s,
                e.penalty_s,
            ),
        ] {
            s.push_str(&format!(
                "| {name} | {p:.3} | {m:.3} | {:+.1} % |\n",
                err * 100.0
            ));
        }
        s.push_str("\n| mode | Gamma |\n|---|---:|\n");
        for (mode, g) in &w.gamma {
            s.push_str(&format!(
                "| {mode} | {} |\n",
                g.map_or("not run".to_string(), |g| format!("{g:.3}"))
            ));
        }
        s.push_str(&format!(
            "\nGamma ratio vs the best QEMU mode: {}\n\n",
            w.gamma_ratio_vs_best_qemu.map_or(
                "not measured (QEMU's modes are not run yet)".to_string(),
                |x| { format!("{x:.2}") }
            )
        ));
        if let Some(u) = &w.unit_prediction_accuracy {
            s.push_str(&format!(
                "Per-unit predictability within {:.0} s (predicted / accessed):\n\n\
                 | units | accuracy | yes / yes | yes / no | no / yes | no / no |\n\
                 |---|---:|---:|---:|---:|---:|\n",
                u.horizon_s
            ));
            let rows: [(&str, Option<&Predictability>); 4] = [
                ("memory read", Some(&u.memory_read)),
                ("memory write", Some(&u.memory_write)),
                ("storage read", u.storage_read.as_ref()),
                ("storage write", u.storage_write.as_ref()),
            ];
            for (name, p) in rows {
                if let Some(p) = p {
                    let t = &p.table;
                    s.push_str(&format!(
                        "| {name} | {:.1} % | {} | {} | {} | {} |\n",
                        p.accuracy * 100.0,
                        t.predicted_and_accessed,
                        t.predicted_not_accessed,
                        t.accessed_not_predicted,
                        t.neither
                    ));
                }
            }
            s.push_str(
                "\n(The seed: memory 86.1 / 96.1 %, storage 96.9 / 96.6 %, read / write.)\n\n",
            );
        }
    }
    s.push_str(&format!(
        "Median |relative error| over T, U, D, P: {:.1} % (target <= 5 %), largest {:.1} % (target <= 15 %).\n",
        r.median_abs_prediction_error * 100.0,
        r.max_abs_prediction_error * 100.0
    ));
    s
}
