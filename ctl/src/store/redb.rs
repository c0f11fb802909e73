//! The embedded backend: the daemon's state in one redb file (`DIR/ringctl.redb`), documents keyed
//! by `Kind/name` and records stored as JSON. An apply writes every document of a file in one
//! transaction, so a crash leaves either all of it or none; a committed transaction survives
//! SIGKILL. The configuration index is a counter in the `meta` table.

use std::path::{Path, PathBuf};

use redb::{Database, ReadableTable, TableDefinition};

use super::{
    check_owner, e, endpoint_key, endpoint_of, merge_report, token_from_stored, unix_now, vip_at,
    EndpointRecord, OperatorTokenRecord, PortMap, ProxyRecord, ServiceRecord, Snapshot, StoreError,
    TokenInfo,
};
use crate::consul::Document;

const DOCS: TableDefinition<&str, &str> = TableDefinition::new("documents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// The embedded store (see [`super::Store`] for what each operation promises).
#[derive(Debug)]
pub struct RedbStore {
    db: Database,
    path: PathBuf,
}

impl RedbStore {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<RedbStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(e)?;
        let path = dir.join("ringctl.redb");
        let db = Database::create(&path).map_err(e)?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(DOCS).map_err(e)?;
            tx.open_table(META).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(RedbStore { db, path })
    }

    /// `redb PATH`, for logs.
    pub fn describe(&self) -> String {
        format!("redb {}", self.path.display())
    }

    /// Store every document in one transaction; returns the new configuration index.
    pub fn apply(&self, docs: &[Document]) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let index;
        {
            let mut t = tx.open_table(DOCS).map_err(e)?;
            for d in docs {
                let json = serde_json::to_string(d).map_err(e)?;
                t.insert(d.id().as_str(), json.as_str()).map_err(e)?;
            }
            let mut m = tx.open_table(META).map_err(e)?;
            index = m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0) + 1;
            m.insert("index", index).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(index)
    }

    /// Delete `Kind/name`; returns whether it existed.
    pub fn delete(&self, id: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let existed;
        {
            let mut t = tx.open_table(DOCS).map_err(e)?;
            existed = t.remove(id).map_err(e)?.is_some();
            if existed {
                let mut m = tx.open_table(META).map_err(e)?;
                let index = m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0) + 1;
                m.insert("index", index).map_err(e)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(existed)
    }

    /// Every stored document, as JSON values, in key order.
    pub fn documents(&self) -> Result<Vec<serde_json::Value>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = tx.open_table(DOCS).map_err(e)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (_, v) = row.map_err(e)?;
            out.push(serde_json::from_str(v.value()).map_err(e)?);
        }
        Ok(out)
    }

    /// The configuration index (bumped by every change).
    pub fn index(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let m = tx.open_table(META).map_err(e)?;
        Ok(m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0))
    }
}

const SERVICES: TableDefinition<&str, &str> = TableDefinition::new("services");
const ENDPOINTS: TableDefinition<&str, &str> = TableDefinition::new("endpoints");
const TOKENS: TableDefinition<&str, &str> = TableDefinition::new("tokens");

impl RedbStore {
    /// Register (or update the ports of) a service; a new one gets the next virtual IP of `range`
    /// (network address and prefix length).
    pub fn register_service(
        &self,
        name: &str,
        ports: Vec<PortMap>,
        range: (std::net::Ipv4Addr, u8),
    ) -> Result<ServiceRecord, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let svc;
        {
            let mut t = tx.open_table(SERVICES).map_err(e)?;
            let existing: Option<ServiceRecord> = match t.get(name).map_err(e)? {
                Some(v) => Some(serde_json::from_str(v.value()).map_err(e)?),
                None => None,
            };
            let first = existing
                .as_ref()
                .map(|s| (s.registered_index, s.registered_at));
            let virtual_ip = match existing {
                Some(s) => s.virtual_ip,
                None => {
                    let mut m = tx.open_table(META).map_err(e)?;
                    let next = m
                        .get("next_vip")
                        .map_err(e)?
                        .map(|v| v.value())
                        .unwrap_or(1);
                    let ip = vip_at(range, next)?;
                    m.insert("next_vip", next + 1).map_err(e)?;
                    ip
                }
            };
            let (registered_index, registered_at) = match first {
                Some(f) => f,
                None => {
                    let m = tx.open_table(META).map_err(e)?;
                    let index = m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0) + 1;
                    (index, unix_now())
                }
            };
            svc = ServiceRecord {
                name: name.to_string(),
                ports,
                virtual_ip,
                registered_index,
                registered_at,
            };
            t.insert(name, serde_json::to_string(&svc).map_err(e)?.as_str())
                .map_err(e)?;
            bump(&tx)?;
        }
        tx.commit().map_err(e)?;
        Ok(svc)
    }

    /// Register an endpoint (keyed by service and address).
    pub fn register_endpoint(&self, ep: &EndpointRecord) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        {
            if tx
                .open_table(SERVICES)
                .map_err(e)?
                .get(ep.service.as_str())
                .map_err(e)?
                .is_none()
            {
                return Err(StoreError::new(format!(
                    "no service '{}': register it first",
                    ep.service
                )));
            }
            let mut t = tx.open_table(ENDPOINTS).map_err(e)?;
            let key = endpoint_key(ep);
            t.insert(key.as_str(), serde_json::to_string(ep).map_err(e)?.as_str())
                .map_err(e)?;
            // Registered by hand: no proxy's any more, never expired.
            tx.open_table(PROXY_ENDPOINTS)
                .map_err(e)?
                .remove(key.as_str())
                .map_err(e)?;
            bump(&tx)?;
        }
        tx.commit().map_err(e)?;
        Ok(())
    }

    /// All services.
    pub fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.all(SERVICES)
    }

    /// All endpoints.
    pub fn endpoints(&self) -> Result<Vec<EndpointRecord>, StoreError> {
        self.all(ENDPOINTS)
    }

    fn all<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &str>,
    ) -> Result<Vec<T>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = match tx.open_table(table) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (_, v) = row.map_err(e)?;
            out.push(serde_json::from_str(v.value()).map_err(e)?);
        }
        Ok(out)
    }

    /// Remember a token (by its hash).
    pub fn add_token(&self, token_hash: &str, token: &TokenInfo) -> Result<(), StoreError> {
        let json = serde_json::to_string(token).map_err(e)?;
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(TOKENS).map_err(e)?;
            t.insert(token_hash, json.as_str()).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// A token (by its hash).
    pub fn token(&self, token_hash: &str) -> Result<Option<TokenInfo>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = match tx.open_table(TOKENS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x)),
        };
        let v = t.get(token_hash).map_err(e)?;
        v.map(|v| token_from_stored(token_hash, v.value().as_bytes()))
            .transpose()
    }

    /// Every token, with its hash.
    pub fn tokens(&self) -> Result<Vec<(String, TokenInfo)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = match tx.open_table(TOKENS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            let hash = k.value().to_string();
            let info = token_from_stored(&hash, v.value().as_bytes())?;
            out.push((hash, info));
        }
        Ok(out)
    }

    /// Forget a token (by its hash); returns whether it was stored.
    pub fn remove_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let existed;
        {
            let mut t = tx.open_table(TOKENS).map_err(e)?;
            existed = t.remove(token_hash).map_err(e)?.is_some();
        }
        tx.commit().map_err(e)?;
        Ok(existed)
    }
}

const PROXIES: TableDefinition<&str, &str> = TableDefinition::new("proxies");
/// Endpoints registered by proxies' reports (`service/address` -> proxy id), so that those of
/// proxies that stop reporting can be expired (hand-registered ones are not in it).
const PROXY_ENDPOINTS: TableDefinition<&str, &str> = TableDefinition::new("proxy_endpoints");

impl RedbStore {
    /// A counter in the metadata (0 when unset).
    #[cfg(test)] // the daemon reads counters from its snapshot
    pub fn meta(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let m = tx.open_table(META).map_err(e)?;
        Ok(m.get(key).map_err(e)?.map(|v| v.value()).unwrap_or(0))
    }

    /// Increment a metadata counter and the configuration index in one transaction; returns the
    /// counter's new value.
    pub fn bump_meta(&self, key: &str) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let v;
        {
            let mut m = tx.open_table(META).map_err(e)?;
            v = m.get(key).map_err(e)?.map(|v| v.value()).unwrap_or(0) + 1;
            m.insert(key, v).map_err(e)?;
        }
        bump(&tx)?;
        tx.commit().map_err(e)?;
        Ok(v)
    }

    /// Bump the configuration index alone (something outside the tables changed, e.g. the roots).
    pub fn bump_index(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        bump(&tx)?;
        tx.commit().map_err(e)?;
        self.index()
    }

    /// Record a proxy's report; with an address, its endpoint is registered (healthy) for its
    /// service. Returns whether the catalog changed.
    pub fn report_proxy(&self, rec: &ProxyRecord, node: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let mut changed = false;
        {
            let mut t = tx.open_table(PROXIES).map_err(e)?;
            let old: Option<ProxyRecord> = match t.get(rec.report.id.as_str()).map_err(e)? {
                Some(v) => serde_json::from_str(v.value()).ok(),
                None => None,
            };
            check_owner(old.as_ref(), rec)?;
            let rec = merge_report(old, rec);
            t.insert(
                rec.report.id.as_str(),
                serde_json::to_string(&rec).map_err(e)?.as_str(),
            )
            .map_err(e)?;
            if let Some(ep) = endpoint_of(&rec, node) {
                let known = tx
                    .open_table(SERVICES)
                    .map_err(e)?
                    .get(ep.service.as_str())
                    .map_err(e)?
                    .is_some();
                if known {
                    let key = endpoint_key(&ep);
                    let mut owners = tx.open_table(PROXY_ENDPOINTS).map_err(e)?;
                    let owned = owners
                        .get(key.as_str())
                        .map_err(e)?
                        .is_some_and(|v| v.value() == rec.report.id);
                    if !owned {
                        owners
                            .insert(key.as_str(), rec.report.id.as_str())
                            .map_err(e)?;
                    }
                    let json = serde_json::to_string(&ep).map_err(e)?;
                    let mut eps = tx.open_table(ENDPOINTS).map_err(e)?;
                    let same = eps
                        .get(key.as_str())
                        .map_err(e)?
                        .is_some_and(|v| v.value() == json);
                    if !same {
                        eps.insert(key.as_str(), json.as_str()).map_err(e)?;
                        changed = true;
                    }
                }
            }
            if changed {
                bump(&tx)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(changed)
    }

    /// Every proxy that ever reported.
    pub fn proxies(&self) -> Result<Vec<ProxyRecord>, StoreError> {
        self.all(PROXIES)
    }

    /// Everything proxies are sent, in one read transaction.
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let mut snap = Snapshot::default();
        for row in tx.open_table(META).map_err(e)?.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            snap.counters.insert(k.value().to_string(), v.value());
        }
        snap.index = snap.counters.remove("index").unwrap_or(0);
        let rows = |table: TableDefinition<&str, &str>| -> Result<Vec<String>, StoreError> {
            let t = match tx.open_table(table) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(x) => return Err(e(x)),
            };
            let mut out = Vec::new();
            for row in t.iter().map_err(e)? {
                out.push(row.map_err(e)?.1.value().to_string());
            }
            Ok(out)
        };
        let parse = |v: &String| serde_json::from_str(v).map_err(e);
        snap.docs = rows(DOCS)?.iter().map(parse).collect::<Result<_, _>>()?;
        snap.services = rows(SERVICES)?
            .iter()
            .map(|v| serde_json::from_str(v).map_err(e))
            .collect::<Result<_, _>>()?;
        snap.endpoints = rows(ENDPOINTS)?
            .iter()
            .map(|v| serde_json::from_str(v).map_err(e))
            .collect::<Result<_, _>>()?;
        Ok(snap)
    }

    /// Remove an endpoint; returns whether it existed.
    pub fn deregister_endpoint(
        &self,
        service: &str,
        address: std::net::IpAddr,
    ) -> Result<bool, StoreError> {
        let key = format!("{service}/{address}");
        let tx = self.db.begin_write().map_err(e)?;
        let existed;
        {
            existed = tx
                .open_table(ENDPOINTS)
                .map_err(e)?
                .remove(key.as_str())
                .map_err(e)?
                .is_some();
            tx.open_table(PROXY_ENDPOINTS)
                .map_err(e)?
                .remove(key.as_str())
                .map_err(e)?;
            if existed {
                bump(&tx)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(existed)
    }

    /// Remove the endpoint `proxy` registered, if it is still that proxy's.
    pub fn expire_endpoint(
        &self,
        service: &str,
        address: std::net::IpAddr,
        proxy: &str,
    ) -> Result<bool, StoreError> {
        let key = format!("{service}/{address}");
        let tx = self.db.begin_write().map_err(e)?;
        let expired;
        {
            let mut owners = tx.open_table(PROXY_ENDPOINTS).map_err(e)?;
            let owner = owners
                .get(key.as_str())
                .map_err(e)?
                .map(|v| v.value().to_string());
            expired = owner.as_deref() == Some(proxy);
            if expired {
                owners.remove(key.as_str()).map_err(e)?;
                tx.open_table(ENDPOINTS)
                    .map_err(e)?
                    .remove(key.as_str())
                    .map_err(e)?;
                bump(&tx)?;
            }
        }
        tx.commit().map_err(e)?;
        Ok(expired)
    }

    /// The endpoints proxies registered, with their proxy: (service, address, proxy).
    pub fn proxy_endpoints(&self) -> Result<Vec<(String, std::net::IpAddr, String)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let owners = match tx.open_table(PROXY_ENDPOINTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x)),
        };
        let eps = match tx.open_table(ENDPOINTS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x)),
        };
        let mut out = Vec::new();
        for row in owners.iter().map_err(e)? {
            let (k, proxy) = row.map_err(e)?;
            if let Some(v) = eps.get(k.value()).map_err(e)? {
                let ep: EndpointRecord = serde_json::from_str(v.value()).map_err(e)?;
                out.push((ep.service, ep.address, proxy.value().to_string()));
            }
        }
        Ok(out)
    }
}

fn bump(tx: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut m = tx.open_table(META).map_err(e)?;
    let index = m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0) + 1;
    m.insert("index", index).map_err(e)?;
    Ok(())
}

/// Operator tokens: hash -> [`OperatorTokenRecord`] (JSON).
const OPERATOR_TOKENS: TableDefinition<&str, &str> = TableDefinition::new("operator_tokens");

impl RedbStore {
    /// See [`super::Store::add_operator_token`].
    pub fn add_operator_token(
        &self,
        token_hash: &str,
        rec: &OperatorTokenRecord,
    ) -> Result<(), StoreError> {
        let json = serde_json::to_string(rec).map_err(e)?;
        let tx = self.db.begin_write().map_err(e)?;
        {
            let mut t = tx.open_table(OPERATOR_TOKENS).map_err(e)?;
            t.insert(token_hash, json.as_str()).map_err(e)?;
        }
        tx.commit().map_err(e)
    }

    /// See [`super::Store::operator_token`].
    pub fn operator_token(
        &self,
        token_hash: &str,
    ) -> Result<Option<OperatorTokenRecord>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = match tx.open_table(OPERATOR_TOKENS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(x) => return Err(e(x)),
        };
        match t.get(token_hash).map_err(e)? {
            Some(v) => Ok(Some(serde_json::from_str(v.value()).map_err(e)?)),
            None => Ok(None),
        }
    }

    /// See [`super::Store::operator_tokens`].
    pub fn operator_tokens(&self) -> Result<Vec<(String, OperatorTokenRecord)>, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let t = match tx.open_table(OPERATOR_TOKENS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(x) => return Err(e(x)),
        };
        let mut out = Vec::new();
        for row in t.iter().map_err(e)? {
            let (k, v) = row.map_err(e)?;
            out.push((
                k.value().to_string(),
                serde_json::from_str(v.value()).map_err(e)?,
            ));
        }
        Ok(out)
    }

    /// See [`super::Store::remove_operator_token`].
    pub fn remove_operator_token(&self, token_hash: &str) -> Result<bool, StoreError> {
        let tx = self.db.begin_write().map_err(e)?;
        let removed = {
            let mut t = tx.open_table(OPERATOR_TOKENS).map_err(e)?;
            let r = t.remove(token_hash).map_err(e)?.is_some();
            r
        };
        tx.commit().map_err(e)?;
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proxy record is stored flat (the report's fields and `last_seen` side by side), as
    /// before the API had types; records of older proxies lack the later fields.
    #[test]
    fn proxy_records_keep_their_stored_form() {
        let old = r#"{"id":"p1","service":"a","applied_index":3,"cert_generation":0,
            "cert_not_after":100,"last_seen":50,"events":[{"time_ms":1,"reason":"r",
            "source":"s","destination":"d","detail":"x"}]}"#;
        let rec: ProxyRecord = serde_json::from_str(old).unwrap();
        assert_eq!(rec.report.id, "p1");
        assert_eq!(rec.last_seen, 50);
        assert_eq!(rec.report.events.len(), 1);
        assert_eq!(rec.report.cert_issuer, "");
        let v = serde_json::to_value(&rec).unwrap();
        assert_eq!(v["last_seen"], 50);
        assert_eq!(v["applied_index"], 3);
        assert_eq!(serde_json::from_value::<ProxyRecord>(v).unwrap(), rec);
    }

    #[test]
    fn catalog_allocates_virtual_ips_once_and_persists() {
        let dir = std::env::temp_dir().join(format!("ringctl-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let range = ("240.0.0.0".parse().unwrap(), 30);
        {
            let s = RedbStore::open(&dir).unwrap();
            let a = s
                .register_service(
                    "a",
                    vec![PortMap {
                        port: 1800,
                        target_port: 8080,
                    }],
                    range,
                )
                .unwrap();
            let b = s.register_service("b", vec![], range).unwrap();
            assert_eq!(a.virtual_ip.to_string(), "240.0.0.1");
            assert_eq!(b.virtual_ip.to_string(), "240.0.0.2");
            let a2 = s.register_service("a", vec![], range).unwrap();
            assert_eq!(a2.virtual_ip, a.virtual_ip, "re-registering keeps the VIP");
            let err = s.register_service("c", vec![], range).unwrap_err();
            assert!(err.to_string().contains("exhausted"), "{err}");
            let ep = EndpointRecord {
                service: "a".into(),
                address: "198.18.0.2".parse().unwrap(),
                node: "n1".into(),
                healthy: true,
                meta: Default::default(),
            };
            s.register_endpoint(&ep).unwrap();
            let bad = EndpointRecord {
                service: "zzz".into(),
                ..ep.clone()
            };
            assert!(s
                .register_endpoint(&bad)
                .unwrap_err()
                .to_string()
                .contains("no service 'zzz'"));
            s.add_token(
                "h1",
                &TokenInfo {
                    id: "h1".into(),
                    service: "a".into(),
                    created: 1,
                    expires: None,
                },
            )
            .unwrap();
        }
        let s = RedbStore::open(&dir).unwrap();
        assert_eq!(s.services().unwrap().len(), 2);
        assert_eq!(s.endpoints().unwrap()[0].node, "n1");
        assert_eq!(s.token("h1").unwrap().unwrap().service, "a");
        assert_eq!(s.token("nope").unwrap(), None);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
