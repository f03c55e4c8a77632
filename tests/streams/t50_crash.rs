use crate::process::WarrenProcess;
use crate::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn body_of(i: u32) -> Vec<u8> {
    let mut b = i.to_be_bytes().to_vec();
    b.extend((0..100u32).map(|k| (k.wrapping_mul(31).wrapping_add(i)) as u8));
    b
}

/// SIGKILL during appends: after restart every confirmed message is in the
/// stream, intact, once, in publish order.
#[tokio::test]
async fn sigkill_loses_nothing_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    declare_stream(
        &ch,
        "crash",
        &[(
            "x-stream-max-segment-size-bytes",
            lapin::types::AMQPValue::LongInt(200_000),
        )],
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let confirmed: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let c2 = confirmed.clone();
    let publisher = tokio::spawn(async move {
        let mut inflight = std::collections::VecDeque::new();
        for i in 0u32.. {
            let pc = match ch
                .basic_publish(
                    "".into(),
                    "crash".into(),
                    BasicPublishOptions::default(),
                    &body_of(i),
                    BasicProperties::default(),
                )
                .await
            {
                Ok(pc) => pc,
                Err(_) => break,
            };
            inflight.push_back((i, pc));
            while inflight.len() > 200 {
                let (n, pc) = inflight.pop_front().unwrap();
                match pc.await {
                    Ok(c) if c.is_ack() => {
                        c2.lock().unwrap().insert(n);
                    }
                    _ => return,
                }
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.crash();
    let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > 100,
        "publisher got going ({} confirmed)",
        confirmed.len()
    );

    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .unwrap();
    let mut c = ch
        .basic_consume(
            "crash".into(),
            "r".into(),
            BasicConsumeOptions::default(),
            from(s("first")),
        )
        .await
        .unwrap();
    let mut present = Vec::new();
    use futures_lite::StreamExt;
    while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(1500), c.next()).await {
        let i = u32::from_be_bytes([d.data[0], d.data[1], d.data[2], d.data[3]]);
        assert_eq!(d.data, body_of(i), "message {i} intact");
        assert_eq!(offset_of(&d), i64::from(i), "offset = publish order");
        present.push(i);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let set: BTreeSet<u32> = present.iter().copied().collect();
    assert_eq!(set.len(), present.len(), "no duplicates");
    let missing: Vec<&u32> = confirmed.difference(&set).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let _ = FieldTable::default();
    drop(conn);
    w.stop();
}
