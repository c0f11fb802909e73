//! `ringside`: the sidecar proxy.
//!
//! - `ringside forward LISTEN UPSTREAM [UPSTREAM...]`: a static L4 forwarder.
//! - `ringside run --config FILE`: the sidecar, configured by a TOML or YAML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ringside_core::config::{
    ConfigFile, CopyMode, DriverKind, LbPolicy, ListenerTls, Protocol, ProxyDoc, TlsMode,
};
use ringside_core::identity::SpiffeId;
use ringside_core::tls::TlsFiles;
use ringside_core::{Config, Proxy};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use tracing::{info, warn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser, Debug)]
#[command(
    name = "ringside",
    version,
    about = "ringside: a service-mesh sidecar proxy"
)]
struct Cli {
    /// Log filter (e.g. `info`, `debug`, `ringside_core=debug`); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Process log format: `text` (one line per event), or `json` (one JSON object per line,
    /// with the connection's span fields).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How the process log is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Forward TCP connections from LISTEN to the UPSTREAM endpoints.
    Forward {
        /// Address to listen on, e.g. 127.0.0.1:6432.
        listen: SocketAddr,
        /// Upstream endpoints, e.g. 127.0.0.1:5432.
        #[arg(required = true)]
        upstreams: Vec<SocketAddr>,
        /// Endpoint choice.
        #[arg(long, value_enum, default_value_t = LbPolicy::RoundRobin)]
        lb: LbPolicy,
        /// Time allowed for one upstream connect.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
        connect_timeout: Duration,
        /// `tcp`: the L4 fast path (splice); `http`: the L7 path, a reverse proxy with keep-alive
        /// upstream pools, retries, timeouts and local replies that say what failed.
        #[arg(long, value_enum, default_value_t = Protocol::Tcp)]
        protocol: Protocol,
        /// HTTP: time allowed for a whole request, all tries.
        #[arg(long, value_parser = humantime::parse_duration, default_value = "15s")]
        request_timeout: Duration,
        /// HTTP: retries after the first try (connect failures, and --retry-on statuses).
        #[arg(long, default_value_t = 2)]
        retries: u32,
        /// HTTP: a response status to retry on another endpoint (repeat), e.g. 503.
        #[arg(long)]
        retry_on: Vec<u16>,
        /// HTTP: consecutive 5xx responses that eject an endpoint (0: never).
        #[arg(long, default_value_t = 5)]
        outlier_5xx: u32,
        /// First ejection period of a failing endpoint (doubles while it keeps failing).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "1s")]
        base_ejection: Duration,
        /// HTTP: requests in flight above which new ones get 503 circuit_open.
        #[arg(long, default_value_t = 1024)]
        max_requests: u32,
        #[command(flatten)]
        tunnel: Tunnel,
        #[command(flatten)]
        common: Common,
    },
    /// Run the sidecar from a configuration file, or from the control daemon (`--ctl`).
    Run {
        /// TOML or YAML file (by extension: .yaml/.yml are YAML). With `--ctl` it is optional and
        /// gives the proxy settings and the `sidecar:` section; services, intentions and
        /// certificates come from the daemon.
        #[arg(long, short, required_unless_present = "ctl")]
        config: Option<PathBuf>,
        #[command(flatten)]
        ctl: CtlArgs,
        #[command(flatten)]
        common: Common,
    },
    /// Wait until a ringside writes its ready file (listeners bound, config loaded): run it before
    /// the application so that the app never starts before its sidecar.
    WaitReady {
        /// The proxy's ready file (`proxy.ready_file`, `--ready-file`).
        #[arg(long, default_value = "/run/ringside/ready")]
        file: PathBuf,
        /// Give up after this long (exit status 1).
        #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
        timeout: Duration,
    },
    /// Certificate tools.
    Cert {
        #[command(subcommand)]
        command: CertCommand,
    },
    /// Check a configuration file and print what would run, as JSON.
    Check {
        /// TOML or YAML file.
        #[arg(long, short)]
        config: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
enum CertCommand {
    /// Show each certificate in a PEM file: SPIFFE ID, subject, issuer, validity.
    Inspect {
        /// PEM file (certificate, chain or trust bundle).
        file: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// mTLS tunnel mode of `ringside forward` (the job of ghostunnel or stunnel).
#[derive(Args, Debug)]
struct Tunnel {
    /// Plaintext in, mesh mTLS out.
    #[arg(long, conflicts_with = "tls_terminate", requires_all = ["cert", "key", "ca"])]
    tls_origin: bool,
    /// Mesh mTLS in (client certificate required), plaintext out.
    #[arg(long, requires_all = ["cert", "key", "ca"])]
    tls_terminate: bool,
    /// Certificate chain (PEM).
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Private key (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Trust bundle (PEM, one or more roots).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// With --tls-origin: the SPIFFE ID the upstream must present.
    #[arg(long)]
    expect_id: Option<String>,
    /// With --tls-terminate: SPIFFE IDs allowed to connect (repeat; none: any identity the trust
    /// bundle vouches for).
    #[arg(long)]
    allow_id: Vec<String>,
}

/// How `run` reaches the control daemon.
#[derive(Args, Debug)]
struct CtlArgs {
    /// The control daemon's proxy socket (`ringctl daemon --proxy-socket`).
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// The proxy token (`ringctl token create --service NAME`); prefer --token-file or the
    /// RINGSIDE_TOKEN environment variable, which other users cannot read in the process list.
    #[arg(long, env = "RINGSIDE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the proxy token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// This proxy's id in `ringctl get proxies` (default: host name and pid).
    #[arg(long)]
    proxy_id: Option<String>,
    /// The pod's IP address: registered as an endpoint of the token's service.
    #[arg(long)]
    address: Option<std::net::IpAddr>,
    /// Where the key, certificate and last good configuration are kept.
    #[arg(long, default_value = "/run/ringside/proxy")]
    state_dir: PathBuf,
    /// Metadata of this pod's endpoint, KEY=VALUE (repeat), e.g. version=v2 (ServiceResolver
    /// subsets select endpoints by it).
    #[arg(long, value_parser = parse_kv)]
    meta: Vec<(String, String)>,
    /// Without a saved configuration, how long to wait for the daemon at start.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    ctl_wait: Duration,
}

/// Settings shared by `forward` and `run`; on `run` they override the file.
#[derive(Args, Debug)]
struct Common {
    /// Worker threads (default: one per core).
    #[arg(long)]
    workers: Option<usize>,
    /// Threads of the L7 (HTTP) path (default: one per core).
    #[arg(long)]
    l7_threads: Option<usize>,
    /// Admin server address (/stats, /config_dump, /clusters, /certs, /events, /logging);
    /// sidecars default to 127.0.0.1:15000.
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Health server address (/healthz/ready); sidecars default to 0.0.0.0:15021.
    #[arg(long)]
    health: Option<SocketAddr>,
    /// Metrics-only server address (read-only GET /metrics, for a Prometheus outside the pod);
    /// sidecars default to 0.0.0.0:15020.
    #[arg(long)]
    metrics: Option<SocketAddr>,
    /// No admin, health and metrics servers.
    #[arg(long)]
    no_admin: bool,
    /// Access log: one JSON line per connection and per HTTP request (`-`: stderr).
    #[arg(long)]
    access_log: Option<PathBuf>,
    /// Event driver.
    #[arg(long, value_enum)]
    driver: Option<DriverKind>,
    /// Maximum open connections; above it connections are closed at once (`overloaded`).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Close connections idle this long (e.g. 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_timeout: Option<Duration>,
    /// On SIGTERM/SIGINT, how long connections may take to finish.
    #[arg(long, value_parser = humantime::parse_duration)]
    drain_timeout: Option<Duration>,
    /// Print counters this often (e.g. 10s).
    #[arg(long, value_parser = humantime::parse_duration)]
    stats_interval: Option<Duration>,
    /// How bytes are moved.
    #[arg(long, value_enum)]
    copy_mode: Option<CopyMode>,
    /// Pipe size in bytes.
    #[arg(long)]
    pipe_size: Option<usize>,
    /// Do not pin workers to cores.
    #[arg(long)]
    no_pin: bool,
    /// After bytes move, keep looking for the next event this long before sleeping (e.g. 50us;
    /// 0s: off).
    #[arg(long, value_parser = humantime::parse_duration)]
    idle_spin: Option<Duration>,
    /// Write this file once the listeners are bound (see `ringside wait-ready`).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

impl Common {
    fn apply(&self, p: &mut ProxyDoc) {
        if let Some(v) = self.workers {
            p.workers = v;
        }
        if let Some(v) = self.l7_threads {
            p.l7_threads = v;
        }
        if let Some(v) = self.admin {
            p.admin = Some(v);
        }
        if let Some(v) = self.metrics {
            p.metrics = Some(v);
        }
        if let Some(v) = self.health {
            p.health = Some(v);
        }
        if self.no_admin {
            p.no_admin = true;
        }
        if let Some(v) = &self.access_log {
            p.access_log = Some(v.clone());
        }
        if let Some(v) = self.driver {
            p.driver = v;
        }
        if let Some(v) = self.max_connections {
            p.max_connections = v;
        }
        if self.idle_timeout.is_some() {
            p.idle_timeout = self.idle_timeout;
        }
        if let Some(v) = self.drain_timeout {
            p.drain_timeout = v;
        }
        if self.stats_interval.is_some() {
            p.stats_interval = self.stats_interval;
        }
        if let Some(v) = self.copy_mode {
            p.copy_mode = v;
        }
        if let Some(v) = self.pipe_size {
            p.pipe_size = v;
        }
        if self.no_pin {
            p.pin_workers = false;
        }
        if let Some(v) = self.idle_spin {
            p.idle_spin = v;
        }
        if self.ready_file.is_some() {
            p.ready_file = self.ready_file.clone();
        }
    }
}

/// mimalloc's `arena_eager_commit` option (index in its option enum).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Eagerly committed arenas land on transparent huge pages and cost ~8 MB of RSS at start for
/// nothing: commit on demand instead (idle RSS 12 MB -> under 5 MB, measured). This must happen
/// before the first allocation, which the Rust runtime makes before `main`, hence a constructor.
extern "C" fn lazy_arena_commit() {
    // SAFETY: runs once at load time, single-threaded, before any allocation through mimalloc.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_ARENA_EAGER_COMMIT, 0) };
}

#[used]
#[link_section = ".init_array"]
static LAZY_ARENA_COMMIT: extern "C" fn() = lazy_arena_commit;

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("'{s}' is not KEY=VALUE"))
}

/// Changes the log filter at runtime (set once the subscriber is installed).
static LOG_LEVEL: std::sync::OnceLock<ringside_core::admin::SetLogLevel> =
    std::sync::OnceLock::new();

fn main() {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log_level));
    // Colours only on a terminal: logs written to files stay plain text. The filter can be
    // changed at runtime (admin `POST /logging?level=`).
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let text = (cli.log_format == LogFormat::Text).then(|| {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
    });
    let json = (cli.log_format == LogFormat::Json).then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_writer(std::io::stderr)
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .init();
    let _ = LOG_LEVEL.set(std::sync::Arc::new(move |level: &str| {
        let f = tracing_subscriber::EnvFilter::try_new(level)
            .map_err(|e| format!("bad filter '{level}': {e}"))?;
        handle.reload(f).map_err(|e| e.to_string())
    }));
    if let Err(e) = run(cli.command) {
        eprintln!("ringside: {e:#}");
        std::process::exit(1);
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    let config = match command {
        Command::Forward {
            listen,
            upstreams,
            lb,
            connect_timeout,
            protocol,
            request_timeout,
            retries,
            retry_on,
            outlier_5xx,
            base_ejection,
            max_requests,
            tunnel,
            common,
        } => {
            let mut proxy = ProxyDoc::default();
            common.apply(&mut proxy);
            let mut c = Config::forward(listen, upstreams, proxy)?;
            c.services[0].lb = lb;
            c.services[0].connect_timeout = connect_timeout;
            c.services[0].protocol = protocol;
            c.services[0].request_timeout = request_timeout;
            c.services[0].retries = retries;
            c.services[0].retry_on = retry_on;
            c.services[0].outlier_5xx = outlier_5xx;
            c.services[0].base_ejection = base_ejection;
            c.services[0].max_requests = max_requests;
            c.listeners[0].protocol = protocol;

            if tunnel.tls_origin || tunnel.tls_terminate {
                let parse = |flag: &str, v: &str| {
                    v.parse::<SpiffeId>()
                        .map_err(|e| anyhow::anyhow!("{flag}: {e}"))
                };
                c.listeners[0].tls = Some(ListenerTls {
                    mode: if tunnel.tls_origin {
                        TlsMode::Origin
                    } else {
                        TlsMode::Terminate
                    },
                    files: TlsFiles {
                        cert: tunnel.cert.clone().unwrap_or_default(),
                        key: tunnel.key.clone().unwrap_or_default(),
                        ca: tunnel.ca.clone().unwrap_or_default(),
                    },
                    expect_id: tunnel
                        .expect_id
                        .as_deref()
                        .map(|v| parse("--expect-id", v))
                        .transpose()?,
                    allow_ids: tunnel
                        .allow_id
                        .iter()
                        .map(|v| parse("--allow-id", v))
                        .collect::<anyhow::Result<_>>()?,
                    resumption: true,
                });
            } else if tunnel.expect_id.is_some()
                || !tunnel.allow_id.is_empty()
                || tunnel.cert.is_some()
            {
                anyhow::bail!(
                    "--cert/--key/--ca/--expect-id/--allow-id need --tls-origin or --tls-terminate"
                );
            }
            c
        }
        Command::Run {
            config,
            ctl,
            common,
        } => {
            let (text, format, name) = match &config {
                Some(path) => (
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                    ringside_core::config::Format::from_path(path),
                    path.display().to_string(),
                ),
                None => (
                    "sidecar: {}\n".to_string(),
                    ringside_core::config::Format::Yaml,
                    "(defaults)".to_string(),
                ),
            };
            let err = |e| anyhow::anyhow!("{name}: {e}");
            // Overrides go into the document, so they are validated like the file.
            let mut doc = ConfigFile::parse(&text, format).map_err(err)?;
            common.apply(&mut doc.proxy);
            let Some(socket) = ctl.ctl.clone() else {
                return serve(doc.validate(&text).map_err(err)?, None);
            };
            let token = match (&ctl.token, &ctl.token_file) {
                (_, Some(f)) => std::fs::read_to_string(f)
                    .with_context(|| format!("cannot read the token file {}", f.display()))?
                    .trim()
                    .to_string(),
                (Some(t), None) => t.clone(),
                (None, None) => anyhow::bail!(
                    "--ctl needs a proxy token: --token-file, --token or RINGSIDE_TOKEN"
                ),
            };
            let opts = ringside_core::control::ControlOptions {
                socket,
                token,
                proxy_id: ctl
                    .proxy_id
                    .clone()
                    .unwrap_or_else(ringside_core::control::default_proxy_id),
                address: ctl.address,
                state_dir: ctl.state_dir.clone(),
                meta: ctl.meta.iter().cloned().collect(),
            };
            let files = opts.tls_files();
            let sidecar = doc.sidecar.as_mut().ok_or_else(|| {
                anyhow::anyhow!(
                    "{name}: --ctl needs a `sidecar:` section (the daemon configures sidecars)"
                )
            })?;
            let mode = sidecar.mtls.as_ref().map(|m| m.mode).unwrap_or_default();
            sidecar.mtls = Some(ringside_core::config::MtlsDoc {
                mode,
                cert: files.cert,
                key: files.key,
                ca: files.ca,
            });
            let config = doc.validate(&text).map_err(err)?;
            let mut control = ringside_core::control::Control::new(opts)?;
            let first = control.bootstrap(ctl.ctl_wait)?;
            info!(
                service = %first.service,
                version = first.index,
                services = first.services.len(),
                "configuration from the control daemon"
            );
            return serve(config, Some((control, first)));
        }
        Command::WaitReady { file, timeout } => {
            let start = std::time::Instant::now();
            while !file.exists() {
                if start.elapsed() >= timeout {
                    anyhow::bail!(
                        "{} did not appear within {timeout:?}: is ringside running?",
                        file.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            return Ok(());
        }
        Command::Cert {
            command: CertCommand::Inspect { file, json },
        } => {
            let certs = ringside_core::tls::inspect_file(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&certs)?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs() as i64)
                    .unwrap_or(0);
                for (i, c) in certs.iter().enumerate() {
                    let when = |t: i64| {
                        humantime::format_rfc3339_seconds(
                            std::time::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64),
                        )
                    };
                    let state = if now > c.not_after {
                        format!(
                            "EXPIRED {} ago",
                            humantime::format_duration(Duration::from_secs(
                                (now - c.not_after) as u64
                            ))
                        )
                    } else if now < c.not_before {
                        format!(
                            "NOT YET VALID (starts in {})",
                            humantime::format_duration(Duration::from_secs(
                                (c.not_before - now) as u64
                            ))
                        )
                    } else {
                        format!(
                            "valid, expires in {}",
                            humantime::format_duration(Duration::from_secs(
                                (c.not_after - now) as u64
                            ))
                        )
                    };
                    println!("certificate {i}{}", if c.is_ca { " (CA)" } else { "" });
                    println!(
                        "  spiffe id:  {}",
                        c.spiffe_id()
                            .map(|s| s.to_string())
                            .unwrap_or_else(|| "(none)".into())
                    );
                    println!("  subject:    {}", c.subject);
                    println!("  issuer:     {}", c.issuer);
                    println!("  not before: {}", when(c.not_before));
                    println!("  not after:  {}", when(c.not_after));
                    println!("  state:      {state}");
                }
            }
            return Ok(());
        }
        Command::Check { config } => {
            let c =
                Config::load(&config).map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
            println!("{}", serde_json::to_string_pretty(&c)?);
            return Ok(());
        }
    };
    serve(config, None)
}

fn serve(
    config: Config,
    control: Option<(
        ringside_core::control::Control,
        ringside_core::control::ProxyConfig,
    )>,
) -> anyhow::Result<()> {
    // Handlers first: a SIGTERM right after the ready file appears must drain, not kill.
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])
        .context("cannot install signal handlers")?;
    let drain_timeout = config.proxy.drain_timeout;
    let stats_interval = config.proxy.stats_interval;
    let admin = ringside_core::admin::AdminOptions {
        admin: config.proxy.admin,
        health: config.proxy.health,
        metrics: config.proxy.metrics,
        set_log_level: LOG_LEVEL.get().cloned(),
    };
    let proxy = match control {
        None => Proxy::start(config)?,
        Some((control, first)) => {
            let proxy = Proxy::start_with(
                config,
                Some((
                    first.index,
                    first.services(),
                    first.intentions.clone(),
                    first.l7.clone(),
                )),
            )?;
            control.spawn(proxy.updater())?;
            proxy
        }
    };
    let bound = proxy.start_admin(admin)?;
    if !bound.is_empty() {
        info!(admin = ?bound, "admin and health servers listening");
    }

    // Signals, and `WORKER_FAILED` when a worker failed: the main thread sleeps until one of
    // them comes (or the next counters line is due).
    const WORKER_FAILED: i32 = 0; // no signal has number 0
    let (tx, rx) = std::sync::mpsc::channel();
    let failed = tx.clone();
    proxy.on_worker_failure(move || {
        let _ = failed.send(WORKER_FAILED);
    });
    std::thread::Builder::new()
        .name("ringside-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let _ = tx.send(sig);
            }
        })?;
    let mut last_print = std::time::Instant::now();
    loop {
        if proxy.is_draining() {
            anyhow::bail!("a worker failed; see the log above");
        }
        let got = match stats_interval {
            Some(every) => rx.recv_timeout(every.saturating_sub(last_print.elapsed())),
            None => rx
                .recv()
                .map_err(|_| std::sync::mpsc::RecvTimeoutError::Disconnected),
        };
        match got {
            // Said at the top of the loop.
            Ok(WORKER_FAILED) => {}
            Ok(SIGHUP) => {
                // Log rotation: the access log is reopened, nothing else changes.
                info!("SIGHUP: reopening the access log");
                proxy.reopen_access_log();
            }
            Ok(sig) => {
                info!(signal = sig, drain_timeout = ?drain_timeout, "draining: no new connections; waiting for open ones");
                let (tx2, rx2) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    // A second signal stops at once.
                    while let Ok(sig) = rx.recv() {
                        if sig != WORKER_FAILED {
                            warn!("second signal: exiting now");
                            std::process::exit(130);
                        }
                    }
                    let _ = tx2.send(());
                });
                let stats = proxy.stats_registry();
                let report = proxy.shutdown(drain_timeout);
                info!(target: "ringside::stats", "final counters {}", stats.snapshot().one_line());
                info!(
                    forced = report.forced,
                    elapsed_ms = report.elapsed.as_millis() as u64,
                    "drained; exiting"
                );
                drop(rx2);
                return Ok(());
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                anyhow::bail!("signal thread ended")
            }
        }
        if let Some(every) = stats_interval {
            if last_print.elapsed() >= every {
                last_print = std::time::Instant::now();
                let mut line = proxy.stats().one_line();
                line.push_str(&format!(" config_version={}", proxy.snapshot().version));
                if proxy.ctl_unreachable() {
                    line.push_str(" ctl=ctl_unreachable");
                }
                for (name, secs) in proxy.cert_expiry() {
                    line.push_str(&format!(" cert_expiry_seconds.{name}={secs}"));
                }
                info!(target: "ringside::stats", "{line}");
            }
        }
    }
}
