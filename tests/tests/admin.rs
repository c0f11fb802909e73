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
        // No access log here, so nothing dropped (the count itself: access_log.rs's tests).
        "ringside_access_log_dropped_total 0\n",
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

/// Every field of every access-log line kind, with its value: the HTTP lines of a static HTTP
/// listener (one request with the client's own request id and a W3C trace, one with neither: the
/// id the proxy added is the one the application saw) and the L4 line of a refused connection.
/// Fields a path does not know are `null`, never absent; identities need mesh mTLS and are
/// checked in pods_access_log.
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
    let t0 = std::time::Instant::now();
    let r = c
        .send(
            "POST",
            &format!("http://{listen}/echo"),
            &[
                (
                    "traceparent",
                    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                ),
                ("x-request-id", "client-chose-this-id"),
            ],
            b"twelve bytes".to_vec(),
        )
        .unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "twelve bytes"));
    let missing = c.get(&format!("http://{listen}/status/404")).unwrap();
    let took_ms = t0.elapsed().as_millis() as u64;
    assert_eq!(missing.status, 404);
    // The id the proxy added, as the application received it.
    let added_id = missing
        .text()
        .lines()
        .find_map(|l| l.strip_prefix("x-request-id: "))
        .unwrap()
        .to_string();
    assert_eq!(added_id.len(), 36, "{added_id}");
    drop(c);
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&http_log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{lines:?}");
    let rfc3339 = |v: &serde_json::Value| {
        let t = v["time"].as_str().unwrap();
        let parsed = humantime::parse_rfc3339(t).unwrap();
        let ms = parsed
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        t.len() == 24 && t.ends_with('Z') && ms == v["time_ms"].as_u64().unwrap()
    };
    // One keep-alive connection: both lines carry its id.
    let conn_id = lines[0]["conn_id"].as_u64().unwrap();
    let first = &lines[0];
    assert!(
        rfc3339(first),
        "RFC 3339 time agreeing with time_ms: {first}"
    );
    let client = first["client"].as_str().unwrap();
    assert!(client.starts_with("127.0.0.1:"), "{first}");
    assert!(first["duration_ms"].as_u64().unwrap() <= took_ms, "{first}");
    let want = serde_json::json!({
        "time": first["time"], "time_ms": first["time_ms"],
        "kind": "http", "conn_id": conn_id, "direction": "tunnel", "mesh": false,
        "client": client,
        // No TLS on this listener: no identity either side.
        "source_id": null, "destination_id": null, "peer_id": null,
        // A static listener: the client dialled the listener itself.
        "original_destination": null,
        "destination": "upstream", "service": "upstream", "route": "default",
        "upstream": app.addr.to_string(),
        "bytes_up": 12, "bytes_down": 12, "duration_ms": first["duration_ms"],
        "reason": null, "detail": null,
        "method": "POST", "path": "/echo", "status": 200,
        "request_id": "client-chose-this-id",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    });
    assert_eq!(first, &want);
    let second = &lines[1];
    assert!(rfc3339(second), "{second}");
    let want = serde_json::json!({
        "time": second["time"], "time_ms": second["time_ms"],
        "kind": "http", "conn_id": conn_id, "direction": "tunnel", "mesh": false,
        "client": client,
        "source_id": null, "destination_id": null, "peer_id": null,
        "original_destination": null,
        "destination": "upstream", "service": "upstream", "route": "default",
        "upstream": app.addr.to_string(),
        "bytes_up": 0, "bytes_down": missing.body.len(), "duration_ms": second["duration_ms"],
        // The app's 404 is not a proxy failure.
        "reason": null, "detail": null,
        "method": "GET", "path": "/status/404", "status": 404,
        "request_id": added_id, "trace_id": null,
    });
    assert_eq!(second, &want);

    // L4: a refused connection carries its reason; the HTTP fields are null.
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let refusing = refusing_addr();
    let mut child = spawn_forward(
        listen,
        &[refusing],
        &["--access-log", tcp_log.to_str().unwrap()],
    );
    let s = std::net::TcpStream::connect(listen).unwrap();
    let local = s.local_addr().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut b = [0u8; 1];
    let _ = std::io::Read::read(&mut &s, &mut b);
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let text = std::fs::read_to_string(&tcp_log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert!(rfc3339(&line), "{line}");
    // What decided it, as `/events` and the process log say it.
    let detail = line["detail"].as_str().unwrap();
    assert!(detail.contains("nothing listens"), "{detail}");
    let want = serde_json::json!({
        "time": line["time"], "time_ms": line["time_ms"],
        "kind": "tcp", "conn_id": line["conn_id"].as_u64().unwrap(), "direction": "tunnel",
        "mesh": false, "client": local.to_string(),
        "source_id": null, "destination_id": null, "peer_id": null,
        "original_destination": null,
        "destination": "upstream", "upstream": refusing.to_string(),
        "bytes_up": 0, "bytes_down": 0, "duration_ms": line["duration_ms"].as_u64().unwrap(),
        "reason": "upstream_connect_refused", "detail": detail,
        "service": null, "route": null, "method": null, "path": null, "status": null,
        "request_id": null, "trace_id": null,
    });
    assert_eq!(line, want);
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

/// Start `ringside forward LISTEN UPSTREAM EXTRA...` with its process log (stderr) in `log`.
fn forward_logging_to(
    listen: SocketAddr,
    upstream: SocketAddr,
    extra: &[&str],
    log: &std::path::Path,
) -> ChildGuard {
    let mut cmd = std::process::Command::new(workspace_bin("ringside"));
    cmd.arg("forward")
        .arg(listen.to_string())
        .arg(upstream.to_string())
        .args(extra)
        .stderr(std::fs::File::create(log).unwrap());
    let child = ChildGuard::spawn(&mut cmd);
    wait_for("ringside to listen", Duration::from_secs(10), || {
        listening_on(listen.port())
    });
    child
}

/// `--log-format json`: every line of the process log is a JSON object, and each connection's
/// lines carry its span (`conn`, with the id the access log gives as `conn_id` and the client),
/// at the default level, on the fast path (L4) and on the L7 path alike.
#[test]
fn json_process_log_names_each_connection() {
    let dir = std::env::temp_dir().join(format!("ringside-jsonlog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let refusing = refusing_addr();
    for (kind, extra) in [("tcp", &[][..]), ("http", &["--protocol", "http"][..])] {
        let (log, access) = (
            dir.join(format!("{kind}.log")),
            dir.join(format!("{kind}.access")),
        );
        let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut args = vec![
            "--log-format",
            "json",
            "--access-log",
            access.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let mut child = forward_logging_to(listen, refusing, &args, &log);
        // Three connections, each failing (a failure is logged at warn, inside the span).
        let mut clients = Vec::new();
        for _ in 0..3 {
            let mut s = std::net::TcpStream::connect(listen).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if kind == "http" {
                std::io::Write::write_all(&mut s, b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n").unwrap();
            }
            let mut b = [0u8; 512];
            let _ = std::io::Read::read(&mut s, &mut b);
            clients.push(s.local_addr().unwrap());
        }
        child.signal(libc::SIGTERM);
        assert!(child.wait_timeout(Duration::from_secs(20)).success());
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect();
        assert!(!lines.is_empty());
        let access: Vec<serde_json::Value> = std::fs::read_to_string(&access)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(access.len(), 3, "{kind}: {access:?}");
        for (a, client) in access.iter().zip(&clients) {
            assert_eq!(a["client"], client.to_string(), "{kind}: {a}");
            let id = a["conn_id"].as_u64().unwrap();
            let mine: Vec<&serde_json::Value> = lines
                .iter()
                .filter(|l| l["span"]["name"] == "conn" && l["span"]["id"].as_u64() == Some(id))
                .collect();
            assert!(
                !mine.is_empty(),
                "{kind}: no process-log line of connection {id}:\n{text}"
            );
            for l in &mine {
                assert_eq!(l["span"]["client"], client.to_string(), "{l}");
                assert!(l["timestamp"].is_string(), "{l}");
            }
            let failed = mine.iter().any(|l| {
                l["fields"]["reason"] == "upstream_connect_refused"
                    && l["fields"]["message"]
                        .as_str()
                        .is_some_and(|m| m.ends_with("failed"))
            });
            assert!(
                failed,
                "{kind}: connection {id}'s failure is not in its span:\n{text}"
            );
            if kind == "http" {
                assert!(mine.iter().all(|l| l["span"]["l7"] == true), "{mine:?}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Trace context through the L7 path: W3C `traceparent` and `tracestate`, B3 multi-header and
/// single-header reach the application byte for byte; the access log's `trace_id` is the W3C
/// trace id when there is one, else the B3 one (`x-b3-traceid`, else the single `b3` header).
#[test]
fn trace_headers_pass_through_unchanged_and_name_the_trace() {
    let dir = std::env::temp_dir().join(format!("ringside-trace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let app = serve("app", "127.0.0.1:0".parse().unwrap());
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut child = spawn_forward(
        listen,
        &[app.addr],
        &[
            "--protocol",
            "http",
            "--access-log",
            access.to_str().unwrap(),
        ],
    );
    let w3c = [
        (
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ),
        ("tracestate", "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"),
    ];
    let b3_multi = [
        ("x-b3-traceid", "80F198EE56343BA864FE8B2A57D3EFF7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-parentspanid", "05e3ac9a4f6e3b90"),
        ("x-b3-sampled", "1"),
    ];
    let b3_single = [("b3", "463ac35c9f6413ad-a2fb4a1d1a96d312-1-0020000000000001")];
    type Headers<'a> = Vec<(&'a str, &'a str)>;
    let cases: Vec<(Headers, Option<&str>)> = vec![
        // Both: W3C names the trace.
        (
            w3c.iter()
                .chain(&b3_multi)
                .chain(&b3_single)
                .copied()
                .collect(),
            Some("0af7651916cd43dd8448eb211c80319c"),
        ),
        (b3_multi.to_vec(), Some("80f198ee56343ba864fe8b2a57d3eff7")),
        (b3_single.to_vec(), Some("463ac35c9f6413ad")),
        // A malformed traceparent names no trace, and still passes unchanged.
        (vec![("traceparent", "not-a-trace")], None),
    ];
    let c = Client::new();
    for (headers, _) in &cases {
        let r = c
            .send(
                "GET",
                &format!("http://{listen}/headers"),
                headers,
                Vec::new(),
            )
            .unwrap();
        assert_eq!(r.status, 200);
        let seen = r.text();
        for (k, v) in headers {
            assert!(
                seen.lines().any(|l| l == format!("{k}: {v}")),
                "{k}: {v} did not reach the app unchanged; it saw:\n{seen}"
            );
        }
    }
    drop(c);
    child.signal(libc::SIGTERM);
    assert!(child.wait_timeout(Duration::from_secs(20)).success());
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(&access)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len(), "{lines:?}");
    for (line, (headers, want)) in lines.iter().zip(&cases) {
        assert_eq!(line["trace_id"].as_str(), *want, "{headers:?}: {line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
