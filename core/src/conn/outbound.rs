//! Outbound: an application in the pod calls something, and the kernel redirected the connection
//! to 15001. Accept (the worker) -> plan (original destination; the service's declared protocol,
//! or the first bytes of an undeclared one) -> connect (an endpoint of the service, or the original
//! destination) -> originate mesh mTLS when the service is in the mesh -> relay -> end.

use std::rc::Rc;
use std::sync::Arc;

use monoio::net::TcpStream;

use crate::conn::{handoff, originate_then_relay, refuse, Outcome};
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
        Plan::Originate { service } => Box::pin(originate(w, snap, &client, service, out)).await,
        Plan::L7(p @ L7Plan::Outbound { service, mesh }) => {
            out.headed(Route::Cluster(service));
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
    // A service with no usable endpoint fails over (ServiceResolver) before the handshake: the
    // server must prove it is the service actually connected to.
    let service = snap.fail_over(service, std::time::Instant::now());
    let name = &snap.services[service].name;
    out.headed(Route::Cluster(service));
    let Some(cfg) = w
        .shared
        .sidecar_tls
        .as_ref()
        .and_then(|st| st.outbound.current().client.clone())
    else {
        return refuse(
            client,
            out,
            Reason::TlsHandshakeFailed,
            "no mesh TLS".into(),
        );
    };
    originate_then_relay(w, snap, client, cfg, name, Route::Cluster(service), out).await
}
