//! Broker operations the management API performs, shared by its handlers
//! and by definitions import. Each mirrors what a channel does for the same
//! AMQP method (same checks, same persistence), without a connection.

use super::ApiError;
use crate::broker::exchange::{Binding, Destination, Exchange};
use crate::broker::persist::{BindingDef, binding_is_durable};
use crate::broker::{Broker, VHost};
use crate::queue::core::{Envelope, Outcome, Owner};
use crate::queue::message::Message;
use crate::queue::{QueueCmd, QueueRef};
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::FieldTable;
use bytes::Bytes;
use std::sync::Arc;
use tokio::sync::oneshot;

/// The vhost, or 404.
pub fn vhost(b: &Broker, name: &str) -> Result<Arc<VHost>, ApiError> {
    b.vhost(name).ok_or_else(ApiError::not_found)
}

/// Creates a vhost (idempotent); true when it is new.
pub async fn add_vhost(b: &Broker, name: &str) -> Result<bool, ApiError> {
    if name.is_empty() {
        return Err(ApiError::bad_request("vhost name must not be empty"));
    }
    let mut created = false;
    b.vhosts.entry(name.to_string()).or_insert_with(|| {
        created = true;
        VHost::new(name)
    });
    if let Some(st) = &b.storage {
        st.put_vhost(name).await?;
    }
    Ok(created)
}

/// Deletes a vhost with all its queues, exchanges, bindings and permissions.
pub async fn delete_vhost(b: &Broker, name: &str) -> Result<(), ApiError> {
    let (_, v) = b.vhosts.remove(name).ok_or_else(ApiError::not_found)?;
    let queues: Vec<Arc<QueueRef>> = v.queues.iter().map(|q| q.value().clone()).collect();
    for q in queues {
        delete_queue_ref(&q, false, false).await?;
    }
    // Close connections to it, as RabbitMQ does.
    for c in b.connections.iter().filter(|c| c.vhost == name) {
        let _ = c.tx.send(crate::broker::ConnCmd::ForceClose {
            reason: format!("vhost '{name}' is deleted"),
        });
    }
    b.users.clear_vhost(name);
    if let Some(st) = &b.storage {
        use crate::store::defs::{Definitions, Table};
        for (k, _) in st
            .defs
            .list_prefix::<serde_json::Value>(Table::Exchanges, &Definitions::key(&[name, ""]))?
        {
            st.defs.delete(Table::Exchanges, &k).await?;
        }
        for (k, bd) in st.defs.list::<BindingDef>(Table::Bindings)? {
            if bd.vhost == name {
                st.defs.delete(Table::Bindings, &k).await?;
            }
        }
        for (k, p) in st
            .defs
            .list::<super::definitions::PolicyDef>(Table::Policies)?
        {
            if p.vhost == name {
                st.defs.delete(Table::Policies, &k).await?;
            }
        }
        crate::auth::store::delete_vhost_permissions(&st.defs, name).await?;
        st.defs.delete(Table::VHosts, name).await?;
        st.defs
            .replicate(crate::store::defs::DefChange::DeleteVhost(name.to_string()));
    }
    Ok(())
}

/// exchange.declare (not passive), with the same types as AMQP
/// (x-delayed-message routes as its x-delayed-type argument).
#[allow(clippy::too_many_arguments)]
pub async fn declare_exchange(
    b: &Broker,
    vhost_name: &str,
    name: &str,
    kind: &str,
    durable: bool,
    auto_delete: bool,
    internal: bool,
    arguments: FieldTable,
) -> Result<(), ApiError> {
    let v = vhost(b, vhost_name)?;
    let (k, delayed) = crate::broker::exchange::declared_kind(kind, &arguments)
        .map_err(|e| ApiError::bad_request(e.text))?;
    if name.is_empty() || (name.starts_with("amq.") && v.exchange(name).is_none()) {
        return Err(ApiError::bad_request(format!(
            "exchange name '{name}' is reserved"
        )));
    }
    let mut built = Exchange::new(name, k, durable, auto_delete, internal, arguments);
    if delayed {
        built = built.into_delayed();
    }
    let new = Arc::new(built);
    let existing = v
        .exchanges
        .entry(name.to_string())
        .or_insert(new.clone())
        .value()
        .clone();
    if !Arc::ptr_eq(&existing, &new) {
        if existing.kind != k
            || existing.delayed != delayed
            || existing.durable != durable
            || existing.auto_delete != auto_delete
            || existing.internal != internal
        {
            return Err(ApiError::bad_request(format!(
                "PRECONDITION_FAILED - inequivalent arg for exchange '{name}' in vhost '{vhost_name}'"
            )));
        }
        return Ok(());
    }
    if durable {
        if let Some(st) = &b.storage {
            st.put_exchange(vhost_name, &new).await?;
        }
    }
    Ok(())
}

/// exchange.delete.
pub async fn delete_exchange(
    b: &Broker,
    vhost_name: &str,
    name: &str,
    if_unused: bool,
) -> Result<(), ApiError> {
    let v = vhost(b, vhost_name)?;
    let ex = v.exchange(name).ok_or_else(ApiError::not_found)?;
    if name.is_empty() || name.starts_with("amq.") {
        return Err(ApiError::bad_request(format!(
            "deletion of system exchange '{name}' in vhost '{vhost_name}' not allowed"
        )));
    }
    if if_unused && ex.binding_count() > 0 {
        return Err(ApiError::bad_request(format!(
            "exchange '{name}' in vhost '{vhost_name}' in use"
        )));
    }
    let gone = v.delete_exchange(name);
    if let Some(st) = &b.storage {
        for n in gone {
            st.delete_exchange(vhost_name, &n).await?;
        }
    }
    Ok(())
}

/// queue.declare (not passive, not exclusive): creates or checks equivalence.
pub async fn declare_queue(
    b: &Arc<Broker>,
    vhost_name: &str,
    name: &str,
    durable: bool,
    auto_delete: bool,
    arguments: FieldTable,
) -> Result<Arc<QueueRef>, ApiError> {
    let v = vhost(b, vhost_name)?;
    if name.is_empty() || name.starts_with("amq.") {
        return Err(ApiError::bad_request(format!(
            "queue name '{name}' contains reserved prefix 'amq.*'"
        )));
    }
    if let Some(q) = v.queue(name) {
        if q.durable != durable || q.auto_delete != auto_delete {
            return Err(ApiError::bad_request(format!(
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{name}' in vhost '{vhost_name}'"
            )));
        }
        crate::queue::args::check_equivalent(&q.arguments, &arguments, name, vhost_name)?;
        return Ok(q);
    }
    let spec = crate::broker::declare::NewQueue {
        name: name.to_string(),
        durable,
        exclusive_owner: None,
        auto_delete,
        arguments,
    };
    let (q, _) = crate::broker::declare::declare_queue(b, &v, spec).await?;
    Ok(q)
}

/// queue.delete of a known queue; the number of messages deleted.
pub async fn delete_queue_ref(
    q: &QueueRef,
    if_unused: bool,
    if_empty: bool,
) -> Result<u64, ApiError> {
    let (tx, rx) = oneshot::channel();
    if !q
        .send(QueueCmd::Delete {
            if_unused,
            if_empty,
            reply: Some(tx),
        })
        .await
    {
        return Ok(0);
    }
    match rx.await {
        Ok(r) => Ok(r?),
        Err(_) => Ok(0),
    }
}

/// The queue, or 404.
pub fn queue(b: &Broker, vhost_name: &str, name: &str) -> Result<Arc<QueueRef>, ApiError> {
    vhost(b, vhost_name)?
        .queue(name)
        .ok_or_else(ApiError::not_found)
}

/// queue.purge; the number purged.
pub async fn purge_queue(q: &QueueRef) -> u64 {
    let (tx, rx) = oneshot::channel();
    if q.send(QueueCmd::Purge { reply: tx }).await {
        rx.await.unwrap_or(0)
    } else {
        0
    }
}

/// queue.bind / exchange.bind.
pub async fn bind(
    b: &Broker,
    vhost_name: &str,
    source: &str,
    to_queue: bool,
    dest: &str,
    routing_key: &str,
    arguments: FieldTable,
) -> Result<(), ApiError> {
    let v = vhost(b, vhost_name)?;
    if source.is_empty() {
        return Err(ApiError::bad_request(
            "operation not permitted on the default exchange",
        ));
    }
    let src = v.exchange(source).ok_or_else(ApiError::not_found)?;
    let dest = if to_queue {
        Destination::Queue(v.queue(dest).ok_or_else(ApiError::not_found)?)
    } else {
        Destination::Exchange(v.exchange(dest).ok_or_else(ApiError::not_found)?)
    };
    let binding = Binding {
        dest,
        routing_key: routing_key.to_string(),
        arguments,
    };
    if src.bind(binding.clone())? && binding_is_durable(&src, &binding.dest) {
        if let Some(st) = &b.storage {
            st.put_binding(&BindingDef::of(vhost_name, source, &binding))
                .await?;
        }
    }
    Ok(())
}

/// queue.unbind / exchange.unbind; false when there was no such binding.
pub async fn unbind(
    b: &Broker,
    vhost_name: &str,
    source: &str,
    to_queue: bool,
    dest: &str,
    routing_key: &str,
    arguments: &FieldTable,
) -> Result<bool, ApiError> {
    let v = vhost(b, vhost_name)?;
    let src = v.exchange(source).ok_or_else(ApiError::not_found)?;
    let d = if to_queue {
        v.queue(dest).map(Destination::Queue)
    } else {
        v.exchange(dest).map(Destination::Exchange)
    }
    .ok_or_else(ApiError::not_found)?;
    let (removed, left) = src.unbind(to_queue, dest, routing_key, arguments);
    if !removed {
        return Ok(false);
    }
    if let Some(st) = &b.storage {
        let binding = Binding {
            dest: d,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        if binding_is_durable(&src, &binding.dest) {
            st.delete_binding(&BindingDef::of(vhost_name, source, &binding))
                .await?;
        }
        if left == 0 && src.auto_delete {
            for n in v.delete_exchange(&src.name) {
                st.delete_exchange(vhost_name, &n).await?;
            }
        }
    }
    Ok(true)
}

/// Publishes one message through `exchange` as a channel would (without
/// confirms); true when it reached at least one queue.
pub async fn publish(
    b: &Broker,
    vhost_name: &str,
    exchange: &str,
    routing_key: &str,
    properties: BasicProperties,
    body: Bytes,
) -> Result<bool, ApiError> {
    let v = vhost(b, vhost_name)?;
    let ex = v.exchange(exchange).ok_or_else(ApiError::not_found)?;
    let raw_properties = crate::protocol::frame::encode_properties(&properties);
    let msg = Arc::new(Message {
        exchange: Bytes::copy_from_slice(exchange.as_bytes()),
        routing_key: Bytes::copy_from_slice(routing_key.as_bytes()),
        properties,
        raw_properties,
        body,
    });
    let headers = msg.properties.headers().clone();
    let mut targets = Vec::new();
    v.route(&ex, routing_key, headers.as_ref(), &mut targets);
    // Counted as a channel's publish would be.
    let totals = &b.mgmt_stats.retired;
    totals.incr(super::stats::Counts::PUBLISH);
    ex.stats
        .publish_in
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ex.stats
        .publish_out
        .fetch_add(targets.len() as u64, std::sync::atomic::Ordering::Relaxed);
    if targets.is_empty() {
        totals.incr(super::stats::Counts::DROP_UNROUTABLE);
        return Ok(false);
    }
    let mut gid = 0;
    if msg.is_persistent() {
        if let Some(st) = &b.storage {
            let stored: Vec<u64> = targets
                .iter()
                .filter(|q| q.uses_message_store())
                .map(|q| q.id)
                .collect();
            if !stored.is_empty() {
                gid = b.next_gid();
                // Wait for the group commit: the API answers once it is durable.
                let (tx, rx) = oneshot::channel();
                let done: crate::store::Completion = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                st.msgs
                    .append(gid, stored, msg.parts(), Some(done))
                    .await
                    .map_err(|e| ApiError::internal(e.to_string()))?;
                if let Ok(Err(e)) = rx.await {
                    return Err(ApiError::internal(format!("cannot persist message: {e}")));
                }
            }
        }
    }
    for q in targets {
        let g = if q.uses_message_store() { gid } else { 0 };
        q.metrics
            .published
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let _ = q
            .send(QueueCmd::Publish {
                msgs: vec![(msg.clone(), g)],
                confirm: None,
            })
            .await;
    }
    Ok(true)
}

/// basic.get up to `count` messages; `requeue` puts them back afterwards
/// (marked redelivered, as RabbitMQ's ack_requeue_true does).
pub async fn get(b: &Broker, q: &QueueRef, count: usize, requeue: bool) -> Vec<(Envelope, u64)> {
    let owner = Owner {
        conn: b.next_id(),
        channel: 1,
    };
    let mut out = Vec::new();
    for _ in 0..count {
        let (tx, rx) = oneshot::channel();
        if !q
            .send(QueueCmd::Get {
                owner,
                no_ack: !requeue,
                reply: tx,
            })
            .await
        {
            break;
        }
        match rx.await.ok().flatten() {
            Some(got) => out.push(got),
            None => break,
        }
    }
    let re =
        super::stats::count_deliveries(q, &out.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>());
    let mut c = super::stats::Counts::default();
    use super::stats::Counts as C;
    c.0[if requeue { C::GET } else { C::GET_NO_ACK }] = out.len() as u64;
    c.0[C::REDELIVER] = re;
    c.0[C::GET_EMPTY] = u64::from(out.len() < count);
    b.mgmt_stats.retired.add(&c);
    if requeue && !out.is_empty() {
        let ids = out.iter().map(|(e, _)| e.id).collect();
        let _ = q
            .send(QueueCmd::Settle {
                ids,
                outcome: Outcome::Requeue,
            })
            .await;
    }
    out
}

/// First `count` ready messages, left in place.
pub async fn peek(q: &QueueRef, count: usize) -> Vec<(Arc<Message>, bool)> {
    let (tx, rx) = oneshot::channel();
    if q.send(QueueCmd::Peek { count, reply: tx }).await {
        rx.await.unwrap_or_default()
    } else {
        Vec::new()
    }
}

/// Creates a super stream: `partitions` durable stream queues NAME-0..NAME-(N-1)
/// behind a durable x-consistent-hash exchange NAME (each bound with weight
/// 1), so a routing key always lands on the same partition and per-key
/// order holds.
pub async fn add_super_stream(
    b: &Arc<Broker>,
    vhost_name: &str,
    name: &str,
    partitions: u32,
) -> Result<(), ApiError> {
    if partitions == 0 || partitions > 1000 {
        return Err(ApiError::bad_request(
            "partitions must be between 1 and 1000",
        ));
    }
    declare_exchange(
        b,
        vhost_name,
        name,
        "x-consistent-hash",
        true,
        false,
        false,
        FieldTable::default(),
    )
    .await?;
    for i in 0..partitions {
        let q = format!("{name}-{i}");
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            amq_protocol::types::AMQPValue::LongString("stream".into()),
        );
        declare_queue(b, vhost_name, &q, true, false, args).await?;
        bind(b, vhost_name, name, true, &q, "1", FieldTable::default()).await?;
    }
    Ok(())
}
