use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::FieldTable;

/// A backlog much larger than the in-memory window is kept on disk, and
/// drained in order.
#[tokio::test]
async fn backlog_beyond_window_is_paged_and_drained_in_order() {
    let b = TestBroker::start_with(|c| c.queue.max_in_memory = 100).await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "paged".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let n = 5000u32;
    let body = |i: u32| {
        let mut v = i.to_be_bytes().to_vec();
        v.resize(1024, (i % 251) as u8);
        v
    };
    for i in 0..n {
        ch.basic_publish(
            "".into(),
            "paged".into(),
            BasicPublishOptions::default(),
            &body(i),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap();
    }
    assert!(
        ch.wait_for_confirms().await.unwrap().is_empty(),
        "no returns"
    );
    let q = broker.vhost("/").unwrap().queue("paged").unwrap();
    // Paging happens after each batch the queue processes; nudge it once.
    let mut counts = q.stats().await.unwrap();
    for _ in 0..50 {
        if counts.in_memory <= 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        counts = q.stats().await.unwrap();
    }
    assert_eq!(counts.ready, u64::from(n));
    assert!(
        counts.in_memory <= 200,
        "at most about the window in memory, got {}",
        counts.in_memory
    );

    ch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut c = ch
        .basic_consume(
            "paged".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..n {
        let d = within(10, c.next()).await.unwrap().unwrap();
        assert_eq!(d.data, body(i), "message {i} in order and intact");
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}
