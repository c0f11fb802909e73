//! The L7 path as a standalone reverse proxy (`ringside forward --protocol http`), against real
//! HTTP servers: headers set, bodies exact, keep-alive, retries on connect failure and on chosen
//! statuses, request timeouts, local replies that name the reason, HTTP/2 from the client, and a
//! peer that does not speak HTTP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use std::sync::atomic::Ordering;

use ringside_tests::http::{serve, serve_status, Client};
use ringside_tests::*;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

fn proxy(upstreams: &[SocketAddr], extra: &[&str]) -> (ChildGuard, String) {
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut args = vec!["--workers", "1", "--stats-interval", "1s"];
    if !extra.contains(&"--protocol") {
        args.extend_from_slice(&["--protocol", "http"]);
    }
    args.extend_from_slice(extra);
    let child = spawn_forward(listen, upstreams, &args);
    (child, format!("http://{listen}"))
}

fn stop(mut child: ChildGuard) {
    child.signal(libc::SIGTERM);
    let st = child.wait_timeout(Duration::from_secs(20));
    assert!(st.success(), "{st}");
}

#[test]
fn proxies_requests_with_headers_bodies_and_keepalive() {
    let a = serve("a", any());
    let b = serve("b", any());
    let (child, url) = proxy(&[a.addr, b.addr], &[]);
    let c = Client::new();
    let mut ids = std::collections::HashSet::new();
    for i in 0..20 {
        let r = c
            .send(
                "GET",
                &format!("{url}/hello"),
                &[
                    ("host", "products.example"),
                    ("x-forwarded-for", "10.9.9.9"),
                ],
                Vec::new(),
            )
            .unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let t = r.text();
        assert!(t.contains("host: products.example"), "{t}");
        assert!(
            t.contains("x-forwarded-for: 10.9.9.9, 127.0.0.1"),
            "the client address is appended: {t}"
        );
        let id = t
            .lines()
            .find_map(|l| l.strip_prefix("x-request-id: "))
            .unwrap()
            .to_string();
        assert!(id.len() >= 32, "a request id is set: {t}");
        assert!(ids.insert(id), "request ids are unique (request {i})");
    }
    // A request id the client set is kept.
    let r = c
        .send(
            "GET",
            &format!("{url}/x"),
            &[("x-request-id", "abc-123")],
            Vec::new(),
        )
        .unwrap();
    assert!(r.text().contains("x-request-id: abc-123"));
    // Round-robin over both servers.
    assert!(a.hits.load(Ordering::SeqCst) >= 10);
    assert!(b.hits.load(Ordering::SeqCst) >= 10);
    // Bodies: small (kept for retries) and large (streamed), exact.
    for len in [0usize, 1, 70_000, 3 << 20] {
        let body: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        let r = c
            .send("POST", &format!("{url}/echo"), &[], body.clone())
            .unwrap();
        assert_eq!(r.status, 200);
        assert!(
            r.body.as_ref() == body.as_slice(),
            "echo of {len} bytes differs"
        );
    }
    // HTTP/2 from the client (prior knowledge), HTTP/1.1 to the upstream.
    let h2 = Client::with_h2(true);
    let r = h2.get(&format!("{url}/h2")).unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    // A drain closes idle keep-alive connections at once (an HTTP/2 client must be running to
    // answer the GOAWAY's ping: this one is not, so it goes first).
    drop(h2);
    let t = Instant::now();
    stop(child);
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        t.elapsed()
    );
}

#[test]
fn retries_connect_failures_and_chosen_statuses() {
    let good = serve("good", any());
    let refusing = refusing_addr();
    let (child, url) = proxy(&[refusing, good.addr], &[]);
    let c = Client::new();
    for _ in 0..10 {
        let r = c.get(&format!("{url}/x")).unwrap();
        assert_eq!(
            r.status, 200,
            "a refused endpoint is retried on the other: {r:?}"
        );
        assert_eq!(r.header("x-server"), "good");
    }
    drop(child);

    // 503 from one endpoint: retried on the other when asked, passed through when not.
    let flaky = serve_status("flaky", any(), 503);
    let (child, url) = proxy(&[flaky.addr, good.addr], &["--retry-on", "503"]);
    for _ in 0..10 {
        let r = c.get(&format!("{url}/x")).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-server"), "good");
    }
    assert!(
        flaky.hits.load(Ordering::SeqCst) >= 4,
        "first tries reached the flaky endpoint"
    );
    drop(child);
    let (child, url) = proxy(&[flaky.addr, good.addr], &[]);
    let failed = (0..10)
        .filter(|_| c.get(&format!("{url}/x")).unwrap().status == 503)
        .count();
    assert!(
        (3..=7).contains(&failed),
        "without --retry-on a 503 is the answer: {failed}"
    );
    drop(child);

    // Every endpoint answers 503: the retries are bounded and the last answer is returned.
    let (child, url) = proxy(&[flaky.addr], &["--retry-on", "503", "--retries", "2"]);
    let before = flaky.hits.load(Ordering::SeqCst);
    let r = c.get(&format!("{url}/x")).unwrap();
    assert_eq!(r.status, 503);
    assert_eq!(
        flaky.hits.load(Ordering::SeqCst) - before,
        3,
        "one try and two retries"
    );
    drop(child);
}

#[test]
fn local_replies_name_the_reason() {
    // Nothing listens: 502 upstream_connect_refused, with a line that says what to check.
    let (child, url) = proxy(&[refusing_addr()], &["--retries", "1"]);
    let c = Client::new();
    let r = c.get(&format!("{url}/x")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-ringside-reason"), "upstream_connect_refused");
    assert!(
        r.text().starts_with("ringside: upstream_connect_refused:") && r.text().contains("check"),
        "{}",
        r.text()
    );
    drop(child);

    // A slow upstream: 504 upstream_request_timeout once the request timeout passes.
    let slow = serve("slow", any());
    let (child, url) = proxy(&[slow.addr], &["--request-timeout", "300ms"]);
    let t = Instant::now();
    let r = c.get(&format!("{url}/slow/3000")).unwrap();
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{r:?}");
    assert_eq!(r.header("x-ringside-reason"), "upstream_request_timeout");
    assert!(
        took >= Duration::from_millis(280) && took < Duration::from_millis(2000),
        "the timeout fired after {took:?}"
    );
    // Others on the same proxy still pass.
    assert_eq!(c.get(&format!("{url}/slow/10")).unwrap().status, 200);
    drop(child);

    // A peer that does not speak HTTP: protocol_mismatch.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let not_http = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let _ = std::io::Write::write_all(&mut s, b"SSH-2.0-OpenSSH_9.2\r\n");
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let (child, url) = proxy(&[not_http], &["--retries", "0"]);
    let r = c.get(&format!("{url}/x")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.header("x-ringside-reason"),
        "protocol_mismatch",
        "{}",
        r.text()
    );
    assert!(r.text().contains("declare it tcp"), "{}", r.text());
    drop(child);
}

#[test]
fn circuit_opens_on_5xx_half_opens_and_closes() {
    let good = serve("good", any());
    let flaky = serve_status("flaky", any(), 500);
    let (child, url) = proxy(
        &[good.addr, flaky.addr],
        &[
            "--outlier-5xx",
            "3",
            "--base-ejection",
            "400ms",
            "--retries",
            "0",
        ],
    );
    let c = Client::new();
    // Closed: round-robin, the flaky endpoint's 500s pass through until three in a row.
    let mut fails = 0;
    for _ in 0..6 {
        if c.get(&format!("{url}/x")).unwrap().status == 500 {
            fails += 1;
        }
    }
    assert_eq!(fails, 3, "three 5xx in a row open the circuit");
    // Open: nothing reaches the flaky endpoint.
    let hits = flaky.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(c.get(&format!("{url}/x")).unwrap().status, 200);
    }
    assert_eq!(
        flaky.hits.load(Ordering::SeqCst),
        hits,
        "open: no request to the ejected endpoint"
    );
    // Half-open after the ejection: one trial; it fails, the circuit opens again (800 ms now).
    std::thread::sleep(Duration::from_millis(450));
    let statuses: Vec<u16> = (0..6)
        .map(|_| c.get(&format!("{url}/x")).unwrap().status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|&&s| s == 500).count(),
        1,
        "one trial: {statuses:?}"
    );
    assert_eq!(flaky.hits.load(Ordering::SeqCst), hits + 1);
    // The endpoint recovers; after the longer ejection its trial succeeds and it is closed again.
    flaky.status.store(0, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(850));
    let before = flaky.hits.load(Ordering::SeqCst);
    for _ in 0..10 {
        assert_eq!(c.get(&format!("{url}/x")).unwrap().status, 200);
    }
    let after = flaky.hits.load(Ordering::SeqCst) - before;
    assert!(
        (4..=6).contains(&after),
        "closed: its share again ({after} of 10)"
    );
    drop(child);
}

#[test]
fn max_requests_answers_circuit_open() {
    let slow = serve("slow", any());
    let (child, url) = proxy(&[slow.addr], &["--max-requests", "2"]);
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let u = format!("{url}/slow/600");
            std::thread::spawn(move || Client::new().get(&u).unwrap())
        })
        .collect();
    let got: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ok = got.iter().filter(|r| r.status == 200).count();
    let open: Vec<_> = got.iter().filter(|r| r.status == 503).collect();
    assert_eq!(ok, 2, "{got:?}");
    assert_eq!(open.len(), 2, "{got:?}");
    assert!(open
        .iter()
        .all(|r| r.header("x-ringside-reason") == "circuit_open"));
    // The limit frees up as requests end.
    assert_eq!(
        Client::new().get(&format!("{url}/slow/1")).unwrap().status,
        200
    );
    drop(child);
}

#[test]
fn upgrades_pass_through_and_http2_upstreams_carry_trailers() {
    // An upgrade (as WebSocket): 101 through the proxy, then raw bytes both ways.
    let server = serve("ws", any());
    let (child, url) = proxy(&[server.addr], &[]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let echoed = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let addr = url.trim_start_matches("http://").to_string();
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                .await
                .unwrap();
        tokio::spawn(conn.with_upgrades());
        let req = hyper::Request::builder()
            .uri("/chat")
            .header("host", "ws.example")
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .body(http_body_util::Empty::<hyper::body::Bytes>::new())
            .unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 101);
        let up = hyper::upgrade::on(resp).await.unwrap();
        let mut io = hyper_util::rt::TokioIo::new(up);
        io.write_all(b"hello over the upgrade").await.unwrap();
        let mut buf = vec![0u8; 22];
        tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf
    });
    assert_eq!(&echoed, b"hello over the upgrade");
    drop(child);

    // HTTP/2 to the upstream (prior knowledge), trailers passed to an HTTP/2 client.
    let (child, url) = proxy(&[server.addr], &["--protocol", "http2"]);
    let h2 = Client::with_h2(true);
    for _ in 0..3 {
        let r = h2.get(&format!("{url}/grpc")).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        let t = r.trailers.clone().unwrap_or_default();
        assert_eq!(
            t.get("grpc-status").map(|v| v.to_str().unwrap()),
            Some("0"),
            "{r:?}"
        );
        assert_eq!(&r.body[..], b"\0\0\0\0\x05hello");
    }
    drop(h2);
    drop(child);
}

#[test]
fn http_tunnel_pair_over_mtls() {
    use ringside_tests::certs::{temp_dir, Ca, Files, Validity};
    let dir = temp_dir("l7-tunnel");
    let ca = Ca::new("l7 tunnel CA");
    let client = Files::write(
        &dir,
        "frontend",
        &ca.leaf("spiffe://dc1/ns/default/sa/frontend", Validity::Valid),
        &[&ca],
    );
    let server = Files::write(
        &dir,
        "backend",
        &ca.leaf("spiffe://dc1/ns/default/sa/backend", Validity::Valid),
        &[&ca],
    );
    let app = serve("app", any());
    let tls_args = |f: &ringside_tests::certs::Files| {
        let t = f.tls_files();
        vec![
            "--cert".to_string(),
            t.cert.display().to_string(),
            "--key".to_string(),
            t.key.display().to_string(),
            "--ca".to_string(),
            t.ca.display().to_string(),
        ]
    };
    let mut term_args: Vec<String> = vec![
        "--tls-terminate".into(),
        "--allow-id".into(),
        "spiffe://dc1/ns/default/sa/frontend".into(),
    ];
    term_args.extend(tls_args(&server));
    let term_args: Vec<&str> = term_args.iter().map(String::as_str).collect();
    let (term, term_url) = proxy(&[app.addr], &term_args);
    let term_addr: SocketAddr = term_url.trim_start_matches("http://").parse().unwrap();
    let mut orig_args: Vec<String> = vec![
        "--tls-origin".into(),
        "--expect-id".into(),
        "spiffe://dc1/ns/default/sa/backend".into(),
    ];
    orig_args.extend(tls_args(&client));
    let orig_args: Vec<&str> = orig_args.iter().map(String::as_str).collect();
    let (orig, url) = proxy(&[term_addr], &orig_args);
    let c = Client::new();
    for _ in 0..5 {
        let r = c.get(&format!("{url}/hello")).unwrap();
        assert_eq!(r.status, 200, "{r:?}");
        assert_eq!(r.header("x-server"), "app");
    }
    let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let r = c
        .send("POST", &format!("{url}/echo"), &[], body.clone())
        .unwrap();
    assert!(r.body.as_ref() == body.as_slice());
    drop(orig);

    // An origin expecting another identity: the handshake fails and the request is answered
    // with the reason.
    let mut wrong: Vec<String> = vec![
        "--tls-origin".into(),
        "--expect-id".into(),
        "spiffe://dc1/ns/default/sa/other".into(),
    ];
    wrong.extend(tls_args(&client));
    let wrong: Vec<&str> = wrong.iter().map(String::as_str).collect();
    let (w, url) = proxy(&[term_addr], &wrong);
    let r = c.get(&format!("{url}/hello")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(
        r.header("x-ringside-reason"),
        "tls_identity_mismatch",
        "{}",
        r.text()
    );
    drop(w);
    drop(term);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A client that does not speak HTTP to an HTTP listener is a counted, explained failure
/// (`protocol_mismatch`), not a silent close; and an identity header a client sends never
/// reaches the upstream.
#[test]
fn a_client_that_is_not_http_is_reported_and_identity_headers_are_dropped() {
    use std::io::{Read, Write};
    let a = serve("a", any());
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (child, url) = proxy(&[a.addr], &["--admin", &admin.to_string()]);
    let c = Client::new();
    let r = c
        .send(
            "GET",
            &format!("{url}/who"),
            &[(
                "x-forwarded-client-cert",
                "URI=spiffe://dc1/ns/default/sa/admin",
            )],
            Vec::new(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("x-forwarded-client-cert: \n"),
        "a forged identity reached the upstream: {}",
        r.text()
    );
    // A PostgreSQL client's first message (SSLRequest), pointed at the HTTP listener.
    let listen: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let mut s = std::net::TcpStream::connect(listen).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let mut b = Vec::new();
    let _ = s.read_to_end(&mut b);
    let key = "ringside_failures_total{reason=\"protocol_mismatch\"} 1";
    wait_for("protocol_mismatch counted", Duration::from_secs(5), || {
        c.get(&format!("http://{admin}/stats"))
            .is_ok_and(|r| r.text().contains(key))
    });
    // The event is recorded just after the count: waited for too.
    let mut events = String::new();
    wait_for(
        "protocol_mismatch at /events",
        Duration::from_secs(5),
        || {
            events = c.get(&format!("http://{admin}/events")).unwrap().text();
            events.contains("protocol_mismatch")
        },
    );
    assert!(events.contains("not an HTTP request"), "{events}");
    stop(child);
}

/// Every try of a request answered a status the retries are for: the client gets the upstream's
/// last answer (its status and body) marked `x-ringside-reason: retries_exhausted`, after one
/// try and `--retries` retries, and the proxy counts and reports it. A status the retries are not
/// for is the upstream's answer, unmarked and tried once.
#[test]
fn status_retries_run_out_as_retries_exhausted() {
    let up = serve("up", any());
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let (child, url) = proxy(
        &[up.addr],
        &[
            "--retry-on",
            "503",
            "--retries",
            "3",
            "--admin",
            &admin.to_string(),
        ],
    );
    let c = Client::new();
    let before = up.hits.load(Ordering::SeqCst);
    let r = c.get(&format!("{url}/status/503")).unwrap();
    assert_eq!(r.status, 503, "{r:?}");
    assert_eq!(r.header("x-ringside-reason"), "retries_exhausted", "{r:?}");
    assert_eq!(r.header("x-server"), "up", "the upstream's own answer");
    assert!(r.text().contains("server: up"), "{}", r.text());
    assert_eq!(
        up.hits.load(Ordering::SeqCst) - before,
        4,
        "one try and three retries"
    );
    let key = "ringside_failures_total{reason=\"retries_exhausted\"} 1";
    wait_for("retries_exhausted counted", Duration::from_secs(5), || {
        c.get(&format!("http://{admin}/stats"))
            .is_ok_and(|r| r.text().contains(key))
    });
    let events = c.get(&format!("http://{admin}/events")).unwrap().text();
    assert!(
        events.contains("retries_exhausted")
            && events.contains("3 retries; the last attempt answered 503"),
        "{events}"
    );

    // 502 is not retried here: the upstream's answer as it is, after one try.
    let before = up.hits.load(Ordering::SeqCst);
    let r = c.get(&format!("{url}/status/502")).unwrap();
    assert_eq!(r.status, 502, "{r:?}");
    assert_eq!(r.header("x-ringside-reason"), "", "{r:?}");
    assert_eq!(up.hits.load(Ordering::SeqCst) - before, 1);
    stop(child);
}

/// A tunnel end that terminates mesh mTLS for HTTP (`--tls-terminate --protocol http`) replaces
/// the identity headers the caller sent with the identity it verified: a forged
/// `x-forwarded-client-cert` (in any case, repeated) never reaches the app as sent. The caller's
/// bytes pass an L4 origin end unchanged, so the terminate end is the one that must replace them.
#[test]
fn a_tunnel_terminate_end_replaces_forged_identity_headers() {
    use ringside_tests::certs::{temp_dir, Ca, Files, Validity};
    use std::io::{Read, Write};
    let dir = temp_dir("l7-tunnel-xfcc");
    let ca = Ca::new("l7 tunnel xfcc CA");
    let client = Files::write(
        &dir,
        "frontend",
        &ca.leaf("spiffe://dc1/ns/default/sa/frontend", Validity::Valid),
        &[&ca],
    );
    let server = Files::write(
        &dir,
        "backend",
        &ca.leaf("spiffe://dc1/ns/default/sa/backend", Validity::Valid),
        &[&ca],
    );
    let app = serve("app", any());
    let tls_args = |f: &Files| {
        let t = f.tls_files();
        vec![
            "--cert".to_string(),
            t.cert.display().to_string(),
            "--key".to_string(),
            t.key.display().to_string(),
            "--ca".to_string(),
            t.ca.display().to_string(),
        ]
    };
    let mut term_args: Vec<String> = vec!["--tls-terminate".into()];
    term_args.extend(tls_args(&server));
    let term_args: Vec<&str> = term_args.iter().map(String::as_str).collect();
    let (term, term_url) = proxy(&[app.addr], &term_args);
    let term_addr: SocketAddr = term_url.trim_start_matches("http://").parse().unwrap();
    let mut orig_args: Vec<String> = vec![
        "--protocol".into(),
        "tcp".into(),
        "--tls-origin".into(),
        "--expect-id".into(),
        "spiffe://dc1/ns/default/sa/backend".into(),
    ];
    orig_args.extend(tls_args(&client));
    let orig_args: Vec<&str> = orig_args.iter().map(String::as_str).collect();
    let (orig, url) = proxy(&[term_addr], &orig_args);
    let orig_addr: SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let served = app.hits.load(Ordering::SeqCst);
    for forged in [
        "x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/admin\r\n",
        "X-Forwarded-Client-Cert: URI=spiffe://dc1/ns/default/sa/admin\r\n",
        "x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/admin\r\nx-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/root\r\n",
    ] {
        let mut s = connect_retry(orig_addr, Duration::from_secs(5));
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /who HTTP/1.1\r\nhost: backend\r\n{forged}connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        let r = String::from_utf8_lossy(&out);
        assert!(r.starts_with("HTTP/1.1 200"), "{forged}: {r}");
        assert!(
            r.contains("x-forwarded-client-cert: URI=spiffe://dc1/ns/default/sa/frontend\n")
                && !r.contains("sa/admin")
                && !r.contains("sa/root"),
            "the forged identity reached the app ({forged}): {r}"
        );
    }
    assert_eq!(app.hits.load(Ordering::SeqCst) - served, 3);
    drop(orig);
    drop(term);
    let _ = std::fs::remove_dir_all(&dir);
}
