//! What the stored documents mean for proxies: intentions, the L7 rules, a service's inbound
//! settings and how its sidecars call their upstreams, with Consul's semantics (0 means the
//! default; an upstream override wins over the defaults).

use std::collections::BTreeMap;
use std::time::Duration;

use ringside_core::config::{InboundSettings, MtlsMode, UpstreamSettings};
use ringside_core::intentions::{Action, Intention, Pattern};
use ringside_core::l7::rules as core;

use super::spec::{ResolverSpec, RouterSpec, UpstreamEntry};
use super::{Document, Protocol};

/// The intentions a set of `ServiceIntentions` documents describe. A source with L7
/// permissions allows the connection; its permissions decide each request.
pub fn intentions(docs: &[Document]) -> Vec<Intention> {
    docs.iter()
        .filter_map(|d| match d {
            Document::ServiceIntentions { spec, .. } => Some(spec),
            _ => None,
        })
        .flat_map(|spec| {
            spec.sources.iter().filter_map(|s| {
                let permissions: Vec<core::Permission> = s
                    .permissions
                    .iter()
                    .flatten()
                    .map(|p| core::Permission {
                        action: p.action,
                        http: p.http.clone(),
                    })
                    .collect();
                let action = match (s.action, permissions.is_empty()) {
                    (Some(a), true) => a,
                    (_, false) => Action::Allow,
                    (None, true) => return None,
                };
                Some(Intention {
                    source: Pattern::from(s.name.clone()),
                    destination: Pattern::from(spec.destination.name.clone()),
                    action,
                    permissions,
                })
            })
        })
        .collect()
}

fn router(spec: &RouterSpec) -> core::RouterSpec {
    core::RouterSpec {
        routes: spec
            .routes
            .iter()
            .map(|r| {
                let http = r.match_.as_ref().and_then(|m| m.http.clone());
                core::Route {
                    match_: http.map(|h| core::RouteMatch {
                        http: core::HttpMatch {
                            path_exact: h.path_exact,
                            path_prefix: h.path_prefix,
                            path_regex: h.path_regex,
                            methods: h.methods,
                            header: h.header,
                            case_insensitive: h.case_insensitive,
                        },
                        query_param: h.query_param,
                    }),
                    destination: r
                        .destination
                        .as_ref()
                        .map(|d| core::RouteDestination {
                            service: d.service.clone(),
                            service_subset: d.service_subset.clone(),
                            prefix_rewrite: d.prefix_rewrite.clone(),
                            request_timeout: d.request_timeout,
                            num_retries: d.num_retries,
                            retry_on_connect_failure: d.retry_on_connect_failure,
                            retry_on_status_codes: d.retry_on_status_codes.clone(),
                            retry_on: d.retry_on.clone(),
                        })
                        .unwrap_or_default(),
                }
            })
            .collect(),
    }
}

fn resolver(spec: &ResolverSpec) -> core::ResolverSpec {
    core::ResolverSpec {
        connect_timeout: spec.connect_timeout.filter(|t| !t.is_zero()),
        request_timeout: spec.request_timeout.filter(|t| !t.is_zero()),
        failover: spec
            .failover
            .iter()
            .map(|(k, f)| {
                (
                    k.clone(),
                    core::FailoverTarget {
                        service: f.service.clone(),
                        targets: f
                            .targets
                            .iter()
                            .filter(|t| t.reachable())
                            .map(|t| core::FailoverTarget {
                                service: t.service.clone(),
                                targets: Vec::new(),
                            })
                            .collect(),
                    },
                )
            })
            .collect(),
        default_subset: spec.default_subset.clone(),
        subsets: spec.subsets.clone(),
    }
}

/// The routers, splitters and resolvers, by service, as proxies use them.
pub fn l7_config(docs: &[Document]) -> core::L7Config {
    let mut c = core::L7Config::default();
    for d in docs {
        match d {
            Document::ServiceRouter { name, spec } => {
                c.routers.insert(name.clone(), router(spec));
            }
            Document::ServiceResolver { name, spec } => {
                c.resolvers.insert(name.clone(), resolver(spec));
            }
            Document::ServiceSplitter { name, spec } => {
                c.splitters.insert(
                    name.clone(),
                    core::SplitterSpec {
                        splits: spec
                            .splits
                            .iter()
                            .map(|s| core::SplitTarget {
                                weight: s.weight,
                                service: s.service.clone(),
                                service_subset: s.service_subset.clone(),
                            })
                            .collect(),
                    },
                );
            }
            _ => {}
        }
    }
    c
}

/// The protocol a service is declared with (`ServiceDefaults`); `None` when undeclared (proxies
/// then detect it from the first bytes).
pub fn protocol_of(docs: &[Document], service: &str) -> Option<Protocol> {
    docs.iter().find_map(|d| match d {
        Document::ServiceDefaults { name, spec } if name == service => Some(spec.protocol),
        _ => None,
    })
}

fn ms(v: Option<u64>) -> Option<Duration> {
    v.filter(|&n| n > 0).map(Duration::from_millis)
}

/// The inbound side of `service`'s sidecars, from its `ServiceDefaults`.
pub fn inbound_settings(docs: &[Document], service: &str) -> InboundSettings {
    let Some(spec) = docs.iter().find_map(|d| match d {
        Document::ServiceDefaults { name, spec } if name == service => Some(spec),
        _ => None,
    }) else {
        return InboundSettings::default();
    };
    InboundSettings {
        mtls_mode: match spec.mutual_tls_mode.as_deref() {
            Some("strict") => Some(MtlsMode::Strict),
            Some("permissive") => Some(MtlsMode::Permissive),
            _ => None,
        },
        local_connect_timeout: ms(spec.local_connect_timeout_ms),
        local_request_timeout: ms(spec.local_request_timeout_ms),
        max_inbound_connections: spec
            .max_inbound_connections
            .filter(|&n| n > 0)
            .map(|n| n as usize),
    }
}

fn upstream(e: &UpstreamEntry) -> UpstreamSettings {
    let limits = e.limits.as_ref();
    let phc = e.passive_health_check.as_ref();
    UpstreamSettings {
        connect_timeout: ms(e.connect_timeout_ms),
        max_connections: limits.and_then(|l| l.max_connections).filter(|&n| n > 0),
        max_requests: limits
            .and_then(|l| l.max_concurrent_requests)
            .filter(|&n| n > 0),
        outlier_5xx: phc.and_then(|p| p.max_failures).filter(|&n| n > 0),
        base_ejection: phc
            .and_then(|p| p.base_ejection_time)
            .filter(|t| !t.is_zero()),
    }
}

/// How `service`'s sidecars call their upstreams (its `ServiceDefaults.upstreamConfig`): `*` for
/// the defaults, then one entry per override (entries for peers, partitions or other
/// namespaces are left out: ringside has none).
pub fn upstream_settings(docs: &[Document], service: &str) -> BTreeMap<String, UpstreamSettings> {
    let mut out = BTreeMap::new();
    let Some(u) = docs.iter().find_map(|d| match d {
        Document::ServiceDefaults { name, spec } if name == service => {
            spec.upstream_config.as_ref()
        }
        _ => None,
    }) else {
        return out;
    };
    if let Some(d) = u.defaults.as_ref().filter(|d| d.applies_here()) {
        out.insert("*".to_string(), upstream(d));
    }
    for o in u.overrides.iter().filter(|o| o.applies_here()) {
        if let Some(name) = &o.name {
            out.insert(name.clone(), upstream(o));
        }
    }
    out
}
