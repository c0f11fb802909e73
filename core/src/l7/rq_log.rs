//! What the L7 path counts per request for the access log: the request body's bytes as it is
//! read ([`Counted`]), and the response body's as it goes to the client ([`Logged`], which writes
//! the request's line ([`RqLog`]) when the body ends, fails or is dropped).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Weak};

use hyper::body::{Body as _, Bytes};

use super::{Conn, RespBody, RqMeta};
use crate::reason::Reason;
use crate::server::Shared;
use crate::telemetry::access_log::Line;

/// A request's access-log line, written once its response body has ended (or was dropped).
pub(crate) struct RqLog {
    pub(super) shared: Weak<Shared>,
    pub(super) conn: Arc<Conn>,
    pub(super) meta: RqMeta,
    pub(super) method: String,
    pub(super) path: String,
    pub(super) status: u16,
    pub(super) request_id: Option<String>,
    pub(super) trace_id: Option<String>,
    /// The failure: this proxy's, or the upstream sidecar's (`x-ringside-reason`).
    pub(super) reason: Option<Reason>,
    /// What decided this proxy's failure.
    pub(super) detail: Option<String>,
    pub(super) start: std::time::Instant,
    /// Request body bytes read from the client.
    pub(super) bytes_up: Arc<std::sync::atomic::AtomicU64>,
}

impl RqLog {
    fn write(self, bytes_down: u64, cut: Option<Reason>) {
        let Some(shared) = self.shared.upgrade() else {
            return;
        };
        let Some(log) = &shared.access_log else {
            return;
        };
        let c = &self.conn;
        let peer_id = match c.caller_is_peer {
            true => c.peer_id.as_ref().map(|i| i.to_string()),
            false => self.meta.upstream_id.as_deref().map(str::to_string),
        };
        let (source_id, destination_id) = crate::telemetry::access_log::identities(
            c.caller_is_peer,
            c.own_id.as_deref(),
            peer_id.as_deref(),
        );
        log.write(Line {
            kind: "http",
            conn_id: c.id,
            direction: c.direction,
            mesh: c.mesh(),
            client: Some(c.peer),
            source_id,
            destination_id,
            original_destination: c.orig_dst,
            destination: Some(&self.meta.service),
            upstream: self.meta.upstream,
            peer_id: peer_id.as_deref(),
            bytes_up: Some(self.bytes_up.load(Relaxed)),
            bytes_down: Some(bytes_down),
            duration_ms: self.start.elapsed().as_millis() as u64,
            reason: self.reason.or(cut).map(Reason::as_str),
            detail: self.detail.as_deref(),
            service: Some(&self.meta.service),
            route: Some(&self.meta.route),
            method: Some(&self.method),
            path: Some(&self.path),
            status: Some(self.status),
            request_id: self.request_id.as_deref(),
            trace_id: self.trace_id.as_deref(),
            ..Line::default()
        });
    }
}

/// A response body that counts what it passes to the client and writes the request's access-log
/// line at its end: its last frame, an error (the upstream cut it), or dropped before its end
/// (the client went away).
pub(crate) struct Logged {
    pub(super) inner: RespBody,
    pub(super) bytes: u64,
    pub(super) log: Option<RqLog>,
}

impl Logged {
    fn finish(&mut self, cut: Option<Reason>) {
        if let Some(l) = self.log.take() {
            l.write(self.bytes, cut);
        }
    }
}

impl hyper::body::Body for Logged {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    self.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some(Reason::UpstreamReset)),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let cut = (!self.inner.is_end_stream()).then_some(Reason::DownstreamReset);
        self.finish(cut);
    }
}

/// A request body that counts the bytes of its data frames as they are read.
#[derive(Debug)]
pub(crate) struct Counted<B> {
    inner: B,
    n: Arc<std::sync::atomic::AtomicU64>,
}

impl<B> Counted<B> {
    pub(super) fn new(inner: B, n: Arc<std::sync::atomic::AtomicU64>) -> Counted<B> {
        Counted { inner, n }
    }
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, B::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(f))) = &r {
            if let Some(d) = f.data_ref() {
                self.n.fetch_add(d.len() as u64, Relaxed);
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
