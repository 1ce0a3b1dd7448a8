//! A plan: the search's answer, its full prediction, and the pre-copy rules
//! the engine applies; plus the report printed by `wanmig-planner plan`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{Link, Model, ModelError, ModelParams, Prediction};
use crate::profile::{ClassProfile, Kind, Profile};
use crate::rule::{PrecopyRule, ResolveError};
use crate::search::{Liveness, Point, SearchOptions, SearchResult, search};

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    /// Invalid model inputs, or a non-finite prediction.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The rules could not be resolved against the per-unit profile.
    #[error(transparent)]
    Resolve(#[from] ResolveError),
}

/// A finished plan.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The full prediction at the chosen point.
    pub prediction: Prediction,
    /// The search (grid, ternary, liveness).
    pub search: SearchResult,
    /// Pre-copy rule for pages.
    pub page_rule: PrecopyRule,
    /// Pre-copy rule for chunks.
    pub chunk_rule: PrecopyRule,
    /// The link assumed.
    pub link: Link,
    /// The parameters used.
    pub params: ModelParams,
    /// The model the plan was made with (shared, for re-use by `serve`).
    pub model: Arc<Model>,
    /// Model build + search + the chosen point's prediction (what the
    /// benchmark measures).
    pub elapsed: Duration,
    /// Time spent resolving rule cutoffs against the per-unit profile.
    pub resolve_elapsed: Duration,
    /// Page and chunk class counts.
    pub classes: (usize, usize),
    /// Distinct write-rate groups.
    pub write_groups: usize,
    /// The profile figures.
    pub profile: ProfileFigures,
}

/// Profile figures echoed in reports.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProfileFigures {
    /// `n`.
    pub samples: u32,
    /// `tau` (s).
    pub interval_s: f64,
    /// Pages.
    pub page_count: u64,
    /// Chunks.
    pub chunk_count: u64,
    /// Page size.
    pub page_size: u64,
    /// Chunk size.
    pub chunk_size: u64,
    /// Device state bytes used by the model.
    pub state_bytes: f64,
    /// The class profile's fingerprint
    /// ([`ClassProfile::fingerprint`](crate::profile::ClassProfile::fingerprint)).
    pub fingerprint: u64,
}

/// Builds the model, searches, predicts the chosen point (these three are
/// timed as [`Plan::elapsed`]), and derives the rules, resolved against
/// `units` when given (pages and chunks concurrently; timed as
/// [`Plan::resolve_elapsed`]).
pub fn make_plan(
    classes: &ClassProfile,
    units: Option<&Profile>,
    link: Link,
    params: ModelParams,
    opts: &SearchOptions,
) -> Result<Plan, PlanError> {
    let start = Instant::now();
    let model = Model::new(classes, link, params)?;
    let result = search(&model, opts);
    let chosen = result.chosen;
    let prediction = model.predict_with(chosen.m, chosen.s, chosen.strategy);
    let elapsed = start.elapsed();
    prediction.check_finite()?;
    result.check_finite()?;
    let sel = model.selection(chosen.m, chosen.s);
    let fingerprint = classes.fingerprint();
    let t = Instant::now();
    let mut page_rule = PrecopyRule::from_boundary(
        Kind::Page,
        classes.samples,
        &model.boundary(Kind::Page, sel.pages),
        fingerprint,
    );
    let mut chunk_rule = PrecopyRule::from_boundary(
        Kind::Chunk,
        classes.samples,
        &model.boundary(Kind::Chunk, sel.chunks),
        fingerprint,
    );
    if let Some(p) = units {
        resolve_both(&mut page_rule, &mut chunk_rule, p, opts.threads)?;
    }
    Ok(Plan {
        prediction,
        search: result,
        page_rule,
        chunk_rule,
        link,
        params,
        elapsed,
        resolve_elapsed: t.elapsed(),
        classes: model.class_counts(),
        write_groups: model.write_groups(),
        profile: ProfileFigures {
            samples: classes.samples,
            interval_s: classes.interval_s,
            page_count: classes.page_count,
            chunk_count: classes.chunk_count,
            page_size: classes.page_size,
            chunk_size: classes.chunk_size,
            state_bytes: model.state_bytes(),
            fingerprint,
        },
        model: Arc::new(model),
    })
}

/// Resolves both rules: concurrently when both need a scan, else the one
/// that does on every thread.
fn resolve_both(
    pages: &mut PrecopyRule,
    chunks: &mut PrecopyRule,
    profile: &Profile,
    threads: usize,
) -> Result<(), ResolveError> {
    let threads = threads.max(1);
    match (pages.is_resolved(), chunks.is_resolved()) {
        (false, false) if threads > 1 => {
            let per = (threads / 2).max(1);
            let (a, b) = std::thread::scope(|s| {
                let a = s.spawn(|| pages.resolve_with(profile, per));
                let b = chunks.resolve_with(profile, threads - per);
                (a.join().expect("resolve worker panicked"), b)
            });
            a.and(b)
        }
        _ => {
            pages.resolve_with(profile, threads)?;
            chunks.resolve_with(profile, threads)
        }
    }
}

/// The predicted figures in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictedReport {
    /// `T` (s).
    pub total_s: f64,
    /// `U` (s).
    pub uptime_s: f64,
    /// `D` (s).
    pub downtime_s: f64,
    /// `P` (s).
    pub penalty_s: f64,
    /// `Gamma`.
    pub gamma: f64,
    /// `1 / (w1 D + w2 P)`.
    pub gamma_weighted: f64,
    /// Live pre-copy time (s).
    pub precopy_s: f64,
    /// `DeltaT` (s).
    pub delta_t_s: f64,
    /// Expected post-copy faults.
    pub expected_faults: f64,
    /// Pre-copy rounds.
    pub rounds: usize,
    /// Why pre-copy stops.
    pub stop: crate::model::StopReason,
    /// Bytes sent in the freeze besides the state.
    pub remainder_bytes: f64,
    /// Dirty bytes the freeze moved to post-copy (the overflow policy).
    pub overflow_bytes: f64,
    /// Expected pages among them.
    pub overflow_pages: f64,
    /// The plan's round limit and freeze policy.
    pub strategy: crate::model::PlanStrategy,
    /// Bytes pushed in post-copy.
    pub postcopy_bytes: f64,
    /// The downtime limit `L` (s): the target, or `dT` without one.
    pub downtime_limit_s: f64,
    /// Whether `D <= L`.
    pub meets_downtime_limit: bool,
}

impl From<&Prediction> for PredictedReport {
    fn from(p: &Prediction) -> Self {
        PredictedReport {
            total_s: p.total_s,
            uptime_s: p.uptime_s,
            downtime_s: p.downtime_s,
            penalty_s: p.penalty_s,
            gamma: p.gamma,
            gamma_weighted: p.gamma_weighted,
            precopy_s: p.precopy_s,
            delta_t_s: p.delta_t_s,
            expected_faults: p.expected_faults,
            rounds: p.rounds.len(),
            stop: p.stop,
            remainder_bytes: p.remainder_bytes,
            overflow_bytes: p.overflow_bytes,
            overflow_pages: p.overflow_pages,
            strategy: p.strategy,
            postcopy_bytes: p.postcopy_bytes,
            downtime_limit_s: p.downtime_limit_s,
            meets_downtime_limit: p.meets_downtime_limit,
        }
    }
}

/// The ternary answer in a report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TernaryReport {
    /// The point.
    #[serde(flatten)]
    pub point: Point,
    /// Whether it reaches the grid optimum.
    pub global: bool,
    /// Distinct evaluations the two ternary searches made.
    pub evaluations: usize,
    /// Step 1's storage fraction (memory instantly copied).
    pub storage_step_s: f64,
}

/// The link in a report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkReport {
    /// Bits per second.
    pub bandwidth_bps: f64,
    /// RTT (s).
    pub rtt_s: f64,
}

/// The rules in a report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RulesReport {
    /// Pages.
    pub pages: PrecopyRule,
    /// Chunks.
    pub chunks: PrecopyRule,
}

/// `wanmig-planner plan --json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanReport {
    /// Chosen memory fraction.
    pub m: f64,
    /// Chosen storage fraction.
    pub s: f64,
    /// Whether live migration is possible on this link.
    pub live_possible: bool,
    /// Why not, if not.
    pub live_reason: Option<String>,
    /// The liveness check's figures.
    pub liveness: Liveness,
    /// The prediction at `(m, s)`.
    pub predicted: PredictedReport,
    /// The plan's round limit and freeze policy.
    pub strategy: crate::model::PlanStrategy,
    /// Where the plan comes from: `grid`, or a named strategy.
    pub chosen_from: String,
    /// The named strategies of the plan family, evaluated.
    pub candidates: Vec<crate::search::Candidate>,
    /// Best grid point.
    pub grid: Point,
    /// The seed recursion's answer.
    pub ternary: TernaryReport,
    /// Model build + search + prediction (ms).
    pub elapsed_ms: f64,
    /// Rule cutoff resolution (ms).
    pub resolve_ms: f64,
    /// Model evaluations.
    pub evaluations: usize,
    /// The pre-copy rules.
    pub rules: RulesReport,
    /// The pre-copy rounds.
    pub rounds: Vec<crate::model::Round>,
    /// The link assumed.
    pub link: LinkReport,
    /// Parameters.
    pub params: ModelParams,
    /// Profile figures.
    pub profile: ProfileFigures,
    /// Page classes.
    pub page_classes: usize,
    /// Chunk classes.
    pub chunk_classes: usize,
}

impl Plan {
    /// The JSON report.
    pub fn report(&self) -> PlanReport {
        let r = &self.search;
        PlanReport {
            m: r.chosen.m,
            s: r.chosen.s,
            live_possible: r.live.possible,
            live_reason: r.live.reason.clone(),
            liveness: r.live.clone(),
            predicted: (&self.prediction).into(),
            strategy: r.chosen.strategy,
            chosen_from: r.chosen_from.clone(),
            candidates: r.candidates.clone(),
            grid: r.grid,
            ternary: TernaryReport {
                point: r.ternary,
                global: r.ternary_is_global,
                evaluations: r.ternary_evaluations,
                storage_step_s: r.storage_step.s,
            },
            elapsed_ms: self.elapsed.as_secs_f64() * 1e3,
            resolve_ms: self.resolve_elapsed.as_secs_f64() * 1e3,
            evaluations: r.evaluations,
            rules: RulesReport {
                pages: self.page_rule,
                chunks: self.chunk_rule,
            },
            rounds: self.prediction.rounds.clone(),
            link: LinkReport {
                bandwidth_bps: self.link.bandwidth * 8.0,
                rtt_s: self.link.rtt,
            },
            params: self.params,
            profile: self.profile,
            page_classes: self.classes.0,
            chunk_classes: self.classes.1,
        }
    }
}
