//! Consul's configuration vocabulary: `ServiceDefaults`, `ServiceIntentions`, `ServiceRouter`,
//! `ServiceSplitter`, `ServiceResolver`, as Kubernetes CRDs (YAML documents separated by `---`)
//! or as the config entries `consul config write` takes (JSON, `"Kind": "service-intentions"`,
//! one entry, several, or an array of them).
//!
//! A file is parsed and checked whole: one bad document refuses the file, and the error names the
//! document, the field and the line. Every field Consul documents for these kinds is known
//! ([`spec`]): applied, or accepted with a warning that names it and says it has no effect here;
//! a field Consul does not have is refused (a typo must not pass), and so is one whose absence
//! would widen who may call what.
//!
//! Layout: this file reads files into [`Document`]s; [`spec`] holds each kind's fields and their
//! review; `effect` turns stored documents into what proxies run.

use std::fmt;

use serde::{Deserialize, Serialize};

mod effect;
pub mod spec;

pub use effect::{inbound_settings, intentions, l7_config, protocol_of, upstream_settings};
pub use spec::{
    Protocol, ResolverSpec, RouterSpec, ServiceDefaultsSpec, ServiceIntentionsSpec,
    ServiceSplitterSpec,
};

/// The API version ringside accepts.
pub const API_VERSION: &str = "consul.hashicorp.com/v1alpha1";

/// One parsed document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind")]
#[allow(clippy::enum_variant_names)] // the variants are Consul's kind names, as operators write them
#[allow(clippy::large_enum_variant)] // a few documents per file, read once: size does not matter
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
        spec: RouterSpec,
    },
    /// Weighted splits.
    ServiceSplitter {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ServiceSplitterSpec,
    },
    /// Subsets, timeouts and failover.
    ServiceResolver {
        /// Service name.
        name: String,
        /// Its spec.
        spec: ResolverSpec,
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

    /// The document as the CRD an operator writes (`apiVersion`, `kind`, `metadata.name`,
    /// `spec`): what [`parse`] reads back to the same document (fuzzed and property-tested).
    pub fn to_crd(&self) -> serde_json::Value {
        // Strings, numbers and maps keyed by strings: serialization cannot fail.
        let mut v = serde_json::to_value(self).expect("a document serializes");
        serde_json::json!({
            "apiVersion": API_VERSION,
            "kind": self.kind(),
            "metadata": { "name": self.name() },
            "spec": v["spec"].take(),
        })
    }

    /// The rules serde cannot express: `Err` refuses the document (field, why); `Ok` lists the
    /// Consul fields it carries that have no effect here (field, why).
    pub fn review(&self) -> Result<Vec<spec::Note>, spec::Note> {
        let mut r = spec::Review::default();
        match self {
            Document::ServiceDefaults { spec, .. } => spec.review(&mut r)?,
            Document::ServiceIntentions { spec, .. } => spec.review(&mut r)?,
            Document::ServiceRouter { spec, .. } => spec.review(&mut r)?,
            Document::ServiceSplitter { spec, .. } => spec.review(&mut r)?,
            Document::ServiceResolver { spec, .. } => spec.review(&mut r)?,
        }
        Ok(r.warnings)
    }
}

/// Something about one field of one document: why a file was refused, or a warning.
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
    /// What is wrong (or, for a warning, what the field does here).
    pub message: String,
}

/// A field accepted without effect: same shape as an error.
pub type Warning = ApplyError;

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

/// A file read whole: its documents and the warnings about them.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// The documents, in file order.
    pub docs: Vec<Document>,
    /// Consul fields without effect here, in file order.
    pub warnings: Vec<Warning>,
}

/// The envelope of a CRD.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    metadata: Metadata,
    #[serde(default)]
    spec: Option<serde_json::Value>,
    /// What Kubernetes adds (`kubectl get -o yaml`): ignored.
    #[serde(default, rename = "status")]
    _status: Option<serde_json::Value>,
}

/// Kubernetes metadata: only the name is used (the Kubernetes namespace is not Consul's).
#[derive(Debug, Deserialize)]
struct Metadata {
    name: String,
}

/// Parse every document of a file; all or nothing.
pub fn parse(text: &str) -> Result<Vec<Document>, ApplyError> {
    parse_checked(text).map(|p| p.docs)
}

/// One document before it is typed.
struct Raw {
    /// 1-based number in the file.
    n: usize,
    /// 1-based line it starts on.
    base: usize,
    value: serde_json::Value,
    /// A config entry (JSON keys in Consul's PascalCase or snake_case).
    entry: bool,
}

/// Parse every document of a file and review it; all or nothing.
pub fn parse_checked(text: &str) -> Result<Parsed, ApplyError> {
    let raws = read_values(text)?;
    let mut docs = Vec::new();
    let mut warnings = Vec::new();
    for raw in raws {
        let (doc, mut notes) = typed(text, raw)?;
        docs.push(doc);
        warnings.append(&mut notes);
    }
    Ok(Parsed { docs, warnings })
}

/// The file's documents as JSON values: YAML documents, or JSON values one after another (an
/// array counts as one document per element).
fn read_values(text: &str) -> Result<Vec<Raw>, ApplyError> {
    let syntax = |n: usize, line: Option<usize>, message: String| ApplyError {
        document: n,
        id: None,
        field: String::new(),
        line,
        message,
    };
    let mut out = Vec::new();
    let trimmed = text.trim_start();
    if trimmed.starts_with('{') || trimmed.starts_with('[') {
        let mut n = 0;
        let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
        let mut offset = 0usize;
        for v in stream {
            let v = v.map_err(|e| syntax(n + 1, Some(e.line()), strip_location(&e.to_string())))?;
            let base = line_of(text, offset);
            let items = match v {
                serde_json::Value::Array(items) => items,
                one => vec![one],
            };
            for value in items {
                n += 1;
                let entry = value.get("apiVersion").is_none();
                out.push(Raw {
                    n,
                    base,
                    value,
                    entry,
                });
            }
            offset = next_value_offset(text, offset);
        }
        return Ok(out);
    }
    let starts = document_starts(text);
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_json::Value::deserialize(de).map_err(|e| {
            syntax(
                n,
                e.location().map(|l| l.line()),
                strip_location(&e.to_string()),
            )
        })?;
        if value.is_null() {
            // An empty document (a trailing `---`).
            continue;
        }
        let entry = value.get("apiVersion").is_none()
            && (value.get("Kind").is_some()
                || value
                    .get("kind")
                    .is_some_and(|k| k.as_str().is_some_and(|k| k.contains('-'))));
        out.push(Raw {
            n,
            base: starts.get(i).copied().unwrap_or(1),
            value,
            entry,
        });
    }
    Ok(out)
}

/// The start of the JSON value after the one at `offset` (approximate: the next top-level `{`
/// or `[` after a closing bracket at depth 0), for line numbers in messages.
fn next_value_offset(text: &str, offset: usize) -> usize {
    let mut depth = 0i32;
    let mut in_str = false;
    let mut esc = false;
    for (i, c) in text[offset..].char_indices() {
        if in_str {
            match (esc, c) {
                (true, _) => esc = false,
                (false, '\\') => esc = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '{' | '[' => depth += 1,
            '}' | ']' => {
                depth -= 1;
                if depth == 0 {
                    return offset + i + 1;
                }
            }
            _ => {}
        }
    }
    text.len()
}

fn line_of(text: &str, offset: usize) -> usize {
    let skipped = text[offset.min(text.len())..]
        .char_indices()
        .find(|(_, c)| !c.is_whitespace())
        .map_or(0, |(i, _)| i);
    text[..(offset + skipped).min(text.len())]
        .matches('\n')
        .count()
        + 1
}

/// Consul's config-entry kinds and the CRD kind each is.
const ENTRY_KINDS: [(&str, &str); 5] = [
    ("service-defaults", "ServiceDefaults"),
    ("service-intentions", "ServiceIntentions"),
    ("service-router", "ServiceRouter"),
    ("service-splitter", "ServiceSplitter"),
    ("service-resolver", "ServiceResolver"),
];

const KINDS: &str =
    "ServiceDefaults, ServiceIntentions, ServiceRouter, ServiceSplitter, ServiceResolver";

/// Type one document and review it.
fn typed(text: &str, raw: Raw) -> Result<(Document, Vec<Warning>), ApplyError> {
    let Raw {
        n,
        base,
        value,
        entry,
    } = raw;
    let at = |field: &str, message: String, id: Option<&str>| ApplyError {
        document: n,
        id: id.map(str::to_string),
        field: field.to_string(),
        line: locate(text, base, field),
        message,
    };
    let mut warnings = Vec::new();
    let (kind, name, spec) = if entry {
        let (kind, name, spec, notes) = from_entry(value).map_err(|(f, m)| at(&f, m, None))?;
        for (field, message) in notes {
            warnings.push((field, message));
        }
        (kind, name, spec)
    } else {
        let env: Envelope = serde_path_to_error::deserialize(value).map_err(|e| {
            let field = e.path().to_string();
            let field = if field == "." { String::new() } else { field };
            at(&field, strip_location(&e.into_inner().to_string()), None)
        })?;
        let id = format!("{}/{}", env.kind, env.metadata.name);
        if env.api_version != API_VERSION {
            return Err(at(
                "apiVersion",
                format!("'{}' is not supported (use {API_VERSION})", env.api_version),
                Some(&id),
            ));
        }
        let spec = env
            .spec
            .unwrap_or_else(|| serde_json::Value::Object(Default::default()));
        (env.kind, env.metadata.name, spec)
    };
    let id = format!("{kind}/{name}");
    if name.is_empty() {
        return Err(at("metadata.name", "must not be empty".into(), Some(&id)));
    }
    fn de<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            (path, strip_location(&e.into_inner().to_string()))
        })
    }
    let doc = match kind.as_str() {
        "ServiceDefaults" => de(spec).map(|spec| Document::ServiceDefaults {
            name: name.clone(),
            spec,
        }),
        "ServiceIntentions" => de(spec).map(|spec| Document::ServiceIntentions {
            name: name.clone(),
            spec,
        }),
        "ServiceRouter" => de(spec).map(|spec| Document::ServiceRouter {
            name: name.clone(),
            spec,
        }),
        "ServiceSplitter" => de(spec).map(|spec| Document::ServiceSplitter {
            name: name.clone(),
            spec,
        }),
        "ServiceResolver" => de(spec).map(|spec| Document::ServiceResolver {
            name: name.clone(),
            spec,
        }),
        other => {
            return Err(at(
                "kind",
                format!("unknown kind '{other}' ({KINDS})"),
                Some(&id),
            ))
        }
    }
    .map_err(|(path, message)| at(&format!("spec.{path}"), message, Some(&id)))?;
    let notes = doc
        .review()
        .map_err(|(field, message)| at(&field, message, Some(&id)))?;
    warnings.extend(notes);
    let warnings = warnings
        .into_iter()
        .map(|(field, message)| at(&field, message, Some(&id)))
        .collect();
    Ok((doc, warnings))
}

/// The line of a field (`spec.sources[1].action`) in the document starting at line `base`:
/// each key is looked for after the previous one, each index counts list items. Where the path
/// cannot be followed further, the last line found.
fn locate(text: &str, base: usize, field: &str) -> Option<usize> {
    let mut found = None;
    let mut from = base;
    for seg in field.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        if key.is_empty() || key == "spec" {
            continue;
        }
        let Some(l) = find_key_line(text, from, key) else {
            break;
        };
        found = Some(l);
        from = l;
        if let Some(k) = index {
            match nth_item(text, l, k) {
                Some(i) => {
                    found = Some(i);
                    from = i;
                }
                None => break,
            }
        }
    }
    found
}

/// The line of the `k`-th (0-based) item of the list whose key is on line `key_line`: YAML
/// `- ` items, or JSON `{` items, more indented than the key.
fn nth_item(text: &str, key_line: usize, k: usize) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let key_indent = indent(lines.get(key_line - 1)?);
    let mut item_indent = None;
    let mut seen = 0;
    for (i, l) in lines.iter().enumerate().skip(key_line) {
        let t = l.trim_start();
        if t.is_empty() {
            continue;
        }
        if indent(l) < key_indent || (indent(l) == key_indent && !t.starts_with("- ")) {
            return None;
        }
        if t.starts_with("- ") || t.starts_with('{') {
            let at = *item_indent.get_or_insert(indent(l));
            if indent(l) == at {
                if seen == k {
                    return Some(i + 1);
                }
                seen += 1;
            }
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Config entries (`consul config write`, JSON)
// ---------------------------------------------------------------------------------------------

/// Keys of maps whose keys are names (subsets): their keys stay as written.
const NAME_MAPS: [&str; 2] = ["subsets", "failover"];
/// Keys of maps that are data (metadata, headers, Envoy arguments): kept whole as written.
const DATA_MAPS: [&str; 6] = ["meta", "add", "set", "config", "arguments", "legacyMeta"];
/// Keys whose camelCase Consul spells with capitals.
const SPELLED: [&str; 5] = ["mutualTLSMode", "externalSNI", "legacyID", "http", "jwt"];

/// A config-entry key (`PathPrefix`, `path_prefix`) in the CRD's spelling (`pathPrefix`).
fn crd_key(key: &str) -> String {
    let folded: String = key
        .chars()
        .filter(|&c| c != '_')
        .flat_map(char::to_lowercase)
        .collect();
    if let Some(s) = SPELLED.iter().find(|s| s.to_lowercase() == folded) {
        return s.to_string();
    }
    let mut out = String::new();
    if key.contains('_') {
        for (i, part) in key.split('_').filter(|p| !p.is_empty()).enumerate() {
            let mut cs = part.chars();
            if let Some(first) = cs.next() {
                if i == 0 {
                    out.extend(first.to_lowercase());
                } else {
                    out.extend(first.to_uppercase());
                }
                out.push_str(cs.as_str());
            }
        }
        return out;
    }
    // PascalCase: lower the leading capitals (all of an acronym but the start of the next word).
    let chars: Vec<char> = key.chars().collect();
    let run = chars.iter().take_while(|c| c.is_uppercase()).count();
    for (i, c) in chars.iter().enumerate() {
        let lower = i < run && (run == 1 || i + 1 < run || i + 1 == chars.len());
        let lower = lower || (i == 0 && run == 1);
        if lower {
            out.extend(c.to_lowercase());
        } else {
            out.push(*c);
        }
    }
    out
}

fn crd_keys(v: serde_json::Value, mode: KeyMode) -> serde_json::Value {
    use serde_json::Value;
    match (v, mode) {
        (v, KeyMode::Keep) => v,
        (Value::Object(m), KeyMode::Names) => Value::Object(
            m.into_iter()
                .map(|(k, v)| (k, crd_keys(v, KeyMode::Translate)))
                .collect(),
        ),
        (Value::Object(m), KeyMode::Translate) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let k = crd_key(&k);
                    let mode = if NAME_MAPS.contains(&k.as_str()) {
                        KeyMode::Names
                    } else if DATA_MAPS.contains(&k.as_str()) {
                        KeyMode::Keep
                    } else {
                        KeyMode::Translate
                    };
                    let v = crd_keys(v, mode);
                    (k, v)
                })
                .collect(),
        ),
        (Value::Array(a), mode) => Value::Array(a.into_iter().map(|v| crd_keys(v, mode)).collect()),
        (v, _) => v,
    }
}

#[derive(Clone, Copy)]
enum KeyMode {
    Translate,
    Names,
    Keep,
}

/// A config entry as (CRD kind, name, CRD spec, notes).
#[allow(clippy::type_complexity)]
fn from_entry(
    v: serde_json::Value,
) -> Result<(String, String, serde_json::Value, Vec<spec::Note>), (String, String)> {
    let serde_json::Value::Object(m) = crd_keys(v, KeyMode::Translate) else {
        return Err((
            String::new(),
            "a config entry is a JSON object with Kind and Name".into(),
        ));
    };
    let mut m = m;
    let kind = match m.remove("kind") {
        Some(serde_json::Value::String(k)) => k,
        _ => {
            return Err((
                "Kind".into(),
                "missing (e.g. \"service-intentions\")".into(),
            ))
        }
    };
    let Some(crd) = ENTRY_KINDS
        .iter()
        .find(|(e, _)| e.eq_ignore_ascii_case(&kind))
        .map(|(_, c)| c.to_string())
    else {
        return Err((
            "Kind".into(),
            format!(
                "unknown kind '{kind}' ({})",
                ENTRY_KINDS.map(|(e, _)| e).join(", ")
            ),
        ));
    };
    let name = match m.remove("name") {
        Some(serde_json::Value::String(n)) => n,
        _ => return Err(("Name".into(), "missing".into())),
    };
    let mut notes = Vec::new();
    let namespace = m.remove("namespace");
    let partition = m.remove("partition");
    // Metadata Consul keeps or computes: no effect on traffic.
    for k in ["meta", "createIndex", "modifyIndex", "hash"] {
        m.remove(k);
    }
    let spec = if crd == "ServiceIntentions" {
        // The entry's name (and namespace, partition) is the destination.
        let mut dest = serde_json::Map::new();
        dest.insert("name".into(), serde_json::Value::String(name.clone()));
        if let Some(ns) = namespace {
            dest.insert("namespace".into(), ns);
        }
        if let Some(p) = partition {
            dest.insert("partition".into(), p);
        }
        m.insert("destination".into(), serde_json::Value::Object(dest));
        m
    } else {
        for (k, v) in [("Namespace", namespace), ("Partition", partition)] {
            if v.as_ref()
                .and_then(|v| v.as_str())
                .is_some_and(|s| !s.is_empty() && s != "default")
            {
                notes.push((
                    k.to_string(),
                    "has no effect in ringside: it has one namespace and partition".to_string(),
                ));
            }
        }
        m
    };
    Ok((crd, name, serde_json::Value::Object(spec), notes))
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

/// The first line at or after `from` that holds `key` as a key, in YAML (`key:`) or JSON
/// (`"Key"`), in any of Consul's spellings (camelCase, PascalCase, snake_case).
fn find_key_line(text: &str, from: usize, key: &str) -> Option<usize> {
    let want = key.to_lowercase();
    text.lines()
        .enumerate()
        .skip(from.saturating_sub(1))
        .find(|(_, l)| {
            let folded: String = l
                .chars()
                .filter(|&c| c != '_')
                .flat_map(char::to_lowercase)
                .collect();
            let t = folded.trim_start().trim_start_matches("- ");
            t.starts_with(&format!("{want}:")) || folded.contains(&format!("\"{want}\""))
        })
        .map(|(i, _)| i + 1)
}

#[cfg(test)]
mod tests;
