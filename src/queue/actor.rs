//! The queue actor: one task per queue, the only owner of its [`QueueCore`].
//!
//! It drains its bounded inbox in batches, applies each command to the core,
//! then dispatches ready messages and sends each consumer's deliveries to its
//! connection as one batch. It never waits on a connection (connection
//! inboxes are unbounded and bounded in practice by prefetch and flow
//! credit), so a slow or dead client cannot stall a queue.
//!
//! For a durable queue it also keeps the store in step: acked and discarded
//! messages are forgotten, first deliveries are marked (so a restart sets
//! redelivered), and bodies beyond the in-memory window are dropped once the
//! store has them and read back ahead of delivery. Publishes are written to
//! the store by the publishing connection, before they reach the queue.
//!
//! A durable queue also saves, in the definitions store (lazy writes, no
//! fsync; see `broker::persist`), the retry state of stored messages that
//! entered a delayed-retry wait (due time and delivery count, batched per
//! turn, removed when the message leaves the queue) and its deduplication
//! cache (what changed, at most once a second, and on clean shutdown), and
//! restores both at start.

use super::core::{
    Admission, ConsumeRefused, ConsumerId, DeadReason, Envelope, Outcome, QueueCore, RetryState,
    Settled,
};
use super::deadletter;
use super::message::Message;
use super::{QueueCmd, QueueRef};
use crate::broker::persist::Storage;
use crate::broker::{ConnCmd, ConnTx, VHost};
use crate::protocol::error::AmqpError;
use crate::store::RecoveredMessage;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tracing::{debug, error, trace, warn};

struct Link {
    conn: ConnTx,
    channel: u16,
    tag: Arc<str>,
}

/// How to start a queue actor.
pub struct QueueInit {
    /// Its vhost.
    pub vhost: Arc<VHost>,
    /// Inbox capacity.
    pub inbox: usize,
    /// Ready bodies kept in memory.
    pub window: usize,
    /// Storage, for durable queues.
    pub storage: Option<Storage>,
    /// Messages found in the store at start.
    pub recovered: Vec<RecoveredMessage>,
    /// Ready messages above which publishers are slowed (when consumers are attached).
    pub flow_threshold: u64,
    /// Hands out store ids (the broker's counter), for dead-lettered
    /// persistent messages.
    pub gids: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// Called once when the queue deletes itself (client delete,
    /// auto-delete, x-expires, exclusive owner gone): unregisters it from
    /// the cluster (`cluster::classic::delete_hook`).
    pub on_delete: Option<DeleteHook>,
}

/// See [`QueueInit::on_delete`].
pub type DeleteHook = Arc<dyn Fn(&QueueRef) + Send + Sync>;

/// Owns one queue's state. Built and started by [`spawn`].
pub struct QueueActor {
    q: Arc<QueueRef>,
    vhost: Weak<VHost>,
    core: QueueCore,
    links: HashMap<ConsumerId, Link>,
    ever_consumed: bool,
    out: Vec<(ConsumerId, Envelope)>,
    storage: Option<Storage>,
    /// Store ids to forget / mark delivered after this batch.
    forget: Vec<u64>,
    delivered: Vec<u64>,
    flow_threshold: u64,
    /// This queue's part of the broker-wide draining backlog (see
    /// [`super::FlowShare`]).
    flow_share: super::FlowShare,
    /// Last consumer activity, basic.get or redeclare (ms), for x-expires.
    last_used: u64,
    /// Source of store ids for dead-lettered persistent messages.
    gids: Option<Arc<dyn Fn() -> u64 + Send + Sync>>,
    /// Arguments merged with the queue's policy (crate::broker::policy).
    eff: crate::broker::policy::QueueEffective,
    /// Stored messages whose retry state is saved (removed when they leave
    /// the queue).
    retry_saved: HashSet<u64>,
    /// Retry state to save (`None`: remove) at the end of this turn.
    retry_changes: HashMap<u64, Option<RetryState>>,
    /// Highest gid of a stored message accepted by this (deduplicating)
    /// queue, and the one the last saved cache covers.
    dedup_max_gid: u64,
    dedup_saved_max_gid: u64,
    /// When the deduplication cache was last saved (ms).
    dedup_saved_at: u64,
    /// See [`QueueInit::on_delete`].
    on_delete: Option<DeleteHook>,
}

/// A durable queue saves its deduplication cache at most this often (ms);
/// a crash loses at most the ids accepted since the last save (plus sled's
/// 500 ms background flush), see `broker::persist`.
const DEDUP_SAVE_INTERVAL_MS: u64 = 1_000;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn sleep_until_ms(deadline: Option<u64>) {
    let now = now_ms();
    let wait = deadline.map_or(3_600_000, |d| d.saturating_sub(now));
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
}

fn vhost_broker_gid(gids: &Option<Arc<dyn Fn() -> u64 + Send + Sync>>) -> Option<u64> {
    gids.as_ref().map(|f| f())
}

/// Creates a queue: its registry entry and its actor task.
pub fn spawn(
    make: impl FnOnce(mpsc::Sender<QueueCmd>) -> QueueRef,
    init: QueueInit,
) -> Arc<QueueRef> {
    let (tx, rx) = mpsc::channel(init.inbox.max(1));
    let q = Arc::new(make(tx));
    let storage = if q.is_stored() { init.storage } else { None };
    let mut core = QueueCore::new(init.window);
    core.set_single_active(q.args.single_active_consumer);
    let max_priority = q.args.max_priority.unwrap_or(0);
    if max_priority > 0 {
        core.set_max_priority(max_priority);
    }
    core.set_dedup(q.args.dedup);
    let recovered_at = now_ms();
    let mut snap = storage
        .as_ref()
        .map(|st| st.load_queue_snapshot(q.id))
        .unwrap_or_default();
    if let Some(cache) = core.dedup_mut() {
        cache.restore(std::mem::take(&mut snap.dedup), recovered_at);
    }
    let mut dedup_max_gid = snap.dedup_max_gid;
    let mut retry_saved = HashSet::new();
    for r in &init.recovered {
        // A priority queue reads each recovered message once to learn its
        // level (the store keeps no priority of its own); a deduplicating
        // one reads those its saved cache does not cover (they reached it
        // after the last save, e.g. just before a crash) to remember their
        // x-deduplication-header.
        let uncovered = core.dedup_enabled() && r.gid > snap.dedup_max_gid;
        let m = match &storage {
            Some(st) if max_priority > 0 || uncovered => load(&st.msgs, r.gid),
            _ => None,
        };
        if let (Some(m), true) = (&m, uncovered) {
            core.remember_dedup_id(m, recovered_at);
            dedup_max_gid = dedup_max_gid.max(r.gid);
        }
        let p = match (&m, max_priority) {
            (Some(m), 1..) => core.priority_of(m),
            _ => 0,
        };
        match snap.retry.remove(&r.gid) {
            // It was waiting out (or had waited out) a retry delay: keep
            // its due time and delivery count.
            Some(state) => {
                core.enqueue_recovered_retry(None, r.gid, r.size, p, state, recovered_at);
                retry_saved.insert(r.gid);
            }
            None => {
                core.enqueue_envelope_at(None, r.gid, r.size, r.delivered, p);
            }
        }
    }
    if core.delayed_len() > 0 {
        debug!(
            waiting = core.delayed_len(),
            "recovered messages still waiting out a retry delay"
        );
    }
    // Saved retry state of messages that are no longer stored (a crash lost
    // the removal): removed at the first turn.
    let retry_changes: HashMap<u64, Option<RetryState>> =
        snap.retry.keys().map(|g| (*g, None)).collect();
    let mut actor = QueueActor {
        q: q.clone(),
        vhost: Arc::downgrade(&init.vhost),
        core,
        links: HashMap::new(),
        ever_consumed: false,
        out: Vec::new(),
        storage,
        forget: Vec::new(),
        delivered: Vec::new(),
        flow_threshold: init.flow_threshold,
        flow_share: super::FlowShare::default(),
        last_used: now_ms(),
        gids: init.gids,
        eff: crate::broker::policy::effective(&init.vhost, &q),
        retry_saved,
        retry_changes,
        dedup_max_gid,
        dedup_saved_max_gid: snap.dedup_max_gid,
        dedup_saved_at: 0,
        on_delete: init.on_delete,
    };
    actor.core.set_limits(actor.eff.limits.clone());
    actor.core.arm_recovered_ttl(recovered_at);
    actor
        .core
        .set_retry(super::args::effective_retry(&q.args, &q.arguments, |k| {
            actor.eff.policy_value(k)
        }));
    actor.page();
    actor.update_flow();
    let span = tracing::debug_span!("queue", name = %q.name, vhost = %q.vhost);
    tokio::spawn(tracing::Instrument::instrument(actor.run(rx), span));
    q
}

enum Flow {
    Continue,
    Stop,
}

impl QueueActor {
    async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let mut cmds = Vec::with_capacity(64);
        loop {
            let deadline = self.next_deadline();
            tokio::select! {
                n = rx.recv_many(&mut cmds, 64) => {
                    if n == 0 {
                        break;
                    }
                }
                _ = sleep_until_ms(deadline), if deadline.is_some() => {}
            }
            self.core.set_time(now_ms());
            for cmd in cmds.drain(..) {
                if let Flow::Stop = self.handle(cmd).await {
                    debug!("queue deleted");
                    return;
                }
            }
            self.consumer_timeouts().await;
            // Consumers first (a message due to expire now still goes to a
            // waiting consumer, as in RabbitMQ), then expiry.
            self.dispatch();
            let expired = self.core.expire(now_ms());
            self.dead_letter(expired).await;
            self.sync_store().await;
            self.save_dedup(now_ms(), false);
            self.page();
            self.update_flow();
            if self.should_auto_delete() || self.unused_expired() {
                self.delete().await;
                return;
            }
        }
    }

    /// When the actor must wake up without a command: the next message
    /// expiry or the queue's own expiry (x-expires).
    fn next_deadline(&self) -> Option<u64> {
        let q_exp = self
            .eff
            .expires
            .filter(|_| self.core.consumer_count() == 0)
            .map(|e| self.last_used + e);
        [
            self.core.next_expiry(),
            q_exp,
            self.core.next_timeout(),
            self.core.next_retry(),
            self.dedup_needs_save()
                .then(|| self.dedup_saved_at.saturating_add(DEDUP_SAVE_INTERVAL_MS)),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Consumer timeout: a consumer that held a delivery unacked too long is
    /// cancelled (basic.cancel to its client) and its deliveries go back to
    /// the queue, redelivered.
    async fn consumer_timeouts(&mut self) {
        if self.core.next_timeout().is_none() {
            return;
        }
        for cid in self.core.timed_out(now_ms()) {
            warn!(
                consumer = cid,
                "consumer timed out holding an unacknowledged delivery; cancelling it"
            );
            let settled = self.core.cancel_and_requeue(cid);
            if let Some(link) = self.links.remove(&cid) {
                let _ = link.conn.send(ConnCmd::ConsumerCancelled {
                    channel: link.channel,
                    consumer: cid,
                    revoked: true,
                });
            }
            let dead = self.absorb(settled);
            self.dead_letter(dead).await;
        }
    }

    /// x-expires: no consumers, no basic.get and no redeclare for that long.
    fn unused_expired(&self) -> bool {
        match self.eff.expires {
            Some(e) => self.core.consumer_count() == 0 && now_ms() >= self.last_used + e,
            None => false,
        }
    }

    /// Sends messages that left the queue unacked to the dead-letter
    /// exchange (or drops them when there is none), forgetting their old
    /// store records.
    async fn dead_letter(&mut self, dead: Vec<(Envelope, DeadReason)>) {
        if dead.is_empty() {
            return;
        }
        let dlx = self.eff.dead_letter_exchange.clone();
        let vhost = self.vhost.upgrade();
        let now_secs = now_ms() / 1000;
        for (mut env, reason) in dead {
            if env.gid != 0 {
                self.forget.push(env.gid);
            }
            let (Some(dlx), Some(vhost)) = (dlx.as_deref(), vhost.as_ref()) else {
                continue;
            };
            if !self.fill_body(&mut env) {
                continue;
            }
            let Some(msg) = env.msg else { continue };
            let Some(ex) = vhost.exchange(dlx) else {
                trace!(dlx, "dead-letter exchange does not exist; message dropped");
                continue;
            };
            let out = deadletter::dead_lettered(
                &msg,
                &self.q.name,
                reason,
                now_secs,
                dlx,
                self.eff.dead_letter_routing_key.as_deref(),
            );
            let mut targets = Vec::new();
            vhost.route(
                &ex,
                out.routing_key_str(),
                out.properties.headers().as_ref(),
                &mut targets,
            );
            if reason != DeadReason::Rejected {
                targets.retain(|t| !deadletter::is_cycle(&out, &t.name));
            }
            if targets.is_empty() {
                continue;
            }
            let out = Arc::new(out);
            let mut gid = 0;
            if out.is_persistent() {
                if let Some(st) = &self.storage {
                    let stored: Vec<u64> = targets
                        .iter()
                        .filter(|t| t.uses_message_store())
                        .map(|t| t.id)
                        .collect();
                    if !stored.is_empty() {
                        if let Some(b) = vhost_broker_gid(&self.gids) {
                            gid = b;
                            if let Err(e) = st.msgs.append(gid, stored, out.parts(), None).await {
                                warn!("could not persist a dead-lettered message: {e}");
                                gid = 0;
                            }
                        }
                    }
                }
            }
            for t in targets {
                let g = if t.uses_message_store() { gid } else { 0 };
                let cmd = QueueCmd::Publish {
                    msgs: vec![(out.clone(), g)],
                    confirm: None,
                };
                // Never wait on another queue from here: two queues that
                // dead-letter into each other would deadlock.
                if let Err(mpsc::error::TrySendError::Full(cmd)) = t.tx.try_send(cmd) {
                    let t = t.clone();
                    tokio::spawn(async move {
                        let _ = t.tx.send(cmd).await;
                    });
                }
            }
        }
    }

    /// Flow control: while the backlog is over the threshold and consumers
    /// are attached (so it is draining, just not fast enough), publishers to
    /// this queue slow down. Without consumers a backlog is expected; the
    /// memory alarm and paging bound it instead.
    fn update_flow(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let ready = self.core.ready_len() as u64;
        let consumers = self.core.consumer_count() as u64;
        self.q.ready_gauge.store(ready, Relaxed);
        self.q.consumers_gauge.store(consumers, Relaxed);
        self.flow_share.set(if consumers > 0 { ready } else { 0 });
        self.q.flow_threshold.store(self.flow_threshold, Relaxed);
    }

    fn should_auto_delete(&self) -> bool {
        self.q.auto_delete && self.ever_consumed && self.core.consumer_count() == 0
    }

    /// Takes what a settle removed or started: store records to forget
    /// (except those of messages to dead-letter: `dead_letter` forgets
    /// them), retry waits to save. Returns what must be dead-lettered.
    fn absorb(&mut self, settled: Settled) -> Vec<(Envelope, DeadReason)> {
        let mut dead = settled.dead;
        dead.extend(
            settled
                .discarded
                .into_iter()
                .map(|e| (e, DeadReason::Rejected)),
        );
        let handled: HashSet<u64> = dead.iter().map(|(e, _)| e.gid).collect();
        self.forget.extend(
            settled
                .removed_gids
                .into_iter()
                .filter(|g| !handled.contains(g)),
        );
        if self.storage.is_some() {
            for (gid, state) in settled.delayed {
                self.retry_saved.insert(gid);
                self.retry_changes.insert(gid, Some(state));
            }
        }
        dead
    }

    /// True when the deduplication cache (or the gid it covers) changed
    /// since it was last saved.
    fn dedup_needs_save(&self) -> bool {
        self.storage.is_some()
            && (self.core.dedup_dirty() || self.dedup_max_gid != self.dedup_saved_max_gid)
    }

    /// Saves what changed in the deduplication cache: at most once per
    /// interval, or now with `force` (clean shutdown). A lazy write (no
    /// fsync): see `broker::persist` for what a crash may lose.
    fn save_dedup(&mut self, now: u64, force: bool) {
        if !self.dedup_needs_save()
            || (!force && now < self.dedup_saved_at.saturating_add(DEDUP_SAVE_INTERVAL_MS))
        {
            return;
        }
        let (Some(st), Some(cache)) = (&self.storage, self.core.dedup_mut()) else {
            return;
        };
        let delta = cache.take_delta();
        self.dedup_saved_at = now;
        self.dedup_saved_max_gid = self.dedup_max_gid;
        if let Err(e) = st.save_queue_dedup(self.q.id, &delta, self.dedup_max_gid) {
            warn!(
                "could not save the queue's deduplication cache ({e}); after a restart it may let duplicates through"
            );
        }
    }

    /// Tells the store what this batch settled and delivered, and saves
    /// retry state that changed.
    async fn sync_store(&mut self) {
        let Some(st) = &self.storage else {
            self.forget.clear();
            self.delivered.clear();
            return;
        };
        if !self.retry_saved.is_empty() {
            for g in &self.forget {
                if self.retry_saved.remove(g) {
                    self.retry_changes.insert(*g, None);
                }
            }
        }
        if !self.retry_changes.is_empty() {
            let changes = std::mem::take(&mut self.retry_changes);
            if let Err(e) = st.save_retry(self.q.id, changes) {
                warn!(
                    "could not save retry delays ({e}); after a restart the waiting messages may be ready at once"
                );
            }
        }
        if !self.forget.is_empty() {
            let gids = std::mem::take(&mut self.forget);
            if let Err(e) = st.msgs.ack(self.q.id, gids).await {
                warn!("could not record acks in the message store: {e}");
            }
        }
        if !self.delivered.is_empty() {
            let gids = std::mem::take(&mut self.delivered);
            if let Err(e) = st.msgs.delivered(self.q.id, gids).await {
                warn!("could not record deliveries in the message store: {e}");
            }
        }
    }

    /// Keeps at most the window of ready bodies in memory.
    fn page(&mut self) {
        let Some(st) = &self.storage else { return };
        let msgs = &st.msgs;
        let ready = self.core.ready_mut();
        ready.page_out(|gid| msgs.contains(gid));
        let lost = ready.page_in(|gid| load(msgs, gid));
        for e in lost {
            error!(
                gid = e.gid,
                "a stored message of this queue could not be read back and is lost; check the data directory for damage"
            );
            self.forget.push(e.gid);
        }
    }

    async fn handle(&mut self, cmd: QueueCmd) -> Flow {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                trace!(n = msgs.len(), "enqueue");
                let _ = self.q.inflight.fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |v| Some(v.saturating_sub(msgs.len() as u64)),
                );
                let now = now_ms();
                let mut rejected = Vec::new();
                let mut dead = Vec::new();
                for (i, (m, gid)) in msgs.into_iter().enumerate() {
                    let (admission, mut gone) = self.core.publish(m, gid, now);
                    if admission == Admission::Accepted && self.core.dedup_enabled() {
                        self.dedup_max_gid = self.dedup_max_gid.max(gid);
                    }
                    if admission == Admission::Duplicate && gid != 0 {
                        self.forget.push(gid);
                    }
                    if admission == Admission::Rejected {
                        rejected.push(i);
                        if gid != 0 && gone.is_empty() {
                            self.forget.push(gid);
                        }
                    }
                    dead.append(&mut gone);
                }
                if let Some(c) = confirm {
                    // Enqueued: this queue's part of the confirm (stored
                    // messages also wait for the store's group commit).
                    // Refused by a length limit: basic.nack.
                    if rejected.is_empty() {
                        let _ = c.conn.send(ConnCmd::Confirm {
                            channel: c.channel,
                            seqs: c.seqs,
                            nack: false,
                        });
                    } else {
                        c.settle(|i| rejected.contains(&i));
                    }
                }
                self.dead_letter(dead).await;
            }
            QueueCmd::Touch => self.last_used = now_ms(),
            QueueCmd::PolicyChanged => {
                // Computed here, not by the sender, so the latest policies
                // win whatever order concurrent changes arrive in.
                if let Some(v) = self.vhost.upgrade() {
                    self.eff = crate::broker::policy::effective(&v, &self.q);
                    self.core.set_limits(self.eff.limits.clone());
                    // Hook: other policy keys (e.g. delayed retry) are in
                    // self.eff.policy_value(key).
                    let eff = &self.eff;
                    self.core.set_retry(super::args::effective_retry(
                        &self.q.args,
                        &self.q.arguments,
                        |k| eff.policy_value(k),
                    ));
                    // A lowered max-length applies to what is queued now.
                    let dead = self.core.trim_to_limits();
                    self.dead_letter(dead).await;
                }
            }
            QueueCmd::Consume {
                mut spec,
                conn,
                tag,
                reply,
                args,
            } => {
                match consume_args(&args, self.q.args.consumer_timeout) {
                    Ok((priority, timeout)) => {
                        spec.priority = priority;
                        spec.timeout = timeout;
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return Flow::Continue;
                    }
                }
                let id = spec.id;
                let channel = spec.owner.channel;
                self.last_used = now_ms();
                let res = match self.core.add_consumer(spec) {
                    Ok(()) => {
                        self.links.insert(id, Link { conn, channel, tag });
                        self.ever_consumed = true;
                        Ok(())
                    }
                    Err(ConsumeRefused::ExclusiveInUse) => Err(AmqpError::new(
                        crate::protocol::error::code::ACCESS_REFUSED,
                        format!(
                            "queue '{}' in vhost '{}' in exclusive use",
                            self.q.name, self.q.vhost
                        ),
                    )),
                };
                let _ = reply.send(res);
            }
            QueueCmd::Cancel { consumer, reply } => {
                self.last_used = now_ms();
                self.core.remove_consumer(consumer);
                self.links.remove(&consumer);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::Settle { ids, outcome } => {
                let settled = self.core.settle(&ids, outcome);
                let dead = self.absorb(settled);
                self.dead_letter(dead).await;
            }
            QueueCmd::Get {
                owner,
                no_ack,
                reply,
            } => {
                self.last_used = now_ms();
                let mut got = self.core.get(owner, no_ack);
                if let Some((env, _)) = got.as_mut() {
                    if !self.fill_body(env) {
                        got = None;
                    } else if env.gid != 0 {
                        if no_ack {
                            self.forget.push(env.gid);
                        } else if !env.redelivered {
                            self.delivered.push(env.gid);
                        }
                    }
                }
                let _ = reply.send(got);
            }
            QueueCmd::Credit { consumer, n } => self.core.credit(consumer, n),
            QueueCmd::ChannelClosed { owner } => {
                let (gone, settled) = self.core.channel_closed(owner);
                for id in gone {
                    self.links.remove(&id);
                }
                // Messages returned past their delivery limit are
                // dead-lettered, not lost.
                let dead = self.absorb(settled);
                self.dead_letter(dead).await;
            }
            QueueCmd::Purge { reply } => {
                let purged = self.core.purge();
                self.forget
                    .extend(purged.iter().map(|e| e.gid).filter(|g| *g != 0));
                let _ = reply.send(purged.len() as u64);
            }
            QueueCmd::Stats { reply } => {
                let _ = reply.send(self.core.counts());
            }
            QueueCmd::SaveSnapshot { reply } => {
                self.sync_store().await;
                self.save_dedup(now_ms(), true);
                let _ = reply.send(());
            }
            QueueCmd::Kick => {}
            QueueCmd::Peek { count, reply } => {
                let envs: Vec<(Option<Arc<Message>>, u64, bool)> = self
                    .core
                    .ready_mut()
                    .iter()
                    .take(count)
                    .map(|e| (e.msg.clone(), e.gid, e.redelivered))
                    .collect();
                let msgs = envs
                    .into_iter()
                    .filter_map(|(m, gid, r)| {
                        let m =
                            m.or_else(|| self.storage.as_ref().and_then(|st| load(&st.msgs, gid)))?;
                        Some((m, r))
                    })
                    .collect();
                let _ = reply.send(msgs);
            }
            QueueCmd::Consumers { reply } => {
                let infos = self
                    .links
                    .values()
                    .map(|l| super::ConsumerInfo {
                        tag: l.tag.to_string(),
                        channel: l.channel,
                        conn: l.conn.clone(),
                    })
                    .collect();
                let _ = reply.send(infos);
            }
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let counts = self.core.counts();
                let refused = if if_unused && counts.consumers > 0 {
                    Some(format!(
                        "queue '{}' in vhost '{}' in use",
                        self.q.name, self.q.vhost
                    ))
                } else if if_empty && counts.ready > 0 {
                    Some(format!(
                        "queue '{}' in vhost '{}' not empty",
                        self.q.name, self.q.vhost
                    ))
                } else {
                    None
                };
                if let Some(why) = refused {
                    if let Some(r) = reply {
                        let _ = r.send(Err(AmqpError::precondition(why)));
                    }
                    return Flow::Continue;
                }
                self.delete().await;
                if let Some(r) = reply {
                    let _ = r.send(Ok(counts.ready));
                }
                return Flow::Stop;
            }
        }
        Flow::Continue
    }

    /// Removes the queue from its vhost and the store, and tells consumers
    /// it is gone.
    async fn delete(&mut self) {
        self.q.mark_deleted();
        let mut dropped_exchanges = Vec::new();
        let mut registered = false;
        if let Some(vhost) = self.vhost.upgrade() {
            registered = vhost.queue(&self.q.name).is_some_and(|q| q.id == self.q.id);
            dropped_exchanges = vhost.forget_queue(&self.q);
        }
        // Not for a queue that lost a declare race (never registered).
        if let (true, Some(hook)) = (registered, self.on_delete.take()) {
            hook(&self.q);
        }
        for (id, link) in self.links.drain() {
            let _ = link.conn.send(ConnCmd::ConsumerCancelled {
                channel: link.channel,
                consumer: id,
                revoked: false,
            });
        }
        if let Some(st) = &self.storage {
            let mut gids = self.core.stored_gids();
            gids.append(&mut self.forget);
            if let Err(e) = st.msgs.drop_queue(self.q.id, gids).await {
                warn!("could not drop the deleted queue's messages from the store: {e}");
            }
            if let Err(e) = st
                .delete_queue(&self.q.vhost, &self.q.name, self.q.id)
                .await
            {
                error!(
                    "could not remove the deleted queue from the definitions store: {e}; it may reappear after a restart"
                );
            }
            for x in dropped_exchanges {
                let _ = st.delete_exchange(&self.q.vhost, &x).await;
            }
        }
    }

    /// Reads a paged-out body back. False if it cannot be read (logged).
    fn fill_body(&mut self, env: &mut Envelope) -> bool {
        if env.msg.is_some() {
            return true;
        }
        let loaded = self.storage.as_ref().and_then(|st| load(&st.msgs, env.gid));
        match loaded {
            Some(m) => {
                env.msg = Some(m);
                true
            }
            None => {
                error!(
                    gid = env.gid,
                    "a stored message of this queue could not be read back and is lost; check the data directory for damage"
                );
                self.forget.push(env.gid);
                false
            }
        }
    }

    fn dispatch(&mut self) {
        self.core.dispatch(&mut self.out);
        if self.out.is_empty() {
            return;
        }
        let mut batches: Vec<(ConsumerId, Vec<Envelope>)> = Vec::new();
        let out = std::mem::take(&mut self.out);
        let mut unreadable = Vec::new();
        for (cid, mut env) in out {
            if !self.fill_body(&mut env) {
                unreadable.push(env.id);
                continue;
            }
            if env.gid != 0 && !env.redelivered {
                self.delivered.push(env.gid);
            }
            if env.delivery_count > 0 {
                if let Some(m) = &env.msg {
                    env.msg = Some(Arc::new(deadletter::with_delivery_count(
                        m,
                        env.delivery_count,
                    )));
                }
            }
            match batches.iter_mut().find(|(c, _)| *c == cid) {
                Some((_, v)) => v.push(env),
                None => batches.push((cid, vec![env])),
            }
        }
        if !unreadable.is_empty() {
            // Gone from disk: settle them so they leave the queue.
            self.core.settle(&unreadable, Outcome::Ack);
        }
        for (cid, msgs) in batches {
            let Some(link) = self.links.get(&cid) else {
                let ids: Vec<_> = msgs.iter().map(|e| e.id).collect();
                self.core.settle(&ids, Outcome::Undeliverable);
                continue;
            };
            let ids: Vec<_> = msgs.iter().map(|e| e.id).collect();
            let cmd = ConnCmd::Deliver {
                channel: link.channel,
                consumer: cid,
                tag: link.tag.clone(),
                queue: self.q.clone(),
                msgs,
            };
            if link.conn.send(cmd).is_err() {
                // The connection is gone without telling us: take the
                // consumer off and put its messages back.
                self.links.remove(&cid);
                self.core.remove_consumer(cid);
                self.core.settle(&ids, Outcome::Undeliverable);
            }
        }
        // No-ack deliveries are settled as they go out.
        self.forget_no_ack_deliveries();
    }

    fn forget_no_ack_deliveries(&mut self) {
        self.forget.extend(self.core.take_no_ack_gids());
    }
}

/// basic.consume arguments for classic queues: x-priority (integer) and
/// x-consumer-timeout (ms, overriding the queue's).
pub(crate) fn consume_args(
    args: &amq_protocol::types::FieldTable,
    queue_timeout: Option<u64>,
) -> Result<(i32, Option<u64>), AmqpError> {
    use crate::broker::headers::value_int;
    let mut priority = 0;
    let mut timeout = queue_timeout;
    for (k, v) in args.inner() {
        match k.as_str() {
            "x-priority" => match value_int(v) {
                Some(p) => priority = p.clamp(i64::from(i32::MIN), i64::from(i32::MAX)) as i32,
                None => {
                    return Err(AmqpError::precondition(format!(
                        "invalid arg 'x-priority' for consumer: {{unacceptable_type,{}}}",
                        super::args::type_name(v)
                    )));
                }
            },
            "x-consumer-timeout" => match value_int(v) {
                Some(t) if t >= 0 => timeout = Some(t as u64),
                _ => {
                    return Err(AmqpError::precondition(format!(
                        "invalid arg 'x-consumer-timeout' for consumer: {}",
                        super::args::show(v)
                    )));
                }
            },
            _ => {}
        }
    }
    Ok((priority, timeout))
}

/// Reads one stored message back.
fn load(store: &crate::store::MessageStore, gid: u64) -> Option<Arc<Message>> {
    let parts = store.read(gid).ok()?;
    Message::from_parts(parts).map(Arc::new)
}
