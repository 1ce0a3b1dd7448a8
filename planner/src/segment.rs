//! The shared-memory segment between the planner and the engine.
//!
//! One file of [`SEGMENT_SIZE`] bytes in `/dev/shm` (or any path containing
//! a `/`), created with mode 0600 by the planner (`O_EXCL | O_NOFOLLOW`)
//! and opened by the engine (`O_NOFOLLOW`), which refuses a segment not
//! owned by its own user or open to group/others. The planner unlinks it
//! when its [`Segment`] is dropped. A named file rather than a memfd: the
//! engine, a separate process started independently, opens the segment by
//! name without needing a unix socket to receive a file descriptor;
//! ownership and mode checks give the same protection.
//!
//! # A migration, seen through the segment
//!
//! ```mermaid
//! sequenceDiagram
//!     participant P as wanmig-planner serve
//!     participant S as segment (/dev/shm)
//!     participant E as engine (wanmig, source)
//!     P->>S: create (mode 0600), lock the plan region
//!     P->>S: publish_plan: generation 1, M, S, page/chunk rules, round limit and freeze policy, predicted T U D P Gamma, link
//!     E->>S: open, read_plan (seqlock: retry until a stable snapshot)
//!     E->>E: rank pages with the profile, check the rule, pre-copy the top M
//!     loop every pre-copy round
//!         E->>S: publish_telemetry: phase, round, bytes sent, measured bandwidth and RTT, dirty pages/chunks
//!         P->>S: read_telemetry
//!         alt bandwidth off by > 20 % or dirty rate off by > 25 %
//!             P->>S: publish_plan: generation n + 1 (re-planned)
//!             E->>S: read_plan at the next round boundary
//!         end
//!     end
//!     E->>S: publish_telemetry: phase Freeze, then Postcopy, then Done
//!     P->>S: unlink on exit
//! ```
//!
//! # Layout (version 3, little-endian `u64` words, all accessed atomically)
//!
//! ```text
//! offset  size  region
//!      0    64  header: magic "WMSEG\0\0\x01", layout version, size, creator pid
//!     64    64  reserved
//!    128   512  plan region (written by the planner; own seqlock)
//!    640   512  telemetry region (written by the engine; own seqlock)
//!   1152  2944  reserved (zero)
//! ```
//!
//! Field offsets are fixed by `#[repr(C)]` structs of `AtomicU64` (zerocopy
//! `FromBytes + IntoBytes`: every bit pattern valid, no padding) and checked
//! at compile time. Floating-point figures are stored as their IEEE-754
//! bits. Version 2 added the profile fingerprint (also in each rule word
//! block), `DeltaT`, the downtime limit and the largest live storage
//! fraction; version 3 the plan's strategy (round limit and freeze policy:
//! the engine executes every plan the planner can choose, a one-pass
//! pre-copy or a freeze that post-copies what does not fit included).
//!
//! # One writer per region
//!
//! Each region has exactly one writer at a time, enforced by an
//! open-file-description byte-range lock (`fcntl(F_OFD_SETLK)`, write lock)
//! on the region's bytes of the segment file: the planner takes the plan
//! region's lock when it creates the segment, the engine takes the
//! telemetry region's on its first publication (or
//! [`Segment::claim_telemetry_writer`]). A second writer (another process,
//! or another [`Segment`] handle in the same process) is refused with
//! [`SegmentError::WriterBusy`] while the first holds the lock; threads
//! sharing one handle are serialised by a mutex. The kernel releases the
//! lock when its holder closes the segment or dies, and only then can
//! another writer take the region.
//!
//! # Seqlock
//!
//! Each region starts with a sequence counter, even when stable. The
//! writer (holding the lock) stores an odd `seq`, issues a release fence,
//! stores every field with relaxed atomic stores, and publishes `seq + 1`
//! (even) with a release store. A reader loads `seq` (acquire), retries
//! while it is odd, loads every field (relaxed), issues an acquire fence
//! and reloads `seq`: the snapshot is accepted only if both loads are
//! equal. If the reader saw any store of a newer write, the fences order
//! that write's odd `seq` before the second load, so the check fails: a
//! torn snapshot is never accepted. Every access is atomic, so there is no
//! data race in Rust's memory model, across threads or processes (each
//! process maps the same physical page).
//!
//! **A writer that died mid-update** leaves `seq` odd. Its lock died with
//! it, so the next writer to take the lock knows nobody else can be
//! writing, and *repairs* the region: it moves `seq` to the next odd value
//! and rewrites every field. (There is no time-based takeover: a writer
//! that is merely slow, preempted or stopped keeps its lock, and nobody
//! writes under it.) A reader that keeps finding `seq` odd asks the kernel
//! whether anyone holds the region's lock (`F_OFD_GETLK`): if not, it
//! reports [`SegmentError::WriterDied`] at once instead of spinning; if the
//! writer is alive but stays mid-update for more than [`READ_PATIENCE`],
//! it reports [`SegmentError::Busy`].
//!
//! The segment itself is memory-mapped (both sides need the same physical
//! page). What that leaves open: a process of the same user that truncates
//! the segment file would make accesses to the mapping fault (`SIGBUS`);
//! the 0600 mode and the owner check confine this to the user who could
//! equally kill the planner or the engine.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, IntoBytes};

use crate::model::{FreezePolicy, Link, PlanStrategy};
use crate::plan::Plan;
use crate::profile::Kind;
use crate::rule::{PrecopyRule, RULE_WORDS, RuleDecodeError};

/// `"WMSEG\0\0\x01"` as a little-endian word.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"WMSEG\0\0\x01");
/// The layout version.
pub const LAYOUT_VERSION: u64 = 3;
/// The segment size in bytes.
pub const SEGMENT_SIZE: usize = 4096;
/// How long a reader waits for a live writer to finish an update.
pub const READ_PATIENCE: Duration = Duration::from_millis(50);
/// Byte range of the plan region (its writer lock).
pub const PLAN_REGION: std::ops::Range<u64> = 128..640;
/// Byte range of the telemetry region (its writer lock).
pub const TELEMETRY_REGION: std::ops::Range<u64> = 640..1152;

/// Segment header.
#[derive(Debug, FromBytes, IntoBytes)]
#[repr(C)]
pub struct HeaderRegion {
    /// [`SEGMENT_MAGIC`], stored last when the segment is created.
    pub magic: AtomicU64,
    /// [`LAYOUT_VERSION`].
    pub version: AtomicU64,
    /// [`SEGMENT_SIZE`].
    pub size: AtomicU64,
    /// Pid of the creating planner.
    pub creator_pid: AtomicU64,
    /// Reserved.
    pub reserved: [AtomicU64; 4],
}

/// The plan region (written by the planner).
#[derive(Debug, FromBytes, IntoBytes)]
#[repr(C)]
pub struct PlanRegion {
    /// Seqlock sequence.
    pub seq: AtomicU64,
    /// Plan generation, from 1 (0: no plan yet).
    pub generation: AtomicU64,
    /// `M` (f64 bits).
    pub m: AtomicU64,
    /// `S` (f64 bits).
    pub s: AtomicU64,
    /// Page rule ([`PrecopyRule::encode`]).
    pub page_rule: [AtomicU64; RULE_WORDS],
    /// Chunk rule.
    pub chunk_rule: [AtomicU64; RULE_WORDS],
    /// Predicted `T` (f64 bits).
    pub total_s: AtomicU64,
    /// Predicted `U`.
    pub uptime_s: AtomicU64,
    /// Predicted `D`.
    pub downtime_s: AtomicU64,
    /// Predicted `P`.
    pub penalty_s: AtomicU64,
    /// Predicted `Gamma`.
    pub gamma: AtomicU64,
    /// Predicted weighted figure.
    pub gamma_weighted: AtomicU64,
    /// Predicted pre-copy time.
    pub precopy_s: AtomicU64,
    /// Predicted number of pre-copy rounds.
    pub rounds: AtomicU64,
    /// Assumed bandwidth, bytes/s (f64 bits).
    pub bandwidth: AtomicU64,
    /// Assumed RTT, seconds (f64 bits).
    pub rtt: AtomicU64,
    /// Downtime target, seconds (f64 bits; NaN bits = none).
    pub downtime_target: AtomicU64,
    /// Write-rate multiplier in force (f64 bits).
    pub write_scale: AtomicU64,
    /// 1 if live migration is possible on the assumed link.
    pub live_possible: AtomicU64,
    /// Publication time, ns since the Unix epoch.
    pub published_unix_ns: AtomicU64,
    /// Fingerprint of the class profile the plan was made from.
    pub profile_fingerprint: AtomicU64,
    /// Predicted `DeltaT` (f64 bits).
    pub delta_t_s: AtomicU64,
    /// The downtime limit `L` (f64 bits).
    pub downtime_limit_s: AtomicU64,
    /// The largest live storage fraction (f64 bits; NaN bits = none).
    pub max_live_s: AtomicU64,
    /// The plan's pre-copy round limit, round 0 included.
    pub max_rounds: AtomicU64,
    /// The plan's freeze policy: 1 classic, 2 overflow
    /// ([`freeze_code`]).
    pub freeze: AtomicU64,
    /// Reserved.
    pub reserved: [AtomicU64; 20],
}

/// The segment's word for a freeze policy (0 is never written: a plan
/// region without one is not a plan).
pub fn freeze_code(f: FreezePolicy) -> u64 {
    match f {
        FreezePolicy::Classic => 1,
        FreezePolicy::Overflow => 2,
    }
}

/// The freeze policy of a segment word, if it names one.
pub fn freeze_from_code(code: u64) -> Option<FreezePolicy> {
    match code {
        1 => Some(FreezePolicy::Classic),
        2 => Some(FreezePolicy::Overflow),
        _ => None,
    }
}

/// The telemetry region (written by the engine).
#[derive(Debug, FromBytes, IntoBytes)]
#[repr(C)]
pub struct TelemetryRegion {
    /// Seqlock sequence (0: never published).
    pub seq: AtomicU64,
    /// [`Phase`].
    pub phase: AtomicU64,
    /// Current pre-copy round.
    pub round: AtomicU64,
    /// Plan generation the engine applies.
    pub plan_generation: AtomicU64,
    /// Bytes sent so far.
    pub bytes_sent: AtomicU64,
    /// Pages sent so far.
    pub pages_sent: AtomicU64,
    /// Chunks sent so far.
    pub chunks_sent: AtomicU64,
    /// Measured bandwidth, bits/s (0: unknown).
    pub bandwidth_bps: AtomicU64,
    /// Measured RTT, ns (0: unknown).
    pub rtt_ns: AtomicU64,
    /// Index of the last completed round.
    pub last_round: AtomicU64,
    /// Its duration, ns (0: none completed).
    pub last_round_duration_ns: AtomicU64,
    /// Pre-copy-set pages found dirty at its end.
    pub dirty_pages_last_round: AtomicU64,
    /// Pre-copy-set chunks found dirty at its end.
    pub dirty_chunks_last_round: AtomicU64,
    /// Start of the current round, ns since the Unix epoch.
    pub round_started_unix_ns: AtomicU64,
    /// Time of this update, ns since the Unix epoch.
    pub updated_unix_ns: AtomicU64,
    /// Post-copy faults served so far.
    pub faults_served: AtomicU64,
    /// Reserved.
    pub reserved: [AtomicU64; 48],
}

/// The whole segment.
#[derive(Debug, FromBytes, IntoBytes)]
#[repr(C)]
pub struct SegmentLayout {
    /// Header.
    pub header: HeaderRegion,
    /// Reserved.
    pub reserved0: [AtomicU64; 8],
    /// Plan region.
    pub plan: PlanRegion,
    /// Telemetry region.
    pub telemetry: TelemetryRegion,
    /// Reserved.
    pub reserved1: [AtomicU64; 368],
}

const _: () = {
    use std::mem::offset_of;
    // The mapping is viewed as a `SegmentLayout`: every bit pattern must be
    // a valid value (`FromBytes`) and there must be no padding
    // (`IntoBytes`); zerocopy's derives prove both at compile time.
    const fn zerocopy_layout<T: FromBytes + IntoBytes>() {}
    zerocopy_layout::<SegmentLayout>();
    assert!(size_of::<HeaderRegion>() == 64);
    assert!(size_of::<PlanRegion>() == 512);
    assert!(size_of::<TelemetryRegion>() == 512);
    assert!(size_of::<SegmentLayout>() == SEGMENT_SIZE);
    assert!(offset_of!(SegmentLayout, plan) as u64 == PLAN_REGION.start);
    assert!(offset_of!(SegmentLayout, telemetry) as u64 == TELEMETRY_REGION.start);
    assert!(offset_of!(SegmentLayout, telemetry) as u64 == PLAN_REGION.end);
    assert!(
        offset_of!(SegmentLayout, reserved1) as u64 == TELEMETRY_REGION.end,
        "regions are contiguous"
    );
    assert!(offset_of!(PlanRegion, page_rule) == 32);
    assert!(offset_of!(PlanRegion, chunk_rule) == 112);
    assert!(offset_of!(PlanRegion, total_s) == 192);
    assert!(offset_of!(PlanRegion, published_unix_ns) == 296);
    assert!(offset_of!(PlanRegion, profile_fingerprint) == 304);
    assert!(offset_of!(PlanRegion, max_live_s) == 328);
    assert!(offset_of!(PlanRegion, max_rounds) == 336);
    assert!(offset_of!(PlanRegion, freeze) == 344);
    assert!(offset_of!(TelemetryRegion, bandwidth_bps) == 56);
    assert!(offset_of!(TelemetryRegion, faults_served) == 120);
    assert!(align_of::<SegmentLayout>() == 8);
};

/// Migration phase reported by the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not migrating yet.
    Idle,
    /// Live pre-copy rounds.
    Precopy,
    /// Guest paused, remainder and state in flight.
    Freeze,
    /// Guest running at the destination, post-copy push and faults.
    Postcopy,
    /// Finished.
    Done,
    /// Failed.
    Failed,
    /// A value this build does not know.
    Unknown(u64),
}

impl Phase {
    /// The stored value.
    pub fn to_raw(self) -> u64 {
        match self {
            Phase::Idle => 0,
            Phase::Precopy => 1,
            Phase::Freeze => 2,
            Phase::Postcopy => 3,
            Phase::Done => 4,
            Phase::Failed => 5,
            Phase::Unknown(v) => v,
        }
    }

    /// From the stored value.
    pub fn from_raw(v: u64) -> Phase {
        match v {
            0 => Phase::Idle,
            1 => Phase::Precopy,
            2 => Phase::Freeze,
            3 => Phase::Postcopy,
            4 => Phase::Done,
            5 => Phase::Failed,
            v => Phase::Unknown(v),
        }
    }
}

/// Predicted figures carried with a plan.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanFigures {
    /// `T` (s).
    pub total_s: f64,
    /// `U` (s).
    pub uptime_s: f64,
    /// `D` (s).
    pub downtime_s: f64,
    /// `P` (s).
    pub penalty_s: f64,
    /// `Gamma`.
    pub gamma: f64,
    /// Weighted figure.
    pub gamma_weighted: f64,
    /// Pre-copy time (s).
    pub precopy_s: f64,
    /// Pre-copy rounds.
    pub rounds: u64,
    /// `DeltaT` (s).
    pub delta_t_s: f64,
}

/// A consistent copy of the plan region.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct PlanSnapshot {
    /// Generation (assigned by [`Segment::publish_plan`]).
    pub generation: u64,
    /// `M`.
    pub m: f64,
    /// `S`.
    pub s: f64,
    /// Which pages to pre-copy.
    pub page_rule: PrecopyRule,
    /// Which chunks to pre-copy.
    pub chunk_rule: PrecopyRule,
    /// Predicted figures.
    pub predicted: PlanFigures,
    /// The link the plan assumes.
    pub link: Link,
    /// Downtime target (s).
    pub downtime_target_s: Option<f64>,
    /// Write-rate multiplier in force.
    pub write_scale: f64,
    /// Whether live migration is possible on the link.
    pub live_possible: bool,
    /// The largest live storage fraction (see [`crate::search`]).
    pub max_live_s: Option<f64>,
    /// The downtime limit `L` (s).
    pub downtime_limit_s: f64,
    /// The plan's round limit and freeze policy: how the engine pre-copies
    /// and freezes.
    pub strategy: PlanStrategy,
    /// Fingerprint of the class profile the plan was made from: the engine
    /// checks it against its own profile
    /// ([`Profile::fingerprint`](crate::profile::Profile::fingerprint)), and
    /// [`PrecopyRule::resolve`] does.
    pub profile_fingerprint: u64,
    /// Publication time (ns since the Unix epoch; set on publish).
    pub published_unix_ns: u64,
}

impl PlanSnapshot {
    /// The snapshot of a finished plan (generation and time set on publish).
    pub fn from_plan(plan: &Plan) -> PlanSnapshot {
        let p = &plan.prediction;
        PlanSnapshot {
            generation: 0,
            m: plan.search.chosen.m,
            s: plan.search.chosen.s,
            page_rule: plan.page_rule,
            chunk_rule: plan.chunk_rule,
            predicted: PlanFigures {
                total_s: p.total_s,
                uptime_s: p.uptime_s,
                downtime_s: p.downtime_s,
                penalty_s: p.penalty_s,
                gamma: p.gamma,
                gamma_weighted: p.gamma_weighted,
                precopy_s: p.precopy_s,
                rounds: p.rounds.len() as u64,
                delta_t_s: p.delta_t_s,
            },
            link: plan.link,
            downtime_target_s: plan.params.downtime_target,
            write_scale: plan.params.write_scale,
            live_possible: plan.search.live.possible,
            max_live_s: plan.search.live.max_live_s,
            downtime_limit_s: plan.params.downtime_limit(),
            strategy: plan.search.chosen.strategy,
            profile_fingerprint: plan.profile.fingerprint,
            published_unix_ns: 0,
        }
    }
}

/// A consistent copy of the telemetry region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Telemetry {
    /// Migration phase.
    pub phase: Phase,
    /// Current pre-copy round.
    pub round: u64,
    /// Plan generation being applied.
    pub plan_generation: u64,
    /// Bytes sent so far.
    pub bytes_sent: u64,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Chunks sent so far.
    pub chunks_sent: u64,
    /// Measured bandwidth, bits/s (0: unknown).
    pub bandwidth_bps: u64,
    /// Measured RTT, ns (0: unknown).
    pub rtt_ns: u64,
    /// Index of the last completed pre-copy round.
    pub last_round: u64,
    /// Its duration, ns (0: no round completed).
    pub last_round_duration_ns: u64,
    /// Pre-copy-set pages found dirty at its end.
    pub dirty_pages_last_round: u64,
    /// Pre-copy-set chunks found dirty at its end.
    pub dirty_chunks_last_round: u64,
    /// Start of the current round (ns since the Unix epoch).
    pub round_started_unix_ns: u64,
    /// Time of this update (ns since the Unix epoch).
    pub updated_unix_ns: u64,
    /// Post-copy faults served so far.
    pub faults_served: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Telemetry {
            phase: Phase::Idle,
            round: 0,
            plan_generation: 0,
            bytes_sent: 0,
            pages_sent: 0,
            chunks_sent: 0,
            bandwidth_bps: 0,
            rtt_ns: 0,
            last_round: 0,
            last_round_duration_ns: 0,
            dirty_pages_last_round: 0,
            dirty_chunks_last_round: 0,
            round_started_unix_ns: 0,
            updated_unix_ns: 0,
            faults_served: 0,
        }
    }
}

/// Which region of the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    /// The plan region (written by the planner).
    Plan,
    /// The telemetry region (written by the engine).
    Telemetry,
}

impl Region {
    fn range(self) -> std::ops::Range<u64> {
        match self {
            Region::Plan => PLAN_REGION,
            Region::Telemetry => TELEMETRY_REGION,
        }
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Region::Plan => "plan",
            Region::Telemetry => "telemetry",
        })
    }
}

/// Segment errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    /// The name cannot name a segment.
    #[error("invalid segment name {name:?}: {reason}")]
    BadName {
        /// The name.
        name: String,
        /// Why.
        reason: &'static str,
    },
    /// Creating, opening, sizing, locking or mapping failed.
    #[error("segment {path}: {op} failed")]
    Io {
        /// The segment path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The segment already exists.
    #[error("segment {path} already exists: {hint}")]
    Exists {
        /// The segment path.
        path: PathBuf,
        /// Whether a planner still serves it, and what to do.
        hint: String,
    },
    /// The segment belongs to another user.
    #[error("segment {path}: owned by uid {found}, not by this user (uid {expected})")]
    WrongOwner {
        /// The segment path.
        path: PathBuf,
        /// Our effective uid.
        expected: u32,
        /// The file's uid.
        found: u32,
    },
    /// The segment is readable or writable by group or others.
    #[error("segment {path}: mode {mode:o} is open to group/others (expected 0600)")]
    TooOpen {
        /// The segment path.
        path: PathBuf,
        /// The file mode.
        mode: u32,
    },
    /// Wrong size.
    #[error("segment {path}: {found} bytes, expected {expected}")]
    BadSize {
        /// The segment path.
        path: PathBuf,
        /// [`SEGMENT_SIZE`].
        expected: u64,
        /// Actual size.
        found: u64,
    },
    /// Wrong magic (not a wanmig segment, or not initialised yet).
    #[error(
        "segment {path}: magic {found:#018x} at offset 0, expected {SEGMENT_MAGIC:#018x} (not a wanmig segment, or its creator has not finished initialising it)"
    )]
    BadMagic {
        /// The segment path.
        path: PathBuf,
        /// Word found.
        found: u64,
    },
    /// Another layout version.
    #[error("segment {path}: layout version {found} at offset 8, this build uses {LAYOUT_VERSION}")]
    BadVersion {
        /// The segment path.
        path: PathBuf,
        /// Version found.
        found: u64,
    },
    /// A published rule does not decode.
    #[error("segment plan region: {kind} rule does not decode")]
    BadRule {
        /// Pages or chunks.
        kind: Kind,
        /// The decode error.
        source: RuleDecodeError,
    },
    /// A published plan field holds a value no plan has.
    #[error("segment plan region: {field} = {value} is not a valid value")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// Another writer holds the region's lock.
    #[error(
        "segment {path}: the {region} region already has a writer (another process or handle holds its lock)"
    )]
    WriterBusy {
        /// The segment path.
        path: PathBuf,
        /// The region.
        region: Region,
    },
    /// The region was left mid-update by a writer that no longer exists.
    #[error(
        "segment {path}: the {region} region was left mid-update by a writer that died; it stays unreadable until a new writer publishes"
    )]
    WriterDied {
        /// The segment path.
        path: PathBuf,
        /// The region.
        region: Region,
    },
    /// A live writer stayed mid-update longer than [`READ_PATIENCE`].
    #[error("segment {path}: the {region} region's writer is stuck mid-update")]
    Busy {
        /// The segment path.
        path: PathBuf,
        /// The region.
        region: Region,
    },
}

/// One region's writer state in this handle.
#[derive(Debug, Default)]
struct Writer {
    /// This handle holds the region's OFD lock.
    locked: AtomicBool,
    /// Serialises writers sharing this handle (and the lock attempt).
    mutex: Mutex<()>,
}

/// A mapped segment.
pub struct Segment {
    path: PathBuf,
    /// Kept open: the OFD locks belong to this open file description.
    file: File,
    map: memmap2::MmapRaw,
    owner: bool,
    plan_writer: Writer,
    telemetry_writer: Writer,
}

impl std::fmt::Debug for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Segment")
            .field("path", &self.path)
            .field("owner", &self.owner)
            .finish_non_exhaustive()
    }
}

/// The path a segment name stands for: `/dev/shm/NAME`, or `NAME` itself
/// when it contains a `/`.
pub fn segment_path(name: &str) -> Result<PathBuf, SegmentError> {
    let bad = |reason| SegmentError::BadName {
        name: name.to_string(),
        reason,
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.contains('\0') {
        return Err(bad("contains NUL"));
    }
    if name.contains('/') {
        return Ok(PathBuf::from(name));
    }
    if name == "." || name == ".." {
        return Err(bad("not a file name"));
    }
    Ok(Path::new("/dev/shm").join(name))
}

fn now_unix_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn f(v: f64) -> u64 {
    v.to_bits()
}

fn fb(v: u64) -> f64 {
    f64::from_bits(v)
}

/// `fcntl` with an OFD record lock on `range` (`F_OFD_SETLK` to take a
/// write lock, `F_OFD_GETLK` to ask whether anyone else holds one).
/// Returns the lock type the kernel reports (`F_UNLCK` when free).
fn ofd_lock(file: &File, cmd: libc::c_int, range: &std::ops::Range<u64>) -> std::io::Result<i16> {
    // SAFETY: an all-zero `flock` is a valid value (plain integers); the
    // fields OFD locks need are set below (`l_pid` must stay 0).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as i16;
    fl.l_whence = libc::SEEK_SET as i16;
    fl.l_start = range.start as libc::off_t;
    fl.l_len = (range.end - range.start) as libc::off_t;
    // SAFETY: `fcntl` with F_OFD_SETLK / F_OFD_GETLK takes a pointer to a
    // `flock` that lives for the call; the descriptor is open (owned by
    // `file`, borrowed for the call).
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &mut fl) };
    if rc == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(fl.l_type)
    }
}

/// Reads a consistent snapshot with `read`, or `None` when `accept(seq)`
/// refuses the (stable) sequence value. On a region that stays odd, asks
/// `writer_alive` after a while: a dead writer is reported at once, a live
/// one after [`READ_PATIENCE`].
fn read_stable<T>(
    seq: &AtomicU64,
    accept: impl Fn(u64) -> bool,
    read: impl Fn() -> T,
    writer_alive: impl Fn() -> bool,
) -> Result<Option<T>, bool> {
    let mut started: Option<Instant> = None;
    let mut attempt = 0u32;
    loop {
        let s1 = seq.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            if !accept(s1) {
                return Ok(None);
            }
            let v = read();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Ok(Some(v));
            }
        }
        attempt += 1;
        if attempt % 64 != 0 {
            std::hint::spin_loop();
            continue;
        }
        std::thread::yield_now();
        if attempt % 1024 == 0 && s1 & 1 == 1 {
            // Odd for a while: is anybody writing?
            if !writer_alive() {
                return Err(false);
            }
            let since = *started.get_or_insert_with(Instant::now);
            if since.elapsed() > READ_PATIENCE {
                return Err(true);
            }
        }
    }
}

impl Segment {
    /// Creates a new segment (mode 0600, `O_EXCL | O_NOFOLLOW`), initialises
    /// its header and takes the plan region's writer lock. The segment is
    /// unlinked when this handle is dropped. If the name exists, the error
    /// says whether a planner still serves it (its plan region is locked)
    /// or it is a stale file left by one that died.
    pub fn create(name: &str) -> Result<Segment, SegmentError> {
        let path = segment_path(name)?;
        let io = |op, source| SegmentError::Io {
            path: path.clone(),
            op,
            source,
        };
        let file = match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(SegmentError::Exists {
                    hint: Self::stale_hint(&path),
                    path,
                });
            }
            Err(e) => return Err(io("create", e)),
        };
        let cleanup = |e: SegmentError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        file.set_len(SEGMENT_SIZE as u64)
            .map_err(|e| cleanup(io("ftruncate", e)))?;
        let map = Self::map(&path, &file).map_err(cleanup)?;
        let seg = Segment {
            path: path.clone(),
            file,
            map,
            owner: true,
            plan_writer: Writer::default(),
            telemetry_writer: Writer::default(),
        };
        seg.lock(Region::Plan).map_err(cleanup)?;
        let h = &seg.layout().header;
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.size.store(SEGMENT_SIZE as u64, Ordering::Relaxed);
        h.creator_pid
            .store(std::process::id().into(), Ordering::Relaxed);
        h.magic.store(SEGMENT_MAGIC, Ordering::Release);
        Ok(seg)
    }

    /// What to say about an existing segment file.
    fn stale_hint(path: &Path) -> String {
        let Ok(file) = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
        else {
            return "it cannot be opened (not a segment?); remove it if no planner uses it".into();
        };
        match ofd_lock(&file, libc::F_OFD_GETLK, &PLAN_REGION) {
            Ok(t) if t == libc::F_UNLCK as i16 => format!(
                "no planner holds it (its plan region is not locked): a stale segment left by a \
                 planner that exited without cleaning up; remove {} and retry",
                path.display()
            ),
            Ok(_) => "a running planner serves it (its plan region is locked); use another name \
                      or stop that planner"
                .into(),
            Err(_) => "remove it if no planner uses it".into(),
        }
    }

    fn map(path: &Path, file: &File) -> Result<memmap2::MmapRaw, SegmentError> {
        let len = file
            .metadata()
            .map_err(|source| SegmentError::Io {
                path: path.to_path_buf(),
                op: "fstat",
                source,
            })?
            .len();
        if len < SEGMENT_SIZE as u64 {
            return Err(SegmentError::BadSize {
                path: path.to_path_buf(),
                expected: SEGMENT_SIZE as u64,
                found: len,
            });
        }
        memmap2::MmapOptions::new()
            .len(SEGMENT_SIZE)
            .map_raw(file)
            .map_err(|source| SegmentError::Io {
                path: path.to_path_buf(),
                op: "mmap",
                source,
            })
    }

    /// Opens an existing segment (`O_NOFOLLOW`), checking owner, mode,
    /// size, magic and version. Dropping the handle does not unlink it. The
    /// handle takes no writer lock until it publishes.
    pub fn open(name: &str) -> Result<Segment, SegmentError> {
        let path = segment_path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|source| SegmentError::Io {
                path: path.clone(),
                op: "open",
                source,
            })?;
        let meta = file.metadata().map_err(|source| SegmentError::Io {
            path: path.clone(),
            op: "fstat",
            source,
        })?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if meta.uid() != euid {
            return Err(SegmentError::WrongOwner {
                path,
                expected: euid,
                found: meta.uid(),
            });
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(SegmentError::TooOpen { path, mode });
        }
        if meta.len() != SEGMENT_SIZE as u64 {
            return Err(SegmentError::BadSize {
                path,
                expected: SEGMENT_SIZE as u64,
                found: meta.len(),
            });
        }
        let seg = Segment {
            map: Self::map(&path, &file)?,
            file,
            path,
            owner: false,
            plan_writer: Writer::default(),
            telemetry_writer: Writer::default(),
        };
        let h = &seg.layout().header;
        let magic = h.magic.load(Ordering::Acquire);
        if magic != SEGMENT_MAGIC {
            return Err(SegmentError::BadMagic {
                path: seg.path.clone(),
                found: magic,
            });
        }
        let version = h.version.load(Ordering::Relaxed);
        if version != LAYOUT_VERSION {
            return Err(SegmentError::BadVersion {
                path: seg.path.clone(),
                found: version,
            });
        }
        Ok(seg)
    }

    /// The segment's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The mapped layout.
    pub fn layout(&self) -> &SegmentLayout {
        debug_assert!(self.map.len() >= SEGMENT_SIZE);
        // SAFETY: the mapping is SEGMENT_SIZE bytes, page-aligned (so aligned
        // for AtomicU64), readable and writable, and lives as long as `self`.
        // `SegmentLayout` is `repr(C)`, exactly SEGMENT_SIZE bytes, made only
        // of `AtomicU64`s, and `FromBytes + IntoBytes` (checked at compile
        // time above): every bit pattern is a valid value and there is no
        // padding. All access goes through atomic operations, which is sound
        // for memory shared with other threads and processes. No `&mut` to
        // this memory is ever created.
        unsafe { &*self.map.as_ptr().cast::<SegmentLayout>() }
    }

    fn writer(&self, region: Region) -> &Writer {
        match region {
            Region::Plan => &self.plan_writer,
            Region::Telemetry => &self.telemetry_writer,
        }
    }

    /// Takes the region's writer lock for this handle (idempotent).
    fn lock(&self, region: Region) -> Result<(), SegmentError> {
        let w = self.writer(region);
        if w.locked.load(Ordering::Acquire) {
            return Ok(());
        }
        match ofd_lock(&self.file, libc::F_OFD_SETLK, &region.range()) {
            Ok(_) => {
                w.locked.store(true, Ordering::Release);
                Ok(())
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                Err(SegmentError::WriterBusy {
                    path: self.path.clone(),
                    region,
                })
            }
            Err(source) => Err(SegmentError::Io {
                path: self.path.clone(),
                op: "fcntl(F_OFD_SETLK)",
                source,
            }),
        }
    }

    /// Whether some writer (this handle, or another holder of the region's
    /// lock) is alive.
    fn writer_alive(&self, region: Region) -> bool {
        if self.writer(region).locked.load(Ordering::Acquire) {
            return true;
        }
        // Unknown (the query failed): assume alive, so readers only wait.
        ofd_lock(&self.file, libc::F_OFD_GETLK, &region.range())
            .map_or(true, |t| t != libc::F_UNLCK as i16)
    }

    /// Takes the telemetry region's writer lock now (the engine side;
    /// [`Segment::publish_telemetry`] does it on first use).
    pub fn claim_telemetry_writer(&self) -> Result<(), SegmentError> {
        let _g = self.telemetry_writer.mutex.lock();
        self.lock(Region::Telemetry)
    }

    /// Runs `write` as the region's writer: lock (once), in-process mutex,
    /// odd `seq` (repairing a region a dead writer left odd), release fence,
    /// the stores, then the even `seq`.
    fn write<T>(
        &self,
        region: Region,
        seq: &AtomicU64,
        write: impl FnOnce() -> T,
    ) -> Result<T, SegmentError> {
        let w = self.writer(region);
        let _g = w.mutex.lock().unwrap_or_else(|e| e.into_inner());
        self.lock(region)?;
        // We hold the lock and the mutex: nobody else writes this region.
        // An odd value was left by a writer that died mid-update; moving
        // to the next odd value keeps readers from accepting its data.
        let s = seq.load(Ordering::Relaxed);
        let odd = if s & 1 == 0 { s + 1 } else { s + 2 };
        seq.store(odd, Ordering::Relaxed);
        fence(Ordering::Release);
        let out = write();
        seq.store(odd + 1, Ordering::Release);
        Ok(out)
    }

    /// Publishes a plan (planner side) under the next generation, which is
    /// returned. The snapshot's `generation` and `published_unix_ns` are
    /// replaced. Fails with [`SegmentError::WriterBusy`] when another
    /// handle holds the plan region's lock.
    pub fn publish_plan(&self, plan: &PlanSnapshot) -> Result<u64, SegmentError> {
        let r = &self.layout().plan;
        self.write(Region::Plan, &r.seq, || {
            let generation = r.generation.load(Ordering::Relaxed) + 1;
            let relaxed = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
            relaxed(&r.generation, generation);
            relaxed(&r.m, f(plan.m));
            relaxed(&r.s, f(plan.s));
            for (a, v) in r.page_rule.iter().zip(plan.page_rule.encode()) {
                relaxed(a, v);
            }
            for (a, v) in r.chunk_rule.iter().zip(plan.chunk_rule.encode()) {
                relaxed(a, v);
            }
            let p = &plan.predicted;
            relaxed(&r.total_s, f(p.total_s));
            relaxed(&r.uptime_s, f(p.uptime_s));
            relaxed(&r.downtime_s, f(p.downtime_s));
            relaxed(&r.penalty_s, f(p.penalty_s));
            relaxed(&r.gamma, f(p.gamma));
            relaxed(&r.gamma_weighted, f(p.gamma_weighted));
            relaxed(&r.precopy_s, f(p.precopy_s));
            relaxed(&r.rounds, p.rounds);
            relaxed(&r.bandwidth, f(plan.link.bandwidth));
            relaxed(&r.rtt, f(plan.link.rtt));
            relaxed(
                &r.downtime_target,
                f(plan.downtime_target_s.unwrap_or(f64::NAN)),
            );
            relaxed(&r.write_scale, f(plan.write_scale));
            relaxed(&r.live_possible, plan.live_possible.into());
            relaxed(&r.published_unix_ns, now_unix_ns());
            relaxed(&r.profile_fingerprint, plan.profile_fingerprint);
            relaxed(&r.delta_t_s, f(p.delta_t_s));
            relaxed(&r.downtime_limit_s, f(plan.downtime_limit_s));
            relaxed(&r.max_live_s, f(plan.max_live_s.unwrap_or(f64::NAN)));
            relaxed(&r.max_rounds, plan.strategy.max_rounds.into());
            relaxed(&r.freeze, freeze_code(plan.strategy.freeze));
            generation
        })
    }

    /// The current plan: `Ok(None)` before the first publication; an error
    /// when a published rule does not decode ([`SegmentError::BadRule`]),
    /// when the planner died mid-update ([`SegmentError::WriterDied`]) or
    /// stays mid-update ([`SegmentError::Busy`]).
    pub fn read_plan(&self) -> Result<Option<PlanSnapshot>, SegmentError> {
        let r = &self.layout().plan;
        let raw = read_stable(
            &r.seq,
            |_| true,
            || {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                let words = |a: &[AtomicU64; RULE_WORDS]| -> [u64; RULE_WORDS] {
                    std::array::from_fn(|i| l(&a[i]))
                };
                (
                    [
                        l(&r.generation),
                        l(&r.m),
                        l(&r.s),
                        l(&r.total_s),
                        l(&r.uptime_s),
                        l(&r.downtime_s),
                        l(&r.penalty_s),
                        l(&r.gamma),
                        l(&r.gamma_weighted),
                        l(&r.precopy_s),
                        l(&r.rounds),
                        l(&r.bandwidth),
                        l(&r.rtt),
                        l(&r.downtime_target),
                        l(&r.write_scale),
                        l(&r.live_possible),
                        l(&r.published_unix_ns),
                        l(&r.profile_fingerprint),
                        l(&r.delta_t_s),
                        l(&r.downtime_limit_s),
                        l(&r.max_live_s),
                        l(&r.max_rounds),
                        l(&r.freeze),
                    ],
                    words(&r.page_rule),
                    words(&r.chunk_rule),
                )
            },
            || self.writer_alive(Region::Plan),
        )
        .map_err(|alive| self.unstable(Region::Plan, alive))?;
        let Some((v, pw, cw)) = raw else {
            return Ok(None);
        };
        if v[0] == 0 {
            return Ok(None);
        }
        let rule = |kind, w: &[u64; RULE_WORDS]| {
            PrecopyRule::decode(kind, w).map_err(|source| SegmentError::BadRule { kind, source })
        };
        let target = fb(v[13]);
        let max_live = fb(v[20]);
        let bad = |field: &'static str, value: u64| SegmentError::BadField { field, value };
        let strategy = PlanStrategy {
            max_rounds: u32::try_from(v[21])
                .ok()
                .filter(|&r| r >= 1)
                .ok_or_else(|| bad("max_rounds", v[21]))?,
            freeze: freeze_from_code(v[22]).ok_or_else(|| bad("freeze", v[22]))?,
        };
        Ok(Some(PlanSnapshot {
            generation: v[0],
            m: fb(v[1]),
            s: fb(v[2]),
            page_rule: rule(Kind::Page, &pw)?,
            chunk_rule: rule(Kind::Chunk, &cw)?,
            predicted: PlanFigures {
                total_s: fb(v[3]),
                uptime_s: fb(v[4]),
                downtime_s: fb(v[5]),
                penalty_s: fb(v[6]),
                gamma: fb(v[7]),
                gamma_weighted: fb(v[8]),
                precopy_s: fb(v[9]),
                rounds: v[10],
                delta_t_s: fb(v[18]),
            },
            link: Link {
                bandwidth: fb(v[11]),
                rtt: fb(v[12]),
                wire: crate::model::WireCost::ONE,
            },
            downtime_target_s: (!target.is_nan()).then_some(target),
            write_scale: fb(v[14]),
            live_possible: v[15] != 0,
            max_live_s: (!max_live.is_nan()).then_some(max_live),
            downtime_limit_s: fb(v[19]),
            strategy,
            profile_fingerprint: v[17],
            published_unix_ns: v[16],
        }))
    }

    fn unstable(&self, region: Region, alive: bool) -> SegmentError {
        let path = self.path.clone();
        if alive {
            SegmentError::Busy { path, region }
        } else {
            SegmentError::WriterDied { path, region }
        }
    }

    /// Publishes telemetry (engine side). `updated_unix_ns` is stored as
    /// given (0 is replaced by the current time). The first call takes the
    /// telemetry region's writer lock ([`SegmentError::WriterBusy`] if
    /// another handle holds it).
    pub fn publish_telemetry(&self, t: &Telemetry) -> Result<(), SegmentError> {
        self.publish_telemetry_inner(t, || ())
    }

    /// Test hook: [`Segment::publish_telemetry`] that calls `pause` halfway
    /// through its stores (the region is then mid-update: `seq` odd, half
    /// the fields new). Not part of the API.
    #[doc(hidden)]
    pub fn __publish_telemetry_pausing(
        &self,
        t: &Telemetry,
        pause: impl FnOnce(),
    ) -> Result<(), SegmentError> {
        self.publish_telemetry_inner(t, pause)
    }

    fn publish_telemetry_inner(
        &self,
        t: &Telemetry,
        pause: impl FnOnce(),
    ) -> Result<(), SegmentError> {
        let r = &self.layout().telemetry;
        self.write(Region::Telemetry, &r.seq, || {
            let relaxed = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
            relaxed(&r.phase, t.phase.to_raw());
            relaxed(&r.round, t.round);
            relaxed(&r.plan_generation, t.plan_generation);
            relaxed(&r.bytes_sent, t.bytes_sent);
            relaxed(&r.pages_sent, t.pages_sent);
            relaxed(&r.chunks_sent, t.chunks_sent);
            relaxed(&r.bandwidth_bps, t.bandwidth_bps);
            pause();
            relaxed(&r.rtt_ns, t.rtt_ns);
            relaxed(&r.last_round, t.last_round);
            relaxed(&r.last_round_duration_ns, t.last_round_duration_ns);
            relaxed(&r.dirty_pages_last_round, t.dirty_pages_last_round);
            relaxed(&r.dirty_chunks_last_round, t.dirty_chunks_last_round);
            relaxed(&r.round_started_unix_ns, t.round_started_unix_ns);
            let updated = if t.updated_unix_ns == 0 {
                now_unix_ns()
            } else {
                t.updated_unix_ns
            };
            relaxed(&r.updated_unix_ns, updated);
            relaxed(&r.faults_served, t.faults_served);
        })
    }

    /// The latest telemetry: `Ok(None)` before the engine's first
    /// publication; [`SegmentError::WriterDied`] / [`SegmentError::Busy`]
    /// when the engine died or stays mid-update.
    pub fn read_telemetry(&self) -> Result<Option<Telemetry>, SegmentError> {
        let r = &self.layout().telemetry;
        read_stable(
            &r.seq,
            |s| s != 0,
            || {
                let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
                Telemetry {
                    phase: Phase::from_raw(l(&r.phase)),
                    round: l(&r.round),
                    plan_generation: l(&r.plan_generation),
                    bytes_sent: l(&r.bytes_sent),
                    pages_sent: l(&r.pages_sent),
                    chunks_sent: l(&r.chunks_sent),
                    bandwidth_bps: l(&r.bandwidth_bps),
                    rtt_ns: l(&r.rtt_ns),
                    last_round: l(&r.last_round),
                    last_round_duration_ns: l(&r.last_round_duration_ns),
                    dirty_pages_last_round: l(&r.dirty_pages_last_round),
                    dirty_chunks_last_round: l(&r.dirty_chunks_last_round),
                    round_started_unix_ns: l(&r.round_started_unix_ns),
                    updated_unix_ns: l(&r.updated_unix_ns),
                    faults_served: l(&r.faults_served),
                }
            },
            || self.writer_alive(Region::Telemetry),
        )
        .map_err(|alive| self.unstable(Region::Telemetry, alive))
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.owner {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    use super::*;
    use crate::profile::UnitCounters;
    use crate::rule::RuleMode;

    /// A unique segment path in the temp directory.
    pub(crate) fn temp_name(tag: &str) -> String {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        std::env::temp_dir()
            .join(format!("wanmig-seg-{tag}-{}-{n}", std::process::id()))
            .to_string_lossy()
            .into_owned()
    }

    /// Telemetry whose every field is derived from `i`.
    fn telemetry(i: u64) -> Telemetry {
        Telemetry {
            phase: Phase::from_raw(i % 6),
            round: i,
            plan_generation: i.wrapping_mul(3),
            bytes_sent: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
            pages_sent: !i,
            chunks_sent: i.rotate_left(17),
            bandwidth_bps: i ^ 0x5555_5555_5555_5555,
            rtt_ns: i + 7,
            last_round: i.wrapping_sub(1),
            last_round_duration_ns: i << 3,
            dirty_pages_last_round: i * 5,
            dirty_chunks_last_round: i * 11,
            round_started_unix_ns: i + 1000,
            updated_unix_ns: i + 2000,
            faults_served: i.swap_bytes(),
        }
    }

    fn plan(i: u64) -> PlanSnapshot {
        let rule = |kind, k: u64| PrecopyRule {
            kind,
            samples: (k % 1000) as u32 + 7,
            mode: RuleMode::Boundary,
            boundary: UnitCounters {
                r: (k % 7) as u32,
                w: (k % 5) as u32,
                o: (k % 3).min(k % 5) as u32,
                zero: k % 2 == 0,
            },
            take: k,
            cutoff: Some(k * 2),
            selected: k * 3,
            profile: k.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        let x = i as f64;
        PlanSnapshot {
            generation: i,
            m: x,
            s: x * 2.0,
            page_rule: rule(Kind::Page, i),
            chunk_rule: rule(Kind::Chunk, i + 1),
            predicted: PlanFigures {
                total_s: x * 3.0,
                uptime_s: x * 4.0,
                downtime_s: x * 5.0,
                penalty_s: x * 6.0,
                gamma: x * 7.0,
                gamma_weighted: x * 8.0,
                precopy_s: x * 9.0,
                rounds: i * 10,
                delta_t_s: x * 15.0,
            },
            link: Link {
                bandwidth: x * 11.0,
                rtt: x * 12.0,
                wire: crate::model::WireCost::ONE,
            },
            downtime_target_s: (i % 2 == 0).then_some(x * 13.0),
            write_scale: x * 14.0,
            live_possible: i % 3 == 0,
            max_live_s: (i % 3 == 0).then_some(x * 16.0),
            downtime_limit_s: x * 17.0,
            strategy: PlanStrategy {
                max_rounds: (i % 40) as u32 + 1,
                freeze: if i % 2 == 0 {
                    FreezePolicy::Overflow
                } else {
                    FreezePolicy::Classic
                },
            },
            profile_fingerprint: i ^ 0xfeed,
            published_unix_ns: 0,
        }
    }

    #[test]
    fn layout_and_lifecycle() {
        let name = temp_name("life");
        let seg = Segment::create(&name).unwrap();
        let meta = std::fs::metadata(&name).unwrap();
        assert_eq!(meta.len(), SEGMENT_SIZE as u64);
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // The name is taken, and a planner serves it.
        match Segment::create(&name) {
            Err(SegmentError::Exists { hint, .. }) => {
                assert!(hint.contains("running planner"), "{hint}")
            }
            r => panic!("{r:?}"),
        }
        let other = Segment::open(&name).unwrap();
        assert_eq!(other.read_plan().unwrap(), None);
        assert_eq!(other.read_telemetry().unwrap(), None);
        let g = seg.publish_plan(&plan(1)).unwrap();
        assert_eq!(g, 1);
        let got = other.read_plan().unwrap().unwrap();
        assert_eq!(got.generation, 1);
        assert_eq!(
            PlanSnapshot {
                published_unix_ns: 0,
                ..got
            },
            plan(1)
        );
        assert!(got.published_unix_ns > 0);
        other.publish_telemetry(&telemetry(42)).unwrap();
        assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(42)));
        // One writer per region: the engine handle may not publish plans,
        // and no second handle may publish telemetry.
        assert!(matches!(
            other.publish_plan(&plan(2)),
            Err(SegmentError::WriterBusy {
                region: Region::Plan,
                ..
            })
        ));
        let third = Segment::open(&name).unwrap();
        assert!(matches!(
            third.publish_telemetry(&telemetry(43)),
            Err(SegmentError::WriterBusy {
                region: Region::Telemetry,
                ..
            })
        ));
        assert!(matches!(
            third.claim_telemetry_writer(),
            Err(SegmentError::WriterBusy { .. })
        ));
        // Once the engine's handle is closed, another may take over.
        drop(other);
        third.publish_telemetry(&telemetry(44)).unwrap();
        assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(44)));
        let other = third;
        drop(other);
        assert!(Path::new(&name).exists());
        drop(seg);
        assert!(
            !Path::new(&name).exists(),
            "the creator unlinks the segment"
        );
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::Io { op: "open", .. })
        ));
    }

    #[test]
    fn open_refuses_foreign_or_broken_segments() {
        let name = temp_name("bad");
        let write = |bytes: &[u8], mode: u32| {
            let _ = std::fs::remove_file(&name);
            std::fs::write(&name, bytes).unwrap();
            std::fs::set_permissions(&name, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&[0u8; SEGMENT_SIZE], 0o644);
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::TooOpen { mode: 0o644, .. })
        ));
        write(&[0u8; SEGMENT_SIZE], 0o600);
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::BadMagic { found: 0, .. })
        ));
        write(&[0u8; 100], 0o600);
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::BadSize { found: 100, .. })
        ));
        let mut b = vec![0u8; SEGMENT_SIZE];
        b[..8].copy_from_slice(&SEGMENT_MAGIC.to_le_bytes());
        b[8] = 9;
        write(&b, 0o600);
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::BadVersion { found: 9, .. })
        ));
        std::fs::remove_file(&name).unwrap();
        assert!(matches!(
            segment_path(""),
            Err(SegmentError::BadName { .. })
        ));
        assert!(matches!(
            segment_path(".."),
            Err(SegmentError::BadName { .. })
        ));
        assert_eq!(
            segment_path("wanmig-x").unwrap(),
            Path::new("/dev/shm/wanmig-x")
        );
    }

    /// One writer per region publishes values derived from a counter as fast
    /// as it can; readers on their own mappings check that every accepted
    /// snapshot is derived from a single counter value, and that values
    /// never go backwards.
    #[test]
    fn readers_never_accept_a_torn_snapshot() {
        const N: u64 = 100_000;
        let name = temp_name("hammer");
        let seg = Segment::create(&name).unwrap();
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (name, done) = (name.clone(), done.clone());
                std::thread::spawn(move || {
                    let seg = Segment::open(&name).unwrap();
                    let (mut last_t, mut last_p, mut reads) = (0, 0, 0u64);
                    loop {
                        let finished = done.load(Ordering::Acquire);
                        if let Some(t) = seg.read_telemetry().unwrap() {
                            assert_eq!(t, telemetry(t.round), "torn telemetry");
                            assert!(t.round >= last_t);
                            last_t = t.round;
                            reads += 1;
                        }
                        if let Some(p) = seg.read_plan().unwrap() {
                            let want = PlanSnapshot {
                                published_unix_ns: p.published_unix_ns,
                                ..plan(p.generation)
                            };
                            assert_eq!(p, want, "torn plan");
                            assert!(p.generation >= last_p);
                            last_p = p.generation;
                            reads += 1;
                        }
                        if finished {
                            return (last_t, last_p, reads);
                        }
                    }
                })
            })
            .collect();
        let writer = {
            let name = name.clone();
            std::thread::spawn(move || {
                let seg = Segment::open(&name).unwrap();
                for i in 1..=N {
                    seg.publish_telemetry(&telemetry(i)).unwrap();
                    if i % 16 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        for i in 1..=N / 4 {
            assert_eq!(seg.publish_plan(&plan(i)).unwrap(), i);
            if i % 4 == 0 {
                std::thread::yield_now();
            }
        }
        writer.join().unwrap();
        done.store(true, Ordering::Release);
        for r in readers {
            let (t, p, reads) = r.join().unwrap();
            assert_eq!((t, p), (N, N / 4));
            eprintln!("reader: {reads} snapshots accepted");
            assert!(reads > 100, "{reads}");
        }
    }

    /// A writer that died mid-update (simulated: `seq` left odd, nobody
    /// holding the lock) is detected by readers at once, and the next
    /// writer to take the lock repairs the region.
    #[test]
    fn a_dead_writer_is_detected_and_its_region_repaired() {
        let name = temp_name("dead");
        let seg = Segment::create(&name).unwrap();
        {
            let engine = Segment::open(&name).unwrap();
            engine.publish_telemetry(&telemetry(1)).unwrap();
            // "Dies" between its odd and even stores: closing the handle
            // releases the lock, as the kernel does for a dead process.
            engine.layout().telemetry.seq.fetch_add(1, Ordering::SeqCst);
        }
        let before = Instant::now();
        assert!(matches!(
            seg.read_telemetry(),
            Err(SegmentError::WriterDied {
                region: Region::Telemetry,
                ..
            })
        ));
        assert!(
            before.elapsed() < READ_PATIENCE,
            "a dead writer is reported without waiting"
        );
        let engine = Segment::open(&name).unwrap();
        engine.publish_telemetry(&telemetry(2)).unwrap();
        assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(2)));
        let seq = seg.layout().telemetry.seq.load(Ordering::SeqCst);
        assert_eq!(seq % 2, 0);
        assert_eq!(seq, 6, "1 write (2), the dead one (3), the repair (5 -> 6)");
    }

    /// A live writer stuck mid-update (here: another thread, paused inside
    /// its write) is never read torn; readers report it busy; nobody else
    /// can write meanwhile; it finishes normally.
    #[test]
    fn a_stuck_live_writer_blocks_nobody_and_is_never_read_torn() {
        let name = temp_name("stuck");
        let seg = Segment::create(&name).unwrap();
        let engine = Arc::new(Segment::open(&name).unwrap());
        engine.publish_telemetry(&telemetry(1)).unwrap();
        let (paused_tx, paused_rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let writer = {
            let engine = engine.clone();
            std::thread::spawn(move || {
                engine
                    .__publish_telemetry_pausing(&telemetry(2), || {
                        paused_tx.send(()).unwrap();
                        go_rx.recv().unwrap();
                    })
                    .unwrap();
            })
        };
        paused_rx.recv().unwrap();
        assert!(matches!(
            seg.read_telemetry(),
            Err(SegmentError::Busy { .. })
        ));
        let rival = Segment::open(&name).unwrap();
        assert!(matches!(
            rival.publish_telemetry(&telemetry(3)),
            Err(SegmentError::WriterBusy { .. })
        ));
        go_tx.send(()).unwrap();
        writer.join().unwrap();
        assert_eq!(seg.read_telemetry().unwrap(), Some(telemetry(2)));
    }

    #[test]
    fn stale_segments_are_named_as_such() {
        let name = temp_name("stale");
        // A segment file nobody serves (its creator died without unlinking).
        std::fs::write(&name, vec![0u8; SEGMENT_SIZE]).unwrap();
        std::fs::set_permissions(&name, std::fs::Permissions::from_mode(0o600)).unwrap();
        match Segment::create(&name) {
            Err(SegmentError::Exists { hint, .. }) => {
                assert!(hint.contains("stale") && hint.contains("remove"), "{hint}")
            }
            r => panic!("{r:?}"),
        }
        std::fs::remove_file(&name).unwrap();
    }

    #[test]
    fn symlinks_are_not_followed() {
        let name = temp_name("link");
        let target = temp_name("target");
        let seg = Segment::create(&target).unwrap();
        std::os::unix::fs::symlink(&target, &name).unwrap();
        assert!(matches!(
            Segment::open(&name),
            Err(SegmentError::Io { op: "open", .. })
        ));
        assert!(matches!(
            Segment::create(&name),
            Err(SegmentError::Exists { .. })
        ));
        std::fs::remove_file(&name).unwrap();
        drop(seg);
    }

    #[test]
    fn undecodable_rules_are_errors_not_missing_plans() {
        let name = temp_name("badrule");
        let seg = Segment::create(&name).unwrap();
        seg.publish_plan(&plan(4)).unwrap();
        // Corrupt the page rule's sample count (word 1) in place.
        seg.layout().plan.page_rule[1].store(1 << 40, Ordering::SeqCst);
        assert!(matches!(
            seg.read_plan(),
            Err(SegmentError::BadRule {
                kind: Kind::Page,
                ..
            })
        ));
    }
}
