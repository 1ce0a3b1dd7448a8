//! wanmig's benchmarks and the emulated WAN they run on.
//!
//! - [`wan`]: two network namespaces joined by a rate-limited, delayed link
//!   (`tbf` plus a userspace TUN delay line: the kernel here has no netem).
//! - [`link`]: the datapath's goodput against iperf3 on the same link.
//! - [`content`]: deterministic page contents (random, text, zero, mixed).

pub mod content;
pub mod link;
pub mod wan;
