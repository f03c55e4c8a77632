//! Stream queues through lapin: declare rules, offsets, replay, retention,
//! crash safety, server-side offset tracking, filtering.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/process.rs"]
mod process;

mod t10_basic;
mod t20_retention;
mod t30_tracking;
mod t40_filter;
mod t50_crash;

use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::time::Duration;

/// Arguments of a stream declare, plus `extra`.
pub fn stream_args(extra: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    for (k, v) in extra {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Declares a durable stream.
pub async fn declare_stream(ch: &Channel, name: &str, extra: &[(&str, AMQPValue)]) {
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        stream_args(extra),
    )
    .await
    .expect("declare stream");
}

/// Publishes bodies with confirms and waits for every confirm.
pub async fn publish_confirmed(
    ch: &Channel,
    queue: &str,
    bodies: impl IntoIterator<Item = String>,
    headers: Option<FieldTable>,
) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .ok();
    let mut pending = Vec::new();
    for b in bodies {
        let mut p = BasicProperties::default();
        if let Some(h) = &headers {
            p = p.with_headers(h.clone());
        }
        pending.push(
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                b.as_bytes(),
                p,
            )
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(p.await.expect("confirm").is_ack(), "publish confirmed");
    }
}

/// The x-stream-offset header of a delivery.
pub fn offset_of(d: &lapin::message::Delivery) -> i64 {
    match d
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-stream-offset").cloned())
    {
        Some(AMQPValue::LongLongInt(o)) => o,
        other => panic!("x-stream-offset header missing or not a long: {other:?}"),
    }
}

/// Consumes (prefetch 10, manual acks) until `n` messages or `quiet` of
/// silence; returns (offset, body) pairs and cancels the consumer.
pub async fn read(
    ch: &Channel,
    queue: &str,
    tag: &str,
    args: FieldTable,
    n: usize,
    quiet: Duration,
) -> Vec<(i64, String)> {
    ch.basic_qos(10, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut c = ch
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .expect("consume");
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(quiet, c.next()).await {
            Ok(Some(Ok(d))) => {
                out.push((offset_of(&d), String::from_utf8_lossy(&d.data).into_owned()));
                d.ack(BasicAckOptions::default()).await.expect("ack");
            }
            Ok(other) => panic!("consumer ended: {other:?}"),
            Err(_) => break,
        }
    }
    ch.basic_cancel(c.tag().as_str().into(), BasicCancelOptions::default())
        .await
        .expect("cancel");
    out
}

/// `x-stream-offset` consumer arguments.
pub fn from(v: AMQPValue) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-stream-offset".into(), v);
    t
}

pub fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}
mod t60_super;
mod t70_groups;
