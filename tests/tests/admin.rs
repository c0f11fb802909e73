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
    let r = c
        .send(
            "GET",
            &format!("http://{listen}/a"),
            &[(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
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
    assert!(
        lines[0]["time"]
            .as_str()
            .is_some_and(|t| t.len() == 24 && t.ends_with('Z') && t.as_bytes()[10] == b'T'),
        "RFC 3339 time: {}",
        lines[0]["time"]
    );
    assert_eq!(lines[0]["path"], "/a");
    assert_eq!(lines[0]["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(lines[1]["trace_id"].is_null());
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

/// Slow clients cannot hold the health port: one address holds at most 8 of its 64 connections,
/// a full port gives a client from a new address the oldest slot of the address holding the
/// most, a client that sends no complete request head is closed at the header timeout (10 s). So
/// while 2,000 half-open clients from 100 addresses sit on the port, the orchestrator's probe from
/// its own address keeps getting answers within a second. The L7 path closes a silent client the
/// same way.
#[test]
fn slow_clients_cannot_hold_the_health_port() {
    use std::io::{Read, Write};
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
            "--admin",
            &admin.to_string(),
            "--health",
            &health.to_string(),
        ],
    );
    let c = Client::new();
    let probe = format!("http://{health}/healthz/ready");
    wait_for("the health port", Duration::from_secs(10), || {
        c.get(&probe).is_ok_and(|r| r.status == 200)
    });
    // 2,000 clients, 20 from each of 100 loopback addresses, that start a request and never
    // finish its head.
    let connect_from = |src: std::net::Ipv4Addr| {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::new(src.into(), 0).into()).unwrap();
        s.connect(&health.into()).unwrap();
        let mut s: std::net::TcpStream = s.into();
        // Written into the socket buffer even when the proxy has closed it already.
        let _ = s.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: x\r\n");
        s
    };
    let t0 = std::time::Instant::now();
    let mut slow: Vec<std::net::TcpStream> = (0..20)
        .flat_map(|_| (1..=100u8).map(|a| std::net::Ipv4Addr::new(127, 0, 1, a)))
        .map(connect_from)
        .collect();
    // The orchestrator's probe, from its own address, keeps being answered meanwhile.
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let r = Client::new().get(&probe);
        let took = t.elapsed();
        assert!(
            r.as_ref().is_ok_and(|r| r.status == 200),
            "the probe failed while slow clients sat on the port: {r:?}"
        );
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(worst < Duration::from_secs(1), "a probe took {worst:?}");
    // At most 64 slow clients are held, at most 8 per address; the others were closed at once.
    let mut held = 0;
    let mut per_source = std::collections::HashMap::new();
    for s in &mut slow {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = s.read(&mut b);
        if matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock) {
            held += 1;
            *per_source.entry(s.local_addr().unwrap().ip()).or_insert(0) += 1;
        }
    }
    // (The probes took a few slots; the slow clients still hold most: the probes were answered
    // on a full port.)
    assert!((32..=64).contains(&held), "{held} slow clients held");
    assert!(
        per_source.values().all(|&n| n <= 8),
        "one address held more than 8: {per_source:?}"
    );
    eprintln!("2,000 slow clients from 100 addresses: {held} held, worst probe {worst:?}");
    // The L7 listener closes a client that sends half a head and goes quiet (30 s).
    let mut half = std::net::TcpStream::connect(listen).unwrap();
    half.write_all(b"GET /x HTTP/1.1\r\n").unwrap();
    // The rest are closed at the header timeout.
    for s in &mut slow {
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut b = [0u8; 64];
        let r = s.read(&mut b);
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock),
            "a slow client stayed: {r:?}"
        );
    }
    let took = t0.elapsed();
    assert!(
        took < Duration::from_secs(13),
        "slow clients held the port for {took:?}"
    );
    // (A new client: the kept-alive connection of the first one was closed when it idled.)
    assert_eq!(
        Client::new()
            .get(&format!("http://{health}/healthz/ready"))
            .unwrap()
            .status,
        200,
        "the health port answers again"
    );
    half.set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let t1 = std::time::Instant::now();
    let mut b = [0u8; 256];
    let r = half.read(&mut b);
    assert!(
        t1.elapsed() < Duration::from_secs(35),
        "a half request held an L7 connection for {:?}: {r:?}",
        t1.elapsed()
    );
    child.signal(libc::SIGTERM);
    child.wait_timeout(Duration::from_secs(10));
}

/// Log rotation: after the access log is moved away, SIGHUP makes the proxy write to a new file
/// at the configured path, without a restart.
#[test]
fn access_log_reopens_on_sighup() {
    let dir = std::env::temp_dir().join(format!("ringside-rotate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("access.log");
    let app = serve("app", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = spawn_forward(
        listen,
        &[app.addr],
        &[
            "--protocol",
            "http",
            "--access-log",
            log.to_str().unwrap(),
            "--metrics",
            &metrics.to_string(),
        ],
    );
    let c = Client::new();
    assert_eq!(
        c.get(&format!("http://{listen}/before")).unwrap().status,
        200
    );
    wait_for("the first line", Duration::from_secs(5), || {
        std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/before"))
    });
    std::fs::rename(&log, dir.join("access.log.1")).unwrap();
    child.signal(libc::SIGHUP);
    let t0 = std::time::Instant::now();
    loop {
        assert_eq!(
            c.get(&format!("http://{listen}/after")).unwrap().status,
            200
        );
        if std::fs::read_to_string(&log).is_ok_and(|t| t.contains("/after")) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "no new access log after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // (Requests made before the proxy handled the signal may still be in the old file.)
    let old = std::fs::read_to_string(dir.join("access.log.1")).unwrap();
    assert!(old.contains("/before"), "{old}");
    let new = std::fs::read_to_string(&log).unwrap();
    assert!(
        !new.contains("/before"),
        "the new file has only lines after the reopen: {new}"
    );
    // The metrics port answers /metrics only.
    let m = c.get(&format!("http://{metrics}/metrics")).unwrap();
    assert_eq!(m.status, 200);
    assert!(
        m.text().contains("ringside_http_downstream_rq_total"),
        "{}",
        m.text()
    );
    for path in ["/config_dump", "/logging?level=debug", "/events"] {
        assert_eq!(
            c.get(&format!("http://{metrics}{path}")).unwrap().status,
            404,
            "{path} on the metrics port"
        );
    }
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let _ = std::fs::remove_dir_all(&dir);
}
