//! Which pages another process *reads*, interval by interval: MINOR-fault
//! sampling of a shared-memory mapping, beside write-protect-async dirty
//! logging on the same range.
//!
//! The write log ([`PagemapScanner`]) sees writes only. To see reads, each
//! interval begins by unmapping the target's page-table entries for the
//! range (`process_madvise(MADV_PAGEOUT)`: with no swap the pages stay in
//! the page cache, only the mappings go); the range is registered in MINOR
//! mode too, so the target's first access to each page in the interval
//! stops in a MINOR fault, which the sampler's thread records and resolves
//! with `UFFDIO_CONTINUE` (the page is mapped again: later accesses in the
//! interval cost nothing). One fault per page per interval, about 7-60 us
//! each.
//!
//! Unmapping must not disturb the write log: the kernel keeps a zapped
//! page's write-protect state in a PTE marker, and the sampler maps a page
//! back write-protected (`CONTINUE_MODE_WP`) exactly when a one-page
//! `PAGEMAP_SCAN` says it has not been written since the last scan and the
//! fault is not a write, so a sampled read never looks like a write and a
//! write is never lost.
//!
//! A page that is also mapped by another process (this engine's own
//! mapping of the RAM file, for instance) is not unmapped by `MADV_PAGEOUT`
//! and its reads go unseen: read the RAM through `pread`, or drop such
//! mappings before sampling. [`ReadSampler::stop`] registers the range back
//! to what it was and wakes anything still waiting; the write log must be
//! re-armed after it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use super::{Errno, Event, Mode, PagemapScanner, RemoteAddr, RemoteRange, Userfaultfd, page_size};

/// How long the fault thread spins for the next fault after one.
const SPIN: Duration = Duration::from_millis(2);

/// `MADV_PAGEOUT` (Linux 5.4).
const MADV_PAGEOUT: libc::c_int = 21;

/// Why read sampling failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadSampleError {
    /// The userfaultfd could not be duplicated for the fault thread.
    #[error("duplicating the userfaultfd: {errno}")]
    Dup {
        /// The error.
        errno: Errno,
    },
    /// `pidfd_open` of the target failed.
    #[error("pidfd_open({pid}): {errno}")]
    Pidfd {
        /// The target.
        pid: u32,
        /// The error.
        errno: Errno,
    },
    /// Registering the range in MINOR mode (or back) failed; the kernel or
    /// the preload library's `UFFDIO_API` may lack `MINOR_SHMEM`.
    #[error("registering {range:?} as {mode}: {source}")]
    Register {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// What the kernel said.
        source: super::RegisterError,
    },
    /// The target's pagemap could not be opened.
    #[error(transparent)]
    Pagemap(#[from] super::ScanOpenError),
    /// `process_madvise(MADV_PAGEOUT)` failed.
    #[error("process_madvise(MADV_PAGEOUT) of {range:?}: {errno}")]
    Zap {
        /// The range.
        range: RemoteRange,
        /// The error.
        errno: Errno,
    },
    /// Serving a MINOR fault failed (the target may have gone).
    #[error("serving a read fault at {addr:#x}: {message}")]
    Serve {
        /// The faulting address.
        addr: u64,
        /// What failed.
        message: String,
    },
    /// The fault thread panicked.
    #[error("the read-sampling thread panicked")]
    Panicked,
}

/// What a sampling session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadSampleStats {
    /// MINOR faults served.
    pub faults: u64,
    /// Of those, mapped back write-protected (not written since the last
    /// scan).
    pub mapped_protected: u64,
    /// Intervals begun.
    pub intervals: u64,
}

/// The pages touched in the current interval: one bit per page, set by the
/// fault thread, taken by the caller.
type TouchedSet = crate::bits::AtomicBitmap;

/// Samples the reads of process `pid` on `range`: see the module docs.
#[derive(Debug)]
pub struct ReadSampler {
    uffd: Arc<Userfaultfd>,
    range: RemoteRange,
    pidfd: OwnedFd,
    /// The registration to go back to.
    mode_after: Mode,
    touched: Arc<TouchedSet>,
    stop: Arc<AtomicBool>,
    intervals: u64,
    thread: Option<JoinHandle<Result<ReadSampleStats, ReadSampleError>>>,
}

impl ReadSampler {
    /// Registers `range` of `pid` (registered on `uffd` as `mode_after`, WP
    /// async) in MINOR mode as well and starts the fault thread. Nothing is
    /// sampled until [`begin_interval`](Self::begin_interval).
    pub fn start(
        uffd: &Userfaultfd,
        pid: u32,
        range: RemoteRange,
        mode_after: Mode,
    ) -> Result<Self, ReadSampleError> {
        // SAFETY: dup of a descriptor this handle owns; the result is owned
        // by the OwnedFd below or the error path.
        let dup = unsafe { libc::fcntl(uffd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(ReadSampleError::Dup {
                errno: Errno::last(),
            });
        }
        // SAFETY: `dup` is a fresh descriptor nobody else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(dup) };
        let uffd =
            Arc::new(
                Userfaultfd::from_owned_fd(owned).map_err(|e| ReadSampleError::Serve {
                    addr: range.start.get(),
                    message: format!("adopting the duplicated userfaultfd: {e}"),
                })?,
            );
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if pidfd < 0 {
            return Err(ReadSampleError::Pidfd {
                pid,
                errno: Errno::last(),
            });
        }
        // SAFETY: a fresh descriptor from pidfd_open, owned from here.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as libc::c_int) };
        let scanner = PagemapScanner::open(pid, range)?;
        let sampling = Mode {
            minor: true,
            ..mode_after
        };
        uffd.register(range, sampling)
            .map_err(|source| ReadSampleError::Register {
                range,
                mode: sampling,
                source,
            })?;
        let touched = Arc::new(TouchedSet::new(range.page_count()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("wanmig-read-sampler".into())
            .spawn({
                let (uffd, touched, stop) = (uffd.clone(), touched.clone(), stop.clone());
                move || {
                    let served = serve(&uffd, range, scanner, &touched, &stop);
                    if served.is_err() {
                        // Nobody serves MINOR faults any more: drop the mode
                        // so the target never waits for one.
                        let _ = register_back(&uffd, range, mode_after);
                    }
                    served
                }
            });
        let thread = match thread {
            Ok(t) => t,
            Err(_) => {
                let _ = uffd.register(range, mode_after);
                return Err(ReadSampleError::Panicked);
            }
        };
        Ok(ReadSampler {
            uffd,
            range,
            pidfd,
            mode_after,
            touched,
            stop,
            intervals: 0,
            thread: Some(thread),
        })
    }

    /// Starts an interval: unmaps the target's pages of the range so that
    /// its next access to each is seen. Pages touched before this call and
    /// not yet taken stay marked.
    pub fn begin_interval(&mut self) -> Result<(), ReadSampleError> {
        self.begin_interval_in(0, self.range.page_count())
    }

    /// [`begin_interval`](Self::begin_interval) watching only pages
    /// `[first, first + count)` of the range (clamped to it): the others
    /// keep their mappings and cost the target nothing.
    pub fn begin_interval_in(&mut self, first: u64, count: u64) -> Result<(), ReadSampleError> {
        let pages = self.range.page_count();
        let first = first.min(pages);
        let count = count.min(pages - first);
        self.intervals += 1;
        self.zap(&[(first, count)])
    }

    /// [`begin_interval`](Self::begin_interval) watching only `pages`
    /// (indices in the range, any order; those outside are ignored).
    pub fn begin_interval_on(&mut self, pages: &[u64]) -> Result<(), ReadSampleError> {
        let n = self.range.page_count();
        let mut sorted: Vec<u64> = pages.iter().copied().filter(|&p| p < n).collect();
        sorted.sort_unstable();
        sorted.dedup();
        let runs = crate::bits::runs_of(sorted.into_iter());
        self.intervals += 1;
        self.zap(&runs)
    }

    /// `process_madvise(MADV_PAGEOUT)` of the page runs, `IOV_MAX` at a
    /// time.
    fn zap(&mut self, runs: &[(u64, u64)]) -> Result<(), ReadSampleError> {
        /// `UIO_MAXIOV`.
        const IOV_MAX: usize = 1024;
        let ps = page_size();
        let base = self.range.start.get();
        for batch in runs.chunks(IOV_MAX) {
            let iov: Vec<libc::iovec> = batch
                .iter()
                .filter(|&&(_, c)| c > 0)
                .map(|&(f, c)| libc::iovec {
                    iov_base: (base + f * ps) as *mut libc::c_void,
                    iov_len: (c * ps) as usize,
                })
                .collect();
            if iov.is_empty() {
                continue;
            }
            // SAFETY: process_madvise reads `iov.len()` iovecs from a live
            // vector; the addresses are the target's, never dereferenced
            // here.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_process_madvise,
                    self.pidfd.as_raw_fd(),
                    iov.as_ptr(),
                    iov.len(),
                    MADV_PAGEOUT,
                    0u32,
                )
            };
            if r < 0 {
                return Err(ReadSampleError::Zap {
                    range: self.range,
                    errno: Errno::last(),
                });
            }
        }
        Ok(())
    }

    /// Calls `each(page)` (index in the range) for every page the target
    /// touched since the last call, and clears the set.
    pub fn take_touched(&self, each: impl FnMut(u64)) {
        self.touched.take(each);
    }

    /// Registers the range back as it was (`mode_after`), wakes anything
    /// still waiting, and stops the fault thread. Going back takes an
    /// unregistration, which clears the write protection of the range:
    /// re-arm the write log ([`write_protect_all`](super::write_protect_all))
    /// before the next scan means anything.
    pub fn stop(mut self) -> Result<ReadSampleStats, ReadSampleError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<ReadSampleStats, ReadSampleError> {
        let Some(thread) = self.thread.take() else {
            return Ok(ReadSampleStats::default());
        };
        // The thread first (it scans and continues with the range still
        // registered for WP): faults that come after it stops wait, briefly,
        // until the unregistration wakes them.
        self.stop.store(true, Ordering::Release);
        let served = thread.join().map_err(|_| ReadSampleError::Panicked);
        register_back(&self.uffd, self.range, self.mode_after)?;
        let served = served?;
        let mut stats = served?;
        stats.intervals = self.intervals;
        Ok(stats)
    }
}

impl Drop for ReadSampler {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

/// Registers `range` as `mode` alone. Registering a subset of the current
/// modes changes nothing (the kernel keeps a registration that has every
/// mode asked for), so the range is unregistered first: that wakes any
/// fault still queued (its access retries and, without MINOR, the kernel
/// maps the page itself), and clears the write protection of every page.
fn register_back(
    uffd: &Userfaultfd,
    range: RemoteRange,
    mode: Mode,
) -> Result<(), ReadSampleError> {
    let err = |source| ReadSampleError::Register {
        range,
        mode,
        source,
    };
    if let Err(e) = uffd.unregister(range) {
        return Err(ReadSampleError::Serve {
            addr: range.start.get(),
            message: format!("unregistering to drop MINOR mode: {e}"),
        });
    }
    uffd.register(range, mode).map_err(err)?;
    let _ = uffd.wake(range);
    Ok(())
}

/// The fault thread: records and resolves MINOR faults until told to stop.
fn serve(
    uffd: &Userfaultfd,
    range: RemoteRange,
    mut scanner: PagemapScanner,
    touched: &TouchedSet,
    stop: &AtomicBool,
) -> Result<ReadSampleStats, ReadSampleError> {
    let ps = page_size();
    let mut stats = ReadSampleStats::default();
    let mut events = Vec::with_capacity(64);
    let fail = |addr: u64, message: String| ReadSampleError::Serve { addr, message };
    // While faults come, spin (a fault then waits for this thread's wake-up
    // no longer: on a virtualised host that is most of its cost); after
    // SPIN without one, sleep in poll.
    let mut last_fault = std::time::Instant::now();
    while !stop.load(Ordering::Acquire) {
        let spinning = last_fault.elapsed() < SPIN;
        let ready = uffd
            .poll_readable(Some(if spinning {
                Duration::ZERO
            } else {
                Duration::from_millis(20)
            }))
            .map_err(|e| fail(range.start.get(), e.to_string()))?;
        if !ready {
            if spinning {
                std::hint::spin_loop();
            }
            continue;
        }
        last_fault = std::time::Instant::now();
        events.clear();
        uffd.read_events(&mut events)
            .map_err(|e| fail(range.start.get(), e.to_string()))?;
        for ev in events.drain(..) {
            let Event::Pagefault {
                addr, minor, write, ..
            } = ev
            else {
                continue;
            };
            let page_addr = RemoteAddr(addr.get() & !(ps - 1));
            if !minor || !range.contains(page_addr) {
                // Not ours to serve (the registration has no MISSING mode):
                // wake it so it retries.
                let _ = uffd.wake(RemoteRange::new(page_addr, ps));
                continue;
            }
            touched.set((page_addr.get() - range.start.get()) / ps);
            // Keep the write log's view: back write-protected unless the
            // page has been written since the last scan, or is being written
            // now (the faulting write retries and lands: marking it written
            // is exact, and spares it a second, write-protect fault).
            let written = write
                || scanner
                    .page_written(page_addr)
                    .map_err(|e| fail(page_addr.get(), e.to_string()))?;
            let one = RemoteRange::new(page_addr, ps);
            match uffd.continue_(one, !written) {
                // Mapped already (the target raced itself): wake the waiter.
                Ok(o) if o.lost_race() => {
                    let _ = uffd.wake(one);
                }
                Ok(_) => {}
                // Gone from the page cache (truncated) or the target is
                // exiting: let the access retry.
                Err(crate::uffd::ContinueError::NotInPageCache { .. }) => {
                    let _ = uffd.wake(one);
                }
                Err(e) => return Err(fail(page_addr.get(), e.to_string())),
            }
            stats.faults += 1;
            stats.mapped_protected += u64::from(!written);
        }
    }
    Ok(stats)
}
