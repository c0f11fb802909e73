//! Sidecars configured only by the control daemon (`ringside run --ctl`): certificates signed by
//! the daemon's CA from the proxies' CSRs, catalog and intentions pushed on each proxy's stream, applied
//! without restarts; leaf rotation and CA rollover during a long transfer; the daemon killed with
//! SIGKILL while proxies keep serving. Needs root.

use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::*;

/// Send `len` bytes and read the echo; `pace` sleeps between 64 KiB chunks (a long transfer).
fn roundtrip_paced(pod: &Pod, to: SocketAddr, len: u64, pace: Duration) -> Result<(), String> {
    pod.enter(move || {
        let s =
            TcpStream::connect_timeout(&to, Duration::from_secs(5)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let mut data = Vec::with_capacity(len as usize);
            let mut x = len ^ 0x9e37;
            while (data.len() as u64) < len {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                data.push((x >> 33) as u8);
            }
            let sum = xxhash_rust::xxh3::xxh3_64(&data);
            for chunk in data.chunks(64 << 10) {
                std::io::Write::write_all(&mut w, chunk)?;
                if !pace.is_zero() {
                    std::thread::sleep(pace);
                }
            }
            let _ = w.shutdown(Shutdown::Write);
            Ok::<u64, std::io::Error>(sum)
        });
        let mut r = s;
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut r, &mut got).map_err(|e| e.to_string())?;
        let sent = writer.join().unwrap().map_err(|e| e.to_string())?;
        if got.len() as u64 != len || xxhash_rust::xxh3::xxh3_64(&got) != sent {
            return Err(format!(
                "got {} of {len} bytes (or different ones)",
                got.len()
            ));
        }
        Ok(())
    })
    .join()
    .unwrap()
}

fn roundtrip(pod: &Pod, to: SocketAddr, len: u64) -> Result<(), String> {
    roundtrip_paced(pod, to, len, Duration::ZERO)
}

const DENY_BATCH: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: products
spec:
  destination:
    name: products
  sources:
    - name: frontend
      action: allow
    - name: batch
      action: deny
";

/// A mesh of three pods (frontend, batch, products) whose sidecars get everything from a daemon.
/// Fields drop in order: sidecars, daemon, then the pods.
struct Mesh {
    sidecars: Vec<Sidecar>,
    daemon: Daemon,
    front: Pod,
    batch: Pod,
    vip: SocketAddr,
    app: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    _prod: Pod,
    _net: Net,
}

fn mesh(daemon_args: &[&str]) -> Mesh {
    let mut net = Net::new();
    let front = net.pod("front");
    let batch = net.pod("batch");
    let prod = net.pod("prod");
    let range = format!("{}/29", net.virtual_ip(0));
    let mut args = vec!["--vip-range", &range];
    args.extend_from_slice(daemon_args);
    let daemon = Daemon::start(&net.id, &args);
    daemon.ok(&["register", "service", "products", "--port", "9090:8080"]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.ok(&["register", "service", "batch"]);
    daemon.apply(
        "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: products
spec:
  destination:
    name: products
  sources:
    - name: frontend
      action: allow
    - name: batch
      action: allow
",
    );
    for p in [&front, &batch, &prod] {
        p.install_redirect(&[]);
    }
    let app = prod.echo_app("127.0.0.1:8080".parse().unwrap());
    let mut sidecars = Vec::new();
    for (pod, service) in [(&prod, "products"), (&front, "frontend"), (&batch, "batch")] {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        sidecars.push(Sidecar::start_with(
            pod,
            "sidecar: {}\nproxy:\n  stats_interval: 1s\n",
            &args,
        ));
    }
    let services = daemon.get_json("services");
    let vip: IpAddr = services
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "products")
        .and_then(|s| s["virtual_ip"].as_str())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(vip, IpAddr::V4(net.virtual_ip(1)));
    Mesh {
        sidecars,
        daemon,
        front,
        batch,
        vip: SocketAddr::new(vip, 9090),
        app,
        _prod: prod,
        _net: net,
    }
}

impl Mesh {
    fn logs(&self) -> String {
        let mut s = format!("daemon:\n{}\n", self.daemon.log());
        for (i, sc) in self.sidecars.iter().enumerate() {
            s.push_str(&format!("sidecar {i}:\n{}\n", sc.log_text()));
        }
        s
    }

    /// Retry a connection until it passes (the endpoint registers asynchronously).
    fn until_ok(&self, pod: &Pod, within: Duration) {
        let start = Instant::now();
        loop {
            match roundtrip(pod, self.vip, 10_000) {
                Ok(()) => return,
                Err(e) if start.elapsed() > within => {
                    panic!("no connection within {within:?}: {e}\n{}", self.logs())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

#[test]
fn daemon_configures_sidecars_and_pushes_intentions() {
    if !pods_available("daemon_configures_sidecars_and_pushes_intentions") {
        return;
    }
    let m = mesh(&[]);
    // Allowed over mTLS with certificates from the daemon, to the service's virtual IP.
    m.until_ok(&m.front, Duration::from_secs(10));
    roundtrip(&m.front, m.vip, 64 << 20).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    m.until_ok(&m.batch, Duration::from_secs(5));
    let prod_log = m.sidecars[0].log_text();
    assert!(
        prod_log.contains("certificate issued by the control daemon")
            && prod_log.contains("spiffe://dc1/ns/default/sa/products"),
        "{prod_log}"
    );

    // The proxies are listed with the version they applied and their certificates.
    let proxies = m.daemon.get_json("proxies");

    assert_eq!(proxies.as_array().unwrap().len(), 3, "{proxies}");
    for p in proxies.as_array().unwrap() {
        assert_eq!(p["live"], true, "{p}");
        assert!(p["applied_index"].as_u64().unwrap() > 0, "{p}");
        assert!(
            p["cert_expires_in_s"].as_i64().unwrap() > 71 * 3600,
            "default leaf lifetime 72h: {p}"
        );
    }
    let table = m.daemon.ok(&["get", "proxies"]);
    assert!(
        table.contains("products-198.18") && table.contains("live"),
        "{table}"
    );

    let d = m.daemon.ok(&["describe", "products"]);
    for want in [
        "9090 -> 8080",
        "frontend             -> products",
        "products-198.18",
        "ServiceIntentions/products",
        "healthy",
    ] {
        assert!(d.contains(want), "describe lacks '{want}':\n{d}");
    }
    let (ok, _, err) = m.daemon.ringctl(&["describe", "nosuch"]);
    assert!(!ok && err.contains("no service 'nosuch'"), "{err}");

    // A deny intention applies within a second, without restarts; others still pass.
    let served = m.app.load(Ordering::SeqCst);
    m.daemon.apply(DENY_BATCH);
    let applied = Instant::now();
    loop {
        if roundtrip(&m.batch, m.vip, 1000).is_err() {
            break;
        }
        assert!(
            applied.elapsed() < Duration::from_secs(1),
            "batch still allowed 1 s after the deny was applied\n{}",
            m.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("deny in force after {:?}", applied.elapsed());
    let after_deny = m.app.load(Ordering::SeqCst);
    assert!(roundtrip(&m.batch, m.vip, 1000).is_err());
    assert_eq!(
        m.app.load(Ordering::SeqCst),
        after_deny,
        "nothing of a denied connection reaches the app"
    );
    assert!(after_deny >= served);
    roundtrip(&m.front, m.vip, 100_000).unwrap();
    let prod_log = m.sidecars[0].log_text();
    assert!(
        prod_log.contains("intention_denied") && prod_log.contains("batch -> products"),
        "{prod_log}"
    );

    // Deleting it allows the pair again (no intention for batch: the earlier allow is gone too,
    // so re-apply the allow).
    m.daemon.ok(&["delete", "ServiceIntentions", "products"]);
    let deleted = Instant::now();
    loop {
        // No intentions at all: default deny.
        if roundtrip(&m.front, m.vip, 1000).is_err() {
            break;
        }
        assert!(deleted.elapsed() < Duration::from_secs(1), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    m.daemon
        .apply(&DENY_BATCH.replace("action: deny", "action: allow"));
    let allowed = Instant::now();
    while roundtrip(&m.batch, m.vip, 1000).is_err() {
        assert!(allowed.elapsed() < Duration::from_secs(1), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(20));
    }

    // SIGKILL the daemon: proxies keep serving with the last good config and say so.
    let bundle_before = m.daemon.ok(&["ca", "show"]);
    let mut m = m;
    m.daemon.kill9();
    roundtrip(&m.front, m.vip, 1 << 20).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    wait_for(
        "ctl_unreachable in a proxy's log",
        Duration::from_secs(15),
        || m.sidecars[1].log_text().contains("ctl_unreachable"),
    );
    roundtrip(&m.batch, m.vip, 1 << 20).unwrap();
    m.daemon.restart();
    // Nothing acknowledged is lost: catalog, intentions, CA.
    assert_eq!(m.daemon.ok(&["ca", "show"]), bundle_before);
    let services = m.daemon.get_json("services");
    assert_eq!(services.as_array().unwrap().len(), 3, "{services}");
    let check = m.daemon.ok(&["intention", "check", "batch", "products"]);
    assert!(check.starts_with("allow"), "{check}");
    wait_for(
        "the proxies to reach the daemon again",
        Duration::from_secs(20),
        || {
            m.sidecars[1]
                .log_text()
                .contains("control daemon reachable again")
        },
    );
    // And a change after the restart still reaches them.
    m.daemon.apply(DENY_BATCH);
    let applied = Instant::now();
    while roundtrip(&m.batch, m.vip, 1000).is_ok() {
        assert!(applied.elapsed() < Duration::from_secs(2), "{}", m.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    roundtrip(&m.front, m.vip, 100_000).unwrap();
    let prod = m.sidecars.remove(0).stop();
    assert!(prod["fail.intention_denied"] >= 2, "{prod:?}");
}

#[test]
fn certificates_rotate_and_the_root_rolls_over_during_a_transfer() {
    if !pods_available("certificates_rotate_and_the_root_rolls_over_during_a_transfer") {
        return;
    }
    // Short leaves: proxies must renew them (at about half the lifetime) during the test.
    let m = mesh(&["--leaf-lifetime", "20s"]);
    m.until_ok(&m.front, Duration::from_secs(10));
    let issuers = |d: &Daemon| -> Vec<(String, u64, String)> {
        d.get_json("proxies")
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                (
                    p["id"].as_str().unwrap().to_string(),
                    p["cert_generation"].as_u64().unwrap(),
                    p["cert_issuer"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let before = issuers(&m.daemon);
    assert!(
        before.iter().all(|(_, g, i)| *g == 0 && i.contains("(ca)")),
        "{before:?}"
    );
    let life = m.daemon.get_json("proxies")[0]["cert_expires_in_s"]
        .as_i64()
        .unwrap();
    assert!((10..=20).contains(&life), "--leaf-lifetime 20s: {life}");

    // A long transfer (about 8 s) across everything that follows.
    let (front, vip) = (m.front.clone(), m.vip);
    let long = std::thread::spawn(move || {
        roundtrip_paced(&front, vip, 16 << 20, Duration::from_millis(30))
    });
    std::thread::sleep(Duration::from_millis(500));

    // Leaf rotation for one service, then for all.
    m.daemon.ok(&["cert", "rotate", "--service", "products"]);
    wait_for("products re-issued", Duration::from_secs(5), || {
        issuers(&m.daemon)
            .iter()
            .any(|(id, g, _)| id.starts_with("products") && *g == 1)
    });
    roundtrip(&m.front, m.vip, 100_000).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    m.daemon.ok(&["cert", "rotate"]);
    wait_for("every leaf re-issued", Duration::from_secs(5), || {
        issuers(&m.daemon).iter().all(|(_, g, _)| *g >= 1)
    });
    roundtrip(&m.batch, m.vip, 100_000).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));

    // CA rollover.
    let out = m.daemon.ok(&["ca", "rotate", "--timeout", "30s"]);
    assert!(
        out.contains("1/3") && out.contains("2/3") && out.contains("3/3"),
        "{out}"
    );
    let after = issuers(&m.daemon);
    assert!(
        after.iter().all(|(_, _, i)| i.contains("(root-")),
        "every leaf is from the new root: {after:?}"
    );
    let ca = m.daemon.ok(&["ca", "show"]);
    assert!(
        ca.contains("phase:   idle") && !ca.contains("trusted: ca"),
        "{ca}"
    );
    // New connections use the new certificates (only the new root is trusted now).
    roundtrip(&m.front, m.vip, 1 << 20).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    roundtrip(&m.batch, m.vip, 1 << 20).unwrap();

    assert!(
        !long.is_finished(),
        "the long transfer must span the rotations (make it longer)"
    );
    let r = long.join().unwrap();
    assert!(
        r.is_ok(),
        "the long transfer survived rotation and rollover: {r:?}\n{}",
        m.logs()
    );
    // Renewal at about half the lifetime, without being asked.
    let expiry = |d: &Daemon| -> Vec<i64> {
        d.get_json("proxies")
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["cert_not_after"].as_i64().unwrap())
            .collect()
    };
    let first = expiry(&m.daemon);
    wait_for(
        "every proxy to renew its certificate",
        Duration::from_secs(20),
        || expiry(&m.daemon).iter().zip(&first).all(|(a, b)| a > b),
    );
    let log = m.sidecars[0].log_text();
    assert!(log.contains("half of its lifetime passed"), "{log}");
    // Two forced rotations, one by the rollover, one or two renewals: not a loop.
    let renewals = log.matches("renewing the certificate").count();
    assert!((4..=6).contains(&renewals), "{renewals} renewals:\n{log}");
    roundtrip(&m.front, m.vip, 1 << 20).unwrap_or_else(|e| panic!("{e}\n{}", m.logs()));
    let mut m = m;
    for sc in m.sidecars.drain(..) {
        let c = sc.stop();
        assert!(!c.keys().any(|k| k.starts_with("fail.")), "{c:?}");
    }
}
