use crate::common::*;
use crate::util::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::time::{Duration, Instant};

fn hstr(h: &FieldTable, k: &str) -> Option<String> {
    match h.inner().get(k)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn hint(h: &FieldTable, k: &str) -> Option<i64> {
    match h.inner().get(k)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        _ => None,
    }
}

async fn next_body(c: &mut lapin::Consumer) -> (String, BasicProperties, bool) {
    let d = within(5, c.next()).await.unwrap().unwrap();
    d.ack(BasicAckOptions::default()).await.unwrap();
    (
        String::from_utf8(d.data.clone()).unwrap(),
        d.properties.clone(),
        d.redelivered,
    )
}

#[tokio::test]
async fn queue_ttl_expires_nobody_consuming_and_dead_letters_with_x_death() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_setup(&ch).await;
    ch.queue_declare(
        "short".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(50)),
            ("x-dead-letter-exchange", s("dlx")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "short".into(),
        BasicPublishOptions::default(),
        b"gone",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let started = Instant::now();
    let mut c = ch
        .basic_consume(
            "dead".into(),
            "d".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (body, props, _) = next_body(&mut c).await;
    assert_eq!(body, "gone");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "expired promptly at the head of an unconsumed queue"
    );
    let h = props.headers().clone().unwrap();
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
        panic!("x-death is an array")
    };
    assert_eq!(deaths.as_slice().len(), 1);
    let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
        panic!("x-death entry is a table")
    };
    assert_eq!(hstr(d, "reason").as_deref(), Some("expired"));
    assert_eq!(hstr(d, "queue").as_deref(), Some("short"));
    assert_eq!(hstr(d, "exchange").as_deref(), Some(""));
    assert_eq!(hint(d, "count"), Some(1));
    assert!(matches!(
        d.inner().get("time"),
        Some(AMQPValue::Timestamp(_))
    ));
    let AMQPValue::FieldArray(rks) = d.inner().get("routing-keys").unwrap() else {
        panic!()
    };
    assert_eq!(rks.as_slice(), &[s("short")]);
    assert_eq!(hstr(&h, "x-first-death-reason").as_deref(), Some("expired"));
    assert_eq!(hstr(&h, "x-first-death-queue").as_deref(), Some("short"));
    assert_eq!(hstr(&h, "x-last-death-queue").as_deref(), Some("short"));
}

#[tokio::test]
async fn per_message_ttl_expires_wherever_it_sits() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_setup(&ch).await;
    ch.queue_declare(
        "mixed".into(),
        QueueDeclareOptions::default(),
        args(&[("x-dead-letter-exchange", s("dlx"))]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "mixed".into(),
        BasicPublishOptions::default(),
        b"stays",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "mixed".into(),
        BasicPublishOptions::default(),
        b"short",
        BasicProperties::default().with_expiration("40".into()),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "mixed".into(),
        BasicPublishOptions::default(),
        b"stays too",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "dead".into(),
            "d".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (body, props, _) = next_body(&mut c).await;
    assert_eq!(
        body, "short",
        "expired behind a message that does not expire"
    );
    assert!(
        props.expiration().is_none(),
        "expiration removed on dead-lettering"
    );
    let h = props.headers().clone().unwrap();
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
        panic!()
    };
    let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(hstr(d, "original-expiration").as_deref(), Some("40"));
    let q = ch
        .queue_declare(
            "mixed".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 2);
}

#[tokio::test]
async fn reject_without_requeue_dead_letters_with_routing_key() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx-direct".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "failed".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "failed".into(),
        "dlx-direct".into(),
        "failed-key".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "work".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-dead-letter-exchange", s("dlx-direct")),
            ("x-dead-letter-routing-key", s("failed-key")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "work".into(),
        BasicPublishOptions::default(),
        b"bad",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut w = ch
        .basic_consume(
            "work".into(),
            "w".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, w.next()).await.unwrap().unwrap();
    d.reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    let mut f = ch
        .basic_consume(
            "failed".into(),
            "f".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let (body, props, _) = next_body(&mut f).await;
    assert_eq!(body, "bad");
    let h = props.headers().clone().unwrap();
    assert_eq!(
        hstr(&h, "x-first-death-reason").as_deref(),
        Some("rejected")
    );
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
        panic!()
    };
    let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert_eq!(hstr(d, "reason").as_deref(), Some("rejected"));
    assert_eq!(hstr(d, "queue").as_deref(), Some("work"));
}

#[tokio::test]
async fn dead_letter_cycle_is_dropped() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // A queue that expires messages into a fanout that routes back to it.
    ch.exchange_declare(
        "loop".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "cyc".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(20)),
            ("x-dead-letter-exchange", s("loop")),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "cyc".into(),
        "loop".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "cyc".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let q = ch
        .queue_declare(
            "cyc".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        q.message_count(),
        0,
        "the cycle is detected and the message dropped, not looping"
    );
}

#[tokio::test]
async fn invalid_expiration_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "q".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let w = watch_channel(&ch).await;
    let _ = ch
        .basic_publish(
            "".into(),
            "q".into(),
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_expiration("soon".into()),
        )
        .await;
    let (code, text) = w.error().await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - invalid expiration 'soon': no_integer"
    );
}
