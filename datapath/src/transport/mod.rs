//! Moving frames over TCP with io_uring.
//!
//! Every byte after TCP connect is TLS 1.3 ([`tls`]) unless the migration
//! was asked to run in plaintext.
//!
//! Each migration uses two connections: `bulk` (pre-copy rounds, the freeze
//! remainder, the post-copy background push) and `fault` (post-copy requests
//! and their answers). [`FrameSender`] and [`FrameReceiver`] drive one socket
//! each with their own small ring:
//!
//! - buffers are owned by the transport until the kernel's completion for them
//!   arrives ([`buf::IoBuf`]);
//! - one request is in flight per socket and direction, so a byte stream can
//!   never be reordered;
//! - the bulk sender is paced ([`pacing`]; optionally [`rate`], just below
//!   the bottleneck's rate) so that the fault connection never sits behind
//!   a deep queue on the path;
//! - the kernel is probed once ([`probe`]); without a usable io_uring the same
//!   code runs on blocking calls, or refuses to start if io_uring was required.

pub mod buf;
pub mod pacing;
pub mod probe;
pub mod rate;
pub mod recv;
pub mod send;
pub mod tcp;
pub mod tls;

pub use pacing::{Pacer, PacingConfig};
pub use probe::{
    BackendChoice, IoBackend, IoPreference, ProbeError, select_backend, uring_support,
};
pub use recv::{Flow, FrameHandler, FrameReceiver, RecvConfig, RecvEnd, RecvError, RecvStats};
pub use send::{FrameSender, SendConfig, SendError, SendStats};
pub use tcp::{ConnRole, TcpInfo};
pub use tls::{Encryption, IoPath, TlsError};
