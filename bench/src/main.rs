//! `ringside-bench`: a latency load generator.
//!
//! - `ringside-bench echo --listen ADDR`: a TCP echo server (one thread per connection), the far end
//!   of a ping-pong run.
//! - `ringside-bench pingpong --addr ADDR`: closed-loop TCP ping-pong over N connections; each
//!   round trip is recorded in an HdrHistogram; prints percentiles as a table or JSON.
//!
//! The side-by-side comparison with HAProxy, nginx, socat and the direct path is `bench/l4-compare.sh`
//! for now; it uses this tool's echo server and sockperf/iperf3/pgbench as clients.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use serde::Serialize;

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

#[derive(Subcommand, Debug)]
enum Command {
    /// TCP echo server.
    Echo {
        /// Address to listen on.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// New connections per second: connect, send a byte, read it back, close; N loops at once.
    Connrate {
        /// Address of an echo server (or a proxy in front of one).
        #[arg(long)]
        addr: SocketAddr,
        /// Concurrent loops, one thread each.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// Measured duration.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a test PKI (a CA and SPIFFE leaf certificates) for benchmarks: ca.pem and
    /// NAME.crt/NAME.key per name, plus NAME.pem (certificate and key together, for HAProxy).
    GenCerts {
        /// Output directory.
        #[arg(long)]
        out: std::path::PathBuf,
        /// Trust domain.
        #[arg(long, default_value = "dc1")]
        trust_domain: String,
        /// Workload names (service accounts).
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Closed-loop TCP ping-pong.
    Pingpong {
        /// Address of an echo server (or a proxy in front of one).
        #[arg(long)]
        addr: SocketAddr,
        /// Message size in bytes.
        #[arg(long, default_value_t = 64)]
        size: usize,
        /// Concurrent connections, one thread each.
        #[arg(long, default_value_t = 1)]
        connections: usize,
        /// Measured duration.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        duration: Duration,
        /// Warm-up before measuring.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
        warmup: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Serialize, Debug)]
struct PingpongResult {
    addr: SocketAddr,
    size: usize,
    connections: usize,
    round_trips: u64,
    round_trips_per_sec: f64,
    p50_us: f64,
    p90_us: f64,
    p99_us: f64,
    p999_us: f64,
    max_us: f64,
    mean_us: f64,
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Echo { listen } => echo(listen),
        Command::Connrate {
            addr,
            concurrency,
            duration,
            json,
        } => {
            let (n, errors, secs) = connrate(addr, concurrency, duration)?;
            let rate = n as f64 / secs;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"addr": addr, "connections": n, "errors": errors, "connections_per_sec": rate})
                );
            } else {
                println!("{rate:.0} connections/s ({n} in {secs:.1} s, {errors} errors)");
            }
            Ok(())
        }
        Command::GenCerts {
            out,
            trust_domain,
            names,
        } => gen_certs(&out, &trust_domain, &names),
        Command::Pingpong {
            addr,
            size,
            connections,
            duration,
            warmup,
            json,
        } => {
            let r = pingpong(addr, size, connections, duration, warmup)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "{:>10} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
                    "p50_us", "p90_us", "p99_us", "p99.9_us", "max_us", "mean_us", "rtt/s"
                );
                println!(
                    "{:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>12.0}",
                    r.p50_us,
                    r.p90_us,
                    r.p99_us,
                    r.p999_us,
                    r.max_us,
                    r.mean_us,
                    r.round_trips_per_sec
                );
            }
            Ok(())
        }
    }
}

fn connrate(
    addr: SocketAddr,
    concurrency: usize,
    duration: Duration,
) -> anyhow::Result<(u64, u64, f64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let threads: Vec<_> = (0..concurrency.max(1))
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut ok, mut err) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    let r = (|| -> std::io::Result<()> {
                        let mut s = TcpStream::connect(addr)?;
                        s.set_nodelay(true)?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    })();
                    match r {
                        Ok(()) => ok += 1,
                        Err(_) => err += 1,
                    }
                }
                (ok, err)
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    let secs = start.elapsed().as_secs_f64();
    let (mut ok, mut err) = (0, 0);
    for t in threads {
        let (o, e) = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))?;
        ok += o;
        err += e;
    }
    Ok((ok, err, secs))
}

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

fn pingpong(
    addr: SocketAddr,
    size: usize,
    connections: usize,
    duration: Duration,
    warmup: Duration,
) -> anyhow::Result<PingpongResult> {
    anyhow::ensure!(size > 0, "--size must be at least 1");
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for _ in 0..connections.max(1) {
        let mut s =
            TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
        s.set_nodelay(true)?;
        let (measuring, stop) = (measuring.clone(), stop.clone());
        threads.push(std::thread::spawn(
            move || -> anyhow::Result<Histogram<u64>> {
                let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
                let msg = vec![0x5au8; size];
                let mut back = vec![0u8; size];
                while !stop.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    s.write_all(&msg)?;
                    s.read_exact(&mut back)?;
                    if measuring.load(Ordering::Relaxed) {
                        h.record(t.elapsed().as_nanos().max(1) as u64)?;
                    }
                }
                Ok(h)
            },
        ));
    }
    std::thread::sleep(warmup);
    measuring.store(true, Ordering::Relaxed);
    let t0 = Instant::now();
    std::thread::sleep(duration);
    measuring.store(false, Ordering::Relaxed);
    let elapsed = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let mut total = Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3)?;
    for t in threads {
        let h = t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
        total.add(&h)?;
    }
    let us = |ns: u64| ns as f64 / 1000.0;
    Ok(PingpongResult {
        addr,
        size,
        connections,
        round_trips: total.len(),
        round_trips_per_sec: total.len() as f64 / elapsed.as_secs_f64(),
        p50_us: us(total.value_at_quantile(0.50)),
        p90_us: us(total.value_at_quantile(0.90)),
        p99_us: us(total.value_at_quantile(0.99)),
        p999_us: us(total.value_at_quantile(0.999)),
        max_us: us(total.max()),
        mean_us: total.mean() / 1000.0,
    })
}
