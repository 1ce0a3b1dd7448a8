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
//! QEMU's own migration modes (pre-copy with its disks mirrored over NBD,
//! post-copy, pre-copy then post-copy; see [`crate::qemu_native`]) run on
//! the same guest, workload and WAN, timed as a libvirt user's migration.
//!
//! Every mode runs `repeat` times. A run that fails, or whose integrity
//! does not hold (or was not checked), counts as Gamma 0; the evaluation goes
//! on. A mode's Gamma is the median over its runs, its spread beside it.
//! Per workload the report judges the targets:
//! - `gamma_regret`: the best Gamma of the other modes minus the planned
//!   plan's (target <= 0.01 on medians of 3 or more runs, <= 0.02 for one);
//! - `gamma_recovered`: `(planned - best QEMU) / (1 - best QEMU)`, the share
//!   of the agility the best QEMU mode loses that the plan wins back
//!   (target >= 0.5; where the best QEMU mode reaches 0.98 the plan need only
//!   be within 0.005 of it);
//! - `prediction_error_floored`: `|predicted - measured| / max(measured,
//!   floor)` of T, U, D, P with floors 1 s, 1 s, 100 ms, 500 ms (targets:
//!   median <= 5 %, max <= 15 % over every workload and figure).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use wanmig_datapath::backend::qemu::{DiskSpec, GuestSpec};
use wanmig_datapath::connection::LinkConfig;
use wanmig_datapath::engine::{DestConfig, SourceConfig};
use wanmig_datapath::migration::{LocalMigration, Planning, run_over_wan};
use wanmig_datapath::report::{Figures, MigrationReport};
use wanmig_planner::heatmap::{self, HeatmapOptions};
use wanmig_planner::model::ModelParams;
use wanmig_planner::plan::make_plan;
use wanmig_planner::profile::{ClassProfile, Profile};
use wanmig_planner::search::SearchOptions;
use wanmig_planner::units::Rate;
use wanmig_wan::{Wan, WanConfig};

use crate::predictability::{self, PredictabilityOptions, UnitPredictionAccuracy};
use crate::qemu_native::{self, QemuMode, QemuReport, QemuRun, WindowStalls};
use crate::timeline::{self, Timeline};

mod markdown;
#[cfg(test)]
mod tests;

pub use markdown::markdown;

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
    /// The downtime target: the planner's, and QEMU's `downtime-limit`.
    pub downtime_target: Duration,
    /// QEMU's own modes to run as baselines.
    pub qemu_modes: Vec<QemuMode>,
    /// QEMU pre-copy that has not converged after this long finishes with
    /// the guest paused (`virsh migrate --timeout`).
    pub qemu_precopy_timeout: Duration,
    /// Runs of every mode (at least 1).
    pub repeat: u32,
    /// The workload whose planned migration is plotted (timeline, Gamma
    /// heatmap), `None`: none.
    pub plot_workload: Option<String>,
    /// Where the plots go.
    pub plot_dir: PathBuf,
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

impl Headline {
    /// Each figure's median over `hs` (`None`: empty).
    fn median_of(hs: &[Headline]) -> Option<Headline> {
        let m = |f: fn(&Headline) -> f64| median(&hs.iter().map(f).collect::<Vec<_>>());
        Some(Headline {
            total_s: m(|h| h.total_s)?,
            uptime_s: m(|h| h.uptime_s)?,
            downtime_s: m(|h| h.downtime_s)?,
            penalty_s: m(|h| h.penalty_s)?,
            gamma: m(|h| h.gamma)?,
        })
    }
}

/// Relative errors `(predicted - measured) / max(measured, floor)`, with
/// the floors [`ERROR_FLOORS_S`]: a figure measured as (nearly) zero, such
/// as the penalty of a plan without post-copy faults, is judged against
/// what matters to a guest, not divided by zero.
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

/// The floors of the relative errors' denominators, s: T and U 1 s, D
/// 100 ms, P 500 ms.
pub const ERROR_FLOORS_S: [f64; 4] = [1.0, 1.0, 0.1, 0.5];

/// `(p - m) / max(|m|, floor)`.
fn floored(p: f64, m: f64, floor: f64) -> f64 {
    (p - m) / m.abs().max(floor)
}

impl PredictionError {
    /// The signed errors of `p` against `m`.
    pub fn of(p: &Headline, m: &Headline) -> Self {
        let [t, u, d, pf] = ERROR_FLOORS_S;
        PredictionError {
            total_s: floored(p.total_s, m.total_s, t),
            uptime_s: floored(p.uptime_s, m.uptime_s, u),
            downtime_s: floored(p.downtime_s, m.downtime_s, d),
            penalty_s: floored(p.penalty_s, m.penalty_s, pf),
        }
    }

    /// Their absolute values.
    pub fn abs(&self) -> Self {
        PredictionError {
            total_s: self.total_s.abs(),
            uptime_s: self.uptime_s.abs(),
            downtime_s: self.downtime_s.abs(),
            penalty_s: self.penalty_s.abs(),
        }
    }

    fn all(&self) -> [f64; 4] {
        [self.total_s, self.uptime_s, self.downtime_s, self.penalty_s]
    }
}

/// The median: the middle value, or the mean of the two middle values of
/// an even count (`None`: no values).
pub fn median(xs: &[f64]) -> Option<f64> {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
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

/// What a run's integrity checks found. `checked` is false when a check
/// that should have run did not: such a run fails.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ModeIntegrity {
    /// Every check this mode can make ran (wanmig: the destination's
    /// populated pages and chunks compared with the source's frozen ones;
    /// QEMU: every disk byte compared and the guest's page checker
    /// verified pages after the resume; both: the guest's checkers read).
    pub checked: bool,
    /// Failure lines the guest's checkers printed at the destination.
    pub checker_errors: u64,
    /// Populated pages compared (QEMU's RAM cannot be read: 0, the page
    /// checker vouches for it, see `guest_pages_verified`).
    pub pages_compared: u64,
    /// QEMU modes: pages the guest's page checker verified at the
    /// destination after the resume (0 for wanmig modes, whose pages are
    /// compared byte for byte).
    pub guest_pages_verified: u64,
    /// Pages compared apart from those: holes (never populated, or zero)
    /// at the source.
    pub holes_compared: u64,
    /// Of the pages and holes, those that differ.
    pub pages_differing: u64,
    /// Disk chunks (wanmig) or bytes (QEMU) compared.
    pub disk_compared: u64,
    /// Of those, chunks (wanmig) or 4 KiB blocks (QEMU) that differ.
    pub disk_differing: u64,
}

impl ModeIntegrity {
    /// Checked, and nothing differs or failed.
    pub fn holds(&self) -> bool {
        self.checked
            && self.checker_errors == 0
            && self.pages_differing == 0
            && self.disk_differing == 0
    }

    fn of_wanmig(r: &MigrationReport) -> Self {
        let i = r.integrity;
        ModeIntegrity {
            // A comparison that met no populated page proved nothing.
            checked: i.checked && i.pages_compared > 0,
            checker_errors: i.checker_errors,
            pages_compared: i.pages_compared,
            guest_pages_verified: 0,
            holes_compared: i.holes_compared,
            pages_differing: i.pages_differing,
            disk_compared: i.chunks_compared,
            disk_differing: i.chunks_differing,
        }
    }

    fn of_qemu(r: &QemuReport, disk_bytes: u64) -> Self {
        ModeIntegrity {
            // The page checker is the only memory check: it must have run.
            checked: r.disk_bytes_compared == disk_bytes && r.pages_verified_after_resume > 0,
            checker_errors: r.checker_errors,
            pages_compared: 0,
            guest_pages_verified: r.pages_verified_after_resume,
            holes_compared: 0,
            pages_differing: 0,
            disk_compared: r.disk_bytes_compared,
            disk_differing: r.disk_blocks_differing,
        }
    }

    /// Why it does not hold (empty: it does).
    fn failure(&self) -> String {
        let mut why = Vec::new();
        if !self.checked {
            why.push("integrity not checked".to_string());
        }
        if self.checker_errors > 0 {
            why.push(format!("{} checker errors", self.checker_errors));
        }
        if self.pages_differing > 0 {
            why.push(format!("{} pages differ", self.pages_differing));
        }
        if self.disk_differing > 0 {
            why.push(format!("{} disk units differ", self.disk_differing));
        }
        why.join(", ")
    }
}

/// One run of one mode.
#[derive(Debug, Clone, Serialize)]
pub struct RunResult {
    /// It failed: the migration did not complete, or its integrity does not
    /// hold. Its Gamma counts as 0.
    pub failed: bool,
    /// Why it failed.
    pub error: Option<String>,
    /// Its figures (`null`: it did not complete).
    pub measured: Option<Figures>,
    /// Its integrity (`null`: it did not complete).
    pub integrity: Option<ModeIntegrity>,
    /// The plan it ran (wanmig modes).
    pub plan: Option<PlanMs>,
    /// The planner's prediction (the planned mode).
    pub predicted: Option<Headline>,
    /// What to know to read the figures (a suspended pre-copy, pro-rated
    /// stalls).
    pub note: String,
    /// How the engines' bytes travelled: I/O backend and cipher (wanmig
    /// modes; QEMU's own migration streams are not encrypted here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io: Option<wanmig_datapath::transport::IoPath>,
}

impl RunResult {
    fn failed(error: String) -> Self {
        RunResult {
            failed: true,
            error: Some(error),
            measured: None,
            integrity: None,
            plan: None,
            predicted: None,
            note: String::new(),
            io: None,
        }
    }

    fn completed(measured: Figures, integrity: ModeIntegrity, note: String) -> Self {
        let failed = !integrity.holds();
        RunResult {
            failed,
            error: failed.then(|| integrity.failure()),
            measured: Some(measured),
            integrity: Some(integrity),
            plan: None,
            predicted: None,
            note,
            io: None,
        }
    }

    /// Gamma as the evaluation counts it: 0 for a failed run.
    pub fn gamma(&self) -> f64 {
        match (&self.measured, self.failed) {
            (Some(m), false) => m.gamma,
            _ => 0.0,
        }
    }
}

/// The smallest and largest of a mode's Gammas over its runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Spread {
    /// The smallest.
    pub min: f64,
    /// The largest.
    pub max: f64,
}

/// What one mode measured over its runs.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    /// At least one run failed.
    pub failed: bool,
    /// The first failed run's error.
    pub error: Option<String>,
    /// The median of its runs' Gammas (a failed run counts 0).
    pub gamma: f64,
    /// The range of its runs' Gammas.
    pub gamma_spread: Spread,
    /// The figures of the run whose Gamma is the median of the runs that
    /// did not fail (`null`: every run failed).
    pub measured: Option<Figures>,
    /// Every run's integrity, summed (`checked`: every completed run was).
    pub integrity: ModeIntegrity,
    /// Every run.
    pub runs: Vec<RunResult>,
}

impl ModeResult {
    fn of(runs: Vec<RunResult>) -> Self {
        let gammas: Vec<f64> = runs.iter().map(RunResult::gamma).collect();
        let gamma = median(&gammas).unwrap_or(0.0);
        let gamma_spread = Spread {
            min: gammas.iter().copied().fold(f64::INFINITY, f64::min),
            max: gammas.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        };
        let good: Vec<&Figures> = runs
            .iter()
            .filter(|r| !r.failed)
            .filter_map(|r| r.measured.as_ref())
            .collect();
        let mid = median(&good.iter().map(|f| f.gamma).collect::<Vec<_>>());
        let measured = mid.and_then(|g| {
            good.iter()
                .min_by(|a, b| (a.gamma - g).abs().total_cmp(&(b.gamma - g).abs()))
                .map(|f| **f)
        });
        let done: Vec<&ModeIntegrity> = runs.iter().filter_map(|r| r.integrity.as_ref()).collect();
        let integrity = ModeIntegrity {
            checked: !done.is_empty() && done.iter().all(|i| i.checked),
            checker_errors: done.iter().map(|i| i.checker_errors).sum(),
            pages_compared: done.iter().map(|i| i.pages_compared).sum(),
            guest_pages_verified: done.iter().map(|i| i.guest_pages_verified).sum(),
            holes_compared: done.iter().map(|i| i.holes_compared).sum(),
            pages_differing: done.iter().map(|i| i.pages_differing).sum(),
            disk_compared: done.iter().map(|i| i.disk_compared).sum(),
            disk_differing: done.iter().map(|i| i.disk_differing).sum(),
        };
        ModeResult {
            failed: runs.iter().any(|r| r.failed),
            error: runs.iter().find_map(|r| r.error.clone()),
            gamma,
            gamma_spread,
            measured,
            integrity,
            runs,
        }
    }
}

/// Whether a workload met the targets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Targets {
    /// `gamma_regret` within its bound.
    pub gamma_regret: bool,
    /// `gamma_recovered` at least 0.5, or the plan within 0.005 of a best
    /// QEMU mode at 0.98 or more (`null`: no QEMU mode ran).
    pub gamma_recovered: Option<bool>,
    /// Every run of every mode intact.
    pub intact: bool,
}

/// One workload's results.
#[derive(Debug, Clone, Serialize)]
pub struct WorkloadResult {
    /// The workload.
    pub name: String,
    /// The first planned run's `(M, S)` (every run's is in its mode's runs;
    /// `null`: no planned run completed).
    pub plan: Option<PlanMs>,
    /// The planner's predictions, each figure's median over the planned
    /// runs that did not fail.
    pub predicted: Option<Headline>,
    /// What those runs measured, each figure's median.
    pub measured: Option<Headline>,
    /// Signed relative errors of `predicted` against `measured` (floors
    /// [`ERROR_FLOORS_S`]).
    pub prediction_error: Option<PredictionError>,
    /// Their absolute values.
    pub prediction_error_floored: Option<PredictionError>,
    /// Every mode's Gamma: the median over its runs, a failed run counting 0.
    pub gamma: BTreeMap<String, f64>,
    /// Every mode's Gamma range over its runs.
    pub gamma_spread: BTreeMap<String, Spread>,
    /// The best Gamma of the other modes minus the planned plan's.
    pub gamma_regret: f64,
    /// `(planned - best QEMU) / (1 - best QEMU)` (`null`: no QEMU mode ran,
    /// or the best reached 1).
    pub gamma_recovered: Option<f64>,
    /// The targets, judged.
    pub targets: Targets,
    /// Every mode's runs.
    pub modes: BTreeMap<String, ModeResult>,
    /// Every run of every mode held its integrity (checked, 0 differing
    /// pages, chunks and disk blocks, 0 checker errors).
    pub intact: bool,
    /// The seed's Tables I and II for this workload (`null`: not measured).
    pub unit_prediction_accuracy: Option<UnitPredictionAccuracy>,
    /// The planned migration over time (the plotted workload only).
    pub timeline: Option<Timeline>,
    /// The PNGs drawn for this workload: its timeline and Gamma heatmap.
    pub plots: Vec<PathBuf>,
}

/// The evaluation.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// Link rate, bit/s.
    pub rate_bps: f64,
    /// Link RTT, s.
    pub rtt_s: f64,
    /// Runs of every mode.
    pub repeat: u32,
    /// The bound `gamma_regret` is judged against: 0.01 on medians of 3 or
    /// more runs, 0.02 otherwise.
    pub gamma_regret_bound: f64,
    /// Per workload.
    pub workloads: Vec<WorkloadResult>,
    /// The median of `prediction_error_floored` over T, U, D, P of every
    /// workload (`null`: no planned run completed).
    pub median_prediction_error_floored: Option<f64>,
    /// The largest.
    pub max_prediction_error_floored: Option<f64>,
    /// Every target of every workload met.
    pub all_targets_met: bool,
    /// How the engines' bytes travelled (the first completed engine run's
    /// I/O backend and cipher; `null`: none completed).
    pub io: Option<wanmig_datapath::transport::IoPath>,
}

/// The evaluation could not run (a mode's failure is a result, not this).
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The emulated WAN.
    #[error("the emulated WAN: {0}")]
    Wan(String),
    /// The built-in guest.
    #[error("{workload}: the guest: {message}")]
    Guest {
        /// The workload.
        workload: String,
        /// What failed.
        message: String,
    },
    /// Plotting.
    #[error("{workload}: plots: {message}")]
    Plot {
        /// The workload.
        workload: String,
        /// What failed.
        message: String,
    },
}

/// The planned mode's name.
pub const PLANNED: &str = "wanmig_planned";

const MODES: [&str; 6] = [
    PLANNED,
    "wanmig_precopy",
    "wanmig_postcopy",
    "qemu_precopy",
    "qemu_postcopy",
    "qemu_hybrid",
];

/// The target for the prediction errors' median.
pub const MEDIAN_ERROR_TARGET: f64 = 0.05;
/// The target for their largest.
pub const MAX_ERROR_TARGET: f64 = 0.15;
/// The target for `gamma_recovered`.
pub const RECOVERED_TARGET: f64 = 0.5;

/// The bound on `gamma_regret` for `repeat` runs per mode.
pub fn regret_bound(repeat: u32) -> f64 {
    if repeat >= 3 { 0.01 } else { 0.02 }
}

/// The planned migration's timeline of `w` (with the WAN's `samples`) and
/// its plots: `timeline-<w>.png` and the planner's Gamma over `(M, S)`,
/// `heatmap-<w>.png`, recomputed from the profile and the link the planner
/// assumed.
fn plot(
    o: &EvalOptions,
    w: &Workload,
    r: &MigrationReport,
    samples: &timeline::WanSamples,
) -> Result<(Option<Timeline>, Vec<PathBuf>), String> {
    let mut plots = Vec::new();
    let t = Timeline::of(r, samples);
    std::fs::create_dir_all(&o.plot_dir).map_err(|e| format!("{}: {e}", o.plot_dir.display()))?;
    if let Some(t) = &t {
        let out = o.plot_dir.join(format!("timeline-{}.png", w.name));
        let title = format!(
            "{}: planned M = {:.2}, S = {:.2} at {} / {}",
            w.name,
            r.plan.m,
            r.plan.s,
            o.rate,
            wanmig_planner::units::format_duration(o.rtt)
        );
        timeline::draw(&out, t, &title).map_err(|e| wanmig_datapath::error_chain(&e))?;
        plots.push(out);
    }
    if let Some(link) = r.planner_link {
        let path = o.dir.join(format!("{}.wmp", w.name));
        let profile = Profile::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let classes = ClassProfile::from_profile(&profile).map_err(|e| e.to_string())?;
        let params = ModelParams {
            downtime_target: Some(o.downtime_target.as_secs_f64()),
            ..ModelParams::default()
        };
        let plan = make_plan(
            &classes,
            Some(&profile),
            link,
            params,
            &SearchOptions::default(),
        )
        .map_err(|e| e.to_string())?;
        let out = o.plot_dir.join(format!("heatmap-{}.png", w.name));
        let opts = HeatmapOptions {
            title: format!("{}: predicted Gamma over (M, S)", w.name),
            ..HeatmapOptions::default()
        };
        heatmap::draw(&out, &plan.search, &opts).map_err(|e| e.to_string())?;
        plots.push(out);
    }
    Ok((t, plots))
}

/// The best Gamma of QEMU's modes that ran (`None`: none did).
fn best_qemu_gamma(gamma: &BTreeMap<String, f64>) -> Option<f64> {
    QemuMode::ALL
        .iter()
        .filter_map(|m| gamma.get(m.name()).copied())
        .max_by(f64::total_cmp)
}

/// The best Gamma of the modes other than the planned one minus the planned
/// one's (0 when no other mode ran).
fn regret(gamma: &BTreeMap<String, f64>) -> f64 {
    let planned = gamma.get(PLANNED).copied().unwrap_or(0.0);
    gamma
        .iter()
        .filter(|(m, _)| m.as_str() != PLANNED)
        .map(|(_, g)| *g)
        .max_by(f64::total_cmp)
        .map_or(0.0, |best| best - planned)
}

/// `(planned - best QEMU) / (1 - best QEMU)` and whether it meets the
/// target (`None`: no QEMU mode ran).
fn recovered(gamma: &BTreeMap<String, f64>) -> Option<(Option<f64>, bool)> {
    let q = best_qemu_gamma(gamma)?;
    let planned = gamma.get(PLANNED).copied().unwrap_or(0.0);
    let share = (q < 1.0).then(|| (planned - q) / (1.0 - q));
    let met = if q >= 0.98 {
        planned >= q - 0.005
    } else {
        share.is_some_and(|s| s >= RECOVERED_TARGET)
    };
    Some((share, met))
}

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

/// One run of a wanmig mode; `samples`: the WAN's bytes over time, for
/// the plotted run.
fn wanmig_run(
    o: &EvalOptions,
    w: &Workload,
    mode: &str,
    k: u32,
    wan: &Wan,
    sample: bool,
) -> Result<(RunResult, Option<(MigrationReport, timeline::WanSamples)>), EvalError> {
    let planning = match mode {
        PLANNED => Planning::ProfileNow {
            path: o.dir.join(format!("{}.wmp", w.name)),
            samples: o.samples,
            interval: o.interval,
            rate: o.rate,
            rtt: o.rtt,
            downtime_target: Some(o.downtime_target),
        },
        "wanmig_precopy" => Planning::Fixed { m: 1.0, s: 1.0 },
        _ => Planning::Fixed { m: 0.0, s: 0.0 },
    };
    let guest = guest_of(w, o.memory_mib).map_err(|message| EvalError::Guest {
        workload: w.name.clone(),
        message,
    })?;
    let spec = LocalMigration {
        guest,
        planning,
        // The engine freezes within the target the planner was given.
        source: SourceConfig {
            downtime_target: o.downtime_target,
            ..SourceConfig::default()
        },
        dest: DestConfig::default(),
        link: LinkConfig::default(),
        run_dir: o.dir.join(format!("{}-{mode}", w.name)),
        tag: format!("ev{}{}", &mode[7..9], std::process::id()),
        // Every workload runs the page checker (idle's slowly).
        warmup_heartbeats: 3,
        warmup_disk_heartbeats: usize::from(w.disk_mib > 0) * 2,
        observe_heartbeats: 3,
    };
    // The WAN's bytes are sampled only for the plotted run.
    let (out, samples) = if sample {
        timeline::sample_wan(wan, Duration::from_millis(100), || run_over_wan(&spec, wan))
    } else {
        (run_over_wan(&spec, wan), Vec::new())
    };
    let out = match out {
        Ok(out) => out,
        Err(e) => return Ok((RunResult::failed(wanmig_datapath::error_chain(&e)), None)),
    };
    let r = out.report.clone();
    out.cleanup();
    // The engines' whole report, to read a figure's cause afterwards.
    let kept = o
        .dir
        .join(format!("{}-{mode}-{}.report.json", w.name, k + 1));
    let note = match serde_json::to_vec_pretty(&r)
        .map_err(std::io::Error::other)
        .and_then(|json| std::fs::write(&kept, json))
    {
        Ok(()) => String::new(),
        Err(e) => format!("report not kept ({}: {e})", kept.display()),
    };
    let mut run = RunResult::completed(r.measured, ModeIntegrity::of_wanmig(&r), note);
    run.plan = Some(PlanMs {
        m: r.plan.m,
        s: r.plan.s,
    });
    run.predicted = r.predicted.map(Headline::from);
    run.io = Some(r.io.clone());
    if mode == PLANNED && run.predicted.is_none() && !run.failed {
        run.failed = true;
        run.error = Some("the planned migration carries no prediction".into());
    }
    Ok((run, sample.then_some((r, samples))))
}

/// One run of a QEMU mode.
fn qemu_run(
    o: &EvalOptions,
    w: &Workload,
    mode: QemuMode,
    wan: &Wan,
) -> Result<RunResult, EvalError> {
    let guest = guest_of(w, o.memory_mib).map_err(|message| EvalError::Guest {
        workload: w.name.clone(),
        message,
    })?;
    let run = QemuRun {
        guest,
        mode,
        run_dir: o.dir.join(format!("{}-{}", w.name, mode.name())),
        dt: DestConfig::default().dt,
        downtime_limit: o.downtime_target,
        precopy_timeout: o.qemu_precopy_timeout,
        warmup_heartbeats: 3,
        warmup_disk_heartbeats: usize::from(w.disk_mib > 0) * 2,
        observe_heartbeats: 3,
    };
    Ok(match qemu_native::run(&run, wan) {
        Ok(r) => {
            let mut notes = Vec::new();
            if let Some(t) = r.suspended_after_s {
                notes.push(format!(
                    "did not converge: guest paused after {t:.0} s (virsh --timeout)"
                ));
            }
            if r.window_stalls == WindowStalls::ProRated {
                notes.push("stalls in Gamma's window pro-rated".to_string());
            }
            let integrity = ModeIntegrity::of_qemu(&r, w.disk_mib << 20);
            RunResult::completed(r.measured, integrity, notes.join("; "))
        }
        Err(e) => RunResult::failed(wanmig_datapath::error_chain(&e)),
    })
}

/// Prints a progress line.
fn progress(w: &str, mode: &str, k: u32, n: u32, r: &RunResult) {
    let what = match (&r.measured, &r.error) {
        (_, Some(e)) => format!("FAILED: {e}"),
        (Some(m), None) => format!(
            "T {:.1} s, D {:.3} s, P {:.2} s, Gamma {:.3}",
            m.total_s, m.downtime_s, m.penalty_s, m.gamma
        ),
        (None, None) => "no figures".into(),
    };
    eprintln!("eval: {w}: {mode} run {}/{n}: {what}", k + 1);
}

/// Runs the evaluation. A mode that fails is a result (Gamma 0); only a
/// WAN, guest or plot that cannot be made ends it.
pub fn run(o: &EvalOptions) -> Result<EvalReport, EvalError> {
    let wan = Wan::up(WanConfig::new("eval", o.rate, o.rtt))
        .map_err(|e| EvalError::Wan(e.to_string()))?;
    let repeat = o.repeat.max(1);
    let mut results = Vec::new();
    for w in &o.workloads {
        let mut modes = BTreeMap::new();
        let (mut timeline, mut plots) = (None, Vec::new());
        for mode in &MODES[..3] {
            let mut runs = Vec::new();
            for k in 0..repeat {
                let plotted = *mode == PLANNED
                    && o.plot_workload.as_deref() == Some(&w.name)
                    && timeline.is_none()
                    && plots.is_empty();
                let (run, sampled) = wanmig_run(o, w, mode, k, &wan, plotted)?;
                progress(&w.name, mode, k, repeat, &run);
                if let Some((r, samples)) = sampled.filter(|_| !run.failed) {
                    let (t, p) = plot(o, w, &r, &samples).map_err(|message| EvalError::Plot {
                        workload: w.name.clone(),
                        message,
                    })?;
                    timeline = t;
                    plots = p;
                }
                runs.push(run);
            }
            modes.insert(mode.to_string(), ModeResult::of(runs));
        }
        for &mode in &o.qemu_modes {
            let mut runs = Vec::new();
            for k in 0..repeat {
                let run = qemu_run(o, w, mode, &wan)?;
                progress(&w.name, mode.name(), k, repeat, &run);
                runs.push(run);
            }
            modes.insert(mode.name().to_string(), ModeResult::of(runs));
        }
        let unit_prediction_accuracy = match o.predictability_horizon {
            Some(h) => {
                let guest = guest_of(w, o.memory_mib).map_err(|message| EvalError::Guest {
                    workload: w.name.clone(),
                    message,
                })?;
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
                match predictability::measure(&guest, &opts, &dir, &tag) {
                    Ok(u) => Some(u),
                    Err(e) => {
                        eprintln!("eval: {}: predictability FAILED: {e}", w.name);
                        None
                    }
                }
            }
            None => None,
        };
        results.push(workload_result(
            w,
            modes,
            timeline,
            plots,
            unit_prediction_accuracy,
            repeat,
        ));
    }
    drop(wan);
    Ok(report(o, repeat, results))
}

/// One workload's figures and targets from its modes' runs.
fn workload_result(
    w: &Workload,
    modes: BTreeMap<String, ModeResult>,
    timeline: Option<Timeline>,
    plots: Vec<PathBuf>,
    unit_prediction_accuracy: Option<UnitPredictionAccuracy>,
    repeat: u32,
) -> WorkloadResult {
    let planned: Vec<&RunResult> = modes
        .get(PLANNED)
        .map(|m| m.runs.iter().filter(|r| !r.failed).collect())
        .unwrap_or_default();
    let predicted = Headline::median_of(
        &planned
            .iter()
            .filter_map(|r| r.predicted)
            .collect::<Vec<_>>(),
    );
    let measured = Headline::median_of(
        &planned
            .iter()
            .filter_map(|r| r.measured.map(Headline::from))
            .collect::<Vec<_>>(),
    );
    let prediction_error = predicted
        .zip(measured)
        .map(|(p, m)| PredictionError::of(&p, &m));
    let plan = modes
        .get(PLANNED)
        .and_then(|m| m.runs.iter().find_map(|r| r.plan));
    let gamma: BTreeMap<String, f64> = modes.iter().map(|(k, m)| (k.clone(), m.gamma)).collect();
    let gamma_spread = modes
        .iter()
        .map(|(k, m)| (k.clone(), m.gamma_spread))
        .collect();
    // Every run that completed held its integrity (one that did not
    // complete failed, and counts as Gamma 0, but corrupted nothing seen).
    let intact = modes
        .values()
        .flat_map(|m| &m.runs)
        .all(|r| r.integrity.is_none_or(|i| i.holds()));
    let gamma_regret = regret(&gamma);
    let rec = recovered(&gamma);
    WorkloadResult {
        name: w.name.clone(),
        plan,
        predicted,
        measured,
        prediction_error_floored: prediction_error.map(|e| e.abs()),
        prediction_error,
        gamma_regret,
        gamma_recovered: rec.and_then(|(s, _)| s),
        targets: Targets {
            gamma_regret: gamma_regret <= regret_bound(repeat),
            gamma_recovered: rec.map(|(_, met)| met),
            intact,
        },
        gamma,
        gamma_spread,
        modes,
        intact,
        unit_prediction_accuracy,
        timeline,
        plots,
    }
}

/// The whole report from the workloads' results.
fn report(o: &EvalOptions, repeat: u32, workloads: Vec<WorkloadResult>) -> EvalReport {
    let errs: Vec<f64> = workloads
        .iter()
        .filter_map(|w| w.prediction_error_floored)
        .flat_map(|e| e.all())
        .collect();
    let median_err = median(&errs);
    let max_err = errs.iter().copied().max_by(f64::total_cmp);
    let errors_met = workloads.iter().all(|w| w.prediction_error.is_some())
        && median_err.is_some_and(|m| m <= MEDIAN_ERROR_TARGET)
        && max_err.is_some_and(|m| m <= MAX_ERROR_TARGET);
    let all_targets_met = errors_met
        && workloads.iter().all(|w| {
            w.targets.gamma_regret && w.targets.intact && w.targets.gamma_recovered != Some(false)
        });
    let io = workloads
        .iter()
        .flat_map(|w| w.modes.values())
        .flat_map(|m| &m.runs)
        .find_map(|r| r.io.clone());
    EvalReport {
        io,
        rate_bps: o.rate.bytes_per_second() * 8.0,
        rtt_s: o.rtt.as_secs_f64(),
        repeat,
        gamma_regret_bound: regret_bound(repeat),
        median_prediction_error_floored: median_err,
        max_prediction_error_floored: max_err,
        all_targets_met,
        workloads,
    }
}
