//! Consumers: dispatch, prefetch, acknowledgements, redelivery, recover,
//! consumer tags, exclusive consumers, cancellation.
use crate::common::*;
use futures_lite::StreamExt;
use lapin::Consumer;
use lapin::message::Delivery;
use lapin::options::*;
use lapin::types::FieldTable;
use std::time::Duration;

async fn next(c: &mut Consumer) -> Delivery {
    within(3, c.next())
        .await
        .expect("consumer ended")
        .expect("delivery error")
}

fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

/// Asserts nothing arrives on `c` for `ms` milliseconds.
async fn nothing_for(c: &mut Consumer, ms: u64) {
    if let Ok(x) = tokio::time::timeout(Duration::from_millis(ms), c.next()).await {
        panic!("unexpected delivery: {:?}", x.map(|r| r.map(|d| body(&d))));
    }
}

async fn consume(ch: &lapin::Channel, q: &str, tag: &str) -> Consumer {
    ch.basic_consume(
        q.into(),
        tag.into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn round_robin_between_two_consumers() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "rr").await;
    let ch1 = conn.create_channel().await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let mut c1 = consume(&ch1, "rr", "c1").await;
    let mut c2 = consume(&ch2, "rr", "c2").await;
    for i in 0..10 {
        publish(&ch, "", "rr", format!("{i}").as_bytes()).await;
    }
    let mut got1 = Vec::new();
    let mut got2 = Vec::new();
    for _ in 0..5 {
        let d = next(&mut c1).await;
        got1.push(body(&d));
        d.ack(Default::default()).await.unwrap();
        let d = next(&mut c2).await;
        got2.push(body(&d));
        d.ack(Default::default()).await.unwrap();
    }
    assert_eq!(got1, vec!["0", "2", "4", "6", "8"]);
    assert_eq!(got2, vec!["1", "3", "5", "7", "9"]);
}

#[tokio::test]
async fn fair_dispatch_with_prefetch_one_favours_fast_consumer() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "work").await;
    let slow_ch = conn.create_channel().await.unwrap();
    let fast_ch = conn.create_channel().await.unwrap();
    slow_ch.basic_qos(1, Default::default()).await.unwrap();
    fast_ch.basic_qos(1, Default::default()).await.unwrap();
    let mut slow = consume(&slow_ch, "work", "slow").await;
    let mut fast = consume(&fast_ch, "work", "fast").await;
    for i in 0..20 {
        publish(&ch, "", "work", format!("{i}").as_bytes()).await;
    }
    let slow_task = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(600), slow.next()).await
        {
            tokio::time::sleep(Duration::from_millis(300)).await;
            d.ack(Default::default()).await.unwrap();
            n += 1;
        }
        n
    });
    let fast_task = tokio::spawn(async move {
        let mut n = 0;
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(600), fast.next()).await
        {
            d.ack(Default::default()).await.unwrap();
            n += 1;
        }
        n
    });
    let (s, f) = (slow_task.await.unwrap(), fast_task.await.unwrap());
    assert_eq!(s + f, 20);
    assert!(s <= 3, "slow consumer got {s}, fast {f}");
}

#[tokio::test]
async fn prefetch_limits_outstanding_deliveries_per_consumer() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "pf").await;
    for i in 0..10 {
        publish(&ch, "", "pf", format!("{i}").as_bytes()).await;
    }
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(3, Default::default()).await.unwrap();
    let mut c = consume(&cch, "pf", "pf").await;
    let mut held = Vec::new();
    for i in 0..3 {
        let d = next(&mut c).await;
        assert_eq!(body(&d), format!("{i}"));
        held.push(d);
    }
    nothing_for(&mut c, 300).await;
    held.remove(0).ack(Default::default()).await.unwrap();
    let d = next(&mut c).await;
    assert_eq!(body(&d), "3");
    nothing_for(&mut c, 200).await;
    // Multiple ack of everything frees three more slots.
    d.ack(BasicAckOptions { multiple: true }).await.unwrap();
    let got: Vec<String> = {
        let mut v = Vec::new();
        for _ in 0..3 {
            v.push(body(&next(&mut c).await));
        }
        v
    };
    assert_eq!(got, vec!["4", "5", "6"]);
    assert_eq!(message_count(&conn, "pf").await, 3);
}

#[tokio::test]
async fn basic_get_and_get_empty() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "getq").await;
    assert!(
        ch.basic_get("getq".into(), Default::default())
            .await
            .unwrap()
            .is_none()
    );
    for i in 0..3 {
        publish(&ch, "", "getq", format!("{i}").as_bytes()).await;
    }
    settle().await;
    let m = ch
        .basic_get("getq".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"0");
    assert_eq!(m.message_count, 2);
    assert!(!m.delivery.redelivered);
    m.delivery.ack(Default::default()).await.unwrap();
    let m = ch
        .basic_get("getq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.delivery.data.as_slice(), m.message_count),
        (&b"1"[..], 1)
    );
    let m = ch
        .basic_get("getq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (m.delivery.data.as_slice(), m.message_count),
        (&b"2"[..], 0)
    );
    assert!(
        ch.basic_get("getq".into(), Default::default())
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn basic_get_on_missing_queue_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(ch.basic_get("ghost".into(), Default::default()).await);
    assert_eq!(
        (code, text.as_str()),
        (404, "NOT_FOUND - no queue 'ghost' in vhost '/'")
    );
}

#[tokio::test]
async fn requeued_messages_return_in_original_position_marked_redelivered() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "order").await;
    for m in ["a", "b", "c"] {
        publish(&ch, "", "order", m.as_bytes()).await;
    }
    settle().await;
    let a = ch
        .basic_get("order".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    let bm = ch
        .basic_get("order".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    bm.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    a.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    settle().await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("order".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        got,
        vec![("a".into(), true), ("b".into(), true), ("c".into(), false)]
    );
}

#[tokio::test]
async fn nack_multiple_requeue_and_reject_discard() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "nackq").await;
    for i in 1..=5 {
        publish(&ch, "", "nackq", format!("m{i}").as_bytes()).await;
    }
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, "nackq", "n").await;
    let mut ds = Vec::new();
    for _ in 0..5 {
        ds.push(next(&mut c).await);
    }
    assert_eq!(
        ds.iter().map(|d| d.delivery_tag).collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5]
    );
    // ack 5, discard 4, requeue 1..=3 in one multiple nack.
    cch.basic_ack(5, Default::default()).await.unwrap();
    cch.basic_reject(4, BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    cch.basic_cancel("n".into(), Default::default())
        .await
        .unwrap();
    cch.basic_nack(
        3,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    )
    .await
    .unwrap();
    settle().await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("nackq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        got,
        vec![
            ("m1".into(), true),
            ("m2".into(), true),
            ("m3".into(), true)
        ]
    );
}

#[tokio::test]
async fn nack_without_requeue_drops_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "drop").await;
    for i in 0..3 {
        publish(&ch, "", "drop", format!("{i}").as_bytes()).await;
    }
    settle().await;
    for _ in 0..3 {
        ch.basic_get("drop".into(), Default::default())
            .await
            .unwrap()
            .unwrap();
    }
    ch.basic_nack(
        0,
        BasicNackOptions {
            multiple: true,
            requeue: false,
        },
    )
    .await
    .unwrap();
    assert!(drain(&ch, "drop").await.is_empty());
    assert_eq!(message_count(&conn, "drop").await, 0);
}

#[tokio::test]
async fn unknown_delivery_tag_is_406() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let w = watch_channel(&ch).await;
    ch.basic_ack(99, Default::default()).await.unwrap();
    let (code, text) = w.error().await;
    assert_eq!(code, 406);
    assert_eq!(text, "PRECONDITION_FAILED - unknown delivery tag 99");
    // The connection is fine.
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "after-tag").await;
}

#[tokio::test]
async fn double_ack_is_unknown_delivery_tag() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "twice-ack").await;
    publish(&ch, "", "twice-ack", b"x").await;
    settle().await;
    let m = ch
        .basic_get("twice-ack".into(), Default::default())
        .await
        .unwrap()
        .unwrap();
    let tag = m.delivery.delivery_tag;
    let w = watch_channel(&ch).await;
    ch.basic_ack(tag, Default::default()).await.unwrap();
    ch.basic_ack(tag, Default::default()).await.unwrap();
    let (code, text) = w.error().await;
    assert_eq!(code, 406);
    assert_eq!(
        text,
        format!("PRECONDITION_FAILED - unknown delivery tag {tag}")
    );
}

#[tokio::test]
async fn unacked_messages_requeued_when_channel_closes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "chclose").await;
    for i in 0..4 {
        publish(&ch, "", "chclose", format!("{i}").as_bytes()).await;
    }
    let cch = conn.create_channel().await.unwrap();
    let mut c = consume(&cch, "chclose", "x").await;
    let d0 = next(&mut c).await;
    for _ in 1..4 {
        next(&mut c).await;
    }
    d0.ack(Default::default()).await.unwrap();
    cch.close(200, "bye".into()).await.unwrap();
    settle().await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("chclose".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        got,
        vec![("1".into(), true), ("2".into(), true), ("3".into(), true)]
    );
}

#[tokio::test]
async fn unacked_messages_requeued_when_connection_closes() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "connclose").await;
    for i in 0..3 {
        publish(&ch, "", "connclose", format!("{i}").as_bytes()).await;
    }
    let other = b.connect().await;
    let och = other.create_channel().await.unwrap();
    let mut c = consume(&och, "connclose", "x").await;
    for _ in 0..3 {
        next(&mut c).await;
    }
    within(3, other.close(200, "bye".into())).await.unwrap();
    settle().await;
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get("connclose".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push((
            String::from_utf8_lossy(&m.delivery.data).into_owned(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        got,
        vec![("0".into(), true), ("1".into(), true), ("2".into(), true)]
    );
}

#[tokio::test]
async fn basic_recover_redelivers_unacked_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "recover").await;
    for i in 0..2 {
        publish(&ch, "", "recover", format!("{i}").as_bytes()).await;
    }
    let mut c = consume(&ch, "recover", "r").await;
    let d0 = next(&mut c).await;
    let d1 = next(&mut c).await;
    assert!(!d0.redelivered && !d1.redelivered);
    ch.basic_recover(BasicRecoverOptions { requeue: true })
        .await
        .unwrap();
    let r0 = next(&mut c).await;
    let r1 = next(&mut c).await;
    assert_eq!((body(&r0), r0.redelivered), ("0".into(), true));
    assert_eq!((body(&r1), r1.redelivered), ("1".into(), true));
    assert!(r0.delivery_tag > d1.delivery_tag);
    r1.ack(BasicAckOptions { multiple: true }).await.unwrap();
    settle().await;
    assert_eq!(message_count(&conn, "recover").await, 0);
}

#[tokio::test]
async fn no_ack_consumer_gets_everything_in_order() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "noack").await;
    let mut c = ch
        .basic_consume(
            "noack".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert!(c.tag().as_str().starts_with("amq.ctag-"), "{}", c.tag());
    for i in 0..200 {
        publish(&ch, "", "noack", format!("{i}").as_bytes()).await;
    }
    for i in 0..200 {
        assert_eq!(body(&next(&mut c).await), format!("{i}"));
    }
    assert_eq!(message_count(&conn, "noack").await, 0);
}

#[tokio::test]
async fn cancel_stops_deliveries_and_leaves_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "cancelq").await;
    let mut c = consume(&ch, "cancelq", "ct").await;
    publish(&ch, "", "cancelq", b"1").await;
    next(&mut c).await.ack(Default::default()).await.unwrap();
    ch.basic_cancel("ct".into(), Default::default())
        .await
        .unwrap();
    assert!(
        within(2, c.next()).await.is_none(),
        "consumer stream should end after cancel"
    );
    publish(&ch, "", "cancelq", b"2").await;
    assert_eq!(drain(&ch, "cancelq").await, vec!["2"]);
}

#[tokio::test]
async fn consumer_tag_reuse_on_channel_is_530() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "tagq").await;
    let _c = consume(&ch, "tagq", "dup").await;
    let (code, text) = expect_amqp_error(
        ch.basic_consume(
            "tagq".into(),
            "dup".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 530);
    assert_eq!(text, "NOT_ALLOWED - attempt to reuse consumer tag 'dup'");
    // 530 is a connection error.
    within(3, async {
        while conn.status().connected() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

#[tokio::test]
async fn same_consumer_tag_on_different_channels_is_fine() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch1 = conn.create_channel().await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    declare_queue(&ch1, "tag2").await;
    let _a = consume(&ch1, "tag2", "same").await;
    let _b = consume(&ch2, "tag2", "same").await;
}

#[tokio::test]
async fn exclusive_consumer_blocks_others_with_403() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "exq").await;
    let _c = ch
        .basic_consume(
            "exq".into(),
            "owner".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch2.basic_consume(
            "exq".into(),
            "second".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue 'exq' in vhost '/' in exclusive use"
    );
}

#[tokio::test]
async fn exclusive_consume_on_queue_with_consumers_is_403() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "exq2").await;
    let _c = consume(&ch, "exq2", "plain").await;
    let ch2 = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch2.basic_consume(
            "exq2".into(),
            "excl".into(),
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - queue 'exq2' in vhost '/' in exclusive use"
    );
}

#[tokio::test]
async fn consume_from_missing_queue_is_404() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.basic_consume(
            "nowhere".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(
        (code, text.as_str()),
        (404, "NOT_FOUND - no queue 'nowhere' in vhost '/'")
    );
}

#[tokio::test]
async fn deleting_queue_cancels_its_consumers_without_stalling_others() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "doomed").await;
    let cch = conn.create_channel().await.unwrap();
    let mut c1 = consume(&cch, "doomed", "d1").await;
    let mut c2 = consume(&cch, "doomed", "d2").await;
    publish(&ch, "", "doomed", b"held").await;
    let _held = within(3, async {
        tokio::select! {
            d = c1.next() => d,
            d = c2.next() => d,
        }
    })
    .await;
    let other = b.connect().await;
    let och = other.create_channel().await.unwrap();
    assert_eq!(
        within(3, och.queue_delete("doomed".into(), Default::default()))
            .await
            .unwrap(),
        0
    );
    // Both consumers are cancelled by the server: their streams end.
    assert!(
        within(3, async {
            loop {
                match c1.next().await {
                    None => break true,
                    Some(_) => continue,
                }
            }
        })
        .await
    );
    assert!(
        within(3, async {
            loop {
                match c2.next().await {
                    None => break true,
                    Some(_) => continue,
                }
            }
        })
        .await
    );
    // The consuming channel is still open and usable.
    within(3, declare_queue(&cch, "life-goes-on")).await;
    publish(&cch, "", "life-goes-on", b"ok").await;
    assert_eq!(drain(&cch, "life-goes-on").await, vec!["ok"]);
    // And a fresh connection works at once.
    within(3, async {
        let c = b.connect().await;
        let ch = c.create_channel().await.unwrap();
        declare_queue(&ch, "fresh").await;
    })
    .await;
}

#[tokio::test]
async fn consumer_count_reflects_consumers_across_connections() {
    let b = TestBroker::start().await;
    let c1 = b.connect().await;
    let c2 = b.connect().await;
    let ch1 = c1.create_channel().await.unwrap();
    let ch2 = c2.create_channel().await.unwrap();
    declare_queue(&ch1, "cc").await;
    let _a = consume(&ch1, "cc", "a").await;
    let _b = consume(&ch2, "cc", "b").await;
    let q = ch1
        .queue_declare(
            "cc".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.consumer_count(), 2);
    c2.close(200, "bye".into()).await.unwrap();
    settle().await;
    let q = ch1
        .queue_declare(
            "cc".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.consumer_count(), 1);
}
