//! Queue declaration, equivalence, purge, delete, exclusive and auto-delete
//! queues.
use crate::common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use std::time::Duration;

fn passive() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

#[tokio::test]
async fn server_named_queue_gets_amq_gen_name() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q1 = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let q2 = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(q1.name().as_str().starts_with("amq.gen-"), "{}", q1.name());
    assert!(q1.name().as_str().len() > "amq.gen-".len() + 10);
    assert_ne!(q1.name(), q2.name());
    assert_eq!(q1.message_count(), 0);
    assert_eq!(q1.consumer_count(), 0);
    // Usable by name through the default exchange.
    publish(&ch, "", q1.name().as_str(), b"hi").await;
    assert_eq!(drain(&ch, q1.name().as_str()).await, vec!["hi"]);
}

#[tokio::test]
async fn declare_ok_reports_message_and_consumer_counts() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "counts").await;
    for i in 0..3 {
        publish(&ch, "", "counts", format!("{i}").as_bytes()).await;
    }
    settle().await;
    let q = ch
        .queue_declare(
            "counts".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (3, 0));
    let q = ch
        .queue_declare("counts".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (3, 0));
    // Two consumers that take nothing (prefetch 1, no acks): messages are
    // delivered, so ready count drops and consumer count rises.
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(1, Default::default()).await.unwrap();
    let _c1 = cch
        .basic_consume(
            "counts".into(),
            "c1".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _c2 = cch
        .basic_consume(
            "counts".into(),
            "c2".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    settle().await;
    let q = ch
        .queue_declare("counts".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (1, 2));
}

#[tokio::test]
async fn passive_declare_of_missing_queue_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare("nope".into(), passive(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'nope' in vhost '/'");
}

#[tokio::test]
async fn declaring_amq_prefixed_queue_is_403() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare("amq.mine".into(), Default::default(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue name 'amq.mine' contains reserved prefix 'amq.*'"
    );
}

#[tokio::test]
async fn redeclare_with_different_durability_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "qd").await;
    let (code, text) = expect_amqp_error(
        ch.queue_declare(
            "qd".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'durable' for queue 'qd' in vhost '/': received 'true' but current is 'false'"
    );
}

#[tokio::test]
async fn redeclare_with_different_auto_delete_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "qad").await;
    let (code, text) = expect_amqp_error(
        ch.queue_declare(
            "qad".into(),
            QueueDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'auto_delete' for queue 'qad' in vhost '/': received 'true' but current is 'false'"
    );
}

#[tokio::test]
async fn redeclare_with_different_argument_value_is_406_code() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "qa".into(),
        Default::default(),
        args(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare(
            "qa".into(),
            Default::default(),
            args(&[("x-max-length", AMQPValue::LongInt(20))]),
        )
        .await,
    );
    assert_eq!(code, 406);
    assert!(text.starts_with("PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'qa' in vhost '/': received "), "{text}");
}

#[tokio::test]
async fn redeclare_with_different_argument_value_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "qa".into(),
        Default::default(),
        args(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    // Same value: fine.
    ch.queue_declare(
        "qa".into(),
        Default::default(),
        args(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare(
            "qa".into(),
            Default::default(),
            args(&[("x-max-length", AMQPValue::LongInt(20))]),
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'x-max-length' for queue 'qa' in vhost '/': received '20' but current is '10'"
    );
}

#[tokio::test]
async fn redeclare_without_an_argument_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "qm".into(),
        Default::default(),
        args(&[("x-message-ttl", AMQPValue::LongInt(5000))]),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare("qm".into(), Default::default(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'x-message-ttl' for queue 'qm' in vhost '/': received none but current is the value '5000' of type 'signedint'"
    );
}

#[tokio::test]
async fn passive_redeclare_ignores_arguments() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "qp".into(),
        Default::default(),
        args(&[("x-max-length", AMQPValue::LongInt(10))]),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "qp".into(),
        QueueDeclareOptions {
            passive: true,
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn legacy_x_queue_mode_is_accepted() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "lazy".into(),
        Default::default(),
        args(&[("x-queue-mode", AMQPValue::LongString("lazy".into()))]),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "lazy".into(),
        Default::default(),
        args(&[("x-queue-mode", AMQPValue::LongString("lazy".into()))]),
    )
    .await
    .unwrap();
    publish(&ch, "", "lazy", b"z").await;
    assert_eq!(drain(&ch, "lazy").await, vec!["z"]);
}

#[tokio::test]
async fn explicit_classic_queue_type_is_equivalent_to_none() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "qt").await;
    ch.queue_declare(
        "qt".into(),
        Default::default(),
        args(&[("x-queue-type", AMQPValue::LongString("classic".into()))]),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn purge_returns_count_and_empties_queue() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "purge-me").await;
    for i in 0..7 {
        publish(&ch, "", "purge-me", format!("{i}").as_bytes()).await;
    }
    settle().await;
    let n = ch
        .queue_purge("purge-me".into(), Default::default())
        .await
        .unwrap();
    assert_eq!(n, 7);
    assert_eq!(
        ch.queue_purge("purge-me".into(), Default::default())
            .await
            .unwrap(),
        0
    );
    assert!(drain(&ch, "purge-me").await.is_empty());
}

#[tokio::test]
async fn purge_leaves_unacked_messages_alone() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "purge-unacked").await;
    for i in 0..3 {
        publish(&ch, "", "purge-unacked", format!("{i}").as_bytes()).await;
    }
    settle().await;
    let got = ch
        .basic_get("purge-unacked".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        ch.queue_purge("purge-unacked".into(), Default::default())
            .await
            .unwrap(),
        2
    );
    got.delivery
        .nack(BasicNackOptions {
            requeue: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(drain(&ch, "purge-unacked").await, vec!["0"]);
}

#[tokio::test]
async fn delete_returns_message_count() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "del").await;
    for _ in 0..4 {
        publish(&ch, "", "del", b"x").await;
    }
    settle().await;
    assert_eq!(
        ch.queue_delete("del".into(), Default::default())
            .await
            .unwrap(),
        4
    );
    let (code, _) = expect_amqp_error(
        ch.queue_declare("del".into(), passive(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 404);
    // Deleting a missing queue is fine.
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(
        ch.queue_delete("del".into(), Default::default())
            .await
            .unwrap(),
        0
    );
}

#[tokio::test]
async fn delete_if_unused_with_consumer_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "busy").await;
    let _c = ch
        .basic_consume(
            "busy".into(),
            "c".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch2.queue_delete(
            "busy".into(),
            QueueDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - queue 'busy' in vhost '/' in use"
    );
    // Still there.
    let ch3 = conn.create_channel().await.unwrap();
    ch3.queue_declare("busy".into(), passive(), FieldTable::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn delete_if_empty_with_messages_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "full").await;
    publish(&ch, "", "full", b"x").await;
    settle().await;
    let (code, text) = expect_amqp_error(
        ch.queue_delete(
            "full".into(),
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - queue 'full' in vhost '/' not empty"
    );
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(drain(&ch, "full").await, vec!["x"]);
    assert_eq!(
        ch.queue_delete(
            "full".into(),
            QueueDeleteOptions {
                if_empty: true,
                if_unused: true,
                ..Default::default()
            }
        )
        .await
        .unwrap(),
        0
    );
}

const LOCKED: &str = "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue 'excl' in vhost '/'. It could be originally declared on another connection or the exclusive property value does not match that of the original declaration.";

#[tokio::test]
async fn exclusive_queue_is_locked_to_its_connection() {
    let b = TestBroker::start().await;
    let owner = b.connect().await;
    let och = owner.create_channel().await.unwrap();
    och.queue_declare(
        "excl".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Another channel of the same connection may use it.
    let och2 = owner.create_channel().await.unwrap();
    publish(&och2, "", "excl", b"mine").await;
    assert_eq!(drain(&och2, "excl").await, vec!["mine"]);

    let other = b.connect().await;
    let ch = other.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare(
            "excl".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!((code, text.as_str()), (405, LOCKED));
    let ch = other.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare("excl".into(), passive(), FieldTable::default())
            .await,
    );
    assert_eq!((code, text.as_str()), (405, LOCKED));
    let ch = other.create_channel().await.unwrap();
    let (code, _) = expect_amqp_error(
        ch.basic_consume(
            "excl".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 405);
    let ch = other.create_channel().await.unwrap();
    let (code, _) = expect_amqp_error(ch.basic_get("excl".into(), Default::default()).await);
    assert_eq!(code, 405);
    let ch = other.create_channel().await.unwrap();
    let (code, _) = expect_amqp_error(ch.queue_delete("excl".into(), Default::default()).await);
    assert_eq!(code, 405);
    // But publishing to it from another connection is allowed.
    let ch = other.create_channel().await.unwrap();
    publish(&ch, "", "excl", b"from-other").await;
    assert_eq!(drain(&och2, "excl").await, vec!["from-other"]);
}

#[tokio::test]
async fn exclusive_queue_deleted_when_connection_closes_even_with_live_consumer() {
    let b = TestBroker::start().await;
    let owner = b.connect().await;
    let och = owner.create_channel().await.unwrap();
    och.queue_declare(
        "excl-live".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        publish(&och, "", "excl-live", format!("{i}").as_bytes()).await;
    }
    let mut consumer = och
        .basic_consume(
            "excl-live".into(),
            "live".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // Take one delivery and leave it unacked.
    let _d = within(3, consumer.next()).await.unwrap().unwrap();
    within(3, owner.close(200, "bye".into())).await.unwrap();

    // A new connection can work at once, and the exclusive queue is gone.
    within(3, async {
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        declare_queue(&ch, "after-excl").await;
        publish(&ch, "", "after-excl", b"ok").await;
        assert_eq!(drain(&ch, "after-excl").await, vec!["ok"]);
        let (code, text) = expect_amqp_error(
            ch.queue_declare("excl-live".into(), passive(), FieldTable::default())
                .await,
        );
        assert_eq!(code, 404);
        assert_eq!(text, "NOT_FOUND - no queue 'excl-live' in vhost '/'");
    })
    .await;
}

#[tokio::test]
async fn exclusive_queue_deleted_when_tcp_connection_drops() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    use amq_protocol::protocol::{AMQPClass, queue as q_m};
    raw.send_method(
        1,
        AMQPClass::Queue(q_m::AMQPMethod::Declare(q_m::Declare {
            queue: "excl-drop".into(),
            exclusive: true,
            ..Default::default()
        })),
    )
    .await;
    raw.method().await;
    drop(raw);
    let conn = b.connect().await;
    within(3, async {
        loop {
            let ch = conn.create_channel().await.unwrap();
            match ch
                .queue_declare("excl-drop".into(), passive(), FieldTable::default())
                .await
            {
                Err(e) if amqp_error(&e).map(|x| x.0) == Some(404) => break,
                _ => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    })
    .await;
}

#[tokio::test]
async fn auto_delete_queue_deleted_after_last_consumer_cancels() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ad-q".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    // Never consumed: stays.
    settle().await;
    ch.queue_declare("ad-q".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    let _c1 = ch
        .basic_consume(
            "ad-q".into(),
            "c1".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let _c2 = ch
        .basic_consume(
            "ad-q".into(),
            "c2".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_cancel("c1".into(), Default::default())
        .await
        .unwrap();
    settle().await;
    let q = ch
        .queue_declare("ad-q".into(), passive(), FieldTable::default())
        .await
        .unwrap();
    assert_eq!(q.consumer_count(), 1);
    ch.basic_cancel("c2".into(), Default::default())
        .await
        .unwrap();
    settle().await;
    let (code, text) = expect_amqp_error(
        ch.queue_declare("ad-q".into(), passive(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'ad-q' in vhost '/'");
}

#[tokio::test]
async fn auto_delete_queue_deleted_when_consumer_channel_closes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ad-q2".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let cch = conn.create_channel().await.unwrap();
    let _c = cch
        .basic_consume(
            "ad-q2".into(),
            "c".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    settle().await;
    let (code, _) = expect_amqp_error(
        ch.queue_declare("ad-q2".into(), passive(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn empty_queue_name_refers_to_last_declared_queue() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.queue_bind(
        "".into(),
        "amq.fanout".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "amq.fanout", "", b"via-last").await;
    assert_eq!(drain(&ch, q.name().as_str()).await, vec!["via-last"]);
}

#[tokio::test]
async fn empty_queue_name_without_previous_declare_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_bind(
            "".into(),
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no previously declared queue");
}
