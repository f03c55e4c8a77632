//! Exchanges and their bindings.
//!
//! Each exchange keeps its authoritative binding list behind a small mutex
//! taken only by declare/bind/unbind/delete, and publishes a derived routing
//! table through an `ArcSwap`: the publish hot path loads the current table
//! without taking any lock.

use super::headers::HeadersMatcher;
use super::topic::TopicTrie;
use crate::protocol::error::{AmqpError, code};
use crate::queue::QueueRef;
use amq_protocol::types::FieldTable;
use arc_swap::ArcSwap;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The delayed-message exchange type (as RabbitMQ's plugin names it).
pub const DELAYED_TYPE: &str = "x-delayed-message";

/// Exchange types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    /// Exact routing-key match.
    Direct,
    /// Every bound destination.
    Fanout,
    /// Dot-separated patterns with `*` and `#`.
    Topic,
    /// Match on message headers.
    Headers,
    /// Consistent hashing of the routing key (or a header) over the
    /// bindings, weighted by binding key (RabbitMQ's plugin).
    ConsistentHash,
}

impl ExchangeKind {
    /// Parses the type name used in exchange.declare.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "direct" => Self::Direct,
            "fanout" => Self::Fanout,
            "topic" => Self::Topic,
            "headers" => Self::Headers,
            "x-consistent-hash" => Self::ConsistentHash,
            _ => return None,
        })
    }

    /// The type name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Fanout => "fanout",
            Self::Topic => "topic",
            Self::Headers => "headers",
            Self::ConsistentHash => "x-consistent-hash",
        }
    }
}

/// The type given to exchange.declare (AMQP or management API): the
/// routing kind, and whether it is an x-delayed-message exchange (which
/// routes as its `x-delayed-type` argument, as RabbitMQ's plugin).
pub fn declared_kind(
    kind: &str,
    arguments: &FieldTable,
) -> Result<(ExchangeKind, bool), AmqpError> {
    if kind == DELAYED_TYPE {
        let k = arguments
            .inner()
            .get("x-delayed-type")
            .and_then(super::headers::value_str)
            .and_then(|t| ExchangeKind::parse(&t))
            .ok_or_else(|| {
                AmqpError::precondition(
                    "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                )
            })?;
        return Ok((k, true));
    }
    ExchangeKind::parse(kind)
        .map(|k| (k, false))
        .ok_or_else(|| {
            AmqpError::new(
                code::COMMAND_INVALID,
                format!("unknown exchange type '{kind}'"),
            )
        })
}

/// Where a binding leads.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A queue.
    Queue(Arc<QueueRef>),
    /// Another exchange (exchange-to-exchange binding).
    Exchange(Arc<Exchange>),
}

impl Destination {
    /// True when this destination is the named queue (`is_queue`) or exchange.
    pub fn is(&self, is_queue: bool, name: &str) -> bool {
        match self {
            Destination::Queue(q) => is_queue && q.name == name,
            Destination::Exchange(e) => !is_queue && e.name == name,
        }
    }

    /// Destination name.
    pub fn name(&self) -> &str {
        match self {
            Destination::Queue(q) => &q.name,
            Destination::Exchange(e) => &e.name,
        }
    }

    /// "queue" or "exchange".
    pub fn kind(&self) -> &'static str {
        match self {
            Destination::Queue(_) => "queue",
            Destination::Exchange(_) => "exchange",
        }
    }
}

/// One binding from this exchange.
#[derive(Debug, Clone)]
pub struct Binding {
    /// Bound queue or exchange.
    pub dest: Destination,
    /// Binding key.
    pub routing_key: String,
    /// Binding arguments.
    pub arguments: FieldTable,
}

#[derive(Debug)]
enum Table {
    Direct(HashMap<Box<str>, Vec<Destination>>),
    Fanout(Vec<Destination>),
    Topic(TopicTrie<Destination>),
    Headers(Vec<(HeadersMatcher, Destination)>),
    /// Consistent-hash ring: points sorted, each owned by a destination.
    Hash(Vec<(u32, Destination)>),
}

/// FNV-1a: a small, stable hash, so a key lands on the same destination
/// across restarts and versions.
pub fn fnv1a(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    h
}

/// An exchange.
#[derive(Debug)]
pub struct Exchange {
    /// Name ("" is the default exchange).
    pub name: String,
    /// Type.
    pub kind: ExchangeKind,
    /// Survives a restart.
    pub durable: bool,
    /// Deleted when its last binding goes.
    pub auto_delete: bool,
    /// Cannot be published to directly.
    pub internal: bool,
    /// Declare arguments.
    pub arguments: FieldTable,
    /// alternate-exchange argument.
    pub alternate: Option<String>,
    bindings: Mutex<Vec<Binding>>,
    table: ArcSwap<Table>,
    /// Set once deleted, so cached handles stop routing to it.
    pub deleted: AtomicBool,
    /// x-consistent-hash: hash this header instead of the routing key.
    pub hash_header: Option<String>,
    /// An x-delayed-message exchange: messages with an x-delay header are
    /// held that long, then routed by `kind` (its x-delayed-type).
    pub delayed: bool,
    /// x-message-deduplication on the exchange: messages whose
    /// x-deduplication-header was seen recently are not routed at all.
    pub dedup: Option<Mutex<crate::queue::core::DedupCache>>,
    /// publish_in / publish_out totals (management).
    pub stats: crate::mgmt::stats::ExchangeStats,
}

impl Exchange {
    /// A new exchange with no bindings.
    pub fn new(
        name: &str,
        kind: ExchangeKind,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Self {
        let alternate = arguments
            .inner()
            .get("alternate-exchange")
            .and_then(super::headers::value_str);
        let hash_header = arguments
            .inner()
            .get("hash-header")
            .and_then(super::headers::value_str);
        let dedup = match arguments.inner().get("x-message-deduplication") {
            Some(amq_protocol::types::AMQPValue::Boolean(true)) => {
                let num = |k: &str| {
                    arguments
                        .inner()
                        .get(k)
                        .and_then(super::headers::value_int)
                        .filter(|v| *v > 0)
                        .map(|v| v as u64)
                };
                let args = crate::queue::args::DedupArgs {
                    cache_size: num("x-cache-size"),
                    cache_ttl: num("x-cache-ttl"),
                };
                Some(Mutex::new(crate::queue::core::DedupCache::new(args)))
            }
            _ => None,
        };
        let ex = Exchange {
            name: name.to_string(),
            kind,
            durable,
            auto_delete,
            internal,
            arguments,
            alternate,
            bindings: Mutex::new(Vec::new()),
            table: ArcSwap::from_pointee(Table::Fanout(Vec::new())),
            deleted: AtomicBool::new(false),
            delayed: false,
            hash_header,
            dedup,
            stats: Default::default(),
        };
        ex.rebuild(&[]);
        ex
    }

    /// Makes this an x-delayed-message exchange routing as its `kind`.
    pub fn into_delayed(mut self) -> Self {
        self.delayed = true;
        self
    }

    /// The type name as declared ("x-delayed-message" for delayed exchanges).
    pub fn type_name(&self) -> &'static str {
        if self.delayed {
            DELAYED_TYPE
        } else {
            self.kind.as_str()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Binding>> {
        // A poisoned lock only means a panic elsewhere mid-update; the
        // list itself is always left consistent (push/retain), so keep going.
        self.bindings.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn rebuild(&self, bindings: &[Binding]) {
        let table = match self.kind {
            ExchangeKind::Direct => {
                let mut m: HashMap<Box<str>, Vec<Destination>> = HashMap::new();
                for b in bindings {
                    m.entry(b.routing_key.as_str().into())
                        .or_default()
                        .push(b.dest.clone());
                }
                Table::Direct(m)
            }
            ExchangeKind::Fanout => {
                Table::Fanout(bindings.iter().map(|b| b.dest.clone()).collect())
            }
            ExchangeKind::Topic => {
                let mut t = TopicTrie::new();
                for b in bindings {
                    t.insert(&b.routing_key, b.dest.clone());
                }
                Table::Topic(t)
            }
            ExchangeKind::Headers => Table::Headers(
                bindings
                    .iter()
                    .filter_map(|b| {
                        HeadersMatcher::new(&b.arguments)
                            .ok()
                            .map(|m| (m, b.dest.clone()))
                    })
                    .collect(),
            ),
            ExchangeKind::ConsistentHash => {
                // Each binding puts `weight` points on the ring.
                let mut ring = Vec::new();
                for b in bindings {
                    let weight: u32 = b.routing_key.trim().parse().unwrap_or(0);
                    for i in 0..weight.min(10_000) {
                        let point =
                            fnv1a(format!("{}:{}/{}", b.dest.kind(), b.dest.name(), i).as_bytes());
                        ring.push((point, b.dest.clone()));
                    }
                }
                ring.sort_by_key(|(p, _)| *p);
                Table::Hash(ring)
            }
        };
        self.table.store(Arc::new(table));
    }

    /// Adds a binding; binding twice is a no-op. Returns true if added.
    pub fn bind(&self, b: Binding) -> Result<bool, AmqpError> {
        if self.kind == ExchangeKind::ConsistentHash && b.routing_key.trim().parse::<u32>().is_err()
        {
            return Err(AmqpError::precondition(format!(
                "binding key '{}' for consistent-hash exchange '{}' must be a positive integer weight",
                b.routing_key, self.name
            )));
        }
        if self.kind == ExchangeKind::Headers {
            HeadersMatcher::new(&b.arguments).map_err(|e| {
                AmqpError::new(
                    code::PRECONDITION_FAILED,
                    e.text.trim_start_matches("PRECONDITION_FAILED - "),
                )
            })?;
        }
        let mut list = self.lock();
        let dup = list.iter().any(|x| {
            x.dest
                .is(matches!(b.dest, Destination::Queue(_)), b.dest.name())
                && x.routing_key == b.routing_key
                && x.arguments == b.arguments
        });
        if dup {
            return Ok(false);
        }
        list.push(b);
        self.rebuild(&list);
        Ok(true)
    }

    /// Removes one binding. Returns (removed, bindings left).
    pub fn unbind(
        &self,
        is_queue: bool,
        dest: &str,
        key: &str,
        args: &FieldTable,
    ) -> (bool, usize) {
        let mut list = self.lock();
        let before = list.len();
        list.retain(|x| {
            !(x.dest.is(is_queue, dest) && x.routing_key == key && &x.arguments == args)
        });
        let removed = list.len() != before;
        if removed {
            self.rebuild(&list);
        }
        (removed, list.len())
    }

    /// Removes every binding to a destination. Returns (removed, left).
    pub fn unbind_all(&self, is_queue: bool, dest: &str) -> (usize, usize) {
        let mut list = self.lock();
        let before = list.len();
        list.retain(|x| !x.dest.is(is_queue, dest));
        let removed = before - list.len();
        if removed > 0 {
            self.rebuild(&list);
        }
        (removed, list.len())
    }

    /// Number of bindings from this exchange.
    pub fn binding_count(&self) -> usize {
        self.lock().len()
    }

    /// A copy of the bindings (management, definitions).
    pub fn bindings(&self) -> Vec<Binding> {
        self.lock().clone()
    }

    /// Calls `f` for each destination the message matches. Lock-free.
    pub fn route(
        &self,
        routing_key: &str,
        headers: Option<&FieldTable>,
        mut f: impl FnMut(&Destination),
    ) {
        let table = self.table.load();
        match &**table {
            Table::Direct(m) => {
                if let Some(v) = m.get(routing_key) {
                    v.iter().for_each(&mut f);
                }
            }
            Table::Fanout(v) => v.iter().for_each(&mut f),
            Table::Topic(t) => t.for_each_match(routing_key, &mut f),
            Table::Headers(v) => {
                for (m, d) in v {
                    if m.matches(headers) {
                        f(d);
                    }
                }
            }
            Table::Hash(ring) => {
                if ring.is_empty() {
                    return;
                }
                // Hash the routing key, or the header named by hash-header.
                let key: Option<String> = match &self.hash_header {
                    Some(h) => headers.and_then(|t| t.inner().get(h.as_str())).map(|v| {
                        super::headers::value_str(v)
                            .or_else(|| super::headers::value_int(v).map(|i| i.to_string()))
                            .unwrap_or_default()
                    }),
                    None => Some(routing_key.to_string()),
                };
                let Some(key) = key else { return };
                let h = fnv1a(key.as_bytes());
                let i = ring.partition_point(|(p, _)| *p < h);
                f(&ring[if i == ring.len() { 0 } else { i }].1);
            }
        }
    }

    /// Marks deleted.
    pub fn mark_deleted(&self) {
        self.deleted.store(true, Ordering::Release);
    }

    /// True once deleted.
    pub fn is_deleted(&self) -> bool {
        self.deleted.load(Ordering::Acquire)
    }
}
