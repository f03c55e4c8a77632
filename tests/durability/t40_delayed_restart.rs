use crate::common::within;
use crate::process::WarrenProcess;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// A persistent message waiting in a durable delayed exchange survives a
/// restart and is routed when its delay is over.
#[tokio::test]
async fn persistent_delayed_message_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-delayed-type".into(),
            AMQPValue::LongString(LongString::from(b"direct".to_vec())),
        );
        ch.exchange_declare(
            "later".into(),
            lapin::ExchangeKind::Custom("x-delayed-message".into()),
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap();
        ch.queue_declare(
            "dq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
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
        let mut h = FieldTable::default();
        h.insert("x-delay".into(), AMQPValue::LongInt(1500));
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h);
        let c = ch
            .basic_publish(
                "later".into(),
                "k".into(),
                BasicPublishOptions::default(),
                b"wait for me",
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(c.is_ack());
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
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
    let d = within(10, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"wait for me");
    let h = d.properties.headers().clone().unwrap();
    assert!(
        !h.contains_key("x-warren-delay-due"),
        "internal headers are stripped"
    );
    d.ack(BasicAckOptions::default()).await.unwrap();
    drop(conn);
    w.stop();
}

/// Messages of a queue with x-message-ttl still expire after a restart
/// (their TTL counts again from the restart: the store keeps no publish
/// time), instead of living forever.
#[tokio::test]
async fn queue_ttl_still_expires_recovered_messages() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(4000));
    let declare = |ch: lapin::Channel, args: FieldTable| async move {
        ch.queue_declare(
            "ttlq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .unwrap()
        .message_count()
    };
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        declare(ch.clone(), args.clone()).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in 0..5 {
            ch.basic_publish(
                "".into(),
                "ttlq".into(),
                BasicPublishOptions::default(),
                format!("m{i}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        }
        ch.wait_for_confirms().await.unwrap();
    }
    w.crash();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(declare(ch.clone(), args.clone()).await, 5, "recovered");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while declare(ch.clone(), args.clone()).await != 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "recovered messages never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
