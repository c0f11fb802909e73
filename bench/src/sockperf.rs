//! The agreement check against sockperf: the same server (`sockperf server`), two clients, one
//! connection, 64-byte messages, interleaved over rounds; each round compares the two tools' adjacent runs, the median ratio over rounds decides.
//!
//! Why sockperf's own server: sockperf's client discards any reply whose flags still say "from a
//! client", so it gets no answer from a plain echo server. This tool's messages are framed as
//! sockperf pings for the check, which `sockperf server` answers with the same number of bytes.

use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::compare::{free_port, median, Procs};
use crate::load::{self, LoadSpec, Mode};

/// Largest relative difference allowed at p50.
pub const TOLERANCE: f64 = 0.10;
/// Largest relative difference allowed at p99: the tail of a few seconds of ping-pong moves by more
/// than 10 % with whatever else the shared machine does in that second, while a systematic error of
/// the tool (a half round trip, a timer in the loop) moves it by far more.
pub const TAIL_TOLERANCE: f64 = 0.20;

/// RTT percentiles of one measurement, in µs.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default)]
pub struct Rtt {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
}

/// The check's result.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct SockperfCheck {
    /// sockperf's version line.
    pub sockperf_version: String,
    /// The sockperf client command (the port varies).
    pub sockperf_command: String,
    /// Message size in bytes.
    pub size: usize,
    /// Seconds per measurement.
    pub duration_s: f64,
    /// This tool, per round.
    pub ours: Vec<Rtt>,
    /// sockperf, per round.
    pub sockperf: Vec<Rtt>,
    /// Medians over rounds, this tool.
    pub ours_median: Rtt,
    /// Medians over rounds, sockperf.
    pub sockperf_median: Rtt,
    /// |ours - sockperf| / sockperf at p50, p90 and p99 (fractions).
    pub diff_p50: f64,
    /// See `diff_p50`.
    pub diff_p90: f64,
    /// See `diff_p50`.
    pub diff_p99: f64,
    /// Whether p50 and p99 agree within the tolerance.
    pub pass: bool,
}

impl SockperfCheck {
    /// One sentence for reports and errors.
    pub fn summary(&self) -> String {
        format!(
            "direct-path RTT {} sockperf within {:.1} % at p50, {:.1} % at p99 (tolerance {:.0} % at p50, {:.0} % at p99, median of the per-round ratios over {} rounds)",
            if self.pass { "agrees with" } else { "does NOT agree with" },
            self.diff_p50 * 100.0,
            self.diff_p99 * 100.0,
            TOLERANCE * 100.0,
            TAIL_TOLERANCE * 100.0,
            self.ours.len()
        )
    }
}

/// Whether an executable of this name is on the PATH.
pub fn available() -> bool {
    crate::compare::find_in_path("sockperf").is_some()
}

/// Run the check: `rounds` interleaved measurements of each client against one `sockperf server`.
pub fn check(rounds: usize, duration: Duration) -> anyhow::Result<SockperfCheck> {
    anyhow::ensure!(
        available(),
        "sockperf is not installed (apt-get install sockperf)"
    );
    let size = 64;
    let secs = duration.as_secs().max(1);
    let mut procs = Procs::new()?;
    let port = free_port()?;
    let server = format!("{port}");
    procs.start(
        "sockperf-server",
        Command::new("sockperf").args(["server", "--tcp", "-i", "127.0.0.1", "-p", &server]),
        port,
    )?;
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 0..rounds.max(1) {
        // ABBA order: a drift of the machine within a round hits both tools alike.
        if round % 2 == 1 {
            theirs.push(sockperf_client(port, size, secs)?);
        }
        let r = load::run(&LoadSpec {
            addr: ([127, 0, 0, 1], port).into(),
            mode: Mode::Tcp,
            size,
            connections: 1,
            duration: Duration::from_secs(secs),
            // sockperf warms up for 400 ms too.
            warmup: Duration::from_millis(400),
            rate: None,
            connection_per_request: false,
            path: "/".into(),
            sockperf_frames: true,
            quiet: true,
        })?;
        anyhow::ensure!(r.errors == 0, "{} errors against sockperf server", r.errors);
        ours.push(Rtt {
            p50_us: r.latency.p50_us,
            p90_us: r.latency.p90_us,
            p99_us: r.latency.p99_us,
        });
        if round % 2 == 0 {
            theirs.push(sockperf_client(port, size, secs)?);
        }
        eprintln!(
            "sockperf-check round {}/{}: ours p50 {:.1} p99 {:.1} µs, sockperf p50 {:.1} p99 {:.1} µs",
            round + 1,
            rounds.max(1),
            ours[round].p50_us,
            ours[round].p99_us,
            theirs[round].p50_us,
            theirs[round].p99_us
        );
    }
    let med = |v: &[Rtt]| Rtt {
        p50_us: median(v.iter().map(|r| r.p50_us)),
        p90_us: median(v.iter().map(|r| r.p90_us)),
        p99_us: median(v.iter().map(|r| r.p99_us)),
    };
    let (a, b) = (med(&ours), med(&theirs));
    // The machine drifts between rounds (idle cores wake up slower than busy ones) by more than
    // the tools differ, so each round's pair of adjacent runs is compared, and the median of
    // those ratios decides.
    let paired = |f: fn(&Rtt) -> f64| {
        (median(ours.iter().zip(&theirs).map(|(x, y)| f(x) / f(y))) - 1.0).abs()
    };
    let (d50, d90, d99) = (
        paired(|r| r.p50_us),
        paired(|r| r.p90_us),
        paired(|r| r.p99_us),
    );
    Ok(SockperfCheck {
        sockperf_version: crate::compare::version_line("sockperf", &["--version"])
            .unwrap_or_default(),
        sockperf_command: format!(
            "sockperf ping-pong --tcp -i 127.0.0.1 -p PORT -m {size} -t {secs} --full-rtt"
        ),
        size,
        duration_s: secs as f64,
        ours,
        sockperf: theirs,
        ours_median: a,
        sockperf_median: b,
        diff_p50: d50,
        diff_p90: d90,
        diff_p99: d99,
        pass: d50 <= TOLERANCE && d99 <= TAIL_TOLERANCE,
    })
}

/// One sockperf ping-pong run; `--full-rtt` makes its percentiles round trips (without it they are
/// half round trips).
fn sockperf_client(port: u16, size: usize, secs: u64) -> anyhow::Result<Rtt> {
    let out = Command::new("sockperf")
        .args([
            "ping-pong",
            "--tcp",
            "-i",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args([
            "-m",
            &size.to_string(),
            "-t",
            &secs.to_string(),
            "--full-rtt",
        ])
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines like "sockperf: ---> percentile 99.000 =  148.361".
    let pct = |p: &str| {
        text.lines()
            .find(|l| l.contains(&format!("percentile {p} =")))
            .and_then(|l| l.rsplit('=').next())
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    match (pct("50.000"), pct("90.000"), pct("99.000")) {
        (Some(p50_us), Some(p90_us), Some(p99_us)) => Ok(Rtt {
            p50_us,
            p90_us,
            p99_us,
        }),
        _ => anyhow::bail!(
            "sockperf printed no percentiles:\n{}",
            crate::compare::tail(&text, 20)
        ),
    }
}

/// Print the check as a table.
pub fn print(c: &SockperfCheck) {
    println!("{:<16} {:>9} {:>9} {:>9}", "RTT µs", "p50", "p90", "p99");
    for (name, r) in [
        ("ringside-bench", &c.ours_median),
        ("sockperf", &c.sockperf_median),
    ] {
        println!(
            "{name:<16} {:>9.1} {:>9.1} {:>9.1}",
            r.p50_us, r.p90_us, r.p99_us
        );
    }
    println!(
        "{:<16} {:>8.1}% {:>8.1}% {:>8.1}%",
        "difference",
        c.diff_p50 * 100.0,
        c.diff_p90 * 100.0,
        c.diff_p99 * 100.0
    );
    println!("{}", c.summary());
}
