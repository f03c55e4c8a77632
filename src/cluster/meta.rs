//! The metadata group's state machine: quorum queue definitions. Applying
//! a definition creates the queue on this node (its Raft replica when this
//! node is a member, a forwarding handle otherwise); applying a delete
//! removes it. Replaying the log at start re-creates every quorum queue.

use super::Cluster;
use super::sm::{Applied, NoSnapshot, no_install};
use super::types::{Cmd, MetaCmd, NodeId, NodeInfo, QuorumDef, Resp, TypeConfig};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{LogId, SnapshotMeta, StorageError, StoredMembership};
use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::{Arc, Mutex, Weak};

/// Quorum queues by (vhost, name).
#[derive(Debug, Default)]
pub struct MetaState {
    /// Definitions.
    pub queues: BTreeMap<(String, String), QuorumDef>,
    applied: Applied,
}

/// The metadata state machine.
pub struct MetaSm {
    state: Arc<Mutex<MetaState>>,
    cluster: Weak<Cluster>,
}

impl MetaSm {
    /// Over shared state.
    pub fn new(state: Arc<Mutex<MetaState>>, cluster: Weak<Cluster>) -> MetaSm {
        MetaSm { state, cluster }
    }
}

enum Effect {
    Defs(NodeId, crate::store::defs::DefChange),
    Create(QuorumDef),
    Delete(QuorumDef),
    Members(QuorumDef),
}

impl RaftStateMachine<TypeConfig> for MetaSm {
    type SnapshotBuilder = NoSnapshot;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), StorageError<NodeId>>
    {
        let st = self.state.lock().map_err(|_| no_install())?;
        Ok((st.applied.last, st.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Resp>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = openraft::Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        for e in entries {
            let mut effect = None;
            let resp = {
                let mut st = self.state.lock().map_err(|_| no_install())?;
                match st.applied.take(e) {
                    Some(Cmd::Meta(MetaCmd::DeclareQuorum(def))) => {
                        let key = (def.vhost.clone(), def.name.clone());
                        if let Some(existing) = st.queues.get(&key) {
                            Resp::Count(existing.id)
                        } else {
                            st.queues.insert(key, def.clone());
                            let id = def.id;
                            effect = Some(Effect::Create(def));
                            Resp::Count(id)
                        }
                    }
                    Some(Cmd::Meta(MetaCmd::DeleteQuorum { vhost, name })) => {
                        match st.queues.remove(&(vhost, name)) {
                            Some(def) => {
                                effect = Some(Effect::Delete(def));
                                Resp::Ok
                            }
                            None => Resp::Ok,
                        }
                    }
                    Some(Cmd::Meta(MetaCmd::Defs { origin, change })) => {
                        effect = Some(Effect::Defs(origin, change));
                        Resp::Ok
                    }
                    Some(Cmd::Meta(MetaCmd::SetMembers {
                        vhost,
                        name,
                        members,
                    })) => match st.queues.get_mut(&(vhost, name)) {
                        Some(def) => {
                            def.members = members;
                            effect = Some(Effect::Members(def.clone()));
                            Resp::Ok
                        }
                        None => Resp::Refused(404, "no such quorum queue".into()),
                    },
                    _ => Resp::Ok,
                }
            };
            if let (Some(eff), Some(c)) = (effect, self.cluster.upgrade()) {
                match eff {
                    // Applied everywhere, the origin too: the log's order is
                    // the one every node converges to (the origin re-applies
                    // what it already has; imports are idempotent).
                    Effect::Defs(origin, change) => {
                        if let Some(a) = c.defs_applier.get() {
                            let _ = a.send((origin, change));
                        }
                    }
                    Effect::Create(def) => crate::queue::quorum::materialize(&c, &def).await,
                    Effect::Delete(def) => crate::queue::quorum::dematerialize(&c, &def).await,
                    Effect::Members(def) => crate::queue::quorum::members_changed(&c, &def).await,
                }
            }
            out.push(resp);
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> NoSnapshot {
        NoSnapshot
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        _meta: &SnapshotMeta<NodeId, NodeInfo>,
        _snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        Err(no_install())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        Ok(None)
    }
}
