//! The slice of the userfaultfd ABI (`linux/userfaultfd.h`) the preload
//! library needs. No Rust crate carries it; the ioctl numbers are computed
//! from the struct sizes and checked against the kernel header's values at
//! compile time.

use libc::Ioctl;

/// `UFFD_API`.
pub(crate) const UFFD_API: u64 = 0xAA;

const UFFDIO: u64 = 0xAA;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

const fn iowr(nr: u64, size: usize) -> Ioctl {
    (((IOC_READ | IOC_WRITE) << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr) as Ioctl
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

/// `UFFDIO_API`.
pub(crate) const UFFDIO_API: Ioctl = iowr(0x3F, core::mem::size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`.
pub(crate) const UFFDIO_REGISTER: Ioctl = iowr(0x00, core::mem::size_of::<UffdioRegister>());
/// `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd` (`_IO(0xAA, 0x00)`).
pub(crate) const USERFAULTFD_IOC_NEW: Ioctl = (UFFDIO << 8) as Ioctl;

// The values `linux/userfaultfd.h` gives on x86_64 and arm64.
const _: () = assert!(core::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(core::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(USERFAULTFD_IOC_NEW == 0xaa00);
