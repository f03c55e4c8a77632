//! Priority queues (x-max-priority): higher priority first, FIFO within a
//! priority, requeued messages back in their place.
use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};

fn prio_args(max: i32) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-max-priority".into(), AMQPValue::LongInt(max));
    t
}

async fn publish_p(ch: &lapin::Channel, q: &str, body: &str, p: Option<u8>, persistent: bool) {
    let mut props = BasicProperties::default();
    if let Some(p) = p {
        props = props.with_priority(p);
    }
    if persistent {
        props = props.with_delivery_mode(2);
    }
    ch.basic_publish(
        "".into(),
        q.into(),
        BasicPublishOptions::default(),
        body.as_bytes(),
        props,
    )
    .await
    .unwrap()
    .await
    .unwrap();
}

#[tokio::test]
async fn higher_priority_first_fifo_within_a_priority() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare("pq".into(), QueueDeclareOptions::default(), prio_args(10))
        .await
        .unwrap();
    for (body, p) in [
        ("none", None),
        ("p1a", Some(1)),
        ("p5a", Some(5)),
        ("p200", Some(200)),
        ("p5b", Some(5)),
        ("p10", Some(10)),
        ("p1b", Some(1)),
        ("p0", Some(0)),
    ] {
        publish_p(&ch, "pq", body, p, false).await;
    }
    // Above the maximum counts as the maximum; no priority is 0.
    assert_eq!(
        drain(&ch, "pq").await,
        vec!["p200", "p10", "p5a", "p5b", "p1a", "p1b", "none", "p0"]
    );
}

#[tokio::test]
async fn without_max_priority_the_property_is_ignored() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    declare_queue(&ch, "plain").await;
    for (body, p) in [("a", Some(1)), ("b", Some(9)), ("c", None)] {
        publish_p(&ch, "plain", body, p, false).await;
    }
    assert_eq!(drain(&ch, "plain").await, vec!["a", "b", "c"]);
}

#[tokio::test]
async fn requeued_messages_return_to_their_place_in_their_priority() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare("pq".into(), QueueDeclareOptions::default(), prio_args(5))
        .await
        .unwrap();
    for (body, p) in [("lo1", 1), ("hi1", 4), ("lo2", 1), ("hi2", 4)] {
        publish_p(&ch, "pq", body, Some(p), false).await;
    }
    ch.basic_qos(3, BasicQosOptions::default()).await.unwrap();
    let mut c = ch
        .basic_consume(
            "pq".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        let d = within(5, c.next()).await.unwrap().unwrap();
        got.push((String::from_utf8(d.data.clone()).unwrap(), d));
    }
    assert_eq!(
        got.iter().map(|g| g.0.as_str()).collect::<Vec<_>>(),
        vec!["hi1", "hi2", "lo1"]
    );
    ch.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    // Requeue in reverse order: positions come from publish order.
    for (_, d) in got.into_iter().rev() {
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    }
    settle().await;
    let mut order = Vec::new();
    while let Some(m) = ch
        .basic_get("pq".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        order.push((
            String::from_utf8(m.delivery.data.clone()).unwrap(),
            m.delivery.redelivered,
        ));
    }
    assert_eq!(
        order,
        vec![
            ("hi1".into(), true),
            ("hi2".into(), true),
            ("lo1".into(), true),
            ("lo2".to_string(), false)
        ]
    );
}

#[tokio::test]
async fn durable_priority_queue_pages_and_keeps_order() {
    // A tiny in-memory window: most bodies are paged out to the store.
    let b = TestBroker::start_with(|c| c.queue.max_in_memory = 4).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "dpq".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        prio_args(3),
    )
    .await
    .unwrap();
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); 4];
    for i in 0..40u32 {
        let p = ((i * 7) % 4) as u8;
        let body = format!("m{i}-p{p}");
        publish_p(&ch, "dpq", &body, Some(p), true).await;
        expected[p as usize].push(body);
    }
    let expected: Vec<String> = expected.into_iter().rev().flatten().collect();
    // Take the first and requeue it: it goes back to its place.
    let m = ch
        .basic_get("dpq".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8(m.delivery.data.clone()).unwrap(),
        expected[0]
    );
    m.delivery
        .nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    assert_eq!(drain(&ch, "dpq").await, expected);
}
