//! [`LibXen`]: the real [`Hypervisor`], through the Xen 4.17 shim
//! (`xen417.c`, compiled by `build.rs` against the patched tree's headers
//! and linked with its libxenctrl and libxenforeignmemory).

use std::ffi::c_void;
use std::io;
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use super::{DomainInfo, ForeignMapping, Hypervisor, LogDirty, XenError};

#[repr(C)]
struct XcInterface {
    _opaque: [u8; 0],
}
#[repr(C)]
struct FmemHandle {
    _opaque: [u8; 0],
}

#[repr(C)]
#[derive(Default)]
struct WmxDomInfo {
    domid: u32,
    shutdown_reason: u32,
    hvm: u8,
    dying: u8,
    shutdown: u8,
    paused: u8,
    pad: u32,
    tot_pages: u64,
    max_pages: u64,
}

unsafe extern "C" {
    fn wmx_xc_open(out: *mut *mut XcInterface) -> i32;
    fn wmx_xc_close(xch: *mut XcInterface);
    fn wmx_fmem_open(out: *mut *mut FmemHandle) -> i32;
    fn wmx_fmem_close(fmem: *mut FmemHandle);
    fn wmx_domain_info(xch: *mut XcInterface, domid: u32, out: *mut WmxDomInfo) -> i32;
    fn wmx_max_gpfn(xch: *mut XcInterface, domid: u32, out: *mut u64) -> i32;
    fn wmx_log_dirty(xch: *mut XcInterface, domid: u32, enable: i32) -> i32;
    fn wmx_log_dirty_clean(
        xch: *mut XcInterface,
        domid: u32,
        bitmap: *mut u64,
        pages: u64,
        last: i32,
    ) -> i32;
    fn wmx_pfn_populated(
        xch: *mut XcInterface,
        domid: u32,
        pfns: *const u64,
        n: u32,
        out: *mut u8,
    ) -> i32;
    fn wmx_map(
        fmem: *mut FmemHandle,
        domid: u32,
        write: i32,
        pfns: *const u64,
        n: u32,
        errs: *mut i32,
        out: *mut *mut c_void,
    ) -> i32;
    fn wmx_unmap(fmem: *mut FmemHandle, addr: *mut c_void, n: u32) -> i32;
    fn wmx_populate(xch: *mut XcInterface, domid: u32, pfns: *const u64, n: u32) -> i32;
    fn wmx_depopulate(xch: *mut XcInterface, domid: u32, pfns: *const u64, n: u32) -> i32;
}

/// The handles, each used by one thread at a time (libxenctrl's rule).
struct Handles {
    xch: NonNull<XcInterface>,
    fmem: NonNull<FmemHandle>,
}

// SAFETY: the handles are process-wide library objects; every use goes
// through the `Mutex` in `LibXen`, so one thread at a time uses them.
unsafe impl Send for Handles {}

impl Drop for Handles {
    fn drop(&mut self) {
        // SAFETY: both handles were opened by `LibXen::open` and are closed
        // once, here; mappings hold an `Arc` to these handles, so none is
        // left when this runs.
        unsafe {
            wmx_fmem_close(self.fmem.as_ptr());
            wmx_xc_close(self.xch.as_ptr());
        }
    }
}

/// Xen 4.17's libxenctrl and libxenforeignmemory.
pub struct LibXen {
    handles: Arc<Mutex<Handles>>,
}

impl std::fmt::Debug for LibXen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LibXen(4.17)")
    }
}

fn errno(rc: i32) -> io::Error {
    io::Error::from_raw_os_error(-rc)
}

fn call(op: &'static str, domid: u32, rc: i32) -> Result<(), XenError> {
    if rc >= 0 {
        Ok(())
    } else if rc == -libc::ESRCH {
        Err(XenError::NoDomain { domid })
    } else {
        Err(XenError::Call {
            op,
            domid,
            source: errno(rc),
        })
    }
}

fn count(op: &'static str, domid: u32, n: usize) -> Result<u32, XenError> {
    u32::try_from(n).map_err(|_| XenError::Call {
        op,
        domid,
        source: io::Error::new(io::ErrorKind::InvalidInput, format!("{n} pfns in one call")),
    })
}

impl LibXen {
    /// Opens libxenctrl and libxenforeignmemory (`/dev/xen/privcmd`: dom0,
    /// root).
    pub fn open() -> Result<Self, XenError> {
        let mut xch = std::ptr::null_mut();
        // SAFETY: `xch` is a valid out-pointer for the call.
        let rc = unsafe { wmx_xc_open(&mut xch) };
        let xch = NonNull::new(xch).ok_or_else(|| XenError::Open {
            what: "libxenctrl",
            source: errno(rc.min(-1)),
        })?;
        let mut fmem = std::ptr::null_mut();
        // SAFETY: `fmem` is a valid out-pointer for the call.
        let rc = unsafe { wmx_fmem_open(&mut fmem) };
        let Some(fmem) = NonNull::new(fmem) else {
            // SAFETY: opened just above, closed once.
            unsafe { wmx_xc_close(xch.as_ptr()) };
            return Err(XenError::Open {
                what: "libxenforeignmemory",
                source: errno(rc.min(-1)),
            });
        };
        Ok(LibXen {
            handles: Arc::new(Mutex::new(Handles { xch, fmem })),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Handles) -> T) -> T {
        let h = self
            .handles
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&h)
    }
}

impl Hypervisor for LibXen {
    fn domain_info(&self, domid: u32) -> Result<DomainInfo, XenError> {
        let mut i = WmxDomInfo::default();
        // SAFETY: a live handle and a valid out-pointer.
        let rc = self.with(|h| unsafe { wmx_domain_info(h.xch.as_ptr(), domid, &mut i) });
        call("getting the domain's info", domid, rc)?;
        Ok(DomainInfo {
            domid: i.domid,
            hvm: i.hvm != 0,
            dying: i.dying != 0,
            shutdown: i.shutdown != 0,
            shutdown_reason: i.shutdown_reason,
            paused: i.paused != 0,
            tot_pages: i.tot_pages,
            max_pages: i.max_pages,
        })
    }

    fn max_gpfn(&self, domid: u32) -> Result<u64, XenError> {
        let mut g = 0u64;
        // SAFETY: a live handle and a valid out-pointer.
        let rc = self.with(|h| unsafe { wmx_max_gpfn(h.xch.as_ptr(), domid, &mut g) });
        call("getting the highest pfn", domid, rc)?;
        Ok(g)
    }

    fn log_dirty(&self, domid: u32, mode: LogDirty) -> Result<(), XenError> {
        let enable = i32::from(mode == LogDirty::Enable);
        // SAFETY: a live handle.
        let rc = self.with(|h| unsafe { wmx_log_dirty(h.xch.as_ptr(), domid, enable) });
        call(
            match mode {
                LogDirty::Enable => "enabling log-dirty mode",
                LogDirty::Off => "turning log-dirty mode off",
            },
            domid,
            rc,
        )
    }

    fn log_dirty_clean(
        &self,
        domid: u32,
        bitmap: &mut [u64],
        pages: u64,
        last: bool,
    ) -> Result<(), XenError> {
        assert!(bitmap.len() as u64 >= pages.div_ceil(64));
        // SAFETY: `bitmap` holds at least `pages` bits, which is all the
        // shim copies into it.
        let rc = self.with(|h| unsafe {
            wmx_log_dirty_clean(
                h.xch.as_ptr(),
                domid,
                bitmap.as_mut_ptr(),
                pages,
                i32::from(last),
            )
        });
        call("collecting the dirty bitmap", domid, rc)
    }

    fn populated(&self, domid: u32, pfns: &[u64], out: &mut Vec<bool>) -> Result<(), XenError> {
        let n = count("querying page frame types", domid, pfns.len())?;
        let mut yes = vec![0u8; pfns.len()];
        // SAFETY: `pfns` and `yes` both hold `n` elements.
        let rc = self.with(|h| unsafe {
            wmx_pfn_populated(h.xch.as_ptr(), domid, pfns.as_ptr(), n, yes.as_mut_ptr())
        });
        call("querying page frame types", domid, rc)?;
        out.extend(yes.iter().map(|&y| y != 0));
        Ok(())
    }

    fn map(&self, domid: u32, pfns: &[u64], write: bool) -> Result<ForeignMapping, XenError> {
        let n = count("mapping guest frames", domid, pfns.len())?;
        let mut errs = vec![0i32; pfns.len()];
        let mut addr = std::ptr::null_mut();
        // SAFETY: `pfns` and `errs` hold `n` elements, `addr` is a valid
        // out-pointer.
        let rc = self.with(|h| unsafe {
            wmx_map(
                h.fmem.as_ptr(),
                domid,
                i32::from(write),
                pfns.as_ptr(),
                n,
                errs.as_mut_ptr(),
                &mut addr,
            )
        });
        call("mapping guest frames", domid, rc)?;
        let base = NonNull::new(addr.cast::<u8>()).ok_or_else(|| XenError::Call {
            op: "mapping guest frames",
            domid,
            source: io::Error::other("no mapping returned"),
        })?;
        let handles = self.handles.clone();
        let unmap = Box::new(move |base: *mut u8, frames: usize| {
            let h = handles
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // SAFETY: `base` and `frames` are what xenforeignmemory_map
            // returned and was asked for; unmapped once, when the mapping
            // is dropped. The handle outlives it (this closure holds it).
            unsafe { wmx_unmap(h.fmem.as_ptr(), base.cast(), frames as u32) };
        });
        // SAFETY: xenforeignmemory_map mapped `n` frames at `base`, each
        // usable where its error is 0, with the protection asked for; only
        // this value unmaps them.
        Ok(unsafe { ForeignMapping::new(base, pfns.len(), errs, unmap) })
    }

    fn populate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError> {
        let n = count("populating frames", domid, pfns.len())?;
        // SAFETY: `pfns` holds `n` elements (the shim copies them).
        let rc = self.with(|h| unsafe { wmx_populate(h.xch.as_ptr(), domid, pfns.as_ptr(), n) });
        call("populating frames", domid, rc)
    }

    fn depopulate(&self, domid: u32, pfns: &[u64]) -> Result<(), XenError> {
        let n = count("giving frames back", domid, pfns.len())?;
        // SAFETY: `pfns` holds `n` elements (the shim copies them).
        let rc = self.with(|h| unsafe { wmx_depopulate(h.xch.as_ptr(), domid, pfns.as_ptr(), n) });
        call("giving frames back", domid, rc)
    }
}
