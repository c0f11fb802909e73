//! The L7 path: HTTP connections handed over by the fast-path workers (the accepted socket, the
//! snapshot it was accepted under and the service it is for) through a crossbeam channel to a small
//! tokio runtime running hyper. Per request it picks an endpoint, forwards over a keep-alive pool,
//! retries (connect failures always, chosen statuses when asked) within the request timeout, sets
//! `x-forwarded-for` and `x-request-id`, and counts. When it fails a request itself it answers
//! 502/503/504 with `x-ringside-reason: <reason code>` and a one-line body saying what failed and
//! what to check.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::{Arc, Mutex, Weak};

use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Either, Full};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Request, Response, StatusCode};

use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::{debug, warn, Instrument};

pub(crate) mod pool;
pub(crate) mod rq_log;
pub use crate::policy::rules;
use rq_log::{Counted, Logged, RqLog};

use crate::config::Protocol;
use crate::reason::Reason;
use crate::server::{ConfigSnapshot, Shared};
use crate::telemetry::access_log::Line;
use crate::telemetry::stats::HttpStats;

/// How long a client may take to send a request's headers; also how long a kept-alive
/// connection may wait for its next request (hyper runs one timer for both).
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The largest request head (HTTP/1 read buffer, HTTP/2 header list) accepted.
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The identity header the proxy sets (Envoy's name, which apps already read).
const XFCC: &str = "x-forwarded-client-cert";

/// Replace the request's path with its normalized form (RFC 3986 dot segments, merged slashes,
/// unreserved characters decoded); an encoded `/` or `\` is refused.
fn normalize_target(parts: &mut hyper::http::request::Parts) -> Result<(), (Reason, String)> {
    if parts.method == hyper::Method::CONNECT {
        return Ok(());
    }
    let path = parts.uri.path();
    if crate::policy::path::is_normal(path) {
        return Ok(());
    }
    let norm = crate::policy::path::normalize(path)
        .map_err(|e| (Reason::BadRequest, format!("{} {path}: {e}", parts.method)))?;
    if norm != path {
        let pq = match parts.uri.query() {
            Some(q) => format!("{norm}?{q}"),
            None => norm,
        };
        let mut up = parts.uri.clone().into_parts();
        up.path_and_query = Some(
            pq.parse()
                .map_err(|e| (Reason::BadRequest, format!("normalized path {pq}: {e}")))?,
        );
        parts.uri = hyper::Uri::from_parts(up)
            .map_err(|e| (Reason::BadRequest, format!("normalized path {pq}: {e}")))?;
    }
    Ok(())
}

/// Request bodies up to this size are kept so that the request can be retried.
const REPLAY_LIMIT: u64 = 64 * 1024;

pub(crate) type ReqBody = Either<Full<Bytes>, Counted<Incoming>>;
/// What the L7 path answers with.
pub type RespBody = UnsyncBoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// A connection handed over by a fast-path worker.
#[derive(Debug)]
pub(crate) struct Handoff {
    /// The accepted socket.
    pub stream: std::net::TcpStream,
    /// The connection's id (its span's, and the access log's `conn_id`).
    pub id: u64,
    /// The address the client dialled (sidecar listeners).
    pub orig_dst: Option<SocketAddr>,
    /// This proxy's own identity on the listener that accepted it.
    pub own_id: Option<Arc<str>>,
    /// The client.
    pub peer: SocketAddr,
    /// The configuration the connection was accepted under.
    pub snap: Arc<ConfigSnapshot>,
    /// The service it is for (index into `snap.services`).
    pub service: usize,
    /// How it came in.
    pub entry: Entry,
}

/// How a connection came to the L7 path.
#[derive(Debug)]
pub enum Entry {
    /// From the pod's application; upstreams are sidecars reached with mesh mTLS when `mesh`.
    Outbound {
        /// Originate mesh mTLS.
        mesh: bool,
    },
    /// To the pod's application: mesh TLS to terminate first (`None`: permissive plaintext, no
    /// identity), then every request is checked against the intentions and sent to the app.
    Inbound {
        /// Server config of the local service (its verifier asks the intentions).
        tls: Option<Arc<rustls::ServerConfig>>,
        /// The application's port.
        port: u16,
        /// The pod's address.
        pod_ip: std::net::IpAddr,
    },
    /// A static listener: a reverse proxy, or a tunnel end with the listener's TLS.
    Static {
        /// The listener's TLS end, if any.
        tunnel: Option<TunnelTls>,
    },
}

/// Tunnel-mode TLS of a static HTTP listener.
#[derive(Debug)]
pub enum TunnelTls {
    /// Plaintext HTTP in, mTLS out (server name and expected identity in the config).
    Origin {
        /// Client config (ALPN `ringside/http`).
        cfg: Arc<rustls::ClientConfig>,
        /// Server name sent.
        name: Arc<str>,
    },
    /// mTLS in, plaintext HTTP out.
    Terminate {
        /// Server config (client certificates required, allow list).
        cfg: Arc<rustls::ServerConfig>,
    },
}

/// One L7 thread: a current-thread tokio runtime fed through its own channel.
#[derive(Debug)]
struct Lane {
    tx: crossbeam_channel::Sender<Handoff>,
    wake: Arc<tokio::sync::Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// The L7 path: `threads` lanes, each a thread with a current-thread runtime and its own upstream
/// pool. A connection stays on the lane it was given to (round-robin), so a request and its
/// upstream connection are driven by one thread with no cross-thread wake-ups.
#[derive(Debug)]
pub(crate) struct L7 {
    lanes: Mutex<Vec<Lane>>,
    senders: Vec<(crossbeam_channel::Sender<Handoff>, Arc<tokio::sync::Notify>)>,
    next: std::sync::atomic::AtomicUsize,
    drain: tokio::sync::watch::Sender<bool>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

struct Ctx {
    /// Becomes true when the proxy drains: connections finish their request and close.
    draining: tokio::sync::watch::Receiver<bool>,
    shared: Weak<Shared>,
    stats: Arc<HttpStats>,
    pool: Arc<pool::Pool>,
}

impl L7 {
    /// Start `threads` lanes.
    pub(crate) fn start(shared: &Arc<Shared>, threads: usize) -> std::io::Result<L7> {
        let (drain, draining) = tokio::sync::watch::channel(false);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut lanes = Vec::new();
        for k in 0..threads.max(1) {
            let (tx, rx) = crossbeam_channel::unbounded::<Handoff>();
            let wake = Arc::new(tokio::sync::Notify::new());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let (shared, draining, stop, wake2) = (
                Arc::downgrade(shared),
                draining.clone(),
                stop.clone(),
                wake.clone(),
            );
            let stats = shared
                .upgrade()
                .map(|s| s.stats.http.clone())
                .unwrap_or_default();
            let thread = std::thread::Builder::new()
                .name(format!("ringside-l7-{k}"))
                .spawn(move || {
                    runtime.block_on(async move {
                        let ctx = Arc::new(Ctx {
                            draining,
                            shared,
                            stats,
                            pool: Arc::default(),
                        });
                        loop {
                            while let Ok(h) = rx.try_recv() {
                                // The connection keeps the id it was accepted with.
                                let span = tracing::info_span!("conn", id = h.id, client = %h.peer, l7 = true);
                                tokio::spawn(serve(h, ctx.clone()).instrument(span));
                            }
                            if stop.load(SeqCst) {
                                return;
                            }
                            // A hand-off between the last try_recv and here left a permit.
                            wake2.notified().await;
                        }
                    });
                    // Dropping the runtime here cancels the connections left.
                })?;
            lanes.push(Lane {
                tx,
                wake,
                thread: Some(thread),
            });
        }
        let senders = lanes
            .iter()
            .map(|l| (l.tx.clone(), l.wake.clone()))
            .collect();
        Ok(L7 {
            lanes: Mutex::new(lanes),
            senders,
            next: std::sync::atomic::AtomicUsize::new(0),
            drain,
            stop,
        })
    }

    /// Hand a connection over. `false` only when the L7 path is gone (shutting down): the
    /// connection is dropped (closed).
    pub(crate) fn handoff(&self, h: Handoff) -> bool {
        let k = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % self.senders.len();
        let (tx, wake) = &self.senders[k];
        if tx.send(h).is_err() {
            return false;
        }
        wake.notify_one();
        true
    }

    /// Drain: every connection finishes the request in progress and closes (idle keep-alive
    /// connections close at once).
    pub(crate) fn drain(&self) {
        self.drain.send_replace(true);
    }

    /// Stop every lane (open connections are closed).
    pub(crate) fn shutdown(&self) {
        self.stop.store(true, SeqCst);
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        for l in lanes.iter_mut() {
            l.wake.notify_one();
            if let Some(t) = l.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Serve one handed-over connection (HTTP/1.1 or HTTP/2, detected from the preface).
async fn serve(h: Handoff, ctx: Arc<Ctx>) {
    HttpStats::inc(&ctx.stats.cx_total);
    let peer = h.peer;
    let inbound = matches!(h.entry, Entry::Inbound { .. });
    let stream = match h
        .stream
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(h.stream))
    {
        Ok(s) => s,
        Err(e) => {
            debug!(error = %e, "cannot take over the connection");
            HttpStats::inc(&ctx.stats.cx_closed);
            release(&ctx, inbound);
            return;
        }
    };
    let _ = stream.set_nodelay(true);
    let mut conn = Conn {
        peer,
        // Written once per connection, not per request (`Ipv4Addr`'s `Display` and `format!`
        // were 2.4 % of the path's instructions per request).
        peer_ip: HeaderValue::from_str(&peer.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown")),
        id: h.id,
        direction: match h.entry {
            Entry::Outbound { .. } => "outbound",
            Entry::Inbound { .. } => "inbound",
            Entry::Static { .. } => "tunnel",
        },
        orig_dst: h.orig_dst,
        own_id: h.own_id,
        caller_is_peer: false,
        accepted: std::time::Instant::now(),
        snap: h.snap,
        service: h.service,
        mesh_out: false,
        inbound: None,
        peer_id: None,
        origin: None,
        requests: Default::default(),
    };
    // Mesh TLS to terminate first: the inbound side of a sidecar, or a tunnel's terminating end.
    let terminate = match h.entry {
        Entry::Outbound { mesh } => {
            conn.mesh_out = mesh;
            None
        }
        Entry::Inbound { tls, port, pod_ip } => {
            conn.caller_is_peer = true;
            conn.inbound = Some(InboundConn {
                port,
                pod_ip,
                authenticated: tls.is_some(),
            });
            tls
        }
        Entry::Static { tunnel } => match tunnel {
            Some(TunnelTls::Origin { cfg, name }) => {
                conn.origin = Some((cfg, name));
                None
            }
            Some(TunnelTls::Terminate { cfg }) => {
                conn.caller_is_peer = true;
                Some(cfg)
            }
            None => None,
        },
    };
    match terminate {
        None => serve_io(TokioIo::new(stream), Arc::new(conn), &ctx).await,
        Some(cfg) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
            match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream).into_fallible())
                .await
            {
                Ok(Ok(tls)) => {
                    conn.peer_id = crate::tls::session::peer_id(tls.get_ref().1);
                    serve_io(TokioIo::new(tls), Arc::new(conn), &ctx).await;
                }
                Ok(Err((e, io))) => {
                    linger_after_alert(io);
                    let reason = pool::io_reason(&e);
                    ctx.stats.fail(reason);
                    if let Some(shared) = ctx.shared.upgrade() {
                        shared.events.push(
                            reason,
                            peer.to_string(),
                            conn.snap.services[conn.service].name.clone(),
                            e.to_string(),
                        );
                    }
                    warn!(reason = reason.as_str(), client = %peer, detail = %e, hint = reason.hint(), "connection failed");
                }
                Err(_) => {
                    ctx.stats.fail(Reason::TlsHandshakeFailed);
                    warn!(reason = "tls_handshake_failed", client = %peer, "the mesh TLS handshake did not finish in time");
                }
            }
        }
    }
    HttpStats::inc(&ctx.stats.cx_closed);
    release(&ctx, inbound);
}

/// After refusing a handshake (the alert is written): stop writing and read what the client still
/// sends for a moment before closing. With TLS 1.3 the client has finished its side of the
/// handshake and may already have sent its request; closing with that unread would answer with a
/// reset, and the reset makes the client's kernel drop the alert it has not read yet, so the
/// source would see `upstream_reset` instead of `denied_by_destination`.
fn linger_after_alert(mut io: tokio::net::TcpStream) {
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = io.shutdown().await;
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
            while matches!(io.read(&mut buf).await, Ok(n) if n > 0) {}
        })
        .await;
    });
}

/// How long an inbound mesh TLS handshake may take.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve_io<I>(io: I, conn: Arc<Conn>, ctx: &Arc<Ctx>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let peer = conn.peer;
    // An authenticated inbound connection lives only as long as an intention allows its caller.
    let watched = match (&conn.inbound, &conn.peer_id) {
        (Some(i), Some(id)) if i.authenticated => {
            Some((id.clone(), conn.snap.services[conn.service].name.clone()))
        }
        _ => None,
    };
    let c2 = ctx.clone();
    let served_conn = conn.clone();
    let svc = hyper::service::service_fn(move |req| proxy(req, conn.clone(), c2.clone()));
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // A slow client cannot hold a connection: its headers (and, on a kept-alive connection, the
    // next request's) must arrive within HEADER_READ_TIMEOUT, and a head is at most
    // MAX_HEADER_BYTES (Envoy allows 60 KiB by default).
    builder
        .http1()
        .keep_alive(true)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_header_list_size(MAX_HEADER_BYTES as u32)
        .keep_alive_interval(Some(HEADER_READ_TIMEOUT))
        .keep_alive_timeout(HEADER_READ_TIMEOUT);
    let served = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(served);
    let mut draining = ctx.draining.clone();
    let revoked = async {
        match &watched {
            Some((id, dest)) => revocation(ctx, id, dest).await,
            None => std::future::pending().await,
        }
    };
    let result = tokio::select! {
        r = served.as_mut() => r,
        _ = async { draining.wait_for(|d| *d).await.is_ok() } => {
            served.as_mut().graceful_shutdown();
            served.await
        }
        _ = no_request_within(&served_conn, HEADER_READ_TIMEOUT) => {
            // A client that sent no request head at all: silent, or stopped in the HTTP/2
            // preface or settings. hyper's header timer only runs once HTTP/1 bytes arrive (the
            // version is told from the first bytes, with no deadline of its own), so without this
            // such a client would hold its connection for good. Dropping the connection closes it.
            debug!(client = %peer, "no request head within {HEADER_READ_TIMEOUT:?} of accept: closed");
            return;
        }
        d = revoked => {
            // Dropping the connection closes it, requests in flight included.
            ctx.stats.fail(d.reason);
            warn!(reason = d.reason.as_str(), client = %peer, detail = %d.detail, "connection closed: the intention that allowed it was revoked");
            if let Some(shared) = ctx.shared.upgrade() {
                let (id, dest) = watched.as_ref().map(|(i, d)| (i.to_string(), d.clone())).unwrap_or_default();
                shared.events.push(d.reason, id, dest, format!("revoked: {}", d.detail));
            }
            return;
        }
    };
    if let Err(e) = result {
        let not_http = e
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_parse() || h.is_parse_too_large() || h.is_parse_status());
        if not_http && served_conn.requests.load(Relaxed) == 0 {
            // The service is HTTP (declared, or detected), but this client does not speak it: a
            // failure operators must see (a PostgreSQL client pointed at a service declared
            // http gets nothing but a closed connection).
            let reason = Reason::ProtocolMismatch;
            let service = served_conn.snap.services[served_conn.service].name.clone();
            let detail = format!("the client's first bytes are not an HTTP request ({e})");
            ctx.stats.fail(reason);
            warn!(reason = reason.as_str(), client = %peer, service = %service, detail = %detail, hint = reason.hint(), "connection failed");
            if let Some(shared) = ctx.shared.upgrade() {
                shared
                    .events
                    .push(reason, peer.to_string(), service.clone(), detail.clone());
                if let Some(log) = &shared.access_log {
                    let peer_id = served_conn.peer_id.as_ref().map(|i| i.to_string());
                    let (source_id, destination_id) = crate::telemetry::access_log::identities(
                        served_conn.caller_is_peer,
                        served_conn.own_id.as_deref(),
                        peer_id.as_deref(),
                    );
                    log.write(Line {
                        kind: "http",
                        conn_id: served_conn.id,
                        direction: served_conn.direction,
                        mesh: served_conn.mesh(),
                        client: Some(peer),
                        source_id,
                        destination_id,
                        original_destination: served_conn.orig_dst,
                        destination: Some(&service),
                        peer_id: peer_id.as_deref(),
                        duration_ms: served_conn.accepted.elapsed().as_millis() as u64,
                        reason: Some(reason.as_str()),
                        detail: Some(&detail),
                        service: Some(&service),
                        ..Line::default()
                    });
                }
            }
        } else {
            debug!(client = %peer, error = %e, "HTTP connection ended with an error");
        }
    }
}

/// Resolves after `limit` if no request head has arrived on `conn` by then; else never.
async fn no_request_within(conn: &Conn, limit: std::time::Duration) {
    tokio::time::sleep(limit).await;
    if conn.requests.load(Relaxed) > 0 {
        std::future::pending::<()>().await;
    }
}

/// Resolves when the configuration in force no longer lets `peer` call `destination` (checked at
/// every configuration change, pushed by the updater; nothing runs in between).
async fn revocation(
    ctx: &Ctx,
    peer: &crate::policy::identity::SpiffeId,
    destination: &str,
) -> crate::decide::authz::Denied {
    let Some(mut rx) = ctx.shared.upgrade().map(|s| s.config_changed.subscribe()) else {
        return std::future::pending().await;
    };
    let mut first = true;
    loop {
        // The first look is at once: a change between the handshake and here is not missed.
        if !std::mem::take(&mut first) && rx.changed().await.is_err() {
            return std::future::pending().await;
        }
        let Some(shared) = ctx.shared.upgrade() else {
            continue;
        };
        let Some(scope) = shared.sidecar_tls.as_ref().map(|s| &s.scope) else {
            continue;
        };
        let snap = shared.snapshot.load();
        if let Err(d) = crate::decide::authz::authorize_peer(
            &snap.intentions,
            scope,
            Some(peer),
            destination,
            crate::decide::authz::Served::L7,
        ) {
            return d;
        }
    }
}

/// The connection leaves the proxy's open-connection counts.
fn release(ctx: &Ctx, inbound: bool) {
    if let Some(shared) = ctx.shared.upgrade() {
        shared.release(inbound);
    }
}

struct Conn {
    peer: SocketAddr,
    /// The peer's IP address as a header value (for `x-forwarded-for`).
    peer_ip: HeaderValue,
    /// The connection's id (as in its span).
    id: u64,
    /// `outbound`, `inbound` or `tunnel`.
    direction: &'static str,
    /// The address the client dialled (sidecar listeners).
    orig_dst: Option<SocketAddr>,
    /// This proxy's own identity on the listener that accepted it.
    own_id: Option<Arc<str>>,
    /// The verified peer is the caller (inbound, a tunnel's terminating end); else this proxy is.
    caller_is_peer: bool,
    /// When the connection reached the L7 path.
    accepted: std::time::Instant,
    snap: Arc<ConfigSnapshot>,
    service: usize,
    /// Upstreams are sidecars: originate mesh mTLS.
    mesh_out: bool,
    /// Inbound: the upstream is the local application.
    inbound: Option<InboundConn>,
    /// The verified caller (inbound mesh TLS, or a tunnel's terminating end).
    peer_id: Option<crate::policy::identity::SpiffeId>,
    /// Tunnel origin: mTLS to the upstreams with this config and server name.
    origin: Option<(Arc<rustls::ClientConfig>, Arc<str>)>,
    /// Requests this connection has carried (0 at its end with a parse error: the client does
    /// not speak HTTP).
    requests: std::sync::atomic::AtomicU64,
}

impl Conn {
    /// Mesh mTLS on one side.
    fn mesh(&self) -> bool {
        self.peer_id.is_some()
            || self.mesh_out
            || self.origin.is_some()
            || self.inbound.as_ref().is_some_and(|i| i.authenticated)
    }
}

struct InboundConn {
    /// The application's port.
    port: u16,
    /// The pod's address (the original destination's).
    pod_ip: std::net::IpAddr,
    /// Came over mesh TLS (every request is authorized); `false`: permissive plaintext.
    authenticated: bool,
}

/// A response made by the proxy: status, `x-ringside-reason`, one line saying what to check.
pub fn local_reply(status: StatusCode, reason: Reason, detail: &str) -> Response<RespBody> {
    let body = format!(
        "ringside: {}: {detail}; {}\n",
        reason.as_str(),
        reason.hint()
    );
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        HeaderName::from_static("x-ringside-reason"),
        HeaderValue::from_static(reason.as_str()),
    );
    h.insert(
        hyper::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn status_for(reason: Reason) -> StatusCode {
    match reason {
        Reason::UpstreamRequestTimeout | Reason::UpstreamConnectTimeout => {
            StatusCode::GATEWAY_TIMEOUT
        }
        Reason::NoHealthyEndpoint
        | Reason::CircuitOpen
        | Reason::Overloaded
        | Reason::LocalPortsExhausted => StatusCode::SERVICE_UNAVAILABLE,
        Reason::RequestDenied | Reason::IntentionDenied | Reason::DeniedByDestination => {
            StatusCode::FORBIDDEN
        }
        Reason::AppNotListening | Reason::RetriesExhausted => StatusCode::SERVICE_UNAVAILABLE,
        Reason::BadRequest => StatusCode::BAD_REQUEST,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// A request id: a random version-4 UUID (not a secret; unique enough to trace).
fn request_id() -> HeaderValue {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x2545_f491_4f6c_dd1d);
            h.finish()
        });
    }
    // splitmix64 from a random seed per thread: ids unique and unguessable enough for
    // tracing (not a secret), at a few instructions each instead of two SipHash rounds and
    // `format!` (5 % of the L7 path's instructions per request, measured with callgrind).
    let next = || {
        STATE.with(|st| {
            let mut z = st.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            st.set(z);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        })
    };
    // A version-4 UUID (RFC 9562): 4 in the version nibble, `10` in the variant bits.
    let hi = (next() & !0xf000) | 0x4000;
    let lo = (next() & !(0b11 << 62)) | (0b10 << 62);
    let bits = (u128::from(hi) << 64) | u128::from(lo);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [b'-'; 36];
    let mut shift = 128;
    for (i, slot) in out.iter_mut().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            continue;
        }
        shift -= 4;
        *slot = HEX[((bits >> shift) & 0xf) as usize];
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("0"))
}

async fn proxy(
    mut req: Request<Incoming>,
    conn: Arc<Conn>,
    ctx: Arc<Ctx>,
) -> Result<Response<RespBody>, Infallible> {
    let stats = &ctx.stats;
    HttpStats::inc(&stats.rq_total);
    conn.requests.fetch_add(1, Relaxed);
    let start = std::time::Instant::now();
    let method = crate::telemetry::stats::method_label(req.method().as_str());
    // A request without an id gets one here, before anything reads it: the upstream and the
    // access log see the same.
    let rid = HeaderName::from_static("x-request-id");
    if !req.headers().contains_key(&rid) {
        req.headers_mut().insert(rid.clone(), request_id());
    }
    // What only the access log needs is taken only when there is one.
    let logged = ctx
        .shared
        .upgrade()
        .is_some_and(|s| s.access_log.is_some())
        .then(|| {
            let request_id = req
                .headers()
                .get(&rid)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            (
                req.method().as_str().to_string(),
                req.uri().path().to_string(),
                request_id,
                trace_id(req.headers()),
            )
        });
    let bytes_up = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let req = req.map(|b| Counted::new(b, bytes_up.clone()));
    let mut meta = RqMeta {
        service: conn.snap.services[conn.service].name.clone(),
        route: "default".into(),
        upstream: None,
        upstream_id: None,
    };
    // Boxed: `forward`'s state is nearly 5 KB, and hyper moves the request's future (this one)
    // into place; a small future here is a small copy per request.
    let resp = Box::pin(forward(req, &conn, &ctx, &mut meta)).await;
    let mut detail_of = None;
    let resp = match resp {
        Ok(r) => r,
        Err((reason, detail)) => {
            detail_of = Some(detail.clone());
            stats.fail(reason);
            HttpStats::inc(&stats.local_replies);
            let source = conn
                .peer_id
                .as_ref()
                .map(|p| p.to_string())
                .unwrap_or_else(|| conn.peer.to_string());
            warn!(
                reason = reason.as_str(),
                client = %source,
                service = %meta.service,
                detail = %detail,
                "request failed"
            );
            if let Some(shared) = ctx.shared.upgrade() {
                shared
                    .events
                    .push(reason, source, meta.service.clone(), detail.clone());
            }
            local_reply(status_for(reason), reason, &detail)
        }
    };
    let status = resp.status().as_u16();
    stats.status(status);
    stats.record(&meta.service, &meta.route, method, status, start.elapsed());
    let Some((method, path, request_id_of, trace_id)) = logged else {
        return Ok(resp);
    };
    // The line is written when the response body has gone to the client (its bytes counted).
    // The reason: this proxy's failure, or the one the upstream's sidecar answered with.
    let reason = resp
        .headers()
        .get("x-ringside-reason")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Reason::ALL.into_iter().find(|r| r.as_str() == v));
    let pending = RqLog {
        shared: ctx.shared.clone(),
        conn,
        meta,
        method,
        path,
        status,
        request_id: request_id_of,
        trace_id,
        reason,
        detail: detail_of,
        start,
        bytes_up,
    };
    let (parts, body) = resp.into_parts();
    let body = Logged {
        inner: body,
        bytes: 0,
        log: Some(pending),
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// The trace a request belongs to: W3C `traceparent` (`00-<32 hex>-<16 hex>-<2 hex>`), else B3
/// `x-b3-traceid`, else the single B3 header (`b3: <trace id>-<span id>[-...]`). The headers
/// themselves go through unchanged.
fn trace_id(h: &hyper::HeaderMap) -> Option<String> {
    let hex = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit());
    if let Some(tp) = h.get("traceparent").and_then(|v| v.to_str().ok()) {
        let parts: Vec<&str> = tp.trim().split('-').collect();
        if let [ver, id, parent, flags] = parts.as_slice() {
            if ver.len() == 2 && id.len() == 32 && parent.len() == 16 && flags.len() == 2 && hex(id)
            {
                return Some(id.to_ascii_lowercase());
            }
        }
    }
    let b3_id = |id: &str| (id.len() == 16 || id.len() == 32) && hex(id);
    if let Some(id) = h
        .get("x-b3-traceid")
        .and_then(|v| v.to_str().ok())
        .filter(|id| b3_id(id))
    {
        return Some(id.to_ascii_lowercase());
    }
    h.get("b3")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split('-').next())
        .filter(|id| b3_id(id))
        .map(str::to_ascii_lowercase)
}

/// What a request turned out to be, for its metrics.
struct RqMeta {
    /// The service it went to (after routes and splits).
    service: String,
    /// The route that matched (`route-N`) or `default`.
    route: String,
    /// The endpoint (or local application address) the last try went to.
    upstream: Option<SocketAddr>,
    /// The identity that endpoint proved (mesh mTLS).
    upstream_id: Option<Arc<str>>,
}

async fn forward(
    mut req: Request<Counted<Incoming>>,
    conn: &Conn,
    ctx: &Ctx,
    meta: &mut RqMeta,
) -> Result<Response<RespBody>, (Reason, String)> {
    // An upgrade (WebSocket and the like): once the upstream answers 101, both connections are
    // joined and bytes pass through as they are.
    let mut down_upgrade = req
        .headers()
        .contains_key(hyper::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let (mut parts, body) = req.into_parts();
    let version = parts.version;
    // Identity headers come from this proxy only: whatever the caller sent is dropped here and
    // the verified identity, if any, is set below.
    parts.headers.remove(XFCC);
    // Routes, permissions and the application see the normalized path.
    normalize_target(&mut parts)?;
    // Requests follow the configuration in force now (routes, splits, intentions); the
    // connection's snapshot only names the service it was opened for.
    let now = ctx
        .shared
        .upgrade()
        .map(|s| s.snapshot.load_full())
        .unwrap_or_else(|| conn.snap.clone());
    let base = &conn.snap.services[conn.service];
    let mut policy = Policy {
        request_timeout: base.request_timeout,
        retries: base.retries,
        retry_on: base.retry_on.clone(),
        retry_connect: true,
        retry_class: RetryClass::default(),
    };
    // The local service's inbound settings in force now (a kept-alive connection outlives
    // the snapshot it was accepted under).
    let local = match conn.inbound {
        Some(_) => now
            .services
            .iter()
            .find(|s| s.local && s.name == base.name && s.port == base.port)
            .map_or(base.inbound, |s| s.inbound),
        None => Default::default(),
    };
    // Consul's `localRequestTimeoutMs`: how long the local application may take.
    if let Some(t) = local.local_request_timeout {
        policy.request_timeout = t;
    }
    let target = if conn.inbound.is_some() {
        None
    } else {
        Some(choose_target(&now, base, &mut parts, &mut policy, meta)?)
    };
    let (snap, index) = match target {
        Some(i) => (&now, i),
        None => (&conn.snap, conn.service),
    };
    let svc = &snap.services[index];
    let cluster = &snap.clusters[index];
    meta.service.clone_from(&svc.name);
    let deadline = tokio::time::Instant::now() + policy.request_timeout;
    if let Some(inb) = &conn.inbound {
        // Intentions are evaluated per request, with the configuration in force now: a change
        // applies to the next request, also on a kept-alive connection. Permissive plaintext
        // (no identity) is let through as on L4.
        if inb.authenticated {
            let shared = ctx
                .shared
                .upgrade()
                .ok_or((Reason::Overloaded, "the proxy is shutting down".to_string()))?;
            let Some(scope) = shared.sidecar_tls.as_ref().map(|s| &s.scope) else {
                return Err((
                    Reason::IntentionDenied,
                    "mesh TLS without a sidecar identity".into(),
                ));
            };
            let current = shared.snapshot.load();
            crate::decide::authz::authorize_request(
                &current.intentions,
                scope,
                conn.peer_id.as_ref(),
                &svc.name,
                parts.method.as_str(),
                parts.uri.path(),
                &parts.headers,
            )
            .map_err(|d| (d.reason, d.detail))?;
        }
    } else {
        let headers = &mut parts.headers;
        // The client's address (the source sidecar appended it on the way in already).
        let xff = HeaderName::from_static("x-forwarded-for");
        let appended = headers
            .get(&xff)
            .filter(|prev| prev.to_str().is_ok())
            .and_then(|prev| {
                let ip = conn.peer_ip.as_bytes();
                let mut v = Vec::with_capacity(prev.len() + 2 + ip.len());
                v.extend_from_slice(prev.as_bytes());
                v.extend_from_slice(b", ");
                v.extend_from_slice(ip);
                HeaderValue::from_bytes(&v).ok()
            });
        headers.insert(xff, appended.unwrap_or_else(|| conn.peer_ip.clone()));
    }
    // Upstream requests carry the origin form (path and query); the host goes in `Host`.
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".into());
    if parts.version == hyper::Version::HTTP_2 {
        // Upstream requests are HTTP/1.1 on the pool; the authority becomes the Host header.
        if let Some(a) = parts.uri.authority() {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.entry(hyper::header::HOST).or_insert(v);
            }
        }
        parts.version = hyper::Version::HTTP_11;
    }
    if !parts.headers.contains_key(hyper::header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&svc.name) {
            parts.headers.insert(hyper::header::HOST, v);
        }
    }
    parts.uri = path
        .parse()
        .map_err(|e| (Reason::DownstreamReset, format!("bad request target: {e}")))?;
    if matches!(svc.protocol, Protocol::Http2 | Protocol::Grpc) {
        // HTTP/2 upstream: absolute URI (for :scheme and :authority), HTTP/2 version.
        let authority = parts
            .headers
            .get(hyper::header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or(&svc.name)
            .to_string();
        parts.uri = format!("http://{authority}{path}")
            .parse()
            .map_err(|e| (Reason::DownstreamReset, format!("bad request target: {e}")))?;
        parts.version = hyper::Version::HTTP_2;
        parts.headers.remove(hyper::header::HOST);
    }
    // To a mesh service: mTLS to its sidecar, which checks the intentions.
    let (mesh, tls) = match (&conn.origin, &conn.mesh_out, ctx.shared.upgrade()) {
        (Some((cfg, name)), _, _) => (Some(name.clone()), Some(cfg.clone())),
        (None, mesh_out, shared) => match (mesh_out, shared) {
            (true, Some(shared)) => match &shared.sidecar_tls {
                Some(st) => (
                    Some(Arc::<str>::from(svc.name.as_str())),
                    st.outbound.current().client_http.clone(),
                ),
                None => (None, None),
            },
            _ => (None, None),
        },
    };

    // Keep small bodies so that the request can be retried; stream large ones (one try).
    let small = body.is_end_stream() || body.size_hint().upper().is_some_and(|n| n <= REPLAY_LIMIT);
    let (replay, mut stream) = if small {
        let bytes = body
            .collect()
            .await
            .map_err(|e| {
                (
                    Reason::DownstreamReset,
                    format!("reading the request body: {e}"),
                )
            })?
            .to_bytes();
        (Some(bytes), None)
    } else {
        (None, Some(body))
    };

    // The caller's identity, as this proxy verified it; never what the caller wrote.
    if let Some(id) = &conn.peer_id {
        if let Ok(v) = HeaderValue::from_str(&format!("URI={id}")) {
            parts.headers.insert(HeaderName::from_static(XFCC), v);
        }
    }
    if let Some(inb) = &conn.inbound {
        let timeouts = (
            local.local_connect_timeout.unwrap_or(LOCAL_CONNECT_TIMEOUT),
            policy.request_timeout,
        );
        return to_local_app(
            parts, replay, stream, inb, svc, timeouts, deadline, ctx, version, meta,
        )
        .await;
    }

    // Circuit breaker: a bound on requests in flight to the service.
    let in_flight = cluster.active_requests.fetch_add(1, Relaxed);
    let _in_flight = InFlight(&cluster.active_requests);
    if in_flight >= svc.max_requests {
        return Err((
            Reason::CircuitOpen,
            format!(
                "{} has {in_flight} requests in flight (max_requests {})",
                svc.name, svc.max_requests
            ),
        ));
    }

    let mut tried = 0u64;
    let mut tries = 0u32;
    let mut last: Option<(Reason, String)> = None;
    // The request head, kept for a resend only while a status may be retried (a failed connect
    // gives its request back whole): otherwise it goes out without a copy.
    let mut parts = Some(parts);
    // A request given back by a failed connect (its body not sent) goes out again as it is.
    let mut given_back: Option<Request<ReqBody>> = None;
    loop {
        let Some(i) = cluster.pick(tried, std::time::Instant::now()) else {
            if let Some(last) = last {
                return Err(exhausted(tries, last));
            }
            return Err((
                Reason::NoHealthyEndpoint,
                format!(
                    "service '{}' has no endpoint to try ({} configured)",
                    svc.name,
                    cluster.endpoints.len()
                ),
            ));
        };
        if i < 64 {
            tried |= 1 << i;
        }
        let addr = cluster.endpoints[i].addr;
        meta.upstream = Some(addr);
        let up = match given_back.take() {
            Some(r) => r,
            None => {
                let body = match (&replay, stream.take()) {
                    (Some(b), _) => Either::Left(Full::new(b.clone())),
                    (None, Some(s)) => Either::Right(s),
                    (None, None) => {
                        return Err(last.unwrap_or((
                            Reason::UpstreamReset,
                            "the request body was already sent".into(),
                        )))
                    }
                };
                let resend =
                    tries < policy.retries && replay.is_some() && policy.retries_any_status();
                let head = if resend { parts.clone() } else { parts.take() };
                let Some(head) = head else {
                    return Err(last.unwrap_or((
                        Reason::UpstreamReset,
                        "the request was already sent".into(),
                    )));
                };
                Request::from_parts(head, body)
            }
        };
        let key = pool::Key {
            addr,
            mesh: mesh.clone(),
            h2: matches!(svc.protocol, Protocol::Http2 | Protocol::Grpc),
        };
        let _guard = cluster.open(i);
        let sent = std::time::Instant::now();
        // Boxed: the send (with its connect and handshake) is a large future that `timeout_at`
        // would move whole.
        let attempt = tokio::time::timeout_at(
            deadline,
            Box::pin(ctx.pool.send(&key, tls.clone(), svc.connect_timeout, up)),
        )
        .await;
        let can_retry = tries < policy.retries;
        match attempt {
            Err(_) => {
                // A timeout counts as a gateway failure for outlier detection.
                cluster.report_status(i, 504, svc.outlier_5xx, std::time::Instant::now());
                return Err((
                    Reason::UpstreamRequestTimeout,
                    format!(
                        "{} ({addr}) did not answer within {:?}",
                        svc.name, policy.request_timeout
                    ),
                ));
            }
            Ok(Err(mut e)) => {
                let reason = e.reason;
                // (No free local port is this host's shortage, not the endpoint's.)
                if e.connect && reason != Reason::LocalPortsExhausted {
                    cluster.report_failure(i, std::time::Instant::now());
                }
                debug!(endpoint = %addr, reason = reason.as_str(), error = %e.detail, "upstream request failed");
                let failure = (reason, format!("{} ({addr}): {}", svc.name, e.detail));
                // Connect failures are safe to retry (nothing was sent), also with a streamed
                // body, which the failed connect gave back.
                // A TLS refusal (identity, CA, intentions) would only fail again.
                if can_retry && e.connect && policy.retry_connect && !reason.is_tls() {
                    tries += 1;
                    HttpStats::inc(&ctx.stats.rq_retry);
                    given_back = e.request.take();
                    last = Some(failure);
                    continue;
                }
                return Err(exhausted(tries, failure));
            }
            Ok(Ok(resp)) => {
                let code = resp.status().as_u16();
                meta.upstream_id = resp
                    .extensions()
                    .get::<pool::UpstreamId>()
                    .map(|u| u.0.clone());
                cluster.observe_latency(i, sent.elapsed());
                if let Some(period) =
                    cluster.report_status(i, code, svc.outlier_5xx, std::time::Instant::now())
                {
                    warn!(
                        service = %svc.name,
                        endpoint = %addr,
                        status = code,
                        ejected_for_ms = period.as_millis() as u64,
                        "endpoint ejected after consecutive 5xx (circuit open; one trial request after the ejection)"
                    );
                }
                if can_retry && replay.is_some() && policy.retries_status(code) {
                    tries += 1;
                    HttpStats::inc(&ctx.stats.rq_retry);
                    // Another endpoint first, if there is one.
                    if tried.count_ones() as usize >= cluster.endpoints.len() {
                        tried = 0;
                    }
                    drop(resp);
                    continue;
                }
                let mut resp = resp;
                if tries > 0 && replay.is_some() && policy.retries_status(code) {
                    // Every try answered a status worth retrying: the last answer goes back as
                    // the upstream gave it, marked and counted as `retries_exhausted` (Envoy's
                    // URX).
                    let reason = Reason::RetriesExhausted;
                    let detail = format!(
                        "{tries} retries; the last attempt answered {code}: {} ({addr})",
                        svc.name
                    );
                    resp.headers_mut().insert(
                        HeaderName::from_static("x-ringside-reason"),
                        HeaderValue::from_static(reason.as_str()),
                    );
                    ctx.stats.fail(reason);
                    if let Some(shared) = ctx.shared.upgrade() {
                        let source = conn
                            .peer_id
                            .as_ref()
                            .map(|p| p.to_string())
                            .unwrap_or_else(|| conn.peer.to_string());
                        shared.events.push(reason, source, svc.name.clone(), detail);
                    }
                }
                if code == 101 {
                    if let Some(down) = down_upgrade.take() {
                        let up = hyper::upgrade::on(&mut resp);
                        tokio::spawn(join_upgraded(down, up));
                    }
                }
                return Ok(respond(resp, version));
            }
        }
    }
}

/// The failure of a request that was retried: `retries_exhausted`, naming the last failure
/// (Envoy's `URX`). A request that was never retried, and a failure to connect (refused, timed
/// out, unreachable, TLS), keep their own reason: it names the fix, and `ringctl why` reads it.
fn exhausted(tries: u32, (reason, detail): (Reason, String)) -> (Reason, String) {
    let connect_phase = reason.is_tls()
        || matches!(
            reason,
            Reason::UpstreamConnectRefused
                | Reason::UpstreamConnectTimeout
                | Reason::UpstreamUnreachable
                | Reason::LocalPortsExhausted
                | Reason::NoHealthyEndpoint
        );
    if tries == 0 || connect_phase {
        return (reason, detail);
    }
    (
        Reason::RetriesExhausted,
        format!("{tries} retries; the last attempt failed with {reason}: {detail}"),
    )
}

/// Join an upgraded client connection with the upgraded upstream one.
async fn join_upgraded(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    let (Ok(d), Ok(u)) = tokio::join!(down, up) else {
        debug!("an upgrade did not complete on both sides");
        return;
    };
    let mut d = TokioIo::new(d);
    let mut u = TokioIo::new(u);
    if let Err(e) = tokio::io::copy_bidirectional(&mut d, &mut u).await {
        debug!(error = %e, "upgraded connection ended with an error");
    }
}

/// Counts a request in flight to a cluster until dropped.
struct InFlight<'a>(&'a crate::decide::cluster::AtomicU32);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Timeouts and retries for one request (the service's, or its route's).
struct Policy {
    request_timeout: std::time::Duration,
    retries: u32,
    retry_on: Vec<u16>,
    /// Retry a failed connect (nothing was sent).
    retry_connect: bool,
    /// Status classes retried (a route's `retryOn`).
    retry_class: RetryClass,
}

/// Status classes a route's `retryOn` names.
#[derive(Debug, Clone, Copy, Default)]
struct RetryClass {
    /// `5xx`: any 5xx.
    any_5xx: bool,
    /// `gateway-error`: 502, 503, 504.
    gateway: bool,
    /// `retriable-4xx`: 409.
    conflict: bool,
}

impl Policy {
    /// Whether some response status is retried.
    fn retries_any_status(&self) -> bool {
        let c = self.retry_class;
        !self.retry_on.is_empty() || c.any_5xx || c.gateway || c.conflict
    }

    /// Whether a response with `code` is retried.
    fn retries_status(&self, code: u16) -> bool {
        self.retry_on.contains(&code)
            || (self.retry_class.any_5xx && (500..600).contains(&code))
            || (self.retry_class.gateway && matches!(code, 502..=504))
            || (self.retry_class.conflict && code == 409)
    }

    /// A route's retries, with Consul's semantics: a route that sets any retry field retries
    /// only on what it names, `numRetries` times (1 when unset, Envoy's default).
    fn take_route(&mut self, d: &crate::policy::rules::RouteDestination) {
        if !d.has_retry_features() {
            return;
        }
        let on = |c: &str| d.retry_on.iter().any(|r| r == c);
        self.retries = d.num_retries.filter(|&n| n > 0).unwrap_or(1);
        self.retry_on = d.retry_on_status_codes.clone();
        self.retry_connect = d.retry_on_connect_failure == Some(true)
            || on("connect-failure")
            || on("5xx")
            || on("gateway-error");
        self.retry_class = RetryClass {
            any_5xx: on("5xx"),
            gateway: on("gateway-error"),
            conflict: on("retriable-4xx"),
        };
    }
}

/// A number in [0, 100) for weighted splits.
fn roll() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    thread_local! {
        static STATE: std::cell::Cell<u64> = std::cell::Cell::new({
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u64(0x9e37_79b9_7f4a_7c15);
            h.finish() | 1
        });
    }
    STATE.with(|s| {
        // xorshift64*
        let mut x = s.get();
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        s.set(x);
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        (r >> 11) as f64 / (1u64 << 53) as f64 * 100.0
    })
}

/// Outbound: the service a request goes to after its `ServiceRouter` route and the target's
/// `ServiceSplitter`; the route's rewrite, timeout and retries apply.
fn choose_target(
    snap: &ConfigSnapshot,
    base: &crate::config::Service,
    parts: &mut hyper::http::request::Parts,
    policy: &mut Policy,
    meta: &mut RqMeta,
) -> Result<usize, (Reason, String)> {
    let route = snap.l7.route(
        &base.name,
        parts.method.as_str(),
        parts.uri.path(),
        parts.uri.query(),
        &parts.headers,
    );
    if let Some(r) = route {
        let k = snap.l7.routers[&base.name]
            .routes
            .iter()
            .position(|x| std::ptr::eq(x, r))
            .unwrap_or(0);
        meta.route = format!("{}-route-{}", base.name, k + 1);
    }
    let mut name = base.name.as_str();
    let mut subset: Option<&str> = None;
    if let Some(r) = route {
        let d = &r.destination;
        if let Some(s) = &d.service {
            name = s;
        }
        subset = d.service_subset.as_deref();
        if let Some(t) = d.request_timeout {
            policy.request_timeout = t;
        }
        policy.take_route(d);
        let prefix = r
            .match_
            .as_ref()
            .and_then(|m| m.http.path_prefix.as_deref());
        if let (Some(prefix), Some(rewrite)) = (prefix, &d.prefix_rewrite) {
            let pq = parts.uri.path_and_query().map_or("/", |p| p.as_str());
            if let Some(rest) = pq.strip_prefix(prefix) {
                let joined = if rewrite.ends_with('/') && rest.starts_with('/') {
                    format!("{rewrite}{}", &rest[1..])
                } else {
                    format!("{rewrite}{rest}")
                };
                if let Ok(u) = joined.parse() {
                    parts.uri = u;
                }
            }
        }
    }
    let mut chosen = name;
    if subset.is_none() {
        let (n, sub) = snap.l7.split_subset(name, roll());
        chosen = n;
        subset = sub;
    }
    // The resolver's default subset when none was asked for.
    if subset.is_none() {
        subset = snap
            .l7
            .resolvers
            .get(chosen)
            .and_then(|r| r.default_subset.as_deref());
    }
    // ServiceResolver: timeouts, and failover when the service has no healthy endpoint.
    if let Some(r) = snap.l7.resolvers.get(chosen) {
        if let Some(t) = r.request_timeout {
            policy.request_timeout = t;
        }
    }
    let healthy = |n: &str, sub: Option<&str>| {
        snap.services.iter().zip(&snap.clusters).any(|(s, c)| {
            s.name == n
                && s.subset.as_deref() == sub
                && (0..c.endpoints.len()).any(|i| !c.is_ejected(i, std::time::Instant::now()))
        })
    };
    if !healthy(chosen, subset) {
        if let Some(f) = snap
            .l7
            .failover(chosen)
            .into_iter()
            .find(|f| healthy(f, None))
        {
            debug!(
                service = chosen,
                failover = f,
                "no healthy endpoint: failing over"
            );
            chosen = f;
            subset = None;
        }
    }
    let candidates: Vec<usize> = snap
        .services
        .iter()
        .enumerate()
        .filter(|(_, s)| s.name == chosen && s.subset.as_deref() == subset)
        .map(|(i, _)| i)
        .collect();
    candidates
        .iter()
        .copied()
        .find(|&i| snap.services[i].port == base.port)
        .or(candidates.first().copied())
        .ok_or_else(|| {
            (
                Reason::NoHealthyEndpoint,
                                format!(
                    "'{chosen}'{} (chosen by the route/split of '{}') is not in the catalog: register it{}",
                    subset.map(|s| format!(" subset '{s}'")).unwrap_or_default(),
                    base.name,
                    if subset.is_some() { ", and check the ServiceResolver's subsets" } else { "" }
                ),
            )
        })
}

/// The upstream's response, to the client's HTTP version.
fn respond(resp: Response<pool::PooledBody>, version: hyper::Version) -> Response<RespBody> {
    let (mut p, b) = resp.into_parts();
    p.version = version;
    let b = b.map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>);
    Response::from_parts(p, b.boxed_unsync())
}

/// How long the local application may take to accept a connection.
const LOCAL_CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Inbound: the local application on its port, at 127.0.0.1, ::1 or the pod address (the first
/// that accepts), as on the fast path.
#[allow(clippy::too_many_arguments)]
async fn to_local_app(
    parts: hyper::http::request::Parts,
    replay: Option<Bytes>,
    stream: Option<Counted<Incoming>>,
    inb: &InboundConn,
    svc: &crate::config::Service,
    (connect_timeout, request_timeout): (std::time::Duration, std::time::Duration),
    deadline: tokio::time::Instant,
    ctx: &Ctx,
    version: hyper::Version,
    meta: &mut RqMeta,
) -> Result<Response<RespBody>, (Reason, String)> {
    let candidates = crate::decide::route::local_candidates(inb.port, inb.pod_ip, true);
    let body = match (replay, stream) {
        (Some(b), _) => Either::Left(Full::new(b)),
        (None, Some(s)) => Either::Right(s),
        (None, None) => Either::Left(Full::new(Bytes::new())),
    };
    let mut req = Some(Request::from_parts(parts, body));
    let mut timed_out = false;
    for addr in &candidates {
        let key = pool::Key {
            addr: *addr,
            mesh: None,
            h2: matches!(svc.protocol, Protocol::Http2 | Protocol::Grpc),
        };
        let Some(r) = req.take() else { break };
        meta.upstream = Some(*addr);
        match tokio::time::timeout_at(
            deadline,
            Box::pin(ctx.pool.send(&key, None, connect_timeout, r)),
        )
        .await
        {
            Err(_) => {
                return Err((
                    Reason::UpstreamRequestTimeout,
                    format!(
                        "the local application ({addr}) did not answer within {request_timeout:?}"
                    ),
                ))
            }
            Ok(Ok(resp)) => return Ok(respond(resp, version)),
            Ok(Err(mut e)) if e.connect => {
                timed_out |= e.reason == Reason::UpstreamConnectTimeout;
                req = e.request.take()
            }
            Ok(Err(e)) => {
                return Err((e.reason, format!("local application {addr}: {}", e.detail)))
            }
        }
    }
    if timed_out {
        return Err((
            Reason::UpstreamConnectTimeout,
            format!(
                "{}: the local application on port {} did not accept within {connect_timeout:?} (localConnectTimeoutMs): is it overloaded or stuck?",
                svc.name, inb.port
            ),
        ));
    }
    let listening = crate::io::listening::listening();
    Err((
        Reason::AppNotListening,
        format!(
            "{}: {}",
            svc.name,
            crate::io::listening::app_hint(inb.port, &listening, &candidates)
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::rules::RouteDestination;

    #[test]
    fn request_ids_are_distinct_version_4_uuids() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..10_000 {
            let id = request_id();
            let s = id.to_str().expect("ASCII");
            assert_eq!(s.len(), 36, "{s}");
            for (i, c) in s.char_indices() {
                match i {
                    8 | 13 | 18 | 23 => assert_eq!(c, '-', "{s}"),
                    14 => assert_eq!(c, '4', "version nibble in {s}"),
                    19 => assert!(matches!(c, '8' | '9' | 'a' | 'b'), "variant in {s}"),
                    _ => assert!(c.is_ascii_hexdigit() && !c.is_ascii_uppercase(), "{s}"),
                }
            }
            assert!(seen.insert(s.to_string()), "repeated id {s}");
        }
    }

    fn service_policy() -> Policy {
        Policy {
            request_timeout: std::time::Duration::from_secs(15),
            retries: 2,
            retry_on: Vec::new(),
            retry_connect: true,
            retry_class: RetryClass::default(),
        }
    }

    #[test]
    fn a_route_with_retry_fields_retries_only_what_it_names() {
        // No retry field: the service's retries stay (connect failures, twice).
        let mut p = service_policy();
        p.take_route(&RouteDestination {
            request_timeout: Some(std::time::Duration::from_secs(1)),
            ..Default::default()
        });
        assert_eq!((p.retries, p.retry_connect), (2, true));

        // Status codes only: one retry (Envoy's default), on those codes, not on connect failures.
        let mut p = service_policy();
        p.take_route(&RouteDestination {
            retry_on_status_codes: vec![503],
            ..Default::default()
        });
        assert_eq!((p.retries, p.retry_connect), (1, false));
        assert!(p.retries_status(503) && !p.retries_status(502));

        // numRetries with retryOnConnectFailure.
        let mut p = service_policy();
        p.take_route(&RouteDestination {
            num_retries: Some(4),
            retry_on_connect_failure: Some(true),
            ..Default::default()
        });
        assert_eq!((p.retries, p.retry_connect), (4, true));
        assert!(!p.retries_status(503));

        // retryOn classes.
        let mut p = service_policy();
        p.take_route(&RouteDestination {
            retry_on: vec!["gateway-error".into(), "retriable-4xx".into()],
            ..Default::default()
        });
        assert!(
            p.retry_connect,
            "gateway-error covers connect failures, as in Envoy"
        );
        assert!(p.retries_status(502) && p.retries_status(504) && p.retries_status(409));
        assert!(!p.retries_status(500) && !p.retries_status(404));
        let mut p = service_policy();
        p.take_route(&RouteDestination {
            retry_on: vec!["5xx".into()],
            ..Default::default()
        });
        assert!(p.retries_status(500) && p.retries_status(599) && !p.retries_status(409));
    }

    /// A request retried and failed again after it was sent is `retries_exhausted`, naming the
    /// last failure; never retried, or failed while connecting, it keeps its own reason.
    #[test]
    fn exhausted_names_the_last_failure_of_a_retried_request() {
        let (r, d) = exhausted(2, (Reason::UpstreamReset, "api (1.2.3.4:80): reset".into()));
        assert_eq!(r, Reason::RetriesExhausted);
        assert!(
            d.starts_with("2 retries;")
                && d.contains(Reason::UpstreamReset.as_str())
                && d.contains("api (1.2.3.4:80): reset"),
            "{d}"
        );
        let (r, d) = exhausted(0, (Reason::UpstreamReset, "reset".into()));
        assert_eq!((r, d.as_str()), (Reason::UpstreamReset, "reset"));
        for connect in [
            Reason::UpstreamConnectRefused,
            Reason::UpstreamConnectTimeout,
            Reason::UpstreamUnreachable,
            Reason::LocalPortsExhausted,
            Reason::NoHealthyEndpoint,
            Reason::TlsIdentityMismatch,
        ] {
            assert_eq!(exhausted(3, (connect, "x".into())).0, connect, "{connect}");
        }
        assert_eq!(
            status_for(Reason::RetriesExhausted),
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
}
