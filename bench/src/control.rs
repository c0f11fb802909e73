//! The control-plane benchmark (`ringside-bench control`): a 3-member etcd, a `ringctl daemon`
//! per node on it, and N simulated proxies. A simulated proxy does what `ringside run --ctl` does
//! with its daemon, without a data plane: it fetches its configuration, has a certificate signed
//! (a fresh key and CSR), reports (which registers its endpoint on its daemon's lease), then
//! holds its stream (`GET /v1/proxy/stream`) and reports every version it is sent, and answers
//! every ping with a report (the heartbeat).
//!
//! Measured for each N, on a fresh mesh: how long N proxies take to come up (every one has
//! reported the index that holds every endpoint); the time from `apply` to each proxy's
//! acknowledgement of the new version, over several changes (p50, p99, max); the daemons' RSS
//! (idle, with one proxy each, with all) and CPU per 1,000 proxies; the configuration size a proxy fetches; etcd's traffic per change
//! (client and peer bytes, less the traffic of an idle window of the same length).

use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use ringside_core::control::api::{
    ApplyResponse, IndexResponse, ProxyReport, RegisterService, SignResponse, TokenRequest,
    TokenResponse,
};
use ringside_core::control::stream::{Kind, ProxyStream};
use ringside_core::control::PortMap;
use serde::{Deserialize, Serialize};

/// Options of `ringside-bench control`.
#[derive(Args, Debug)]
pub struct ControlArgs {
    /// Simulated proxy counts, one fresh mesh each.
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    proxies: Vec<usize>,
    /// Daemons (nodes) on the etcd cluster; proxies are spread over them.
    #[arg(long, default_value_t = 3)]
    daemons: usize,
    /// etcd members.
    #[arg(long, default_value_t = 3)]
    etcd_members: usize,
    /// Services the proxies belong to (proxy i is of service i mod S).
    #[arg(long, default_value_t = 50)]
    services: usize,
    /// Configuration changes measured per run.
    #[arg(long, default_value_t = 10)]
    changes: usize,
    /// The most a run waits for every proxy (to come up, to acknowledge a change).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "60s")]
    deadline: Duration,
    /// The ringctl binary [default: beside this one].
    #[arg(long)]
    ringctl: Option<PathBuf>,
    /// Write the results as JSON here.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The figures of one run.
#[derive(Debug, Serialize)]
pub struct RunResult {
    /// Simulated proxies.
    pub proxies: usize,
    /// Daemons.
    pub daemons: usize,
    /// etcd members.
    pub etcd_members: usize,
    /// Seconds until every proxy had reported the index holding every endpoint.
    pub up_s: f64,
    /// Changes measured.
    pub changes: usize,
    /// Changes every proxy acknowledged within the deadline.
    pub changes_complete: usize,
    /// From apply to a proxy's acknowledgement, over all proxies and changes: p50, p99, max (ms).
    pub ack_p50_ms: f64,
    /// See `ack_p50_ms`.
    pub ack_p99_ms: f64,
    /// See `ack_p50_ms`.
    pub ack_max_ms: f64,
    /// Per change: the time until the last proxy acknowledged (ms), median over changes.
    pub last_ack_median_ms: f64,
    /// From apply to a proxy having the new configuration (before its report), p50 (ms).
    pub received_p50_ms: f64,
    /// See `received_p50_ms`, p99.
    pub received_p99_ms: f64,
    /// Bytes of the largest configuration answer with the catalog.
    pub config_bytes: usize,
    /// Bytes of the largest answer without the catalog (the proxy had it).
    pub lean_config_bytes: usize,
    /// Daemon RSS before any proxy (MB, mean over daemons).
    pub daemon_rss_base_mb: f64,
    /// Daemon RSS with the proxies attached, after the changes (MB, mean over daemons).
    pub daemon_rss_mb: f64,
    /// Daemon RSS with its first proxy up (MB, mean over daemons).
    pub daemon_rss_first_mb: f64,
    /// RSS growth from idle per 1,000 proxies a daemon serves (MB): what a daemon allocates
    /// once for its first proxy is divided over its proxies too.
    pub daemon_rss_per_1000_mb: f64,
    /// RSS growth per 1,000 proxies beyond each daemon's first (MB): the cost of a proxy.
    pub daemon_rss_further_per_1000_mb: f64,
    /// CPU of all daemons together while idle with the proxies attached (heartbeats), in cores.
    pub daemon_cpu_idle_cores: f64,
    /// CPU seconds of all daemons per change.
    pub daemon_cpu_per_change_s: f64,
    /// etcd bytes (client and peer, all members) per change, less the idle traffic.
    pub etcd_bytes_per_change: f64,
    /// etcd bytes per second while idle with the proxies attached.
    pub etcd_idle_bytes_per_s: f64,
    /// Requests that failed (transport or refusal) during the run.
    pub failed_requests: u64,
}

/// A process killed (SIGKILL) and reaped when dropped.
#[derive(Debug)]
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Proc> {
        let log = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        Ok(Proc {
            child,
            name: name.to_string(),
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(st) = self.child.try_wait()? {
            bail!("{} exited: {st}", self.name);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// One plain HTTP GET on loopback (etcd's /health and /metrics); the body.
fn http_get(port: u16, path: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

fn wait_until(what: &str, within: Duration, mut ok: impl FnMut() -> bool) -> anyhow::Result<()> {
    let start = Instant::now();
    while !ok() {
        if start.elapsed() > within {
            bail!("{what}: not within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The etcd members and the daemons of one run.
#[derive(Debug)]
struct Mesh {
    etcd: Vec<Proc>,
    etcd_ports: Vec<u16>,
    daemons: Vec<Proc>,
    dir: PathBuf,
}

impl Mesh {
    fn start(dir: &Path, ringctl: &Path, members: usize, daemons: usize) -> anyhow::Result<Mesh> {
        std::fs::create_dir_all(dir)?;
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let cluster = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("m{i}=http://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut etcd = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let mut cmd = Command::new("etcd");
            cmd.arg("--name")
                .arg(format!("m{i}"))
                .arg("--data-dir")
                .arg(dir.join(format!("etcd-m{i}")))
                .arg("--listen-client-urls")
                .arg(format!("http://127.0.0.1:{c}"))
                .arg("--advertise-client-urls")
                .arg(format!("http://127.0.0.1:{c}"))
                .arg("--listen-peer-urls")
                .arg(format!("http://127.0.0.1:{p}"))
                .arg("--initial-advertise-peer-urls")
                .arg(format!("http://127.0.0.1:{p}"))
                .arg("--initial-cluster")
                .arg(&cluster)
                .arg("--initial-cluster-state")
                .arg("new")
                .arg("--initial-cluster-token")
                .arg(format!("ringside-bench-{}", std::process::id()));
            etcd.push(Proc::spawn(
                &format!("etcd member m{i}"),
                &mut cmd,
                &dir.join(format!("etcd-m{i}.log")),
            )?);
        }
        let client_ports: Vec<u16> = ports.iter().map(|(c, _)| *c).collect();
        for &c in &client_ports {
            wait_until("etcd healthy", Duration::from_secs(30), || {
                http_get(c, "/health").is_ok_and(|b| b.contains("\"health\":\"true\""))
            })?;
        }
        let secret = dir.join("ca.secret");
        let hex: String = (0..32)
            .map(|_| format!("{:02x}", rand_byte()))
            .collect::<String>();
        std::fs::write(&secret, hex)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;
        let store = format!(
            "etcd://{}",
            client_ports
                .iter()
                .map(|p| format!("127.0.0.1:{p}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        let mut ds = Vec::new();
        for i in 0..daemons {
            let d = dir.join(format!("node{i}"));
            std::fs::create_dir_all(&d)?;
            let mut cmd = Command::new(ringctl);
            cmd.arg("daemon")
                .arg("--store")
                .arg(&store)
                .arg("--ca-secret")
                .arg(&secret)
                .arg("--data-dir")
                .arg(d.join("data"))
                .arg("--socket")
                .arg(d.join("ctl.sock"))
                .arg("--proxy-socket")
                .arg(d.join("proxy.sock"))
                .arg("--node")
                .arg(format!("node{i}"));
            ds.push(Proc::spawn(
                &format!("daemon node{i}"),
                &mut cmd,
                &dir.join(format!("node{i}.log")),
            )?);
            // One at a time: the first creates the mesh CA, the others read it.
            let (a, b) = (d.join("ctl.sock"), d.join("proxy.sock"));
            wait_until(&format!("daemon node{i}"), Duration::from_secs(30), || {
                std::os::unix::net::UnixStream::connect(&a).is_ok()
                    && std::os::unix::net::UnixStream::connect(&b).is_ok()
            })?;
        }
        Ok(Mesh {
            etcd,
            etcd_ports: client_ports,
            daemons: ds,
            dir: dir.to_path_buf(),
        })
    }

    fn operator_socket(&self) -> PathBuf {
        self.dir.join("node0/ctl.sock")
    }

    fn proxy_socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}/proxy.sock"))
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for p in self.etcd.iter_mut().chain(self.daemons.iter_mut()) {
            p.check_alive()?;
        }
        Ok(())
    }

    /// Client and peer bytes, sent and received, summed over the members.
    fn etcd_bytes(&self) -> f64 {
        self.etcd_ports
            .iter()
            .filter_map(|&p| http_get(p, "/metrics").ok())
            .map(|text| {
                text.lines()
                    .filter(|l| {
                        l.starts_with("etcd_network_client_grpc_received_bytes_total")
                            || l.starts_with("etcd_network_client_grpc_sent_bytes_total")
                            || l.starts_with("etcd_network_peer_sent_bytes_total")
                            || l.starts_with("etcd_network_peer_received_bytes_total")
                    })
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                    .sum::<f64>()
            })
            .sum()
    }

    /// (RSS in bytes, CPU seconds) of each daemon.
    fn daemon_usage(&self) -> Vec<(u64, f64)> {
        self.daemons
            .iter()
            .map(|d| (rss_bytes(d.pid()), cpu_seconds(d.pid())))
            .collect()
    }
}

fn rand_byte() -> u8 {
    let mut b = [0u8; 1];
    ring_fill(&mut b);
    b[0]
}

fn ring_fill(b: &mut [u8]) {
    // Not secret material that matters (a benchmark's throw-away mesh), but from the OS.
    use std::io::Read;
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(b);
    }
}

fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024
}

fn cpu_seconds(pid: u32) -> f64 {
    // SAFETY: sysconf reads a constant of the system; no memory is touched.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may hold spaces) end with ')'.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15 (1-based), 12 and 13 after ')' and state.
            Some((f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / hz)
        })
        .unwrap_or(0.0)
}

/// One request on a daemon socket: (status, body).
async fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connect {}", socket.display()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header(hyper::header::HOST, "ringctl");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let resp = sender
        .send_request(req.body(Full::new(Bytes::from(body.unwrap_or_default())))?)
        .await?;
    let status = resp.status().as_u16();
    Ok((status, resp.into_body().collect().await?.to_bytes()))
}

async fn call_json<T: serde::de::DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<T> {
    let (status, bytes) = call(socket, method, path, body, token).await?;
    if status != 200 {
        bail!(
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    serde_json::from_slice(&bytes).with_context(|| format!("{method} {path}: unreadable answer"))
}

/// The fields of a configuration answer a simulated proxy acts on (the rest is skipped, as a
/// proxy that applied it would have read it; its size is counted).
#[derive(Debug, Deserialize)]
struct ConfigHead {
    index: u64,
    cert_generation: u64,
    #[serde(default)]
    catalog_digest: String,
    #[serde(default)]
    catalog_omitted: bool,
}

/// What the proxies share with the run.
#[derive(Debug)]
struct Shared {
    /// Per proxy: every (index, when it had the configuration, when its report was taken).
    acks: Vec<Mutex<Vec<(u64, Instant, Instant)>>>,
    /// Per proxy: the last index acknowledged.
    acked: Vec<AtomicU64>,
    failed: AtomicU64,
    last_config_bytes: AtomicUsize,
    lean_config_bytes: AtomicUsize,
    stop: AtomicBool,
}

#[derive(Debug)]
struct SimProxy {
    n: usize,
    socket: PathBuf,
    token: String,
    service: String,
    address: Ipv4Addr,
}

impl SimProxy {
    fn report_body(&self, index: u64, generation: u64, not_after: i64) -> ProxyReport {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        ProxyReport {
            id: format!("sim-{}", self.n),
            service: self.service.clone(),
            address: Some(self.address.into()),
            applied_index: index,
            cert_generation: generation,
            cert_not_after: not_after,
            cert_issuer: String::new(),
            clock: now,
            started_at: now,
            ctl_unreachable_since: 0,
            failed_connects_before_start: 0,
            events: Vec::new(),
            meta: Default::default(),
        }
    }

    /// The first configuration, as `ringside run` bootstraps (one request, no waiting).
    async fn fetch(&self, shared: &Shared) -> anyhow::Result<ConfigHead> {
        let (status, body) = call(
            &self.socket,
            "GET",
            "/v1/proxy/config?index=0&wait=0",
            None,
            Some(&self.token),
        )
        .await?;
        if status != 200 {
            bail!("config: {status} {}", String::from_utf8_lossy(&body));
        }
        shared.last_config_bytes.fetch_max(body.len(), Relaxed);
        Ok(serde_json::from_slice(&body)?)
    }

    async fn sign(&self) -> anyhow::Result<SignResponse> {
        let key = rcgen::KeyPair::generate()?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())?
            .serialize_request(&key)?
            .pem()?;
        call_json(
            &self.socket,
            "POST",
            "/v1/proxy/sign",
            Some(csr),
            Some(&self.token),
        )
        .await
    }

    /// Come up, then hold the stream and acknowledge until the run stops, as `ringside run
    /// --ctl` does: a configuration frame is applied and acknowledged with a report, a ping
    /// answered with one. Failures are counted and the stream opened again after a short pause,
    /// as a proxy backs off.
    async fn run(self, shared: Arc<Shared>) {
        let ack = |index: u64, got: Instant| {
            shared.acks[self.n]
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((index, got, Instant::now()));
            shared.acked[self.n].store(index, Relaxed);
        };
        let (c, generation, not_after) = loop {
            let up = async {
                let c = self.fetch(&shared).await?;
                let s = self.sign().await?;
                Ok::<_, anyhow::Error>((c, s.cert_generation, not_after_of(&s.cert)))
            };
            match up.await {
                Ok(v) => break v,
                Err(_) => {
                    shared.failed.fetch_add(1, Relaxed);
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        };
        let (mut index, mut digest) = (c.index, c.catalog_digest);
        let mut first = true;
        while !shared.stop.load(Relaxed) {
            let held = async {
                let mut s = ProxyStream::open(&self.socket, &self.token, index, &digest).await?;
                // A report at once: the endpoint registers (and, the first time, the proxy is up).
                let mut todo: Option<(ConfigHead, usize, Instant)> = None;
                let mut report = Some(index);
                loop {
                    if let Some(i) = report.take() {
                        let body = self.report_body(i, generation, not_after);
                        if let Some(t) = report_acked(&mut s, &body).await? {
                            todo = Some(t);
                        }
                        if first {
                            first = false;
                            ack(i, Instant::now());
                        }
                    }
                    if shared.stop.load(Relaxed) {
                        return Ok(());
                    }
                    let (head, size, got) = match todo.take() {
                        Some(t) => t,
                        None => {
                            let next =
                                tokio::time::timeout(Duration::from_secs(30), s.next()).await;
                            let (kind, json) = next.map_err(|_| anyhow!("a silent daemon"))??;
                            match kind {
                                Kind::Config => {
                                    let head: ConfigHead = serde_json::from_slice(&json)?;
                                    (head, json.len(), Instant::now())
                                }
                                Kind::Ping => {
                                    report = Some(index);
                                    continue;
                                }
                                _ => continue,
                            }
                        }
                    };
                    if head.catalog_omitted {
                        if head.catalog_digest != digest {
                            bail!("config: the catalog was left out, but it is not the one this proxy has");
                        }
                        shared.lean_config_bytes.fetch_max(size, Relaxed);
                    } else {
                        shared.last_config_bytes.fetch_max(size, Relaxed);
                    }
                    let _ = head.cert_generation;
                    digest = head.catalog_digest;
                    let body = self.report_body(head.index, generation, not_after);
                    if let Some(t) = report_acked(&mut s, &body).await? {
                        todo = Some(t);
                    }
                    if head.index != index {
                        index = head.index;
                        ack(index, got);
                    }
                }
            };
            let r: anyhow::Result<()> = held.await;
            if r.is_err() {
                shared.failed.fetch_add(1, Relaxed);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Send a report and wait for its acknowledgement. A configuration that arrives meanwhile is
/// returned (its head, size and arrival) to be applied next.
async fn report_acked(
    s: &mut ProxyStream,
    body: &ProxyReport,
) -> anyhow::Result<Option<(ConfigHead, usize, Instant)>> {
    s.report(body).await?;
    let mut arrived = None;
    loop {
        let (kind, json) = s.next().await?;
        match kind {
            Kind::Ack => return Ok(arrived),
            Kind::Config => {
                let head: ConfigHead = serde_json::from_slice(&json)?;
                arrived = Some((head, json.len(), Instant::now()));
            }
            _ => {}
        }
    }
}

fn not_after_of(pem: &str) -> i64 {
    use rustls::pki_types::pem::PemObject;
    rustls::pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .ok()
        .and_then(|der| {
            x509_parser::parse_x509_certificate(&der)
                .ok()
                .map(|(_, c)| c.validity().not_after.timestamp())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The document of change `k`: intentions toward the first service, their sources changing.
fn change_doc(k: usize, services: usize) -> String {
    let mut doc = String::from(
        "apiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: svc-0\nspec:\n  destination:\n    name: svc-0\n  sources:\n",
    );
    for s in 1..services.max(2) {
        let action = if (s + k) % 2 == 0 { "allow" } else { "deny" };
        doc.push_str(&format!("    - name: svc-{s}\n      action: {action}\n"));
    }
    doc
}

fn one_run(args: &ControlArgs, ringctl: &Path, n: usize) -> anyhow::Result<RunResult> {
    let dir = std::env::temp_dir().join(format!("ringside-cpbench-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let result = (|| {
        let mut mesh = Mesh::start(&dir, ringctl, args.etcd_members, args.daemons)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let op = mesh.operator_socket();
        // Services and one token per service.
        let tokens: Vec<String> = rt.block_on(async {
            let mut tokens = Vec::new();
            for s in 0..args.services {
                let name = format!("svc-{s}");
                let _: serde_json::Value = call_json(
                    &op,
                    "POST",
                    "/v1/services",
                    Some(serde_json::to_string(&RegisterService {
                        name: name.clone(),
                        ports: vec![PortMap {
                            port: 8080,
                            target_port: 8080,
                        }],
                    })?),
                    None,
                )
                .await?;
                let t: TokenResponse = call_json(
                    &op,
                    "POST",
                    "/v1/tokens",
                    Some(serde_json::to_string(&TokenRequest {
                        service: name,
                        ttl_s: None,
                    })?),
                    None,
                )
                .await?;
                tokens.push(t.token);
            }
            Ok::<_, anyhow::Error>(tokens)
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let base = mesh.daemon_usage();
        let shared = Arc::new(Shared {
            acks: (0..n).map(|_| Mutex::new(Vec::new())).collect(),
            acked: (0..n).map(|_| AtomicU64::new(0)).collect(),
            failed: AtomicU64::new(0),
            last_config_bytes: AtomicUsize::new(0),
            lean_config_bytes: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let spawn = |i: usize| {
            let p = SimProxy {
                n: i,
                socket: mesh.proxy_socket(i % args.daemons),
                token: tokens[i % args.services].clone(),
                service: format!("svc-{}", i % args.services),
                address: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i as u32),
            };
            rt.spawn(p.run(shared.clone()))
        };
        // One proxy per daemon first: what a daemon allocates once, for its first proxy (the
        // code paths of serving one paged in, the etcd client's buffers grown, the first
        // answers cached), is measured apart from what each further proxy costs.
        let first = n.min(args.daemons);
        let mut tasks: Vec<_> = (0..first).map(spawn).collect();
        wait_until("each daemon's first proxy up", args.deadline, || {
            shared.acked[..first].iter().all(|a| a.load(Relaxed) > 0)
        })?;
        std::thread::sleep(Duration::from_secs(1));
        let warm = mesh.daemon_usage();
        let start = Instant::now();
        tasks.extend((first..n).map(spawn));
        // Up: every endpoint registered, and every proxy has acknowledged an index at least
        // the one that holds them all.
        let all_up = |shared: &Shared| shared.acked.iter().all(|a| a.load(Relaxed) > 0);
        wait_until("every proxy up", args.deadline, || all_up(&shared))?;
        let registered = rt.block_on(async {
            let eps: serde_json::Value = call_json(&op, "GET", "/v1/endpoints", None, None).await?;
            let idx: IndexResponse = call_json(&op, "GET", "/v1/index", None, None).await?;
            Ok::<_, anyhow::Error>((eps.as_array().map_or(0, |a| a.len()), idx.index))
        })?;
        let top = registered.1;
        wait_until(
            "every proxy acknowledged the full catalog",
            args.deadline,
            || shared.acked.iter().all(|a| a.load(Relaxed) >= top),
        )?;
        let up_s = start.elapsed().as_secs_f64();
        eprintln!(
            "{n} proxies up in {up_s:.2} s ({} endpoints registered, index {top})",
            registered.0
        );
        // Idle window: heartbeats only.
        std::thread::sleep(Duration::from_secs(2));
        let idle = Duration::from_secs(10);
        let (u0, e0) = (mesh.daemon_usage(), mesh.etcd_bytes());
        std::thread::sleep(idle);
        let (u1, e1) = (mesh.daemon_usage(), mesh.etcd_bytes());
        let cpu = |u: &[(u64, f64)]| u.iter().map(|x| x.1).sum::<f64>();
        let idle_cores = (cpu(&u1) - cpu(&u0)) / idle.as_secs_f64();
        let etcd_idle_rate = (e1 - e0) / idle.as_secs_f64();
        // Changes.
        let mut latencies = Vec::new();
        let mut received = Vec::new();
        let mut last_acks = Vec::new();
        let mut complete = 0;
        let t_changes = Instant::now();
        let (uc0, ec0) = (mesh.daemon_usage(), mesh.etcd_bytes());
        for k in 0..args.changes {
            let t0 = Instant::now();
            let applied: ApplyResponse = rt.block_on(call_json(
                &op,
                "POST",
                "/v1/apply",
                Some(change_doc(k, args.services)),
                None,
            ))?;
            let idx = applied.index;
            let ok = wait_until("every proxy acknowledged", args.deadline, || {
                shared.acked.iter().all(|a| a.load(Relaxed) >= idx)
            })
            .is_ok();
            if ok {
                complete += 1;
            }
            let mut last: f64 = 0.0;
            for a in &shared.acks {
                let a = a.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((got, acked)) = a
                    .iter()
                    .filter(|(i, got, _)| *i >= idx && *got >= t0)
                    .map(|(_, got, acked)| (*got, *acked))
                    .min()
                {
                    let ms = (acked - t0).as_secs_f64() * 1000.0;
                    latencies.push(ms);
                    received.push((got - t0).as_secs_f64() * 1000.0);
                    last = last.max(ms);
                }
            }
            last_acks.push(last);
            eprintln!("change {k}: index {idx}, last proxy acknowledged after {last:.1} ms");
            mesh.check_alive()?;
            std::thread::sleep(Duration::from_millis(500));
        }
        let changes_time = t_changes.elapsed();
        let (uc1, ec1) = (mesh.daemon_usage(), mesh.etcd_bytes());
        let config_bytes = shared.last_config_bytes.load(Relaxed);
        let lean_config_bytes = shared.lean_config_bytes.load(Relaxed);
        shared.stop.store(true, Relaxed);
        for t in tasks {
            t.abort();
        }
        let cpu_changes = cpu(&uc1) - cpu(&uc0) - idle_cores * changes_time.as_secs_f64();
        let etcd_changes = ec1 - ec0 - etcd_idle_rate * changes_time.as_secs_f64();
        latencies.sort_by(|a, b| a.total_cmp(b));
        received.sort_by(|a, b| a.total_cmp(b));
        last_acks.sort_by(|a, b| a.total_cmp(b));
        let mb = |b: f64| b / 1_048_576.0;
        let mean_rss =
            |u: &[(u64, f64)]| u.iter().map(|x| x.0 as f64).sum::<f64>() / u.len() as f64;
        let (rss_base, rss_warm, rss_now) = (mean_rss(&base), mean_rss(&warm), mean_rss(&uc1));
        let per_daemon = n as f64 / args.daemons as f64;
        let more_per_daemon = (n - first) as f64 / args.daemons as f64;
        rt.shutdown_timeout(Duration::from_secs(1));
        Ok(RunResult {
            proxies: n,
            daemons: args.daemons,
            etcd_members: args.etcd_members,
            up_s,
            changes: args.changes,
            changes_complete: complete,
            ack_p50_ms: percentile(&latencies, 0.5),
            ack_p99_ms: percentile(&latencies, 0.99),
            ack_max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            last_ack_median_ms: percentile(&last_acks, 0.5),
            received_p50_ms: percentile(&received, 0.5),
            received_p99_ms: percentile(&received, 0.99),
            config_bytes,
            lean_config_bytes,
            daemon_rss_base_mb: mb(rss_base),
            daemon_rss_mb: mb(rss_now),
            daemon_rss_first_mb: mb(rss_warm),
            daemon_rss_per_1000_mb: mb(rss_now - rss_base) / per_daemon * 1000.0,
            daemon_rss_further_per_1000_mb: mb(rss_now - rss_warm) / more_per_daemon * 1000.0,
            daemon_cpu_idle_cores: idle_cores,
            daemon_cpu_per_change_s: cpu_changes / args.changes.max(1) as f64,
            etcd_bytes_per_change: etcd_changes / args.changes.max(1) as f64,
            etcd_idle_bytes_per_s: etcd_idle_rate,
            failed_requests: shared.failed.load(Relaxed),
        })
    })();
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(&dir);
    } else {
        eprintln!("the run's logs are kept in {}", dir.display());
    }
    result
}

/// `ringside-bench control`.
pub fn main(args: ControlArgs) -> anyhow::Result<()> {
    let ringctl = match &args.ringctl {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("ringctl"),
    };
    if !ringctl.exists() {
        bail!(
            "no ringctl at {} (build the workspace's binaries, or pass --ringctl)",
            ringctl.display()
        );
    }
    Command::new("etcd")
        .arg("--version")
        .output()
        .map_err(|e| anyhow!("etcd is not installed ({e}): scripts/deps.sh installs it"))?;
    let mut results = Vec::new();
    for &n in &args.proxies {
        let r = one_run(&args, &ringctl, n).with_context(|| format!("the run with {n} proxies"))?;
        println!(
            "{:>6} proxies: up {:.2} s; received p50 {:.1} ms p99 {:.1} ms; ack p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({}/{} changes complete); config {} B ({} B without the catalog); daemon RSS {:.1} MB idle, {:.1} MB with its first proxy, {:.1} MB with all (+{:.1} MB per 1,000 from idle, +{:.1} MB per 1,000 beyond the first), CPU idle {:.2} cores, {:.3} s per change; etcd {:.0} B per change, {:.0} B/s idle; {} failed requests",
            r.proxies,
            r.up_s,
            r.received_p50_ms,
            r.received_p99_ms,
            r.ack_p50_ms,
            r.ack_p99_ms,
            r.ack_max_ms,
            r.changes_complete,
            r.changes,
            r.config_bytes,
            r.lean_config_bytes,
            r.daemon_rss_base_mb,
            r.daemon_rss_first_mb,
            r.daemon_rss_mb,
            r.daemon_rss_per_1000_mb,
            r.daemon_rss_further_per_1000_mb,
            r.daemon_cpu_idle_cores,
            r.daemon_cpu_per_change_s,
            r.etcd_bytes_per_change,
            r.etcd_idle_bytes_per_s,
            r.failed_requests
        );
        results.push(r);
    }
    if let Some(out) = &args.out {
        std::fs::write(out, serde_json::to_string_pretty(&results)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn change_documents_differ_and_parse() {
        let a = change_doc(0, 4);
        let b = change_doc(1, 4);
        assert_ne!(a, b);
        assert_eq!(a.matches("- name: svc-").count(), 3);
        let m: HashMap<String, serde_json::Value> = serde_yaml::from_str(&a).unwrap();
        assert_eq!(m["kind"], "ServiceIntentions");
    }

    #[test]
    fn percentiles_of_sorted_values() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
