//! Reading files: CRDs and config entries, errors with document, field and line, warnings.

use super::*;
use ringside_core::intentions::{Action, Pattern};
use std::time::Duration;

#[test]
fn protocol_names_are_the_serialized_ones() {
    for p in [
        Protocol::Tcp,
        Protocol::Http,
        Protocol::Http2,
        Protocol::Grpc,
    ] {
        assert_eq!(serde_json::to_value(p).unwrap(), p.as_str());
    }
}

const FILE: &str = "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: products-api
spec:
  protocol: http
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceIntentions
metadata:
  name: products-api
spec:
  destination:
    name: products-api
  sources:
    - name: public-api
      action: allow
    - name: '*'
      action: deny
---
apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceSplitter
metadata:
  name: products-api
spec:
  splits:
    - weight: 75
      serviceSubset: v1
    - weight: 25
      serviceSubset: v2
";

#[test]
fn parses_a_multi_document_file() {
    let docs = parse(FILE).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(docs.len(), 3);
    assert_eq!(docs[0].id(), "ServiceDefaults/products-api");
    match &docs[0] {
        Document::ServiceDefaults { spec, .. } => assert_eq!(spec.protocol, Protocol::Http),
        d => panic!("{d:?}"),
    }
    let rules = intentions(&docs);
    assert_eq!(rules.len(), 2);
    assert_eq!(rules[1].source, Pattern::Any);
    assert_eq!(rules[1].action, Action::Deny);
}

#[test]
fn a_bad_document_names_document_field_and_line() {
    let bad = FILE.replace("      action: deny", "      action: maybe");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.document, 2);
    assert_eq!(e.id.as_deref(), Some("ServiceIntentions/products-api"));
    assert_eq!(e.field, "spec.sources[1].action");
    // The line of the second source's action, not the first's.
    assert_eq!(e.line, Some(19), "{e}");
    assert!(
        e.to_string()
            .starts_with("document 2 (ServiceIntentions/products-api), line 19"),
        "{e}"
    );
}

#[test]
fn semantic_errors() {
    let bad = FILE.replace("weight: 25", "weight: 20");
    let e = parse(&bad).unwrap_err();
    assert_eq!((e.document, e.field.as_str()), (3, "spec.splits"));
    assert!(e.message.contains("95"), "{e}");
    assert_eq!(e.line, Some(26));

    let bad = FILE.replace("      action: allow\n", "");
    let e = parse(&bad).unwrap_err();
    assert_eq!(e.field, "spec.sources[0]");
    assert_eq!(e.line, Some(16));

    let bad = FILE.replace("kind: ServiceSplitter", "kind: ServiceSplitterz");
    let e = parse(&bad).unwrap_err();
    assert_eq!((e.document, e.field.as_str()), (3, "kind"));

    let bad = FILE.replacen("consul.hashicorp.com/v1alpha1", "v2", 1);
    let e = parse(&bad).unwrap_err();
    assert_eq!(
        (e.document, e.field.as_str(), e.line),
        (1, "apiVersion", Some(1))
    );

    let bad = FILE.replace("  protocol: http", "  protocol: smtp");
    let e = parse(&bad).unwrap_err();
    assert_eq!(
        (e.document, e.field.as_str(), e.line),
        (1, "spec.protocol", Some(6))
    );
}

// ---------------------------------------------------------------------------------------------
// The corpus: Consul documents as Consul's documentation writes them (tests/fixtures/consul).
// ---------------------------------------------------------------------------------------------

macro_rules! fixture {
    ($name:literal) => {
        include_str!(concat!("../../../tests/fixtures/consul/", $name))
    };
}

/// The fields a file is warned about, as `Kind/name field`.
fn warned(p: &Parsed) -> Vec<String> {
    p.warnings
        .iter()
        .map(|w| format!("{} {}", w.id.as_deref().unwrap_or("?"), w.field))
        .collect()
}

#[test]
fn service_defaults_every_consul_field_is_applied_or_warned() {
    let p = parse_checked(fixture!("service-defaults.yaml")).unwrap();
    assert_eq!(p.docs.len(), 2);
    assert_eq!(
        warned(&p),
        [
            "spec.mode",
            "spec.transparentProxy",
            "spec.meshGateway",
            "spec.expose",
            "spec.balanceInboundConnections",
            "spec.envoyExtensions",
            "spec.upstreamConfig.defaults.meshGateway",
            "spec.upstreamConfig.defaults.limits.maxPendingRequests",
            "spec.upstreamConfig.defaults.passiveHealthCheck.interval",
            "spec.upstreamConfig.defaults.passiveHealthCheck.enforcingConsecutive5xx",
            "spec.upstreamConfig.defaults.passiveHealthCheck.maxEjectionPercent",
            "spec.upstreamConfig.overrides[1]",
        ]
        .map(|f| format!("ServiceDefaults/api {f}"))
    );
    // Each warning names the field, its line, and says it has no effect.
    let w = &p.warnings[1];
    assert_eq!(w.line, Some(13), "{w}");
    assert!(
        w.to_string().starts_with(
            "document 1 (ServiceDefaults/api), line 13, field `spec.transparentProxy`: has no effect in ringside"
        ),
        "{w}"
    );
    let peer = p.warnings.last().unwrap();
    assert!(peer.message.contains("peer"), "{peer}");

    // The applied fields, as a proxy of api receives them.
    let inbound = inbound_settings(&p.docs, "api");
    assert_eq!(
        inbound,
        ringside_core::config::InboundSettings {
            mtls_mode: Some(ringside_core::config::MtlsMode::Permissive),
            local_connect_timeout: Some(Duration::from_millis(3000)),
            local_request_timeout: Some(Duration::from_millis(20000)),
            max_inbound_connections: Some(100),
        }
    );
    assert_eq!(
        inbound_settings(&p.docs, "db").mtls_mode,
        Some(ringside_core::config::MtlsMode::Strict)
    );
    assert_eq!(
        inbound_settings(&p.docs, "other"),
        Default::default(),
        "a service without ServiceDefaults keeps the sidecar's settings"
    );
    let up = upstream_settings(&p.docs, "api");
    assert_eq!(
        up.keys().collect::<Vec<_>>(),
        ["*", "db"],
        "the override for a peer is left out"
    );
    let d = up["*"];
    assert_eq!(d.connect_timeout, Some(Duration::from_millis(1500)));
    assert_eq!(d.max_connections, Some(512));
    assert_eq!(d.max_requests, Some(256));
    assert_eq!(d.outlier_5xx, Some(3));
    assert_eq!(d.base_ejection, Some(Duration::from_secs(30)));
    let db = d.merged(&up["db"]);
    assert_eq!(db.connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(db.max_connections, Some(8));
    assert_eq!(
        db.max_requests,
        Some(256),
        "the defaults stay under an override"
    );
    assert!(upstream_settings(&p.docs, "db").is_empty());
}

#[test]
fn consul_zero_values_mean_the_default() {
    let p = parse_checked(
        "apiVersion: consul.hashicorp.com/v1alpha1
kind: ServiceDefaults
metadata:
  name: api
spec:
  mutualTLSMode: ''
  maxInboundConnections: 0
  localConnectTimeoutMs: 0
  upstreamConfig:
    defaults:
      connectTimeoutMs: 0
      limits:
        maxConnections: 0
",
    )
    .unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    assert_eq!(inbound_settings(&p.docs, "api"), Default::default());
    assert_eq!(upstream_settings(&p.docs, "api")["*"], Default::default());
}

#[test]
fn intentions_every_matcher_is_applied() {
    let p = parse_checked(fixture!("service-intentions.yaml")).unwrap();
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let rules = intentions(&p.docs);
    assert_eq!(rules.len(), 3);
    let perms = &rules[0].permissions;
    let h = |pairs: &[(&'static str, &'static str)]| {
        let mut m = hyper::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, hyper::header::HeaderValue::from_static(v));
        }
        m
    };
    let permit = |method: &str, path: &str, headers: &hyper::HeaderMap| {
        ringside_core::l7::rules::permit(perms, method, path, headers).0
    };
    let good = h(&[
        ("x-team", "a"),
        ("x-env", "prod"),
        ("x-trace", "00-abc"),
        ("x-zone", "eu.internal"),
        ("x-version", "v2"),
    ]);
    assert!(permit("HEAD", "/healthz", &h(&[])), "pathExact + methods");
    assert!(!permit("POST", "/healthz", &h(&[])), "methods");
    assert!(permit("GET", "/v1/items", &good));
    assert!(!permit("GET", "/v1/admin/x", &good), "pathRegex deny first");
    for (drop, why) in [
        ("x-team", "present"),
        ("x-env", "exact"),
        ("x-trace", "prefix"),
        ("x-zone", "suffix"),
        ("x-version", "regex"),
    ] {
        let mut m = good.clone();
        m.remove(drop);
        assert!(!permit("GET", "/v1/items", &m), "{why}");
    }
    let mut m = good.clone();
    m.insert("x-version", "v2x".parse().unwrap());
    assert!(
        !permit("GET", "/v1/items", &m),
        "regex matches the whole value"
    );
    m = good.clone();
    m.insert("x-debug", "1".parse().unwrap());
    assert!(!permit("GET", "/v1/items", &m), "invert");
    assert_eq!(rules[1].action, Action::Deny);
    assert_eq!(rules[2].source, Pattern::Any);
}

#[test]
fn router_splitter_resolver_as_consul_documents_them() {
    let p = parse_checked(fixture!("service-router.yaml")).unwrap();
    assert_eq!(
        warned(&p),
        [
            "spec.routes[1].destination.retryOn[1]",
            "spec.routes[1].destination.idleTimeout",
            "spec.routes[1].destination.requestHeaders",
            "spec.routes[1].destination.responseHeaders",
        ]
        .map(|f| format!("ServiceRouter/api {f}"))
    );
    assert!(p.warnings[0].message.contains("'reset' is not retried"));
    let c = l7_config(&p.docs);
    let r = &c.routers["api"].routes;
    assert_eq!(r[0].destination.prefix_rewrite.as_deref(), Some("/"));
    assert_eq!(
        r[0].destination.request_timeout,
        Some(Duration::from_secs(10))
    );
    assert_eq!(r[0].destination.num_retries, Some(3));
    assert_eq!(r[0].destination.retry_on_connect_failure, Some(true));
    assert_eq!(r[0].destination.retry_on_status_codes, [503]);
    let headers = {
        let mut m = hyper::HeaderMap::new();
        m.insert("x-debug", "1".parse().unwrap());
        m
    };
    let canary = |q| {
        c.route("api", "GET", "/", q, &headers)
            .map(|r| r.destination.service.clone())
    };
    assert_eq!(canary(Some("canary")), Some(Some("api-canary".into())));
    assert_eq!(canary(Some("other=1")), None, "queryParam present");

    let p = parse_checked(fixture!("service-splitter.yaml")).unwrap();
    assert_eq!(
        warned(&p),
        ["ServiceSplitter/api-canary spec.splits[0].requestHeaders"]
    );
    let c = l7_config(&p.docs);
    assert_eq!(c.split("api-canary", 95.0), "api-v2");

    let p = parse_checked(fixture!("service-resolver.yaml")).unwrap();
    assert_eq!(
        warned(&p),
        [
            "ServiceResolver/api spec.loadBalancer",
            "ServiceResolver/api spec.failover.*.targets[1]",
        ]
    );
    let c = l7_config(&p.docs);
    let r = &c.resolvers["api"];
    assert_eq!(r.connect_timeout, Some(Duration::from_secs(2)));
    assert_eq!(r.request_timeout, Some(Duration::from_secs(15)));
    assert!(r.subsets["v1"].only_passing);
    assert_eq!(r.default_subset.as_deref(), Some("v1"));
    assert_eq!(
        c.failover("api"),
        ["api-backup"],
        "the target in another datacenter is skipped"
    );
}

#[test]
fn json_config_entries_as_consul_config_write_takes_them() {
    let p = parse_checked(fixture!("web-intentions.json")).unwrap();
    assert_eq!(p.docs.len(), 1);
    assert_eq!(p.docs[0].id(), "ServiceIntentions/web");
    assert_eq!(p.docs[0].destination(), Some("web"));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    let rules = intentions(&p.docs);
    assert_eq!(rules.len(), 2);
    let perm = &rules[0].permissions[0];
    assert_eq!(perm.http.path_prefix.as_deref(), Some("/api/"));
    assert_eq!(perm.http.methods, ["GET", "POST"]);
    assert!(perm.http.header[0].invert);
    assert_eq!(perm.http.header[0].suffix.as_deref(), Some("-ops"));

    let p = parse_checked(fixture!("web-defaults.json")).unwrap();
    assert_eq!(warned(&p), ["ServiceDefaults/web spec.transparentProxy"]);
    assert_eq!(p.warnings[0].line, Some(8), "{}", p.warnings[0]);
    let inbound = inbound_settings(&p.docs, "web");
    assert_eq!(
        inbound.mtls_mode,
        Some(ringside_core::config::MtlsMode::Strict)
    );
    assert_eq!(inbound.local_connect_timeout, Some(Duration::from_secs(1)));
    assert_eq!(inbound.max_inbound_connections, Some(50));
    let up = upstream_settings(&p.docs, "web");
    assert_eq!(up["*"].connect_timeout, Some(Duration::from_millis(750)));
    assert_eq!(up["*"].max_requests, Some(64));
    assert_eq!(up["api"].outlier_5xx, Some(7));

    // Two entries in one file; subset names keep their case.
    let p = parse_checked(fixture!("web-resolver-router.json")).unwrap();
    assert_eq!(
        p.docs.iter().map(Document::id).collect::<Vec<_>>(),
        ["ServiceResolver/web", "ServiceRouter/web"]
    );
    let c = l7_config(&p.docs);
    assert!(c.resolvers["web"].subsets["Blue"].only_passing);
    assert_eq!(
        c.resolvers["web"].connect_timeout,
        Some(Duration::from_secs(3))
    );
    assert_eq!(c.failover("web"), ["web-dr"]);
    let route = &c.routers["web"].routes[0];
    assert_eq!(route.destination.retry_on, ["5xx"]);
    assert_eq!(route.destination.num_retries, Some(2));
    assert!(c
        .route("web", "GET", "/old/x", Some("v=1"), &Default::default())
        .is_some());

    // snake_case keys (older Consul files) read the same.
    let p = parse_checked(
        r#"{"kind": "service-defaults", "name": "x", "protocol": "http", "local_connect_timeout_ms": 250, "mutual_tls_mode": "permissive"}"#,
    )
    .unwrap();
    let i = inbound_settings(&p.docs, "x");
    assert_eq!(i.local_connect_timeout, Some(Duration::from_millis(250)));
    assert_eq!(
        i.mtls_mode,
        Some(ringside_core::config::MtlsMode::Permissive)
    );
}

#[test]
fn json_entry_errors_name_the_entry_field_and_line() {
    let bad = fixture!("web-intentions.json").replace("\"PathPrefix\"", "\"PathPrefx\"");
    let e = parse_checked(&bad).unwrap_err();
    assert_eq!(e.id.as_deref(), Some("ServiceIntentions/web"));
    assert!(e.message.contains("unknown field `pathPrefx`"), "{e}");
    assert_eq!(e.line, Some(11), "{e}");
    let e = parse_checked(r#"{"Kind": "mesh", "Name": "mesh"}"#).unwrap_err();
    assert_eq!(e.field, "Kind");
    assert!(e.message.contains("unknown kind 'mesh'"), "{e}");
    let e = parse_checked(r#"{"Kind": "service-defaults", "Name": "x", "Protocol": "http""#)
        .unwrap_err();
    assert_eq!(e.line, Some(1), "{e}");
}

#[test]
fn refused_what_ringside_cannot_enforce_and_typos() {
    let e = parse_checked(fixture!("refused/jwt-permission.yaml")).unwrap_err();
    assert_eq!(e.field, "spec.sources[0].permissions[0].jwt");
    assert!(e.message.contains("cannot verify JWTs"), "{e}");
    let e = parse_checked(fixture!("refused/peer-source.yaml")).unwrap_err();
    assert_eq!(e.field, "spec.sources[0].peer");
    assert!(e.message.contains("refused"), "{e}");
    let e = parse_checked(fixture!("refused/typo-matcher.yaml")).unwrap_err();
    assert!(e.message.contains("unknown field `pathPrefx`"), "{e}");
    assert_eq!(e.line, Some(13), "{e}");
    let e = parse_checked(fixture!("refused/typo-defaults.yaml")).unwrap_err();
    assert!(
        e.message.contains("unknown field `localConectTimeoutMs`"),
        "{e}"
    );
    assert_eq!(e.line, Some(7), "{e}");
    let e = parse_checked(
        &fixture!("service-router.yaml").replace("[gateway-error, reset]", "[gateway-eror]"),
    )
    .unwrap_err();
    assert!(
        e.message
            .contains("'gateway-eror' is not a retry condition"),
        "{e}"
    );
    let e = parse_checked(
        &fixture!("service-defaults.yaml")
            .replace("mutualTLSMode: permissive", "mutualTLSMode: lenient"),
    )
    .unwrap_err();
    assert_eq!(e.field, "spec.mutualTLSMode");
}

#[test]
fn documents_stored_by_earlier_versions_still_read() {
    // What the previous version stored (the typed documents, serialized).
    let old = serde_json::json!([
        {"kind": "ServiceDefaults", "name": "web", "spec": {"protocol": "http", "mutualTlsMode": "strict"}},
        {"kind": "ServiceRouter", "name": "web", "spec": {"routes": [{"match": {"http": {
            "pathExact": null, "pathPrefix": "/v2/", "pathRegex": null, "methods": [], "header": [],
            "caseInsensitive": false}}, "destination": {"service": "web-v2", "serviceSubset": null,
            "prefixRewrite": "/", "requestTimeout": null, "numRetries": null,
            "retryOnConnectFailure": null, "retryOnStatusCodes": []}}]}},
        {"kind": "ServiceResolver", "name": "web", "spec": {"connectTimeout": null, "requestTimeout": "2s",
            "failover": {}, "defaultSubset": null, "subsets": {"v1": {"filter": "Service.Meta.v == 1", "onlyPassing": false}}}}
    ]);
    let docs: Vec<Document> = serde_json::from_value(old).unwrap();
    assert_eq!(
        inbound_settings(&docs, "web").mtls_mode,
        Some(ringside_core::config::MtlsMode::Strict)
    );
    let c = l7_config(&docs);
    assert_eq!(
        c.routers["web"].routes[0].destination.service.as_deref(),
        Some("web-v2")
    );
    // And what this version stores reads back the same.
    let p = parse_checked(fixture!("service-defaults.yaml")).unwrap();
    let back: Vec<Document> =
        serde_json::from_value(serde_json::to_value(&p.docs).unwrap()).unwrap();
    assert_eq!(back, p.docs);
    let json = serde_json::to_value(&p.docs[0]).unwrap();
    assert_eq!(
        json["spec"]["mutualTLSMode"], "permissive",
        "Consul's spelling"
    );
}

#[test]
fn every_field_without_effect_in_the_corpus_is_documented() {
    let doc = include_str!("../../../docs/reference.md");
    let corpus = [
        fixture!("service-defaults.yaml"),
        fixture!("service-router.yaml"),
        fixture!("service-splitter.yaml"),
        fixture!("service-resolver.yaml"),
        fixture!("web-defaults.json"),
    ];
    for text in corpus {
        for w in parse_checked(text).unwrap().warnings {
            // The field's own name (`retryOn[1]` -> `retryOn`), or its list's for a whole entry.
            let name = w
                .field
                .rsplit('.')
                .map(|s| s.split('[').next().unwrap_or(s))
                .find(|s| !s.is_empty())
                .unwrap();
            assert!(
                [
                    format!("`{name}`"),
                    format!(".{name}`"),
                    format!(".{name}[]")
                ]
                .iter()
                .any(|n| doc.contains(n.as_str())),
                "docs/reference.md does not name `{name}` ({w})"
            );
        }
    }
}
