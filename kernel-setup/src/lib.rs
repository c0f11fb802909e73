//! Kernel setup for ringside: the host and pod settings the data plane depends on.
//!
//! # Layout
//!
//! - [`sysctl`]: reading and writing `/proc/sys` settings (pipe sizes, backlog, port ranges).
//! - [`redirect`]: the pod's traffic-redirect rules (iptables-nft, iptables-legacy, nft), used by the
//!   `ringside-init` binary.

pub mod redirect;
pub mod sysctl;
