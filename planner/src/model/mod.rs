//! The three-phase migration model (`model.md`), evaluated on classes.
//!
//! [`Model::new`] ranks the classes of each kind, precomputes what every
//! evaluation shares (rates, the work-time grid and per-step suffix tables
//! of the post-copy stall integral, per-write-rate byte vectors for the 101
//! grid fractions), and then:
//!
//! - [`Model::predict`] gives the full [`Prediction`] for a plan `(M, S)`;
//! - [`Model::evaluate`] gives what the search needs (`D`, `DeltaT`, `Gamma`,
//!   the objective) in O(distinct write rates x rounds + window steps x
//!   (log classes + zero-written classes)), independent of guest size.
//!
//! See the crate docs for the model's equations and decisions;
//! [`precopy`] and [`postcopy`] hold the per-phase formulas.

mod overflow;
pub mod postcopy;
pub mod precopy;
pub mod rates;
#[cfg(test)]
pub(crate) mod reference;

use std::cmp::Ordering;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::profile::classes::ClassProfileError;
use crate::profile::{ClassProfile, Kind, UnitCounters};
use crate::units::Rate;
use overflow::{GroupTables, Overflow};
use postcopy::{StallTable, zero_weight};
pub use precopy::{FreezePolicy, PlanStrategy, Round, RoundDirty, StopReason, UnknownFreezePolicy};
use precopy::{Group, PrecopyLink};
use rates::{MAX_SAMPLES, RateTable};

/// Grid resolution: fractions `i / GRID_STEPS`, `i = 0..=GRID_STEPS`.
pub const GRID_STEPS: usize = 100;

/// The shortest profile interval `tau` the model accepts (seconds).
pub const MIN_INTERVAL_S: f64 = 1e-9;

/// Bulk data queued at the bottleneck ahead of a fault's reply while the
/// post-copy push runs, in round trips. The engine paces its bulk
/// connection to `gain x BDP` in flight (`gain` 2, `wanmig_datapath`'s
/// `PacingConfig`), so about one BDP waits in the bottleneck queue, one
/// round trip's worth at the link's rate: a fault's reply queues behind it.
/// On the emulated 40 Mbit/s, 5 ms WAN a page fault measured 10 ms from
/// request to arrival during the push (25 serial faults per 250 ms),
/// against the 5.8 ms of round trip and transmission alone.
pub const FAULT_QUEUE_RTTS: f64 = 1.0;

/// The migration link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bandwidth `B` in link bytes per second.
    pub bandwidth: f64,
    /// Round-trip time in seconds.
    pub rtt: f64,
    /// Link bytes per unit byte, per kind of unit (the engine compresses,
    /// and what compresses how differs: see [`WireCost`]). Default: one
    /// link byte per unit byte.
    #[serde(default, skip_serializing_if = "WireCost::is_one")]
    pub wire: WireCost,
}

/// Link bytes a unit byte costs on the wire (LZ4 and frame headers), by
/// kind and by whether the profile saw the unit written.
///
/// Written units are what pre-copy rounds resend, the freeze carries and
/// faults fetch; never-written units are most of round 0 and of the
/// post-copy push, and their content (kernel text, page cache, a disk's
/// files) compresses differently from what the guest is rewriting (its
/// working data). The model gives each class the cost of its kind and
/// written-ness: round 0 sends the pre-copy set at its own mix, the push
/// sends each unit at its own cost, in its order. A fault's fetch is costed
/// at the written units' rate (the units the guest touches).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct WireCost {
    /// Pages the profile saw written.
    pub page_written: f64,
    /// Pages it did not.
    pub page_unwritten: f64,
    /// Chunks the profile saw written.
    pub chunk_written: f64,
    /// Chunks it did not.
    pub chunk_unwritten: f64,
}

impl WireCost {
    /// One link byte per unit byte for every unit.
    pub const ONE: WireCost = WireCost {
        page_written: 1.0,
        page_unwritten: 1.0,
        chunk_written: 1.0,
        chunk_unwritten: 1.0,
    };

    /// Whether every cost is 1.
    pub fn is_one(&self) -> bool {
        *self == WireCost::ONE
    }

    /// The cost of a unit of `kind` that was (`written`) or was not written.
    pub fn of(&self, kind: Kind, written: bool) -> f64 {
        match (kind, written) {
            (Kind::Page, true) => self.page_written,
            (Kind::Page, false) => self.page_unwritten,
            (Kind::Chunk, true) => self.chunk_written,
            (Kind::Chunk, false) => self.chunk_unwritten,
        }
    }

    fn check(&self) -> Result<(), ModelError> {
        for (what, value) in [
            ("wire.page_written", self.page_written),
            ("wire.page_unwritten", self.page_unwritten),
            ("wire.chunk_written", self.chunk_written),
            ("wire.chunk_unwritten", self.chunk_unwritten),
        ] {
            check(
                what,
                value,
                value.is_finite() && value > 0.0,
                "must be positive (link bytes per unit byte)",
            )?;
        }
        Ok(())
    }
}

impl Default for WireCost {
    fn default() -> Self {
        WireCost::ONE
    }
}

impl Link {
    /// A link from a rate (bits/s) and an RTT, one link byte per unit byte.
    pub fn new(rate: Rate, rtt: Duration) -> Link {
        Link {
            bandwidth: rate.bytes_per_second(),
            rtt: rtt.as_secs_f64(),
            wire: WireCost::ONE,
        }
    }

    /// How long a post-copy fault stalls the guest when its reply carries
    /// `bytes` link bytes: the round trip, the bulk data queued ahead of
    /// the reply at the bottleneck ([`FAULT_QUEUE_RTTS`] round trips), and
    /// the reply's own transmission.
    pub fn fault_stall(&self, bytes: f64) -> f64 {
        self.rtt * (1.0 + FAULT_QUEUE_RTTS) + bytes / self.bandwidth
    }

    /// This link with its bandwidth scaled by `factor` (a measured rate
    /// against the planned one); the wire costs stay.
    pub fn scaled(self, factor: f64) -> Link {
        Link {
            bandwidth: self.bandwidth * factor,
            ..self
        }
    }
}

/// What the search maximises.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "policy")]
pub enum Policy {
    /// Performance restoration agility `Gamma = dT / (D + DeltaT)`.
    Gamma,
    /// The weighted alternative `1 / (w1 D + w2 P)`.
    Weighted {
        /// Weight of the downtime.
        w1: f64,
        /// Weight of the penalty.
        w2: f64,
    },
}

/// Model parameters besides the profile and the link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ModelParams {
    /// `dT`: the restoration window in seconds (default 20).
    pub delta_t: f64,
    /// Ranking horizon `H` in seconds (default `dT`). Reported only: the
    /// ranking score `1 - exp(-(lambda_r + lambda_w) H)` orders units the
    /// same way for every `H > 0`.
    pub horizon: f64,
    /// Downtime target in seconds: pre-copy stops once the freeze would meet
    /// it, and it is the downtime limit `L` (see
    /// [`ModelParams::downtime_limit`]).
    pub downtime_target: Option<f64>,
    /// Pre-copy round limit, round 0 included (default 30).
    pub max_rounds: u32,
    /// A round must shrink the dirty set by at least this fraction to be
    /// followed by another (default 0.05).
    pub min_shrink: f64,
    /// Pre-copy has converged once the dirty remainder is at most this
    /// fraction of the device state plus one unit-sized floor (default
    /// 0.01; see [`precopy`]).
    pub converged: f64,
    /// Fixed cost of resuming at the destination, added to `D` (default 0).
    pub resume_overhead: f64,
    /// Multiplier on every write rate (1 = the profile; re-planning sets it
    /// from the measured dirty rate). The ranking is not affected (see the
    /// crate docs).
    pub write_scale: f64,
    /// Overrides the profile's device-state estimate (bytes).
    pub state_bytes: Option<u64>,
    /// Search objective.
    pub policy: Policy,
    /// Pool the read rates across the guest, pages with pages and chunks
    /// with chunks ([`rates::pooled_read_rates`]; default true): a unit the
    /// profile never saw read keeps a small rate (a random reader, such as
    /// a database over its file, reads far more chunks after the resume than
    /// a few seconds of profile saw). Off: each unit's own count.
    #[serde(default = "pool_reads_default")]
    pub pool_reads: bool,
    /// What the freeze does with a dirty remainder that does not fit the
    /// downtime limit (default [`FreezePolicy::Overflow`]: what fits goes,
    /// the coldest dirty pages are post-copied; see [`precopy`]).
    #[serde(default)]
    pub freeze: FreezePolicy,
}

fn pool_reads_default() -> bool {
    true
}

/// The unscaled read rates `ell(0..=n)` of one kind's populated units
/// (pages, or chunks): pooled over them ([`rates::pooled_read_rates`])
/// with `pool`, else each unit's own.
pub(crate) fn read_rates(
    n: u32,
    units: impl Iterator<Item = (UnitCounters, u64)>,
    pool: bool,
) -> Vec<f64> {
    let counts = units.filter(|(k, _)| !k.zero).map(|(k, m)| (k.r, m));
    if pool {
        rates::pooled_read_rates(n, counts)
    } else {
        RateTable::new(n).values().to_vec()
    }
}

impl Default for ModelParams {
    fn default() -> Self {
        ModelParams {
            delta_t: 20.0,
            horizon: 20.0,
            downtime_target: None,
            max_rounds: 30,
            min_shrink: 0.05,
            converged: 0.01,
            resume_overhead: 0.0,
            write_scale: 1.0,
            state_bytes: None,
            policy: Policy::Gamma,
            pool_reads: true,
            freeze: FreezePolicy::Overflow,
        }
    }
}

impl ModelParams {
    /// The downtime limit `L`: the downtime target, or `dT` without one (a
    /// pause as long as the whole restoration window is not a live
    /// migration). A plan with `D > L` is infeasible: never chosen while a
    /// feasible plan exists, and never called live.
    pub fn downtime_limit(&self) -> f64 {
        self.downtime_target.unwrap_or(self.delta_t)
    }

    /// The strategy of these parameters: their round limit and freeze
    /// policy (what the `(M, S)` grid is searched under).
    pub fn strategy(&self) -> PlanStrategy {
        PlanStrategy {
            max_rounds: self.max_rounds,
            freeze: self.freeze,
        }
    }
}

/// Invalid model inputs, or a result that is not a finite number.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// A link or parameter value is out of range.
    #[error("{what} = {value}: {reason}")]
    Invalid {
        /// The parameter.
        what: &'static str,
        /// Its value.
        value: f64,
        /// The valid range.
        reason: &'static str,
    },
    /// The class profile is inconsistent.
    #[error("invalid class profile")]
    Profile(#[from] ClassProfileError),
    /// A predicted figure is not a finite number (it is never printed or
    /// published as if it were one).
    #[error("predicted {what} is {value}, not a finite number")]
    NonFinite {
        /// The figure.
        what: &'static str,
        /// Its value.
        value: f64,
    },
}

/// The full prediction for one plan `(M, S)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    /// Memory fraction pre-copied.
    pub m: f64,
    /// Storage fraction pre-copied.
    pub s: f64,
    /// Pages in the pre-copy set (`round(M * pages)`).
    pub pages_precopied: u64,
    /// Chunks in the pre-copy set.
    pub chunks_precopied: u64,
    /// The pre-copy rounds.
    pub rounds: Vec<Round>,
    /// Why pre-copy stopped.
    pub stop: StopReason,
    /// Live pre-copy duration (s).
    pub precopy_s: f64,
    /// Dirty link bytes sent during the freeze.
    pub remainder_bytes: f64,
    /// Dirty link bytes the freeze moved to post-copy (the overflow policy:
    /// the coldest dirty units that did not fit the downtime limit); they
    /// are in [`postcopy_bytes`](Self::postcopy_bytes), pushed first.
    pub overflow_bytes: f64,
    /// Expected pages in that overflow.
    pub overflow_pages: f64,
    /// Expected chunks in that overflow.
    pub overflow_chunks: f64,
    /// The round limit and freeze policy of the plan.
    pub strategy: PlanStrategy,
    /// `D`: downtime (s).
    pub downtime_s: f64,
    /// Link bytes pushed after resume.
    pub postcopy_bytes: f64,
    /// `U`: remote uptime = post-copy duration (s).
    pub uptime_s: f64,
    /// `T` = pre-copy + `D` + `U` (s).
    pub total_s: f64,
    /// `P`: expected fault stall time over the whole post-copy (s).
    pub penalty_s: f64,
    /// Expected number of post-copy faults.
    pub expected_faults: f64,
    /// Expected stall time met during the first `dT` seconds of work (s).
    pub window_stall_s: f64,
    /// `DeltaT` = `dT` + window stalls (s): the wall time of `dT` seconds
    /// of work.
    pub delta_t_s: f64,
    /// `Gamma = dT / (D + DeltaT)`.
    pub gamma: f64,
    /// `1 / (w1 D + w2 P)` with the configured weights (1, 1 by default).
    pub gamma_weighted: f64,
    /// The search objective at this point (see [`Model::evaluate`]).
    pub objective: f64,
    /// The downtime limit `L` (s).
    pub downtime_limit_s: f64,
    /// Whether `D <= L`.
    pub meets_downtime_limit: bool,
}

impl Prediction {
    /// Every figure, by name.
    fn figures(&self) -> [(&'static str, f64); 19] {
        [
            ("m", self.m),
            ("s", self.s),
            ("precopy_s", self.precopy_s),
            ("remainder_bytes", self.remainder_bytes),
            ("overflow_bytes", self.overflow_bytes),
            ("overflow_pages", self.overflow_pages),
            ("overflow_chunks", self.overflow_chunks),
            ("downtime_s", self.downtime_s),
            ("postcopy_bytes", self.postcopy_bytes),
            ("uptime_s", self.uptime_s),
            ("total_s", self.total_s),
            ("penalty_s", self.penalty_s),
            ("expected_faults", self.expected_faults),
            ("window_stall_s", self.window_stall_s),
            ("delta_t_s", self.delta_t_s),
            ("gamma", self.gamma),
            ("gamma_weighted", self.gamma_weighted),
            ("objective", self.objective),
            ("downtime_limit_s", self.downtime_limit_s),
        ]
    }

    /// `Err` naming the first figure (or round) that is NaN or infinite.
    pub fn check_finite(&self) -> Result<(), ModelError> {
        let rounds = self.rounds.iter().flat_map(|r| {
            [
                ("round bytes", r.bytes),
                ("round duration_s", r.duration_s),
                ("round dirty_bytes", r.dirty_bytes),
            ]
        });
        for (what, value) in self.figures().into_iter().chain(rounds) {
            if !value.is_finite() {
                return Err(ModelError::NonFinite { what, value });
            }
        }
        Ok(())
    }
}

/// A plan's pre-copy set sizes in units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Selection {
    /// Pages pre-copied.
    pub pages: u64,
    /// Chunks pre-copied.
    pub chunks: u64,
}

/// What the search needs from one evaluation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Evaluation {
    /// `D` (s).
    pub downtime: f64,
    /// `DeltaT` (s).
    pub delta_t: f64,
    /// `Gamma`.
    pub gamma: f64,
    /// `P` (s); `NaN` unless computed (weighted policy, or full prediction).
    pub penalty: f64,
    /// The search objective: the policy's figure when `D <= L` (the
    /// downtime limit), else `-D` (below every feasible value, and larger
    /// the closer the plan is to feasible).
    pub objective: f64,
    /// Whether `D <= L`.
    pub feasible: bool,
    /// Why pre-copy stopped.
    pub stop: StopReason,
    /// Dirty link bytes the freeze moved to post-copy (0 unless the
    /// overflow policy needed to).
    pub overflow_bytes: f64,
}

/// The top `k` units of a kind in rank order, as classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankBoundary {
    /// Units selected.
    pub selected: u64,
    /// Units of the kind.
    pub total: u64,
    /// The class that is partly selected (`None` when `selected` is 0 or all).
    pub boundary: Option<UnitCounters>,
    /// Units of the boundary class selected (lowest addresses first).
    pub take: u64,
    /// Units of the boundary class.
    pub boundary_count: u64,
}

#[derive(Debug, Clone)]
pub(crate) struct RClass {
    pub key: UnitCounters,
    pub count: u64,
    /// Index into the write-rate groups, or `NO_GROUP` for `w = 0`.
    pub group: u32,
    pub lam_w: f64,
    /// Read part and write part of the post-copy fetch rate `lambda_a`.
    pub lam_parts: (f64, f64),
    /// Position in the merged (pages and chunks) rank order.
    pub pos: u32,
    /// Link bytes one unit of the class costs (its size times its
    /// [`WireCost`]).
    pub wire: f64,
}

impl RClass {
    /// `lambda_a`, the post-copy first-access (fetch) rate.
    #[inline]
    pub fn lam_a(&self) -> f64 {
        self.lam_parts.0 + self.lam_parts.1
    }
}

pub(crate) const NO_GROUP: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct KindModel {
    pub total: u64,
    /// [`Link::fault_stall`] of one unit at its written cost.
    pub stall: f64,
    /// Classes in rank order.
    pub classes: Vec<RClass>,
    /// `cum[i]` = units in `classes[..i]`.
    pub cum: Vec<u64>,
    /// `cum_bytes[i]` = link bytes of the populated classes in
    /// `classes[..i]`.
    pub cum_bytes: Vec<f64>,
    /// Zero classes with `w > 0` (their push weight depends on `T_pre`).
    pub zero_written: Vec<usize>,
    /// Per-unit step masses of the zero-written classes (`[z * K + k]`).
    pub zmass: Vec<f64>,
    /// The post-copy stall table (populated classes).
    pub table: StallTable,
    /// Per grid fraction: link bytes per write group, and round-0 link
    /// bytes.
    pub grid: Vec<(Vec<f64>, f64)>,
}

impl KindModel {
    /// `(b, take)`: classes `..b` fully selected, `take` units of class `b`.
    pub fn boundary_of(&self, k: u64) -> (usize, u64) {
        let b = self.cum.partition_point(|&c| c <= k) - 1;
        if b >= self.classes.len() {
            (self.classes.len(), 0)
        } else {
            (b, k - self.cum[b])
        }
    }

    /// Adds the per-group link bytes and round-0 link bytes of the top `k`
    /// units.
    fn accumulate(&self, k: u64, x: &mut [f64]) -> f64 {
        let (b, take) = self.boundary_of(k);
        let mut round0 = 0.0;
        let mut add = |c: &RClass, n: u64| {
            let bytes = n as f64 * c.wire;
            if c.group != NO_GROUP {
                x[c.group as usize] += bytes;
            }
            if !c.key.zero {
                round0 += bytes;
            }
        };
        for c in &self.classes[..b] {
            add(c, c.count);
        }
        if b < self.classes.len() && take > 0 {
            add(&self.classes[b], take);
        }
        round0
    }
}

/// A zero-written class in the post-copy set of one evaluation.
#[derive(Debug, Clone, Copy)]
struct ZeroRest {
    /// Merged position.
    pos: u32,
    /// Kind index.
    kind: u8,
    /// Index in the kind's `zero_written`.
    zw: u32,
    /// Units in the post-copy set.
    units: f64,
    /// Push weight `q`.
    q: f64,
    /// Link bytes of one unit.
    wire: f64,
    /// Push bytes of the zero-written entries before this one.
    before: f64,
}

/// The absent mass while the push front is inside one class (see
/// [`Model::front`]).
#[derive(Debug, Clone, Copy, Default)]
struct Front {
    /// Pushed bytes when the class starts arriving.
    start: f64,
    /// Push bytes per unit of the class (`q unit`).
    cost: f64,
    /// Post-copy units of the class.
    units: u64,
    /// Expected stall and faults with none of the class arrived.
    stall: f64,
    faults: f64,
    /// The same per unit of the class.
    unit_stall: f64,
    unit_faults: f64,
}

impl Front {
    /// `(stall, faults)` once `x` bytes are pushed (`x` within the class).
    #[inline]
    fn absent(&self, x: f64) -> (f64, f64) {
        let arrived = if self.cost > 0.0 {
            // Non-negative: truncation is the floor.
            ((nonneg(x - self.start) / self.cost) as u64).min(self.units)
        } else {
            self.units
        } as f64;
        (
            self.stall - arrived * self.unit_stall,
            self.faults - arrived * self.unit_faults,
        )
    }
}

/// Reusable per-thread scratch space for evaluations.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    x: Vec<f64>,
    groups: Vec<Group>,
    /// Each write group's dirty link bytes when pre-copy stops.
    dirty: Vec<f64>,
    zeros: Vec<ZeroRest>,
    ov: Overflow,
}

/// How much of the post-copy phase an evaluation integrates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Post {
    /// Up to `dT` (`DeltaT`).
    Window,
    /// Up to `dT`, and only when `D <= L`.
    IfFeasible,
    /// To the end (`P`).
    Whole,
}

impl Post {
    /// `IfFeasible` becomes `Window`.
    fn or_window(self) -> Post {
        match self {
            Post::IfFeasible => Post::Window,
            p => p,
        }
    }
}

/// How one side of a plan is given.
#[derive(Debug, Clone, Copy)]
enum Part {
    Grid(usize),
    Units(u64),
}

/// The post-copy set of one kind in an evaluation.
#[derive(Debug, Clone, Copy)]
struct RestKind {
    /// Whether the kind takes part (memory is left out when "instantly
    /// copied").
    included: bool,
    /// Boundary class: classes `..b` are pre-copied.
    b: usize,
    /// Units of class `b` pre-copied.
    take: u64,
    /// Populated bytes pre-copied (`cum_bytes[b]` + the taken units).
    pre_bytes: f64,
}

/// The model for one profile, link and parameter set.
#[derive(Debug, Clone)]
pub struct Model {
    link: Link,
    params: ModelParams,
    rates: RateTable,
    state: f64,
    /// `state / B + RTT + resume overhead`.
    freeze_fixed: f64,
    /// Converged threshold in bytes.
    converged_bytes: f64,
    /// `lambda_w` per write group.
    group_lambda: Vec<f64>,
    /// Unit bytes per link byte per write group (see [`Group::raw`]).
    group_raw: Vec<f64>,
    kinds: [KindModel; 2],
    /// The work-time grid (see [`postcopy`]).
    grid_t: Vec<f64>,
    /// `grid_t[window] = dT`.
    window: usize,
    /// The merged push order: `(kind, class index)`.
    merged: Vec<(u8, u32)>,
    /// `before[p]` = classes of each kind at merged positions `< p`.
    before: Vec<[u32; 2]>,
    /// Page write groups (the first groups of `group_lambda`).
    page_groups: usize,
    /// Per write group, stall tables for the freeze's overflow.
    group_tables: GroupTables,
}

fn check(what: &'static str, value: f64, ok: bool, reason: &'static str) -> Result<(), ModelError> {
    if ok && !value.is_nan() {
        Ok(())
    } else {
        Err(ModelError::Invalid {
            what,
            value,
            reason,
        })
    }
}

/// `x` when `x >= 0`, 0 when negative (rounding), NaN stays NaN.
#[inline]
pub(crate) fn nonneg(x: f64) -> f64 {
    if x < 0.0 { 0.0 } else { x }
}

/// `round(f * total)`, clamped to `[0, total]`.
pub fn units_for(fraction: f64, total: u64) -> u64 {
    let f = if fraction.is_nan() {
        0.0
    } else {
        fraction.clamp(0.0, 1.0)
    };
    ((f * total as f64).round() as u64).min(total)
}

/// The grid fraction `i / 100`.
pub fn grid_fraction(i: usize) -> f64 {
    i as f64 / GRID_STEPS as f64
}

impl Model {
    /// Builds the model. O(classes log classes + 101 x classes + classes x
    /// steps).
    pub fn new(
        profile: &ClassProfile,
        link: Link,
        params: ModelParams,
    ) -> Result<Model, ModelError> {
        profile.validate()?;
        let b = link.bandwidth;
        check(
            "bandwidth",
            b,
            b.is_finite() && b > 0.0,
            "must be positive (bytes/s)",
        )?;
        link.wire.check()?;
        check(
            "rtt",
            link.rtt,
            link.rtt.is_finite() && link.rtt >= 0.0,
            "must be >= 0",
        )?;
        check(
            "interval_s",
            profile.interval_s,
            profile.interval_s.is_finite() && profile.interval_s >= MIN_INTERVAL_S,
            "the profile interval must be at least 1 ns",
        )?;
        check(
            "samples",
            profile.samples.into(),
            (1..=MAX_SAMPLES).contains(&profile.samples),
            "must be in 1..=65535",
        )?;
        let p = &params;
        check(
            "delta_t",
            p.delta_t,
            p.delta_t.is_finite() && p.delta_t > 0.0,
            "must be positive",
        )?;
        check(
            "horizon",
            p.horizon,
            p.horizon.is_finite() && p.horizon > 0.0,
            "must be positive",
        )?;
        if let Some(t) = p.downtime_target {
            check(
                "downtime_target",
                t,
                t.is_finite() && t >= 0.0,
                "must be >= 0",
            )?;
        }
        check(
            "max_rounds",
            p.max_rounds.into(),
            p.max_rounds >= 1,
            "at least one round",
        )?;
        check(
            "min_shrink",
            p.min_shrink,
            (0.0..1.0).contains(&p.min_shrink),
            "must be in [0, 1)",
        )?;
        check(
            "converged",
            p.converged,
            p.converged.is_finite() && p.converged >= 0.0,
            "must be >= 0",
        )?;
        check(
            "resume_overhead",
            p.resume_overhead,
            p.resume_overhead.is_finite() && p.resume_overhead >= 0.0,
            "must be >= 0",
        )?;
        check(
            "write_scale",
            p.write_scale,
            p.write_scale.is_finite() && p.write_scale > 0.0,
            "must be positive",
        )?;
        if let Policy::Weighted { w1, w2 } = p.policy {
            check("w1", w1, w1.is_finite() && w1 >= 0.0, "must be >= 0")?;
            check("w2", w2, w2.is_finite() && w2 >= 0.0, "must be >= 0")?;
            check(
                "w1 + w2",
                w1 + w2,
                w1 + w2 > 0.0,
                "one weight must be positive",
            )?;
        }

        let rates = RateTable::new(profile.samples);
        let tau = profile.interval_s;
        let scale = p.write_scale;
        let lam = |k: u32| rates.ell(k) / tau;
        // The largest rate is ln(2n) / tau; with the scale it must stay finite.
        check(
            "write_scale",
            p.write_scale,
            (lam(profile.samples) * scale).is_finite(),
            "scaled write rates overflow",
        )?;
        let state = p.state_bytes.unwrap_or(profile.state_bytes) as f64;

        // Write groups: distinct w > 0 of each kind (pages' groups first),
        // so every group has one wire cost.
        let distinct_w = |kind: Kind| {
            let mut ws: Vec<u32> = profile
                .classes(kind)
                .iter()
                .map(|c| c.key.w)
                .filter(|&w| w > 0)
                .collect();
            ws.sort_unstable();
            ws.dedup();
            ws
        };
        let ws = [distinct_w(Kind::Page), distinct_w(Kind::Chunk)];
        let group_base = |kind: Kind| match kind {
            Kind::Page => 0,
            Kind::Chunk => ws[0].len(),
        };
        let group_lambda: Vec<f64> = ws.iter().flatten().map(|&w| lam(w) * scale).collect();
        let group_raw: Vec<f64> = [Kind::Page, Kind::Chunk]
            .iter()
            .zip(&ws)
            .flat_map(|(&kind, ws)| ws.iter().map(move |_| 1.0 / link.wire.of(kind, true)))
            .collect();
        let groups = group_lambda.len();
        let page_reads = read_rates(
            profile.samples,
            profile.pages.iter().map(|c| (c.key, c.count)),
            p.pool_reads,
        );
        let chunk_reads = read_rates(
            profile.samples,
            profile.chunks.iter().map(|c| (c.key, c.count)),
            p.pool_reads,
        );
        let lam_r = |kind: Kind, k: UnitCounters| match kind {
            Kind::Page if !k.zero => page_reads[k.r.min(profile.samples) as usize] / tau,
            Kind::Chunk if !k.zero => chunk_reads[k.r.min(profile.samples) as usize] / tau,
            _ => lam(k.r),
        };

        // Ranked classes of each kind.
        let ranked = |kind: Kind| -> Result<(Vec<RClass>, Vec<u64>), ModelError> {
            let mut classes: Vec<RClass> = profile
                .classes(kind)
                .iter()
                .map(|c| {
                    let k = c.key;
                    let lam_w = lam(k.w) * scale;
                    let write_fetch = match kind {
                        Kind::Page => 1.0,
                        Kind::Chunk if k.w > 0 => 1.0 - f64::from(k.o) / f64::from(k.w),
                        Kind::Chunk => 0.0,
                    };
                    RClass {
                        key: k,
                        count: c.count,
                        group: if k.w == 0 {
                            NO_GROUP
                        } else {
                            (group_base(kind)
                                + ws[usize::from(kind == Kind::Chunk)]
                                    .binary_search(&k.w)
                                    .expect("collected above")) as u32
                        },
                        lam_w,
                        lam_parts: (lam_r(kind, k), lam_w * write_fetch),
                        pos: 0,
                        wire: profile.unit_size(kind) as f64 * link.wire.of(kind, k.w > 0),
                    }
                })
                .collect();
            classes.sort_by(|a, b| rates.rank_cmp(&a.key, &b.key));
            let mut cum = Vec::with_capacity(classes.len() + 1);
            cum.push(0u64);
            for c in &classes {
                let next = cum
                    .last()
                    .and_then(|l: &u64| l.checked_add(c.count))
                    .ok_or(ClassProfileError::CountOverflow { kind })?;
                cum.push(next);
            }
            Ok((classes, cum))
        };
        let (mut page_classes, page_cum) = ranked(Kind::Page)?;
        let (mut chunk_classes, chunk_cum) = ranked(Kind::Chunk)?;

        // Positions in the merged order: rank, then pages before chunks.
        let mut merged = Vec::with_capacity(page_classes.len() + chunk_classes.len());
        let mut before = Vec::with_capacity(merged.capacity() + 1);
        let (mut i, mut j) = (0, 0);
        while i < page_classes.len() || j < chunk_classes.len() {
            before.push([i as u32, j as u32]);
            let page_next = j >= chunk_classes.len()
                || (i < page_classes.len()
                    && rates.rank_cmp(&page_classes[i].key, &chunk_classes[j].key)
                        != Ordering::Greater);
            if page_next {
                page_classes[i].pos = merged.len() as u32;
                merged.push((0u8, i as u32));
                i += 1;
            } else {
                chunk_classes[j].pos = merged.len() as u32;
                merged.push((1u8, j as u32));
                j += 1;
            }
        }
        before.push([i as u32, j as u32]);

        // The work-time grid: the fastest fetch rate and the longest push.
        let lam_max = page_classes
            .iter()
            .chain(&chunk_classes)
            .map(RClass::lam_a)
            .fold(0.0, f64::max);
        let u_max = page_classes
            .iter()
            .chain(&chunk_classes)
            .filter(|c| !c.key.zero || c.key.w > 0)
            .map(|c| c.count as f64 * c.wire)
            .sum::<f64>()
            / b;
        let (grid_t, window) = postcopy::work_grid(p.delta_t, lam_max, u_max);

        let build = |kind: Kind, classes: Vec<RClass>, cum: Vec<u64>| -> KindModel {
            let unit = profile.unit_size(kind) as f64;
            let stall = link.fault_stall(unit * link.wire.of(kind, true));
            let mut cum_bytes = Vec::with_capacity(classes.len() + 1);
            cum_bytes.push(0.0);
            for c in &classes {
                let own = if c.key.zero {
                    0.0
                } else {
                    c.count as f64 * c.wire
                };
                cum_bytes.push(cum_bytes.last().unwrap() + own);
            }
            let zero_written: Vec<usize> = (0..classes.len())
                .filter(|&i| classes[i].key.zero && classes[i].key.w > 0)
                .collect();
            let parts: Vec<(f64, f64)> = classes.iter().map(|c| c.lam_parts).collect();
            let weight: Vec<f64> = classes
                .iter()
                .map(|c| if c.key.zero { 0.0 } else { c.count as f64 })
                .collect();
            let (table, zmass) = StallTable::build(&grid_t, &parts, weight, &zero_written);
            let mut km = KindModel {
                total: profile.count(kind),
                stall,
                classes,
                cum,
                cum_bytes,
                zero_written,
                zmass,
                table,
                grid: Vec::new(),
            };
            // Grid snapshots (one sweep over the ranked classes), unless the
            // group vectors would be huge.
            if groups * (GRID_STEPS + 1) <= 1 << 22 {
                let mut x = vec![0.0; groups];
                let mut round0 = 0.0;
                let mut full = 0; // classes ..full are accumulated in x
                for i in 0..=GRID_STEPS {
                    let (b, take) = km.boundary_of(units_for(grid_fraction(i), km.total));
                    for c in &km.classes[full..b] {
                        let bytes = c.count as f64 * c.wire;
                        if c.group != NO_GROUP {
                            x[c.group as usize] += bytes;
                        }
                        if !c.key.zero {
                            round0 += bytes;
                        }
                    }
                    full = b;
                    let mut snap = x.clone();
                    let mut r0 = round0;
                    if b < km.classes.len() && take > 0 {
                        let c = &km.classes[b];
                        let bytes = take as f64 * c.wire;
                        if c.group != NO_GROUP {
                            snap[c.group as usize] += bytes;
                        }
                        if !c.key.zero {
                            r0 += bytes;
                        }
                    }
                    km.grid.push((snap, r0));
                }
            }
            km
        };
        let kinds = std::thread::scope(|s| {
            let pages = s.spawn(|| build(Kind::Page, page_classes, page_cum));
            let chunks = build(Kind::Chunk, chunk_classes, chunk_cum);
            [pages.join().expect("model build worker panicked"), chunks]
        });
        let converged_bytes =
            p.converged * (state + profile.page_size.max(profile.chunk_size) as f64);
        let page_groups = ws[0].len();
        let group_tables = GroupTables::build(
            &grid_t,
            group_lambda.len(),
            [&kinds[0].classes, &kinds[1].classes],
        );
        Ok(Model {
            link,
            params,
            rates,
            state,
            freeze_fixed: state / b + link.rtt + p.resume_overhead,
            converged_bytes,
            group_lambda,
            group_raw,
            kinds,
            grid_t,
            window,
            merged,
            before,
            page_groups,
            group_tables,
        })
    }

    /// The link the model assumes.
    pub fn link(&self) -> Link {
        self.link
    }

    /// The parameters.
    pub fn params(&self) -> &ModelParams {
        &self.params
    }

    /// The device-state bytes used.
    pub fn state_bytes(&self) -> f64 {
        self.state
    }

    /// `state / B + RTT + resume overhead`: the smallest possible downtime.
    pub fn min_downtime(&self) -> f64 {
        self.freeze_fixed
    }

    /// Number of classes of each kind (pages, chunks).
    pub fn class_counts(&self) -> (usize, usize) {
        (self.kinds[0].classes.len(), self.kinds[1].classes.len())
    }

    /// Number of distinct write-rate groups (the pre-copy state size).
    pub fn write_groups(&self) -> usize {
        self.group_lambda.len()
    }

    /// The post-copy work-time grid: `(points, index of dT)`.
    pub fn work_grid(&self) -> (&[f64], usize) {
        (&self.grid_t, self.window)
    }

    /// Entries of the post-copy stall tables (both kinds), for size reports.
    pub fn stall_table_entries(&self) -> usize {
        self.kinds.iter().map(|k| k.table.entries()).sum()
    }

    /// The rate table (ranking order).
    pub fn rates(&self) -> &RateTable {
        &self.rates
    }

    fn kind(&self, kind: Kind) -> &KindModel {
        match kind {
            Kind::Page => &self.kinds[0],
            Kind::Chunk => &self.kinds[1],
        }
    }

    /// The pre-copy set sizes for fractions `(m, s)`.
    pub fn selection(&self, m: f64, s: f64) -> Selection {
        Selection {
            pages: units_for(m, self.kinds[0].total),
            chunks: units_for(s, self.kinds[1].total),
        }
    }

    /// The boundary of the top `selected` units of `kind`.
    pub fn boundary(&self, kind: Kind, selected: u64) -> RankBoundary {
        let km = self.kind(kind);
        let selected = selected.min(km.total);
        let (b, take) = km.boundary_of(selected);
        let (boundary, take, boundary_count) = if selected == 0 || b >= km.classes.len() {
            (None, 0, 0)
        } else if take == 0 {
            // Classes ..b are fully in: describe the cut as "take 0 of class b".
            (Some(km.classes[b].key), 0, km.classes[b].count)
        } else {
            (Some(km.classes[b].key), take, km.classes[b].count)
        };
        RankBoundary {
            selected,
            total: km.total,
            boundary,
            take,
            boundary_count,
        }
    }

    fn units(&self, kind: Kind, part: Part) -> u64 {
        let km = self.kind(kind);
        match part {
            Part::Grid(i) => units_for(grid_fraction(i), km.total),
            Part::Units(k) => k.min(km.total),
        }
    }

    /// Fills `scratch.groups` with the active write groups of a plan and
    /// returns the round-0 bytes.
    fn load_groups(&self, scratch: &mut Scratch, mem: Option<Part>, sto: Part) -> f64 {
        let n = self.group_lambda.len();
        scratch.x.clear();
        scratch.x.resize(n, 0.0);
        let mut round0 = 0.0;
        let parts = [(Kind::Page, mem), (Kind::Chunk, Some(sto))];
        for (kind, part) in parts {
            let Some(part) = part else { continue };
            let km = self.kind(kind);
            match part {
                Part::Grid(i) if !km.grid.is_empty() => {
                    let (x, r0) = &km.grid[i];
                    for (a, b) in scratch.x.iter_mut().zip(x) {
                        *a += b;
                    }
                    round0 += r0;
                }
                _ => round0 += km.accumulate(self.units(kind, part), &mut scratch.x),
            }
        }
        scratch.groups.clear();
        for (g, &bytes) in scratch.x.iter().enumerate() {
            if bytes > 0.0 {
                scratch.groups.push(Group {
                    lambda: self.group_lambda[g],
                    bytes,
                    raw: self.group_raw[g],
                    id: g as u32,
                });
            }
        }
        round0
    }

    fn precopy_link(&self, max_rounds: u32) -> PrecopyLink {
        PrecopyLink {
            bandwidth: self.link.bandwidth,
            freeze_fixed: self.freeze_fixed,
            target: self.params.downtime_target,
            max_rounds: max_rounds.max(1),
            min_shrink: self.params.min_shrink,
            converged_bytes: self.converged_bytes,
        }
    }

    /// The core evaluation. `mem = None` is the seed's "memory instantly
    /// copied": memory costs nothing in any phase. `post`: whether the
    /// post-copy phase is evaluated: [`Post::Window`] only up to `dT` (what
    /// `DeltaT` needs), [`Post::Whole`] to its end (`P`), [`Post::IfFeasible`]
    /// like `Window` but not at all when `D > L` (the objective is then
    /// `-D`, and `DeltaT`, `Gamma` are reported as NaN).
    #[allow(clippy::too_many_arguments)]
    fn run(
        &self,
        scratch: &mut Scratch,
        mem: Option<Part>,
        sto: Part,
        strategy: PlanStrategy,
        post: Post,
        rounds: Option<&mut Vec<Round>>,
    ) -> (Evaluation, Option<Full>) {
        let round0 = self.load_groups(scratch, mem, sto);
        let link = self.precopy_link(strategy.max_rounds);
        let pre = precopy::run(&scratch.groups, round0, &link, &mut scratch.dirty, rounds);
        let cursor = |kind: Kind, part: Option<Part>| {
            part.map(|p| self.kind(kind).boundary_of(self.units(kind, p)))
        };
        let frozen = self.freeze(
            scratch,
            [cursor(Kind::Page, mem), cursor(Kind::Chunk, Some(sto))],
            strategy.freeze,
            pre.remainder,
        );
        let downtime = frozen / self.link.bandwidth + self.freeze_fixed;
        let limit = self.params.downtime_limit();
        let feasible = downtime <= limit * (1.0 + 1e-12);
        let whole = post == Post::Whole;
        let overflow_bytes = scratch.ov.bytes;

        let post = if post == Post::IfFeasible && !feasible {
            PostOutcome {
                window_stall: f64::NAN,
                penalty: f64::NAN,
                ..PostOutcome::default()
            }
        } else {
            self.postcopy(
                scratch,
                [cursor(Kind::Page, mem), cursor(Kind::Chunk, Some(sto))],
                pre.duration,
                whole,
            )
        };
        let dt = self.params.delta_t;
        let delta_t = dt + post.window_stall;
        let gamma = dt / (downtime + delta_t);
        let penalty = if whole { post.penalty } else { f64::NAN };
        let objective = if !feasible {
            -downtime
        } else {
            match self.params.policy {
                Policy::Gamma => gamma,
                Policy::Weighted { w1, w2 } => weighted(w1, w2, downtime, penalty),
            }
        };
        let eval = Evaluation {
            downtime,
            delta_t,
            gamma,
            penalty,
            objective,
            feasible,
            stop: pre.stop,
            overflow_bytes,
        };
        let full = whole.then_some(Full {
            precopy: pre,
            frozen,
            overflow_units: scratch.ov.units,
            downtime,
            post,
        });
        (eval, full)
    }

    /// The freeze (see [`precopy`] and [`overflow`]): the link bytes it
    /// sends of the dirty remainder `rem` under `policy`. With the overflow
    /// policy and a remainder that misses the downtime limit, the coldest
    /// dirty units of the pre-copy sets (per kind, cursor `(b, take)`:
    /// classes `..b` and `take` units of class `b`; `None`: no set) go to
    /// `scratch.ov`, the post-copy's first push; otherwise `scratch.ov` is
    /// left empty.
    fn freeze(
        &self,
        scratch: &mut Scratch,
        cuts: [Option<(usize, u64)>; 2],
        policy: FreezePolicy,
        rem: f64,
    ) -> f64 {
        scratch.ov.clear();
        let b = self.link.bandwidth;
        let limit = self.params.downtime_limit();
        if policy == FreezePolicy::Classic || rem / b + self.freeze_fixed <= limit * (1.0 + 1e-12) {
            return rem;
        }
        let budget = nonneg((limit - self.freeze_fixed) * b);
        let ov = &mut scratch.ov;
        ov.phi.clear();
        ov.phi.resize(self.group_lambda.len(), 0.0);
        for (g, &d) in scratch.groups.iter().zip(&scratch.dirty) {
            ov.phi[g.id as usize] = d / g.bytes;
        }
        // The dirty units hottest first while they fit; the coldest leave.
        let target = rem - budget;
        if target.is_nan() || target <= 0.0 {
            return rem;
        }
        let moved = self.overflow_region(ov, cuts, target);
        sent_in_freeze(rem, moved, budget)
    }

    /// The post-copy set of one kind for a cursor `(class, units of it
    /// pre-copied)`; `None` leaves the kind out.
    fn rest_kind(&self, k: usize, cursor: Option<(usize, u64)>) -> RestKind {
        let km = &self.kinds[k];
        let c = km.classes.len();
        match cursor {
            None => RestKind {
                included: false,
                b: c,
                take: 0,
                pre_bytes: km.cum_bytes[c],
            },
            Some((b, take)) if b < c => RestKind {
                included: true,
                b,
                take,
                pre_bytes: km.cum_bytes[b]
                    + if km.classes[b].key.zero {
                        0.0
                    } else {
                        take as f64 * km.classes[b].wire
                    },
            },
            Some(_) => RestKind {
                included: true,
                b: c,
                take: 0,
                pre_bytes: km.cum_bytes[c],
            },
        }
    }

    /// Push bytes of the post-copy classes at merged positions `< p`.
    #[inline]
    fn bytes_before(
        &self,
        rest: &[RestKind; 2],
        zeros: &[ZeroRest],
        zero_total: f64,
        p: usize,
    ) -> f64 {
        let bf = self.before[p];
        let mut x = 0.0;
        for (k, r) in rest.iter().enumerate() {
            let i = bf[k] as usize;
            if r.included && i > r.b {
                x += self.kinds[k].cum_bytes[i] - r.pre_bytes;
            }
        }
        let z = zeros.partition_point(|z| (z.pos as usize) < p);
        x + zeros.get(z).map_or(zero_total, |z| z.before)
    }

    /// The merged position of the class at the push front once `x < total`
    /// bytes are pushed (the last position `p >= from` with
    /// `bytes_before(p) <= x`), and `bytes_before(p)`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn locate(
        &self,
        rest: &[RestKind; 2],
        zeros: &[ZeroRest],
        zero_total: f64,
        from: usize,
        from_bytes: f64,
        x: f64,
    ) -> (usize, f64) {
        let c = self.merged.len();
        let f = |p: usize| self.bytes_before(rest, zeros, zero_total, p);
        let (mut lo, mut lo_bytes) = (from, from_bytes);
        let mut step = 1;
        let mut hi;
        loop {
            hi = (lo + step).min(c);
            let fh = f(hi);
            if fh > x {
                break;
            }
            (lo, lo_bytes) = (hi, fh);
            step *= 2;
        }
        while hi - lo > 1 {
            let mid = lo + (hi - lo) / 2;
            let fm = f(mid);
            if fm <= x {
                (lo, lo_bytes) = (mid, fm);
            } else {
                hi = mid;
            }
        }
        (lo, lo_bytes)
    }

    /// The expected `(stall, faults)` over step `k` of the post-copy units
    /// not yet arrived when the push front is in the class at merged
    /// position `p` (which starts at `start` pushed bytes), as `base -
    /// arrived x per_unit`: [`Front::absent`] gives it for any `x` within
    /// the class.
    #[allow(clippy::too_many_arguments)]
    fn front(
        &self,
        rest: &[RestKind; 2],
        zeros: &[ZeroRest],
        t_pre: f64,
        p: usize,
        start: f64,
        k: usize,
    ) -> Front {
        let steps = self.grid_t.len() - 1;
        let (ka, i) = self.merged[p];
        let (ka, i) = (ka as usize, i as usize);
        let km = &self.kinds[ka];
        let c = &km.classes[i];
        let r = rest[ka];
        let m = c.count - if i == r.b { r.take } else { 0 };
        let cost = if c.key.zero {
            zero_weight(c.lam_w, t_pre) * c.wire
        } else {
            c.wire
        };
        let mut out = Front {
            start,
            cost,
            units: m,
            ..Front::default()
        };
        for (k2, r2) in rest.iter().enumerate() {
            let km2 = &self.kinds[k2];
            if !r2.included {
                continue;
            }
            let first = if k2 == ka {
                i
            } else {
                self.before[p][k2] as usize
            };
            let begin = first.max(r2.b);
            if begin >= km2.classes.len() {
                continue;
            }
            let mut mass = km2.table.suffix(k, begin);
            if begin == r2.b && r2.take > 0 && !km2.classes[begin].key.zero {
                mass -= r2.take as f64 * km2.table.unit_mass(k, begin);
            }
            out.faults += mass;
            out.stall += mass * km2.stall;
        }
        if !c.key.zero {
            let unit = km.table.unit_mass(k, i);
            out.unit_faults = unit;
            out.unit_stall = unit * km.stall;
        }
        let z0 = zeros.partition_point(|z| (z.pos as usize) < p);
        for z in &zeros[z0..] {
            let km2 = &self.kinds[z.kind as usize];
            let unit = z.q * km2.zmass[z.zw as usize * steps + k];
            let mass = z.units * unit;
            out.faults += mass;
            out.stall += mass * km2.stall;
            if z.pos as usize == p {
                out.unit_faults = unit;
                out.unit_stall = unit * km2.stall;
            }
        }
        out
    }

    /// The post-copy phase (see [`postcopy`]): pushes the classes outside
    /// the pre-copy set in merged rank order and integrates the expected
    /// stalls in wall-clock time over the work-time grid. Cursors are
    /// `(class index, units of that class pre-copied)` per kind; `None`
    /// leaves the kind out. Without `full`, only the `dT` window is
    /// integrated (what `DeltaT` needs); with it, the whole post-copy.
    fn postcopy(
        &self,
        scratch: &mut Scratch,
        cursors: [Option<(usize, u64)>; 2],
        t_pre: f64,
        full: bool,
    ) -> PostOutcome {
        let b = self.link.bandwidth;
        let rest = [self.rest_kind(0, cursors[0]), self.rest_kind(1, cursors[1])];
        // Zero-written classes in the post-copy set, in push order.
        let zeros = &mut scratch.zeros;
        zeros.clear();
        for (k, r) in rest.iter().enumerate() {
            if !r.included {
                continue;
            }
            let km = &self.kinds[k];
            let from = km.zero_written.partition_point(|&z| z < r.b);
            for (zw, &ci) in km.zero_written.iter().enumerate().skip(from) {
                let c = &km.classes[ci];
                let units = (c.count - if ci == r.b { r.take } else { 0 }) as f64;
                let q = zero_weight(c.lam_w, t_pre);
                if units > 0.0 && q > 0.0 {
                    zeros.push(ZeroRest {
                        pos: c.pos,
                        kind: k as u8,
                        zw: zw as u32,
                        units,
                        q,
                        wire: c.wire,
                        before: 0.0,
                    });
                }
            }
        }
        zeros.sort_unstable_by_key(|z| z.pos);
        let mut zero_total = 0.0;
        for z in zeros.iter_mut() {
            z.before = zero_total;
            zero_total += z.q * z.units * z.wire;
        }
        let Scratch { zeros, ov, .. } = scratch;
        let zeros = &zeros[..];
        let mut total = zero_total;
        for (k, r) in rest.iter().enumerate() {
            if r.included {
                total += nonneg(self.kinds[k].cum_bytes[self.kinds[k].classes.len()] - r.pre_bytes);
            }
        }
        // The freeze's overflow is pushed first: the rest of the push starts
        // `lead` bytes later.
        let lead = if ov.active { ov.bytes } else { 0.0 };
        let all = lead + total;
        let mut out = PostOutcome {
            duration: all / b,
            bytes: all,
            ..PostOutcome::default()
        };
        let steps = if full {
            self.grid_t.len() - 1
        } else {
            self.window
        };
        let (mut s, mut f) = (0.0, 0.0);
        let (mut front, mut front_bytes, mut front_end) = (0usize, 0.0, 0.0);
        let mut window = None;
        for k in 0..steps {
            let (t0, t1) = (self.grid_t[k], self.grid_t[k + 1]);
            let x = (t0 + s) * b;
            if x >= all {
                break;
            }
            // The rest of the post-copy set (all absent while the overflow
            // is pushed).
            let xr = nonneg(x - lead);
            let here = (xr < total).then(|| {
                if xr >= front_end {
                    (front, front_bytes) =
                        self.locate(&rest, zeros, zero_total, front, front_bytes, xr);
                }
                let here = self.front(&rest, zeros, t_pre, front, front_bytes, k);
                front_end = here.start + here.cost * here.units as f64;
                here
            });
            let (mut a, mut af) = here.map_or((0.0, 0.0), |h| h.absent(xr));
            if x < lead {
                let (oa, of) = self.overflow_absent(ov, x, k, false);
                a += oa;
                af += of;
            }
            if af > 0.0 {
                let x2 = (t1 + s + a) * b;
                let (c, cf) = if x2 >= all {
                    (0.0, 0.0)
                } else {
                    let xr2 = nonneg(x2 - lead);
                    let (mut c, mut cf) = match here {
                        _ if xr2 >= total => (0.0, 0.0),
                        Some(h) if xr2 < front_end => h.absent(xr2),
                        _ => {
                            let (probe, probe_bytes) =
                                self.locate(&rest, zeros, zero_total, front, front_bytes, xr2);
                            self.front(&rest, zeros, t_pre, probe, probe_bytes, k)
                                .absent(xr2)
                        }
                    };
                    if x2 < lead {
                        let (oc, of) = self.overflow_absent(ov, x2, k, true);
                        c += oc;
                        cf += of;
                    }
                    (c, cf)
                };
                s += 0.5 * (a + c);
                f += 0.5 * (af + cf);
            }
            if k + 1 == self.window {
                window = Some(s);
            }
        }
        out.window_stall = window.unwrap_or(s);
        out.penalty = s;
        out.faults = f;
        out
    }

    /// What the search evaluates: `P` under the weighted policy, else only
    /// the `dT` window, and nothing for plans missing the downtime limit.
    fn search_post(&self) -> Post {
        match self.params.policy {
            Policy::Weighted { .. } => Post::Whole,
            Policy::Gamma => Post::IfFeasible,
        }
    }

    /// Evaluates the grid point `(i / 100, j / 100)` (fast path). For a
    /// plan with `D > L` only `D` is computed (`objective = -D`; `DeltaT`
    /// and `Gamma` are NaN); see [`Model::evaluate_grid_point`].
    pub fn evaluate_grid(&self, scratch: &mut Scratch, i: usize, j: usize) -> Evaluation {
        self.run(
            scratch,
            Some(Part::Grid(i)),
            Part::Grid(j),
            self.params.strategy(),
            self.search_post(),
            None,
        )
        .0
    }

    /// [`Model::evaluate_grid`] with `DeltaT` and `Gamma` computed even
    /// when `D > L` (for reports).
    pub fn evaluate_grid_point(&self, scratch: &mut Scratch, i: usize, j: usize) -> Evaluation {
        let post = self.search_post().or_window();
        self.run(
            scratch,
            Some(Part::Grid(i)),
            Part::Grid(j),
            self.params.strategy(),
            post,
            None,
        )
        .0
    }

    /// Evaluates storage grid point `j / 100` with memory instantly copied
    /// (the seed's first search step); `DeltaT` and `Gamma` always computed.
    pub fn evaluate_storage_only(&self, scratch: &mut Scratch, j: usize) -> Evaluation {
        let post = self.search_post().or_window();
        self.run(
            scratch,
            None,
            Part::Grid(j),
            self.params.strategy(),
            post,
            None,
        )
        .0
    }

    /// Evaluates arbitrary fractions (fast path; `DeltaT` and `Gamma`
    /// always computed).
    pub fn evaluate(&self, scratch: &mut Scratch, m: f64, s: f64) -> Evaluation {
        self.evaluate_with(scratch, m, s, self.params.strategy())
    }

    /// [`Model::evaluate`] under `strategy` instead of the parameters'.
    pub fn evaluate_with(
        &self,
        scratch: &mut Scratch,
        m: f64,
        s: f64,
        strategy: PlanStrategy,
    ) -> Evaluation {
        let sel = self.selection(m, s);
        let post = self.search_post().or_window();
        self.run(
            scratch,
            Some(Part::Units(sel.pages)),
            Part::Units(sel.chunks),
            strategy,
            post,
            None,
        )
        .0
    }

    /// The full prediction for fractions `(m, s)`.
    pub fn predict(&self, m: f64, s: f64) -> Prediction {
        self.predict_with(m, s, self.params.strategy())
    }

    /// [`Model::predict`] under `strategy` instead of the parameters'.
    pub fn predict_with(&self, m: f64, s: f64, strategy: PlanStrategy) -> Prediction {
        let sel = self.selection(m, s);
        let mut p = self.predict_selection_with(sel, false, strategy);
        p.m = m;
        p.s = s;
        p
    }

    /// The full prediction with memory instantly copied (storage only).
    pub fn predict_storage_only(&self, s: f64) -> Prediction {
        let sel = self.selection(0.0, s);
        let mut p = self.predict_selection(sel, true);
        p.s = s;
        p
    }

    /// The full prediction for a selection in units.
    pub fn predict_selection(&self, sel: Selection, memory_magic: bool) -> Prediction {
        self.predict_selection_with(sel, memory_magic, self.params.strategy())
    }

    /// [`Model::predict_selection`] under `strategy`.
    pub fn predict_selection_with(
        &self,
        sel: Selection,
        memory_magic: bool,
        strategy: PlanStrategy,
    ) -> Prediction {
        let mut scratch = Scratch::default();
        let mut rounds = Vec::new();
        let mem = (!memory_magic).then_some(Part::Units(sel.pages));
        let (eval, full) = self.run(
            &mut scratch,
            mem,
            Part::Units(sel.chunks),
            strategy,
            Post::Whole,
            Some(&mut rounds),
        );
        let f = full.expect("full run");
        let (w1, w2) = match self.params.policy {
            Policy::Weighted { w1, w2 } => (w1, w2),
            Policy::Gamma => (1.0, 1.0),
        };
        let pages = if memory_magic {
            0
        } else {
            sel.pages.min(self.kinds[0].total)
        };
        Prediction {
            m: pages as f64 / self.kinds[0].total.max(1) as f64,
            s: sel.chunks.min(self.kinds[1].total) as f64 / self.kinds[1].total.max(1) as f64,
            pages_precopied: pages,
            chunks_precopied: sel.chunks.min(self.kinds[1].total),
            rounds,
            stop: f.precopy.stop,
            precopy_s: f.precopy.duration,
            remainder_bytes: f.frozen,
            overflow_bytes: eval.overflow_bytes,
            overflow_pages: f.overflow_units[0],
            overflow_chunks: f.overflow_units[1],
            strategy,
            downtime_s: f.downtime,
            postcopy_bytes: f.post.bytes,
            uptime_s: f.post.duration,
            total_s: f.precopy.duration + f.downtime + f.post.duration,
            penalty_s: f.post.penalty,
            expected_faults: f.post.faults,
            window_stall_s: f.post.window_stall,
            delta_t_s: eval.delta_t,
            gamma: eval.gamma,
            gamma_weighted: weighted(w1, w2, f.downtime, f.post.penalty),
            objective: eval.objective,
            downtime_limit_s: self.params.downtime_limit(),
            meets_downtime_limit: eval.feasible,
        }
    }

    /// The model side of the engine's dirty telemetry for plan `sel`: what
    /// one round dirties as a function of its duration (any round: the
    /// engine resends whatever was written during the round, see
    /// [`precopy`]).
    pub fn round_dirty(&self, sel: Selection) -> RoundDirty {
        let mut scratch = Scratch::default();
        self.load_groups(
            &mut scratch,
            Some(Part::Units(sel.pages)),
            Part::Units(sel.chunks),
        );
        RoundDirty {
            groups: scratch.groups,
        }
    }
}

/// What the freeze sends of a dirty remainder `rem` whose coldest `moved`
/// link bytes leave it, within `budget`: a residue below the remainder's
/// rounding (every dirty unit left) is nothing.
pub(crate) fn sent_in_freeze(rem: f64, moved: f64, budget: f64) -> f64 {
    let left = rem - moved;
    if left <= rem * 1e-12 {
        0.0
    } else {
        left.min(budget)
    }
}

/// `1 / (w1 D + w2 P)`, at most `1e12` (both terms zero); NaN stays NaN.
fn weighted(w1: f64, w2: f64, d: f64, p: f64) -> f64 {
    let den = w1 * d + w2 * p;
    if den < 1e-12 { 1e12 } else { 1.0 / den }
}

#[derive(Debug, Default, Clone, Copy)]
struct PostOutcome {
    duration: f64,
    bytes: f64,
    faults: f64,
    penalty: f64,
    window_stall: f64,
}

#[derive(Debug, Clone, Copy)]
struct Full {
    precopy: precopy::PrecopyOutcome,
    /// Link bytes sent during the freeze.
    frozen: f64,
    /// Expected pages and chunks the freeze moved to post-copy.
    overflow_units: [f64; 2],
    downtime: f64,
    post: PostOutcome,
}

#[cfg(test)]
mod tests;
