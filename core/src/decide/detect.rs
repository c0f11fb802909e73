//! Protocol detection, sans-IO: fed the bytes that have arrived (peeked by the caller, nothing is
//! consumed) and the time, it says what the client speaks, or how many bytes in all it must have
//! before it can tell. The I/O side turns that count into the socket's receive low-water mark, so
//! a client that sent five bytes of a TLS record and went quiet costs no wake-up until it sends the
//! rest or its deadline passes (one deadline per connection, from the listener's detection time).
//!
//! A client that sends nothing before the deadline (a server-first protocol such as SMTP, MySQL or
//! PostgreSQL's SSL probe answer) is `Timeout`; the plan decides what that means for its listener.

use std::time::{Duration, Instant};

/// ALPN protocol for plain TCP inside the mesh tunnel.
pub const ALPN_TCP: &[u8] = b"ringside/tcp";
/// ALPN of mesh connections that carry HTTP (the L7 path).
pub const ALPN_HTTP: &[u8] = b"ringside/http";

/// What the listener must tell apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// HTTP or anything else (outbound to an undeclared service).
    Http,
    /// A TLS ClientHello (with its ALPN) or plaintext; plaintext is further told HTTP or not.
    TlsOrPlain,
}

/// What the first bytes say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detection {
    /// Not enough bytes yet: feed again once this many (in all) have arrived.
    NeedMore(usize),
    /// An HTTP/1.x request line or the HTTP/2 preface.
    Http,
    /// A TLS ClientHello; `alpn` is what it offers (`None`: offered nothing, or the hello is
    /// larger than [`MAX_HELLO`] or malformed and was not parsed: the plan must not rely on it).
    Tls {
        /// Offered ALPN protocols.
        alpn: Option<Vec<Vec<u8>>>,
    },
    /// Something else (opaque TCP).
    Other,
    /// The deadline passed before the bytes said anything.
    Timeout,
}

/// The largest ClientHello (handshake message) that is parsed for its ALPN.
pub const MAX_HELLO: usize = 64 * 1024;

/// One connection's detection: what to tell apart, and until when.
#[derive(Debug, Clone, Copy)]
pub struct Detector {
    want: Want,
    deadline: Instant,
}

impl Detector {
    /// Start detecting at `now`, for at most `wait`.
    pub fn new(want: Want, now: Instant, wait: Duration) -> Detector {
        Detector {
            want,
            deadline: now + wait,
        }
    }

    /// When detection gives up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Decide from `bytes` (everything that arrived so far) at `now`. `eof`: the client shut its
    /// side, so no more bytes will come and a partial message is taken as what it is.
    pub fn feed(&self, bytes: &[u8], now: Instant, eof: bool) -> Detection {
        match classify(self.want, bytes) {
            Detection::NeedMore(_) if bytes.is_empty() && eof => Detection::Other,
            Detection::NeedMore(_) if eof => match self.want {
                Want::TlsOrPlain if bytes[0] == 0x16 => Detection::Tls { alpn: None },
                _ => Detection::Other,
            },
            Detection::NeedMore(_) if now >= self.deadline => Detection::Timeout,
            d => d,
        }
    }
}

/// What `bytes` say, without a clock.
pub fn classify(want: Want, bytes: &[u8]) -> Detection {
    if bytes.is_empty() {
        return Detection::NeedMore(1);
    }
    match want {
        Want::TlsOrPlain if bytes[0] == 0x16 => client_hello(bytes),
        _ => http(bytes),
    }
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

fn http(b: &[u8]) -> Detection {
    let mut need: Option<usize> = None;
    for m in METHODS.iter().copied().chain(std::iter::once(H2_PREFACE)) {
        let n = m.len().min(b.len());
        if b[..n] == m[..n] {
            if b.len() >= m.len() {
                return Detection::Http;
            }
            need = Some(need.map_or(m.len(), |k| k.min(m.len())));
        }
    }
    match need {
        Some(n) => Detection::NeedMore(n),
        None => Detection::Other,
    }
}

/// Whether `b` (the first bytes of a stream) can only be HTTP: `Some(true)` / `Some(false)`, or
/// `None` when more bytes are needed to tell.
pub fn looks_like_http(b: &[u8]) -> Option<bool> {
    match http(b) {
        Detection::Http => Some(true),
        Detection::NeedMore(_) => None,
        _ => Some(false),
    }
}

/// TLS record header: handshake (22), version 3.x, length.
const RECORD_HEADER: usize = 5;
/// Handshake message header: type, 24-bit length.
const HS_HEADER: usize = 4;
/// The largest TLS plaintext record (2^14) plus what a record may add.
const MAX_RECORD: usize = (1 << 14) + 2048;

fn client_hello(b: &[u8]) -> Detection {
    // Walk the handshake records until the ClientHello message is complete.
    let mut off = 0;
    let mut payload = 0usize;
    let mut hello_len: Option<usize> = None;
    loop {
        if b.len() < off + RECORD_HEADER {
            // A prefix that can still become a record header.
            let have = &b[off..];
            if have.first().is_some_and(|&t| t != 0x16) || have.get(1).is_some_and(|&v| v != 3) {
                return not_hello(off);
            }
            return Detection::NeedMore(off + RECORD_HEADER);
        }
        let h = &b[off..off + RECORD_HEADER];
        let len = u16::from_be_bytes([h[3], h[4]]) as usize;
        if h[0] != 0x16 || h[1] != 3 || len == 0 || len > MAX_RECORD {
            return not_hello(off);
        }
        let body = off + RECORD_HEADER;
        if hello_len.is_none() {
            if b.len() < body + HS_HEADER.min(len) {
                return Detection::NeedMore(body + HS_HEADER.min(len));
            }
            if len >= HS_HEADER {
                if b[body] != 1 {
                    // A handshake that is not a ClientHello.
                    return Detection::Tls { alpn: None };
                }
                let n = u32::from_be_bytes([0, b[body + 1], b[body + 2], b[body + 3]]) as usize;
                if n + HS_HEADER > MAX_HELLO {
                    return Detection::Tls { alpn: None };
                }
                hello_len = Some(n + HS_HEADER);
            }
        }
        if b.len() < body + len {
            return Detection::NeedMore(body + len);
        }
        payload += len;
        off = body + len;
        if hello_len.is_some_and(|n| payload >= n) {
            return Detection::Tls {
                alpn: parse_alpn(&b[..off]),
            };
        }
        if off > MAX_HELLO + 8 * RECORD_HEADER {
            return Detection::Tls { alpn: None };
        }
    }
}

/// Bytes that start like TLS but are not a handshake record: plaintext from the first record on.
fn not_hello(off: usize) -> Detection {
    if off == 0 {
        Detection::Other
    } else {
        Detection::Tls { alpn: None }
    }
}

/// The ALPN protocols of a complete ClientHello (rustls parses it).
fn parse_alpn(records: &[u8]) -> Option<Vec<Vec<u8>>> {
    let mut acceptor = rustls::server::Acceptor::default();
    let mut rd = records;
    while !rd.is_empty() {
        match acceptor.read_tls(&mut rd) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(Some(accepted)) => accepted
            .client_hello()
            .alpn()
            .map(|it| it.map(|p| p.to_vec()).collect()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A real ClientHello from rustls, offering `alpn`, with `pad` bytes of extra extension data
    /// (a large hello spans several records).
    fn hello(alpn: &[&[u8]], pad: usize) -> Vec<u8> {
        use std::sync::Arc;
        #[derive(Debug)]
        struct NoVerify;
        impl rustls::client::danger::ServerCertVerifier for NoVerify {
            fn verify_server_cert(
                &self,
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &[rustls::pki_types::CertificateDer<'_>],
                _: &rustls::pki_types::ServerName<'_>,
                _: &[u8],
                _: rustls::pki_types::UnixTime,
            ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
                Ok(rustls::client::danger::ServerCertVerified::assertion())
            }
            fn verify_tls12_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn verify_tls13_signature(
                &self,
                _: &[u8],
                _: &rustls::pki_types::CertificateDer<'_>,
                _: &rustls::DigitallySignedStruct,
            ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error>
            {
                Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
            }
            fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
                vec![rustls::SignatureScheme::ECDSA_NISTP256_SHA256]
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut c = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify))
            .with_no_client_auth();
        c.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        if pad > 0 {
            // A long ALPN list is the simplest way to make the hello large.
            let n = pad / 250 + 1;
            for k in 0..n {
                c.alpn_protocols
                    .push(format!("pad{k:04}-{}", "x".repeat(240)).into_bytes());
            }
        }
        let name = rustls::pki_types::ServerName::try_from("products").unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(c), name).unwrap();
        let mut out = Vec::new();
        while conn.wants_write() {
            conn.write_tls(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn http_is_told_from_other_protocols() {
        let c = |b: &[u8]| classify(Want::Http, b);
        assert_eq!(c(b"GET / HTTP/1.1\r\n"), Detection::Http);
        assert_eq!(c(b"POST /x"), Detection::Http);
        assert_eq!(c(b"PRI * HTTP/2.0\r\n\r\nSM"), Detection::Http);
        assert_eq!(c(b"GE"), Detection::NeedMore(4), "a partial token waits");
        assert_eq!(
            c(b"P"),
            Detection::NeedMore(4),
            "PUT is the shortest P-method"
        );
        assert_eq!(c(b"PRI * HT"), Detection::NeedMore(16));
        assert_eq!(c(b"\x16\x03\x01"), Detection::Other, "TLS is not HTTP");
        assert_eq!(
            c(b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
            Detection::Other,
            "PostgreSQL SSLRequest"
        );
        assert_eq!(c(b"EHLO x\r\n"), Detection::Other);
        assert_eq!(c(b"GETX"), Detection::Other);
        assert_eq!(c(b""), Detection::NeedMore(1));
        assert_eq!(looks_like_http(b"GE"), None);
        assert_eq!(looks_like_http(b"GET "), Some(true));
    }

    #[test]
    fn client_hello_byte_by_byte_asks_for_exactly_what_it_needs() {
        let h = hello(&[b"ringside/http"], 0);
        let mut fed = 0;
        let mut asks = 0;
        loop {
            match classify(Want::TlsOrPlain, &h[..fed]) {
                Detection::NeedMore(n) => {
                    assert!(
                        n > fed && n <= h.len(),
                        "asks {n} with {fed} of {}",
                        h.len()
                    );
                    fed = n;
                    asks += 1;
                }
                Detection::Tls { alpn } => {
                    assert_eq!(alpn, Some(vec![b"ringside/http".to_vec()]));
                    assert_eq!(fed, h.len(), "decided at the end of the hello");
                    break;
                }
                d => panic!("{d:?} after {fed} bytes"),
            }
        }
        // First byte, record header, handshake header, whole record: four waits, not one per byte.
        assert!(asks <= 4, "{asks} waits");
    }

    #[test]
    fn alpn_variants() {
        for (alpn, want) in [
            (
                vec![&b"ringside/tcp"[..]],
                Some(vec![b"ringside/tcp".to_vec()]),
            ),
            (vec![], None),
            (
                vec![&b"h2"[..], &b"ringside/http"[..]],
                Some(vec![b"h2".to_vec(), b"ringside/http".to_vec()]),
            ),
        ] {
            let h = hello(&alpn, 0);
            assert_eq!(
                classify(Want::TlsOrPlain, &h),
                Detection::Tls { alpn: want },
                "{alpn:?}"
            );
        }
    }

    #[test]
    fn a_hello_over_several_records_is_parsed_whole() {
        let h = hello(&[b"ringside/tcp"], 17 * 1024);
        // rustls fragments a hello above 16 KiB into records of at most 16 KiB.
        let first = u16::from_be_bytes([h[3], h[4]]) as usize;
        assert!(h.len() > 17 * 1024 && first < h.len() - 5, "spans records");
        assert_eq!(
            classify(Want::TlsOrPlain, &h[..first + 5]),
            Detection::NeedMore(first + 10),
            "waits for the next record's header"
        );
        match classify(Want::TlsOrPlain, &h) {
            Detection::Tls { alpn: Some(a) } => assert_eq!(a[0], b"ringside/tcp".to_vec()),
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn five_quiet_bytes_wait_until_the_deadline() {
        let t0 = Instant::now();
        let d = Detector::new(Want::TlsOrPlain, t0, Duration::from_secs(5));
        let header = [0x16, 3, 1, 2, 0];
        assert_eq!(d.feed(&header, t0, false), Detection::NeedMore(9));
        assert_eq!(
            d.feed(&header, t0 + Duration::from_millis(4999), false),
            Detection::NeedMore(9)
        );
        assert_eq!(
            d.feed(&header, t0 + Duration::from_secs(5), false),
            Detection::Timeout
        );
        assert_eq!(
            d.feed(&[], t0 + Duration::from_secs(6), false),
            Detection::Timeout
        );
        assert_eq!(
            d.feed(&header, t0, true),
            Detection::Tls { alpn: None },
            "a half hello then EOF: TLS that will fail its handshake"
        );
        assert_eq!(d.feed(b"", t0, true), Detection::Other);
    }

    #[test]
    fn plaintext_on_a_tls_listener_is_told_http_or_not() {
        assert_eq!(
            classify(Want::TlsOrPlain, b"GET / HTTP/1.1"),
            Detection::Http
        );
        assert_eq!(classify(Want::TlsOrPlain, b"SSH-2.0-x"), Detection::Other);
        assert_eq!(
            classify(Want::TlsOrPlain, &[0x16, 0x00, 0x00]),
            Detection::Other,
            "0x16 that is not a TLS record"
        );
        assert_eq!(
            classify(Want::TlsOrPlain, &[0x16, 3, 1, 0, 0]),
            Detection::Other,
            "an empty record"
        );
        assert_eq!(
            classify(Want::TlsOrPlain, &[0x16, 3, 1, 0x50, 0]),
            Detection::Other,
            "a record larger than TLS allows"
        );
        let mut not_hello = vec![0x16, 3, 3, 0, 8, 2, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(
            classify(Want::TlsOrPlain, &not_hello),
            Detection::Tls { alpn: None },
            "a ServerHello is TLS, but no ClientHello"
        );
        not_hello[5] = 1;
        not_hello[8] = 0xff;
        assert_eq!(
            classify(Want::TlsOrPlain, &not_hello),
            Detection::NeedMore(18),
            "a hello declared longer than its first record waits for the next one"
        );
    }
}
