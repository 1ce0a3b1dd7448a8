//! Rate pacing below the bottleneck: the bulk stream sends just under the
//! path's rate, so the bottleneck queue it shares with post-copy fault answers
//! stays empty.
//!
//! An in-flight limit alone ([`super::pacing`]) cannot do this: any limit
//! above one bandwidth-delay product keeps the excess queued at the
//! bottleneck (at 40 Mbit/s, 5 ms a 2 × BDP limit kept ~28 kB there, and
//! every fault answer waited 5.6 ms behind it), and a limit at one BDP
//! starves the link whenever an ACK is late. A rate a little below the
//! bottleneck's keeps the link ~98.5 % busy with nothing queued (the kernel
//! paces each socket at `SO_MAX_PACING_RATE`, for any congestion control,
//! with its own high-resolution timer).
//!
//! The controller needs the bottleneck rate to within a percent or two, and
//! measures it the one way that is exact: while a queue stands at the
//! bottleneck the link never idles, so the bytes the peer acknowledges per
//! second *are* its rate. "A queue stands" is read from the kernel's
//! smoothed RTT against its minimum RTT (`TCP_INFO`).
//!
//! ```text
//!        pipe full (C := best rate)
//!   Startup ───────────────────────────▶ Drain ──(queue gone)──▶ Cruise
//!  (no rate cap)                          ▲  0.75 × C              │ 0.985 × C
//!                                         │                          │
//!         saturated window (C := rate) ───┴──── Probe ◀─(every 2 s)──┘
//!                                             1.05 × C
//!     (not saturated but faster: C := rate, keep probing;
//!      not faster: back to Cruise; C averages saturated windows)
//! ```
//!
//! - Windows: acknowledged bytes are counted over windows of
//!   `max(window_rtts × min_rtt, min_window)`. A window in which the smoothed
//!   RTT stayed `queue_saturated` above the minimum is *saturated*: its rate
//!   is the bottleneck's, `C`.
//!   One window's rate is noisy (±5 % over 20 ms at 40 Mbit/s), so `C` is
//!   an average over saturated windows.
//! - A queue that builds in Cruise (the link got slower, or other traffic
//!   joined) shows as a saturated window too: `C` follows it down, and the
//!   queue drains first.
//! - A probe window that delivered clearly more than `C` (by half the
//!   probe's margin) raises `C` without a queue: the link can do at least
//!   that, and the probe goes on at the new rate.
//!
//! Limitation (why [`super::pacing::PacingConfig`] leaves it off by
//! default): the queue signal is the RTT. On a host whose CPU is saturated,
//! ACKs are processed late, the RTT rises with no queue at the bottleneck,
//! and saturated windows measure what the CPU lets through; the pacing
//! rate then follows the CPU down (a migration of a TCG guest on two busy
//! cores overflowed most of its freeze into post-copy).

use std::time::{Duration, Instant};

use super::tcp::TcpInfo;

/// Readings may be this far apart (or one minimum RTT) without the window
/// losing its backlog.
const GAP: Duration = Duration::from_millis(5);

/// Startup's "still growing" factor per window ...
const STARTUP_GROWTH: f64 = 1.25;
/// ... and the windows without growth that end it.
const STARTUP_FLAT_WINDOWS: u32 = 3;

/// Tuning of the rate controller.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateConfig {
    /// Multiple of the bottleneck rate sent in steady state.
    pub cruise_gain: f64,
    /// Multiple sent while probing for more bandwidth.
    pub probe_gain: f64,
    /// Multiple sent while a queue drains.
    pub drain_gain: f64,
    /// Time in Cruise between probes.
    pub probe_every: Duration,
    /// Queueing delay (smoothed RTT above the minimum) that counts as a
    /// standing queue.
    /// (at least; or `1 / queue_rtt_fraction` of the minimum RTT if that is
    /// more: a long path's own jitter must not read as a queue),
    pub queue_saturated: Duration,
    /// See `queue_saturated`.
    pub queue_rtt_fraction: u32,
    /// Queueing delay below which a queue counts as drained.
    pub queue_drained: Duration,
    /// A measuring window is this many minimum RTTs ...
    pub window_rtts: u32,
    /// ... and at least this long.
    pub min_window: Duration,
    /// Windows a probe or a drain lasts at most.
    pub max_phase_windows: u32,
    /// Lowest bottleneck estimate, bytes/s.
    pub min_rate: u64,
    /// Weight of a new saturated measurement in the estimate (an
    /// exponentially weighted average: one window's rate is noisy).
    pub smoothing: f64,
}

impl Default for RateConfig {
    fn default() -> Self {
        RateConfig {
            cruise_gain: 0.985,
            probe_gain: 1.05,
            drain_gain: 0.75,
            probe_every: Duration::from_secs(2),
            queue_saturated: Duration::from_micros(1000),
            queue_rtt_fraction: 8,
            queue_drained: Duration::from_micros(500),
            window_rtts: 4,
            min_window: Duration::from_millis(20),
            max_phase_windows: 8,
            min_rate: 64_000,
            smoothing: 0.25,
        }
    }
}

/// What the controller is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// No estimate yet: no rate cap (the in-flight limit bounds the queue).
    Startup,
    /// Sending at `probe_gain × C` until a queue stands.
    Probe,
    /// Sending at `drain_gain × C` until the queue is gone.
    Drain,
    /// Sending at `cruise_gain × C`.
    Cruise,
}

/// Counters for reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RateStats {
    /// Current estimate of the bottleneck rate, bytes/s (0: none yet).
    pub bottleneck_bytes_per_s: u64,
    /// Windows measured.
    pub windows: u64,
    /// Of them, saturated (a queue stood throughout).
    pub saturated_windows: u64,
    /// Probes started.
    pub probes: u64,
    /// Drains started.
    pub drains: u64,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    /// The latest reading.
    last: Instant,
    acked: u64,
    /// Smallest smoothed RTT seen in the window, us.
    min_srtt_us: u32,
    /// The socket held unsent bytes at every reading: the sender was
    /// limited by the path or the pacing rate, never by the application,
    /// so ACKs (and RTT samples) kept coming.
    backlogged: bool,
}

impl Window {
    /// A window that starts with this reading.
    fn new(now: Instant, info: &TcpInfo, backlogged: bool) -> Self {
        Window {
            start: now,
            last: now,
            acked: info.bytes_acked,
            min_srtt_us: info.rtt,
            backlogged,
        }
    }
}

/// The rate controller of one bulk connection.
#[derive(Debug)]
pub struct RateControl {
    cfg: RateConfig,
    phase: Phase,
    phase_since: Instant,
    phase_windows: u32,
    window: Option<Window>,
    /// Bottleneck rate estimate, bytes/s.
    bottleneck: Option<f64>,
    /// In Probe: a queue has been seen.
    queued: bool,
    /// The last window ended with a queue standing throughout.
    queue_stood_before: bool,
    /// In Drain: when the queue is gone by the rates.
    drain_until: Option<Instant>,
    /// In Startup: the best window rate so far, bytes/s ...
    startup_best: f64,
    /// ... and the backlogged windows since it last grew by a quarter.
    startup_flat: u32,
    stats: RateStats,
}

impl RateControl {
    /// A controller in Startup.
    pub fn new(cfg: RateConfig, now: Instant) -> Self {
        RateControl {
            cfg,
            phase: Phase::Startup,
            phase_since: now,
            phase_windows: 0,
            window: None,
            bottleneck: None,
            queued: false,
            queue_stood_before: false,
            drain_until: None,
            startup_best: 0.0,
            startup_flat: 0,
            stats: RateStats::default(),
        }
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Counters so far.
    pub fn stats(&self) -> RateStats {
        RateStats {
            bottleneck_bytes_per_s: self.bottleneck().unwrap_or(0),
            ..self.stats
        }
    }

    /// The estimated bottleneck rate, bytes/s.
    pub fn bottleneck(&self) -> Option<u64> {
        self.bottleneck.map(|c| c as u64)
    }

    /// The pacing rate the socket should have, bytes/s (`None`: no cap).
    pub fn rate(&self) -> Option<u64> {
        let c = self.bottleneck?;
        let gain = match self.phase {
            Phase::Startup => return None,
            Phase::Probe => self.cfg.probe_gain,
            Phase::Drain => self.cfg.drain_gain,
            Phase::Cruise => self.cfg.cruise_gain,
        };
        Some((gain * c).max(1.0) as u64)
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        match phase {
            Phase::Probe => self.stats.probes += 1,
            Phase::Drain => self.stats.drains += 1,
            _ => {}
        }
        self.phase = phase;
        self.phase_since = now;
        self.phase_windows = 0;
        self.queued = false;
        self.drain_until = None;
        // A window never spans two rates.
        self.window = None;
    }

    /// Drains a queue of `queue_us` of delay: at `drain_gain × C` it is
    /// gone after `queue / (1 - drain_gain)`, seen one RTT later. (The
    /// smoothed RTT alone may never fall below `queue_drained`: at low
    /// rates the delayed ACK's wait for a second segment adds to it.)
    fn start_drain(&mut self, now: Instant, queue_us: u32, min_rtt: Duration) {
        self.enter(Phase::Drain, now);
        let queue = Duration::from_micros(u64::from(queue_us));
        let spare = (1.0 - self.cfg.drain_gain).max(0.05);
        self.drain_until = Some(now + queue.div_f64(spare) + min_rtt);
    }

    fn window_length(&self, min_rtt: Duration) -> Duration {
        (min_rtt * self.cfg.window_rtts).max(self.cfg.min_window)
    }

    /// Feeds one `TCP_INFO` reading of the bulk socket. `waiting`: the
    /// sender holds data it has not given the socket yet (it is limited by
    /// the pacing, not by the application).
    pub fn observe(&mut self, info: &TcpInfo, now: Instant, waiting: bool) {
        if info.min_rtt == 0 || info.rtt == 0 {
            return;
        }
        let min_rtt = Duration::from_micros(u64::from(info.min_rtt));
        let queue_us = info.rtt.saturating_sub(info.min_rtt);
        let saturation = self
            .cfg
            .queue_saturated
            .max(min_rtt / self.cfg.queue_rtt_fraction.max(1));
        let drained = self.cfg.queue_drained.max(saturation / 2);
        let saturated_now = u128::from(queue_us) >= saturation.as_micros();
        let drained_now = u128::from(queue_us) <= drained.as_micros();

        if self.phase == Phase::Probe && saturated_now && !self.queued {
            // The queue stands from now on: measure from here, so that the
            // saturated window holds none of the probe's first RTTs, and the
            // probe leaves at most `queue_saturated + (probe_gain - 1) ×
            // window` queued.
            self.queued = true;
            self.window = None;
        }
        let drain_over = self.drain_until.is_some_and(|t| now >= t);
        if self.phase == Phase::Drain && (drained_now || drain_over) {
            self.enter(Phase::Cruise, now);
        }
        if self.phase == Phase::Cruise
            && now.duration_since(self.phase_since) >= self.cfg.probe_every
        {
            self.enter(Phase::Probe, now);
        }

        // Startup tests for a full pipe every round trip, as BBR does: its
        // queue (up to the in-flight limit's excess) lasts a few RTTs.
        let length = if self.phase == Phase::Startup {
            min_rtt.max(GAP)
        } else {
            self.window_length(min_rtt)
        };
        let backlogged = waiting || info.notsent_bytes > 0;
        let w = self
            .window
            .get_or_insert_with(|| Window::new(now, info, backlogged));
        w.min_srtt_us = w.min_srtt_us.min(info.rtt);
        // A gap between readings longer than the RTT: the sender may have
        // run dry in it.
        w.backlogged &= backlogged && now.saturating_duration_since(w.last) <= min_rtt.max(GAP);
        w.last = now;
        let elapsed = now.saturating_duration_since(w.start);
        if elapsed < length {
            return;
        }
        let w = *w;
        let rate = info.bytes_acked.saturating_sub(w.acked) as f64 / elapsed.as_secs_f64();
        let queue_stood = w.backlogged
            && u128::from(w.min_srtt_us.saturating_sub(info.min_rtt)) >= saturation.as_micros();
        // While draining, a queue is expected and says nothing new; in
        // Startup the smoothed RTT still carries the handshake's samples; in
        // Cruise a queue must stand for two windows (a scheduling hiccup on
        // a busy host looks like one window's queue).
        let saturated = queue_stood
            && match self.phase {
                Phase::Probe => true,
                Phase::Cruise => self.queue_stood_before,
                Phase::Startup | Phase::Drain => false,
            };
        self.queue_stood_before = queue_stood;
        self.window = Some(Window::new(now, info, backlogged));
        self.stats.windows += 1;
        self.phase_windows += 1;
        if self.phase == Phase::Startup {
            // Until the pipe is full (BBR's test: three backlogged windows
            // that do not raise the best rate by a quarter), the best rate
            // is the estimate.
            if w.backlogged {
                if rate > self.startup_best * STARTUP_GROWTH {
                    self.startup_flat = 0;
                } else {
                    self.startup_flat += 1;
                }
                self.startup_best = self.startup_best.max(rate);
                if self.startup_flat >= STARTUP_FLAT_WINDOWS {
                    self.bottleneck = Some(self.startup_best.max(self.cfg.min_rate as f64));
                    self.start_drain(now, queue_us, min_rtt);
                }
            }
            return;
        }
        // Faster than thought while probing: by at least half the probe's
        // margin, so that measurement noise (±5 % over 20 ms) never ratchets
        // the estimate up.
        let faster = self.phase == Phase::Probe
            && self
                .bottleneck
                .is_some_and(|c| rate > c * (1.0 + (self.cfg.probe_gain - 1.0) / 2.0));
        if saturated {
            self.stats.saturated_windows += 1;
            // Averaged over measurements, at most halved per window, never
            // below `min_rate`: a measurement that collapses is more likely
            // a stall than a link that lost most of its capacity within one
            // window.
            let c = self.bottleneck.unwrap_or(rate);
            let c = (c + (rate - c) * self.cfg.smoothing).max(c / 2.0);
            self.bottleneck = Some(c.max(self.cfg.min_rate as f64));
        } else if faster {
            self.bottleneck = Some(rate);
        }
        match self.phase {
            Phase::Cruise | Phase::Probe if saturated => self.start_drain(now, queue_us, min_rtt),
            Phase::Probe if faster && self.phase_windows < self.cfg.max_phase_windows => {
                // More bandwidth than thought: keep probing at the new rate.
                self.phase_windows = 0;
                self.window = None;
            }
            Phase::Probe | Phase::Drain if self.phase_windows >= self.cfg.max_phase_windows => {
                self.enter(Phase::Cruise, now)
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A path of `rate` bytes/s and `min_rtt`: feeds the controller readings
    /// every millisecond, with `queue_us` of queueing delay, and returns the
    /// time after the run.
    struct Path {
        now: Instant,
        acked: u64,
    }

    impl Path {
        fn new() -> Self {
            Path {
                now: Instant::now(),
                acked: 0,
            }
        }

        /// Runs for `ms` milliseconds, delivering at `min(send rate, link)`
        /// and reporting a queue whenever the sender's rate exceeds the link.
        fn run(&mut self, rc: &mut RateControl, link: f64, ms: u64) {
            for _ in 0..ms {
                let sending = rc.rate().map_or(f64::INFINITY, |r| r as f64);
                let delivered = sending.min(link);
                let queue_us = if sending > link { 3000 } else { 100 };
                self.now += Duration::from_millis(1);
                self.acked += (delivered / 1000.0) as u64;
                rc.observe(
                    &TcpInfo {
                        rtt: 5000 + queue_us,
                        min_rtt: 5000,
                        bytes_acked: self.acked,
                        ..Default::default()
                    },
                    self.now,
                    true,
                );
            }
        }
    }

    fn near(a: u64, b: f64, tol: f64) -> bool {
        (a as f64 - b).abs() <= tol * b
    }

    #[test]
    fn startup_measures_the_link_once_the_pipe_is_full_and_cruise_stays_below_it() {
        let cfg = RateConfig::default();
        let mut rc = RateControl::new(cfg, Instant::now());
        let mut p = Path::new();
        assert_eq!(rc.rate(), None, "no cap before an estimate");
        // Four one-RTT windows: the first sets the best rate, three add
        // nothing.
        p.run(&mut rc, 5_000_000.0, 18);
        assert_eq!(rc.phase(), Phase::Startup);
        p.run(&mut rc, 5_000_000.0, 5);
        assert!(
            near(rc.bottleneck().unwrap(), 5e6, 0.01),
            "{:?}",
            rc.bottleneck()
        );
        p.run(&mut rc, 5_000_000.0, 100);
        assert_eq!(rc.phase(), Phase::Cruise);
        assert!(near(rc.rate().unwrap(), cfg.cruise_gain * 5e6, 0.01));
    }

    #[test]
    fn probes_find_a_faster_link_and_queues_find_a_slower_one() {
        let cfg = RateConfig::default();
        let mut rc = RateControl::new(cfg, Instant::now());
        let mut p = Path::new();
        p.run(&mut rc, 5_000_000.0, 500);
        assert!(near(rc.bottleneck().unwrap(), 5e6, 0.01));
        // The link doubles: probes raise the estimate step by step.
        p.run(&mut rc, 10_000_000.0, 10_000);
        assert!(
            near(rc.bottleneck().unwrap(), 10e6, 0.02),
            "{:?}",
            rc.bottleneck()
        );
        assert!(rc.stats().probes >= 3);
        // The link halves: queues in Cruise measure it within a few cycles.
        // (It stops once Cruise no longer builds a queue: within 3 %.)
        p.run(&mut rc, 5_000_000.0, 1000);
        assert!(
            near(rc.bottleneck().unwrap(), 5e6, 0.03),
            "{:?}",
            rc.bottleneck()
        );
        assert!(rc.stats().drains >= 2);
        p.run(&mut rc, 5_000_000.0, 200);
        assert!(rc.rate().unwrap() < 5_000_000);
    }

    #[test]
    fn an_application_limited_sender_keeps_its_estimate() {
        let cfg = RateConfig::default();
        let mut rc = RateControl::new(cfg, Instant::now());
        let mut p = Path::new();
        p.run(&mut rc, 5_000_000.0, 500);
        let before = rc.bottleneck().unwrap();
        // Nothing to send for 5 s: windows deliver nothing, no queue.
        let now = p.now;
        for i in 1..=5000 {
            rc.observe(
                &TcpInfo {
                    rtt: 5100,
                    min_rtt: 5000,
                    bytes_acked: p.acked,
                    ..Default::default()
                },
                now + Duration::from_millis(i),
                false,
            );
        }
        assert_eq!(rc.bottleneck(), Some(before));
        assert_ne!(rc.phase(), Phase::Drain);
    }

    #[test]
    fn a_stale_rtt_without_acks_never_collapses_the_rate() {
        // The regression seen on the emulated WAN: the smoothed RTT only
        // moves with ACKs; a rate so low that ACKs stop left it high, every
        // window read as saturated at a lower rate, and the rate fell to
        // 8 bit/s.
        let cfg = RateConfig::default();
        let mut rc = RateControl::new(cfg, Instant::now());
        let mut p = Path::new();
        p.run(&mut rc, 5_000_000.0, 500);
        let now = p.now;
        for i in 1..=2000 {
            rc.observe(
                &TcpInfo {
                    rtt: 11_000,
                    min_rtt: 5000,
                    bytes_acked: p.acked + i,
                    ..Default::default()
                },
                now + Duration::from_millis(i),
                i % 7 != 0,
            );
        }
        assert!(rc.rate().unwrap() > 1_000_000, "{:?}", rc.rate());
        // Even with a backlog, one window can at most halve the estimate,
        // and the estimate has a floor.
        let before = rc.bottleneck().unwrap();
        let now = now + Duration::from_secs(3);
        for i in 1..=40 {
            rc.observe(
                &TcpInfo {
                    rtt: 11_000,
                    min_rtt: 5000,
                    bytes_acked: p.acked + 3000,
                    ..Default::default()
                },
                now + Duration::from_millis(i),
                true,
            );
        }
        let after = rc.bottleneck().unwrap();
        assert!(
            after >= before / 2 && after >= cfg.min_rate,
            "{before} -> {after}"
        );
    }
}
