//! Configuration in two steps: a serde document with defaults ([`ConfigFile`]), then a validated,
//! typed [`Config`] that the data plane runs. `Config` is `Serialize` so that what runs can be shown
//! exactly (`/config_dump`, `ringctl validate --print`).
//!
//! Errors name the field (a path such as `services[0].endpoints[1]`) and, where the text has one,
//! the line.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Which io_uring / epoll driver the workers run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// io_uring when the kernel allows it, else epoll (logged once).
    #[default]
    Auto,
    /// io_uring only; fail to start without it.
    Uring,
    /// epoll only.
    Epoll,
}

/// How bytes are moved between the two sockets of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CopyMode {
    /// Read a first chunk into a small pooled buffer; splice once a transfer turns out to be bulk.
    #[default]
    Adaptive,
    /// Always splice through a pooled pipe.
    Splice,
    /// Always copy through a pooled user-space buffer.
    Copy,
}

/// How an endpoint is picked for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    /// Each endpoint in turn.
    #[default]
    RoundRobin,
    /// The endpoint with the fewest open connections (ties broken in round-robin order).
    LeastConnections,
    /// Power of two choices: of two random endpoints, the one with fewer requests in flight
    /// weighted by its latency (EWMA). The L7 path's default for mesh services.
    LeastRequest,
}

// ---------------------------------------------------------------------------------------------
// The user document.
// ---------------------------------------------------------------------------------------------

/// The configuration file as written by a user (TOML or YAML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Process-wide settings.
    #[serde(default)]
    pub proxy: ProxyDoc,
    /// Listeners: where the proxy accepts connections.
    #[serde(default)]
    pub listeners: Vec<ListenerDoc>,
    /// Static services and their endpoints.
    #[serde(default)]
    pub services: Vec<ServiceDoc>,
    /// Transparent sidecar mode: the outbound (15001) and inbound (15006) listeners that the
    /// redirect rules of `ringside-init` send every TCP connection to.
    #[serde(default)]
    pub sidecar: Option<SidecarDoc>,
    /// Who may call the local services (checked at this, the destination, side for every mesh
    /// mTLS connection). Absent: no rules and default deny.
    #[serde(default)]
    pub intentions: crate::policy::intentions::Intentions,
}

/// Whether inbound plaintext is accepted when mesh mTLS is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MtlsMode {
    /// Only mesh mTLS is accepted inbound; plaintext is refused (`plaintext_rejected`).
    #[default]
    Strict,
    /// Plaintext is accepted too and passed through (spliced): for migrating into the mesh.
    Permissive,
}

/// Mesh mTLS settings of a sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtlsDoc {
    /// Strict or permissive.
    #[serde(default)]
    pub mode: MtlsMode,
    /// This workload's certificate chain (PEM); its URI SAN is the workload's SPIFFE ID.
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// Trust bundle (PEM, one or more roots).
    pub ca: std::path::PathBuf,
}

/// Transparent sidecar settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SidecarDoc {
    /// Outbound listener port, bound on 127.0.0.1 and ::1.
    pub outbound_port: u16,
    /// Inbound listener port, bound on 0.0.0.0 and ::.
    pub inbound_port: u16,
    /// Refuse connections to destinations that are not in the config (`unknown_destination`)
    /// instead of passing them through.
    pub registry_only: bool,
    /// Bind the IPv6 listeners too.
    pub ipv6: bool,
    /// Mesh mTLS between sidecars (absent: plaintext).
    pub mtls: Option<MtlsDoc>,
}

impl Default for SidecarDoc {
    fn default() -> Self {
        SidecarDoc {
            outbound_port: 15001,
            inbound_port: 15006,
            registry_only: false,
            ipv6: true,
            mtls: None,
        }
    }
}

/// Process-wide settings with their defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyDoc {
    /// Fast-path worker threads; 0 means one per available core.
    pub workers: usize,
    /// Event driver for the workers.
    pub driver: DriverKind,
    /// Connections above this number are accepted and closed at once (counted `overloaded`).
    pub max_connections: usize,
    /// Of those, how many may be inbound (the sidecar's 15006); absent: half of
    /// `max_connections`, so a flood from outside the pod never takes its own outbound calls.
    pub max_inbound_connections: Option<usize>,
    /// Connections with no byte moving for this long are closed (default 1 h, as Envoy's TCP
    /// proxy).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT: how long connections may take to finish before they are closed.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Print counters this often (absent: never).
    #[serde(with = "humantime_serde")]
    pub stats_interval: Option<Duration>,
    /// Byte-moving strategy.
    pub copy_mode: CopyMode,
    /// Size of each pooled pipe, in bytes (rounded by the kernel to pages).
    pub pipe_size: usize,
    /// Size of each pooled copy buffer, in bytes.
    pub buffer_size: usize,
    /// Pin each worker to one core (only done when there are as many workers as cores).
    pub pin_workers: bool,
    /// After bytes move, a worker keeps looking for the next event this long instead of sleeping
    /// in the kernel (each byte moved renews it): the answer to a request is then taken without
    /// a wake-up. `0s` (the default) turns it off; `50us` is the measured choice.
    #[serde(with = "humantime_serde")]
    pub idle_spin: Duration,
    /// The most a worker may spend spinning, in percent of one core (counted over every 100 ms).
    pub idle_spin_budget: u32,
    /// Threads of the L7 (HTTP) path; 0: one per core. Started only when something is HTTP.
    pub l7_threads: usize,
    /// Admin server (`/stats`, `/config_dump`, ...); sidecars default to 127.0.0.1:15000.
    pub admin: Option<SocketAddr>,
    /// Health server (`/healthz/ready`); sidecars default to 0.0.0.0:15021.
    pub health: Option<SocketAddr>,
    /// Metrics only (`GET /metrics`, read-only), for a Prometheus outside the pod; sidecars
    /// default to 0.0.0.0:15020 (the admin server stays on loopback).
    pub metrics: Option<SocketAddr>,
    /// No admin, health and metrics servers (also not the sidecar defaults).
    pub no_admin: bool,
    /// Access log: a JSON line per connection and per HTTP request (`-`: stderr).
    pub access_log: Option<std::path::PathBuf>,
    /// Write this file once every listener is bound and the config is loaded; remove it on exit.
    /// `ringside wait-ready` waits for it.
    pub ready_file: Option<std::path::PathBuf>,
}

impl Default for ProxyDoc {
    fn default() -> Self {
        ProxyDoc {
            workers: 0,
            driver: DriverKind::Auto,
            max_connections: 8192,
            max_inbound_connections: None,
            // Envoy's TCP proxy default: a connection nothing moves on for an hour is closed.
            idle_timeout: Some(Duration::from_secs(3600)),
            drain_timeout: Duration::from_secs(15),
            stats_interval: None,
            copy_mode: CopyMode::Adaptive,
            pipe_size: 256 * 1024,
            buffer_size: 16 * 1024,
            pin_workers: true,
            // Off until it costs PostgreSQL nothing: see ARCHITECTURE.md, "Idle spin".
            idle_spin: Duration::ZERO,
            idle_spin_budget: 50,
            l7_threads: 0,
            admin: None,
            health: None,
            metrics: None,
            no_admin: false,
            access_log: None,
            ready_file: None,
        }
    }
}

/// A listener forwarding to one service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerDoc {
    /// Name used in logs; defaults to the address.
    #[serde(default)]
    pub name: Option<String>,
    /// Address to bind, e.g. `127.0.0.1:6432` or `[::1]:6432`.
    pub address: SocketAddr,
    /// The service connections are forwarded to.
    pub service: String,
    /// Mesh TLS on this listener: originate (plaintext in, mTLS out) or terminate (mTLS in,
    /// plaintext out) — the tunnel mode.
    #[serde(default)]
    pub tls: Option<ListenerTlsDoc>,
    /// `tcp` (the L4 fast path) or `http` (the L7 path: a reverse proxy).
    #[serde(default)]
    pub protocol: Protocol,
}

/// What a listener or service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: the L4 fast path.
    #[default]
    Tcp,
    /// HTTP/1.1 (and HTTP/2 with prior knowledge): the L7 path.
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC (HTTP/2).
    Grpc,
    /// Undeclared: the first bytes decide (HTTP goes to the L7 path, anything else, or silence
    /// for the detection time, stays on the fast path).
    Auto,
}

impl Protocol {
    /// Whether the L7 path handles it.
    pub fn is_http(self) -> bool {
        matches!(self, Protocol::Http | Protocol::Http2 | Protocol::Grpc)
    }

    /// From the control daemon's vocabulary (`ServiceDefaults.spec.protocol`); undeclared is auto.
    pub fn from_declared(p: Option<&str>) -> Protocol {
        match p {
            Some("tcp") => Protocol::Tcp,
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            Some("grpc") => Protocol::Grpc,
            _ => Protocol::Auto,
        }
    }
}

/// Mesh mTLS for one service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceMtls {
    /// Mesh mTLS when the sidecar has it.
    #[default]
    Enable,
    /// Never: the service brings its own TLS (passthrough keeps the zero-copy path).
    Disable,
}

/// Which side of mesh TLS a listener plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Plaintext from the client, mTLS to the upstream.
    Origin,
    /// mTLS from the client (certificate required), plaintext to the upstream.
    Terminate,
}

/// Mesh TLS settings of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsDoc {
    /// Origin or terminate.
    pub mode: TlsMode,
    /// Certificate chain file (PEM).
    pub cert: std::path::PathBuf,
    /// Private key file (PEM).
    pub key: std::path::PathBuf,
    /// Trust bundle file (PEM, one or more roots).
    pub ca: std::path::PathBuf,
    /// Origin: the SPIFFE ID the upstream must present.
    #[serde(default)]
    pub expect_id: Option<String>,
    /// Terminate: the SPIFFE IDs allowed to connect (empty: any identity from the trust bundle).
    #[serde(default)]
    pub allow_ids: Vec<String>,
    /// Origin: resume TLS sessions (tickets) on new connections to the same upstream (default
    /// true); false makes every connection a full handshake (Envoy's `max_session_keys: 0`).
    #[serde(default = "yes")]
    pub resumption: bool,
}

fn yes() -> bool {
    true
}

/// A static service.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceDoc {
    /// Unique name.
    pub name: String,
    /// Endpoint addresses (pods serving it, at the service port). May be empty for a service that
    /// is only served locally.
    #[serde(default)]
    pub endpoints: Vec<SocketAddr>,
    /// Virtual IP that clients connect to (with `port`).
    #[serde(default)]
    pub virtual_ip: Option<std::net::IpAddr>,
    /// The service port (what clients connect to).
    #[serde(default)]
    pub port: Option<u16>,
    /// The port the application listens on in the serving pod (default: `port`).
    #[serde(default)]
    pub target_port: Option<u16>,
    /// This pod serves the service: inbound connections to `port` go to the local application
    /// on `target_port`.
    #[serde(default)]
    pub local: bool,
    /// `disable` for a service that speaks TLS itself: its connections pass through as they are
    /// (spliced), without mesh mTLS.
    #[serde(default)]
    pub mtls: ServiceMtls,
    /// Endpoint choice.
    #[serde(default)]
    pub lb: LbPolicy,
    /// Time allowed for one TCP connect.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Endpoints tried for one connection before giving up (bounded by the endpoint count).
    #[serde(default = "default_connect_attempts")]
    pub connect_attempts: u32,
    /// First ejection period of an endpoint that failed a connect; doubles on each consecutive
    /// failure up to `max_ejection`.
    #[serde(default = "default_base_ejection", with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection period.
    #[serde(default = "default_max_ejection", with = "humantime_serde")]
    pub max_ejection: Duration,
    /// L7: what the service speaks.
    #[serde(default)]
    pub protocol: Protocol,
    /// L7: time allowed for a whole request (all tries); 15 s as in Envoy.
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// L7: retries after the first try (on connect failure, and on `retry_on` statuses).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// L7: response statuses that are retried (e.g. [503]); connect failures always are.
    #[serde(default)]
    pub retry_on: Vec<u16>,
    /// L7: consecutive 5xx responses that eject an endpoint (outlier detection; 0: off).
    #[serde(default = "default_outlier_5xx")]
    pub outlier_5xx: u32,
    /// L7: requests in flight to the service above which new ones get 503 `circuit_open`.
    #[serde(default = "default_max_requests")]
    pub max_requests: u32,
}

fn default_outlier_5xx() -> u32 {
    5
}
fn default_max_requests() -> u32 {
    1024
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(15)
}
fn default_retries() -> u32 {
    2
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_connect_attempts() -> u32 {
    3
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(1)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(30)
}

// ---------------------------------------------------------------------------------------------
// The validated configuration.
// ---------------------------------------------------------------------------------------------

/// The configuration the data plane runs, after validation.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Process-wide settings.
    pub proxy: ProxySettings,
    /// Listeners, each naming a service by index into `services`.
    pub listeners: Vec<Listener>,
    /// Services.
    pub services: Vec<Service>,
    /// Sidecar mode, when enabled.
    pub sidecar: Option<Sidecar>,
    /// Intentions for the local services.
    pub intentions: crate::policy::intentions::Intentions,
}

/// Validated process-wide settings.
#[derive(Debug, Clone, Serialize)]
pub struct ProxySettings {
    /// Worker threads (resolved: never 0).
    pub workers: usize,
    /// File written once the listeners are bound (readiness), removed on exit.
    pub ready_file: Option<std::path::PathBuf>,
    /// Driver choice.
    pub driver: DriverKind,
    /// Connection limit.
    pub max_connections: usize,
    /// Limit of inbound connections (within `max_connections`).
    pub max_inbound_connections: usize,
    /// Idle timeout, if any.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Option<Duration>,
    /// Drain deadline.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// Periodic counters.
    #[serde(with = "humantime_serde")]
    pub stats_interval: Option<Duration>,
    /// Byte-moving strategy.
    pub copy_mode: CopyMode,
    /// Pipe size in bytes.
    pub pipe_size: usize,
    /// Copy buffer size in bytes.
    pub buffer_size: usize,
    /// Pin workers to cores.
    pub pin_workers: bool,
    /// Idle spin window after traffic (zero: off).
    #[serde(with = "humantime_serde")]
    pub idle_spin: Duration,
    /// Idle spin budget, percent of one core.
    pub idle_spin_budget: u32,
    /// L7 threads.
    pub l7_threads: usize,
    /// Admin server address.
    pub admin: Option<SocketAddr>,
    /// Health server address.
    pub health: Option<SocketAddr>,
    /// Metrics-only server address.
    pub metrics: Option<SocketAddr>,
    /// Access log file (`-`: stderr).
    pub access_log: Option<std::path::PathBuf>,
}

/// A validated listener.
#[derive(Debug, Clone, Serialize)]
pub struct Listener {
    /// Name for logs.
    pub name: String,
    /// Bind address.
    pub address: SocketAddr,
    /// What it does with a connection.
    pub kind: ListenerKind,
    /// Mesh TLS, when the listener originates or terminates it.
    pub tls: Option<ListenerTls>,
    /// `tcp`: the fast path; otherwise connections are handed to the L7 path.
    pub protocol: Protocol,
}

/// Validated mesh TLS settings of a listener.
#[derive(Debug, Clone, Serialize)]
pub struct ListenerTls {
    /// Origin or terminate.
    pub mode: TlsMode,
    /// Certificate, key and trust bundle files.
    pub files: TlsFiles,
    /// Origin: required upstream identity.
    pub expect_id: Option<crate::policy::identity::SpiffeId>,
    /// Terminate: allowed client identities (empty: any).
    pub allow_ids: Vec<crate::policy::identity::SpiffeId>,
    /// Origin: resume TLS sessions on new connections (false: a full handshake every time).
    pub resumption: bool,
}

/// What a listener does with the connections it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// Forward to one service (index into [`Config::services`]).
    Static(usize),
    /// Redirected outbound connections: the original destination says where to.
    Outbound,
    /// Redirected inbound connections: the original destination port says which local service.
    Inbound,
}

/// Validated sidecar settings.
#[derive(Debug, Clone, Serialize)]
pub struct Sidecar {
    /// Outbound listener port.
    pub outbound_port: u16,
    /// Inbound listener port.
    pub inbound_port: u16,
    /// Refuse unknown destinations.
    pub registry_only: bool,
    /// Mesh mTLS, when on.
    pub mtls: Option<MtlsDoc>,
}

/// A validated service.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Service {
    /// Name.
    pub name: String,
    /// Endpoints (never empty unless the service is `local`).
    pub endpoints: Vec<SocketAddr>,
    /// Virtual IP.
    pub virtual_ip: Option<std::net::IpAddr>,
    /// Service port.
    pub port: Option<u16>,
    /// Application port in the serving pod.
    pub target_port: Option<u16>,
    /// Served by this pod.
    pub local: bool,
    /// Mesh mTLS for this service.
    pub mtls: ServiceMtls,
    /// Endpoint choice.
    pub lb: LbPolicy,
    /// Connect timeout.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Bounded connect attempts per connection.
    pub connect_attempts: u32,
    /// First ejection period.
    #[serde(with = "humantime_serde")]
    pub base_ejection: Duration,
    /// Longest ejection period.
    #[serde(with = "humantime_serde")]
    pub max_ejection: Duration,
    /// What it speaks (`tcp`: L4 fast path).
    pub protocol: Protocol,
    /// L7: time allowed for a whole request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// L7: retries after the first try.
    pub retries: u32,
    /// L7: response statuses that are retried.
    pub retry_on: Vec<u16>,
    /// L7: consecutive 5xx that eject an endpoint (0: off).
    pub outlier_5xx: u32,
    /// L7: requests in flight above which new ones get `circuit_open`.
    pub max_requests: u32,
    /// A `ServiceResolver` subset of the service (its endpoints filtered by metadata); `None`
    /// for the whole service.
    pub subset: Option<String>,
    /// L4: connections open to the service above which new ones are refused (`circuit_open`);
    /// `None`: no bound (Consul's `upstreamConfig` `limits.maxConnections`).
    pub max_connections: Option<u32>,
    /// For a local service: what the control daemon set for its inbound side (Consul's
    /// `ServiceDefaults`); empty otherwise.
    pub inbound: InboundSettings,
}

/// The inbound side of a local service as the control daemon sets it (Consul's
/// `ServiceDefaults`): every field absent keeps the proxy's own setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboundSettings {
    /// Strict or permissive mesh mTLS for the service's port (`mutualTLSMode`); overrides the
    /// sidecar's `mtls.mode`.
    #[serde(default)]
    pub mtls_mode: Option<MtlsMode>,
    /// Time allowed to connect to the local application (`localConnectTimeoutMs`; default 2 s).
    #[serde(default, with = "humantime_serde")]
    pub local_connect_timeout: Option<Duration>,
    /// L7: time allowed for the local application to answer a request
    /// (`localRequestTimeoutMs`; default the service's request timeout, 15 s).
    #[serde(default, with = "humantime_serde")]
    pub local_request_timeout: Option<Duration>,
    /// Inbound connections open at once to this instance (`maxInboundConnections`); beyond it
    /// new ones are refused (`overloaded`). The proxy's own `max_inbound_connections` still holds.
    #[serde(default)]
    pub max_inbound_connections: Option<usize>,
}

/// How a proxy calls one upstream service, as the control daemon sets it (Consul's
/// `ServiceDefaults.upstreamConfig` of the calling service, defaults then overrides): every field
/// absent keeps the service's setting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamSettings {
    /// Time allowed for one TCP connect (`connectTimeoutMs`).
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// L4: connections open at once (`limits.maxConnections`).
    #[serde(default)]
    pub max_connections: Option<u32>,
    /// L7: requests in flight at once (`limits.maxConcurrentRequests`).
    #[serde(default)]
    pub max_requests: Option<u32>,
    /// L7: consecutive 5xx that eject an endpoint (`passiveHealthCheck.maxFailures`).
    #[serde(default)]
    pub outlier_5xx: Option<u32>,
    /// First ejection period (`passiveHealthCheck.baseEjectionTime`).
    #[serde(default, with = "humantime_serde")]
    pub base_ejection: Option<Duration>,
}

impl UpstreamSettings {
    /// `self`, with the fields `over` sets replaced.
    pub fn merged(self, over: &UpstreamSettings) -> UpstreamSettings {
        UpstreamSettings {
            connect_timeout: over.connect_timeout.or(self.connect_timeout),
            max_connections: over.max_connections.or(self.max_connections),
            max_requests: over.max_requests.or(self.max_requests),
            outlier_5xx: over.outlier_5xx.or(self.outlier_5xx),
            base_ejection: over.base_ejection.or(self.base_ejection),
        }
    }

    /// Set what is given on `svc`.
    pub fn apply(&self, svc: &mut Service) {
        if let Some(t) = self.connect_timeout {
            svc.connect_timeout = t;
        }
        if let Some(n) = self.max_connections {
            svc.max_connections = Some(n);
        }
        if let Some(n) = self.max_requests {
            svc.max_requests = n;
        }
        if let Some(n) = self.outlier_5xx {
            svc.outlier_5xx = n;
        }
        if let Some(t) = self.base_ejection {
            svc.base_ejection = t;
            svc.max_ejection = svc.max_ejection.max(t);
        }
    }
}

impl Service {
    /// A service with default settings.
    pub fn new(name: impl Into<String>, endpoints: Vec<SocketAddr>) -> Self {
        Service {
            name: name.into(),
            endpoints,
            virtual_ip: None,
            port: None,
            target_port: None,
            local: false,
            mtls: ServiceMtls::Enable,
            lb: LbPolicy::default(),
            connect_timeout: default_connect_timeout(),
            connect_attempts: default_connect_attempts(),
            base_ejection: default_base_ejection(),
            max_ejection: default_max_ejection(),
            protocol: Protocol::Tcp,
            request_timeout: default_request_timeout(),
            retries: default_retries(),
            retry_on: Vec::new(),
            outlier_5xx: default_outlier_5xx(),
            max_requests: default_max_requests(),
            subset: None,
            max_connections: None,
            inbound: InboundSettings::default(),
        }
    }
}

/// A configuration error: which field, where, and what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{}{}: {message}", location(.line, .column), field_text(.field))]
pub struct ConfigError {
    /// Path of the offending field, e.g. `services[0].endpoints[1]`.
    pub field: String,
    /// 1-based line in the source text, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong.
    pub message: String,
}

fn location(line: &Option<usize>, column: &Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("line {l}, column {c}: "),
        (Some(l), None) => format!("line {l}: "),
        _ => String::new(),
    }
}

fn field_text(field: &str) -> String {
    if field.is_empty() || field == "." {
        "config".to_string()
    } else {
        format!("field `{field}`")
    }
}

/// File formats for [`Config::parse`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// TOML.
    Toml,
    /// YAML.
    Yaml,
}

impl Format {
    /// Guess from a file name: `.yaml`/`.yml` are YAML, everything else TOML.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => Format::Yaml,
            _ => Format::Toml,
        }
    }
}

impl Config {
    /// Read and validate a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            field: String::new(),
            line: None,
            column: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::parse(&text, Format::from_path(path))
    }

    /// Parse and validate configuration text.
    pub fn parse(text: &str, format: Format) -> Result<Config, ConfigError> {
        ConfigFile::parse(text, format)?.validate(text)
    }
    /// The configuration of `ringside forward LISTEN UPSTREAM...`.
    pub fn forward(
        listen: SocketAddr,
        upstreams: Vec<SocketAddr>,
        proxy: ProxyDoc,
    ) -> Result<Config, ConfigError> {
        ConfigFile {
            proxy,
            listeners: vec![ListenerDoc {
                name: Some("forward".into()),
                address: listen,
                service: "upstream".into(),
                tls: None,
                protocol: Protocol::Tcp,
            }],
            sidecar: None,
            intentions: Default::default(),
            services: vec![ServiceDoc {
                name: "upstream".into(),
                endpoints: upstreams,
                virtual_ip: None,
                port: None,
                target_port: None,
                local: false,
                mtls: ServiceMtls::Enable,
                lb: LbPolicy::default(),
                connect_timeout: default_connect_timeout(),
                connect_attempts: default_connect_attempts(),
                base_ejection: default_base_ejection(),
                max_ejection: default_max_ejection(),
                protocol: Protocol::Tcp,
                request_timeout: default_request_timeout(),
                retries: default_retries(),
                retry_on: Vec::new(),
                outlier_5xx: default_outlier_5xx(),
                max_requests: default_max_requests(),
            }],
        }
        .validate("")
    }
}

impl ConfigFile {
    /// Parse configuration text into the user document (no cross-field checks yet).
    pub fn parse(text: &str, format: Format) -> Result<ConfigFile, ConfigError> {
        match format {
            Format::Toml => {
                let de = toml::Deserializer::new(text);
                serde_path_to_error::deserialize::<_, ConfigFile>(de).map_err(|e| {
                    let field = e.path().to_string();
                    let inner = e.into_inner();
                    let (line, column) = inner
                        .span()
                        .map(|s| line_col(text, s.start))
                        .map(|(l, c)| (Some(l), Some(c)))
                        .unwrap_or((None, None));
                    ConfigError {
                        field,
                        line,
                        column,
                        message: inner.message().to_string(),
                    }
                })
            }
            Format::Yaml => {
                let de = serde_yaml::Deserializer::from_str(text);
                serde_path_to_error::deserialize::<_, ConfigFile>(de).map_err(|e| {
                    let field = e.path().to_string();
                    let inner = e.into_inner();
                    let loc = inner.location();
                    let mut message = inner.to_string();
                    // serde_yaml appends " at line L column C"; the location is reported apart.
                    if let Some(i) = message.find(" at line ") {
                        message.truncate(i);
                    }
                    ConfigError {
                        field,
                        line: loc.as_ref().map(|l| l.line()),
                        column: loc.as_ref().map(|l| l.column()),
                        message,
                    }
                })
            }
        }
    }

    /// Check cross-field rules and build the typed config. `text` is the source, used to point at
    /// the line of a value when a rule fails.
    pub fn validate(self, text: &str) -> Result<Config, ConfigError> {
        let at = |needle: &str| find_line(text, needle);
        let err = |field: String, line: Option<usize>, message: String| ConfigError {
            field,
            line,
            column: None,
            message,
        };
        let p = self.proxy;
        if p.max_connections == 0 {
            return Err(err(
                "proxy.max_connections".into(),
                at("max_connections"),
                "must be at least 1".into(),
            ));
        }
        let max_inbound = p
            .max_inbound_connections
            .unwrap_or((p.max_connections / 2).max(1));
        if max_inbound == 0 || max_inbound > p.max_connections {
            return Err(err(
                "proxy.max_inbound_connections".into(),
                at("max_inbound_connections"),
                format!(
                    "{max_inbound} must be between 1 and max_connections ({})",
                    p.max_connections
                ),
            ));
        }
        if !(4096..=64 * 1024 * 1024).contains(&p.pipe_size) {
            return Err(err(
                "proxy.pipe_size".into(),
                at("pipe_size"),
                format!("{} is out of range (4096 to 67108864 bytes)", p.pipe_size),
            ));
        }
        if !(512..=16 * 1024 * 1024).contains(&p.buffer_size) {
            return Err(err(
                "proxy.buffer_size".into(),
                at("buffer_size"),
                format!("{} is out of range (512 to 16777216 bytes)", p.buffer_size),
            ));
        }
        if p.idle_spin_budget > 100 {
            return Err(err(
                "proxy.idle_spin_budget".into(),
                at("idle_spin_budget"),
                format!(
                    "{} is out of range (0 to 100 percent of one core)",
                    p.idle_spin_budget
                ),
            ));
        }
        if p.idle_spin > Duration::from_millis(10) {
            return Err(err(
                "proxy.idle_spin".into(),
                at("idle_spin"),
                format!(
                    "{:?} is too long (at most 10ms; the default is 50us, 0s turns it off)",
                    p.idle_spin
                ),
            ));
        }
        if p.idle_timeout == Some(Duration::ZERO) {
            return Err(err(
                "proxy.idle_timeout".into(),
                at("idle_timeout"),
                "must be positive (the default is 1h)".into(),
            ));
        }
        let workers = if p.workers == 0 {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        } else {
            p.workers
        };
        let proxy = ProxySettings {
            workers,
            driver: p.driver,
            max_connections: p.max_connections,
            max_inbound_connections: max_inbound,
            idle_timeout: p.idle_timeout,
            drain_timeout: p.drain_timeout,
            stats_interval: p.stats_interval.filter(|d| !d.is_zero()),
            copy_mode: p.copy_mode,
            pipe_size: p.pipe_size,
            buffer_size: p.buffer_size,
            pin_workers: p.pin_workers,
            idle_spin: p.idle_spin,
            idle_spin_budget: p.idle_spin_budget,
            l7_threads: if p.l7_threads == 0 {
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(1)
            } else {
                p.l7_threads
            },
            admin: p
                .admin
                .or_else(|| {
                    self.sidecar
                        .as_ref()
                        .map(|_| SocketAddr::from(([127, 0, 0, 1], 15000)))
                })
                .filter(|_| !p.no_admin),
            health: p
                .health
                .or_else(|| {
                    self.sidecar
                        .as_ref()
                        .map(|_| SocketAddr::from(([0, 0, 0, 0], 15021)))
                })
                .filter(|_| !p.no_admin),
            metrics: p
                .metrics
                .or_else(|| {
                    self.sidecar
                        .as_ref()
                        .map(|_| SocketAddr::from(([0, 0, 0, 0], 15020)))
                })
                .filter(|_| !p.no_admin),
            access_log: p.access_log.clone(),
            ready_file: p.ready_file,
        };

        let mut services = Vec::with_capacity(self.services.len());
        let mut names = HashSet::new();
        for (i, s) in self.services.into_iter().enumerate() {
            if s.name.is_empty() {
                return Err(err(
                    format!("services[{i}].name"),
                    None,
                    "must not be empty".into(),
                ));
            }
            if !names.insert(s.name.clone()) {
                return Err(err(
                    format!("services[{i}].name"),
                    find_nth_value(text, &s.name, 2),
                    format!("duplicate service name '{}'", s.name),
                ));
            }
            if s.endpoints.is_empty() && !s.local {
                return Err(err(
                    format!("services[{i}].endpoints"),
                    at(&s.name),
                    format!("service '{}' has no endpoints (and is not `local`)", s.name),
                ));
            }
            if s.connect_timeout.is_zero() {
                return Err(err(
                    format!("services[{i}].connect_timeout"),
                    at("connect_timeout"),
                    "must be positive".into(),
                ));
            }
            if s.connect_attempts == 0 {
                return Err(err(
                    format!("services[{i}].connect_attempts"),
                    at("connect_attempts"),
                    "must be at least 1".into(),
                ));
            }
            if s.max_ejection < s.base_ejection {
                return Err(err(
                    format!("services[{i}].max_ejection"),
                    at("max_ejection"),
                    "must not be shorter than base_ejection".into(),
                ));
            }
            if s.local && s.port.is_none() {
                return Err(err(
                    format!("services[{i}].port"),
                    at(&s.name),
                    format!(
                        "local service '{}' needs the `port` it is served on",
                        s.name
                    ),
                ));
            }
            if s.virtual_ip.is_some() && s.port.is_none() {
                return Err(err(
                    format!("services[{i}].port"),
                    at(&s.name),
                    format!("service '{}' has a virtual_ip but no `port`", s.name),
                ));
            }
            services.push(Service {
                name: s.name,
                endpoints: s.endpoints,
                virtual_ip: s.virtual_ip,
                port: s.port,
                target_port: s.target_port,
                local: s.local,
                mtls: s.mtls,
                lb: s.lb,
                connect_timeout: s.connect_timeout,
                connect_attempts: s.connect_attempts,
                base_ejection: s.base_ejection,
                max_ejection: s.max_ejection,
                protocol: s.protocol,
                request_timeout: s.request_timeout,
                retries: s.retries,
                retry_on: s.retry_on,
                outlier_5xx: s.outlier_5xx,
                max_requests: s.max_requests,
                subset: None,
                max_connections: None,
                inbound: InboundSettings::default(),
            });
        }

        if self.listeners.is_empty() && self.sidecar.is_none() {
            return Err(err(
                "listeners".into(),
                None,
                "at least one listener (or a [sidecar] section) is required".into(),
            ));
        }
        let mut listeners = Vec::with_capacity(self.listeners.len());
        let mut addrs = HashSet::new();
        for (i, l) in self.listeners.into_iter().enumerate() {
            let Some(service) = services.iter().position(|s| s.name == l.service) else {
                return Err(err(
                    format!("listeners[{i}].service"),
                    find_nth_value(text, &l.service, 1),
                    format!("no service named '{}'", l.service),
                ));
            };
            if !addrs.insert(l.address) {
                return Err(err(
                    format!("listeners[{i}].address"),
                    None,
                    format!("{} is used by another listener", l.address),
                ));
            }
            let tls = match l.tls {
                None => None,
                Some(t) => {
                    let parse = |field: String, v: &str| {
                        v.parse::<crate::policy::identity::SpiffeId>().map_err(|m| {
                            err(field, find_nth_value(text, v, 1).or_else(|| at(v)), m)
                        })
                    };
                    let expect_id = match &t.expect_id {
                        Some(v) => Some(parse(format!("listeners[{i}].tls.expect_id"), v)?),
                        None => None,
                    };
                    let mut allow_ids = Vec::new();
                    for (k, v) in t.allow_ids.iter().enumerate() {
                        allow_ids.push(parse(format!("listeners[{i}].tls.allow_ids[{k}]"), v)?);
                    }
                    Some(ListenerTls {
                        mode: t.mode,
                        files: TlsFiles {
                            cert: t.cert,
                            key: t.key,
                            ca: t.ca,
                        },
                        expect_id,
                        allow_ids,
                        resumption: t.resumption,
                    })
                }
            };
            listeners.push(Listener {
                name: l.name.unwrap_or_else(|| l.address.to_string()),
                address: l.address,
                kind: ListenerKind::Static(service),
                tls,
                protocol: l.protocol,
            });
        }
        let sidecar = self.sidecar.map(|sc| {
            let mut add = |name: &str, address: SocketAddr, kind| {
                listeners.push(Listener {
                    name: name.to_string(),
                    address,
                    kind,
                    tls: None,
                    protocol: Protocol::Tcp,
                })
            };
            use std::net::{Ipv4Addr, Ipv6Addr};
            add(
                "outbound",
                (Ipv4Addr::LOCALHOST, sc.outbound_port).into(),
                ListenerKind::Outbound,
            );
            add(
                "inbound",
                (Ipv4Addr::UNSPECIFIED, sc.inbound_port).into(),
                ListenerKind::Inbound,
            );
            if sc.ipv6 {
                add(
                    "outbound6",
                    (Ipv6Addr::LOCALHOST, sc.outbound_port).into(),
                    ListenerKind::Outbound,
                );
                add(
                    "inbound6",
                    (Ipv6Addr::UNSPECIFIED, sc.inbound_port).into(),
                    ListenerKind::Inbound,
                );
            }
            Sidecar {
                outbound_port: sc.outbound_port,
                inbound_port: sc.inbound_port,
                registry_only: sc.registry_only,
                mtls: sc.mtls,
            }
        });
        let mut seen = HashSet::new();
        for l in &listeners {
            if !seen.insert(l.address) {
                return Err(err(
                    "sidecar".into(),
                    at("[sidecar]"),
                    format!("{} is used by another listener", l.address),
                ));
            }
        }
        Ok(Config {
            proxy,
            listeners,
            services,
            sidecar,
            intentions: self.intentions,
        })
    }
}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map(|i| i + 1).unwrap_or(0) + 1;
    (line, column)
}

fn find_line(text: &str, needle: &str) -> Option<usize> {
    text.lines().position(|l| l.contains(needle)).map(|i| i + 1)
}

/// Line of the n-th (1-based) line holding `value` quoted or as a bare YAML scalar.
fn find_nth_value(text: &str, value: &str, n: usize) -> Option<usize> {
    let quoted = [
        format!("\"{value}\""),
        format!("'{value}'"),
        format!(": {value}"),
    ];
    text.lines()
        .enumerate()
        .filter(|(_, l)| {
            quoted
                .iter()
                .any(|q| l.contains(q.as_str()) || l.trim_end().ends_with(q.as_str()))
        })
        .nth(n - 1)
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[proxy]
workers = 2
idle_timeout = "30s"

[[listeners]]
name = "pg"
address = "127.0.0.1:6432"
service = "postgres"

[[services]]
name = "postgres"
endpoints = ["127.0.0.1:5432", "[::1]:5432"]
lb = "least_connections"
connect_timeout = "250ms"
"#;

    #[test]
    fn parses_toml_with_defaults() {
        let c = Config::parse(GOOD, Format::Toml).unwrap();
        assert_eq!(c.proxy.workers, 2);
        assert_eq!(c.proxy.idle_timeout, Some(Duration::from_secs(30)));
        assert_eq!(c.proxy.max_connections, 8192);
        assert_eq!(c.listeners[0].kind, ListenerKind::Static(0));
        assert_eq!(c.services[0].endpoints.len(), 2);
        assert_eq!(c.services[0].lb, LbPolicy::LeastConnections);
        assert_eq!(c.services[0].connect_timeout, Duration::from_millis(250));
        assert_eq!(c.services[0].connect_attempts, 3);
    }

    #[test]
    fn parses_yaml() {
        let y = "listeners:\n  - address: 127.0.0.1:7000\n    service: web\nservices:\n  - name: web\n    endpoints: [\"127.0.0.1:8080\"]\n";
        let c = Config::parse(y, Format::Yaml).unwrap();
        assert_eq!(c.listeners[0].name, "127.0.0.1:7000");
        assert_eq!(c.services[0].lb, LbPolicy::RoundRobin);
    }

    #[test]
    fn bad_address_names_field_and_line_toml() {
        let bad = GOOD.replace("[::1]:5432", "localhost:5432");
        let e = Config::parse(&bad, Format::Toml).unwrap_err();
        assert_eq!(e.field, "services[0].endpoints[1]");
        assert_eq!(e.line, Some(13));
        let text = e.to_string();
        assert!(text.starts_with("line 13"), "{text}");
        assert!(text.contains("services[0].endpoints[1]"), "{text}");
    }

    #[test]
    fn bad_value_names_field_and_line_yaml() {
        let y = "listeners:\n  - address: 127.0.0.1:7000\n    service: web\nservices:\n  - name: web\n    endpoints: [\"127.0.0.1:8080\"]\n    connect_attempts: many\n";
        let e = Config::parse(y, Format::Yaml).unwrap_err();
        assert_eq!(e.field, "services[0].connect_attempts");
        assert_eq!(e.line, Some(7));
    }

    #[test]
    fn unknown_field_is_refused() {
        let bad = GOOD.replace("workers = 2", "wrokers = 2");
        let e = Config::parse(&bad, Format::Toml).unwrap_err();
        assert!(e.message.contains("wrokers"), "{e}");
        assert_eq!(e.line, Some(3));
    }

    #[test]
    fn listener_with_unknown_service_names_line() {
        let bad = GOOD.replace("service = \"postgres\"", "service = \"pgsql\"");
        let e = Config::parse(&bad, Format::Toml).unwrap_err();
        assert_eq!(e.field, "listeners[0].service");
        assert_eq!(e.line, Some(9));
        assert!(e.message.contains("pgsql"));
    }

    #[test]
    fn semantic_rules() {
        let cases = [
            (
                GOOD.replace(
                    "endpoints = [\"127.0.0.1:5432\", \"[::1]:5432\"]",
                    "endpoints = []",
                ),
                "services[0].endpoints",
            ),
            (
                GOOD.replace("workers = 2", "workers = 2\nmax_connections = 0"),
                "proxy.max_connections",
            ),
            (
                GOOD.replace("workers = 2", "workers = 2\npipe_size = 100"),
                "proxy.pipe_size",
            ),
            (
                GOOD.replace("connect_timeout = \"250ms\"", "connect_timeout = \"0s\""),
                "services[0].connect_timeout",
            ),
            (
                GOOD.replace("idle_timeout = \"30s\"", "idle_timeout = \"0s\""),
                "proxy.idle_timeout",
            ),
            (
                GOOD.replace("workers = 2", "workers = 2\nidle_spin_budget = 101"),
                "proxy.idle_spin_budget",
            ),
            (
                GOOD.replace("workers = 2", "workers = 2\nidle_spin = \"20ms\""),
                "proxy.idle_spin",
            ),
            (
                format!(
                    "{GOOD}\n[[services]]\nname = \"postgres\"\nendpoints = [\"127.0.0.1:1\"]\n"
                ),
                "services[1].name",
            ),
        ];
        for (text, field) in cases {
            let e = Config::parse(&text, Format::Toml).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.line.is_some(), "no line for {field}: {e}");
        }
        let e = Config::parse("", Format::Toml).unwrap_err();
        assert_eq!(e.field, "listeners");
    }

    #[test]
    fn sidecar_section_adds_the_mesh_listeners() {
        let y = "sidecar:\n  registry_only: true\nservices:\n  - name: payments\n    port: 1800\n    target_port: 8080\n    local: true\n  - name: products\n    virtual_ip: 198.18.100.1\n    port: 9090\n    endpoints: [\"198.18.0.3:9090\"]\n";
        let c = Config::parse(y, Format::Yaml).unwrap();
        let kinds: Vec<_> = c
            .listeners
            .iter()
            .map(|l| (l.address.to_string(), l.kind))
            .collect();
        assert_eq!(
            kinds,
            vec![
                ("127.0.0.1:15001".to_string(), ListenerKind::Outbound),
                ("0.0.0.0:15006".to_string(), ListenerKind::Inbound),
                ("[::1]:15001".to_string(), ListenerKind::Outbound),
                ("[::]:15006".to_string(), ListenerKind::Inbound),
            ]
        );
        assert!(c.sidecar.as_ref().unwrap().registry_only);
        assert!(c.services[0].local && c.services[0].endpoints.is_empty());
        let bad = y.replace("    port: 1800\n", "");
        let e = Config::parse(&bad, Format::Yaml).unwrap_err();
        assert_eq!(e.field, "services[0].port");
    }

    #[test]
    fn forward_config() {
        let c = Config::forward(
            "127.0.0.1:1".parse().unwrap(),
            vec!["127.0.0.1:2".parse().unwrap()],
            ProxyDoc::default(),
        )
        .unwrap();
        assert_eq!(c.services[0].endpoints.len(), 1);
        assert!(c.proxy.workers >= 1);
        let e = Config::forward("127.0.0.1:1".parse().unwrap(), vec![], ProxyDoc::default())
            .unwrap_err();
        assert_eq!(e.field, "services[0].endpoints");
    }
}

/// Where the certificate material lives.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// Certificate chain (PEM), leaf first.
    pub cert: std::path::PathBuf,
    /// Private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: std::path::PathBuf,
    /// Trust bundle (PEM): one or more root certificates.
    pub ca: std::path::PathBuf,
}
