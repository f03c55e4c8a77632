use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable, LongString};
use std::collections::HashMap;

/// x-consistent-hash: every routing key always lands on the same bound
/// queue, and keys spread over the queues.
#[tokio::test]
async fn consistent_hash_exchange_is_consistent() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "ch".into(),
        lapin::ExchangeKind::Custom("x-consistent-hash".into()),
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for q in ["h0", "h1"] {
        ch.queue_declare(
            q.into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        ch.queue_bind(
            q.into(),
            "ch".into(),
            "10".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    for round in 0..3 {
        for k in 0..40 {
            ch.basic_publish(
                "ch".into(),
                format!("key-{k}").as_str().into(),
                BasicPublishOptions::default(),
                format!("{round}:{k}").as_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let mut owner: HashMap<String, &str> = HashMap::new();
    let mut per_queue = HashMap::new();
    for q in ["h0", "h1"] {
        while let Some(m) = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let body = String::from_utf8(m.delivery.data.clone()).unwrap();
            let key = body.split(':').nth(1).unwrap().to_string();
            let prev = owner.insert(key.clone(), q);
            assert!(
                prev.is_none() || prev == Some(q),
                "key {key} went to two queues"
            );
            *per_queue.entry(q).or_insert(0) += 1;
        }
    }
    assert_eq!(owner.len(), 40);
    assert!(
        per_queue.values().all(|n| *n >= 15),
        "keys spread over both queues: {per_queue:?}"
    );
    // A binding key that is not a weight is refused.
    let err = ch
        .queue_bind(
            "h0".into(),
            "ch".into(),
            "heavy".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(amqp_error(&err).map(|e| e.0), Some(406));
}

/// `warrenctl add_super_stream` creates NAME-0..NAME-(N-1) streams behind a
/// hashing exchange NAME: per-key order holds within one partition.
#[tokio::test]
async fn super_stream_keeps_per_key_order() {
    let b = TestBroker::start().await;
    let mgmt = b.mgmt_addr.expect("management API");
    // Async: the broker runs on this test's runtime and must keep serving.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args([
            "--node",
            &mgmt.to_string(),
            "add_super_stream",
            "orders",
            "--partitions",
            "3",
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "warrenctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for seq in 0..5 {
        for k in 0..12 {
            ch.basic_publish(
                "orders".into(),
                format!("customer-{k}").as_str().into(),
                BasicPublishOptions::default(),
                format!("customer-{k}:{seq}").as_bytes(),
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        }
    }
    assert!(ch.wait_for_confirms().await.unwrap().is_empty());
    let mut owner: HashMap<String, usize> = HashMap::new();
    let mut total = 0;
    for p in 0..3 {
        let c = conn.create_channel().await.unwrap();
        c.basic_qos(100, BasicQosOptions::default()).await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString(LongString::from(b"first".to_vec())),
        );
        let count = c
            .queue_declare(
                format!("orders-{p}").as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .is_ok();
        assert!(count, "partition orders-{p} exists");
        let mut consumer = c
            .basic_consume(
                format!("orders-{p}").as_str().into(),
                format!("r{p}").as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .unwrap();
        let mut last: HashMap<String, i32> = HashMap::new();
        loop {
            let next =
                tokio::time::timeout(std::time::Duration::from_millis(500), consumer.next()).await;
            let Ok(Some(Ok(d))) = next else { break };
            let body = String::from_utf8(d.data.clone()).unwrap();
            let (key, seq) = body.split_once(':').unwrap();
            let seq: i32 = seq.parse().unwrap();
            assert_eq!(
                *owner.entry(key.to_string()).or_insert(p),
                p,
                "{key} is always in the same partition"
            );
            let prev = last.insert(key.to_string(), seq);
            assert_eq!(
                prev.map_or(-1, |v| v) + 1,
                seq,
                "per-key order within the partition"
            );
            d.ack(BasicAckOptions::default()).await.unwrap();
            total += 1;
        }
    }
    assert_eq!(total, 60);
    assert_eq!(owner.len(), 12);
}
