//! The spec of each kind with every field Consul documents for it (CRD spelling, camelCase).
//! A field ringside applies is typed; a Consul field it does not apply is an [`Unused`] value,
//! kept as written and reported by [`Review`] with what it would have done; any other field is
//! refused by serde (`deny_unknown_fields`), so a typo never passes silently. Fields whose absence
//! would widen who may call what (JWT requirements, peers, partitions, other namespaces in
//! intentions) are refused, saying why.

use std::collections::BTreeMap;
use std::time::Duration;

use ringside_core::intentions::Action;
use ringside_core::l7::rules::{HeaderMatch, HttpMatch, QueryParamMatch, Re, Subset};
use serde::{Deserialize, Serialize};

/// A Consul field ringside accepts without applying it: kept as written.
pub type Unused = Option<serde_json::Value>;

/// A field (path under the document) and what to say about it.
pub type Note = (String, String);

/// What reviewing a document found: fields accepted without effect. A refusal is returned as an
/// `Err(Note)` instead.
#[derive(Debug, Default)]
pub struct Review {
    /// Fields that have no effect here, each with the reason.
    pub warnings: Vec<Note>,
}

impl Review {
    fn unused(&mut self, path: impl Into<String>, v: &Unused, why: &str) {
        if v.is_some() {
            self.warn(path, why);
        }
    }

    fn warn(&mut self, path: impl Into<String>, why: &str) {
        self.warnings
            .push((path.into(), format!("has no effect in ringside: {why}")));
    }
}

fn refuse<T>(path: impl Into<String>, message: impl Into<String>) -> Result<T, Note> {
    Err((path.into(), message.into()))
}

/// Whether a Consul namespace or partition name is the one ringside has.
fn is_default(v: &Option<String>) -> bool {
    v.as_deref().is_none_or(|n| n.is_empty() || n == "default")
}

// ---------------------------------------------------------------------------------------------
// ServiceDefaults
// ---------------------------------------------------------------------------------------------

/// A service's declared protocol.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP.
    #[default]
    Tcp,
    /// HTTP/1.1.
    Http,
    /// HTTP/2.
    Http2,
    /// gRPC.
    Grpc,
}

impl Protocol {
    /// The name as written in documents and sent to proxies (`tcp`, `http`, `http2`, `grpc`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Http => "http",
            Protocol::Http2 => "http2",
            Protocol::Grpc => "grpc",
        }
    }
}

/// `ServiceDefaults.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDefaultsSpec {
    /// `tcp`, `http`, `http2` or `grpc` (default tcp).
    #[serde(default)]
    pub protocol: Protocol,
    /// Inbound mTLS of the service's sidecars: `strict` or `permissive` (empty: the sidecar's).
    /// (`mutualTlsMode` is read too: documents stored by earlier versions spell it so.)
    #[serde(
        default,
        rename = "mutualTLSMode",
        alias = "mutualTlsMode",
        skip_serializing_if = "Option::is_none"
    )]
    pub mutual_tls_mode: Option<String>,
    /// Inbound connections at once per instance (0: no bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_inbound_connections: Option<u64>,
    /// Time to connect to the local application, in ms (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_connect_timeout_ms: Option<u64>,
    /// Time for the local application to answer a request, in ms (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_request_timeout_ms: Option<u64>,
    /// How the service's sidecars call their upstreams.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_config: Option<UpstreamConfig>,
    /// Not applied: `transparent` or `direct` (ringside sidecars are transparent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Unused,
    /// Not applied: the redirect rules of `ringside-init` set the ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transparent_proxy: Unused,
    /// Not applied: no mesh gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Unused,
    /// Not applied: no expose paths.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expose: Unused,
    /// Not applied: no terminating gateways.
    #[serde(
        default,
        rename = "externalSNI",
        skip_serializing_if = "Option::is_none"
    )]
    pub external_sni: Unused,
    /// Not applied: no terminating gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Unused,
    /// Not applied: the kernel spreads connections (`SO_REUSEPORT`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_inbound_connections: Unused,
    /// Not applied: Envoy extensions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envoy_extensions: Unused,
    /// Not applied: rate limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Unused,
}

/// `upstreamConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamConfig {
    /// For every upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub defaults: Option<UpstreamEntry>,
    /// For one upstream each (by `name`), over the defaults.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<UpstreamEntry>,
}

/// One entry of `upstreamConfig`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct UpstreamEntry {
    /// The upstream (overrides only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Consul namespace of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Consul admin partition of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Cluster peer of the upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Time for one TCP connect, in ms (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u64>,
    /// Connection and request limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Outlier detection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passive_health_check: Option<PassiveHealthCheck>,
    /// Not applied: the upstream's own ServiceDefaults declares its protocol.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Unused,
    /// Not applied: no mesh gateways.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mesh_gateway: Unused,
    /// Not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance_outbound_connections: Unused,
}

/// `limits` of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Limits {
    /// Connections open at once (0: no bound).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// HTTP requests in flight at once (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_requests: Option<u32>,
    /// Not applied: ringside queues no requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Unused,
}

/// `passiveHealthCheck` of an upstream.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PassiveHealthCheck {
    /// Consecutive 5xx that eject an endpoint (0: default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_failures: Option<u32>,
    /// First ejection period.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub base_ejection_time: Option<Duration>,
    /// Not applied: failures are counted as they happen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Unused,
    /// Not applied: ejection is always enforced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcing_consecutive5xx: Unused,
    /// Not applied: every endpoint may be ejected (then all are tried: panic mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Unused,
}

impl ServiceDefaultsSpec {
    /// Check the rules serde cannot express; note the fields without effect.
    pub fn review(&self, r: &mut Review) -> Result<(), Note> {
        if let Some(m) = &self.mutual_tls_mode {
            if !matches!(m.as_str(), "" | "strict" | "permissive") {
                return refuse(
                    "spec.mutualTLSMode",
                    format!("'{m}' is not strict or permissive"),
                );
            }
        }
        r.unused(
            "spec.mode",
            &self.mode,
            "ringside sidecars are always transparent (the redirect rules of ringside-init)",
        );
        r.unused(
            "spec.transparentProxy",
            &self.transparent_proxy,
            "the redirect rules of ringside-init set the listener ports",
        );
        r.unused(
            "spec.meshGateway",
            &self.mesh_gateway,
            "ringside has no mesh gateways",
        );
        r.unused(
            "spec.expose",
            &self.expose,
            "ringside has no expose paths (health checks reach the app on the pod address)",
        );
        r.unused(
            "spec.externalSNI",
            &self.external_sni,
            "ringside has no terminating gateways",
        );
        r.unused(
            "spec.destination",
            &self.destination,
            "ringside has no terminating gateways",
        );
        r.unused(
            "spec.balanceInboundConnections",
            &self.balance_inbound_connections,
            "the kernel spreads inbound connections over the workers (SO_REUSEPORT)",
        );
        r.unused(
            "spec.envoyExtensions",
            &self.envoy_extensions,
            "ringside is not Envoy",
        );
        r.unused(
            "spec.rateLimits",
            &self.rate_limits,
            "ringside does not limit request rates",
        );
        if let Some(u) = &self.upstream_config {
            if let Some(d) = &u.defaults {
                d.review("spec.upstreamConfig.defaults", r)?;
            }
            for (k, o) in u.overrides.iter().enumerate() {
                let path = format!("spec.upstreamConfig.overrides[{k}]");
                if o.name.as_deref().is_none_or(str::is_empty) {
                    return refuse(
                        format!("{path}.name"),
                        "an override needs the name of the upstream it is for",
                    );
                }
                o.review(&path, r)?;
            }
        }
        Ok(())
    }
}

impl UpstreamEntry {
    /// Whether ringside can apply it: an entry for a peer, another partition or namespace
    /// names an upstream ringside does not have.
    pub fn applies_here(&self) -> bool {
        self.peer.as_deref().is_none_or(str::is_empty)
            && is_default(&self.partition)
            && is_default(&self.namespace)
    }

    fn review(&self, path: &str, r: &mut Review) -> Result<(), Note> {
        if !self.applies_here() {
            r.warn(
                path,
                "it names a peer, partition or namespace, which ringside does not have (one mesh, one namespace); the whole entry is ignored",
            );
        }
        r.unused(
            format!("{path}.protocol"),
            &self.protocol,
            "the upstream's own ServiceDefaults declares its protocol",
        );
        r.unused(
            format!("{path}.meshGateway"),
            &self.mesh_gateway,
            "ringside has no mesh gateways",
        );
        r.unused(
            format!("{path}.balanceOutboundConnections"),
            &self.balance_outbound_connections,
            "each worker connects on its own",
        );
        if let Some(l) = &self.limits {
            r.unused(
                format!("{path}.limits.maxPendingRequests"),
                &l.max_pending_requests,
                "ringside queues no requests: beyond maxConcurrentRequests they are refused at once (circuit_open)",
            );
        }
        if let Some(p) = &self.passive_health_check {
            r.unused(
                format!("{path}.passiveHealthCheck.interval"),
                &p.interval,
                "failures are counted as they happen",
            );
            r.unused(
                format!("{path}.passiveHealthCheck.enforcingConsecutive5xx"),
                &p.enforcing_consecutive5xx,
                "ejection is always enforced",
            );
            r.unused(
                format!("{path}.passiveHealthCheck.maxEjectionPercent"),
                &p.max_ejection_percent,
                "any endpoint may be ejected; with all ejected, all are tried (panic mode)",
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceIntentions
// ---------------------------------------------------------------------------------------------

/// `ServiceIntentions.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceIntentionsSpec {
    /// The destination.
    pub destination: NameRef,
    /// Sources with their action (or L7 permissions).
    #[serde(default)]
    pub sources: Vec<IntentionSource>,
    /// Refused: JWT requirements.
    #[serde(default, rename = "jwt", skip_serializing_if = "Option::is_none")]
    pub jwt: Unused,
}

/// The destination of a `ServiceIntentions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRef {
    /// Service name or `*`.
    pub name: String,
    /// Consul namespace (only `default` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Consul admin partition (only `default` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
}

/// One source of a `ServiceIntentions`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IntentionSource {
    /// Service name or `*`.
    pub name: String,
    /// `allow` or `deny` (absent when `permissions` are given).
    #[serde(default)]
    pub action: Option<Action>,
    /// L7 permissions (HTTP services): the first that matches a request decides.
    #[serde(default)]
    pub permissions: Option<Vec<Permission>>,
    /// Free text (stored, shown by `ringctl get config -o json`).
    #[serde(default)]
    pub description: Option<String>,
    /// Consul namespace of the source (only `default` or `*` here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Refused: admin partitions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Refused: cluster peers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// Refused: sameness groups.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sameness_group: Option<String>,
    /// `consul` (the only source type).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// What `consul config read` prints: computed by Consul, ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precedence: Unused,
    /// What `consul config read` prints for intentions migrated from the legacy API: ignored.
    #[serde(default, rename = "legacyID", skip_serializing_if = "Option::is_none")]
    pub legacy_id: Unused,
    /// As above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_meta: Unused,
    /// As above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_create_time: Unused,
    /// As above.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub legacy_update_time: Unused,
}

/// An L7 permission of a source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Permission {
    /// Allow or deny.
    pub action: Action,
    /// The request condition (`pathExact`, `pathPrefix`, `pathRegex`, `methods`, `header`).
    #[serde(default)]
    pub http: HttpMatch,
    /// Refused: JWT claims.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Unused,
}

const JWT: &str = "ringside cannot verify JWTs: applied without this requirement, the intention would let requests through that Consul refuses; refused";

impl ServiceIntentionsSpec {
    /// Check the rules serde cannot express (and what ringside cannot enforce).
    pub fn review(&self, _r: &mut Review) -> Result<(), Note> {
        if self.jwt.is_some() {
            return refuse("spec.jwt", JWT);
        }
        let d = &self.destination;
        if !is_default(&d.namespace) || !is_default(&d.partition) {
            return refuse(
                "spec.destination",
                "ringside has one namespace and partition (default): an intention for another names a destination ringside does not have; refused",
            );
        }
        for (k, s) in self.sources.iter().enumerate() {
            let path = format!("spec.sources[{k}]");
            if s.action.is_none() && s.permissions.is_none() {
                return refuse(
                    path,
                    format!(
                        "source '{}' needs an action (allow or deny) or permissions",
                        s.name
                    ),
                );
            }
            if s.action.is_some() && s.permissions.is_some() {
                return refuse(
                    path,
                    format!(
                        "source '{}' has both an action and permissions; use one",
                        s.name
                    ),
                );
            }
            let widening = "ringside would take the source for the service of that name in its own mesh and namespace, which this intention does not name; refused";
            for (field, v) in [
                ("peer", &s.peer),
                ("partition", &s.partition),
                ("samenessGroup", &s.sameness_group),
            ] {
                if v.as_deref().is_some_and(|v| !v.is_empty())
                    && !(field == "partition" && is_default(v))
                {
                    return refuse(format!("{path}.{field}"), widening);
                }
            }
            if !(is_default(&s.namespace) || s.namespace.as_deref() == Some("*")) {
                return refuse(format!("{path}.namespace"), widening);
            }
            if let Some(t) = &s.type_ {
                if t != "consul" {
                    return refuse(
                        format!("{path}.type"),
                        format!("'{t}' is not a source type (consul)"),
                    );
                }
            }
            for (j, p) in s.permissions.iter().flatten().enumerate() {
                if p.jwt.is_some() {
                    return refuse(format!("{path}.permissions[{j}].jwt"), JWT);
                }
            }
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceRouter
// ---------------------------------------------------------------------------------------------

/// `ServiceRouter.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouterSpec {
    /// Routes, first match wins; no match goes to the service itself.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// The condition (none: every request).
    #[serde(default, rename = "match")]
    pub match_: Option<RouteMatch>,
    /// Where matching requests go.
    #[serde(default)]
    pub destination: Option<RouteDestination>,
}

/// `match:` of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// HTTP conditions.
    #[serde(default)]
    pub http: Option<RouteHttp>,
}

/// `match.http` of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteHttp {
    /// Whole path.
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Path prefix.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Path regex (whole path).
    #[serde(default)]
    pub path_regex: Option<Re>,
    /// Compare `pathExact` and `pathPrefix` without case.
    #[serde(default)]
    pub case_insensitive: bool,
    /// Header conditions.
    #[serde(default)]
    pub header: Vec<HeaderMatch>,
    /// Query parameter conditions.
    #[serde(default)]
    pub query_param: Vec<QueryParamMatch>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
}

/// `destination:` of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RouteDestination {
    /// Target service (default: the routed service).
    #[serde(default)]
    pub service: Option<String>,
    /// Target subset (its `ServiceResolver`).
    #[serde(default)]
    pub service_subset: Option<String>,
    /// Consul namespace (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Consul admin partition (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Replace the matched path prefix with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Time for the whole request.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Retries (1 when another retry field is set and this is not).
    #[serde(default)]
    pub num_retries: Option<u32>,
    /// Retry on connect failure.
    #[serde(default)]
    pub retry_on_connect_failure: Option<bool>,
    /// Statuses to retry on.
    #[serde(default)]
    pub retry_on_status_codes: Vec<u16>,
    /// Conditions to retry on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retry_on: Vec<String>,
    /// Not applied: the L4 idle timeout applies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout: Unused,
    /// Not applied: request header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Unused,
    /// Not applied: response header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Unused,
}

/// `retryOn` conditions ringside applies.
pub const RETRY_ON_APPLIED: [&str; 4] =
    ["5xx", "gateway-error", "connect-failure", "retriable-4xx"];
/// `retryOn` conditions Consul knows that ringside does not apply.
const RETRY_ON_UNUSED: [&str; 8] = [
    "reset",
    "envoy-ratelimited",
    "refused-stream",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

const ONE_NAMESPACE: &str =
    "ringside has one namespace and partition: the service is found by its name";

impl RouterSpec {
    /// Note the fields without effect; refuse unknown `retryOn` conditions.
    pub fn review(&self, r: &mut Review) -> Result<(), Note> {
        for (k, route) in self.routes.iter().enumerate() {
            let Some(d) = &route.destination else {
                continue;
            };
            let path = format!("spec.routes[{k}].destination");
            if !is_default(&d.namespace) {
                r.warn(format!("{path}.namespace"), ONE_NAMESPACE);
            }
            if !is_default(&d.partition) {
                r.warn(format!("{path}.partition"), ONE_NAMESPACE);
            }
            for (j, c) in d.retry_on.iter().enumerate() {
                if RETRY_ON_APPLIED.contains(&c.as_str()) {
                    continue;
                }
                if RETRY_ON_UNUSED.contains(&c.as_str()) {
                    r.warn(
                        format!("{path}.retryOn[{j}]"),
                        &format!("'{c}' is not retried (5xx, gateway-error, connect-failure and retriable-4xx are)"),
                    );
                } else {
                    return refuse(
                        format!("{path}.retryOn[{j}]"),
                        format!(
                            "'{c}' is not a retry condition ({}, {})",
                            RETRY_ON_APPLIED.join(", "),
                            RETRY_ON_UNUSED.join(", ")
                        ),
                    );
                }
            }
            r.unused(
                format!("{path}.idleTimeout"),
                &d.idle_timeout,
                "the proxy's idle timeout applies",
            );
            r.unused(
                format!("{path}.requestHeaders"),
                &d.request_headers,
                "headers are not changed",
            );
            r.unused(
                format!("{path}.responseHeaders"),
                &d.response_headers,
                "headers are not changed",
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceSplitter
// ---------------------------------------------------------------------------------------------

/// `ServiceSplitter.spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSplitterSpec {
    /// The splits; weights add up to 100.
    pub splits: Vec<Split>,
}

/// One split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Split {
    /// Percentage of requests.
    pub weight: f64,
    /// Target service (default: the splitter's own).
    #[serde(default)]
    pub service: Option<String>,
    /// Target subset.
    #[serde(default)]
    pub service_subset: Option<String>,
    /// Consul namespace (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Consul admin partition (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Not applied: request header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_headers: Unused,
    /// Not applied: response header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_headers: Unused,
}

impl ServiceSplitterSpec {
    /// Weights add up to 100; note the fields without effect.
    pub fn review(&self, r: &mut Review) -> Result<(), Note> {
        let total: f64 = self.splits.iter().map(|s| s.weight).sum();
        if (total - 100.0).abs() > 0.01 {
            return refuse("spec.splits", format!("weights add up to {total}, not 100"));
        }
        for (k, s) in self.splits.iter().enumerate() {
            let path = format!("spec.splits[{k}]");
            if !is_default(&s.namespace) {
                r.warn(format!("{path}.namespace"), ONE_NAMESPACE);
            }
            if !is_default(&s.partition) {
                r.warn(format!("{path}.partition"), ONE_NAMESPACE);
            }
            r.unused(
                format!("{path}.requestHeaders"),
                &s.request_headers,
                "headers are not changed",
            );
            r.unused(
                format!("{path}.responseHeaders"),
                &s.response_headers,
                "headers are not changed",
            );
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// ServiceResolver
// ---------------------------------------------------------------------------------------------

/// `ServiceResolver.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ResolverSpec {
    /// Connect timeout for the service's endpoints.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Request timeout.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Where requests go when the service has no healthy endpoint, by subset (`*`: any).
    #[serde(default)]
    pub failover: BTreeMap<String, Failover>,
    /// The subset used when a request names none.
    #[serde(default)]
    pub default_subset: Option<String>,
    /// Subsets: endpoints selected by their metadata (`filter`, `onlyPassing`).
    #[serde(default)]
    pub subsets: BTreeMap<String, Subset>,
    /// Not applied: redirects.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Unused,
    /// Not applied: ringside balances by least request (HTTP) or round-robin.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_balancer: Unused,
    /// Not applied: no localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prioritize_by_locality: Unused,
}

/// A failover entry.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Failover {
    /// The service to use instead.
    #[serde(default)]
    pub service: Option<String>,
    /// Several, in order (the first with healthy endpoints).
    #[serde(default)]
    pub targets: Vec<FailoverTarget>,
    /// Not applied: failover goes to the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Unused,
    /// Consul namespace (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Not applied: one datacenter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenters: Unused,
    /// Not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Unused,
    /// Not applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sameness_group: Unused,
}

/// One failover target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FailoverTarget {
    /// The service.
    #[serde(default)]
    pub service: Option<String>,
    /// Not applied: failover goes to the whole service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_subset: Unused,
    /// Consul namespace (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Consul admin partition (one here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// A target in another datacenter: skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub datacenter: Option<String>,
    /// A target on a cluster peer: skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
}

impl FailoverTarget {
    /// Whether ringside can fail over to it (a service of this mesh).
    pub fn reachable(&self) -> bool {
        self.service.is_some()
            && self.datacenter.as_deref().is_none_or(str::is_empty)
            && self.peer.as_deref().is_none_or(str::is_empty)
    }
}

impl ResolverSpec {
    /// Note the fields without effect.
    pub fn review(&self, r: &mut Review) -> Result<(), Note> {
        r.unused(
            "spec.redirect",
            &self.redirect,
            "requests keep going to the service itself",
        );
        r.unused(
            "spec.loadBalancer",
            &self.load_balancer,
            "ringside balances HTTP by least request and TCP round-robin",
        );
        r.unused(
            "spec.prioritizeByLocality",
            &self.prioritize_by_locality,
            "ringside has no localities",
        );
        for (key, f) in &self.failover {
            let path = format!("spec.failover.{key}");
            r.unused(
                format!("{path}.serviceSubset"),
                &f.service_subset,
                "failover goes to the whole service",
            );
            r.unused(
                format!("{path}.datacenters"),
                &f.datacenters,
                "ringside has one datacenter",
            );
            r.unused(
                format!("{path}.policy"),
                &f.policy,
                "targets are tried in order",
            );
            r.unused(
                format!("{path}.samenessGroup"),
                &f.sameness_group,
                "ringside has no sameness groups",
            );
            if !is_default(&f.namespace) {
                r.warn(format!("{path}.namespace"), ONE_NAMESPACE);
            }
            for (k, t) in f.targets.iter().enumerate() {
                let tp = format!("{path}.targets[{k}]");
                if !t.reachable() {
                    r.warn(
                        &tp,
                        "a target in another datacenter or on a peer (or without a service) is skipped",
                    );
                }
                r.unused(
                    format!("{tp}.serviceSubset"),
                    &t.service_subset,
                    "failover goes to the whole service",
                );
                if !is_default(&t.namespace) || !is_default(&t.partition) {
                    r.warn(&tp, ONE_NAMESPACE);
                }
            }
        }
        Ok(())
    }
}
