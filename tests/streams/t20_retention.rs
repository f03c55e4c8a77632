use crate::common::{TestBroker, within};
use crate::*;
use lapin::types::AMQPValue;
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(500);

fn segments(b: &TestBroker, q: &str) -> usize {
    let dir = b.dir.path().join("streams").join("%2F").join(q);
    std::fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".log")
        })
        .count()
}

async fn publish_batches(ch: &lapin::Channel, q: &str, range: std::ops::Range<u32>) {
    let v: Vec<u32> = range.collect();
    for batch in v.chunks(10) {
        publish_confirmed(ch, q, batch.iter().map(|i| format!("{i:0100}")), None).await;
    }
}

/// x-max-length-bytes deletes whole old segments; a consumer from "first"
/// starts at the new first offset and reads on contiguously.
#[tokio::test]
async fn by_size() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(
        &ch,
        "rs",
        &[
            ("x-stream-max-segment-size-bytes", AMQPValue::LongInt(3000)),
            ("x-max-length-bytes", AMQPValue::LongInt(8000)),
        ],
    )
    .await;
    publish_batches(&ch, "rs", 0..300).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let n = segments(&b, "rs");
    assert!(n <= 5, "old segments deleted ({n} left)");
    let got = within(20, read(&ch, "rs", "r", from(s("first")), 300, QUIET)).await;
    let first = got[0].0;
    assert!(first > 0, "the first offset moved");
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        (first..300).collect::<Vec<_>>()
    );
    assert_eq!(got[0].1, format!("{first:0100}"));
}

/// x-max-age deletes segments whose newest message is older than the age.
#[tokio::test]
async fn by_age() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(
        &ch,
        "ra",
        &[
            ("x-stream-max-segment-size-bytes", AMQPValue::LongInt(3000)),
            ("x-max-age", s("1s")),
        ],
    )
    .await;
    publish_batches(&ch, "ra", 0..100).await;
    let before = segments(&b, "ra");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    publish_batches(&ch, "ra", 100..150).await;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let got = within(20, read(&ch, "ra", "r", from(s("first")), 150, QUIET)).await;
    let first = got[0].0;
    assert!(
        first >= 80,
        "the old segments went (first offset now {first}; {before} segments before)"
    );
    assert_eq!(
        got.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        (first..150).collect::<Vec<_>>()
    );
}
