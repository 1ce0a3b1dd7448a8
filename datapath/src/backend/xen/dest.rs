//! The Xen destination: a domain being restored by `xc_domain_restore()`,
//! filled by the engine before libxenguest reads the records after the
//! engine's hand-off.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::frames::FrameReader;
use super::{Hypervisor, XEN_PAGE_SIZE, XenError};
use crate::backend::{BackendError, DestBackend, Install, PageInstaller};
use crate::uffd::DirtyBitmap;

/// Pages written per batch (one populate and one mapping each).
const BATCH: usize = 256;

/// Pages waiting to be written, in arrival order; a page written twice
/// keeps its slot and its last contents.
#[derive(Debug, Default)]
struct WriteBatch {
    pfns: Vec<u64>,
    slot: HashMap<u64, usize>,
    data: Vec<u8>,
}

impl WriteBatch {
    fn push(&mut self, pfn: u64, page: Option<&[u8]>) {
        let i = *self.slot.entry(pfn).or_insert_with(|| {
            self.pfns.push(pfn);
            self.data.resize(self.pfns.len() * XEN_PAGE_SIZE, 0);
            self.pfns.len() - 1
        });
        let dst = &mut self.data[i * XEN_PAGE_SIZE..(i + 1) * XEN_PAGE_SIZE];
        match page {
            Some(p) => dst.copy_from_slice(p),
            None => dst.fill(0),
        }
    }

    fn len(&self) -> usize {
        self.pfns.len()
    }

    fn clear(&mut self) {
        self.pfns.clear();
        self.slot.clear();
        self.data.clear();
    }
}

/// A domain the toolstack created for an incoming migration.
///
/// Pages arrive before the domain ever runs; the engine neither loads
/// device state (libxenguest's records do, after the engine) nor unpauses
/// the domain (libxl does, once the whole stream is in): its
/// [`resume`](DestBackend::resume) hands the filled domain back. Post-copy
/// is not supported yet, so nothing may be missing by then.
pub struct XenDest {
    hv: Arc<dyn Hypervisor>,
    domid: u32,
    pages: u64,
    /// Pfns this engine populated (and did not take back).
    populated: DirtyBitmap,
    batch: WriteBatch,
    reader: FrameReader,
    installer: Arc<NoPostcopy>,
    pages_written: u64,
}

impl std::fmt::Debug for XenDest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XenDest")
            .field("domid", &self.domid)
            .field("pages", &self.pages)
            .field("populated", &self.populated.count())
            .field("pending", &self.batch.len())
            .finish()
    }
}

fn be(op: &'static str) -> impl FnOnce(XenError) -> BackendError {
    move |e| BackendError::new("xen", op, e)
}

impl XenDest {
    /// The new domain `domid` (checked: a live HVM/PVH domain), to receive
    /// `pages` pfns (the source's pfn space).
    pub fn new(hv: Arc<dyn Hypervisor>, domid: u32, pages: u64) -> Result<Self, XenError> {
        super::check_domain(hv.as_ref(), domid)?;
        Ok(XenDest {
            reader: FrameReader::new(hv.clone(), domid, pages),
            hv,
            domid,
            pages,
            populated: crate::engine::source::page_bitmap(pages, XEN_PAGE_SIZE),
            batch: WriteBatch::default(),
            installer: Arc::new(NoPostcopy),
            pages_written: 0,
        })
    }

    /// The pfns this engine populated, ascending.
    pub fn populated_pfns(&self) -> impl Iterator<Item = u64> + '_ {
        self.populated.iter_set()
    }

    /// How many pfns it populated.
    pub fn populated_count(&self) -> u64 {
        self.populated.count()
    }

    /// Pages written (rewrites included).
    pub fn pages_written(&self) -> u64 {
        self.pages_written
    }

    fn queue(&mut self, index: u64, page: Option<&[u8]>) -> Result<(), BackendError> {
        if index >= self.pages {
            return Err(BackendError::new(
                "xen",
                "writing a guest frame",
                format!("pfn {index:#x} beyond the {} pfns", self.pages),
            ));
        }
        self.batch.push(index, page);
        self.pages_written += 1;
        if self.batch.len() >= BATCH {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes the pending pages: populates the pfns that have no frame yet,
    /// maps the batch writable once, copies, unmaps.
    fn flush(&mut self) -> Result<(), BackendError> {
        if self.batch.len() == 0 {
            return Ok(());
        }
        let fresh: Vec<u64> = self
            .batch
            .pfns
            .iter()
            .copied()
            .filter(|&p| !self.populated.get(p))
            .collect();
        if !fresh.is_empty() {
            self.hv
                .populate(self.domid, &fresh)
                .map_err(be("populating guest frames"))?;
            for &p in &fresh {
                self.populated.set(p);
            }
        }
        let mut map = self
            .hv
            .map(self.domid, &self.batch.pfns, true)
            .map_err(be("mapping guest frames"))?;
        for (i, &pfn) in self.batch.pfns.iter().enumerate() {
            let data = &self.batch.data[i * XEN_PAGE_SIZE..(i + 1) * XEN_PAGE_SIZE];
            if !map.write(i, data) {
                return Err(BackendError::new(
                    "xen",
                    "writing a guest frame",
                    format!(
                        "pfn {pfn:#x} of domain {} could not be mapped (errno {})",
                        self.domid,
                        map.frame_err(i)
                    ),
                ));
            }
        }
        drop(map);
        self.batch.clear();
        Ok(())
    }
}

impl DestBackend for XenDest {
    fn page_size(&self) -> usize {
        XEN_PAGE_SIZE
    }

    fn page_count(&self) -> u64 {
        self.pages
    }

    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), BackendError> {
        self.queue(index, Some(data))
    }

    fn zero_page(&mut self, index: u64, _was_present: bool) -> Result<(), BackendError> {
        // The source has a frame there that holds zeros: so must we (a
        // pfn without a frame is not RAM to a Xen guest).
        self.queue(index, None)
    }

    fn discard_page(&mut self, index: u64) -> Result<(), BackendError> {
        // A pfn the source has no frame for (any more).
        self.flush()?;
        if self.populated.get(index) {
            self.hv
                .depopulate(self.domid, &[index])
                .map_err(be("giving back a guest frame"))?;
            self.populated.unset(index);
        }
        Ok(())
    }

    fn hole_page(&mut self, index: u64, _was_present: bool) -> Result<(), BackendError> {
        // `ZeroPages` from a Xen source names pfns it has no frame for
        // (with M = 1 there are no post-copy zero pages): none here either,
        // even where a zero page arrived before.
        self.discard_page(index)
    }

    fn is_hole(&self, index: u64) -> bool {
        self.batch.len() == 0 && !self.populated.get(index)
    }

    fn installer(&self) -> Arc<dyn PageInstaller> {
        self.installer.clone()
    }

    fn track_writes(&mut self) -> Result<(), BackendError> {
        // The domain does not run while the engine has it: every page is
        // final here. Reads (the integrity check) map only its frames.
        self.flush()?;
        self.reader.set_populated(self.populated.clone());
        Ok(())
    }

    fn load_device_state(&mut self, state: &[u8]) -> Result<(), BackendError> {
        if state.is_empty() {
            Ok(())
        } else {
            Err(BackendError::new(
                "xen",
                "loading device state",
                format!(
                    "{} bytes of device state: a Xen guest's travels in libxenguest's records",
                    state.len()
                ),
            ))
        }
    }

    fn resume(&mut self) -> Result<(), BackendError> {
        // The toolstack unpauses the domain once its stream is complete.
        self.flush()
    }

    fn pause(&mut self) -> Result<(), BackendError> {
        // It never ran.
        Ok(())
    }

    fn written_pages(&mut self, _out: &mut DirtyBitmap) -> Result<(), BackendError> {
        Ok(())
    }

    fn read_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError> {
        if self.batch.len() != 0 {
            return Err(BackendError::new(
                "xen",
                "reading a guest frame",
                "pages are still queued for writing",
            ));
        }
        if !self.populated.get(index) {
            out.fill(0);
            return Ok(());
        }
        self.reader
            .read(index, out)
            .map_err(be("reading a guest frame"))
            .and_then(|mapped| {
                if mapped {
                    Ok(())
                } else {
                    Err(BackendError::new(
                        "xen",
                        "reading a guest frame",
                        format!("pfn {index:#x} was populated but cannot be mapped"),
                    ))
                }
            })
    }

    fn release(&mut self) -> Result<(), BackendError> {
        self.flush()
    }
}

/// Post-copy is not supported for Xen guests yet: no page can be missing
/// once the domain is handed over, so no fault ever arrives.
#[derive(Debug)]
struct NoPostcopy;

const NO_POSTCOPY: &str =
    "post-copy of Xen guests is not supported yet (it needs mem_paging): plan M = 1";

impl PageInstaller for NoPostcopy {
    fn wait_faults(&self, timeout: Duration, _out: &mut Vec<u64>) -> Result<(), BackendError> {
        std::thread::sleep(timeout);
        Ok(())
    }

    fn install(&self, _index: u64, _data: &[u8]) -> Result<Install, BackendError> {
        Err(BackendError::new("xen", "installing a page", NO_POSTCOPY))
    }

    fn install_run(&self, _first: u64, _data: &[u8]) -> Result<u64, BackendError> {
        Err(BackendError::new("xen", "installing pages", NO_POSTCOPY))
    }

    fn install_zero(&self, _index: u64) -> Result<Install, BackendError> {
        Err(BackendError::new(
            "xen",
            "installing a zero page",
            NO_POSTCOPY,
        ))
    }

    fn wake(&self, _index: u64) -> Result<(), BackendError> {
        Ok(())
    }
}
