//! Properties of the decision core, checked on random inputs (proptest): intention precedence
//! against a brute-force reference, path normalization, protocol detection on arbitrary bytes,
//! endpoint choice fairness, configuration files round trip (YAML and TOML to one validated config).

use proptest::prelude::*;
use ringside_core::decide::detect::{classify, Detection, Want};
use ringside_core::intentions::{Action, Intentions};
use ringside_core::policy::path::{is_normal, normalize};

const NAMES: [&str; 4] = ["a", "b", "c", "*"];

fn rules() -> impl Strategy<Value = Vec<(usize, usize, bool)>> {
    prop::collection::vec((0..4usize, 0..4usize, any::<bool>()), 0..12)
}

fn intentions(rules: &[(usize, usize, bool)], default_allow: bool) -> Intentions {
    let yaml = format!(
        "default: {}\nrules:\n{}",
        if default_allow { "allow" } else { "deny" },
        rules
            .iter()
            .map(|(s, d, allow)| format!(
                "  - {{ source: '{}', destination: '{}', action: {} }}\n",
                NAMES[*s],
                NAMES[*d],
                if *allow { "allow" } else { "deny" }
            ))
            .collect::<String>()
    );
    let yaml = if rules.is_empty() {
        yaml.replace("rules:\n", "rules: []\n")
    } else {
        yaml
    };
    serde_yaml::from_str(&yaml).unwrap()
}

/// Consul's precedence, spelled out: the most specific tier that has a matching rule decides
/// (exact/exact, */exact, exact/*, */*), and a deny in that tier wins.
fn reference(rules: &[(usize, usize, bool)], default_allow: bool, src: &str, dst: &str) -> bool {
    let m = |k: usize, name: &str| NAMES[k] == "*" || NAMES[k] == name;
    let exact = |k: usize| NAMES[k] != "*";
    for (src_exact, dst_exact) in [(true, true), (false, true), (true, false), (false, false)] {
        let tier: Vec<bool> = rules
            .iter()
            .filter(|(s, d, _)| {
                m(*s, src) && m(*d, dst) && exact(*s) == src_exact && exact(*d) == dst_exact
            })
            .map(|(_, _, allow)| *allow)
            .collect();
        if !tier.is_empty() {
            return tier.iter().all(|a| *a);
        }
    }
    default_allow
}

proptest! {
    #[test]
    fn intention_precedence_matches_the_reference(rules in rules(), default_allow in any::<bool>()) {
        let set = intentions(&rules, default_allow);
        for src in ["a", "b", "c", "d"] {
            for dst in ["a", "b", "c", "d"] {
                let got = set.evaluate(src, dst).action == Action::Allow;
                prop_assert_eq!(got, reference(&rules, default_allow, src, dst), "{} -> {}", src, dst);
            }
        }
    }

    #[test]
    fn a_path_called_normal_is_what_normalizing_makes_of_it(
        p in prop_oneof!["[/a-zA-Z0-9%.\\\\_~*?-]{0,30}", "/[a-zA-Z0-9_~/-]{0,30}", "/[a-z/.%]{0,12}"]
    ) {
        if is_normal(&p) {
            prop_assert_eq!(normalize(&p), Ok(p.clone()));
        }
    }

    #[test]
    fn normalized_paths_are_canonical(p in "/[a-zA-Z0-9%./_~-]{0,40}") {
        if let Ok(n) = normalize(&p) {
            prop_assert!(n.starts_with('/'), "{}", n);
            prop_assert!(!n.contains("//"), "{}", n);
            for seg in n.split('/') {
                prop_assert!(seg != "." && seg != "..", "{} has a dot segment", n);
            }
            prop_assert_eq!(normalize(&n), Ok(n.clone()), "idempotent");
        }
    }

    /// A permission on a prefix sees a path and its disguises alike: inserting `./`, `x/../` or
    /// a doubled slash, or percent-encoding an unreserved character, never changes the result.
    #[test]
    fn disguises_normalize_to_the_same_path(
        segs in prop::collection::vec("[a-z0-9]{1,6}", 1..5),
        at in 0usize..5,
        how in 0usize..4,
    ) {
        let plain = format!("/{}", segs.join("/"));
        // Before an existing segment: a dot segment or empty segment at the very end means the
        // directory (`/a/.` is `/a/`), which is a different resource.
        let k = at % segs.len();
        let mut parts: Vec<String> = segs.clone();
        match how {
            0 => parts.insert(k, ".".into()),
            1 => {
                parts.insert(k, "zz".into());
                parts.insert(k + 1, "..".into());
            }
            2 => parts.insert(k, String::new()),
            _ => {
                let s = &mut parts[k];
                let c = s.remove(0);
                *s = format!("%{:02X}{}", c as u32, s);
            }
        }
        let disguised = format!("/{}", parts.join("/"));
        prop_assert_eq!(normalize(&disguised), normalize(&plain), "{}", disguised);
    }

    /// Detection never panics, asks only for more than it has, and says TLS only for bytes that
    /// start like a TLS handshake.
    #[test]
    fn detection_on_arbitrary_bytes(b in prop::collection::vec(any::<u8>(), 0..600), tls in any::<bool>()) {
        let want = if tls { Want::TlsOrPlain } else { Want::Http };
        match classify(want, &b) {
            Detection::NeedMore(n) => prop_assert!(n > b.len(), "asks {} with {}", n, b.len()),
            Detection::Tls { .. } => prop_assert!(tls && b.first() == Some(&0x16)),
            Detection::Http => prop_assert!(!b.is_empty()),
            Detection::Other | Detection::Timeout => {}
        }
    }
}

/// A cluster of `n` endpoints with `lb`, the endpoints in `ejected` ejected at `now`.
fn cluster_with(
    n: usize,
    lb: ringside_core::config::LbPolicy,
    ejected: &[bool],
    now: std::time::Instant,
) -> std::sync::Arc<ringside_core::upstream::Cluster> {
    let eps: Vec<std::net::SocketAddr> = (0..n)
        .map(|i| format!("127.0.0.1:{}", 1000 + i).parse().unwrap())
        .collect();
    let mut s = ringside_core::config::Service::new("s", eps);
    s.lb = lb;
    s.base_ejection = std::time::Duration::from_secs(30);
    let c = ringside_core::upstream::Cluster::new(s, now);
    for (i, _) in ejected.iter().enumerate().filter(|(_, e)| **e) {
        c.report_failure(i, now);
    }
    c
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Endpoint choice, for any number of endpoints and any of them ejected: an ejected endpoint
    /// is never chosen while another is eligible (all ejected: one is still chosen, Envoy's
    /// panic mode); round-robin gives every eligible endpoint the same share, exactly;
    /// least-connections never picks a busier endpoint than the least busy eligible one;
    /// least-request (two random choices) spreads equal loads over every eligible endpoint.
    #[test]
    fn endpoint_choice_is_fair(
        n in 1..12usize,
        ejected_bits in any::<u16>(),
        active in prop::collection::vec(0..4u32, 12),
        rounds in 1..20usize,
    ) {
        use ringside_core::config::LbPolicy;
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::Instant::now();
        let ejected: Vec<bool> = (0..n).map(|i| ejected_bits & (1 << i) != 0).collect();
        let eligible: Vec<usize> = (0..n).filter(|&i| !ejected[i]).collect();
        for lb in [LbPolicy::RoundRobin, LbPolicy::LeastConnections, LbPolicy::LeastRequest] {
            let c = cluster_with(n, lb, &ejected, now);
            let mut guards = Vec::new();
            if lb == LbPolicy::LeastConnections {
                for (i, a) in active.iter().take(n).enumerate() {
                    for _ in 0..*a {
                        guards.push(c.open(i));
                    }
                }
            }
            let picks = rounds * eligible.len().max(1) * if lb == LbPolicy::LeastRequest { 40 } else { 1 };
            let mut counts = vec![0usize; n];
            for _ in 0..picks {
                let i = c.pick(0, now).expect("an endpoint is always chosen");
                prop_assert!(i < n);
                if !eligible.is_empty() {
                    prop_assert!(!ejected[i], "{lb:?} chose ejected endpoint {i} (ejected {ejected:?})");
                }
                if lb == LbPolicy::LeastConnections && !eligible.is_empty() {
                    let least = eligible.iter().map(|&k| c.endpoints[k].active.load(Relaxed)).min().unwrap();
                    prop_assert_eq!(c.endpoints[i].active.load(Relaxed), least, "{:?}", lb);
                    guards.push(c.open(i));
                }
                counts[i] += 1;
            }
            match lb {
                LbPolicy::RoundRobin if !eligible.is_empty() => {
                    for &k in &eligible {
                        prop_assert_eq!(counts[k], rounds, "round-robin shares {:?} (ejected {:?})", counts, ejected);
                    }
                }
                LbPolicy::LeastRequest if !eligible.is_empty() => {
                    for &k in &eligible {
                        // With equal loads the two choices are uniform: each gets about
                        // picks / eligible, and surely more than a quarter of that.
                        prop_assert!(
                            counts[k] * 4 * eligible.len() > picks,
                            "least-request shares {counts:?} (ejected {ejected:?})"
                        );
                    }
                }
                _ => {}
            }
        }
    }
}

/// A valid configuration file as a document tree: services with endpoints and settings, listeners
/// naming them, process settings, intentions.
fn config_doc() -> impl Strategy<Value = serde_json::Value> {
    let service = (
        prop::collection::vec((1..255u8, 1..255u8, 1..65535u16), 1..4),
        prop::sample::select(vec!["round_robin", "least_connections", "least_request"]),
        1..30u64,
        0..5u32,
        prop::sample::select(vec!["tcp", "http", "http2"]),
    );
    (
        prop::collection::vec(service, 1..4),
        prop::collection::vec(0..3usize, 1..4),
        1..8usize,
        1..100_000usize,
        prop::option::of(1..7200u64),
        any::<bool>(),
        rules(),
    )
        .prop_map(
            |(services, listeners, workers, max_conn, idle, default_allow, rules)| {
                let n = services.len();
                let services: Vec<serde_json::Value> = services
                    .into_iter()
                    .enumerate()
                    .map(|(i, (eps, lb, timeout, retries, protocol))| {
                        serde_json::json!({
                            "name": format!("svc-{i}"),
                            "endpoints": eps
                                .iter()
                                .map(|(a, b, p)| format!("10.{a}.{b}.1:{p}"))
                                .collect::<Vec<_>>(),
                            "lb": lb,
                            "connect_timeout": format!("{timeout}s"),
                            "retries": retries,
                            "protocol": protocol,
                        })
                    })
                    .collect();
                let listeners: Vec<serde_json::Value> = listeners
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| {
                        serde_json::json!({
                            "name": format!("l{i}"),
                            "address": format!("127.0.0.1:{}", 20000 + i),
                            "service": format!("svc-{}", s % n),
                        })
                    })
                    .collect();
                let mut proxy = serde_json::json!({
                    "workers": workers,
                    "max_connections": max_conn,
                });
                if let Some(s) = idle {
                    proxy["idle_timeout"] = serde_json::json!(format!("{s}s"));
                }
                let rules: Vec<serde_json::Value> = rules
                    .iter()
                    .map(|(s, d, allow)| {
                        serde_json::json!({
                            "source": NAMES[*s],
                            "destination": NAMES[*d],
                            "action": if *allow { "allow" } else { "deny" },
                        })
                    })
                    .collect();
                serde_json::json!({
                    "proxy": proxy,
                    "services": services,
                    "listeners": listeners,
                    "intentions": {
                        "default": if default_allow { "allow" } else { "deny" },
                        "rules": rules,
                    },
                })
            },
        )
}

proptest! {
    /// A generated configuration written as YAML and as TOML reads back to one validated config
    /// (compared as its `/config_dump` JSON) that holds what was written.
    #[test]
    fn config_files_round_trip(doc in config_doc()) {
        use ringside_core::config::{Config, Format};
        let yaml = serde_yaml::to_string(&doc).unwrap();
        let toml = toml::to_string(&doc).unwrap();
        let from_yaml = Config::parse(&yaml, Format::Yaml)
            .unwrap_or_else(|e| panic!("refused: {e}\n{yaml}"));
        let from_toml = Config::parse(&toml, Format::Toml)
            .unwrap_or_else(|e| panic!("refused: {e}\n{toml}"));
        let dump = serde_json::to_value(&from_yaml).unwrap();
        prop_assert_eq!(&dump, &serde_json::to_value(&from_toml).unwrap());
        // What was written is what runs.
        prop_assert_eq!(from_yaml.proxy.workers, doc["proxy"]["workers"].as_u64().unwrap() as usize);
        prop_assert_eq!(
            from_yaml.proxy.idle_timeout.map(|d| d.as_secs()),
            // Absent: the default hour.
            Some(
                doc["proxy"]["idle_timeout"]
                    .as_str()
                    .map_or(3600, |s| s.trim_end_matches('s').parse().unwrap())
            )
        );
        let services = doc["services"].as_array().unwrap();
        prop_assert_eq!(from_yaml.services.len(), services.len());
        for (s, d) in from_yaml.services.iter().zip(services) {
            prop_assert_eq!(&s.name, d["name"].as_str().unwrap());
            let eps: Vec<String> = s.endpoints.iter().map(|e| e.to_string()).collect();
            prop_assert_eq!(serde_json::json!(eps), d["endpoints"].clone());
            prop_assert_eq!(serde_json::to_value(s.lb).unwrap(), d["lb"].clone());
            prop_assert_eq!(s.retries, d["retries"].as_u64().unwrap() as u32);
        }
        let listeners = doc["listeners"].as_array().unwrap();
        prop_assert_eq!(from_yaml.listeners.len(), listeners.len());
        for (l, d) in from_yaml.listeners.iter().zip(listeners) {
            prop_assert_eq!(l.address.to_string(), d["address"].as_str().unwrap());
            let ringside_core::config::ListenerKind::Static(k) = l.kind else {
                panic!("a static listener: {:?}", l.kind);
            };
            prop_assert_eq!(&from_yaml.services[k].name, d["service"].as_str().unwrap());
        }
        // The dump itself is stable: the same config serializes the same way twice.
        prop_assert_eq!(dump, serde_json::to_value(Config::parse(&yaml, Format::Yaml).unwrap()).unwrap());
    }
}
