//! Outbound: an application in the pod calls something, and the kernel redirected the connection
//! to 15001. Accept (the worker) -> plan (original destination; the service's declared protocol,
//! or the first bytes of an undeclared one) -> connect (an endpoint of the service, or the original
//! destination) -> originate mesh mTLS when the service is in the mesh -> relay -> end.

use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

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
        return Some(client); // gone before saying anything
    };
    match plan {
        Plan::Refuse { reason, detail } => refuse(&client, out, reason, detail),
        Plan::Relay(route) => relay_plain(w, snap, &client, route, out).await,
        // Boxed: TLS state is large and only mesh connections need it.
        Plan::Originate { service } => Box::pin(originate(w, snap, &client, service, out)).await,
        Plan::L7(p @ L7Plan::Outbound { service, mesh }) => {
            out.destination.clone_from(&snap.services[service].name);
            let entry = crate::l7::Entry::Outbound { mesh };
            handoff(w, client, snap.clone(), p, entry, out);
            return None;
        }
        other => refuse(
            &client,
            out,
            Reason::UnknownDestination,
            format!("not an outbound plan: {other:?}"),
        ),
    }
    Some(client)
}

/// Connect to an endpoint of `service`, originate mTLS (the server must prove it is that service),
/// relay plaintext <-> TLS.
async fn originate(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    service: usize,
    out: &mut Outcome,
) {
    let name = &snap.services[service].name;
    out.destination.clone_from(name);
    out.mesh = true;
    let Some(st) = &w.shared.sidecar_tls else {
        return refuse(
            client,
            out,
            Reason::TlsHandshakeFailed,
            "no mesh TLS".into(),
        );
    };
    let cfd = std::os::fd::AsRawFd::as_raw_fd(client);
    if let Err(e) = sys::set_nonblocking(cfd) {
        return refuse(client, out, Reason::DownstreamReset, e.to_string());
    }
    let up = match connect_to(w, snap, Route::Cluster(service)).await {
        Ok(up) => up,
        Err(f) => {
            let (reason, detail) = f.detail();
            return refuse(client, out, reason, detail);
        }
    };
    out.upstream = Some(up.addr);
    let cfg = match st.outbound.current().client.clone() {
        Some(cfg) => cfg,
        None => {
            return refuse(
                client,
                out,
                Reason::TlsHandshakeFailed,
                "no client config".into(),
            )
        }
    };
    let conn = match session::client(cfg, name) {
        Ok(s) => handshake(s, &up.stream, true).await,
        Err(e) => Err(e),
    };
    let conn = match conn {
        Ok(c) => c,
        Err((reason, detail)) => return refuse(client, out, reason, detail),
    };
    out.peer_id = session::peer_id(&conn.borrow()).map(|i| i.to_string());
    sys::set_nodelay(cfd);
    let end = crate::io::tls_relay::relay(&w.relay_ctx(), client, &up.stream, &conn, true).await;
    out.relayed_tls(end, true);
}
