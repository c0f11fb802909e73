//! Protocol detection on the fast path, by peeking (nothing is consumed): whether a client speaks
//! HTTP (an HTTP/1 method token, or the HTTP/2 preface), and which ALPN protocols a mesh TLS
//! ClientHello offers (`ringside/http` goes to the L7 path). A client that sends nothing within the
//! detection time (a server-first protocol such as SMTP, MySQL or PostgreSQL's SSL probe answer) is
//! taken as TCP, never held.

use std::os::fd::AsRawFd;
use std::time::Duration;

use monoio::net::TcpStream;

use crate::sys;

/// What the first bytes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sniffed {
    /// HTTP/1.x request line or HTTP/2 preface.
    Http,
    /// Something else (opaque TCP).
    Other,
    /// Nothing arrived within the detection time: TCP.
    Timeout,
    /// The client closed or reset first.
    Closed,
}

const METHODS: [&[u8]; 9] = [
    b"GET ",
    b"POST ",
    b"PUT ",
    b"DELETE ",
    b"HEAD ",
    b"OPTIONS ",
    b"PATCH ",
    b"CONNECT ",
    b"TRACE ",
];
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Whether `b` (the first bytes of a stream) can only be HTTP: `Some(true)` / `Some(false)`, or
/// `None` when more bytes are needed to tell.
pub fn looks_like_http(b: &[u8]) -> Option<bool> {
    let mut undecided = false;
    for m in METHODS.iter().copied().chain(std::iter::once(H2_PREFACE)) {
        let n = m.len().min(b.len());
        if b[..n] == m[..n] {
            if b.len() >= m.len() {
                return Some(true);
            }
            undecided = true;
        }
    }
    if undecided {
        None
    } else {
        Some(false)
    }
}

/// Wait up to `wait` for the client's first bytes and tell whether they are HTTP.
pub async fn sniff_http(client: &TcpStream, wait: Duration) -> Sniffed {
    let deadline = std::time::Instant::now() + wait;
    let mut buf = [0u8; 24];
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match monoio::time::timeout(left, client.readable(false)).await {
            Err(_) => return Sniffed::Timeout,
            Ok(Err(_)) => return Sniffed::Closed,
            Ok(Ok(())) => {}
        }
        match sys::peek(client.as_raw_fd(), &mut buf) {
            Ok(0) => return Sniffed::Closed,
            Ok(n) => match looks_like_http(&buf[..n]) {
                Some(true) => return Sniffed::Http,
                Some(false) => return Sniffed::Other,
                // A partial method token: wait for more (within the same deadline).
                None if left.is_zero() => return Sniffed::Timeout,
                None => monoio::time::sleep(Duration::from_millis(1)).await,
            },
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Sniffed::Closed,
        }
    }
}

/// The ALPN protocols offered by the TLS ClientHello waiting on `client` (peeked, not consumed);
/// `None` if no complete ClientHello is there yet.
pub fn offered_alpn(client: &TcpStream) -> Option<Vec<Vec<u8>>> {
    let mut buf = vec![0u8; 16 * 1024];
    let n = sys::peek(client.as_raw_fd(), &mut buf).ok()?;
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = &buf[..n];
    acceptor.read_tls(&mut rd).ok()?;
    match acceptor.accept() {
        Ok(Some(accepted)) => Some(
            accepted
                .client_hello()
                .alpn()
                .map(|it| it.map(|p| p.to_vec()).collect())
                .unwrap_or_default(),
        ),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_is_told_from_other_protocols() {
        assert_eq!(looks_like_http(b"GET / HTTP/1.1\r\n"), Some(true));
        assert_eq!(looks_like_http(b"POST /x"), Some(true));
        assert_eq!(looks_like_http(b"PRI * HTTP/2.0\r\n\r\nSM"), Some(true));
        assert_eq!(looks_like_http(b"GE"), None, "a partial token waits");
        assert_eq!(looks_like_http(b"PRI * HT"), None);
        assert_eq!(looks_like_http(b"\x16\x03\x01"), Some(false), "TLS");
        assert_eq!(
            looks_like_http(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Some(false),
            "PostgreSQL SSLRequest"
        );
        assert_eq!(looks_like_http(b"EHLO x\r\n"), Some(false));
        assert_eq!(looks_like_http(b"GETX"), Some(false));
    }
}
