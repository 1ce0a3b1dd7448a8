//! The hypervisor behind the engine.
//!
//! The migration phases (pre-copy rounds, freeze-and-copy, post-copy) are
//! written once, against two traits: [`SourceBackend`] on the host the guest
//! leaves and [`DestBackend`] on the host it arrives at. A backend knows how
//! to read and write guest memory, track what the guest dirties, pause and
//! resume it, move its device state and deliver post-copy faults; it knows
//! nothing about the network or the plan.
//!
//! - [`qemu`]: QEMU with guest RAM in a shared `/dev/shm` file, a preload
//!   library handing the engine a userfaultfd (write-protect dirty log on the
//!   source, missing-page faults on the destination), QMP for control and
//!   device state, `x-ignore-shared` so QEMU itself moves no RAM.
//! - [`xen`]: HVM and PVH guests on a Xen dom0, migrated from inside the
//!   patched toolstack (`xen-patches/`, through `libwanmig.so`): foreign
//!   mappings and log-dirty on the source, populate-and-write on the
//!   destination; the toolstack carries the CPU and device state and
//!   unpauses the guest. Pre-copy only so far: post-copy of Xen guests (the
//!   `mem_paging` ring) is not implemented.

pub mod qemu;
pub mod xen;

use std::time::Duration;

use crate::uffd::DirtyBitmap;

/// What a backend operation failed at, with the backend's own error.
#[derive(Debug, thiserror::Error)]
#[error("{backend} backend: {op}")]
pub struct BackendError {
    /// Which backend.
    pub backend: &'static str,
    /// What was being done.
    pub op: &'static str,
    /// The underlying error.
    #[source]
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl BackendError {
    /// Wraps `source`.
    pub fn new(
        backend: &'static str,
        op: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BackendError {
            backend,
            op,
            source: source.into(),
        }
    }
}

/// Reads guest pages; shared between the bulk pusher and the fault server.
pub trait PageReader: Send + Sync {
    /// Copies page `index` into `out` (`page_size` bytes): a snapshot of a page
    /// the guest may be writing. An error means the page could not be read
    /// at all (`out` holds nothing of it): it must never be sent.
    fn copy_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError>;
}

/// The source side of a hypervisor.
pub trait SourceBackend: Send {
    /// Bytes per guest page.
    fn page_size(&self) -> usize;
    /// Pages of guest RAM.
    fn page_count(&self) -> u64;
    /// Upper bound of the device state, bytes.
    fn device_state_max(&self) -> u64;
    /// The guest's memory.
    fn memory(&self) -> std::sync::Arc<dyn PageReader>;
    /// Page runs `(first, count)` the guest has ever populated; every other
    /// page is zero and never needs to cross the link.
    fn populated_runs(&self) -> Result<Vec<(u64, u64)>, BackendError>;
    /// Starts logging guest writes: every page written after this returns is
    /// reported by the next [`dirty_log_collect`](Self::dirty_log_collect).
    fn dirty_log_start(&mut self) -> Result<(), BackendError>;
    /// Adds the pages written since the last start/collect to `out` and
    /// re-arms logging for them.
    fn dirty_log_collect(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError>;
    /// Stops the guest (vCPUs and devices).
    fn pause(&mut self) -> Result<(), BackendError>;
    /// Resumes the guest here (a migration that is given up).
    fn resume(&mut self) -> Result<(), BackendError>;
    /// Saves the device and CPU state of the paused guest, handing it to
    /// `sink` in pieces; returns the total length.
    fn save_device_state(
        &mut self,
        sink: &mut dyn FnMut(&[u8]) -> Result<(), BackendError>,
    ) -> Result<u64, BackendError>;

    /// The guest's disks (their images and export logs), if it has any.
    fn disks(&self) -> Option<std::sync::Arc<crate::storage::SourceDisks>> {
        None
    }

    /// Whether a page outside [`populated_runs`](Self::populated_runs) is
    /// a zero page to the guest (QEMU: a hole of the RAM file reads as
    /// zeros). A Xen guest's unpopulated pfn is no memory at all: the
    /// integrity check then tells it from a zero page
    /// ([`HOLE_DIGEST`](crate::wire::HOLE_DIGEST)).
    fn holes_read_as_zero(&self) -> bool {
        true
    }

    /// Starts sampling the guest's page accesses (see
    /// [`ReadSampler`](crate::uffd::ReadSampler)); `false` if this backend
    /// cannot. [`read_sampling_stop`](Self::read_sampling_stop) leaves the
    /// dirty log armed afresh (as [`dirty_log_start`](Self::dirty_log_start)
    /// does): writes before it are forgotten.
    fn read_sampling_start(&mut self) -> Result<bool, BackendError> {
        Ok(false)
    }

    /// Adds to `out` the pages the guest accessed since the last call, then
    /// starts a new interval watching `watch` (page indices; empty: only
    /// take).
    fn read_sampling_interval(
        &mut self,
        _out: &mut DirtyBitmap,
        _watch: &[u64],
    ) -> Result<(), BackendError> {
        Ok(())
    }

    /// Stops sampling accesses (nothing pending is lost to the guest).
    fn read_sampling_stop(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// How an install went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// The page is now in place (and any vCPU waiting for it was woken).
    Installed,
    /// Something else installed it first.
    AlreadyPresent,
}

/// Installs pages into the running destination guest and delivers its
/// post-copy faults; shared between the bulk receiver and the fault server.
pub trait PageInstaller: Send + Sync {
    /// Waits up to `timeout` for faults and appends the faulting page
    /// indices to `out` (possibly repeated, possibly for pages installed in
    /// the meantime).
    fn wait_faults(&self, timeout: Duration, out: &mut Vec<u64>) -> Result<(), BackendError>;
    /// Installs `data` as page `index` and wakes its waiters.
    fn install(&self, index: u64, data: &[u8]) -> Result<Install, BackendError>;
    /// Installs consecutive pages `first..` (`data` holds whole pages) in one
    /// go and wakes their waiters; pages something else installed first are
    /// left as they are. Returns how many this call installed.
    fn install_run(&self, first: u64, data: &[u8]) -> Result<u64, BackendError>;
    /// Installs a zero page.
    fn install_zero(&self, index: u64) -> Result<Install, BackendError>;
    /// Wakes vCPUs waiting for page `index` (after losing an install race).
    fn wake(&self, index: u64) -> Result<(), BackendError>;
}

/// The destination side of a hypervisor.
pub trait DestBackend: Send {
    /// Bytes per guest page.
    fn page_size(&self) -> usize;
    /// Pages of guest RAM.
    fn page_count(&self) -> u64;
    /// Writes page `index` before the guest runs (pages may be rewritten).
    fn write_page(&mut self, index: u64, data: &[u8]) -> Result<(), BackendError>;
    /// Makes page `index` absent again before the guest runs (it will read as
    /// zero or fault, as the engine decides).
    fn discard_page(&mut self, index: u64) -> Result<(), BackendError>;
    /// [`discard_page`](Self::discard_page) for pages `first..first +
    /// count` (the freeze's `AbsentPages`: one call per run, where the
    /// backend can do a run at once).
    fn discard_pages(&mut self, first: u64, count: u64) -> Result<(), BackendError> {
        (first..first + count).try_for_each(|p| self.discard_page(p))
    }
    /// Page `index` arrived as all zeros before the guest runs (`was_present`:
    /// it held data here until now). By default it becomes absent (a hole
    /// reads as zero); a backend whose guests tell a zero page from no
    /// memory at all (Xen) puts a zero page there.
    fn zero_page(&mut self, index: u64, was_present: bool) -> Result<(), BackendError> {
        if was_present {
            self.discard_page(index)
        } else {
            Ok(())
        }
    }
    /// The source announced page `index` as zero or absent (`ZeroPages`)
    /// before the guest runs (`was_present`: it held data here until now).
    /// By default it becomes absent, like [`zero_page`](Self::zero_page).
    fn hole_page(&mut self, index: u64, was_present: bool) -> Result<(), BackendError> {
        if was_present {
            self.discard_page(index)
        } else {
            Ok(())
        }
    }
    /// Whether page `index` is no memory at all here (a Xen guest's
    /// unpopulated pfn): the integrity check then expects the source's
    /// [`HOLE_DIGEST`](crate::wire::HOLE_DIGEST) for it, not a zero page's.
    fn is_hole(&self, _index: u64) -> bool {
        false
    }
    /// The installer for pages arriving after the resume.
    fn installer(&self) -> std::sync::Arc<dyn PageInstaller>;
    /// Starts tracking guest writes (called just before the device state is
    /// loaded), so the integrity check can skip pages the guest changed.
    fn track_writes(&mut self) -> Result<(), BackendError>;
    /// Loads the device state saved by the source.
    fn load_device_state(&mut self, state: &[u8]) -> Result<(), BackendError>;
    /// Runs the guest.
    fn resume(&mut self) -> Result<(), BackendError>;
    /// Stops the guest again: post-copy failed and pages are missing, which
    /// the guest must never read (they would read as zeros).
    fn pause(&mut self) -> Result<(), BackendError>;
    /// Adds the pages written since [`track_writes`](Self::track_writes) to `out`.
    fn written_pages(&mut self, out: &mut DirtyBitmap) -> Result<(), BackendError>;
    /// Reads page `index` as the guest sees it now.
    fn read_page(&self, index: u64, out: &mut [u8]) -> Result<(), BackendError>;
    /// Every page is in place: stop intercepting the guest's memory, so the
    /// engine can go away. Pages never installed then read as zeros (and
    /// vCPUs waiting for one are woken), so the engine calls this only once
    /// no page is missing.
    fn release(&mut self) -> Result<(), BackendError>;

    /// The guest's disks (their post-copy images), if it has any.
    fn disks(&self) -> Option<std::sync::Arc<crate::storage::DestDisks>> {
        None
    }
}
