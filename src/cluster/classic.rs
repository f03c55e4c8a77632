//! Classic queues in a cluster, as RabbitMQ has them: a classic queue lives
//! on its home node (the node it was declared on, where its actor, its
//! messages and its store are); every other node knows it through the
//! metadata group and has a proxy for it that forwards every command there.
//!
//! - Registry: a non-exclusive classic queue (and an exclusive one with a
//!   client-chosen name, so the name is taken cluster-wide) is registered
//!   with `MetaCmd::DeclareClassic` before it is created, and unregistered
//!   with `MetaCmd::DeleteClassic` when its home deletes it (client delete,
//!   auto-delete, x-expires, exclusive owner closing). A name registered by
//!   another home wins: the declaring node gets that queue's proxy (and the
//!   channel's equivalence check runs against it). A home that restarts
//!   unregisters what it no longer has (its transient queues).
//! - Proxy (other nodes): a [`QueueRef`] with `home` set, in the vhost's
//!   registry like any queue (so routing, bindings, management and every
//!   channel method find it), whose actor turns [`QueueCmd`]s into
//!   [`Req::Classic`] requests to the home. Publishes are batched (what
//!   waits in the inbox goes in one request, up to 4,096 messages or
//!   4 MiB, with at most [`PUBLISH_WINDOW`] requests in flight) and
//!   confirmed to the publisher when the home confirmed them (for a
//!   persistent message on a durable queue: once on disk there).
//! - Home: requests for one queue are handed to its inbox in arrival order
//!   by one ingress task per queue. Consumers and channels of other nodes
//!   are represented by one relay per (node, boot id): its inbox is the
//!   `ConnTx` the queue actor delivers to, and it ships deliveries and
//!   cancellations back as [`Req::ClassicEvent`]. When that node restarts
//!   (at once) or has not answered for `REMOTE_GONE_AFTER`, the relay
//!   closes its channels at the queue, which returns their unacked
//!   messages.
//! - Home node down: its proxies are marked absent (not routed to: a
//!   mandatory publish is returned, as RabbitMQ drops such a queue from
//!   routing), declare/consume/get/purge/delete fail with RabbitMQ's 404
//!   "home node ... is down or inaccessible", and consumers attached
//!   through a proxy get basic.cancel. When the home is back, the proxy
//!   works again without a redeclare.

use super::Cluster;
use super::net::{Frame, Peer, Req, RespBody};
use super::types::{
    ClassicDef, Cmd, GotMsg, META_GROUP, MetaCmd, NodeId, Resp, WireMsg, WireOutcome,
};
use crate::broker::{Broker, ConnCmd, ConnTx, VHost};
use crate::cluster::types::{from_wire, outcome, to_wire, wire_outcome};
use crate::protocol::error::{AmqpError, code};
use crate::queue::core::{ConsumerSpec, Counts, Envelope, Outcome, Owner};
use crate::queue::message::Message;
use crate::queue::{ConfirmTo, QueueCmd, QueueHome, QueueRef};
use amq_protocol::types::FieldTable;
use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, error, info, warn};

/// Publish requests a proxy has in flight to its home at once.
pub const PUBLISH_WINDOW: usize = 16;
/// Messages merged into one publish request.
const MAX_MSGS_PER_REQ: usize = 4096;
/// Body bytes merged into one publish request.
const MAX_BYTES_PER_REQ: usize = 4 << 20;
/// How long a node with consumers of queues here may not answer before
/// the home takes back what they hold (a restart of it is acted on at
/// once).
const REMOTE_GONE_AFTER: Duration = Duration::from_secs(10);
/// How long a proxy waits for its home to answer a command.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------
// wire types

/// A command from a proxy to the queue's home.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClassicOp {
    /// Enqueue, in order; with `confirm` the answer (`Published`) comes
    /// once every message is confirmed, else as soon as they are enqueued.
    Publish {
        /// Messages.
        msgs: Vec<WireMsg>,
        /// The publishers want confirms.
        confirm: bool,
    },
    /// Attach a consumer of the sending node.
    Consume {
        /// Consumer id on the sending node.
        local_id: u64,
        /// Its connection id there.
        conn: u64,
        /// Its channel.
        channel: u16,
        /// Consumer tag.
        tag: String,
        /// Prefetch.
        prefetch: u32,
        /// Auto-ack.
        no_ack: bool,
        /// Exclusive consumer.
        exclusive: bool,
        /// Flow credit window for no-ack deliveries.
        flow_window: u32,
        /// basic.consume arguments (JSON of the field table).
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
    },
    /// Detach a consumer.
    Cancel {
        /// Consumer id on the sending node.
        local_id: u64,
    },
    /// Settle deliveries (home queue ids).
    Settle {
        /// Message ids.
        ids: Vec<u64>,
        /// How.
        outcome: WireOutcome,
    },
    /// Flow credit back for a no-ack consumer.
    Credit {
        /// Consumer id on the sending node.
        local_id: u64,
        /// Deliveries written.
        n: u32,
    },
    /// basic.get.
    Get {
        /// Connection id on the sending node.
        conn: u64,
        /// Channel.
        channel: u16,
        /// Auto-ack.
        no_ack: bool,
    },
    /// A channel on the sending node closed.
    ChannelClosed {
        /// Connection id there.
        conn: u64,
        /// Channel.
        channel: u16,
    },
    /// queue.purge.
    Purge,
    /// queue.delete.
    Delete {
        /// Refuse if consumers are attached.
        if_unused: bool,
        /// Refuse if messages are ready.
        if_empty: bool,
    },
    /// Counts (declare-ok, management).
    Stats,
    /// A redeclare: the queue counts as used (x-expires).
    Touch,
    /// Management: copies of the first messages.
    Peek {
        /// How many.
        count: u32,
    },
}

/// The home's answer to a [`ClassicOp`].
#[derive(Debug, Serialize, Deserialize)]
pub enum ClassicReply {
    /// Done.
    Done,
    /// Publish confirmed; positions refused (basic.nack).
    Published {
        /// Refused positions in the request.
        nacked: Vec<u32>,
    },
    /// basic.get result.
    Got(Option<GotMsg>),
    /// A count (purge, delete).
    Count(u64),
    /// Queue counts.
    Stats {
        /// Ready.
        ready: u64,
        /// Unacked.
        unacked: u64,
        /// Consumers.
        consumers: u64,
        /// Ready bytes.
        ready_bytes: u64,
        /// Ready bodies in memory.
        in_memory: u64,
    },
    /// Peeked messages with their redelivered flag.
    Peeked(Vec<(WireMsg, bool)>),
    /// Refused with this AMQP error (code, full reply text).
    Refused {
        /// Reply code.
        code: u16,
        /// Reply text.
        text: String,
    },
    /// The home has no such queue (deleted).
    NoQueue,
}

/// From the home to a node with consumers of the queue.
#[derive(Debug, Serialize, Deserialize)]
pub enum ClassicEvent {
    /// Deliveries for a consumer.
    Deliver {
        /// Consumer id on the receiving node.
        local_id: u64,
        /// Messages (ids are the home queue's).
        msgs: Vec<GotMsg>,
    },
    /// The home cancelled the consumer (queue deleted, consumer timeout).
    Cancelled {
        /// Consumer id on the receiving node.
        local_id: u64,
        /// Its unacked deliveries were taken back.
        revoked: bool,
    },
}

/// Which node (and boot of it) sent a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Origin {
    /// Node.
    pub node: NodeId,
    /// Its boot id.
    pub incarnation: u64,
}

fn envelope(g: GotMsg) -> Option<Envelope> {
    let (id, redelivered, delivery_count) = (g.id, g.redelivered, g.delivery_count);
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
}

// ---------------------------------------------------------------------------
// registry (metadata group)

/// This node's share of the classic queue machinery.
#[derive(Default)]
pub struct Registry {
    /// Proxies on this node by (vhost, name).
    proxies: DashMap<(String, String), Arc<Proxy>>,
    /// Home side: per local queue id, the task handing remote commands to
    /// its inbox in arrival order.
    ingress: DashMap<u64, mpsc::UnboundedSender<Ingress>>,
    /// Home side: consumers and channels of each other node (boot).
    remotes: DashMap<Origin, Arc<Remote>>,
}

/// What applying a classic queue command does on this node.
#[derive(Debug)]
pub enum Effect {
    /// Registered (or re-registered by its home).
    Create(ClassicDef),
    /// Unregistered.
    Delete(ClassicDef),
}

/// Applies `DeclareClassic` to the metadata state. `taken`: a quorum
/// queue or stream has the name.
pub fn apply_declare(
    map: &mut BTreeMap<(String, String), ClassicDef>,
    taken: bool,
    def: ClassicDef,
) -> (Resp, Option<Effect>) {
    if taken {
        return (
            Resp::Refused(
                code::PRECONDITION_FAILED,
                format!(
                    "a queue named '{}' of another type exists in vhost '{}'",
                    def.name, def.vhost
                ),
            ),
            None,
        );
    }
    let key = (def.vhost.clone(), def.name.clone());
    match map.get(&key) {
        Some(existing) if existing.home != def.home => (Resp::Count(existing.home), None),
        Some(existing) if *existing == def => (Resp::Count(def.home), None),
        _ => {
            map.insert(key, def.clone());
            (Resp::Count(def.home), Some(Effect::Create(def)))
        }
    }
}

/// Applies `DeleteClassic` to the metadata state.
pub fn apply_delete(
    map: &mut BTreeMap<(String, String), ClassicDef>,
    vhost: String,
    name: String,
    home: NodeId,
    id: u64,
    incarnation: Option<u64>,
) -> Option<Effect> {
    let key = (vhost, name);
    let matches = map.get(&key).is_some_and(|d| {
        d.home == home && d.id == id && incarnation.is_none_or(|i| i == d.incarnation)
    });
    if matches {
        map.remove(&key).map(Effect::Delete)
    } else {
        None
    }
}

/// Carries out an applied change on this node.
pub fn apply_effect(c: &Arc<Cluster>, eff: Effect) {
    match eff {
        Effect::Create(def) if def.home == c.me.id => check_own(c, &def),
        Effect::Create(def) => materialize(c, &def),
        Effect::Delete(def) if def.home != c.me.id => dematerialize(c, &def),
        Effect::Delete(_) => {}
    }
}

/// This node is the queue's home: a registration from an earlier boot
/// whose queue is gone (a transient queue, or one deleted while the
/// unregistration could not be made) is unregistered.
fn check_own(c: &Arc<Cluster>, def: &ClassicDef) {
    if def.incarnation == c.me.incarnation {
        return;
    }
    // Looked at once the log replay at start is over: only entries still
    // registered then (not deleted later in the log) are unregistered.
    let weak = Arc::downgrade(c);
    let def = def.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let Some(c) = weak.upgrade() else { return };
        let key = (def.vhost.clone(), def.name.clone());
        let still = c
            .meta
            .lock()
            .map(|m| m.classic.get(&key) == Some(&def))
            .unwrap_or(false);
        let Some(broker) = c.broker.upgrade() else {
            return;
        };
        let here = broker
            .vhost(&def.vhost)
            .and_then(|v| v.queue(&def.name))
            .is_some_and(|q| q.home.is_none() && q.id == def.id);
        if !still || here {
            return;
        }
        info!(queue = %def.name, vhost = %def.vhost, "classic queue registered by an earlier run of this node is gone (transient, or deleted); unregistering it cluster-wide");
        let cmd = Cmd::Meta(MetaCmd::DeleteClassic {
            vhost: def.vhost.clone(),
            name: def.name.clone(),
            home: def.home,
            id: def.id,
            incarnation: Some(def.incarnation),
        });
        propose_later(&c, cmd);
    });
}

/// Proposes a metadata command from a task of its own (never from inside
/// the metadata group's apply), retrying for a minute.
fn propose_later(c: &Arc<Cluster>, cmd: Cmd) {
    let weak = Arc::downgrade(c);
    tokio::spawn(async move {
        for _ in 0..12 {
            let Some(c) = weak.upgrade() else { return };
            let members: Vec<NodeId> = c.members().into_iter().map(|(id, _)| id).collect();
            match c.propose(META_GROUP, cmd.clone(), &members).await {
                Ok(_) => return,
                Err(e) => {
                    warn!("classic queue registry change not replicated yet ({e}); retrying");
                }
            }
            drop(c);
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        warn!(
            ?cmd,
            "gave up replicating a classic queue registry change: other nodes may keep a stale entry until this node restarts"
        );
    });
}

/// A node left the cluster for good (forget_cluster_node): its classic
/// queues are unregistered, as RabbitMQ deletes a forgotten node's queues.
/// Called at the metadata leader.
pub async fn forget_node(c: &Arc<Cluster>, node: NodeId) {
    let defs: Vec<ClassicDef> = c
        .meta
        .lock()
        .map(|m| {
            m.classic
                .values()
                .filter(|d| d.home == node)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    if defs.is_empty() {
        return;
    }
    info!(
        node,
        queues = defs.len(),
        "unregistering the classic queues of a node removed from the cluster"
    );
    let members: Vec<NodeId> = c.members().into_iter().map(|(id, _)| id).collect();
    for d in defs {
        let cmd = Cmd::Meta(MetaCmd::DeleteClassic {
            vhost: d.vhost.clone(),
            name: d.name.clone(),
            home: d.home,
            id: d.id,
            incarnation: Some(d.incarnation),
        });
        if let Err(e) = c.propose(META_GROUP, cmd, &members).await {
            warn!(queue = %d.name, vhost = %d.vhost, "could not unregister a classic queue of the removed node ({e}); delete it by hand");
        }
    }
}

/// The registering node's view of a declare: create the queue here, or use
/// the proxy of the one another node registered first.
pub enum Registered {
    /// This node is the home: create the queue.
    Here,
    /// Another node's queue has the name: its proxy.
    Elsewhere(Arc<QueueRef>),
}

/// Whether classic queues are registered cluster-wide on this node.
pub fn clustered(broker: &Broker) -> Option<Arc<Cluster>> {
    broker.cluster.get().filter(|c| c.cfg.enabled).cloned()
}

/// Registers a classic queue this node is about to create (queue.declare
/// of a new name). Server-named exclusive queues (`amq.gen-…`) cannot
/// collide and are not registered.
pub async fn register(
    broker: &Arc<Broker>,
    vhost: &Arc<VHost>,
    spec: &crate::broker::declare::NewQueue,
    id: u64,
) -> Result<Registered, AmqpError> {
    let Some(c) = clustered(broker) else {
        return Ok(Registered::Here);
    };
    if spec.exclusive_owner.is_some() && spec.name.starts_with("amq.gen-") {
        return Ok(Registered::Here);
    }
    let arguments = serde_json::to_vec(&spec.arguments)
        .map_err(|e| AmqpError::precondition(format!("unencodable queue arguments: {e}")))?;
    let def = ClassicDef {
        id,
        vhost: vhost.name.clone(),
        name: spec.name.clone(),
        home: c.me.id,
        incarnation: c.me.incarnation,
        durable: spec.durable,
        auto_delete: spec.auto_delete,
        exclusive: spec.exclusive_owner.is_some(),
        arguments,
    };
    let members: Vec<NodeId> = c.members().into_iter().map(|(id, _)| id).collect();
    let resp = c
        .propose(
            META_GROUP,
            Cmd::Meta(MetaCmd::DeclareClassic(def)),
            &members,
        )
        .await
        .map_err(|e| {
            AmqpError::internal(format!(
                "cannot register queue '{}' in vhost '{}' with the cluster: {e}",
                spec.name, vhost.name
            ))
        })?;
    match resp {
        Resp::Count(home) if home == c.me.id => Ok(Registered::Here),
        Resp::Count(_) => {
            // Another node's queue: its proxy appears when this node
            // applies the registration (at once, or very soon).
            for _ in 0..500 {
                if let Some(q) = vhost.queue(&spec.name) {
                    return Ok(Registered::Elsewhere(q));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(AmqpError::internal(format!(
                "queue '{}' in vhost '{}' exists on another node but has not reached this one yet; retry",
                spec.name, vhost.name
            )))
        }
        Resp::Refused(code, text) => Err(AmqpError::new(code, text)),
        other => Err(AmqpError::internal(format!(
            "unexpected answer registering queue '{}': {other:?}",
            spec.name
        ))),
    }
}

/// Registers an existing local queue again (after a same-node declare race).
pub fn reregister(broker: &Arc<Broker>, q: &QueueRef) {
    let Some(c) = clustered(broker) else { return };
    if q.home.is_some() || q.is_quorum() || q.is_stream() {
        return;
    }
    let Ok(arguments) = serde_json::to_vec(&q.arguments) else {
        return;
    };
    let def = ClassicDef {
        id: q.id,
        vhost: q.vhost.clone(),
        name: q.name.clone(),
        home: c.me.id,
        incarnation: c.me.incarnation,
        durable: q.durable,
        auto_delete: q.auto_delete,
        exclusive: q.exclusive_owner.is_some(),
        arguments,
    };
    propose_later(&c, Cmd::Meta(MetaCmd::DeclareClassic(def)));
}

/// The hook a classic queue actor calls when it deletes its queue:
/// unregisters it cluster-wide (when this node is clustered).
pub fn delete_hook(broker: &Arc<Broker>) -> Option<crate::queue::actor::DeleteHook> {
    let weak = Arc::downgrade(broker);
    Some(Arc::new(move |q: &QueueRef| {
        let Some(b) = weak.upgrade() else { return };
        let Some(c) = clustered(&b) else { return };
        if q.home.is_some() || q.is_quorum() || q.is_stream() {
            return;
        }
        c.classic.ingress.remove(&q.id);
        propose_later(
            &c,
            Cmd::Meta(MetaCmd::DeleteClassic {
                vhost: q.vhost.clone(),
                name: q.name.clone(),
                home: c.me.id,
                id: q.id,
                incarnation: None,
            }),
        );
    }))
}

/// Creates the proxy of another node's queue.
fn materialize(c: &Arc<Cluster>, def: &ClassicDef) {
    let Some(broker) = c.broker.upgrade() else {
        return;
    };
    let vhost = broker.vhost_or_create(&def.vhost);
    if let Some(q) = vhost.queue(&def.name) {
        match &q.home {
            Some(h) if h.node == def.home && h.id == def.id => return,
            Some(_) => {
                // Re-registered by its home (a new queue of that name).
                if let Some(old) = c
                    .classic
                    .proxies
                    .get(&(def.vhost.clone(), def.name.clone()))
                    .map(|p| p.clone())
                {
                    drop_proxy(c, &broker, &old);
                }
            }
            None => {
                warn!(queue = %def.name, vhost = %def.vhost, home = def.home, "a queue of this name exists on this node and on another one; the local one keeps the name here (delete one of them)");
                return;
            }
        }
    }
    let table: FieldTable = serde_json::from_slice(&def.arguments).unwrap_or_default();
    let args = crate::queue::args::QueueArgs::parse(&table, &def.name, &def.vhost)
        .unwrap_or_else(|e| {
            warn!(queue = %def.name, vhost = %def.vhost, "registered queue arguments are not valid here ({}); using defaults for the proxy", e.text);
            crate::queue::args::QueueArgs {
                queue_type: "classic".into(),
                ..Default::default()
            }
        });
    let node_name = c
        .nodes
        .get(&def.home)
        .map(|n| n.name.clone())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel(broker.config.queue.inbox_capacity.max(1));
    let home = QueueHome {
        node: def.home,
        node_name,
        id: def.id,
    };
    let q = Arc::new(
        QueueRef::new(
            broker.next_id(),
            def.name.clone(),
            def.vhost.clone(),
            def.durable,
            // Exclusive to a connection on another node: locked here.
            def.exclusive.then_some(u64::MAX),
            def.auto_delete,
            table,
            args,
            tx,
        )
        .with_home(home.clone()),
    );
    if !c.alive(def.home) {
        q.set_absent(true);
    }
    let proxy = Arc::new(Proxy {
        cluster: Arc::downgrade(c),
        home,
        q: Arc::downgrade(&q),
        links: DashMap::new(),
        last: Mutex::new(Counts::default()),
        home_inc: AtomicU64::new(0),
        down_since: AtomicU64::new(0),
    });
    c.classic
        .proxies
        .insert((def.vhost.clone(), def.name.clone()), proxy.clone());
    vhost.queues.insert(def.name.clone(), q);
    tokio::spawn(proxy.run(rx));
    debug!(queue = %def.name, vhost = %def.vhost, home = def.home, "proxy for a classic queue of another node");
}

/// Removes the proxy of a queue its home deleted.
fn dematerialize(c: &Arc<Cluster>, def: &ClassicDef) {
    let Some(broker) = c.broker.upgrade() else {
        return;
    };
    let Some(p) = c
        .classic
        .proxies
        .get(&(def.vhost.clone(), def.name.clone()))
        .map(|p| p.clone())
    else {
        return;
    };
    if p.home.node == def.home && p.home.id == def.id {
        drop_proxy(c, &broker, &p);
    }
}

fn drop_proxy(c: &Arc<Cluster>, broker: &Arc<Broker>, p: &Arc<Proxy>) {
    let Some(q) = p.q.upgrade() else { return };
    c.classic
        .proxies
        .remove_if(&(q.vhost.clone(), q.name.clone()), |_, v| Arc::ptr_eq(v, p));
    q.mark_deleted();
    if let Some(v) = broker.vhost(&q.vhost) {
        v.forget_queue(&q);
    }
    // The actor stops on this and cancels the consumers attached here.
    tokio::spawn(async move {
        let _ = q
            .send(QueueCmd::Delete {
                if_unused: false,
                if_empty: false,
                reply: None,
            })
            .await;
    });
}

/// The name of a proxy's home node (as best known now).
pub fn home_name(broker: &Broker, q: &QueueRef) -> String {
    let Some(h) = &q.home else {
        return crate::mgmt::api::node_name();
    };
    broker
        .cluster
        .get()
        .and_then(|c| c.nodes.get(&h.node).map(|n| n.name.clone()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| {
            if h.node_name.is_empty() {
                format!("node {}", h.node)
            } else {
                h.node_name.clone()
            }
        })
}

/// RabbitMQ's error for a queue whose home node is down.
pub fn home_down(broker: &Broker, q: &QueueRef) -> AmqpError {
    AmqpError::new(
        code::NOT_FOUND,
        format!(
            "home node '{}' of durable queue '{}' in vhost '{}' is down or inaccessible",
            home_name(broker, q),
            q.name,
            q.vhost
        ),
    )
}

/// For a proxy: Err(404) unless its home node is up.
pub fn check_home(broker: &Broker, q: &QueueRef) -> Result<(), AmqpError> {
    let Some(h) = &q.home else { return Ok(()) };
    let up = broker.cluster.get().is_some_and(|c| c.alive(h.node));
    // Routing follows at once (the proxy's own check runs every 250 ms).
    q.set_absent(!up);
    if up {
        Ok(())
    } else {
        Err(home_down(broker, q))
    }
}

// ---------------------------------------------------------------------------
// proxy (a node other than the home)

#[derive(Clone)]
struct Link {
    conn: ConnTx,
    channel: u16,
    tag: Arc<str>,
    conn_id: u64,
}

/// One client publish batch: messages and where to confirm them.
type PublishPart = (Vec<(Arc<Message>, u64)>, Option<ConfirmTo>);

/// The proxy of a queue living on another node.
pub struct Proxy {
    cluster: Weak<Cluster>,
    home: QueueHome,
    q: Weak<QueueRef>,
    /// Consumers on this node, by their id here.
    links: DashMap<u64, Link>,
    /// The home's last answer to Stats (shown while it is down).
    last: Mutex<Counts>,
    /// Boot id of the home when the consumers attached (a restart of the
    /// home loses them).
    home_inc: AtomicU64,
    /// Since when (ms) the failure detector has reported the home down
    /// (0: up).
    down_since: AtomicU64,
}

enum Answer {
    Reply(ClassicReply),
    /// The home could not be reached or did not answer.
    Unreachable(String),
}

impl Proxy {
    fn req(&self, c: &Cluster, op: ClassicOp) -> Option<Req> {
        let q = self.q.upgrade()?;
        Some(Req::Classic {
            vhost: q.vhost.clone(),
            name: q.name.clone(),
            id: self.home.id,
            incarnation: c.me.incarnation,
            op,
        })
    }

    fn peer(&self) -> Option<(Arc<Cluster>, Arc<Peer>)> {
        let c = self.cluster.upgrade()?;
        let p = c.peer_by_id(self.home.node)?;
        Some((c, p))
    }

    /// Sends without waiting for the answer.
    fn cast(&self, op: ClassicOp) {
        if let Some((c, p)) = self.peer()
            && let Some(req) = self.req(&c, op)
        {
            let _ = p.send_req(req);
        }
    }

    fn start(&self, op: ClassicOp) -> Option<oneshot::Receiver<Result<RespBody, String>>> {
        let (c, p) = self.peer()?;
        let req = self.req(&c, op)?;
        p.send_req(req)
    }

    async fn call(&self, op: ClassicOp) -> Answer {
        let Some(rx) = self.start(op) else {
            return Answer::Unreachable("not connected to the home node".into());
        };
        match tokio::time::timeout(CALL_TIMEOUT, rx).await {
            Ok(Ok(Ok(RespBody::Classic(r)))) => Answer::Reply(r),
            Ok(Ok(Ok(other))) => Answer::Unreachable(format!("unexpected answer {other:?}")),
            Ok(Ok(Err(e))) => Answer::Unreachable(e),
            Ok(Err(_)) => Answer::Unreachable("connection to the home node lost".into()),
            Err(_) => Answer::Unreachable(format!("no answer within {CALL_TIMEOUT:?}")),
        }
    }

    fn down_error(&self) -> AmqpError {
        match (
            self.q.upgrade(),
            self.cluster.upgrade().and_then(|c| c.broker.upgrade()),
        ) {
            (Some(q), Some(b)) => home_down(&b, &q),
            _ => AmqpError::new(code::NOT_FOUND, "queue's home node is down or inaccessible"),
        }
    }

    fn not_found(&self) -> AmqpError {
        match self.q.upgrade() {
            Some(q) => AmqpError::queue_not_found(&q.vhost, &q.name),
            None => AmqpError::new(code::NOT_FOUND, "no such queue"),
        }
    }

    /// A publish batch left the inbox.
    fn dequeued(&self, n: usize) {
        if let Some(q) = self.q.upgrade() {
            let _ = q
                .inflight
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                    Some(v.saturating_sub(n as u64))
                });
        }
    }

    async fn run(self: Arc<Self>, mut rx: mpsc::Receiver<QueueCmd>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let window = Arc::new(tokio::sync::Semaphore::new(PUBLISH_WINDOW));
        let mut stash: Option<QueueCmd> = None;
        loop {
            let cmd = match stash.take() {
                Some(c) => c,
                None => tokio::select! {
                    c = rx.recv() => match c {
                        Some(c) => c,
                        None => break,
                    },
                    _ = tick.tick() => {
                        self.check_home();
                        continue;
                    }
                },
            };
            match cmd {
                QueueCmd::Publish { msgs, confirm } => {
                    self.dequeued(msgs.len());
                    let permit = window.clone().acquire_owned().await.ok();
                    let mut n = msgs.len();
                    let mut bytes: usize = msgs.iter().map(|(m, _)| m.body.len() + 64).sum();
                    let mut parts: Vec<PublishPart> = vec![(msgs, confirm)];
                    while n < MAX_MSGS_PER_REQ && bytes < MAX_BYTES_PER_REQ {
                        let Ok(next) = rx.try_recv() else { break };
                        match next {
                            QueueCmd::Publish { msgs, confirm } => {
                                self.dequeued(msgs.len());
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
                    self.publish(parts, permit);
                }
                QueueCmd::Settle { mut ids, outcome } => {
                    while ids.len() < MAX_MSGS_PER_REQ {
                        let Ok(next) = rx.try_recv() else { break };
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
                    self.cast(ClassicOp::Settle {
                        ids,
                        outcome: wire_outcome(outcome),
                    });
                }
                other => {
                    if !self.handle(other).await {
                        break;
                    }
                }
            }
        }
        // Stopped (deleted): tell the consumers here.
        let links: Vec<(u64, Link)> = self
            .links
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        self.links.clear();
        for (id, l) in links {
            let _ = l.conn.send(ConnCmd::ConsumerCancelled {
                channel: l.channel,
                consumer: id,
                revoked: false,
            });
        }
    }

    /// Follows the home node: absent while it is down; consumers here are
    /// cancelled (basic.cancel) when it goes down or restarts.
    fn check_home(&self) {
        let (Some(c), Some(q)) = (self.cluster.upgrade(), self.q.upgrade()) else {
            return;
        };
        // One reading: boot id of the home, 0 while it is down.
        let now = c.incarnation(self.home.node);
        let up = now != 0;
        if up {
            self.down_since.store(0, Ordering::Relaxed);
        } else if self.down_since.load(Ordering::Relaxed) == 0 {
            self.down_since
                .store(super::net::now_ms().max(1), Ordering::Relaxed);
        }
        if up == q.is_absent() {
            if up {
                info!(queue = %q.name, vhost = %q.vhost, home = %home_name_of(&c, &self.home), "home node of this classic queue is reachable again");
            } else {
                warn!(queue = %q.name, vhost = %q.vhost, home = %home_name_of(&c, &self.home), "home node of this classic queue is down or unreachable: publishes to it are unroutable and its consumers on this node are cancelled until it is back");
            }
            q.set_absent(!up);
        }
        if self.links.is_empty() {
            return;
        }
        let at = self.home_inc.load(Ordering::Relaxed);
        let restarted = up && at != 0 && at != now;
        // Down for a second beyond the failure timeout: a home that is only
        // slow to answer (a loaded machine) does not cost its consumers.
        let since = self.down_since.load(Ordering::Relaxed);
        let gone = !up && since != 0 && super::net::now_ms().saturating_sub(since) >= 1000;
        if !restarted && !gone {
            return;
        }
        info!(queue = %q.name, vhost = %q.vhost, restarted, consumers = self.links.len(), "home node of this classic queue restarted or is down; cancelling its consumers on this node");
        let links: Vec<(u64, Link)> = self
            .links
            .iter()
            .map(|e| (*e.key(), e.value().clone()))
            .collect();
        self.links.clear();
        for (id, l) in links {
            let _ = l.conn.send(ConnCmd::ConsumerCancelled {
                channel: l.channel,
                consumer: id,
                revoked: true,
            });
            // In case the home is only slow, not gone: detach it there too.
            self.cast(ClassicOp::Cancel { local_id: id });
        }
    }

    /// Sends the publish batches `parts` as one request; confirms each
    /// part's publisher once the home answers. `permit` (a place in the
    /// window) is held until then.
    fn publish(&self, parts: Vec<PublishPart>, permit: Option<tokio::sync::OwnedSemaphorePermit>) {
        let mut wire: Vec<WireMsg> = Vec::new();
        let mut confirms: Vec<(u32, ConfirmTo)> = Vec::new();
        for (msgs, confirm) in parts {
            if let Some(c) = confirm {
                confirms.push((wire.len() as u32, c));
            }
            wire.extend(msgs.iter().map(|(m, _)| to_wire(m)));
        }
        let confirm = !confirms.is_empty();
        let rx = self.start(ClassicOp::Publish {
            msgs: wire,
            confirm,
        });
        let nack_all = |confirms: Vec<(u32, ConfirmTo)>| {
            for (_, c) in confirms {
                let _ = c.conn.send(ConnCmd::Confirm {
                    channel: c.channel,
                    seqs: c.seqs,
                    nack: true,
                });
            }
        };
        let Some(rx) = rx else {
            // Home not reachable: not enqueued, never confirmed.
            nack_all(confirms);
            return;
        };
        tokio::spawn(async move {
            let res = tokio::time::timeout(Duration::from_secs(60), rx).await;
            drop(permit);
            let nacked = match res {
                Ok(Ok(Ok(RespBody::Classic(ClassicReply::Published { nacked })))) => nacked,
                // Deleted meanwhile: gone with the queue, which RabbitMQ
                // confirms too.
                Ok(Ok(Ok(RespBody::Classic(ClassicReply::NoQueue | ClassicReply::Done)))) => {
                    Vec::new()
                }
                other => {
                    if confirm {
                        warn!(
                            "publish forwarded to a classic queue's home node not confirmed ({other:?}); publishers get basic.nack"
                        );
                    }
                    nack_all(confirms);
                    return;
                }
            };
            for (start, c) in confirms {
                c.settle(|i| nacked.contains(&(start + i as u32)));
            }
        });
    }

    /// Handles one command; false to stop.
    async fn handle(&self, cmd: QueueCmd) -> bool {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                self.dequeued(msgs.len());
                self.publish(vec![(msgs, confirm)], None);
            }
            QueueCmd::Consume {
                spec,
                conn,
                tag,
                reply,
                args,
            } => {
                let Some(c) = self.cluster.upgrade() else {
                    let _ = reply.send(Err(self.down_error()));
                    return true;
                };
                if !c.alive(self.home.node) {
                    let _ = reply.send(Err(self.down_error()));
                    return true;
                }
                let local = spec.id;
                if self.links.is_empty() {
                    self.home_inc
                        .store(c.incarnation(self.home.node), Ordering::Relaxed);
                }
                // Registered first: deliveries may arrive before the answer.
                self.links.insert(
                    local,
                    Link {
                        conn,
                        channel: spec.owner.channel,
                        tag: tag.clone(),
                        conn_id: spec.owner.conn,
                    },
                );
                let op = ClassicOp::Consume {
                    local_id: local,
                    conn: spec.owner.conn,
                    channel: spec.owner.channel,
                    tag: tag.to_string(),
                    prefetch: spec.prefetch,
                    no_ack: spec.no_ack,
                    exclusive: spec.exclusive,
                    flow_window: spec.flow_window,
                    args: serde_json::to_vec(&args).unwrap_or_default(),
                };
                let res = match self.call(op).await {
                    Answer::Reply(ClassicReply::Done) => Ok(()),
                    Answer::Reply(ClassicReply::Refused { code, text }) => Err(AmqpError {
                        code,
                        text,
                        class_id: 0,
                        method_id: 0,
                    }),
                    Answer::Reply(ClassicReply::NoQueue) => Err(self.not_found()),
                    Answer::Reply(other) => Err(AmqpError::internal(format!(
                        "unexpected answer from the queue's home node: {other:?}"
                    ))),
                    Answer::Unreachable(e) => {
                        debug!("consume through a proxy failed: {e}");
                        Err(self.down_error())
                    }
                };
                if let Err(e) = &res {
                    debug!(local, "consume through a proxy refused: {}", e.text);
                    self.links.remove(&local);
                    // The home may have attached it after all (an answer
                    // lost on the way): detach it there.
                    self.cast(ClassicOp::Cancel { local_id: local });
                }
                let _ = reply.send(res);
            }
            QueueCmd::Cancel { consumer, reply } => {
                self.links.remove(&consumer);
                let _ = self.call(ClassicOp::Cancel { local_id: consumer }).await;
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::Settle { ids, outcome } => self.cast(ClassicOp::Settle {
                ids,
                outcome: wire_outcome(outcome),
            }),
            QueueCmd::Get {
                owner,
                no_ack,
                reply,
            } => {
                let got = match self
                    .call(ClassicOp::Get {
                        conn: owner.conn,
                        channel: owner.channel,
                        no_ack,
                    })
                    .await
                {
                    Answer::Reply(ClassicReply::Got(Some(g))) => {
                        let remaining = g.remaining;
                        envelope(g).map(|e| (e, remaining))
                    }
                    _ => None,
                };
                let _ = reply.send(got);
            }
            QueueCmd::Credit { consumer, n } => self.cast(ClassicOp::Credit {
                local_id: consumer,
                n,
            }),
            QueueCmd::ChannelClosed { owner } => {
                self.links
                    .retain(|_, l| !(l.conn_id == owner.conn && l.channel == owner.channel));
                self.cast(ClassicOp::ChannelClosed {
                    conn: owner.conn,
                    channel: owner.channel,
                });
            }
            QueueCmd::Purge { reply } => {
                let n = match self.call(ClassicOp::Purge).await {
                    Answer::Reply(ClassicReply::Count(n)) => n,
                    _ => 0,
                };
                let _ = reply.send(n);
            }
            QueueCmd::Delete {
                if_unused,
                if_empty,
                reply,
            } => {
                let Some(reply) = reply else {
                    // Unregistered: this proxy goes.
                    return false;
                };
                let res = match self
                    .call(ClassicOp::Delete {
                        if_unused,
                        if_empty,
                    })
                    .await
                {
                    Answer::Reply(ClassicReply::Count(n)) => Ok(n),
                    Answer::Reply(ClassicReply::NoQueue) => Ok(0),
                    Answer::Reply(ClassicReply::Refused { code, text }) => {
                        let _ = reply.send(Err(AmqpError {
                            code,
                            text,
                            class_id: 0,
                            method_id: 0,
                        }));
                        return true;
                    }
                    Answer::Reply(other) => {
                        let _ = reply.send(Err(AmqpError::internal(format!(
                            "unexpected answer from the queue's home node: {other:?}"
                        ))));
                        return true;
                    }
                    Answer::Unreachable(_) => {
                        let _ = reply.send(Err(self.down_error()));
                        return true;
                    }
                };
                // Deleted at home (which unregisters it everywhere): gone
                // here now, not only once that reaches this node.
                if let (Some(c), Some(q)) = (self.cluster.upgrade(), self.q.upgrade()) {
                    c.classic
                        .proxies
                        .remove_if(&(q.vhost.clone(), q.name.clone()), |_, p| {
                            p.home.id == self.home.id && p.home.node == self.home.node
                        });
                    q.mark_deleted();
                    if let Some(v) = c.broker.upgrade().and_then(|b| b.vhost(&q.vhost)) {
                        v.forget_queue(&q);
                    }
                }
                let _ = reply.send(res);
                return false;
            }
            QueueCmd::Stats { reply } => {
                let up = self
                    .cluster
                    .upgrade()
                    .is_some_and(|c| c.alive(self.home.node));
                let counts = if up {
                    match self.call(ClassicOp::Stats).await {
                        Answer::Reply(ClassicReply::Stats {
                            ready,
                            unacked,
                            consumers,
                            ready_bytes,
                            in_memory,
                        }) => {
                            let c = Counts {
                                ready,
                                unacked,
                                consumers,
                                ready_bytes,
                                in_memory,
                            };
                            if let Ok(mut l) = self.last.lock() {
                                l.clone_from(&c);
                            }
                            Some(c)
                        }
                        _ => None,
                    }
                } else {
                    None
                };
                let counts = counts
                    .or_else(|| self.last.lock().ok().map(|l| *l))
                    .unwrap_or_default();
                let _ = reply.send(counts);
            }
            QueueCmd::Touch => self.cast(ClassicOp::Touch),
            QueueCmd::Kick | QueueCmd::PolicyChanged => {}
            QueueCmd::Peek { count, reply } => {
                let out = match self
                    .call(ClassicOp::Peek {
                        count: count.min(u32::MAX as usize) as u32,
                    })
                    .await
                {
                    Answer::Reply(ClassicReply::Peeked(v)) => v
                        .into_iter()
                        .filter_map(|(w, r)| from_wire(w).map(|m| (Arc::new(m), r)))
                        .collect(),
                    _ => Vec::new(),
                };
                let _ = reply.send(out);
            }
            QueueCmd::Consumers { reply } => {
                let infos = self
                    .links
                    .iter()
                    .map(|l| crate::queue::ConsumerInfo {
                        tag: l.tag.to_string(),
                        channel: l.channel,
                        conn: l.conn.clone(),
                    })
                    .collect();
                let _ = reply.send(infos);
            }
            QueueCmd::SaveSnapshot { reply } => {
                let _ = reply.send(());
            }
        }
        true
    }
}

fn home_name_of(c: &Cluster, h: &QueueHome) -> String {
    c.nodes
        .get(&h.node)
        .map(|n| n.name.clone())
        .unwrap_or_else(|| h.node_name.clone())
}

/// An event from a queue's home for a proxy on this node (served inline,
/// in arrival order).
pub fn event(
    c: &Arc<Cluster>,
    (vhost, name, id): (String, String, u64),
    incarnation: u64,
    ev: ClassicEvent,
) -> RespBody {
    let gone = RespBody::Classic(ClassicReply::NoQueue);
    if incarnation != c.me.incarnation {
        return gone;
    }
    let Some(p) = c.classic.proxies.get(&(vhost, name)).map(|p| p.clone()) else {
        return gone;
    };
    if p.home.id != id {
        return gone;
    }
    match ev {
        ClassicEvent::Deliver { local_id, msgs } => {
            let Some(q) = p.q.upgrade() else { return gone };
            let Some(link) = p.links.get(&local_id).map(|l| l.clone()) else {
                return RespBody::Classic(ClassicReply::Refused {
                    code: code::NOT_FOUND,
                    text: "no such consumer on this node".into(),
                });
            };
            let envs: Vec<Envelope> = msgs.into_iter().filter_map(envelope).collect();
            let sent = link.conn.send(ConnCmd::Deliver {
                channel: link.channel,
                consumer: local_id,
                tag: link.tag.clone(),
                queue: q,
                msgs: envs,
            });
            if sent.is_err() {
                p.links.remove(&local_id);
                return RespBody::Classic(ClassicReply::Refused {
                    code: code::NOT_FOUND,
                    text: "the consumer's connection is gone".into(),
                });
            }
            RespBody::Classic(ClassicReply::Done)
        }
        ClassicEvent::Cancelled { local_id, revoked } => {
            if let Some((_, l)) = p.links.remove(&local_id) {
                let _ = l.conn.send(ConnCmd::ConsumerCancelled {
                    channel: l.channel,
                    consumer: local_id,
                    revoked,
                });
            }
            RespBody::Classic(ClassicReply::Done)
        }
    }
}

// ---------------------------------------------------------------------------
// home

type Answerer = Box<dyn FnOnce(ClassicReply) + Send>;

struct Ingress {
    from: Origin,
    op: ClassicOp,
    answer: Answerer,
}

/// A request from a proxy for a queue living here (served inline: handed
/// to the queue's ingress task, which keeps the arrival order).
pub fn serve(
    c: &Arc<Cluster>,
    from: Origin,
    (vhost, name, id): (String, String, u64),
    op: ClassicOp,
    rid: u64,
    reply: mpsc::UnboundedSender<Frame>,
) {
    let answer: Answerer = Box::new(move |r: ClassicReply| {
        let _ = reply.send(Frame::Resp {
            rid,
            resp: Ok(RespBody::Classic(r)),
        });
    });
    let q = c
        .broker
        .upgrade()
        .and_then(|b| b.vhost(&vhost))
        .and_then(|v| v.queue(&name))
        .filter(|q| q.id == id && q.home.is_none() && !q.is_deleted());
    let Some(q) = q else {
        answer(ClassicReply::NoQueue);
        return;
    };
    let item = Ingress { from, op, answer };
    let tx = c.classic.ingress.get(&q.id).map(|t| t.clone());
    let item = match tx {
        Some(tx) => match tx.send(item) {
            Ok(()) => return,
            Err(mpsc::error::SendError(item)) => item,
        },
        None => item,
    };
    let (tx, rx) = mpsc::unbounded_channel();
    let _ = tx.send(item);
    c.classic.ingress.insert(q.id, tx);
    tokio::spawn(ingress(Arc::downgrade(c), Arc::downgrade(&q), rx));
}

/// Hands remote commands to one queue's inbox in arrival order. The
/// backlog here is bounded by the proxies' publish windows.
async fn ingress(c: Weak<Cluster>, q: Weak<QueueRef>, mut rx: mpsc::UnboundedReceiver<Ingress>) {
    while let Some(item) = rx.recv().await {
        let (Some(c), Some(q)) = (c.upgrade(), q.upgrade()) else {
            (item.answer)(ClassicReply::NoQueue);
            continue;
        };
        if q.is_deleted() {
            (item.answer)(ClassicReply::NoQueue);
            continue;
        }
        let Some(broker) = c.broker.upgrade() else {
            (item.answer)(ClassicReply::NoQueue);
            continue;
        };
        home_op(&c, &broker, &q, item).await;
    }
}

/// A relay: stands for the consumers and channels of one other node (boot)
/// at the queues living here.
struct Remote {
    origin: Origin,
    /// The inbox queue actors deliver to.
    tx: ConnTx,
    /// Connection ids there → ids here.
    conns: DashMap<u64, u64>,
    /// Consumer ids here → (queue, consumer id there, channel).
    consumers: DashMap<u64, RemoteConsumer>,
    /// (queue id here, consumer id there) → consumer id here.
    by_local: DashMap<(u64, u64), u64>,
    /// Queues and channels used, to close them when the node goes.
    used: Mutex<Vec<(Weak<QueueRef>, Owner)>>,
}

#[derive(Clone)]
struct RemoteConsumer {
    q: Weak<QueueRef>,
    local_id: u64,
    owner: Owner,
}

impl Remote {
    fn owner(&self, broker: &Broker, conn: u64, channel: u16) -> Owner {
        let conn = *self
            .conns
            .entry(conn)
            .or_insert_with(|| broker.next_id())
            .value();
        Owner { conn, channel }
    }

    fn uses(&self, q: &Arc<QueueRef>, owner: Owner) {
        if let Ok(mut u) = self.used.lock() {
            let known = u
                .iter()
                .any(|(w, o)| *o == owner && w.upgrade().is_some_and(|x| x.id == q.id));
            if !known {
                u.retain(|(w, _)| w.strong_count() > 0);
                u.push((Arc::downgrade(q), owner));
            }
        }
    }

    fn forget_consumer(&self, cid: u64) {
        if let Some((_, rc)) = self.consumers.remove(&cid)
            && let Some(q) = rc.q.upgrade()
        {
            self.by_local.remove(&(q.id, rc.local_id));
        }
    }
}

impl Registry {
    fn remote(&self, c: &Arc<Cluster>, origin: Origin) -> Arc<Remote> {
        if let Some(r) = self.remotes.get(&origin) {
            return r.clone();
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let r = Arc::new(Remote {
            origin,
            tx,
            conns: DashMap::new(),
            consumers: DashMap::new(),
            by_local: DashMap::new(),
            used: Mutex::new(Vec::new()),
        });
        self.remotes
            .entry(origin)
            .or_insert_with(|| {
                tokio::spawn(relay(Arc::downgrade(c), r.clone(), rx));
                r.clone()
            })
            .clone()
    }
}

async fn home_op(c: &Arc<Cluster>, broker: &Arc<Broker>, q: &Arc<QueueRef>, item: Ingress) {
    let Ingress { from, op, answer } = item;
    let gone = |answer: Answerer| answer(ClassicReply::NoQueue);
    match op {
        ClassicOp::Publish { msgs, confirm } => {
            home_publish(broker, q, msgs, confirm, answer).await;
        }
        ClassicOp::Consume {
            local_id,
            conn,
            channel,
            tag,
            prefetch,
            no_ack,
            exclusive,
            flow_window,
            args,
        } => {
            let r = c.classic.remote(c, from);
            let owner = r.owner(broker, conn, channel);
            r.uses(q, owner);
            let cid = broker.next_id();
            r.consumers.insert(
                cid,
                RemoteConsumer {
                    q: Arc::downgrade(q),
                    local_id,
                    owner,
                },
            );
            r.by_local.insert((q.id, local_id), cid);
            let args: FieldTable = serde_json::from_slice(&args).unwrap_or_default();
            let spec = ConsumerSpec {
                id: cid,
                owner,
                prefetch,
                no_ack,
                exclusive,
                // basic.qos global is per channel, on the consumer's node:
                // not enforced across nodes.
                shared: None,
                flow_window,
                priority: 0,
                timeout: None,
            };
            let (tx, rx) = oneshot::channel();
            let sent = q
                .send(QueueCmd::Consume {
                    spec,
                    conn: r.tx.clone(),
                    tag: tag.into(),
                    reply: tx,
                    args,
                })
                .await;
            if !sent {
                r.forget_consumer(cid);
                return gone(answer);
            }
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(())) => answer(ClassicReply::Done),
                    Ok(Err(e)) => {
                        r.forget_consumer(cid);
                        answer(ClassicReply::Refused {
                            code: e.code,
                            text: e.text,
                        })
                    }
                    Err(_) => {
                        r.forget_consumer(cid);
                        answer(ClassicReply::NoQueue)
                    }
                }
            });
        }
        ClassicOp::Cancel { local_id } => {
            debug!(queue = %q.name, node = from.node, local_id, "consumer on another node cancelled");
            let r = c.classic.remote(c, from);
            let Some((_, cid)) = r.by_local.remove(&(q.id, local_id)) else {
                return answer(ClassicReply::Done);
            };
            r.consumers.remove(&cid);
            let (tx, rx) = oneshot::channel();
            if !q
                .send(QueueCmd::Cancel {
                    consumer: cid,
                    reply: Some(tx),
                })
                .await
            {
                return gone(answer);
            }
            tokio::spawn(async move {
                let _ = rx.await;
                answer(ClassicReply::Done);
            });
        }
        ClassicOp::Settle { ids, outcome: o } => {
            let o = outcome(o);
            if o == Outcome::Ack {
                q.metrics
                    .acked
                    .fetch_add(ids.len() as u64, Ordering::Relaxed);
            }
            let _ = q.send(QueueCmd::Settle { ids, outcome: o }).await;
            answer(ClassicReply::Done);
        }
        ClassicOp::Credit { local_id, n } => {
            let cid = c
                .classic
                .remotes
                .get(&from)
                .and_then(|r| r.by_local.get(&(q.id, local_id)).map(|x| *x));
            if let Some(cid) = cid {
                let _ = q.send(QueueCmd::Credit { consumer: cid, n }).await;
            }
            answer(ClassicReply::Done);
        }
        ClassicOp::Get {
            conn,
            channel,
            no_ack,
        } => {
            let r = c.classic.remote(c, from);
            let owner = r.owner(broker, conn, channel);
            r.uses(q, owner);
            let (tx, rx) = oneshot::channel();
            if !q
                .send(QueueCmd::Get {
                    owner,
                    no_ack,
                    reply: tx,
                })
                .await
            {
                return gone(answer);
            }
            tokio::spawn(async move {
                let got = rx.await.ok().flatten().and_then(|(env, remaining)| {
                    let m = env.msg.as_deref()?;
                    Some(GotMsg {
                        id: env.id,
                        redelivered: env.redelivered,
                        delivery_count: env.delivery_count,
                        msg: to_wire(m),
                        remaining,
                    })
                });
                answer(ClassicReply::Got(got));
            });
        }
        ClassicOp::ChannelClosed { conn, channel } => {
            debug!(queue = %q.name, node = from.node, conn, channel, "channel on another node closed");
            if let Some(r) = c.classic.remotes.get(&from).map(|r| r.clone())
                && let Some(hc) = r.conns.get(&conn).map(|x| *x)
            {
                let owner = Owner { conn: hc, channel };
                let gone_consumers: Vec<u64> = r
                    .consumers
                    .iter()
                    .filter(|e| e.owner == owner && e.q.upgrade().is_some_and(|x| x.id == q.id))
                    .map(|e| *e.key())
                    .collect();
                for cid in gone_consumers {
                    r.forget_consumer(cid);
                }
                if let Ok(mut u) = r.used.lock() {
                    u.retain(|(w, o)| w.upgrade().is_some_and(|x| !(x.id == q.id && *o == owner)));
                    if !u.iter().any(|(_, o)| o.conn == hc) {
                        r.conns.remove(&conn);
                    }
                }
                let _ = q.send(QueueCmd::ChannelClosed { owner }).await;
            }
            answer(ClassicReply::Done);
        }
        ClassicOp::Purge => {
            let (tx, rx) = oneshot::channel();
            if !q.send(QueueCmd::Purge { reply: tx }).await {
                return gone(answer);
            }
            tokio::spawn(async move {
                answer(ClassicReply::Count(rx.await.unwrap_or(0)));
            });
        }
        ClassicOp::Delete {
            if_unused,
            if_empty,
        } => {
            let (tx, rx) = oneshot::channel();
            if !q
                .send(QueueCmd::Delete {
                    if_unused,
                    if_empty,
                    reply: Some(tx),
                })
                .await
            {
                return gone(answer);
            }
            tokio::spawn(async move {
                match rx.await {
                    Ok(Ok(n)) => answer(ClassicReply::Count(n)),
                    Ok(Err(e)) => answer(ClassicReply::Refused {
                        code: e.code,
                        text: e.text,
                    }),
                    Err(_) => answer(ClassicReply::NoQueue),
                }
            });
        }
        ClassicOp::Stats => {
            let (tx, rx) = oneshot::channel();
            if !q.send(QueueCmd::Stats { reply: tx }).await {
                return gone(answer);
            }
            tokio::spawn(async move {
                match rx.await {
                    Ok(c) => answer(ClassicReply::Stats {
                        ready: c.ready,
                        unacked: c.unacked,
                        consumers: c.consumers,
                        ready_bytes: c.ready_bytes,
                        in_memory: c.in_memory,
                    }),
                    Err(_) => answer(ClassicReply::NoQueue),
                }
            });
        }
        ClassicOp::Touch => {
            let _ = q.send(QueueCmd::Touch).await;
            answer(ClassicReply::Done);
        }
        ClassicOp::Peek { count } => {
            let (tx, rx) = oneshot::channel();
            if !q
                .send(QueueCmd::Peek {
                    count: count as usize,
                    reply: tx,
                })
                .await
            {
                return gone(answer);
            }
            tokio::spawn(async move {
                let v = rx
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(m, r)| (to_wire(&m), r))
                    .collect();
                answer(ClassicReply::Peeked(v));
            });
        }
    }
}

/// Enqueues a forwarded publish batch: persistent messages of a durable
/// queue go to the store first (as the publishing connection does for
/// local publishers); with `confirm` the answer waits for the queue's
/// confirm and each stored message's group commit.
async fn home_publish(
    broker: &Arc<Broker>,
    q: &Arc<QueueRef>,
    msgs: Vec<WireMsg>,
    confirm: bool,
    answer: Answerer,
) {
    let (ctx, mut crx) = mpsc::unbounded_channel::<ConnCmd>();
    let mut nacked: Vec<u32> = Vec::new();
    let mut batch: Vec<(Arc<Message>, u64)> = Vec::with_capacity(msgs.len());
    let mut seqs: Vec<u64> = Vec::with_capacity(msgs.len());
    let mut stored: u64 = 0;
    for (i, w) in msgs.into_iter().enumerate() {
        let Some(m) = from_wire(w) else {
            warn!(queue = %q.name, vhost = %q.vhost, "a message forwarded by another node has undecodable properties; refused (basic.nack)");
            nacked.push(i as u32);
            continue;
        };
        let m = Arc::new(m);
        let mut gid = 0;
        if m.is_persistent()
            && q.uses_message_store()
            && let Some(st) = &broker.storage
        {
            gid = broker.next_gid();
            let done: Option<crate::store::Completion> = confirm.then(|| {
                let tx = ctx.clone();
                Box::new(move |r: Result<(), crate::store::StoreError>| {
                    if let Err(e) = &r {
                        error!("persisting a forwarded message failed, its publisher gets basic.nack: {e}");
                    }
                    let _ = tx.send(ConnCmd::Confirm {
                        channel: 0,
                        seqs: vec![i as u64],
                        nack: r.is_err(),
                    });
                }) as crate::store::Completion
            });
            match st.msgs.append(gid, vec![q.id], m.parts(), done).await {
                Ok(()) => stored += u64::from(confirm),
                Err(e) => {
                    error!(queue = %q.name, "cannot persist a forwarded message: {e}");
                    nacked.push(i as u32);
                    gid = 0;
                }
            }
        }
        seqs.push(i as u64);
        batch.push((m, gid));
    }
    let n = batch.len() as u64;
    q.metrics.published.fetch_add(n, Ordering::Relaxed);
    q.inflight.fetch_add(n, Ordering::Relaxed);
    let confirm_to = confirm.then(|| ConfirmTo {
        conn: ctx.clone(),
        channel: 0,
        seqs,
    });
    drop(ctx);
    let sent = q
        .send(QueueCmd::Publish {
            msgs: batch,
            confirm: confirm_to,
        })
        .await;
    if !confirm {
        return answer(if sent {
            ClassicReply::Done
        } else {
            ClassicReply::NoQueue
        });
    }
    let expected = n + stored;
    tokio::spawn(async move {
        let mut got = 0;
        while got < expected {
            match crx.recv().await {
                Some(ConnCmd::Confirm { seqs, nack, .. }) => {
                    got += seqs.len() as u64;
                    if nack {
                        nacked.extend(seqs.into_iter().map(|s| s as u32));
                    }
                }
                Some(_) => {}
                // Every party is done or gone (a deleted queue drops its
                // confirm target: gone with the queue, confirmed).
                None => break,
            }
        }
        nacked.sort_unstable();
        nacked.dedup();
        answer(ClassicReply::Published { nacked });
    });
}

/// The connection to `node`, waiting (up to 5 s) for it to be up: just
/// after this node started, or after a blip, it may still be connecting.
async fn connected_peer(c: &Arc<Cluster>, node: NodeId) -> Option<Arc<Peer>> {
    for _ in 0..100 {
        if let Some(p) = c.peer_by_id(node)
            && p.alive(c.cfg.failure_timeout_ms)
        {
            return Some(p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Tells a consumer's node that the home detached it (no answer awaited).
fn tell_cancelled(c: &Arc<Cluster>, to: Origin, q: &QueueRef, local_id: u64, revoked: bool) {
    let req = Req::ClassicEvent {
        vhost: q.vhost.clone(),
        name: q.name.clone(),
        id: q.id,
        incarnation: to.incarnation,
        ev: ClassicEvent::Cancelled { local_id, revoked },
    };
    if let Some(p) = c.peer_by_id(to.node) {
        let _ = p.send_req(req);
    }
}

/// Ships what queues here send to another node's consumers, and cleans up
/// after that node when it restarts or stops answering.
async fn relay(c: Weak<Cluster>, r: Arc<Remote>, mut rx: mpsc::UnboundedReceiver<ConnCmd>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut mismatch_since: Option<std::time::Instant> = None;
    loop {
        let cmd = tokio::select! {
            cmd = rx.recv() => match cmd {
                Some(cmd) => cmd,
                None => return,
            },
            _ = tick.tick() => {
                let Some(cl) = c.upgrade() else { return };
                let inc = cl.incarnation(r.origin.node);
                if inc == r.origin.incarnation {
                    mismatch_since = None;
                    continue;
                }
                // Restarted (another boot id answers): at once. Not
                // answering: after REMOTE_GONE_AFTER, so that a node that
                // is only slow (a loaded machine, a short partition) keeps
                // its consumers.
                let since = *mismatch_since.get_or_insert_with(std::time::Instant::now);
                let wait = if inc == 0 {
                    REMOTE_GONE_AFTER
                } else {
                    Duration::from_millis(500)
                };
                if since.elapsed() < wait {
                    continue;
                }
                info!(node = r.origin.node, "a node with consumers or channels on classic queues here restarted or stopped answering; returning what it held");
                cl.classic.remotes.remove_if(&r.origin, |_, v| Arc::ptr_eq(v, &r));
                // Best effort (it may be alive behind a slow link): its
                // consumers get basic.cancel rather than silence.
                let consumers: Vec<RemoteConsumer> =
                    r.consumers.iter().map(|e| e.value().clone()).collect();
                for rc in consumers {
                    if let Some(q) = rc.q.upgrade() {
                        tell_cancelled(&cl, r.origin, &q, rc.local_id, true);
                    }
                }
                let used: Vec<(Weak<QueueRef>, Owner)> =
                    r.used.lock().map(|u| u.clone()).unwrap_or_default();
                for (q, owner) in used {
                    if let Some(q) = q.upgrade() {
                        let _ = q.send(QueueCmd::ChannelClosed { owner }).await;
                    }
                }
                r.consumers.clear();
                r.by_local.clear();
                return;
            }
        };
        let Some(cl) = c.upgrade() else { return };
        match cmd {
            ConnCmd::Deliver {
                consumer,
                queue,
                msgs,
                ..
            } => {
                let ids: Vec<u64> = msgs.iter().map(|e| e.id).collect();
                let Some(rc) = r.consumers.get(&consumer).map(|x| x.clone()) else {
                    let _ = queue
                        .send(QueueCmd::Settle {
                            ids,
                            outcome: Outcome::Undeliverable,
                        })
                        .await;
                    continue;
                };
                queue
                    .metrics
                    .delivered
                    .fetch_add(msgs.len() as u64, Ordering::Relaxed);
                let got: Vec<GotMsg> = msgs
                    .iter()
                    .filter_map(|e| {
                        let m = e.msg.as_deref()?;
                        Some(GotMsg {
                            id: e.id,
                            redelivered: e.redelivered,
                            delivery_count: e.delivery_count,
                            msg: to_wire(m),
                            remaining: 0,
                        })
                    })
                    .collect();
                let req = Req::ClassicEvent {
                    vhost: queue.vhost.clone(),
                    name: queue.name.clone(),
                    id: queue.id,
                    incarnation: r.origin.incarnation,
                    ev: ClassicEvent::Deliver {
                        local_id: rc.local_id,
                        msgs: got,
                    },
                };
                let call = match connected_peer(&cl, r.origin.node).await {
                    Some(p) => p.send_req(req),
                    None => None,
                };
                let r2 = r.clone();
                let weak = c.clone();
                let local_id = rc.local_id;
                tokio::spawn(async move {
                    let ok = match call {
                        Some(rx) => matches!(
                            tokio::time::timeout(Duration::from_secs(30), rx).await,
                            Ok(Ok(Ok(RespBody::Classic(ClassicReply::Done))))
                        ),
                        None => false,
                    };
                    if !ok {
                        // Not delivered: back to the queue, and the
                        // consumer is gone.
                        debug!(queue = %queue.name, "deliveries to a consumer on another node failed; returning them and detaching the consumer");
                        r2.forget_consumer(consumer);
                        let _ = queue
                            .send(QueueCmd::Settle {
                                ids,
                                outcome: Outcome::Undeliverable,
                            })
                            .await;
                        let _ = queue
                            .send(QueueCmd::Cancel {
                                consumer,
                                reply: None,
                            })
                            .await;
                        // Best effort: its node (if it hears this) sends
                        // basic.cancel instead of leaving it waiting.
                        if let Some(cl) = weak.upgrade() {
                            tell_cancelled(&cl, r2.origin, &queue, local_id, true);
                        }
                    }
                });
            }
            ConnCmd::ConsumerCancelled {
                consumer, revoked, ..
            } => {
                let Some(rc) = r.consumers.get(&consumer).map(|x| x.clone()) else {
                    continue;
                };
                r.forget_consumer(consumer);
                let Some(q) = rc.q.upgrade() else { continue };
                tell_cancelled(&cl, r.origin, &q, rc.local_id, revoked);
            }
            // Confirms use their own per-batch inbox; the rest is not for
            // remote consumers.
            ConnCmd::Confirm { .. } | ConnCmd::DirectReply { .. } | ConnCmd::ForceClose { .. } => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(home: NodeId, id: u64, incarnation: u64) -> ClassicDef {
        ClassicDef {
            id,
            vhost: "/".into(),
            name: "q".into(),
            home,
            incarnation,
            durable: true,
            auto_delete: false,
            exclusive: false,
            arguments: b"{}".to_vec(),
        }
    }

    #[test]
    fn the_first_home_keeps_the_name_and_may_replace_its_own_entry() {
        let mut m = BTreeMap::new();
        let (r, e) = apply_declare(&mut m, false, def(1, 10, 100));
        assert!(matches!(r, Resp::Count(1)) && matches!(e, Some(Effect::Create(_))));
        // Another node: told who has it, nothing changes.
        let (r, e) = apply_declare(&mut m, false, def(2, 7, 200));
        assert!(matches!(r, Resp::Count(1)) && e.is_none());
        assert_eq!(m.values().next().map(|d| d.id), Some(10));
        // The same registration again: no effect.
        let (_, e) = apply_declare(&mut m, false, def(1, 10, 100));
        assert!(e.is_none());
        // Its home re-registers (a new queue of that name): replaced.
        let (r, e) = apply_declare(&mut m, false, def(1, 11, 101));
        assert!(matches!(r, Resp::Count(1)) && matches!(e, Some(Effect::Create(_))));
        // Taken by a quorum queue or stream: refused.
        let (r, _) = apply_declare(&mut BTreeMap::new(), true, def(1, 1, 1));
        assert!(matches!(r, Resp::Refused(406, _)));
    }

    #[test]
    fn a_delete_applies_only_to_the_registered_home_id_and_boot() {
        let mut m = BTreeMap::new();
        apply_declare(&mut m, false, def(1, 11, 101));
        let del = |m: &mut BTreeMap<_, _>, home, id, inc| {
            apply_delete(m, "/".into(), "q".into(), home, id, inc)
        };
        assert!(del(&mut m, 2, 11, None).is_none());
        assert!(del(&mut m, 1, 10, None).is_none());
        // A stale cleanup from an earlier boot leaves the new entry alone.
        assert!(del(&mut m, 1, 11, Some(100)).is_none());
        assert!(matches!(
            del(&mut m, 1, 11, Some(101)),
            Some(Effect::Delete(_))
        ));
        assert!(m.is_empty());
        apply_declare(&mut m, false, def(1, 12, 102));
        assert!(matches!(del(&mut m, 1, 12, None), Some(Effect::Delete(_))));
    }
}
