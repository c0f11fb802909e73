//! The proxy stream (`GET /v1/proxy/stream`, upgraded) with real daemons: configurations come
//! down it as they change, reports go up it and are acknowledged, and it is attacked the way a
//! caller without the right would try: no token, a wrong one, no upgrade, a report for another
//! service, frames that are not reports, a frame without end; a revoked token's stream is closed
//! on the daemon that revoked it and (etcd) on every other daemon; an expired token's too.

use std::path::Path;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use ringside_core::control::api::ProxyReport;
use ringside_core::control::stream::{self as wire, Kind, ProxyStream};
use ringside_tests::ctl::Daemon;
use ringside_tests::etcd::Etcd;
use serde_json::Value;
use tokio::io::{AsyncWriteExt, BufReader};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn token(d: &Daemon, service: &str, extra: &[&str]) -> String {
    let (ok, out, err) = d.ringctl(&[&["token", "create", "--service", service], extra].concat());
    assert!(ok, "{err}");
    out.trim().to_string()
}

fn report(id: &str, service: &str, index: u64) -> ProxyReport {
    serde_json::from_value(serde_json::json!({
        "id": id,
        "service": service,
        "address": "198.18.7.1",
        "applied_index": index,
        "cert_generation": 0,
        "cert_not_after": 4_000_000_000i64,
    }))
    .unwrap()
}

/// The next frame within `within`.
async fn next(s: &mut ProxyStream, within: Duration) -> anyhow::Result<(Kind, Value)> {
    let (kind, json) = tokio::time::timeout(within, s.next())
        .await
        .map_err(|_| anyhow::anyhow!("no frame within {within:?}"))??;
    Ok((kind, serde_json::from_slice(&json)?))
}

/// Ask for a stream by hand: the status and, when upgraded, the raw connection.
async fn raw_open(
    socket: &Path,
    token: Option<&str>,
    upgrade: bool,
) -> (
    u16,
    String,
    Option<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>,
) {
    let conn = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(conn))
            .await
            .unwrap();
    tokio::spawn(conn.with_upgrades());
    let mut req = hyper::Request::builder()
        .uri(wire::PATH)
        .header(hyper::header::HOST, "ringctl");
    if let Some(t) = token {
        req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    if upgrade {
        req = req
            .header(hyper::header::CONNECTION, "upgrade")
            .header(hyper::header::UPGRADE, wire::PROTOCOL);
    }
    let mut resp = sender
        .send_request(req.body(Full::new(Bytes::new())).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    if status != 101 {
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        return (status, String::from_utf8_lossy(&body).into_owned(), None);
    }
    let up = hyper::upgrade::on(&mut resp).await.unwrap();
    (
        status,
        String::new(),
        Some(hyper_util::rt::TokioIo::new(up)),
    )
}

/// Send `bytes` on a fresh stream and read until the daemon closes it: the error it gave.
async fn closed_with(socket: &Path, token: &str, bytes: &[u8]) -> String {
    let (status, body, io) = raw_open(socket, Some(token), true).await;
    assert_eq!(status, 101, "{body}");
    let (rd, mut wr) = tokio::io::split(io.unwrap());
    let mut rd = BufReader::new(rd);
    // Whatever is sent, the daemon may close before it has all of it.
    let _ = wr.write_all(bytes).await;
    let mut line = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        line.clear();
        let left = deadline.saturating_duration_since(Instant::now());
        let r = tokio::time::timeout(left, wire::read_line(&mut rd, &mut line, 16 << 20))
            .await
            .expect("the daemon did not close the stream within 10 s");
        match r {
            Ok(true) => {
                let (kind, json) = wire::parse(&line).unwrap();
                if kind == Kind::Error {
                    let v: Value = serde_json::from_slice(json).unwrap();
                    // And then the end of the stream.
                    line.clear();
                    let end = tokio::time::timeout(
                        Duration::from_secs(5),
                        wire::read_line(&mut rd, &mut line, 16 << 20),
                    )
                    .await
                    .expect("the stream stays open after its error frame");
                    assert!(!matches!(end, Ok(true)), "a frame after the error frame");
                    return v["error"].as_str().unwrap().to_string();
                }
            }
            Ok(false) | Err(_) => panic!("closed without an error frame"),
        }
    }
}

#[test]
fn a_stream_carries_configurations_down_and_reports_up() {
    let d = Daemon::start(
        &format!("ringside-stream-carry-{}", std::process::id()),
        &[],
    );
    let t = token(&d, "web", &[]);
    let acked = rt().block_on(async {
        let mut s = ProxyStream::open(&d.proxy_socket, &t, 0, "").await.unwrap();
        // A proxy with nothing is sent the configuration at once, with the catalog.
        let (kind, first) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(kind, Kind::Config);
        assert_eq!(first["service"], "web");
        assert!(first.get("catalog_omitted").is_none(), "{first}");
        let index = first["index"].as_u64().unwrap();
        s.report(&report("web-stream-1", "web", index))
            .await
            .unwrap();
        let (kind, ack) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!((kind, &ack["ok"]), (Kind::Ack, &Value::Bool(true)));

        // A change: sent down the stream without being asked, without the catalog (unchanged).
        let applied = Instant::now();
        d.apply(
            "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: web
spec:
  destination:
    name: web
  sources:
    - name: api
      action: allow
",
        );
        let (kind, second) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        let took = applied.elapsed();
        assert_eq!(kind, Kind::Config);
        assert!(second["index"].as_u64().unwrap() > index, "{second}");
        assert_eq!(second["catalog_omitted"], true, "{second}");
        assert_eq!(second["catalog_digest"], first["catalog_digest"]);
        assert!(second["intentions"].to_string().contains("api"), "{second}");
        eprintln!("a change reached the stream {took:?} after `ringctl apply` began");
        let new = second["index"].as_u64().unwrap();
        s.report(&report("web-stream-1", "web", new)).await.unwrap();
        let (kind, _) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(kind, Kind::Ack);
        new
    });
    // The acknowledgement is the proxy's record.
    let proxies = d.get_json("proxies");
    let me = proxies
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["id"] == "web-stream-1")
        .unwrap_or_else(|| panic!("no web-stream-1 in {proxies}"))
        .clone();
    assert_eq!(me["service"], "web");
    assert_eq!(me["applied_index"].as_u64(), Some(acked), "{me}");
}

#[test]
fn a_stream_pings_and_a_silent_proxy_is_closed() {
    // A 2 s lease: pings every second; a proxy that answers none is closed after four.
    let d = Daemon::start(
        &format!("ringside-stream-ping-{}", std::process::id()),
        &["--lease-ttl", "2s"],
    );
    let t = token(&d, "web", &[]);
    rt().block_on(async {
        let mut s = ProxyStream::open(&d.proxy_socket, &t, 0, "").await.unwrap();
        let (kind, _) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(kind, Kind::Config);
        let (kind, _) = next(&mut s, Duration::from_secs(3)).await.unwrap();
        assert_eq!(kind, Kind::Ping);
        let started = Instant::now();
        let end = loop {
            match next(&mut s, Duration::from_secs(10)).await {
                Ok((Kind::Ping, _)) => continue,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(end.contains("no report for"), "{end}");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(2) && took < Duration::from_secs(8),
            "closed after {took:?}"
        );
    });
}

#[test]
fn a_stream_refuses_what_a_proxy_may_not_send() {
    let d = Daemon::start(
        &format!("ringside-stream-refuse-{}", std::process::id()),
        &[],
    );
    let web = token(&d, "web", &[]);
    let sock = d.proxy_socket.clone();
    rt().block_on(async {
        // No token, a wrong one, no upgrade asked for: no stream.
        let (status, body, _) = raw_open(&sock, None, true).await;
        assert_eq!(status, 401, "{body}");
        let (status, body, _) = raw_open(&sock, Some(&"0".repeat(64)), true).await;
        assert_eq!(status, 403, "{body}");
        assert!(body.contains("unknown token"), "{body}");
        let (status, body, _) = raw_open(&sock, Some(&web), false).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("Upgrade: ringside-proxy/1"), "{body}");

        // A report for another service: refused, the stream closed, nothing recorded.
        let other = serde_json::to_string(&report("db-1", "db", 1)).unwrap();
        let why = closed_with(&sock, &web, format!("report {other}\n").as_bytes()).await;
        assert!(why.contains("token is for service 'web'"), "{why}");
        // Frames a proxy does not send, and what is not a frame.
        let why = closed_with(&sock, &web, b"config {\"index\":99}\n").await;
        assert!(why.contains("report frames only"), "{why}");
        let why = closed_with(&sock, &web, b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(why.contains("unknown frame"), "{why}");
        let why = closed_with(&sock, &web, b"report {\"id\": 7\n").await;
        assert!(why.contains("the report cannot be read"), "{why}");
        // A frame without end: closed at the limit, not buffered without bound.
        let endless = vec![b'x'; wire::MAX_PROXY_FRAME + 4096];
        let mut frame = b"report ".to_vec();
        frame.extend_from_slice(&endless);
        let why = closed_with(&sock, &web, &frame).await;
        assert!(why.contains("longer than"), "{why}");
    });
    let proxies = d.get_json("proxies").to_string();
    assert!(!proxies.contains("db-1"), "{proxies}");
    // The daemon still serves.
    let ok = rt().block_on(async {
        let mut s = ProxyStream::open(&sock, &web, 0, "").await.unwrap();
        next(&mut s, Duration::from_secs(5)).await.unwrap().0
    });
    assert_eq!(ok, Kind::Config);
}

/// Open a stream, take its first configuration, then wait for it to be closed: the reason.
fn closed_stream(socket: &Path, token: &str, close: impl FnOnce(), within: Duration) -> String {
    rt().block_on(async {
        let mut s = ProxyStream::open(socket, token, 0, "").await.unwrap();
        let (kind, _) = next(&mut s, Duration::from_secs(5)).await.unwrap();
        assert_eq!(kind, Kind::Config);
        close();
        let started = Instant::now();
        loop {
            match next(&mut s, within).await {
                Ok((Kind::Ping | Kind::Config, _)) => continue,
                Ok(other) => panic!("unexpected {other:?}"),
                Err(e) => {
                    let took = started.elapsed();
                    assert!(took < within, "closed after {took:?}");
                    return e.to_string();
                }
            }
        }
    })
}

#[test]
fn revoked_and_expired_tokens_lose_their_streams() {
    let d = Daemon::start(
        &format!("ringside-stream-revoke-{}", std::process::id()),
        &[],
    );
    let (ok, out, err) = d.ringctl(&["token", "create", "--service", "web"]);
    assert!(ok, "{err}");
    let t = out.trim().to_string();
    let id = err.split_whitespace().nth(1).unwrap().to_string();
    let why = closed_stream(
        &d.proxy_socket,
        &t,
        || {
            d.ok(&["token", "revoke", &id]);
        },
        Duration::from_secs(2),
    );
    assert!(why.contains("was revoked"), "{why}");
    // And it cannot open another.
    let again = rt().block_on(ProxyStream::open(&d.proxy_socket, &t, 0, ""));
    let e = format!("{:#}", again.unwrap_err());
    assert!(e.contains("403") && e.contains("unknown token"), "{e}");

    let short = token(&d, "web", &["--ttl", "3s"]);
    let why = closed_stream(&d.proxy_socket, &short, || {}, Duration::from_secs(6));
    assert!(why.contains("expired"), "{why}");
}

#[test]
fn a_token_revoked_on_one_daemon_closes_its_streams_on_another() {
    let etcd = Etcd::start();
    let url = etcd.url();
    let secret = etcd.ca_secret();
    let args = ["--store", &url, "--ca-secret", secret.to_str().unwrap()];
    let a = Daemon::start(
        &format!("ringside-stream-etcd-a-{}", std::process::id()),
        &args,
    );
    let b = Daemon::start(
        &format!("ringside-stream-etcd-b-{}", std::process::id()),
        &args,
    );
    let (ok, out, err) = a.ringctl(&["token", "create", "--service", "web"]);
    assert!(ok, "{err}");
    let t = out.trim().to_string();
    let id = err.split_whitespace().nth(1).unwrap().to_string();
    let why = closed_stream(
        &a.proxy_socket,
        &t,
        || {
            b.ok(&["token", "revoke", &id]);
        },
        Duration::from_secs(2),
    );
    assert!(why.contains("was revoked"), "{why}");
}

/// Anyone may connect to the proxy socket: connections that hold it without sending a request
/// (more than the daemon serves at once) delay a proxy by at most about a second, never keep it
/// out.
#[test]
fn idle_connections_do_not_keep_proxies_out() {
    let d = Daemon::start(&format!("ringside-stream-idle-{}", std::process::id()), &[]);
    let t = token(&d, "web", &[]);
    let idle: Vec<std::os::unix::net::UnixStream> = (0..300)
        .map(|_| std::os::unix::net::UnixStream::connect(&d.proxy_socket).unwrap())
        .collect();
    let started = Instant::now();
    let kind = rt().block_on(async {
        let mut s = ProxyStream::open(&d.proxy_socket, &t, 0, "").await.unwrap();
        next(&mut s, Duration::from_secs(5)).await.unwrap().0
    });
    let took = started.elapsed();
    assert_eq!(kind, Kind::Config);
    assert!(took < Duration::from_secs(4), "the proxy waited {took:?}");
    eprintln!("a proxy behind 300 idle connections had its stream after {took:?}");
    drop(idle);
}
