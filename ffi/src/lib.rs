//! wanmig C ABI.
