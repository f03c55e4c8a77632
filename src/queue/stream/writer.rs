//! The stream writer: one OS thread per stream (it blocks in fdatasync,
//! which must never happen on the async runtime) owning the active
//! segment.
//!
//! Group commit: it takes everything that arrived while the previous
//! batch was being written, encodes it into chunks, writes them and
//! fdatasyncs once; only then are the publishers' confirms sent and the
//! actor told about the new chunks (readers never see unsynced data).
//! A full segment is sealed and a new one started on the way.
//!
//! A replicated stream (cluster mode, see `replica.rs`) changes two
//! things: on the leader, confirms are not sent after the fdatasync but
//! handed to the actor ([`CommitItem::Durable`]), which sends them once a
//! majority of replicas wrote the chunks; on a follower, the writer appends
//! the leader's encoded chunks as they are ([`WriteReq::Replicate`]), and
//! truncates or resets the log when the leader says so.

use super::chunk::{self, ChunkHeader};
use super::segment::{ActiveSegment, log_path};
use super::settings::StreamSettings;
use super::tracking;
use crate::broker::ConnCmd;
use crate::queue::ConfirmTo;
use crate::queue::message::Message;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// The committed offset of a replica (8 bytes, big-endian).
pub const COMMIT_FILE: &str = "commit";

/// Messages per chunk, at most.
const CHUNK_MAX_MSGS: usize = 4096;
/// Bytes of bodies per chunk, about.
const CHUNK_MAX_BYTES: usize = 1 << 20;

/// The writer's inbox.
#[derive(Debug)]
pub enum WriteReq {
    /// Append messages; confirm to the publisher once durable.
    Append {
        /// In publish order.
        msgs: Vec<Arc<Message>>,
        /// Confirm target.
        confirm: Option<ConfirmTo>,
    },
    /// Replace the stored consumer offsets (serialised).
    SaveOffsets(Vec<u8>),
    /// Finish what is queued, close the files and stop.
    Stop(oneshot::Sender<()>),
    /// Append messages forwarded from another node; `reply` says whether
    /// they were written (replicated streams: the actor answers once
    /// committed).
    AppendRemote {
        /// In publish order.
        msgs: Vec<Arc<Message>>,
        /// Written (true) or failed.
        reply: oneshot::Sender<bool>,
    },
    /// Follower: append the leader's encoded chunks as they are, then sync
    /// and answer with the written tail.
    Replicate {
        /// Where the leader believes this log ends (the first chunk's
        /// offset); anything else is a mismatch.
        from: u64,
        /// Epoch of the leader's chunk ending at `from` (None: its log
        /// starts there).
        prev_epoch: Option<u32>,
        /// This replica's committed offset: never cut below it.
        floor: u64,
        /// Chunks back to back (header + filter + records each).
        chunks: bytes::Bytes,
        /// Answer after the sync.
        reply: oneshot::Sender<ReplAck>,
    },
    /// Follower: drop everything after offset `to` (a chunk boundary; only
    /// never-committed chunks are there).
    Truncate {
        /// New tail.
        to: u64,
    },
    /// Follower: delete the whole log and start an empty one at `base`.
    Reset {
        /// First offset of the new log.
        base: u64,
    },
    /// Stamp this epoch into the chunks written from now on.
    SetEpoch(u32),
    /// Remember the committed offset (written, not synced: a stale value
    /// only makes a follower fetch more after a restart).
    SaveCommit(u64),
}

/// One [`WriteReq::Replicate`], taken apart.
struct ReplReq {
    from: u64,
    prev_epoch: Option<u32>,
    floor: u64,
    chunks: bytes::Bytes,
    reply: oneshot::Sender<ReplAck>,
}

/// A follower writer's answer to [`WriteReq::Replicate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplAck {
    /// Appended and synced; the tail after them.
    Appended(u64),
    /// The chunks did not start at the tail (given); nothing appended.
    Mismatch(u64),
    /// A write or sync failed (logged); nothing appended.
    Failed,
}

/// Who waits for a replicated append to be committed.
#[derive(Debug)]
pub enum Waiter {
    /// A local publisher's confirms.
    Conn(ConfirmTo),
    /// A publish forwarded from another node.
    Remote(oneshot::Sender<bool>),
}

impl Waiter {
    /// Answers: confirmed (`ok`) or refused.
    pub fn finish(self, ok: bool) {
        match self {
            Waiter::Conn(c) => {
                let _ = c.conn.send(ConnCmd::Confirm {
                    channel: c.channel,
                    seqs: c.seqs,
                    nack: !ok,
                });
            }
            Waiter::Remote(tx) => {
                let _ = tx.send(ok);
            }
        }
    }
}

/// What a commit changed, in order.
#[derive(Debug)]
pub enum CommitItem {
    /// A new (active) segment, with a read handle.
    Segment {
        /// Its first offset.
        base: u64,
        /// Read handle.
        file: Arc<File>,
    },
    /// A durable chunk.
    Chunk {
        /// Segment base.
        seg: u64,
        /// Header.
        header: ChunkHeader,
        /// Position in the segment.
        pos: u64,
    },
    /// Replicated leader: everything before `upto` is synced; these wait
    /// for a majority.
    Durable {
        /// Offset after the last chunk written.
        upto: u64,
        /// Publishers to answer once committed.
        waiters: Vec<Waiter>,
    },
    /// The log was truncated to `to` (follower).
    Truncated {
        /// New tail.
        to: u64,
        /// The active segment after it (base, read handle).
        active: Option<(u64, Arc<File>)>,
    },
    /// The log was deleted and restarted empty at `base` (follower).
    Reset {
        /// New first offset.
        base: u64,
        /// Read handle of its segment.
        file: Arc<File>,
    },
}

/// Starts the writer thread for a stream.
pub fn start(
    name: &str,
    dir: PathBuf,
    active: ActiveSegment,
    settings: StreamSettings,
    inbox: usize,
    replicated: bool,
) -> io::Result<(
    mpsc::Sender<WriteReq>,
    mpsc::UnboundedReceiver<Vec<CommitItem>>,
)> {
    let (tx, rx) = mpsc::channel(inbox.max(1));
    // Unbounded: one message per fdatasync, consumed by the stream actor.
    let (etx, erx) = mpsc::unbounded_channel();
    let last_ts = active.summary.last_ts.unwrap_or(0);
    let w = Writer {
        dir,
        active: Some(active),
        settings,
        events: etx,
        last_ts,
        replicated,
        epoch: 0,
        commit_file: None,
        last: None,
    };
    std::thread::Builder::new()
        .name(format!("wstream-{name}"))
        .spawn(move || w.run(rx))?;
    Ok((tx, erx))
}

struct Writer {
    dir: PathBuf,
    active: Option<ActiveSegment>,
    settings: StreamSettings,
    events: mpsc::UnboundedSender<Vec<CommitItem>>,
    last_ts: i64,
    /// Replicated stream: confirms go through the actor.
    replicated: bool,
    /// Stamped into new chunks (replicated streams; 0 otherwise).
    epoch: u32,
    commit_file: Option<File>,
    /// (first offset, epoch) of the last chunk written, when known.
    last: Option<(u64, u32)>,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        let mut reqs = Vec::new();
        while let Some(r) = rx.blocking_recv() {
            reqs.push(r);
            while reqs.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => reqs.push(r),
                    Err(_) => break,
                }
            }
            if let Some(stop) = self.process(&mut reqs) {
                drop(self.active.take());
                let _ = stop.send(());
                return;
            }
        }
    }

    fn process(&mut self, reqs: &mut Vec<WriteReq>) -> Option<oneshot::Sender<()>> {
        let mut msgs = Vec::new();
        let mut confirms = Vec::new();
        let mut remotes = Vec::new();
        let mut offsets = None;
        let mut stop = None;
        let mut items = Vec::new();
        let mut repl: Vec<ReplReq> = Vec::new();
        let mut commit = None;
        for r in reqs.drain(..) {
            match r {
                WriteReq::Append { msgs: m, confirm } => {
                    msgs.extend(m);
                    confirms.extend(confirm);
                }
                WriteReq::AppendRemote { msgs: m, reply } => {
                    msgs.extend(m);
                    remotes.push(reply);
                }
                WriteReq::SaveOffsets(b) => offsets = Some(b),
                WriteReq::Stop(s) => stop = Some(s),
                WriteReq::SetEpoch(e) => self.epoch = e,
                WriteReq::SaveCommit(c) => commit = Some(c),
                WriteReq::Replicate {
                    from,
                    prev_epoch,
                    floor,
                    chunks,
                    reply,
                } => repl.push(ReplReq {
                    from,
                    prev_epoch,
                    floor,
                    chunks,
                    reply,
                }),
                // Truncation and reset are ordered with the chunks around
                // them: write what came before first.
                WriteReq::Truncate { to } => {
                    self.replicate(std::mem::take(&mut repl), &mut items);
                    self.truncate(to, &mut items);
                }
                WriteReq::Reset { base } => {
                    self.replicate(std::mem::take(&mut repl), &mut items);
                    self.reset(base, &mut items);
                }
            }
        }
        self.replicate(repl, &mut items);
        let ok = if msgs.is_empty() {
            true
        } else {
            match self.append(&msgs, &mut items) {
                Ok(()) => true,
                Err(e) => {
                    error!(dir = %self.dir.display(), "appending to the stream failed, publishers get basic.nack: {e}");
                    false
                }
            }
        };
        let waiters = confirms
            .into_iter()
            .map(Waiter::Conn)
            .chain(remotes.into_iter().map(Waiter::Remote));
        if self.replicated && ok && !msgs.is_empty() {
            let upto = self.active.as_ref().map_or(0, |a| a.summary.end);
            items.push(CommitItem::Durable {
                upto,
                waiters: waiters.collect(),
            });
        } else {
            for w in waiters {
                w.finish(ok);
            }
        }
        if !items.is_empty() {
            let _ = self.events.send(items);
        }
        if let Some(b) = offsets
            && let Err(e) = tracking::save(&self.dir, &b)
        {
            warn!(dir = %self.dir.display(), "could not store stream consumer offsets: {e}");
        }
        if let Some(c) = commit {
            self.save_commit(c);
        }
        stop
    }

    fn save_commit(&mut self, c: u64) {
        use std::os::unix::fs::FileExt;
        if self.commit_file.is_none() {
            match std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(self.dir.join(COMMIT_FILE))
            {
                Ok(f) => self.commit_file = Some(f),
                Err(e) => {
                    warn!(dir = %self.dir.display(), "cannot write the stream's committed offset (a restart will re-fetch more from the leader): {e}");
                    return;
                }
            }
        }
        if let Some(f) = &self.commit_file {
            let _ = f.write_all_at(&c.to_be_bytes(), 0);
        }
    }

    /// Seals the active segment and starts one at its end if `len` more
    /// bytes would not fit; reports the new segment in `items`.
    fn roll_if_full(&mut self, len: u64, items: &mut Vec<CommitItem>) -> io::Result<()> {
        let Some(active) = self.active.as_ref() else {
            return Err(io::Error::other(
                "the stream writer lost its active segment",
            ));
        };
        if active.summary.size == 0 || active.summary.size + len <= self.settings.max_segment_size {
            return Ok(());
        }
        let next = active.summary.end;
        if let Some(full) = self.active.take() {
            full.seal()?;
        }
        let fresh = ActiveSegment::create(&self.dir, next)?;
        items.push(CommitItem::Segment {
            base: next,
            file: Arc::new(File::open(log_path(&self.dir, next))?),
        });
        self.active = Some(fresh);
        Ok(())
    }

    /// Follower: appends the leader's chunks (each checked: contiguous
    /// offsets, valid CRC), syncs once for all, then answers each request.
    /// A request must start at this log's tail, after a chunk of the
    /// leader's `prev_epoch` (Raft's consistency check, by epoch); if not,
    /// the log is cut back (never below `floor`, the committed offset: only
    /// unconfirmed chunks can differ) and the answer is a mismatch with the
    /// new tail, from which the leader resends.
    fn replicate(&mut self, reqs: Vec<ReplReq>, items: &mut Vec<CommitItem>) {
        if reqs.is_empty() {
            return;
        }
        let batch_start = self.active.as_ref().map_or(0, |a| a.summary.end);
        let mut appended = false;
        let mut answers = Vec::with_capacity(reqs.len());
        let mut failed = false;
        for r in reqs {
            if failed {
                answers.push((r.reply, ReplAck::Failed));
                continue;
            }
            if let Err(tail) = self.check_position(r.from, r.prev_epoch, r.floor, !appended, items)
            {
                answers.push((r.reply, ReplAck::Mismatch(tail)));
                continue;
            }
            let mut rest = &r.chunks[..];
            let mut res = Ok(());
            while !rest.is_empty() {
                let Some(h) = chunk::ChunkHeader::parse(rest) else {
                    res = Err(io::Error::other("a replicated chunk has no valid header"));
                    break;
                };
                let Some(one) = rest.get(..h.total_len() as usize) else {
                    res = Err(io::Error::other("a replicated chunk is cut short"));
                    break;
                };
                let end = self.active.as_ref().map_or(0, |a| a.summary.end);
                if h.first != end {
                    res = Err(io::Error::other(format!(
                        "replicated chunks are not contiguous: {} after {end}",
                        h.first
                    )));
                    break;
                }
                if !h.verify(&one[chunk::HEADER_LEN..]) {
                    res = Err(io::Error::other(format!(
                        "replicated chunk at offset {} fails its CRC",
                        h.first
                    )));
                    break;
                }
                if let Err(e) = self.roll_if_full(h.total_len(), items) {
                    res = Err(e);
                    break;
                }
                let Some(active) = self.active.as_mut() else {
                    res = Err(io::Error::other("no active segment"));
                    break;
                };
                let pos = active.summary.size;
                if let Err(e) = active.append(&h, one) {
                    res = Err(e);
                    break;
                }
                appended = true;
                self.last = Some((h.first, chunk::epoch_of(one)));
                items.push(CommitItem::Chunk {
                    seg: active.base(),
                    header: h,
                    pos,
                });
                rest = &rest[one.len()..];
            }
            match res {
                Ok(()) => {
                    let tail = self.active.as_ref().map_or(0, |a| a.summary.end);
                    answers.push((r.reply, ReplAck::Appended(tail)));
                }
                Err(e) => {
                    error!(dir = %self.dir.display(), "cannot append chunks from the stream leader (it will resend them): {e}");
                    failed = true;
                    answers.push((r.reply, ReplAck::Failed));
                }
            }
        }
        if appended {
            let synced = match self.active.as_mut() {
                Some(a) => a.sync(),
                None => Ok(()),
            };
            if let Err(e) = synced {
                error!(dir = %self.dir.display(), "cannot sync chunks from the stream leader (it will resend them): {e}");
                failed = true;
            }
        }
        if failed {
            // Undo everything this batch appended (unsynced, or after the
            // failure): the actor drops those chunks when it sees the cut.
            self.truncate(batch_start, items);
            for (reply, a) in answers {
                let _ = reply.send(match a {
                    ReplAck::Appended(_) => ReplAck::Failed,
                    other => other,
                });
            }
            return;
        }
        for (reply, a) in answers {
            let _ = reply.send(a);
        }
    }

    /// Whether chunks from the leader starting at `from`, after its chunk
    /// of epoch `prev` (None: `from` starts the leader's log), continue
    /// this log. If not, cuts the log back where it may diverge (only when
    /// `may_cut`: nothing appended in this batch yet) and returns the tail
    /// to resend from.
    fn check_position(
        &mut self,
        from: u64,
        prev: Option<u32>,
        floor: u64,
        may_cut: bool,
        items: &mut Vec<CommitItem>,
    ) -> Result<(), u64> {
        let tail = self.active.as_ref().map_or(0, |a| a.summary.end);
        if tail > from && from >= floor && may_cut {
            // Past the leader's position: never confirmed.
            self.truncate(from, items);
        }
        let tail = self.active.as_ref().map_or(0, |a| a.summary.end);
        if tail != from {
            return Err(tail);
        }
        let Some(prev) = prev else {
            return Ok(());
        };
        match self.last_chunk() {
            // Nothing before `from` here: the log starts at it.
            None => Ok(()),
            Some((_, e)) if e == prev => Ok(()),
            Some((first, _)) => {
                if first >= floor && may_cut {
                    // A chunk the leader does not have: drop it and retry
                    // one chunk earlier.
                    self.truncate(first, items);
                    Err(first)
                } else {
                    Err(tail)
                }
            }
        }
    }

    /// (first offset, epoch) of the last chunk of the log, if any.
    fn last_chunk(&mut self) -> Option<(u64, u32)> {
        if self.last.is_some() {
            return self.last;
        }
        let active = self.active.as_ref()?;
        let (base, (first, pos)) = match active.summary.last_chunk {
            Some(lc) => (active.base(), lc),
            None => {
                let bases = super::log::segment_bases(&self.dir).ok()?;
                let prev = *bases.iter().rev().find(|b| **b < active.base())?;
                let s = super::segment::SealedSegment::open(&self.dir, prev).ok()?;
                (prev, s.summary.last_chunk?)
            }
        };
        let f = File::open(log_path(&self.dir, base)).ok()?;
        let mut b = [0u8; chunk::HEADER_LEN];
        use std::os::unix::fs::FileExt;
        f.read_exact_at(&mut b, pos).ok()?;
        self.last = Some((first, chunk::epoch_of(&b)));
        self.last
    }

    /// Drops every chunk after offset `to` (segments after it deleted, the
    /// last one cut at the chunk boundary).
    fn truncate(&mut self, to: u64, items: &mut Vec<CommitItem>) {
        self.last = None;
        if let Some(a) = self.active.as_ref().filter(|a| a.summary.end == to) {
            let base = a.base();
            let file = File::open(log_path(&self.dir, base)).ok().map(Arc::new);
            items.push(CommitItem::Truncated {
                to,
                active: file.map(|f| (base, f)),
            });
            return;
        }
        drop(self.active.take());
        match super::log::truncate(&self.dir, to) {
            Ok(a) => {
                tracing::info!(dir = %self.dir.display(), to, "stream replica cut back to where its log matches the leader's (unconfirmed chunks dropped)");
                let base = a.base();
                self.active = Some(a);
                let file = File::open(log_path(&self.dir, base)).ok().map(Arc::new);
                items.push(CommitItem::Truncated {
                    to,
                    active: file.map(|f| (base, f)),
                });
            }
            Err(e) => {
                error!(dir = %self.dir.display(), to, "cannot truncate the stream replica: {e}; it stops replicating until restarted");
                items.push(CommitItem::Truncated { to, active: None });
            }
        }
    }

    /// Deletes every segment and starts an empty log at `base`.
    fn reset(&mut self, base: u64, items: &mut Vec<CommitItem>) {
        self.last = None;
        drop(self.active.take());
        let res = (|| -> io::Result<(ActiveSegment, File)> {
            for b in super::log::segment_bases(&self.dir)? {
                super::retention::remove_segments(&self.dir, &[b]);
            }
            let a = ActiveSegment::create(&self.dir, base)?;
            let f = File::open(log_path(&self.dir, base))?;
            Ok((a, f))
        })();
        match res {
            Ok((a, f)) => {
                tracing::info!(dir = %self.dir.display(), base, "stream replica restarted at the leader's first offset (what it lacked was removed by retention)");
                self.active = Some(a);
                items.push(CommitItem::Reset {
                    base,
                    file: Arc::new(f),
                });
            }
            Err(e) => {
                error!(dir = %self.dir.display(), base, "cannot reset the stream replica: {e}; it stops replicating until restarted");
            }
        }
    }

    /// Writes `msgs` as chunks and syncs. `items` gets what became durable
    /// (also on failure: chunks in a segment sealed before the failure).
    fn append(&mut self, msgs: &[Arc<Message>], items: &mut Vec<CommitItem>) -> io::Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("the stream writer has no active segment"));
        };
        let before = active.summary.clone();
        let mut pending = Vec::new();
        let mut buf = Vec::new();
        let res = (|| -> io::Result<()> {
            let mut start = 0;
            while start < msgs.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < msgs.len() && end - start < CHUNK_MAX_MSGS && bytes < CHUNK_MAX_BYTES {
                    bytes += msgs[end].body.len() + msgs[end].raw_properties.len();
                    end += 1;
                }
                let group = &msgs[start..end];
                start = end;
                self.last_ts = self.last_ts.max(now_ms());
                let Some(active) = self.active.as_mut() else {
                    return Err(io::Error::other(
                        "the stream writer lost its active segment",
                    ));
                };
                buf.clear();
                let h = chunk::encode(
                    active.summary.end,
                    self.last_ts,
                    group,
                    self.settings.filter_size,
                    &mut buf,
                );
                if self.epoch != 0 {
                    chunk::set_epoch(&mut buf, self.epoch);
                }
                if active.summary.size > 0
                    && active.summary.size + h.total_len() > self.settings.max_segment_size
                {
                    items.append(&mut pending);
                    self.roll_if_full(h.total_len(), items)?;
                }
                let Some(active) = self.active.as_mut() else {
                    return Err(io::Error::other(
                        "the stream writer lost its active segment",
                    ));
                };
                let pos = active.summary.size;
                active.append(&h, &buf)?;
                self.last = Some((h.first, self.epoch));
                pending.push(CommitItem::Chunk {
                    seg: active.base(),
                    header: h,
                    pos,
                });
            }
            if let Some(active) = self.active.as_mut() {
                active.sync()?;
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                items.append(&mut pending);
                Ok(())
            }
            Err(e) => {
                self.last = None;
                if let Some(active) = self.active.as_mut() {
                    let to = if active.base() == before.base {
                        before
                    } else {
                        super::segment::SegmentSummary {
                            base: active.base(),
                            end: active.base(),
                            ..Default::default()
                        }
                    };
                    if let Err(e2) = active.truncate(&to) {
                        error!(dir = %self.dir.display(), "could not undo a failed stream append: {e2}");
                    }
                }
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream::chunk::{encode, tests::msg};

    fn chunks(first: u64, n: usize) -> (Vec<u8>, u64) {
        let mut out = Vec::new();
        let mut next = first;
        for _ in 0..n {
            let msgs: Vec<_> = (0..2)
                .map(|i| msg(format!("m{}", next + i).as_bytes(), None))
                .collect();
            let mut one = Vec::new();
            let h = encode(next, 1000, &msgs, 16, &mut one);
            set_epoch_for_test(&mut one);
            out.extend_from_slice(&one);
            next = h.next_offset();
        }
        (out, next)
    }

    fn set_epoch_for_test(c: &mut [u8]) {
        chunk::set_epoch(c, 7);
    }

    #[test]
    fn follower_appends_the_leaders_bytes_and_refuses_gaps() {
        let dir = tempfile::tempdir().unwrap();
        let active = ActiveSegment::create(dir.path(), 0).unwrap();
        let (tx, mut ev) = start(
            "t",
            dir.path().to_path_buf(),
            active,
            StreamSettings::default(),
            8,
            true,
        )
        .unwrap();
        let repl = |from: u64, prev: Option<u32>, floor: u64, bytes: Vec<u8>| {
            let (rtx, rrx) = oneshot::channel();
            tx.blocking_send(WriteReq::Replicate {
                from,
                prev_epoch: prev,
                floor,
                chunks: bytes::Bytes::from(bytes),
                reply: rtx,
            })
            .unwrap();
            rrx.blocking_recv().unwrap()
        };
        let (a, end) = chunks(0, 3);
        assert_eq!(repl(0, None, 0, a.clone()), ReplAck::Appended(end));
        // Again from 0, all committed here: nothing is cut, the leader is
        // told where this log ends.
        assert_eq!(repl(0, None, end, a), ReplAck::Mismatch(end));
        // A corrupt chunk is refused and nothing of it kept.
        let (mut b, _) = chunks(end, 1);
        let last = b.len() - 1;
        b[last] ^= 0xff;
        assert_eq!(repl(end, Some(7), 0, b), ReplAck::Failed);
        let (c, end2) = chunks(end, 2);
        assert_eq!(repl(end, Some(7), 0, c), ReplAck::Appended(end2));
        // Truncation back to the first batch.
        tx.blocking_send(WriteReq::Truncate { to: end }).unwrap();
        let (d, end3) = chunks(end, 1);
        assert_eq!(repl(end, Some(7), 0, d), ReplAck::Appended(end3));
        // A leader whose chunk before end3 has another epoch: the last
        // chunk here is cut (it is above the commit) and the leader is
        // asked to resend from before it.
        assert_eq!(repl(end3, Some(5), end, vec![]), ReplAck::Mismatch(end));
        let (d, end3) = chunks(end, 1);
        assert_eq!(repl(end, Some(7), end, d), ReplAck::Appended(end3));
        // A leader behind this log's end (it never had the rest): cut.
        let (e, end4) = chunks(end3, 1);
        assert_eq!(repl(end3, Some(7), end, e), ReplAck::Appended(end4));
        let (e2, end5) = chunks(end3, 1);
        assert_eq!(end5, end4);
        assert_eq!(repl(end3, Some(7), end, e2), ReplAck::Appended(end4));
        let mut saw_truncated = false;
        while let Ok(items) = ev.try_recv() {
            saw_truncated |= items
                .iter()
                .any(|i| matches!(i, CommitItem::Truncated { to, .. } if *to == end));
        }
        assert!(saw_truncated);
        let (stop, done) = oneshot::channel();
        tx.blocking_send(WriteReq::Stop(stop)).unwrap();
        done.blocking_recv().unwrap();
        // The bytes on disk are the leader's, epoch included.
        let (a2, view) = crate::queue::stream::log::open(dir.path()).unwrap();
        assert_eq!(a2.summary.end, end4);
        let mut cur = crate::queue::stream::reader::resolve(
            &view,
            crate::queue::stream::reader::OffsetSpec::First,
        )
        .unwrap();
        let (_, raw) = view.read_raw(&mut cur).unwrap().unwrap();
        assert_eq!(chunk::epoch_of(&raw), 7);
    }
}
