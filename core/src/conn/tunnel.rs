//! Static listeners (`ringside forward`, `[[listeners]]`): every connection goes to the listener's
//! service. Accept (the worker) -> plan (plain relay, a TLS end, or HTTP) -> connect (an endpoint,
//! chosen by the service's balancer) -> originate or terminate mTLS when the listener has TLS ->
//! relay -> end.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use crate::config::TlsMode;
use crate::conn::{decide, handoff, handshake, refuse, relay_plain, Outcome};
use crate::decide::plan::{L7Plan, Plan};
use crate::decide::route::Route;
use crate::io::connect::connect_to;
use crate::io::sys;
use crate::io::worker::Worker;
use crate::reason::Reason;
use crate::server::ConfigSnapshot;
use crate::tls::session;

pub(crate) async fn serve(
    w: &Rc<Worker>,
    snap: &Arc<ConfigSnapshot>,
    client: TcpStream,
    listener: usize,
    out: &mut Outcome,
) -> Option<TcpStream> {
    let Ok(plan) = decide(w, snap, &client, listener).await else {
        return Some(client);
    };
    match plan {
        Plan::Refuse { reason, detail } => refuse(&client, out, reason, detail),
        Plan::Relay(route) => relay_plain(w, snap, &client, route, out).await,
        // Boxed: TLS state is large and only TLS listeners need it.
        Plan::Tunnel { service, mode } => {
            Box::pin(tls_end(w, snap, &client, listener, service, mode, out)).await
        }
        Plan::L7(p @ L7Plan::Static { service }) => {
            out.destination.clone_from(&snap.services[service].name);
            let tunnel = l7_tunnel(w, listener);
            let entry = crate::l7::Entry::Static { tunnel };
            handoff(w, client, snap.clone(), p, entry, out);
            return None;
        }
        other => refuse(
            &client,
            out,
            Reason::UnknownDestination,
            format!("not a static-listener plan: {other:?}"),
        ),
    }
    Some(client)
}

/// The listener's TLS end, for the L7 path.
fn l7_tunnel(w: &Worker, listener: usize) -> Option<crate::l7::TunnelTls> {
    let l = &w.shared.config.listeners[listener];
    let (lt, mesh) = (l.tls.as_ref()?, w.shared.tls[listener].as_ref()?);
    let built = mesh.current();
    match lt.mode {
        TlsMode::Origin => built
            .client_http
            .clone()
            .map(|cfg| crate::l7::TunnelTls::Origin {
                cfg,
                name: expected_name(w, listener).into(),
            }),
        TlsMode::Terminate => built
            .server
            .clone()
            .map(|cfg| crate::l7::TunnelTls::Terminate { cfg }),
    }
}

/// The server name a tunnel's origin end sends: the expected identity's service, or a fixed name
/// when any identity from the bundle is accepted.
fn expected_name(w: &Worker, listener: usize) -> String {
    w.shared.config.listeners[listener]
        .tls
        .as_ref()
        .and_then(|t| t.expect_id.as_ref())
        .map_or_else(|| "ringside-mesh".to_string(), |i| i.service.clone())
}

/// A TLS end: terminate (handshake with the client, then connect) or originate (connect, then
/// handshake with the upstream), then relay plaintext <-> TLS.
async fn tls_end(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    listener: usize,
    service: usize,
    mode: TlsMode,
    out: &mut Outcome,
) {
    out.destination.clone_from(&snap.services[service].name);
    out.mesh = true;
    let Some(mesh) = w.shared.tls[listener].clone() else {
        return refuse(
            client,
            out,
            Reason::TlsHandshakeFailed,
            "no TLS material".into(),
        );
    };
    let built = mesh.current();
    let cfd = client.as_raw_fd();
    if let Err(e) = sys::set_nonblocking(cfd) {
        return refuse(client, out, Reason::DownstreamReset, e.to_string());
    }
    let route = Route::Cluster(service);
    match mode {
        TlsMode::Terminate => {
            let Some(cfg) = built.server.clone() else {
                return refuse(
                    client,
                    out,
                    Reason::TlsHandshakeFailed,
                    "no server config".into(),
                );
            };
            let conn = match session::server(cfg) {
                Ok(s) => handshake(s, client, false).await,
                Err(e) => Err(e),
            };
            let conn = match conn {
                Ok(c) => c,
                Err((reason, detail)) => return refuse(client, out, reason, detail),
            };
            out.peer_id = session::peer_id(&conn.borrow()).map(|i| i.to_string());
            let up = match connect_to(w, snap, route).await {
                Ok(up) => up,
                Err(f) => {
                    let (reason, detail) = f.detail();
                    return refuse(client, out, reason, detail);
                }
            };
            out.upstream = Some(up.addr);
            sys::set_nodelay(cfd);
            let end =
                crate::io::tls_relay::relay(&w.relay_ctx(), &up.stream, client, &conn, false).await;
            out.relayed_tls(end, false);
        }
        TlsMode::Origin => {
            let up = match connect_to(w, snap, route).await {
                Ok(up) => up,
                Err(f) => {
                    let (reason, detail) = f.detail();
                    return refuse(client, out, reason, detail);
                }
            };
            out.upstream = Some(up.addr);
            let Some(cfg) = built.client.clone() else {
                return refuse(
                    client,
                    out,
                    Reason::TlsHandshakeFailed,
                    "no client config".into(),
                );
            };
            let conn = match session::client(cfg, &expected_name(w, listener)) {
                Ok(s) => handshake(s, &up.stream, true).await,
                Err(e) => Err(e),
            };
            let conn = match conn {
                Ok(c) => c,
                Err((reason, detail)) => return refuse(client, out, reason, detail),
            };
            out.peer_id = session::peer_id(&conn.borrow()).map(|i| i.to_string());
            sys::set_nodelay(cfd);
            let end =
                crate::io::tls_relay::relay(&w.relay_ctx(), client, &up.stream, &conn, true).await;
            out.relayed_tls(end, true);
        }
    }
}
