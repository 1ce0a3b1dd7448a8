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
//!
//! **The ranking is decided with integers.** The score of `model.md`,
//! `1 - exp(-(lambda_r + lambda_w) H)`, is strictly increasing in
//! `ell(r) + ell(w) = -ln((1 - r'/n)(1 - w'/n))` (`k' = min(k, n - 1/2)`),
//! so ranking by descending score is ranking by *ascending*
//! `(n - r')(n - w')`, i.e. by ascending
//!
//! ```text
//! key(r, w) = max(2 (n - r), 1) * max(2 (n - w), 1)      (an exact u64)
//! ```
//!
//! (the `max(.., 1)` is the clamp `k -> n - 1/2` doubled). Two units with
//! the same key have the same score *exactly*, whatever floating point
//! would say about `ell(r) + ell(w)`: with `n = 3`, `(r, w) = (1, 3)` and
//! `(2, 2)` both score `ln 9`, and their order is decided by the tie-breaks
//! (lower `w` first), not by rounding. See [`rank_cmp`].

use std::cmp::Ordering;

use crate::profile::UnitCounters;

/// The largest sample count `n` the planner accepts (profiles, summaries,
/// shared-memory rules): keeps every rank key below `2^35` and every rate
/// table small.
pub const MAX_SAMPLES: u32 = 65_535;

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

/// The exact rank key of counters `c` out of `n` intervals:
/// `max(2 (n - r), 1) * max(2 (n - w), 1)`; a *smaller* key is a *higher*
/// access score (see the module docs). Counters above `n` count as `n`.
#[inline]
pub fn rank_key(n: u32, c: &UnitCounters) -> u64 {
    let f = |k: u32| (2 * (u64::from(n) - u64::from(k.min(n)))).max(1);
    f(c.r) * f(c.w)
}

/// The ranking order of two units' counters out of `n` intervals: `Less`
/// means `a` ranks *before* `b` (is hotter, pre-copied first, pushed
/// first). Exact (integer) comparisons only:
///
/// 1. higher access score first (ascending [`rank_key`]);
/// 2. then lower write rate (`w` ascending; with equal key and equal `w`,
///    `r` is equal too);
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
#[inline]
pub fn rank_cmp(n: u32, a: &UnitCounters, b: &UnitCounters) -> Ordering {
    rank_key(n, a)
        .cmp(&rank_key(n, b))
        .then(a.w.cmp(&b.w))
        .then(a.o.cmp(&b.o))
        .then(a.zero.cmp(&b.zero))
}

/// Pages' read rates pooled across the guest (empirical Bayes): the table
/// `ell(0..=n)` of unscaled read rates for pages read in `k` of `n`
/// intervals, given `(k, pages)` for every populated page.
///
/// Read sampling sees a short window, and many guests read in sweeps (a
/// scan, a checker, a garbage collector): the pages a sweep read during the
/// profile are the ones it will not read again soon, and a page seen read in
/// no interval is not a page that is never read. The per-page estimate
/// `ell(k)` gives every unseen page rate 0, so the model predicts no
/// post-copy faults for them, and plans that leave them to post-copy look
/// free. Here the fraction of intervals with a read, `p`, is taken to vary
/// across pages as a Beta distribution fitted to the counts by moments
/// (beta-binomial: mean `mu`, intra-class correlation `rho` from the
/// variance); a page's rate is the posterior mean `p = (k + a) / (n + a +
/// b)`, `a + b = 1 / rho - 1`. Counts no more dispersed than binomial pool
/// completely (every page the mean); very dispersed counts (a few hot
/// pages) hardly at all, but an unseen page keeps a small rate. Rates stay
/// increasing in `k`, below the clamp `ell(n)`, and are the per-page
/// `ell(k)` when nothing can be fitted (`n = 1`, no reads, every page read
/// always).
pub fn pooled_read_rates(n: u32, counts: impl Iterator<Item = (u32, u64)>) -> Vec<f64> {
    let n = n.max(1);
    let raw = RateTable::new(n).ell;
    let (mut units, mut s1, mut s2) = (0f64, 0f64, 0f64);
    for (k, m) in counts {
        let (k, m) = (f64::from(k.min(n)), m as f64);
        units += m;
        s1 += k * m;
        s2 += k * k * m;
    }
    let nf = f64::from(n);
    if n < 2 || units == 0.0 {
        return raw;
    }
    let mean_k = s1 / units;
    let mu = mean_k / nf;
    if mu <= 0.0 || mu >= 1.0 {
        return raw;
    }
    let var_k = (s2 / units - mean_k * mean_k).max(0.0);
    let rho = (var_k / (nf * mu * (1.0 - mu)) - 1.0) / (nf - 1.0);
    if rho >= 1.0 {
        return raw;
    }
    // No more dispersed than binomial: one rate for all (a + b large).
    let ab = if rho > 1e-9 { 1.0 / rho - 1.0 } else { 1e9 };
    let a = mu * ab;
    let cap = raw[n as usize];
    (0..=n)
        .map(|k| {
            let p = (f64::from(k) + a) / (nf + ab);
            (-(-p).ln_1p()).min(cap)
        })
        .collect()
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

    /// The whole table, `ell(0..=n)`.
    pub fn values(&self) -> &[f64] {
        &self.ell
    }

    /// `ell(k)`; counters above `n` are clamped to `n`.
    #[inline]
    pub fn ell(&self, k: u32) -> f64 {
        self.ell[k.min(self.samples) as usize]
    }

    /// `ell(r) + ell(w)`, the ranking score's monotone core (reported only:
    /// the order itself is [`rank_cmp`], decided with integers).
    #[inline]
    pub fn access(&self, c: &UnitCounters) -> f64 {
        self.ell(c.r) + self.ell(c.w)
    }

    /// [`rank_cmp`] for this table's `n`.
    #[inline]
    pub fn rank_cmp(&self, a: &UnitCounters, b: &UnitCounters) -> Ordering {
        rank_cmp(self.samples, a, b)
    }
}

/// `1 - exp(-x)`, accurate for small `x`.
#[inline]
pub fn p_any(x: f64) -> f64 {
    -(-x).exp_m1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pooled_reads_share_a_sweep_and_keep_hot_pages_hot() {
        let n = 20;
        let raw = |k| unscaled_rate(k, n);
        // A sweep: every page read once in a while, 1 in 5 seen once.
        let sweep = pooled_read_rates(n, [(0, 8000), (1, 2000)].into_iter());
        assert!(
            sweep.windows(2).all(|w| (w[0] - w[1]).abs() < 1e-6),
            "{sweep:?}"
        );
        // Its rate is the mean one: a read in 1 % of the intervals.
        assert!((sweep[0] - -(0.99f64.ln())).abs() < 1e-9, "{}", sweep[0]);
        // Hot and cold: a few pages read always, most never seen read.
        let mixed = pooled_read_rates(n, [(0, 10_000), (20, 100), (10, 50)].into_iter());
        assert!(
            mixed[0] > 0.0 && mixed[0] < raw(1) / 10.0,
            "unseen: {}",
            mixed[0]
        );
        assert!(
            mixed[20] > raw(15),
            "hot stays hot: {} vs {}",
            mixed[20],
            raw(15)
        );
        assert!(mixed.windows(2).all(|w| w[0] <= w[1]));
        assert!(mixed.iter().all(|&l| l <= raw(n)));
        // Nothing to fit: each page's own rate.
        let own: Vec<f64> = (0..=n).map(raw).collect();
        assert_eq!(
            pooled_read_rates(n, [(0, 500)].into_iter()),
            own,
            "no reads"
        );
        assert_eq!(pooled_read_rates(n, std::iter::empty()), own);
        assert_eq!(
            pooled_read_rates(n, [(20, 9)].into_iter()),
            own,
            "always read"
        );
        assert_eq!(
            pooled_read_rates(1, [(0, 5), (1, 5)].into_iter()),
            vec![raw1(0), raw1(1)]
        );
    }

    fn raw1(k: u32) -> f64 {
        unscaled_rate(k, 1)
    }

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

    /// `n = 3`: `(r, w) = (1, 3)` and `(2, 2)` have exactly the same score
    /// (`ln 9`, the clamp turning `w = 3` into `2.5`). Floating point may
    /// order their `ell` sums either way; the integer key says "tie", and
    /// the tie-break (lower `w` first) puts `(2, 2)` first.
    #[test]
    fn exact_ties_are_broken_by_the_write_rate_not_by_rounding() {
        let (a, b) = (c(1, 3), c(2, 2));
        assert_eq!(rank_key(3, &a), 4);
        assert_eq!(rank_key(3, &b), 4);
        assert_eq!(rank_cmp(3, &b, &a), Ordering::Less);
        assert_eq!(rank_cmp(3, &a, &b), Ordering::Greater);
        // The scores agree to rounding only: that is what made the old
        // float comparison a coin toss.
        let t = RateTable::new(3);
        assert!((t.access(&a) - t.access(&b)).abs() < 1e-15);
        assert!((t.access(&a) - 9f64.ln()).abs() < 1e-15);
    }

    proptest::proptest! {
        /// The integer key orders exactly like the (mathematical) score:
        /// whenever the float scores differ by more than rounding, the key
        /// agrees with them.
        #[test]
        fn integer_key_agrees_with_the_score(n in 1u32..=MAX_SAMPLES, r1 in 0u32..=70_000, w1 in 0u32..=70_000, r2 in 0u32..=70_000, w2 in 0u32..=70_000) {
            let (a, b) = (c(r1.min(n), w1.min(n)), c(r2.min(n), w2.min(n)));
            let score = |x: &UnitCounters| unscaled_rate(x.r, n) + unscaled_rate(x.w, n);
            let (sa, sb) = (score(&a), score(&b));
            if (sa - sb).abs() > 1e-9 * sa.max(sb).max(1.0) {
                proptest::prop_assert_eq!(rank_key(n, &a).cmp(&rank_key(n, &b)), sb.total_cmp(&sa));
            }
            proptest::prop_assert!(rank_key(n, &a) <= 4 * u64::from(n) * u64::from(n));
        }
    }

    #[test]
    fn any_event_probability_is_accurate_near_zero() {
        assert_eq!(p_any(0.0), 0.0);
        assert!((p_any(1e-12) - 1e-12).abs() < 1e-24);
    }
}
