//! The destination engine: fills guest RAM before the resume, loads the
//! device state, resumes the guest when the source commits, then installs
//! the post-copy push while serving the guest's faults ahead of it.
//!
//! ```text
//! pre-copy     rounds: pages written with pwrite (all-zero ones left as
//!              holes, known zero), ZeroPages announcements; disk chunks
//!              stored whole in the post-copy images
//! Freeze       the dirty remainder, AbsentPages / AbsentChunks for the
//!              dirty units it had no room for (dropped here: post-copied),
//!              ZeroPages for every page the source has not populated, the
//!              device state pieces (a deadline runs from Freeze until the
//!              device state is loaded)
//! DeviceStateEnd
//!              start the fault threads, load the device state, send Loaded;
//!              any failure up to here: Abort{DestinationFailed} to the
//!              source, which resumes the guest there
//! Loaded       wait for the source's decision: PostcopyBegin or Abort
//! PostcopyBegin
//!              (the commit) resume the guest, send Resumed; install the
//!              push (a chunk only into blocks the guest has not written),
//!              serve faults (the images' chunk requests go out on the fault
//!              connection too); Done, digests, Goodbye
//! complete     every page here: integrity check, stop the fault requester,
//!              release the guest, then let the answer thread go
//! ```
//!
//! Three threads:
//! - the bulk receiver (the caller's thread) writes pre-copy pages with
//!   `pwrite`, loads the device state, resumes the guest and installs pushed
//!   pages with `UFFDIO_COPY` in batches (flushed whenever the receive buffer
//!   runs dry, and at least every millisecond);
//! - the fault requester waits on the userfaultfd and, for a page that is
//!   neither here nor known to be zero, sends a request on the fault
//!   connection (zero pages, and pages already here, are installed locally as
//!   zero pages: a page here gets `EEXIST` and a wake, a page discarded since
//!   reads as zero);
//! - the fault-answer receiver installs the answers.
//!
//! The post-copy penalty P is every wait of the guest for something that
//! has not arrived, from the resume on: each fault on a page not here
//! (whatever its state: absent, already requested by another fault or the
//! sweep, on its way in the push, or a zero page the requester installs)
//! from the moment the requester sees it until the page is in place, and
//! each guest disk request that waits for chunks (the post-copy images time
//! those); overlapping waits count once (the length of their union).
//!
//! The fault threads start before the device state is loaded: QEMU touches
//! guest RAM while loading it. After the commit the destination owns the
//! guest, and every way out goes through the same end: if pages are missing
//! (the bulk connection broke, say) it fetches every one still absent over
//! the fault connection; once none is missing it releases the guest's memory
//! *before* it lets the fault threads go (so no vCPU ever waits on a page
//! nobody serves), and a bulk failure then costs only the integrity check.
//! If pages are still missing in the end, the guest is stopped (they would
//! read as zeros) and the migration is reported incomplete.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::EngineError;
use super::page_states::{PageState, PageStates};
use super::source::page_bitmap;
use crate::backend::{DestBackend, Install, PageInstaller};
use crate::connection::{Connection, ConnectionPair};
use crate::storage::{DestDisks, StorageCounters};
use crate::transport::{Flow, FrameHandler, FrameReceiver, RecvEnd, RecvError};
use crate::uffd::DirtyBitmap;
use crate::unit_stream::UnitSender;
use crate::wire::{
    AbortReason, ControlCode, DEVICE_STATE_PIECE, Encoding, FrameDecoder, FrameRef,
    MAX_REQUEST_UNITS, UnitKind, UnitPayload,
};

/// Tuning of the destination engine.
#[derive(Debug, Clone, PartialEq)]
pub struct DestConfig {
    /// Never resume the guest: it stays paused with every page in place, so
    /// its RAM can be compared with the source's frozen RAM (a check mode; the
    /// caller resumes it).
    pub hold: bool,
    /// The Γ window: stalls met during the first `dt` after the resume.
    pub dt: Duration,
    /// How long to wait for the last pages after the push ended (or broke).
    pub completion_timeout: Duration,
    /// From `Freeze` until the device state is loaded, at most this long.
    /// (After `Loaded` the destination waits for the source's decision: only
    /// the source decides where the guest runs.)
    pub freeze_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            hold: false,
            dt: Duration::from_secs(20),
            completion_timeout: Duration::from_secs(120),
            freeze_timeout: Duration::from_secs(60),
        }
    }
}

/// Instants of the destination's milestones.
#[derive(Debug, Clone, Copy)]
pub struct DestTimes {
    /// `Freeze` arrived.
    pub freeze_received: Instant,
    /// The guest runs here.
    pub resumed: Instant,
    /// Every page is here.
    pub complete: Instant,
}

/// The end-to-end integrity check of the guest's memory: present only if
/// it ran (every digest arrived and nothing failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IntegrityReport {
    /// Pages compared with the source's frozen pages (every page the guest
    /// has not written since the resume), `holes` included: of these,
    /// [`populated_compared`](Self::populated_compared) held data.
    pub pages_compared: u64,
    /// Compared pages whose digest differs (holes included).
    pub pages_differing: u64,
    /// Pages skipped because the guest wrote them after the resume.
    pub pages_written_since_resume: u64,
    /// Of the pages compared, those no data of which ever came from the
    /// source: the pages it announced as holding nothing (`ZeroPages`: never
    /// populated there, or a post-copy page all zeros since round 0). They
    /// read as zeros here (QEMU: a hole of the RAM file) or are no memory at
    /// all (a Xen guest's physmap holes, compared without a read); comparing
    /// them shows only that nothing stale is there.
    pub holes: u64,
}

impl IntegrityReport {
    /// Pages compared that hold data from the source (`pages_compared -
    /// holes`): the count that shows the guest's memory arrived.
    pub fn populated_compared(&self) -> u64 {
        self.pages_compared.saturating_sub(self.holes)
    }
}

/// What the destination did with the guest's disks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestStorageReport {
    /// Chunks received before the resume (with resends).
    pub precopy_chunks: u64,
    /// Chunks received from the push.
    pub pushed_chunks: u64,
    /// The images' counters: chunks fetched on demand, whole-block
    /// overwrites (no fetch), partial-block merges.
    pub counters: StorageCounters,
    /// Whether the chunk comparison ran (every chunk digest arrived and
    /// nothing failed); if not, `chunks_compared` and `chunks_differing` are
    /// 0 and prove nothing.
    pub chunks_checked: bool,
    /// Chunks compared with the source's frozen chunks (those the guest has
    /// not modified since the resume).
    pub chunks_compared: u64,
    /// Compared chunks whose digest differs.
    pub chunks_differing: u64,
}

/// One wait of the guest, `(start, end)` on this host's monotonic clock.
type Wait = (Instant, Instant);

/// The union of `waits` from `from` on (a wait that began earlier counts
/// from `from`): sorted, disjoint, non-empty intervals.
fn union_from(waits: &[Wait], from: Instant) -> Vec<Wait> {
    let mut v: Vec<Wait> = waits
        .iter()
        .map(|&(a, b)| (a.max(from), b))
        .filter(|(a, b)| b > a)
        .collect();
    v.sort_unstable_by_key(|w| w.0);
    let mut out: Vec<Wait> = Vec::with_capacity(v.len());
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Seconds of `union` (disjoint intervals).
fn seconds(union: &[Wait]) -> f64 {
    union
        .iter()
        .map(|&(a, b)| (b - a).as_secs_f64())
        // Folded from +0.0: an empty f64 sum is -0.0.
        .fold(0.0, |x, y| x + y)
}

/// Seconds of `union` (disjoint intervals) before `end`.
fn seconds_before(union: &[Wait], end: Instant) -> f64 {
    union
        .iter()
        .filter(|(a, _)| *a < end)
        .map(|&(a, b)| b.min(end).saturating_duration_since(a).as_secs_f64())
        // Folded from +0.0: an empty f64 sum is -0.0.
        .fold(0.0, |x, y| x + y)
}

/// The guest's waits after the resume, as the report shows them.
#[derive(Debug, Clone)]
struct WaitFigures {
    /// The union of every wait (pages and chunks), s: the penalty P.
    penalty_s: f64,
    /// Its part within the Γ window, s.
    penalty_in_window_s: f64,
    /// The union of the page waits alone, s.
    page_stall_s: f64,
    /// The union of the chunk waits alone, s.
    chunk_stall_s: f64,
    /// The longest single wait, s.
    max_stall_s: f64,
    timeline: FaultTimeline,
}

impl WaitFigures {
    /// The figures of page waits `pages` and chunk waits `chunks`, counted
    /// from `resumed` (what came before is downtime), the Γ window `dt`
    /// after it.
    fn of(pages: &[Wait], chunks: &[Wait], resumed: Instant, dt: Duration) -> WaitFigures {
        let all: Vec<Wait> = pages.iter().chain(chunks).copied().collect();
        let union = union_from(&all, resumed);
        WaitFigures {
            penalty_s: seconds(&union),
            penalty_in_window_s: seconds_before(&union, resumed + dt),
            page_stall_s: seconds(&union_from(pages, resumed)),
            chunk_stall_s: seconds(&union_from(chunks, resumed)),
            max_stall_s: all
                .iter()
                .map(|&(a, b)| b.saturating_duration_since(a.max(resumed)).as_secs_f64())
                .fold(0.0, f64::max),
            timeline: FaultTimeline::of(&all, resumed),
        }
    }
}

/// The guest's post-copy waits over time: per bin of [`FaultTimeline::BIN`]
/// after the resume, the waits (page faults and disk chunk waits) that
/// started in it and the time the guest spent waiting in it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FaultTimeline {
    /// The bins' width, s.
    pub bin_s: f64,
    /// Waits that started in each bin (a wait that began before the resume
    /// is in the first).
    pub faults: Vec<u32>,
    /// Time within each bin during which the guest waited (the union of
    /// the waits, overlaps counted once), s: the bins add up to P.
    pub stall_s: Vec<f64>,
}

impl FaultTimeline {
    /// The bins' width.
    pub const BIN: Duration = Duration::from_millis(250);

    /// Bins `waits` (start, end) from `resumed` on; the part of a wait
    /// before `resumed` is left out (it is downtime).
    pub fn of(waits: &[(Instant, Instant)], resumed: Instant) -> FaultTimeline {
        let bin = Self::BIN;
        let mut t = FaultTimeline {
            bin_s: bin.as_secs_f64(),
            ..FaultTimeline::default()
        };
        let index = |at: Instant| {
            (at.saturating_duration_since(resumed).as_nanos() / bin.as_nanos()) as usize
        };
        let grow = |t: &mut FaultTimeline, i: usize| {
            if t.faults.len() <= i {
                t.faults.resize(i + 1, 0);
                t.stall_s.resize(i + 1, 0.0);
            }
        };
        for &(start, end) in waits {
            if end <= resumed {
                continue;
            }
            let i = index(start);
            grow(&mut t, i);
            t.faults[i] += 1;
        }
        for (a, b) in union_from(waits, resumed) {
            let mut at = a;
            while at < b {
                let i = index(at);
                let bin_end = resumed + bin * (i as u32 + 1);
                let to = b.min(bin_end);
                grow(&mut t, i);
                t.stall_s[i] += (to - at).as_secs_f64();
                at = to;
            }
        }
        t
    }
}

/// What the destination did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DestReport {
    /// How the destination's bytes travelled (I/O backend, cipher).
    pub io: crate::transport::IoPath,
    /// Pre-copy pages received (with resends).
    pub precopy_pages: u64,
    /// Post-copy pages installed from the push.
    pub pushed_pages: u64,
    /// Post-copy faults that fetched a page from the source.
    pub faults: u64,
    /// Post-copy faults on a page already on its way (requested by an
    /// earlier fault or the sweep): no new request, but timed.
    pub faults_in_flight: u64,
    /// Faults on zero pages, served locally.
    pub zero_faults: u64,
    /// Pages fetched over the fault connection because the bulk connection
    /// ended early.
    pub swept_pages: u64,
    /// The post-copy penalty P, s: the wall time after the resume during
    /// which the guest waited for anything that had not arrived, page
    /// faults (whatever the page's state: absent, on its way, or a zero
    /// page installed here) and disk requests waiting for chunks alike,
    /// overlapping waits counted once (the length of their union). At most
    /// `page_stall_s + chunk_stall_s`.
    pub penalty_s: f64,
    /// Of that, the part within the first `dt` after the resume (the Γ
    /// window), s.
    pub penalty_in_window_s: f64,
    /// The page faults' share alone: the union of their waits, s.
    pub page_stall_s: f64,
    /// The disks' share alone: the union of the guest's disk requests'
    /// waits for chunks, s.
    pub chunk_stall_s: f64,
    /// Guest disk requests that waited for chunks (reads of absent data,
    /// partial-block writes fetching first) after the resume.
    pub chunk_waits: u64,
    /// Longest single wait (a page fault or a chunk wait), s.
    pub max_stall_s: f64,
    /// The guest's waits over the post-copy, in bins after the resume (its
    /// `stall_s` adds up to `penalty_s`).
    pub fault_timeline: FaultTimeline,
    /// Device state bytes.
    pub device_state_bytes: u64,
    /// Post-copy duration (resume to every page here), s.
    pub uptime_s: f64,
    /// Integrity check (when the source sent digests).
    pub integrity: Option<IntegrityReport>,
    /// The disks' side, if the guest has disks.
    pub storage: Option<DestStorageReport>,
    /// A failure after the commit that cost the guest nothing: the bulk
    /// connection broke but every page arrived anyway (then there is no
    /// integrity check), or something failed once every page was here
    /// (stopping the fault threads, the goodbye).
    pub late_error: Option<String>,
    /// Milestones.
    #[serde(skip)]
    pub times: Option<DestTimes>,
}

/// Page-fault waits, shared by the three threads. A fault on a page that
/// is not here opens a wait (the earliest fault on the page, if several
/// vCPUs fault on it); the page's arrival closes it. A fault the requester
/// serves itself (a zero page) is a wait closed as it is served.
#[derive(Debug, Default)]
struct Stalls {
    pending: Mutex<HashMap<u64, Instant>>,
    done: Mutex<Vec<Wait>>,
}

impl Stalls {
    /// A fault on page `p`, seen at `at`, waits for the page, which is on
    /// its way (requested). If it arrived meanwhile the wait ends now: no
    /// wait is left open, whichever thread gets there first.
    fn started(&self, p: u64, at: Instant, states: &PageStates) {
        self.pending
            .lock()
            .expect("stall lock")
            .entry(p)
            .or_insert(at);
        if states.get(p) == PageState::Present {
            self.resolved(p, Instant::now());
        }
    }

    /// Page `p` is in place: closes its wait, if one is open.
    fn resolved(&self, p: u64, at: Instant) {
        if let Some(t) = self.pending.lock().expect("stall lock").remove(&p) {
            self.done.lock().expect("stall lock").push((t, at.max(t)));
        }
    }

    /// A wait from `start` to `end` that no arrival closes.
    fn served(&self, start: Instant, end: Instant) {
        self.done
            .lock()
            .expect("stall lock")
            .push((start, end.max(start)));
    }
}

/// What the three threads share.
#[derive(Debug)]
struct Shared {
    states: PageStates,
    stalls: Stalls,
    /// The requester must say goodbye.
    stop: AtomicBool,
    /// The requester must request every page still absent.
    sweep: AtomicBool,
    /// The guest runs: fault stalls are post-copy penalty (not QEMU loading
    /// the device state).
    running: AtomicBool,
    /// Faults after the resume that sent a request.
    faults: AtomicU64,
    /// Faults after the resume on a page already requested.
    faults_in_flight: AtomicU64,
    zero_faults: AtomicU64,
    swept: AtomicU64,
}

impl Shared {
    /// Page `p` is in place; resolves its stall if a fault was waiting.
    fn arrived(&self, p: u64, at: Instant) {
        if self.states.swap(p, PageState::Present) == PageState::Requested {
            self.stalls.resolved(p, at);
        }
    }
}

/// Consecutive pushed pages gathered for one `install_run`.
#[derive(Debug)]
struct InstallRun {
    ps: usize,
    first: u64,
    len: usize,
    started: Instant,
    buf: Vec<u8>,
}

impl InstallRun {
    /// Pages per batch (1 MiB of 4 KiB pages).
    const MAX: usize = 256;
    /// The longest a pushed page waits in a batch.
    const MAX_AGE: Duration = Duration::from_millis(1);

    fn new(ps: usize) -> Self {
        InstallRun {
            ps,
            first: 0,
            len: 0,
            started: Instant::now(),
            buf: vec![0; ps * Self::MAX],
        }
    }

    fn extends(&self, p: u64) -> bool {
        self.len > 0 && self.len < Self::MAX && p == self.first + self.len as u64
    }

    fn start(&mut self, p: u64) {
        self.first = p;
        self.len = 0;
        self.started = Instant::now();
    }

    /// The slot for the next page.
    fn push(&mut self) -> &mut [u8] {
        let at = self.len * self.ps;
        self.len += 1;
        &mut self.buf[at..at + self.ps]
    }

    fn stale(&self) -> bool {
        self.len > 0 && self.started.elapsed() >= Self::MAX_AGE
    }

    fn flush(&mut self, installer: &dyn PageInstaller, shared: &Shared) -> Result<(), EngineError> {
        if self.len == 0 {
            return Ok(());
        }
        installer.install_run(self.first, &self.buf[..self.len * self.ps])?;
        let now = Instant::now();
        for p in self.first..self.first + self.len as u64 {
            shared.arrived(p, now);
        }
        self.len = 0;
        Ok(())
    }
}

/// The fault threads.
#[derive(Debug)]
struct Workers {
    requester: Option<Worker>,
    answers: Option<Worker>,
    /// The fault connection's socket, to cut the answer thread loose.
    sock: TcpStream,
}

type Worker = std::thread::JoinHandle<Result<(), EngineError>>;

/// How long the answer thread gets to see the source's goodbye.
const ANSWERS_GRACE: Duration = Duration::from_secs(2);
/// How often the bulk receiver looks at the fault threads while idle.
const WORKER_CHECK: Duration = Duration::from_millis(50);

impl Workers {
    /// An error if a fault thread ended while it is still needed.
    fn check(&self) -> Result<(), EngineError> {
        if self.requester.as_ref().is_none_or(|w| w.is_finished()) {
            return Err(EngineError::WorkerStopped("fault requester"));
        }
        if self.answers.as_ref().is_none_or(|w| w.is_finished()) {
            return Err(EngineError::WorkerStopped("fault answers"));
        }
        Ok(())
    }

    fn requester_alive(&self) -> bool {
        self.requester.as_ref().is_some_and(|w| !w.is_finished())
    }

    fn answers_alive(&self) -> bool {
        self.answers.as_ref().is_some_and(|w| !w.is_finished())
    }

    /// Stops the requester (it says goodbye on the fault connection) and
    /// waits for it.
    fn stop_requester(&mut self, shared: &Shared) -> Result<(), EngineError> {
        shared.stop.store(true, Ordering::Release);
        match self.requester.take() {
            Some(w) => w
                .join()
                .map_err(|_| EngineError::Panicked("fault requester"))?,
            None => Ok(()),
        }
    }

    /// Waits a little for the answer thread to see the source's goodbye,
    /// then cuts the connection under it.
    fn end_answers(&mut self) -> Result<(), EngineError> {
        let Some(w) = self.answers.take() else {
            return Ok(());
        };
        let deadline = Instant::now() + ANSWERS_GRACE;
        while !w.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if !w.is_finished() {
            let _ = self.sock.shutdown(std::net::Shutdown::Both);
        }
        w.join()
            .map_err(|_| EngineError::Panicked("fault answers"))?
    }

    /// Stops both threads at once; returns how they ended.
    fn abandon(mut self, shared: &Shared) -> (Result<(), EngineError>, Result<(), EngineError>) {
        let requester = self.stop_requester(shared);
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        (requester, self.end_answers())
    }
}

/// `cause`, with a thread found stopped replaced by that thread's own error.
fn explain(
    cause: Option<EngineError>,
    requester: &mut Result<(), EngineError>,
    answers: &mut Result<(), EngineError>,
) -> Option<EngineError> {
    let own = |r: &mut Result<(), EngineError>| std::mem::replace(r, Ok(())).err();
    match cause {
        Some(EngineError::WorkerStopped(which)) => {
            let found = if which == "fault requester" {
                own(requester)
            } else {
                own(answers)
            };
            Some(found.unwrap_or(EngineError::WorkerStopped(which)))
        }
        other => other,
    }
}

/// Where the bulk stream is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    /// Live rounds.
    Precopy,
    /// `Freeze` arrived: remainder, zero pages, device state.
    Frozen,
    /// Device state loaded, `Loaded` sent: waiting for the source's decision.
    Loaded,
    /// `PostcopyBegin` arrived (the commit): the push.
    Postcopy,
    /// `Done` arrived: digests.
    PushDone,
    /// `Goodbye` arrived.
    Ended,
}

/// The bulk receiver's state.
struct Bulk<'a> {
    backend: &'a mut dyn DestBackend,
    cfg: &'a DestConfig,
    shared: Arc<Shared>,
    installer: Arc<dyn PageInstaller>,
    tx: &'a mut UnitSender,
    fault: Option<Connection>,
    workers: Option<Workers>,
    pages: u64,
    ps: usize,
    phase: Phase,
    /// The open round and the pages received in it.
    round: Option<(u64, u64)>,
    next_round: u64,
    /// Units received on the connection.
    units: u64,
    page: Vec<u8>,
    device_state: Vec<u8>,
    /// Length of each device-state piece received.
    pieces: Vec<Option<u32>>,
    device_state_bytes: u64,
    /// Pages the push may still bring (absent when the device state ended).
    pushable: Option<DirtyBitmap>,
    /// Pages whose last word from the source before the commit was
    /// `ZeroPages` (nothing there): no data of theirs crossed the link.
    announced: DirtyBitmap,
    run: InstallRun,
    precopy_pages: u64,
    pushed_pages: u64,
    digests: Vec<u32>,
    freeze_received: Option<Instant>,
    resumed: Option<Instant>,
    /// The guest's disks.
    disks: Option<Arc<DestDisks>>,
    chunk: Vec<u8>,
    chunk_digests: Vec<u32>,
    storage: DestStorageReport,
}

fn protocol<T>(what: impl Into<String>) -> Result<T, EngineError> {
    Err(EngineError::Protocol(what.into()))
}

impl Bulk<'_> {
    /// A page before the guest can run: written to the file (an all-zero
    /// page becomes a hole known to be zero).
    fn precopy_page(&mut self, index: u64, payload: &UnitPayload<'_>) -> Result<(), EngineError> {
        self.announced.unset(index);
        let states = &self.shared.states;
        if payload.encoding() == Encoding::Zero {
            let was_present = states.swap(index, PageState::Zero) == PageState::Present;
            self.backend.zero_page(index, was_present)?;
        } else {
            payload.unpack_into(&mut self.page)?;
            self.backend.write_page(index, &self.page)?;
            states.set(index, PageState::Present);
        }
        self.precopy_pages += 1;
        Ok(())
    }

    /// A pushed page: installed atomically (QEMU may fault on it), waking
    /// its waiters, consecutive pages in one batch.
    fn pushed_page(&mut self, index: u64, payload: &UnitPayload<'_>) -> Result<(), EngineError> {
        let pushable = self.pushable.as_mut().expect("set at DeviceStateEnd");
        if !pushable.get(index) {
            return protocol(format!(
                "page {index} pushed, but it was here before the commit or pushed already"
            ));
        }
        pushable.unset(index);
        self.pushed_pages += 1;
        if self.shared.states.get(index) == PageState::Present {
            // A fault fetched it first.
            return Ok(());
        }
        if !self.run.extends(index) {
            self.run.flush(self.installer.as_ref(), &self.shared)?;
            self.run.start(index);
        }
        if let Err(e) = payload.unpack_into(self.run.push()) {
            self.run.len -= 1;
            return Err(e.into());
        }
        if self.run.stale() {
            self.run.flush(self.installer.as_ref(), &self.shared)?;
        }
        Ok(())
    }

    /// A disk chunk: stored whole before the resume, afterwards only into
    /// the blocks still absent (the guest's writes win).
    fn chunk_unit(&mut self, index: u64, payload: &UnitPayload<'_>) -> Result<(), EngineError> {
        let Some(disks) = self.disks.clone() else {
            return protocol(format!("chunk {index}, but the guest has no disk"));
        };
        let data = if payload.encoding() == Encoding::Zero {
            None
        } else {
            self.chunk.resize(payload.unit_len() as usize, 0);
            payload.unpack_into(&mut self.chunk)?;
            Some(&self.chunk[..])
        };
        if self.phase < Phase::Postcopy {
            disks.store(index, data)?;
            self.storage.precopy_chunks += 1;
        } else {
            disks.install(index, data)?;
            self.storage.pushed_chunks += 1;
        }
        Ok(())
    }

    fn device_state_piece(
        &mut self,
        index: u64,
        payload: &UnitPayload<'_>,
    ) -> Result<(), EngineError> {
        let i = index as usize;
        if self.pieces.len() <= i {
            self.pieces.resize(i + 1, None);
        }
        if self.pieces[i].is_some() {
            return protocol(format!("device-state piece {index} sent twice"));
        }
        let len = payload.unit_len() as usize;
        self.pieces[i] = Some(len as u32);
        let at = i * DEVICE_STATE_PIECE as usize;
        if self.device_state.len() < at + len {
            self.device_state.resize(at + len, 0);
        }
        payload.unpack_into(&mut self.device_state[at..at + len])?;
        Ok(())
    }

    /// Exactly pieces `0..ceil(total / PIECE)`, each whole but the last.
    fn device_state_complete(&mut self, total: u64) -> Result<(), EngineError> {
        let piece = u64::from(DEVICE_STATE_PIECE);
        let n = total.div_ceil(piece);
        if self.pieces.len() as u64 != n {
            return protocol(format!(
                "device state of {total} bytes announced, pieces up to {} received",
                self.pieces.len()
            ));
        }
        for (i, got) in self.pieces.iter().enumerate() {
            let i = i as u64;
            let want = if i + 1 == n { total - i * piece } else { piece };
            if *got != Some(want as u32) {
                return protocol(format!(
                    "device-state piece {i}: {got:?} bytes received, {want} expected"
                ));
            }
        }
        self.device_state.truncate(total as usize);
        self.device_state_bytes = total;
        Ok(())
    }

    /// The device state is all here: fault threads, load, `Loaded`.
    fn load(&mut self) -> Result<(), EngineError> {
        // What the push may bring: the pages neither here nor known zero.
        let mut pushable = page_bitmap(self.pages, self.ps);
        for p in 0..self.pages {
            if self.shared.states.get(p) == PageState::Absent {
                pushable.set(p);
            }
        }
        self.pushable = Some(pushable);
        // Faults can come as soon as QEMU loads the device state.
        let fault = self
            .fault
            .take()
            .ok_or_else(|| EngineError::Protocol("device state sent twice".into()))?;
        self.workers = Some(start_fault_threads(
            fault,
            self.installer.clone(),
            self.shared.clone(),
            self.pages,
            self.ps,
            self.disks.clone(),
        )?);
        self.backend.track_writes()?;
        self.backend.load_device_state(&self.device_state)?;
        self.tx
            .send_control(ControlCode::Loaded)
            .and_then(|_| self.tx.flush())
            .map_err(EngineError::send("bulk"))?;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), EngineError> {
        if self.cfg.hold {
            return Ok(());
        }
        self.shared.running.store(true, Ordering::Release);
        if let Some(d) = &self.disks {
            // From the first instruction on, the guest's disk writes count.
            d.mark_resumed();
        }
        self.backend.resume()?;
        self.resumed = Some(Instant::now());
        self.tx
            .send_control(ControlCode::Resumed)
            .and_then(|_| self.tx.flush())
            .map_err(EngineError::send("bulk"))
    }

    fn on_control(&mut self, code: ControlCode) -> Result<Flow, EngineError> {
        use ControlCode as C;
        use Phase as P;
        match (self.phase, code) {
            (_, C::Abort { reason }) => Err(EngineError::Aborted {
                peer: "source",
                reason,
            }),
            (P::Precopy, C::RoundBegin { round }) => {
                if self.round.is_some() || round != self.next_round {
                    return protocol(format!(
                        "round {round} began, round {} expected",
                        self.next_round
                    ));
                }
                self.round = Some((round, 0));
                Ok(Flow::Continue)
            }
            (P::Precopy, C::RoundEnd { round, units_sent }) => match self.round.take() {
                Some((r, got)) if r == round && got == units_sent => {
                    self.next_round += 1;
                    Ok(Flow::Continue)
                }
                other => protocol(format!(
                    "round {round} ended with {units_sent} pages, open round and pages received: {other:?}"
                )),
            },
            (P::Precopy | P::Frozen, C::ZeroPages { first, count }) => {
                for p in first..first + count {
                    let was_present =
                        self.shared.states.swap(p, PageState::Zero) == PageState::Present;
                    self.backend.hole_page(p, was_present)?;
                    self.announced.set(p);
                }
                Ok(Flow::Continue)
            }
            (P::Frozen, C::AbsentPages { first, count }) => {
                // Pre-copied, dirtied since, and left out of the freeze (the
                // overflow policy): the copy here is stale. Dropped, the
                // pages are post-copy pages: pushed, or fetched on a fault.
                for p in first..first + count {
                    self.shared.states.set(p, PageState::Absent);
                    self.announced.unset(p);
                }
                self.backend.discard_pages(first, count)?;
                Ok(Flow::Continue)
            }
            (P::Frozen, C::AbsentChunks { first, count }) => {
                // The same for disk chunks: their blocks are absent again.
                let Some(disks) = &self.disks else {
                    return protocol(format!(
                        "chunks {first}.. absent, but the guest has no disk"
                    ));
                };
                for c in first..first + count {
                    disks.discard(c)?;
                }
                Ok(Flow::Continue)
            }
            (P::Precopy, C::Freeze) if self.round.is_none() => {
                self.phase = P::Frozen;
                self.freeze_received = Some(Instant::now());
                // The freeze deadline starts.
                Ok(Flow::Stop)
            }
            (P::Frozen, C::DeviceStateEnd { total_bytes }) => {
                self.device_state_complete(total_bytes)?;
                self.load()?;
                self.phase = P::Loaded;
                // The freeze deadline ends.
                Ok(Flow::Stop)
            }
            (P::Loaded, C::PostcopyBegin) => {
                self.phase = P::Postcopy;
                self.resume()?;
                Ok(Flow::Continue)
            }
            (P::Postcopy, C::Done { units_total }) => {
                if units_total != self.units {
                    return protocol(format!(
                        "the source sent {units_total} units, {} arrived",
                        self.units
                    ));
                }
                self.phase = P::PushDone;
                Ok(Flow::Continue)
            }
            (phase, code) => protocol(format!("unexpected {code:?} in phase {phase:?}")),
        }
    }
}

impl FrameHandler<EngineError> for Bulk<'_> {
    fn on_frame(&mut self, f: FrameRef<'_>) -> Result<Flow, EngineError> {
        let flow = self.handle(f)?;
        self.check_workers()?;
        Ok(flow)
    }

    fn on_drained(&mut self) -> Result<(), EngineError> {
        // Nothing more to batch with for now: pushed pages go in at once.
        self.run.flush(self.installer.as_ref(), &self.shared)
    }
}

impl Bulk<'_> {
    /// Fails if a fault thread ended. Not while waiting for the source's
    /// decision: after `Loaded` only the source may call the migration off
    /// (it may have committed already); a dead thread is noticed right after
    /// `PostcopyBegin` instead.
    fn check_workers(&self) -> Result<(), EngineError> {
        match &self.workers {
            Some(w) if self.phase != Phase::Loaded => w.check(),
            _ => Ok(()),
        }
    }

    fn handle(&mut self, f: FrameRef<'_>) -> Result<Flow, EngineError> {
        if !matches!(
            f,
            FrameRef::Unit {
                kind: UnitKind::Page,
                ..
            }
        ) {
            self.run.flush(self.installer.as_ref(), &self.shared)?;
        }
        match f {
            FrameRef::Unit {
                kind: UnitKind::Page,
                index,
                payload,
            } => {
                self.units += 1;
                match self.phase {
                    Phase::Precopy => match &mut self.round {
                        Some((_, n)) => {
                            *n += 1;
                            self.precopy_page(index, &payload)?;
                        }
                        None => return protocol(format!("page {index} outside a round")),
                    },
                    Phase::Frozen => self.precopy_page(index, &payload)?,
                    Phase::Postcopy => self.pushed_page(index, &payload)?,
                    phase => return protocol(format!("page {index} in phase {phase:?}")),
                }
                Ok(Flow::Continue)
            }
            FrameRef::Unit {
                kind: UnitKind::Chunk,
                index,
                payload,
            } => {
                self.units += 1;
                match self.phase {
                    Phase::Precopy => match &mut self.round {
                        Some((_, n)) => *n += 1,
                        None => return protocol(format!("chunk {index} outside a round")),
                    },
                    Phase::Frozen | Phase::Postcopy => {}
                    phase => return protocol(format!("chunk {index} in phase {phase:?}")),
                }
                self.chunk_unit(index, &payload)?;
                Ok(Flow::Continue)
            }
            FrameRef::Digest {
                kind: UnitKind::Chunk,
                first,
                crcs,
            } if self.phase == Phase::PushDone => {
                let seen = self.chunk_digests.len() as u64;
                let chunks = self.disks.as_ref().map_or(0, |d| d.space().chunks());
                if first != seen || seen + crcs.len() as u64 > chunks {
                    return protocol(format!(
                        "digests for chunks from {first} ({} of them) after {seen}",
                        crcs.len()
                    ));
                }
                self.chunk_digests.extend(crcs.iter());
                Ok(Flow::Continue)
            }
            FrameRef::Unit {
                kind: UnitKind::DeviceState,
                index,
                payload,
            } if self.phase == Phase::Frozen => {
                self.units += 1;
                self.device_state_piece(index, &payload)?;
                Ok(Flow::Continue)
            }
            FrameRef::Control(code) => self.on_control(code),
            FrameRef::Digest {
                kind: UnitKind::Page,
                first,
                crcs,
            } if self.phase == Phase::PushDone => {
                let seen = self.digests.len() as u64;
                if first != seen || seen + crcs.len() as u64 > self.pages {
                    return protocol(format!(
                        "digests for pages from {first} ({} of them) after {seen}",
                        crcs.len()
                    ));
                }
                self.digests.extend(crcs.iter());
                Ok(Flow::Continue)
            }
            FrameRef::Goodbye if self.phase == Phase::PushDone => {
                let chunks = self.disks.as_ref().map_or(0, |d| d.space().chunks());
                if !self.chunk_digests.is_empty() && self.chunk_digests.len() as u64 != chunks {
                    return protocol(format!(
                        "digests of {} chunks out of {chunks}",
                        self.chunk_digests.len()
                    ));
                }
                if !self.digests.is_empty() && self.digests.len() as u64 != self.pages {
                    return protocol(format!(
                        "digests of {} pages out of {}",
                        self.digests.len(),
                        self.pages
                    ));
                }
                self.phase = Phase::Ended;
                Ok(Flow::Stop)
            }
            other => protocol(format!(
                "unexpected {:?} on the bulk connection in phase {:?}",
                other.frame_type(),
                self.phase
            )),
        }
    }
}

/// Runs the destination side of a migration over `conns`.
pub fn run_destination(
    backend: &mut dyn DestBackend,
    conns: ConnectionPair,
    cfg: &DestConfig,
) -> Result<DestReport, EngineError> {
    let ConnectionPair { bulk, fault } = conns;
    let io = bulk.io_path();
    let mut bulk = bulk;
    let pages = backend.page_count();
    let ps = backend.page_size();
    let g = bulk.session.geometry;
    if g.page_count() != pages {
        return Err(EngineError::Geometry {
            what: "page count",
            session: g.page_count(),
            guest: pages,
        });
    }
    if g.page_size() as usize != ps {
        return Err(EngineError::Geometry {
            what: "page size",
            session: g.page_size().into(),
            guest: ps as u64,
        });
    }
    let disks = backend.disks();
    let chunks = disks.as_ref().map_or(0, |d| d.space().chunks());
    if let Some(d) = &disks {
        if u64::from(g.chunk_size()) != d.space().chunk_size() {
            return Err(EngineError::Geometry {
                what: "chunk size",
                session: g.chunk_size().into(),
                guest: d.space().chunk_size(),
            });
        }
        if g.chunk_count() != chunks {
            return Err(EngineError::Geometry {
                what: "chunk count",
                session: g.chunk_count(),
                guest: chunks,
            });
        }
    }
    let shared = Arc::new(Shared {
        states: PageStates::new(pages),
        stalls: Stalls::default(),
        stop: AtomicBool::new(false),
        sweep: AtomicBool::new(false),
        running: AtomicBool::new(false),
        faults: AtomicU64::new(0),
        faults_in_flight: AtomicU64::new(0),
        zero_faults: AtomicU64::new(0),
        swept: AtomicU64::new(0),
    });
    let dec = bulk.session.decoder();
    let Connection {
        tx: bulk_tx,
        rx: bulk_rx,
        ..
    } = &mut bulk;
    let mut st = Bulk {
        installer: backend.installer(),
        backend,
        cfg,
        shared: shared.clone(),
        tx: bulk_tx,
        fault: Some(fault),
        workers: None,
        pages,
        ps,
        phase: Phase::Precopy,
        round: None,
        next_round: 0,
        units: 0,
        page: vec![0u8; ps],
        device_state: Vec::new(),
        pieces: Vec::new(),
        device_state_bytes: 0,
        pushable: None,
        announced: page_bitmap(pages, ps),
        run: InstallRun::new(ps),
        precopy_pages: 0,
        pushed_pages: 0,
        digests: Vec::new(),
        freeze_received: None,
        resumed: None,
        disks,
        chunk: Vec::new(),
        chunk_digests: Vec::new(),
        storage: DestStorageReport::default(),
    };
    let received = receive(bulk_rx, &dec, &mut st);

    if st.phase < Phase::Postcopy {
        // Before the commit: the guest goes on at the source.
        let e = received.err().unwrap_or_else(|| {
            EngineError::Protocol("the bulk stream ended before the commit".into())
        });
        if !matches!(e, EngineError::Aborted { .. }) {
            let reason = if matches!(e, EngineError::Timeout(_)) {
                AbortReason::Timeout
            } else {
                AbortReason::DestinationFailed
            };
            let _ = st.tx.send_control(ControlCode::Abort { reason });
            let _ = st.tx.flush();
        }
        if let Some(w) = st.workers.take() {
            let (mut requester, mut answers) = w.abandon(&shared);
            return Err(explain(Some(e), &mut requester, &mut answers).expect("an error"));
        }
        return Err(e);
    }
    let freeze_received = st.freeze_received.expect("Freeze precedes the commit");
    finish(st, received, freeze_received).map(|r| DestReport { io, ..r })
}

/// Receives the bulk stream until `Goodbye`, with the freeze deadline and
/// an eye on the fault threads.
fn receive(
    rx: &mut FrameReceiver,
    dec: &FrameDecoder,
    st: &mut Bulk<'_>,
) -> Result<(), EngineError> {
    loop {
        let deadline = match (st.phase, st.freeze_received) {
            (Phase::Frozen, Some(t)) => Some(t + st.cfg.freeze_timeout),
            _ => None,
        };
        // With fault threads running, wake up now and then to look at them.
        let tick = st.workers.as_ref().map(|_| Instant::now() + WORKER_CHECK);
        let wake = match (deadline, tick) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        match rx.run_with(dec, wake, st) {
            Ok(RecvEnd::Stopped) if st.phase == Phase::Ended => return Ok(()),
            Ok(RecvEnd::Stopped) => {}
            Ok(RecvEnd::Closed) => {
                return Err(EngineError::Recv {
                    conn: "bulk",
                    message: format!("the source closed the connection in phase {:?}", st.phase),
                });
            }
            Err(RecvError::TimedOut) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(EngineError::Timeout("the device state"));
                }
                st.check_workers()?;
            }
            Err(e) => return Err(EngineError::from_recv("bulk", e)),
        }
    }
}

/// After the commit: complete what is missing, release or stop the guest,
/// report.
fn finish(
    mut st: Bulk<'_>,
    received: Result<(), EngineError>,
    freeze_received: Instant,
) -> Result<DestReport, EngineError> {
    let shared = st.shared.clone();
    let mut workers = st
        .workers
        .take()
        .expect("fault threads run after the commit");
    let mut cause = received.err();
    // Pages a broken stream left in the batch are whole: put them in place.
    if let Err(e) = st.run.flush(st.installer.as_ref(), &shared) {
        cause.get_or_insert(e);
    }
    let disks = st.disks.clone();
    let chunks_missing = || disks.as_ref().map_or(0, |d| d.missing_chunks());
    if shared.states.missing() > 0 || chunks_missing() > 0 {
        // Fetch whatever is still absent over the fault connection (a broken
        // bulk connection leaves the push unfinished).
        shared.sweep.store(true, Ordering::Release);
        if let Some(d) = &disks {
            for c in 0..d.space().chunks() {
                if d.needed(c) {
                    d.requests().request(c, 1);
                }
            }
        }
        let deadline = Instant::now() + st.cfg.completion_timeout;
        while (shared.states.missing() > 0 || chunks_missing() > 0) && Instant::now() < deadline {
            if !workers.answers_alive() || !workers.requester_alive() {
                if cause.is_none() {
                    cause = workers.check().err();
                }
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let missing = shared.states.missing() + chunks_missing();
    if missing > 0 {
        // The guest must never read the missing pages. Stop it while the
        // requester still serves what is here (vCPUs must reach the stop).
        let _ = st.backend.pause();
        let (mut requester, mut answers) = workers.abandon(&shared);
        let cause = explain(cause, &mut requester, &mut answers);
        return Err(EngineError::Incomplete {
            missing,
            cause: cause.map(Box::new),
        });
    }
    let complete = Instant::now();
    let resumed = st.resumed.unwrap_or(complete);

    // Integrity, when the whole stream arrived: compare every page the guest
    // has not written since the resume with the source's frozen page.
    let integrity = match (&cause, st.digests.len() as u64 == st.pages) {
        (None, true) => Some(integrity(
            st.backend,
            &st.digests,
            &st.announced,
            st.pages,
            st.ps,
        )),
        _ => None,
    }
    .transpose();
    if let (Some(d), None) = (&disks, &cause) {
        if st.chunk_digests.len() as u64 == d.space().chunks() && !st.chunk_digests.is_empty() {
            let (compared, differing) = chunk_integrity(d, &st.chunk_digests)?;
            st.storage.chunks_checked = true;
            st.storage.chunks_compared = compared;
            st.storage.chunks_differing = differing;
        }
    }

    // Release before the fault threads go: from here on the kernel serves
    // every fault (nothing is missing, holes are zero pages).
    let mut requester = workers.stop_requester(&shared);
    let released = st.backend.release();
    let mut answers = workers.end_answers();
    let cause = explain(cause, &mut requester, &mut answers);
    released?;
    // The source waits for this goodbye (unless the bulk connection is gone).
    let goodbye = st
        .tx
        .send_goodbye()
        .and_then(|_| st.tx.flush())
        .map_err(EngineError::send("bulk"));
    let late = match cause {
        // A broken bulk connection cost nothing but the integrity check.
        Some(
            e @ (EngineError::Recv { conn: "bulk", .. } | EngineError::Send { conn: "bulk", .. }),
        ) => Some(e),
        // Anything else is a failure, even though the guest runs on intact.
        Some(e) => return Err(e),
        // Failures once every page was here cost nothing.
        None => requester.err().or(answers.err()).or(goodbye.err()),
    };
    let integrity = integrity?;

    let page_waits = shared.stalls.done.lock().expect("stall lock").clone();
    let chunk_waits = disks.as_ref().map_or_else(Vec::new, |d| d.waits());
    let w = WaitFigures::of(&page_waits, &chunk_waits, resumed, st.cfg.dt);
    Ok(DestReport {
        io: Default::default(),
        precopy_pages: st.precopy_pages,
        pushed_pages: st.pushed_pages,
        faults: shared.faults.load(Ordering::Relaxed),
        faults_in_flight: shared.faults_in_flight.load(Ordering::Relaxed),
        zero_faults: shared.zero_faults.load(Ordering::Relaxed),
        swept_pages: shared.swept.load(Ordering::Relaxed),
        penalty_s: w.penalty_s,
        penalty_in_window_s: w.penalty_in_window_s,
        page_stall_s: w.page_stall_s,
        chunk_stall_s: w.chunk_stall_s,
        chunk_waits: chunk_waits.len() as u64,
        max_stall_s: w.max_stall_s,
        fault_timeline: w.timeline,
        device_state_bytes: st.device_state_bytes,
        uptime_s: complete.saturating_duration_since(resumed).as_secs_f64(),
        integrity,
        storage: disks.as_ref().map(|d| DestStorageReport {
            counters: d.counters(),
            ..st.storage.clone()
        }),
        late_error: late.map(|e| crate::error_chain(&e)),
        times: Some(DestTimes {
            freeze_received,
            resumed,
            complete,
        }),
    })
}

/// Compares every page the guest has not written since the resume with the
/// source's digest of its frozen page. Reads first, then looks at which
/// pages were written: a page written in between is skipped. A page the
/// source `announced` as holding nothing, or no memory here at all, is a
/// hole: compared, and counted apart.
fn integrity(
    backend: &mut dyn DestBackend,
    digests: &[u32],
    announced: &DirtyBitmap,
    pages: u64,
    ps: usize,
) -> Result<IntegrityReport, EngineError> {
    let mut page = vec![0u8; ps];
    let mut before = page_bitmap(pages, ps);
    backend.written_pages(&mut before)?;
    let mut mismatched = Vec::new();
    let mut holes = Vec::new();
    for p in 0..pages {
        if before.get(p) {
            continue;
        }
        let no_memory = backend.is_hole(p);
        if no_memory || announced.get(p) {
            holes.push(p);
        }
        let crc = if no_memory {
            crate::wire::HOLE_DIGEST
        } else {
            backend.read_page(p, &mut page)?;
            crc32fast::hash(&page)
        };
        if crc != digests[p as usize] {
            mismatched.push(p);
        }
    }
    let mut after = page_bitmap(pages, ps);
    backend.written_pages(&mut after)?;
    let compared = |v: &[u64]| v.iter().filter(|&&p| !after.get(p)).count() as u64;
    let written = after.count();
    Ok(IntegrityReport {
        pages_compared: pages - written,
        pages_differing: compared(&mismatched),
        pages_written_since_resume: written,
        holes: compared(&holes),
    })
}

/// Compares every chunk the guest has not modified since the resume with
/// the source's digest of its frozen chunk; returns (compared, differing).
fn chunk_integrity(disks: &DestDisks, digests: &[u32]) -> Result<(u64, u64), EngineError> {
    let (mut compared, mut differing) = (0, 0);
    for (c, &want) in digests.iter().enumerate() {
        let c = c as u64;
        if disks.written_since_resume(c) {
            continue;
        }
        let got = disks.digest(c)?;
        // Written while it was read: not comparable.
        if disks.written_since_resume(c) {
            continue;
        }
        compared += 1;
        if got != want {
            differing += 1;
        }
    }
    Ok((compared, differing))
}

fn start_fault_threads(
    fault: Connection,
    installer: Arc<dyn PageInstaller>,
    shared: Arc<Shared>,
    pages: u64,
    ps: usize,
    disks: Option<Arc<DestDisks>>,
) -> Result<Workers, EngineError> {
    let Connection { session, tx, rx } = fault;
    let tx = Arc::new(Mutex::new(tx));
    if let Some(d) = &disks {
        // The images' chunk requests go out on the fault connection, ahead
        // of everything on the bulk one. A failed send shows in the
        // requester (same connection).
        let t = tx.clone();
        d.requests().attach(Box::new(move |first, count| {
            let mut t = t.lock().expect("fault sender lock");
            let _ = t
                .send_request(UnitKind::Chunk, first, count)
                .and_then(|_| t.flush());
        }));
    }
    let sock = super::error::socket_clone(&rx, "fault")?;
    let dec = session.decoder();
    let answer_disks = disks.clone();
    let requester_disks = disks;
    let requester = {
        let (installer, shared) = (installer.clone(), shared.clone());
        std::thread::Builder::new()
            .name("wanmig-faults".into())
            .spawn(move || request_faults(tx, installer.as_ref(), &shared, pages, requester_disks))
            .map_err(|_| EngineError::Panicked("fault requester"))?
    };
    let answers = std::thread::Builder::new()
        .name("wanmig-answers".into())
        .spawn(move || receive_answers(rx, dec, installer.as_ref(), &shared, ps, answer_disks))
        .map_err(|_| EngineError::Panicked("fault answers"))?;
    Ok(Workers {
        requester: Some(requester),
        answers: Some(answers),
        sock,
    })
}

/// Serves one fault on page `p`, seen at `now`; true if it sent a request.
/// After the resume every fault on a page not here is a timed wait: one
/// that sends the request, one on a page already on its way, one on a zero
/// page (until it is installed). A fault on a page already here was a race
/// with its install, whose arrival closed any wait.
fn serve_fault(
    tx: &mut UnitSender,
    installer: &dyn PageInstaller,
    shared: &Shared,
    p: u64,
    now: Instant,
) -> Result<bool, EngineError> {
    let states = &shared.states;
    let timed = shared.running.load(Ordering::Acquire);
    // Two rounds at most: a page that stops being absent under us is then
    // zero, requested or present.
    for _ in 0..2 {
        match states.get(p) {
            PageState::Present => {
                // A spurious event (the install won: EEXIST, wake), or a page
                // discarded since (it reads as zero, as it should).
                installer.install_zero(p)?;
                return Ok(false);
            }
            PageState::Zero => {
                let installed = installer.install_zero(p)? == Install::Installed;
                if timed {
                    shared.stalls.served(now, Instant::now());
                }
                if states.transition(p, PageState::Zero, PageState::Present) && installed {
                    shared.zero_faults.fetch_add(1, Ordering::Relaxed);
                }
                return Ok(false);
            }
            PageState::Requested => {
                if timed {
                    shared.faults_in_flight.fetch_add(1, Ordering::Relaxed);
                    shared.stalls.started(p, now, states);
                }
                return Ok(false);
            }
            PageState::Absent => {
                if states.transition(p, PageState::Absent, PageState::Requested) {
                    if timed {
                        shared.faults.fetch_add(1, Ordering::Relaxed);
                        shared.stalls.started(p, now, states);
                    }
                    tx.send_request(UnitKind::Page, p, 1)
                        .map_err(EngineError::send("fault"))?;
                    return Ok(true);
                }
            }
        }
    }
    Ok(false)
}

/// Requests every page still absent, in runs.
fn sweep(tx: &mut UnitSender, shared: &Shared, pages: u64) -> Result<bool, EngineError> {
    let states = &shared.states;
    let mut asked = false;
    let mut p = 0;
    while p < pages {
        if !states.transition(p, PageState::Absent, PageState::Requested) {
            p += 1;
            continue;
        }
        let first = p;
        let mut n = 1u32;
        p += 1;
        while p < pages
            && n < MAX_REQUEST_UNITS
            && states.transition(p, PageState::Absent, PageState::Requested)
        {
            n += 1;
            p += 1;
        }
        tx.send_request(UnitKind::Page, first, n)
            .map_err(EngineError::send("fault"))?;
        shared.swept.fetch_add(u64::from(n), Ordering::Relaxed);
        asked = true;
    }
    Ok(asked)
}

fn request_faults(
    tx: Arc<Mutex<UnitSender>>,
    installer: &dyn PageInstaller,
    shared: &Shared,
    pages: u64,
    disks: Option<Arc<DestDisks>>,
) -> Result<(), EngineError> {
    let mut faults = Vec::new();
    let mut swept = false;
    let sender = || tx.lock().expect("fault sender lock");
    while !shared.stop.load(Ordering::Acquire) {
        faults.clear();
        installer.wait_faults(Duration::from_millis(20), &mut faults)?;
        let now = Instant::now();
        let mut asked = false;
        if !faults.is_empty() {
            let mut tx = sender();
            for &p in &faults {
                asked |= serve_fault(&mut tx, installer, shared, p, now)?;
            }
        }
        // Once: a page is absent only until it is requested.
        if !swept && shared.sweep.load(Ordering::Acquire) {
            swept = true;
            asked |= sweep(&mut sender(), shared, pages)?;
        }
        if asked {
            sender().flush().map_err(EngineError::send("fault"))?;
        }
    }
    // No chunk request may follow the goodbye.
    if let Some(d) = &disks {
        d.requests().detach();
    }
    let mut tx = sender();
    tx.send_goodbye().map_err(EngineError::send("fault"))?;
    tx.flush().map_err(EngineError::send("fault"))?;
    Ok(())
}

fn receive_answers(
    mut rx: FrameReceiver,
    dec: FrameDecoder,
    installer: &dyn PageInstaller,
    shared: &Shared,
    ps: usize,
    disks: Option<Arc<DestDisks>>,
) -> Result<(), EngineError> {
    let mut page = vec![0u8; ps];
    let mut chunk = Vec::new();
    rx.run(&dec, |f| -> Result<Flow, EngineError> {
        match f {
            FrameRef::Unit {
                kind: UnitKind::Chunk,
                index,
                payload,
            } => {
                let Some(d) = &disks else {
                    return Err(EngineError::Protocol(format!(
                        "chunk {index} answered, but the guest has no disk"
                    )));
                };
                let data = if payload.encoding() == Encoding::Zero {
                    None
                } else {
                    chunk.resize(payload.unit_len() as usize, 0);
                    payload.unpack_into(&mut chunk)?;
                    Some(&chunk[..])
                };
                d.install(index, data)?;
                Ok(Flow::Continue)
            }
            FrameRef::Unit {
                kind: UnitKind::Page,
                index,
                payload,
            } => {
                if shared.states.get(index) != PageState::Present {
                    payload.unpack_into(&mut page)?;
                    installer.install(index, &page)?;
                    shared.arrived(index, Instant::now());
                }
                Ok(Flow::Continue)
            }
            FrameRef::Pong(_) => Ok(Flow::Continue),
            FrameRef::Goodbye => Ok(Flow::Stop),
            other => Err(EngineError::Protocol(format!(
                "unexpected {:?} on the fault connection",
                other.frame_type()
            ))),
        }
    })
    .map_err(|e| EngineError::from_recv("fault", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn close(got: f64, want: f64) -> bool {
        (got - want).abs() < 1e-9
    }

    #[test]
    fn the_fault_timeline_bins_the_waits_union_from_the_resume() {
        let t0 = Instant::now();
        let resumed = t0 + ms(100);
        let at = |n: u64| resumed + ms(n);
        let waits = [
            // Before the resume (downtime): left out.
            (t0, t0 + ms(3)),
            // Across it: counts from the resume on.
            (resumed - ms(1), at(2)),
            // Across a bin boundary: 1 ms in bin 0, 3 ms in bin 1.
            (at(249), at(253)),
            // Within the previous wait (another vCPU): counted as a wait,
            // its time once.
            (at(250), at(251)),
            (at(1000), at(1008)),
        ];
        let t = FaultTimeline::of(&waits, resumed);
        assert_eq!(t.bin_s, 0.25);
        assert_eq!(t.faults, vec![2, 1, 0, 0, 1]);
        let want = [0.003, 0.003, 0.0, 0.0, 0.008];
        assert_eq!(t.stall_s.len(), want.len());
        for (got, want) in t.stall_s.iter().zip(want) {
            assert!(close(*got, want), "{:?}", t.stall_s);
        }
        assert_eq!(
            FaultTimeline::of(&[], resumed),
            FaultTimeline {
                bin_s: 0.25,
                ..FaultTimeline::default()
            }
        );
    }

    #[test]
    fn the_penalty_is_the_union_of_page_and_chunk_waits() {
        let resumed = Instant::now();
        let at = |n: u64| resumed + ms(n);
        // Two vCPUs fault, overlapping; a disk read waits across the end of
        // the second fault, another one alone later.
        let pages = [(at(0), at(100)), (at(50), at(150))];
        let chunks = [(at(120), at(300)), (at(450), at(600))];
        let w = WaitFigures::of(&pages, &chunks, resumed, ms(500));
        // [0, 300] and [450, 600].
        assert!(close(w.penalty_s, 0.450), "{w:?}");
        // Up to the end of the window at 500 ms: 300 + 50.
        assert!(close(w.penalty_in_window_s, 0.350), "{w:?}");
        assert!(close(w.page_stall_s, 0.150), "{w:?}");
        assert!(close(w.chunk_stall_s, 0.330), "{w:?}");
        assert!(close(w.max_stall_s, 0.180), "{w:?}");
        let binned: f64 = w.timeline.stall_s.iter().sum();
        assert!(close(binned, w.penalty_s), "{:?}", w.timeline);
        assert_eq!(w.timeline.faults.iter().sum::<u32>(), 4);
        // Without the disk's waits P would be the pages' alone: they count.
        let pages_only = WaitFigures::of(&pages, &[], resumed, ms(500));
        assert!(close(pages_only.penalty_s, 0.150));
        assert!(w.penalty_s > pages_only.penalty_s + 0.29);
        // Nothing waited: zeros (+0.0, not -0.0).
        let none = WaitFigures::of(&[], &[], resumed, ms(500));
        for x in [
            none.penalty_s,
            none.penalty_in_window_s,
            none.page_stall_s,
            none.chunk_stall_s,
            none.max_stall_s,
        ] {
            assert!(x == 0.0 && x.is_sign_positive(), "{none:?}");
        }
        assert!(none.timeline.faults.is_empty() && none.timeline.stall_s.is_empty());
    }

    #[test]
    fn the_union_merges_overlaps_and_clips_at_the_start() {
        let t = Instant::now();
        let at = |n: u64| t + ms(n);
        let u = union_from(
            &[
                (at(30), at(40)),
                (at(0), at(10)),
                (at(5), at(20)),
                (at(20), at(25)),
                (at(50), at(50)),
            ],
            at(2),
        );
        assert_eq!(u, vec![(at(2), at(25)), (at(30), at(40))]);
        assert!(close(seconds(&u), 0.033));
        assert!(close(seconds_before(&u, at(35)), 0.028));
    }

    #[test]
    fn a_fault_on_a_page_already_in_flight_waits_until_it_arrives() {
        let shared = Shared {
            states: PageStates::new(8),
            stalls: Stalls::default(),
            stop: AtomicBool::new(false),
            sweep: AtomicBool::new(false),
            running: AtomicBool::new(true),
            faults: AtomicU64::new(0),
            faults_in_flight: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            swept: AtomicU64::new(0),
        };
        let t = Instant::now();
        // Page 3 was requested by the sweep (no fault waited then); a fault
        // on it now waits for the answer.
        assert!(
            shared
                .states
                .transition(3, PageState::Absent, PageState::Requested)
        );
        shared.stalls.started(3, t, &shared.states);
        // A second fault on it (another vCPU) opens no second wait.
        shared.stalls.started(3, t + ms(5), &shared.states);
        shared.arrived(3, t + ms(40));
        // A fault that finds the page arrived under it: the wait ends then.
        assert!(
            shared
                .states
                .transition(4, PageState::Absent, PageState::Requested)
        );
        shared.arrived(4, t + ms(50));
        shared.stalls.started(4, t + ms(45), &shared.states);
        let done = shared.stalls.done.lock().unwrap().clone();
        assert_eq!(done.len(), 2, "{done:?}");
        assert_eq!(done[0], (t, t + ms(40)));
        assert_eq!(done[1].0, t + ms(45));
        assert!(shared.stalls.pending.lock().unwrap().is_empty());
    }
}
