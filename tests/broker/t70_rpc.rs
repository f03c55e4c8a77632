//! Request/reply: classic RPC with a server-named reply queue, and direct
//! reply-to (amq.rabbitmq.reply-to).
use crate::common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};

/// A responder on its own connection: replies "reply:<body>" to `reply_to`
/// with the request's correlation id. Returns the reply_to values seen.
fn spawn_responder(conn: Connection, queue: &'static str) -> tokio::task::JoinHandle<Vec<String>> {
    tokio::spawn(async move {
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(1, Default::default()).await.unwrap();
        let mut c = ch
            .basic_consume(
                queue.into(),
                "responder".into(),
                Default::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut seen = Vec::new();
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(std::time::Duration::from_millis(800), c.next()).await
        {
            let reply_to = d
                .properties
                .reply_to()
                .clone()
                .expect("reply_to")
                .to_string();
            let corr = d
                .properties
                .correlation_id()
                .clone()
                .expect("correlation_id");
            let body = format!("reply:{}", String::from_utf8_lossy(&d.data));
            ch.basic_publish(
                "".into(),
                reply_to.as_str().into(),
                Default::default(),
                body.as_bytes(),
                BasicProperties::default().with_correlation_id(corr),
            )
            .await
            .unwrap();
            d.ack(Default::default()).await.unwrap();
            seen.push(reply_to);
        }
        seen
    })
}

#[tokio::test]
async fn rpc_with_server_named_reply_queue_and_correlation_ids() {
    let b = TestBroker::start().await;
    let server = b.connect().await;
    let sch = server.create_channel().await.unwrap();
    declare_queue(&sch, "rpc_queue").await;
    let responder = spawn_responder(server, "rpc_queue");

    let client = b.connect().await;
    let ch = client.create_channel().await.unwrap();
    let reply_q = ch
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
    let mut replies = ch
        .basic_consume(
            reply_q.name().as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        ch.basic_publish(
            "".into(),
            "rpc_queue".into(),
            Default::default(),
            format!("req{i}").as_bytes(),
            BasicProperties::default()
                .with_reply_to(reply_q.name().clone())
                .with_correlation_id(format!("corr-{i}").into()),
        )
        .await
        .unwrap();
    }
    for i in 0..5 {
        let d = within(3, replies.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("reply:req{i}").as_bytes());
        assert_eq!(
            d.properties.correlation_id().as_ref().unwrap().as_str(),
            format!("corr-{i}")
        );
    }
    let seen = responder.await.unwrap();
    assert_eq!(seen, vec![reply_q.name().to_string(); 5]);
}

#[tokio::test]
async fn direct_reply_to_end_to_end() {
    let b = TestBroker::start().await;
    let server = b.connect().await;
    let sch = server.create_channel().await.unwrap();
    declare_queue(&sch, "drt_requests").await;
    let responder = spawn_responder(server, "drt_requests");

    let client = b.connect().await;
    let ch = client.create_channel().await.unwrap();
    let mut replies = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "drt".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..3 {
        ch.basic_publish(
            "".into(),
            "drt_requests".into(),
            Default::default(),
            format!("q{i}").as_bytes(),
            BasicProperties::default()
                .with_reply_to("amq.rabbitmq.reply-to".into())
                .with_correlation_id(format!("c{i}").into()),
        )
        .await
        .unwrap();
    }
    for i in 0..3 {
        let d = within(3, replies.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("reply:q{i}").as_bytes());
        assert_eq!(
            d.properties.correlation_id().as_ref().unwrap().as_str(),
            format!("c{i}")
        );
        assert_eq!(d.exchange.as_str(), "");
        assert!(
            d.routing_key.as_str().starts_with("amq.rabbitmq.reply-to."),
            "{}",
            d.routing_key
        );
    }
    let seen = responder.await.unwrap();
    assert_eq!(seen.len(), 3);
    for r in &seen {
        assert!(
            r.starts_with("amq.rabbitmq.reply-to."),
            "rewritten reply_to {r}"
        );
        assert_ne!(r, "amq.rabbitmq.reply-to.");
    }
}

#[tokio::test]
async fn direct_reply_to_passive_declare_succeeds() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "amq.rabbitmq.reply-to".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!((q.message_count(), q.consumer_count()), (0, 0));
}

#[tokio::test]
async fn direct_reply_to_without_consumer_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "drt-none").await;
    let w = watch_channel(&ch).await;
    ch.basic_publish(
        "".into(),
        "drt-none".into(),
        Default::default(),
        b"x",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    let (code, text) = w.error().await;
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - fast reply consumer does not exist"
        )
    );
}

#[tokio::test]
async fn direct_reply_to_consumer_must_be_no_ack() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "x".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - reply consumer cannot acknowledge"
        )
    );
}

#[tokio::test]
async fn reply_to_a_vanished_direct_reply_consumer_is_dropped_silently() {
    let b = TestBroker::start().await;
    let client = b.connect().await;
    let ch = client.create_channel().await.unwrap();
    declare_queue(&ch, "drt-gone").await;
    let _r = ch
        .basic_consume(
            "amq.rabbitmq.reply-to".into(),
            "r".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "drt-gone".into(),
        Default::default(),
        b"req",
        BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
    )
    .await
    .unwrap();
    settle().await;
    let other = b.connect().await;
    let och = other.create_channel().await.unwrap();
    let req = och
        .basic_get("drt-gone".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    let reply_to = req.delivery.properties.reply_to().clone().unwrap();
    client.close(200, "bye".into()).await.unwrap();
    settle().await;
    // Publishing to the stale reply address does not break the responder.
    och.basic_publish(
        "".into(),
        reply_to,
        Default::default(),
        b"late",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    declare_queue(&och, "responder-ok").await;
}
