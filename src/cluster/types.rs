//! What travels through Raft: the command and response types of every group
//! (the metadata group and each quorum queue), and openraft's type config.

use serde::{Deserialize, Serialize};
use std::io::Cursor;

/// A node's Raft id: derived from its node name, so it is stable across
/// restarts and the same on every node.
pub type NodeId = u64;

/// Raft group name: [`META_GROUP`] or `q/<vhost>/<queue>#<id>`.
pub type GroupId = String;

/// The metadata group every node belongs to.
pub const META_GROUP: &str = "meta";

/// What a Raft member record carries about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Node name (warren@host).
    pub name: String,
    /// Inter-node address (host:port).
    pub addr: String,
}

impl std::fmt::Display for NodeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name, self.addr)
    }
}

openraft::declare_raft_types!(
    /// Warren's Raft types.
    pub TypeConfig:
        D = Cmd,
        R = Resp,
        NodeId = NodeId,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
);

/// The Raft handle of one group.
pub type Raft = openraft::Raft<TypeConfig>;

/// The stable id of a node name (FNV-1a, 64 bit; never 0).
pub fn node_id(name: &str) -> NodeId {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h.max(1)
}

/// A replicated command.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Cmd {
    /// For the metadata group.
    Meta(MetaCmd),
    /// For a quorum queue's group; `now` is the proposer's clock (ms since
    /// the epoch) so every replica applies the same time.
    Queue {
        /// Proposer's clock.
        now: u64,
        /// What to do.
        op: QOp,
    },
}

impl std::fmt::Display for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Meta(m) => write!(f, "meta {m:?}"),
            Cmd::Queue { op, .. } => write!(f, "queue {}", op.name()),
        }
    }
}

/// A quorum queue's definition, as the metadata group keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuorumDef {
    /// Broker-wide queue id (chosen by the metadata leader).
    pub id: u64,
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Declare arguments in AMQP field-table wire form.
    pub arguments: Vec<u8>,
    /// Replica nodes; the first is where the group is initialised.
    pub members: Vec<NodeId>,
}

impl QuorumDef {
    /// Its Raft group name.
    pub fn group(&self) -> GroupId {
        format!("q/{}/{}#{}", self.vhost, self.name, self.id)
    }
}

/// Metadata commands.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaCmd {
    /// Create a quorum queue (no-op if one of that name exists).
    DeclareQuorum(QuorumDef),
    /// Delete a quorum queue.
    DeleteQuorum {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
    },
    /// A definition change (vhost, exchange, binding, user, permission,
    /// policy) made on `origin`, for every other node to apply.
    Defs {
        /// Node that made it (already applied there).
        origin: NodeId,
        /// What.
        change: crate::store::defs::DefChange,
    },
    /// Change a quorum queue's replica set (after the queue group's own
    /// membership change committed).
    SetMembers {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
        /// New replica set.
        members: Vec<NodeId>,
    },
    /// Create a replicated stream (no-op if a queue of that name exists).
    DeclareStream(StreamDef),
    /// Delete a replicated stream everywhere.
    DeleteStream {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
    },
    /// A stream's new leader after its old one's node went down: applied
    /// only if the stream still has id `id` and epoch `epoch - 1`.
    StreamLeader {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
        /// Stream id.
        id: u64,
        /// New leader.
        leader: NodeId,
        /// New epoch.
        epoch: u32,
    },
    /// Register a classic queue living on `home` (see `cluster::classic`).
    /// A name registered with another home keeps that one; the same home
    /// re-registering replaces its entry. Answers `Resp::Count(home)` of
    /// the registered entry.
    DeclareClassic(ClassicDef),
    /// Unregister a classic queue (deleted on its home node): applied only
    /// if the registered entry has this home and id (and, when given, was
    /// registered in that incarnation of its home).
    DeleteClassic {
        /// Vhost.
        vhost: String,
        /// Name.
        name: String,
        /// Home node.
        home: NodeId,
        /// Queue id on the home node.
        id: u64,
        /// Only if registered by this boot of the home node.
        incarnation: Option<u64>,
    },
}

/// A classic queue as the metadata group keeps it: it lives on `home`;
/// every other node has a proxy forwarding to it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClassicDef {
    /// Queue id on the home node.
    pub id: u64,
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// The node it lives on.
    pub home: NodeId,
    /// Boot id of the home node when it registered the queue (a transient
    /// queue does not survive that boot).
    pub incarnation: u64,
    /// Survives a restart of its home node.
    pub durable: bool,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Exclusive to a connection on its home node (registered only so the
    /// name is taken cluster-wide).
    pub exclusive: bool,
    /// Declare arguments (JSON of the AMQP field table).
    pub arguments: Vec<u8>,
}

/// A replicated stream queue's definition, as the metadata group keeps it.
/// Every member keeps a copy of the log; `leader` appends and ships chunks
/// to the others. `epoch` grows with every leader change (the leader
/// stamps it into the chunks it writes).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StreamDef {
    /// Broker-wide queue id (chosen by the declaring node).
    pub id: u64,
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Declare arguments (JSON of the AMQP field table).
    pub arguments: Vec<u8>,
    /// Replica nodes.
    pub members: Vec<NodeId>,
    /// The member that appends.
    pub leader: NodeId,
    /// Leader epoch (1 at declare).
    pub epoch: u32,
}

impl StreamDef {
    /// Its name in inter-node requests (`s/<vhost>/<name>#<id>`).
    pub fn group(&self) -> GroupId {
        format!("s/{}/{}#{}", self.vhost, self.name, self.id)
    }
}

/// Where a quorum queue consumer or channel lives: node, its incarnation
/// (boot id) and the connection and channel there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RemoteOwner {
    /// Node.
    pub node: NodeId,
    /// Boot id of that node.
    pub incarnation: u64,
    /// Connection id on that node.
    pub conn: u64,
    /// Channel number.
    pub channel: u16,
}

/// A message as the Raft log stores it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireMsg {
    /// Exchange.
    #[serde(with = "serde_bytes")]
    pub exchange: Vec<u8>,
    /// Routing key.
    #[serde(with = "serde_bytes")]
    pub routing_key: Vec<u8>,
    /// Content properties in wire form.
    #[serde(with = "serde_bytes")]
    pub properties: Vec<u8>,
    /// Body.
    #[serde(with = "serde_bytes")]
    pub body: Vec<u8>,
}

/// How deliveries are settled (mirrors queue::core::Outcome).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub enum WireOutcome {
    /// basic.ack.
    Ack,
    /// nack/reject with requeue.
    Requeue,
    /// nack/reject without requeue (dead-lettered).
    Discard,
    /// Returned without a nack (channel closed, consumer timeout).
    Return,
    /// Reached a consumer that no longer existed.
    Undeliverable,
}

/// Quorum queue operations (applied to the queue core on every replica).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QOp {
    /// Publish.
    Enqueue(Vec<WireMsg>),
    /// Attach a consumer.
    Consume {
        /// Its channel.
        owner: RemoteOwner,
        /// Its id on its node.
        local_id: u64,
        /// Consumer tag.
        tag: String,
        /// basic.qos prefetch.
        prefetch: u32,
        /// Auto-ack.
        no_ack: bool,
        /// Exclusive consumer.
        exclusive: bool,
        /// x-priority.
        priority: i32,
        /// Consumer timeout (ms).
        timeout: Option<u64>,
    },
    /// Detach a consumer.
    Cancel {
        /// Its node.
        node: NodeId,
        /// Incarnation.
        incarnation: u64,
        /// Its id on its node.
        local_id: u64,
    },
    /// Settle deliveries.
    Settle {
        /// Message ids.
        ids: Vec<u64>,
        /// How.
        outcome: WireOutcome,
    },
    /// Flow credit back for a no-ack consumer.
    Credit {
        /// Its node.
        node: NodeId,
        /// Incarnation.
        incarnation: u64,
        /// Its id on its node.
        local_id: u64,
        /// Deliveries written.
        n: u32,
    },
    /// basic.get.
    Get {
        /// Channel.
        owner: RemoteOwner,
        /// Auto-ack.
        no_ack: bool,
    },
    /// A channel closed.
    ChannelClosed(RemoteOwner),
    /// A node restarted or is gone: everything its channels held (with an
    /// incarnation other than `alive`, or all when `alive` is 0) returns.
    NodeDown {
        /// Node.
        node: NodeId,
        /// Its current incarnation, 0 when it is down.
        alive: u64,
    },
    /// queue.purge.
    Purge,
    /// Expire messages / time out consumers (proposed by the leader).
    Tick,
    /// At-least-once dead-lettering: these dead-lettered messages were
    /// confirmed by every queue their dead-letter exchange routed them to
    /// and leave the queue.
    DlxSettle(Vec<u64>),
}

impl QOp {
    fn name(&self) -> &'static str {
        match self {
            QOp::Enqueue(_) => "enqueue",
            QOp::Consume { .. } => "consume",
            QOp::Cancel { .. } => "cancel",
            QOp::Settle { .. } => "settle",
            QOp::Credit { .. } => "credit",
            QOp::Get { .. } => "get",
            QOp::ChannelClosed(_) => "channel-closed",
            QOp::NodeDown { .. } => "node-down",
            QOp::Purge => "purge",
            QOp::Tick => "tick",
            QOp::DlxSettle(_) => "dlx-settle",
        }
    }
}

/// A message handed out by basic.get through Raft.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GotMsg {
    /// Queue-local id (the delivery's handle for ack).
    pub id: u64,
    /// Redelivered flag.
    pub redelivered: bool,
    /// Delivery count.
    pub delivery_count: u16,
    /// The message.
    pub msg: WireMsg,
    /// Messages still ready.
    pub remaining: u64,
}

/// What applying a command answers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub enum Resp {
    /// Nothing to say.
    #[default]
    Ok,
    /// Enqueue: indexes of messages refused by a length limit.
    Enqueued {
        /// Refused (basic.nack) positions.
        rejected: Vec<u32>,
    },
    /// basic.get result.
    Got(Option<GotMsg>),
    /// A count (purge).
    Count(u64),
    /// Refused: AMQP reply code and text.
    Refused(u16, String),
}

/// A message in the form the Raft log and the inter-node link carry.
pub fn to_wire(m: &crate::queue::message::Message) -> WireMsg {
    WireMsg {
        exchange: m.exchange.to_vec(),
        routing_key: m.routing_key.to_vec(),
        properties: m.raw_properties.to_vec(),
        body: m.body.to_vec(),
    }
}

/// The message back from its wire form (None if its properties do not
/// parse).
pub fn from_wire(w: WireMsg) -> Option<crate::queue::message::Message> {
    crate::queue::message::Message::from_parts(crate::store::MessageParts {
        exchange: w.exchange.into(),
        routing_key: w.routing_key.into(),
        raw_properties: w.properties.into(),
        body: w.body.into(),
    })
}

/// A settlement outcome on the wire.
pub fn wire_outcome(o: crate::queue::core::Outcome) -> WireOutcome {
    use crate::queue::core::Outcome;
    match o {
        Outcome::Ack => WireOutcome::Ack,
        Outcome::Requeue => WireOutcome::Requeue,
        Outcome::Discard => WireOutcome::Discard,
        Outcome::Return => WireOutcome::Return,
        Outcome::Undeliverable => WireOutcome::Undeliverable,
    }
}

/// A settlement outcome from the wire.
pub fn outcome(o: WireOutcome) -> crate::queue::core::Outcome {
    use crate::queue::core::Outcome;
    match o {
        WireOutcome::Ack => Outcome::Ack,
        WireOutcome::Requeue => Outcome::Requeue,
        WireOutcome::Discard => Outcome::Discard,
        WireOutcome::Return => Outcome::Return,
        WireOutcome::Undeliverable => Outcome::Undeliverable,
    }
}
