use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// A publisher faster than the queue's consumer is slowed down so the
/// backlog stays near the flow-control threshold instead of growing without
/// bound; nothing is lost.
#[tokio::test]
async fn fast_publisher_is_slowed_to_consumer_speed() {
    let b = TestBroker::start_with(|c| c.queue.flow_control_threshold = 500).await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let pconn = b.connect().await;
    let cconn = b.connect().await;
    let pch = pconn.create_channel().await.unwrap();
    let cch = cconn.create_channel().await.unwrap();
    pch.queue_declare(
        "flow".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    cch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    let mut c = cch
        .basic_consume(
            "flow".into(),
            "slow".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let total = 30000u32;
    let consumer = tokio::spawn(async move {
        let mut next = 0u32;
        while next < total {
            let d = c.next().await.unwrap().unwrap();
            assert_eq!(d.data, next.to_be_bytes(), "in order, nothing lost");
            next += 1;
            if next % 50 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
    });
    let q = broker.vhost("/").unwrap().queue("flow").unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let q2 = q.clone();
    let watcher = tokio::spawn(async move {
        let mut max = 0;
        while !d2.load(Ordering::Relaxed) {
            if let Some(c) = q2.stats().await {
                max = max.max(c.ready);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        max
    });
    for i in 0..total {
        pch.basic_publish(
            "".into(),
            "flow".into(),
            BasicPublishOptions::default(),
            &i.to_be_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    within(60, consumer).await.unwrap();
    done.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    assert!(
        max < 12000,
        "backlog stayed bounded near the threshold (max ready {max} of {total})"
    );
    assert!(!q.is_overloaded());
}

/// Many queues, each under its own threshold, together over twice it: their
/// publishers are slowed as a group (the shared threshold), so the total
/// backlog stays near that bound instead of the sum of the thresholds.
#[tokio::test]
async fn many_queues_share_one_backlog_bound() {
    let threshold = 1000u64;
    let b = TestBroker::start_with(|c| c.queue.flow_control_threshold = threshold).await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let pconn = b.connect().await;
    let cconn = b.connect().await;
    let pch = pconn.create_channel().await.unwrap();
    let nq = 20u32;
    let per_queue = 2000u32;
    let mut consumers = Vec::new();
    for qi in 0..nq {
        let name = format!("shared-{qi}");
        pch.queue_declare(
            name.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
        let cch = cconn.create_channel().await.unwrap();
        cch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
        let mut c = cch
            .basic_consume(
                name.as_str().into(),
                "slow".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        consumers.push(tokio::spawn(async move {
            let _ch = cch;
            for next in 0..per_queue {
                let d = c.next().await.unwrap().unwrap();
                assert_eq!(d.data, next.to_be_bytes(), "in order, nothing lost");
                if next % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                d.ack(BasicAckOptions::default()).await.unwrap();
            }
        }));
    }
    let vh = broker.vhost("/").unwrap();
    let queues: Vec<_> = (0..nq)
        .map(|qi| vh.queue(&format!("shared-{qi}")).unwrap())
        .collect();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = done.clone();
    let qs = queues.clone();
    let watcher = tokio::spawn(async move {
        let mut max = 0;
        while !d2.load(Ordering::Relaxed) {
            let mut total = 0;
            for q in &qs {
                if let Some(c) = q.stats().await {
                    total += c.ready;
                }
            }
            max = max.max(total);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        max
    });
    for i in 0..per_queue {
        for qi in 0..nq {
            pch.basic_publish(
                "".into(),
                format!("shared-{qi}").as_str().into(),
                BasicPublishOptions::default(),
                &i.to_be_bytes(),
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    }
    for c in consumers {
        within(120, c).await.unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let max = watcher.await.unwrap();
    // Each queue alone may hold its threshold (20 x 1,000 = 20,000 in all);
    // together they stay near twice one threshold.
    assert!(
        max < 8000,
        "the queues' total backlog stayed near the shared bound (max ready {max} of {})",
        nq * per_queue
    );
}
