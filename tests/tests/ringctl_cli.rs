//! `ringctl` on files: Consul-style documents checked whole, intention checks, config validation.

use std::process::Command;

use ringside_tests::*;

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
    - name: '*'
      action: deny
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: payments
spec:
  protocol: tcp
";

fn ringctl(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(workspace_bin("ringctl"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn apply_dry_run_and_intention_check() {
    let dir = std::env::temp_dir().join(format!("ringctl-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, DOCS).unwrap();
    let g = good.to_str().unwrap();

    let (ok, out, _) = ringctl(&["apply", "--dry-run", "-f", g]);
    assert!(ok);
    assert!(
        out.contains("ServiceIntentions/products-api (valid)") && out.contains("2 documents"),
        "{out}"
    );

    let (ok, out, _) = ringctl(&["intention", "check", "public-api", "products-api", "-f", g]);
    assert!(ok);
    assert_eq!(
        out.trim(),
        "allow: intention public-api -> products-api: allow"
    );
    let (_, out, _) = ringctl(&["intention", "check", "frontend", "products-api", "-f", g]);
    assert_eq!(out.trim(), "deny: intention * -> products-api: deny");
    let (_, out, _) = ringctl(&["intention", "check", "frontend", "payments", "-f", g]);
    assert!(out.starts_with("deny: default deny"), "{out}");

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        DOCS.replace("protocol: tcp", "protocol: carrier-pigeon"),
    )
    .unwrap();
    let (ok, _, err) = ringctl(&["apply", "--dry-run", "-f", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("document 2 (ServiceDefaults/payments), line 19, field `spec.protocol`"),
        "{err}"
    );
    assert!(err.contains("nothing applied"), "{err}");

    // Sidecar config validation.
    let conf = dir.join("ringside.yaml");
    std::fs::write(
        &conf,
        "sidecar: {}\nservices:\n  - name: x\n    port: 80\n    local: true\n",
    )
    .unwrap();
    let (ok, out, _) = ringctl(&["validate", conf.to_str().unwrap()]);
    assert!(ok, "{out}");
    std::fs::write(
        &conf,
        "sidecar: {}\nservices:\n  - name: x\n    local: true\n",
    )
    .unwrap();
    let (ok, _, err) = ringctl(&["validate", conf.to_str().unwrap()]);
    assert!(!ok);
    assert!(err.contains("services[0].port"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The CA on files: init once (key 0600), a proxy-style key + CSR, a leaf signed for the service
/// named on the command line, which `ringside cert inspect` reads back.
#[test]
fn ca_init_request_sign() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("ringctl-ca-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let (ok, root, err) = ringctl(&["ca", "init", "--dir", d, "--trust-domain", "dc9"]);
    assert!(ok, "{err}");
    assert!(root.contains("BEGIN CERTIFICATE"));
    assert_eq!(
        std::fs::metadata(dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let (key, csr) = (dir.join("p.key"), dir.join("p.csr"));
    let (ok, _, err) = ringctl(&[
        "ca",
        "request",
        "--key-out",
        key.to_str().unwrap(),
        "--csr-out",
        csr.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let (ok, leaf, err) = ringctl(&[
        "ca",
        "sign",
        "--dir",
        d,
        "--trust-domain",
        "dc9",
        "--csr",
        csr.to_str().unwrap(),
        "--service",
        "payments",
        "--lifetime",
        "72h",
    ]);
    assert!(ok, "{err}");
    let leaf_path = dir.join("leaf.pem");
    std::fs::write(&leaf_path, leaf).unwrap();
    let out = Command::new(workspace_bin("ringside"))
        .args(["cert", "inspect", leaf_path.to_str().unwrap()])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("spiffe://dc9/ns/default/sa/payments"),
        "{text}"
    );
    assert!(text.contains("ringside CA dc9"), "{text}");
    assert!(text.contains("valid, expires in"), "{text}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The daemon: apply over its socket (whole file or nothing), list, check intentions, delete; a
/// SIGKILL loses nothing it acknowledged.
#[test]
fn daemon_apply_get_check_survives_sigkill() {
    let dir = std::env::temp_dir().join(format!("ringctl-daemon-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = dir.join("data");
    let sock = dir.join("ctl.sock");
    let s = sock.to_str().unwrap().to_string();
    let start = || {
        let d = ChildGuard::spawn(
            Command::new(workspace_bin("ringctl"))
                .args([
                    "daemon",
                    "--data-dir",
                    data.to_str().unwrap(),
                    "--socket",
                    &s,
                ])
                .stderr(std::process::Stdio::null()),
        );
        wait_for("daemon socket", std::time::Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock).is_ok()
        });
        d
    };
    let mut daemon = start();
    let file = dir.join("docs.yaml");
    std::fs::write(&file, DOCS).unwrap();
    let f = file.to_str().unwrap();
    let (ok, out, err) = ringctl(&["apply", "-f", f, "--socket", &s]);
    assert!(ok, "{err}");
    assert!(
        out.contains("ServiceIntentions/products-api applied") && out.contains("config index 1"),
        "{out}"
    );

    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        DOCS.replace("name: payments", "name: billing")
            .replace("action: deny", "action: nope"),
    )
    .unwrap();
    let (ok, _, err) = ringctl(&["apply", "-f", bad.to_str().unwrap(), "--socket", &s]);
    assert!(!ok);
    assert!(
        err.contains("document 1") && err.contains("nothing applied"),
        "{err}"
    );

    let (_, out, _) = ringctl(&["get", "config", "--socket", &s]);
    assert!(
        out.contains("ServiceDefaults") && out.contains("payments"),
        "{out}"
    );
    assert!(
        !out.contains("billing"),
        "a refused file stored nothing: {out}"
    );
    let (_, out, _) = ringctl(&[
        "intention",
        "check",
        "public-api",
        "products-api",
        "--socket",
        &s,
    ]);
    assert_eq!(
        out.trim(),
        "allow: intention public-api -> products-api: allow"
    );

    // SIGKILL, restart: what was acknowledged is still there.
    daemon.signal(libc::SIGKILL);
    daemon.wait_timeout(std::time::Duration::from_secs(5));
    let mut daemon = start();
    let (_, out, _) = ringctl(&["get", "config", "-o", "json", "--socket", &s]);
    assert!(
        out.contains("\"products-api\"") && out.contains("\"payments\""),
        "{out}"
    );
    let (ok, _, _) = ringctl(&["delete", "ServiceDefaults", "payments", "--socket", &s]);
    assert!(ok);
    let (_, out, _) = ringctl(&["get", "config", "--socket", &s]);
    assert!(!out.contains("payments"), "{out}");
    let (ok, _, err) = ringctl(&["delete", "ServiceDefaults", "payments", "--socket", &s]);
    assert!(!ok && err.contains("not stored"), "{err}");

    daemon.signal(libc::SIGTERM);
    assert!(daemon
        .wait_timeout(std::time::Duration::from_secs(5))
        .success());
    assert!(!sock.exists(), "the socket is removed on exit");
    let (ok, _, err) = ringctl(&["get", "config", "--socket", &s]);
    assert!(!ok && err.contains("is `ringctl daemon` running?"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Catalog and identity through the daemon: services get virtual IPs, endpoints need a service,
/// a token issues a certificate for its own service only, bad tokens are refused.
#[test]
fn daemon_catalog_tokens_and_issue() {
    let dir = std::env::temp_dir().join(format!("ringctl-catalog-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("ctl.sock");
    let s = sock.to_str().unwrap().to_string();
    let mut daemon = ChildGuard::spawn(
        Command::new(workspace_bin("ringctl"))
            .args([
                "daemon",
                "--data-dir",
                dir.join("data").to_str().unwrap(),
                "--socket",
                &s,
                "--trust-domain",
                "shop",
            ])
            .args(["--vip-range", "240.1.0.0/24"])
            .stderr(std::process::Stdio::null()),
    );
    wait_for("daemon socket", std::time::Duration::from_secs(10), || {
        std::os::unix::net::UnixStream::connect(&sock).is_ok()
    });
    let (ok, out, err) = ringctl(&[
        "register",
        "service",
        "payments",
        "--port",
        "1800:8080",
        "--socket",
        &s,
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("virtual IP 240.1.0.1"), "{out}");
    let (ok, _, err) = ringctl(&[
        "register",
        "endpoint",
        "payments",
        "198.18.0.7",
        "--node",
        "n1",
        "--socket",
        &s,
    ]);
    assert!(ok, "{err}");
    let (ok, _, err) = ringctl(&[
        "register",
        "endpoint",
        "ghost",
        "198.18.0.8",
        "--socket",
        &s,
    ]);
    assert!(!ok && err.contains("no service 'ghost'"), "{err}");
    let (_, out, _) = ringctl(&["get", "services", "--socket", &s]);
    assert!(
        out.contains("payments") && out.contains("240.1.0.1") && out.contains("1800->8080"),
        "{out}"
    );
    let (_, out, _) = ringctl(&["get", "endpoints", "--socket", &s]);
    assert!(out.contains("198.18.0.7") && out.contains("n1"), "{out}");

    let (ok, token, err) = ringctl(&["token", "create", "--service", "payments", "--socket", &s]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert_eq!(token.len(), 64);
    let (k, c, b) = (dir.join("w.key"), dir.join("w.crt"), dir.join("bundle.pem"));
    let issue = |t: &str| {
        ringctl(&[
            "issue",
            "--proxy-token",
            t,
            "--key-out",
            k.to_str().unwrap(),
            "--cert-out",
            c.to_str().unwrap(),
            "--bundle-out",
            b.to_str().unwrap(),
            "--socket",
            &s,
        ])
    };
    let (ok, _, err) = issue("not-a-token");
    assert!(!ok && err.contains("unknown token"), "{err}");
    let (ok, out, err) = issue(&token);
    assert!(ok, "{err}");
    assert!(out.contains("issued for payments"), "{out}");
    let info = ringside_core::tls::inspect_file(&c).unwrap();
    assert_eq!(
        info[0].uris,
        vec!["spiffe://shop/ns/default/sa/payments".to_string()]
    );
    let bundle = ringside_core::tls::inspect_file(&b).unwrap();
    assert!(bundle[0].is_ca);
    // The issued material works for mesh TLS as it is.
    let files = ringside_core::tls::TlsFiles {
        cert: c.clone(),
        key: k.clone(),
        ca: b.clone(),
    };
    assert!(ringside_core::tls::Material::load(&files).is_ok());
    daemon.signal(libc::SIGTERM);
    assert!(daemon
        .wait_timeout(std::time::Duration::from_secs(5))
        .success());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Scripts and CI read the exit status: `why` 1 when it names a cause, 0 when nothing is wrong,
/// 2 when it cannot answer; `intention check` 1 on deny, 2 on error; `doctor` 1 on a failed
/// check; `issue` fails when it cannot write its files.
#[test]
fn exit_codes_for_scripts() {
    let tag = format!("ringctl-exit-{}", std::process::id());
    let daemon = ringside_tests::ctl::Daemon::start(&tag, &[]);
    let code = |args: &[&str]| daemon.ringctl_status(args);

    // intention check against the daemon: default deny, then allowed by an intention.
    let (c, out, _) = code(&["intention", "check", "public-api", "products-api"]);
    assert_eq!(c, Some(1), "deny exits 1: {out}");
    assert!(out.starts_with("deny"), "{out}");
    daemon.apply(DOCS);
    let (c, out, _) = code(&["intention", "check", "public-api", "products-api"]);
    assert_eq!(c, Some(0), "{out}");
    let (c, out, _) = code(&["intention", "check", "frontend", "products-api"]);
    assert_eq!(
        (c, out.trim()),
        (Some(1), "deny: intention * -> products-api: deny")
    );

    // intention check on a file: the same codes; an unreadable file is an error, not a deny.
    let file = daemon.dir.join("docs.yaml");
    std::fs::write(&file, DOCS).unwrap();
    let f = file.to_str().unwrap();
    assert_eq!(
        code(&["intention", "check", "public-api", "products-api", "-f", f]).0,
        Some(0)
    );
    assert_eq!(
        code(&["intention", "check", "frontend", "products-api", "-f", f]).0,
        Some(1)
    );
    let (c, _, err) = code(&["intention", "check", "a", "b", "-f", "/nonexistent/x.yaml"]);
    assert_eq!(c, Some(2), "{err}");

    // why: a cause found exits 1 (with the cause printed); a bad argument exits 2.
    let (c, out, _) = code(&["why", "frontend", "ghost", "-o", "json"]);
    assert_eq!(c, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["reason"], "unknown_destination", "{out}");
    let (c, _, err) = code(&["why", "frontend", "ghost:http"]);
    assert_eq!(c, Some(2), "{err}");
    assert!(err.contains("is not a port"), "{err}");

    // doctor with no proxies and a healthy store passes; a daemon that is not there fails.
    let (c, out, err) = code(&["doctor"]);
    assert_eq!(c, Some(0), "{out}{err}");
    let missing = daemon.dir.join("nothing-here.sock");
    let out = Command::new(workspace_bin("ringctl"))
        .args(["doctor", "--socket", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let out = Command::new(workspace_bin("ringctl"))
        .args(["why", "a", "b", "--socket", missing.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "a daemon that is not there: {out:?}"
    );

    // issue: files that cannot be written fail the command (the certificate is not lost silently).
    let token = daemon.ok(&["token", "create", "--service", "payments"]);
    let (c, out, err) = code(&[
        "issue",
        "--proxy-token",
        token.trim(),
        "--key-out",
        "/nonexistent/dir/w.key",
        "--cert-out",
        "/nonexistent/dir/w.crt",
        "--bundle-out",
        "/nonexistent/dir/b.pem",
    ]);
    assert_ne!(c, Some(0), "{out}{err}");
    assert!(err.contains("cannot write"), "{err}");
}

/// Completion scripts and man pages come from the CLI's own definitions: every command is in
/// them, the bash script parses, and the pages are troff with a title line.
#[test]
fn completions_and_man_pages() {
    let (ok, bash, err) = ringctl(&["completion", "bash"]);
    assert!(ok, "{err}");
    for word in ["_ringctl()", "why", "doctor", "intention", "--src-netns"] {
        assert!(bash.contains(word), "the bash completion lacks {word}");
    }
    let dir = ringside_tests::certs::temp_dir("ringctl-man");
    let script = dir.join("ringctl.bash");
    std::fs::write(&script, &bash).unwrap();
    let check = Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "bash -n: {}",
        String::from_utf8_lossy(&check.stderr)
    );
    for shell in ["zsh", "fish"] {
        let (ok, out, err) = ringctl(&["completion", shell]);
        assert!(ok && out.contains("doctor"), "{shell}: {err}");
    }
    let (ok, _, err) = ringctl(&["completion", "tcsh"]);
    assert!(!ok && err.contains("tcsh"), "{err}");

    let man = dir.join("man1");
    let (ok, out, err) = ringctl(&["man", "--out", man.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    for page in [
        "ringctl.1",
        "ringctl-why.1",
        "ringctl-doctor.1",
        "ringctl-apply.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(text.contains(".TH"), "{page} is no man page:\n{text}");
    }
    let why = std::fs::read_to_string(man.join("ringctl-why.1")).unwrap();
    assert!(why.contains("src\\-netns"), "{why}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `ringctl` with `env` (and none of the caller's `RINGCTL_*` variables).
fn ringctl_env(args: &[&str], env: &[(&str, &str)]) -> (bool, i32, String, String) {
    let mut cmd = Command::new(workspace_bin("ringctl"));
    for (k, _) in std::env::vars() {
        if k.starts_with("RINGCTL_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.args(args).envs(env.iter().copied()).output().unwrap();
    (
        out.status.success(),
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn one_way_to_find_the_daemon_and_checked_output() {
    // Durations as humantime reads them, on the daemon's flags too.
    let d = ringside_tests::ctl::Daemon::start(
        &format!("ringctl-global-{}", std::process::id()),
        &["--lease-ttl", "1m30s", "--leaf-lifetime", "36h30m"],
    );
    let s = d.socket.to_str().unwrap();
    // --socket before the subcommand, after it, after a nested one, and from the environment.
    let (ok, _, out, err) = ringctl_env(
        &["--socket", s, "register", "service", "web", "--port", "80"],
        &[],
    );
    assert!(ok && out.contains("service web registered"), "{out}{err}");
    let (ok, _, out, err) = ringctl_env(
        &[
            "register", "service", "api", "--port", "81:8081", "--socket", s,
        ],
        &[],
    );
    assert!(ok && out.contains("service api registered"), "{out}{err}");
    let (ok, _, out, err) = ringctl_env(
        &["register", "endpoint", "web", "198.18.0.4", "--socket", s],
        &[],
    );
    assert!(ok, "{out}{err}");
    let (ok, _, out, err) = ringctl_env(&["ca", "show", "--socket", s], &[]);
    assert!(ok && out.contains("phase:   idle"), "{out}{err}");
    let env = [("RINGCTL_SOCKET", s)];
    let (ok, _, out, err) = ringctl_env(&["get", "services"], &env);
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0].split_whitespace().collect::<Vec<_>>(),
        ["NAME", "VIRTUAL", "IP", "PORTS"],
        "{out}"
    );
    assert!(out.contains("web") && out.contains("81->8081"), "{out}");
    // A flag beats the environment.
    let (ok, _, _, err) = ringctl_env(
        &["--socket", "/nonexistent/ctl.sock", "get", "services"],
        &env,
    );
    assert!(!ok && err.contains("/nonexistent/ctl.sock"), "{err}");
    // Every table has its header.
    for (what, header) in [
        ("config", "KIND"),
        ("services", "NAME"),
        ("endpoints", "SERVICE"),
        ("intentions", "SOURCE"),
        ("proxies", "ID"),
    ] {
        let (ok, _, out, err) = ringctl_env(&["get", what], &env);
        assert!(ok, "{what}: {err}");
        assert!(out.starts_with(header), "get {what}: {out}");
    }
    let (_, _, out, _) = ringctl_env(&["get", "endpoints", "-o", "wide"], &env);
    assert!(
        out.lines().next().unwrap().contains("HEALTH") && out.contains("healthy"),
        "{out}"
    );
    let (_, _, out, _) = ringctl_env(&["get", "proxies", "-o", "wide"], &env);
    assert!(
        out.starts_with("ID") && out.contains("NODE") && out.contains("ADDRESS"),
        "{out}"
    );
    // -o yaml is YAML of the same answer as -o json.
    let (ok, _, yaml, _) = ringctl_env(&["get", "services", "-o", "yaml"], &env);
    let (_, _, json, _) = ringctl_env(&["get", "services", "-o", "json"], &env);
    assert!(ok);
    let from_yaml: serde_json::Value = serde_yaml::from_str(&yaml).unwrap();
    let from_json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(from_yaml, from_json, "{yaml}");
    // Anything else is refused by name, with the choices; the exit status is clap's (2).
    let (ok, code, out, err) = ringctl_env(&["get", "services", "-o", "xml"], &env);
    assert!(!ok && code == 2 && out.is_empty(), "{out}");
    assert!(
        err.contains("invalid value 'xml' for '--output <OUTPUT>'")
            && err.contains("json, yaml, wide"),
        "{err}"
    );
    let (ok, _, _, err) = ringctl_env(&["describe", "web", "-o", "wide"], &env);
    assert!(
        !ok && err.contains("invalid value 'wide'") && err.contains("json, yaml"),
        "{err}"
    );
    let (ok, _, out, _) = ringctl_env(&["describe", "web", "-o", "yaml"], &env);
    assert!(ok && out.contains("virtual_ip:"), "{out}");
    let (ok, _, _, err) = ringctl_env(&["ca", "rotate", "--timeout", "90x"], &env);
    assert!(
        !ok && err.contains("'--timeout <TIMEOUT>'") && err.contains("not a duration"),
        "{err}"
    );
    // The client options are not the daemon's: refused rather than ignored.
    let (ok, _, _, err) = ringctl_env(
        &[
            "daemon",
            "--data-dir",
            "/nonexistent",
            "--server",
            "https://h:1",
        ],
        &[],
    );
    assert!(!ok && err.contains("--server is for clients"), "{err}");
    // The daemon's own flags were read with the same parser.
    assert!(d.log().contains("listening on"), "{}", d.log());
}

/// `get KIND [NAME]` for every kind (singular or plural, or a document kind), and `describe` for
/// services, intentions and proxies.
#[test]
fn get_and_describe_every_kind() {
    let tag = format!("ringctl-kinds-{}", std::process::id());
    let daemon = ringside_tests::ctl::Daemon::start(&tag, &[]);
    daemon.ok(&["register", "service", "products-api", "--port", "80:8080"]);
    daemon.ok(&["register", "service", "public-api"]);
    daemon.ok(&["register", "service", "frontend"]);
    daemon.ok(&[
        "register",
        "endpoint",
        "products-api",
        "198.18.0.9",
        "--node",
        "n1",
    ]);
    daemon.apply(DOCS);

    let out = daemon.ok(&["get", "service", "products-api"]);
    assert!(
        out.contains("products-api") && !out.contains("public-api"),
        "{out}"
    );
    let out = daemon.ok(&["get", "endpoints", "products-api"]);
    assert!(out.contains("198.18.0.9"), "{out}");
    let out = daemon.ok(&["get", "ServiceDefaults"]);
    assert!(
        out.contains("payments") && !out.contains("products-api"),
        "{out}"
    );
    let out = daemon.ok(&["get", "serviceintentions", "products-api", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 1, "{out}");
    let out = daemon.ok(&["get", "intentions", "products-api"]);
    assert!(out.contains("public-api") && out.contains("allow"), "{out}");
    let (ok, _, err) = daemon.ringctl(&["get", "service", "ghost"]);
    assert!(!ok && err.contains("no services named 'ghost'"), "{err}");
    let (ok, _, err) = daemon.ringctl(&["get", "gadgets"]);
    assert!(!ok && err.contains("'gadgets' is not known"), "{err}");

    // describe: a service (the old form and the kind form), the intentions of a destination with
    // what they decide for every registered caller, a proxy (none here: a clear error).
    let a = daemon.ok(&["describe", "products-api"]);
    assert_eq!(a, daemon.ok(&["describe", "service", "products-api"]));
    assert!(a.contains("198.18.0.9"), "{a}");
    let out = daemon.ok(&["describe", "intentions", "products-api"]);
    assert!(
        out.contains("ServiceIntentions/products-api")
            && out
                .lines()
                .any(|l| l.starts_with("public-api") && l.contains("allow"))
            && out
                .lines()
                .any(|l| l.starts_with("frontend") && l.contains("deny")),
        "{out}"
    );
    let out = daemon.ok(&["describe", "intentions", "products-api", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["sources"].as_array().unwrap().len(), 2, "{out}");
    // get proxies NAME: a proxy by its id or by its service, nothing else; none is an error.
    for (id, service, address) in [
        ("products-api-1", "products-api", "198.18.0.9"),
        ("frontend-1", "frontend", "198.18.0.10"),
    ] {
        let token = daemon
            .ok(&["token", "create", "--service", service])
            .trim()
            .to_string();
        let body = serde_json::json!({
            "id": id,
            "service": service,
            "address": address,
            "applied_index": 1,
            "cert_generation": 1,
            "cert_not_after": 4_000_000_000i64,
        });
        let (status, answer) = ringside_core::control::http_call(
            &daemon.proxy_socket,
            "POST",
            "/v1/proxy/report",
            Some(body.to_string()),
            Some(&token),
            std::time::Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&answer));
    }
    let all = daemon.ok(&["get", "proxies"]);
    assert!(
        all.contains("products-api-1") && all.contains("frontend-1"),
        "{all}"
    );
    for name in ["products-api", "products-api-1"] {
        let out = daemon.ok(&["get", "proxies", name]);
        assert!(
            out.contains("products-api-1") && !out.contains("frontend"),
            "get proxies {name}:\n{out}"
        );
        assert!(out.starts_with("ID"), "no header:\n{out}");
    }
    let out = daemon.ok(&["get", "proxy", "frontend-1", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 1, "{out}");
    assert_eq!(rows[0]["id"], "frontend-1", "{out}");
    assert_eq!(rows[0]["service"], "frontend", "{out}");
    let (ok, _, err) = daemon.ringctl(&["get", "proxies", "ghost"]);
    assert!(!ok && err.contains("no proxies named 'ghost'"), "{err}");
    let out = daemon.ok(&["describe", "proxy", "frontend-1"]);
    assert!(out.contains("service:     frontend"), "{out}");

    let (ok, _, err) = daemon.ringctl(&["describe", "proxy", "nope-1"]);
    assert!(!ok && err.contains("no proxy 'nope-1'"), "{err}");
    let (ok, _, err) = daemon.ringctl(&["describe", "gadget", "x"]);
    assert!(!ok && err.contains("not a kind"), "{err}");
}
