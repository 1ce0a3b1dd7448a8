//! The wanmig planner (see issue 3).
