//! The daemon's state in an embedded transactional store (redb, one file): configuration documents
//! keyed by `Kind/name`, stored as JSON. An apply writes every document of a file in one
//! transaction, so a crash leaves either all of it or none; a committed transaction survives
//! SIGKILL.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};

use crate::consul::Document;

const DOCS: TableDefinition<&str, &str> = TableDefinition::new("documents");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(String);

fn e(x: impl std::fmt::Display) -> StoreError {
    StoreError(x.to_string())
}

/// The store.
#[derive(Debug)]
pub struct Store {
    db: Database,
}

impl Store {
    /// Open (or create) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(e)?;
        let db = Database::create(dir.join("ringctl.redb")).map_err(e)?;
        let tx = db.begin_write().map_err(e)?;
        {
            tx.open_table(DOCS).map_err(e)?;
            tx.open_table(META).map_err(e)?;
        }
        tx.commit().map_err(e)?;
        Ok(Store { db })
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

    /// Every stored document, typed.
    pub fn typed(&self) -> Result<Vec<Document>, StoreError> {
        self.documents()?
            .into_iter()
            .map(|v| serde_json::from_value(v).map_err(e))
            .collect()
    }

    /// The configuration index (bumped by every change).
    pub fn index(&self) -> Result<u64, StoreError> {
        let tx = self.db.begin_read().map_err(e)?;
        let m = tx.open_table(META).map_err(e)?;
        Ok(m.get("index").map_err(e)?.map(|v| v.value()).unwrap_or(0))
    }
}
