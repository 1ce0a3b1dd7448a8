//! Bulk pacing: keep the bulk connection's unacknowledged bytes near the
//! bandwidth-delay product, so the bottleneck queue stays short and a
//! post-copy fault on the other connection never waits behind a deep backlog.
//!
//! TCP alone fills whatever buffer the path offers (a `tbf` queue, a router's
//! buffer) before it backs off, and every byte queued there delays the fault
//! connection's packets too. The pacer bounds the bytes the sender lets into the
//! socket (`SIOCOUTQ`: unsent + unacknowledged) to
//!
//! ```text
//! limit = clamp(gain × max_delivery_rate × min_rtt, floor, ceiling)
//! ```
//!
//! where `max_delivery_rate` is a windowed maximum of the kernel's own
//! delivery-rate samples (`TCP_INFO.tcpi_delivery_rate`) and `min_rtt` is
//! `tcpi_min_rtt`: the estimator BBR uses. With `gain > 1` the connection can
//! still discover more bandwidth (each RTT may deliver up to `gain` × the current
//! estimate), and at most `(gain - 1) × BDP` can sit in the bottleneck queue.
//! Before the first samples the limit is `initial`.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use super::rate::{RateConfig, RateControl, RateStats};
use super::tcp::TcpInfo;

/// Tuning of the bulk pacer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PacingConfig {
    /// Multiple of the estimated BDP allowed in flight.
    pub gain: f64,
    /// Smallest in-flight limit, bytes (keeps short-RTT links busy despite
    /// delayed ACKs).
    pub floor: usize,
    /// Largest in-flight limit, bytes.
    pub ceiling: usize,
    /// In-flight limit before the first bandwidth and RTT samples.
    pub initial: usize,
    /// Window of the delivery-rate maximum filter.
    pub bandwidth_window: Duration,
    /// Do not submit sends smaller than this unless they finish a buffer.
    pub min_send: usize,
    /// Rate pacing just below the bottleneck ([`super::rate`]); `None`
    /// leaves the in-flight limit alone in charge. Off by default: its
    /// queue signal is the RTT, and on a host whose CPU is saturated (the
    /// test machines run TCG guests on two cores) late ACKs read as a
    /// queue and the measured rate falls with the CPU: a full-suite
    /// migration with S = 1 then overflowed 41 of 61 freeze chunks into
    /// post-copy. `wanmig migrate --rate-pacing` and the link benchmark
    /// turn it on.
    pub rate: Option<RateConfig>,
}

impl Default for PacingConfig {
    fn default() -> Self {
        PacingConfig {
            gain: 2.0,
            // Measured on the emulated 40 Mbit/s, 5 ms WAN (BDP 25 kB): a
            // 64 KiB floor left ~40 kB queued at the bottleneck (fault round
            // trip p50 11.8 ms against 5.0 ms idle); 16 KiB lets 2 × BDP
            // rule (8.7 ms) at the same goodput. A gain below 2 starves
            // the bandwidth estimate (1.25 halved the goodput).
            floor: 16 << 10,
            ceiling: 64 << 20,
            initial: 256 << 10,
            bandwidth_window: Duration::from_secs(2),
            min_send: 16 << 10,
            rate: None,
        }
    }
}

/// A maximum over a sliding time window (monotonic deque, amortised O(1)).
#[derive(Debug, Default)]
struct WindowedMax {
    samples: VecDeque<(Instant, u64)>,
}

impl WindowedMax {
    fn push(&mut self, now: Instant, v: u64, window: Duration) {
        while self.samples.back().is_some_and(|&(_, b)| b <= v) {
            self.samples.pop_back();
        }
        self.samples.push_back((now, v));
        while self
            .samples
            .front()
            .is_some_and(|&(t, _)| now.saturating_duration_since(t) > window)
        {
            self.samples.pop_front();
        }
    }

    fn get(&self) -> Option<u64> {
        self.samples.front().map(|&(_, v)| v)
    }
}

/// Decides how many more bulk bytes may enter the socket.
#[derive(Debug)]
pub struct Pacer {
    cfg: Option<PacingConfig>,
    bandwidth: WindowedMax,
    min_rtt: Option<Duration>,
    rate: Option<RateControl>,
}

impl Pacer {
    /// A pacer with the given tuning.
    pub fn new(cfg: PacingConfig) -> Self {
        Pacer {
            cfg: Some(cfg),
            bandwidth: WindowedMax::default(),
            min_rtt: None,
            rate: cfg.rate.map(|r| RateControl::new(r, Instant::now())),
        }
    }

    /// A pacer that never holds data back.
    pub fn disabled() -> Self {
        Pacer {
            cfg: None,
            bandwidth: WindowedMax::default(),
            min_rtt: None,
            rate: None,
        }
    }

    /// Whether pacing is on.
    pub fn enabled(&self) -> bool {
        self.cfg.is_some()
    }

    /// Feeds one `TCP_INFO` reading, taken while the sender holds data the
    /// socket has not been given yet.
    pub fn observe(&mut self, info: &TcpInfo, now: Instant) {
        let Some(cfg) = self.cfg else { return };
        if info.delivery_rate > 0 {
            // An application-limited sample under-states the path; BBR keeps
            // it only when it raises the estimate, which the max filter does.
            let keep = !info.delivery_rate_app_limited()
                || self.bandwidth.get().is_none_or(|m| info.delivery_rate > m);
            if keep {
                self.bandwidth
                    .push(now, info.delivery_rate, cfg.bandwidth_window);
            }
        }
        if info.min_rtt > 0 {
            self.min_rtt = Some(Duration::from_micros(u64::from(info.min_rtt)));
        }
        if let Some(rate) = &mut self.rate {
            rate.observe(info, now, true);
        }
    }

    /// Estimated bottleneck bandwidth, bytes/s: the larger of the maximum
    /// delivery rate and the rate controller's measurement (which a CPU
    /// hiccup on a busy host can pull below what the path does; the
    /// engine's freeze estimate and the in-flight limit must not shrink
    /// with it).
    pub fn bandwidth(&self) -> Option<u64> {
        let measured = self.rate.as_ref().and_then(RateControl::bottleneck);
        match (self.bandwidth.get(), measured) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// The bandwidth the in-flight limit is sized by: the rate controller's
    /// measurement once it has one (the maximum delivery rate over-states
    /// the path by several per cent), else the maximum delivery rate.
    fn limit_bandwidth(&self) -> Option<u64> {
        self.rate
            .as_ref()
            .and_then(RateControl::bottleneck)
            .or_else(|| self.bandwidth.get())
    }

    /// The pacing rate the socket should have, bytes/s (`None`: uncapped).
    pub fn pacing_rate(&self) -> Option<u64> {
        self.rate.as_ref().and_then(RateControl::rate)
    }

    /// The rate controller's counters (`None` when rate pacing is off).
    pub fn rate_stats(&self) -> Option<RateStats> {
        self.rate.as_ref().map(RateControl::stats)
    }

    /// Turns rate pacing off (the kernel refused the pacing rate).
    pub fn disable_rate(&mut self) {
        self.rate = None;
    }

    /// Minimum RTT seen.
    pub fn min_rtt(&self) -> Option<Duration> {
        self.min_rtt
    }

    /// The current in-flight limit in bytes (`usize::MAX` when disabled).
    pub fn limit(&self) -> usize {
        let Some(cfg) = self.cfg else {
            return usize::MAX;
        };
        match (self.limit_bandwidth(), self.min_rtt) {
            (Some(bw), Some(rtt)) => {
                let bdp = bw as f64 * rtt.as_secs_f64();
                let l = (cfg.gain * bdp) as usize;
                l.clamp(cfg.floor, cfg.ceiling)
            }
            _ => cfg.initial.clamp(cfg.floor, cfg.ceiling),
        }
    }

    /// Bytes that may be submitted now, given `outq` bytes already in the
    /// socket; 0 means wait.
    pub fn allowance(&self, outq: usize) -> usize {
        if self.cfg.is_none() {
            return usize::MAX;
        }
        let room = self.limit().saturating_sub(outq);
        if room < self.min_send() { 0 } else { room }
    }

    /// Bytes that must still drain from a socket holding `outq` before the
    /// next send is allowed.
    pub fn deficit(&self, outq: usize) -> usize {
        (outq + self.min_send()).saturating_sub(self.limit())
    }

    /// Smallest send worth submitting: the configured size, but at most a
    /// quarter of the limit, so a small bandwidth-delay product is refilled
    /// in steps small enough to keep it full.
    pub fn min_send(&self) -> usize {
        self.cfg
            .map_or(1, |c| c.min_send.min((self.limit() / 4).max(4096)))
    }

    /// How long to wait before checking again when `deficit` more bytes must
    /// drain: the time the estimated bandwidth needs, bounded.
    pub fn wait_hint(&self, deficit: usize) -> Duration {
        let floor = Duration::from_micros(50);
        let cap = self
            .min_rtt
            .map_or(Duration::from_millis(2), |r| r / 2)
            .clamp(floor, Duration::from_millis(20));
        match self.limit_bandwidth() {
            Some(bw) if bw > 0 => {
                Duration::from_secs_f64(deficit as f64 / bw as f64).clamp(floor, cap)
            }
            _ => cap,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rate: u64, min_rtt_us: u32, app_limited: bool) -> TcpInfo {
        TcpInfo {
            delivery_rate: rate,
            min_rtt: min_rtt_us,
            app_limited_bits: u8::from(app_limited),
            ..Default::default()
        }
    }

    #[test]
    fn limit_is_gain_times_bdp_within_bounds() {
        let cfg = PacingConfig::default();
        let mut p = Pacer::new(cfg);
        assert_eq!(p.limit(), cfg.initial);
        let t = Instant::now();
        // 40 Mbit/s = 5 MB/s, 50 ms: BDP 250 kB, limit 500 kB.
        p.observe(&info(5_000_000, 50_000, false), t);
        assert_eq!(p.limit(), 500_000);
        // 1 ms: BDP 5 kB, gain 2 = 10 kB < floor.
        let mut q = Pacer::new(cfg);
        q.observe(&info(5_000_000, 1_000, false), t);
        assert_eq!(q.limit(), cfg.floor);
        // A 16 KiB limit is refilled in 4 KiB steps.
        assert_eq!(q.min_send(), 4096);
        assert_eq!(q.allowance(cfg.floor), 0);
        assert_eq!(q.allowance(cfg.floor - 4095), 0);
        assert_eq!(q.allowance(cfg.floor - 4096), 4096);
        assert_eq!(q.deficit(cfg.floor), 4096);
        assert_eq!(q.deficit(0), 0);
        // A large limit keeps the configured step.
        assert_eq!(p.min_send(), cfg.min_send);
    }

    #[test]
    fn app_limited_samples_only_raise_the_estimate() {
        let mut p = Pacer::new(PacingConfig::default());
        let t = Instant::now();
        p.observe(&info(5_000_000, 5_000, false), t);
        p.observe(&info(1_000_000, 5_000, true), t);
        assert_eq!(p.bandwidth(), Some(5_000_000));
        p.observe(&info(6_000_000, 5_000, true), t);
        assert_eq!(p.bandwidth(), Some(6_000_000));
    }

    #[test]
    fn the_bandwidth_estimate_forgets_old_maxima() {
        let cfg = PacingConfig::default();
        let mut p = Pacer::new(cfg);
        let t = Instant::now();
        p.observe(&info(10_000_000, 5_000, false), t);
        p.observe(&info(5_000_000, 5_000, false), t + cfg.bandwidth_window / 2);
        assert_eq!(p.bandwidth(), Some(10_000_000));
        // The link got slower: once the old maximum leaves the window, the
        // estimate follows.
        p.observe(
            &info(5_000_000, 5_000, false),
            t + cfg.bandwidth_window + Duration::from_millis(1),
        );
        assert_eq!(p.bandwidth(), Some(5_000_000));
    }

    #[test]
    fn disabled_pacer_never_holds_back() {
        let p = Pacer::disabled();
        assert_eq!(p.allowance(usize::MAX / 2), usize::MAX);
        assert!(!p.enabled());
    }

    #[test]
    fn wait_hint_is_drain_time_bounded() {
        let mut p = Pacer::new(PacingConfig::default());
        p.observe(&info(5_000_000, 10_000, false), Instant::now());
        assert_eq!(p.wait_hint(5_000), Duration::from_millis(1));
        assert_eq!(p.wait_hint(50_000_000), Duration::from_millis(5));
        assert_eq!(p.wait_hint(1), Duration::from_micros(50));
    }
}
