//! Inter-node transport: one TCP connection from each node to each other
//! node, authenticated with the cluster secret, carrying every Raft group's
//! RPCs, forwarded proposals and the per-node failure detector's pings.
//!
//! Frames are a 4-byte big-endian length and a postcard-encoded [`Frame`].
//! A connection starts with both sides sending `Hello` (id, name, a random
//! nonce) and then `Proof` = HMAC-SHA256(secret, "warren-cluster-v1" ||
//! peer's nonce || own id); a peer whose proof does not verify is dropped
//! before it can send anything else.

use super::types::{Cmd, NodeId, NodeInfo, Resp, TypeConfig};
use hmac::{KeyInit, Mac};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// Largest frame accepted from a peer.
const MAX_FRAME: usize = 256 << 20;

/// Everything on the wire.
#[derive(Debug, Serialize, Deserialize)]
pub enum Frame {
    /// First frame each way.
    Hello {
        /// Sender's node id.
        id: NodeId,
        /// Sender's name and address.
        info: NodeInfo,
        /// Sender's boot id.
        incarnation: u64,
        /// Random challenge for the other side.
        nonce: [u8; 32],
    },
    /// Answer to the other side's challenge.
    Proof {
        /// HMAC over its nonce.
        mac: Vec<u8>,
    },
    /// A request.
    Req {
        /// Request id (per connection).
        rid: u64,
        /// What.
        req: Req,
    },
    /// A response.
    Resp {
        /// Request id it answers.
        rid: u64,
        /// Result, or an error text.
        resp: Result<RespBody, String>,
    },
}

/// Requests between nodes.
#[derive(Debug, Serialize, Deserialize)]
pub enum Req {
    /// Raft AppendEntries for a group.
    Append {
        /// Group.
        group: String,
        /// RPC.
        rpc: AppendEntriesRequest<TypeConfig>,
    },
    /// Raft RequestVote for a group.
    Vote {
        /// Group.
        group: String,
        /// RPC.
        rpc: VoteRequest<NodeId>,
    },
    /// Raft InstallSnapshot chunk for a group.
    Snapshot {
        /// Group.
        group: String,
        /// RPC.
        rpc: InstallSnapshotRequest<TypeConfig>,
    },
    /// A proposal forwarded to the group's leader.
    Propose {
        /// Group.
        group: String,
        /// Command.
        cmd: Cmd,
    },
    /// Failure detector probe.
    Ping,
    /// Deliveries from a quorum queue's leader to a consumer on a node that
    /// holds no replica of it.
    Deliver {
        /// Group (queue).
        group: String,
        /// Boot id of the consumer's node the leader knows.
        incarnation: u64,
        /// Consumer id on the receiving node.
        local_id: u64,
        /// Messages.
        msgs: Vec<super::types::GotMsg>,
    },
    /// Ask the metadata leader to add a node to the cluster.
    Join {
        /// The node.
        id: NodeId,
        /// Its name and address.
        info: NodeInfo,
    },
    /// Ask a quorum queue's leader to change its voters.
    SetVoters {
        /// Group.
        group: String,
        /// New voters.
        voters: Vec<NodeId>,
    },
    /// Ask the metadata leader to remove a node.
    Forget {
        /// The node.
        id: NodeId,
    },
    /// Chunks from a stream's leader to a follower: encoded chunk bytes,
    /// in offset order, the first starting at `from` (none: only the
    /// commit offset moves). `reset` asks the follower to drop its log and
    /// restart it at `from` (retention removed what it lacked).
    StreamAppend {
        /// Stream (`StreamDef::group`).
        group: String,
        /// The leader's epoch.
        epoch: u32,
        /// Offset of the first chunk.
        from: u64,
        /// Epoch of the leader's chunk ending at `from` (None: the
        /// leader's log starts at `from`); the follower checks its own.
        prev_epoch: Option<u32>,
        /// Drop the local log and start at `from`.
        reset: bool,
        /// Encoded chunks, each header + filter + records.
        #[serde(with = "serde_bytes")]
        chunks: Vec<u8>,
        /// The leader's committed offset (majority-written).
        commit: u64,
    },
    /// Publishes forwarded to a stream's leader; answered once committed.
    StreamPublish {
        /// Stream.
        group: String,
        /// Messages, in publish order.
        msgs: Vec<super::types::WireMsg>,
    },
    /// A node without a replica reads committed chunks from the stream's
    /// leader for its consumers. The leader waits up to `wait_ms` for new
    /// chunks when there are none yet.
    StreamRead {
        /// Stream.
        group: String,
        /// Where to start: resolved at the leader.
        at: StreamOffset,
        /// Bytes of chunks wanted, about.
        max_bytes: u32,
        /// How long the leader may hold the request when at the end.
        wait_ms: u32,
    },
    /// A failover coordinator asks a replica for its written tail and
    /// fences it: it refuses chunks of epochs below `fence` afterwards.
    StreamTail {
        /// Stream.
        group: String,
        /// The epoch being elected.
        fence: u32,
    },
    /// A command for a classic queue, from a proxy on the sending node to
    /// the queue's home (this node). Served in arrival order per queue.
    Classic {
        /// Vhost.
        vhost: String,
        /// Queue name.
        name: String,
        /// Queue id on its home node.
        id: u64,
        /// Boot id of the sending node (names its consumers and channels).
        incarnation: u64,
        /// What.
        op: super::classic::ClassicOp,
    },
    /// From a classic queue's home to a node with consumers of it:
    /// deliveries or a consumer cancellation.
    ClassicEvent {
        /// Vhost.
        vhost: String,
        /// Queue name.
        name: String,
        /// Queue id on its home node.
        id: u64,
        /// Boot id of the receiving node the home knows (a restarted
        /// node ignores events meant for its previous life).
        incarnation: u64,
        /// What.
        ev: super::classic::ClassicEvent,
    },
}

/// A stream read position as sent to the leader (`x-stream-offset`
/// resolved there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamOffset {
    /// The first message still in the stream.
    First,
    /// The start of the last chunk.
    Last,
    /// Only messages published from now on.
    Next,
    /// This offset.
    Offset(u64),
    /// N messages before the end.
    FromEnd(u64),
    /// The first chunk written at or after this time (ms).
    Timestamp(i64),
}

/// Responses.
#[derive(Debug, Serialize, Deserialize)]
pub enum RespBody {
    /// AppendEntries answer.
    Append(AppendEntriesResponse<NodeId>),
    /// Vote answer.
    Vote(VoteResponse<NodeId>),
    /// InstallSnapshot answer.
    Snapshot(InstallSnapshotResponse<NodeId>),
    /// The proposal was applied.
    Proposed(Resp),
    /// Not the leader; the leader if known.
    NotLeader(Option<NodeId>),
    /// Ping answer with the node's boot id.
    Pong {
        /// Boot id.
        incarnation: u64,
    },
    /// Done.
    Done,
    /// A stream follower's answer to `StreamAppend`: its written (synced)
    /// tail; `mismatch` when the chunks did not start at its tail (the
    /// leader resends from `tail`).
    StreamAck {
        /// Offset after its last written chunk.
        tail: u64,
        /// The chunks were not appended: they did not start at `tail`.
        mismatch: bool,
    },
    /// A forwarded stream publish: committed (true) or refused.
    StreamPublished(bool),
    /// Committed chunks for a reader on a node without a replica.
    StreamChunks {
        /// The first offset the reader wants (chunks may start before it).
        from: u64,
        /// Encoded chunks, back to back.
        #[serde(with = "serde_bytes")]
        chunks: Vec<u8>,
        /// Where to read next.
        next: u64,
    },
    /// A replica's tail for a failover: the epoch of its last chunk and
    /// the offset after it.
    StreamTail {
        /// Epoch stamped in its last chunk (0: empty log).
        last_epoch: u32,
        /// Offset after its last chunk.
        tail: u64,
    },
    /// A classic queue's home answers a proxy.
    Classic(super::classic::ClassicReply),
}

/// Writes one frame.
pub async fn write_frame<W: AsyncWriteExt + Unpin>(w: &mut W, f: &Frame) -> std::io::Result<()> {
    let bytes = postcard::to_stdvec(f).map_err(std::io::Error::other)?;
    let mut buf = Vec::with_capacity(bytes.len() + 4);
    buf.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
    buf.extend_from_slice(&bytes);
    w.write_all(&buf).await
}

/// Reads one frame (None at a clean end of stream).
pub async fn read_frame<R: AsyncReadExt + Unpin>(r: &mut R) -> std::io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u32::from_be_bytes(len) as usize;
    if n > MAX_FRAME {
        return Err(std::io::Error::other(format!(
            "peer sent a {n}-byte frame, over the {MAX_FRAME}-byte limit"
        )));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    postcard::from_bytes(&buf)
        .map(Some)
        .map_err(|e| std::io::Error::other(format!("undecodable frame from peer: {e}")))
}

fn mac(secret: &str, nonce: &[u8; 32], id: NodeId) -> Vec<u8> {
    // HMAC accepts keys of any length, so this cannot fail.
    let Ok(mut m) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return Vec::new();
    };
    m.update(b"warren-cluster-v1");
    m.update(nonce);
    m.update(&id.to_be_bytes());
    m.finalize().into_bytes().to_vec()
}

fn verify(secret: &str, nonce: &[u8; 32], id: NodeId, got: &[u8]) -> bool {
    let Ok(mut m) = HmacSha256::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    m.update(b"warren-cluster-v1");
    m.update(nonce);
    m.update(&id.to_be_bytes());
    m.verify_slice(got).is_ok()
}

/// Who we are, for handshakes.
#[derive(Debug, Clone)]
pub struct Me {
    /// Node id.
    pub id: NodeId,
    /// Name and address.
    pub info: NodeInfo,
    /// Boot id.
    pub incarnation: u64,
    /// Cluster secret.
    pub secret: String,
    /// TLS for inter-node connections, when configured.
    pub tls: Option<Arc<super::tls::NodeTls>>,
}

/// What the other side said in its hello.
#[derive(Debug, Clone)]
pub struct PeerHello {
    /// Its id.
    pub id: NodeId,
    /// Its name and address.
    pub info: NodeInfo,
    /// Its boot id.
    pub incarnation: u64,
}

/// Runs the mutual handshake on a fresh connection.
pub async fn handshake<S>(s: &mut S, me: &Me) -> std::io::Result<PeerHello>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let nonce: [u8; 32] = rand::random();
    write_frame(
        s,
        &Frame::Hello {
            id: me.id,
            info: me.info.clone(),
            incarnation: me.incarnation,
            nonce,
        },
    )
    .await?;
    let hello = tokio::time::timeout(Duration::from_secs(5), read_frame(s))
        .await
        .map_err(|_| std::io::Error::other("no hello from peer within 5 s"))??;
    let Some(Frame::Hello {
        id,
        info,
        incarnation,
        nonce: theirs,
    }) = hello
    else {
        return Err(std::io::Error::other("peer did not start with a hello"));
    };
    write_frame(
        s,
        &Frame::Proof {
            mac: mac(&me.secret, &theirs, me.id),
        },
    )
    .await?;
    let proof = tokio::time::timeout(Duration::from_secs(5), read_frame(s))
        .await
        .map_err(|_| std::io::Error::other("no proof from peer within 5 s"))??;
    let Some(Frame::Proof { mac: got }) = proof else {
        return Err(std::io::Error::other("peer did not send its proof"));
    };
    if !verify(&me.secret, &nonce, id, &got) {
        return Err(std::io::Error::other(format!(
            "node {} ({}) presented a wrong cluster secret; refusing it (check cluster.secret / --cluster-secret on both nodes)",
            info.name, info.addr
        )));
    }
    Ok(PeerHello {
        id,
        info,
        incarnation,
    })
}

/// An outgoing connection to one peer, re-established when it drops.
#[derive(Debug)]
pub struct Peer {
    /// Address dialled.
    pub addr: String,
    /// Its id once known (0 before the first handshake).
    pub id: AtomicU64,
    /// Its boot id (from hello and pongs).
    pub incarnation: AtomicU64,
    /// Last time it answered (ms since epoch); 0 = never.
    pub last_seen: AtomicU64,
    tx: std::sync::Mutex<Option<mpsc::UnboundedSender<Frame>>>,
    pending: dashmap::DashMap<u64, oneshot::Sender<Result<RespBody, String>>>,
    next_rid: AtomicU64,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Peer {
    /// A peer at `addr`, not yet connected.
    pub fn new(addr: String) -> Arc<Peer> {
        Arc::new(Peer {
            addr,
            id: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
            last_seen: AtomicU64::new(0),
            tx: std::sync::Mutex::new(None),
            pending: dashmap::DashMap::new(),
            next_rid: AtomicU64::new(1),
        })
    }

    /// Sends a request now; the receiver yields the answer (None when not
    /// connected).
    pub fn send_req(&self, req: Req) -> Option<oneshot::Receiver<Result<RespBody, String>>> {
        let tx = self.tx.lock().ok()?.clone()?;
        let rid = self.next_rid.fetch_add(1, Ordering::Relaxed);
        let (rtx, rrx) = oneshot::channel();
        self.pending.insert(rid, rtx);
        if tx.send(Frame::Req { rid, req }).is_err() {
            self.pending.remove(&rid);
            return None;
        }
        Some(rrx)
    }

    /// Sends a request and waits (bounded) for the answer.
    pub async fn call(&self, req: Req, timeout: Duration) -> Result<RespBody, String> {
        let Some(rrx) = self.send_req(req) else {
            return Err(format!("node at {} is not connected", self.addr));
        };
        match tokio::time::timeout(timeout, rrx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(format!("connection to {} closed", self.addr)),
            Err(_) => Err(format!(
                "node at {} did not answer within {timeout:?}",
                self.addr
            )),
        }
    }

    /// Whether it answered within `within` ms.
    pub fn alive(&self, within: u64) -> bool {
        let l = self.last_seen.load(Ordering::Relaxed);
        l != 0 && now_ms().saturating_sub(l) < within
    }

    fn fail_pending(&self) {
        let keys: Vec<u64> = self.pending.iter().map(|e| *e.key()).collect();
        for k in keys {
            if let Some((_, tx)) = self.pending.remove(&k) {
                let _ = tx.send(Err(format!("connection to {} lost", self.addr)));
            }
        }
    }

    /// Keeps the connection up and pings through it until `stop`.
    pub async fn run(
        self: Arc<Self>,
        me: Me,
        on_hello: impl Fn(PeerHello) + Send + 'static,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            if *stop.borrow() {
                return;
            }
            match TcpStream::connect(&self.addr).await {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let mut s: super::tls::BoxIo = match &me.tls {
                        Some(t) => match t.connect(&self.addr, tcp).await {
                            Ok(s) => s,
                            Err(e) => {
                                tracing::warn!(peer = %self.addr, "TLS with the node failed: {e}; check cluster.tls_* on both nodes");
                                tokio::select! {
                                    _ = tokio::time::sleep(Duration::from_millis(1000)) => {}
                                    _ = stop.changed() => {}
                                }
                                continue;
                            }
                        },
                        None => Box::new(tcp),
                    };
                    match handshake(&mut s, &me).await {
                        Ok(h) => {
                            self.id.store(h.id, Ordering::Relaxed);
                            self.incarnation.store(h.incarnation, Ordering::Relaxed);
                            self.last_seen.store(now_ms(), Ordering::Relaxed);
                            on_hello(h);
                            self.serve(s, &mut stop).await;
                        }
                        Err(e) => {
                            tracing::warn!(peer = %self.addr, "cluster handshake failed: {e}");
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(peer = %self.addr, "cannot reach node: {e}");
                }
            }
            if let Ok(mut g) = self.tx.lock() {
                *g = None;
            }
            self.fail_pending();
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                _ = stop.changed() => {}
            }
        }
    }

    async fn serve(&self, s: super::tls::BoxIo, stop: &mut tokio::sync::watch::Receiver<bool>) {
        let (mut rd, mut wr) = tokio::io::split(s);
        let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
        if let Ok(mut g) = self.tx.lock() {
            *g = Some(tx.clone());
        }
        let writer = tokio::spawn(async move {
            let mut buf = Vec::with_capacity(64 * 1024);
            while let Some(f) = rx.recv().await {
                buf.clear();
                let mut frames = vec![f];
                while let Ok(more) = rx.try_recv() {
                    frames.push(more);
                    if frames.len() >= 256 {
                        break;
                    }
                }
                for f in &frames {
                    if write_frame(&mut buf, f).await.is_err() {
                        return;
                    }
                }
                if wr.write_all(&buf).await.is_err() {
                    return;
                }
            }
        });
        let mut ping = tokio::time::interval(Duration::from_millis(400));
        loop {
            tokio::select! {
                f = read_frame(&mut rd) => {
                    match f {
                        Ok(Some(Frame::Resp { rid, resp })) => {
                            self.last_seen.store(now_ms(), Ordering::Relaxed);
                            if let Ok(RespBody::Pong { incarnation }) = &resp {
                                self.incarnation.store(*incarnation, Ordering::Relaxed);
                            }
                            if let Some((_, t)) = self.pending.remove(&rid) {
                                let _ = t.send(resp);
                            }
                        }
                        Ok(Some(_)) => {}
                        Ok(None) | Err(_) => break,
                    }
                }
                _ = ping.tick() => {
                    let rid = self.next_rid.fetch_add(1, Ordering::Relaxed);
                    if tx.send(Frame::Req { rid, req: Req::Ping }).is_err() {
                        break;
                    }
                }
                _ = stop.changed() => break,
            }
        }
        writer.abort();
    }
}
