//! Crash-safe certificate files: a sidecar killed while it renews its certificate (between writing
//! the new key and switching to it) restarts with the daemon down and serves with a matching key
//! and certificate. Needs root (pods).

use std::net::IpAddr;
use std::time::Duration;

use ringside_tests::ctl::Daemon;
use ringside_tests::pod::{pods_available, Net, Sidecar, PROXY_UID};

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
