//! Starting and stopping the proxy: bind listeners, start one worker thread per core, print
//! counters, and drain on request (SIGTERM/SIGINT in the binary).
//!
//! Drain: the control thread sets `draining` and shuts every listening socket down, which ends the
//! pending accepts (no cross-thread waker needed). Workers then wait for their connections to end;
//! at the deadline `force_close` makes them drop what is left.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, Socket, Type};
use tracing::{info, warn};

use crate::config::{Config, DriverKind, Service};
use crate::decide::cluster::Cluster;
use crate::io::worker;
use crate::policy::intentions::Intentions;
use crate::telemetry::stats::{Snapshot, StatsRegistry};

/// State shared by all workers and the control thread.
#[derive(Debug)]
pub(crate) struct Shared {
    /// The configuration the proxy started with (listeners and settings are fixed for its life;
    /// services and intentions in force are in `snapshot`).
    pub config: Config,
    /// What can change while running: services, intentions and everything built from them.
    /// A connection loads it once and keeps it to its end.
    pub snapshot: arc_swap::ArcSwap<ConfigSnapshot>,
    /// Mesh TLS material per listener (same order as `config.listeners`).
    pub tls: Vec<Option<Arc<crate::tls::MeshTls>>>,
    /// The sidecar's mesh mTLS, when on.
    pub sidecar_tls: Option<crate::tls::sidecar::SidecarTls>,
    /// Counters.
    pub stats: StatsRegistry,
    /// Connections open across all workers (for `max_connections`).
    pub active: AtomicUsize,
    /// Inbound connections open (for `max_inbound_connections`).
    pub active_inbound: AtomicUsize,
    /// Stop accepting; workers exit once their connections end.
    pub draining: AtomicBool,
    /// The control daemon cannot be reached (the last good config stays in force).
    pub ctl_unreachable: AtomicBool,
    /// The L7 (HTTP) path, when something is HTTP.
    pub l7: std::sync::OnceLock<crate::l7::L7>,
    /// Recent failures (`/events`).
    pub events: crate::telemetry::events::Events,
    /// The access log, when on.
    pub access_log: Option<crate::telemetry::access_log::AccessLog>,
    /// The drain deadline passed: close what is left.
    pub force_close: AtomicBool,
    /// The proxy's own listening ports and the host's addresses (a connection headed there is
    /// refused: it would loop through the proxy).
    pub own: arc_swap::ArcSwap<crate::decide::plan::OwnAddrs>,
    /// When the host's addresses were last read (at most once a second, so connections to other
    /// hosts' mesh ports cannot make every connection read them).
    pub own_read_at: std::sync::Mutex<Instant>,
    /// Told every time a new snapshot is in force (the L7 lanes re-authorize their connections;
    /// the fast-path workers are nudged instead, see `nudges`).
    pub config_changed: tokio::sync::watch::Sender<u64>,
    /// One socket per fast-path worker (and one for the certificate watcher): a byte written here
    /// wakes the worker's loop, which then looks at the snapshot, the drain and the forced close.
    /// A monoio runtime is woken from its own thread only, so the worker reads the other end like
    /// any socket; between nudges (and its idle-clock ticks) an idle worker sleeps.
    pub nudges: std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>,
    /// Called when a worker fails (after the drain it starts), so that whoever runs the proxy
    /// learns it without looking.
    pub on_failure: std::sync::Mutex<Option<FailureHook>>,
}

/// What [`Proxy::on_worker_failure`] was given.
pub(crate) struct FailureHook(Box<dyn Fn() + Send>);

impl std::fmt::Debug for FailureHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FailureHook")
    }
}

/// Services, intentions and what is built from them, swapped as one piece on a config update.
#[derive(Debug)]
pub struct ConfigSnapshot {
    /// Version of the configuration (the control daemon's index; 0 for a file).
    pub version: u64,
    /// Which snapshot of this process this is (every build gets the next number): workers compare
    /// it to notice a change.
    pub generation: u64,
    /// Services: those of the config file first (static listeners point at them by index), then
    /// those pushed by the control daemon.
    pub services: Vec<Service>,
    /// Intentions in force.
    pub intentions: Arc<Intentions>,
    /// Routers and splitters in force.
    pub l7: Arc<crate::policy::rules::L7Config>,
    /// Upstream state per service (same order as `services`).
    pub clusters: Vec<Arc<Cluster>>,
    /// Original-destination lookup for the sidecar listeners.
    pub routes: crate::decide::route::Routes,
    /// Sidecar inbound TLS per service (same order as `services`), for local mesh services.
    pub inbound_tls: Vec<crate::tls::sidecar::InboundTls>,
    /// Inbound connections allowed at once by the local services' settings (Consul's
    /// `maxInboundConnections`; the smallest when several set it), beside the proxy's own limit.
    pub max_inbound: Option<usize>,
}

impl ConfigSnapshot {
    /// The service a connection to `service` goes to: itself, or its `ServiceResolver` failover
    /// target when it has no usable endpoint ([`crate::decide::route::fail_over`]).
    pub fn fail_over(&self, service: usize, now: std::time::Instant) -> usize {
        let targets = self.l7.failover(&self.services[service].name);
        crate::decide::route::fail_over(&self.clusters, service, &targets, now)
    }

    /// Build a snapshot. Upstream state (ejections, connection counts) is kept for services that
    /// did not change since `previous`.
    pub(crate) fn build(
        version: u64,
        services: Vec<Service>,
        intentions: Intentions,
        l7: crate::policy::rules::L7Config,
        registry_only: bool,
        sidecar_tls: Option<&crate::tls::sidecar::SidecarTls>,
        previous: Option<&ConfigSnapshot>,
    ) -> anyhow::Result<ConfigSnapshot> {
        let intentions = Arc::new(intentions);
        let clusters = services
            .iter()
            .map(|s| {
                previous
                    .and_then(|p| p.clusters.iter().find(|c| c.service == *s))
                    .cloned()
                    .unwrap_or_else(|| Cluster::new(s.clone(), Instant::now()))
            })
            .collect();
        let inbound_tls = match sidecar_tls {
            Some(st) => st
                .inbound_for(&services, &intentions)
                .context("sidecar mTLS")?,
            None => vec![Default::default(); services.len()],
        };
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Ok(ConfigSnapshot {
            version,
            generation: GENERATION.fetch_add(1, SeqCst),
            routes: crate::decide::route::Routes::new(&services, registry_only),
            max_inbound: services
                .iter()
                .filter(|s| s.local)
                .filter_map(|s| s.inbound.max_inbound_connections)
                .min(),
            services,
            intentions,
            l7: Arc::new(l7),
            clusters,
            inbound_tls,
        })
    }
}

/// Endpoint states of every service.
pub(crate) fn cluster_status(shared: &Shared) -> Vec<ClusterStatus> {
    let now = Instant::now();
    shared
        .snapshot
        .load()
        .clusters
        .iter()
        .map(|c| ClusterStatus {
            service: c.service.name.clone(),
            endpoints: (0..c.endpoints.len())
                .map(|i| {
                    let e = &c.endpoints[i];
                    EndpointStatus {
                        addr: e.addr,
                        active: e.active.load(Relaxed),
                        consecutive_failures: e.consecutive_failures(),
                        ejected: c.is_ejected(i, now),
                        half_open: c.is_half_open(i, now),
                    }
                })
                .collect(),
        })
        .collect()
}

/// Seconds until each certificate in use expires.
pub(crate) fn cert_expiry(shared: &Shared) -> Vec<(String, i64)> {
    shared
        .config
        .listeners
        .iter()
        .zip(&shared.tls)
        .filter_map(|(l, m)| m.as_ref().map(|m| (l.name.clone(), m.expires_in_secs())))
        .chain(
            shared
                .sidecar_tls
                .iter()
                .map(|s| ("sidecar".to_string(), s.outbound.expires_in_secs())),
        )
        .collect()
}

/// The certificates in use, for `/certs`.
pub(crate) fn cert_status(shared: &Shared) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut add = |name: String, m: &crate::tls::MeshTls| {
        let b = m.current();
        out.push(serde_json::json!({
            "name": name,
            "identity": b.material.id.as_ref().map(|i| i.to_string()),
            "not_after_unix": b.material.not_after.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            "expires_in_s": m.expires_in_secs(),
        }));
    };
    for (l, m) in shared.config.listeners.iter().zip(&shared.tls) {
        if let Some(m) = m {
            add(l.name.clone(), m);
        }
    }
    if let Some(st) = &shared.sidecar_tls {
        add("sidecar".into(), &st.outbound);
    }
    out
}

impl Shared {
    /// Begin a drain: workers stop accepting, and are nudged to see it at once.
    pub(crate) fn begin_drain(&self) {
        self.draining.store(true, SeqCst);
        self.nudge_workers();
    }

    /// Wake every fast-path worker's loop (after a new snapshot, a drain or a forced close), and
    /// the certificate watcher.
    /// A nudge that finds the socket full is dropped: one is already waiting to be read.
    /// A worker that already ended has closed its end: the send fails quietly (no `SIGPIPE`).
    pub fn nudge_workers(&self) {
        use std::os::fd::AsRawFd;
        let nudges = self.nudges.lock().unwrap_or_else(|e| e.into_inner());
        for s in nudges.iter() {
            let _ = crate::io::sys::send(s.as_raw_fd(), &[1]);
        }
    }

    /// A connection ended: it leaves the open-connection counts.
    pub(crate) fn release(&self, inbound: bool) {
        self.active.fetch_sub(1, SeqCst);
        if inbound {
            self.active_inbound.fetch_sub(1, SeqCst);
        }
    }

    fn reload_certs(&self) {
        for m in self.tls.iter().flatten() {
            m.reload_if_changed();
        }
        if let Some(st) = &self.sidecar_tls {
            st.outbound.reload_if_changed();
            for t in self.snapshot.load().inbound_tls.iter() {
                for m in t.l4.iter().chain(&t.l7) {
                    m.reload_if_changed();
                }
            }
        }
    }
}

/// Applies configuration updates to a running proxy.
#[derive(Debug, Clone)]
pub struct Updater {
    shared: Arc<Shared>,
}

impl Updater {
    /// Replace the services pushed by the control daemon and the intentions; the services of the
    /// config file stay first. New connections use the new snapshot at once; connections in flight
    /// keep the one they started with.
    pub fn update(
        &self,
        version: u64,
        services: Vec<Service>,
        intentions: Intentions,
        l7: crate::policy::rules::L7Config,
    ) -> anyhow::Result<()> {
        let all: Vec<Service> = self
            .shared
            .config
            .services
            .iter()
            .cloned()
            .chain(services)
            .collect();
        let previous = self.shared.snapshot.load_full();
        let snap = ConfigSnapshot::build(
            version,
            all,
            intentions,
            l7,
            self.shared
                .config
                .sidecar
                .as_ref()
                .is_some_and(|s| s.registry_only),
            self.shared.sidecar_tls.as_ref(),
            Some(&previous),
        )?;
        let generation = snap.generation;
        self.shared.snapshot.store(Arc::new(snap));
        self.shared.config_changed.send_replace(generation);
        self.shared.nudge_workers();
        info!(version, "configuration applied");
        Ok(())
    }

    /// Reload certificate files that changed.
    pub fn reload_certs(&self) {
        self.shared.reload_certs();
    }

    /// Recent failures.
    pub fn events(&self) -> Vec<crate::telemetry::events::Event> {
        self.shared.events.list()
    }

    /// Whether the proxy is draining (the control client stops then).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(SeqCst)
    }

    /// Record whether the control daemon is reachable; returns the previous state. Losing it is a
    /// failure with reason `ctl_unreachable` (counted, and at `/events` with `detail`).
    pub fn set_ctl_unreachable(&self, unreachable: bool, detail: &str) -> bool {
        let was = self.shared.ctl_unreachable.swap(unreachable, SeqCst);
        if unreachable && !was {
            let r = crate::Reason::CtlUnreachable;
            self.shared.stats.http.fail(r);
            self.shared.events.push(
                r,
                "this proxy".into(),
                "ringctl daemon".into(),
                detail.to_string(),
            );
        }
        was
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct Proxy {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
    local_addrs: Vec<SocketAddr>,
    listener_fds: Vec<RawFd>,
    driver: DriverKind,
}

/// One service's endpoints as seen now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ClusterStatus {
    /// Service name.
    pub service: String,
    /// Its endpoints, in config order.
    pub endpoints: Vec<EndpointStatus>,
}

/// One endpoint as seen now.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EndpointStatus {
    /// Address.
    pub addr: SocketAddr,
    /// Connections open to it.
    pub active: u32,
    /// Consecutive failed connects.
    pub consecutive_failures: u32,
    /// Ejected by passive health now.
    pub ejected: bool,
    /// Its ejection ended and no request has succeeded since (one trial at a time).
    pub half_open: bool,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open at the deadline and closed by force.
    pub forced: u64,
    /// How long the drain took.
    pub elapsed: Duration,
}

/// The driver that `Auto` resolves to on this kernel.
pub fn resolve_driver(requested: DriverKind) -> anyhow::Result<DriverKind> {
    let uring = monoio::utils::detect_uring();
    match requested {
        DriverKind::Uring if !uring => {
            bail!("io_uring was requested (--driver uring) but this kernel does not allow it")
        }
        DriverKind::Uring | DriverKind::Epoll => Ok(requested),
        DriverKind::Auto if uring => Ok(DriverKind::Uring),
        DriverKind::Auto => {
            warn!(
                "io_uring is not available on this kernel (or is disabled); using the epoll driver"
            );
            Ok(DriverKind::Epoll)
        }
    }
}

impl Proxy {
    /// Bind every listener (one `SO_REUSEPORT` socket per worker) and start the workers.
    /// Binding happens here, so a port in use is an error before any thread starts.
    pub fn start(config: Config) -> anyhow::Result<Proxy> {
        Proxy::start_with(config, None)
    }

    /// Start with services and intentions (besides the file's) already known, e.g. from the
    /// control daemon: the proxy is ready only once they are in force.
    pub fn start_with(
        config: Config,
        initial: Option<(
            u64,
            Vec<Service>,
            Intentions,
            crate::policy::rules::L7Config,
        )>,
    ) -> anyhow::Result<Proxy> {
        let driver = resolve_driver(config.proxy.driver)?;
        match crate::io::sys::raise_nofile_limit() {
            Ok(n) if (n as usize) < config.proxy.max_connections * 2 + 64 => warn!(
                open_files = n,
                max_connections = config.proxy.max_connections,
                "the open-file limit is below two descriptors per allowed connection; accepts will back off at the limit"
            ),
            Ok(_) => {}
            Err(e) => warn!(error = %e, "cannot raise the open-file limit"),
        }
        check_pipe_size(config.proxy.pipe_size);

        let workers = config.proxy.workers;
        let mut per_worker: Vec<Vec<(usize, std::net::TcpListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        let mut local_addrs = Vec::new();
        let mut listener_fds = Vec::new();
        for (index, l) in config.listeners.iter().enumerate() {
            let mut addr = l.address;
            for slot in per_worker.iter_mut() {
                let sock = bind_reuseport(addr).map_err(|e| {
                    let holder = if e.kind() == std::io::ErrorKind::AddrInUse {
                        crate::io::listening::who_holds(addr)
                            .map(|h| format!(" ({h})"))
                            .unwrap_or_default()
                    } else {
                        String::new()
                    };
                    anyhow::anyhow!(
                        "cannot listen on {addr} (listener '{}'): {e}{holder}",
                        l.name
                    )
                })?;
                // Port 0: every later worker binds the port the first one got.
                addr = sock.local_addr()?;
                listener_fds.push(sock.as_raw_fd());
                slot.push((index, sock));
            }
            local_addrs.push(addr);
        }

        let mut tls = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            tls.push(match &l.tls {
                None => None,
                Some(t) => {
                    let role = match t.mode {
                        crate::config::TlsMode::Origin => crate::tls::TlsRole::Origin {
                            expect: t
                                .expect_id
                                .clone()
                                .map_or(crate::tls::Expect::Any, crate::tls::Expect::Exact),
                            resumption: t.resumption,
                        },
                        crate::config::TlsMode::Terminate => crate::tls::TlsRole::Terminate {
                            authorizer: Arc::new(crate::tls::AllowList(t.allow_ids.clone())),
                        },
                    };
                    let mesh = crate::tls::MeshTls::load(t.files.clone(), role)
                        .with_context(|| format!("listener '{}': cannot load its TLS material", l.name))?;
                    info!(
                        listener = %l.name,
                        identity = mesh.current().material.id.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                        expires_in_s = mesh.expires_in_secs(),
                        "mesh TLS material loaded"
                    );
                    Some(mesh)
                }
            });
        }
        let sidecar_tls = match config.sidecar.as_ref().and_then(|s| s.mtls.as_ref()) {
            None => None,
            Some(m) => Some(crate::tls::sidecar::SidecarTls::load(m).context("sidecar mTLS")?),
        };
        let (version, pushed, intentions, l7) = initial
            .unwrap_or_else(|| (0, Vec::new(), config.intentions.clone(), Default::default()));
        let snapshot = ConfigSnapshot::build(
            version,
            config.services.iter().cloned().chain(pushed).collect(),
            intentions,
            l7,
            config.sidecar.as_ref().is_some_and(|s| s.registry_only),
            sidecar_tls.as_ref(),
            None,
        )?;
        let access_log = match &config.proxy.access_log {
            Some(p) => Some(
                crate::telemetry::access_log::AccessLog::open(p)
                    .with_context(|| format!("cannot open the access log {}", p.display()))?,
            ),
            None => None,
        };
        let own = crate::decide::plan::OwnAddrs {
            ports: local_addrs
                .iter()
                .map(|a| a.port())
                .chain(config.proxy.admin.map(|a| a.port()))
                .chain(config.proxy.health.map(|a| a.port()))
                .chain(config.proxy.metrics.map(|a| a.port()))
                .collect(),
            ips: crate::io::sys::local_ips(),
        };
        let shared = Arc::new(Shared {
            tls,
            sidecar_tls,
            snapshot: arc_swap::ArcSwap::from_pointee(snapshot),
            stats: StatsRegistry::new(workers),
            config,
            active: AtomicUsize::new(0),
            active_inbound: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            ctl_unreachable: AtomicBool::new(false),
            l7: std::sync::OnceLock::new(),
            events: Default::default(),
            access_log,
            force_close: AtomicBool::new(false),
            own: arc_swap::ArcSwap::from_pointee(own),
            own_read_at: std::sync::Mutex::new(Instant::now()),
            config_changed: tokio::sync::watch::Sender::new(0),
            nudges: std::sync::Mutex::new(Vec::new()),
            on_failure: std::sync::Mutex::new(None),
        });
        // Sidecars hand HTTP over (declared, or detected on undeclared services).
        let wants_l7 = shared.config.listeners.iter().any(|l| l.protocol.is_http())
            || shared.config.sidecar.is_some();
        if wants_l7 {
            let l7 = crate::l7::L7::start(&shared, shared.config.proxy.l7_threads)
                .context("cannot start the L7 (HTTP) path")?;
            let _ = shared.l7.set(l7);
        }
        let mut threads = Vec::with_capacity(workers);
        for (id, listeners) in per_worker.into_iter().enumerate() {
            let shared = shared.clone();
            let t = std::thread::Builder::new()
                .name(format!("ringside-w{id}"))
                .spawn(move || {
                    if let Err(e) =
                        worker::run(id, shared.clone(), listeners, driver, crate::conn::serve)
                    {
                        tracing::error!(worker = id, error = %e, "worker failed");
                        // A worker that cannot run must not leave a half-working proxy behind.
                        shared.begin_drain();
                        let on_failure =
                            shared.on_failure.lock().unwrap_or_else(|e| e.into_inner());
                        if let Some(FailureHook(tell)) = on_failure.as_ref() {
                            tell();
                        }
                    }
                })
                .context("cannot start a worker thread")?;
            threads.push(t);
        }
        if let Some(path) = &shared.config.proxy.ready_file {
            // Listeners are bound and listening (connections queue in their backlogs until the
            // workers take them), and the config is loaded: ready.
            if let Some(dir) = path.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::write(path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write the ready file {}", path.display()))?;
        }
        if shared.tls.iter().any(Option::is_some) || shared.sidecar_tls.is_some() {
            // Certificate files are watched; a change is loaded for new handshakes (and one made
            // before the watcher starts is read by its first look). Started last, so that no
            // failure to start leaves it behind. Every mesh config is built from the sidecar's
            // one set of files, so the set watched is fixed; the thread is nudged with the
            // workers to see a drain.
            let files: Vec<std::path::PathBuf> = shared
                .tls
                .iter()
                .flatten()
                .map(|m| m.files())
                .chain(shared.sidecar_tls.as_ref().map(|s| &s.files))
                .flat_map(|f| [f.cert.clone(), f.key.clone(), f.ca.clone()])
                .collect();
            let (nudge_rx, nudge_tx) = std::os::unix::net::UnixStream::pair()
                .context("cannot start the certificate watcher")?;
            nudge_rx.set_nonblocking(true)?;
            shared
                .nudges
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(nudge_tx);
            let shared = shared.clone();
            std::thread::Builder::new()
                .name("ringside-certs".into())
                .spawn(move || {
                    crate::io::cert_watch::run(
                        &files,
                        &nudge_rx,
                        || shared.reload_certs(),
                        || shared.draining.load(SeqCst),
                        true,
                    )
                })
                .context("cannot start the certificate watcher")?;
        }
        info!(
            workers,
            driver = ?driver,
            listeners = ?local_addrs,
            copy_mode = ?shared.config.proxy.copy_mode,
            tls_crypto = crate::tls::provider::NAME,
            "ringside started"
        );
        Ok(Proxy {
            shared,
            threads,
            local_addrs,
            listener_fds,
            driver,
        })
    }

    /// The bound address of each listener, in config order (resolves port 0).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// The driver the workers run on.
    pub fn driver(&self) -> DriverKind {
        self.driver
    }

    /// A handle on the counters that outlives the proxy (for a last report after shutdown).
    pub fn stats_registry(&self) -> StatsRegistry {
        self.shared.stats.clone()
    }

    /// Counters summed over all workers.
    pub fn stats(&self) -> Snapshot {
        self.shared.stats.snapshot()
    }

    /// A handle that applies configuration updates (for the control client's thread).
    pub fn updater(&self) -> Updater {
        Updater {
            shared: self.shared.clone(),
        }
    }

    /// Apply a configuration update (see [`Updater::update`]).
    pub fn update(
        &self,
        version: u64,
        services: Vec<Service>,
        intentions: Intentions,
        l7: crate::policy::rules::L7Config,
    ) -> anyhow::Result<()> {
        self.updater().update(version, services, intentions, l7)
    }

    /// Whether the control daemon is unreachable now.
    pub fn ctl_unreachable(&self) -> bool {
        self.shared.ctl_unreachable.load(SeqCst)
    }

    /// The configuration in force now.
    pub fn snapshot(&self) -> Arc<ConfigSnapshot> {
        self.shared.snapshot.load_full()
    }

    /// Reload certificate files that changed (also done by the watcher thread when they change).
    pub fn reload_certs(&self) {
        self.shared.reload_certs();
    }

    /// Endpoint states of every service (what `/clusters` shows).
    pub fn clusters(&self) -> Vec<ClusterStatus> {
        cluster_status(&self.shared)
    }

    /// Seconds until each certificate in use expires: (listener name or `sidecar`, seconds).
    pub fn cert_expiry(&self) -> Vec<(String, i64)> {
        cert_expiry(&self.shared)
    }

    /// Start the admin and health servers; returns their bound addresses.
    pub fn start_admin(&self, opts: crate::admin::AdminOptions) -> anyhow::Result<Vec<SocketAddr>> {
        crate::admin::start(&self.shared, opts)
    }

    /// Recent failures (what `/events` shows).
    pub fn events(&self) -> Vec<crate::telemetry::events::Event> {
        self.shared.events.list()
    }

    /// Reopen the access log (after log rotation moved it away; SIGHUP in the binary).
    pub fn reopen_access_log(&self) {
        if let Some(log) = &self.shared.access_log {
            log.reopen();
        }
    }

    /// The running configuration.
    pub fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Call `tell` when a worker fails (the proxy then drains, see [`Proxy::is_draining`]). A
    /// worker that failed before this was called is seen by `is_draining` only.
    pub fn on_worker_failure(&self, tell: impl Fn() + Send + 'static) {
        *self
            .shared
            .on_failure
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(FailureHook(Box::new(tell)));
    }

    /// Whether a drain has begun (or a worker failed).
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(SeqCst)
    }

    /// Stop accepting and let connections finish for up to `deadline`, then close the rest.
    pub fn shutdown(self, deadline: Duration) -> DrainReport {
        let start = Instant::now();
        if let Some(path) = &self.shared.config.proxy.ready_file {
            let _ = std::fs::remove_file(path);
        }
        self.shared.begin_drain();
        if let Some(l7) = self.shared.l7.get() {
            l7.drain();
        }
        for &fd in &self.listener_fds {
            crate::io::sys::shutdown_listener(fd);
        }
        let forced_before = self
            .shared
            .stats
            .snapshot()
            .failures_for(crate::Reason::DrainTimeout);
        while !self.threads.iter().all(|t| t.is_finished()) {
            if start.elapsed() >= deadline && !self.shared.force_close.load(SeqCst) {
                warn!(
                    open = self.shared.active.load(SeqCst),
                    "drain deadline reached; closing the remaining connections"
                );
                self.shared.force_close.store(true, SeqCst);
                self.shared.nudge_workers();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for t in self.threads {
            let _ = t.join();
        }
        if let Some(l7) = self.shared.l7.get() {
            // HTTP connections get what is left of the deadline, then are closed.
            while self.shared.active.load(SeqCst) > 0 && start.elapsed() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            l7.shutdown();
        }
        let forced = self
            .shared
            .stats
            .snapshot()
            .failures_for(crate::Reason::DrainTimeout)
            - forced_before;
        if let Some(log) = &self.shared.access_log {
            log.flush(Duration::from_secs(2));
        }
        DrainReport {
            forced,
            elapsed: start.elapsed(),
        }
    }
}

fn bind_reuseport(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

fn check_pipe_size(wanted: usize) {
    if let Ok(Some(max)) = ringside_kernel_setup::sysctl::read_u64("fs.pipe-max-size") {
        if wanted as u64 > max {
            warn!(
                pipe_size = wanted,
                pipe_max_size = max,
                "pipe_size is above fs.pipe-max-size; pipes keep the kernel default size"
            );
        }
    }
}
