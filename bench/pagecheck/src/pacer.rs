//! Rate pacing: a token bucket fed by elapsed time.
//!
//! The checker wakes every few milliseconds and does the work the elapsed
//! time has earned, so its rate is accurate even when TCG makes the guest's
//! timer slices uneven. The bucket holds at most `burst_secs` of work: after a
//! long stall (a paused guest, a busy vCPU) it catches up that much and no
//! more, instead of bursting through every second it missed.

/// Token bucket of work units (pages).
#[derive(Debug, Clone)]
pub struct Pacer {
    per_sec: f64,
    credit: f64,
    cap: f64,
}

impl Pacer {
    /// `per_sec` units per second; the bucket holds `burst_secs` of them
    /// (at least one unit, so tiny rates still make progress).
    pub fn new(per_sec: f64, burst_secs: f64) -> Pacer {
        let per_sec = if per_sec.is_finite() && per_sec > 0.0 {
            per_sec
        } else {
            0.0
        };
        Pacer {
            per_sec,
            credit: 0.0,
            cap: (per_sec * burst_secs).max(1.0),
        }
    }

    /// The configured rate, in units per second.
    pub fn per_sec(&self) -> f64 {
        self.per_sec
    }

    /// Adds `dt_secs` of credit and takes the whole units it is worth.
    pub fn take(&mut self, dt_secs: f64) -> u64 {
        if self.per_sec == 0.0 || dt_secs.is_nan() || dt_secs <= 0.0 {
            return 0;
        }
        self.credit = (self.credit + dt_secs * self.per_sec).min(self.cap);
        let n = self.credit.floor();
        self.credit -= n;
        n as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_ticks_give_the_exact_rate() {
        // 1024 pages/s (4 MiB/s) in 5 ms ticks for 10 s.
        let mut p = Pacer::new(1024.0, 0.5);
        let total: u64 = (0..2000).map(|_| p.take(0.005)).sum();
        assert!((total as i64 - 10240).abs() <= 1, "{total}");
    }

    #[test]
    fn fractional_rates_accumulate() {
        // 16 pages/s with 5 ms ticks: 0.08 per tick, still 16 per second.
        let mut p = Pacer::new(16.0, 0.5);
        let total: u64 = (0..200).map(|_| p.take(0.005)).sum();
        assert!((15..=16).contains(&total), "{total}");
        // Below one unit per second: 0.5/s gives 5 units in 10 s.
        let mut p = Pacer::new(0.5, 0.5);
        let total: u64 = (0..2000).map(|_| p.take(0.005)).sum();
        assert!((4..=5).contains(&total), "{total}");
    }

    #[test]
    fn uneven_ticks_keep_the_average() {
        let mut p = Pacer::new(1000.0, 0.5);
        let ticks = [0.001, 0.013, 0.004, 0.050, 0.002, 0.030];
        let mut total = 0;
        let mut t = 0.0;
        for _ in 0..100 {
            for dt in ticks {
                total += p.take(dt);
                t += dt;
            }
        }
        let expect = t * 1000.0;
        assert!((total as f64 - expect).abs() <= 1.0, "{total} vs {expect}");
    }

    #[test]
    fn a_stall_catches_up_at_most_the_burst() {
        let mut p = Pacer::new(1000.0, 0.5);
        assert_eq!(p.take(10.0), 500);
        assert_eq!(p.take(0.010), 10);
    }

    #[test]
    fn zero_or_bad_rates_do_nothing() {
        for r in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut p = Pacer::new(r, 0.5);
            assert_eq!(p.take(1.0), 0);
        }
        let mut p = Pacer::new(100.0, 0.5);
        assert_eq!(p.take(-1.0), 0);
        assert_eq!(p.take(f64::NAN), 0);
    }
}
