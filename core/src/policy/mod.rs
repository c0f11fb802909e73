//! The policy model, pure: intentions (who may call whom), L7 rules (routes, splits, permissions),
//! SPIFFE identities, and the request-path normalization permissions are matched on.

pub mod identity;
pub mod intentions;
pub mod path;
pub mod rules;
