//! `ringctl why` names the right cause in each situation operators meet (real pods, sidecars
//! configured by the daemon, redirect rules installed): the destination not registered, an
//! intention that denies, the app on another port than targetPort, the app on an address the
//! sidecar cannot reach, PostgreSQL declared http, the destination's or the source's sidecar not
//! running while its redirect rules are in place, the source's sidecar cut off from the daemon when
//! the destination was registered (from the daemon's records, recent and not, and from the
//! sidecar itself), a source with no sidecar known to the daemon, an
//! expired destination certificate, and an app that started before its sidecar (blamed only with
//! the evidence: an app process older than the sidecar, connections failed before it started).
//! Two causes at once: the one a connection meets first wins. Nothing wrong: it says so, exit 0.
//! Needs root.

use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::http::{serve, Client};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};
use ringside_tests::postgres::Postgres;
use ringside_tests::{wait_for, ChildGuard};

const DOCS: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: from-frontend
spec:
  destination:
    name: '*'
  sources:
    - name: frontend
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
    - name: payments
      action: allow
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: pg
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: web
spec:
  protocol: http
";

/// `ringctl why ARGS -o json`; its exit status says whether it named a cause (1) or not (0).
fn why(d: &Daemon, args: &[&str]) -> serde_json::Value {
    let mut a = vec!["why"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["-o", "json"]);
    let (code, out, err) = d.ringctl_status(&a);
    let v: serde_json::Value =
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ringctl {a:?}: {e}: {out}{err}"));
    let expected = if v["reason"].is_null() { 0 } else { 1 };
    assert_eq!(code, Some(expected), "exit status of ringctl {a:?}: {out}");
    v
}

/// A process in `pod` (an app): it tries one connection to `to` (refused while nothing takes the
/// redirected connection) and then stays.
fn early_app(pod: &Pod, to: SocketAddr) -> ChildGuard {
    let app = ChildGuard::spawn(pod.cmd("bash").args([
        "-c",
        &format!(
            "(: </dev/tcp/{}/{}) 2>/dev/null; exec sleep 600",
            to.ip(),
            to.port()
        ),
    ]));
    let comm = format!("/proc/{}/comm", app.pid());
    wait_for(
        "the app's first connection",
        Duration::from_secs(10),
        || std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() == "sleep"),
    );
    app
}

fn assert_cause(v: &serde_json::Value, reason: &str, words: &[&str]) {
    let pretty = serde_json::to_string_pretty(v).unwrap();
    assert_eq!(v["reason"], reason, "{pretty}");
    let cause = v["cause"].as_str().unwrap_or("");
    for w in words {
        assert!(
            cause.contains(w),
            "the cause lacks '{w}': {cause}\n{pretty}"
        );
    }
    assert!(!v["fix"].as_str().unwrap_or("").is_empty());
}

fn try_connect(pod: &Pod, to: SocketAddr) -> bool {
    pod.enter(move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(2))
            .map(|s| {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let _ = std::io::Write::write_all(&mut &s, b"x");
                let mut b = [0u8; 1];
                let _ = std::io::Read::read(&mut &s, &mut b);
            })
            .is_ok()
    })
    .join()
    .unwrap()
}

fn vip(d: &Daemon, name: &str) -> IpAddr {
    d.get_json("services")
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .and_then(|s| s["virtual_ip"].as_str())
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn why_names_the_cause() {
    if !pods_available("why_names_the_cause") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let web = net.pod("web");
    let pay = net.pod("pay");
    let ledger = net.pod("ledger");
    let pgpod = net.pod("pg");
    let range = format!("{}/28", net.virtual_ip(0));
    // Short leaves: a sidecar cut off from the daemon lets its certificate expire within the test.
    // The sidecars are cut off from the daemon for 21 s below: longer than the default lease TTL
    // (15 s), after which the daemon would remove their endpoints as those of dead proxies.
    let mut daemon = Daemon::start(
        &net.id,
        &[
            "--vip-range",
            &range,
            "--leaf-lifetime",
            "20s",
            "--lease-ttl",
            "60s",
        ],
    );
    for (svc, port) in [
        ("web", "80:8080"),
        ("payments", "1800:1800"),
        ("ledger", "1900:1900"),
        ("pg", "5432:5432"),
    ] {
        daemon.ok(&["register", "service", svc, "--port", port]);
    }
    daemon.ok(&["register", "service", "frontend"]);
    daemon.apply(DOCS);
    for p in [&front, &web, &pay, &ledger, &pgpod] {
        p.install_redirect(&[]);
    }
    web.enter(|| serve("web", "127.0.0.1:8080".parse().unwrap()))
        .join()
        .unwrap();
    // payments is mapped 1800 -> 1800 but its app listens on 8080.
    let _pay_app = pay.echo_app("0.0.0.0:8080".parse().unwrap());
    // ledger's app listens only on 127.0.0.2, which the sidecar never tries.
    let _ledger_app = ledger.echo_app("127.0.0.2:1900".parse().unwrap());
    let _pg = Postgres::start_in(Some(&pgpod.name), 5432);

    let start_sidecar = |pod: &Pod, service: &str| {
        let args = daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, "sidecar: {}\n", &args)
    };
    let mut web_sc = Some(start_sidecar(&web, "web"));
    let _pay_sc = start_sidecar(&pay, "payments");
    let _ledger_sc = start_sidecar(&ledger, "ledger");
    let _pg_sc = start_sidecar(&pgpod, "pg");

    // Nothing is wrong: it says so (exit 0), though payments' sidecar has just started.
    let web_vip = SocketAddr::new(vip(&daemon, "web"), 80);
    let v = why(
        &daemon,
        &[
            "payments",
            "web:80",
            "--src-netns",
            &pay.name,
            "--dst-netns",
            &web.name,
        ],
    );
    assert!(v["reason"].is_null(), "{v:#}");
    assert!(
        v["checks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["ok"] == true),
        "{v:#}"
    );

    // The app starts before its sidecar: its first connection is refused by the redirect rules.
    let _front_app = early_app(&front, web_vip);
    let mut front_sc = Some(start_sidecar(&front, "frontend"));
    let v = why(
        &daemon,
        &[
            "frontend",
            "web:80",
            "--src-netns",
            &front.name,
            "--dst-netns",
            &web.name,
        ],
    );
    assert_cause(
        &v,
        "proxy_not_running",
        &["frontend's app (sleep (pid", "started before its sidecar"],
    );
    assert!(v["fix"].as_str().unwrap().contains("wait-ready"));
    // describe proxy shows the evidence the sidecar reported.
    let front_id = daemon
        .get_json("proxies")
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["service"] == "frontend")
        .map(|p| p["id"].as_str().unwrap().to_string())
        .unwrap();
    let d = daemon.ok(&["describe", "proxy", &front_id]);
    assert!(
        d.contains("service:     frontend") && d.contains("connection attempts had failed"),
        "{d}"
    );
    // Without the pod there is no evidence of the app's start: no blame, the count is shown.
    let v = why(&daemon, &["frontend", "web:80"]);
    assert!(v["reason"].is_null(), "{v:#}");

    // Not registered; registered without that port; registered without an endpoint.
    let v = why(&daemon, &["frontend", "ghost"]);
    assert_cause(&v, "unknown_destination", &["ghost is not registered"]);
    let v = why(&daemon, &["frontend", "web:81"]);
    assert_cause(&v, "unknown_destination", &["web has no service port 81"]);
    daemon.ok(&["register", "service", "empty", "--port", "5000:5000"]);
    let v = why(&daemon, &["frontend", "empty:5000"]);
    assert_cause(&v, "no_healthy_endpoint", &["empty has no endpoint"]);

    // A source with no sidecar known to the daemon (registered, allowed, but nothing reports
    // for it): its connections are not proxied.
    daemon.ok(&["register", "service", "batch"]);
    daemon.apply(
        "apiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: from-batch\nspec:\n  destination:\n    name: '*'\n  sources:\n    - name: batch\n      action: allow\n",
    );
    let v = why(&daemon, &["batch", "web:80"]);
    assert_cause(
        &v,
        "unknown_destination",
        &["batch has no sidecar known to the daemon"],
    );
    assert!(
        v["fix"]
            .as_str()
            .unwrap()
            .contains("ringctl token create --service batch"),
        "{v:#}"
    );

    // An intention denies (and frontend's app started before its sidecar: the cause a
    // connection meets first wins).
    daemon.apply(
        "apiVersion: consul.hashicorp.com/v1alpha1\nkind: ServiceIntentions\nmetadata:\n  name: web\nspec:\n  destination:\n    name: web\n  sources:\n    - name: frontend\n      action: deny\n",
    );
    let v = why(&daemon, &["frontend", "web"]);
    assert_cause(&v, "intention_denied", &["frontend -> web: deny"]);
    daemon.ok(&["delete", "ServiceIntentions", "web"]);

    // The app listens on another port than targetPort.
    let pay_vip = SocketAddr::new(vip(&daemon, "payments"), 1800);
    try_connect(&front, pay_vip);
    let v = why(
        &daemon,
        &["frontend", "payments:1800", "--dst-netns", &pay.name],
    );
    assert_cause(&v, "app_not_listening", &["8080"]);

    // The app listens only on an address the sidecar cannot reach.
    let ledger_vip = SocketAddr::new(vip(&daemon, "ledger"), 1900);
    try_connect(&front, ledger_vip);
    let v = why(
        &daemon,
        &["frontend", "ledger:1900", "--dst-netns", &ledger.name],
    );
    assert_cause(&v, "app_not_listening", &["127.0.0.2"]);

    // PostgreSQL behind a service declared http (the found cause wins over the startup race).
    let url = format!("http://{}/", SocketAddr::new(vip(&daemon, "pg"), 5432));
    let r = front
        .enter(move || Client::new().get(&url))
        .join()
        .unwrap()
        .unwrap();
    assert_eq!(r.header("x-ringside-reason"), "protocol_mismatch", "{r:?}");
    let v = why(
        &daemon,
        &[
            "frontend",
            "pg:5432",
            "--src-netns",
            &front.name,
            "--dst-netns",
            &pgpod.name,
        ],
    );
    assert_cause(
        &v,
        "protocol_mismatch",
        &["declared HTTP", "does not speak HTTP"],
    );
    let fix = v["fix"].as_str().unwrap();
    assert!(
        fix.contains("ServiceDefaults for pg") && fix.contains("protocol: tcp"),
        "{fix}"
    );

    // The destination's sidecar is down while its redirect rules are in place.
    web_sc.take().unwrap().stop();
    let v = why(&daemon, &["frontend", "web:80", "--dst-netns", &web.name]);
    assert_cause(
        &v,
        "proxy_not_running",
        &["web's sidecar is not running", "15006"],
    );
    web_sc = Some(start_sidecar(&web, "web"));

    // The source's sidecar is down while its redirect rules are in place.
    front_sc.take().unwrap().stop();
    let v = why(&daemon, &["frontend", "web:80", "--src-netns", &front.name]);
    assert_cause(
        &v,
        "proxy_not_running",
        &["frontend's sidecar is not running", "15001"],
    );
    front_sc = Some(start_sidecar(&front, "frontend"));
    let _ = &front_sc;

    // The sidecars lose the daemon (it is restarted with its proxy socket elsewhere: their
    // streams end and the path they use refuses them); a destination registered afterwards is
    // unknown to the source, and certificates expire.
    daemon.cut_proxies();
    let cut = Instant::now();
    // The source's sidecar says so itself, read inside its pod, as soon as it notices.
    let mut v = serde_json::Value::Null;
    wait_for("the sidecar to notice", Duration::from_secs(15), || {
        v = why(&daemon, &["frontend", "web:80", "--src-netns", &front.name]);
        v["reason"] == "ctl_unreachable"
    });
    assert_cause(
        &v,
        "ctl_unreachable",
        &[
            "cannot reach the control daemon",
            "its admin port",
            "last good configuration",
        ],
    );
    daemon.ok(&["register", "service", "late", "--port", "7000:7000"]);
    daemon.ok(&[
        "register",
        "endpoint",
        "late",
        &web.ip4.to_string(),
        "--node",
        "web",
    ]);
    // From the daemon's records alone (no pod given): the source's sidecar has not applied the
    // configuration that added late, which is recent.
    let v = why(&daemon, &["frontend", "late:7000"]);
    assert_cause(
        &v,
        "ctl_unreachable",
        &["frontend's sidecar has not applied the configuration that added late yet"],
    );
    let registered = Instant::now();
    std::thread::sleep(Duration::from_secs(21).saturating_sub(cut.elapsed()));
    // More than 12 s (what a live sidecar may take to apply it) after late was registered,
    // still from the records alone: it went silent before late was registered.
    std::thread::sleep(Duration::from_secs(14).saturating_sub(registered.elapsed()));
    let v = why(&daemon, &["frontend", "late:7000"]);
    assert_cause(
        &v,
        "ctl_unreachable",
        &[
            "frontend's sidecar cannot reach the control daemon (silent for",
            "late was registered after it lost contact",
        ],
    );
    let v = why(
        &daemon,
        &["frontend", "late:7000", "--src-netns", &front.name],
    );
    assert_cause(
        &v,
        "ctl_unreachable",
        &[
            "cannot reach the control daemon",
            "its admin port",
            "registered after",
        ],
    );
    let v = why(&daemon, &["frontend", "web:80"]);
    assert_cause(&v, "tls_cert_expired", &["web's certificate expired"]);
    daemon.kill9();
    drop(web_sc);
}

/// `ringctl doctor --netns NS -o json`; its exit status says whether a check failed (1) or
/// every one passed (0).
fn doctor(d: &Daemon, ns: &str) -> Vec<serde_json::Value> {
    let (code, out, err) = d.ringctl_status(&["doctor", "--netns", ns, "-o", "json"]);
    let items = serde_json::from_str::<serde_json::Value>(&out)
        .unwrap_or_else(|e| panic!("{e}: {out}{err}"))
        .as_array()
        .cloned()
        .unwrap();
    let failed = items.iter().any(|i| i["ok"] != true);
    assert_eq!(
        code,
        Some(if failed { 1 } else { 0 }),
        "exit status of ringctl doctor --netns {ns}: {out}{err}"
    );
    items
}

fn item<'a>(items: &'a [serde_json::Value], check: &str) -> &'a serde_json::Value {
    items
        .iter()
        .find(|i| i["check"].as_str().unwrap().contains(check))
        .unwrap_or_else(|| panic!("no check '{check}' in {items:#?}"))
}

#[test]
fn doctor_checks_the_mesh_and_a_pod() {
    if !pods_available("doctor_checks_the_mesh_and_a_pod") {
        return;
    }
    let mut net = Net::new();
    let api = net.pod("api");
    let bare = net.pod("bare");
    let range = format!("{}/29", net.virtual_ip(0));
    let daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "api", "--port", "8080:8080"]);
    api.install_redirect(&[]);
    bare.install_redirect(&[]);
    // localhost resolves to ::1 first in the api pod, whose app listens on 127.0.0.1 only.
    let hosts = format!("/etc/netns/{}/hosts", api.name);
    std::fs::create_dir_all(format!("/etc/netns/{}", api.name)).unwrap();
    std::fs::write(&hosts, "::1 localhost\n127.0.0.1 localhost\n").unwrap();
    let _app = api.echo_app("127.0.0.1:8080".parse().unwrap());
    let args = daemon.sidecar_args("api", IpAddr::V4(api.ip4), PROXY_UID);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _sc = Sidecar::start_with(&api, "sidecar: {}\n", &args);
    std::thread::sleep(Duration::from_millis(300));

    let items = doctor(&daemon, &api.name);
    for ok in [
        "control daemon reachable",
        "redirect rules in pod",
        "outbound listener on 15001",
        "inbound listener on 15006",
        "sidecar ready",
        "api: the app listens on targetPort 8080",
        "clock agrees",
        "certificate valid and not close to expiry",
    ] {
        assert_eq!(item(&items, ok)["ok"], true, "{:#?}", item(&items, ok));
    }
    let trap = item(&items, "localhost resolves");
    assert_eq!(trap["ok"], false, "{trap:#?}");
    assert!(
        trap["found"].as_str().unwrap().contains("8080"),
        "{trap:#?}"
    );
    assert!(trap["fix"].as_str().unwrap().contains("::1"));

    // localhost resolves to 127.0.0.1 only (with both, getaddrinfo prefers ::1 in the pod):
    // every check passes (exit 0, `doctor` asserts).
    std::fs::write(&hosts, "127.0.0.1 localhost\n").unwrap();
    let items = doctor(&daemon, &api.name);
    assert!(items.len() >= 9, "{items:#?}");
    assert!(items.iter().all(|i| i["ok"] == true), "{items:#?}");

    // A pod with the rules but no sidecar.
    let items = doctor(&daemon, &bare.name);
    for fail in [
        "outbound listener on 15001",
        "inbound listener on 15006",
        "sidecar ready",
    ] {
        let i = item(&items, fail);
        assert_eq!(i["ok"], false, "{i:#?}");
        assert!(i["fix"].as_str().is_some());
    }
    let _ = std::fs::remove_file(hosts);
}
