//! The engine's end of the preload library's handshake: accept QEMU's
//! connection, receive the guest-RAM userfaultfd and its registration
//! message, check it is the mapping we expect, and let QEMU go on.
//!
//! What the preload library reports is checked against the kernel's own
//! view: the features enabled on the descriptor (`/proc/self/fdinfo`: write
//! tracking needs `WP_ASYNC`) and the registration modes of QEMU's mapping
//! (`/proc/<pid>/smaps`, `VmFlags`: `um` for missing-page faults, `uw` for
//! write-protect).

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wanmig_preload_proto::{
    ACK_ACCEPT, ACK_REFUSE, REGISTRATION_LEN, RegistrationError, RegistrationFields,
    RegistrationMsg, UffdMode, UffdRegistration,
};

use crate::uffd::{AdoptError, Features, RecvFdError, Userfaultfd, recv_fd};

/// Receiving QEMU's registration failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationFailure {
    /// The socket could not be set up or accepted on.
    #[error("registration socket {path}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU did not register its RAM in time.
    #[error(
        "QEMU did not register its guest RAM within {0:?} (is LD_PRELOAD set, and the RAM file under /dev/shm/wanmig-?)"
    )]
    Timeout(Duration),
    /// QEMU exited before registering.
    #[error("QEMU exited before registering its guest RAM ({0})")]
    Exited(String),
    /// The descriptor did not arrive.
    #[error("receiving the userfaultfd")]
    Recv(#[from] RecvFdError),
    /// The message is malformed.
    #[error("registration message")]
    Message(#[from] RegistrationError),
    /// The descriptor is not a usable userfaultfd.
    #[error("the descriptor QEMU sent")]
    Adopt(#[from] AdoptError),
    /// The kernel's view of the registration could not be read.
    #[error("inspecting the registration: {0}")]
    Inspect(String),
    /// The registration is not the mapping expected.
    #[error("unexpected registration: {what}: got {got}, expected {expected}")]
    Unexpected {
        /// Which field.
        what: &'static str,
        /// What came.
        got: String,
        /// What was expected.
        expected: String,
    },
}

/// A registered guest-RAM mapping in QEMU.
#[derive(Debug)]
pub struct Registration {
    /// The userfaultfd for the mapping.
    pub uffd: Userfaultfd,
    /// What the preload library reported.
    pub info: UffdRegistration,
}

/// Listens for the preload library's registration.
#[derive(Debug)]
pub struct RegistrationListener {
    listener: UnixListener,
    path: PathBuf,
}

impl RegistrationListener {
    /// Binds `path` (replacing a stale socket) with mode 0600; the socket
    /// file is removed when the listener is dropped.
    pub fn bind(path: &Path) -> Result<Self, RegistrationFailure> {
        let err = |source| RegistrationFailure::Socket {
            path: path.to_path_buf(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(err)?;
        std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .map_err(err)?;
        listener.set_nonblocking(true).map_err(err)?;
        Ok(RegistrationListener {
            listener,
            path: path.to_path_buf(),
        })
    }

    /// Waits for the registration of `ram` (`len` bytes, `mode`); `alive`
    /// tells whether QEMU still runs (`Err(status)` once it exited). A
    /// registration that does not match is refused (QEMU aborts) and is an
    /// error.
    pub fn accept(
        &self,
        ram: &Path,
        len: u64,
        mode: UffdMode,
        timeout: Duration,
        mut alive: impl FnMut() -> Result<(), String>,
    ) -> Result<Registration, RegistrationFailure> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match self.listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    alive().map_err(RegistrationFailure::Exited)?;
                    if Instant::now() >= deadline {
                        return Err(RegistrationFailure::Timeout(timeout));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(source) => {
                    return Err(RegistrationFailure::Socket {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        };
        let io_err = |source| RegistrationFailure::Socket {
            path: self.path.clone(),
            source,
        };
        stream.set_nonblocking(false).map_err(io_err)?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(io_err)?;
        let result = receive(&stream, ram, len, mode);
        let ack = if result.is_ok() {
            ACK_ACCEPT
        } else {
            ACK_REFUSE
        };
        // If QEMU is gone, the answer cannot arrive; the result says why.
        let _ = (&stream).write_all(&[ack]);
        result
    }
}

impl Drop for RegistrationListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn receive(
    stream: &UnixStream,
    ram: &Path,
    len: u64,
    mode: UffdMode,
) -> Result<Registration, RegistrationFailure> {
    let mut msg = [0u8; REGISTRATION_LEN];
    let fd = recv_fd(stream, &mut msg)?;
    let info = UffdRegistration::parse(&msg)?;
    let unexpected = |what, got: String, expected: String| RegistrationFailure::Unexpected {
        what,
        got,
        expected,
    };
    if info.path() != ram {
        return Err(unexpected(
            "path",
            info.path().display().to_string(),
            ram.display().to_string(),
        ));
    }
    if info.len != len || info.file_offset != 0 {
        return Err(unexpected(
            "range",
            format!("{} bytes at file offset {}", info.len, info.file_offset),
            format!("{len} bytes at file offset 0"),
        ));
    }
    if info.mode != mode {
        return Err(unexpected(
            "mode",
            format!("{:?}", info.mode),
            format!("{mode:?}"),
        ));
    }
    let uffd = Userfaultfd::from_owned_fd(fd)?;
    check_features(&uffd, mode)?;
    let smaps = PathBuf::from(format!("/proc/{}/smaps", info.pid));
    let text = std::fs::read_to_string(&smaps)
        .map_err(|e| RegistrationFailure::Inspect(format!("{}: {e}", smaps.display())))?;
    check_vm_flags(&text, info.base, info.len, mode)?;
    Ok(Registration { uffd, info })
}

/// Takes the guest-RAM userfaultfd of a QEMU that was started with the
/// preload library in attach mode (`WANMIG_UFFD_SOCK=attach`): finds the
/// mapping of `ram` in `/proc/<pid>/maps`, QEMU's one userfaultfd in
/// `/proc/<pid>/fd`, copies it with `pidfd_getfd(2)` (ptrace rights: root,
/// or the same user with Yama's `ptrace_scope` 0), and checks it as a
/// hand-over is checked.
pub fn attach_registration(
    pid: u32,
    ram: &Path,
    len: u64,
    mode: UffdMode,
) -> Result<Registration, RegistrationFailure> {
    let inspect = |what: String| RegistrationFailure::Inspect(what);
    // The mapping.
    let maps_path = format!("/proc/{pid}/maps");
    let maps =
        std::fs::read_to_string(&maps_path).map_err(|e| inspect(format!("{maps_path}: {e}")))?;
    let base = maps
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(5)
                .is_some_and(|p| Path::new(p) == ram)
        })
        .filter_map(|l| {
            let (a, _) = l.split_whitespace().next()?.split_once('-')?;
            u64::from_str_radix(a, 16).ok()
        })
        .min()
        .ok_or_else(|| RegistrationFailure::Unexpected {
            what: "guest RAM mapping",
            got: format!("no mapping of {} in QEMU pid {pid}", ram.display()),
            expected: "QEMU's memory-backend-file on that path".into(),
        })?;
    // QEMU's userfaultfd.
    let fd_dir = format!("/proc/{pid}/fd");
    let mut found = Vec::new();
    for e in std::fs::read_dir(&fd_dir).map_err(|e| inspect(format!("{fd_dir}: {e}")))? {
        let Ok(e) = e else { continue };
        let is_uffd =
            std::fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == "anon_inode:[userfaultfd]");
        if is_uffd {
            if let Some(n) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
                found.push(n);
            }
        }
    }
    let target = match found[..] {
        [fd] => fd,
        [] => {
            return Err(RegistrationFailure::Unexpected {
                what: "userfaultfd in QEMU",
                got: format!("none in pid {pid}"),
                expected: "one (start QEMU with LD_PRELOAD=libwanmig_ffi.so, \
                           WANMIG_UFFD_SOCK=attach and WANMIG_UFFD_MODE)"
                    .into(),
            });
        }
        _ => {
            return Err(RegistrationFailure::Unexpected {
                what: "userfaultfd in QEMU",
                got: format!("{} in pid {pid} (fds {found:?})", found.len()),
                expected: "exactly one".into(),
            });
        }
    };
    let fd = take_fd(pid, target)?;
    let uffd = Userfaultfd::from_owned_fd(fd)?;
    check_features(&uffd, mode)?;
    let smaps = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&smaps).map_err(|e| inspect(format!("{smaps}: {e}")))?;
    check_vm_flags(&text, base, len, mode)?;
    let path = ram.as_os_str().as_encoded_bytes();
    let msg = RegistrationMsg::new(&RegistrationFields {
        mode,
        pid: pid as i32,
        base,
        len,
        file_offset: 0,
        features: mode.api_features(),
        ioctls: 0,
        path,
    })?;
    let info = UffdRegistration::parse(zerocopy::IntoBytes::as_bytes(&msg))?;
    Ok(Registration { uffd, info })
}

/// A copy of descriptor `target` of process `pid` (`pidfd_getfd(2)`).
fn take_fd(pid: u32, target: i32) -> Result<std::os::fd::OwnedFd, RegistrationFailure> {
    use std::os::fd::FromRawFd;
    let fail = |what: &str, e: std::io::Error| {
        let hint = if e.raw_os_error() == Some(libc::EPERM) {
            " (needs ptrace rights over QEMU: run as root, or as its user with \
             /proc/sys/kernel/yama/ptrace_scope = 0)"
        } else {
            ""
        };
        RegistrationFailure::Inspect(format!("{what} of QEMU pid {pid}: {e}{hint}"))
    };
    // SAFETY: pidfd_open takes a pid and flags and returns a new descriptor.
    let pidfd =
        unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_long, 0 as libc::c_long) };
    if pidfd < 0 {
        return Err(fail("pidfd_open", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_open returned a descriptor we own.
    let pidfd = unsafe { std::os::fd::OwnedFd::from_raw_fd(pidfd as i32) };
    let raw = {
        use std::os::fd::AsRawFd;
        // SAFETY: pidfd_getfd takes a pidfd, a target descriptor number and
        // flags, and returns a new descriptor (close-on-exec).
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_getfd,
                pidfd.as_raw_fd() as libc::c_long,
                target as libc::c_long,
                0 as libc::c_long,
            )
        }
    };
    if raw < 0 {
        return Err(fail("pidfd_getfd", std::io::Error::last_os_error()));
    }
    // SAFETY: pidfd_getfd returned a descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(raw as i32) })
}

/// The descriptor has the features `mode` relies on enabled.
fn check_features(uffd: &Userfaultfd, mode: UffdMode) -> Result<(), RegistrationFailure> {
    let features = uffd
        .negotiated_features()
        .map_err(|e| RegistrationFailure::Inspect(e.to_string()))?;
    let Some(features) = features else {
        return Err(RegistrationFailure::Unexpected {
            what: "userfaultfd features",
            got: "UFFDIO_API not done".into(),
            expected: "negotiated".into(),
        });
    };
    if mode.tracks_writes() && !features.contains(Features::WP_ASYNC) {
        return Err(RegistrationFailure::Unexpected {
            what: "userfaultfd features",
            got: format!("{features}"),
            expected: "WP_ASYNC".into(),
        });
    }
    Ok(())
}

/// Every mapping of `[base, base + len)` in `smaps` carries the userfaultfd
/// registration flags of `mode` (`um` missing, `uw` write-protect), and the
/// mappings cover the whole range.
fn check_vm_flags(
    smaps: &str,
    base: u64,
    len: u64,
    mode: UffdMode,
) -> Result<(), RegistrationFailure> {
    let end = base.saturating_add(len);
    let mut want = Vec::new();
    if mode.reports_missing() {
        want.push("um");
    }
    if mode.tracks_writes() {
        want.push("uw");
    }
    let mut current: Option<(u64, u64)> = None;
    let mut covered = 0u64;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            let Some((start, stop)) = current.take() else {
                continue;
            };
            let (lo, hi) = (start.max(base), stop.min(end));
            if lo >= hi {
                continue;
            }
            covered += hi - lo;
            let have: Vec<&str> = flags.split_whitespace().collect();
            if let Some(missing) = want.iter().find(|f| !have.contains(f)) {
                return Err(RegistrationFailure::Unexpected {
                    what: "registration of the guest RAM mapping (VmFlags)",
                    got: format!("{:#x}-{:#x}: {}", start, stop, flags.trim()),
                    expected: format!("{} ({mode:?}), missing {missing}", want.join(" ")),
                });
            }
        } else if let Some(range) = line.split_whitespace().next() {
            // A mapping's header line: "start-end perms offset dev inode path".
            if let Some((a, b)) = range.split_once('-') {
                if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                    current = Some((a, b));
                }
            }
        }
    }
    if covered != len {
        return Err(RegistrationFailure::Unexpected {
            what: "guest RAM mapping",
            got: format!("{covered} bytes mapped at {base:#x}"),
            expected: format!("{len} bytes"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
7f0000000000-7f0000200000 rw-s 00000000 00:1a 42 /dev/shm/wanmig-x-destination
Size:               2048 kB
Rss:                   0 kB
VmFlags: rd wr sh mr mw me ms sd um uw
7f0000200000-7f0000400000 rw-s 00200000 00:1a 42 /dev/shm/wanmig-x-destination
Size:               2048 kB
VmFlags: rd wr sh mr mw me ms sd uw
7f0000400000-7f0000401000 rw-p 00000000 00:00 0
VmFlags: rd wr mr mw me ac sd
";

    #[test]
    fn the_mapping_must_carry_the_registration_flags() {
        let base = 0x7f00_0000_0000;
        // The first 2 MiB: both modes.
        check_vm_flags(SMAPS, base, 2 << 20, UffdMode::MissingWpAsync).unwrap();
        // All 4 MiB: write tracking everywhere, missing faults only on half.
        check_vm_flags(SMAPS, base, 4 << 20, UffdMode::WpAsync).unwrap();
        let e = check_vm_flags(SMAPS, base, 4 << 20, UffdMode::Missing).unwrap_err();
        assert!(e.to_string().contains("VmFlags"), "{e}");
        // A range not entirely mapped.
        let e = check_vm_flags(SMAPS, base, 8 << 20, UffdMode::WpAsync).unwrap_err();
        assert!(e.to_string().contains("guest RAM mapping"), "{e}");
    }
}
