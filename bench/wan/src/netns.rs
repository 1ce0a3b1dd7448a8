//! Named network namespaces (the two "hosts" of a WAN) and running code in them.
//!
//! Namespaces are created and deleted with `ip netns add/del`, so they are the
//! ordinary named namespaces that `ip netns list` shows, bind-mounted at
//! `/run/netns/<name>`.
//!
//! Two ways to run code inside one:
//! - [`spawn_in`] starts a thread that `setns(CLONE_NEWNET)`s into the namespace
//!   before running a closure. The network namespace is per thread, so every
//!   socket that closure creates lives in the namespace, while the rest of the
//!   process stays where it is.
//! - [`command`] returns a [`Command`] whose child `setns`es into the namespace
//!   between `fork` and `exec` (a `pre_exec` hook). This is used instead of
//!   prefixing `ip netns exec`: there is no intermediate program, the child's pid
//!   is the program's own pid (so it can be signalled and waited for directly),
//!   and nothing is remounted. What `ip netns exec` does beyond `setns` (bind
//!   mounting `/etc/netns/<name>/*`, remounting `/sys` for the namespace) is not
//!   needed by the programs run here (`iperf3`, `ping`, the engine).

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;
use std::thread::JoinHandle;

use super::cmd::{self, CommandError};

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";

/// A namespace operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// `ip netns add/del` failed.
    #[error(transparent)]
    Command(#[from] CommandError),
    /// No namespace of that name exists.
    #[error("network namespace {ns:?} does not exist ({NETNS_DIR}/{ns} is missing)")]
    NotFound {
        /// The namespace name.
        ns: String,
    },
    /// The namespace file could not be opened.
    #[error("cannot open network namespace {ns:?}")]
    Open {
        /// The namespace name.
        ns: String,
        /// The `open` error.
        source: io::Error,
    },
    /// `setns` was refused (not root?).
    #[error("setns into network namespace {ns:?} failed")]
    Setns {
        /// The namespace name.
        ns: String,
        /// The `setns` error.
        source: io::Error,
    },
    /// The thread could not be started.
    #[error("cannot start a thread for network namespace {ns:?}")]
    Thread {
        /// The namespace name.
        ns: String,
        /// The error from `std::thread::Builder::spawn`.
        source: io::Error,
    },
    /// Listing `/proc` or `/run/netns` failed.
    #[error("cannot read {path}")]
    Io {
        /// The path being read.
        path: String,
        /// The error.
        source: io::Error,
    },
    /// A thread run in the namespace panicked.
    #[error("a thread in network namespace {ns:?} panicked")]
    Panicked {
        /// The namespace name.
        ns: String,
    },
    /// Writing a sysctl inside the namespace failed.
    #[error("cannot set {key} = {value} in network namespace {ns:?}")]
    Sysctl {
        /// The namespace name.
        ns: String,
        /// The sysctl, e.g. `net.ipv4.ip_forward`.
        key: String,
        /// The value written.
        value: String,
        /// The write error.
        source: io::Error,
    },
}

/// The bind-mount path of a named namespace, `/run/netns/<ns>`.
pub fn path(ns: &str) -> PathBuf {
    PathBuf::from(NETNS_DIR).join(ns)
}

/// Whether a named namespace exists.
pub fn exists(ns: &str) -> bool {
    path(ns).exists()
}

/// The names of all named namespaces (what `ip netns list` shows), sorted.
pub fn list() -> Result<Vec<String>, NetnsError> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetnsError::Io {
                path: NETNS_DIR.into(),
                source,
            });
        }
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    Ok(names)
}

/// Creates a named namespace (`ip netns add`).
pub fn add(ns: &str) -> Result<(), NetnsError> {
    cmd::run("ip", ["netns", "add", ns])?;
    Ok(())
}

/// Deletes a named namespace (`ip netns del`); no error if it does not exist.
///
/// Processes and threads still inside keep the namespace alive, unnamed, until
/// they leave or exit; see [`pids`].
pub fn delete(ns: &str) -> Result<(), NetnsError> {
    if !exists(ns) {
        return Ok(());
    }
    match cmd::run("ip", ["netns", "del", ns]) {
        Ok(_) => Ok(()),
        // Lost a race with another deleter.
        Err(_) if !exists(ns) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// An open handle on a network namespace: keeps it reachable even after its
/// name is deleted.
#[derive(Debug)]
pub struct NsHandle {
    name: String,
    file: File,
}

/// Opens a named namespace.
pub fn open(ns: &str) -> Result<NsHandle, NetnsError> {
    match File::open(path(ns)) {
        Ok(file) => Ok(NsHandle {
            name: ns.to_string(),
            file,
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            Err(NetnsError::NotFound { ns: ns.into() })
        }
        Err(source) => Err(NetnsError::Open {
            ns: ns.into(),
            source,
        }),
    }
}

impl NsHandle {
    /// The name the namespace was opened by.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Moves the calling thread into this namespace (`setns(CLONE_NEWNET)`).
    /// Sockets the thread creates afterwards live there.
    pub fn enter(&self) -> Result<(), NetnsError> {
        // SAFETY: `self.file` is an open namespace file descriptor for the whole
        // call; setns only changes the calling thread's network namespace.
        let rc = unsafe { libc::setns(self.file.as_raw_fd(), libc::CLONE_NEWNET) };
        if rc == 0 {
            Ok(())
        } else {
            Err(NetnsError::Setns {
                ns: self.name.clone(),
                source: io::Error::last_os_error(),
            })
        }
    }

    /// A second handle on the same namespace (`dup` of the fd).
    pub fn try_clone(&self) -> Result<NsHandle, NetnsError> {
        Ok(NsHandle {
            name: self.name.clone(),
            file: self.file.try_clone().map_err(|source| NetnsError::Open {
                ns: self.name.clone(),
                source,
            })?,
        })
    }

    /// Runs `f` on a new thread inside this namespace; see [`spawn_in`].
    pub fn spawn<F, T>(&self, f: F) -> Result<JoinHandle<T>, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let handle = self.try_clone()?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<(), NetnsError>>(1);
        let ns = self.name.clone();
        let handle = std::thread::Builder::new()
            .name(format!("netns-{ns}"))
            .spawn(move || {
                if let Err(e) = handle.enter() {
                    let _ = tx.send(Err(e));
                    // Unwind without running the panic hook: the caller reports
                    // the error itself.
                    std::panic::resume_unwind(Box::new("setns failed"));
                }
                drop(handle);
                let _ = tx.send(Ok(()));
                f()
            })
            .map_err(|source| NetnsError::Thread {
                ns: ns.clone(),
                source,
            })?;
        match rx.recv() {
            Ok(Ok(())) => Ok(handle),
            Ok(Err(e)) => {
                let _ = handle.join();
                Err(e)
            }
            Err(_) => {
                let _ = handle.join();
                Err(NetnsError::Panicked { ns })
            }
        }
    }

    /// Runs `f` inside this namespace on a helper thread and waits for its
    /// result.
    pub fn run<F, T>(&self, f: F) -> Result<T, NetnsError>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let ns = self.name.clone();
        self.spawn(f)?
            .join()
            .map_err(|_| NetnsError::Panicked { ns })
    }

    /// Whether an interface of that name exists in this namespace.
    pub fn has_interface(&self, ifname: &str) -> Result<bool, NetnsError> {
        let ifname = ifname.to_string();
        self.run(move || interface_index(&ifname).is_some())
    }
}

/// Starts a thread that enters network namespace `ns` and then runs `f`.
///
/// Sockets created by `f` live in `ns`. The namespace file is opened before the
/// thread starts and `setns` has succeeded when this returns `Ok`, so a missing
/// namespace or a refused `setns` is an error here, never a panic in the thread.
pub fn spawn_in<F, T>(ns: &str, f: F) -> Result<JoinHandle<T>, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    open(ns)?.spawn(f)
}

/// Runs `f` inside `ns` on a helper thread and waits for its result.
pub fn run_in<F, T>(ns: &str, f: F) -> Result<T, NetnsError>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    open(ns)?.run(f)
}

/// Sets sysctl `key` (dotted, e.g. `net.ipv4.ip_forward`; its path is
/// `/proc/sys/<key with '.' as '/'>`, so interface names in it must not contain
/// dots) to `value` inside namespace `ns`.
///
/// `/proc/sys/net` shows the network namespace of the thread that opens the
/// file, so the write runs on a helper thread inside `ns` ([`run_in`]) and
/// needs no `sysctl` program.
pub fn set_sysctl(ns: &str, key: &str, value: &str) -> Result<(), NetnsError> {
    let path = format!("/proc/sys/{}", key.replace('.', "/"));
    let v = value.to_string();
    run_in(ns, move || std::fs::write(path, v))?.map_err(|source| NetnsError::Sysctl {
        ns: ns.into(),
        key: key.into(),
        value: value.into(),
        source,
    })
}

/// Whether interface `ifname` exists in namespace `ns`.
pub fn has_interface(ns: &str, ifname: &str) -> Result<bool, NetnsError> {
    open(ns)?.has_interface(ifname)
}

/// The index of interface `ifname` in the calling thread's namespace.
pub fn interface_index(ifname: &str) -> Option<u32> {
    let name = CString::new(ifname).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// A [`Command`] for `program` whose child runs inside network namespace `ns`.
///
/// The child `setns`es between `fork` and `exec` (see the module docs for why not
/// `ip netns exec`). If `ns` does not exist, `spawn`/`output`/`status` on the
/// returned command fail with `NotFound`.
pub fn command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut command = Command::new(program);
    // A name with a NUL byte cannot exist; the empty path makes `open` fail
    // with ENOENT in the child.
    let ns_path = CString::new(path(ns).as_os_str().as_bytes()).unwrap_or_default();
    let enter = move || -> io::Result<()> {
        // SAFETY: `ns_path` is a valid NUL-terminated string owned by this
        // closure; open is async-signal-safe and allocates nothing.
        let fd = unsafe { libc::open(ns_path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by open and is owned here only; the
        // File closes it on drop (close is async-signal-safe).
        let file = unsafe { File::from_raw_fd(fd) };
        // SAFETY: setns is async-signal-safe; `file` is an open namespace fd.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: the hook runs in the child between fork and exec and only calls
    // async-signal-safe functions (open, setns, close) on memory prepared before
    // the fork; it takes no locks and does not allocate.
    unsafe {
        command.pre_exec(enter);
    }
    command
}

/// Process ids whose (main thread's) network namespace is `ns`, like
/// `ip netns pids`. Our own process is never included.
pub fn pids(ns: &str) -> Result<Vec<u32>, NetnsError> {
    let target = match std::fs::metadata(path(ns)) {
        Ok(m) => (m.dev(), m.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(NetnsError::Io {
                path: path(ns).display().to_string(),
                source,
            });
        }
    };
    let me = std::process::id();
    let proc = std::fs::read_dir("/proc").map_err(|source| NetnsError::Io {
        path: "/proc".into(),
        source,
    })?;
    let mut out = Vec::new();
    for entry in proc.filter_map(|e| e.ok()) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let same = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .map(|m| (m.dev(), m.ino()) == target)
            .unwrap_or(false);
        if same {
            out.push(pid);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_namespace_is_a_typed_error() {
        match spawn_in("wanmig-no-such-ns", || ()) {
            Err(NetnsError::NotFound { ns }) => assert_eq!(ns, "wanmig-no-such-ns"),
            other => panic!("unexpected {other:?}"),
        }
        let err = command("wanmig-no-such-ns", "true").status().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
        assert!(pids("wanmig-no-such-ns").unwrap().is_empty());
        assert!(matches!(
            set_sysctl("wanmig-no-such-ns", "net.ipv4.ip_forward", "1"),
            Err(NetnsError::NotFound { .. })
        ));
    }
}
