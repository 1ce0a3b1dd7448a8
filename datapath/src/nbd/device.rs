//! What an NBD export serves: a [`BlockDevice`], and [`FileImage`], the one
//! backed by a raw image file or a block device (reads and writes through
//! io_uring where the kernel has it, `pread`/`pwrite` otherwise).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// A block device operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} at byte {offset} (+{len}) of {image}")]
pub struct DeviceError {
    /// The operation.
    pub op: &'static str,
    /// Its offset.
    pub offset: u64,
    /// Its length.
    pub len: u64,
    /// The image.
    pub image: String,
    /// The error.
    #[source]
    pub source: std::io::Error,
}

impl DeviceError {
    /// True if the device is out of space (answered `ENOSPC`, not `EIO`).
    pub fn is_no_space(&self) -> bool {
        self.source.raw_os_error() == Some(libc::ENOSPC)
    }
}

/// The storage behind an NBD export. Offsets and lengths have been checked
/// against [`size`](Self::size) by the caller. Implementations are shared by
/// every connection of an export, hence `&self` and `Sync`.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Writes are refused with `EPERM`.
    fn read_only(&self) -> bool {
        false
    }
    /// Fills `buf` from `offset`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
    /// Writes `data` at `offset`; with `fua` it is durable on return.
    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError>;
    /// Makes every acknowledged write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// Discards `len` bytes at `offset` (they may read back as anything; this
    /// implementation's read back as zeros).
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError>;
    /// Zeroes `len` bytes at `offset`; `may_punch`: a hole will do.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), DeviceError>;
    /// The byte ranges `(offset, len)` that may hold data, in order; the
    /// rest reads as zeros. `None`: the device cannot tell (all may).
    fn data_extents(&self) -> Result<Option<Vec<(u64, u64)>>, DeviceError> {
        Ok(None)
    }
}

/// A raw image file or a block device, read and written in place.
#[derive(Debug)]
pub struct FileImage {
    file: File,
    path: PathBuf,
    size: u64,
    read_only: bool,
    block_device: bool,
    /// Reads and writes go through io_uring (else `pread`/`pwrite`).
    uring: bool,
}

/// `BLKGETSIZE64`: `_IOR(0x12, 114, size_t)`.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `BLKDISCARD`: `_IO(0x12, 119)`.
const BLKDISCARD: libc::c_ulong = 0x1277;
/// `BLKZEROOUT`: `_IO(0x12, 127)`.
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl FileImage {
    /// Opens `path` (a regular file or a block device).
    pub fn open(path: &Path, read_only: bool) -> std::io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        let meta = file.metadata()?;
        let block_device = meta.file_type().is_block_device();
        let size = if block_device {
            let mut size: u64 = 0;
            // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which
            // points at a live local.
            let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            size
        } else if meta.is_file() {
            meta.len()
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("{} is neither a file nor a block device", path.display()),
            ));
        };
        Ok(FileImage {
            file,
            path: path.to_path_buf(),
            size,
            read_only,
            block_device,
            uring: super::uring_io::available(),
        })
    }

    /// Uses io_uring for reads and writes (`true`, the default where the
    /// kernel has it) or `pread`/`pwrite`.
    pub fn with_uring(mut self, on: bool) -> Self {
        self.uring = on && super::uring_io::available();
        self
    }

    /// True if reads and writes go through io_uring.
    pub fn uses_uring(&self) -> bool {
        self.uring
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
    ) -> impl FnOnce(std::io::Error) -> DeviceError {
        let image = self.path.display().to_string();
        move |source| DeviceError {
            op,
            offset,
            len,
            image,
            source,
        }
    }

    fn datasync(&self, op: &'static str, offset: u64, len: u64) -> Result<(), DeviceError> {
        self.file.sync_data().map_err(self.err(op, offset, len))
    }

    /// `fallocate(mode)` on a file, an ioctl on a block device.
    fn deallocate(&self, offset: u64, len: u64, punch: bool) -> std::io::Result<()> {
        let fd = self.file.as_raw_fd();
        if self.block_device {
            let range = [offset, len];
            let op = if punch { BLKDISCARD } else { BLKZEROOUT };
            // SAFETY: both ioctls read two u64s through the pointer, which
            // points at a live local array.
            let r = unsafe { libc::ioctl(fd, op, range.as_ptr()) };
            return if r < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            };
        }
        let mode = if punch {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        // SAFETY: fallocate takes plain integers; the fd is open.
        let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// `lseek(SEEK_DATA / SEEK_HOLE)` from `offset`; `None` at the end.
    fn seek(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        // SAFETY: lseek takes plain integers; the fd is open.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            // No data at or after offset.
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    fn write_zero_bytes(&self, offset: u64, len: u64) -> std::io::Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }
}

impl BlockDevice for FileImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len() as u64;
        if self.uring {
            super::uring_io::read_exact_at(self.file.as_raw_fd(), buf, offset)
        } else {
            self.file.read_exact_at(buf, offset)
        }
        .map_err(self.err("read", offset, len))
    }

    fn write_at(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), DeviceError> {
        let len = data.len() as u64;
        if self.uring {
            super::uring_io::write_all_at(self.file.as_raw_fd(), data, offset)
        } else {
            self.file.write_all_at(data, offset)
        }
        .map_err(self.err("write", offset, len))?;
        if fua {
            self.datasync("write (FUA)", offset, len)?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), DeviceError> {
        self.datasync("flush", 0, 0)
    }

    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), DeviceError> {
        match self.deallocate(offset, len, true) {
            Ok(()) => {}
            // A discard is advisory: a device that cannot keeps the data.
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            Err(e) => return Err(self.err("trim", offset, len)(e)),
        }
        if fua {
            self.datasync("trim (FUA)", offset, len)?;
        }
        Ok(())
    }

    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_punch: bool,
        fua: bool,
    ) -> Result<(), DeviceError> {
        // A punched hole reads as zeros on files; BLKDISCARD need not zero.
        let punch = may_punch && !self.block_device;
        match self.deallocate(offset, len, punch) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => self
                .write_zero_bytes(offset, len)
                .map_err(self.err("write zeroes", offset, len))?,
            Err(e) => return Err(self.err("write zeroes", offset, len)(e)),
        }
        if fua {
            self.datasync("write zeroes (FUA)", offset, len)?;
        }
        Ok(())
    }

    fn data_extents(&self) -> Result<Option<Vec<(u64, u64)>>, DeviceError> {
        if self.block_device {
            return Ok(None);
        }
        let err = self.err("finding data extents", 0, self.size);
        let mut out = Vec::new();
        let mut at = 0;
        while at < self.size {
            let data = match self.seek(at, libc::SEEK_DATA) {
                Ok(Some(d)) if d < self.size => d,
                Ok(_) => break,
                // A file system without SEEK_DATA: no holes known.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && at == 0 => return Ok(None),
                Err(e) => return Err(err(e)),
            };
            let hole = match self.seek(data, libc::SEEK_HOLE) {
                Ok(Some(h)) => h.min(self.size),
                Ok(None) => self.size,
                Err(e) => return Err(err(e)),
            };
            out.push((data, hole - data));
            at = hole;
        }
        Ok(Some(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64) -> (tempfile_path::TempPath, FileImage) {
        let p = tempfile_path::TempPath::new("image");
        let f = File::create(&p.0).unwrap();
        f.set_len(len).unwrap();
        let img = FileImage::open(&p.0, false).unwrap();
        (p, img)
    }

    /// A file under the temp directory removed when dropped.
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl TempPath {
            pub fn new(tag: &str) -> Self {
                static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
                let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                TempPath(
                    std::env::temp_dir()
                        .join(format!("wanmig-nbd-{tag}-{}-{n}", std::process::id())),
                )
            }
        }
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn writes_read_back_and_zeroes_and_trims_read_as_zeros() {
        let (_p, img) = image(1 << 20);
        assert_eq!(img.size(), 1 << 20);
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8 + 1).collect();
        img.write_at(4096, &data, true).unwrap();
        let mut back = vec![0u8; data.len()];
        img.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);

        img.write_zeroes(8192, 4096, false, false).unwrap();
        img.trim(16384, 8192, true).unwrap();
        img.read_at(4096, &mut back).unwrap();
        for (i, (&b, &d)) in back.iter().zip(&data).enumerate() {
            let at = 4096 + i as u64;
            let zeroed = (8192..12288).contains(&at) || (16384..24576).contains(&at);
            assert_eq!(b, if zeroed { 0 } else { d }, "byte {at}");
        }
        img.flush().unwrap();
    }

    #[test]
    fn io_uring_and_pread_paths_read_and_write_the_same_bytes() {
        let (_p, img) = image(1 << 20);
        let uring = img.with_uring(true);
        assert_eq!(uring.uses_uring(), super::super::uring_io::available());
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 253) as u8).collect();
        uring.write_at(12345, &data, false).unwrap();
        let plain = FileImage::open(uring.path(), false)
            .unwrap()
            .with_uring(false);
        let mut back = vec![0u8; data.len()];
        plain.read_at(12345, &mut back).unwrap();
        assert_eq!(back, data);
        let mut again = vec![0u8; data.len()];
        uring.read_at(12345, &mut again).unwrap();
        assert_eq!(again, data);
        let e = uring.read_at((1 << 20) - 10, &mut again[..20]).unwrap_err();
        assert_eq!(e.source.kind(), std::io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn a_read_past_the_end_of_the_file_is_an_error_with_context() {
        let (_p, img) = image(4096);
        let mut buf = vec![0u8; 8192];
        let e = img.read_at(0, &mut buf).unwrap_err();
        assert_eq!(e.op, "read");
        assert!(e.to_string().contains("byte 0 (+8192)"), "{e}");
    }

    #[test]
    fn a_directory_is_refused() {
        let e = FileImage::open(&std::env::temp_dir(), true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
    }

    #[test]
    fn data_extents_skip_the_holes_of_a_sparse_image() {
        let (_p, img) = image(64 << 20);
        assert_eq!(img.data_extents().unwrap(), Some(vec![]), "all hole");
        img.write_at(8 << 20, &[1u8; 4096], false).unwrap();
        img.write_at(40 << 20, &[2u8; 8192], false).unwrap();
        let e = img.data_extents().unwrap().unwrap();
        // The file system may allocate more than was written, never less.
        assert_eq!(e.len(), 2, "{e:?}");
        for (want, len) in [(8u64 << 20, 4096u64), (40 << 20, 8192)] {
            assert!(
                e.iter().any(|&(o, l)| o <= want && o + l >= want + len),
                "{want} not covered: {e:?}"
            );
        }
        assert!(e.iter().all(|&(o, l)| l > 0 && o + l <= 64 << 20), "{e:?}");
    }
}
