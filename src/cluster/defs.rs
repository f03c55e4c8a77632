//! Definitions replicated across the cluster: every durable vhost,
//! exchange, binding, user, permission and policy change made on one node
//! is proposed to the metadata group (in the order it was made there) and
//! applied on every node (the origin included, so all converge on the log's
//! order) in log order, through the same code paths a
//! definitions import or a management API call uses. Queues are not
//! definition changes: quorum queues, streams and classic queues have their
//! own entries in the metadata group (a classic queue lives on its home
//! node and every other node gets a proxy that forwards to it, see
//! `classic.rs`), so a replicated binding to a classic queue of another
//! node binds that node's proxy.
//!
//! A node joining later replays the metadata log and so receives every
//! change made before it joined.

use super::Cluster;
use super::types::{Cmd, META_GROUP, MetaCmd, NodeId};
use crate::broker::Broker;
use crate::store::defs::{APPLYING_REPLICATED, DefChange};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// Starts the replicator (local changes → metadata group) and returns the
/// sender for changes other nodes made (metadata apply → this node).
pub fn start(
    cluster: &Arc<Cluster>,
    broker: &Arc<Broker>,
) -> mpsc::UnboundedSender<(NodeId, DefChange)> {
    let (local_tx, mut local_rx) = mpsc::unbounded_channel::<DefChange>();
    if let Some(st) = &broker.storage {
        st.defs.set_replicator(local_tx);
    }
    let weak = Arc::downgrade(cluster);
    tokio::spawn(async move {
        while let Some(change) = local_rx.recv().await {
            // In order, one at a time, retried until the metadata group
            // takes it (or this node stops).
            loop {
                let Some(c) = weak.upgrade() else { return };
                let members: Vec<NodeId> = c.members().into_iter().map(|(id, _)| id).collect();
                let cmd = Cmd::Meta(MetaCmd::Defs {
                    origin: c.me.id,
                    change: change.clone(),
                });
                match c.propose(META_GROUP, cmd, &members).await {
                    Ok(_) => break,
                    Err(e) => {
                        warn!("a definition change could not be replicated yet ({e}); retrying");
                        drop(c);
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        }
    });
    let (remote_tx, mut remote_rx) = mpsc::unbounded_channel::<(NodeId, DefChange)>();
    let b = Arc::downgrade(broker);
    tokio::spawn(async move {
        while let Some((origin, change)) = remote_rx.recv().await {
            let Some(broker) = b.upgrade() else { return };
            APPLYING_REPLICATED
                .scope(true, apply(&broker, origin, change))
                .await;
        }
    });
    remote_tx
}

/// Applies a change made on `origin`.
async fn apply(b: &Arc<Broker>, origin: NodeId, change: DefChange) {
    use crate::mgmt::ops;
    let res: Result<(), String> = match &change {
        DefChange::Import(json) => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(v) => crate::mgmt::definitions::import(b, &v)
                .await
                .map_err(|e| e.reason),
            Err(e) => Err(e.to_string()),
        },
        DefChange::DeleteVhost(name) => ops::delete_vhost(b, name).await.map_err(|e| e.reason),
        DefChange::DeleteExchange(vhost, name) => ops::delete_exchange(b, vhost, name, false)
            .await
            .map_err(|e| e.reason),
        DefChange::Unbind(json) => match serde_json::from_str::<serde_json::Value>(json) {
            Ok(v) => {
                let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_string();
                ops::unbind(
                    b,
                    &s("vhost"),
                    &s("source"),
                    s("destination_type") == "queue",
                    &s("destination"),
                    &s("routing_key"),
                    &crate::mgmt::json::json_to_table(
                        v.get("arguments").unwrap_or(&serde_json::Value::Null),
                    ),
                )
                .await
                .map(|_| ())
                .map_err(|e| e.reason)
            }
            Err(e) => Err(e.to_string()),
        },
        DefChange::DeleteUser(name) => {
            b.users.remove(name);
            match &b.storage {
                Some(s) => crate::auth::store::delete_user(&s.defs, name)
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }
        DefChange::ClearPermissions(user, vhost) => {
            b.users.clear_permission(user, vhost);
            match &b.storage {
                Some(s) => crate::auth::store::delete_permission(&s.defs, user, vhost)
                    .await
                    .map_err(|e| e.to_string()),
                None => Ok(()),
            }
        }
        DefChange::DeletePolicy(vhost, name) => {
            if let Some(s) = &b.storage {
                let key = crate::store::defs::Definitions::key(&[vhost, name]);
                let _ = s
                    .defs
                    .delete(crate::store::defs::Table::Policies, &key)
                    .await;
            }
            crate::broker::policy::reload(b, vhost).await;
            Ok(())
        }
    };
    match res {
        Ok(()) => debug!(
            origin,
            ?change,
            "applied a definition change from another node"
        ),
        // E.g. a binding to an exclusive queue of another node, or to a
        // queue deleted meanwhile.
        Err(e) => debug!(
            origin,
            ?change,
            "definition change from another node not applied here: {e}"
        ),
    }
}

/// Where the metadata state machine sends other nodes' changes.
pub type Applier = mpsc::UnboundedSender<(NodeId, DefChange)>;
