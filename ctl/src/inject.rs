//! `ringctl inject`: add ringside to Kubernetes workloads (the job of `linkerd inject` and
//! `istioctl kube-inject`).
//!
//! Each workload's pod spec gets, in front of its own init containers:
//! - `ringside-init`: `ringside-init install` with `NET_ADMIN`/`NET_RAW` only, the exclusions taken
//!   from the pod's annotations (`ringside.io/exclude-*`);
//! - `ringside`: the sidecar as a Kubernetes native sidecar (an init container with
//!   `restartPolicy: Always` and a startup probe on 15021), uid 1337, its token from a Secret, the
//!   daemon's proxy socket from the node (`/run/ringside/proxy`, where the `ringctl daemon`
//!   DaemonSet puts it). The kubelet starts the app only once the sidecar's startup probe passes,
//!   the app's own init containers already have the mesh, and a Job's pod ends when its app does.
//!
//! Layout:
//! - documents are split on their `---` lines, so a document that is not injected (a Service, a
//!   ConfigMap, a workload annotated `ringside.io/inject: disabled`, a `hostNetwork` pod) is
//!   written back byte for byte, comments included;
//! - workloads are read into k8s-openapi's typed structs. Those skip fields they do not know, so
//!   each one is serialized back and compared with what was read ([`lost`]): a field the structs
//!   would drop is an error naming it, never a silent loss;
//! - [`inject_pod`] removes an earlier injection first, so injecting twice gives the same output.
//!
//! Nothing is written until every document of every input is done: the output is all or nothing.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    HTTPGetAction, HostPathVolumeSource, ObjectFieldSelector, Pod, PodSpec, Probe,
    ResourceRequirements, SecretKeySelector, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_yaml::Value;

/// The proxy's uid: the sidecar runs as it, and the redirect rules let its traffic through.
pub const PROXY_UID: i64 = 1337;
/// The init container that installs the redirect rules.
pub const INIT_CONTAINER: &str = "ringside-init";
/// The sidecar (a native sidecar: an init container that keeps running).
pub const SIDECAR_CONTAINER: &str = "ringside";
/// The volume with the node's proxy socket.
pub const CTL_VOLUME: &str = "ringside-ctl";
/// The sidecar's key, certificate and last good configuration (memory-backed).
pub const STATE_VOLUME: &str = "ringside-state";
/// On every node: the directory of the daemon's proxy socket, and nothing else (the operator
/// socket stays outside what pods mount).
pub const NODE_PROXY_DIR: &str = "/run/ringside/proxy";
/// The proxy socket's file name in [`NODE_PROXY_DIR`].
pub const PROXY_SOCKET_NAME: &str = "proxy.sock";
/// Where the sidecar sees [`NODE_PROXY_DIR`].
pub const CTL_MOUNT: &str = "/var/run/ringside";
/// Where the sidecar keeps its state.
pub const STATE_MOUNT: &str = "/var/lib/ringside";
/// The sidecar's health port (`/healthz/ready`).
pub const HEALTH_PORT: i32 = 15021;
/// The sidecar's metrics port.
pub const METRICS_PORT: i32 = 15020;
/// Ports the sidecar owns in the pod (an app container may not declare them).
pub const MESH_PORTS: std::ops::RangeInclusive<i32> = 15000..=15021;
/// The image with `ringside`, `ringside-init` and `ringctl` (deploy/Dockerfile builds it).
pub const DEFAULT_IMAGE: &str = concat!("ringside:", env!("CARGO_PKG_VERSION"));
/// Worker threads of an injected sidecar unless `ringside.io/proxy-workers` says otherwise (one
/// per core of a large node would be far too many for one pod).
pub const DEFAULT_WORKERS: u32 = 2;

/// The pod annotations `ringctl inject` reads.
pub mod annotation {
    /// `disabled` (or `false`): leave this workload as it is.
    pub const INJECT: &str = "ringside.io/inject";
    /// The mesh service the pod serves (default: label `app.kubernetes.io/name`, then `app`,
    /// then the workload's name).
    pub const SERVICE: &str = "ringside.io/service";
    /// The Secret with the proxy token under key `token` (default `ringside-token-SERVICE`).
    pub const TOKEN_SECRET: &str = "ringside.io/token-secret";
    /// Destination ports not redirected outbound, e.g. `5432,6379`.
    pub const EXCLUDE_OUTBOUND_PORTS: &str = "ringside.io/exclude-outbound-ports";
    /// Destination networks not redirected outbound, e.g. `10.0.0.0/8,fd00::/8`.
    pub const EXCLUDE_OUTBOUND_CIDRS: &str = "ringside.io/exclude-outbound-cidrs";
    /// Ports not redirected inbound: they bypass the mesh (plaintext, no intentions).
    pub const EXCLUDE_INBOUND_PORTS: &str = "ringside.io/exclude-inbound-ports";
    /// The sidecar's worker threads (and L7 threads).
    pub const PROXY_WORKERS: &str = "ringside.io/proxy-workers";
}

/// What `inject` is given besides the manifests.
#[derive(Debug, Clone)]
pub struct Options {
    /// Image of both added containers.
    pub image: String,
}

/// Why a manifest cannot be injected; nothing is written then.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InjectError {
    /// Not YAML.
    #[error("line {line}: {message}")]
    Yaml {
        /// Line in the input.
        line: usize,
        /// What the parser said.
        message: String,
    },
    /// A field of a workload.
    #[error("document at line {line} ({id}): field `{field}`: {message}")]
    Field {
        /// First line of the document.
        line: usize,
        /// `Kind/name`.
        id: String,
        /// The field's path.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// One line of the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// First line of the document.
    pub line: usize,
    /// `Kind/name`.
    pub id: String,
    /// What was done, or what to look at.
    pub what: String,
}

/// The rewritten manifests and what was done to each workload.
#[derive(Debug)]
pub struct Injected {
    /// The output text.
    pub text: String,
    /// The report.
    pub notes: Vec<Note>,
}

/// `ringctl inject -f FILE...`: read every input, inject, then print everything (or nothing).
pub fn main(files: &[PathBuf], opts: &Options) -> ExitCode {
    let inputs: Vec<PathBuf> = if files.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        files.to_vec()
    };
    let mut out = String::new();
    let mut notes = Vec::new();
    for f in &inputs {
        let name = f.display().to_string();
        let text = if name == "-" {
            let mut s = String::new();
            std::io::stdin().read_to_string(&mut s).map(|_| s)
        } else {
            std::fs::read_to_string(f)
        };
        let text = match text {
            Ok(t) => t,
            Err(e) => {
                eprintln!("ringctl inject: {name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match inject(&text, opts) {
            Ok(r) => {
                if !out.is_empty() {
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    if !r.text.starts_with("---") {
                        out.push_str("---\n");
                    }
                }
                out.push_str(&r.text);
                notes.extend(r.notes.into_iter().map(|n| (name.clone(), n)));
            }
            Err(e) => {
                eprintln!("ringctl inject: {name}: {e}; nothing was written");
                return ExitCode::FAILURE;
            }
        }
    }
    for (name, n) in &notes {
        eprintln!("{name}:{}: {}: {}", n.line, n.id, n.what);
    }
    print!("{out}");
    ExitCode::SUCCESS
}

/// A document of the input: the `---` line that opened it (if any) and its text.
#[derive(Debug, PartialEq, Eq)]
struct Chunk<'a> {
    /// Everything, separator included: what a document that is not injected is written as.
    whole: &'a str,
    /// The document after the `---`.
    body: &'a str,
    /// Whether it opened with `---`.
    separated: bool,
    /// Line of the separator (or 1).
    line: usize,
}

/// `---` at the start of a line, alone or followed by a space: a document marker (YAML forbids it
/// inside scalars at column 0, so this split agrees with the parser).
fn is_separator(line: &str) -> bool {
    line.strip_prefix("---")
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace))
}

fn split(text: &str) -> Vec<Chunk<'_>> {
    let mut chunks = Vec::new();
    let (mut start, mut body, mut separated, mut start_line) = (0, 0, false, 1);
    let mut offset = 0;
    for (i, line) in text.split_inclusive('\n').enumerate() {
        if is_separator(line) {
            if offset > start {
                chunks.push(Chunk {
                    whole: &text[start..offset],
                    body: &text[body..offset],
                    separated,
                    line: start_line,
                });
            }
            (start, body, separated, start_line) = (offset, offset + 3, true, i + 1);
        }
        offset += line.len();
    }
    if offset > start || chunks.is_empty() {
        chunks.push(Chunk {
            whole: &text[start..],
            body: &text[body.min(text.len())..],
            separated,
            line: start_line,
        });
    }
    chunks
}

/// Inject every workload of a multi-document YAML text.
pub fn inject(text: &str, opts: &Options) -> Result<Injected, InjectError> {
    let mut out = String::new();
    let mut notes = Vec::new();
    for chunk in split(text) {
        let value: Value = serde_yaml::from_str(chunk.body).map_err(|e| InjectError::Yaml {
            line: chunk.line + e.location().map_or(0, |l| l.line().saturating_sub(1)),
            message: strip_location(&e.to_string()),
        })?;
        // The document's first line of content (after the `---` line, blank lines and comments).
        let first = chunk
            .body
            .lines()
            .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
            .unwrap_or(0);
        let rewritten = if value.is_mapping() {
            document(value, chunk.line + first, opts, &mut notes)?
        } else {
            None
        };
        match rewritten {
            Some(yaml) => {
                if chunk.separated {
                    out.push_str("---\n");
                }
                out.push_str(&yaml);
            }
            None => out.push_str(chunk.whole),
        }
    }
    Ok(Injected { text: out, notes })
}

fn strip_location(s: &str) -> String {
    match s.find(" at line ") {
        Some(i) => s[..i].to_string(),
        None => s.to_string(),
    }
}

fn str_field<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or("")
}

fn id_of(v: &Value) -> String {
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name").or_else(|| m.get("generateName")))
        .and_then(Value::as_str)
        .unwrap_or("");
    format!("{}/{name}", str_field(v, "kind"))
}

/// One document: `Some(yaml)` when it changed (a workload injected, or a List with one).
fn document(
    value: Value,
    line: usize,
    opts: &Options,
    notes: &mut Vec<Note>,
) -> Result<Option<String>, InjectError> {
    if str_field(&value, "apiVersion") == "v1" && str_field(&value, "kind") == "List" {
        let mut list = value.clone();
        let Some(Value::Sequence(items)) = list.get_mut("items") else {
            return Ok(None);
        };
        let mut changed = false;
        for (i, item) in items.iter_mut().enumerate() {
            if let Some(w) =
                item_workload(item.clone(), line, &format!("items[{i}]."), opts, notes)?
            {
                *item = w;
                changed = true;
            }
        }
        return Ok(changed.then(|| yaml::to_yaml(&list)));
    }
    Ok(item_workload(value, line, "", opts, notes)?.map(|v| yaml::to_yaml(&v)))
}

/// A workload of a kind inject knows, typed (boxed: the kinds differ much in size).
#[derive(Debug)]
enum Workload {
    Deployment(Box<Deployment>),
    StatefulSet(Box<StatefulSet>),
    DaemonSet(Box<DaemonSet>),
    ReplicaSet(Box<ReplicaSet>),
    Job(Box<Job>),
    CronJob(Box<CronJob>),
    Pod(Box<Pod>),
}

/// Where the pod template is, for error paths.
fn template_path(kind: &str) -> &'static str {
    match kind {
        "Pod" => "",
        "CronJob" => "spec.jobTemplate.spec.template.",
        _ => "spec.template.",
    }
}

impl Workload {
    /// Read `v` as the typed workload of its kind; `None` for kinds inject does not touch.
    fn read(v: &Value) -> Option<Result<Workload, (String, String)>> {
        fn de<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                let path = e.path().to_string();
                (path, strip_location(&e.into_inner().to_string()))
            })
        }
        Some(match (str_field(v, "apiVersion"), str_field(v, "kind")) {
            ("apps/v1", "Deployment") => de(v).map(|w| Workload::Deployment(Box::new(w))),
            ("apps/v1", "StatefulSet") => de(v).map(|w| Workload::StatefulSet(Box::new(w))),
            ("apps/v1", "DaemonSet") => de(v).map(|w| Workload::DaemonSet(Box::new(w))),
            ("apps/v1", "ReplicaSet") => de(v).map(|w| Workload::ReplicaSet(Box::new(w))),
            ("batch/v1", "Job") => de(v).map(|w| Workload::Job(Box::new(w))),
            ("batch/v1", "CronJob") => de(v).map(|w| Workload::CronJob(Box::new(w))),
            ("v1", "Pod") => de(v).map(|w| Workload::Pod(Box::new(w))),
            _ => return None,
        })
    }

    fn to_value(&self) -> Result<Value, serde_yaml::Error> {
        match self {
            Workload::Deployment(w) => serde_yaml::to_value(w),
            Workload::StatefulSet(w) => serde_yaml::to_value(w),
            Workload::DaemonSet(w) => serde_yaml::to_value(w),
            Workload::ReplicaSet(w) => serde_yaml::to_value(w),
            Workload::Job(w) => serde_yaml::to_value(w),
            Workload::CronJob(w) => serde_yaml::to_value(w),
            Workload::Pod(w) => serde_yaml::to_value(w),
        }
    }

    /// The workload's own metadata, the pod template's metadata and the pod spec.
    fn parts(&mut self) -> (&ObjectMeta, Option<&ObjectMeta>, Option<&mut PodSpec>) {
        match self {
            Workload::Deployment(w) => (
                &w.metadata,
                w.spec.template.metadata.as_ref(),
                w.spec.template.spec.as_mut(),
            ),
            Workload::StatefulSet(w) => (
                &w.metadata,
                w.spec.template.metadata.as_ref(),
                w.spec.template.spec.as_mut(),
            ),
            Workload::DaemonSet(w) => (
                &w.metadata,
                w.spec.template.metadata.as_ref(),
                w.spec.template.spec.as_mut(),
            ),
            Workload::ReplicaSet(w) => match w.spec.template.as_mut() {
                Some(t) => (&w.metadata, t.metadata.as_ref(), t.spec.as_mut()),
                None => (&w.metadata, None, None),
            },
            Workload::Job(w) => match w.spec.as_mut() {
                Some(s) => (
                    &w.metadata,
                    s.template.metadata.as_ref(),
                    s.template.spec.as_mut(),
                ),
                None => (&w.metadata, None, None),
            },
            Workload::CronJob(w) => match w.spec.job_template.spec.as_mut() {
                Some(s) => (
                    &w.metadata,
                    s.template.metadata.as_ref(),
                    s.template.spec.as_mut(),
                ),
                None => (&w.metadata, None, None),
            },
            Workload::Pod(w) => (&w.metadata, Some(&w.metadata), w.spec.as_mut()),
        }
    }
}

/// A workload (at `prefix` in its document): the injected workload as a `Value`, or `None` when
/// it is not one or is left alone.
fn item_workload(
    value: Value,
    line: usize,
    prefix: &str,
    opts: &Options,
    notes: &mut Vec<Note>,
) -> Result<Option<Value>, InjectError> {
    let id = id_of(&value);
    let field_err = |field: String, message: String| InjectError::Field {
        line,
        id: id.clone(),
        field: format!("{prefix}{field}").trim_end_matches('.').to_string(),
        message,
    };
    let mut w = match Workload::read(&value) {
        None => {
            let kind = str_field(&value, "kind");
            let known = [
                "Deployment",
                "StatefulSet",
                "DaemonSet",
                "ReplicaSet",
                "Job",
                "CronJob",
                "Pod",
            ];
            if known.contains(&kind) {
                notes.push(Note {
                    line,
                    id: id.clone(),
                    what: format!(
                        "left as it is (apiVersion '{}': inject knows apps/v1, batch/v1 and v1)",
                        str_field(&value, "apiVersion")
                    ),
                });
            }
            return Ok(None);
        }
        Some(r) => r.map_err(|(f, m)| field_err(f, m))?,
    };
    // The typed structs skip what they do not know: refuse to lose a field.
    let back = w
        .to_value()
        .map_err(|e| field_err(String::new(), e.to_string()))?;
    let mut path = String::new();
    if let Some(field) = lost(&value, &back, &mut path) {
        return Err(field_err(
            field,
            "not a field of Kubernetes 1.37's API here: injecting would drop it (check its spelling)"
                .into(),
        ));
    }
    let tpath = template_path(str_field(&value, "kind"));
    let (owner, meta, spec) = w.parts();
    let Some(spec) = spec else {
        return Err(field_err(
            format!("{tpath}spec"),
            "missing: there is no pod spec to inject into".into(),
        ));
    };
    let note = |what: String| Note {
        line,
        id: id.clone(),
        what,
    };
    match inject_pod(owner, meta, spec, opts, tpath).map_err(|(f, m)| field_err(f, m))? {
        Outcome::Skipped(why) => {
            notes.push(note(format!("left as it is ({why})")));
            Ok(None)
        }
        Outcome::Injected(what) => {
            notes.extend(what.into_iter().map(note));
            w.to_value()
                .map(Some)
                .map_err(|e| field_err(String::new(), e.to_string()))
        }
    }
}

/// The first field of `before` that `after` lacks or changed (its path), if any. Nulls count as
/// absent; a number and the same number written as a string are the same (quantities, ports).
fn lost(before: &Value, after: &Value, path: &mut String) -> Option<String> {
    let here = path.len();
    let found = match (before, after) {
        (Value::Mapping(b), Value::Mapping(a)) => b.iter().find_map(|(k, v)| {
            if v.is_null() {
                return None;
            }
            let key = scalar_text(k).unwrap_or_default();
            path.truncate(here);
            if !path.is_empty() {
                path.push('.');
            }
            path.push_str(&key);
            match a.get(k) {
                None => Some(path.clone()),
                Some(x) => lost(v, x, path),
            }
        }),
        (Value::Sequence(b), Value::Sequence(a)) => {
            if b.len() != a.len() {
                Some(path.clone())
            } else {
                b.iter().zip(a).enumerate().find_map(|(i, (v, x))| {
                    path.truncate(here);
                    path.push_str(&format!("[{i}]"));
                    lost(v, x, path)
                })
            }
        }
        (Value::Mapping(b), _) if b.values().all(Value::is_null) => None,
        (Value::Tagged(b), _) => lost(&b.value, after, path),
        (b, a) => (b != a && (scalar_text(b).is_none() || scalar_text(b) != scalar_text(a)))
            .then(|| path.clone()),
    };
    path.truncate(here);
    found
}

fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// What [`inject_pod`] did.
#[derive(Debug)]
enum Outcome {
    /// Injected; notes for the report.
    Injected(Vec<String>),
    /// Left alone, and why.
    Skipped(String),
}

/// What the annotations ask for, checked.
#[derive(Debug, Default, PartialEq, Eq)]
struct Settings {
    service: String,
    token_secret: String,
    exclude_outbound_ports: Vec<u16>,
    exclude_outbound_cidrs: Vec<String>,
    exclude_inbound_ports: Vec<u16>,
    workers: u32,
}

fn parse_ports(s: &str) -> Result<Vec<u16>, String> {
    let mut ports = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match p.parse::<u16>() {
            Ok(n) if n > 0 => ports.push(n),
            _ => return Err(format!("'{p}' is not a port (1-65535; a list: 5432,6379)")),
        }
    }
    ports.sort_unstable();
    ports.dedup();
    Ok(ports)
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

fn settings(
    owner: &ObjectMeta,
    meta: Option<&ObjectMeta>,
    tpath: &str,
) -> Result<Settings, (String, String)> {
    let empty = BTreeMap::new();
    let ann = meta.and_then(|m| m.annotations.as_ref()).unwrap_or(&empty);
    let labels = meta.and_then(|m| m.labels.as_ref()).unwrap_or(&empty);
    let field = |key: &str| format!("{tpath}metadata.annotations.{key}");
    let service = ann
        .get(annotation::SERVICE)
        .or_else(|| labels.get("app.kubernetes.io/name"))
        .or_else(|| labels.get("app"))
        .or(owner.name.as_ref())
        .cloned()
        .ok_or_else(|| {
            (
                field(annotation::SERVICE),
                "no service name: set this annotation (or the label app.kubernetes.io/name)".into(),
            )
        })?;
    let token_secret = ann
        .get(annotation::TOKEN_SECRET)
        .cloned()
        .unwrap_or_else(|| format!("ringside-token-{service}"));
    if !is_dns_subdomain(&token_secret) {
        let key = if ann.contains_key(annotation::TOKEN_SECRET) {
            annotation::TOKEN_SECRET
        } else {
            annotation::SERVICE
        };
        return Err((
            field(key),
            format!("'{token_secret}' is not a valid Secret name (lower-case letters, digits, '-' and '.')"),
        ));
    }
    let ports = |key: &str| -> Result<Vec<u16>, (String, String)> {
        ann.get(key)
            .map(|s| parse_ports(s).map_err(|e| (field(key), e)))
            .transpose()
            .map(Option::unwrap_or_default)
    };
    let mut cidrs = Vec::new();
    if let Some(s) = ann.get(annotation::EXCLUDE_OUTBOUND_CIDRS) {
        for c in s.split(',').map(str::trim).filter(|c| !c.is_empty()) {
            let c = ringside_kernel_setup::redirect::parse_cidr(c)
                .map_err(|e| (field(annotation::EXCLUDE_OUTBOUND_CIDRS), e))?;
            cidrs.push(c.to_string());
        }
    }
    let workers = match ann.get(annotation::PROXY_WORKERS) {
        None => DEFAULT_WORKERS,
        Some(s) => s
            .trim()
            .parse::<u32>()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .ok_or_else(|| {
                (
                    field(annotation::PROXY_WORKERS),
                    format!("'{s}' is not a number of threads (1-64)"),
                )
            })?,
    };
    Ok(Settings {
        service,
        token_secret,
        exclude_outbound_ports: ports(annotation::EXCLUDE_OUTBOUND_PORTS)?,
        exclude_outbound_cidrs: cidrs,
        exclude_inbound_ports: ports(annotation::EXCLUDE_INBOUND_PORTS)?,
        workers,
    })
}

/// Add ringside to one pod spec (after removing an earlier injection).
fn inject_pod(
    owner: &ObjectMeta,
    meta: Option<&ObjectMeta>,
    spec: &mut PodSpec,
    opts: &Options,
    tpath: &str,
) -> Result<Outcome, (String, String)> {
    let ann = meta.and_then(|m| m.annotations.as_ref());
    match ann
        .and_then(|a| a.get(annotation::INJECT))
        .map(String::as_str)
    {
        None | Some("enabled" | "true") => {}
        Some("disabled" | "false") => {
            return Ok(Outcome::Skipped(format!(
                "{}: disabled",
                annotation::INJECT
            )))
        }
        Some(other) => {
            return Err((
                format!("{tpath}metadata.annotations.{}", annotation::INJECT),
                format!("'{other}' is not enabled or disabled"),
            ))
        }
    }
    if spec.host_network == Some(true) {
        return Ok(Outcome::Skipped(
            "hostNetwork: redirect rules there would take the node's own traffic".into(),
        ));
    }
    let s = settings(owner, meta, tpath)?;
    let spath = format!("{tpath}spec.");
    let mut notes = Vec::new();
    for (i, c) in spec.containers.iter().enumerate() {
        if c.name == INIT_CONTAINER || c.name == SIDECAR_CONTAINER {
            return Err((
                format!("{spath}containers[{i}].name"),
                format!("'{}' is the name of a container ringside adds", c.name),
            ));
        }
        for (j, p) in c.ports.iter().flatten().enumerate() {
            if MESH_PORTS.contains(&p.container_port) {
                return Err((
                    format!("{spath}containers[{i}].ports[{j}].containerPort"),
                    format!(
                        "{} is one of the sidecar's ports ({}-{}) in the pod",
                        p.container_port,
                        MESH_PORTS.start(),
                        MESH_PORTS.end()
                    ),
                ));
            }
        }
        let probes = [
            ("livenessProbe", &c.liveness_probe),
            ("readinessProbe", &c.readiness_probe),
            ("startupProbe", &c.startup_probe),
        ];
        for (kind, probe) in probes {
            let Some(probe) = probe else { continue };
            let port = match (&probe.http_get, &probe.tcp_socket, &probe.grpc) {
                (Some(h), _, _) => Some((&h.port, "httpGet")),
                (_, Some(t), _) => Some((&t.port, "tcpSocket")),
                _ => None,
            };
            let number = match port {
                Some((IntOrString::Int(n), _)) => Some(*n),
                Some((IntOrString::String(name), how)) => Some(
                    c.ports
                        .iter()
                        .flatten()
                        .find(|p| p.name.as_deref() == Some(name.as_str()))
                        .map(|p| p.container_port)
                        .ok_or_else(|| {
                            (
                                format!("{spath}containers[{i}].{kind}.{how}.port"),
                                format!("no port of container '{}' is named '{name}'", c.name),
                            )
                        })?,
                ),
                None => probe.grpc.as_ref().map(|g| g.port),
            };
            if let Some(n) = number {
                if !u16::try_from(n).is_ok_and(|p| s.exclude_inbound_ports.contains(&p)) {
                    notes.push(format!(
                        "container '{}': the {kind} on port {n} goes through the sidecar, which refuses the kubelet's plaintext probe in strict mTLS mode; serve probes on a port of their own and list it in {} (that port bypasses the mesh)",
                        c.name,
                        annotation::EXCLUDE_INBOUND_PORTS
                    ));
                }
            }
        }
    }
    let mut init = spec.init_containers.take().unwrap_or_default();
    init.retain(|c| c.name != INIT_CONTAINER && c.name != SIDECAR_CONTAINER);
    init.insert(0, sidecar_container(&s, opts));
    init.insert(0, init_container(&s, opts));
    spec.init_containers = Some(init);
    let mut volumes = spec.volumes.take().unwrap_or_default();
    volumes.retain(|v| v.name != CTL_VOLUME && v.name != STATE_VOLUME);
    volumes.extend(volumes_added());
    spec.volumes = Some(volumes);
    notes.insert(
        0,
        format!(
            "injected (service {}, token from Secret {} key token)",
            s.service, s.token_secret
        ),
    );
    Ok(Outcome::Injected(notes))
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn requests(cpu: &str, memory: &str) -> ResourceRequirements {
    ResourceRequirements {
        requests: Some(BTreeMap::from([
            ("cpu".to_string(), Quantity(cpu.into())),
            ("memory".to_string(), Quantity(memory.into())),
        ])),
        ..Default::default()
    }
}

fn join<T: ToString>(v: &[T]) -> String {
    v.iter().map(T::to_string).collect::<Vec<_>>().join(",")
}

/// `ringside-init install` with the pod's exclusions; root with NET_ADMIN and NET_RAW only.
fn init_container(s: &Settings, opts: &Options) -> Container {
    let mut args = strings(&["install", "--proxy-uid", &PROXY_UID.to_string()]);
    for (flag, list) in [
        ("--exclude-outbound-ports", join(&s.exclude_outbound_ports)),
        ("--exclude-outbound-cidrs", join(&s.exclude_outbound_cidrs)),
        ("--exclude-inbound-ports", join(&s.exclude_inbound_ports)),
    ] {
        if !list.is_empty() {
            args.extend([flag.to_string(), list]);
        }
    }
    Container {
        name: INIT_CONTAINER.into(),
        image: Some(opts.image.clone()),
        command: Some(strings(&["ringside-init"])),
        args: Some(args),
        resources: Some(requests("10m", "16Mi")),
        security_context: Some(SecurityContext {
            run_as_user: Some(0),
            run_as_group: Some(0),
            run_as_non_root: Some(false),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            // iptables takes its lock in /run.
            read_only_root_filesystem: Some(false),
            capabilities: Some(Capabilities {
                add: Some(strings(&["NET_ADMIN", "NET_RAW"])),
                drop: Some(strings(&["ALL"])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn health_probe(period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some("/healthz/ready".into()),
            port: IntOrString::Int(HEALTH_PORT),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        ..Default::default()
    }
}

/// `ringside run --ctl` as a native sidecar: uid 1337, no capabilities, ready on 15021.
fn sidecar_container(s: &Settings, opts: &Options) -> Container {
    let workers = s.workers.to_string();
    Container {
        name: SIDECAR_CONTAINER.into(),
        image: Some(opts.image.clone()),
        // An init container that keeps running: the kubelet starts the next containers once its
        // startup probe passes and stops it after the app (so a Job's pod completes).
        restart_policy: Some("Always".into()),
        command: Some(strings(&["ringside"])),
        args: Some(strings(&[
            "run",
            "--ctl",
            &format!("{CTL_MOUNT}/{PROXY_SOCKET_NAME}"),
            "--address",
            "$(POD_IP)",
            "--proxy-id",
            "$(POD_NAME).$(POD_NAMESPACE)",
            "--state-dir",
            STATE_MOUNT,
            "--workers",
            &workers,
            "--l7-threads",
            &workers,
        ])),
        env: Some(vec![
            env_field("POD_IP", "status.podIP"),
            env_field("POD_NAME", "metadata.name"),
            env_field("POD_NAMESPACE", "metadata.namespace"),
            EnvVar {
                name: "RINGSIDE_TOKEN".into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: s.token_secret.clone(),
                        key: "token".into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            },
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("ringside-metrics".into()),
                container_port: METRICS_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
            ContainerPort {
                name: Some("ringside-health".into()),
                container_port: HEALTH_PORT,
                protocol: Some("TCP".into()),
                ..Default::default()
            },
        ]),
        // Up to 90 s for the daemon to answer (ringside waits 60 s, then exits and is restarted).
        startup_probe: Some(health_probe(1, 90)),
        readiness_probe: Some(health_probe(5, 3)),
        resources: Some(requests("50m", "32Mi")),
        security_context: Some(SecurityContext {
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            run_as_non_root: Some(true),
            privileged: Some(false),
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(strings(&["ALL"])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        volume_mounts: Some(vec![
            VolumeMount {
                name: CTL_VOLUME.into(),
                mount_path: CTL_MOUNT.into(),
                read_only: Some(true),
                ..Default::default()
            },
            VolumeMount {
                name: STATE_VOLUME.into(),
                mount_path: STATE_MOUNT.into(),
                ..Default::default()
            },
        ]),
        ..Default::default()
    }
}

fn volumes_added() -> [Volume; 2] {
    [
        Volume {
            name: CTL_VOLUME.into(),
            // `Directory`, not `DirectoryOrCreate`: without the daemon on the node the pod waits
            // (the mount fails and is retried) instead of starting unmeshed.
            host_path: Some(HostPathVolumeSource {
                path: NODE_PROXY_DIR.into(),
                type_: Some("Directory".into()),
            }),
            ..Default::default()
        },
        Volume {
            name: STATE_VOLUME.into(),
            // Memory-backed: the workload's private key never reaches the node's disk.
            empty_dir: Some(EmptyDirVolumeSource {
                medium: Some("Memory".into()),
                size_limit: Some(Quantity("16Mi".into())),
                ..Default::default()
            }),
            ..Default::default()
        },
    ]
}

#[cfg(test)]
mod tests;
pub mod yaml;
