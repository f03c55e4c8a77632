//! Exchange declaration, deletion, equivalence, reserved names, e2e bindings,
//! alternate exchanges, auto-delete and internal exchanges.
use crate::common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, ExchangeKind};

fn passive() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn declare_each_exchange_type_and_redeclare_idempotently() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let kinds = [
        ("x-direct", ExchangeKind::Direct),
        ("x-fanout", ExchangeKind::Fanout),
        ("x-topic", ExchangeKind::Topic),
        ("x-headers", ExchangeKind::Headers),
    ];
    for (name, kind) in kinds.iter() {
        for durable in [false, true] {
            let n = format!("{name}-{durable}");
            let o = ExchangeDeclareOptions {
                durable,
                ..Default::default()
            };
            ch.exchange_declare(n.as_str().into(), kind.clone(), o, FieldTable::default())
                .await
                .unwrap();
            ch.exchange_declare(n.as_str().into(), kind.clone(), o, FieldTable::default())
                .await
                .unwrap();
            ch.exchange_declare(
                n.as_str().into(),
                kind.clone(),
                passive(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        }
    }
}

#[tokio::test]
async fn predeclared_exchanges_exist() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for (name, kind) in [
        ("amq.direct", ExchangeKind::Direct),
        ("amq.fanout", ExchangeKind::Fanout),
        ("amq.topic", ExchangeKind::Topic),
        ("amq.headers", ExchangeKind::Headers),
        ("amq.match", ExchangeKind::Headers),
    ] {
        ch.exchange_declare(name.into(), kind, passive(), FieldTable::default())
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[tokio::test]
async fn redeclaring_existing_amq_exchange_is_allowed() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    // Redeclaring an existing amq.* exchange with equivalent properties is allowed.
    ch.exchange_declare(
        "amq.direct".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn passive_declare_of_missing_exchange_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "nope".into(),
            ExchangeKind::Direct,
            passive(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no exchange 'nope' in vhost '/'");
    // Only the channel closed: the connection still works.
    let ch2 = conn.create_channel().await.unwrap();
    declare_queue(&ch2, "after-404").await;
}

#[tokio::test]
async fn redeclare_with_different_type_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "x".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "x".into(),
            ExchangeKind::Fanout,
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - inequivalent arg 'type' for exchange 'x' in vhost '/': received 'fanout' but current is 'direct'"
    );
}

#[tokio::test]
async fn redeclare_with_different_durability_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "xd".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "xd".into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
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
        "PRECONDITION_FAILED - inequivalent arg 'durable' for exchange 'xd' in vhost '/': received 'true' but current is 'false'"
    );
}

#[tokio::test]
async fn passive_declare_ignores_type_mismatch() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "xp".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "xp".into(),
        ExchangeKind::Fanout,
        passive(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn declaring_amq_prefixed_exchange_is_403() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "amq.custom".into(),
            ExchangeKind::Direct,
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - exchange name 'amq.custom' contains reserved prefix 'amq.*'"
    );
}

#[tokio::test]
async fn deleting_amq_exchange_is_403() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_delete("amq.direct".into(), Default::default())
            .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed"
    );
}

#[tokio::test]
async fn default_exchange_cannot_be_deleted_or_bound() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(ch.exchange_delete("".into(), Default::default()).await);
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "dq").await;
    let (code, text) = expect_amqp_error(
        ch.queue_bind(
            "dq".into(),
            "".into(),
            "dq".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - operation not permitted on the default exchange"
    );
}

#[tokio::test]
async fn unknown_exchange_type_closes_connection_with_503() {
    // RabbitMQ 3.x: connection.close 503 COMMAND_INVALID. (RabbitMQ >= 4.0
    // made it a channel-level 406 "unknown exchange type 'x'".)
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "weird".into(),
            ExchangeKind::Custom("x-no-such-type".into()),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 503);
    assert!(text.starts_with("COMMAND_INVALID - "), "{text}");
    assert!(text.contains("x-no-such-type"), "{text}");
    within(3, async {
        while conn.status().connected() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn delete_if_unused_with_bindings_is_406_and_without_succeeds() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "used".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "uq").await;
    ch.queue_bind(
        "uq".into(),
        "used".into(),
        "k".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_delete(
            "used".into(),
            ExchangeDeleteOptions {
                if_unused: true,
                ..Default::default()
            },
        )
        .await,
    );
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - exchange 'used' in vhost '/' in use"
    );
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "used".into(),
        ExchangeKind::Direct,
        passive(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_unbind(
        "uq".into(),
        "used".into(),
        "k".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_delete(
        "used".into(),
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let (code, _) = expect_amqp_error(
        ch.exchange_declare(
            "used".into(),
            ExchangeKind::Direct,
            passive(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn deleting_missing_exchange_is_ok() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_delete("never-existed".into(), Default::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn deleting_exchange_removes_its_bindings() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "gone".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "gq").await;
    ch.queue_bind(
        "gq".into(),
        "gone".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_delete("gone".into(), Default::default())
        .await
        .unwrap();
    ch.exchange_declare(
        "gone".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "gone", "", b"m").await;
    assert!(drain(&ch, "gq").await.is_empty());
}

#[tokio::test]
async fn binding_to_missing_exchange_or_queue_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "bq").await;
    let (code, text) = expect_amqp_error(
        ch.queue_bind(
            "bq".into(),
            "no-ex".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no exchange 'no-ex' in vhost '/'");
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_bind(
            "no-q".into(),
            "amq.direct".into(),
            "k".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no queue 'no-q' in vhost '/'");
}

#[tokio::test]
async fn exchange_to_exchange_bindings_route() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "src".into(),
        ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "mid".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "leaf".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // src --(a.#)--> mid --> q1 ; src --(*.b)--> leaf --(x.b)--> q2
    ch.exchange_bind(
        "mid".into(),
        "src".into(),
        "a.#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "leaf".into(),
        "src".into(),
        "*.b".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "e2e-q1").await;
    declare_queue(&ch, "e2e-q2").await;
    ch.queue_bind(
        "e2e-q1".into(),
        "mid".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "e2e-q2".into(),
        "leaf".into(),
        "x.b".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for rk in ["a.b", "x.b", "a.c.d", "y.b", "zzz"] {
        publish(&ch, "src", rk, rk.as_bytes()).await;
    }
    assert_eq!(drain(&ch, "e2e-q1").await, vec!["a.b", "a.c.d"]);
    assert_eq!(drain(&ch, "e2e-q2").await, vec!["x.b"]);
    // Unbinding stops the flow.
    ch.exchange_unbind(
        "mid".into(),
        "src".into(),
        "a.#".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "src", "a.b", b"after").await;
    assert!(drain(&ch, "e2e-q1").await.is_empty());
}

#[tokio::test]
async fn message_reaching_a_queue_by_two_paths_is_delivered_once() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "p1".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "p2".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "p2".into(),
        "p1".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "twice").await;
    ch.queue_bind(
        "twice".into(),
        "p1".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "twice".into(),
        "p2".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "p1", "", b"once").await;
    assert_eq!(drain(&ch, "twice").await, vec!["once"]);
}

#[tokio::test]
async fn exchange_binding_cycles_do_not_loop() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "c1".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "c2".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "c2".into(),
        "c1".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "c1".into(),
        "c2".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "cyc").await;
    ch.queue_bind(
        "cyc".into(),
        "c2".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "c1", "", b"m").await;
    assert_eq!(drain(&ch, "cyc").await, vec!["m"]);
}

#[tokio::test]
async fn alternate_exchange_receives_unroutable_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "ae".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString("ae".into()),
    );
    ch.exchange_declare(
        "main".into(),
        ExchangeKind::Direct,
        Default::default(),
        args,
    )
    .await
    .unwrap();
    declare_queue(&ch, "routed").await;
    declare_queue(&ch, "unrouted").await;
    ch.queue_bind(
        "routed".into(),
        "main".into(),
        "good".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "unrouted".into(),
        "ae".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "main", "good", b"1").await;
    publish(&ch, "main", "bad", b"2").await;
    publish(&ch, "main", "other", b"3").await;
    assert_eq!(drain(&ch, "routed").await, vec!["1"]);
    assert_eq!(drain(&ch, "unrouted").await, vec!["2", "3"]);
}

#[tokio::test]
async fn mandatory_message_routed_via_alternate_exchange_is_not_returned() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.exchange_declare(
        "ae2".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString("ae2".into()),
    );
    ch.exchange_declare(
        "main2".into(),
        ExchangeKind::Direct,
        Default::default(),
        args,
    )
    .await
    .unwrap();
    declare_queue(&ch, "ae2q").await;
    ch.queue_bind(
        "ae2q".into(),
        "ae2".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let conf = ch
        .basic_publish(
            "main2".into(),
            "nobody".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(conf, lapin::Confirmation::Ack(None));
    assert_eq!(drain(&ch, "ae2q").await, vec!["x"]);
}

#[tokio::test]
async fn auto_delete_exchange_disappears_after_last_binding_removed() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "adx".into(),
        ExchangeKind::Direct,
        ad,
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "adq").await;
    ch.queue_bind(
        "adq".into(),
        "adx".into(),
        "a".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "adq".into(),
        "adx".into(),
        "b".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_unbind(
        "adq".into(),
        "adx".into(),
        "a".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // One binding left: still there.
    ch.exchange_declare(
        "adx".into(),
        ExchangeKind::Direct,
        passive(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_unbind(
        "adq".into(),
        "adx".into(),
        "b".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (code, text) = expect_amqp_error(
        ch.exchange_declare(
            "adx".into(),
            ExchangeKind::Direct,
            passive(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no exchange 'adx' in vhost '/'");
}

#[tokio::test]
async fn auto_delete_exchange_without_bindings_survives_until_first_unbind() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "ad-fresh".into(),
        ExchangeKind::Fanout,
        ad,
        FieldTable::default(),
    )
    .await
    .unwrap();
    settle().await;
    ch.exchange_declare(
        "ad-fresh".into(),
        ExchangeKind::Fanout,
        passive(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn auto_delete_exchange_goes_when_its_bound_queue_is_deleted() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "adx2".into(),
        ExchangeKind::Fanout,
        ad,
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "adq2").await;
    ch.queue_bind(
        "adq2".into(),
        "adx2".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_delete("adq2".into(), Default::default())
        .await
        .unwrap();
    settle().await;
    let (code, _) = expect_amqp_error(
        ch.exchange_declare(
            "adx2".into(),
            ExchangeKind::Fanout,
            passive(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 404);
}

#[tokio::test]
async fn internal_exchange_cannot_be_published_to_but_routes_via_e2e() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let internal = ExchangeDeclareOptions {
        internal: true,
        ..Default::default()
    };
    ch.exchange_declare(
        "ix".into(),
        ExchangeKind::Fanout,
        internal,
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "front".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_bind(
        "ix".into(),
        "front".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "iq").await;
    ch.queue_bind(
        "iq".into(),
        "ix".into(),
        "".into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "front", "", b"via-front").await;
    assert_eq!(drain(&ch, "iq").await, vec!["via-front"]);
    let w = watch_channel(&ch).await;
    publish(&ch, "ix", "", b"direct").await;
    let (code, text) = w.error().await;
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - cannot publish to internal exchange 'ix' in vhost '/'"
    );
}

#[tokio::test]
async fn publish_to_missing_exchange_closes_channel_with_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let w = watch_channel(&ch).await;
    publish(&ch, "missing-ex", "k", b"x").await;
    let (code, text) = w.error().await;
    assert_eq!(code, 404);
    assert_eq!(text, "NOT_FOUND - no exchange 'missing-ex' in vhost '/'");
    // The connection survives.
    let ch2 = conn.create_channel().await.unwrap();
    declare_queue(&ch2, "still-ok").await;
}
