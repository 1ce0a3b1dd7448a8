//! Reading a domain's frames through a bounded set of foreign-mapped
//! windows, and finding which frames are populated.
//!
//! Mapping a frame costs a hypercall and a page-table update in dom0, so
//! frames are mapped a window at a time ([`WINDOW`] consecutive pfns, one
//! `xenforeignmemory_map` each) and a few windows stay mapped while reads
//! walk through them ([`MAX_WINDOWS`]: at most 16 MiB of the guest is ever
//! mapped here). A mapping shows the frame that backed a pfn when it was
//! made; the source drops every window at each round boundary, so a pfn the
//! guest gave back and got again (dirtied by that) is read afresh.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use super::{ForeignMapping, Hypervisor, XEN_PAGE_SIZE, XenError};
use crate::backend::{BackendError, PageReader};

/// Pfns per mapped window.
pub(crate) const WINDOW: u64 = 256;
/// Windows kept mapped at most.
pub(crate) const MAX_WINDOWS: usize = 16;
/// Pfns per page-frame-type query.
const TYPE_BATCH: usize = 1024;

/// One mapped window: the pfns of `first .. first + WINDOW` that were
/// populated when it was mapped (all of them if that was not known).
#[derive(Debug)]
struct Window {
    first: u64,
    /// Frame of the mapping for each pfn of the window (`NOT_MAPPED`: not
    /// asked for, a hole when the window was mapped).
    slot: Vec<u32>,
    /// `None` when no pfn of the window was populated (Xen refuses to map
    /// nothing).
    mapping: Option<ForeignMapping>,
}

const NOT_MAPPED: u32 = u32::MAX;

/// Reads frames of one domain; shared by the threads that send pages.
#[derive(Debug)]
pub(crate) struct FrameReader {
    hv: Arc<dyn Hypervisor>,
    domid: u32,
    pages: u64,
    /// Most recently used first.
    windows: Mutex<VecDeque<Window>>,
    /// Pfns populated at the last physmap scan: windows map only those (as
    /// libxenguest maps only frames with data), never holes or Xen's own
    /// pages in the physmap.
    populated: Mutex<Option<Arc<crate::uffd::DirtyBitmap>>>,
}

impl FrameReader {
    pub(crate) fn new(hv: Arc<dyn Hypervisor>, domid: u32, pages: u64) -> Self {
        FrameReader {
            hv,
            domid,
            pages,
            windows: Mutex::new(VecDeque::new()),
            populated: Mutex::new(None),
        }
    }

    /// Unmaps every window: the next reads map the frames afresh.
    pub(crate) fn invalidate(&self) {
        self.lock().clear();
    }

    /// The pfns populated now (a physmap scan): windows mapped from here on
    /// map only those.
    pub(crate) fn set_populated(&self, populated: crate::uffd::DirtyBitmap) {
        *self
            .populated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Arc::new(populated));
        self.invalidate();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Window>> {
        // A panic while holding the lock left at worst a window mapped.
        self.windows
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn map_window(&self, first: u64) -> Result<Window, XenError> {
        let n = WINDOW.min(self.pages - first);
        let populated = self
            .populated
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut slot = vec![NOT_MAPPED; n as usize];
        let mut pfns = Vec::with_capacity(n as usize);
        for (i, pfn) in (first..first + n).enumerate() {
            if populated.as_ref().is_none_or(|p| p.get(pfn)) {
                slot[i] = pfns.len() as u32;
                pfns.push(pfn);
            }
        }
        let mapping = if pfns.is_empty() {
            None
        } else {
            Some(self.hv.map(self.domid, &pfns, false)?)
        };
        Ok(Window {
            first,
            slot,
            mapping,
        })
    }

    /// Copies frame `pfn` into `out`. `Ok(false)`: the domain has no frame
    /// there now (a hole, or given back since it was found populated); `out`
    /// is zero then.
    pub(crate) fn read(&self, pfn: u64, out: &mut [u8]) -> Result<bool, XenError> {
        assert_eq!(out.len(), XEN_PAGE_SIZE);
        if pfn >= self.pages {
            return Err(XenError::Call {
                op: "reading a frame",
                domid: self.domid,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("pfn {pfn:#x} beyond the domain's {} pfns", self.pages),
                ),
            });
        }
        let first = pfn - pfn % WINDOW;
        let mut windows = self.lock();
        let at = match windows.iter().position(|w| w.first == first) {
            Some(i) => i,
            None => {
                let w = self.map_window(first)?;
                if windows.len() >= MAX_WINDOWS {
                    windows.pop_back();
                }
                windows.push_front(w);
                0
            }
        };
        let w = &windows[at];
        let slot = w.slot[(pfn - first) as usize];
        if slot != NOT_MAPPED
            && let Some(m) = &w.mapping
            && m.read(slot as usize, out)
        {
            if at != 0 {
                let w = windows.remove(at).expect("index found above");
                windows.push_front(w);
            }
            return Ok(true);
        }
        // Not in the window (a hole when it was mapped: the guest may have
        // populated it since), or it did not map: look again, alone.
        drop(windows);
        let single = self.hv.map(self.domid, &[pfn], false)?;
        if single.read(0, out) {
            return Ok(true);
        }
        // Zeros only for a pfn that really has no frame now (given back:
        // the freeze's scan announces it as a hole); a frame that is there
        // but will not map must never go out as zeros.
        let mut present = Vec::with_capacity(1);
        self.hv.populated(self.domid, &[pfn], &mut present)?;
        if present.first() == Some(&false) {
            out.fill(0);
            return Ok(false);
        }
        Err(XenError::Call {
            op: "mapping a populated frame",
            domid: self.domid,
            source: std::io::Error::from_raw_os_error(single.frame_err(0).unsigned_abs() as i32),
        })
    }
}

impl PageReader for FrameReader {
    fn copy_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        // A frame the guest gave back reads as zero: the freeze's populated
        // scan announces it as a hole, so the destination drops it too.
        self.read(index, out)
            .map(drop)
            .map_err(|e| BackendError::new("xen", "reading a guest frame", e))
    }
}

/// The runs `(first, count)` of populated pfns among `0..pages`.
pub(crate) fn populated_runs(
    hv: &dyn Hypervisor,
    domid: u32,
    pages: u64,
) -> Result<Vec<(u64, u64)>, XenError> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut pfns = Vec::with_capacity(TYPE_BATCH);
    let mut present = Vec::with_capacity(TYPE_BATCH);
    let mut first = 0u64;
    while first < pages {
        let n = (pages - first).min(TYPE_BATCH as u64);
        pfns.clear();
        pfns.extend(first..first + n);
        present.clear();
        hv.populated(domid, &pfns, &mut present)?;
        if present.len() != pfns.len() {
            return Err(XenError::Call {
                op: "querying page frame types",
                domid,
                source: std::io::Error::other(format!(
                    "{} answers for {} pfns",
                    present.len(),
                    pfns.len()
                )),
            });
        }
        for (&pfn, &yes) in pfns.iter().zip(&present) {
            if !yes {
                continue;
            }
            match runs.last_mut() {
                Some((f, c)) if *f + *c == pfn => *c += 1,
                _ => runs.push((pfn, 1)),
            }
        }
        first += n;
    }
    Ok(runs)
}
