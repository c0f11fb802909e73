//! The mesh configs against each other in memory (no sockets): a full handshake, a resumed one,
//! and the refusals. scripts/test.sh runs these on ring and on AWS-LC (`--features aws-lc-rs`).

use std::io::{Read, Write};

use super::*;
use rcgen::{CertificateParams, IsCa, Issuer, KeyPair, SanType};
use rustls::{CipherSuite, Connection, HandshakeKind, NamedGroup};

const TD: &str = "mesh.test";

/// A CA, and leaves it signs, written as the files a sidecar is given.
struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
}

impl Pki {
    /// A CA named `CA <tag>`.
    fn new(tag: &str) -> Pki {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let pid = std::process::id();
        let dir = std::env::temp_dir().join(format!("ringside-tls-test-{pid}-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(rcgen::DnType::CommonName, format!("CA {tag}"));
        let ca_pem = p.self_signed(&key).unwrap().pem();
        Pki {
            dir,
            issuer: Issuer::new(p, key),
            ca_pem,
        }
    }

    /// A leaf for `spiffe://mesh.test/ns/default/sa/<service>`, trusting `trust`'s CA.
    fn leaf(&self, service: &str, trust: &Pki) -> Material {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        let id = format!("spiffe://{TD}/ns/default/sa/{service}");
        p.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let files = TlsFiles {
            cert: self.dir.join(format!("{service}.crt")),
            key: self.dir.join(format!("{service}.key")),
            ca: self.dir.join(format!("{service}.ca")),
        };
        std::fs::write(&files.cert, cert.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        std::fs::write(&files.ca, &trust.ca_pem).unwrap();
        Material::load(&files).unwrap()
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sid(service: &str) -> SpiffeId {
    format!("spiffe://{TD}/ns/default/sa/{service}")
        .parse()
        .unwrap()
}

/// The outbound side's config: the expected service is the server name.
fn origin(m: &Material) -> Arc<ClientConfig> {
    let expect = Expect::ByServerName {
        trust_domain: TD.into(),
        namespace: "default".into(),
    };
    client_config(m, expect, true).unwrap()
}

/// A handshake that failed: the side that refused, why, and what the other side made of the
/// alert it was sent.
#[derive(Debug, PartialEq)]
struct Refused {
    by: &'static str,
    reason: Reason,
    peer_saw: Option<Reason>,
}

/// Move bytes both ways until neither side has anything to send.
fn drive(client: &mut Connection, server: &mut Connection) -> Result<(), Refused> {
    while flight(client, server, "server")? | flight(server, client, "client")? {}
    Ok(())
}

/// What `from` has to send, to `to` (`by` names `to`); whether anything moved.
fn flight(from: &mut Connection, to: &mut Connection, by: &'static str) -> Result<bool, Refused> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).unwrap();
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).unwrap();
        if let Err(e) = to.process_new_packets() {
            // The alert the refusing side queued, to the other side.
            let mut alert = Vec::new();
            while to.wants_write() {
                to.write_tls(&mut alert).unwrap();
            }
            from.read_tls(&mut &alert[..]).unwrap();
            return Err(Refused {
                by,
                reason: reason_for(&e),
                peer_saw: from.process_new_packets().err().map(|e| reason_for(&e)),
            });
        }
    }
    Ok(!buf.is_empty())
}

fn pair(c: Arc<ClientConfig>, s: Arc<ServerConfig>, service: &str) -> (Connection, Connection) {
    let name = ServerName::try_from(service.to_string()).unwrap();
    (
        Connection::Client(rustls::ClientConnection::new(c, name).unwrap()),
        Connection::Server(rustls::ServerConnection::new(s).unwrap()),
    )
}

#[test]
fn a_full_handshake_then_a_resumed_one_with_aes_128_gcm_and_x25519() {
    let pki = Pki::new("ok");
    let c = origin(&pki.leaf("web", &pki));
    let s = server_config(
        &pki.leaf("products", &pki),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    for (n, kind) in [(1, HandshakeKind::Full), (2, HandshakeKind::Resumed)] {
        let (mut client, mut server) = pair(c.clone(), s.clone(), "products");
        drive(&mut client, &mut server).unwrap();
        assert_eq!(client.handshake_kind(), Some(kind), "connection {n}");
        assert_eq!(
            client.negotiated_cipher_suite().map(|s| s.suite()),
            Some(CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        assert_eq!(
            client.negotiated_key_exchange_group().map(|g| g.name()),
            Some(NamedGroup::X25519)
        );
        assert_eq!(client.alpn_protocol(), Some(ALPN_TCP));
        assert_eq!(
            session::peer_id(&server),
            Some(sid("web")),
            "connection {n}"
        );
        // Bytes through, both ways.
        client.writer().write_all(&[7u8; 10_000]).unwrap();
        server.writer().write_all(b"pong").unwrap();
        drive(&mut client, &mut server).unwrap();
        let mut got = Vec::new();
        let _ = server.reader().read_to_end(&mut got);
        assert_eq!(got, vec![7u8; 10_000]);
        let mut got = Vec::new();
        let _ = client.reader().read_to_end(&mut got);
        assert_eq!(got, b"pong");
    }
}

#[test]
fn a_client_the_intentions_do_not_allow_is_refused_with_access_denied() {
    let pki = Pki::new("denied");
    let c = origin(&pki.leaf("intruder", &pki));
    let s = server_config(
        &pki.leaf("products", &pki),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    // The source reads the alert as the destination's refusal.
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "server",
            reason: Reason::IntentionDenied,
            peer_saw: Some(Reason::DeniedByDestination),
        })
    );
}

#[test]
fn a_server_with_another_services_identity_is_refused() {
    let pki = Pki::new("mismatch");
    let c = origin(&pki.leaf("web", &pki));
    // A valid certificate of the same mesh, but for another service than the one dialled.
    let s = server_config(&pki.leaf("billing", &pki), Arc::new(AllowList(vec![]))).unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsIdentityMismatch,
            peer_saw: Some(Reason::TlsIdentityMismatch),
        })
    );
}

#[test]
fn certificates_from_another_ca_are_refused_on_both_sides() {
    let mesh = Pki::new("mesh");
    let rogue = Pki::new("rogue");
    // A server whose certificate another CA signed, under the right name.
    let c = origin(&mesh.leaf("web", &mesh));
    let s = server_config(&rogue.leaf("products", &mesh), Arc::new(AllowList(vec![]))).unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsUnknownCa),
        })
    );
    // A client whose certificate another CA signed, under an allowed name.
    let c = origin(&rogue.leaf("web", &mesh));
    let s = server_config(
        &mesh.leaf("products", &mesh),
        Arc::new(AllowList(vec![sid("web")])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "server",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsUnknownCa),
        })
    );
    // A CA that takes the mesh CA's name, with a key of its own: the chain is found by name and
    // its signature does not verify (answered with the `decrypt_error` alert).
    let impostor = Pki::new("mesh");
    let c = origin(&mesh.leaf("web", &mesh));
    let s = server_config(
        &impostor.leaf("products", &mesh),
        Arc::new(AllowList(vec![])),
    )
    .unwrap();
    let (mut client, mut server) = pair(c, s, "products");
    assert_eq!(
        drive(&mut client, &mut server),
        Err(Refused {
            by: "client",
            reason: Reason::TlsUnknownCa,
            peer_saw: Some(Reason::TlsHandshakeFailed),
        })
    );
}
