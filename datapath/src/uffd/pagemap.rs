//! Dirty-page tracking of another process with `PAGEMAP_SCAN` (Linux 6.7+)
//! over a range registered for async write-protect.
//!
//! # How tracking works
//! The target's range is registered with a userfaultfd in WP mode with
//! `UFFD_FEATURE_WP_ASYNC` (which implies `WP_UNPOPULATED`). Then:
//! 1. [`write_protect_all`] arms the whole range once (`UFFDIO_WRITEPROTECT`):
//!    every present PTE gets the uffd-wp bit and every empty one a marker;
//! 2. a write to an armed page is resolved by the kernel without any message
//!    (async): it drops the bit and lets the write through;
//! 3. [`PagemapScanner::scan_written_and_protect`] reports the pages whose PTE
//!    has no uffd-wp bit or marker (`PAGE_IS_WRITTEN`) and re-arms exactly
//!    those in the same walk (`PM_SCAN_WP_MATCHING`), so a write racing with
//!    the scan shows up in this scan or the next, never in neither.
//!
//! # What "written" means
//! Written = "the page's PTE in the target carries no uffd-wp bit or marker".
//! Verified on 6.18 by the tests in `datapath/tests/uffd.rs`:
//! - after [`write_protect_all`], a page never populated and never touched is
//!   *not* written (its marker stays), and neither is one first touched by a
//!   read (the new PTE inherits the marker's protection);
//! - a page first populated by a write *is* written, as is any page written
//!   through the target's mapping, including by the kernel on the target's
//!   behalf (`read(2)` into it, `process_vm_writev` to it);
//! - writes to the file through another path (`pwrite(2)`, a second mapping)
//!   do not touch the target's PTEs and are *not* seen;
//! - pages installed by `UFFDIO_COPY` without [`CopyFlags::wp`] and by
//!   `UFFDIO_ZEROPAGE` (which has no WP mode) count as written; with
//!   `CopyFlags::wp` they are not, until written;
//! - on a registered range that was never armed, the first scan reports every
//!   populated page *and* (6.18's fast path for exactly `PAGE_IS_WRITTEN`
//!   tests only the PTE bit) the never-populated pages whose page table
//!   exists; that scan then arms them. False positives only, never a miss:
//!   arm with [`write_protect_all`] before the first scan that counts.
//!
//! Always pass `PM_SCAN_CHECK_WPASYNC` (done here): with it, a range whose
//! registration is gone (the userfaultfd was closed) fails with `EPERM`
//! ([`ScanError::NotWpAsync`]) instead of being scanned as a plain mapping.
//! A target that has exited fails with `ESRCH` ([`ScanError::TargetGone`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

#[cfg(doc)]
use super::CopyFlags;
use super::abi;
use super::{Errno, RemoteAddr, RemoteRange, Userfaultfd, WriteProtectError, page_size};

pub use super::bitmap::{BitmapError, DirtyBitmap};

/// Errors opening a [`PagemapScanner`].
#[derive(Debug, thiserror::Error)]
pub enum ScanOpenError {
    /// The range is empty, not page-aligned, or overflows.
    #[error("PAGEMAP_SCAN range {range}: empty or not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `/proc/<pid>/pagemap` could not be opened (`ENOENT`: no such process;
    /// `EACCES`/`EPERM`: no ptrace-read access to it).
    #[error("cannot open {path}: {errno}")]
    Open {
        /// The path.
        path: String,
        /// errno.
        errno: Errno,
    },
}

/// Errors of a scan.
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The bitmap does not cover the scanner's range with the machine's pages.
    #[error("PAGEMAP_SCAN {range}: the output bitmap covers {bitmap} instead")]
    BitmapMismatch {
        /// The scanner's range.
        range: RemoteRange,
        /// The bitmap's range.
        bitmap: RemoteRange,
    },
    /// `EPERM` (from `PM_SCAN_CHECK_WPASYNC`): part of the range is not
    /// registered for async write-protect: the userfaultfd was closed, the
    /// registration removed, or the target remapped the range.
    #[error("PAGEMAP_SCAN {range}: not registered for async write-protect ({errno})")]
    NotWpAsync {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// `ESRCH`: the target's address space is gone (it exited).
    #[error("PAGEMAP_SCAN {range}: the target address space is gone ({errno})")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// The kernel reported more regions than the vector holds, or a region
    /// outside the range (never seen; reported rather than trusted).
    #[error("PAGEMAP_SCAN {range}: the kernel returned an impossible answer: {detail}")]
    BadAnswer {
        /// The range.
        range: RemoteRange,
        /// What was wrong.
        detail: String,
    },
    /// Any other failure.
    #[error("PAGEMAP_SCAN {range}: {errno}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
}

/// What one scan found and cost.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScanStats {
    /// Pages reported written.
    pub pages: u64,
    /// Regions (runs of pages) the kernel returned.
    pub regions: u64,
    /// `PAGEMAP_SCAN` calls made (more than one when the region vector filled).
    pub ioctls: u32,
    /// Wall time of the scan.
    pub elapsed: Duration,
}

/// Scans a range of a process's pagemap with `PAGEMAP_SCAN`.
///
/// Holds the open pagemap file and a reusable region vector: a scan
/// allocates nothing.
#[derive(Debug)]
pub struct PagemapScanner {
    file: File,
    range: RemoteRange,
    vec: Vec<abi::page_region>,
}

impl PagemapScanner {
    /// Default capacity of the region vector (96 KiB): a fully fragmented
    /// 16 MiB, or any number of pages in at most 4096 runs, per call.
    pub const DEFAULT_REGIONS: usize = 4096;

    /// Opens `/proc/<pid>/pagemap` for `range` (page-aligned) of process `pid`.
    pub fn open(pid: u32, range: RemoteRange) -> Result<Self, ScanOpenError> {
        Self::open_path(&format!("/proc/{pid}/pagemap"), range)
    }

    /// Opens this process's own pagemap (`/proc/self/pagemap`).
    pub fn open_self(range: RemoteRange) -> Result<Self, ScanOpenError> {
        Self::open_path("/proc/self/pagemap", range)
    }

    fn open_path(path: &str, range: RemoteRange) -> Result<Self, ScanOpenError> {
        if range.is_empty() || !range.is_page_aligned() {
            return Err(ScanOpenError::Misaligned { range });
        }
        let file = File::open(path).map_err(|e| ScanOpenError::Open {
            path: path.to_owned(),
            errno: Errno(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        Ok(PagemapScanner {
            file,
            range,
            vec: vec![abi::page_region::default(); Self::DEFAULT_REGIONS],
        })
    }

    /// Changes the capacity of the region vector (at least 1). A small vector
    /// only costs more calls per scan.
    pub fn with_region_capacity(mut self, regions: usize) -> Self {
        self.vec = vec![abi::page_region::default(); regions.max(1)];
        self
    }

    /// The range scanned.
    pub fn range(&self) -> RemoteRange {
        self.range
    }

    /// Adds to `out` the pages written since the previous scan (or since
    /// [`write_protect_all`]) and write-protects them again, atomically with
    /// respect to the target's writes.
    pub fn scan_written_and_protect(
        &mut self,
        out: &mut DirtyBitmap,
    ) -> Result<ScanStats, ScanError> {
        self.scan(abi::PM_SCAN_WP_MATCHING | abi::PM_SCAN_CHECK_WPASYNC, out)
    }

    /// Adds to `out` the pages currently written, changing nothing (for
    /// verification).
    pub fn scan_written(&mut self, out: &mut DirtyBitmap) -> Result<ScanStats, ScanError> {
        self.scan(abi::PM_SCAN_CHECK_WPASYNC, out)
    }

    /// Whether the page at `addr` (in the range) has been written since the
    /// last scan, changing nothing: one `PAGEMAP_SCAN` of one page.
    pub fn page_written(&mut self, addr: RemoteAddr) -> Result<bool, ScanError> {
        let range = self.range;
        let ps = page_size();
        let start = addr.get() & !(ps - 1);
        if !range.contains(RemoteAddr(start)) {
            return Err(ScanError::BadAnswer {
                range,
                detail: format!("page {start:#x} is outside the range"),
            });
        }
        loop {
            let (r, _) = self.scan_once(abi::PM_SCAN_CHECK_WPASYNC, start, start + ps, 1);
            return match r {
                0 => Ok(false),
                1 => Ok(true),
                r if r > 1 => Err(ScanError::BadAnswer {
                    range,
                    detail: format!("{r} regions for one page"),
                }),
                _ => {
                    let errno = Errno::last();
                    Err(match errno.0 {
                        libc::EINTR => continue,
                        libc::EPERM => ScanError::NotWpAsync { range, errno },
                        libc::ESRCH => ScanError::TargetGone { range, errno },
                        _ => ScanError::Os { range, errno },
                    })
                }
            };
        }
    }

    /// One `PAGEMAP_SCAN` of `[start, end)` for written pages into the
    /// first `vec_len` (at most `self.vec.len()`) regions of the vector;
    /// returns the ioctl's result and the kernel's `walk_end`.
    fn scan_once(
        &mut self,
        flags: u64,
        start: u64,
        end: u64,
        vec_len: usize,
    ) -> (libc::c_int, u64) {
        let mut arg = abi::pm_scan_arg {
            size: size_of::<abi::pm_scan_arg>() as u64,
            flags,
            start,
            end,
            walk_end: 0,
            vec: self.vec.as_mut_ptr() as usize as u64,
            vec_len: vec_len.min(self.vec.len()) as u64,
            max_pages: 0,
            category_inverted: 0,
            category_mask: abi::PAGE_IS_WRITTEN,
            category_anyof_mask: 0,
            return_mask: abi::PAGE_IS_WRITTEN,
        };
        // SAFETY: `arg` is an exclusively borrowed `pm_scan_arg` (the size
        // PAGEMAP_SCAN encodes, checked in `abi`); `arg.vec` points to
        // `self.vec`, a live, exclusively borrowed buffer of initialised
        // `page_region`s that the kernel fills at most `vec_len` (never more
        // than its length) of; the file is a live pagemap descriptor.
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                abi::request(abi::PAGEMAP_SCAN),
                std::ptr::from_mut(&mut arg).cast::<libc::c_void>(),
            )
        };
        (r, arg.walk_end)
    }

    fn scan(&mut self, flags: u64, out: &mut DirtyBitmap) -> Result<ScanStats, ScanError> {
        let range = self.range;
        if out.range() != range || out.page_size() != page_size() {
            return Err(ScanError::BitmapMismatch {
                range,
                bitmap: out.range(),
            });
        }
        let t0 = Instant::now();
        let end = range.start.get() + range.len; // no overflow: checked at open
        let cap = self.vec.len();
        let mut start = range.start.get();
        let mut stats = ScanStats::default();
        loop {
            let (r, walk_end) = self.scan_once(flags, start, end, cap);
            stats.ioctls = stats.ioctls.saturating_add(1);
            let n = match usize::try_from(r) {
                Ok(n) => n,
                Err(_) => {
                    let errno = Errno::last();
                    return Err(match errno.0 {
                        // Only with a fatal signal pending; the walk restarts
                        // where it is (re-reporting pages is harmless).
                        libc::EINTR => continue,
                        libc::EPERM => ScanError::NotWpAsync { range, errno },
                        libc::ESRCH => ScanError::TargetGone { range, errno },
                        _ => ScanError::Os { range, errno },
                    });
                }
            };
            if n > cap {
                return Err(ScanError::BadAnswer {
                    range,
                    detail: format!("{n} regions returned for a vector of {cap}"),
                });
            }
            for reg in &self.vec[..n] {
                out.set_addr_range(RemoteAddr(reg.start), RemoteAddr(reg.end))
                    .map_err(|_| ScanError::BadAnswer {
                        range,
                        detail: format!("region {:#x}..{:#x}", reg.start, reg.end),
                    })?;
                stats.pages += (reg.end - reg.start) / page_size();
            }
            stats.regions += n as u64;
            // Kernel 6.18 quirk: `walk_end` is only meaningful when the walk
            // stopped early, i.e. the vector filled up (we set no max_pages).
            // After a complete walk that flushed the kernel's internal
            // 512-entry bounce buffer it is stale (< end), so it must not be
            // followed then.
            if n < cap || walk_end >= end {
                break;
            }
            // A full vector is ambiguous when the walk ended exactly as it
            // filled: `walk_end` may then be stale, behind regions already
            // reported. The walk reports in address order, so everything
            // before the last region's end has been covered either way.
            let covered = self.vec[n - 1].end;
            let next = walk_end.max(covered);
            if next >= end {
                break;
            }
            if next <= start {
                return Err(ScanError::BadAnswer {
                    range,
                    detail: format!(
                        "full vector but walk_end {walk_end:#x} made no progress from {start:#x}"
                    ),
                });
            }
            start = next;
        }
        stats.elapsed = t0.elapsed();
        Ok(stats)
    }
}

/// Arms write-protection over the whole `range` (`UFFDIO_WRITEPROTECT`): the
/// start of tracking. With `WP_UNPOPULATED` this also covers pages never
/// populated, so that their first read does not count as a write.
pub fn write_protect_all(uffd: &Userfaultfd, range: RemoteRange) -> Result<(), WriteProtectError> {
    uffd.write_protect(range, true, false)
}
