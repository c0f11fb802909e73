//! Daemons sharing one etcd (`ringctl daemon --store etcd://...`) are one mesh: what is applied,
//! registered or deleted through one is seen through the other, they never hand out the same
//! virtual IP, and a proxy long-polling one daemon hears of a change made through the other —
//! also after etcd restarted under them. (The store's own contract, on both backends, is tested
//! in ctl: `cargo test -p ringside-ctl store::`.)

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
    let url = etcd.url();
    Daemon::start(
        &format!("ringside-etcd-{tag}-{}", std::process::id()),
        &["--store", &url],
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
    let (ca, cert, key) = (
        tls.ca.to_str().unwrap(),
        tls.client_cert.to_str().unwrap(),
        tls.client_key.to_str().unwrap(),
    );
    let d = Daemon::start(
        &format!("ringside-etcd-tls-{}", std::process::id()),
        &[
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
