//! io_uring transport (being written).
