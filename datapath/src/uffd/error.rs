//! One error type per userfaultfd operation, each carrying the operation's
//! context (range, mode, errno) and, for the page-installing ioctls, how much
//! was done before the failure.

use std::os::fd::RawFd;
use std::path::PathBuf;

use super::{CopyOutcome, Errno, Features, Mode, RemoteRange};

/// Creating a userfaultfd ([`Userfaultfd::create`](super::Userfaultfd::create)).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    /// Both ways failed: the `userfaultfd(2)` system call (`EPERM` without
    /// `CAP_SYS_PTRACE` when `vm.unprivileged_userfaultfd` is 0) and
    /// `/dev/userfaultfd` (needs read-write access to the node).
    #[error(
        "no userfaultfd: userfaultfd(2) failed ({syscall}) and so did {op} on /dev/userfaultfd ({device})"
    )]
    Unavailable {
        /// errno of the system call.
        syscall: Errno,
        /// The step of the device fallback that failed (`open`, `USERFAULTFD_IOC_NEW`).
        op: &'static str,
        /// Its errno.
        device: Errno,
    },
    /// The `/dev/userfaultfd` path alone
    /// ([`Userfaultfd::create_via_device`](super::Userfaultfd::create_via_device)).
    #[error("{op} on /dev/userfaultfd failed: {errno}")]
    Device {
        /// `open` or `USERFAULTFD_IOC_NEW`.
        op: &'static str,
        /// errno.
        errno: Errno,
    },
}

/// Reading `/proc/self/fd*` about a descriptor.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The proc file could not be read.
    #[error("cannot read {path:?}: {errno}")]
    Io {
        /// The proc path.
        path: PathBuf,
        /// errno.
        errno: Errno,
    },
    /// The proc file did not have the expected form.
    #[error("unexpected content in {path:?}: {detail}")]
    Parse {
        /// The proc path.
        path: PathBuf,
        /// What was wrong.
        detail: String,
    },
}

/// Adopting a received descriptor
/// ([`Userfaultfd::from_owned_fd`](super::Userfaultfd::from_owned_fd)).
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// The descriptor is something else (a pipe, a socket, a file...).
    #[error("fd {fd} is not a userfaultfd: it is {kind:?}")]
    NotUserfaultfd {
        /// The descriptor number (already closed when this is returned).
        fd: RawFd,
        /// What `/proc/self/fd/<fd>` says it is.
        kind: String,
    },
    /// The descriptor could not be inspected.
    #[error("cannot inspect fd {fd}")]
    Inspect {
        /// The descriptor number.
        fd: RawFd,
        /// Cause.
        source: InspectError,
    },
    /// Switching it to non-blocking mode failed.
    #[error("fcntl(O_NONBLOCK) on fd {fd}: {errno}")]
    Fcntl {
        /// The descriptor number.
        fd: RawFd,
        /// errno.
        errno: Errno,
    },
}

/// `UFFDIO_API` ([`Userfaultfd::api`](super::Userfaultfd::api)).
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The kernel does not offer some requested features.
    #[error(
        "UFFDIO_API: the kernel lacks requested features {missing} (requested {requested}; it offers {available})"
    )]
    Unsupported {
        /// What was asked for.
        requested: Features,
        /// What the kernel offers.
        available: Features,
        /// `requested - available`.
        missing: Features,
    },
    /// The API was already negotiated on this descriptor (it can be done once;
    /// a descriptor from QEMU's preload library always is): use
    /// [`Userfaultfd::negotiated_features`](super::Userfaultfd::negotiated_features).
    #[error("UFFDIO_API (features {requested}): already negotiated on this userfaultfd ({errno})")]
    AlreadyNegotiated {
        /// What was asked for.
        requested: Features,
        /// errno (`EINVAL`).
        errno: Errno,
    },
    /// A requested feature needs a capability (`EVENT_FORK`: `CAP_SYS_PTRACE`).
    #[error("UFFDIO_API (features {requested}): not permitted: {errno}")]
    Permission {
        /// What was asked for.
        requested: Features,
        /// errno (`EPERM`).
        errno: Errno,
    },
    /// Any other failure (`ENOTTY`: not a userfaultfd).
    #[error("UFFDIO_API (features {requested}): {errno}")]
    Os {
        /// What was asked for.
        requested: Features,
        /// errno.
        errno: Errno,
    },
}

/// Probing the kernel's features on a throwaway userfaultfd
/// ([`Userfaultfd::probe_features`](super::Userfaultfd::probe_features)).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No userfaultfd could be created.
    #[error(transparent)]
    Create(#[from] CreateError),
    /// `UFFDIO_API` failed on it.
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// `UFFDIO_REGISTER` ([`Userfaultfd::register`](super::Userfaultfd::register)).
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Start or length is not page-aligned (checked before the call).
    #[error("UFFDIO_REGISTER {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `EINVAL`: the mode does not fit the mapping (MINOR on anonymous memory,
    /// WP on a file mapping without WP-async...), or the API was not negotiated.
    #[error("UFFDIO_REGISTER {range} mode {mode}: refused for this mapping ({errno})")]
    Invalid {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// errno.
        errno: Errno,
    },
    /// `ENOMEM`: part of the range is not mapped in the target.
    #[error("UFFDIO_REGISTER {range} mode {mode}: part of the range is not mapped ({errno})")]
    NotMapped {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// errno.
        errno: Errno,
    },
    /// `EBUSY`: part of the range is registered with another userfaultfd.
    #[error("UFFDIO_REGISTER {range} mode {mode}: registered with another userfaultfd ({errno})")]
    Busy {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// errno.
        errno: Errno,
    },
    /// `EPERM`: a shared mapping whose file the target cannot write.
    #[error("UFFDIO_REGISTER {range} mode {mode}: not permitted ({errno})")]
    Permission {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// errno.
        errno: Errno,
    },
    /// `ESRCH`: the target process's address space is gone.
    #[error("UFFDIO_REGISTER {range}: the target address space is gone ({errno})")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// Any other failure.
    #[error("UFFDIO_REGISTER {range} mode {mode}: {errno}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// The mode asked for.
        mode: Mode,
        /// errno.
        errno: Errno,
    },
}

/// `UFFDIO_UNREGISTER` ([`Userfaultfd::unregister`](super::Userfaultfd::unregister)).
#[derive(Debug, thiserror::Error)]
pub enum UnregisterError {
    /// Start or length is not page-aligned (checked before the call).
    #[error("UFFDIO_UNREGISTER {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `ESRCH`: the target process's address space is gone.
    #[error("UFFDIO_UNREGISTER {range}: the target address space is gone ({errno})")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// `ENOMEM`: part of the range is not mapped, which is also what a target
    /// that has exited gives (its mappings are torn down before its
    /// address space can be detected as gone).
    #[error("UFFDIO_UNREGISTER {range}: part of the range is not mapped ({errno})")]
    NotMapped {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// Any other failure (`EINVAL`: a mapping of the range is not one
    /// userfaultfd can handle).
    #[error("UFFDIO_UNREGISTER {range}: {errno}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
}

/// `UFFDIO_WAKE` ([`Userfaultfd::wake`](super::Userfaultfd::wake)).
#[derive(Debug, thiserror::Error)]
pub enum WakeError {
    /// Start or length is not page-aligned (checked before the call).
    #[error("UFFDIO_WAKE {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// Any failure of the call.
    #[error("UFFDIO_WAKE {range}: {errno}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
}

/// `UFFDIO_WRITEPROTECT`
/// ([`Userfaultfd::write_protect`](super::Userfaultfd::write_protect)).
#[derive(Debug, thiserror::Error)]
pub enum WriteProtectError {
    /// Start or length is not page-aligned (checked before the call).
    #[error("UFFDIO_WRITEPROTECT {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `ENOENT`: part of the range is not registered in WP mode (or not mapped).
    #[error("UFFDIO_WRITEPROTECT {range} (wp={wp}): not registered for write-protect ({errno})")]
    NotRegistered {
        /// The range.
        range: RemoteRange,
        /// Protect (true) or unprotect.
        wp: bool,
        /// errno.
        errno: Errno,
    },
    /// `EAGAIN`: the target's mappings are changing (a non-cooperative event
    /// is pending); read the events, then retry.
    #[error("UFFDIO_WRITEPROTECT {range}: the target's mappings are changing; retry ({errno})")]
    MappingChanging {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// `ESRCH`: the target process's address space is gone.
    #[error("UFFDIO_WRITEPROTECT {range}: the target address space is gone ({errno})")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
    },
    /// Any other failure.
    #[error("UFFDIO_WRITEPROTECT {range} (wp={wp}): {errno}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// Protect (true) or unprotect.
        wp: bool,
        /// errno.
        errno: Errno,
    },
}

/// Reading events ([`Userfaultfd::read_events`](super::Userfaultfd::read_events)).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// `EINVAL`: `UFFDIO_API` has not been done on this descriptor.
    #[error("read(userfaultfd): API not negotiated yet ({errno})")]
    NotInitialized {
        /// errno.
        errno: Errno,
    },
    /// The kernel returned a byte count that is not a whole number of
    /// `uffd_msg` (never seen; reported rather than trusted).
    #[error("read(userfaultfd) returned {bytes} bytes, not a multiple of 32")]
    TruncatedMessage {
        /// Bytes returned.
        bytes: usize,
    },
    /// An event this code does not know. The known events of the same batch
    /// were still appended to the output.
    #[error(
        "read(userfaultfd): unknown event type {event:#x} ({unknown} unknown in a batch of {batch})"
    )]
    UnknownEvent {
        /// The first unknown `uffd_msg.event`.
        event: u8,
        /// Unknown messages in the batch.
        unknown: usize,
        /// Messages in the batch.
        batch: usize,
    },
    /// Any other failure.
    #[error("read(userfaultfd): {errno}")]
    Os {
        /// errno.
        errno: Errno,
    },
}

/// Waiting for events ([`Userfaultfd::poll_readable`](super::Userfaultfd::poll_readable)).
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// `POLLERR`: `UFFDIO_API` has not been done on this descriptor.
    #[error("poll(userfaultfd): POLLERR (API not negotiated yet)")]
    NotInitialized,
    /// The call failed.
    #[error("poll(userfaultfd): {errno}")]
    Os {
        /// errno.
        errno: Errno,
    },
}

/// `UFFDIO_COPY` ([`Userfaultfd::copy`](super::Userfaultfd::copy)).
///
/// Every variant raised by the kernel carries `done`: what was installed (and
/// skipped as already present) before the failure.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// The destination or the source length is not page-aligned (checked
    /// before the call).
    #[error("UFFDIO_COPY {range}: not page-aligned")]
    Misaligned {
        /// The destination range.
        range: RemoteRange,
    },
    /// The target is gone: `ESRCH` (its address space has been torn down) or
    /// `ENOENT` (the range is no longer a registered mapping of it: it was
    /// unmapped, or the range crosses the end of the registered mapping).
    /// A fault server ends on this.
    #[error("UFFDIO_COPY {range}: the target is gone ({errno}); done before: {done}")]
    TargetGone {
        /// The destination range.
        range: RemoteRange,
        /// `ESRCH` or `ENOENT`.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EAGAIN` without progress: the target's mappings are changing (a
    /// non-cooperative event — fork, mremap, remove — waits to be read).
    /// Read the events, then retry the rest.
    #[error("UFFDIO_COPY {range}: the target's mappings are changing; retry; done before: {done}")]
    MappingChanging {
        /// The destination range.
        range: RemoteRange,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EINVAL`: not a registered MISSING range, or bad mode (`wp` on a range
    /// not registered for WP).
    #[error("UFFDIO_COPY {range}: invalid ({errno}); done before: {done}")]
    Invalid {
        /// The destination range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// Any other failure (`ENOMEM`, `ENOSPC` when `/dev/shm` is full...).
    #[error("UFFDIO_COPY {range}: {errno}; done before: {done}")]
    Os {
        /// The destination range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
}

/// `UFFDIO_ZEROPAGE` ([`Userfaultfd::zeropage`](super::Userfaultfd::zeropage)).
#[derive(Debug, thiserror::Error)]
pub enum ZeropageError {
    /// Not page-aligned (checked before the call).
    #[error("UFFDIO_ZEROPAGE {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `ESRCH` / `ENOENT`: the target is gone (see [`CopyError::TargetGone`]).
    #[error("UFFDIO_ZEROPAGE {range}: the target is gone ({errno}); done before: {done}")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// `ESRCH` or `ENOENT`.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EAGAIN` without progress: mappings changing; read events and retry.
    #[error(
        "UFFDIO_ZEROPAGE {range}: the target's mappings are changing; retry; done before: {done}"
    )]
    MappingChanging {
        /// The range.
        range: RemoteRange,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EINVAL`: not a registered MISSING range.
    #[error("UFFDIO_ZEROPAGE {range}: invalid ({errno}); done before: {done}")]
    Invalid {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// Any other failure.
    #[error("UFFDIO_ZEROPAGE {range}: {errno}; done before: {done}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
}

/// `UFFDIO_CONTINUE` ([`Userfaultfd::continue_`](super::Userfaultfd::continue_)).
#[derive(Debug, thiserror::Error)]
pub enum ContinueError {
    /// Not page-aligned (checked before the call).
    #[error("UFFDIO_CONTINUE {range}: not page-aligned")]
    Misaligned {
        /// The range.
        range: RemoteRange,
    },
    /// `ESRCH` / `ENOENT`: the target is gone (see [`CopyError::TargetGone`]).
    #[error("UFFDIO_CONTINUE {range}: the target is gone ({errno}); done before: {done}")]
    TargetGone {
        /// The range.
        range: RemoteRange,
        /// `ESRCH` or `ENOENT`.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EFAULT`: a page of the range is not in the page cache (CONTINUE only
    /// maps existing pages; install absent ones with a copy instead).
    #[error(
        "UFFDIO_CONTINUE {range}: a page is not in the page cache ({errno}); done before: {done}"
    )]
    NotInPageCache {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EAGAIN` without progress: mappings changing; read events and retry.
    #[error(
        "UFFDIO_CONTINUE {range}: the target's mappings are changing; retry; done before: {done}"
    )]
    MappingChanging {
        /// The range.
        range: RemoteRange,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// `EINVAL`: not a registered MINOR range, or bad mode.
    #[error("UFFDIO_CONTINUE {range}: invalid ({errno}); done before: {done}")]
    Invalid {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
    /// Any other failure.
    #[error("UFFDIO_CONTINUE {range}: {errno}; done before: {done}")]
    Os {
        /// The range.
        range: RemoteRange,
        /// errno.
        errno: Errno,
        /// Progress before the failure.
        done: CopyOutcome,
    },
}
