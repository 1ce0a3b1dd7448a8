//! Why a migration failed.

use crate::backend::BackendError;
use crate::transport::RecvError;
use crate::unit_stream::UnitSendError;
use crate::wire::DecodeError;

/// A migration step failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The hypervisor backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
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
    /// A wait ran out.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// A worker thread panicked.
    #[error("the {0} thread panicked")]
    Panicked(&'static str),
    /// The destination would lose data if it went on.
    #[error(
        "{missing} pages never arrived: refusing to release the guest (they would read as zeros)"
    )]
    Incomplete {
        /// Pages still absent.
        missing: u64,
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
                message: other.to_string(),
            },
        }
    }
}

impl From<DecodeError> for EngineError {
    fn from(e: DecodeError) -> Self {
        EngineError::Protocol(e.to_string())
    }
}
