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
//!
//! Ternary searches run on the integer lattice `0..=100`, so their answer is
//! comparable with the grid's; `ternary_is_global` says whether it reaches
//! the grid optimum. The plan uses the better of the two (the grid's on a
//! tie in value, since its tie-break is canonical: smallest `M + S`, then
//! smallest `M`).
//!
//! **Live migration impossible.** With a downtime limit `L` (the downtime
//! target, or `dT` when none is given: a pause as long as the whole
//! restoration window is not a live migration), live migration is
//! impossible on the link iff, with memory instantly copied, no storage
//! fraction `S` gives `D <= L`. Because `D` is smallest when nothing is
//! pre-copied, in this model that is exactly
//! `state / B + RTT + resume overhead > L`: the link cannot carry even the
//! device state within the limit. Storage itself never makes migration
//! impossible, as un-pre-copied storage can always be post-copied; a storage
//! set whose pre-copy would not converge just gets a small `S`.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{Evaluation, GRID_STEPS, Model, Scratch, grid_fraction};

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
}

/// Whether any plan on this link can be live.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Liveness {
    /// Some storage fraction (memory instantly copied) meets the limit.
    pub possible: bool,
    /// The downtime limit `L` used (s).
    pub limit_s: f64,
    /// The smallest storage-only downtime found (s).
    pub min_downtime_s: f64,
    /// Why not, when impossible.
    pub reason: Option<String>,
}

/// Objective values over the grid (row-major: index `i * 101 + j` for
/// `M = i/100`, `S = j/100`).
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
    /// The point the plan uses.
    pub chosen: Point,
    /// `"grid"` or `"ternary"`.
    pub chosen_by: &'static str,
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

fn point(i: usize, j: usize, e: &Evaluation) -> Point {
    Point {
        m: grid_fraction(i),
        s: grid_fraction(j),
        objective: e.objective,
        gamma: e.gamma,
        downtime_s: e.downtime,
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
/// index and the number of distinct evaluations.
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
        if g(m1) < g(m2) {
            lo = m1 + 1;
        } else {
            hi = m2 - 1;
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
    let params = model.params();
    let limit = params.downtime_target.unwrap_or(params.delta_t);
    let min_d = storage
        .iter()
        .map(|e| e.downtime)
        .fold(f64::INFINITY, f64::min);
    let possible = min_d <= limit * (1.0 + 1e-12);
    let reason = (!possible).then(|| {
        let link = model.link();
        format!(
            "live migration impossible on this link: even with memory copied instantly and no \
             storage pre-copied, the freeze takes {min_d:.3} s (device state {:.0} bytes at \
             {:.0} bytes/s + RTT {:.3} s + resume overhead {:.3} s), more than the downtime \
             limit {limit:.3} s{}",
            model.state_bytes(),
            link.bandwidth,
            link.rtt,
            params.resume_overhead,
            if params.downtime_target.is_some() {
                " (--downtime-target)"
            } else {
                " (dT, no downtime target given)"
            }
        )
    });
    let (s_star, e1) = ternary(|j| storage[j].objective);

    // Step 2: S fixed, ternary on M.
    let (m_star, e2) = ternary(|i| model.evaluate_grid(&mut scratch, i, s_star).objective);
    let tern_eval = model.evaluate_grid(&mut scratch, m_star, s_star);

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
    let mut best_eval = None;
    for (i, row) in rows {
        for (j, e) in row.into_iter().enumerate() {
            let k = i * n + j;
            values.objective[k] = e.objective;
            values.gamma[k] = e.gamma;
            values.feasible[k] = e.feasible;
            if best_eval.is_none() || better((i, j, e.objective), best) {
                best = (i, j, e.objective);
                best_eval = Some(e);
            }
        }
    }
    let grid = point(best.0, best.1, &best_eval.expect("grid is not empty"));
    let tern = point(m_star, s_star, &tern_eval);
    let storage_step = point(0, s_star, &storage[s_star]);
    let ternary_is_global = tern.objective >= grid.objective;
    let (chosen, chosen_by) = if tern.objective > grid.objective {
        (tern, "ternary")
    } else {
        (grid, "grid")
    };
    SearchResult {
        grid,
        ternary: tern,
        storage_step,
        ternary_is_global,
        chosen,
        chosen_by,
        live: Liveness {
            possible,
            limit_s: limit,
            min_downtime_s: min_d,
            reason,
        },
        ternary_evaluations: e1 + e2,
        evaluations: n * n + n + e2 + 1,
        elapsed: start.elapsed(),
        values,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Link, ModelParams};
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
    }

    #[test]
    fn live_migration_is_impossible_when_the_state_cannot_cross_in_time() {
        let mut p = profile(Workload::Idle);
        // 100 MB of device state on a 1 Mbit link: 800 s > dT = 20 s.
        p.state_bytes = 100_000_000;
        let r = run(&p, 1.0, 0.005, ModelParams::default());
        assert!(!r.live.possible);
        assert!(r.live.min_downtime_s > r.live.limit_s);
        let reason = r.live.reason.unwrap();
        assert!(reason.contains("impossible"), "{reason}");
        assert!(reason.contains("downtime limit"), "{reason}");
        // The same link is fine at 1 Gbit.
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

    #[test]
    fn liveness_is_exactly_the_minimum_downtime_test() {
        for (state, mbit, target) in [
            (1u64 << 20, 40.0, None),
            (1 << 30, 40.0, None),
            (1 << 20, 40.0, Some(0.01)),
            (1 << 20, 40.0, Some(1.0)),
            (0, 1.0, Some(0.005)),
        ] {
            let mut p = profile(Workload::Web);
            p.state_bytes = state;
            let params = ModelParams {
                downtime_target: target,
                ..ModelParams::default()
            };
            let link = Link {
                bandwidth: mbit * 1e6 / 8.0,
                rtt: 0.005,
            };
            let model = Model::new(&p, link, params).unwrap();
            let r = search(&model, &SearchOptions { threads: 1 });
            let limit = target.unwrap_or(params.delta_t);
            assert_eq!(
                r.live.possible,
                model.min_downtime() <= limit,
                "{state} {mbit} {target:?}"
            );
        }
    }

    #[test]
    fn plans_honour_the_downtime_target() {
        let p = profile(Workload::MemoryHeavy);
        let free = run(&p, 40.0, 0.005, ModelParams::default());
        let target = 2.0;
        assert!(
            free.chosen.downtime_s > target,
            "the test needs a binding target"
        );
        let params = ModelParams {
            downtime_target: Some(target),
            ..ModelParams::default()
        };
        let r = run(&p, 40.0, 0.005, params);
        assert!(r.chosen.downtime_s <= target, "{:?}", r.chosen);
        assert!(r.chosen.gamma <= free.chosen.gamma + 1e-12);
        assert!(r.values.feasible.iter().any(|&f| !f));
    }

    #[test]
    fn threads_do_not_change_the_answer() {
        let p = profile(Workload::IoHeavy);
        let link = Link {
            bandwidth: 40e6 / 8.0,
            rtt: 0.005,
        };
        let model = Model::new(&p, link, ModelParams::default()).unwrap();
        let a = search(&model, &SearchOptions { threads: 1 });
        let b = search(&model, &SearchOptions { threads: 2 });
        assert_eq!(a.values, b.values);
        assert_eq!(a.chosen, b.chosen);
    }
}
