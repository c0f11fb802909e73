//! The control daemon's HTTP/JSON API: every request and response body, defined once and used by
//! the daemon (`ringctl daemon`), the operator CLI (`ringctl`, `why`, `doctor`) and the proxy's
//! control client. A field renamed here is renamed for all of them, so a mismatch is a compile
//! error rather than a silently missing value.
//!
//! Fields are required unless the daemon (or, for requests, the client) may legitimately leave
//! them out; those carry `#[serde(default)]` and say why. Some of these types are also what the
//! daemon stores (services, endpoints, proxy reports) or what a proxy keeps in its state directory
//! (its last configuration): their defaults keep records written by older versions readable.
//!
//! Operator socket: `POST /v1/apply` → [`ApplyResponse`]; `GET /v1/config` → the stored documents
//! (user documents, untyped); `DELETE /v1/config/<Kind>/<name>` → [`DeleteResponse`];
//! `GET /v1/intentions` → [`IntentionList`]; `GET /v1/intentions/check` → [`IntentionCheck`];
//! `GET /v1/index` → [`IndexResponse`]; `POST /v1/services` ([`RegisterService`]) →
//! [`ServiceRecord`]; `GET /v1/services` → `[ServiceRecord]`; `POST /v1/endpoints`
//! ([`EndpointRecord`]) → [`EndpointRecord`]; `GET /v1/endpoints` → `[EndpointRecord]`;
//! `DELETE /v1/endpoints/<service>/<address>` → [`DeregisterResponse`]; `GET /v1/store` →
//! [`StoreStatus`];
//! `POST /v1/tokens` ([`TokenRequest`]) → [`TokenResponse`]; `GET /v1/tokens` → `[TokenInfo]`;
//! `DELETE /v1/tokens/<id or prefix>` → [`TokenInfo`]; `POST /v1/sign` (a CSR, with a proxy
//! token) → [`SignResponse`]; `GET /v1/proxies` → `[ProxyStatus]`; `POST /v1/certs/rotate` →
//! [`CertRotateResponse`]; `GET /v1/ca` and `POST /v1/ca/rotate` → [`CaStatus`].
//!
//! Proxy socket (every request with a proxy token): `GET /v1/proxy/stream` (upgraded; see
//! [`super::stream`]); `GET /v1/proxy/config` → [`ProxyConfig`];
//! `POST /v1/proxy/sign` (a CSR) → [`SignResponse`]; `POST /v1/proxy/report` ([`ProxyReport`]) →
//! [`ReportAck`].
//!
//! Any refusal (a status other than 200) has an [`ErrorBody`].

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use serde::{Deserialize, Serialize};

use crate::policy::intentions::{Action, Intention, Intentions};

/// The body of every refusal (any status but 200).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Why the request was refused.
    pub error: String,
}

/// A port of a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMap {
    /// Service port.
    pub port: u16,
    /// Application port (`targetPort`).
    pub target_port: u16,
}

/// A catalog service as the daemon sends it to proxies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogService {
    /// Name.
    pub name: String,
    /// Virtual IP.
    pub virtual_ip: IpAddr,
    /// Ports.
    pub ports: Vec<PortMap>,
    /// Healthy endpoint addresses.
    pub endpoints: Vec<IpAddr>,
    /// Declared protocol (absent in configurations saved by older proxies; null: undeclared).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Metadata of each endpoint (same order), for subsets (absent in older saved configurations).
    #[serde(default)]
    pub endpoint_meta: Vec<BTreeMap<String, String>>,
}

/// What the daemon sends a proxy (`GET /v1/proxy/config`); the proxy also keeps the last one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProxyConfig {
    /// Configuration index.
    pub index: u64,
    /// The token's service (this proxy's).
    pub service: String,
    /// Trust domain.
    pub trust_domain: String,
    /// The catalog (left out, empty, when `catalog_omitted`). Not written when empty, so that a
    /// daemon can send it after the other members (and a missing one reads as empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<CatalogService>,
    /// A digest of the catalog (`services`): a proxy that sends it back with its next watch
    /// (`catalog=`) is answered without the catalog while it has not changed. Content, not a
    /// version: the same on every daemon. Empty from older daemons.
    #[serde(default)]
    pub catalog_digest: String,
    /// The answer leaves `services` out: the proxy's catalog (the one of `catalog_digest`) is
    /// still the catalog.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catalog_omitted: bool,
    /// Intentions.
    pub intentions: Intentions,
    /// Routers, splitters and resolvers (absent in configurations saved by older proxies).
    #[serde(default)]
    pub l7: crate::policy::rules::L7Config,
    /// The inbound side of this proxy's service (its `ServiceDefaults`: mTLS mode, local
    /// timeouts, inbound connection limit); absent in configurations saved by older proxies.
    #[serde(default)]
    pub inbound: crate::config::InboundSettings,
    /// How this proxy calls each upstream (its service's `ServiceDefaults.upstreamConfig`), by
    /// upstream name (`*`: the defaults); absent in configurations saved by older proxies.
    #[serde(default)]
    pub upstreams: BTreeMap<String, crate::config::UpstreamSettings>,
    /// Trust bundle (PEM).
    pub bundle: String,
    /// Certificates issued before this generation must be replaced.
    pub cert_generation: u64,
}

/// A signed workload certificate (`POST /v1/proxy/sign`, `POST /v1/sign`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignResponse {
    /// The service the certificate names (the token's).
    pub service: String,
    /// The certificate (PEM).
    pub cert: String,
    /// The trust bundle (PEM, every trusted root).
    pub bundle: String,
    /// The certificate generation it was issued for.
    pub cert_generation: u64,
}

/// A failure a proxy saw (its `/events`), as reported to the daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyEvent {
    /// Unix time in milliseconds.
    pub time_ms: u64,
    /// Reason code.
    pub reason: String,
    /// Who connected (address or identity).
    pub source: String,
    /// Where it was going (service or address).
    pub destination: String,
    /// What happened, the deciding rule or the hint.
    pub detail: String,
}

impl From<&crate::telemetry::events::Event> for ProxyEvent {
    fn from(e: &crate::telemetry::events::Event) -> Self {
        ProxyEvent {
            time_ms: e.time_ms,
            reason: e.reason.to_string(),
            source: e.source.clone(),
            destination: e.destination.clone(),
            detail: e.detail.clone(),
        }
    }
}

/// What a proxy reports (`POST /v1/proxy/report`, at least every 10 s); the daemon keeps the last
/// report of each proxy. The defaulted fields were added after the first version: older proxies
/// (and records they left in the store) lack them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyReport {
    /// Proxy id (unique per proxy).
    pub id: String,
    /// Service of its token (the daemon replaces it with the token's).
    pub service: String,
    /// Its pod address, when it gave one (then registered as an endpoint of its service).
    #[serde(default)]
    pub address: Option<IpAddr>,
    /// Configuration index it applied.
    pub applied_index: u64,
    /// Certificate generation its certificate was issued for.
    pub cert_generation: u64,
    /// Its certificate's expiry (Unix seconds).
    pub cert_not_after: i64,
    /// Its certificate's issuer (empty when unknown).
    #[serde(default)]
    pub cert_issuer: String,
    /// Its own clock when it reported (Unix seconds), for skew checks.
    #[serde(default)]
    pub clock: i64,
    /// When the proxy started (Unix seconds, its clock).
    #[serde(default)]
    pub started_at: i64,
    /// Since when it could not reach the daemon, as it said once back (0: it could).
    #[serde(default)]
    pub ctl_unreachable_since: i64,
    /// Failed TCP connection attempts in its pod before it started (the pod's `AttemptFails`
    /// counter when the proxy started): an app that started first and was refused leaves them.
    #[serde(default)]
    pub failed_connects_before_start: u64,
    /// Its recent failures, newest last (the daemon keeps the last ones per proxy).
    #[serde(default)]
    pub events: Vec<ProxyEvent>,
    /// Metadata of its endpoint (`ringside run --meta k=v`).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// The daemon's acknowledgement of a report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAck {
    /// Always true: the report was taken (stored, or kept by the daemon until its store can be
    /// reached again).
    pub ok: bool,
}

/// A proxy as `GET /v1/proxies` lists it: its last report and how it stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyStatus {
    /// Its last report.
    #[serde(flatten)]
    pub report: ProxyReport,
    /// When it last reported (Unix seconds, daemon clock).
    pub last_seen: i64,
    /// Whether it reported recently enough to count as running.
    pub live: bool,
    /// Seconds until its certificate expires (negative: expired).
    pub cert_expires_in_s: i64,
    /// The node of the daemon it reports to (`ringctl daemon --node`; empty for a report
    /// stored before daemons had node names).
    #[serde(default)]
    pub node: String,
}

/// The answer to `POST /v1/apply`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// `Kind/name` of every document stored, in file order.
    pub applied: Vec<String>,
    /// The configuration index after the apply.
    pub index: u64,
    /// Consul fields the documents carry that have no effect in ringside, one line each
    /// naming the document and the field (absent from older daemons).
    #[serde(default)]
    pub warnings: Vec<String>,
}

/// An intention as `GET /v1/intentions` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionRow {
    /// The intention (its fields inline: source, destination, action, permissions).
    #[serde(flatten)]
    pub intention: Intention,
    /// Consul's precedence (4 = most specific; the highest matching decides).
    pub precedence: u8,
}

/// The answer to `GET /v1/intentions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionList {
    /// Every intention in force.
    pub rules: Vec<IntentionRow>,
    /// What happens when none matches.
    pub default: Action,
}

/// The answer to `GET /v1/index` (and part of others).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexResponse {
    /// The configuration index (bumped by every change).
    pub index: u64,
}

/// The answer to `GET /v1/store`: the daemon's store and whether it can reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreStatus {
    /// What the store is (`redb PATH`, `etcd HOSTS prefix P`).
    pub store: String,
    /// Whether the daemon reaches it now.
    pub reachable: bool,
    /// Why not (absent when it is reachable).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// For how long it has not been reachable, seconds (0 when it is).
    #[serde(default)]
    pub unreachable_for_s: u64,
    /// The configuration index of what the daemon serves its proxies (the last good state while
    /// the store cannot be reached).
    pub served_index: u64,
}

/// The answer to `DELETE /v1/endpoints/<service>/<address>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeregisterResponse {
    /// The endpoint's service.
    pub service: String,
    /// Its address.
    pub address: IpAddr,
}

/// The answer to `DELETE /v1/config/<Kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteResponse {
    /// `Kind/name` of the deleted document.
    pub deleted: String,
}

/// The answer to `GET /v1/intentions/check?source=S&destination=D`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntentionCheck {
    /// Whether S may connect to D.
    pub allowed: bool,
    /// The deciding intention (or the default), in words.
    pub decided_by: String,
}

/// `POST /v1/services`: register a service or replace its ports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterService {
    /// Name.
    pub name: String,
    /// Ports (may be left out: a service without ports).
    #[serde(default)]
    pub ports: Vec<PortMap>,
}

/// A catalog service as registered (`POST /v1/services`, `GET /v1/services`; also the stored
/// record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Name.
    pub name: String,
    /// Ports.
    pub ports: Vec<PortMap>,
    /// Virtual IP allocated from the daemon's range.
    pub virtual_ip: Ipv4Addr,
    /// Configuration index of its first registration (absent in records of older daemons).
    #[serde(default)]
    pub registered_index: u64,
    /// When it was first registered, Unix seconds (absent in records of older daemons).
    #[serde(default)]
    pub registered_at: i64,
}

/// A catalog endpoint: the body of `POST /v1/endpoints`, its answer, a row of
/// `GET /v1/endpoints` (and the stored record).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    /// Service it serves.
    pub service: String,
    /// Address.
    pub address: IpAddr,
    /// Node name.
    pub node: String,
    /// Health as last reported.
    pub healthy: bool,
    /// Metadata (e.g. `version: v2`) for `ServiceResolver` subsets (may be left out: none).
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
}

/// `POST /v1/tokens`: a proxy token for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRequest {
    /// The service whose proxies will use it.
    pub service: String,
    /// How long it is valid, in seconds (left out: until revoked).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// The answer to `POST /v1/tokens` (the token is shown once; the daemon keeps its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenResponse {
    /// The token's service.
    pub service: String,
    /// The token (64 hex digits).
    pub token: String,
    /// Its id (what `GET /v1/tokens` lists and `DELETE /v1/tokens/<id>` revokes; not a secret).
    pub id: String,
    /// When it expires (Unix seconds; none: when revoked).
    #[serde(default)]
    pub expires: Option<i64>,
}

/// A proxy token as the daemon keeps it and lists it (`GET /v1/tokens`, the answer to
/// `DELETE /v1/tokens/<id>`): never the token itself, which only its holder knows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    /// Its id: the first 16 hex digits of the SHA-256 of the token.
    pub id: String,
    /// The service its proxies speak for.
    pub service: String,
    /// When it was created (Unix seconds; 0 for tokens made before this was recorded).
    #[serde(default)]
    pub created: i64,
    /// When it expires (Unix seconds; none: when revoked).
    #[serde(default)]
    pub expires: Option<i64>,
}

impl TokenInfo {
    /// Whether it has expired at `now` (Unix seconds).
    pub fn expired_at(&self, now: i64) -> bool {
        self.expires.is_some_and(|e| now >= e)
    }
}

/// `POST /v1/operator/tokens`: a credential for the daemon's TCP operator port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenRequest {
    /// Who or what the token is for (unique; `revoke` names it).
    pub name: String,
}

/// The answer to `POST /v1/operator/tokens` (the token is shown once; the daemon keeps its
/// hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenResponse {
    /// Its name.
    pub name: String,
    /// The token (`ringop-` and 64 hex digits).
    pub token: String,
}

/// An operator token as the daemon keeps it (beside its hash) and `GET /v1/operator/tokens`
/// lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenRecord {
    /// Its name.
    pub name: String,
    /// When it was created (Unix seconds).
    pub created: i64,
}

/// The answer to `DELETE /v1/operator/tokens/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OperatorTokenRevoked {
    /// The name.
    pub name: String,
}

/// The answer to `POST /v1/certs/rotate[?service=S]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertRotateResponse {
    /// The service whose leaves will be re-issued, or `*` for all.
    pub rotated: String,
    /// The configuration index after the bump.
    pub index: u64,
}

/// Which roots exist and which one signs (also the CA's `state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootsState {
    /// The root that signs leaves.
    pub signer: String,
    /// Roots proxies trust (the signer among them).
    pub trusted: Vec<String>,
}

/// Where a CA rollover stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationPhase {
    /// One root, nothing in progress.
    Idle,
    /// A new root is trusted beside the old one, which still signs.
    NewTrusted,
    /// The new root signs; the old one is still trusted until every leaf is re-issued.
    NewSigning,
}

impl RotationPhase {
    /// The phase as it is written on the wire (`idle`, `new_trusted`, `new_signing`).
    pub fn as_str(self) -> &'static str {
        match self {
            RotationPhase::Idle => "idle",
            RotationPhase::NewTrusted => "new_trusted",
            RotationPhase::NewSigning => "new_signing",
        }
    }
}

/// The CA as `GET /v1/ca` shows it, and after a `POST /v1/ca/rotate` step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaStatus {
    /// Where a rollover stands.
    pub phase: RotationPhase,
    /// The roots and the signer.
    pub roots: RootsState,
    /// The trust bundle (PEM): sent by `GET /v1/ca`, left out by `POST /v1/ca/rotate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bundle: Option<String>,
    /// The mesh-wide leaf certificate generation.
    pub generation: u64,
    /// The configuration index.
    pub index: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::intentions::Pattern;
    use serde::de::DeserializeOwned;

    /// Serialize, read back, compare; and the JSON read back serializes to the same JSON.
    fn round_trip<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(v: T) {
        let json = serde_json::to_value(&v).unwrap();
        let back: T =
            serde_json::from_value(json.clone()).unwrap_or_else(|e| panic!("{e}: {json}"));
        assert_eq!(back, v, "{json}");
        assert_eq!(serde_json::to_value(&back).unwrap(), json);
        let text = serde_json::to_string(&v).unwrap();
        assert_eq!(serde_json::from_str::<T>(&text).unwrap(), v);
    }

    fn report() -> ProxyReport {
        ProxyReport {
            id: "products-198.18.0.2".into(),
            service: "products".into(),
            address: Some("198.18.0.2".parse().unwrap()),
            applied_index: 7,
            cert_generation: 1,
            cert_not_after: 1_900_000_000,
            cert_issuer: "ringside CA dc1 (ca)".into(),
            clock: 1_800_000_000,
            started_at: 1_799_999_000,
            ctl_unreachable_since: 0,
            failed_connects_before_start: 0,
            events: vec![ProxyEvent {
                time_ms: 1_799_999_500_000,
                reason: "intention_denied".into(),
                source: "spiffe://dc1/ns/default/sa/batch".into(),
                destination: "products".into(),
                detail: "batch -> products: deny".into(),
            }],
            meta: [("version".to_string(), "v2".to_string())].into(),
        }
    }

    fn ports() -> Vec<PortMap> {
        vec![PortMap {
            port: 9090,
            target_port: 8080,
        }]
    }

    fn intention(src: &str, dst: &str, action: Action) -> Intention {
        Intention {
            source: Pattern::from(src.to_string()),
            destination: Pattern::from(dst.to_string()),
            action,
            permissions: Vec::new(),
        }
    }

    #[test]
    fn every_body_round_trips() {
        round_trip(ErrorBody {
            error: "unknown token".into(),
        });
        round_trip(ports()[0].clone());
        let catalog = CatalogService {
            name: "products".into(),
            virtual_ip: "240.0.0.1".parse().unwrap(),
            ports: ports(),
            endpoints: vec!["198.18.0.2".parse().unwrap()],
            protocol: Some("http".into()),
            endpoint_meta: vec![[("version".to_string(), "v2".to_string())].into()],
        };
        round_trip(catalog.clone());
        round_trip(ProxyConfig {
            index: 3,
            service: "products".into(),
            trust_domain: "dc1".into(),
            services: vec![catalog],
            catalog_digest: "3f2a".into(),
            catalog_omitted: false,
            intentions: Intentions {
                rules: vec![intention("frontend", "products", Action::Allow)],
                default: Action::Deny,
            },
            l7: Default::default(),
            inbound: crate::config::InboundSettings {
                mtls_mode: Some(crate::config::MtlsMode::Permissive),
                local_connect_timeout: Some(std::time::Duration::from_millis(250)),
                local_request_timeout: None,
                max_inbound_connections: Some(10),
            },
            upstreams: [(
                "*".to_string(),
                crate::config::UpstreamSettings {
                    connect_timeout: Some(std::time::Duration::from_secs(1)),
                    max_requests: Some(64),
                    ..Default::default()
                },
            )]
            .into(),
            bundle: "-----BEGIN CERTIFICATE-----\n".into(),
            cert_generation: 2,
        });
        round_trip(SignResponse {
            service: "products".into(),
            cert: "-----BEGIN CERTIFICATE-----\n".into(),
            bundle: "-----BEGIN CERTIFICATE-----\n".into(),
            cert_generation: 2,
        });
        round_trip(report().events[0].clone());
        round_trip(report());
        round_trip(ProxyReport {
            address: None,
            ..report()
        });
        round_trip(ReportAck { ok: true });
        round_trip(ProxyStatus {
            report: report(),
            last_seen: 1_800_000_001,
            live: true,
            cert_expires_in_s: -5,
            node: "node-1".into(),
        });
        round_trip(ApplyResponse {
            applied: vec!["ServiceIntentions/products".into()],
            index: 4,
            warnings: vec!["document 1 (ServiceDefaults/products): `spec.meshGateway` has no effect in ringside".into()],
        });
        let row = IntentionRow {
            intention: intention("*", "products", Action::Deny),
            precedence: 3,
        };
        round_trip(row.clone());
        round_trip(IntentionList {
            rules: vec![
                row,
                IntentionRow {
                    intention: intention("frontend", "products", Action::Allow),
                    precedence: 4,
                },
            ],
            default: Action::Deny,
        });
        round_trip(IndexResponse { index: 9 });
        round_trip(DeleteResponse {
            deleted: "ServiceDefaults/payments".into(),
        });
        round_trip(IntentionCheck {
            allowed: false,
            decided_by: "intention * -> products: deny".into(),
        });
        round_trip(RegisterService {
            name: "products".into(),
            ports: ports(),
        });
        round_trip(ServiceRecord {
            name: "products".into(),
            ports: ports(),
            virtual_ip: "240.0.0.1".parse().unwrap(),
            registered_index: 2,
            registered_at: 1_800_000_000,
        });
        round_trip(EndpointRecord {
            service: "products".into(),
            address: "fd00::2".parse().unwrap(),
            node: "n1".into(),
            healthy: true,
            meta: Default::default(),
        });
        round_trip(TokenRequest {
            service: "products".into(),
            ttl_s: Some(86400),
        });
        round_trip(TokenResponse {
            service: "products".into(),
            token: "ab".repeat(32),
            id: "ab".repeat(8),
            expires: None,
        });
        round_trip(TokenInfo {
            id: "ab".repeat(8),
            service: "products".into(),
            created: 1,
            expires: Some(2),
        });
        round_trip(CertRotateResponse {
            rotated: "*".into(),
            index: 5,
        });
        let roots = RootsState {
            signer: "ca".into(),
            trusted: vec!["ca".into(), "root-1".into()],
        };
        round_trip(roots.clone());
        for phase in [
            RotationPhase::Idle,
            RotationPhase::NewTrusted,
            RotationPhase::NewSigning,
        ] {
            round_trip(phase);
            assert_eq!(serde_json::to_value(phase).unwrap(), phase.as_str());
        }
        round_trip(CaStatus {
            phase: RotationPhase::NewTrusted,
            roots: roots.clone(),
            bundle: Some("-----BEGIN CERTIFICATE-----\n".into()),
            generation: 1,
            index: 6,
        });
        round_trip(CaStatus {
            phase: RotationPhase::Idle,
            roots,
            bundle: None,
            generation: 1,
            index: 6,
        });
    }

    /// The wire format, as the daemon wrote it before these types existed (field names fixed).
    #[test]
    fn daemon_samples_read() {
        let p: Vec<ProxyStatus> = serde_json::from_str(
            r#"[{"address":"198.18.0.2","applied_index":7,"cert_expires_in_s":259000,
                "cert_generation":1,"cert_issuer":"ringside CA dc1 (ca)","cert_not_after":1900000000,
                "clock":1800000000,"ctl_unreachable_since":0,"events":[{"destination":"products",
                "detail":"d","reason":"intention_denied","source":"s","time_ms":1}],
                "id":"products-198.18.0.2","last_seen":1800000001,"live":true,"meta":{},
                "service":"products","started_at":1799999000}]"#,
        )
        .unwrap();
        assert_eq!(p[0].report.id, "products-198.18.0.2");
        assert_eq!(p[0].report.events[0].reason, "intention_denied");
        assert!(p[0].live);
        let l: IntentionList = serde_json::from_str(
            r#"{"default":"deny","rules":[{"action":"allow","destination":"products",
                "precedence":4,"source":"frontend"}]}"#,
        )
        .unwrap();
        assert_eq!(l.rules[0].precedence, 4);
        assert_eq!(l.rules[0].intention.source.to_string(), "frontend");
        let c: CaStatus = serde_json::from_str(
            r#"{"generation":0,"index":3,"phase":"new_signing",
                "roots":{"signer":"root-1","trusted":["ca","root-1"]}}"#,
        )
        .unwrap();
        assert_eq!(c.phase, RotationPhase::NewSigning);
        assert_eq!(c.bundle, None);
        // The records and requests whose fields may be left out.
        let s: ServiceRecord =
            serde_json::from_str(r#"{"name":"a","ports":[],"virtual_ip":"240.0.0.1"}"#).unwrap();
        assert_eq!((s.registered_index, s.registered_at), (0, 0));
        let r: RegisterService = serde_json::from_str(r#"{"name":"a"}"#).unwrap();
        assert!(r.ports.is_empty());
    }

    /// A required field misspelled (or renamed on one side only) is an error, never a default.
    #[test]
    fn misspelled_required_fields_are_refused() {
        fn refused<T: DeserializeOwned + std::fmt::Debug>(json: &str, field: &str) {
            let e = serde_json::from_str::<T>(json)
                .expect_err(&format!("{} read from {json}", std::any::type_name::<T>()));
            assert!(
                e.to_string().contains(&format!("missing field `{field}`")),
                "{e}"
            );
        }
        refused::<ErrorBody>(r#"{"eror":"x"}"#, "error");
        refused::<SignResponse>(
            r#"{"service":"a","certificate":"c","bundle":"b","cert_generation":1}"#,
            "cert",
        );
        refused::<ProxyReport>(
            r#"{"id":"p","service":"a","applied_idx":1,"cert_generation":0,"cert_not_after":0}"#,
            "applied_index",
        );
        refused::<Vec<ProxyStatus>>(
            r#"[{"id":"p","service":"a","applied_index":1,"cert_generation":0,
                "cert_not_after":0,"last_seen":0,"alive":true,"cert_expires_in_s":0}]"#,
            "live",
        );
        refused::<ProxyStatus>(
            r#"{"id":"p","service":"a","applied_index":1,"cert_generation":0,
                "cert_not_after":0,"last_seen":0,"live":true,"cert_expires_in":0}"#,
            "cert_expires_in_s",
        );
        refused::<ApplyResponse>(r#"{"applied":[],"idx":1}"#, "index");
        refused::<IntentionList>(
            r#"{"default":"deny","rules":[{"action":"allow","destination":"b",
                "prec":4,"source":"a"}]}"#,
            "precedence",
        );
        refused::<IndexResponse>(r#"{"Index":1}"#, "index");
        refused::<DeleteResponse>(r#"{"delete":"a/b"}"#, "deleted");
        refused::<IntentionCheck>(r#"{"allow":true,"decided_by":"x"}"#, "allowed");
        refused::<RegisterService>(r#"{"service":"a","ports":[]}"#, "name");
        refused::<Vec<ServiceRecord>>(
            r#"[{"name":"a","ports":[],"vip":"240.0.0.1"}]"#,
            "virtual_ip",
        );
        refused::<Vec<EndpointRecord>>(
            r#"[{"service":"a","address":"198.18.0.2","node":"n","health":true}]"#,
            "healthy",
        );
        refused::<TokenRequest>(r#"{"svc":"a"}"#, "service");
        refused::<TokenResponse>(r#"{"service":"a","tok":"t","id":"x"}"#, "token");
        refused::<TokenInfo>(r#"{"service":"a","created":1}"#, "id");
        refused::<CertRotateResponse>(r#"{"rotate":"*","index":1}"#, "rotated");
        refused::<CaStatus>(
            r#"{"phase":"idle","roots":{"signer":"ca","trusted":["ca"]},"gen":0,"index":1}"#,
            "generation",
        );
        refused::<ReportAck>(r#"{"okay":true}"#, "ok");
        refused::<ProxyConfig>(
            r#"{"index":1,"service":"a","trust_domain":"dc1","services":[],
                "intentions":{"rules":[]},"bundle":"","cert_gen":0}"#,
            "cert_generation",
        );
        // A value of the wrong shape is refused too.
        assert!(serde_json::from_str::<CaStatus>(
            r#"{"phase":"rotating","roots":{"signer":"ca","trusted":["ca"]},"generation":0,"index":1}"#
        )
        .is_err());
    }
}
