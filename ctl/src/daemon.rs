//! `ringctl daemon`: the control daemon's HTTP/JSON API on a Unix socket. The CLI is authorized by
//! the socket's file permissions (0660: root and the socket's group).
//!
//! - `POST /v1/apply` (body: YAML documents): checked whole, stored in one transaction.
//! - `GET /v1/config`: every stored document. `DELETE /v1/config/<Kind>/<name>`.
//! - `GET /v1/intentions/check?source=S&destination=D`: allow or deny, and the deciding rule.
//! - `GET /v1/index`: the configuration index.

use std::convert::Infallible;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};

use crate::consul;
use crate::store::Store;

/// Default API socket.
pub const DEFAULT_SOCKET: &str = "/run/ringside/ctl.sock";

/// What the daemon serves from.
#[derive(Debug)]
pub struct State {
    /// The store.
    pub store: Store,
    /// The certificate authority.
    pub ca: crate::ca::Ca,
    /// Virtual IP range (network, prefix length).
    pub vip_range: (std::net::Ipv4Addr, u8),
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(
    data_dir: &Path,
    socket: &Path,
    trust_domain: &str,
    vip_range: (std::net::Ipv4Addr, u8),
) -> anyhow::Result<()> {
    let store = Store::open(data_dir)?;
    let ca = crate::ca::Ca::load_or_create(&data_dir.join("ca"), trust_domain)?;
    let state = Arc::new(State {
        store,
        ca,
        vip_range,
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(state, socket.to_path_buf()))
}

async fn serve(state: Arc<State>, socket: PathBuf) -> anyhow::Result<()> {
    let store = state.clone();
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    // A socket file left by a killed daemon is stale: nothing accepts on it.
    if socket.exists() && std::os::unix::net::UnixStream::connect(&socket).is_err() {
        std::fs::remove_file(&socket)?;
    }
    let listener = tokio::net::UnixListener::bind(&socket).map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {}: {e} (is another ringctl daemon running?)",
            socket.display()
        )
    })?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o660))?;
    eprintln!(
        "ringctl daemon: listening on {} (config index {})",
        socket.display(),
        store.store.index()?
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let (stream, _) = tokio::select! {
            r = listener.accept() => r?,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let store = store.clone();
        tokio::spawn(async move {
            let io = hyper_util::rt::TokioIo::new(stream);
            let svc = hyper::service::service_fn(move |req| handle(req, store.clone()));
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, svc)
                .await;
        });
    }
    let _ = std::fs::remove_file(&socket);
    Ok(())
}

fn json(status: StatusCode, v: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(status, serde_json::json!({ "error": message.to_string() }))
}

/// Hex SHA-256 of a token: only hashes are stored.
pub fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn body_json<T: serde::de::DeserializeOwned>(
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

#[derive(serde::Deserialize)]
struct ServiceReq {
    name: String,
    #[serde(default)]
    ports: Vec<crate::store::PortMap>,
}

#[derive(serde::Deserialize)]
struct TokenReq {
    service: String,
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
                Ok(docs) => match store.apply(&docs) {
                    Ok(index) => json(
                        StatusCode::OK,
                        serde_json::json!({ "applied": docs.iter().map(|d| d.id()).collect::<Vec<_>>(), "index": index }),
                    ),
                    Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                },
            }
        }
        (Method::GET, "/v1/config") => match store.documents() {
            Ok(d) => json(StatusCode::OK, serde_json::Value::Array(d)),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::GET, "/v1/index") => match store.index() {
            Ok(i) => json(StatusCode::OK, serde_json::json!({ "index": i })),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::DELETE, p) if p.starts_with("/v1/config/") => {
            let id = &p["/v1/config/".len()..];
            match store.delete(id) {
                Ok(true) => json(StatusCode::OK, serde_json::json!({ "deleted": id })),
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
                (Some(src), Some(dst)) => match store.typed() {
                    Ok(docs) => {
                        let set = ringside_core::intentions::Intentions {
                            rules: consul::intentions(&docs),
                            default: ringside_core::intentions::Action::Deny,
                        };
                        let d = set.evaluate(&src, &dst);
                        json(
                            StatusCode::OK,
                            serde_json::json!({ "allowed": d.allowed(), "decided_by": d.explain() }),
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
        (Method::POST, "/v1/services") => match body_json::<ServiceReq>(req).await {
            Err(r) => r,
            Ok(r) => match store.register_service(&r.name, r.ports, state.vip_range) {
                Ok(s) => json(StatusCode::OK, serde_json::to_value(s).unwrap_or_default()),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::GET, "/v1/services") => match store.services() {
            Ok(s) => json(StatusCode::OK, serde_json::to_value(s).unwrap_or_default()),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::POST, "/v1/endpoints") => match body_json::<crate::store::Endpoint>(req).await {
            Err(r) => r,
            Ok(ep) => match store.register_endpoint(&ep) {
                Ok(()) => json(StatusCode::OK, serde_json::to_value(ep).unwrap_or_default()),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::GET, "/v1/endpoints") => match store.endpoints() {
            Ok(s) => json(StatusCode::OK, serde_json::to_value(s).unwrap_or_default()),
            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
        },
        (Method::POST, "/v1/tokens") => match body_json::<TokenReq>(req).await {
            Err(r) => r,
            Ok(r) => {
                let mut raw = [0u8; 32];
                match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw) {
                    Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "no randomness"),
                    Ok(()) => {
                        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                        match store.add_token(&token_hash(&token), &r.service) {
                            Ok(()) => json(
                                StatusCode::OK,
                                serde_json::json!({ "service": r.service, "token": token }),
                            ),
                            Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
                        }
                    }
                }
            }
        },
        (Method::POST, "/v1/sign") => {
            let token = req
                .headers()
                .get(hyper::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .map(str::to_string);
            let service = match token.map(|t| store.token_service(&token_hash(&t))) {
                None => {
                    return Ok(error(
                        StatusCode::UNAUTHORIZED,
                        "a proxy token is required (Authorization: Bearer)",
                    ))
                }
                Some(Err(e)) => return Ok(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
                Some(Ok(None)) => return Ok(error(StatusCode::FORBIDDEN, "unknown token")),
                Some(Ok(Some(s))) => s,
            };
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(error(StatusCode::BAD_REQUEST, e)),
            };
            let csr = String::from_utf8_lossy(&body);
            match state
                .ca
                .sign_csr(&csr, "default", &service, crate::ca::DEFAULT_LEAF_LIFETIME)
            {
                Ok(cert) => json(
                    StatusCode::OK,
                    serde_json::json!({ "service": service, "cert": cert, "bundle": state.ca.cert_pem }),
                ),
                Err(e) => error(StatusCode::BAD_REQUEST, e),
            }
        }
        (m, p) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {m} {p}")),
    };
    Ok(resp)
}

/// A request to the daemon's socket; returns (status, JSON body).
pub fn call(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    call_with(socket, method, path, body, None)
}

/// A request with an optional bearer token.
pub fn call_with(
    socket: &Path,
    method: Method,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> anyhow::Result<(u16, serde_json::Value)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let stream = tokio::net::UnixStream::connect(socket).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot reach the daemon at {}: {e} (is `ringctl daemon` running? --socket sets the path)",
                socket.display()
            )
        })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        tokio::spawn(conn);
                let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ringctl");
        if let Some(t) = token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, v))
    })
}
