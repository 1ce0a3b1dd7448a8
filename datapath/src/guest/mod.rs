//! Guest memory as the engine touches it on each side of a migration.

pub mod dest_memory;
pub mod source_memory;

pub use dest_memory::{DestMemory, DestMemoryError};
pub use source_memory::{SourceMemory, SourceMemoryError};
