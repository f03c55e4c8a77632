//! Publisher confirms and transactions.
use crate::common::*;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Confirmation};

#[tokio::test]
async fn confirm_select_then_every_publish_is_acked() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_queue(&ch, "confirmed").await;
    let mut confirms = Vec::new();
    for i in 0..100 {
        confirms.push(
            ch.basic_publish(
                "".into(),
                "confirmed".into(),
                Default::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    let returned = within(5, ch.wait_for_confirms()).await.unwrap();
    assert!(returned.is_empty());
    for c in confirms {
        assert_eq!(within(2, c).await.unwrap(), Confirmation::Ack(None));
    }
    assert_eq!(message_count(&conn, "confirmed").await, 100);
}

#[tokio::test]
async fn confirms_for_unroutable_and_fanout_publishes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for q in ["f1", "f2", "f3"] {
        declare_queue(&ch, q).await;
        ch.queue_bind(
            q.into(),
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let to_many = ch
        .basic_publish(
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    let to_none = ch
        .basic_publish(
            "amq.direct".into(),
            "void".into(),
            Default::default(),
            b"y",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert_eq!(within(3, to_many).await.unwrap(), Confirmation::Ack(None));
    assert_eq!(within(3, to_none).await.unwrap(), Confirmation::Ack(None));
}

#[tokio::test]
async fn mandatory_unroutable_with_confirms_is_returned_then_acked() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_queue(&ch, "routable").await;
    let mut confs = Vec::new();
    for (rk, body) in [
        ("routable", "1"),
        ("nowhere", "2"),
        ("routable", "3"),
        ("nowhere", "4"),
    ] {
        confs.push(
            ch.basic_publish(
                "".into(),
                rk.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body.as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap(),
        );
    }
    let mut results = Vec::new();
    for c in confs {
        results.push(within(3, c).await.unwrap());
    }
    assert_eq!(results[0], Confirmation::Ack(None));
    assert_eq!(results[2], Confirmation::Ack(None));
    for (i, body) in [(1usize, "2"), (3, "4")] {
        match &results[i] {
            Confirmation::Ack(Some(r)) => {
                assert_eq!(r.reply_code, 312);
                assert_eq!(r.reply_text.as_str(), "NO_ROUTE");
                assert_eq!(r.delivery.data, body.as_bytes());
            }
            other => panic!("publish {i}: expected Ack(Some(return)), got {other:?}"),
        }
    }
    assert_eq!(drain(&ch, "routable").await, vec!["1", "3"]);
}

#[tokio::test]
async fn confirm_mode_cannot_switch_to_tx() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let (code, text) = expect_amqp_error(ch.tx_select().await);
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - cannot switch from confirm to tx mode"
        )
    );
    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    let (code, text) = expect_amqp_error(ch.confirm_select(Default::default()).await);
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - cannot switch from tx to confirm mode"
        )
    );
}

#[tokio::test]
async fn commit_without_select_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(ch.tx_commit().await);
    assert_eq!(
        (code, text.as_str()),
        (406, "PRECONDITION_FAILED - channel is not transactional")
    );
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(ch.tx_rollback().await);
    assert_eq!(
        (code, text.as_str()),
        (406, "PRECONDITION_FAILED - channel is not transactional")
    );
}

#[tokio::test]
async fn tx_publish_then_rollback_delivers_nothing() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txq").await;
    ch.tx_select().await.unwrap();
    for i in 0..3 {
        publish(&ch, "", "txq", format!("{i}").as_bytes()).await;
    }
    settle().await;
    assert_eq!(message_count(&conn, "txq").await, 0);
    ch.tx_rollback().await.unwrap();
    settle().await;
    assert_eq!(message_count(&conn, "txq").await, 0);
    // The channel stays transactional: commit now publishes nothing.
    ch.tx_commit().await.unwrap();
    assert_eq!(message_count(&conn, "txq").await, 0);
}

#[tokio::test]
async fn tx_publish_then_commit_delivers_in_order() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txc").await;
    let cch = conn.create_channel().await.unwrap();
    let mut c = cch
        .basic_consume(
            "txc".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    ch.tx_select().await.unwrap();
    for i in 0..3 {
        publish(&ch, "", "txc", format!("{i}").as_bytes()).await;
    }
    assert!(
        tokio::time::timeout(std::time::Duration::from_millis(200), c.next())
            .await
            .is_err(),
        "delivered before commit"
    );
    ch.tx_commit().await.unwrap();
    for i in 0..3 {
        let d = within(3, c.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("{i}").as_bytes());
    }
}

#[tokio::test]
async fn tx_ack_then_rollback_leaves_message_unacked() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txa").await;
    publish(&ch, "", "txa", b"keep").await;
    settle().await;
    let cch = conn.create_channel().await.unwrap();
    cch.tx_select().await.unwrap();
    let m = cch
        .basic_get("txa".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery.ack(Default::default()).await.unwrap();
    cch.tx_rollback().await.unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    settle().await;
    let got = ch
        .basic_get("txa".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("message must be back");
    assert_eq!(got.delivery.data, b"keep");
    assert!(got.delivery.redelivered);
}

#[tokio::test]
async fn tx_ack_then_commit_removes_message() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "txac").await;
    publish(&ch, "", "txac", b"gone").await;
    settle().await;
    let cch = conn.create_channel().await.unwrap();
    cch.tx_select().await.unwrap();
    let m = cch
        .basic_get("txac".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    m.delivery.ack(Default::default()).await.unwrap();
    cch.tx_commit().await.unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    settle().await;
    assert!(
        ch.basic_get("txac".into(), Default::default())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn tx_publish_to_missing_exchange_fails_the_channel() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.tx_select().await.unwrap();
    let w = watch_channel(&ch).await;
    publish(&ch, "no-such-x", "k", b"m").await;
    // Whether tx.commit is sent before or after the close arrives, it fails.
    assert!(within(3, ch.tx_commit()).await.is_err());
    let (code, text) = w.error().await;
    assert_eq!(
        (code, text.as_str()),
        (404, "NOT_FOUND - no exchange 'no-such-x' in vhost '/'")
    );
}
