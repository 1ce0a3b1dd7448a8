//! wanmig benchmarks and the emulated WAN.

pub mod wan;
