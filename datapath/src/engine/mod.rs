//! The migration engine: the three phases of a fractional hybrid copy, on top
//! of a hypervisor backend and a pair of authenticated connections.

pub mod dest;
pub mod error;
pub mod page_order;
pub mod page_states;
pub mod source;

pub use dest::{DestConfig, DestReport, DestTimes, IntegrityReport, run_destination};
pub use error::EngineError;
pub use page_order::{PageOrder, PageOrderError};
pub use page_states::{PageState, PageStates};
pub use source::{RoundReport, SourceConfig, SourceReport, SourceTimes, run_source};
