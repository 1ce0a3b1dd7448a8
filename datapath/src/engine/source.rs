//! The source engine: live pre-copy of the plan's pages, freeze-and-copy,
//! then the post-copy push with faults served ahead of it.
//!
//! ```text
//! round 0      arm the dirty logs (memory, and the disks' export logs);
//!              send the pre-copy set (holes as ZeroPages), then the disks'
//!              pre-copy chunks (the plan's S)
//! round k ≥ 1  send the pre-copy pages and chunks the guest dirtied during
//!              round k-1; a newer plan from the planner (the adaptive
//!              loop) applies here: its new pre-copy members go in this
//!              round, and every unit already in the set stays under the
//!              dirty log (`PageOrder::adopt`); telemetry after each round
//!              … until the stop rule says freeze (its bandwidth estimate
//!              is what the peer acknowledged, from TCP_INFO)
//! freeze       pause; send the dirty remainder of the pre-copy sets,
//!              pages and chunks (the plan's freeze policy: all of it, or
//!              hottest first, pages and chunks merged as in the push, what
//!              fits the downtime target, the rest announced AbsentPages /
//!              AbsentChunks and post-copied), ZeroPages for every page not
//!              populated now (both sets: a page discarded after it was
//!              sent must not stay stale) and for the post-copy pages zero
//!              since round 0, the device state; start the fault server
//!              (loading the device state faults); wait for Loaded, within
//!              the freeze deadline
//! commit       PostcopyBegin (from here on the destination owns the guest)
//! post-copy    push the freeze's absent pages, then its absent chunks,
//!              then the rest, hottest first (pages and chunks in one
//!              ranking when the plan has one), skipping units the
//!              destination already fetched; a separate thread
//!              answers fault requests (pages and chunks) on the fault
//!              connection; Done, then per-page and per-chunk digests of the
//!              frozen memory and disks for the destination's integrity check
//! ```
//!
//! Until `PostcopyBegin` is sent, any failure (the destination's Abort or
//! silence, a failed device-state save...) resumes the guest here first,
//! then tells the destination: a migration that fails before the
//! destination runs the guest leaves it running, intact, at the source.
//! After it, the source keeps answering fault requests until the destination
//! says goodbye on the fault connection, whatever happened to the bulk one.

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::EngineError;
use super::page_order::{PageOrder, PushUnit};
use super::readahead::Readahead;
use crate::backend::{PageReader, SourceBackend};
use crate::connection::{Connection, ConnectionPair};
use crate::storage::SourceDisks;
use crate::transport::{Flow, RecvEnd, RecvError, tcp};
use crate::uffd::{DirtyBitmap, RemoteAddr, RemoteRange};
use crate::unit_stream::UnitSender;
use crate::wire::{
    AbortReason, ControlCode, FrameRef, HEADER_LEN, MAX_DIGEST_UNITS, UnitKind, is_zero,
};

use crate::bits::runs_of;

use super::plan_channel::{AppliedPlan, NoPlanChannel, Phase, PlanChannel, Telemetry};
use wanmig_planner::model::FreezePolicy;

/// Tuning of the source engine.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Freeze once the predicted downtime is at most this.
    pub downtime_target: Duration,
    /// Freeze after this many rounds at the latest, round 0 included (a
    /// plan's own limit, [`PageOrder::max_rounds`], applies when lower).
    pub max_rounds: u32,
    /// Freeze when a round's dirty set is not below this fraction of the
    /// previous one (pre-copy stopped converging).
    pub min_shrink: f64,
    /// Device state size assumed by the stop rule before it is known, bytes.
    pub device_state_estimate: u64,
    /// Send per-page digests of the frozen memory at the end.
    pub integrity: bool,
    /// From the pause until the destination has loaded the device state, at
    /// most this long; then the guest resumes here.
    pub freeze_timeout: Duration,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            downtime_target: Duration::from_millis(300),
            max_rounds: 30,
            min_shrink: 0.95,
            device_state_estimate: 400 << 10,
            integrity: true,
            freeze_timeout: Duration::from_secs(30),
        }
    }
}

/// One pre-copy round.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct RoundReport {
    /// Round number (0 sends the whole pre-copy set).
    pub round: u64,
    /// Pages sent.
    pub pages: u64,
    /// Frame bytes sent.
    pub bytes: u64,
    /// Duration, s.
    pub seconds: f64,
    /// Bytes of the units sent, uncompressed.
    pub unit_bytes: u64,
    /// Of `seconds`, the time spent reading and sending units (round 0 also
    /// scans the post-copy set for zero pages), s.
    pub send_s: f64,
}

/// Instants of the source's milestones.
#[derive(Debug, Clone, Copy)]
pub struct SourceTimes {
    /// Migration start (before round 0).
    pub start: Instant,
    /// The guest was paused.
    pub paused: Instant,
    /// `PostcopyBegin` was sent.
    pub postcopy_begin: Instant,
    /// The post-copy push finished (`Done` sent).
    pub push_done: Instant,
    /// Everything finished.
    pub end: Instant,
    /// The destination's `Resumed` arrived (it resumed the guest one
    /// one-way delay earlier).
    pub resumed_seen: Option<Instant>,
}

/// What the source did.
#[derive(Debug, Clone, Serialize)]
pub struct SourceReport {
    /// How the source's bytes travelled (I/O backend, cipher).
    pub io: crate::transport::IoPath,
    /// Fraction of pages in the pre-copy set.
    pub m: f64,
    /// Pages of the guest.
    pub pages: u64,
    /// Pages in the pre-copy set.
    pub precopy_pages: u64,
    /// Newer plans applied at round boundaries (the adaptive loop).
    pub plans_applied: Vec<AppliedPlan>,
    /// The live rounds.
    pub rounds: Vec<RoundReport>,
    /// Why pre-copy stopped.
    pub stop_reason: String,
    /// Pre-copy pages sent while frozen.
    pub remainder_pages: u64,
    /// Frame bytes of the dirty remainder sent while frozen (pages and
    /// chunks; what the overflow policy's budget counts).
    pub remainder_bytes: u64,
    /// What the freeze did with a dirty set that did not fit the downtime
    /// target (the plan's policy, [`PageOrder::freeze_policy`]).
    pub freeze_policy: FreezePolicy,
    /// The freeze's budget for the dirty remainder under the overflow
    /// policy, link bytes: the downtime target at the stop rule's rate,
    /// less the RTT and the device state's estimate (`None`: classic).
    pub freeze_budget_bytes: Option<u64>,
    /// Dirty pre-copy pages the freeze had no room for: announced absent
    /// at the destination and post-copied (pushed first, or fetched; the
    /// disks' chunks alike: [`SourceStorageReport::overflow_chunks`]).
    pub overflow_pages: u64,
    /// Device state bytes.
    pub device_state_bytes: u64,
    /// Post-copy pages pushed in the background.
    pub postcopy_pushed: u64,
    /// Post-copy pages not pushed because a fault had fetched them.
    pub postcopy_skipped: u64,
    /// Pages announced as zero (never populated, or all zero since round 0
    /// and not written after).
    pub zero_pages: u64,
    /// Pages sent in answer to faults.
    pub fault_pages_served: u64,
    /// Pages sent ahead of faults on the fault connection (sequential
    /// read-ahead).
    pub fault_readahead_pages: u64,
    /// Requests for pages already sent ahead (they needed no answer).
    pub fault_readahead_hits: u64,
    /// The disks' side, if the guest has disks.
    pub storage: Option<SourceStorageReport>,
    /// Frame bytes sent on both connections.
    pub bytes_sent: u64,
    /// Pre-copy duration (start to pause), s.
    pub precopy_s: f64,
    /// Post-copy push duration (`PostcopyBegin` to `Done`), s.
    pub push_s: f64,
    /// Sending the digests of the frozen memory and disks (after `Done`), s.
    pub integrity_s: f64,
    /// Downtime as the source alone can measure it (no shared clock): from
    /// its pause to the destination's `Resumed`, minus half the smallest RTT
    /// seen on the bulk connection (the way back is nearly empty); s.
    pub downtime_estimate_s: Option<f64>,
    /// The same without the RTT correction: an upper bound; s.
    pub downtime_upper_s: Option<f64>,
    /// Milestones.
    #[serde(skip)]
    pub times: Option<SourceTimes>,
}

/// What the source did with the guest's disks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SourceStorageReport {
    /// Chunks over all disks.
    pub chunks: u64,
    /// Chunks in the pre-copy set (the plan's `S`).
    pub precopy_chunks: u64,
    /// Fraction of chunks pre-copied.
    pub s: f64,
    /// Chunk sends while the guest ran (round 0 and resends).
    pub precopy_sends: u64,
    /// Pre-copy chunks sent while frozen (dirtied since their last send).
    pub remainder_chunks: u64,
    /// Dirty pre-copy chunks the freeze had no room for: announced absent
    /// at the destination and post-copied (pushed first, or fetched).
    pub overflow_chunks: u64,
    /// Post-copy chunks pushed in the background.
    pub chunks_pushed: u64,
    /// Post-copy chunks not pushed because a fault had fetched them.
    pub chunks_skipped: u64,
    /// Chunks sent in answer to fault requests.
    pub fault_chunks_served: u64,
    /// Frame bytes of chunks, on both connections.
    pub bytes_sent: u64,
}

/// What the fault server sent.
#[derive(Debug, Clone, Copy, Default)]
struct FaultStats {
    /// Pages sent in answer to requests.
    pages: u64,
    /// Pages sent ahead of requests.
    readahead_pages: u64,
    /// Requests for pages already sent ahead.
    readahead_hits: u64,
    /// Chunks sent in answer to requests.
    chunks: u64,
    /// Frame bytes of those chunks.
    chunk_bytes: u64,
    /// Every byte sent on the fault connection.
    wire_bytes: u64,
}

/// The source's disks during a migration.
struct Storage<'a> {
    disks: Arc<SourceDisks>,
    order: std::borrow::Cow<'a, PageOrder>,
    buf: Vec<u8>,
    /// Pre-copy chunks dirtied since their last send.
    pending: std::collections::BTreeSet<u64>,
    report: SourceStorageReport,
}

impl Storage<'_> {
    /// Notes the pre-copy chunks dirtied since the last look.
    fn collect(&mut self) {
        let Storage {
            disks,
            order,
            pending,
            ..
        } = self;
        pending.extend(
            disks
                .take_dirty()
                .into_iter()
                .filter(|&c| order.is_precopy(c)),
        );
    }

    fn send(&mut self, tx: &mut UnitSender, c: u64) -> Result<(), EngineError> {
        self.disks.read(c, &mut self.buf)?;
        let before = tx.stats().wire_bytes;
        let buf = &self.buf;
        tx.send_unit(UnitKind::Chunk, c, buf.len(), |out| {
            out.copy_from_slice(buf)
        })
        .map_err(EngineError::send("bulk"))?;
        self.report.bytes_sent += tx.stats().wire_bytes - before;
        Ok(())
    }

    /// Sends every pending chunk; returns how many.
    fn send_pending(&mut self, tx: &mut UnitSender) -> Result<u64, EngineError> {
        let pending = std::mem::take(&mut self.pending);
        for &c in &pending {
            self.send(tx, c)?;
        }
        Ok(pending.len() as u64)
    }
}

/// Pages (or chunks) the fault path has sent (the push skips them). For
/// pages it holds, from the commit on, every page the push must not send:
/// the ones at the destination already, and the ones sent in post-copy by
/// either thread (the first to add a page sends it).
type SentByFault = crate::bits::AtomicBitmap;

/// A bitmap in the engine's page-index space.
pub(crate) fn page_bitmap(pages: u64, page_size: usize) -> DirtyBitmap {
    let len = (pages * page_size as u64).max(page_size as u64);
    DirtyBitmap::with_page_size(RemoteRange::new(RemoteAddr(0), len), page_size as u64)
        .expect("page-aligned range from 0")
}

/// Sends page `p` on connection `conn` ("bulk" or "fault", for errors).
fn send_page(
    tx: &mut UnitSender,
    mem: &dyn PageReader,
    p: u64,
    ps: usize,
    conn: &'static str,
) -> Result<(), EngineError> {
    tx.try_send_unit(UnitKind::Page, p, ps, |out| mem.copy_page(p, out))
        .map_err(EngineError::send(conn))?
        .map(drop)
        .map_err(EngineError::Backend)
}

/// Runs the source side of a migration over `conns`.
pub fn run_source(
    backend: &mut dyn SourceBackend,
    conns: ConnectionPair,
    order: &PageOrder,
    cfg: &SourceConfig,
) -> Result<SourceReport, EngineError> {
    run_source_adaptive(backend, conns, order, cfg, &mut NoPlanChannel)
}

/// [`run_source`] in the adaptive loop: telemetry goes to `channel`, and a
/// newer plan from it is applied at the next pre-copy round boundary.
pub fn run_source_adaptive(
    backend: &mut dyn SourceBackend,
    conns: ConnectionPair,
    order: &PageOrder,
    cfg: &SourceConfig,
    channel: &mut dyn PlanChannel,
) -> Result<SourceReport, EngineError> {
    let ConnectionPair { bulk, fault } = conns;
    let io = bulk.io_path();
    let mut bulk = bulk;
    let mut fault = Some(fault);
    let mut paused = false;
    let result = migrate(
        backend,
        &mut bulk,
        &mut fault,
        order,
        cfg,
        &mut paused,
        channel,
    );
    channel.publish(&Telemetry {
        phase: if result.is_ok() {
            Phase::Done
        } else {
            Phase::Failed
        },
        bytes_sent: bulk.tx.stats().wire_bytes,
        faults_served: result.as_ref().map_or(0, |r| r.fault_pages_served),
        ..Telemetry::default()
    });
    match result {
        Ok(r) => Ok(SourceReport { io, ..r }),
        Err(PhaseError::BeforeResume(e)) => {
            // The destination never ran the guest: it goes on here, first.
            let resumed = if paused { backend.resume() } else { Ok(()) };
            // Then tell the destination, without waiting on it for long.
            if !matches!(e, EngineError::Aborted { .. }) {
                let reason = if matches!(e, EngineError::Timeout(_)) {
                    AbortReason::Timeout
                } else {
                    AbortReason::SourceFailed
                };
                if bulk.tx.send_control(ControlCode::Abort { reason }).is_ok() {
                    let _ = bulk.tx.sender().drain(ABORT_DRAIN);
                }
            }
            match resumed {
                Ok(()) => Err(e),
                Err(resume) => Err(EngineError::NotResumed {
                    cause: Box::new(e),
                    resume,
                }),
            }
        }
        Err(PhaseError::AfterResume(e)) => Err(e),
    }
}

/// How long the source waits for its Abort to be acknowledged.
const ABORT_DRAIN: Duration = Duration::from_secs(2);

/// An error, and whether the destination may already run the guest.
enum PhaseError {
    BeforeResume(EngineError),
    AfterResume(EngineError),
}

impl<E: Into<EngineError>> From<E> for PhaseError {
    fn from(e: E) -> Self {
        PhaseError::BeforeResume(e.into())
    }
}

/// The stop rule's bandwidth: what the peer acknowledged per second
/// (`TCP_INFO`'s `bytes_acked`), the best sample so far (a round that does
/// not fill the link under-states it).
#[derive(Debug, Default)]
struct AckedRate {
    last: Option<(Instant, u64)>,
    best: Option<f64>,
}

impl AckedRate {
    /// Samples `sock`; returns the best rate seen, bytes/s.
    fn sample(&mut self, sock: &TcpStream) -> Option<f64> {
        let Ok(info) = tcp::tcp_info(sock.as_fd()) else {
            return self.best;
        };
        let now = Instant::now();
        if let Some((t, acked)) = self.last {
            let dt = now.saturating_duration_since(t).as_secs_f64();
            let bytes = info.bytes_acked.saturating_sub(acked);
            if dt >= 0.05 && bytes > 0 {
                let rate = bytes as f64 / dt;
                self.best = Some(self.best.map_or(rate, |b| b.max(rate)));
            }
            if dt < 0.05 {
                // Too short to measure: keep the older starting point.
                return self.best;
            }
        }
        self.last = Some((now, info.bytes_acked));
        self.best
    }
}

/// The rate the stop rule predicts the freeze at: the link's, unless this
/// engine could not fill it. A sender bound by its own CPU (a fast link, a
/// slow or emulated machine: reading, compressing and sending pages) freezes
/// at what its rounds achieved; the link estimates (TCP's delivery rate, the
/// acknowledged bytes) then say what the path could carry, not what the
/// engine will send. What a round achieved is its units' uncompressed bytes
/// over the time it spent sending them (the freeze estimate counts units
/// uncompressed too; a link-bound round of compressible pages achieves more
/// than the link then). Its best round achieving less than half the link's
/// rate is taken as the rate; otherwise the link's stands (a short round
/// that waits on the RTT under-states the sender).
fn sender_bound(link: f64, rounds: &[RoundReport]) -> f64 {
    let achieved = rounds
        .iter()
        .filter(|r| r.send_s >= 0.2 && r.unit_bytes > 0)
        .map(|r| r.unit_bytes as f64 / r.send_s)
        .fold(None, |best: Option<f64>, r| {
            Some(best.map_or(r, |b| b.max(r)))
        });
    match achieved {
        Some(a) if a < 0.5 * link => a,
        _ => link,
    }
}

/// The rate the freeze's budget is spent at: the stop rule's, but no more
/// than the link carried over the longest-lasting evidence, the best round
/// that spent 0.2 s or more sending (its frame bytes over that time). The
/// stop rule's rate is a maximum of short samples (delivery rate, bytes
/// acknowledged per 50 ms), which runs ahead of a shaped link; a budget at
/// that rate overshoots the downtime target by as much.
fn freeze_bandwidth(stop_rule: f64, rounds: &[RoundReport]) -> f64 {
    rounds
        .iter()
        .filter(|r| r.send_s >= 0.2 && r.bytes > 0)
        .map(|r| r.bytes as f64 / r.send_s)
        .reduce(f64::max)
        .map_or(stop_rule, |carried| carried.min(stop_rule))
}

/// Each page's position in `order` (0 = hottest), to sort a sparse set of
/// pages hottest first (positions past `u32::MAX` saturate).
fn rank_index(order: &PageOrder) -> Vec<u32> {
    let mut ranks = vec![u32::MAX; order.pages() as usize];
    for (i, &p) in order.units().iter().enumerate() {
        ranks[p as usize] = u32::try_from(i).unwrap_or(u32::MAX);
    }
    ranks
}

/// The thread answering fault requests.
struct FaultServer {
    handle: std::thread::JoinHandle<Result<FaultStats, EngineError>>,
    sock: TcpStream,
}

impl FaultServer {
    fn spawn(
        fault: Connection,
        mem: Arc<dyn PageReader>,
        ps: usize,
        sent: Arc<SentByFault>,
        chunks: Option<(Arc<SourceDisks>, Arc<SentByFault>)>,
    ) -> Result<Self, EngineError> {
        let sock = super::error::socket_clone(&fault.rx, "fault")?;
        let handle = std::thread::Builder::new()
            .name("wanmig-fault-server".into())
            .spawn(move || serve_faults(fault, mem.as_ref(), ps, &sent, chunks))
            .map_err(|_| EngineError::Panicked("fault server"))?;
        Ok(FaultServer { handle, sock })
    }

    /// Waits until the destination said goodbye on the fault connection (or
    /// it broke); returns what it served.
    fn join(self) -> Result<FaultStats, EngineError> {
        self.handle
            .join()
            .map_err(|_| EngineError::Panicked("fault server"))?
    }

    /// Cuts the fault connection and waits for the thread.
    fn stop(self) {
        let _ = self.sock.shutdown(std::net::Shutdown::Both);
        let _ = self.handle.join();
    }
}

fn migrate(
    backend: &mut dyn SourceBackend,
    bulk: &mut Connection,
    fault: &mut Option<Connection>,
    planned: &PageOrder,
    cfg: &SourceConfig,
    paused: &mut bool,
    channel: &mut dyn PlanChannel,
) -> Result<SourceReport, PhaseError> {
    // The plan's order, until a newer plan replaces it.
    let mut order = std::borrow::Cow::Borrowed(planned);
    let mut applied = Vec::new();
    let mut generation = channel.initial_generation();
    let pages = backend.page_count();
    let ps = backend.page_size();
    if order.pages() != pages {
        return Err(EngineError::Protocol(format!(
            "the plan covers {} pages, the guest has {pages}",
            order.pages()
        ))
        .into());
    }
    let g = bulk.session.geometry;
    for (what, session, guest) in [
        ("page count", g.page_count(), pages),
        ("page size", g.page_size().into(), ps as u64),
    ] {
        if session != guest {
            return Err(EngineError::Geometry {
                what,
                session,
                guest,
            }
            .into());
        }
    }
    let mut storage = match (backend.disks(), planned.chunks()) {
        (None, _) => None,
        (Some(disks), Some(chunks)) => {
            let n = disks.space().chunks();
            if chunks.pages() != n || g.chunk_count() != n {
                return Err(EngineError::Geometry {
                    what: "chunk count",
                    session: g.chunk_count(),
                    guest: n,
                }
                .into());
            }
            Some(Storage {
                disks,
                order: std::borrow::Cow::Borrowed(chunks),
                buf: Vec::new(),
                pending: Default::default(),
                report: SourceStorageReport {
                    chunks: n,
                    precopy_chunks: chunks.precopy().len() as u64,
                    s: chunks.m(),
                    ..Default::default()
                },
            })
        }
        (Some(_), None) => {
            return Err(
                EngineError::Protocol("the guest has disks but the plan has no S".into()).into(),
            );
        }
    };
    let mem = backend.memory();
    let start = Instant::now();
    let mut rounds = Vec::new();
    let mut zero_pages = 0u64;
    let mut acked = AckedRate::default();
    acked.sample(bulk.tx.sender().socket());

    let unix_ns = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    };
    channel.publish(&Telemetry {
        phase: Phase::Precopy,
        round_started_unix_ns: unix_ns(),
        ..Telemetry::default()
    });

    // Round 0. The dirty log is armed first, so a page written after a page
    // is copied is sent again; a page written before it is copied already
    // goes unnoticed.
    backend.dirty_log_start()?;
    if let Some(st) = &storage {
        // The disks' logs too: what was written before is sent below.
        st.disks.take_dirty();
    }
    let mut populated = page_bitmap(pages, ps);
    for (first, count) in backend.populated_runs()? {
        populated.set_range(first, count);
    }
    let t = Instant::now();
    let before = bulk.tx.stats().wire_bytes;
    let units_before = bulk.tx.stats().unit_bytes;
    let tx = &mut bulk.tx;
    tx.send_control(ControlCode::RoundBegin { round: 0 })
        .map_err(EngineError::send("bulk"))?;
    let holes = runs_of(
        order
            .precopy()
            .iter()
            .copied()
            .filter(|&p| !populated.get(p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter(),
    );
    for &(first, count) in &holes {
        tx.send_control(ControlCode::ZeroPages { first, count })
            .map_err(EngineError::send("bulk"))?;
        zero_pages += count;
    }
    let mut sent0 = 0u64;
    for &p in order.precopy() {
        if populated.get(p) {
            send_page(tx, mem.as_ref(), p, ps, "bulk")?;
            sent0 += 1;
        }
    }
    if let Some(st) = &mut storage {
        let n = st.order.precopy().len();
        for i in 0..n {
            let c = st.order.precopy()[i];
            st.send(tx, c)?;
            sent0 += 1;
        }
        st.report.precopy_sends += n as u64;
    }
    // Post-copy pages that hold only zeros now: unless the guest writes them
    // (the dirty log says), they are announced at the freeze and never
    // fetched or pushed.
    let send0 = t.elapsed();
    let mut zero = page_bitmap(pages, ps);
    let mut scratch = vec![0u8; ps];
    for &p in order.postcopy() {
        if populated.get(p) {
            mem.copy_page(p, &mut scratch)?;
            if is_zero(&scratch) {
                zero.set(p);
            }
        }
    }
    tx.send_control(ControlCode::RoundEnd {
        round: 0,
        units_sent: sent0,
    })
    .map_err(EngineError::send("bulk"))?;
    tx.flush().map_err(EngineError::send("bulk"))?;
    let seconds0 = t.elapsed().as_secs_f64();
    rounds.push(RoundReport {
        round: 0,
        pages: sent0,
        bytes: tx.stats().wire_bytes - before,
        seconds: seconds0,
        unit_bytes: tx.stats().unit_bytes - units_before,
        send_s: send0.as_secs_f64(),
    });
    channel.publish(&Telemetry {
        phase: Phase::Precopy,
        round: 1,
        bytes_sent: tx.stats().wire_bytes,
        pages_sent: sent0,
        bandwidth_bps: acked
            .sample(tx.sender().socket())
            .map_or(0, |b| (b * 8.0) as u64),
        rtt_ns: tx
            .sender()
            .pacer()
            .min_rtt()
            .map_or(0, |r| r.as_nanos() as u64),
        last_round: 0,
        last_round_duration_ns: (seconds0 * 1e9) as u64,
        round_started_unix_ns: unix_ns(),
        ..Telemetry::default()
    });

    // Rounds k ≥ 1 while the guest runs.
    let mut dirty = page_bitmap(pages, ps);
    let mut previous = u64::MAX;
    let stop_reason;
    let mut round = 1u64;
    // The stop rule's last estimate of the link (bytes/s, RTT s): the
    // freeze's budget.
    let mut freeze_rate;
    loop {
        dirty.clear();
        backend.dirty_log_collect(&mut dirty)?;
        for p in dirty.iter_set() {
            zero.unset(p);
        }
        let mut todo: Vec<u64> = dirty
            .iter_set()
            .filter(|&p| p < pages && order.is_precopy(p))
            .collect();
        let (chunk_len, nc0) = match &mut storage {
            Some(st) => {
                st.collect();
                (st.disks.space().chunk_size(), st.pending.len() as u64)
            }
            None => (0, 0),
        };
        let dirty_pages = todo.len() as u64;
        // A newer plan applies from this round boundary: its new members
        // are sent in this round, and everything sent so far stays covered.
        if let Some(np) = channel.newer_plan().filter(|np| np.generation > generation) {
            let a = order.adopt(&np.order).map_err(|e| {
                EngineError::Protocol(format!("plan generation {}: {e}", np.generation))
            })?;
            let mut holes = std::collections::BTreeSet::new();
            for &p in &a.pages {
                zero.unset(p);
                if populated.get(p) {
                    // As if dirtied: sent in this round, or at the freeze
                    // if pre-copy stops here.
                    dirty.set(p);
                    todo.push(p);
                } else {
                    holes.insert(p);
                }
            }
            for (first, count) in runs_of(holes.into_iter()) {
                bulk.tx
                    .send_control(ControlCode::ZeroPages { first, count })
                    .map_err(EngineError::send("bulk"))?;
                zero_pages += count;
            }
            if let (Some(st), Some(c)) = (&mut storage, a.order.chunks()) {
                st.order = std::borrow::Cow::Owned(c.clone());
                st.pending.extend(a.chunks.iter().copied());
                st.report.precopy_chunks = c.precopy().len() as u64;
                st.report.s = c.m();
            }
            applied.push(AppliedPlan {
                round,
                generation: np.generation,
                m: np.order.m(),
                s: np.order.chunks().map(PageOrder::m),
                pages_added: a.pages.len() as u64,
                chunks_added: a.chunks.len() as u64,
            });
            generation = np.generation;
            order = std::borrow::Cow::Owned(a.order);
        }
        let nc = storage.as_ref().map_or(0, |st| st.pending.len() as u64);
        let n = todo.len() as u64 + nc;
        let pacer = bulk.tx.sender().pacer().bandwidth().map(|b| b as f64);
        let link = match (acked.sample(bulk.tx.sender().socket()), pacer) {
            (Some(a), Some(p)) => a.max(p),
            (a, p) => a.or(p).unwrap_or(1e6),
        };
        let bandwidth = sender_bound(link, &rounds);
        let rtt = bulk
            .tx
            .sender()
            .pacer()
            .min_rtt()
            .unwrap_or(Duration::ZERO)
            .as_secs_f64();
        let freeze_bytes =
            (n - nc) * (ps as u64 + 32) + nc * (chunk_len + 32) + cfg.device_state_estimate;
        let freeze_s = freeze_bytes as f64 / bandwidth + rtt;
        freeze_rate = (bandwidth, rtt);
        // The plan's round limit (e.g. one pass) when lower than the
        // engine's; round 0 included.
        let max_rounds = order
            .max_rounds()
            .map_or(cfg.max_rounds, |r| r.min(cfg.max_rounds))
            .max(1);
        if n == 0 {
            stop_reason = "clean: nothing dirtied".to_string();
            break;
        }
        if freeze_s <= cfg.downtime_target.as_secs_f64() {
            stop_reason = format!(
                "downtime target met: {n} dirty pages, predicted freeze {:.0} ms",
                freeze_s * 1e3
            );
            break;
        }
        if round > 1 && n as f64 >= cfg.min_shrink * previous as f64 {
            stop_reason = format!("not converging: {n} dirty pages after {previous}");
            break;
        }
        if round >= u64::from(max_rounds) {
            stop_reason = format!("round limit {max_rounds} reached");
            break;
        }
        let t = Instant::now();
        let before = bulk.tx.stats().wire_bytes;
        let units_before = bulk.tx.stats().unit_bytes;
        bulk.tx
            .send_control(ControlCode::RoundBegin { round })
            .map_err(EngineError::send("bulk"))?;
        for &p in &todo {
            send_page(&mut bulk.tx, mem.as_ref(), p, ps, "bulk")?;
        }
        if let Some(st) = &mut storage {
            st.report.precopy_sends += st.send_pending(&mut bulk.tx)?;
        }
        bulk.tx
            .send_control(ControlCode::RoundEnd {
                round,
                units_sent: n,
            })
            .map_err(EngineError::send("bulk"))?;
        bulk.tx.flush().map_err(EngineError::send("bulk"))?;
        let seconds = t.elapsed().as_secs_f64();
        rounds.push(RoundReport {
            round,
            pages: n,
            bytes: bulk.tx.stats().wire_bytes - before,
            seconds,
            unit_bytes: bulk.tx.stats().unit_bytes - units_before,
            send_s: seconds,
        });
        channel.publish(&Telemetry {
            phase: Phase::Precopy,
            round: round + 1,
            plan_generation: generation,
            bytes_sent: bulk.tx.stats().wire_bytes,
            pages_sent: rounds.iter().map(|r| r.pages).sum(),
            chunks_sent: storage.as_ref().map_or(0, |st| st.report.precopy_sends),
            bandwidth_bps: (bandwidth * 8.0) as u64,
            rtt_ns: (rtt * 1e9) as u64,
            last_round: round,
            last_round_duration_ns: (seconds * 1e9) as u64,
            dirty_pages_last_round: dirty_pages,
            dirty_chunks_last_round: nc0,
            round_started_unix_ns: unix_ns(),
            updated_unix_ns: 0,
            faults_served: 0,
        });
        previous = n;
        round += 1;
    }

    // Should the freeze have to choose among the dirty pages, it ranks them
    // with this (made while the guest still runs).
    let ranks = (order.freeze_policy() == FreezePolicy::Overflow).then(|| rank_index(&order));
    let chunk_keys = ranks
        .as_ref()
        .and_then(|r| order.merged_chunk_keys(r))
        .unwrap_or_default();

    // Freeze. From the first attempt to stop the guest on, a failure must
    // resume it (a stop that "failed" may have stopped it all the same).
    *paused = true;
    channel.publish(&Telemetry {
        phase: Phase::Freeze,
        round,
        plan_generation: generation,
        bytes_sent: bulk.tx.stats().wire_bytes,
        ..Telemetry::default()
    });
    backend.pause()?;
    let paused_at = Instant::now();
    let freeze_deadline = paused_at + cfg.freeze_timeout;
    let tx = &mut bulk.tx;
    tx.send_control(ControlCode::Freeze)
        .map_err(EngineError::send("bulk"))?;
    // `dirty` still holds what the last live scan found (the stop rule chose
    // not to send it live); add what was written since.
    backend.dirty_log_collect(&mut dirty)?;
    for p in dirty.iter_set() {
        zero.unset(p);
    }
    // Which pages hold anything, as of now (the guest is stopped). A page
    // that holds something now and held nothing at round 0 goes with the
    // dirty ones: a dirty log need not report a page that was populated
    // (Xen's log-dirty does not: a frame given to the guest starts out
    // writable, and writes to it are logged only from the next clean on).
    let before = std::mem::replace(&mut populated, page_bitmap(pages, ps));
    for (first, count) in backend.populated_runs()? {
        populated.set_range(first, count);
    }
    for p in populated
        .iter_set()
        .filter(|&p| p < pages && !before.get(p))
    {
        dirty.set(p);
        zero.unset(p);
    }
    // The dirty pre-copy remainder: all of it (classic), or hottest first
    // (the plan's ranking, pages and chunks merged as in the push) what
    // fits the downtime target; the rest stays behind, post-copied.
    let freeze_start = tx.stats().wire_bytes;
    let freeze_policy = order.freeze_policy();
    let mut todo: Vec<PushUnit> = dirty
        .iter_set()
        .filter(|&p| p < pages && order.is_precopy(p) && populated.get(p))
        .map(PushUnit::Page)
        .collect();
    if let Some(st) = &mut storage {
        // The guest is stopped (QEMU drained its disk requests): the last
        // dirty pre-copy chunks.
        st.collect();
        todo.extend(
            std::mem::take(&mut st.pending)
                .into_iter()
                .map(PushUnit::Chunk),
        );
    }
    let budget = (freeze_policy == FreezePolicy::Overflow).then(|| {
        let (bandwidth, rtt) = freeze_rate;
        let bandwidth = freeze_bandwidth(bandwidth, &rounds);
        let bytes = (cfg.downtime_target.as_secs_f64() - rtt) * bandwidth
            - cfg.device_state_estimate as f64;
        bytes.max(0.0) as u64
    });
    // A unit costs at most its bytes and a frame header on the link.
    let chunk_len = storage
        .as_ref()
        .map_or(0, |st| st.disks.space().chunk_size());
    let cost = |u: &PushUnit| match u {
        PushUnit::Page(_) => ps as u64 + HEADER_LEN as u64,
        PushUnit::Chunk(_) => chunk_len + HEADER_LEN as u64,
    };
    if let Some(b) = budget {
        if todo.iter().map(cost).sum::<u64>() > b {
            // They may not all fit: hottest first.
            let ranks = ranks.as_deref().unwrap_or_default();
            todo.sort_unstable_by_key(|u| match *u {
                PushUnit::Page(p) => {
                    let r = ranks.get(p as usize).copied().unwrap_or(u32::MAX);
                    (2 * u64::from(r) + 1, 0, 0, p)
                }
                PushUnit::Chunk(c) => {
                    let (k, j) = chunk_keys.get(c as usize).copied().unwrap_or((u64::MAX, c));
                    (k, 1, j, c)
                }
            });
        }
    }
    let (mut remainder, mut remainder_chunks) = (0u64, 0u64);
    let mut overflow: Vec<PushUnit> = Vec::new();
    for u in todo {
        let fits = budget.is_none_or(|b| {
            overflow.is_empty() && tx.stats().wire_bytes - freeze_start + cost(&u) <= b
        });
        match (u, fits) {
            (_, false) => overflow.push(u),
            (PushUnit::Page(p), true) => {
                send_page(tx, mem.as_ref(), p, ps, "bulk")?;
                remainder += 1;
            }
            (PushUnit::Chunk(c), true) => {
                if let Some(st) = &mut storage {
                    st.send(tx, c)?;
                    remainder_chunks += 1;
                }
            }
        }
    }
    // The push sends them first: the pages hottest first, then the chunks
    // hottest first (as the planner's model integrates the overflow).
    overflow.sort_by_key(|u| matches!(u, PushUnit::Chunk(_)));
    let (overflow_pages, overflow_chunks): (Vec<u64>, Vec<u64>) = {
        let (mut p, mut c) = (Vec::new(), Vec::new());
        for u in &overflow {
            match *u {
                PushUnit::Page(x) => p.push(x),
                PushUnit::Chunk(x) => c.push(x),
            }
        }
        p.sort_unstable();
        c.sort_unstable();
        (p, c)
    };
    if let Some(st) = &mut storage {
        st.report.remainder_chunks = remainder_chunks;
        st.report.overflow_chunks = overflow_chunks.len() as u64;
    }
    let remainder_bytes = tx.stats().wire_bytes - freeze_start;
    // The destination drops its stale copies of the units left behind:
    // they are post-copy units now.
    for (first, count) in runs_of(overflow_pages.iter().copied()) {
        tx.send_control(ControlCode::AbsentPages { first, count })
            .map_err(EngineError::send("bulk"))?;
    }
    for (first, count) in runs_of(overflow_chunks.iter().copied()) {
        tx.send_control(ControlCode::AbsentChunks { first, count })
            .map_err(EngineError::send("bulk"))?;
    }
    // Zero at the freeze: every page not populated now, in both sets (a
    // pre-copy page discarded after it was sent is stale at the destination
    // otherwise), and the post-copy pages zero since round 0.
    for p in 0..pages {
        if !populated.get(p) {
            zero.set(p);
        }
    }
    let announce =
        (0..pages).filter(|&p| !populated.get(p) || (zero.get(p) && !order.is_precopy(p)));
    for (first, count) in runs_of(announce) {
        tx.send_control(ControlCode::ZeroPages { first, count })
            .map_err(EngineError::send("bulk"))?;
        zero_pages += count;
    }
    let mut piece = 0u64;
    let device_state_bytes = backend.save_device_state(&mut |bytes| {
        let i = piece;
        piece += 1;
        tx.send_unit(UnitKind::DeviceState, i, bytes.len(), |out| {
            out.copy_from_slice(bytes)
        })
        .map(drop)
        .map_err(|e| crate::backend::BackendError::new("engine", "sending device state", e))
    })?;
    tx.send_control(ControlCode::DeviceStateEnd {
        total_bytes: device_state_bytes,
    })
    .map_err(EngineError::send("bulk"))?;
    tx.flush().map_err(EngineError::send("bulk"))?;

    // The destination loads the device state, which faults: serve them, and
    // wait for its word that the guest can run there.
    // Pages not to push: never populated, zero (announced), or pre-copied
    // (and not left behind by the freeze).
    let mut sent_before = order.precopy_words().to_vec();
    for &p in &overflow_pages {
        sent_before[(p / 64) as usize] &= !(1 << (p % 64));
    }
    let not_pushed = populated
        .words()
        .iter()
        .zip(zero.words())
        .zip(&sent_before)
        .map(|((pop, z), pre)| !pop | z | pre);
    let sent_by_fault = Arc::new(SentByFault::from_words(pages, not_pushed));
    let chunk_served = storage.as_ref().map(|st| {
        (
            st.disks.clone(),
            Arc::new(SentByFault::new(st.report.chunks)),
        )
    });
    let server = FaultServer::spawn(
        fault
            .take()
            .expect("fault connection present until post-copy"),
        mem.clone(),
        ps,
        sent_by_fault.clone(),
        chunk_served.clone(),
    )?;
    if let Err(e) = wait_loaded(bulk, freeze_deadline) {
        server.stop();
        return Err(PhaseError::BeforeResume(e));
    }

    // The commit: from PostcopyBegin on, the destination may run the guest.
    channel.publish(&Telemetry {
        phase: Phase::Postcopy,
        round,
        plan_generation: generation,
        bytes_sent: bulk.tx.stats().wire_bytes,
        ..Telemetry::default()
    });
    let post = postcopy(
        bulk,
        mem.as_ref(),
        &order,
        &overflow,
        cfg,
        &zero,
        &populated,
        &sent_by_fault,
        ps,
        backend.holes_read_as_zero(),
        storage
            .as_mut()
            .zip(chunk_served.as_ref().map(|(_, s)| s.as_ref())),
    );
    let Postcopied {
        pushed,
        skipped,
        postcopy_begin,
        push_done,
        integrity_s,
        resumed_seen,
    } = match post {
        Ok(p) => p,
        Err(e) => {
            // The destination owns the guest now and may still need pages:
            // answer its requests until it says goodbye.
            let _ = server.join();
            return Err(PhaseError::AfterResume(e));
        }
    };
    let fault_stats = server.join().map_err(PhaseError::AfterResume)?;
    let end = Instant::now();
    Ok(SourceReport {
        io: Default::default(),
        m: order.m(),
        pages,
        precopy_pages: order.precopy().len() as u64,
        plans_applied: applied,
        rounds,
        stop_reason,
        remainder_pages: remainder,
        remainder_bytes,
        freeze_policy,
        freeze_budget_bytes: budget,
        overflow_pages: overflow_pages.len() as u64,
        device_state_bytes,
        postcopy_pushed: pushed,
        postcopy_skipped: skipped,
        zero_pages,
        fault_pages_served: fault_stats.pages,
        fault_readahead_pages: fault_stats.readahead_pages,
        fault_readahead_hits: fault_stats.readahead_hits,
        storage: storage.map(|mut st| {
            st.report.fault_chunks_served = fault_stats.chunks;
            st.report.bytes_sent += fault_stats.chunk_bytes;
            st.report
        }),
        bytes_sent: bulk.tx.stats().wire_bytes + fault_stats.wire_bytes,
        precopy_s: paused_at.duration_since(start).as_secs_f64(),
        push_s: push_done.duration_since(postcopy_begin).as_secs_f64(),
        integrity_s,
        downtime_upper_s: resumed_seen.map(|t| t.duration_since(paused_at).as_secs_f64()),
        downtime_estimate_s: resumed_seen.map(|t| {
            let rtt = bulk.tx.sender().pacer().min_rtt().unwrap_or_default();
            (t.duration_since(paused_at).as_secs_f64() - rtt.as_secs_f64() / 2.0).max(0.0)
        }),
        times: Some(SourceTimes {
            start,
            paused: paused_at,
            postcopy_begin,
            push_done,
            end,
            resumed_seen,
        }),
    })
}

/// Waits for the destination's `Loaded` until `deadline`.
fn wait_loaded(bulk: &mut Connection, deadline: Instant) -> Result<(), EngineError> {
    let dec = bulk.session.decoder();
    let on_frame = |f: FrameRef<'_>| match f {
        FrameRef::Control(ControlCode::Loaded) => Ok(Flow::Stop),
        FrameRef::Control(ControlCode::Abort { reason }) => Err(EngineError::Aborted {
            peer: "destination",
            reason,
        }),
        other => Err(EngineError::Protocol(format!(
            "{:?} from the destination before it loaded the device state",
            other.frame_type()
        ))),
    };
    match bulk
        .rx
        .run_with(&dec, Some(deadline), &mut (on_frame, || Ok(())))
    {
        Ok(RecvEnd::Stopped) => Ok(()),
        Ok(RecvEnd::Closed) => Err(EngineError::Recv {
            conn: "bulk",
            message: "the destination closed the connection before it loaded the device state"
                .into(),
        }),
        Err(RecvError::TimedOut) => Err(EngineError::Timeout(
            "the destination to load the device state",
        )),
        Err(e) => Err(EngineError::from_recv("bulk", e)),
    }
}

/// After the commit: `PostcopyBegin`, the push, `Done`, the digests, and the
/// destination's goodbye. Returns (pushed, skipped, commit instant, push
/// end).
#[allow(clippy::too_many_arguments)]
fn postcopy(
    bulk: &mut Connection,
    mem: &dyn PageReader,
    order: &PageOrder,
    overflow: &[PushUnit],
    cfg: &SourceConfig,
    zero: &DirtyBitmap,
    populated: &DirtyBitmap,
    sent_by_fault: &SentByFault,
    ps: usize,
    holes_read_as_zero: bool,
    storage: Option<(&mut Storage<'_>, &SentByFault)>,
) -> Result<Postcopied, EngineError> {
    bulk.tx
        .send_control(ControlCode::PostcopyBegin)
        .map_err(EngineError::send("bulk"))?;
    bulk.tx.flush().map_err(EngineError::send("bulk"))?;
    let postcopy_begin = Instant::now();
    // The destination's frames (Resumed, at once; Goodbye, once it has
    // everything) are read while the push goes on, so that the moment of
    // the resume is seen when it comes.
    let dec = bulk.session.decoder();
    let sock = super::error::socket_clone(&bulk.rx, "bulk")?;
    let Connection { tx, rx, .. } = bulk;
    std::thread::scope(|sc| {
        let reader = std::thread::Builder::new()
            .name("wanmig-bulk-rx".into())
            .spawn_scoped(sc, move || read_until_goodbye(rx, &dec))
            .map_err(|_| EngineError::Panicked("bulk receiver"))?;
        let pushed = push(
            tx,
            mem,
            order,
            overflow,
            cfg,
            zero,
            populated,
            sent_by_fault,
            ps,
            holes_read_as_zero,
            storage,
        );
        if pushed.is_err() {
            // Nothing more will come from here: let the reader go.
            let _ = sock.shutdown(std::net::Shutdown::Both);
        }
        let read = reader
            .join()
            .map_err(|_| EngineError::Panicked("bulk receiver"))?;
        let (pushed, skipped, push_done, integrity_s) = pushed?;
        let resumed_seen = read?;
        Ok(Postcopied {
            pushed,
            skipped,
            postcopy_begin,
            push_done,
            integrity_s,
            resumed_seen,
        })
    })
}

/// What the post-copy phase did.
struct Postcopied {
    /// Pages pushed.
    pushed: u64,
    /// Pages the push skipped (a fault had fetched them).
    skipped: u64,
    /// `PostcopyBegin` sent.
    postcopy_begin: Instant,
    /// `Done` sent.
    push_done: Instant,
    /// Sending the digests, s.
    integrity_s: f64,
    /// The destination's `Resumed` arrived.
    resumed_seen: Option<Instant>,
}

/// The push, `Done`, the digests, `Goodbye`; returns (pushed, skipped,
/// push end, seconds spent sending the digests).
#[allow(clippy::too_many_arguments)]
fn push(
    tx: &mut UnitSender,
    mem: &dyn PageReader,
    order: &PageOrder,
    overflow: &[PushUnit],
    cfg: &SourceConfig,
    zero: &DirtyBitmap,
    populated: &DirtyBitmap,
    sent_by_fault: &SentByFault,
    ps: usize,
    holes_read_as_zero: bool,
    mut storage: Option<(&mut Storage<'_>, &SentByFault)>,
) -> Result<(u64, u64, Instant, f64), EngineError> {
    let pages = order.pages();
    // Post-copy push, hottest first: pages and the disks' chunks in one
    // ranking when the plan has one (as the model integrates the push),
    // else every page, then every chunk.
    let (mut pushed, mut skipped) = (0u64, 0u64);
    // First the units the freeze left behind (pre-copy units: hotter than
    // every post-copy unit of their kind), hottest first.
    let units = overflow.iter().copied().chain(order.push_sequence());
    for unit in units {
        match unit {
            PushUnit::Page(p) => {
                if zero.get(p) || !populated.get(p) {
                    continue;
                }
                if !sent_by_fault.insert(p) {
                    skipped += 1;
                    continue;
                }
                send_page(tx, mem, p, ps, "bulk")?;
                pushed += 1;
            }
            PushUnit::Chunk(c) => {
                let Some((st, served)) = &mut storage else {
                    continue;
                };
                if served.get(c) {
                    st.report.chunks_skipped += 1;
                    continue;
                }
                st.send(tx, c)?;
                st.report.chunks_pushed += 1;
            }
        }
    }
    let units_total = tx.stats().units;
    tx.send_control(ControlCode::Done { units_total })
        .map_err(EngineError::send("bulk"))?;
    tx.flush().map_err(EngineError::send("bulk"))?;
    let push_done = Instant::now();

    let digests_start = Instant::now();
    if cfg.integrity {
        send_digests(tx, mem, populated, pages, ps, holes_read_as_zero)?;
        if let Some((st, _)) = &mut storage {
            send_chunk_digests(tx, st)?;
        }
    }
    tx.send_goodbye().map_err(EngineError::send("bulk"))?;
    tx.flush().map_err(EngineError::send("bulk"))?;

    Ok((
        pushed,
        skipped,
        push_done,
        digests_start.elapsed().as_secs_f64(),
    ))
}

/// Reads the destination's bulk frames until its goodbye; returns when its
/// `Resumed` arrived.
fn read_until_goodbye(
    rx: &mut crate::transport::FrameReceiver,
    dec: &crate::wire::FrameDecoder,
) -> Result<Option<Instant>, EngineError> {
    let mut resumed_seen = None;
    let end = rx
        .run(dec, |f| -> Result<Flow, EngineError> {
            match f {
                FrameRef::Control(ControlCode::Resumed) => {
                    resumed_seen.get_or_insert_with(Instant::now);
                    Ok(Flow::Continue)
                }
                FrameRef::Goodbye => Ok(Flow::Stop),
                FrameRef::Control(ControlCode::Abort { reason }) => Err(EngineError::Aborted {
                    peer: "destination",
                    reason,
                }),
                other => Err(EngineError::Protocol(format!(
                    "unexpected {:?} from the destination",
                    other.frame_type()
                ))),
            }
        })
        .map_err(|e| EngineError::from_recv("bulk", e))?;
    if end == RecvEnd::Closed {
        return Err(EngineError::Recv {
            conn: "bulk",
            message: "the destination closed the connection without a goodbye".into(),
        });
    }
    Ok(resumed_seen)
}

/// CRC32 of every page of the frozen guest, in Digest frames.
fn send_digests(
    tx: &mut UnitSender,
    mem: &dyn PageReader,
    populated: &DirtyBitmap,
    pages: u64,
    ps: usize,
    holes_read_as_zero: bool,
) -> Result<(), EngineError> {
    let zero_crc = if holes_read_as_zero {
        crc32fast::hash(&vec![0u8; ps])
    } else {
        crate::wire::HOLE_DIGEST
    };
    let mut page = vec![0u8; ps];
    let mut crcs = Vec::with_capacity(MAX_DIGEST_UNITS as usize);
    let mut first = 0u64;
    while first < pages {
        let n = (pages - first).min(u64::from(MAX_DIGEST_UNITS));
        crcs.clear();
        for p in first..first + n {
            if populated.get(p) {
                mem.copy_page(p, &mut page)?;
                crcs.push(crc32fast::hash(&page));
            } else {
                crcs.push(zero_crc);
            }
        }
        tx.send_digest(UnitKind::Page, first, &crcs)
            .map_err(EngineError::send("bulk"))?;
        first += n;
    }
    Ok(())
}

/// CRC32 of every chunk of the frozen disks, in Digest frames.
fn send_chunk_digests(tx: &mut UnitSender, st: &mut Storage<'_>) -> Result<(), EngineError> {
    let chunks = st.report.chunks;
    let mut crcs = Vec::with_capacity(MAX_DIGEST_UNITS as usize);
    let mut first = 0u64;
    while first < chunks {
        let n = (chunks - first).min(u64::from(MAX_DIGEST_UNITS));
        crcs.clear();
        for c in first..first + n {
            st.disks.read(c, &mut st.buf)?;
            crcs.push(crc32fast::hash(&st.buf));
        }
        tx.send_digest(UnitKind::Chunk, first, &crcs)
            .map_err(EngineError::send("bulk"))?;
        first += n;
    }
    Ok(())
}

/// Answers the destination's fault requests until it says goodbye; returns
/// what it sent.
fn serve_faults(
    mut fault: Connection,
    mem: &dyn PageReader,
    ps: usize,
    sent: &SentByFault,
    chunks: Option<(Arc<SourceDisks>, Arc<SentByFault>)>,
) -> Result<FaultStats, EngineError> {
    let dec = fault.session.decoder();
    let Connection { tx, rx, .. } = &mut fault;
    let mut st = FaultStats::default();
    let mut buf = Vec::new();
    let pages = sent.len();
    // Pages sent on this connection: a request for one needs no answer (it
    // is ahead in the stream).
    let here = crate::bits::AtomicBitmap::new(pages);
    let mut readahead = Readahead::new(pages);
    rx.run(&dec, |f| -> Result<Flow, EngineError> {
        match f {
            FrameRef::Request {
                kind: UnitKind::Page,
                index,
                count,
            } => {
                for p in index..index + u64::from(count) {
                    let sent_ahead = here.get(p);
                    if sent_ahead {
                        st.readahead_hits += 1;
                    } else {
                        sent.set(p);
                        here.set(p);
                        send_page(tx, mem, p, ps, "fault")?;
                        st.pages += 1;
                    }
                    // A guest's fault, not the sweep of a broken bulk
                    // connection.
                    if count != 1 {
                        continue;
                    }
                    for q in readahead.on_request(p, sent_ahead) {
                        if sent.insert(q) {
                            here.set(q);
                            send_page(tx, mem, q, ps, "fault")?;
                            st.readahead_pages += 1;
                        }
                    }
                }
                tx.flush().map_err(EngineError::send("fault"))?;
                Ok(Flow::Continue)
            }
            FrameRef::Request {
                kind: UnitKind::Chunk,
                index,
                count,
            } => {
                let Some((disks, sent)) = &chunks else {
                    return Err(EngineError::Protocol(format!(
                        "chunk {index} requested, but the guest has no disk"
                    )));
                };
                for c in index..index + u64::from(count) {
                    sent.set(c);
                    disks.read(c, &mut buf)?;
                    let b = &buf;
                    let before = tx.stats().wire_bytes;
                    tx.send_unit(UnitKind::Chunk, c, b.len(), |out| out.copy_from_slice(b))
                        .map_err(EngineError::send("fault"))?;
                    st.chunks += 1;
                    st.chunk_bytes += tx.stats().wire_bytes - before;
                }
                tx.flush().map_err(EngineError::send("fault"))?;
                Ok(Flow::Continue)
            }
            FrameRef::Ping(p) => {
                tx.send_pong(p).map_err(EngineError::send("fault"))?;
                tx.flush().map_err(EngineError::send("fault"))?;
                Ok(Flow::Continue)
            }
            FrameRef::Goodbye => Ok(Flow::Stop),
            other => Err(EngineError::Protocol(format!(
                "unexpected {:?} on the fault connection",
                other.frame_type()
            ))),
        }
    })
    .map_err(|e| EngineError::from_recv("fault", e))?;
    tx.send_goodbye().map_err(EngineError::send("fault"))?;
    tx.flush().map_err(EngineError::send("fault"))?;
    st.wire_bytes = tx.stats().wire_bytes;
    Ok(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round(unit_bytes: u64, send_s: f64) -> RoundReport {
        RoundReport {
            round: 0,
            pages: 0,
            bytes: unit_bytes / 2,
            seconds: send_s + 1.0,
            unit_bytes,
            send_s,
        }
    }

    #[test]
    fn the_stop_rule_freezes_at_the_link_rate_unless_the_sender_could_not_fill_it() {
        let link = 5e6;
        // Rounds that filled the link (slow start, a short round): the link.
        assert_eq!(sender_bound(link, &[round(40_000_000, 9.0)]), link);
        assert_eq!(sender_bound(link, &[round(10_000, 0.01)]), link);
        assert_eq!(sender_bound(link, &[]), link);
        // A CPU-bound sender (a nested lab: 87 MB in 61 s against a
        // loopback estimate of GB/s): what it achieved, its best round,
        // uncompressed, over its sending time alone.
        let rounds = [round(87_000_000, 61.0), round(2_000_000, 2.0)];
        let b = sender_bound(1e9, &rounds);
        assert!((b - 87e6 / 61.0).abs() < 1.0, "{b}");
        // Compressible pages over a link: more unit bytes than the link
        // carried, so the link's rate stands.
        assert_eq!(sender_bound(link, &[round(80_000_000, 9.0)]), link);
    }

    #[test]
    fn the_freeze_budget_is_spent_at_no_more_than_a_long_round_carried() {
        // A 100 Mbit/s link whose short samples said 16.6 MB/s: the long
        // rounds carried 12.5 MB/s (frame bytes over sending time).
        let rounds = [round(200_000_000, 8.0), round(50_000, 0.01)];
        assert_eq!(freeze_bandwidth(16.6e6, &rounds), 12.5e6);
        // No long round: the stop rule's rate.
        assert_eq!(freeze_bandwidth(16.6e6, &rounds[1..]), 16.6e6);
        // A round slower than the stop rule's rate does not raise it.
        assert_eq!(freeze_bandwidth(5e6, &rounds), 5e6);
    }

    #[test]
    fn ranks_sort_pages_hottest_first() {
        let order = PageOrder::new(vec![3, 0, 2, 1], 0.5).unwrap();
        let ranks = rank_index(&order);
        assert_eq!(ranks, vec![1, 3, 2, 0]);
        let mut pages = vec![0, 1, 2, 3];
        pages.sort_unstable_by_key(|&p| (ranks.get(p as usize).copied(), p));
        assert_eq!(pages, order.units());
    }
}
