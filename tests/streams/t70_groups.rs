//! Consumer groups over a super stream (`x-stream-group`): each partition
//! is read by one member at a time, partitions are rebalanced when members
//! come and go, and a new reader resumes at the group's committed position.
use crate::common::*;
use crate::process::WarrenProcess;
use crate::*;
use futures_lite::StreamExt;
use lapin::message::Delivery;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::sync::mpsc;

const PARTITIONS: usize = 4;
const MESSAGES: usize = 400;

/// `warrenctl add_super_stream NAME --partitions N`.
async fn add_super_stream(b: &TestBroker, name: &str, n: usize) {
    let mgmt = b.mgmt_addr.expect("management API");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args([
            "--node",
            &mgmt.to_string(),
            "add_super_stream",
            name,
            "--partitions",
            &n.to_string(),
        ])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "warrenctl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn group_args(group: &str) -> FieldTable {
    let mut a = from(s("first"));
    a.insert("x-stream-group".into(), s(group));
    a
}

/// A member: one channel (prefetch 10) consuming every partition of
/// `stream` in `group`; deliveries come out of the receiver tagged with
/// their partition.
async fn join(
    conn: &Connection,
    member: &str,
    stream: &str,
    partitions: usize,
    group: &str,
) -> (Channel, mpsc::UnboundedReceiver<(usize, Delivery)>) {
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    for p in 0..partitions {
        let mut c = ch
            .basic_consume(
                format!("{stream}-{p}").as_str().into(),
                format!("{member}-{p}").as_str().into(),
                BasicConsumeOptions::default(),
                group_args(group),
            )
            .await
            .unwrap();
        let tx = tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = c.next().await {
                if tx.send((p, d)).is_err() {
                    break;
                }
            }
        });
    }
    (ch, rx)
}

/// Publishes MESSAGES messages through the super stream's exchange
/// (bodies "m<i>", routing keys "k<i>") and waits for the confirms.
async fn publish_through(conn: &Connection, exchange: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..MESSAGES {
        ch.basic_publish(
            exchange.into(),
            format!("k{i}").as_str().into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    assert!(ch.wait_for_confirms().await.unwrap().is_empty());
    ch.close(200, "ok".into()).await.ok();
}

/// One delivery as a member saw it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Seen {
    partition: usize,
    offset: i64,
    body: String,
}

fn seen(p: usize, d: &Delivery) -> Seen {
    Seen {
        partition: p,
        offset: offset_of(d),
        body: String::from_utf8_lossy(&d.data).into_owned(),
    }
}

/// Receives and acks until `quiet` passes without a delivery or `stop` says so.
async fn take_acking(
    rx: &mut mpsc::UnboundedReceiver<(usize, Delivery)>,
    quiet: Duration,
    out: &mut Vec<Seen>,
) {
    while let Ok(Some((p, d))) = tokio::time::timeout(quiet, rx.recv()).await {
        out.push(seen(p, &d));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
}

fn partitions_of(v: &[Seen]) -> BTreeSet<usize> {
    v.iter().map(|s| s.partition).collect()
}

/// Per partition, the offsets must be 0..n without a gap or repeat.
fn assert_contiguous(all: &[Seen]) {
    let mut by: BTreeMap<usize, Vec<i64>> = BTreeMap::new();
    for s in all {
        by.entry(s.partition).or_default().push(s.offset);
    }
    for (p, mut o) in by {
        o.sort_unstable();
        assert_eq!(
            o,
            (0..o.len() as i64).collect::<Vec<_>>(),
            "partition {p}: every offset once"
        );
    }
}

/// Two members over a 4-partition super stream get two partitions each
/// (sorted members round-robin over sorted partitions: the older
/// connection reads 0 and 2), and every message reaches exactly one of them.
#[tokio::test]
async fn group_splits_partitions_and_delivers_each_message_once() {
    let b = TestBroker::start().await;
    add_super_stream(&b, "orders", PARTITIONS).await;
    let conn_a = b.connect().await;
    let conn_b = b.connect().await;
    let (_cha, mut rx_a) = join(&conn_a, "a", "orders", PARTITIONS, "billing").await;
    let (_chb, mut rx_b) = join(&conn_b, "b", "orders", PARTITIONS, "billing").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn_p = b.connect().await;
    publish_through(&conn_p, "orders").await;
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let quiet = Duration::from_millis(800);
    within(30, async {
        tokio::join!(
            take_acking(&mut rx_a, quiet, &mut got_a),
            take_acking(&mut rx_b, quiet, &mut got_b)
        )
    })
    .await;
    assert_eq!(partitions_of(&got_a), BTreeSet::from([0, 2]));
    assert_eq!(partitions_of(&got_b), BTreeSet::from([1, 3]));
    let mut all: Vec<Seen> = got_a.iter().chain(&got_b).cloned().collect();
    assert_eq!(all.len(), MESSAGES, "every message delivered once");
    assert_contiguous(&all);
    all.sort_by(|x, y| x.body.cmp(&y.body));
    all.dedup_by(|x, y| x.body == y.body);
    assert_eq!(all.len(), MESSAGES, "no body twice");

    // A third group reading the same partitions is independent.
    let (_chc, mut rx_c) = join(&conn_p, "c", "orders", PARTITIONS, "audit").await;
    let mut got_c = Vec::new();
    within(30, take_acking(&mut rx_c, quiet, &mut got_c)).await;
    assert_eq!(got_c.len(), MESSAGES);
    assert_eq!(partitions_of(&got_c).len(), PARTITIONS);
    // A group name must be a string.
    let ch = conn_p.create_channel().await.unwrap();
    ch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut bad = FieldTable::default();
    bad.insert("x-stream-group".into(), lapin::types::AMQPValue::LongInt(3));
    let err = ch
        .basic_consume(
            "orders-0".into(),
            "bad".into(),
            BasicConsumeOptions::default(),
            bad,
        )
        .await;
    assert_eq!(expect_amqp_error(err).0, 406);
}

/// A member joins while the only other one is reading all partitions:
/// half of them move to it once the first member has settled what it
/// holds, so every message is still delivered exactly once.
#[tokio::test]
async fn group_rebalances_when_a_member_joins() {
    let b = TestBroker::start().await;
    add_super_stream(&b, "orders", PARTITIONS).await;
    let conn_p = b.connect().await;
    publish_through(&conn_p, "orders").await;
    let conn_a = b.connect().await;
    let conn_b = b.connect().await;
    let (_cha, mut rx_a) = join(&conn_a, "a", "orders", PARTITIONS, "billing").await;
    let joined = tokio::sync::Notify::new();
    let (mut got_a, mut got_b) = (Vec::new(), Vec::new());
    let quiet = Duration::from_millis(800);
    let member_a = async {
        while let Ok(Some((p, d))) = tokio::time::timeout(quiet, rx_a.recv()).await {
            got_a.push(seen(p, &d));
            // Slow enough that B joins mid-stream.
            tokio::time::sleep(Duration::from_millis(2)).await;
            d.ack(BasicAckOptions::default()).await.unwrap();
            if got_a.len() == 40 {
                joined.notify_one();
            }
        }
    };
    let member_b = async {
        joined.notified().await;
        let (ch, mut rx_b) = join(&conn_b, "b", "orders", PARTITIONS, "billing").await;
        take_acking(&mut rx_b, quiet, &mut got_b).await;
        ch
    };
    within(60, async { tokio::join!(member_a, member_b) }).await;
    assert_eq!(
        partitions_of(&got_a).len(),
        PARTITIONS,
        "A read all at first"
    );
    assert_eq!(partitions_of(&got_b), BTreeSet::from([1, 3]));
    let all: Vec<Seen> = got_a.iter().chain(&got_b).cloned().collect();
    assert_eq!(all.len(), MESSAGES, "every message delivered exactly once");
    assert_contiguous(&all);
    // Once B read a partition, A got nothing more from it.
    for p in [1, 3] {
        let last_a = got_a
            .iter()
            .filter(|s| s.partition == p)
            .map(|s| s.offset)
            .max();
        let first_b = got_b
            .iter()
            .filter(|s| s.partition == p)
            .map(|s| s.offset)
            .min();
        assert_eq!(
            last_a.map_or(0, |o| o + 1),
            first_b.unwrap_or(-1),
            "partition {p}"
        );
    }
}

/// A member leaves mid-stream (its connection closes with deliveries
/// unacked): its partitions move to the other member, which resumes after
/// the last acked offset. Nothing is skipped, and the only messages
/// delivered twice are exactly the ones the leaver had not acked.
#[tokio::test]
async fn group_member_leaving_hands_over_after_last_ack() {
    let b = TestBroker::start().await;
    add_super_stream(&b, "orders", PARTITIONS).await;
    let conn_a = b.connect().await;
    let conn_b = b.connect().await;
    let (_cha, mut rx_a) = join(&conn_a, "a", "orders", PARTITIONS, "billing").await;
    let (_chb, mut rx_b) = join(&conn_b, "b", "orders", PARTITIONS, "billing").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let conn_p = b.connect().await;
    publish_through(&conn_p, "orders").await;

    // B acks its first 15 deliveries, then holds the rest unacked.
    let (mut b_acked, mut b_unacked) = (Vec::new(), Vec::new());
    let quiet = Duration::from_millis(500);
    let member_b = async {
        while let Ok(Some((p, d))) = tokio::time::timeout(quiet, rx_b.recv()).await {
            if b_acked.len() < 15 {
                b_acked.push(seen(p, &d));
                d.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                b_unacked.push(seen(p, &d));
            }
        }
    };
    // A acks everything meanwhile.
    let mut got_a = Vec::new();
    within(30, async {
        tokio::join!(member_b, take_acking(&mut rx_a, quiet, &mut got_a))
    })
    .await;
    assert_eq!(partitions_of(&got_a), BTreeSet::from([0, 2]));
    assert_eq!(partitions_of(&b_acked), BTreeSet::from([1, 3]));
    assert!(!b_unacked.is_empty(), "B holds unacked deliveries");
    assert!(
        b_unacked.len() <= 20,
        "prefetch 10 per consumer bounds what B holds"
    );
    let before = got_a.len();
    conn_b.close(200, "leaving".into()).await.unwrap();

    // A takes over partitions 1 and 3.
    within(
        30,
        take_acking(&mut rx_a, Duration::from_millis(1000), &mut got_a),
    )
    .await;
    let taken_over = &got_a[before..];
    assert_eq!(partitions_of(taken_over), BTreeSet::from([1, 3]));
    // Each taken-over partition resumes at B's first unacked offset.
    for p in [1, 3] {
        let first_a = taken_over
            .iter()
            .filter(|s| s.partition == p)
            .map(|s| s.offset)
            .min();
        let next_b = b_acked
            .iter()
            .filter(|s| s.partition == p)
            .map(|s| s.offset + 1)
            .max()
            .unwrap_or(0);
        assert_eq!(
            first_a,
            Some(next_b),
            "partition {p} resumes after B's last ack"
        );
    }
    // Exactly once, except B's unacked deliveries, which A got again.
    let mut count: BTreeMap<&str, usize> = BTreeMap::new();
    for s in got_a.iter().chain(&b_acked).chain(&b_unacked) {
        *count.entry(s.body.as_str()).or_default() += 1;
    }
    assert_eq!(count.len(), MESSAGES, "nothing skipped");
    let twice: BTreeSet<&str> = count
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(b, _)| *b)
        .collect();
    assert!(count.values().all(|n| *n <= 2));
    let unacked: BTreeSet<&str> = b_unacked.iter().map(|s| s.body.as_str()).collect();
    assert_eq!(twice, unacked, "only B's unacked messages came twice");
    let a_bodies: BTreeSet<&str> = got_a.iter().map(|s| s.body.as_str()).collect();
    assert!(
        b_acked.iter().all(|s| !a_bodies.contains(s.body.as_str())),
        "nothing B acked reached A"
    );
    // Per partition, what B acked and what A got cover each offset once.
    let acked_all: Vec<Seen> = got_a.iter().chain(&b_acked).cloned().collect();
    assert_contiguous(&acked_all);
}

/// The group's committed position is stored with the stream: after a
/// restart the group resumes where it stopped, whatever x-stream-offset says.
#[tokio::test]
async fn group_offsets_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let w = WarrenProcess::start(&data);
    {
        let conn = Connection::connect(&w.url(), ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        for p in 0..2 {
            let q = format!("r-{p}");
            declare_stream(&ch, &q, &[]).await;
            publish_confirmed(&ch, &q, (0..20).map(|i| format!("{p}:{i}")), None).await;
        }
        let (_ch, mut rx) = join(&conn, "m", "r", 2, "g").await;
        // Ack offsets 0..7 on both partitions, hold the rest.
        let mut held = 0;
        while let Ok(Some((_, d))) =
            tokio::time::timeout(Duration::from_millis(500), rx.recv()).await
        {
            if offset_of(&d) < 7 {
                d.ack(BasicAckOptions::default()).await.unwrap();
            } else {
                held += 1;
            }
        }
        assert!(held > 0);
        conn.close(200, "bye".into()).await.ok();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    w.stop();
    let w = WarrenProcess::start(&data);
    let conn = Connection::connect(&w.url(), ConnectionProperties::default())
        .await
        .unwrap();
    let (_ch, mut rx) = join(&conn, "m2", "r", 2, "g").await;
    let mut got = Vec::new();
    within(
        20,
        take_acking(&mut rx, Duration::from_millis(600), &mut got),
    )
    .await;
    for p in 0..2 {
        let offs: Vec<i64> = got
            .iter()
            .filter(|s| s.partition == p)
            .map(|s| s.offset)
            .collect();
        assert_eq!(
            offs,
            (7..20).collect::<Vec<_>>(),
            "partition {p} resumed at 7"
        );
    }
    // Another group starts where its x-stream-offset says.
    let (_ch2, mut rx2) = join(&conn, "n", "r", 2, "other").await;
    let mut got2 = Vec::new();
    within(
        20,
        take_acking(&mut rx2, Duration::from_millis(600), &mut got2),
    )
    .await;
    assert_eq!(got2.len(), 40);
    drop(conn);
    w.stop();
}
