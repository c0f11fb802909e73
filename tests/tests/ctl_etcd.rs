//! Daemons sharing one etcd (`ringctl daemon --store etcd://...`) are one mesh: what is applied,
//! registered or deleted through one is seen through the other, they never hand out the same
//! virtual IP, and a proxy long-polling one daemon hears of a change made through the other —
//! also after etcd restarted under them. They sign with one CA (in etcd, its keys sealed), and a
//! rollover started on one is carried by all. Endpoints registered by a daemon's proxies live
//! with it (its etcd lease) and with their proxy (its reports); the embedded store expires silent
//! proxies' endpoints the same way. With etcd unreachable a daemon refuses writes with
//! `store_unreachable` and keeps serving its proxies. (The store's own contract, on both
//! backends, is tested in ctl: `cargo test -p ringside-ctl store::`.)

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::etcd::Etcd;

const DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: products-api
spec:
  destination:
    name: products-api
  sources:
    - name: public-api
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: payments
spec:
  protocol: tcp
";

const MORE: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: products-api
spec:
  protocol: http
";

fn daemon(tag: &str, etcd: &Etcd) -> Daemon {
    daemon_with(tag, etcd, &[])
}

/// A daemon on `etcd` with the mesh's CA secret and `extra` arguments.
fn daemon_with(tag: &str, etcd: &Etcd, extra: &[&str]) -> Daemon {
    let url = etcd.url();
    let secret = etcd.ca_secret();
    let mut args = vec!["--store", &url, "--ca-secret", secret.to_str().unwrap()];
    args.extend_from_slice(extra);
    Daemon::start(
        &format!("ringside-etcd-{tag}-{}", std::process::id()),
        &args,
    )
}

/// `Kind/name` of every stored document, through `d`.
fn config(d: &Daemon) -> BTreeSet<String> {
    d.get_json("config")
        .as_array()
        .expect("a list of documents")
        .iter()
        .map(|v| {
            format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["name"].as_str().unwrap()
            )
        })
        .collect()
}

fn index(d: &Daemon) -> u64 {
    let (status, body) = ringside_core::control::http_call(
        &d.socket,
        "GET",
        "/v1/index",
        None,
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(status, 200);
    serde_json::from_slice::<serde_json::Value>(&body).unwrap()["index"]
        .as_u64()
        .unwrap()
}

/// Long-poll `d`'s proxy API for a configuration newer than `after`, on a thread; returns the
/// index answered and how long the answer took.
fn long_poll(d: &Daemon, token: &str, after: u64) -> std::thread::JoinHandle<(u64, Duration)> {
    let (socket, token) = (d.proxy_socket.clone(), token.to_string());
    std::thread::spawn(move || {
        let start = Instant::now();
        let (status, body) = ringside_core::control::http_call(
            &socket,
            "GET",
            &format!("/v1/proxy/config?index={after}&wait=30"),
            None,
            Some(&token),
            Duration::from_secs(40),
        )
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        (v["index"].as_u64().unwrap(), start.elapsed())
    })
}

fn services(d: &Daemon) -> Vec<(String, String)> {
    d.get_json("services")
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["virtual_ip"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn two_daemons_on_one_etcd_are_one_mesh() {
    let mut etcd = Etcd::start();
    let a = daemon("a", &etcd);
    let b = daemon("b", &etcd);

    // Applied through A, seen through B (both the text and the JSON listing).
    let out = a.apply(DOCS);
    assert!(out.contains("products-api"), "{out}");
    let want = BTreeSet::from([
        "ServiceDefaults/payments".to_string(),
        "ServiceIntentions/products-api".to_string(),
    ]);
    assert_eq!(config(&b), want);
    let text = b.ok(&["get", "config"]);
    assert!(
        text.contains("ServiceIntentions") && text.contains("payments"),
        "{text}"
    );
    assert_eq!(index(&a), index(&b), "one index: the etcd revision");

    // Both register services at the same moment, some under the same names: one VIP per
    // service, none handed out twice.
    let register = |d: &Daemon, own: &str| {
        let mut names: Vec<String> = (0..8).map(|i| format!("{own}-{i}")).collect();
        names.extend((0..4).map(|i| format!("shared-{i}")));
        for n in names {
            d.ok(&["register", "service", &n, "--port", "80:8080"]);
        }
    };
    std::thread::scope(|s| {
        s.spawn(|| register(&a, "a"));
        s.spawn(|| register(&b, "b"));
    });
    let through_a = services(&a);
    assert_eq!(through_a.len(), 20, "{through_a:?}");
    let vips: BTreeSet<&String> = through_a.iter().map(|(_, ip)| ip).collect();
    assert_eq!(
        vips.len(),
        20,
        "a virtual IP handed out twice: {through_a:?}"
    );
    assert_eq!(
        services(&b),
        through_a,
        "both daemons list the same catalog"
    );

    // A proxy token made through A works on B; B's proxy long-poll answers a change applied
    // through A (B follows etcd), long before its 30 s wait.
    let token_out = a.ok(&["token", "create", "--service", "products-api"]);
    let token = token_out
        .split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no token in: {token_out}"))
        .to_string();
    let before = index(&b);
    let poll = long_poll(&b, &token, before);
    std::thread::sleep(Duration::from_millis(300));
    a.apply(MORE);
    let (seen, took) = poll.join().unwrap();
    assert!(seen > before, "B answered index {seen}, not past {before}");
    assert!(
        took < Duration::from_secs(10),
        "B took {took:?}\n{}",
        b.log()
    );
    assert_eq!(seen, index(&a));

    // Deleted through B, gone through A.
    b.ok(&["delete", "ServiceDefaults", "payments"]);
    assert!(!config(&a).contains("ServiceDefaults/payments"));

    // etcd restarts under both: B resumes following and still hears A's changes.
    etcd.restart();
    let before = index(&b);
    let poll = long_poll(&b, &token, before);
    std::thread::sleep(Duration::from_millis(300));
    let mut applied = false;
    for _ in 0..50 {
        // The daemons' clients reconnect on their own; the first calls may fail meanwhile.
        let f = a.dir.join("again.yaml");
        std::fs::write(&f, DOCS).unwrap();
        if a.ringctl(&["apply", "-f", f.to_str().unwrap()]).0 {
            applied = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        applied,
        "A could not apply after etcd restarted\n{}",
        a.log()
    );
    let (seen, took) = poll.join().unwrap();
    assert!(
        seen > before && took < Duration::from_secs(20),
        "after the restart B answered {seen} (before {before}) in {took:?}\n{}",
        b.log()
    );
    assert_eq!(
        config(&b),
        want.into_iter()
            .chain(["ServiceDefaults/products-api".to_string()])
            .collect()
    );
}

/// `--etcd-ca/--etcd-cert/--etcd-key`: a daemon reaches an etcd that takes clients over TLS
/// with client certificates; without its client certificate it is refused and says so.
#[test]
fn a_daemon_reaches_etcd_over_tls() {
    let etcd = Etcd::start_tls();
    let tls = etcd.tls.clone().unwrap();
    let url = etcd.url();
    let secret = etcd.ca_secret();
    let (ca, cert, key) = (
        tls.ca.to_str().unwrap(),
        tls.client_cert.to_str().unwrap(),
        tls.client_key.to_str().unwrap(),
    );
    let d = Daemon::start(
        &format!("ringside-etcd-tls-{}", std::process::id()),
        &[
            "--ca-secret",
            secret.to_str().unwrap(),
            "--store",
            &url,
            "--etcd-ca",
            ca,
            "--etcd-cert",
            cert,
            "--etcd-key",
            key,
        ],
    );
    d.apply(MORE);
    assert_eq!(
        config(&d),
        BTreeSet::from(["ServiceDefaults/products-api".to_string()])
    );

    let dir = d.dir.join("refused");
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut refused = ringside_tests::ChildGuard::spawn(
        std::process::Command::new(ringside_tests::workspace_bin("ringctl"))
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(dir.join("ctl.sock"))
            .args(["--store", &url, "--etcd-ca", ca])
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let status = refused.wait_timeout(Duration::from_secs(30));
    let said = std::fs::read_to_string(dir.join("log")).unwrap();
    assert!(!status.success(), "{said}");
    assert!(said.contains("cannot reach etcd at 127.0.0.1:"), "{said}");
}

/// A proxy token for `service`, made through `d`.
fn token(d: &Daemon, service: &str) -> String {
    let out = d.ok(&["token", "create", "--service", service]);
    out.split_whitespace()
        .find(|w| w.len() == 64 && w.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| panic!("no token in: {out}"))
        .to_string()
}

/// One request to a daemon socket: status and JSON body.
fn call(
    socket: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> (u16, serde_json::Value) {
    let (status, body) = ringside_core::control::http_call(
        socket,
        method,
        path,
        body,
        token,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// A proxy's report, as `ringside run --address ADDRESS --proxy-id ID` sends it.
fn report_body(id: &str, address: &str) -> String {
    serde_json::json!({
        "id": id, "service": "", "address": address, "applied_index": 0,
        "cert_generation": 0, "cert_not_after": 0,
    })
    .to_string()
}

/// A simulated proxy: reports to a daemon's proxy socket every 500 ms (a sidecar reports at
/// least every 10 s) until dropped; a failed report (a dead daemon) is tried again.
struct Reporter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reporter {
    fn start(d: &Daemon, token: &str, id: &str, address: &str) -> Reporter {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (socket, token, body) = (
            d.proxy_socket.clone(),
            token.to_string(),
            report_body(id, address),
        );
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = ringside_core::control::http_call(
                    &socket,
                    "POST",
                    "/v1/proxy/report",
                    Some(body.clone()),
                    Some(&token),
                    Duration::from_secs(10),
                );
                std::thread::sleep(Duration::from_millis(500));
            }
        });
        Reporter {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The endpoint addresses in `d`'s catalog.
fn endpoints(d: &Daemon) -> BTreeSet<String> {
    d.get_json("endpoints")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["address"].as_str().unwrap().to_string())
        .collect()
}

/// What `d` sends a proxy of the token's service now (no wait).
fn proxy_config(d: &Daemon, token: &str) -> serde_json::Value {
    let (status, v) = call(
        &d.proxy_socket,
        "GET",
        "/v1/proxy/config?index=0&wait=0",
        None,
        Some(token),
    );
    assert_eq!(status, 200, "{v}\n{}", d.log());
    v
}

/// The endpoints of `service` in a proxy configuration.
fn sent_endpoints(config: &serde_json::Value, service: &str) -> BTreeSet<String> {
    config["services"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().unwrap().iter())
        .map(|e| e.as_str().unwrap().to_string())
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// `GET /v1/ca` of `d`.
fn ca(d: &Daemon) -> serde_json::Value {
    let (status, v) = call(&d.socket, "GET", "/v1/ca", None, None);
    assert_eq!(status, 200, "{v}");
    v
}

/// Whether `openssl verify` accepts `leaf` with `bundle` as its trusted roots.
fn verifies(leaf: &std::path::Path, bundle: &std::path::Path) -> bool {
    std::process::Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(bundle)
        .arg(leaf)
        .output()
        .expect("openssl runs")
        .status
        .success()
}

/// `ringctl issue` through `d`: (certificate, bundle) files.
fn issue(d: &Daemon, token: &str, tag: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let f = |ext: &str| d.dir.join(format!("{tag}.{ext}"));
    let (key, cert, bundle) = (f("key"), f("pem"), f("bundle"));
    d.ok(&[
        "issue",
        "--proxy-token",
        token,
        "--key-out",
        key.to_str().unwrap(),
        "--cert-out",
        cert.to_str().unwrap(),
        "--bundle-out",
        bundle.to_str().unwrap(),
    ]);
    (cert, bundle)
}

/// A daemon that must refuse to start; returns what it said.
fn refused_start(etcd: &Etcd, tag: &str, extra: &[&str]) -> String {
    let dir = std::env::temp_dir().join(format!("ringside-etcd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let log = std::fs::File::create(dir.join("log")).unwrap();
    let mut child = ringside_tests::ChildGuard::spawn(
        std::process::Command::new(ringside_tests::workspace_bin("ringctl"))
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(dir.join("ctl.sock"))
            .args(["--store", &etcd.url()])
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(log),
    );
    let status = child.wait_timeout(Duration::from_secs(30));
    let said = std::fs::read_to_string(dir.join("log")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!status.success(), "{said}");
    said
}

/// One CA for the mesh: leaves issued through either daemon chain to the same root, whose key
/// is on neither daemon's disk (sealed in etcd: a daemon with another secret cannot start); a
/// rollover step taken on A is served by B, B finishes it, and A serves the result.
#[test]
fn daemons_on_one_etcd_sign_with_one_ca_and_roll_it_over_together() {
    let etcd = Etcd::start();
    let a = daemon("ca-a", &etcd);
    let b = daemon("ca-b", &etcd);
    let t = token(&a, "web");
    let (leaf_a, bundle_a) = issue(&a, &t, "a1");
    let (leaf_b, bundle_b) = issue(&b, &t, "b1");
    let read = |p: &std::path::Path| std::fs::read_to_string(p).unwrap();
    assert_eq!(read(&bundle_a), read(&bundle_b), "one root for the mesh");
    assert_eq!(read(&bundle_a).matches("BEGIN CERTIFICATE").count(), 1);
    assert!(verifies(&leaf_a, &bundle_b) && verifies(&leaf_b, &bundle_a));
    for d in [&a, &b] {
        assert!(
            !d.dir.join("data/ca").exists(),
            "a root on the daemon's disk"
        );
    }

    // Another secret, or none: refused, saying why.
    let other = etcd.dir.join("other.secret");
    std::fs::write(&other, "f".repeat(64)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o600)).unwrap();
    let said = refused_start(
        &etcd,
        "wrong-secret",
        &["--ca-secret", other.to_str().unwrap()],
    );
    assert!(said.contains("same --ca-secret"), "{said}");
    let said = refused_start(&etcd, "no-secret", &[]);
    assert!(said.contains("needs --ca-secret"), "{said}");

    // Step 1 on A (as `ringctl ca rotate` takes it): B serves the new bundle too.
    let (status, v) = call(&a.socket, "POST", "/v1/ca/rotate?from=idle", None, None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["phase"], "new_trusted");
    ringside_tests::wait_for("B serves the new root", Duration::from_secs(10), || {
        ca(&b)["phase"] == "new_trusted"
    });
    let both = ca(&b)["bundle"].as_str().unwrap().to_string();
    assert_eq!(both.matches("BEGIN CERTIFICATE").count(), 2);
    assert_eq!(ca(&a)["bundle"].as_str().unwrap(), both);
    assert!(
        proxy_config(&b, &t)["bundle"].as_str().unwrap() == both,
        "B's proxies are sent both roots"
    );
    // The same step again (a second operator, on B): not taken twice.
    let (status, v) = call(&b.socket, "POST", "/v1/ca/rotate?from=idle", None, None);
    assert_eq!((status, v["phase"].as_str()), (200, Some("new_trusted")));
    // B carries the rollover on; A serves where it ends.
    let out = b.ok(&["ca", "rotate", "--timeout", "20s"]);
    assert!(out.contains("3/3"), "{out}");
    ringside_tests::wait_for(
        "A serves the new root alone",
        Duration::from_secs(10),
        || {
            let (va, vb) = (ca(&a), ca(&b));
            va["phase"] == "idle" && va["roots"] == vb["roots"] && va["bundle"] == vb["bundle"]
        },
    );
    assert_eq!(ca(&a)["generation"].as_u64(), Some(1), "leaves re-issued");
    assert_eq!(proxy_config(&a, &t)["cert_generation"].as_u64(), Some(1));
    let (leaf_a2, bundle_a2) = issue(&a, &t, "a2");
    let (leaf_b2, bundle_b2) = issue(&b, &t, "b2");
    assert_eq!(read(&bundle_a2), read(&bundle_b2));
    assert!(verifies(&leaf_a2, &bundle_b2) && verifies(&leaf_b2, &bundle_a2));
    assert!(!verifies(&leaf_a, &bundle_a2), "the old root is retired");
}

/// Endpoints live and die with their node: B's proxy's endpoint leaves the catalog (and A's
/// proxies' configuration) within the lease TTL of B's SIGKILL, comes back when B is restarted
/// and the proxy reports again, and goes when the proxy itself stops reporting. Hand-registered
/// endpoints stay until deregistered.
#[test]
fn endpoints_live_and_die_with_their_daemon_and_their_proxy() {
    const TTL: Duration = Duration::from_secs(3);
    let etcd = Etcd::start();
    let a = daemon_with("lease-a", &etcd, &["--lease-ttl", "3s"]);
    let mut b = daemon_with("lease-b", &etcd, &["--lease-ttl", "3s"]);
    a.ok(&["register", "service", "web", "--port", "80:8080"]);
    let t = token(&a, "web");
    let _on_a = Reporter::start(&a, &t, "web-a", "198.18.0.6");
    let on_b = Reporter::start(&b, &t, "web-b", "198.18.0.5");
    b.ok(&[
        "register",
        "endpoint",
        "web",
        "198.18.0.9",
        "--node",
        "by-hand",
    ]);
    let all = set(&["198.18.0.5", "198.18.0.6", "198.18.0.9"]);
    ringside_tests::wait_for("three endpoints", Duration::from_secs(10), || {
        endpoints(&a) == all
    });
    // Alive, the endpoints outlive many TTLs.
    std::thread::sleep(TTL * 2);
    assert_eq!(endpoints(&a), all);

    b.kill9();
    let killed = Instant::now();
    let without_b = set(&["198.18.0.6", "198.18.0.9"]);
    ringside_tests::wait_for(
        "B's proxy's endpoint leaves the catalog",
        TTL + Duration::from_secs(6),
        || endpoints(&a) == without_b,
    );
    eprintln!("gone {:?} after B's SIGKILL", killed.elapsed());
    ringside_tests::wait_for(
        "A's proxies are sent the catalog without it",
        Duration::from_secs(5),
        || sent_endpoints(&proxy_config(&a, &t), "web") == without_b,
    );

    // B restarted: its proxy's next report re-attaches the endpoint to B's new lease.
    b.restart();
    ringside_tests::wait_for("the endpoint comes back", Duration::from_secs(10), || {
        endpoints(&a) == all
    });
    ringside_tests::wait_for(
        "A's proxies are sent it again",
        Duration::from_secs(5),
        || sent_endpoints(&proxy_config(&a, &t), "web") == all,
    );
    std::thread::sleep(TTL * 2);
    assert_eq!(endpoints(&a), all, "held by B's new lease");

    // The proxy stops reporting (its pod died, B lives): its endpoint goes within the TTL.
    drop(on_b);
    ringside_tests::wait_for(
        "the silent proxy's endpoint goes",
        TTL + Duration::from_secs(6),
        || endpoints(&a) == without_b,
    );

    // By hand: until deregistered, through any daemon.
    a.ok(&["deregister", "endpoint", "web", "198.18.0.9"]);
    assert_eq!(endpoints(&b), set(&["198.18.0.6"]));
    let (ok, _, err) = a.ringctl(&["deregister", "endpoint", "web", "198.18.0.9"]);
    assert!(!ok && err.contains("has no endpoint"), "{err}");
}

/// The embedded store gives proxies' endpoints the same life: a proxy silent for the TTL loses
/// its endpoint, also one that never reports again after a daemon restart; a live proxy keeps
/// it across the restart; hand-registered ones stay until deregistered.
#[test]
fn the_embedded_store_expires_endpoints_of_silent_proxies() {
    const TTL: Duration = Duration::from_secs(2);
    let mut d = Daemon::start(
        &format!("ringside-redb-lease-{}", std::process::id()),
        &["--lease-ttl", "2s"],
    );
    d.ok(&["register", "service", "web", "--port", "80:8080"]);
    let t = token(&d, "web");
    let live = Reporter::start(&d, &t, "web-live", "198.18.0.5");
    let dying = Reporter::start(&d, &t, "web-dying", "198.18.0.7");
    d.ok(&["register", "endpoint", "web", "198.18.0.9"]);
    let all = set(&["198.18.0.5", "198.18.0.7", "198.18.0.9"]);
    ringside_tests::wait_for("three endpoints", Duration::from_secs(10), || {
        endpoints(&d) == all
    });
    std::thread::sleep(TTL * 2);
    assert_eq!(endpoints(&d), all);
    // A restart with one proxy gone for good meanwhile.
    d.kill9();
    drop(dying);
    d.restart();
    ringside_tests::wait_for(
        "the proxy that never came back loses its endpoint",
        TTL + Duration::from_secs(5),
        || endpoints(&d) == set(&["198.18.0.5", "198.18.0.9"]),
    );
    std::thread::sleep(TTL * 2);
    assert_eq!(endpoints(&d), set(&["198.18.0.5", "198.18.0.9"]));
    drop(live);
    ringside_tests::wait_for(
        "a silent proxy loses its endpoint",
        TTL + Duration::from_secs(5),
        || endpoints(&d) == set(&["198.18.0.9"]),
    );
    let out = d.ok(&["deregister", "endpoint", "web", "198.18.0.9"]);
    assert!(out.contains("deregistered"), "{out}");
    assert!(endpoints(&d).is_empty());
}

/// etcd gone (killed, then frozen): the daemon refuses writes with `store_unreachable` naming
/// etcd, says so in `doctor`, keeps answering its proxies (config long-polls with the last good
/// state, reports taken), and works again once etcd is back.
#[test]
fn a_daemon_rides_out_an_unreachable_etcd() {
    let mut etcd = Etcd::start();
    let a = daemon("down", &etcd);
    a.apply(DOCS);
    a.ok(&["register", "service", "web", "--port", "80:8080"]);
    let t = token(&a, "web");
    let _proxy = Reporter::start(&a, &t, "web-1", "198.18.0.5");
    ringside_tests::wait_for("the proxy's endpoint", Duration::from_secs(10), || {
        endpoints(&a).contains("198.18.0.5")
    });
    let f = a.dir.join("more.yaml");
    std::fs::write(&f, MORE).unwrap();
    let apply = || a.ringctl(&["apply", "-f", f.to_str().unwrap()]);
    let store_check = || -> serde_json::Value {
        let (_, out, err) = a.ringctl(&["doctor", "-o", "json"]);
        let items: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}{err}"));
        items
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["check"].as_str().unwrap().starts_with("store reachable"))
            .cloned()
            .unwrap_or_else(|| panic!("no store check: {items}"))
    };
    assert_eq!(store_check()["ok"], true);

    for how in ["killed", "frozen"] {
        let good = proxy_config(&a, &t);
        let start = Instant::now();
        if how == "killed" {
            etcd.stop();
        } else {
            etcd.pause();
        }
        let (ok, _, err) = apply();
        assert!(!ok, "{how}: apply succeeded");
        assert!(
            err.contains("store_unreachable") && err.contains("etcd at 127.0.0.1:"),
            "{how}: {err}"
        );
        assert!(
            err.contains("nothing was written") || err.contains("not carried out"),
            "{err}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{how}: {:?}",
            start.elapsed()
        );
        for args in [
            &["token", "create", "--service", "web"][..],
            &["register", "service", "other"],
            &["get", "services"],
        ] {
            let (ok, _, err) = a.ringctl(args);
            assert!(
                !ok && err.contains("store_unreachable"),
                "{how} {args:?}: {err}"
            );
        }
        // Proxies: the last good state, at once or at the end of their wait; reports taken.
        let now = proxy_config(&a, &t);
        assert_eq!(now["index"], good["index"], "{how}");
        assert!(sent_endpoints(&now, "web").contains("198.18.0.5"));
        assert_eq!(now, good, "{how}: the last good state");
        let polled = Instant::now();
        let (status, v) = call(
            &a.proxy_socket,
            "GET",
            &format!("/v1/proxy/config?index={}&wait=1", good["index"]),
            None,
            Some(&t),
        );
        assert_eq!(status, 200, "{v}");
        assert!(polled.elapsed() < Duration::from_secs(5));
        let (status, v) = call(
            &a.proxy_socket,
            "POST",
            "/v1/proxy/report",
            Some(report_body("web-2", "198.18.0.8")),
            Some(&t),
        );
        assert_eq!(
            (status, &v["ok"]),
            (200, &serde_json::Value::Bool(true)),
            "{v}"
        );
        let check = store_check();
        assert_eq!(check["ok"], false, "{check}");
        assert!(
            check["found"]
                .as_str()
                .unwrap()
                .contains("store_unreachable"),
            "{check}"
        );
        let (ok, out, _) = a.ringctl(&["doctor"]);
        assert!(
            !ok && out.contains("FAIL") && out.contains("store_unreachable"),
            "{out}"
        );

        if how == "killed" {
            etcd.restart();
        } else {
            etcd.resume();
        }
        ringside_tests::wait_for("apply works again", Duration::from_secs(30), || apply().0);
        assert_eq!(store_check()["ok"], true);
        // Caught up: the proxy is sent the new state, with the report taken while etcd was
        // away written since.
        ringside_tests::wait_for(
            "the proxy gets the new state",
            Duration::from_secs(10),
            || proxy_config(&a, &t)["index"].as_u64() > good["index"].as_u64(),
        );
        ringside_tests::wait_for(
            "the kept report is written",
            Duration::from_secs(10),
            || endpoints(&a).contains("198.18.0.8") || how == "frozen",
        );
    }
}
