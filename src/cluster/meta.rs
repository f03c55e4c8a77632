//! The metadata group's state machine: quorum queue definitions. Applying
//! a definition creates the queue on this node (its Raft replica when this
//! node is a member, a forwarding handle otherwise); applying a delete
//! removes it. Replaying the log at start re-creates every quorum queue.
//! Replicated streams (`StreamDef`) are kept here too: declare, delete
//! and leader changes (see `queue/stream/replica.rs`).

use super::Cluster;
use super::sm::{Applied, NoSnapshot, no_install};
use super::types::{Cmd, MetaCmd, NodeId, NodeInfo, QuorumDef, Resp, StreamDef, TypeConfig};
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
    /// Replicated streams.
    pub streams: BTreeMap<(String, String), StreamDef>,
    /// Classic queues and their home nodes (`cluster::classic`).
    pub classic: BTreeMap<(String, String), super::types::ClassicDef>,
    applied: Applied,
}

impl MetaState {
    /// The type of the queue registered under this name, if any.
    fn type_of(&self, key: &(String, String)) -> Option<&'static str> {
        if self.queues.contains_key(key) {
            Some("quorum")
        } else if self.streams.contains_key(key) {
            Some("stream")
        } else if self.classic.contains_key(key) {
            Some("classic")
        } else {
            None
        }
    }
}

/// RabbitMQ's refusal of a declare whose x-queue-type differs from the
/// existing queue's.
fn inequivalent_type(vhost: &str, name: &str, received: &str, current: &str) -> String {
    format!(
        "inequivalent arg 'x-queue-type' for queue '{name}' in vhost '{vhost}': received '{received}' but current is '{current}'"
    )
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
    StreamCreate(StreamDef),
    StreamDelete(StreamDef),
    StreamLeader(StreamDef),
    Classic(super::classic::Effect),
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
                        } else if let Some(other) = st.type_of(&key) {
                            Resp::Refused(
                                406,
                                inequivalent_type(&def.vhost, &def.name, "quorum", other),
                            )
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
                    Some(Cmd::Meta(MetaCmd::DeclareStream(def))) => {
                        let key = (def.vhost.clone(), def.name.clone());
                        if let Some(existing) = st.streams.get(&key) {
                            Resp::Count(existing.id)
                        } else if let Some(other) = st.type_of(&key) {
                            Resp::Refused(
                                406,
                                inequivalent_type(&def.vhost, &def.name, "stream", other),
                            )
                        } else {
                            st.streams.insert(key, def.clone());
                            let id = def.id;
                            effect = Some(Effect::StreamCreate(def));
                            Resp::Count(id)
                        }
                    }
                    Some(Cmd::Meta(MetaCmd::DeleteStream { vhost, name })) => {
                        if let Some(def) = st.streams.remove(&(vhost, name)) {
                            effect = Some(Effect::StreamDelete(def));
                        }
                        Resp::Ok
                    }
                    Some(Cmd::Meta(MetaCmd::StreamLeader {
                        vhost,
                        name,
                        id,
                        leader,
                        epoch,
                    })) => match st.streams.get_mut(&(vhost, name)) {
                        Some(def) if def.id == id && def.epoch + 1 == epoch => {
                            def.leader = leader;
                            def.epoch = epoch;
                            effect = Some(Effect::StreamLeader(def.clone()));
                            Resp::Ok
                        }
                        _ => Resp::Refused(409, "stale stream leader change".into()),
                    },
                    Some(Cmd::Meta(MetaCmd::DeclareClassic(def))) => {
                        let st = &mut *st;
                        let taken = st
                            .queues
                            .contains_key(&(def.vhost.clone(), def.name.clone()))
                            || st
                                .streams
                                .contains_key(&(def.vhost.clone(), def.name.clone()));
                        let (resp, eff) =
                            super::classic::apply_declare(&mut st.classic, taken, def);
                        effect = eff.map(Effect::Classic);
                        resp
                    }
                    Some(Cmd::Meta(MetaCmd::DeleteClassic {
                        vhost,
                        name,
                        home,
                        id,
                        incarnation,
                    })) => {
                        let eff = super::classic::apply_delete(
                            &mut st.classic,
                            vhost,
                            name,
                            home,
                            id,
                            incarnation,
                        );
                        effect = eff.map(Effect::Classic);
                        Resp::Ok
                    }
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
                    Effect::StreamCreate(def) => {
                        crate::queue::stream::replica::materialize(&c, &def).await
                    }
                    Effect::StreamDelete(def) => {
                        crate::queue::stream::replica::dematerialize(&c, &def).await
                    }
                    Effect::StreamLeader(def) => {
                        crate::queue::stream::replica::leader_changed(&c, &def).await
                    }
                    Effect::Classic(eff) => super::classic::apply_effect(&c, eff),
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
