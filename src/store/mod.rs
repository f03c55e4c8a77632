//! The storage layer: durable message bodies for classic queues
//! ([`MessageStore`]) and broker definitions ([`defs::Definitions`]).
//!
//! `store` knows bytes on disk and nothing about AMQP semantics: it never
//! decides what to deliver, never looks at properties, never talks to a
//! connection. Queue actors call it.
//!
//! # Files (`<data_dir>/msgs/`)
//!
//! | file | content |
//! |---|---|
//! | `00000000000000000001.seg` | append-only message records, numbered from 1; a new segment when `segment_size` would be exceeded, and on every open |
//! | `LOCK` | empty; `flock`ed by the writer thread while the store is open |
//! | `00000000000000000001.acks` | 17-byte records `u8 kind (1 ack, 2 delivered), u64 queue, u64 gid` for messages whose record is in segment 1 |
//!
//! A message record, all integers little-endian:
//!
//! ```text
//! u32 len  (bytes after the crc)      u32 crc32 (of those len bytes)
//! u8 kind = 1   u64 gid   u16 n_queues   n_queues × u64 queue id
//! u8 len + exchange   u8 len + routing key   u32 len + raw properties   u32 len + body
//! ```
//!
//! A message routed to N durable queues is one record naming N queues: its
//! body is stored once. Each (queue, gid) pair is a reference; an ack drops
//! one. A segment and its ack file are deleted as soon as no reference into
//! it is left and it is not the segment being written.
//!
//! # Durability contract
//!
//! - An append's completion runs with `Ok` only after its record has been
//!   written *and* `fdatasync`ed. Completions are group-committed: the writer
//!   thread writes every operation that queued up while the previous fsync
//!   ran, fsyncs once, then runs all their completions.
//! - Acks and delivered marks are written on every group commit but only
//!   fsynced by [`MessageStore::sync`] and [`MessageStore::close`]: a crash
//!   may lose some, which means redelivery (at-least-once), never loss.
//! - Recovery truncates a torn tail (bad length or CRC) and a torn ack record.
//!   Every open starts a new segment, so an ack record left over from a
//!   message lost in a crash can never match a later message with the same
//!   gid (acks apply only to records of their own segment).
//!
//! # Threads
//!
//! One OS thread, `warren-store-writer`, owns the file handles that append
//! and everything that mutates the index. [`MessageStore::read`] is a
//! positioned read callable from any thread; it takes a per-segment read
//! lock only to look the offset up, never while doing I/O.

pub mod defs;
mod recovery;
mod segment;
mod writer;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use segment::Segment;
use writer::Op;

/// Global message id, assigned by the broker from one counter; unique across
/// queues and restarts (continue from [`Recovery::max_gid`] + 1).
pub type Gid = u64;
/// Durable queue id, assigned by the broker (see [`defs::Definitions::next_id`]).
pub type QueueId = u64;

/// What the store keeps of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageParts {
    /// Exchange it was published to (at most 255 bytes).
    pub exchange: Bytes,
    /// Routing key (at most 255 bytes).
    pub routing_key: Bytes,
    /// Content-header properties in wire form.
    pub raw_properties: Bytes,
    /// The body.
    pub body: Bytes,
}

/// Called once, on the writer thread, when an append is durable (`Ok`) or
/// failed. It must be quick and must not block: send on a channel.
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Tunables for [`MessageStore::open`].
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Roll to a new segment file past this many bytes (clamped to 1..=2 GiB).
    pub segment_size: u64,
    /// Operations that may wait for the writer thread before `append`/`ack`
    /// wait for room: the store's backpressure.
    pub channel_capacity: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            segment_size: 64 << 20,
            channel_capacity: 4096,
        }
    }
}

/// One message of a queue found on disk at open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecoveredMessage {
    /// Its gid, to [`MessageStore::read`] it.
    pub gid: Gid,
    /// It had been delivered to a consumer before the restart, so the next
    /// delivery must carry redelivered=true.
    pub delivered: bool,
    /// Body size in bytes.
    pub size: u32,
}

/// What [`MessageStore::open`] found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Unacked messages per queue, ascending gid (publish order).
    pub queues: HashMap<QueueId, Vec<RecoveredMessage>>,
    /// Largest gid seen on disk (acked or not); 0 if none.
    pub max_gid: Gid,
    /// Stored messages with at least one live reference.
    pub messages: u64,
    /// Sum of their body sizes.
    pub bytes: u64,
}

/// Counters for metrics and tests.
#[derive(Clone, Debug, Default)]
pub struct StoreStats {
    /// Segment files on disk.
    pub segments: u64,
    /// Bytes of segment and ack files.
    pub bytes_on_disk: u64,
    /// Live (queue, message) references.
    pub live_refs: u64,
    /// fdatasync calls on segment files (one per group commit).
    pub fsyncs: u64,
    /// Latency of the last one, µs.
    pub last_fsync_us: u64,
    /// Mean latency, µs.
    pub avg_fsync_us: u64,
    /// Heap bytes of the in-memory index.
    pub index_bytes: u64,
}

/// Why a store operation failed. Each message says what failed, where, and
/// what an operator can do about it.
#[derive(Debug, thiserror::Error, Clone)]
#[non_exhaustive]
pub enum StoreError {
    /// A system call failed.
    #[error(
        "message store: {op} {path} failed: {source} (check free disk space and permissions on the data directory)"
    )]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The OS error.
        source: Arc<io::Error>,
    },
    /// Bytes on disk are not what the store wrote.
    #[error(
        "message store: {path} is corrupt at byte {offset}: {detail} (restore the file from a backup or move it away to drop its messages)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        detail: String,
    },
    /// No live message with this gid (never stored, acked by every queue, or
    /// its append has not completed yet).
    #[error("message store: message {0} not found")]
    NotFound(Gid),
    /// The append cannot be represented (empty queue list, names too long).
    #[error("message store: invalid message: {0}")]
    Invalid(String),
    /// A write failed and could not be undone, so the store refuses further
    /// writes until the broker restarts (which recovers a consistent state).
    #[error(
        "message store stopped accepting writes after an error it could not undo: {0}; restart the broker"
    )]
    Failed(String),
    /// Another store (in this or another process) has the directory open.
    #[error(
        "message store directory {0} is in use by another warren process; stop it, or point this one at another data directory"
    )]
    InUse(PathBuf),
    /// The store was closed, or its writer thread stopped.
    #[error("message store is closed")]
    Closed,
    /// The definitions database (sled) failed.
    #[error("definitions store: {0} (check free disk space and permissions on <data_dir>/defs)")]
    Defs(String),
}

impl StoreError {
    pub(crate) fn io(op: &'static str, path: &Path, e: io::Error) -> Self {
        StoreError::Io {
            op,
            path: path.to_path_buf(),
            source: Arc::new(e),
        }
    }
}

/// State shared by handles, readers and the writer thread.
pub(crate) struct Shared {
    /// `<data_dir>/msgs`.
    pub(crate) dir: PathBuf,
    /// Number for the first segment this run creates (above any seen on disk).
    pub(crate) next_no: u64,
    /// Segments ordered by number; the last is the active one.
    segments: RwLock<Vec<Arc<Segment>>>,
    pub(crate) live_refs: AtomicU64,
    pub(crate) fsyncs: AtomicU64,
    pub(crate) fsync_total_us: AtomicU64,
    pub(crate) last_fsync_us: AtomicU64,
    /// Test hook: fail this many upcoming segment writes halfway through.
    #[cfg(test)]
    pub(crate) fail_writes: std::sync::atomic::AtomicU32,
}

impl Shared {
    pub(crate) fn segments(&self) -> RwLockReadGuard<'_, Vec<Arc<Segment>>> {
        self.segments.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn segments_mut(&self) -> RwLockWriteGuard<'_, Vec<Arc<Segment>>> {
        self.segments.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The segment holding a live `gid`. Segments are ordered by number and
    /// their gid ranges mostly ascend, but gids arrive only nearly in order,
    /// so ranges may overlap and the minimums are not monotonic. Look near
    /// the binary-search hint first (almost always a hit), then everywhere.
    pub(crate) fn find(&self, gid: Gid) -> Option<(Arc<Segment>, u32)> {
        let segs = self.segments();
        let hint = segs.partition_point(|s| s.min_gid() <= gid);
        let near = hint.saturating_sub(2)..(hint + 1).min(segs.len());
        let lookup = |s: &Arc<Segment>| {
            if !s.may_contain(gid) {
                return None;
            }
            let off = s.index().offset_of(gid)?;
            Some((Arc::clone(s), off))
        };
        segs[near.clone()]
            .iter()
            .rev()
            .find_map(lookup)
            .or_else(|| {
                segs.iter()
                    .enumerate()
                    .rev()
                    .filter(|(i, _)| !near.contains(i))
                    .find_map(|(_, s)| lookup(s))
            })
    }
}

/// Handle to the message store; cheap to clone. The writer thread stops
/// when [`close`](Self::close) is called or every handle is dropped (after
/// writing and syncing what was queued).
#[derive(Clone)]
pub struct MessageStore {
    shared: Arc<Shared>,
    tx: mpsc::Sender<Op>,
}

impl MessageStore {
    /// Opens (or creates) the store under `<data_dir>/msgs`: scans every
    /// segment, truncates torn tails, rebuilds the index, deletes fully
    /// acked segments, starts a new active segment and the writer thread.
    pub fn open(
        data_dir: &Path,
        opts: StoreOptions,
    ) -> Result<(MessageStore, Recovery), StoreError> {
        let dir = data_dir.join("msgs");
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::io("create directory", &dir, e))?;
        // Held by the writer thread until it stops: two stores appending to
        // one directory would interleave records.
        let lock_path = dir.join("LOCK");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError::io("open", &lock_path, e))?;
        // Retry briefly: a store closing in this process, or a child being
        // spawned (it holds a copy of every fd until it execs), may hold the
        // lock for a moment.
        let mut tries = 0;
        loop {
            match lock.try_lock() {
                Ok(()) => break,
                Err(std::fs::TryLockError::WouldBlock) if tries < 100 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(std::fs::TryLockError::WouldBlock) => return Err(StoreError::InUse(dir)),
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(StoreError::io("lock", &lock_path, e));
                }
            }
        }
        let (segments, recovery, next_no) = recovery::recover(&dir)?;
        let shared = Arc::new(Shared {
            dir,
            next_no,
            segments: RwLock::new(segments),
            live_refs: AtomicU64::new(0),
            fsyncs: AtomicU64::new(0),
            fsync_total_us: AtomicU64::new(0),
            last_fsync_us: AtomicU64::new(0),
            #[cfg(test)]
            fail_writes: std::sync::atomic::AtomicU32::new(0),
        });
        let live: u64 = shared.segments().iter().map(|s| s.index().live_refs).sum();
        shared.live_refs.store(live, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(opts.channel_capacity.max(1));
        writer::spawn(Arc::clone(&shared), rx, &opts, lock)?;
        Ok((MessageStore { shared, tx }, recovery))
    }

    /// Queues a message stored once for every queue in `queues`. Returns once
    /// queued (waiting only for channel capacity); `done` runs when the
    /// record is durable or failed. If this returns `Err`, nothing was queued
    /// and `done` is dropped without being called.
    pub async fn append(
        &self,
        gid: Gid,
        mut queues: Vec<QueueId>,
        parts: MessageParts,
        done: Option<Completion>,
    ) -> Result<(), StoreError> {
        queues.sort_unstable();
        queues.dedup();
        segment::validate(&queues, &parts)?;
        self.send(Op::Append {
            gid,
            queues,
            parts,
            done: writer::Done::new(done),
        })
        .await
    }

    /// The queue settled these messages: drop its references. Not fsynced
    /// until the next [`sync`](Self::sync); a lost ack means redelivery.
    /// Acking a (queue, gid) twice, or one that was never stored, is
    /// ignored if the message has no reference left, but acking for a queue
    /// that was not in its `append` is a caller bug the store cannot see.
    pub async fn ack(&self, queue: QueueId, gids: Vec<Gid>) -> Result<(), StoreError> {
        self.send(Op::Ack { queue, gids }).await
    }

    /// These messages went to a consumer: after a restart they are recovered
    /// with `delivered = true`. Best effort, like acks.
    pub async fn delivered(&self, queue: QueueId, gids: Vec<Gid>) -> Result<(), StoreError> {
        self.send(Op::Delivered { queue, gids }).await
    }

    /// The queue was deleted or purged: drop its references to `gids`.
    pub async fn drop_queue(&self, queue: QueueId, gids: Vec<Gid>) -> Result<(), StoreError> {
        self.send(Op::Ack { queue, gids }).await
    }

    /// Reads a live message back (the paging path). A blocking positioned
    /// read: from async code call it from `spawn_blocking` when the data may
    /// not be in the page cache.
    pub fn read(&self, gid: Gid) -> Result<MessageParts, StoreError> {
        let (seg, offset) = self.shared.find(gid).ok_or(StoreError::NotFound(gid))?;
        seg.read_at(gid, offset)
    }

    /// True once the message's record is written (readable with
    /// [`read`](Self::read)): a queue may then drop the body from memory.
    pub fn contains(&self, gid: Gid) -> bool {
        self.shared.find(gid).is_some()
    }

    /// Resolves once everything queued before it is durable, acks and
    /// delivered marks included.
    pub async fn sync(&self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Sync(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    /// Counters; cheap (a few atomics and one read lock per segment).
    pub fn stats(&self) -> StoreStats {
        let segs = self.shared.segments();
        let fsyncs = self.shared.fsyncs.load(Ordering::Relaxed);
        StoreStats {
            segments: segs.len() as u64,
            bytes_on_disk: segs
                .iter()
                .map(|s| s.seg_bytes.load(Ordering::Relaxed) + s.ack_bytes.load(Ordering::Relaxed))
                .sum(),
            live_refs: self.shared.live_refs.load(Ordering::Relaxed),
            fsyncs,
            last_fsync_us: self.shared.last_fsync_us.load(Ordering::Relaxed),
            avg_fsync_us: self
                .shared
                .fsync_total_us
                .load(Ordering::Relaxed)
                .checked_div(fsyncs)
                .unwrap_or(0),
            index_bytes: segs.iter().map(|s| s.index().heap_bytes() as u64).sum(),
        }
    }

    /// Syncs everything and stops the writer thread. Other handles get
    /// [`StoreError::Closed`] afterwards.
    pub async fn close(self) -> Result<(), StoreError> {
        let (tx, rx) = oneshot::channel();
        self.send(Op::Close(tx)).await?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|e| {
            e.0.forget();
            StoreError::Closed
        })
    }

    #[cfg(test)]
    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}
