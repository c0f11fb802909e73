//! The demo mesh (`ringside-demo`, the README's main command): it comes up, shows every hop's
//! identity, the denied call and `ringctl why`; a killed demo's leftovers are removed by the next
//! start; Ctrl-C (SIGINT) removes everything. Needs root.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ringside_tests::pod::pods_available;
use ringside_tests::{workspace_bin, ChildGuard};

const READY: &str = "   logs: ";

/// Start the demo; returns it and a channel of its stdout lines.
fn start(args: &[&str]) -> (ChildGuard, mpsc::Receiver<String>) {
    let mut cmd = Command::new(workspace_bin("ringside-demo"));
    cmd.args(args).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = ChildGuard::spawn(&mut cmd);
    let (tx, rx) = mpsc::channel();
    let out = child.0.stdout.take().unwrap();
    let err = child.0.stderr.take().unwrap();
    let tx2 = tx.clone();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx2.send(format!("stderr: {l}"));
        }
    });
    (child, rx)
}

/// Collect lines until one contains `until` (or the channel ends); panics after `within`.
fn read_until(rx: &mpsc::Receiver<String>, until: &str, within: Duration) -> String {
    let start = Instant::now();
    let mut text = String::new();
    loop {
        let left = within.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(l) => {
                text.push_str(&l);
                text.push('\n');
                if l.contains(until) {
                    return text;
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => return text,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("no '{until}' within {within:?}; output so far:\n{text}")
            }
        }
    }
}

fn demo_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("rsdemo-"))
        .map(str::to_string)
        .collect()
}

fn check_tour(out: &str) {
    let id = |s: &str| format!("spiffe://dc1/ns/default/sa/{s}");
    for want in [
        format!("frontend <- {}", id("edge")),
        format!("public-api <- {}", id("frontend")),
        format!("products-api <- {}", id("public-api")),
        format!("payments <- {}", id("public-api")),
        format!("postgres (tcp) <- {}", id("products-api")),
        "row: 1 | espresso machine | 349.00".to_string(),
        "HTTP 403".to_string(),
        "x-ringside-reason: denied_by_destination".to_string(),
        "CAUSE (intention_denied): frontend -> payments".to_string(),
        "1800->8080".to_string(),
    ] {
        assert!(
            out.contains(&want),
            "missing '{want}' in the demo output:\n{out}"
        );
    }
    // `ringctl why frontend payments:1800`: the intention is the one failed check about the
    // connection; nothing is blamed on a sidecar (frontend's has just started, its app started
    // after it: no startup race).
    let why: Vec<&str> = out
        .lines()
        .skip_while(|l| !l.starts_with("$ ringctl why frontend payments:1800"))
        .take_while(|l| !l.starts_with("== "))
        .collect();
    let failed: Vec<&str> = why
        .iter()
        .copied()
        .filter(|l| l.trim_start().starts_with("[FAIL]"))
        .collect();
    assert!(
        failed
            .iter()
            .any(|l| l.contains("an intention allows frontend -> payments")),
        "the intention check does not fail in `why`:\n{}",
        why.join("\n")
    );
    assert!(
        !failed.iter().any(|l| l.contains("sidecar")),
        "`why` fails a check about a sidecar:\n{}",
        why.join("\n")
    );
    // `ringctl get intentions`: the catch-all deny, under its header.
    assert!(
        out.lines()
            .any(|l| l.split_whitespace().take(3).eq(["*", "*", "deny"])),
        "no '* * deny' intention in the demo output:\n{out}"
    );
    assert!(
        out.contains("SOURCE") && out.contains("DESTINATION"),
        "{out}"
    );
    // Every sidecar reports to the daemon.
    let live = out.lines().filter(|l| l.contains(" live ")).count();
    assert_eq!(live, 6, "six live proxies expected:\n{out}");
}

#[test]
fn demo_mesh_runs_and_cleans_up() {
    if !pods_available("demo_mesh_runs_and_cleans_up") {
        return;
    }
    // Not a leftover of something else: the demo owns these names.
    assert!(
        demo_namespaces().is_empty() || std::path::Path::new("/run/ringside-demo.json").exists(),
        "rsdemo-* namespaces exist that no demo state file accounts for"
    );

    // 1. Up, then killed without a chance to clean up.
    let (mut demo, rx) = start(&[]);
    let out = read_until(&rx, READY, Duration::from_secs(180));
    check_tour(&out);
    // It keeps serving while it runs: a request from the host through the edge.
    let url = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("curl http://"))
        .map(|u| format!("http://{u}"))
        .unwrap_or_else(|| panic!("no curl line:\n{out}"));
    let got = ringside_tests::http::Client::new().get(&url).unwrap();
    assert_eq!(got.status, 200);
    assert!(got.text().contains("products-api"), "{}", got.text());
    demo.signal(libc::SIGKILL);
    demo.wait_timeout(Duration::from_secs(10));
    assert!(
        !demo_namespaces().is_empty(),
        "a killed demo leaves its pods behind"
    );

    // 2. The next start removes the leftovers first, then runs (--once: no waiting).
    let (mut demo, rx) = start(&["--once"]);
    let out = read_until(&rx, "removed the demo's", Duration::from_secs(180));
    assert!(
        out.contains("an earlier demo did not finish"),
        "leftovers not reported:\n{out}"
    );
    check_tour(&out);
    assert!(demo.wait_timeout(Duration::from_secs(30)).success());
    assert!(demo_namespaces().is_empty(), "{:?}", demo_namespaces());

    // 3. Ctrl-C: everything removed, exit 0.
    let (mut demo, rx) = start(&[]);
    let out = read_until(&rx, READY, Duration::from_secs(180));
    check_tour(&out);
    demo.signal(libc::SIGINT);
    let rest = read_until(&rx, "removed the demo's", Duration::from_secs(60));
    let st = demo.wait_timeout(Duration::from_secs(30));
    assert!(st.success(), "exit {st}: {rest}");
    assert!(demo_namespaces().is_empty(), "{:?}", demo_namespaces());
    assert!(!std::path::Path::new("/run/ringside-demo.json").exists());
    assert!(!std::path::Path::new("/sys/class/net/rsdemo-host").exists());
    assert!(!std::path::Path::new("/tmp/rsdemo-ctl").exists());
}
