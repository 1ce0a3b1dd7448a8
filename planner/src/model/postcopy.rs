//! Phase 3 (post-copy): background push in priority order, demand faults.
//!
//! Every unit outside the pre-copy set is pushed once, in one merged order of
//! pages and chunks by rank (hottest first; on a full tie pages go first).
//! A unit costs `q * unit` bytes of push time, where `q = 1` for populated
//! units and, for units zero/never populated at profile end,
//! `q = 1 - exp(-lambda_w * T_pre)` (the chance that it was written during
//! the live pre-copy and is no longer zero at the freeze; a still-zero unit
//! is neither pushed nor fetched: the destination maps it as zero). Using the
//! expected cost `q` in place of a 0/1 outcome keeps the push timeline
//! deterministic.
//!
//! A class of `m` units starting at push time `a` (seconds after resume) has
//! its `j`-th unit arrive at `a + j h`, `h = q unit / B`. A unit that arrives
//! at `t` faults if its first access (rate `lambda_a`) comes first:
//! `1 - e^{-lambda_a t}`. Summed in closed form (a geometric series, exact for
//! the sequential push; the continuous "uniform arrival over [a, a + m h]"
//! average is its limit):
//!
//! ```text
//! faults = q * sum_{j=1..m} (1 - e^{-L (a + j h)}) = q * (m - e^{-L a} G(L h, m)),
//! G(x, m) = sum_{j=1..m} e^{-x j} = (1 - e^{-x m}) / (e^x - 1)
//! ```
//!
//! Each fault stalls the guest `RTT + unit / B`; `P = sum faults * stall`.
//! `U` (remote uptime, the post-copy duration) is the total push time.
//!
//! `DeltaT` (first order): the resumed guest needs `dT` seconds of work; a
//! unit stalls it within that work iff its first access comes before
//! `min(arrival, dT)`:
//!
//! ```text
//! window = q * (J - e^{-L a} G(L h, J) + (m - J)(1 - e^{-L dT})),
//! J = #{ j : a + j h <= dT },    DeltaT = dT + sum window * stall.
//! ```
//!
//! First-order means stalls do not slow the guest's own clock: in truth a
//! stalled guest has done less work by a given wall time, so slightly fewer
//! units are touched before they arrive. Both `P` and `DeltaT` are therefore
//! upper bounds (conservative); the error is second order in the stall
//! fraction.

use super::rates::p_any;

/// `G(x, j) = sum_{i=1..j} e^{-x i}` for `x >= 0`.
#[inline]
pub(crate) fn geo(x: f64, j: f64) -> f64 {
    if j <= 0.0 {
        0.0
    } else if x <= 0.0 {
        j
    } else {
        -(-x * j).exp_m1() / x.exp_m1()
    }
}

/// `G(x, j)` with `e^x - 1` precomputed.
#[inline]
pub(crate) fn geo_with(x: f64, em1x: f64, j: f64) -> f64 {
    if j <= 0.0 {
        0.0
    } else if x <= 0.0 || em1x <= 0.0 {
        j
    } else {
        -(-x * j).exp_m1() / em1x
    }
}

/// Expected faults of one class in the `dT` window (see module docs).
#[inline]
pub(crate) fn window_faults(la: f64, q: f64, m: f64, h: f64, a: f64, dt: f64) -> f64 {
    if la <= 0.0 || q <= 0.0 || m <= 0.0 {
        return 0.0;
    }
    let j = if a >= dt {
        0.0
    } else {
        ((dt - a) / h).floor().min(m)
    };
    let inside = if j > 0.0 {
        j - (-la * a).exp() * geo(la * h, j)
    } else {
        0.0
    };
    q * (inside.max(0.0) + (m - j) * p_any(la * dt))
}

/// Expected faults of one class over the whole post-copy phase.
#[inline]
pub(crate) fn total_faults(la: f64, q: f64, m: f64, h: f64, a: f64) -> f64 {
    if la <= 0.0 || q <= 0.0 || m <= 0.0 {
        return 0.0;
    }
    q * (m - (-la * a).exp() * geo(la * h, m)).max(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_match_direct_sums() {
        let (la, q, h, a, dt) = (0.37, 0.8, 0.013, 0.4, 1.0);
        for m in [1.0, 2.0, 10.0, 57.0, 200.0] {
            let (mut tot, mut win) = (0.0, 0.0);
            for j in 1..=m as usize {
                let t = a + j as f64 * h;
                tot += q * (1.0 - (-la * t).exp());
                win += q * (1.0 - (-la * t.min(dt)).exp());
            }
            assert!(
                (total_faults(la, q, m, h, a) - tot).abs() < 1e-12 * m,
                "{m}"
            );
            assert!(
                (window_faults(la, q, m, h, a, dt) - win).abs() < 1e-12 * m,
                "{m}"
            );
        }
        assert_eq!(geo(0.0, 5.0), 5.0);
        assert_eq!(geo(1e300, 5.0), 0.0);
    }
}
