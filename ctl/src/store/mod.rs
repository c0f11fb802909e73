//! The daemon's state — configuration documents, the catalog (services with their virtual IPs,
//! endpoints), proxy tokens, proxies' reports and a few counters — behind one interface, [`Store`],
//! with two backends:
//!
//! - [`redb`]: an embedded transactional store in one file (`ringctl daemon --data-dir DIR`, the
//!   default). One daemon owns it; nothing else to run.
//! - [`etcd`]: keys under a prefix of an etcd cluster (`--store etcd://HOST:PORT[,...]`), shared
//!   by every daemon pointed at it. Atomic writes are etcd transactions guarded by compare-and-swap
//!   on revisions; see that module for the key layout.
//!
//! Both keep the same contract (the suite in `contract.rs` runs its tests against each): an
//! `apply` is whole or nothing and moves the configuration index once; a service keeps its virtual
//! IP when registered again; two registrations at the same moment never get the same virtual IP;
//! an endpoint needs its service; a change to what proxies are sent moves the index, and the index
//! never goes back.
//!
//! The daemon reads what its proxies are sent as one [`Snapshot`] (one read transaction) after
//! each change, and serves them from it; with etcd the mesh's CA is in the store too
//! ([`Store::ca_create`], [`Store::ca_step`]). Endpoints registered by proxies can be expired
//! ([`Store::expire_endpoint`]); with etcd they also hang on the daemon's lease
//! ([`Store::keep_lease`]).
//!
//! **The configuration index.** With redb it is a counter bumped by every change. With etcd it is
//! the etcd revision of the last change to the configuration (the `mod_revision` of the index key,
//! which every configuration-changing transaction writes): monotonic, and comparable across the
//! daemons sharing the etcd. It is not etcd's current revision, which also moves with writes that
//! change nothing proxies see (a proxy's report every few seconds), so proxies are not woken for
//! them.

mod redb;

pub mod etcd;

#[cfg(test)]
mod contract;
#[cfg(test)]
mod etcd_server;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::ca::SharedCa;
use crate::consul::Document;

pub use self::etcd::{EtcdOptions, EtcdStore};
pub use self::redb::RedbStore;
pub use ringside_core::control::api::{
    EndpointRecord, OperatorTokenRecord, PortMap, ServiceRecord, TokenInfo,
};

/// Why a store operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreError {
    /// What happened.
    pub message: String,
    /// The store could not be reached (etcd down, cut off, or not answering in time): the
    /// daemon refuses writes and serves its proxies the last good state
    /// ([`ringside_core::Reason::StoreUnreachable`]).
    pub unreachable: bool,
    /// The write was refused because it would touch another service's record (a proxy id held
    /// by a live proxy of another service): the daemon answers 403.
    pub forbidden: bool,
    /// The write reached etcd but no answer came back (the member died or lost its leadership
    /// meanwhile): it may have been applied. The daemon says so rather than "nothing written".
    pub in_doubt: bool,
}

impl StoreError {
    /// A failure of the operation itself (a refused write, an unreadable record).
    pub fn new(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            unreachable: false,
            forbidden: false,
            in_doubt: false,
        }
    }

    /// The store could not be reached.
    pub fn unreachable(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            unreachable: true,
            forbidden: false,
            in_doubt: false,
        }
    }

    /// Refused: the record belongs to another service.
    pub fn forbidden(message: impl Into<String>) -> StoreError {
        StoreError {
            message: message.into(),
            unreachable: false,
            forbidden: true,
            in_doubt: false,
        }
    }
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.unreachable {
            write!(f, "store_unreachable: {}", self.message)
        } else {
            write!(f, "store: {}", self.message)
        }
    }
}

impl std::error::Error for StoreError {}

/// A store error from anything displayable.
pub(crate) fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError::new(x.to_string())
}

/// Since when, and why, the store cannot be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Down {
    /// The last failure, e.g. `etcd at 10.0.0.1:2379 is unreachable: Unavailable: ...`.
    pub reason: String,
    /// When the first failure of this outage happened.
    pub since: std::time::Instant,
}

/// Everything proxies are sent, read at one moment (one etcd transaction of reads, or one redb
/// read transaction): the daemon serves its proxies from the last one it read, so they keep
/// getting the last good state while the store cannot be reached.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// The configuration index the contents are at.
    pub index: u64,
    /// Every document.
    pub docs: Vec<Document>,
    /// The catalog's services, by name.
    pub services: Vec<ServiceRecord>,
    /// The catalog's endpoints, by service and address.
    pub endpoints: Vec<EndpointRecord>,
    /// The counters (`certgen`, `certgen/<service>`).
    pub counters: BTreeMap<String, u64>,
    /// The mesh's shared CA and its revision (etcd; with redb the CA is on files).
    pub ca: Option<(SharedCa, i64)>,
}

impl Snapshot {
    /// A counter (0 when unset).
    pub fn counter(&self, key: &str) -> u64 {
        self.counters.get(key).copied().unwrap_or(0)
    }
}

/// The store: one of the two backends.
///
/// An enum rather than a trait: there are exactly two backends, both known here, and the daemon
/// holds one chosen at start-up. The operations are `async` because etcd's client is (a call is a
/// network round trip, which must not stall the daemon's other requests); an `async fn` in a trait
/// cannot be called through `dyn` without boxing every future, while a `match` over two variants
/// is static, needs no extra crate, and lets the redb backend keep its plain synchronous methods
/// (redb calls are short, local and ran on the daemon's thread before this interface too).
/// Cloning is cheap: both variants are handles to shared state.
#[derive(Debug, Clone)]
pub enum Store {
    /// The embedded store in one file.
    Redb(Arc<RedbStore>),
    /// Keys under a prefix of an etcd cluster.
    Etcd(Arc<EtcdStore>),
}

/// Call `$method` on the backend: directly on redb, awaited on etcd.
macro_rules! dispatch {
    ($self:ident . $method:ident ( $($arg:expr),* )) => {
        match $self {
            Store::Redb(s) => s.$method($($arg),*),
            Store::Etcd(s) => s.$method($($arg),*).await,
        }
    };
}

impl Store {
    /// Open (or create) the embedded store in `dir`.
    pub fn open_redb(dir: &Path) -> Result<Store, StoreError> {
        Ok(Store::Redb(Arc::new(RedbStore::open(dir)?)))
    }

    /// Connect to etcd (checked with one read). Must be called inside the tokio runtime that will
    /// drive the store.
    pub async fn connect_etcd(o: &EtcdOptions) -> Result<Store, StoreError> {
        Ok(Store::Etcd(Arc::new(EtcdStore::connect(o).await?)))
    }

    /// What the store is, for logs: `redb DIR/ringctl.redb` or `etcd HOSTS prefix P`.
    pub fn describe(&self) -> String {
        match self {
            Store::Redb(s) => s.describe(),
            Store::Etcd(s) => s.describe(),
        }
    }

    /// Store every document in one transaction; returns the new configuration index.
    pub async fn apply(&self, docs: &[Document]) -> Result<u64, StoreError> {
        dispatch!(self.apply(docs))
    }

    /// Delete `Kind/name`; returns whether it existed (then the index moved).
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        dispatch!(self.delete(id))
    }

    /// Every stored document, as JSON values, in key (`Kind/name`) order.
    pub async fn documents(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        dispatch!(self.documents())
    }

    /// Every stored document, typed.
    pub async fn typed(&self) -> Result<Vec<Document>, StoreError> {
        self.documents()
            .await?
            .into_iter()
            .map(|v| serde_json::from_value(v).map_err(e))
            .collect()
    }

    /// The configuration index (moved by every change proxies are sent).
    pub async fn index(&self) -> Result<u64, StoreError> {
        dispatch!(self.index())
    }

    /// Register (or update the ports of) a service; a new one gets a free virtual IP of `range`
    /// (network address and prefix length), kept across re-registrations.
    pub async fn register_service(
        &self,
        name: &str,
        ports: Vec<PortMap>,
        range: (Ipv4Addr, u8),
    ) -> Result<ServiceRecord, StoreError> {
        dispatch!(self.register_service(name, ports, range))
    }

    /// Register an endpoint (keyed by service and address); its service must be registered.
    pub async fn register_endpoint(&self, ep: &EndpointRecord) -> Result<(), StoreError> {
        dispatch!(self.register_endpoint(ep))
    }

    /// All services, by name.
    pub async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        dispatch!(self.services())
    }

    /// All endpoints, by service and address.
    pub async fn endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        dispatch!(self.endpoints())
    }

    /// Remember a token (by its hash): its id, service, creation and expiry.
    pub async fn add_token(&self, token_hash: &str, token: &TokenInfo) -> Result<(), StoreError> {
        dispatch!(self.add_token(token_hash, token))
    }

    /// A token (by its hash), if it is stored (expired ones are, until revoked).
    pub async fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        dispatch!(self.token(token_hash))
    }

    /// Every stored token, with its hash (the key), in hash order.
    pub async fn tokens(&self) -> Result<Vec<(String, TokenInfo)>, StoreError> {
        dispatch!(self.tokens())
    }

    /// Forget a token (by its hash); returns whether it was stored.
    pub async fn remove_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        dispatch!(self.remove_token(token_hash))
    }

    /// Remember an operator token (by its hash).
    pub async fn add_operator_token(
        &self,
        token_hash: &str,
        rec: &OperatorTokenRecord,
    ) -> Result<(), StoreError> {
        dispatch!(self.add_operator_token(token_hash, rec))
    }

    /// The operator token with this hash.
    pub async fn operator_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<OperatorTokenRecord>, StoreError> {
        dispatch!(self.operator_token(token_hash))
    }

    /// Every operator token: (hash, record).
    pub async fn operator_tokens(&self) -> Result<Vec<(String, OperatorTokenRecord)>, StoreError> {
        dispatch!(self.operator_tokens())
    }

    /// Forget an operator token; whether it was there.
    pub async fn remove_operator_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        dispatch!(self.remove_operator_token(token_hash))
    }

    /// A counter (0 when unset), e.g. the certificate generation `certgen`.
    #[cfg(test)] // the daemon reads counters from its snapshot
    pub async fn meta(&self, key: &str) -> Result<u64, StoreError> {
        dispatch!(self.meta(key))
    }

    /// Increment a counter and move the configuration index in one transaction; returns the
    /// counter's new value.
    pub async fn bump_meta(&self, key: &str) -> Result<u64, StoreError> {
        dispatch!(self.bump_meta(key))
    }

    /// Move the configuration index alone (something outside the store changed, e.g. the CA's
    /// roots); returns the new index.
    pub async fn bump_index(&self) -> Result<u64, StoreError> {
        dispatch!(self.bump_index())
    }

    /// Record a proxy's report; with an address, its endpoint is registered (healthy) for its
    /// service. Returns whether the catalog changed (then the index moved). Refused
    /// ([`StoreError::forbidden`]) when the proxy id is held by another service's proxy that
    /// reported within [`PROXY_ID_HELD_SECS`] (see [`check_owner`]).
    pub async fn report_proxy(&self, rec: &ProxyRecord, node: &str) -> Result<bool, StoreError> {
        dispatch!(self.report_proxy(rec, node))
    }

    /// Record reports of proxies whose endpoint is already in place (acknowledgements and
    /// heartbeats), many in one write: each merged with its stored record, none written over a
    /// newer one or another service's. Only for a shared store (redb records each report as it
    /// comes, with [`Store::report_proxy`]).
    pub async fn record_reports(&self, recs: &[ProxyRecord]) -> Result<(), StoreError> {
        match self {
            Store::Redb(_) => {
                let stored: std::collections::HashMap<String, ProxyRecord> = self
                    .proxies()
                    .await?
                    .into_iter()
                    .map(|p| (p.report.id.clone(), p))
                    .collect();
                for r in recs {
                    let keep = stored.get(&r.report.id).is_none_or(|s| {
                        s.report.service == r.report.service && s.last_seen <= r.last_seen
                    });
                    if keep {
                        self.report_proxy(r, &r.report.id).await?;
                    }
                }
                Ok(())
            }
            Store::Etcd(s) => s.record_reports(recs).await,
        }
    }

    /// The lease endpoints are put on now (etcd; 0 or less: none), `None` with redb.
    pub fn current_lease(&self) -> Option<i64> {
        match self {
            Store::Redb(_) => None,
            Store::Etcd(s) => Some(s.current_lease()),
        }
    }

    /// Every proxy that ever reported, by id.
    pub async fn proxies(&self) -> Result<Vec<ProxyRecord>, StoreError> {
        dispatch!(self.proxies())
    }

    /// Everything proxies are sent, at one moment (see [`Snapshot`]).
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        dispatch!(self.snapshot())
    }

    /// Remove an endpoint (registered by hand, or a proxy's); returns whether it existed (then
    /// the index moved).
    pub async fn deregister_endpoint(
        &self,
        service: &str,
        address: IpAddr,
    ) -> Result<bool, StoreError> {
        dispatch!(self.deregister_endpoint(service, address))
    }

    /// Remove the endpoint `proxy` registered at `address` for `service`, if it is still that
    /// proxy's (not taken over by another proxy, a hand registration, or another daemon's
    /// lease); returns whether it was removed (then the index moved). For proxies that stopped
    /// reporting.
    pub async fn expire_endpoint(
        &self,
        service: &str,
        address: IpAddr,
        proxy: &str,
    ) -> Result<bool, StoreError> {
        dispatch!(self.expire_endpoint(service, address, proxy))
    }

    /// The endpoints proxies registered, with the proxy of each: (service, address, proxy). With
    /// redb, so that a restarted daemon still expires those whose proxy never reports again; with
    /// etcd none (they hang on the lease of the daemon that registered them).
    pub async fn proxy_endpoints(&self) -> Result<Vec<(String, IpAddr, String)>, StoreError> {
        dispatch!(self.proxy_endpoints())
    }

    /// The mesh's shared CA and its revision, if one was created (etcd only).
    pub async fn ca_record(&self) -> Result<Option<(SharedCa, i64)>, StoreError> {
        match self {
            Store::Redb(_) => Ok(None),
            Store::Etcd(s) => s.ca_record().await,
        }
    }

    /// Store `ca` as the mesh's CA unless there is one already; returns the one stored (this one
    /// or the one another daemon created first) and its revision (etcd only).
    pub async fn ca_create(&self, ca: &SharedCa) -> Result<(SharedCa, i64), StoreError> {
        match self {
            Store::Redb(_) => Err(no_shared_ca()),
            Store::Etcd(s) => s.ca_create(ca).await,
        }
    }

    /// One rollover step: store `next` if the CA is still at `revision`, with the certificate
    /// generation bumped when `bump_certgen`, and the index moved, in one transaction. Returns
    /// false when another daemon moved the CA first (etcd only).
    pub async fn ca_step(
        &self,
        revision: i64,
        next: &SharedCa,
        bump_certgen: bool,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Redb(_) => Err(no_shared_ca()),
            Store::Etcd(s) => s.ca_step(revision, next, bump_certgen).await,
        }
    }

    /// Hold a lease of `ttl` for the endpoints this daemon's proxies register, and keep it alive;
    /// runs until the daemon stops. With redb there is nothing to hold (silent proxies'
    /// endpoints are expired by the daemon), so it returns at once.
    ///
    /// From the call on (before the first poll), proxies' endpoints are registered only on the
    /// lease: a report that comes before it is granted records the proxy, and its endpoint waits
    /// for the next report.
    pub fn keep_lease(&self, ttl: Duration) -> impl std::future::Future<Output = ()> + Send {
        let store = self.clone();
        if let Store::Etcd(s) = &store {
            s.start_leasing();
        }
        async move {
            match store {
                Store::Redb(_) => {}
                Store::Etcd(s) => s.keep_lease(ttl).await,
            }
        }
    }

    /// Whether other daemons share the store (etcd): then [`Store::follow_index`] sees every
    /// write, this daemon's own included.
    pub fn is_shared(&self) -> bool {
        matches!(self, Store::Etcd(_))
    }

    /// Whether the store cannot be reached now, since when and why (never with redb).
    pub fn unreachable(&self) -> Option<Down> {
        match self {
            Store::Redb(_) => None,
            Store::Etcd(s) => s.unreachable(),
        }
    }

    /// Keep `index` up to date with changes made through other daemons sharing the store; runs
    /// until the daemon stops. With redb there are none (the daemon owns its file, and notifies
    /// its watchers itself after each write), so it returns at once; with etcd it follows an etcd
    /// watch (see [`EtcdStore::follow_index`]).
    ///
    /// Proxy tokens removed from the store (by any daemon) are told on `tokens`, so that the
    /// streams of a revoked token close on every node.
    pub async fn follow_index(
        &self,
        index: &tokio::sync::watch::Sender<u64>,
        tokens: &tokio::sync::mpsc::UnboundedSender<TokenNews>,
    ) {
        match self {
            Store::Redb(_) => {}
            Store::Etcd(s) => s.follow_index(index, tokens).await,
        }
    }
}

/// What [`Store::follow_index`] saw of proxy tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenNews {
    /// A token was removed (revoked): its hash.
    Removed(String),
    /// The watch resumed after a break: removals in between were not seen; the tokens in use
    /// must be checked against the store.
    Resumed,
}

fn no_shared_ca() -> StoreError {
    StoreError::new("the embedded store keeps its CA on files (DATA/ca), not in the store")
}

/// Move a daemon's index to `i` if that is ahead of what it has (the index never goes back, so
/// a late read of an older one changes nothing).
pub fn advance_index(index: &tokio::sync::watch::Sender<u64>, i: u64) {
    index.send_if_modified(|cur| {
        let newer = i > *cur;
        if newer {
            *cur = i;
        }
        newer
    });
}

/// What the store keeps of a proxy: its last report and when it came.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProxyRecord {
    /// Its last report (stored inline, as the proxy sent it).
    #[serde(flatten)]
    pub report: ringside_core::control::api::ProxyReport,
    /// When it last reported (Unix seconds, daemon clock).
    #[serde(default)]
    pub last_seen: i64,
    /// The node of the daemon it reported to (empty in records older than node names).
    #[serde(default)]
    pub node: String,
}

/// How long a proxy id stays its service's after the proxy's last report: until then a report
/// under that id from another service's token is refused. After it (the proxy is gone, and its
/// endpoint expired with it) another service's proxy may take the id over, as Consul frees a
/// service instance id once it is deregistered.
pub const PROXY_ID_HELD_SECS: i64 = 30;

/// Refuse a report that would overwrite the record of another service's live proxy (its
/// certificate generation, which `ringctl ca rotate` waits on, and its endpoint).
pub(crate) fn check_owner(old: Option<&ProxyRecord>, new: &ProxyRecord) -> Result<(), StoreError> {
    match old {
        Some(o)
            if o.report.service != new.report.service
                && new.last_seen - o.last_seen <= PROXY_ID_HELD_SECS =>
        {
            Err(StoreError::forbidden(format!(
                "proxy id '{}' belongs to a proxy of service '{}' (last report {}s ago); a token of service '{}' cannot report for it (give this proxy another --proxy-id)",
                new.report.id,
                o.report.service,
                (new.last_seen - o.last_seen).max(0),
                new.report.service
            )))
        }
        _ => Ok(()),
    }
}

/// A stored token's value: the [`TokenInfo`] as JSON; tokens stored before it had ids and
/// expiry hold just the service (a JSON string with etcd, plain text with redb).
pub(crate) fn token_from_stored(token_hash: &str, value: &[u8]) -> Result<TokenInfo, StoreError> {
    if let Ok(t) = serde_json::from_slice::<TokenInfo>(value) {
        return Ok(t);
    }
    let service = serde_json::from_slice::<String>(value)
        .or_else(|_| String::from_utf8(value.to_vec()))
        .map_err(|_| {
            StoreError::new(format!("token {}: unreadable record", token_id(token_hash)))
        })?;
    Ok(TokenInfo {
        id: token_id(token_hash),
        service,
        created: 0,
        expires: None,
    })
}

/// A token's id: the first 16 hex digits of its hash (enough to name it, not to find it).
pub fn token_id(token_hash: &str) -> String {
    token_hash.chars().take(16).collect()
}

/// Failures kept per proxy.
const EVENTS_PER_PROXY: usize = 64;

/// A new report merged with the stored one: while the proxy is the same run (same start time),
/// its failures accumulate, the newest [`EVENTS_PER_PROXY`] kept.
pub(crate) fn merge_report(old: Option<ProxyRecord>, new: &ProxyRecord) -> ProxyRecord {
    let mut rec = new.clone();
    if let Some(old) = old.filter(|o| o.report.started_at == rec.report.started_at) {
        let mut all = old.report.events;
        all.append(&mut rec.report.events);
        let skip = all.len().saturating_sub(EVENTS_PER_PROXY);
        rec.report.events = all.split_off(skip);
    }
    rec
}

/// The endpoint a proxy's report registers (when it gave its address).
fn endpoint_of(rec: &ProxyRecord, node: &str) -> Option<EndpointRecord> {
    Some(EndpointRecord {
        service: rec.report.service.clone(),
        address: rec.report.address?,
        node: node.to_string(),
        healthy: true,
        meta: rec.report.meta.clone(),
    })
}

/// The key of an endpoint: `service/address`.
fn endpoint_key(ep: &EndpointRecord) -> String {
    format!("{}/{}", ep.service, ep.address)
}

/// The virtual IP at `offset` in `range`, or why there is none: offsets run from 1 to the size of
/// the range less 2 (the network and broadcast addresses are never handed out).
fn vip_at(range: (Ipv4Addr, u8), offset: u64) -> Result<Ipv4Addr, StoreError> {
    let size = 1u64 << (32 - range.1.min(32) as u32);
    if offset == 0 || offset >= size.saturating_sub(1) {
        return Err(StoreError::new(format!(
            "the virtual IP range {}/{} is exhausted",
            range.0, range.1
        )));
    }
    Ok(Ipv4Addr::from(
        u32::from(range.0).wrapping_add(offset as u32),
    ))
}

/// Now, in Unix seconds.
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
