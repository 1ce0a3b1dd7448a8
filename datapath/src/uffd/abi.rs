//! The raw kernel ABI used by [`super`]: `include/uapi/linux/userfaultfd.h`
//! and the `PAGEMAP_SCAN` part of `include/uapi/linux/fs.h` (Linux 6.7+).
//!
//! Nothing here is wrapped: structs mirror the C layout field for field, and
//! every ioctl number is computed from its `_IO`/`_IOR`/`_IOWR` encoding *and*
//! checked at compile time against the value the C headers produce, as are
//! the sizes of the structs (a transposed direction bit or a wrong struct size
//! fails the build, not the kernel call). `PAGEMAP_SCAN` and the newer
//! `UFFD_FEATURE_*` bits are in no Rust crate (and not in Debian bookworm's
//! 6.1 headers), which is why the values are spelled out.
//!
//! All structs derive zerocopy's traits so they can be viewed as bytes (for
//! `read(2)` into a message buffer) without `unsafe`.

#![allow(non_camel_case_types)]

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

// The encoding below is asm-generic's (x86, arm64, riscv, s390, loongarch).
#[cfg(any(
    target_arch = "powerpc",
    target_arch = "powerpc64",
    target_arch = "mips",
    target_arch = "mips64",
    target_arch = "sparc",
    target_arch = "sparc64"
))]
compile_error!("uffd::abi encodes ioctl numbers the asm-generic way; this architecture differs");

const IOC_NRBITS: u32 = 8;
const IOC_TYPEBITS: u32 = 8;
const IOC_SIZEBITS: u32 = 14;
const IOC_NRSHIFT: u32 = 0;
const IOC_TYPESHIFT: u32 = IOC_NRSHIFT + IOC_NRBITS;
const IOC_SIZESHIFT: u32 = IOC_TYPESHIFT + IOC_TYPEBITS;
const IOC_DIRSHIFT: u32 = IOC_SIZESHIFT + IOC_SIZEBITS;
const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// `_IOC(dir, type, nr, size)`.
const fn ioc(dir: u32, ty: u8, nr: u8, size: usize) -> u32 {
    assert!(size < (1 << IOC_SIZEBITS), "ioctl argument too large");
    (dir << IOC_DIRSHIFT)
        | ((ty as u32) << IOC_TYPESHIFT)
        | ((nr as u32) << IOC_NRSHIFT)
        | ((size as u32) << IOC_SIZESHIFT)
}
/// `_IO(type, nr)`.
const fn io(ty: u8, nr: u8) -> u32 {
    ioc(IOC_NONE, ty, nr, 0)
}
/// `_IOR(type, nr, T)`.
const fn ior<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ, ty, nr, size_of::<T>())
}
/// `_IOWR(type, nr, T)`.
const fn iowr<T>(ty: u8, nr: u8) -> u32 {
    ioc(IOC_READ | IOC_WRITE, ty, nr, size_of::<T>())
}

// ---------------------------------------------------------------------------
// userfaultfd

/// ioctl type of every userfaultfd ioctl (`UFFDIO`, `USERFAULTFD_IOC`).
const UFFDIO: u8 = 0xAA;

/// `UFFD_API`: the only API version.
pub const UFFD_API: u64 = 0xAA;

/// `USERFAULTFD_IOC_NEW`, on `/dev/userfaultfd`: returns a new userfaultfd;
/// the argument is the flags of `userfaultfd(2)`.
pub const USERFAULTFD_IOC_NEW: u32 = io(UFFDIO, 0x00);

/// `_UFFDIO_*` ioctl numbers (also the bit positions in `ioctls` masks).
pub const _UFFDIO_REGISTER: u8 = 0x00;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_UNREGISTER: u8 = 0x01;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_WAKE: u8 = 0x02;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_COPY: u8 = 0x03;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_ZEROPAGE: u8 = 0x04;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_MOVE: u8 = 0x05;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_WRITEPROTECT: u8 = 0x06;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_CONTINUE: u8 = 0x07;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_POISON: u8 = 0x08;
/// See [`_UFFDIO_REGISTER`].
pub const _UFFDIO_API: u8 = 0x3F;

/// `UFFDIO_API`: negotiate the API and features (once per userfaultfd).
pub const UFFDIO_API: u32 = iowr::<uffdio_api>(UFFDIO, _UFFDIO_API);
/// `UFFDIO_REGISTER`: register a range of the fd's address space.
pub const UFFDIO_REGISTER: u32 = iowr::<uffdio_register>(UFFDIO, _UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`.
pub const UFFDIO_UNREGISTER: u32 = ior::<uffdio_range>(UFFDIO, _UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`: wake threads blocked on faults in a range.
pub const UFFDIO_WAKE: u32 = ior::<uffdio_range>(UFFDIO, _UFFDIO_WAKE);
/// `UFFDIO_COPY`: atomically fill missing pages from a local buffer.
pub const UFFDIO_COPY: u32 = iowr::<uffdio_copy>(UFFDIO, _UFFDIO_COPY);
/// `UFFDIO_ZEROPAGE`: atomically fill missing pages with zeros.
pub const UFFDIO_ZEROPAGE: u32 = iowr::<uffdio_zeropage>(UFFDIO, _UFFDIO_ZEROPAGE);
/// `UFFDIO_WRITEPROTECT`: set or clear write protection on a range.
pub const UFFDIO_WRITEPROTECT: u32 = iowr::<uffdio_writeprotect>(UFFDIO, _UFFDIO_WRITEPROTECT);
/// `UFFDIO_CONTINUE`: map pages already in the page cache (MINOR faults).
pub const UFFDIO_CONTINUE: u32 = iowr::<uffdio_continue>(UFFDIO, _UFFDIO_CONTINUE);

// The values the C headers produce (checked with gcc against linux-libc-dev).
const _: () = assert!(USERFAULTFD_IOC_NEW == 0x0000_aa00);
const _: () = assert!(UFFDIO_API == 0xc018_aa3f);
const _: () = assert!(UFFDIO_REGISTER == 0xc020_aa00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_aa01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_aa02);
const _: () = assert!(UFFDIO_COPY == 0xc028_aa03);
const _: () = assert!(UFFDIO_ZEROPAGE == 0xc020_aa04);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xc018_aa06);
const _: () = assert!(UFFDIO_CONTINUE == 0xc020_aa07);

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFDIO_COPY_MODE_DONTWAKE`.
pub const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_COPY_MODE_WP`: install the pages write-protected.
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_ZEROPAGE_MODE_DONTWAKE`.
pub const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (absent: unprotect).
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
pub const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP`: map the pages write-protected.
pub const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_EVENT_FORK`.
pub const UFFD_EVENT_FORK: u8 = 0x13;
/// `UFFD_EVENT_REMAP`.
pub const UFFD_EVENT_REMAP: u8 = 0x14;
/// `UFFD_EVENT_REMOVE`.
pub const UFFD_EVENT_REMOVE: u8 = 0x15;
/// `UFFD_EVENT_UNMAP`.
pub const UFFD_EVENT_UNMAP: u8 = 0x16;

/// `UFFD_PAGEFAULT_FLAG_WRITE`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`.
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `UFFD_PAGEFAULT_FLAG_MINOR`.
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// `UFFD_FEATURE_PAGEFAULT_FLAG_WP`.
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// `UFFD_FEATURE_EVENT_FORK`.
pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
/// `UFFD_FEATURE_EVENT_REMAP`.
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
/// `UFFD_FEATURE_EVENT_REMOVE`.
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
/// `UFFD_FEATURE_MISSING_HUGETLBFS`.
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
/// `UFFD_FEATURE_MISSING_SHMEM`.
pub const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_EVENT_UNMAP`.
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
/// `UFFD_FEATURE_SIGBUS`.
pub const UFFD_FEATURE_SIGBUS: u64 = 1 << 7;
/// `UFFD_FEATURE_THREAD_ID`.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// `UFFD_FEATURE_MINOR_HUGETLBFS`.
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// `UFFD_FEATURE_MINOR_SHMEM`.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_EXACT_ADDRESS`.
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (6.4+).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// `UFFD_FEATURE_POISON` (6.6+).
pub const UFFD_FEATURE_POISON: u64 = 1 << 14;
/// `UFFD_FEATURE_WP_ASYNC` (6.7+).
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
/// `UFFD_FEATURE_MOVE` (6.8+).
pub const UFFD_FEATURE_MOVE: u64 = 1 << 16;

/// `struct uffd_msg` (`__packed` in C; its fields are naturally aligned, so
/// the layout is the same). `arg` is the union, kept as bytes and decoded by
/// event type through the `UffdMsg*` views below.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffd_msg {
    /// `UFFD_EVENT_*`.
    pub event: u8,
    /// Reserved.
    pub reserved1: u8,
    /// Reserved.
    pub reserved2: u16,
    /// Reserved.
    pub reserved3: u32,
    /// The union `arg`.
    pub arg: [u8; 24],
}

/// `uffd_msg.arg.pagefault`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffd_msg_pagefault {
    /// `UFFD_PAGEFAULT_FLAG_*`.
    pub flags: u64,
    /// Faulting address (page-aligned unless `UFFD_FEATURE_EXACT_ADDRESS`).
    pub address: u64,
    /// `feat.ptid`: faulting thread id with `UFFD_FEATURE_THREAD_ID`, else 0.
    pub ptid: u32,
    /// Rest of the union.
    pub pad: u32,
}

/// `uffd_msg.arg.fork`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffd_msg_fork {
    /// The child's new userfaultfd, installed in the reader's fd table.
    pub ufd: u32,
    /// Rest of the union.
    pub pad: [u32; 5],
}

/// `uffd_msg.arg.remap`.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffd_msg_remap {
    /// Old address.
    pub from: u64,
    /// New address.
    pub to: u64,
    /// Length.
    pub len: u64,
}

/// `uffd_msg.arg.remove` (also used by `UFFD_EVENT_UNMAP`).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffd_msg_remove {
    /// Start of the range.
    pub start: u64,
    /// End of the range (exclusive).
    pub end: u64,
    /// Rest of the union.
    pub pad: u64,
}

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_api {
    /// Must be [`UFFD_API`].
    pub api: u64,
    /// In: requested features; out: all features the kernel offers.
    pub features: u64,
    /// Out: `1 << _UFFDIO_*` of the fd-level ioctls.
    pub ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_range {
    /// Start address.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_register {
    /// Range to register.
    pub range: uffdio_range,
    /// `UFFDIO_REGISTER_MODE_*`.
    pub mode: u64,
    /// Out: `1 << _UFFDIO_*` of the ioctls allowed on the range.
    pub ioctls: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_copy {
    /// Destination (in the registered address space).
    pub dst: u64,
    /// Source (in the caller's address space).
    pub src: u64,
    /// Length in bytes.
    pub len: u64,
    /// `UFFDIO_COPY_MODE_*`.
    pub mode: u64,
    /// Out: bytes copied, or a negative errno.
    pub copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_zeropage {
    /// Range to fill.
    pub range: uffdio_range,
    /// `UFFDIO_ZEROPAGE_MODE_*`.
    pub mode: u64,
    /// Out: bytes filled, or a negative errno.
    pub zeropage: i64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_writeprotect {
    /// Range.
    pub range: uffdio_range,
    /// `UFFDIO_WRITEPROTECT_MODE_*`.
    pub mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct uffdio_continue {
    /// Range to map.
    pub range: uffdio_range,
    /// `UFFDIO_CONTINUE_MODE_*`.
    pub mode: u64,
    /// Out: bytes mapped, or a negative errno.
    pub mapped: i64,
}

const _: () = assert!(size_of::<uffd_msg>() == 32);
const _: () = assert!(size_of::<uffd_msg_pagefault>() == 24);
const _: () = assert!(size_of::<uffd_msg_fork>() == 24);
const _: () = assert!(size_of::<uffd_msg_remap>() == 24);
const _: () = assert!(size_of::<uffd_msg_remove>() == 24);
const _: () = assert!(std::mem::offset_of!(uffd_msg, arg) == 8);
const _: () = assert!(size_of::<uffdio_api>() == 24);
const _: () = assert!(size_of::<uffdio_range>() == 16);
const _: () = assert!(size_of::<uffdio_register>() == 32);
const _: () = assert!(size_of::<uffdio_copy>() == 40);
const _: () = assert!(std::mem::offset_of!(uffdio_copy, copy) == 32);
const _: () = assert!(size_of::<uffdio_zeropage>() == 32);
const _: () = assert!(size_of::<uffdio_writeprotect>() == 24);
const _: () = assert!(size_of::<uffdio_continue>() == 32);

// ---------------------------------------------------------------------------
// PAGEMAP_SCAN (linux/fs.h, 6.7+)

/// `PAGE_IS_WPALLOWED`: the VMA allows async write-protect.
pub const PAGE_IS_WPALLOWED: u64 = 1 << 0;
/// `PAGE_IS_WRITTEN`: the PTE carries no uffd-wp bit or marker.
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;
/// `PAGE_IS_FILE`.
pub const PAGE_IS_FILE: u64 = 1 << 2;
/// `PAGE_IS_PRESENT`.
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_SWAPPED`.
pub const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// `PAGE_IS_PFNZERO`.
pub const PAGE_IS_PFNZERO: u64 = 1 << 5;
/// `PAGE_IS_HUGE`.
pub const PAGE_IS_HUGE: u64 = 1 << 6;
/// `PAGE_IS_SOFT_DIRTY`.
pub const PAGE_IS_SOFT_DIRTY: u64 = 1 << 7;
/// `PAGE_IS_GUARD` (6.14+).
pub const PAGE_IS_GUARD: u64 = 1 << 8;

/// `PM_SCAN_WP_MATCHING`: write-protect the matching pages as they are reported.
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// `PM_SCAN_CHECK_WPASYNC`: fail with `EPERM` unless every VMA of the range
/// is registered for async write-protect.
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;

/// `struct page_region`: one run of pages with the same categories.
#[repr(C)]
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
pub struct page_region {
    /// Start address.
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// `PAGE_IS_*` categories (masked by `return_mask`).
    pub categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, FromBytes, IntoBytes, Immutable, KnownLayout)]
pub struct pm_scan_arg {
    /// `sizeof(struct pm_scan_arg)`.
    pub size: u64,
    /// `PM_SCAN_*`.
    pub flags: u64,
    /// Start address (page-aligned).
    pub start: u64,
    /// End address (exclusive).
    pub end: u64,
    /// Out: where the walk stopped (see the quirk in `pagemap.rs`).
    pub walk_end: u64,
    /// Pointer to a `page_region` array.
    pub vec: u64,
    /// Entries in `vec`.
    pub vec_len: u64,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// Categories to invert before matching.
    pub category_inverted: u64,
    /// All of these categories must be set.
    pub category_mask: u64,
    /// At least one of these (if non-zero).
    pub category_anyof_mask: u64,
    /// Categories reported in `page_region.categories`.
    pub return_mask: u64,
}

/// `PAGEMAP_SCAN = _IOWR('f', 16, struct pm_scan_arg)`, on `/proc/<pid>/pagemap`.
pub const PAGEMAP_SCAN: u32 = iowr::<pm_scan_arg>(b'f', 16);

const _: () = assert!(size_of::<page_region>() == 24);
const _: () = assert!(size_of::<pm_scan_arg>() == 96);
const _: () = assert!(PAGEMAP_SCAN == 0xc060_6610);

/// The type `libc::ioctl` takes its request number as.
pub type IoctlRequest = libc::Ioctl;

/// Converts a request number to [`IoctlRequest`] (lossless: every number
/// here fits in 32 bits, and `Ioctl` is `c_ulong` on glibc or `c_int` on musl,
/// where the kernel reads only the low 32 bits).
pub const fn request(nr: u32) -> IoctlRequest {
    nr as IoctlRequest
}
