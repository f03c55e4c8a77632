//! The Raft log of every group on this node, in one shared write-ahead log
//! with group commit.
//!
//! All groups append to the same sequence of files (`raft-wal/NNNNNNNN.wal`
//! under the data directory). One writer thread owns the files: it takes
//! every record that is waiting (entries, votes, truncations, purge marks
//! of any group), writes them with one `write`, runs one `fdatasync`, and
//! only then reports the appends durable to openraft — so a thousand
//! quorum queues written at once share fsyncs the way RabbitMQ's Ra WAL
//! does, and every byte is written once, sequentially.
//!
//! Each group keeps an in-memory index (log index → where the entry is:
//! still in memory while its record waits for the writer, then a file
//! offset), read back with `pread` (normally from the page cache).
//!
//! Files rotate at [`FILE_BYTES`]. Every file starts with a checkpoint of
//! every group's vote, commit and purge marks and last index, so a file
//! can be deleted as soon as no group's log references an entry in it
//! (entries are released by purges after snapshots, truncations and
//! deleted queues): disk space follows the live log. Recovery reads the
//! files in order and rebuilds the indexes; a torn record at the end (a
//! crash mid-write) ends the log there.

use super::types::{NodeId, TypeConfig};
use dashmap::DashMap;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{Entry, ErrorSubject, ErrorVerb, LogId, RaftLogReader, StorageError, Vote};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::File;
use std::io::Write;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex, RwLock};
use tracing::{error, info, warn};

/// A file is closed and a new one started past this size.
pub const FILE_BYTES: u64 = 64 << 20;

/// Record kinds (the byte after the header).
const K_ENTRY: u8 = 1;
const K_META: u8 = 2;
const K_CHECKPOINT: u8 = 3;

/// Record header: payload length (u32 LE) + CRC-32 of the payload.
const HEADER: usize = 8;

/// At each rotation, closed files still referenced by at most this many
/// entries have those entries copied into the new file, so a few
/// long-lived entries (the metadata group's, a quorum queue's oldest
/// message) do not keep whole files on disk.
const RELOCATE_MAX: i64 = 4096;

/// Where an entry is.
#[derive(Debug, Clone)]
enum Loc {
    /// Appended, its record not written yet.
    Mem(Arc<Vec<u8>>),
    /// In file `file` at `off`, `len` bytes (postcard of the entry).
    Disk { file: u32, off: u64, len: u32 },
}

/// One group's log state, owned by its [`LogStore`] (and updated by the
/// writer thread when entries reach disk).
#[derive(Debug, Default)]
struct GroupLog {
    entries: BTreeMap<u64, Loc>,
    /// postcard-encoded vote, commit and purge marks.
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<Vec<u8>>,
    /// Entries from this index on are kept when the log is purged (a
    /// quorum queue's snapshot refers to message bodies in them); 0 keeps
    /// every entry. Set by the group's state machine after each snapshot.
    retain: u64,
}

/// Non-entry records: marks and log surgery.
#[derive(Debug, Serialize, Deserialize)]
enum Meta {
    Vote(String, Vec<u8>),
    Committed(String, Vec<u8>),
    /// Purge mark (encoded LogId) and the index below which entries are
    /// gone (lower than the mark while bodies there are still referenced).
    Purge(String, Vec<u8>, u64),
    /// Entries from this index on are gone.
    Truncate(String, u64),
    /// The group's log is gone (its queue was deleted).
    Drop(String),
}

/// One group in a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct CkGroup {
    group: String,
    vote: Option<Vec<u8>>,
    committed: Option<Vec<u8>>,
    purged: Option<Vec<u8>>,
    /// The entries are those from `first` to `last` (None: no entries).
    first: Option<u64>,
    last: Option<u64>,
}

/// The open files, for readers.
#[derive(Default)]
struct Files {
    open: RwLock<BTreeMap<u32, Arc<File>>>,
    /// Live entries referencing each file.
    refs: Mutex<BTreeMap<u32, i64>>,
}

impl Files {
    fn release(&self, locs: impl IntoIterator<Item = Loc>) {
        let mut refs = None;
        for l in locs {
            if let Loc::Disk { file, .. } = l {
                let r =
                    refs.get_or_insert_with(|| self.refs.lock().unwrap_or_else(|p| p.into_inner()));
                *r.entry(file).or_insert(0) -= 1;
            }
        }
    }

    fn file(&self, n: u32) -> Option<Arc<File>> {
        self.open
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&n)
            .cloned()
    }
}

/// Work for the writer thread.
enum Job {
    /// Entries of one group, reported durable to openraft after the sync.
    Append {
        group: Arc<str>,
        log: Arc<Mutex<GroupLog>>,
        entries: Vec<(u64, Arc<Vec<u8>>)>,
        cb: LogFlushed<TypeConfig>,
        /// Entries these replace (released once the new ones are on disk).
        replaced: Vec<Loc>,
    },
    /// A mark or surgery record; `done` hears when it is on disk. The
    /// entries it removes are released (their files may go) only once the
    /// record is on disk, so recovery never finds them without it.
    Meta(
        Meta,
        Option<tokio::sync::oneshot::Sender<Result<(), String>>>,
        Vec<Loc>,
    ),
    /// Everything so far on disk (shutdown).
    Sync(std_mpsc::Sender<()>),
}

/// The shared write-ahead log.
pub struct Wal {
    groups: DashMap<String, Arc<Mutex<GroupLog>>>,
    files: Arc<Files>,
    tx: std_mpsc::Sender<Job>,
}

impl std::fmt::Debug for Wal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wal").finish_non_exhaustive()
    }
}

fn io_err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(e.to_string())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn file_name(dir: &Path, n: u32) -> PathBuf {
    dir.join(format!("{n:08}.wal"))
}

/// Frames a record: header, kind, body.
fn frame(out: &mut Vec<u8>, kind: u8, parts: &[&[u8]]) -> usize {
    let len: usize = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    let start = out.len();
    out.extend_from_slice(&(len as u32).to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.push(kind);
    for p in parts {
        out.extend_from_slice(p);
    }
    let crc = crc32fast::hash(&out[start + HEADER..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    start
}

/// Entry record body: group length (u16 LE), group, index (u64 LE), data.
/// Returns the offset of the data within `out`.
fn frame_entry(out: &mut Vec<u8>, group: &str, index: u64, data: &[u8]) -> usize {
    let glen = (group.len() as u16).to_le_bytes();
    let start = frame(
        out,
        K_ENTRY,
        &[&glen, group.as_bytes(), &index.to_le_bytes(), data],
    );
    start + HEADER + 1 + 2 + group.len() + 8
}

/// The writer thread's state.
struct Writer {
    dir: PathBuf,
    files: Arc<Files>,
    groups: DashMap<String, Arc<Mutex<GroupLog>>>,
    current: u32,
    file: File,
    pos: u64,
    /// Rotation size.
    max: u64,
}

impl Writer {
    fn run(mut self, rx: std_mpsc::Receiver<Job>) {
        self.reclaim();
        let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
        while let Ok(first) = rx.recv() {
            let mut batch = vec![first];
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
                if batch.len() >= 4096 {
                    break;
                }
            }
            buf.clear();
            // (log, index, the bytes it had, offset in buf, len)
            let mut placed: Vec<(Arc<Mutex<GroupLog>>, u64, Arc<Vec<u8>>, usize)> = Vec::new();
            let mut released = false;
            for job in &batch {
                match job {
                    Job::Append {
                        group,
                        log,
                        entries,
                        ..
                    } => {
                        for (index, data) in entries {
                            let at = frame_entry(&mut buf, group, *index, data);
                            placed.push((log.clone(), *index, data.clone(), at));
                        }
                    }
                    Job::Meta(m, _, _) => {
                        released |=
                            matches!(m, Meta::Purge(..) | Meta::Truncate(..) | Meta::Drop(_));
                        match postcard::to_stdvec(m) {
                            Ok(b) => {
                                frame(&mut buf, K_META, &[&b]);
                            }
                            Err(e) => error!("cannot encode a Raft log record: {e}"),
                        }
                    }
                    Job::Sync(_) => {}
                }
            }
            let base = self.pos;
            let res = self.write(&buf);
            if let Err(e) = &res {
                error!(
                    "the Raft write-ahead log could not be written to disk ({e}); quorum queue writes are not confirmed. Check the data directory's disk"
                );
            }
            if res.is_ok() && !placed.is_empty() {
                let mut added = 0i64;
                for (log, index, data, at) in placed {
                    let mut g = lock(&log);
                    if let Some(l) = g.entries.get_mut(&index)
                        && matches!(l, Loc::Mem(d) if Arc::ptr_eq(d, &data))
                    {
                        *l = Loc::Disk {
                            file: self.current,
                            off: base + at as u64,
                            len: data.len() as u32,
                        };
                        added += 1;
                    }
                }
                *lock(&self.files.refs).entry(self.current).or_insert(0) += added;
            }
            for job in batch {
                match job {
                    Job::Append { cb, replaced, .. } => {
                        if res.is_ok() {
                            released |= !replaced.is_empty();
                            self.files.release(replaced);
                        }
                        cb.log_io_completed(match &res {
                            Ok(()) => Ok(()),
                            Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
                        })
                    }
                    Job::Meta(_, done, gone) => {
                        if res.is_ok() {
                            self.files.release(gone);
                        }
                        if let Some(tx) = done {
                            let _ = tx.send(res.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                        }
                    }
                    Job::Sync(tx) => {
                        let _ = tx.send(());
                    }
                }
            }
            if self.pos >= self.max {
                if let Err(e) = self.rotate() {
                    error!(
                        "cannot start a new Raft write-ahead log file in {} ({e}); writing on in the current one",
                        self.dir.display()
                    );
                } else if let Err(e) = self.relocate() {
                    warn!(
                        "cannot copy live Raft log entries out of old files in {} ({e}); those files stay until their entries are released",
                        self.dir.display()
                    );
                }
                released = true;
            }
            if released {
                self.reclaim();
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> std::io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        self.file.write_all(buf)?;
        self.pos += buf.len() as u64;
        self.file.sync_data()
    }

    /// Closes the current file and starts the next one with a checkpoint.
    fn rotate(&mut self) -> std::io::Result<()> {
        let next = self.current + 1;
        let path = file_name(&self.dir, next);
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        let mut buf = Vec::new();
        frame(&mut buf, K_CHECKPOINT, &[&checkpoint(&self.groups)?]);
        f.write_all(&buf)?;
        f.sync_data()?;
        File::open(&self.dir)?.sync_all()?;
        self.files
            .open
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(next, Arc::new(f.try_clone()?));
        self.file = f;
        self.current = next;
        self.pos = buf.len() as u64;
        Ok(())
    }

    /// Copies the live entries of sparsely used closed files into the
    /// current one (see [`RELOCATE_MAX`]); those files can then go.
    fn relocate(&mut self) -> std::io::Result<()> {
        let sparse: Vec<u32> = lock(&self.files.refs)
            .iter()
            .filter(|(n, r)| **n < self.current && **r > 0 && **r <= RELOCATE_MAX)
            .map(|(n, _)| *n)
            .collect();
        if sparse.is_empty() {
            return Ok(());
        }
        type Move = (String, Arc<Mutex<GroupLog>>, u64, u32, u64, u32);
        let mut moves: Vec<Move> = Vec::new();
        for kv in self.groups.iter() {
            let g = lock(kv.value());
            for (index, loc) in &g.entries {
                if let Loc::Disk { file, off, len } = loc
                    && sparse.contains(file)
                {
                    moves.push((
                        kv.key().clone(),
                        kv.value().clone(),
                        *index,
                        *file,
                        *off,
                        *len,
                    ));
                }
            }
        }
        let mut buf = Vec::new();
        let mut placed = Vec::with_capacity(moves.len());
        for (group, log, index, file, off, len) in moves {
            let Some(f) = self.files.file(file) else {
                continue;
            };
            let mut data = vec![0u8; len as usize];
            f.read_exact_at(&mut data, off)?;
            let at = frame_entry(&mut buf, &group, index, &data);
            placed.push((log, index, file, off, at, len));
        }
        let base = self.pos;
        self.write(&buf)?;
        // Only entries still where they were move (one may have been
        // purged or truncated meanwhile: its copy is then never used).
        let mut moved: BTreeMap<u32, i64> = BTreeMap::new();
        let mut added = 0;
        for (log, index, file, off, at, len) in placed {
            let mut g = lock(&log);
            if let Some(l) = g.entries.get_mut(&index)
                && matches!(l, Loc::Disk { file: f, off: o, .. } if *f == file && *o == off)
            {
                *l = Loc::Disk {
                    file: self.current,
                    off: base + at as u64,
                    len,
                };
                *moved.entry(file).or_insert(0) += 1;
                added += 1;
            }
        }
        let mut refs = lock(&self.files.refs);
        *refs.entry(self.current).or_insert(0) += added;
        for (f, n) in moved {
            *refs.entry(f).or_insert(0) -= n;
        }
        Ok(())
    }

    /// Deletes closed files no live entry references.
    fn reclaim(&mut self) {
        let dead: Vec<u32> = {
            let refs = lock(&self.files.refs);
            let open = self.files.open.read().unwrap_or_else(|p| p.into_inner());
            open.keys()
                .copied()
                .filter(|n| *n < self.current && refs.get(n).copied().unwrap_or(0) <= 0)
                .collect()
        };
        for n in dead {
            self.files
                .open
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&n);
            lock(&self.files.refs).remove(&n);
            if let Err(e) = std::fs::remove_file(file_name(&self.dir, n)) {
                warn!("cannot delete the old Raft log file {n:08}.wal ({e})");
            }
        }
    }
}

/// Every group's marks and last index, encoded.
fn checkpoint(groups: &DashMap<String, Arc<Mutex<GroupLog>>>) -> std::io::Result<Vec<u8>> {
    let list: Vec<CkGroup> = groups
        .iter()
        .map(|kv| {
            let g = lock(kv.value());
            CkGroup {
                group: kv.key().clone(),
                vote: g.vote.clone(),
                committed: g.committed.clone(),
                purged: g.purged.clone(),
                first: g.entries.keys().next().copied(),
                last: g.entries.keys().next_back().copied(),
            }
        })
        .collect();
    postcard::to_stdvec(&list).map_err(io_err)
}

/// Rebuilds the groups from the files, in order. Returns the last file's
/// number and its valid length.
fn recover(
    dir: &Path,
    groups: &mut BTreeMap<String, GroupLog>,
    files: &Files,
) -> std::io::Result<Option<(u32, u64)>> {
    let mut nums: Vec<u32> = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name();
            let s = name.to_str()?;
            s.strip_suffix(".wal")?.parse().ok()
        })
        .collect();
    nums.sort_unstable();
    let mut last = None;
    let mut refs: BTreeMap<u32, i64> = BTreeMap::new();
    for n in nums {
        let path = file_name(dir, n);
        let data = std::fs::read(&path)?;
        let mut at = 0usize;
        while at + HEADER <= data.len() {
            let len =
                u32::from_le_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]]) as usize;
            let crc = u32::from_le_bytes([data[at + 4], data[at + 5], data[at + 6], data[at + 7]]);
            let body_at = at + HEADER;
            if len == 0 || body_at + len > data.len() {
                break;
            }
            let body = &data[body_at..body_at + len];
            if crc32fast::hash(body) != crc {
                break;
            }
            apply_record(n, body_at as u64, body, groups)?;
            at = body_at + len;
        }
        if at < data.len() {
            warn!(
                "the Raft log file {} ends in an incomplete record at byte {at} (a crash during a write); the log ends there",
                path.display()
            );
            let f = std::fs::OpenOptions::new().write(true).open(&path)?;
            f.set_len(at as u64)?;
            f.sync_all()?;
        }
        files
            .open
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                n,
                Arc::new(
                    std::fs::OpenOptions::new()
                        .read(true)
                        .write(true)
                        .open(&path)?,
                ),
            );
        refs.insert(n, 0);
        last = Some((n, at as u64));
    }
    for g in groups.values() {
        for l in g.entries.values() {
            if let Loc::Disk { file, .. } = l {
                *refs.entry(*file).or_insert(0) += 1;
            }
        }
    }
    *lock(&files.refs) = refs;
    Ok(last)
}

fn apply_record(
    file: u32,
    body_at: u64,
    body: &[u8],
    groups: &mut BTreeMap<String, GroupLog>,
) -> std::io::Result<()> {
    let bad = || io_err("malformed record");
    match body[0] {
        K_ENTRY => {
            let glen =
                u16::from_le_bytes([*body.get(1).ok_or_else(bad)?, *body.get(2).ok_or_else(bad)?])
                    as usize;
            let gend = 3 + glen;
            let group = std::str::from_utf8(body.get(3..gend).ok_or_else(bad)?).map_err(io_err)?;
            let ix: [u8; 8] = body
                .get(gend..gend + 8)
                .ok_or_else(bad)?
                .try_into()
                .map_err(io_err)?;
            let index = u64::from_le_bytes(ix);
            let data_at = gend + 8;
            let g = groups.entry(group.to_string()).or_default();
            g.entries.insert(
                index,
                Loc::Disk {
                    file,
                    off: body_at + data_at as u64,
                    len: (body.len() - data_at) as u32,
                },
            );
        }
        K_META => match postcard::from_bytes::<Meta>(&body[1..]).map_err(io_err)? {
            Meta::Vote(g, v) => groups.entry(g).or_default().vote = Some(v),
            Meta::Committed(g, v) => groups.entry(g).or_default().committed = Some(v),
            Meta::Purge(g, v, below) => {
                let g = groups.entry(g).or_default();
                g.purged = Some(v);
                g.entries = g.entries.split_off(&below);
            }
            Meta::Truncate(g, from) => {
                if let Some(g) = groups.get_mut(&g) {
                    g.entries.split_off(&from);
                }
            }
            Meta::Drop(g) => {
                groups.remove(&g);
            }
        },
        K_CHECKPOINT => {
            let list: Vec<CkGroup> = postcard::from_bytes(&body[1..]).map_err(io_err)?;
            let mut next = BTreeMap::new();
            for c in list {
                let mut g = groups.remove(&c.group).unwrap_or_default();
                g.vote = c.vote;
                g.committed = c.committed;
                g.purged = c.purged;
                match (c.first, c.last) {
                    (Some(f), Some(l)) => {
                        g.entries = g.entries.split_off(&f);
                        g.entries.split_off(&(l.saturating_add(1)));
                    }
                    _ => g.entries.clear(),
                }
                next.insert(c.group, g);
            }
            // Groups the checkpoint does not list were dropped.
            *groups = next;
        }
        k => return Err(io_err(format!("unknown record kind {k}"))),
    }
    Ok(())
}

impl Wal {
    /// Opens (or creates) the log under `dir/raft-wal`, recovering what is
    /// there.
    pub fn open(dir: &Path) -> Result<Arc<Wal>, std::io::Error> {
        Wal::open_with(dir, FILE_BYTES)
    }

    /// [`Wal::open`] with another file size.
    fn open_with(dir: &Path, max: u64) -> Result<Arc<Wal>, std::io::Error> {
        let wdir = dir.join("raft-wal");
        std::fs::create_dir_all(&wdir)?;
        let files = Arc::new(Files::default());
        let mut rec = BTreeMap::new();
        let last = recover(&wdir, &mut rec, &files)?;
        let groups: DashMap<String, Arc<Mutex<GroupLog>>> = rec
            .into_iter()
            .map(|(k, v)| (k, Arc::new(Mutex::new(v))))
            .collect();
        let (current, file, pos) = match last {
            Some((n, len)) => {
                let mut f = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(file_name(&wdir, n))?;
                std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(len))?;
                (n, f, len)
            }
            None => {
                let path = file_name(&wdir, 1);
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(true)
                    .read(true)
                    .write(true)
                    .open(&path)?;
                let mut buf = Vec::new();
                frame(&mut buf, K_CHECKPOINT, &[&checkpoint(&groups)?]);
                f.write_all(&buf)?;
                f.sync_data()?;
                File::open(&wdir)?.sync_all()?;
                files
                    .open
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(1, Arc::new(f.try_clone()?));
                (1, f, buf.len() as u64)
            }
        };
        if last.is_some() {
            info!(
                groups = groups.len(),
                "Raft log recovered from {}",
                wdir.display()
            );
        }
        let (tx, rx) = std_mpsc::channel::<Job>();
        let writer = Writer {
            dir: wdir,
            files: files.clone(),
            groups: groups.clone(),
            current,
            file,
            pos,
            max,
        };
        std::thread::Builder::new()
            .name("warren-raft-wal".into())
            .spawn(move || writer.run(rx))?;
        Ok(Arc::new(Wal { groups, files, tx }))
    }

    /// Waits until everything written so far is on disk.
    pub fn sync(&self) {
        let (tx, rx) = std_mpsc::channel();
        if self.tx.send(Job::Sync(tx)).is_ok() {
            let _ = rx.recv();
        }
    }

    /// The log of one group.
    pub fn group(self: &Arc<Self>, group: &str) -> Result<LogStore, std::io::Error> {
        let log = self
            .groups
            .entry(group.to_string())
            .or_insert_with(|| Arc::new(Mutex::new(GroupLog::default())))
            .clone();
        Ok(LogStore {
            wal: self.clone(),
            log,
            group: group.into(),
        })
    }

    /// Removes a group's log and marks (its queue was deleted).
    pub fn drop_group(&self, group: &str) {
        let gone = match self.groups.remove(group) {
            Some((_, log)) => std::mem::take(&mut lock(&log).entries)
                .into_values()
                .collect(),
            None => Vec::new(),
        };
        let _ = self
            .tx
            .send(Job::Meta(Meta::Drop(group.to_string()), None, gone));
    }

    /// Groups that have a log on this node.
    pub fn groups(&self) -> Vec<String> {
        self.groups.iter().map(|kv| kv.key().clone()).collect()
    }
}

/// One group's view of the shared log.
#[derive(Clone)]
pub struct LogStore {
    wal: Arc<Wal>,
    log: Arc<Mutex<GroupLog>>,
    group: Arc<str>,
}

type SErr = StorageError<NodeId>;

fn read_err(e: impl std::fmt::Display) -> SErr {
    StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Read, io_err(e))
}

fn write_err(e: impl std::fmt::Display) -> SErr {
    StorageError::from_io_error(ErrorSubject::Logs, ErrorVerb::Write, io_err(e))
}

fn stopped() -> SErr {
    write_err("the write-ahead log writer has stopped")
}

impl LogStore {
    /// Reads one entry's bytes.
    fn load(&self, loc: &Loc) -> Result<Entry<TypeConfig>, SErr> {
        match loc {
            Loc::Mem(d) => postcard::from_bytes(d).map_err(read_err),
            Loc::Disk { file, off, len } => {
                let f = self
                    .wal
                    .files
                    .file(*file)
                    .ok_or_else(|| read_err(format!("Raft log file {file:08}.wal is gone")))?;
                let mut buf = vec![0u8; *len as usize];
                f.read_exact_at(&mut buf, *off).map_err(read_err)?;
                postcard::from_bytes(&buf).map_err(read_err)
            }
        }
    }

    /// Keeps entries from `index` on when the log is purged (see
    /// [`GroupLog::retain`]); earlier ones may go at the next purge.
    pub fn set_retain(&self, index: u64) {
        lock(&self.log).retain = index;
    }

    /// The entry at `index`, if this node still has it (including entries
    /// kept below the purge mark for their message bodies).
    pub fn entry_at(&self, index: u64) -> Option<Entry<TypeConfig>> {
        let loc = lock(&self.log).entries.get(&index).cloned()?;
        match self.load(&loc) {
            Ok(e) => Some(e),
            Err(e) => {
                error!(group = %self.group, index, "cannot read a Raft log entry back ({e})");
                None
            }
        }
    }

    async fn send_meta(&self, m: Meta, sync: bool, gone: Vec<Loc>) -> Result<(), SErr> {
        if !sync {
            return self
                .wal
                .tx
                .send(Job::Meta(m, None, gone))
                .map_err(|_| stopped());
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.wal
            .tx
            .send(Job::Meta(m, Some(tx), gone))
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?.map_err(write_err)
    }
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("group", &self.group)
            .finish_non_exhaustive()
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
            Bound::Included(e) => e.saturating_add(1),
            Bound::Excluded(e) => *e,
            Bound::Unbounded => u64::MAX,
        };
        if start >= end {
            return Ok(Vec::new());
        }
        let locs: Vec<Loc> = lock(&self.log)
            .entries
            .range(start..end)
            .map(|(_, l)| l.clone())
            .collect();
        locs.iter().map(|l| self.load(l)).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let (purged, last) = {
            let g = lock(&self.log);
            (
                g.purged.clone(),
                g.entries.last_key_value().map(|(_, l)| l.clone()),
            )
        };
        let last_purged: Option<LogId<NodeId>> = match purged {
            Some(p) => Some(postcard::from_bytes(&p).map_err(read_err)?),
            None => None,
        };
        let last = match last {
            Some(l) => Some(self.load(&l)?.log_id),
            None => last_purged,
        };
        // Entries kept below the purge mark (still referenced) are not
        // part of the log as openraft sees it.
        let last = match (last, last_purged) {
            (Some(l), Some(p)) if l.index < p.index => Some(p),
            (l, _) => l,
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
        let b = postcard::to_stdvec(vote).map_err(write_err)?;
        lock(&self.log).vote = Some(b.clone());
        self.send_meta(Meta::Vote(self.group.to_string(), b), true, Vec::new())
            .await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        let v = lock(&self.log).vote.clone();
        match v {
            Some(v) => postcard::from_bytes(&v).map(Some).map_err(read_err),
            None => Ok(None),
        }
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        // Not waited for: after a crash openraft re-learns the commit index.
        let b = postcard::to_stdvec(&committed).map_err(write_err)?;
        lock(&self.log).committed = Some(b.clone());
        self.send_meta(
            Meta::Committed(self.group.to_string(), b),
            false,
            Vec::new(),
        )
        .await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        let v = lock(&self.log).committed.clone();
        match v {
            Some(v) => Ok(postcard::from_bytes::<Option<LogId<NodeId>>>(&v).map_err(read_err)?),
            None => Ok(None),
        }
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut list = Vec::new();
        for e in entries {
            let bytes = Arc::new(postcard::to_stdvec(&e).map_err(write_err)?);
            list.push((e.log_id.index, bytes));
        }
        let replaced: Vec<Loc> = {
            let mut g = lock(&self.log);
            list.iter()
                .filter_map(|(i, b)| g.entries.insert(*i, Loc::Mem(b.clone())))
                .collect()
        };
        self.wal
            .tx
            .send(Job::Append {
                group: self.group.clone(),
                log: self.log.clone(),
                entries: list,
                cb: callback,
                replaced,
            })
            .map_err(|_| stopped())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let gone = lock(&self.log).entries.split_off(&log_id.index);
        self.send_meta(
            Meta::Truncate(self.group.to_string(), log_id.index),
            false,
            gone.into_values().collect(),
        )
        .await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        let b = postcard::to_stdvec(&log_id).map_err(write_err)?;
        let (gone, below) = {
            let mut g = lock(&self.log);
            g.purged = Some(b.clone());
            let below = log_id.index.saturating_add(1).min(g.retain);
            let keep = g.entries.split_off(&below);
            (std::mem::replace(&mut g.entries, keep), below)
        };
        self.send_meta(
            Meta::Purge(self.group.to_string(), b, below),
            false,
            gone.into_values().collect(),
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(term, 1), index),
            payload: openraft::EntryPayload::Blank,
        }
    }

    #[tokio::test]
    async fn recovers_entries_marks_and_surgery() {
        let dir = tempfile::tempdir().unwrap();
        {
            let wal = Wal::open(dir.path()).unwrap();
            let mut s = wal.group("g").unwrap();
            s.save_vote(&Vote::new(3, 7)).await.unwrap();
            // Entries through the real path need openraft's callback, which
            // only openraft can make; write records the way the writer does.
            let mut buf = Vec::new();
            for i in 1..=10u64 {
                let b = postcard::to_stdvec(&entry(i, 1)).unwrap();
                frame_entry(&mut buf, "g", i, &b);
            }
            for i in 1..=3u64 {
                let b = postcard::to_stdvec(&entry(i, 1)).unwrap();
                frame_entry(&mut buf, "h", i, &b);
            }
            let m = postcard::to_stdvec(&Meta::Truncate("g".into(), 8)).unwrap();
            frame(&mut buf, K_META, &[&m]);
            let b = postcard::to_stdvec(&entry(8, 2)).unwrap();
            frame_entry(&mut buf, "g", 8, &b);
            let pid = postcard::to_stdvec(&entry(3, 1).log_id).unwrap();
            let m = postcard::to_stdvec(&Meta::Purge("g".into(), pid, 4)).unwrap();
            frame(&mut buf, K_META, &[&m]);
            let m = postcard::to_stdvec(&Meta::Drop("h".into())).unwrap();
            frame(&mut buf, K_META, &[&m]);
            // A torn record at the end.
            buf.extend_from_slice(&[50, 0, 0, 0, 1, 2]);
            wal.sync();
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(file_name(&dir.path().join("raft-wal"), 1))
                .unwrap();
            f.write_all(&buf).unwrap();
        }
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.groups(), vec!["g".to_string()]);
        let mut s = wal.group("g").unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(3, 7)));
        let st = s.get_log_state().await.unwrap();
        assert_eq!(st.last_purged_log_id.map(|l| l.index), Some(3));
        assert_eq!(
            st.last_log_id.map(|l| (l.leader_id.term, l.index)),
            Some((2, 8))
        );
        let es = s.try_get_log_entries(0..100).await.unwrap();
        let got: Vec<(u64, u64)> = es
            .iter()
            .map(|e| (e.log_id.index, e.log_id.leader_id.term))
            .collect();
        assert_eq!(got, vec![(4, 1), (5, 1), (6, 1), (7, 1), (8, 2)]);
    }

    #[tokio::test]
    async fn a_few_live_entries_do_not_keep_old_files() {
        let dir = tempfile::tempdir().unwrap();
        let wdir = dir.path().join("raft-wal");
        {
            let wal = Wal::open(dir.path()).unwrap();
            wal.sync();
            let mut buf = Vec::new();
            for i in 1..=3u64 {
                let b = postcard::to_stdvec(&entry(i, 1)).unwrap();
                frame_entry(&mut buf, "meta", i, &b);
            }
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(file_name(&wdir, 1))
                .unwrap();
            f.write_all(&buf).unwrap();
        }
        {
            // The entries are in file 1; a busy other group rotates files.
            let wal = Wal::open_with(dir.path(), 300).unwrap();
            let mut busy = wal.group("busy").unwrap();
            for t in 1..=40 {
                busy.save_vote(&Vote::new(t, 1)).await.unwrap();
            }
            wal.sync();
            assert!(!file_name(&wdir, 1).exists(), "file 1 was reclaimed");
            let mut m = wal.group("meta").unwrap();
            let got: Vec<u64> = m
                .try_get_log_entries(0..10)
                .await
                .unwrap()
                .iter()
                .map(|e| e.log_id.index)
                .collect();
            assert_eq!(got, vec![1, 2, 3]);
        }
        let files = std::fs::read_dir(&wdir).unwrap().count();
        assert!(files <= 3, "{files} files left");
        let wal = Wal::open(dir.path()).unwrap();
        let mut m = wal.group("meta").unwrap();
        let got: Vec<u64> = m
            .try_get_log_entries(0..10)
            .await
            .unwrap()
            .iter()
            .map(|e| e.log_id.index)
            .collect();
        assert_eq!(got, vec![1, 2, 3], "relocated entries survive a restart");
    }

    #[tokio::test]
    async fn rotation_checkpoints_and_reclaims_files() {
        let dir = tempfile::tempdir().unwrap();
        let wdir = dir.path().join("raft-wal");
        {
            let wal = Wal::open_with(dir.path(), 300).unwrap();
            let mut s = wal.group("q").unwrap();
            let mut o = wal.group("other").unwrap();
            o.save_vote(&Vote::new(2, 2)).await.unwrap();
            for t in 1..=40 {
                s.save_vote(&Vote::new(t, 1)).await.unwrap();
            }
            wal.drop_group("other");
            for t in 41..=50 {
                s.save_vote(&Vote::new(t, 1)).await.unwrap();
            }
            wal.sync();
        }
        let files: Vec<_> = std::fs::read_dir(&wdir).unwrap().flatten().collect();
        assert!(
            files.len() <= 2,
            "old files reclaimed: {} left",
            files.len()
        );
        assert!(!file_name(&wdir, 1).exists());
        let wal = Wal::open(dir.path()).unwrap();
        assert_eq!(wal.groups(), vec!["q".to_string()]);
        let mut s = wal.group("q").unwrap();
        assert_eq!(s.read_vote().await.unwrap(), Some(Vote::new(50, 1)));
    }
}
