//! `compare`: a backend (the echo server, or `http-serve`) on loopback, the proxies in front of it,
//! and the same load against each of them, interleaved over rounds so that slow drifts of a shared
//! machine hit every peer alike. Reports medians over rounds and ratios to the direct path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::load::{self, CurvePoint, LoadSpec, Mode, Percentiles, RunResult};
use crate::sockperf::{self, SockperfCheck};

/// The peers `compare` knows, in their default order.
pub const PEERS: [&str; 5] = ["direct", "ringside", "haproxy", "nginx", "socat"];

/// Whether to run the sockperf agreement check.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Toggle {
    /// When sockperf is installed.
    Auto,
    /// Always (fails when sockperf is missing).
    On,
    /// Never.
    Off,
}

/// Options of `compare`.
#[derive(clap::Args, Debug)]
pub struct CompareArgs {
    /// Interleaved rounds (every peer once per round).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Measured duration of each run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    duration: Duration,
    /// Warm-up before each run.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "500ms")]
    warmup: Duration,
    /// TCP message size, HTTP response body size, in bytes.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Concurrent connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// Open loop at this many requests/s; closed loop without it.
    #[arg(long)]
    rate: Option<f64>,
    /// Protocol.
    #[arg(long, value_enum, default_value = "tcp")]
    mode: Mode,
    /// HTTP request path.
    #[arg(long, default_value = "/")]
    path: String,
    /// Peers to measure, in this order.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,ringside,haproxy,nginx,socat"
    )]
    peers: Vec<String>,
    /// The ringside binary [default: `ringside` next to this executable].
    #[arg(long)]
    ringside_bin: Option<PathBuf>,
    /// Check this tool against sockperf on the direct path first.
    #[arg(long, value_enum, default_value = "auto")]
    sockperf_check: Toggle,
    /// Measure a path that is already running instead of starting peers (repeatable):
    /// `NAME=ADDR[,netns=NS][,pids=PID+PID]`. The load runs inside network namespace NS (pods);
    /// the resident memory of each PID (e.g. both sidecars of the path) is sampled while it runs
    /// and the largest one is reported.
    #[arg(long = "target")]
    targets: Vec<String>,
    /// Write the result as JSON to this file.
    #[arg(long)]
    out: Option<PathBuf>,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

/// The machine the comparison ran on.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cores: usize,
    /// Total memory in KiB.
    pub memory_kib: u64,
    /// Kernel release.
    pub kernel: String,
    /// Version line of each program used.
    pub versions: BTreeMap<String, String>,
}

/// The load every peer got.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Settings {
    /// Protocol.
    pub mode: Mode,
    /// Rounds.
    pub rounds: usize,
    /// Measured seconds per run.
    pub duration_s: f64,
    /// Warm-up seconds per run.
    pub warmup_s: f64,
    /// Message or body size in bytes.
    pub size: usize,
    /// Concurrent connections.
    pub connections: usize,
    /// Open-loop rate; closed loop when absent.
    pub rate: Option<f64>,
}

/// Medians over rounds of one peer, and its ratios to the direct path.
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct Summary {
    /// Latency (from the intended send time), medians of each percentile over rounds.
    pub latency: Percentiles,
    /// Service time, medians over rounds.
    pub service_time: Percentiles,
    /// Median requests/s.
    pub rate_achieved: f64,
    /// Requests measured, all rounds.
    pub requests: u64,
    /// Errors, all rounds.
    pub errors: u64,
    /// p50 latency / direct p50.
    pub ratio_p50: Option<f64>,
    /// p99 latency / direct p99.
    pub ratio_p99: Option<f64>,
    /// p50 latency minus direct p50, in µs.
    pub added_p50_us: Option<f64>,
    /// p99 latency minus direct p99, in µs.
    pub added_p99_us: Option<f64>,
    /// p99.9 latency minus direct p99.9, in µs.
    #[serde(default)]
    pub added_p999_us: Option<f64>,
    /// Percentile curve of all rounds together.
    pub curve: Vec<CurvePoint>,
}

/// One peer's measurements.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct PeerResult {
    /// Peer name.
    pub name: String,
    /// How the peer was started (`direct`: the backend itself).
    pub command: String,
    /// Its configuration file, if it has one (`$TMP` is the temporary directory).
    #[serde(default)]
    pub config: Option<String>,
    /// Resident memory after the measurements, KiB (the process and its children).
    pub rss_kib: Option<u64>,
    /// Peak resident memory, KiB.
    pub hwm_kib: Option<u64>,
    /// Medians and ratios.
    pub summary: Summary,
    /// Each round's result.
    pub rounds: Vec<RunResult>,
}

/// A peer that was asked for and not measured.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct Skipped {
    /// Peer name.
    pub name: String,
    /// Why.
    pub reason: String,
}

/// The JSON written by `compare --out`.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct CompareResult {
    /// Date and time of the run, UTC (RFC 3339).
    pub date: String,
    /// The exact command line.
    pub command: String,
    /// Where it ran.
    pub machine: Machine,
    /// The load.
    pub settings: Settings,
    /// Measured peers.
    pub peers: Vec<PeerResult>,
    /// Peers asked for and not measured.
    pub skipped: Vec<Skipped>,
    /// The sockperf agreement check on the direct path, when it ran.
    pub sockperf_check: Option<SockperfCheck>,
}

/// Processes started by the harness, in a temporary directory; dropping it stops every one of
/// them (SIGTERM, then SIGKILL) and removes the directory.
#[derive(Debug)]
pub struct Procs {
    /// Temporary directory for configurations and logs.
    pub dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Procs {
    /// A new, empty set with its temporary directory.
    pub fn new() -> anyhow::Result<Procs> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos();
        let dir =
            std::env::temp_dir().join(format!("ringside-bench-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        Ok(Procs {
            dir,
            children: Vec::new(),
        })
    }

    /// Start `cmd` (output to NAME.log in the directory) and wait until `port` accepts connections.
    pub fn start(&mut self, name: &str, cmd: &mut Command, port: u16) -> anyhow::Result<u32> {
        let log_path = self.dir.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push((name.into(), child));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(pid);
            }
            let exited = self
                .children
                .last_mut()
                .and_then(|c| c.1.try_wait().ok().flatten());
            if exited.is_some() || Instant::now() > deadline {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                anyhow::bail!(
                    "{name} did not listen on 127.0.0.1:{port} ({}); command: {cmd:?}; its output:\n{}",
                    exited.map_or("timed out".into(), |s| format!("exited: {s}")),
                    tail(&log, 20)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let pids: Vec<u32> = self.children.iter().map(|c| c.1.id()).collect();
        let mut all: Vec<u32> = pids.iter().flat_map(|&p| family(p)).collect();
        all.dedup();
        all.iter().for_each(|&p| signal(p, libc::SIGTERM));
        let deadline = Instant::now() + Duration::from_secs(2);
        for (_, c) in &mut self.children {
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        // Whatever survived SIGTERM (including children of a killed parent) by its PID.
        all.iter().for_each(|&p| signal(p, libc::SIGKILL));
        for (_, c) in &mut self.children {
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Send `sig` to a process we started (or a child of one).
fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety preconditions; the PID is one of ours, not yet reaped.
    unsafe {
        libc::kill(pid as libc::pid_t, sig);
    }
}

/// `pid` and all its descendants, from /proc.
fn family(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

/// (VmRSS, VmHWM) in KiB of `pid` and its descendants together.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let mut total = None;
    for p in family(pid) {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{p}/status")) else {
            continue;
        };
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let (r, h) = total.unwrap_or((0, 0));
        total = Some((r + field("VmRSS:"), h + field("VmHWM:")));
    }
    total
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A free TCP port on loopback (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Median of some values (0 for none).
pub fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.collect();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Where `name` is: itself if it is a path, else the first match on the PATH.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Path::new(name).is_file().then(|| name.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The line of `bin ARGS` output that names the version (or its first line).
pub fn version_line(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let line = lines
        .iter()
        .find(|l| l.to_lowercase().contains("version"))
        .or(lines.first())?;
    Some(line.to_string())
}

/// The current UTC time as RFC 3339.
fn now_utc() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z",
        t.year(),
        t.month() as u8,
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// This process's command line, quoted for a POSIX shell where needed.
pub fn command_line() -> String {
    std::env::args()
        .enumerate()
        .map(|(i, a)| {
            // The program by its name, not by where it was built.
            let a = if i == 0 {
                Path::new(&a)
                    .file_name()
                    .map_or(a.clone(), |f| f.to_string_lossy().into())
            } else {
                a
            };
            if a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=,@%+".contains(c))
            {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// CPU, cores, memory and kernel, from /proc.
fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    Machine {
        cpu: cpuinfo
            .lines()
            .find_map(|l| l.strip_prefix("model name"))
            .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
            .unwrap_or_default(),
        cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
        memory_kib: read("/proc/meminfo")
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        versions: BTreeMap::new(),
    }
}

/// Whether this process runs as root (the owner of /proc/self).
fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A started peer: where to send load, its main PID (none for `direct`) and how it was started.
struct Peer {
    name: String,
    port: u16,
    pid: Option<u32>,
    command: String,
    config: Option<String>,
    /// A running path given with `--target` (then `port` and `pid` are unused).
    external: Option<Target>,
}

/// A path given with `--target`.
#[derive(Clone, Debug)]
struct Target {
    addr: std::net::SocketAddr,
    netns: Option<String>,
    pids: Vec<u32>,
}

/// Parse `NAME=ADDR[,netns=NS][,pids=PID+PID]`.
fn parse_target(spec: &str) -> anyhow::Result<(String, Target)> {
    let bad = || format!("--target {spec}: expected NAME=ADDR[,netns=NS][,pids=PID+PID]");
    let (name, rest) = spec.split_once('=').with_context(bad)?;
    let mut parts = rest.split(',');
    let addr = parts
        .next()
        .and_then(|a| a.parse().ok())
        .with_context(|| format!("{}: ADDR must be IP:PORT", bad()))?;
    let mut t = Target {
        addr,
        netns: None,
        pids: Vec::new(),
    };
    for part in parts {
        match part.split_once('=') {
            Some(("netns", ns)) => t.netns = Some(ns.to_string()),
            Some(("pids", pids)) => {
                for p in pids.split('+') {
                    t.pids
                        .push(p.parse().with_context(|| format!("{}: PID {p}", bad()))?);
                }
            }
            _ => anyhow::bail!("{}: unknown part {part}", bad()),
        }
    }
    Ok((name.to_string(), t))
}

/// Run a load against a `--target`: inside its network namespace (threads created by a thread
/// that entered it are in it too), sampling its processes' memory meanwhile. Returns the result
/// and the largest RSS (KiB) one of the processes had.
fn run_external(spec: &LoadSpec, t: &Target) -> anyhow::Result<(RunResult, u64)> {
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (done, pids) = (done.clone(), t.pids.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(Ordering::Relaxed) {
                for &p in &pids {
                    max = max.max(memory_kib(p).map_or(0, |m| m.0));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            max
        })
    };
    let (spec, netns) = (spec.clone(), t.netns.clone());
    let result = std::thread::spawn(move || -> anyhow::Result<RunResult> {
        if let Some(ns) = netns {
            use std::os::fd::AsRawFd;
            let f = std::fs::File::open(format!("/run/netns/{ns}"))
                .with_context(|| format!("network namespace {ns}"))?;
            // SAFETY: setns on a namespace descriptor we opened; it moves only this thread (and
            // the threads it creates) into the namespace.
            let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
            anyhow::ensure!(rc == 0, "setns {ns}: {}", std::io::Error::last_os_error());
        }
        load::run(&spec)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the load thread panicked"));
    done.store(true, Ordering::Relaxed);
    let max = sampler.join().unwrap_or(0);
    Ok((result??, max))
}

/// Start peer `name` in front of the backend; `Ok(None)` when its program is missing.
fn start_peer(
    procs: &mut Procs,
    name: &str,
    mode: Mode,
    backend: u16,
    ringside: &Path,
) -> anyhow::Result<Option<Peer>> {
    let port = free_port()?;
    let (listen, upstream) = (format!("127.0.0.1:{port}"), format!("127.0.0.1:{backend}"));
    let bin = match name {
        "ringside" => ringside.to_string_lossy().into_owned(),
        other => other.to_string(),
    };
    if find_in_path(&bin).is_none() {
        return Ok(None);
    }
    let dir = procs.dir.join(name);
    std::fs::create_dir_all(&dir)?;
    let mut cmd = Command::new(&bin);
    let mut config = None;
    match (name, mode) {
        ("ringside", _) => {
            cmd.args(["forward", &listen, &upstream, "--workers", "1"]);
            if mode == Mode::Http {
                cmd.args(["--protocol", "http", "--l7-threads", "1"]);
            }
        }
        ("haproxy", _) => {
            let proxy = match mode {
                Mode::Tcp => "  mode tcp\n  option splice-auto\n",
                Mode::Http => "  mode http\n  option http-keep-alive\n  http-reuse always\n",
            };
            let cfg = dir.join("haproxy.cfg");
            let text = format!(
                "global\n  nbthread 1\n  maxconn 5000\n\ndefaults\n{proxy}  timeout connect 5s\n  \
                 timeout client 1m\n  timeout server 1m\n\nlisten bench\n  bind {listen}\n  \
                 server backend {upstream}\n"
            );
            std::fs::write(&cfg, &text)?;
            config = Some(text);
            cmd.arg("-f").arg(&cfg).arg("-db");
        }
        ("nginx", _) => {
            let d = dir.display();
            let module = "/usr/lib/nginx/modules/ngx_stream_module.so";
            let mut conf = String::new();
            if mode == Mode::Tcp && Path::new(module).exists() {
                conf += &format!("load_module {module};\n");
            }
            if is_root() {
                conf += "user root;\n";
            }
            conf += &format!(
                "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 4096; }}\n"
            );
            conf += &match mode {
                Mode::Tcp => format!(
                    "stream {{\n  server {{ listen {listen}; proxy_pass {upstream}; }}\n}}\n"
                ),
                Mode::Http => format!(
                    "http {{\n  access_log off;\n  keepalive_requests 1000000;\n  \
                     client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n  \
                     fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n  \
                     upstream backend {{ server {upstream}; keepalive 64; }}\n  \
                     server {{\n    listen {listen};\n    location / {{\n      proxy_pass http://backend;\n      \
                     proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
                ),
            };
            let cfg = dir.join("nginx.conf");
            std::fs::write(&cfg, &conf)?;
            config = Some(conf);
            cmd.arg("-p").arg(&dir).arg("-c").arg(&cfg);
            cmd.args(["-g", "daemon off;", "-e"])
                .arg(dir.join("error.log"));
        }
        ("socat", Mode::Tcp) => {
            cmd.arg(format!(
                "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,nodelay"
            ));
            cmd.arg(format!("TCP:{upstream},nodelay"));
        }
        (other, _) => anyhow::bail!("peer {other} cannot run in {} mode", mode.as_str()),
    }
    let command = describe(&cmd, &procs.dir);
    let pid = procs.start(name, &mut cmd, port)?;
    Ok(Some(Peer {
        name: name.into(),
        port,
        pid: Some(pid),
        command,
        config: config.map(|c| c.replace(&*procs.dir.to_string_lossy(), "$TMP")),
        external: None,
    }))
}

/// A command as a shell line: the program by its file name, the temporary directory as `$TMP`.
fn describe(cmd: &Command, tmp: &Path) -> String {
    let program = Path::new(cmd.get_program()).file_name().unwrap_or_default();
    std::iter::once(program)
        .chain(cmd.get_args())
        .map(|a| {
            let a = a.to_string_lossy().replace(&*tmp.to_string_lossy(), "$TMP");
            if a.contains([' ', ';']) {
                format!("'{a}'")
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `compare`.
pub fn main(args: CompareArgs) -> anyhow::Result<()> {
    for p in &args.peers {
        anyhow::ensure!(
            PEERS.contains(&p.as_str()),
            "unknown peer {p} (known: {})",
            PEERS.join(",")
        );
    }
    anyhow::ensure!(args.rounds > 0, "--rounds must be at least 1");
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, interrupted.clone())?;
    }
    let check_stop = || -> anyhow::Result<()> {
        anyhow::ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");
        Ok(())
    };
    let command = command_line();
    let date = now_utc();
    let mut machine = machine();
    let mut skipped = Vec::new();

    let sockperf_check = match args.sockperf_check {
        Toggle::Off => None,
        Toggle::Auto if !sockperf::available() => {
            eprintln!("ringside-bench compare: sockperf is not installed: SKIPPING the sockperf agreement check");
            None
        }
        _ => {
            let c = sockperf::check(7, Duration::from_secs(2))?;
            eprintln!("{}", c.summary());
            machine
                .versions
                .insert("sockperf".into(), c.sockperf_version.clone());
            Some(c)
        }
    };
    check_stop()?;

    let mut procs = Procs::new()?;
    let mut peers = Vec::new();
    for t in &args.targets {
        let (name, target) = parse_target(t)?;
        peers.push(Peer {
            name,
            port: target.addr.port(),
            pid: None,
            command: format!("--target {t}"),
            config: None,
            external: Some(target),
        });
    }
    let me = std::env::current_exe()?;
    if args.targets.is_empty() {
        let backend = free_port()?;
        let mut backend_cmd = Command::new(&me);
        match args.mode {
            Mode::Tcp => backend_cmd.args(["echo", "--listen", &format!("127.0.0.1:{backend}")]),
            Mode::Http => backend_cmd
                .args(["http-serve", "--listen", &format!("127.0.0.1:{backend}")])
                .args(["--body-size", &args.size.to_string(), "--workers", "1"]),
        };
        let backend_desc = describe(&backend_cmd, &procs.dir);
        procs.start("backend", &mut backend_cmd, backend)?;
        let ringside = args
            .ringside_bin
            .clone()
            .unwrap_or_else(|| me.with_file_name("ringside"));
        for name in &args.peers {
            check_stop()?;
            if name == "direct" {
                peers.push(Peer {
                    name: name.clone(),
                    port: backend,
                    pid: None,
                    command: backend_desc.clone(),
                    config: None,
                    external: None,
                });
                continue;
            }
            if name == "socat" && args.mode == Mode::Http {
                eprintln!("ringside-bench compare: SKIPPING peer socat: it runs in tcp mode only");
                skipped.push(Skipped {
                    name: name.clone(),
                    reason: "tcp mode only".into(),
                });
                continue;
            }
            match start_peer(&mut procs, name, args.mode, backend, &ringside)? {
                Some(p) => {
                    let bin = if name == "ringside" {
                        ringside.to_string_lossy().into_owned()
                    } else {
                        name.clone()
                    };
                    let v = match name.as_str() {
                        "haproxy" => version_line(&bin, &["-v"]),
                        "nginx" => version_line(&bin, &["-v"]),
                        "socat" => version_line(&bin, &["-V"]),
                        _ => version_line(&bin, &["--version"]),
                    };
                    machine
                        .versions
                        .insert(name.clone(), v.unwrap_or_else(|| "unknown".into()));
                    peers.push(p);
                }
                None => {
                    let what = if name == "ringside" {
                        ringside.display().to_string()
                    } else {
                        name.clone()
                    };
                    eprintln!("ringside-bench compare: SKIPPING peer {name}: {what} is not installed or not found");
                    skipped.push(Skipped {
                        name: name.clone(),
                        reason: format!("{what} not found"),
                    });
                }
            }
        }
    }
    anyhow::ensure!(!peers.is_empty(), "no peer to measure");

    let spec = |addr: std::net::SocketAddr| LoadSpec {
        addr,
        mode: args.mode,
        size: args.size,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        rate: args.rate,
        connection_per_request: false,
        path: args.path.clone(),
        sockperf_frames: false,
        quiet: args.quiet,
    };
    let mut runs: Vec<Vec<RunResult>> = vec![Vec::new(); peers.len()];
    let mut external_rss = vec![0u64; peers.len()];
    for round in 0..args.rounds {
        for (i, p) in peers.iter().enumerate() {
            check_stop()?;
            let r = match &p.external {
                Some(t) => {
                    let (r, rss) = run_external(&spec(t.addr), t)
                        .with_context(|| format!("measuring {}", p.name))?;
                    external_rss[i] = external_rss[i].max(rss);
                    r
                }
                None => load::run(&spec(([127, 0, 0, 1], p.port).into()))
                    .with_context(|| format!("measuring {}", p.name))?,
            };
            eprintln!(
                "round {}/{} {:<9} p50 {:>8.1} µs  p99 {:>8.1} µs  {:>8.0} req/s  {} errors",
                round + 1,
                args.rounds,
                p.name,
                r.latency.p50_us,
                r.latency.p99_us,
                r.rate_achieved,
                r.errors
            );
            runs[i].push(r);
        }
    }

    let mut results = Vec::new();
    for ((p, rounds), rss) in peers.iter().zip(runs).zip(external_rss) {
        let mem = match (&p.external, p.pid) {
            (Some(t), _) => t
                .pids
                .iter()
                .filter_map(|&pid| memory_kib(pid))
                .max()
                .map(|(_, hwm)| (rss, hwm)),
            (None, Some(pid)) => memory_kib(pid),
            (None, None) => None,
        };

        results.push(PeerResult {
            name: p.name.clone(),
            command: p.command.clone(),
            config: p.config.clone(),
            rss_kib: mem.map(|m| m.0),
            hwm_kib: mem.map(|m| m.1),
            summary: summarize(&rounds)?,
            rounds: rounds
                .into_iter()
                .map(|mut r| {
                    r.curve.clear();
                    r
                })
                .collect(),
        });
    }
    add_ratios(&mut results);
    let result = CompareResult {
        date,
        command,
        machine,
        settings: Settings {
            mode: args.mode,
            rounds: args.rounds,
            duration_s: args.duration.as_secs_f64(),
            warmup_s: args.warmup.as_secs_f64(),
            size: args.size,
            connections: args.connections,
            rate: args.rate,
        },
        peers: results,
        skipped,
        sockperf_check,
    };
    drop(procs);
    print_table(&result);
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&result)?)
            .with_context(|| format!("cannot write {}", out.display()))?;
        eprintln!("wrote {}", out.display());
    }
    Ok(())
}

/// Medians over rounds, and the curve of all rounds merged.
fn summarize(rounds: &[RunResult]) -> anyhow::Result<Summary> {
    let med = |f: &dyn Fn(&Percentiles) -> f64, service: bool| {
        median(
            rounds
                .iter()
                .map(|r| f(if service { &r.service_time } else { &r.latency })),
        )
    };
    let pct = |service: bool| Percentiles {
        p50_us: med(&|p| p.p50_us, service),
        p90_us: med(&|p| p.p90_us, service),
        p99_us: med(&|p| p.p99_us, service),
        p999_us: med(&|p| p.p999_us, service),
        max_us: med(&|p| p.max_us, service),
        mean_us: med(&|p| p.mean_us, service),
    };
    let mut merged = load::new_hist();
    for r in rounds {
        if let Some((h, _)) = &r.hist {
            merged.add(h)?;
        }
    }
    Ok(Summary {
        latency: pct(false),
        service_time: pct(true),
        rate_achieved: median(rounds.iter().map(|r| r.rate_achieved)),
        requests: rounds.iter().map(|r| r.requests).sum(),
        errors: rounds.iter().map(|r| r.errors).sum(),
        curve: load::curve(&merged),
        ..Summary::default()
    })
}

/// Ratios and added latency against the `direct` peer, when it was measured.
fn add_ratios(results: &mut [PeerResult]) {
    let Some(direct) = results
        .iter()
        .find(|p| p.name == "direct")
        .map(|p| p.summary.latency.clone())
    else {
        return;
    };
    for p in results {
        let l = &p.summary.latency;
        p.summary.ratio_p50 = Some(l.p50_us / direct.p50_us);
        p.summary.ratio_p99 = Some(l.p99_us / direct.p99_us);
        p.summary.added_p50_us = Some(l.p50_us - direct.p50_us);
        p.summary.added_p99_us = Some(l.p99_us - direct.p99_us);
        p.summary.added_p999_us = Some(l.p999_us - direct.p999_us);
    }
}

/// Print the medians as a table.
fn print_table(r: &CompareResult) {
    let s = &r.settings;
    println!(
        "{} {} loop, {} B, {} connection(s), {} rounds of {:.1} s; medians over rounds",
        s.mode.as_str(),
        if s.rate.is_some() { "open" } else { "closed" },
        s.size,
        s.connections,
        s.rounds,
        s.duration_s
    );
    println!(
        "{:<10} {:>9} {:>9} {:>9} {:>7} {:>7} {:>8} {:>8} {:>9} {:>8}",
        "peer",
        "p50 µs",
        "p99 µs",
        "p99.9 µs",
        "p50 x",
        "p99 x",
        "+p50 µs",
        "+p99 µs",
        "req/s",
        "RSS MiB"
    );
    let opt = |v: Option<f64>, prec: usize| v.map_or("-".into(), |v| format!("{v:.prec$}"));
    for p in &r.peers {
        let (l, m) = (&p.summary.latency, &p.summary);
        println!(
            "{:<10} {:>9.1} {:>9.1} {:>9.1} {:>7} {:>7} {:>8} {:>8} {:>9.0} {:>8}",
            p.name,
            l.p50_us,
            l.p99_us,
            l.p999_us,
            opt(m.ratio_p50, 2),
            opt(m.ratio_p99, 2),
            opt(m.added_p50_us, 1),
            opt(m.added_p99_us, 1),
            m.rate_achieved,
            opt(p.rss_kib.map(|k| k as f64 / 1024.0), 1)
        );
    }
    for s in &r.skipped {
        println!("{:<10} SKIPPED: {}", s.name, s.reason);
    }
    if let Some(c) = &r.sockperf_check {
        println!("{}", c.summary());
    }
}
