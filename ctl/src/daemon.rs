//! `ringctl daemon`: the control daemon's HTTP/JSON API on a Unix socket. The CLI is authorized by
//! the socket's file permissions (0660: root and the socket's group).
//!
//! - `POST /v1/apply` (body: YAML documents): checked whole, stored in one transaction.
//! - `GET /v1/config`: every stored document. `DELETE /v1/config/<Kind>/<name>`.
//! - `GET /v1/intentions/check?source=S&destination=D`: allow or deny, and the deciding rule.
//! - `GET /v1/index`: the configuration index.
//!
//! The state is in a [`Store`]: the embedded one in `--data-dir` (the default), or etcd
//! (`--store etcd://...`), shared with the other daemons pointed at it; the daemon then follows
//! the configuration index in etcd, so its proxies' long-polls answer changes made through any
//! daemon. The CA stays in files under `--data-dir` with either store.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use ringside_core::control::api::{
    ApplyResponse, CaStatus, CatalogService, CertRotateResponse, DeleteResponse, EndpointRecord,
    ErrorBody, IndexResponse, IntentionCheck, IntentionList, IntentionRow, ProxyConfig,
    ProxyReport, ProxyStatus, RegisterService, ReportAck, SignResponse, TokenRequest,
    TokenResponse,
};
use ringside_core::control::AnswerError;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::consul;
use crate::store::{EtcdOptions, Store};

/// Default API socket (operators; authorized by its file permissions).
pub const DEFAULT_SOCKET: &str = "/run/ringside/ctl.sock";
/// Default proxy socket (proxies; every request carries a proxy token).
pub const DEFAULT_PROXY_SOCKET: &str = "/run/ringside/proxy.sock";
/// The longest a proxy's config watch is held open.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(60);
/// A proxy that has not reported for this long is not counted as live (they report at least
/// every 10 s).
pub const LIVE_FOR_SECS: i64 = 30;

/// What the daemon serves from.
#[derive(Debug)]
pub struct State {
    /// The store.
    pub store: Store,
    /// The certificate authority and its roots.
    pub ca: std::sync::RwLock<crate::ca::Authority>,
    /// Virtual IP range (network, prefix length).
    pub vip_range: (std::net::Ipv4Addr, u8),
    /// Lifetime of issued leaf certificates.
    pub leaf_lifetime: std::time::Duration,
    /// The configuration index, for proxies watching it.
    pub changed: tokio::sync::watch::Sender<u64>,
}

impl State {
    /// Tell watching proxies that the index moved (it never goes back: a late read of an older
    /// index changes nothing).
    async fn notify(&self) {
        if let Ok(i) = self.store.index().await {
            crate::store::advance_index(&self.changed, i);
        }
    }
}

/// Which store the daemon keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded store in the data directory (one daemon).
    Redb,
    /// etcd, shared by every daemon pointed at it.
    Etcd(EtcdOptions),
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of the CA, and of the store when it is the embedded one.
    pub data_dir: PathBuf,
    /// Where the state is kept.
    pub store: StoreChoice,
    /// Operator API socket.
    pub socket: PathBuf,
    /// Proxy API socket.
    pub proxy_socket: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Virtual IP range.
    pub vip_range: (std::net::Ipv4Addr, u8),
    /// Leaf lifetime.
    pub leaf_lifetime: std::time::Duration,
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(o: &Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The etcd client's connections are tasks of this runtime: it is made inside it.
        let store = match &o.store {
            StoreChoice::Redb => Store::open_redb(&o.data_dir)?,
            StoreChoice::Etcd(etcd) => Store::connect_etcd(etcd).await?,
        };
        let ca = crate::ca::Authority::open(&o.data_dir.join("ca"), &o.trust_domain)?;
        let index = store.index().await?;
        let state = Arc::new(State {
            store,
            ca: std::sync::RwLock::new(ca),
            vip_range: o.vip_range,
            leaf_lifetime: o.leaf_lifetime,
            changed: tokio::sync::watch::Sender::new(index),
        });
        let follower = {
            let state = state.clone();
            tokio::spawn(async move { state.store.follow_index(&state.changed).await })
        };
        let served = serve(state, o.socket.clone(), o.proxy_socket.clone()).await;
        follower.abort();
        served
    })
}

fn bind(socket: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed daemon is stale: nothing accepts on it.
    if socket.exists() && std::os::unix::net::UnixStream::connect(socket).is_err() {
        std::fs::remove_file(socket)?;
    }
    let listener = tokio::net::UnixListener::bind(socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e} (is another ringctl daemon running?)",
            socket.display()
        )
    })?;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

async fn serve(state: Arc<State>, socket: PathBuf, proxy_socket: PathBuf) -> anyhow::Result<()> {
    let admin = bind(&socket, 0o660)?;
    // Any local process may connect; every request must carry a proxy token.
    let proxies = bind(&proxy_socket, 0o666)?;
    eprintln!(
        "ringctl daemon: listening on {} (operators) and {} (proxies), store {}, config index {}",
        socket.display(),
        proxy_socket.display(),
        state.store.describe(),
        state.store.index().await?
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, for_proxies) = tokio::select! {
            r = admin.accept() => (r?.0, false),
            r = proxies.accept() => (r?.0, true),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let state = state.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move {
                    if for_proxies {
                        handle_proxy(req, state).await
                    } else {
                        handle(req, state).await
                    }
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&proxy_socket);
    Ok(())
}

fn query_param(query: &str, k: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(a, _)| *a == k)
        .map(|(_, v)| v.to_string())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The certificate generation a service's leaves must have: bumped for every service by a CA
/// rollover or `cert rotate`, for one by `cert rotate --service`.
async fn cert_generation(store: &Store, service: &str) -> Result<u64, crate::store::StoreError> {
    Ok(store.meta("certgen").await? + store.meta(&format!("certgen/{service}")).await?)
}

/// Everything a proxy of `service` needs: the catalog, the intentions, the trust bundle and the
/// certificate generation, at the current index.
pub async fn proxy_config(state: &State, service: &str) -> Result<ProxyConfig, String> {
    let store = &state.store;
    // The index is read first: what follows is at least as new as it says.
    let index = store.index().await.map_err(|e| e.to_string())?;
    let docs = store.typed().await.map_err(|e| e.to_string())?;
    let services = store.services().await.map_err(|e| e.to_string())?;
    let endpoints = store.endpoints().await.map_err(|e| e.to_string())?;
    let cert_generation = cert_generation(store, service)
        .await
        .map_err(|e| e.to_string())?;
    let intentions = ringside_core::intentions::Intentions {
        rules: consul::intentions(&docs),
        default: ringside_core::intentions::Action::Deny,
    };
    let catalog: Vec<CatalogService> = services
        .iter()
        .map(|s| {
            let healthy: Vec<&EndpointRecord> = endpoints
                .iter()
                .filter(|e| e.service == s.name && e.healthy)
                .collect();
            CatalogService {
                name: s.name.clone(),
                virtual_ip: s.virtual_ip.into(),
                ports: s.ports.clone(),
                endpoints: healthy.iter().map(|e| e.address).collect(),
                protocol: consul::protocol_of(&docs, &s.name).map(|p| p.as_str().to_string()),
                endpoint_meta: healthy.iter().map(|e| e.meta.clone()).collect(),
            }
        })
        .collect();
    let (bundle, trust_domain) = {
        let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
        (ca.bundle(), ca.signer().trust_domain.clone())
    };
    Ok(ProxyConfig {
        index,
        service: service.to_string(),
        trust_domain,
        services: catalog,
        intentions,
        l7: consul::l7_config(&docs),
        bundle,
        cert_generation,
    })
}

/// The service of the request's proxy token (`Authorization: Bearer`), or the error answer.
#[allow(clippy::result_large_err)] // the error is the answer itself, sent once
async fn token_service(
    req: &Request<Incoming>,
    store: &Store,
) -> Result<String, Response<Full<Bytes>>> {
    let Some(hash) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(token_hash)
    else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "a proxy token is required (Authorization: Bearer)",
        ));
    };
    match store.token_service(&hash).await {
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Ok(None) => Err(error(StatusCode::FORBIDDEN, "unknown token")),
        Ok(Some(s)) => Ok(s),
    }
}

/// The proxy API: config watch, certificate signing, reports. Every request carries a token.
async fn handle_proxy(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let store = &state.store;
    let service = match token_service(&req, store).await {
        Ok(s) => s,
        Err(r) => return Ok(r),
    };
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let resp = match (method, path.as_str()) {
        (Method::GET, "/v1/proxy/config") => {
            let after: u64 = query_param(&query, "index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let wait = query_param(&query, "wait")
                .and_then(|v| v.parse().ok())
                .map(std::time::Duration::from_secs)
                .unwrap_or_default()
                .min(MAX_WAIT);
            let mut rx = state.changed.subscribe();
            // Long-poll: answer once the index passes `after`, or at `wait` with what there is.
            let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > after)).await;
            match proxy_config(&state, &service).await {
                Ok(c) => json(StatusCode::OK, &c),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::POST, "/v1/proxy/sign") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e)),
            };
            sign(&state, &service, &String::from_utf8_lossy(&body)).await
        }
        (Method::POST, "/v1/proxy/report") => match body_json::<ProxyReport>(req).await {
            Err(r) => r,
            Ok(mut report) => {
                report.service = service.clone();
                let rec = crate::store::ProxyRecord {
                    report,
                    last_seen: unix_now(),
                };
                let node = rec.report.id.clone();
                match store.report_proxy(&rec, &node).await {
                    Ok(changed) => {
                        if changed {
                            state.notify().await;
                        }
                        json(StatusCode::OK, &ReportAck { ok: true })
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                }
            }
        },
        (m, p) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {m} {p}")),
    };
    Ok(resp)
}

async fn sign(state: &State, service: &str, csr: &str) -> Response<Full<Bytes>> {
    let generation = match cert_generation(&state.store, service).await {
        Ok(g) => g,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
    match ca
        .signer()
        .sign_csr(csr, "default", service, state.leaf_lifetime)
    {
        Ok(cert) => json(
            StatusCode::OK,
            &SignResponse {
                service: service.to_string(),
                cert,
                bundle: ca.bundle(),
                cert_generation: generation,
            },
        ),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// An answer with a JSON body (one of [`ringside_core::control::api`]'s, or stored documents).
fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let text = match serde_json::to_string(body) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the answer: {e}"),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A refusal: `status` with an [`ErrorBody`].
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: message.to_string(),
        },
    )
}

/// Hex SHA-256 of a token: only hashes are stored.
pub fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn body_json<T: DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = req
        .into_body()
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, e))?
        .to_bytes();
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let store = &state.store;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let resp = match (method, path.as_str()) {
        (Method::POST, "/v1/apply") => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e)),
            };
            let text = String::from_utf8_lossy(&body);
            match consul::parse(&text) {
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e}; nothing applied")),
                Ok(docs) => match store.apply(&docs).await {
                    Ok(index) => {
                        state.notify().await;
                        json(
                            StatusCode::OK,
                            &ApplyResponse {
                                applied: docs.iter().map(|d| d.id()).collect(),
                                index,
                            },
                        )
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                },
            }
        }
        (Method::GET, "/v1/config") => match store.documents().await {
            // The stored documents are the operators' own (YAML made JSON): passed on untyped.
            Ok(d) => json(StatusCode::OK, &d),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::GET, "/v1/intentions") => match store.typed().await {
            Ok(docs) => {
                let set = ringside_core::intentions::Intentions {
                    rules: consul::intentions(&docs),
                    default: ringside_core::intentions::Action::Deny,
                };
                let list = IntentionList {
                    rules: set
                        .rules
                        .into_iter()
                        .map(|r| IntentionRow {
                            precedence: r.precedence(),
                            intention: r,
                        })
                        .collect(),
                    default: set.default,
                };
                json(StatusCode::OK, &list)
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::GET, "/v1/index") => match store.index().await {
            Ok(index) => json(StatusCode::OK, &IndexResponse { index }),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::DELETE, p) if p.starts_with("/v1/config/") => {
            let id = &p["/v1/config/".len()..];
            match store.delete(id).await {
                Ok(true) => {
                    state.notify().await;
                    json(
                        StatusCode::OK,
                        &DeleteResponse {
                            deleted: id.to_string(),
                        },
                    )
                }
                Ok(false) => error(StatusCode::NOT_FOUND, format!("{id} is not stored")),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::GET, "/v1/intentions/check") => {
            let param = |k: &str| {
                query
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(a, _)| *a == k)
                    .map(|(_, v)| v.to_string())
            };
            match (param("source"), param("destination")) {
                (Some(src), Some(dst)) => match store.typed().await {
                    Ok(docs) => {
                        let set = ringside_core::intentions::Intentions {
                            rules: consul::intentions(&docs),
                            default: ringside_core::intentions::Action::Deny,
                        };
                        let d = set.evaluate(&src, &dst);
                        json(
                            StatusCode::OK,
                            &IntentionCheck {
                                allowed: d.allowed(),
                                decided_by: d.explain(),
                            },
                        )
                    }
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                },
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "source and destination are required",
                ),
            }
        }
        (Method::POST, "/v1/services") => match body_json::<RegisterService>(req).await {
            Err(r) => r,
            Ok(r) => match store
                .register_service(&r.name, r.ports, state.vip_range)
                .await
            {
                Ok(s) => {
                    state.notify().await;
                    json(StatusCode::OK, &s)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::GET, "/v1/services") => match store.services().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::POST, "/v1/endpoints") => match body_json::<EndpointRecord>(req).await {
            Err(r) => r,
            Ok(ep) => match store.register_endpoint(&ep).await {
                Ok(()) => {
                    state.notify().await;
                    json(StatusCode::OK, &ep)
                }
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::GET, "/v1/endpoints") => match store.endpoints().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::POST, "/v1/tokens") => match body_json::<TokenRequest>(req).await {
            Err(r) => r,
            Ok(r) => {
                let mut raw = [0u8; 32];
                match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw) {
                    Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"),
                    Ok(()) => {
                        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                        match store.add_token(&token_hash(&token), &r.service).await {
                            Ok(()) => json(
                                StatusCode::OK,
                                &TokenResponse {
                                    service: r.service,
                                    token,
                                },
                            ),
                            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                        }
                    }
                }
            }
        },
        (Method::POST, "/v1/sign") => {
            let service = match token_service(&req, store).await {
                Ok(s) => s,
                Err(r) => return Ok(r),
            };
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e)),
            };
            sign(&state, &service, &String::from_utf8_lossy(&body)).await
        }
        (Method::GET, "/v1/proxies") => match store.proxies().await {
            Ok(list) => {
                let now = unix_now();
                let rows: Vec<ProxyStatus> = list
                    .into_iter()
                    .map(|p| ProxyStatus {
                        live: now - p.last_seen <= LIVE_FOR_SECS,
                        cert_expires_in_s: p.report.cert_not_after - now,
                        last_seen: p.last_seen,
                        report: p.report,
                    })
                    .collect();
                json(StatusCode::OK, &rows)
            }
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::POST, "/v1/certs/rotate") => {
            let key = match query_param(&query, "service") {
                Some(s) => format!("certgen/{s}"),
                None => "certgen".to_string(),
            };
            match store.bump_meta(&key).await {
                Ok(_) => {
                    state.notify().await;
                    let index = store.index().await.unwrap_or(0);
                    json(
                        StatusCode::OK,
                        &CertRotateResponse {
                            rotated: query_param(&query, "service").unwrap_or_else(|| "*".into()),
                            index,
                        },
                    )
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (Method::GET, "/v1/ca") => {
            let generation = store.meta("certgen").await.unwrap_or(0);
            let index = store.index().await.unwrap_or(0);
            let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
            json(
                StatusCode::OK,
                &CaStatus {
                    phase: ca.phase(),
                    roots: ca.state().clone(),
                    bundle: Some(ca.bundle()),
                    generation,
                    index,
                },
            )
        }
        (Method::POST, "/v1/ca/rotate") => {
            // One rollover step; moving to "the new root signs" re-issues every leaf.
            let step = {
                let mut ca = state.ca.write().unwrap_or_else(|p| p.into_inner());
                ca.advance().map_err(|e| e.to_string())
            };
            let bumped = match step {
                Ok(crate::ca::RotationPhase::NewSigning) => {
                    store.bump_meta("certgen").await.map(|_| ())
                }
                Ok(_) => store.bump_index().await.map(|_| ()),
                Err(e) => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
            };
            match bumped {
                Ok(()) => {
                    state.notify().await;
                    let generation = store.meta("certgen").await.unwrap_or(0);
                    let index = store.index().await.unwrap_or(0);
                    let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
                    json(
                        StatusCode::OK,
                        &CaStatus {
                            phase: ca.phase(),
                            roots: ca.state().clone(),
                            bundle: None,
                            generation,
                            index,
                        },
                    )
                }
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
            }
        }
        (m, p) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {m} {p}")),
    };
    Ok(resp)
}

/// Why a request to the daemon failed.
#[derive(Debug)]
pub enum CallError {
    /// The daemon could not be reached, or did not answer in time.
    Unreachable(anyhow::Error),
    /// It refused the request, or its answer is not the expected body.
    Answer(AnswerError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "{e:#}"),
            CallError::Answer(e) => write!(f, "{e}"),
        }
    }
}

/// A request to the daemon's socket; its answer read as `T` (see [`ringside_core::control::api`]).
pub fn call<T: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<T, CallError> {
    call_with(socket, method, path, body, None)
}

/// A request with an optional bearer token.
pub fn call_with<T: DeserializeOwned>(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> Result<T, CallError> {
    let (status, answer) = ringside_core::control::http_call(
        socket,
        method.as_str(),
        path,
        body,
        token,
        std::time::Duration::from_secs(30),
    )
    .map_err(CallError::Unreachable)?;
    ringside_core::control::read_answer(status, &answer).map_err(CallError::Answer)
}
