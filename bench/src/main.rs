//! `ringside-bench`: a latency load generator and the harness that compares ringside with other
//! proxies.
//!
//! Subcommands:
//!
//! - `echo --listen ADDR`: a TCP echo server (a thread per connection), the far end of TCP runs.
//! - `http-serve --listen ADDR [--body-size N] [--name NAME]`: an HTTP/1.1 server answering every
//!   request with N bytes.
//! - `run --addr ADDR [--mode tcp|http] [--rate R] [--connection-per-request] ...`: one load run;
//!   a closed loop by default, an open loop at R requests/s with `--rate` (latency counted from
//!   the intended send time, which corrects coordinated omission; the service time is reported
//!   beside it). Prints a table, or one JSON object with `--json`.
//! - `pingpong --addr ADDR`: `run` in TCP mode (closed loop unless `--rate`).
//! - `connrate --addr ADDR [--concurrency N]`: `run` with a new connection per request; reports
//!   connections/s.
//! - `compare [--peers direct,ringside,haproxy,nginx,socat] [--rounds N] [--out FILE]`: starts a
//!   backend and the proxies in front of it and measures them interleaved over rounds.
//! - `report --input FILE [--input FILE...] --out-dir DIR`: a dated markdown report with SVG plots
//!   from `compare` results, and the index in DIR/README.md.
//! - `sockperf-check`: measures the direct path with this tool and with sockperf, interleaved,
//!   and fails when their p50 or p99 differ by more than 10 %.
//! - `gen-certs --out DIR NAME...`: a test PKI for the TLS benchmarks.
//! - `control [--proxies 100,1000,5000]`: the control-plane benchmark: a 3-member etcd, a daemon
//!   per node and N simulated proxies; from `apply` to every proxy's acknowledgement.
//!
//! # Layout
//!
//! - [`load`]: the load generator (closed and open loop, TCP, HTTP, connection per request).
//! - [`http`]: the HTTP client and server.
//! - [`compare`]: peers, processes, rounds and the comparison JSON.
//! - [`control`]: the control-plane benchmark.
//! - [`sockperf`]: the agreement check against sockperf.
//! - [`report`] and [`plot`]: the markdown report and its SVG plots.

mod compare;
mod control;
mod http;
mod load;
mod plot;
mod report;
mod sockperf;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use load::{LoadSpec, Mode};

#[derive(Parser, Debug)]
#[command(
    name = "ringside-bench",
    version,
    about = "ringside latency benchmark tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options of the load commands (`run`, `pingpong`, `connrate`); defaults depend on the command.
#[derive(Args, Debug)]
struct LoadArgs {
    /// Address of the target (an echo server, an HTTP server, or a proxy in front of one).
    #[arg(long)]
    addr: SocketAddr,
    /// Protocol.
    #[arg(long, value_enum)]
    mode: Option<Mode>,
    /// Shorthand for `--mode http`.
    #[arg(long)]
    http: bool,
    /// HTTP request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// TCP message size in bytes [default: 64; connrate: 1].
    #[arg(long)]
    size: Option<usize>,
    /// Concurrent connections, one thread each [default: 1; connrate: 4].
    #[arg(long, alias = "concurrency")]
    connections: Option<usize>,
    /// Measured duration.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Warm-up before measuring [default: 500ms; connrate: 0s].
    #[arg(long, value_parser = humantime::parse_duration)]
    warmup: Option<Duration>,
    /// Open loop: requests per second in total, spread over the connections.
    #[arg(long)]
    rate: Option<f64>,
    /// A new TCP connection for every request.
    #[arg(long)]
    connection_per_request: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

impl LoadArgs {
    /// The run these options describe; `connrate` sets a connection per request and its defaults.
    fn spec(self, connrate: bool) -> LoadSpec {
        LoadSpec {
            addr: self.addr,
            mode: if self.http {
                Mode::Http
            } else {
                self.mode.unwrap_or(Mode::Tcp)
            },
            size: self.size.unwrap_or(if connrate { 1 } else { 64 }),
            connections: self.connections.unwrap_or(if connrate { 4 } else { 1 }),
            duration: self.duration,
            warmup: self.warmup.unwrap_or(if connrate {
                Duration::ZERO
            } else {
                Duration::from_millis(500)
            }),
            rate: self.rate,
            connection_per_request: connrate || self.connection_per_request,
            path: self.path,
            sockperf_frames: false,
            quiet: self.quiet,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// TCP echo server.
    Echo {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// HTTP/1.1 server answering every request with `--body-size` bytes.
    HttpServe {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
        /// Response body size in bytes.
        #[arg(long, default_value_t = 64)]
        body_size: usize,
        /// Value of the `server` response header.
        #[arg(long, default_value = "ringside-bench")]
        name: String,
        /// Runtime worker threads.
        #[arg(long, default_value_t = 1)]
        workers: usize,
    },
    /// One load run: closed loop, or open loop with `--rate`; TCP or HTTP.
    Run(LoadArgs),
    /// TCP ping-pong (closed loop unless `--rate`).
    Pingpong(LoadArgs),
    /// New connections per second: connect, send, read the answer, close; N loops at once.
    Connrate(LoadArgs),
    /// Start a backend and proxies in front of it, measure them interleaved over rounds.
    Compare(compare::CompareArgs),
    /// The control plane: a 3-member etcd, daemons on it and N simulated proxies; the time from
    /// `apply` to every proxy's acknowledgement, daemon RSS and CPU, etcd traffic.
    Control(control::ControlArgs),
    /// Write a dated markdown report with SVG plots from `compare` results.
    Report(report::ReportArgs),
    /// Measure the direct path with this tool and with sockperf; fail if they disagree by >10 % at
    /// p50 or >20 % at p99.
    SockperfCheck {
        /// Interleaved rounds (each tool once per round).
        #[arg(long, default_value_t = 7)]
        rounds: usize,
        /// Duration of each measurement (whole seconds for sockperf).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        duration: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Write a test PKI (a CA and SPIFFE leaf certificates) for benchmarks: ca.pem and
    /// NAME.crt/NAME.key per name, plus NAME.pem (certificate and key together, for HAProxy).
    GenCerts {
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Trust domain.
        #[arg(long, default_value = "dc1")]
        trust_domain: String,
        /// Workload names (service accounts).
        #[arg(required = true)]
        names: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Echo { listen } => echo(listen),
        Command::HttpServe {
            listen,
            body_size,
            name,
            workers,
        } => http::serve(listen, body_size, &name, workers),
        Command::Run(a) | Command::Pingpong(a) => load_command(a, false),
        Command::Connrate(a) => load_command(a, true),
        Command::Compare(a) => compare::main(a),
        Command::Control(a) => control::main(a),
        Command::Report(a) => report::main(a),
        Command::SockperfCheck {
            rounds,
            duration,
            json,
        } => {
            let c = sockperf::check(rounds, duration)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c)?);
            } else {
                sockperf::print(&c);
            }
            anyhow::ensure!(c.pass, "{}", c.summary());
            Ok(())
        }
        Command::GenCerts {
            out,
            trust_domain,
            names,
        } => gen_certs(&out, &trust_domain, &names),
    }
}

/// `run`, `pingpong` and `connrate`.
fn load_command(args: LoadArgs, connrate: bool) -> anyhow::Result<()> {
    let json = args.json;
    let r = load::run(&args.spec(connrate))?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        load::print_table(&r);
    }
    Ok(())
}

/// Write a CA and one leaf certificate per name into `out`.
fn gen_certs(out: &std::path::Path, trust_domain: &str, names: &[String]) -> anyhow::Result<()> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, SanType,
    };
    std::fs::create_dir_all(out)?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "ringside-bench CA");
    let ca_key = KeyPair::generate()?;
    std::fs::write(out.join("ca.pem"), ca.self_signed(&ca_key)?.pem())?;
    let issuer = Issuer::from_params(&ca, &ca_key);
    for name in names {
        let id = format!("spiffe://{trust_domain}/ns/default/sa/{name}");
        let mut p = CertificateParams::new(Vec::<String>::new())?;
        p.distinguished_name.push(DnType::CommonName, name.as_str());
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        std::fs::write(out.join(format!("{name}.crt")), cert.pem())?;
        std::fs::write(out.join(format!("{name}.key")), key.serialize_pem())?;
        std::fs::write(
            out.join(format!("{name}.pem")),
            format!("{}{}", cert.pem(), key.serialize_pem()),
        )?;
    }
    Ok(())
}

/// The TCP echo server: a thread per connection, until the process is stopped.
fn echo(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen).with_context(|| format!("cannot listen on {listen}"))?;
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        std::thread::spawn(move || {
            let _ = s.set_nodelay(true);
            let mut buf = vec![0u8; 65536];
            loop {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
        });
    }
    Ok(())
}
