//! Poisson rates from interval counters, and the ranking order they induce.
//!
//! A profile of `n` intervals of length `tau` records, per unit, `k` = the
//! number of intervals with at least one event (read, write). Under a Poisson
//! process of rate `lambda`, an interval is event-free with probability
//! `exp(-lambda * tau)`, so the maximum-likelihood estimate is
//!
//! ```text
//! lambda = -ln(1 - k/n) / tau
//! ```
//!
//! which is infinite at `k = n`. **Clamp:** `k` is replaced by
//! `min(k, n - 1/2)`, i.e. a unit busy in every interval is treated as if it
//! had been idle for half an interval. The clamped rate is finite
//! (`ln(2n) / tau` at most), strictly increasing in `k`, and equal to the
//! estimate for every `k < n`.
//!
//! The planner works with the *unscaled* rate `ell(k) = lambda * tau`, a table
//! of `n + 1` values, and divides by `tau` only where time enters.

use std::cmp::Ordering;

use crate::profile::UnitCounters;

/// `ell(k) = -ln(1 - min(k, n - 1/2) / n)`: the clamped Poisson rate of a
/// counter `k` out of `n` intervals, in events per interval.
///
/// `n` must be positive; `k > n` is clamped like `k = n`.
pub fn unscaled_rate(k: u32, n: u32) -> f64 {
    debug_assert!(n > 0, "a profile has at least one interval");
    let n = f64::from(n);
    let k = f64::from(k).min(n - 0.5);
    -(-k / n).ln_1p()
}

/// The table `ell(0..=n)` of unscaled rates for one sample count.
#[derive(Debug, Clone, PartialEq)]
pub struct RateTable {
    samples: u32,
    ell: Vec<f64>,
}

impl RateTable {
    /// Builds the table for `samples` intervals (`samples >= 1`).
    pub fn new(samples: u32) -> Self {
        let samples = samples.max(1);
        let ell = (0..=samples).map(|k| unscaled_rate(k, samples)).collect();
        RateTable { samples, ell }
    }

    /// The sample count `n` this table was built for.
    pub fn samples(&self) -> u32 {
        self.samples
    }

    /// `ell(k)`; counters above `n` are clamped to `n`.
    #[inline]
    pub fn ell(&self, k: u32) -> f64 {
        self.ell[k.min(self.samples) as usize]
    }

    /// The ranking score's monotone core: `ell(r) + ell(w)`. The score of
    /// `model.md`, `1 - exp(-(lambda_r + lambda_w) * H)`, is a strictly
    /// increasing function of it for every horizon `H > 0`, so the order does
    /// not depend on `H` or on `tau`.
    #[inline]
    pub fn access(&self, c: &UnitCounters) -> f64 {
        self.ell(c.r) + self.ell(c.w)
    }

    /// The ranking order of two units' counters: `Less` means `a` ranks
    /// *before* `b` (is hotter, pre-copied first, pushed first).
    ///
    /// 1. higher access score `ell(r) + ell(w)` first;
    /// 2. then lower write rate (`w` ascending; `ell` is strictly increasing);
    /// 3. then lower overwrite count `o` (a higher post-copy fetch rate
    ///    `lambda_r + lambda_w (1 - o/w)`, so the more fault-prone unit goes
    ///    first; always 0 for pages);
    /// 4. then populated units before zero/never-populated ones (which cost
    ///    nothing in post-copy).
    ///
    /// Equal keys are the same class; the engine breaks the remaining tie by
    /// address (lower first). Steps 3 and 4 refine `model.md`'s "then by
    /// address" so that every class is one contiguous run of the order; see
    /// the crate docs.
    pub fn rank_cmp(&self, a: &UnitCounters, b: &UnitCounters) -> Ordering {
        let (sa, sb) = (self.access(a), self.access(b));
        sb.total_cmp(&sa)
            .then(a.w.cmp(&b.w))
            .then(a.r.cmp(&b.r))
            .then(a.o.cmp(&b.o))
            .then(a.zero.cmp(&b.zero))
    }
}

/// `1 - exp(-x)`, accurate for small `x`.
#[inline]
pub fn p_any(x: f64) -> f64 {
    -(-x).exp_m1()
}

/// Probability that a unit sent at a uniformly random point of a round of
/// length `t` is written again before the round ends, with `x = lambda * t`:
/// `1 - (1 - exp(-x)) / x`, computed without cancellation for small `x`.
#[inline]
pub fn p_redirty(x: f64) -> f64 {
    if x <= 0.0 {
        0.0
    } else if x < 1e-4 {
        // x/2 - x^2/6 + x^3/24: truncation error below 1e-17 relative here.
        x * (0.5 - x * (1.0 / 6.0 - x / 24.0))
    } else {
        (x + (-x).exp_m1()) / x
    }
}

/// `(p_redirty(x), p_any(x))` with one `exp_m1`; bit-identical to calling
/// both.
#[inline]
pub fn redirty_and_any(x: f64) -> (f64, f64) {
    if x <= 0.0 {
        return (0.0, 0.0);
    }
    let e = (-x).exp_m1();
    let redirty = if x < 1e-4 {
        x * (0.5 - x * (1.0 / 6.0 - x / 24.0))
    } else {
        (x + e) / x
    };
    (redirty, -e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(r: u32, w: u32) -> UnitCounters {
        UnitCounters {
            r,
            w,
            o: 0,
            zero: false,
        }
    }

    #[test]
    fn clamp_is_finite_monotone_and_exact_below_n() {
        let t = RateTable::new(10);
        assert_eq!(t.ell(0), 0.0);
        assert!((t.ell(5) - 2f64.ln()).abs() < 1e-15);
        assert!((t.ell(10) - 20f64.ln()).abs() < 1e-12);
        for k in 0..10 {
            assert!(t.ell(k) < t.ell(k + 1));
        }
        assert_eq!(t.ell(99), t.ell(10));
    }

    #[test]
    fn ranking_prefers_access_then_low_writes_then_low_overwrites_then_populated() {
        let t = RateTable::new(10);
        assert_eq!(t.rank_cmp(&c(5, 5), &c(1, 1)), Ordering::Less);
        // Same score (swapped counters): lower write rate first.
        assert_eq!(t.rank_cmp(&c(3, 1), &c(1, 3)), Ordering::Less);
        let mut a = c(2, 4);
        let mut b = c(2, 4);
        a.o = 1;
        b.o = 3;
        assert_eq!(t.rank_cmp(&a, &b), Ordering::Less);
        b.o = 1;
        b.zero = true;
        assert_eq!(t.rank_cmp(&a, &b), Ordering::Less);
        assert_eq!(t.rank_cmp(&a, &a), Ordering::Equal);
    }

    #[test]
    fn redirty_probability_is_smooth_at_zero() {
        for x in [1e-9f64, 1e-6, 9.9e-5, 1e-4, 1e-3, 0.1, 1.0, 50.0] {
            let direct = 1.0 - (1.0 - (-x).exp()) / x;
            let ours = p_redirty(x);
            if x >= 1e-3 {
                assert!((direct - ours).abs() < 1e-12, "{x}");
            }
            assert!(ours > 0.0 && ours < 1.0 && ours < x / 2.0 + 1e-18);
        }
        assert_eq!(p_redirty(0.0), 0.0);
        assert!((p_any(1e-12) - 1e-12).abs() < 1e-24);
    }
}
