//! Per-vhost permissions enforced on every AMQP operation, with RabbitMQ's
//! reply texts.

use crate::common::*;
use crate::http::call;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

fn refused(perm: &str, kind: &str, name: &str) -> String {
    format!("ACCESS_REFUSED - {perm} access to {kind} '{name}' in vhost '/' refused for user 'bob'")
}

#[tokio::test]
async fn permission_matrix() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/users/bob",
        Some(json!({"password": "bob", "tags": ""})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/permissions/%2F/bob",
        Some(json!({"configure": "^bob-", "write": "^bob-", "read": "^bob-"})),
    )
    .await;
    assert_eq!(s, 201);
    // guest owns a queue bob may not touch.
    let admin = b.connect().await;
    let ach = admin.create_channel().await.unwrap();
    declare_queue(&ach, "guest-q").await;

    let url = format!("amqp://bob:bob@{}/%2f", b.addr);
    let bob = Connection::connect(&url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = bob.create_channel().await.unwrap();
    // configure
    declare_queue(&ch, "bob-q").await;
    ch.exchange_declare(
        "bob-x".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = expect_amqp_error(
        ch.queue_declare(
            "other".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(e, (403, refused("configure", "queue", "other")));
    let ch = bob.create_channel().await.unwrap();
    let e = expect_amqp_error(
        ch.exchange_declare(
            "x".into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(e, (403, refused("configure", "exchange", "x")));
    // bind: write on queue, read on exchange
    let ch = bob.create_channel().await.unwrap();
    ch.queue_bind(
        "bob-q".into(),
        "bob-x".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = expect_amqp_error(
        ch.queue_bind(
            "bob-q".into(),
            "amq.direct".into(),
            "k".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(e, (403, refused("read", "exchange", "amq.direct")));
    // publish: write on exchange
    let ch = bob.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "bob-x".into(),
        "".into(),
        BasicPublishOptions::default(),
        b"hi",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let confirm = ch
        .basic_publish(
            "".into(),
            "bob-q".into(),
            BasicPublishOptions::default(),
            b"no",
            BasicProperties::default(),
        )
        .await;
    let e = expect_amqp_error(match confirm {
        Ok(c) => c.await,
        Err(e) => Err(e),
    });
    assert_eq!(e, (403, refused("write", "exchange", "amq.default")));
    // read: get and consume and purge on own queue work
    let ch = bob.create_channel().await.unwrap();
    settle().await;
    let got = ch
        .basic_get("bob-q".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert_eq!(got.unwrap().delivery.data, b"hi");
    ch.basic_consume(
        "bob-q".into(),
        "c1".into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_purge("bob-q".into(), QueuePurgeOptions::default())
        .await
        .unwrap();
    // ...and are refused on guest's
    let e = expect_amqp_error(
        ch.basic_get("guest-q".into(), BasicGetOptions { no_ack: true })
            .await,
    );
    assert_eq!(e, (403, refused("read", "queue", "guest-q")));
    let ch = bob.create_channel().await.unwrap();
    let e = expect_amqp_error(
        ch.basic_consume(
            "guest-q".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(e, (403, refused("read", "queue", "guest-q")));
    let ch = bob.create_channel().await.unwrap();
    let e = expect_amqp_error(
        ch.queue_purge("guest-q".into(), QueuePurgeOptions::default())
            .await,
    );
    assert_eq!(e, (403, refused("read", "queue", "guest-q")));
    // delete: configure
    let ch = bob.create_channel().await.unwrap();
    let e = expect_amqp_error(
        ch.queue_delete("guest-q".into(), QueueDeleteOptions::default())
            .await,
    );
    assert_eq!(e, (403, refused("configure", "queue", "guest-q")));
    let ch = bob.create_channel().await.unwrap();
    let e = expect_amqp_error(
        ch.exchange_delete("amq.fanout".into(), ExchangeDeleteOptions::default())
            .await,
    );
    assert_eq!(e.0, 403);
    let ch = bob.create_channel().await.unwrap();
    ch.queue_delete("bob-q".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    ch.exchange_delete("bob-x".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
}

#[tokio::test]
async fn vhost_access_refused_at_open() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    call(
        &broker,
        "PUT",
        "/api/users/bob",
        Some(json!({"password": "bob", "tags": []})),
    )
    .await;
    let (s, _) = call(&broker, "PUT", "/api/vhosts/v2", None).await;
    assert_eq!(s, 201);
    let e = Connection::connect(
        &format!("amqp://bob:bob@{}/v2", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        amqp_error(&e),
        Some((
            530,
            "NOT_ALLOWED - access to vhost 'v2' refused for user 'bob'".into()
        ))
    );
    let e = Connection::connect(
        &format!("amqp://guest:guest@{}/nope", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(
        amqp_error(&e),
        Some((530, "NOT_ALLOWED - vhost nope not found".into()))
    );
    // Granting opens it.
    call(
        &broker,
        "PUT",
        "/api/permissions/v2/bob",
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    Connection::connect(
        &format!("amqp://bob:bob@{}/v2", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    // A wrong password is refused.
    let e = Connection::connect(
        &format!("amqp://bob:nope@{}/v2", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap_err();
    assert_eq!(amqp_error(&e).map(|x| x.0), Some(403));
}
