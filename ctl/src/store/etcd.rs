//! The etcd backend: the daemon's state as keys under a prefix of an etcd cluster, shared by every
//! daemon pointed at it (`ringctl daemon --store etcd://HOST:PORT[,HOST:PORT...][/PREFIX]`).
//!
//! # Key layout
//!
//! Under the prefix (`/ringside/` unless the URL names another); every value is JSON.
//!
//! | key | value |
//! | --- | --- |
//! | `index` | what changed last (a string, for people reading etcd); its `mod_revision` *is* the configuration index |
//! | `docs/<Kind>/<name>` | a configuration document |
//! | `services/<name>` | a [`ServiceRecord`]; its `registered_index` is the key's `create_revision` |
//! | `vips/<ip>` | the name of the service holding that virtual IP |
//! | `endpoints/<service>/<address>` | an [`EndpointRecord`]; attached to the lease of the daemon whose proxy registered it (none when registered by hand) |
//! | `tokens/<sha256 hex>` | a proxy token's [`TokenInfo`]: id, service, created, expires (older ones: the service alone) |
//! | `proxies/<id>` | a [`ProxyRecord`] (a proxy's last report) |
//! | `meta/<counter>` | a number, e.g. `certgen`, `certgen/<service>` |
//! | `ca` | the mesh's CA, a [`SharedCa`]: trust domain, which roots are trusted and which signs, each root's certificate and its private key sealed with the daemons' `--ca-secret` |
//!
//! # Writes
//!
//! Every write that changes what proxies are sent is one etcd transaction that also puts `index`,
//! so the configuration index is the revision of that transaction. Writes that read first are
//! compare-and-swap on revisions, retried from a fresh read when another daemon won the race
//! ([`MAX_ATTEMPTS`] times at most):
//!
//! - `apply`: every document and `index` in one transaction: whole or nothing. It compares the
//!   revision of `index` read just before and writes `index` with a nonce, so one whose answer
//!   was lost (its member died) is resolved from etcd's history, never stored twice. etcd caps a
//!   transaction's operations (`--max-txn-ops`, 128 by default), so one apply holds at most
//!   [`MAX_APPLY_DOCS`] documents.
//! - `delete`: succeeds only if the document exists (`create_revision > 0`).
//! - `register_service`, new service: the lowest virtual IP with no `vips/<ip>` key is claimed by
//!   a transaction that compares `create_revision == 0` on both `services/<name>` and
//!   `vips/<ip>`: of two daemons picking the same IP at once, one commits and the other reads
//!   again and takes the next; of two registering the same name, one allocates. Existing
//!   service: its record is replaced only if its `mod_revision` is still the one read.
//! - `register_endpoint`: only if `services/<service>` exists, in the same transaction.
//! - `bump_meta`: the counter's `mod_revision` (or absence) compared, then counter and `index`.
//! - `report_proxy`: the proxy's record, and its endpoint when it changed (or is on another
//!   lease than this daemon's: re-attached without moving the index), guarded by the
//!   `mod_revision`s read (in one transaction of reads) and the service's existence.
//! - `deregister_endpoint`: only if it exists; `expire_endpoint` (a proxy silent for the TTL):
//!   only if unchanged since read, still that proxy's and on this daemon's lease.
//! - `ca_create`: create-if-absent (`create_revision == 0`), else the stored one is read in the
//!   same transaction: of daemons starting at once, the first one's root is everyone's.
//! - `ca_step`: the next rollover state, only if `ca` is still at the revision it was computed
//!   from; the step that makes the new root sign bumps `meta/certgen` in the same transaction.
//! - `add_token`, `remove_token`: a plain put and delete (a token changes nothing proxies are
//!   sent); `report_proxy` also refuses a report for a proxy id held by another service's live
//!   proxy, judged on the record read, which the transaction guards.
//!
//! # Following other daemons
//!
//! [`EtcdStore::follow_index`] watches the `index` key from a revision, so the daemon's proxy streams
//! carry changes made through any daemon; after a disconnect it reads the index again and watches
//! from the revision of that read, so nothing is missed and nothing replayed. On the same watch
//! stream it follows deletions under `endpoints/`: one alone at its revision is a lease that
//! expired, and the index is moved by a transaction that compares `mod_revision(index) < R`, so
//! however many daemons see it, one moves the index.
//!
//! # Leases
//!
//! A daemon grants itself a lease of `--lease-ttl` and keeps it alive ([`EtcdStore::keep_lease`]);
//! its proxies' endpoints are put on it, so they go when the daemon does. A lease etcd forgot
//! (the daemon was cut off for the TTL) is replaced; the proxies' next reports re-attach.
//!
//! # Reachability
//!
//! A call that fails quickly for want of a member (a killed member's refused connection, an
//! election) is sent again for up to 3 s, a write only when it never reached etcd
//! (`EtcdStore::call`): the other members answer, so losing one of three interrupts nothing.
//! A call that still fails, or gets no answer within 5 s, marks the store unreachable; the next
//! answered call clears it ([`EtcdStore::unreachable`]).

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    KeyValue, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchFilterType,
    WatchOptions,
};
use serde::de::DeserializeOwned;

use super::{
    advance_index, check_owner, endpoint_key, endpoint_of, merge_report, token_from_stored,
    unix_now, vip_at, Down, EndpointRecord, OperatorTokenRecord, PortMap, ProxyRecord,
    ServiceRecord, Snapshot, StoreError, TokenInfo,
};
use crate::ca::SharedCa;
use crate::consul::Document;

/// The key prefix when the store URL names none.
pub const DEFAULT_PREFIX: &str = "/ringside/";

/// The most documents one apply may hold: etcd's default `--max-txn-ops` is 128, and the
/// transaction also writes the index key.
pub const MAX_APPLY_DOCS: usize = 127;

/// How often a compare-and-swap is tried before the write is refused as contended.
pub const MAX_ATTEMPTS: usize = 64;

/// How long the index watch may be silent before the index is read to check on it.
const WATCH_CHECK_EVERY: Duration = Duration::from_secs(5);

/// The longest one etcd request may take before etcd counts as unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Where etcd is and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client endpoints, `HOST:PORT`.
    pub endpoints: Vec<String>,
    /// Key prefix, starting and ending with `/`.
    pub prefix: String,
    /// CA certificate (PEM) to verify etcd's server certificates: TLS is used when it is given.
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd's client-certificate authentication (with `key`).
    pub cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    pub key: Option<PathBuf>,
}

impl EtcdOptions {
    /// Read `etcd://HOST:PORT[,HOST:PORT...][/PREFIX]` (no TLS files yet).
    pub fn parse(url: &str) -> Result<EtcdOptions, String> {
        let rest = url.strip_prefix("etcd://").ok_or_else(|| {
            format!("'{url}' is not an etcd store (etcd://HOST:PORT[,HOST:PORT...][/PREFIX])")
        })?;
        let (hosts, prefix) = match rest.split_once('/') {
            Some((h, p)) if !p.trim_matches('/').is_empty() => {
                (h, format!("/{}/", p.trim_matches('/')))
            }
            Some((h, _)) => (h, DEFAULT_PREFIX.to_string()),
            None => (rest, DEFAULT_PREFIX.to_string()),
        };
        let endpoints: Vec<String> = hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_string)
            .collect();
        if endpoints.is_empty() {
            return Err(format!("'{url}' names no etcd endpoint"));
        }
        if let Some(bad) = endpoints.iter().find(|h| !h.contains(':')) {
            return Err(format!("etcd endpoint '{bad}' has no port (HOST:PORT)"));
        }
        Ok(EtcdOptions {
            endpoints,
            prefix,
            ca: None,
            cert: None,
            key: None,
        })
    }

    /// The client's TLS settings, from the files given.
    fn tls(&self) -> Result<Option<TlsOptions>, StoreError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|x| StoreError::new(format!("{}: {x}", p.display())))
        };
        let Some(ca) = &self.ca else {
            if self.cert.is_some() || self.key.is_some() {
                return Err(StoreError::new(
                    "--etcd-cert and --etcd-key need --etcd-ca (the CA of etcd's certificates)",
                ));
            }
            return Ok(None);
        };
        let mut tls = TlsOptions::new().ca_certificate(Certificate::from_pem(read(ca)?));
        match (&self.cert, &self.key) {
            (Some(c), Some(k)) => tls = tls.identity(Identity::from_pem(read(c)?, read(k)?)),
            (None, None) => {}
            _ => return Err(StoreError::new("--etcd-cert and --etcd-key go together")),
        }
        Ok(Some(tls))
    }
}

/// The etcd store: a client (cheap to clone: one shared connection pool) and the key prefix;
/// whether etcd answers (every call says); the lease this daemon's proxies' endpoints hang on.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    prefix: Arc<str>,
    endpoints: Arc<[String]>,
    health: Arc<Mutex<Option<Down>>>,
    /// [`NOT_LEASING`] (endpoints are put without a lease: tests, tools), 0 (leasing, but no
    /// lease held right now: proxies' endpoints wait), or the lease id.
    lease: Arc<AtomicI64>,
    /// Told when a write found the lease gone, so that the keeper grants another at once.
    lease_lost: Arc<tokio::sync::Notify>,
}

/// [`EtcdStore::lease`] when the store does not attach endpoints to a lease.
const NOT_LEASING: i64 = -1;

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

fn etcd_err(x: etcd_client::Error) -> StoreError {
    if is_unreachable(&x) {
        StoreError::unreachable(format!("etcd: {}", detail(&x)))
    } else {
        StoreError::new(format!("etcd: {}", detail(&x)))
    }
}

/// Whether an etcd client error says etcd could not be reached (rather than that it refused the
/// request): no connection, a broken one, no answer in time, no leader.
fn is_unreachable(x: &etcd_client::Error) -> bool {
    use etcd_client::Error as E;
    match x {
        E::TransportError(_) | E::IoError(_) | E::WatchError(_) | E::LeaseKeepAliveError(_) => true,
        // Cancelled, Unknown (a transport failure under gRPC), DeadlineExceeded, Unavailable.
        E::GRpcStatus(s) => matches!(s.code() as i32, 1 | 2 | 4 | 14),
        _ => false,
    }
}

/// Whether the request never reached etcd (the connection to the member it was sent to could not
/// be made): sending it again, to another member, cannot apply it twice.
fn not_sent(x: &etcd_client::Error) -> bool {
    let text = format!("{x:?}");
    text.contains("tcp connect error")
        || text.contains("error trying to connect")
        || text.contains("ConnectionRefused")
}

/// Whether the failure took its time (no answer before the deadline): not worth waiting for
/// again within one call.
fn timed_out(x: &etcd_client::Error) -> bool {
    match x {
        etcd_client::Error::GRpcStatus(s) => matches!(s.code() as i32, 1 | 4),
        other => other.to_string().contains("timed out"),
    }
}

/// How long a call keeps trying other members after quick failures (a killed member's refused
/// connections, an election): longer than an etcd election with the default timeouts (1 s).
const RETRY_FOR: Duration = Duration::from_secs(3);

/// An etcd client error in a few words (a gRPC status without its empty details and metadata).
fn detail(x: &etcd_client::Error) -> String {
    match x {
        etcd_client::Error::GRpcStatus(s) => format!("{:?}: {}", s.code(), s.message()),
        other => other.to_string(),
    }
}

fn to_json<T: serde::Serialize + ?Sized>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(super::e)
}

fn from_json<T: DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|x| {
        StoreError::new(format!(
            "{} holds something unreadable: {x}",
            String::from_utf8_lossy(kv.key())
        ))
    })
}

/// The revision a transaction was committed at.
fn revision(r: &TxnResponse) -> u64 {
    r.header().map_or(0, |h| h.revision()).max(0) as u64
}

/// The compare that holds while `key` is as it was read: same `mod_revision`, or still absent.
fn unchanged(key: &str, read: Option<&KeyValue>) -> Compare {
    match read {
        Some(kv) => Compare::mod_revision(key, CompareOp::Equal, kv.mod_revision()),
        None => Compare::create_revision(key, CompareOp::Equal, 0),
    }
}

/// The compare that holds while `key` exists.
fn exists(key: &str) -> Compare {
    Compare::create_revision(key, CompareOp::Greater, 0)
}

fn contended(what: &str) -> StoreError {
    StoreError::new(format!(
        "{what}: other daemons changed the same keys {MAX_ATTEMPTS} times in a row; try again"
    ))
}

impl EtcdStore {
    /// Connect, and read the index once so that an unreachable etcd is reported now. Call it
    /// inside the tokio runtime that will run the store's calls (the client's connections are
    /// tasks of that runtime).
    pub async fn connect(o: &EtcdOptions) -> Result<EtcdStore, StoreError> {
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            .with_timeout(REQUEST_TIMEOUT)
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true);
        if let Some(tls) = o.tls()? {
            opts = opts.with_tls(tls);
        }
        let client = Client::connect(&o.endpoints, Some(opts))
            .await
            .map_err(etcd_err)?;
        let store = EtcdStore {
            client,
            prefix: o.prefix.as_str().into(),
            endpoints: o.endpoints.clone().into(),
            health: Arc::default(),
            lease: Arc::new(AtomicI64::new(NOT_LEASING)),
            lease_lost: Arc::default(),
        };
        store.index_at().await.map_err(|x| {
            StoreError::new(format!(
                "cannot reach etcd at {}: {x}",
                o.endpoints.join(",")
            ))
        })?;
        Ok(store)
    }

    /// `etcd HOSTS prefix P`, for logs.
    pub fn describe(&self) -> String {
        format!("etcd {} prefix {}", self.endpoints.join(","), self.prefix)
    }

    fn key(&self, rest: &str) -> String {
        format!("{}{rest}", self.prefix)
    }

    /// A failed call: when etcd could not be reached, the store is marked unreachable (from now,
    /// unless it already was) and the error says so.
    fn fail(&self, x: etcd_client::Error) -> StoreError {
        if !is_unreachable(&x) {
            return etcd_err(x);
        }
        let reason = format!(
            "etcd at {} is unreachable ({})",
            self.endpoints.join(","),
            detail(&x)
        );
        self.down(&reason);
        StoreError::unreachable(reason)
    }

    /// Mark etcd unreachable for `reason` (from now, unless it already was).
    fn down(&self, reason: &str) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match h.as_mut() {
            Some(d) => d.reason = reason.to_string(),
            None => {
                eprintln!("ringctl daemon: {reason}; refusing writes, serving proxies the last good state");
                *h = Some(Down {
                    reason: reason.to_string(),
                    since: std::time::Instant::now(),
                });
            }
        }
    }

    /// Run one etcd request, sending it again while it fails quickly for want of a member (a
    /// refused connection to a killed member, a broken one, no leader during an election), for
    /// up to [`RETRY_FOR`]: the cluster's other members answer it, so losing one member of three
    /// interrupts nothing. A `write` is sent again only when it never reached etcd; one that
    /// may have been applied is returned as failed (marked [`StoreError::in_doubt`]) for the
    /// caller to resolve. The store is marked unreachable only when the retries are exhausted.
    async fn call<T, F, Fut>(&self, write: bool, mut f: F) -> Result<T, StoreError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = std::time::Instant::now();
        let mut pause = Duration::from_millis(20);
        loop {
            match f().await {
                Ok(v) => {
                    self.up();
                    return Ok(v);
                }
                Err(x) => {
                    let again = is_unreachable(&x)
                        && !timed_out(&x)
                        && (!write || not_sent(&x))
                        && start.elapsed() + pause < RETRY_FOR;
                    if !again {
                        let sent = !not_sent(&x);
                        let mut e = self.fail(x);
                        e.in_doubt = write && e.unreachable && sent;
                        return Err(e);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(400));
                }
            }
        }
    }

    /// A call etcd answered: it is reachable.
    fn up(&self) {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = h.take() {
            eprintln!(
                "ringctl daemon: etcd reachable again after {}s",
                d.since.elapsed().as_secs()
            );
        }
    }

    /// See [`super::Store::unreachable`].
    pub fn unreachable(&self) -> Option<Down> {
        self.health
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The operation that moves the configuration index, naming the change.
    fn index_op(&self, what: &str) -> Result<TxnOp, StoreError> {
        Ok(TxnOp::put(self.key("index"), to_json(what)?, None))
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let mut r = self
            .call(false, || {
                let mut kv = self.client.kv_client();
                async move { kv.get(key, None).await }
            })
            .await?;
        Ok(r.take_kvs().into_iter().next())
    }

    /// Several keys read at one revision (one transaction of reads).
    async fn get_many(&self, keys: &[&str]) -> Result<Vec<Option<KeyValue>>, StoreError> {
        let ops: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(*k, None)).collect();
        let r = self.read_txn(Txn::new().and_then(ops)).await?;
        Ok(r.op_responses()
            .into_iter()
            .map(|op| match op {
                TxnOpResponse::Get(mut g) => g.take_kvs().into_iter().next(),
                _ => None,
            })
            .collect())
    }

    /// Every key under `dir` (below the prefix), in key order.
    async fn list(&self, dir: &str) -> Result<Vec<KeyValue>, StoreError> {
        let key = self.key(dir);
        let mut r = self
            .call(false, || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move { kv.get(key, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        Ok(r.take_kvs())
    }

    async fn list_json<T: DeserializeOwned>(&self, dir: &str) -> Result<Vec<T>, StoreError> {
        self.list(dir).await?.iter().map(from_json).collect()
    }

    /// A transaction that writes: sent again only when it never reached etcd.
    async fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(true, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// A transaction of reads only: sent again while members fail quickly.
    async fn read_txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.call(false, || {
            let mut kv = self.client.kv_client();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    /// The configuration index and the store's revision at the read.
    async fn index_at(&self) -> Result<(u64, i64), StoreError> {
        let key = self.key("index");
        let mut r = self
            .call(false, || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move { kv.get(key, None).await }
            })
            .await?;
        let at = r.take_header().map_or(0, |h| h.revision());
        let index = r
            .kvs()
            .first()
            .map_or(0, |kv| kv.mod_revision().max(0) as u64);
        Ok((index, at))
    }

    /// See [`super::Store::apply`]. A document named twice is stored as its last occurrence, as
    /// with redb.
    ///
    /// Exactly once, also when the member it was sent to dies: the transaction compares the
    /// `index` key's revision read just before and writes `index` with a nonce of this apply.
    /// When no answer comes back (the member died, or lost its leadership, with the request in
    /// flight), the first change of `index` after that revision (from etcd's history, a watch
    /// from it) tells whether it was this apply: then it is done, else it lost the compare and
    /// is sent again. So an apply is never stored twice (nor reordered after a later one).
    pub async fn apply(&self, docs: &[Document]) -> Result<u64, StoreError> {
        let by_id: BTreeMap<String, &Document> = docs.iter().map(|d| (d.id(), d)).collect();
        if by_id.len() > MAX_APPLY_DOCS {
            return Err(StoreError::new(format!(
                "{} documents in one apply: the etcd store takes at most {MAX_APPLY_DOCS} (etcd's --max-txn-ops); nothing applied",
                by_id.len()
            )));
        }
        let mut puts = Vec::with_capacity(by_id.len() + 1);
        for (id, d) in &by_id {
            puts.push(TxnOp::put(
                self.key(&format!("docs/{id}")),
                to_json(d)?,
                None,
            ));
        }
        let mut nonce = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
            .map_err(|_| StoreError::new("no randomness for the apply's nonce"))?;
        let mark = format!("apply {:016x}", u64::from_le_bytes(nonce));
        puts.push(self.index_op(&mark)?);
        let ikey = self.key("index");
        for _ in 0..MAX_ATTEMPTS {
            let read = self.get(&ikey).await?;
            let txn = Txn::new()
                .when([unchanged(&ikey, read.as_ref())])
                .and_then(puts.clone());
            match self.txn(txn).await {
                Ok(r) if r.succeeded() => return Ok(revision(&r)),
                Ok(_) => continue, // another change came first: read again
                Err(x) if x.in_doubt => {
                    let after = read.as_ref().map_or(0, |kv| kv.mod_revision());
                    match self.first_index_change_after(after).await {
                        Ok(Some((rev, what))) if what == mark => return Ok(rev),
                        Ok(_) => continue, // not ours: ours lost the compare
                        Err(_) => return Err(x),
                    }
                }
                Err(x) => return Err(x),
            }
        }
        Err(contended("applying"))
    }

    /// The first write of `index` after revision `after` (its revision and value), from etcd's
    /// history; `None` when there is none yet.
    async fn first_index_change_after(
        &self,
        after: i64,
    ) -> Result<Option<(u64, String)>, StoreError> {
        let ikey = self.key("index");
        let (now, _) = self.index_at().await?;
        if now as i64 <= after {
            return Ok(None);
        }
        let first = || async {
            let opts = WatchOptions::new().with_start_revision(after + 1);
            let mut s = self
                .client
                .watch_client()
                .watch(ikey.as_str(), Some(opts))
                .await?;
            while let Some(resp) = s.message().await? {
                if let Some(kv) = resp.events().iter().find_map(|e| e.kv()) {
                    let what: String = serde_json::from_slice(kv.value()).unwrap_or_default();
                    return Ok(Some((kv.mod_revision().max(0) as u64, what)));
                }
                if resp.canceled() {
                    break;
                }
            }
            Ok::<_, etcd_client::Error>(None)
        };
        let found = tokio::time::timeout(REQUEST_TIMEOUT, self.call(false, first)).await;
        match found {
            Ok(Ok(Some(found))) => Ok(Some(found)),
            Ok(Ok(None)) => Err(StoreError::new(
                "etcd's history of the index is compacted: cannot tell whether the write happened",
            )),
            Ok(Err(x)) => Err(x),
            Err(_) => Err(StoreError::unreachable(
                "no answer from etcd's watch in time",
            )),
        }
    }

    /// See [`super::Store::delete`].
    pub async fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let k = self.key(&format!("docs/{id}"));
        let txn = Txn::new().when([exists(&k)]).and_then([
            TxnOp::delete(k.as_str(), None),
            self.index_op(&format!("delete {id}"))?,
        ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// See [`super::Store::documents`].
    pub async fn documents(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        self.list_json("docs/").await
    }

    /// See [`super::Store::index`]: the revision of the last configuration change.
    pub async fn index(&self) -> Result<u64, StoreError> {
        Ok(self.index_at().await?.0)
    }

    /// See [`super::Store::register_service`].
    pub async fn register_service(
        &self,
        name: &str,
        ports: Vec<PortMap>,
        range: (Ipv4Addr, u8),
    ) -> Result<ServiceRecord, StoreError> {
        let skey = self.key(&format!("services/{name}"));
        for _ in 0..MAX_ATTEMPTS {
            let txn;
            let mut svc;
            match self.get(&skey).await? {
                Some(kv) => {
                    svc = from_json::<ServiceRecord>(&kv)?;
                    svc.ports = ports.clone();
                    svc.registered_index = kv.create_revision().max(0) as u64;
                    txn = Txn::new().when([unchanged(&skey, Some(&kv))]).and_then([
                        TxnOp::put(skey.as_str(), to_json(&svc)?, None),
                        self.index_op(&format!("service {name}"))?,
                    ]);
                }
                None => {
                    let vips = self.key("vips/");
                    let taken: HashSet<Ipv4Addr> = self
                        .call(false, || {
                            let mut kv = self.client.kv_client();
                            let vips = vips.clone();
                            async move {
                                kv.get(vips, Some(GetOptions::new().with_prefix().with_keys_only()))
                                    .await
                            }
                        })
                        .await?
                        .kvs()
                        .iter()
                        .filter_map(|kv| {
                            let k = kv.key_str().ok()?;
                            k.strip_prefix(&self.key("vips/"))?.parse().ok()
                        })
                        .collect();
                    let mut offset = 1;
                    let ip = loop {
                        let ip = vip_at(range, offset)?;
                        if !taken.contains(&ip) {
                            break ip;
                        }
                        offset += 1;
                    };
                    svc = ServiceRecord {
                        name: name.to_string(),
                        ports: ports.clone(),
                        virtual_ip: ip,
                        registered_index: 0,
                        registered_at: unix_now(),
                    };
                    let vkey = self.key(&format!("vips/{ip}"));
                    txn = Txn::new()
                        .when([unchanged(&skey, None), unchanged(&vkey, None)])
                        .and_then([
                            TxnOp::put(skey.as_str(), to_json(&svc)?, None),
                            TxnOp::put(vkey.as_str(), to_json(name)?, None),
                            self.index_op(&format!("service {name}"))?,
                        ]);
                }
            }
            let r = self.txn(txn).await?;
            if r.succeeded() {
                if svc.registered_index == 0 {
                    svc.registered_index = revision(&r);
                }
                return Ok(svc);
            }
        }
        Err(contended(&format!("registering service '{name}'")))
    }

    /// See [`super::Store::register_endpoint`].
    pub async fn register_endpoint(&self, ep: &EndpointRecord) -> Result<(), StoreError> {
        let skey = self.key(&format!("services/{}", ep.service));
        let txn = Txn::new().when([exists(&skey)]).and_then([
            TxnOp::put(
                self.key(&format!("endpoints/{}", endpoint_key(ep))),
                to_json(ep)?,
                None,
            ),
            self.index_op(&format!("endpoint {}", endpoint_key(ep)))?,
        ]);
        if self.txn(txn).await?.succeeded() {
            Ok(())
        } else {
            Err(StoreError::new(format!(
                "no service '{}': register it first",
                ep.service
            )))
        }
    }

    /// See [`super::Store::services`].
    pub async fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.list("services/")
            .await?
            .iter()
            .map(|kv| {
                let mut s: ServiceRecord = from_json(kv)?;
                s.registered_index = kv.create_revision().max(0) as u64;
                Ok(s)
            })
            .collect()
    }

    /// See [`super::Store::endpoints`].
    pub async fn endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        self.list_json("endpoints/").await
    }

    /// See [`super::Store::add_token`].
    pub async fn add_token(&self, token_hash: &str, token: &TokenInfo) -> Result<(), StoreError> {
        let (key, value) = (self.key(&format!("tokens/{token_hash}")), to_json(token)?);
        // The same put twice stores the same: sent again on any quick failure.
        self.call(false, || {
            let mut kv = self.client.kv_client();
            let (key, value) = (key.clone(), value.clone());
            async move { kv.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// See [`super::Store::token`].
    pub async fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        match self.get(&self.key(&format!("tokens/{token_hash}"))).await? {
            Some(kv) => Ok(Some(token_from_stored(token_hash, kv.value())?)),
            None => Ok(None),
        }
    }

    /// See [`super::Store::tokens`].
    pub async fn tokens(&self) -> Result<Vec<(String, TokenInfo)>, StoreError> {
        let dir = self.key("tokens/");
        self.list("tokens/")
            .await?
            .iter()
            .map(|kv| {
                let key = String::from_utf8_lossy(kv.key());
                let hash = key.strip_prefix(dir.as_str()).unwrap_or(&key).to_string();
                let info = token_from_stored(&hash, kv.value())?;
                Ok((hash, info))
            })
            .collect()
    }

    /// See [`super::Store::remove_token`].
    pub async fn remove_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        let key = self.key(&format!("tokens/{token_hash}"));
        let r = self
            .call(true, || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move { kv.delete(key, None).await }
            })
            .await?;
        Ok(r.deleted() > 0)
    }

    /// See [`super::Store::meta`].
    #[cfg(test)] // the daemon reads counters from its snapshot
    pub async fn meta(&self, key: &str) -> Result<u64, StoreError> {
        match self.get(&self.key(&format!("meta/{key}"))).await? {
            Some(kv) => from_json(&kv),
            None => Ok(0),
        }
    }

    /// See [`super::Store::bump_meta`].
    pub async fn bump_meta(&self, key: &str) -> Result<u64, StoreError> {
        let k = self.key(&format!("meta/{key}"));
        for _ in 0..MAX_ATTEMPTS {
            let read = self.get(&k).await?;
            let v = match &read {
                Some(kv) => from_json::<u64>(kv)? + 1,
                None => 1,
            };
            let txn = Txn::new().when([unchanged(&k, read.as_ref())]).and_then([
                TxnOp::put(k.as_str(), to_json(&v)?, None),
                self.index_op(&format!("{key} {v}"))?,
            ]);
            if self.txn(txn).await?.succeeded() {
                return Ok(v);
            }
        }
        Err(contended(&format!("counting {key}")))
    }

    /// See [`super::Store::bump_index`].
    pub async fn bump_index(&self) -> Result<u64, StoreError> {
        let r = self
            .txn(Txn::new().and_then([self.index_op("bump")?]))
            .await?;
        Ok(revision(&r))
    }

    /// See [`super::Store::report_proxy`]. A daemon holding a lease ([`EtcdStore::keep_lease`])
    /// attaches the endpoint to it (and re-attaches one it finds on another lease, e.g. its own
    /// before a restart, without moving the index when nothing else changed); while it has lost
    /// its lease and not yet got another, the report is recorded and the endpoint waits for the
    /// next one.
    pub async fn report_proxy(&self, rec: &ProxyRecord, node: &str) -> Result<bool, StoreError> {
        let lease = self.lease.load(Ordering::Relaxed);
        let pkey = self.key(&format!("proxies/{}", rec.report.id));
        let ep = endpoint_of(rec, node).filter(|_| lease != 0);
        let skey = self.key(&format!("services/{}", rec.report.service));
        let ekey = ep
            .as_ref()
            .map(|ep| self.key(&format!("endpoints/{}", endpoint_key(ep))));
        let put_opts = (lease > 0).then(|| PutOptions::new().with_lease(lease));
        for _ in 0..MAX_ATTEMPTS {
            let mut keys = vec![pkey.as_str()];
            if let Some(ekey) = &ekey {
                keys.extend([skey.as_str(), ekey.as_str()]);
            }
            let mut read = self.get_many(&keys).await?.into_iter();
            let old = read.next().flatten();
            let stored: Option<ProxyRecord> = old
                .as_ref()
                .and_then(|kv| serde_json::from_slice(kv.value()).ok());
            check_owner(stored.as_ref(), rec)?;
            let merged = merge_report(stored, rec);
            let mut when = vec![unchanged(&pkey, old.as_ref())];
            let mut then = vec![TxnOp::put(pkey.as_str(), to_json(&merged)?, None)];
            let mut changed = false;
            if let (Some(ep), Some(ekey)) = (&ep, &ekey) {
                let known = read.next().flatten().is_some();
                let current = read.next().flatten();
                let json = to_json(ep)?;
                let same = current.as_ref().is_some_and(|kv| kv.value() == json);
                let attached = current
                    .as_ref()
                    .is_some_and(|kv| kv.lease() == lease.max(0));
                if known && !(same && attached) {
                    when.push(exists(&skey));
                    when.push(unchanged(ekey, current.as_ref()));
                    then.push(TxnOp::put(ekey.as_str(), json, put_opts.clone()));
                    if !same {
                        then.push(self.index_op(&format!("endpoint {}", endpoint_key(ep)))?);
                        changed = true;
                    }
                }
            }
            match self.txn(Txn::new().when(when).and_then(then)).await {
                Ok(r) if r.succeeded() => return Ok(changed),
                Ok(_) => {}
                Err(x) if x.message.contains("lease not found") => {
                    // etcd expired the lease (it did not hear from this daemon for the TTL):
                    // the keeper grants another; this endpoint waits for the next report.
                    self.lease_lost.notify_one();
                    return Err(x);
                }
                Err(x) => return Err(x),
            }
        }
        Err(contended(&format!("recording proxy {}", rec.report.id)))
    }

    /// See [`super::Store::record_reports`]: the records read in one transaction, each merged
    /// with its stored one and put only if that is unchanged since (compare on `mod_revision`),
    /// all in one transaction; retried from a fresh read when another write came between.
    pub async fn record_reports(&self, recs: &[ProxyRecord]) -> Result<(), StoreError> {
        let keys: Vec<String> = recs
            .iter()
            .map(|r| self.key(&format!("proxies/{}", r.report.id)))
            .collect();
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        for _ in 0..MAX_ATTEMPTS {
            let read = self.get_many(&key_refs).await?;
            let mut when = Vec::with_capacity(recs.len());
            let mut then = Vec::with_capacity(recs.len());
            for ((rec, key), old) in recs.iter().zip(&keys).zip(&read) {
                let stored: Option<ProxyRecord> = old
                    .as_ref()
                    .and_then(|kv| serde_json::from_slice(kv.value()).ok());
                // Another service's proxy took the id meanwhile, or a newer report of this one
                // was written: this one is dropped, not written over it.
                if check_owner(stored.as_ref(), rec).is_err()
                    || stored.as_ref().is_some_and(|s| {
                        s.report.service != rec.report.service || s.last_seen > rec.last_seen
                    })
                {
                    continue;
                }
                when.push(unchanged(key, old.as_ref()));
                then.push(TxnOp::put(
                    key.as_str(),
                    to_json(&merge_report(stored, rec))?,
                    None,
                ));
            }
            if then.is_empty() {
                return Ok(());
            }
            if self
                .txn(Txn::new().when(when).and_then(then))
                .await?
                .succeeded()
            {
                return Ok(());
            }
        }
        Err(contended("recording proxies' reports"))
    }

    /// The lease endpoints are put on now (0 or less: none).
    pub fn current_lease(&self) -> i64 {
        self.lease.load(Ordering::Relaxed)
    }

    /// See [`super::Store::proxies`].
    pub async fn proxies(&self) -> Result<Vec<ProxyRecord>, StoreError> {
        self.list_json("proxies/").await
    }

    /// See [`super::Store::snapshot`]: one transaction of reads, so every part is at the same
    /// revision.
    pub async fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let range = |dir: &str| TxnOp::get(self.key(dir), Some(GetOptions::new().with_prefix()));
        let r = self
            .read_txn(Txn::new().and_then([
                TxnOp::get(self.key("index"), None),
                range("docs/"),
                range("services/"),
                range("endpoints/"),
                range("meta/"),
                TxnOp::get(self.key("ca"), None),
            ]))
            .await?;
        let mut parts = r.op_responses().into_iter().map(|op| match op {
            TxnOpResponse::Get(mut g) => g.take_kvs(),
            _ => Vec::new(),
        });
        let mut next = || parts.next().unwrap_or_default();
        let index = next()
            .first()
            .map_or(0, |kv| kv.mod_revision().max(0) as u64);
        let docs = next().iter().map(from_json).collect::<Result<_, _>>()?;
        let services = next()
            .iter()
            .map(|kv| {
                let mut s: ServiceRecord = from_json(kv)?;
                s.registered_index = kv.create_revision().max(0) as u64;
                Ok(s)
            })
            .collect::<Result<_, StoreError>>()?;
        let endpoints = next().iter().map(from_json).collect::<Result<_, _>>()?;
        let meta = self.key("meta/");
        let mut counters = BTreeMap::new();
        for kv in next() {
            let name = kv.key_str().unwrap_or_default().strip_prefix(&meta);
            if let Some(name) = name {
                counters.insert(name.to_string(), from_json(&kv)?);
            }
        }
        let ca = match next().first() {
            Some(kv) => Some((from_json(kv)?, kv.mod_revision())),
            None => None,
        };
        Ok(Snapshot {
            index,
            docs,
            services,
            endpoints,
            counters,
            ca,
        })
    }

    /// See [`super::Store::deregister_endpoint`].
    pub async fn deregister_endpoint(
        &self,
        service: &str,
        address: IpAddr,
    ) -> Result<bool, StoreError> {
        let k = self.key(&format!("endpoints/{service}/{address}"));
        let txn = Txn::new().when([exists(&k)]).and_then([
            TxnOp::delete(k.as_str(), None),
            self.index_op(&format!("deregister {service}/{address}"))?,
        ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// See [`super::Store::expire_endpoint`]: removed only while it is the proxy's, on this
    /// daemon's lease, unchanged since read.
    pub async fn expire_endpoint(
        &self,
        service: &str,
        address: IpAddr,
        proxy: &str,
    ) -> Result<bool, StoreError> {
        let k = self.key(&format!("endpoints/{service}/{address}"));
        let Some(kv) = self.get(&k).await? else {
            return Ok(false);
        };
        let ep: EndpointRecord = from_json(&kv)?;
        let lease = self.lease.load(Ordering::Relaxed);
        if ep.node != proxy || kv.lease() == 0 || (lease > 0 && kv.lease() != lease) {
            return Ok(false);
        }
        let txn = Txn::new().when([unchanged(&k, Some(&kv))]).and_then([
            TxnOp::delete(k.as_str(), None),
            self.index_op(&format!("expired {service}/{address} of {proxy}"))?,
        ]);
        Ok(self.txn(txn).await?.succeeded())
    }

    /// See [`super::Store::proxy_endpoints`]: none (they hang on leases).
    pub async fn proxy_endpoints(&self) -> Result<Vec<(String, IpAddr, String)>, StoreError> {
        Ok(Vec::new())
    }

    /// See [`super::Store::ca_record`].
    pub async fn ca_record(&self) -> Result<Option<(SharedCa, i64)>, StoreError> {
        match self.get(&self.key("ca")).await? {
            Some(kv) => Ok(Some((from_json(&kv)?, kv.mod_revision()))),
            None => Ok(None),
        }
    }

    /// See [`super::Store::ca_create`]: create-if-absent in one transaction.
    pub async fn ca_create(&self, ca: &SharedCa) -> Result<(SharedCa, i64), StoreError> {
        let k = self.key("ca");
        let r = self
            .txn(
                Txn::new()
                    .when([unchanged(&k, None)])
                    .and_then([
                        TxnOp::put(k.as_str(), to_json(ca)?, None),
                        self.index_op("ca created")?,
                    ])
                    .or_else([TxnOp::get(k.as_str(), None)]),
            )
            .await?;
        if r.succeeded() {
            return Ok((ca.clone(), revision(&r) as i64));
        }
        match r.op_responses().into_iter().next() {
            Some(TxnOpResponse::Get(mut g)) => match g.take_kvs().into_iter().next() {
                Some(kv) => Ok((from_json(&kv)?, kv.mod_revision())),
                None => Err(StoreError::new("the shared CA vanished while created")),
            },
            _ => Err(StoreError::new("etcd answered the CA creation oddly")),
        }
    }

    /// See [`super::Store::ca_step`].
    pub async fn ca_step(
        &self,
        revision_read: i64,
        next: &SharedCa,
        bump_certgen: bool,
    ) -> Result<bool, StoreError> {
        let k = self.key("ca");
        let gen_key = self.key("meta/certgen");
        for _ in 0..MAX_ATTEMPTS {
            let mut when = vec![Compare::mod_revision(
                k.as_str(),
                CompareOp::Equal,
                revision_read,
            )];
            let mut then = vec![
                TxnOp::put(k.as_str(), to_json(next)?, None),
                self.index_op(&format!("ca {}", next.phase().as_str()))?,
            ];
            if bump_certgen {
                let read = self.get(&gen_key).await?;
                let v = match &read {
                    Some(kv) => from_json::<u64>(kv)? + 1,
                    None => 1,
                };
                when.push(unchanged(&gen_key, read.as_ref()));
                then.push(TxnOp::put(gen_key.as_str(), to_json(&v)?, None));
            }
            if self
                .txn(Txn::new().when(when).and_then(then))
                .await?
                .succeeded()
            {
                return Ok(true);
            }
            // Lost: to another daemon's step (then it is not retried), or to a counter bump.
            let now = self.get(&k).await?.map_or(0, |kv| kv.mod_revision());
            if now != revision_read {
                return Ok(false);
            }
        }
        Err(contended("a CA rollover step"))
    }

    /// See [`super::Store::keep_lease`]: grant a lease of `ttl`, keep it alive (a keep-alive
    /// every third of the TTL), and grant another when etcd forgot it (it heard nothing for the
    /// TTL: this daemon was cut off or stalled; the endpoints on it are gone, and come back as
    /// their proxies report). A keep-alive unanswered for a third of the TTL marks etcd
    /// unreachable; a broken keep-alive stream does not (one member died or one connection
    /// broke): another is opened at once, through the other members, and etcd is unreachable only
    /// when none of them answers (see [`EtcdStore::call`]).
    pub async fn keep_lease(&self, ttl: Duration) {
        let ttl_s = ttl.as_secs().max(2) as i64;
        let every = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(500));
        self.start_leasing();
        let mut id: Option<i64> = None;
        loop {
            let lease = match id {
                Some(l) => l,
                None => {
                    self.lease.store(0, Ordering::Relaxed);
                    let granted = self
                        .call(false, || {
                            let mut leases = self.client.lease_client();
                            async move { leases.grant(ttl_s, None).await }
                        })
                        .await;
                    match granted {
                        Ok(r) => {
                            eprintln!(
                                "ringctl daemon: holding etcd lease {:x} (TTL {ttl_s}s) for its proxies' endpoints",
                                r.id()
                            );
                            id = Some(r.id());
                            r.id()
                        }
                        // `call` tried the other members for a while and marked etcd
                        // unreachable.
                        Err(_) => {
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            continue;
                        }
                    }
                }
            };
            // Opening the keep-alive stream goes through `call` too: a member killed under the
            // old stream refuses the first attempt, another member takes the next one.
            let opened = self
                .call(false, || {
                    let mut leases = self.client.lease_client();
                    async move { leases.keep_alive(lease).await }
                })
                .await;
            let (mut keeper, mut stream) = match opened {
                Ok(k) => k,
                Err(e) => {
                    if e.message.contains("lease not found") {
                        eprintln!("ringctl daemon: etcd lease {lease:x} expired; granting another");
                        id = None;
                    } else {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    continue;
                }
            };
            self.lease.store(lease, Ordering::Relaxed);
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = self.lease_lost.notified() => {
                        eprintln!("ringctl daemon: etcd lease {lease:x} lost; granting another");
                        id = None;
                        break;
                    }
                }
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(every, stream.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => self.up(),
                    Ok(Ok(Some(_))) => {
                        eprintln!("ringctl daemon: etcd lease {lease:x} expired; granting another");
                        id = None;
                        break;
                    }
                    // The stream broke (its member died, or its connection did): open another
                    // at once; whether etcd is unreachable is for that attempt to find out, not
                    // for one member's broken connection to say.
                    Ok(Ok(None)) | Ok(Err(_)) => break,
                    Err(_) => {
                        self.down(&format!(
                            "etcd at {} is unreachable (no answer to the lease keep-alive in {}ms)",
                            self.endpoints.join(","),
                            every.as_millis()
                        ));
                        break;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// From now on, proxies' endpoints go on the lease only (none is held yet).
    pub fn start_leasing(&self) {
        let _ = self
            .lease
            .compare_exchange(NOT_LEASING, 0, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// After a lease expired (endpoints deleted by etcd, alone at their revision `rev`), move the
    /// index, unless it moved at or after `rev` already: every daemon watching tries, one
    /// transaction wins (a deletion made by a deregistration moved the index itself).
    async fn index_after(&self, rev: i64, what: &str) {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                self.key("index"),
                CompareOp::Less,
                rev,
            )])
            .and_then(match self.index_op(what) {
                Ok(op) => vec![op],
                Err(_) => return,
            });
        let _ = self.txn(txn).await;
    }

    /// Keep `index` at the configuration index, whichever daemon changed it; runs forever.
    ///
    /// An etcd watch on the index key, from the revision after the last read: every event is a
    /// configuration change. When the watch breaks (etcd restarted, connection lost, or its start
    /// revision compacted away), the index is read again and a new watch starts after the
    /// revision of that read, so no change is missed and none replayed. A watch silent for
    /// [`WATCH_CHECK_EVERY`] is checked with a read of the index (a connection that died without
    /// a word shows there), and restarted if the read fails or finds a change it missed.
    pub async fn follow_index(
        &self,
        index: &tokio::sync::watch::Sender<u64>,
        tokens: &tokio::sync::mpsc::UnboundedSender<super::TokenNews>,
    ) {
        let key = self.key("index");
        let eps = self.key("endpoints/");
        let toks = self.key("tokens/");
        let mut resumed = false;
        let mut backoff = Duration::from_millis(100);
        let mut down: Option<String> = None;
        loop {
            let (current, at) = match self.index_at().await {
                Ok(r) => r,
                Err(x) => {
                    if down.is_none() {
                        eprintln!("ringctl daemon: lost etcd ({x}); retrying");
                    }
                    down = Some(x.to_string());
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            advance_index(index, current);
            let opts = WatchOptions::new().with_start_revision(at + 1);
            let deletes = WatchOptions::new()
                .with_start_revision(at + 1)
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]);
            let token_deletes = WatchOptions::new()
                .with_start_revision(at + 1)
                .with_prefix()
                .with_filters([WatchFilterType::NoPut]);
            let watched = async {
                let mut s = self
                    .client
                    .watch_client()
                    .watch(key.as_str(), Some(opts))
                    .await?;
                s.watch(eps.as_str(), Some(deletes)).await?;
                s.watch(toks.as_str(), Some(token_deletes)).await?;
                Ok::<_, etcd_client::Error>(s)
            };
            let mut stream = match watched.await {
                Ok(s) => s,
                Err(x) => {
                    down.get_or_insert_with(|| {
                        eprintln!("ringctl daemon: cannot watch etcd ({x}); retrying");
                        x.to_string()
                    });
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            };
            if down.take().is_some() {
                eprintln!("ringctl daemon: etcd back; following from revision {at}");
            }
            // Tokens removed while no watch ran are not seen as events: the daemon checks the
            // ones in use against the store.
            if resumed {
                let _ = tokens.send(super::TokenNews::Resumed);
            }
            resumed = true;
            let mut seen = current;
            loop {
                match tokio::time::timeout(WATCH_CHECK_EVERY, stream.message()).await {
                    Ok(Ok(Some(resp))) => {
                        backoff = Duration::from_millis(100);
                        let mut expired: Option<(i64, String)> = None;
                        for ev in resp.events() {
                            let Some(kv) = ev.kv() else { continue };
                            let k = kv.key_str().unwrap_or_default();
                            if k == key {
                                seen = seen.max(kv.mod_revision().max(0) as u64);
                            } else if let Some(hash) = k.strip_prefix(toks.as_str()) {
                                if ev.event_type() == EventType::Delete {
                                    let _ = tokens.send(super::TokenNews::Removed(hash.into()));
                                }
                            } else if ev.event_type() == EventType::Delete {
                                let what = k.strip_prefix(&eps).unwrap_or(k).to_string();
                                if expired.as_ref().is_none_or(|(r, _)| kv.mod_revision() > *r) {
                                    expired = Some((kv.mod_revision(), what));
                                }
                            }
                        }
                        advance_index(index, seen);
                        if let Some((rev, what)) = expired {
                            self.index_after(rev, &format!("expired {what}")).await;
                        }
                        if resp.canceled() {
                            break;
                        }
                    }
                    Ok(Ok(None)) => break,
                    Ok(Err(x)) => {
                        eprintln!("ringctl daemon: etcd watch broke ({x}); resuming");
                        break;
                    }
                    Err(_silent) => match self.index_at().await {
                        Ok((i, _)) if i <= seen => {}
                        Ok(_) => break,
                        Err(x) => {
                            eprintln!("ringctl daemon: etcd silent ({x}); resuming");
                            break;
                        }
                    },
                }
            }
            // A watch that keeps ending at once is not retried in a tight loop.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }
}

/// Operator tokens, under `operator_tokens/<sha256 hex>`: plain puts and deletes (they change
/// nothing proxies are sent).
impl EtcdStore {
    /// See [`super::Store::add_operator_token`].
    pub async fn add_operator_token(
        &self,
        token_hash: &str,
        rec: &OperatorTokenRecord,
    ) -> Result<(), StoreError> {
        let (key, value) = (
            self.key(&format!("operator_tokens/{token_hash}")),
            to_json(rec)?,
        );
        // The same put twice stores the same: sent again on any quick failure.
        self.call(false, || {
            let mut kv = self.client.kv_client();
            let (key, value) = (key.clone(), value.clone());
            async move { kv.put(key, value, None).await }
        })
        .await?;
        Ok(())
    }

    /// See [`super::Store::operator_token`].
    pub async fn operator_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<OperatorTokenRecord>, StoreError> {
        match self
            .get(&self.key(&format!("operator_tokens/{token_hash}")))
            .await?
        {
            Some(kv) => Ok(Some(from_json(&kv)?)),
            None => Ok(None),
        }
    }

    /// See [`super::Store::operator_tokens`].
    pub async fn operator_tokens(&self) -> Result<Vec<(String, OperatorTokenRecord)>, StoreError> {
        let dir = self.key("operator_tokens/");
        self.list("operator_tokens/")
            .await?
            .iter()
            .map(|kv| {
                let hash = String::from_utf8_lossy(kv.key())
                    .strip_prefix(dir.as_str())
                    .unwrap_or_default()
                    .to_string();
                Ok((hash, from_json::<OperatorTokenRecord>(kv)?))
            })
            .collect()
    }

    /// See [`super::Store::remove_operator_token`].
    pub async fn remove_operator_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        let key = self.key(&format!("operator_tokens/{token_hash}"));
        let r = self
            .call(true, || {
                let mut kv = self.client.kv_client();
                let key = key.clone();
                async move { kv.delete(key, None).await }
            })
            .await?;
        Ok(r.deleted() > 0)
    }
}
