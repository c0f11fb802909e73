//! The proxy's side of the control daemon (`ringside run --ctl SOCKET`): it gets a workload
//! certificate (the key is made here and never leaves), holds a stream to the daemon
//! ([`stream`]) on which it is sent each new configuration and acknowledges it, applies each
//! new version as one snapshot, renews the certificate at about half its lifetime (with jitter)
//! or when the daemon asks for it, and reports what it applied.
//!
//! When the daemon cannot be reached the proxy keeps serving with its last good configuration and
//! certificate, retries with back-off and shows `ctl_unreachable`. The last good configuration and
//! certificate are kept in the state directory, so a proxy restarted while the daemon is down
//! starts with them.

pub mod api;
pub mod stream;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use rustls::pki_types::pem::PemObject;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::config::Service;
use crate::control::api::{ErrorBody, ProxyEvent, ProxyReport, ReportAck, SignResponse};
use crate::reason::Reason;
use crate::server::Updater;

pub use api::{CatalogService, PortMap, ProxyConfig};

/// How long one request (or a report's acknowledgement on the stream) may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a watch is held open; also the report (heartbeat) interval.
const WATCH_WAIT: Duration = Duration::from_secs(10);
/// Back-off after a failed request: doubles from the first to the last.
const BACKOFF: (Duration, Duration) = (Duration::from_millis(250), Duration::from_secs(8));

/// One request to a daemon socket: (status, body). Read the body with [`read_answer`].
pub fn http_call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<(u16, Bytes)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let call = async {
            let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
                anyhow!(
                    "cannot reach the daemon at {}: {e} (is `ringctl daemon` running?)",
                    socket.display()
                )
            })?;
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
            let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let bytes = resp.into_body().collect().await?.to_bytes();
            Ok::<_, anyhow::Error>((status, bytes))
        };
        match tokio::time::timeout(timeout, call).await {
            Ok(r) => r,
            Err(_) => bail!(
                "the daemon at {} did not answer within {timeout:?}",
                socket.display()
            ),
        }
    })
}

/// A configuration answer made whole: one that left the catalog out (the proxy sent the
/// digest of the catalog it has, and it has not changed) gets the catalog of `had`. One that
/// left out a catalog other than `had`'s is refused: nothing is applied from it, and the round
/// fails (and is retried) as for any unreadable answer.
pub fn with_catalog(
    mut answer: ProxyConfig,
    had: Option<&ProxyConfig>,
) -> anyhow::Result<ProxyConfig> {
    if !answer.catalog_omitted {
        return Ok(answer);
    }
    match had {
        Some(h) if !h.catalog_digest.is_empty() && h.catalog_digest == answer.catalog_digest => {
            answer.services = h.services.clone();
            answer.catalog_omitted = false;
            Ok(answer)
        }
        _ => bail!(
            "the daemon left the catalog out of its answer (digest {}) but this proxy does not have that catalog; nothing applied",
            answer.catalog_digest
        ),
    }
}

/// Why a daemon answer is not the body asked for.
#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    /// The daemon refused the request: its status and the reason it gave ([`ErrorBody`]).
    #[error("{} ({status})", error.as_deref().unwrap_or("request failed"))]
    Refused {
        /// HTTP status.
        status: u16,
        /// The daemon's `error`, when its answer had one.
        error: Option<String>,
    },
    /// A 200 answer that is not the expected body (a field missing, renamed or of another type).
    #[error("the daemon's answer cannot be read: {0}")]
    Unreadable(#[from] serde_json::Error),
}

/// Read a daemon answer: the body as `T` when the status is 200, else the daemon's refusal.
pub fn read_answer<T: DeserializeOwned>(status: u16, body: &[u8]) -> Result<T, AnswerError> {
    if status == 200 {
        return Ok(serde_json::from_slice(body)?);
    }
    Err(AnswerError::Refused {
        status,
        error: serde_json::from_slice::<ErrorBody>(body)
            .ok()
            .map(|b| b.error),
    })
}

/// How the proxy reaches the daemon.
#[derive(Debug, Clone)]
pub struct ControlOptions {
    /// The daemon's proxy socket.
    pub socket: PathBuf,
    /// This proxy's token.
    pub token: String,
    /// This proxy's id in the daemon's list.
    pub proxy_id: String,
    /// The pod's address: registered as an endpoint of the token's service.
    pub address: Option<IpAddr>,
    /// Where the key, certificate, bundle and last good configuration are kept.
    pub state_dir: PathBuf,
    /// Metadata of this proxy's endpoint (for `ServiceResolver` subsets).
    pub meta: std::collections::BTreeMap<String, String>,
}

impl ControlOptions {
    /// The certificate files the sidecar's mTLS uses: in `STATE/tls`, a symbolic link to the
    /// directory of the current set (see [`install_tls`]).
    pub fn tls_files(&self) -> crate::tls::TlsFiles {
        let d = self.state_dir.join(TLS_LINK);
        crate::tls::TlsFiles {
            cert: d.join("cert.pem"),
            key: d.join("key.pem"),
            ca: d.join("bundle.pem"),
        }
    }
}

impl ProxyConfig {
    /// How this proxy calls `upstream`: the defaults (`*`) with its override on top.
    pub fn upstream_settings(&self, upstream: &str) -> crate::config::UpstreamSettings {
        let defaults = self.upstreams.get("*").copied().unwrap_or_default();
        match self.upstreams.get(upstream) {
            Some(o) => defaults.merged(o),
            None => defaults,
        }
    }

    /// The data plane's services: every catalog service and port; the proxy's own service is
    /// also local (inbound to its `targetPort`).
    pub fn services(&self) -> Vec<Service> {
        let mut out = Vec::new();
        let mut subsets = Vec::new();
        for s in &self.services {
            for p in &s.ports {
                let mut svc = Service::new(
                    s.name.clone(),
                    s.endpoints
                        .iter()
                        .map(|a| SocketAddr::new(*a, p.port))
                        .collect(),
                );
                svc.virtual_ip = Some(s.virtual_ip);
                svc.port = Some(p.port);
                svc.target_port = Some(p.target_port);
                svc.local = s.name == self.service;
                if svc.local {
                    svc.inbound = self.inbound;
                }
                svc.protocol = crate::config::Protocol::from_declared(s.protocol.as_deref());
                // Connect timeout: the calling service's upstream config, else the upstream's
                // ServiceResolver, else the default (Consul's precedence).
                if let Some(t) = self
                    .l7
                    .resolvers
                    .get(&s.name)
                    .and_then(|r| r.connect_timeout)
                {
                    svc.connect_timeout = t;
                }
                self.upstream_settings(&s.name).apply(&mut svc);
                // Requests (HTTP, or detected HTTP) are balanced by least request with latency.
                svc.lb = crate::config::LbPolicy::LeastRequest;
                // One more cluster per ServiceResolver subset: the endpoints its filter selects.
                if let Some(r) = self.l7.resolvers.get(&s.name) {
                    for (name, sub) in &r.subsets {
                        let mut ss = svc.clone();
                        ss.local = false;
                        ss.subset = Some(name.clone());
                        ss.endpoints = s
                            .endpoints
                            .iter()
                            .enumerate()
                            .filter(|(k, _)| {
                                sub.matches(&s.endpoint_meta.get(*k).cloned().unwrap_or_default())
                            })
                            .map(|(_, a)| SocketAddr::new(*a, p.port))
                            .collect();
                        subsets.push(ss);
                    }
                }
                out.push(svc);
            }
        }
        out.append(&mut subsets);
        out
    }
}

/// State of the certificate in use, kept beside it.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct CertState {
    generation: u64,
    /// When it was issued (the certificate's own not-before is backdated for clock skew).
    issued_at: i64,
    not_after: i64,
}

impl CertState {
    /// When to renew: between 45 % and 55 % of the lifetime left at issue, at least a second on.
    fn renew_at(&self) -> i64 {
        let life = (self.not_after - self.issued_at).max(0) as f64;
        (self.issued_at + (life * (0.45 + 0.1 * jitter())) as i64).max(unix_now() + 1)
    }
}

/// The link to the current certificate set, in the state directory.
const TLS_LINK: &str = "tls";

/// A test-only crash point: when `RINGSIDE_FAILPOINT` is `point` (or `point:N`, the N-th time it
/// is reached), the process aborts there, as a kill would, so tests can stop it between two writes.
fn failpoint(point: &str) {
    static REACHED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let Ok(v) = std::env::var("RINGSIDE_FAILPOINT") else {
        return;
    };
    let (name, nth) = v
        .split_once(':')
        .map_or((v.as_str(), 1), |(n, k)| (n, k.parse().unwrap_or(1)));
    if name == point && REACHED.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
        tracing::error!(point, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// Put a certificate set in place as one step: key, certificate, bundle and their state are
/// written into a new directory, then the `tls` link is switched to it by one rename. A crash at
/// any point leaves either the old set or the new one, never a key with another's certificate
/// (which would keep the proxy from starting while the daemon is down).
fn install_tls(
    state_dir: &Path,
    key: &[u8],
    cert: &[u8],
    bundle: &[u8],
    state: &CertState,
) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = format!("tls.{stamp}");
    let dir = state_dir.join(&name);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let write = |file: &str, data: &[u8], mode: u32| -> anyhow::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = dir.join(file);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .with_context(|| format!("cannot write {}", path.display()))?;
        f.write_all(data)?;
        f.sync_all()?;
        Ok(())
    };
    write("key.pem", key, 0o600)?;
    failpoint("tls-after-key");
    write("cert.pem", cert, 0o644)?;
    write("bundle.pem", bundle, 0o644)?;
    write("cert.json", serde_json::to_string(state)?.as_bytes(), 0o644)?;
    std::fs::File::open(&dir)?.sync_all()?;
    failpoint("tls-before-switch");
    let tmp = state_dir.join("tls.link.tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&name, &tmp)
        .with_context(|| format!("cannot link {}", tmp.display()))?;
    let link = state_dir.join(TLS_LINK);
    std::fs::rename(&tmp, &link).with_context(|| format!("cannot replace {}", link.display()))?;
    std::fs::File::open(state_dir)?.sync_all()?;
    // Older sets go (whatever reads through the link reopens it on the next change).
    if let Ok(entries) = std::fs::read_dir(state_dir) {
        for e in entries.flatten() {
            let n = e.file_name();
            let n = n.to_string_lossy();
            if n.starts_with("tls.") && n != name && n != "tls.link.tmp" {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    Ok(())
}

/// Write a file by renaming a complete temporary one over it (readers never see half a file).
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A number in [0, 1) that differs between proxies and between calls (renewal jitter).
fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The proxy's client of the control daemon.
#[derive(Debug)]
pub struct Control {
    opts: ControlOptions,
    /// The last configuration applied (or loaded from the state directory).
    pub config: Option<ProxyConfig>,
    cert: CertState,
    /// When to renew the certificate.
    renew_at: i64,
    bundle: String,
    /// When this proxy started (Unix seconds).
    started_at: i64,
    /// Failed connection attempts in the pod before it started.
    failed_connects_before_start: u64,
    /// Events up to this time were reported.
    last_event_ms: u64,
    /// Since when the daemon has been unreachable (Unix seconds; 0: reachable).
    unreachable_since: i64,
    /// Runs the stream's I/O (on the control thread, one call at a time).
    rt: tokio::runtime::Runtime,
    /// The stream to the daemon, while it is open.
    stream: Option<stream::ProxyStream>,
    /// A configuration that arrived while a report waited for its acknowledgement: applied next.
    arrived: Option<ProxyConfig>,
}

impl Control {
    /// A client; nothing is contacted yet.
    pub fn new(opts: ControlOptions) -> anyhow::Result<Control> {
        std::fs::create_dir_all(&opts.state_dir)
            .with_context(|| format!("cannot create {}", opts.state_dir.display()))?;
        Ok(Control {
            opts,
            config: None,
            cert: CertState::default(),
            renew_at: 0,
            bundle: String::new(),
            started_at: unix_now(),
            failed_connects_before_start: crate::listening::failed_connect_attempts().unwrap_or(0),
            last_event_ms: 0,
            unreachable_since: 0,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the control client's runtime")?,
            stream: None,
            arrived: None,
        })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
        wait: Duration,
    ) -> anyhow::Result<T> {
        let (status, answer) = http_call(
            &self.opts.socket,
            method,
            path,
            body,
            Some(&self.opts.token),
            wait + REQUEST_TIMEOUT,
        )?;
        read_answer(status, &answer).map_err(|e| match e {
            AnswerError::Refused { status, error } => anyhow!(
                "the daemon refused {method} {path} ({status}): {}",
                error.as_deref().unwrap_or("no reason given")
            ),
            AnswerError::Unreadable(e) => {
                anyhow!("the daemon's answer to {method} {path} cannot be read: {e}")
            }
        })
    }

    /// Get a configuration (waiting up to `wait` for an index above the one applied). The
    /// catalog's digest goes with it: while the catalog is the one this proxy has, the daemon
    /// leaves it out of the answer (see [`with_catalog`]).
    fn fetch(&self, wait: Duration) -> anyhow::Result<ProxyConfig> {
        let index = self.config.as_ref().map_or(0, |c| c.index);
        let digest = self
            .config
            .as_ref()
            .map(|c| c.catalog_digest.as_str())
            .filter(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_hexdigit()))
            .map(|d| format!("&catalog={d}"))
            .unwrap_or_default();
        let answer = self.call(
            "GET",
            &format!(
                "/v1/proxy/config?index={index}&wait={}{digest}",
                wait.as_secs()
            ),
            None,
            wait,
        )?;
        with_catalog(answer, self.config.as_ref())
    }

    /// Make a key and a CSR, have the daemon sign it, and put key, certificate and bundle in
    /// place (key first, then certificate: each file is replaced whole).
    fn issue(&mut self) -> anyhow::Result<()> {
        let key = rcgen::KeyPair::generate().context("cannot generate a key")?;
        let csr = rcgen::CertificateParams::new(Vec::<String>::new())
            .and_then(|p| p.serialize_request(&key))
            .and_then(|c| c.pem())
            .context("cannot make a CSR")?;
        let signed: SignResponse =
            self.call("POST", "/v1/proxy/sign", Some(csr), Duration::ZERO)?;
        let (cert, bundle) = (&signed.cert, &signed.bundle);
        let der = rustls::pki_types::CertificateDer::from_pem_slice(cert.as_bytes())
            .map_err(|e| anyhow!("the daemon sent an unreadable certificate: {e}"))?;
        let info =
            crate::tls::CertInfo::from_der(&der).map_err(|e| anyhow!("issued certificate: {e}"))?;
        let state = CertState {
            generation: signed.cert_generation,
            issued_at: unix_now(),
            not_after: info.not_after,
        };
        install_tls(
            &self.opts.state_dir,
            key.serialize_pem().as_bytes(),
            cert.as_bytes(),
            bundle.as_bytes(),
            &state,
        )?;
        self.bundle = bundle.clone();
        self.cert = state;
        self.renew_at = self.cert.renew_at();
        info!(
            identity = info.spiffe_id().map(|i| i.to_string()).unwrap_or_default(),
            expires_in_s = info.not_after - unix_now(),
            renew_in_s = self.renew_at - unix_now(),
            generation = self.cert.generation,
            "certificate issued by the control daemon"
        );
        Ok(())
    }

    /// The state kept from an earlier run: last good configuration and certificate.
    fn load_saved(&mut self) -> Option<ProxyConfig> {
        let text = std::fs::read_to_string(self.opts.state_dir.join("config.json")).ok()?;
        let config: ProxyConfig = serde_json::from_str(&text).ok()?;
        let cert: CertState = serde_json::from_str(
            &std::fs::read_to_string(self.opts.state_dir.join(TLS_LINK).join("cert.json")).ok()?,
        )
        .ok()?;
        let files = self.opts.tls_files();
        if !(files.cert.exists() && files.key.exists() && files.ca.exists()) {
            return None;
        }
        self.cert = cert;
        self.bundle = std::fs::read_to_string(&files.ca).unwrap_or_default();
        self.renew_at = cert.renew_at();
        Some(config)
    }

    fn save(&self, config: &ProxyConfig) -> anyhow::Result<()> {
        write_atomic(
            &self.opts.state_dir.join("config.json"),
            serde_json::to_string(config)?.as_bytes(),
            0o644,
        )
    }

    /// Before the proxy starts: a certificate and a first configuration, from the daemon, or the
    /// last good ones from the state directory when the daemon cannot be reached. Without either,
    /// retries until `give_up`.
    pub fn bootstrap(&mut self, give_up: Duration) -> anyhow::Result<ProxyConfig> {
        let start = Instant::now();
        let mut backoff = BACKOFF.0;
        loop {
            let attempt = self.fetch(Duration::ZERO).and_then(|c| {
                self.issue()?;
                Ok(c)
            });
            match attempt {
                Ok(c) => {
                    self.save(&c)?;
                    self.config = Some(c.clone());
                    return Ok(c);
                }
                Err(e) => {
                    if let Some(saved) = self.load_saved() {
                        warn!(
                            reason = Reason::CtlUnreachable.as_str(),
                            error = %format!("{e:#}"),
                            version = saved.index,
                            "control daemon unreachable: starting with the last good configuration and certificate"
                        );
                        self.config = Some(saved.clone());
                        return Ok(saved);
                    }
                    if start.elapsed() >= give_up {
                        return Err(
                            e.context("no configuration from the control daemon and none saved")
                        );
                    }
                    warn!(reason = Reason::CtlUnreachable.as_str(), error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "waiting for the control daemon");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(BACKOFF.1);
                }
            }
        }
    }

    fn report(&mut self, updater: &Updater) -> anyhow::Result<()> {
        // Failures since the last report go with it (the daemon keeps the recent ones per proxy
        // for `ringctl why`).
        let events: Vec<_> = updater
            .events()
            .into_iter()
            .filter(|e| e.time_ms > self.last_event_ms)
            .collect();
        let issuer = std::fs::read(self.opts.tls_files().cert)
            .ok()
            .and_then(|pem| {
                let der = rustls::pki_types::CertificateDer::from_pem_slice(&pem).ok()?;
                crate::tls::CertInfo::from_der(&der).ok()
            })
            .map(|i| i.issuer)
            .unwrap_or_default();
        let body = ProxyReport {
            id: self.opts.proxy_id.clone(),
            service: self
                .config
                .as_ref()
                .map(|c| c.service.clone())
                .unwrap_or_default(),
            address: self.opts.address,
            applied_index: self.config.as_ref().map_or(0, |c| c.index),
            cert_generation: self.cert.generation,
            cert_not_after: self.cert.not_after,
            cert_issuer: issuer,
            clock: unix_now(),
            started_at: self.started_at,
            ctl_unreachable_since: self.unreachable_since,
            failed_connects_before_start: self.failed_connects_before_start,
            events: events.iter().map(ProxyEvent::from).collect(),
            meta: self.opts.meta.clone(),
        };
        let sent = self.report_on_stream(&body);
        if sent.is_err() {
            self.stream = None;
        }
        sent?;
        if let Some(last) = events.last() {
            self.last_event_ms = last.time_ms;
        }
        Ok(())
    }

    /// The stream, opened for the configuration this proxy has when there is none.
    fn open_stream(&mut self) -> anyhow::Result<&mut stream::ProxyStream> {
        if self.stream.is_none() {
            let index = self.config.as_ref().map_or(0, |c| c.index);
            let digest = self
                .config
                .as_ref()
                .map(|c| c.catalog_digest.clone())
                .unwrap_or_default();
            let opened = self.rt.block_on(async {
                tokio::time::timeout(
                    REQUEST_TIMEOUT,
                    stream::ProxyStream::open(&self.opts.socket, &self.opts.token, index, &digest),
                )
                .await
                .map_err(|_| {
                    anyhow!(
                        "the daemon at {} did not open the proxy stream within {REQUEST_TIMEOUT:?}",
                        self.opts.socket.display()
                    )
                })?
            })?;
            self.arrived = None;
            self.stream = Some(opened);
        }
        Ok(self.stream.as_mut().expect("opened above"))
    }

    /// A configuration frame made whole (see [`with_catalog`]) against the newest this proxy has.
    fn take_config(&self, json: &[u8]) -> anyhow::Result<ProxyConfig> {
        let answer: ProxyConfig = serde_json::from_slice(json)
            .map_err(|e| anyhow!("the daemon's configuration cannot be read: {e}"))?;
        with_catalog(answer, self.arrived.as_ref().or(self.config.as_ref()))
    }

    /// Send a report on the stream and wait for its acknowledgement; a configuration that comes
    /// first is kept for the next round.
    fn report_on_stream(&mut self, report: &ProxyReport) -> anyhow::Result<()> {
        self.open_stream()?;
        let s = self.stream.as_mut().expect("opened above");
        self.rt.block_on(async {
            tokio::time::timeout(REQUEST_TIMEOUT, s.report(report))
                .await
                .map_err(|_| {
                    anyhow!("the daemon did not take a report within {REQUEST_TIMEOUT:?}")
                })?
        })?;
        let deadline = Instant::now() + REQUEST_TIMEOUT;
        loop {
            let s = self.stream.as_mut().expect("opened above");
            let left = deadline.saturating_duration_since(Instant::now());
            let (kind, json) = self
                .rt
                .block_on(async { tokio::time::timeout(left, s.next()).await })
                .map_err(|_| {
                    anyhow!("the daemon did not acknowledge a report within {REQUEST_TIMEOUT:?}")
                })??;
            match kind {
                stream::Kind::Ack => {
                    let _: ReportAck = serde_json::from_slice(&json)
                        .map_err(|e| anyhow!("the daemon's acknowledgement cannot be read: {e}"))?;
                    return Ok(());
                }
                stream::Kind::Config => self.arrived = Some(self.take_config(&json)?),
                _ => {}
            }
        }
    }

    /// Wait up to `wait` for a new configuration on the stream. `None`: the daemon pinged (it
    /// wants a report) or the wait ended.
    fn next_config(&mut self, wait: Duration) -> anyhow::Result<Option<ProxyConfig>> {
        self.open_stream()?;
        if let Some(c) = self.arrived.take() {
            return Ok(Some(c));
        }
        let deadline = Instant::now() + wait;
        loop {
            let s = self.stream.as_mut().expect("opened above");
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(frame) = self
                .rt
                .block_on(async { tokio::time::timeout(left, s.next()).await })
            else {
                return Ok(None);
            };
            let (kind, json) = frame?;
            match kind {
                stream::Kind::Config => return self.take_config(&json).map(Some),
                stream::Kind::Ping => return Ok(None),
                _ => {}
            }
        }
    }

    /// One round: wait for a change (or the next renewal), apply it, renew if due, report.
    fn round(&mut self, updater: &Updater) -> anyhow::Result<()> {
        let until_renewal = Duration::from_secs((self.renew_at - unix_now()).max(0) as u64);
        let wait = WATCH_WAIT.min(until_renewal);
        let next = self.next_config(wait);
        if next.is_err() {
            self.stream = None;
        }
        if let Some(c) = next? {
            if self.config.as_ref() != Some(&c) {
                updater.update(c.index, c.services(), c.intentions.clone(), c.l7.clone())?;
                self.save(&c)?;
                self.config = Some(c);
            }
        }
        let Some(c) = self.config.clone() else {
            bail!("no configuration yet");
        };
        if c.bundle != self.bundle && !c.bundle.is_empty() {
            // The same key and certificate with the new bundle, switched as one set.
            let files = self.opts.tls_files();
            let key = std::fs::read(&files.key).context("cannot read the current key")?;
            let cert = std::fs::read(&files.cert).context("cannot read the current certificate")?;
            install_tls(
                &self.opts.state_dir,
                &key,
                &cert,
                c.bundle.as_bytes(),
                &self.cert,
            )?;
            self.bundle = c.bundle.clone();
            info!(
                roots = c.bundle.matches("BEGIN CERTIFICATE").count(),
                "trust bundle updated"
            );
            updater.reload_certs();
        }
        if c.cert_generation > self.cert.generation || unix_now() >= self.renew_at {
            let why = if c.cert_generation > self.cert.generation {
                "rotation requested"
            } else {
                "half of its lifetime passed"
            };
            info!(why, "renewing the certificate");
            self.issue()?;
            updater.reload_certs();
        }
        self.report(updater)
    }

    /// Watch and apply until the proxy drains (runs on its own thread).
    pub fn spawn(mut self, updater: Updater) -> anyhow::Result<std::thread::JoinHandle<()>> {
        let handle = std::thread::Builder::new()
            .name("ringside-ctl".into())
            .spawn(move || {
                let mut backoff = BACKOFF.0;
                                // A first report right away (the endpoint registers before any config watch).
                let _ = self.report(&updater);
                while !updater.is_draining() {
                    match self.round(&updater) {
                                                Ok(()) => {
                            self.unreachable_since = 0;
                            if updater.set_ctl_unreachable(false, "") {
                                info!("control daemon reachable again");
                            }
                            backoff = BACKOFF.0;
                        }
                                                Err(e) => {
                            if self.unreachable_since == 0 {
                                self.unreachable_since = unix_now();
                            }
                            if !updater.set_ctl_unreachable(true, &format!("{e:#}")) {
                                warn!(
                                    reason = Reason::CtlUnreachable.as_str(),
                                    error = %format!("{e:#}"),
                                    version = self.config.as_ref().map_or(0, |c| c.index),
                                    "control daemon unreachable: keeping the last good configuration and certificate"
                                );
                            }
                            std::thread::sleep(backoff);
                            backoff = (backoff * 2).min(BACKOFF.1);
                        }
                    }
                }
            })?;
        Ok(handle)
    }
}

/// A default proxy id: host name and process id.
pub fn default_proxy_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{InboundSettings, MtlsMode, UpstreamSettings};
    use std::time::Duration;

    #[test]
    fn an_answer_without_the_catalog_takes_the_one_the_proxy_has() {
        let had = config();
        let mut lean = config();
        lean.index = 9;
        lean.services.clear();
        lean.catalog_omitted = true;
        let whole = with_catalog(lean.clone(), Some(&had)).unwrap();
        assert_eq!(whole.index, 9);
        assert_eq!(whole.services, had.services);
        assert!(!whole.catalog_omitted);
        // A whole answer is taken as it is.
        let mut full = config();
        full.services.pop();
        assert_eq!(with_catalog(full.clone(), Some(&had)).unwrap(), full);
        // Left out, but another catalog than the proxy's, or none to take it from: refused.
        lean.catalog_digest = "d2".into();
        let e = with_catalog(lean.clone(), Some(&had)).unwrap_err();
        assert!(e.to_string().contains("does not have that catalog"), "{e}");
        lean.catalog_digest = had.catalog_digest.clone();
        assert!(with_catalog(lean, None).is_err());
    }

    fn config() -> ProxyConfig {
        let svc = |name: &str| CatalogService {
            name: name.into(),
            virtual_ip: "240.0.0.1".parse().unwrap(),
            ports: vec![PortMap {
                port: 80,
                target_port: 8080,
            }],
            endpoints: vec!["198.18.0.2".parse().unwrap()],
            protocol: Some("http".into()),
            endpoint_meta: vec![Default::default()],
        };
        ProxyConfig {
            index: 1,
            service: "web".into(),
            trust_domain: "dc1".into(),
            services: vec![svc("web"), svc("api"), svc("db")],
            catalog_digest: "d1".into(),
            catalog_omitted: false,
            intentions: Default::default(),
            l7: serde_json::from_value(serde_json::json!({
                "resolvers": {"api": {"connectTimeout": "3s"}, "db": {"connectTimeout": "4s"}}
            }))
            .unwrap(),
            inbound: InboundSettings {
                mtls_mode: Some(MtlsMode::Permissive),
                max_inbound_connections: Some(5),
                ..Default::default()
            },
            upstreams: [
                (
                    "*".to_string(),
                    UpstreamSettings {
                        max_requests: Some(7),
                        ..Default::default()
                    },
                ),
                (
                    "api".to_string(),
                    UpstreamSettings {
                        connect_timeout: Some(Duration::from_millis(250)),
                        max_connections: Some(3),
                        ..Default::default()
                    },
                ),
            ]
            .into(),
            bundle: String::new(),
            cert_generation: 0,
        }
    }

    #[test]
    fn pushed_settings_reach_the_services() {
        let services = config().services();
        let by = |n: &str| services.iter().find(|s| s.name == n).unwrap();
        let web = by("web");
        assert!(web.local);
        assert_eq!(web.inbound.mtls_mode, Some(MtlsMode::Permissive));
        assert_eq!(web.inbound.max_inbound_connections, Some(5));
        // api: the caller's override wins over api's resolver; the defaults stay under it.
        let api = by("api");
        assert_eq!(api.inbound, InboundSettings::default(), "not local");
        assert_eq!(api.connect_timeout, Duration::from_millis(250));
        assert_eq!(api.max_connections, Some(3));
        assert_eq!(api.max_requests, 7);
        // db: its resolver's connect timeout, the defaults' request limit.
        let db = by("db");
        assert_eq!(db.connect_timeout, Duration::from_secs(4));
        assert_eq!(db.max_connections, None);
        assert_eq!(db.max_requests, 7);
    }
}
