//! The operator API over TCP (`ringctl daemon --listen`): a remote operator session with TLS and
//! an operator token, and the attacks it must refuse: no credential, a wrong one, a proxy token, a
//! revoked one, plain HTTP on the TLS port, a client that verifies nothing, and a server that is
//! not the daemon (a stranger's CA, or a mesh workload's certificate) for `ringctl`.
//!
//! No root needed: the daemon serves from a temporary directory.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use ringside_tests::ctl::Daemon;
use ringside_tests::*;

const DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: payments
spec:
  protocol: http
";

/// `ringctl ARGS` with `env` and none of the caller's `RINGCTL_*` variables; (ok, stdout, stderr).
fn ringctl_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(workspace_bin("ringctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("RINGCTL_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A daemon with its operator port on 127.0.0.1, and the CA bundle an operator takes from it.
struct Mesh {
    daemon: Daemon,
    port: u16,
    bundle: PathBuf,
}

impl Mesh {
    fn start(tag: &str) -> Mesh {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let daemon = Daemon::start(
            &format!("ringside-remote-{tag}-{}", std::process::id()),
            &[
                "--listen",
                &listen,
                "--node",
                "node-a",
                "--trust-domain",
                "shop",
            ],
        );
        let bundle = daemon.dir.join("mesh-ca.pem");
        daemon.ok(&["ca", "bundle", "--out", bundle.to_str().unwrap()]);
        Mesh {
            daemon,
            port,
            bundle,
        }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A new operator token, made on the node (the socket).
    fn operator_token(&self, name: &str) -> String {
        let t = self
            .daemon
            .ok(&["operator", "token", "create", "--name", name])
            .trim()
            .to_string();
        assert!(t.starts_with("ringop-") && t.len() == 7 + 64, "{t}");
        t
    }

    /// `ringctl --server URL --ca-file BUNDLE --token TOKEN ARGS`.
    fn remote(&self, token: &str, args: &[&str]) -> (bool, String, String) {
        let url = self.url();
        let mut all = vec![
            "--server",
            url.as_str(),
            "--ca-file",
            self.bundle.to_str().unwrap(),
            "--token",
            token,
        ];
        all.extend_from_slice(args);
        ringctl_env(&all, &[])
    }
}

/// A client that checks nothing about the server: what an attacker uses.
#[derive(Debug)]
struct AnyServer;

impl rustls::client::danger::ServerCertVerifier for AnyServer {
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
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// One HTTP/1.1 request over TLS from a client that verifies nothing; (status, body).
fn raw_request(addr: SocketAddr, method: &str, path: &str, auth: Option<&str>) -> (u16, String) {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), "attacker".try_into().unwrap()).unwrap();
    let sock = TcpStream::connect(addr).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let body = if method == "POST" { DOCS } else { "" };
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(a) = auth {
        req.push_str(&format!("Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    tls.write_all(req.as_bytes()).unwrap();
    let mut resp = Vec::new();
    // The daemon closes without close_notify at times: what arrived is what counts.
    let _ = tls.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).into_owned();
    let status = text
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP answer to {method} {path}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// The daemon's signing root (certificate, key), read from its data directory.
fn daemon_root(d: &Daemon) -> (String, String) {
    let dir = d.dir.join("data/ca");
    let key = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .unwrap_or_else(|| panic!("no root key in {}", dir.display()));
    (
        std::fs::read_to_string(key.with_extension("pem")).unwrap(),
        std::fs::read_to_string(&key).unwrap(),
    )
}

/// A TLS server that presents `cert`/`key` to one connection; returns its address and whether it
/// received any request bytes (the operator token would be among them).
fn impostor(cert: &str, key: &str) -> (SocketAddr, std::thread::JoinHandle<bool>) {
    use rustls::pki_types::pem::PemObject;
    let chain: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let h = std::thread::spawn(move || {
        let (sock, _) = l.accept().unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let conn = rustls::ServerConnection::new(Arc::new(config)).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        let mut buf = [0u8; 4096];
        matches!(tls.read(&mut buf), Ok(n) if n > 0)
    });
    (addr, h)
}

#[test]
fn remote_operator_session_over_tls() {
    let m = Mesh::start("session");
    let alice = m.operator_token("alice");
    let dir = m.daemon.dir.clone();
    let docs = dir.join("docs.yaml");
    std::fs::write(&docs, DOCS).unwrap();

    // apply and get through the TCP port, the options as flags.
    let (ok, out, err) = m.remote(&alice, &["apply", "-f", docs.to_str().unwrap()]);
    assert!(ok, "{err}\n{}", m.daemon.log());
    assert!(out.contains("ServiceDefaults/payments applied"), "{out}");
    let (ok, out, err) = m.remote(&alice, &["get", "config"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("KIND") && out.contains("payments"), "{out}");
    let (ok, out, err) = m.remote(
        &alice,
        &["register", "service", "payments", "--port", "1800:8080"],
    );
    assert!(ok && out.contains("registered"), "{out}{err}");

    // The same, the options from the environment (token in a file), and the host by name.
    let token_file = dir.join("alice.token");
    std::fs::write(&token_file, format!("{alice}\n")).unwrap();
    let url = format!("https://localhost:{}", m.port);
    let env = [
        ("RINGCTL_SERVER", url.as_str()),
        ("RINGCTL_CA_FILE", m.bundle.to_str().unwrap()),
        ("RINGCTL_TOKEN_FILE", token_file.to_str().unwrap()),
    ];
    let (ok, out, err) = ringctl_env(&["get", "services"], &env);
    assert!(ok, "{err}");
    assert!(
        out.contains("payments") && out.contains("1800->8080"),
        "{out}"
    );
    // A flag beats the environment: a wrong --token on the command line is refused.
    let (ok, _, err) = ringctl_env(&["get", "services", "--token", "ringop-nope"], &env);
    assert!(!ok && err.contains("403"), "{err}");

    // The proxies of the daemon's node, with their NODE; a report reaches the proxy socket.
    let proxy_token = m
        .daemon
        .ok(&["token", "create", "--service", "payments"])
        .trim()
        .to_string();
    let report = serde_json::json!({
        "id": "payments-1", "service": "payments", "address": "198.18.0.9",
        "applied_index": 1, "cert_generation": 0, "cert_not_after": 4_000_000_000i64,
    });
    let (status, answer) = ringside_core::control::http_call(
        &m.daemon.proxy_socket,
        "POST",
        "/v1/proxy/report",
        Some(report.to_string()),
        Some(&proxy_token),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200, "{answer:?}");
    let (ok, out, err) = m.remote(&alice, &["get", "proxies"]);
    assert!(ok, "{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(header.starts_with("ID") && header.contains("NODE"), "{out}");
    let row = lines.next().unwrap_or_default();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["payments-1", "node-a", "payments"], "{out}");
    let (_, json, _) = m.remote(&alice, &["get", "proxies", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v[0]["node"], "node-a", "{json}");

    // `issue` through the port: the proxy token travels beside the operator's.
    let (k, c, b) = (dir.join("w.key"), dir.join("w.pem"), dir.join("w.bundle"));
    let (ok, out, err) = m.remote(
        &alice,
        &[
            "issue",
            "--proxy-token",
            &proxy_token,
            "--key-out",
            k.to_str().unwrap(),
            "--cert-out",
            c.to_str().unwrap(),
            "--bundle-out",
            b.to_str().unwrap(),
        ],
    );
    assert!(ok && out.contains("issued for payments"), "{out}{err}");
    let info = ringside_core::tls::inspect_file(&c).unwrap();
    assert_eq!(
        info[0].uris,
        vec!["spiffe://shop/ns/default/sa/payments".to_string()]
    );

    // Tokens are listed by name (never shown again) and revoked at once.
    let (ok, out, _) = m.remote(&alice, &["operator", "token", "list"]);
    assert!(
        ok && out.starts_with("NAME") && out.contains("alice"),
        "{out}"
    );
    assert!(!out.contains(&alice[7..]), "a token is shown once: {out}");
    let bob = m.operator_token("bob");
    assert!(m.remote(&bob, &["get", "config"]).0);
    let (ok, _, err) = m.remote(&alice, &["operator", "token", "create", "--name", "bob"]);
    assert!(!ok && err.contains("exists"), "{err}");
    let (ok, out, err) = m.remote(&alice, &["operator", "token", "revoke", "bob"]);
    assert!(ok && out.contains("bob revoked"), "{out}{err}");
    let (ok, _, err) = m.remote(&bob, &["get", "config"]);
    assert!(
        !ok && err.contains("not an operator token") && err.contains("403"),
        "{err}"
    );

    // The audit trail names the operator.
    assert!(
        m.daemon.log().contains("operator alice from 127.0.0.1:"),
        "{}",
        m.daemon.log()
    );
    // The local socket is unchanged: no token there.
    let (ok, out, _) = m.daemon.ringctl(&["get", "config"]);
    assert!(ok && out.contains("payments"), "{out}");
}

#[test]
fn the_operator_port_refuses_everyone_else() {
    let m = Mesh::start("attacks");
    let alice = m.operator_token("alice");
    let revoked = m.operator_token("gone");
    m.daemon.ok(&["operator", "token", "revoke", "gone"]);
    let proxy_token = m
        .daemon
        .ok(&["token", "create", "--service", "payments"])
        .trim()
        .to_string();
    m.daemon.apply(DOCS);

    // Every path, with every wrong credential, from a client that verifies nothing.
    let paths = [
        ("GET", "/v1/config"),
        ("POST", "/v1/apply"),
        ("DELETE", "/v1/config/ServiceDefaults/payments"),
        ("GET", "/v1/proxies"),
        ("POST", "/v1/operator/tokens"),
        ("GET", "/v1/operator/tokens"),
        ("DELETE", "/v1/operator/tokens/alice"),
        ("POST", "/v1/sign"),
        ("GET", "/v1/ca"),
        ("POST", "/v1/ca/rotate"),
        ("GET", "/v1/proxy/config"),
        ("GET", "/v1/no/such/path"),
        ("GET", "/"),
    ];
    let wrong = format!("Bearer ringop-{}", "0".repeat(64));
    let proxy = format!("Bearer {proxy_token}");
    let gone = format!("Bearer {revoked}");
    let basic = format!("Basic {alice}");
    for (method, path) in paths {
        let (status, body) = raw_request(m.addr(), method, path, None);
        assert_eq!(status, 401, "{method} {path} without a token: {body}");
        assert!(body.contains("operator token is required"), "{body}");
        for (what, auth) in [
            ("a wrong token", wrong.as_str()),
            ("a proxy token", proxy.as_str()),
            ("a revoked token", gone.as_str()),
            ("an empty bearer", "Bearer "),
        ] {
            let (status, body) = raw_request(m.addr(), method, path, Some(auth));
            assert!(
                status == 403 || (status == 401 && what == "an empty bearer"),
                "{method} {path} with {what}: {status} {body}"
            );
            assert!(!body.contains("payments"), "{what} read: {body}");
        }
        let (status, _) = raw_request(m.addr(), method, path, Some(&basic));
        assert_eq!(status, 401, "{method} {path}: the token as Basic auth");
    }
    // The same client with the right token is served: the refusals were about the token.
    let (status, body) = raw_request(
        m.addr(),
        "GET",
        "/v1/config",
        Some(&format!("Bearer {alice}")),
    );
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("payments"), "{body}");
    // Nothing the refused requests asked for happened.
    let (_, out, _) = m.daemon.ringctl(&["get", "config"]);
    assert!(
        out.contains("payments"),
        "deleted by a refused request: {out}"
    );
    let (_, out, _) = m.daemon.ringctl(&["operator", "token", "list"]);
    assert!(out.contains("alice") && !out.contains("gone"), "{out}");

    // Plain HTTP on the TLS port: no HTTP answer, nothing served.
    let mut s = TcpStream::connect(m.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(
        format!("GET /v1/config HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {alice}\r\n\r\n")
            .as_bytes(),
    )
    .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let got = String::from_utf8_lossy(&got);
    assert!(
        !got.contains("HTTP/") && !got.contains("payments"),
        "plain HTTP was answered: {got:?}"
    );
    // ringctl itself will not speak plain HTTP.
    let url = format!("http://127.0.0.1:{}", m.port);
    let (ok, _, err) = ringctl_env(
        &[
            "get",
            "config",
            "--server",
            &url,
            "--ca-file",
            m.bundle.to_str().unwrap(),
            "--token",
            &alice,
        ],
        &[],
    );
    assert!(!ok && err.contains("TLS only"), "{err}");

    // ringctl with no token, a proxy token: refused with what to do.
    let (ok, _, err) = ringctl_env(
        &[
            "get",
            "config",
            "--server",
            &m.url(),
            "--ca-file",
            m.bundle.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        !ok && err.contains("401") && err.contains("--token-file"),
        "{err}"
    );
    let (ok, _, err) = m.remote(&proxy_token, &["get", "config"]);
    assert!(!ok && err.contains("403"), "{err}");
    // No CA bundle: refused before connecting.
    let (ok, _, err) = ringctl_env(
        &["get", "config", "--server", &m.url(), "--token", &alice],
        &[],
    );
    assert!(!ok && err.contains("--ca-file"), "{err}");
}

#[test]
fn ringctl_trusts_only_the_daemon() {
    let m = Mesh::start("trust");
    let alice = m.operator_token("alice");
    let dir = m.daemon.dir.clone();

    // A bundle of another CA: the daemon's certificate is not accepted, the token not sent.
    let stranger = ringside_tests::certs::Ca::new("stranger");
    let other = dir.join("other-ca.pem");
    std::fs::write(&other, &stranger.pem).unwrap();
    let url = m.url();
    let (ok, _, err) = ringctl_env(
        &[
            "get",
            "config",
            "--server",
            &url,
            "--ca-file",
            other.to_str().unwrap(),
            "--token",
            &alice,
        ],
        &[],
    );
    assert!(!ok && err.contains("TLS with the daemon"), "{err}");

    // A server the stranger vouches for, reached with the stranger's bundle, is still not the
    // daemon... and a server with a certificate of the mesh's own CA for the right host but a
    // workload's identity (what a compromised sidecar could get) is refused too.
    let (root_cert, root_key) = daemon_root(&m.daemon);
    let mesh_ca = ringside_tests::certs::Ca::from_pem(&root_cert, &root_key);
    let (cert, key) =
        mesh_ca.leaf_for_hosts(&["spiffe://shop/ns/default/sa/payments"], &["127.0.0.1"]);
    let (addr, saw_request) = impostor(&cert, &key);
    let (ok, _, err) = ringctl_env(
        &[
            "get",
            "config",
            "--server",
            &format!("https://{addr}"),
            "--ca-file",
            m.bundle.to_str().unwrap(),
            "--token",
            &alice,
        ],
        &[],
    );
    assert!(!ok && err.contains("not the daemon's"), "{err}");
    assert!(
        !saw_request.join().unwrap(),
        "the token reached an impostor"
    );

    // The same certificate with the daemon's identity is accepted (the check above is the
    // identity, not something else).
    let (cert, key) = mesh_ca.leaf_for_hosts(&["spiffe://shop/ringside/daemon"], &["127.0.0.1"]);
    let (addr, saw_request) = impostor(&cert, &key);
    let _ = ringctl_env(
        &[
            "get",
            "config",
            "--server",
            &format!("https://{addr}"),
            "--ca-file",
            m.bundle.to_str().unwrap(),
            "--token",
            &alice,
        ],
        &[],
    );
    assert!(saw_request.join().unwrap(), "a daemon identity was refused");

    // The daemon's own certificate: from the mesh CA, for its names, with its identity.
    let cert = served_certificate(m.addr());
    let info = ringside_core::tls::CertInfo::from_der(&cert).unwrap();
    assert_eq!(info.uris, vec!["spiffe://shop/ringside/daemon".to_string()]);
    assert!(!info.is_ca);
    check_bundle(&m.bundle, &root_cert);
}

/// The certificate the daemon presents.
fn served_certificate(addr: SocketAddr) -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_no_client_auth();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), "localhost".try_into().unwrap()).unwrap();
    let mut sock = TcpStream::connect(addr).unwrap();
    while conn.is_handshaking() {
        conn.complete_io(&mut sock).unwrap();
    }
    conn.peer_certificates().unwrap()[0].to_vec()
}

/// `ringctl ca bundle` wrote the daemon's root.
fn check_bundle(bundle: &Path, root_pem: &str) {
    let text = std::fs::read_to_string(bundle).unwrap();
    assert!(text.contains(root_pem.trim()), "{text}");
}
