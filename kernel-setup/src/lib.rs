//! Kernel setup for ringside: the host and pod settings the data plane depends on.
//!
//! # Layout
//!
//! - [`sysctl`]: reading and writing `/proc/sys` settings (pipe sizes, backlog, port ranges).
//!
//! Redirect rules (iptables-nft, iptables-legacy, nft) and network-namespace pods come next, with
//! the `ringside-init` binary.

pub mod sysctl;
