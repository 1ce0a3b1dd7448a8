//! wanmig's C ABI.
//!
//! This crate builds the shared libraries that put wanmig inside other
//! programs:
//!
//! - the QEMU preload library (`LD_PRELOAD`), which wraps `mmap` in QEMU and
//!   hands the engine a userfaultfd for the guest-RAM mapping (source:
//!   write-protect for the dirty log; destination: missing-page faults for
//!   post-copy). It arrives with the memory datapath.
//! - the hooks Xen's toolstack calls in place of libxenguest's save and restore
//!   loops (`xen-patches/` holds the patches that call them).
//!
//! Both are built here, in Rust, so that the unsafe surface facing C is in one
//! audited place.
