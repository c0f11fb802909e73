//! L7 rules in Consul's vocabulary, as the control daemon stores them: request matches (path
//! exact/prefix/regex, methods, headers), `ServiceRouter` routes, `ServiceSplitter` weights and
//! `ServiceIntentions` permissions. Pure code: the L7 path asks, per request.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::policy::intentions::Action;

/// A regular expression, compiled when the document is read (an invalid one is refused there).
/// It must match the whole value, as Envoy's `safe_regex`.
#[derive(Debug, Clone)]
pub struct Re {
    src: String,
    re: regex::Regex,
}

impl Re {
    /// Whether the whole `v` matches.
    pub fn is_match(&self, v: &str) -> bool {
        self.re.is_match(v)
    }
}

impl PartialEq for Re {
    fn eq(&self, other: &Self) -> bool {
        self.src == other.src
    }
}
impl Eq for Re {}

impl Serialize for Re {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.src)
    }
}

impl<'de> Deserialize<'de> for Re {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let src = String::deserialize(d)?;
        let re = regex::Regex::new(&format!("^(?:{src})$")).map_err(|e| {
            serde::de::Error::custom(format!("invalid regular expression '{src}': {e}"))
        })?;
        Ok(Re { src, re })
    }
}

/// A header condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name.
    pub name: String,
    /// Only that it is (or is not) there.
    #[serde(default)]
    pub present: Option<bool>,
    /// Whole value.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value prefix.
    #[serde(default)]
    pub prefix: Option<String>,
    /// Value suffix.
    #[serde(default)]
    pub suffix: Option<String>,
    /// Value regex (whole value).
    #[serde(default)]
    pub regex: Option<Re>,
    /// Value contains this.
    #[serde(default)]
    pub contains: Option<String>,
    /// Compare `exact`, `prefix`, `suffix` and `contains` without regard to case.
    #[serde(default)]
    pub ignore_case: bool,
    /// Negate.
    #[serde(default)]
    pub invert: bool,
}

impl HeaderMatch {
    /// Whether a header value (`None`: absent) satisfies the condition, before `invert`.
    fn holds(&self, v: Option<&str>) -> bool {
        let Some(v) = v else {
            return self.present == Some(false);
        };
        let fold = |x: &str| {
            if self.ignore_case {
                x.to_ascii_lowercase()
            } else {
                x.to_string()
            }
        };
        let value = fold(v);
        self.present != Some(false)
            && self.exact.as_ref().is_none_or(|e| fold(e) == value)
            && self
                .prefix
                .as_ref()
                .is_none_or(|p| value.starts_with(&fold(p)))
            && self
                .suffix
                .as_ref()
                .is_none_or(|p| value.ends_with(&fold(p)))
            && self
                .contains
                .as_ref()
                .is_none_or(|p| value.contains(&fold(p)))
            && self.regex.as_ref().is_none_or(|r| r.is_match(v))
    }
}

/// What a request must look like (every given condition holds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatch {
    /// Whole path.
    #[serde(default)]
    pub path_exact: Option<String>,
    /// Path prefix.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Path regex (whole path).
    #[serde(default)]
    pub path_regex: Option<Re>,
    /// Any of these methods.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions.
    #[serde(default)]
    pub header: Vec<HeaderMatch>,
    /// Compare `pathExact` and `pathPrefix` without regard to case (Consul's `caseInsensitive`).
    #[serde(default)]
    pub case_insensitive: bool,
}

impl HttpMatch {
    /// Whether a request (method, path without query, headers) matches.
    pub fn matches(&self, method: &str, path: &str, headers: &hyper::HeaderMap) -> bool {
        let ci = self.case_insensitive;
        let exact = |p: &String| {
            if ci {
                p.eq_ignore_ascii_case(path)
            } else {
                p == path
            }
        };
        let prefix = |p: &String| {
            if ci {
                path.len() >= p.len()
                    && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            } else {
                path.starts_with(p.as_str())
            }
        };
        if self.path_exact.as_ref().is_some_and(|p| !exact(p))
            || self.path_prefix.as_ref().is_some_and(|p| !prefix(p))
            || self.path_regex.as_ref().is_some_and(|r| !r.is_match(path))
            || (!self.methods.is_empty()
                && !self.methods.iter().any(|m| m.eq_ignore_ascii_case(method)))
        {
            return false;
        }
        self.header.iter().all(|h| {
            let v = headers.get(h.name.as_str()).and_then(|v| v.to_str().ok());
            h.holds(v) != h.invert
        })
    }
}

/// An L7 permission of an intention source: the first that matches decides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Permission {
    /// Allow or deny.
    pub action: Action,
    /// The request condition.
    #[serde(default)]
    pub http: HttpMatch,
}

/// `ServiceRouter.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouterSpec {
    /// Routes, first match wins; no match goes to the service itself.
    #[serde(default)]
    pub routes: Vec<Route>,
}

/// One route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Route {
    /// The condition (none: every request).
    #[serde(default, rename = "match")]
    pub match_: Option<RouteMatch>,
    /// Where matching requests go.
    #[serde(default)]
    pub destination: RouteDestination,
}

/// `match:` of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// HTTP conditions.
    #[serde(default)]
    pub http: HttpMatch,
    /// Query parameter conditions (every one holds).
    #[serde(default)]
    pub query_param: Vec<QueryParamMatch>,
}

/// A query parameter condition of a route (Consul's `queryParam`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QueryParamMatch {
    /// Parameter name.
    pub name: String,
    /// Only that it is there.
    #[serde(default)]
    pub present: bool,
    /// Whole value.
    #[serde(default)]
    pub exact: Option<String>,
    /// Value regex (whole value).
    #[serde(default)]
    pub regex: Option<Re>,
}

impl QueryParamMatch {
    /// Whether the query string (without `?`) satisfies it: some parameter of that name does.
    pub fn matches(&self, query: Option<&str>) -> bool {
        query
            .unwrap_or("")
            .split('&')
            .filter(|kv| !kv.is_empty())
            .map(|kv| kv.split_once('=').unwrap_or((kv, "")))
            .filter(|(k, _)| *k == self.name)
            .any(|(_, v)| {
                self.exact.as_ref().is_none_or(|e| e == v)
                    && self.regex.as_ref().is_none_or(|r| r.is_match(v))
            })
    }
}

/// `destination:` of a route.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteDestination {
    /// Target service (default: the routed service).
    #[serde(default)]
    pub service: Option<String>,
    /// Target subset (its `ServiceResolver`).
    #[serde(default)]
    pub service_subset: Option<String>,
    /// Replace the matched path prefix with this.
    #[serde(default)]
    pub prefix_rewrite: Option<String>,
    /// Time for the whole request.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Retries.
    #[serde(default)]
    pub num_retries: Option<u32>,
    /// Retry on connect failure.
    #[serde(default)]
    pub retry_on_connect_failure: Option<bool>,
    /// Statuses to retry on.
    #[serde(default)]
    pub retry_on_status_codes: Vec<u16>,
    /// Conditions to retry on (Consul's `retryOn`: `5xx`, `gateway-error`, `connect-failure`,
    /// `retriable-4xx` are applied).
    #[serde(default)]
    pub retry_on: Vec<String>,
}

impl RouteDestination {
    /// Whether the route sets its own retry policy (then only what it names is retried, as in
    /// Consul); otherwise the service's retries apply.
    pub fn has_retry_features(&self) -> bool {
        self.num_retries.is_some_and(|n| n > 0)
            || self.retry_on_connect_failure == Some(true)
            || !self.retry_on_status_codes.is_empty()
            || !self.retry_on.is_empty()
    }
}

/// `ServiceSplitter.spec`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitterSpec {
    /// Weighted targets (weights add up to 100).
    #[serde(default)]
    pub splits: Vec<SplitTarget>,
}

/// One split.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SplitTarget {
    /// Share in percent.
    pub weight: f64,
    /// Target service (default: the split service).
    #[serde(default)]
    pub service: Option<String>,
    /// Target subset.
    #[serde(default)]
    pub service_subset: Option<String>,
}

/// `ServiceResolver.spec` (the parts ringside applies: timeouts and failover; `subsets` and
/// `defaultSubset` are kept but not applied, as endpoints carry no metadata yet).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResolverSpec {
    /// Connect timeout for the service's endpoints.
    #[serde(default, with = "humantime_serde")]
    pub connect_timeout: Option<Duration>,
    /// Request timeout.
    #[serde(default, with = "humantime_serde")]
    pub request_timeout: Option<Duration>,
    /// Where requests go when the service has no healthy endpoint, by subset (`*`: any).
    #[serde(default)]
    pub failover: BTreeMap<String, FailoverTarget>,
    /// The subset used when a request names none.
    #[serde(default)]
    pub default_subset: Option<String>,
    /// Subsets: endpoints selected by their metadata.
    #[serde(default)]
    pub subsets: BTreeMap<String, Subset>,
}

/// A subset: `filter: "Service.Meta.version == v2"` (`==` or `!=`, one condition).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Subset {
    /// The condition on the endpoint's metadata.
    #[serde(default, deserialize_with = "filter_checked")]
    pub filter: String,
    /// Only healthy endpoints (they all are: unhealthy ones are not sent to proxies).
    #[serde(default)]
    pub only_passing: bool,
}

fn filter_checked<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let f = String::deserialize(d)?;
    parse_filter(&f).map_err(serde::de::Error::custom)?;
    Ok(f)
}

/// `Service.Meta.KEY == VALUE` (or `!=`; the value may be quoted): (key, value, equal).
pub fn parse_filter(f: &str) -> Result<(String, String, bool), String> {
    let (lhs, rhs, eq) = if let Some((l, r)) = f.split_once("==") {
        (l, r, true)
    } else if let Some((l, r)) = f.split_once("!=") {
        (l, r, false)
    } else {
        return Err(format!(
            "filter '{f}': expected Service.Meta.KEY == VALUE (or !=)"
        ));
    };
    let key = lhs
        .trim()
        .strip_prefix("Service.Meta.")
        .ok_or_else(|| format!("filter '{f}': only Service.Meta.KEY is supported on the left"))?;
    let value = rhs.trim().trim_matches(|c| c == '"' || c == '`');
    if key.is_empty() || value.is_empty() {
        return Err(format!("filter '{f}': key and value must not be empty"));
    }
    Ok((key.to_string(), value.to_string(), eq))
}

impl Subset {
    /// Whether an endpoint with `meta` belongs to the subset.
    pub fn matches(&self, meta: &BTreeMap<String, String>) -> bool {
        match parse_filter(&self.filter) {
            Ok((k, v, eq)) => (meta.get(&k) == Some(&v)) == eq,
            Err(_) => self.filter.is_empty(),
        }
    }
}

/// A failover target.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FailoverTarget {
    /// The service to use instead.
    #[serde(default)]
    pub service: Option<String>,
    /// Several, in order (the first with healthy endpoints).
    #[serde(default)]
    pub targets: Vec<FailoverTarget>,
}

/// The L7 documents in force, by service name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct L7Config {
    /// `ServiceRouter`s.
    #[serde(default)]
    pub routers: BTreeMap<String, RouterSpec>,
    /// `ServiceSplitter`s.
    #[serde(default)]
    pub splitters: BTreeMap<String, SplitterSpec>,
    /// `ServiceResolver`s.
    #[serde(default)]
    pub resolvers: BTreeMap<String, ResolverSpec>,
}

impl L7Config {
    /// The failover services of `service`, in order.
    pub fn failover(&self, service: &str) -> Vec<&str> {
        let Some(r) = self.resolvers.get(service) else {
            return Vec::new();
        };
        let Some(f) = r.failover.get("*").or_else(|| r.failover.values().next()) else {
            return Vec::new();
        };
        f.service
            .iter()
            .map(String::as_str)
            .chain(f.targets.iter().filter_map(|t| t.service.as_deref()))
            .collect()
    }

    /// The route a request to `service` takes: (index into the router's routes, the route).
    pub fn route(
        &self,
        service: &str,
        method: &str,
        path: &str,
        query: Option<&str>,
        headers: &hyper::HeaderMap,
    ) -> Option<&Route> {
        self.routers.get(service)?.routes.iter().find(|r| {
            r.match_.as_ref().is_none_or(|m| {
                m.http.matches(method, path, headers)
                    && m.query_param.iter().all(|q| q.matches(query))
            })
        })
    }

    /// Apply `service`'s splitter (if any) with `roll` in [0, 100): the service to call.
    pub fn split<'a>(&'a self, service: &'a str, roll: f64) -> &'a str {
        self.split_subset(service, roll).0
    }

    /// Apply `service`'s splitter: the service and subset to call.
    pub fn split_subset<'a>(&'a self, service: &'a str, roll: f64) -> (&'a str, Option<&'a str>) {
        let Some(s) = self.splitters.get(service) else {
            return (service, None);
        };
        let mut acc = 0.0;
        let mut last = None;
        for t in &s.splits {
            acc += t.weight;
            last = Some(t);
            if roll < acc {
                break;
            }
        }
        match last {
            Some(t) => (
                t.service.as_deref().unwrap_or(service),
                t.service_subset.as_deref(),
            ),
            None => (service, None),
        }
    }
}

/// Decide a request by a source's permissions: the first that matches; none: deny.
pub fn permit(
    permissions: &[Permission],
    method: &str,
    path: &str,
    headers: &hyper::HeaderMap,
) -> (bool, String) {
    for (k, p) in permissions.iter().enumerate() {
        if p.http.matches(method, path, headers) {
            return (
                p.action == Action::Allow,
                format!("permission {} ({:?})", k + 1, p.action).to_lowercase(),
            );
        }
    }
    (false, "no permission matches this request".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&'static str, &'static str)]) -> hyper::HeaderMap {
        let mut m = hyper::HeaderMap::new();
        for (k, v) in pairs {
            m.insert(*k, hyper::header::HeaderValue::from_static(v));
        }
        m
    }

    #[test]
    fn matches_paths_methods_and_headers() {
        let m: HttpMatch = serde_json::from_value(serde_json::json!({
            "pathPrefix": "/api/", "methods": ["GET", "post"],
            "header": [{"name": "x-canary", "exact": "1"}, {"name": "x-debug", "present": false}]
        }))
        .unwrap();
        assert!(m.matches("GET", "/api/x", &h(&[("x-canary", "1")])));
        assert!(m.matches("POST", "/api/x", &h(&[("x-canary", "1")])));
        assert!(
            !m.matches("PUT", "/api/x", &h(&[("x-canary", "1")])),
            "method"
        );
        assert!(
            !m.matches("GET", "/other", &h(&[("x-canary", "1")])),
            "path"
        );
        assert!(
            !m.matches("GET", "/api/x", &h(&[("x-canary", "2")])),
            "header value"
        );
        assert!(
            !m.matches("GET", "/api/x", &h(&[("x-canary", "1"), ("x-debug", "y")])),
            "absent header"
        );
        let r: HttpMatch =
            serde_json::from_value(serde_json::json!({"pathRegex": "/v[0-9]+/items"})).unwrap();
        assert!(r.matches("GET", "/v2/items", &h(&[])));
        assert!(
            !r.matches("GET", "/v2/items/9", &h(&[])),
            "regex matches the whole path"
        );
        let bad = serde_json::from_value::<HttpMatch>(serde_json::json!({"pathRegex": "(["}));
        assert!(bad
            .unwrap_err()
            .to_string()
            .contains("invalid regular expression"));
    }

    #[test]
    fn header_contains_ignore_case_and_query_parameters() {
        let m: HttpMatch = serde_json::from_value(serde_json::json!({
            "header": [{"name": "x-team", "contains": "Ops", "ignoreCase": true},
                       {"name": "x-env", "exact": "prod", "invert": true}]
        }))
        .unwrap();
        assert!(m.matches("GET", "/", &h(&[("x-team", "the-OPS-crew")])));
        assert!(!m.matches("GET", "/", &h(&[("x-team", "dev")])));
        assert!(
            !m.matches("GET", "/", &h(&[("x-team", "ops"), ("x-env", "prod")])),
            "inverted exact"
        );
        let q: QueryParamMatch =
            serde_json::from_value(serde_json::json!({"name": "v", "exact": "2"})).unwrap();
        assert!(q.matches(Some("a=1&v=2")));
        assert!(!q.matches(Some("v=3")));
        assert!(!q.matches(None));
        let p: QueryParamMatch =
            serde_json::from_value(serde_json::json!({"name": "debug", "present": true})).unwrap();
        assert!(p.matches(Some("debug")));
        assert!(!p.matches(Some("x=debug")));
    }

    #[test]
    fn routes_first_match_and_splits_by_weight() {
        let c: L7Config = serde_json::from_value(serde_json::json!({
            "routers": {"web": {"routes": [
                {"match": {"http": {"pathPrefix": "/admin"}}, "destination": {"service": "admin", "prefixRewrite": "/"}},
                {"match": {"http": {"header": [{"name": "x-canary", "present": true}]}}, "destination": {"service": "web-canary"}}
            ]}},
            "splitters": {"web": {"splits": [{"weight": 75}, {"weight": 25, "service": "web-v2"}]}}
        }))
        .unwrap();
        let r = c
            .route("web", "GET", "/admin/users", None, &h(&[]))
            .unwrap();
        assert_eq!(r.destination.service.as_deref(), Some("admin"));
        let r = c
            .route("web", "GET", "/", None, &h(&[("x-canary", "yes")]))
            .unwrap();
        assert_eq!(r.destination.service.as_deref(), Some("web-canary"));
        assert!(c.route("web", "GET", "/", None, &h(&[])).is_none());
        assert!(c.route("other", "GET", "/admin", None, &h(&[])).is_none());
        assert_eq!(c.split("web", 10.0), "web");
        assert_eq!(c.split("web", 74.9), "web");
        assert_eq!(c.split("web", 75.0), "web-v2");
        assert_eq!(c.split("web", 99.9), "web-v2");
        assert_eq!(c.split("admin", 50.0), "admin");
    }

    #[test]
    fn resolver_failover_targets_in_order() {
        let c: L7Config = serde_json::from_value(serde_json::json!({
            "resolvers": {
                "web": {"requestTimeout": "2s", "failover": {"*": {"targets": [{"service": "web-dc2"}, {"service": "web-dc3"}]}}},
                "api": {"failover": {"*": {"service": "api-backup"}}, "subsets": {"v1": {"filter": "Service.Meta.v == 1"}}}
            }
        }))
        .unwrap();
        assert_eq!(c.failover("web"), vec!["web-dc2", "web-dc3"]);
        assert_eq!(c.failover("api"), vec!["api-backup"]);
        assert!(c.failover("other").is_empty());
        assert_eq!(
            c.resolvers["web"].request_timeout,
            Some(Duration::from_secs(2))
        );
    }

    #[test]
    fn subsets_select_endpoints_by_metadata() {
        let r: ResolverSpec = serde_json::from_value(serde_json::json!({
            "defaultSubset": "v1",
            "subsets": {"v1": {"filter": "Service.Meta.version == v1"}, "not-v1": {"filter": "Service.Meta.version != \"v1\""}}
        }))
        .unwrap();
        let m = |v: &str| BTreeMap::from([("version".to_string(), v.to_string())]);
        assert!(r.subsets["v1"].matches(&m("v1")));
        assert!(!r.subsets["v1"].matches(&m("v2")));
        assert!(r.subsets["not-v1"].matches(&m("v2")));
        let bad = serde_json::from_value::<ResolverSpec>(
            serde_json::json!({"subsets": {"x": {"filter": "Service.Tags contains y"}}}),
        );
        assert!(bad.unwrap_err().to_string().contains("Service.Meta.KEY"));
    }

    #[test]
    fn permissions_first_match_decides_and_none_denies() {
        let p: Vec<Permission> = serde_json::from_value(serde_json::json!([
            {"action": "deny", "http": {"pathPrefix": "/admin"}},
            {"action": "allow", "http": {"pathPrefix": "/", "methods": ["GET"]}}
        ]))
        .unwrap();
        assert!(!permit(&p, "GET", "/admin/x", &h(&[])).0);
        assert!(permit(&p, "GET", "/items", &h(&[])).0);
        let (ok, why) = permit(&p, "DELETE", "/items", &h(&[]));
        assert!(!ok && why.contains("no permission"));
    }
}
