//! Policies: RabbitMQ's `set_policy` rules, applied to queues and exchanges.
//!
//! Policies are stored by the management API in the definitions store
//! (`Table::Policies`); each vhost keeps the parsed list in
//! [`VHost::policies`]. [`reload`] re-reads a vhost's policies and tells
//! its queues (`QueueCmd::PolicyChanged`; each actor computes [`effective`]
//! itself, and also at spawn); exchanges look their
//! alternate exchange up lazily, only when a message routed nowhere.
//!
//! Selection (as RabbitMQ): among the policies whose pattern matches the
//! name and whose apply-to matches the kind, the one with the highest
//! priority applies; only one policy applies to an object.
//!
//! Precedence between a queue's own arguments and its policy (as RabbitMQ's
//! classic queue, `rabbit_amqqueue_process:process_args_policy`):
//! - `message-ttl`, `expires`, `max-length`, `max-length-bytes`,
//!   `delivery-limit`: when both are set, the **lower** value applies;
//! - `overflow`, `dead-letter-exchange`, `dead-letter-routing-key`: the
//!   queue argument wins; the policy fills in when the argument is absent;
//! - exchanges: an `alternate-exchange` argument wins over the policy's.

use super::{Broker, VHost};
use crate::queue::args::{Overflow, QueueArgs};
use crate::queue::core::Limits;
use crate::queue::{QueueCmd, QueueRef};
use serde_json::Value;
use std::sync::Arc;

/// What kinds of objects a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    /// Queues and exchanges.
    All,
    /// All queues.
    Queues,
    /// Classic queues only.
    ClassicQueues,
    /// Quorum queues (none in Warren).
    QuorumQueues,
    /// Streams only.
    Streams,
    /// Exchanges.
    Exchanges,
}

/// A parsed policy.
#[derive(Debug, Clone)]
pub struct Policy {
    /// Name.
    pub name: String,
    /// Pattern over object names.
    pub pattern: regex::Regex,
    /// Kinds it applies to.
    pub apply_to: ApplyTo,
    /// Higher wins.
    pub priority: i64,
    /// message-ttl (ms).
    pub message_ttl: Option<u64>,
    /// expires (ms).
    pub expires: Option<u64>,
    /// max-length.
    pub max_length: Option<u64>,
    /// max-length-bytes.
    pub max_length_bytes: Option<u64>,
    /// overflow.
    pub overflow: Option<Overflow>,
    /// dead-letter-exchange.
    pub dead_letter_exchange: Option<String>,
    /// dead-letter-routing-key.
    pub dead_letter_routing_key: Option<String>,
    /// delivery-limit.
    pub delivery_limit: Option<u64>,
    /// alternate-exchange.
    pub alternate_exchange: Option<String>,
    /// The whole definition, for keys handled elsewhere (hook for the
    /// delayed-retry keys of RabbitMQ 4.3).
    pub definition: serde_json::Map<String, Value>,
}

impl Policy {
    /// Parses a stored policy. None (logged) when the pattern is invalid.
    pub fn parse(p: &crate::mgmt::definitions::PolicyDef) -> Option<Policy> {
        let pattern = match regex::Regex::new(&p.pattern) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(policy = %p.name, vhost = %p.vhost, "invalid policy pattern, ignored: {e}");
                return None;
            }
        };
        let apply_to = match p.apply_to.as_str() {
            "queues" => ApplyTo::Queues,
            "classic_queues" => ApplyTo::ClassicQueues,
            "quorum_queues" => ApplyTo::QuorumQueues,
            "streams" => ApplyTo::Streams,
            "exchanges" => ApplyTo::Exchanges,
            _ => ApplyTo::All,
        };
        let d = &p.definition;
        let int = |k: &str| d.get(k).and_then(Value::as_u64);
        let string = |k: &str| d.get(k).and_then(Value::as_str).map(str::to_string);
        let overflow = d
            .get("overflow")
            .and_then(Value::as_str)
            .and_then(|s| match s {
                "drop-head" => Some(Overflow::DropHead),
                "reject-publish" => Some(Overflow::RejectPublish),
                "reject-publish-dlx" => Some(Overflow::RejectPublishDlx),
                _ => None,
            });
        Some(Policy {
            name: p.name.clone(),
            pattern,
            apply_to,
            priority: p.priority,
            message_ttl: int("message-ttl"),
            expires: int("expires").filter(|e| *e > 0),
            max_length: int("max-length"),
            max_length_bytes: int("max-length-bytes"),
            overflow,
            dead_letter_exchange: string("dead-letter-exchange"),
            dead_letter_routing_key: string("dead-letter-routing-key"),
            delivery_limit: int("delivery-limit"),
            alternate_exchange: string("alternate-exchange"),
            definition: d.clone(),
        })
    }

    fn applies_to_queue(&self, queue_type: &str) -> bool {
        match self.apply_to {
            ApplyTo::All | ApplyTo::Queues => true,
            ApplyTo::ClassicQueues => queue_type == "classic",
            ApplyTo::Streams => queue_type == "stream",
            ApplyTo::QuorumQueues | ApplyTo::Exchanges => false,
        }
    }

    fn applies_to_exchange(&self) -> bool {
        matches!(self.apply_to, ApplyTo::All | ApplyTo::Exchanges)
    }
}

/// The highest-priority policy among `matching` (first one on a tie).
fn best<'a>(matching: impl Iterator<Item = &'a Arc<Policy>>) -> Option<Arc<Policy>> {
    let mut out: Option<&Arc<Policy>> = None;
    for p in matching {
        if out.is_none_or(|o| p.priority > o.priority) {
            out = Some(p);
        }
    }
    out.cloned()
}

/// The policy applying to a queue, if any.
pub fn for_queue(vhost: &VHost, name: &str, queue_type: &str) -> Option<Arc<Policy>> {
    let ps = vhost.policies.load();
    best(
        ps.iter()
            .filter(|p| p.applies_to_queue(queue_type) && p.pattern.is_match(name)),
    )
}

/// The policy applying to an exchange, if any.
pub fn for_exchange(vhost: &VHost, name: &str) -> Option<Arc<Policy>> {
    let ps = vhost.policies.load();
    if ps.is_empty() {
        return None;
    }
    best(
        ps.iter()
            .filter(|p| p.applies_to_exchange() && p.pattern.is_match(name)),
    )
}

/// A queue's settings once its arguments and its policy are merged.
#[derive(Debug, Clone, Default)]
pub struct QueueEffective {
    /// Length, TTL and delivery limits.
    pub limits: Limits,
    /// expires (ms).
    pub expires: Option<u64>,
    /// Dead-letter exchange.
    pub dead_letter_exchange: Option<String>,
    /// Dead-letter routing key.
    pub dead_letter_routing_key: Option<String>,
    /// The policy applied (name), if any.
    pub policy: Option<Arc<Policy>>,
}

fn lower(a: Option<u64>, p: Option<u64>) -> Option<u64> {
    match (a, p) {
        (Some(a), Some(p)) => Some(a.min(p)),
        (a, p) => a.or(p),
    }
}

/// Merges queue arguments with a policy (see the module doc for the rules).
pub fn merge(
    args: &QueueArgs,
    arguments: &amq_protocol::types::FieldTable,
    p: Option<&Policy>,
) -> QueueEffective {
    let has_overflow = arguments.inner().contains_key("x-overflow");
    let Some(p) = p else {
        return QueueEffective {
            limits: Limits {
                message_ttl: args.message_ttl,
                max_length: args.max_length,
                max_length_bytes: args.max_length_bytes,
                overflow: args.overflow,
                delivery_limit: args.delivery_limit,
            },
            expires: args.expires,
            dead_letter_exchange: args.dead_letter_exchange.clone(),
            dead_letter_routing_key: args.dead_letter_routing_key.clone(),
            policy: None,
        };
    };
    QueueEffective {
        limits: Limits {
            message_ttl: lower(args.message_ttl, p.message_ttl),
            max_length: lower(args.max_length, p.max_length),
            max_length_bytes: lower(args.max_length_bytes, p.max_length_bytes),
            overflow: if has_overflow {
                args.overflow
            } else {
                p.overflow.unwrap_or(args.overflow)
            },
            delivery_limit: lower(args.delivery_limit, p.delivery_limit),
        },
        expires: lower(args.expires, p.expires),
        dead_letter_exchange: args
            .dead_letter_exchange
            .clone()
            .or_else(|| p.dead_letter_exchange.clone()),
        dead_letter_routing_key: args
            .dead_letter_routing_key
            .clone()
            .or_else(|| p.dead_letter_routing_key.clone()),
        policy: None,
    }
}

/// The effective settings of a queue under its vhost's current policies.
pub fn effective(vhost: &VHost, q: &QueueRef) -> QueueEffective {
    let p = for_queue(vhost, &q.name, &q.args.queue_type);
    let mut e = merge(&q.args, &q.arguments, p.as_deref());
    e.policy = p;
    e
}

/// Tells a classic queue to recompute its effective settings.
pub async fn apply_to_queue(_vhost: &VHost, q: &Arc<QueueRef>) {
    if q.args.queue_type != "classic" {
        return;
    }
    let _ = q.send(QueueCmd::PolicyChanged).await;
}

impl QueueEffective {
    /// Hook for keys merged elsewhere (e.g. RabbitMQ 4.3's delayed-retry
    /// keys): the applied policy's value for `key`, if any.
    pub fn policy_value(&self, key: &str) -> Option<&Value> {
        self.policy.as_ref()?.definition.get(key)
    }
}

/// Re-reads a vhost's policies from the store and applies them to its
/// existing queues (exchanges read them when they need them).
pub async fn reload(broker: &Broker, vhost: &str) {
    let Some(v) = broker.vhost(vhost) else { return };
    let mut list: Vec<Arc<Policy>> = Vec::new();
    if let Some(st) = &broker.storage {
        match st
            .defs
            .list::<crate::mgmt::definitions::PolicyDef>(crate::store::defs::Table::Policies)
        {
            Ok(rows) => {
                let mine = rows.into_iter().filter(|(_, pd)| pd.vhost == vhost);
                list.extend(mine.filter_map(|(_, pd)| Policy::parse(&pd)).map(Arc::new));
            }
            Err(e) => tracing::warn!(vhost, "cannot read policies: {e}"),
        }
    }
    list.sort_by(|a, b| a.name.cmp(&b.name));
    v.policies.store(Arc::new(list));
    let queues: Vec<Arc<QueueRef>> = v.queues.iter().map(|q| q.value().clone()).collect();
    for q in queues {
        apply_to_queue(&v, &q).await;
    }
}
