//! A connection's whole life, one file per direction, each read top to bottom: accept (the
//! worker), plan ([`crate::decide::plan`]), connect, relay, end.
//!
//! - [`outbound`]: the pod's application calls out (15001).
//! - [`inbound`]: a caller reaches the pod's application (15006).
//! - [`tunnel`]: static listeners (`ringside forward`, with or without a TLS end).
//!
//! [`serve`] plans the connection and does what every direction does alike (refuse, or relay
//! plain bytes); the plans only one direction makes are served in its file. Whatever happens,
//! one [`Outcome`] per connection is recorded in one place ([`record`]): counters (the labelled ones
//! opened in [`opened`] when the connection is established), `/events`, the access log and the log
//! line.

pub(crate) mod inbound;
pub(crate) mod outbound;
pub(crate) mod tunnel;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use monoio::net::TcpStream;
use tracing::{debug, warn};

use crate::config::ListenerKind;
use crate::decide::authz::{authorize_peer, Denied, Scope, Served};
use crate::decide::detect::{Detection, Want};
use crate::decide::plan::{plan, Input, L7Plan, Plan};
use crate::decide::route::Route;
use crate::io::connect::{connect_to, Upstream};
use crate::io::peek::{detect, Gone};
use crate::io::relay::relay;
use crate::io::sys;
use crate::io::tls_relay::{self, Established, TlsRelayEnd};
use crate::io::worker::Worker;
use crate::policy::identity::SpiffeId;
use crate::reason::Reason;
use crate::server::ConfigSnapshot;
use crate::telemetry::access_log::{identities, Line};
use crate::telemetry::tcp;
use crate::tls::session;

pub(crate) use crate::telemetry::tcp::Direction;

/// What happened to one connection, recorded once when it ends.
#[derive(Debug)]
pub(crate) struct Outcome {
    /// The connection's id (as in its log span).
    pub id: u64,
    /// The listener that accepted it.
    pub listener: u16,
    /// Which way.
    pub direction: Direction,
    /// The client's address.
    pub client: SocketAddr,
    /// When it was accepted ([`Since`]).
    pub started: Since,
    /// Where it was headed (named when recorded: no string per connection).
    pub dest: Dest,
    /// The endpoint (or local app address) it was relayed to.
    pub upstream: Option<SocketAddr>,
    /// The verified peer identity (the caller inbound, the server outbound).
    pub peer_id: Option<Box<str>>,
    /// Mesh mTLS on one side.
    pub mesh: bool,
    /// Bytes client -> upstream.
    pub bytes_up: u64,
    /// Bytes upstream -> client.
    pub bytes_down: u64,
    /// Why it failed or was refused (`None`: a clean end).
    pub reason: Option<Reason>,
    /// What decided it; a failure with a detail is logged at warn and kept at `/events`.
    pub detail: Option<Box<str>>,
    /// Handed to the L7 path, which records each request itself.
    pub handed_off: bool,
    /// Its labelled counters' series on this worker, once established ([`opened`]).
    pub series: Option<u32>,
}

impl Outcome {
    fn new(id: u64, listener: usize, kind: ListenerKind, client: SocketAddr) -> Outcome {
        Outcome {
            id,
            listener: listener as u16,
            direction: match kind {
                ListenerKind::Outbound => Direction::Outbound,
                ListenerKind::Inbound => Direction::Inbound,
                ListenerKind::Static(_) => Direction::Tunnel,
            },
            client,
            started: Since::now(),
            dest: Dest::Unknown,
            upstream: None,
            peer_id: None,
            mesh: false,
            bytes_up: 0,
            bytes_down: 0,
            reason: None,
            detail: None,
            handed_off: false,
            series: None,
        }
    }

    /// A failure with what decided it.
    pub(crate) fn fail(&mut self, reason: Reason, detail: String) {
        self.reason = Some(reason);
        self.detail = Some(detail.into());
    }

    /// Where the connection goes. A passthrough's address is its upstream (so the log names it
    /// even when the connect fails).
    pub(crate) fn headed(&mut self, route: Route) {
        self.dest = match route {
            Route::Cluster(i)
            | Route::Local {
                service: Some(i), ..
            } => Dest::Service(i as u32),
            Route::Local { port, .. } => Dest::Port(port),
            Route::Passthrough(a) => {
                self.upstream = Some(a);
                Dest::Passthrough
            }
            Route::Refuse(_) => Dest::Unknown,
        };
    }

    /// The end of a plain relay.
    fn relayed(&mut self, end: crate::io::relay::RelayEnd) {
        self.bytes_up = end.up_bytes;
        self.bytes_down = end.down_bytes;
        self.reason = end.reason;
    }

    /// The end of a TLS relay; `tls_is_upstream`: the client side is plaintext.
    pub(crate) fn relayed_tls(&mut self, end: TlsRelayEnd, tls_is_upstream: bool) {
        (self.bytes_up, self.bytes_down) = if tls_is_upstream {
            (end.sealed, end.opened)
        } else {
            (end.opened, end.sealed)
        };
        if let Some((reason, err)) = end.failure {
            self.reason = Some(reason);
            self.detail = err.map(|e| e.to_string().into());
        }
    }
}

/// A moment, as nanoseconds since the process's first connection: 8 bytes where an `Instant` takes
/// 16. (Every idle connection carries its [`Outcome`] in its task, and the task's size decides
/// what an idle connection costs: 16 bytes more made it 263 bytes more in RSS.)
#[derive(Debug, Clone, Copy)]
pub(crate) struct Since(u64);

impl Since {
    fn epoch() -> Instant {
        static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
        *EPOCH.get_or_init(Instant::now)
    }

    /// Now.
    pub(crate) fn now() -> Since {
        Since(Self::epoch().elapsed().as_nanos() as u64)
    }

    /// Milliseconds from this moment to now.
    pub(crate) fn elapsed_ms(self) -> u64 {
        Since::now().0.saturating_sub(self.0) / 1_000_000
    }
}

/// Serve one accepted connection to its end (the function the workers run per connection).
pub(crate) async fn serve(
    w: Rc<Worker>,
    client: TcpStream,
    peer: SocketAddr,
    listener: usize,
    id: u64,
) {
    // The configuration this connection lives with, whatever updates arrive meanwhile.
    let snap = w.shared.snapshot.load_full();
    let mut out = Outcome::new(id, listener, w.shared.config.listeners[listener].kind, peer);
    // The client comes back unless the L7 path took it; it is closed only after the outcome is
    // recorded, so whoever sees the close also sees the counters.
    let client = match decide(&w, &snap, &client, listener).await {
        // Gone before saying anything.
        Err(Gone) => Some(client),
        // What every direction does alike: refuse, or relay plain bytes.
        Ok(Plan::Refuse { reason, detail }) => {
            refuse(&client, &mut out, reason, detail);
            Some(client)
        }
        Ok(Plan::Relay(route)) => {
            relay_plain(&w, &snap, &client, route, &mut out).await;
            Some(client)
        }
        Ok(plan) => match out.direction {
            Direction::Outbound => outbound::serve(&w, &snap, client, plan, &mut out).await,
            Direction::Inbound => inbound::serve(&w, &snap, client, plan, &mut out).await,
            Direction::Tunnel => tunnel::serve(&w, &snap, client, listener, plan, &mut out).await,
        },
    };
    if let Some(client) = client {
        record(&w, &snap, &out, &client);
        drop(client);
        w.finish(out.direction == Direction::Inbound);
    }
}

/// Plan the connection: its original destination, then its first bytes if the plan asks.
/// `Err`: the client went away before saying anything.
pub(crate) async fn decide(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    listener: usize,
) -> Result<Plan, Gone> {
    let l = &w.shared.config.listeners[listener];
    let orig = match l.kind {
        ListenerKind::Static(_) => None,
        _ => Some(
            sys::original_dst(client.as_raw_fd(), l.address.is_ipv6()).map_err(|e| e.to_string()),
        ),
    };
    let mut own = w.shared.own.load_full();
    if let Some(Ok(a)) = &orig {
        if own.needs_refresh(*a) && read_due(w) {
            // Rare: the port is one of ours and the address not known as local: make sure the
            // host's addresses are current (an address added after start).
            let mut fresh = (*own).clone();
            fresh.ips = sys::local_ips();
            own = Arc::new(fresh);
            w.shared.own.store(own.clone());
        }
    }
    let input = Input {
        listener: l,
        orig_dst: orig
            .as_ref()
            .map(|r| r.as_ref().copied().map_err(String::as_str)),
        own: &own,
        services: &snap.services,
        routes: &snap.routes,
        mesh: w.shared.sidecar_tls.as_ref().map(|s| s.mode),
        l7: w.shared.l7.get().is_some(),
    };
    match plan(&input, None) {
        Plan::Detect { want, wait } => {
            let d = Box::pin(detect(client, want, wait)).await?;
            if d == Detection::Timeout && want == Want::Http {
                w.stats().protocol_detect_timeout.inc();
            }
            Ok(plan(&input, Some(&d)))
        }
        p => Ok(p),
    }
}

/// Whether the host's addresses may be read again (at most once a second).
fn read_due(w: &Worker) -> bool {
    let mut at = w
        .shared
        .own_read_at
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if at.elapsed() < std::time::Duration::from_secs(1) {
        return false;
    }
    *at = Instant::now();
    true
}

/// Where a connection was headed, compact (it lives as long as the connection): named when the
/// outcome is recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dest {
    /// Not decided (refused before routing, or gone).
    Unknown,
    /// A service (index into the snapshot's services).
    Service(u32),
    /// A local port no service declares.
    Port(u16),
    /// The original destination, passed through (the outcome's upstream).
    Passthrough,
}

/// The name operators know the destination by.
fn destination(snap: &ConfigSnapshot, o: &Outcome) -> String {
    match o.dest {
        Dest::Unknown => String::new(),
        Dest::Service(i) => snap
            .services
            .get(i as usize)
            .map(|s| s.name.clone())
            .unwrap_or_default(),
        Dest::Port(p) => format!("port {p}"),
        Dest::Passthrough => o.upstream.map(|a| a.to_string()).unwrap_or_default(),
    }
}

/// The labels of the connection's counters; `None` before its destination is known.
fn labels<'a>(snap: &'a ConfigSnapshot, o: &'a Outcome) -> Option<tcp::Labels<'a>> {
    let service = match o.dest {
        Dest::Unknown => return None,
        Dest::Service(i) => snap.services.get(i as usize)?.name.as_str(),
        Dest::Port(_) | Dest::Passthrough => tcp::PASSTHROUGH,
    };
    // Inbound, the verified peer is the caller: its service is the last part of its SPIFFE ID
    // (`spiffe://<trust-domain>/ns/<ns>/sa/<service>`).
    let source = match o.direction {
        Direction::Inbound => o
            .peer_id
            .as_deref()
            .and_then(|p| p.rsplit_once("/sa/"))
            .map_or(tcp::UNKNOWN_SOURCE, |(_, s)| s),
        Direction::Outbound | Direction::Tunnel => "",
    };
    Some(tcp::Labels {
        direction: o.direction,
        service,
        source,
    })
}

/// The connection is established (both ends connected, handshakes done): count it opened.
fn opened(w: &Worker, snap: &ConfigSnapshot, out: &mut Outcome) {
    if let Some(l) = labels(snap, out) {
        out.series = Some(w.shared.stats.tcp.open(w.id, l));
    }
}

/// Refuse the client: a reset, or after a TLS failure a FIN (so the alert arrives first).
pub(crate) fn refuse(client: &TcpStream, out: &mut Outcome, reason: Reason, detail: String) {
    sys::close_after_failure(client.as_raw_fd(), reason);
    out.fail(reason, detail);
}

/// Plain bytes both ways: connect where the route says, then splice or copy.
pub(crate) async fn relay_plain(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    route: Route,
    out: &mut Outcome,
) {
    out.headed(route);
    let cfd = client.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(cfd) {
        return refuse(client, out, Reason::DownstreamReset, e.to_string());
    }
    // Boxed: connecting is short, and inline its state would size the task for the
    // connection's whole life.
    let Some(up) = Box::pin(connect(w, snap, client, route, out)).await else {
        return;
    };
    sys::set_nodelay(cfd);
    opened(w, snap, out);
    // Only the stream and its endpoint count live on through the relay (the address is in `out`).
    let (stream, _guard) = up.into_parts();
    let end = relay(w.relay_ctx(), client, &stream).await;
    out.relayed(end);
}

/// Mesh TLS from the client: the handshake with `cfg` (its verifier authorizes the caller), then
/// connect where `route` says and relay TLS <-> plaintext. Nothing of a refused caller reaches the
/// upstream: it is connected only after the handshake.
///
/// With `recheck` (the local service the intentions authorized the caller for), the connection is
/// closed with `intention_denied` as soon as the configuration in force no longer allows it.
pub(crate) async fn terminate_then_relay(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    route: Route,
    recheck: Option<&str>,
    out: &mut Outcome,
) {
    out.mesh = true;
    let cfd = client.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(cfd) {
        return refuse(client, out, Reason::DownstreamReset, e.to_string());
    }
    let Some(est) = handshake(w, session::server(cfg), client, false, client, out).await else {
        return;
    };
    let Some(up) = connect(w, snap, client, route, out).await else {
        return;
    };
    sys::set_nodelay(cfd);
    opened(w, snap, out);
    let ctx = w.relay_ctx();
    let peer = est.peer.clone();
    let relay = tls_relay::relay(&ctx, &up.stream, client, est, false);
    let watch = match (recheck, peer, &w.shared.sidecar_tls) {
        (Some(dest), Some(peer), Some(st)) => Some((dest, peer, &st.scope)),
        _ => None,
    };
    let Some((dest, peer, scope)) = watch else {
        return out.relayed_tls(relay.await, false);
    };
    match until_revoked(w, relay, scope, &peer, dest).await {
        Ok(end) => out.relayed_tls(end, false),
        Err(d) => {
            // Both sides get a reset: the connection is cut, not finished.
            sys::set_linger_zero(up.stream.as_raw_fd());
            sys::set_linger_zero(cfd);
            out.fail(d.reason, format!("revoked: {}", d.detail));
        }
    }
}

/// Run `relay` until it ends, or until the configuration in force no longer lets `peer` call
/// `destination` on L4 (then `Err` with the refusal, and `relay` is dropped).
async fn until_revoked<F: std::future::Future>(
    w: &Worker,
    relay: F,
    scope: &Scope,
    peer: &SpiffeId,
    destination: &str,
) -> Result<F::Output, Denied> {
    let revoked = async {
        loop {
            // Take the change to wait for before looking, so none slips in between.
            let change = w.config_change();
            let snap = w.shared.snapshot.load();
            if let Err(d) =
                authorize_peer(&snap.intentions, scope, Some(peer), destination, Served::L4)
            {
                return d;
            }
            change.await;
        }
    };
    let mut relay = std::pin::pin!(relay);
    let mut revoked = std::pin::pin!(revoked);
    std::future::poll_fn(|cx| {
        use std::future::Future;
        if let std::task::Poll::Ready(v) = relay.as_mut().poll(cx) {
            return std::task::Poll::Ready(Ok(v));
        }
        revoked.as_mut().poll(cx).map(Err)
    })
    .await
}

/// Plaintext from the client: connect where `route` says, originate TLS to `name` with `cfg`
/// (its verifier requires that identity), then relay plaintext <-> TLS.
pub(crate) async fn originate_then_relay(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    cfg: Arc<rustls::ClientConfig>,
    name: &str,
    route: Route,
    out: &mut Outcome,
) {
    out.mesh = true;
    let cfd = client.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(cfd) {
        return refuse(client, out, Reason::DownstreamReset, e.to_string());
    }
    let Some(up) = connect(w, snap, client, route, out).await else {
        return;
    };
    let session = session::client(cfg, name);
    let Some(est) = handshake(w, session, &up.stream, true, client, out).await else {
        return;
    };
    sys::set_nodelay(cfd);
    opened(w, snap, out);
    let end = tls_relay::relay(&w.relay_ctx(), client, &up.stream, est, true).await;
    out.relayed_tls(end, true);
}

/// Connect where `route` says; when that fails the client is refused with the reason.
async fn connect(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    route: Route,
    out: &mut Outcome,
) -> Option<Upstream> {
    let (id, peer, listener) = (out.id, out.client, out.listener);
    match connect_to(w, snap, route, &|| span(w, id, peer, listener)).await {
        Ok(up) => {
            out.upstream = Some(up.addr);
            Some(up)
        }
        Err(f) => {
            if f.tried.is_some() {
                out.upstream = f.tried;
            }
            let (reason, detail) = f.detail();
            refuse(client, out, reason, detail);
            None
        }
    }
}

/// Drive a TLS session's handshake on `sock` and take the peer's verified identity; when it
/// fails, the client is refused with the reason (the alert was sent first).
async fn handshake(
    w: &Worker,
    session: Result<session::Handshaking, (Reason, String)>,
    sock: &TcpStream,
    peer_is_upstream: bool,
    client: &TcpStream,
    out: &mut Outcome,
) -> Option<Established> {
    let done = match session {
        Ok(s) => tls_relay::handshake(s, sock, w.relay_ctx().pools)
            .await
            .map_err(|f| (f.reason(peer_is_upstream), f.to_string())),
        Err(e) => Err(e),
    };
    match done {
        Ok(est) => {
            out.peer_id = est.peer.as_ref().map(|i| i.to_string().into());
            Some(est)
        }
        Err((reason, detail)) => {
            refuse(client, out, reason, detail);
            None
        }
    }
}

/// Give an HTTP connection to the L7 path; it leaves this worker.
pub(crate) fn handoff(
    w: &Worker,
    client: TcpStream,
    snap: Arc<ConfigSnapshot>,
    plan: L7Plan,
    entry: crate::l7::Entry,
    out: &mut Outcome,
) {
    out.handed_off = true;
    let service = match plan {
        L7Plan::Outbound { service, .. }
        | L7Plan::Inbound { service, .. }
        | L7Plan::Static { service } => service,
    };
    let inbound = out.direction == Direction::Inbound;
    let Some(l7) = w.shared.l7.get() else {
        w.stats().fail(Reason::Overloaded);
        w.left(false, inbound);
        return;
    };
    let orig_dst = w
        .shared
        .access_log
        .as_ref()
        .and_then(|_| original_dst(w, &client, out.listener as usize));
    let h = crate::l7::Handoff {
        stream: sys::into_std(client),
        id: out.id,
        orig_dst,
        own_id: own_id(w, out.listener as usize),
        peer: out.client,
        snap,
        service,
        entry,
    };
    w.left(l7.handoff(h), inbound);
}

/// The connection's span (`conn`, with its id, client and listener), made for a line logged at
/// info or above. At debug the worker runs the whole connection in the same span, and this is
/// none. (A span held for the connection's whole life at info would cost every idle connection
/// the subscriber's span record: measured, 1,792 bytes per idle relayed connection became 2,510.)
pub(crate) fn span(w: &Worker, id: u64, client: SocketAddr, listener: u16) -> tracing::Span {
    if !tracing::Span::current().is_disabled() {
        return tracing::Span::none();
    }
    let name = &w.shared.config.listeners[listener as usize].name;
    tracing::info_span!("conn", id, client = %client, listener = %name)
}

/// This proxy's own identity on `listener`: the sidecar's on the sidecar listeners, the
/// listener's certificate's on a static listener with TLS.
pub(crate) fn own_id(w: &Worker, listener: usize) -> Option<Arc<str>> {
    match w.shared.config.listeners[listener].kind {
        ListenerKind::Static(_) => w.shared.tls[listener].as_ref().and_then(|m| {
            m.current()
                .material
                .id
                .as_ref()
                .map(|i| i.to_string().into())
        }),
        _ => w.shared.sidecar_tls.as_ref().map(|s| s.id.clone()),
    }
}

/// Whether the peer of a connection accepted on `listener` is the caller (inbound, or a static
/// listener that terminates TLS).
pub(crate) fn caller_is_peer(w: &Worker, listener: usize) -> bool {
    let l = &w.shared.config.listeners[listener];
    match l.kind {
        ListenerKind::Inbound => true,
        ListenerKind::Outbound => false,
        ListenerKind::Static(_) => l
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == crate::config::TlsMode::Terminate),
    }
}

/// The address the client dialled, as the kernel reported it (sidecar listeners; a static
/// listener's clients dial the listener itself). Asked again rather than kept from the plan: only
/// the access log wants it, and every idle connection would carry it.
fn original_dst(w: &Worker, client: &TcpStream, listener: usize) -> Option<SocketAddr> {
    let l = &w.shared.config.listeners[listener];
    match l.kind {
        ListenerKind::Static(_) => None,
        _ => sys::original_dst(client.as_raw_fd(), l.address.is_ipv6()).ok(),
    }
}

/// Record a connection's end: counters, `/events`, the access log and the log line.
pub(crate) fn record(w: &Worker, snap: &ConfigSnapshot, o: &Outcome, client: &TcpStream) {
    let duration_ms = o.started.elapsed_ms();
    let dest = destination(snap, o);
    if let Some(r) = o.reason {
        w.stats().fail(r);
    }
    let tcp = &w.shared.stats.tcp;
    match (o.series, o.reason) {
        (Some(s), reason) => tcp.close(w.id, s, o.bytes_up, o.bytes_down, reason),
        (None, Some(reason)) => {
            if let Some(l) = labels(snap, o) {
                tcp.refused(w.id, l, reason);
            }
        }
        (None, None) => {}
    }
    let source = o
        .peer_id
        .as_deref()
        .map_or_else(|| o.client.to_string(), str::to_string);
    match (o.reason, &o.detail) {
        (Some(reason), Some(detail)) => {
            let _span = span(w, o.id, o.client, o.listener).entered();
            warn!(
                reason = reason.as_str(),
                direction = o.direction.as_str(),
                client = %o.client,
                peer_id = o.peer_id.as_deref().unwrap_or(""),
                destination = %dest,
                detail = %detail,
                hint = reason.hint(),
                "connection failed"
            );
            w.shared
                .events
                .push(reason, source, dest.clone(), detail.to_string());
        }
        _ => debug!(
            direction = o.direction.as_str(),
            destination = %dest,
            upstream = %o.upstream.map(|a| a.to_string()).unwrap_or_default(),
            peer_id = o.peer_id.as_deref().unwrap_or(""),
            up_bytes = o.bytes_up,
            down_bytes = o.bytes_down,
            duration_ms,
            close = o.reason.map_or("eof", |r| r.as_str()),
            "connection closed"
        ),
    }
    if let Some(log) = &w.shared.access_log {
        let listener = o.listener as usize;
        let own = own_id(w, listener);
        let (source_id, destination_id) = identities(
            caller_is_peer(w, listener),
            own.as_deref(),
            o.peer_id.as_deref(),
        );
        log.write(Line {
            kind: "tcp",
            conn_id: o.id,
            direction: o.direction.as_str(),
            mesh: o.mesh,
            client: Some(o.client),
            source_id,
            destination_id,
            original_destination: original_dst(w, client, listener),
            destination: (!dest.is_empty()).then_some(dest.as_str()),
            upstream: o.upstream,
            peer_id: o.peer_id.as_deref(),
            bytes_up: Some(o.bytes_up),
            bytes_down: Some(o.bytes_down),
            duration_ms,
            reason: o.reason.map(|r| r.as_str()),
            detail: o.detail.as_deref(),
            ..Line::default()
        });
    }
}
