//! Labelled metrics with real traffic between sidecars in pods: two callers (frontend, batch)
//! reach one destination (products) over mesh mTLS; the destination's metrics port, scraped from
//! another pod, counts connections and bytes per direction, service and source exactly as sent;
//! HTTP responses are counted by code; the latency histogram's sum agrees with its count. Needs
//! root.

use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use ringside_tests::certs::{sidecar_mtls, Ca};
use ringside_tests::http::{serve, Client};
use ringside_tests::pod::{pods_available, Net, Pod, Sidecar};
use ringside_tests::*;

/// Send `len` bytes to `to` from `pod` and read them all back (the app echoes).
fn roundtrip(pod: &Pod, to: SocketAddr, len: u64) {
    pod.enter(move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let sum = Stream::new(len, len).write_to(&mut w).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
            sum
        });
        let mut r = s;
        let got = read_to_end_hashed(&mut r).unwrap();
        assert_eq!(got, (len, writer.join().unwrap()), "echo of {len} bytes");
    })
    .join()
    .unwrap()
}

/// The value of the sample `series` (name and labels exactly as exported), if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn metrics_count_per_direction_service_source_and_code() {
    if !pods_available("metrics_count_per_direction_service_source_and_code") {
        return;
    }
    let mut net = Net::new();
    let front = net.pod("front");
    let batch = net.pod("batch");
    let prod = net.pod("prod");
    let webp = net.pod("webp");
    let scraper = net.pod("scraper");
    let dir = Dir(std::env::temp_dir().join(format!("{}-pki", net.id)));
    std::fs::create_dir_all(&dir.0).unwrap();
    let ca = Ca::new("metrics test CA");
    for p in [&front, &batch, &prod, &webp] {
        p.install_redirect(&[]);
    }
    let _echo = prod.echo_app("127.0.0.1:8080".parse().unwrap());
    let web = webp.enter(|| serve("web-app", "127.0.0.1:8081".parse().unwrap()));
    let _web = web.join().unwrap();
    let products = format!(
        "services:\n  - name: products\n    port: 9090\n    endpoints: [\"{}\"]\n",
        prod.addr4(9090)
    );
    let web_svc = format!(
        "  - name: web\n    port: 9091\n    protocol: http\n    endpoints: [\"{}\"]\n",
        webp.addr4(9091)
    );
    let s_front = Sidecar::start(
        &front,
        &format!(
            "{}{products}{web_svc}",
            sidecar_mtls(&ca, &dir.0, "frontend")
        ),
    );
    let s_batch = Sidecar::start(
        &batch,
        &format!("{}{products}", sidecar_mtls(&ca, &dir.0, "batch")),
    );
    let s_prod = Sidecar::start(
        &prod,
        &format!(
            "{}services:\n  - name: products\n    port: 9090\n    target_port: 8080\n    local: true\nintentions:\n  default: deny\n  rules:\n    - source: frontend\n      destination: products\n      action: allow\n    - source: batch\n      destination: products\n      action: allow\n",
            sidecar_mtls(&ca, &dir.0, "products")
        ),
    );
    let s_web = Sidecar::start(
        &webp,
        &format!(
            "{}services:\n  - name: web\n    port: 9091\n    target_port: 8081\n    protocol: http\n    local: true\nintentions:\n  default: deny\n  rules:\n    - source: frontend\n      destination: web\n      action: allow\n",
            sidecar_mtls(&ca, &dir.0, "web")
        ),
    );

    // L4: frontend twice, batch three times, each a different size.
    let from_front = [100_000u64, 12_345];
    let from_batch = [1_000u64, 2_000, 3_001];
    for len in from_front {
        roundtrip(&front, prod.addr4(9090), len);
    }
    for len in from_batch {
        roundtrip(&batch, prod.addr4(9090), len);
    }
    // L7: one 404 and two 200s; the slowest as the caller saw it bounds the proxy's latencies.
    let (codes, slowest) = front
        .enter({
            let base = format!("http://{}:9091", webp.ip4);
            move || {
                let c = Client::new();
                let mut slowest = Duration::ZERO;
                let mut codes = Vec::new();
                for path in ["/status/404", "/a", "/b"] {
                    let t = Instant::now();
                    let got = c.get(&format!("{base}{path}")).unwrap();
                    codes.push((got.status, got.header("x-ringside-reason")));
                    slowest = slowest.max(t.elapsed());
                }
                (codes, slowest)
            }
        })
        .join()
        .unwrap();
    let got: Vec<u16> = codes.iter().map(|c| c.0).collect();
    assert_eq!(
        got,
        [404, 200, 200],
        "{codes:?}\nfront: {}\nprod: {}",
        s_front.log_text(),
        s_web.log_text()
    );

    // Scrape from a pod without a sidecar, until every connection's end is counted (the client
    // reads its last byte just before the sidecar records the end).
    let scrape = |pod: &Pod| {
        let url = format!("http://{}:15020/metrics", pod.ip4);
        let got = scraper
            .enter(move || Client::new().get(&url))
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(got.status, 200);
        got.text()
    };
    let inbound = |source: &str| {
        format!("{{direction=\"inbound\",service=\"products\",source=\"{source}\"}}")
    };
    let (front_l, batch_l) = (inbound("frontend"), inbound("batch"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let t = scrape(&prod);
        let closed = |l: &str| sample(&t, &format!("ringside_tcp_connections_closed_total{l}"));
        if closed(&front_l) == Some(2.0) && closed(&batch_l) == Some(3.0) {
            break t;
        }
        assert!(Instant::now() < deadline, "ends not counted:\n{t}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let sum = |v: &[u64]| v.iter().sum::<u64>() as f64;
    for (labels, sizes) in [(&front_l, &from_front[..]), (&batch_l, &from_batch[..])] {
        for (metric, want) in [
            ("tcp_connections_opened_total", sizes.len() as f64),
            ("tcp_connections_closed_total", sizes.len() as f64),
            ("tcp_rx_bytes_total", sum(sizes)),
            ("tcp_tx_bytes_total", sum(sizes)),
        ] {
            let series = format!("ringside_{metric}{labels}");
            assert_eq!(sample(&text, &series), Some(want), "{series}:\n{text}");
        }
    }
    assert!(
        !text.contains("ringside_tcp_failures_total{"),
        "no connection failed:\n{text}"
    );
    assert_eq!(
        sample(&text, "ringside_tcp_label_overflow_total"),
        Some(0.0)
    );

    // L7 by code, and the histogram's sum against its count, at the destination.
    let text = scrape(&webp);
    let web_l = "service=\"web\",route=\"default\"";
    for (code, class, n) in [("404", "4xx", 1.0), ("200", "2xx", 2.0)] {
        let series = format!(
            "ringside_http_service_rq_total{{{web_l},response_code=\"{code}\",response_code_class=\"{class}\"}}"
        );
        assert_eq!(sample(&text, &series), Some(n), "{series}:\n{text}");
    }
    let count = sample(
        &text,
        &format!("ringside_http_service_rq_time_ms_count{{{web_l}}}"),
    );
    let total = sample(
        &text,
        &format!("ringside_http_service_rq_time_ms_sum{{{web_l}}}"),
    )
    .unwrap_or_else(|| panic!("no latency sum:\n{text}"));
    assert_eq!(count, Some(3.0));
    let max_ms = slowest.as_secs_f64() * 1000.0;
    assert!(
        total > 0.0 && total <= 3.0 * max_ms,
        "latency sum {total} ms for 3 requests, the slowest {max_ms} ms as the caller saw it"
    );

    // The callers' sidecars count the same connections outbound, without a source.
    for (pod, sizes) in [(&front, &from_front[..]), (&batch, &from_batch[..])] {
        let deadline = Instant::now() + Duration::from_secs(10);
        let labels = "{direction=\"outbound\",service=\"products\"}";
        let t = loop {
            let t = scrape(pod);
            let closed = sample(
                &t,
                &format!("ringside_tcp_connections_closed_total{labels}"),
            );
            if closed == Some(sizes.len() as f64) {
                break t;
            }
            assert!(Instant::now() < deadline, "ends not counted:\n{t}");
            std::thread::sleep(Duration::from_millis(100));
        };
        for (metric, want) in [
            ("tcp_connections_opened_total", sizes.len() as f64),
            ("tcp_rx_bytes_total", sum(sizes)),
            ("tcp_tx_bytes_total", sum(sizes)),
        ] {
            let series = format!("ringside_{metric}{labels}");
            assert_eq!(sample(&t, &series), Some(want), "{series}:\n{t}");
        }
    }
    drop((s_front, s_batch, s_prod, s_web));
}
