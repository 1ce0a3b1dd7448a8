//! The shared-memory segment between the planner and the engine.
//!
//! One file of [`SEGMENT_SIZE`] bytes in `/dev/shm` (or any path containing
//! a `/`), created with mode 0600 by the planner (`O_EXCL`) and opened by the
//! engine, which refuses a segment not owned by its own user or open to
//! group/others. The planner unlinks it when its [`Segment`] is dropped.
//! A named file rather than a memfd: the engine, a separate process started
//! independently, opens the segment by name without needing a unix socket
//! to receive a file descriptor; ownership and mode checks give the same
//! protection.
//!
//! # Layout (version 1, little-endian `u64` words, all accessed atomically)
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
//! Field offsets are fixed by `#[repr(C)]` structs of `AtomicU64` and checked
//! at compile time. Floating-point figures are stored as their IEEE-754 bits.
//!
//! # Seqlock
//!
//! Each region starts with a sequence counter, even when stable. A writer
//! makes it odd (compare-and-swap, so two writers exclude each other), issues
//! a release fence, stores every field with relaxed atomic stores, and
//! publishes `seq + 2` with a release store. A reader loads `seq` (acquire),
//! retries while it is odd, loads every field (relaxed), issues an acquire
//! fence and reloads `seq`: the snapshot is accepted only if both loads are
//! equal. If the reader saw any store of a newer write, the fences order
//! that write's odd `seq` before the second load, so the check fails: a
//! torn snapshot is never accepted. Every access is atomic, so there is no
//! data race in Rust's memory model, across threads or processes (each
//! process maps the same physical page).
//!
//! A writer that finds `seq` odd for longer than [`STALE_WRITER`] (a
//! writer that died mid-update) takes the region over by moving `seq` to the
//! next odd value, so readers still see a change. Readers give up (return
//! `None`) after [`READ_ATTEMPTS`] unstable attempts.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering, fence};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use zerocopy::{FromBytes, IntoBytes, KnownLayout};

use crate::model::Link;
use crate::plan::Plan;
use crate::profile::Kind;
use crate::rule::{PrecopyRule, RULE_WORDS, RuleDecodeError};

/// `"WMSEG\0\0\x01"` as a little-endian word.
pub const SEGMENT_MAGIC: u64 = u64::from_le_bytes(*b"WMSEG\0\0\x01");
/// The layout version.
pub const LAYOUT_VERSION: u64 = 1;
/// The segment size in bytes.
pub const SEGMENT_SIZE: usize = 4096;
/// How long a writer waits on an odd sequence before taking over.
pub const STALE_WRITER: Duration = Duration::from_millis(200);
/// Unstable read attempts before a reader gives up.
pub const READ_ATTEMPTS: u32 = 100_000;

/// Segment header.
#[derive(Debug, FromBytes, IntoBytes, KnownLayout)]
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
#[derive(Debug, FromBytes, IntoBytes, KnownLayout)]
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
    /// Reserved.
    pub reserved: [AtomicU64; 28],
}

/// The telemetry region (written by the engine).
#[derive(Debug, FromBytes, IntoBytes, KnownLayout)]
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
#[derive(Debug, FromBytes, IntoBytes, KnownLayout)]
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
    assert!(size_of::<HeaderRegion>() == 64);
    assert!(size_of::<PlanRegion>() == 512);
    assert!(size_of::<TelemetryRegion>() == 512);
    assert!(size_of::<SegmentLayout>() == SEGMENT_SIZE);
    assert!(offset_of!(SegmentLayout, plan) == 128);
    assert!(offset_of!(SegmentLayout, telemetry) == 640);
    assert!(offset_of!(PlanRegion, page_rule) == 32);
    assert!(offset_of!(PlanRegion, chunk_rule) == 104);
    assert!(offset_of!(PlanRegion, total_s) == 176);
    assert!(offset_of!(PlanRegion, published_unix_ns) == 280);
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
            },
            link: plan.link,
            downtime_target_s: plan.params.downtime_target,
            write_scale: plan.params.write_scale,
            live_possible: plan.search.live.possible,
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
    /// Creating, opening, sizing or mapping failed.
    #[error("segment {path}: {op}: {source}")]
    Io {
        /// The segment path.
        path: PathBuf,
        /// The operation.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
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
    #[error("segment plan region: {kind} rule: {source}")]
    BadRule {
        /// Pages or chunks.
        kind: Kind,
        /// The decode error.
        source: RuleDecodeError,
    },
}

/// A mapped segment.
pub struct Segment {
    path: PathBuf,
    map: memmap2::MmapRaw,
    owner: bool,
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

/// Starts a write: makes `seq` odd and returns the value to publish at the end.
fn write_begin(seq: &AtomicU64) -> u64 {
    let mut odd_since: Option<Instant> = None;
    let mut spins = 0u32;
    loop {
        let s = seq.load(Ordering::Relaxed);
        let next = if s & 1 == 0 {
            odd_since = None;
            s + 1
        } else {
            // Another writer is mid-update, or died there.
            let since = *odd_since.get_or_insert_with(Instant::now);
            if since.elapsed() < STALE_WRITER {
                spins += 1;
                if spins % 64 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
                continue;
            }
            s + 2
        };
        if seq
            .compare_exchange_weak(s, next, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            fence(Ordering::Release);
            return next + 1;
        }
    }
}

/// Reads a consistent snapshot with `read`, or `None` if the region never
/// became stable, or if `accept(seq)` refuses the sequence value.
fn read_stable<T>(
    seq: &AtomicU64,
    accept: impl Fn(u64) -> bool,
    read: impl Fn() -> T,
) -> Option<T> {
    for attempt in 0..READ_ATTEMPTS {
        let s1 = seq.load(Ordering::Acquire);
        if s1 & 1 == 0 {
            if !accept(s1) {
                return None;
            }
            let v = read();
            fence(Ordering::Acquire);
            if seq.load(Ordering::Relaxed) == s1 {
                return Some(v);
            }
        }
        if attempt % 64 == 63 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    None
}

impl Segment {
    /// Creates a new segment (fails if it exists), mode 0600, and
    /// initialises its header. The segment is unlinked when this handle is
    /// dropped.
    pub fn create(name: &str) -> Result<Segment, SegmentError> {
        let path = segment_path(name)?;
        let io = |op, source| SegmentError::Io {
            path: path.clone(),
            op,
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| io("create", e))?;
        let cleanup = |e: SegmentError| {
            let _ = std::fs::remove_file(&path);
            e
        };
        file.set_len(SEGMENT_SIZE as u64)
            .map_err(|e| cleanup(io("ftruncate", e)))?;
        let map = Self::map(&path, &file).map_err(cleanup)?;
        let seg = Segment {
            path: path.clone(),
            map,
            owner: true,
        };
        let h = &seg.layout().header;
        h.version.store(LAYOUT_VERSION, Ordering::Relaxed);
        h.size.store(SEGMENT_SIZE as u64, Ordering::Relaxed);
        h.creator_pid
            .store(std::process::id().into(), Ordering::Relaxed);
        h.magic.store(SEGMENT_MAGIC, Ordering::Release);
        Ok(seg)
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

    /// Opens an existing segment, checking owner, mode, size, magic and
    /// version. Dropping the handle does not unlink it.
    pub fn open(name: &str) -> Result<Segment, SegmentError> {
        let path = segment_path(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
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
            path,
            owner: false,
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
        // `SegmentLayout` is `repr(C)` and made only of `AtomicU64`s: every
        // bit pattern is valid (`FromBytes`), and all access goes through
        // atomic operations, which is sound for memory shared with other
        // threads and processes. No `&mut` to this memory is ever created.
        unsafe { &*self.map.as_ptr().cast::<SegmentLayout>() }
    }

    /// Publishes a plan (planner side) under the next generation, which is
    /// returned. The snapshot's `generation` and `published_unix_ns` are
    /// replaced.
    pub fn publish_plan(&self, plan: &PlanSnapshot) -> u64 {
        let r = &self.layout().plan;
        let end = write_begin(&r.seq);
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
        r.seq.store(end, Ordering::Release);
        generation
    }

    /// The current plan, or `None` before the first publication (or if the
    /// region never became stable, see the module docs).
    pub fn read_plan(&self) -> Option<PlanSnapshot> {
        self.try_read_plan().ok().flatten()
    }

    /// Like [`Segment::read_plan`], but reports an undecodable rule.
    pub fn try_read_plan(&self) -> Result<Option<PlanSnapshot>, SegmentError> {
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
                    ],
                    words(&r.page_rule),
                    words(&r.chunk_rule),
                )
            },
        );
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
            },
            link: Link {
                bandwidth: fb(v[11]),
                rtt: fb(v[12]),
            },
            downtime_target_s: (!target.is_nan()).then_some(target),
            write_scale: fb(v[14]),
            live_possible: v[15] != 0,
            published_unix_ns: v[16],
        }))
    }

    /// Publishes telemetry (engine side). `updated_unix_ns` is stored as
    /// given (0 is replaced by the current time).
    pub fn publish_telemetry(&self, t: &Telemetry) {
        let r = &self.layout().telemetry;
        let end = write_begin(&r.seq);
        let relaxed = |a: &AtomicU64, v: u64| a.store(v, Ordering::Relaxed);
        relaxed(&r.phase, t.phase.to_raw());
        relaxed(&r.round, t.round);
        relaxed(&r.plan_generation, t.plan_generation);
        relaxed(&r.bytes_sent, t.bytes_sent);
        relaxed(&r.pages_sent, t.pages_sent);
        relaxed(&r.chunks_sent, t.chunks_sent);
        relaxed(&r.bandwidth_bps, t.bandwidth_bps);
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
        r.seq.store(end, Ordering::Release);
    }

    /// The latest telemetry, or `None` before the engine's first publication.
    pub fn read_telemetry(&self) -> Option<Telemetry> {
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
        )
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
            samples: (k % 1000) as u32 + 1,
            mode: RuleMode::Boundary,
            boundary: UnitCounters {
                r: (k % 7) as u32,
                w: (k % 5) as u32,
                o: (k % 3) as u32,
                zero: k % 2 == 0,
            },
            take: k,
            cutoff: Some(k * 2),
            selected: k * 3,
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
            },
            link: Link {
                bandwidth: x * 11.0,
                rtt: x * 12.0,
            },
            downtime_target_s: (i % 2 == 0).then_some(x * 13.0),
            write_scale: x * 14.0,
            live_possible: i % 3 == 0,
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
        assert!(matches!(
            Segment::create(&name),
            Err(SegmentError::Io { op: "create", .. })
        ));
        let other = Segment::open(&name).unwrap();
        assert_eq!(other.read_plan(), None);
        assert_eq!(other.read_telemetry(), None);
        let g = seg.publish_plan(&plan(1));
        assert_eq!(g, 1);
        let got = other.read_plan().unwrap();
        assert_eq!(got.generation, 1);
        assert_eq!(
            PlanSnapshot {
                published_unix_ns: 0,
                ..got
            },
            plan(1)
        );
        assert!(got.published_unix_ns > 0);
        other.publish_telemetry(&telemetry(42));
        assert_eq!(seg.read_telemetry(), Some(telemetry(42)));
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
                        if let Some(t) = seg.read_telemetry() {
                            assert_eq!(t, telemetry(t.round), "torn telemetry");
                            assert!(t.round >= last_t);
                            last_t = t.round;
                            reads += 1;
                        }
                        if let Some(p) = seg.read_plan() {
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
                    seg.publish_telemetry(&telemetry(i));
                    if i % 16 == 0 {
                        std::thread::yield_now();
                    }
                }
            })
        };
        for i in 1..=N / 4 {
            assert_eq!(seg.publish_plan(&plan(i)), i);
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

    #[test]
    fn a_writer_that_died_mid_update_is_taken_over() {
        let name = temp_name("stale");
        let seg = Segment::create(&name).unwrap();
        seg.publish_telemetry(&telemetry(1));
        // Simulate a writer killed between its odd and even stores.
        let seq = &seg.layout().telemetry.seq;
        seq.fetch_add(1, Ordering::SeqCst);
        assert_eq!(
            seg.read_telemetry(),
            None,
            "a reader gives up on a stuck region"
        );
        let before = Instant::now();
        seg.publish_telemetry(&telemetry(2));
        assert!(before.elapsed() >= STALE_WRITER);
        assert_eq!(seg.read_telemetry(), Some(telemetry(2)));
        assert_eq!(seq.load(Ordering::SeqCst) % 2, 0);
    }
}
