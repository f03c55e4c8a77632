//! Creating queues: the one place that turns a declare (from a channel, the
//! management API or a definitions import) into a running queue of the
//! right type, registered in its vhost and recorded in the store.

use super::persist::QueueDef;
use super::{Broker, VHost};
use crate::protocol::error::AmqpError;
use crate::queue::args::QueueArgs;
use crate::queue::{QueueCmd, QueueRef, actor};
use amq_protocol::types::FieldTable;
use std::sync::Arc;

/// What to create.
#[derive(Debug, Clone)]
pub struct NewQueue {
    /// Name (already generated for server-named queues).
    pub name: String,
    /// Durable.
    pub durable: bool,
    /// Owning connection for exclusive queues.
    pub exclusive_owner: Option<u64>,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
}

/// Returns the queue named `spec.name`, creating it (classic or stream, as
/// its x-queue-type says) if it does not exist. The bool is true when this
/// call created it. Equivalence with an existing queue is the caller's check.
pub async fn declare_queue(
    broker: &Arc<Broker>,
    vhost: &Arc<VHost>,
    spec: NewQueue,
) -> Result<(Arc<QueueRef>, bool), AmqpError> {
    let args = QueueArgs::parse(&spec.arguments, &spec.name, &vhost.name)?;
    if let Some(q) = vhost.queue(&spec.name) {
        return Ok((q, false));
    }
    if args.queue_type == "quorum" {
        crate::queue::quorum::check_declare(
            &spec.name,
            &vhost.name,
            spec.durable,
            spec.exclusive_owner.is_some(),
            spec.auto_delete,
        )?;
        let q = crate::queue::quorum::declare(broker, vhost, &spec.name, &spec.arguments, &args)
            .await?;
        return Ok((q, true));
    }
    if args.queue_type == "stream" && crate::queue::stream::replica::clustered(broker) {
        crate::queue::stream::check_declare(
            &spec.name,
            &vhost.name,
            spec.durable,
            spec.exclusive_owner.is_some(),
            spec.auto_delete,
        )?;
        let q = crate::queue::stream::replica::declare(broker, vhost, &spec.name, &spec.arguments)
            .await?;
        return Ok((q, true));
    }
    let id = broker.next_id();
    if args.queue_type != "stream" {
        // Clustered: the name is registered cluster-wide first; a queue
        // another node registered first is used through its proxy.
        match crate::cluster::classic::register(broker, vhost, &spec, id).await? {
            crate::cluster::classic::Registered::Here => {}
            crate::cluster::classic::Registered::Elsewhere(q) => return Ok((q, false)),
        }
    }
    let vname = vhost.name.clone();
    let make = |tx| {
        QueueRef::new(
            id,
            spec.name.clone(),
            vname.clone(),
            spec.durable,
            spec.exclusive_owner,
            spec.auto_delete,
            spec.arguments.clone(),
            args.clone(),
            tx,
        )
    };
    let created = if args.queue_type == "stream" {
        crate::queue::stream::check_declare(
            &spec.name,
            &vname,
            spec.durable,
            spec.exclusive_owner.is_some(),
            spec.auto_delete,
        )?;
        let init = crate::queue::stream::StreamInit {
            vhost: vhost.clone(),
            inbox: broker.config.queue.inbox_capacity,
            data_dir: broker.config.storage.data_dir.clone(),
            storage: broker.storage.clone(),
            fresh: true,
            repl: None,
        };
        crate::queue::stream::spawn(make, init)?
    } else {
        let b = broker.clone();
        actor::spawn(
            make,
            actor::QueueInit {
                vhost: vhost.clone(),
                inbox: broker.config.queue.inbox_capacity,
                window: broker.config.queue.max_in_memory,
                storage: broker.storage.clone(),
                recovered: Vec::new(),
                gids: Some(Arc::new(move || b.next_gid())),
                flow_threshold: broker.config.queue.flow_control_threshold,
                on_delete: crate::cluster::classic::delete_hook(broker),
            },
        )
    };
    let winner = vhost
        .queues
        .entry(spec.name.clone())
        .or_insert(created.clone())
        .value()
        .clone();
    if winner.id != created.id {
        // Lost a race with another declare: stop ours, use theirs (and
        // make sure the cluster registry names theirs).
        if created.home.is_none() && !created.is_stream() {
            crate::cluster::classic::reregister(broker, &winner);
        }
        let _ = created
            .send(QueueCmd::Delete {
                if_unused: false,
                if_empty: false,
                reply: None,
            })
            .await;
        return Ok((winner, false));
    }
    if !vhost.policies.load().is_empty() {
        // The actor read the policies at spawn; re-read now that the queue
        // is registered, in case a policy changed in between.
        super::policy::apply_to_queue(vhost, &created).await;
    }
    if created.uses_message_store() || created.is_stream() {
        if let Some(st) = &broker.storage {
            let def = QueueDef {
                vhost: vname.clone(),
                name: spec.name.clone(),
                id,
                auto_delete: spec.auto_delete,
                arguments: spec.arguments.clone(),
            };
            st.put_queue(&def).await.map_err(|e| {
                AmqpError::internal(format!(
                    "cannot record durable queue '{}' in the definitions store: {e}",
                    spec.name
                ))
            })?;
        }
    }
    Ok((created, true))
}
