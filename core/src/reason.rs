//! Failure reason codes: every refused or failed connection carries exactly one.
//!
//! The codes are stable strings (they appear in logs, counters, `/events` and the access log), so
//! operators can grep for them and `ringctl why` can explain them.

use serde::Serialize;

/// Why a connection was refused or failed. `as_str` gives the stable code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The original destination is not in the configuration (registry-only mode), or the
    /// connection reached the proxy without being redirected.
    UnknownDestination,
    /// Inbound: the local application did not accept on its port at any local address.
    AppNotListening,
    /// The destination refused the caller: no intention allows it (recorded at the destination).
    IntentionDenied,
    /// The destination refused this proxy with the TLS `access_denied` alert (recorded at the
    /// source).
    DeniedByDestination,
    /// A certificate in the handshake has expired.
    TlsCertExpired,
    /// A certificate in the handshake is not valid yet (clock skew).
    TlsCertNotYetValid,
    /// A certificate was not issued by a CA in the trust bundle.
    TlsUnknownCa,
    /// The peer's SPIFFE ID is not the expected one.
    TlsIdentityMismatch,
    /// The TLS handshake failed for another reason (protocol, ALPN, not TLS at all).
    TlsHandshakeFailed,
    /// Strict mTLS: a plaintext connection arrived inbound and was refused.
    PlaintextRejected,
    /// The service has no endpoints at all.
    NoHealthyEndpoint,
    /// Every attempted upstream endpoint refused the TCP connection (RST / ECONNREFUSED).
    UpstreamConnectRefused,
    /// The upstream connect did not complete within the connect timeout.
    UpstreamConnectTimeout,
    /// The upstream could not be reached at all (no route, network unreachable, other connect errors).
    UpstreamUnreachable,
    /// The connect failed on this host, before any packet left: no free local port to connect
    /// from to that address and port (`EADDRNOTAVAIL`, most often a port range full of
    /// connections in TIME_WAIT). Says nothing about the upstream's health.
    LocalPortsExhausted,
    /// The upstream reset an established connection (or a write to it failed).
    UpstreamReset,
    /// The downstream (the client) reset an established connection.
    DownstreamReset,
    /// The proxy was at its connection limit when the connection arrived.
    Overloaded,
    /// No byte moved in either direction for the idle timeout.
    IdleTimeout,
    /// The proxy was draining and the drain deadline passed before the connection finished.
    DrainTimeout,
    /// L7: the upstream did not answer the request within its timeout.
    UpstreamRequestTimeout,
    /// L7: the service is declared HTTP but the peer does not speak HTTP.
    ProtocolMismatch,
    /// L7: the upstream's circuit breaker is open (limits reached or endpoints ejected).
    CircuitOpen,
    /// L7: an L7 intention (path, method, header permission) denies the request.
    RequestDenied,
    /// The original destination is one of the proxy's own listeners: serving it would loop.
    ProxyLoop,
    /// The client did not send enough to tell its protocol before the detection deadline (a
    /// strict mTLS port waiting for a ClientHello).
    DetectTimeout,
    /// The control daemon cannot be reached: the last good configuration and certificate stay
    /// in force.
    CtlUnreachable,
    /// L7: every retry was used and the last attempt failed too.
    RetriesExhausted,
    /// L7: the request is malformed or evades path rules (an encoded `/` or `\`, a bad
    /// percent-encoding).
    BadRequest,
    /// The control daemon cannot reach its store (etcd): it refuses writes and serves its proxies
    /// the last good state (reported by `ringctl`, not counted by proxies).
    StoreUnreachable,
}

impl Reason {
    /// Every reason, in counter order.
    pub const ALL: [Reason; 30] = [
        Reason::UnknownDestination,
        Reason::AppNotListening,
        Reason::IntentionDenied,
        Reason::DeniedByDestination,
        Reason::TlsCertExpired,
        Reason::TlsCertNotYetValid,
        Reason::TlsUnknownCa,
        Reason::TlsIdentityMismatch,
        Reason::TlsHandshakeFailed,
        Reason::PlaintextRejected,
        Reason::NoHealthyEndpoint,
        Reason::UpstreamConnectRefused,
        Reason::UpstreamConnectTimeout,
        Reason::UpstreamUnreachable,
        Reason::LocalPortsExhausted,
        Reason::UpstreamReset,
        Reason::DownstreamReset,
        Reason::Overloaded,
        Reason::IdleTimeout,
        Reason::DrainTimeout,
        Reason::UpstreamRequestTimeout,
        Reason::ProtocolMismatch,
        Reason::CircuitOpen,
        Reason::RequestDenied,
        Reason::ProxyLoop,
        Reason::DetectTimeout,
        Reason::CtlUnreachable,
        Reason::RetriesExhausted,
        Reason::BadRequest,
        Reason::StoreUnreachable,
    ];

    /// The stable code, as used in logs and metrics labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::UnknownDestination => "unknown_destination",
            Reason::AppNotListening => "app_not_listening",
            Reason::IntentionDenied => "intention_denied",
            Reason::DeniedByDestination => "denied_by_destination",
            Reason::TlsCertExpired => "tls_cert_expired",
            Reason::TlsCertNotYetValid => "tls_cert_not_yet_valid",
            Reason::TlsUnknownCa => "tls_unknown_ca",
            Reason::TlsIdentityMismatch => "tls_identity_mismatch",
            Reason::TlsHandshakeFailed => "tls_handshake_failed",
            Reason::PlaintextRejected => "plaintext_rejected",
            Reason::NoHealthyEndpoint => "no_healthy_endpoint",
            Reason::UpstreamConnectRefused => "upstream_connect_refused",
            Reason::UpstreamConnectTimeout => "upstream_connect_timeout",
            Reason::UpstreamUnreachable => "upstream_unreachable",
            Reason::LocalPortsExhausted => "local_ports_exhausted",
            Reason::UpstreamReset => "upstream_reset",
            Reason::DownstreamReset => "downstream_reset",
            Reason::Overloaded => "overloaded",
            Reason::IdleTimeout => "idle_timeout",
            Reason::DrainTimeout => "drain_timeout",
            Reason::UpstreamRequestTimeout => "upstream_request_timeout",
            Reason::ProtocolMismatch => "protocol_mismatch",
            Reason::CircuitOpen => "circuit_open",
            Reason::RequestDenied => "request_denied",
            Reason::ProxyLoop => "proxy_loop",
            Reason::DetectTimeout => "detect_timeout",
            Reason::CtlUnreachable => "ctl_unreachable",
            Reason::RetriesExhausted => "retries_exhausted",
            Reason::BadRequest => "bad_request",
            Reason::StoreUnreachable => "store_unreachable",
        }
    }

    /// Whether the failure was found in a TLS handshake (an alert went to the peer).
    pub const fn is_tls(self) -> bool {
        matches!(
            self,
            Reason::IntentionDenied
                | Reason::DeniedByDestination
                | Reason::TlsCertExpired
                | Reason::TlsCertNotYetValid
                | Reason::TlsUnknownCa
                | Reason::TlsIdentityMismatch
                | Reason::TlsHandshakeFailed
        )
    }

    /// Index into per-reason counter arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A one-line hint telling the operator what to check.
    pub const fn hint(self) -> &'static str {
        match self {
            Reason::UnknownDestination => {
                "the destination is not a known service (registry_only is on), or the connection was not redirected: add the service or turn registry_only off"
            }
            Reason::AppNotListening => {
                "the local application does not accept on its targetPort: check the port and the address it listens on"
            }
            Reason::IntentionDenied => "no intention allows this source to call this service: add an allow intention if the call is expected",
            Reason::DeniedByDestination => {
                "the destination's proxy refused this caller (TLS access_denied): an intention there denies it"
            }
            Reason::TlsCertExpired => "a certificate in the handshake has expired: renew it (or check the clock)",
            Reason::TlsCertNotYetValid => "a certificate is not valid yet: check the clocks of both hosts",
            Reason::TlsUnknownCa => "the peer's certificate is not signed by a CA in the trust bundle: check both sides' bundles",
            Reason::TlsIdentityMismatch => {
                "the peer's SPIFFE ID is not the expected service's: check which certificate the destination serves"
            }
            Reason::TlsHandshakeFailed => "the TLS handshake failed: check that both sides speak mesh TLS 1.3",
            Reason::PlaintextRejected => {
                "a plaintext connection reached a strict-mTLS sidecar: call through a sidecar, or set the mode to permissive while migrating"
            }
            Reason::NoHealthyEndpoint => "the service has no endpoints: register or configure at least one",
            Reason::UpstreamConnectRefused => {
                "nothing listens on the endpoint's address and port: check the upstream process and its listen address"
            }
            Reason::UpstreamConnectTimeout => {
                "the endpoint did not answer the TCP handshake in time: check that the host is up and no firewall drops packets"
            }
            Reason::UpstreamUnreachable => "no route to the endpoint: check its address and the network",
            Reason::LocalPortsExhausted => "no free local port to connect from to this endpoint (EADDRNOTAVAIL), usually a port range full of connections in TIME_WAIT at a high rate of new connections: widen net.ipv4.ip_local_port_range in the pod, reuse connections, or spread them over more endpoints; the upstream is not at fault",
            Reason::UpstreamReset => "the upstream reset the connection: check the upstream's logs",
            Reason::DownstreamReset => "the client reset the connection",
            Reason::Overloaded => "the proxy is at max_connections: raise it or add capacity",
            Reason::IdleTimeout => "no data moved for idle_timeout: raise it if the protocol has long pauses",
            Reason::DrainTimeout => "the proxy was shutting down and the drain deadline passed",
            Reason::UpstreamRequestTimeout => "the upstream did not answer within the request timeout: check the upstream's latency, or raise request_timeout",
            Reason::ProtocolMismatch => "the service is declared HTTP but its peer does not speak HTTP: declare it tcp (ServiceDefaults protocol: tcp)",
            Reason::CircuitOpen => "the upstream's circuit breaker is open (connection or request limits reached, or endpoints ejected after failures): check the upstream's health",
            Reason::RequestDenied => "an L7 intention denies this request (path, method or header): add a permission if the call is expected",
            Reason::ProxyLoop => "the connection was addressed to the sidecar's own port (15001, 15006, 15000, 15021): call the service's address instead",
            Reason::DetectTimeout => "the client sent too little to tell its protocol before the deadline: a slow or stuck client, or a non-mesh client on a strict mTLS port",
            Reason::CtlUnreachable => "the sidecar cannot reach the control daemon (ringctl daemon): check that it runs and that its proxy socket is mounted in the pod; the last good config stays in force",
            Reason::RetriesExhausted => "every retry failed (the detail names the last failure): check the upstream's health, or raise numRetries",
            Reason::BadRequest => "the request path has an encoded slash or backslash or a bad percent-encoding, refused because an app may read it differently from the permissions: send a plain path",
            Reason::StoreUnreachable => "the control daemon cannot reach its store (etcd): writes are refused and proxies keep the last good state; check etcd's health and the daemon's --store and --etcd-* settings, it catches up when etcd is back",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_match_all_order_and_codes_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r} out of order");
            assert!(seen.insert(r.as_str()), "duplicate code {r}");
            assert!(!r.hint().is_empty());
        }
    }
}
