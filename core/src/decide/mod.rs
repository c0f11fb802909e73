//! The sans-IO decision core: nothing here touches a socket or reads the clock; bytes and `now` are
//! passed in, so every decision is unit-tested on a virtual clock.
//!
//! - [`detect`]: what a client speaks, from the bytes that arrived (peeked) and the time.
//! - [`route`]: where a redirected connection goes, by its original destination.
//! - [`authz`]: whether a verified peer may call a local service, and whether a request may pass.
//! - [`cluster`]: endpoint choice and passive health, a state machine driven with `now`.
//! - [`plan`]: one connection -> what to do with it.
//! - [`spin`]: whether a worker spins for the next message instead of sleeping, within a budget.

pub mod authz;
pub mod cluster;
pub mod detect;
pub mod plan;
pub mod route;
pub mod spin;
