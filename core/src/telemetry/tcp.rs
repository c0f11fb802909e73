//! L4 counters with labels: connections opened and closed, bytes each way and failures by reason,
//! per direction, destination service and (inbound) the caller's service.
//!
//! Each worker keeps its own series behind its own lock: only that worker takes it on the data
//! path (one uncontended lock per connection open and end), a scrape takes it briefly to read.
//! Label values are interned: a worker looks a connection's service and source up by `&str` and
//! allocates only the first time it meets a label set.
//!
//! Cardinality is bounded for the whole proxy, not per worker: a label set is admitted once, in a
//! table all workers share (its lock is taken only when a worker meets a label set new to it).
//! Past [`MAX_SOURCES_PER_SERVICE`] callers of one service and direction, further callers are
//! counted as `source="other"`; past [`MAX_LABEL_SETS`] label sets in all, new ones are counted as
//! `service="other"` (and `source="other"`). Every connection so folded is counted in
//! `tcp_label_overflow`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};

use crossbeam_utils::CachePadded;

use crate::reason::Reason;

/// Distinct sources counted per destination service and direction; more are folded into
/// [`OVERFLOW`].
pub const MAX_SOURCES_PER_SERVICE: usize = 64;
/// Distinct label sets in all (over every direction, service and source, the `other` ones
/// included); more are folded into `service="other"`.
pub const MAX_LABEL_SETS: usize = 2048;
/// The label value that stands for the callers (or services) past the caps.
pub const OVERFLOW: &str = "other";
/// The source of an inbound connection without a verified identity (permissive plaintext).
pub const UNKNOWN_SOURCE: &str = "unknown";
/// The service of a connection to no declared service (passed through to its original
/// destination, or to an undeclared local port).
pub const PASSTHROUGH: &str = "passthrough";
/// Raw label sets a worker remembers were folded, so that a connection from a folded caller does
/// not take the shared table's lock; beyond it, such connections do.
const FOLDED_CACHE: usize = MAX_LABEL_SETS;

/// Which way a connection goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// From the pod's application.
    Outbound,
    /// To the pod's application.
    Inbound,
    /// Through a static listener.
    Tunnel,
}

impl Direction {
    /// The `direction` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
            Direction::Tunnel => "tunnel",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The labels of one connection, borrowed (nothing is allocated to look them up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels<'a> {
    /// Which way.
    pub direction: Direction,
    /// The destination service as the configuration names it.
    pub service: &'a str,
    /// The caller's service (inbound); `""` for none (outbound and tunnels carry no source).
    pub source: &'a str,
}

/// The labels of one exported series.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    /// Which way.
    pub direction: Direction,
    /// The destination service, or [`OVERFLOW`].
    pub service: Box<str>,
    /// The caller's service, [`UNKNOWN_SOURCE`], [`OVERFLOW`], or `""` (no source label).
    pub source: Box<str>,
}

/// The counts of one label set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counts {
    /// Connections established (both ends connected, handshakes done).
    pub opened: u64,
    /// Of them, ended.
    pub closed: u64,
    /// Bytes received from the client (and sent upstream).
    pub rx_bytes: u64,
    /// Bytes sent to the client (received from upstream).
    pub tx_bytes: u64,
    /// Failures by reason, indexed by [`Reason::index`] (refusals before the connection was
    /// established included).
    pub failures: [u64; Reason::ALL.len()],
}

impl Default for Counts {
    fn default() -> Self {
        Counts {
            opened: 0,
            closed: 0,
            rx_bytes: 0,
            tx_bytes: 0,
            failures: [0; Reason::ALL.len()],
        }
    }
}

impl Counts {
    fn add(&mut self, o: &Counts) {
        self.opened += o.opened;
        self.closed += o.closed;
        self.rx_bytes += o.rx_bytes;
        self.tx_bytes += o.tx_bytes;
        for (a, b) in self.failures.iter_mut().zip(o.failures.iter()) {
            *a += b;
        }
    }
}

/// A cached resolution: the series index, and whether the raw labels were folded.
#[derive(Debug, Clone, Copy)]
struct Slot {
    series: u32,
    folded: bool,
}

/// A worker's cache of one direction: service -> source -> series.
type BySource = HashMap<Box<str>, HashMap<Box<str>, Slot>>;

/// The sources admitted for one direction and service, and whether its `other` set exists.
type Admitted = (HashSet<Box<str>>, bool);

/// One worker's series.
#[derive(Debug, Default)]
struct WorkerSeries {
    /// Raw labels -> series: by direction, then service, then source.
    index: [BySource; 3],
    /// Raw label sets cached as folded (bounded by [`FOLDED_CACHE`]).
    folded_cached: usize,
    /// Final labels -> series (cold: only when a raw label set is new to this worker).
    by_key: HashMap<Key, u32>,
    /// The series, in the order they were met.
    series: Vec<(Key, Counts)>,
    /// Connections whose labels were folded.
    folded: u64,
}

/// The label sets admitted so far, for the whole proxy.
#[derive(Debug, Default)]
struct Admission {
    /// By direction and service: the sources admitted, and whether its `other` set exists.
    services: HashMap<(Direction, Box<str>), Admitted>,
    /// Label sets admitted (the `other` ones included).
    sets: usize,
}

impl Admission {
    /// The labels `l` is counted under.
    fn admit(&mut self, l: Labels<'_>) -> (Key, bool) {
        let key = |service: &str, source: &str| Key {
            direction: l.direction,
            service: service.into(),
            source: source.into(),
        };
        let full = self.sets >= MAX_LABEL_SETS;
        let overflow = key(OVERFLOW, if l.source.is_empty() { "" } else { OVERFLOW });
        let id = (l.direction, Box::<str>::from(l.service));
        if full && !self.services.contains_key(&id) {
            return (overflow, true);
        }
        let sets = &mut self.sets;
        let (sources, other) = self.services.entry(id).or_default();
        if sources.contains(l.source) {
            return (key(l.service, l.source), false);
        }
        if sources.len() < MAX_SOURCES_PER_SERVICE && *sets < MAX_LABEL_SETS {
            sources.insert(l.source.into());
            *sets += 1;
            return (key(l.service, l.source), false);
        }
        if *other {
            return (key(l.service, OVERFLOW), true);
        }
        if *sets < MAX_LABEL_SETS {
            *other = true;
            *sets += 1;
            return (key(l.service, OVERFLOW), true);
        }
        (overflow, true)
    }
}

/// Every worker's labelled L4 counters.
#[derive(Debug)]
pub struct TcpStats {
    workers: Box<[CachePadded<Mutex<WorkerSeries>>]>,
    admission: Mutex<Admission>,
}

impl Default for TcpStats {
    fn default() -> Self {
        TcpStats::new(0)
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while holding these; a poisoned lock still holds consistent counts.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TcpStats {
    /// Counters for `n` workers.
    pub fn new(n: usize) -> Self {
        TcpStats {
            workers: (0..n).map(|_| CachePadded::new(Mutex::default())).collect(),
            admission: Mutex::default(),
        }
    }

    /// A connection of worker `w` with labels `l` was established; returns its series (to pass
    /// to [`TcpStats::close`]).
    pub fn open(&self, w: usize, l: Labels<'_>) -> u32 {
        let mut ws = lock(&self.workers[w]);
        let s = self.resolve(&mut ws, l);
        ws.series[s as usize].1.opened += 1;
        s
    }

    /// The connection of series `s` (from [`TcpStats::open`] on the same worker) ended, with
    /// `rx` bytes from the client, `tx` bytes to it, and the reason it failed, if it did.
    pub fn close(&self, w: usize, s: u32, rx: u64, tx: u64, reason: Option<Reason>) {
        let mut ws = lock(&self.workers[w]);
        let c = &mut ws.series[s as usize].1;
        c.closed += 1;
        c.rx_bytes += rx;
        c.tx_bytes += tx;
        if let Some(r) = reason {
            c.failures[r.index()] += 1;
        }
    }

    /// A connection of worker `w` with labels `l` failed before it was established.
    pub fn refused(&self, w: usize, l: Labels<'_>, reason: Reason) {
        let mut ws = lock(&self.workers[w]);
        let s = self.resolve(&mut ws, l);
        ws.series[s as usize].1.failures[reason.index()] += 1;
    }

    /// The series of `l` on this worker: the cached one, or admitted (or folded) now.
    fn resolve(&self, ws: &mut WorkerSeries, l: Labels<'_>) -> u32 {
        let d = l.direction.index();
        if let Some(slot) = ws.index[d].get(l.service).and_then(|m| m.get(l.source)) {
            let slot = *slot;
            if slot.folded {
                ws.folded += 1;
            }
            return slot.series;
        }
        // New to this worker: ask the shared table which labels it is counted under.
        let (key, folded) = lock(&self.admission).admit(l);
        let series = match ws.by_key.get(&key) {
            Some(s) => *s,
            None => {
                let s = ws.series.len() as u32;
                ws.by_key.insert(key.clone(), s);
                ws.series.push((key, Counts::default()));
                s
            }
        };
        if folded {
            ws.folded += 1;
            if ws.folded_cached >= FOLDED_CACHE {
                return series;
            }
            ws.folded_cached += 1;
        }
        ws.index[d]
            .entry(l.service.into())
            .or_default()
            .insert(l.source.into(), Slot { series, folded });
        series
    }

    /// Every label set's counts, summed over the workers.
    pub fn sum(&self) -> BTreeMap<Key, Counts> {
        let mut out: BTreeMap<Key, Counts> = BTreeMap::new();
        for w in self.workers.iter() {
            let ws = lock(w);
            for (k, c) in &ws.series {
                out.entry(k.clone()).or_default().add(c);
            }
        }
        out
    }

    /// Connections whose labels were folded into [`OVERFLOW`].
    pub fn folded(&self) -> u64 {
        self.workers.iter().map(|w| lock(w).folded).sum()
    }
}

/// Encode the labelled L4 counters.
pub fn encode(
    tcp: &TcpStats,
    e: &mut prometheus_client::encoding::DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    use prometheus_client::encoding::EncodeMetric;
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::metrics::MetricType;
    let all = tcp.sum();
    fn labels(k: &Key) -> Vec<(&'static str, &str)> {
        let mut v = vec![
            ("direction", k.direction.as_str()),
            ("service", &*k.service),
        ];
        if !k.source.is_empty() {
            v.push(("source", &*k.source));
        }
        v
    }
    type Get = fn(&Counts) -> u64;
    let plain: [(&str, &str, Get); 4] = [
        (
            "tcp_connections_opened",
            "L4 connections established (both ends connected, handshakes done), by direction, service and source",
            |c| c.opened,
        ),
        (
            "tcp_connections_closed",
            "L4 connections established and since ended, by direction, service and source",
            |c| c.closed,
        ),
        (
            "tcp_rx_bytes",
            "Bytes received from the client of ended L4 connections, by direction, service and source",
            |c| c.rx_bytes,
        ),
        (
            "tcp_tx_bytes",
            "Bytes sent to the client of ended L4 connections, by direction, service and source",
            |c| c.tx_bytes,
        ),
    ];
    for (name, help, get) in plain {
        let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (k, c) in &all {
            ConstCounter::new(get(c)).encode(m.encode_family(&labels(k))?)?;
        }
    }
    {
        let mut m = e.encode_descriptor(
            "tcp_failures",
            "Failed or refused L4 connections, by direction, service, source and reason code",
            None,
            MetricType::Counter,
        )?;
        for (k, c) in &all {
            for r in Reason::ALL {
                let n = c.failures[r.index()];
                if n == 0 {
                    continue;
                }
                let mut l = labels(k);
                l.push(("reason", r.as_str()));
                ConstCounter::new(n).encode(m.encode_family(&l)?)?;
            }
        }
    }
    let m = e.encode_descriptor(
        "tcp_label_overflow",
        "L4 connections counted under source=\"other\" or service=\"other\" (past the label caps)",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(tcp.folded()).encode(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inbound<'a>(service: &'a str, source: &'a str) -> Labels<'a> {
        Labels {
            direction: Direction::Inbound,
            service,
            source,
        }
    }

    #[test]
    fn sources_past_the_cap_fold_into_other_and_are_counted() {
        let t = TcpStats::new(2);
        let extra = 10;
        let names: Vec<String> = (0..MAX_SOURCES_PER_SERVICE + extra)
            .map(|i| format!("caller-{i}"))
            .collect();
        // Twice each, on both workers: the cap is for the proxy, not per worker.
        for round in 0..2 {
            for (i, n) in names.iter().enumerate() {
                let w = (i + round) % 2;
                let s = t.open(w, inbound("db", n));
                t.close(w, s, 10, 20, None);
            }
        }
        let all = t.sum();
        let named: Vec<_> = all
            .keys()
            .filter(|k| k.source.starts_with("caller-"))
            .collect();
        assert_eq!(named.len(), MAX_SOURCES_PER_SERVICE);
        let first = Key {
            direction: Direction::Inbound,
            service: "db".into(),
            source: "caller-0".into(),
        };
        assert_eq!(all[&first].opened, 2);
        assert_eq!(all[&first].rx_bytes, 20);
        let other = Key {
            direction: Direction::Inbound,
            service: "db".into(),
            source: OVERFLOW.into(),
        };
        assert_eq!(all[&other].opened, 2 * extra as u64);
        assert_eq!(all[&other].closed, 2 * extra as u64);
        assert_eq!(all[&other].tx_bytes, 2 * 20 * extra as u64);
        assert_eq!(t.folded(), 2 * extra as u64);
        assert_eq!(all.len(), MAX_SOURCES_PER_SERVICE + 1);
        // Another service has its own room.
        let s = t.open(0, inbound("web", "caller-99"));
        t.close(0, s, 1, 1, Some(Reason::UpstreamReset));
        let web = Key {
            direction: Direction::Inbound,
            service: "web".into(),
            source: "caller-99".into(),
        };
        let all = t.sum();
        assert_eq!(all[&web].failures[Reason::UpstreamReset.index()], 1);
        assert_eq!(t.folded(), 2 * extra as u64);
    }

    #[test]
    fn label_sets_past_the_total_cap_fold_into_other_services() {
        let t = TcpStats::new(1);
        let extra = 5;
        for i in 0..MAX_LABEL_SETS + extra {
            let svc = format!("svc-{i}");
            let l = Labels {
                direction: Direction::Outbound,
                service: &svc,
                source: "",
            };
            let s = t.open(0, l);
            t.close(0, s, 1, 2, None);
            t.refused(0, l, Reason::UpstreamConnectRefused);
        }
        let all = t.sum();
        // MAX_LABEL_SETS admitted, plus the one `other` set (outside the table: it is where the
        // table sends what it cannot hold).
        assert_eq!(all.len(), MAX_LABEL_SETS + 1);
        let other = Key {
            direction: Direction::Outbound,
            service: OVERFLOW.into(),
            source: "".into(),
        };
        assert_eq!(all[&other].opened, extra as u64);
        assert_eq!(all[&other].tx_bytes, 2 * extra as u64);
        assert_eq!(
            all[&other].failures[Reason::UpstreamConnectRefused.index()],
            extra as u64
        );
        // Each folded connection once: the opened ones and the refused ones.
        assert_eq!(t.folded(), 2 * extra as u64);
    }

    #[test]
    fn folded_callers_are_cached_without_growing_the_series() {
        let t = TcpStats::new(1);
        for i in 0..MAX_SOURCES_PER_SERVICE {
            t.open(0, inbound("db", &format!("a-{i}")));
        }
        for _ in 0..3 {
            t.open(0, inbound("db", "late"));
        }
        let all = t.sum();
        assert_eq!(all.len(), MAX_SOURCES_PER_SERVICE + 1);
        assert_eq!(t.folded(), 3);
    }
}
