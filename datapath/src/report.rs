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
    /// Post-copy penalty P, s: the wall time after the destination resumed
    /// the guest during which it waited for anything that had not arrived
    /// there. Measured on the destination: every page fault on a page not
    /// here (absent, already on its way, or a zero page the engine installs),
    /// from the moment the engine sees it until the page is in place, and
    /// every guest disk request (a read of absent data, a partial-block
    /// write) waiting for chunks; overlapping waits count once (the length
    /// of their union, as QEMU's `postcopy-blocktime` counts a vCPU's
    /// waits). A wait that began before the resume counts from the resume
    /// (the time before it is downtime). The split is in the destination's
    /// report (`page_stall_s`, `chunk_stall_s`, `chunk_waits`).
    pub penalty_s: f64,
    /// Post-copy faults that fetched a page from the source.
    pub faults: u64,
    /// Bytes sent over the link (frames, both connections).
    pub bytes_sent: u64,
    /// Performance restoration agility Γ = dT / (D + ΔT).
    pub gamma: f64,
}

/// End-to-end integrity: the engine's comparison of the destination with
/// the source's frozen memory and disks, and the guest's own checkers.
/// Zeros prove nothing unless `checked`: [`holds`](Self::holds) is the
/// verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IntegrityFigures {
    /// Whether the engine's comparison ran: every page's digest arrived and
    /// was compared, and, if the guest has disks, every chunk's. False
    /// (the source sent no digests, the bulk connection broke, the
    /// migration failed): every count below is 0 and proves nothing.
    pub checked: bool,
    /// Failures the guest reported on its console at the destination, after
    /// the migration: its checkers' error counts and every failure line
    /// (see `SerialLog::checker_errors`).
    pub checker_errors: u64,
    /// Populated destination pages compared with the source's frozen pages:
    /// pages holding data from the source that the guest has not written
    /// since the resume.
    pub pages_compared: u64,
    /// Pages compared apart from those: the ones the source announced as
    /// holding nothing (never populated there, or post-copy pages all zeros
    /// since round 0), holes here (QEMU: reading as zeros; Xen: no memory).
    pub holes_compared: u64,
    /// Of the pages and holes compared, those that differ (must be 0).
    pub pages_differing: u64,
    /// Destination disk chunks compared with the source's frozen chunks
    /// (those the guest has not modified since the resume).
    pub chunks_compared: u64,
    /// Of those, chunks that differ (must be 0).
    pub chunks_differing: u64,
}

impl IntegrityFigures {
    /// The figures of the destination's `report`, with the guest's
    /// `checker_errors`.
    pub fn of(report: &DestReport, checker_errors: u64) -> Self {
        let pages = report.integrity;
        let disks = report.storage.as_ref();
        IntegrityFigures {
            checked: pages.is_some() && disks.is_none_or(|d| d.chunks_checked),
            checker_errors,
            pages_compared: pages.map_or(0, |i| i.populated_compared()),
            holes_compared: pages.map_or(0, |i| i.holes),
            pages_differing: pages.map_or(0, |i| i.pages_differing),
            chunks_compared: disks.map_or(0, |d| d.chunks_compared),
            chunks_differing: disks.map_or(0, |d| d.chunks_differing),
        }
    }

    /// Why the guest cannot be said to have arrived intact, one reason a
    /// line; empty if it did (see [`holds`](Self::holds)).
    pub fn failures(&self) -> Vec<String> {
        let mut v = Vec::new();
        if !self.checked {
            v.push(
                "the engine's comparison with the source's frozen memory and disks did not run"
                    .into(),
            );
        } else if self.pages_compared == 0 {
            v.push("no populated page was compared".into());
        }
        if self.pages_differing > 0 {
            v.push(format!(
                "{} of {} pages compared differ",
                self.pages_differing,
                self.pages_compared + self.holes_compared
            ));
        }
        if self.chunks_differing > 0 {
            v.push(format!(
                "{} of {} disk chunks compared differ",
                self.chunks_differing, self.chunks_compared
            ));
        }
        if self.checker_errors > 0 {
            v.push(format!(
                "the guest reported {} errors on its console",
                self.checker_errors
            ));
        }
        v
    }

    /// The verdict: true only if the comparison ran (`checked`), compared at
    /// least one populated page, found no page or chunk differing, and the
    /// guest reported no error.
    pub fn holds(&self) -> bool {
        self.failures().is_empty()
    }
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
    /// How the bytes travelled: the I/O backend and the cipher, and where
    /// it ran (the source's; the destination's is in `destination.io`).
    pub io: crate::transport::IoPath,
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
        let integrity = IntegrityFigures::of(&destination, checker_errors);
        let dest_disks = destination.storage.clone().unwrap_or_default();
        let storage = source.storage.as_ref().map(|st| StorageFigures {
            chunks_fetched: dest_disks.counters.chunks_fetched,
            whole_block_overwrites: dest_disks.counters.whole_block_overwrites,
            partial_block_merges: dest_disks.counters.partial_block_merges,
            bytes_sent: st.bytes_sent,
        });
        let s = source.storage.as_ref().map_or(s, |st| st.s);
        MigrationReport {
            io: source.io.clone(),
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
            integrity,
            storage,
            source,
            destination,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::engine::IntegrityReport;
    use crate::engine::dest::DestStorageReport;

    fn checked(compared: u64, holes: u64) -> DestReport {
        DestReport {
            integrity: Some(IntegrityReport {
                pages_compared: compared,
                holes,
                ..IntegrityReport::default()
            }),
            ..DestReport::default()
        }
    }

    #[test]
    fn a_check_that_did_not_run_is_no_pass() {
        // No digests (or a broken stream): nothing compared, nothing
        // differing, and still no pass.
        let unchecked = IntegrityFigures::of(&DestReport::default(), 0);
        assert!(!unchecked.checked);
        assert_eq!(
            (unchecked.pages_compared, unchecked.pages_differing),
            (0, 0)
        );
        assert!(!unchecked.holds());
        assert!(
            unchecked.failures()[0].contains("did not run"),
            "{:?}",
            unchecked.failures()
        );
        let json = serde_json::to_value(unchecked).unwrap();
        assert_eq!(json["checked"], false);

        // The pages were compared, the disks' chunks were not.
        let mut r = checked(1000, 200);
        r.storage = Some(DestStorageReport::default());
        let i = IntegrityFigures::of(&r, 0);
        assert!(!i.checked && !i.holds(), "{i:?}");
        r.storage = Some(DestStorageReport {
            chunks_checked: true,
            chunks_compared: 49,
            ..DestStorageReport::default()
        });
        let i = IntegrityFigures::of(&r, 0);
        assert!(i.checked && i.holds(), "{i:?}");
        assert_eq!(i.chunks_compared, 49);
        assert_eq!(serde_json::to_value(i).unwrap()["checked"], true);
    }

    #[test]
    fn only_populated_pages_count_as_compared() {
        let i = IntegrityFigures::of(&checked(1000, 200), 0);
        assert_eq!((i.pages_compared, i.holes_compared), (800, 200));
        assert!(i.checked && i.holds(), "{:?}", i.failures());
        // Holes alone prove nothing arrived.
        let i = IntegrityFigures::of(&checked(200, 200), 0);
        assert_eq!((i.pages_compared, i.holes_compared), (0, 200));
        assert!(!i.holds());
    }

    #[test]
    fn any_difference_or_guest_error_fails_the_check() {
        assert!(!IntegrityFigures::of(&checked(1000, 0), 1).holds());
        let mut r = checked(1000, 0);
        r.integrity.as_mut().unwrap().pages_differing = 1;
        assert!(!IntegrityFigures::of(&r, 0).holds());
        let mut r = checked(1000, 0);
        r.storage = Some(DestStorageReport {
            chunks_checked: true,
            chunks_compared: 10,
            chunks_differing: 1,
            ..DestStorageReport::default()
        });
        let i = IntegrityFigures::of(&r, 0);
        assert!(!i.holds());
        assert_eq!(i.failures(), vec!["1 of 10 disk chunks compared differ"]);
    }

    #[test]
    fn gamma_is_one_without_downtime_or_stalls() {
        assert_eq!(gamma(Duration::from_secs(20), 0.0, 0.0), 1.0);
        assert!((gamma(Duration::from_secs(20), 1.0, 1.0) - 20.0 / 22.0).abs() < 1e-12);
    }
}
