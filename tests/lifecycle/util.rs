//! Helpers shared by the lifecycle tests.
#![allow(dead_code)]

use lapin::Channel;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};

/// A long-string field value.
pub fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()))
}

/// A field table from key/value pairs.
pub fn args(kv: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in kv {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Declares a DLX fanout exchange "dlx" with a queue "dead" bound to it.
pub async fn dead_letter_setup(ch: &Channel) {
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "dead".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}
