//! Crash-safe certificate files: a sidecar killed while it renews its certificate (between writing
//! the new key and switching to it) restarts with the daemon down and serves with a matching key
//! and certificate; sidecars restarted while the daemon is down serve mesh mTLS with their last
//! certificates and configuration. Needs root (pods).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use ringside_tests::ctl::Daemon;
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};

#[test]
fn a_sidecar_killed_while_renewing_restarts_with_a_matching_pair() {
    if !pods_available("a_sidecar_killed_while_renewing_restarts_with_a_matching_pair") {
        return;
    }
    let mut net = Net::new();
    let pod = net.pod("alpha");
    let range = format!("{}/29", net.virtual_ip(0));
    for point in ["tls-after-key", "tls-before-switch"] {
        let mut daemon = Daemon::start(&format!("{}-{point}", net.id), &["--vip-range", &range]);
        daemon.ok(&["register", "service", "alpha", "--port", "80:8080"]);
        let args = daemon.sidecar_args("alpha", IpAddr::V4(pod.ip4), PROXY_UID);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The first certificate is issued at start; the second write (the renewal) crashes.
        // (The variable reaches the sidecar through `ip netns exec` and setpriv.)
        std::env::set_var("RINGSIDE_FAILPOINT", format!("{point}:2"));
        let mut first = Sidecar::start_with(&pod, "sidecar: {}\n", &args);
        std::env::remove_var("RINGSIDE_FAILPOINT");
        daemon.ok(&["cert", "rotate", "--service", "alpha"]);
        let st = first.child.wait_timeout(Duration::from_secs(20));
        assert!(
            !st.success(),
            "{point}: the sidecar did not crash at the failpoint: {st}\n{}",
            first.log_text()
        );
        assert!(
            first.log_text().contains("failpoint reached"),
            "{}",
            first.log_text()
        );
        // The daemon is gone too: the restart must make do with what is on disk.
        daemon.kill9();
        let again = Sidecar::start_with(&pod, "sidecar: {}\n", &args);
        let log = again.log_text();
        assert!(
            log.contains("starting with the last good configuration and certificate"),
            "{point}: {log}"
        );
        assert!(!log.contains("does not belong"), "{point}: {log}");
        let c = again.stop();
        assert!(c.contains_key("cx_total"), "{c:?}");
    }
}

const ALLOW: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: store
spec:
  destination:
    name: store
  sources:
    - name: client
      action: allow
";

/// An exact echo of a few bytes from inside `pod` to `to` (through the pod's sidecar).
fn echo_from(pod: &Pod, to: SocketAddr) -> Result<(), String> {
    pod.enter(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(b"after the restart")
            .map_err(|e| e.to_string())?;
        let mut b = [0u8; 17];
        s.read_exact(&mut b).map_err(|e| format!("read: {e}"))?;
        if &b != b"after the restart" {
            return Err("the echo differs".into());
        }
        Ok(())
    })
    .join()
    .unwrap()
}

/// The daemon is down (killed) and both sidecars of an allowed pair are restarted: each starts
/// from what it kept on disk (its last certificate and configuration), the pair talks mesh mTLS
/// again, and a caller the last intentions do not allow is still refused.
#[test]
fn sidecars_restarted_while_the_daemon_is_down_serve_with_their_last_state() {
    if !pods_available("sidecars_restarted_while_the_daemon_is_down_serve_with_their_last_state") {
        return;
    }
    let mut net = Net::new();
    let client = net.pod("client");
    let batch = net.pod("batch");
    let store = net.pod("store");
    let range = format!("{}/29", net.virtual_ip(0));
    let mut daemon = Daemon::start(&net.id, &["--vip-range", &range]);
    daemon.ok(&["register", "service", "store", "--port", "7000:7000"]);
    daemon.ok(&["register", "service", "client"]);
    daemon.ok(&["register", "service", "batch"]);
    daemon.apply(ALLOW);
    for p in [&client, &batch, &store] {
        p.install_redirect(&[]);
    }
    let app = store.echo_app("127.0.0.1:7000".parse().unwrap());
    let args =
        |pod: &Pod, service: &str| daemon.sidecar_args(service, IpAddr::V4(pod.ip4), PROXY_UID);
    let start = |pod: &Pod, args: &[String]| {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Sidecar::start_with(pod, "sidecar: {}\n", &args)
    };
    let pods = [(&client, "client"), (&batch, "batch"), (&store, "store")];
    let all_args: Vec<Vec<String>> = pods.iter().map(|(p, s)| args(p, s)).collect();
    let sidecars: Vec<Sidecar> = pods
        .iter()
        .zip(&all_args)
        .map(|((p, _), a)| start(p, a))
        .collect();
    let vip: IpAddr = daemon.virtual_ip("store");
    let to = SocketAddr::new(vip, 7000);
    echo_from(&client, to).unwrap_or_else(|e| panic!("before: {e}"));
    assert!(echo_from(&batch, to).is_err(), "batch is not allowed");

    daemon.kill9();
    for s in sidecars {
        s.stop();
    }
    let served = app.load(std::sync::atomic::Ordering::SeqCst);
    let again: Vec<Sidecar> = pods
        .iter()
        .zip(&all_args)
        .map(|((p, _), a)| start(p, a))
        .collect();
    for s in &again {
        let log = s.log_text();
        assert!(
            log.contains("starting with the last good configuration and certificate"),
            "{log}"
        );
    }
    echo_from(&client, to).unwrap_or_else(|e| {
        panic!(
            "after the restart with the daemon down: {e}\n{}",
            again[2].log_text()
        )
    });
    assert_eq!(app.load(std::sync::atomic::Ordering::SeqCst), served + 1);
    assert!(
        echo_from(&batch, to).is_err(),
        "batch is still not allowed with the daemon down"
    );
    assert_eq!(
        app.load(std::sync::atomic::Ordering::SeqCst),
        served + 1,
        "a refused caller reached the app"
    );
    let c = again.into_iter().nth(2).unwrap().stop();
    assert!(
        c.get("fail.intention_denied").copied().unwrap_or(0) >= 1,
        "{c:?}"
    );
}
