//! The QEMU backend (runs on any Linux host with QEMU ≥ 9; TCG or KVM).
//!
//! Guest RAM is a `memory-backend-file` on `/dev/shm` with `share=on`, and
//! both QEMUs have the migration capability `x-ignore-shared`, so QEMU's own
//! migration stream carries only device state, which the engine tunnels. The
//! preload library (`ffi/`) hands the engine the RAM mapping's userfaultfd:
//! write-protect async on the source (dirty log via `PAGEMAP_SCAN`), missing
//! pages plus write-protect async on the destination (post-copy faults, and
//! which pages the guest wrote after the resume). The destination is started
//! with `-incoming defer -S`, never with `prealloc` or `mem-lock`. Disks are
//! virtio-blk devices on NBD exports the engine serves ([`disks`]).

pub mod console;
pub mod dest;
pub mod devstate;
pub mod disks;
pub mod launch;
pub mod registration;
pub mod source;

pub use console::{Heartbeat, SerialLog};
pub use dest::{QemuDest, UffdInstaller};
pub use launch::{
    DEFAULT_GUEST_DIR, DiskSpec, GuestSpec, LaunchError, NativeLaunch, QemuPaths, QemuProcess,
    disk_args, locate_preload, native_disk_args, native_overlaid_disk_args,
};
pub use registration::{Registration, RegistrationFailure, RegistrationListener};
pub use source::QemuSource;

/// Backend name in errors.
const B: &str = "qemu";

/// Guest page size (x86-64 base pages).
pub const PAGE_SIZE: usize = 4096;
