//! What a proxy tells operators: per-worker counters (labelled L4 ones in [`tcp`]), the ring of recent failures (`/events`) and
//! the access log.

pub mod access_log;
pub mod events;
pub mod stats;
pub mod tcp;
