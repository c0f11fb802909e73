//! Mesh mTLS between sidecars in pods: allowed pairs pass exactly, denied pairs are refused at the
//! destination with the TLS access_denied alert (explained on both sides), strict mode refuses
//! plaintext and permissive mode passes it, `mtls: disable` services pass through. Needs root.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ringside_tests::certs::{Ca, Validity};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::*;

fn roundtrip(pod: &Pod, to: SocketAddr, len: u64) -> Result<(), String> {
    pod.enter(move || {
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sum = Stream::new(len ^ 0x5a, len).write_to(&mut w);
            let _ = w.shutdown(Shutdown::Write);
            sum
        });
        let mut r = s;
        let got = read_to_end_hashed(&mut r).map_err(|e| e.to_string())?;
        let sent = writer.join().unwrap().map_err(|e| e.to_string())?;
        if got != (len, sent) {
            return Err(format!("got {} of {len} bytes", got.0));
        }
        Ok(())
    })
    .join()
    .unwrap()
}

/// Certificates for a set of workloads, readable by the proxy uid.
struct Pki {
    dir: PathBuf,
    ca: Ca,
}

impl Pki {
    fn new(net: &Net) -> Pki {
        let dir = std::env::temp_dir().join(format!("{}-pki", net.id));
        std::fs::create_dir_all(&dir).unwrap();
        Pki {
            dir,
            ca: Ca::new("mesh test CA"),
        }
    }

    /// `mtls:` YAML for the sidecar of `service`.
    fn mtls(&self, service: &str, mode: &str) -> String {
        let id = format!("spiffe://dc1/ns/default/sa/{service}");
        let (cert, key) = self.ca.leaf(&id, Validity::Valid);
        let (c, k, b) = (
            self.dir.join(format!("{service}.crt")),
            self.dir.join(format!("{service}.key")),
            self.dir.join("bundle.pem"),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        std::fs::write(&b, &self.ca.pem).unwrap();
        for p in [&self.dir, &c, &k, &b] {
            std::os::unix::fs::chown(p, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        }
        format!(
            "  mtls:\n    mode: {mode}\n    cert: {}\n    key: {}\n    ca: {}\n",
            c.display(),
            k.display(),
            b.display()
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn client_yaml(pki: &Pki, me: &str, server: &Pod, extra_services: &str) -> String {
    format!(
        "sidecar:\n{}services:\n  - name: products\n    port: 9090\n    endpoints: [\"{}\", \"{}\"]\n{extra_services}",
        pki.mtls(me, "strict"),
        server.addr4(9090),
        server.addr6(9090)
    )
}

fn server_yaml(pki: &Pki, mode: &str) -> String {
    format!(
        "sidecar:\n{}services:\n  - name: products\n    port: 9090\n    target_port: 8080\n    local: true\n  - name: legacy-tls\n    port: 9443\n    target_port: 8443\n    local: true\n    mtls: disable\nintentions:\n  default: deny\n  rules:\n    - source: frontend\n      destination: products\n      action: allow\n",
        pki.mtls("products", mode)
    )
}

#[test]
fn mtls_between_sidecars_with_intentions() {
    if !pods_available("mtls_between_sidecars_with_intentions") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let batch = net.pod("batch");
    let prod = net.pod("prod");
    let bare = net.pod("bare");
    let pki = Pki::new(&net);
    for p in [&front, &batch, &prod] {
        p.install_redirect(&[]);
    }
    let app = prod.echo_app("127.0.0.1:8080".parse().unwrap());
    let legacy_app = prod.echo_app("127.0.0.1:8443".parse().unwrap());
    let legacy = format!(
        "  - name: legacy-tls\n    port: 9443\n    endpoints: [\"{}\"]\n    mtls: disable\n",
        prod.addr4(9443)
    );
    let s_front = Sidecar::start(&front, &client_yaml(&pki, "frontend", &prod, &legacy));
    let s_batch = Sidecar::start(&batch, &client_yaml(&pki, "batch", &prod, ""));
    let s_prod = Sidecar::start(&prod, &server_yaml(&pki, "strict"));

    // Allowed: exact over mTLS, IPv4 and IPv6.
    roundtrip(&front, prod.addr4(9090), 256 << 20)
        .unwrap_or_else(|e| panic!("{e}\n{}", s_prod.log_text()));
    roundtrip(&front, prod.addr6(9090), 1 << 20).unwrap();
    let served = app.load(Ordering::SeqCst);
    assert_eq!(served, 2);

    // Denied: batch -> products.
    assert!(
        roundtrip(&batch, prod.addr4(9090), 1000).is_err(),
        "a denied caller got through"
    );
    assert_eq!(
        app.load(Ordering::SeqCst),
        served,
        "nothing of the denied connection reached the app"
    );

    // Strict refuses plaintext from a pod without a sidecar.
    assert!(roundtrip(&bare, prod.addr4(9090), 1000).is_err());
    assert_eq!(app.load(Ordering::SeqCst), served);

    // `mtls: disable` passes through (the app speaks its own TLS).
    roundtrip(&front, prod.addr4(9443), 100_000).unwrap();
    assert_eq!(legacy_app.load(Ordering::SeqCst), 1);

    let log = s_prod.log_text();
    let denial = log
        .lines()
        .find(|l| l.contains("intention_denied"))
        .unwrap_or_else(|| panic!("no intention_denied in the destination's log:\n{log}"));
    assert!(
        denial.contains("batch -> products") && denial.contains("default deny"),
        "the deciding rule is named: {denial}"
    );
    let cb = s_batch.stop();
    let cp = s_prod.stop();
    assert_eq!(cb.get("fail.denied_by_destination"), Some(&1), "{cb:?}");
    assert_eq!(cp["fail.intention_denied"], 1, "{cp:?}");
    assert_eq!(cp["fail.plaintext_rejected"], 1, "{cp:?}");

    // Permissive mode passes plaintext.
    let s_prod = Sidecar::start(&prod, &server_yaml(&pki, "permissive"));
    roundtrip(&bare, prod.addr4(9090), 100_000).unwrap();
    roundtrip(&front, prod.addr4(9090), 100_000)
        .unwrap_or_else(|e| panic!("mTLS still works in permissive mode: {e}"));
    let cp = s_prod.stop();
    assert!(!cp.keys().any(|k| k.starts_with("fail.")), "{cp:?}");
    let cf = s_front.stop();
    assert!(!cf.keys().any(|k| k.starts_with("fail.")), "{cf:?}");
}
