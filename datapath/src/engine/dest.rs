//! The destination engine: fills guest RAM before the resume, loads the
//! device state, resumes the guest, then installs the post-copy push while
//! serving the guest's faults ahead of it.
//!
//! Three threads:
//! - the bulk receiver (the caller's thread) writes pre-copy pages with
//!   `pwrite`, loads the device state, resumes the guest and installs pushed
//!   pages with `UFFDIO_COPY`;
//! - the fault requester waits on the userfaultfd and, for a page that is
//!   neither here nor known to be zero, sends a request on the fault
//!   connection (zero pages are installed locally, pages already here are
//!   woken);
//! - the fault-answer receiver installs the answers.
//!
//! The fault threads start before the device state is loaded: QEMU touches
//! guest RAM while loading it. Before the guest is released every page must
//! be here or known to be zero; otherwise the engine refuses (an absent page
//! would read as zeros).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::error::EngineError;
use super::page_states::{PageState, PageStates};
use super::source::page_bitmap;
use crate::backend::{DestBackend, Install, PageInstaller};
use crate::connection::{Connection, ConnectionPair};
use crate::transport::{Flow, FrameReceiver};
use crate::unit_stream::UnitSender;
use crate::wire::{ControlCode, DEVICE_STATE_PIECE, FrameDecoder, FrameRef, UnitKind};

/// Tuning of the destination engine.
#[derive(Debug, Clone, PartialEq)]
pub struct DestConfig {
    /// Never resume the guest: it stays paused with every page in place, so
    /// its RAM can be compared with the source's frozen RAM (a check mode; the
    /// caller resumes it).
    pub hold: bool,
    /// The Γ window: stalls met during the first `dt` after the resume.
    pub dt: Duration,
    /// How long to wait for the last pages after the push ended.
    pub completion_timeout: Duration,
}

impl Default for DestConfig {
    fn default() -> Self {
        DestConfig {
            hold: false,
            dt: Duration::from_secs(20),
            completion_timeout: Duration::from_secs(120),
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

/// The end-to-end integrity check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct IntegrityReport {
    /// Pages compared with the source's frozen pages (those the guest has not
    /// written since the resume).
    pub pages_compared: u64,
    /// Compared pages whose digest differs.
    pub pages_differing: u64,
    /// Pages skipped because the guest wrote them after the resume.
    pub pages_written_since_resume: u64,
}

/// What the destination did.
#[derive(Debug, Clone, Serialize)]
pub struct DestReport {
    /// Pre-copy pages received (with resends).
    pub precopy_pages: u64,
    /// Post-copy pages installed from the push.
    pub pushed_pages: u64,
    /// Post-copy faults that fetched a page from the source.
    pub faults: u64,
    /// Faults on zero pages, served locally.
    pub zero_faults: u64,
    /// Total time faulting vCPUs waited for fetched pages, s.
    pub penalty_s: f64,
    /// Of that, the part within the first `dt` after the resume, s.
    pub penalty_in_window_s: f64,
    /// Longest single fault stall, s.
    pub max_stall_s: f64,
    /// Device state bytes.
    pub device_state_bytes: u64,
    /// Post-copy duration (resume to every page here), s.
    pub uptime_s: f64,
    /// Integrity check (when the source sent digests).
    pub integrity: Option<IntegrityReport>,
    /// Milestones.
    #[serde(skip)]
    pub times: Option<DestTimes>,
}

/// Fault timing shared by the three threads.
#[derive(Debug, Default)]
struct Stalls {
    pending: Mutex<HashMap<u64, Instant>>,
    done: Mutex<Vec<(Instant, Duration)>>,
}

impl Stalls {
    fn started(&self, p: u64, at: Instant) {
        self.pending
            .lock()
            .expect("stall lock")
            .entry(p)
            .or_insert(at);
    }
    fn resolved(&self, p: u64, at: Instant) {
        if let Some(t) = self.pending.lock().expect("stall lock").remove(&p) {
            self.done
                .lock()
                .expect("stall lock")
                .push((t, at.saturating_duration_since(t)));
        }
    }
}

/// Consecutive pushed pages gathered for one `install_run`.
#[derive(Debug)]
struct InstallRun {
    ps: usize,
    first: u64,
    len: usize,
    buf: Vec<u8>,
}

impl InstallRun {
    /// Pages per batch (1 MiB of 4 KiB pages).
    const MAX: usize = 256;

    fn new(ps: usize) -> Self {
        InstallRun {
            ps,
            first: 0,
            len: 0,
            buf: vec![0; ps * Self::MAX],
        }
    }

    fn extends(&self, p: u64) -> bool {
        self.len > 0 && self.len < Self::MAX && p == self.first + self.len as u64
    }

    fn start(&mut self, p: u64) {
        self.first = p;
        self.len = 0;
    }

    /// The slot for the next page.
    fn push(&mut self) -> &mut [u8] {
        let at = self.len * self.ps;
        self.len += 1;
        &mut self.buf[at..at + self.ps]
    }

    fn flush(
        &mut self,
        installer: &dyn PageInstaller,
        states: &PageStates,
        stalls: &Stalls,
    ) -> Result<(), EngineError> {
        if self.len == 0 {
            return Ok(());
        }
        installer.install_run(self.first, &self.buf[..self.len * self.ps])?;
        let now = Instant::now();
        for p in self.first..self.first + self.len as u64 {
            if states.get(p) == PageState::Requested {
                stalls.resolved(p, now);
            }
            states.set(p, PageState::Present);
        }
        self.len = 0;
        Ok(())
    }
}

fn install_into(
    installer: &dyn PageInstaller,
    states: &PageStates,
    stalls: &Stalls,
    p: u64,
    data: &[u8],
) -> Result<bool, EngineError> {
    let fresh = installer.install(p, data)? == Install::Installed;
    let was = states.get(p);
    states.set(p, PageState::Present);
    if was == PageState::Requested {
        stalls.resolved(p, Instant::now());
    }
    Ok(fresh)
}

/// Runs the destination side of a migration over `conns`.
pub fn run_destination(
    backend: &mut dyn DestBackend,
    conns: ConnectionPair,
    cfg: &DestConfig,
) -> Result<DestReport, EngineError> {
    let ConnectionPair { bulk, fault } = conns;
    let mut bulk = bulk;
    let pages = backend.page_count();
    let ps = backend.page_size();
    let states = Arc::new(PageStates::new(pages));
    let stalls = Arc::new(Stalls::default());
    let installer = backend.installer();
    let stop = Arc::new(AtomicBool::new(false));
    let zero_faults = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut fault = Some(fault);
    let mut workers: Option<(Worker, Worker)> = None;

    let mut page = vec![0u8; ps];
    let mut device_state = Vec::new();
    let mut device_state_bytes = 0u64;
    let mut resumed: Option<Instant> = None;
    let mut freeze_received: Option<Instant> = None;
    let mut precopy_pages = 0u64;
    let mut pushed_pages = 0u64;
    let mut push_done = false;
    let mut digests: Vec<u32> = Vec::new();
    let mut digest_seen = 0u64;
    let dec = bulk.session.decoder();
    let Connection {
        tx: bulk_tx,
        rx: bulk_rx,
        ..
    } = &mut bulk;

    let mut run = InstallRun::new(ps);
    let received = bulk_rx.run(&dec, |f| -> Result<Flow, EngineError> {
        if !matches!(
            f,
            FrameRef::Unit {
                kind: UnitKind::Page,
                ..
            }
        ) {
            run.flush(installer.as_ref(), &states, &stalls)?;
        }
        match f {
            FrameRef::Unit {
                kind: UnitKind::Page,
                index,
                payload,
            } => {
                if workers.is_none() {
                    // QEMU has not touched guest RAM yet: plain writes (a
                    // page may be rewritten by later rounds).
                    payload.unpack_into(&mut page)?;
                    backend.write_page(index, &page)?;
                    states.set(index, PageState::Present);
                    precopy_pages += 1;
                } else {
                    // QEMU may fault on it: install atomically, waking it,
                    // consecutive pages in one batch.
                    if !run.extends(index) {
                        run.flush(installer.as_ref(), &states, &stalls)?;
                        run.start(index);
                    }
                    let slot = run.push();
                    payload.unpack_into(slot)?;
                    pushed_pages += 1;
                }
                Ok(Flow::Continue)
            }
            FrameRef::Unit {
                kind: UnitKind::DeviceState,
                index,
                payload,
            } => {
                let at = index as usize * DEVICE_STATE_PIECE as usize;
                let len = payload.unit_len() as usize;
                if device_state.len() < at + len {
                    device_state.resize(at + len, 0);
                }
                payload.unpack_into(&mut device_state[at..at + len])?;
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::ZeroPages { first, count }) => {
                for p in first..first + count {
                    if states.get(p) == PageState::Present {
                        backend.discard_page(p)?;
                    }
                    states.set(p, PageState::Zero);
                }
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::RoundBegin { .. } | ControlCode::RoundEnd { .. }) => {
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::Freeze) => {
                freeze_received = Some(Instant::now());
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::DeviceStateEnd { total_bytes }) => {
                if total_bytes as usize > device_state.len() {
                    return Err(EngineError::Protocol(format!(
                        "device state of {total_bytes} bytes announced, {} received",
                        device_state.len()
                    )));
                }
                device_state.truncate(total_bytes as usize);
                device_state_bytes = total_bytes;
                // Faults can come as soon as QEMU loads the device state.
                let fault = fault
                    .take()
                    .ok_or_else(|| EngineError::Protocol("device state sent twice".into()))?;
                workers = Some(start_fault_threads(
                    fault,
                    installer.clone(),
                    states.clone(),
                    stalls.clone(),
                    stop.clone(),
                    zero_faults.clone(),
                    ps,
                )?);
                backend.track_writes()?;
                backend.load_device_state(&device_state)?;
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::PostcopyBegin) => {
                if workers.is_none() {
                    return Err(EngineError::Protocol(
                        "PostcopyBegin before the device state".into(),
                    ));
                }
                if !cfg.hold {
                    backend.resume()?;
                    resumed = Some(Instant::now());
                    bulk_tx
                        .send_control(ControlCode::Resumed)
                        .and_then(|_| bulk_tx.flush())
                        .map_err(EngineError::send("bulk"))?;
                }
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::Done { .. }) => {
                push_done = true;
                Ok(Flow::Continue)
            }
            FrameRef::Digest {
                kind: UnitKind::Page,
                first,
                crcs,
            } => {
                if first != digest_seen {
                    return Err(EngineError::Protocol(format!(
                        "digests out of order at page {first}"
                    )));
                }
                digests.extend(crcs.iter());
                digest_seen += crcs.len() as u64;
                Ok(Flow::Continue)
            }
            FrameRef::Control(ControlCode::Abort { reason }) => Err(EngineError::Protocol(
                format!("the source aborted: {reason:?}"),
            )),
            FrameRef::Goodbye => Ok(Flow::Stop),
            other => Err(EngineError::Protocol(format!(
                "unexpected {:?} on the bulk connection",
                other.frame_type()
            ))),
        }
    });
    let finish = |workers: Option<(Worker, Worker)>| -> Result<(), EngineError> {
        stop.store(true, Ordering::Release);
        if let Some((req, ans)) = workers {
            let r1 = req
                .join()
                .map_err(|_| EngineError::Panicked("fault requester"))?;
            let r2 = ans
                .join()
                .map_err(|_| EngineError::Panicked("fault answers"))?;
            r1?;
            r2?;
        }
        Ok(())
    };
    if let Err(e) = received {
        let _ = finish(workers);
        return Err(EngineError::from_recv("bulk", e));
    }
    if !push_done {
        let _ = finish(workers);
        return Err(EngineError::Protocol(
            "the source said goodbye before Done".into(),
        ));
    }
    let freeze_received =
        freeze_received.ok_or_else(|| EngineError::Protocol("no Freeze".into()))?;

    // Wait for the pages still travelling on the fault path.
    let deadline = Instant::now() + cfg.completion_timeout;
    loop {
        let missing = states.count(PageState::Absent) + states.count(PageState::Requested);
        if missing == 0 {
            break;
        }
        if Instant::now() >= deadline {
            let _ = finish(workers);
            return Err(EngineError::Incomplete { missing });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let complete = Instant::now();
    // With `hold` the guest stays paused: the caller checks the memory and
    // resumes it.
    let resumed = resumed.unwrap_or(complete);

    // Integrity: compare every page the guest has not written since the
    // resume with the source's frozen page. Read first, then look at which
    // pages were written: a page written in between is skipped.
    let integrity = if digests.len() as u64 == pages {
        let mut before = page_bitmap(pages, ps);
        backend.written_pages(&mut before)?;
        let mut mismatched = Vec::new();
        for p in 0..pages {
            if before.get(p) {
                continue;
            }
            backend.read_page(p, &mut page)?;
            if crc32fast::hash(&page) != digests[p as usize] {
                mismatched.push(p);
            }
        }
        let mut after = page_bitmap(pages, ps);
        backend.written_pages(&mut after)?;
        let differing = mismatched.iter().filter(|&&p| !after.get(p)).count() as u64;
        let written = after.count();
        Some(IntegrityReport {
            pages_compared: pages - written,
            pages_differing: differing,
            pages_written_since_resume: written,
        })
    } else {
        None
    };

    finish(workers)?;
    backend.release()?;
    bulk.tx.send_goodbye().map_err(EngineError::send("bulk"))?;
    bulk.tx.flush().map_err(EngineError::send("bulk"))?;

    let done = stalls.done.lock().expect("stall lock").clone();
    let window_end = resumed + cfg.dt;
    let penalty_s: f64 = done.iter().map(|(_, d)| d.as_secs_f64()).sum();
    let penalty_in_window_s: f64 = done
        .iter()
        .filter(|(t, _)| *t < window_end)
        .map(|(t, d)| {
            let end = (*t + *d).min(window_end);
            end.saturating_duration_since(*t).as_secs_f64()
        })
        .sum();
    Ok(DestReport {
        precopy_pages,
        pushed_pages,
        faults: done.len() as u64,
        zero_faults: zero_faults.load(Ordering::Relaxed),
        penalty_s,
        penalty_in_window_s,
        max_stall_s: done
            .iter()
            .map(|(_, d)| d.as_secs_f64())
            .fold(0.0, f64::max),
        device_state_bytes,
        uptime_s: complete.saturating_duration_since(resumed).as_secs_f64(),
        integrity,
        times: Some(DestTimes {
            freeze_received,
            resumed,
            complete,
        }),
    })
}

type Worker = std::thread::JoinHandle<Result<(), EngineError>>;

fn start_fault_threads(
    fault: Connection,
    installer: Arc<dyn PageInstaller>,
    states: Arc<PageStates>,
    stalls: Arc<Stalls>,
    stop: Arc<AtomicBool>,
    zero_faults: Arc<std::sync::atomic::AtomicU64>,
    ps: usize,
) -> Result<(Worker, Worker), EngineError> {
    let Connection { session, tx, rx } = fault;
    let dec = session.decoder();
    let requester = {
        let (installer, states, stalls, stop) = (
            installer.clone(),
            states.clone(),
            stalls.clone(),
            stop.clone(),
        );
        std::thread::Builder::new()
            .name("wanmig-faults".into())
            .spawn(move || {
                request_faults(
                    tx,
                    installer.as_ref(),
                    &states,
                    &stalls,
                    &stop,
                    &zero_faults,
                )
            })
            .map_err(|_| EngineError::Panicked("fault requester"))?
    };
    let answers = std::thread::Builder::new()
        .name("wanmig-answers".into())
        .spawn(move || receive_answers(rx, dec, installer.as_ref(), &states, &stalls, ps))
        .map_err(|_| EngineError::Panicked("fault answers"))?;
    Ok((requester, answers))
}

fn request_faults(
    mut tx: UnitSender,
    installer: &dyn PageInstaller,
    states: &PageStates,
    stalls: &Stalls,
    stop: &AtomicBool,
    zero_faults: &std::sync::atomic::AtomicU64,
) -> Result<(), EngineError> {
    let mut faults = Vec::new();
    while !stop.load(Ordering::Acquire) {
        faults.clear();
        installer.wait_faults(Duration::from_millis(20), &mut faults)?;
        let now = Instant::now();
        let mut asked = false;
        for &p in &faults {
            match states.get(p) {
                PageState::Present => installer.wake(p)?,
                PageState::Zero => {
                    installer.install_zero(p)?;
                    if states.transition(p, PageState::Zero, PageState::Present) {
                        zero_faults.fetch_add(1, Ordering::Relaxed);
                    }
                }
                PageState::Requested => {}
                PageState::Absent => {
                    if states.transition(p, PageState::Absent, PageState::Requested) {
                        stalls.started(p, now);
                        tx.send_request(UnitKind::Page, p, 1)
                            .map_err(EngineError::send("fault"))?;
                        asked = true;
                    } else if states.get(p) == PageState::Present {
                        installer.wake(p)?;
                    }
                }
            }
        }
        if asked {
            tx.flush().map_err(EngineError::send("fault"))?;
        }
    }
    tx.send_goodbye().map_err(EngineError::send("fault"))?;
    tx.flush().map_err(EngineError::send("fault"))?;
    Ok(())
}

fn receive_answers(
    mut rx: FrameReceiver,
    dec: FrameDecoder,
    installer: &dyn PageInstaller,
    states: &PageStates,
    stalls: &Stalls,
    ps: usize,
) -> Result<(), EngineError> {
    let mut page = vec![0u8; ps];
    rx.run(&dec, |f| -> Result<Flow, EngineError> {
        match f {
            FrameRef::Unit {
                kind: UnitKind::Page,
                index,
                payload,
            } => {
                payload.unpack_into(&mut page)?;
                if states.get(index) != PageState::Present {
                    install_into(installer, states, stalls, index, &page)?;
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
