//! Consul's configuration vocabulary (the Kubernetes CRD form): `ServiceDefaults`,
//! `ServiceIntentions`, `ServiceRouter`, `ServiceSplitter`, `ServiceResolver` documents in one YAML
//! file, separated by `---`. A file is parsed and checked whole: one bad document refuses the file,
//! and the error names the document, the field and the line.

use std::fmt;

use ringside_core::intentions::{Action, Intention, Pattern};
use serde::{Deserialize, Serialize};

/// The API version ringside accepts.
pub const API_VERSION: &str = "consul.hashicorp.com/v1alpha1";

/// One parsed document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[allow(clippy::enum_variant_names)] // the variants are Consul's kind names, as operators write them
pub enum Document {
    /// Protocol and mesh settings of a service.
    ServiceDefaults {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ServiceDefaultsSpec,
    },
    /// Who may call a service.
    ServiceIntentions {
        /// Document name.
        name: String,
        /// Its spec.
        spec: ServiceIntentionsSpec,
    },
    /// L7 routes.
    ServiceRouter {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ringside_core::l7::rules::RouterSpec,
    },
    /// Weighted splits (stored for the L7 path; weights checked now).
    ServiceSplitter {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ServiceSplitterSpec,
    },
    /// Timeouts and failover (subsets are stored, not applied yet).
    ServiceResolver {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ringside_core::l7::rules::ResolverSpec,
    },
}

impl Document {
    /// `Kind/name`, as shown in messages.
    pub fn id(&self) -> String {
        format!("{}/{}", self.kind(), self.name())
    }

    /// The document's kind, e.g. `ServiceDefaults`.
    pub fn kind(&self) -> &'static str {
        match self {
            Document::ServiceDefaults { .. } => "ServiceDefaults",
            Document::ServiceIntentions { .. } => "ServiceIntentions",
            Document::ServiceRouter { .. } => "ServiceRouter",
            Document::ServiceSplitter { .. } => "ServiceSplitter",
            Document::ServiceResolver { .. } => "ServiceResolver",
        }
    }

    /// The document's name.
    pub fn name(&self) -> &str {
        match self {
            Document::ServiceDefaults { name, .. }
            | Document::ServiceIntentions { name, .. }
            | Document::ServiceRouter { name, .. }
            | Document::ServiceSplitter { name, .. }
            | Document::ServiceResolver { name, .. } => name,
        }
    }

    /// The destination a `ServiceIntentions` is about (other kinds have none).
    pub fn destination(&self) -> Option<&str> {
        match self {
            Document::ServiceIntentions { spec, .. } => Some(&spec.destination.name),
            _ => None,
        }
    }
}

/// `ServiceDefaults.spec` (the fields ringside uses).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceDefaultsSpec {
    /// `tcp`, `http`, `http2` or `grpc` (default tcp).
    #[serde(default = "tcp")]
    pub protocol: Protocol,
    /// Inbound mTLS mode of the service's sidecar: `strict` or `permissive`.
    #[serde(default)]
    pub mutual_tls_mode: Option<String>,
}

fn tcp() -> Protocol {
    Protocol::Tcp
}

/// A service's declared protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP.
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

/// `ServiceIntentions.spec`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceIntentionsSpec {
    /// The destination.
    pub destination: NameRef,
    /// Sources with their action (or L7 permissions).
    pub sources: Vec<IntentionSource>,
}

/// `{ name: ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRef {
    /// Service name or `*`.
    pub name: String,
}

/// One source of a `ServiceIntentions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntentionSource {
    /// Service name or `*`.
    pub name: String,
    /// `allow` or `deny` (absent when `permissions` are given).
    #[serde(default)]
    pub action: Option<Action>,
    /// L7 permissions (HTTP services): the first that matches a request decides.
    #[serde(default)]
    pub permissions: Option<Vec<ringside_core::l7::rules::Permission>>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

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
}

/// Why a file was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError {
    /// 1-based document number in the file.
    pub document: usize,
    /// `Kind/name` when known.
    pub id: Option<String>,
    /// Field path, e.g. `spec.sources[1].action`.
    pub field: String,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ApplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "document {}", self.document)?;
        if let Some(id) = &self.id {
            write!(f, " ({id})")?;
        }
        if let Some(l) = self.line {
            write!(f, ", line {l}")?;
        }
        if !self.field.is_empty() {
            write!(f, ", field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ApplyError {}

/// The envelope every document has.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    spec: serde_yaml::Value,
}

#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
    #[serde(default, rename = "namespace")]
    _namespace: Option<String>,
}

/// Parse every document of a file; all or nothing.
pub fn parse(text: &str) -> Result<Vec<Document>, ApplyError> {
    let starts = document_starts(text);
    let mut docs = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let base = starts.get(i).copied().unwrap_or(1);
        let env: Envelope = serde_path_to_error::deserialize(de).map_err(|e| {
            let field = e.path().to_string();
            let inner = e.into_inner();
            ApplyError {
                document: n,
                id: None,
                field: if field == "." { String::new() } else { field },
                line: inner.location().map(|l| l.line()),
                message: strip_location(&inner.to_string()),
            }
        })?;
        let id = format!("{}/{}", env.kind, env.metadata.name);
        let err = |field: &str, message: String, needle: Option<&str>| ApplyError {
            document: n,
            id: Some(id.clone()),
            field: field.to_string(),
            line: needle.and_then(|nd| find_line_from(text, base, nd)),
            message,
        };
        if env.api_version != API_VERSION {
            return Err(err(
                "apiVersion",
                format!("'{}' is not supported (use {API_VERSION})", env.api_version),
                Some("apiVersion"),
            ));
        }
        if env.metadata.name.is_empty() {
            return Err(err(
                "metadata.name",
                "must not be empty".into(),
                Some("name:"),
            ));
        }
        let name = env.metadata.name.clone();
        // The spec is re-read from its own text span so that errors carry lines; serde_yaml's
        // Value has no positions, so the spec is deserialized from the Value and the line is found
        // by the field name after the document's start.
        let spec = env.spec;
        let typed = |spec: serde_yaml::Value| -> Result<Document, (String, String)> {
            fn de<T: serde::de::DeserializeOwned>(
                v: serde_yaml::Value,
            ) -> Result<T, (String, String)> {
                serde_path_to_error::deserialize(v).map_err(|e| {
                    let path = e.path().to_string();
                    (path, strip_location(&e.into_inner().to_string()))
                })
            }
            Ok(match env.kind.as_str() {
                "ServiceDefaults" => Document::ServiceDefaults {
                    name: name.clone(),
                    spec: de(spec)?,
                },
                "ServiceIntentions" => Document::ServiceIntentions {
                    name: name.clone(),
                    spec: de(spec)?,
                },
                "ServiceRouter" => Document::ServiceRouter {
                    name: name.clone(),
                    spec: de(spec)?,
                },
                "ServiceSplitter" => Document::ServiceSplitter {
                    name: name.clone(),
                    spec: de(spec)?,
                },
                "ServiceResolver" => Document::ServiceResolver {
                    name: name.clone(),
                    spec: de(spec)?,
                },
                other => {
                    return Err((
                        "kind".into(),
                        format!(
                            "unknown kind '{other}' (ServiceDefaults, ServiceIntentions, ServiceRouter, ServiceSplitter, ServiceResolver)"
                        ),
                    ))
                }
            })
        };
        let doc = typed(spec).map_err(|(path, message)| {
            let field = if path == "kind" {
                path.clone()
            } else {
                format!("spec.{path}")
            };
            let last = path
                .rsplit('.')
                .next()
                .map(|s| s.split('[').next().unwrap_or(s).to_string())
                .filter(|s| !s.is_empty() && s != "kind");
            let needle = last
                .map(|l| format!("{l}:"))
                .unwrap_or_else(|| "kind:".into());
            err(&field, message, Some(&needle))
        })?;
        check(&doc).map_err(|(field, message, needle)| err(&field, message, needle.as_deref()))?;
        docs.push(doc);
    }
    Ok(docs)
}

/// Rules that serde cannot express.
fn check(doc: &Document) -> Result<(), (String, String, Option<String>)> {
    match doc {
        Document::ServiceIntentions { spec, .. } => {
            for (k, s) in spec.sources.iter().enumerate() {
                if s.action.is_none() && s.permissions.is_none() {
                    return Err((
                        format!("spec.sources[{k}]"),
                        format!(
                            "source '{}' needs an action (allow or deny) or permissions",
                            s.name
                        ),
                        Some(format!("name: {}", s.name)),
                    ));
                }
                if s.action.is_some() && s.permissions.is_some() {
                    return Err((
                        format!("spec.sources[{k}]"),
                        format!(
                            "source '{}' has both an action and permissions; use one",
                            s.name
                        ),
                        Some(format!("name: {}", s.name)),
                    ));
                }
            }
        }
        Document::ServiceSplitter { spec, .. } => {
            let total: f64 = spec.splits.iter().map(|s| s.weight).sum();
            if (total - 100.0).abs() > 0.01 {
                return Err((
                    "spec.splits".into(),
                    format!("weights add up to {total}, not 100"),
                    Some("splits:".into()),
                ));
            }
        }
        Document::ServiceDefaults { spec, .. } => {
            if let Some(m) = &spec.mutual_tls_mode {
                if m != "strict" && m != "permissive" {
                    return Err((
                        "spec.mutualTLSMode".into(),
                        format!("'{m}' is not strict or permissive"),
                        Some("mutualTLSMode".into()),
                    ));
                }
            }
        }
        _ => {}
    }
    Ok(())
}

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
                let permissions = s.permissions.clone().unwrap_or_default();
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

/// The routers and splitters, by service, as proxies use them.
pub fn l7_config(docs: &[Document]) -> ringside_core::l7::rules::L7Config {
    use ringside_core::l7::rules::{L7Config, SplitTarget, SplitterSpec};
    let mut c = L7Config::default();
    for d in docs {
        match d {
            Document::ServiceRouter { name, spec } => {
                c.routers.insert(name.clone(), spec.clone());
            }
            Document::ServiceResolver { name, spec } => {
                c.resolvers.insert(name.clone(), spec.clone());
            }
            Document::ServiceSplitter { name, spec } => {
                c.splitters.insert(
                    name.clone(),
                    SplitterSpec {
                        splits: spec
                            .splits
                            .iter()
                            .map(|s| SplitTarget {
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

fn strip_location(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

/// 1-based first line of each document.
fn document_starts(text: &str) -> Vec<usize> {
    let mut starts = vec![1];
    for (i, l) in text.lines().enumerate() {
        if l.trim_end() == "---" && i > 0 {
            starts.push(i + 2);
        }
    }
    // A leading `---` does not open a second document.
    if text.lines().next().is_some_and(|l| l.trim_end() == "---") {
        starts[0] = 2;
    }
    starts
}

fn find_line_from(text: &str, from: usize, needle: &str) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let docs = parse(FILE).unwrap();
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
        assert_eq!(e.line, Some(17), "{e}");
        assert!(
            e.to_string()
                .starts_with("document 2 (ServiceIntentions/products-api), line 17"),
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
}
