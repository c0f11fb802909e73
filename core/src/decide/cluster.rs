//! Upstream endpoint choice: round-robin or least-connections, with passive health (an endpoint
//! whose connect fails is ejected for a back-off period that doubles with consecutive failures).
//!
//! The state is shared by all workers through atomics: one relaxed load per endpoint considered,
//! one atomic add when a connection opens and closes. When every endpoint is ejected the pick
//! ignores ejection (Envoy's "panic mode"), so that a recovered upstream is found at once instead of
//! after its back-off.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

// Under `--cfg ringside_loom` the shared state uses loom's atomics, so the model checker explores every
// interleaving of workers picking and reporting (core/tests/loom_cluster.rs).
#[cfg(ringside_loom)]
pub use loom::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
#[cfg(not(ringside_loom))]
pub use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
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
    /// Consecutive failed connects (top 16 bits) and the end of the ejection (low 48 bits,
    /// milliseconds since the cluster's epoch; 0 = not ejected), in one word so that a success
    /// and a failure racing leave one of them, never half of each (loom-checked).
    health: AtomicU64,
    /// L7: consecutive 5xx responses.
    pub consecutive_5xx: AtomicU32,
    /// Half-open: a trial is in flight until this time (one request or connection after an
    /// ejection ends; its outcome closes or reopens the circuit).
    pub trial_until_ms: AtomicU64,
    /// L7: moving average of the time to response headers, in microseconds (0: none yet).
    pub ewma_us: AtomicU64,
}

/// The ejection end in `Endpoint::health`.
const UNTIL: u64 = (1 << 48) - 1;

impl Endpoint {
    /// Consecutive failed connects.
    pub fn consecutive_failures(&self) -> u32 {
        (self.health.load(Relaxed) >> 48) as u32
    }

    /// End of the ejection (milliseconds since the cluster's epoch); 0 = not ejected.
    pub fn ejected_until_ms(&self) -> u64 {
        self.health.load(Relaxed) & UNTIL
    }
}

/// splitmix64's finalizer: every bit of the result depends on every bit of `z`.
fn mix(z: u64) -> u64 {
    let z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// How long a half-open trial may stay unreported before another one is allowed.
const TRIAL_FOR_MS: u64 = 10_000;

/// Runtime state of one service's endpoints.
#[derive(Debug)]
pub struct Cluster {
    /// The service this cluster serves.
    pub service: Service,
    /// Endpoint states, in config order.
    pub endpoints: Vec<Endpoint>,
    rr: AtomicUsize,
    epoch: Instant,
    /// L7 requests in flight (for `max_requests`).
    pub active_requests: AtomicU32,
    /// Endpoints ejected so far (for the counters).
    pub ejections: AtomicU64,
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
    /// Fresh state for a service, created at `now` (the clock is passed in, never read here).
    pub fn new(service: Service, now: Instant) -> Arc<Cluster> {
        let endpoints = service
            .endpoints
            .iter()
            .map(|&addr| Endpoint {
                addr,
                active: AtomicU32::new(0),
                health: AtomicU64::new(0),
                consecutive_5xx: AtomicU32::new(0),
                trial_until_ms: AtomicU64::new(0),
                ewma_us: AtomicU64::new(0),
            })
            .collect();
        Arc::new(Cluster {
            service,
            endpoints,
            rr: AtomicUsize::new(0),
            epoch: now,
            active_requests: AtomicU32::new(0),
            ejections: AtomicU64::new(0),
        })
    }

    /// `now` in the cluster's milliseconds (0 is "never"). Time is passed in, so the state machine
    /// runs on a virtual clock in tests.
    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64 + 1
    }

    /// Whether endpoint `i` is ejected now.
    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        self.endpoints[i].ejected_until_ms() > self.ms(now)
    }

    /// How many endpoints one connection may try.
    pub fn max_attempts(&self) -> usize {
        (self.service.connect_attempts as usize)
            .min(self.endpoints.len())
            .max(1)
    }

    /// Pick an endpoint not in `tried` (a bit set of indices already tried for this connection).
    /// Returns `None` when every endpoint was tried.
    pub fn pick(&self, tried: u64, at: Instant) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let now = self.ms(at);
        let seq = self.rr.fetch_add(1, Relaxed);
        let start = seq % n;
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        // Closed (never ejected, or recovered): eligible. Open (ejected): not. Half-open (the
        // ejection ended, no success since): eligible for one trial at a time.
        let healthy = |i: usize| {
            let e = &self.endpoints[i];
            match e.ejected_until_ms() {
                0 => true,
                until if until > now => false,
                _ => e.trial_until_ms.load(Relaxed) <= now,
            }
        };
        let order = (0..n).map(|k| (start + k) % n);
        let choose = |require_healthy: bool| -> Option<usize> {
            let candidates = order
                .clone()
                .filter(|&i| untried(i) && (!require_healthy || healthy(i)));
            match self.service.lb {
                // The next of the eligible endpoints, counted among them alone: each gets an equal
                // share while others are ejected (the first eligible one after the counter's
                // position would also take the share of every ejected endpoint before it).
                LbPolicy::RoundRobin => {
                    let mut eligible =
                        (0..n).filter(|&i| untried(i) && (!require_healthy || healthy(i)));
                    let count = eligible.clone().count();
                    if count == 0 {
                        return None;
                    }
                    eligible.nth(seq % count)
                }
                LbPolicy::LeastConnections => {
                    candidates.min_by_key(|&i| self.endpoints[i].active.load(Relaxed))
                }
                LbPolicy::LeastRequest => {
                    let all: Vec<usize> = candidates.collect();
                    match all.len() {
                        0 => None,
                        1 => Some(all[0]),
                        n => {
                            // Two distinct random candidates; the lighter one wins. The bits
                            // come from the pick's sequence number mixed whole (splitmix64): a
                            // plain multiply left the low bits with period 2, so with equal costs
                            // half the endpoints were never chosen.
                            let x = mix(seq as u64 ^ now.rotate_left(32));
                            let a = (x % n as u64) as usize;
                            let b = (a + 1 + ((x >> 32) % (n as u64 - 1)) as usize) % n;
                            let cost = |i: usize| {
                                let e = &self.endpoints[i];
                                (e.active.load(Relaxed) as u64 + 1) * e.ewma_us.load(Relaxed).max(1)
                            };
                            Some(if cost(all[b]) < cost(all[a]) {
                                all[b]
                            } else {
                                all[a]
                            })
                        }
                    }
                }
            }
        };
        match choose(true) {
            Some(i) => {
                let e = &self.endpoints[i];
                let until = e.ejected_until_ms();
                if until != 0 && until <= now {
                    // Claim the half-open trial; if another request claimed it first, go on
                    // without this endpoint.
                    let t = e.trial_until_ms.load(Relaxed);
                    if t > now
                        || e.trial_until_ms
                            .compare_exchange(t, now + TRIAL_FOR_MS, Relaxed, Relaxed)
                            .is_err()
                    {
                        return self.pick(tried | if i < 64 { 1 << i } else { 0 }, at);
                    }
                }
                Some(i)
            }
            None => choose(false),
        }
    }

    /// L7: fold a response time into endpoint `i`'s moving average (weight 1/5 for the new one).
    pub fn observe_latency(&self, i: usize, d: Duration) {
        let e = &self.endpoints[i];
        let v = (d.as_micros() as u64).max(1);
        let old = e.ewma_us.load(Relaxed);
        let new = if old == 0 { v } else { (old * 4 + v) / 5 };
        e.ewma_us.store(new, Relaxed);
    }

    /// Whether endpoint `i` is half-open (its ejection ended, its trial has not succeeded yet).
    pub fn is_half_open(&self, i: usize, now: Instant) -> bool {
        let until = self.endpoints[i].ejected_until_ms();
        until != 0 && until <= self.ms(now)
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
        if e.health.load(Relaxed) != 0 {
            e.health.store(0, Relaxed);
            e.trial_until_ms.store(0, Relaxed);
        }
    }

    /// L7: a response from endpoint `i`; `outlier_5xx` consecutive 5xx eject it (0: never).
    /// Returns the ejection period when this response ejected it.
    pub fn report_status(
        &self,
        i: usize,
        status: u16,
        outlier_5xx: u32,
        now: Instant,
    ) -> Option<Duration> {
        let e = &self.endpoints[i];
        if status < 500 {
            if e.consecutive_5xx.load(Relaxed) != 0 {
                e.consecutive_5xx.store(0, Relaxed);
            }
            self.report_success(i);
            return None;
        }
        let n = e.consecutive_5xx.fetch_add(1, Relaxed) + 1;
        // A failed half-open trial reopens at once; otherwise after `outlier_5xx` in a row.
        if (outlier_5xx > 0 && n >= outlier_5xx) || self.is_half_open(i, now) {
            e.consecutive_5xx.store(0, Relaxed);
            return Some(self.report_failure(i, now));
        }
        None
    }

    /// A connect to endpoint `i` failed: eject it for `base * 2^(failures-1)`, capped.
    /// Returns the ejection period.
    pub fn report_failure(&self, i: usize, now: Instant) -> Duration {
        let e = &self.endpoints[i];
        let mut cur = e.health.load(Relaxed);
        let period = loop {
            let failures = ((cur >> 48) as u32 + 1).min(0xffff);
            let factor = 1u32 << (failures - 1).min(16);
            let period = self
                .service
                .base_ejection
                .saturating_mul(factor)
                .min(self.service.max_ejection);
            let until = (self.ms(now) + period.as_millis() as u64).min(UNTIL);
            let new = (failures as u64) << 48 | until;
            match e.health.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
                Ok(_) => break period,
                Err(seen) => cur = seen,
            }
        };
        e.trial_until_ms.store(0, Relaxed);
        self.ejections.fetch_add(1, Relaxed);
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
        Cluster::new(s, Instant::now())
    }

    #[test]
    fn round_robin_cycles() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::RoundRobin, 3);
        let picks: Vec<_> = (0..6).map(|_| c.pick(0, t.get()).unwrap()).collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn tried_endpoints_are_skipped_and_exhaustion_is_none() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::RoundRobin, 3);
        let a = c.pick(0, t.get()).unwrap();
        let b = c.pick(1 << a, t.get()).unwrap();
        assert_ne!(a, b);
        let d = c.pick((1 << a) | (1 << b), t.get()).unwrap();
        assert!(d != a && d != b);
        assert_eq!(c.pick(0b111, t.get()), None);
    }

    #[test]
    fn least_connections_prefers_idle() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::LeastConnections, 3);
        let _g0 = c.open(0);
        let _g0b = c.open(0);
        let _g2 = c.open(2);
        for _ in 0..5 {
            assert_eq!(c.pick(0, t.get()), Some(1));
        }
        drop(_g0);
        drop(_g0b);
        // 0 and 1 tie at zero; 2 has one.
        for _ in 0..5 {
            assert_ne!(c.pick(0, t.get()), Some(2));
        }
    }

    #[test]
    fn ejection_backs_off_and_success_restores() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::RoundRobin, 2);
        assert_eq!(c.report_failure(0, t.get()), Duration::from_secs(1));
        assert_eq!(c.report_failure(0, t.get()), Duration::from_secs(2));
        assert_eq!(c.report_failure(0, t.get()), Duration::from_secs(4));
        assert!(c.is_ejected(0, t.get()));
        for _ in 0..4 {
            assert_eq!(c.pick(0, t.get()), Some(1), "ejected endpoint picked");
        }
        for _ in 0..10 {
            c.report_failure(0, t.get());
        }
        assert!(c.report_failure(0, t.get()) <= Duration::from_secs(30));
        c.report_success(0);
        assert!(!c.is_ejected(0, t.get()));
    }

    #[test]
    fn consecutive_5xx_open_then_one_trial_then_closed() {
        let t = std::cell::Cell::new(Instant::now());
        let mut s = Service::new(
            "s",
            vec![
                SocketAddr::from(([127, 0, 0, 1], 1)),
                SocketAddr::from(([127, 0, 0, 1], 2)),
            ],
        );
        s.base_ejection = Duration::from_millis(50);
        let c = Cluster::new(s, Instant::now());
        assert_eq!(c.report_status(1, 503, 3, t.get()), None);
        assert_eq!(c.report_status(1, 500, 3, t.get()), None);
        assert_eq!(
            c.report_status(1, 502, 3, t.get()),
            Some(Duration::from_millis(50)),
            "open"
        );
        for _ in 0..6 {
            assert_eq!(c.pick(0, t.get()), Some(0), "an open endpoint gets nothing");
        }
        t.set(t.get() + Duration::from_millis(60));
        assert!(c.is_half_open(1, t.get()));
        let picks: Vec<_> = (0..6).map(|_| c.pick(0, t.get()).unwrap()).collect();
        assert_eq!(
            picks.iter().filter(|&&i| i == 1).count(),
            1,
            "one trial: {picks:?}"
        );
        // The trial fails: open again, for twice as long.
        assert_eq!(
            c.report_status(1, 500, 3, t.get()),
            Some(Duration::from_millis(100))
        );
        assert!(c.is_ejected(1, t.get()));
        t.set(t.get() + Duration::from_millis(110));
        let picks: Vec<_> = (0..4).map(|_| c.pick(0, t.get()).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 1, "{picks:?}");
        // The trial succeeds: closed, normal share again.
        assert_eq!(c.report_status(1, 200, 3, t.get()), None);
        assert!(!c.is_half_open(1, t.get()) && !c.is_ejected(1, t.get()));
        let picks: Vec<_> = (0..6).map(|_| c.pick(0, t.get()).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 3, "{picks:?}");
    }

    #[test]
    fn least_request_prefers_fast_idle_endpoints() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::LeastRequest, 3);
        for _ in 0..20 {
            c.observe_latency(0, Duration::from_millis(50));
            c.observe_latency(1, Duration::from_millis(1));
            c.observe_latency(2, Duration::from_millis(1));
        }
        // 2 is fast but has 100 requests in flight: (100+1) x 1 ms costs more than 1 x 50 ms.
        let _busy = (0..100).map(|_| c.open(2)).collect::<Vec<_>>();
        let mut counts = [0; 3];
        for _ in 0..3000 {
            counts[c.pick(0, t.get()).unwrap()] += 1;
        }
        // 1 (fast, idle) wins both pairs it is in (2/3 of the picks); 0 (slow) beats the busy 2.
        assert!((1800..2200).contains(&counts[1]), "{counts:?}");
        assert!((800..1200).contains(&counts[0]), "{counts:?}");
        assert_eq!(counts[2], 0, "{counts:?}");
    }

    #[test]
    fn all_ejected_falls_back_to_panic_mode() {
        let t = std::cell::Cell::new(Instant::now());
        let c = cluster(LbPolicy::RoundRobin, 2);
        c.report_failure(0, t.get());
        c.report_failure(1, t.get());
        assert!(c.pick(0, t.get()).is_some());
        assert_eq!(c.max_attempts(), 2);
    }
}
