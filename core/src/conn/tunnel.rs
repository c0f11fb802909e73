//! Static listeners (`ringside forward`, `[[listeners]]`): every connection goes to the listener's
//! service. Accept (the worker) -> plan (plain relay, a TLS end, or HTTP) -> connect (an endpoint,
//! chosen by the service's balancer) -> originate or terminate mTLS when the listener has TLS ->
//! relay -> end.

use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use crate::config::TlsMode;
use crate::conn::{handoff, originate_then_relay, refuse, terminate_then_relay, Outcome};
use crate::decide::plan::{L7Plan, Plan};
use crate::decide::route::Route;
use crate::io::worker::Worker;
use crate::reason::Reason;
use crate::server::ConfigSnapshot;

pub(crate) async fn serve(
    w: &Rc<Worker>,
    snap: &Arc<ConfigSnapshot>,
    client: TcpStream,
    listener: usize,
    plan: Plan,
    out: &mut Outcome,
) -> Option<TcpStream> {
    match plan {
        // Boxed: TLS state is large and only TLS listeners need it.
        Plan::Tunnel { service, mode } => {
            Box::pin(tls_end(w, snap, &client, listener, service, mode, out)).await
        }
        Plan::L7(p @ L7Plan::Static { service }) => {
            out.headed(Route::Cluster(service));
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
    out.headed(Route::Cluster(service));
    let built = w.shared.tls[listener].as_ref().map(|m| m.current());
    let route = Route::Cluster(service);
    let missing = "the listener has no TLS material for its mode";
    match mode {
        TlsMode::Terminate => match built.and_then(|b| b.server.clone()) {
            Some(cfg) => terminate_then_relay(w, snap, client, cfg, route, None, out).await,
            None => refuse(client, out, Reason::TlsHandshakeFailed, missing.into()),
        },
        TlsMode::Origin => match built.and_then(|b| b.client.clone()) {
            Some(cfg) => {
                let name = expected_name(w, listener);
                originate_then_relay(w, snap, client, cfg, &name, route, out).await
            }
            None => refuse(client, out, Reason::TlsHandshakeFailed, missing.into()),
        },
    }
}
