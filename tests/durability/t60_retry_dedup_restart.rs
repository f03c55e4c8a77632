use crate::process::WarrenProcess;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// A persistent message waiting out a retry delay is still in the store: after
/// a restart it is ready again at once, redelivered (the remaining delay is
/// not kept).
#[tokio::test]
async fn delayed_retry_survives_restart_as_ready() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = FieldTable::default();
    args.insert("x-delayed-retry-type".into(), s("failed"));
    args.insert("x-delayed-retry-min".into(), AMQPValue::LongInt(60_000));
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "rq".into(),
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
        let props = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish(
            "".into(),
            "rq".into(),
            BasicPublishOptions::default(),
            b"m",
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let mut c = ch
            .basic_consume(
                "rq".into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let d = c.next().await.unwrap().unwrap();
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(
            ch.basic_get("rq".into(), BasicGetOptions { no_ack: true })
                .await
                .unwrap()
                .is_none(),
            "delayed"
        );
        let _ = conn.close(200, "bye".into()).await;
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let m = ch
        .basic_get("rq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("ready after restart");
    assert_eq!(&m.delivery.data[..], b"m");
    assert!(m.delivery.redelivered);
    drop(conn);
    w.stop();
}

/// The deduplication cache of a durable queue is rebuilt from the messages
/// still in it.
#[tokio::test]
async fn dedup_cache_is_rebuilt_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut args = FieldTable::default();
    args.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    let props = |id: &str| {
        let mut h = FieldTable::default();
        h.insert("x-deduplication-header".into(), s(id));
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h)
    };
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "ddq".into(),
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
        ch.basic_publish(
            "".into(),
            "ddq".into(),
            BasicPublishOptions::default(),
            b"a1",
            props("a"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let c = ch
        .basic_publish(
            "".into(),
            "ddq".into(),
            BasicPublishOptions::default(),
            b"a2",
            props("a"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
    let c = ch
        .basic_publish(
            "".into(),
            "ddq".into(),
            BasicPublishOptions::default(),
            b"b1",
            props("b"),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack());
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("ddq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    assert_eq!(got, vec!["a1", "b1"]);
    drop(conn);
    w.stop();
}
