//! Consumers: single active consumer, consumer priorities (x-priority),
//! consumer timeouts (x-consumer-timeout).
use crate::common::*;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

fn table(kv: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert((*k).into(), v.clone());
    }
    t
}

async fn publish_n(ch: &lapin::Channel, q: &str, n: usize) {
    for i in 0..n {
        publish(ch, "", q, format!("m{i}").as_bytes()).await;
    }
}

async fn next(c: &mut lapin::Consumer) -> Delivery {
    within(5, c.next())
        .await
        .expect("consumer ended")
        .expect("delivery")
}

fn body(d: &Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

/// Nothing more arrives on `c` for a while.
async fn quiet(c: &mut lapin::Consumer) {
    let r = tokio::time::timeout(Duration::from_millis(200), c.next()).await;
    assert!(
        r.is_err(),
        "unexpected delivery: {:?}",
        r.map(|d| d.map(|d| d.map(|d| body(&d))))
    );
}

async fn consume(ch: &lapin::Channel, q: &str, tag: &str, args: FieldTable) -> lapin::Consumer {
    ch.basic_consume(q.into(), tag.into(), BasicConsumeOptions::default(), args)
        .await
        .unwrap()
}

#[tokio::test]
async fn single_active_consumer_fails_over_with_unacked_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch1 = conn.create_channel().await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    ch1.queue_declare(
        "sac".into(),
        QueueDeclareOptions::default(),
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    let mut a = consume(&ch1, "sac", "a", FieldTable::default()).await;
    let mut b2 = consume(&ch2, "sac", "b", FieldTable::default()).await;
    publish_n(&ch1, "sac", 4).await;
    let got: Vec<String> = [
        next(&mut a).await,
        next(&mut a).await,
        next(&mut a).await,
        next(&mut a).await,
    ]
    .iter()
    .map(body)
    .collect();
    assert_eq!(got, vec!["m0", "m1", "m2", "m3"]);
    quiet(&mut b2).await;
    // The active consumer's channel closes without acking: the next
    // consumer takes over and gets them back, redelivered, in order.
    ch1.close(200, "bye".into()).await.unwrap();
    for i in 0..4 {
        let d = next(&mut b2).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    publish_n(&ch2, "sac", 1).await;
    assert_eq!(body(&next(&mut b2).await), "m0");
}

#[tokio::test]
async fn single_active_consumer_next_in_registration_order_after_cancel() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "sac".into(),
        QueueDeclareOptions::default(),
        table(&[("x-single-active-consumer", AMQPValue::Boolean(true))]),
    )
    .await
    .unwrap();
    let mut a = consume(&ch, "sac", "a", FieldTable::default()).await;
    let mut b2 = consume(&ch, "sac", "b", FieldTable::default()).await;
    let mut c = consume(&ch, "sac", "c", FieldTable::default()).await;
    publish_n(&ch, "sac", 2).await;
    next(&mut a)
        .await
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    next(&mut a)
        .await
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    ch.basic_cancel("a".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    publish_n(&ch, "sac", 2).await;
    assert_eq!(body(&next(&mut b2).await), "m0");
    assert_eq!(body(&next(&mut b2).await), "m1");
    quiet(&mut c).await;
}

#[tokio::test]
async fn higher_priority_consumers_first_lower_when_they_are_full() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let hi_ch = conn.create_channel().await.unwrap();
    let lo_ch = conn.create_channel().await.unwrap();
    declare_queue(&hi_ch, "cp").await;
    hi_ch
        .basic_qos(2, BasicQosOptions::default())
        .await
        .unwrap();
    let mut lo = consume(
        &lo_ch,
        "cp",
        "lo",
        table(&[("x-priority", AMQPValue::LongInt(1))]),
    )
    .await;
    let mut hi = consume(
        &hi_ch,
        "cp",
        "hi",
        table(&[("x-priority", AMQPValue::LongInt(10))]),
    )
    .await;
    publish_n(&lo_ch, "cp", 5).await;
    let h1 = next(&mut hi).await;
    let h2 = next(&mut hi).await;
    assert_eq!((body(&h1), body(&h2)), ("m0".into(), "m1".into()));
    let l: Vec<String> = [
        next(&mut lo).await,
        next(&mut lo).await,
        next(&mut lo).await,
    ]
    .iter()
    .map(body)
    .collect();
    assert_eq!(l, vec!["m2", "m3", "m4"]);
    // Credit back on the high one: it is preferred again.
    h1.ack(BasicAckOptions::default()).await.unwrap();
    publish_n(&lo_ch, "cp", 1).await;
    assert_eq!(body(&next(&mut hi).await), "m0");
    quiet(&mut lo).await;
}

#[tokio::test]
async fn equal_priorities_round_robin() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "rr").await;
    let mut low = consume(&ch, "rr", "low", FieldTable::default()).await;
    let mut x = consume(
        &ch,
        "rr",
        "x",
        table(&[("x-priority", AMQPValue::ShortShortInt(5))]),
    )
    .await;
    let mut y = consume(
        &ch,
        "rr",
        "y",
        table(&[("x-priority", AMQPValue::LongLongInt(5))]),
    )
    .await;
    publish_n(&ch, "rr", 4).await;
    let xs: Vec<String> = [next(&mut x).await, next(&mut x).await]
        .iter()
        .map(body)
        .collect();
    let ys: Vec<String> = [next(&mut y).await, next(&mut y).await]
        .iter()
        .map(body)
        .collect();
    assert_eq!(xs, vec!["m0", "m2"]);
    assert_eq!(ys, vec!["m1", "m3"]);
    quiet(&mut low).await;
}

#[tokio::test]
async fn consumer_timeout_cancels_and_requeues() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "slow".into(),
        QueueDeclareOptions::default(),
        table(&[("x-consumer-timeout", AMQPValue::LongInt(200))]),
    )
    .await
    .unwrap();
    let mut c = consume(&ch, "slow", "c", FieldTable::default()).await;
    publish_n(&ch, "slow", 2).await;
    let d0 = next(&mut c).await;
    let _d1 = next(&mut c).await;
    assert!(!d0.redelivered);
    // Held past the timeout: the server cancels the consumer (basic.cancel
    // ends lapin's stream) and the channel stays open.
    let end = within(5, c.next()).await;
    assert!(end.is_none(), "consumer should have been cancelled");
    // A late ack of a taken-back delivery is ignored, not applied.
    d0.ack(BasicAckOptions::default()).await.unwrap();
    settle().await;
    assert!(ch.status().connected(), "channel stays open");
    assert_eq!(message_count(&conn, "slow").await, 2);
    let other = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = other
        .basic_get("slow".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8(m.delivery.data.clone()).unwrap(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        got,
        vec![("m0".to_string(), true), ("m1".to_string(), true)]
    );
    // The channel still works.
    declare_queue(&ch, "after").await;
}

#[tokio::test]
async fn consumer_timeout_from_consume_argument_and_acks_in_time_are_fine() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "q").await;
    let mut c = consume(
        &ch,
        "q",
        "c",
        table(&[("x-consumer-timeout", AMQPValue::LongInt(300))]),
    )
    .await;
    publish_n(&ch, "q", 1).await;
    next(&mut c)
        .await
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    publish_n(&ch, "q", 1).await;
    let d = next(&mut c).await;
    assert_eq!(body(&d), "m0");
    // Not acked: cancelled after 300 ms.
    assert!(within(5, c.next()).await.is_none());
    assert_eq!(message_count(&conn, "q").await, 1);
}
