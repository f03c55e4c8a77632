//! Broker definitions (vhosts, users, permissions, exchanges, queues,
//! bindings, policies, metadata) in a sled database at `<data_dir>/defs`.
//!
//! Definitions change rarely, so every [`put`](Definitions::put) and
//! [`delete`](Definitions::delete) flushes sled before returning: when it
//! returns `Ok`, the change survives a crash.
//!
//! # Key layout
//!
//! | sled tree | key | value |
//! |---|---|---|
//! | one per [`Table`] (`vhosts`, `users`, `permissions`, `exchanges`, `queues`, `bindings`, `policies`, `meta`, `dedup`, `retry`) | the caller's key, UTF-8 | `serde_json` of the value |
//! | `counters` | counter name, UTF-8 | `u64` big-endian: the last id handed out by [`next_id`](Definitions::next_id) |
//!
//! Composite keys are built with [`Definitions::key`]: parts joined by
//! `\0` (AMQP names never contain it), so a prefix scan with
//! `key(&[vhost, ""])` lists one vhost's entries. A numeric key part is
//! written with [`Definitions::num`] as 20-digit zero-padded decimal, which
//! sorts like big-endian, so iteration order is numeric order.
//!
//! The caller owns the meaning of each table's keys; e.g. the broker may use
//! `key(&[vhost, queue_name])` for queues and
//! `key(&[vhost, source, dest_kind, dest, routing_key])` for bindings.
//!
//! # Lazy writes
//!
//! The `dedup` and `retry` tables hold small, frequently changing snapshots
//! of queue state (deduplication caches, delayed-retry due times). They are
//! written with [`apply`](Definitions::apply) and
//! [`remove_prefix`](Definitions::remove_prefix), which do *not* flush:
//! such a write is durable at sled's next background flush (every 500 ms,
//! sled's default, which [`open`](Definitions::open) keeps) or at the next
//! [`flush`](Definitions::flush) (every `put`/`delete` flushes, and so does a
//! clean shutdown). A crash may lose the last half second of them.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::StoreError;

/// A kind of definition; each is its own sled tree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Table {
    /// Virtual hosts.
    VHosts,
    /// Users and password hashes.
    Users,
    /// Per-vhost user permissions.
    Permissions,
    /// Durable exchanges.
    Exchanges,
    /// Durable queues (with their store `QueueId`).
    Queues,
    /// Bindings between durable exchanges and queues/exchanges.
    Bindings,
    /// Policies.
    Policies,
    /// Anything else the broker needs to remember (JSON values).
    Meta,
    /// Deduplication caches of durable queues and exchanges (lazy writes,
    /// see the module docs).
    Dedup,
    /// Delayed-retry due times and delivery counts of stored messages
    /// (lazy writes, see the module docs).
    Retry,
}

impl Table {
    /// The sled tree name.
    pub fn tree_name(self) -> &'static str {
        match self {
            Table::VHosts => "vhosts",
            Table::Users => "users",
            Table::Permissions => "permissions",
            Table::Exchanges => "exchanges",
            Table::Queues => "queues",
            Table::Bindings => "bindings",
            Table::Policies => "policies",
            Table::Meta => "meta",
            Table::Dedup => "dedup",
            Table::Retry => "retry",
        }
    }
}

const COUNTERS: &str = "counters";

/// Writes to one table, applied atomically by [`Definitions::apply`].
#[derive(Default)]
pub struct Batch {
    inner: sled::Batch,
    len: usize,
}

impl Batch {
    /// Stores `value` under `key` (replacing any previous one).
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes =
            serde_json::to_vec(value).map_err(|e| defs_err(&format!("encode {key:?}"), e))?;
        self.inner.insert(key.as_bytes(), bytes);
        self.len += 1;
        Ok(())
    }

    /// Removes `key` (if present).
    pub fn delete(&mut self, key: &str) {
        self.inner.remove(key.as_bytes());
        self.len += 1;
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Number of writes in the batch.
    pub fn len(&self) -> usize {
        self.len
    }
}

/// Handle to the definitions database; cheap to clone.
#[derive(Clone)]
pub struct Definitions {
    db: sled::Db,
    /// Where changes to replicate go (set when this node is clustered).
    replicate: std::sync::Arc<std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<DefChange>>>,
}

/// A definition change made on this node, for the other nodes of a cluster
/// to apply (see `cluster::defs`). Definitions travel in RabbitMQ's
/// definitions-file JSON.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum DefChange {
    /// A fragment of a definitions file to import (vhosts, exchanges,
    /// bindings, users, permissions, policies).
    Import(String),
    /// vhost deleted.
    DeleteVhost(String),
    /// Exchange deleted: (vhost, name).
    DeleteExchange(String, String),
    /// Binding deleted: one binding in definitions JSON.
    Unbind(String),
    /// User deleted.
    DeleteUser(String),
    /// Permissions cleared: (user, vhost).
    ClearPermissions(String, String),
    /// Policy deleted: (vhost, name).
    DeletePolicy(String, String),
}

tokio::task_local! {
    /// Set while applying a change that came from another node, so it is
    /// not sent back out.
    pub static APPLYING_REPLICATED: bool;
}

fn defs_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Defs(format!("{what}: {e}"))
}

impl Definitions {
    /// Opens (or creates) `<data_dir>/defs`. Fails if another process holds it.
    pub fn open(data_dir: &Path) -> Result<Definitions, StoreError> {
        let path = data_dir.join("defs");
        // sled flocks the directory. Retry briefly: a Definitions closing in
        // this process (sled's flusher thread lets go a moment after the
        // last handle) or a child being spawned may hold it for a moment.
        let mut tries = 0;
        let db = loop {
            match sled::open(&path) {
                Ok(db) => break db,
                // sled reports it as ErrorKind::Other with this text.
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock") && tries < 100 =>
                {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => {
                    return Err(defs_err(
                        &format!("open {} (is another warren using it?)", path.display()),
                        e,
                    ));
                }
            }
        };
        Ok(Definitions {
            db,
            replicate: Default::default(),
        })
    }

    /// Sends every later local definition change to `tx` (clustering).
    pub fn set_replicator(&self, tx: tokio::sync::mpsc::UnboundedSender<DefChange>) {
        let _ = self.replicate.set(tx);
    }

    /// Hands a local change to the replicator, if clustered (and unless it
    /// is itself the application of a replicated change).
    pub fn replicate(&self, change: DefChange) {
        if APPLYING_REPLICATED.try_with(|a| *a).unwrap_or(false) {
            return;
        }
        if let Some(tx) = self.replicate.get() {
            let _ = tx.send(change);
        }
    }

    /// Builds a composite key from parts (see the module docs).
    pub fn key(parts: &[&str]) -> String {
        parts.join("\0")
    }

    /// A numeric key part that sorts in numeric order.
    pub fn num(n: u64) -> String {
        format!("{n:020}")
    }

    fn tree(&self, table: Table) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(table.tree_name())
            .map_err(|e| defs_err(&format!("open tree {}", table.tree_name()), e))
    }

    /// Stores `value` under `key`, replacing any previous one; durable on return.
    pub async fn put<T: Serialize>(
        &self,
        table: Table,
        key: &str,
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value)
            .map_err(|e| defs_err(&format!("encode {table:?} {key:?}"), e))?;
        self.tree(table)?
            .insert(key.as_bytes(), bytes)
            .map_err(|e| defs_err(&format!("write {table:?} {key:?}"), e))?;
        self.flush().await
    }

    /// Reads one value.
    pub fn get<T: DeserializeOwned>(
        &self,
        table: Table,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let Some(v) = self
            .tree(table)?
            .get(key.as_bytes())
            .map_err(|e| defs_err("read", e))?
        else {
            return Ok(None);
        };
        serde_json::from_slice(&v)
            .map(Some)
            .map_err(|e| defs_err(&format!("decode {table:?} {key:?}"), e))
    }

    /// Removes `key`; returns whether it existed. Durable on return.
    pub async fn delete(&self, table: Table, key: &str) -> Result<bool, StoreError> {
        let old = self
            .tree(table)?
            .remove(key.as_bytes())
            .map_err(|e| defs_err(&format!("delete {table:?} {key:?}"), e))?;
        self.flush().await?;
        Ok(old.is_some())
    }

    /// Every entry of a table, in key order.
    pub fn list<T: DeserializeOwned>(&self, table: Table) -> Result<Vec<(String, T)>, StoreError> {
        self.list_prefix(table, "")
    }

    /// Entries whose key starts with `prefix`, in key order.
    pub fn list_prefix<T: DeserializeOwned>(
        &self,
        table: Table,
        prefix: &str,
    ) -> Result<Vec<(String, T)>, StoreError> {
        let mut out = Vec::new();
        for item in self.tree(table)?.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(|e| defs_err(&format!("scan {table:?}"), e))?;
            let key = String::from_utf8(k.to_vec())
                .map_err(|e| defs_err(&format!("key in {table:?}"), e))?;
            let value = serde_json::from_slice(&v)
                .map_err(|e| defs_err(&format!("decode {table:?} {key:?}"), e))?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Applies a batch of writes to `table` atomically, *without* flushing
    /// (see "Lazy writes" in the module docs). Never blocks on the disk.
    pub fn apply(&self, table: Table, batch: Batch) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        self.tree(table)?
            .apply_batch(batch.inner)
            .map_err(|e| defs_err(&format!("write {table:?}"), e))
    }

    /// Removes every entry whose key starts with `prefix` and for which
    /// `remove(key)` is true, *without* flushing. Returns how many went.
    pub fn remove_prefix_where(
        &self,
        table: Table,
        prefix: &str,
        remove: impl Fn(&str) -> bool,
    ) -> Result<usize, StoreError> {
        let tree = self.tree(table)?;
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for item in tree.scan_prefix(prefix.as_bytes()).keys() {
            let k = item.map_err(|e| defs_err(&format!("scan {table:?}"), e))?;
            if remove(&String::from_utf8_lossy(&k)) {
                batch.remove(k);
                n += 1;
            }
        }
        if n > 0 {
            tree.apply_batch(batch)
                .map_err(|e| defs_err(&format!("delete in {table:?}"), e))?;
        }
        Ok(n)
    }

    /// Removes every entry whose key starts with `prefix`, *without*
    /// flushing. Returns how many went.
    pub fn remove_prefix(&self, table: Table, prefix: &str) -> Result<usize, StoreError> {
        self.remove_prefix_where(table, prefix, |_| true)
    }

    /// Hands out the next value of a persistent counter (first is 1); never
    /// repeats, even across crashes. Use it for queue ids.
    pub async fn next_id(&self, counter: &str) -> Result<u64, StoreError> {
        let tree = self
            .db
            .open_tree(COUNTERS)
            .map_err(|e| defs_err("open tree counters", e))?;
        let new = tree
            .update_and_fetch(counter.as_bytes(), |old| {
                let n = old
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(n.saturating_add(1).to_be_bytes().to_vec())
            })
            .map_err(|e| defs_err(&format!("bump counter {counter:?}"), e))?;
        let n = new
            .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| defs_err("counter", "unexpected value"))?;
        self.flush().await?;
        Ok(n)
    }

    /// Makes every earlier change durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush_async()
            .await
            .map_err(|e| defs_err("flush", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Q {
        id: u64,
        durable: bool,
    }

    #[tokio::test]
    async fn batches_and_prefix_removal_are_lazy_but_survive_a_flush() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = Definitions::open(dir.path()).unwrap();
            let mut b = Batch::default();
            for (k, v) in [
                (["q", "1", "a"], 1u64),
                (["q", "1", "b"], 2),
                (["q", "2", "a"], 3),
            ] {
                b.put(&Definitions::key(&k), &v).unwrap();
            }
            b.delete(&Definitions::key(&["q", "1", "zz"]));
            assert_eq!(b.len(), 4);
            d.apply(Table::Dedup, b).unwrap();
            d.apply(Table::Dedup, Batch::default()).unwrap();
            assert_eq!(
                d.remove_prefix_where(Table::Dedup, &Definitions::key(&["q", ""]), |k| k
                    .ends_with('b'))
                    .unwrap(),
                1
            );
            d.put(Table::Retry, "x", &7u64).await.unwrap();
            assert_eq!(d.remove_prefix(Table::Retry, "").unwrap(), 1);
            d.flush().await.unwrap();
        }
        let d = Definitions::open(dir.path()).unwrap();
        let rows: Vec<(String, u64)> = d.list(Table::Dedup).unwrap();
        assert_eq!(
            rows,
            vec![
                (Definitions::key(&["q", "1", "a"]), 1),
                (Definitions::key(&["q", "2", "a"]), 3)
            ]
        );
        assert!(d.list::<u64>(Table::Retry).unwrap().is_empty());
        assert_eq!(
            d.remove_prefix(Table::Dedup, &Definitions::key(&["q", "2", ""]))
                .unwrap(),
            1
        );
    }

    #[tokio::test]
    async fn put_list_delete_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let d = Definitions::open(dir.path()).unwrap();
            d.put(
                Table::Queues,
                &Definitions::key(&["/", "b"]),
                &Q {
                    id: 2,
                    durable: true,
                },
            )
            .await
            .unwrap();
            d.put(
                Table::Queues,
                &Definitions::key(&["/", "a"]),
                &Q {
                    id: 1,
                    durable: true,
                },
            )
            .await
            .unwrap();
            d.put(
                Table::Queues,
                &Definitions::key(&["v2", "a"]),
                &Q {
                    id: 3,
                    durable: true,
                },
            )
            .await
            .unwrap();
            d.put(Table::VHosts, "/", &"default").await.unwrap();
            assert_eq!(d.next_id("queue").await.unwrap(), 1);
            assert_eq!(d.next_id("queue").await.unwrap(), 2);
            assert!(
                d.delete(Table::Queues, &Definitions::key(&["v2", "a"]))
                    .await
                    .unwrap()
            );
            assert!(!d.delete(Table::Queues, "nope").await.unwrap());
        }
        let d = Definitions::open(dir.path()).unwrap();
        let qs: Vec<(String, Q)> = d.list(Table::Queues).unwrap();
        assert_eq!(qs.len(), 2);
        assert_eq!(
            qs[0],
            (
                "/\0a".to_string(),
                Q {
                    id: 1,
                    durable: true
                }
            )
        );
        let slash: Vec<(String, Q)> = d
            .list_prefix(Table::Queues, &Definitions::key(&["/", ""]))
            .unwrap();
        assert_eq!(slash.len(), 2);
        assert_eq!(
            d.get::<String>(Table::VHosts, "/").unwrap().as_deref(),
            Some("default")
        );
        assert_eq!(d.next_id("queue").await.unwrap(), 3);
        assert!(Definitions::num(10) > Definitions::num(9));
    }
}
