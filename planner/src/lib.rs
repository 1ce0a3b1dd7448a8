//! The wanmig planner (issue 3 fills in the model, profiles and search).

pub mod units;
