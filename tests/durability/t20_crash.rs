use crate::common::within;
use crate::process::WarrenProcess;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A publisher with confirms sends persistent messages as fast as it can;
/// the broker is SIGKILLed mid-stream. After restart every confirmed
/// message is in the queue, intact.
#[tokio::test]
async fn sigkill_loses_nothing_confirmed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "crashq".into(),
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
    let confirmed: Arc<Mutex<BTreeSet<u32>>> = Arc::default();
    let c2 = confirmed.clone();
    let publisher = tokio::spawn(async move {
        let mut inflight = std::collections::VecDeque::new();
        for i in 0u32.. {
            let body = body_of(i);
            let pc = match ch
                .basic_publish(
                    "".into(),
                    "crashq".into(),
                    BasicPublishOptions::default(),
                    &body,
                    BasicProperties::default().with_delivery_mode(2),
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
    // Let it run, then crash the broker.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    w.crash();
    let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > 100,
        "the publisher got going before the crash ({} confirmed)",
        confirmed.len()
    );

    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let mut present = BTreeSet::new();
    loop {
        let got = within(
            10,
            ch.basic_get("crashq".into(), BasicGetOptions { no_ack: true }),
        )
        .await
        .unwrap();
        let Some(m) = got else { break };
        let d = &m.delivery.data;
        let i = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        assert_eq!(d, &body_of(i), "message {i} intact");
        assert!(present.insert(i), "message {i} not duplicated");
    }
    let missing: Vec<&u32> = confirmed.difference(&present).collect();
    assert!(
        missing.is_empty(),
        "{} confirmed messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    drop(conn);
    w.stop();
}

fn body_of(i: u32) -> Vec<u8> {
    let mut b = i.to_be_bytes().to_vec();
    b.extend((0..200u32).map(|k| (k.wrapping_mul(31).wrapping_add(i)) as u8));
    b
}
