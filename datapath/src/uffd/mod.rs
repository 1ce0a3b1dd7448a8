//! The kernel interfaces of the memory datapath: userfaultfd, `PAGEMAP_SCAN`
//! and passing a userfaultfd between processes.
//!
//! The engine never maps guest RAM itself. QEMU maps it (a `MAP_SHARED` file
//! in `/dev/shm`), a preload library inside QEMU creates a userfaultfd for that
//! mapping and hands it to the engine over a unix socket ([`pass`]). From then
//! on the engine works on *QEMU's* address space through the fd:
//!
//! - destination, post-copy: [`Userfaultfd::read_events`] delivers missing-page
//!   faults; [`Userfaultfd::copy`] / [`Userfaultfd::zeropage`] install pages
//!   atomically (waking the faulting vCPU), the background push installs large
//!   batches through the same calls, and races between the two are resolved by
//!   [`CopyOutcome::skipped`] plus [`Userfaultfd::wake`];
//! - source, dirty log: the range is registered for async write-protect
//!   (`UFFD_FEATURE_WP_ASYNC`), [`pagemap::write_protect_all`] arms it once, and
//!   [`pagemap::PagemapScanner::scan_written_and_protect`] collects the pages
//!   written since the previous scan and re-arms them in one `PAGEMAP_SCAN`.
//!
//! Addresses in QEMU's address space are [`RemoteAddr`] / [`RemoteRange`]: the
//! engine only passes them to the kernel and never dereferences them, and the
//! types keep them apart from local pointers (the source of a copy is a local
//! `&[u8]`).
//!
//! Raw structs and ioctl numbers live in [`abi`], checked at compile time.

pub mod abi;
mod addr;
mod bitmap;
mod errno;
mod error;
mod event;
mod fd;
mod flags;
pub mod pagemap;
pub mod pass;
mod read_sampler;

pub use addr::{RemoteAddr, RemoteRange, page_size};
pub use errno::Errno;
pub use error::{
    AdoptError, ApiError, ContinueError, CopyError, CreateError, InspectError, PollError,
    ProbeError, ReadError, RegisterError, UnregisterError, WakeError, WriteProtectError,
    ZeropageError,
};
pub use event::Event;
pub use fd::{CopyOutcome, Userfaultfd};
pub use flags::{CopyFlags, Features, Ioctls, Mode};
pub use pagemap::{
    BitmapError, DirtyBitmap, PagemapScanner, ScanError, ScanOpenError, ScanStats,
    write_protect_all,
};
pub use pass::{RecvFdError, SendFdError, recv_fd, send_fd};
pub use read_sampler::{ReadSampleError, ReadSampleStats, ReadSampler};
