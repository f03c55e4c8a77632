use crate::process::WarrenProcess;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

/// Persistent messages in a durable priority queue come back after a
/// restart in priority order (the queue reads each one to learn its level).
#[tokio::test]
async fn priority_order_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::LongInt(5));
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "pq".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args.clone(),
        )
        .await
        .unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for (body, p) in [("lo1", 1u8), ("hi1", 5), ("mid", 3), ("lo2", 1), ("hi2", 9)] {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_priority(p);
            let c = ch
                .basic_publish(
                    "".into(),
                    "pq".into(),
                    BasicPublishOptions::default(),
                    body.as_bytes(),
                    props,
                )
                .await
                .unwrap()
                .await
                .unwrap();
            assert!(c.is_ack());
        }
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("pq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(got, vec!["hi1", "hi2", "mid", "lo1", "lo2"]);
    drop(conn);
    w.stop();
}
