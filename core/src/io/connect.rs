//! Connecting where a plan's route says: a service's endpoints (chosen by its `Cluster`, the next
//! one tried when one refuses or times out), the original destination (passthrough), or the local
//! application (127.0.0.1, ::1, then the pod address for a declared service; the pod address
//! only for any other port, so an app bound to loopback is never exposed by the mesh).

use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use monoio::net::TcpStream;
use tracing::{debug, info};

use crate::decide::cluster::{ActiveGuard, Cluster};
use crate::decide::route::{local_candidates, Route};
use crate::io::sys;
use crate::io::worker::Worker;
use crate::reason::Reason;
use crate::server::ConfigSnapshot;

/// Passthrough destinations are not in the config, so they get a fixed connect timeout.
const PASSTHROUGH_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The local application answers (or refuses) at once; a long wait means it is stuck.
const LOCAL_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// An upstream connection ready to relay.
#[derive(Debug)]
pub(crate) struct Upstream {
    pub(crate) stream: TcpStream,
    pub(crate) addr: SocketAddr,
    /// Counts the connection on its endpoint (cluster routes only).
    _guard: Option<ActiveGuard>,
}

impl Upstream {
    /// The stream, and the guard that counts it on its endpoint while it lives.
    pub(crate) fn into_parts(self) -> (TcpStream, Option<ActiveGuard>) {
        (self.stream, self._guard)
    }
}

/// Why no upstream connection could be made.
#[derive(Debug)]
pub(crate) struct Failure {
    pub(crate) reason: Reason,
    /// A hint specific to this failure (else the reason's generic one).
    pub(crate) hint: Option<String>,
    /// The last address tried, if any (the access log's `upstream`).
    pub(crate) tried: Option<SocketAddr>,
}

impl Failure {
    /// The detail for logs and events: the specific hint, or the reason's.
    pub(crate) fn detail(self) -> (Reason, String) {
        let d = self.hint.unwrap_or_else(|| self.reason.hint().to_string());
        (self.reason, d)
    }
}

/// Connect where the route says; a failed attempt is logged inside `span()` (the connection's).
pub(crate) async fn connect_to(
    w: &Worker,
    snap: &ConfigSnapshot,
    route: Route,
    span: &dyn Fn() -> tracing::Span,
) -> Result<Upstream, Failure> {
    let fail = |reason, tried| Failure {
        reason,
        hint: None,
        tried,
    };
    match route {
        Route::Cluster(i) => {
            let i = snap.fail_over(i, Instant::now());
            connect_upstream(w, &snap.clusters[i], span)
                .await
                .map_err(|(r, tried)| fail(r, tried))
        }
        Route::Passthrough(addr) => {
            let stats = w.stats();
            stats.upstream_cx_total.inc();
            match connect_one(addr, PASSTHROUGH_CONNECT_TIMEOUT).await {
                Ok(stream) => Ok(Upstream {
                    stream,
                    addr,
                    _guard: None,
                }),
                Err(reason) => {
                    stats.upstream_cx_connect_fail.inc();
                    if reason == Reason::UpstreamConnectTimeout {
                        stats.upstream_cx_connect_timeout.inc();
                    }
                    Err(fail(reason, Some(addr)))
                }
            }
        }
        Route::Local {
            service,
            port,
            pod_ip,
        } => {
            let candidates = local_candidates(port, pod_ip, service.is_some());
            // Consul's `localConnectTimeoutMs`, when the daemon set it for the service.
            let timeout = service
                .and_then(|i| snap.services.get(i))
                .and_then(|s| s.inbound.local_connect_timeout)
                .unwrap_or(LOCAL_CONNECT_TIMEOUT);
            let mut timed_out = false;
            for &addr in &candidates {
                let r = connect_one(addr, timeout).await;
                timed_out |= r.as_ref().err() == Some(&Reason::UpstreamConnectTimeout);
                if let Ok(stream) = r {
                    let via = match addr.ip() {
                        ip if ip.is_loopback() && ip.is_ipv4() => 0,
                        ip if ip.is_loopback() => 1,
                        _ => 2,
                    };
                    w.stats().inbound_app_via[via].inc();
                    debug!(app = %addr, "local app answered");
                    return Ok(Upstream {
                        stream,
                        addr,
                        _guard: None,
                    });
                }
            }
            if timed_out {
                return Err(Failure {
                    tried: candidates.last().copied(),
                    reason: Reason::UpstreamConnectTimeout,
                    hint: Some(format!(
                        "the local application on port {port} did not accept within {timeout:?} (localConnectTimeoutMs): is it overloaded or stuck?"
                    )),
                });
            }
            let listening = crate::io::listening::listening();
            Err(Failure {
                tried: candidates.last().copied(),
                reason: Reason::AppNotListening,
                hint: Some(crate::io::listening::app_hint(
                    port,
                    &listening,
                    &candidates,
                )),
            })
        }
        Route::Refuse(reason) => Err(fail(reason, None)),
    }
}

/// One connect with a timeout, made ready for the relay (non-blocking, no Nagle).
async fn connect_one(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, Reason> {
    match monoio::time::timeout(timeout, TcpStream::connect_addr(addr)).await {
        Ok(Ok(stream)) => {
            sys::set_nonblocking(stream.as_raw_fd()).map_err(|_| Reason::UpstreamReset)?;
            sys::set_nodelay(stream.as_raw_fd());
            Ok(stream)
        }
        Ok(Err(e)) => {
            let reason = classify_connect_error(&e);
            debug!(endpoint = %addr, error = %e, reason = reason.as_str(), "connect failed");
            Err(reason)
        }
        Err(_) => Err(Reason::UpstreamConnectTimeout),
    }
}

/// Connect to an endpoint of `cluster`, trying others (bounded) when one refuses or times out.
/// `Err`: the reason, and the last endpoint tried.
async fn connect_upstream(
    w: &Worker,
    cluster: &Arc<Cluster>,
    span: &dyn Fn() -> tracing::Span,
) -> Result<Upstream, (Reason, Option<SocketAddr>)> {
    let stats = w.stats();
    if let Some(max) = cluster.service.max_connections {
        // Consul's `limits.maxConnections`: a bound on the connections open to the service.
        let open: u32 = cluster
            .endpoints
            .iter()
            .map(|e| e.active.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        if open >= max {
            return Err((Reason::CircuitOpen, None));
        }
    }
    let mut tried = 0u64;
    let mut last = Reason::NoHealthyEndpoint;
    let mut last_tried = None;
    for attempt in 0..cluster.max_attempts() {
        let Some(i) = cluster.pick(tried, Instant::now()) else {
            break;
        };
        if i < 64 {
            tried |= 1 << i;
        }
        let addr = cluster.endpoints[i].addr;
        last_tried = Some(i);
        stats.upstream_cx_total.inc();
        let reason = match connect_one(addr, cluster.service.connect_timeout).await {
            Ok(stream) => {
                cluster.report_success(i);
                return Ok(Upstream {
                    stream,
                    addr,
                    _guard: Some(cluster.open(i)),
                });
            }
            Err(reason) => {
                stats.upstream_cx_connect_fail.inc();
                if reason == Reason::UpstreamConnectTimeout {
                    stats.upstream_cx_connect_timeout.inc();
                }
                reason
            }
        };
        let _span = span().entered();
        if reason == Reason::LocalPortsExhausted {
            // This host's shortage: the endpoint is not to blame and stays in rotation; another
            // endpoint (another address or port) may still have local ports free.
            info!(endpoint = %addr, attempt = attempt + 1, reason = reason.as_str(), "upstream connect failed");
            last = reason;
            continue;
        }
        let ejected_for = cluster.report_failure(i, Instant::now());
        info!(
            endpoint = %addr,
            attempt = attempt + 1,
            reason = reason.as_str(),
            ejected_for_ms = ejected_for.as_millis() as u64,
            "upstream connect failed"
        );
        last = reason;
    }
    Err((last, last_tried.map(|i| cluster.endpoints[i].addr)))
}

/// The reason code of a failed connect (also used by the L7 path's connects).
///
/// `EADDRNOTAVAIL` is this host's problem, not the upstream's: the kernel found no free local
/// port for the four-tuple (the ephemeral range is full, often of TIME_WAIT entries at a high
/// rate of new connections to one address). It gets its own code, so nobody goes looking for a
/// broken route, and it does not eject the endpoint.
pub(crate) fn classify_connect_error(e: &io::Error) -> Reason {
    match e.kind() {
        ErrorKind::ConnectionRefused => Reason::UpstreamConnectRefused,
        ErrorKind::TimedOut => Reason::UpstreamConnectTimeout,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe => Reason::UpstreamReset,
        ErrorKind::AddrNotAvailable => Reason::LocalPortsExhausted,
        _ => Reason::UpstreamUnreachable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errno(n: i32) -> Reason {
        classify_connect_error(&io::Error::from_raw_os_error(n))
    }

    #[test]
    fn connect_errnos_map_to_reasons() {
        assert_eq!(errno(libc::EADDRNOTAVAIL), Reason::LocalPortsExhausted);
        assert_eq!(errno(libc::ECONNREFUSED), Reason::UpstreamConnectRefused);
        assert_eq!(errno(libc::ETIMEDOUT), Reason::UpstreamConnectTimeout);
        assert_eq!(errno(libc::ECONNRESET), Reason::UpstreamReset);
        assert_eq!(errno(libc::EPIPE), Reason::UpstreamReset);
        assert_eq!(errno(libc::ENETUNREACH), Reason::UpstreamUnreachable);
        assert_eq!(errno(libc::EHOSTUNREACH), Reason::UpstreamUnreachable);
    }

    /// A real `EADDRNOTAVAIL` from connect: every port of a one-port local range is taken (a
    /// socket bound to it stays connected), so the kernel has no port left for a second
    /// connection to the same address. The error the proxy would see maps to the local reason.
    #[test]
    fn a_real_eaddrnotavail_is_local_ports_exhausted() {
        use socket2::{Domain, Socket, Type};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let to = l.local_addr().unwrap();
        // Bind both sockets to one local port with SO_REUSEADDR: the second connect to the same
        // destination would reuse the four-tuple, which the kernel refuses with EADDRNOTAVAIL.
        let first = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        first.set_reuse_address(true).unwrap();
        first
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let port = first.local_addr().unwrap().as_socket().unwrap();
        first.connect(&to.into()).unwrap();
        let second = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        second.set_reuse_address(true).unwrap();
        second.bind(&port.into()).unwrap();
        let e = second.connect(&to.into()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EADDRNOTAVAIL), "{e}");
        assert_eq!(classify_connect_error(&e), Reason::LocalPortsExhausted);
    }
}
