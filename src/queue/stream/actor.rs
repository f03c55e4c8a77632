//! The stream actor: one task per stream queue, behind the same
//! [`QueueRef`] / [`QueueCmd`] interface as classic queues.
//!
//! - Publish: messages go to the writer thread; the writer confirms once
//!   they are fdatasynced and reports the commit back here, which grows
//!   the read view and wakes consumers.
//! - Consume: each consumer has its own cursor (from `x-stream-offset`,
//!   or its tracked offset) and credit (its prefetch). Deliveries carry
//!   the `x-stream-offset` header; acks only give credit back (and, for
//!   tracked consumers, record the offset). Nothing is removed by
//!   consuming.
//! - Decoded chunks (properties re-encoded with the offset header) are
//!   cached, so consumers replaying the same region decode it once.
//! - Consumer groups (`x-stream-group`, see `group.rs`): the coordinator
//!   says which of the group's consumers on this stream reads it
//!   ([`GroupEvent`] on the group inbox); the others get nothing. A new
//!   reader waits for the previous one's deliveries to be settled (at most
//!   [`HANDOFF_WAIT`]), then starts at the group's committed position,
//!   which advances as the reader's deliveries are settled.
//!
//! It never blocks in fsync; it reads chunks with positioned reads (page
//! cache, like the classic queue's paging reads).
//!
//! Replication (cluster mode, see `replica.rs`): the actor keeps two views,
//! `written` (every chunk its writer synced) and `view` (committed: on a
//! majority of the replicas), and consumers read `view` only. As leader it
//! ships chunks from `written` to each follower (pipelined, many chunks per
//! frame), counts the followers' acknowledged tails and sends publisher
//! confirms once a majority wrote a chunk (a new leader commits nothing
//! before a chunk of its own epoch reached a majority, as Raft). As
//! follower it hands the leader's chunks to its writer, forwards
//! publishes to the leader; its writer checks each frame against its log
//! (the epoch of the chunk before it) and cuts back unconfirmed chunks
//! that differ from the leader's.

use super::chunk::{self, ChunkHeader};
use super::filter::FilterSpec;
use super::group::{self, GroupEvent, GroupKey, GroupTx};
use super::reader::{Cursor, LogView, OffsetSpec, Read, parse_offset_arg, resolve};
use super::replica::{ReplEvent, ReplInit, StreamLink};
use super::settings::StreamSettings;
use super::tracking::{self, Offsets};
use super::writer::{self, CommitItem, ReplAck, Waiter, WriteReq};
use super::{log, retention, stream_dir};
use crate::broker::persist::Storage;
use crate::broker::{ConnCmd, ConnTx, VHost};
use crate::cluster::Cluster;
use crate::cluster::net::{RespBody, StreamOffset};
use crate::cluster::types::{NodeId, StreamDef};
use crate::protocol::error::{AmqpError, code};
use crate::queue::core::{ConsumerId, ConsumerSpec, Counts, Envelope, MsgId, Owner};
use crate::queue::message::Message;
use crate::queue::{QueueCmd, QueueRef};
use amq_protocol::types::{AMQPValue, FieldTable};
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// How often retention and offset saving run when nothing else happens.
const TICK: Duration = Duration::from_millis(500);
/// Offsets are written at most this often while acks flow.
const SAVE_EVERY: Duration = Duration::from_millis(200);
/// Decoded chunks kept.
const CACHE_CHUNKS: usize = 32;
/// How long a group's new reader of this stream waits for the previous
/// reader's deliveries to be settled before it starts anyway (they are
/// then delivered again).
pub const HANDOFF_WAIT: Duration = Duration::from_secs(5);

/// How to start a stream actor.
pub struct StreamInit {
    /// Its vhost.
    pub vhost: Arc<VHost>,
    /// Inbox capacity.
    pub inbox: usize,
    /// The broker's data directory.
    pub data_dir: PathBuf,
    /// Definitions and messages store (to forget the queue on delete).
    pub storage: Option<Storage>,
    /// A new declare: discard any leftover files of an older stream with
    /// the same name. False when recovering at start.
    pub fresh: bool,
    /// Cluster mode: this node's replica of a replicated stream.
    pub repl: Option<ReplInit>,
}

/// Stream directories open in this process: two actors must never write
/// the same files (e.g. two connections racing to declare one stream).
static OPEN: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

struct DirLock(PathBuf);

impl DirLock {
    fn take(dir: &Path) -> Option<DirLock> {
        let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        g.get_or_insert_with(HashSet::new)
            .insert(dir.to_path_buf())
            .then(|| DirLock(dir.to_path_buf()))
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = g.as_mut() {
            s.remove(&self.0);
        }
    }
}

/// Creates a stream queue: opens (or recovers) its log, starts its writer
/// thread and its actor task.
pub fn spawn(
    make: impl FnOnce(mpsc::Sender<QueueCmd>) -> QueueRef,
    init: StreamInit,
) -> Result<Arc<QueueRef>, AmqpError> {
    let (tx, rx) = mpsc::channel(init.inbox.max(1));
    let q = Arc::new(make(tx));
    let settings = StreamSettings::from_args(&q.arguments).map_err(|(arg, why)| {
        AmqpError::precondition(format!(
            "invalid arg '{arg}' for queue '{}' in vhost '{}': {why}",
            q.name, q.vhost
        ))
    })?;
    let dir = stream_dir(&init.data_dir, &q.vhost, &q.name);
    let Some(lock) = DirLock::take(&dir) else {
        return Err(AmqpError::new(
            code::RESOURCE_LOCKED,
            format!(
                "stream '{}' in vhost '{}' is being declared by another connection; retry",
                q.name, q.vhost
            ),
        ));
    };
    let fail = |e: std::io::Error| {
        AmqpError::internal(format!(
            "cannot open the files of stream '{}' in vhost '{}' ({}): {e}",
            q.name,
            q.vhost,
            dir.display()
        ))
    };
    if init.fresh {
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(fail(e)),
            _ => {}
        }
    }
    let (active, view) = log::open(&dir).map_err(fail)?;
    let offsets = tracking::load(&dir);
    let (writer, events) = writer::start(
        &q.name,
        dir.clone(),
        active,
        settings.clone(),
        256,
        init.repl.is_some(),
    )
    .map_err(fail)?;
    let (repl_tx, repl_rx) = mpsc::unbounded_channel();
    let mut written = LogView::default();
    let mut view = view;
    let mut pending = VecDeque::new();
    let repl = match init.repl {
        None => None,
        Some(ri) => {
            // Consumers see what is committed; after a restart that is
            // what the replica last knew (the leader's frames move it on).
            let commit = log::read_commit(&dir).min(view.next_offset());
            written = view;
            view = written.limited(commit).map_err(fail)?;
            pending = pending_after(&written, &view).map_err(fail)?;
            let link = Arc::new(StreamLink {
                tx: repl_tx.clone(),
            });
            let me = ri.cluster.upgrade().map_or(0, |c| c.me.id);
            if let Some(c) = ri.cluster.upgrade() {
                super::replica::register(&c, &ri.def.group(), &link);
            }
            let mut st = Box::new(ReplState {
                cluster: ri.cluster,
                group: ri.def.group(),
                def: ri.def,
                me,
                _link: link,
                leading: false,
                epoch_start: 0,
                followers: HashMap::new(),
                waiters: VecDeque::new(),
                commit: view.next_offset(),
                saved_commit: view.next_offset(),
                leader_commit: 0,
                following: 0,
                fence: 0,
                fence_until: 0,
                discard: 0,
                parked: Vec::new(),
            });
            // The role is taken before any command is handled: a publish
            // must not be forwarded to this node itself.
            if st.def.leader == st.me {
                st.lead(written.next_offset(), last_epoch_of(&written));
                if writer.try_send(WriteReq::SetEpoch(st.def.epoch)).is_err() {
                    return Err(AmqpError::internal(format!(
                        "the writer of stream '{}' stopped at start",
                        q.name
                    )));
                }
                debug!(stream = %q.name, epoch = st.def.epoch, "this node leads the stream");
            }
            Some(st)
        }
    };
    let (group_tx, group_rx) = mpsc::unbounded_channel();
    debug!(stream = %q.name, first = view.first_offset(), next = view.next_offset(), "stream opened");
    let actor = StreamActor {
        q: q.clone(),
        vhost: Arc::downgrade(&init.vhost),
        storage: init.storage,
        dir,
        settings,
        view,
        writer,
        consumers: Vec::new(),
        inflight: HashMap::new(),
        next_id: 1,
        offsets,
        offsets_dirty: false,
        last_save: Instant::now(),
        cache: VecDeque::new(),
        data_dir: init.data_dir,
        partition: Arc::from(q.name.as_str()),
        groups: HashMap::new(),
        group_tx,
        _lock: lock,
        repl,
        written,
        pending,
        repl_tx,
    };
    let span = tracing::debug_span!("stream", name = %q.name, vhost = %q.vhost);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(rx, events, group_rx, repl_rx),
        span,
    ));
    Ok(q)
}

/// One decoded message: offset, filter value, the message as delivered.
pub(super) type Decoded = (u64, Option<Bytes>, Arc<Message>);

struct Consumer {
    id: ConsumerId,
    tag: Arc<str>,
    conn: ConnTx,
    owner: Owner,
    prefetch: u32,
    inflight: u32,
    cursor: Cursor,
    pending: Option<(Arc<Vec<Decoded>>, usize)>,
    filter: Option<FilterSpec>,
    /// Offsets tracked by the server under this tag.
    track: bool,
    /// Member of a consumer group (`x-stream-group`).
    group: Option<GroupRead>,
}

/// A group consumer's reading, for the group's committed position.
struct GroupRead {
    name: Arc<str>,
    /// Offsets delivered and not settled yet.
    outstanding: BTreeSet<u64>,
    /// The offset after the last one delivered.
    next: u64,
}

/// One consumer group reading this stream.
struct GroupPart {
    /// The consumer the coordinator gave this stream to (None: nobody).
    assigned: Option<ConsumerId>,
    /// The consumer whose deliveries define the committed position: the
    /// one reading, or during a handover the previous one.
    reader: Option<ConsumerId>,
    /// When `assigned` last changed.
    since: Instant,
}

struct StreamActor {
    q: Arc<QueueRef>,
    vhost: Weak<VHost>,
    storage: Option<Storage>,
    dir: PathBuf,
    settings: StreamSettings,
    view: LogView,
    writer: mpsc::Sender<WriteReq>,
    consumers: Vec<Consumer>,
    /// Delivery id -> (consumer, offset).
    inflight: HashMap<MsgId, (ConsumerId, u64)>,
    next_id: MsgId,
    offsets: Offsets,
    offsets_dirty: bool,
    last_save: Instant,
    cache: VecDeque<(u64, Arc<Vec<Decoded>>)>,
    /// The broker's data directory (groups are per broker).
    data_dir: PathBuf,
    /// This stream's name, as the group coordinator knows it.
    partition: Arc<str>,
    /// Consumer groups with consumers here.
    groups: HashMap<Arc<str>, GroupPart>,
    /// The group inbox, given to the coordinator.
    group_tx: GroupTx,
    _lock: DirLock,
    /// Replication state (cluster mode only).
    repl: Option<Box<ReplState>>,
    /// Replicated: every synced chunk (`view` holds the committed ones).
    written: LogView,
    /// Replicated: synced, not yet committed, in order.
    pending: VecDeque<CommitItem>,
    /// Replicated: the actor's own cluster inbox (answers from followers).
    repl_tx: mpsc::UnboundedSender<ReplEvent>,
}

/// How long a failover's fence holds without the election completing.
const FENCE_MS: u64 = 10_000;
/// Frames in flight to one follower, at most.
const MAX_INFLIGHT: usize = 4;
/// Bytes of chunks per frame to a follower, about.
const FRAME_BYTES: usize = 1 << 20;

/// The replication role and state of a replicated stream's actor.
struct ReplState {
    cluster: Weak<Cluster>,
    group: String,
    def: StreamDef,
    me: NodeId,
    /// Keeps the registration in `Cluster::queue_ctxs` alive.
    _link: Arc<StreamLink>,
    /// This node appends (def.leader == me).
    leading: bool,
    /// Leader: the tail when it took over; nothing is committed by
    /// counting until a chunk after it (of its own epoch) is on a majority.
    epoch_start: u64,
    /// Leader: shipping state per follower.
    followers: HashMap<NodeId, Follower>,
    /// Leader: publishers waiting for a commit, by the offset after their
    /// last message.
    waiters: VecDeque<(u64, Waiter)>,
    /// Committed offset as known here (`view` ends there).
    commit: u64,
    /// Last commit handed to the writer to store.
    saved_commit: u64,
    /// Follower: the leader's commit offset from its last frame.
    leader_commit: u64,
    /// Follower: epoch of the leader followed (0: none yet since start).
    following: u32,
    /// Refuse frames from leaders of epochs below this (a failover began)
    /// until `fence_until`: if the election does not complete, the old
    /// leader is followed again.
    fence: u32,
    /// When the fence lapses (ms since the epoch).
    fence_until: u64,
    /// Follower: Truncate/Reset requests the writer has not reported yet;
    /// its other events are stale until then.
    discard: u32,
    /// Leader: reads from nodes without a replica waiting for new chunks.
    parked: Vec<ParkedRead>,
}

/// A remote reader's request held until chunks are committed after `from`.
struct ParkedRead {
    from: u64,
    max_bytes: u32,
    until: u64,
    reply: oneshot::Sender<Result<RespBody, String>>,
}

/// What the leader knows about one follower.
#[derive(Debug, Default)]
struct Follower {
    /// Next offset to ship.
    next: u64,
    /// Its acknowledged (synced) tail.
    acked: u64,
    /// Frames awaiting an answer.
    inflight: usize,
    /// Bumped when shipping restarts; older answers are ignored.
    generation: u64,
    /// Commit offset last sent.
    sent_commit: u64,
    /// Do not retry before (ms since the epoch).
    retry_at: u64,
    /// It answered since this node took the lead (until then, a frame is
    /// sent even with nothing to ship: its answer says where it is).
    probed: bool,
    /// Its last mismatch answer's tail and how often in a row.
    mismatch: (u64, u32),
    /// It cannot cut its log back to match (below its commit): restart it
    /// at this node's first offset.
    force_reset: bool,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The `x-stream-offset` header table entry: name length, name, type
/// `l` (signed 64-bit, as RabbitMQ sends it), value.
const OFFSET_ENTRY_LEN: usize = 1 + 15 + 1 + 8;

fn offset_entry(offset: u64, out: &mut Vec<u8>) {
    out.push(15);
    out.extend_from_slice(b"x-stream-offset");
    out.push(b'l');
    out.extend_from_slice(&(offset as i64).to_be_bytes());
}

/// Appends to `out` the wire property list `raw` with an `x-stream-offset`
/// header added, without decoding it: the headers table (property 3) is
/// created, or the entry is appended to it. False (nothing usable in
/// `out`) when `raw` is malformed, has a second flags word, or already has
/// a header of that name; the caller then takes the slow path.
fn splice_offset_header(raw: &[u8], offset: u64, out: &mut Vec<u8>) -> bool {
    const CONTENT_TYPE: u16 = 1 << 15;
    const CONTENT_ENCODING: u16 = 1 << 14;
    const HEADERS: u16 = 1 << 13;
    let Some(flags) = raw.get(0..2).map(|b| u16::from_be_bytes([b[0], b[1]])) else {
        return false;
    };
    if flags & 1 != 0 {
        return false;
    }
    let mut pos = 2;
    for bit in [CONTENT_TYPE, CONTENT_ENCODING] {
        if flags & bit != 0 {
            let Some(&n) = raw.get(pos) else {
                return false;
            };
            pos += 1 + n as usize;
        }
    }
    if pos > raw.len() {
        return false;
    }
    if flags & HEADERS == 0 {
        out.extend_from_slice(&(flags | HEADERS).to_be_bytes());
        out.extend_from_slice(&raw[2..pos]);
        out.extend_from_slice(&(OFFSET_ENTRY_LEN as u32).to_be_bytes());
        offset_entry(offset, out);
        out.extend_from_slice(&raw[pos..]);
        return true;
    }
    let Some(len) = raw
        .get(pos..pos + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
    else {
        return false;
    };
    let Some(table) = raw.get(pos + 4..pos + 4 + len) else {
        return false;
    };
    // Conservative: any occurrence of the key (even inside a value) means
    // the slow path, which replaces the header.
    if table
        .windows(16)
        .any(|w| w[0] == 15 && &w[1..] == b"x-stream-offset")
    {
        return false;
    }
    out.extend_from_slice(&raw[..pos]);
    out.extend_from_slice(&((len + OFFSET_ENTRY_LEN) as u32).to_be_bytes());
    out.extend_from_slice(table);
    offset_entry(offset, out);
    out.extend_from_slice(&raw[pos + 4 + len..]);
    true
}

/// The slow path of [`splice_offset_header`]: decode, set the header,
/// encode.
fn with_offset_header(raw: &[u8], offset: u64) -> Option<Bytes> {
    let (rest, props) = amq_protocol::protocol::basic::parse_properties(raw).ok()?;
    if !rest.is_empty() {
        return None;
    }
    let mut headers = props.headers().clone().unwrap_or_default();
    headers.insert(
        "x-stream-offset".into(),
        AMQPValue::LongLongInt(offset as i64),
    );
    Some(crate::protocol::frame::encode_properties(
        &props.with_headers(headers),
    ))
}

/// Decodes a chunk into deliverable messages, each with its
/// `x-stream-offset` header. The delivery path writes only the wire
/// properties (`raw_properties`, which carry the header; all of a chunk's
/// in one buffer); `properties` is the message's stored property list,
/// decoded, without it.
pub(super) fn decode(h: &ChunkHeader, data: Bytes) -> Option<Vec<Decoded>> {
    let recs = chunk::records(data, h.count)?;
    let mut buf = Vec::with_capacity(
        recs.iter()
            .map(|r| r.properties.len() + 4 + OFFSET_ENTRY_LEN)
            .sum(),
    );
    let mut spans = Vec::with_capacity(recs.len());
    for (i, r) in recs.iter().enumerate() {
        let offset = h.first + i as u64;
        let start = buf.len();
        if !splice_offset_header(&r.properties, offset, &mut buf) {
            buf.truncate(start);
            buf.extend_from_slice(&with_offset_header(&r.properties, offset)?);
        }
        spans.push(start..buf.len());
    }
    let buf = Bytes::from(buf);
    let mut out = Vec::with_capacity(recs.len());
    for ((i, r), span) in recs.into_iter().enumerate().zip(spans) {
        let (rest, properties) =
            amq_protocol::protocol::basic::parse_properties(&r.properties[..]).ok()?;
        if !rest.is_empty() {
            return None;
        }
        let m = Message {
            exchange: r.exchange,
            routing_key: r.routing_key,
            properties,
            raw_properties: buf.slice(span),
            body: r.body,
        };
        out.push((h.first + i as u64, r.filter, Arc::new(m)));
    }
    Some(out)
}

/// The next message for `c`, reading (or taking from the cache) chunks as
/// needed. None when it has read everything committed.
fn next_message(
    view: &LogView,
    cache: &mut VecDeque<(u64, Arc<Vec<Decoded>>)>,
    c: &mut Consumer,
) -> std::io::Result<Option<(u64, Arc<Message>)>> {
    loop {
        if let Some((d, i)) = c.pending.as_mut() {
            while let Some((off, f, m)) = d.get(*i) {
                *i += 1;
                if *off < c.cursor.from {
                    continue;
                }
                if c.filter
                    .as_ref()
                    .is_some_and(|fs| !fs.matches(f.as_deref()))
                {
                    continue;
                }
                return Ok(Some((*off, m.clone())));
            }
            c.pending = None;
        }
        let from = c.cursor.from;
        let got = view.read_chunk_if(&mut c.cursor, |h| {
            h.next_offset() > from && !cache.iter().any(|(f, _)| *f == h.first)
        })?;
        match got {
            None => return Ok(None),
            Some(Read::Skipped(h)) => {
                if let Some((_, d)) = cache.iter().find(|(f, _)| *f == h.first) {
                    c.pending = Some((d.clone(), 0));
                }
            }
            Some(Read::Chunk(ch)) => {
                if c.filter
                    .as_ref()
                    .is_some_and(|fs| !fs.chunk_may_match(&ch.bloom))
                {
                    continue;
                }
                let Some(d) = decode(&ch.header, ch.data) else {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("chunk at offset {} cannot be decoded", ch.header.first),
                    ));
                };
                let d = Arc::new(d);
                if cache.len() >= CACHE_CHUNKS {
                    cache.pop_front();
                }
                cache.push_back((ch.header.first, d.clone()));
                c.pending = Some((d, 0));
            }
        }
    }
}

enum Flow {
    Continue,
    Stop,
}

impl StreamActor {
    async fn run(
        mut self,
        mut rx: mpsc::Receiver<QueueCmd>,
        mut events: mpsc::UnboundedReceiver<Vec<CommitItem>>,
        mut group_rx: mpsc::UnboundedReceiver<GroupEvent>,
        mut repl_rx: mpsc::UnboundedReceiver<ReplEvent>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut cmds = Vec::with_capacity(64);
        loop {
            tokio::select! {
                n = rx.recv_many(&mut cmds, 64) => {
                    if n == 0 {
                        self.leave_groups(None);
                        break;
                    }
                    for cmd in cmds.drain(..) {
                        if let Flow::Stop = self.handle(cmd).await {
                            debug!("stream deleted");
                            return;
                        }
                    }
                }
                Some(items) = events.recv() => {
                    let mut rolled = self.apply(items);
                    while let Ok(more) = events.try_recv() {
                        rolled |= self.apply(more);
                    }
                    if rolled {
                        self.retention();
                    }
                }
                Some(ev) = group_rx.recv() => {
                    self.on_group_event(ev);
                    while let Ok(ev) = group_rx.try_recv() {
                        self.on_group_event(ev);
                    }
                }
                Some(ev) = repl_rx.recv() => {
                    self.on_repl(ev).await;
                    while let Ok(ev) = repl_rx.try_recv() {
                        self.on_repl(ev).await;
                    }
                    self.advance_commit();
                    self.pump();
                }
                _ = tick.tick() => {
                    self.retention();
                    self.save_offsets(true);
                    if self.repl.is_some() {
                        self.save_commit();
                        self.pump();
                        self.serve_parked(true);
                    }
                }
            }
            self.dispatch();
            self.save_offsets(false);
            if self.repl.is_some() {
                self.pump();
            }
        }
    }

    /// Applies a commit to the view; true if a segment was sealed.
    fn apply(&mut self, items: Vec<CommitItem>) -> bool {
        if self.repl.is_some() {
            return self.apply_replicated(items);
        }
        let mut rolled = false;
        for it in items {
            match it {
                CommitItem::Segment { base, file } => {
                    self.view.push_segment(base, file);
                    rolled = true;
                }
                CommitItem::Chunk { seg, header, pos } => self.view.add_chunk(seg, &header, pos),
                // Only replicated writers send these.
                CommitItem::Durable { waiters, .. } => {
                    for w in waiters {
                        w.finish(true);
                    }
                }
                CommitItem::Truncated { .. } | CommitItem::Reset { .. } => {}
            }
        }
        rolled
    }

    fn retention(&mut self) {
        let k = retention::plan(&self.view, &self.settings, now_ms());
        if k == 0 {
            return;
        }
        let gone: Vec<u64> = self
            .view
            .segments
            .drain(..k)
            .map(|s| s.summary.base)
            .collect();
        if self.repl.is_some() {
            self.written
                .segments
                .retain(|s| !gone.contains(&s.summary.base));
        }
        debug!(segments = ?gone, first = self.view.first_offset(), "retention deletes old segments");
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || retention::remove_segments(&dir, &gone));
    }

    fn save_offsets(&mut self, now: bool) {
        if !self.offsets_dirty || (!now && self.last_save.elapsed() < SAVE_EVERY) {
            return;
        }
        if self
            .writer
            .try_send(WriteReq::SaveOffsets(tracking::encode(&self.offsets)))
            .is_ok()
        {
            self.offsets_dirty = false;
            self.last_save = Instant::now();
        }
    }

    async fn handle(&mut self, cmd: QueueCmd) -> Flow {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                let msgs: Vec<Arc<Message>> = msgs.into_iter().map(|(m, _)| m).collect();
                if let Some(r) = self.repl.as_ref().filter(|r| !r.leading) {
                    match r.cluster.upgrade() {
                        Some(c) => super::replica::forward_publish(
                            &c,
                            &r.group,
                            r.def.leader,
                            &msgs,
                            confirm,
                        ),
                        None => {
                            if let Some(c) = confirm {
                                Waiter::Conn(c).finish(false);
                            }
                        }
                    }
                    return Flow::Continue;
                }
                if let Err(e) = self.writer.send(WriteReq::Append { msgs, confirm }).await {
                    // The writer is gone (it only stops on delete).
                    if let WriteReq::Append {
                        confirm: Some(c), ..
                    } = e.0
                    {
                        let _ = c.conn.send(ConnCmd::Confirm {
                            channel: c.channel,
                            seqs: c.seqs,
                            nack: true,
                        });
                    }
                }
            }
            QueueCmd::Consume {
                spec,
                conn,
                tag,
                reply,
                args,
            } => {
                let r = self.add_consumer(spec, conn, tag, &args);
                let _ = reply.send(r);
            }
            QueueCmd::Cancel { consumer, reply } => {
                for (id, g) in self.remove_consumers(|c| c.id == consumer) {
                    if let Some(g) = g {
                        group::leave(&self.group_key(&g), id);
                    }
                }
                self.save_offsets(true);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::ChannelClosed { owner } => {
                let mut left: Vec<Arc<str>> = Vec::new();
                for (_, g) in self.remove_consumers(|c| c.owner == owner) {
                    if let Some(g) = g.filter(|g| !left.contains(g)) {
                        group::leave_member(&self.group_key(&g), owner);
                        left.push(g);
                    }
                }
                self.save_offsets(true);
            }
            QueueCmd::Settle { ids, .. } => self.settle(&ids),
            QueueCmd::Get { reply, .. } => {
                // The channel refuses basic.get on streams before it gets here.
                let _ = reply.send(None);
            }
            QueueCmd::Credit { .. }
            | QueueCmd::Kick
            | QueueCmd::Touch
            | QueueCmd::PolicyChanged => {}
            // Nothing to save: a stream's state is its log and offsets.
            QueueCmd::SaveSnapshot { reply } => {
                let _ = reply.send(());
            }
            QueueCmd::Peek { reply, .. } => {
                // Nothing is "ready" in a stream: read it with a consumer.
                let _ = reply.send(Vec::new());
            }
            QueueCmd::Consumers { reply } => {
                let list = self
                    .consumers
                    .iter()
                    .map(|c| crate::queue::ConsumerInfo {
                        tag: c.tag.to_string(),
                        channel: c.owner.channel,
                        conn: c.conn.clone(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            QueueCmd::Purge { reply } => {
                let _ = reply.send(0);
            }
            QueueCmd::Stats { reply } => {
                let _ = reply.send(Counts {
                    consumers: self.consumers.len() as u64,
                    ready_bytes: self.view.bytes(),
                    ..Default::default()
                });
            }
            QueueCmd::Delete {
                if_unused, reply, ..
            } => {
                if if_unused && !self.consumers.is_empty() {
                    if let Some(r) = reply {
                        let _ = r.send(Err(AmqpError::precondition(format!(
                            "queue '{}' in vhost '{}' in use",
                            self.q.name, self.q.vhost
                        ))));
                    }
                    return Flow::Continue;
                }
                if self.repl.is_some() && reply.is_some() {
                    // From a client or the API: delete everywhere; this
                    // replica goes when the metadata command applies.
                    if let (Some(r), Some(reply)) = (self.repl.as_ref(), reply) {
                        let (c, vh, name) =
                            (r.cluster.clone(), self.q.vhost.clone(), self.q.name.clone());
                        tokio::spawn(async move {
                            let res = match c.upgrade() {
                                Some(c) => super::replica::delete(&c, &vh, &name)
                                    .await
                                    .map(|_| 0)
                                    .map_err(|e| {
                                        AmqpError::internal(format!(
                                            "cannot delete stream '{name}' in vhost '{vh}': {e}"
                                        ))
                                    }),
                                None => Err(AmqpError::internal("the node is shutting down")),
                            };
                            let _ = reply.send(res);
                        });
                    }
                    return Flow::Continue;
                }
                self.delete().await;
                if let Some(r) = reply {
                    let _ = r.send(Ok(0));
                }
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    fn add_consumer(
        &mut self,
        spec: ConsumerSpec,
        conn: ConnTx,
        tag: Arc<str>,
        args: &FieldTable,
    ) -> Result<(), AmqpError> {
        let shared = spec
            .shared
            .as_ref()
            .map_or(0, |s| s.limit.load(std::sync::atomic::Ordering::Relaxed));
        let prefetch = if spec.prefetch > 0 {
            spec.prefetch
        } else {
            shared
        };
        if spec.no_ack || prefetch == 0 {
            return Err(AmqpError::precondition(format!(
                "consumer prefetch count is not set for stream queue '{}' in vhost '{}'",
                self.q.name, self.q.vhost
            )));
        }
        let offset_arg = args.inner().get("x-stream-offset");
        let mut start = parse_offset_arg(offset_arg, now_ms()).map_err(|why| {
            AmqpError::precondition(format!(
                "{why} for stream queue '{}' in vhost '{}'",
                self.q.name, self.q.vhost
            ))
        })?;
        let auto = match args.inner().get("x-stream-automatic-offset-tracking") {
            Some(AMQPValue::Boolean(b)) => Some(*b),
            Some(v) => crate::broker::headers::value_str(v).map(|s| s == "true"),
            None => None,
        };
        let group: Option<Arc<str>> = match args.inner().get("x-stream-group") {
            None => None,
            Some(v) => match crate::broker::headers::value_str(v) {
                Some(g) if !g.is_empty() && g.len() <= 255 => Some(Arc::from(g)),
                _ => {
                    return Err(AmqpError::precondition(format!(
                        "invalid x-stream-group for stream queue '{}' in vhost '{}': expected a group name (a string of 1 to 255 bytes)",
                        self.q.name, self.q.vhost
                    )));
                }
            },
        };
        // A group's position is the group's, not the tag's.
        let track = group.is_none()
            && auto.unwrap_or(offset_arg.is_none() && !tag.starts_with("amq.ctag-"));
        if track && let Some(o) = self.offsets.consumers.get(&*tag) {
            start = OffsetSpec::Offset(o + 1);
        }
        let cursor = resolve(&self.view, start).map_err(|e| {
            AmqpError::internal(format!("cannot read stream '{}': {e}", self.q.name))
        })?;
        debug!(tag = %tag, ?start, from = cursor.from, track, group = ?group, "stream consumer attached");
        let owner = spec.owner;
        let id = spec.id;
        self.consumers.push(Consumer {
            id: spec.id,
            tag,
            conn,
            owner: spec.owner,
            prefetch,
            inflight: 0,
            cursor,
            pending: None,
            filter: FilterSpec::from_args(args),
            track,
            group: group.as_ref().map(|g| GroupRead {
                name: g.clone(),
                outstanding: BTreeSet::new(),
                next: cursor.from,
            }),
        });
        if let Some(g) = group {
            self.groups.entry(g.clone()).or_insert_with(|| GroupPart {
                assigned: None,
                reader: None,
                since: Instant::now(),
            });
            group::join(
                &self.group_key(&g),
                &self.partition,
                owner,
                id,
                &self.group_tx,
            );
        }
        Ok(())
    }

    fn group_key(&self, group: &Arc<str>) -> GroupKey {
        GroupKey {
            data_dir: self.data_dir.clone(),
            vhost: self.q.vhost.clone(),
            group: group.clone(),
        }
    }

    /// Tells the coordinator that this stream's group consumers are gone
    /// (all of them, or the one given).
    fn leave_groups(&self, only: Option<ConsumerId>) {
        for c in &self.consumers {
            if let Some(g) = c.group.as_ref().filter(|_| only.is_none_or(|o| o == c.id)) {
                group::leave(&self.group_key(&g.name), c.id);
            }
        }
    }

    fn on_group_event(&mut self, ev: GroupEvent) {
        match ev {
            GroupEvent::Assign { group, consumer } => {
                let Some(part) = self.groups.get_mut(&group) else {
                    return;
                };
                if part.assigned != consumer {
                    debug!(group = %group, ?consumer, reader = ?part.reader, "stream group reader assigned");
                    part.assigned = consumer;
                    part.since = Instant::now();
                }
            }
        }
    }

    /// Starts each group's assigned consumer once the previous reader's
    /// deliveries are settled (or it is gone, or [`HANDOFF_WAIT`] passed),
    /// at the group's committed position.
    fn handoffs(&mut self) {
        for (name, part) in self.groups.iter_mut() {
            let Some(x) = part.assigned else {
                continue;
            };
            if part.reader == Some(x) {
                continue;
            }
            let Some(xi) = self.consumers.iter().position(|c| c.id == x) else {
                continue;
            };
            let busy = part.reader.is_some_and(|r| {
                self.consumers
                    .iter()
                    .find(|c| c.id == r)
                    .and_then(|c| c.group.as_ref())
                    .is_some_and(|g| !g.outstanding.is_empty())
            });
            if busy && part.since.elapsed() < HANDOFF_WAIT {
                continue;
            }
            let c = &mut self.consumers[xi];
            let start = match self.offsets.groups.get(&**name) {
                Some(&pos) => match resolve(&self.view, OffsetSpec::Offset(pos)) {
                    Ok(cur) => cur,
                    Err(e) => {
                        error!(group = %name, "cannot read the stream at the group's position: {e}");
                        continue;
                    }
                },
                // The group's first reader here: where its x-stream-offset said.
                None => c.cursor,
            };
            c.cursor = start;
            c.pending = None;
            if let Some(g) = c.group.as_mut() {
                g.outstanding.clear();
                g.next = start.from;
            }
            debug!(group = %name, consumer = x, tag = %c.tag, previous = ?part.reader, from = start.from, timed_out = busy, "stream group reader starts");
            part.reader = Some(x);
            self.offsets.groups.insert(name.to_string(), start.from);
            self.offsets_dirty = true;
        }
    }

    /// Removes consumers; returns (id, group) of each.
    fn remove_consumers(
        &mut self,
        pred: impl Fn(&Consumer) -> bool,
    ) -> Vec<(ConsumerId, Option<Arc<str>>)> {
        let gone: Vec<(ConsumerId, Option<Arc<str>>)> = self
            .consumers
            .iter()
            .filter(|c| pred(c))
            .map(|c| (c.id, c.group.as_ref().map(|g| g.name.clone())))
            .collect();
        if gone.is_empty() {
            return gone;
        }
        self.consumers
            .retain(|c| !gone.iter().any(|(id, _)| *id == c.id));
        self.inflight
            .retain(|_, (c, _)| !gone.iter().any(|(id, _)| id == c));
        if gone.iter().any(|(_, g)| g.is_some()) {
            let consumers = &self.consumers;
            self.groups.retain(|name, _| {
                consumers
                    .iter()
                    .any(|c| c.group.as_ref().is_some_and(|g| g.name == *name))
            });
        }
        gone
    }

    fn settle(&mut self, ids: &[MsgId]) {
        for id in ids {
            let Some((cid, off)) = self.inflight.remove(id) else {
                continue;
            };
            let Some(c) = self.consumers.iter_mut().find(|c| c.id == cid) else {
                continue;
            };
            c.inflight = c.inflight.saturating_sub(1);
            if c.track {
                let e = self
                    .offsets
                    .consumers
                    .entry(c.tag.to_string())
                    .or_insert(off);
                *e = (*e).max(off);
                self.offsets_dirty = true;
            }
            if let Some(g) = c.group.as_mut() {
                g.outstanding.remove(&off);
                if self
                    .groups
                    .get(&g.name)
                    .is_some_and(|p| p.reader == Some(cid))
                {
                    let pos = g.outstanding.first().copied().unwrap_or(g.next);
                    let e = self.offsets.groups.entry(g.name.to_string()).or_insert(pos);
                    if pos > *e {
                        *e = pos;
                        self.offsets_dirty = true;
                    }
                }
            }
        }
    }

    fn dispatch(&mut self) {
        if !self.groups.is_empty() {
            self.handoffs();
        }
        let mut dead = Vec::new();
        for c in self.consumers.iter_mut() {
            if let Some(g) = &c.group {
                let reading = self
                    .groups
                    .get(&g.name)
                    .is_some_and(|p| p.assigned == Some(c.id) && p.reader == Some(c.id));
                if !reading {
                    continue;
                }
            }
            let mut batch = Vec::new();
            while c.inflight < c.prefetch {
                match next_message(&self.view, &mut self.cache, c) {
                    Ok(Some((off, m))) => {
                        let id = self.next_id;
                        self.next_id += 1;
                        self.inflight.insert(id, (c.id, off));
                        c.inflight += 1;
                        if let Some(g) = c.group.as_mut() {
                            g.outstanding.insert(off);
                            g.next = off + 1;
                        }
                        let size = m.body.len().min(u32::MAX as usize) as u32;
                        batch.push(Envelope {
                            id,
                            gid: 0,
                            msg: Some(m),
                            size,
                            delivery_count: 0,
                            redelivered: false,
                            expires: 0,
                            priority: 0,
                        });
                    }
                    Ok(None) => break,
                    Err(e) => {
                        error!(tag = %c.tag, "reading the stream failed; the consumer is cancelled: {e}");
                        dead.push(c.id);
                        break;
                    }
                }
            }
            if batch.is_empty() {
                continue;
            }
            let cmd = ConnCmd::Deliver {
                channel: c.owner.channel,
                consumer: c.id,
                tag: c.tag.clone(),
                queue: self.q.clone(),
                msgs: batch,
            };
            if c.conn.send(cmd).is_err() {
                dead.push(c.id);
            }
        }
        for id in dead {
            if let Some(c) = self.consumers.iter().find(|c| c.id == id) {
                let _ = c.conn.send(ConnCmd::ConsumerCancelled {
                    channel: c.owner.channel,
                    consumer: id,
                    revoked: false,
                });
            }
            self.leave_groups(Some(id));
            self.remove_consumers(|c| c.id == id);
        }
    }

    /// Deletes the stream: consumers cancelled, writer stopped, files and
    /// definition removed.
    async fn delete(&mut self) {
        self.q.mark_deleted();
        let mut dropped_exchanges = Vec::new();
        if let Some(vhost) = self.vhost.upgrade() {
            dropped_exchanges = vhost.forget_queue(&self.q);
        }
        self.leave_groups(None);
        self.groups.clear();
        for c in self.consumers.drain(..) {
            let _ = c.conn.send(ConnCmd::ConsumerCancelled {
                channel: c.owner.channel,
                consumer: c.id,
                revoked: false,
            });
        }
        let (tx, rx) = oneshot::channel();
        if self.writer.send(WriteReq::Stop(tx)).await.is_ok() {
            let _ = rx.await;
        }
        self.view.segments.clear();
        self.cache.clear();
        let dir = self.dir.clone();
        let removed = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(&dir)).await;
        if let Ok(Err(e)) = removed {
            warn!(dir = %self.dir.display(), "could not remove the deleted stream's files: {e}");
        }
        if let Some(st) = &self.storage {
            if let Err(e) = st
                .delete_queue(&self.q.vhost, &self.q.name, self.q.id)
                .await
            {
                error!(
                    "could not remove the deleted stream from the definitions store: {e}; it may reappear after a restart"
                );
            }
            for x in dropped_exchanges {
                let _ = st.delete_exchange(&self.q.vhost, &x).await;
            }
        }
    }
}

/// Applies one writer item to a view; true if it started a segment.
fn apply_item(view: &mut LogView, it: &CommitItem) -> bool {
    match it {
        CommitItem::Segment { base, file } => {
            view.push_segment(*base, file.clone());
            true
        }
        CommitItem::Chunk { seg, header, pos } => {
            view.add_chunk(*seg, header, *pos);
            false
        }
        _ => false,
    }
}

/// Whether a pending item lies at or before offset `to`.
fn item_within(it: &CommitItem, to: u64) -> bool {
    match it {
        CommitItem::Segment { base, .. } => *base <= to,
        CommitItem::Chunk { header, .. } => header.next_offset() <= to,
        _ => false,
    }
}

fn now_ms_u() -> u64 {
    crate::cluster::net::now_ms()
}

/// The chunks (and segment starts) of `written` after the end of `view`,
/// a prefix of it, as writer items: what a restarted replica holds but
/// has not seen committed yet.
fn pending_after(written: &LogView, view: &LogView) -> std::io::Result<VecDeque<CommitItem>> {
    let mut out = VecDeque::new();
    let (last_base, mut pos) = view
        .segments
        .back()
        .map_or((0, 0), |s| (s.summary.base, s.summary.size));
    for s in &written.segments {
        if s.summary.base < last_base {
            continue;
        }
        if s.summary.base > last_base || view.segments.is_empty() {
            out.push_back(CommitItem::Segment {
                base: s.summary.base,
                file: s.file.clone(),
            });
            pos = 0;
        }
        while pos < s.summary.size {
            let Some(h) = super::segment::read_header(&s.file, pos)? else {
                break;
            };
            out.push_back(CommitItem::Chunk {
                seg: s.summary.base,
                header: h,
                pos,
            });
            pos += h.total_len();
        }
    }
    Ok(out)
}

/// The epoch stamped in the last chunk of `view` (0: empty log).
fn last_epoch_of(view: &LogView) -> u32 {
    for s in view.segments.iter().rev() {
        if let Some((_, pos)) = s.summary.last_chunk {
            let mut b = [0u8; chunk::HEADER_LEN];
            use std::os::unix::fs::FileExt;
            if s.file.read_exact_at(&mut b, pos).is_ok() {
                return chunk::epoch_of(&b);
            }
            return 0;
        }
    }
    0
}

impl ReplState {
    /// Takes the leader's role with the log ending at `tail`, whose last
    /// chunk has epoch `last`.
    fn lead(&mut self, tail: u64, last: u32) {
        // A restarted leader of the same epoch wrote everything after its
        // stored commit itself; a new epoch commits nothing older by
        // counting (Raft's rule).
        self.epoch_start = if last == self.def.epoch {
            self.commit.min(tail)
        } else {
            tail
        };
        self.leading = true;
        self.followers = self
            .def
            .members
            .iter()
            .filter(|m| **m != self.me)
            .map(|m| {
                (
                    *m,
                    Follower {
                        next: tail,
                        ..Default::default()
                    },
                )
            })
            .collect();
    }
}

/// Replication (cluster mode): see the module header.
impl StreamActor {
    /// Writer items of a replicated stream: into `written` at once, into
    /// `view` once committed. True if a segment was started.
    fn apply_replicated(&mut self, items: Vec<CommitItem>) -> bool {
        let mut rolled = false;
        for it in items {
            let discard = self.repl.as_ref().is_some_and(|r| r.discard > 0);
            match it {
                CommitItem::Truncated { to, active } => {
                    if let Some(r) = self.repl.as_mut() {
                        r.discard = r.discard.saturating_sub(1);
                    }
                    self.rebuild_written(to);
                    // The writer's active segment may have been started
                    // while its items were being discarded.
                    if let Some((base, file)) = active
                        && !self.written.segments.iter().any(|s| s.summary.base == base)
                    {
                        let it = CommitItem::Segment { base, file };
                        rolled |= apply_item(&mut self.written, &it);
                        self.pending.push_back(it);
                    }
                }
                CommitItem::Reset { base, file } => {
                    let mut v = LogView::default();
                    v.push_segment(base, file);
                    self.view = v.clone();
                    self.written = v;
                    self.pending.clear();
                    self.cache.clear();
                    if let Some(r) = self.repl.as_mut() {
                        r.discard = r.discard.saturating_sub(1);
                        r.commit = base;
                        r.saved_commit = 0;
                    }
                    rolled = true;
                }
                CommitItem::Durable { upto, waiters } => {
                    match self.repl.as_mut().filter(|r| r.leading && !discard) {
                        Some(r) => r.waiters.extend(waiters.into_iter().map(|w| (upto, w))),
                        // No longer leading: the publisher republishes.
                        None => waiters.into_iter().for_each(|w| w.finish(false)),
                    }
                }
                it if discard => drop(it),
                it => {
                    rolled |= apply_item(&mut self.written, &it);
                    self.pending.push_back(it);
                }
            }
        }
        self.advance_commit();
        rolled
    }

    /// `written` rebuilt as `view` plus the pending items up to `to` (the
    /// writer cut its log there).
    fn rebuild_written(&mut self, to: u64) {
        let mut w = self.view.clone();
        let keep: VecDeque<CommitItem> = self
            .pending
            .drain(..)
            .filter(|it| item_within(it, to))
            .collect();
        for it in &keep {
            apply_item(&mut w, it);
        }
        self.written = w;
        self.pending = keep;
    }

    /// Moves the commit offset (leader: the majority's acknowledged tail;
    /// follower: the leader's commit, as far as written here), makes the
    /// newly committed chunks readable and answers their publishers.
    fn advance_commit(&mut self) {
        let tail = self.written.next_offset();
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        let candidate = if r.leading {
            let mut tails: Vec<u64> = vec![tail];
            for m in &r.def.members {
                if *m != r.me {
                    tails.push(r.followers.get(m).map_or(0, |f| f.acked.min(tail)));
                }
            }
            tails.sort_unstable_by(|a, b| b.cmp(a));
            let majority = tails
                .get(r.def.members.len().max(1) / 2)
                .copied()
                .unwrap_or(0);
            if majority > r.epoch_start {
                majority
            } else {
                0
            }
        } else {
            r.leader_commit.min(tail)
        };
        if candidate <= r.commit {
            return;
        }
        r.commit = candidate;
        let commit = candidate;
        let mut rolled = false;
        while let Some(it) = self.pending.front() {
            if !item_within(it, commit) {
                break;
            }
            if let Some(it) = self.pending.pop_front() {
                rolled |= apply_item(&mut self.view, &it);
            }
        }
        if let Some(r) = self.repl.as_mut() {
            while r.waiters.front().is_some_and(|(upto, _)| *upto <= commit) {
                if let Some((_, w)) = r.waiters.pop_front() {
                    w.finish(true);
                }
            }
        }
        if rolled {
            self.retention();
        }
        self.serve_parked(false);
    }

    /// Hands the committed offset to the writer to store (lazily).
    fn save_commit(&mut self) {
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        if r.commit != r.saved_commit
            && self.writer.try_send(WriteReq::SaveCommit(r.commit)).is_ok()
        {
            r.saved_commit = r.commit;
        }
    }

    /// The epoch stamped in the last written chunk (0: empty log).
    fn last_epoch(&self) -> u32 {
        last_epoch_of(&self.written)
    }

    async fn on_repl(&mut self, ev: ReplEvent) {
        if self.repl.is_none() {
            return;
        }
        match ev {
            ReplEvent::Role(def) => self.take_role(def).await,
            ReplEvent::Tail { fence, reply } => {
                let last = self.last_epoch();
                // fence 0: a probe (declare waiting for the replicas).
                if let Some(r) = self.repl.as_mut().filter(|_| fence > 0) {
                    r.fence = r.fence.max(fence);
                    r.fence_until = now_ms_u() + FENCE_MS;
                }
                let _ = reply.send((last, self.written.next_offset()));
            }
            ReplEvent::Publish { msgs, reply } => {
                if !self.repl.as_ref().is_some_and(|r| r.leading) {
                    let _ = reply.send(false);
                    return;
                }
                let msgs: Vec<Arc<Message>> = msgs
                    .into_iter()
                    .filter_map(super::replica::from_wire)
                    .map(Arc::new)
                    .collect();
                if let Err(e) = self
                    .writer
                    .send(WriteReq::AppendRemote { msgs, reply })
                    .await
                    && let WriteReq::AppendRemote { reply, .. } = e.0
                {
                    let _ = reply.send(false);
                }
            }
            ReplEvent::Append {
                epoch,
                from,
                prev_epoch,
                reset,
                chunks,
                commit,
                reply,
            } => {
                self.on_append(epoch, from, prev_epoch, reset, chunks, commit, reply)
                    .await
            }
            ReplEvent::Acked {
                node,
                generation,
                res,
            } => self.on_acked(node, generation, res),
            ReplEvent::Read {
                at,
                max_bytes,
                wait_ms,
                reply,
            } => {
                if !self.repl.as_ref().is_some_and(|r| r.leading) {
                    let _ = reply.send(Err("not the stream's leader".into()));
                    return;
                }
                match self.read_committed(at, max_bytes) {
                    Ok((from, chunks, _)) if chunks.is_empty() && wait_ms > 0 => {
                        if let Some(r) = self.repl.as_mut() {
                            r.parked.push(ParkedRead {
                                from,
                                max_bytes,
                                until: now_ms_u() + u64::from(wait_ms.min(30_000)),
                                reply,
                            });
                        }
                    }
                    Ok((from, chunks, next)) => {
                        let _ = reply.send(Ok(RespBody::StreamChunks { from, chunks, next }));
                    }
                    Err(e) => {
                        let _ = reply.send(Err(format!("cannot read the stream: {e}")));
                    }
                }
            }
        }
    }

    /// Committed chunks for a reader without a replica: (first offset it
    /// wants, chunks from the one holding it, offset after them).
    fn read_committed(
        &self,
        at: StreamOffset,
        max_bytes: u32,
    ) -> std::io::Result<(u64, Vec<u8>, u64)> {
        let spec = match at {
            StreamOffset::First => OffsetSpec::First,
            StreamOffset::Last => OffsetSpec::Last,
            StreamOffset::Next => OffsetSpec::Next,
            StreamOffset::Offset(n) => OffsetSpec::Offset(n),
            StreamOffset::FromEnd(n) => OffsetSpec::FromEnd(n),
            StreamOffset::Timestamp(t) => OffsetSpec::Timestamp(t),
        };
        let mut cur = resolve(&self.view, spec)?;
        let from = match at {
            StreamOffset::Offset(n) => cur.from.max(n),
            _ => cur.from,
        };
        let mut bytes = Vec::new();
        let mut next = from;
        while bytes.len() < max_bytes as usize {
            match self.view.read_raw(&mut cur)? {
                Some((h, raw)) => {
                    if h.next_offset() <= from {
                        continue;
                    }
                    next = h.next_offset();
                    bytes.extend_from_slice(&raw);
                }
                None => break,
            }
        }
        Ok((from, bytes, next))
    }

    /// Answers parked remote reads that have chunks now (or `expire`d
    /// ones, empty).
    fn serve_parked(&mut self, expire: bool) {
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        if r.parked.is_empty() {
            return;
        }
        let parked = std::mem::take(&mut r.parked);
        let now = now_ms_u();
        let mut keep = Vec::new();
        for p in parked {
            if p.reply.is_closed() {
                continue;
            }
            match self.read_committed(StreamOffset::Offset(p.from), p.max_bytes) {
                Ok((from, chunks, next)) if !chunks.is_empty() || (expire && now >= p.until) => {
                    let _ = p
                        .reply
                        .send(Ok(RespBody::StreamChunks { from, chunks, next }));
                }
                Ok(_) => keep.push(p),
                Err(e) => {
                    let _ = p.reply.send(Err(format!("cannot read the stream: {e}")));
                }
            }
        }
        if let Some(r) = self.repl.as_mut() {
            r.parked.extend(keep);
        }
    }

    /// The definition changed: lead, or follow the new leader.
    async fn take_role(&mut self, def: StreamDef) {
        let tail = self.written.next_offset();
        let last = self.last_epoch();
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        let lead = def.leader == r.me;
        let was = r.leading && r.def.epoch == def.epoch;
        r.def = def;
        if lead && !was {
            r.lead(tail, last);
            info!(stream = %self.q.name, vhost = %self.q.vhost, epoch = r.def.epoch, tail, commit = r.commit, "this node leads the stream");
            let _ = self.writer.send(WriteReq::SetEpoch(r.def.epoch)).await;
        } else if !lead && r.leading {
            info!(stream = %self.q.name, vhost = %self.q.vhost, leader = r.def.leader, epoch = r.def.epoch, "this node no longer leads the stream; unconfirmed publishes are refused (publishers republish)");
            r.leading = false;
            r.followers.clear();
            r.following = 0;
            for (_, w) in r.waiters.drain(..) {
                w.finish(false);
            }
            for p in r.parked.drain(..) {
                let _ = p.reply.send(Err("the stream's leader moved".into()));
            }
        }
    }

    /// Follower: chunks from the leader (the fields of
    /// `ReplEvent::Append`).
    #[allow(clippy::too_many_arguments)]
    async fn on_append(
        &mut self,
        epoch: u32,
        from: u64,
        prev_epoch: Option<u32>,
        reset: bool,
        chunks: bytes::Bytes,
        commit: u64,
        reply: oneshot::Sender<Result<RespBody, String>>,
    ) {
        let view_end = self.view.next_offset();
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        let fenced = if now_ms_u() < r.fence_until {
            r.fence
        } else {
            0
        };
        let floor = r.following.max(r.def.epoch).max(fenced);
        if epoch < floor {
            let _ = reply.send(Err(format!(
                "stale stream leader: epoch {epoch}, this replica follows epoch {floor}"
            )));
            return;
        }
        if r.leading {
            if epoch <= r.def.epoch {
                let _ = reply.send(Err(format!(
                    "this node leads the stream in epoch {}",
                    r.def.epoch
                )));
                return;
            }
            // A newer leader than the metadata told us about yet.
            r.leading = false;
            r.followers.clear();
            for (_, w) in r.waiters.drain(..) {
                w.finish(false);
            }
        }
        // A new leader: the writer's consistency check (by epoch) finds
        // where this log departs from the leader's and cuts it there.
        r.following = r.following.max(epoch);
        if reset {
            r.discard += 1;
        }
        r.leader_commit = commit;
        if reset {
            self.written = self.view.clone();
            self.pending.clear();
            let _ = self.writer.send(WriteReq::Reset { base: from }).await;
        }
        let (tx, rx) = oneshot::channel();
        if self
            .writer
            .send(WriteReq::Replicate {
                from,
                prev_epoch,
                floor: view_end,
                chunks,
                reply: tx,
            })
            .await
            .is_err()
        {
            let _ = reply.send(Err("the stream replica is stopping".into()));
            return;
        }
        tokio::spawn(async move {
            let r = match rx.await {
                Ok(ReplAck::Appended(tail)) => Ok(RespBody::StreamAck {
                    tail,
                    mismatch: false,
                }),
                Ok(ReplAck::Mismatch(tail)) => Ok(RespBody::StreamAck {
                    tail,
                    mismatch: true,
                }),
                Ok(ReplAck::Failed) | Err(_) => {
                    Err("the follower could not write the chunks".into())
                }
            };
            let _ = reply.send(r);
        });
    }

    /// Leader: a follower answered a frame.
    fn on_acked(&mut self, node: NodeId, generation: u64, res: Result<RespBody, String>) {
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        if !r.leading {
            return;
        }
        let Some(f) = r.followers.get_mut(&node) else {
            return;
        };
        if f.generation != generation {
            return;
        }
        f.inflight = f.inflight.saturating_sub(1);
        match res {
            Ok(RespBody::StreamAck {
                tail,
                mismatch: false,
            }) => {
                f.acked = f.acked.max(tail);
                f.probed = true;
            }
            Ok(RespBody::StreamAck {
                tail,
                mismatch: true,
            }) => {
                debug!(stream = %self.q.name, follower = node, tail, "follower is elsewhere in the log; shipping from its tail");
                f.probed = true;
                f.mismatch = if f.mismatch.0 == tail {
                    (tail, f.mismatch.1 + 1)
                } else {
                    (tail, 1)
                };
                if f.mismatch.1 >= 3 {
                    warn!(stream = %self.q.name, vhost = %self.q.vhost, follower = node, tail, "a follower's log cannot be matched to this leader's; it restarts from the leader's first offset");
                    f.force_reset = true;
                    f.mismatch = (0, 0);
                }
                f.generation += 1;
                f.inflight = 0;
                f.acked = tail;
                f.next = tail;
                f.sent_commit = 0;
            }
            other => {
                debug!(stream = %self.q.name, follower = node, "follower did not take the chunks ({other:?}); retrying from its acknowledged tail");
                f.generation += 1;
                f.inflight = 0;
                f.next = f.acked;
                f.sent_commit = 0;
                f.retry_at = now_ms_u() + 500;
            }
        }
    }

    /// Leader: ships chunks (and the commit offset) to every follower, up
    /// to [`MAX_INFLIGHT`] frames each.
    fn pump(&mut self) {
        let Some(r) = self.repl.as_mut() else {
            return;
        };
        if !r.leading || r.followers.is_empty() {
            return;
        }
        let Some(c) = r.cluster.upgrade() else {
            return;
        };
        let (first, tail) = (self.written.first_offset(), self.written.next_offset());
        let now = now_ms_u();
        for (&node, f) in r.followers.iter_mut() {
            if f.retry_at > now {
                continue;
            }
            while f.inflight < MAX_INFLIGHT {
                let reset = f.force_reset || f.next < first || f.next > tail;
                let from = if reset { first } else { f.next };
                if !reset && from >= tail && f.sent_commit >= r.commit && f.probed {
                    break;
                }
                if !f.probed && f.inflight > 0 {
                    break;
                }
                let mut bytes = Vec::new();
                let mut end = from;
                match resolve(&self.written, OffsetSpec::Offset(from)) {
                    Ok(mut cur) if from < tail => {
                        while bytes.len() < FRAME_BYTES {
                            match self.written.read_raw(&mut cur) {
                                Ok(Some((h, raw))) => {
                                    if h.first != end {
                                        break;
                                    }
                                    end = h.next_offset();
                                    bytes.extend_from_slice(&raw);
                                }
                                Ok(None) => break,
                                Err(e) => {
                                    error!(stream = %self.q.name, "cannot read chunks to replicate: {e}");
                                    break;
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        error!(stream = %self.q.name, "cannot read chunks to replicate: {e}");
                    }
                }
                if end == from && from < tail && !reset {
                    // Nothing readable at a point the log has: never
                    // expected (tails are chunk boundaries); do not spin.
                    error!(stream = %self.q.name, follower = node, from, tail, "no chunk starts at the follower's tail; replication to it paused for 5 s");
                    f.retry_at = now + 5000;
                    break;
                }
                let Some(peer) = c.peer_by_id(node) else {
                    f.retry_at = now + 500;
                    break;
                };
                let req = crate::cluster::net::Req::StreamAppend {
                    group: r.group.clone(),
                    epoch: r.def.epoch,
                    from,
                    prev_epoch: if reset {
                        None
                    } else {
                        self.written.epoch_before(from)
                    },
                    reset,
                    chunks: bytes,
                    commit: r.commit,
                };
                let Some(rx) = peer.send_req(req) else {
                    f.retry_at = now + 500;
                    break;
                };
                if reset {
                    f.acked = from;
                    f.force_reset = false;
                }
                f.inflight += 1;
                f.next = end;
                f.sent_commit = r.commit;
                let (tx, generation) = (self.repl_tx.clone(), f.generation);
                tokio::spawn(async move {
                    let res = match tokio::time::timeout(Duration::from_secs(10), rx).await {
                        Ok(Ok(r)) => r,
                        Ok(Err(_)) => Err("connection lost".into()),
                        Err(_) => Err("no answer within 10 s".into()),
                    };
                    let _ = tx.send(ReplEvent::Acked {
                        node,
                        generation,
                        res,
                    });
                });
                if end == from {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::protocol::basic::parse_properties;
    use amq_protocol::types::FieldTable;

    fn spliced(p: &BasicProperties, offset: u64) -> Option<BasicProperties> {
        let raw = crate::protocol::frame::encode_properties(p);
        let mut out = vec![];
        if !splice_offset_header(&raw, offset, &mut out) {
            return None;
        }
        let (rest, got) = parse_properties(&out[..]).unwrap();
        assert!(rest.is_empty());
        Some(got)
    }

    fn slow(p: &BasicProperties, offset: u64) -> BasicProperties {
        let raw = crate::protocol::frame::encode_properties(p);
        let out = with_offset_header(&raw, offset).unwrap();
        parse_properties(&out[..]).unwrap().1
    }

    #[test]
    fn offset_header_splice_matches_decode_and_encode() {
        let mut h = FieldTable::default();
        h.insert("k".into(), AMQPValue::LongString("v".into()));
        h.insert("n".into(), AMQPValue::LongInt(-4));
        let cases = [
            BasicProperties::default(),
            BasicProperties::default().with_delivery_mode(2),
            BasicProperties::default()
                .with_content_type("text/plain".into())
                .with_content_encoding("gzip".into())
                .with_priority(3)
                .with_message_id("id-1".into())
                .with_timestamp(17)
                .with_app_id("app".into()),
            BasicProperties::default()
                .with_content_type("a/b".into())
                .with_headers(h.clone())
                .with_correlation_id("c".into()),
            BasicProperties::default().with_headers(FieldTable::default()),
        ];
        for (i, p) in cases.iter().enumerate() {
            let off = 1u64 << (i * 9);
            let got = spliced(p, off).expect("fast path");
            assert_eq!(got, slow(p, off), "case {i}");
            assert_eq!(
                got.headers()
                    .as_ref()
                    .and_then(|t| t.inner().get("x-stream-offset").cloned()),
                Some(AMQPValue::LongLongInt(off as i64))
            );
        }
        // A publisher's own x-stream-offset header: the slow path replaces it.
        let mut own = FieldTable::default();
        own.insert("x-stream-offset".into(), AMQPValue::LongString("x".into()));
        let p = BasicProperties::default().with_headers(own);
        assert!(spliced(&p, 5).is_none());
        assert_eq!(
            slow(&p, 5)
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get("x-stream-offset").cloned()),
            Some(AMQPValue::LongLongInt(5))
        );
        // Garbage is refused, not spliced.
        let mut out = vec![];
        assert!(!splice_offset_header(&[0x20], 1, &mut out));
        assert!(!splice_offset_header(&[0x20, 0x00, 0, 0, 1], 1, &mut out));
        assert!(!splice_offset_header(&[0x80, 0x00, 9, b'a'], 1, &mut out));
    }
}
