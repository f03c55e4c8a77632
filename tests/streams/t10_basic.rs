use crate::common::{TestBroker, expect_amqp_error, within};
use crate::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(400);

fn bodies(r: std::ops::Range<u32>) -> Vec<String> {
    r.map(|i| format!("m{i}")).collect()
}

/// RabbitMQ's declare rules for streams, with its reply texts.
#[tokio::test]
async fn declare_rules() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let cases = [
        (
            QueueDeclareOptions {
                durable: false,
                ..Default::default()
            },
            "non-durable",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
    ];
    for (opts, prop) in cases {
        let ch = conn.create_channel().await.unwrap();
        let (code, text) =
            expect_amqp_error(ch.queue_declare("s1".into(), opts, stream_args(&[])).await);
        assert_eq!(
            (code, text.as_str()),
            (
                406,
                format!(
                    "PRECONDITION_FAILED - invalid property '{prop}' for queue 's1' in vhost '/'"
                )
                .as_str()
            )
        );
    }
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "s1", &[]).await;
    declare_stream(&ch, "s1", &[]).await;
    let (code, _) = expect_amqp_error(
        ch.queue_declare(
            "s1".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 406, "redeclare as classic");
}

/// Every offset specification, the offset header, replay by two
/// consumers, and what RabbitMQ refuses (basic.get, no prefetch).
#[tokio::test]
async fn offsets_and_replay() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "s", &[]).await;
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    publish_confirmed(&ch, "s", bodies(0..50), None).await;

    let all: Vec<(i64, String)> = (0..50).map(|i| (i, format!("m{i}"))).collect();
    let c1 = conn.create_channel().await.unwrap();
    let c2 = conn.create_channel().await.unwrap();
    let (a, bb) = within(20, async {
        tokio::join!(
            read(&c1, "s", "r1", from(s("first")), 50, QUIET),
            read(&c2, "s", "r2", from(s("first")), 50, QUIET)
        )
    })
    .await;
    assert_eq!(a, all, "first consumer replays everything");
    assert_eq!(bb, all, "second consumer replays everything independently");
    assert_eq!(
        within(
            10,
            read(&c1, "s", "r3", from(AMQPValue::LongLongInt(42)), 50, QUIET)
        )
        .await,
        all[42..].to_vec()
    );
    assert_eq!(
        within(
            10,
            read(&c1, "s", "r4", from(AMQPValue::LongInt(-3)), 50, QUIET)
        )
        .await,
        all[47..].to_vec()
    );
    assert_eq!(
        within(
            10,
            read(
                &c1,
                "s",
                "r5",
                from(AMQPValue::Timestamp(before)),
                50,
                QUIET
            )
        )
        .await,
        all
    );
    assert_eq!(
        within(10, read(&c1, "s", "r6", from(s("1h")), 50, QUIET)).await,
        all
    );
    let last = within(10, read(&c1, "s", "r7", from(s("last")), 50, QUIET)).await;
    assert!(
        !last.is_empty() && last.last() == all.last(),
        "last = start of the last chunk: {last:?}"
    );

    // next: only what is published after attaching.
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let reader = {
        let c = conn.create_channel().await.unwrap();
        tokio::spawn(async move {
            read(&c, "s", "r8", from(s("next")), 5, Duration::from_secs(3)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    publish_confirmed(&ch, "s", bodies(50..55), None).await;
    let got = within(10, reader).await.unwrap();
    assert_eq!(
        got,
        (50..55).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>()
    );

    // No prefetch: refused as RabbitMQ does.
    let c3 = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        c3.basic_consume(
            "s".into(),
            "x".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - consumer prefetch count is not set for stream queue 's' in vhost '/'"
        )
    );
    // basic.get: not implemented (a connection error, as RabbitMQ).
    let (code, text) =
        expect_amqp_error(ch.basic_get("s".into(), BasicGetOptions::default()).await);
    assert_eq!(
        (code, text.as_str()),
        (
            540,
            "NOT_IMPLEMENTED - basic.get not supported by stream queues queue 's' in vhost '/'"
        )
    );
}

/// Publishing through an exchange appends; delete removes the files.
#[tokio::test]
async fn exchange_publish_and_delete() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "sx", &[]).await;
    ch.exchange_declare(
        "ex".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "sx".into(),
        "ex".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10 {
        let c = ch
            .basic_publish(
                "ex".into(),
                "".into(),
                BasicPublishOptions::default(),
                format!("x{i}").as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        assert!(c.await.unwrap().is_ack());
    }
    let got = within(10, read(&ch, "sx", "r", from(s("first")), 10, QUIET)).await;
    assert_eq!(
        got.iter().map(|(_, b)| b.clone()).collect::<Vec<_>>(),
        (0..10).map(|i| format!("x{i}")).collect::<Vec<_>>()
    );
    let dir = b.dir.path().join("streams").join("%2F").join("sx");
    assert!(dir.join("00000000000000000000.log").exists());
    ch.queue_delete("sx".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!dir.exists(), "files removed with the stream");
}
