//! Quorum queues: the deterministic queue core replicated by a Raft group.
//!
//! Every replica applies the same committed commands to its own
//! [`QueueCore`], with the proposer's clock, so all replicas agree on which
//! message is ready, which is out to which consumer, and which was acked.
//! Consumers and channels are named cluster-wide by (node, boot id,
//! connection, channel); each replica delivers to the consumers attached
//! to its own node, so no message crosses the network twice. Side effects
//! that must happen once (dead-lettering, expiry ticks, cleaning up after
//! a node that went away) are done by the leader only.
//!
//! The channel layer sees an ordinary queue: an actor behind the same
//! [`QueueCmd`] inbox turns each command into a Raft proposal (at the local
//! replica when it leads, forwarded to the leader otherwise).

use super::core::{
    ConsumeRefused, ConsumerId, ConsumerSpec, DeadReason, Envelope, Outcome, Owner, QueueCore,
    Settled,
};
use super::message::Message;
use super::{ConfirmTo, QueueCmd, QueueRef};
use crate::broker::{Broker, ConnCmd, ConnTx, VHost};
use crate::cluster::Cluster;
use crate::cluster::log::LogStore;
use crate::cluster::sm::{Applied, no_install};
use crate::cluster::types::{
    Cmd, GotMsg, MetaCmd, NodeId, NodeInfo, QOp, QuorumDef, RemoteOwner, Resp, TypeConfig, WireMsg,
};
use crate::cluster::types::{from_wire, outcome, to_wire, wire_outcome};
use crate::protocol::error::{AmqpError, code};
use amq_protocol::types::FieldTable;
use dashmap::DashMap;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{LogId, SnapshotMeta, StorageError, StoredMembership};
use std::collections::HashMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

fn now_ms() -> u64 {
    crate::cluster::net::now_ms()
}

/// A consumer attached on this node.
#[derive(Debug, Clone)]
struct Link {
    conn: ConnTx,
    channel: u16,
    tag: Arc<str>,
    /// The connection id (for channel-closed cleanup).
    conn_id: u64,
}

/// What the replica and the local actor share.
pub struct QCtx {
    me: NodeId,
    incarnation: u64,
    links: DashMap<u64, Link>,
    queue: OnceLock<Weak<QueueRef>>,
    leader: OnceLock<Arc<AtomicBool>>,
    /// This node's replica, when it has one.
    raft: OnceLock<crate::cluster::types::Raft>,
    vhost: Weak<VHost>,
    broker: Weak<Broker>,
    /// Replica nodes (deliveries to consumers elsewhere are forwarded by
    /// the leader).
    members: Mutex<Vec<NodeId>>,
    group: String,
    cluster: Weak<Cluster>,
    /// Parsed and raw arguments (to rebuild the core from a snapshot).
    args: super::args::QueueArgs,
    table: FieldTable,
    /// Ready bodies kept in memory per replica (the rest are read back
    /// from the Raft log when their turn comes).
    window: usize,
    /// The at-least-once dead-letter relay (see [`dlx_relay`]).
    dlx_relay: OnceLock<mpsc::UnboundedSender<Vec<(Envelope, DeadReason)>>>,
}

impl QCtx {
    /// Whether this replica leads its group now: read from openraft's
    /// metrics (the driver's flag lags by up to a tick, and a delivery to a
    /// consumer on a node without a replica must not fall in that gap).
    fn is_leader(&self) -> bool {
        if let Some(r) = self.raft.get() {
            let m = r.metrics();
            let m = m.borrow();
            return m.state == openraft::ServerState::Leader && m.current_leader == Some(self.me);
        }
        self.leader
            .get()
            .map(|l| l.load(Ordering::Relaxed))
            .unwrap_or(false)
    }
}

/// The replicated state.
#[derive(Debug)]
struct Machine {
    core: QueueCore,
    owners: HashMap<RemoteOwner, u64>,
    owner_keys: HashMap<u64, RemoteOwner>,
    next_owner: u64,
    consumers: HashMap<(NodeId, u64, u64), ConsumerId>,
    consumer_keys: HashMap<ConsumerId, (NodeId, u64, u64)>,
    next_consumer: u64,
    applied: Applied,
    /// Log index of the last snapshot (0 = none).
    snap_index: u64,
    /// Message bytes and messages enqueued since the last snapshot (this
    /// replica's bookkeeping, not replicated state): entries carry whole
    /// batches, so an entry count alone lets the log grow without bound.
    log_bytes: u64,
    log_msgs: u64,
    /// x-dead-letter-strategy = at-least-once (with x-overflow =
    /// reject-publish, as RabbitMQ requires): dead messages stay here until
    /// every queue the dead-letter exchange routes them to confirmed them.
    alo: bool,
    /// Those messages, by id.
    dlx: std::collections::BTreeMap<u64, (Envelope, DeadReason)>,
}

/// A dead-letter reason in snapshots.
fn reason_code(r: DeadReason) -> u8 {
    match r {
        DeadReason::Rejected => 0,
        DeadReason::Expired => 1,
        DeadReason::MaxLen => 2,
        DeadReason::DeliveryLimit => 3,
    }
}

fn reason_of(c: u8) -> DeadReason {
    match c {
        1 => DeadReason::Expired,
        2 => DeadReason::MaxLen,
        3 => DeadReason::DeliveryLimit,
        _ => DeadReason::Rejected,
    }
}

impl Machine {
    fn new(q: &super::args::QueueArgs, arguments: &FieldTable, window: usize) -> Machine {
        let mut core = QueueCore::new(window.max(1));
        core.set_max_priority(q.max_priority.unwrap_or(0));
        core.set_single_active(q.single_active_consumer);
        core.set_dedup(q.dedup);
        let eff = crate::broker::policy::merge(q, arguments, None);
        let mut limits = eff.limits;
        if limits.delivery_limit.is_none() {
            // RabbitMQ 4.x default for quorum queues.
            limits.delivery_limit = Some(20);
        }
        let alo = limits.overflow == super::args::Overflow::RejectPublish
            && arguments
                .inner()
                .get("x-dead-letter-strategy")
                .and_then(crate::broker::headers::value_str)
                .is_some_and(|v| v == "at-least-once");
        core.set_limits(limits);
        core.set_retry(super::args::effective_retry(q, arguments, |_| None));
        Machine {
            alo,
            dlx: Default::default(),
            core,
            owners: HashMap::new(),
            owner_keys: HashMap::new(),
            next_owner: 1,
            consumers: HashMap::new(),
            consumer_keys: HashMap::new(),
            next_consumer: 1,
            applied: Applied::default(),
            snap_index: 0,
            log_bytes: 0,
            log_msgs: 0,
        }
    }

    /// A snapshot was taken or installed at `index`.
    fn snapped(&mut self, index: u64) {
        self.snap_index = index;
        self.log_bytes = 0;
        self.log_msgs = 0;
    }

    /// Whether the log since the last snapshot is worth replacing by one:
    /// more entries than `min_entries` or more message bytes than
    /// SNAPSHOT_MIN_BYTES, and (so that a long queue is not copied over
    /// and over) more than twice what a snapshot would hold.
    fn snapshot_due(&self, min_entries: u64) -> bool {
        let applied = self.applied.last.map_or(0, |l| l.index);
        let entries =
            applied.saturating_sub(self.snap_index) > min_entries.max(1).max(2 * self.live());
        let c = self.core.counts();
        let held = c.ready_bytes + c.unacked * (self.log_bytes / self.log_msgs.max(1));
        entries || self.log_bytes > SNAPSHOT_MIN_BYTES.max(2 * held)
    }

    /// Messages held (ready, unacked, delayed): what a snapshot carries.
    fn live(&self) -> u64 {
        let c = self.core.counts();
        c.ready + c.unacked + self.core.delayed_len() as u64
    }

    fn to_snap(&self) -> QSnap {
        let img = self.core.image();
        // A message whose body is in this replica's log is referenced, not
        // copied: the log keeps that entry (see `retain`).
        let env = |e: &Envelope| SnapEnv {
            id: e.id,
            gid: e.gid,
            size: e.size,
            delivery_count: e.delivery_count,
            redelivered: e.redelivered,
            expires: e.expires,
            priority: e.priority,
            msg: if e.gid != 0 {
                None
            } else {
                e.msg.as_deref().map(to_wire)
            },
        };
        let retain = img
            .ready
            .iter()
            .chain(img.unacked.iter().map(|(e, ..)| e))
            .chain(img.delayed.iter().map(|(e, _)| e))
            .chain(self.dlx.values().map(|(e, _)| e))
            .filter(|e| e.gid != 0)
            .map(|e| gid_index(e.gid))
            .min();
        QSnap {
            retain,
            dlx: self
                .dlx
                .values()
                .map(|(e, r)| (env(e), reason_code(*r)))
                .collect(),
            now: img.now,
            next_id: img.next_id,
            ready: img.ready.iter().map(env).collect(),
            unacked: img
                .unacked
                .iter()
                .map(|(e, o, c, d)| (env(e), o.conn, o.channel, *c, *d))
                .collect(),
            delayed: img.delayed.iter().map(|(e, due)| (env(e), *due)).collect(),
            consumers: img
                .consumers
                .iter()
                .map(|(s, unacked, flow, rr)| SnapConsumer {
                    id: s.id,
                    conn: s.owner.conn,
                    channel: s.owner.channel,
                    prefetch: s.prefetch,
                    no_ack: s.no_ack,
                    exclusive: s.exclusive,
                    flow_window: s.flow_window,
                    priority: s.priority,
                    timeout: s.timeout,
                    unacked: *unacked,
                    flow: *flow,
                    rr: *rr as u64,
                })
                .collect(),
            dedup: img
                .dedup
                .into_iter()
                .map(|d| (d.seq, d.id, d.expires))
                .collect(),
            owners: self.owners.iter().map(|(o, k)| (*o, *k)).collect(),
            consumer_map: self.consumers.iter().map(|(k, v)| (*k, *v)).collect(),
            next_owner: self.next_owner,
            next_consumer: self.next_consumer,
        }
    }

    fn restore(&mut self, s: QSnap) {
        let env = |e: SnapEnv| {
            let msg = e.msg.and_then(from_wire).map(Arc::new);
            Envelope {
                id: e.id,
                gid: if msg.is_some() { 0 } else { e.gid },
                size: msg.as_ref().map_or(e.size, |m| m.body.len() as u32),
                msg,
                delivery_count: e.delivery_count,
                redelivered: e.redelivered,
                expires: e.expires,
                priority: e.priority,
            }
        };
        let img = super::core::CoreImage {
            now: s.now,
            next_id: s.next_id,
            ready: s.ready.into_iter().map(env).collect(),
            unacked: s
                .unacked
                .into_iter()
                .map(|(e, conn, channel, c, d)| (env(e), Owner { conn, channel }, c, d))
                .collect(),
            delayed: s
                .delayed
                .into_iter()
                .map(|(e, due)| (env(e), due))
                .collect(),
            consumers: s
                .consumers
                .into_iter()
                .map(|c| {
                    (
                        ConsumerSpec {
                            id: c.id,
                            owner: Owner {
                                conn: c.conn,
                                channel: c.channel,
                            },
                            prefetch: c.prefetch,
                            no_ack: c.no_ack,
                            exclusive: c.exclusive,
                            shared: None,
                            flow_window: c.flow_window,
                            priority: c.priority,
                            timeout: c.timeout,
                        },
                        c.unacked,
                        c.flow,
                        c.rr as usize,
                    )
                })
                .collect(),
            dedup: s
                .dedup
                .into_iter()
                .map(|(seq, id, expires)| super::core::DedupEntry { seq, id, expires })
                .collect(),
        };
        self.core.restore_image(img);
        self.dlx = s
            .dlx
            .into_iter()
            .map(|(e, r)| {
                let e = env(e);
                (e.id, (e, reason_of(r)))
            })
            .collect();
        self.owners = s.owners.iter().copied().collect();
        self.owner_keys = s.owners.iter().map(|(o, k)| (*k, *o)).collect();
        self.consumers = s.consumer_map.iter().copied().collect();
        self.consumer_keys = s.consumer_map.iter().map(|(k, v)| (*v, *k)).collect();
        self.next_owner = s.next_owner;
        self.next_consumer = s.next_consumer;
    }
}

/// A message in a snapshot.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapEnv {
    id: u64,
    /// Where the body is in the log ([`gid`]), 0 when `msg` carries it.
    gid: u64,
    size: u32,
    delivery_count: u16,
    redelivered: bool,
    expires: u64,
    priority: u8,
    msg: Option<WireMsg>,
}

/// A consumer in a snapshot.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SnapConsumer {
    id: u64,
    conn: u64,
    channel: u16,
    prefetch: u32,
    no_ack: bool,
    exclusive: bool,
    flow_window: u32,
    priority: i32,
    timeout: Option<u64>,
    unacked: u32,
    flow: u32,
    rr: u64,
}

/// A quorum queue replica's state as a snapshot stores it.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct QSnap {
    /// Lowest log index holding a body the snapshot refers to (None: the
    /// snapshot carries every body it needs).
    retain: Option<u64>,
    /// Dead-lettered messages waiting for their targets' confirms.
    dlx: Vec<(SnapEnv, u8)>,
    now: u64,
    next_id: u64,
    ready: Vec<SnapEnv>,
    unacked: Vec<(SnapEnv, u64, u16, Option<u64>, u64)>,
    delayed: Vec<(SnapEnv, u64)>,
    consumers: Vec<SnapConsumer>,
    dedup: Vec<(u64, String, u64)>,
    owners: Vec<(RemoteOwner, u64)>,
    consumer_map: Vec<((NodeId, u64, u64), u64)>,
    next_owner: u64,
    next_consumer: u64,
}

/// Where a replica keeps its latest snapshot: one file, replaced
/// atomically (write, fsync, rename).
#[derive(Debug)]
struct SnapFile {
    path: std::path::PathBuf,
}

impl SnapFile {
    fn new(data_dir: &std::path::Path, group: &str) -> SnapFile {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in group.as_bytes() {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        SnapFile {
            path: data_dir
                .join("raft-snapshots")
                .join(format!("{h:016x}.snap")),
        }
    }

    fn write(&self, meta: &SnapshotMeta<NodeId, NodeInfo>, data: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        if let Some(d) = self.path.parent() {
            std::fs::create_dir_all(d)?;
        }
        let bytes = postcard::to_stdvec(&(meta, serde_bytes::Bytes::new(data)))
            .map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes)?;
        f.sync_data()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(d) = self.path.parent() {
            if let Ok(dir) = std::fs::File::open(d) {
                let _ = dir.sync_all();
            }
        }
        Ok(())
    }

    fn read(&self) -> Option<(SnapshotMeta<NodeId, NodeInfo>, Vec<u8>)> {
        let bytes = std::fs::read(&self.path).ok()?;
        match postcard::from_bytes::<(SnapshotMeta<NodeId, NodeInfo>, serde_bytes::ByteBuf)>(&bytes)
        {
            Ok((m, d)) => Some((m, d.into_vec())),
            Err(e) => {
                warn!(file = %self.path.display(), "unreadable quorum queue snapshot ({e}); the replica will catch up from the leader");
                None
            }
        }
    }

    fn remove(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn snap_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageError::from_io_error(
        openraft::ErrorSubject::Snapshot(None),
        openraft::ErrorVerb::Write,
        std::io::Error::other(e.to_string()),
    )
}

/// Builds a snapshot of a replica.
pub struct QSnapBuilder {
    m: Arc<Mutex<Machine>>,
    file: Arc<SnapFile>,
    log: LogStore,
}

impl openraft::RaftSnapshotBuilder<TypeConfig> for QSnapBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let (meta, data, retain) = {
            let mut m = self.m.lock().map_err(snap_err)?;
            let snap = m.to_snap();
            let data = postcard::to_stdvec(&snap).map_err(snap_err)?;
            let last = m.applied.last;
            m.snapped(last.map_or(0, |l| l.index));
            let meta = SnapshotMeta {
                last_log_id: last,
                last_membership: m.applied.membership.clone(),
                snapshot_id: format!("{}-{}", last.map_or(0, |l| l.index), now_ms()),
            };
            let retain = snap
                .retain
                .unwrap_or_else(|| last.map_or(0, |l| l.index).saturating_add(1));
            (meta, data, retain)
        };
        let file = self.file.clone();
        let (meta2, data2) = (meta.clone(), data.clone());
        tokio::task::spawn_blocking(move || file.write(&meta2, &data2))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        // Only now (the snapshot is on disk) may the log let go of the
        // entries before the oldest body it refers to.
        self.log.set_retain(retain);
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl Machine {
    fn owner(&mut self, o: RemoteOwner) -> Owner {
        let key = match self.owners.get(&o) {
            Some(k) => *k,
            None => {
                let k = self.next_owner;
                self.next_owner += 1;
                self.owners.insert(o, k);
                self.owner_keys.insert(k, o);
                k
            }
        };
        Owner {
            conn: key,
            channel: o.channel,
        }
    }

    fn close_owner(&mut self, o: RemoteOwner, gone: &mut Vec<(NodeId, u64, u64)>) -> Settled {
        let Some(key) = self.owners.remove(&o) else {
            return Settled::default();
        };
        self.owner_keys.remove(&key);
        let (removed, settled) = self.core.channel_closed(Owner {
            conn: key,
            channel: o.channel,
        });
        for cid in removed {
            if let Some(k) = self.consumer_keys.remove(&cid) {
                self.consumers.remove(&k);
                gone.push(k);
            }
        }
        settled
    }
}

/// The Raft state machine of one quorum queue replica.
pub struct QuorumSm {
    m: Arc<Mutex<Machine>>,
    ctx: Arc<QCtx>,
    snap: Arc<SnapFile>,
    /// This replica's log (message bodies are read back from it).
    log: LogStore,
}

/// A message's place in the Raft log: the index of the entry that carried
/// it and its position in that entry's batch.
fn gid_of(index: u64, pos: usize) -> u64 {
    (index << 20) | (pos as u64 & 0xf_ffff)
}

fn gid_index(gid: u64) -> u64 {
    gid >> 20
}

/// Reads bodies back from the log entries that carried them (a body is
/// dropped from memory while its message waits behind the in-memory
/// window); remembers the last entry read, since neighbours are read
/// together.
struct Bodies<'a> {
    log: &'a LogStore,
    cached: Option<(u64, Vec<WireMsg>)>,
}

impl<'a> Bodies<'a> {
    fn new(log: &'a LogStore) -> Bodies<'a> {
        Bodies { log, cached: None }
    }

    fn get(&mut self, gid: u64) -> Option<Arc<Message>> {
        let (index, pos) = (gid_index(gid), (gid & 0xf_ffff) as usize);
        if self.cached.as_ref().map(|c| c.0) != Some(index) {
            let e = self.log.entry_at(index)?;
            match e.payload {
                openraft::EntryPayload::Normal(Cmd::Queue {
                    op: QOp::Enqueue(msgs),
                    ..
                }) => self.cached = Some((index, msgs)),
                _ => return None,
            }
        }
        let w = self.cached.as_ref()?.1.get(pos)?.clone();
        from_wire(w).map(Arc::new)
    }

    /// Puts the body back into a paged-out envelope; false if it cannot be
    /// read (logged: the log was damaged).
    fn fill(&mut self, group: &str, env: &mut Envelope) -> bool {
        if env.msg.is_some() {
            return true;
        }
        env.msg = if env.gid != 0 {
            self.get(env.gid)
        } else {
            None
        };
        if env.msg.is_none() {
            error!(
                group,
                gid = env.gid,
                "a quorum queue message body could not be read back from the Raft log; check the data directory for damage"
            );
        }
        env.msg.is_some()
    }
}

/// Effects gathered while applying, carried out after the lock is gone.
#[derive(Default)]
struct Effects {
    deliveries: Vec<(ConsumerId, Envelope, (NodeId, u64, u64))>,
    dead: Vec<(Envelope, DeadReason)>,
    cancelled: Vec<(NodeId, u64, u64)>,
    /// Newly held for at-least-once dead-lettering.
    dlx_new: Vec<(Envelope, DeadReason)>,
}

impl QuorumSm {
    fn apply_one(
        &self,
        m: &mut Machine,
        index: u64,
        now: u64,
        op: QOp,
        fx: &mut Effects,
        bodies: &mut Bodies<'_>,
    ) -> Resp {
        m.core.set_time(now);
        let resp = match op {
            QOp::Enqueue(msgs) => {
                let mut rejected = Vec::new();
                m.log_msgs += msgs.len() as u64;
                m.log_bytes += msgs.iter().map(|w| w.body.len() as u64).sum::<u64>();
                for (i, w) in msgs.into_iter().enumerate() {
                    let Some(msg) = from_wire(w) else {
                        rejected.push(i as u32);
                        continue;
                    };
                    let (adm, mut gone) = m.core.publish(Arc::new(msg), gid_of(index, i), now);
                    if adm == super::core::Admission::Rejected {
                        rejected.push(i as u32);
                    }
                    fx.dead.append(&mut gone);
                }
                Resp::Enqueued { rejected }
            }
            QOp::Consume {
                owner,
                local_id,
                tag: _,
                prefetch,
                no_ack,
                exclusive,
                priority,
                timeout,
            } => {
                let key = (owner.node, owner.incarnation, local_id);
                if m.consumers.contains_key(&key) {
                    return Resp::Ok;
                }
                let o = m.owner(owner);
                let id = m.next_consumer;
                let spec = ConsumerSpec {
                    id,
                    owner: o,
                    prefetch,
                    no_ack,
                    exclusive,
                    shared: None,
                    flow_window: u32::MAX,
                    priority,
                    timeout,
                };
                match m.core.add_consumer(spec) {
                    Ok(()) => {
                        m.next_consumer += 1;
                        m.consumers.insert(key, id);
                        m.consumer_keys.insert(id, key);
                        Resp::Ok
                    }
                    Err(ConsumeRefused::ExclusiveInUse) => {
                        Resp::Refused(code::ACCESS_REFUSED, "in exclusive use".into())
                    }
                }
            }
            QOp::Cancel {
                node,
                incarnation,
                local_id,
            } => {
                if let Some(id) = m.consumers.remove(&(node, incarnation, local_id)) {
                    m.consumer_keys.remove(&id);
                    m.core.remove_consumer(id);
                }
                Resp::Ok
            }
            QOp::Settle { ids, outcome: o } => {
                let s = m.core.settle(&ids, outcome(o));
                absorb(s, fx);
                Resp::Ok
            }
            QOp::Credit {
                node,
                incarnation,
                local_id,
                n,
            } => {
                if let Some(id) = m.consumers.get(&(node, incarnation, local_id)) {
                    m.core.credit(*id, n);
                }
                Resp::Ok
            }
            QOp::Get { owner, no_ack } => {
                let o = m.owner(owner);
                let got = m.core.get(o, no_ack).map(|(mut env, remaining)| {
                    bodies.fill(&self.ctx.group, &mut env);
                    stamp(&mut env);
                    (env, remaining)
                });
                match got {
                    Some((env, remaining)) => match env.msg.as_ref() {
                        Some(msg) => Resp::Got(Some(GotMsg {
                            id: env.id,
                            redelivered: env.redelivered,
                            delivery_count: env.delivery_count,
                            msg: to_wire(msg),
                            remaining,
                        })),
                        None => Resp::Got(None),
                    },
                    None => Resp::Got(None),
                }
            }
            QOp::ChannelClosed(owner) => {
                let s = m.close_owner(owner, &mut fx.cancelled);
                fx.cancelled.clear(); // the channel knows
                absorb(s, fx);
                Resp::Ok
            }
            QOp::NodeDown { node, alive } => {
                let stale: Vec<RemoteOwner> = m
                    .owners
                    .keys()
                    .filter(|o| o.node == node && o.incarnation != alive)
                    .copied()
                    .collect();
                for o in stale {
                    let s = m.close_owner(o, &mut fx.cancelled);
                    absorb(s, fx);
                }
                Resp::Ok
            }
            QOp::Purge => Resp::Count(m.core.purge().len() as u64),
            QOp::DlxSettle(ids) => {
                for id in ids {
                    m.dlx.remove(&id);
                }
                Resp::Ok
            }
            QOp::Tick => {
                let expired = m.core.expire(now);
                fx.dead.extend(expired);
                for cid in m.core.timed_out(now) {
                    let s = m.core.cancel_and_requeue(cid);
                    if let Some(k) = m.consumer_keys.remove(&cid) {
                        m.consumers.remove(&k);
                        fx.cancelled.push(k);
                    }
                    absorb(s, fx);
                }
                Resp::Ok
            }
        };
        if m.alo && !fx.dead.is_empty() {
            for (env, reason) in fx.dead.drain(..) {
                m.dlx.insert(env.id, (env.clone(), reason));
                fx.dlx_new.push((env, reason));
            }
        }
        let mut out = Vec::new();
        m.core.dispatch(&mut out);
        for (cid, env) in out {
            if let Some(k) = m.consumer_keys.get(&cid) {
                fx.deliveries.push((cid, env, *k));
            }
        }
        resp
    }

    async fn effects(&self, fx: Effects) {
        let ctx = &self.ctx;
        let queue = ctx.queue.get().and_then(Weak::upgrade);
        // Deliveries to consumers on this node (grouped per consumer).
        if let Some(q) = &queue {
            let mut batch: Vec<(u64, Vec<Envelope>)> = Vec::new();
            let mut remote: Vec<((NodeId, u64, u64), Vec<GotMsg>)> = Vec::new();
            let leader = ctx.is_leader();
            let mut bodies = Bodies::new(&self.log);
            for (_, mut env, (node, inc, local)) in fx.deliveries {
                bodies.fill(&ctx.group, &mut env);
                stamp(&mut env);
                if node != ctx.me || inc != ctx.incarnation {
                    // A consumer on a node without a replica: the leader
                    // forwards.
                    if leader
                        && node != ctx.me
                        && !ctx
                            .members
                            .lock()
                            .map(|m| m.contains(&node))
                            .unwrap_or(true)
                    {
                        if let Some(msg) = env.msg.as_ref() {
                            let g = GotMsg {
                                id: env.id,
                                redelivered: env.redelivered,
                                delivery_count: env.delivery_count,
                                msg: to_wire(msg),
                                remaining: 0,
                            };
                            match remote.last_mut() {
                                Some((k, v)) if *k == (node, inc, local) => v.push(g),
                                _ => remote.push(((node, inc, local), vec![g])),
                            }
                        }
                    }
                    continue;
                }
                match batch.last_mut() {
                    Some((l, v)) if *l == local => v.push(env),
                    _ => batch.push((local, vec![env])),
                }
            }
            if let Some(c) = ctx.cluster.upgrade() {
                for ((node, inc, local), msgs) in remote {
                    if let Some(p) = c.peer_by_id(node) {
                        let _ = p.send_req(crate::cluster::net::Req::Deliver {
                            group: ctx.group.clone(),
                            incarnation: inc,
                            local_id: local,
                            msgs,
                        });
                    }
                }
            }
            for (local, msgs) in batch {
                if let Some(link) = ctx.links.get(&local) {
                    let _ = link.conn.send(ConnCmd::Deliver {
                        channel: link.channel,
                        consumer: local,
                        tag: link.tag.clone(),
                        queue: q.clone(),
                        msgs,
                    });
                }
            }
        }
        for (node, inc, local) in fx.cancelled {
            if node != ctx.me || inc != ctx.incarnation {
                continue;
            }
            if let Some((_, link)) = ctx.links.remove(&local) {
                let _ = link.conn.send(ConnCmd::ConsumerCancelled {
                    channel: link.channel,
                    consumer: local,
                    revoked: true,
                });
            }
        }
        if !fx.dlx_new.is_empty() && ctx.is_leader() {
            if let Some(tx) = ctx.dlx_relay.get() {
                let _ = tx.send(fx.dlx_new);
            }
        }
        if !fx.dead.is_empty() && ctx.is_leader() {
            if let Some(q) = &queue {
                let mut dead = fx.dead;
                let mut bodies = Bodies::new(&self.log);
                for (env, _) in dead.iter_mut() {
                    bodies.fill(&ctx.group, env);
                }
                dead_letter(ctx, q, dead).await;
            }
        }
    }
}

/// x-delivery-count on redeliveries, as RabbitMQ's quorum queues set it.
fn stamp(env: &mut Envelope) {
    if env.delivery_count > 0 {
        if let Some(m) = &env.msg {
            env.msg = Some(Arc::new(super::deadletter::with_delivery_count(
                m,
                env.delivery_count,
            )));
        }
    }
}

fn absorb(s: Settled, fx: &mut Effects) {
    fx.dead.extend(s.dead);
    fx.dead
        .extend(s.discarded.into_iter().map(|e| (e, DeadReason::Rejected)));
}

/// Sends dead messages to the queue's dead-letter exchange (leader only:
/// at most once, as RabbitMQ's default for quorum queues).
async fn dead_letter(ctx: &QCtx, q: &Arc<QueueRef>, dead: Vec<(Envelope, DeadReason)>) {
    for (env, reason) in dead {
        // At most once: whatever happens to the copy, the message is gone.
        let _ = dead_letter_one(ctx, q, env, reason, |_| None).await;
    }
}

/// What became of one dead-lettering.
enum DlOutcome {
    /// No dead-letter exchange is set (or the message has no body): the
    /// message is simply dropped.
    Dropped,
    /// The dead-letter exchange is missing or routes it nowhere.
    Unroutable,
    /// Sent to this many queues.
    Sent(u32),
}

/// Routes one dead message through the queue's dead-letter exchange and
/// publishes the copy to every target, each with the confirm target
/// `confirm(n_targets)` gives.
async fn dead_letter_one(
    ctx: &QCtx,
    q: &Arc<QueueRef>,
    env: Envelope,
    reason: DeadReason,
    confirm: impl Fn(u32) -> Option<ConfirmTo>,
) -> DlOutcome {
    let Some(vhost) = ctx.vhost.upgrade() else {
        return DlOutcome::Dropped;
    };
    let eff = crate::broker::policy::effective(&vhost, q);
    let Some(dlx) = eff.dead_letter_exchange.clone() else {
        return DlOutcome::Dropped;
    };
    let Some(ex) = vhost.exchange(&dlx) else {
        debug!(dlx, "dead-letter exchange does not exist");
        return DlOutcome::Unroutable;
    };
    let Some(msg) = env.msg else {
        return DlOutcome::Dropped;
    };
    let out = super::deadletter::dead_lettered(
        &msg,
        &q.name,
        reason,
        now_ms() / 1000,
        &dlx,
        eff.dead_letter_routing_key.as_deref(),
    );
    let mut targets = Vec::new();
    vhost.route(
        &ex,
        out.routing_key_str(),
        out.properties.headers().as_ref(),
        &mut targets,
    );
    if reason != DeadReason::Rejected {
        targets.retain(|t| !super::deadletter::is_cycle(&out, &t.name));
    }
    if targets.is_empty() {
        return DlOutcome::Unroutable;
    }
    let out = Arc::new(out);
    let mut gid = 0;
    let broker = ctx.broker.upgrade();
    if out.is_persistent() {
        if let Some((b, st)) = broker
            .as_ref()
            .and_then(|b| b.storage.as_ref().map(|s| (b, s)))
        {
            let stored: Vec<u64> = targets
                .iter()
                .filter(|t| t.uses_message_store())
                .map(|t| t.id)
                .collect();
            if !stored.is_empty() {
                gid = b.next_gid();
                if let Err(e) = st.msgs.append(gid, stored, out.parts(), None).await {
                    warn!("could not persist a dead-lettered message: {e}");
                    gid = 0;
                }
            }
        }
    }
    let n = targets.len() as u32;
    for t in targets {
        let g = if t.uses_message_store() { gid } else { 0 };
        let cmd = QueueCmd::Publish {
            msgs: vec![(out.clone(), g)],
            confirm: confirm(n),
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = t.tx.try_send(cmd) {
            let t = t.clone();
            tokio::spawn(async move {
                let _ = t.tx.send(cmd).await;
            });
        }
    }
    DlOutcome::Sent(n)
}

/// At-least-once dead-lettering (x-dead-letter-strategy = at-least-once),
/// on whichever replica leads: republishes the held dead messages through
/// the dead-letter exchange with publisher confirms, and once every target
/// queue confirmed one, proposes `DlxSettle` so it leaves the queue on all
/// replicas. Unroutable or nacked ones are tried again every second; a new
/// leader sends everything still held (a target may then get a copy twice:
/// at least once).
async fn dlx_relay(
    ctx: Weak<QCtx>,
    log: LogStore,
    machine: Arc<Mutex<Machine>>,
    mut rx: mpsc::UnboundedReceiver<Vec<(Envelope, DeadReason)>>,
) {
    let (confirm_tx, mut confirms) = mpsc::unbounded_channel::<ConnCmd>();
    let mut next_seq: u64 = 1;
    // seq -> (message id, confirms still missing)
    let mut inflight: HashMap<u64, (u64, u32)> = HashMap::new();
    let mut sent: std::collections::HashSet<u64> = Default::default();
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut batch: Vec<(Envelope, DeadReason)> = Vec::new();
        let mut settled: Vec<u64> = Vec::new();
        tokio::select! {
            got = rx.recv() => match got {
                Some(b) => batch = b,
                None => return,
            },
            Some(cmd) = confirms.recv() => {
                if let ConnCmd::Confirm { seqs, nack, .. } = cmd {
                    for seq in seqs {
                        let Some((id, missing)) = inflight.get_mut(&seq) else { continue };
                        let id = *id;
                        if nack {
                            inflight.remove(&seq);
                            sent.remove(&id);
                        } else {
                            *missing = missing.saturating_sub(1);
                            if *missing == 0 {
                                inflight.remove(&seq);
                                sent.remove(&id);
                                settled.push(id);
                            }
                        }
                    }
                }
            }
            _ = tick.tick() => {
                let Some(c) = ctx.upgrade() else { return };
                if !c.is_leader() {
                    inflight.clear();
                    sent.clear();
                    continue;
                }
                if let Ok(m) = machine.lock() {
                    batch = m
                        .dlx
                        .values()
                        .filter(|(e, _)| !sent.contains(&e.id))
                        .cloned()
                        .collect();
                }
            }
        }
        let Some(c) = ctx.upgrade() else { return };
        if !batch.is_empty() && c.is_leader() {
            let q = c.queue.get().and_then(Weak::upgrade);
            let mut bodies = Bodies::new(&log);
            for (mut env, reason) in batch {
                let Some(q) = &q else { break };
                if sent.contains(&env.id) || !bodies.fill(&c.group, &mut env) {
                    continue;
                }
                let id = env.id;
                let seq = next_seq;
                let conn = confirm_tx.clone();
                match dead_letter_one(&c, q, env, reason, |_| {
                    Some(ConfirmTo {
                        conn: conn.clone(),
                        channel: 1,
                        seqs: vec![seq],
                    })
                })
                .await
                {
                    DlOutcome::Sent(n) => {
                        next_seq += 1;
                        inflight.insert(seq, (id, n));
                        sent.insert(id);
                    }
                    // Nothing to wait for: it just leaves.
                    DlOutcome::Dropped => settled.push(id),
                    // Kept; tried again at the next tick.
                    DlOutcome::Unroutable => {}
                }
            }
        }
        if !settled.is_empty() {
            let members = c.members.lock().map(|m| m.clone()).unwrap_or_default();
            if let Some(cl) = c.cluster.upgrade() {
                let cmd = Cmd::Queue {
                    now: now_ms(),
                    op: QOp::DlxSettle(settled),
                };
                if let Err(e) = cl.start_propose(&c.group, cmd, &members).await {
                    debug!(group = %c.group, "dead-letter settlement not proposed ({e}); sent again later");
                }
            }
        }
    }
}

impl RaftStateMachine<TypeConfig> for QuorumSm {
    type SnapshotBuilder = QSnapBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>>
    {
        let m = self.m.lock().map_err(|_| no_install())?;
        Ok((m.applied.last, m.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Resp>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut fx = Effects::default();
        {
            let mut m = self.m.lock().map_err(|_| no_install())?;
            let mut bodies = Bodies::new(&self.log);
            for e in entries {
                let index = e.log_id.index;
                let resp = match m.applied.take(e) {
                    Some(Cmd::Queue { now, op }) => {
                        self.apply_one(&mut m, index, now, op, &mut fx, &mut bodies)
                    }
                    _ => Resp::Ok,
                };
                out.push(resp);
            }
            // Bodies beyond the in-memory window wait in the log.
            let ready = m.core.ready_mut();
            ready.page_out(|gid| gid != 0);
            let lost = ready.page_in(|gid| bodies.get(gid));
            for e in lost {
                error!(
                    group = %self.ctx.group,
                    gid = e.gid,
                    "a quorum queue message body could not be read back from the Raft log and is dropped; check the data directory for damage"
                );
            }
        }
        self.effects(fx).await;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> QSnapBuilder {
        QSnapBuilder {
            m: self.m.clone(),
            file: self.snap.clone(),
            log: self.log.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let snap: QSnap = postcard::from_bytes(&data).map_err(snap_err)?;
        {
            let mut m = self.m.lock().map_err(snap_err)?;
            let mut fresh = Machine::new(&self.ctx.args, &self.ctx.table, self.ctx.window);
            fresh.restore(snap);
            fresh.applied = Applied {
                last: meta.last_log_id,
                membership: meta.last_membership.clone(),
            };
            fresh.snap_index = meta.last_log_id.map_or(0, |l| l.index);
            *m = fresh;
        }
        info!(
            group = %self.ctx.group,
            index = meta.last_log_id.map_or(0, |l| l.index),
            "installed a quorum queue snapshot from the leader (this replica was too far behind to replay the log)"
        );
        let file = self.snap.clone();
        let meta2 = meta.clone();
        tokio::task::spawn_blocking(move || file.write(&meta2, &data))
            .await
            .map_err(snap_err)?
            .map_err(snap_err)?;
        // The leader's snapshot carries every body (see get_current_snapshot).
        self.log
            .set_retain(meta.last_log_id.map_or(0, |l| l.index).saturating_add(1));
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let file = self.snap.clone();
        let got = tokio::task::spawn_blocking(move || file.read())
            .await
            .map_err(snap_err)?;
        let Some((meta, data)) = got else {
            return Ok(None);
        };
        // Sent to a replica that lacks the log before it: put the bodies
        // the snapshot only refers to into it.
        let mut snap: QSnap = postcard::from_bytes(&data).map_err(snap_err)?;
        if snap.retain.is_some() {
            let mut bodies = Bodies::new(&self.log);
            let envs = snap
                .ready
                .iter_mut()
                .chain(snap.unacked.iter_mut().map(|(e, ..)| e))
                .chain(snap.delayed.iter_mut().map(|(e, _)| e))
                .chain(snap.dlx.iter_mut().map(|(e, _)| e));
            for e in envs {
                if e.msg.is_none() && e.gid != 0 {
                    match bodies.get(e.gid) {
                        Some(m) => {
                            e.msg = Some(to_wire(&m));
                            e.gid = 0;
                        }
                        None => {
                            return Err(snap_err(format!(
                                "the body of message {} is missing from the Raft log",
                                e.id
                            )));
                        }
                    }
                }
            }
            snap.retain = None;
        }
        let data = postcard::to_stdvec(&snap).map_err(snap_err)?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

/// RabbitMQ's declare rules for quorum queues.
pub fn check_declare(
    name: &str,
    vhost: &str,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
) -> Result<(), AmqpError> {
    let bad = |what: &str| {
        Err(AmqpError::precondition(format!(
            "invalid property '{what}' for queue '{name}' in vhost '{vhost}'"
        )))
    };
    if !durable {
        return bad("non-durable");
    }
    if exclusive {
        return bad("exclusive-owner");
    }
    if auto_delete {
        return bad("auto-delete");
    }
    Ok(())
}

/// queue.declare of a quorum queue: replicated through the metadata group,
/// then waited for until this node has it.
pub async fn declare(
    broker: &Arc<Broker>,
    vhost: &Arc<VHost>,
    name: &str,
    arguments: &FieldTable,
    args: &super::args::QueueArgs,
) -> Result<Arc<QueueRef>, AmqpError> {
    let Some(cluster) = broker.cluster.get().cloned() else {
        return Err(AmqpError::new(
            code::INTERNAL_ERROR,
            "quorum queues are not available: the cluster runtime did not start".to_string(),
        ));
    };
    let live: Vec<NodeId> = cluster
        .members()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| cluster.alive(*id))
        .collect();
    let size = args.quorum_initial_group_size.unwrap_or(3).max(1) as usize;
    let id = broker.next_id();
    // Leader placement: spread by queue id over the live nodes.
    let members = crate::cluster::pick_members(&live, size, id);
    let wire_args = serde_json::to_vec(arguments)
        .map_err(|e| AmqpError::precondition(format!("unencodable queue arguments: {e}")))?;
    let def = QuorumDef {
        id,
        vhost: vhost.name.clone(),
        name: name.to_string(),
        arguments: wire_args,
        members,
    };
    let meta_members: Vec<NodeId> = cluster.members().into_iter().map(|(id, _)| id).collect();
    let r = cluster
        .propose(
            crate::cluster::types::META_GROUP,
            Cmd::Meta(MetaCmd::DeclareQuorum(def)),
            &meta_members,
        )
        .await
        .map_err(|e| {
            AmqpError::new(
                code::INTERNAL_ERROR,
                format!("cannot declare quorum queue '{name}': {e}"),
            )
        })?;
    if let Resp::Refused(c, text) = r {
        return Err(AmqpError::new(c, text));
    }
    // The definition is applied on this node shortly (at once when this
    // node leads the metadata group).
    for _ in 0..500 {
        if let Some(q) = vhost.queue(name) {
            return Ok(q);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Err(AmqpError::new(
        code::INTERNAL_ERROR,
        format!("quorum queue '{name}' was declared but has not reached this node yet; retry"),
    ))
}

/// Deletes a quorum queue everywhere.
pub async fn delete(broker: &Arc<Broker>, q: &QueueRef) -> Result<(), String> {
    let Some(cluster) = broker.cluster.get().cloned() else {
        return Err("no cluster runtime".into());
    };
    let meta_members: Vec<NodeId> = cluster.members().into_iter().map(|(id, _)| id).collect();
    cluster
        .propose(
            crate::cluster::types::META_GROUP,
            Cmd::Meta(MetaCmd::DeleteQuorum {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
            }),
            &meta_members,
        )
        .await
        .map(|_| ())
}

fn parse_args(def: &QuorumDef) -> (FieldTable, super::args::QueueArgs) {
    let table: FieldTable = serde_json::from_slice(&def.arguments).unwrap_or_default();
    let args = super::args::QueueArgs::parse(&table, &def.name, &def.vhost).unwrap_or_else(|e| {
        warn!(queue = %def.name, vhost = %def.vhost, "stored quorum queue arguments no longer valid ({}); using defaults", e.text);
        super::args::QueueArgs {
            queue_type: "quorum".into(),
            ..Default::default()
        }
    });
    (table, args)
}

/// Creates the queue on this node: a replica when this node is a member,
/// a forwarding handle otherwise.
pub async fn materialize(cluster: &Arc<Cluster>, def: &QuorumDef) {
    let Some(broker) = cluster.broker.upgrade() else {
        return;
    };
    let vhost = broker.vhost_or_create(&def.vhost);
    if let Some(q) = vhost.queue(&def.name) {
        if q.id == def.id {
            return;
        }
    }
    let (table, args) = parse_args(def);
    let ctx = Arc::new(QCtx {
        me: cluster.me.id,
        incarnation: cluster.me.incarnation,
        links: DashMap::new(),
        queue: OnceLock::new(),
        leader: OnceLock::new(),
        raft: OnceLock::new(),
        vhost: Arc::downgrade(&vhost),
        broker: Arc::downgrade(&broker),
        members: Mutex::new(def.members.clone()),
        group: def.group(),
        cluster: Arc::downgrade(cluster),
        args: args.clone(),
        table: table.clone(),
        window: broker.config.queue.max_in_memory,
        dlx_relay: OnceLock::new(),
    });
    let mut m = Machine::new(&args, &table, broker.config.queue.max_in_memory);
    let log = match cluster.wal.group(&def.group()) {
        Ok(l) => l,
        Err(e) => {
            warn!(queue = %def.name, vhost = %def.vhost, "cannot open the quorum queue's Raft log: {e}");
            return;
        }
    };
    let snap = Arc::new(SnapFile::new(&broker.config.storage.data_dir, &def.group()));
    // A replica restarts from its last snapshot, then replays the log after it.
    if let Some((meta, data)) = snap.read() {
        match postcard::from_bytes::<QSnap>(&data) {
            Ok(s) => {
                let idx = meta.last_log_id.map_or(0, |l| l.index);
                log.set_retain(s.retain.unwrap_or(idx.saturating_add(1)));
                m.restore(s);
                m.applied = Applied {
                    last: meta.last_log_id,
                    membership: meta.last_membership.clone(),
                };
                m.snapped(meta.last_log_id.map_or(0, |l| l.index));
            }
            Err(e) => {
                warn!(queue = %def.name, "unreadable quorum queue snapshot ({e}); replaying the log")
            }
        }
    }
    let machine = Arc::new(Mutex::new(m));
    let group = def.group();
    let member = def.members.contains(&cluster.me.id);
    if member {
        let sm = QuorumSm {
            m: machine.clone(),
            ctx: ctx.clone(),
            snap: snap.clone(),
            log: log.clone(),
        };
        match cluster.open_group(&group, sm).await {
            Ok(raft) => {
                if let Some(g) = cluster.groups.get(&group) {
                    let _ = ctx.leader.set(g.leader.clone());
                }
                let _ = ctx.raft.set(raft.clone());
                if def.members.first() == Some(&cluster.me.id)
                    && !raft.is_initialized().await.unwrap_or(true)
                {
                    let c = cluster.clone();
                    let members = def.members.clone();
                    tokio::spawn(async move { c.initialize(&raft, &members).await });
                }
            }
            Err(e) => {
                warn!(queue = %def.name, vhost = %def.vhost, "cannot open the quorum queue's Raft group: {e}");
                return;
            }
        }
    }
    let (tx, rx) = mpsc::channel(broker.config.queue.inbox_capacity);
    let q = Arc::new(QueueRef::new(
        def.id,
        def.name.clone(),
        def.vhost.clone(),
        true,
        None,
        false,
        table,
        args,
        tx,
    ));
    let _ = ctx.queue.set(Arc::downgrade(&q));
    cluster.queue_ctxs.insert(
        def.group(),
        Arc::downgrade(&ctx) as Weak<dyn std::any::Any + Send + Sync>,
    );
    if !member {
        let sink_ctx = ctx.clone();
        cluster.sinks.insert(
            def.group(),
            Arc::new(move |local: u64, msgs: Vec<GotMsg>| {
                let Some(q) = sink_ctx.queue.get().and_then(Weak::upgrade) else {
                    return;
                };
                let Some(link) = sink_ctx.links.get(&local).map(|l| l.clone()) else {
                    return;
                };
                let envs: Vec<Envelope> = msgs
                    .into_iter()
                    .filter_map(|g| {
                        let (id, redelivered, delivery_count) =
                            (g.id, g.redelivered, g.delivery_count);
                        from_wire(g.msg).map(|m| Envelope {
                            id,
                            gid: 0,
                            size: m.body.len() as u32,
                            msg: Some(Arc::new(m)),
                            delivery_count,
                            redelivered,
                            expires: 0,
                            priority: 0,
                        })
                    })
                    .collect();
                let _ = link.conn.send(ConnCmd::Deliver {
                    channel: link.channel,
                    consumer: local,
                    tag: link.tag.clone(),
                    queue: q,
                    msgs: envs,
                });
            }),
        );
    }
    vhost.queues.insert(def.name.clone(), q.clone());
    let ctx_for_dlx = ctx.clone();
    let log_for_dlx = log.clone();
    let machine_for_dlx = machine.clone();
    let actor = Actor {
        log,
        cluster: Arc::downgrade(cluster),
        ctx,
        machine,
        group,
        q: Arc::downgrade(&q),
        pending_credit: HashMap::new(),
        was_leader: false,
        follower_saw_leader: false,
    };
    // Only queues with the at-least-once strategy need the relay (and its
    // timer): an idle quorum queue keeps no timer of its own beyond the
    // actor's 5 s housekeeping.
    let alo = machine_for_dlx.lock().map(|m| m.alo).unwrap_or(false);
    if member && alo {
        let (dtx, drx) = mpsc::unbounded_channel();
        if ctx_for_dlx.dlx_relay.set(dtx).is_ok() {
            tokio::spawn(dlx_relay(
                Arc::downgrade(&ctx_for_dlx),
                log_for_dlx,
                machine_for_dlx,
                drx,
            ));
        }
    }
    tokio::spawn(actor.run(rx));
    info!(queue = %def.name, vhost = %def.vhost, replicas = def.members.len(), member, "quorum queue ready on this node");
}

/// Removes the queue from this node (deleted cluster-wide).
pub async fn dematerialize(cluster: &Arc<Cluster>, def: &QuorumDef) {
    if let Some(b) = cluster.broker.upgrade() {
        if let Some(v) = b.vhost(&def.vhost) {
            let same = v.queue(&def.name).map(|q| q.id == def.id).unwrap_or(false);
            if same {
                if let Some(q) = v.queue(&def.name) {
                    q.mark_deleted();
                    v.forget_queue(&q);
                    // Closing the inbox stops the actor, which cancels
                    // its consumers.
                    let _ =
                        q.tx.send(QueueCmd::Delete {
                            if_unused: false,
                            if_empty: false,
                            reply: None,
                        })
                        .await;
                }
            }
        }
    }
    cluster.sinks.remove(&def.group());
    if let Some(b) = cluster.broker.upgrade() {
        SnapFile::new(&b.config.storage.data_dir, &def.group()).remove();
    }
    let c = cluster.clone();
    let group = def.group();
    // Not from inside the metadata group's apply: shutting a group down
    // waits for its tasks.
    tokio::spawn(async move { c.drop_group(&group).await });
}

impl Cluster {
    /// The shared context of a quorum queue on this node.
    fn queue_ctx(&self, group: &str) -> Option<Arc<QCtx>> {
        self.queue_ctxs
            .get(group)
            .and_then(|w| w.upgrade())
            .and_then(|a| a.downcast::<QCtx>().ok())
    }
}

/// A quorum queue's replica set changed.
pub async fn members_changed(cluster: &Arc<Cluster>, def: &QuorumDef) {
    info!(queue = %def.name, vhost = %def.vhost, members = ?def.members, "quorum queue replica set changed");
    let group = def.group();
    let hosted = cluster.groups.contains_key(&group);
    let member = def.members.contains(&cluster.me.id);
    if member == hosted {
        // Same role here: only the member list moves.
        if let Some(ctx) = cluster.queue_ctx(&group) {
            if let Ok(mut m) = ctx.members.lock() {
                m.clone_from(&def.members);
            }
        }
        return;
    }
    // This node gains or loses its replica: rebuild its handle (consumers
    // attached here are cancelled and may re-consume).
    if let Some(b) = cluster.broker.upgrade() {
        if let Some(v) = b.vhost(&def.vhost) {
            if let Some(q) = v.queue(&def.name).filter(|q| q.id == def.id) {
                v.queues.remove_if(&def.name, |_, x| x.id == def.id);
                let _ =
                    q.tx.send(QueueCmd::Delete {
                        if_unused: false,
                        if_empty: false,
                        reply: None,
                    })
                    .await;
            }
        }
    }
    cluster.sinks.remove(&group);
    if hosted {
        cluster.drop_group(&group).await;
        if let Some(b) = cluster.broker.upgrade() {
            SnapFile::new(&b.config.storage.data_dir, &group).remove();
        }
    }
    materialize(cluster, def).await;
}

/// Adds (`add`) or removes a replica of a quorum queue (warrenctl
/// add_member / delete_member, grow / shrink): the metadata group records
/// the new replica set first (so an added node opens its replica), then the
/// queue's leader changes the group's membership (an added node catches up
/// by log replay or a snapshot); a removed node drops its replica last.
pub async fn change_member(
    broker: &Arc<Broker>,
    vhost: &str,
    name: &str,
    node: NodeId,
    add: bool,
) -> Result<(), String> {
    let Some(cluster) = broker.cluster.get().cloned() else {
        return Err("clustering is not running".into());
    };
    let def = cluster
        .meta
        .lock()
        .map_err(|_| "metadata lock poisoned".to_string())?
        .queues
        .get(&(vhost.to_string(), name.to_string()))
        .cloned()
        .ok_or_else(|| format!("no quorum queue '{name}' in vhost '{vhost}'"))?;
    if !cluster.members().iter().any(|(id, _)| *id == node) {
        return Err("that node is not a member of the cluster".into());
    }
    let mut members = def.members.clone();
    if add {
        if members.contains(&node) {
            return Ok(());
        }
        members.push(node);
    } else {
        if !members.contains(&node) {
            return Ok(());
        }
        if members.len() == 1 {
            return Err("cannot remove the last replica of a quorum queue".into());
        }
        members.retain(|m| *m != node);
    }
    let meta_members: Vec<NodeId> = cluster.members().into_iter().map(|(id, _)| id).collect();
    let set_members = |members: Vec<NodeId>| {
        Cmd::Meta(MetaCmd::SetMembers {
            vhost: vhost.to_string(),
            name: name.to_string(),
            members,
        })
    };
    if add {
        cluster
            .propose(
                crate::cluster::types::META_GROUP,
                set_members(members.clone()),
                &meta_members,
            )
            .await?;
        cluster
            .set_voters(&def.group(), members, &def.members)
            .await
    } else {
        cluster
            .set_voters(&def.group(), members.clone(), &def.members)
            .await?;
        cluster
            .propose(
                crate::cluster::types::META_GROUP,
                set_members(members),
                &meta_members,
            )
            .await
            .map(|_| ())
    }
}

/// Publish/settle proposals of one queue in the Raft pipeline at once (see
/// `Actor::run`).
const PROPOSALS_IN_FLIGHT: usize = 3;

/// Messages (or settled ids) merged into one Raft entry at most.
const MAX_MSGS_PER_ENTRY: usize = 4096;

/// Message bytes merged into one entry at most (bounds the size of one
/// replication frame and of one entry read back for a paged-out body).
const MAX_BYTES_PER_ENTRY: usize = 512 * 1024;

/// A place in the proposal window. Not waited for longer than a few
/// seconds: a proposal stuck without a majority must not stall the actor
/// (stats, deletes) for good.
async fn in_window(w: &Arc<tokio::sync::Semaphore>) -> Option<tokio::sync::OwnedSemaphorePermit> {
    tokio::time::timeout(std::time::Duration::from_secs(5), w.clone().acquire_owned())
        .await
        .ok()
        .and_then(Result::ok)
}

/// Message bytes in the log after which a replica snapshots (see
/// `Machine::snapshot_due`).
const SNAPSHOT_MIN_BYTES: u64 = 64 << 20;

/// One client publish batch: messages and where to confirm them.
type PublishPart = (Vec<(Arc<Message>, u64)>, Option<ConfirmTo>);

/// The local handle: turns queue commands into proposals.
struct Actor {
    /// This node's log of the group (paged-out bodies are read from it).
    log: LogStore,
    cluster: Weak<Cluster>,
    ctx: Arc<QCtx>,
    machine: Arc<Mutex<Machine>>,
    group: String,
    q: Weak<QueueRef>,
    pending_credit: HashMap<u64, u32>,
    /// Led the group at the last housekeeping turn.
    was_leader: bool,
    /// Saw another node lead since this one last led (a takeover then
    /// re-forwards deliveries to nodes without a replica).
    follower_saw_leader: bool,
}

impl Actor {
    fn remote(&self, owner: Owner) -> RemoteOwner {
        RemoteOwner {
            node: self.ctx.me,
            incarnation: self.ctx.incarnation,
            conn: owner.conn,
            channel: owner.channel,
        }
    }

    async fn propose(
        &self,
        op: QOp,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<Resp, String>>> {
        let c = self.cluster.upgrade()?;
        let cmd = Cmd::Queue { now: now_ms(), op };
        let members = self
            .ctx
            .members
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        match c.start_propose(&self.group, cmd, &members).await {
            Ok(rx) => Some(rx),
            Err(e) => {
                warn!(group = %self.group, "quorum queue command not accepted: {e}");
                None
            }
        }
    }

    async fn propose_wait(&self, op: QOp) -> Result<Resp, String> {
        match self.propose(op).await {
            Some(rx) => rx.await.map_err(|_| "proposal abandoned".to_string())?,
            None => Err("no leader reachable for this quorum queue".into()),
        }
    }

    /// A publish batch left the inbox.
    fn dequeued(&self, cmd: &QueueCmd) {
        if let (Some(q), QueueCmd::Publish { msgs, .. }) = (self.q.upgrade(), cmd) {
            let _ = q
                .inflight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(msgs.len() as u64))
                });
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        // Housekeeping every 200 ms while the queue has anything that needs
        // it (consumers or channels holding deliveries, timers, credit);
        // an idle queue wakes every 5 s only, and any command brings the
        // short period back.
        let busy_every = std::time::Duration::from_millis(200);
        let idle_every = std::time::Duration::from_secs(5);
        let mut next = tokio::time::Instant::now() + busy_every;
        // At most PROPOSALS_IN_FLIGHT publish/settle proposals are in the
        // Raft pipeline at once; whatever arrives meanwhile waits in the
        // inbox and goes into the next proposal as one entry. Under load
        // entries grow instead of multiplying (one log append, flush,
        // replication round and apply per batch, not per client batch).
        let window = Arc::new(tokio::sync::Semaphore::new(PROPOSALS_IN_FLIGHT));
        let mut stash: Option<QueueCmd> = None;
        loop {
            let cmd = match stash.take() {
                Some(c) => c,
                None => {
                    let c = tokio::select! {
                        c = rx.recv() => match c { Some(c) => c, None => break },
                        _ = tokio::time::sleep_until(next) => {
                            self.housekeeping().await;
                            let every = if self.idle() { idle_every } else { busy_every };
                            next = tokio::time::Instant::now() + every;
                            continue;
                        }
                    };
                    next = next.min(tokio::time::Instant::now() + busy_every);
                    self.dequeued(&c);
                    c
                }
            };
            match cmd {
                QueueCmd::Publish { msgs, confirm } => {
                    let permit = in_window(&window).await;
                    let mut n = msgs.len();
                    let mut bytes: usize = msgs.iter().map(|(m, _)| m.body.len() + 64).sum();
                    let mut parts = vec![(msgs, confirm)];
                    while n < MAX_MSGS_PER_ENTRY && bytes < MAX_BYTES_PER_ENTRY {
                        let Ok(next) = rx.try_recv() else { break };
                        self.dequeued(&next);
                        match next {
                            QueueCmd::Publish { msgs, confirm } => {
                                n += msgs.len();
                                bytes += msgs.iter().map(|(m, _)| m.body.len() + 64).sum::<usize>();
                                parts.push((msgs, confirm));
                            }
                            other => {
                                stash = Some(other);
                                break;
                            }
                        }
                    }
                    self.publish(parts, permit).await;
                }
                QueueCmd::Settle { mut ids, outcome } => {
                    let permit = in_window(&window).await;
                    while ids.len() < MAX_MSGS_PER_ENTRY {
                        let Ok(next) = rx.try_recv() else { break };
                        self.dequeued(&next);
                        match next {
                            QueueCmd::Settle {
                                ids: more,
                                outcome: o,
                            } if o == outcome => ids.extend(more),
                            other => {
                                stash = Some(other);
                                break;
                            }
                        }
                    }
                    self.settle(ids, outcome, permit).await;
                }
                other => {
                    if !self.handle(other).await {
                        break;
                    }
                }
            }
        }
        // Stopped (deleted): tell local consumers.
        let locals: Vec<(u64, Link)> = self
            .ctx
            .links
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        self.ctx.links.clear();
        for (id, l) in locals {
            let _ = l.conn.send(ConnCmd::ConsumerCancelled {
                channel: l.channel,
                consumer: id,
                revoked: false,
            });
        }
    }

    /// Leader duties: expiry and consumer timeouts, and cleaning up after
    /// nodes that restarted or went away. Followers flush credit.
    /// Nothing for housekeeping to watch: no consumer or channel holds
    /// anything, no timer is set, no credit waits.
    fn idle(&self) -> bool {
        if !self.pending_credit.is_empty() {
            return false;
        }
        let Ok(m) = self.machine.lock() else {
            return false;
        };
        m.owners.is_empty()
            && m.core.next_expiry().is_none()
            && m.core.next_timeout().is_none()
            && m.core.next_retry().is_none()
    }

    async fn housekeeping(&mut self) {
        if !self.pending_credit.is_empty() {
            let credits: Vec<(u64, u32)> = self.pending_credit.drain().collect();
            for (local_id, n) in credits {
                let _ = self
                    .propose(QOp::Credit {
                        node: self.ctx.me,
                        incarnation: self.ctx.incarnation,
                        local_id,
                        n,
                    })
                    .await;
            }
        }
        self.maybe_snapshot();
        if !self.ctx.is_leader() {
            self.was_leader = false;
            // Another node leads: if this one takes over later, what that
            // leader forwarded may not have arrived.
            if let Some(r) = self.ctx.raft.get() {
                let l = r.metrics().borrow().current_leader;
                if l.is_some() && l != Some(self.ctx.me) {
                    self.follower_saw_leader = true;
                }
            }
            return;
        }
        let Some(c) = self.cluster.upgrade() else {
            return;
        };
        if !self.was_leader {
            self.was_leader = true;
            if std::mem::take(&mut self.follower_saw_leader) {
                self.reforward(&c);
            }
        }
        let now = now_ms();
        let (due, stale) = {
            let Ok(m) = self.machine.lock() else { return };
            let due = [
                m.core.next_expiry(),
                m.core.next_timeout(),
                m.core.next_retry(),
            ]
            .into_iter()
            .flatten()
            .any(|t| t <= now);
            let mut stale: Vec<(NodeId, u64)> = Vec::new();
            for o in m.owners.keys() {
                let inc = c.incarnation(o.node);
                if inc != o.incarnation && !stale.contains(&(o.node, inc)) {
                    stale.push((o.node, inc));
                }
            }
            (due, stale)
        };
        if due {
            let _ = self.propose(QOp::Tick).await;
        }
        for (node, alive) in stale {
            info!(group = %self.group, node, "a node holding deliveries of this quorum queue restarted or went away; returning its messages");
            let _ = self.propose(QOp::NodeDown { node, alive }).await;
        }
    }

    /// Proposes the publish batches `parts` as one Raft entry; confirms
    /// each part's publisher once it is applied. `permit` (a place in the
    /// proposal window) is held until then.
    async fn publish(
        &self,
        parts: Vec<PublishPart>,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let mut wire: Vec<WireMsg> = Vec::new();
        let mut confirms: Vec<(u32, ConfirmTo)> = Vec::new();
        for (msgs, confirm) in parts {
            if let Some(c) = confirm {
                confirms.push((wire.len() as u32, c));
            }
            wire.extend(msgs.iter().map(|(m, _)| to_wire(m)));
        }
        let rx = self.propose(QOp::Enqueue(wire)).await;
        let Some(rx) = rx else {
            // Not accepted: never confirmed (the publisher sees the nack).
            for (_, c) in confirms {
                let _ = c.conn.send(ConnCmd::Confirm {
                    channel: c.channel,
                    seqs: c.seqs,
                    nack: true,
                });
            }
            return;
        };
        tokio::spawn(async move {
            let res = rx.await;
            drop(permit);
            match res {
                Ok(Ok(Resp::Enqueued { rejected })) => {
                    for (start, c) in confirms {
                        c.settle(|i| rejected.contains(&(start + i as u32)));
                    }
                }
                other => {
                    if !confirms.is_empty() {
                        warn!("quorum queue publish not confirmed: {other:?}");
                    }
                    for (_, c) in confirms {
                        let _ = c.conn.send(ConnCmd::Confirm {
                            channel: c.channel,
                            seqs: c.seqs,
                            nack: true,
                        });
                    }
                }
            }
        });
    }

    /// Proposes settlements as one Raft entry; `permit` is held until it
    /// is applied.
    async fn settle(
        &self,
        ids: Vec<u64>,
        outcome: Outcome,
        permit: Option<tokio::sync::OwnedSemaphorePermit>,
    ) {
        let rx = self
            .propose(QOp::Settle {
                ids,
                outcome: wire_outcome(outcome),
            })
            .await;
        if let (Some(rx), Some(p)) = (rx, permit) {
            tokio::spawn(async move {
                let _ = rx.await;
                drop(p);
            });
        }
    }

    /// Handles one command; false to stop.
    async fn handle(&mut self, cmd: QueueCmd) -> bool {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                self.publish(vec![(msgs, confirm)], None).await;
            }
            // Nothing to save at shutdown: the state is in the Raft log.
            QueueCmd::SaveSnapshot { reply } => {
                let _ = reply.send(());
            }
            QueueCmd::Consume {
                spec,
                conn,
                tag,
                reply,
                args,
            } => {
                let (priority, timeout) = match super::actor::consume_args(&args, None) {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = reply.send(Err(e));
                        return true;
                    }
                };
                let local = spec.id;
                self.ctx.links.insert(
                    local,
                    Link {
                        conn,
                        channel: spec.owner.channel,
                        tag: tag.clone(),
                        conn_id: spec.owner.conn,
                    },
                );
                let op = QOp::Consume {
                    owner: self.remote(spec.owner),
                    local_id: local,
                    tag: tag.to_string(),
                    prefetch: spec.prefetch,
                    no_ack: spec.no_ack,
                    exclusive: spec.exclusive,
                    priority,
                    timeout,
                };
                let res = match self.propose_wait(op).await {
                    Ok(Resp::Refused(c, _)) => {
                        self.ctx.links.remove(&local);
                        let (name, vhost) = self
                            .q
                            .upgrade()
                            .map(|q| (q.name.clone(), q.vhost.clone()))
                            .unwrap_or_default();
                        Err(AmqpError::new(
                            c,
                            format!("queue '{name}' in vhost '{vhost}' in exclusive use"),
                        ))
                    }
                    Ok(_) => Ok(()),
                    Err(e) => {
                        self.ctx.links.remove(&local);
                        Err(AmqpError::new(
                            code::INTERNAL_ERROR,
                            format!("cannot attach the consumer to the quorum queue: {e}"),
                        ))
                    }
                };
                let _ = reply.send(res);
            }
            QueueCmd::Cancel { consumer, reply } => {
                let _ = self
                    .propose_wait(QOp::Cancel {
                        node: self.ctx.me,
                        incarnation: self.ctx.incarnation,
                        local_id: consumer,
                    })
                    .await;
                self.ctx.links.remove(&consumer);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::Settle { ids, outcome } => {
                self.settle(ids, outcome, None).await;
            }
            QueueCmd::Get {
                owner,
                no_ack,
                reply,
            } => {
                let res = self
                    .propose_wait(QOp::Get {
                        owner: self.remote(owner),
                        no_ack,
                    })
                    .await;
                let got = match res {
                    Ok(Resp::Got(Some(g))) => from_wire(g.msg).map(|m| {
                        (
                            Envelope {
                                id: g.id,
                                gid: 0,
                                size: m.body.len() as u32,
                                msg: Some(Arc::new(m)),
                                delivery_count: g.delivery_count,
                                redelivered: g.redelivered,
                                expires: 0,
                                priority: 0,
                            },
                            g.remaining,
                        )
                    }),
                    _ => None,
                };
                let _ = reply.send(got);
            }
            QueueCmd::Credit { consumer, n } => {
                *self.pending_credit.entry(consumer).or_insert(0) += n;
            }
            QueueCmd::ChannelClosed { owner } => {
                self.ctx
                    .links
                    .retain(|_, l| !(l.conn_id == owner.conn && l.channel == owner.channel));
                let _ = self.propose(QOp::ChannelClosed(self.remote(owner))).await;
            }
            QueueCmd::Purge { reply } => {
                let n = match self.propose_wait(QOp::Purge).await {
                    Ok(Resp::Count(n)) => n,
                    _ => 0,
                };
                let _ = reply.send(n);
            }
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let counts = self.counts();
                if if_unused && counts.consumers > 0 {
                    if let Some(r) = reply {
                        let _ = r.send(Err(AmqpError::precondition(format!(
                            "queue '{}' in vhost '{}' in use",
                            self.q.upgrade().map(|q| q.name.clone()).unwrap_or_default(),
                            self.q
                                .upgrade()
                                .map(|q| q.vhost.clone())
                                .unwrap_or_default()
                        ))));
                    }
                    return true;
                }
                if if_empty && counts.ready > 0 {
                    if let Some(r) = reply {
                        let _ = r.send(Err(AmqpError::precondition(format!(
                            "queue '{}' in vhost '{}' is not empty",
                            self.q.upgrade().map(|q| q.name.clone()).unwrap_or_default(),
                            self.q
                                .upgrade()
                                .map(|q| q.vhost.clone())
                                .unwrap_or_default()
                        ))));
                    }
                    return true;
                }
                match reply {
                    // From a client or the API: delete cluster-wide (this
                    // node's copy goes when the metadata command applies).
                    Some(r) => {
                        let n = counts.ready + counts.unacked;
                        let res = match (self.q.upgrade(), self.ctx.broker.upgrade()) {
                            (Some(q), Some(b)) => delete(&b, &q).await.map_err(|e| {
                                AmqpError::new(code::INTERNAL_ERROR, format!("cannot delete: {e}"))
                            }),
                            _ => Ok(()),
                        };
                        let _ = r.send(res.map(|_| n));
                        return true;
                    }
                    // From the metadata group: this node's copy is gone.
                    None => return false,
                }
            }
            QueueCmd::Stats { reply } => {
                let _ = reply.send(self.counts());
            }
            QueueCmd::Kick | QueueCmd::Touch | QueueCmd::PolicyChanged => {}
            QueueCmd::Peek { count, reply } => {
                let out = match self.machine.lock() {
                    Ok(mut m) => m
                        .core
                        .ready_mut()
                        .iter()
                        .take(count)
                        .filter_map(|e| {
                            let mut e = e.clone();
                            Bodies::new(&self.log)
                                .fill(&self.ctx.group, &mut e)
                                .then_some(())?;
                            e.msg.map(|msg| (msg, e.redelivered))
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                let _ = reply.send(out);
            }
            QueueCmd::Consumers { reply } => {
                let infos = self
                    .ctx
                    .links
                    .iter()
                    .map(|l| super::ConsumerInfo {
                        tag: l.tag.to_string(),
                        channel: l.channel,
                        conn: l.conn.clone(),
                    })
                    .collect();
                let _ = reply.send(infos);
            }
        }
        true
    }

    /// A new leader sends again what consumers on nodes without a replica
    /// hold unacked: the previous leader's forwards may not have arrived
    /// (at-least-once: a consumer may see such a message twice).
    fn reforward(&self, c: &Arc<Cluster>) {
        let members = self
            .ctx
            .members
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default();
        let mut out: Vec<((NodeId, u64, u64), Vec<GotMsg>)> = Vec::new();
        if let Ok(m) = self.machine.lock() {
            let mut bodies = Bodies::new(&self.log);
            for (mut env, _owner, consumer, _) in m.core.image().unacked {
                let Some(cid) = consumer else { continue };
                let Some(key) = m.consumer_keys.get(&cid).copied() else {
                    continue;
                };
                if key.0 == self.ctx.me || members.contains(&key.0) {
                    continue;
                }
                if !bodies.fill(&self.ctx.group, &mut env) {
                    continue;
                }
                let Some(msg) = env.msg.as_deref() else {
                    continue;
                };
                let g = GotMsg {
                    id: env.id,
                    redelivered: true,
                    delivery_count: env.delivery_count,
                    msg: to_wire(msg),
                    remaining: 0,
                };
                match out.iter_mut().find(|(k, _)| *k == key) {
                    Some((_, v)) => v.push(g),
                    None => out.push((key, vec![g])),
                }
            }
        }
        for ((node, inc, local), msgs) in out {
            if let Some(p) = c.peer_by_id(node) {
                let _ = p.send_req(crate::cluster::net::Req::Deliver {
                    group: self.group.clone(),
                    incarnation: inc,
                    local_id: local,
                    msgs,
                });
            }
        }
    }

    /// Snapshots this replica once its log since the last snapshot is long
    /// compared with what a snapshot holds (so the cost per command stays
    /// constant); openraft then purges the log before it.
    fn maybe_snapshot(&self) {
        let Some(c) = self.cluster.upgrade() else {
            return;
        };
        let Some(raft) = c.groups.get(&self.group).map(|g| g.raft.clone()) else {
            return;
        };
        let due = match self.machine.lock() {
            Ok(m) => m.snapshot_due(c.cfg.snapshot_min_entries),
            Err(_) => false,
        };
        if due {
            if let Ok(mut m) = self.machine.lock() {
                // Not again until this one is taken.
                let at = m.applied.last.map_or(0, |l| l.index);
                m.snapped(at);
            }
            tokio::spawn(async move {
                let _ = raft.trigger().snapshot().await;
            });
        }
    }

    fn counts(&self) -> super::core::Counts {
        match self.machine.lock() {
            Ok(m) => m.core.counts(),
            Err(_) => super::core::Counts::default(),
        }
    }
}
