//! The queue core: a deterministic state machine with no I/O and no clock.
//!
//! Commands go in (enqueue, add/remove consumer, dispatch, settle, get,
//! purge, credit); effects come out as return values (what to deliver to
//! whom). The queue actor applies it directly for classic queues; quorum
//! queues will apply the same core on every replica after Raft commits the
//! command, so everything here must depend only on its inputs.

use super::message::Message;
use super::ready::ReadyList;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

/// Queue-local message id, increasing in publish order.
pub type MsgId = u64;
/// Broker-wide unique consumer id.
pub type ConsumerId = u64;

/// The channel that holds a delivery: (connection id, channel number).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Owner {
    /// Connection id.
    pub conn: u64,
    /// Channel number on that connection.
    pub channel: u16,
}

/// A message in the queue with its queue-local state.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// Queue-local id (publish order).
    pub id: MsgId,
    /// Id in the message store, 0 when the message is not stored.
    pub gid: u64,
    /// The shared message; None while paged out to the store.
    pub msg: Option<Arc<Message>>,
    /// Body size in bytes.
    pub size: u32,
    /// How many times it was delivered and returned unacked.
    pub delivery_count: u16,
    /// Set once the message has been delivered and returned.
    pub redelivered: bool,
    /// When it expires (ms since the Unix epoch), 0 = never.
    pub expires: u64,
    /// Priority level (0 without x-max-priority; capped at the queue's max).
    pub priority: u8,
}

/// A channel-wide prefetch limit (basic.qos with global=true), shared by the
/// consumers of one channel across queues.
#[derive(Debug, Default)]
pub struct SharedLimit {
    /// 0 means unlimited.
    pub limit: AtomicU32,
    /// Deliveries outstanding on the channel.
    pub outstanding: AtomicU32,
}

impl SharedLimit {
    fn try_take(&self) -> bool {
        let limit = self.limit.load(Ordering::Relaxed);
        if limit == 0 {
            self.outstanding.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        self.outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |o| {
                (o < limit).then_some(o + 1)
            })
            .is_ok()
    }

    /// Gives credit back when a delivery is settled.
    pub fn release(&self, n: u32) {
        let _ = self
            .outstanding
            .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |o| {
                Some(o.saturating_sub(n))
            });
    }
}

/// What a consumer asked for.
#[derive(Debug, Clone)]
pub struct ConsumerSpec {
    /// Broker-wide id.
    pub id: ConsumerId,
    /// Its channel.
    pub owner: Owner,
    /// Per-consumer prefetch (0 = unlimited).
    pub prefetch: u32,
    /// Auto-ack consumer.
    pub no_ack: bool,
    /// basic.consume exclusive flag.
    pub exclusive: bool,
    /// Channel-wide limit, if basic.qos global was set.
    pub shared: Option<Arc<SharedLimit>>,
    /// Flow credit for no-ack consumers: how many deliveries may be in flight
    /// to the connection before it confirms it has written them.
    pub flow_window: u32,
    /// Consumer priority (x-priority): higher ones get messages first.
    pub priority: i32,
    /// Consumer timeout (ms): holding a delivery unacked longer cancels the
    /// consumer and returns its deliveries to the queue.
    pub timeout: Option<u64>,
}

#[derive(Debug)]
struct ConsumerState {
    spec: ConsumerSpec,
    unacked: u32,
    flow: u32,
    /// Round-robin cursor of the group of equal priority this consumer
    /// starts (offset within the group; only the group's first is used).
    rr: usize,
}

impl ConsumerState {
    /// Flow credit bounds what is in flight to the connection for every
    /// consumer (so an unlimited prefetch cannot pull a whole backlog into
    /// memory); prefetch bounds what is unacked.
    fn has_credit(&self) -> bool {
        if self.flow == 0 {
            return false;
        }
        if !self.spec.no_ack && self.spec.prefetch != 0 && self.unacked >= self.spec.prefetch {
            return false;
        }
        true
    }
}

#[derive(Debug)]
struct Unacked {
    env: Envelope,
    owner: Owner,
    consumer: Option<ConsumerId>,
    /// When the consumer timeout fires for this delivery, 0 = never.
    deadline: u64,
}

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// basic.ack: remove.
    Ack,
    /// nack/reject with requeue, or the channel went away: back to the queue.
    Requeue,
    /// nack/reject without requeue: remove (dead-lettered by the caller).
    Discard,
    /// Returned without a nack (channel closed, connection lost, consumer
    /// timeout): back to the queue, as Requeue, but a "returned" retry.
    Return,
    /// Sent to a consumer that no longer existed when the connection got it:
    /// back in place without counting as a redelivery.
    Undeliverable,
}

/// What a settle removed from the queue.
#[derive(Debug, Default)]
pub struct Settled {
    /// Discarded (nack/reject without requeue) envelopes.
    pub discarded: Vec<Envelope>,
    /// Store ids of every message that left the queue for good.
    pub removed_gids: Vec<u64>,
    /// Messages that must be dead-lettered (delivery limit, expired while out).
    pub dead: Vec<(Envelope, DeadReason)>,
    /// Ids that were not outstanding.
    pub unknown: usize,
    /// Stored messages that entered a delayed-retry wait (for the actor to
    /// save, so the wait survives a restart).
    pub delayed: Vec<(u64, RetryState)>,
}

/// Where a stored message stands in delayed retry: what a durable queue
/// saves per message so a restart keeps the remaining delay and the count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RetryState {
    /// When it is ready again (ms since the epoch); in the past once it is.
    pub due: u64,
    /// Its delivery count (x-delivery-count, delivery-limit accounting).
    pub count: u16,
}

/// Why a consumer could not be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsumeRefused {
    /// Someone else holds the queue exclusively, or we asked for exclusive
    /// access and others are consuming.
    ExclusiveInUse,
}

/// Counts reported by queue.declare-ok and the management API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Messages ready for delivery.
    pub ready: u64,
    /// Messages delivered and not yet settled.
    pub unacked: u64,
    /// Consumers attached.
    pub consumers: u64,
    /// Bytes of ready message bodies.
    pub ready_bytes: u64,
    /// Ready messages whose body is held in memory (the rest are paged out).
    pub in_memory: u64,
}

/// The queue state machine.
#[derive(Debug, Default)]
pub struct QueueCore {
    ready: ReadyList,
    unacked: HashMap<MsgId, Unacked>,
    /// Sorted by priority, highest first; registration order within one
    /// priority (and overall with single active consumer).
    consumers: Vec<ConsumerState>,
    next_id: MsgId,
    /// x-single-active-consumer: only the first consumer gets messages.
    single_active: bool,
    /// The time last passed in by the caller (ms since the epoch).
    now: u64,
    /// Consumer timeout deadlines: (deadline, delivery, consumer).
    timeouts: BinaryHeap<Reverse<(u64, MsgId, ConsumerId)>>,
    has_exclusive_consumer: bool,
    /// Stored messages handed to no-ack consumers: gone for good.
    no_ack_gids: Vec<u64>,
    limits: Limits,
    /// Per-message expiries (queue-wide TTL expires in order at the head).
    expiries: BinaryHeap<Reverse<(u64, MsgId)>>,
    /// The in-memory window of the ready list.
    ready_window: usize,
    /// Delayed retry settings (x-delayed-retry-*).
    retry: super::args::RetryArgs,
    /// Returned messages waiting out their retry delay (not ready yet).
    delayed: HashMap<MsgId, Envelope>,
    /// Retry due times: (due, id).
    retry_due: BinaryHeap<Reverse<(u64, MsgId)>>,
    /// x-message-deduplication cache, when enabled.
    dedup: Option<DedupCache>,
}

/// The ids (x-deduplication-header) seen recently, bounded by x-cache-size
/// (oldest evicted first) and forgotten after x-cache-ttl.
///
/// For durable queues and exchanges the cache is saved incrementally: every
/// remembered id has a sequence number, [`take_delta`](Self::take_delta)
/// hands out the entries added and the saved entries removed since the last
/// call, and [`restore`](Self::restore) rebuilds the cache from the saved
/// entries at start. The cache itself does no I/O.
#[derive(Debug, Default)]
pub struct DedupCache {
    args: super::args::DedupArgs,
    /// id -> (expires at, 0 = never; insertion sequence).
    seen: HashMap<String, (u64, u64)>,
    /// Insertion order, for eviction (may hold stale entries of ids that
    /// were re-inserted after they expired; skipped).
    order: std::collections::VecDeque<(u64, String)>,
    seq: u64,
    /// Entries up to this sequence number were handed out by `take_delta`.
    saved_seq: u64,
    /// Saved entries (by sequence number) removed since the last delta.
    removed_saved: Vec<u64>,
    /// Changed since the last delta.
    dirty: bool,
}

/// One remembered id, as saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DedupEntry {
    /// Insertion sequence number (the order of eviction).
    pub seq: u64,
    /// The deduplication id.
    pub id: String,
    /// When it is forgotten (ms since the epoch), 0 = never.
    pub expires: u64,
}

/// What changed in a [`DedupCache`] since the last delta.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct DedupDelta {
    /// Entries added.
    pub put: Vec<DedupEntry>,
    /// Sequence numbers of saved entries that are gone (evicted, expired).
    pub del: Vec<u64>,
}

impl DedupCache {
    /// An empty cache.
    pub fn new(args: super::args::DedupArgs) -> Self {
        DedupCache {
            args,
            ..Default::default()
        }
    }

    /// The deduplication id of a message: its x-deduplication-header
    /// header (a string or an integer).
    pub fn id_of(msg: &Message) -> Option<String> {
        Self::id_in(msg.properties.headers().as_ref()?)
    }

    /// The deduplication id in a header table.
    pub fn id_in(h: &amq_protocol::types::FieldTable) -> Option<String> {
        let v = h.inner().get("x-deduplication-header")?;
        crate::broker::headers::value_str(v)
            .or_else(|| crate::broker::headers::value_int(v).map(|i| i.to_string()))
    }

    /// True if `id` was seen and is still remembered at `now`.
    pub fn contains(&self, id: &str, now: u64) -> bool {
        self.seen
            .get(id)
            .is_some_and(|(exp, _)| *exp == 0 || *exp > now)
    }

    /// Number of ids held (expired ones included until they are evicted).
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// True when no id is held.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// True if `id` was seen and is still remembered at `now`; otherwise
    /// remembers it and returns false.
    pub fn check_and_insert(&mut self, id: String, now: u64) -> bool {
        if let Some((exp, old_seq)) = self.seen.get(&id).copied() {
            if exp == 0 || exp > now {
                return true;
            }
            // Expired: replaced below by a fresh entry.
            self.note_removed(old_seq);
        }
        self.seq += 1;
        let exp = self
            .args
            .cache_ttl
            .map_or(0, |t| now.saturating_add(t).max(1));
        self.seen.insert(id.clone(), (exp, self.seq));
        self.order.push_back((self.seq, id));
        self.dirty = true;
        self.evict(now);
        false
    }

    fn note_removed(&mut self, seq: u64) {
        if seq <= self.saved_seq {
            self.removed_saved.push(seq);
            self.dirty = true;
        }
    }

    /// Drops the oldest entries beyond x-cache-size, and expired ones from
    /// the front (one TTL for the whole cache, so insertion order is expiry
    /// order): the cache stays bounded with a TTL and no size too.
    fn evict(&mut self, now: u64) {
        let cap = self.args.cache_size.unwrap_or(u64::MAX);
        while let Some((seq, id)) = self.order.front() {
            let live = self.seen.get(id).filter(|e| e.1 == *seq).map(|e| e.0);
            if let Some(exp) = live {
                let over = self.seen.len() as u64 > cap;
                if !over && (exp == 0 || exp > now) {
                    break;
                }
            }
            let Some((seq, id)) = self.order.pop_front() else {
                break;
            };
            if live.is_some() {
                self.seen.remove(&id);
                self.note_removed(seq);
            }
        }
        // Stale entries (re-inserted ids) left in the middle: compact now
        // and then so the order stays proportional to the cache.
        if self.order.len() > 2 * self.seen.len() + 64 {
            let seen = &self.seen;
            self.order
                .retain(|(s, id)| seen.get(id).is_some_and(|e| e.1 == *s));
        }
    }

    /// True when something changed since the last [`take_delta`](Self::take_delta).
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// The entries added and the saved entries removed since the last call
    /// (all of them the first time); afterwards everything counts as saved.
    pub fn take_delta(&mut self) -> DedupDelta {
        let mut put = Vec::new();
        for (seq, id) in self.order.iter().rev() {
            if *seq <= self.saved_seq {
                break;
            }
            if let Some((exp, s)) = self.seen.get(id)
                && s == seq
            {
                put.push(DedupEntry {
                    seq: *seq,
                    id: id.clone(),
                    expires: *exp,
                });
            }
        }
        put.reverse();
        self.saved_seq = self.seq;
        self.dirty = false;
        DedupDelta {
            put,
            del: std::mem::take(&mut self.removed_saved),
        }
    }

    /// Rebuilds the cache from saved entries (at start, before any insert):
    /// expired ones and those beyond x-cache-size are dropped, and show up
    /// as removed in the next delta.
    pub fn restore(&mut self, mut entries: Vec<DedupEntry>, now: u64) {
        entries.sort_unstable_by_key(|e| e.seq);
        for e in entries {
            self.seq = self.seq.max(e.seq);
            self.saved_seq = self.seq;
            if e.expires != 0 && e.expires <= now {
                self.note_removed(e.seq);
                continue;
            }
            // The same id twice (a crash lost a removal): the later wins.
            if let Some((_, old)) = self.seen.insert(e.id.clone(), (e.expires, e.seq)) {
                self.note_removed(old);
            }
            self.order.push_back((e.seq, e.id));
        }
        self.evict(now);
    }
}

/// Why a message left the queue unacked (RabbitMQ's x-death reasons).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadReason {
    /// Rejected or nacked without requeue.
    Rejected,
    /// Its TTL ran out.
    Expired,
    /// Dropped or refused by a length limit.
    MaxLen,
    /// Returned more often than the delivery limit allows.
    DeliveryLimit,
}

impl DeadReason {
    /// The reason as written in x-death.
    pub fn as_str(self) -> &'static str {
        match self {
            DeadReason::Rejected => "rejected",
            DeadReason::Expired => "expired",
            DeadReason::MaxLen => "maxlen",
            DeadReason::DeliveryLimit => "delivery_limit",
        }
    }
}

/// The queue's lifecycle settings (from arguments and policies).
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// x-message-ttl (ms).
    pub message_ttl: Option<u64>,
    /// x-max-length.
    pub max_length: Option<u64>,
    /// x-max-length-bytes.
    pub max_length_bytes: Option<u64>,
    /// x-overflow.
    pub overflow: super::args::Overflow,
    /// x-delivery-limit.
    pub delivery_limit: Option<u64>,
}

/// Whether a publish was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Enqueued.
    Accepted,
    /// Refused by a reject-publish length limit (nack the publisher).
    Rejected,
    /// A duplicate (x-message-deduplication): dropped, confirmed as ack.
    Duplicate,
}

impl QueueCore {
    /// An empty queue keeping at most `window` ready bodies in memory.
    pub fn new(window: usize) -> Self {
        QueueCore {
            ready: ReadyList::new(window),
            ready_window: window,
            ..Default::default()
        }
    }

    /// Makes this a priority queue with levels 0..=`max` (x-max-priority).
    /// Only before anything is enqueued.
    pub fn set_max_priority(&mut self, max: u8) {
        debug_assert!(self.ready.is_empty());
        self.ready = ReadyList::with_priorities(self.ready_window, max);
    }

    /// x-single-active-consumer.
    pub fn set_single_active(&mut self, on: bool) {
        self.single_active = on;
    }

    /// Passes the current time in (ms since the epoch): deliveries made from
    /// now on are stamped with it for consumer timeouts.
    pub fn set_time(&mut self, now: u64) {
        self.now = now;
        self.promote_due(now);
    }

    /// Enables x-message-deduplication (at creation).
    pub fn set_dedup(&mut self, args: Option<super::args::DedupArgs>) {
        self.dedup = args.map(DedupCache::new);
    }

    /// Remembers the id of a message recovered from the store, so that
    /// duplicates of messages still in the queue are dropped after a restart.
    pub fn remember_dedup_id(&mut self, msg: &Message, now: u64) {
        if let (Some(cache), Some(id)) = (self.dedup.as_mut(), DedupCache::id_of(msg)) {
            cache.check_and_insert(id, now);
        }
    }

    /// Whether deduplication is on.
    pub fn dedup_enabled(&self) -> bool {
        self.dedup.is_some()
    }

    /// The deduplication cache, when enabled (saving and restoring it).
    pub fn dedup_mut(&mut self) -> Option<&mut DedupCache> {
        self.dedup.as_mut()
    }

    /// True when the deduplication cache changed since its last delta.
    pub fn dedup_dirty(&self) -> bool {
        self.dedup.as_ref().is_some_and(DedupCache::is_dirty)
    }

    /// Delayed retry settings (at creation, or when a policy changes).
    pub fn set_retry(&mut self, retry: super::args::RetryArgs) {
        self.retry = retry;
    }

    /// Messages whose retry delay has run out by `now` go back to their
    /// original position (publish order within their priority).
    fn promote_due(&mut self, now: u64) {
        while let Some(Reverse((at, id))) = self.retry_due.peek().copied() {
            if at > now {
                break;
            }
            self.retry_due.pop();
            if let Some(env) = self.delayed.remove(&id) {
                if env.expires != 0 {
                    self.expiries.push(Reverse((env.expires, env.id)));
                }
                self.ready.insert_sorted(env);
            }
        }
    }

    /// When the next delayed retry is due, if any.
    pub fn next_retry(&self) -> Option<u64> {
        self.retry_due.peek().map(|Reverse((at, _))| *at)
    }

    /// Messages waiting out a retry delay.
    pub fn delayed_len(&self) -> usize {
        self.delayed.len()
    }

    /// The priority level of a message in this queue.
    pub fn priority_of(&self, msg: &Message) -> u8 {
        let max = self.ready.max_priority();
        if max == 0 {
            return 0;
        }
        msg.properties.priority().unwrap_or(0).min(max)
    }

    /// Appends a message (`gid` 0 when not stored); returns its id.
    pub fn enqueue(&mut self, msg: Arc<Message>, gid: u64) -> MsgId {
        let size = msg.body.len().min(u32::MAX as usize) as u32;
        let p = self.priority_of(&msg);
        self.enqueue_envelope_at(Some(msg), gid, size, false, p)
    }

    /// Appends a message recovered from the store (body possibly not loaded).
    pub fn enqueue_envelope(
        &mut self,
        msg: Option<Arc<Message>>,
        gid: u64,
        size: u32,
        redelivered: bool,
    ) -> MsgId {
        self.enqueue_envelope_at(msg, gid, size, redelivered, 0)
    }

    /// Appends a recovered message at a priority level.
    pub fn enqueue_envelope_at(
        &mut self,
        msg: Option<Arc<Message>>,
        gid: u64,
        size: u32,
        redelivered: bool,
        priority: u8,
    ) -> MsgId {
        let id = self.next_id;
        self.next_id += 1;
        self.ready.push_back(Envelope {
            id,
            gid,
            msg,
            size,
            delivery_count: u16::from(redelivered),
            redelivered,
            expires: 0,
            priority,
        });
        id
    }

    /// Appends a message recovered from the store whose delayed-retry state
    /// was saved: it keeps its delivery count, and waits until `state.due`
    /// if that is after `now` (at its original position once due).
    pub fn enqueue_recovered_retry(
        &mut self,
        msg: Option<Arc<Message>>,
        gid: u64,
        size: u32,
        priority: u8,
        state: RetryState,
        now: u64,
    ) -> MsgId {
        let id = self.next_id;
        self.next_id += 1;
        let env = Envelope {
            id,
            gid,
            msg,
            size,
            delivery_count: state.count.max(1),
            redelivered: true,
            expires: 0,
            priority,
        };
        if state.due > now {
            self.retry_due.push(Reverse((state.due, id)));
            self.delayed.insert(id, env);
        } else {
            self.ready.push_back(env);
        }
        id
    }

    /// Sets lifecycle limits (at creation, or when a policy changes).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// The current limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Publishes a message at time `now` (ms since the epoch): computes its
    /// expiry (the smaller of the queue TTL and its own `expiration`) and
    /// applies the length limits. Returns whether it was taken, and any
    /// messages that left the queue because of it (drop-head victims, or the
    /// refused message itself with reject-publish-dlx).
    pub fn publish(
        &mut self,
        msg: Arc<Message>,
        gid: u64,
        now: u64,
    ) -> (Admission, Vec<(Envelope, DeadReason)>) {
        let dedup_id = self.dedup.as_ref().and_then(|_| DedupCache::id_of(&msg));
        if let (Some(cache), Some(id)) = (self.dedup.as_ref(), dedup_id.as_ref()) {
            if cache.contains(id, now) {
                return (Admission::Duplicate, Vec::new());
            }
        }
        let size = msg.body.len().min(u32::MAX as usize) as u32;
        let per_msg = msg
            .properties
            .expiration()
            .as_ref()
            .and_then(|e| e.as_str().parse::<u64>().ok());
        let ttl = match (self.limits.message_ttl, per_msg) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expires = ttl.map_or(0, |t| now.saturating_add(t).max(1));
        let priority = self.priority_of(&msg);
        let mut dead = Vec::new();
        let over = |q: &Self, extra_n: u64, extra_b: u64| {
            q.limits
                .max_length
                .is_some_and(|m| q.ready.len() as u64 + extra_n > m)
                || q.limits
                    .max_length_bytes
                    .is_some_and(|m| q.ready.bytes() + extra_b > m)
        };
        use super::args::Overflow;
        if self.limits.overflow != Overflow::DropHead && over(self, 1, u64::from(size)) {
            if self.limits.overflow == Overflow::RejectPublishDlx {
                let env = Envelope {
                    id: 0,
                    gid,
                    msg: Some(msg),
                    size,
                    delivery_count: 0,
                    redelivered: false,
                    expires,
                    priority,
                };
                dead.push((env, DeadReason::MaxLen));
            }
            return (Admission::Rejected, dead);
        }
        let id = self.next_id;
        self.next_id += 1;
        self.ready.push_back(Envelope {
            id,
            gid,
            msg: Some(msg),
            size,
            delivery_count: 0,
            redelivered: false,
            expires,
            priority,
        });
        if per_msg.is_some() && expires != 0 {
            self.expiries.push(Reverse((expires, id)));
        }
        while over(self, 0, 0) {
            match self.ready.pop_front() {
                Some(e) => dead.push((e, DeadReason::MaxLen)),
                None => break,
            }
        }
        if let (Some(cache), Some(id)) = (self.dedup.as_mut(), dedup_id) {
            cache.check_and_insert(id, now);
        }
        (Admission::Accepted, dead)
    }

    /// Recovered messages of a queue with a message TTL (x-message-ttl or
    /// policy) get a deadline counted from the restart: the store keeps no
    /// publish time, so a restart gives each message its full TTL again
    /// rather than letting it live forever.
    pub fn arm_recovered_ttl(&mut self, now: u64) {
        let Some(ttl) = self.limits.message_ttl else {
            return;
        };
        let at = now.saturating_add(ttl).max(1);
        for env in self.ready.iter_mut() {
            if env.expires == 0 {
                env.expires = at;
            }
        }
    }

    /// Applies lowered length limits at once (a policy changed): with
    /// drop-head, the oldest ready messages over the limit leave (to be
    /// dead-lettered with reason maxlen), as RabbitMQ does. The reject
    /// modes keep what is queued and refuse new publishes.
    pub fn trim_to_limits(&mut self) -> Vec<(Envelope, DeadReason)> {
        let mut dead = Vec::new();
        if self.limits.overflow != super::args::Overflow::DropHead {
            return dead;
        }
        loop {
            let over = self
                .limits
                .max_length
                .is_some_and(|m| self.ready.len() as u64 > m)
                || self
                    .limits
                    .max_length_bytes
                    .is_some_and(|m| self.ready.bytes() > m);
            if !over {
                break;
            }
            match self.ready.pop_front() {
                Some(e) => dead.push((e, DeadReason::MaxLen)),
                None => break,
            }
        }
        dead
    }

    /// Removes ready messages whose TTL has run out by `now`, wherever they
    /// sit in the queue (not only at the head).
    pub fn expire(&mut self, now: u64) -> Vec<(Envelope, DeadReason)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, id))) = self.expiries.peek().copied() {
            if at > now {
                break;
            }
            self.expiries.pop();
            if let Some(e) = self.ready.remove_id(id) {
                out.push((e, DeadReason::Expired));
            }
        }
        for e in self
            .ready
            .pop_front_while(|e| e.expires != 0 && e.expires <= now)
        {
            out.push((e, DeadReason::Expired));
        }
        out
    }

    /// The next time a ready message expires, if any.
    pub fn next_expiry(&self) -> Option<u64> {
        let heap = self.expiries.peek().map(|Reverse((at, _))| *at);
        let head = self.ready.front_expiry();
        match (heap, head) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The ready list, for paging by the actor.
    pub fn ready_mut(&mut self) -> &mut ReadyList {
        &mut self.ready
    }

    /// Current counts.
    pub fn counts(&self) -> Counts {
        Counts {
            ready: (self.ready.len() + self.delayed.len()) as u64,
            unacked: self.unacked.len() as u64,
            consumers: self.consumers.len() as u64,
            ready_bytes: self.ready.bytes(),
            in_memory: self.ready.in_memory() as u64,
        }
    }

    /// Number of ready messages (cheap).
    pub fn ready_len(&self) -> usize {
        self.ready.len()
    }

    /// Number of consumers.
    pub fn consumer_count(&self) -> usize {
        self.consumers.len()
    }

    /// Attaches a consumer.
    pub fn add_consumer(&mut self, spec: ConsumerSpec) -> Result<(), ConsumeRefused> {
        if self.has_exclusive_consumer || (spec.exclusive && !self.consumers.is_empty()) {
            return Err(ConsumeRefused::ExclusiveInUse);
        }
        self.has_exclusive_consumer = spec.exclusive;
        let flow = spec.flow_window;
        // Highest priority first, registration order within a priority
        // (and overall with a single active consumer).
        let pos = if self.single_active {
            self.consumers.len()
        } else {
            self.consumers
                .partition_point(|c| c.spec.priority >= spec.priority)
        };
        self.consumers.insert(
            pos,
            ConsumerState {
                spec,
                unacked: 0,
                flow,
                rr: 0,
            },
        );
        Ok(())
    }

    /// Detaches a consumer. Its unacked deliveries stay with its channel,
    /// which may still ack them. Returns true if it existed.
    pub fn remove_consumer(&mut self, id: ConsumerId) -> bool {
        let Some(pos) = self.consumers.iter().position(|c| c.spec.id == id) else {
            return false;
        };
        let c = self.consumers.remove(pos);
        if c.spec.exclusive {
            self.has_exclusive_consumer = false;
        }
        // A group's cursor lives in its first consumer: hand it on.
        let starts_group = pos == 0 || self.consumers[pos - 1].spec.priority != c.spec.priority;
        if let Some(next) = self
            .consumers
            .get_mut(pos)
            .filter(|n| starts_group && n.spec.priority == c.spec.priority)
        {
            next.rr = c.rr.saturating_sub(1);
        }
        true
    }

    /// The consumer that receives messages with single active consumer.
    pub fn active_consumer(&self) -> Option<ConsumerId> {
        self.consumers.first().map(|c| c.spec.id)
    }

    /// Consumers holding a delivery past their timeout at `now`.
    pub fn timed_out(&mut self, now: u64) -> Vec<ConsumerId> {
        let mut out = Vec::new();
        while let Some(Reverse((at, id, cid))) = self.timeouts.peek().copied() {
            if at > now {
                break;
            }
            self.timeouts.pop();
            let live = self
                .unacked
                .get(&id)
                .is_some_and(|u| u.consumer == Some(cid) && u.deadline == at);
            if live && !out.contains(&cid) {
                out.push(cid);
            }
        }
        out
    }

    /// The next consumer timeout deadline, if any.
    pub fn next_timeout(&self) -> Option<u64> {
        self.timeouts.peek().map(|Reverse((at, _, _))| *at)
    }

    /// Cancels a consumer (consumer timeout): removes it and returns every
    /// delivery it holds to the queue as redelivered.
    pub fn cancel_and_requeue(&mut self, id: ConsumerId) -> Settled {
        let mut ids: Vec<MsgId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.consumer == Some(id))
            .map(|(m, _)| *m)
            .collect();
        ids.sort_unstable();
        let settled = self.settle(&ids, Outcome::Return);
        self.remove_consumer(id);
        settled
    }

    /// Ids of all consumers (for cancel notifications on delete).
    pub fn consumer_ids(&self) -> Vec<ConsumerId> {
        self.consumers.iter().map(|c| c.spec.id).collect()
    }

    /// Returns flow credit to a no-ack consumer once its connection has
    /// written `n` deliveries.
    pub fn credit(&mut self, id: ConsumerId, n: u32) {
        if let Some(c) = self.consumers.iter_mut().find(|c| c.spec.id == id) {
            c.flow = c.flow.saturating_add(n).min(c.spec.flow_window.max(1));
        }
    }

    /// Hands ready messages to consumers with credit: the highest priority
    /// consumers first, round robin among equal priorities; lower ones only
    /// while the higher ones have no credit. With single active consumer
    /// only the first registered one. Each delivery is appended to `out`.
    pub fn dispatch(&mut self, out: &mut Vec<(ConsumerId, Envelope)>) {
        let n = self.consumers.len();
        if n == 0 || self.ready.is_empty() {
            return;
        }
        if self.single_active {
            self.dispatch_group(0, 1, out);
            return;
        }
        let mut start = 0;
        while start < n && !self.ready.is_empty() {
            let p = self.consumers[start].spec.priority;
            let mut end = start + 1;
            while end < n && self.consumers[end].spec.priority == p {
                end += 1;
            }
            self.dispatch_group(start, end, out);
            start = end;
        }
    }

    /// Round robin among `consumers[start..end]`.
    fn dispatch_group(&mut self, start: usize, end: usize, out: &mut Vec<(ConsumerId, Envelope)>) {
        let len = end - start;
        let mut rr = self.consumers[start].rr;
        let mut idle_scans = 0;
        while !self.ready.is_empty() && idle_scans < len {
            if rr >= len {
                rr = 0;
            }
            let idx = start + rr;
            rr += 1;
            let c = &mut self.consumers[idx];
            if !c.has_credit() {
                idle_scans += 1;
                continue;
            }
            if let Some(shared) = &c.spec.shared {
                if !c.spec.no_ack && !shared.try_take() {
                    idle_scans += 1;
                    continue;
                }
            }
            idle_scans = 0;
            let Some(env) = self.ready.pop_front() else {
                break;
            };
            c.flow -= 1;
            if c.spec.no_ack {
                if env.gid != 0 {
                    self.no_ack_gids.push(env.gid);
                }
            } else {
                c.unacked += 1;
                let deadline = match c.spec.timeout {
                    Some(t) => {
                        let at = self.now.saturating_add(t).max(1);
                        self.timeouts.push(Reverse((at, env.id, c.spec.id)));
                        at
                    }
                    None => 0,
                };
                self.unacked.insert(
                    env.id,
                    Unacked {
                        env: env.clone(),
                        owner: c.spec.owner,
                        consumer: Some(c.spec.id),
                        deadline,
                    },
                );
            }
            out.push((c.spec.id, env));
        }
        self.consumers[start].rr = rr;
        // Settled deliveries leave stale deadlines behind: prune them now
        // and then so the heap stays proportional to what is outstanding.
        if self.timeouts.len() > 64 + 2 * self.unacked.len() {
            let unacked = &self.unacked;
            self.timeouts.retain(|Reverse((at, id, cid))| {
                unacked
                    .get(id)
                    .is_some_and(|u| u.consumer == Some(*cid) && u.deadline == *at)
            });
        }
    }

    /// basic.get: takes the head message. With `no_ack` false it is held as
    /// unacked by `owner`. Returns the message and how many remain ready.
    pub fn get(&mut self, owner: Owner, no_ack: bool) -> Option<(Envelope, u64)> {
        let env = self.ready.pop_front()?;
        if !no_ack {
            self.unacked.insert(
                env.id,
                Unacked {
                    env: env.clone(),
                    owner,
                    consumer: None,
                    deadline: 0,
                },
            );
        }
        Some((env, self.ready.len() as u64))
    }

    /// Settles deliveries. Returns what left the queue for good (acked or
    /// discarded: the store forgets them; discarded ones may be
    /// dead-lettered) and the number of ids that were not outstanding.
    pub fn settle(&mut self, ids: &[MsgId], outcome: Outcome) -> Settled {
        let mut out = Settled::default();
        for id in ids {
            let Some(u) = self.unacked.remove(id) else {
                out.unknown += 1;
                continue;
            };
            self.release_credit(&u);
            match outcome {
                Outcome::Ack => {
                    if u.env.gid != 0 {
                        out.removed_gids.push(u.env.gid);
                    }
                }
                Outcome::Discard => {
                    if u.env.gid != 0 {
                        out.removed_gids.push(u.env.gid);
                    }
                    out.discarded.push(u.env);
                }
                Outcome::Requeue | Outcome::Return => {
                    let count = u64::from(u.env.delivery_count) + 1;
                    if self.limits.delivery_limit.is_some_and(|l| count > l) {
                        let mut env = u.env;
                        env.delivery_count = env.delivery_count.saturating_add(1);
                        if env.gid != 0 {
                            out.removed_gids.push(env.gid);
                        }
                        out.dead.push((env, DeadReason::DeliveryLimit));
                    } else {
                        let delay = self.retry.delay(outcome == Outcome::Requeue, count);
                        if delay == 0 {
                            self.requeue(u.env, true);
                        } else {
                            let mut env = u.env;
                            env.redelivered = true;
                            env.delivery_count = env.delivery_count.saturating_add(1);
                            let due = self.now.saturating_add(delay);
                            if env.gid != 0 {
                                out.delayed.push((
                                    env.gid,
                                    RetryState {
                                        due,
                                        count: env.delivery_count,
                                    },
                                ));
                            }
                            self.retry_due.push(Reverse((due, env.id)));
                            self.delayed.insert(env.id, env);
                        }
                    }
                }
                Outcome::Undeliverable => self.requeue(u.env, false),
            }
        }
        out
    }

    /// A channel closed: every delivery it held goes back to the queue, and
    /// its consumers are removed. Returns the removed consumer ids.
    pub fn channel_closed(&mut self, owner: Owner) -> (Vec<ConsumerId>, Settled) {
        let mut ids: Vec<MsgId> = self
            .unacked
            .iter()
            .filter(|(_, u)| u.owner == owner)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        // Returned messages over the delivery limit come back in `dead`.
        let settled = self.settle(&ids, Outcome::Return);
        let gone: Vec<ConsumerId> = self
            .consumers
            .iter()
            .filter(|c| c.spec.owner == owner)
            .map(|c| c.spec.id)
            .collect();
        for id in &gone {
            self.remove_consumer(*id);
        }
        (gone, settled)
    }

    /// Drops every ready message; returns them (the store forgets them).
    pub fn purge(&mut self) -> Vec<Envelope> {
        let mut out = self.ready.drain_all();
        self.retry_due.clear();
        let mut delayed: Vec<Envelope> = self.delayed.drain().map(|(_, e)| e).collect();
        delayed.sort_unstable_by_key(|e| e.id);
        out.extend(delayed);
        out
    }

    /// Store ids of messages delivered to no-ack consumers since the last call.
    pub fn take_no_ack_gids(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.no_ack_gids)
    }

    /// Every stored message id the queue still references (ready and
    /// unacked), for deleting the queue from the store.
    pub fn stored_gids(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .ready
            .iter()
            .map(|e| e.gid)
            .filter(|g| *g != 0)
            .collect();
        v.extend(self.unacked.values().map(|u| u.env.gid).filter(|g| *g != 0));
        v.extend(self.delayed.values().map(|e| e.gid).filter(|g| *g != 0));
        v
    }

    fn release_credit(&mut self, u: &Unacked) {
        if let Some(cid) = u.consumer {
            if let Some(c) = self.consumers.iter_mut().find(|c| c.spec.id == cid) {
                // The channel gives back channel-wide (global qos) credit.
                c.unacked = c.unacked.saturating_sub(1);
            }
        }
    }

    /// Puts a message back at its original position (ids are publish order).
    fn requeue(&mut self, mut env: Envelope, delivered: bool) {
        if delivered {
            env.redelivered = true;
            env.delivery_count = env.delivery_count.saturating_add(1);
        }
        self.ready.insert_sorted(env);
    }
}

/// The whole state of a queue core, for Raft snapshots of quorum queues:
/// restoring it into a core configured with the same arguments gives a core
/// that behaves exactly as the original from then on.
#[derive(Debug, Clone, Default)]
pub struct CoreImage {
    /// The time last passed in.
    pub now: u64,
    /// Next message id.
    pub next_id: MsgId,
    /// Ready messages in delivery order.
    pub ready: Vec<Envelope>,
    /// Delivered and unsettled: (message, channel, consumer, timeout deadline).
    pub unacked: Vec<(Envelope, Owner, Option<ConsumerId>, u64)>,
    /// Waiting out a retry delay: (message, due).
    pub delayed: Vec<(Envelope, u64)>,
    /// Consumers in dispatch order: (spec, unacked, flow credit, round-robin cursor).
    pub consumers: Vec<(ConsumerSpec, u32, u32, usize)>,
    /// Deduplication cache entries.
    pub dedup: Vec<DedupEntry>,
}

impl DedupCache {
    /// Every remembered id (for snapshots).
    pub fn entries(&self) -> Vec<DedupEntry> {
        let mut v: Vec<DedupEntry> = self
            .seen
            .iter()
            .map(|(id, (expires, seq))| DedupEntry {
                seq: *seq,
                id: id.clone(),
                expires: *expires,
            })
            .collect();
        v.sort_unstable_by_key(|e| e.seq);
        v
    }
}

impl QueueCore {
    /// The core's state (see [`CoreImage`]). Paged-out bodies stay `None`.
    pub fn image(&self) -> CoreImage {
        let mut dues: HashMap<MsgId, u64> = HashMap::new();
        for Reverse((due, id)) in self.retry_due.iter() {
            let e = dues.entry(*id).or_insert(*due);
            *e = (*e).max(*due);
        }
        let mut unacked: Vec<(Envelope, Owner, Option<ConsumerId>, u64)> = self
            .unacked
            .values()
            .map(|u| (u.env.clone(), u.owner, u.consumer, u.deadline))
            .collect();
        unacked.sort_unstable_by_key(|u| u.0.id);
        let mut delayed: Vec<(Envelope, u64)> = self
            .delayed
            .values()
            .map(|e| (e.clone(), dues.get(&e.id).copied().unwrap_or(0)))
            .collect();
        delayed.sort_unstable_by_key(|d| d.0.id);
        CoreImage {
            now: self.now,
            next_id: self.next_id,
            ready: self.ready.iter().cloned().collect(),
            unacked,
            delayed,
            consumers: self
                .consumers
                .iter()
                .map(|c| (c.spec.clone(), c.unacked, c.flow, c.rr))
                .collect(),
            dedup: self.dedup.as_ref().map(|d| d.entries()).unwrap_or_default(),
        }
    }

    /// Loads an image into a core that was just configured (priorities,
    /// single active consumer, limits, retry, dedup) and holds nothing yet.
    pub fn restore_image(&mut self, img: CoreImage) {
        self.now = img.now;
        self.next_id = img.next_id;
        for env in img.ready {
            if env.expires != 0
                && env
                    .msg
                    .as_ref()
                    .is_some_and(|m| m.properties.expiration().is_some())
            {
                self.expiries.push(Reverse((env.expires, env.id)));
            }
            self.ready.push_back(env);
        }
        for (env, owner, consumer, deadline) in img.unacked {
            if let (Some(cid), true) = (consumer, deadline != 0) {
                self.timeouts.push(Reverse((deadline, env.id, cid)));
            }
            self.unacked.insert(
                env.id,
                Unacked {
                    env,
                    owner,
                    consumer,
                    deadline,
                },
            );
        }
        for (env, due) in img.delayed {
            self.retry_due.push(Reverse((due, env.id)));
            self.delayed.insert(env.id, env);
        }
        self.has_exclusive_consumer = img.consumers.iter().any(|c| c.0.exclusive);
        self.consumers = img
            .consumers
            .into_iter()
            .map(|(spec, unacked, flow, rr)| ConsumerState {
                spec,
                unacked,
                flow,
                rr,
            })
            .collect();
        if let Some(d) = self.dedup.as_mut() {
            d.restore(img.dedup, img.now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use proptest::prelude::*;

    fn msg(i: u64) -> Arc<Message> {
        Arc::new(Message {
            exchange: Bytes::new(),
            routing_key: Bytes::from_static(b"q"),
            properties: Default::default(),
            raw_properties: Bytes::from_static(&[0, 0]),
            body: Bytes::from(i.to_be_bytes().to_vec()),
        })
    }

    fn spec(id: ConsumerId, prefetch: u32) -> ConsumerSpec {
        ConsumerSpec {
            id,
            owner: Owner {
                conn: 1,
                channel: id as u16,
            },
            prefetch,
            no_ack: false,
            exclusive: false,
            shared: None,
            flow_window: 1_000_000,
            priority: 0,
            timeout: None,
        }
    }

    #[test]
    fn round_robin_honours_prefetch() {
        let mut q = QueueCore::new(3);
        for i in 0..5 {
            q.enqueue(msg(i), 0);
        }
        q.add_consumer(spec(1, 1)).unwrap();
        q.add_consumer(spec(2, 1)).unwrap();
        let mut out = vec![];
        q.dispatch(&mut out);
        assert_eq!(
            out.iter().map(|(c, e)| (*c, e.id)).collect::<Vec<_>>(),
            vec![(1, 0), (2, 1)]
        );
        out.clear();
        q.settle(&[0], Outcome::Ack);
        q.dispatch(&mut out);
        assert_eq!(
            out.iter().map(|(c, e)| (*c, e.id)).collect::<Vec<_>>(),
            vec![(1, 2)]
        );
    }

    #[test]
    fn requeue_keeps_position_and_marks_redelivered() {
        let mut q = QueueCore::new(3);
        for i in 0..3 {
            q.enqueue(msg(i), 0);
        }
        let (e0, _) = q
            .get(
                Owner {
                    conn: 1,
                    channel: 1,
                },
                false,
            )
            .unwrap();
        q.settle(&[e0.id], Outcome::Requeue);
        let (again, left) = q
            .get(
                Owner {
                    conn: 1,
                    channel: 1,
                },
                true,
            )
            .unwrap();
        assert_eq!(
            (again.id, again.redelivered, again.delivery_count, left),
            (0, true, 1, 2)
        );
    }

    #[test]
    fn exclusive_consumer_blocks_others() {
        let mut q = QueueCore::new(3);
        let mut s = spec(1, 0);
        s.exclusive = true;
        q.add_consumer(s).unwrap();
        assert_eq!(
            q.add_consumer(spec(2, 0)),
            Err(ConsumeRefused::ExclusiveInUse)
        );
        q.remove_consumer(1);
        q.add_consumer(spec(2, 0)).unwrap();
    }

    fn msg_p(i: u64, p: Option<u8>) -> Arc<Message> {
        let mut m = (*msg(i)).clone();
        if let Some(p) = p {
            m.properties = m.properties.clone().with_priority(p);
        }
        Arc::new(m)
    }

    fn ids_of(out: &[(ConsumerId, Envelope)]) -> Vec<(ConsumerId, MsgId)> {
        out.iter().map(|(c, e)| (*c, e.id)).collect()
    }

    #[test]
    fn priorities_deliver_highest_first_fifo_within() {
        let mut q = QueueCore::new(2);
        q.set_max_priority(5);
        for (i, p) in [None, Some(3), Some(9), Some(3), Some(0)]
            .into_iter()
            .enumerate()
        {
            q.enqueue(msg_p(i as u64, p), 0);
        }
        // 9 is capped at 5; no priority is 0.
        assert_eq!(q.ready.ids(), vec![2, 1, 3, 0, 4]);
        let owner = Owner {
            conn: 1,
            channel: 1,
        };
        let (e, _) = q.get(owner, false).unwrap();
        assert_eq!(e.id, 2);
        let (e1, _) = q.get(owner, false).unwrap();
        assert_eq!(e1.id, 1);
        q.settle(&[e1.id], Outcome::Requeue);
        q.settle(&[e.id], Outcome::Requeue);
        assert_eq!(q.ready.ids(), vec![2, 1, 3, 0, 4]);
        assert!(q.ready.check());
    }

    #[test]
    fn consumer_priorities_prefer_higher_with_credit() {
        let mut q = QueueCore::new(10);
        for i in 0..6 {
            q.enqueue(msg(i), 0);
        }
        let mut lo = spec(1, 0);
        lo.priority = 1;
        let mut hi_a = spec(2, 1);
        hi_a.priority = 5;
        let mut hi_b = spec(3, 1);
        hi_b.priority = 5;
        q.add_consumer(lo).unwrap();
        q.add_consumer(hi_a).unwrap();
        q.add_consumer(hi_b).unwrap();
        let mut out = vec![];
        q.dispatch(&mut out);
        assert_eq!(
            ids_of(&out),
            vec![(2, 0), (3, 1), (1, 2), (1, 3), (1, 4), (1, 5)]
        );
    }

    #[test]
    fn single_active_consumer_hands_over_in_order() {
        let mut q = QueueCore::new(10);
        q.set_single_active(true);
        q.add_consumer(spec(1, 2)).unwrap();
        q.add_consumer(spec(2, 0)).unwrap();
        for i in 0..4 {
            q.enqueue(msg(i), 0);
        }
        let mut out = vec![];
        q.dispatch(&mut out);
        assert_eq!(ids_of(&out), vec![(1, 0), (1, 1)]);
        out.clear();
        q.channel_closed(Owner {
            conn: 1,
            channel: 1,
        });
        q.dispatch(&mut out);
        assert_eq!(ids_of(&out), vec![(2, 0), (2, 1), (2, 2), (2, 3)]);
        assert!(out[0].1.redelivered && !out[2].1.redelivered);
    }

    #[test]
    fn consumer_timeout_requeues_and_cancels() {
        let mut q = QueueCore::new(10);
        let mut s = spec(1, 1);
        s.timeout = Some(100);
        q.add_consumer(s).unwrap();
        q.enqueue(msg(0), 0);
        q.set_time(1_000);
        let mut out = vec![];
        q.dispatch(&mut out);
        assert_eq!(q.next_timeout(), Some(1_100));
        assert!(q.timed_out(1_099).is_empty());
        assert_eq!(q.timed_out(1_100), vec![1]);
        q.cancel_and_requeue(1);
        assert_eq!(q.consumer_count(), 0);
        let (e, _) = q
            .get(
                Owner {
                    conn: 1,
                    channel: 2,
                },
                true,
            )
            .unwrap();
        assert!(e.redelivered);
    }

    #[test]
    fn delayed_retry_waits_without_blocking_and_returns_in_place() {
        use super::super::args::{Backoff, RetryArgs, RetryType};
        let mut q = QueueCore::new(10);
        q.set_retry(RetryArgs {
            kind: RetryType::Returned,
            min: 100,
            max: Some(250),
            backoff: Backoff::Exponential,
        });
        q.add_consumer(spec(1, 1)).unwrap();
        for i in 0..3 {
            q.enqueue(msg(i), 0);
        }
        q.set_time(1_000);
        let mut out = vec![];
        q.dispatch(&mut out);
        let first = out[0].1.id;
        // A nack with requeue is not a "returned" retry: back at once.
        q.settle(&[first], Outcome::Requeue);
        assert_eq!(q.next_retry(), None);
        out.clear();
        q.dispatch(&mut out);
        assert_eq!(out[0].1.id, first);
        // Consumer timeout: returned, delayed by min × 2^(count-1) = 200.
        q.cancel_and_requeue(1);
        assert_eq!(q.next_retry(), Some(1_200));
        assert_eq!(q.counts().ready, 3);
        q.add_consumer(spec(2, 1)).unwrap();
        out.clear();
        q.dispatch(&mut out);
        assert_eq!(out[0].1.id, first + 1, "the next message is not held back");
        q.settle(&[first + 1], Outcome::Ack);
        q.set_time(1_200);
        out.clear();
        q.dispatch(&mut out);
        assert_eq!(out[0].1.id, first, "back in its original position");
        assert_eq!(out[0].1.delivery_count, 2);
        // Capped at max.
        assert_eq!(q.retry.delay(false, 5), 250);
        assert_eq!(q.retry.delay(true, 5), 0);
    }

    fn dedup(size: Option<u64>, ttl: Option<u64>) -> DedupCache {
        DedupCache::new(super::super::args::DedupArgs {
            cache_size: size,
            cache_ttl: ttl,
        })
    }

    #[test]
    fn dedup_delta_holds_what_changed_and_restore_rebuilds() {
        let mut c = dedup(Some(3), None);
        for id in ["a", "b", "c"] {
            assert!(!c.check_and_insert(id.into(), 1_000));
        }
        let d = c.take_delta();
        assert_eq!(
            d.put
                .iter()
                .map(|e| (e.seq, e.id.as_str()))
                .collect::<Vec<_>>(),
            vec![(1, "a"), (2, "b"), (3, "c")]
        );
        assert!(d.del.is_empty() && !c.is_dirty());
        assert!(
            c.check_and_insert("b".into(), 1_001),
            "duplicate: no change"
        );
        assert!(!c.is_dirty());
        // d evicts a (saved: a removal), e evicts b; nothing else.
        c.check_and_insert("d".into(), 1_002);
        c.check_and_insert("e".into(), 1_003);
        let d2 = c.take_delta();
        assert_eq!(
            d2.put.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            vec!["d", "e"]
        );
        assert_eq!(d2.del, vec![1, 2]);
        // An id added and evicted between two saves is never written.
        c.check_and_insert("f".into(), 1_004);
        c.check_and_insert("g".into(), 1_005);
        c.check_and_insert("h".into(), 1_006);
        c.check_and_insert("i".into(), 1_007);
        let d3 = c.take_delta();
        assert_eq!(
            d3.put.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
            vec!["g", "h", "i"]
        );
        assert_eq!(d3.del, vec![3, 4, 5]);

        // Saved state = d ∪ d2 ∪ d3 minus deletions: g, h, i.
        let mut saved: std::collections::BTreeMap<u64, DedupEntry> = Default::default();
        for d in [d, d2, d3] {
            for s in d.del {
                saved.remove(&s);
            }
            for e in d.put {
                saved.insert(e.seq, e);
            }
        }
        let mut r = dedup(Some(3), None);
        r.restore(saved.into_values().collect(), 2_000);
        assert!(!r.is_dirty());
        assert!(r.contains("g", 2_000) && r.contains("i", 2_000) && !r.contains("a", 2_000));
        // Eviction order and sequence numbers carry on.
        r.check_and_insert("j".into(), 2_001);
        assert!(!r.contains("g", 2_001) && r.contains("h", 2_001));
        let d4 = r.take_delta();
        assert_eq!(d4.put[0].seq, 10);
        assert_eq!(d4.del, vec![7]);
    }

    #[test]
    fn dedup_ttl_expires_entries_and_restore_drops_expired() {
        let mut c = dedup(None, Some(100));
        c.check_and_insert("a".into(), 1_000);
        c.check_and_insert("b".into(), 1_050);
        let saved = c.take_delta().put;
        assert_eq!(saved[0].expires, 1_100);
        assert!(
            !c.check_and_insert("a".into(), 1_100),
            "expired: taken again"
        );
        // a got a fresh entry (its saved one is a removal); b is live.
        assert_eq!(c.len(), 2);
        let d = c.take_delta();
        assert_eq!(d.del, vec![1]);
        assert_eq!(d.put.len(), 1);
        // Without a size, expired ids still leave the cache.
        for i in 0..1_000u64 {
            c.check_and_insert(format!("x{i}"), 2_000 + i);
        }
        assert!(c.len() <= 101, "bounded by the ttl: {}", c.len());
        // Restore at 1_120: b (expires 1_150) stays, a (1_100) goes.
        let mut r = dedup(None, Some(100));
        r.restore(saved, 1_120);
        assert!(r.contains("b", 1_120) && !r.contains("a", 1_120));
        assert!(r.is_dirty());
        assert_eq!(r.take_delta().del, vec![1]);
    }

    #[test]
    fn restore_applies_a_smaller_cache_size_and_duplicates() {
        let entries = (1..=5)
            .map(|i| DedupEntry {
                seq: i,
                id: if i == 5 { "m1".into() } else { format!("m{i}") },
                expires: 0,
            })
            .collect();
        let mut r = dedup(Some(2), None);
        r.restore(entries, 0);
        // m1 again at seq 5 replaces seq 1; the oldest beyond 2 go.
        assert_eq!(r.len(), 2);
        assert!(r.contains("m1", 0) && r.contains("m4", 0));
        let mut del = r.take_delta().del;
        del.sort_unstable();
        assert_eq!(del, vec![1, 2, 3]);
    }

    #[test]
    fn delayed_stored_messages_are_reported_and_recovered_in_place() {
        use super::super::args::{Backoff, RetryArgs, RetryType};
        let mut q = QueueCore::new(10);
        q.set_retry(RetryArgs {
            kind: RetryType::Failed,
            min: 1_000,
            max: None,
            backoff: Backoff::Linear,
        });
        q.set_time(5_000);
        q.enqueue(msg(0), 7);
        q.enqueue(msg(1), 0);
        let owner = Owner {
            conn: 1,
            channel: 1,
        };
        let (a, _) = q.get(owner, false).unwrap();
        let (b, _) = q.get(owner, false).unwrap();
        let s = q.settle(&[a.id, b.id], Outcome::Requeue);
        // Only the stored one is reported (transient ones do not survive).
        assert_eq!(
            s.delayed,
            vec![(
                7,
                RetryState {
                    due: 6_000,
                    count: 1
                }
            )]
        );

        // After a restart: three stored messages, the middle one waiting.
        let mut r = QueueCore::new(10);
        r.enqueue_envelope(None, 1, 1, false);
        r.enqueue_recovered_retry(
            None,
            2,
            1,
            0,
            RetryState {
                due: 9_000,
                count: 3,
            },
            8_000,
        );
        r.enqueue_recovered_retry(
            None,
            3,
            1,
            0,
            RetryState {
                due: 7_000,
                count: 2,
            },
            8_000,
        );
        assert_eq!(r.next_retry(), Some(9_000));
        assert_eq!(r.delayed_len(), 1);
        assert_eq!(r.counts().ready, 3);
        let (e, _) = r.get(owner, true).unwrap();
        assert_eq!(e.gid, 1);
        let (e, _) = r.get(owner, true).unwrap();
        assert_eq!((e.gid, e.delivery_count, e.redelivered), (3, 2, true));
        assert!(r.get(owner, true).is_none(), "still waiting");
        r.set_time(9_000);
        let (e, _) = r.get(owner, false).unwrap();
        assert_eq!((e.gid, e.delivery_count, e.redelivered), (2, 3, true));
        // The delivery limit counts on from the saved count.
        r.set_limits(Limits {
            delivery_limit: Some(3),
            ..Default::default()
        });
        let s = r.settle(&[e.id], Outcome::Requeue);
        assert_eq!(s.dead.len(), 1);
        assert_eq!(s.dead[0].0.delivery_count, 4);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Publish(Option<u8>),
        Dispatch,
        Ack(usize),
        Requeue(usize),
        Discard(usize),
        Close(u16),
        Get,
        Page,
        Refill,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => proptest::option::of(0u8..6).prop_map(Op::Publish),
            2 => Just(Op::Dispatch),
            2 => any::<usize>().prop_map(Op::Ack),
            1 => any::<usize>().prop_map(Op::Requeue),
            1 => any::<usize>().prop_map(Op::Discard),
            1 => (1u16..3).prop_map(Op::Close),
            1 => Just(Op::Get),
            1 => Just(Op::Page),
            1 => Just(Op::Refill),
        ]
    }

    proptest! {
        /// Every published message is, at every step, in exactly one place:
        /// ready, held unacked, acked, or discarded. Nothing is lost or
        /// duplicated outside redelivery, and ready stays in publish order.
        #[test]
        fn conserves_messages(ops in proptest::collection::vec(op(), 1..200)) {
            let mut q = QueueCore::new(3);
            q.set_max_priority(3);
            q.add_consumer(spec(1, 3)).unwrap();
            q.add_consumer(spec(2, 0)).unwrap();
            let mut held: Vec<(Owner, MsgId)> = vec![];
            let mut published = 0u64;
            let mut gone = 0u64;
            for op in ops {
                match op {
                    Op::Publish(p) => { q.enqueue(msg_p(published, p), published + 1); published += 1; }
                    Op::Page => { q.ready_mut().page_out(|_| true); }
                    Op::Refill => { let lost = q.ready_mut().page_in(|g| Some(msg(g - 1))); prop_assert!(lost.is_empty()); }
                    Op::Dispatch => {
                        let mut out = vec![];
                        q.dispatch(&mut out);
                        for (c, e) in out { held.push((Owner { conn: 1, channel: c as u16 }, e.id)); }
                    }
                    Op::Get => {
                        if let Some((e, _)) = q.get(Owner { conn: 1, channel: 9 }, false) {
                            held.push((Owner { conn: 1, channel: 9 }, e.id));
                        }
                    }
                    Op::Ack(i) | Op::Requeue(i) | Op::Discard(i) if !held.is_empty() => {
                        let (_, id) = held.remove(i % held.len());
                        let outcome = match op { Op::Ack(_) => Outcome::Ack, Op::Requeue(_) => Outcome::Requeue, _ => Outcome::Discard };
                        let settled = q.settle(&[id], outcome);
                        prop_assert_eq!(settled.unknown, 0);
                        if outcome != Outcome::Requeue { gone += 1; }
                    }
                    Op::Close(ch) => {
                        q.channel_closed(Owner { conn: 1, channel: ch });
                        held.retain(|(o, _)| o.channel != ch);
                        if q.consumer_count() < 2 {
                            q.add_consumer(spec(ch as u64, if ch == 1 { 3 } else { 0 })).ok();
                        }
                    }
                    _ => {}
                }
                let c = q.counts();
                prop_assert_eq!(c.ready + c.unacked + gone, published);
                prop_assert_eq!(c.unacked as usize, held.len());
                // Delivery order: priority never rises, publish order within
                // a priority.
                let keyed = q.ready.keyed_ids();
                prop_assert!(keyed.windows(2).all(|w| w[0].0 > w[1].0 || (w[0].0 == w[1].0 && w[0].1 < w[1].1)));
                prop_assert!(q.ready.check());
                prop_assert_eq!(q.ready.iter().map(|e| e.priority).collect::<Vec<_>>(), keyed.iter().map(|k| k.0).collect::<Vec<_>>());
                prop_assert_eq!(q.ready.bytes(), q.ready.iter().map(|e| u64::from(e.size)).sum::<u64>());
            }
        }
    }
}
