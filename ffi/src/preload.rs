//! The `mmap` / `mmap64` wrappers of the QEMU preload library.
//!
//! Loaded with `LD_PRELOAD`, the cdylib's `mmap` and `mmap64` come before
//! glibc's. Each call goes to the real `mmap` (found once with
//! `dlsym(RTLD_NEXT, "mmap")`); when the mapping succeeded, is `MAP_SHARED`
//! and its file's path starts with `WANMIG_PREFIX`, the mapping is registered
//! on a new userfaultfd and handed to the engine (see the crate docs and
//! `ffi/README.md`) before `mmap` returns.
//!
//! Everything on the wrapper's path avoids the heap: environment variables are
//! read with `getenv`, paths and messages live in stack buffers, and errors are
//! printed with `write(2)`. Any failure once a mapping matched aborts the
//! process: QEMU must never run with guest RAM that nobody serves or tracks.
//!
//! The wrappers only act when this code runs from a shared object other than
//! the main program (the preloaded cdylib). A program that links the `rlib`
//! (the engine, which depends on this crate for [`crate::proto`]) may end up
//! with these symbols in its executable; there they only forward to the real
//! `mmap`, so the engine's own mappings of guest RAM are never registered.

use core::ffi::{CStr, c_int, c_void};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use libc::off_t;

use crate::diag::{Bytes, Errno, StackMsg, errno, set_errno};
use crate::proto::{ACK_ACCEPT, RegistrationFields, RegistrationMsg, UffdMode};
use crate::uffd_sys::{
    UFFD_API, UFFDIO_API, UFFDIO_REGISTER, USERFAULTFD_IOC_NEW, UffdioApi, UffdioRange,
    UffdioRegister,
};
use crate::{DEFAULT_PREFIX, ENV_PREFIX, ENV_UFFD_MODE, ENV_UFFD_SOCK};
use zerocopy::IntoBytes;

type MmapFn = unsafe extern "C" fn(*mut c_void, usize, c_int, c_int, c_int, off_t) -> *mut c_void;

/// Address of the real `mmap`, 0 until resolved.
static REAL_MMAP: AtomicUsize = AtomicUsize::new(0);
/// Set while one thread runs `dlsym`; other callers use the raw system call.
static RESOLVING: AtomicBool = AtomicBool::new(false);
/// Whether the wrappers register matching mappings (only in the preloaded
/// shared object; see the module docs).
static ARMED: AtomicBool = AtomicBool::new(false);

const C_ENV_PREFIX: &CStr = c"WANMIG_PREFIX";
const C_ENV_UFFD_SOCK: &CStr = c"WANMIG_UFFD_SOCK";
const C_ENV_UFFD_MODE: &CStr = c"WANMIG_UFFD_MODE";
/// `WANMIG_UFFD_SOCK` value: no hand-over; an engine attaches later.
const ATTACH: &[u8] = b"attach";

/// Runs when the shared object is loaded (before `main`): resolves the real
/// `mmap` and decides whether to arm the wrappers.
#[used]
#[unsafe(link_section = ".init_array")]
static INIT: extern "C" fn() = preload_init;

extern "C" fn preload_init() {
    resolve_real_mmap();
    ARMED.store(in_preloaded_object(), Ordering::Release);
}

/// Whether this code lives in a shared object distinct from the main program.
fn in_preloaded_object() -> bool {
    // SAFETY: `Dl_info` is plain old data; all-zero is a valid value.
    let mut ours: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: `dladdr` only reads the address and writes `ours`.
    let found =
        unsafe { libc::dladdr(preload_init as extern "C" fn() as *const c_void, &mut ours) };
    if found == 0 || ours.dli_fbase.is_null() {
        return false;
    }
    // SAFETY: `getauxval` has no preconditions.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) };
    if phdr == 0 {
        return false;
    }
    // SAFETY: as above; `phdr` lies inside the main program's mapping.
    let mut main: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: `dladdr` only reads the address and writes `main`.
    let found = unsafe { libc::dladdr(phdr as *const c_void, &mut main) };
    found != 0 && main.dli_fbase != ours.dli_fbase
}

/// Looks the real `mmap` up with `dlsym(RTLD_NEXT)`; 0 while another thread
/// (or a recursive call from inside `dlsym`) is resolving, or if not found.
fn resolve_real_mmap() -> usize {
    if RESOLVING.swap(true, Ordering::AcqRel) {
        return 0;
    }
    // SAFETY: `dlsym` with the RTLD_NEXT pseudo-handle and a NUL-terminated name.
    let mut found = unsafe { libc::dlsym(libc::RTLD_NEXT, c"mmap".as_ptr()) } as usize;
    if found == mmap as MmapFn as usize || found == mmap64 as MmapFn as usize {
        found = 0;
    }
    if found != 0 {
        REAL_MMAP.store(found, Ordering::Release);
    }
    RESOLVING.store(false, Ordering::Release);
    found
}

/// Calls the real `mmap`, or the system call while it is not resolved.
///
/// # Safety
/// The `mmap(2)` contract.
unsafe fn real_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    let mut f = REAL_MMAP.load(Ordering::Acquire);
    if f == 0 {
        f = resolve_real_mmap();
    }
    if f == 0 {
        // SAFETY: the raw mmap system call with the caller's arguments (the
        // caller upholds mmap's contract); every argument widened to a long.
        let r = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                addr as libc::c_long,
                len as libc::c_long,
                prot as libc::c_long,
                flags as libc::c_long,
                fd as libc::c_long,
                offset as libc::c_long,
            )
        };
        return r as *mut c_void;
    }
    // SAFETY: `f` is the non-null address `dlsym` returned for "mmap", a
    // function with exactly this signature.
    let f = unsafe { core::mem::transmute::<usize, MmapFn>(f) };
    // SAFETY: the caller upholds mmap's contract.
    unsafe { f(addr, len, prot, flags, fd, offset) }
}

/// `mmap(2)`, registering shared mappings of wanmig guest-RAM files with a
/// userfaultfd handed to the engine (see the crate docs).
///
/// # Safety
/// The contract of `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: forwarded unchanged; the caller upholds mmap's contract.
    unsafe { wrapped_mmap(addr, len, prot, flags, fd, offset) }
}

/// `mmap64(3)` (the same function as [`mmap`] on 64-bit Linux).
///
/// # Safety
/// The contract of `mmap(2)`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: forwarded unchanged; the caller upholds mmap's contract.
    unsafe { wrapped_mmap(addr, len, prot, flags, fd, offset) }
}

/// # Safety
/// The `mmap(2)` contract.
unsafe fn wrapped_mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    offset: off_t,
) -> *mut c_void {
    // SAFETY: the caller upholds mmap's contract.
    let mapped = unsafe { real_mmap(addr, len, prot, flags, fd, offset) };
    if mapped == libc::MAP_FAILED
        || fd < 0
        || flags & libc::MAP_ANONYMOUS != 0
        || !is_shared(flags)
        || !ARMED.load(Ordering::Acquire)
    {
        return mapped;
    }
    let saved = errno();
    on_shared_file_mapping(mapped as u64, len as u64, fd, offset);
    set_errno(saved);
    mapped
}

fn is_shared(flags: c_int) -> bool {
    let kind = flags & libc::MAP_TYPE;
    kind == libc::MAP_SHARED || kind == libc::MAP_SHARED_VALIDATE
}

/// Prints `wanmig-preload[pid]: <message>` and a consequence line on stderr,
/// then aborts.
fn die(args: core::fmt::Arguments<'_>) -> ! {
    let mut m = StackMsg::new();
    // SAFETY: `getpid` has no preconditions.
    let pid = unsafe { libc::getpid() };
    let _ = write!(m, "wanmig-preload[{pid}]: fatal: ");
    let _ = m.write_fmt(args);
    let _ = write!(
        m,
        "; aborting (QEMU must not run with guest RAM that the wanmig engine neither serves nor tracks)"
    );
    m.emit();
    // SAFETY: `abort` has no preconditions; it does not return.
    unsafe { libc::abort() }
}

/// The value of an environment variable as bytes, read without allocating.
fn env_bytes(name: &CStr) -> Option<&'static [u8]> {
    // SAFETY: `getenv` with a NUL-terminated name; it returns null or a
    // NUL-terminated string in the environment, which QEMU does not modify
    // (see the crate docs).
    let p = unsafe { libc::getenv(name.as_ptr()) };
    if p.is_null() {
        None
    } else {
        // SAFETY: `p` is non-null and NUL-terminated (above).
        Some(unsafe { CStr::from_ptr(p) }.to_bytes())
    }
}

/// Writes `/proc/self/fd/<fd>\0` into `buf`; returns its length with the NUL.
fn proc_fd_link(fd: c_int, buf: &mut [u8; 40]) -> usize {
    const HEAD: &[u8] = b"/proc/self/fd/";
    buf[..HEAD.len()].copy_from_slice(HEAD);
    let mut digits = [0u8; 12];
    let mut n = fd.unsigned_abs();
    let mut i = digits.len();
    loop {
        i -= 1;
        digits[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    let d = &digits[i..];
    buf[HEAD.len()..HEAD.len() + d.len()].copy_from_slice(d);
    buf[HEAD.len() + d.len()] = 0;
    HEAD.len() + d.len() + 1
}

fn on_shared_file_mapping(base: u64, len: u64, fd: c_int, offset: off_t) {
    let mut link = [0u8; 40];
    proc_fd_link(fd, &mut link);
    let mut path_buf = [0u8; 512];
    // SAFETY: `link` is NUL-terminated; `readlink` writes at most
    // `path_buf.len()` bytes into `path_buf`.
    let n = unsafe {
        libc::readlink(
            link.as_ptr().cast(),
            path_buf.as_mut_ptr().cast(),
            path_buf.len(),
        )
    };
    if n < 0 {
        let e = Errno::last();
        die(format_args!(
            "cannot tell which file the shared mapping of fd {fd} belongs to: readlink {}: {e}",
            Bytes(&link[..link.iter().position(|&b| b == 0).unwrap_or(0)])
        ));
    }
    let path = &path_buf[..n as usize];
    let prefix = match env_bytes(C_ENV_PREFIX) {
        None => DEFAULT_PREFIX.as_bytes(),
        Some([]) => die(format_args!(
            "{ENV_PREFIX} is set but empty (unset it for the default {DEFAULT_PREFIX})"
        )),
        Some(p) => p,
    };
    if path.starts_with(prefix) {
        register(base, len, offset, path);
    }
}

/// Registers the mapping on a new userfaultfd and hands it to the engine, or
/// dies.
fn register(base: u64, len: u64, offset: off_t, path: &[u8]) {
    let path_shown = Bytes(path);
    let mode = match env_bytes(C_ENV_UFFD_MODE) {
        None => die(format_args!(
            "{path_shown} matches the guest-RAM prefix but {ENV_UFFD_MODE} is not set \
             (wp-async on the source, missing or missing+wp-async on the destination)"
        )),
        Some(raw) => match UffdMode::from_env_value(raw) {
            Some(m) => m,
            None => die(format_args!(
                "{ENV_UFFD_MODE}={} is none of wp-async, missing, missing+wp-async",
                Bytes(raw)
            )),
        },
    };
    let sock = match env_bytes(C_ENV_UFFD_SOCK) {
        None | Some([]) => die(format_args!(
            "{path_shown} matches the guest-RAM prefix but {ENV_UFFD_SOCK} (the engine's unix \
             socket) is not set"
        )),
        Some(s) => s,
    };
    // SAFETY: `sysconf` has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    let page = if page.is_power_of_two() { page } else { 4096 };
    let reg_len = len.div_ceil(page) * page;

    let (uffd, how) = match new_uffd() {
        Ok(v) => v,
        Err((e_syscall, e_dev)) => die(format_args!(
            "cannot create a userfaultfd for {path_shown}: userfaultfd(2): {e_syscall}; \
             /dev/userfaultfd: {e_dev}"
        )),
    };
    let mut api = UffdioApi {
        api: UFFD_API,
        features: mode.api_features(),
        ioctls: 0,
    };
    // SAFETY: `uffd` is a userfaultfd; `api` is a valid `struct uffdio_api`.
    if unsafe { libc::ioctl(uffd, UFFDIO_API, &mut api) } != 0 {
        let e = Errno::last();
        die(format_args!(
            "UFFDIO_API with features {:#x} ({ENV_UFFD_MODE}={mode}) refused: {e}",
            mode.api_features()
        ));
    }
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: base,
            len: reg_len,
        },
        mode: mode.register_mode(),
        ioctls: 0,
    };
    // SAFETY: `uffd` is a userfaultfd; `reg` is a valid `struct uffdio_register`
    // describing the mapping just created.
    if unsafe { libc::ioctl(uffd, UFFDIO_REGISTER, &mut reg) } != 0 {
        let e = Errno::last();
        die(format_args!(
            "UFFDIO_REGISTER of {path_shown} at {base:#x} len {reg_len} with mode {:#x} \
             ({ENV_UFFD_MODE}={mode}) refused: {e}",
            mode.register_mode()
        ));
    }
    // SAFETY: `getpid` has no preconditions.
    let pid = unsafe { libc::getpid() };
    let msg = match RegistrationMsg::new(&RegistrationFields {
        mode,
        pid,
        base,
        len: reg_len,
        file_offset: offset as u64,
        features: mode.api_features(),
        ioctls: reg.ioctls,
        path,
    }) {
        Ok(m) => m,
        Err(e) => die(format_args!(
            "cannot describe {path_shown} to the engine: {e}"
        )),
    };
    if sock == ATTACH {
        // No engine yet: keep the descriptor for one that attaches later
        // (it takes it with pidfd_getfd(2)).
        let mut m = StackMsg::new();
        let _ = write!(
            m,
            "wanmig-preload[{pid}]: {path_shown} at {base:#x} len {reg_len} offset {offset}: \
             registered {mode} on uffd {uffd} (via {how}, features {:#x}); kept for an engine \
             to attach",
            mode.api_features()
        );
        m.emit();
        return;
    }
    if let Err(f) = hand_over(sock, &msg, uffd) {
        die(format_args!(
            "handing the userfaultfd of {path_shown} to the engine at {ENV_UFFD_SOCK}={} \
             failed: {f}",
            Bytes(sock)
        ));
    }
    // The uffd stays open on purpose (never closed): if the engine dies, a
    // vCPU faulting on this range blocks instead of reading zeros.
    let mut m = StackMsg::new();
    let _ = write!(
        m,
        "wanmig-preload[{pid}]: {path_shown} at {base:#x} len {reg_len} offset {offset}: \
         registered {mode} on uffd {uffd} (via {how}, features {:#x}, ioctls {:#x}); \
         the engine at {} accepted it",
        mode.api_features(),
        reg.ioctls,
        Bytes(sock)
    );
    m.emit();
}

/// A new userfaultfd (`O_CLOEXEC | O_NONBLOCK`): the system call, then
/// `/dev/userfaultfd`. On failure, the errno of each attempt.
fn new_uffd() -> Result<(c_int, &'static str), (Errno, Errno)> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: the userfaultfd system call takes one flags argument.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags as libc::c_long) };
    if fd >= 0 {
        return Ok((fd as c_int, "userfaultfd(2)"));
    }
    let e_syscall = Errno::last();
    // SAFETY: `open` with a NUL-terminated path.
    let dev = unsafe { libc::open(c"/dev/userfaultfd".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if dev < 0 {
        return Err((e_syscall, Errno::last()));
    }
    // SAFETY: USERFAULTFD_IOC_NEW on /dev/userfaultfd takes the flags as its
    // integer argument.
    let fd = unsafe { libc::ioctl(dev, USERFAULTFD_IOC_NEW, flags) };
    let e_dev = Errno::last();
    // SAFETY: `dev` is our descriptor, closed once.
    unsafe { libc::close(dev) };
    if fd < 0 {
        Err((e_syscall, e_dev))
    } else {
        Ok((fd, "/dev/userfaultfd"))
    }
}

/// Why handing the uffd to the engine failed.
#[derive(Clone, Copy)]
enum HandOver {
    PathTooLong(usize),
    Socket(Errno),
    Connect(Errno),
    Send(Errno),
    Recv(Errno),
    Eof,
    Refused(u8),
}

impl core::fmt::Display for HandOver {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match *self {
            HandOver::PathTooLong(n) => write!(f, "socket path of {n} bytes is too long (max 107)"),
            HandOver::Socket(e) => write!(f, "socket(AF_UNIX): {e}"),
            HandOver::Connect(e) => write!(f, "connect: {e}"),
            HandOver::Send(e) => write!(f, "sending the registration: {e}"),
            HandOver::Recv(e) => write!(f, "waiting for the answer: {e}"),
            HandOver::Eof => write!(f, "the engine closed the connection without answering"),
            HandOver::Refused(b) => write!(
                f,
                "the engine refused the registration (answer {b:#04x} {:?}, accept is 'A')",
                b as char
            ),
        }
    }
}

/// Closes a descriptor on drop.
struct Fd(c_int);

impl Drop for Fd {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned by this guard and closed once.
        unsafe { libc::close(self.0) };
    }
}

/// `CMSG_SPACE(sizeof(int))`: room for one descriptor.
// SAFETY: `CMSG_SPACE` is pure arithmetic.
const CONTROL_LEN: usize =
    unsafe { libc::CMSG_SPACE(core::mem::size_of::<c_int>() as u32) } as usize;

#[repr(C, align(8))]
struct Control([u8; CONTROL_LEN]);

/// Connects to the engine, sends `msg` with `uffd` attached and waits for the
/// one-byte answer.
fn hand_over(sock: &[u8], msg: &RegistrationMsg, uffd: c_int) -> Result<(), HandOver> {
    // SAFETY: `sockaddr_un` is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { core::mem::zeroed() };
    if sock.len() >= addr.sun_path.len() {
        return Err(HandOver::PathTooLong(sock.len()));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, &src) in addr.sun_path.iter_mut().zip(sock) {
        *dst = src as libc::c_char;
    }
    // SAFETY: plain socket creation.
    let s = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(HandOver::Socket(Errno::last()));
    }
    let s = Fd(s);
    // SAFETY: `addr` is a valid `sockaddr_un` of the length given.
    let r = unsafe {
        libc::connect(
            s.0,
            (&raw const addr).cast(),
            core::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(HandOver::Connect(Errno::last()));
    }

    let bytes = msg.as_bytes();
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut c_void,
        iov_len: bytes.len(),
    };
    let mut control = Control([0; CONTROL_LEN]);
    // SAFETY: `msghdr` is plain old data; all-zero is valid.
    let mut mh: libc::msghdr = unsafe { core::mem::zeroed() };
    mh.msg_iov = &raw mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.0.as_mut_ptr().cast();
    mh.msg_controllen = CONTROL_LEN as _;
    // SAFETY: `mh` points at a control buffer of CMSG_SPACE(sizeof(int))
    // bytes, 8-aligned, so the first header and its data fit inside it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&raw const mh);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(core::mem::size_of::<c_int>() as u32) as _;
        core::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<c_int>(), uffd);
    }
    let mut sent = loop {
        // SAFETY: `mh` describes valid buffers that outlive the call.
        let n = unsafe { libc::sendmsg(s.0, &raw const mh, libc::MSG_NOSIGNAL) };
        if n >= 0 {
            break n as usize;
        }
        if errno() != libc::EINTR {
            return Err(HandOver::Send(Errno::last()));
        }
    };
    while sent < bytes.len() {
        let rest = &bytes[sent..];
        // SAFETY: `rest` is a valid byte slice for its length.
        let n = unsafe { libc::send(s.0, rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            sent += n as usize;
        } else if errno() != libc::EINTR {
            return Err(HandOver::Send(Errno::last()));
        }
    }

    let mut answer = 0u8;
    loop {
        // SAFETY: reads at most one byte into `answer`.
        let n = unsafe { libc::recv(s.0, (&raw mut answer).cast(), 1, 0) };
        match n {
            1 => break,
            0 => return Err(HandOver::Eof),
            _ if errno() == libc::EINTR => continue,
            _ => return Err(HandOver::Recv(Errno::last())),
        }
    }
    if answer == ACK_ACCEPT {
        Ok(())
    } else {
        Err(HandOver::Refused(answer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_names_agree() {
        assert_eq!(C_ENV_PREFIX.to_bytes(), ENV_PREFIX.as_bytes());
        assert_eq!(C_ENV_UFFD_SOCK.to_bytes(), ENV_UFFD_SOCK.as_bytes());
        assert_eq!(C_ENV_UFFD_MODE.to_bytes(), ENV_UFFD_MODE.as_bytes());
    }

    #[test]
    fn proc_fd_links() {
        let mut buf = [0u8; 40];
        let n = proc_fd_link(0, &mut buf);
        assert_eq!(&buf[..n], b"/proc/self/fd/0\0");
        let n = proc_fd_link(1234567, &mut buf);
        assert_eq!(&buf[..n], b"/proc/self/fd/1234567\0");
        let n = proc_fd_link(i32::MAX, &mut buf);
        assert_eq!(&buf[..n], b"/proc/self/fd/2147483647\0");
    }

    #[test]
    fn shared_flags() {
        assert!(is_shared(libc::MAP_SHARED));
        assert!(is_shared(libc::MAP_SHARED_VALIDATE | libc::MAP_FIXED));
        assert!(!is_shared(libc::MAP_PRIVATE));
        assert!(!is_shared(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS));
    }

    /// In a test executable the wrappers are linked into the main program:
    /// they must stay disarmed and only forward.
    #[test]
    fn disarmed_in_the_main_program_and_forwards() {
        assert!(!in_preloaded_object());
        assert!(!ARMED.load(Ordering::Acquire));
        // SAFETY: an anonymous private mapping of one page, unmapped below.
        let p = unsafe {
            mmap(
                core::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        assert_ne!(REAL_MMAP.load(Ordering::Acquire), 0);
        // SAFETY: `p` is the page just mapped.
        unsafe {
            p.cast::<u8>().write(7);
            assert_eq!(libc::munmap(p, 4096), 0);
        }
    }
}
