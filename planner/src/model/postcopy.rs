//! Phase 3 (post-copy): background push in priority order, demand faults,
//! and the stalls they cost the resumed guest, integrated in wall-clock
//! time.
//!
//! # Arrivals
//!
//! Every unit outside the pre-copy set is pushed once, in one merged order of
//! pages and chunks by rank (hottest first; on a full tie pages go first).
//! A unit costs `q * unit` bytes of push time, where `q = 1` for populated
//! units and, for units zero/never populated at profile end,
//! `q = 1 - exp(-lambda_w * T_pre)` (the chance that it was written during
//! the live pre-copy and is no longer zero at the freeze; a still-zero unit
//! is neither pushed nor fetched: the destination maps it as zero). Using the
//! expected cost `q` in place of a 0/1 outcome keeps the push timeline
//! deterministic. The `j`-th unit of a class whose push starts at `a` link
//! bytes arrives when `a + j q wire` link bytes have been pushed (`wire` =
//! the unit's size times its [`WireCost`](super::WireCost)), i.e. at wall
//! time `A = (a + j q wire) / B` after resume. A fault fetches its unit on
//! demand and the push later skips it, so faults do not move the arrival of
//! other units (the fetch's own link time, `unit / B`, is neglected there)
//! and `U`, the post-copy duration, is the total push time.
//!
//! # Stalls in wall-clock time
//!
//! The guest does *work*; work time `t` advances only while it runs. Its
//! wall clock is `W(t) = t + S(t)`, `S(t)` the stall accumulated so far.
//! A unit's first access comes at work time `t_u ~ Exp(lambda_a)` (`lambda_a
//! = lambda_r + lambda_w` for pages, `lambda_r + lambda_w (1 - o/w)` for
//! chunks); it faults iff the unit has not arrived by then in **wall**
//! time, `W(t_u) < A_u`, and each fault stalls the guest `stall =
//! [Link::fault_stall](super::Link::fault_stall)(unit c)` (`2 RTT + unit c
//! / B`, `c` the kind's cost for written units). In expectation (mean field: `S` replaced by its mean),
//!
//! ```text
//! dS/dt = sum over units u not arrived by W(t) of  q_u lambda_u e^{-lambda_u t} stall_u
//! ```
//!
//! While the guest stalls, the push goes on, so a stalled guest finds more
//! units present when it resumes: a "first-order" model that compares
//! arrivals with *work* time (faults iff `t_u < A_u`) overestimates the
//! stalls by 2-6x on a WAN.
//!
//! **Integration.** Work time is cut at a fixed grid `0 = t_0 < t_1 < ... <
//! t_K` (built once per model, `work_grid`): geometric from
//! `t_1 = min(1e-4 dT, 0.01 / lambda_max)` to `t_w = dT` with ratio at most
//! 1.3 (the "window", about 36 steps), then geometric with ratio at most
//! 1.3 up to `t_K = U_max`, the push time of everything, beyond which every
//! unit has arrived (work time never exceeds wall time). Over step `k` a
//! unit that stays absent contributes `m_k = q (e^{-lambda t_k} -
//! e^{-lambda t_{k+1}})` expected faults (the exact integral of its density
//! over the step). With `M_k(W)` = the sum of `m_k stall` over the units not
//! arrived by wall time `W`, one step is a predictor-corrector (Heun) on
//! the moving arrival front:
//!
//! ```text
//! a = M_k(t_k + S_k),   b = M_k(t_{k+1} + S_k + a),   S_{k+1} = S_k + (a + b) / 2
//! ```
//!
//! (`a` treats every unit absent at the step's start as absent for the
//! whole step, `b` uses the front the step would reach with that stall; the
//! mean is second-order accurate in the step). The fault count is
//! integrated the same way without the `stall` weight.
//!
//! **Outputs.** `DeltaT = dT + S(dT)` (the wall time of `dT` seconds of
//! work, `model.md`); `P = S(t_K)`, the expected stall over the whole
//! post-copy (every unit has arrived by then); `P >= DeltaT - dT`.
//!
//! **Cost.** `M_k(W)` is a suffix of the push order: the units of the class
//! at the arrival front that have not arrived, plus every later class. Per
//! kind, a `StallTable` holds, for every step `k`, the suffix sums over the
//! rank order of `count (e^{-lambda t_k} - e^{-lambda t_{k+1}})` (populated
//! classes; zero classes depend on the plan through `q` and are added
//! separately), built once in `Model::new` in `O(classes x steps)`
//! multiply-adds. An evaluation then locates the front by galloping search
//! on the push order and reads two table entries per kind: `O(steps x
//! log classes + steps x zero-written classes)`, independent of the guest
//! size. Tables larger than 2^22 entries per kind store every `stride`-th
//! suffix and add the rest directly.
//!
//! **Accuracy.** Checked against a per-unit Monte Carlo of the same
//! assumptions (random first-access times, stalls fed back into the wall
//! clock): see the `monte_carlo` tests of the model and the crate docs.

use super::rates::p_any;

/// `t_1 <= WINDOW_FIRST * dT`.
const WINDOW_FIRST: f64 = 1e-4;
/// `t_1 <= FIRST_EVENTS / lambda_max`.
const FIRST_EVENTS: f64 = 0.01;
/// Largest ratio of consecutive window grid points.
const WINDOW_RATIO: f64 = 1.3;
/// Largest ratio of consecutive grid points after `dT`.
const TAIL_RATIO: f64 = 1.3;
/// Step caps (reached only for extreme rate or size ranges).
const MAX_WINDOW_STEPS: usize = 256;
const MAX_TAIL_STEPS: usize = 256;
/// Largest table per kind (entries) before suffixes are strided.
const TABLE_LIMIT: usize = 1 << 22;

/// The work-time grid: `(t, w)` with `t[0] = 0`, `t[w] = dT`, and
/// `t[t.len() - 1] = max(dT, u_max)` (see the module docs).
pub(crate) fn work_grid(dt: f64, lam_max: f64, u_max: f64) -> (Vec<f64>, usize) {
    let mut t = vec![0.0];
    if lam_max > 0.0 && lam_max.is_finite() {
        let t1 = (dt * WINDOW_FIRST).min(FIRST_EVENTS / lam_max);
        let span = dt / t1;
        let k = ((span.ln() / WINDOW_RATIO.ln()).ceil() as usize).clamp(1, MAX_WINDOW_STEPS);
        let rho = span.powf(1.0 / k as f64);
        for i in 0..k {
            t.push(t1 * rho.powi(i as i32));
        }
    }
    t.push(dt);
    let w = t.len() - 1;
    if lam_max > 0.0 && u_max > dt {
        let span = u_max / dt;
        let j = ((span.ln() / TAIL_RATIO.ln()).ceil() as usize).clamp(1, MAX_TAIL_STEPS);
        let rho = span.powf(1.0 / j as f64);
        for i in 1..j {
            t.push(dt * rho.powi(i as i32));
        }
        t.push(u_max);
    }
    (t, w)
}

/// Distinct values of `v` (sorted) and the index of every element in them.
fn distinct(v: impl Iterator<Item = f64> + Clone) -> (Vec<f64>, Vec<u32>) {
    let mut d: Vec<f64> = v.clone().collect();
    d.sort_by(f64::total_cmp);
    d.dedup_by(|a, b| a.to_bits() == b.to_bits());
    let idx = v
        .map(|x| d.partition_point(|&y| y.total_cmp(&x).is_lt()) as u32)
        .collect();
    (d, idx)
}

/// `e^{-f t_k}` for distinct rates `f` and every grid point `t_k`
/// (`[f][k]`, `K + 1` values per rate).
fn decays(rates: &[f64], t: &[f64]) -> Vec<f64> {
    let mut out = Vec::with_capacity(rates.len() * t.len());
    for &f in rates {
        out.extend(t.iter().map(|&tk| (-f * tk).exp()));
    }
    out
}

/// Per-step suffix sums of expected first accesses over one kind's ranked
/// classes (see the module docs).
#[derive(Debug, Clone, Default)]
pub(crate) struct StallTable {
    /// Grid intervals `K` (values per stored row).
    steps: usize,
    /// Classes per stored suffix.
    stride: usize,
    /// `data[r * K + k]` = sum over populated classes `j >= r * stride` of
    /// `count_j (e^{-lambda_j t_k} - e^{-lambda_j t_{k+1}})`; class-major,
    /// so an evaluation that keeps its front in one class reads adjacent
    /// values from step to step.
    data: Vec<f64>,
    /// `lambda_a` per class (for strided tables).
    lam: Vec<f64>,
    /// `count` per populated class, 0 for zero classes.
    weight: Vec<f64>,
    /// The grid.
    t: Vec<f64>,
}

impl StallTable {
    /// Builds the table. `parts` (`lambda_a` = read part + write part) and
    /// `weight` per class in rank order; `zero_written` lists classes whose
    /// per-unit step masses are returned (`out[z * K + k]`).
    ///
    /// `lambda_a = f_r + f_w` makes `e^{-lambda_a t} = e^{-f_r t} e^{-f_w t}`:
    /// only the distinct read and write parts (at most `n + 1` and
    /// `(n + 1)^2`, and at most the class count) need an `exp` per grid
    /// point; each class then costs one multiply-add per step.
    pub(crate) fn build(
        t: &[f64],
        parts: &[(f64, f64)],
        weight: Vec<f64>,
        zero_written: &[usize],
    ) -> (StallTable, Vec<f64>) {
        let c = parts.len();
        let steps = t.len() - 1;
        let points = t.len();
        let stride = (c + 1).saturating_mul(steps).div_ceil(TABLE_LIMIT).max(1);
        let rows = c.div_ceil(stride) + 1;
        let (rates_r, idx_r) = distinct(parts.iter().map(|p| p.0));
        let (rates_w, idx_w) = distinct(parts.iter().map(|p| p.1));
        let (dec_r, dec_w) = (decays(&rates_r, t), decays(&rates_w, t));
        let lam: Vec<f64> = parts.iter().map(|&(r, w)| r + w).collect();
        let mut data = vec![0.0; rows * steps];
        let mut zmass = vec![0.0; zero_written.len() * steps];
        let mut acc = vec![0.0; steps];
        let mut mass = vec![0.0; steps];
        let mut z = zero_written.len();
        for i in (0..c).rev() {
            let er = &dec_r[idx_r[i] as usize * points..][..points];
            let ew = &dec_w[idx_w[i] as usize * points..][..points];
            // e_k e_{k+1} products, differenced.
            let mut prev = er[0] * ew[0];
            for k in 0..steps {
                let e = er[k + 1] * ew[k + 1];
                mass[k] = prev - e;
                prev = e;
            }
            let w = weight[i];
            if w > 0.0 {
                for (a, m) in acc.iter_mut().zip(&mass) {
                    *a += w * m;
                }
            }
            if i % stride == 0 {
                data[(i / stride) * steps..][..steps].copy_from_slice(&acc);
            }
            if z > 0 && zero_written[z - 1] == i {
                z -= 1;
                zmass[z * steps..][..steps].copy_from_slice(&mass);
            }
        }
        let table = StallTable {
            steps,
            stride,
            data,
            lam,
            weight,
            t: t.to_vec(),
        };
        (table, zmass)
    }

    /// Table entries (for the size report).
    pub(crate) fn entries(&self) -> usize {
        self.data.len()
    }

    /// `e^{-lambda t_k} - e^{-lambda t_{k+1}}` of class `i`, directly.
    #[inline]
    fn direct(&self, k: usize, i: usize) -> f64 {
        let l = self.lam[i];
        (-l * self.t[k]).exp() - (-l * self.t[k + 1]).exp()
    }

    /// Sum over populated classes `j >= i` of `count_j m_k(j)`.
    #[inline]
    pub(crate) fn suffix(&self, k: usize, i: usize) -> f64 {
        if self.stride == 1 {
            return self.data[i * self.steps + k];
        }
        let r = i.div_ceil(self.stride);
        let end = (r * self.stride).min(self.lam.len());
        self.data[r * self.steps + k]
            + (i..end)
                .map(|j| self.weight[j] * self.direct(k, j))
                .sum::<f64>()
    }

    /// Per-unit step mass `m_k` of populated class `i`.
    #[inline]
    pub(crate) fn unit_mass(&self, k: usize, i: usize) -> f64 {
        if self.stride == 1 {
            let w = self.weight[i];
            if w > 0.0 {
                (self.data[i * self.steps + k] - self.data[(i + 1) * self.steps + k]) / w
            } else {
                0.0
            }
        } else {
            self.direct(k, i)
        }
    }
}

/// `1 - e^{-lambda_w T_pre}`: the push weight of a unit zero at profile end.
#[inline]
pub(crate) fn zero_weight(lam_w: f64, t_pre: f64) -> f64 {
    p_any(lam_w * t_pre)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_spans_the_window_and_the_whole_push() {
        let (t, w) = work_grid(20.0, 4.8, 860.0);
        assert_eq!(t[0], 0.0);
        assert_eq!(t[w], 20.0);
        assert_eq!(*t.last().unwrap(), 860.0);
        assert!((t[1] - 2e-3).abs() < 1e-15);
        for p in t.windows(2).skip(1) {
            assert!(p[1] > p[0] && p[1] / p[0] <= 1.3 + 1e-12, "{p:?}");
        }
        // No accesses: no stalls, the grid is just the window.
        assert_eq!(work_grid(20.0, 0.0, 1e6), (vec![0.0, 20.0], 1));
        // Everything arrives within dT: no tail.
        let (t, w) = work_grid(20.0, 1.0, 5.0);
        assert_eq!(w, t.len() - 1);
    }

    #[test]
    fn strided_tables_agree_with_full_ones() {
        let t: Vec<f64> = (0..6).map(|k| k as f64 * 0.7).collect();
        let parts: Vec<(f64, f64)> = (0..50)
            .map(|i| (0.1 * (i % 7) as f64, 0.05 * (i % 3) as f64))
            .collect();
        let weight: Vec<f64> = (0..50)
            .map(|i| if i % 5 == 0 { 0.0 } else { (i + 1) as f64 })
            .collect();
        let zw = [0, 5, 45];
        let (full, zmass) = StallTable::build(&t, &parts, weight.clone(), &zw);
        assert_eq!(full.stride, 1);
        let steps = t.len() - 1;
        // The table against direct sums.
        for k in 0..steps {
            for i in 0..=50 {
                let want: f64 = (i..50).map(|j| weight[j] * full.direct(k, j)).sum();
                let got = full.suffix(k, i);
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{k} {i}: {got} {want}"
                );
            }
            for (z, &i) in zw.iter().enumerate() {
                assert!((zmass[z * steps + k] - full.direct(k, i)).abs() < 1e-15);
            }
        }
        // A forced stride reads the same sums.
        let mut strided = full.clone();
        strided.stride = 4;
        let rows = 50usize.div_ceil(4) + 1;
        strided.data = vec![0.0; rows * steps];
        for r in 0..rows {
            for k in 0..steps {
                strided.data[r * steps + k] = full.suffix(k, (r * 4).min(50));
            }
        }
        for k in 0..steps {
            for i in 0..=50 {
                let (a, b) = (full.suffix(k, i), strided.suffix(k, i));
                assert!(
                    (a - b).abs() <= 1e-12 * a.abs().max(1.0),
                    "{k} {i}: {a} {b}"
                );
            }
            for (i, &w) in weight.iter().enumerate() {
                if w > 0.0 {
                    let (a, b) = (full.unit_mass(k, i), strided.unit_mass(k, i));
                    assert!((a - b).abs() <= 1e-12, "{k} {i}: {a} {b}");
                }
            }
        }
    }
}
