//! Replicated streams (cluster mode): the cluster glue around the stream
//! actor.
//!
//! A stream declared on a clustered node is registered in the metadata
//! group ([`MetaCmd::DeclareStream`]) with its replica set and leader; every
//! member node runs an ordinary stream actor over its own segment files,
//! with a replication role (see the "Replication" part of `actor.rs`): the
//! leader appends and ships the encoded chunks to the followers, which
//! append the identical bytes at the identical offsets. A node outside the
//! replica set gets a forwarding handle ([`RemoteStream`]): publishes go to
//! the leader, consumers read committed chunks from the leader.
//!
//! This file owns: declare and delete through the metadata group,
//! materialising a stream on a node (replica or forwarding handle), the
//! inter-node requests addressed to a stream, and failover: when a
//! stream's leader node is down, the first live member (by id) asks every
//! live member for its tail (fencing it against the old leader), and
//! records the member with the highest (last epoch, tail) as leader with
//! the next epoch.
//!
//! Never here: chunk encoding, segment files (the writer), consumers (the
//! actor).

use super::actor::{StreamInit, spawn};
use crate::broker::{Broker, ConnCmd, VHost};
use crate::cluster::Cluster;
use crate::cluster::net::{Req, RespBody, StreamOffset, now_ms};
use crate::cluster::types::{Cmd, META_GROUP, MetaCmd, NodeId, Resp, StreamDef, WireMsg};
use crate::protocol::error::{AmqpError, code};
use crate::queue::core::{ConsumerId, ConsumerSpec, Envelope, MsgId, Owner};
use crate::queue::message::Message;
use crate::queue::{ConfirmTo, QueueCmd, QueueRef};
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

/// What reaches a replicated stream's actor from the cluster.
#[derive(Debug)]
pub enum ReplEvent {
    /// Chunks from the leader (follower side).
    Append {
        /// Leader's epoch.
        epoch: u32,
        /// Offset of the first chunk (the follower's tail, if in step).
        from: u64,
        /// Epoch of the leader's chunk ending at `from`.
        prev_epoch: Option<u32>,
        /// Restart the log at `from`.
        reset: bool,
        /// Encoded chunks.
        chunks: Bytes,
        /// Leader's committed offset.
        commit: u64,
        /// The answer for the leader.
        reply: oneshot::Sender<Result<RespBody, String>>,
    },
    /// Publishes forwarded from another node (leader side).
    Publish {
        /// Messages.
        msgs: Vec<WireMsg>,
        /// Committed (true) or refused.
        reply: oneshot::Sender<bool>,
    },
    /// A failover coordinator's tail query.
    Tail {
        /// Epoch being elected: refuse older leaders from now on.
        fence: u32,
        /// (epoch of the last chunk, tail).
        reply: oneshot::Sender<(u32, u64)>,
    },
    /// A node without a replica reads committed chunks (leader side).
    Read {
        /// Where.
        at: StreamOffset,
        /// Bytes wanted, about.
        max_bytes: u32,
        /// How long to hold the request at the end.
        wait_ms: u32,
        /// `RespBody::StreamChunks`.
        reply: oneshot::Sender<Result<RespBody, String>>,
    },
    /// The stream's definition changed (new leader and epoch).
    Role(StreamDef),
    /// A follower answered (leader side).
    Acked {
        /// Follower.
        node: NodeId,
        /// Its shipping generation when the frame was sent.
        generation: u64,
        /// Its answer.
        res: Result<RespBody, String>,
    },
}

/// A replicated stream's inbox for cluster events, registered in
/// `Cluster::queue_ctxs` under the stream's group name while its actor
/// lives.
#[derive(Debug)]
pub struct StreamLink {
    /// The actor's replication inbox. Unbounded: frames are bounded by the
    /// leader's in-flight window and forwarded publishes by their
    /// publishers' confirm windows.
    pub tx: mpsc::UnboundedSender<ReplEvent>,
}

/// How to start a stream actor as a replica.
pub struct ReplInit {
    /// This node's cluster runtime.
    pub cluster: Weak<Cluster>,
    /// The stream's definition.
    pub def: StreamDef,
}

/// Turns a stored message into its wire parts (forwarding).
pub fn to_wire(m: &Message) -> WireMsg {
    WireMsg {
        exchange: m.exchange.to_vec(),
        routing_key: m.routing_key.to_vec(),
        properties: m.raw_properties.to_vec(),
        body: m.body.to_vec(),
    }
}

/// The message a forwarded publish carries (None if its properties do not
/// parse).
pub fn from_wire(w: WireMsg) -> Option<Message> {
    Message::from_parts(crate::store::MessageParts {
        exchange: w.exchange.into(),
        routing_key: w.routing_key.into(),
        raw_properties: w.properties.into(),
        body: w.body.into(),
    })
}

fn link(cluster: &Cluster, group: &str) -> Option<Arc<StreamLink>> {
    cluster
        .queue_ctxs
        .get(group)
        .and_then(|w| w.upgrade())
        .and_then(|a| a.downcast::<StreamLink>().ok())
}

/// Registers a replica's inbox (called by the actor at spawn).
pub fn register(cluster: &Cluster, group: &str, l: &Arc<StreamLink>) {
    let weak: Weak<dyn std::any::Any + Send + Sync> =
        Arc::downgrade(l) as Weak<dyn std::any::Any + Send + Sync>;
    cluster.queue_ctxs.insert(group.to_string(), weak);
}

/// The stream definition of `vhost`/`name` in the metadata state.
pub fn def_of(cluster: &Cluster, vhost: &str, name: &str) -> Option<StreamDef> {
    cluster
        .meta
        .lock()
        .ok()?
        .streams
        .get(&(vhost.to_string(), name.to_string()))
        .cloned()
}

/// Whether streams declared on this node are replicated.
pub fn clustered(broker: &Broker) -> bool {
    broker.config.cluster.enabled && broker.cluster.get().is_some()
}

/// queue.declare of a stream on a clustered node: registered through the
/// metadata group (members: `x-initial-cluster-size` live nodes, default
/// all up to 3, the leader spread by queue id), then waited for until
/// this node has it.
pub async fn declare(
    broker: &Arc<Broker>,
    vhost: &Arc<VHost>,
    name: &str,
    arguments: &FieldTable,
) -> Result<Arc<QueueRef>, AmqpError> {
    let Some(cluster) = broker.cluster.get().cloned() else {
        return Err(AmqpError::internal(
            "the cluster runtime did not start; streams cannot be declared",
        ));
    };
    super::settings::StreamSettings::from_args(arguments).map_err(|(arg, why)| {
        AmqpError::precondition(format!(
            "invalid arg '{arg}' for queue '{name}' in vhost '{}': {why}",
            vhost.name
        ))
    })?;
    let size = match arguments.inner().get("x-initial-cluster-size") {
        None => 3,
        Some(v) => match crate::broker::headers::value_int(v) {
            Some(n) if n >= 1 => n as usize,
            _ => {
                return Err(AmqpError::precondition(format!(
                    "invalid arg 'x-initial-cluster-size' for queue '{name}' in vhost '{}': expected a positive integer",
                    vhost.name
                )));
            }
        },
    };
    let live: Vec<NodeId> = cluster
        .members()
        .into_iter()
        .map(|(id, _)| id)
        .filter(|id| cluster.alive(*id))
        .collect();
    let id = broker.next_id();
    let members = crate::cluster::pick_members(&live, size, id);
    let Some(&leader) = members.first() else {
        return Err(AmqpError::internal(format!(
            "cannot place stream '{name}': no live node known"
        )));
    };
    let def = StreamDef {
        id,
        vhost: vhost.name.clone(),
        name: name.to_string(),
        arguments: serde_json::to_vec(arguments)
            .map_err(|e| AmqpError::precondition(format!("unencodable queue arguments: {e}")))?,
        members,
        leader,
        epoch: 1,
    };
    let meta_members: Vec<NodeId> = cluster.members().into_iter().map(|(id, _)| id).collect();
    let r = cluster
        .propose(
            META_GROUP,
            Cmd::Meta(MetaCmd::DeclareStream(def)),
            &meta_members,
        )
        .await
        .map_err(|e| AmqpError::internal(format!("cannot declare stream '{name}': {e}")))?;
    if let Resp::Refused(c, text) = r {
        return Err(AmqpError::new(c, text));
    }
    let mut q = None;
    for _ in 0..500 {
        q = vhost.queue(name);
        if q.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some(q) = q else {
        return Err(AmqpError::internal(format!(
            "stream '{name}' was declared but has not reached this node yet; retry"
        )));
    };
    // Publishes right after declare-ok go to the leader (maybe through
    // this node): wait (bounded) until the live replicas have opened it.
    if let Some(def) = def_of(&cluster, &vhost.name, name) {
        let deadline = now_ms() + 5_000;
        for m in def.members.iter().filter(|m| cluster.alive(**m)) {
            let probe = || Req::StreamTail {
                group: def.group(),
                fence: 0,
            };
            while now_ms() < deadline {
                let r = if *m == cluster.me.id {
                    handle(&cluster, probe())
                        .await
                        .unwrap_or_else(|_| Err("stopped".into()))
                } else {
                    match cluster.peer_by_id(*m) {
                        Some(p) => p.call(probe(), Duration::from_secs(1)).await,
                        None => Err("unknown".into()),
                    }
                };
                if r.is_ok() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    Ok(q)
}

/// Deletes a replicated stream everywhere (each node removes its copy when
/// the metadata command applies).
pub async fn delete(cluster: &Arc<Cluster>, vhost: &str, name: &str) -> Result<(), String> {
    let meta_members: Vec<NodeId> = cluster.members().into_iter().map(|(id, _)| id).collect();
    cluster
        .propose(
            META_GROUP,
            Cmd::Meta(MetaCmd::DeleteStream {
                vhost: vhost.to_string(),
                name: name.to_string(),
            }),
            &meta_members,
        )
        .await
        .map(|_| ())
}

/// The marker naming which stream (by id) a replica directory holds.
const ID_FILE: &str = "stream-id";

/// Creates the stream on this node (applying its declare, or replaying
/// it at start): a replica over its own segment files when this node is
/// a member, a forwarding handle otherwise.
pub async fn materialize(cluster: &Arc<Cluster>, def: &StreamDef) {
    let Some(broker) = cluster.broker.upgrade() else {
        return;
    };
    let vhost = broker.vhost_or_create(&def.vhost);
    if vhost.queue(&def.name).is_some_and(|q| q.id == def.id) {
        return;
    }
    let table: FieldTable = serde_json::from_slice(&def.arguments).unwrap_or_default();
    let args = crate::queue::args::QueueArgs::parse(&table, &def.name, &def.vhost)
        .unwrap_or_else(|e| {
            warn!(queue = %def.name, vhost = %def.vhost, "stored stream arguments no longer valid ({}); using defaults", e.text);
            crate::queue::args::QueueArgs {
                queue_type: "stream".into(),
                ..Default::default()
            }
        });
    let make = |tx| {
        QueueRef::new(
            def.id,
            def.name.clone(),
            def.vhost.clone(),
            true,
            None,
            false,
            table.clone(),
            args.clone(),
            tx,
        )
    };
    let member = def.members.contains(&cluster.me.id);
    let q = if member {
        let data_dir = broker.config.storage.data_dir.clone();
        let dir = super::stream_dir(&data_dir, &def.vhost, &def.name);
        // The files are this stream's unless they belong to an older
        // stream of the same name (or a single-node one).
        let marker = std::fs::read_to_string(dir.join(ID_FILE)).ok();
        let fresh = marker.as_deref().map(str::trim) != Some(def.id.to_string().as_str());
        let init = StreamInit {
            vhost: vhost.clone(),
            inbox: broker.config.queue.inbox_capacity,
            data_dir,
            storage: None,
            fresh,
            repl: Some(ReplInit {
                cluster: Arc::downgrade(cluster),
                def: def.clone(),
            }),
        };
        match spawn(make, init) {
            Ok(q) => {
                if fresh && let Err(e) = std::fs::write(dir.join(ID_FILE), def.id.to_string()) {
                    warn!(dir = %dir.display(), "cannot mark the stream replica's directory ({e}); a restart will discard its files and copy them from the leader again");
                }
                q
            }
            Err(e) => {
                warn!(queue = %def.name, vhost = %def.vhost, "cannot open the stream replica: {}", e.text);
                return;
            }
        }
    } else {
        let (tx, rx) = mpsc::channel(broker.config.queue.inbox_capacity.max(1));
        let q = Arc::new(make(tx));
        let actor = RemoteStream {
            cluster: Arc::downgrade(cluster),
            q: Arc::downgrade(&q),
            vhost: Arc::downgrade(&vhost),
            group: def.group(),
            leader: (def.leader, std::time::Instant::now()),
        };
        tokio::spawn(actor.run(rx));
        q
    };
    vhost.queues.insert(def.name.clone(), q);
    info!(queue = %def.name, vhost = %def.vhost, members = def.members.len(), leader = def.leader, member, "stream ready on this node");
}

/// Removes the stream from this node (deleted cluster-wide).
pub async fn dematerialize(cluster: &Arc<Cluster>, def: &StreamDef) {
    let Some(b) = cluster.broker.upgrade() else {
        return;
    };
    let Some(v) = b.vhost(&def.vhost) else {
        return;
    };
    if let Some(q) = v.queue(&def.name).filter(|q| q.id == def.id) {
        v.forget_queue(&q);
        let _ =
            q.tx.send(QueueCmd::Delete {
                if_unused: false,
                if_empty: false,
                reply: None,
            })
            .await;
    }
    cluster.queue_ctxs.remove(&def.group());
}

/// A stream's leader changed: its replica here takes its new role.
pub async fn leader_changed(cluster: &Arc<Cluster>, def: &StreamDef) {
    info!(queue = %def.name, vhost = %def.vhost, leader = def.leader, epoch = def.epoch, "stream leader changed");
    if let Some(l) = link(cluster, &def.group()) {
        let _ = l.tx.send(ReplEvent::Role(def.clone()));
    }
}

/// Serves a stream request from another node. The request is handed to
/// the stream's actor here, in arrival order (chunks and forwarded
/// publishes must stay ordered); the receiver yields the answer.
pub fn handle(cluster: &Arc<Cluster>, req: Req) -> oneshot::Receiver<Result<RespBody, String>> {
    let (tx, rx) = oneshot::channel();
    let group = match &req {
        Req::StreamAppend { group, .. }
        | Req::StreamPublish { group, .. }
        | Req::StreamTail { group, .. }
        | Req::StreamRead { group, .. } => group.clone(),
        _ => {
            let _ = tx.send(Err("not a stream request".into()));
            return rx;
        }
    };
    let Some(l) = link(cluster, &group) else {
        let _ = tx.send(Err(format!("stream {group} has no replica on this node")));
        return rx;
    };
    match req {
        Req::StreamAppend {
            epoch,
            from,
            prev_epoch,
            reset,
            chunks,
            commit,
            ..
        } => {
            if let Err(e) = l.tx.send(ReplEvent::Append {
                epoch,
                from,
                prev_epoch,
                reset,
                chunks: Bytes::from(chunks),
                commit,
                reply: tx,
            }) && let ReplEvent::Append { reply, .. } = e.0
            {
                let _ = reply.send(Err("stream replica stopped".into()));
            }
        }
        Req::StreamPublish { msgs, .. } => {
            let (ptx, prx) = oneshot::channel();
            let _ = l.tx.send(ReplEvent::Publish { msgs, reply: ptx });
            tokio::spawn(async move {
                let ok = prx.await.unwrap_or(false);
                let _ = tx.send(Ok(RespBody::StreamPublished(ok)));
            });
        }
        Req::StreamRead {
            at,
            max_bytes,
            wait_ms,
            ..
        } => {
            if let Err(e) = l.tx.send(ReplEvent::Read {
                at,
                max_bytes,
                wait_ms,
                reply: tx,
            }) && let ReplEvent::Read { reply, .. } = e.0
            {
                let _ = reply.send(Err("stream replica stopped".into()));
            }
        }
        Req::StreamTail { fence, .. } => {
            let (ttx, trx) = oneshot::channel();
            let _ = l.tx.send(ReplEvent::Tail { fence, reply: ttx });
            tokio::spawn(async move {
                let r = match trx.await {
                    Ok((last_epoch, tail)) => Ok(RespBody::StreamTail { last_epoch, tail }),
                    Err(_) => Err("stream replica stopped".into()),
                };
                let _ = tx.send(r);
            });
        }
        _ => {}
    }
    rx
}

/// Forwards publishes to the stream's leader; the publisher's confirms
/// (if any) follow the leader's answer. Sent in call order, so one
/// channel's publishes stay ordered.
pub fn forward_publish(
    cluster: &Arc<Cluster>,
    group: &str,
    leader: NodeId,
    msgs: &[Arc<Message>],
    confirm: Option<ConfirmTo>,
) {
    let nack = |c: Option<ConfirmTo>| {
        if let Some(c) = c {
            let _ = c.conn.send(ConnCmd::Confirm {
                channel: c.channel,
                seqs: c.seqs,
                nack: true,
            });
        }
    };
    let Some(peer) = cluster.peer_by_id(leader) else {
        debug!(
            stream = group,
            leader, "stream leader unknown; publish refused"
        );
        return nack(confirm);
    };
    let req = Req::StreamPublish {
        group: group.to_string(),
        msgs: msgs.iter().map(|m| to_wire(m)).collect(),
    };
    let Some(rx) = peer.send_req(req) else {
        debug!(
            stream = group,
            leader, "stream leader not connected; publish refused"
        );
        return nack(confirm);
    };
    let Some(c) = confirm else {
        return;
    };
    tokio::spawn(async move {
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(30), rx).await,
            Ok(Ok(Ok(RespBody::StreamPublished(true))))
        );
        let _ = c.conn.send(ConnCmd::Confirm {
            channel: c.channel,
            seqs: c.seqs,
            nack: !ok,
        });
    });
}

/// A stream on a node outside its replica set: publishes are forwarded to
/// the leader; consumers read committed chunks from the leader over the
/// cluster link (`Req::StreamRead`, held by the leader until there is
/// something new) and are served here with their own cursor and credit.
/// Not here: server-side offset tracking and consumer groups (refused).
struct RemoteStream {
    cluster: Weak<Cluster>,
    q: Weak<QueueRef>,
    vhost: Weak<VHost>,
    group: String,
    /// The leader as last read from the metadata state, and when (the
    /// publish path does not take the metadata lock every time).
    leader: (NodeId, std::time::Instant),
}

/// A consumer of a stream read from the leader.
struct RemoteConsumer {
    id: ConsumerId,
    tag: Arc<str>,
    conn: crate::broker::ConnTx,
    owner: Owner,
    prefetch: u32,
    inflight: u32,
    /// Where the next read starts (None once the first read answered).
    at: Option<StreamOffset>,
    /// Messages before this offset are skipped.
    from: u64,
    /// Offset to read from next.
    next: u64,
    filter: Option<super::filter::FilterSpec>,
    buffer: std::collections::VecDeque<(u64, Arc<Message>)>,
    /// A read is in flight (or a retry is scheduled).
    reading: bool,
}

/// Results of reads from the leader, back to the remote stream task.
enum ReadDone {
    Chunks {
        consumer: ConsumerId,
        res: Result<RespBody, String>,
    },
    Retry(ConsumerId),
}

/// How long the leader may hold a read with nothing new.
const READ_WAIT_MS: u32 = 5_000;
/// Bytes per remote read.
const READ_BYTES: u32 = 1 << 20;

impl RemoteStream {
    /// The stream's leader (re-read from the metadata state at most every
    /// 200 ms).
    fn leader(&mut self, c: &Cluster, q: &QueueRef) -> NodeId {
        if self.leader.1.elapsed() > Duration::from_millis(200) {
            if let Some(d) = def_of(c, &q.vhost, &q.name) {
                self.leader.0 = d.leader;
            }
            self.leader.1 = std::time::Instant::now();
        }
        self.leader.0
    }

    async fn run(mut self, mut rx: mpsc::Receiver<QueueCmd>) {
        let (dtx, mut drx) = mpsc::unbounded_channel::<ReadDone>();
        let mut consumers: Vec<RemoteConsumer> = Vec::new();
        let mut inflight: HashMap<MsgId, ConsumerId> = HashMap::new();
        let mut next_id: MsgId = 1;
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { return };
                    let (Some(c), Some(q)) = (self.cluster.upgrade(), self.q.upgrade()) else {
                        return;
                    };
                    if !self.command(&c, &q, cmd, &mut consumers, &mut inflight) {
                        for rc in consumers.drain(..) {
                            let _ = rc.conn.send(ConnCmd::ConsumerCancelled {
                                channel: rc.owner.channel,
                                consumer: rc.id,
                                revoked: false,
                            });
                        }
                        return;
                    }
                }
                Some(d) = drx.recv() => {
                    match d {
                        ReadDone::Retry(id) => {
                            if let Some(rc) = consumers.iter_mut().find(|rc| rc.id == id) {
                                rc.reading = false;
                            }
                        }
                        ReadDone::Chunks { consumer, res } => {
                            let Some(rc) = consumers.iter_mut().find(|rc| rc.id == consumer) else {
                                continue;
                            };
                            rc.reading = false;
                            match res {
                                Ok(RespBody::StreamChunks { from, chunks, next }) => {
                                    if rc.at.take().is_some() {
                                        rc.from = from;
                                    }
                                    rc.next = next.max(rc.next);
                                    take_chunks(rc, &chunks);
                                }
                                other => {
                                    debug!(stream = %self.group, "read from the stream leader failed ({other:?}); retrying");
                                    rc.reading = true;
                                    let dtx = dtx.clone();
                                    tokio::spawn(async move {
                                        tokio::time::sleep(Duration::from_millis(500)).await;
                                        let _ = dtx.send(ReadDone::Retry(consumer));
                                    });
                                }
                            }
                        }
                    }
                }
            }
            let (Some(c), Some(q)) = (self.cluster.upgrade(), self.q.upgrade()) else {
                return;
            };
            let leader = Some(self.leader(&c, &q));
            for rc in consumers.iter_mut() {
                // Deliver what is buffered, within credit.
                let mut batch = Vec::new();
                while rc.inflight < rc.prefetch {
                    let Some((_, m)) = rc.buffer.pop_front() else {
                        break;
                    };
                    let id = next_id;
                    next_id += 1;
                    inflight.insert(id, rc.id);
                    rc.inflight += 1;
                    batch.push(Envelope {
                        id,
                        gid: 0,
                        size: m.body.len().min(u32::MAX as usize) as u32,
                        msg: Some(m),
                        delivery_count: 0,
                        redelivered: false,
                        expires: 0,
                        priority: 0,
                    });
                }
                if !batch.is_empty() {
                    let _ = rc.conn.send(ConnCmd::Deliver {
                        channel: rc.owner.channel,
                        consumer: rc.id,
                        tag: rc.tag.clone(),
                        queue: q.clone(),
                        msgs: batch,
                    });
                }
                // Read more when the buffer is empty and credit is left.
                if rc.reading || !rc.buffer.is_empty() || rc.inflight >= rc.prefetch {
                    continue;
                }
                let Some(peer) = leader.and_then(|l| c.peer_by_id(l)) else {
                    rc.reading = true;
                    let (dtx, id) = (dtx.clone(), rc.id);
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = dtx.send(ReadDone::Retry(id));
                    });
                    continue;
                };
                let at = rc.at.unwrap_or(StreamOffset::Offset(rc.next));
                let rrx = peer.send_req(Req::StreamRead {
                    group: self.group.clone(),
                    at,
                    max_bytes: READ_BYTES,
                    wait_ms: READ_WAIT_MS,
                });
                rc.reading = true;
                let (dtx, id) = (dtx.clone(), rc.id);
                tokio::spawn(async move {
                    let res = match rrx {
                        None => Err("the stream leader is not connected".to_string()),
                        Some(rrx) => match tokio::time::timeout(
                            Duration::from_millis(u64::from(READ_WAIT_MS) + 10_000),
                            rrx,
                        )
                        .await
                        {
                            Ok(Ok(r)) => r,
                            Ok(Err(_)) => Err("connection lost".into()),
                            Err(_) => Err("no answer".into()),
                        },
                    };
                    if res.is_err() {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    let _ = dtx.send(ReadDone::Chunks { consumer: id, res });
                });
            }
        }
    }

    /// One command; false when the stream is gone from this node.
    fn command(
        &mut self,
        c: &Arc<Cluster>,
        q: &Arc<QueueRef>,
        cmd: QueueCmd,
        consumers: &mut Vec<RemoteConsumer>,
        inflight: &mut HashMap<MsgId, ConsumerId>,
    ) -> bool {
        match cmd {
            QueueCmd::Publish { msgs, confirm } => {
                let msgs: Vec<Arc<Message>> = msgs.into_iter().map(|(m, _)| m).collect();
                let leader = self.leader(c, q);
                forward_publish(c, &self.group, leader, &msgs, confirm);
            }
            QueueCmd::Consume {
                spec,
                conn,
                tag,
                reply,
                args,
            } => {
                let r = remote_consumer(q, spec, conn, tag, &args);
                let _ = reply.send(r.map(|rc| consumers.push(rc)));
            }
            QueueCmd::Cancel { consumer, reply } => {
                consumers.retain(|rc| rc.id != consumer);
                inflight.retain(|_, cid| *cid != consumer);
                if let Some(r) = reply {
                    let _ = r.send(());
                }
            }
            QueueCmd::ChannelClosed { owner } => {
                consumers.retain(|rc| rc.owner != owner);
                let ids: Vec<ConsumerId> = consumers.iter().map(|rc| rc.id).collect();
                inflight.retain(|_, cid| ids.contains(cid));
            }
            QueueCmd::Settle { ids, .. } => {
                for id in ids {
                    if let Some(cid) = inflight.remove(&id)
                        && let Some(rc) = consumers.iter_mut().find(|rc| rc.id == cid)
                    {
                        rc.inflight = rc.inflight.saturating_sub(1);
                    }
                }
            }
            QueueCmd::Delete {
                if_unused,
                reply: Some(r),
                ..
            } => {
                if if_unused && !consumers.is_empty() {
                    let _ = r.send(Err(AmqpError::precondition(format!(
                        "queue '{}' in vhost '{}' in use",
                        q.name, q.vhost
                    ))));
                    return true;
                }
                let (c2, vh, name) = (c.clone(), q.vhost.clone(), q.name.clone());
                tokio::spawn(async move {
                    let res = delete(&c2, &vh, &name)
                        .await
                        .map(|_| 0)
                        .map_err(|e| AmqpError::internal(format!("cannot delete: {e}")));
                    let _ = r.send(res);
                });
            }
            QueueCmd::Delete { reply: None, .. } => {
                q.mark_deleted();
                if let Some(v) = self.vhost.upgrade() {
                    v.forget_queue(q);
                }
                return false;
            }
            QueueCmd::Get { reply, .. } => {
                let _ = reply.send(None);
            }
            QueueCmd::Stats { reply } => {
                let _ = reply.send(crate::queue::core::Counts {
                    consumers: consumers.len() as u64,
                    ..Default::default()
                });
            }
            QueueCmd::Consumers { reply } => {
                let list = consumers
                    .iter()
                    .map(|rc| crate::queue::ConsumerInfo {
                        tag: rc.tag.to_string(),
                        channel: rc.owner.channel,
                        conn: rc.conn.clone(),
                    })
                    .collect();
                let _ = reply.send(list);
            }
            QueueCmd::Purge { reply } => {
                let _ = reply.send(0);
            }
            QueueCmd::Peek { reply, .. } => {
                let _ = reply.send(Vec::new());
            }
            QueueCmd::SaveSnapshot { reply } => {
                let _ = reply.send(());
            }
            QueueCmd::Credit { .. }
            | QueueCmd::Kick
            | QueueCmd::Touch
            | QueueCmd::PolicyChanged => {}
        }
        true
    }
}

/// Checks a basic.consume on a node without a replica (the same rules as
/// a replica's consumers) and builds its reader.
fn remote_consumer(
    q: &QueueRef,
    spec: ConsumerSpec,
    conn: crate::broker::ConnTx,
    tag: Arc<str>,
    args: &FieldTable,
) -> Result<RemoteConsumer, AmqpError> {
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
            q.name, q.vhost
        )));
    }
    if args.inner().contains_key("x-stream-group") {
        return Err(AmqpError::new(
            code::NOT_IMPLEMENTED,
            format!(
                "consumer groups on stream '{}' in vhost '{}' need a node holding a replica; consume there",
                q.name, q.vhost
            ),
        ));
    }
    let now = now_ms() as i64;
    let spec_at = super::reader::parse_offset_arg(args.inner().get("x-stream-offset"), now)
        .map_err(|why| {
            AmqpError::precondition(format!(
                "{why} for stream queue '{}' in vhost '{}'",
                q.name, q.vhost
            ))
        })?;
    use super::reader::OffsetSpec as O;
    let at = match spec_at {
        O::First => StreamOffset::First,
        O::Last => StreamOffset::Last,
        O::Next => StreamOffset::Next,
        O::Offset(n) => StreamOffset::Offset(n),
        O::FromEnd(n) => StreamOffset::FromEnd(n),
        O::Timestamp(t) => StreamOffset::Timestamp(t),
    };
    Ok(RemoteConsumer {
        id: spec.id,
        tag,
        conn,
        owner: spec.owner,
        prefetch,
        inflight: 0,
        at: Some(at),
        from: 0,
        next: 0,
        filter: super::filter::FilterSpec::from_args(args),
        buffer: std::collections::VecDeque::new(),
        reading: false,
    })
}

/// Decodes chunks read from the leader into a consumer's buffer (offsets
/// before its start and messages its filter rejects are skipped).
fn take_chunks(rc: &mut RemoteConsumer, mut raw: &[u8]) {
    while let Some(h) = super::chunk::ChunkHeader::parse(raw) {
        let Some(one) = raw.get(..h.total_len() as usize) else {
            break;
        };
        raw = &raw[one.len()..];
        let body = &one[super::chunk::HEADER_LEN..];
        if !h.verify(body) {
            warn!(
                first = h.first,
                "a chunk read from the stream leader fails its CRC; skipped"
            );
            continue;
        }
        let data = Bytes::copy_from_slice(&body[h.bloom_len as usize..]);
        let Some(msgs) = super::actor::decode(&h, data) else {
            warn!(
                first = h.first,
                "a chunk read from the stream leader cannot be decoded; skipped"
            );
            continue;
        };
        for (off, f, m) in msgs {
            if off < rc.from {
                continue;
            }
            if rc
                .filter
                .as_ref()
                .is_some_and(|fs| !fs.matches(f.as_deref()))
            {
                continue;
            }
            rc.buffer.push_back((off, m));
        }
    }
}

/// Failover, run on every node every 500 ms: for each stream whose leader
/// node the failure detector declared down, the first live member (in id
/// order) collects the live members' tails, fencing them, and when a
/// majority answered records the one with the highest (last epoch, tail)
/// as leader with the next epoch.
pub async fn failover_loop(cluster: Weak<Cluster>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut tried: HashMap<String, u64> = HashMap::new();
    loop {
        tick.tick().await;
        let Some(c) = cluster.upgrade() else { return };
        // Shut down (the groups are gone).
        if !c.groups.contains_key(META_GROUP) {
            if now_ms().saturating_sub(c.me.incarnation) > 60_000 {
                return;
            }
            continue;
        }
        // Just started: give the other nodes time to answer before
        // declaring anyone down.
        if now_ms().saturating_sub(c.me.incarnation) < c.cfg.failure_timeout_ms + 1000 {
            continue;
        }
        let defs: Vec<StreamDef> = c
            .meta
            .lock()
            .map(|m| m.streams.values().cloned().collect())
            .unwrap_or_default();
        for def in defs {
            if !def.members.contains(&c.me.id) || c.alive(def.leader) {
                continue;
            }
            let mut live: Vec<NodeId> = def
                .members
                .iter()
                .copied()
                .filter(|m| c.alive(*m))
                .collect();
            live.sort_unstable();
            if live.len() * 2 <= def.members.len() || live.first() != Some(&c.me.id) {
                continue;
            }
            let key = def.group();
            let now = now_ms();
            if tried
                .get(&key)
                .is_some_and(|t| now.saturating_sub(*t) < 2000)
            {
                continue;
            }
            tried.insert(key.clone(), now);
            let c2 = c.clone();
            tokio::spawn(async move { elect(&c2, def, live).await });
        }
    }
}

async fn elect(c: &Arc<Cluster>, def: StreamDef, live: Vec<NodeId>) {
    let fence = def.epoch + 1;
    let group = def.group();
    let mut tails: Vec<(u32, u64, NodeId)> = Vec::new();
    for m in &live {
        let r = if *m == c.me.id {
            let rx = handle(
                c,
                Req::StreamTail {
                    group: group.clone(),
                    fence,
                },
            );
            rx.await.unwrap_or_else(|_| Err("stopped".into()))
        } else {
            match c.peer_by_id(*m) {
                Some(p) => {
                    p.call(
                        Req::StreamTail {
                            group: group.clone(),
                            fence,
                        },
                        Duration::from_secs(2),
                    )
                    .await
                }
                None => Err("unknown address".into()),
            }
        };
        match r {
            Ok(RespBody::StreamTail { last_epoch, tail }) => tails.push((last_epoch, tail, *m)),
            other => debug!(stream = %group, node = m, "no tail from replica: {other:?}"),
        }
    }
    if tails.len() * 2 <= def.members.len() {
        warn!(queue = %def.name, vhost = %def.vhost, answered = tails.len(), members = def.members.len(), "stream leader is down but a majority of its replicas did not answer; it stays unavailable until they do");
        return;
    }
    // Highest (last epoch, tail); ties go to the lowest id.
    tails.sort_by(|a, b| (b.0, b.1, a.2).cmp(&(a.0, a.1, b.2)));
    let Some(&(last_epoch, tail, leader)) = tails.first() else {
        return;
    };
    info!(queue = %def.name, vhost = %def.vhost, old = def.leader, new = leader, epoch = fence, last_epoch, tail, "stream leader down; electing the replica with the longest log");
    let meta_members: Vec<NodeId> = c.members().into_iter().map(|(id, _)| id).collect();
    let r = c
        .propose(
            META_GROUP,
            Cmd::Meta(MetaCmd::StreamLeader {
                vhost: def.vhost.clone(),
                name: def.name.clone(),
                id: def.id,
                leader,
                epoch: fence,
            }),
            &meta_members,
        )
        .await;
    if let Err(e) = r {
        warn!(queue = %def.name, vhost = %def.vhost, "cannot record the stream's new leader: {e}; retrying");
    }
}
