//! Clustering: node identity, the inter-node transport, Raft groups (one
//! metadata group, one per quorum queue) sharing one write-ahead log, and
//! the per-node failure detector that drives elections.
//!
//! Every node runs this, clustered or not: on a single node the metadata
//! group and each quorum queue are Raft groups of one member, so quorum
//! queues behave the same (durable, confirmed after the log is synced).
//!
//! Failure detection is per node, not per group: openraft's own heartbeats,
//! election timers and ticks are off, so an idle quorum queue costs no
//! timers or traffic. The transport pings each peer; when the node leading
//! a group stops answering (or a group has no leader, e.g. after a full
//! restart) the first live voter of that group, in id order, triggers an
//! election, and the others follow if it does not succeed in time.

pub mod classic;
pub mod defs;
pub mod log;
pub mod meta;
pub mod net;
pub mod sm;
pub mod tls;
pub mod types;

use crate::broker::Broker;
use crate::config::ClusterConfig;
use dashmap::DashMap;
use net::{Frame, Me, Peer, PeerHello, Req, RespBody, now_ms, read_frame, write_frame};
use openraft::error::{ClientWriteError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Config as RaftConfig, ServerState, SnapshotPolicy};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};
use types::{Cmd, GroupId, META_GROUP, NodeId, NodeInfo, Raft, Resp, TypeConfig};

/// A Raft group hosted on this node.
#[derive(Clone)]
pub struct Group {
    /// The Raft handle.
    pub raft: Raft,
    /// Set by the driver: this node leads the group right now.
    pub leader: Arc<AtomicBool>,
    /// Members (voters) as of the last check.
    pub voters: Arc<Mutex<Vec<NodeId>>>,
}

/// Where deliveries forwarded to this node go: (consumer id, messages).
pub type DeliverySink = Arc<dyn Fn(u64, Vec<types::GotMsg>) + Send + Sync>;

/// This node's cluster runtime.
pub struct Cluster {
    /// Identity, for handshakes.
    pub me: Me,
    /// Settings.
    pub cfg: ClusterConfig,
    /// Shared Raft log.
    pub wal: Arc<log::Wal>,
    /// Outgoing connections by address.
    pub peers: DashMap<String, Arc<Peer>>,
    /// Known nodes (from handshakes and the metadata membership).
    pub nodes: DashMap<NodeId, NodeInfo>,
    /// Raft groups on this node.
    pub groups: DashMap<GroupId, Group>,
    /// Quorum queues this node serves without a replica: forwarded
    /// deliveries land here.
    pub sinks: DashMap<GroupId, DeliverySink>,
    /// Quorum queue contexts by group (type-erased; see queue::quorum).
    pub queue_ctxs: DashMap<GroupId, Weak<dyn std::any::Any + Send + Sync>>,
    /// Applies other nodes' definition changes, in metadata log order.
    pub defs_applier: std::sync::OnceLock<defs::Applier>,
    /// Metadata state (quorum queue definitions).
    pub meta: Arc<Mutex<meta::MetaState>>,
    /// The broker this node serves.
    pub broker: Weak<Broker>,
    /// Inter-node listener address, when clustering is enabled.
    pub listen: Option<SocketAddr>,
    /// Classic queues across nodes: proxies here, remote users of the
    /// queues living here (`classic.rs`).
    pub classic: classic::Registry,
    stop: watch::Receiver<bool>,
    stop_tx: watch::Sender<bool>,
    election_at: DashMap<GroupId, u64>,
    leaderless_since: DashMap<GroupId, u64>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("node", &self.me.info.name)
            .finish_non_exhaustive()
    }
}

/// openraft settings: no heartbeats, no election timers, no ticks (the
/// failure detector drives elections); snapshots are triggered by the
/// quorum queue actor (the metadata group takes none).
fn raft_config(keep: u64) -> Result<Arc<RaftConfig>, String> {
    let c = RaftConfig {
        cluster_name: "warren".into(),
        election_timeout_min: 1000,
        election_timeout_max: 1500,
        heartbeat_interval: 500,
        enable_heartbeat: false,
        enable_elect: false,
        enable_tick: false,
        max_payload_entries: 4096,
        snapshot_policy: SnapshotPolicy::Never,
        // Entries kept before a snapshot for followers slightly behind
        // (further behind, they get the snapshot).
        max_in_snapshot_log_to_keep: keep,
        ..Default::default()
    };
    c.validate().map(Arc::new).map_err(|e| e.to_string())
}

/// Why the cluster runtime could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// The inter-node port could not be bound.
    #[error(
        "cannot listen for other nodes on {addr}: {source} (change --cluster-port or cluster.port)"
    )]
    Bind {
        /// Address.
        addr: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The Raft log or a group could not be opened.
    #[error("cannot open the Raft log: {0}")]
    Storage(String),
    /// The inter-node TLS settings are unusable.
    #[error("cannot set up TLS between nodes: {0}")]
    Tls(String),
}

impl Cluster {
    /// Starts the runtime: opens the shared log, the metadata group and
    /// every quorum queue group found in it, and (when clustering is
    /// enabled) the listener and the connections to the seeds.
    pub async fn start(broker: &Arc<Broker>) -> Result<Arc<Cluster>, ClusterError> {
        let (stop_tx, stop) = watch::channel(false);
        let cfg = broker.config.cluster.clone();
        let dir = broker.config.storage.data_dir.clone();
        let wal = log::Wal::open(&dir).map_err(|e| ClusterError::Storage(e.to_string()))?;
        let mut listen = None;
        let mut listener = None;
        if cfg.enabled {
            let bind = if cfg.bind.is_empty() {
                broker.config.amqp.bind.clone()
            } else {
                cfg.bind.clone()
            };
            let addr = format!("{bind}:{}", cfg.port);
            let l = TcpListener::bind(&addr)
                .await
                .map_err(|source| ClusterError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            listen = l.local_addr().ok();
            listener = Some(l);
        }
        let addr = listen.map(|a| a.to_string()).unwrap_or_default();
        let name = if cfg.node_name.is_empty() {
            crate::mgmt::api::node_name()
        } else {
            crate::mgmt::api::set_node_name(&cfg.node_name);
            cfg.node_name.clone()
        };
        let id = types::node_id(&name);
        let me = Me {
            id,
            info: NodeInfo { name, addr },
            incarnation: now_ms(),
            secret: cfg.secret.clone(),
            tls: tls::load(&cfg).map_err(ClusterError::Tls)?,
        };
        if me.tls.is_some() {
            info!("inter-node connections use TLS (cluster.tls_cert_file)");
        }
        if cfg.enabled && cfg.secret.is_empty() {
            warn!(
                "clustering is enabled without a cluster secret: any process that can reach the cluster port can join. Set cluster.secret / --cluster-secret"
            );
        }
        let cluster = Arc::new(Cluster {
            me: me.clone(),
            cfg: cfg.clone(),
            wal,
            peers: DashMap::new(),
            nodes: DashMap::new(),
            groups: DashMap::new(),
            sinks: DashMap::new(),
            queue_ctxs: DashMap::new(),
            defs_applier: std::sync::OnceLock::new(),
            meta: Arc::new(Mutex::new(meta::MetaState::default())),
            broker: Arc::downgrade(broker),
            listen,
            classic: classic::Registry::default(),
            stop: stop.clone(),
            stop_tx,
            election_at: DashMap::new(),
            leaderless_since: DashMap::new(),
        });
        cluster.nodes.insert(id, me.info.clone());
        if cfg.enabled {
            let applier = defs::start(&cluster, broker);
            let _ = cluster.defs_applier.set(applier);
        }
        if let Some(l) = listener {
            info!(node = %me.info.name, addr = %me.info.addr, "listening for other Warren nodes on {}", me.info.addr);
            tokio::spawn(accept_loop(l, Arc::downgrade(&cluster), stop.clone()));
        }
        // The metadata group (its log replays the quorum queue definitions,
        // which re-creates each queue and its group as it is applied).
        let meta_sm = meta::MetaSm::new(cluster.meta.clone(), Arc::downgrade(&cluster));
        let meta_raft = cluster
            .open_group(META_GROUP, meta_sm)
            .await
            .map_err(ClusterError::Storage)?;
        for s in &cfg.seeds {
            cluster.peer(s);
        }
        let initialized = meta_raft.is_initialized().await.unwrap_or(false);
        if !initialized {
            let c = cluster.clone();
            tokio::spawn(async move { c.form_cluster().await });
        }
        tokio::spawn(drive(Arc::downgrade(&cluster), stop));
        if cfg.enabled {
            tokio::spawn(crate::queue::stream::replica::failover_loop(
                Arc::downgrade(&cluster),
            ));
        }
        Ok(cluster)
    }

    /// Stops every group and the transport, and syncs the log.
    pub async fn shutdown(&self) {
        let _ = self.stop_tx.send(true);
        let groups: Vec<Raft> = self.groups.iter().map(|g| g.raft.clone()).collect();
        for r in groups {
            let _ = r.shutdown().await;
        }
        self.groups.clear();
        self.wal.sync();
    }

    /// The connection to the node at `addr`, started on first use.
    pub fn peer(self: &Arc<Self>, addr: &str) -> Arc<Peer> {
        if let Some(p) = self.peers.get(addr) {
            return p.clone();
        }
        let dial = self
            .cfg
            .dial_overrides
            .iter()
            .filter_map(|o| o.split_once('='))
            .find(|(real, _)| *real == addr)
            .map_or(addr, |(_, dial)| dial);
        let p = Peer::new(dial.to_string());
        self.peers.insert(addr.to_string(), p.clone());
        let weak = Arc::downgrade(self);
        let on_hello = move |h: PeerHello| {
            if let Some(c) = weak.upgrade() {
                c.nodes.insert(h.id, h.info);
            }
        };
        tokio::spawn(p.clone().run(self.me.clone(), on_hello, self.stop.clone()));
        p
    }

    /// The connection to a node by id, if its address is known.
    pub fn peer_by_id(self: &Arc<Self>, id: NodeId) -> Option<Arc<Peer>> {
        let addr = self.nodes.get(&id).map(|n| n.addr.clone())?;
        if addr.is_empty() {
            return None;
        }
        Some(self.peer(&addr))
    }

    /// Whether a node answered recently (this node always counts).
    pub fn alive(&self, id: NodeId) -> bool {
        if id == self.me.id {
            return true;
        }
        let addr = match self.nodes.get(&id) {
            Some(n) => n.addr.clone(),
            None => return false,
        };
        self.peers
            .get(&addr)
            .map(|p| p.alive(self.cfg.failure_timeout_ms))
            .unwrap_or(false)
    }

    /// The boot id of a live node (0 when down or unknown).
    pub fn incarnation(&self, id: NodeId) -> u64 {
        if id == self.me.id {
            return self.me.incarnation;
        }
        if !self.alive(id) {
            return 0;
        }
        let Some(addr) = self.nodes.get(&id).map(|n| n.addr.clone()) else {
            return 0;
        };
        self.peers
            .get(&addr)
            .map(|p| p.incarnation.load(Ordering::Relaxed))
            .unwrap_or(0)
    }

    /// Opens (or re-opens) a group's Raft node on this node.
    pub async fn open_group<SM>(self: &Arc<Self>, group: &str, sm: SM) -> Result<Raft, String>
    where
        SM: openraft::storage::RaftStateMachine<TypeConfig>,
    {
        if let Some(g) = self.groups.get(group) {
            return Ok(g.raft.clone());
        }
        let store = self.wal.group(group).map_err(|e| e.to_string())?;
        let net = Net {
            cluster: Arc::downgrade(self),
            group: group.to_string(),
        };
        let raft = Raft::new(
            self.me.id,
            raft_config(self.cfg.snapshot_min_entries.min(1000))?,
            net,
            store,
            sm,
        )
        .await
        .map_err(|e| format!("cannot start Raft group {group}: {e}"))?;
        self.groups.insert(
            group.to_string(),
            Group {
                raft: raft.clone(),
                leader: Arc::new(AtomicBool::new(false)),
                voters: Arc::new(Mutex::new(Vec::new())),
            },
        );
        Ok(raft)
    }

    /// Stops a group and deletes its log (the queue was deleted).
    pub async fn drop_group(&self, group: &str) {
        if let Some((_, g)) = self.groups.remove(group) {
            let _ = g.raft.shutdown().await;
        }
        self.wal.drop_group(group);
    }

    /// Initialises a fresh group with `members` (only the first member does
    /// it; the others learn it from the first append).
    pub async fn initialize(&self, raft: &Raft, members: &[NodeId]) {
        let mut m = BTreeMap::new();
        for id in members {
            let info = self.nodes.get(id).map(|n| n.clone()).unwrap_or_default();
            m.insert(*id, info);
        }
        if let Err(e) = raft.initialize(m).await {
            debug!("group already initialised: {e}");
        }
    }

    /// First start: once every seed has answered, the node with the lowest
    /// id initialises the metadata group with all of them. A node that finds
    /// the others already formed asks to join instead.
    async fn form_cluster(self: Arc<Self>) {
        let Some(meta) = self.groups.get(META_GROUP).map(|g| g.raft.clone()) else {
            return;
        };
        if self.cfg.seeds.is_empty() {
            self.initialize(&meta, &[self.me.id]).await;
            return;
        }
        let started = now_ms();
        loop {
            if *self.stop.borrow() {
                return;
            }
            if meta.is_initialized().await.unwrap_or(false) {
                return;
            }
            let seeds: Vec<Arc<Peer>> = self.cfg.seeds.iter().map(|s| self.peer(s)).collect();
            let ids: Vec<NodeId> = seeds.iter().map(|p| p.id.load(Ordering::Relaxed)).collect();
            let all_known = ids.iter().all(|i| *i != 0);
            if all_known {
                let mut members = ids.clone();
                members.push(self.me.id);
                members.sort_unstable();
                members.dedup();
                if members.first() == Some(&self.me.id) && now_ms() - started > 500 {
                    info!(
                        members = members.len(),
                        "forming a new cluster with {} nodes",
                        members.len()
                    );
                    self.initialize(&meta, &members).await;
                    return;
                }
            }
            // Already-formed cluster: ask a seed to add us.
            if now_ms() - started > 5000 {
                for p in &seeds {
                    let r = p
                        .call(
                            Req::Join {
                                id: self.me.id,
                                info: self.me.info.clone(),
                            },
                            Duration::from_secs(10),
                        )
                        .await;
                    if let Ok(RespBody::Done) = r {
                        info!(seed = %p.addr, "joined the cluster through {}", p.addr);
                        return;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Proposes a command to a group, at its leader wherever that is, and
    /// waits (bounded) for it to be applied there.
    pub async fn propose(
        self: &Arc<Self>,
        group: &str,
        cmd: Cmd,
        members: &[NodeId],
    ) -> Result<Resp, String> {
        let rx = self.start_propose(group, cmd, members).await?;
        rx.await
            .map_err(|_| format!("the proposal to {group} was abandoned"))?
    }

    /// Starts a proposal; the receiver yields the result. Proposals started
    /// one after another from one task reach the leader in that order.
    pub async fn start_propose(
        self: &Arc<Self>,
        group: &str,
        cmd: Cmd,
        members: &[NodeId],
    ) -> Result<tokio::sync::oneshot::Receiver<Result<Resp, String>>, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let deadline = now_ms() + 30_000;
        let mut cmd = Some(cmd);
        loop {
            let local = self.groups.get(group).map(|g| g.raft.clone());
            let leader = match &local {
                Some(r) => r.metrics().borrow().current_leader,
                None => None,
            };
            if let (Some(r), Some(l)) = (&local, leader) {
                if l == self.me.id {
                    let Some(c) = cmd.take() else {
                        return Err("proposal lost".into());
                    };
                    match r.client_write_ff(c).await {
                        Ok(rrx) => {
                            tokio::spawn(async move {
                                let res = match rrx.await {
                                    Ok(Ok(resp)) => Ok(resp.data),
                                    Ok(Err(ClientWriteError::ForwardToLeader(f))) => Err(format!(
                                        "leadership moved to {:?} while proposing; retry",
                                        f.leader_id
                                    )),
                                    Ok(Err(e)) => Err(e.to_string()),
                                    Err(_) => Err("the Raft group stopped".into()),
                                };
                                let _ = tx.send(res);
                            });
                            return Ok(rx);
                        }
                        Err(e) => return Err(format!("the Raft group stopped: {e}")),
                    }
                }
            }
            // Forward to the leader (or, not knowing it, to each member).
            let mut targets: Vec<NodeId> = Vec::new();
            if let Some(l) = leader {
                targets.push(l);
            }
            targets.extend(members.iter().copied().filter(|m| *m != self.me.id));
            for t in targets {
                if t == self.me.id {
                    continue;
                }
                let Some(peer) = self.peer_by_id(t) else {
                    continue;
                };
                let Some(c) = cmd.clone() else {
                    return Err("proposal lost".into());
                };
                let Some(call) = peer.start_call(Req::Propose {
                    group: group.to_string(),
                    cmd: c,
                }) else {
                    continue;
                };
                // Wait for this one before trying the next: the answer
                // says whether it was the leader.
                match tokio::time::timeout(Duration::from_secs(30), call).await {
                    Ok(Ok(Ok(RespBody::Proposed(r)))) => {
                        let _ = tx.send(Ok(r));
                        return Ok(rx);
                    }
                    Ok(Ok(Ok(RespBody::NotLeader(_)))) => continue,
                    _ => continue,
                }
            }
            if now_ms() > deadline {
                return Err(format!(
                    "no leader for {group} could be reached within 30 s (is a majority of its nodes up?)"
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Leader of a group as this node knows it.
    pub fn leader_of(&self, group: &str) -> Option<NodeId> {
        self.groups
            .get(group)
            .and_then(|g| g.raft.metrics().borrow().current_leader)
    }

    /// Members of the metadata group (the cluster's nodes).
    pub fn members(&self) -> Vec<(NodeId, NodeInfo)> {
        let Some(g) = self.groups.get(META_GROUP) else {
            return vec![(self.me.id, self.me.info.clone())];
        };
        let m = g.raft.metrics().borrow().membership_config.clone();
        m.nodes().map(|(id, n)| (*id, n.clone())).collect()
    }

    /// Adds a node to the cluster (at the metadata leader).
    async fn join(self: &Arc<Self>, id: NodeId, info: NodeInfo) -> Result<(), String> {
        let Some(meta) = self.groups.get(META_GROUP).map(|g| g.raft.clone()) else {
            return Err("no metadata group".into());
        };
        let leader = meta.metrics().borrow().current_leader;
        if leader != Some(self.me.id) {
            let Some(l) = leader else {
                return Err("the cluster has no leader right now; retry".into());
            };
            let Some(p) = self.peer_by_id(l) else {
                return Err("leader unreachable".into());
            };
            return match p
                .call(Req::Join { id, info }, Duration::from_secs(20))
                .await
            {
                Ok(RespBody::Done) => Ok(()),
                Ok(_) => Err("unexpected answer".into()),
                Err(e) => Err(e),
            };
        }
        self.nodes.insert(id, info.clone());
        self.peer(&info.addr);
        meta.add_learner(id, info, true)
            .await
            .map_err(|e| e.to_string())?;
        let mut voters: std::collections::BTreeSet<NodeId> = meta
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .collect();
        voters.insert(id);
        meta.change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        info!(node = id, "node joined the cluster");
        Ok(())
    }

    /// Joins the cluster the node at `seed` belongs to (warrenctl
    /// join_cluster).
    pub async fn join_via(self: &Arc<Self>, seed: &str) -> Result<(), String> {
        if self.me.info.addr.is_empty() {
            return Err(
                "clustering is not enabled on this node (start it with --cluster-port)".into(),
            );
        }
        let p = self.peer(seed);
        for _ in 0..50 {
            if p.alive(self.cfg.failure_timeout_ms) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        match p
            .call(
                Req::Join {
                    id: self.me.id,
                    info: self.me.info.clone(),
                },
                Duration::from_secs(20),
            )
            .await?
        {
            RespBody::Done => Ok(()),
            _ => Err("unexpected answer".into()),
        }
    }

    /// Makes `voters` the voting members of `group`, at its leader (adding
    /// new ones as learners first, so they catch up before they count).
    /// `old` names the current members, to find the leader from a node
    /// without a replica.
    pub async fn set_voters(
        self: &Arc<Self>,
        group: &str,
        voters: Vec<NodeId>,
        old: &[NodeId],
    ) -> Result<(), String> {
        let deadline = now_ms() + 60_000;
        loop {
            let local = self.groups.get(group).map(|g| g.raft.clone());
            let leader = local
                .as_ref()
                .and_then(|r| r.metrics().borrow().current_leader);
            if let (Some(raft), Some(l)) = (&local, leader) {
                if l == self.me.id {
                    let current: std::collections::BTreeSet<NodeId> = raft
                        .metrics()
                        .borrow()
                        .membership_config
                        .voter_ids()
                        .collect();
                    for v in &voters {
                        if !current.contains(v) {
                            let info = self.nodes.get(v).map(|n| n.clone()).unwrap_or_default();
                            raft.add_learner(*v, info, true)
                                .await
                                .map_err(|e| format!("cannot add the replica: {e}"))?;
                        }
                    }
                    let set: std::collections::BTreeSet<NodeId> = voters.iter().copied().collect();
                    raft.change_membership(set, false)
                        .await
                        .map_err(|e| format!("cannot change the replica set: {e}"))?;
                    return Ok(());
                }
            }
            let mut targets: Vec<NodeId> = leader.into_iter().collect();
            targets.extend(old.iter().copied().filter(|m| *m != self.me.id));
            for t in targets {
                if t == self.me.id {
                    continue;
                }
                let Some(p) = self.peer_by_id(t) else {
                    continue;
                };
                if let Ok(RespBody::Done) = p
                    .call(
                        Req::SetVoters {
                            group: group.to_string(),
                            voters: voters.clone(),
                        },
                        Duration::from_secs(70),
                    )
                    .await
                {
                    return Ok(());
                }
            }
            if now_ms() > deadline {
                return Err(format!(
                    "no leader of {group} could change its replicas within 60 s"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Removes a node from the cluster (at the metadata leader).
    pub async fn forget(self: &Arc<Self>, id: NodeId) -> Result<(), String> {
        let Some(meta) = self.groups.get(META_GROUP).map(|g| g.raft.clone()) else {
            return Err("no metadata group".into());
        };
        let leader = meta.metrics().borrow().current_leader;
        if leader != Some(self.me.id) {
            let Some(p) = leader.and_then(|l| self.peer_by_id(l)) else {
                return Err("the cluster has no reachable leader right now; retry".into());
            };
            return match p.call(Req::Forget { id }, Duration::from_secs(20)).await {
                Ok(RespBody::Done) => Ok(()),
                Ok(_) => Err("unexpected answer".into()),
                Err(e) => Err(e),
            };
        }
        let voters: std::collections::BTreeSet<NodeId> = meta
            .metrics()
            .borrow()
            .membership_config
            .voter_ids()
            .filter(|v| *v != id)
            .collect();
        meta.change_membership(voters, false)
            .await
            .map_err(|e| e.to_string())?;
        // Its classic queues go with it (as RabbitMQ's forget_cluster_node).
        classic::forget_node(self, id).await;
        Ok(())
    }
}

impl Peer {
    /// Sends a request now and returns the answer's receiver (None when
    /// not connected).
    pub fn start_call(
        &self,
        req: Req,
    ) -> Option<tokio::sync::oneshot::Receiver<Result<RespBody, String>>> {
        self.send_req(req)
    }
}

/// Per-node failure detection driving per-group elections, and group
/// bookkeeping (who leads, who votes).
async fn drive(cluster: Weak<Cluster>, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        let Some(c) = cluster.upgrade() else { return };
        let groups: Vec<(GroupId, Group)> = c
            .groups
            .iter()
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect();
        let now = now_ms();
        for (name, g) in groups {
            let m = g.raft.metrics().borrow().clone();
            for (id, n) in m.membership_config.nodes() {
                if *id != c.me.id && !n.addr.is_empty() && !c.nodes.contains_key(id) {
                    c.nodes.insert(*id, n.clone());
                    c.peer(&n.addr);
                }
            }
            let mut voters: Vec<NodeId> = m.membership_config.voter_ids().collect();
            voters.sort_unstable();
            if let Ok(mut v) = g.voters.lock() {
                v.clone_from(&voters);
            }
            let leading = m.state == ServerState::Leader;
            g.leader.store(leading, Ordering::Relaxed);
            if voters.is_empty() || !voters.contains(&c.me.id) {
                continue;
            }
            let needs = match m.current_leader {
                None => true,
                Some(l) if l == c.me.id => false,
                Some(l) => !c.alive(l),
            };
            if !needs || leading {
                c.leaderless_since.remove(&name);
                continue;
            }
            let since = *c.leaderless_since.entry(name.clone()).or_insert(now);
            // Not knowing any leader (e.g. just restarted): give a live
            // leader the failure timeout to reach us before electing,
            // unless this node is the group's only voter.
            if m.current_leader.is_none()
                && voters.len() > 1
                && now.saturating_sub(since) < c.cfg.failure_timeout_ms
            {
                continue;
            }
            let live: Vec<NodeId> = voters
                .iter()
                .copied()
                .filter(|v| Some(*v) != m.current_leader && c.alive(*v))
                .collect();
            if live.len() * 2 <= voters.len() {
                continue; // no majority reachable: an election cannot win
            }
            let first = live.first() == Some(&c.me.id);
            let waited = now.saturating_sub(since);
            // The first live voter goes at once; others after a delay
            // that grows with their rank, in case it cannot win.
            let rank = live.iter().position(|v| *v == c.me.id).unwrap_or(0) as u64;
            if !first && waited < 1500 * rank {
                continue;
            }
            let last = c.election_at.get(&name).map(|v| *v).unwrap_or(0);
            if now.saturating_sub(last) < 2000 {
                continue;
            }
            c.election_at.insert(name.clone(), now);
            debug!(group = %name, "no live leader; starting an election");
            let _ = g.raft.trigger().elect().await;
        }
    }
}

async fn accept_loop(l: TcpListener, cluster: Weak<Cluster>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            r = l.accept() => {
                let Ok((s, _)) = r else { continue };
                let Some(c) = cluster.upgrade() else { return };
                tokio::spawn(serve_incoming(s, c));
            }
            _ = stop.changed() => return,
        }
    }
}

/// Serves requests from one peer's outgoing connection.
async fn serve_incoming(tcp: tokio::net::TcpStream, c: Arc<Cluster>) {
    let _ = tcp.set_nodelay(true);
    let peer = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
    let mut s: tls::BoxIo = match &c.me.tls {
        Some(t) => {
            match tokio::time::timeout(std::time::Duration::from_secs(10), t.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(
                        "refused an inter-node connection from {peer}: TLS failed ({e}); its certificate must chain to cluster.tls_ca_file"
                    );
                    return;
                }
                Err(_) => {
                    warn!(
                        "refused an inter-node connection from {peer}: no TLS handshake within 10 s"
                    );
                    return;
                }
            }
        }
        None => Box::new(tcp),
    };
    let hello = match net::handshake(&mut s, &c.me).await {
        Ok(h) => h,
        Err(e) => {
            warn!("refused an inter-node connection: {e}");
            return;
        }
    };
    c.nodes.insert(hello.id, hello.info.clone());
    if !hello.info.addr.is_empty() {
        c.peer(&hello.info.addr);
    }
    let (mut rd, mut wr) = tokio::io::split(s);
    let (tx, mut rx) = mpsc::unbounded_channel::<Frame>();
    let writer = tokio::spawn(async move {
        let mut buf = Vec::with_capacity(64 * 1024);
        while let Some(f) = rx.recv().await {
            buf.clear();
            let mut n = 0;
            let mut f = Some(f);
            while let Some(fr) = f.take() {
                if write_frame(&mut buf, &fr).await.is_err() {
                    return;
                }
                n += 1;
                if n < 256 {
                    f = rx.try_recv().ok();
                }
            }
            if tokio::io::AsyncWriteExt::write_all(&mut wr, &buf)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    loop {
        let f = match read_frame(&mut rd).await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                debug!(peer = %hello.info.name, "inter-node connection closed: {e}");
                break;
            }
        };
        let Frame::Req { rid, req } = f else { continue };
        let reply = tx.clone();
        match req {
            Req::Ping => {
                let _ = reply.send(Frame::Resp {
                    rid,
                    resp: Ok(RespBody::Pong {
                        incarnation: c.me.incarnation,
                    }),
                });
            }
            Req::Propose { group, cmd } => {
                // In order: hand it to Raft here, wait elsewhere.
                let raft = c.groups.get(&group).map(|g| g.raft.clone());
                let Some(raft) = raft else {
                    let _ = reply.send(Frame::Resp {
                        rid,
                        resp: Ok(RespBody::NotLeader(None)),
                    });
                    continue;
                };
                let leader = raft.metrics().borrow().current_leader;
                if leader != Some(c.me.id) {
                    let _ = reply.send(Frame::Resp {
                        rid,
                        resp: Ok(RespBody::NotLeader(leader)),
                    });
                    continue;
                }
                match raft.client_write_ff(cmd).await {
                    Ok(rrx) => {
                        tokio::spawn(async move {
                            let resp = match rrx.await {
                                Ok(Ok(r)) => Ok(RespBody::Proposed(r.data)),
                                Ok(Err(ClientWriteError::ForwardToLeader(f))) => {
                                    Ok(RespBody::NotLeader(f.leader_id))
                                }
                                Ok(Err(e)) => Err(e.to_string()),
                                Err(_) => Err("group stopped".into()),
                            };
                            let _ = reply.send(Frame::Resp { rid, resp });
                        });
                    }
                    Err(e) => {
                        let _ = reply.send(Frame::Resp {
                            rid,
                            resp: Err(e.to_string()),
                        });
                    }
                }
            }
            // In arrival order (a proxy's publishes, settles and
            // consumer changes; a home's deliveries): never spawned.
            Req::Classic {
                vhost,
                name,
                id,
                incarnation,
                op,
            } => {
                let to = classic::Origin {
                    node: hello.id,
                    incarnation,
                };
                classic::serve(&c, to, (vhost, name, id), op, rid, reply);
            }
            Req::ClassicEvent {
                vhost,
                name,
                id,
                incarnation,
                ev,
            } => {
                let resp = classic::event(&c, (vhost, name, id), incarnation, ev);
                let _ = reply.send(Frame::Resp {
                    rid,
                    resp: Ok(resp),
                });
            }
            // Replicated streams: chunks and forwarded publishes reach
            // the stream's actor in arrival order; the answer is awaited
            // elsewhere.
            r @ (Req::StreamAppend { .. }
            | Req::StreamPublish { .. }
            | Req::StreamTail { .. }
            | Req::StreamRead { .. }) => {
                let rx = crate::queue::stream::replica::handle(&c, r);
                tokio::spawn(async move {
                    let resp = rx
                        .await
                        .unwrap_or_else(|_| Err("stream replica stopped".into()));
                    let _ = reply.send(Frame::Resp { rid, resp });
                });
            }
            other => {
                let c = c.clone();
                tokio::spawn(async move {
                    let resp = handle_req(&c, other).await;
                    let _ = reply.send(Frame::Resp { rid, resp });
                });
            }
        }
    }
    writer.abort();
}

async fn handle_req(c: &Arc<Cluster>, req: Req) -> Result<RespBody, String> {
    let raft_of = |g: &str| {
        c.groups
            .get(g)
            .map(|g| g.raft.clone())
            .ok_or_else(|| format!("group {g} is not hosted on this node"))
    };
    match req {
        Req::Append { group, rpc } => raft_of(&group)?
            .append_entries(rpc)
            .await
            .map(RespBody::Append)
            .map_err(|e| e.to_string()),
        Req::Vote { group, rpc } => raft_of(&group)?
            .vote(rpc)
            .await
            .map(RespBody::Vote)
            .map_err(|e| e.to_string()),
        Req::Snapshot { group, rpc } => raft_of(&group)?
            .install_snapshot(rpc)
            .await
            .map(RespBody::Snapshot)
            .map_err(|e| e.to_string()),
        Req::Join { id, info } => c.join(id, info).await.map(|_| RespBody::Done),
        Req::SetVoters { group, voters } => {
            let leads = c
                .groups
                .get(&group)
                .map(|g| g.raft.metrics().borrow().current_leader == Some(c.me.id))
                .unwrap_or(false);
            if !leads {
                return Err("not the leader".into());
            }
            c.set_voters(&group, voters, &[])
                .await
                .map(|_| RespBody::Done)
        }
        Req::Forget { id } => c.forget(id).await.map(|_| RespBody::Done),
        Req::Deliver {
            group,
            incarnation,
            local_id,
            msgs,
        } => {
            if incarnation == c.me.incarnation {
                if let Some(sink) = c.sinks.get(&group).map(|s| s.clone()) {
                    sink(local_id, msgs);
                }
            }
            Ok(RespBody::Done)
        }
        Req::Ping | Req::Propose { .. } | Req::Classic { .. } | Req::ClassicEvent { .. } => {
            Err("handled elsewhere".into())
        }
        Req::StreamAppend { .. }
        | Req::StreamPublish { .. }
        | Req::StreamTail { .. }
        | Req::StreamRead { .. } => Err("handled elsewhere".into()),
    }
}

/// openraft's network for one group: RPCs ride the node-to-node connection.
#[derive(Clone)]
pub struct Net {
    cluster: Weak<Cluster>,
    group: GroupId,
}

/// A client for one (group, target node).
pub struct NetClient {
    cluster: Weak<Cluster>,
    group: GroupId,
    target: NodeId,
    addr: String,
}

impl RaftNetworkFactory<TypeConfig> for Net {
    type Network = NetClient;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> NetClient {
        NetClient {
            cluster: self.cluster.clone(),
            group: self.group.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

#[derive(Debug)]
struct NetErr(String);
impl std::fmt::Display for NetErr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for NetErr {}

type RpcErr<E = openraft::error::Infallible> = RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>;

impl NetClient {
    async fn call(&self, req: Req, timeout: Duration) -> Result<RespBody, Unreachable> {
        let Some(c) = self.cluster.upgrade() else {
            return Err(Unreachable::new(&NetErr("node shutting down".into())));
        };
        let peer = if self.addr.is_empty() {
            c.peer_by_id(self.target)
        } else {
            Some(c.peer(&self.addr))
        };
        let Some(peer) = peer else {
            return Err(Unreachable::new(&NetErr(format!(
                "address of node {} unknown",
                self.target
            ))));
        };
        peer.call(req, timeout)
            .await
            .map_err(|e| Unreachable::new(&NetErr(e)))
    }
}

impl RaftNetwork<TypeConfig> for NetClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr> {
        match self
            .call(
                Req::Append {
                    group: self.group.clone(),
                    rpc,
                },
                option.hard_ttl().max(Duration::from_secs(5)),
            )
            .await
        {
            Ok(RespBody::Append(r)) => Ok(r),
            Ok(_) => Err(RPCError::Unreachable(Unreachable::new(&NetErr(
                "unexpected answer".into(),
            )))),
            Err(e) => Err(RPCError::Unreachable(e)),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<openraft::error::InstallSnapshotError>>
    {
        match self
            .call(
                Req::Snapshot {
                    group: self.group.clone(),
                    rpc,
                },
                option.hard_ttl().max(Duration::from_secs(10)),
            )
            .await
        {
            Ok(RespBody::Snapshot(r)) => Ok(r),
            Ok(_) => Err(RPCError::Unreachable(Unreachable::new(&NetErr(
                "unexpected answer".into(),
            )))),
            Err(e) => Err(RPCError::Unreachable(e)),
        }
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr> {
        match self
            .call(
                Req::Vote {
                    group: self.group.clone(),
                    rpc,
                },
                option.hard_ttl().max(Duration::from_secs(3)),
            )
            .await
        {
            Ok(RespBody::Vote(r)) => Ok(r),
            Ok(_) => Err(RPCError::Unreachable(Unreachable::new(&NetErr(
                "unexpected answer".into(),
            )))),
            Err(e) => Err(RPCError::Unreachable(e)),
        }
    }
}

/// Ids of nodes, sorted, for placement.
pub fn pick_members(live: &[NodeId], size: usize, spread: u64) -> Vec<NodeId> {
    let mut v = live.to_vec();
    v.sort_unstable();
    v.dedup();
    if v.is_empty() {
        return v;
    }
    let n = v.len();
    let start = (spread as usize) % n;
    (0..size.min(n)).map(|i| v[(start + i) % n]).collect()
}
