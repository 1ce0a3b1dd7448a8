//! The `(M, S)` search: the seed's recursion (two ternary searches) and the
//! full 1 % grid, plus the "is live migration possible on this link" check.
//!
//! 1. **Storage step** (memory instantly copied, as the seed assumes): every
//!    storage fraction `S = j/100` is evaluated with memory costing nothing.
//!    These 101 evaluations decide liveness (below) and a ternary search over
//!    them picks `S*`.
//! 2. **Memory step**: `S*` fixed, a ternary search over `M = i/100` picks
//!    `M*`.
//! 3. **Grid**: all 101 x 101 points, split over threads by rows.
//! 4. **Named strategies** ([`Candidate`]): the fixed strategies the grid
//!    does not hold, each one evaluation: classic pre-copy (`M = S = 1`,
//!    the classic freeze), all of memory pre-copied with the overflow
//!    freeze, QEMU's hybrid (`M = S = 1`, one pass, then post-copy of what
//!    was dirtied: the overflow freeze), and pure post-copy (`M = S = 0`).
//!
//! **The plan family.** The grid is searched under the parameters'
//! [`PlanStrategy`] (by default the overflow freeze: what fits the downtime
//! limit goes, the coldest dirty pages are post-copied, so every `(M, S)`
//! whose device state and dirty chunks fit is feasible); the named
//! strategies add what a fixed `(M, S)` grid under one strategy cannot
//! express (a one-pass pre-copy, the classic freeze). The plan is the best
//! of the grid's optimum and the named strategies (on a tie the grid's), so
//! no fixed strategy of the family is predicted to beat it.
//!
//! Ternary searches run on the integer lattice `0..=100`, so their answer is
//! comparable with the grid's; `ternary_is_global` says whether it reaches
//! the grid optimum. The plan uses the better of the two, which is always
//! the grid's (the ternary answer is one of the grid's points; on a tie in
//! value the grid's canonical tie-break applies: smallest `M + S`, then
//! smallest `M`). **Plateaus**: when the two probes of a ternary step are
//! equal, the search walks right from the upper probe until the value
//! changes, and keeps the side that rises (a flat stretch below a later
//! peak is not mistaken for the top).
//!
//! **Downtime limit.** `L` = the downtime target, or `dT` without one
//! ([`ModelParams::downtime_limit`](crate::model::ModelParams::downtime_limit)).
//! A plan with `D > L` is infeasible (objective `-D`, below every feasible
//! plan) and is never called live.
//!
//! **Live migration possible** on the link iff some storage fraction
//! `S >= 1 %` can be pre-copied live with memory instantly copied (the
//! seed's first step): its storage-only pre-copy *converges* (stops because
//! nothing is dirty, because the remainder is below the converged threshold,
//! or because the downtime target is met: `Clean`, `Converged`,
//! `TargetMet`; not `NotShrinking` or `RoundLimit`, where the guest dirties
//! storage as fast as the link sends it) **and** its downtime `D <= L`.
//! [`Liveness::max_live_s`] reports the largest such `S`. Live migration is
//! impossible when no `S >= 1 %` qualifies: either the device state alone
//! cannot cross within `L` (`state / B + RTT + overhead > L`), or even the
//! hottest 1 % of storage is rewritten faster than the link can pre-copy it.
//! A guest with no storage (or fewer than 50 chunks, so that 1 % rounds to
//! none) pre-copies nothing at `S = 1 %`: it is live iff `D <= L` there.
//! The search still returns the best plan it can (for example a
//! post-copy-heavy one with `S = 0`), and `wanmig-planner plan` exits with
//! status 2.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{
    Evaluation, FreezePolicy, GRID_STEPS, Model, ModelError, PlanStrategy, Scratch, StopReason,
    grid_fraction,
};

/// Search options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SearchOptions {
    /// Worker threads for the grid (at least 1).
    pub threads: usize,
}

impl Default for SearchOptions {
    fn default() -> Self {
        SearchOptions {
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// One point of the `(M, S)` lattice and its figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    /// Memory fraction.
    pub m: f64,
    /// Storage fraction.
    pub s: f64,
    /// The policy objective (`Gamma`, or the weighted figure; `-D` when the
    /// downtime target is missed).
    pub objective: f64,
    /// `Gamma` at this point.
    pub gamma: f64,
    /// `D` at this point (s).
    pub downtime_s: f64,
    /// Whether `D <= L` (an infeasible point is never chosen while a
    /// feasible one exists, and its `Gamma` is not that of a plan).
    #[serde(default = "yes")]
    pub feasible: bool,
    /// The round limit and freeze policy the point was evaluated under.
    #[serde(default = "default_strategy")]
    pub strategy: PlanStrategy,
}

fn yes() -> bool {
    true
}

fn default_strategy() -> PlanStrategy {
    crate::model::ModelParams::default().strategy()
}

/// A named fixed strategy of the plan family (see the module docs),
/// evaluated besides the grid.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// Its name: `classic_precopy`, `precopy_overflow`, `qemu_hybrid`,
    /// `postcopy`.
    pub name: String,
    /// Its point and figures.
    #[serde(flatten)]
    pub point: Point,
}

impl Candidate {
    /// The named strategies under model parameters whose grid strategy is
    /// `grid` (their round limit is the parameters').
    pub fn family(grid: PlanStrategy) -> [(&'static str, f64, f64, PlanStrategy); 4] {
        let rounds = grid.max_rounds;
        [
            (
                "classic_precopy",
                1.0,
                1.0,
                PlanStrategy {
                    max_rounds: rounds,
                    freeze: FreezePolicy::Classic,
                },
            ),
            (
                "precopy_overflow",
                1.0,
                1.0,
                PlanStrategy {
                    max_rounds: rounds,
                    freeze: FreezePolicy::Overflow,
                },
            ),
            (
                "qemu_hybrid",
                1.0,
                1.0,
                PlanStrategy {
                    max_rounds: 1,
                    freeze: FreezePolicy::Overflow,
                },
            ),
            ("postcopy", 0.0, 0.0, grid),
        ]
    }
}

/// Whether live migration is possible on this link (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Liveness {
    /// Some storage fraction `S >= 1 %` (memory instantly copied) converges
    /// with `D <= L`.
    pub possible: bool,
    /// The downtime limit `L` used (s).
    pub limit_s: f64,
    /// The largest such `S` (`None` when impossible).
    pub max_live_s: Option<f64>,
    /// `state / B + RTT + resume overhead`: the smallest possible downtime.
    pub min_downtime_s: f64,
    /// The storage-only pre-copy at `S = 1 %`: how it stopped.
    pub first_stop: StopReason,
    /// Its downtime (s).
    pub first_downtime_s: f64,
    /// Why not, when impossible.
    pub reason: Option<String>,
}

/// Objective values over the grid (row-major: index `i * 101 + j` for
/// `M = i/100`, `S = j/100`). `gamma` is NaN where the plan misses the
/// downtime limit (not computed: the objective is `-D` there).
#[derive(Debug, Clone, PartialEq)]
pub struct GridValues {
    /// The objective.
    pub objective: Vec<f64>,
    /// `Gamma`.
    pub gamma: Vec<f64>,
    /// Whether the downtime target is met.
    pub feasible: Vec<bool>,
}

/// The search outcome.
#[derive(Debug, Clone)]
pub struct SearchResult {
    /// Best grid point.
    pub grid: Point,
    /// The seed recursion's answer.
    pub ternary: Point,
    /// The storage fraction found by step 1 (memory instantly copied).
    pub storage_step: Point,
    /// Whether the ternary answer reaches the grid's objective.
    pub ternary_is_global: bool,
    /// The point the plan uses: the best of the grid optimum and the named
    /// strategies (see the module docs).
    pub chosen: Point,
    /// Where the chosen point comes from: `grid`, or a candidate's name.
    pub chosen_from: String,
    /// The named strategies, evaluated.
    pub candidates: Vec<Candidate>,
    /// Liveness on this link.
    pub live: Liveness,
    /// Distinct model evaluations made by the ternary searches.
    pub ternary_evaluations: usize,
    /// Model evaluations in total (grid + storage step + memory step).
    pub evaluations: usize,
    /// Wall time of the whole search.
    pub elapsed: Duration,
    /// All grid values (for heatmaps).
    pub values: GridValues,
}

impl SearchResult {
    /// `Err` naming the first reported figure (the grid, ternary and
    /// storage-step points, the liveness figures) that is not finite: such
    /// a figure is never printed or published as if it were a number.
    pub fn check_finite(&self) -> Result<(), ModelError> {
        let points = [
            ("grid point", &self.grid),
            ("ternary point", &self.ternary),
            ("storage-step point", &self.storage_step),
            ("chosen point", &self.chosen),
        ];
        let candidates = self
            .candidates
            .iter()
            .map(|c| ("candidate point", &c.point));
        for (what, p) in points.into_iter().chain(candidates) {
            for value in [p.m, p.s, p.objective, p.gamma, p.downtime_s] {
                if !value.is_finite() {
                    return Err(ModelError::NonFinite { what, value });
                }
            }
        }
        let l = &self.live;
        for (what, value) in [
            ("downtime limit", l.limit_s),
            ("minimum downtime", l.min_downtime_s),
            ("storage-only downtime", l.first_downtime_s),
        ] {
            if !value.is_finite() {
                return Err(ModelError::NonFinite { what, value });
            }
        }
        Ok(())
    }
}

fn point(i: usize, j: usize, e: &Evaluation, strategy: PlanStrategy) -> Point {
    Point {
        m: grid_fraction(i),
        s: grid_fraction(j),
        objective: e.objective,
        gamma: e.gamma,
        downtime_s: e.downtime,
        feasible: e.feasible,
        strategy,
    }
}

/// `a` beats `b`: larger objective, then smaller `M + S`, then smaller `M`.
fn better(a: (usize, usize, f64), b: (usize, usize, f64)) -> bool {
    if a.2 != b.2 {
        return a.2 > b.2;
    }
    (a.0 + a.1, a.0) < (b.0 + b.1, b.0)
}

/// Ternary search for a maximum of `f` over `0..=GRID_STEPS`; returns the
/// index and the number of distinct evaluations. Exact for unimodal `f`
/// (non-decreasing, then non-increasing), plateaus included (see the module
/// docs).
pub fn ternary(mut f: impl FnMut(usize) -> f64) -> (usize, usize) {
    let mut memo = vec![None; GRID_STEPS + 1];
    let mut evals = 0;
    let mut g = |i: usize| -> f64 {
        *memo[i].get_or_insert_with(|| {
            evals += 1;
            f(i)
        })
    };
    let (mut lo, mut hi) = (0usize, GRID_STEPS);
    while hi - lo > 2 {
        let m1 = lo + (hi - lo) / 3;
        let m2 = hi - (hi - lo) / 3;
        let (a, b) = (g(m1), g(m2));
        if a < b {
            lo = m1 + 1;
        } else if a > b {
            hi = m2 - 1;
        } else {
            // A plateau through m1 and m2: find where it ends on the right.
            let v = b;
            let mut r = m2 + 1;
            while r <= hi && g(r) == v {
                r += 1;
            }
            if r <= hi && g(r) > v {
                // Still rising: the peak is right of the plateau.
                lo = r;
            } else {
                // Falling after m2 (or flat to `hi`): m2 is on the falling
                // side or ends the top plateau, so [lo, m2] holds a maximum.
                hi = m2;
            }
        }
    }
    let mut best = lo;
    for i in lo + 1..=hi {
        if g(i) > g(best) {
            best = i;
        }
    }
    (best, evals)
}

/// Runs the whole search.
pub fn search(model: &Model, opts: &SearchOptions) -> SearchResult {
    let start = Instant::now();
    let n = GRID_STEPS + 1;
    let mut scratch = Scratch::default();

    // Step 1: storage with memory instantly copied.
    let storage: Vec<Evaluation> = (0..n)
        .map(|j| model.evaluate_storage_only(&mut scratch, j))
        .collect();
    let live = liveness(model, &storage);
    let (s_star, e1) = ternary(|j| storage[j].objective);

    // Step 2: S fixed, ternary on M.
    let (m_star, e2) = ternary(|i| model.evaluate_grid(&mut scratch, i, s_star).objective);

    // Step 3: the grid, rows split over threads.
    let threads = opts.threads.clamp(1, n);
    let mut values = GridValues {
        objective: vec![0.0; n * n],
        gamma: vec![0.0; n * n],
        feasible: vec![false; n * n],
    };
    let rows: Vec<(usize, Vec<Evaluation>)> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                scope.spawn(move || {
                    let mut scratch = Scratch::default();
                    (t..n)
                        .step_by(threads)
                        .map(|i| {
                            let row = (0..n).map(|j| model.evaluate_grid(&mut scratch, i, j));
                            (i, row.collect())
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("grid worker panicked"))
            .collect()
    });
    let mut best = (0, 0, f64::NEG_INFINITY);
    let mut seen = false;
    for (i, row) in rows {
        for (j, e) in row.into_iter().enumerate() {
            let k = i * n + j;
            values.objective[k] = e.objective;
            values.gamma[k] = e.gamma;
            values.feasible[k] = e.feasible;
            if !seen || better((i, j, e.objective), best) {
                best = (i, j, e.objective);
                seen = true;
            }
        }
    }
    // The reported points, with DeltaT and Gamma even when infeasible.
    let strategy = model.params().strategy();
    let grid = point(
        best.0,
        best.1,
        &model.evaluate_grid_point(&mut scratch, best.0, best.1),
        strategy,
    );
    let tern = point(
        m_star,
        s_star,
        &model.evaluate_grid_point(&mut scratch, m_star, s_star),
        strategy,
    );
    let storage_step = point(0, s_star, &storage[s_star], strategy);
    let ternary_is_global = tern.objective >= grid.objective;
    // Step 4: the named strategies; the plan is the best of all.
    let candidates: Vec<Candidate> = Candidate::family(strategy)
        .into_iter()
        .map(|(name, m, s, st)| {
            let e = model.evaluate_with(&mut scratch, m, s, st);
            Candidate {
                name: name.to_string(),
                point: Point {
                    m,
                    s,
                    objective: e.objective,
                    gamma: e.gamma,
                    downtime_s: e.downtime,
                    feasible: e.feasible,
                    strategy: st,
                },
            }
        })
        .collect();
    let (mut chosen, mut chosen_from) = (grid, "grid".to_string());
    for c in &candidates {
        if c.point.objective > chosen.objective {
            chosen = c.point;
            chosen_from.clone_from(&c.name);
        }
    }
    SearchResult {
        grid,
        ternary: tern,
        storage_step,
        ternary_is_global,
        chosen,
        chosen_from,
        evaluations: n * n + n + e2 + 2 + candidates.len(),
        candidates,
        live,
        ternary_evaluations: e1 + e2,
        elapsed: start.elapsed(),
        values,
    }
}

/// The liveness verdict from the storage-only evaluations (module docs).
fn liveness(model: &Model, storage: &[Evaluation]) -> Liveness {
    let params = model.params();
    let limit = params.downtime_limit();
    let converges = |e: &Evaluation| {
        matches!(
            e.stop,
            StopReason::Clean | StopReason::Converged | StopReason::TargetMet
        ) && e.feasible
    };
    let max_live = (1..storage.len()).rev().find(|&j| converges(&storage[j]));
    let first = &storage[1];
    let min_d = model.min_downtime();
    let limit_name = if params.downtime_target.is_some() {
        "the downtime target"
    } else {
        "dT (no downtime target given)"
    };
    let reason = max_live.is_none().then(|| {
        if min_d > limit * (1.0 + 1e-12) {
            let link = model.link();
            format!(
                "live migration impossible on this link: even with memory copied instantly and \
                 no storage pre-copied, the freeze takes {min_d:.3} s (device state {:.0} bytes \
                 at {:.0} bytes/s + RTT {:.3} s + resume overhead {:.3} s), more than the \
                 downtime limit {limit:.3} s, {limit_name}",
                model.state_bytes(),
                link.bandwidth,
                link.rtt,
                params.resume_overhead,
            )
        } else if !first.feasible {
            format!(
                "live migration impossible on this link: with memory copied instantly, \
                 pre-copying even 1 % of storage ends with a downtime of {:.3} s, more than the \
                 downtime limit {limit:.3} s, {limit_name}",
                first.downtime
            )
        } else {
            format!(
                "live migration impossible on this link: with memory copied instantly, \
                 pre-copying even the hottest 1 % of storage does not converge (pre-copy stops: \
                 {:?}): the guest rewrites it faster than the link sends it",
                first.stop
            )
        }
    });
    Liveness {
        possible: max_live.is_some(),
        limit_s: limit,
        max_live_s: max_live.map(grid_fraction),
        min_downtime_s: min_d,
        first_stop: first.stop,
        first_downtime_s: first.downtime,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Link, ModelParams, StopReason};
    use crate::profile::ClassProfile;
    use crate::synth::{SynthConfig, Workload, class_profile};

    const GIB: u64 = 1 << 30;

    fn profile(w: Workload) -> ClassProfile {
        class_profile(&SynthConfig::new(GIB, 8 * GIB, w))
    }

    fn run(p: &ClassProfile, mbit: f64, rtt: f64, params: ModelParams) -> SearchResult {
        let link = Link {
            bandwidth: mbit * 1e6 / 8.0,
            rtt,
            wire: crate::model::WireCost::ONE,
        };
        let model = Model::new(p, link, params).unwrap();
        search(&model, &SearchOptions { threads: 2 })
    }

    #[test]
    fn more_bandwidth_never_lowers_the_optimal_gamma() {
        for w in Workload::ALL {
            let p = profile(w);
            let mut last = 0.0;
            for mbit in [5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 1000.0, 10000.0] {
                let r = run(&p, mbit, 0.005, ModelParams::default());
                assert!(
                    r.chosen.gamma >= last - 1e-12,
                    "{w} at {mbit} mbit: Gamma {} < {last}",
                    r.chosen.gamma
                );
                last = r.chosen.gamma;
            }
        }
    }

    /// Whether `f` over the lattice is unimodal (non-decreasing, then
    /// non-increasing).
    fn unimodal(f: &[f64]) -> bool {
        let peak = (0..f.len()).fold(0, |b, i| if f[i] > f[b] { i } else { b });
        f[..=peak].windows(2).all(|w| w[0] <= w[1]) && f[peak..].windows(2).all(|w| w[0] >= w[1])
    }

    /// The seed recursion is exact when each of its 1-D searches is over a
    /// unimodal function and the two searches are independent: guests with
    /// only memory (the objective does not depend on `S`) or only storage
    /// (memory "instantly copied" is then exactly true). On such guests,
    /// whenever the searched function is unimodal, ternary == grid.
    #[test]
    fn ternary_matches_the_grid_on_unimodal_cases() {
        let n = GRID_STEPS + 1;
        let mut checked = 0;
        for w in Workload::ALL {
            for (ram, disk) in [(GIB, 0), (0, 8 * GIB)] {
                let p = class_profile(&SynthConfig::new(ram, disk, w));
                for mbit in [5.0, 10.0, 20.0, 40.0, 100.0, 1000.0, 10000.0] {
                    let r = run(&p, mbit, 0.005, ModelParams::default());
                    let f: Vec<f64> = if disk == 0 {
                        (0..n).map(|i| r.values.objective[i * n]).collect()
                    } else {
                        r.values.objective[..n].to_vec()
                    };
                    if unimodal(&f) {
                        checked += 1;
                        assert!(
                            r.ternary_is_global,
                            "{w} {ram}/{disk} at {mbit} mbit: ternary {:?} vs grid {:?}",
                            r.ternary, r.grid
                        );
                    }
                }
            }
        }
        eprintln!("unimodal cases checked: {checked} of 56");
        assert!(checked >= 20, "only {checked} unimodal cases");
    }

    #[test]
    fn ternary_search_finds_the_peak_of_unimodal_functions() {
        for peak in 0..=GRID_STEPS {
            let (i, evals) = ternary(|x| -((x as f64) - peak as f64).abs());
            assert_eq!(i, peak);
            assert!(evals <= 2 * 12 + 3, "{evals}");
        }
        // A plateau: any point of it is a maximum.
        let (i, _) = ternary(|x| if (30..=60).contains(&x) { 1.0 } else { 0.0 });
        assert!((30..=60).contains(&i));
        // A flat stretch below a later peak (both probes of the first step
        // land on it): the peak is still found.
        for peak in [70, 85, 99, 100] {
            let f = |x: usize| {
                if x <= 68 {
                    0.0
                } else {
                    1.0 - (x as f64 - peak as f64).abs() / 100.0
                }
            };
            assert_eq!(ternary(f).0, peak, "peak {peak}");
        }
        // ... and a flat stretch after an earlier peak.
        for peak in [0, 5, 20] {
            let f = |x: usize| {
                if x >= 30 {
                    0.0
                } else {
                    1.0 - (x as f64 - peak as f64).abs() / 100.0
                }
            };
            assert_eq!(ternary(f).0, peak, "peak {peak}");
        }
    }

    #[test]
    fn live_migration_is_impossible_when_the_state_cannot_cross_in_time() {
        let mut p = profile(Workload::Idle);
        // 100 MB of device state on a 1 Mbit link: 800 s > dT = 20 s.
        p.state_bytes = 100_000_000;
        let r = run(&p, 1.0, 0.005, ModelParams::default());
        assert!(!r.live.possible);
        assert_eq!(r.live.max_live_s, None);
        assert!(r.live.min_downtime_s > r.live.limit_s);
        let reason = r.live.reason.unwrap();
        assert!(reason.contains("impossible"), "{reason}");
        assert!(reason.contains("device state"), "{reason}");
        // The same guest is fine at 1 Gbit.
        let r = run(&p, 1000.0, 0.005, ModelParams::default());
        assert!(r.live.possible && r.live.reason.is_none());
        // A downtime target below the RTT is never met.
        let params = ModelParams {
            downtime_target: Some(0.004),
            ..ModelParams::default()
        };
        let r = run(&profile(Workload::Idle), 1000.0, 0.005, params);
        assert!(!r.live.possible);
        assert_eq!(r.live.limit_s, 0.004);
    }

    /// A guest whose hottest storage is rewritten faster than the link can
    /// send it: storage alone cannot be pre-copied live (the seed's
    /// criterion), although the device state crosses in milliseconds.
    /// More bandwidth makes it converge.
    #[test]
    fn live_migration_is_impossible_when_storage_outpaces_the_link() {
        use crate::profile::{Class, UnitCounters};
        let chunk = |r, w, o, count| Class {
            key: UnitCounters {
                r,
                w,
                o,
                zero: false,
            },
            count,
        };
        // 4096 chunks (256 MiB): 64 written in every interval (logs), the
        // rest read now and then.
        let mut chunks = vec![chunk(0, 60, 60, 64), chunk(3, 0, 0, 4032)];
        chunks.sort_by_key(|c| c.key);
        let p = ClassProfile {
            samples: 60,
            interval_s: 1.0,
            page_size: 4096,
            chunk_size: 65536,
            page_count: 0,
            chunk_count: 4096,
            state_bytes: 1 << 20,
            pages: vec![],
            chunks,
        };
        let slow = run(&p, 10.0, 0.005, ModelParams::default());
        assert!(slow.live.min_downtime_s < 1.0);
        assert!(!slow.live.possible, "{:?}", slow.live);
        assert!(matches!(
            slow.live.first_stop,
            StopReason::NotShrinking | StopReason::RoundLimit
        ));
        let reason = slow.live.reason.clone().unwrap();
        assert!(reason.contains("does not converge"), "{reason}");
        // The search still returns its best (feasible) plan.
        assert!(slow.values.feasible.iter().any(|&f| f));
        let fast = run(&p, 10_000.0, 0.005, ModelParams::default());
        assert!(fast.live.possible, "{:?}", fast.live);
        assert!(fast.live.max_live_s.unwrap() >= 0.01);
    }

    /// The verdict is exactly the documented criterion, recomputed from
    /// full storage-only predictions.
    #[test]
    fn liveness_is_exactly_the_documented_criterion() {
        for (w, state, mbit, target) in [
            (Workload::Web, 1u64 << 20, 40.0, None),
            (Workload::Web, 1 << 30, 40.0, None),
            (Workload::IoHeavy, 1 << 20, 40.0, Some(0.5)),
            (Workload::IoHeavy, 1 << 20, 1000.0, Some(1.0)),
            (Workload::MemoryHeavy, 1 << 20, 100.0, Some(0.01)),
            (Workload::Idle, 0, 1.0, Some(0.005)),
        ] {
            let mut p = profile(w);
            p.state_bytes = state;
            let params = ModelParams {
                downtime_target: target,
                ..ModelParams::default()
            };
            let link = Link {
                bandwidth: mbit * 1e6 / 8.0,
                rtt: 0.005,
                wire: crate::model::WireCost::ONE,
            };
            let model = Model::new(&p, link, params).unwrap();
            let r = search(&model, &SearchOptions { threads: 1 });
            let limit = target.unwrap_or(params.delta_t);
            let live = |j: usize| {
                let pred = model.predict_storage_only(grid_fraction(j));
                matches!(
                    pred.stop,
                    StopReason::Clean | StopReason::Converged | StopReason::TargetMet
                ) && pred.downtime_s <= limit * (1.0 + 1e-12)
            };
            let max = (1..=GRID_STEPS).rev().find(|&j| live(j));
            assert_eq!(
                r.live.max_live_s,
                max.map(grid_fraction),
                "{w} {state} {mbit} {target:?}"
            );
            assert_eq!(r.live.possible, max.is_some());
            if model.min_downtime() > limit {
                assert!(!r.live.possible);
            }
        }
    }

    /// A guest without storage is live iff the freeze fits the limit.
    #[test]
    fn guests_without_storage_are_live_iff_the_freeze_fits() {
        let p = class_profile(&SynthConfig::new(GIB, 0, Workload::Web));
        for (mbit, live) in [(40.0, true), (0.1, false)] {
            let r = run(&p, mbit, 0.005, ModelParams::default());
            assert_eq!(r.live.possible, live, "{mbit}: {:?}", r.live);
            assert_eq!(r.live.first_stop, StopReason::Clean);
        }
    }

    #[test]
    fn plans_honour_the_downtime_target() {
        let p = profile(Workload::MemoryHeavy);
        // The classic freeze: a target only rules plans out.
        let classic = ModelParams {
            freeze: FreezePolicy::Classic,
            ..ModelParams::default()
        };
        let free = run(&p, 40.0, 0.005, classic);
        let target = 2.0;
        assert!(
            free.grid.downtime_s > target,
            "the test needs a binding target"
        );
        let params = ModelParams {
            downtime_target: Some(target),
            ..classic
        };
        let r = run(&p, 40.0, 0.005, params);
        assert!(r.chosen.downtime_s <= target, "{:?}", r.chosen);
        assert!(r.grid.downtime_s <= target, "{:?}", r.grid);
        assert!(r.grid.gamma <= free.grid.gamma + 1e-12);
        assert!(r.values.feasible.iter().any(|&f| !f));
        // The overflow freeze keeps the target in every plan (the dirty
        // units that do not fit are post-copied): the target is the
        // freeze's budget, and a smaller one may even serve the guest
        // better than `dT` (here: fewer seconds of downtime for the same
        // units post-copied later).
        let r = run(
            &p,
            40.0,
            0.005,
            ModelParams {
                downtime_target: Some(target),
                ..ModelParams::default()
            },
        );
        assert!(r.chosen.downtime_s <= target, "{:?}", r.chosen);
        assert!(r.values.feasible.iter().all(|&f| f));
    }

    /// The plan family contains every named fixed strategy and the grid:
    /// the chosen plan's objective is at least each of theirs, QEMU's
    /// hybrid is a one-pass pre-copy of everything with the overflow
    /// freeze, and a candidate's figures are its full prediction's.
    #[test]
    fn the_plan_is_at_least_as_good_as_every_strategy_of_the_family() {
        for w in Workload::ALL {
            let p = profile(w);
            for (mbit, target) in [(40.0, Some(0.3)), (40.0, None), (1000.0, Some(0.1))] {
                let params = ModelParams {
                    downtime_target: target,
                    ..ModelParams::default()
                };
                let link = Link {
                    bandwidth: mbit * 1e6 / 8.0,
                    rtt: 0.005,
                    wire: crate::model::WireCost::ONE,
                };
                let model = Model::new(&p, link, params).unwrap();
                let r = search(&model, &SearchOptions { threads: 2 });
                let names: Vec<&str> = r.candidates.iter().map(|c| c.name.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "classic_precopy",
                        "precopy_overflow",
                        "qemu_hybrid",
                        "postcopy"
                    ]
                );
                assert!(
                    r.chosen.objective >= r.grid.objective,
                    "{w}: {:?}",
                    r.chosen
                );
                for c in &r.candidates {
                    assert!(
                        r.chosen.objective >= c.point.objective,
                        "{w} {mbit} {target:?}: {} beats the plan: {:?} vs {:?}",
                        c.name,
                        c.point,
                        r.chosen
                    );
                    let pred = model.predict_with(c.point.m, c.point.s, c.point.strategy);
                    assert_eq!(pred.meets_downtime_limit, c.point.feasible);
                    assert!((pred.downtime_s - c.point.downtime_s).abs() <= 1e-9 * pred.downtime_s);
                    if c.point.feasible {
                        assert!((pred.gamma - c.point.gamma).abs() <= 1e-9, "{}", c.name);
                    }
                }
                let hybrid = &r.candidates[2];
                assert_eq!((hybrid.point.m, hybrid.point.s), (1.0, 1.0));
                assert_eq!(hybrid.point.strategy.max_rounds, 1);
                assert_eq!(hybrid.point.strategy.freeze, FreezePolicy::Overflow);
                let pred = model.predict_with(1.0, 1.0, hybrid.point.strategy);
                assert_eq!(pred.rounds.len(), 1, "one pass");
                // The chosen point is what it says it is.
                match r.chosen_from.as_str() {
                    "grid" => assert_eq!(r.chosen, r.grid),
                    name => {
                        let c = r.candidates.iter().find(|c| c.name == name).unwrap();
                        assert_eq!(r.chosen, c.point);
                    }
                }
            }
        }
    }

    /// With a downtime target that a non-converging pre-copy misses, the
    /// classic freeze rules most of the grid out; the overflow freeze keeps
    /// every plan of a guest without disk writes within the target, and its
    /// plan is at least as good as the classic freeze's (whose feasible
    /// plans it contains unchanged).
    #[test]
    fn the_overflow_freeze_opens_the_grid_and_never_loses() {
        let p = class_profile(&SynthConfig::new(GIB, 0, Workload::MemoryHeavy));
        let target = Some(0.3);
        let run_with = |freeze| {
            let params = ModelParams {
                downtime_target: target,
                freeze,
                ..ModelParams::default()
            };
            run(&p, 40.0, 0.005, params)
        };
        let classic = run_with(FreezePolicy::Classic);
        let overflow = run_with(FreezePolicy::Overflow);
        let feasible = |r: &SearchResult| r.values.feasible.iter().filter(|&&f| f).count();
        let n = (GRID_STEPS + 1) * (GRID_STEPS + 1);
        assert!(
            feasible(&classic) < n / 2,
            "the test needs a binding target: {} of {n}",
            feasible(&classic)
        );
        assert_eq!(feasible(&overflow), n, "every plan keeps the target");
        assert!(overflow.chosen.gamma >= classic.chosen.gamma - 1e-12);
        assert!(overflow.chosen.downtime_s <= 0.3);
        // Where the classic freeze meets the target, the two agree.
        for k in 0..n {
            if classic.values.feasible[k] {
                assert_eq!(
                    classic.values.gamma[k], overflow.values.gamma[k],
                    "point {k}"
                );
            }
        }
    }

    #[test]
    fn threads_do_not_change_the_answer() {
        let p = profile(Workload::IoHeavy);
        let link = Link {
            bandwidth: 40e6 / 8.0,
            rtt: 0.005,
            wire: crate::model::WireCost::ONE,
        };
        let model = Model::new(&p, link, ModelParams::default()).unwrap();
        let a = search(&model, &SearchOptions { threads: 1 });
        let b = search(&model, &SearchOptions { threads: 2 });
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a.values.objective), bits(&b.values.objective));
        assert_eq!(bits(&a.values.gamma), bits(&b.values.gamma));
        assert_eq!(a.values.feasible, b.values.feasible);
        assert_eq!(a.chosen, b.chosen);
    }
}

#[cfg(test)]
mod bandwidth_tests {
    use proptest::prelude::*;

    use super::*;
    use crate::model::{Link, ModelParams};
    use crate::profile::{ClassProfile, UnitCounters};

    fn counters(n: u32, chunk: bool) -> impl Strategy<Value = UnitCounters> {
        (0..=n, 0..=n, 0..=n, prop::bool::weighted(0.15)).prop_map(move |(r, w, o, zero)| {
            UnitCounters {
                r,
                w,
                o: if chunk { o.min(w) } else { 0 },
                zero,
            }
        })
    }

    fn profile() -> impl Strategy<Value = ClassProfile> {
        (1u32..=8).prop_flat_map(|n| {
            (
                Just(n),
                prop::sample::select(vec![0.1, 1.0, 5.0]),
                prop::sample::select(vec![0u64, 10_000, 200_000]),
                prop::collection::vec(counters(n, false), 1..30),
                prop::collection::vec(counters(n, true), 0..20),
            )
                .prop_map(|(n, tau, state, pages, chunks)| {
                    ClassProfile::from_units(n, tau, 4096, 65536, state, &pages, &chunks)
                })
        })
    }

    /// The documented bound on "more bandwidth never lowers Gamma" (crate
    /// docs, "Bandwidth monotonicity"): with `Gamma*(B)` the optimum at
    /// `B`, `A(B) = dT / Gamma*(B) = D + DeltaT`, and `B1 < B2`,
    ///
    /// `A(B2) <= A(B1) + thr / B2 + max(0, L - D(B1))`   (target set)
    /// `A(B2) <= A(B1) + thr / B2`                       (no target)
    ///
    /// `thr = converged x (state + one unit)`: a faster link can reach the
    /// converged threshold (or the downtime target) a round earlier, with a
    /// larger remainder.
    fn check(
        p: &ClassProfile,
        rtt: f64,
        target: Option<f64>,
        mbits: &[f64],
    ) -> Result<(), TestCaseError> {
        let params = ModelParams {
            downtime_target: target,
            ..ModelParams::default()
        };
        let thr = params.converged * (p.state_bytes + p.chunk_size.max(p.page_size)) as f64;
        let mut last: Option<(f64, f64, f64)> = None; // (A, D, B)
        let mut worst: f64 = 0.0;
        for &mbit in mbits {
            let link = Link {
                bandwidth: mbit * 1e6 / 8.0,
                rtt,
                wire: crate::model::WireCost::ONE,
            };
            let model = Model::new(p, link, params).unwrap();
            let r = search(&model, &SearchOptions { threads: 1 });
            let pred = model.predict(r.chosen.m, r.chosen.s);
            if !pred.meets_downtime_limit {
                last = None;
                continue;
            }
            let a = params.delta_t / pred.gamma;
            if let Some((a1, d1, _)) = last {
                let slack =
                    thr / link.bandwidth + target.map_or(0.0, |l| (l - d1).max(0.0)) + 1e-9 * a1;
                worst = worst.max(a - a1);
                prop_assert!(
                    a <= a1 + slack,
                    "{mbit} mbit: D + DeltaT {a} > {a1} + {slack} (Gamma {})",
                    pred.gamma
                );
            }
            last = Some((a, pred.downtime_s, link.bandwidth));
        }
        let _ = worst;
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

        #[test]
        fn more_bandwidth_never_lowers_gamma_beyond_the_documented_bound(
            p in profile(),
            rtt in prop::sample::select(vec![0.0, 0.005, 0.05]),
            target in prop::option::of(prop::sample::select(vec![0.1, 1.0])),
        ) {
            check(&p, rtt, target, &[0.1, 0.3, 1.0, 3.0, 10.0, 100.0, 1000.0])?;
        }
    }
}
