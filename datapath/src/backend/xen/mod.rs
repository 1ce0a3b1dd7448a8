//! Xen guests (HVM and PVH), migrated from dom0 inside the patched toolstack.
//!
//! Under Xen the toolstack owns the migration stream: `xl migrate` forks
//! `libxl-save-helper`, whose `xc_domain_save()` writes the domain's records.
//! With the patches in `xen-patches/`, libxenguest hands the memory part to
//! the engine (through the C ABI of `ffi/capi`), which moves it over its own
//! bulk and fault connections with the same rounds, wire and transport as a
//! QEMU guest's; libxenguest then writes the CPU and device records as it
//! always has, and the toolstack (not the engine) unpauses the domain at the
//! destination.
//!
//! - [`XenSource`]: guest frames read through foreign mappings, a bounded
//!   set of windows mapped once each and dropped at every round boundary
//!   (never the whole guest at once); the dirty log from Xen's log-dirty
//!   mode (`XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`, then `CLEAN` bitmaps, the
//!   last one `LOGDIRTY_FINAL` once the domain is suspended); the pause is
//!   the toolstack's suspend callback; only populated frames cost anything
//!   (a page-frame-type scan of the physmap tells which).
//! - [`XenDest`]: pages populated (`XENMEM_populate_physmap`) and written
//!   through foreign mappings in batches, a zero page populated like any
//!   other (a hole in a Xen guest's physmap is not a zero page: it is no
//!   RAM at all), a hole the source announces left unpopulated; the frames
//!   it populated are reported to libxenguest, whose restore goes on with
//!   the records after the engine's.
//!
//! Everything that touches the hypervisor goes through [`Hypervisor`]: the
//! real one ([`LibXen`], behind the `xen` cargo feature) binds libxenctrl and
//! libxenforeignmemory of the one Xen version the patches target through a
//! small C shim compiled against that tree's headers (`xen417.c`: the
//! libraries' sonames and some structures change with every release).
//!
//! Post-copy of Xen guests (the `mem_paging` ring) is not here yet: a plan
//! must pre-copy all of memory (`M` = 1) and no disks (`S` = 0).

mod dest;
mod frames;
mod save;
#[cfg(test)]
mod sim;
mod source;
#[cfg(feature = "xen")]
mod sys;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;

pub use dest::XenDest;
pub use save::{
    RestoreOptions, RestoreReport, SaveOptions, SaveReport, XenMigrationError, XenRestore, XenSave,
};
pub use source::XenSource;
#[cfg(feature = "xen")]
pub use sys::LibXen;

/// Bytes per Xen guest frame (x86).
pub const XEN_PAGE_SIZE: usize = 4096;

/// A hypervisor call failed.
#[derive(Debug, thiserror::Error)]
pub enum XenError {
    /// The control interfaces could not be opened (not a Xen dom0, no
    /// privcmd, not root).
    #[error("cannot open the Xen control interfaces ({what}): {source}")]
    Open {
        /// Which interface.
        what: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// No such domain.
    #[error("domain {domid} does not exist")]
    NoDomain {
        /// The domain asked for.
        domid: u32,
    },
    /// A call on a domain failed.
    #[error("{op} for domain {domid}: {source}")]
    Call {
        /// What was being done.
        op: &'static str,
        /// The domain.
        domid: u32,
        /// The errno Xen or the kernel reported.
        #[source]
        source: std::io::Error,
    },
    /// The domain is of a kind or in a state the engine cannot migrate.
    #[error("domain {domid}: {why}")]
    Unsupported {
        /// The domain.
        domid: u32,
        /// Why.
        why: String,
    },
    /// This build has no Xen support.
    #[error("wanmig was built without Xen support (cargo feature `xen`)")]
    NotBuilt,
}

impl XenError {
    /// A failed call, with the errno of the moment.
    pub fn last_os(op: &'static str, domid: u32) -> Self {
        XenError::Call {
            op,
            domid,
            source: std::io::Error::last_os_error(),
        }
    }
}

impl From<XenError> for crate::backend::BackendError {
    fn from(e: XenError) -> Self {
        crate::backend::BackendError::new("xen", "hypervisor call", e)
    }
}

/// What the engine needs to know of a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DomainInfo {
    /// The domain.
    pub domid: u32,
    /// HVM or PVH (a translated guest); false for PV.
    pub hvm: bool,
    /// Being destroyed.
    pub dying: bool,
    /// Shut down (for a suspend: `shutdown_reason` 2).
    pub shutdown: bool,
    /// The reason code when `shutdown`.
    pub shutdown_reason: u32,
    /// Paused by the toolstack.
    pub paused: bool,
    /// Frames the domain holds.
    pub tot_pages: u64,
    /// Frames it may hold.
    pub max_pages: u64,
}

/// Log-dirty mode on or off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogDirty {
    /// `XEN_DOMCTL_SHADOW_OP_ENABLE_LOGDIRTY`.
    Enable,
    /// `XEN_DOMCTL_SHADOW_OP_OFF`.
    Off,
}

/// Frames of a domain mapped into this process, unmapped on drop.
///
/// Frame `i` of the mapping is the `i`-th pfn asked for; a frame whose
/// mapping failed (a hole, a frame paged out) must never be touched: its
/// page is not mapped and reading it would fault. [`frame_ok`](Self::frame_ok)
/// says which.
pub struct ForeignMapping {
    base: std::ptr::NonNull<u8>,
    frames: usize,
    errs: Vec<i32>,
    unmap: Option<Box<dyn FnOnce(*mut u8, usize) + Send + Sync>>,
}

// SAFETY: the mapping is plain shared memory owned by this value until it
// is dropped; every access goes through raw-pointer copies (no references
// to the guest's bytes are created), so it may be used from any thread.
unsafe impl Send for ForeignMapping {}
// SAFETY: as above; `&self` methods only read the pointer and the errors.
unsafe impl Sync for ForeignMapping {}

impl fmt::Debug for ForeignMapping {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ForeignMapping")
            .field("base", &self.base)
            .field("frames", &self.frames)
            .field("failed", &self.errs.iter().filter(|&&e| e != 0).count())
            .finish()
    }
}

impl ForeignMapping {
    /// A mapping of `frames` frames at `base` with per-frame errors `errs`,
    /// undone by `unmap(base, frames)`.
    ///
    /// # Safety
    /// `base` must point to `frames * XEN_PAGE_SIZE` bytes mapped for this
    /// value alone until `unmap` runs, readable (and writable, if the caller
    /// writes) at every frame whose error is 0.
    pub unsafe fn new(
        base: std::ptr::NonNull<u8>,
        frames: usize,
        errs: Vec<i32>,
        unmap: Box<dyn FnOnce(*mut u8, usize) + Send + Sync>,
    ) -> Self {
        assert_eq!(errs.len(), frames);
        ForeignMapping {
            base,
            frames,
            errs,
            unmap: Some(unmap),
        }
    }

    /// Frames in the mapping.
    pub fn frames(&self) -> usize {
        self.frames
    }

    /// Whether frame `i` is mapped.
    pub fn frame_ok(&self, i: usize) -> bool {
        self.errs.get(i) == Some(&0)
    }

    /// The error of frame `i` (0: mapped).
    pub fn frame_err(&self, i: usize) -> i32 {
        self.errs.get(i).copied().unwrap_or(libc::EINVAL)
    }

    /// Copies frame `i` into `out` (`XEN_PAGE_SIZE` bytes); false if it is
    /// not mapped (`out` untouched).
    pub fn read(&self, i: usize, out: &mut [u8]) -> bool {
        assert_eq!(out.len(), XEN_PAGE_SIZE);
        if !self.frame_ok(i) {
            return false;
        }
        // SAFETY: frame `i` is within the mapping and mapped (its error is
        // 0). The guest may write it concurrently: a racy byte copy through
        // raw pointers gives a mix of old and new bytes, which the dirty log
        // resends; u8 has no invalid values and no reference is made.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(i * XEN_PAGE_SIZE),
                out.as_mut_ptr(),
                XEN_PAGE_SIZE,
            );
        }
        true
    }

    /// Copies `data` (`XEN_PAGE_SIZE` bytes) into frame `i`; false if it is
    /// not mapped. The caller mapped the frames writable.
    pub fn write(&mut self, i: usize, data: &[u8]) -> bool {
        assert_eq!(data.len(), XEN_PAGE_SIZE);
        if !self.frame_ok(i) {
            return false;
        }
        // SAFETY: frame `i` is within the mapping and mapped; the caller
        // asked for a writable mapping (`Hypervisor::map` with `write`).
        // The destination domain does not run while the engine fills it.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(i * XEN_PAGE_SIZE),
                XEN_PAGE_SIZE,
            );
        }
        true
    }
}

impl Drop for ForeignMapping {
    fn drop(&mut self) {
        if let Some(unmap) = self.unmap.take() {
            unmap(self.base.as_ptr(), self.frames);
        }
    }
}

/// The hypervisor calls the Xen backends make. The real one is [`LibXen`]
/// (cargo feature `xen`); tests use a simulated one.
pub trait Hypervisor: Send + Sync + fmt::Debug {
    /// What the domain is and how it is doing.
    fn domain_info(&self, domid: u32) -> Result<DomainInfo, XenError>;
    /// The highest pfn the domain's physmap has ever had.
    fn max_gpfn(&self, domid: u32) -> Result<u64, XenError>;
    /// Turns log-dirty mode on or off.
    fn log_dirty(&self, domid: u32, mode: LogDirty) -> Result<(), XenError>;
    /// Copies the dirty bitmap of pfns `0..pages` into `bitmap` (bit `p % 64`
    /// of word `p / 64`) and clears it in Xen. `last`: the final clean of a
    /// suspended domain (`XEN_DOMCTL_SHADOW_LOGDIRTY_FINAL`).
    fn log_dirty_clean(
        &self,
        domid: u32,
        bitmap: &mut [u64],
        pages: u64,
        last: bool,
    ) -> Result<(), XenError>;
    /// For each of `pfns`, whether the domain has RAM there (appended to `out`).
    fn populated(&self, domid: u32, pfns: &[u64], out: &mut Vec<bool>) -> Result<(), XenError>;
    /// Maps `pfns` of the domain, in that order, read-only or writable.
    fn map(&self, domid: u32, pfns: &[u64], write: bool) -> Result<ForeignMapping, XenError>;
    /// Gives the domain RAM at `pfns` (order-0 extents).
    fn populate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError>;
    /// Takes the domain's RAM at `pfns` away.
    fn depopulate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError>;
}

/// The hypervisor of this dom0: [`LibXen`] when built with the `xen`
/// feature, else [`XenError::NotBuilt`].
pub fn open_hypervisor() -> Result<Arc<dyn Hypervisor>, XenError> {
    #[cfg(feature = "xen")]
    {
        Ok(Arc::new(LibXen::open()?))
    }
    #[cfg(not(feature = "xen"))]
    {
        Err(XenError::NotBuilt)
    }
}

/// Checks that `domid` is a live HVM/PVH domain the engine can migrate.
pub fn check_domain(hv: &dyn Hypervisor, domid: u32) -> Result<DomainInfo, XenError> {
    if domid == 0 {
        return Err(XenError::Unsupported {
            domid,
            why: "dom0 cannot be migrated".into(),
        });
    }
    let info = hv.domain_info(domid)?;
    if info.dying {
        return Err(XenError::Unsupported {
            domid,
            why: "the domain is being destroyed".into(),
        });
    }
    if !info.hvm {
        return Err(XenError::Unsupported {
            domid,
            why: "a PV guest: the engine migrates HVM and PVH guests (use stock xl migrate)".into(),
        });
    }
    Ok(info)
}
