//! The access log between sidecars in pods, over mesh mTLS: every field of the L4 and HTTP lines
//! at the caller's sidecar (outbound) and at the destination's (inbound), with its value: who
//! called and who was called (SPIFFE IDs: on inbound the verified caller and the sidecar's own
//! identity, on outbound the sidecar's own and the identity the upstream proved), the address the
//! app dialled as the kernel reported it, the endpoint chosen, bytes each way, the request id and
//! the trace. Needs root.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ringside_tests::certs::{sidecar_mtls, Ca};
use ringside_tests::http::{serve, Client};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar, PROXY_UID};

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The access log's lines of `kind`.
fn lines(path: &Path, kind: &str) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|l| l["kind"] == kind)
        .collect()
}

/// `line` with the fields whose value the test cannot know (times, ids, client ports) checked for
/// their form and replaced by what `want` says, so that the rest compares as a whole.
fn settle(line: &serde_json::Value, want: &mut serde_json::Value) {
    let t = line["time"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(t).is_ok() && t.ends_with('Z'),
        "{line}"
    );
    assert!(line["time_ms"].as_u64().unwrap() > 0, "{line}");
    assert!(line["conn_id"].is_u64(), "{line}");
    assert!(line["duration_ms"].as_u64().unwrap() < 30_000, "{line}");
    for k in ["time", "time_ms", "conn_id", "duration_ms"] {
        want[k] = line[k].clone();
    }
}

#[test]
fn access_log_names_identities_addresses_and_bytes_both_ways() {
    if !pods_available("access_log_names_identities_addresses_and_bytes_both_ways") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let prod = net.pod("prod");
    let webp = net.pod("webp");
    let dir = Dir(std::env::temp_dir().join(format!("{}-alog", net.id)));
    std::fs::create_dir_all(&dir.0).unwrap();
    std::os::unix::fs::chown(&dir.0, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
    let ca = Ca::new("access log test CA");
    for p in [&front, &prod, &webp] {
        p.install_redirect(&[]);
    }
    let _echo = prod.echo_app("127.0.0.1:8080".parse().unwrap());
    let web = webp.enter(|| serve("web-app", "127.0.0.1:8081".parse().unwrap()));
    let _web = web.join().unwrap();
    let log = |p: &Pod| dir.0.join(format!("{}.access", p.name));
    let start = |pod: &Pod, yaml: String| {
        Sidecar::start_with(pod, &yaml, &["--access-log", log(pod).to_str().unwrap()])
    };
    let services = format!(
        "services:\n  - name: products\n    port: 9090\n    endpoints: [\"{}\"]\n  - name: web\n    port: 9091\n    protocol: http\n    endpoints: [\"{}\"]\n",
        prod.addr4(9090),
        webp.addr4(9091)
    );
    let s_front = start(
        &front,
        format!("{}{services}", sidecar_mtls(&ca, &dir.0, "frontend")),
    );
    let s_prod = start(
        &prod,
        format!(
            "{}services:\n  - name: products\n    port: 9090\n    target_port: 8080\n    local: true\nintentions:\n  default: deny\n  rules:\n    - source: frontend\n      destination: products\n      action: allow\n",
            sidecar_mtls(&ca, &dir.0, "products")
        ),
    );
    let s_web = start(
        &webp,
        format!(
            "{}services:\n  - name: web\n    port: 9091\n    target_port: 8081\n    protocol: http\n    local: true\nintentions:\n  default: deny\n  rules:\n    - source: frontend\n      destination: web\n      action: allow\n",
            sidecar_mtls(&ca, &dir.0, "web")
        ),
    );

    // L4: 3,000 bytes up, echoed back.
    let to = prod.addr4(9090);
    let app_side: SocketAddr = front
        .enter(move || {
            let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(&[7u8; 3000]).unwrap();
            s.shutdown(Shutdown::Write).unwrap();
            let mut back = Vec::new();
            s.read_to_end(&mut back).unwrap();
            assert_eq!(back.len(), 3000);
            s.local_addr().unwrap()
        })
        .join()
        .unwrap();
    // HTTP: a POST with a body and a W3C trace, without a request id (the caller's sidecar adds
    // one, and both sidecars log it).
    let url = format!("http://{}:9091/echo", webp.ip4);
    let got = front
        .enter(move || {
            Client::new()
                .send(
                    "POST",
                    &url,
                    &[(
                        "traceparent",
                        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    )],
                    b"seventeen bytes!!".to_vec(),
                )
                .unwrap()
        })
        .join()
        .unwrap();
    assert_eq!(
        (got.status, got.body.len()),
        (200, 17),
        "{}",
        s_front.log_text()
    );
    let ids = front
        .enter({
            let url = format!("http://{}:9091/headers", webp.ip4);
            move || Client::new().get(&url).unwrap().text()
        })
        .join()
        .unwrap();
    // Both sidecars write their lines once the connections end; stop them to flush.
    s_front.stop();
    s_prod.stop();
    s_web.stop();

    let id = |s: &str| format!("spiffe://dc1/ns/default/sa/{s}");
    let http_null = serde_json::json!({
        "service": null, "route": null, "method": null, "path": null, "status": null,
        "request_id": null, "trace_id": null,
    });
    let with = |mut base: serde_json::Value, extra: &serde_json::Value| {
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    };

    // L4, outbound at the caller's sidecar: its own identity calls; products proved its own.
    let out = lines(&log(&front), "tcp");
    assert_eq!(out.len(), 1, "{out:?}");
    let mut want = with(
        serde_json::json!({
            "kind": "tcp", "direction": "outbound", "mesh": true,
            "client": app_side.to_string(),
            "source_id": id("frontend"), "destination_id": id("products"),
            "peer_id": id("products"),
            "original_destination": to.to_string(), "destination": "products",
            "upstream": to.to_string(),
            "bytes_up": 3000, "bytes_down": 3000, "reason": null, "detail": null,
        }),
        &http_null,
    );
    settle(&out[0], &mut want);
    assert_eq!(out[0], want);

    // L4, inbound at the destination's sidecar: the verified caller, its own identity, the
    // address the caller's sidecar dialled, the local application.
    let inb = lines(&log(&prod), "tcp");
    assert_eq!(inb.len(), 1, "{inb:?}");
    let client = inb[0]["client"].as_str().unwrap().to_string();
    assert!(client.starts_with(&format!("{}:", front.ip4)), "{client}");
    let mut want = with(
        serde_json::json!({
            "kind": "tcp", "direction": "inbound", "mesh": true, "client": client,
            "source_id": id("frontend"), "destination_id": id("products"),
            "peer_id": id("frontend"),
            "original_destination": to.to_string(), "destination": "products",
            "upstream": "127.0.0.1:8080",
            "bytes_up": 3000, "bytes_down": 3000, "reason": null, "detail": null,
        }),
        &http_null,
    );
    settle(&inb[0], &mut want);
    assert_eq!(inb[0], want);

    // HTTP, both ends: the same request id (added by the caller's sidecar) and trace id.
    let out = lines(&log(&front), "http");
    let inb = lines(&log(&webp), "http");
    assert_eq!((out.len(), inb.len()), (2, 2), "{out:?}\n{inb:?}");
    let rid = out[0]["request_id"].as_str().unwrap().to_string();
    assert_eq!(rid.len(), 36, "{rid}");
    let web_at = webp.addr4(9091).to_string();
    let front_client = out[0]["client"].as_str().unwrap().to_string();
    assert!(
        front_client.starts_with(&format!("{}:", front.ip4)),
        "{front_client}"
    );
    let mut want = serde_json::json!({
        "kind": "http", "direction": "outbound", "mesh": true, "client": front_client,
        "source_id": id("frontend"), "destination_id": id("web"), "peer_id": id("web"),
        "original_destination": web_at, "destination": "web", "upstream": web_at,
        "bytes_up": 17, "bytes_down": 17, "reason": null, "detail": null,
        "service": "web", "route": "default", "method": "POST", "path": "/echo",
        "status": 200, "request_id": rid,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    });
    settle(&out[0], &mut want);
    assert_eq!(out[0], want);
    let inb_client = inb[0]["client"].as_str().unwrap().to_string();
    assert!(
        inb_client.starts_with(&format!("{}:", front.ip4)),
        "{inb_client}"
    );
    let mut want = serde_json::json!({
        "kind": "http", "direction": "inbound", "mesh": true, "client": inb_client,
        "source_id": id("frontend"), "destination_id": id("web"), "peer_id": id("frontend"),
        "original_destination": web_at, "destination": "web", "upstream": "127.0.0.1:8081",
        "bytes_up": 17, "bytes_down": 17, "reason": null, "detail": null,
        "service": "web", "route": "default", "method": "POST", "path": "/echo",
        "status": 200, "request_id": rid,
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
    });
    settle(&inb[0], &mut want);
    assert_eq!(inb[0], want);
    // The second request's id reached the application as logged at both ends.
    let rid2 = out[1]["request_id"].as_str().unwrap();
    assert_eq!(inb[1]["request_id"].as_str(), Some(rid2));
    assert!(
        ids.lines().any(|l| l == format!("x-request-id: {rid2}")),
        "the app saw:\n{ids}"
    );
}
