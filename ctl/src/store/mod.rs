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

use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::Arc;

use crate::consul::Document;

pub use self::etcd::{EtcdOptions, EtcdStore};
pub use self::redb::RedbStore;
pub use ringside_core::control::api::{EndpointRecord, PortMap, ServiceRecord};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

/// A store error from anything displayable.
pub(crate) fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError(x.to_string())
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

    /// Remember a token (by its hash) as belonging to `service`.
    pub async fn add_token(&self, token_hash: &str, service: &str) -> Result<(), StoreError> {
        dispatch!(self.add_token(token_hash, service))
    }

    /// The service a token (by its hash) belongs to.
    pub async fn token_service(&self, token_hash: &str) -> Result<Option<String>, StoreError> {
        dispatch!(self.token_service(token_hash))
    }

    /// A counter (0 when unset), e.g. the certificate generation `certgen`.
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
    /// service. Returns whether the catalog changed (then the index moved).
    pub async fn report_proxy(&self, rec: &ProxyRecord, node: &str) -> Result<bool, StoreError> {
        dispatch!(self.report_proxy(rec, node))
    }

    /// Every proxy that ever reported, by id.
    pub async fn proxies(&self) -> Result<Vec<ProxyRecord>, StoreError> {
        dispatch!(self.proxies())
    }

    /// Keep `index` up to date with changes made through other daemons sharing the store; runs
    /// until the daemon stops. With redb there are none (the daemon owns its file, and notifies
    /// its watchers itself after each write), so it returns at once; with etcd it follows an etcd
    /// watch (see [`EtcdStore::follow_index`]).
    pub async fn follow_index(&self, index: &tokio::sync::watch::Sender<u64>) {
        match self {
            Store::Redb(_) => {}
            Store::Etcd(s) => s.follow_index(index).await,
        }
    }
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
}

/// Failures kept per proxy.
const EVENTS_PER_PROXY: usize = 64;

/// A new report merged with the stored one: while the proxy is the same run (same start time),
/// its failures accumulate, the newest [`EVENTS_PER_PROXY`] kept.
fn merge_report(old: Option<ProxyRecord>, new: &ProxyRecord) -> ProxyRecord {
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
        return Err(StoreError(format!(
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
