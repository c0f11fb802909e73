//! The one place a rustls session is set up for a connection, whichever path carries it (the
//! fast path drives it with `io::tls_relay`, the L7 path with tokio-rustls over the same configs):
//! the server name the client sends is the destination service's name (the verifier requires
//! that service's SPIFFE ID, and the name keys the session cache), and the peer identity is read
//! the same way on both ends.

use std::sync::Arc;

use rustls::pki_types::ServerName;

use crate::policy::identity::SpiffeId;
use crate::reason::Reason;

/// The TLS server name for a destination service (or a tunnel's expected identity).
pub fn server_name(service: &str) -> Result<ServerName<'static>, (Reason, String)> {
    ServerName::try_from(service.to_string()).map_err(|_| {
        (
            Reason::TlsHandshakeFailed,
            format!("service name '{service}' is not a valid TLS server name"),
        )
    })
}

/// A client session to `service` with `cfg`.
pub fn client(
    cfg: Arc<rustls::ClientConfig>,
    service: &str,
) -> Result<rustls::Connection, (Reason, String)> {
    let name = server_name(service)?;
    rustls::ClientConnection::new(cfg, name)
        .map(rustls::Connection::Client)
        .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))
}

/// A server session with `cfg` (its verifier asks the authorizer).
pub fn server(cfg: Arc<rustls::ServerConfig>) -> Result<rustls::Connection, (Reason, String)> {
    rustls::ServerConnection::new(cfg)
        .map(rustls::Connection::Server)
        .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))
}

/// The verified peer's SPIFFE ID, once the handshake is done.
pub fn peer_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first().and_then(|c| crate::tls::spiffe_of(c)))
}
