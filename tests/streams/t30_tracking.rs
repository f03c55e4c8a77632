use crate::process::WarrenProcess;
use crate::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ConnectionProperties};
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(600);

/// A consumer with its own tag and no x-stream-offset has its offset kept
/// by the broker: after a restart the same tag resumes after its last ack.
#[tokio::test]
async fn tracked_offset_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        declare_stream(&ch, "t", &[]).await;
        publish_confirmed(&ch, "t", (0..5).map(|i| format!("old{i}")), None).await;
        // Nothing stored yet: "next", so the 5 old messages are not seen.
        let reader = {
            let c = conn.create_channel().await.unwrap();
            tokio::spawn(async move {
                read(
                    &c,
                    "t",
                    "billing",
                    FieldTable::default(),
                    10,
                    Duration::from_secs(3),
                )
                .await
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        publish_confirmed(&ch, "t", (5..25).map(|i| format!("m{i}")), None).await;
        let got = reader.await.unwrap();
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            (5..15).collect::<Vec<_>>()
        );
        // Opting in explicitly, with a starting offset for the first time.
        let mut a = from(s("first"));
        a.insert(
            "x-stream-automatic-offset-tracking".into(),
            AMQPValue::Boolean(true),
        );
        let got = read(&ch, "t", "amq.ctag-auto", a, 3, QUIET).await;
        assert_eq!(
            got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        conn.close(200, "bye".into()).await.ok();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let got = read(&ch, "t", "billing", FieldTable::default(), 100, QUIET).await;
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        (15..25).collect::<Vec<_>>(),
        "resumed after the last ack"
    );
    let mut a = from(s("first"));
    a.insert(
        "x-stream-automatic-offset-tracking".into(),
        AMQPValue::Boolean(true),
    );
    let got = read(&ch, "t", "amq.ctag-auto", a, 2, QUIET).await;
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        vec![3, 4],
        "stored offset wins over x-stream-offset"
    );
    // A generated tag with an explicit offset is not tracked.
    let got = read(&ch, "t", "", from(s("first")), 1, QUIET).await;
    assert_eq!(got[0].0, 0);
    drop(conn);
    w.stop();
}
