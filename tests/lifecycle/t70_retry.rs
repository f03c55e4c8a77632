//! Delayed retry (x-delayed-retry-*, RabbitMQ 4.3): returned messages wait
//! out a linear or exponential delay before they are ready again, without
//! holding back the messages behind them.

use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::time::{Duration, Instant};

fn retry_args(kind: &str, min: i64, max: i64, backoff: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-delayed-retry-type".into(),
        AMQPValue::LongString(LongString::from(kind.as_bytes().to_vec())),
    );
    t.insert("x-delayed-retry-min".into(), AMQPValue::LongLongInt(min));
    t.insert("x-delayed-retry-max".into(), AMQPValue::LongLongInt(max));
    t.insert(
        "x-delayed-retry-backoff".into(),
        AMQPValue::LongString(LongString::from(backoff.as_bytes().to_vec())),
    );
    t
}

fn delivery_count(d: &lapin::message::Delivery) -> Option<i64> {
    let h = d.properties.headers().as_ref()?;
    match h.inner().get("x-delivery-count")? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        _ => None,
    }
}

/// Nacks (requeue=true) the single message `n` times; returns the gaps
/// between deliveries and the x-delivery-count of each redelivery.
async fn nack_loop(args: FieldTable, q: &str, n: usize) -> (Vec<Duration>, Vec<Option<i64>>) {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(q.into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    publish(&ch, "", q, b"m").await;
    let mut c = ch
        .basic_consume(
            q.into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut last = None;
    let mut gaps = Vec::new();
    let mut counts = Vec::new();
    for i in 0..=n {
        let d = within(10, c.next()).await.unwrap().unwrap();
        let now = Instant::now();
        if let Some(prev) = last {
            gaps.push(now - prev);
            counts.push(delivery_count(&d));
            assert!(d.redelivered);
        }
        last = Some(now);
        if i < n {
            d.nack(BasicNackOptions {
                requeue: true,
                multiple: false,
            })
            .await
            .unwrap();
        } else {
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    (gaps, counts)
}

fn assert_gap(got: Duration, want_ms: u64) {
    let lo = Duration::from_millis(want_ms.saturating_sub(30));
    let hi = Duration::from_millis(want_ms + 400);
    assert!(
        got >= lo && got <= hi,
        "gap {got:?}, expected about {want_ms} ms"
    );
}

#[tokio::test]
async fn linear_retry_delays_grow_with_delivery_count() {
    let (gaps, counts) = nack_loop(retry_args("failed", 150, 10_000, "linear"), "rl", 3).await;
    for (g, want) in gaps.iter().zip([150, 300, 450]) {
        assert_gap(*g, want);
    }
    assert_eq!(counts, vec![Some(1), Some(2), Some(3)]);
}

#[tokio::test]
async fn exponential_retry_doubles_up_to_the_max() {
    let (gaps, counts) = nack_loop(retry_args("all", 100, 300, "exponential"), "re", 4).await;
    for (g, want) in gaps.iter().zip([100, 200, 300, 300]) {
        assert_gap(*g, want);
    }
    assert_eq!(counts, vec![Some(1), Some(2), Some(3), Some(4)]);
}

/// How long a message takes to come back after a nack (requeue) and after
/// its channel closed, on a queue with the given retry type.
async fn nack_and_close_delays(kind: &str) -> (Duration, Duration) {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let q = format!("rt-{kind}");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        q.as_str().into(),
        QueueDeclareOptions::default(),
        retry_args(kind, 600, 600, "linear"),
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"m").await;
    let mut c = ch
        .basic_consume(
            q.as_str().into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    let t = Instant::now();
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    let _d = within(5, c.next()).await.unwrap().unwrap();
    let after_nack = t.elapsed();
    // Leave it unacked and close the channel: a return without a nack.
    let t = Instant::now();
    ch.close(200, "bye".into()).await.unwrap();
    let ch2 = conn.create_channel().await.unwrap();
    let mut c2 = ch2
        .basic_consume(
            q.as_str().into(),
            "c2".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c2.next()).await.unwrap().unwrap();
    let after_close = t.elapsed();
    assert!(d.redelivered);
    (after_nack, after_close)
}

#[tokio::test]
async fn failed_type_delays_nacks_only() {
    let (nack, close) = nack_and_close_delays("failed").await;
    assert!(
        nack >= Duration::from_millis(570),
        "nack delayed ({nack:?})"
    );
    assert!(
        close < Duration::from_millis(400),
        "close not delayed ({close:?})"
    );
}

#[tokio::test]
async fn returned_type_delays_returns_only() {
    let (nack, close) = nack_and_close_delays("returned").await;
    assert!(
        nack < Duration::from_millis(400),
        "nack not delayed ({nack:?})"
    );
    assert!(
        close >= Duration::from_millis(570),
        "close delayed ({close:?})"
    );
}

#[tokio::test]
async fn all_type_delays_both() {
    let (nack, close) = nack_and_close_delays("all").await;
    assert!(
        nack >= Duration::from_millis(570),
        "nack delayed ({nack:?})"
    );
    assert!(
        close >= Duration::from_millis(570),
        "close delayed ({close:?})"
    );
}

#[tokio::test]
async fn disabled_type_does_not_delay() {
    let (nack, close) = nack_and_close_delays("disabled").await;
    assert!(nack < Duration::from_millis(400), "{nack:?}");
    assert!(close < Duration::from_millis(400), "{close:?}");
}

/// A delayed message does not hold back the ready ones behind it, and goes
/// back to its original position once due.
#[tokio::test]
async fn delayed_message_does_not_block_the_queue() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "hol".into(),
        QueueDeclareOptions::default(),
        retry_args("failed", 800, 800, "linear"),
    )
    .await
    .unwrap();
    for m in ["a", "b", "c"] {
        publish(&ch, "", "hol", m.as_bytes()).await;
    }
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let mut c = ch
        .basic_consume(
            "hol".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.data[..], b"a");
    let t = Instant::now();
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.data[..], b"b");
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "b came at once ({:?})",
        t.elapsed()
    );
    // Hold b until a is due: a goes back ahead of c (publish order).
    tokio::time::sleep(Duration::from_millis(900)).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.data[..], b"a");
    assert!(d.redelivered);
    d.ack(BasicAckOptions::default()).await.unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(&d.data[..], b"c");
    d.ack(BasicAckOptions::default()).await.unwrap();
}

/// With x-delivery-limit, a message that keeps failing is dead-lettered with
/// reason delivery_limit instead of being delayed again.
#[tokio::test]
async fn delivery_limit_dead_letters_after_retries() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "rdlq").await;
    let mut args = retry_args("failed", 50, 1000, "linear");
    args.insert("x-delivery-limit".into(), AMQPValue::LongInt(2));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from(b"".to_vec())),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(b"rdlq".to_vec())),
    );
    ch.queue_declare("rlim".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        "rlim".into(),
        BasicPublishOptions::default(),
        b"poison",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "rlim".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let d = within(5, c.next()).await.unwrap().unwrap();
        d.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        })
        .await
        .unwrap();
    }
    let mut dl = None;
    for _ in 0..50 {
        if let Some(m) = ch
            .basic_get("rdlq".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            dl = Some(m);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let m = dl.expect("dead-lettered");
    assert_eq!(&m.delivery.data[..], b"poison");
    let h = m.delivery.properties.headers().clone().unwrap();
    let AMQPValue::FieldArray(deaths) = h.inner().get("x-death").unwrap() else {
        panic!()
    };
    let AMQPValue::FieldTable(d) = &deaths.as_slice()[0] else {
        panic!()
    };
    assert!(
        matches!(d.inner().get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"delivery_limit")
    );
    assert_eq!(message_count(&conn, "rlim").await, 0);
}

#[tokio::test]
async fn retry_arguments_are_validated() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "bad".into(),
            QueueDeclareOptions::default(),
            retry_args("sometimes", 1, 2, "linear"),
        )
        .await
        .unwrap_err();
    let (code, text) = amqp_error(&err).expect("channel error");
    assert_eq!(code, 406);
    assert_eq!(
        text,
        "PRECONDITION_FAILED - invalid arg 'x-delayed-retry-type' for queue 'bad' in vhost '/': {unknown_delayed_retry_type,<<\"sometimes\">>}"
    );
    let ch = conn.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "bad".into(),
            QueueDeclareOptions::default(),
            retry_args("all", 100, 50, "linear"),
        )
        .await
        .unwrap_err();
    assert_eq!(amqp_error(&err).unwrap().0, 406);
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "ok".into(),
        QueueDeclareOptions::default(),
        retry_args("all", 100, 500, "exponential"),
    )
    .await
    .unwrap();
    let err = ch
        .queue_declare(
            "ok".into(),
            QueueDeclareOptions::default(),
            retry_args("all", 100, 500, "linear"),
        )
        .await
        .unwrap_err();
    assert_eq!(amqp_error(&err).unwrap().0, 406);
}

/// The policy keys (delayed-retry-type, -min, ...) apply where the queue has
/// no x- argument.
#[tokio::test]
async fn retry_settings_come_from_a_policy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = TestBroker::start().await;
    let body = serde_json::json!({"pattern": "^polr$", "apply-to": "queues", "priority": 0,
        "definition": {"delayed-retry-type": "failed", "delayed-retry-min": 500, "delayed-retry-backoff": "linear"}})
    .to_string();
    let mut s = tokio::net::TcpStream::connect(b.mgmt_addr.unwrap())
        .await
        .unwrap();
    let req = format!(
        "PUT /api/policies/%2F/retry HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within(10, s.read_to_end(&mut out)).await.unwrap();
    let status: u16 = String::from_utf8_lossy(&out)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    assert!(status == 201 || status == 204, "policy set: {status}");
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "polr").await;
    publish(&ch, "", "polr", b"m").await;
    let mut c = ch
        .basic_consume(
            "polr".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    let t = Instant::now();
    d.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    })
    .await
    .unwrap();
    let _d = within(5, c.next()).await.unwrap().unwrap();
    assert_gap(t.elapsed(), 500);
}
