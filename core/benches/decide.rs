//! What the decision code costs per connection: protocol detection on a real ClientHello and on an
//! HTTP request head, routing by original destination among 500 services, intentions among 1,000
//! rules, and endpoint choice among 16 endpoints. `cargo bench -p ringside-core --bench decide`.

use std::hint::black_box;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion};
use ringside_core::config::{Config, Format};
use ringside_core::decide::cluster::Cluster;
use ringside_core::decide::detect::{classify, Want};
use ringside_core::decide::route::Routes;
use ringside_core::intentions::{Action, Intention, Intentions, Pattern};

/// The ClientHello rustls sends offering the mesh ALPNs.
fn client_hello() -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"ringside/http".to_vec(), b"ringside/tcp".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("products-api").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut out = Vec::new();
    c.write_tls(&mut out).unwrap();
    out
}

fn services(n: usize, endpoints: usize) -> Config {
    let mut y = String::from("sidecar: {}\nservices:\n");
    for i in 0..n {
        let eps: Vec<String> = (0..endpoints)
            .map(|e| format!("\"10.{}.{}.{}:8080\"", i / 250, i % 250, e + 1))
            .collect();
        y += &format!(
            "  - name: svc-{i}\n    virtual_ip: 240.0.{}.{}\n    port: 80\n    endpoints: [{}]\n",
            i / 250,
            i % 250 + 1,
            eps.join(", ")
        );
    }
    Config::parse(&y, Format::Yaml).unwrap()
}

fn detection(c: &mut Criterion) {
    let hello = client_hello();
    let head = b"GET /api/v1/products?id=7 HTTP/1.1\r\nHost: products-api\r\nAccept: */*\r\n\r\n";
    c.bench_function("detect ClientHello with ALPN", |b| {
        b.iter(|| classify(Want::TlsOrPlain, black_box(&hello)))
    });
    c.bench_function("detect HTTP request head", |b| {
        b.iter(|| classify(Want::Http, black_box(head)))
    });
}

fn routing(c: &mut Criterion) {
    let cfg = services(500, 2);
    let routes = Routes::new(&cfg.services, false);
    let hit = SocketAddr::from((Ipv4Addr::new(240, 0, 1, 100), 80));
    let miss = SocketAddr::from((Ipv4Addr::new(93, 184, 216, 34), 443));
    c.bench_function("route among 500 services (hit)", |b| {
        b.iter(|| routes.outbound(black_box(hit)))
    });
    c.bench_function("route among 500 services (passthrough)", |b| {
        b.iter(|| routes.outbound(black_box(miss)))
    });
}

fn intentions(c: &mut Criterion) {
    let mut rules: Vec<Intention> = (0..1000)
        .map(|i| Intention {
            source: Pattern::Exact(format!("svc-{}", i % 500)),
            destination: Pattern::Exact(format!("svc-{}", (i * 7) % 500)),
            action: if i % 3 == 0 {
                Action::Deny
            } else {
                Action::Allow
            },
            permissions: Vec::new(),
        })
        .collect();
    rules.push(Intention {
        source: Pattern::Any,
        destination: Pattern::Any,
        action: Action::Deny,
        permissions: Vec::new(),
    });
    let set = Intentions {
        rules,
        default: Action::Deny,
    };
    c.bench_function("intentions: decide among 1,001 rules", |b| {
        b.iter(|| {
            set.evaluate(black_box("svc-41"), black_box("svc-287"))
                .allowed()
        })
    });
}

fn endpoint_choice(c: &mut Criterion) {
    let cfg = services(1, 16);
    let now = Instant::now();
    let cluster = Cluster::new(cfg.services[0].clone(), now);
    c.bench_function("endpoint choice among 16", |b| {
        b.iter(|| cluster.pick(black_box(0), now))
    });
    cluster.report_failure(3, now);
    cluster.report_failure(9, now);
    c.bench_function("endpoint choice among 16, two ejected", |b| {
        b.iter(|| cluster.pick(black_box(0), now))
    });
}

criterion_group!(benches, detection, routing, intentions, endpoint_choice);
criterion_main!(benches);
