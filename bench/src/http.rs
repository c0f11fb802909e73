//! HTTP/1.1: the keep-alive client of the load generator (hyper, driven by a single-threaded
//! runtime owned by the connection's thread) and the `http-serve` origin.

use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

/// One keep-alive HTTP/1.1 connection.
#[derive(Debug)]
pub struct HttpClient {
    rt: tokio::runtime::Runtime,
    sender: SendRequest<Empty<Bytes>>,
    host: String,
}

impl HttpClient {
    /// Connect and do the HTTP/1.1 handshake.
    pub fn connect(addr: SocketAddr) -> anyhow::Result<HttpClient> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sender = rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.set_nodelay(true)?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
            // The connection task runs whenever this thread is inside `block_on`.
            tokio::spawn(conn);
            anyhow::Ok(sender)
        })?;
        Ok(HttpClient {
            rt,
            sender,
            host: addr.to_string(),
        })
    }

    /// GET `path`; returns the body size. A status other than 2xx is an error.
    pub fn get(&mut self, path: &str) -> anyhow::Result<usize> {
        let req = Request::get(path)
            .header(hyper::header::HOST, &self.host)
            .body(Empty::new())?;
        let sender = &mut self.sender;
        self.rt.block_on(async {
            sender.ready().await?;
            let resp = sender.send_request(req).await?;
            let status = resp.status();
            let body = resp.into_body().collect().await?.to_bytes();
            anyhow::ensure!(status.is_success(), "HTTP status {status}");
            Ok(body.len())
        })
    }
}

/// Serve HTTP/1.1 on `listen`: every request gets `body_size` bytes, with the `server` header
/// set to `name`. Runs until the process is stopped.
pub fn serve(
    listen: SocketAddr,
    body_size: usize,
    name: &str,
    workers: usize,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .enable_all()
        .build()?;
    let body = Bytes::from(vec![b'x'; body_size]);
    let name =
        hyper::header::HeaderValue::from_str(name).context("--name is not a header value")?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        loop {
            let (tcp, _) = match l.accept().await {
                Ok(a) => a,
                Err(_) => continue,
            };
            let _ = tcp.set_nodelay(true);
            let (body, name) = (body.clone(), name.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let mut resp = Response::new(Full::new(body.clone()));
                    resp.headers_mut()
                        .insert(hyper::header::SERVER, name.clone());
                    async move { Ok::<_, Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    })
}
