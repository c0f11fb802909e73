//! The sidecar's mesh mTLS: outbound connections to mesh services are originated as mTLS with the
//! destination service's expected SPIFFE ID; inbound connections are sniffed (TLS or plaintext),
//! TLS is terminated with the local service's intentions deciding who may call it, plaintext is
//! refused in strict mode and passed through (spliced) in permissive mode.

use std::cell::RefCell;
use std::io::ErrorKind;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use tracing::{debug, warn};

use crate::config::{ListenerKind, MtlsDoc, MtlsMode, Service, ServiceMtls};
use crate::intentions::Intentions;
use crate::reason::Reason;
use crate::relay::{relay, RelayCtx};
use crate::route::Route;
use crate::server::ConfigSnapshot;
use crate::sys;
use crate::tls::{Expect, IntentionAuthorizer, MeshTls, TlsFiles, TlsRole};
use crate::tls_relay::handshake;
use crate::worker::{connect_to, decide_route, Worker};

/// How long an inbound connection may stay silent before permissive mode takes it as plaintext
/// (a server-first protocol never sends first).
const DETECT_PERMISSIVE: Duration = Duration::from_millis(300);
/// How long strict mode waits for a TLS ClientHello.
const DETECT_STRICT: Duration = Duration::from_secs(5);

/// The sidecar's TLS material, one config per role.
#[derive(Debug)]
pub struct SidecarTls {
    /// Strict or permissive.
    pub mode: MtlsMode,
    /// Outbound: one client config for every destination (expected identity from the server name).
    pub outbound: Arc<MeshTls>,
    /// The certificate files (inbound configs per local service are built from them).
    pub files: TlsFiles,
}

impl SidecarTls {
    /// Load the sidecar's certificate; its SPIFFE ID gives the mesh's trust domain and namespace.
    pub fn load(m: &MtlsDoc) -> anyhow::Result<SidecarTls> {
        let files = TlsFiles {
            cert: m.cert.clone(),
            key: m.key.clone(),
            ca: m.ca.clone(),
        };
        let material = crate::tls::Material::load(&files)?;
        let id = material.id.clone().ok_or_else(|| {
            anyhow::anyhow!(
                "{}: the certificate has no SPIFFE ID (URI SAN spiffe://<trust-domain>/ns/<ns>/sa/<service>)",
                files.cert.display()
            )
        })?;
        let outbound = MeshTls::load(
            files.clone(),
            TlsRole::Origin {
                expect: Expect::ByServerName {
                    trust_domain: id.trust_domain.clone(),
                    namespace: id.namespace.clone(),
                },
            },
        )?;
        tracing::info!(identity = %id, mode = ?m.mode, "sidecar mTLS on");
        Ok(SidecarTls {
            mode: m.mode,
            outbound,
            files,
        })
    }

    /// Inbound TLS per service (same order as `services`): for each local mesh service a server
    /// config whose client verifier asks that service's intentions.
    pub fn inbound_for(
        &self,
        services: &[Service],
        intentions: &Arc<Intentions>,
    ) -> Result<Vec<Option<Arc<MeshTls>>>, crate::tls::TlsError> {
        services
            .iter()
            .map(|s| {
                if s.local && s.subset.is_none() && s.mtls == ServiceMtls::Enable {
                    MeshTls::load(
                        self.files.clone(),
                        TlsRole::Terminate {
                            authorizer: Arc::new(IntentionAuthorizer {
                                intentions: intentions.clone(),
                                destination: s.name.clone(),
                            }),
                        },
                    )
                    .map(Some)
                } else {
                    Ok(None)
                }
            })
            .collect()
    }
}

/// The route, when this connection goes through the mesh mTLS path.
pub(crate) fn wants_mesh(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    listener: usize,
) -> Option<Route> {
    let kind = w.shared.config.listeners[listener].kind;
    let route = decide_route(w, snap, client.as_raw_fd(), listener).ok()?;
    let services = &snap.services;
    match (kind, route) {
        (ListenerKind::Outbound, Route::Cluster(i)) if services[i].mtls == ServiceMtls::Enable => {
            Some(route)
        }
        (ListenerKind::Inbound, Route::Local { service, .. }) => match service {
            Some(i) if services[i].mtls == ServiceMtls::Disable => None,
            _ => Some(route),
        },
        _ => None,
    }
}

/// What the mesh path did.
struct Served {
    upstream: SocketAddr,
    peer_id: Option<String>,
    up_bytes: u64,
    down_bytes: u64,
    failure: Option<(Reason, Option<String>)>,
}

/// A mesh connection: originate or terminate mTLS (or take permissive plaintext), then relay.
pub(crate) async fn handle(
    w: &Worker,
    snap: &ConfigSnapshot,
    client: &TcpStream,
    peer: SocketAddr,
    listener: usize,
    route: Route,
) {
    let start = Instant::now();
    let cfd = client.as_raw_fd();
    let st = w
        .shared
        .sidecar_tls
        .as_ref()
        .expect("mesh path needs sidecar mTLS");
    let kind = w.shared.config.listeners[listener].kind;
    let ctx = RelayCtx {
        pools: &w.pools,
        stats: w.stats(),
        mode: w.shared.config.proxy.copy_mode,
        idle_timeout: w.shared.config.proxy.idle_timeout,
    };
    let fail = |reason: Reason, detail: String| (reason, detail);
    let result: Result<Served, (Reason, String)> = async {
        sys::set_nonblocking(cfd).map_err(|e| fail(Reason::DownstreamReset, e.to_string()))?;
        let connect = |route| async move {
            connect_to(w, snap, route).await.map_err(|f| {
                fail(
                    f.reason,
                    f.hint.unwrap_or_else(|| f.reason.hint().to_string()),
                )
            })
        };
        if kind == ListenerKind::Outbound {
            let Route::Cluster(i) = route else {
                unreachable!("outbound mesh routes are clusters")
            };
            let service = &snap.services[i].name;
            let up = connect(route).await?;
            let name = rustls::pki_types::ServerName::try_from(service.clone()).map_err(|_| {
                fail(
                    Reason::TlsHandshakeFailed,
                    format!("service name '{service}' is not a valid TLS server name"),
                )
            })?;
            let cfg = st.outbound.current().client.clone().expect("origin config");
            let conn = rustls::ClientConnection::new(cfg, name)
                .map_err(|e| fail(Reason::TlsHandshakeFailed, e.to_string()))?;
            let conn = RefCell::new(rustls::Connection::Client(conn));
            handshake(&conn, &up.stream)
                .await
                .map_err(|f| fail(f.reason(true), f.to_string()))?;
            sys::set_nodelay(cfd);
            let end = crate::tls_relay::relay(&ctx, client, &up.stream, &conn, true).await;
            return Ok(Served {
                upstream: up.addr,
                peer_id: Some(format!("{service} (verified)")),
                up_bytes: end.sealed,
                down_bytes: end.opened,
                failure: end.failure.map(|(r, e)| (r, e.map(|e| e.to_string()))),
            });
        }
        // Inbound: TLS or plaintext?
        let Route::Local { service, .. } = route else {
            unreachable!("inbound mesh routes are local")
        };
        let wait = match st.mode {
            MtlsMode::Strict => DETECT_STRICT,
            MtlsMode::Permissive => DETECT_PERMISSIVE,
        };
        let is_tls = detect_tls(client, wait)
            .await
            .map_err(|e| fail(Reason::DownstreamReset, e.to_string()))?;
        if !is_tls {
            if st.mode == MtlsMode::Strict {
                return Err(fail(
                    Reason::PlaintextRejected,
                    "plaintext arrived at a strict mTLS sidecar".into(),
                ));
            }
            let up = connect(route).await?;
            sys::set_nodelay(cfd);
            let end = relay(ctx, client, &up.stream).await;
            return Ok(Served {
                upstream: up.addr,
                peer_id: None,
                up_bytes: end.up_bytes,
                down_bytes: end.down_bytes,
                failure: end.reason.map(|r| (r, None)),
            });
        }
        let Some(mesh) = service.and_then(|i| snap.inbound_tls[i].clone()) else {
            return Err(fail(
                Reason::UnknownDestination,
                "mesh TLS arrived for a port that is not a local mesh service".into(),
            ));
        };
        let cfg = mesh.current().server.clone().expect("terminate config");
        let conn = rustls::ServerConnection::new(cfg)
            .map_err(|e| fail(Reason::TlsHandshakeFailed, e.to_string()))?;
        let conn = RefCell::new(rustls::Connection::Server(conn));
        handshake(&conn, client)
            .await
            .map_err(|f| fail(f.reason(false), f.to_string()))?;
        let peer_id = conn
            .borrow()
            .peer_certificates()
            .and_then(|c| c.first().and_then(|c| crate::tls::spiffe_of(c)))
            .map(|i| i.to_string());
        let up = connect(route).await?;
        sys::set_nodelay(cfd);
        let end = crate::tls_relay::relay(&ctx, &up.stream, client, &conn, false).await;
        Ok(Served {
            upstream: up.addr,
            peer_id,
            up_bytes: end.opened,
            down_bytes: end.sealed,
            failure: end.failure.map(|(r, e)| (r, e.map(|e| e.to_string()))),
        })
    }
    .await;
    match result {
        Err((reason, detail)) => {
            w.stats().fail(reason);
            warn!(reason = reason.as_str(), client = %peer, detail = %detail, hint = reason.hint(), "connection failed");
            let destination = match route {
                Route::Cluster(i)
                | Route::Local {
                    service: Some(i), ..
                } => snap.services[i].name.clone(),
                Route::Local { port, .. } => format!("port {port}"),
                Route::Passthrough(a) => a.to_string(),
                Route::Refuse(_) => String::new(),
            };
            if let Some(log) = &w.shared.access_log {
                log.write(serde_json::json!({
                    "kind": "tcp", "mesh": true, "client": peer.to_string(), "destination": destination,
                    "reason": reason.as_str(), "detail": detail,
                    "duration_ms": start.elapsed().as_millis() as u64,
                }));
            }
            w.shared
                .events
                .push(reason, peer.to_string(), destination, detail.clone());
            sys::close_after_failure(cfd, reason);
        }
        Ok(s) => {
            if let Some((reason, err)) = &s.failure {
                w.stats().fail(*reason);
                if let Some(err) = err {
                    warn!(reason = reason.as_str(), client = %peer, detail = %err, hint = reason.hint(), "connection failed");
                }
            }
            debug!(
                upstream = %s.upstream,
                peer_id = s.peer_id.as_deref().unwrap_or(""),
                up_bytes = s.up_bytes,
                down_bytes = s.down_bytes,
                duration_ms = start.elapsed().as_millis() as u64,
                                close = s.failure.as_ref().map_or("eof", |(r, _)| r.as_str()),
                "connection closed"
            );
            if let Some(log) = &w.shared.access_log {
                log.write(serde_json::json!({
                    "kind": "tcp", "mesh": true, "client": peer.to_string(),
                    "upstream": s.upstream.to_string(), "peer_id": s.peer_id,
                    "bytes_up": s.up_bytes, "bytes_down": s.down_bytes,
                    "duration_ms": start.elapsed().as_millis() as u64,
                    "reason": s.failure.as_ref().map(|(r, _)| r.as_str()),
                }));
            }
        }
    }
}

/// Whether the client speaks TLS: its first byte is a TLS handshake record (0x16). Silence for
/// `wait` (a server-first protocol) or EOF counts as plaintext.
async fn detect_tls(client: &TcpStream, wait: Duration) -> std::io::Result<bool> {
    match monoio::time::timeout(wait, client.readable(false)).await {
        Err(_) => return Ok(false),
        Ok(r) => r?,
    }
    let mut b = [0u8; 1];
    match sys::peek(client.as_raw_fd(), &mut b) {
        Ok(1) => Ok(b[0] == 0x16),
        Ok(_) => Ok(false),
        Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}
