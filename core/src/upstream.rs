//! Upstream endpoint choice: round-robin or least-connections, with passive health (an endpoint
//! whose connect fails is ejected for a back-off period that doubles with consecutive failures).
//!
//! The state is shared by all workers through atomics: one relaxed load per endpoint considered,
//! one atomic add when a connection opens and closes. When every endpoint is ejected the pick
//! ignores ejection (Envoy's "panic mode"), so that a recovered upstream is found at once instead of
//! after its back-off.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{LbPolicy, Service};

/// Runtime state of one endpoint.
#[derive(Debug)]
pub struct Endpoint {
    /// Its address.
    pub addr: SocketAddr,
    /// Connections open to it now.
    pub active: AtomicU32,
    /// Consecutive failed connects.
    pub consecutive_failures: AtomicU32,
    /// Ejected until this time (milliseconds since the cluster's epoch); 0 = not ejected.
    pub ejected_until_ms: AtomicU64,
}

/// Runtime state of one service's endpoints.
#[derive(Debug)]
pub struct Cluster {
    /// The service this cluster serves.
    pub service: Service,
    /// Endpoint states, in config order.
    pub endpoints: Vec<Endpoint>,
    rr: AtomicUsize,
    epoch: Instant,
}

/// Holds an endpoint's `active` count up while a connection to it is open.
#[derive(Debug)]
pub struct ActiveGuard {
    cluster: Arc<Cluster>,
    index: usize,
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.cluster.endpoints[self.index]
            .active
            .fetch_sub(1, Relaxed);
    }
}

impl Cluster {
    /// Fresh state for a service.
    pub fn new(service: Service) -> Arc<Cluster> {
        let endpoints = service
            .endpoints
            .iter()
            .map(|&addr| Endpoint {
                addr,
                active: AtomicU32::new(0),
                consecutive_failures: AtomicU32::new(0),
                ejected_until_ms: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Cluster {
            service,
            endpoints,
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64 + 1
    }

    /// Whether endpoint `i` is ejected now.
    pub fn is_ejected(&self, i: usize) -> bool {
        self.endpoints[i].ejected_until_ms.load(Relaxed) > self.now_ms()
    }

    /// How many endpoints one connection may try.
    pub fn max_attempts(&self) -> usize {
        (self.service.connect_attempts as usize)
            .min(self.endpoints.len())
            .max(1)
    }

    /// Pick an endpoint not in `tried` (a bit set of indices already tried for this connection).
    /// Returns `None` when every endpoint was tried.
    pub fn pick(&self, tried: u64) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = self.now_ms();
        let start = self.rr.fetch_add(1, Relaxed) % n;
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let healthy = |i: usize| self.endpoints[i].ejected_until_ms.load(Relaxed) <= now;
        let order = (0..n).map(|k| (start + k) % n);
        let choose = |require_healthy: bool| -> Option<usize> {
            let mut candidates = order
                .clone()
                .filter(|&i| untried(i) && (!require_healthy || healthy(i)));
            match self.service.lb {
                LbPolicy::RoundRobin => candidates.next(),
                LbPolicy::LeastConnections => {
                    candidates.min_by_key(|&i| self.endpoints[i].active.load(Relaxed))
                }
            }
        };
        choose(true).or_else(|| choose(false))
    }

    /// Count a connection opening on endpoint `i`; the guard counts it closing.
    pub fn open(self: &Arc<Self>, i: usize) -> ActiveGuard {
        self.endpoints[i].active.fetch_add(1, Relaxed);
        ActiveGuard {
            cluster: self.clone(),
            index: i,
        }
    }

    /// A connect to endpoint `i` succeeded: it is healthy again.
    pub fn report_success(&self, i: usize) {
        let e = &self.endpoints[i];
        if e.consecutive_failures.load(Relaxed) != 0 {
            e.consecutive_failures.store(0, Relaxed);
            e.ejected_until_ms.store(0, Relaxed);
        }
    }

    /// A connect to endpoint `i` failed: eject it for `base * 2^(failures-1)`, capped.
    /// Returns the ejection period.
    pub fn report_failure(&self, i: usize) -> Duration {
        let e = &self.endpoints[i];
        let failures = e
            .consecutive_failures
            .fetch_add(1, Relaxed)
            .saturating_add(1);
        let factor = 1u32 << (failures - 1).min(16);
        let period = self
            .service
            .base_ejection
            .saturating_mul(factor)
            .min(self.service.max_ejection);
        e.ejected_until_ms
            .store(self.now_ms() + period.as_millis() as u64, Relaxed);
        period
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(lb: LbPolicy, n: usize) -> Arc<Cluster> {
        let eps = (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)))
            .collect();
        let mut s = Service::new("s", eps);
        s.lb = lb;
        Cluster::new(s)
    }

    #[test]
    fn round_robin_cycles() {
        let c = cluster(LbPolicy::RoundRobin, 3);
        let picks: Vec<_> = (0..6).map(|_| c.pick(0).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn tried_endpoints_are_skipped_and_exhaustion_is_none() {
        let c = cluster(LbPolicy::RoundRobin, 3);
        let a = c.pick(0).unwrap();
        let b = c.pick(1 << a).unwrap();
        assert_ne!(a, b);
        let d = c.pick((1 << a) | (1 << b)).unwrap();
        assert!(d != a && d != b);
        assert_eq!(c.pick(0b111), None);
    }

    #[test]
    fn least_connections_prefers_idle() {
        let c = cluster(LbPolicy::LeastConnections, 3);
        let _g0 = c.open(0);
        let _g0b = c.open(0);
        let _g2 = c.open(2);
        for _ in 0..5 {
            assert_eq!(c.pick(0), Some(1));
        }
        drop(_g0);
        drop(_g0b);
        // 0 and 1 tie at zero; 2 has one.
        for _ in 0..5 {
            assert_ne!(c.pick(0), Some(2));
        }
    }

    #[test]
    fn ejection_backs_off_and_success_restores() {
        let c = cluster(LbPolicy::RoundRobin, 2);
        assert_eq!(c.report_failure(0), Duration::from_secs(1));
        assert_eq!(c.report_failure(0), Duration::from_secs(2));
        assert_eq!(c.report_failure(0), Duration::from_secs(4));
        assert!(c.is_ejected(0));
        for _ in 0..4 {
            assert_eq!(c.pick(0), Some(1), "ejected endpoint picked");
        }
        for _ in 0..10 {
            c.report_failure(0);
        }
        assert!(c.report_failure(0) <= Duration::from_secs(30));
        c.report_success(0);
        assert!(!c.is_ejected(0));
    }

    #[test]
    fn all_ejected_falls_back_to_panic_mode() {
        let c = cluster(LbPolicy::RoundRobin, 2);
        c.report_failure(0);
        c.report_failure(1);
        assert!(c.pick(0).is_some());
        assert_eq!(c.max_attempts(), 2);
    }
}
