//! The one place a rustls session is set up for a connection, whichever path carries it (the
//! fast path drives it with `io::tls_relay`, the L7 path with tokio-rustls over the same configs):
//! the server name the client sends is the destination service's name (the verifier requires
//! that service's SPIFFE ID, and the name keys the session cache), and the peer identity is read
//! the same way on both ends.

use std::ops::DerefMut;
use std::sync::Arc;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::pki_types::ServerName;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, InsufficientSizeError, UnbufferedConnectionCommon,
    UnbufferedStatus,
};
use rustls::ExtractedSecrets;

use crate::policy::identity::SpiffeId;
use crate::reason::Reason;
use crate::tls::record::{Kernel, Records};

/// A fast-path session before its handshake: rustls's unbuffered connection, which the relay
/// drives through the handshake and then hands over to [`crate::tls::record`].
pub enum Handshaking {
    /// We originate (client).
    Client(UnbufferedClientConnection),
    /// We terminate (server).
    Server(UnbufferedServerConnection),
}

impl std::fmt::Debug for Handshaking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Handshaking::Client(_) => "Handshaking::Client",
            Handshaking::Server(_) => "Handshaking::Server",
        })
    }
}

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
) -> Result<Handshaking, (Reason, String)> {
    let name = server_name(service)?;
    UnbufferedClientConnection::new(cfg, name)
        .map(Handshaking::Client)
        .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))
}

/// A server session with `cfg` (its verifier asks the authorizer).
pub fn server(cfg: Arc<rustls::ServerConfig>) -> Result<Handshaking, (Reason, String)> {
    UnbufferedServerConnection::new(cfg)
        .map(Handshaking::Server)
        .map_err(|e| (Reason::TlsHandshakeFailed, e.to_string()))
}

/// The verified peer's SPIFFE ID, once the handshake is done.
pub fn peer_id(conn: &rustls::CommonState) -> Option<SpiffeId> {
    conn.peer_certificates()
        .and_then(|c| c.first().and_then(|c| crate::tls::spiffe_of(c)))
}

/// What the handshake needs next ([`Handshaking::advance`]).
#[derive(Debug)]
pub enum Next {
    /// Send [`Handshaking::outgoing`], then call [`Handshaking::sent`].
    Send,
    /// Read more from the peer.
    Read,
    /// The handshake is done: [`Handshaking::finish`].
    Done,
    /// The handshake failed; the alert that says why is in [`Handshaking::outgoing`].
    Failed(rustls::Error),
}

/// An established session, handed over from rustls.
#[derive(Debug)]
pub struct Finished {
    /// Record protection from here on.
    pub records: Records,
    /// The verified peer's SPIFFE ID.
    pub peer: Option<SpiffeId>,
    /// Application data rustls decrypted along with the handshake (a client's first bytes right
    /// behind its Finished).
    pub early: Vec<u8>,
}

/// A handshake in progress, sans-IO: bytes received go in, bytes to send come out.
pub struct Handshake {
    conn: Handshaking,
    /// Records to send: `outgoing[..sending]` (the rest is room already zeroed).
    outgoing: Vec<u8>,
    sending: usize,
    early: Vec<u8>,
    peer_closed: bool,
}

impl std::fmt::Debug for Handshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handshake")
            .field("conn", &self.conn)
            .field("sending", &self.sending)
            .finish()
    }
}

impl Handshaking {
    /// Start driving the handshake.
    pub fn start(self) -> Handshake {
        Handshake {
            conn: self,
            outgoing: Vec::new(),
            sending: 0,
            early: Vec::new(),
            peer_closed: false,
        }
    }
}

impl Handshake {
    /// Take in what has been received (`incoming`, from its first byte not yet consumed) and
    /// say what comes next; the first `.0` bytes of `incoming` are consumed and must be dropped
    /// before the next call.
    pub fn advance(&mut self, incoming: &mut [u8]) -> (usize, Next) {
        let Handshake {
            conn,
            outgoing,
            sending,
            early,
            peer_closed,
        } = self;
        let mut out = Out {
            buf: outgoing,
            used: sending,
        };
        match conn {
            Handshaking::Client(c) => advance(c, incoming, &mut out, early, peer_closed),
            Handshaking::Server(c) => advance(c, incoming, &mut out, early, peer_closed),
        }
    }

    /// The records to send.
    pub fn outgoing(&self) -> &[u8] {
        &self.outgoing[..self.sending]
    }

    /// [`Handshake::outgoing`] was sent.
    pub fn sent(&mut self) {
        self.sending = 0;
    }

    /// Hand the established session over from rustls to [`Records`].
    pub fn finish(self) -> Result<Finished, rustls::Error> {
        let (peer, (secrets, kernel)) = match self.conn {
            Handshaking::Client(c) => (peer_id(&c), c.into_kernel()?),
            Handshaking::Server(c) => (peer_id(&c), c.into_kernel()?),
        };
        let mut records = Records::new(secrets, kernel)?;
        if self.peer_closed {
            records.set_peer_closed();
        }
        Ok(Finished {
            records,
            peer,
            early: self.early,
        })
    }
}

/// rustls's two unbuffered connections, driven by one handshake loop.
trait Unbuffered: DerefMut<Target = UnbufferedConnectionCommon<Self::Data>> + Sized {
    type Data;
    fn process<'c, 'i>(
        &'c mut self,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self::Data>;
    fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error>;
}

/// The same two methods on each of rustls's unbuffered connections (they share no trait).
macro_rules! unbuffered {
    ($conn:ty, $data:ty, $side:ident) => {
        impl Unbuffered for $conn {
            type Data = $data;
            fn process<'c, 'i>(
                &'c mut self,
                incoming: &'i mut [u8],
            ) -> UnbufferedStatus<'c, 'i, Self::Data> {
                self.process_tls_records(incoming)
            }
            fn into_kernel(self) -> Result<(ExtractedSecrets, Kernel), rustls::Error> {
                let (s, k) = self.dangerous_into_kernel_connection()?;
                Ok((s, Kernel::$side(k)))
            }
        }
    };
}

unbuffered!(UnbufferedClientConnection, ClientConnectionData, Client);
unbuffered!(UnbufferedServerConnection, ServerConnectionData, Server);

fn advance<C: Unbuffered>(
    conn: &mut C,
    mut incoming: &mut [u8],
    outgoing: &mut Out<'_>,
    early: &mut Vec<u8>,
    peer_closed: &mut bool,
) -> (usize, Next) {
    let mut used = 0;
    loop {
        let status = conn.process(incoming);
        let discard = status.discard;
        let next = match status.state {
            Err(e) => Some(Next::Failed(e)),
            Ok(ConnectionState::EncodeTlsData(mut e)) => {
                encode(&mut e, outgoing);
                None
            }
            Ok(ConnectionState::TransmitTlsData(t)) => {
                // The caller sends before asking rustls anything else.
                t.done();
                Some(Next::Send)
            }
            Ok(ConnectionState::BlockedHandshake) => Some(Next::Read),
            Ok(ConnectionState::ReadTraffic(mut r)) => {
                let mut next = None;
                while let Some(rec) = r.next_record() {
                    match rec {
                        Ok(rec) => early.extend_from_slice(rec.payload),
                        Err(e) => {
                            next = Some(Next::Failed(e));
                            break;
                        }
                    }
                }
                next
            }
            Ok(ConnectionState::PeerClosed) => {
                *peer_closed = true;
                None
            }
            // A server may send once its Finished is out, but the handshake is done only when
            // the client's Finished is in.
            Ok(ConnectionState::WriteTraffic(_)) => Some(Next::Done),
            Ok(_) => Some(Next::Failed(rustls::Error::General(
                "unexpected TLS state during the handshake".into(),
            ))),
        };
        used += discard;
        incoming = &mut incoming[discard..];
        match next {
            None => {}
            Some(Next::Done) if conn.is_handshaking() => return (used, Next::Read),
            Some(Next::Failed(e)) => {
                // The alert rustls queued, to send before giving up. Only while one is queued:
                // past the queue rustls would go back to the records it was reading, and those
                // were in the buffer of the call that failed.
                for _ in 0..8 {
                    if !conn.wants_write() {
                        break;
                    }
                    match conn.process(&mut []).state {
                        Ok(ConnectionState::EncodeTlsData(mut enc)) => encode(&mut enc, outgoing),
                        _ => break,
                    }
                }
                return (used, Next::Failed(e));
            }
            Some(n) => return (used, n),
        }
    }
}

/// Records to send, appended behind `used` bytes; the buffer is zeroed only where it grows.
struct Out<'a> {
    buf: &'a mut Vec<u8>,
    used: &'a mut usize,
}

/// Append the record rustls has for the peer to `out`.
fn encode<D>(e: &mut EncodeTlsData<'_, D>, out: &mut Out<'_>) {
    let start = *out.used;
    let mut room = 4096;
    loop {
        if out.buf.len() < start + room {
            out.buf.resize(start + room, 0);
        }
        match e.encode(&mut out.buf[start..]) {
            Ok(n) => {
                *out.used = start + n;
                return;
            }
            Err(EncodeError::InsufficientSize(InsufficientSizeError { required_size })) => {
                room = required_size;
            }
            Err(_) => return,
        }
    }
}
