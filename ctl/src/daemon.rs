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

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(data_dir: &Path, socket: &Path) -> anyhow::Result<()> {
    let store = Arc::new(Store::open(data_dir)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(serve(store, socket.to_path_buf()))
}

async fn serve(store: Arc<Store>, socket: PathBuf) -> anyhow::Result<()> {
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
        store.index()?
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

async fn handle(
    req: Request<Incoming>,
    store: Arc<Store>,
) -> Result<Response<Full<Bytes>>, Infallible> {
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
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "ringctl")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let bytes = resp.into_body().collect().await?.to_bytes();
        let v = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
        Ok((status, v))
    })
}
