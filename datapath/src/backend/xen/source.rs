//! The Xen source: a domain migrated from inside `xc_domain_save()`.

use std::sync::Arc;

use super::frames::{FrameReader, populated_runs};
use super::{Hypervisor, LogDirty, XEN_PAGE_SIZE, XenError};
use crate::backend::{BackendError, PageReader, SourceBackend};
use crate::uffd::DirtyBitmap;

/// The toolstack's suspend: returns once the domain is suspended.
pub type SuspendFn<'a> = Box<dyn FnMut() -> Result<(), String> + Send + 'a>;

/// A live HVM or PVH domain on the source host.
///
/// The engine's pause is the toolstack's suspend callback (libxl asks the
/// guest to suspend itself and waits for it). The engine never resumes the
/// domain here: when a migration fails, `xc_domain_save()` fails and the
/// toolstack resumes the guest, as after any failed save
/// ([`resume`](SourceBackend::resume) only notes it). The CPU and device
/// state are libxenguest's records, written after the engine returns, so
/// the engine's device state is empty.
pub struct XenSource<'a> {
    hv: Arc<dyn Hypervisor>,
    domid: u32,
    pages: u64,
    reader: Arc<FrameReader>,
    suspend: SuspendFn<'a>,
    suspended: bool,
    log_dirty_on: bool,
    scratch: Vec<u64>,
    /// Populated frames found by the last physmap scan.
    last_populated: std::sync::atomic::AtomicU64,
    /// How long the last physmap scan took, ns.
    last_scan_ns: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for XenSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenSource")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .field("suspended", &self.suspended)
            .field("log_dirty_on", &self.log_dirty_on)
            .finish()
    }
}

fn be(op: &'static str) -> impl FnOnce(XenError) -> BackendError {
    move |e| BackendError::new("xen", op, e)
}

impl<'a> XenSource<'a> {
    /// The domain `domid` (checked: a live HVM/PVH guest), its pfns
    /// `0..=max_gpfn`, suspended by `suspend` when the engine freezes it.
    pub fn new(
        hv: Arc<dyn Hypervisor>,
        domid: u32,
        suspend: SuspendFn<'a>,
    ) -> Result<Self, XenError> {
        super::check_domain(hv.as_ref(), domid)?;
        let pages = hv.max_gpfn(domid)? + 1;
        Ok(XenSource {
            reader: Arc::new(FrameReader::new(hv.clone(), domid, pages)),
            hv,
            domid,
            pages,
            suspend,
            suspended: false,
            log_dirty_on: false,
            scratch: Vec::new(),
            last_populated: Default::default(),
            last_scan_ns: Default::default(),
        })
    }

    /// The domain.
    pub fn domid(&self) -> u32 {
        self.domid
    }

    /// Populated frames the last physmap scan found (at the freeze, once the
    /// engine froze the domain).
    pub fn last_populated(&self) -> u64 {
        self.last_populated
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How long the last physmap scan took (at the freeze, once the engine
    /// froze the domain), s.
    pub fn last_scan_seconds(&self) -> f64 {
        self.last_scan_ns.load(std::sync::atomic::Ordering::Relaxed) as f64 / 1e9
    }

    /// Whether the suspend callback ran and succeeded.
    pub fn suspended(&self) -> bool {
        self.suspended
    }

    /// Log-dirty on, as libxenguest does it: if Xen refuses (it may be on
    /// already, e.g. for video RAM tracking), off and on again.
    fn enable_log_dirty(&mut self) -> Result<(), XenError> {
        match self.hv.log_dirty(self.domid, LogDirty::Enable) {
            Ok(()) => {}
            Err(first) => {
                self.hv
                    .log_dirty(self.domid, LogDirty::Off)
                    .map_err(|_| first)?;
                self.hv.log_dirty(self.domid, LogDirty::Enable)?;
            }
        }
        self.log_dirty_on = true;
        Ok(())
    }
}

impl Drop for XenSource<'_> {
    fn drop(&mut self) {
        if self.log_dirty_on {
            // As xc_domain_save() does on every way out.
            let _ = self.hv.log_dirty(self.domid, LogDirty::Off);
        }
    }
}

impl SourceBackend for XenSource<'_> {
    fn page_size(&self) -> usize {
        XEN_PAGE_SIZE
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn device_state_max(&self) -> u64 {
        0
    }

    fn holes_read_as_zero(&self) -> bool {
        false
    }

    fn memory(&self) -> Arc<dyn PageReader> {
        self.reader.clone()
    }

    fn populated_runs(&self) -> Result<Vec<(u64, u64)>, BackendError> {
        let t = std::time::Instant::now();
        let runs = populated_runs(self.hv.as_ref(), self.domid, self.pages)
            .map_err(be("scanning the physmap for populated frames"))?;
        self.last_scan_ns.store(
            t.elapsed().as_nanos() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        self.last_populated.store(
            runs.iter().map(|r| r.1).sum(),
            std::sync::atomic::Ordering::Relaxed,
        );
        let mut set = crate::engine::source::page_bitmap(self.pages, XEN_PAGE_SIZE);
        for &(first, count) in &runs {
            set.set_range(first, count);
        }
        self.reader.set_populated(set);
        Ok(runs)
    }

    fn dirty_log_start(&mut self) -> Result<(), BackendError> {
        self.enable_log_dirty().map_err(be("enabling log-dirty"))?;
        self.reader.invalidate();
        Ok(())
    }

    fn dirty_log_collect(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError> {
        let words = self.pages.div_ceil(64) as usize;
        self.scratch.clear();
        self.scratch.resize(words, 0);
        self.hv
            .log_dirty_clean(self.domid, &mut self.scratch, self.pages, self.suspended)
            .map_err(be("collecting the dirty bitmap"))?;
        out.or_words(&self.scratch);
        // A round boundary: frames are mapped afresh from here on.
        self.reader.invalidate();
        Ok(())
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        if self.suspended {
            return Ok(());
        }
        (self.suspend)().map_err(|why| {
            BackendError::new(
                "xen",
                "suspending the domain (the toolstack's suspend callback)",
                why,
            )
        })?;
        self.suspended = true;
        Ok(())
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        // The toolstack resumes a domain whose save failed (libxl's
        // failed-suspend path); nothing to do here.
        Ok(())
    }

    fn save_device_state(
        &mut self,
        _sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError> {
        // libxenguest writes the CPU and device records after the engine.
        Ok(0)
    }
}
