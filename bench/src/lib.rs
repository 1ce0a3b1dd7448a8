//! wanmig's benchmarks and the emulated WAN they run on.
//!
//! - [`wan`] (the `wanmig-wan` crate): two host namespaces, each behind a
//!   router namespace whose tbf is the bottleneck, joined by a userspace TUN
//!   delay line (the kernel here has no netem).
//! - [`link`]: the datapath's goodput against iperf3 on the same link.
//! - [`nbd`]: the engine's NBD server against `qemu-nbd`, same client, same run.
//! - [`profile_overhead`]: what profiling (write log, read sampling) costs
//!   the guest.
//! - [`content`]: deterministic page contents (random, text, zero, mixed).
//! - [`eval`]: predicted vs measured, and every mode's Gamma, per workload.
//! - [`timeline`]: a migration's bytes, phases and faults over time (PNG).
//! - [`qemu_native`]: QEMU migrating the guest itself (pre-copy with disk
//!   mirroring, post-copy, hybrid) on the same WAN: the evaluation's baselines.
//! - [`xen`]: the nested Xen correctness lab (Xen under QEMU TCG, a PVH
//!   guest migrated to localhost with `xl migrate`, engine and stock).

pub mod content;
pub mod eval;
pub mod link;
pub mod nbd;
pub mod predictability;
pub mod profile_overhead;
pub mod qemu_native;
pub mod timeline;
pub mod xen;
pub use wanmig_wan as wan;
