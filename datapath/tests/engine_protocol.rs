//! The two engines' protocol and failure handling, over real TCP connections
//! on loopback, against in-memory backends: a fake source guest (its pages,
//! which pages it ever populated, what it dirtied) and a fake destination
//! whose "vCPUs" block on a missing page the way QEMU's do on the
//! userfaultfd (a fault event, then a wait until the page is installed; a
//! wake without it faults again; once the memory is released a hole reads as
//! zero). A proxy can cut the bulk connection at a chosen moment; a scripted
//! source sends hand-made frames to test the destination's checks.
//!
//! Each test fails without the fix it is named after: the commit handshake
//! (`Loaded`), the destination's exits after the commit (release first,
//! fetch what a broken push left, stop the guest if pages are missing), dead
//! fault threads noticed at once, faults on pages discarded since, pages
//! discarded at the source after they were sent, pushed pages installed as
//! they arrive, and the protocol checks.
//!
//! With disks (real image files: the source's behind its export log, the
//! destination's post-copy image): memory and disks move under one plan
//! (M, S), chunks rewritten during pre-copy are resent, and after the resume
//! the destination guest's reads fetch while its whole-block writes do not,
//! and win over the push. The images are compared byte for byte.

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use wanmig_datapath::backend::{
    BackendError, DestBackend, Install, PageInstaller, PageReader, SourceBackend,
};
use wanmig_datapath::connection::{Connection, ConnectionPair, LinkConfig, accept, connect};
use wanmig_datapath::engine::plan_channel::{Phase, Telemetry};
use wanmig_datapath::engine::{
    DestConfig, DestReport, EngineError, NewPlan, PageOrder, PlanChannel, SourceConfig,
    SourceReport, run_destination, run_source, run_source_adaptive,
};
use wanmig_datapath::nbd::{Access, BlockDevice, FileImage, RequestLog};
use wanmig_datapath::storage::{
    ChunkLog, ChunkRequests, DestDisks, DiskFetcher, PostcopyImage, SourceDisks,
};
use wanmig_datapath::transport::{Flow, IoPreference};
use wanmig_datapath::uffd::DirtyBitmap;
use wanmig_datapath::wire::{
    AbortReason, Compression, ControlCode, FrameRef, Geometry, MigrationId, PskKey, ServerPolicy,
    UnitKind, encode_buffer_len, encode_unit,
};

const PS: usize = 4096;
/// Pages of the fake guests (4 MiB).
const PAGES: u64 = 1024;
/// Pages `0..POPULATED` hold data at the source; the rest were never touched.
const POPULATED: u64 = 768;
/// A populated page that holds only zeros.
const ZERO_PAGE: u64 = 100;
const DEVICE_STATE_MAX: u64 = 4 << 20;

fn geometry(pages: u64) -> Geometry {
    Geometry::new(PS as u32, pages, 64 << 10, 1, DEVICE_STATE_MAX)
}

fn byte_of(p: u64) -> u8 {
    if p == ZERO_PAGE {
        0
    } else {
        (p % 250) as u8 + 1
    }
}

// ---------------------------------------------------------------- source --

type Hook = Arc<dyn Fn(u64) + Send + Sync>;

/// The source guest.
struct SrcGuest {
    mem: RwLock<Vec<u8>>,
    populated: Mutex<Vec<bool>>,
    dirty: Mutex<BTreeSet<u64>>,
    paused: AtomicBool,
    /// Called on every page read while the guest is paused (the remainder,
    /// faults, the push, digests).
    on_frozen_read: Mutex<Option<Hook>>,
}

impl SrcGuest {
    fn new() -> Arc<Self> {
        let g = SrcGuest {
            mem: RwLock::new(vec![0; PAGES as usize * PS]),
            populated: Mutex::new(vec![false; PAGES as usize]),
            dirty: Mutex::new(BTreeSet::new()),
            paused: AtomicBool::new(false),
            on_frozen_read: Mutex::new(None),
        };
        for p in 0..POPULATED {
            g.write(p, byte_of(p));
        }
        Arc::new(g)
    }

    fn write(&self, p: u64, byte: u8) {
        let at = p as usize * PS;
        self.mem.write().unwrap()[at..at + PS].fill(byte);
        self.populated.lock().unwrap()[p as usize] = true;
        self.dirty.lock().unwrap().insert(p);
    }

    /// The page is discarded (a balloon, a `MADV_REMOVE`): a hole again.
    fn discard(&self, p: u64) {
        let at = p as usize * PS;
        self.mem.write().unwrap()[at..at + PS].fill(0);
        self.populated.lock().unwrap()[p as usize] = false;
    }

    fn page(&self, p: u64) -> Vec<u8> {
        let at = p as usize * PS;
        self.mem.read().unwrap()[at..at + PS].to_vec()
    }

    fn on_frozen_read(&self, hook: impl Fn(u64) + Send + Sync + 'static) {
        *self.on_frozen_read.lock().unwrap() = Some(Arc::new(hook));
    }
}

struct SrcReader(Arc<SrcGuest>);

impl PageReader for SrcReader {
    fn copy_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        if self.0.paused.load(Ordering::Acquire) {
            // Called outside the lock: threads reading pages do not wait
            // for each other's hooks.
            let hook = self.0.on_frozen_read.lock().unwrap().clone();
            if let Some(hook) = hook {
                hook(index);
            }
        }
        out.copy_from_slice(&self.0.page(index));
        Ok(())
    }
}

type PauseHook = Box<dyn FnMut(&SrcGuest) + Send>;

struct FakeSource {
    g: Arc<SrcGuest>,
    device_state: Vec<u8>,
    /// Called as the guest is paused.
    on_pause: Option<PauseHook>,
    resumes: u64,
    /// `pause` stops the guest, then reports a failure.
    pause_fails: bool,
    /// `resume` fails.
    resume_fails: bool,
    /// The guest's disks.
    disks: Option<Arc<SourceDisks>>,
}

impl FakeSource {
    fn new() -> Self {
        FakeSource {
            g: SrcGuest::new(),
            device_state: (0..300_000u32).map(|i| (i % 253) as u8).collect(),
            on_pause: None,
            resumes: 0,
            pause_fails: false,
            resume_fails: false,
            disks: None,
        }
    }
}

impl SourceBackend for FakeSource {
    fn page_size(&self) -> usize {
        PS
    }
    fn page_count(&self) -> u64 {
        PAGES
    }
    fn device_state_max(&self) -> u64 {
        DEVICE_STATE_MAX
    }
    fn memory(&self) -> Arc<dyn PageReader> {
        Arc::new(SrcReader(self.g.clone()))
    }
    fn populated_runs(&self) -> Result<Vec<(u64, u64)>, BackendError> {
        let populated = self.g.populated.lock().unwrap();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (p, _) in populated.iter().enumerate().filter(|(_, x)| **x) {
            let p = p as u64;
            match runs.last_mut() {
                Some((first, n)) if *first + *n == p => *n += 1,
                _ => runs.push((p, 1)),
            }
        }
        Ok(runs)
    }
    fn dirty_log_start(&mut self) -> Result<(), BackendError> {
        self.g.dirty.lock().unwrap().clear();
        Ok(())
    }
    fn dirty_log_collect(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError> {
        for p in std::mem::take(&mut *self.g.dirty.lock().unwrap()) {
            out.set(p);
        }
        Ok(())
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.g.paused.store(true, Ordering::Release);
        if let Some(hook) = self.on_pause.as_mut() {
            hook(&self.g);
        }
        if self.pause_fails {
            return Err(BackendError::new("fake", "stop", "no reply"));
        }
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        if self.resume_fails {
            return Err(BackendError::new("fake", "cont", "refused"));
        }
        self.g.paused.store(false, Ordering::Release);
        self.resumes += 1;
        Ok(())
    }
    fn disks(&self) -> Option<Arc<SourceDisks>> {
        self.disks.clone()
    }
    fn save_device_state(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError> {
        for piece in self.device_state.chunks(1 << 20) {
            sink(piece)?;
        }
        Ok(self.device_state.len() as u64)
    }
}

// ----------------------------------------------------------- destination --

#[derive(Debug)]
struct DstMem {
    data: Vec<u8>,
    filled: Vec<bool>,
    installed_at: Vec<Option<Instant>>,
    wakes: u64,
    released: bool,
    resumed_at: Option<Instant>,
    stopped_again: bool,
    zero_writes: u64,
    discards: u64,
}

/// The destination guest's memory, as QEMU's mapping would behave.
#[derive(Debug)]
struct DstGuest {
    st: Mutex<DstMem>,
    cv: Condvar,
    faults: Mutex<VecDeque<u64>>,
    fault_cv: Condvar,
    fail_requester: AtomicBool,
}

impl DstGuest {
    fn new(pages: u64) -> Arc<Self> {
        Arc::new(DstGuest {
            st: Mutex::new(DstMem {
                data: vec![0; pages as usize * PS],
                filled: vec![false; pages as usize],
                installed_at: vec![None; pages as usize],
                wakes: 0,
                released: false,
                resumed_at: None,
                stopped_again: false,
                zero_writes: 0,
                discards: 0,
            }),
            cv: Condvar::new(),
            faults: Mutex::new(VecDeque::new()),
            fault_cv: Condvar::new(),
            fail_requester: AtomicBool::new(false),
        })
    }

    /// A vCPU (or QEMU) reads page `p`: a missing page faults and blocks
    /// until it is installed (a wake without it faults again) or the memory
    /// is released (a hole then reads as zero). `None` after `timeout`.
    fn touch(&self, p: u64, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut m = self.st.lock().unwrap();
        loop {
            let at = p as usize * PS;
            if m.filled[p as usize] {
                return Some(m.data[at..at + PS].to_vec());
            }
            if m.released {
                m.filled[p as usize] = true;
                return Some(vec![0; PS]);
            }
            self.faults.lock().unwrap().push_back(p);
            self.fault_cv.notify_all();
            let wakes = m.wakes;
            while !m.filled[p as usize] && !m.released && m.wakes == wakes {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return None;
                }
                m = self.cv.wait_timeout(m, left).unwrap().0;
            }
        }
    }

    /// The guest gives page `p` back (a balloon): a hole again.
    fn discard(&self, p: u64) {
        let mut m = self.st.lock().unwrap();
        m.filled[p as usize] = false;
        let at = p as usize * PS;
        m.data[at..at + PS].fill(0);
    }

    fn page(&self, p: u64) -> Vec<u8> {
        let at = p as usize * PS;
        self.st.lock().unwrap().data[at..at + PS].to_vec()
    }

    fn install(&self, p: u64, data: &[u8]) -> Install {
        let mut m = self.st.lock().unwrap();
        m.wakes += 1;
        self.cv.notify_all();
        if m.filled[p as usize] {
            return Install::AlreadyPresent;
        }
        let at = p as usize * PS;
        m.data[at..at + PS].copy_from_slice(data);
        m.filled[p as usize] = true;
        m.installed_at[p as usize] = Some(Instant::now());
        Install::Installed
    }
}

#[derive(Debug)]
struct DstInstaller(Arc<DstGuest>);

impl PageInstaller for DstInstaller {
    fn wait_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), BackendError> {
        if self.0.fail_requester.load(Ordering::Acquire) {
            return Err(BackendError::new(
                "fake",
                "waiting for faults",
                "injected failure",
            ));
        }
        let mut q = self.0.faults.lock().unwrap();
        if q.is_empty() {
            q = self.0.fault_cv.wait_timeout(q, timeout).unwrap().0;
        }
        if self.0.fail_requester.load(Ordering::Acquire) {
            return Err(BackendError::new(
                "fake",
                "waiting for faults",
                "injected failure",
            ));
        }
        out.extend(q.drain(..));
        Ok(())
    }
    fn install(&self, index: u64, data: &[u8]) -> Result<Install, BackendError> {
        Ok(self.0.install(index, data))
    }
    fn install_run(&self, first: u64, data: &[u8]) -> Result<u64, BackendError> {
        let mut n = 0;
        for (i, page) in data.chunks(PS).enumerate() {
            if self.0.install(first + i as u64, page) == Install::Installed {
                n += 1;
            }
        }
        Ok(n)
    }
    fn install_zero(&self, index: u64) -> Result<Install, BackendError> {
        Ok(self.0.install(index, &[0; PS]))
    }
    fn wake(&self, _index: u64) -> Result<(), BackendError> {
        self.0.st.lock().unwrap().wakes += 1;
        self.0.cv.notify_all();
        Ok(())
    }
}

struct FakeDest {
    g: Arc<DstGuest>,
    installer: Arc<DstInstaller>,
    pages: u64,
    /// Pages QEMU reads while it loads the device state.
    load_touches: Vec<u64>,
    load_fails: bool,
    load_delay: Duration,
    loaded: Option<Vec<u8>>,
    /// The fault requester's next wait fails once the guest is resumed.
    fail_requester_on_resume: bool,
    /// The guest's disks.
    disks: Option<Arc<DestDisks>>,
}

impl FakeDest {
    fn new() -> Self {
        Self::with_pages(PAGES)
    }

    fn with_pages(pages: u64) -> Self {
        let g = DstGuest::new(pages);
        FakeDest {
            installer: Arc::new(DstInstaller(g.clone())),
            g,
            pages,
            load_touches: Vec::new(),
            load_fails: false,
            load_delay: Duration::ZERO,
            loaded: None,
            fail_requester_on_resume: false,
            disks: None,
        }
    }
}

impl DestBackend for FakeDest {
    fn disks(&self) -> Option<Arc<DestDisks>> {
        self.disks.clone()
    }
    fn page_size(&self) -> usize {
        PS
    }
    fn page_count(&self) -> u64 {
        self.pages
    }
    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), BackendError> {
        let mut m = self.g.st.lock().unwrap();
        let at = index as usize * PS;
        m.data[at..at + PS].copy_from_slice(data);
        m.filled[index as usize] = true;
        if data.iter().all(|&b| b == 0) {
            m.zero_writes += 1;
        }
        Ok(())
    }
    fn discard_page(&mut self, index: u64) -> Result<(), BackendError> {
        self.g.discard(index);
        self.g.st.lock().unwrap().discards += 1;
        Ok(())
    }
    fn installer(&self) -> Arc<dyn PageInstaller> {
        self.installer.clone()
    }
    fn track_writes(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), BackendError> {
        std::thread::sleep(self.load_delay);
        for &p in &self.load_touches {
            self.g
                .touch(p, Duration::from_secs(10))
                .ok_or_else(|| BackendError::new("fake", "loading", "a page never came"))?;
        }
        if self.load_fails {
            return Err(BackendError::new(
                "fake",
                "loading the device state",
                "refused",
            ));
        }
        self.loaded = Some(state.to_vec());
        Ok(())
    }
    fn resume(&mut self) -> Result<(), BackendError> {
        self.g.st.lock().unwrap().resumed_at = Some(Instant::now());
        if self.fail_requester_on_resume {
            self.g.fail_requester.store(true, Ordering::Release);
            self.g.fault_cv.notify_all();
        }
        Ok(())
    }
    fn pause(&mut self) -> Result<(), BackendError> {
        self.g.st.lock().unwrap().stopped_again = true;
        Ok(())
    }
    fn written_pages(&mut self, _out: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(())
    }
    fn read_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        out.copy_from_slice(&self.g.page(index));
        Ok(())
    }
    fn release(&mut self) -> Result<(), BackendError> {
        self.g.st.lock().unwrap().released = true;
        self.g.cv.notify_all();
        Ok(())
    }
}

// ----------------------------------------------------------- connections --

fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

/// Both ends of a migration's connections, the source connecting to
/// `connect_to` (the destination's listener, or a proxy in front of it).
fn link_through(
    l: TcpListener,
    connect_to: SocketAddr,
    pages: u64,
    cfg: LinkConfig,
) -> (ConnectionPair, ConnectionPair) {
    link_geometry(l, connect_to, geometry(pages), cfg)
}

fn link_geometry(
    l: TcpListener,
    connect_to: SocketAddr,
    geometry: Geometry,
    cfg: LinkConfig,
) -> (ConnectionPair, ConnectionPair) {
    let key = PskKey::generate();
    let k2 = key.clone();
    let server =
        std::thread::spawn(move || accept(&l, &ServerPolicy::default(), &k2, &cfg).unwrap());
    let src = connect(connect_to, MigrationId::random(), geometry, &key, &cfg).unwrap();
    (src, server.join().unwrap())
}

fn link(cfg: LinkConfig) -> (ConnectionPair, ConnectionPair) {
    let (l, a) = listener();
    link_through(l, a, PAGES, cfg)
}

/// Copies bytes until EOF, or until `cut` is set: then shuts down all four
/// sockets of the proxied connection.
fn pump(mut from: TcpStream, mut to: TcpStream, cut: Option<Arc<AtomicBool>>) {
    from.set_read_timeout(Some(Duration::from_millis(5)))
        .unwrap();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if cut.as_ref().is_some_and(|c| c.load(Ordering::Acquire)) {
            let _ = from.shutdown(Shutdown::Both);
            let _ = to.shutdown(Shutdown::Both);
            return;
        }
        match from.read(&mut buf) {
            Ok(0) => {
                let _ = to.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A migration's connections through a proxy that cuts the bulk connection
/// (the first one the source opens) when the returned flag is set.
fn link_with_cuttable_bulk(cfg: LinkConfig) -> (ConnectionPair, ConnectionPair, Arc<AtomicBool>) {
    let (dst_l, dst_a) = listener();
    let (proxy_l, proxy_a) = listener();
    let cut = Arc::new(AtomicBool::new(false));
    let c2 = cut.clone();
    std::thread::spawn(move || {
        for i in 0..2 {
            let (down, _) = proxy_l.accept().unwrap();
            let up = TcpStream::connect(dst_a).unwrap();
            let flag = (i == 0).then(|| c2.clone());
            let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            let f2 = flag.clone();
            std::thread::spawn(move || pump(down, up, flag));
            std::thread::spawn(move || pump(u2, d2, f2));
        }
    });
    let (src, dst) = link_through(dst_l, proxy_a, PAGES, cfg);
    (src, dst, cut)
}

type Outcome = (
    Result<SourceReport, EngineError>,
    Result<DestReport, EngineError>,
    Instant,
);

/// Runs both engines, the destination in a thread; also returns when the
/// destination engine returned.
fn migrate(
    src: &mut FakeSource,
    dst: &mut FakeDest,
    m: f64,
    scfg: &SourceConfig,
    dcfg: &DestConfig,
    conns: (ConnectionPair, ConnectionPair),
) -> Outcome {
    let order = PageOrder::by_address(PAGES, m).unwrap();
    let (sconns, dconns) = conns;
    std::thread::scope(|s| {
        let d = s.spawn(|| {
            let r = run_destination(dst, dconns, dcfg);
            (r, Instant::now())
        });
        let r = run_source(src, sconns, &order, scfg);
        let (d, at) = d.join().unwrap();
        (r, d, at)
    })
}

/// The destination's memory equals the source's.
fn assert_same(src: &SrcGuest, dst: &DstGuest) {
    let differing: Vec<u64> = (0..PAGES).filter(|&p| src.page(p) != dst.page(p)).collect();
    assert!(
        differing.is_empty(),
        "{} pages differ: {:?}",
        differing.len(),
        &differing[..differing.len().min(10)]
    );
}

fn quick_dest() -> DestConfig {
    DestConfig {
        completion_timeout: Duration::from_secs(20),
        ..DestConfig::default()
    }
}

// ----------------------------------------------------------------- tests --

#[test]
fn a_whole_migration_and_faults_while_loading_are_no_penalty() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    // QEMU reads a pre-copied page, a post-copy page (fetched) and a hole
    // while it loads the device state: none of that is the guest's stall.
    dst.load_touches = vec![10, 600, 900];
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.5,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(dst.loaded.as_deref(), Some(&src.device_state[..]));
    let i = d.integrity.unwrap();
    assert_eq!(i.pages_differing, 0, "{d:#?}");
    assert_eq!(i.pages_compared, PAGES);
    // The never-populated pages are compared, but counted apart: only the
    // populated ones (the zero page 100 among them) show data arrived.
    assert_eq!(i.holes, PAGES - POPULATED, "{i:?}");
    assert_eq!(i.populated_compared(), POPULATED);
    assert_eq!(d.faults, 0, "faults while loading are not penalty: {d:#?}");
    assert_eq!(d.penalty_s, 0.0);
    assert!(d.late_error.is_none(), "{d:#?}");
    assert!(s.fault_pages_served >= 1, "QEMU's load fetched page 600");
    assert_eq!(src.resumes, 0);
    assert!(dst.g.st.lock().unwrap().released);
    assert_same(&src.g, &dst.g);
}

#[test]
fn a_failed_device_state_load_leaves_the_guest_running_at_the_source() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    dst.load_fails = true;
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.5,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    assert!(
        matches!(
            s,
            Err(EngineError::Aborted {
                peer: "destination",
                reason: AbortReason::DestinationFailed
            })
        ),
        "{s:?}"
    );
    assert!(matches!(d, Err(EngineError::Backend(_))), "{d:?}");
    assert_eq!(src.resumes, 1, "the source resumes the guest");
    assert!(!src.g.paused.load(Ordering::Acquire));
    let m = dst.g.st.lock().unwrap();
    assert!(m.resumed_at.is_none(), "the destination never ran it");
    assert!(!m.released);
}

#[test]
fn the_source_gives_up_when_the_destination_does_not_load_in_time() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    dst.load_delay = Duration::from_secs(2);
    let scfg = SourceConfig {
        freeze_timeout: Duration::from_millis(300),
        ..SourceConfig::default()
    };
    let t = Instant::now();
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        1.0,
        &scfg,
        &quick_dest(),
        link(LinkConfig::default()),
    );
    assert!(matches!(s, Err(EngineError::Timeout(_))), "{s:?}");
    assert!(
        matches!(
            d,
            Err(EngineError::Aborted {
                peer: "source",
                reason: AbortReason::Timeout
            })
        ),
        "{d:?}"
    );
    assert_eq!(src.resumes, 1);
    assert!(dst.g.st.lock().unwrap().resumed_at.is_none());
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_stop_that_fails_is_followed_by_a_resume() {
    let mut src = FakeSource::new();
    src.pause_fails = true;
    let mut dst = FakeDest::new();
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.5,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    assert!(matches!(s, Err(EngineError::Backend(_))), "{s:?}");
    assert!(
        matches!(
            d,
            Err(EngineError::Aborted {
                peer: "source",
                reason: AbortReason::SourceFailed
            })
        ),
        "the destination is told: {d:?}"
    );
    assert_eq!(src.resumes, 1, "the guest may be stopped: resume it");
    assert!(!src.g.paused.load(Ordering::Acquire));
}

#[test]
fn a_failed_resume_is_reported_with_the_failure_that_needed_it() {
    let mut src = FakeSource::new();
    src.resume_fails = true;
    let mut dst = FakeDest::new();
    dst.load_fails = true;
    let (s, _, _) = migrate(
        &mut src,
        &mut dst,
        0.5,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    let e = s.unwrap_err();
    let EngineError::NotResumed { cause, resume } = &e else {
        panic!("expected both errors: {e:?}");
    };
    assert!(matches!(**cause, EngineError::Aborted { .. }), "{cause:?}");
    assert!(resume.to_string().contains("fake backend: cont"));
    assert!(e.to_string().contains("refused"), "{e}");
}

#[test]
fn after_the_commit_a_broken_bulk_connection_costs_nothing_when_every_page_is_here() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    let (sc, dc, cut) = link_with_cuttable_bulk(LinkConfig::default());
    // M = 1: every page is here at the commit; cut as the digests are read.
    src.g.on_frozen_read(move |_| {
        // Hold the digests back until the proxy has seen the cut.
        if !cut.swap(true, Ordering::AcqRel) {
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        1.0,
        &SourceConfig::default(),
        &quick_dest(),
        (sc, dc),
    );
    assert!(s.is_err(), "the source saw the bulk connection break");
    let d = d.unwrap();
    assert!(d.integrity.is_none(), "no digests, no integrity check");
    assert!(d.late_error.is_some(), "{d:#?}");
    let m = dst.g.st.lock().unwrap();
    assert!(m.resumed_at.is_some() && m.released && !m.stopped_again);
    drop(m);
    assert_same(&src.g, &dst.g);
}

#[test]
fn after_the_commit_missing_pages_are_fetched_over_the_fault_connection() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    let (sc, dc, cut) = link_with_cuttable_bulk(LinkConfig::default());
    // M = 0: the push carries everything; cut it a quarter of the way in.
    src.g.on_frozen_read(move |p| {
        if p == 200 {
            cut.store(true, Ordering::Release);
        }
    });
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.0,
        &SourceConfig::default(),
        &quick_dest(),
        (sc, dc),
    );
    assert!(s.is_err(), "the source saw the bulk connection break");
    let d = d.unwrap();
    assert!(d.swept_pages > 0, "{d:#?}");
    assert!(d.late_error.is_some());
    assert!(dst.g.st.lock().unwrap().released);
    assert_same(&src.g, &dst.g);
}

#[test]
fn a_dead_fault_requester_still_releases_a_complete_guest() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    dst.fail_requester_on_resume = true;
    // Every page is here at the commit (M = 1); the digests take a while, so
    // the requester dies before the stream ends.
    src.g
        .on_frozen_read(|_| std::thread::sleep(Duration::from_millis(1)));
    let (_, d, _) = migrate(
        &mut src,
        &mut dst,
        1.0,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    let e = d.unwrap_err();
    assert!(
        e.to_string().contains("fake backend"),
        "the requester's own error: {e}"
    );
    // Every page is here: the memory is released, so a vCPU touching a
    // page known to be zero (never populated) gets it without the engine.
    assert!(dst.g.st.lock().unwrap().released);
    assert_eq!(
        dst.g.touch(900, Duration::from_secs(2)),
        Some(vec![0; PS]),
        "a vCPU waits forever on a zero page"
    );
}

#[test]
fn a_dead_fault_requester_mid_push_stops_the_guest_at_once() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    dst.fail_requester_on_resume = true;
    // The push takes several seconds.
    src.g
        .on_frozen_read(|_| std::thread::sleep(Duration::from_millis(4)));
    let (_, d, gave_up) = migrate(
        &mut src,
        &mut dst,
        0.0,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    let e = d.unwrap_err();
    let EngineError::Incomplete { missing, cause } = &e else {
        panic!("expected an incomplete migration: {e}");
    };
    assert!(*missing > 0);
    assert!(
        cause
            .as_ref()
            .is_some_and(|c| c.to_string().contains("fake backend")),
        "{e:?}"
    );
    let m = dst.g.st.lock().unwrap();
    assert!(m.stopped_again, "the guest is stopped: pages are missing");
    assert!(!m.released, "missing pages must not read as zeros");
    let resumed = m.resumed_at.unwrap();
    assert!(
        gave_up.duration_since(resumed) < Duration::from_secs(1),
        "noticed after {:?}",
        gave_up.duration_since(resumed)
    );
}

#[test]
fn a_fault_on_a_page_here_but_discarded_since_reads_as_zero() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    // A slow push keeps the engine serving faults for a while.
    src.g.on_frozen_read(|p| {
        if p >= 512 {
            std::thread::sleep(Duration::from_millis(6));
        }
    });
    let g = dst.g.clone();
    let (s, d, touched) = std::thread::scope(|sc| {
        let probe = sc.spawn(move || {
            while g.st.lock().unwrap().resumed_at.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            // Page 10 was pre-copied; the guest gives it back, then reads it.
            g.discard(10);
            g.touch(10, Duration::from_millis(500))
        });
        let (s, d, _) = migrate(
            &mut src,
            &mut dst,
            0.5,
            &SourceConfig::default(),
            &quick_dest(),
            link(LinkConfig::default()),
        );
        (s, d, probe.join().unwrap())
    });
    s.unwrap();
    d.unwrap();
    assert_eq!(
        touched,
        Some(vec![0; PS]),
        "a vCPU faulting on a page known here must get it (as zero) at once"
    );
}

#[test]
fn pages_discarded_at_the_source_after_they_were_sent_are_zero_at_the_destination() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    // Page 5 (pre-copy) and page 700 (post-copy, sent while live with M = 1
    // too) are given back by the guest just before the freeze.
    src.on_pause = Some(Box::new(|g: &SrcGuest| {
        g.discard(5);
        g.discard(700);
    }));
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        1.0,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    s.unwrap();
    let d = d.unwrap();
    assert_eq!(dst.g.page(5), vec![0; PS], "page 5 stayed stale");
    assert_eq!(dst.g.page(700), vec![0; PS], "page 700 stayed stale");
    assert_eq!(d.integrity.unwrap().pages_differing, 0);
    assert_same(&src.g, &dst.g);
}

#[test]
fn pushed_pages_are_installed_as_they_arrive() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    // The push stalls for a while right after page 300.
    src.g.on_frozen_read(|p| {
        if p == 301 {
            std::thread::sleep(Duration::from_millis(600));
        }
    });
    // Unpaced blocking sends: page 300 leaves the source at once.
    let mut cfg = LinkConfig::default().with_io(IoPreference::Blocking);
    cfg.bulk.pacing = None;
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.0,
        &SourceConfig::default(),
        &quick_dest(),
        link(cfg),
    );
    s.unwrap();
    d.unwrap();
    let m = dst.g.st.lock().unwrap();
    let (a, b) = (m.installed_at[300].unwrap(), m.installed_at[301].unwrap());
    assert!(
        b.duration_since(a) > Duration::from_millis(400),
        "page 300 waited {:?} in a batch for page 301",
        b.duration_since(a)
    );
}

/// Runs a migration with `M = 0` whose push stalls for 1.5 s at its first
/// page, while a guest thread at the destination reads `touches` in order
/// once the guest runs there. Returns the two reports.
fn faults_while_the_push_stalls(touches: Vec<u64>) -> (SourceReport, DestReport) {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    src.g.on_frozen_read(|p| {
        if p == 0 {
            std::thread::sleep(Duration::from_millis(1500));
        }
    });
    let g = dst.g.clone();
    let guest = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while g.st.lock().unwrap().resumed_at.is_none() {
            assert!(Instant::now() < deadline, "never resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        for p in touches {
            g.touch(p, Duration::from_secs(10)).expect("the page came");
        }
    });
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.0,
        &SourceConfig::default(),
        &quick_dest(),
        link(LinkConfig::default()),
    );
    guest.join().unwrap();
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(d.integrity.unwrap().pages_differing, 0, "{d:#?}");
    assert_same(&src.g, &dst.g);
    (s, d)
}

#[test]
fn a_sequential_run_of_faults_is_read_ahead_on_the_fault_connection() {
    // 120 pages in a row while the push is stuck at page 0: after the
    // first two faults the source sends windows ahead, and requests for
    // pages on their way get no second copy.
    let (s, d) = faults_while_the_push_stalls((400..520).collect());
    assert!(
        s.fault_pages_served < 20,
        "{} pages answered one by one, {} read ahead",
        s.fault_pages_served,
        s.fault_readahead_pages
    );
    assert!(
        s.fault_pages_served + s.fault_readahead_pages >= 120,
        "the pages came over the fault connection: {s:#?}"
    );
    assert!(d.faults <= 120);
}

#[test]
fn scattered_faults_are_answered_alone() {
    let touches = vec![700, 13, 450, 222, 610, 90, 333, 505, 41, 760];
    let (s, d) = faults_while_the_push_stalls(touches);
    assert_eq!(s.fault_readahead_pages, 0, "{s:#?}");
    assert_eq!(s.fault_readahead_hits, 0);
    assert_eq!(s.fault_pages_served, 10, "{s:#?} {d:#?}");
    assert_eq!(d.faults, 10);
}

// ------------------------------------------------------ scripted source --

/// A source written by hand, frame by frame.
struct Script {
    bulk: Connection,
    fault: Option<std::thread::JoinHandle<()>>,
}

impl Script {
    /// Connects to a destination running `dst` with `pages` in the session.
    fn start(pages: u64) -> (Script, ConnectionPair) {
        let (l, a) = listener();
        let (src, dst) = link_through(l, a, pages, LinkConfig::default());
        let ConnectionPair { bulk, mut fault } = src;
        // The fault side answers the destination's goodbye.
        let fault = std::thread::spawn(move || {
            let dec = fault.session.decoder();
            let Connection { tx, rx, .. } = &mut fault;
            let _ = rx.run(&dec, |f| -> Result<Flow, ()> {
                if let FrameRef::Goodbye = f {
                    let _ = tx.send_goodbye();
                    let _ = tx.flush();
                    return Ok(Flow::Stop);
                }
                Ok(Flow::Continue)
            });
        });
        (
            Script {
                bulk,
                fault: Some(fault),
            },
            dst,
        )
    }

    fn control(&mut self, c: ControlCode) {
        self.bulk.tx.send_control(c).unwrap();
    }

    fn page(&mut self, p: u64, byte: u8) {
        self.bulk
            .tx
            .send_unit(UnitKind::Page, p, PS, |out| out.fill(byte))
            .unwrap();
    }

    /// Pre-copy of pages `0..4` (every other page zero), freeze, device
    /// state, waits for `Loaded`, commits.
    fn up_to_commit(&mut self, pages: u64) {
        self.control(ControlCode::RoundBegin { round: 0 });
        for p in 0..4 {
            self.page(p, p as u8 + 1);
        }
        self.control(ControlCode::ZeroPages {
            first: 4,
            count: pages - 4,
        });
        self.control(ControlCode::RoundEnd {
            round: 0,
            units_sent: 4,
        });
        self.control(ControlCode::Freeze);
        self.bulk
            .tx
            .send_unit(UnitKind::DeviceState, 0, 100, |out| out.fill(9))
            .unwrap();
        self.control(ControlCode::DeviceStateEnd { total_bytes: 100 });
        self.bulk.tx.flush().unwrap();
        assert_eq!(self.next(), Some(ControlCode::Loaded));
        self.control(ControlCode::PostcopyBegin);
        self.bulk.tx.flush().unwrap();
        assert_eq!(self.next(), Some(ControlCode::Resumed));
    }

    /// The next control frame from the destination (`None`: anything else,
    /// or the connection ended).
    fn next(&mut self) -> Option<ControlCode> {
        let dec = self.bulk.session.decoder();
        let mut got = None;
        let _ = self.bulk.rx.run(&dec, |f| -> Result<Flow, ()> {
            if let FrameRef::Control(c) = f {
                got = Some(c);
            }
            Ok(Flow::Stop)
        });
        got
    }

    fn digests(&mut self, pages: u64) {
        let crcs: Vec<u32> = (0..pages)
            .map(|p| {
                let byte = if p < 4 { p as u8 + 1 } else { 0 };
                crc32fast::hash(&[byte; PS])
            })
            .collect();
        self.bulk.tx.send_digest(UnitKind::Page, 0, &crcs).unwrap();
    }

    fn end(&mut self) {
        self.bulk.tx.send_goodbye().unwrap();
        self.bulk.tx.flush().unwrap();
        if let Some(f) = self.fault.take() {
            let _ = f.join();
        }
    }
}

/// Runs a destination for `pages` pages against `script`.
fn scripted(
    pages: u64,
    script: impl FnOnce(&mut Script) + Send,
) -> (Result<DestReport, EngineError>, FakeDest) {
    let (mut s, dconns) = Script::start(pages);
    let mut dst = FakeDest::with_pages(pages);
    let d = std::thread::scope(|sc| {
        let d = sc.spawn(|| run_destination(&mut dst, dconns, &quick_dest()));
        script(&mut s);
        d.join().unwrap()
    });
    drop(s);
    (d, dst)
}

fn protocol_error<T: std::fmt::Debug>(r: &Result<T, EngineError>, what: &str) {
    match r {
        Err(EngineError::Protocol(m)) if m.contains(what) => {}
        other => panic!("expected a protocol error about {what:?}: {other:?}"),
    }
}

#[test]
fn a_scripted_source_migrates_a_guest() {
    let (d, dst) = scripted(64, |s| {
        s.up_to_commit(64);
        s.control(ControlCode::Done { units_total: 5 });
        s.digests(64);
        s.end();
    });
    let d = d.unwrap();
    assert_eq!(d.integrity.unwrap().pages_differing, 0);
    assert_eq!(dst.g.page(3), vec![4; PS]);
}

#[test]
fn a_short_digest_set_is_an_error() {
    let (d, dst) = scripted(64, |s| {
        s.up_to_commit(64);
        s.control(ControlCode::Done { units_total: 5 });
        s.digests(63);
        s.end();
    });
    protocol_error(&d, "digests of 63 pages");
    assert!(
        dst.g.st.lock().unwrap().released,
        "the guest has every page"
    );
}

#[test]
fn a_page_pushed_after_the_commit_must_be_missing_and_pushed_once() {
    let (d, _) = scripted(64, |s| {
        s.up_to_commit(64);
        s.page(1, 7);
        s.bulk.tx.flush().unwrap();
    });
    protocol_error(&d, "page 1 pushed");
}

#[test]
fn round_counts_are_checked_and_the_source_is_told() {
    let (d, _) = scripted(64, |s| {
        s.control(ControlCode::RoundBegin { round: 0 });
        s.page(0, 1);
        s.control(ControlCode::RoundEnd {
            round: 0,
            units_sent: 2,
        });
        s.bulk.tx.flush().unwrap();
        assert_eq!(
            s.next(),
            Some(ControlCode::Abort {
                reason: AbortReason::DestinationFailed
            })
        );
    });
    protocol_error(&d, "round 0 ended with 2 pages");
}

#[test]
fn every_device_state_piece_must_arrive() {
    let total = (1 << 20) + 100;
    let (d, dst) = scripted(64, |s| {
        s.control(ControlCode::RoundBegin { round: 0 });
        s.control(ControlCode::RoundEnd {
            round: 0,
            units_sent: 0,
        });
        s.control(ControlCode::Freeze);
        // Piece 0 never comes.
        s.bulk
            .tx
            .send_unit(UnitKind::DeviceState, 1, 100, |out| out.fill(9))
            .unwrap();
        s.control(ControlCode::DeviceStateEnd { total_bytes: total });
        s.bulk.tx.flush().unwrap();
        assert!(matches!(s.next(), Some(ControlCode::Abort { .. })));
    });
    protocol_error(&d, "device-state piece 0");
    assert!(dst.loaded.is_none());
}

#[test]
fn the_unit_count_of_done_is_checked() {
    let (d, _) = scripted(64, |s| {
        s.up_to_commit(64);
        s.control(ControlCode::Done { units_total: 4 });
        s.bulk.tx.flush().unwrap();
    });
    protocol_error(&d, "the source sent 4 units, 5 arrived");
}

#[test]
fn zero_pages_after_the_device_state_are_refused() {
    let (d, _) = scripted(64, |s| {
        s.up_to_commit(64);
        s.control(ControlCode::ZeroPages { first: 0, count: 1 });
        s.bulk.tx.flush().unwrap();
    });
    protocol_error(&d, "ZeroPages");
}

#[test]
fn a_session_for_another_guest_shape_is_refused() {
    let (s, dconns) = Script::start(64);
    let mut dst = FakeDest::with_pages(128);
    let d = run_destination(&mut dst, dconns, &quick_dest());
    assert!(
        matches!(
            d,
            Err(EngineError::Geometry {
                what: "page count",
                session: 64,
                guest: 128
            })
        ),
        "{d:?}"
    );
    drop(s);
}

#[test]
fn an_all_zero_page_before_the_resume_becomes_a_hole_known_zero() {
    let (d, dst) = scripted(64, |s| {
        s.control(ControlCode::RoundBegin { round: 0 });
        s.page(0, 1);
        s.page(1, 2);
        s.control(ControlCode::RoundEnd {
            round: 0,
            units_sent: 2,
        });
        // Page 1 was zeroed by the guest: it comes again, all zero.
        s.control(ControlCode::RoundBegin { round: 1 });
        s.page(1, 0);
        s.control(ControlCode::RoundEnd {
            round: 1,
            units_sent: 1,
        });
        s.control(ControlCode::ZeroPages {
            first: 2,
            count: 62,
        });
        s.control(ControlCode::Freeze);
        s.bulk
            .tx
            .send_unit(UnitKind::DeviceState, 0, 100, |out| out.fill(9))
            .unwrap();
        s.control(ControlCode::DeviceStateEnd { total_bytes: 100 });
        s.bulk.tx.flush().unwrap();
        assert_eq!(s.next(), Some(ControlCode::Loaded));
        s.control(ControlCode::PostcopyBegin);
        s.bulk.tx.flush().unwrap();
        assert_eq!(s.next(), Some(ControlCode::Resumed));
        s.control(ControlCode::Done { units_total: 4 });
        s.end();
    });
    let d = d.unwrap();
    let m = dst.g.st.lock().unwrap();
    assert_eq!(m.zero_writes, 0, "zeros were written instead of a hole");
    assert_eq!(m.discards, 1, "the earlier copy of page 1 is discarded");
    drop(m);
    assert_eq!(dst.g.page(1), vec![0; PS]);
    assert_eq!(d.precopy_pages, 3);
}

// ----------------------------------------------------------------- disks --

const CHUNK: u64 = 64 << 10;
/// Disk size: 48 chunks and a short one.
const DISK: u64 = 48 * CHUNK + 12288;

/// A source disk image with its export log, and the destination's post-copy
/// image, in a scratch directory.
struct Disks {
    dir: std::path::PathBuf,
    src: Arc<FileImage>,
    log: Arc<ChunkLog>,
    dst: Arc<PostcopyImage>,
    requests: Arc<ChunkRequests>,
}

impl Disks {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("wanmig-ep-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let bytes: Vec<u8> = (0..DISK as usize)
            .map(|i| {
                if (i / CHUNK as usize) % 7 == 3 {
                    0
                } else {
                    (i / 4096 % 251) as u8 ^ (i as u8)
                }
            })
            .collect();
        std::fs::write(dir.join("src.raw"), &bytes).unwrap();
        let src = Arc::new(FileImage::open(&dir.join("src.raw"), false).unwrap());
        let requests = Arc::new(ChunkRequests::default());
        let dst = Arc::new(
            PostcopyImage::create(
                &dir.join("dst.raw"),
                &dir.join("dst.presence"),
                DISK,
                CHUNK,
                Arc::new(DiskFetcher::new(requests.clone(), 0)),
                Duration::from_secs(20),
            )
            .unwrap(),
        );
        Disks {
            dir,
            src,
            log: Arc::new(ChunkLog::new(DISK, CHUNK)),
            dst,
            requests,
        }
    }

    fn attach(&self, src: &mut FakeSource, dst: &mut FakeDest) {
        let device: Arc<dyn BlockDevice> = self.src.clone();
        src.disks = Some(Arc::new(SourceDisks::new(
            CHUNK,
            vec![device],
            vec![self.log.clone()],
        )));
        dst.disks = Some(Arc::new(DestDisks::new(
            vec![self.dst.clone()],
            self.requests.clone(),
        )));
    }

    /// The source guest writes `data` at `offset` (through its export).
    fn guest_write(&self, offset: u64, data: &[u8]) {
        self.src.write_at(offset, data, false).unwrap();
        self.log.record(Access::Write, offset, data.len() as u64);
    }

    fn chunks(&self) -> u64 {
        DISK.div_ceil(CHUNK)
    }
}

impl Drop for Disks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn disk_geometry(chunks: u64) -> Geometry {
    Geometry::new(PS as u32, PAGES, CHUNK as u32, chunks, DEVICE_STATE_MAX)
}

fn migrate_disks(src: &mut FakeSource, dst: &mut FakeDest, m: f64, s: f64, chunks: u64) -> Outcome {
    let order = PageOrder::by_address(PAGES, m)
        .unwrap()
        .with_chunks(PageOrder::by_address(chunks, s).unwrap());
    let (l, a) = listener();
    let (sconns, dconns) = link_geometry(l, a, disk_geometry(chunks), LinkConfig::default());
    std::thread::scope(|sc| {
        let d = sc.spawn(|| {
            let r = run_destination(dst, dconns, &quick_dest());
            (r, Instant::now())
        });
        let r = run_source(src, sconns, &order, &SourceConfig::default());
        let (d, at) = d.join().unwrap();
        (r, d, at)
    })
}

#[test]
fn disks_move_with_memory_under_s_and_rewritten_chunks_are_resent() {
    for s in [1.0, 0.0, 0.5] {
        let disks = Disks::new(&format!("s{}", (s * 10.0) as u32));
        let mut src = FakeSource::new();
        let mut dst = FakeDest::new();
        disks.attach(&mut src, &mut dst);
        // The guest rewrites chunks 2 and 40 (and part of the short last
        // one) while pre-copy runs: at the pause.
        let d2 = Arc::new(Mutex::new(Some((disks.src.clone(), disks.log.clone()))));
        src.on_pause = Some(Box::new(move |_| {
            if let Some((img, log)) = d2.lock().unwrap().take() {
                for (off, len) in [
                    (2 * CHUNK + 100, 5000u64),
                    (40 * CHUNK, CHUNK),
                    (48 * CHUNK, 12288),
                ] {
                    img.write_at(off, &vec![0xa5; len as usize], false).unwrap();
                    log.record(Access::Write, off, len);
                }
            }
        }));
        // And one write before the migration starts.
        disks.guest_write(7 * CHUNK, &[0x3c; 4096]);
        let (sr, dr, _) = migrate_disks(&mut src, &mut dst, 0.5, s, disks.chunks());
        let sr = sr.unwrap_or_else(|e| panic!("S = {s}: {e}"));
        let dr = dr.unwrap_or_else(|e| panic!("S = {s}: {e}"));
        let src_bytes = std::fs::read(disks.dir.join("src.raw")).unwrap();
        let dst_bytes = std::fs::read(disks.dir.join("dst.raw")).unwrap();
        assert!(
            src_bytes == dst_bytes,
            "S = {s}: the destination image differs"
        );
        let ss = sr.storage.unwrap();
        let ds = dr.storage.unwrap();
        assert_eq!(ss.chunks, 49);
        assert_eq!(ss.precopy_chunks, (49.0 * s).round() as u64, "S = {s}");
        assert_eq!(ds.chunks_compared, 49, "S = {s}: {ds:?}");
        assert_eq!(ds.chunks_differing, 0);
        if s == 1.0 {
            assert_eq!(ss.chunks_pushed + ss.chunks_skipped, 0);
            assert!(
                ss.remainder_chunks >= 3,
                "the rewritten chunks go at the freeze: {ss:?}"
            );
        }
        if s == 0.0 {
            assert_eq!(ss.precopy_sends + ss.remainder_chunks, 0, "{ss:?}");
            assert_eq!(ss.chunks_pushed + ss.chunks_skipped, 49);
        }
        assert_eq!(
            ds.counters.whole_block_overwrites, 0,
            "no guest writes here"
        );
    }
}

#[test]
fn after_the_resume_reads_fetch_whole_block_writes_do_not_and_the_guest_wins() {
    let disks = Disks::new("post");
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    disks.attach(&mut src, &mut dst);
    let img = disks.dst.clone();
    // Slow the push down (it reads frozen pages), so the destination guest
    // gets there first: it reads chunk 30, rewrites blocks of chunk 31
    // whole and part of a block in chunk 32.
    src.g
        .on_frozen_read(|_| std::thread::sleep(Duration::from_millis(2)));
    let guest = std::thread::spawn({
        let g = dst.g.clone();
        move || {
            while g.st.lock().unwrap().resumed_at.is_none() {
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut buf = vec![0u8; 8192];
            img.read_at(30 * CHUNK, &mut buf).unwrap();
            img.write_at(31 * CHUNK, &[0x77; 8192], false).unwrap();
            img.write_at(32 * CHUNK + 10, &[0x66; 100], false).unwrap();
            buf
        }
    });
    let (sr, dr, _) = migrate_disks(&mut src, &mut dst, 0.5, 0.0, disks.chunks());
    let sr = sr.unwrap();
    let dr = dr.unwrap();
    let read = guest.join().unwrap();
    // Every chunk crossed once, pushed or fetched, and the storage bytes
    // count both connections: at least the frames of the chunks with data.
    let ss = sr.storage.unwrap();
    assert!(ss.fault_chunks_served >= 2, "{ss:?}");
    assert_eq!(ss.chunks_pushed + ss.chunks_skipped, 49, "{ss:?}");
    let frames: u64 = std::fs::read(disks.dir.join("src.raw"))
        .unwrap()
        .chunks(CHUNK as usize)
        .enumerate()
        .map(|(i, c)| {
            let mut out = vec![0; encode_buffer_len(c.len(), Compression::Lz4)];
            encode_unit(&mut out, UnitKind::Chunk, i as u64, c, Compression::Lz4)
                .unwrap()
                .len as u64
        })
        .sum();
    assert!(
        ss.bytes_sent >= frames && ss.bytes_sent < sr.bytes_sent,
        "{} bytes of chunk frames, at least {frames} expected: {ss:?}",
        ss.bytes_sent
    );
    let src_bytes = std::fs::read(disks.dir.join("src.raw")).unwrap();
    let dst_bytes = std::fs::read(disks.dir.join("dst.raw")).unwrap();
    let c = |i: u64| (i * CHUNK) as usize;
    assert!(
        read == src_bytes[c(30)..c(30) + 8192],
        "the read saw the source's bytes"
    );
    for (i, (&a, &b)) in dst_bytes.iter().zip(&src_bytes).enumerate() {
        let want = if (c(31)..c(31) + 8192).contains(&i) {
            0x77
        } else if (c(32) + 10..c(32) + 110).contains(&i) {
            0x66
        } else {
            b
        };
        assert_eq!(a, want, "byte {i}");
    }
    let ds = dr.storage.unwrap();
    assert_eq!(ds.counters.whole_block_overwrites, 2, "{ds:?}");
    assert!(
        ds.counters.chunks_fetched >= 2,
        "chunks 30 and 32 fetched: {ds:?}"
    );
    assert_eq!(ds.counters.partial_block_merges, 1, "{ds:?}");
    assert_eq!(
        ds.chunks_compared,
        49 - 2,
        "the two written chunks are not compared"
    );
    assert_eq!(ds.chunks_differing, 0);
}

/// A planner that publishes a newer plan once the engine asks after round
/// 0, and records the telemetry it is sent. `at_switch` runs as the newer
/// plan is handed over (the guest writing meanwhile).
struct ScriptedPlanner {
    newer: Option<NewPlan>,
    at_switch: Option<Box<dyn FnOnce() + Send>>,
    seen: Arc<Mutex<Vec<Telemetry>>>,
}

impl PlanChannel for ScriptedPlanner {
    fn publish(&mut self, t: &Telemetry) {
        self.seen.lock().unwrap().push(*t);
    }
    fn newer_plan(&mut self) -> Option<NewPlan> {
        if let Some(f) = self.at_switch.take() {
            f();
        }
        self.newer.take()
    }
}

#[test]
fn a_newer_plan_applies_at_a_round_boundary_and_loses_no_page() {
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    // Planned: the low quarter by address. Newer: the high half, hottest
    // (highest address) first; it also holds never-populated pages.
    let planned = PageOrder::by_address(PAGES, 0.25).unwrap();
    let newer = PageOrder::new((0..PAGES).rev().collect(), 0.5).unwrap();
    let g = src.g.clone();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut planner = ScriptedPlanner {
        newer: Some(NewPlan {
            generation: 7,
            order: newer,
        }),
        // Sent in round 0 and now only in the old set: written again, it
        // must be sent again (or the destination keeps the stale copy); a
        // page of the newer set and a post-copy page written too.
        at_switch: Some(Box::new(move || {
            g.write(3, 0xa1);
            g.write(PAGES - 2, 0xa2);
            g.write(400, 0xa3);
        })),
        seen: seen.clone(),
    };
    let (sconns, dconns) = link(LinkConfig::default());
    let dcfg = quick_dest();
    let (s, d) = std::thread::scope(|sc| {
        let d = sc.spawn(|| run_destination(&mut dst, dconns, &dcfg));
        let s = run_source_adaptive(
            &mut src,
            sconns,
            &planned,
            &SourceConfig::default(),
            &mut planner,
        );
        (s, d.join().unwrap())
    });
    let (s, d) = (s.unwrap(), d.unwrap());
    assert_eq!(s.plans_applied.len(), 1, "{:?}", s.plans_applied);
    let a = s.plans_applied[0];
    assert_eq!((a.round, a.generation, a.m), (1, 7, 0.5));
    assert_eq!(a.pages_added, PAGES / 2, "the high half was all post-copy");
    // The set went on covering the old members: 1/4 + 1/2 of the pages.
    assert_eq!(s.precopy_pages, PAGES / 4 + PAGES / 2);
    assert_eq!(d.integrity.unwrap().pages_differing, 0, "{d:#?}");
    assert_same(&src.g, &dst.g);
    // Telemetry: the phases in order, and the round that applied
    // generation 7 says so.
    let seen = seen.lock().unwrap();
    let phases: Vec<Phase> = seen.iter().map(|t| t.phase).fold(Vec::new(), |mut v, p| {
        if v.last() != Some(&p) {
            v.push(p);
        }
        v
    });
    assert_eq!(
        phases,
        vec![Phase::Precopy, Phase::Freeze, Phase::Postcopy, Phase::Done]
    );
    let r0 = seen
        .iter()
        .find(|t| t.phase == Phase::Precopy && t.round == 1 && t.last_round == 0)
        .expect("round 0 reported");
    assert_eq!(r0.plan_generation, 0);
    assert!(r0.bytes_sent > 0 && r0.last_round_duration_ns > 0, "{r0:?}");
    assert_eq!(r0.pages_sent, PAGES / 4, "{r0:?}");
    let frozen = seen.iter().find(|t| t.phase == Phase::Freeze).unwrap();
    assert_eq!(frozen.plan_generation, 7, "{frozen:?}");
}

// ------------------------------------------------------------- penalty --

/// Copies bytes from `from` to `to`, each `delay` after it arrived (a
/// one-way latency), until EOF.
fn delayed_pump(mut from: TcpStream, mut to: TcpStream, delay: Duration) {
    let (tx, rx) = std::sync::mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.send((Instant::now(), buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
    while let Ok((at, bytes)) = rx.recv() {
        std::thread::sleep((at + delay).saturating_duration_since(Instant::now()));
        if to.write_all(&bytes).is_err() {
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A migration's connections through a proxy that delays what the source
/// sends on the fault connection (the second one it opens) by `delay`.
fn link_with_slow_fault_answers(
    geometry: Geometry,
    delay: Duration,
) -> (ConnectionPair, ConnectionPair) {
    let (dst_l, dst_a) = listener();
    let (proxy_l, proxy_a) = listener();
    std::thread::spawn(move || {
        for i in 0..2 {
            let (down, _) = proxy_l.accept().unwrap();
            let up = TcpStream::connect(dst_a).unwrap();
            let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            if i == 1 {
                std::thread::spawn(move || delayed_pump(down, up, delay));
            } else {
                std::thread::spawn(move || pump(down, up, None));
            }
            std::thread::spawn(move || pump(u2, d2, None));
        }
    });
    link_geometry(dst_l, proxy_a, geometry, LinkConfig::default())
}

#[test]
fn a_disk_read_waiting_for_a_chunk_is_part_of_the_penalty() {
    // The guest's disk is served over NBD as QEMU would reach it; after the
    // resume it reads an absent chunk, whose answer takes 300 ms (the
    // fault connection's latency); the push is slow and brings it later.
    // The guest touches no absent page: the whole penalty is that wait.
    let delay = Duration::from_millis(300);
    let disks = Disks::new("wait");
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    disks.attach(&mut src, &mut dst);
    let slow = Arc::new(AtomicBool::new(true));
    let s2 = slow.clone();
    src.g.on_frozen_read(move |_| {
        if s2.load(Ordering::Acquire) {
            std::thread::sleep(Duration::from_millis(4));
        }
    });
    let sock = disks.dir.join("nbd.sock");
    let server = wanmig_datapath::nbd::NbdServer::start(
        &sock,
        wanmig_datapath::nbd::Export {
            name: "disk0".into(),
            device: disks.dst.clone(),
            log: None,
        },
    )
    .unwrap();
    let g = dst.g.clone();
    let guest = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while g.st.lock().unwrap().resumed_at.is_none() {
            assert!(Instant::now() < deadline, "never resumed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        let o = std::process::Command::new("qemu-io")
            .args([
                "--image-opts",
                &format!(
                    "driver=raw,file.driver=nbd,file.server.type=unix,file.server.path={},file.export=disk0",
                    sock.display()
                ),
                "-c",
                &format!("read {} 4096", 30 * CHUNK),
            ])
            .output()
            .expect("qemu-io (run scripts/setup)");
        let took = t.elapsed();
        slow.store(false, Ordering::Release);
        assert!(o.status.success(), "{o:?}");
        took
    });
    let order = PageOrder::by_address(PAGES, 0.5)
        .unwrap()
        .with_chunks(PageOrder::by_address(disks.chunks(), 0.0).unwrap());
    let (sconns, dconns) = link_with_slow_fault_answers(disk_geometry(disks.chunks()), delay);
    let (sr, dr) = std::thread::scope(|sc| {
        let d = sc.spawn(|| run_destination(&mut dst, dconns, &quick_dest()));
        let s = run_source(&mut src, sconns, &order, &SourceConfig::default());
        (s, d.join().unwrap())
    });
    let took = guest.join().unwrap();
    drop(server);
    sr.unwrap();
    let d = dr.unwrap();
    let ds = d.storage.as_ref().unwrap();
    assert!(ds.counters.chunks_fetched >= 1, "{ds:?}");
    assert!(d.chunk_waits >= 1, "{d:#?}");
    assert!(
        d.chunk_stall_s >= delay.as_secs_f64() && d.chunk_stall_s <= took.as_secs_f64(),
        "the read waited {:.3} s for a {delay:?} answer (qemu-io ran {took:?}): {d:#?}",
        d.chunk_stall_s
    );
    assert_eq!((d.faults, d.faults_in_flight), (0, 0), "{d:#?}");
    assert_eq!(d.page_stall_s, 0.0);
    // P is that wait: none is left out.
    assert!(
        (d.penalty_s - d.chunk_stall_s).abs() < 1e-9 && d.penalty_s >= delay.as_secs_f64(),
        "P {} s, chunk waits {} s",
        d.penalty_s,
        d.chunk_stall_s
    );
    assert!((d.penalty_in_window_s - d.penalty_s).abs() < 1e-9);
    let binned: f64 = d.fault_timeline.stall_s.iter().sum();
    assert!(
        (binned - d.penalty_s).abs() < 1e-9,
        "{:?}",
        d.fault_timeline
    );
    // Intact, and checked.
    assert!(ds.chunks_checked && ds.chunks_differing == 0, "{ds:?}");
    let src_bytes = std::fs::read(disks.dir.join("src.raw")).unwrap();
    let dst_bytes = std::fs::read(disks.dir.join("dst.raw")).unwrap();
    assert!(src_bytes == dst_bytes, "the destination image differs");
}

#[test]
fn a_fault_on_a_page_already_requested_is_timed() {
    // M = 0; the bulk connection is cut a quarter of the way into the push,
    // so the destination requests every page still absent (the sweep). The
    // source's answer for page 700 takes 500 ms; a vCPU faults on it
    // meanwhile: the page is already requested, and its wait is P.
    let mut src = FakeSource::new();
    let mut dst = FakeDest::new();
    let (sc, dc, cut) = link_with_cuttable_bulk(LinkConfig::default());
    let answering = Arc::new(AtomicBool::new(false));
    let a2 = answering.clone();
    src.g.on_frozen_read(move |p| {
        if p == 200 {
            cut.store(true, Ordering::Release);
        }
        if p == 700 && std::thread::current().name() == Some("wanmig-fault-server") {
            a2.store(true, Ordering::Release);
            std::thread::sleep(Duration::from_millis(500));
        }
    });
    let g = dst.g.clone();
    let guest = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !answering.load(Ordering::Acquire) {
            assert!(Instant::now() < deadline, "page 700 was never requested");
            std::thread::sleep(Duration::from_millis(1));
        }
        let t = Instant::now();
        g.touch(700, Duration::from_secs(10))
            .expect("page 700 came");
        t.elapsed()
    });
    let (s, d, _) = migrate(
        &mut src,
        &mut dst,
        0.0,
        &SourceConfig::default(),
        &quick_dest(),
        (sc, dc),
    );
    let waited = guest.join().unwrap().as_secs_f64();
    assert!(s.is_err(), "the source saw the bulk connection break");
    let d = d.unwrap();
    assert!(d.swept_pages > 0, "{d:#?}");
    assert_eq!(d.faults, 0, "the sweep requested page 700, not the fault");
    assert!(d.faults_in_flight >= 1, "{d:#?}");
    assert!(
        d.penalty_s >= 0.3 && d.penalty_s <= waited + 0.05,
        "the vCPU waited {waited:.3} s, P is {:.3} s: {d:#?}",
        d.penalty_s
    );
    assert!((d.penalty_s - d.page_stall_s).abs() < 1e-9);
    assert_eq!((d.chunk_waits, d.chunk_stall_s), (0, 0.0));
    assert_same(&src.g, &dst.g);
}
