//! Test support for the preload library: finding the built cdylib, a small
//! stand-in for the engine's side of the handshake, and the few raw
//! userfaultfd calls a test engine needs (defined here independently of the
//! library, so a wrong constant on either side shows up).

#![allow(dead_code)]

use std::ffi::c_void;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use wanmig_ffi::proto::{REGISTRATION_LEN, UffdRegistration};

pub const PAGE: usize = 4096;

/// The preload library built alongside this test (`libwanmig_ffi.so` next to
/// the test executable in `target/<profile>/deps`, or one level up).
pub fn cdylib() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let deps = exe.parent().expect("test executable has a directory");
    let candidates = [
        deps.join("libwanmig_ffi.so"),
        deps.parent()
            .map(|p| p.join("libwanmig_ffi.so"))
            .unwrap_or_default(),
    ];
    candidates
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .unwrap_or_else(|| {
            panic!("libwanmig_ffi.so not found in {candidates:?}; run `cargo build -p wanmig-ffi`")
        })
}

/// A python3 that is a real executable (not a shell shim, which would also
/// load the library).
pub fn python() -> PathBuf {
    for p in ["/usr/bin/python3", "/usr/local/bin/python3"] {
        if Path::new(p).is_file() {
            return PathBuf::from(p);
        }
    }
    PathBuf::from("python3")
}

/// A name unique to this process and call.
pub fn unique(tag: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A file removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// A sparse file of `len` bytes (no page populated).
    pub fn sparse(path: PathBuf, len: u64) -> TempFile {
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(len).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test's stand-in for the engine: a listening unix socket.
pub struct Engine {
    pub listener: UnixListener,
    pub path: PathBuf,
}

/// One registration received.
pub struct Accepted {
    pub stream: UnixStream,
    pub reg: UffdRegistration,
    pub uffd: OwnedFd,
}

impl Accepted {
    /// Sends the one-byte answer.
    pub fn answer(&self, byte: u8) {
        (&self.stream).write_all(&[byte]).unwrap();
    }
}

impl Engine {
    pub fn bind() -> Engine {
        let path = std::env::temp_dir().join(format!("{}.sock", unique("wanmig-ffi")));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        Engine { listener, path }
    }

    /// Waits for one registration, giving up when `timeout` passes or the
    /// child exits first (then `None`).
    pub fn accept(&self, timeout: Duration, child: &mut Child) -> Option<Accepted> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => return Some(receive(stream)),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("accept: {e}"),
            }
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Whether anyone connected (without waiting).
    pub fn was_contacted(&self) -> bool {
        self.listener.accept().is_ok()
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads one registration and its descriptor from a fresh connection.
pub fn receive(stream: UnixStream) -> Accepted {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; REGISTRATION_LEN];
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; zeroed is valid.
    let mut mh: libc::msghdr = unsafe { std::mem::zeroed() };
    mh.msg_iov = &mut iov;
    mh.msg_iovlen = 1;
    mh.msg_control = control.as_mut_ptr().cast();
    mh.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `mh` describes buffers valid for the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut mh, libc::MSG_CMSG_CLOEXEC) };
    assert!(n > 0, "recvmsg: {}", std::io::Error::last_os_error());
    let mut fd = None;
    // SAFETY: walking the control messages the kernel wrote into `control`.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&mh);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let raw = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<i32>());
                fd = Some(OwnedFd::from_raw_fd(raw));
            }
            c = libc::CMSG_NXTHDR(&mh, c);
        }
    }
    let mut stream = stream;
    let n = n as usize;
    stream.read_exact(&mut buf[n..]).unwrap();
    let reg = UffdRegistration::parse(&buf).expect("a well-formed registration");
    let uffd = fd.expect("the registration carries a descriptor");
    Accepted { stream, reg, uffd }
}

// --- the raw userfaultfd calls a test engine needs ---------------------------

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

#[repr(C)]
struct UffdioWriteprotect {
    start: u64,
    len: u64,
    mode: u64,
}

#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

const UFFDIO_WAKE: libc::Ioctl = 0x8010_aa02;
const UFFDIO_COPY: libc::Ioctl = 0xc028_aa03;
const UFFDIO_ZEROPAGE: libc::Ioctl = 0xc020_aa04;
const UFFDIO_WRITEPROTECT: libc::Ioctl = 0xc018_aa06;
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 0x28);
const _: () = assert!(std::mem::size_of::<UffdioZeropage>() == 0x20);
const _: () = assert!(std::mem::size_of::<UffdioWriteprotect>() == 0x18);
const _: () = assert!(std::mem::size_of::<UffdioRange>() == 0x10);
pub const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `_UFFDIO_COPY`, `_UFFDIO_ZEROPAGE`, `_UFFDIO_WRITEPROTECT` bit numbers.
pub const IOCTL_COPY: u32 = 3;
pub const IOCTL_ZEROPAGE: u32 = 4;
pub const IOCTL_WRITEPROTECT: u32 = 6;

fn ioctl<T>(fd: BorrowedFd<'_>, req: libc::Ioctl, arg: &mut T) -> std::io::Result<()> {
    // SAFETY: `arg` is the struct `req` expects, valid for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), req, arg as *mut T as *mut c_void) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Installs `page` at `dst` (page-aligned); on EEXIST (installed meanwhile)
/// wakes the waiter instead.
pub fn copy_page(
    uffd: BorrowedFd<'_>,
    dst: u64,
    page: &[u8; PAGE],
    mode: u64,
) -> std::io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: page.as_ptr() as u64,
        len: PAGE as u64,
        mode,
        copy: 0,
    };
    match ioctl(uffd, UFFDIO_COPY, &mut c) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => wake(uffd, dst),
        r => r,
    }
}

/// Installs a zero page at `dst`.
pub fn zero_page(uffd: BorrowedFd<'_>, dst: u64) -> std::io::Result<()> {
    let mut z = UffdioZeropage {
        start: dst,
        len: PAGE as u64,
        mode: 0,
        zeropage: 0,
    };
    match ioctl(uffd, UFFDIO_ZEROPAGE, &mut z) {
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => wake(uffd, dst),
        r => r,
    }
}

fn wake(uffd: BorrowedFd<'_>, start: u64) -> std::io::Result<()> {
    let mut r = UffdioRange {
        start,
        len: PAGE as u64,
    };
    ioctl(uffd, UFFDIO_WAKE, &mut r)
}

/// Write-protects `[start, start + len)`.
pub fn write_protect(uffd: BorrowedFd<'_>, start: u64, len: u64) -> std::io::Result<()> {
    let mut w = UffdioWriteprotect {
        start,
        len,
        mode: 1,
    };
    ioctl(uffd, UFFDIO_WRITEPROTECT, &mut w)
}

/// Serves missing-page faults until `stop` is set: `fill(address)` gives the
/// page to install (`None`: a zero page). Returns the fault addresses.
pub fn serve_faults(
    uffd: BorrowedFd<'_>,
    stop: &AtomicBool,
    copy_mode: u64,
    mut fill: impl FnMut(u64) -> Option<[u8; PAGE]>,
) -> Vec<u64> {
    let mut faults = Vec::new();
    while !stop.load(Ordering::Acquire) {
        let mut pfd = libc::pollfd {
            fd: uffd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 20) };
        if r <= 0 {
            continue;
        }
        let mut msg = [0u8; 32];
        // SAFETY: reads at most 32 bytes into `msg`.
        let n = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
        if n != 32 {
            continue;
        }
        if msg[0] != UFFD_EVENT_PAGEFAULT {
            continue;
        }
        let addr = u64::from_le_bytes(msg[16..24].try_into().unwrap()) & !(PAGE as u64 - 1);
        faults.push(addr);
        match fill(addr) {
            Some(page) => copy_page(uffd, addr, &page, copy_mode).unwrap(),
            None => zero_page(uffd, addr).unwrap(),
        }
    }
    faults
}

/// Whether each page of `[base, base + len)` in process `pid` is
/// write-protected (pagemap bit 57, `PM_UFFD_WP`).
pub fn uffd_wp_bits(pid: u32, base: u64, len: u64) -> Vec<bool> {
    let f = std::fs::File::open(format!("/proc/{pid}/pagemap")).unwrap();
    let pages = (len / PAGE as u64) as usize;
    let mut raw = vec![0u8; pages * 8];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut raw, base / PAGE as u64 * 8).unwrap();
    raw.chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()) & (1 << 57) != 0)
        .collect()
}

// --- children -----------------------------------------------------------------

/// What a child printed and how it ended.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn aborted(&self) -> bool {
        use std::os::unix::process::ExitStatusExt;
        self.status.signal() == Some(libc::SIGABRT)
    }
}

/// A command with the library preloaded and every `WANMIG_*` variable
/// cleared (set the ones a test needs).
pub fn preloaded(program: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut c = Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("WANMIG_") {
            c.env_remove(k);
        }
    }
    c.env("LD_PRELOAD", cdylib())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// Waits for `child` (killing it after `timeout`) and collects its output.
pub fn finish(mut child: Child, timeout: Duration) -> Finished {
    drop(child.stdin.take());
    let t_out = drain(child.stdout.take());
    let t_err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let s = child.wait().unwrap();
            let (o, e) = (t_out.join().unwrap(), t_err.join().unwrap());
            panic!("child timed out after {timeout:?} ({s}); stdout:\n{o}\nstderr:\n{e}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Finished {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

fn drain(r: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut r) = r {
            let _ = r.read_to_string(&mut s);
        }
        s
    })
}

/// Sets the flag when dropped, so that helper threads inside a
/// `thread::scope` stop even when the test body panics (the scope would
/// otherwise wait for them forever).
pub struct SetOnDrop<'a>(pub &'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}
