//! What the running kernel's io_uring offers, and which I/O backend to use.
//!
//! The transport prefers io_uring. The kernel may refuse it altogether
//! (`kernel.io_uring_disabled`, a seccomp filter, an old kernel) or lack an
//! opcode; then [`IoPreference::Auto`] falls back to plain blocking socket
//! calls with the reason recorded, and [`IoPreference::Uring`] fails with a
//! clear error instead.

use std::fmt;
use std::str::FromStr;
use std::sync::OnceLock;

use io_uring::{IoUring, Probe, opcode};

/// Opcodes the transport cannot work without.
const REQUIRED: [(u8, &str); 3] = [
    (opcode::Send::CODE, "IORING_OP_SEND"),
    (opcode::Recv::CODE, "IORING_OP_RECV"),
    (opcode::AsyncCancel::CODE, "IORING_OP_ASYNC_CANCEL"),
];

/// What the kernel's io_uring supports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UringSupport {
    /// `IORING_OP_SEND_ZC` (zero-copy send).
    pub send_zc: bool,
    /// `IORING_OP_READ` / `IORING_OP_WRITE` (disk I/O).
    pub read_write: bool,
    /// Required opcodes the kernel lacks (empty when usable).
    pub missing: Vec<&'static str>,
}

impl UringSupport {
    /// Whether the transport can run on io_uring.
    pub fn usable(&self) -> bool {
        self.missing.is_empty()
    }
}

/// io_uring could not be probed at all.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProbeError {
    /// `io_uring_setup` failed: disabled by sysctl or seccomp, or too old a kernel.
    #[error("io_uring is not available (io_uring_setup: {0}); check kernel.io_uring_disabled")]
    Setup(String),
    /// `IORING_REGISTER_PROBE` failed (kernels before 5.6).
    #[error("cannot probe io_uring opcodes: {0}")]
    Probe(String),
    /// The caller insisted on io_uring and an opcode is missing.
    #[error("io_uring lacks required opcodes: {}", .0.join(", "))]
    Missing(Vec<&'static str>),
}

/// Probes io_uring once per process (the answer cannot change).
pub fn uring_support() -> Result<UringSupport, ProbeError> {
    static CACHE: OnceLock<Result<UringSupport, ProbeError>> = OnceLock::new();
    CACHE.get_or_init(probe_now).clone()
}

fn probe_now() -> Result<UringSupport, ProbeError> {
    let ring = IoUring::new(2).map_err(|e| ProbeError::Setup(e.to_string()))?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| ProbeError::Probe(e.to_string()))?;
    let missing = REQUIRED
        .iter()
        .filter(|(code, _)| !probe.is_supported(*code))
        .map(|&(_, name)| name)
        .collect();
    Ok(UringSupport {
        send_zc: probe.is_supported(opcode::SendZc::CODE),
        read_write: probe.is_supported(opcode::Read::CODE)
            && probe.is_supported(opcode::Write::CODE),
        missing,
    })
}

/// Which backend the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum IoPreference {
    /// io_uring when usable, otherwise blocking calls.
    #[default]
    Auto,
    /// io_uring or an error.
    Uring,
    /// Plain blocking socket calls (for comparison and restricted kernels).
    Blocking,
}

impl FromStr for IoPreference {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(IoPreference::Auto),
            "uring" | "io_uring" => Ok(IoPreference::Uring),
            "blocking" => Ok(IoPreference::Blocking),
            _ => Err(format!("unknown I/O backend {s:?} (auto, uring, blocking)")),
        }
    }
}

/// The backend in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoBackend {
    /// io_uring submission and completion queues.
    Uring,
    /// Blocking `send`/`recv`.
    Blocking,
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IoBackend::Uring => "io_uring",
            IoBackend::Blocking => "blocking",
        })
    }
}

/// The chosen backend, and why it is not io_uring when it falls back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendChoice {
    /// The backend to use.
    pub backend: IoBackend,
    /// Why `Auto` fell back to blocking calls.
    pub fallback_reason: Option<String>,
}

/// Picks the backend for a preference.
pub fn select_backend(pref: IoPreference) -> Result<BackendChoice, ProbeError> {
    let uring = |reason| BackendChoice {
        backend: IoBackend::Uring,
        fallback_reason: reason,
    };
    match pref {
        IoPreference::Blocking => Ok(BackendChoice {
            backend: IoBackend::Blocking,
            fallback_reason: None,
        }),
        IoPreference::Uring => {
            let s = uring_support()?;
            if s.usable() {
                Ok(uring(None))
            } else {
                Err(ProbeError::Missing(s.missing))
            }
        }
        IoPreference::Auto => match uring_support() {
            Ok(s) if s.usable() => Ok(uring(None)),
            Ok(s) => Ok(BackendChoice {
                backend: IoBackend::Blocking,
                fallback_reason: Some(ProbeError::Missing(s.missing).to_string()),
            }),
            Err(e) => Ok(BackendChoice {
                backend: IoBackend::Blocking,
                fallback_reason: Some(e.to_string()),
            }),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_kernel_offers_what_the_transport_needs() {
        // The project targets kernels with full io_uring (6.x); if this fails
        // the machine is not the kind the project supports, say so plainly.
        let s = uring_support().expect("io_uring must be available on this machine kind");
        assert!(s.usable(), "missing: {:?}", s.missing);
        assert_eq!(
            select_backend(IoPreference::Auto).unwrap().backend,
            IoBackend::Uring
        );
        assert_eq!(
            select_backend(IoPreference::Uring).unwrap().fallback_reason,
            None
        );
    }

    #[test]
    fn blocking_preference_is_honoured() {
        let c = select_backend(IoPreference::Blocking).unwrap();
        assert_eq!(c.backend, IoBackend::Blocking);
        assert_eq!(
            "blocking".parse::<IoPreference>().unwrap(),
            IoPreference::Blocking
        );
        assert!("epoll".parse::<IoPreference>().is_err());
    }
}
