//! The wanmig engine's library: everything that moves guest state across the WAN.
//!
//! wanmig migrates a running virtual machine between data centres over a slow,
//! distant link with a *fractional hybrid copy*: it pre-copies the important
//! fraction `M` of memory and `S` of storage while the guest runs, freezes it
//! briefly, and post-copies the rest on demand at the destination.
//!
//! This crate is the data path of that engine:
//! - [`wire`]: the frame format and the authenticated handshake spoken between a
//!   source and a destination engine (the one place the wire format is defined).
//! - [`transport`]: io_uring send and receive loops that move frames over TCP,
//!   with buffers owned until their completion and bulk pacing that keeps the
//!   fault connection out of deep queues.
//! - [`nbd`]: the NBD server through which QEMU reaches a guest's disks.
//! - [`storage`]: guest disks during a migration: the source's chunk log, the
//!   destination's post-copy image.

pub mod backend;
mod bits;
pub mod connection;
pub mod engine;
pub mod guest;
pub mod host;
pub mod migration;
pub mod nbd;
pub mod planning;
pub mod profiling;
pub mod qemu;
pub mod report;
pub mod storage;
pub mod transport;
pub mod uffd;
pub mod unit_stream;
pub mod wire;

/// An error and its causes on one line, `: `-separated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut next = e.source();
    while let Some(c) = next {
        s.push_str(": ");
        s.push_str(&c.to_string());
        next = c.source();
    }
    s
}
