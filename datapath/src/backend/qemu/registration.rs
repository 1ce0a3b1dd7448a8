//! The engine's end of the preload library's handshake: accept QEMU's
//! connection, receive the guest-RAM userfaultfd and its registration
//! message, check it is the mapping we expect, and let QEMU go on.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use wanmig_preload_proto::{
    ACK_ACCEPT, ACK_REFUSE, REGISTRATION_LEN, RegistrationError, UffdMode, UffdRegistration,
};

use crate::uffd::{AdoptError, RecvFdError, Userfaultfd, recv_fd};

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
    /// Binds `path` (replacing a stale socket) with mode 0600.
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
    Ok(Registration { uffd, info })
}
