//! The wanmig wire protocol (being written).
