//! The Raft log of every group on this node, in one shared write-ahead log
//! with group commit.
//!
//! All groups write into one sled database (one tree of entries per group,
//! plus a shared tree for votes, commit indexes and purge marks). Appends
//! insert the entries, then hand openraft's completion callback to a single
//! flusher thread; the flusher takes every callback that is waiting, runs
//! one `flush` (one fsync covering all of them, whichever groups they belong
//! to) and only then reports the appends durable. So a thousand quorum
//! queues being written at once share fsyncs the way RabbitMQ's Ra WAL does.

use super::types::{NodeId, TypeConfig};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageError, Vote};
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use tracing::error;

/// The shared write-ahead log.
pub struct Wal {
    db: sled::Db,
    meta: sled::Tree,
    flush: std_mpsc::Sender<FlushReq>,
}

/// Work for the flusher thread: everything that must be on disk before
/// going on is synced there, by one thread, one `flush` per batch.
enum FlushReq {
    /// An append, reported durable to openraft after the flush.
    Append(LogFlushed<TypeConfig>),
    /// A vote (synced metadata): the sender hears when it is on disk.
    /// Not sled's `flush_async`: that runs the flush as a blocking job in
    /// sled's small shared thread pool, and many groups voting at once (a
    /// thousand quorum queues declared together) filled the pool with
    /// flushes waiting for a buffer write queued behind them, which
    /// deadlocked the node.
    Sync(tokio::sync::oneshot::Sender<Result<(), String>>),
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").finish_non_exhaustive()
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

impl Wal {
    /// Opens (or creates) the log under `dir/raft`.
    pub fn open(dir: &Path) -> Result<Arc<Wal>, std::io::Error> {
        let db = sled::Config::new()
            .path(dir.join("raft"))
            .flush_every_ms(None)
            .open()
            .map_err(io_err)?;
        let meta = db.open_tree("raft-meta").map_err(io_err)?;
        let (tx, rx) = std_mpsc::channel::<FlushReq>();
        let fdb = db.clone();
        let mut durable = Durable::new(&dir.join("raft"));
        std::thread::Builder::new()
            .name("warren-raft-wal".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    // sled's flush writes with sync_file_range only (no
                    // file size, no device cache flush): fdatasync the log
                    // file and fsync any blob files (large entries) too, so
                    // a confirm survives a power loss, not just a crash.
                    let res = fdb.flush().map_err(io_err).and_then(|_| durable.sync());
                    if let Err(e) = &res {
                        error!(
                            "the Raft write-ahead log could not be synced to disk ({e}); quorum queue writes are not confirmed. Check the data directory's disk"
                        );
                    }
                    for req in batch {
                        match req {
                            FlushReq::Append(cb) => cb.log_io_completed(match &res {
                                Ok(_) => Ok(()),
                                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                            }),
                            FlushReq::Sync(tx) => {
                                let _ = tx.send(match &res {
                                    Ok(_) => Ok(()),
                                    Err(e) => Err(e.to_string()),
                                });
                            }
                        }
                    }
                }
            })?;
        Ok(Arc::new(Wal {
            db,
            meta,
            flush: tx,
        }))
    }

    /// Syncs everything written so far.
    pub fn sync(&self) {
        if let Err(e) = self.db.flush() {
            error!("final sync of the Raft log failed: {e}");
        }
    }

    /// The log of one group.
    pub fn group(self: &Arc<Self>, group: &str) -> Result<LogStore, std::io::Error> {
        let tree = self.db.open_tree(format!("log/{group}")).map_err(io_err)?;
        Ok(LogStore {
            wal: self.clone(),
            tree,
            group: group.to_string(),
        })
    }

    /// Removes a group's log and marks (its queue was deleted).
    pub fn drop_group(&self, group: &str) {
        let _ = self.db.drop_tree(format!("log/{group}"));
        for k in ["vote", "committed", "purged"] {
            let _ = self.meta.remove(meta_key(group, k));
        }
    }

    /// Groups that have a log on this node.
    pub fn groups(&self) -> Vec<String> {
        self.db
            .tree_names()
            .into_iter()
            .filter_map(|n| {
                std::str::from_utf8(&n)
                    .ok()
                    .and_then(|s| s.strip_prefix("log/"))
                    .map(str::to_string)
            })
            .collect()
    }
}

/// What makes a sled flush durable: fdatasync of its log file, and fsync of
/// blob files written since the last sync (and of their directory).
struct Durable {
    dir: std::path::PathBuf,
    db: Option<std::fs::File>,
    synced_blobs: std::collections::HashSet<std::ffi::OsString>,
}

impl Durable {
    fn new(dir: &Path) -> Durable {
        Durable {
            dir: dir.to_path_buf(),
            db: std::fs::File::open(dir.join("db")).ok(),
            synced_blobs: Default::default(),
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        if self.db.is_none() {
            self.db = std::fs::File::open(self.dir.join("db")).ok();
        }
        if let Some(f) = &self.db {
            f.sync_data()?;
        }
        let blobs = self.dir.join("blobs");
        let Ok(rd) = std::fs::read_dir(&blobs) else {
            return Ok(());
        };
        let mut present = std::collections::HashSet::new();
        let mut new = false;
        for e in rd.flatten() {
            let name = e.file_name();
            if !self.synced_blobs.contains(&name) {
                match std::fs::File::open(e.path()) {
                    Ok(f) => f.sync_data()?,
                    // Removed by sled meanwhile (its entry was purged).
                    Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(err) => return Err(err),
                }
                new = true;
            }
            present.insert(name);
        }
        if new {
            std::fs::File::open(&blobs)?.sync_all()?;
        }
        self.synced_blobs = present;
        Ok(())
    }
}

fn meta_key(group: &str, what: &str) -> Vec<u8> {
    let mut k = group.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(what.as_bytes());
    k
}

/// One group's view of the shared log.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Wal>,
    tree: sled::Tree,
    group: String,
}

type SErr = StorageError<NodeId>;

fn read_err(e: impl std::fmt::Display) -> SErr {
    StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Read, io_err(e))
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, io_err(e))
}

impl LogStore {
    fn get_meta<T: serde::de::DeserializeOwned>(&self, what: &str) -> Result<Option<T>, SErr> {
        match self
            .wal
            .meta
            .get(meta_key(&self.group, what))
            .map_err(read_err)?
        {
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        what: &str,
        v: &T,
        sync: bool,
    ) -> Result<(), SErr> {
        let bytes = postcard::to_stdvec(v).map_err(write_err)?;
        self.wal
            .meta
            .insert(meta_key(&self.group, what), bytes)
            .map_err(write_err)?;
        if sync {
            let stopped = || write_err("the write-ahead log flusher has stopped");
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.wal
                .flush
                .send(FlushReq::Sync(tx))
                .map_err(|_| stopped())?;
            rx.await.map_err(|_| stopped())?.map_err(write_err)?;
        }
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        let start = match range.start_bound() {
            Bound::Included(s) => *s,
            Bound::Excluded(s) => s.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(e) => Some(e.saturating_add(1)),
            Bound::Excluded(e) => Some(*e),
            Bound::Unbounded => None,
        };
        let iter = match end {
            Some(e) => self.tree.range(start.to_be_bytes()..e.to_be_bytes()),
            None => self.tree.range(start.to_be_bytes()..),
        };
        let mut out = Vec::new();
        for kv in iter {
            let (_, v) = kv.map_err(read_err)?;
            out.push(postcard::from_bytes(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let last_purged: Option<LogId<NodeId>> = self.get_meta("purged")?;
        let last = match self.tree.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = postcard::from_bytes(&v).map_err(read_err)?;
                Some(e.log_id)
            }
            None => last_purged,
        };
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put_meta("vote", vote, true).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.get_meta("vote")
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not synced: after a crash openraft re-learns the commit index.
        self.put_meta("committed", &committed, false).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        Ok(self
            .get_meta::<Option<LogId<NodeId>>>("committed")?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let bytes = postcard::to_stdvec(&e).map_err(write_err)?;
            batch.insert(&e.log_id.index.to_be_bytes(), bytes);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        self.wal
            .flush
            .send(FlushReq::Append(callback))
            .map_err(|_| write_err("the write-ahead log flusher has stopped"))?;
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(log_id.index.to_be_bytes()..) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.put_meta("purged", &log_id, false).await?;
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(..=log_id.index.to_be_bytes()) {
            let (k, _) = kv.map_err(read_err)?;
            batch.remove(k);
        }
        self.tree.apply_batch(batch).map_err(write_err)?;
        Ok(())
    }
}
