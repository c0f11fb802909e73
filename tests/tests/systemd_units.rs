//! deploy/systemd: `systemd-analyze verify` on the units (in a root of their own, with this
//! workspace's binaries in /usr/local/bin and an application unit ordered after a sidecar), the
//! sysusers file gives uid 1337, and the sidecar unit's commands run in a pod in systemd's order:
//! the rules installed by ExecStartPre, ExecStartPost returning only once the proxy is ready (what
//! holds units ordered after it), ExecStopPost removing the rules.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ringside_tests::ctl::Daemon;
use ringside_tests::pod::{pods_available, sh, Net, PROXY_UID};
use ringside_tests::{under_ci, workspace_bin, ChildGuard};

fn units_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd")
}

/// Whether a systemd tool is here; under CI it must be (scripts/deps.sh installs `systemd`).
fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            !under_ci(),
            "{test} needs {tool} under CI (scripts/deps.sh)"
        );
        eprintln!("SKIPPED: {test} needs {tool} (Debian's systemd package)");
    }
    ok
}

const APP_UNIT: &str = "\
[Unit]
Description=payments (the application)
Requires=ringside@payments.service
After=ringside@payments.service

[Service]
User=payments
ExecStart=/usr/local/bin/ringctl get services

[Install]
WantedBy=multi-user.target
";

/// A root with systemd's own units, ours in /etc/systemd/system and the binaries.
fn root_with(units: &[(&str, String)]) -> PathBuf {
    let root = std::env::temp_dir().join(format!(
        "ringside-units-{}-{}",
        std::process::id(),
        ringside_tests::free_port()
    ));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("usr/lib/systemd")).unwrap();
    std::fs::create_dir_all(root.join("etc/systemd/system")).unwrap();
    std::fs::create_dir_all(root.join("usr/local/bin")).unwrap();
    let system = ["/usr/lib/systemd/system", "/lib/systemd/system"]
        .into_iter()
        .find(|p| Path::new(p).is_dir())
        .expect("systemd's unit directory");
    sh(&[
        "cp",
        "-a",
        system,
        root.join("usr/lib/systemd/").to_str().unwrap(),
    ]);
    for bin in ["ringside", "ringside-init", "ringctl"] {
        let to = root.join("usr/local/bin").join(bin);
        if std::fs::hard_link(workspace_bin(bin), &to).is_err() {
            std::fs::copy(workspace_bin(bin), &to).unwrap();
        }
    }
    for (name, text) in units {
        std::fs::write(root.join("etc/systemd/system").join(name), text).unwrap();
    }
    root
}

fn verify(root: &Path, units: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(format!("--root={}", root.display()))
        .args(units)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn unit(name: &str) -> String {
    std::fs::read_to_string(units_dir().join(name)).unwrap()
}

#[test]
fn systemd_analyze_verifies_the_units() {
    if !have("systemd-analyze", "systemd_analyze_verifies_the_units") {
        return;
    }
    let units = [
        ("ringctl.service", unit("ringctl.service")),
        ("ringside@.service", unit("ringside@.service")),
        ("payments-app.service", APP_UNIT.to_string()),
    ];
    let root = root_with(&units);
    let (ok, out) = verify(
        &root,
        &[
            "ringctl.service",
            "ringside@payments.service",
            "payments-app.service",
        ],
    );
    // verify exits 0 on many mistakes (an unknown key, a bad value): any output is a failure.
    assert!(
        ok && out.trim().is_empty(),
        "systemd-analyze verify:\n{out}"
    );
    // The check bites: a misspelt setting and a missing binary are reported.
    let broken = unit("ringside@.service").replace("Type=exec", "Type=exce");
    std::fs::write(root.join("etc/systemd/system/ringside@.service"), broken).unwrap();
    let (_, out) = verify(&root, &["ringside@payments.service"]);
    assert!(out.contains("exce"), "a bad Type= went unnoticed: {out}");
    std::fs::write(
        root.join("etc/systemd/system/ringside@.service"),
        unit("ringside@.service"),
    )
    .unwrap();
    std::fs::remove_file(root.join("usr/local/bin/ringside-init")).unwrap();
    let (_, out) = verify(&root, &["ringside@payments.service"]);
    assert!(
        out.contains("ringside-init"),
        "a missing binary went unnoticed: {out}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn the_sysusers_file_makes_uid_1337() {
    if !have("systemd-sysusers", "the_sysusers_file_makes_uid_1337") {
        return;
    }
    let root = std::env::temp_dir().join(format!("ringside-sysusers-{}", std::process::id()));
    std::fs::create_dir_all(root.join("etc")).unwrap();
    let out = Command::new("systemd-sysusers")
        .arg(format!("--root={}", root.display()))
        .arg("--dry-run")
        .arg(units_dir().join("ringside.sysusers.conf"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("'ringside'") && text.contains(&format!("UID {PROXY_UID}")),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

/// The unit's `KEY=` lines, in order.
fn exec_lines<'a>(text: &'a str, key: &str) -> Vec<&'a str> {
    text.lines()
        .filter_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

#[test]
fn the_sidecar_units_commands_run_in_systemds_order_in_a_pod() {
    let test = "the_sidecar_units_commands_run_in_systemds_order_in_a_pod";
    if !pods_available(test) {
        return;
    }
    let text = unit("ringside@.service");
    assert_eq!(exec_lines(&text, "User"), ["ringside"]);
    let daemon = Daemon::start(&format!("units-{}", std::process::id()), &[]);
    daemon.ok(&["register", "service", "payments", "--port", "1800:8080"]);
    let token = daemon.token_file("payments", 0);
    let mut net = Net::new();
    let pod = net.pod("vm");
    // Another host on the network, to probe the health port from outside (as a load balancer or
    // a monitor would: from inside, the pod's own traffic is redirected to the proxy).
    let outside = net.pod("lb");
    let dir = |tag: &str| daemon.state_dir(tag, PROXY_UID);
    let (runtime, state, creds) = (dir("runtime"), dir("state"), dir("creds"));
    std::fs::copy(&token, creds.join("token")).unwrap();
    std::os::unix::fs::chown(creds.join("token"), Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    // What systemd substitutes: specifiers, the environment file's variables, and (here) the
    // directories standing for /run/ringside/..., /var/lib/ringside/... and /usr/local/bin.
    let env_file = [
        ("${RINGSIDE_ADDRESS}", pod.ip4.to_string()),
        (
            "$RINGSIDE_INIT_ARGS",
            "--exclude-inbound-ports 22".to_string(),
        ),
        ("$RINGSIDE_ARGS", "--workers 1".to_string()),
    ];
    let paths = [
        (
            "/run/ringside/proxy/proxy.sock".to_string(),
            daemon.proxy_socket.display().to_string(),
        ),
        (
            "/run/ringside/payments".to_string(),
            runtime.display().to_string(),
        ),
        (
            "/var/lib/ringside/payments".to_string(),
            state.display().to_string(),
        ),
    ];
    let expand = |line: &str| -> (bool, Vec<String>) {
        let (privileged, line) = match line.strip_prefix('+') {
            Some(l) => (true, l),
            None => (false, line),
        };
        let mut l = line
            .replace("%i", "payments")
            .replace("%H", "vm")
            .replace("%d", creds.to_str().unwrap());
        for (k, v) in &env_file {
            l = l.replace(k, v);
        }
        for (k, v) in &paths {
            l = l.replace(k.as_str(), v);
        }
        assert!(!l.contains('$') && !l.contains('%'), "unexpanded: {l}");
        let mut argv: Vec<String> = l.split_whitespace().map(str::to_string).collect();
        let bin = argv[0]
            .strip_prefix("/usr/local/bin/")
            .unwrap_or_else(|| panic!("{} is not in /usr/local/bin", argv[0]))
            .to_string();
        argv[0] = workspace_bin(&bin).display().to_string();
        (privileged, argv)
    };
    let run_in_pod = |line: &str| -> Command {
        let (privileged, argv) = expand(line);
        let mut c = if privileged {
            pod.cmd(&argv[0])
        } else {
            pod.cmd_as(PROXY_UID, PROXY_UID, &argv[0])
        };
        c.args(&argv[1..]);
        c
    };
    let show = || {
        sh(&[
            workspace_bin("ringside-init").to_str().unwrap(),
            "show",
            "--netns",
            &pod.name,
        ])
    };

    // ExecStartPre: the rules.
    let [pre] = exec_lines(&text, "ExecStartPre")[..] else {
        panic!("one ExecStartPre")
    };
    let out = run_in_pod(pre).output().unwrap();
    assert!(
        out.status.success(),
        "{pre}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rules = show();
    assert!(
        rules.contains("15001") && rules.contains("1337") && rules.contains("dport 22"),
        "{rules}"
    );

    // ExecStartPost holds the unit (and every unit ordered after it) until the proxy is ready.
    let [post] = exec_lines(&text, "ExecStartPost")[..] else {
        panic!("one ExecStartPost")
    };
    let mut waiting = ChildGuard::spawn(run_in_pod(post).stdout(Stdio::null()));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        waiting.0.try_wait().unwrap().is_none(),
        "ExecStartPost returned before the proxy was started"
    );
    let [start] = exec_lines(&text, "ExecStart")[..] else {
        panic!("one ExecStart")
    };
    let log = runtime.join("proxy.log");
    let mut proxy = ChildGuard::spawn(
        run_in_pod(start)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap()),
    );
    let started = Instant::now();
    let st = waiting.wait_timeout(Duration::from_secs(30));
    assert!(
        st.success(),
        "ExecStartPost failed: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    eprintln!(
        "ExecStartPost returned {:?} after ExecStart",
        started.elapsed()
    );
    // Ready means ready: the health port answers and the daemon has the proxy.
    assert!(runtime.join("ready").exists());
    let addr = pod.addr4(15021);
    let status = outside
        .enter(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).ok()?;
            s.write_all(b"GET /healthz/ready HTTP/1.0\r\n\r\n").ok()?;
            let mut r = String::new();
            s.read_to_string(&mut r).ok()?;
            Some(r.lines().next()?.to_string())
        })
        .join()
        .unwrap();
    assert!(
        status.as_deref().is_some_and(|s| s.contains(" 200")),
        "{status:?}"
    );
    assert!(daemon
        .ok(&["get", "proxies", "-o", "json"])
        .contains("vm-payments"));

    // Stop: SIGTERM (systemd's KillSignal), then ExecStopPost removes the rules.
    proxy.signal(libc::SIGTERM);
    assert!(proxy.wait_timeout(Duration::from_secs(30)).success());
    let [stop] = exec_lines(&text, "ExecStopPost")[..] else {
        panic!("one ExecStopPost")
    };
    let out = run_in_pod(stop).output().unwrap();
    assert!(
        out.status.success(),
        "{stop}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(show().trim(), "", "rules left after ExecStopPost");
}
