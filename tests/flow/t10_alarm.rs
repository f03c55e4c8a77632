use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;
use std::time::Duration;

#[tokio::test]
async fn alarm_blocks_publishers_while_consumers_drain() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let publisher = b.connect().await;
    let consumer_conn = b.connect().await;
    let pch = publisher.create_channel().await.unwrap();
    let cch = consumer_conn.create_channel().await.unwrap();
    pch.queue_declare(
        "alarmed".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    for i in 0..5 {
        pch.basic_publish(
            "".into(),
            "alarmed".into(),
            BasicPublishOptions::default(),
            format!("{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    // Make sure those five are in before the alarm.
    within(5, async {
        loop {
            let q = cch
                .queue_declare(
                    "alarmed".into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            if q.message_count() == 5 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;

    broker.set_alarm(Some("low on memory".into()));
    within(5, async {
        while !publisher.status().blocked() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(publisher.status().blocked());

    // The consumer still drains everything while publishers are blocked.
    let mut c = cch
        .basic_consume(
            "alarmed".into(),
            "drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        let d = within(5, c.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("{i}").as_bytes());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }

    broker.set_alarm(None);
    within(5, async {
        while publisher.status().blocked() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    pch.basic_publish(
        "".into(),
        "alarmed".into(),
        BasicPublishOptions::default(),
        b"after",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data, b"after");
}
