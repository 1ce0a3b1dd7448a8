//! wanmig benchmarks and WAN emulator.
