//! Real HTTP servers and a client for the L7 tests (hyper on tokio, each server on its own
//! thread and runtime). A server answers by path:
//!
//! - `/status/N`: status N;
//! - `/slow/MS`: waits MS milliseconds, then 200;
//! - `/echo`: the request body back;
//! - anything else: 200 with a body naming the server and echoing `x-request-id`,
//!   `x-forwarded-for` and `host` (one `name: value` per line).
//!
//! Every response carries `x-server: NAME`; the server counts the requests it answered.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};

/// A running test server.
#[derive(Debug, Clone)]
pub struct Server {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests answered.
    pub hits: Arc<AtomicUsize>,
    /// When not 0, every request is answered with this status (change it to turn the server
    /// unhealthy or healthy).
    pub status: Arc<std::sync::atomic::AtomicU16>,
}

type Out = http_body_util::combinators::BoxBody<Bytes, Infallible>;

async fn answer(
    name: Arc<str>,
    hits: Arc<AtomicUsize>,
    always: Arc<std::sync::atomic::AtomicU16>,
    req: Request<Incoming>,
) -> Result<Response<Out>, Infallible> {
    if req.uri().path() == "/grpc" {
        // gRPC-style: a data frame, then trailers with the status.
        hits.fetch_add(1, Ordering::SeqCst);
        let mut trailers = hyper::HeaderMap::new();
        trailers.insert("grpc-status", "0".parse().unwrap());
        trailers.insert("grpc-message", "ok".parse().unwrap());
        let body = DataThenTrailers {
            data: Some(Bytes::from_static(b"\0\0\0\0\x05hello")),
            trailers: Some(trailers),
        };
        let mut r = Response::new(BodyExt::boxed(body));
        r.headers_mut()
            .insert("content-type", "application/grpc".parse().unwrap());
        return Ok(r);
    }
    if req.headers().get("upgrade").is_some() {
        // An upgrade (as WebSocket): 101, then echo raw bytes on the upgraded connection.
        hits.fetch_add(1, Ordering::SeqCst);
        let mut req = req;
        let on = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(up) = on.await {
                let mut io = hyper_util::rt::TokioIo::new(up);
                let (mut r, mut w) = tokio::io::split(&mut io);
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        let mut r = Response::new(BodyExt::boxed(Full::new(Bytes::new())));
        *r.status_mut() = hyper::StatusCode::SWITCHING_PROTOCOLS;
        r.headers_mut()
            .insert("connection", "upgrade".parse().unwrap());
        r.headers_mut()
            .insert("upgrade", req.headers()["upgrade"].clone());
        return Ok(r);
    }
    hits.fetch_add(1, Ordering::SeqCst);
    let mut path = req.uri().path().to_string();
    let code = always.load(Ordering::SeqCst);
    if code != 0 {
        path = format!("/status/{code}");
    }
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let info = format!(
        "server: {name}\nx-request-id: {}\nx-forwarded-for: {}\nhost: {}\nx-forwarded-client-cert: {}\n",
        header("x-request-id"),
        header("x-forwarded-for"),
        header("host"),
        header("x-forwarded-client-cert")
    );
    let (status, body) = if let Some(code) = path.strip_prefix("/status/") {
        (code.parse().unwrap_or(500), Bytes::from(info))
    } else if let Some(ms) = path.strip_prefix("/slow/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap_or(0))).await;
        (200, Bytes::from(info))
    } else if path == "/headers" {
        // Every request header as received, one `name: value` line each.
        let mut all = String::new();
        for (k, v) in req.headers() {
            all.push_str(&format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        (200, Bytes::from(all))
    } else if path == "/echo" {
        let b = req
            .into_body()
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        (200, b)
    } else {
        (200, Bytes::from(info))
    };
    let mut r = Response::new(BodyExt::boxed(Full::new(body)));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        "x-server",
        hyper::header::HeaderValue::from_str(&name).unwrap(),
    );
    Ok(r)
}

/// Start a server named `name` on `addr` (port 0 for any).
pub fn serve(name: &str, addr: SocketAddr) -> Server {
    serve_with(name, addr, None)
}

/// A server that answers every request with `status`.
pub fn serve_status(name: &str, addr: SocketAddr, status: u16) -> Server {
    serve_with(name, addr, Some(status))
}

fn serve_with(name: &str, addr: SocketAddr, always: Option<u16>) -> Server {
    let status = Arc::new(std::sync::atomic::AtomicU16::new(always.unwrap_or(0)));
    let always = status.clone();
    let listener = std::net::TcpListener::bind(addr).expect("bind test HTTP server");
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let (name, h2): (Arc<str>, _) = (name.into(), hits.clone());
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                let (name, hits, always) = (name.clone(), h2.clone(), always.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        answer(name.clone(), hits.clone(), always.clone(), req)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
                    .await;
                });
            }
        });
    });
    Server { addr, hits, status }
}

/// A body of one data frame followed by trailers (as gRPC responses end).
struct DataThenTrailers {
    data: Option<Bytes>,
    trailers: Option<hyper::HeaderMap>,
}

impl hyper::body::Body for DataThenTrailers {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        let f = match (self.data.take(), self.trailers.take()) {
            (Some(d), t) => {
                self.trailers = t;
                Some(Ok(hyper::body::Frame::data(d)))
            }
            (None, Some(t)) => Some(Ok(hyper::body::Frame::trailers(t))),
            (None, None) => None,
        };
        std::task::Poll::Ready(f)
    }
}

/// A response as the tests look at it.
#[derive(Debug, Clone)]
pub struct Got {
    /// Status code.
    pub status: u16,
    /// Headers (lower-case names).
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
    /// Trailers, if any.
    pub trailers: Option<hyper::HeaderMap>,
}

impl Got {
    /// A header as text ("" when absent).
    pub fn header(&self, k: &str) -> String {
        self.headers
            .get(k)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// An HTTP/1.1 client with a keep-alive pool, blocking.
#[derive(Debug)]
pub struct Client {
    rt: tokio::runtime::Runtime,
    client: hyper_util::client::legacy::Client<
        hyper_util::client::legacy::connect::HttpConnector,
        Full<Bytes>,
    >,
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    /// A client (HTTP/1.1).
    pub fn new() -> Client {
        Client::with_h2(false)
    }

    /// A client speaking HTTP/2 with prior knowledge when `h2`.
    pub fn with_h2(h2: bool) -> Client {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .http2_only(h2)
                .build_http();
        Client { rt, client }
    }

    /// Send a request; `Err` for a transport error.
    pub fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<Got, String> {
        let mut b = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        self.rt.block_on(async {
            let r = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
                .await
                .map_err(|_| "timed out".to_string())?
                .map_err(|e| format!("{e:?}"))?;
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            let collected = r.into_body().collect().await.map_err(|e| e.to_string())?;
            let trailers = collected.trailers().cloned();
            Ok(Got {
                status,
                headers,
                body: collected.to_bytes(),
                trailers,
            })
        })
    }

    /// GET.
    pub fn get(&self, url: &str) -> Result<Got, String> {
        self.send("GET", url, &[], Vec::new())
    }
}
