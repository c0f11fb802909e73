//! The benchmark tool itself: the open loop keeps its rate and corrects coordinated omission, the
//! HTTP mode counts requests against `http-serve`, the tool agrees with sockperf on the direct
//! path, and `report` turns a `compare` result into a markdown report with its plots.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Mutex;

use ringside_tests::{free_port, listening_on, under_ci, wait_for, workspace_bin, ChildGuard};
use serde_json::Value;

/// Held by each test: latency measurements must not share the CPUs with each other.
static SERIAL: Mutex<()> = Mutex::new(());

/// Run `ringside-bench ARGS` to completion; panics with its output if it fails.
fn bench(args: &[&str]) -> Output {
    let out = Command::new(workspace_bin("ringside-bench"))
        .args(args)
        .output()
        .expect("run ringside-bench");
    assert!(
        out.status.success(),
        "ringside-bench {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Start one of the tool's servers (`echo` or `http-serve`) on a free port.
fn server(kind: &str, extra: &[&str]) -> (ChildGuard, SocketAddr) {
    let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let child = ChildGuard::spawn(
        Command::new(workspace_bin("ringside-bench"))
            .args([kind, "--listen", &addr.to_string()])
            .args(extra),
    );
    wait_for(
        "the server to listen",
        std::time::Duration::from_secs(10),
        || listening_on(addr.port()),
    );
    (child, addr)
}

/// A fresh empty directory under the system temporary directory.
fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ringside-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn open_loop_keeps_its_rate_and_corrects_coordinated_omission() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_echo, addr) = server("echo", &[]);
    let out = bench(&[
        "run",
        "--addr",
        &addr.to_string(),
        "--rate",
        "2000",
        "--connections",
        "2",
        "--duration",
        "2s",
        "--json",
        "--quiet",
    ]);
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
    assert_eq!(r["loop"], "open");
    assert_eq!(r["errors"], 0, "{r}");
    let achieved = r["rate_achieved"].as_f64().unwrap();
    assert!(
        (achieved - 2000.0).abs() / 2000.0 < 0.05,
        "achieved {achieved}/s, target 2000/s"
    );
    let (corrected, service) = (
        r["latency"]["p99_us"].as_f64().unwrap(),
        r["service_time"]["p99_us"].as_f64().unwrap(),
    );
    assert!(
        corrected >= service,
        "corrected p99 {corrected} < service-time p99 {service}"
    );
    assert!(
        r["curve"].as_array().unwrap().len() >= 50,
        "a percentile curve"
    );
}

#[test]
fn http_mode_counts_requests_without_errors() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let (_http, addr) = server("http-serve", &["--body-size", "300"]);
    let addr = addr.to_string();
    for extra in [&[][..], &["--rate", "500"][..]] {
        let mut args = vec![
            "run",
            "--http",
            "--addr",
            &addr,
            "--path",
            "/x",
            "--connections",
            "2",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--json",
            "--quiet",
        ];
        args.extend_from_slice(extra);
        let out = bench(&args);
        let r: Value = serde_json::from_slice(&out.stdout).expect("JSON result");
        assert_eq!(r["mode"], "http");
        assert_eq!(r["errors"], 0, "{r}");
        assert_eq!(r["size"], 300, "mean body size: {r}");
        assert!(r["requests"].as_u64().unwrap() > 100, "{r}");
    }
}

#[test]
fn agrees_with_sockperf_on_the_direct_path() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .any(|d| d.join("sockperf").is_file());
    if !found {
        assert!(
            !under_ci(),
            "sockperf is missing under CI (apt-get install sockperf)"
        );
        eprintln!("SKIPPED: agrees_with_sockperf_on_the_direct_path: sockperf is not installed");
        return;
    }
    // A p99 over one second of ping-pong moves by more than 10 % when the shared machine is
    // busy at that moment: up to three attempts, each a full check; every attempt's result is
    // printed, and the last one's is the failure message.
    let mut failures = Vec::new();
    for attempt in 1..=3 {
        let out = Command::new(workspace_bin("ringside-bench"))
            .args([
                "sockperf-check",
                "--rounds",
                "7",
                "--duration",
                "2s",
                "--json",
            ])
            .output()
            .expect("run ringside-bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let c: Value = serde_json::from_str(&stdout).unwrap_or_else(|_| {
            panic!(
                "no JSON result:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        eprintln!("attempt {attempt}: {c}");
        if out.status.success() && c["pass"] == true {
            assert!(c["diff_p50"].as_f64().unwrap() <= 0.10, "{c}");
            assert!(c["diff_p99"].as_f64().unwrap() <= 0.20, "{c}");
            return;
        }
        failures.push(c);
    }
    panic!("ringside-bench and sockperf disagree in three checks: {failures:#?}");
}

#[test]
fn report_writes_markdown_plots_and_index() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = temp_dir("bench-report");
    let json = dir.join("compare.json");
    let ringside = workspace_bin("ringside");
    bench(&[
        "compare",
        "--rounds",
        "1",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--peers",
        "direct,ringside",
        "--sockperf-check",
        "off",
        "--quiet",
        "--ringside-bin",
        ringside.to_str().unwrap(),
        "--out",
        json.to_str().unwrap(),
    ]);
    let result: Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let peers = result["peers"].as_array().unwrap();
    assert_eq!(peers.len(), 2, "{result}");
    assert!(
        peers[1]["rss_kib"].as_u64().unwrap() > 0,
        "ringside's RSS is recorded"
    );
    let date = &result["date"].as_str().unwrap()[..10];

    let out_dir = dir.join("reports");
    std::fs::create_dir_all(&out_dir).unwrap();
    let index = out_dir.join("README.md");
    std::fs::write(&index, "# Reports\n\nKept by hand.\n\n| date | report | what |\n|---|---|---|\n\n## Other\n\nHand-written.\n").unwrap();
    for _ in 0..2 {
        bench(&[
            "report",
            "--input",
            json.to_str().unwrap(),
            "--out-dir",
            out_dir.to_str().unwrap(),
            "--name",
            "latency",
        ]);
    }
    let md = std::fs::read_to_string(out_dir.join(format!("{date}-latency.md"))).unwrap();
    assert!(md.contains("| peer | p50 µs | p99 µs | p99.9 µs |"), "{md}");
    assert!(
        md.contains("| ringside |") && md.contains("| direct |"),
        "{md}"
    );
    for plot in ["cdf", "throughput", "memory"] {
        let svg = std::fs::read_to_string(out_dir.join(format!("{date}-latency-{plot}.svg")))
            .unwrap_or_else(|e| panic!("{plot} plot: {e}"));
        assert!(svg.starts_with("<svg"), "{plot} is an SVG");
        assert!(
            md.contains(&format!("({date}-latency-{plot}.svg)")),
            "{plot} is linked"
        );
    }
    let readme = std::fs::read_to_string(&index).unwrap();
    let row = format!("[{date}-latency.md]({date}-latency.md) |");
    assert_eq!(readme.matches(&row).count(), 1, "one index row:\n{readme}");
    assert_eq!(
        readme.matches("<!-- latest-latency:begin -->").count(),
        1,
        "{readme}"
    );
    assert!(
        readme.contains("Kept by hand.") && readme.contains("Hand-written."),
        "{readme}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
