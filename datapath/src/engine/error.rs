//! Why a migration failed.

use crate::backend::BackendError;
use crate::transport::RecvError;
use crate::unit_stream::UnitSendError;
use crate::wire::{AbortReason, DecodeError};

/// A migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The hypervisor backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A guest disk image failed.
    #[error("guest disk")]
    Disk(#[from] crate::nbd::DeviceError),
    /// Sending to the peer failed.
    #[error("sending on the {conn} connection")]
    Send {
        /// `bulk` or `fault`.
        conn: &'static str,
        /// The error.
        #[source]
        source: UnitSendError,
    },
    /// Receiving from the peer failed (bad frame, closed connection...).
    #[error("receiving on the {conn} connection: {message}")]
    Recv {
        /// `bulk` or `fault`.
        conn: &'static str,
        /// What happened.
        message: String,
    },
    /// The peer sent something out of order or inconsistent.
    #[error("protocol violation by the peer: {0}")]
    Protocol(String),
    /// The peer gave the migration up.
    #[error("the {peer} aborted the migration ({reason:?})")]
    Aborted {
        /// `source` or `destination`.
        peer: &'static str,
        /// Why, as it said.
        reason: AbortReason,
    },
    /// The connections were set up for another guest shape.
    #[error("the session's {what} is {session}, the guest's {guest}")]
    Geometry {
        /// `page count` or `page size`.
        what: &'static str,
        /// What the handshake settled.
        session: u64,
        /// What the backend has.
        guest: u64,
    },
    /// A wait ran out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A worker thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// A worker thread ended while it was still needed.
    #[error("the {0} thread stopped early")]
    WorkerStopped(&'static str),
    /// The destination would lose data if it went on: the guest is stopped.
    #[error(
        "{missing} pages never arrived: the guest is stopped at the destination (they would read as zeros)"
    )]
    Incomplete {
        /// Pages still missing.
        missing: u64,
        /// What cut the migration short, if it was not just the time limit.
        #[source]
        cause: Option<Box<EngineError>>,
    },
    /// The migration failed before the commit, and resuming the guest at
    /// the source failed too.
    #[error(
        "the guest could not be resumed at the source ({}) after the migration failed",
        crate::error_chain(resume)
    )]
    NotResumed {
        /// Why the migration failed.
        #[source]
        cause: Box<EngineError>,
        /// Why the resume failed.
        resume: BackendError,
    },
}

impl EngineError {
    pub(crate) fn send(conn: &'static str) -> impl FnOnce(UnitSendError) -> EngineError {
        move |source| EngineError::Send { conn, source }
    }

    /// A receive loop's error: the handler's own error as it is, anything
    /// else as a receive failure on `conn`.
    pub(crate) fn from_recv(conn: &'static str, e: RecvError<EngineError>) -> EngineError {
        match e {
            RecvError::Handler(inner) => inner,
            other => EngineError::Recv {
                conn,
                message: crate::error_chain(&other),
            },
        }
    }
}

impl From<DecodeError> for EngineError {
    fn from(e: DecodeError) -> Self {
        EngineError::Protocol(e.to_string())
    }
}

/// A second handle on `rx`'s socket (to shut it down under a thread
/// blocked on it).
pub(crate) fn socket_clone(
    rx: &crate::transport::FrameReceiver,
    conn: &'static str,
) -> Result<std::net::TcpStream, EngineError> {
    rx.socket().try_clone().map_err(|e| EngineError::Recv {
        conn,
        message: format!("cloning the socket: {e}"),
    })
}
