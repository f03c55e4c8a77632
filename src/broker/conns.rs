//! The connection registry: what the management API and metrics show about
//! each open AMQP connection, and the handle to force-close it.
//!
//! Each connection task registers itself once the handshake is done and
//! removes itself when it ends; it alone writes its entry (the channel list
//! is refreshed after each read), so readers only ever see snapshots.

use super::ConnTx;
use amq_protocol::types::FieldTable;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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
    /// Open channel numbers (refreshed by the connection task).
    pub channels: Arc<Mutex<Vec<u16>>>,
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
