use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::{Duration, Instant};

fn delayed_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString(LongString::from(b"direct".to_vec())),
    );
    t
}

fn delay(ms: i32) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("x-delay".into(), AMQPValue::LongInt(ms));
    BasicProperties::default().with_headers(h)
}

/// An x-delayed-message exchange holds a message for its x-delay, then
/// routes it by its x-delayed-type; messages without a delay go at once.
#[tokio::test]
async fn delayed_exchange_holds_messages_for_their_delay() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "later".into(),
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions::default(),
        delayed_args(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "dq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dq".into(),
        "later".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let start = Instant::now();
    ch.basic_publish(
        "later".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"slow",
        delay(400),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ch.basic_publish(
        "later".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"fast",
        delay(100),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    ch.basic_publish(
        "later".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"now",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "dq".into(),
            "c".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = within(5, c.next()).await.unwrap().unwrap();
        got.push((String::from_utf8(d.data.clone()).unwrap(), start.elapsed()));
    }
    let names: Vec<&str> = got.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, vec!["now", "fast", "slow"]);
    assert!(
        got[1].1 >= Duration::from_millis(90),
        "fast waited its 100 ms ({:?})",
        got[1].1
    );
    assert!(
        got[2].1 >= Duration::from_millis(390),
        "slow waited its 400 ms ({:?})",
        got[2].1
    );
}

#[tokio::test]
async fn delayed_exchange_needs_a_delayed_type() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .exchange_declare(
            "bad".into(),
            lapin::ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    let (code, text) = amqp_error(&err).expect("channel error");
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - Invalid argument, 'x-delayed-type' must be an existing exchange type"
    );
}
