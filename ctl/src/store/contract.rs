//! The store contract: one suite, the same test bodies run against both backends — redb in a
//! temporary directory (`on_redb::*`) and a real etcd started for each test (`on_etcd::*`). Then
//! a few tests of what only etcd has (several daemons' handles, the index watch).
//!
//! Each body is an `async fn(Harness)`; "another daemon" is [`Harness::handle`]: for etcd a new
//! client (in the calling thread's runtime), for redb the same store (one daemon owns its file).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use ringside_core::control::api::{ProxyEvent, ProxyReport};

use super::etcd_server::EtcdServer;
use super::{
    EndpointRecord, EtcdOptions, PortMap, ProxyRecord, Store, TokenInfo, TokenNews,
    PROXY_ID_HELD_SECS,
};
use crate::consul::{Document, Protocol, ServiceDefaultsSpec};

/// The longest one test body may run.
const BODY_WITHIN: Duration = Duration::from_secs(90);

/// What a test body gets: a store, and a way to open more handles on the same state.
#[derive(Debug)]
struct Harness {
    store: Store,
    etcd: Option<EtcdOptions>,
}

impl Harness {
    /// Another handle on the same state, as another daemon would have (for etcd: its own
    /// client, made in the calling thread's runtime).
    async fn handle(&self) -> Store {
        match &self.etcd {
            Some(o) => Store::connect_etcd(o).await.expect("another etcd client"),
            None => self.store.clone(),
        }
    }

    /// Run `f` on `threads` threads at once, each with its own runtime and its own handle;
    /// returns their results in thread order.
    async fn on_threads<T, F, Fut>(&self, threads: usize, f: F) -> Vec<T>
    where
        T: Send + 'static,
        F: Fn(usize, Store) -> Fut + Send + Sync + Clone + 'static,
        Fut: Future<Output = T>,
    {
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(threads));
        let joins: Vec<_> = (0..threads)
            .map(|i| {
                let (f, etcd, store, barrier) = (
                    f.clone(),
                    self.etcd.clone(),
                    self.store.clone(),
                    barrier.clone(),
                );
                std::thread::spawn(move || {
                    runtime().block_on(async move {
                        let h = Harness { store, etcd }.handle().await;
                        barrier.wait();
                        f(i, h).await
                    })
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().expect("a store thread panicked"))
            .collect()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

async fn bounded<Fut: Future<Output = ()>>(body: Fut) {
    tokio::time::timeout(BODY_WITHIN, body)
        .await
        .expect("the test body finished in time");
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "ringctl-contract-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn on_redb<F, Fut>(body: F)
where
    F: FnOnce(Harness) -> Fut,
    Fut: Future<Output = ()>,
{
    let dir = TempDir::new("redb");
    let store = Store::open_redb(&dir.0).expect("redb opens");
    runtime().block_on(bounded(body(Harness { store, etcd: None })));
}

fn etcd_options(server: &EtcdServer) -> EtcdOptions {
    EtcdOptions::parse(&format!("etcd://{}", server.endpoint())).expect("an etcd URL")
}

fn on_etcd<F, Fut>(body: F)
where
    F: FnOnce(Harness) -> Fut,
    Fut: Future<Output = ()>,
{
    let server = EtcdServer::start();
    let o = etcd_options(&server);
    runtime().block_on(bounded(async move {
        let store = Store::connect_etcd(&o).await.expect("etcd connects");
        body(Harness {
            store,
            etcd: Some(o),
        })
        .await
    }));
    drop(server);
}

/// Each named body becomes `on_redb::NAME` and `on_etcd::NAME`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod on_redb {
            $( #[test] fn $name() { super::on_redb(super::$name) } )*
        }
        mod on_etcd {
            $( #[test] fn $name() { super::on_etcd(super::$name) } )*
        }
    };
}

contract!(
    apply_is_whole_and_moves_the_index,
    applies_are_never_seen_half_done,
    delete_removes_and_moves_the_index,
    services_keep_their_virtual_ip,
    concurrent_registrations_get_distinct_ips,
    endpoints_need_their_service,
    tokens_name_their_service,
    operator_tokens_are_kept_apart,
    tokens_are_revoked,
    proxy_ids_belong_to_their_service,
    proxy_reports_register_endpoints_and_keep_failures,
    batched_reports_merge_and_never_overwrite,
    counters_count_under_contention,
    snapshots_hold_what_proxies_are_sent,
    endpoints_are_deregistered_and_silent_proxies_expired,
);

/// `ServiceDefaults/<name>` with a marker in a field the store does not read.
fn defaults(name: &str, marker: &str) -> Document {
    Document::ServiceDefaults {
        name: name.to_string(),
        spec: ServiceDefaultsSpec {
            protocol: Protocol::Http,
            // A field kept as written: the marker survives the store untouched.
            external_sni: Some(serde_json::Value::String(marker.to_string())),
            ..Default::default()
        },
    }
}

fn marker(doc: &serde_json::Value) -> String {
    match serde_json::from_value(doc.clone()) {
        Ok(Document::ServiceDefaults { spec, .. }) => spec
            .external_sni
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        other => panic!("not a marked document: {other:?}"),
    }
}

fn ids(docs: &[serde_json::Value]) -> Vec<String> {
    docs.iter()
        .map(|d| {
            format!(
                "{}/{}",
                d["kind"].as_str().unwrap(),
                d["name"].as_str().unwrap()
            )
        })
        .collect()
}

async fn apply_is_whole_and_moves_the_index(h: Harness) {
    let s = &h.store;
    assert_eq!(s.index().await.unwrap(), 0, "a new store is at index 0");
    assert!(s.documents().await.unwrap().is_empty());
    let first = s
        .apply(&[defaults("b", "1"), defaults("a", "1"), defaults("c", "1")])
        .await
        .unwrap();
    assert!(first > 0);
    assert_eq!(
        s.index().await.unwrap(),
        first,
        "apply returns the new index"
    );
    let docs = s.documents().await.unwrap();
    assert_eq!(
        ids(&docs),
        [
            "ServiceDefaults/a",
            "ServiceDefaults/b",
            "ServiceDefaults/c"
        ],
        "documents come in key order"
    );
    // A document named twice in one apply is stored as its last occurrence.
    let second = s
        .apply(&[defaults("a", "2"), defaults("d", "2"), defaults("a", "3")])
        .await
        .unwrap();
    assert!(second > first, "{second} > {first}");
    let docs = s.documents().await.unwrap();
    assert_eq!(docs.len(), 4);
    let by_id: BTreeMap<String, String> = ids(&docs)
        .into_iter()
        .zip(docs.iter().map(marker))
        .collect();
    assert_eq!(by_id["ServiceDefaults/a"], "3");
    assert_eq!(by_id["ServiceDefaults/b"], "1");
    assert_eq!(by_id["ServiceDefaults/d"], "2");
    let typed = s.typed().await.unwrap();
    assert_eq!(typed.len(), 4);
    assert!(typed.contains(&defaults("a", "3")));
    // Another daemon sees the same.
    let other = h.handle().await;
    assert_eq!(other.index().await.unwrap(), second);
    assert_eq!(other.documents().await.unwrap(), docs);
}

/// A reader never sees an apply half done: every document of a generation, or none of it.
async fn applies_are_never_seen_half_done(h: Harness) {
    const DOCS: usize = 8;
    const GENERATIONS: usize = 30;
    let names: Vec<String> = (0..DOCS).map(|i| format!("svc-{i}")).collect();
    let gen = move |g: usize| -> Vec<Document> {
        names.iter().map(|n| defaults(n, &g.to_string())).collect()
    };
    h.store.apply(&gen(0)).await.unwrap();
    let results = h
        .on_threads(2, move |i, s| {
            let gen = gen.clone();
            async move {
                let mut seen = BTreeSet::new();
                if i == 0 {
                    for g in 1..=GENERATIONS {
                        s.apply(&gen(g)).await.unwrap();
                    }
                } else {
                    for _ in 0..GENERATIONS * 3 {
                        let docs = s.documents().await.unwrap();
                        assert_eq!(docs.len(), DOCS);
                        let markers: BTreeSet<String> = docs.iter().map(marker).collect();
                        assert_eq!(markers.len(), 1, "a torn apply: {markers:?}");
                        seen.extend(markers);
                    }
                }
                seen
            }
        })
        .await;
    let docs = h.store.documents().await.unwrap();
    let last: BTreeSet<String> = docs.iter().map(marker).collect();
    assert_eq!(last, BTreeSet::from([GENERATIONS.to_string()]));
    assert!(!results[1].is_empty());
}

async fn delete_removes_and_moves_the_index(h: Harness) {
    let s = &h.store;
    s.apply(&[defaults("a", "1"), defaults("b", "1")])
        .await
        .unwrap();
    let before = s.index().await.unwrap();
    assert!(s.delete("ServiceDefaults/a").await.unwrap());
    let after = s.index().await.unwrap();
    assert!(after > before, "a delete moves the index");
    assert_eq!(ids(&s.documents().await.unwrap()), ["ServiceDefaults/b"]);
    assert!(
        !s.delete("ServiceDefaults/a").await.unwrap(),
        "gone already"
    );
    assert!(!s.delete("ServiceRouter/nope").await.unwrap());
    assert_eq!(
        s.index().await.unwrap(),
        after,
        "deleting nothing leaves the index"
    );
}

fn port(p: u16) -> Vec<PortMap> {
    vec![PortMap {
        port: p,
        target_port: 8080,
    }]
}

async fn services_keep_their_virtual_ip(h: Harness) {
    let s = &h.store;
    let range: (Ipv4Addr, u8) = ("240.0.0.0".parse().unwrap(), 30);
    let i0 = s.index().await.unwrap();
    let a = s.register_service("a", port(1800), range).await.unwrap();
    let i1 = s.index().await.unwrap();
    assert!(i1 > i0, "a registration moves the index");
    assert_eq!(a.virtual_ip.to_string(), "240.0.0.1");
    assert_eq!(a.registered_index, i1, "registered at the index it made");
    assert!(a.registered_at > 0);
    let b = s.register_service("b", vec![], range).await.unwrap();
    assert_eq!(b.virtual_ip.to_string(), "240.0.0.2");
    assert!(b.registered_index > a.registered_index);
    // Again, with other ports: the same VIP and first registration, the new ports.
    let a2 = s.register_service("a", port(1900), range).await.unwrap();
    assert_eq!(a2.virtual_ip, a.virtual_ip, "re-registering keeps the VIP");
    assert_eq!(a2.registered_index, a.registered_index);
    assert_eq!(a2.registered_at, a.registered_at);
    assert_eq!(a2.ports, port(1900));
    let err = s.register_service("c", vec![], range).await.unwrap_err();
    assert!(err.to_string().contains("exhausted"), "{err}");
    let all = h.handle().await.services().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[0], a2, "services come by name, as registered");
    assert_eq!(all[1], b);
}

async fn concurrent_registrations_get_distinct_ips(h: Harness) {
    const EACH: usize = 15;
    let range: (Ipv4Addr, u8) = ("240.1.0.0".parse().unwrap(), 24);
    // Two daemons register their own services and the same shared ones, at the same moment.
    let results = h
        .on_threads(2, move |t, s| async move {
            let mut got = BTreeMap::new();
            for i in 0..EACH {
                for name in [format!("t{t}-{i}"), format!("shared-{i}")] {
                    let r = s.register_service(&name, vec![], range).await.unwrap();
                    got.insert(name, r.virtual_ip);
                }
            }
            got
        })
        .await;
    for i in 0..EACH {
        let k = format!("shared-{i}");
        assert_eq!(results[0][&k], results[1][&k], "{k} has one VIP");
    }
    let all = h.store.services().await.unwrap();
    assert_eq!(all.len(), 3 * EACH);
    let vips: BTreeSet<Ipv4Addr> = all.iter().map(|s| s.virtual_ip).collect();
    assert_eq!(vips.len(), all.len(), "no VIP handed out twice: {all:?}");
    for (name, ip) in results.iter().flatten() {
        let stored = all.iter().find(|s| &s.name == name).unwrap();
        assert_eq!(stored.virtual_ip, *ip, "{name} kept the VIP it was given");
    }
}

fn endpoint(service: &str, address: &str, node: &str) -> EndpointRecord {
    EndpointRecord {
        service: service.into(),
        address: address.parse().unwrap(),
        node: node.into(),
        healthy: true,
        meta: BTreeMap::from([("version".to_string(), "v1".to_string())]),
    }
}

async fn endpoints_need_their_service(h: Harness) {
    let s = &h.store;
    let range = ("240.0.0.0".parse().unwrap(), 16);
    let err = s
        .register_endpoint(&endpoint("zzz", "198.18.0.9", "n1"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no service 'zzz'"), "{err}");
    assert!(s.endpoints().await.unwrap().is_empty());
    s.register_service("a", port(80), range).await.unwrap();
    let before = s.index().await.unwrap();
    s.register_endpoint(&endpoint("a", "198.18.0.3", "n1"))
        .await
        .unwrap();
    s.register_endpoint(&endpoint("a", "198.18.0.2", "n1"))
        .await
        .unwrap();
    let after = s.index().await.unwrap();
    assert!(after > before, "an endpoint moves the index");
    // The same address again replaces it.
    s.register_endpoint(&endpoint("a", "198.18.0.2", "n2"))
        .await
        .unwrap();
    let eps = h.handle().await.endpoints().await.unwrap();
    assert_eq!(
        eps,
        vec![
            endpoint("a", "198.18.0.2", "n2"),
            endpoint("a", "198.18.0.3", "n1")
        ]
    );
}

fn token(id: &str, service: &str, expires: Option<i64>) -> TokenInfo {
    TokenInfo {
        id: id.into(),
        service: service.into(),
        created: 1_700_000_000,
        expires,
    }
}

async fn tokens_name_their_service(h: Harness) {
    let s = &h.store;
    assert_eq!(s.token("h1").await.unwrap(), None);
    assert!(s.tokens().await.unwrap().is_empty());
    let before = s.index().await.unwrap();
    s.add_token("h1", &token("h1", "a", None)).await.unwrap();
    s.add_token("h2", &token("h2", "b", Some(1_800_000_000)))
        .await
        .unwrap();
    assert_eq!(
        s.index().await.unwrap(),
        before,
        "a token changes nothing proxies are sent"
    );
    let other = h.handle().await;
    assert_eq!(
        other.token("h1").await.unwrap(),
        Some(token("h1", "a", None))
    );
    assert_eq!(
        other.token("h2").await.unwrap(),
        Some(token("h2", "b", Some(1_800_000_000))),
        "the expiry is kept"
    );
    assert_eq!(other.token("nope").await.unwrap(), None);
    assert_eq!(
        other.tokens().await.unwrap(),
        vec![
            ("h1".to_string(), token("h1", "a", None)),
            ("h2".to_string(), token("h2", "b", Some(1_800_000_000))),
        ]
    );
}

/// A revoked token is gone for every daemon sharing the store; revoking it again says so.
async fn tokens_are_revoked(h: Harness) {
    let s = &h.store;
    s.add_token("h1", &token("h1", "a", None)).await.unwrap();
    s.add_token("h2", &token("h2", "a", None)).await.unwrap();
    let before = s.index().await.unwrap();
    let other = h.handle().await;
    assert!(other.remove_token("h1").await.unwrap());
    assert!(!other.remove_token("h1").await.unwrap(), "already gone");
    assert_eq!(s.token("h1").await.unwrap(), None);
    assert_eq!(s.token("h2").await.unwrap(), Some(token("h2", "a", None)));
    assert_eq!(s.tokens().await.unwrap().len(), 1);
    assert_eq!(s.index().await.unwrap(), before);
}

/// A proxy id is its service's while its proxy reports: another service's report under it is
/// refused (forbidden) and changes nothing; once the proxy has been silent longer than
/// [`PROXY_ID_HELD_SECS`], the id may be taken over.
async fn proxy_ids_belong_to_their_service(h: Harness) {
    let s = &h.store;
    let range = ("240.0.0.0".parse().unwrap(), 16);
    s.register_service("web", port(80), range).await.unwrap();
    s.register_service("api", port(80), range).await.unwrap();
    let mut web = report("p1", "web", Some("198.18.0.5"), 10, 1);
    web.report.cert_generation = 3;
    s.report_proxy(&web, "n").await.unwrap();
    let index = s.index().await.unwrap();
    let mut forged = report("p1", "api", Some("198.18.0.9"), 10, 0);
    forged.report.cert_generation = 99;
    forged.last_seen = web.last_seen + PROXY_ID_HELD_SECS;
    let other = h.handle().await;
    let err = other.report_proxy(&forged, "n").await.unwrap_err();
    assert!(err.forbidden, "{err}");
    assert!(
        err.message.contains("'web'") && err.message.contains("'api'"),
        "{err}"
    );
    let p = s.proxies().await.unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].report.service, "web");
    assert_eq!(
        p[0].report.cert_generation, 3,
        "its generation is untouched"
    );
    assert_eq!(s.index().await.unwrap(), index);
    assert_eq!(s.endpoints().await.unwrap().len(), 1);
    // Its own service's proxy still reports under it.
    web.last_seen += 5;
    s.report_proxy(&web, "n").await.unwrap();
    // Silent past the hold: taken over.
    forged.last_seen = web.last_seen + PROXY_ID_HELD_SECS + 1;
    other.report_proxy(&forged, "n").await.unwrap();
    assert_eq!(s.proxies().await.unwrap()[0].report.service, "api");
}

async fn operator_tokens_are_kept_apart(h: Harness) {
    let s = &h.store;
    let rec = |name: &str| crate::store::OperatorTokenRecord {
        name: name.into(),
        created: 7,
    };
    assert_eq!(s.operator_token("o1").await.unwrap(), None);
    assert!(s.operator_tokens().await.unwrap().is_empty());
    let before = s.index().await.unwrap();
    s.add_operator_token("o1", &rec("alice")).await.unwrap();
    s.add_operator_token("o2", &rec("bob")).await.unwrap();
    s.add_token("p1", &token("p1", "web", None)).await.unwrap();
    assert_eq!(s.index().await.unwrap(), before);
    let other = h.handle().await;
    assert_eq!(
        other.operator_token("o1").await.unwrap(),
        Some(rec("alice"))
    );
    // A proxy token is not an operator token, nor an operator token a proxy token.
    assert_eq!(other.operator_token("p1").await.unwrap(), None);
    assert_eq!(other.token("o1").await.unwrap(), None);
    assert_eq!(
        other.operator_tokens().await.unwrap(),
        vec![
            ("o1".to_string(), rec("alice")),
            ("o2".to_string(), rec("bob"))
        ]
    );
    assert!(other.remove_operator_token("o1").await.unwrap());
    assert!(!other.remove_operator_token("o1").await.unwrap());
    assert_eq!(s.operator_token("o1").await.unwrap(), None);
    assert_eq!(s.operator_token("o2").await.unwrap(), Some(rec("bob")));
}

fn report(
    id: &str,
    service: &str,
    address: Option<&str>,
    started_at: i64,
    events: usize,
) -> ProxyRecord {
    ProxyRecord {
        report: ProxyReport {
            id: id.into(),
            service: service.into(),
            address: address.map(|a| a.parse().unwrap()),
            applied_index: 1,
            cert_generation: 0,
            cert_not_after: 100,
            cert_issuer: String::new(),
            clock: 0,
            started_at,
            ctl_unreachable_since: 0,
            failed_connects_before_start: 0,
            events: (0..events)
                .map(|i| ProxyEvent {
                    time_ms: i as u64,
                    reason: "r".into(),
                    source: "s".into(),
                    destination: "d".into(),
                    detail: format!("{started_at}-{i}"),
                })
                .collect(),
            meta: BTreeMap::new(),
        },
        last_seen: 50,
        node: "node-a".into(),
    }
}

async fn proxy_reports_register_endpoints_and_keep_failures(h: Harness) {
    let s = &h.store;
    let range = ("240.0.0.0".parse().unwrap(), 16);
    s.register_service("web", port(80), range).await.unwrap();
    let i0 = s.index().await.unwrap();
    // A report with an address registers the proxy's endpoint.
    let r1 = report("web-1", "web", Some("198.18.0.5"), 10, 2);
    assert!(s.report_proxy(&r1, "node-a").await.unwrap());
    let i1 = s.index().await.unwrap();
    assert!(i1 > i0, "a new endpoint moves the index");
    let eps = s.endpoints().await.unwrap();
    assert_eq!(eps.len(), 1);
    assert_eq!(
        (eps[0].service.as_str(), eps[0].node.as_str()),
        ("web", "node-a")
    );
    assert_eq!(eps[0].address.to_string(), "198.18.0.5");
    // The same again changes no endpoint and leaves the index; its failures add up.
    assert!(!s.report_proxy(&r1, "node-a").await.unwrap());
    assert_eq!(s.index().await.unwrap(), i1);
    let p = s.proxies().await.unwrap();
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].report.events.len(), 4);
    // Up to the newest 64.
    assert!(!s
        .report_proxy(
            &report("web-1", "web", Some("198.18.0.5"), 10, 70),
            "node-a"
        )
        .await
        .unwrap());
    let p = s.proxies().await.unwrap();
    assert_eq!(p[0].report.events.len(), 64);
    assert_eq!(p[0].report.events.last().unwrap().detail, "10-69");
    // A restarted proxy (another start time) starts its list again.
    s.report_proxy(&report("web-1", "web", Some("198.18.0.5"), 11, 1), "node-a")
        .await
        .unwrap();
    assert_eq!(s.proxies().await.unwrap()[0].report.events.len(), 1);
    // An unknown service's proxy is recorded, without an endpoint.
    let ghost = report("ghost-1", "ghost", Some("198.18.0.6"), 1, 0);
    assert!(!s.report_proxy(&ghost, "node-b").await.unwrap());
    assert_eq!(s.endpoints().await.unwrap().len(), 1);
    // Without an address: recorded, no endpoint.
    assert!(!s
        .report_proxy(&report("cli-1", "web", None, 1, 0), "node-b")
        .await
        .unwrap());
    let ids: Vec<String> = h
        .handle()
        .await
        .proxies()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.report.id)
        .collect();
    assert_eq!(ids, ["cli-1", "ghost-1", "web-1"]);
    // Another node's proxy at the same address takes the endpoint over.
    assert!(s
        .report_proxy(&report("web-2", "web", Some("198.18.0.5"), 1, 0), "node-c")
        .await
        .unwrap());
    assert_eq!(s.endpoints().await.unwrap()[0].node, "node-c");
}

/// Acknowledgements and heartbeats written together ([`Store::record_reports`]): each merged with
/// its stored record (failures kept), none over a newer report or another service's proxy, and
/// the configuration index left alone.
async fn batched_reports_merge_and_never_overwrite(h: Harness) {
    let s = &h.store;
    let range = ("240.0.0.0".parse().unwrap(), 16);
    s.register_service("web", port(80), range).await.unwrap();
    let first = report("web-1", "web", Some("198.18.0.5"), 10, 2);
    // The daemon names an endpoint's owner by its proxy's id.
    assert!(s.report_proxy(&first, "web-1").await.unwrap());
    let index = s.index().await.unwrap();
    let mut ack = report("web-1", "web", Some("198.18.0.5"), 10, 0);
    ack.report.applied_index = 7;
    ack.last_seen = first.last_seen + 1;
    let other = report("api-1", "api", None, 3, 0);
    h.handle()
        .await
        .record_reports(&[ack.clone(), other])
        .await
        .unwrap();
    let by_id = |p: &[ProxyRecord], id: &str| {
        p.iter()
            .find(|r| r.report.id == id)
            .unwrap_or_else(|| panic!("{id} recorded"))
            .clone()
    };
    let p = s.proxies().await.unwrap();
    assert_eq!(p.len(), 2);
    let w = by_id(&p, "web-1");
    assert_eq!(w.report.applied_index, 7);
    assert_eq!(w.report.events.len(), 2, "its failures are kept");
    assert_eq!(by_id(&p, "api-1").report.service, "api");
    // An older report than the stored one is not written over it.
    let mut stale = ack.clone();
    stale.report.applied_index = 3;
    stale.last_seen = ack.last_seen - 5;
    s.record_reports(&[stale]).await.unwrap();
    assert_eq!(
        by_id(&s.proxies().await.unwrap(), "web-1")
            .report
            .applied_index,
        7
    );
    // Nor a report under its id by another service's proxy.
    let mut forged = ack.clone();
    forged.report.service = "api".into();
    forged.report.applied_index = 99;
    forged.last_seen = ack.last_seen + 1;
    s.record_reports(&[forged]).await.unwrap();
    let w = by_id(&s.proxies().await.unwrap(), "web-1");
    assert_eq!(
        (w.report.service.as_str(), w.report.applied_index),
        ("web", 7)
    );
    assert_eq!(
        s.index().await.unwrap(),
        index,
        "acknowledgements move no index"
    );
    assert_eq!(s.endpoints().await.unwrap().len(), 1);
}

async fn counters_count_under_contention(h: Harness) {
    let s = &h.store;
    assert_eq!(s.meta("certgen").await.unwrap(), 0);
    let i0 = s.index().await.unwrap();
    assert_eq!(s.bump_meta("certgen").await.unwrap(), 1);
    let i1 = s.index().await.unwrap();
    assert!(i1 > i0, "a counter moves the index");
    assert_eq!(s.bump_meta("certgen/web").await.unwrap(), 1);
    assert_eq!(s.meta("certgen").await.unwrap(), 1);
    let i2 = s.bump_index().await.unwrap();
    assert!(i2 > i1);
    assert_eq!(s.index().await.unwrap(), i2, "bump_index returns the index");
    // Two daemons counting at once lose no step.
    h.on_threads(2, |_, s| async move {
        for _ in 0..20 {
            s.bump_meta("certgen").await.unwrap();
        }
    })
    .await;
    assert_eq!(s.meta("certgen").await.unwrap(), 41);
    assert_eq!(s.meta("certgen/web").await.unwrap(), 1);
    assert!(s.index().await.unwrap() > i2);
}

async fn snapshots_hold_what_proxies_are_sent(h: Harness) {
    let s = &h.store;
    let range = ("240.0.0.0".parse().unwrap(), 16);
    let empty = s.snapshot().await.unwrap();
    assert_eq!(empty.index, 0);
    assert!(empty.docs.is_empty() && empty.services.is_empty());
    s.apply(&[defaults("web", "1")]).await.unwrap();
    let web = s.register_service("web", port(80), range).await.unwrap();
    s.register_endpoint(&endpoint("web", "198.18.0.2", "n1"))
        .await
        .unwrap();
    s.bump_meta("certgen").await.unwrap();
    s.bump_meta("certgen/web").await.unwrap();
    s.bump_meta("certgen/web").await.unwrap();
    let snap = h.handle().await.snapshot().await.unwrap();
    assert_eq!(snap.index, s.index().await.unwrap());
    assert_eq!(snap.docs, vec![defaults("web", "1")]);
    assert_eq!(snap.services, vec![web]);
    assert_eq!(snap.endpoints, vec![endpoint("web", "198.18.0.2", "n1")]);
    assert_eq!(snap.counter("certgen"), 1);
    assert_eq!(snap.counter("certgen/web"), 2);
    assert_eq!(snap.counter("certgen/other"), 0);
}

/// Wait (bounded) until `cond` holds.
async fn until<F: Future<Output = bool>>(what: &str, mut cond: impl FnMut() -> F) {
    let start = std::time::Instant::now();
    while !cond().await {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what}: not within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn endpoints_are_deregistered_and_silent_proxies_expired(h: Harness) {
    let s = &h.store;
    // As a daemon does: a lease for its proxies' endpoints (etcd), kept alive meanwhile.
    let keeper = tokio::spawn(s.keep_lease(Duration::from_secs(10)));
    let range = ("240.0.0.0".parse().unwrap(), 16);
    s.register_service("web", port(80), range).await.unwrap();
    // By hand: removed by deregistering, which moves the index; gone is gone.
    s.register_endpoint(&endpoint("web", "198.18.0.9", "n1"))
        .await
        .unwrap();
    let i0 = s.index().await.unwrap();
    let addr = |a: &str| a.parse::<std::net::IpAddr>().unwrap();
    assert!(s
        .deregister_endpoint("web", addr("198.18.0.9"))
        .await
        .unwrap());
    assert!(s.index().await.unwrap() > i0);
    assert!(s.endpoints().await.unwrap().is_empty());
    assert!(!s
        .deregister_endpoint("web", addr("198.18.0.9"))
        .await
        .unwrap());
    // A proxy's (once the lease is held).
    until("the proxy's endpoint is registered", || async {
        s.report_proxy(&report("web-1", "web", Some("198.18.0.5"), 1, 0), "web-1")
            .await
            .unwrap();
        !s.endpoints().await.unwrap().is_empty()
    })
    .await;
    assert_eq!(
        s.proxy_endpoints().await.unwrap().len(),
        usize::from(h.etcd.is_none()),
        "redb remembers which proxy registered it; etcd has the lease"
    );
    // Expired only for the proxy that registered it.
    assert!(!s
        .expire_endpoint("web", addr("198.18.0.5"), "web-2")
        .await
        .unwrap());
    let i1 = s.index().await.unwrap();
    assert!(s
        .expire_endpoint("web", addr("198.18.0.5"), "web-1")
        .await
        .unwrap());
    assert!(s.index().await.unwrap() > i1, "an expiry moves the index");
    assert!(s.endpoints().await.unwrap().is_empty());
    assert!(s.proxy_endpoints().await.unwrap().is_empty());
    // Its next report brings it back; registered by hand over it, it is no proxy's any more.
    s.report_proxy(&report("web-1", "web", Some("198.18.0.5"), 1, 0), "web-1")
        .await
        .unwrap();
    assert_eq!(s.endpoints().await.unwrap().len(), 1);
    s.register_endpoint(&endpoint("web", "198.18.0.5", "web-1"))
        .await
        .unwrap();
    assert!(!s
        .expire_endpoint("web", addr("198.18.0.5"), "web-1")
        .await
        .unwrap());
    assert_eq!(s.endpoints().await.unwrap().len(), 1);
    keeper.abort();
}

// What only etcd has.

/// Too many documents for one etcd transaction: refused whole, nothing stored.
#[test]
fn etcd_refuses_an_oversized_apply_whole() {
    on_etcd(|h| async move {
        let docs: Vec<Document> = (0..super::etcd::MAX_APPLY_DOCS + 1)
            .map(|i| defaults(&format!("s{i}"), "1"))
            .collect();
        let err = h.store.apply(&docs).await.unwrap_err();
        assert!(err.to_string().contains("nothing applied"), "{err}");
        assert!(h.store.documents().await.unwrap().is_empty());
        assert_eq!(h.store.index().await.unwrap(), 0);
        h.store
            .apply(&docs[..super::etcd::MAX_APPLY_DOCS])
            .await
            .unwrap();
        assert_eq!(
            h.store.documents().await.unwrap().len(),
            super::etcd::MAX_APPLY_DOCS
        );
    });
}

/// The index is the etcd revision of the last configuration change: a proxy's report that
/// changes nothing moves etcd's revision, not the index; other daemons see the same index.
#[test]
fn etcd_index_is_the_revision_of_the_last_change() {
    on_etcd(|h| async move {
        let s = &h.store;
        s.register_service("web", port(80), ("240.0.0.0".parse().unwrap(), 16))
            .await
            .unwrap();
        let applied = s.apply(&[defaults("web", "1")]).await.unwrap();
        s.report_proxy(&report("cli", "web", None, 1, 0), "n")
            .await
            .unwrap();
        s.add_token("h", &token("h", "web", None)).await.unwrap();
        assert_eq!(s.index().await.unwrap(), applied);
        let other = h.handle().await;
        assert_eq!(other.index().await.unwrap(), applied);
        let next = other.apply(&[defaults("web", "2")]).await.unwrap();
        assert!(
            next > applied + 1,
            "reports and tokens took revisions in between"
        );
        assert_eq!(s.index().await.unwrap(), next);
    });
}

/// A daemon following the index sees another daemon's changes and token revocations, and keeps
/// seeing them after etcd restarts under it (saying it resumed, since a revocation in between
/// is not an event it can see).
#[test]
fn etcd_follow_index_sees_other_daemons_and_survives_a_restart() {
    let mut server = EtcdServer::start();
    let o = etcd_options(&server);
    let rt = runtime();
    let (news_tx, mut news) = tokio::sync::mpsc::unbounded_channel();
    let (follower, tx) = rt.block_on(async {
        let s = Store::connect_etcd(&o).await.unwrap();
        let tx = std::sync::Arc::new(tokio::sync::watch::Sender::new(0u64));
        let f = {
            let (s, tx) = (s.clone(), tx.clone());
            tokio::spawn(async move { s.follow_index(&tx, &news_tx).await })
        };
        (f, tx)
    });
    let mut next_news = || {
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), news.recv())
                .await
                .expect("no token news within 15 s")
                .expect("the follower stopped")
        })
    };
    // Another "daemon": its own thread, runtime and client.
    let other = |marker: &'static str| {
        let o = o.clone();
        std::thread::spawn(move || {
            runtime().block_on(async {
                let s = Store::connect_etcd(&o).await.unwrap();
                s.apply(&[defaults("web", marker)]).await.unwrap()
            })
        })
        .join()
        .unwrap()
    };
    let wait_for = |want: u64| {
        let mut rx = tx.subscribe();
        rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(15), rx.wait_for(|i| *i >= want))
                .await
                .unwrap_or_else(|_| panic!("the follower did not reach index {want}"))
                .map(|i| *i)
                .unwrap()
        })
    };
    let first = other("1");
    assert_eq!(wait_for(first), first);
    // A token issued and revoked through another daemon: the follower is told which.
    let o2 = o.clone();
    std::thread::spawn(move || {
        runtime().block_on(async {
            let s = Store::connect_etcd(&o2).await.unwrap();
            let t = TokenInfo {
                id: "ab12".into(),
                service: "web".into(),
                created: 1,
                expires: None,
            };
            s.add_token("hash-of-a-token", &t).await.unwrap();
            assert!(s.remove_token("hash-of-a-token").await.unwrap());
        })
    })
    .join()
    .unwrap();
    assert_eq!(next_news(), TokenNews::Removed("hash-of-a-token".into()));
    server.restart();
    let second = other("2");
    assert!(second > first);
    assert_eq!(wait_for(second), second, "followed again after the restart");
    assert_eq!(next_news(), TokenNews::Resumed, "told that it resumed");
    follower.abort();
}

/// A daemon's lease ends with it (here: its runtime stops keeping it alive): etcd deletes its
/// proxies' endpoints within the TTL, and another daemon following the index moves it (one
/// transaction, however many daemons watch), so proxies everywhere hear of it. Hand-registered
/// endpoints stay.
#[test]
fn etcd_lease_expiry_removes_endpoints_and_moves_the_index() {
    let server = EtcdServer::start();
    let o = etcd_options(&server);
    let rt = runtime();
    let (follower, tx, b) = rt.block_on(async {
        let b = Store::connect_etcd(&o).await.unwrap();
        b.register_service("web", port(80), ("240.0.0.0".parse().unwrap(), 16))
            .await
            .unwrap();
        b.register_endpoint(&endpoint("web", "198.18.0.9", "by-hand"))
            .await
            .unwrap();
        let tx = std::sync::Arc::new(tokio::sync::watch::Sender::new(0u64));
        let f = {
            let (b, tx) = (b.clone(), tx.clone());
            let (news, _) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(async move { b.follow_index(&tx, &news).await })
        };
        (f, tx, b)
    });
    // Daemon A: its own thread and runtime, a 2 s lease, one proxy's endpoint; then it stops.
    let o2 = o.clone();
    std::thread::spawn(move || {
        runtime().block_on(async {
            let a = Store::connect_etcd(&o2).await.unwrap();
            let keeper = tokio::spawn(a.keep_lease(Duration::from_secs(2)));
            until("A's endpoint is registered", || async {
                a.report_proxy(&report("web-1", "web", Some("198.18.0.5"), 1, 0), "web-1")
                    .await
                    .unwrap();
                a.endpoints().await.unwrap().len() == 2
            })
            .await;
            keeper.abort();
        })
    })
    .join()
    .unwrap();
    let (with_it, stopped) =
        rt.block_on(async { (b.index().await.unwrap(), std::time::Instant::now()) });
    let mut rx = tx.subscribe();
    rt.block_on(async {
        until("A's endpoint expires", || async {
            b.endpoints().await.unwrap().len() == 1
        })
        .await;
        assert!(
            stopped.elapsed() < Duration::from_secs(8),
            "expired after {:?}",
            stopped.elapsed()
        );
        assert_eq!(b.endpoints().await.unwrap()[0].node, "by-hand");
        tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|i| *i > with_it))
            .await
            .expect("the follower moved the index after the expiry")
            .unwrap();
        assert!(b.index().await.unwrap() > with_it);
    });
    follower.abort();
}

/// The shared CA: created once however many daemons start at once; a step is taken only from
/// the revision it was computed from.
#[test]
fn etcd_shared_ca_is_created_once_and_stepped_by_compare_and_swap() {
    on_etcd(|h| async move {
        let seal = crate::ca::SealKey::from_secret(&[7u8; 32]).unwrap();
        let nowhere = std::path::Path::new("/nonexistent-ringctl-ca");
        let made: Vec<(crate::ca::SharedCa, i64)> = h
            .on_threads(3, move |_, s| async move {
                let seal = crate::ca::SealKey::from_secret(&[7u8; 32]).unwrap();
                let mine = crate::ca::SharedCa::create("dc1", &seal, nowhere).unwrap();
                s.ca_create(&mine).await.unwrap()
            })
            .await;
        assert!(made.iter().all(|m| *m == made[0]), "one CA for all");
        let (ca, rev) = h.store.ca_record().await.unwrap().unwrap();
        assert_eq!((&ca, rev), (&made[0].0, made[0].1));
        let before = h.store.index().await.unwrap();
        let next = ca.next(&seal).unwrap();
        assert!(h.store.ca_step(rev, &next, false).await.unwrap());
        assert!(
            h.store.index().await.unwrap() > before,
            "a step moves the index"
        );
        // The same step computed from the old revision (another daemon's) is not taken.
        let stale = ca.next(&seal).unwrap();
        assert!(!h.store.ca_step(rev, &stale, false).await.unwrap());
        let (now, rev2) = h.store.ca_record().await.unwrap().unwrap();
        assert_eq!(now, next);
        // The step that makes the new root sign moves the certificate generation with it.
        let signing = now.next(&seal).unwrap();
        assert!(h.store.ca_step(rev2, &signing, true).await.unwrap());
        let snap = h.store.snapshot().await.unwrap();
        assert_eq!(snap.counter("certgen"), 1);
        assert_eq!(snap.ca.unwrap().0, signing);
    });
}

/// etcd gone: calls fail as unreachable and the store says so; back: the first call that
/// succeeds clears it.
#[test]
fn etcd_unreachable_is_told_apart_and_cleared() {
    let mut server = EtcdServer::start();
    let o = etcd_options(&server);
    let rt = runtime();
    let s = rt.block_on(Store::connect_etcd(&o)).unwrap();
    assert!(s.unreachable().is_none());
    server.stop();
    let err = rt
        .block_on(s.apply(&[defaults("a", "1")]))
        .expect_err("etcd is down");
    assert!(err.unreachable, "{err}");
    assert!(
        err.to_string()
            .starts_with("store_unreachable: etcd at 127.0.0.1:"),
        "{err}"
    );
    let down = s.unreachable().expect("marked unreachable");
    assert!(down.reason.contains("unreachable"), "{}", down.reason);
    server.restart();
    rt.block_on(async {
        until("etcd answers again", || async { s.index().await.is_ok() }).await;
    });
    assert!(s.unreachable().is_none());
    // A refusal is not an outage.
    let err = rt
        .block_on(s.register_endpoint(&endpoint("nope", "198.18.0.1", "n")))
        .unwrap_err();
    assert!(!err.unreachable);
}

/// Redb's follower has nothing to follow: it returns at once.
#[test]
fn redb_follow_index_returns() {
    on_redb(|h| async move {
        let tx = tokio::sync::watch::Sender::new(0u64);
        let (news, _) = tokio::sync::mpsc::unbounded_channel();
        h.store.follow_index(&tx, &news).await;
    });
}

#[test]
fn store_urls_parse() {
    let o = EtcdOptions::parse("etcd://10.0.0.1:2379,10.0.0.2:2379").unwrap();
    assert_eq!(o.endpoints, ["10.0.0.1:2379", "10.0.0.2:2379"]);
    assert_eq!(o.prefix, "/ringside/");
    let o = EtcdOptions::parse("etcd://h:1/mesh-a").unwrap();
    assert_eq!((o.endpoints.len(), o.prefix.as_str()), (1, "/mesh-a/"));
    assert_eq!(
        EtcdOptions::parse("etcd://h:1/").unwrap().prefix,
        "/ringside/"
    );
    assert!(EtcdOptions::parse("redis://h:1").is_err());
    assert!(EtcdOptions::parse("etcd://").is_err());
    assert!(EtcdOptions::parse("etcd://host")
        .unwrap_err()
        .contains("port"));
}
