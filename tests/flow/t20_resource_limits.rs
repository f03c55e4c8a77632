use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use std::time::Duration;

async fn wait_blocked(conn: &lapin::Connection, want: bool) {
    within(10, async {
        while conn.status().blocked() != want {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// A memory high watermark below what the broker uses (set in config)
/// blocks publishers; consumers drain; raising the limit at run time (as
/// `rabbitmqctl set_vm_memory_high_watermark` does) unblocks them.
#[tokio::test]
async fn tiny_memory_watermark_blocks_publishers_until_raised() {
    let b = TestBroker::start_with(|c| {
        c.resources.memory_high_watermark_bytes = 1;
        c.resources.check_interval_ms = 20;
    })
    .await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let publisher = b.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    pch.queue_declare(
        "mem".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    pch.basic_publish(
        "".into(),
        "mem".into(),
        BasicPublishOptions::default(),
        b"first",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    wait_blocked(&publisher, true).await;

    let consumer = b.connect().await;
    assert!(!consumer.status().blocked(), "consumers are not blocked");
    let cch = consumer.create_channel().await.unwrap();
    let mut c = cch
        .basic_consume(
            "mem".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"first");
    d.ack(BasicAckOptions::default()).await.unwrap();

    broker.limits.set_memory_bytes(u64::MAX / 2);
    wait_blocked(&publisher, false).await;
    pch.basic_publish(
        "".into(),
        "mem".into(),
        BasicPublishOptions::default(),
        b"second",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"second");
}

/// A disk free limit above what is free blocks publishers with reason
/// "low on disk".
#[tokio::test]
async fn disk_free_limit_blocks_publishers() {
    let b = TestBroker::start_with(|c| {
        c.resources.disk_free_limit = u64::MAX;
        c.resources.check_interval_ms = 20;
    })
    .await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let publisher = b.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    pch.queue_declare(
        "disk".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    pch.basic_publish(
        "".into(),
        "disk".into(),
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    wait_blocked(&publisher, true).await;
    broker.limits.set_disk_free_bytes(0);
    wait_blocked(&publisher, false).await;
}
