//! Mesh mTLS through the tunnel mode: an origin proxy (plaintext in, mTLS out) in front of a
//! terminate proxy (mTLS in, plaintext out) in front of a real server, on loopback, both drivers
//! where it matters. Certificates are made in the test with rcgen.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringside_core::config::{DriverKind, ListenerTls, ProxyDoc, TlsMode};
use ringside_core::identity::SpiffeId;
use ringside_core::{Config, Proxy, Reason};
use ringside_tests::certs::{temp_dir, Ca, Files, Validity};
use ringside_tests::*;

const CLIENT: &str = "spiffe://dc1/ns/default/sa/frontend";
const SERVER: &str = "spiffe://dc1/ns/default/sa/products-api";

fn tunnel_proxy(
    driver: DriverKind,
    upstream: SocketAddr,
    mode: TlsMode,
    files: &Files,
    expect: Option<&str>,
    allow: &[&str],
) -> Proxy {
    let doc = ProxyDoc {
        workers: 2,
        driver,
        ..ProxyDoc::default()
    };
    tunnel_proxy_doc(doc, upstream, mode, files, expect, allow)
}

fn tunnel_proxy_doc(
    doc: ProxyDoc,
    upstream: SocketAddr,
    mode: TlsMode,
    files: &Files,
    expect: Option<&str>,
    allow: &[&str],
) -> Proxy {
    let mut c = Config::forward("127.0.0.1:0".parse().unwrap(), vec![upstream], doc).unwrap();
    c.listeners[0].tls = Some(ListenerTls {
        mode,
        files: files.tls_files(),
        expect_id: expect.map(|e| e.parse::<SpiffeId>().unwrap()),
        allow_ids: allow
            .iter()
            .map(|a| a.parse::<SpiffeId>().unwrap())
            .collect(),
        resumption: true,
    });
    Proxy::start(c).expect("tunnel proxy starts")
}

/// Send `len` random bytes through `addr` and check the echo.
fn echo_exact(addr: SocketAddr, len: u64, seed: u64) -> Result<(), String> {
    let s = connect_retry(addr, Duration::from_secs(5));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let sum = Stream::new(seed, len).write_to(&mut w);
        let _ = w.shutdown(Shutdown::Write);
        sum
    });
    let mut r = s;
    let got = read_to_end_hashed(&mut r).map_err(|e| e.to_string())?;
    let sent = writer.join().unwrap().map_err(|e| e.to_string())?;
    if got != (len, sent) {
        return Err(format!(
            "got {} of {len} bytes (checksum equal: {})",
            got.0,
            got.1 == sent
        ));
    }
    Ok(())
}

struct Pki {
    dir: std::path::PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        Pki {
            dir: temp_dir(tag),
            ca: Ca::new("ringside test CA"),
        }
    }
    fn files(&self, name: &str, id: &str, validity: Validity) -> Files {
        Files::write(&self.dir, name, &self.ca.leaf(id, validity), &[&self.ca])
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn allowed_pair_is_exact_both_drivers() {
    let pki = Pki::new("ok");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    for d in DRIVERS {
        let (echo, _) = counting_echo();
        let term = tunnel_proxy(d, echo, TlsMode::Terminate, &server, None, &[CLIENT]);
        let orig = tunnel_proxy(
            d,
            term.local_addrs()[0],
            TlsMode::Origin,
            &client,
            Some(SERVER),
            &[],
        );
        echo_exact(orig.local_addrs()[0], 256 << 20, 7).unwrap_or_else(|e| panic!("{d:?}: {e}"));
        // Small exchanges too, and many connections (session resumption keeps them cheap).
        for i in 0..50 {
            echo_exact(orig.local_addrs()[0], 100, i).unwrap();
        }
        wait_for("closed", Duration::from_secs(5), || {
            orig.stats().downstream_cx_active == 0 && term.stats().downstream_cx_active == 0
        });
        assert!(
            orig.stats().failures.is_empty(),
            "{:?}",
            orig.stats().failures
        );
        assert!(
            term.stats().failures.is_empty(),
            "{:?}",
            term.stats().failures
        );
        assert_eq!(
            orig.stats().downstream_cx_rx_bytes_total,
            (256 << 20) + 5000
        );
        let expiry = orig.cert_expiry();
        assert!(expiry[0].1 > 60 * 86400 * 365, "expiry exposed: {expiry:?}");
        orig.shutdown(Duration::from_secs(1));
        term.shutdown(Duration::from_secs(1));
    }
}

#[test]
fn denied_caller_is_refused_on_both_sides_and_reaches_nothing() {
    let pki = Pki::new("deny");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    let (echo, accepted) = counting_echo();
    let term = tunnel_proxy(
        DriverKind::Uring,
        echo,
        TlsMode::Terminate,
        &server,
        None,
        &["spiffe://dc1/ns/default/sa/someone-else"],
    );
    let orig = tunnel_proxy(
        DriverKind::Uring,
        term.local_addrs()[0],
        TlsMode::Origin,
        &client,
        Some(SERVER),
        &[],
    );
    assert!(
        echo_exact(orig.local_addrs()[0], 1000, 1).is_err(),
        "a denied caller got through"
    );
    wait_for(
        "denial counted at the destination",
        Duration::from_secs(5),
        || term.stats().failures_for(Reason::IntentionDenied) == 1,
    );
    wait_for(
        "denial counted at the source",
        Duration::from_secs(5),
        || orig.stats().failures_for(Reason::DeniedByDestination) == 1,
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing of a denied connection reaches the application"
    );
    orig.shutdown(Duration::from_secs(1));
    term.shutdown(Duration::from_secs(1));
}

/// Each certificate problem fails with its own reason, at the side that found it.
#[test]
fn certificate_failures_map_to_reasons() {
    let pki = Pki::new("bad");
    let other = Ca::new("another CA");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let cases: Vec<(&str, Files, Option<&str>, Reason)> = vec![
        (
            "expired",
            pki.files("expired", SERVER, Validity::Expired),
            Some(SERVER),
            Reason::TlsCertExpired,
        ),
        (
            "not yet valid",
            pki.files("future", SERVER, Validity::NotYetValid),
            Some(SERVER),
            Reason::TlsCertNotYetValid,
        ),
        (
            "unknown CA",
            Files::write(
                &pki.dir,
                "foreign",
                &other.leaf(SERVER, Validity::Valid),
                &[&other],
            ),
            Some(SERVER),
            Reason::TlsUnknownCa,
        ),
        (
            "wrong identity",
            pki.files(
                "impostor",
                "spiffe://dc1/ns/default/sa/payments",
                Validity::Valid,
            ),
            Some(SERVER),
            Reason::TlsIdentityMismatch,
        ),
    ];
    for (what, server, expect, reason) in cases {
        let (echo, accepted) = counting_echo();
        let term = tunnel_proxy(
            DriverKind::Uring,
            echo,
            TlsMode::Terminate,
            &server,
            None,
            &[],
        );
        let orig = tunnel_proxy(
            DriverKind::Uring,
            term.local_addrs()[0],
            TlsMode::Origin,
            &client,
            expect,
            &[],
        );
        assert!(
            echo_exact(orig.local_addrs()[0], 100, 1).is_err(),
            "{what}: connection succeeded"
        );
        wait_for(
            &format!("{what}: {reason} at the source"),
            Duration::from_secs(5),
            || orig.stats().failures_for(reason) == 1,
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            0,
            "{what}: reached the app"
        );
        orig.shutdown(Duration::from_secs(1));
        term.shutdown(Duration::from_secs(1));
    }
    // A client whose own certificate expired is refused by the destination.
    let old_client = pki.files("old-client", CLIENT, Validity::Expired);
    let server = pki.files("server", SERVER, Validity::Valid);
    let (echo, _) = counting_echo();
    let term = tunnel_proxy(
        DriverKind::Uring,
        echo,
        TlsMode::Terminate,
        &server,
        None,
        &[],
    );
    let orig = tunnel_proxy(
        DriverKind::Uring,
        term.local_addrs()[0],
        TlsMode::Origin,
        &old_client,
        Some(SERVER),
        &[],
    );
    assert!(echo_exact(orig.local_addrs()[0], 100, 1).is_err());
    wait_for(
        "expired client cert at the destination",
        Duration::from_secs(5),
        || term.stats().failures_for(Reason::TlsCertExpired) == 1,
    );
    orig.shutdown(Duration::from_secs(1));
    term.shutdown(Duration::from_secs(1));
}

/// Two origin proxies in front of `upstream`: one expecting the server's identity before a
/// rotation (`SERVER`), one expecting `next_id`, the identity after it.
fn origins_before_and_after(client: &Files, upstream: SocketAddr, next_id: &str) -> (Proxy, Proxy) {
    let origin = |expect| {
        tunnel_proxy(
            DriverKind::Uring,
            upstream,
            TlsMode::Origin,
            client,
            Some(expect),
            &[],
        )
    };
    (origin(SERVER), origin(next_id))
}

/// Replacing the certificate files during a long transfer: the transfer completes; new
/// connections get the new certificate.
#[test]
fn certificate_reload_keeps_established_connections() {
    let pki = Pki::new("reload");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    let next_id = "spiffe://dc1/ns/default/sa/products-api-v2";
    let (echo, _) = counting_echo();
    let term = tunnel_proxy(
        DriverKind::Uring,
        echo,
        TlsMode::Terminate,
        &server,
        None,
        &[],
    );
    let (orig_v1, orig_v2) = origins_before_and_after(&client, term.local_addrs()[0], next_id);
    // Before the rotation, v2's expectation does not hold.
    assert!(echo_exact(orig_v2.local_addrs()[0], 10, 1).is_err());

    // A slow transfer that spans the rotation.
    let addr = orig_v1.local_addrs()[0];
    let long = std::thread::spawn(move || {
        let s = connect_retry(addr, Duration::from_secs(5));
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut sum = xxhash_rust::xxh3::Xxh3::new();
            for i in 0..20u64 {
                let chunk = vec![(i % 251) as u8; 256 * 1024];
                w.write_all(&chunk).unwrap();
                sum.update(&chunk);
                std::thread::sleep(Duration::from_millis(50));
            }
            w.shutdown(Shutdown::Write).unwrap();
            sum.digest()
        });
        let mut r = s;
        let got = read_to_end_hashed(&mut r).unwrap();
        (got, writer.join().unwrap())
    });
    std::thread::sleep(Duration::from_millis(300));
    server.replace(&pki.ca.leaf(next_id, Validity::Valid));
    wait_for("new certificate in use", Duration::from_secs(5), || {
        echo_exact(orig_v2.local_addrs()[0], 10, 2).is_ok()
    });
    let ((n, got), sent) = long.join().unwrap();
    assert_eq!(
        n,
        20 * 256 * 1024,
        "the long transfer lost bytes across the rotation"
    );
    assert_eq!(got, sent);
    // New connections expecting the old identity now fail: the server presents the new one.
    assert!(echo_exact(orig_v1.local_addrs()[0], 10, 3).is_err());
    orig_v1.shutdown(Duration::from_secs(1));
    orig_v2.shutdown(Duration::from_secs(1));
    term.shutdown(Duration::from_secs(1));
}

/// The certificate files laid out as a Kubernetes secret volume (`server.crt ->
/// ..data/server.crt`, `..data -> ..v1`) for a `ringside forward` process: its certificate watcher
/// sleeps while nothing changes (it read the files four times a second before), and when `..data`
/// is swapped to a new directory and the old one removed, new connections get the new
/// certificate at once.
#[test]
fn certificate_watcher_sleeps_and_takes_a_swapped_secret_volume() {
    let pki = Pki::new("volume");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let next_id = "spiffe://dc1/ns/default/sa/products-api-v2";
    let vol = pki.dir.join("volume");
    let version = |name: &str, id: &str| {
        Files::write(
            &vol.join(name),
            "server",
            &pki.ca.leaf(id, Validity::Valid),
            &[&pki.ca],
        );
    };
    let link = |target: &str, at: &str| std::os::unix::fs::symlink(target, vol.join(at)).unwrap();
    version("..v1", SERVER);
    link("..v1", "..data");
    for f in ["server.crt", "server.key", "server-ca.pem"] {
        link(&format!("..data/{f}"), f);
    }
    let (echo, _) = counting_echo();
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let path = |f: &str| vol.join(f).display().to_string();
    let (cert, key, ca) = (
        path("server.crt"),
        path("server.key"),
        path("server-ca.pem"),
    );
    let mut term = spawn_forward(
        listen,
        &[echo],
        &[
            "--workers",
            "1",
            "--tls-terminate",
            "--allow-id",
            CLIENT,
            "--cert",
            &cert,
            "--key",
            &key,
            "--ca",
            &ca,
        ],
    );
    let (orig_v1, orig_v2) = origins_before_and_after(&client, listen, next_id);
    echo_exact(orig_v1.local_addrs()[0], 10, 1).unwrap();
    assert!(echo_exact(orig_v2.local_addrs()[0], 10, 2).is_err());

    let certs = |pid| thread_wakeups(pid, |c| c == "ringside-certs");
    std::thread::sleep(Duration::from_millis(300));
    let before = certs(term.pid());
    std::thread::sleep(Duration::from_secs(3));
    let woke = certs(term.pid()) - before;
    assert!(
        woke <= 2,
        "the idle certificate watcher woke {woke} times in 3 s"
    );

    // The swap, as the kubelet does it: a new directory, `..data` replaced by a rename, the old
    // directory removed.
    version("..v2", next_id);
    link("..v2", "..data_tmp");
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    std::fs::remove_dir_all(vol.join("..v1")).unwrap();
    let swapped = std::time::Instant::now();
    wait_for("the new certificate in use", Duration::from_secs(5), || {
        echo_exact(orig_v2.local_addrs()[0], 10, 3).is_ok()
    });
    assert!(
        swapped.elapsed() < Duration::from_secs(1),
        "the new certificate took {:?} to be used",
        swapped.elapsed()
    );
    assert!(echo_exact(orig_v1.local_addrs()[0], 10, 4).is_err());

    // A rewrite in place in the new directory is seen too (it is watched now).
    let rewritten = pki.ca.leaf(SERVER, Validity::Valid);
    std::fs::write(vol.join("..v2/server.key"), &rewritten.1).unwrap();
    std::fs::write(vol.join("..v2/server.crt"), &rewritten.0).unwrap();
    wait_for(
        "the rewritten certificate in use",
        Duration::from_secs(1),
        || echo_exact(orig_v1.local_addrs()[0], 10, 5).is_ok(),
    );

    term.signal(libc::SIGTERM);
    assert!(term.wait_timeout(Duration::from_secs(5)).success());
    orig_v1.shutdown(Duration::from_secs(1));
    orig_v2.shutdown(Duration::from_secs(1));
}

/// `ringside cert inspect` shows the SPIFFE ID, issuer and validity.
#[test]
fn cert_inspect_shows_identity_and_validity() {
    let pki = Pki::new("inspect");
    let f = pki.files("expired", SERVER, Validity::Expired);
    let out = std::process::Command::new(workspace_bin("ringside"))
        .args(["cert", "inspect", f.cert.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(SERVER), "{text}");
    assert!(text.contains("ringside test CA"), "{text}");
    assert!(text.contains("EXPIRED"), "{text}");
    let out = std::process::Command::new(workspace_bin("ringside"))
        .args(["cert", "inspect", f.ca.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("(CA)"));
}

/// A client that sends a request right after connecting and waits for the answer without closing
/// (the request rides behind the handshake): it is answered, many times over, on both drivers.
#[test]
fn request_response_without_close() {
    let pki = Pki::new("reqresp");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    for d in DRIVERS {
        let (echo, _) = counting_echo();
        let term = tunnel_proxy(d, echo, TlsMode::Terminate, &server, None, &[]);
        let orig = tunnel_proxy(
            d,
            term.local_addrs()[0],
            TlsMode::Origin,
            &client,
            Some(SERVER),
            &[],
        );
        for i in 0..20u8 {
            let mut s = connect_retry(orig.local_addrs()[0], Duration::from_secs(5));
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(&[i; 4]).unwrap();
            let mut b = [0u8; 4];
            s.read_exact(&mut b)
                .unwrap_or_else(|e| panic!("{d:?}: request {i} unanswered: {e}"));
            assert_eq!(b, [i; 4]);
            // A second exchange on the same connection.
            s.write_all(b"more").unwrap();
            s.read_exact(&mut b).unwrap();
            assert_eq!(&b, b"more");
        }
        orig.shutdown(Duration::from_secs(1));
        term.shutdown(Duration::from_secs(1));
    }
}

/// A TLS client that verifies nothing about the server (the test only needs to be accepted).
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

/// A TLS peer that stops without `close_notify` has cut the stream: the plaintext side gets a
/// reset, not a FIN that would make a truncated message look complete. With `close_notify` the
/// same bytes end with a FIN.
#[test]
fn truncation_is_not_a_clean_end() {
    use rustls::pki_types::pem::PemObject;
    let pki = Pki::new("trunc");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up_addr = upstream.local_addr().unwrap();
    let term = tunnel_proxy(
        DriverKind::Uring,
        up_addr,
        TlsMode::Terminate,
        &server,
        None,
        &[CLIENT],
    );
    let certs: Vec<_> = rustls::pki_types::CertificateDer::pem_file_iter(&client.cert)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_file(&client.key).unwrap();
    let cfg = std::sync::Arc::new({
        let mut c = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer))
        .with_client_auth_cert(certs, key)
        .unwrap();
        c.alpn_protocols = vec![b"ringside/tcp".to_vec()];
        c
    });
    for clean in [true, false] {
        let sock = std::net::TcpStream::connect(term.local_addrs()[0]).unwrap();
        let name = rustls::pki_types::ServerName::try_from("products-api").unwrap();
        let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, sock);
        tls.write_all(b"half a response").unwrap();
        tls.flush().unwrap();
        let (mut app, _) = upstream.accept().unwrap();
        app.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = [0u8; 15];
        app.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"half a response");
        if clean {
            tls.conn.send_close_notify();
            tls.flush().unwrap();
        }
        tls.sock.shutdown(Shutdown::Write).unwrap();
        let mut b = [0u8; 1];
        let end = app.read(&mut b);
        if clean {
            assert!(
                matches!(end, Ok(0)),
                "close_notify then FIN: a clean end, got {end:?}"
            );
            // The other direction ends cleanly too, before either side goes away.
            app.shutdown(Shutdown::Write).unwrap();
            tls.sock
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut rest = Vec::new();
            tls.read_to_end(&mut rest)
                .expect("close_notify from the proxy");
        } else {
            let e = end.expect_err("a cut stream ended cleanly");
            assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
        }
    }
    let t0 = std::time::Instant::now();
    while term.stats().failures_for(Reason::DownstreamReset) != 1 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the truncation is counted once, as downstream_reset: {:?}",
            term.stats().failures
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    term.shutdown(Duration::from_secs(1));
}

/// The L4 idle timeout holds on mesh mTLS connections too: a quiet one is closed by the terminating
/// side (counted `idle_timeout`), a talking one on the same proxy is not.
#[test]
fn idle_mtls_connections_are_closed() {
    let pki = Pki::new("idle");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    for d in DRIVERS {
        let (echo, _) = counting_echo();
        let doc = ProxyDoc {
            workers: 1,
            driver: d,
            idle_timeout: Some(Duration::from_millis(400)),
            ..ProxyDoc::default()
        };
        let term = tunnel_proxy_doc(doc, echo, TlsMode::Terminate, &server, None, &[CLIENT]);
        let orig = tunnel_proxy(
            d,
            term.local_addrs()[0],
            TlsMode::Origin,
            &client,
            Some(SERVER),
            &[],
        );
        let mut busy = connect_retry(orig.local_addrs()[0], Duration::from_secs(5));
        let mut quiet = connect_retry(orig.local_addrs()[0], Duration::from_secs(5));
        quiet
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut b = [0u8; 1];
        quiet.write_all(b"q").unwrap();
        quiet.read_exact(&mut b).unwrap();
        let start = std::time::Instant::now();
        while start.elapsed() < Duration::from_millis(1200) {
            busy.write_all(b"p").unwrap();
            busy.read_exact(&mut b).unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
        let r = quiet.read(&mut b);
        assert!(
            matches!(r, Ok(0) | Err(_)),
            "{d:?}: quiet mTLS connection still open: {r:?}"
        );
        busy.write_all(b"z").unwrap();
        busy.read_exact(&mut b).unwrap();
        assert_eq!(term.stats().failures_for(Reason::IdleTimeout), 1, "{d:?}");
        orig.shutdown(Duration::from_secs(1));
        term.shutdown(Duration::from_secs(1));
    }
}

/// Session resumption on the origin side: on by default (the second connection to the same
/// upstream resumes), and off with `resumption: false` (every connection is a full handshake, as
/// the benchmark of full handshakes needs). Checked on the sessions the configs make, in memory.
#[test]
fn origin_resumption_is_on_by_default_and_can_be_turned_off() {
    use ringside_core::tls::{client_config, server_config, AllowList, Expect, Material};
    let pki = Pki::new("resume");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    let cm = Material::load(&client.tls_files()).unwrap();
    let sm = Material::load(&server.tls_files()).unwrap();
    let scfg = server_config(
        &sm,
        std::sync::Arc::new(AllowList(vec![CLIENT.parse().unwrap()])),
    )
    .unwrap();
    let handshake = |ccfg: std::sync::Arc<rustls::ClientConfig>| {
        let name = rustls::pki_types::ServerName::try_from("products-api").unwrap();
        let mut c = rustls::ClientConnection::new(ccfg, name).unwrap();
        let mut s = rustls::ServerConnection::new(scfg.clone()).unwrap();
        for _ in 0..10 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            s.read_tls(&mut buf.as_slice()).unwrap();
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            c.read_tls(&mut buf.as_slice()).unwrap();
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        s.handshake_kind().unwrap()
    };
    let expect = Expect::Exact(SERVER.parse().unwrap());
    let on = client_config(&cm, expect.clone(), true).unwrap();
    assert_eq!(handshake(on.clone()), rustls::HandshakeKind::Full);
    assert_eq!(handshake(on), rustls::HandshakeKind::Resumed);
    let off = client_config(&cm, expect, false).unwrap();
    assert_eq!(handshake(off.clone()), rustls::HandshakeKind::Full);
    assert_eq!(handshake(off), rustls::HandshakeKind::Full);
}

/// The access log at both tunnel ends names who called and who was called: at the originating end
/// the caller is the end's own certificate and the called side the identity the server proved;
/// at the terminating end the caller is the verified client certificate and the called side the
/// end's own certificate.
#[test]
fn access_log_names_both_identities_at_both_tunnel_ends() {
    let pki = Pki::new("alog");
    let client = pki.files("client", CLIENT, Validity::Valid);
    let server = pki.files("server", SERVER, Validity::Valid);
    let (echo, _) = counting_echo();
    let start = |upstream, mode, files: &Files, expect: Option<&str>, allow: &[&str], log| {
        let doc = ProxyDoc {
            workers: 1,
            access_log: Some(log),
            ..ProxyDoc::default()
        };
        let mut c = Config::forward("127.0.0.1:0".parse().unwrap(), vec![upstream], doc).unwrap();
        c.listeners[0].tls = Some(ListenerTls {
            mode,
            files: files.tls_files(),
            expect_id: expect.map(|e| e.parse::<SpiffeId>().unwrap()),
            allow_ids: allow.iter().map(|a| a.parse().unwrap()).collect(),
            resumption: true,
        });
        Proxy::start(c).expect("tunnel proxy starts")
    };
    let (term_log, orig_log) = (pki.dir.join("term.log"), pki.dir.join("orig.log"));
    let term = start(
        echo,
        TlsMode::Terminate,
        &server,
        None,
        &[CLIENT],
        term_log.clone(),
    );
    let term_addr = term.local_addrs()[0];
    let orig = start(
        term_addr,
        TlsMode::Origin,
        &client,
        Some(SERVER),
        &[],
        orig_log.clone(),
    );
    echo_exact(orig.local_addrs()[0], 1000, 1).unwrap();
    wait_for("closed", Duration::from_secs(5), || {
        orig.stats().downstream_cx_active == 0 && term.stats().downstream_cx_active == 0
    });
    orig.shutdown(Duration::from_secs(1));
    term.shutdown(Duration::from_secs(1));
    let line = |p: &std::path::Path| -> serde_json::Value {
        let text = std::fs::read_to_string(p).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1, "{text}");
        serde_json::from_str(lines[0]).unwrap()
    };
    let (o, t) = (line(&orig_log), line(&term_log));
    for (l, source, dest, peer, upstream) in [
        (&o, CLIENT, SERVER, SERVER, term_addr),
        (&t, CLIENT, SERVER, CLIENT, echo),
    ] {
        assert_eq!(
            (
                l["direction"].as_str(),
                l["mesh"].as_bool(),
                l["source_id"].as_str(),
                l["destination_id"].as_str(),
                l["peer_id"].as_str(),
                l["upstream"].as_str(),
                l["bytes_up"].as_u64(),
                l["bytes_down"].as_u64(),
                l["reason"].as_str(),
            ),
            (
                Some("tunnel"),
                Some(true),
                Some(source),
                Some(dest),
                Some(peer),
                Some(upstream.to_string().as_str()),
                Some(1000),
                Some(1000),
                None,
            ),
            "{l}"
        );
        assert!(l["original_destination"].is_null(), "{l}");
    }
}
