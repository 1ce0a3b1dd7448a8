//! `wanmig-planner serve`: publish the plan, follow the engine's telemetry,
//! re-plan when reality departs from the assumptions.
//!
//! **Re-plan rule.** On each new telemetry sample (its `updated_unix_ns`
//! changed) from an engine that is idle or in pre-copy (from the freeze on,
//! the plan can no longer change), at most once per
//! [`ReplanPolicy::min_interval`]:
//!
//! - *bandwidth*: the measured bandwidth `B_m > 0` departs from the planned
//!   `B` by more than 20 %: `|B_m / B - 1| > 0.20`. The new plan assumes `B_m`.
//! - *dirty rate*: the engine applies the current generation, is in
//!   pre-copy, and reports a completed round `k` of measured duration `t_k`
//!   with `d` dirty bytes (dirty pages x page size + dirty chunks x chunk
//!   size). The model's expectation `E(t_k)` for that round (what the model
//!   says round `k` sent, dirtied over `t_k`) departs by more than 25 %:
//!   `|d - E| > 0.25 max(E, 1 MiB)` (the floor keeps a handful of pages from
//!   triggering). The new plan multiplies every write rate by the factor
//!   `f` that makes the model reproduce `d` for that round (bisection; `E`
//!   increases with `f`).
//!
//! When either fires, the measured RTT (if reported) is adopted too, the
//! whole search is re-run and the plan is published as the next generation.
//! The engine applies a new generation at its next round boundary. A
//! re-plan that fails (for example because the profile file was truncated
//! under the planner, or its rules no longer resolve) is reported and the
//! previous generation stays published; telemetry that cannot be read (the
//! engine died or is stuck mid-update) is reported and skipped. The model
//! the plan was made with is kept (shared) for the dirty-rate comparison.
//!
//! Limitation: a re-plan starts from the profile as if the
//! migration had not begun, with corrected link and write rates; it does not
//! model what the engine has already transferred. The rules it publishes
//! are still valid rank cuts, so the engine can switch sets between rounds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::model::{Link, ModelError, ModelParams};
use crate::plan::{Plan, PlanError, make_plan};
use crate::profile::{ClassProfile, Profile};
use crate::search::SearchOptions;
use crate::segment::{Phase, PlanSnapshot, Segment, SegmentError};

/// When to re-plan.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReplanPolicy {
    /// Relative bandwidth departure that triggers a re-plan (default 0.20).
    pub bandwidth_threshold: f64,
    /// Relative dirty-rate departure that triggers a re-plan (default 0.25).
    pub dirty_threshold: f64,
    /// Floor of the dirty comparison's denominator, bytes (default 1 MiB).
    pub dirty_floor_bytes: f64,
    /// Minimum time between re-plans (default 1 s).
    pub min_interval: Duration,
}

impl Default for ReplanPolicy {
    fn default() -> Self {
        ReplanPolicy {
            bandwidth_threshold: 0.20,
            dirty_threshold: 0.25,
            dirty_floor_bytes: 1024.0 * 1024.0,
            min_interval: Duration::from_secs(1),
        }
    }
}

/// Why a re-plan happened.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "trigger")]
pub enum ReplanReason {
    /// Measured bandwidth departed from the planned one.
    Bandwidth {
        /// Planned, bytes/s.
        planned: f64,
        /// Measured, bytes/s.
        measured: f64,
    },
    /// Measured dirty bytes of a round departed from the model's.
    DirtyRate {
        /// The round.
        round: u64,
        /// Its measured duration (s).
        duration_s: f64,
        /// Model's expectation, bytes.
        expected: f64,
        /// Measured, bytes.
        measured: f64,
        /// Fitted write-rate factor.
        factor: f64,
    },
}

/// A re-plan that was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplanEvent {
    /// The new generation.
    pub generation: u64,
    /// What triggered it.
    pub reasons: Vec<ReplanReason>,
    /// The new link assumption.
    pub link: Link,
    /// The new write-rate multiplier.
    pub write_scale: f64,
    /// The new plan's `M`.
    pub m: f64,
    /// The new plan's `S`.
    pub s: f64,
    /// The new plan's `Gamma`.
    pub gamma: f64,
}

/// Serve errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// Planning failed (for a re-plan: the previous generation stays
    /// published).
    #[error(transparent)]
    Plan(#[from] PlanError),
    /// Building the model failed.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading telemetry or publishing the plan failed.
    #[error(transparent)]
    Segment(#[from] SegmentError),
}

/// The serving planner: owns the current plan (and its model).
#[derive(Debug)]
pub struct Server<'a> {
    classes: &'a ClassProfile,
    units: Option<&'a Profile>,
    segment: &'a Segment,
    params: ModelParams,
    search: SearchOptions,
    policy: ReplanPolicy,
    plan: Plan,
    generation: u64,
    last_update: u64,
    last_replan: Option<Instant>,
}

impl<'a> Server<'a> {
    /// Plans for `link` and publishes the first generation.
    pub fn start(
        classes: &'a ClassProfile,
        units: Option<&'a Profile>,
        segment: &'a Segment,
        link: Link,
        params: ModelParams,
        search: SearchOptions,
        policy: ReplanPolicy,
    ) -> Result<Server<'a>, ServeError> {
        let plan = make_plan(classes, units, link, params, &search)?;
        let generation = segment.publish_plan(&PlanSnapshot::from_plan(&plan))?;
        Ok(Server {
            classes,
            units,
            segment,
            params,
            search,
            policy,
            plan,
            generation,
            last_update: 0,
            last_replan: None,
        })
    }

    /// The current generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The current plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Reads telemetry once and re-plans if the rule says so. An error
    /// leaves the published plan as it was (a failed re-plan is not retried
    /// before [`ReplanPolicy::min_interval`]).
    pub fn poll(&mut self) -> Result<Option<ReplanEvent>, ServeError> {
        let Some(t) = self.segment.read_telemetry()? else {
            return Ok(None);
        };
        if t.updated_unix_ns == self.last_update {
            return Ok(None);
        }
        if self
            .last_replan
            .is_some_and(|at| at.elapsed() < self.policy.min_interval)
        {
            // Not consumed: looked at again once the interval has passed.
            return Ok(None);
        }
        self.last_update = t.updated_unix_ns;
        if !matches!(t.phase, Phase::Idle | Phase::Precopy) {
            // From the freeze on, (M, S) can no longer change.
            return Ok(None);
        }
        let mut link = self.plan.link;
        let mut params = self.params;
        let mut reasons = Vec::new();
        if t.bandwidth_bps > 0 {
            let measured = t.bandwidth_bps as f64 / 8.0;
            if (measured / link.bandwidth - 1.0).abs() > self.policy.bandwidth_threshold {
                reasons.push(ReplanReason::Bandwidth {
                    planned: link.bandwidth,
                    measured,
                });
                link = link.scaled(measured / link.bandwidth);
            }
        }
        if t.phase == Phase::Precopy
            && t.last_round_duration_ns > 0
            && t.plan_generation == self.generation
        {
            let model = &self.plan.model;
            let sel = model.selection(self.plan.search.chosen.m, self.plan.search.chosen.s);
            let curve = model.round_dirty(sel);
            let duration = t.last_round_duration_ns as f64 * 1e-9;
            let expected = curve.bytes(duration, 1.0);
            // In link bytes, as the model counts them (dirty units are
            // written ones).
            let wire = model.link().wire;
            let measured =
                t.dirty_pages_last_round as f64 * self.classes.page_size as f64 * wire.page_written
                    + t.dirty_chunks_last_round as f64
                        * self.classes.chunk_size as f64
                        * wire.chunk_written;
            let scale = expected.max(self.policy.dirty_floor_bytes);
            if (measured - expected).abs() > self.policy.dirty_threshold * scale {
                let factor = curve.fit_factor(duration, measured);
                params.write_scale *= factor;
                reasons.push(ReplanReason::DirtyRate {
                    round: t.last_round,
                    duration_s: duration,
                    expected,
                    measured,
                    factor,
                });
            }
        }
        if reasons.is_empty() {
            return Ok(None);
        }
        if t.rtt_ns > 0 {
            link.rtt = t.rtt_ns as f64 * 1e-9;
        }
        self.last_replan = Some(Instant::now());
        let plan = make_plan(self.classes, self.units, link, params, &self.search)?;
        self.generation = self.segment.publish_plan(&PlanSnapshot::from_plan(&plan))?;
        self.params = params;
        self.plan = plan;
        Ok(Some(ReplanEvent {
            generation: self.generation,
            reasons,
            link,
            write_scale: params.write_scale,
            m: self.plan.search.chosen.m,
            s: self.plan.search.chosen.s,
            gamma: self.plan.prediction.gamma,
        }))
    }

    /// Polls every `interval` until `stop` is set, reporting re-plans and
    /// errors (which do not stop the loop: the last good plan stays
    /// published).
    pub fn run(
        &mut self,
        stop: &AtomicBool,
        interval: Duration,
        mut on_event: impl FnMut(Result<&ReplanEvent, &ServeError>),
    ) {
        while !stop.load(Ordering::Relaxed) {
            match self.poll() {
                Ok(Some(e)) => on_event(Ok(&e)),
                Ok(None) => {}
                Err(e) => on_event(Err(&e)),
            }
            std::thread::sleep(interval);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::model::Model;
    use crate::segment::Telemetry;
    use crate::synth::{SynthConfig, Workload, write_profile};

    fn temp_name(tag: &str) -> String {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir()
            .join(format!("wanmig-serve-{tag}-{}-{n}", std::process::id()))
            .to_string_lossy()
            .into_owned()
    }

    fn guest() -> (ClassProfile, Profile) {
        let cfg = SynthConfig::new(256 << 20, 1 << 30, Workload::MemoryHeavy);
        let p = Profile::from_bytes(write_profile(&cfg, Vec::new()).unwrap()).unwrap();
        (ClassProfile::from_profile(&p).unwrap(), p)
    }

    const LINK: Link = Link {
        bandwidth: 40e6 / 8.0,
        rtt: 0.005,
        wire: crate::model::WireCost::ONE,
    };

    fn policy() -> ReplanPolicy {
        ReplanPolicy {
            min_interval: Duration::ZERO,
            ..ReplanPolicy::default()
        }
    }

    fn now_ns(offset: u64) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            + offset
    }

    #[test]
    fn bandwidth_departure_triggers_a_new_generation() {
        let (classes, units) = guest();
        let name = temp_name("bw");
        let seg = Segment::create(&name).unwrap();
        let mut server = Server::start(
            &classes,
            Some(&units),
            &seg,
            LINK,
            ModelParams::default(),
            SearchOptions { threads: 1 },
            policy(),
        )
        .unwrap();
        let engine = Segment::open(&name).unwrap();
        let first = engine.read_plan().unwrap().unwrap();
        assert_eq!(first.generation, 1);
        assert!(first.page_rule.is_resolved() && first.chunk_rule.is_resolved());
        assert_eq!(server.poll().unwrap(), None, "no telemetry yet");

        // Within 20 %: no re-plan.
        let mut t = Telemetry {
            phase: Phase::Precopy,
            plan_generation: 1,
            bandwidth_bps: 46_000_000,
            updated_unix_ns: now_ns(0),
            ..Telemetry::default()
        };
        engine.publish_telemetry(&t).unwrap();
        assert_eq!(server.poll().unwrap(), None);

        // Twice the planned bandwidth, but already in post-copy: too late.
        let late = Telemetry {
            phase: Phase::Postcopy,
            bandwidth_bps: 80_000_000,
            updated_unix_ns: now_ns(3),
            ..t
        };
        engine.publish_telemetry(&late).unwrap();
        assert_eq!(server.poll().unwrap(), None);

        // Twice the planned bandwidth in pre-copy, and a measured RTT.
        t.bandwidth_bps = 80_000_000;
        t.rtt_ns = 7_000_000;
        t.updated_unix_ns = now_ns(5);
        engine.publish_telemetry(&t).unwrap();
        let e = server.poll().unwrap().expect("re-plan");
        assert_eq!(e.generation, 2);
        assert!(
            matches!(e.reasons[..], [ReplanReason::Bandwidth { measured, .. }] if measured == 10e6)
        );
        let second = engine.read_plan().unwrap().unwrap();
        assert_eq!(second.generation, 2);
        assert_eq!(
            second.link,
            Link {
                bandwidth: 10e6,
                rtt: 0.007,
                wire: crate::model::WireCost::ONE,
            }
        );
        assert!(second.predicted.gamma >= first.predicted.gamma);
        // The same sample is not acted on twice.
        assert_eq!(server.poll().unwrap(), None);
    }

    /// Each page's own read rate: this test's plan is about writes.
    fn per_page_reads() -> ModelParams {
        ModelParams {
            pool_reads: false,
            ..ModelParams::default()
        }
    }

    #[test]
    fn dirty_rate_departure_rescales_the_write_rates() {
        let (classes, units) = guest();
        let name = temp_name("dirty");
        let seg = Segment::create(&name).unwrap();
        let mut server = Server::start(
            &classes,
            Some(&units),
            &seg,
            LINK,
            per_page_reads(),
            SearchOptions { threads: 1 },
            policy(),
        )
        .unwrap();
        let engine = Segment::open(&name).unwrap();
        let plan = server.plan().clone();
        let round0 = plan.prediction.rounds[0];
        assert!(round0.dirty_bytes > 4.0 * 1024.0 * 1024.0, "{round0:?}");
        // A round a quarter as long as round 0: it dirties well below what
        // scaled-up write rates could (every written unit of the set).
        let duration = round0.duration_s / 4.0;
        let page = classes.page_size as f64;
        let telemetry = |dirty_bytes: f64, generation: u64, offset: u64| Telemetry {
            phase: Phase::Precopy,
            round: 1,
            plan_generation: generation,
            last_round: 0,
            last_round_duration_ns: (duration * 1e9) as u64,
            dirty_pages_last_round: (dirty_bytes / page) as u64,
            updated_unix_ns: now_ns(offset),
            ..Telemetry::default()
        };
        let model = Model::new(&classes, LINK, per_page_reads()).unwrap();
        let sel = model.selection(plan.search.chosen.m, plan.search.chosen.s);
        let curve = model.round_dirty(sel);
        // Scaling write rates can at most dirty every written unit of the set.
        let predicted = curve.bytes(duration, 1.0);
        let most = curve.bytes(duration, 1e4);
        let target = predicted + 0.5 * (most - predicted);
        assert!(target > 1.3 * predicted, "{target} vs {predicted}");
        // As predicted: nothing to do.
        engine
            .publish_telemetry(&telemetry(predicted, 1, 0))
            .unwrap();
        assert_eq!(server.poll().unwrap(), None);
        // Far more dirtying than predicted, but reported against a stale
        // generation: ignored.
        engine.publish_telemetry(&telemetry(target, 0, 1)).unwrap();
        assert_eq!(server.poll().unwrap(), None);
        // The same for the current plan.
        engine.publish_telemetry(&telemetry(target, 1, 2)).unwrap();
        let e = server.poll().unwrap().expect("re-plan");
        assert_eq!(e.generation, 2);
        let [
            ReplanReason::DirtyRate {
                factor,
                expected,
                measured,
                ..
            },
        ] = e.reasons[..]
        else {
            panic!("{e:?}")
        };
        assert!((expected - predicted).abs() < 1e-6 * expected);
        assert!(factor > 1.0, "{factor}");
        // The fitted factor reproduces the measurement.
        let fitted = curve.bytes(duration, factor);
        assert!(
            (fitted - measured).abs() < 1e-6 * measured,
            "{fitted} vs {measured}"
        );
        let p = engine.read_plan().unwrap().unwrap();
        assert_eq!(p.generation, 2);
        assert!((p.write_scale - factor).abs() < 1e-12);
    }

    /// The serve loop in its own thread, a fake engine in another, talking
    /// only through the segment.
    #[test]
    fn serve_loop_follows_a_fake_engine() {
        let (classes, units) = guest();
        let name = temp_name("loop");
        let seg = Segment::create(&name).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let engine = {
            let (name, stop) = (name.clone(), stop.clone());
            std::thread::spawn(move || {
                let seg = loop {
                    match Segment::open(&name) {
                        Ok(s) if matches!(s.read_plan(), Ok(Some(_))) => break s,
                        _ => std::thread::sleep(Duration::from_millis(5)),
                    }
                };
                let plan = seg.read_plan().unwrap().unwrap();
                seg.publish_telemetry(&Telemetry {
                    phase: Phase::Precopy,
                    plan_generation: plan.generation,
                    bandwidth_bps: (plan.link.bandwidth * 8.0 * 0.5) as u64,
                    ..Telemetry::default()
                })
                .unwrap();
                let start = Instant::now();
                let new = loop {
                    let p = seg.read_plan().unwrap().unwrap();
                    if p.generation > plan.generation {
                        break p;
                    }
                    assert!(start.elapsed() < Duration::from_secs(30), "no re-plan");
                    std::thread::sleep(Duration::from_millis(2));
                };
                stop.store(true, Ordering::Relaxed);
                (plan, new)
            })
        };
        let mut server = Server::start(
            &classes,
            Some(&units),
            &seg,
            LINK,
            ModelParams::default(),
            SearchOptions { threads: 1 },
            policy(),
        )
        .unwrap();
        let mut events = Vec::new();
        server.run(&stop, Duration::from_millis(2), |e| {
            events.push(e.expect("no serve error").clone())
        });
        let (old, new) = engine.join().unwrap();
        assert_eq!((old.generation, new.generation), (1, 2));
        assert_eq!(new.link.bandwidth, LINK.bandwidth * 0.5);
        assert_eq!(events.len(), 1);
        assert!(new.predicted.downtime_s >= old.predicted.downtime_s * 0.999);
    }
}
