//! The destination's boundary, attacked the way a caller would: a client holding a valid
//! certificate of an allowed source (issued by the daemon) talks to the destination's sidecar
//! directly, with other ALPNs, no ALPN, a ClientHello over several records, forged identity
//! headers and disguised paths; certificates signed by the mesh CA for a foreign trust domain or
//! with two identities; connections to the proxy's own ports; loopback-only apps; thousands of
//! clients that start a ClientHello and go quiet. The source's side too: a server from the mesh's
//! root with a foreign trust domain, another namespace or two identities gets nothing from it;
//! and a flood of inbound connections at the proxy's inbound cap leaves the pod's outbound
//! connections alone. Needs root (pods).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ringside_tests::certs::{Ca, Validity};
use ringside_tests::ctl::Daemon;
use ringside_tests::http::{serve, Client};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::wait_for;

const DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: api
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: api
spec:
  destination:
    name: api
  sources:
    - name: frontend
      permissions:
        - action: deny
          http:
            pathPrefix: /admin
            caseInsensitive: true
        - action: allow
          http:
            methods: [GET]
";

/// A client that checks nothing about the server (an attacker only needs to be accepted).
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

/// A client config presenting `cert`/`key`, offering `alpn`.
fn client_config(cert_pem: &str, key_pem: &str, alpn: Vec<Vec<u8>>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .dangerous()
    .with_custom_certificate_verifier(Arc::new(AnyServer))
    .with_client_auth_cert(certs, key)
    .unwrap();
    c.alpn_protocols = alpn;
    Arc::new(c)
}

/// ALPN lists: one protocol, none, and a list long enough that the ClientHello is ~17 KiB (it
/// spans two TLS records).
fn alpn_variants() -> Vec<(&'static str, Vec<Vec<u8>>)> {
    let mut big = vec![b"ringside/tcp".to_vec()];
    for k in 0..70 {
        big.push(format!("pad{k:03}-{}", "x".repeat(240)).into_bytes());
    }
    vec![
        ("ringside/tcp", vec![b"ringside/tcp".to_vec()]),
        ("no ALPN", vec![]),
        ("17 KiB ClientHello", big),
    ]
}

/// From `pod`, open TLS to `to` with `cfg`, send `request`, read until the server closes (or 5 s).
/// Returns what came back (empty when refused).
fn tls_exchange(
    pod: &Pod,
    to: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    request: Vec<u8>,
) -> Result<String, String> {
    pod.enter(move || {
        let sock = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let name = rustls::pki_types::ServerName::try_from("api").unwrap();
        let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(&request).map_err(|e| format!("write: {e}"))?;
        let mut out = Vec::new();
        let r = tls.read_to_end(&mut out);
        let text = String::from_utf8_lossy(&out).into_owned();
        match r {
            Ok(_) => Ok(text),
            Err(_) if !text.is_empty() => Ok(text),
            Err(e) => Err(format!("read: {e}")),
        }
    })
    .join()
    .unwrap()
}

fn request(method: &str, path: &str, extra: &str) -> Vec<u8> {
    format!("{method} {path} HTTP/1.1\r\nhost: api\r\n{extra}connection: close\r\n\r\n")
        .into_bytes()
}

fn vip(daemon: &Daemon, name: &str) -> IpAddr {
    daemon
        .get_json("services")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["virtual_ip"].as_str())
        .unwrap()
        .parse()
        .unwrap()
}

/// A counter from a sidecar's admin `/stats` (read inside its pod).
fn stat(pod: &Pod, name: &str) -> u64 {
    let text = pod
        .enter(|| Client::new().get("http://127.0.0.1:15000/stats"))
        .join()
        .unwrap()
        .unwrap()
        .text();
    let key = format!("ringside_{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(key.as_str()))
        .map(|v| v.trim().parse::<f64>().unwrap() as u64)
        .unwrap_or(0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The daemon's signing root (certificate and key), to forge what a compromised issuer could.
fn daemon_root(dir: &Path) -> Ca {
    let ca_dir = dir.join("data").join("ca");
    let key: PathBuf = std::fs::read_dir(&ca_dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "key"))
        .unwrap_or_else(|| panic!("no root key in {}", ca_dir.display()));
    Ca::from_pem(
        &std::fs::read_to_string(key.with_extension("pem")).unwrap(),
        &std::fs::read_to_string(&key).unwrap(),
    )
}

#[test]
fn the_destination_boundary_holds() {
    if !pods_available("the_destination_boundary_holds") {
        return;
    }
    // Enough descriptors for 2,000 attacking connections from this process.
    let lim = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: setrlimit reads a valid rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };

    let mut net = Net::new();
    let front = net.pod("front");
    let api = net.pod("api");
    let att = net.pod("att");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "api", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.apply(DOCS);
    for p in [&front, &api] {
        p.install_redirect(&[]);
    }
    let app = api
        .enter(|| serve("api-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    // An app that chose to listen on loopback only, on a port no service declares.
    let secret = api.echo_app("127.0.0.1:6379".parse().unwrap());
    let start_sidecar = |pod: &Pod, service: &str, yaml: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, yaml, &args)
    };
    let s_api = start_sidecar(&api, "api", "sidecar: {}\n");
    let s_front = start_sidecar(&front, "frontend", "sidecar: {}\n");
    let api_url = format!("http://{}", SocketAddr::new(vip(&daemon, "api"), 80));

    // The legitimate caller works, with its identity.
    let t0 = Instant::now();
    let ok = loop {
        let u = format!("{api_url}/items");
        match front.enter(move || Client::new().get(&u)).join().unwrap() {
            Ok(r) if r.status == 200 => break r,
            other if t0.elapsed() > Duration::from_secs(10) => {
                panic!("{other:?}\n{}", s_api.log_text())
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    assert!(
        ok.text()
            .contains("x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/frontend"),
        "{}",
        ok.text()
    );

    // The attacker holds a real certificate of the allowed source.
    let dir = daemon.dir.join("attacker");
    std::fs::create_dir_all(&dir).unwrap();
    let token = std::fs::read_to_string(daemon.token_file("frontend", 0)).unwrap();
    let (k, c, b) = (dir.join("k.pem"), dir.join("c.pem"), dir.join("b.pem"));
    daemon.ok(&[
        "issue",
        "--proxy-token",
        token.trim(),
        "--key-out",
        k.to_str().unwrap(),
        "--cert-out",
        c.to_str().unwrap(),
        "--bundle-out",
        b.to_str().unwrap(),
    ]);
    let (cert, key) = (
        std::fs::read_to_string(&c).unwrap(),
        std::fs::read_to_string(&k).unwrap(),
    );
    let direct = SocketAddr::new(IpAddr::V4(api.ip4), 80);
    let served = app.hits.load(Ordering::SeqCst);

    // 1. L7 permissions cannot be skipped: whatever the ClientHello offers, the service is
    //    declared http, so every request is checked; DELETE is not allowed.
    for (what, alpn) in alpn_variants() {
        let cfg = client_config(&cert, &key, alpn);
        let r = tls_exchange(&att, direct, cfg, request("DELETE", "/x", ""))
            .unwrap_or_else(|e| panic!("{what}: {e}\n{}", s_api.log_text()));
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("request_denied"),
            "{what}: {r}"
        );
        assert_eq!(
            app.hits.load(Ordering::SeqCst),
            served,
            "{what}: the app saw the request"
        );
    }
    // Bytes that are not HTTP inside the allowed TLS: nothing reaches the app either.
    let cfg = client_config(&cert, &key, vec![b"ringside/tcp".to_vec()]);
    let _ = tls_exchange(
        &att,
        direct,
        cfg.clone(),
        b"\x00\x01 not http \r\n\r\n".to_vec(),
    );
    assert_eq!(app.hits.load(Ordering::SeqCst), served);

    // 2. Identity headers cannot be forged: the app sees who the proxy verified.
    let forged = "x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/admin\r\n";
    let r = tls_exchange(&att, direct, cfg.clone(), request("GET", "/who", forged)).unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains("x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/frontend")
            && !r.contains("sa/admin"),
        "{r}"
    );
    let u = format!("{api_url}/who");
    let r = front
        .enter(move || {
            Client::new().send(
                "GET",
                &u,
                &[(
                    "x-forwarded-client-cert",
                    "URI=spiffe://dc1/ns/default/sa/admin",
                )],
                Vec::new(),
            )
        })
        .join()
        .unwrap()
        .unwrap();
    assert!(
        r.text()
            .contains("x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/frontend")
            && !r.text().contains("sa/admin"),
        "{}",
        r.text()
    );
    let served = app.hits.load(Ordering::SeqCst);

    // 3. Paths are normalized before permissions match.
    for p in [
        "/admin",
        "//admin",
        "/%61dmin",
        "/a/../admin",
        "/./admin",
        "/admin/",
        "/ADMIN",
    ] {
        let r = tls_exchange(&att, direct, cfg.clone(), request("GET", p, "")).unwrap();
        assert!(
            r.starts_with("HTTP/1.1 403") && r.contains("request_denied"),
            "{p}: {r}"
        );
    }
    let r = tls_exchange(
        &att,
        direct,
        cfg.clone(),
        request("GET", "/x%2F..%2Fadmin", ""),
    )
    .unwrap();
    assert!(
        r.starts_with("HTTP/1.1 400") && r.contains("bad_request"),
        "encoded slash: {r}"
    );
    assert_eq!(
        app.hits.load(Ordering::SeqCst),
        served,
        "no disguised path got through"
    );

    // 6. SPIFFE checked whole: certificates from the mesh's own root, for a foreign trust
    //    domain, for another namespace, or with two identities, are refused in the handshake.
    let root = daemon_root(&daemon.dir);
    for uris in [
        vec!["spiffe://evil/ns/default/sa/frontend"],
        vec!["spiffe://dc1/ns/other/sa/frontend"],
        vec![
            "spiffe://dc1/ns/default/sa/frontend",
            "spiffe://dc1/ns/default/sa/admin",
        ],
    ] {
        let (c2, k2) = root.leaf_with_uris(&uris, Validity::Valid);
        let cfg = client_config(&c2, &k2, vec![b"ringside/http".to_vec()]);
        let r = tls_exchange(&att, direct, cfg, request("GET", "/items", ""));
        assert!(
            !r.as_deref().is_ok_and(|t| t.contains("HTTP/1.1 200")),
            "{uris:?} was served: {r:?}"
        );
    }
    assert_eq!(app.hits.load(Ordering::SeqCst), served);

    // 4. No loops through the proxy's own ports: from the app's pod, to every local address of
    //    the sidecar's ports; and from another pod straight to the inbound port.
    let before = stat(&front, "upstream_cx_total");
    let targets: Vec<SocketAddr> = vec![
        "127.0.0.1:15001".parse().unwrap(),
        "127.0.0.1:15006".parse().unwrap(),
        "[::1]:15001".parse().unwrap(),
        SocketAddr::new(IpAddr::V4(front.ip4), 15001),
        SocketAddr::new(IpAddr::V4(front.ip4), 15006),
        SocketAddr::new(IpAddr::V4(front.ip4), 15000),
        SocketAddr::new(IpAddr::V4(front.ip4), 15021),
        SocketAddr::new(IpAddr::V6(front.ip6), 15006),
    ];
    let poke = |pod: &Pod, to: Vec<SocketAddr>| {
        pod.enter(move || {
            for a in to {
                for _ in 0..3 {
                    if let Ok(mut s) = TcpStream::connect_timeout(&a, Duration::from_secs(2)) {
                        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                        let _ = s.write_all(b"GET / HTTP/1.1\r\n\r\n");
                        let mut buf = [0u8; 64];
                        let _ = s.read(&mut buf);
                    }
                }
            }
        })
        .join()
        .unwrap()
    };
    poke(&front, targets);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        stat(&front, "upstream_cx_total"),
        before,
        "a connection to the proxy's own port made the proxy connect somewhere"
    );
    let loops = stat(&front, "failures_total{reason=\"proxy_loop\"}");
    let before_api = stat(&api, "upstream_cx_total");
    poke(&att, vec![SocketAddr::new(IpAddr::V4(api.ip4), 15006)]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(stat(&api, "upstream_cx_total"), before_api);

    // 7. Detection costs nothing while it waits: 2,000 clients send five bytes of a TLS record
    //    header and go quiet; the sidecar stays idle, the legitimate caller's latency holds, and
    //    they are closed at the detection deadline with a counted reason.
    let latency = |n: usize| {
        let u = format!("{api_url}/items");
        front
            .enter(move || {
                let c = Client::new();
                (0..n)
                    .map(|_| {
                        let t = Instant::now();
                        assert_eq!(c.get(&u).unwrap().status, 200);
                        t.elapsed()
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
    };
    let quiet_before = median(latency(30));
    let (opened_tx, opened_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let flood = att.enter(move || {
        let mut socks = Vec::new();
        for _ in 0..2000 {
            let mut s = TcpStream::connect_timeout(&direct, Duration::from_secs(5)).unwrap();
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).unwrap();
            socks.push(s);
        }
        let opened = Instant::now();
        opened_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        // Every one is closed by the sidecar once its deadline (5 s) passes.
        let mut closed = 0;
        for mut s in socks {
            s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
            let mut b = [0u8; 16];
            if matches!(s.read(&mut b), Ok(0) | Err(_)) {
                closed += 1;
            }
        }
        (closed, opened.elapsed())
    });
    opened_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let cpu0 = s_api.child.cpu_time();
    let quiet_during = median(latency(30));
    std::thread::sleep(Duration::from_millis(1500));
    let cpu = s_api.child.cpu_time() - cpu0;
    go_tx.send(()).unwrap();
    let (closed, took) = flood.join().unwrap();
    assert!(
        cpu < Duration::from_millis(300),
        "the sidecar used {cpu:?} of CPU while 2,000 clients waited"
    );
    assert!(
        quiet_during < quiet_before * 3 + Duration::from_millis(5),
        "legitimate latency went from {quiet_before:?} to {quiet_during:?}"
    );
    assert_eq!(closed, 2000, "every quiet client is closed");
    assert!(took < Duration::from_secs(9), "closed after {took:?}");
    eprintln!(
        "2,000 quiet clients: sidecar CPU {cpu:?} over ~2.5 s; legitimate p50 {quiet_before:?} -> {quiet_during:?}"
    );

    // The metrics port (15020) is for scrapers outside the pod, read-only; the admin server
    // (15000) is not reachable from outside at all.
    let scrape = |url: String| att.enter(move || Client::new().get(&url)).join().unwrap();
    let m = scrape(format!("http://{}:15020/metrics", api.ip4)).unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("ringside_downstream_cx_total"),
        "{}",
        m.text()
    );
    assert_eq!(
        scrape(format!("http://{}:15020/config_dump", api.ip4))
            .unwrap()
            .status,
        404
    );
    assert!(
        scrape(format!("http://{}:15000/stats", api.ip4)).is_err(),
        "the admin server answered from another pod"
    );

    let ca = s_api.stop();
    assert_eq!(ca.get("fail.detect_timeout"), Some(&2000), "{ca:?}");
    assert!(
        ca.get("fail.request_denied").copied().unwrap_or(0) >= 10,
        "{ca:?}"
    );
    assert!(
        ca.get("fail.bad_request").copied().unwrap_or(0) >= 1,
        "{ca:?}"
    );
    assert!(
        ca.get("fail.tls_identity_mismatch").copied().unwrap_or(0) >= 3,
        "{ca:?}"
    );
    assert!(
        ca.get("fail.proxy_loop").copied().unwrap_or(0) >= 3,
        "{ca:?}"
    );
    assert!(loops >= 8, "proxy_loop counted {loops} times");

    // 5. Loopback-only apps are not exposed, also in permissive mode; and permissive plaintext
    //    HTTP has its forged identity header removed.
    let s_api = start_sidecar(
        &api,
        "api",
        "sidecar:\n  mtls: { mode: permissive, cert: /x, key: /x, ca: /x }\n",
    );
    let secret_addr = SocketAddr::new(IpAddr::V4(api.ip4), 6379);
    let got = att
        .enter(move || {
            let Ok(mut s) = TcpStream::connect_timeout(&secret_addr, Duration::from_secs(2)) else {
                return Vec::new();
            };
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let _ = s.write_all(b"PING\r\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            buf
        })
        .join()
        .unwrap();
    assert!(got.is_empty(), "the loopback-only app answered: {got:?}");
    assert_eq!(
        secret.load(Ordering::SeqCst),
        0,
        "the loopback-only app was reached"
    );
    let plain = att
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&direct, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&request("GET", "/who", forged)).unwrap();
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
        .join()
        .unwrap();
    assert!(
        plain.starts_with("HTTP/1.1 200"),
        "{plain}\n{}",
        s_api.log_text()
    );
    assert!(
        plain.contains("x-forwarded-client-cert: \n") && !plain.contains("sa/admin"),
        "{plain}"
    );
    let cp = s_api.stop();
    assert!(
        cp.get("fail.app_not_listening").copied().unwrap_or(0) >= 1,
        "{cp:?}"
    );
    s_front.stop();
}

const REVOKE_DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: db
spec:
  protocol: tcp
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: db
spec:
  destination:
    name: db
  sources:
    - name: frontend
      action: FRONT
    - name: batch
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: web
spec:
  destination:
    name: web
  sources:
    - name: frontend
      action: FRONT
";

/// Send `ping` and read it back on an established connection.
fn echo_ok(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
}

#[test]
fn revoking_an_intention_closes_what_it_allowed() {
    if !pods_available("revoking_an_intention_closes_what_it_allowed") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let batch = net.pod("batch");
    let db = net.pod("db");
    let web = net.pod("web");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "db", "--port", "5432:5432"]);
    daemon.ok(&["register", "service", "web", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.ok(&["register", "service", "batch"]);
    daemon.apply(&REVOKE_DOCS.replace("FRONT", "allow"));
    for p in [&front, &batch, &db, &web] {
        p.install_redirect(&[]);
    }
    db.echo_app("127.0.0.1:5432".parse().unwrap());
    web.enter(|| serve("web-app", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    let mut sidecars = Vec::new();
    for (pod, service) in [
        (&db, "db"),
        (&web, "web"),
        (&front, "frontend"),
        (&batch, "batch"),
    ] {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sidecars.push(Sidecar::start_with(pod, "sidecar: {}\n", &args));
    }
    let db_addr = SocketAddr::new(vip(&daemon, "db"), 5432);
    let web_url = format!("http://{}", SocketAddr::new(vip(&daemon, "web"), 80));
    let open = |pod: &Pod| {
        pod.enter(move || {
            let t0 = Instant::now();
            loop {
                let mut s = TcpStream::connect_timeout(&db_addr, Duration::from_secs(2)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                if echo_ok(&mut s) {
                    return s;
                }
                assert!(
                    t0.elapsed() < Duration::from_secs(10),
                    "no echo through the mesh"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .join()
        .unwrap()
    };
    let mut from_front = open(&front);
    let mut from_batch = open(&batch);
    // An HTTP exchange leaves a kept-alive mesh connection from front's sidecar to web's.
    let u = format!("{web_url}/x");
    let r = front
        .enter(move || Client::new().get(&u))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(r.status, 200);

    // Revoke frontend's intentions: its established connections are closed within a second;
    // batch's connection, still allowed, lives on.
    daemon.apply(&REVOKE_DOCS.replace("FRONT", "deny"));
    let t0 = Instant::now();
    from_front
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut b = [0u8; 8];
    let r = from_front.read(&mut b);
    let took = t0.elapsed();
    assert!(matches!(r, Ok(0) | Err(_)), "still open: {r:?}");
    assert!(
        r.as_ref()
            .err()
            .is_none_or(|e| e.kind() != std::io::ErrorKind::WouldBlock),
        "not closed within 3 s"
    );
    assert!(took < Duration::from_millis(1500), "closed after {took:?}");
    assert!(echo_ok(&mut from_batch), "an allowed connection was cut");
    // A new connection from frontend is refused in the handshake.
    let refused = front
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&db_addr, Duration::from_secs(2)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            !echo_ok(&mut s)
        })
        .join()
        .unwrap();
    assert!(refused);
    eprintln!("an established connection was closed {took:?} after the deny was applied");

    let s_batch = sidecars.pop().unwrap();
    let _front = sidecars.pop().unwrap();
    let s_web = sidecars.pop().unwrap();
    let s_db = sidecars.pop().unwrap();
    let t1 = Instant::now();
    while !s_web.log_text().contains("was revoked") {
        assert!(
            t1.elapsed() < Duration::from_secs(2),
            "the kept-alive HTTP mesh connection was not closed:\n{}",
            s_web.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let cdb = s_db.stop();
    assert!(
        cdb.get("fail.intention_denied").copied().unwrap_or(0) >= 2,
        "the revoked connection and the refused one: {cdb:?}"
    );
    let cweb = s_web.stop();
    assert!(
        cweb.get("fail.intention_denied").copied().unwrap_or(0) >= 1,
        "{cweb:?}"
    );
    drop(s_batch);
}

/// A TLS server posing as a service's sidecar in `pod` (no redirect rules there): it presents
/// `cert`, requests no client certificate, and counts the handshakes it completed and the
/// plaintext bytes it was sent.
struct FakeSidecar {
    handshakes: Arc<std::sync::atomic::AtomicUsize>,
    received: Arc<std::sync::atomic::AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl FakeSidecar {
    fn start(pod: &Pod, addrs: Vec<SocketAddr>, cert_pem: &str, key_pem: &str) -> FakeSidecar {
        use rustls::pki_types::pem::PemObject;
        let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
        let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        cfg.alpn_protocols = vec![
            b"ringside/tcp".to_vec(),
            b"ringside/http".to_vec(),
            b"h2".to_vec(),
            b"http/1.1".to_vec(),
        ];
        let cfg = Arc::new(cfg);
        let fake = FakeSidecar {
            handshakes: Arc::default(),
            received: Arc::default(),
            stop: Arc::default(),
        };
        let listeners = pod
            .enter(move || {
                addrs
                    .into_iter()
                    .map(|a| std::net::TcpListener::bind(a).expect("bind the fake sidecar"))
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap();
        for l in listeners {
            l.set_nonblocking(true).unwrap();
            let (cfg, handshakes, received, stop) = (
                cfg.clone(),
                fake.handshakes.clone(),
                fake.received.clone(),
                fake.stop.clone(),
            );
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let Ok((mut sock, _)) = l.accept() else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let (cfg, handshakes, received) =
                        (cfg.clone(), handshakes.clone(), received.clone());
                    std::thread::spawn(move || {
                        sock.set_nonblocking(false).unwrap();
                        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                        let mut conn = rustls::ServerConnection::new(cfg).unwrap();
                        while conn.is_handshaking() {
                            if conn.complete_io(&mut sock).is_err() {
                                return;
                            }
                        }
                        handshakes.fetch_add(1, Ordering::SeqCst);
                        let mut tls = rustls::StreamOwned::new(conn, sock);
                        let mut buf = [0u8; 4096];
                        while let Ok(n @ 1..) = tls.read(&mut buf) {
                            received.fetch_add(n, Ordering::SeqCst);
                        }
                    });
                }
            });
        }
        fake
    }
}

impl Drop for FakeSidecar {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // The accept loops see the flag within 20 ms: the ports are free again after that.
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The source's boundary: a server that answers for a mesh service with a certificate from the
/// mesh's own root, but for a foreign trust domain, another namespace, or with two identities,
/// is refused by the source's sidecar with `tls_identity_mismatch` (L4 and HTTP), and never
/// receives the app's bytes. The same server with the service's own identity is served, so the
/// refusals are the identity check's.
#[test]
fn the_source_boundary_holds() {
    if !pods_available("the_source_boundary_holds") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let fake = net.pod("fake");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.ok(&["register", "service", "vault", "--port", "9000:9000"]);
    daemon.ok(&["register", "service", "vault-web", "--port", "9001:9001"]);
    daemon.apply(
        "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: vault
spec:
  protocol: tcp
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: vault-web
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: from-frontend
spec:
  destination:
    name: '*'
  sources:
    - name: frontend
      action: allow
",
    );
    for svc in ["vault", "vault-web"] {
        daemon.ok(&[
            "register",
            "endpoint",
            svc,
            &fake.ip4.to_string(),
            "--node",
            "fake",
        ]);
    }
    front.install_redirect(&[]);
    let args = daemon.sidecar_args("frontend", IpAddr::V4(front.ip4), PROXY_UID);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let s_front = Sidecar::start_with(&front, "sidecar: {}\n", &args);
    let vault = SocketAddr::new(vip(&daemon, "vault"), 9000);
    let vault_web = format!(
        "http://{}/secret",
        SocketAddr::new(vip(&daemon, "vault-web"), 9001)
    );
    let root = daemon_root(&daemon.dir);
    let mismatches = || stat(&front, "failures_total{reason=\"tls_identity_mismatch\"}");
    // A fake sidecar for vault (9000) and one for vault-web (9001), each with certificates for
    // the URIs given (`SVC` stands for the service's name).
    let fakes = |uris: &[&str]| {
        [("vault", 9000), ("vault-web", 9001)].map(|(svc, port)| {
            let uris: Vec<String> = uris.iter().map(|u| u.replace("SVC", svc)).collect();
            let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
            let (c, k) = root.leaf_with_uris(&uris, Validity::Valid);
            FakeSidecar::start(&fake, vec![fake.addr4(port)], &c, &k)
        })
    };

    // The app's bytes, sent to vault (L4); what came back.
    let send = |front: &Pod| {
        front
            .enter(move || {
                let mut s = TcpStream::connect_timeout(&vault, Duration::from_secs(5)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let _ = s.write_all(b"the app's secret bytes");
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
            })
            .join()
            .unwrap()
    };
    let get = |front: &Pod| {
        let u = vault_web.clone();
        front
            .enter(move || Client::new().get(&u))
            .join()
            .unwrap()
            .unwrap()
    };

    // Control: the right identity from the same root is served, L4 and HTTP.
    {
        let [l4, http] = fakes(&["spiffe://dc1/ns/default/sa/SVC"]);
        wait_for(
            "the right server gets the bytes",
            Duration::from_secs(15),
            || {
                send(&front);
                l4.received.load(Ordering::SeqCst) > 0
            },
        );
        let r = get(&front);
        assert!(
            http.received.load(Ordering::SeqCst) > 0,
            "the HTTP request did not reach the right server: {r:?}\n{}",
            s_front.log_text()
        );
    }

    for uris in [
        vec!["spiffe://evil/ns/default/sa/SVC"],
        vec!["spiffe://dc1/ns/other/sa/SVC"],
        vec![
            "spiffe://dc1/ns/default/sa/SVC",
            "spiffe://dc1/ns/default/sa/admin",
        ],
        vec![
            "spiffe://dc1/ns/default/sa/admin",
            "spiffe://dc1/ns/default/sa/SVC",
        ],
    ] {
        let servers = fakes(&uris);
        let before = mismatches();
        send(&front);
        wait_for(
            &format!("{uris:?}: tls_identity_mismatch at the source (L4)"),
            Duration::from_secs(5),
            || mismatches() > before,
        );
        let r = get(&front);
        assert_eq!(r.status, 502, "{uris:?}: {r:?}");
        assert_eq!(
            r.header("x-ringside-reason"),
            "tls_identity_mismatch",
            "{uris:?}: {}",
            r.text()
        );
        for s in &servers {
            assert_eq!(
                (
                    s.handshakes.load(Ordering::SeqCst),
                    s.received.load(Ordering::SeqCst)
                ),
                (0, 0),
                "{uris:?}: the source completed a handshake or sent bytes\n{}",
                s_front.log_text()
            );
        }
    }
    drop(s_front);
}

/// Inbound and outbound have separate limits: with the proxy's inbound connections at their cap
/// (`proxy.max_inbound_connections`), a further inbound one is closed at accept while the pod's
/// app still opens as many outbound connections as the rest of `max_connections` allows.
#[test]
fn an_inbound_flood_leaves_outbound_connections() {
    if !pods_available("an_inbound_flood_leaves_outbound_connections") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let api = net.pod("api");
    let db = net.pod("db");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.ok(&["register", "service", "api", "--port", "9090:8080"]);
    daemon.ok(&["register", "service", "db", "--port", "5432:5432"]);
    daemon.apply(
        "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: all
spec:
  destination:
    name: '*'
  sources:
    - name: '*'
      action: allow
",
    );
    for p in [&front, &api, &db] {
        p.install_redirect(&[]);
    }
    api.echo_app("0.0.0.0:8080".parse().unwrap());
    db.echo_app("0.0.0.0:5432".parse().unwrap());
    let start = |pod: &Pod, service: &str, yaml: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, yaml, &args)
    };
    let _s_db = start(&db, "db", "sidecar: {}\n");
    let _s_front = start(&front, "frontend", "sidecar: {}\n");
    let s_api = start(
        &api,
        "api",
        "sidecar: {}\nproxy:\n  max_connections: 8\n  max_inbound_connections: 4\n",
    );
    let api_vip = SocketAddr::new(vip(&daemon, "api"), 9090);
    let db_vip = SocketAddr::new(vip(&daemon, "db"), 5432);
    // One echoed connection from `pod` to `to`, kept open; Err when it is refused or closed.
    let open = |pod: &Pod, to: SocketAddr| -> Result<TcpStream, String> {
        pod.enter(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
                .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            if echo_ok(&mut s) {
                Ok(s)
            } else {
                Err("no echo".into())
            }
        })
        .join()
        .unwrap()
    };
    let t0 = Instant::now();
    while open(&front, api_vip).is_err() {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "no mesh call to api\n{}",
            s_api.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The flood: more inbound connections than max_connections; api's sidecar keeps 4, its
    // inbound cap, and closes the others at accept.
    let overloaded = stat(&api, "failures_total{reason=\"overloaded\"}");
    let flood: Vec<TcpStream> = (0..12).filter_map(|_| open(&front, api_vip).ok()).collect();
    assert_eq!(
        flood.len(),
        4,
        "inbound connections kept of 12\n{}",
        s_api.log_text()
    );
    assert!(stat(&api, "failures_total{reason=\"overloaded\"}") >= overloaded + 8);
    // api's app still has the rest of max_connections for its own outbound calls.
    let out: Vec<TcpStream> = (0..4)
        .map(|i| {
            open(&api, db_vip).unwrap_or_else(|e| {
                panic!(
                    "outbound {i} while inbound is at its cap: {e}\n{}",
                    s_api.log_text()
                )
            })
        })
        .collect();
    drop(out);
    drop(flood);
}
