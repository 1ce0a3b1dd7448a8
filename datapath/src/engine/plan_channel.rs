//! The engine's side of the adaptive loop: it publishes what it measures
//! (phase, rounds, bytes, bandwidth, RTT, dirty counts) and, at each
//! pre-copy round boundary, takes a newer plan if the planner published one
//! (see `wanmig_planner::serve` for when it re-plans, and
//! [`PageOrder::adopt`](super::PageOrder::adopt) for how a running
//! pre-copy switches sets without losing a unit it already sent).

pub use wanmig_planner::segment::{Phase, Telemetry};

use super::PageOrder;

/// A newer plan, as the engine applies it.
#[derive(Debug, Clone)]
pub struct NewPlan {
    /// The planner's generation.
    pub generation: u64,
    /// Pages (and chunks) in the newer ranking, `M` (and `S`) as prefixes.
    pub order: PageOrder,
}

/// Where telemetry goes and newer plans come from.
pub trait PlanChannel: Send {
    /// Publishes what the engine sees (best effort: a planner that went
    /// away must not stop a migration).
    fn publish(&mut self, t: &Telemetry);
    /// The generation of the plan the engine starts with.
    fn initial_generation(&self) -> u64 {
        0
    }
    /// A plan newer than the one applied, if the planner published one.
    fn newer_plan(&mut self) -> Option<NewPlan>;
}

/// No planner: nothing published, no newer plan.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPlanChannel;

impl PlanChannel for NoPlanChannel {
    fn publish(&mut self, _: &Telemetry) {}
    fn newer_plan(&mut self) -> Option<NewPlan> {
        None
    }
}

/// A plan applied at a round boundary.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct AppliedPlan {
    /// The round it applied from.
    pub round: u64,
    /// The planner's generation.
    pub generation: u64,
    /// The newer plan's `M`.
    pub m: f64,
    /// Its `S` (`None` without disks).
    pub s: Option<f64>,
    /// Pages it added to the pre-copy set.
    pub pages_added: u64,
    /// Chunks it added.
    pub chunks_added: u64,
}
