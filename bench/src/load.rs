//! The load generator: one run = N connections, each on its own thread, in a closed loop (send,
//! wait for the answer, send again) or an open loop (requests on a fixed schedule).
//!
//! Open loop and coordinated omission: a connection has one request in flight, so when the target
//! stalls the client stops sending and a naive measurement records one slow request instead of
//! all the requests that should have been sent meanwhile. Here every request has an *intended*
//! send time on the schedule; its latency counts from that time (the corrected histogram), and
//! the time from the actual send to the answer is kept apart as the service time. A connection
//! that falls behind sends at once until it has caught up with its schedule.

use std::io::{IsTerminal, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::http::HttpClient;

/// The protocol spoken to the target.
#[derive(clap::ValueEnum, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// TCP ping-pong: `size` bytes out, the same bytes back (an echo server).
    Tcp,
    /// HTTP/1.1 keep-alive GET requests.
    Http,
}

impl Mode {
    /// The name used in tables and file names.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Tcp => "tcp",
            Mode::Http => "http",
        }
    }
}

/// What to run.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// Target address.
    pub addr: SocketAddr,
    /// Protocol.
    pub mode: Mode,
    /// TCP: message size in bytes (HTTP: the server decides the body size).
    pub size: usize,
    /// Concurrent connections, one thread each.
    pub connections: usize,
    /// Measured time.
    pub duration: Duration,
    /// Time run before measuring.
    pub warmup: Duration,
    /// Open loop at this many requests/s in total; closed loop when `None`.
    pub rate: Option<f64>,
    /// A new TCP connection for every request (connect time counts in the latency).
    pub connection_per_request: bool,
    /// HTTP request path.
    pub path: String,
    /// TCP: frame each message as a sockperf ping so that `sockperf server` answers it.
    pub sockperf_frames: bool,
    /// Never show a progress bar.
    pub quiet: bool,
}

/// Latency percentiles in microseconds.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Percentiles {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
    /// Largest value.
    pub max_us: f64,
    /// Mean.
    pub mean_us: f64,
}

impl Percentiles {
    /// Percentiles of a histogram of nanoseconds.
    pub fn of(h: &Histogram<u64>) -> Self {
        let us = |ns: u64| ns as f64 / 1000.0;
        Percentiles {
            p50_us: us(h.value_at_quantile(0.50)),
            p90_us: us(h.value_at_quantile(0.90)),
            p99_us: us(h.value_at_quantile(0.99)),
            p999_us: us(h.value_at_quantile(0.999)),
            max_us: us(h.max()),
            mean_us: h.mean() / 1000.0,
        }
    }
}

/// One point of a percentile curve (for a CDF or percentile-spectrum plot).
#[derive(Serialize, Deserialize, Clone, Copy, Debug)]
pub struct CurvePoint {
    /// Quantile, 0 to 1.
    pub q: f64,
    /// Latency at that quantile, from the intended send time, in µs.
    pub us: f64,
}

/// About 100 log-spaced quantiles (0, 0.5, 0.68, ..., 0.99999) of a histogram of nanoseconds.
pub fn curve(h: &Histogram<u64>) -> Vec<CurvePoint> {
    (0..=100)
        .map(|i| 1.0 - 10f64.powf(-(i as f64) / 20.0))
        .map(|q| CurvePoint {
            q,
            us: h.value_at_quantile(q) as f64 / 1000.0,
        })
        .collect()
}

/// The result of one run; the JSON output of the load commands.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct RunResult {
    /// `tcp` or `http`.
    pub mode: Mode,
    /// `closed` or `open`.
    #[serde(rename = "loop")]
    pub loop_kind: String,
    /// Whether every request had a connection of its own.
    pub connection_per_request: bool,
    /// Target address.
    pub target: String,
    /// HTTP path (HTTP mode only).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub path: Option<String>,
    /// TCP: message size; HTTP: mean response body size.
    pub size: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Measured time in seconds.
    pub duration_s: f64,
    /// Target rate (open loop), requests/s.
    pub rate_target: Option<f64>,
    /// Requests completed per second in the measured time.
    pub rate_achieved: f64,
    /// Connection-per-request runs: new connections per second (same as `rate_achieved`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub connections_per_sec: Option<f64>,
    /// Requests measured.
    pub requests: u64,
    /// Failed requests (I/O errors, HTTP statuses other than 2xx).
    pub errors: u64,
    /// Latency from the intended send time (coordinated-omission corrected).
    pub latency: Percentiles,
    /// Service time: from the actual send to the answer (equal to `latency` in a closed loop).
    pub service_time: Percentiles,
    /// Percentile curve of `latency`.
    pub curve: Vec<CurvePoint>,
    /// The histograms (nanoseconds), kept to merge rounds.
    #[serde(skip)]
    pub hist: Option<(Histogram<u64>, Histogram<u64>)>,
}

/// What one connection's thread measured.
struct ThreadOut {
    corrected: Histogram<u64>,
    service: Histogram<u64>,
    completed_in_window: u64,
    errors: u64,
    body_bytes: u64,
}

/// A new empty histogram of nanoseconds, 1 ns to 60 s at 3 significant digits.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("valid histogram bounds")
}

/// One connection to the target.
enum Client {
    Tcp(TcpStream),
    Http(Box<HttpClient>),
}

impl Client {
    fn connect(spec: &LoadSpec) -> anyhow::Result<Client> {
        Ok(match spec.mode {
            Mode::Tcp => {
                let s = TcpStream::connect(spec.addr)?;
                s.set_nodelay(true)?;
                Client::Tcp(s)
            }
            Mode::Http => Client::Http(Box::new(HttpClient::connect(spec.addr)?)),
        })
    }

    /// One request and its answer; returns the bytes received.
    fn call(&mut self, msg: &[u8], back: &mut [u8], path: &str) -> anyhow::Result<usize> {
        match self {
            Client::Tcp(s) => {
                s.write_all(msg)?;
                s.read_exact(back)?;
                Ok(back.len())
            }
            Client::Http(c) => c.get(path),
        }
    }
}

/// The message of a TCP ping-pong; a sockperf ping (big-endian sequence number, flags = client |
/// pong request, size) when `sockperf` is set.
fn message(size: usize, sockperf: bool) -> Vec<u8> {
    let mut m = vec![0x5au8; size];
    if sockperf && size >= 14 {
        m[..8].copy_from_slice(&1u64.to_be_bytes());
        m[8..10].copy_from_slice(&3u16.to_be_bytes());
        m[10..14].copy_from_slice(&(size as u32).to_be_bytes());
    }
    m
}

/// Ask the kernel for precise sleeps on this thread (the default 50 µs timer slack would delay
/// every open-loop send).
fn precise_timers() {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and only affects the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

/// Wait until `t`: sleep most of the way, spin the last few microseconds.
fn wait_until(t: Instant) {
    let now = Instant::now();
    if t > now + Duration::from_micros(30) {
        std::thread::sleep(t - now - Duration::from_micros(30));
    }
    while Instant::now() < t {
        std::hint::spin_loop();
    }
}

/// Run a load and measure it.
pub fn run(spec: &LoadSpec) -> anyhow::Result<RunResult> {
    anyhow::ensure!(
        spec.size > 0 || spec.mode == Mode::Http,
        "--size must be at least 1"
    );
    anyhow::ensure!(
        spec.sockperf_frames.then_some(spec.size >= 14) != Some(false),
        "sockperf frames need --size of at least 14"
    );
    if let Some(r) = spec.rate {
        anyhow::ensure!(r > 0.0 && r.is_finite(), "--rate must be a positive number");
    }
    let connections = spec.connections.max(1);
    let mut clients = Vec::new();
    if !spec.connection_per_request {
        for _ in 0..connections {
            let c = Client::connect(spec)
                .with_context(|| format!("cannot connect to {}", spec.addr))?;
            clients.push(Some(c));
        }
    } else {
        clients.resize_with(connections, || None);
    }
    let start = Instant::now() + Duration::from_millis(5);
    let window = (start + spec.warmup, start + spec.warmup + spec.duration);
    let done = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, client)| {
            let spec = spec.clone();
            let done = done.clone();
            // The schedule of connection i: every `interval`, shifted so connections interleave.
            let schedule = spec.rate.map(|r| {
                let interval = Duration::from_secs_f64(connections as f64 / r);
                (
                    start + interval.mul_f64(i as f64 / connections as f64),
                    interval,
                )
            });
            std::thread::spawn(move || {
                connection_loop(&spec, client, schedule, start, window, &done)
            })
        })
        .collect();
    let total = spec.warmup + spec.duration;
    let bar = (!spec.quiet && std::io::stderr().is_terminal() && total > Duration::from_secs(2))
        .then(|| {
            let b = indicatif::ProgressBar::new(total.as_millis() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} {elapsed}/{duration} {msg}")
                    .expect("valid progress template"),
            );
            b
        });
    if let Some(b) = &bar {
        while threads.iter().any(|t| !t.is_finished()) {
            std::thread::sleep(Duration::from_millis(100));
            b.set_position(start.elapsed().as_millis().min(total.as_millis()) as u64);
            b.set_message(format!("{} requests", done.load(Ordering::Relaxed)));
        }
        b.finish_and_clear();
    }
    let (mut corrected, mut service) = (new_hist(), new_hist());
    let (mut completed, mut errors, mut body) = (0, 0, 0);
    for t in threads {
        let out = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        corrected.add(&out.corrected)?;
        service.add(&out.service)?;
        completed += out.completed_in_window;
        errors += out.errors;
        body += out.body_bytes;
    }
    let secs = spec.duration.as_secs_f64();
    let rate_achieved = completed as f64 / secs;
    let requests = corrected.len();
    Ok(RunResult {
        mode: spec.mode,
        loop_kind: if spec.rate.is_some() {
            "open"
        } else {
            "closed"
        }
        .into(),
        connection_per_request: spec.connection_per_request,
        target: spec.addr.to_string(),
        path: (spec.mode == Mode::Http).then(|| spec.path.clone()),
        size: match spec.mode {
            Mode::Tcp => spec.size,
            Mode::Http => body.checked_div(requests).unwrap_or(0) as usize,
        },
        connections,
        duration_s: secs,
        rate_target: spec.rate,
        rate_achieved,
        connections_per_sec: spec.connection_per_request.then_some(rate_achieved),
        requests,
        errors,
        latency: Percentiles::of(&corrected),
        service_time: Percentiles::of(&service),
        curve: curve(&corrected),
        hist: Some((corrected, service)),
    })
}

/// One connection's loop. `schedule` is (first intended send, interval) in an open loop.
fn connection_loop(
    spec: &LoadSpec,
    mut client: Option<Client>,
    schedule: Option<(Instant, Duration)>,
    start: Instant,
    (from, until): (Instant, Instant),
    done: &AtomicU64,
) -> ThreadOut {
    let mut out = ThreadOut {
        corrected: new_hist(),
        service: new_hist(),
        completed_in_window: 0,
        errors: 0,
        body_bytes: 0,
    };
    let msg = message(spec.size.max(1), spec.sockperf_frames);
    let mut back = vec![0u8; msg.len()];
    // An open loop that cannot keep up stops sending this long after the window.
    let give_up = until + spec.duration.max(Duration::from_secs(1));
    let mut next = schedule.map(|(first, _)| first).unwrap_or(start);
    if schedule.is_some() {
        precise_timers();
    } else {
        wait_until(start);
    }
    loop {
        let intended = match schedule {
            Some((_, interval)) => {
                if next >= until || Instant::now() >= give_up {
                    break;
                }
                wait_until(next);
                let t = next;
                next += interval;
                t
            }
            None => {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                now
            }
        };
        let sent = Instant::now();
        let result = match client.as_mut() {
            Some(c) if !spec.connection_per_request => c.call(&msg, &mut back, &spec.path),
            _ => Client::connect(spec).and_then(|mut c| c.call(&msg, &mut back, &spec.path)),
        };
        let end = Instant::now();
        done.fetch_add(1, Ordering::Relaxed);
        let measured = intended >= from && intended < until;
        match result {
            Ok(n) if measured => {
                let ns = |d: Duration| (d.as_nanos() as u64).max(1);
                let _ = out.corrected.record(ns(end - intended));
                let _ = out.service.record(ns(end - sent));
                out.body_bytes += n as u64;
                if end <= until {
                    out.completed_in_window += 1;
                }
            }
            Ok(_) => {}
            Err(_) => {
                if measured {
                    out.errors += 1;
                }
                if !spec.connection_per_request {
                    // The stream is in an unknown state: start over on a new connection.
                    client = Client::connect(spec).ok();
                    if client.is_none() {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
        }
    }
    out
}

/// Print a run as a table.
pub fn print_table(r: &RunResult) {
    let kind = if r.connection_per_request {
        "connection per request"
    } else {
        "keep-alive"
    };
    println!(
        "{} {} loop, {kind}, {} connection(s), {} B, target {}",
        r.mode.as_str(),
        r.loop_kind,
        r.connections,
        r.size,
        r.target
    );
    let target = r.rate_target.map_or("-".into(), |t| format!("{t:.0}/s"));
    println!(
        "requests {} ({:.0}/s, target {target}), errors {}",
        r.requests, r.rate_achieved, r.errors
    );
    println!(
        "{:<14} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "µs", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    for (name, p) in [("latency", &r.latency), ("service time", &r.service_time)] {
        println!(
            "{name:<14} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1}",
            p.p50_us, p.p90_us, p.p99_us, p.p999_us, p.max_us, p.mean_us
        );
    }
}
