//! ringside's data plane.
//!
//! # Layout
//!
//! Folders follow the stages of a connection; a folder only uses the ones listed before it
//! (checked by a test, `tests/tests/layout.rs`), top-level modules (`reason`, `server`) excepted.
//!
//! - [`policy`]: who may call whom and what requests may do: intentions (Consul's precedence),
//!   L7 rules (routes, splits, permissions), SPIFFE IDs, request-path normalization. Pure.
//! - [`config`]: the configuration document (TOML/YAML) and its validation into a typed [`Config`].
//! - [`decide`]: the sans-IO decision core: protocol detection fed with bytes and `now`, routing by
//!   original destination, authorization, endpoint choice (the `Cluster` state machine, clock
//!   passed in) and [`decide::plan`], which turns one connection into what to do with it.
//! - [`telemetry`]: per-worker counters, the ring of recent failures, the access log.
//! - [`tls`]: mesh TLS (rustls, TLS 1.3) with SPIFFE identities: certificates, verifiers, the
//!   sidecar's per-role configs, and the one place rustls connections are set up.
//! - [`io`]: what touches the kernel: worker threads and their runtimes, connects, the splice/copy
//!   relay, the TLS relay, raw syscalls (the only `unsafe` code), `/proc` readers.
//! - [`l7`]: the L7 path: HTTP connections handed over from the workers to hyper on tokio
//!   (routing, retries, timeouts, permissions per request, local replies that explain).
//! - [`conn`]: a connection's whole life, one file per direction (`outbound`, `inbound`,
//!   `tunnel`): accept, plan, connect, relay, end; one outcome record per connection.
//! - [`admin`]: the admin (`/stats`, `/config_dump`, `/clusters`, `/certs`, `/events`, `/logging`)
//!   and health servers.
//! - [`control`]: the client of the control daemon (`run --ctl`): certificate, config watch, reports.
//! - [`server`]: [`Proxy::start`] binds listeners and starts one worker per core; drain on shutdown.
//! - [`reason`]: failure reason codes: every failed connection carries exactly one.

pub mod admin;
pub mod config;
pub mod conn;
pub mod control;
pub mod decide;
pub mod io;
pub mod l7;
pub mod policy;
pub mod reason;
pub mod server;
pub mod telemetry;
pub mod tls;

pub use config::Config;
pub use decide::cluster as upstream;
pub use io::{listening, relay, sys, tls_relay};
pub use policy::{identity, intentions};
pub use reason::Reason;
pub use server::{ClusterStatus, ConfigSnapshot, DrainReport, EndpointStatus, Proxy, Updater};
pub use telemetry::{access_log, stats};
