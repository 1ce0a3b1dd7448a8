//! The three-phase migration model (`model.md`), evaluated on classes.
//!
//! [`Model::new`] ranks the classes of each kind, precomputes what every
//! evaluation shares (rates, per-class fault rates, suffix sums of the
//! `DeltaT` contributions of units that arrive after `dT`, per-write-rate
//! byte vectors for the 101 grid fractions), and then:
//!
//! - [`Model::predict`] gives the full [`Prediction`] for a plan `(M, S)`;
//! - [`Model::evaluate`] gives what the search needs (`D`, `DeltaT`, `Gamma`,
//!   the objective) in O(distinct write rates x rounds + classes arriving
//!   within `dT` + zero classes), independent of guest size and mostly of
//!   the class count.
//!
//! See the crate docs for the model's equations and decisions;
//! [`precopy`] and [`postcopy`] hold the per-phase formulas.

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
use precopy::{Group, PrecopyLink};
pub use precopy::{Round, RoundDirty, StopReason};
use rates::{RateTable, p_any};

/// Grid resolution: fractions `i / GRID_STEPS`, `i = 0..=GRID_STEPS`.
pub const GRID_STEPS: usize = 100;

/// The migration link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bandwidth `B` in bytes per second.
    pub bandwidth: f64,
    /// Round-trip time in seconds.
    pub rtt: f64,
}

impl Link {
    /// A link from a rate (bits/s) and an RTT.
    pub fn new(rate: Rate, rtt: Duration) -> Link {
        Link {
            bandwidth: rate.bytes_per_second(),
            rtt: rtt.as_secs_f64(),
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
    /// it, and plans whose `D` exceeds it are infeasible.
    pub downtime_target: Option<f64>,
    /// Pre-copy round limit (default 30).
    pub max_rounds: u32,
    /// A round must shrink the dirty set by at least this fraction to be
    /// followed by another (default 0.05).
    pub min_shrink: f64,
    /// Pre-copy has converged once sending the remainder would add at most
    /// this fraction to the fixed freeze time (default 0.01).
    pub converged: f64,
    /// Fixed cost of resuming at the destination, added to `D` (default 0).
    pub resume_overhead: f64,
    /// Multiplier on every write rate (1 = the profile; re-planning sets it
    /// from the measured dirty rate).
    pub write_scale: f64,
    /// Overrides the profile's device-state estimate (bytes).
    pub state_bytes: Option<u64>,
    /// Search objective.
    pub policy: Policy,
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
        }
    }
}

/// Invalid model inputs.
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
    #[error("class profile: {0}")]
    Profile(#[from] ClassProfileError),
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
    /// Dirty bytes sent during the freeze.
    pub remainder_bytes: f64,
    /// `D`: downtime (s).
    pub downtime_s: f64,
    /// Bytes pushed after resume.
    pub postcopy_bytes: f64,
    /// `U`: remote uptime = post-copy duration (s).
    pub uptime_s: f64,
    /// `T` = pre-copy + `D` + `U` (s).
    pub total_s: f64,
    /// `P`: expected stall time from post-copy faults (s).
    pub penalty_s: f64,
    /// Expected number of post-copy faults.
    pub expected_faults: f64,
    /// Expected stall time met during the first `dT` seconds of work (s).
    pub window_stall_s: f64,
    /// `DeltaT` = `dT` + window stalls (s).
    pub delta_t_s: f64,
    /// `Gamma = dT / (D + DeltaT)`.
    pub gamma: f64,
    /// `1 / (w1 D + w2 P)` with the configured weights (1, 1 by default).
    pub gamma_weighted: f64,
    /// The search objective at this point (see [`Model::evaluate`]).
    pub objective: f64,
    /// Whether `D` meets the downtime target (true without a target).
    pub meets_downtime_target: bool,
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
    /// The search objective: the policy's figure when `D` meets the
    /// downtime target (or there is none), else `-D` (below every feasible
    /// value, and larger the closer the plan is to feasible).
    pub objective: f64,
    /// Whether `D` meets the downtime target.
    pub feasible: bool,
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
    pub lam_a: f64,
    /// Position in the merged (pages and chunks) rank order.
    pub pos: u32,
    /// `1 - e^{-lambda_a dT}`.
    pub p_dt: f64,
    /// `x = lambda_a unit / B` and `e^x - 1` (post-copy geometric series).
    pub hx: f64,
    pub em1: f64,
    /// `G(x, count)`.
    pub g_full: f64,
}

const NO_GROUP: u32 = u32::MAX;

#[derive(Debug, Clone)]
pub(crate) struct KindModel {
    pub unit: f64,
    pub total: u64,
    /// `RTT + unit / B`.
    pub stall: f64,
    /// Classes in rank order.
    pub classes: Vec<RClass>,
    /// `cum[i]` = units in `classes[..i]`.
    pub cum: Vec<u64>,
    /// Suffix sums over populated classes of `count (1 - e^{-L dT}) stall`.
    pub tail_window: Vec<f64>,
    /// Zero classes with `w > 0` (their push cost depends on `T_pre`).
    pub zero_written: Vec<usize>,
    /// Per grid fraction: bytes per write group, and round-0 bytes.
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

    /// Adds the per-group bytes and round-0 bytes of the top `k` units.
    fn accumulate(&self, k: u64, x: &mut [f64]) -> f64 {
        let (b, take) = self.boundary_of(k);
        let mut round0 = 0.0;
        let mut add = |c: &RClass, n: u64| {
            let bytes = n as f64 * self.unit;
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

/// Reusable per-thread scratch space for evaluations.
#[derive(Debug, Default, Clone)]
pub struct Scratch {
    x: Vec<f64>,
    groups: Vec<Group>,
    sent: Vec<f64>,
}

/// How one side of a plan is given.
#[derive(Debug, Clone, Copy)]
enum Part {
    Grid(usize),
    Units(u64),
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
    /// `lambda_w` per write group.
    group_lambda: Vec<f64>,
    kinds: [KindModel; 2],
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
    /// Builds the model. O(classes log classes + 101 x classes).
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
        check(
            "rtt",
            link.rtt,
            link.rtt.is_finite() && link.rtt >= 0.0,
            "must be >= 0",
        )?;
        let p = &params;
        check(
            "delta_t",
            p.delta_t,
            p.delta_t.is_finite() && p.delta_t > 0.0,
            "must be positive",
        )?;
        check("horizon", p.horizon, p.horizon > 0.0, "must be positive")?;
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
        let state = p.state_bytes.unwrap_or(profile.state_bytes) as f64;

        // Write groups: distinct w > 0 over both kinds.
        let mut ws: Vec<u32> = profile
            .pages
            .iter()
            .chain(&profile.chunks)
            .map(|c| c.key.w)
            .filter(|&w| w > 0)
            .collect();
        ws.sort_unstable();
        ws.dedup();
        let group_lambda: Vec<f64> = ws.iter().map(|&w| lam(w) * scale).collect();
        let groups = ws.len();

        let build = |kind: Kind| -> KindModel {
            let unit = profile.unit_size(kind) as f64;
            let stall = link.rtt + unit / b;
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
                            ws.binary_search(&k.w).expect("collected above") as u32
                        },
                        lam_w,
                        lam_a: lam(k.r) + lam_w * write_fetch,
                        pos: 0,
                        p_dt: 0.0,
                        hx: 0.0,
                        em1: 0.0,
                        g_full: 0.0,
                    }
                })
                .collect();
            for c in &mut classes {
                c.p_dt = p_any(c.lam_a * p.delta_t);
                c.hx = c.lam_a * unit / b;
                c.em1 = c.hx.exp_m1();
                c.g_full = postcopy::geo_with(c.hx, c.em1, c.count as f64);
            }
            classes.sort_by(|a, b| rates.rank_cmp(&a.key, &b.key));
            let mut cum = Vec::with_capacity(classes.len() + 1);
            cum.push(0u64);
            for c in &classes {
                cum.push(cum.last().unwrap() + c.count);
            }
            let mut tail_window = vec![0.0; classes.len() + 1];
            for i in (0..classes.len()).rev() {
                let c = &classes[i];
                let own = if c.key.zero {
                    0.0
                } else {
                    c.count as f64 * p_any(c.lam_a * p.delta_t) * stall
                };
                tail_window[i] = tail_window[i + 1] + own;
            }
            let zero_written = (0..classes.len())
                .filter(|&i| classes[i].key.zero && classes[i].key.w > 0)
                .collect();
            let mut km = KindModel {
                unit,
                total: profile.count(kind),
                stall,
                classes,
                cum,
                tail_window,
                zero_written,
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
                        let bytes = c.count as f64 * unit;
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
                        let bytes = take as f64 * unit;
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
        let mut kinds = [build(Kind::Page), build(Kind::Chunk)];
        // Positions in the merged order: rank, then pages before chunks.
        let (mut i, mut j, mut pos) = (0, 0, 0u32);
        let [pages, chunks] = &mut kinds;
        while i < pages.classes.len() || j < chunks.classes.len() {
            let page_next = j >= chunks.classes.len()
                || (i < pages.classes.len()
                    && rates.rank_cmp(&pages.classes[i].key, &chunks.classes[j].key)
                        != Ordering::Greater);
            if page_next {
                pages.classes[i].pos = pos;
                i += 1;
            } else {
                chunks.classes[j].pos = pos;
                j += 1;
            }
            pos += 1;
        }
        Ok(Model {
            link,
            params,
            rates,
            state,
            freeze_fixed: state / b + link.rtt + p.resume_overhead,
            group_lambda,
            kinds,
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
                });
            }
        }
        round0
    }

    fn precopy_link(&self) -> PrecopyLink {
        PrecopyLink {
            bandwidth: self.link.bandwidth,
            freeze_fixed: self.freeze_fixed,
            target: self.params.downtime_target,
            max_rounds: self.params.max_rounds,
            min_shrink: self.params.min_shrink,
            converged: self.params.converged,
        }
    }

    /// The core evaluation. `mem = None` is the seed's "memory instantly
    /// copied": memory costs nothing in any phase.
    fn run(
        &self,
        scratch: &mut Scratch,
        mem: Option<Part>,
        sto: Part,
        full: bool,
        rounds: Option<&mut Vec<Round>>,
    ) -> (Evaluation, Option<Full>) {
        let round0 = self.load_groups(scratch, mem, sto);
        let link = self.precopy_link();
        let pre = precopy::run(&scratch.groups, round0, &link, &mut scratch.sent, rounds);
        let downtime = pre.remainder / self.link.bandwidth + self.freeze_fixed;

        let cursor = |kind: Kind, part: Option<Part>| {
            part.map(|p| {
                let km = self.kind(kind);
                let (b, take) = km.boundary_of(self.units(kind, p));
                (b, take)
            })
        };
        let post = self.postcopy(
            cursor(Kind::Page, mem),
            cursor(Kind::Chunk, Some(sto)),
            pre.duration,
            full,
        );
        let dt = self.params.delta_t;
        let delta_t = dt + post.window_stall;
        let gamma = dt / (downtime + delta_t);
        let feasible = self
            .params
            .downtime_target
            .is_none_or(|t| downtime <= t * (1.0 + 1e-12));
        let penalty = if full { post.penalty } else { f64::NAN };
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
        };
        let full = full.then_some(Full {
            precopy: pre,
            downtime,
            post,
        });
        (eval, full)
    }

    /// The merged post-copy walk (see [`postcopy`]). Cursors are
    /// `(class index, units of that class already pre-copied)` per kind;
    /// `None` leaves the kind out. Without `full`, the walk stops once the
    /// push passes `dT` and adds the rest from suffix sums.
    fn postcopy(
        &self,
        mem: Option<(usize, u64)>,
        sto: Option<(usize, u64)>,
        t_pre: f64,
        full: bool,
    ) -> PostOutcome {
        let b = self.link.bandwidth;
        let dt = self.params.delta_t;
        let mut out = PostOutcome::default();
        let mut a = 0.0; // push time used so far (s)
        let mut cur = [mem, sto];
        let weight = |c: &RClass| {
            if c.key.zero {
                p_any(c.lam_w * t_pre)
            } else {
                1.0
            }
        };
        loop {
            // Pick the next class in the merged rank order.
            let live = |k: usize| cur[k].filter(|&(i, _)| i < self.kinds[k].classes.len());
            let next = match (live(0), live(1)) {
                (None, None) => break,
                (Some(_), None) => 0,
                (None, Some(_)) => 1,
                (Some((i, _)), Some((j, _))) => {
                    usize::from(self.kinds[0].classes[i].pos > self.kinds[1].classes[j].pos)
                }
            };
            let km = &self.kinds[next];
            let (i, taken) = cur[next].expect("live cursor");
            let c = &km.classes[i];
            let m = (c.count - taken) as f64;
            if !c.key.zero && taken == 0 {
                // The common case, with the class constants precomputed.
                let h = km.unit / b;
                if c.lam_a > 0.0 {
                    let end = a + m * h;
                    let ea = if a >= dt && !full {
                        0.0
                    } else {
                        (-c.lam_a * a).exp()
                    };
                    let win = if end <= dt {
                        m - ea * c.g_full
                    } else if a >= dt {
                        m * c.p_dt
                    } else {
                        let j = ((dt - a) / h).floor().min(m);
                        j - ea * postcopy::geo_with(c.hx, c.em1, j) + (m - j) * c.p_dt
                    };
                    out.window_stall += win.max(0.0) * km.stall;
                    if full {
                        let f = (m - ea * c.g_full).max(0.0);
                        out.faults += f;
                        out.penalty += f * km.stall;
                    }
                }
                if full {
                    out.bytes += m * km.unit;
                }
                a += m * h;
            } else {
                let q = weight(c);
                if q > 0.0 && m > 0.0 {
                    let h = q * km.unit / b;
                    let win = postcopy::window_faults(c.lam_a, q, m, h, a, dt);
                    out.window_stall += win * km.stall;
                    if full {
                        let f = postcopy::total_faults(c.lam_a, q, m, h, a);
                        out.faults += f;
                        out.penalty += f * km.stall;
                        out.bytes += q * m * km.unit;
                    }
                    a += m * h;
                }
            }
            cur[next] = Some((i + 1, 0));
            if !full && a >= dt {
                // Everything left arrives after dT: its window term does not
                // depend on the arrival time.
                for (km, cursor) in self.kinds.iter().zip(cur.iter().copied()) {
                    let Some((i, taken)) = cursor else { continue };
                    if i >= km.classes.len() {
                        continue;
                    }
                    // A boundary class not reached yet is partly pre-copied.
                    let own = |c: &RClass, n: u64| weight(c) * n as f64 * c.p_dt * km.stall;
                    let first = &km.classes[i];
                    out.window_stall += km.tail_window[i + 1];
                    out.window_stall += own(first, first.count - taken);
                    let from = km.zero_written.partition_point(|&z| z <= i);
                    for &z in &km.zero_written[from..] {
                        let c = &km.classes[z];
                        out.window_stall += own(c, c.count);
                    }
                }
                break;
            }
        }
        out.duration = a;
        out
    }

    /// Evaluates the grid point `(i / 100, j / 100)` (fast path).
    pub fn evaluate_grid(&self, scratch: &mut Scratch, i: usize, j: usize) -> Evaluation {
        let full = matches!(self.params.policy, Policy::Weighted { .. });
        self.run(scratch, Some(Part::Grid(i)), Part::Grid(j), full, None)
            .0
    }

    /// Evaluates storage grid point `j / 100` with memory instantly copied
    /// (the seed's first search step).
    pub fn evaluate_storage_only(&self, scratch: &mut Scratch, j: usize) -> Evaluation {
        let full = matches!(self.params.policy, Policy::Weighted { .. });
        self.run(scratch, None, Part::Grid(j), full, None).0
    }

    /// Evaluates arbitrary fractions (fast path).
    pub fn evaluate(&self, scratch: &mut Scratch, m: f64, s: f64) -> Evaluation {
        let sel = self.selection(m, s);
        let full = matches!(self.params.policy, Policy::Weighted { .. });
        self.run(
            scratch,
            Some(Part::Units(sel.pages)),
            Part::Units(sel.chunks),
            full,
            None,
        )
        .0
    }

    /// The full prediction for fractions `(m, s)`.
    pub fn predict(&self, m: f64, s: f64) -> Prediction {
        let sel = self.selection(m, s);
        let mut p = self.predict_selection(sel, false);
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
        let mut scratch = Scratch::default();
        let mut rounds = Vec::new();
        let mem = (!memory_magic).then_some(Part::Units(sel.pages));
        let (eval, full) = self.run(
            &mut scratch,
            mem,
            Part::Units(sel.chunks),
            true,
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
            remainder_bytes: f.precopy.remainder,
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
            meets_downtime_target: eval.feasible,
        }
    }

    /// The model side of the engine's dirty telemetry for round `round` of
    /// plan `sel`: what that round sent, as a function of its duration.
    pub fn round_dirty(&self, sel: Selection, round: u32) -> RoundDirty {
        let mut scratch = Scratch::default();
        let round0 = self.load_groups(
            &mut scratch,
            Some(Part::Units(sel.pages)),
            Part::Units(sel.chunks),
        );
        let sent = precopy::sent_in_round(&scratch.groups, round0, &self.precopy_link(), round);
        RoundDirty {
            groups: scratch.groups,
            sent,
        }
    }
}

/// `1 / (w1 D + w2 P)`, finite.
fn weighted(w1: f64, w2: f64, d: f64, p: f64) -> f64 {
    1.0 / (w1 * d + w2 * p).max(1e-12)
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
    downtime: f64,
    post: PostOutcome,
}

#[cfg(test)]
mod tests;
