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

use super::chunk::{self, ChunkHeader};
use super::filter::FilterSpec;
use super::group::{self, GroupEvent, GroupKey, GroupTx};
use super::reader::{Cursor, LogView, OffsetSpec, Read, parse_offset_arg, resolve};
use super::settings::StreamSettings;
use super::tracking::{self, Offsets};
use super::writer::{self, CommitItem, WriteReq};
use super::{log, retention, stream_dir};
use crate::broker::persist::Storage;
use crate::broker::{ConnCmd, ConnTx, VHost};
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
use tracing::{debug, error, warn};

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
    let (writer, events) =
        writer::start(&q.name, dir.clone(), active, settings.clone(), 256).map_err(fail)?;
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
    };
    let span = tracing::debug_span!("stream", name = %q.name, vhost = %q.vhost);
    tokio::spawn(tracing::Instrument::instrument(
        actor.run(rx, events, group_rx),
        span,
    ));
    Ok(q)
}

/// One decoded message: offset, filter value, the message as delivered.
type Decoded = (u64, Option<Bytes>, Arc<Message>);

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
fn decode(h: &ChunkHeader, data: Bytes) -> Option<Vec<Decoded>> {
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
                _ = tick.tick() => {
                    self.retention();
                    self.save_offsets(true);
                }
            }
            self.dispatch();
            self.save_offsets(false);
        }
    }

    /// Applies a commit to the view; true if a segment was sealed.
    fn apply(&mut self, items: Vec<CommitItem>) -> bool {
        let mut rolled = false;
        for it in items {
            match it {
                CommitItem::Segment { base, file } => {
                    self.view.push_segment(base, file);
                    rolled = true;
                }
                CommitItem::Chunk { seg, header, pos } => self.view.add_chunk(seg, &header, pos),
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
                let msgs = msgs.into_iter().map(|(m, _)| m).collect();
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
