//! The typed shapes of the QMP replies the engine reads (a small subset of
//! QEMU's QAPI schema). Unknown enum values decode to an `Other` variant and
//! unknown fields are ignored, so a newer QEMU never makes a reply undecodable.

use serde::Deserialize;

/// QEMU's run state (`RunState` in `qapi/run-state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(from = "String")]
pub enum RunState {
    /// Stopped by a debugger.
    Debug,
    /// Waiting for an incoming migration (`-incoming`).
    InMigrate,
    /// An internal error stopped the guest.
    InternalError,
    /// An I/O error stopped the guest.
    IoError,
    /// Stopped by `stop`.
    Paused,
    /// The source after a completed migration.
    PostMigrate,
    /// Not started yet (`-S`).
    Prelaunch,
    /// The source while it sends the final state.
    FinishMigrate,
    /// Loading a snapshot.
    RestoreVm,
    /// Running.
    Running,
    /// Saving a snapshot.
    SaveVm,
    /// The guest shut down.
    Shutdown,
    /// The guest is suspended (S3).
    Suspended,
    /// The watchdog fired.
    Watchdog,
    /// The guest panicked.
    GuestPanicked,
    /// COLO fault tolerance.
    Colo,
    /// A state this client does not know, as QEMU spelled it.
    Other(String),
}

impl From<String> for RunState {
    fn from(s: String) -> Self {
        match s.as_str() {
            "debug" => RunState::Debug,
            "inmigrate" => RunState::InMigrate,
            "internal-error" => RunState::InternalError,
            "io-error" => RunState::IoError,
            "paused" => RunState::Paused,
            "postmigrate" => RunState::PostMigrate,
            "prelaunch" => RunState::Prelaunch,
            "finish-migrate" => RunState::FinishMigrate,
            "restore-vm" => RunState::RestoreVm,
            "running" => RunState::Running,
            "save-vm" => RunState::SaveVm,
            "shutdown" => RunState::Shutdown,
            "suspended" => RunState::Suspended,
            "watchdog" => RunState::Watchdog,
            "guest-panicked" => RunState::GuestPanicked,
            "colo" => RunState::Colo,
            _ => RunState::Other(s),
        }
    }
}

/// The reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StatusInfo {
    /// Whether the vCPUs run.
    pub running: bool,
    /// The run state.
    pub status: RunState,
}

/// A migration's state (`MigrationStatus` in `qapi/migration.json`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
#[serde(from = "String")]
pub enum MigrationStatus {
    /// No migration has started.
    None,
    /// Setting up.
    Setup,
    /// Being cancelled.
    Cancelling,
    /// Cancelled.
    Cancelled,
    /// Sending (pre-copy).
    Active,
    /// QEMU's own post-copy (the engine does its own; the evaluation runs
    /// QEMU's as a baseline).
    PostcopyActive,
    /// QEMU's own post-copy, paused.
    PostcopyPaused,
    /// QEMU's own post-copy, recovery being set up.
    PostcopyRecoverSetup,
    /// QEMU's own post-copy, recovering.
    PostcopyRecover,
    /// Done.
    Completed,
    /// Failed (see [`MigrationInfo::error_desc`]).
    Failed,
    /// COLO.
    Colo,
    /// Paused before switchover (`pause-before-switchover`).
    PreSwitchover,
    /// Migrating device state.
    Device,
    /// Waiting for devices to unplug.
    WaitUnplug,
    /// A status this client does not know, as QEMU spelled it.
    Other(String),
}

impl From<String> for MigrationStatus {
    fn from(s: String) -> Self {
        match s.as_str() {
            "none" => MigrationStatus::None,
            "setup" => MigrationStatus::Setup,
            "cancelling" => MigrationStatus::Cancelling,
            "cancelled" => MigrationStatus::Cancelled,
            "active" => MigrationStatus::Active,
            "postcopy-active" => MigrationStatus::PostcopyActive,
            "postcopy-paused" => MigrationStatus::PostcopyPaused,
            "postcopy-recover-setup" => MigrationStatus::PostcopyRecoverSetup,
            "postcopy-recover" => MigrationStatus::PostcopyRecover,
            "completed" => MigrationStatus::Completed,
            "failed" => MigrationStatus::Failed,
            "colo" => MigrationStatus::Colo,
            "pre-switchover" => MigrationStatus::PreSwitchover,
            "device" => MigrationStatus::Device,
            "wait-unplug" => MigrationStatus::WaitUnplug,
            _ => MigrationStatus::Other(s),
        }
    }
}

impl MigrationStatus {
    /// Whether the migration is over (completed, failed or cancelled).
    pub fn is_finished(&self) -> bool {
        matches!(
            self,
            MigrationStatus::Completed | MigrationStatus::Failed | MigrationStatus::Cancelled
        )
    }
}

/// RAM statistics of `query-migrate` (with `x-ignore-shared`, the shared
/// guest RAM is skipped and these count what QEMU still sent).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationRamStats {
    /// Bytes sent on the migration stream so far (device state included).
    pub transferred: u64,
    /// Bytes of RAM left to send.
    pub remaining: u64,
    /// Bytes of RAM in total.
    pub total: u64,
    /// Zero pages found.
    #[serde(default)]
    pub duplicate: u64,
    /// Non-zero pages sent.
    #[serde(default)]
    pub normal: u64,
    /// Bytes of non-zero pages sent.
    #[serde(default)]
    pub normal_bytes: u64,
    /// Dirty-bitmap synchronisations done.
    #[serde(default)]
    pub dirty_sync_count: u64,
    /// Throughput in Mbit/s.
    #[serde(default)]
    pub mbps: f64,
    /// Bytes sent while the guest ran (pre-copy).
    #[serde(default)]
    pub precopy_bytes: u64,
    /// Bytes sent while the guest was stopped.
    #[serde(default)]
    pub downtime_bytes: u64,
    /// Bytes sent during QEMU's own post-copy.
    #[serde(default)]
    pub postcopy_bytes: u64,
    /// Pages the destination requested during QEMU's own post-copy (its
    /// post-copy faults).
    #[serde(default)]
    pub postcopy_requests: u64,
}

/// The reply of `query-migrate` (fields absent in a state are `None`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationInfo {
    /// The state; `None` before any migration on QEMUs that omit it.
    pub status: Option<MigrationStatus>,
    /// RAM statistics.
    pub ram: Option<MigrationRamStats>,
    /// Milliseconds since the migration started (until it ended).
    #[serde(rename = "total-time")]
    pub total_time_ms: Option<u64>,
    /// Milliseconds the guest was stopped (once completed).
    #[serde(rename = "downtime")]
    pub downtime_ms: Option<u64>,
    /// Expected downtime in milliseconds (while active).
    #[serde(rename = "expected-downtime")]
    pub expected_downtime_ms: Option<u64>,
    /// Milliseconds spent in setup.
    #[serde(rename = "setup-time")]
    pub setup_time_ms: Option<u64>,
    /// Why the migration failed.
    pub error_desc: Option<String>,
    /// Destination, with the `postcopy-blocktime` capability, once QEMU's
    /// own post-copy completed: milliseconds the vCPUs were all blocked on
    /// post-copy faults.
    #[serde(rename = "postcopy-blocktime")]
    pub postcopy_blocktime_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_decode_including_unknown_ones() {
        let s: StatusInfo =
            serde_json::from_str(r#"{"status": "prelaunch", "running": false}"#).unwrap();
        assert_eq!(s.status, RunState::Prelaunch);
        assert!(!s.running);
        let s: StatusInfo =
            serde_json::from_str(r#"{"status": "teleporting", "running": true, "x": 1}"#).unwrap();
        assert_eq!(s.status, RunState::Other("teleporting".into()));
        for (raw, want) in [
            ("inmigrate", RunState::InMigrate),
            ("postmigrate", RunState::PostMigrate),
            ("finish-migrate", RunState::FinishMigrate),
            ("guest-panicked", RunState::GuestPanicked),
            ("running", RunState::Running),
            ("paused", RunState::Paused),
        ] {
            assert_eq!(RunState::from(raw.to_string()), want);
        }
        assert!(serde_json::from_str::<StatusInfo>(r#"{"status": 3, "running": true}"#).is_err());
        assert!(serde_json::from_str::<StatusInfo>(r#"{"running": true}"#).is_err());
    }

    #[test]
    fn migration_info_decodes_qemu_10_replies() {
        // Shapes QEMU 10.0 returns, trimmed.
        let none: MigrationInfo = serde_json::from_str("{}").unwrap();
        assert_eq!(none.status, None);
        let done: MigrationInfo = serde_json::from_str(
            r#"{"status": "completed", "setup-time": 1, "downtime": 12, "total-time": 40,
                "ram": {"total": 268435456, "remaining": 0, "transferred": 301234,
                        "duplicate": 0, "normal": 0, "normal-bytes": 0, "mbps": 61.5,
                        "dirty-sync-count": 2, "precopy-bytes": 100, "downtime-bytes": 301134,
                        "postcopy-bytes": 0, "postcopy-requests": 3, "page-size": 4096, "multifd-bytes": 0,
                        "pages-per-second": 0, "dirty-sync-missed-zero-copy": 0}}"#,
        )
        .unwrap();
        assert_eq!(done.status, Some(MigrationStatus::Completed));
        assert!(done.status.as_ref().unwrap().is_finished());
        assert_eq!(done.downtime_ms, Some(12));
        assert_eq!(done.total_time_ms, Some(40));
        assert_eq!(done.setup_time_ms, Some(1));
        let ram = done.ram.unwrap();
        assert_eq!(ram.transferred, 301234);
        assert_eq!(ram.downtime_bytes, 301134);
        assert_eq!(ram.mbps, 61.5);
        assert_eq!(ram.postcopy_requests, 3);
        let failed: MigrationInfo =
            serde_json::from_str(r#"{"status": "failed", "error-desc": "boom"}"#).unwrap();
        assert_eq!(failed.error_desc.as_deref(), Some("boom"));
        let dest: MigrationInfo = serde_json::from_str(
            r#"{"postcopy-blocktime": 5434, "status": "completed",
                "postcopy-vcpu-blocktime": [5434]}"#,
        )
        .unwrap();
        assert_eq!(dest.postcopy_blocktime_ms, Some(5434));
        assert_eq!(done.postcopy_blocktime_ms, None);
        let odd: MigrationInfo = serde_json::from_str(r#"{"status": "warping"}"#).unwrap();
        assert_eq!(odd.status, Some(MigrationStatus::Other("warping".into())));
        assert!(!odd.status.unwrap().is_finished());
        assert!(serde_json::from_str::<MigrationInfo>(r#"{"ram": {"total": -1}}"#).is_err());
    }
}
