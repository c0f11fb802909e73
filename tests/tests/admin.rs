//! The admin and health servers of a running proxy: Prometheus counters with Envoy's names summed
//! over the workers, the running config, endpoint health, certificates, recent failures with
//! their reasons, readiness through a drain, and the log level changed at runtime.

use std::net::SocketAddr;
use std::time::Duration;

use ringside_tests::http::{serve, Client};
use ringside_tests::*;

#[test]
fn admin_endpoints_report_counters_config_events_and_readiness() {
    let app = serve("app", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let health: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = spawn_forward(
        listen,
        &[app.addr],
        &[
            "--protocol",
            "http",
            "--workers",
            "2",
            "--admin",
            &admin.to_string(),
            "--health",
            &health.to_string(),
        ],
    );
    let c = Client::new();
    for _ in 0..10 {
        assert_eq!(c.get(&format!("http://{listen}/x")).unwrap().status, 200);
    }
    let r = c.get(&format!("http://{listen}/status/503")).unwrap();
    assert_eq!(r.status, 503);

    let stats = c.get(&format!("http://{admin}/stats")).unwrap().text();
    for want in [
        "ringside_downstream_cx_total 1\n",
        "ringside_http_downstream_rq_total 11",
        "ringside_http_downstream_rq_xx_total{response_code_class=\"2xx\"} 10",
        "ringside_http_downstream_rq_xx_total{response_code_class=\"5xx\"} 1",
        "ringside_upstream_cx_connect_fail_total 0",
        "ringside_http_service_rq_method_total{service=\"upstream\",route=\"default\",method=\"GET\"} 11",
        "ringside_http_service_rq_time_ms_count{service=\"upstream\",route=\"default\"} 11",
        "ringside_config_version 0",
        "# TYPE ringside_failures counter",
    ] {
        assert!(stats.contains(want), "/stats lacks {want}:\n{stats}");
    }
    let dump: serde_json::Value =
        serde_json::from_slice(&c.get(&format!("http://{admin}/config_dump")).unwrap().body)
            .unwrap();
    assert_eq!(dump["services"][0]["name"], "upstream");
    assert_eq!(dump["config"]["listeners"][0]["protocol"], "http");
    let clusters: serde_json::Value =
        serde_json::from_slice(&c.get(&format!("http://{admin}/clusters")).unwrap().body).unwrap();
    assert_eq!(clusters[0]["endpoints"][0]["addr"], app.addr.to_string());
    assert_eq!(clusters[0]["endpoints"][0]["ejected"], false);
    let certs = c.get(&format!("http://{admin}/certs")).unwrap();
    assert_eq!(certs.status, 200);

    // Log level at runtime.
    let r = c
        .send(
            "POST",
            &format!("http://{admin}/logging?level=debug"),
            &[],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let r = c
        .send(
            "POST",
            &format!("http://{admin}/logging?level=[[["),
            &[],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r.status, 400, "a bad filter is refused: {r:?}");

    // Ready until a drain begins.
    assert_eq!(
        c.get(&format!("http://{health}/healthz/ready"))
            .unwrap()
            .text(),
        "LIVE\n"
    );
    assert_eq!(c.get(&format!("http://{admin}/ready")).unwrap().status, 200);
    drop(c);
    child.signal(libc::SIGTERM);
    let st = child.wait_timeout(Duration::from_secs(20));
    assert!(st.success());
}

#[test]
fn events_name_reason_source_and_destination() {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let child = spawn_forward(
        listen,
        &[refusing_addr()],
        &["--workers", "1", "--admin", &admin.to_string()],
    );
    for _ in 0..3 {
        let s = std::net::TcpStream::connect(listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut b = [0u8; 1];
        let _ = std::io::Read::read(&mut &s, &mut b);
    }
    let c = Client::new();
    let events: serde_json::Value =
        serde_json::from_slice(&c.get(&format!("http://{admin}/events")).unwrap().body).unwrap();
    let list = events.as_array().unwrap();
    assert_eq!(list.len(), 3, "{events}");
    for e in list {
        assert_eq!(e["reason"], "upstream_connect_refused", "{e}");
        assert_eq!(e["destination"], "upstream");
        assert!(e["source"].as_str().unwrap().starts_with("127.0.0.1:"));
        assert!(
            e["detail"].as_str().unwrap().contains("nothing listens"),
            "{e}"
        );
        assert!(e["time_ms"].as_u64().unwrap() > 1_700_000_000_000);
    }
    let stats = c.get(&format!("http://{admin}/stats")).unwrap().text();
    assert!(
        stats.contains("ringside_failures_total{reason=\"upstream_connect_refused\"} 3"),
        "{stats}"
    );
    assert!(
        stats.contains("ringside_upstream_cx_connect_fail_total 3"),
        "{stats}"
    );
    drop(child);
}

#[test]
fn access_log_has_a_line_per_request_and_connection_with_the_reason() {
    let dir = std::env::temp_dir().join(format!("ringside-accesslog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let http_log = dir.join("http.log");
    let tcp_log = dir.join("tcp.log");
    let app = serve("app", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = spawn_forward(
        listen,
        &[app.addr],
        &[
            "--protocol",
            "http",
            "--access-log",
            http_log.to_str().unwrap(),
        ],
    );
    let c = Client::new();
    assert_eq!(c.get(&format!("http://{listen}/a")).unwrap().status, 200);
    assert_eq!(
        c.get(&format!("http://{listen}/status/404"))
            .unwrap()
            .status,
        404
    );
    drop(c);
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&http_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert_eq!(lines[0]["kind"], "http");
    assert_eq!(lines[0]["path"], "/a");
    assert_eq!(lines[0]["status"], 200);
    assert_eq!(lines[0]["method"], "GET");
    assert!(lines[0]["time_ms"].as_u64().unwrap() > 0);
    assert_eq!(lines[1]["status"], 404);
    assert!(
        lines[1]["reason"].is_null(),
        "the app's 404 is not a proxy failure"
    );

    // L4: a refused connection carries its reason.
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = spawn_forward(
        listen,
        &[refusing_addr()],
        &["--access-log", tcp_log.to_str().unwrap()],
    );
    let s = std::net::TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(&mut &s, &mut b);
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&tcp_log)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(line["kind"], "tcp");
    assert_eq!(line["reason"], "upstream_connect_refused");
    assert_eq!(line["destination"], "upstream");
    let _ = std::fs::remove_dir_all(&dir);
}
