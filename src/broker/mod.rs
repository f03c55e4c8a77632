//! Names and routing: vhosts, exchanges, bindings, queue registry.
//!
//! The registries are sharded maps (`DashMap`) from names to handles; the
//! state behind each handle has exactly one owner (a queue actor, a
//! connection task). Guards are never held across `.await`: clone the `Arc`
//! out, then use it.

pub mod alarms;
pub mod conns;
pub mod declare;
pub mod delayed;
pub mod exchange;
pub mod headers;
pub mod persist;
pub mod policy;
pub mod topic;

use crate::auth::Users;
use crate::config::Config;
use crate::queue::QueueRef;
use crate::queue::core::{ConsumerId, Envelope};
use crate::queue::message::Message;
use amq_protocol::types::FieldTable;
use dashmap::DashMap;
use exchange::{Destination, Exchange, ExchangeKind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::sync::{mpsc, watch};

/// Messages to a connection task.
#[derive(Debug)]
pub enum ConnCmd {
    /// Deliveries for one consumer.
    Deliver {
        /// Channel of the consumer.
        channel: u16,
        /// Consumer id.
        consumer: ConsumerId,
        /// Consumer tag.
        tag: Arc<str>,
        /// Queue they come from.
        queue: Arc<QueueRef>,
        /// Messages, in order.
        msgs: Vec<Envelope>,
    },
    /// Publisher confirms from a queue.
    Confirm {
        /// Publishing channel.
        channel: u16,
        /// Sequence numbers settled.
        seqs: Vec<u64>,
        /// basic.nack instead of basic.ack.
        nack: bool,
    },
    /// The server cancelled a consumer (its queue was deleted, or it timed
    /// out holding a delivery).
    ConsumerCancelled {
        /// Channel.
        channel: u16,
        /// Consumer id.
        consumer: ConsumerId,
        /// The queue took the consumer's unacked deliveries back (consumer
        /// timeout): the channel ignores later acks of their tags.
        revoked: bool,
    },
    /// A reply sent to this channel's direct reply-to pseudo queue.
    DirectReply {
        /// Channel.
        channel: u16,
        /// The reply.
        msg: Arc<Message>,
    },
    /// Close the connection with 320 CONNECTION_FORCED (management, shutdown).
    ForceClose {
        /// Reason given to the client.
        reason: String,
    },
}

/// A connection's inbox. Unbounded on purpose: queues must never wait on a
/// client; what flows here is bounded by prefetch and flow credit.
pub type ConnTx = mpsc::UnboundedSender<ConnCmd>;

/// Where a direct reply-to key leads.
#[derive(Debug, Clone)]
pub struct ReplyTarget {
    /// Connection inbox.
    pub conn: ConnTx,
    /// Channel.
    pub channel: u16,
}

/// A virtual host.
#[derive(Debug)]
pub struct VHost {
    /// Name.
    pub name: String,
    /// Exchanges by name.
    pub exchanges: DashMap<String, Arc<Exchange>>,
    /// Queues by name.
    pub queues: DashMap<String, Arc<QueueRef>>,
    /// Policies of this vhost, parsed (see [`policy`]).
    pub policies: arc_swap::ArcSwap<Vec<Arc<policy::Policy>>>,
}

impl VHost {
    /// A vhost with the default and amq.* exchanges.
    pub fn new(name: &str) -> Arc<VHost> {
        let v = VHost {
            name: name.to_string(),
            exchanges: DashMap::new(),
            queues: DashMap::new(),
            policies: arc_swap::ArcSwap::from_pointee(Vec::new()),
        };
        for (n, k) in [
            ("", ExchangeKind::Direct),
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
            ("amq.match", ExchangeKind::Headers),
        ] {
            v.exchanges.insert(
                n.to_string(),
                Arc::new(Exchange::new(
                    n,
                    k,
                    true,
                    false,
                    false,
                    FieldTable::default(),
                )),
            );
        }
        Arc::new(v)
    }

    /// Looks up an exchange.
    pub fn exchange(&self, name: &str) -> Option<Arc<Exchange>> {
        self.exchanges.get(name).map(|e| e.value().clone())
    }

    /// Looks up a queue.
    pub fn queue(&self, name: &str) -> Option<Arc<QueueRef>> {
        self.queues.get(name).map(|q| q.value().clone())
    }

    /// Routes a message from `ex`: follows exchange-to-exchange bindings and
    /// alternate exchanges, and appends each target queue once to `out`.
    pub fn route(
        &self,
        ex: &Arc<Exchange>,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<QueueRef>>,
    ) {
        // Exchange-level x-message-deduplication: a duplicate is not routed.
        if let (Some(cache), Some(id)) = (
            &ex.dedup,
            headers.and_then(crate::queue::core::DedupCache::id_in),
        ) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            if cache
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .check_and_insert(id, now)
            {
                return;
            }
        }
        let mut visited: Vec<*const Exchange> = Vec::new();
        self.route_from(ex, routing_key, headers, out, &mut visited);
        if out.len() > 1 {
            out.sort_unstable_by_key(|q| q.id);
            out.dedup_by_key(|q| q.id);
        }
    }

    fn route_from(
        &self,
        ex: &Arc<Exchange>,
        routing_key: &str,
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<QueueRef>>,
        visited: &mut Vec<*const Exchange>,
    ) {
        let ptr = Arc::as_ptr(ex);
        if visited.contains(&ptr) || ex.is_deleted() {
            return;
        }
        visited.push(ptr);
        let before = out.len();
        if ex.name.is_empty() {
            if let Some(q) = self.queue(routing_key).filter(|q| q.is_routable()) {
                out.push(q);
            }
        } else {
            let mut downstream: Vec<Arc<Exchange>> = Vec::new();
            ex.route(routing_key, headers, |d| match d {
                Destination::Queue(q) => {
                    // Not deleted, and not a proxy whose home node is down.
                    if q.is_routable() {
                        out.push(q.clone())
                    }
                }
                Destination::Exchange(e) => downstream.push(e.clone()),
            });
            for e in downstream {
                self.route_from(&e, routing_key, headers, out, visited);
            }
        }
        if out.len() == before {
            // An alternate-exchange argument wins over a policy's.
            let ae_name = match &ex.alternate {
                Some(n) => Some(n.clone()),
                None => {
                    policy::for_exchange(self, &ex.name).and_then(|p| p.alternate_exchange.clone())
                }
            };
            if let Some(ae) = ae_name.as_deref().and_then(|n| self.exchange(n)) {
                self.route_from(&ae, routing_key, headers, out, visited);
            }
        }
    }

    /// Removes a deleted queue from the registry and from every binding.
    /// Auto-delete exchanges left without bindings go too; returns the
    /// durable exchanges removed that way (to forget in the store).
    pub fn forget_queue(&self, q: &QueueRef) -> Vec<String> {
        self.queues.remove_if(&q.name, |_, v| v.id == q.id);
        let mut gone = Vec::new();
        let exchanges: Vec<Arc<Exchange>> =
            self.exchanges.iter().map(|e| e.value().clone()).collect();
        for ex in exchanges {
            let (removed, left) = ex.unbind_all(true, &q.name);
            if removed > 0 && left == 0 && ex.auto_delete {
                gone.extend(self.delete_exchange(&ex.name));
            }
        }
        gone
    }

    /// Removes an exchange, its bindings, and bindings to it. Returns the
    /// durable exchanges removed (this one and auto-deleted ones).
    pub fn delete_exchange(&self, name: &str) -> Vec<String> {
        let Some((_, ex)) = self.exchanges.remove(name) else {
            return Vec::new();
        };
        ex.mark_deleted();
        let mut gone = Vec::new();
        if ex.durable {
            gone.push(ex.name.clone());
        }
        let exchanges: Vec<Arc<Exchange>> =
            self.exchanges.iter().map(|e| e.value().clone()).collect();
        for other in exchanges {
            let (removed, left) = other.unbind_all(false, name);
            if removed > 0 && left == 0 && other.auto_delete {
                gone.extend(self.delete_exchange(&other.name));
            }
        }
        gone
    }
}

/// The broker: vhosts, users, id counters, direct reply-to registry.
#[derive(Debug)]
pub struct Broker {
    /// Configuration.
    pub config: Arc<Config>,
    /// Vhosts by name.
    pub vhosts: DashMap<String, Arc<VHost>>,
    /// Users.
    pub users: Users,
    /// Direct reply-to keys → channel.
    pub direct_reply: DashMap<String, ReplyTarget>,
    /// Open AMQP connections by id (management, metrics).
    pub connections: DashMap<u64, conns::ConnInfo>,
    ids: AtomicU64,
    gids: AtomicU64,
    /// Holds messages published to x-delayed-message exchanges.
    pub delayed: std::sync::OnceLock<delayed::DelayedScheduler>,
    /// Resource limits and their last readings.
    pub limits: alarms::Limits,
    /// Broker-wide message totals of closed connections, rate samples.
    pub mgmt_stats: crate::mgmt::stats::BrokerStats,
    /// Durable storage (None only in tests of pure routing).
    pub storage: Option<persist::Storage>,
    /// Set when the broker is shutting down.
    pub shutdown: watch::Receiver<bool>,
    /// The cluster runtime (Raft groups for quorum queues), once started.
    pub cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Resource alarm: `Some(reason)` while publishers must be blocked
    /// ("low on memory", "low on disk").
    alarm: watch::Sender<Option<String>>,
}

impl Broker {
    /// A broker with the default vhost and user from config.
    pub fn new(
        config: Arc<Config>,
        shutdown: watch::Receiver<bool>,
        storage: Option<persist::Storage>,
        first_id: u64,
        first_gid: u64,
    ) -> Arc<Broker> {
        let users = Users::new(&config.auth);
        let b = Broker {
            vhosts: DashMap::new(),
            users,
            direct_reply: DashMap::new(),
            connections: DashMap::new(),
            ids: AtomicU64::new(first_id.max(1)),
            gids: AtomicU64::new(first_gid.max(1)),
            storage,
            delayed: std::sync::OnceLock::new(),
            limits: alarms::Limits::default(),
            mgmt_stats: Default::default(),
            shutdown,
            cluster: std::sync::OnceLock::new(),
            alarm: watch::channel(None).0,
            config,
        };
        if !b.config.auth.default_vhost.is_empty() {
            b.vhosts.insert(
                b.config.auth.default_vhost.clone(),
                VHost::new(&b.config.auth.default_vhost),
            );
        }
        Arc::new(b)
    }

    /// A fresh broker-wide id (connections, queues, consumers).
    pub fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// A fresh id for a stored message (unique across restarts).
    pub fn next_gid(&self) -> u64 {
        self.gids.fetch_add(1, Ordering::Relaxed)
    }

    /// Raises (`Some(reason)`) or clears (`None`) the resource alarm:
    /// publishing connections get connection.blocked and are no longer read
    /// from; consumers keep draining.
    pub fn set_alarm(&self, reason: Option<String>) {
        self.alarm.send_if_modified(|cur| {
            if *cur == reason {
                return false;
            }
            *cur = reason;
            true
        });
    }

    /// Watches the resource alarm.
    pub fn alarm(&self) -> watch::Receiver<Option<String>> {
        self.alarm.subscribe()
    }

    /// Looks up a vhost.
    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.get(name).map(|v| v.value().clone())
    }

    /// The vhost of that name, created empty if this node has none yet (a
    /// replicated queue can arrive before its vhost's definition).
    pub fn vhost_or_create(&self, name: &str) -> Arc<VHost> {
        self.vhosts
            .entry(name.to_string())
            .or_insert_with(|| VHost::new(name))
            .value()
            .clone()
    }
}
