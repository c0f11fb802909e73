//! ringside's data plane.
//!
//! # Layout
//!
//! - [`admin`]: the admin (`/stats`, `/config_dump`, `/clusters`, `/certs`, `/events`, `/logging`)
//!   and health servers.
//! - [`config`]: the configuration document (TOML/YAML) and its validation into a typed [`Config`].
//! - [`control`]: the client of the control daemon (`run --ctl`): certificate, config watch, reports.
//! - [`server`]: [`Proxy::start`] binds listeners and starts one worker per core; drain on shutdown.
//! - `worker`: a worker thread — monoio runtime (io_uring or epoll), accept loop, per-connection task.
//! - [`route`]: where a redirected connection goes (outbound by original destination, inbound to
//!   the local app on its `targetPort`).
//! - [`l7`]: the L7 path: HTTP connections handed over from the workers to hyper on tokio
//!   (routing, retries, timeouts, local replies that explain).
//! - [`listening`]: what listens in the pod (`/proc/net/tcp`), for `app_not_listening` hints.
//! - [`upstream`]: endpoint choice (round-robin, least-connections) and passive health (ejection).
//! - [`relay`]: moving bytes both ways with splice through pooled pipes (or a pooled buffer for small
//!   messages), exact half-close, reset propagation, idle timeout.
//! - [`sys`]: the raw kernel calls (splice, recv/send, socket options); the only `unsafe` code.
//! - [`tls`], [`tls_relay`]: mesh TLS (rustls, ring, TLS 1.3) with SPIFFE identities; the relay
//!   between a plaintext and a TLS socket driven from the workers.
//! - [`intentions`], [`identity`]: who may call whom (Consul's precedence), SPIFFE IDs.
//! - [`stats`]: per-worker counters summed on demand.
//! - [`reason`]: failure reason codes: every failed connection carries exactly one.

pub mod access_log;
pub mod admin;
pub mod config;
pub mod control;
pub mod identity;
pub mod intentions;
pub mod l7;
pub mod listening;
mod mesh;
pub mod reason;
pub mod relay;
pub mod route;
pub mod server;
pub mod sniff;
pub mod stats;
pub mod sys;
pub mod tls;
pub mod tls_relay;
pub mod upstream;
mod worker;

pub use config::Config;
pub use reason::Reason;
pub use server::{ClusterStatus, ConfigSnapshot, DrainReport, EndpointStatus, Proxy, Updater};
