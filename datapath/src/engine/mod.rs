//! The migration engine: the three phases of a fractional hybrid copy, on top
//! of a hypervisor backend and a pair of authenticated connections.

pub mod dest;
pub mod error;
pub mod page_order;
pub mod page_states;
pub mod plan_channel;
mod readahead;
pub mod source;

pub use dest::{
    DestConfig, DestReport, DestTimes, FaultTimeline, IntegrityReport, run_destination,
};
pub use error::EngineError;
pub use page_order::{Adopted, NO_PAGE, PageOrder, PageOrderError, PushSequence, PushUnit};
pub use page_states::{PageState, PageStates};
pub use plan_channel::{AppliedPlan, NewPlan, NoPlanChannel, PlanChannel};
pub use source::{
    RoundReport, SourceConfig, SourceReport, SourceTimes, run_source, run_source_adaptive,
};
