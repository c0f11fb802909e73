//! Inbound: a caller reaches the pod's application, and the kernel redirected the connection to
//! 15006. Accept (the worker) -> plan (original port = which local service; the first bytes say
//! mesh TLS or plaintext; the service's own declaration says L4 or L7, never the caller's ALPN)
//! -> terminate mTLS (the verifier asks the intentions) -> connect the local app on its
//! `targetPort` -> relay -> end. HTTP services go to the L7 path, which checks every request.

use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use crate::conn::{handoff, refuse, terminate_then_relay, Outcome};
use crate::decide::plan::{L7Plan, Plan};
use crate::decide::route::Route;
use crate::io::worker::Worker;
use crate::reason::Reason;
use crate::server::ConfigSnapshot;

pub(crate) async fn serve(
    w: &Rc<Worker>,
    snap: &Arc<ConfigSnapshot>,
    client: TcpStream,
    plan: Plan,
    out: &mut Outcome,
) -> Option<TcpStream> {
    match plan {
        // Boxed: TLS state is large and only mesh connections need it.
        Plan::Terminate { service, app } => {
            Box::pin(terminate(w, snap, &client, service, app, out)).await
        }
        Plan::L7(
            p @ L7Plan::Inbound {
                service,
                port,
                pod_ip,
                tls,
            },
        ) => {
            out.headed(Route::Cluster(service));
            let cfg = match tls {
                false => None,
                true => match snap.inbound_tls[service]
                    .l7
                    .as_ref()
                    .and_then(|m| m.current().server.clone())
                {
                    Some(cfg) => Some(cfg),
                    None => {
                        refuse(
                            &client,
                            out,
                            Reason::TlsHandshakeFailed,
                            "no inbound L7 TLS config for this service".into(),
                        );
                        return Some(client);
                    }
                },
            };
            let entry = crate::l7::Entry::Inbound {
                tls: cfg,
                port,
                pod_ip,
            };
            handoff(w, client, snap.clone(), p, entry, out);
            return None;
        }
        other => refuse(
            &client,
            out,
            Reason::UnknownDestination,
            format!("not an inbound plan: {other:?}"),
        ),
    }
    Some(client)
}

/// Terminate mesh mTLS for a local TCP service (the handshake fails with `access_denied` when no
/// intention allows the caller, or when the allowing intention has L7 permissions), then connect
/// the app and relay.
async fn terminate(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    service: usize,
    app: Route,
    out: &mut Outcome,
) {
    out.headed(app);
    let Some(cfg) = snap.inbound_tls[service]
        .l4
        .as_ref()
        .and_then(|m| m.current().server.clone())
    else {
        return refuse(
            client,
            out,
            Reason::TlsHandshakeFailed,
            "no inbound TLS config for this service".into(),
        );
    };
    let name = &snap.services[service].name;
    terminate_then_relay(w, snap, client, cfg, app, Some(name), out).await
}
