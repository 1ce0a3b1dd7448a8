//! The emulated WAN (being written).
