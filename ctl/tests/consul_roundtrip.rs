//! Consul documents round trip (proptest): valid documents generated as an operator writes them
//! (ServiceDefaults, ServiceIntentions with L7 permissions, ServiceRouter, ServiceSplitter), read
//! from YAML and from JSON to the same documents, written back as CRDs and read again: equal, with
//! the same effect (intentions and L7 rules for proxies).

use proptest::prelude::*;
use ringside_ctl::consul::{self, Document};
use serde_json::{json, Value};

const SERVICES: [&str; 4] = ["api", "web", "billing-v2", "*"];

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&SERVICES[..3])
}

fn path() -> impl Strategy<Value = String> {
    "(/[a-z0-9._-]{0,6}){1,3}/?"
}

fn header() -> impl Strategy<Value = Value> {
    (
        "x-[a-z]{1,6}",
        0..6usize,
        "[a-zA-Z0-9.-]{0,8}",
        any::<bool>(),
    )
        .prop_map(|(name, op, v, invert)| {
            let mut h = json!({ "name": name });
            match op {
                0 => h["present"] = json!(true),
                1 => h["exact"] = json!(v),
                2 => h["prefix"] = json!(v),
                3 => h["suffix"] = json!(v),
                4 => h["regex"] = json!(format!("{}[0-9]*", v.replace('.', "\\."))),
                _ => h["contains"] = json!(v),
            }
            if invert {
                h["invert"] = json!(true);
            }
            h
        })
}

fn http_match() -> impl Strategy<Value = Value> {
    (
        0..3usize,
        path(),
        prop::sample::subsequence(vec!["GET", "POST", "DELETE", "HEAD"], 0..3),
        prop::collection::vec(header(), 0..3),
    )
        .prop_map(|(kind, p, methods, headers)| {
            let mut m = json!({});
            match kind {
                0 => m["pathExact"] = json!(p),
                1 => m["pathPrefix"] = json!(p),
                _ => {}
            }
            if !methods.is_empty() {
                m["methods"] = json!(methods);
            }
            if !headers.is_empty() {
                m["header"] = json!(headers);
            }
            m
        })
}

fn action() -> impl Strategy<Value = &'static str> {
    prop::sample::select(vec!["allow", "deny"])
}

fn intentions() -> impl Strategy<Value = Value> {
    let source = (
        prop::sample::select(&SERVICES[..]),
        action(),
        prop::option::of(prop::collection::vec((action(), http_match()), 1..3)),
    )
        .prop_map(|(name, action, perms)| match perms {
            None => json!({ "name": name, "action": action }),
            Some(ps) => json!({
                "name": name,
                "permissions": ps
                    .into_iter()
                    .map(|(a, http)| json!({ "action": a, "http": http }))
                    .collect::<Vec<_>>(),
            }),
        });
    (name(), prop::collection::vec(source, 1..4)).prop_map(|(dst, mut sources)| {
        // One entry per source name, as Consul requires.
        let mut seen = std::collections::BTreeSet::new();
        sources.retain(|s| seen.insert(s["name"].as_str().unwrap_or_default().to_string()));
        crd(
            "ServiceIntentions",
            &format!("{dst}-in"),
            json!({ "destination": { "name": dst }, "sources": sources }),
        )
    })
}

fn defaults() -> impl Strategy<Value = Value> {
    (
        name(),
        prop::sample::select(vec!["tcp", "http", "http2", "grpc"]),
    )
        .prop_map(|(n, p)| crd("ServiceDefaults", n, json!({ "protocol": p })))
}

fn router() -> impl Strategy<Value = Value> {
    let route = (http_match(), name(), prop::option::of(0..5u32), 1..60u64).prop_map(
        |(http, service, retries, timeout)| {
            let mut d = json!({ "service": service, "requestTimeout": format!("{timeout}s") });
            if let Some(n) = retries {
                d["numRetries"] = json!(n);
            }
            json!({ "match": { "http": http }, "destination": d })
        },
    );
    (name(), prop::collection::vec(route, 1..4))
        .prop_map(|(n, routes)| crd("ServiceRouter", n, json!({ "routes": routes })))
}

fn splitter() -> impl Strategy<Value = Value> {
    (name(), 0..=100u32, name()).prop_map(|(n, w, other)| {
        let splits = if w == 100 {
            json!([{ "weight": 100, "service": n }])
        } else {
            json!([{ "weight": w, "service": n }, { "weight": 100 - w, "service": other }])
        };
        crd("ServiceSplitter", n, json!({ "splits": splits }))
    })
}

fn crd(kind: &str, name: &str, spec: Value) -> Value {
    json!({
        "apiVersion": consul::API_VERSION,
        "kind": kind,
        "metadata": { "name": name },
        "spec": spec,
    })
}

fn file() -> impl Strategy<Value = Vec<Value>> {
    prop::collection::vec(
        prop_oneof![intentions(), defaults(), router(), splitter()],
        1..5,
    )
}

fn yaml(docs: &[Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap())
        .collect::<Vec<_>>()
        .join("---\n")
}

/// What the daemon sends proxies from these documents.
fn effect(docs: &[Document]) -> Value {
    json!({ "intentions": consul::intentions(docs), "l7": consul::l7_config(docs) })
}

fn parsed(text: &str) -> Vec<Document> {
    match consul::parse_checked(text) {
        Ok(p) => p.docs,
        Err(e) => panic!("refused: {e}\n{text}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn consul_documents_round_trip(values in file()) {
        let from_yaml = parsed(&yaml(&values));
        let from_json = parsed(&serde_json::to_string_pretty(&values).unwrap());
        prop_assert_eq!(&from_yaml, &from_json);
        prop_assert_eq!(from_yaml.len(), values.len());
        for (d, v) in from_yaml.iter().zip(&values) {
            prop_assert_eq!(d.kind(), v["kind"].as_str().unwrap());
            prop_assert_eq!(d.name(), v["metadata"]["name"].as_str().unwrap());
        }
        // Written back as CRDs and read again.
        let written: Vec<Value> = from_yaml.iter().map(Document::to_crd).collect();
        let again = parsed(&yaml(&written));
        prop_assert_eq!(&again, &from_yaml);
        prop_assert_eq!(effect(&again), effect(&from_yaml));
        let again = parsed(&serde_json::to_string(&written).unwrap());
        prop_assert_eq!(&again, &from_yaml);
    }
}
