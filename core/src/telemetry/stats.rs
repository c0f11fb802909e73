//! Counters. Each worker owns one [`WorkerStats`] and is its only writer, so the hot path does a
//! plain relaxed load and store (no locked instruction); readers sum all workers on demand.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use crossbeam_utils::CachePadded;
use serde::Serialize;

use crate::reason::Reason;

/// One worker's counters. Written by that worker only.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Downstream connections accepted.
    pub downstream_cx_total: Counter,
    /// Downstream connections closed (active = total - closed).
    pub downstream_cx_closed: Counter,
    /// Bytes received from downstream (and sent upstream).
    pub downstream_cx_rx_bytes_total: Counter,
    /// Bytes sent to downstream (received from upstream).
    pub downstream_cx_tx_bytes_total: Counter,
    /// Upstream connect attempts.
    pub upstream_cx_total: Counter,
    /// Upstream connect attempts that failed (refused, unreachable or timed out).
    pub upstream_cx_connect_fail: Counter,
    /// Upstream connect attempts that timed out.
    pub upstream_cx_connect_timeout: Counter,
    /// accept() failed for lack of file descriptors or memory; the worker backed off.
    pub downstream_cx_accept_fd_exhausted: Counter,
    /// Chunks moved by copying through a buffer (one recv each).
    pub copy_transfers: Counter,
    /// Chunks moved by splicing through a pipe (one splice into the pipe each).
    pub splice_transfers: Counter,
    /// Pipes created (the pool reuses them; this grows only with concurrency).
    pub pipes_created: Counter,
    /// Undeclared-protocol connections whose client sent nothing within the detection time
    /// (taken as TCP).
    pub protocol_detect_timeout: Counter,
    /// Inbound connections to the local app, by the address that answered: 127.0.0.1, ::1, the
    /// pod's own address.
    pub inbound_app_via: [Counter; 3],
    /// Failures by reason, indexed by [`Reason::index`].
    pub failures: [Counter; Reason::ALL.len()],
}

/// A counter with a single writer.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. Only the owning worker may call this.
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: a load and a store, no read-modify-write instruction.
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }

    /// Add one.
    #[inline]
    pub fn inc(&self) {
        self.add(1)
    }

    /// Current value.
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

impl WorkerStats {
    /// Count a failure with its reason.
    #[inline]
    pub fn fail(&self, reason: Reason) {
        self.failures[reason.index()].inc();
    }
}

/// Counters of the L7 path, shared by its threads (atomic adds: it is the slower path).
#[derive(Debug, Default)]
pub struct HttpStats {
    /// Connections handed to the L7 path.
    pub cx_total: AtomicU64,
    /// Of them, closed.
    pub cx_closed: AtomicU64,
    /// Requests received.
    pub rq_total: AtomicU64,
    /// Responses by status class (1xx..5xx), local replies included.
    pub rq_class: [AtomicU64; 5],
    /// Retries (tries after the first).
    pub rq_retry: AtomicU64,
    /// Responses made by the proxy itself (with `x-ringside-reason`).
    pub local_replies: AtomicU64,
    /// Failures by reason.
    pub failures: [AtomicU64; Reason::ALL.len()],
    /// Per service, then route: requests by code and method, latency. Nested so that a request
    /// finds its entry by `&str`, without making the key's strings.
    pub services: std::sync::Mutex<
        std::collections::BTreeMap<String, std::collections::BTreeMap<String, ServiceHttp>>,
    >,
}

/// L7 counters of one service and route.
#[derive(Debug, Default)]
pub struct ServiceHttp {
    /// Responses by status code.
    pub codes: std::collections::BTreeMap<u16, u64>,
    /// Requests by method.
    pub methods: std::collections::BTreeMap<&'static str, u64>,
    /// Time to the response headers.
    pub latency: Histogram,
}

/// Upper bounds of the latency histogram's buckets, in microseconds (the exported unit is
/// milliseconds: 0.5 ms .. 10 s).
const LATENCY_BUCKETS_US: [u64; 14] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000,
    2_500_000, 5_000_000, 10_000_000,
];

/// A latency histogram with exact bucket counts and an exact sum (microseconds).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Histogram {
    /// Observations per bucket (not cumulative), the last one past the largest bound.
    pub buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// Observations.
    pub count: u64,
    /// Their sum, microseconds.
    pub sum_us: u64,
}

impl Histogram {
    /// Add one observation.
    pub fn observe(&mut self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let i = LATENCY_BUCKETS_US.partition_point(|&b| b < us);
        self.buckets[i] += 1;
        self.count += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Cumulative counts by upper bound in milliseconds, `+Inf` last (Prometheus' form).
    pub fn cumulative_ms(&self) -> Vec<(f64, u64)> {
        let mut acc = 0;
        LATENCY_BUCKETS_US
            .iter()
            .map(|&us| us as f64 / 1000.0)
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter())
            .map(|(le, n)| {
                acc += n;
                (le, acc)
            })
            .collect()
    }
}

/// Every (service, route) entry, in order.
fn by_route(
    map: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, ServiceHttp>>,
) -> impl Iterator<Item = (&String, &String, &ServiceHttp)> {
    map.iter()
        .flat_map(|(service, routes)| routes.iter().map(move |(route, st)| (service, route, st)))
}

/// Encode the per-service HTTP metrics.
pub fn encode_http_services(
    http: &HttpStats,
    e: &mut prometheus_client::encoding::DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::MetricType;
    let map = http.services.lock().unwrap_or_else(|p| p.into_inner());
    {
        let mut m = e.encode_descriptor(
            "http_service_rq",
            "HTTP requests by service, route and response code (and its class)",
            None,
            MetricType::Counter,
        )?;
        for (service, route, st) in by_route(&map) {
            for (code, v) in &st.codes {
                let code_s = code.to_string();
                let class = format!("{}xx", (code / 100).clamp(1, 5));
                let labels = [
                    ("service", service.as_str()),
                    ("route", route.as_str()),
                    ("response_code", code_s.as_str()),
                    ("response_code_class", class.as_str()),
                ];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut m = e.encode_descriptor(
            "http_service_rq_method",
            "HTTP requests by service, route and method",
            None,
            MetricType::Counter,
        )?;
        for (service, route, st) in by_route(&map) {
            for (method, v) in &st.methods {
                let labels = [
                    ("service", service.as_str()),
                    ("route", route.as_str()),
                    ("method", *method),
                ];
                ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
            }
        }
    }
    {
        let mut m = e.encode_descriptor(
            "http_service_rq_time_ms",
            "Time to the response headers, by service and route",
            None,
            MetricType::Histogram,
        )?;
        for (service, route, st) in by_route(&map) {
            let h = &st.latency;
            let labels = [("service", service.as_str()), ("route", route.as_str())];
            m.encode_family(&labels)?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    h.sum_us as f64 / 1000.0,
                    h.count,
                    &h.cumulative_ms(),
                    None,
                )?;
        }
    }
    Ok(())
}

/// The `method` label of a request: a standard method keeps its name, anything else is `other`
/// (a client choosing its methods cannot make a series per request).
pub fn method_label(method: &str) -> &'static str {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    STANDARD
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

impl HttpStats {
    /// Record one request of `service` on `route`.
    pub fn record(
        &self,
        service: &str,
        route: &str,
        method: &str,
        status: u16,
        latency: std::time::Duration,
    ) {
        let mut map = self.services.lock().unwrap_or_else(|p| p.into_inner());
        // The strings of a key are made once, for the first request of a service or route.
        if !map.contains_key(service) {
            map.insert(service.to_string(), Default::default());
        }
        let routes = map.get_mut(service).expect("inserted above");
        if !routes.contains_key(route) {
            routes.insert(route.to_string(), ServiceHttp::default());
        }
        let st = routes.get_mut(route).expect("inserted above");
        *st.codes.entry(status).or_default() += 1;
        *st.methods.entry(method_label(method)).or_default() += 1;
        st.latency.observe(latency);
    }
}

impl HttpStats {
    /// Count one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Count a response status.
    pub fn status(&self, code: u16) {
        let class = (code / 100).clamp(1, 5) as usize - 1;
        self.rq_class[class].fetch_add(1, Relaxed);
    }

    /// Count a failure.
    pub fn fail(&self, r: Reason) {
        self.failures[r.index()].fetch_add(1, Relaxed);
    }
}

/// All workers' counters.
#[derive(Debug, Clone, Default)]
pub struct StatsRegistry {
    workers: Arc<Vec<CachePadded<WorkerStats>>>,
    /// The L7 path's counters.
    pub http: Arc<HttpStats>,
    /// Labelled L4 counters (per direction, service and source), also per worker.
    pub tcp: Arc<crate::telemetry::tcp::TcpStats>,
}

/// A summed view of all counters.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`WorkerStats`].
    pub downstream_cx_total: u64,
    /// Connections open now.
    pub downstream_cx_active: u64,
    /// See [`WorkerStats`].
    pub downstream_cx_rx_bytes_total: u64,
    /// See [`WorkerStats`].
    pub downstream_cx_tx_bytes_total: u64,
    /// See [`WorkerStats`].
    pub upstream_cx_total: u64,
    /// See [`WorkerStats`].
    pub upstream_cx_connect_fail: u64,
    /// See [`WorkerStats`].
    pub upstream_cx_connect_timeout: u64,
    /// See [`WorkerStats`].
    pub downstream_cx_accept_fd_exhausted: u64,
    /// See [`WorkerStats`].
    pub copy_transfers: u64,
    /// See [`WorkerStats`].
    pub splice_transfers: u64,
    /// See [`WorkerStats`].
    pub pipes_created: u64,
    /// See [`WorkerStats`].
    pub protocol_detect_timeout: u64,
    /// Inbound connections answered by the app on 127.0.0.1, ::1 and the pod address.
    pub inbound_app_via: [u64; 3],
    /// Failures by reason code (only non-zero ones).
    pub failures: std::collections::BTreeMap<&'static str, u64>,
    /// L7: connections handed over.
    pub http_cx_total: u64,
    /// L7: connections open.
    pub http_cx_active: u64,
    /// L7: requests.
    pub http_rq_total: u64,
    /// L7: responses by class, 1xx..5xx.
    pub http_rq_class: [u64; 5],
    /// L7: retries.
    pub http_rq_retry: u64,
    /// L7: local replies.
    pub http_local_replies: u64,
}

impl Snapshot {
    /// Failures counted for one reason.
    pub fn failures_for(&self, reason: Reason) -> u64 {
        self.failures.get(reason.as_str()).copied().unwrap_or(0)
    }

    /// One line of `name=value` pairs for periodic logs.
    pub fn one_line(&self) -> String {
        let mut s = format!(
            "cx_total={} cx_active={} rx_bytes={} tx_bytes={} upstream_cx_total={} connect_fail={} connect_timeout={} accept_fd_exhausted={} splice_transfers={} copy_transfers={} pipes={}",
            self.downstream_cx_total,
            self.downstream_cx_active,
            self.downstream_cx_rx_bytes_total,
            self.downstream_cx_tx_bytes_total,
            self.upstream_cx_total,
            self.upstream_cx_connect_fail,
            self.upstream_cx_connect_timeout,
            self.downstream_cx_accept_fd_exhausted,
            self.splice_transfers,
            self.copy_transfers,
            self.pipes_created,
        );
        let _ = write!(
            s,
            " inbound_app_v4_loopback={} inbound_app_v6_loopback={} inbound_app_pod_ip={}",
            self.inbound_app_via[0], self.inbound_app_via[1], self.inbound_app_via[2]
        );
        if self.protocol_detect_timeout > 0 {
            let _ = write!(
                s,
                " protocol_detect_timeout={}",
                self.protocol_detect_timeout
            );
        }
        if self.http_cx_total > 0 {
            let _ = write!(
                s,
                " http_cx_total={} http_cx_active={} http_rq_total={} http_rq_1xx={} http_rq_2xx={} http_rq_3xx={} http_rq_4xx={} http_rq_5xx={} http_rq_retry={} http_local_replies={}",
                self.http_cx_total,
                self.http_cx_active,
                self.http_rq_total,
                self.http_rq_class[0],
                self.http_rq_class[1],
                self.http_rq_class[2],
                self.http_rq_class[3],
                self.http_rq_class[4],
                self.http_rq_retry,
                self.http_local_replies
            );
        }
        for (k, v) in &self.failures {
            let _ = write!(s, " fail.{k}={v}");
        }
        s
    }
}

impl StatsRegistry {
    /// Counters for `n` workers.
    pub fn new(n: usize) -> Self {
        StatsRegistry {
            workers: Arc::new(
                (0..n)
                    .map(|_| CachePadded::new(WorkerStats::default()))
                    .collect(),
            ),
            http: Arc::default(),
            tcp: Arc::new(crate::telemetry::tcp::TcpStats::new(n)),
        }
    }

    /// The counters of worker `i`.
    pub fn worker(&self, i: usize) -> &WorkerStats {
        &self.workers[i]
    }

    /// Sum over all workers.
    pub fn snapshot(&self) -> Snapshot {
        let mut s = Snapshot::default();
        let mut closed = 0;
        let mut failures = [0u64; Reason::ALL.len()];
        for w in self.workers.iter() {
            s.downstream_cx_total += w.downstream_cx_total.get();
            closed += w.downstream_cx_closed.get();
            s.downstream_cx_rx_bytes_total += w.downstream_cx_rx_bytes_total.get();
            s.downstream_cx_tx_bytes_total += w.downstream_cx_tx_bytes_total.get();
            s.upstream_cx_total += w.upstream_cx_total.get();
            s.upstream_cx_connect_fail += w.upstream_cx_connect_fail.get();
            s.upstream_cx_connect_timeout += w.upstream_cx_connect_timeout.get();
            s.downstream_cx_accept_fd_exhausted += w.downstream_cx_accept_fd_exhausted.get();
            s.copy_transfers += w.copy_transfers.get();
            s.splice_transfers += w.splice_transfers.get();
            s.pipes_created += w.pipes_created.get();
            s.protocol_detect_timeout += w.protocol_detect_timeout.get();
            for (k, c) in w.inbound_app_via.iter().enumerate() {
                s.inbound_app_via[k] += c.get();
            }
            for (i, f) in w.failures.iter().enumerate() {
                failures[i] += f.get();
            }
        }
        s.downstream_cx_active = s.downstream_cx_total.saturating_sub(closed);
        let h = &self.http;
        s.http_cx_total = h.cx_total.load(Relaxed);
        s.http_cx_active = s.http_cx_total.saturating_sub(h.cx_closed.load(Relaxed));
        s.http_rq_total = h.rq_total.load(Relaxed);
        for (k, c) in h.rq_class.iter().enumerate() {
            s.http_rq_class[k] = c.load(Relaxed);
        }
        s.http_rq_retry = h.rq_retry.load(Relaxed);
        s.http_local_replies = h.local_replies.load(Relaxed);
        for (i, f) in h.failures.iter().enumerate() {
            failures[i] += f.load(Relaxed);
        }
        for r in Reason::ALL {
            if failures[r.index()] > 0 {
                s.failures.insert(r.as_str(), failures[r.index()]);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_client_inventing_methods_makes_one_method_series() {
        let http = HttpStats::default();
        // Standard methods keep their name.
        for m in [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ] {
            http.record("web", "default", m, 200, Duration::from_millis(1));
        }
        // A hostile client: 1,000 distinct methods (and lowercase spellings of standard ones).
        for i in 0..1000 {
            http.record(
                "web",
                "default",
                &format!("M{i}"),
                200,
                Duration::from_millis(1),
            );
        }
        http.record("web", "default", "get", 200, Duration::from_millis(1));
        let map = http.services.lock().unwrap();
        let methods = &map["web"]["default"].methods;
        assert_eq!(methods.len(), 10, "{methods:?}");
        assert_eq!(methods["other"], 1001);
        assert_eq!(methods["GET"], 1);
        assert_eq!(methods["PATCH"], 1);
    }

    #[test]
    fn histogram_keeps_an_exact_sum_and_exact_buckets() {
        let mut h = Histogram::default();
        for us in [1, 499, 500, 501, 1_234, 10_000_000, 10_000_001, 42_000_000] {
            h.observe(Duration::from_micros(us));
        }
        assert_eq!(h.count, 8);
        assert_eq!(
            h.sum_us,
            1 + 499 + 500 + 501 + 1_234 + 10_000_000 + 10_000_001 + 42_000_000
        );
        let c = h.cumulative_ms();
        assert_eq!(c[0], (0.5, 3), "le=0.5 ms holds 1, 499 and 500 us");
        assert_eq!(c[1], (1.0, 4));
        assert_eq!(c[2], (2.5, 5));
        assert_eq!(c[13], (10_000.0, 6), "10 s is in le=10000");
        assert_eq!(c[14], (f64::INFINITY, 8));
    }

    #[test]
    fn http_services_count_each_response_code() {
        let h = HttpStats::default();
        for code in [200, 200, 404, 503] {
            h.record("web", "default", "GET", code, Duration::from_millis(2));
        }
        let mut reg = prometheus_client::registry::Registry::with_prefix("ringside");
        #[derive(Debug)]
        struct C(HttpStats);
        impl prometheus_client::collector::Collector for C {
            fn encode(
                &self,
                mut e: prometheus_client::encoding::DescriptorEncoder,
            ) -> Result<(), std::fmt::Error> {
                encode_http_services(&self.0, &mut e)
            }
        }
        reg.register_collector(Box::new(C(h)));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        for want in [
            "ringside_http_service_rq_total{service=\"web\",route=\"default\",response_code=\"200\",response_code_class=\"2xx\"} 2\n",
            "ringside_http_service_rq_total{service=\"web\",route=\"default\",response_code=\"404\",response_code_class=\"4xx\"} 1\n",
            "ringside_http_service_rq_total{service=\"web\",route=\"default\",response_code=\"503\",response_code_class=\"5xx\"} 1\n",
            "ringside_http_service_rq_time_ms_sum{service=\"web\",route=\"default\"} 8.0\n",
            "ringside_http_service_rq_time_ms_count{service=\"web\",route=\"default\"} 4\n",
            "ringside_http_service_rq_time_ms_bucket{le=\"2.5\",service=\"web\",route=\"default\"} 4\n",
        ] {
            assert!(out.contains(want), "lacks {want}:\n{out}");
        }
    }
}
