//! The destination guest's RAM file, filled by the engine.
//!
//! Before the guest resumes, pages arriving from the source are written with
//! `pwrite` (a page may be resent several times during pre-copy). After the
//! resume they are installed into QEMU's mapping with `UFFDIO_COPY`, which
//! wakes a vCPU waiting for them. The engine never maps this file itself:
//! reading a hole through a second mapping would fill it with zeros and the
//! real page would never be requested; `pread` is safe (it reads holes as
//! zeros without allocating).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The destination RAM file could not be prepared or accessed.
#[derive(Debug, thiserror::Error)]
pub enum DestMemoryError {
    /// A file operation failed.
    #[error("destination RAM file {path}: {op}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// Pages outside the file were addressed.
    #[error("destination RAM file {path}: pages {first}..{end} are not within its {pages} pages")]
    OutOfRange {
        /// The file.
        path: PathBuf,
        /// First page addressed.
        first: u64,
        /// One past the last page addressed.
        end: u64,
        /// Pages in the file.
        pages: u64,
    },
    /// A buffer is not one page long.
    #[error("destination RAM file {path}: a page is {page_size} bytes, the buffer {len}")]
    BadLength {
        /// The file.
        path: PathBuf,
        /// The buffer's length.
        len: usize,
        /// The page size.
        page_size: usize,
    },
}

/// The destination's RAM file.
#[derive(Debug)]
pub struct DestMemory {
    path: PathBuf,
    file: File,
    page_size: usize,
    pages: u64,
}

impl DestMemory {
    /// Creates a sparse file of `pages` pages (mode 0600); refuses to reuse an
    /// existing file, which could hold another guest's memory.
    pub fn create(path: &Path, page_size: usize, pages: u64) -> Result<Self, DestMemoryError> {
        let err = |op| {
            let path = path.to_path_buf();
            move |source| DestMemoryError::Io { path, op, source }
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(err("create"))?;
        file.set_len(pages * page_size as u64)
            .map_err(err("set size"))?;
        Ok(DestMemory {
            path: path.to_path_buf(),
            file,
            page_size,
            pages,
        })
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Pages.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Writes page `index` (before the guest resumes).
    pub fn write_page(&self, index: u64, data: &[u8]) -> Result<(), DestMemoryError> {
        self.check(index, 1, data.len())?;
        self.file
            .write_all_at(data, index * self.page_size as u64)
            .map_err(|source| self.error("pwrite", source))
    }

    /// Turns pages `first..first + count` back into a hole (they read as
    /// zeros, and in post-copy fault as missing).
    pub fn punch(&self, first: u64, count: u64) -> Result<(), DestMemoryError> {
        self.check(first, count, self.page_size)?;
        let ps = self.page_size as i64;
        // SAFETY: fallocate on a descriptor we own; no memory is passed.
        let rc = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&self.file),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                first as i64 * ps,
                count as i64 * ps,
            )
        };
        if rc != 0 {
            return Err(self.error("punch hole", io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Reads page `index` (holes read as zeros).
    pub fn read_page(&self, index: u64, out: &mut [u8]) -> Result<(), DestMemoryError> {
        self.check(index, 1, out.len())?;
        self.file
            .read_exact_at(out, index * self.page_size as u64)
            .map_err(|source| self.error("pread", source))
    }

    /// Pages `first..first + count` lie in the file, and a buffer of `len`
    /// bytes is one page.
    fn check(&self, first: u64, count: u64, len: usize) -> Result<(), DestMemoryError> {
        let end = first.saturating_add(count);
        if end > self.pages {
            return Err(DestMemoryError::OutOfRange {
                path: self.path.clone(),
                first,
                end,
                pages: self.pages,
            });
        }
        if len != self.page_size {
            return Err(DestMemoryError::BadLength {
                path: self.path.clone(),
                len,
                page_size: self.page_size,
            });
        }
        Ok(())
    }

    fn error(&self, op: &'static str, source: io::Error) -> DestMemoryError {
        DestMemoryError::Io {
            path: self.path.clone(),
            op,
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_round_trip_and_holes_read_as_zero() {
        let p = PathBuf::from(format!(
            "/dev/shm/wanmig-test-dstmem-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&p);
        let m = DestMemory::create(&p, 4096, 16).unwrap();
        assert!(
            DestMemory::create(&p, 4096, 16).is_err(),
            "an existing file must not be reused"
        );
        m.write_page(5, &[7u8; 4096]).unwrap();
        let mut out = vec![1u8; 4096];
        m.read_page(5, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 7));
        m.read_page(6, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        m.punch(5, 1).unwrap();
        m.read_page(5, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
        // Nothing outside the file, and only whole pages.
        let out_of_range = |r| matches!(r, Err(DestMemoryError::OutOfRange { .. }));
        assert!(out_of_range(m.write_page(16, &[7u8; 4096])));
        assert!(out_of_range(m.read_page(u64::MAX, &mut out)));
        assert!(out_of_range(m.punch(15, 2)));
        assert!(out_of_range(m.punch(1, u64::MAX)));
        assert!(matches!(
            m.write_page(3, &[7u8; 100]),
            Err(DestMemoryError::BadLength { len: 100, .. })
        ));
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 16 * 4096);
        let mode = std::fs::metadata(&p).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::remove_file(&p).unwrap();
    }
}
