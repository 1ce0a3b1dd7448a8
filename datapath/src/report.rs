//! The migration report: what was planned, what was measured, and whether
//! the guest's memory arrived intact.

use std::time::Duration;

use serde::Serialize;

use crate::engine::{DestReport, SourceReport};

/// The plan that was executed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PlanFigures {
    /// Fraction of memory pre-copied.
    pub m: f64,
    /// Fraction of storage pre-copied.
    pub s: f64,
}

/// The headline figures (measured, or predicted by the planner).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Figures {
    /// Total migration time T, s.
    pub total_s: f64,
    /// Remote uptime U (post-copy duration), s.
    pub uptime_s: f64,
    /// Downtime D (source stop to destination resume), s.
    pub downtime_s: f64,
    /// Post-copy penalty P (time vCPUs waited for fetched pages), s.
    pub penalty_s: f64,
    /// Post-copy faults that fetched a page from the source.
    pub faults: u64,
    /// Bytes sent over the link (frames, both connections).
    pub bytes_sent: u64,
    /// Performance restoration agility Γ = dT / (D + ΔT).
    pub gamma: f64,
}

/// End-to-end integrity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IntegrityFigures {
    /// Errors the guest's page checker reported (at the destination, after
    /// the migration).
    pub checker_errors: u64,
    /// Destination pages compared with the source's frozen pages.
    pub pages_compared: u64,
    /// Of those, pages that differ (must be 0).
    pub pages_differing: u64,
    /// Destination disk chunks compared with the source's frozen chunks
    /// (those the guest has not modified since the resume).
    pub chunks_compared: u64,
    /// Of those, chunks that differ (must be 0).
    pub chunks_differing: u64,
}

/// The disks' side of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StorageFigures {
    /// Chunks fetched on demand at the destination.
    pub chunks_fetched: u64,
    /// Absent blocks the guest overwrote whole at the destination (no fetch).
    pub whole_block_overwrites: u64,
    /// Absent blocks written in part (fetched first, then merged).
    pub partial_block_merges: u64,
    /// Frame bytes of chunks, on both connections.
    pub bytes_sent: u64,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct MigrationReport {
    /// The plan.
    pub plan: PlanFigures,
    /// What happened.
    pub measured: Figures,
    /// What the planner predicted, when a profile was given.
    pub predicted: Option<Figures>,
    /// Where the plan came from.
    pub plan_origin: String,
    /// The link the planner assumed (its bandwidths are per byte of guest
    /// data: the wire ratios folded in), when it planned in this process.
    pub planner_link: Option<wanmig_planner::model::Link>,
    /// Integrity.
    pub integrity: IntegrityFigures,
    /// The disks, if the guest has any.
    pub storage: Option<StorageFigures>,
    /// The source engine's details.
    pub source: SourceReport,
    /// The destination engine's details.
    pub destination: DestReport,
}

/// Γ = dT / (D + ΔT), with ΔT = dT + the stalls met while doing dT of work.
pub fn gamma(dt: Duration, downtime_s: f64, stalls_in_window_s: f64) -> f64 {
    let dt = dt.as_secs_f64();
    dt / (downtime_s + dt + stalls_in_window_s)
}

impl MigrationReport {
    /// Combines the two engines' reports (both measured on this host's
    /// monotonic clock) into the headline figures.
    pub fn combine(
        source: SourceReport,
        destination: DestReport,
        checker_errors: u64,
        dt: Duration,
        s: f64,
    ) -> Self {
        let (total_s, downtime_s) = match (source.times, destination.times) {
            (Some(st), Some(dt_)) => (
                dt_.complete
                    .max(st.push_done)
                    .saturating_duration_since(st.start)
                    .as_secs_f64(),
                dt_.resumed
                    .saturating_duration_since(st.paused)
                    .as_secs_f64(),
            ),
            _ => (f64::NAN, f64::NAN),
        };
        let integrity = destination.integrity.unwrap_or_default();
        let dest_disks = destination.storage.clone().unwrap_or_default();
        let storage = source.storage.as_ref().map(|st| StorageFigures {
            chunks_fetched: dest_disks.counters.chunks_fetched,
            whole_block_overwrites: dest_disks.counters.whole_block_overwrites,
            partial_block_merges: dest_disks.counters.partial_block_merges,
            bytes_sent: st.bytes_sent,
        });
        let s = source.storage.as_ref().map_or(s, |st| st.s);
        MigrationReport {
            plan: PlanFigures { m: source.m, s },
            measured: Figures {
                total_s,
                uptime_s: destination.uptime_s,
                downtime_s,
                penalty_s: destination.penalty_s,
                faults: destination.faults,
                bytes_sent: source.bytes_sent,
                gamma: gamma(dt, downtime_s, destination.penalty_in_window_s),
            },
            predicted: None,
            plan_origin: String::new(),
            planner_link: None,
            integrity: IntegrityFigures {
                checker_errors,
                pages_compared: integrity.pages_compared,
                pages_differing: integrity.pages_differing,
                chunks_compared: dest_disks.chunks_compared,
                chunks_differing: dest_disks.chunks_differing,
            },
            storage,
            source,
            destination,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gamma_is_one_without_downtime_or_stalls() {
        assert_eq!(gamma(Duration::from_secs(20), 0.0, 0.0), 1.0);
        assert!((gamma(Duration::from_secs(20), 1.0, 1.0) - 20.0 / 22.0).abs() < 1e-12);
    }
}
