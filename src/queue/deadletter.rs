//! Dead-lettering as RabbitMQ does it: the x-death header (one entry per
//! queue and reason, with a count, most recent first), x-first-death-* and
//! x-last-death-* headers, the expiration moved to `original-expiration`,
//! and cycle detection.

use super::core::DeadReason;
use super::message::Message;
use crate::broker::headers::value_str;
use crate::protocol::frame::encode_properties;
use amq_protocol::types::{AMQPValue, FieldArray, FieldTable, LongString};
use bytes::Bytes;

fn ls(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The message as it is re-published to the dead-letter exchange.
pub fn dead_lettered(
    msg: &Message,
    queue: &str,
    reason: DeadReason,
    now_secs: u64,
    dlx: &str,
    dl_routing_key: Option<&str>,
) -> Message {
    let mut props = msg.properties.clone();
    let mut headers = props.headers().clone().unwrap_or_default();
    let original_expiration = props.expiration().clone();
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let field = |t: &FieldTable, k: &str| t.inner().get(k).and_then(value_str);
    let existing = deaths.iter().position(|d| match d {
        AMQPValue::FieldTable(t) => {
            field(t, "queue").as_deref() == Some(queue)
                && field(t, "reason").as_deref() == Some(reason.as_str())
        }
        _ => false,
    });
    let entry = match existing {
        Some(i) => {
            let mut t = match deaths.remove(i) {
                AMQPValue::FieldTable(t) => t,
                _ => FieldTable::default(),
            };
            let count = t
                .inner()
                .get("count")
                .and_then(crate::broker::headers::value_int)
                .unwrap_or(0);
            t.insert("count".into(), AMQPValue::LongLongInt(count + 1));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t
        }
        None => {
            let mut t = FieldTable::default();
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            t.insert("reason".into(), ls(reason.as_str()));
            t.insert("queue".into(), ls(queue));
            t.insert("time".into(), AMQPValue::Timestamp(now_secs));
            t.insert("exchange".into(), ls(msg.exchange_str()));
            t.insert(
                "routing-keys".into(),
                AMQPValue::FieldArray(FieldArray::from(vec![ls(msg.routing_key_str())])),
            );
            if let Some(exp) = &original_expiration {
                t.insert("original-expiration".into(), ls(exp.as_str()));
            }
            t
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.contains_key("x-first-death-reason") {
        headers.insert("x-first-death-reason".into(), ls(reason.as_str()));
        headers.insert("x-first-death-queue".into(), ls(queue));
        headers.insert("x-first-death-exchange".into(), ls(msg.exchange_str()));
    }
    headers.insert("x-last-death-reason".into(), ls(reason.as_str()));
    headers.insert("x-last-death-queue".into(), ls(queue));
    headers.insert("x-last-death-exchange".into(), ls(msg.exchange_str()));
    // Rebuild without the expiration (it must not expire again downstream).
    let mut rebuilt = amq_protocol::protocol::BasicProperties::default();
    if let Some(v) = props.content_type() {
        rebuilt = rebuilt.with_content_type(v.clone());
    }
    if let Some(v) = props.content_encoding() {
        rebuilt = rebuilt.with_content_encoding(v.clone());
    }
    rebuilt = rebuilt.with_headers(headers);
    if let Some(v) = props.delivery_mode() {
        rebuilt = rebuilt.with_delivery_mode(*v);
    }
    if let Some(v) = props.priority() {
        rebuilt = rebuilt.with_priority(*v);
    }
    if let Some(v) = props.correlation_id() {
        rebuilt = rebuilt.with_correlation_id(v.clone());
    }
    if let Some(v) = props.reply_to() {
        rebuilt = rebuilt.with_reply_to(v.clone());
    }
    if let Some(v) = props.message_id() {
        rebuilt = rebuilt.with_message_id(v.clone());
    }
    if let Some(v) = props.timestamp() {
        rebuilt = rebuilt.with_timestamp(*v);
    }
    if let Some(v) = props.kind() {
        rebuilt = rebuilt.with_type(v.clone());
    }
    if let Some(v) = props.user_id() {
        rebuilt = rebuilt.with_user_id(v.clone());
    }
    if let Some(v) = props.app_id() {
        rebuilt = rebuilt.with_app_id(v.clone());
    }
    if let Some(v) = props.cluster_id() {
        rebuilt = rebuilt.with_cluster_id(v.clone());
    }
    props = rebuilt;
    let routing_key = dl_routing_key.unwrap_or(msg.routing_key_str());
    Message {
        exchange: Bytes::copy_from_slice(dlx.as_bytes()),
        routing_key: Bytes::copy_from_slice(routing_key.as_bytes()),
        raw_properties: encode_properties(&props),
        properties: props,
        body: msg.body.clone(),
    }
}

/// RabbitMQ's cycle rule: a message dead-lettered for a reason other than
/// rejection must not go back to a queue it already died in, unless a
/// rejection happened along the way.
pub fn is_cycle(msg: &Message, target_queue: &str) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) = msg
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    for d in deaths.as_slice() {
        let AMQPValue::FieldTable(t) = d else {
            continue;
        };
        if t.inner().get("reason").and_then(value_str).as_deref() == Some("rejected") {
            return false;
        }
        if t.inner().get("queue").and_then(value_str).as_deref() == Some(target_queue) {
            return true;
        }
    }
    false
}

/// x-delivery-count header on a redelivered message (every queue type, not
/// only quorum queues as in RabbitMQ).
pub fn with_delivery_count(msg: &Message, count: u16) -> Message {
    let mut headers = msg.properties.headers().clone().unwrap_or_default();
    headers.insert(
        "x-delivery-count".into(),
        AMQPValue::LongLongInt(i64::from(count)),
    );
    let props = msg.properties.clone().with_headers(headers);
    Message {
        exchange: msg.exchange.clone(),
        routing_key: msg.routing_key.clone(),
        raw_properties: encode_properties(&props),
        properties: props,
        body: msg.body.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        let props = amq_protocol::protocol::BasicProperties::default()
            .with_expiration("5000".into())
            .with_delivery_mode(2);
        Message {
            exchange: Bytes::from_static(b"ex"),
            routing_key: Bytes::from_static(b"rk"),
            raw_properties: encode_properties(&props),
            properties: props,
            body: Bytes::from_static(b"body"),
        }
    }

    fn deaths(m: &Message) -> Vec<FieldTable> {
        match m
            .properties
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .get("x-death")
        {
            Some(AMQPValue::FieldArray(a)) => a
                .as_slice()
                .iter()
                .map(|v| match v {
                    AMQPValue::FieldTable(t) => t.clone(),
                    _ => panic!(),
                })
                .collect(),
            _ => panic!("no x-death"),
        }
    }

    #[test]
    fn x_death_counts_and_orders() {
        let m1 = dead_lettered(&msg(), "q1", DeadReason::Expired, 100, "dlx", None);
        assert!(m1.properties.expiration().is_none());
        let d = deaths(&m1);
        assert_eq!(d.len(), 1);
        assert_eq!(
            value_str(&d[0].inner()["original-expiration"]).as_deref(),
            Some("5000")
        );
        assert_eq!(
            value_str(&d[0].inner()["reason"]).as_deref(),
            Some("expired")
        );
        assert_eq!(m1.routing_key_str(), "rk");
        assert_eq!(m1.exchange_str(), "dlx");
        let m2 = dead_lettered(&m1, "q2", DeadReason::Rejected, 101, "dlx", Some("again"));
        let m3 = dead_lettered(&m2, "q1", DeadReason::Expired, 102, "dlx", None);
        let d = deaths(&m3);
        assert_eq!(d.len(), 2, "one entry per queue and reason");
        assert_eq!(value_str(&d[0].inner()["queue"]).as_deref(), Some("q1"));
        assert_eq!(
            crate::broker::headers::value_int(&d[0].inner()["count"]),
            Some(2)
        );
        let h = m3.properties.headers().as_ref().unwrap();
        assert_eq!(
            value_str(&h.inner()["x-first-death-queue"]).as_deref(),
            Some("q1")
        );
        assert_eq!(
            value_str(&h.inner()["x-last-death-reason"]).as_deref(),
            Some("expired")
        );
        assert!(is_cycle(&m1, "q1"));
        assert!(!is_cycle(&m2, "q1"), "a rejection breaks the cycle");
    }
}
