//! Delayed messages: an x-delayed-message exchange holds a message for its
//! `x-delay` header (ms) before routing it by its x-delayed-type, as
//! RabbitMQ's delayed-message plugin does. One scheduler task per broker
//! owns the waiting messages (a heap ordered by due time). Persistent
//! delayed messages are kept in the message store under a reserved queue id
//! with their due time and vhost in internal headers, so they survive a
//! restart.

use super::Broker;
use crate::broker::headers::{value_int, value_str};
use crate::protocol::frame::encode_properties;
use crate::queue::QueueCmd;
use crate::queue::message::Message;
use amq_protocol::types::{AMQPValue, LongString};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use tracing::{trace, warn};

/// Store queue id under which persistent delayed messages are kept.
pub const DELAYED_QUEUE_ID: u64 = u64::MAX;
const DUE_HEADER: &str = "x-warren-delay-due";
const VHOST_HEADER: &str = "x-warren-delay-vhost";

/// A message waiting for its time.
#[derive(Debug)]
pub struct Delayed {
    /// When to route it (ms since the epoch).
    pub due: u64,
    /// Its vhost.
    pub vhost: String,
    /// The delayed exchange it was published to (its name is in the message).
    pub msg: Arc<Message>,
    /// Store id of the persisted copy (0 when not persisted).
    pub gid: u64,
}

/// Handle to the scheduler task.
#[derive(Debug, Clone)]
pub struct DelayedScheduler {
    tx: mpsc::UnboundedSender<Delayed>,
}

/// The `x-delay` header of a message, if positive.
pub fn delay_of(msg: &Message) -> Option<u64> {
    let h = msg.properties.headers().as_ref()?;
    let d = value_int(h.inner().get("x-delay")?)?;
    (d > 0).then_some(d as u64)
}

/// The copy kept in the store: the same message with its due time and vhost
/// in internal headers.
pub fn stored_copy(msg: &Message, due: u64, vhost: &str) -> Message {
    let mut headers = msg.properties.headers().clone().unwrap_or_default();
    headers.insert(DUE_HEADER.into(), AMQPValue::LongLongInt(due as i64));
    headers.insert(
        VHOST_HEADER.into(),
        AMQPValue::LongString(LongString::from(vhost.as_bytes().to_vec())),
    );
    let props = msg.properties.clone().with_headers(headers);
    Message {
        raw_properties: encode_properties(&props),
        properties: props,
        ..msg.clone()
    }
}

/// Reads back a stored delayed message: (due, vhost, original message).
pub fn from_stored(msg: Message) -> Option<(u64, String, Message)> {
    let mut headers = msg.properties.headers().clone()?;
    let due = value_int(headers.inner().get(DUE_HEADER)?)? as u64;
    let vhost = value_str(headers.inner().get(VHOST_HEADER)?)?;
    let mut inner = headers.inner().clone();
    inner.remove(DUE_HEADER);
    inner.remove(VHOST_HEADER);
    headers = inner.into();
    let props = msg.properties.clone().with_headers(headers);
    Some((
        due,
        vhost,
        Message {
            raw_properties: encode_properties(&props),
            properties: props,
            ..msg
        },
    ))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl DelayedScheduler {
    /// Starts the scheduler for `broker`.
    pub fn spawn(broker: Weak<Broker>) -> DelayedScheduler {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(broker, rx));
        DelayedScheduler { tx }
    }

    /// Holds `d` until it is due.
    pub fn schedule(&self, d: Delayed) {
        let _ = self.tx.send(d);
    }
}

async fn run(broker: Weak<Broker>, mut rx: mpsc::UnboundedReceiver<Delayed>) {
    let mut heap: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut waiting: HashMap<u64, Delayed> = HashMap::new();
    let mut seq = 0u64;
    loop {
        let wait = heap
            .peek()
            .map(|Reverse((due, _))| due.saturating_sub(now_ms()));
        tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { return };
                seq += 1;
                heap.push(Reverse((d.due, seq)));
                waiting.insert(seq, d);
            }
            _ = tokio::time::sleep(std::time::Duration::from_millis(wait.unwrap_or(3_600_000))), if wait.is_some() => {}
        }
        let now = now_ms();
        while let Some(Reverse((due, s))) = heap.peek().copied() {
            if due > now {
                break;
            }
            heap.pop();
            let Some(d) = waiting.remove(&s) else {
                continue;
            };
            let Some(b) = broker.upgrade() else { return };
            route_due(&b, d).await;
        }
    }
}

/// Routes a message whose delay is over, by its exchange's x-delayed-type.
async fn route_due(broker: &Arc<Broker>, d: Delayed) {
    let done_with_store = |b: &Arc<Broker>, gid: u64| {
        if gid != 0 {
            if let Some(st) = b.storage.clone() {
                tokio::spawn(async move {
                    let _ = st.msgs.ack(DELAYED_QUEUE_ID, vec![gid]).await;
                });
            }
        }
    };
    let Some(vhost) = broker.vhost(&d.vhost) else {
        done_with_store(broker, d.gid);
        return;
    };
    let Some(ex) = vhost.exchange(d.msg.exchange_str()) else {
        trace!(
            exchange = d.msg.exchange_str(),
            "delayed exchange gone; message dropped"
        );
        done_with_store(broker, d.gid);
        return;
    };
    let mut targets = Vec::new();
    vhost.route(
        &ex,
        d.msg.routing_key_str(),
        d.msg.properties.headers().as_ref(),
        &mut targets,
    );
    let mut gid = 0;
    if d.msg.is_persistent() {
        if let Some(st) = &broker.storage {
            let stored: Vec<u64> = targets
                .iter()
                .filter(|t| t.uses_message_store())
                .map(|t| t.id)
                .collect();
            if !stored.is_empty() {
                gid = broker.next_gid();
                if let Err(e) = st.msgs.append(gid, stored, d.msg.parts(), None).await {
                    warn!("could not persist a delayed message as it was routed: {e}");
                    gid = 0;
                }
            }
        }
    }
    for t in targets {
        let g = if t.uses_message_store() { gid } else { 0 };
        let cmd = QueueCmd::Publish {
            msgs: vec![(d.msg.clone(), g)],
            confirm: None,
        };
        if let Err(mpsc::error::TrySendError::Full(cmd)) = t.tx.try_send(cmd) {
            let t = t.clone();
            tokio::spawn(async move {
                let _ = t.tx.send(cmd).await;
            });
        }
    }
    done_with_store(broker, d.gid);
}
