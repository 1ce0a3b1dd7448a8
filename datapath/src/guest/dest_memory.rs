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
#[error("destination RAM file {path}: {op}")]
pub struct DestMemoryError {
    /// The file.
    pub path: PathBuf,
    /// What was being done.
    pub op: &'static str,
    /// The error.
    #[source]
    pub source: io::Error,
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
            move |source| DestMemoryError { path, op, source }
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
        debug_assert_eq!(data.len(), self.page_size);
        self.file
            .write_all_at(data, index * self.page_size as u64)
            .map_err(|source| self.error("pwrite", source))
    }

    /// Turns pages `first..first + count` back into a hole (they read as
    /// zeros, and in post-copy fault as missing).
    pub fn punch(&self, first: u64, count: u64) -> Result<(), DestMemoryError> {
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
        debug_assert_eq!(out.len(), self.page_size);
        self.file
            .read_exact_at(out, index * self.page_size as u64)
            .map_err(|source| self.error("pread", source))
    }

    fn error(&self, op: &'static str, source: io::Error) -> DestMemoryError {
        DestMemoryError {
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
        let mode = std::fs::metadata(&p).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
            0o600
        );
        std::fs::remove_file(&p).unwrap();
    }
}
