//! Proxy tokens and the daemon's files, attacked with real daemons:
//!
//! - a token speaks for its own service only: a token of one service cannot report as another,
//!   overwrite another service's proxy record (the certificate generation `ringctl ca rotate`
//!   waits on), get a certificate for another service, or register another service's endpoint;
//! - tokens are listed (never the secret), revoked, and expire; a revoked or expired token is
//!   refused on its next request, also while the store cannot be reached (the daemon's cache of
//!   tokens does not serve them);
//! - the sockets have their modes from the moment their paths exist;
//! - a daemon killed while it writes its CA's files restarts with a matching key and certificate.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::etcd::Etcd;
use ringside_tests::{wait_for, workspace_bin, ChildGuard};
use serde_json::{json, Value};

/// One request; returns (status, body as JSON, or the text when it is not JSON).
fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    token: Option<&str>,
) -> (u16, Value) {
    let (status, body) = ringside_core::control::http_call(
        socket,
        method,
        path,
        body,
        token,
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{method} {path}: {e:#}"));
    let v = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, v)
}

/// A new token and its id (the CLI's stdout holds the token alone; stderr says what it is).
fn token_and_id(d: &Daemon, args: &[&str]) -> (String, String) {
    let (ok, out, err) = d.ringctl(&[&["token", "create"], args].concat());
    assert!(ok, "{err}");
    let t = out.trim().to_string();
    assert!(
        t.len() == 64 && t.chars().all(|c| c.is_ascii_hexdigit()),
        "not a token: {out}"
    );
    let id = err
        .strip_prefix("token ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no id in: {err}"))
        .to_string();
    (t, id)
}

fn token(d: &Daemon, args: &[&str]) -> String {
    token_and_id(d, args).0
}

fn report(id: &str, service: &str, address: Option<&str>, generation: u64) -> String {
    json!({
        "id": id,
        "service": service,
        "address": address,
        "applied_index": 1,
        "cert_generation": generation,
        "cert_not_after": 4_000_000_000i64,
    })
    .to_string()
}

/// A CSR asking for `uri` (or for no identity).
fn csr(uri: Option<&str>) -> String {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    if let Some(u) = uri {
        params.subject_alt_names = vec![rcgen::SanType::URI(u.try_into().unwrap())];
    }
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn proxies(d: &Daemon) -> Vec<Value> {
    d.get_json("proxies").as_array().unwrap().clone()
}

fn error_of(v: &Value) -> String {
    v["error"].as_str().unwrap_or_default().to_string()
}

#[test]
fn a_token_speaks_for_its_own_service_only() {
    let d = Daemon::start(
        &format!("ringside-tokens-own-{}", std::process::id()),
        &["--vip-range", "240.9.0.0/24"],
    );
    d.ok(&["register", "service", "web", "--port", "80:8080"]);
    d.ok(&["register", "service", "api", "--port", "80:8080"]);
    let web = token(&d, &["--service", "web"]);
    let api = token(&d, &["--service", "api"]);
    let ps = &d.proxy_socket;
    // web's proxy reports, with its certificate generation and its endpoint.
    let (st, v) = call(
        ps,
        "POST",
        "/v1/proxy/report",
        Some(report("web-1", "web", Some("198.18.0.5"), 5)),
        Some(&web),
    );
    assert_eq!(st, 200, "{v}");

    // Attack: api's token reports under web's proxy id, with a generation that would tell
    // `ca rotate` that web's proxy re-issued its certificate.
    for body in [
        report("web-1", "", Some("198.18.0.9"), 99),
        report("web-1", "api", None, 99),
    ] {
        let (st, v) = call(ps, "POST", "/v1/proxy/report", Some(body), Some(&api));
        assert_eq!(st, 403, "{v}");
        let e = error_of(&v);
        assert!(e.contains("belongs to a proxy of service 'web'"), "{e}");
    }
    // Attack: api's token reports as web (a new proxy id, web's service named, an address):
    // that would register an endpoint of web.
    let (st, v) = call(
        ps,
        "POST",
        "/v1/proxy/report",
        Some(report("evil-1", "web", Some("198.18.0.66"), 99)),
        Some(&api),
    );
    assert_eq!(st, 403, "{v}");
    assert!(
        error_of(&v).contains("the token is for service 'api'"),
        "{v}"
    );
    // Attack: endpoints by hand are not on the proxy socket at all.
    let ep = json!({"service": "web", "address": "198.18.0.67", "node": "n", "healthy": true});
    let (st, v) = call(
        ps,
        "POST",
        "/v1/endpoints",
        Some(ep.to_string()),
        Some(&api),
    );
    assert_eq!(st, 404, "{v}");
    // web's record and endpoints are untouched.
    let p = proxies(&d);
    assert_eq!(p.len(), 1, "{p:?}");
    assert_eq!(p[0]["id"], "web-1");
    assert_eq!(p[0]["service"], "web");
    assert_eq!(p[0]["cert_generation"], 5);
    let eps: Vec<String> = d
        .get_json("endpoints")
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["service"].as_str().unwrap(),
                e["address"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(eps, ["web/198.18.0.5"]);

    // Attack: a certificate for web with api's token, on the proxy socket and the operator's.
    let (_, cfg) = call(ps, "GET", "/v1/proxy/config", None, Some(&api));
    let td = cfg["trust_domain"].as_str().unwrap().to_string();
    let web_id = format!("spiffe://{td}/ns/default/sa/web");
    for (socket, path) in [(ps, "/v1/proxy/sign"), (&d.socket, "/v1/sign")] {
        let (st, v) = call(socket, "POST", path, Some(csr(Some(&web_id))), Some(&api));
        assert_eq!(st, 403, "{path}: {v}");
        let e = error_of(&v);
        assert!(e.contains(&web_id) && e.contains("'api'"), "{e}");
    }
    // What api's token may do: report for api, and get api's certificate (naming its identity,
    // or none).
    let (st, v) = call(
        ps,
        "POST",
        "/v1/proxy/report",
        Some(report("api-1", "api", Some("198.18.0.6"), 1)),
        Some(&api),
    );
    assert_eq!(st, 200, "{v}");
    let api_id = format!("spiffe://{td}/ns/default/sa/api");
    for c in [csr(Some(&api_id)), csr(None)] {
        let (st, v) = call(ps, "POST", "/v1/proxy/sign", Some(c), Some(&api));
        assert_eq!(st, 200, "{v}");
        assert_eq!(v["service"], "api");
    }
    // A proxy that has not had its configuration yet reports with no service: its token's.
    let (st, v) = call(
        ps,
        "POST",
        "/v1/proxy/report",
        Some(report("api-2", "", None, 0)),
        Some(&api),
    );
    assert_eq!(st, 200, "{v}");
    assert!(proxies(&d)
        .iter()
        .any(|p| p["id"] == "api-2" && p["service"] == "api"));
}

#[test]
fn tokens_are_listed_revoked_and_expire() {
    let d = Daemon::start(&format!("ringside-tokens-life-{}", std::process::id()), &[]);
    let forever = token(&d, &["--service", "web"]);
    let brief = token(&d, &["--service", "api", "--ttl", "3s"]);
    let created = Instant::now();
    let list = d.ok(&["token", "list"]);
    assert!(list.starts_with("ID"), "{list}");
    assert!(
        !list.contains(&forever) && !list.contains(&brief),
        "the list shows a token: {list}"
    );
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    let row_of = |service: &str| {
        rows.iter()
            .find(|r| r.split_whitespace().nth(1) == Some(service))
            .unwrap_or_else(|| panic!("no {service} token in {list}"))
            .to_string()
    };
    assert!(row_of("web").ends_with("never"), "{list}");
    assert!(row_of("api").contains('T'), "an expiry time: {list}");
    let web_id = row_of("web").split_whitespace().next().unwrap().to_string();
    assert_eq!(web_id.len(), 16);
    let ps = &d.proxy_socket;
    let config = |t: &str| call(ps, "GET", "/v1/proxy/config", None, Some(t));
    assert_eq!(config(&forever).0, 200);
    assert_eq!(config(&brief).0, 200);

    // Revoked (by a prefix of its id): refused on the next request.
    let out = d.ok(&["token", "revoke", &web_id[..8]]);
    assert!(out.contains(&web_id) && out.contains("web"), "{out}");
    let (st, v) = config(&forever);
    assert_eq!(st, 403, "{v}");
    assert!(error_of(&v).contains("revoked"), "{v}");
    let (ok, _, err) = d.ringctl(&["token", "revoke", &web_id]);
    assert!(!ok && err.contains("no token"), "{err}");
    let (ok, _, err) = d.ringctl(&["token", "revoke", "zz"]);
    assert!(!ok && err.contains("not a token id"), "{err}");

    // Expired: refused, and listed as such.
    std::thread::sleep(Duration::from_secs(4).saturating_sub(created.elapsed()));
    let (st, v) = config(&brief);
    assert_eq!(st, 403, "{v}");
    assert!(error_of(&v).contains("expired"), "{v}");
    let list = d.ok(&["token", "list"]);
    assert!(list.contains("(expired)"), "{list}");
    assert!(!list.contains("web"), "the revoked token is gone: {list}");

    // Bad input names the field.
    let (ok, _, err) = d.ringctl(&["token", "create", "--service", "web", "--ttl", "0s"]);
    assert!(!ok && err.contains("ttl"), "{err}");
    let (ok, _, err) = d.ringctl(&["token", "create", "--service", "web", "--ttl", "5parsecs"]);
    assert!(!ok && err.contains("--ttl"), "{err}");
}

/// With etcd: a token revoked through one daemon is refused by the other; the cache of tokens a
/// daemon keeps for while etcd is unreachable serves neither a revoked token nor an expired one
/// (and does serve a valid one, so the test can fail).
#[test]
fn revoked_and_expired_tokens_are_not_served_from_the_cache() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let secret = etcd.ca_secret();
    let args = ["--store", &url, "--ca-secret", secret.to_str().unwrap()];
    let pid = std::process::id();
    let one = Daemon::start(&format!("ringside-tokens-etcd1-{pid}"), &args);
    let two = Daemon::start(&format!("ringside-tokens-etcd2-{pid}"), &args);
    let kept = token(&one, &["--service", "web"]);
    let (revoked, revoked_id) = token_and_id(&one, &["--service", "web"]);
    let (other, other_id) = token_and_id(&one, &["--service", "web"]);
    let brief = token(&one, &["--service", "web", "--ttl", "4s"]);
    let created = Instant::now();
    let config =
        |d: &Daemon, t: &str| call(&d.proxy_socket, "GET", "/v1/proxy/config", None, Some(t)).0;
    // All seen valid by daemon one (so cached there), and by two.
    for t in [&kept, &revoked, &other, &brief] {
        assert_eq!(config(&one, t), 200);
        assert_eq!(config(&two, t), 200);
    }
    // Revoked through daemon one, and through daemon two.
    one.ok(&["token", "revoke", &revoked_id]);
    two.ok(&["token", "revoke", &other_id]);
    assert_eq!(config(&two, &revoked), 403);
    assert_eq!(config(&one, &other), 403, "seen through the store, evicted");
    // etcd hangs: daemon one serves from its cache.
    etcd.pause();
    // SIGSTOP takes a moment to stop every thread of the member.
    std::thread::sleep(Duration::from_millis(200));
    let t0 = Instant::now();
    assert_eq!(
        config(&one, &kept),
        200,
        "a valid token is served from the cache while etcd is unreachable"
    );
    // Served from the cache because etcd could not be reached: either this request asked it
    // first and waited, or the daemon already knew it down (its lease keeper may find out
    // first, and an answer etcd sent just before it froze may mark it reachable again for a
    // moment: the daemon's log says it was marked down).
    let (_, store) = call(&one.socket, "GET", "/v1/store", None, None);
    assert!(
        t0.elapsed() >= Duration::from_secs(1)
            || store["reachable"] == false
            || one
                .log()
                .contains("refusing writes, serving proxies the last good state"),
        "etcd was asked first, or known unreachable: {store}\n{}",
        one.log()
    );
    for t in [&revoked, &other] {
        let st = config(&one, t);
        assert!(st == 403 || st == 503, "a revoked token was served: {st}");
    }
    std::thread::sleep(Duration::from_secs(5).saturating_sub(created.elapsed()));
    let (st, v) = call(
        &one.proxy_socket,
        "GET",
        "/v1/proxy/config",
        None,
        Some(&brief),
    );
    assert_eq!(st, 403, "an expired token was served from the cache: {v}");
    assert!(error_of(&v).contains("expired"), "{v}");
    etcd.resume();
}

/// The socket files never exist with a wider mode than their own: watched from before the
/// daemon starts, each path's mode is checked the moment it appears.
#[test]
fn sockets_have_their_modes_from_the_start() {
    for round in 0..5 {
        let dir = std::env::temp_dir().join(format!(
            "ringside-tokens-sock-{}-{round}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (sock, proxy_sock) = (dir.join("ctl.sock"), dir.join("proxy.sock"));
        let mut cmd = Command::new(workspace_bin("ringctl"));
        cmd.arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--socket")
            .arg(&sock)
            .arg("--proxy-socket")
            .arg(&proxy_sock)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // With umask 0 a socket is bound with mode 0777: any moment it were visible with that
        // mode, every local user could connect to the operator socket.
        // SAFETY: umask is async-signal-safe and touches only the child's own state.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::umask(0);
                Ok(())
            });
        }
        let mut daemon = ChildGuard::spawn(&mut cmd);
        let mut seen = [None, None];
        let t0 = Instant::now();
        while seen.iter().any(Option::is_none) {
            for (i, p) in [&sock, &proxy_sock].into_iter().enumerate() {
                if seen[i].is_none() {
                    if let Ok(m) = std::fs::symlink_metadata(p) {
                        assert!(m.file_type().is_socket(), "{}", p.display());
                        seen[i] = Some(m.permissions().mode() & 0o777);
                    }
                }
            }
            assert!(t0.elapsed() < Duration::from_secs(10), "no sockets");
        }
        assert_eq!(seen, [Some(0o660), Some(0o666)], "round {round}");
        wait_for("the daemon", Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        // Nothing else was left beside them (the private bind directories are gone).
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["ctl.sock", "data", "proxy.sock"]);
        // A second daemon on the same sockets is refused, and the first keeps them.
        let out = Command::new(workspace_bin("ringctl"))
            .arg("daemon")
            .arg("--data-dir")
            .arg(dir.join("data2"))
            .arg("--socket")
            .arg(&sock)
            .arg("--proxy-socket")
            .arg(dir.join("proxy2.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("another ringctl daemon"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(std::os::unix::net::UnixStream::connect(&sock).is_ok());
        daemon.signal(libc::SIGTERM);
        daemon.wait_timeout(Duration::from_secs(10));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// Whether `leaf` (PEM) chains to a root of `bundle` (PEM): the daemon's signing key is its
/// certificate's.
fn chains_to(leaf: &str, bundle: &str) -> Result<(), String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, UnixTime};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle.as_bytes()) {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let leaf = CertificateDer::from_pem_slice(leaf.as_bytes()).map_err(|e| e.to_string())?;
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
        .build()
        .map_err(|e| e.to_string())?
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// The daemon signs a leaf that chains to the bundle it serves.
fn signs_with_a_matching_pair(d: &Daemon, what: &str) {
    let t = token(d, &["--service", "web"]);
    let (st, v) = call(
        &d.proxy_socket,
        "POST",
        "/v1/proxy/sign",
        Some(csr(None)),
        Some(&t),
    );
    assert_eq!(st, 200, "{what}: {v}\n{}", d.log());
    let (_, ca) = call(&d.socket, "GET", "/v1/ca", None, None);
    let leaf = v["cert"].as_str().unwrap();
    chains_to(leaf, ca["bundle"].as_str().unwrap())
        .unwrap_or_else(|e| panic!("{what}: the leaf does not chain to the bundle: {e}"));
}

/// `ringctl daemon` on `d`'s directory with `RINGSIDE_FAILPOINT=point`; `during` runs once its
/// sockets accept (or at once, for a crash at start). Returns when it has aborted.
fn crash_at(d: &Daemon, point: &str, during: impl FnOnce()) {
    let log = d.dir.join(format!("crash-{point}.log"));
    let mut child = ChildGuard::spawn(
        Command::new(workspace_bin("ringctl"))
            .env("RINGSIDE_FAILPOINT", point)
            .arg("daemon")
            .arg("--data-dir")
            .arg(d.dir.join("data"))
            .arg("--socket")
            .arg(&d.socket)
            .arg("--proxy-socket")
            .arg(&d.proxy_socket)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    during();
    let st = child.wait_timeout(Duration::from_secs(30));
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!st.success(), "{point}: the daemon did not crash: {text}");
    assert!(
        text.contains(&format!("failpoint {point} reached")),
        "{point}: {text}"
    );
}

/// A daemon killed between writing its CA's key and its certificate (the first root, or a new
/// one during a rollover), or before switching the rollover's state, restarts and signs with a
/// key that matches the certificate it serves; the rollover then completes.
#[test]
fn a_daemon_killed_while_writing_its_ca_restarts_with_a_matching_pair() {
    let mut d = Daemon::start(&format!("ringside-tokens-ca-{}", std::process::id()), &[]);
    let ca_dir = d.dir.join("data").join("ca");
    d.kill9();
    std::fs::remove_dir_all(&ca_dir).unwrap();
    // The first root: killed after its key is in place, before its certificate.
    crash_at(&d, "ca-after-key", || {});
    assert!(ca_dir.join("ca.key").exists() && !ca_dir.join("ca.pem").exists());
    d.restart();
    signs_with_a_matching_pair(&d, "after a crash while creating the root");
    assert!(ca_dir.join("ca.pem").exists());
    let root = std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
    // A rollover's new root: killed between its key and its certificate, then after both but
    // before the state names it.
    for point in ["ca-after-key", "ca-before-state"] {
        d.kill9();
        crash_at(&d, point, || {
            wait_for("the daemon", Duration::from_secs(10), || {
                std::os::unix::net::UnixStream::connect(&d.socket).is_ok()
            });
            let (ok, _, _) = d.ringctl(&["ca", "rotate", "--timeout", "5s"]);
            assert!(!ok, "{point}: the rotation went through a crash");
        });
        d.restart();
        let (_, ca) = call(&d.socket, "GET", "/v1/ca", None, None);
        assert_eq!(ca["phase"], "idle", "{point}: {ca}");
        assert_eq!(
            ca["bundle"].as_str().unwrap(),
            root,
            "{point}: the old root alone"
        );
        signs_with_a_matching_pair(&d, point);
    }
    // The rollover then runs to its end.
    d.ok(&["ca", "rotate", "--timeout", "5s"]);
    let (_, ca) = call(&d.socket, "GET", "/v1/ca", None, None);
    assert_eq!(ca["phase"], "idle", "{ca}");
    assert_ne!(ca["bundle"].as_str().unwrap(), root, "a new root signs");
    signs_with_a_matching_pair(&d, "after the rollover");
}
