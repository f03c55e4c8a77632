//! Queues: the deterministic core, the actor that owns one queue, and the
//! handle the rest of the broker uses to talk to it.

pub mod actor;
pub mod args;
pub mod core;
pub mod deadletter;
pub mod message;
pub mod quorum;
pub mod ready;
pub mod stream;

use crate::broker::ConnTx;
use crate::protocol::error::AmqpError;
use amq_protocol::types::FieldTable;
use core::{ConsumerId, ConsumerSpec, Counts, Envelope, MsgId, Outcome, Owner};
use message::Message;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use tokio::sync::{mpsc, oneshot};

/// Where a queue sends publisher confirms for a batch.
#[derive(Debug)]
pub struct ConfirmTo {
    /// Publisher's connection.
    pub conn: ConnTx,
    /// Publisher's channel.
    pub channel: u16,
    /// One publish sequence number per message in the batch.
    pub seqs: Vec<u64>,
}

impl ConfirmTo {
    /// Settles the batch: basic.nack for the messages whose position in it
    /// `refused` picks, basic.ack for the rest (at most one command each).
    pub fn settle(self, refused: impl Fn(usize) -> bool) {
        let (mut acks, mut nacks) = (Vec::new(), Vec::new());
        for (i, s) in self.seqs.into_iter().enumerate() {
            if refused(i) {
                nacks.push(s)
            } else {
                acks.push(s)
            }
        }
        for (seqs, nack) in [(nacks, true), (acks, false)] {
            if !seqs.is_empty() {
                let _ = self.conn.send(crate::broker::ConnCmd::Confirm {
                    channel: self.channel,
                    seqs,
                    nack,
                });
            }
        }
    }
}

/// The queue actor's inbox.
#[derive(Debug)]
pub enum QueueCmd {
    /// Enqueue a batch of messages from one channel.
    Publish {
        /// Messages in publish order, with their store id (0 = not stored).
        msgs: Vec<(Arc<Message>, u64)>,
        /// Confirm target, when the channel is in confirm mode.
        confirm: Option<ConfirmTo>,
    },
    /// Attach a consumer.
    Consume {
        /// Consumer parameters.
        spec: ConsumerSpec,
        /// Its connection.
        conn: ConnTx,
        /// Consumer tag.
        tag: Arc<str>,
        /// Reply.
        reply: oneshot::Sender<Result<(), AmqpError>>,
        /// basic.consume arguments (stream queues read x-stream-offset & co).
        args: FieldTable,
    },
    /// Detach a consumer (basic.cancel).
    Cancel {
        /// Which.
        consumer: ConsumerId,
        /// Optional reply once removed.
        reply: Option<oneshot::Sender<()>>,
    },
    /// Settle deliveries.
    Settle {
        /// Queue-local ids.
        ids: Vec<MsgId>,
        /// How.
        outcome: Outcome,
    },
    /// basic.get.
    Get {
        /// Channel holding the delivery.
        owner: Owner,
        /// Auto-ack.
        no_ack: bool,
        /// The message and the number still ready, or None when empty.
        reply: oneshot::Sender<Option<(Envelope, u64)>>,
    },
    /// Flow credit back for a no-ack consumer.
    Credit {
        /// Which.
        consumer: ConsumerId,
        /// How many deliveries were written.
        n: u32,
    },
    /// A channel went away: requeue what it held, drop its consumers.
    ChannelClosed {
        /// The channel.
        owner: Owner,
    },
    /// queue.purge.
    Purge {
        /// Number of messages purged.
        reply: oneshot::Sender<u64>,
    },
    /// queue.delete (also exclusive-owner close and auto-delete).
    Delete {
        /// Refuse if consumers are attached.
        if_unused: bool,
        /// Refuse if messages are ready.
        if_empty: bool,
        /// Messages deleted, or a 406.
        reply: Option<oneshot::Sender<Result<u64, AmqpError>>>,
    },
    /// Counts for declare-ok and management.
    Stats {
        /// Reply.
        reply: oneshot::Sender<Counts>,
    },
    /// Re-run dispatch (a channel-wide prefetch limit freed up).
    Kick,
    /// The queue was redeclared: it counts as used (x-expires).
    Touch,
    /// The vhost's policies changed (or the queue was just registered): the
    /// actor recomputes its effective settings (crate::broker::policy).
    PolicyChanged,
    /// Management: copies of the first `count` ready messages, left in place.
    Peek {
        /// How many.
        count: usize,
        /// (message, redelivered) in queue order.
        reply: oneshot::Sender<Vec<(Arc<Message>, bool)>>,
    },
    /// Management: the attached consumers.
    Consumers {
        /// Reply.
        reply: oneshot::Sender<Vec<ConsumerInfo>>,
    },
    /// Clean shutdown: save the deduplication cache and retry delays now
    /// (durable classic queues; see `broker::persist`).
    SaveSnapshot {
        /// Answered once saved.
        reply: oneshot::Sender<()>,
    },
}

/// A consumer as management shows it.
#[derive(Debug, Clone)]
pub struct ConsumerInfo {
    /// Consumer tag.
    pub tag: String,
    /// Channel number.
    pub channel: u16,
    /// Its connection's inbox (identifies the connection in the registry).
    pub conn: ConnTx,
}

/// Totals since the queue started, for management and metrics; counted by
/// the connections that publish to, deliver from and ack to the queue.
#[derive(Debug, Default)]
pub struct QueueMetrics {
    /// Messages enqueued.
    pub published: std::sync::atomic::AtomicU64,
    /// Messages delivered to consumers or fetched with basic.get.
    pub delivered: std::sync::atomic::AtomicU64,
    /// Of those, redeliveries.
    pub redelivered: std::sync::atomic::AtomicU64,
    /// Messages acked.
    pub acked: std::sync::atomic::AtomicU64,
}

/// Where the queue a proxy stands for lives.
#[derive(Debug, Clone)]
pub struct QueueHome {
    /// The home node's id.
    pub node: u64,
    /// The home node's name (warren@host), for errors and management.
    pub node_name: String,
    /// The queue's id on its home node.
    pub id: u64,
}

/// Queue state: usable.
const LIVE: u8 = 0;
/// Queue state: deleted.
const DELETED: u8 = 1;
/// Queue state: a proxy whose home node is down; messages are not routed
/// to it (as RabbitMQ drops a queue on a down node from routing).
const ABSENT: u8 = 2;

/// The registry entry for a queue: its static properties and its inbox.
#[derive(Debug)]
pub struct QueueRef {
    /// Broker-wide unique id (names can be reused after a delete).
    pub id: u64,
    /// Queue name.
    pub name: String,
    /// Its vhost.
    pub vhost: String,
    /// Survives restart.
    pub durable: bool,
    /// Connection id that owns it, for exclusive queues.
    pub exclusive_owner: Option<u64>,
    /// Deleted when its last consumer goes.
    pub auto_delete: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
    /// Parsed arguments.
    pub args: args::QueueArgs,
    /// The actor's inbox (bounded: a full inbox is backpressure).
    pub tx: mpsc::Sender<QueueCmd>,
    /// Set on a classic queue whose home is another cluster node: this
    /// entry is a proxy that forwards every command there
    /// (`cluster::classic`).
    pub home: Option<QueueHome>,
    /// [`LIVE`], [`DELETED`] or [`ABSENT`]: one load decides both "gone"
    /// and "routable" on the publish path.
    state: AtomicU8,
    /// Flow-control gauges: ready messages and consumers (written by the
    /// actor after each batch), messages sent but not yet taken from the
    /// inbox (added by publishers, subtracted by the actor), and the
    /// threshold. Publishers read them before reading more from their socket.
    pub ready_gauge: AtomicU64,
    /// See `ready_gauge`.
    pub inflight: AtomicU64,
    /// See `ready_gauge`.
    pub consumers_gauge: AtomicU64,
    /// See `ready_gauge` (0 = no flow control).
    pub flow_threshold: AtomicU64,
    /// Message totals (management and metrics).
    pub metrics: QueueMetrics,
}

/// Ready messages in all queues (of this process) that have consumers: the
/// sum of every classic queue actor's [`FlowShare`].
static DRAINING_BACKLOG: AtomicU64 = AtomicU64::new(0);

/// See [`QueueRef::is_overloaded`].
pub const DRAINING_BACKLOG_LIMIT_FACTOR: u64 = 2;
/// See [`QueueRef::is_overloaded`].
pub const SHARED_DIVISOR: u64 = 25;

/// A queue's contribution to the broker-wide draining backlog, kept by its
/// actor (one atomic add per change, none per message) and taken back
/// when the actor ends.
#[derive(Debug, Default)]
pub struct FlowShare(u64);

impl FlowShare {
    /// Sets this queue's share.
    pub fn set(&mut self, n: u64) {
        if n != self.0 {
            if n > self.0 {
                DRAINING_BACKLOG.fetch_add(n - self.0, Ordering::Relaxed);
            } else {
                DRAINING_BACKLOG.fetch_sub(self.0 - n, Ordering::Relaxed);
            }
            self.0 = n;
        }
    }
}

impl Drop for FlowShare {
    fn drop(&mut self) {
        self.set(0);
    }
}

impl QueueRef {
    /// Builds a registry entry.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: u64,
        name: String,
        vhost: String,
        durable: bool,
        exclusive_owner: Option<u64>,
        auto_delete: bool,
        arguments: FieldTable,
        args: args::QueueArgs,
        tx: mpsc::Sender<QueueCmd>,
    ) -> Self {
        QueueRef {
            id,
            name,
            vhost,
            durable,
            exclusive_owner,
            auto_delete,
            arguments,
            args,
            tx,
            home: None,
            state: AtomicU8::new(LIVE),
            ready_gauge: AtomicU64::new(0),
            inflight: AtomicU64::new(0),
            consumers_gauge: AtomicU64::new(0),
            flow_threshold: AtomicU64::new(0),
            metrics: QueueMetrics::default(),
        }
    }

    /// Makes this entry a proxy for a queue living on another node.
    pub fn with_home(mut self, home: QueueHome) -> Self {
        self.home = Some(home);
        self
    }

    /// Whether its persistent messages and definition go to the store
    /// (durable and not exclusive: exclusive queues never survive a restart;
    /// a proxy's messages are stored on its home node).
    pub fn is_stored(&self) -> bool {
        self.durable && self.exclusive_owner.is_none() && self.home.is_none()
    }

    /// Publishers should slow down: the queue has consumers (so it is
    /// draining, just not fast enough) and its backlog, counting what is
    /// still in its inbox, is over the flow-control threshold.
    ///
    /// While the broker as a whole holds more than
    /// [`DRAINING_BACKLOG_LIMIT_FACTOR`] × threshold ready messages in
    /// queues that have consumers (many queues, each under its own
    /// threshold), every such queue's threshold drops to 1/[`SHARED_DIVISOR`]:
    /// their publishers slow down before the backlogs together outgrow the
    /// caches and memory, which leaves the CPU to the consumers.
    pub fn is_overloaded(&self) -> bool {
        let t = self.flow_threshold.load(Ordering::Relaxed);
        if t == 0 || self.consumers_gauge.load(Ordering::Relaxed) == 0 {
            return false;
        }
        let backlog =
            self.ready_gauge.load(Ordering::Relaxed) + self.inflight.load(Ordering::Relaxed);
        backlog > t
            || (backlog > t / SHARED_DIVISOR
                && DRAINING_BACKLOG.load(Ordering::Relaxed)
                    > t.saturating_mul(DRAINING_BACKLOG_LIMIT_FACTOR))
    }

    /// A stream queue (x-queue-type=stream): its actor is `stream::actor`,
    /// and its messages never go to the message store.
    pub fn is_stream(&self) -> bool {
        self.args.queue_type == "stream"
    }

    /// A quorum queue (x-queue-type=quorum): replicated by Raft, its
    /// messages live in the Raft log, not the message store.
    pub fn is_quorum(&self) -> bool {
        self.args.queue_type == "quorum"
    }

    /// Persistent messages routed here are written to the message store
    /// (durable classic queues only: streams and quorum queues keep their
    /// own logs).
    pub fn uses_message_store(&self) -> bool {
        self.is_stored() && !self.is_stream() && !self.is_quorum()
    }

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.state.load(Ordering::Acquire) == DELETED
    }

    /// Messages may be routed here: not deleted, and (for a proxy) its
    /// home node is up.
    pub fn is_routable(&self) -> bool {
        self.state.load(Ordering::Acquire) == LIVE
    }

    /// Marks deleted.
    pub fn mark_deleted(&self) {
        self.state.store(DELETED, Ordering::Release);
    }

    /// A proxy's home node went down (`true`) or came back (`false`).
    /// Never undoes a delete.
    pub fn set_absent(&self, absent: bool) {
        let (from, to) = if absent {
            (LIVE, ABSENT)
        } else {
            (ABSENT, LIVE)
        };
        let _ = self
            .state
            .compare_exchange(from, to, Ordering::AcqRel, Ordering::Acquire);
    }

    /// A proxy whose home node is down.
    pub fn is_absent(&self) -> bool {
        self.state.load(Ordering::Acquire) == ABSENT
    }

    /// Sends a command; false if the queue is gone.
    pub async fn send(&self, cmd: QueueCmd) -> bool {
        self.tx.send(cmd).await.is_ok()
    }

    /// Asks for counts; None if the queue is gone.
    pub async fn stats(&self) -> Option<Counts> {
        let (tx, rx) = oneshot::channel();
        if !self.send(QueueCmd::Stats { reply: tx }).await {
            return None;
        }
        rx.await.ok()
    }
}
