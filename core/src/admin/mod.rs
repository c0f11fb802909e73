//! The admin server (127.0.0.1:15000 on sidecars) and the health server (:15021), on their own
//! thread with a current-thread tokio runtime, off the data path. The hot path only bumps its
//! per-worker counters; a scrape sums them.
//!
//! - `GET /stats`: Prometheus/OpenMetrics text (`ringside_` + Envoy's names).
//! - `GET /config_dump`: the running configuration and snapshot as JSON (no key material).
//! - `GET /ready`: 200 `LIVE` when serving, 503 `DRAINING`.
//! - `GET /clusters`: endpoints with their health and ejection state (JSON).
//! - `GET /certs`: certificates in use, identity and expiry (JSON).
//! - `GET /events`: recent failures: time, reason, source, destination, detail (JSON).
//! - `POST /logging?level=debug`: change the log filter at runtime.
//! - health port: `GET /healthz/ready`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use serde::Serialize;

use crate::reason::Reason;
use crate::server::Shared;

pub use crate::telemetry::events::{Event, Events};

pub mod slots;

/// Connections each admin, health or metrics port serves at once (see [`slots`] for who gets a
/// slot when they are all held).
pub const MAX_CONNECTIONS: usize = 64;
/// Connections one client address may hold on one of those ports; more are closed at accept.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// How long a client may take to send a request's headers, and how long a kept-alive connection
/// may stay idle.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head accepted (hyper's read buffer; larger heads are refused).
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// Which of the servers a port is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Port {
    /// Everything, on loopback.
    Admin,
    /// `/healthz/ready` only, for the orchestrator.
    Health,
    /// `/metrics` only, read-only, for a Prometheus outside the pod.
    Metrics,
}

/// Changes the log filter (given by the binary, which owns the subscriber).
pub type SetLogLevel = Arc<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Where the admin, health and metrics servers listen.
#[derive(Clone)]
pub struct AdminOptions {
    /// Admin server address.
    pub admin: Option<SocketAddr>,
    /// Health server address.
    pub health: Option<SocketAddr>,
    /// Metrics-only server address (read-only `/metrics`, for a Prometheus outside the pod).
    pub metrics: Option<SocketAddr>,
    /// Log filter changes.
    pub set_log_level: Option<SetLogLevel>,
}

impl std::fmt::Debug for AdminOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminOptions")
            .field("admin", &self.admin)
            .field("health", &self.health)
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// Bind the admin and health listeners now (an address in use is an error at start) and serve
/// them on a thread.
pub(crate) fn start(shared: &Arc<Shared>, opts: AdminOptions) -> anyhow::Result<Vec<SocketAddr>> {
    let mut listeners = Vec::new();
    let mut addrs = Vec::new();
    for (addr, port) in [
        (opts.admin, Port::Admin),
        (opts.health, Port::Health),
        (opts.metrics, Port::Metrics),
    ] {
        let Some(addr) = addr else { continue };
        let l = std::net::TcpListener::bind(addr).map_err(|e| {
            let holder = crate::io::listening::who_holds(addr)
                .map(|h| format!(" ({h})"))
                .unwrap_or_default();
            anyhow::anyhow!("cannot listen on {addr} (admin): {e}{holder}")
        })?;
        l.set_nonblocking(true)?;
        addrs.push(l.local_addr()?);
        listeners.push((l, port));
    }
    if listeners.is_empty() {
        return Ok(addrs);
    }
    let weak = Arc::downgrade(shared);
    let mut proxy_gone = shared.config_changed.subscribe();
    let set_level = opts.set_log_level.clone();
    std::thread::Builder::new()
        .name("ringside-admin".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "admin server: no runtime");
                    return;
                }
            };
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, health) in listeners {
                    let health: Port = health;
                    let (weak, set_level) = (weak.clone(), set_level.clone());
                    tasks.push(tokio::spawn(async move {
                        let Ok(l) = tokio::net::TcpListener::from_std(l) else {
                            return;
                        };
                        // A small cap per port, shared fairly between client addresses: the
                        // health and metrics ports are reachable from the network, and no port
                        // may be used to hold the proxy's descriptors.
                        let slots = Arc::new(Mutex::new(Held {
                            slots: slots::Slots::new(MAX_CONNECTIONS, MAX_CONNECTIONS_PER_SOURCE),
                            tasks: HashMap::new(),
                        }));
                        loop {
                            let (s, peer) = match l.accept().await {
                                Ok(x) => x,
                                Err(_) => {
                                    // Out of descriptors (or a transient error): back off, never spin.
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                    continue;
                                }
                            };
                            if weak.strong_count() == 0 {
                                return;
                            }
                            let admission = lock(&slots).slots.admit(peer.ip());
                            let id = match admission {
                                slots::Admission::Refuse => {
                                    drop(s);
                                    continue;
                                }
                                slots::Admission::Admit { id, evict } => {
                                    // Close the evicted connection: its task is dropped (with its
                                    // socket) when the runtime next runs it, outside this lock.
                                    let task = evict.and_then(|e| lock(&slots).tasks.remove(&e));
                                    if let Some(task) = task {
                                        task.abort();
                                    }
                                    id
                                }
                            };
                            let permit = Slot {
                                held: slots.clone(),
                                id,
                            };
                            let (weak, set_level) = (weak.clone(), set_level.clone());
                            let task = tokio::spawn(async move {
                                let svc = hyper::service::service_fn(move |req| {
                                    handle(req, weak.clone(), set_level.clone(), health)
                                });
                                let _ = hyper::server::conn::http1::Builder::new()
                                    .timer(hyper_util::rt::TokioTimer::new())
                                    .header_read_timeout(HEADER_READ_TIMEOUT)
                                    .max_buf_size(MAX_HEADER_BYTES)
                                    .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                    .await;
                                drop(permit);
                            });
                            // The runtime has one thread: the task has not run yet, so it cannot
                            // have ended before its handle is kept.
                            lock(&slots).tasks.insert(id, task.abort_handle());
                        }
                    }));
                }
                // Stop with the proxy: its configuration-change channel closes when the proxy's
                // shared state is dropped (no polling: an idle admin thread sleeps).
                while proxy_gone.changed().await.is_ok() {}
            });
        })?;
    Ok(addrs)
}

/// The slots of one port and the tasks serving them (to close an evicted connection).
struct Held {
    slots: slots::Slots,
    tasks: HashMap<u64, tokio::task::AbortHandle>,
}

/// A held slot, given back when its connection's task ends or is aborted.
struct Slot {
    held: Arc<Mutex<Held>>,
    id: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut held = lock(&self.held);
        held.slots.release(self.id);
        held.tasks.remove(&self.id);
    }
}

fn lock(m: &Mutex<Held>) -> std::sync::MutexGuard<'_, Held> {
    // Nothing panics while holding it; a poisoned lock still holds consistent slots.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn text(status: StatusCode, ctype: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static(ctype),
    );
    r
}

fn json(v: impl Serialize) -> Response<Full<Bytes>> {
    text(
        StatusCode::OK,
        "application/json",
        serde_json::to_string_pretty(&v).unwrap_or_default() + "\n",
    )
}

async fn handle(
    req: Request<Incoming>,
    shared: Weak<Shared>,
    set_level: Option<SetLogLevel>,
    port: Port,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let health = port == Port::Health;
    let Some(shared) = shared.upgrade() else {
        return Ok(text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "DRAINING\n".into(),
        ));
    };
    let ready = !shared.draining.load(std::sync::atomic::Ordering::SeqCst);
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let r = match (req.method().clone(), path.as_str(), health) {
        (Method::GET, "/healthz/ready", true) | (Method::GET, "/ready", false) => {
            if ready {
                text(StatusCode::OK, "text/plain", "LIVE\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "DRAINING\n".into())
            }
        }
        (_, _, true) => text(StatusCode::NOT_FOUND, "text/plain", "only /healthz/ready here\n".into()),
        (m, p, false) if port == Port::Metrics && !(m == Method::GET && p == "/metrics") => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "only GET /metrics here (the admin server is on loopback)\n".into(),
        ),
        (Method::GET, "/stats" | "/stats/prometheus" | "/metrics", _) => {
            let mut registry = prometheus_client::registry::Registry::with_prefix("ringside");
            registry.register_collector(Box::new(Collector(shared.clone())));
            let mut out = String::new();
            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                Ok(()) => text(
                    StatusCode::OK,
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    out,
                ),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", format!("{e}\n")),
            }
        }
        (Method::GET, "/config_dump", _) => {
            let snap = shared.snapshot.load_full();
            json(serde_json::json!({
                "config": shared.config,
                "version": snap.version,
                "services": snap.services,
                "intentions": *snap.intentions,
                "l7": *snap.l7,
                "ctl_unreachable": shared.ctl_unreachable.load(std::sync::atomic::Ordering::SeqCst),
            }))
        }
        (Method::GET, "/clusters", _) => json(crate::server::cluster_status(&shared)),
        (Method::GET, "/certs", _) => json(crate::server::cert_status(&shared)),
        (Method::GET, "/events", _) => json(shared.events.list()),
        (Method::POST, "/logging", _) => {
            let level = query
                .split('&')
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == "level")
                .map(|(_, v)| v.to_string());
            match (level, &set_level) {
                (Some(l), Some(set)) => match set(&l) {
                    Ok(()) => text(StatusCode::OK, "text/plain", format!("log level: {l}\n")),
                    Err(e) => text(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
                },
                (None, _) => text(
                    StatusCode::BAD_REQUEST,
                    "text/plain",
                    "POST /logging?level=<filter> (e.g. debug, info, ringside_core=debug)\n".into(),
                ),
                (_, None) => text(StatusCode::NOT_IMPLEMENTED, "text/plain", "no log control here\n".into()),
            }
        }
        (m, p, _) => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            format!("no {m} {p}: /stats /config_dump /ready /clusters /certs /events, POST /logging?level=\n"),
        ),
    };
    Ok(r)
}

/// Encodes the counters, summed at scrape time.
#[derive(Debug)]
struct Collector(Arc<Shared>);

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    ConstCounter::new(v).encode(m)
}

fn gauge(e: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    ConstGauge::new(v).encode(m)
}

impl prometheus_client::collector::Collector for Collector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let shared = &self.0;
        let s = shared.stats.snapshot();
        counter(
            &mut e,
            "downstream_cx",
            "Downstream connections accepted",
            s.downstream_cx_total,
        )?;
        gauge(
            &mut e,
            "downstream_cx_active",
            "Downstream connections open",
            s.downstream_cx_active as i64,
        )?;
        counter(
            &mut e,
            "downstream_cx_rx_bytes",
            "Bytes received from downstream",
            s.downstream_cx_rx_bytes_total,
        )?;
        counter(
            &mut e,
            "downstream_cx_tx_bytes",
            "Bytes sent to downstream",
            s.downstream_cx_tx_bytes_total,
        )?;
        counter(
            &mut e,
            "upstream_cx",
            "Upstream connect attempts",
            s.upstream_cx_total,
        )?;
        counter(
            &mut e,
            "upstream_cx_connect_fail",
            "Upstream connect attempts that failed",
            s.upstream_cx_connect_fail,
        )?;
        counter(
            &mut e,
            "upstream_cx_connect_timeout",
            "Upstream connect attempts that timed out",
            s.upstream_cx_connect_timeout,
        )?;
        counter(
            &mut e,
            "downstream_cx_accept_fd_exhausted",
            "accept() failures for lack of descriptors",
            s.downstream_cx_accept_fd_exhausted,
        )?;
        counter(
            &mut e,
            "protocol_detect_timeout",
            "Undeclared-protocol connections silent for the detection time (taken as TCP)",
            s.protocol_detect_timeout,
        )?;
        counter(
            &mut e,
            "splice_transfers",
            "Chunks moved by splice",
            s.splice_transfers,
        )?;
        counter(
            &mut e,
            "copy_transfers",
            "Chunks moved by copy",
            s.copy_transfers,
        )?;
        {
            let mut m = e.encode_descriptor(
                "failures",
                "Failed or refused connections and requests, by reason code",
                None,
                MetricType::Counter,
            )?;
            for r in Reason::ALL {
                let v = s.failures_for(r);
                let labels = [("reason", r.as_str())];
                ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
            }
        }
        crate::telemetry::tcp::encode(&shared.stats.tcp, &mut e)?;
        counter(
            &mut e,
            "access_log_dropped",
            "Access-log lines dropped because the writer's queue was full",
            shared.access_log.as_ref().map_or(0, |l| l.dropped()),
        )?;
        counter(
            &mut e,
            "http_downstream_cx",
            "Connections handed to the L7 path",
            s.http_cx_total,
        )?;
        gauge(
            &mut e,
            "http_downstream_cx_active",
            "L7 connections open",
            s.http_cx_active as i64,
        )?;
        counter(
            &mut e,
            "http_downstream_rq",
            "HTTP requests",
            s.http_rq_total,
        )?;
        {
            let mut m = e.encode_descriptor(
                "http_downstream_rq_xx",
                "HTTP responses by status class",
                None,
                MetricType::Counter,
            )?;
            for (k, v) in s.http_rq_class.iter().enumerate() {
                let class = format!("{}xx", k + 1);
                let labels = [("response_code_class", class.as_str())];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
        counter(&mut e, "http_rq_retry", "HTTP retries", s.http_rq_retry)?;
        counter(
            &mut e,
            "http_local_replies",
            "HTTP responses made by the proxy",
            s.http_local_replies,
        )?;
        crate::telemetry::stats::encode_http_services(&shared.stats.http, &mut e)?;
        {
            let snap = shared.snapshot.load();
            let mut m = e.encode_descriptor(
                "upstream_ejections",
                "Endpoints ejected (connect failures or consecutive 5xx), by service",
                None,
                MetricType::Counter,
            )?;
            for c in &snap.clusters {
                let labels = [("service", c.service.name.as_str())];
                ConstCounter::new(c.ejections.load(std::sync::atomic::Ordering::Relaxed))
                    .encode(m.encode_family(&labels)?)?;
            }
        }
        {
            let mut m = e.encode_descriptor(
                "cert_expiry_seconds",
                "Seconds until each certificate in use expires",
                None,
                MetricType::Gauge,
            )?;
            for (name, secs) in crate::server::cert_expiry(shared) {
                let labels = [("cert", name.as_str())];
                ConstGauge::new(secs).encode(m.encode_family(&labels)?)?;
            }
        }
        gauge(
            &mut e,
            "config_version",
            "Configuration version in force (control daemon index)",
            shared.snapshot.load().version as i64,
        )?;
        gauge(
            &mut e,
            "ctl_unreachable",
            "1 while the control daemon cannot be reached",
            shared
                .ctl_unreachable
                .load(std::sync::atomic::Ordering::SeqCst) as i64,
        )?;
        Ok(())
    }
}
