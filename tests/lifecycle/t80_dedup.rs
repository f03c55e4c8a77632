//! Message deduplication (x-message-deduplication with x-cache-size and
//! x-cache-ttl, as the community plugin and LavinMQ): a message whose
//! x-deduplication-header was seen recently is dropped, and still confirmed.

use crate::common::*;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::Duration;

fn dedup_args(size: Option<i64>, ttl: Option<i64>) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    if let Some(s) = size {
        t.insert("x-cache-size".into(), AMQPValue::LongLongInt(s));
    }
    if let Some(s) = ttl {
        t.insert("x-cache-ttl".into(), AMQPValue::LongLongInt(s));
    }
    t
}

fn with_id(id: Option<AMQPValue>) -> BasicProperties {
    let mut h = FieldTable::default();
    if let Some(v) = id {
        h.insert("x-deduplication-header".into(), v);
    }
    BasicProperties::default().with_headers(h)
}

fn sid(s: &str) -> Option<AMQPValue> {
    Some(AMQPValue::LongString(LongString::from(
        s.as_bytes().to_vec(),
    )))
}

/// Publishes with confirms; asserts every confirm is an ack.
async fn send(ch: &lapin::Channel, q: &str, body: &str, id: Option<AMQPValue>) {
    let c = ch
        .basic_publish(
            "".into(),
            q.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            with_id(id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack(), "{body} confirmed as ack");
}

#[tokio::test]
async fn duplicates_within_the_ttl_are_dropped_and_acked() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "dd".into(),
        QueueDeclareOptions::default(),
        dedup_args(Some(100), Some(400)),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "dd", "a1", sid("a")).await;
    send(&ch, "dd", "a2", sid("a")).await;
    send(&ch, "dd", "b1", sid("b")).await;
    send(&ch, "dd", "n1", None).await;
    send(&ch, "dd", "n2", None).await;
    send(&ch, "dd", "i1", Some(AMQPValue::LongInt(7))).await;
    send(&ch, "dd", "i2", Some(AMQPValue::LongInt(7))).await;
    // The id is remembered even once the message was consumed.
    assert_eq!(drain(&ch, "dd").await, vec!["a1", "b1", "n1", "n2", "i1"]);
    send(&ch, "dd", "a3", sid("a")).await;
    assert!(drain(&ch, "dd").await.is_empty());
    tokio::time::sleep(Duration::from_millis(500)).await;
    send(&ch, "dd", "a4", sid("a")).await;
    assert_eq!(drain(&ch, "dd").await, vec!["a4"]);
}

#[tokio::test]
async fn the_cache_evicts_the_oldest_id_at_its_size() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "de".into(),
        QueueDeclareOptions::default(),
        dedup_args(Some(2), None),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "de", "a1", sid("a")).await;
    send(&ch, "de", "b1", sid("b")).await;
    send(&ch, "de", "c1", sid("c")).await; // evicts a
    send(&ch, "de", "a2", sid("a")).await; // evicts b
    send(&ch, "de", "c2", sid("c")).await; // still cached
    send(&ch, "de", "b2", sid("b")).await;
    assert_eq!(drain(&ch, "de").await, vec!["a1", "b1", "c1", "a2", "b2"]);
}

#[tokio::test]
async fn without_the_argument_nothing_is_deduplicated() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "plain").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "plain", "a1", sid("a")).await;
    send(&ch, "plain", "a2", sid("a")).await;
    assert_eq!(drain(&ch, "plain").await, vec!["a1", "a2"]);
    let err = ch
        .queue_declare("bad".into(), QueueDeclareOptions::default(), {
            let mut t = dedup_args(Some(0), None);
            t.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
            t
        })
        .await
        .unwrap_err();
    assert_eq!(amqp_error(&err).unwrap().0, 406);
}

/// Exchange-level deduplication: a duplicate is not routed to any queue.
#[tokio::test]
async fn exchange_deduplication_does_not_route_duplicates() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = dedup_args(Some(10), Some(300));
    args.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    ch.exchange_declare(
        "dx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        args,
    )
    .await
    .unwrap();
    for q in ["dx1", "dx2"] {
        declare_queue(&ch, q).await;
        ch.queue_bind(
            q.into(),
            "dx".into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for (body, id) in [("a1", "a"), ("a2", "a"), ("b1", "b")] {
        let c = ch
            .basic_publish(
                "dx".into(),
                "".into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                with_id(sid(id)),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    tokio::time::sleep(Duration::from_millis(350)).await;
    ch.basic_publish(
        "dx".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"a3",
        with_id(sid("a")),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    assert_eq!(drain(&ch, "dx1").await, vec!["a1", "b1", "a3"]);
    assert_eq!(drain(&ch, "dx2").await, vec!["a1", "b1", "a3"]);
}
