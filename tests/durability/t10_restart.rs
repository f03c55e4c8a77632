use crate::common::within;
use crate::process::WarrenProcess;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;

async fn connect(w: &WarrenProcess) -> Connection {
    Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .expect("connect")
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn count(ch: &lapin::Channel, q: &str) -> Option<u32> {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()
    .map(|q| q.message_count())
}

/// Declares durable and transient things, publishes persistent and
/// transient messages, acks some, restarts gracefully: exactly what
/// RabbitMQ keeps comes back.
#[tokio::test]
async fn restart_keeps_exactly_what_rabbitmq_keeps() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.exchange_declare(
            "dx".into(),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.exchange_declare(
            "tx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare("dq".into(), durable(), FieldTable::default())
            .await
            .unwrap();
        ch.queue_declare(
            "tq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_declare(
            "xq".into(),
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "dq".into(),
            "dx".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        for i in 0..10 {
            ch.basic_publish(
                "dx".into(),
                "k".into(),
                BasicPublishOptions::default(),
                format!("p{i}").as_bytes(),
                persistent(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        for i in 0..5 {
            ch.basic_publish(
                "dx".into(),
                "k".into(),
                BasicPublishOptions::default(),
                format!("t{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
        // Ack the first three persistent ones.
        for _ in 0..3 {
            let g = ch
                .basic_get("dq".into(), BasicGetOptions::default())
                .await
                .unwrap()
                .expect("message");
            g.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        // Deliver the fourth and leave it unacked.
        let g = ch
            .basic_get("dq".into(), BasicGetOptions::default())
            .await
            .unwrap()
            .expect("message");
        assert_eq!(g.delivery.data, b"p3");
        assert_eq!(count(&ch, "dq").await, Some(11));
        tokio::time::sleep(Duration::from_millis(100)).await;
        // No close: the graceful stop closes the connection.
    }
    w.stop();

    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    // Durable queue and exchange and binding survive; transient and exclusive do not.
    assert_eq!(
        count(&ch, "dq").await,
        Some(7),
        "p3..p9 remain; transient messages are dropped"
    );
    let ch2 = conn.create_channel().await.unwrap();
    assert_eq!(count(&ch2, "tq").await, None);
    let ch3 = conn.create_channel().await.unwrap();
    assert_eq!(count(&ch3, "xq").await, None);
    let ch4 = conn.create_channel().await.unwrap();
    ch4.exchange_declare(
        "dx".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("durable exchange survives");
    let ch5 = conn.create_channel().await.unwrap();
    assert!(
        ch5.exchange_declare(
            "tx".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default()
        )
        .await
        .is_err()
    );

    let ch = conn.create_channel().await.unwrap();
    let mut c = ch
        .basic_consume(
            "dq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..7 {
        let d = within(10, c.next()).await.unwrap().unwrap();
        got.push((String::from_utf8(d.data.clone()).unwrap(), d.redelivered));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let expected: Vec<(String, bool)> = (3..10).map(|i| (format!("p{i}"), i == 3)).collect();
    assert_eq!(
        got, expected,
        "order kept; the delivered-but-unacked one is redelivered"
    );
    // The binding survived: publishing through dx still reaches dq.
    ch.basic_publish(
        "dx".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"after",
        persistent(),
    )
    .await
    .unwrap();
    let d = within(10, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"after");
    d.ack(BasicAckOptions::default()).await.unwrap();
    drop(conn);
    w.stop();
}

/// A consumer that acks before the store's flush still lets every confirm
/// through (another broker stalls its publisher there).
#[tokio::test]
async fn confirms_arrive_when_consumer_acks_before_flush() {
    let dir = tempfile::tempdir().unwrap();
    let w = WarrenProcess::start(&dir.path().join("data"));
    let conn = connect(&w).await;
    let pch = conn.create_channel().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    pch.queue_declare("fast".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut c = cch
        .basic_consume(
            "fast".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let consumer = tokio::spawn(async move {
        let mut n = 0;
        while n < 2000 {
            let d = c.next().await.unwrap().unwrap();
            d.ack(BasicAckOptions::default()).await.unwrap();
            n += 1;
        }
    });
    let mut confirms = Vec::new();
    for i in 0..2000u32 {
        confirms.push(
            pch.basic_publish(
                "".into(),
                "fast".into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                persistent(),
            )
            .await
            .unwrap(),
        );
    }
    for cf in confirms {
        let r = within(20, cf).await.unwrap();
        assert!(r.is_ack(), "every persistent message is confirmed");
    }
    within(20, consumer).await.unwrap();
    drop(conn);
    w.stop();
}
