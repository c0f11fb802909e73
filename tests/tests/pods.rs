//! Transparent interception between pods (network namespaces), with the real redirect rules:
//! unmodified clients in pod A reach pod B's service through A's outbound listener (15001) and B's
//! inbound listener (15006). Needs root; under CI it must run.

use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use ringside_tests::pod::{pods_available, sh, Net, Pod, Sidecar};
use ringside_tests::*;

/// Config of a client pod that knows `products` (VIP:9090, endpoints on B, v4 and v6).
fn client_config(vip: Ipv4Addr, b: &Pod) -> String {
    format!(
        "sidecar: {{}}\nservices:\n  - name: products\n    virtual_ip: {vip}\n    port: 9090\n    endpoints: [\"{}\", \"{}\"]\n",
        b.addr4(9090),
        b.addr6(9090)
    )
}

/// Config of the serving pod: `products` on 9090 served by the app on `target_port`.
fn server_config(target_port: u16) -> String {
    format!("sidecar: {{}}\nservices:\n  - name: products\n    port: 9090\n    target_port: {target_port}\n    local: true\n")
}

/// From inside `pod`, send `len` random bytes to `to` and check the echo; returns Err on any
/// failure (so that refusals can be tested).
fn echo_roundtrip(pod: &Pod, to: SocketAddr, len: u64) -> Result<(), String> {
    pod.enter(move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect {to}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sum = Stream::new(len, len).write_to(&mut w);
            let _ = w.shutdown(Shutdown::Write);
            sum
        });
        let mut r = s;
        let (n, sum) = read_to_end_hashed(&mut r).map_err(|e| format!("read from {to}: {e}"))?;
        let sent = writer
            .join()
            .unwrap()
            .map_err(|e| format!("write to {to}: {e}"))?;
        if n != len || sum != sent {
            return Err(format!(
                "{to}: got {n} of {len} bytes, checksum {}",
                if sum == sent { "equal" } else { "differs" }
            ));
        }
        Ok(())
    })
    .join()
    .unwrap()
}

#[test]
fn plaintext_between_pods_through_both_sidecars() {
    if !pods_available("plaintext_between_pods_through_both_sidecars") {
        return;
    }
    let mut net = Net::new();
    let a = net.pod("a");
    let b = net.pod("b");
    let vip = net.virtual_ip(1);
    a.install_redirect(&[]);
    b.install_redirect(&[]);
    // Service 9090 -> app on 8080, bound on 127.0.0.1 only.
    b.echo_app("127.0.0.1:8080".parse().unwrap());
    let sa = Sidecar::start(&a, &client_config(vip, &b));
    let sb = Sidecar::start(&b, &server_config(8080));

    // By virtual IP, by pod IP, and over IPv6.
    echo_roundtrip(&a, SocketAddr::new(vip.into(), 9090), 4 << 20).unwrap();
    echo_roundtrip(&a, b.addr4(9090), 1 << 20).unwrap();
    echo_roundtrip(&a, b.addr6(9090), 1 << 20).unwrap();
    // An unknown destination is passed through (default): B's sidecar still takes it inbound and
    // finds no app on 7000.
    let refused = echo_roundtrip(&a, b.addr4(7000), 10);
    assert!(refused.is_err(), "nothing listens on 7000 in B");

    let ca = sa.stop();
    let cb = sb.stop();
    assert_eq!(
        ca["cx_total"], 4,
        "A's outbound listener took every connection: {ca:?}"
    );
    assert_eq!(ca.get("inbound_app_v4_loopback"), Some(&0));
    assert_eq!(
        cb["cx_total"], 4,
        "B's inbound listener took every connection: {cb:?}"
    );
    assert_eq!(cb["inbound_app_v4_loopback"], 3, "{cb:?}");
    assert_eq!(cb["fail.app_not_listening"], 1, "{cb:?}");
    assert_eq!(ca["rx_bytes"], (4 << 20) + (2 << 20) + 10);
}

#[test]
fn local_app_found_on_any_address_and_wrong_port_is_explained() {
    if !pods_available("local_app_found_on_any_address_and_wrong_port_is_explained") {
        return;
    }
    let mut net = Net::new();
    let a = net.pod("a");
    let b = net.pod("b");
    a.install_redirect(&[]);
    b.install_redirect(&[]);
    // Three services in B, each app bound to one kind of address; payments maps 1800 -> 8080
    // but its app listens on 8081 (the wrong port).
    b.echo_app("127.0.0.1:8001".parse().unwrap());
    b.echo_app("[::1]:8002".parse().unwrap());
    b.echo_app(b.addr4(8003));
    b.echo_app("127.0.0.1:8081".parse().unwrap());
    let mut server = String::from("sidecar: {}\nservices:\n");
    let mut client = String::from("sidecar: {}\nservices:\n");
    for (name, port, target) in [
        ("v4", 9001, 8001),
        ("v6", 9002, 8002),
        ("podip", 9003, 8003),
        ("payments", 1800, 8080),
    ] {
        server.push_str(&format!(
            "  - name: {name}\n    port: {port}\n    target_port: {target}\n    local: true\n"
        ));
        client.push_str(&format!(
            "  - name: {name}\n    port: {port}\n    endpoints: [\"{}\"]\n",
            b.addr4(port)
        ));
    }
    let sa = Sidecar::start(&a, &client);
    let sb = Sidecar::start(&b, &server);
    for port in [9001, 9002, 9003] {
        echo_roundtrip(&a, b.addr4(port), 100_000)
            .unwrap_or_else(|e| panic!("port {port}: {e}\n{}", sb.log_text()));
    }
    assert!(echo_roundtrip(&a, b.addr4(1800), 10).is_err());
    let log = sb.log_text();
    let line = log
        .lines()
        .find(|l| l.contains("app_not_listening"))
        .unwrap_or_else(|| panic!("no app_not_listening in B's log:\n{log}"));
    assert!(line.contains("nothing listens on port 8080"), "{line}");
    assert!(
        line.contains("127.0.0.1:8081"),
        "the hint names what does listen: {line}"
    );
    let ca = sa.stop();
    let cb = sb.stop();
    assert_eq!(
        (
            cb["inbound_app_v4_loopback"],
            cb["inbound_app_v6_loopback"],
            cb["inbound_app_pod_ip"]
        ),
        (1, 1, 1),
        "{cb:?}"
    );
    assert_eq!(cb["fail.app_not_listening"], 1);
    assert_eq!(ca["cx_total"], 4);
}

#[test]
fn registry_only_refuses_unknown_destinations() {
    if !pods_available("registry_only_refuses_unknown_destinations") {
        return;
    }
    let mut net = Net::new();
    let a = net.pod("a");
    let b = net.pod("b");
    a.install_redirect(&[]);
    b.echo_app(b.addr4(7000));
    // Without a sidecar in A the app reaches B directly...
    let sa = Sidecar::start(&a, "sidecar:\n  registry_only: true\n");
    let r = echo_roundtrip(&a, b.addr4(7000), 10);
    assert!(
        r.is_err(),
        "registry_only must refuse an unknown destination"
    );
    let ca = sa.stop();
    assert_eq!(ca["fail.unknown_destination"], 1, "{ca:?}");
    // ...and with registry_only off it is passed through.
    let sa = Sidecar::start(&a, "sidecar: {}\n");
    echo_roundtrip(&a, b.addr4(7000), 1000).unwrap();
    let ca = sa.stop();
    assert_eq!(ca["cx_total"], 1);
}

#[test]
fn pgbench_between_pods_through_both_sidecars() {
    if !pods_available("pgbench_between_pods_through_both_sidecars") {
        return;
    }
    let mut net = Net::new();
    let a = net.pod("a");
    let b = net.pod("db");
    let vip = net.virtual_ip(5);
    net.write_hosts(&[&a, &b], &[(vip.into(), "postgres")]);
    a.install_redirect(&[]);
    b.install_redirect(&[]);
    let pg = postgres::Postgres::start_in(Some(&b.name), 5432);
    let sa = Sidecar::start(
        &a,
        &format!("sidecar: {{}}\nservices:\n  - name: postgres\n    virtual_ip: {vip}\n    port: 5432\n    endpoints: [\"{}\"]\n", b.addr4(5432)),
    );
    let sb = Sidecar::start(
        &b,
        "sidecar: {}\nservices:\n  - name: postgres\n    port: 5432\n    local: true\n",
    );
    let pgbench = pg.bin("pgbench");
    let common = ["-h", "postgres", "-p", "5432", "-U", "postgres"];
    let init = a
        .cmd(pgbench.to_str().unwrap())
        .args(common)
        .args(["-i", "-s", "1", "-q", "postgres"])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "pgbench -i in pod A failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let run = a
        .cmd(pgbench.to_str().unwrap())
        .args(common)
        .args(["-c", "4", "-j", "2", "-T", "3", "postgres"])
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "pgbench in pod A failed: {out}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(out.contains("number of failed transactions: 0"), "{out}");
    let ca = sa.stop();
    let cb = sb.stop();
    assert!(ca["cx_total"] >= 5, "{ca:?}");
    assert_eq!(
        ca["cx_total"], cb["cx_total"],
        "every connection crossed both sidecars"
    );
    drop(pg);
}

#[test]
fn install_is_idempotent_and_remove_restores_the_rules() {
    if !pods_available("install_is_idempotent_and_remove_restores_the_rules") {
        return;
    }
    let mut net = Net::new();
    let p = net.pod("rules");
    let init = workspace_bin("ringside-init");
    let init = init.to_str().unwrap();
    // The user's own rules, which ringside must leave alone.
    sh(&[
        "ip",
        "netns",
        "exec",
        &p.name,
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &p.name,
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &p.name,
        "nft",
        "add table ip mine; add chain ip mine c { type nat hook output priority 0; }",
    ]);
    let dump = |flag: &str| -> String {
        if flag == "nft" {
            return sh(&["ip", "netns", "exec", &p.name, "nft", "list", "ruleset"]);
        }
        let kind = flag.trim_start_matches("iptables-");
        let v4 = sh(&[
            "ip",
            "netns",
            "exec",
            &p.name,
            &format!("iptables-{kind}-save"),
            "-t",
            "nat",
        ]);
        let v6 = sh(&[
            "ip",
            "netns",
            "exec",
            &p.name,
            &format!("ip6tables-{kind}-save"),
            "-t",
            "nat",
        ]);
        // Drop comments (they carry timestamps) and packet counters.
        format!("{v4}{v6}")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split(" [").next().unwrap().to_string())
            .collect::<Vec<_>>()
            .join("\n")
    };
    for flag in ["iptables-nft", "iptables-legacy", "nft"] {
        let before = dump(flag);
        let install = [
            init,
            "install",
            "--netns",
            &p.name,
            "--backend",
            flag,
            "--exclude-outbound-ports",
            "22",
        ];
        sh(&install);
        let once = dump(flag);
        sh(&install);
        assert_eq!(
            once,
            dump(flag),
            "{flag}: a second install changed the rules"
        );
        assert_ne!(before, once, "{flag}: install added nothing");
        let shown = sh(&[init, "show", "--netns", &p.name, "--backend", flag]);
        assert!(
            shown.contains("15001") && shown.contains("15006"),
            "{flag}: show: {shown}"
        );
        sh(&[init, "remove", "--netns", &p.name, "--backend", flag]);
        let after = dump(flag);
        assert_eq!(
            before, after,
            "{flag}: remove did not restore the rules exactly"
        );
        assert!(
            after.contains("udp") || after.contains("mine"),
            "{flag}: the user's rules are gone"
        );
    }
    // Clear errors.
    let out = std::process::Command::new(init)
        .args(["install", "--netns", "no-such-pod-ns"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
}

#[test]
fn backend_detection_and_permission_errors() {
    if !pods_available("backend_detection_and_permission_errors") {
        return;
    }
    let mut net = Net::new();
    let legacy = net.pod("leg");
    let nft = net.pod("nft");
    let init = workspace_bin("ringside-init");
    let init = init.to_str().unwrap();
    // A pod whose rules are in iptables-legacy gets legacy; one whose rules are in nf_tables gets
    // iptables-nft.
    sh(&[
        "ip",
        "netns",
        "exec",
        &legacy.name,
        "iptables-legacy",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    sh(&[
        "ip",
        "netns",
        "exec",
        &nft.name,
        "iptables-nft",
        "-t",
        "nat",
        "-A",
        "OUTPUT",
        "-p",
        "udp",
        "-j",
        "ACCEPT",
    ]);
    let out = sh(&[init, "install", "--netns", &legacy.name]);
    assert!(out.contains("iptables-legacy"), "{out}");
    let out = sh(&[init, "install", "--netns", &nft.name]);
    assert!(out.contains("iptables-nft"), "{out}");
    for p in [&legacy, &nft] {
        sh(&[init, "remove", "--netns", &p.name]);
    }
    // Without root or CAP_NET_ADMIN: a clear refusal, nothing changed.
    let out = legacy
        .cmd_as(
            ringside_tests::pod::PROXY_UID,
            ringside_tests::pod::PROXY_UID,
            init,
        )
        .args(["install", "--backend", "iptables-nft"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs root or CAP_NET_ADMIN"), "{err}");
}

#[test]
fn ringctl_redirect_installs_and_removes() {
    if !pods_available("ringctl_redirect_installs_and_removes") {
        return;
    }
    let mut net = Net::new();
    let p = net.pod("ctl");
    let ringctl = workspace_bin("ringctl");
    let r = ringctl.to_str().unwrap();
    let out = sh(&[
        r,
        "redirect",
        "install",
        "--netns",
        &p.name,
        "--backend",
        "nft",
    ]);
    assert!(out.contains("installed (nft)"), "{out}");
    let shown = sh(&[
        r,
        "redirect",
        "show",
        "--netns",
        &p.name,
        "--backend",
        "nft",
    ]);
    assert!(
        shown.contains("redirect to :15001") && shown.contains("meta skuid 1337"),
        "{shown}"
    );
    sh(&[
        r,
        "redirect",
        "remove",
        "--netns",
        &p.name,
        "--backend",
        "nft",
    ]);
    let shown = sh(&[
        r,
        "redirect",
        "show",
        "--netns",
        &p.name,
        "--backend",
        "nft",
    ]);
    assert!(shown.trim().is_empty(), "{shown}");
}
