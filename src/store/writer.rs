//! The writer thread: the one place that appends to files and mutates the
//! index.
//!
//! Each turn takes every operation waiting in the channel (one blocking
//! receive, then non-blocking ones) and handles them as a batch:
//!
//! 1. encode all appends into one buffer; one `write` per segment touched
//!    (two when the batch rolls to a new segment);
//! 2. one `fdatasync` of the active segment (and of the segment sealed by a
//!    roll) — the group commit;
//! 3. insert the new records into the index, so readers only ever find
//!    records that are on disk;
//! 4. apply acks and delivered marks in order, one `write` per ack file;
//!    fsync ack files only when a `sync`/`close` is in the batch;
//! 5. run append completions; delete segments nothing refers to any more;
//!    answer `sync` requests.
//!
//! If writing or syncing appends fails, every segment touched by the batch
//! is truncated back to where the batch started and every append of the
//! batch completes with the error; the store stays consistent and keeps
//! serving. Only if that truncation itself fails does the store refuse
//! further appends ([`StoreError::Failed`]).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, trace, warn};

use super::recovery::remove_segment;
use super::segment::{
    self, ACK_ACK, ACK_DELIVERED, MAX_SEGMENT_SIZE, SegIndex, Segment, acks_path, seg_path,
};
use super::{Completion, Gid, MessageParts, QueueId, Shared, StoreError, StoreOptions};

/// Most operations handled in one turn, bounding how long a completion can
/// wait behind a flood of newer operations.
const MAX_BATCH: usize = 16 * 1024;

type Reply = oneshot::Sender<Result<(), StoreError>>;

/// A request to the writer thread.
pub(crate) enum Op {
    Append {
        gid: Gid,
        queues: Vec<QueueId>,
        parts: MessageParts,
        done: Done,
    },
    Ack {
        queue: QueueId,
        gids: Vec<Gid>,
    },
    Delivered {
        queue: QueueId,
        gids: Vec<Gid>,
    },
    Sync(Reply),
    Close(Reply),
}

impl Op {
    /// Drops the op without running its completion (it was never queued).
    pub(crate) fn forget(self) {
        if let Op::Append { done, .. } = self {
            done.forget();
        }
    }
}

/// A completion that runs exactly once: with the batch result, or with
/// [`StoreError::Closed`] if the op is dropped unprocessed (writer gone).
pub(crate) struct Done(Option<Completion>);

impl Done {
    pub(crate) fn new(c: Option<Completion>) -> Self {
        Done(c)
    }

    fn complete(mut self, r: Result<(), StoreError>) {
        if let Some(f) = self.0.take() {
            run_completion(f, r);
        }
    }

    fn forget(mut self) {
        self.0 = None;
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if let Some(f) = self.0.take() {
            run_completion(f, Err(StoreError::Closed));
        }
    }
}

/// A panicking completion must not take the writer thread down with it.
fn run_completion(f: Completion, r: Result<(), StoreError>) {
    if catch_unwind(AssertUnwindSafe(|| f(r))).is_err() {
        error!("a message store completion panicked; the writer thread carries on");
    }
}

/// Starts the writer thread with a fresh active segment.
pub(crate) fn spawn(
    shared: Arc<Shared>,
    rx: mpsc::Receiver<Op>,
    opts: &StoreOptions,
    lock: File,
) -> Result<(), StoreError> {
    let next_no = shared
        .segments()
        .last()
        .map_or(1, |s| s.no + 1)
        .max(shared.next_no);
    let mut w = Writer {
        segment_size: opts.segment_size.clamp(1, MAX_SEGMENT_SIZE),
        active: None,
        ack_files: HashMap::new(),
        buf: Vec::with_capacity(1 << 20),
        failed: None,
        lock: Some(lock),
        shared,
    };
    w.active = Some(w.create_segment(next_no)?);
    let dir = w.shared.dir.clone();
    std::thread::Builder::new()
        .name("warren-store-writer".into())
        .spawn(move || w.run(rx))
        .map_err(|e| StoreError::io("spawn the writer thread for", &dir, e))?;
    Ok(())
}

/// The segment being appended to, with the writer's own append handle.
struct Active {
    seg: Arc<Segment>,
    file: File,
    /// Bytes in the file.
    size: u64,
    /// `size` when the current batch started: where a failed batch is cut.
    batch_start: u64,
}

/// An ack file open for appending.
struct AckFile {
    file: File,
    /// Bytes known good: where a failed write is cut back to.
    len: u64,
    /// Written since the last fsync.
    dirty: bool,
}

struct Writer {
    shared: Arc<Shared>,
    segment_size: u64,
    /// Always `Some` once running; an `Option` only so a roll can move it.
    active: Option<Active>,
    ack_files: HashMap<u64, AckFile>,
    buf: Vec<u8>,
    /// Set when a failed batch could not be undone.
    failed: Option<String>,
    /// The directory lock, released before `close` returns.
    lock: Option<File>,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Op>) {
        let mut closers = Vec::new();
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            closers.extend(self.process(batch));
            if !closers.is_empty() {
                // Refuse new ops, then write whatever was already queued.
                rx.close();
                let mut rest = Vec::new();
                while let Ok(op) = rx.try_recv() {
                    rest.push(op);
                }
                if !rest.is_empty() {
                    closers.extend(self.process(rest));
                }
                break;
            }
        }
        // Closed explicitly, or every handle dropped: leave everything durable.
        let r = self.sync_acks();
        if let Err(e) = &r {
            error!(error = %e, "message store: final sync failed");
        }
        // Unlock before answering, so a reopen right after `close` succeeds.
        self.ack_files.clear();
        self.active = None;
        drop(self.lock.take());
        for c in closers {
            let _ = c.send(r.clone());
        }
        debug!("message store writer stopped");
    }

    fn active(&mut self) -> &mut Active {
        #[allow(clippy::expect_used)] // invariant: set before run(), restored by roll()
        self.active.as_mut().expect("active segment")
    }

    /// Handles one batch; returns the close requests in it.
    fn process(&mut self, batch: Vec<Op>) -> Vec<Reply> {
        let mut dones = Vec::new();
        let mut syncs = Vec::new();
        let mut closers = Vec::new();
        let mut settles = Vec::new();
        let mut pending: Vec<(Arc<Segment>, Gid, u32, u16)> = Vec::new();
        let mut sealed: Vec<Active> = Vec::new();
        let mut err: Option<StoreError> = self.failed.clone().map(StoreError::Failed);
        self.buf.clear();
        {
            let a = self.active();
            a.batch_start = a.size;
        }

        // 1. Encode appends; roll when the next record would not fit.
        for op in batch {
            match op {
                Op::Append {
                    gid,
                    queues,
                    parts,
                    done,
                } => {
                    dones.push(done);
                    if err.is_some() {
                        continue;
                    }
                    let len = segment::record_len(queues.len(), &parts) as u64;
                    let used = self.active().size + self.buf.len() as u64;
                    if used > 0
                        && used + len > self.segment_size
                        && let Err(e) = self.roll(&mut sealed)
                    {
                        err = Some(e);
                        continue;
                    }
                    let a = self.active.as_ref().map(|a| (Arc::clone(&a.seg), a.size));
                    let Some((seg, size)) = a else { continue };
                    let offset = size + self.buf.len() as u64;
                    segment::encode_record(&mut self.buf, gid, &queues, &parts);
                    // offset < segment_size <= 2 GiB, so it fits.
                    pending.push((seg, gid, offset as u32, queues.len() as u16));
                }
                Op::Ack { queue, gids } => settles.push((ACK_ACK, queue, gids)),
                Op::Delivered { queue, gids } => settles.push((ACK_DELIVERED, queue, gids)),
                Op::Sync(r) => syncs.push(r),
                Op::Close(r) => closers.push(r),
            }
        }
        let rolled = !sealed.is_empty();

        // 2. Write the rest, then the group commit.
        if err.is_none() {
            err = self.flush_buf().err();
        }
        if err.is_none() {
            for a in &sealed {
                if let Err(e) = self.fsync(&a.file, &a.seg) {
                    err = Some(e);
                    break;
                }
            }
        }
        if err.is_none()
            && let Some(a) = self.active.as_ref().filter(|a| a.size > a.batch_start)
        {
            err = self.fsync(&a.file, &a.seg).err();
        }
        if let Some(e) = &err {
            if self.failed.is_none() {
                warn!(error = %e, appends = dones.len(), "message store: batch of appends failed; undoing it");
                self.undo(&mut sealed);
            }
            pending.clear();
        }
        for a in &sealed {
            a.seg.index_mut().shrink();
        }
        drop(sealed); // closes the sealed segments' append handles

        // 3. Make the new records visible.
        let mut added = 0u64;
        for (seg, gid, offset, refs) in pending {
            seg.index_mut().insert(gid, offset, refs);
            seg.note_range(gid, gid);
            added += u64::from(refs);
        }
        self.shared.live_refs.fetch_add(added, Ordering::Relaxed);

        // 4. Acks and delivered marks.
        let mut ack_err = None;
        let touched = if settles.is_empty() {
            Vec::new()
        } else {
            self.settle(settles, &mut ack_err)
        };
        if (!syncs.is_empty() || !closers.is_empty())
            && let Err(e) = self.sync_acks()
        {
            ack_err.get_or_insert(e);
        }

        // 5. Completions, then reclaim space.
        let append_result = match &err {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        };
        for d in dones {
            d.complete(append_result.clone());
        }
        if self.buf.capacity() > 16 << 20 {
            // A batch of huge messages: do not keep its buffer forever.
            self.buf = Vec::with_capacity(1 << 20);
        }
        // Before answering `sync`, so its caller sees the space reclaimed.
        if rolled || !touched.is_empty() {
            for seg in &touched {
                seg.index_mut().maybe_compact();
            }
            self.retire_empty_active();
            self.reclaim();
        }
        let sync_result = match err.or(ack_err) {
            Some(e) => Err(e),
            None => Ok(()),
        };
        for s in syncs {
            let _ = s.send(sync_result.clone());
        }
        closers
    }

    /// Writes the pending buffer to the active segment.
    fn flush_buf(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let shared = Arc::clone(&self.shared);
        let a = self.active();
        let r = write_segment(&shared, &mut a.file, &buf);
        // On error it is unknown how much landed; undo() cuts back to
        // batch_start.
        if r.is_ok() {
            a.size += buf.len() as u64;
            a.seg.seg_bytes.store(a.size, Ordering::Relaxed);
        }
        let path = a.seg.path.clone();
        self.buf = buf;
        self.buf.clear();
        r.map_err(|e| StoreError::io("write", &path, e))
    }

    fn fsync(&self, file: &File, seg: &Segment) -> Result<(), StoreError> {
        let t = Instant::now();
        let r = file.sync_data();
        let us = t.elapsed().as_micros() as u64;
        self.shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.shared.fsync_total_us.fetch_add(us, Ordering::Relaxed);
        self.shared.last_fsync_us.store(us, Ordering::Relaxed);
        r.map_err(|e| StoreError::io("fdatasync", &seg.path, e))
    }

    /// Seals the active segment (writing what is buffered for it) and opens
    /// the next one. On error the old segment stays active.
    fn roll(&mut self, sealed: &mut Vec<Active>) -> Result<(), StoreError> {
        self.flush_buf()?;
        let next = self.active().seg.no + 1;
        let new = self.create_segment(next)?;
        if let Some(old) = self.active.replace(new) {
            sealed.push(old);
        }
        Ok(())
    }

    /// Creates segment `no` (never overwriting a file), makes its directory
    /// entry durable, and publishes it to readers.
    fn create_segment(&mut self, no: u64) -> Result<Active, StoreError> {
        let dir = self.shared.dir.clone();
        let path = seg_path(&dir, no);
        let file = OpenOptions::new()
            .create_new(true)
            .append(true)
            .open(&path)
            .map_err(|e| StoreError::io("create", &path, e))?;
        // The new file's name must survive a crash before any record in it
        // is confirmed.
        let read = File::open(&path)
            .map_err(|e| StoreError::io("open", &path, e))
            .and_then(|read| {
                File::open(&dir)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| StoreError::io("fsync directory", &dir, e))?;
                Ok(read)
            });
        let read = match read {
            Ok(r) => r,
            Err(e) => {
                // Leave no empty file behind: the next roll retries this number.
                let _ = std::fs::remove_file(&path);
                return Err(e);
            }
        };
        let seg = Arc::new(Segment::new(no, path, read, SegIndex::default(), 0, 0));
        self.shared.segments_mut().push(Arc::clone(&seg));
        trace!(segment = no, "message store: new segment");
        Ok(Active {
            seg,
            file,
            size: 0,
            batch_start: 0,
        })
    }

    /// Cuts every segment this batch wrote to back to its size before it
    /// (unconditionally: a failed write may have landed partly).
    fn undo(&mut self, sealed: &mut [Active]) {
        let mut failures = Vec::new();
        let active = self.active.as_mut();
        for a in sealed.iter_mut().chain(active) {
            match a
                .file
                .set_len(a.batch_start)
                .and_then(|()| a.file.sync_all())
            {
                Ok(()) => {
                    a.size = a.batch_start;
                    a.seg.seg_bytes.store(a.size, Ordering::Relaxed);
                }
                Err(e) => failures.push(format!("truncate {}: {e}", a.seg.path.display())),
            }
        }
        if !failures.is_empty() {
            let msg = failures.join("; ");
            error!(error = %msg, "message store: could not undo a failed write; refusing further appends");
            self.failed = Some(msg);
        }
    }

    /// Applies acks and delivered marks in order; returns the segments whose
    /// index changed.
    fn settle(
        &mut self,
        settles: Vec<(u8, QueueId, Vec<Gid>)>,
        err: &mut Option<StoreError>,
    ) -> Vec<Arc<Segment>> {
        let mut bufs: HashMap<u64, (Arc<Segment>, Vec<u8>)> = HashMap::new();
        let mut last: Option<Arc<Segment>> = None;
        let mut released = 0u64;
        for (kind, queue, gids) in settles {
            for gid in gids {
                let seg = match &last {
                    Some(s) if s.may_contain(gid) && s.index().is_live(gid) => Some(Arc::clone(s)),
                    _ => self.shared.find(gid).map(|(s, _)| s),
                };
                let Some(seg) = seg else {
                    trace!(
                        gid,
                        queue,
                        "message store: settle for a message with no live reference; ignored"
                    );
                    continue;
                };
                if kind == ACK_ACK {
                    if !seg.index_mut().release(gid) {
                        continue;
                    }
                    released += 1;
                }
                let entry = bufs
                    .entry(seg.no)
                    .or_insert_with(|| (Arc::clone(&seg), Vec::new()));
                segment::encode_ack(&mut entry.1, kind, queue, gid);
                last = Some(seg);
            }
        }
        self.shared.live_refs.fetch_sub(released, Ordering::Relaxed);
        let mut touched = Vec::with_capacity(bufs.len());
        for (no, (seg, buf)) in bufs {
            if let Err(e) = self.write_acks(&seg, &buf) {
                // The references are released in memory either way; after a
                // restart these messages come back (redelivery), never lost.
                warn!(error = %e, segment = no, "message store: could not record acks");
                err.get_or_insert(e);
            }
            touched.push(seg);
        }
        touched
    }

    fn write_acks(&mut self, seg: &Segment, buf: &[u8]) -> Result<(), StoreError> {
        let path = acks_path(&self.shared.dir, seg.no);
        let af = match self.ack_files.entry(seg.no) {
            std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
            std::collections::hash_map::Entry::Vacant(v) => {
                let file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|e| StoreError::io("open", &path, e))?;
                let len = file
                    .metadata()
                    .map_err(|e| StoreError::io("stat", &path, e))?
                    .len();
                v.insert(AckFile {
                    file,
                    len,
                    dirty: false,
                })
            }
        };
        af.dirty = true;
        match af.file.write_all(buf) {
            Ok(()) => {
                af.len += buf.len() as u64;
                seg.ack_bytes.store(af.len, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                // A partial record would misalign every later one: cut back.
                if af.file.set_len(af.len).is_err() {
                    self.ack_files.remove(&seg.no);
                    self.failed
                        .get_or_insert_with(|| format!("could not truncate {}", path.display()));
                }
                Err(StoreError::io("write", &path, e))
            }
        }
    }

    /// fsyncs every ack file written since the last time.
    fn sync_acks(&mut self) -> Result<(), StoreError> {
        let mut r = Ok(());
        for (no, af) in self.ack_files.iter_mut().filter(|(_, af)| af.dirty) {
            match af.file.sync_data() {
                Ok(()) => af.dirty = false,
                Err(e) => {
                    r = Err(StoreError::io(
                        "fdatasync",
                        &acks_path(&self.shared.dir, *no),
                        e,
                    ))
                }
            }
        }
        r
    }

    /// When every message in a sizeable active segment has been acked
    /// (consumers keeping up), start a new one so this one can be deleted:
    /// after everything is acked the directory holds at most a quarter
    /// segment, not a full one.
    fn retire_empty_active(&mut self) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if a.size == 0 || a.size < self.segment_size / 4 || a.seg.index().live_refs > 0 {
            return;
        }
        let next = a.seg.no + 1;
        match self.create_segment(next) {
            Ok(new) => self.active = Some(new),
            Err(e) => warn!(error = %e, "message store: could not start a new segment; will retry"),
        }
    }

    /// Deletes sealed segments with no live reference.
    fn reclaim(&mut self) {
        let active_no = self.active.as_ref().map_or(u64::MAX, |a| a.seg.no);
        let dead: Vec<u64> = {
            let mut segs = self.shared.segments_mut();
            let dead = segs
                .iter()
                .filter(|s| s.no != active_no && s.index().live_refs == 0)
                .map(|s| s.no)
                .collect::<Vec<_>>();
            segs.retain(|s| !dead.contains(&s.no));
            dead
        };
        for no in dead {
            self.ack_files.remove(&no);
            // Readers holding the Arc keep a valid fd; the data is acked anyway.
            match remove_segment(&self.shared.dir, no) {
                Ok(()) => debug!(segment = no, "message store: deleted fully acked segment"),
                Err(e) => {
                    error!(error = %e, "message store: could not delete a fully acked segment")
                }
            }
        }
    }
}

/// One `write` of a batch (the test hook can make it fail halfway).
fn write_segment(shared: &Shared, file: &mut File, buf: &[u8]) -> io::Result<()> {
    #[cfg(test)]
    if shared
        .fail_writes
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        file.write_all(&buf[..buf.len() / 2])?;
        return Err(io::Error::new(
            io::ErrorKind::StorageFull,
            "injected: no space left on device",
        ));
    }
    let _ = shared;
    file.write_all(buf)
}
