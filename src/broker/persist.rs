//! What the broker remembers across restarts: durable vhosts, exchanges,
//! queues and bindings in the definitions store, and the recovery that
//! rebuilds them at start.
//!
//! Keys (see `store::defs`): exchanges and queues `key(vhost, name)`;
//! bindings `key(vhost, source, "q"|"e", destination, routing_key, args-json)`.
//! A binding is durable when both its ends are, as in RabbitMQ.

use super::exchange::{Binding, Destination, Exchange, ExchangeKind};
use super::{Broker, VHost};
use crate::store::defs::{Definitions, Table};
use crate::store::{MessageStore, StoreError};
use amq_protocol::types::FieldTable;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// The storage a broker runs on.
#[derive(Clone)]
pub struct Storage {
    /// Message bodies and per-queue message state.
    pub msgs: MessageStore,
    /// Definitions.
    pub defs: Definitions,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Storage")
    }
}

/// A durable vhost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VHostDef {
    /// Name.
    pub name: String,
}

/// A durable exchange.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExchangeDef {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Type name.
    pub kind: String,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Internal.
    pub internal: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A durable queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueueDef {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Store id of the queue (message records refer to it).
    pub id: u64,
    /// Auto-delete.
    pub auto_delete: bool,
    /// Arguments.
    pub arguments: FieldTable,
}

/// A durable binding.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BindingDef {
    /// Vhost.
    pub vhost: String,
    /// Source exchange.
    pub source: String,
    /// Destination is a queue (else an exchange).
    pub to_queue: bool,
    /// Destination name.
    pub destination: String,
    /// Binding key.
    pub routing_key: String,
    /// Arguments.
    pub arguments: FieldTable,
}

fn binding_key(b: &BindingDef) -> String {
    let args = serde_json::to_string(&b.arguments).unwrap_or_default();
    Definitions::key(&[
        &b.vhost,
        &b.source,
        if b.to_queue { "q" } else { "e" },
        &b.destination,
        &b.routing_key,
        &args,
    ])
}

impl BindingDef {
    /// The definition of a binding from `source`.
    pub fn of(vhost: &str, source: &str, b: &Binding) -> BindingDef {
        BindingDef {
            vhost: vhost.to_string(),
            source: source.to_string(),
            to_queue: matches!(b.dest, Destination::Queue(_)),
            destination: b.dest.name().to_string(),
            routing_key: b.routing_key.clone(),
            arguments: b.arguments.clone(),
        }
    }
}

/// True when a binding from `source` to `dest` survives a restart.
pub fn binding_is_durable(source: &Exchange, dest: &Destination) -> bool {
    let dest_durable = match dest {
        Destination::Queue(q) => q.durable && q.exclusive_owner.is_none(),
        Destination::Exchange(e) => e.durable,
    };
    source.durable && dest_durable && !source.name.is_empty()
}

impl Storage {
    /// Records a durable exchange.
    pub async fn put_exchange(&self, vhost: &str, ex: &Exchange) -> Result<(), StoreError> {
        let def = ExchangeDef {
            vhost: vhost.to_string(),
            name: ex.name.clone(),
            kind: ex.type_name().to_string(),
            auto_delete: ex.auto_delete,
            internal: ex.internal,
            arguments: ex.arguments.clone(),
        };
        self.defs
            .put(
                Table::Exchanges,
                &Definitions::key(&[vhost, &ex.name]),
                &def,
            )
            .await
    }

    /// Forgets an exchange and every binding from or to it.
    pub async fn delete_exchange(&self, vhost: &str, name: &str) -> Result<(), StoreError> {
        self.defs
            .delete(Table::Exchanges, &Definitions::key(&[vhost, name]))
            .await?;
        self.delete_bindings_where(vhost, |b| {
            b.source == name || (!b.to_queue && b.destination == name)
        })
        .await
    }

    /// Records a durable queue.
    pub async fn put_queue(&self, def: &QueueDef) -> Result<(), StoreError> {
        self.defs
            .put(
                Table::Queues,
                &Definitions::key(&[&def.vhost, &def.name]),
                def,
            )
            .await
    }

    /// Forgets a queue (if the stored one is this id) and its bindings.
    pub async fn delete_queue(&self, vhost: &str, name: &str, id: u64) -> Result<(), StoreError> {
        let key = Definitions::key(&[vhost, name]);
        match self.defs.get::<QueueDef>(Table::Queues, &key)? {
            Some(d) if d.id == id => {
                self.defs.delete(Table::Queues, &key).await?;
            }
            _ => return Ok(()),
        }
        self.delete_bindings_where(vhost, |b| b.to_queue && b.destination == name)
            .await
    }

    /// Records a durable binding.
    pub async fn put_binding(&self, def: &BindingDef) -> Result<(), StoreError> {
        self.defs.put(Table::Bindings, &binding_key(def), def).await
    }

    /// Forgets a binding.
    pub async fn delete_binding(&self, def: &BindingDef) -> Result<(), StoreError> {
        self.defs
            .delete(Table::Bindings, &binding_key(def))
            .await
            .map(|_| ())
    }

    async fn delete_bindings_where(
        &self,
        vhost: &str,
        pred: impl Fn(&BindingDef) -> bool,
    ) -> Result<(), StoreError> {
        let all: Vec<(String, BindingDef)> = self.defs.list(Table::Bindings)?;
        for (k, b) in all {
            if b.vhost == vhost && pred(&b) {
                self.defs.delete(Table::Bindings, &k).await?;
            }
        }
        Ok(())
    }

    /// Records a vhost.
    pub async fn put_vhost(&self, name: &str) -> Result<(), StoreError> {
        self.defs
            .put(
                Table::VHosts,
                name,
                &VHostDef {
                    name: name.to_string(),
                },
            )
            .await
    }
}

/// Rebuilds vhosts, exchanges and bindings from the definitions store;
/// returns the queue definitions for the caller to start.
pub fn recover_definitions(
    broker: &Arc<Broker>,
    defs: &Definitions,
) -> Result<Vec<QueueDef>, StoreError> {
    for (_, v) in defs.list::<VHostDef>(Table::VHosts)? {
        broker
            .vhosts
            .entry(v.name.clone())
            .or_insert_with(|| VHost::new(&v.name));
    }
    for (_, e) in defs.list::<ExchangeDef>(Table::Exchanges)? {
        let delayed = e.kind == super::exchange::DELAYED_TYPE;
        let kind_name = if delayed {
            e.arguments
                .inner()
                .get("x-delayed-type")
                .and_then(super::headers::value_str)
                .unwrap_or_default()
        } else {
            e.kind.clone()
        };
        let Some(kind) = ExchangeKind::parse(&kind_name) else {
            tracing::warn!(exchange = %e.name, vhost = %e.vhost, "skipping stored exchange of unknown type '{}'", e.kind);
            continue;
        };
        let vhost = broker
            .vhosts
            .entry(e.vhost.clone())
            .or_insert_with(|| VHost::new(&e.vhost))
            .value()
            .clone();
        let mut ex = Exchange::new(&e.name, kind, true, e.auto_delete, e.internal, e.arguments);
        if delayed {
            ex = ex.into_delayed();
        }
        vhost.exchanges.insert(e.name.clone(), Arc::new(ex));
    }
    Ok(defs
        .list::<QueueDef>(Table::Queues)?
        .into_iter()
        .map(|(_, q)| q)
        .collect())
}

/// Re-creates stored bindings once exchanges and queues exist.
pub fn recover_bindings(broker: &Arc<Broker>, defs: &Definitions) -> Result<usize, StoreError> {
    let mut n = 0;
    for (_, b) in defs.list::<BindingDef>(Table::Bindings)? {
        let Some(vhost) = broker.vhost(&b.vhost) else {
            continue;
        };
        let Some(src) = vhost.exchange(&b.source) else {
            continue;
        };
        let dest = if b.to_queue {
            vhost.queue(&b.destination).map(Destination::Queue)
        } else {
            vhost.exchange(&b.destination).map(Destination::Exchange)
        };
        let Some(dest) = dest else { continue };
        if src
            .bind(Binding {
                dest,
                routing_key: b.routing_key,
                arguments: b.arguments,
            })
            .is_ok()
        {
            n += 1;
        }
    }
    Ok(n)
}
