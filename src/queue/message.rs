//! A published message as it travels through the broker.
//!
//! One `Arc<Message>` is shared by every queue the message was routed to: the
//! body is a `Bytes` cut from the publisher's read buffer (or assembled once
//! when it came in several frames), never copied per queue.

use amq_protocol::protocol::BasicProperties;
use bytes::Bytes;

/// An immutable published message.
#[derive(Debug, Clone)]
pub struct Message {
    /// Exchange it was published to (UTF-8 checked on publish).
    pub exchange: Bytes,
    /// Routing key it was published with (UTF-8 checked on publish).
    pub routing_key: Bytes,
    /// Decoded content properties.
    pub properties: BasicProperties,
    /// The same properties in wire form, re-emitted verbatim on delivery.
    pub raw_properties: Bytes,
    /// The body.
    pub body: Bytes,
}

impl Message {
    /// delivery_mode = 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode() == &Some(2)
    }

    /// Exchange name as text.
    pub fn exchange_str(&self) -> &str {
        std::str::from_utf8(&self.exchange).unwrap_or("")
    }

    /// Routing key as text.
    pub fn routing_key_str(&self) -> &str {
        std::str::from_utf8(&self.routing_key).unwrap_or("")
    }

    /// Bytes counted against length limits (body only, as RabbitMQ).
    pub fn body_len(&self) -> u64 {
        self.body.len() as u64
    }
}

impl Message {
    /// Rebuilds a message read back from the store.
    pub fn from_parts(p: crate::store::MessageParts) -> Option<Message> {
        let (rest, properties) =
            amq_protocol::protocol::basic::parse_properties(&p.raw_properties[..]).ok()?;
        if !rest.is_empty() {
            return None;
        }
        Some(Message {
            exchange: p.exchange,
            routing_key: p.routing_key,
            properties,
            raw_properties: p.raw_properties,
            body: p.body,
        })
    }

    /// The parts the store keeps.
    pub fn parts(&self) -> crate::store::MessageParts {
        crate::store::MessageParts {
            exchange: self.exchange.clone(),
            routing_key: self.routing_key.clone(),
            raw_properties: self.raw_properties.clone(),
            body: self.body.clone(),
        }
    }
}
