//! `ringctl daemon`: the control daemon's HTTP/JSON API on a Unix socket. The CLI is authorized by
//! the socket's file permissions (0660: root and the socket's group). With `--listen ADDR` the
//! same API is also served over TCP with TLS, to operators holding an operator token ([`tcp`]).
//!
//! - `POST /v1/apply` (body: YAML documents): checked whole, stored in one transaction.
//! - `GET /v1/config`: every stored document. `DELETE /v1/config/<Kind>/<name>`.
//! - `GET /v1/intentions/check?source=S&destination=D`: allow or deny, and the deciding rule.
//! - `GET /v1/index`: the configuration index. `GET /v1/store`: the store and whether it answers.
//! - `POST /v1/endpoints`, `DELETE /v1/endpoints/<service>/<address>`: endpoints by hand.
//! - `POST /v1/operator/tokens`, `GET /v1/operator/tokens`, `DELETE /v1/operator/tokens/<name>`:
//!   the credentials of the TCP operator port.
//! - `POST /v1/tokens`, `GET /v1/tokens`, `DELETE /v1/tokens/<id>`: proxy tokens (stored hashed,
//!   with an optional expiry).
//!
//! On the proxy socket every request carries a proxy token, and what it writes speaks for the
//! token's service only (see [`take_report`], [`sign`]): refused with 403 otherwise.
//!
//! The state is in a [`Store`]: the embedded one in `--data-dir` (the default), or etcd
//! (`--store etcd://...`), shared with the other daemons pointed at it; the daemon then follows
//! the configuration index in etcd, so its proxies' streams carry changes made through any
//! daemon. Proxies are served from a [`Snapshot`] of the store read after every change (so they
//! keep the last good state while etcd cannot be reached; writes are then refused with
//! `store_unreachable`). With redb the CA is on files under `--data-dir`; with etcd it is the
//! mesh's, in the store, its keys sealed with `--ca-secret`.
//!
//! Endpoints registered by proxies' reports live with them: with etcd they are attached to this
//! daemon's lease (gone within `--lease-ttl` when the daemon dies); with either store, those of a
//! proxy that stops reporting to this daemon for `--lease-ttl` are removed.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use ringside_core::control::api::{
    ApplyResponse, CaStatus, CatalogService, CertRotateResponse, DeleteResponse,
    DeregisterResponse, EndpointRecord, ErrorBody, IndexResponse, IntentionCheck, IntentionList,
    IntentionRow, OperatorTokenRecord, OperatorTokenRequest, OperatorTokenResponse,
    OperatorTokenRevoked, ProxyConfig, ProxyReport, ProxyStatus, RegisterService, ReportAck,
    RotationPhase, SignResponse, StoreStatus, TokenInfo, TokenRequest, TokenResponse,
};
use ringside_core::control::AnswerError;
use ringside_core::Reason;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::ca::{Authority, SealKey, SharedCa};
pub use crate::client::Target;
use crate::consul;
use crate::store::{EtcdOptions, ProxyRecord, Snapshot, Store, StoreError, TokenNews};

mod limited;
mod stream;
mod tcp;
pub use tcp::{hostname, PROXY_TOKEN_HEADER};

/// Default API socket (operators; authorized by its file permissions).
pub const DEFAULT_SOCKET: &str = "/run/ringside/ctl.sock";
/// Default proxy socket (proxies; every request carries a proxy token).
pub const DEFAULT_PROXY_SOCKET: &str = "/run/ringside/proxy.sock";
/// The longest a proxy's config watch is held open.
const MAX_WAIT: Duration = Duration::from_secs(60);
/// A proxy that has not reported for this long is not counted as live (they report at least
/// every 10 s).
pub const LIVE_FOR_SECS: i64 = 30;
/// Besides following the index, the snapshot is read again this often (a safety net: e.g. leases
/// that expired while no daemon watched).
const REFRESH_EVERY: Duration = Duration::from_secs(30);

/// A proxy that reports to this daemon.
#[derive(Debug)]
struct LocalProxy {
    service: String,
    address: Option<IpAddr>,
    last: Instant,
    /// Its endpoint's metadata, as last written.
    meta: std::collections::BTreeMap<String, String>,
    /// The etcd lease its endpoint was last written on (0: none, or not written by this run).
    lease: i64,
}

/// What the daemon serves from.
#[derive(Debug)]
pub struct State {
    /// The store.
    pub store: Store,
    /// The certificate authority and its roots.
    pub ca: RwLock<Authority>,
    /// The revision of the shared CA loaded into `ca` (etcd; 0 with files).
    ca_revision: AtomicI64,
    /// The key that opens the shared CA's root keys (etcd only).
    seal: Option<SealKey>,
    trust_domain: String,
    /// Virtual IP range (network, prefix length).
    pub vip_range: (std::net::Ipv4Addr, u8),
    /// Lifetime of issued leaf certificates.
    pub leaf_lifetime: Duration,
    /// The index of the snapshot proxies are served, for proxies watching it.
    pub changed: tokio::sync::watch::Sender<u64>,
    /// The newest index known to be in the store (followed in etcd, or written here).
    followed: tokio::sync::watch::Sender<u64>,
    /// What proxies are served: the last good read of the store.
    snapshot: RwLock<Arc<Snapshot>>,
    /// One snapshot read at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// The configuration answer of each service, made once per snapshot and trust bundle and
    /// sent to all of its proxies, and the catalog they share (see [`config_body`]).
    answers: Mutex<Answers>,
    /// Proxy tokens (by hash) seen valid, to authenticate proxies while the store cannot be
    /// reached: a revoke through this daemon evicts one, a token the store no longer has (or
    /// that expired) is evicted when seen, and an expired one is never taken from here.
    tokens: Mutex<HashMap<String, TokenInfo>>,
    /// The proxies reporting to this daemon, by id.
    local: Mutex<HashMap<String, LocalProxy>>,
    /// Token hashes with proxy streams open on this daemon, and how many.
    streaming: Mutex<HashMap<String, usize>>,
    /// Token hashes revoked while this daemon ran: their streams close.
    revoked: Mutex<HashSet<String>>,
    /// Moved at every revocation, to wake the streams.
    revocations: tokio::sync::watch::Sender<u64>,
    /// Proxy-socket connections served at once (see [`PROXY_TURNS`]).
    proxy_turns: Arc<tokio::sync::Semaphore>,
    /// Reports taken while the store could not be reached, written with the proxy's next one.
    pending: Mutex<HashMap<String, ProxyRecord>>,
    /// Acknowledgements and heartbeats taken and not yet written (etcd): written together
    /// every [`BEHIND_EVERY`] by [`write_behind`].
    behind: Mutex<HashMap<String, ProxyRecord>>,
    lease_ttl: Duration,
    /// This daemon's node (`--node`), recorded with its proxies' reports.
    node: String,
    /// Operator tokens (hash -> name) seen valid, to authenticate operators on the TCP port
    /// while the store cannot be reached.
    operator_tokens: Mutex<HashMap<String, String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl State {
    /// The snapshot proxies are served.
    fn snap(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The index of the snapshot proxies are served.
    fn served(&self) -> u64 {
        *self.changed.borrow()
    }

    /// Read the snapshot again (and the shared CA, when it moved); then tell watching proxies
    /// if the index moved. A read older than the one served is dropped: the index never goes
    /// back.
    async fn refresh(&self) -> Result<(), StoreError> {
        let _one = self.refreshing.lock().await;
        let snap = self.store.snapshot().await?;
        if snap.index < self.snap().index {
            return Ok(());
        }
        if let (Some((shared, rev)), Some(seal)) = (&snap.ca, &self.seal) {
            if *rev != self.ca_revision.load(Ordering::Relaxed) {
                let a = shared
                    .authority(seal, &self.trust_domain)
                    .map_err(|e| StoreError::new(format!("the mesh's CA in the store: {e}")))?;
                eprintln!(
                    "ringctl daemon: the mesh CA moved: phase {}, signer {}",
                    a.phase().as_str(),
                    a.state().signer
                );
                *self.ca.write().unwrap_or_else(|p| p.into_inner()) = a;
                self.ca_revision.store(*rev, Ordering::Relaxed);
            }
        }
        let index = snap.index;
        *self.snapshot.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(snap);
        crate::store::advance_index(&self.followed, index);
        crate::store::advance_index(&self.changed, index);
        Ok(())
    }

    /// A proxy token was revoked: forgotten here, and its streams closed.
    fn token_revoked(&self, hash: &str) {
        lock(&self.tokens).remove(hash);
        lock(&self.revoked).insert(hash.to_string());
        self.revocations.send_modify(|n| *n += 1);
    }

    /// After a write: serve what it changed (a failed read is logged; the follower retries).
    async fn notify(&self) {
        if let Err(e) = self.refresh().await {
            eprintln!("ringctl daemon: cannot read the store after a change: {e}");
        }
    }

    /// The refusal for a store that cannot be reached: 503, `store_unreachable`, what it means.
    fn unreachable(&self, reason: &str, what: &str) -> Response<Full<Bytes>> {
        let since = self
            .store
            .unreachable()
            .map(|d| format!(" for {}s", d.since.elapsed().as_secs()))
            .unwrap_or_default();
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "{}: {reason}{since}: {what}; this daemon keeps serving its proxies the last good state (config index {}) and catches up when the store is back",
                Reason::StoreUnreachable.as_str(),
                self.served()
            ),
        )
    }

    /// A store failure as an answer: `store_unreachable` (503) when the store could not be
    /// reached, else `status` with the error.
    fn store_error(&self, status: StatusCode, e: StoreError) -> Response<Full<Bytes>> {
        if e.unreachable && e.in_doubt {
            self.unreachable(
                &e.message,
                "etcd received the write but did not answer, so it may or may not have been carried out: check (`ringctl get`) before trying again",
            )
        } else if e.unreachable {
            self.unreachable(&e.message, "the request was not carried out")
        } else {
            error(status, e)
        }
    }

    /// A write refused at once while the store is known to be unreachable.
    fn refuse_writes(&self) -> Option<Response<Full<Bytes>>> {
        self.store
            .unreachable()
            .map(|d| self.unreachable(&d.reason, "writes are refused, nothing was written"))
    }

    /// The CA as `GET /v1/ca` shows it.
    fn ca_status(&self, with_bundle: bool) -> CaStatus {
        let snap = self.snap();
        let ca = self.ca.read().unwrap_or_else(|p| p.into_inner());
        CaStatus {
            phase: ca.phase(),
            roots: ca.state().clone(),
            bundle: with_bundle.then(|| ca.bundle()),
            generation: snap.counter("certgen"),
            index: snap.index,
        }
    }

    /// One CA rollover step, if the rollover is still at `from` (when given: two operators
    /// rotating at once through different daemons take each step once).
    async fn ca_step(&self, from: Option<RotationPhase>) -> Result<(), Response<Full<Bytes>>> {
        let internal = |e: String| error(StatusCode::INTERNAL_SERVER_ERROR, e);
        let Some(seal) = &self.seal else {
            // On files (one daemon).
            let step = {
                let mut ca = self.ca.write().unwrap_or_else(|p| p.into_inner());
                if from.is_some_and(|f| f != ca.phase()) {
                    return Ok(());
                }
                ca.advance().map_err(|e| internal(e.to_string()))?
            };
            let bumped = match step {
                RotationPhase::NewSigning => self.store.bump_meta("certgen").await.map(|_| ()),
                _ => self.store.bump_index().await.map(|_| ()),
            };
            bumped.map_err(|e| self.store_error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            self.notify().await;
            return Ok(());
        };
        // Shared (etcd): compare-and-swap on the CA's revision, the certificate generation
        // moved in the same transaction when the new root starts signing.
        for _ in 0..crate::store::etcd::MAX_ATTEMPTS {
            let (shared, rev) = self
                .store
                .ca_record()
                .await
                .map_err(|e| self.store_error(StatusCode::INTERNAL_SERVER_ERROR, e))?
                .ok_or_else(|| internal("the mesh has no CA in the store".into()))?;
            if from.is_some_and(|f| f != shared.phase()) {
                break;
            }
            let next = shared.next(seal).map_err(|e| internal(e.to_string()))?;
            let bump = next.phase() == RotationPhase::NewSigning;
            let stepped = self
                .store
                .ca_step(rev, &next, bump)
                .await
                .map_err(|e| self.store_error(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            if stepped || from.is_some() {
                break;
            }
        }
        self.refresh()
            .await
            .map_err(|e| self.store_error(StatusCode::INTERNAL_SERVER_ERROR, e))
    }
}

/// Which store the daemon keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChoice {
    /// The embedded store in the data directory (one daemon).
    Redb,
    /// etcd, shared by every daemon pointed at it.
    Etcd(EtcdOptions),
}

/// Daemon settings.
#[derive(Debug, Clone)]
pub struct Options {
    /// Directory of the CA (redb), and of the store when it is the embedded one.
    pub data_dir: PathBuf,
    /// Where the state is kept.
    pub store: StoreChoice,
    /// The secret that seals the mesh CA's keys in etcd (required with etcd).
    pub ca_secret: Option<PathBuf>,
    /// How long endpoints outlive what registered them: the daemon's etcd lease TTL, and how
    /// long a proxy may stay silent before its endpoint is removed (proxies report at least
    /// every 10 s; `--lease-ttl`, 15 s by default).
    pub lease_ttl: Duration,
    /// Operator API socket.
    pub socket: PathBuf,
    /// Proxy API socket.
    pub proxy_socket: PathBuf,
    /// Trust domain.
    pub trust_domain: String,
    /// Virtual IP range.
    pub vip_range: (std::net::Ipv4Addr, u8),
    /// Leaf lifetime.
    pub leaf_lifetime: Duration,
    /// This daemon's node name (`--node`, the host name by default).
    pub node: String,
    /// The TCP operator port (TLS, operator tokens), when serving one.
    pub listen: Option<std::net::SocketAddr>,
    /// Extra names (DNS or IP) for the operator port's certificate.
    pub tls_names: Vec<String>,
}

/// The CA at start: on files with redb; with etcd the mesh's, created by the first daemon (from
/// `DATA/ca` when there is one there, else a new root) in one create-if-absent transaction, and
/// loaded by the others.
async fn open_ca(o: &Options, store: &Store) -> anyhow::Result<(Authority, i64, Option<SealKey>)> {
    let dir = o.data_dir.join("ca");
    let StoreChoice::Etcd(_) = &o.store else {
        if o.ca_secret.is_some() {
            anyhow::bail!("--ca-secret is for --store etcd://... (the embedded store keeps its CA in --data-dir)");
        }
        return Ok((Authority::open(&dir, &o.trust_domain)?, 0, None));
    };
    let secret = o.ca_secret.as_ref().ok_or_else(|| {
        anyhow::anyhow!(
            "--store etcd://... needs --ca-secret FILE: the secret (shared by every daemon of the mesh, out of band) that seals the mesh CA's keys in etcd; make one with `ringctl ca secret --out FILE`"
        )
    })?;
    let seal = SealKey::from_file(secret)?;
    let (shared, rev) = match store.ca_record().await? {
        Some(r) => {
            if dir.exists() {
                eprintln!(
                    "ringctl daemon: {} is not used: the mesh's CA is the one in etcd",
                    dir.display()
                );
            }
            r
        }
        None => {
            let new = SharedCa::create(&o.trust_domain, &seal, &dir)?;
            let (stored, rev) = store.ca_create(&new).await?;
            if stored == new {
                eprintln!(
                    "ringctl daemon: created the mesh CA in the store (root {})",
                    new.state.signer
                );
            }
            (stored, rev)
        }
    };
    let a = shared.authority(&seal, &o.trust_domain)?;
    Ok((a, rev, Some(seal)))
}

/// Run the daemon until SIGTERM/SIGINT.
pub fn run(o: &Options) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // The etcd client's connections are tasks of this runtime: it is made inside it.
        let store = match &o.store {
            StoreChoice::Redb => Store::open_redb(&o.data_dir)?,
            StoreChoice::Etcd(etcd) => Store::connect_etcd(etcd).await?,
        };
        let (ca, ca_revision, seal) = open_ca(o, &store).await?;
        let state = Arc::new(State {
            store,
            ca: RwLock::new(ca),
            ca_revision: AtomicI64::new(ca_revision),
            seal,
            trust_domain: o.trust_domain.clone(),
            vip_range: o.vip_range,
            leaf_lifetime: o.leaf_lifetime,
            changed: tokio::sync::watch::Sender::new(0),
            followed: tokio::sync::watch::Sender::new(0),
            snapshot: RwLock::default(),
            refreshing: tokio::sync::Mutex::new(()),
            answers: Mutex::default(),
            tokens: Mutex::default(),
            local: Mutex::default(),
            streaming: Mutex::default(),
            revoked: Mutex::default(),
            revocations: tokio::sync::watch::Sender::new(0),
            proxy_turns: Arc::new(tokio::sync::Semaphore::new(PROXY_TURNS)),
            pending: Mutex::default(),
            behind: Mutex::default(),
            lease_ttl: o.lease_ttl,
            node: o.node.clone(),
            operator_tokens: Mutex::default(),
        });
        state.refresh().await?;
        // Endpoints proxies registered before a restart: expired unless their proxy reports
        // within the TTL from now.
        for (service, address, proxy) in state.store.proxy_endpoints().await? {
            lock(&state.local).insert(
                proxy,
                LocalProxy {
                    service,
                    address: Some(address),
                    last: Instant::now(),
                    meta: Default::default(),
                    lease: 0,
                },
            );
        }
        let tasks = [
            {
                let state = state.clone();
                let (news, heard) = tokio::sync::mpsc::unbounded_channel();
                tokio::spawn(token_news(state.clone(), heard));
                tokio::spawn(async move { state.store.follow_index(&state.followed, &news).await })
            },
            tokio::spawn(refresher(state.clone())),
            tokio::spawn(state.store.keep_lease(state.lease_ttl)),
            tokio::spawn(reaper(state.clone())),
            tokio::spawn(write_behind(state.clone())),
        ];
        let tcp = match o.listen {
            Some(addr) => {
                let names = tcp::cert_names(addr, &o.node, &o.tls_names);
                Some(tcp::bind(state.clone(), addr, names).await?)
            }
            None => None,
        };
        let served = serve(state, o.socket.clone(), o.proxy_socket.clone(), tcp).await;
        for t in tasks {
            t.abort();
        }
        served
    })
}

/// Close the streams of tokens revoked through other daemons (what the store's watch saw; after
/// the watch resumed, the tokens in use are looked up again).
async fn token_news(state: Arc<State>, mut heard: tokio::sync::mpsc::UnboundedReceiver<TokenNews>) {
    while let Some(news) = heard.recv().await {
        match news {
            TokenNews::Removed(hash) => state.token_revoked(&hash),
            TokenNews::Resumed => {
                let held: Vec<String> = lock(&state.streaming).keys().cloned().collect();
                for hash in held {
                    if let Ok(None) = state.store.token(&hash).await {
                        state.token_revoked(&hash);
                    }
                }
            }
        }
    }
}

/// Serve what the store holds: read the snapshot again whenever the followed index passes the
/// served one (retried while the store cannot be reached), and every [`REFRESH_EVERY`].
async fn refresher(state: Arc<State>) {
    let mut rx = state.followed.subscribe();
    loop {
        let target = *rx.borrow_and_update();
        if target > state.served() {
            match state.refresh().await {
                Ok(()) if state.served() >= target => {}
                Ok(()) => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                Err(e) => {
                    if !e.unreachable {
                        eprintln!("ringctl daemon: cannot read the store: {e}");
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(REFRESH_EVERY) => {
                let _ = state.refresh().await;
            }
        }
    }
}

/// Write the reports taken while the store could not be reached, once it can.
async fn flush_pending(state: &State) {
    if state.store.unreachable().is_some() {
        return;
    }
    let pending: Vec<ProxyRecord> = lock(&state.pending).drain().map(|(_, r)| r).collect();
    let mut changed = false;
    for rec in pending {
        match state.store.report_proxy(&rec, &rec.report.id).await {
            Ok(c) => changed |= c,
            Err(e) if e.forbidden => {
                eprintln!(
                    "ringctl daemon: a report kept while the store was unreachable is dropped: {}",
                    e.message
                );
            }
            Err(_) => {
                // Kept, merged under any report taken meanwhile.
                let mut p = lock(&state.pending);
                let newer = p.remove(&rec.report.id);
                let id = rec.report.id.clone();
                let kept = match newer {
                    Some(n) => crate::store::merge_report(Some(rec), &n),
                    None => rec,
                };
                p.insert(id, kept);
            }
        }
    }
    if changed {
        state.notify().await;
    }
}

/// Remove the endpoints of proxies that stopped reporting to this daemon for the lease TTL, and
/// write the reports kept while the store could not be reached.
/// The heartbeat: how long a proxy's stream (or long-poll) goes without a frame before it is
/// pinged (answered): half the lease TTL (a proxy reports after each, so one that is alive is
/// never silent for the TTL, however short it is set), at least a second.
fn heartbeat(lease_ttl: Duration) -> Duration {
    (lease_ttl / 2).max(Duration::from_secs(1))
}

/// Proxy-socket connections served at once; more wait, accepted, for a turn. A turn lasts one
/// request (or until a stream is open, or a long-poll starts waiting).
const PROXY_TURNS: usize = 128;
/// The longest a proxy-socket connection waits for a turn before it is served without one.
const TURN_WAIT: Duration = Duration::from_secs(1);

/// How often acknowledgements and heartbeats taken are written to a shared store.
const BEHIND_EVERY: Duration = Duration::from_millis(100);
/// Reports written in one etcd transaction (etcd takes 128 operations per transaction).
const BEHIND_BATCH: usize = 100;

/// Write the reports [`take_report`] took without writing (a proxy's acknowledgement of a
/// version, its heartbeat): every [`BEHIND_EVERY`], a hundred per transaction. A thousand
/// proxies acknowledging a change cost ten etcd transactions, not two thousand round trips
/// on their way. What cannot be written now is kept with the reports taken while the store is
/// unreachable, and written with the proxy's next report.
async fn write_behind(state: Arc<State>) {
    loop {
        tokio::time::sleep(BEHIND_EVERY).await;
        let mut recs: Vec<ProxyRecord> = lock(&state.behind).drain().map(|(_, r)| r).collect();
        if recs.is_empty() {
            continue;
        }
        recs.sort_by(|a, b| a.report.id.cmp(&b.report.id));
        for batch in recs.chunks(BEHIND_BATCH) {
            if let Err(e) = state.store.record_reports(batch).await {
                if !e.unreachable {
                    eprintln!("ringctl daemon: cannot record proxies' reports: {e}");
                }
                let mut p = lock(&state.pending);
                for r in batch {
                    let id = r.report.id.clone();
                    let kept = match p.remove(&id) {
                        Some(newer) => crate::store::merge_report(Some(r.clone()), &newer),
                        None => r.clone(),
                    };
                    p.insert(id, kept);
                }
            }
        }
    }
}

async fn reaper(state: Arc<State>) {
    let ttl = state.lease_ttl;
    let every = (ttl / 5).clamp(Duration::from_millis(200), Duration::from_secs(1));
    loop {
        tokio::time::sleep(every).await;
        flush_pending(&state).await;
        let silent: Vec<(String, String, Option<IpAddr>)> = lock(&state.local)
            .iter()
            .filter(|(_, p)| p.last.elapsed() > ttl)
            .map(|(id, p)| (id.clone(), p.service.clone(), p.address))
            .collect();
        let mut changed = false;
        for (id, service, address) in silent {
            let done = match address {
                None => true,
                Some(a) => match state.store.expire_endpoint(&service, a, &id).await {
                    Ok(expired) => {
                        if expired {
                            eprintln!(
                                "ringctl daemon: proxy {id} silent for {}s: its endpoint {a} of {service} removed",
                                ttl.as_secs()
                            );
                        }
                        changed |= expired;
                        true
                    }
                    Err(_) => false,
                },
            };
            let mut local = lock(&state.local);
            if done {
                match local.get_mut(&id) {
                    Some(p) if p.last.elapsed() > ttl => {
                        local.remove(&id);
                    }
                    // It reported meanwhile: its next report puts its endpoint back (a report
                    // is written behind only while its endpoint is known to be in place).
                    Some(p) => p.lease = 0,
                    None => {}
                }
            }
        }
        if changed {
            state.notify().await;
        }
    }
}

/// Listen on `socket` with file mode `mode` from the moment the path exists: the socket is bound
/// in a private directory (0700) beside it, given its mode there, then hard-linked into place
/// (which, unlike a rename, never replaces a path another daemon just bound) — no window in which
/// a wider mode (from the umask) lets anyone connect.
fn bind(socket: &Path, mode: u32) -> anyhow::Result<tokio::net::UnixListener> {
    let dir = match socket.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&dir)?;
    let in_use = || {
        anyhow::anyhow!(
            "cannot listen on {}: another ringctl daemon is listening there",
            socket.display()
        )
    };
    // A socket file left by a killed daemon is stale: nothing accepts on it.
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            return Err(in_use());
        }
        std::fs::remove_file(socket)?;
    }
    let name = socket
        .file_name()
        .ok_or_else(|| anyhow::anyhow!("{}: not a socket path", socket.display()))?;
    let private = dir.join(format!(
        ".{}.{}.bind",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|e| anyhow::anyhow!("{}: {e}", private.display()))?;
    let staged = private.join(name);
    let bound = (|| {
        let listener = tokio::net::UnixListener::bind(&staged)
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", staged.display()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode))?;
        std::fs::hard_link(&staged, socket).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                in_use()
            } else {
                anyhow::anyhow!("cannot listen on {}: {e}", socket.display())
            }
        })?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// A connection accepted by the daemon.
enum Accepted {
    /// On the operator socket (`false`) or the proxy socket (`true`).
    Unix(tokio::net::UnixStream, bool),
    /// On the TCP operator port.
    Tcp(tokio::net::TcpStream, std::net::SocketAddr),
}

async fn serve(
    state: Arc<State>,
    socket: PathBuf,
    proxy_socket: PathBuf,
    tcp: Option<(tokio::net::TcpListener, tokio_rustls::TlsAcceptor)>,
) -> anyhow::Result<()> {
    let admin = bind(&socket, 0o660)?;
    // Any local process may connect; every request must carry a proxy token.
    let proxies = bind(&proxy_socket, 0o666)?;
    let port = match &tcp {
        Some((l, _)) => format!(
            ", {} (operators, TLS with an operator token)",
            l.local_addr()?
        ),
        None => String::new(),
    };
    eprintln!(
        "ringctl daemon: node {}, listening on {} (operators), {} (proxies){port}, store {}, config index {}",
        state.node,
        socket.display(),
        proxy_socket.display(),
        state.store.describe(),
        state.served()
    );
    let tcp_accept = || async {
        match &tcp {
            Some((l, _)) => l.accept().await,
            None => std::future::pending().await,
        }
    };
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let mut last_accept_warning: Option<Instant> = None;
    loop {
        let accepted = tokio::select! {
            r = admin.accept() => r.map(|(s, _)| Accepted::Unix(s, false)),
            r = proxies.accept() => r.map(|(s, _)| Accepted::Unix(s, true)),
            r = tcp_accept() => r.map(|(s, peer)| Accepted::Tcp(s, peer)),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let (stream, for_proxies) = match accepted {
            Ok(Accepted::Unix(s, p)) => (s, p),
            Ok(Accepted::Tcp(s, peer)) => {
                if let Some((_, acceptor)) = &tcp {
                    tokio::spawn(tcp::serve_connection(
                        s,
                        peer,
                        acceptor.clone(),
                        state.clone(),
                    ));
                }
                continue;
            }
            Err(e) => {
                // Out of descriptors (or a transient error): the connection waits in the
                // backlog; back off instead of exiting or spinning.
                if last_accept_warning.is_none_or(|t: Instant| t.elapsed() > Duration::from_secs(5))
                {
                    eprintln!("ringctl daemon: accept failed: {e}; backing off");
                    last_accept_warning = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            // A proxy connection is served (and given hyper's buffers) once it has a turn: a
            // thousand proxies starting at once wait as accepted sockets, not as a thousand
            // HTTP connections with their buffers (memory the allocator then keeps). The wait
            // is bounded: connections that hold turns without a request (anyone may connect)
            // delay the others by at most a second, never keep them out.
            let turn = if for_proxies {
                let wait = state.proxy_turns.clone().acquire_owned();
                tokio::time::timeout(TURN_WAIT, wait)
                    .await
                    .ok()
                    .and_then(Result::ok)
            } else {
                None
            };
            let turn = Arc::new(Mutex::new(turn));
            let io = hyper_util::rt::TokioIo::new(limited::SmallReads(stream));
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                let turn = turn.clone();
                async move {
                    if for_proxies {
                        handle_proxy(req, state, &turn).await
                    } else {
                        handle(req, state).await
                    }
                }
            });
            // A client that opens a connection and sends nothing (or half a head) is closed.
            // Proxies make one request per connection (or open their stream on it): the
            // connection is closed as soon as the answer is out, instead of holding hyper's
            // buffers until the proxy's close is read (after a thousand proxies started at
            // once, that was three idle connections per proxy at the peak).
            let _ = hyper::server::conn::http1::Builder::new()
                .keep_alive(!for_proxies)
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .max_buf_size(64 * 1024)
                .serve_connection(io, svc)
                .with_upgrades()
                .await;
        });
    }
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&proxy_socket);
    Ok(())
}

fn query_param(query: &str, k: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(a, _)| *a == k)
        .map(|(_, v)| v.to_string())
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// The certificate generation a service's leaves must have: bumped for every service by a CA
/// rollover or `cert rotate`, for one by `cert rotate --service`.
fn cert_generation(snap: &Snapshot, service: &str) -> u64 {
    snap.counter("certgen") + snap.counter(&format!("certgen/{service}"))
}

/// Everything a proxy of `service` needs: the catalog, the intentions, the trust bundle and the
/// certificate generation, from the snapshot served.
pub fn proxy_config(state: &State, service: &str) -> ProxyConfig {
    let snap = state.snap();
    let docs = &snap.docs;
    let intentions = ringside_core::intentions::Intentions {
        rules: consul::intentions(docs),
        default: ringside_core::intentions::Action::Deny,
    };
    let catalog: Vec<CatalogService> = snap
        .services
        .iter()
        .map(|s| {
            let healthy: Vec<&EndpointRecord> = snap
                .endpoints
                .iter()
                .filter(|e| e.service == s.name && e.healthy)
                .collect();
            CatalogService {
                name: s.name.clone(),
                virtual_ip: s.virtual_ip.into(),
                ports: s.ports.clone(),
                endpoints: healthy.iter().map(|e| e.address).collect(),
                protocol: consul::protocol_of(docs, &s.name).map(|p| p.as_str().to_string()),
                endpoint_meta: healthy.iter().map(|e| e.meta.clone()).collect(),
            }
        })
        .collect();
    let (bundle, trust_domain) = {
        let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
        (ca.bundle(), ca.signer().trust_domain.clone())
    };
    ProxyConfig {
        index: snap.index,
        service: service.to_string(),
        trust_domain,
        services: catalog,
        catalog_digest: String::new(),
        catalog_omitted: false,
        intentions,
        l7: consul::l7_config(docs),
        inbound: consul::inbound_settings(docs, service),
        upstreams: consul::upstream_settings(docs, service),
        bundle,
        cert_generation: cert_generation(&snap, service),
    }
}

/// The configuration answers of the snapshot served: the catalog once, serialized, and each
/// service's own part. The catalog (every service and endpoint of the mesh) is most of an answer
/// and the same for every service; kept once per service it cost a daemon 50 services x 91 KB
/// at 5,000 proxies, and most of the memory of a daemon with a few dozen proxies.
#[derive(Debug, Default)]
struct Answers {
    catalog: Option<CachedCatalog>,
    services: HashMap<String, CachedAnswer>,
}

/// The catalog of a snapshot, serialized, and its digest.
#[derive(Debug)]
struct CachedCatalog {
    snapshot: Arc<Snapshot>,
    json: Bytes,
    digest: String,
}

/// A service's part of the answer: the configuration without the catalog, serialized without
/// its closing brace (see [`ConfigAnswer`]), and what it was made from.
#[derive(Debug)]
struct CachedAnswer {
    snapshot: Arc<Snapshot>,
    bundle: String,
    head: Bytes,
}

/// A configuration answer in parts, sent one after the other without being joined: the
/// service's part, open (`{"index":..., "bundle":...` with no closing brace), then the catalog
/// and the brace, or, when the proxy has the catalog, an empty one marked omitted. A JSON
/// object's members may come in any order, so the whole is the same `ProxyConfig` as one
/// serialized at once.
pub(crate) struct ConfigAnswer {
    head: Bytes,
    catalog: Option<Bytes>,
}

impl ConfigAnswer {
    /// The answer's bytes, in order.
    pub(crate) fn into_buf(self) -> impl hyper::body::Buf {
        use hyper::body::Buf;
        let (middle, catalog): (&'static [u8], Bytes) = match self.catalog {
            Some(c) => (b",\"services\":", c),
            None => (b",\"services\":[],\"catalog_omitted\":true", Bytes::new()),
        };
        self.head
            .chain(Bytes::from_static(middle))
            .chain(catalog)
            .chain(Bytes::from_static(b"}"))
    }

    /// The answer joined, for an HTTP body.
    fn into_bytes(self) -> Bytes {
        use hyper::body::Buf;
        let mut b = self.into_buf();
        b.copy_to_bytes(b.remaining())
    }
}

/// The answer to `GET /v1/proxy/config` for a proxy of `service` that has the catalog of digest
/// `have`: see [`config_body`].
fn config_answer(state: &State, service: &str, have: &str) -> Response<Full<Bytes>> {
    let body = match config_body(state, service, have) {
        Ok((answer, _)) => answer.into_bytes(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let mut r = Response::new(Full::new(body));
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The configuration answer for a proxy of `service` that has the catalog of digest `have`, and
/// the digest of the catalog it has once it applied it: [`proxy_config`] serialized once per
/// snapshot and trust bundle, then shared by every proxy of the service (when a change wakes a
/// thousand streams, the daemon builds the configuration once per service, not once per
/// proxy), and the catalog once for all; without the catalog when the proxy has it (an
/// intention changed: a proxy is sent a few hundred bytes, not a catalog of every endpoint of
/// the mesh).
fn config_body(state: &State, service: &str, have: &str) -> Result<(ConfigAnswer, String), String> {
    let snap = state.snap();
    let bundle = state.ca.read().unwrap_or_else(|p| p.into_inner()).bundle();
    let pick = |head: Bytes, catalog: &CachedCatalog| {
        let c = (have.is_empty() || catalog.digest != have).then(|| catalog.json.clone());
        (ConfigAnswer { head, catalog: c }, catalog.digest.clone())
    };
    {
        let answers = lock(&state.answers);
        if let (Some(c), Some(a)) = (&answers.catalog, answers.services.get(service)) {
            if Arc::ptr_eq(&c.snapshot, &snap)
                && Arc::ptr_eq(&a.snapshot, &snap)
                && a.bundle == bundle
            {
                return Ok(pick(a.head.clone(), c));
            }
        }
    }
    let config = proxy_config(state, service);
    let config_bundle = config.bundle.clone();
    let (json, digest, head) =
        split_answer(config).map_err(|e| format!("cannot write the answer: {e}"))?;
    let catalog = CachedCatalog {
        snapshot: snap.clone(),
        json,
        digest,
    };
    let answer = pick(head.clone(), &catalog);
    // Made from the snapshot read above, or a newer one (`proxy_config` reads it again): kept
    // under the one read first only if they are the same.
    if Arc::ptr_eq(&snap, &state.snap()) && config_bundle == bundle {
        let mut answers = lock(&state.answers);
        // Answers of older snapshots go (each would keep its snapshot alive).
        answers
            .services
            .retain(|_, c| Arc::ptr_eq(&c.snapshot, &snap));
        let fresh = answers
            .catalog
            .as_ref()
            .is_some_and(|c| Arc::ptr_eq(&c.snapshot, &snap));
        if !fresh {
            answers.catalog = Some(catalog);
        }
        answers.services.insert(
            service.to_string(),
            CachedAnswer {
                snapshot: snap,
                bundle,
                head,
            },
        );
    }
    Ok(answer)
}

/// A configuration serialized in the parts of a [`ConfigAnswer`]: its catalog, the catalog's
/// digest, and the rest (with that digest) without its closing brace.
fn split_answer(mut config: ProxyConfig) -> serde_json::Result<(Bytes, String, Bytes)> {
    let services = std::mem::take(&mut config.services);
    let catalog = serde_json::to_vec(&services)?;
    let digest = catalog_digest(&catalog);
    config.catalog_digest = digest.clone();
    config.catalog_omitted = false;
    let mut head = serde_json::to_vec(&config)?;
    // `{...}` without its brace: the catalog (or its omission) and the brace follow.
    head.pop();
    Ok((Bytes::from(catalog), digest, Bytes::from(head)))
}

/// The digest of a serialized catalog: the first 128 bits of its SHA-256, in hex.
fn catalog_digest(catalog: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, catalog).as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The service of the request's proxy token (`Authorization: Bearer`), or the error answer:
/// 401 without a token, 403 for a token the store does not have (never issued, or revoked) or
/// one that expired. While the store cannot be reached, tokens seen valid before are still
/// taken until they expire.
#[allow(clippy::result_large_err)] // the error is the answer itself, sent once
async fn token_service(
    req: &Request<Incoming>,
    state: &State,
) -> Result<String, Response<Full<Bytes>>> {
    token_info(req, state).await.map(|(_, t)| t.service)
}

/// The request's proxy token: its hash and what the store (or, while it cannot be reached, this
/// daemon's cache) knows of it; or the error answer, as [`token_service`].
#[allow(clippy::result_large_err)] // the error is the answer itself, sent once
async fn token_info(
    req: &Request<Incoming>,
    state: &State,
) -> Result<(String, TokenInfo), Response<Full<Bytes>>> {
    let Some(hash) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(token_hash)
    else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "a proxy token is required (Authorization: Bearer)",
        ));
    };
    let now = unix_now();
    let expired = |t: &TokenInfo| {
        error(
            StatusCode::FORBIDDEN,
            format!(
                "token {} of service '{}' expired at {}: make a new one (ringctl token create --service {})",
                t.id,
                t.service,
                show_time(t.expires.unwrap_or(0)),
                t.service
            ),
        )
    };
    type Checked = Result<(String, TokenInfo), Response<Full<Bytes>>>;
    let cached = || -> Option<Checked> {
        let mut cache = lock(&state.tokens);
        let t = cache.get(&hash)?.clone();
        if t.expired_at(now) {
            cache.remove(&hash);
            return Some(Err(expired(&t)));
        }
        Some(Ok((hash.clone(), t)))
    };
    if state.store.unreachable().is_some() {
        if let Some(r) = cached() {
            return r;
        }
    }
    match state.store.token(&hash).await {
        Err(e) if e.unreachable => {
            cached().unwrap_or_else(|| Err(state.store_error(StatusCode::INTERNAL_SERVER_ERROR, e)))
        }
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e)),
        Ok(None) => {
            lock(&state.tokens).remove(&hash);
            Err(error(
                StatusCode::FORBIDDEN,
                "unknown token (never issued, or revoked)",
            ))
        }
        Ok(Some(t)) if t.expired_at(now) => {
            lock(&state.tokens).remove(&hash);
            Err(expired(&t))
        }
        Ok(Some(t)) => {
            lock(&state.tokens).insert(hash.clone(), t.clone());
            Ok((hash, t))
        }
    }
}

/// A Unix time as RFC 3339 (UTC), for messages and listings.
pub fn show_time(unix: i64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_secs(unix.max(0) as u64);
    humantime::format_rfc3339_seconds(t).to_string()
}

/// `POST /v1/tokens`: a new random token for a service, valid for `ttl_s` when given. Only its
/// hash is stored; the token is in this answer alone.
async fn create_token(state: &State, r: TokenRequest) -> Response<Full<Bytes>> {
    if r.service.is_empty() || r.service.contains(['/', ' ']) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("service: '{}' is not a service name", r.service),
        );
    }
    if r.ttl_s == Some(0) {
        return error(StatusCode::BAD_REQUEST, "ttl_s: must be more than 0");
    }
    let mut raw = [0u8; 32];
    if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).is_err() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "no randomness");
    }
    let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let hash = token_hash(&token);
    let now = unix_now();
    let info = TokenInfo {
        id: crate::store::token_id(&hash),
        service: r.service,
        created: now,
        expires: r
            .ttl_s
            .map(|t| now.saturating_add(i64::try_from(t).unwrap_or(i64::MAX))),
    };
    match state.store.add_token(&hash, &info).await {
        Ok(()) => json(
            StatusCode::OK,
            &TokenResponse {
                service: info.service,
                token,
                id: info.id,
                expires: info.expires,
            },
        ),
        Err(e) => state.store_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// `DELETE /v1/tokens/<id>` (or a prefix of the id naming one token): forgotten by the store
/// and evicted from this daemon's cache, so the token's next request is refused.
async fn revoke_token(state: &State, id: &str) -> Response<Full<Bytes>> {
    if id.len() < 4 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("'{id}' is not a token id (at least 4 hex digits; see ringctl token list)"),
        );
    }
    let id = id.to_ascii_lowercase();
    let list = match state.store.tokens().await {
        Ok(l) => l,
        Err(e) => return state.store_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    };
    let matching: Vec<(String, TokenInfo)> = list
        .into_iter()
        .filter(|(_, t)| t.id.starts_with(&id))
        .collect();
    let (hash, info) = match matching.as_slice() {
        [one] => one.clone(),
        [] => return error(StatusCode::NOT_FOUND, format!("no token with id {id}")),
        many => {
            return error(
                StatusCode::CONFLICT,
                format!(
                    "'{id}' names {} tokens ({}): give more of the id",
                    many.len(),
                    many.iter()
                        .map(|(_, t)| t.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        }
    };
    // Evicted first: from here on this daemon asks the store, which no longer has it.
    lock(&state.tokens).remove(&hash);
    let removed = state.store.remove_token(&hash).await;
    // And after: a request that read the store before the removal may have cached it again.
    lock(&state.tokens).remove(&hash);
    match removed {
        Ok(_) => {
            state.token_revoked(&hash);
            json(StatusCode::OK, &info)
        }
        Err(e) => state.store_error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// The proxy API: config watch, certificate signing, reports. Every request carries a token.
async fn handle_proxy(
    mut req: Request<Incoming>,
    state: Arc<State>,
    turn: &Mutex<Option<tokio::sync::OwnedSemaphorePermit>>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    // The store's futures are boxed: a connection's task is as big as its biggest await (a
    // long-poll holds one, mostly waiting).
    let (hash, token) = match Box::pin(token_info(&req, &state)).await {
        Ok(t) => t,
        Err(r) => return Ok(r),
    };
    let service = token.service.clone();
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let resp = match (method, path.as_str()) {
        (Method::GET, ringside_core::control::stream::PATH) => {
            open_stream(&mut req, state, hash, token, &query)
        }
        (Method::GET, "/v1/proxy/config") => {
            let after: u64 = query_param(&query, "index")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let wait = query_param(&query, "wait")
                .and_then(|v| v.parse().ok())
                .map(Duration::from_secs)
                .unwrap_or_default()
                .min(MAX_WAIT)
                .min(heartbeat(state.lease_ttl));
            let have = query_param(&query, "catalog").unwrap_or_default();
            let mut rx = state.changed.subscribe();
            // A waiting long-poll gives its turn back: long-polls never keep proxies out.
            if !wait.is_zero() {
                lock(turn).take();
            }
            // Long-poll: answer once the index passes `after`, or at `wait` with what there is.
            let _ = tokio::time::timeout(wait, rx.wait_for(|i| *i > after)).await;
            config_answer(&state, &service, &have)
        }
        (Method::POST, "/v1/proxy/sign") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return Ok(r),
            };
            sign(&state, &service, &String::from_utf8_lossy(&body))
        }
        (Method::POST, "/v1/proxy/report") => match body_json::<ProxyReport>(req).await {
            Err(r) => r,
            Ok(report) => Box::pin(take_report(&state, service, report)).await,
        },
        (m, p) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {m} {p}")),
    };
    Ok(resp)
}

/// `GET /v1/proxy/stream`: switch the connection to a proxy stream ([`stream`]) for the token
/// checked. The request must ask for it (`Connection: upgrade`, `Upgrade: ringside-proxy/1`).
fn open_stream(
    req: &mut Request<Incoming>,
    state: Arc<State>,
    hash: String,
    token: TokenInfo,
    query: &str,
) -> Response<Full<Bytes>> {
    use ringside_core::control::stream::PROTOCOL;
    let asked = req
        .headers()
        .get(hyper::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case(PROTOCOL));
    if !asked {
        return error(
            StatusCode::BAD_REQUEST,
            format!("the proxy stream needs `Connection: upgrade` and `Upgrade: {PROTOCOL}`"),
        );
    }
    let index = match query_param(query, "index").map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(i)) => i,
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "index: not a configuration index (a number)",
            )
        }
    };
    let digest = query_param(query, "catalog")
        .filter(|d| d.len() <= 64 && d.bytes().all(|b| b.is_ascii_hexdigit()))
        .unwrap_or_default();
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        if let Ok(up) = upgrade.await {
            let open = stream::Open {
                hash,
                token,
                index,
                digest,
            };
            stream::serve(up, state, open).await;
        }
    });
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    r.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    r.headers_mut().insert(
        hyper::header::UPGRADE,
        hyper::header::HeaderValue::from_static(PROTOCOL),
    );
    r
}

/// Whether a report may be taken now and written later with others ([`write_behind`]): an
/// acknowledgement or heartbeat of a proxy this daemon already wrote, under the same service, at
/// the same address with the same metadata, on the lease the daemon holds now (when it has an
/// endpoint), with no failures to tell. A first report, a moved endpoint, a new lease or events
/// are written before the answer.
fn may_write_behind(
    known: Option<&LocalProxy>,
    service: &str,
    report: &ProxyReport,
    lease: Option<i64>,
) -> bool {
    report.events.is_empty()
        && known.is_some_and(|p| {
            p.service == service
                && p.address == report.address
                && p.meta == report.meta
                && (p.address.is_none() || lease.is_some_and(|l| l > 0 && l == p.lease))
        })
}

/// A proxy's report: recorded (its endpoint registered, on this daemon's lease with etcd), and
/// the proxy counted as this daemon's. While the store cannot be reached the report is kept and
/// written with the proxy's next one: a proxy does not notice the outage.
///
/// A report speaks for the token's service only: one naming another service, or under the id of
/// another service's live proxy (its record holds the certificate generation `ringctl ca rotate`
/// waits on, and its endpoint), is refused with 403.
async fn take_report(
    state: &State,
    service: String,
    mut report: ProxyReport,
) -> Response<Full<Bytes>> {
    if !report.service.is_empty() && report.service != service {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "the report is for service '{}' but the token is for service '{service}': a proxy reports for its token's service only",
                report.service
            ),
        );
    }
    report.service = service.clone();
    let id = report.id.clone();
    // Another service's proxy reporting to this daemon under the same id (the store checks the
    // same against its record; this also holds while the store cannot be reached).
    let held = lock(&state.local).get(&id).and_then(|p| {
        (p.service != service
            && p.last.elapsed() <= Duration::from_secs(crate::store::PROXY_ID_HELD_SECS as u64))
        .then(|| p.service.clone())
    });
    if let Some(owner) = held {
        return error(
            StatusCode::FORBIDDEN,
            format!(
                "proxy id '{id}' belongs to a proxy of service '{owner}'; a token of service '{service}' cannot report for it (give this proxy another --proxy-id)"
            ),
        );
    }
    let mut rec = ProxyRecord {
        report,
        last_seen: unix_now(),
        node: state.node.clone(),
    };
    let pending = lock(&state.pending).remove(&id);
    let had_pending = pending.is_some();
    if let Some(pending) = pending {
        rec = crate::store::merge_report(Some(pending), &rec);
    }
    // An acknowledgement or heartbeat of a proxy whose endpoint this daemon wrote, as it is, on
    // the lease it holds now, with no failures to tell: taken now, written with others by
    // [`write_behind`]. Anything else (a first report, a moved endpoint, a new lease, events)
    // is written before the answer.
    let lease = state.store.current_lease();
    let behind = !had_pending
        && state.store.unreachable().is_none()
        && may_write_behind(lock(&state.local).get(&id), &service, &rec.report, lease);
    if behind && state.store.is_shared() {
        if let Some(p) = lock(&state.local).get_mut(&id) {
            p.last = Instant::now();
        }
        lock(&state.behind).insert(id, rec);
        return json(StatusCode::OK, &ReportAck { ok: true });
    }
    // Written now: one taken before and not yet written is superseded by this one.
    if let Some(queued) = lock(&state.behind).remove(&id) {
        rec = crate::store::merge_report(Some(queued), &rec);
    }
    let local = LocalProxy {
        service,
        address: rec.report.address,
        last: Instant::now(),
        meta: rec.report.meta.clone(),
        lease: lease.unwrap_or(0),
    };
    if state.store.unreachable().is_none() {
        match state.store.report_proxy(&rec, &id).await {
            Ok(changed) => {
                lock(&state.local).insert(id, local);
                // A new endpoint: with etcd the index watch sees the write and the refresher
                // reads the store once for every report that came meanwhile (a thousand proxies
                // starting at once cost a few reads, not a thousand); redb is read here.
                if changed && !state.store.is_shared() {
                    state.notify().await;
                }
                return json(StatusCode::OK, &ReportAck { ok: true });
            }
            Err(e) if e.forbidden => return error(StatusCode::FORBIDDEN, e.message),
            Err(e) if e.unreachable || e.message.contains("lease not found") => {}
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e),
        }
    }
    lock(&state.local).insert(id.clone(), local);
    lock(&state.pending).insert(id, rec);
    json(StatusCode::OK, &ReportAck { ok: true })
}

fn sign(state: &State, service: &str, csr: &str) -> Response<Full<Bytes>> {
    let generation = cert_generation(&state.snap(), service);
    let ca = state.ca.read().unwrap_or_else(|p| p.into_inner());
    match ca
        .signer()
        .sign_csr(csr, "default", service, state.leaf_lifetime)
    {
        Ok(cert) => json(
            StatusCode::OK,
            &SignResponse {
                service: service.to_string(),
                cert,
                bundle: ca.bundle(),
                cert_generation: generation,
            },
        ),
        Err(e @ crate::ca::CaError::Identity(_)) => error(StatusCode::FORBIDDEN, e),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

/// An answer with a JSON body (one of [`ringside_core::control::api`]'s, or stored documents).
fn json<T: Serialize + ?Sized>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let text = match serde_json::to_string(body) {
        Ok(t) => t,
        Err(e) => {
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot write the answer: {e}"),
            )
        }
    };
    let mut r = Response::new(Full::new(Bytes::from(text)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// A refusal: `status` with an [`ErrorBody`].
fn error(status: StatusCode, message: impl std::fmt::Display) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorBody {
            error: message.to_string(),
        },
    )
}

/// Hex SHA-256 of a token: only hashes are stored.
pub fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The largest request body the daemon reads (documents for `apply`, CSRs, reports); larger ones
/// are answered 413 without being read whole.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// A request's body, at most [`MAX_BODY`] bytes.
async fn read_body(req: Request<Incoming>) -> Result<Bytes, Response<Full<Bytes>>> {
    match http_body_util::Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
    {
        Ok(b) => Ok(b.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {MAX_BODY} bytes"),
        )),
        Err(e) => Err(error(StatusCode::BAD_REQUEST, e)),
    }
}

async fn body_json<T: DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

/// Whether a request to the operator API writes to the store (refused at once while the store
/// cannot be reached).
fn writes(method: &Method, path: &str) -> bool {
    match *method {
        Method::POST => path != "/v1/sign",
        Method::DELETE => true,
        _ => false,
    }
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let store = &state.store;
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    if writes(&method, &path) {
        if let Some(refused) = state.refuse_writes() {
            return Ok(refused);
        }
    }
    let internal = StatusCode::INTERNAL_SERVER_ERROR;
    let resp = match (method, path.as_str()) {
        (Method::POST, "/v1/apply") => {
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return Ok(r),
            };
            let text = String::from_utf8_lossy(&body);
            match consul::parse_checked(&text) {
                Err(e) => error(StatusCode::BAD_REQUEST, format!("{e}; nothing applied")),
                Ok(consul::Parsed { docs, warnings }) => match store.apply(&docs).await {
                    Ok(index) => {
                        state.notify().await;
                        json(
                            StatusCode::OK,
                            &ApplyResponse {
                                applied: docs.iter().map(|d| d.id()).collect(),
                                index,
                                warnings: warnings.iter().map(|w| w.to_string()).collect(),
                            },
                        )
                    }
                    Err(e) => state.store_error(internal, e),
                },
            }
        }
        (Method::GET, "/v1/config") => match store.documents().await {
            // The stored documents are the operators' own (YAML made JSON): passed on untyped.
            Ok(d) => json(StatusCode::OK, &d),
            Err(e) => state.store_error(internal, e),
        },
        (Method::GET, "/v1/intentions") => match store.typed().await {
            Ok(docs) => {
                let set = ringside_core::intentions::Intentions {
                    rules: consul::intentions(&docs),
                    default: ringside_core::intentions::Action::Deny,
                };
                let list = IntentionList {
                    rules: set
                        .rules
                        .into_iter()
                        .map(|r| IntentionRow {
                            precedence: r.precedence(),
                            intention: r,
                        })
                        .collect(),
                    default: set.default,
                };
                json(StatusCode::OK, &list)
            }
            Err(e) => state.store_error(internal, e),
        },
        (Method::GET, "/v1/index") => match store.index().await {
            Ok(index) => json(StatusCode::OK, &IndexResponse { index }),
            Err(e) => state.store_error(internal, e),
        },
        (Method::GET, "/v1/store") => {
            let down = store.unreachable();
            json(
                StatusCode::OK,
                &StoreStatus {
                    store: store.describe(),
                    reachable: down.is_none(),
                    unreachable_for_s: down.as_ref().map_or(0, |d| d.since.elapsed().as_secs()),
                    reason: down.map(|d| d.reason),
                    served_index: state.served(),
                },
            )
        }
        (Method::DELETE, p) if p.starts_with("/v1/config/") => {
            let id = &p["/v1/config/".len()..];
            match store.delete(id).await {
                Ok(true) => {
                    state.notify().await;
                    json(
                        StatusCode::OK,
                        &DeleteResponse {
                            deleted: id.to_string(),
                        },
                    )
                }
                Ok(false) => error(StatusCode::NOT_FOUND, format!("{id} is not stored")),
                Err(e) => state.store_error(internal, e),
            }
        }
        (Method::GET, "/v1/intentions/check") => {
            match (
                query_param(&query, "source"),
                query_param(&query, "destination"),
            ) {
                (Some(src), Some(dst)) => match store.typed().await {
                    Ok(docs) => {
                        let set = ringside_core::intentions::Intentions {
                            rules: consul::intentions(&docs),
                            default: ringside_core::intentions::Action::Deny,
                        };
                        let d = set.evaluate(&src, &dst);
                        json(
                            StatusCode::OK,
                            &IntentionCheck {
                                allowed: d.allowed(),
                                decided_by: d.explain(),
                            },
                        )
                    }
                    Err(e) => state.store_error(internal, e),
                },
                _ => error(
                    StatusCode::BAD_REQUEST,
                    "source and destination are required",
                ),
            }
        }
        (Method::POST, "/v1/services") => match body_json::<RegisterService>(req).await {
            Err(r) => r,
            Ok(r) => match store
                .register_service(&r.name, r.ports, state.vip_range)
                .await
            {
                Ok(s) => {
                    state.notify().await;
                    json(StatusCode::OK, &s)
                }
                Err(e) => state.store_error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::GET, "/v1/services") => match store.services().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => state.store_error(internal, e),
        },
        (Method::POST, "/v1/endpoints") => match body_json::<EndpointRecord>(req).await {
            Err(r) => r,
            Ok(ep) => match store.register_endpoint(&ep).await {
                Ok(()) => {
                    state.notify().await;
                    json(StatusCode::OK, &ep)
                }
                Err(e) => state.store_error(StatusCode::BAD_REQUEST, e),
            },
        },
        (Method::DELETE, p) if p.starts_with("/v1/endpoints/") => {
            let rest = &p["/v1/endpoints/".len()..];
            let parsed = rest
                .rsplit_once('/')
                .and_then(|(s, a)| Some((s.to_string(), a.parse::<IpAddr>().ok()?)));
            match parsed {
                None => error(
                    StatusCode::BAD_REQUEST,
                    format!("'{rest}' is not SERVICE/ADDRESS"),
                ),
                Some((service, address)) => {
                    match store.deregister_endpoint(&service, address).await {
                        Ok(true) => {
                            state.notify().await;
                            json(StatusCode::OK, &DeregisterResponse { service, address })
                        }
                        Ok(false) => error(
                            StatusCode::NOT_FOUND,
                            format!("{service} has no endpoint {address}"),
                        ),
                        Err(e) => state.store_error(internal, e),
                    }
                }
            }
        }
        (Method::GET, "/v1/endpoints") => match store.endpoints().await {
            Ok(s) => json(StatusCode::OK, &s),
            Err(e) => state.store_error(internal, e),
        },
        (Method::POST, "/v1/tokens") => match body_json::<TokenRequest>(req).await {
            Err(r) => r,
            Ok(r) => create_token(&state, r).await,
        },
        (Method::GET, "/v1/tokens") => match store.tokens().await {
            Ok(list) => {
                let mut rows: Vec<TokenInfo> = list.into_iter().map(|(_, t)| t).collect();
                rows.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
                json(StatusCode::OK, &rows)
            }
            Err(e) => state.store_error(internal, e),
        },
        (Method::DELETE, p) if p.starts_with("/v1/tokens/") => {
            revoke_token(&state, &p["/v1/tokens/".len()..]).await
        }
        (Method::POST, "/v1/sign") => {
            let service = match token_service(&req, &state).await {
                Ok(s) => s,
                Err(r) => return Ok(r),
            };
            let body = match read_body(req).await {
                Ok(b) => b,
                Err(r) => return Ok(r),
            };
            sign(&state, &service, &String::from_utf8_lossy(&body))
        }
        (Method::GET, "/v1/proxies") => match store.proxies().await {
            Ok(list) => {
                let now = unix_now();
                let rows: Vec<ProxyStatus> = list
                    .into_iter()
                    .map(|p| ProxyStatus {
                        live: now - p.last_seen <= LIVE_FOR_SECS,
                        cert_expires_in_s: p.report.cert_not_after - now,
                        last_seen: p.last_seen,
                        report: p.report,
                        node: p.node,
                    })
                    .collect();
                json(StatusCode::OK, &rows)
            }
            Err(e) => state.store_error(internal, e),
        },
        (Method::POST, "/v1/certs/rotate") => {
            let key = match query_param(&query, "service") {
                Some(s) => format!("certgen/{s}"),
                None => "certgen".to_string(),
            };
            match store.bump_meta(&key).await {
                Ok(_) => {
                    state.notify().await;
                    json(
                        StatusCode::OK,
                        &CertRotateResponse {
                            rotated: query_param(&query, "service").unwrap_or_else(|| "*".into()),
                            index: state.served(),
                        },
                    )
                }
                Err(e) => state.store_error(internal, e),
            }
        }
        (Method::POST, "/v1/operator/tokens") => {
            match body_json::<OperatorTokenRequest>(req).await {
                Err(r) => r,
                Ok(r) => create_operator_token(&state, r.name).await,
            }
        }
        (Method::GET, "/v1/operator/tokens") => match store.operator_tokens().await {
            Ok(list) => {
                let rows: Vec<OperatorTokenRecord> = list.into_iter().map(|(_, r)| r).collect();
                json(StatusCode::OK, &rows)
            }
            Err(e) => state.store_error(internal, e),
        },
        (Method::DELETE, p) if p.starts_with("/v1/operator/tokens/") => {
            let name = &p["/v1/operator/tokens/".len()..];
            revoke_operator_token(&state, name).await
        }
        (Method::GET, "/v1/ca") => json(StatusCode::OK, &state.ca_status(true)),
        (Method::POST, "/v1/ca/rotate") => {
            // One rollover step (if still at `from`); moving to "the new root signs" re-issues
            // every leaf.
            let from = match query_param(&query, "from").as_deref() {
                None => None,
                Some("idle") => Some(RotationPhase::Idle),
                Some("new_trusted") => Some(RotationPhase::NewTrusted),
                Some("new_signing") => Some(RotationPhase::NewSigning),
                Some(other) => {
                    return Ok(error(
                        StatusCode::BAD_REQUEST,
                        format!("from={other}: not idle, new_trusted or new_signing"),
                    ))
                }
            };
            match state.ca_step(from).await {
                Ok(()) => json(StatusCode::OK, &state.ca_status(false)),
                Err(r) => r,
            }
        }
        (m, p) => error(StatusCode::NOT_FOUND, format!("no such endpoint: {m} {p}")),
    };
    Ok(resp)
}

/// A new operator token named `name` (unique).
async fn create_operator_token(state: &State, name: String) -> Response<Full<Bytes>> {
    if !tcp::valid_name(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("name: '{name}' must be 1 to 64 letters, digits, '.', '_', '-' or '@'"),
        );
    }
    let internal = StatusCode::INTERNAL_SERVER_ERROR;
    match state.store.operator_tokens().await {
        Err(e) => return state.store_error(internal, e),
        Ok(list) if list.iter().any(|(_, r)| r.name == name) => {
            return error(
                StatusCode::CONFLICT,
                format!("name: an operator token named '{name}' exists (revoke it first)"),
            )
        }
        Ok(_) => {}
    }
    let Some(token) = tcp::new_token() else {
        return error(internal, "no randomness");
    };
    let rec = OperatorTokenRecord {
        name: name.clone(),
        created: unix_now(),
    };
    match state
        .store
        .add_operator_token(&token_hash(&token), &rec)
        .await
    {
        Ok(()) => json(StatusCode::OK, &OperatorTokenResponse { name, token }),
        Err(e) => state.store_error(internal, e),
    }
}

/// Revoke the operator token named `name`: refused on the TCP port from the next request on.
async fn revoke_operator_token(state: &State, name: &str) -> Response<Full<Bytes>> {
    let internal = StatusCode::INTERNAL_SERVER_ERROR;
    let list = match state.store.operator_tokens().await {
        Ok(l) => l,
        Err(e) => return state.store_error(internal, e),
    };
    let mut found = false;
    for (hash, _) in list.iter().filter(|(_, r)| r.name == name) {
        lock(&state.operator_tokens).remove(hash);
        match state.store.remove_operator_token(hash).await {
            Ok(_) => found = true,
            Err(e) => return state.store_error(internal, e),
        }
    }
    if found {
        json(
            StatusCode::OK,
            &OperatorTokenRevoked {
                name: name.to_string(),
            },
        )
    } else {
        error(
            StatusCode::NOT_FOUND,
            format!("no operator token named '{name}' (ringctl operator token list)"),
        )
    }
}

/// Why a request to the daemon failed.
#[derive(Debug)]
pub enum CallError {
    /// The daemon could not be reached, or did not answer in time.
    Unreachable(anyhow::Error),
    /// It refused the request, or its answer is not the expected body.
    Answer(AnswerError),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(e) => write!(f, "{e:#}"),
            CallError::Answer(e) => write!(f, "{e}"),
        }
    }
}

/// A request to the daemon (its socket, or its TCP operator port); its answer read as `T` (see
/// [`ringside_core::control::api`]).
pub fn call<T: DeserializeOwned>(
    daemon: &Target,
    method: Method,
    path: &str,
    body: Option<String>,
) -> Result<T, CallError> {
    call_with(daemon, method, path, body, None)
}

/// A request with an optional proxy token (`ringctl issue`).
pub fn call_with<T: DeserializeOwned>(
    daemon: &Target,
    method: Method,
    path: &str,
    body: Option<String>,
    proxy_token: Option<&str>,
) -> Result<T, CallError> {
    let timeout = std::time::Duration::from_secs(30);
    let (status, answer) = match daemon {
        Target::Socket(socket) => ringside_core::control::http_call(
            socket,
            method.as_str(),
            path,
            body,
            proxy_token,
            timeout,
        ),
        Target::Remote(r) => r.call(method.as_str(), path, body, proxy_token, timeout),
    }
    .map_err(CallError::Unreachable)?;
    ringside_core::control::read_answer(status, &answer).map_err(CallError::Answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_in_parts_is_the_configuration_whole_or_without_its_catalog() {
        let catalog: Vec<CatalogService> = serde_json::from_value(serde_json::json!([
            {"name": "api", "virtual_ip": "240.0.0.1", "ports": [{"port": 80, "target_port": 8080}],
             "endpoints": ["10.0.0.1", "10.0.0.2"], "protocol": "http",
             "endpoint_meta": [{"version": "v1"}, {}]},
            {"name": "db", "virtual_ip": "240.0.0.2", "ports": [{"port": 5432, "target_port": 5432}],
             "endpoints": [], "protocol": null, "endpoint_meta": []}
        ]))
        .expect("a catalog");
        let config = ProxyConfig {
            index: 42,
            service: "web".into(),
            trust_domain: "dc1".into(),
            services: catalog.clone(),
            catalog_digest: String::new(),
            catalog_omitted: false,
            intentions: ringside_core::intentions::Intentions {
                rules: Vec::new(),
                default: ringside_core::intentions::Action::Deny,
            },
            l7: Default::default(),
            inbound: Default::default(),
            upstreams: Default::default(),
            bundle: "-----BEGIN CERTIFICATE-----\nAA==\n-----END CERTIFICATE-----\n".into(),
            cert_generation: 3,
        };
        let (json, digest, head) = split_answer(config.clone()).expect("serialized");
        assert_eq!(
            digest,
            catalog_digest(&serde_json::to_vec(&catalog).unwrap())
        );
        let whole = ConfigAnswer {
            head: head.clone(),
            catalog: Some(json),
        }
        .into_bytes();
        let got: ProxyConfig = serde_json::from_slice(&whole).expect("the whole answer parses");
        let mut want = config.clone();
        want.catalog_digest = digest.clone();
        assert_eq!(got, want);
        assert!(!got.catalog_omitted);
        let lean = ConfigAnswer {
            head,
            catalog: None,
        }
        .into_bytes();
        let got: ProxyConfig = serde_json::from_slice(&lean).expect("the lean answer parses");
        want.services.clear();
        want.catalog_omitted = true;
        assert_eq!(got, want);
        // Older proxies read `services` as required: the lean answer still has it, empty.
        let v: serde_json::Value = serde_json::from_slice(&lean).unwrap();
        assert_eq!(v["services"], serde_json::json!([]));
        // An empty catalog is written as `[]` too, whole.
        let mut empty = config;
        empty.services.clear();
        let (json, _, head) = split_answer(empty).expect("serialized");
        let whole = ConfigAnswer {
            head,
            catalog: Some(json),
        }
        .into_bytes();
        let v: serde_json::Value = serde_json::from_slice(&whole).unwrap();
        assert_eq!(v["services"], serde_json::json!([]));
        assert!(v.get("catalog_omitted").is_none());
    }

    fn report(address: Option<IpAddr>) -> ProxyReport {
        serde_json::from_value(serde_json::json!({
            "id": "p1", "service": "web", "address": address, "applied_index": 7,
            "cert_generation": 1, "cert_not_after": 0, "cert_issuer": "", "clock": 0,
            "started_at": 0
        }))
        .expect("a minimal report")
    }

    fn known(address: Option<IpAddr>, lease: i64) -> LocalProxy {
        LocalProxy {
            service: "web".into(),
            address,
            last: Instant::now(),
            meta: Default::default(),
            lease,
        }
    }

    #[test]
    fn only_a_repeat_on_the_current_lease_is_written_behind() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let r = report(Some(ip));
        // The same proxy, same endpoint, on the lease held now: an acknowledgement, written later.
        assert!(may_write_behind(
            Some(&known(Some(ip), 5)),
            "web",
            &r,
            Some(5)
        ));
        // A first report, another service's record, a moved address, new metadata, another or no
        // lease, or failures to tell: written before the answer.
        assert!(!may_write_behind(None, "web", &r, Some(5)));
        assert!(!may_write_behind(
            Some(&known(Some(ip), 5)),
            "api",
            &r,
            Some(5)
        ));
        let moved: IpAddr = "10.0.0.8".parse().unwrap();
        assert!(!may_write_behind(
            Some(&known(Some(moved), 5)),
            "web",
            &r,
            Some(5)
        ));
        let mut k = known(Some(ip), 5);
        k.meta.insert("version".into(), "v2".into());
        assert!(!may_write_behind(Some(&k), "web", &r, Some(5)));
        assert!(!may_write_behind(
            Some(&known(Some(ip), 5)),
            "web",
            &r,
            Some(6)
        ));
        assert!(!may_write_behind(
            Some(&known(Some(ip), 0)),
            "web",
            &r,
            Some(0)
        ));
        assert!(!may_write_behind(
            Some(&known(Some(ip), 5)),
            "web",
            &r,
            None
        ));
        let mut with_events = r.clone();
        with_events
            .events
            .push(ringside_core::control::api::ProxyEvent {
                time_ms: 1,
                reason: "upstream_reset".into(),
                source: "a".into(),
                destination: "b".into(),
                detail: String::new(),
            });
        assert!(!may_write_behind(
            Some(&known(Some(ip), 5)),
            "web",
            &with_events,
            Some(5)
        ));
        // A proxy without an endpoint needs no lease.
        let bare = report(None);
        assert!(may_write_behind(Some(&known(None, 0)), "web", &bare, None));
    }
}
