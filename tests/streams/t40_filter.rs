use crate::common::{TestBroker, within};
use crate::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable};
use std::time::Duration;

const QUIET: Duration = Duration::from_millis(400);

fn filter_header(v: &str) -> FieldTable {
    let mut t = FieldTable::default();
    t.insert("x-stream-filter-value".into(), s(v));
    t
}

fn filtered(values: &[&str], unfiltered: bool) -> FieldTable {
    let mut t = from(s("first"));
    let v = if values.len() == 1 {
        s(values[0])
    } else {
        AMQPValue::FieldArray(FieldArray::from(
            values.iter().map(|v| s(v)).collect::<Vec<_>>(),
        ))
    };
    t.insert("x-stream-filter".into(), v);
    if unfiltered {
        t.insert("x-stream-match-unfiltered".into(), AMQPValue::Boolean(true));
    }
    t
}

/// x-stream-filter delivers only matching messages (exactly: no false
/// positives reach the client), a list matches any, and
/// x-stream-match-unfiltered adds messages without a filter value.
#[tokio::test]
async fn only_matching_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_stream(&ch, "f", &[]).await;
    for round in 0..3 {
        publish_confirmed(
            &ch,
            "f",
            (0..10).map(|i| format!("ca{round}-{i}")),
            Some(filter_header("california")),
        )
        .await;
        publish_confirmed(
            &ch,
            "f",
            (0..10).map(|i| format!("tx{round}-{i}")),
            Some(filter_header("texas")),
        )
        .await;
        publish_confirmed(&ch, "f", (0..10).map(|i| format!("no{round}-{i}")), None).await;
    }
    let bodies = |v: Vec<(i64, String)>| v.into_iter().map(|(_, b)| b).collect::<Vec<_>>();
    let ca = bodies(
        within(
            10,
            read(&ch, "f", "a", filtered(&["california"], false), 100, QUIET),
        )
        .await,
    );
    assert_eq!(ca.len(), 30);
    assert!(ca.iter().all(|b| b.starts_with("ca")), "{ca:?}");
    let both = bodies(
        within(
            10,
            read(
                &ch,
                "f",
                "b",
                filtered(&["california", "texas"], false),
                100,
                QUIET,
            ),
        )
        .await,
    );
    assert_eq!(both.len(), 60);
    assert!(both.iter().all(|b| !b.starts_with("no")));
    let tx_and_none = bodies(
        within(
            10,
            read(&ch, "f", "c", filtered(&["texas"], true), 100, QUIET),
        )
        .await,
    );
    assert_eq!(tx_and_none.len(), 60);
    assert!(tx_and_none.iter().all(|b| !b.starts_with("ca")));
    let none = within(
        10,
        read(&ch, "f", "d", filtered(&["oregon"], false), 100, QUIET),
    )
    .await;
    assert!(none.is_empty());
}
