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
