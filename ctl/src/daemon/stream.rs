//! The daemon's end of a proxy stream (`GET /v1/proxy/stream`, upgraded; the frames are
//! described in [`ringside_core::control::stream`]). One task per proxy: it sends the proxy's
//! configuration whenever the served index passes the one the proxy has, a ping when nothing was
//! sent for a heartbeat, and takes the proxy's reports (acknowledgements and heartbeats) as the
//! report endpoint does, answering each with `ack`.
//!
//! The token was checked when the stream opened. The stream closes, with an `error` frame saying
//! why, when the token is revoked (through this daemon, or through another one: the store's
//! watch tells, see [`crate::store::TokenNews`]) or expires, when a report is refused or cannot
//! be read, and when the proxy stops reporting for four heartbeats.

use std::sync::Arc;
use std::time::Duration;

use http_body_util::BodyExt;
use hyper::body::Bytes;
use ringside_core::control::api::{ErrorBody, ProxyReport, TokenInfo};
use ringside_core::control::stream::{self as wire, Kind};
use tokio::time::Instant;

use super::{config_body, heartbeat, lock, show_time, take_report, unix_now, State};

/// How long one frame may take to go out before the proxy counts as gone.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a stream was opened with.
pub(super) struct Open {
    /// The token's hash.
    pub hash: String,
    /// The token (its service and expiry).
    pub token: TokenInfo,
    /// The configuration index the proxy has.
    pub index: u64,
    /// The digest of the catalog the proxy has (empty: none).
    pub digest: String,
}

/// Serve one proxy's stream until it ends.
pub(super) async fn serve(up: hyper::upgrade::Upgraded, state: Arc<State>, open: Open) {
    *lock(&state.streaming).entry(open.hash.clone()).or_default() += 1;
    run(up, &state, &open).await;
    let mut streaming = lock(&state.streaming);
    if let Some(n) = streaming.get_mut(&open.hash) {
        *n -= 1;
        if *n == 0 {
            streaming.remove(&open.hash);
        }
    }
}

type Writer = tokio::io::WriteHalf<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>;

/// Send a frame; false when the proxy is gone (or does not read for [`WRITE_TIMEOUT`]).
async fn send(wr: &mut Writer, kind: Kind, json: impl hyper::body::Buf) -> bool {
    matches!(
        tokio::time::timeout(WRITE_TIMEOUT, wire::write(wr, kind, json)).await,
        Ok(Ok(()))
    )
}

async fn run(up: hyper::upgrade::Upgraded, state: &State, open: &Open) {
    let (rd, mut wr) = tokio::io::split(hyper_util::rt::TokioIo::new(up));
    let mut rd = tokio::io::BufReader::with_capacity(512, rd);
    let mut changed = state.changed.subscribe();
    let mut revocations = state.revocations.subscribe();
    let service = open.token.service.clone();
    let beat = heartbeat(state.lease_ttl);
    let (mut sent, mut have) = (open.index, open.digest.clone());
    // A proxy with nothing, or with another index than the one served (older, or from a store
    // this daemon no longer serves), is sent the configuration at once.
    let mut due = sent == 0 || sent != *changed.borrow();
    let mut line = Vec::new();
    let mut next_ping = Instant::now() + beat;
    let mut last_report = Instant::now();
    let expires = open.token.expires.map(|at| {
        Instant::now() + Duration::from_secs(u64::try_from(at - unix_now()).unwrap_or(0))
    });
    let end: String = loop {
        if lock(&state.revoked).contains(&open.hash) {
            break format!("token {} of service '{service}' was revoked", open.token.id);
        }
        if open.token.expired_at(unix_now()) {
            break format!(
                "token {} of service '{service}' expired at {}: make a new one (ringctl token create --service {service})",
                open.token.id,
                show_time(open.token.expires.unwrap_or(0)),
            );
        }
        let served = *changed.borrow_and_update();
        if served > sent || std::mem::take(&mut due) {
            match config_body(state, &service, &have) {
                Ok((answer, digest)) => {
                    if !send(&mut wr, Kind::Config, answer.into_buf()).await {
                        return;
                    }
                    (sent, have) = (served, digest);
                    next_ping = Instant::now() + beat;
                }
                Err(e) => break e,
            }
        }
        let expiry = async {
            match expires {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = wire::read_line(&mut rd, &mut line, wire::MAX_PROXY_FRAME) => match r {
                Ok(true) => {
                    let taken = Box::pin(report(state, &service, &line)).await;
                    line.clear();
                    if line.capacity() > 16 * 1024 {
                        line = Vec::new();
                    }
                    last_report = Instant::now();
                    match taken {
                        Ok(ack) => {
                            if !send(&mut wr, Kind::Ack, ack).await {
                                return;
                            }
                        }
                        Err(e) => break e,
                    }
                }
                Ok(false) => return,
                Err(e) => break format!("cannot read the proxy's frame: {e}"),
            },
            r = changed.changed() => if r.is_err() { return },
            r = revocations.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(next_ping) => {
                if last_report.elapsed() > beat * 4 {
                    break format!(
                        "no report for {}s (a proxy answers every ping with a report)",
                        last_report.elapsed().as_secs()
                    );
                }
                if !send(&mut wr, Kind::Ping, Bytes::from_static(b"{}")).await {
                    return;
                }
                next_ping = Instant::now() + beat;
            }
            _ = expiry => {}
        }
    };
    let body = serde_json::to_vec(&ErrorBody { error: end }).unwrap_or_default();
    let _ = send(&mut wr, Kind::Error, Bytes::from(body)).await;
}

/// Take one frame from the proxy: a report, answered as `POST /v1/proxy/report` answers it.
/// `Ok` is the acknowledgement to send; `Err` why the stream closes.
async fn report(state: &State, service: &str, line: &[u8]) -> Result<Bytes, String> {
    let (kind, json) = wire::parse(line).map_err(|e| format!("the proxy sent {e}"))?;
    if kind != Kind::Report {
        return Err(format!(
            "a proxy sends report frames only, not '{}'",
            kind.as_str()
        ));
    }
    let r: ProxyReport =
        serde_json::from_slice(json).map_err(|e| format!("the report cannot be read: {e}"))?;
    let answer = take_report(state, service.to_string(), r).await;
    let ok = answer.status().is_success();
    let body = answer
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if ok {
        return Ok(body);
    }
    Err(serde_json::from_slice::<ErrorBody>(&body)
        .map(|e| e.error)
        .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned()))
}
