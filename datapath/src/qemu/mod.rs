//! The QEMU side of the engine: a typed QMP client that drives QEMU through
//! stop, device-state migration (`x-ignore-shared`: the guest RAM stays in its
//! shared file and moves through the engine) and cont.

pub mod qapi;
pub mod qmp;

pub use qapi::{MigrationInfo, MigrationRamStats, MigrationStatus, RunState, StatusInfo};
pub use qmp::{QemuVersion, QmpClient, QmpError, QmpEvent, QmpGreeting};
