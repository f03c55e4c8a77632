//! Delayed retry and deduplication across restarts: a durable queue's
//! message waiting out a retry delay keeps its due time and delivery count;
//! the deduplication caches of durable queues and exchanges survive a
//! graceful restart, and a crash loses at most the last save interval.

use crate::process::WarrenProcess;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::time::{Duration, Instant};

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

async fn connect(w: &WarrenProcess) -> Connection {
    Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .expect("connect")
}

async fn declare_durable(ch: &Channel, q: &str, args: FieldTable) {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
}

async fn ready_count(ch: &Channel, q: &str) -> u32 {
    ch.queue_declare(
        q.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

fn delivery_count(d: &lapin::message::Delivery) -> Option<i64> {
    let h = d.properties.headers().as_ref()?;
    match h.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

fn with_id(id: &str) -> BasicProperties {
    let mut h = FieldTable::default();
    h.insert("x-deduplication-header".into(), s(id));
    BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(h)
}

/// Publishes a persistent message with a deduplication id; asserts the
/// confirm is an ack (duplicates are dropped but still acked).
async fn send(ch: &Channel, exchange: &str, rk: &str, body: &str, id: &str) {
    let c = ch
        .basic_publish(
            exchange.into(),
            rk.into(),
            BasicPublishOptions::default(),
            body.as_bytes(),
            with_id(id),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(c.is_ack(), "{body} confirmed as ack");
}

/// Takes every ready message (auto-ack); returns the bodies.
async fn drain(ch: &Channel, q: &str) -> Vec<String> {
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(q.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
    }
    got
}

fn retry_args(min: i32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-delayed-retry-type".into(), s("failed"));
    args.insert("x-delayed-retry-min".into(), AMQPValue::LongInt(min));
    args.insert("x-delayed-retry-max".into(), AMQPValue::LongInt(60_000));
    args.insert("x-delayed-retry-backoff".into(), s("exponential"));
    args
}

/// A persistent message waiting out a retry delay keeps its due time and
/// its delivery count across a graceful restart: it is not delivered before
/// it is due, it is delivered after (x-delivery-count as before the
/// restart), once, and acking it removes it for good.
#[tokio::test]
async fn delayed_retry_keeps_its_due_time_and_count_across_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    // Exponential from 1.5 s: the second nack waits 3 s.
    let delay = Duration::from_millis(3_000);
    let nacked_at;
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "rq", retry_args(1_500)).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.basic_publish(
            "".into(),
            "rq".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default().with_delivery_mode(2),
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
        let nack = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        let d = c.next().await.unwrap().unwrap();
        d.nack(nack).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .expect("back after 1.5 s")
            .unwrap()
            .unwrap();
        assert_eq!(delivery_count(&d), Some(1));
        d.nack(nack).await.unwrap();
        nacked_at = Instant::now();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(ready_count(&ch, "rq").await, 1, "waiting, still counted");
        let _ = conn.close(200, "bye".into()).await;
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    assert!(
        nacked_at.elapsed() < delay - Duration::from_millis(500),
        "the restart took too long for this test to mean anything"
    );
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(ready_count(&ch, "rq").await, 1);
    let mut c = ch
        .basic_consume(
            "rq".into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let early = (delay - Duration::from_millis(50)).saturating_sub(nacked_at.elapsed());
    assert!(
        tokio::time::timeout(early, c.next()).await.is_err(),
        "delivered before its retry was due"
    );
    let d = tokio::time::timeout(Duration::from_secs(5), c.next())
        .await
        .expect("delivered once due")
        .unwrap()
        .unwrap();
    let at = nacked_at.elapsed();
    assert!(
        at >= delay - Duration::from_millis(50) && at < delay + Duration::from_secs(2),
        "delivered {at:?} after the nack, expected about {delay:?}"
    );
    assert_eq!(&d.data[..], b"m");
    assert!(d.redelivered);
    assert_eq!(
        delivery_count(&d),
        Some(2),
        "the count survived the restart"
    );
    d.ack(BasicAckOptions::default()).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "delivered once"
    );
    let _ = conn.close(200, "bye".into()).await;
    w.stop();
    // Acked: gone for good, not brought back by its saved retry state.
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    assert_eq!(ready_count(&ch, "rq").await, 0);
    drop(conn);
    w.stop();
}

/// A retry that fell due while the broker was down is ready at once after
/// the restart, with its delivery count; the delivery limit counts on from
/// it (one more failure dead-letters it).
#[tokio::test]
async fn retry_due_while_down_is_ready_at_once_and_counts_towards_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    let mut args = retry_args(500);
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    args.insert("x-dead-letter-exchange".into(), s(""));
    args.insert("x-dead-letter-routing-key".into(), s("dlq"));
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "dlq", FieldTable::default()).await;
        declare_durable(&ch, "rl", args).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        ch.basic_publish(
            "".into(),
            "rl".into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let mut c = ch
            .basic_consume(
                "rl".into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let nack = BasicNackOptions {
            requeue: true,
            multiple: false,
        };
        // Two failures: 0.5 s, then a 1 s wait that runs out while down.
        let d = c.next().await.unwrap().unwrap();
        d.nack(nack).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), c.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        d.nack(nack).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    w.stop();
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    let mut c = ch
        .basic_consume(
            "rl".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = tokio::time::timeout(Duration::from_millis(500), c.next())
        .await
        .expect("ready at once")
        .unwrap()
        .unwrap();
    assert_eq!(delivery_count(&d), Some(2));
    // A third failure is over the limit of 2: dead-lettered.
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(drain(&ch, "dlq").await, vec!["m"]);
    assert_eq!(ready_count(&ch, "rl").await, 0);
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
    let w = WarrenProcess::start(&data);
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "ddq", args.clone()).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        send(&ch, "", "ddq", "a1", "a").await;
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "", "ddq", "a2", "a").await;
    send(&ch, "", "ddq", "b1", "b").await;
    assert_eq!(drain(&ch, "ddq").await, vec!["a1", "b1"]);
    drop(conn);
    w.stop();
}

fn dedup_args(size: Option<i32>, ttl: Option<i32>) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-message-deduplication".into(), AMQPValue::Boolean(true));
    if let Some(n) = size {
        t.insert("x-cache-size".into(), AMQPValue::LongInt(n));
    }
    if let Some(n) = ttl {
        t.insert("x-cache-ttl".into(), AMQPValue::LongInt(n));
    }
    t
}

/// Ids of messages consumed before a graceful restart are still
/// remembered after it (a duplicate is dropped and acked, a new id goes
/// through), within x-cache-size and x-cache-ttl.
#[tokio::test]
async fn dedup_cache_of_consumed_messages_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    let published;
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "dd", dedup_args(None, None)).await;
        declare_durable(&ch, "dd-size", dedup_args(Some(2), None)).await;
        declare_durable(&ch, "dd-ttl", dedup_args(None, Some(1_500))).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        send(&ch, "", "dd", "a1", "a").await;
        for id in ["a", "b", "c"] {
            send(&ch, "", "dd-size", &format!("{id}1"), id).await;
        }
        send(&ch, "", "dd-ttl", "a1", "a").await;
        published = Instant::now();
        // Consumed and acked before the restart.
        let mut c = ch
            .basic_consume(
                "dd".into(),
                "c".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let d = c.next().await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
        assert_eq!(drain(&ch, "dd-size").await, vec!["a1", "b1", "c1"]);
        assert_eq!(drain(&ch, "dd-ttl").await, vec!["a1"]);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = conn.close(200, "bye".into()).await;
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "", "dd", "a2", "a").await;
    send(&ch, "", "dd", "b1", "b").await;
    assert_eq!(drain(&ch, "dd").await, vec!["b1"]);
    // x-cache-size 2: b and c are remembered, a was evicted.
    for id in ["c", "b", "a"] {
        send(&ch, "", "dd-size", &format!("{id}2"), id).await;
    }
    assert_eq!(drain(&ch, "dd-size").await, vec!["a2"]);
    // x-cache-ttl: remembered until 1.5 s after the first publish.
    let left = Duration::from_millis(1_500).saturating_sub(published.elapsed());
    if left > Duration::from_millis(100) {
        send(&ch, "", "dd-ttl", "a2", "a").await;
        assert_eq!(drain(&ch, "dd-ttl").await, Vec::<String>::new());
    }
    tokio::time::sleep(Duration::from_millis(1_600).saturating_sub(published.elapsed())).await;
    send(&ch, "", "dd-ttl", "a3", "a").await;
    assert_eq!(drain(&ch, "dd-ttl").await, vec!["a3"]);
    drop(conn);
    w.stop();
}

/// A crash (SIGKILL) loses at most the ids accepted in the last save
/// interval (about 1.5 s): an id consumed earlier is remembered, and so is
/// the id of a stored message still in the queue, however recent.
#[tokio::test]
async fn dedup_cache_survives_a_crash_after_the_save_interval() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "dc", dedup_args(Some(100), None)).await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        send(&ch, "", "dc", "a1", "a").await;
        assert_eq!(drain(&ch, "dc").await, vec!["a1"]);
        // Past the save interval and sled's background flush.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        send(&ch, "", "dc", "c1", "c").await;
    }
    w.crash();
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "", "dc", "a2", "a").await;
    send(&ch, "", "dc", "c2", "c").await;
    send(&ch, "", "dc", "b1", "b").await;
    assert_eq!(drain(&ch, "dc").await, vec!["c1", "b1"]);
    drop(conn);
    w.stop();
}

/// A durable exchange with x-message-deduplication remembers the ids it
/// routed across a graceful restart; deleting it forgets them.
#[tokio::test]
async fn exchange_dedup_cache_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let declare_x = |ch: Channel, name: &'static str| async move {
        ch.exchange_declare(
            name.into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            dedup_args(Some(10), None),
        )
        .await
        .unwrap();
        ch.queue_bind(
            "xq".into(),
            name.into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    };
    let w = WarrenProcess::start(&data);
    {
        let conn = connect(&w).await;
        let ch = conn.create_channel().await.unwrap();
        declare_durable(&ch, "xq", FieldTable::default()).await;
        declare_x(ch.clone(), "dx").await;
        declare_x(ch.clone(), "dx-gone").await;
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        send(&ch, "dx", "", "a1", "a").await;
        send(&ch, "dx-gone", "", "g1", "g").await;
        assert_eq!(drain(&ch, "xq").await, vec!["a1", "g1"]);
        // Saved by the once-a-second task, then deleted with the exchange.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        ch.exchange_delete("dx-gone".into(), ExchangeDeleteOptions::default())
            .await
            .unwrap();
        let _ = conn.close(200, "bye".into()).await;
    }
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = connect(&w).await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    send(&ch, "dx", "", "a2", "a").await;
    send(&ch, "dx", "", "b1", "b").await;
    // Declared again: a new exchange, with nothing remembered.
    declare_x(ch.clone(), "dx-gone").await;
    send(&ch, "dx-gone", "", "g2", "g").await;
    assert_eq!(drain(&ch, "xq").await, vec!["b1", "g2"]);
    drop(conn);
    w.stop();
}
