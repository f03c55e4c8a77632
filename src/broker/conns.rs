//! The connection registry: what the management API and metrics show about
//! each open AMQP connection, and the handle to force-close it.
//!
//! Each connection task registers itself once the handshake is done and
//! removes itself when it ends; it alone writes its entry (the channel list
//! and the per-channel gauges are refreshed once per turn of its loop, with
//! relaxed stores), so readers only ever see snapshots and the message path
//! takes no lock.

use super::ConnTx;
use amq_protocol::types::FieldTable;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};
use std::sync::{Arc, Mutex};

/// A connection's open channels by number, sorted, with their gauges.
pub type ChannelList = Arc<Mutex<Vec<(u16, Arc<ChannelStats>)>>>;

/// One channel as management shows it (RabbitMQ's channel info items).
/// Written only by the owning connection task.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// basic.qos prefetch for new consumers (per consumer).
    pub prefetch_count: AtomicU32,
    /// basic.qos global prefetch (shared by the channel's consumers).
    pub global_prefetch_count: AtomicU32,
    /// Deliveries (and basic.get) awaiting ack.
    pub messages_unacknowledged: AtomicU64,
    /// Publishes awaiting a confirm.
    pub messages_unconfirmed: AtomicU64,
    /// Publishes in an open transaction.
    pub messages_uncommitted: AtomicU64,
    /// Acks in an open transaction.
    pub acks_uncommitted: AtomicU64,
    /// Consumers on this channel.
    pub consumer_count: AtomicU32,
    /// In confirm mode.
    pub confirm: AtomicBool,
    /// In tx mode.
    pub transactional: AtomicBool,
    /// The channel's consumers (changed by basic.consume/cancel only).
    pub consumers: Mutex<Vec<Arc<ConsumerMeta>>>,
}

/// A consumer as management shows it (fixed at basic.consume).
#[derive(Debug, Clone)]
pub struct ConsumerMeta {
    /// Broker-wide consumer id (increasing: the oldest consumer of a queue
    /// has the smallest).
    pub id: u64,
    /// Consumer tag.
    pub tag: String,
    /// Queue id.
    pub queue_id: u64,
    /// Queue name.
    pub queue: String,
    /// Queue vhost.
    pub vhost: String,
    /// The queue has a single active consumer.
    pub single_active: bool,
    /// Manual acks (not no-ack).
    pub ack_required: bool,
    /// basic.consume exclusive.
    pub exclusive: bool,
    /// The channel's prefetch when it subscribed.
    pub prefetch_count: u32,
    /// basic.consume arguments.
    pub arguments: FieldTable,
}

impl ChannelStats {
    /// Records a new consumer.
    pub fn add_consumer(&self, c: ConsumerMeta) {
        if let Ok(mut l) = self.consumers.lock() {
            l.retain(|x| x.tag != c.tag);
            l.push(Arc::new(c));
        }
    }

    /// Forgets a consumer by tag (None: all of them).
    pub fn remove_consumer(&self, tag: Option<&str>) {
        if let Ok(mut l) = self.consumers.lock() {
            match tag {
                Some(t) => l.retain(|x| x.tag != t),
                None => l.clear(),
            }
        }
    }

    /// The consumers now.
    pub fn consumer_list(&self) -> Vec<Arc<ConsumerMeta>> {
        self.consumers.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// One open AMQP connection, as management sees it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Broker-wide connection id.
    pub id: u64,
    /// RabbitMQ-style name: "peer -> local".
    pub name: String,
    /// Client address.
    pub peer: SocketAddr,
    /// Our address.
    pub local: SocketAddr,
    /// Authenticated user.
    pub user: String,
    /// Vhost.
    pub vhost: String,
    /// client-properties from connection.start-ok.
    pub client_properties: FieldTable,
    /// When it opened (ms since the Unix epoch).
    pub connected_at: u64,
    /// Negotiated frame_max.
    pub frame_max: u32,
    /// Negotiated channel_max.
    pub channel_max: u16,
    /// Negotiated heartbeat (s).
    pub heartbeat: u16,
    /// Open channels by number, sorted (refreshed by the connection task).
    pub channels: ChannelList,
    /// Message totals of this connection (overview message_stats).
    pub stats: Arc<crate::mgmt::stats::MsgCounters>,
    /// The connection's inbox (to force-close it).
    pub tx: ConnTx,
}

impl ConnInfo {
    /// RabbitMQ's connection name format.
    pub fn name_of(peer: SocketAddr, local: SocketAddr) -> String {
        format!("{peer} -> {local}")
    }

    /// Open channel numbers.
    pub fn channel_numbers(&self) -> Vec<u16> {
        self.channels
            .lock()
            .map(|c| c.iter().map(|x| x.0).collect())
            .unwrap_or_default()
    }

    /// Open channels with their gauges.
    pub fn channel_stats(&self) -> Vec<(u16, Arc<ChannelStats>)> {
        self.channels.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
