//! The source guest's RAM as the engine sees it: a read-only shared mapping
//! of the file QEMU keeps guest RAM in, and the file's populated ranges.
//!
//! Pages are copied out of the mapping into a private buffer before they are
//! checked, compressed or checksummed, because the guest keeps writing them
//! during pre-copy. Never-populated pages (holes in the file) are found with
//! `SEEK_DATA`/`SEEK_HOLE` and never read through the mapping: a read fault on
//! a shmem hole would allocate a page for nothing; they are announced to the
//! destination as zero ranges instead.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

/// The source RAM could not be opened or inspected.
#[derive(Debug, thiserror::Error)]
pub enum SourceMemoryError {
    /// Opening or mapping the file failed.
    #[error("guest RAM file {path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The file's size is not what the guest geometry says.
    #[error(
        "guest RAM file {path} is {actual} bytes, expected {expected} ({pages} pages of {page_size})"
    )]
    Size {
        /// The file.
        path: PathBuf,
        /// Its size.
        actual: u64,
        /// The expected size.
        expected: u64,
        /// Pages.
        pages: u64,
        /// Page size.
        page_size: u64,
    },
}

/// Read-only view of the source guest's RAM file.
#[derive(Debug)]
pub struct SourceMemory {
    path: PathBuf,
    file: File,
    map: Mmap,
    page_size: usize,
    pages: u64,
}

impl SourceMemory {
    /// Maps `path`, which must hold exactly `pages` pages of `page_size`.
    pub fn open(path: &Path, page_size: usize, pages: u64) -> Result<Self, SourceMemoryError> {
        let io_err = |op| {
            let path = path.to_path_buf();
            move |source| SourceMemoryError::Io { path, op, source }
        };
        let file = File::open(path).map_err(io_err("open"))?;
        let actual = file.metadata().map_err(io_err("stat"))?.len();
        let expected = pages * page_size as u64;
        if actual != expected {
            return Err(SourceMemoryError::Size {
                path: path.to_path_buf(),
                actual,
                expected,
                pages,
                page_size: page_size as u64,
            });
        }
        // SAFETY: a read-only shared mapping of a regular file. The guest
        // changes the bytes underneath at any time; the mapping is only ever
        // read through raw-pointer copies (`copy_page`), never through
        // references that assume the bytes are stable. QEMU never truncates its
        // RAM file while running.
        let map = unsafe { MmapOptions::new().len(expected as usize).map(&file) }
            .map_err(io_err("mmap"))?;
        Ok(SourceMemory {
            path: path.to_path_buf(),
            file,
            map,
            page_size,
            pages,
        })
    }

    /// Pages of guest RAM.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Bytes per page.
    pub fn page_size(&self) -> usize {
        self.page_size
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Drops this process's page-table entries for the mapping (the pages
    /// stay in the file): a page mapped here as well as in QEMU is skipped
    /// by `MADV_PAGEOUT`, which read sampling relies on. Later copies map
    /// pages again.
    pub fn release_mappings(&self) -> Result<(), SourceMemoryError> {
        // SAFETY: MADV_DONTNEED on a read-only shared file mapping only
        // drops page-table entries; the next read refaults the same bytes
        // from the file. No reference into the mapping is live (it is only
        // read through raw-pointer copies).
        unsafe {
            self.map
                .unchecked_advise(memmap2::UncheckedAdvice::DontNeed)
        }
        .map_err(|source| SourceMemoryError::Io {
            path: self.path.clone(),
            op: "madvise(MADV_DONTNEED)",
            source,
        })
    }

    /// Copies page `index` into `out` (`page_size` bytes): a snapshot of a
    /// page the guest may be writing concurrently.
    ///
    /// # Panics
    /// If `index` is out of range or `out` has the wrong length.
    pub fn copy_page(&self, index: u64, out: &mut [u8]) {
        assert!(index < self.pages, "page {index} out of {}", self.pages);
        assert_eq!(out.len(), self.page_size);
        let offset = index as usize * self.page_size;
        // SAFETY: `offset + page_size` is within the mapping (checked above).
        // The source bytes may change concurrently (the guest runs): a racy
        // byte copy yields some mix of old and new bytes, which is exactly the
        // snapshot semantics wanted (the dirty log resends the page if the
        // guest wrote it after the log was reset); u8 has no invalid values and
        // no Rust reference to the mapped bytes is created.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.map.as_ptr().add(offset),
                out.as_mut_ptr(),
                self.page_size,
            );
        }
    }

    /// Populated page runs `(first, count)` of the file (everything else is a
    /// hole: never written by the guest, all zero).
    pub fn populated_runs(&self) -> Result<Vec<(u64, u64)>, SourceMemoryError> {
        let size = self.pages * self.page_size as u64;
        let ps = self.page_size as u64;
        let fd = self.file.as_raw_fd();
        let mut runs = Vec::new();
        let mut off = 0u64;
        while off < size {
            let data = match seek(fd, off, libc::SEEK_DATA) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
                Err(source) => {
                    return Err(SourceMemoryError::Io {
                        path: self.path.clone(),
                        op: "lseek(SEEK_DATA)",
                        source,
                    });
                }
            };
            if data >= size {
                break;
            }
            let hole = seek(fd, data, libc::SEEK_HOLE)
                .map_err(|source| SourceMemoryError::Io {
                    path: self.path.clone(),
                    op: "lseek(SEEK_HOLE)",
                    source,
                })?
                .min(size);
            let first = data / ps;
            let end = hole.div_ceil(ps);
            runs.push((first, end - first));
            off = end * ps;
        }
        Ok(runs)
    }
}

fn seek(fd: i32, off: u64, whence: i32) -> io::Result<u64> {
    // SAFETY: lseek on a descriptor we own; no memory is passed.
    let r = unsafe { libc::lseek(fd, off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn shm_file(tag: &str, pages: u64) -> PathBuf {
        let p = PathBuf::from(format!(
            "/dev/shm/wanmig-test-srcmem-{tag}-{}",
            std::process::id()
        ));
        let f = File::create(&p).unwrap();
        f.set_len(pages * 4096).unwrap();
        p
    }

    #[test]
    fn holes_are_reported_and_pages_copy_out() {
        let p = shm_file("holes", 64);
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[1u8; 4096], 3 * 4096).unwrap();
        f.write_all_at(&[2u8; 8192], 10 * 4096).unwrap();
        f.write_all_at(&[3u8; 4096], 63 * 4096).unwrap();
        let m = SourceMemory::open(&p, 4096, 64).unwrap();
        assert_eq!(m.populated_runs().unwrap(), vec![(3, 1), (10, 2), (63, 1)]);
        let mut page = vec![0u8; 4096];
        m.copy_page(11, &mut page);
        assert!(page.iter().all(|&b| b == 2));
        m.copy_page(63, &mut page);
        assert!(page.iter().all(|&b| b == 3));
        // Writes after the mapping are visible (shared page cache).
        f.write_all_at(&[9u8; 4096], 11 * 4096).unwrap();
        m.copy_page(11, &mut page);
        assert!(page.iter().all(|&b| b == 9));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn a_file_of_the_wrong_size_is_refused() {
        let p = shm_file("size", 8);
        let e = SourceMemory::open(&p, 4096, 16).unwrap_err();
        assert!(
            matches!(
                e,
                SourceMemoryError::Size {
                    actual: 32768,
                    expected: 65536,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
