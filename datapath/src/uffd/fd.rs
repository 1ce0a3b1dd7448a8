//! [`Userfaultfd`]: an owned userfaultfd and its ioctls.

use std::fmt;
use std::marker::PhantomData;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use zerocopy::{FromBytes, IntoBytes};

use super::abi;
use super::error::{
    AdoptError, ApiError, ContinueError, CopyError, CreateError, InspectError, PollError,
    ProbeError, ReadError, RegisterError, UnregisterError, WakeError, WriteProtectError,
    ZeropageError,
};
use super::{CopyFlags, Errno, Event, Features, Ioctls, Mode, RemoteAddr, RemoteRange, page_size};

/// What `/proc/self/fd/<n>` reads for a userfaultfd.
const UFFD_LINK: &str = "anon_inode:[userfaultfd]";

/// Kernel-internal bit of the context features, shown in fdinfo once the API
/// has been negotiated (`UFFD_FEATURE_INITIALIZED` in `fs/userfaultfd.c`).
const FEATURE_INITIALIZED: u64 = 1 << 31;

/// Messages read per `read(2)` (2 KiB on the stack).
const READ_BATCH: usize = 64;

/// An ioctl request number tied to the type of its argument; the size encoded
/// in the number is checked against the type at compile time.
struct Req<T>(u32, PhantomData<T>);

impl<T> Req<T> {
    const fn new(nr: u32) -> Self {
        assert!(((nr >> 16) & 0x3fff) as usize == size_of::<T>());
        Req(nr, PhantomData)
    }
}

const API: Req<abi::uffdio_api> = Req::new(abi::UFFDIO_API);
const REGISTER: Req<abi::uffdio_register> = Req::new(abi::UFFDIO_REGISTER);
const UNREGISTER: Req<abi::uffdio_range> = Req::new(abi::UFFDIO_UNREGISTER);
const WAKE: Req<abi::uffdio_range> = Req::new(abi::UFFDIO_WAKE);
const COPY: Req<abi::uffdio_copy> = Req::new(abi::UFFDIO_COPY);
const ZEROPAGE: Req<abi::uffdio_zeropage> = Req::new(abi::UFFDIO_ZEROPAGE);
const WRITEPROTECT: Req<abi::uffdio_writeprotect> = Req::new(abi::UFFDIO_WRITEPROTECT);
const CONTINUE: Req<abi::uffdio_continue> = Req::new(abi::UFFDIO_CONTINUE);

/// `ioctl(fd, req, arg)`, retried on `EINTR`.
fn ioctl<T: IntoBytes + FromBytes>(
    fd: BorrowedFd<'_>,
    req: &Req<T>,
    arg: &mut T,
) -> Result<libc::c_int, Errno> {
    loop {
        // SAFETY: `arg` is an exclusively borrowed, initialised `#[repr(C)]`
        // struct whose size is the one encoded in the request number (checked
        // in `Req::new`), so the kernel reads and writes only inside it. Every
        // pointer it contains (`uffdio_copy.src`) is set by the caller to a
        // live buffer, as documented there. `fd` is a live descriptor.
        let r = unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                abi::request(req.0),
                std::ptr::from_mut(arg).cast::<libc::c_void>(),
            )
        };
        if r >= 0 {
            return Ok(r);
        }
        let e = Errno::last();
        if e.0 != libc::EINTR {
            return Err(e);
        }
    }
}

/// Result of installing pages ([`Userfaultfd::copy`], [`zeropage`](Userfaultfd::zeropage),
/// [`continue_`](Userfaultfd::continue_)).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CopyOutcome {
    /// Bytes this call installed.
    pub installed: u64,
    /// Bytes skipped because a page was already present (`EEXIST`): someone
    /// else won the race. A fault path that skipped its page must
    /// [`wake`](Userfaultfd::wake) it, since the winner may have used
    /// `dontwake`.
    pub skipped: u64,
    /// ioctl calls made (1 when nothing raced).
    pub ioctls: u32,
}

impl CopyOutcome {
    /// Whether some pages were already present.
    pub fn lost_race(&self) -> bool {
        self.skipped > 0
    }
}

impl fmt::Display for CopyOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} bytes installed, {} skipped, {} ioctls",
            self.installed, self.skipped, self.ioctls
        )
    }
}

/// Why an install loop stopped early.
enum FillStop {
    /// `EAGAIN` with no progress.
    Changing,
    /// Another errno.
    Errno(Errno),
}

/// Drives one of the page-installing ioctls over `[0, len)`.
///
/// `call(offset, len)` issues the ioctl for the rest of the range and returns
/// `Ok(())` when all of it was installed, or the errno with the kernel's
/// progress field (bytes done, or a negative errno). The kernel reports
/// partial progress as `EAGAIN` with a positive count (a page in the middle
/// already present, a signal, a reschedule); a present first page is `EEXIST`,
/// which skips that page.
fn fill_loop(
    len: u64,
    mut call: impl FnMut(u64, u64) -> Result<(), (Errno, i64)>,
) -> Result<CopyOutcome, (FillStop, CopyOutcome)> {
    let page = page_size();
    let mut done = CopyOutcome::default();
    let mut off = 0u64;
    while off < len {
        let rest = len - off;
        done.ioctls = done.ioctls.saturating_add(1);
        match call(off, rest) {
            Ok(()) => {
                done.installed += rest;
                off = len;
            }
            Err((e, progress)) if e.0 == libc::EAGAIN => {
                // Bytes done by this call; the kernel works in whole pages.
                let n = u64::try_from(progress).unwrap_or(0).min(rest) & !(page - 1);
                if n == 0 {
                    return Err((FillStop::Changing, done));
                }
                done.installed += n;
                off += n;
            }
            Err((e, _)) if e.0 == libc::EEXIST => {
                let n = page.min(rest);
                done.skipped += n;
                off += n;
            }
            Err((e, _)) => return Err((FillStop::Errno(e), done)),
        }
    }
    Ok(done)
}

/// An owned userfaultfd.
///
/// Every method takes `&self`: the ioctls are thread-safe, so a fault-serving
/// thread and a background pusher can share one `Userfaultfd` (in an `Arc`).
/// Addresses are in the address space of the process that created the fd (the
/// *target*), which need not be this one.
#[derive(Debug)]
pub struct Userfaultfd {
    fd: OwnedFd,
}

impl Userfaultfd {
    /// Creates a userfaultfd for *this* process's address space, close-on-exec,
    /// optionally non-blocking.
    ///
    /// Tries `userfaultfd(2)` first (without `UFFD_USER_MODE_ONLY`: faults
    /// raised by the kernel itself, e.g. `read(2)` into guest RAM, must be
    /// handled too), then `/dev/userfaultfd` + `USERFAULTFD_IOC_NEW`, which
    /// works without `CAP_SYS_PTRACE` when `vm.unprivileged_userfaultfd` is 0
    /// for whoever may open the node.
    pub fn create(nonblocking: bool) -> Result<Self, CreateError> {
        let flags = Self::flags(nonblocking);
        // SAFETY: userfaultfd(2) takes an int of flags and returns a new
        // descriptor or -1; no memory is passed.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if r >= 0 {
            let Ok(raw) = RawFd::try_from(r) else {
                return Err(CreateError::Unavailable {
                    syscall: Errno(libc::EBADF),
                    op: "userfaultfd",
                    device: Errno(libc::EBADF),
                });
            };
            // SAFETY: the kernel just returned this new descriptor; nothing
            // else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            return Ok(Userfaultfd { fd });
        }
        let syscall = Errno::last();
        Self::create_via_device(nonblocking).map_err(|e| match e {
            CreateError::Device { op, errno } => CreateError::Unavailable {
                syscall,
                op,
                device: errno,
            },
            other => other,
        })
    }

    /// Creates a userfaultfd through `/dev/userfaultfd` only (the fallback of
    /// [`create`](Self::create), exposed to test it).
    pub fn create_via_device(nonblocking: bool) -> Result<Self, CreateError> {
        let path = c"/dev/userfaultfd";
        // SAFETY: `path` is a NUL-terminated static string.
        let dev = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
        if dev < 0 {
            return Err(CreateError::Device {
                op: "open",
                errno: Errno::last(),
            });
        }
        // SAFETY: `open` just returned this descriptor; nothing else owns it.
        let dev = unsafe { OwnedFd::from_raw_fd(dev) };
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags by value (an int, not a
        // pointer) and returns a new descriptor or -1.
        let r = unsafe {
            libc::ioctl(
                dev.as_raw_fd(),
                abi::request(abi::USERFAULTFD_IOC_NEW),
                Self::flags(nonblocking),
            )
        };
        if r < 0 {
            return Err(CreateError::Device {
                op: "USERFAULTFD_IOC_NEW",
                errno: Errno::last(),
            });
        }
        // SAFETY: the ioctl just returned this new descriptor; nothing else
        // owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(r) };
        Ok(Userfaultfd { fd })
    }

    fn flags(nonblocking: bool) -> libc::c_int {
        libc::O_CLOEXEC | if nonblocking { libc::O_NONBLOCK } else { 0 }
    }

    /// Adopts a userfaultfd received from another process (QEMU's preload
    /// library, over [`recv_fd`](super::recv_fd)); its API is normally
    /// negotiated already (see [`negotiated_features`](Self::negotiated_features)).
    ///
    /// Checks that the descriptor really is a userfaultfd (anything else is
    /// closed and refused) and switches it to non-blocking mode, so that
    /// [`read_events`](Self::read_events) never blocks (the flag belongs to the
    /// open file, shared with any copy the sender kept).
    pub fn from_owned_fd(fd: OwnedFd) -> Result<Self, AdoptError> {
        let raw = fd.as_raw_fd();
        let link = PathBuf::from(format!("/proc/self/fd/{raw}"));
        let target = std::fs::read_link(&link).map_err(|e| AdoptError::Inspect {
            fd: raw,
            source: InspectError::Io {
                path: link.clone(),
                errno: Errno(e.raw_os_error().unwrap_or(libc::EIO)),
            },
        })?;
        if target.as_os_str() != UFFD_LINK {
            return Err(AdoptError::NotUserfaultfd {
                fd: raw,
                kind: target.to_string_lossy().into_owned(),
            });
        }
        let uffd = Userfaultfd { fd };
        uffd.set_nonblocking(true)
            .map_err(|errno| AdoptError::Fcntl { fd: raw, errno })?;
        Ok(uffd)
    }

    /// Sets or clears `O_NONBLOCK` on the open file.
    fn set_nonblocking(&self, on: bool) -> Result<(), Errno> {
        let fd = self.fd.as_raw_fd();
        // SAFETY: F_GETFL on a live descriptor takes no pointer.
        let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if fl < 0 {
            return Err(Errno::last());
        }
        let new = if on {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        if new != fl {
            // SAFETY: F_SETFL on a live descriptor takes an int by value.
            if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
                return Err(Errno::last());
            }
        }
        Ok(())
    }

    /// The features the kernel offers, from a throwaway userfaultfd (the API
    /// can be negotiated once per descriptor, so probing needs its own).
    pub fn probe_features() -> Result<Features, ProbeError> {
        let probe = Self::create(false)?;
        Ok(probe.api(Features::EMPTY)?)
    }

    /// `UFFDIO_API`: enables `requested` on this descriptor (once per
    /// descriptor) and returns every feature the kernel offers. The kernel adds
    /// `WP_UNPOPULATED` when `WP_ASYNC` is requested.
    ///
    /// If the kernel lacks some requested features the error names them
    /// ([`ApiError::Unsupported`]); the descriptor is then still unnegotiated
    /// and `api` may be retried with fewer features.
    pub fn api(&self, requested: Features) -> Result<Features, ApiError> {
        let mut arg = abi::uffdio_api {
            api: abi::UFFD_API,
            features: requested.bits(),
            ioctls: 0,
        };
        match ioctl(self.fd.as_fd(), &API, &mut arg) {
            Ok(_) => Ok(Features::from_bits(arg.features)),
            Err(errno) if errno.0 == libc::EPERM => Err(ApiError::Permission { requested, errno }),
            Err(errno) if errno.0 == libc::EINVAL => {
                // The kernel zeroes the struct on failure, so it does not say
                // which features it lacks: ask a fresh descriptor.
                let available = Self::create(false)
                    .ok()
                    .and_then(|p| p.api(Features::EMPTY).ok());
                match available {
                    Some(available) if !available.contains(requested) => {
                        Err(ApiError::Unsupported {
                            requested,
                            available,
                            missing: requested - available,
                        })
                    }
                    _ => Err(ApiError::AlreadyNegotiated { requested, errno }),
                }
            }
            Err(errno) => Err(ApiError::Os { requested, errno }),
        }
    }

    /// The features enabled on this descriptor, from `/proc/self/fdinfo`
    /// (works on a descriptor negotiated by another process); `None` if
    /// `UFFDIO_API` has not been done yet.
    pub fn negotiated_features(&self) -> Result<Option<Features>, InspectError> {
        let path = PathBuf::from(format!("/proc/self/fdinfo/{}", self.fd.as_raw_fd()));
        let text = std::fs::read_to_string(&path).map_err(|e| InspectError::Io {
            path: path.clone(),
            errno: Errno(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        // "API:\t<UFFD_API>:<ctx features>:<ioctls>" (hex, no 0x).
        let parse = |detail: &str| InspectError::Parse {
            path: path.clone(),
            detail: detail.to_owned(),
        };
        let api = text
            .lines()
            .find_map(|l| l.strip_prefix("API:"))
            .ok_or_else(|| parse("no API line"))?;
        let mut fields = api.trim().split(':');
        let (Some(_version), Some(features), Some(_ioctls)) =
            (fields.next(), fields.next(), fields.next())
        else {
            return Err(parse("API line has fewer than 3 fields"));
        };
        let features =
            u64::from_str_radix(features, 16).map_err(|_| parse("API features are not hex"))?;
        if features == 0 {
            return Ok(None);
        }
        Ok(Some(Features::from_bits(features & !FEATURE_INITIALIZED)))
    }

    /// `UFFDIO_REGISTER`: routes faults of `range` (page-aligned, mapped in the
    /// target) to this descriptor. Returns the ioctls allowed on the range.
    pub fn register(&self, range: RemoteRange, mode: Mode) -> Result<Ioctls, RegisterError> {
        if !range.is_page_aligned() {
            return Err(RegisterError::Misaligned { range });
        }
        let mut arg = abi::uffdio_register {
            range: raw_range(range),
            mode: mode.bits(),
            ioctls: 0,
        };
        match ioctl(self.fd.as_fd(), &REGISTER, &mut arg) {
            Ok(_) => Ok(Ioctls::from_bits(arg.ioctls)),
            Err(errno) => Err(match errno.0 {
                libc::EINVAL => RegisterError::Invalid { range, mode, errno },
                libc::ENOMEM => RegisterError::NotMapped { range, mode, errno },
                libc::EBUSY => RegisterError::Busy { range, mode, errno },
                libc::EPERM => RegisterError::Permission { range, mode, errno },
                libc::ESRCH => RegisterError::TargetGone { range, errno },
                _ => RegisterError::Os { range, mode, errno },
            }),
        }
    }

    /// `UFFDIO_UNREGISTER`; threads blocked on faults in the range are woken
    /// (and re-fault without userfaultfd).
    pub fn unregister(&self, range: RemoteRange) -> Result<(), UnregisterError> {
        if !range.is_page_aligned() {
            return Err(UnregisterError::Misaligned { range });
        }
        let mut arg = raw_range(range);
        match ioctl(self.fd.as_fd(), &UNREGISTER, &mut arg) {
            Ok(_) => Ok(()),
            Err(errno) => Err(match errno.0 {
                libc::ESRCH => UnregisterError::TargetGone { range, errno },
                libc::ENOMEM => UnregisterError::NotMapped { range, errno },
                _ => UnregisterError::Os { range, errno },
            }),
        }
    }

    /// Reads the pending events (one `read(2)` of up to 64 messages), appends
    /// them to `out` and returns how many were appended.
    ///
    /// On a non-blocking descriptor (from [`create(true)`](Self::create) or
    /// [`from_owned_fd`](Self::from_owned_fd)) returns `Ok(0)` at once when
    /// nothing is pending; on a blocking one, waits for the first event. Call
    /// again while it returns 64. An unknown event type is an error
    /// ([`ReadError::UnknownEvent`]), after the known events of the batch have
    /// been appended.
    pub fn read_events(&self, out: &mut Vec<Event>) -> Result<usize, ReadError> {
        let mut buf = [abi::uffd_msg::default(); READ_BATCH];
        let bytes = buf.as_mut_bytes();
        let n = loop {
            // SAFETY: `bytes` is a live, exclusively borrowed buffer of
            // `bytes.len()` bytes; `uffd_msg` accepts any byte pattern.
            let r = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    bytes.as_mut_ptr().cast::<libc::c_void>(),
                    bytes.len(),
                )
            };
            if let Ok(n) = usize::try_from(r) {
                break n;
            }
            let errno = Errno::last();
            match errno.0 {
                libc::EINTR => continue,
                libc::EAGAIN => return Ok(0),
                libc::EINVAL => return Err(ReadError::NotInitialized { errno }),
                _ => return Err(ReadError::Os { errno }),
            }
        };
        let msg_size = size_of::<abi::uffd_msg>();
        if n % msg_size != 0 || n > bytes.len() {
            return Err(ReadError::TruncatedMessage { bytes: n });
        }
        let batch = n / msg_size;
        let before = out.len();
        let mut unknown = None;
        let mut unknown_count = 0;
        for msg in &buf[..batch] {
            match Event::decode(msg) {
                Ok(ev) => out.push(ev),
                Err(event) => {
                    unknown.get_or_insert(event);
                    unknown_count += 1;
                }
            }
        }
        match unknown {
            None => Ok(out.len() - before),
            Some(event) => Err(ReadError::UnknownEvent {
                event,
                unknown: unknown_count,
                batch,
            }),
        }
    }

    /// Waits until an event is pending (`true`) or `timeout` passes (`false`);
    /// `None` waits forever.
    pub fn poll_readable(&self, timeout: Option<Duration>) -> Result<bool, PollError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms: libc::c_int = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    // Round up so that a sub-millisecond wait is not a busy poll.
                    let ms = left.as_micros().div_ceil(1000);
                    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid, exclusively borrowed pollfd.
            let r = unsafe { libc::poll(&mut pfd, 1, ms) };
            if r < 0 {
                let errno = Errno::last();
                if errno.0 == libc::EINTR {
                    continue;
                }
                return Err(PollError::Os { errno });
            }
            if pfd.revents & libc::POLLERR != 0 {
                return Err(PollError::NotInitialized);
            }
            return Ok(r > 0 && pfd.revents & libc::POLLIN != 0);
        }
    }

    /// `UFFDIO_COPY`: atomically installs `src` at `dst` (page-aligned, length
    /// a multiple of the page) and, unless `dontwake`, wakes the threads
    /// waiting on those pages.
    ///
    /// Partial progress (`EAGAIN` with a count) is continued; pages already
    /// present (`EEXIST`: another installer won) are skipped and counted in
    /// [`CopyOutcome::skipped`]: the caller that needs the faulting thread to
    /// run must then [`wake`](Self::wake) the page. A target that has exited
    /// or unmapped the range gives [`CopyError::TargetGone`].
    pub fn copy(
        &self,
        dst: RemoteAddr,
        src: &[u8],
        flags: CopyFlags,
    ) -> Result<CopyOutcome, CopyError> {
        let range = RemoteRange::new(dst, src.len() as u64);
        if !range.is_page_aligned() {
            return Err(CopyError::Misaligned { range });
        }
        let res = fill_loop(range.len, |off, len| {
            // `off` and `len` lie in `src` (fill_loop keeps off + len == src.len()).
            let src = &src[off as usize..];
            let mut arg = abi::uffdio_copy {
                dst: dst.get() + off,
                src: src.as_ptr() as usize as u64,
                len,
                mode: flags.bits(),
                copy: 0,
            };
            ioctl(self.fd.as_fd(), &COPY, &mut arg)
                .map(drop)
                .map_err(|e| (e, arg.copy))
        });
        res.map_err(|(stop, done)| match stop {
            FillStop::Changing => CopyError::MappingChanging { range, done },
            FillStop::Errno(errno) => match errno.0 {
                libc::ESRCH | libc::ENOENT => CopyError::TargetGone { range, errno, done },
                libc::EINVAL => CopyError::Invalid { range, errno, done },
                _ => CopyError::Os { range, errno, done },
            },
        })
    }

    /// `UFFDIO_ZEROPAGE`: installs zero pages over `[dst, dst + len)`, with the
    /// same partial-progress and race handling as [`copy`](Self::copy). There
    /// is no write-protected variant: on a range also tracked with WP-async,
    /// copy a zero buffer with [`CopyFlags::wp`] instead.
    pub fn zeropage(
        &self,
        dst: RemoteAddr,
        len: u64,
        dontwake: bool,
    ) -> Result<CopyOutcome, ZeropageError> {
        let range = RemoteRange::new(dst, len);
        if !range.is_page_aligned() {
            return Err(ZeropageError::Misaligned { range });
        }
        let mode = if dontwake {
            abi::UFFDIO_ZEROPAGE_MODE_DONTWAKE
        } else {
            0
        };
        let res = fill_loop(len, |off, len| {
            let mut arg = abi::uffdio_zeropage {
                range: abi::uffdio_range {
                    start: dst.get() + off,
                    len,
                },
                mode,
                zeropage: 0,
            };
            ioctl(self.fd.as_fd(), &ZEROPAGE, &mut arg)
                .map(drop)
                .map_err(|e| (e, arg.zeropage))
        });
        res.map_err(|(stop, done)| match stop {
            FillStop::Changing => ZeropageError::MappingChanging { range, done },
            FillStop::Errno(errno) => match errno.0 {
                libc::ESRCH | libc::ENOENT => ZeropageError::TargetGone { range, errno, done },
                libc::EINVAL => ZeropageError::Invalid { range, errno, done },
                _ => ZeropageError::Os { range, errno, done },
            },
        })
    }

    /// `UFFDIO_WAKE`: wakes the threads waiting on faults in `range` (they
    /// retry the access). Cheap when nobody waits.
    pub fn wake(&self, range: RemoteRange) -> Result<(), WakeError> {
        if !range.is_page_aligned() {
            return Err(WakeError::Misaligned { range });
        }
        let mut arg = raw_range(range);
        ioctl(self.fd.as_fd(), &WAKE, &mut arg)
            .map(drop)
            .map_err(|errno| WakeError::Os { range, errno })
    }

    /// `UFFDIO_WRITEPROTECT`: protects (`wp`) or unprotects `range`. With
    /// `WP_UNPOPULATED` (implied by `WP_ASYNC`) protection also covers pages
    /// never populated (the kernel leaves markers). Unprotecting wakes waiters
    /// unless `dontwake`.
    pub fn write_protect(
        &self,
        range: RemoteRange,
        wp: bool,
        dontwake: bool,
    ) -> Result<(), WriteProtectError> {
        if !range.is_page_aligned() {
            return Err(WriteProtectError::Misaligned { range });
        }
        let mut arg = abi::uffdio_writeprotect {
            range: raw_range(range),
            mode: (if wp {
                abi::UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            }) | (if dontwake {
                abi::UFFDIO_WRITEPROTECT_MODE_DONTWAKE
            } else {
                0
            }),
        };
        ioctl(self.fd.as_fd(), &WRITEPROTECT, &mut arg)
            .map(drop)
            .map_err(|errno| match errno.0 {
                libc::ENOENT => WriteProtectError::NotRegistered { range, wp, errno },
                libc::EAGAIN => WriteProtectError::MappingChanging { range, errno },
                libc::ESRCH => WriteProtectError::TargetGone { range, errno },
                _ => WriteProtectError::Os { range, wp, errno },
            })
    }

    /// `UFFDIO_CONTINUE`: maps pages that are already in the page cache (MINOR
    /// faults) and wakes the waiters; `wp` maps them write-protected (keep the
    /// page "not written" for a WP-async scan). Same partial-progress and race
    /// handling as [`copy`](Self::copy).
    pub fn continue_(&self, range: RemoteRange, wp: bool) -> Result<CopyOutcome, ContinueError> {
        if !range.is_page_aligned() {
            return Err(ContinueError::Misaligned { range });
        }
        let mode = if wp { abi::UFFDIO_CONTINUE_MODE_WP } else { 0 };
        let res = fill_loop(range.len, |off, len| {
            let mut arg = abi::uffdio_continue {
                range: abi::uffdio_range {
                    start: range.start.get() + off,
                    len,
                },
                mode,
                mapped: 0,
            };
            ioctl(self.fd.as_fd(), &CONTINUE, &mut arg)
                .map(drop)
                .map_err(|e| (e, arg.mapped))
        });
        res.map_err(|(stop, done)| match stop {
            FillStop::Changing => ContinueError::MappingChanging { range, done },
            FillStop::Errno(errno) => match errno.0 {
                libc::ESRCH | libc::ENOENT => ContinueError::TargetGone { range, errno, done },
                libc::EFAULT => ContinueError::NotInPageCache { range, errno, done },
                libc::EINVAL => ContinueError::Invalid { range, errno, done },
                _ => ContinueError::Os { range, errno, done },
            },
        })
    }
}

fn raw_range(r: RemoteRange) -> abi::uffdio_range {
    abi::uffdio_range {
        start: r.start.get(),
        len: r.len,
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Userfaultfd> for OwnedFd {
    fn from(u: Userfaultfd) -> OwnedFd {
        u.fd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: u64 = 4096;

    type Script = [Result<(), (i32, i64)>];
    /// `Err((stopped on EAGAIN without progress, done))`.
    type Ran = Result<CopyOutcome, (bool, CopyOutcome)>;

    /// Runs `fill_loop` against scripted kernel answers; returns the calls.
    fn run(len: u64, answers: &Script) -> (Vec<(u64, u64)>, Ran) {
        let mut calls = Vec::new();
        let mut it = answers.iter();
        let res = fill_loop(len, |off, len| {
            calls.push((off, len));
            match it.next().expect("more calls than scripted") {
                Ok(()) => Ok(()),
                Err((e, p)) => Err((Errno(*e), *p)),
            }
        });
        (
            calls,
            res.map_err(|(s, d)| (matches!(s, FillStop::Changing), d)),
        )
    }

    #[test]
    fn fill_loop_follows_partial_progress_and_skips_present_pages() {
        if page_size() != P {
            return;
        }
        // 8 pages; page 3 present: EAGAIN after 3 pages, EEXIST, then the rest.
        let (calls, res) = run(
            8 * P,
            &[
                Err((libc::EAGAIN, (3 * P) as i64)),
                Err((libc::EEXIST, -(libc::EEXIST as i64))),
                Ok(()),
            ],
        );
        assert_eq!(calls, vec![(0, 8 * P), (3 * P, 5 * P), (4 * P, 4 * P)]);
        assert_eq!(
            res.ok(),
            Some(CopyOutcome {
                installed: 7 * P,
                skipped: P,
                ioctls: 3
            })
        );
    }

    #[test]
    fn fill_loop_stops_on_eagain_without_progress_and_on_errors() {
        if page_size() != P {
            return;
        }
        let (_, res) = run(2 * P, &[Err((libc::EAGAIN, -(libc::EAGAIN as i64)))]);
        assert!(matches!(res, Err((true, CopyOutcome { installed: 0, .. }))));
        let (_, res) = run(
            4 * P,
            &[Err((libc::EAGAIN, P as i64)), Err((libc::ESRCH, 0))],
        );
        assert!(matches!(
            res,
            Err((false, CopyOutcome { installed: P, .. }))
        ));
        // A bogus progress count larger than the rest is clamped, not trusted.
        let (_, res) = run(2 * P, &[Err((libc::EAGAIN, (100 * P) as i64))]);
        assert_eq!(res.ok().map(|d| d.installed), Some(2 * P));
        // Every page present: all skipped, one ioctl each.
        let (_, res) = run(3 * P, &[Err((libc::EEXIST, -17)); 3]);
        assert_eq!(
            res.ok(),
            Some(CopyOutcome {
                installed: 0,
                skipped: 3 * P,
                ioctls: 3
            })
        );
    }
}
