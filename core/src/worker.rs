//! A fast-path worker: one thread, one monoio runtime (io_uring or epoll), pinned to a core, with
//! its own `SO_REUSEPORT` copy of every listener. A connection is accepted, given an upstream and
//! relayed, all on this thread; nothing on the path takes a lock.

use std::cell::Cell;
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};

use std::cell::RefCell;

use crate::config::{DriverKind, ListenerKind, TlsMode};
use crate::reason::Reason;
use crate::relay::{relay, Pools, RelayCtx};
use crate::route::{local_candidates, Route};
use crate::server::{ConfigSnapshot, Shared};
use crate::stats::WorkerStats;
use crate::sys;
use crate::tls::MeshTls;
use crate::tls_relay::handshake;
use crate::upstream::{ActiveGuard, Cluster};

/// How often a worker looks at the drain flags.
const DRAIN_POLL: Duration = Duration::from_millis(50);
/// Back-off after accept() failed for lack of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Idle pipes and buffers a worker keeps for reuse. Pipes beyond it are closed when returned: the
/// kernel charges pipe capacity to the proxy's user (fs.pipe-user-pages-soft, 64 MiB by default),
/// so 2 workers x 64 pipes x 256 KiB stay within it.
const POOL_IDLE: usize = 64;

/// State of one worker, shared by its tasks (single-threaded, hence `Rc` and `Cell`).
pub(crate) struct Worker {
    pub(crate) id: usize,
    pub(crate) shared: Arc<Shared>,
    pub(crate) pools: Pools,
    /// Connections this worker is relaying now.
    active: Cell<usize>,
    /// Sequence for connection ids.
    next_id: Cell<u64>,
}

impl Worker {
    pub(crate) fn stats(&self) -> &WorkerStats {
        self.shared.stats.worker(self.id)
    }
}

/// Run worker `id` on the calling thread until the proxy drains.
pub(crate) fn run(
    id: usize,
    shared: Arc<Shared>,
    listeners: Vec<(usize, std::net::TcpListener)>,
    driver: DriverKind,
) -> io::Result<()> {
    let settings = &shared.config.proxy;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    // Pin only when the workers cover every core. A sidecar with fewer workers than cores shares
    // the node with other sidecars: pinning every pod's worker 0 to core 0 would stack them all on
    // one core (measured: two 1-worker sidecars on one core doubled the pod-to-pod RTT).
    if settings.pin_workers && settings.workers == cores {
        if let Err(e) = monoio::utils::bind_to_cpu_set([id % cores]) {
            debug!(worker = id, error = ?e, "cannot pin worker to a core");
        }
    }
    let pools = Pools::new(settings.pipe_size, settings.buffer_size, POOL_IDLE);
    let main = async move {
        let w = Rc::new(Worker {
            id,
            shared,
            pools,
            active: Cell::new(0),
            next_id: Cell::new(0),
        });
        for (index, std_listener) in listeners {
            let listener = TcpListener::from_std(std_listener)?;
            monoio::spawn(accept_loop(w.clone(), listener, index));
        }
        // Wait for a drain to begin and finish (or be cut short at its deadline).
        loop {
            monoio::time::sleep(DRAIN_POLL).await;
            if !w.shared.draining.load(Relaxed) {
                continue;
            }
            if w.active.get() == 0 {
                break;
            }
            if w.shared.force_close.load(Relaxed) {
                let left = w.active.get() as u64;
                w.stats().failures[Reason::DrainTimeout.index()].add(left);
                w.stats().downstream_cx_closed.add(left);
                w.shared.active.fetch_sub(left as usize, SeqCst);
                break;
            }
        }
        Ok::<(), io::Error>(())
    };
    match driver {
        DriverKind::Epoll => monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .block_on(main),
        DriverKind::Uring | DriverKind::Auto => {
            // COOP_TASKRUN: completions are handed over when the worker next enters the kernel
            // instead of interrupting it with an IPI; SINGLE_ISSUER: only this thread submits.
            // With 8 ping-pong connections through the proxy the difference was within this
            // machine's noise (46-58k round trips/s either way); kept because it removes IPIs.
            // Kernels before 6.0 refuse the flags; then the ring is built without them.
            let mut ring = io_uring::IoUring::builder();
            ring.setup_coop_taskrun().setup_single_issuer();
            let rt = match monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                .uring_builder(ring)
                .enable_timer()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    debug!(worker = id, error = %e, "io_uring without COOP_TASKRUN/SINGLE_ISSUER");
                    monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
                        .enable_timer()
                        .build()?
                }
            };
            let mut rt = rt;
            rt.block_on(main)
        }
    }
}

async fn accept_loop(w: Rc<Worker>, listener: TcpListener, index: usize) {
    let mut last_warn: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(_) if w.shared.draining.load(Relaxed) => return,
            Err(e) => {
                match e.raw_os_error() {
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
                        // Out of descriptors: the pending connection stays in the backlog; retry
                        // after a pause instead of spinning on the same error.
                        w.stats().downstream_cx_accept_fd_exhausted.inc();
                        if last_warn.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                            warn!(worker = w.id, error = %e, "accept failed: out of file descriptors or memory; backing off");
                            last_warn = Some(Instant::now());
                        }
                        monoio::time::sleep(ACCEPT_BACKOFF).await;
                    }
                    Some(libc::ECONNABORTED | libc::EINTR | libc::EAGAIN | libc::EPROTO) => {}
                    _ => {
                        warn!(worker = w.id, error = %e, "accept failed");
                        monoio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                continue;
            }
        };
        let shared = &w.shared;
        if shared.active.fetch_add(1, SeqCst) >= shared.config.proxy.max_connections {
            shared.active.fetch_sub(1, SeqCst);
            w.stats().fail(Reason::Overloaded);
            debug!(client = %peer, reason = Reason::Overloaded.as_str(), "connection refused");
            drop(stream);
            continue;
        }
        w.stats().downstream_cx_total.inc();
        w.active.set(w.active.get() + 1);
        let id = ((w.id as u64) << 48) | w.next_id.replace(w.next_id.get() + 1);
        let listener_cfg = &shared.config.listeners[index];
        let span = tracing::debug_span!("conn", id, client = %peer, listener = %listener_cfg.name);
        monoio::spawn(handle(w.clone(), stream, peer, index).instrument(span));
    }
}

async fn handle(w: Rc<Worker>, client: TcpStream, peer: SocketAddr, listener: usize) {
    // The configuration this connection lives with, whatever updates arrive meanwhile.
    let snap = w.shared.snapshot.load_full();
    let l = &w.shared.config.listeners[listener];
    if let (true, ListenerKind::Static(service)) = (l.protocol.is_http(), l.kind) {
        let tunnel = match (&l.tls, &w.shared.tls[listener]) {
            (Some(lt), Some(mesh)) => {
                let built = mesh.current();
                match lt.mode {
                    TlsMode::Origin => {
                        built
                            .client_http
                            .clone()
                            .map(|cfg| crate::l7::TunnelTls::Origin {
                                cfg,
                                name: lt
                                    .expect_id
                                    .as_ref()
                                    .map_or("ringside-mesh".into(), |i| i.service.as_str().into()),
                            })
                    }
                    TlsMode::Terminate => built
                        .server
                        .clone()
                        .map(|cfg| crate::l7::TunnelTls::Terminate { cfg }),
                }
            }
            _ => None,
        };
        handoff_l7(&w, client, peer, snap, service, false, None, tunnel);
        return;
    }
    if matches!(l.kind, ListenerKind::Outbound | ListenerKind::Inbound)
        && w.shared.l7.get().is_some()
    {
        match Box::pin(l7_decision(&w, &snap, &client, listener)).await {
            L7Decision::Stay => {}
            L7Decision::Closed => {
                drop(client);
                finish(&w);
                return;
            }
            L7Decision::Outbound { service, mesh } => {
                handoff_l7(&w, client, peer, snap, service, mesh, None, None);
                return;
            }
            L7Decision::Inbound { service, inbound } => {
                handoff_l7(&w, client, peer, snap, service, false, Some(inbound), None);
                return;
            }
        }
    }
    if w.shared.sidecar_tls.is_some() {
        if let Some(route) = crate::mesh::wants_mesh(&w, &snap, &client, listener) {
            // Boxed: TLS state is large and only mesh connections need it.
            Box::pin(crate::mesh::handle(
                &w, &snap, &client, peer, listener, route,
            ))
            .await;
            drop(client);
            finish(&w);
            return;
        }
    }
    if let Some(mesh) = w.shared.tls[listener].clone() {
        // Boxed: TLS state is large and only TLS listeners need it.
        Box::pin(handle_tls(&w, &snap, &client, peer, listener, mesh)).await;
        drop(client);
        finish(&w);
        return;
    }
    let start = Instant::now();
    let cfd = client.as_raw_fd();
    let outcome = match sys::set_nonblocking(cfd) {
        Err(e) => {
            debug!(error = %e, "cannot set the client socket non-blocking");
            Err(Failure::from(Reason::DownstreamReset))
        }
        // Boxed: connecting is short, and inline its state would size the task for the
        // connection's whole life.
        Ok(()) => Box::pin(connect_route(&w, &snap, cfd, listener)).await,
    };
    match outcome {
        Err(f) => {
            w.stats().fail(f.reason);
            warn!(
                reason = f.reason.as_str(),
                client = %peer,
                destination = %f.destination,
                hint = f.hint.as_deref().unwrap_or(f.reason.hint()),
                "connection failed"
            );
            w.shared.events.push(
                f.reason,
                peer.to_string(),
                f.destination.clone(),
                f.hint
                    .clone()
                    .unwrap_or_else(|| f.reason.hint().to_string()),
            );
            if let Some(log) = &w.shared.access_log {
                log.write(serde_json::json!({
                    "kind": "tcp", "client": peer.to_string(), "destination": f.destination,
                    "reason": f.reason.as_str(), "duration_ms": start.elapsed().as_millis() as u64,
                }));
            }
            sys::close_after_failure(cfd, f.reason);
        }
        Ok(up) => {
            sys::set_nodelay(cfd);
            let ctx = RelayCtx {
                pools: &w.pools,
                stats: w.stats(),
                mode: w.shared.config.proxy.copy_mode,
                idle_timeout: w.shared.config.proxy.idle_timeout,
            };
            let end = relay(ctx, &client, &up.stream).await;
            if let Some(reason) = end.reason {
                w.stats().fail(reason);
            }
            debug!(
                upstream = %up.addr,
                up_bytes = end.up_bytes,
                down_bytes = end.down_bytes,
                duration_ms = start.elapsed().as_millis() as u64,
                close = end.reason.map_or("eof", |r| r.as_str()),
                "connection closed"
            );
            if let Some(log) = &w.shared.access_log {
                log.write(serde_json::json!({
                    "kind": "tcp", "client": peer.to_string(), "upstream": up.addr.to_string(),
                    "bytes_up": end.up_bytes, "bytes_down": end.down_bytes,
                    "duration_ms": start.elapsed().as_millis() as u64,
                    "reason": end.reason.map(|r| r.as_str()),
                }));
            }
            drop(up);
        }
    }
    drop(client);
    finish(&w);
}

/// How long an undeclared outbound connection may stay silent before it is taken as TCP.
const DETECT_HTTP: Duration = Duration::from_millis(100);
/// How long an inbound mesh connection may take to send its ClientHello.
const DETECT_HELLO: Duration = Duration::from_secs(5);

enum L7Decision {
    /// The fast path keeps it.
    Stay,
    /// The client went away while being looked at.
    Closed,
    /// HTTP to a mesh service: the L7 path, mTLS to the destination's sidecar when `mesh`.
    Outbound { service: usize, mesh: bool },
    /// Mesh TLS offering `ringside/http` to a local service: the L7 path terminates it.
    Inbound {
        service: usize,
        inbound: crate::l7::Inbound,
    },
}

/// Whether a sidecar connection goes to the L7 path: outbound to a service declared HTTP (or
/// undeclared and speaking HTTP), inbound mesh TLS whose ClientHello offers `ringside/http`.
async fn l7_decision(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    listener: usize,
) -> L7Decision {
    use crate::config::{Protocol, ServiceMtls};
    use crate::sniff::{sniff_http, Sniffed};
    let kind = w.shared.config.listeners[listener].kind;
    let Ok(route) = decide_route(w, snap, client.as_raw_fd(), listener) else {
        return L7Decision::Stay;
    };
    match (kind, route) {
        (ListenerKind::Outbound, Route::Cluster(i)) => {
            let svc = &snap.services[i];
            let http = match svc.protocol {
                p if p.is_http() => true,
                Protocol::Auto => match sniff_http(client, DETECT_HTTP).await {
                    Sniffed::Http => true,
                    Sniffed::Other => false,
                    Sniffed::Timeout => {
                        w.stats().protocol_detect_timeout.inc();
                        false
                    }
                    Sniffed::Closed => return L7Decision::Closed,
                },
                _ => false,
            };
            if !http {
                return L7Decision::Stay;
            }
            L7Decision::Outbound {
                service: i,
                mesh: w.shared.sidecar_tls.is_some() && svc.mtls == ServiceMtls::Enable,
            }
        }
        (
            ListenerKind::Inbound,
            Route::Local {
                service: Some(i),
                port,
                pod_ip,
            },
        ) => {
            let Some(mesh) = snap.inbound_tls[i].as_ref() else {
                return L7Decision::Stay;
            };
            if snap.services[i].protocol == Protocol::Tcp {
                return L7Decision::Stay;
            }
            // Wait for the ClientHello (it may come in more than one segment).
            let deadline = Instant::now() + DETECT_HELLO;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match monoio::time::timeout(left, client.readable(false)).await {
                    Ok(Ok(())) => {}
                    _ => return L7Decision::Stay,
                }
                let mut b = [0u8; 1];
                match sys::peek(client.as_raw_fd(), &mut b) {
                    Ok(1) if b[0] == 0x16 => {}
                    Ok(0) => return L7Decision::Closed,
                    _ => return L7Decision::Stay,
                }
                match crate::sniff::offered_alpn(client) {
                    Some(alpn) if alpn.iter().any(|p| p == crate::tls::ALPN_HTTP) => {
                        let Some(tls) = mesh.current().server.clone() else {
                            return L7Decision::Stay;
                        };
                        return L7Decision::Inbound {
                            service: i,
                            inbound: crate::l7::Inbound { tls, port, pod_ip },
                        };
                    }
                    Some(_) => return L7Decision::Stay,
                    None if left.is_zero() => return L7Decision::Stay,
                    None => monoio::time::sleep(Duration::from_millis(2)).await,
                }
            }
        }
        _ => L7Decision::Stay,
    }
}

/// Give an HTTP connection to the L7 path; it leaves this worker (the proxy's open-connection
/// count keeps it until the L7 path closes it).
#[allow(clippy::too_many_arguments)]
fn handoff_l7(
    w: &Worker,
    client: TcpStream,
    peer: SocketAddr,
    snap: Arc<ConfigSnapshot>,
    service: usize,
    mesh_out: bool,
    inbound: Option<crate::l7::Inbound>,
    tunnel: Option<crate::l7::TunnelTls>,
) {
    w.stats().downstream_cx_closed.inc();
    w.active.set(w.active.get() - 1);
    let Some(l7) = w.shared.l7.get() else {
        w.stats().fail(Reason::Overloaded);
        w.shared.active.fetch_sub(1, SeqCst);
        return;
    };
    let h = crate::l7::Handoff {
        stream: sys::into_std(client),
        peer,
        snap,
        service,
        mesh_out,
        inbound,
        tunnel,
    };
    if l7.handoff(h).is_err() {
        w.shared.active.fetch_sub(1, SeqCst);
    }
}

/// Count a connection's end.
pub(crate) fn finish(w: &Worker) {
    w.stats().downstream_cx_closed.inc();
    w.active.set(w.active.get() - 1);
    w.shared.active.fetch_sub(1, SeqCst);
}

/// A connection on a mesh-TLS listener: terminate (handshake with the client, then connect) or
/// originate (connect, then handshake with the upstream), then relay plaintext <-> TLS.
async fn handle_tls(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    peer: SocketAddr,
    listener: usize,
    mesh: Arc<MeshTls>,
) {
    let start = Instant::now();
    let cfd = client.as_raw_fd();
    let lt = w.shared.config.listeners[listener]
        .tls
        .as_ref()
        .expect("a TLS listener has TLS settings");
    let built = mesh.current();
    let ctx = RelayCtx {
        pools: &w.pools,
        stats: w.stats(),
        mode: w.shared.config.proxy.copy_mode,
        idle_timeout: w.shared.config.proxy.idle_timeout,
    };
    let result: Result<
        (crate::tls_relay::TlsRelayEnd, SocketAddr, Option<String>),
        (Reason, String),
    > = async {
        sys::set_nonblocking(cfd).map_err(|e| (Reason::DownstreamReset, e.to_string()))?;
        match lt.mode {
            TlsMode::Terminate => {
                let cfg = built
                    .server
                    .clone()
                    .expect("terminate builds a server config");
                let conn = rustls::ServerConnection::new(cfg)
                    .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))?;
                let conn = RefCell::new(rustls::Connection::Server(conn));
                handshake(&conn, client)
                    .await
                    .map_err(|f| (f.reason(false), f.to_string()))?;
                let peer_id = conn
                    .borrow()
                    .peer_certificates()
                    .and_then(|c| c.first().and_then(|c| crate::tls::spiffe_of(c)));
                let up = connect_route(w, snap, cfd, listener).await.map_err(|f| {
                    (
                        f.reason,
                        f.hint.unwrap_or_else(|| f.reason.hint().to_string()),
                    )
                })?;
                sys::set_nodelay(cfd);
                let end = crate::tls_relay::relay(&ctx, &up.stream, client, &conn, false).await;
                Ok((end, up.addr, peer_id.map(|i| i.to_string())))
            }
            TlsMode::Origin => {
                let up = connect_route(w, snap, cfd, listener).await.map_err(|f| {
                    (
                        f.reason,
                        f.hint.unwrap_or_else(|| f.reason.hint().to_string()),
                    )
                })?;
                let name = lt
                    .expect_id
                    .as_ref()
                    .and_then(|i| rustls::pki_types::ServerName::try_from(i.service.clone()).ok())
                    .unwrap_or_else(|| {
                        rustls::pki_types::ServerName::try_from("ringside-mesh")
                            .expect("a valid DNS name")
                    });
                let cfg = built.client.clone().expect("origin builds a client config");
                let conn = rustls::ClientConnection::new(cfg, name)
                    .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))?;
                let conn = RefCell::new(rustls::Connection::Client(conn));
                handshake(&conn, &up.stream)
                    .await
                    .map_err(|f| (f.reason(true), f.to_string()))?;
                let peer_id = conn
                    .borrow()
                    .peer_certificates()
                    .and_then(|c| c.first().and_then(|c| crate::tls::spiffe_of(c)));
                sys::set_nodelay(cfd);
                let end = crate::tls_relay::relay(&ctx, client, &up.stream, &conn, true).await;
                Ok((end, up.addr, peer_id.map(|i| i.to_string())))
            }
        }
    }
    .await;
    match result {
        Err((reason, detail)) => {
            w.stats().fail(reason);
            warn!(
                reason = reason.as_str(),
                client = %peer,
                detail = %detail,
                hint = reason.hint(),
                "connection failed"
            );
            w.shared.events.push(
                reason,
                peer.to_string(),
                w.shared.config.listeners[listener].name.clone(),
                detail.clone(),
            );
            sys::close_after_failure(cfd, reason);
        }
        Ok((end, upstream, peer_id)) => {
            if let Some((reason, err)) = &end.failure {
                w.stats().fail(*reason);
                if err.is_some() {
                    warn!(
                        reason = reason.as_str(),
                        client = %peer,
                        detail = %err.as_ref().map(|e| e.to_string()).unwrap_or_default(),
                        hint = reason.hint(),
                        "connection failed"
                    );
                }
            }
            debug!(
                upstream = %upstream,
                peer_id = peer_id.as_deref().unwrap_or(""),
                sealed = end.sealed,
                opened = end.opened,
                duration_ms = start.elapsed().as_millis() as u64,
                close = end.failure.as_ref().map_or("eof", |(r, _)| r.as_str()),
                "connection closed"
            );
        }
    }
}

/// An upstream connection ready to relay.
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    pub(crate) addr: SocketAddr,
    /// Counts the connection on its endpoint (cluster routes only).
    _guard: Option<ActiveGuard>,
}

/// Why no upstream connection could be made.
pub(crate) struct Failure {
    pub(crate) reason: Reason,
    /// Where the connection was headed (service name or address), for the log.
    pub(crate) destination: String,
    /// A hint specific to this failure (else the reason's generic one).
    pub(crate) hint: Option<String>,
}

impl From<Reason> for Failure {
    fn from(reason: Reason) -> Self {
        Failure {
            reason,
            destination: String::new(),
            hint: None,
        }
    }
}

/// Decide where the connection goes (static service, or original destination for the sidecar
/// listeners) and connect there.
pub(crate) async fn connect_route(
    w: &Worker,
    snap: &ConfigSnapshot,
    cfd: std::os::fd::RawFd,
    listener: usize,
) -> Result<Upstream, Failure> {
    let route = decide_route(w, snap, cfd, listener)?;
    connect_to(w, snap, route).await
}

/// Where the connection goes: the listener's service, or the route of its original destination.
pub(crate) fn decide_route(
    w: &Worker,
    snap: &ConfigSnapshot,
    cfd: std::os::fd::RawFd,
    listener: usize,
) -> Result<Route, Failure> {
    let shared = &w.shared;
    let l = &shared.config.listeners[listener];
    let route = match l.kind {
        ListenerKind::Static(i) => Route::Cluster(i),
        ListenerKind::Outbound | ListenerKind::Inbound => match sys::original_dst(cfd, l.address.is_ipv6()) {
            Err(e) => {
                return Err(Failure {
                    reason: Reason::UnknownDestination,
                    destination: l.address.to_string(),
                    hint: Some(format!(
                        "the connection reached {} without being redirected (no original destination: {e}); connect to the service, not to the proxy port",
                        l.address
                    )),
                })
            }
            Ok(orig) if l.kind == ListenerKind::Outbound => snap.routes.outbound(orig),
            Ok(orig) => snap.routes.inbound(orig, |i| {
                let s = &snap.services[i];
                s.target_port.or(s.port).unwrap_or(orig.port())
            }),
        },
    };
    Ok(route)
}

/// Connect where the route says.
pub(crate) async fn connect_to(
    w: &Worker,
    snap: &ConfigSnapshot,
    route: Route,
) -> Result<Upstream, Failure> {
    match route {
        Route::Cluster(i) => {
            let cluster = &snap.clusters[i];
            connect_upstream(w, cluster)
                .await
                .map_err(|reason| Failure {
                    reason,
                    destination: cluster.service.name.clone(),
                    hint: None,
                })
        }
        Route::Passthrough(addr) => {
            let stats = w.stats();
            stats.upstream_cx_total.inc();
            match connect_one(addr, PASSTHROUGH_CONNECT_TIMEOUT).await {
                Ok(stream) => Ok(Upstream {
                    stream,
                    addr,
                    _guard: None,
                }),
                Err(reason) => {
                    stats.upstream_cx_connect_fail.inc();
                    if reason == Reason::UpstreamConnectTimeout {
                        stats.upstream_cx_connect_timeout.inc();
                    }
                    Err(Failure {
                        reason,
                        destination: addr.to_string(),
                        hint: None,
                    })
                }
            }
        }
        Route::Local {
            service,
            port,
            pod_ip,
        } => {
            let candidates = local_candidates(port, pod_ip);
            for (k, &addr) in candidates.iter().enumerate() {
                if let Ok(stream) = connect_one(addr, LOCAL_CONNECT_TIMEOUT).await {
                    w.stats().inbound_app_via[k.min(2)].inc();
                    debug!(app = %addr, "local app answered");
                    return Ok(Upstream {
                        stream,
                        addr,
                        _guard: None,
                    });
                }
            }
            let listening = crate::listening::listening();
            Err(Failure {
                reason: Reason::AppNotListening,
                destination: service
                    .map_or_else(|| format!("port {port}"), |i| snap.services[i].name.clone()),
                hint: Some(crate::listening::app_hint(port, &listening, &candidates)),
            })
        }
        Route::Refuse(reason) => Err(Failure {
            reason,
            destination: String::new(),
            hint: None,
        }),
    }
}

/// Passthrough destinations are not in the config, so they get a fixed connect timeout.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The local application answers (or refuses) at once; a long wait means it is stuck.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// One connect with a timeout, made ready for the relay (non-blocking, no Nagle).
async fn connect_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Reason> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(stream)) => {
            sys::set_nonblocking(stream.as_raw_fd()).map_err(|_| Reason::UpstreamReset)?;
            sys::set_nodelay(stream.as_raw_fd());
            Ok(stream)
        }
        Ok(Err(e)) => Err(classify_connect_error(&e)),
        Err(_) => Err(Reason::UpstreamConnectTimeout),
    }
}

/// Connect to an endpoint of `cluster`, trying others (bounded) when one refuses or times out.
async fn connect_upstream(w: &Worker, cluster: &Arc<Cluster>) -> Result<Upstream, Reason> {
    let stats = w.stats();
    let mut tried = 0u64;
    let mut last = Reason::NoHealthyEndpoint;
    for attempt in 0..cluster.max_attempts() {
        let Some(i) = cluster.pick(tried) else { break };
        if i < 64 {
            tried |= 1 << i;
        }
        let addr = cluster.endpoints[i].addr;
        stats.upstream_cx_total.inc();
        let reason = match connect_one(addr, cluster.service.connect_timeout).await {
            Ok(stream) => {
                cluster.report_success(i);
                return Ok(Upstream {
                    stream,
                    addr,
                    _guard: Some(cluster.open(i)),
                });
            }
            Err(reason) => {
                stats.upstream_cx_connect_fail.inc();
                if reason == Reason::UpstreamConnectTimeout {
                    stats.upstream_cx_connect_timeout.inc();
                }
                reason
            }
        };
        let ejected_for = cluster.report_failure(i);
        info!(
            endpoint = %addr,
            attempt = attempt + 1,
            reason = reason.as_str(),
            ejected_for_ms = ejected_for.as_millis() as u64,
            "upstream connect failed"
        );
        last = reason;
    }
    Err(last)
}

fn classify_connect_error(e: &io::Error) -> Reason {
    match e.kind() {
        ErrorKind::ConnectionRefused => Reason::UpstreamConnectRefused,
        ErrorKind::TimedOut => Reason::UpstreamConnectTimeout,
        ErrorKind::ConnectionReset => Reason::UpstreamReset,
        _ => Reason::UpstreamUnreachable,
    }
}

#[cfg(test)]
mod size_probe {
    #[test]
    fn future_sizes() {
        let mut rt = monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = monoio::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let a = monoio::net::TcpStream::connect_addr(l.local_addr().unwrap())
                .await
                .unwrap();
            let (b, _) = l.accept().await.unwrap();
            let pools = crate::relay::Pools::new(65536, 16384, 4);
            let stats = crate::stats::WorkerStats::default();
            let p2 = crate::relay::Pools::new(65536, 16384, 4);
            let ctx = crate::relay::RelayCtx {
                pools: &p2,
                stats: &stats,
                mode: crate::config::CopyMode::Adaptive,
                idle_timeout: None,
            };
            let f = crate::relay::relay(ctx, &a, &b);
            eprintln!("relay future: {} bytes", std::mem::size_of_val(&f));
            let config = crate::Config::forward(
                "127.0.0.1:0".parse().unwrap(),
                vec!["127.0.0.1:1".parse().unwrap()],
                Default::default(),
            )
            .unwrap();
            let shared = std::sync::Arc::new(crate::server::Shared {
                tls: vec![None],
                sidecar_tls: None,
                snapshot: arc_swap::ArcSwap::from_pointee(
                    crate::server::ConfigSnapshot::build(
                        0,
                        config.services.clone(),
                        config.intentions.clone(),
                        Default::default(),
                        false,
                        None,
                        None,
                    )
                    .unwrap(),
                ),
                config,
                stats: crate::stats::StatsRegistry::new(1),
                active: Default::default(),
                draining: Default::default(),
                ctl_unreachable: Default::default(),
                l7: Default::default(),
                events: Default::default(),
                access_log: None,
                force_close: Default::default(),
            });
            let w = std::rc::Rc::new(super::Worker {
                id: 0,
                shared,
                pools,
                active: Default::default(),
                next_id: Default::default(),
            });
            let c = monoio::net::TcpStream::connect_addr(l.local_addr().unwrap())
                .await
                .unwrap();
            let h = super::handle(w.clone(), c, "127.0.0.1:1".parse().unwrap(), 0);
            eprintln!("handle future: {} bytes", std::mem::size_of_val(&h));
            eprintln!(
                "TcpStream: {} bytes",
                std::mem::size_of::<monoio::net::TcpStream>()
            );
            eprintln!(
                "readable: {} bytes",
                std::mem::size_of_val(&a.readable(false))
            );
            eprintln!(
                "sleep: {} bytes",
                std::mem::size_of_val(&monoio::time::sleep(std::time::Duration::from_secs(1)))
            );
            eprintln!(
                "connect: {} bytes",
                std::mem::size_of_val(&monoio::net::TcpStream::connect_addr(
                    l.local_addr().unwrap()
                ))
            );
        });
    }
}
