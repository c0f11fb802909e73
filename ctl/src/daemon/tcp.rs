//! The operator API over TCP (`ringctl daemon --listen ADDR`): the same API as the operator
//! socket, behind TLS and an operator token.
//!
//! - The server certificate is issued by the mesh CA for the daemon's identity
//!   (`spiffe://<trust domain>/ringside/daemon`) and the names clients reach it by (`--node`, the
//!   host name, `localhost`, loopback, the listen address, `--tls-san`). It is re-issued when the
//!   CA's signer changes (a rollover) or half its lifetime passed, on the next handshake.
//! - Every request must carry an operator token (`Authorization: Bearer`, created with
//!   `ringctl operator token create`): none is 401, anything else (a proxy token, a revoked or
//!   made-up one) is 403, whatever the path. Only hashes are stored, as for proxy tokens.
//! - `ringctl issue` sends the proxy token of the certificate it asks for in
//!   `Ringside-Proxy-Token`: the operator token stays in `Authorization`.
//!
//! Why a bearer token rather than client certificates: tokens are revoked at once (a certificate
//! stays valid until it expires: the mesh CA has no revocation list), and an operator's laptop
//! needs one secret instead of a key pair; TLS already authenticates the daemon to the client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{error, lock, token_hash, State};

/// Header carrying a proxy token (for `POST /v1/sign`) beside the operator's own.
pub const PROXY_TOKEN_HEADER: &str = "ringside-proxy-token";

/// The TLS handshake must be done within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The daemon's server certificate, issued from the mesh CA on demand.
#[derive(Debug)]
pub(super) struct DaemonCert {
    state: Arc<State>,
    names: Vec<String>,
    current: Mutex<Option<Issued>>,
}

#[derive(Debug)]
struct Issued {
    /// The root that signed it.
    signer: String,
    renew_at: Instant,
    key: Arc<CertifiedKey>,
}

impl DaemonCert {
    /// The certificate for the current signer (issued now when there is none, when the signer
    /// changed or half of its lifetime passed).
    fn get(&self) -> anyhow::Result<Arc<CertifiedKey>> {
        let (signer, issued) = {
            let ca = self.state.ca.read().unwrap_or_else(|p| p.into_inner());
            let signer = ca.state().signer.clone();
            let mut cur = lock(&self.current);
            if let Some(i) = cur
                .as_ref()
                .filter(|i| i.signer == signer && Instant::now() < i.renew_at)
            {
                return Ok(i.key.clone());
            }
            let lifetime = self.state.leaf_lifetime;
            let (cert, key) = ca.signer().sign_daemon(&self.names, lifetime)?;
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes())?;
            let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes())?];
            let signing = rustls::crypto::ring::sign::any_supported_type(&key)?;
            let key = Arc::new(CertifiedKey::new(chain, signing));
            *cur = Some(Issued {
                signer: signer.clone(),
                renew_at: Instant::now() + lifetime / 2,
                key: key.clone(),
            });
            (signer, key)
        };
        eprintln!(
            "ringctl daemon: operator port certificate issued by root {signer} for {}",
            self.names.join(", ")
        );
        Ok(issued)
    }
}

impl ResolvesServerCert for DaemonCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        match self.get() {
            Ok(k) => Some(k),
            Err(e) => {
                // Keep serving with the previous certificate while it lasts.
                eprintln!("ringctl daemon: cannot issue the operator port certificate: {e:#}");
                lock(&self.current).as_ref().map(|i| i.key.clone())
            }
        }
    }
}

/// The names the server certificate is for: those given, the node, the host name, localhost,
/// loopback and the listen address (when it is not a wildcard).
pub(super) fn cert_names(listen: SocketAddr, node: &str, extra: &[String]) -> Vec<String> {
    let mut names: Vec<String> = extra.to_vec();
    // The node and host names are a convenience: one that cannot be in a certificate is left out
    // (a bad --tls-san stops the daemon instead).
    let usable = |n: &String| {
        n.parse::<std::net::IpAddr>().is_ok()
            || rustls::pki_types::DnsName::try_from(n.as_str()).is_ok()
    };
    names.extend(
        std::iter::once(node.to_string())
            .chain(hostname())
            .filter(usable),
    );
    names.extend(["localhost", "127.0.0.1", "::1"].map(String::from));
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| !n.is_empty() && seen.insert(n.clone()));
    names
}

/// This host's name (Linux).
pub fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// The operator port: its listener and TLS acceptor. The first certificate is issued here, so a
/// name that cannot be in a certificate stops the daemon at start.
pub(super) async fn bind(
    state: Arc<State>,
    listen: SocketAddr,
    names: Vec<String>,
) -> anyhow::Result<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)> {
    let resolver = DaemonCert {
        state,
        names,
        current: Mutex::new(None),
    };
    resolver.get().map_err(|e| {
        anyhow::anyhow!("--listen {listen}: cannot issue the operator port's certificate: {e:#}")
    })?;
    let provider = Arc::new(ringside_core::tls::provider::base());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("--listen {listen}: {e}"))?;
    Ok((listener, tokio_rustls::TlsAcceptor::from(Arc::new(config))))
}

/// One TCP connection: the TLS handshake (within [`HANDSHAKE_TIMEOUT`]), then HTTP/1.1 with
/// every request authenticated.
pub(super) async fn serve_connection(
    stream: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    state: Arc<State>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => s,
        // Not TLS (plain HTTP), a client that does not trust us, or silence: nothing is served.
        _ => return,
    };
    let io = hyper_util::rt::TokioIo::new(super::limited::SmallReads(tls));
    let svc = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { operator(req, state, peer).await }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .max_buf_size(64 * 1024)
        .serve_connection(io, svc)
        .await;
}

/// A request on the operator port: authenticated, then served as on the operator socket.
async fn operator(
    mut req: Request<Incoming>,
    state: Arc<State>,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let name = match authenticate(&req, &state).await {
        Ok(name) => name,
        Err(r) => return Ok(r),
    };
    if super::writes(req.method(), req.uri().path()) {
        eprintln!(
            "ringctl daemon: operator {name} from {peer}: {} {}",
            req.method(),
            req.uri().path()
        );
    }
    // The operator's token has done its work; `issue` passes a proxy token in its own header.
    let headers = req.headers_mut();
    headers.remove(hyper::header::AUTHORIZATION);
    if let Some(t) = headers.remove(PROXY_TOKEN_HEADER) {
        headers.insert(hyper::header::AUTHORIZATION, t);
    }
    super::handle(req, state).await
}

/// The operator's name, from the request's operator token, or the refusal: 401 without a
/// bearer token, 403 with one that is not an operator token. While the store cannot be
/// reached, tokens seen valid before are taken.
#[allow(clippy::result_large_err)] // the error is the answer itself, sent once
async fn authenticate(
    req: &Request<Incoming>,
    state: &State,
) -> Result<String, Response<Full<Bytes>>> {
    let Some(token) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    else {
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "an operator token is required on the operator port (Authorization: Bearer; ringctl --token, --token-file or RINGCTL_TOKEN; made with `ringctl operator token create` on a node)",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer realm=\"ringside\""),
        );
        return Err(r);
    };
    let hash = token_hash(token);
    let cached = || lock(&state.operator_tokens).get(&hash).cloned();
    if state.store.unreachable().is_some() {
        if let Some(n) = cached() {
            return Ok(n);
        }
    }
    match state.store.operator_token(&hash).await {
        Err(e) if e.unreachable => {
            cached().ok_or_else(|| state.store_error(StatusCode::INTERNAL_SERVER_ERROR, e))
        }
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Ok(Some(rec)) => {
            lock(&state.operator_tokens).insert(hash, rec.name.clone());
            Ok(rec.name)
        }
        Ok(None) => {
            lock(&state.operator_tokens).remove(&hash);
            Err(error(
                StatusCode::FORBIDDEN,
                "not an operator token (a proxy token, a revoked token or none the daemon made): `ringctl operator token list` on a node shows the valid ones",
            ))
        }
    }
}

/// A new operator token: `ringop-` and 64 hex digits.
pub(super) fn new_token() -> Option<String> {
    let mut raw = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).ok()?;
    Some(format!(
        "ringop-{}",
        raw.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// Whether `name` can name an operator token: 1 to 64 of letters, digits, `.`, `_`, `-`, `@`.
pub(super) fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-_@".contains(c))
}
