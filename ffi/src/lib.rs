//! wanmig's QEMU preload library.
//!
//! This crate builds `libwanmig_ffi.so` (`LD_PRELOAD` into QEMU), which
//! wraps `mmap`/`mmap64` in QEMU and hands the engine a userfaultfd for the
//! guest-RAM mapping (source: asynchronous write-protect for the dirty log;
//! destination: missing-page faults for post-copy). See `ffi/README.md` for
//! its environment variables, failure policy and use with QEMU.
//!
//! The toolstack library for Xen (`libwanmig.so`, the C ABI in
//! `ffi/include/wanmig.h`) is a separate crate, `ffi/capi`: a library that
//! interposes `mmap` must never be loaded into `libxl-save-helper`.
//!
//! The `rlib` carries [`proto`], the registration message the preload library
//! sends, so the engine decodes exactly what the library encodes. Linking the
//! `rlib` into a program is harmless: the `mmap` wrappers only act inside the
//! preloaded shared object and merely forward anywhere else.
//!
//! # What the preload library does
//! For every successful `MAP_SHARED` file mapping whose path (read with
//! `readlink("/proc/self/fd/N")`) starts with [`ENV_PREFIX`] (default
//! [`DEFAULT_PREFIX`]), before `mmap` returns to QEMU it:
//! 1. creates a userfaultfd (`O_CLOEXEC | O_NONBLOCK`; the system call, else
//!    `/dev/userfaultfd`), negotiates `UFFDIO_API` and registers the whole
//!    mapping in the mode [`ENV_UFFD_MODE`] names ([`proto::UffdMode`]);
//! 2. connects to the unix socket [`ENV_UFFD_SOCK`], sends a
//!    [`proto::RegistrationMsg`] with the userfaultfd attached (`SCM_RIGHTS`)
//!    and blocks until the engine answers one byte;
//! 3. returns the mapping if the answer is [`proto::ACK_ACCEPT`].
//!
//! Any failure after a mapping matched (a variable missing or wrong, no
//! userfaultfd, the registration refused by the kernel, no engine, a refusal,
//! end of file) prints one line naming the cause on stderr and calls `abort()`.
//!
//! The library keeps its own copy of the userfaultfd open for the life of the
//! process. If the engine dies, a thread faulting on the range then blocks
//! (missing mode) instead of the kernel filling the page with zeros, which it
//! would do once the last descriptor of the userfaultfd is closed.

mod diag;
mod preload;
pub use wanmig_preload_proto as proto;
mod uffd_sys;

/// Environment variable: the path prefix of guest-RAM files to register.
pub const ENV_PREFIX: &str = "WANMIG_PREFIX";
/// The prefix used when [`ENV_PREFIX`] is unset.
pub const DEFAULT_PREFIX: &str = "/dev/shm/wanmig-";
/// Environment variable: the engine's unix socket for registrations, or
/// `attach`: register the mapping, keep the userfaultfd, and go on (an
/// engine started later takes a copy with `pidfd_getfd(2)`; see
/// `wanmig source --attach-qmp`).
pub const ENV_UFFD_SOCK: &str = "WANMIG_UFFD_SOCK";
/// Environment variable: the registration mode, one of `wp-async`, `missing`,
/// `missing+wp-async` ([`proto::UffdMode::env_value`]).
pub const ENV_UFFD_MODE: &str = "WANMIG_UFFD_MODE";
