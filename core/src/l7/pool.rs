//! Upstream HTTP/1.1 connections of one L7 lane: idle connections kept per (endpoint, mesh
//! identity) and reused once their previous response body has ended; new ones connected with a
//! timeout, with mesh mTLS (SNI = destination service, ALPN `ringside/http`) when the upstream is a
//! sidecar.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Bytes, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use super::ReqBody;
use crate::reason::Reason;

/// Idle connections are dropped after this long.
const IDLE_FOR: Duration = Duration::from_secs(60);
/// Idle connections kept per key.
const IDLE_MAX: usize = 256;

/// Where an upstream connection goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// Endpoint.
    pub addr: SocketAddr,
    /// Mesh mTLS to this service's sidecar, or plaintext.
    pub mesh: Option<Arc<str>>,
    /// HTTP/2 (prior knowledge): one multiplexed connection per key.
    pub h2: bool,
}

/// Why a request could not be sent.
#[derive(Debug)]
pub(crate) struct SendError {
    pub reason: Reason,
    pub detail: String,
    /// Nothing reached the upstream: safe to try again elsewhere.
    pub connect: bool,
    /// The request, when it was not sent (a failed connect gives it back).
    pub request: Option<Request<ReqBody>>,
}

/// The verified identity of the upstream a response came from (mesh mTLS only), in the
/// response's extensions.
#[derive(Debug, Clone)]
pub(crate) struct UpstreamId(pub Arc<str>);

/// An upstream's verified identity (its certificate's SPIFFE ID), `None` in plaintext.
type PeerId = Option<Arc<str>>;

/// Idle connections with the time each went idle and the identity its peer proved.
/// The pool's maps hash with foldhash, not SipHash: a key is an endpoint from the catalog, never
/// chosen by a client, and the lookups (one to take a connection, one to give it back) were 1.5 %
/// of the L7 path's instructions per request.
type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

type IdleMap = FastMap<Key, Vec<(SendRequest<ReqBody>, Instant, PeerId)>>;

/// The idle connections of one lane.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    idle: Mutex<IdleMap>,
    h2: Mutex<FastMap<Key, (hyper::client::conn::http2::SendRequest<ReqBody>, PeerId)>>,
}

impl Pool {
    fn take(&self, key: &Key) -> Option<(SendRequest<ReqBody>, PeerId)> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        while let Some((s, at, id)) = list.pop() {
            if !s.is_closed() && at.elapsed() < IDLE_FOR {
                return Some((s, id));
            }
        }
        None
    }

    fn put(&self, key: Key, s: SendRequest<ReqBody>, id: PeerId) {
        if s.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        if list.len() < IDLE_MAX {
            list.push((s, Instant::now(), id));
        }
    }

    /// Send `req` on an idle connection to `key`, or a new one.
    pub(crate) async fn send(
        self: &Arc<Self>,
        key: &Key,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        mut req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        if key.h2 {
            return self.send_h2(key, tls, connect_timeout, req).await;
        }
        // Idle connections first; one the server closed meanwhile gives the request back.
        while let Some((mut s, id)) = self.take(key) {
            if s.ready().await.is_err() {
                continue;
            }
            match s.try_send_request(req).await {
                Ok(resp) => return Ok(self.wrap(key, s, id, resp)),
                Err(mut e) => match e.take_message() {
                    Some(back) => req = back,
                    None => return Err(request_error(e.into_error())),
                },
            }
        }
        let (mut s, id) = match connect(key, tls, connect_timeout).await {
            Ok(s) => s,
            Err(mut e) => {
                e.request = Some(req);
                return Err(e);
            }
        };
        match s.send_request(req).await {
            Ok(resp) => Ok(self.wrap(key, s, id, resp)),
            Err(e) => {
                let canceled = e.is_canceled();
                let mut err = request_error(e);
                if canceled {
                    // A fresh connection that died before the request went out: the peer spoke
                    // first with something that is not HTTP, or closed at once.
                    err.reason = Reason::ProtocolMismatch;
                    err.connect = false;
                    err.detail = format!(
                        "{}: the upstream spoke first or closed before the request was sent: it does not behave like an HTTP server",
                        key.addr
                    );
                }
                Err(err)
            }
        }
    }

    async fn send_h2(
        self: &Arc<Self>,
        key: &Key,
        tls: Option<Arc<rustls::ClientConfig>>,
        connect_timeout: Duration,
        req: Request<ReqBody>,
    ) -> Result<Response<PooledBody>, SendError> {
        let shared = {
            let map = self.h2.lock().unwrap_or_else(|p| p.into_inner());
            map.get(key).filter(|(s, _)| !s.is_closed()).cloned()
        };
        let (mut s, id) = match shared {
            Some(s) => s,
            None => {
                let (io, id) = match connect_io(key, tls, connect_timeout).await {
                    Ok(io) => io,
                    Err(mut e) => {
                        e.request = Some(req);
                        return Err(e);
                    }
                };
                let addr = key.addr;
                let (s, conn) =
                    hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                        .await
                        .map_err(|e| {
                            connect_error(
                                Reason::ProtocolMismatch,
                                format!("{addr}: HTTP/2 handshake: {e}"),
                            )
                        })?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(upstream = %addr, error = %e, "upstream HTTP/2 connection ended");
                    }
                });
                self.h2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(key.clone(), (s.clone(), id.clone()));
                (s, id)
            }
        };
        if s.ready().await.is_err() {
            self.h2
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            return Err(SendError {
                reason: Reason::UpstreamReset,
                detail: format!("{}: the HTTP/2 connection closed", key.addr),
                connect: true,
                request: Some(req),
            });
        }
        match s.send_request(req).await {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                if let Some(id) = id {
                    parts.extensions.insert(UpstreamId(id));
                }
                Ok(Response::from_parts(
                    parts,
                    PooledBody {
                        inner: body,
                        back: None,
                    },
                ))
            }
            Err(e) => Err(request_error(e)),
        }
    }

    fn wrap(
        self: &Arc<Self>,
        key: &Key,
        s: SendRequest<ReqBody>,
        id: PeerId,
        resp: Response<Incoming>,
    ) -> Response<PooledBody> {
        let (mut parts, body) = resp.into_parts();
        if let Some(id) = &id {
            parts.extensions.insert(UpstreamId(id.clone()));
        }
        // A switched protocol (WebSocket) keeps the connection.
        let back = if parts.status == hyper::StatusCode::SWITCHING_PROTOCOLS {
            None
        } else {
            Some((s, Arc::downgrade(self), key.clone(), id))
        };
        let mut body = PooledBody { inner: body, back };
        if body.inner.is_end_stream() {
            body.give_back();
        }
        Response::from_parts(parts, body)
    }
}

fn request_error(e: hyper::Error) -> SendError {
    let mismatch =
        e.is_parse() || e.is_parse_status() || e.is_parse_too_large() || e.is_incomplete_message();
    // A TLS alert from the destination (an intention refused this caller after the TLS 1.3
    // handshake finished on our side) says more than the closed connection that carried it.
    let io = std::error::Error::source(&e).and_then(|s| s.downcast_ref::<std::io::Error>());
    SendError {
        reason: if mismatch {
            Reason::ProtocolMismatch
        } else if e.is_timeout() {
            Reason::UpstreamRequestTimeout
        } else if let Some(io) = io {
            match io_reason(io) {
                Reason::UpstreamUnreachable => Reason::UpstreamReset,
                r => r,
            }
        } else {
            Reason::UpstreamReset
        },
        detail: if mismatch {
            format!("the upstream's answer is not HTTP ({e})")
        } else if let Some(io) = io {
            format!("{e}: {io}")
        } else {
            e.to_string()
        },
        connect: e.is_canceled(),
        request: None,
    }
}

/// The reason code of an I/O error (a TLS error inside it first).
pub(crate) fn io_reason(e: &std::io::Error) -> Reason {
    if let Some(tls) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        return crate::tls::reason_for(tls);
    }
    crate::io::connect::classify_connect_error(e)
}

fn connect_error(reason: Reason, detail: String) -> SendError {
    SendError {
        reason,
        detail,
        connect: true,
        request: None,
    }
}

/// Either a plain or a mesh-TLS upstream stream.
pub(crate) enum Io {
    Plain(TokioIo<tokio::net::TcpStream>),
    Tls(Box<TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>>),
}

impl hyper::rt::Read for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A new HTTP/1.1 connection.
async fn connect(
    key: &Key,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<(SendRequest<ReqBody>, PeerId), SendError> {
    let (io, id) = connect_io(key, tls, timeout).await?;
    Ok((handshake(io, key.addr).await?, id))
}

/// A new stream: TCP, then mesh mTLS when asked (with the identity the upstream proved).
async fn connect_io(
    key: &Key,
    tls: Option<Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<(Io, PeerId), SendError> {
    let addr = key.addr;
    let tcp = match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(connect_error(
                Reason::UpstreamConnectTimeout,
                format!("connecting to {addr} took over {timeout:?}"),
            ))
        }
        Ok(Err(e)) => {
            return Err(connect_error(
                io_reason(&e),
                format!("connecting to {addr}: {e}"),
            ))
        }
        Ok(Ok(s)) => s,
    };
    let _ = tcp.set_nodelay(true);
    match (&key.mesh, tls) {
        (Some(service), Some(cfg)) => {
            // The same server name as the fast path's sessions (the verifier requires that
            // service's SPIFFE ID, and the name keys the session cache).
            let name = crate::tls::session::server_name(service)
                .map_err(|(reason, detail)| connect_error(reason, detail))?;
            let tls = tokio::time::timeout(
                timeout,
                tokio_rustls::TlsConnector::from(cfg).connect(name, tcp),
            )
            .await
            .map_err(|_| {
                connect_error(
                    Reason::UpstreamConnectTimeout,
                    format!("mesh TLS handshake with {service} at {addr} took over {timeout:?}"),
                )
            })?
            .map_err(|e| {
                connect_error(
                    io_reason(&e),
                    format!("mesh TLS handshake with {service} at {addr}: {e}"),
                )
            })?;
            let id = crate::tls::session::peer_id(tls.get_ref().1).map(|i| i.to_string().into());
            Ok((Io::Tls(Box::new(TokioIo::new(tls))), id))
        }
        _ => Ok((Io::Plain(TokioIo::new(tcp)), None)),
    }
}

async fn handshake<T>(io: T, addr: SocketAddr) -> Result<SendRequest<ReqBody>, SendError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (s, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| connect_error(Reason::UpstreamReset, format!("{addr}: {e}")))?;
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!(upstream = %addr, error = %e, "upstream connection ended");
        }
    });
    Ok(s)
}

/// A response body that gives its connection back to the pool once it has ended.
#[derive(Debug)]
pub(crate) struct PooledBody {
    inner: Incoming,
    back: Option<(SendRequest<ReqBody>, Weak<Pool>, Key, PeerId)>,
}

impl PooledBody {
    fn give_back(&mut self) {
        if let Some((s, pool, key, id)) = self.back.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put(key, s, id);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(None) => self.give_back(),
            Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.give_back(),
            Poll::Ready(Some(Err(_))) => self.back = None,
            _ => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
