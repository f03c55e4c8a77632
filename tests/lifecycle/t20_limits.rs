use crate::common::*;
use crate::util::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

async fn bodies(ch: &lapin::Channel, q: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        out.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    out
}

#[tokio::test]
async fn max_length_drop_head_dead_letters_the_oldest() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_setup(&ch).await;
    ch.queue_declare(
        "bounded".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-max-length", AMQPValue::LongInt(3)),
            ("x-dead-letter-exchange", s("dlx")),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            "bounded".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bodies(&ch, "bounded").await, vec!["m2", "m3", "m4"]);
    assert_eq!(bodies(&ch, "dead").await, vec!["m0", "m1"]);
}

#[tokio::test]
async fn reject_publish_nacks_the_publisher() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "full".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-max-length", AMQPValue::LongInt(2)),
            ("x-overflow", s("reject-publish")),
        ]),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut results = Vec::new();
    for i in 0..4 {
        let c = ch
            .basic_publish(
                "".into(),
                "full".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        results.push(within(5, c).await.unwrap().is_ack());
    }
    assert_eq!(results, vec![true, true, false, false]);
    assert_eq!(bodies(&ch, "full").await, vec!["m0", "m1"]);
}

#[tokio::test]
async fn max_length_bytes_counts_body_bytes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "bytes".into(),
        QueueDeclareOptions::default(),
        args(&[("x-max-length-bytes", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    for b in ["aaaa", "bbbb", "cccc"] {
        ch.basic_publish(
            "".into(),
            "bytes".into(),
            BasicPublishOptions::default(),
            b.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(bodies(&ch, "bytes").await, vec!["bbbb", "cccc"]);
}

#[tokio::test]
async fn delivery_limit_dead_letters_and_counts_redeliveries() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_setup(&ch).await;
    ch.queue_declare(
        "flaky".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-delivery-limit", AMQPValue::LongInt(2)),
            ("x-dead-letter-exchange", s("dlx")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "flaky".into(),
        BasicPublishOptions::default(),
        b"job",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "flaky".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut counts = Vec::new();
    for _ in 0..3 {
        let d = within(5, c.next()).await.unwrap().unwrap();
        let n =
            d.properties
                .headers()
                .as_ref()
                .and_then(|h| match h.inner().get("x-delivery-count") {
                    Some(AMQPValue::LongLongInt(n)) => Some(*n),
                    _ => None,
                });
        counts.push((d.redelivered, n));
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    }
    assert_eq!(
        counts,
        vec![(false, None), (true, Some(1)), (true, Some(2))]
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let dead = ch
        .basic_get("dead".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("dead-lettered");
    let h = dead.delivery.properties.headers().clone().unwrap();
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
        panic!()
    };
    let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert!(
        matches!(d.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"delivery_limit")
    );
}

#[tokio::test]
async fn unused_queue_expires() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ephemeral".into(),
        QueueDeclareOptions::default(),
        args(&[("x-expires", AMQPValue::LongInt(100))]),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let w = watch_channel(&ch).await;
    let _ = ch
        .queue_declare(
            "ephemeral".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    let (code, _) = w.error().await;
    assert_eq!(code, 404, "the queue expired");
}

/// A message returned by a closing channel past its delivery limit is
/// dead-lettered, not lost.
#[tokio::test]
async fn delivery_limit_on_channel_close_dead_letters() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    dead_letter_setup(&ch).await;
    ch.queue_declare(
        "once".into(),
        QueueDeclareOptions::default(),
        args(&[
            ("x-delivery-limit", AMQPValue::LongInt(0)),
            ("x-dead-letter-exchange", s("dlx")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "once".into(),
        BasicPublishOptions::default(),
        b"job",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let consumer_ch = conn.create_channel().await.unwrap();
    let mut c = consumer_ch
        .basic_consume(
            "once".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"job");
    consumer_ch.close(200, "bye".into()).await.unwrap();
    let got = within(5, async {
        loop {
            if let Some(m) = ch
                .basic_get("dead".into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
            {
                break m;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(got.delivery.data, b"job");
}
