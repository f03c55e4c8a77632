//! Clusters of real Warren processes on loopback ports: formation,
//! quorum queue replication, leader failure, majority loss.

#[path = "../common/mod.rs"]
mod common;
#[path = "../common/process.rs"]
mod process;

mod classic;

use common::within;
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use process::WarrenProcess;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Cluster tests each run three or more broker processes: one at a time, so
/// a 2-core machine is not asked to run a dozen nodes at once.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A free port for a node to listen on, below Linux's ephemeral range
/// (32768-60999): a port the kernel hands out for port 0 can be taken by
/// another node's outgoing connection before the node that should listen
/// on it has started.
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    if NEXT.load(Ordering::Relaxed) == 0 {
        let seed = (std::process::id() as u64)
            .wrapping_mul(2654435761)
            .wrapping_add(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.subsec_nanos() as u64)
                    .unwrap_or(0),
            );
        let _ = NEXT.compare_exchange(
            0,
            20000 + (seed % 10000) as u16,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }
    loop {
        let p = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = 20000 + p.wrapping_sub(20000) % 12000;
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

struct Node {
    name: String,
    dir: PathBuf,
    args: Vec<String>,
    proc: Option<WarrenProcess>,
}

impl Node {
    fn start(&mut self) {
        let args: Vec<&str> = self.args.iter().map(String::as_str).collect();
        self.proc = Some(WarrenProcess::start_with(&self.dir, &args));
    }
    fn p(&self) -> &WarrenProcess {
        self.proc.as_ref().expect("node running")
    }
    fn kill(&mut self) {
        if let Some(p) = self.proc.take() {
            p.crash();
        }
    }
    async fn connect(&self) -> Connection {
        Connection::connect(&self.p().url(), ConnectionProperties::default())
            .await
            .expect("connect")
    }
    /// The management API address, from the node's log.
    fn mgmt(&self) -> String {
        let log = self.p().log_text();
        let i = log
            .rfind("management API listening on http://")
            .expect("mgmt line in log");
        log[i + "management API listening on http://".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .to_string()
    }
    async fn api(&self, path: &str) -> Value {
        let mut s = tokio::net::TcpStream::connect(self.mgmt()).await.unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let text = String::from_utf8_lossy(&buf);
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
        serde_json::from_str(body).unwrap_or(Value::Null)
    }
}

/// Starts `n` nodes that seed each other; waits until they formed a cluster.
async fn cluster(n: usize, tmp: &tempfile::TempDir) -> Vec<Node> {
    cluster_with(n, tmp, &[]).await
}

async fn cluster_with(n: usize, tmp: &tempfile::TempDir, extra: &[&str]) -> Vec<Node> {
    let ports: Vec<u16> = (0..n).map(|_| free_port()).collect();
    let mut nodes: Vec<Node> = (0..n)
        .map(|i| {
            let mut args = vec![
                "--node-name".to_string(),
                format!("warren@n{}", i + 1),
                "--cluster-port".into(),
                ports[i].to_string(),
                "--cluster-secret".into(),
                "test-cookie".into(),
            ];
            for (j, p) in ports.iter().enumerate() {
                if j != i {
                    args.push("--seed".into());
                    args.push(format!("127.0.0.1:{p}"));
                }
            }
            args.extend(extra.iter().map(|s| s.to_string()));
            Node {
                name: format!("warren@n{}", i + 1),
                dir: tmp.path().join(format!("n{}", i + 1)),
                args,
                proc: None,
            }
        })
        .collect();
    for node in nodes.iter_mut() {
        node.start();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = nodes[0].api("/api/cluster").await;
        let running = st["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|x| x["running"] == true).count())
            .unwrap_or(0);
        let leader = st["nodes"]
            .as_array()
            .map(|a| a.iter().any(|x| x["metadata_leader"] == true))
            .unwrap_or(false);
        if running == n && leader {
            break;
        }
        assert!(Instant::now() < deadline, "cluster did not form: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    nodes
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    t
}

async fn declare_quorum(conn: &Connection, name: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum_args(),
        )
        .await
        .unwrap();
    q.message_count()
}

async fn passive_count(conn: &Connection, name: &str) -> u32 {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap()
    .message_count()
}

/// The node name leading a quorum queue, as node `via` reports it.
async fn leader_of(via: &Node, queue: &str) -> Option<String> {
    let st = via.api("/api/cluster").await;
    st["quorum_queues"]
        .as_array()?
        .iter()
        .find(|q| q["name"] == queue)
        .and_then(|q| q["leader"].as_str().map(str::to_string))
}

async fn wait_leader(via: &Node, queue: &str, not: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(l) = leader_of(via, queue).await {
            if Some(l.as_str()) != not {
                return l;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no leader for {queue} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Publishes `n` persistent messages `{prefix}-{i}` to `queue` through the
/// default exchange with confirms, each confirmed before the next.
async fn publish_each_confirmed(ch: &lapin::Channel, queue: &str, prefix: &str, n: u32) {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..n {
        let conf = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                format!("{prefix}-{i}").as_bytes(),
                persistent(),
            )
            .await
            .unwrap();
        assert!(within(10, conf).await.unwrap().is_ack());
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_a_quorum_queue_and_serve_it_from_any_node() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    declare_quorum(&c1, "qq.orders").await;
    // The definition reaches every node (node 3 applies it once it hears
    // the commit).
    let deadline = Instant::now() + Duration::from_secs(10);
    let q = loop {
        let st = nodes[2].api("/api/cluster").await;
        let found = st["quorum_queues"]
            .as_array()
            .and_then(|a| a.iter().find(|q| q["name"] == "qq.orders").cloned());
        if let Some(q) = found {
            break q;
        }
        assert!(
            Instant::now() < deadline,
            "queue never known on node 3: {st}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(q["members"].as_array().unwrap().len(), 3, "{q}");
    // Publish on node 2 with confirms.
    let c2 = nodes[1].connect().await;
    let pch = c2.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..300u32 {
        let conf = pch
            .basic_publish(
                "".into(),
                "qq.orders".into(),
                BasicPublishOptions::default(),
                format!("order-{i}").as_bytes(),
                persistent(),
            )
            .await
            .unwrap();
        if i % 50 == 49 {
            assert!(within(10, conf).await.unwrap().is_ack());
        }
    }
    pch.wait_for_confirms().await.unwrap();
    // Counted on every node.
    for n in &nodes {
        let c = n.connect().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while passive_count(&c, "qq.orders").await != 300 {
            assert!(Instant::now() < deadline, "count on {}", n.name);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Consume on node 3, in order, exactly once.
    let c3 = nodes[2].connect().await;
    let cch = c3.create_channel().await.unwrap();
    cch.basic_qos(50, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "qq.orders".into(),
            "c3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 300 {
        let d = within(20, consumer.next()).await.unwrap().unwrap();
        got.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: Vec<String> = (0..300).map(|i| format!("order-{i}")).collect();
    assert_eq!(got, want);
    // Acks replicate: empty everywhere.
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive_count(&c1, "qq.orders").await != 0 {
        assert!(Instant::now() < deadline, "acks did not replicate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // warrenctl cluster_status shows members and the queue's leader.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args([
            "--url",
            &format!("http://{}", nodes[0].mgmt()),
            "cluster_status",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    for n in &nodes {
        assert!(text.contains(&n.name), "{text}");
    }
    assert!(text.contains("qq.orders\tleader=warren@n"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_loses_no_confirmed_message() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_quorum(&c, "qq.failover").await;
    drop(c);
    let leader = wait_leader(&nodes[0], "qq.failover", None).await;
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let (pi, ci) = (others[0], others[1]);
    // Consumer on one survivor, publisher on the other.
    let cc = nodes[ci].connect().await;
    let cch = cc.create_channel().await.unwrap();
    cch.basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            "qq.failover".into(),
            "failover-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let received = std::sync::Arc::new(std::sync::Mutex::new(BTreeMap::<u32, u32>::new()));
    let rec = received.clone();
    let consume_task = tokio::spawn(async move {
        while let Some(Ok(d)) = consumer.next().await {
            if let Ok(s) = std::str::from_utf8(&d.data) {
                if let Some(n) = s.strip_prefix("m-").and_then(|n| n.parse::<u32>().ok()) {
                    *rec.lock().unwrap().entry(n).or_insert(0) += 1;
                }
            }
            let _ = d.ack(BasicAckOptions::default()).await;
        }
    });
    let pc = nodes[pi].connect().await;
    let pch = pc.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut confirmed = BTreeSet::new();
    let mut nacked = 0u32;
    let mut killed_at = None;
    let started = Instant::now();
    let mut i = 0u32;
    while confirmed.len() < 1500 {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "publishing stalled: {} confirmed",
            confirmed.len()
        );
        // Windows of 50, each waited for.
        let mut window = Vec::new();
        for _ in 0..50 {
            let conf = pch
                .basic_publish(
                    "".into(),
                    "qq.failover".into(),
                    BasicPublishOptions::default(),
                    format!("m-{i}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            window.push((i, conf));
            i += 1;
        }
        for (n, conf) in window {
            match within(60, conf).await {
                Ok(c) if c.is_ack() => {
                    confirmed.insert(n);
                }
                _ => nacked += 1,
            }
        }
        if killed_at.is_none() && confirmed.len() >= 500 {
            nodes[li].kill();
            killed_at = Some(Instant::now());
        }
    }
    let failover = killed_at.unwrap().elapsed();
    let new_leader = wait_leader(&nodes[pi], "qq.failover", Some(&leader)).await;
    assert_ne!(new_leader, leader);
    // Everything confirmed reaches the consumer.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let missing = {
            let r = received.lock().unwrap();
            confirmed.iter().filter(|n| !r.contains_key(n)).count()
        };
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} confirmed messages never delivered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = received.lock().unwrap().clone();
    let dups: u32 = r.values().map(|c| c - 1).sum();
    println!(
        "leader {leader} killed; new leader {new_leader}; confirmed {}, nacked {nacked}, delivered {} distinct, {dups} duplicates; publishing resumed {:?} after the kill",
        confirmed.len(),
        r.len(),
        failover
    );
    consume_task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn majority_loss_stops_confirms_until_nodes_return() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_quorum(&c, "qq.majority").await;
    drop(c);
    let leader = wait_leader(&nodes[0], "qq.majority", None).await;
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let pc = nodes[li].connect().await;
    let pch = pc.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let ok = pch
        .basic_publish(
            "".into(),
            "qq.majority".into(),
            BasicPublishOptions::default(),
            b"before",
            persistent(),
        )
        .await
        .unwrap();
    assert!(within(10, ok).await.unwrap().is_ack());
    // Lose both followers: no majority, no confirm.
    for i in (0..3).filter(|i| *i != li) {
        nodes[i].kill();
    }
    let pending = pch
        .basic_publish(
            "".into(),
            "qq.majority".into(),
            BasicPublishOptions::default(),
            b"during",
            persistent(),
        )
        .await
        .unwrap();
    let mut pending = Box::pin(pending);
    let early = tokio::time::timeout(Duration::from_secs(3), &mut pending).await;
    assert!(early.is_err(), "confirmed without a majority: {early:?}");
    // The followers come back: the publish is confirmed, the queue serves.
    for i in (0..3).filter(|i| *i != li) {
        nodes[i].start();
    }
    let conf = within(60, pending).await.unwrap();
    let conn = nodes[li].connect().await;
    let n = passive_count(&conn, "qq.majority").await;
    if conf.is_ack() {
        assert_eq!(n, 2, "both messages are in the queue");
    } else {
        // A nack is allowed (the publisher must resend), a loss of the
        // confirmed one is not.
        assert!(n >= 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_a_replica_forwards_publishes_and_deliveries() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    let ch = c1.create_channel().await.unwrap();
    let mut args = quorum_args();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(2));
    ch.queue_declare(
        "qq.two".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let st = nodes[0].api("/api/cluster").await;
    let q = st["quorum_queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["name"] == "qq.two")
        .cloned()
        .unwrap();
    let members: Vec<String> = q["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "{q}");
    let outside = nodes
        .iter()
        .find(|n| !members.contains(&n.name))
        .expect("a node without a replica");
    let conn = outside.connect().await;
    let pch = conn.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..100u32 {
        pch.basic_publish(
            "".into(),
            "qq.two".into(),
            BasicPublishOptions::default(),
            format!("x-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    pch.wait_for_confirms().await.unwrap();
    let cch = conn.create_channel().await.unwrap();
    cch.basic_qos(20, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "qq.two".into(),
            "outside".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    // In order, each once — except that a leadership change may forward a
    // held delivery again (at-least-once), and then it says redelivered.
    let mut got: Vec<String> = Vec::new();
    let mut seen = BTreeSet::new();
    while seen.len() < 100 {
        let d = within(20, consumer.next()).await.unwrap().unwrap();
        let body = String::from_utf8(d.data.clone()).unwrap();
        if !seen.insert(body.clone()) {
            assert!(d.redelivered, "{body} delivered twice without redelivered");
        } else {
            got.push(body);
        }
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: Vec<String> = (0..100).map(|i| format!("x-{i}")).collect();
    assert_eq!(got, want);
    let member = nodes.iter().find(|n| members.contains(&n.name)).unwrap();
    let mc = member.connect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive_count(&mc, "qq.two").await != 0 {
        assert!(
            Instant::now() < deadline,
            "acks from the outside node did not apply"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_bound_the_log_a_lagging_node_installs_one_and_restarts_use_them() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let conf = tmp.path().join("small-snapshots.toml");
    // A small in-memory window: most of the backlog waits in the Raft
    // log (bodies read back from it after snapshots, installs, restarts).
    std::fs::write(
        &conf,
        "[cluster]\nsnapshot_min_entries = 100\n[queue]\nmax_in_memory = 20\n",
    )
    .unwrap();
    let mut nodes = cluster_with(3, &tmp, &["--config", conf.to_str().unwrap()]).await;
    let c = nodes[0].connect().await;
    declare_quorum(&c, "qq.snap").await;
    drop(c);
    let leader = wait_leader(&nodes[0], "qq.snap", None).await;
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let lagging = (li + 1) % 3;
    let other = (li + 2) % 3;
    async fn publish_each(node: &Node, from: u32, to: u32) {
        let conn = node.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        for i in from..to {
            let conf = ch
                .basic_publish(
                    "".into(),
                    "qq.snap".into(),
                    BasicPublishOptions::default(),
                    format!("s-{i}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            assert!(within(10, conf).await.unwrap().is_ack());
        }
    }
    async fn consume_n(node: &Node, n: usize) -> Vec<String> {
        let conn = node.connect().await;
        let ch = conn.create_channel().await.unwrap();
        let mut got = Vec::new();
        while got.len() < n {
            let m = ch
                .basic_get("qq.snap".into(), BasicGetOptions::default())
                .await
                .unwrap();
            let Some(m) = m else {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            got.push(String::from_utf8(m.delivery.data.clone()).unwrap());
            m.delivery.ack(BasicAckOptions::default()).await.unwrap();
        }
        got
    }
    publish_each(&nodes[li], 0, 400).await;
    let got = consume_n(&nodes[li], 300).await;
    assert_eq!(got, (0..300).map(|i| format!("s-{i}")).collect::<Vec<_>>());
    // Every replica snapshotted.
    let deadline = Instant::now() + Duration::from_secs(20);
    for n in &nodes {
        let dir = n.dir.join("raft-snapshots");
        while std::fs::read_dir(&dir).map(|d| d.count()).unwrap_or(0) == 0 {
            assert!(Instant::now() < deadline, "no snapshot on {}", n.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // A follower misses a lot: it comes back through a snapshot install.
    nodes[lagging].kill();
    publish_each(&nodes[li], 400, 900).await;
    let got = consume_n(&nodes[other], 400).await;
    assert_eq!(
        got,
        (300..700).map(|i| format!("s-{i}")).collect::<Vec<_>>()
    );
    nodes[lagging].start();
    let lc = nodes[lagging].connect().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passive_count(&lc, "qq.snap").await != 200 {
        assert!(
            Instant::now() < deadline,
            "the lagging node did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(lc);
    // Whole-cluster restart: state comes back from snapshots + the log tail.
    for n in nodes.iter_mut() {
        n.kill();
    }
    for n in nodes.iter_mut() {
        n.start();
    }
    // Counts are each replica's applied state: right once the new leader
    // has committed its first entry.
    let c = nodes[lagging].connect().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passive_count(&c, "qq.snap").await != 200 {
        assert!(Instant::now() < deadline, "count after restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(c);
    let got = consume_n(&nodes[lagging], 200).await;
    assert_eq!(
        got,
        (700..900).map(|i| format!("s-{i}")).collect::<Vec<_>>()
    );
    for n in &nodes {
        let log = n.p().log_text();
        assert!(
            !log.contains("could not be read back"),
            "{}: a paged-out body was not found in the log:\n{log}",
            n.name
        );
    }
}

/// Jepsen-style: random SIGKILLs and restarts of nodes while a publisher
/// (confirms) and a consumer (manual acks) keep working, each reconnecting
/// to another node when theirs dies. At the end every confirmed message
/// must have been delivered at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_kills_and_restarts_lose_no_confirmed_message() {
    let _serial = SERIAL.lock().await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_quorum(&c, "qq.chaos").await;
    drop(c);
    let urls: Arc<Vec<std::sync::Mutex<Option<String>>>> = Arc::new(
        nodes
            .iter()
            .map(|n| std::sync::Mutex::new(Some(n.p().url())))
            .collect(),
    );
    let nodes = Arc::new(tokio::sync::Mutex::new(nodes));
    let stop = Arc::new(AtomicBool::new(false));
    async fn connect_any(urls: &[std::sync::Mutex<Option<String>>], start: usize) -> Connection {
        let mut k = start;
        loop {
            let url = urls[k % urls.len()].lock().unwrap().clone();
            if let Some(u) = url {
                if let Ok(Ok(c)) = tokio::time::timeout(
                    Duration::from_secs(3),
                    Connection::connect(&u, ConnectionProperties::default()),
                )
                .await
                {
                    return c;
                }
            }
            k += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Publisher: windows of 20, retried until confirmed (at least once).
    let confirmed = Arc::new(std::sync::Mutex::new(BTreeSet::<u32>::new()));
    let pub_task = {
        let (urls, stop, confirmed) = (urls.clone(), stop.clone(), confirmed.clone());
        tokio::spawn(async move {
            let mut next = 0u32;
            let mut retry: Vec<u32> = Vec::new();
            let mut k = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let conn = connect_any(&urls, k).await;
                k += 1;
                let Ok(ch) = conn.create_channel().await else {
                    continue;
                };
                if ch
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .is_err()
                {
                    continue;
                }
                'session: while !stop.load(Ordering::Relaxed) {
                    let mut batch: Vec<u32> = retry.drain(..).collect();
                    while batch.len() < 20 {
                        batch.push(next);
                        next += 1;
                    }
                    let mut pending = Vec::new();
                    for (pos, id) in batch.iter().enumerate() {
                        match ch
                            .basic_publish(
                                "".into(),
                                "qq.chaos".into(),
                                BasicPublishOptions::default(),
                                format!("c-{id}").as_bytes(),
                                persistent(),
                            )
                            .await
                        {
                            Ok(p) => pending.push((*id, p)),
                            Err(_) => {
                                retry.extend(batch[pos..].iter().copied());
                                break 'session;
                            }
                        }
                    }
                    let mut broken = false;
                    for (id, p) in pending {
                        match tokio::time::timeout(Duration::from_secs(15), p).await {
                            Ok(Ok(c)) if c.is_ack() => {
                                confirmed.lock().unwrap().insert(id);
                            }
                            _ => {
                                retry.push(id);
                                broken = true;
                            }
                        }
                    }
                    if broken {
                        break 'session;
                    }
                }
                let _ = tokio::time::timeout(Duration::from_secs(1), conn.close(200, "bye".into()))
                    .await;
            }
        })
    };
    // Consumer: acks what it receives, records ids.
    let received = Arc::new(std::sync::Mutex::new(BTreeMap::<u32, u32>::new()));
    let con_task = {
        let (urls, received) = (urls.clone(), received.clone());
        tokio::spawn(async move {
            let mut k = 1usize;
            loop {
                let conn = connect_any(&urls, k).await;
                k += 1;
                let Ok(ch) = conn.create_channel().await else {
                    continue;
                };
                let _ = ch.basic_qos(50, BasicQosOptions::default()).await;
                let Ok(mut consumer) = ch
                    .basic_consume(
                        "qq.chaos".into(),
                        "".into(),
                        BasicConsumeOptions::default(),
                        FieldTable::default(),
                    )
                    .await
                else {
                    continue;
                };
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
                        Ok(Some(Ok(d))) => {
                            if let Some(n) = std::str::from_utf8(&d.data)
                                .ok()
                                .and_then(|s| s.strip_prefix("c-"))
                                .and_then(|n| n.parse::<u32>().ok())
                            {
                                *received.lock().unwrap().entry(n).or_insert(0) += 1;
                            }
                            if d.ack(BasicAckOptions::default()).await.is_err() {
                                break;
                            }
                        }
                        Ok(_) => break,
                        Err(_) => {
                            // Quiet for 5 s: make sure the connection is alive.
                            if !conn.status().connected() {
                                break;
                            }
                        }
                    }
                }
            }
        })
    };
    // Chaos: for ~30 s, kill a random node, wait, restart it.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let chaos_start = Instant::now();
    let mut kills = 0;
    while chaos_start.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(2000 + rnd(2000))).await;
        let victim = rnd(3) as usize;
        {
            let mut ns = nodes.lock().await;
            *urls[victim].lock().unwrap() = None;
            ns[victim].kill();
        }
        kills += 1;
        tokio::time::sleep(Duration::from_millis(1500 + rnd(2500))).await;
        {
            let mut ns = nodes.lock().await;
            let n = &mut ns[victim];
            tokio::task::block_in_place(|| n.start());
            *urls[victim].lock().unwrap() = Some(n.p().url());
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(60), pub_task).await;
    // Drain: every confirmed id must arrive.
    let confirmed = confirmed.lock().unwrap().clone();
    assert!(
        confirmed.len() > 100,
        "too little got through: {}",
        confirmed.len()
    );
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let missing: Vec<u32> = {
            let r = received.lock().unwrap();
            confirmed
                .iter()
                .filter(|n| !r.contains_key(n))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} confirmed messages never delivered (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(10)]
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    con_task.abort();
    let r = received.lock().unwrap().clone();
    let dups: u32 = r.values().map(|c| c - 1).sum();
    println!(
        "chaos: {kills} kills in 30 s; {} confirmed, all delivered; {} distinct delivered, {dups} duplicate deliveries",
        confirmed.len(),
        r.len()
    );
}

/// A TCP proxy that can cut every connection through it (and refuse new
/// ones) until healed.
struct Proxy {
    port: u16,
    cut: tokio::sync::watch::Sender<bool>,
}

async fn proxy(target: u16) -> Proxy {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let (cut, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = l.accept().await else {
                return;
            };
            if *rx.borrow() {
                continue; // dropped: refused while cut
            }
            let mut rx2 = rx.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = rx2.wait_for(|c| *c) => {}
                }
            });
        }
    });
    Proxy { port, cut }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_leader_is_replaced_and_catches_up_after_healing() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
    // proxies[i][j]: how node i reaches node j.
    let mut proxies: Vec<Vec<Option<Proxy>>> = Vec::new();
    for i in 0..3 {
        let mut row = Vec::new();
        for (j, p) in ports.iter().enumerate() {
            row.push(if i == j { None } else { Some(proxy(*p).await) });
        }
        proxies.push(row);
    }
    let mut nodes: Vec<Node> = Vec::new();
    for i in 0..3 {
        let mut overrides = Vec::new();
        let mut args = vec![
            "--node-name".to_string(),
            format!("warren@n{}", i + 1),
            "--cluster-port".into(),
            ports[i].to_string(),
            "--cluster-secret".into(),
            "test-cookie".into(),
        ];
        for j in 0..3 {
            if let Some(p) = &proxies[i][j] {
                overrides.push(format!("\"127.0.0.1:{}=127.0.0.1:{}\"", ports[j], p.port));
                args.push("--seed".into());
                args.push(format!("127.0.0.1:{}", p.port));
            }
        }
        let conf = tmp.path().join(format!("n{}.toml", i + 1));
        std::fs::write(
            &conf,
            format!("[cluster]\ndial_overrides = [{}]\n", overrides.join(", ")),
        )
        .unwrap();
        args.push("--config".into());
        args.push(conf.to_str().unwrap().to_string());
        let mut n = Node {
            name: format!("warren@n{}", i + 1),
            dir: tmp.path().join(format!("n{}", i + 1)),
            args,
            proc: None,
        };
        n.start();
        nodes.push(n);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = nodes[0].api("/api/cluster").await;
        let running = st["nodes"]
            .as_array()
            .map(|a| a.iter().filter(|x| x["running"] == true).count())
            .unwrap_or(0);
        if running == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "cluster did not form: {st}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = nodes[0].connect().await;
    declare_quorum(&c, "qq.part").await;
    drop(c);
    let leader = wait_leader(&nodes[0], "qq.part", None).await;
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let ai = (li + 1) % 3;
    let conn = nodes[ai].connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let publish = |from: u32, to: u32| {
        let ch = ch.clone();
        async move {
            for i in from..to {
                let conf = ch
                    .basic_publish(
                        "".into(),
                        "qq.part".into(),
                        BasicPublishOptions::default(),
                        format!("p-{i}").as_bytes(),
                        persistent(),
                    )
                    .await
                    .unwrap();
                assert!(within(30, conf).await.unwrap().is_ack(), "message {i}");
            }
        }
    };
    publish(0, 200).await;
    // Cut the leader off from both other nodes, both ways.
    for j in 0..3 {
        if let Some(p) = &proxies[li][j] {
            p.cut.send_replace(true);
        }
        if let Some(p) = &proxies[j][li] {
            p.cut.send_replace(true);
        }
    }
    // The majority side elects a new leader and keeps confirming.
    publish(200, 500).await;
    let new_leader = wait_leader(&nodes[ai], "qq.part", Some(&leader)).await;
    assert_ne!(new_leader, leader);
    // Heal: the old leader catches up (its replica counts all 500).
    for row in &proxies {
        for p in row.iter().flatten() {
            p.cut.send_replace(false);
        }
    }
    let lc = nodes[li].connect().await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while passive_count(&lc, "qq.part").await != 500 {
        assert!(
            Instant::now() < deadline,
            "the healed node did not catch up: {}",
            passive_count(&lc, "qq.part").await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // And serves them, in order, from its own replica.
    let cch = lc.create_channel().await.unwrap();
    cch.basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = cch
        .basic_consume(
            "qq.part".into(),
            "healed".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 500 {
        let d = within(30, consumer.next()).await.unwrap().unwrap();
        got.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_eq!(got, (0..500).map(|i| format!("p-{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_made_on_one_node_reach_every_node() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    // Exchange + quorum queue + binding declared over AMQP on node 1.
    let c1 = nodes[0].connect().await;
    let ch = c1.create_channel().await.unwrap();
    ch.exchange_declare(
        "orders".into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_quorum(&c1, "qq.eu-orders").await;
    ch.queue_bind(
        "qq.eu-orders".into(),
        "orders".into(),
        "eu.#".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    // A user made on node 2 through warrenctl.
    let ctl = |node: &Node, args: &[&str]| {
        let url = format!("http://{}", node.mgmt());
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"));
        cmd.args(["--url", url.as_str()]).args(args);
        cmd
    };
    let out = ctl(&nodes[1], &["add_user", "carol", "s3cret"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = ctl(
        &nodes[1],
        &["set_permissions", "-p", "/", "carol", ".*", ".*", ".*"],
    )
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Node 3: carol can log in, publishes through the replicated exchange
    // and binding, and the message lands in the quorum queue.
    let url3 = format!("amqp://carol:s3cret@{}/%2f", nodes[2].p().addr);
    let deadline = Instant::now() + Duration::from_secs(20);
    let c3 = loop {
        match Connection::connect(&url3, ConnectionProperties::default()).await {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "carol cannot log in on node 3: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let ch3 = c3.create_channel().await.unwrap();
    ch3.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Mandatory: returned until the binding exists on node 3.
        let conf = ch3
            .basic_publish(
                "orders".into(),
                "eu.de.new".into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"order for Berlin",
                persistent(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if conf.is_ack() && conf.take_message().is_none() {
            break;
        }
        assert!(Instant::now() < deadline, "binding never reached node 3");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive_count(&c1, "qq.eu-orders").await != 1 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Deleting the exchange on node 3 removes it on node 1.
    ch3.exchange_delete("orders".into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = nodes[0].api("/api/exchanges/%2f/orders").await;
        if v.get("error").is_some() {
            break;
        }
        assert!(Instant::now() < deadline, "exchange still on node 1: {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_member_and_delete_member_move_replicas() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    let ch = c1.create_channel().await.unwrap();
    let mut args = quorum_args();
    args.insert("x-quorum-initial-group-size".into(), AMQPValue::LongInt(2));
    ch.queue_declare(
        "qq.grow".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..100u32 {
        ch.basic_publish(
            "".into(),
            "qq.grow".into(),
            BasicPublishOptions::default(),
            format!("g-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    ch.wait_for_confirms().await.unwrap();
    drop(ch);
    drop(c1);
    let members = |st: &Value| -> Vec<String> {
        st["quorum_queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "qq.grow")
            .unwrap()["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap().to_string())
            .collect()
    };
    let before = members(&nodes[0].api("/api/cluster").await);
    assert_eq!(before.len(), 2);
    let outside = nodes
        .iter()
        .position(|n| !before.contains(&n.name))
        .unwrap();
    let ctl = |node: &Node, args: &[&str]| {
        let url = format!("http://{}", node.mgmt());
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"));
        cmd.args(["--url", url.as_str()]).args(args);
        cmd
    };
    let out = ctl(&nodes[0], &["add_member", "qq.grow", &nodes[outside].name])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let after = members(&nodes[0].api("/api/cluster").await);
    assert_eq!(after.len(), 3, "{after:?}");
    // The new replica caught up: it counts the backlog itself.
    let oc = nodes[outside].connect().await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while passive_count(&oc, "qq.grow").await != 100 {
        assert!(Instant::now() < deadline, "new replica did not catch up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(oc);
    // With three replicas, losing one original keeps the queue serving.
    let victim = nodes.iter().position(|n| n.name == before[0]).unwrap();
    nodes[victim].kill();
    let alive = (0..3).find(|i| *i != victim && *i != outside).unwrap();
    let conn = nodes[alive].connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let conf = ch
        .basic_publish(
            "".into(),
            "qq.grow".into(),
            BasicPublishOptions::default(),
            b"after-kill",
            persistent(),
        )
        .await
        .unwrap();
    assert!(within(30, conf).await.unwrap().is_ack());
    nodes[victim].start();
    // Shrink back: remove the replica on the node we added.
    let out = ctl(
        &nodes[alive],
        &["delete_member", "qq.grow", &nodes[outside].name],
    )
    .output()
    .await
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    let last = members(&nodes[alive].api("/api/cluster").await);
    assert_eq!(last.len(), 2, "{last:?}");
    assert!(!last.contains(&nodes[outside].name));
    // Still serves all 101 from the node without a replica.
    let oc = nodes[outside].connect().await;
    let och = oc.create_channel().await.unwrap();
    let mut n = 0;
    let deadline = Instant::now() + Duration::from_secs(30);
    while n < 101 {
        assert!(Instant::now() < deadline, "got {n} of 101");
        match och
            .basic_get("qq.grow".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            Some(_) => n += 1,
            None => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------
// Replicated streams

fn stream_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    t
}

async fn declare_stream(conn: &Connection, name: &str) {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        stream_args(),
    )
    .await
    .unwrap();
}

/// The stream's entry in `/api/cluster` on `via`, once it is there.
async fn stream_status(via: &Node, name: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let st = via.api("/api/cluster").await;
        if let Some(s) = st["streams"]
            .as_array()
            .and_then(|a| a.iter().find(|s| s["name"] == name).cloned())
        {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "stream {name} unknown on {}: {st}",
            via.name
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads a stream from offset "first" on `node` until `want` messages or
/// `quiet` without a delivery (bounded by `limit`): (offset, body).
async fn read_stream(
    node: &Node,
    name: &str,
    want: usize,
    quiet: Duration,
    limit: Duration,
) -> Vec<(i64, String)> {
    let deadline = Instant::now() + limit;
    let conn = node.connect().await;
    // The stream reaches a restarted node when it replays the metadata log.
    let mut consumer = loop {
        let ch = conn.create_channel().await.unwrap();
        ch.basic_qos(500, BasicQosOptions::default()).await.unwrap();
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            AMQPValue::LongString("first".into()),
        );
        match ch
            .basic_consume(name.into(), "".into(), BasicConsumeOptions::default(), args)
            .await
        {
            Ok(c) => break c,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "cannot consume {name} on {}: {e}",
                    node.name
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut out = Vec::new();
    while out.len() < want && Instant::now() < deadline {
        let d = match tokio::time::timeout(quiet, consumer.next()).await {
            Ok(Some(Ok(d))) => d,
            _ => break,
        };
        let off = d
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-stream-offset").cloned());
        let off = match off {
            Some(AMQPValue::LongLongInt(o)) => o,
            other => panic!("delivery without x-stream-offset: {other:?}"),
        };
        out.push((off, String::from_utf8_lossy(&d.data).to_string()));
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    out
}

/// Publishes `ids` with confirms in windows of `window`: returns the ids
/// confirmed and the number of nacks (or unanswered publishes).
async fn publish_confirmed(
    ch: &lapin::Channel,
    queue: &str,
    ids: impl Iterator<Item = u32>,
    window: usize,
) -> (Vec<u32>, u32) {
    let mut ok = Vec::new();
    let mut nacked = 0;
    let ids: Vec<u32> = ids.collect();
    for w in ids.chunks(window) {
        let mut pending = Vec::new();
        for i in w {
            let conf = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions::default(),
                    format!("s-{i}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            pending.push((*i, conf));
        }
        for (i, conf) in pending {
            match tokio::time::timeout(Duration::from_secs(20), conf).await {
                Ok(Ok(c)) if c.is_ack() => ok.push(i),
                _ => nacked += 1,
            }
        }
    }
    (ok, nacked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_replicated_declare_publish_and_consume_from_any_node() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    declare_stream(&c1, "st.orders").await;
    let st = stream_status(&nodes[2], "st.orders").await;
    assert_eq!(st["members"].as_array().unwrap().len(), 3, "{st}");
    assert!(st["leader"].is_string(), "{st}");
    // Redeclare on another node: idempotent; a different type is refused.
    let c3 = nodes[2].connect().await;
    declare_stream(&c3, "st.orders").await;
    let ch = c3.create_channel().await.unwrap();
    let err = ch
        .queue_declare(
            "st.orders".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum_args(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("inequivalent arg"), "{err}");
    // Publish on node 2 with confirms.
    let c2 = nodes[1].connect().await;
    let pch = c2.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, nacked) = publish_confirmed(&pch, "st.orders", 0..1000, 100).await;
    assert_eq!((ok.len(), nacked), (1000, 0));
    // Same messages at the same offsets on node 3 and node 1.
    let want: Vec<(i64, String)> = (0..1000).map(|i| (i, format!("s-{i}"))).collect();
    for n in [&nodes[2], &nodes[0]] {
        let got = read_stream(
            n,
            "st.orders",
            1000,
            Duration::from_secs(5),
            Duration::from_secs(20),
        )
        .await;
        assert_eq!(got.len(), 1000, "on {}", n.name);
        assert!(got == want, "different log on {}", n.name);
    }
    // The queue object shows the replicas; warrenctl lists the stream.
    let q = nodes[0].api("/api/queues/%2F/st.orders").await;
    assert_eq!(q["type"], "stream", "{q}");
    assert_eq!(q["members"].as_array().map(Vec::len), Some(3), "{q}");
    assert_eq!(q["online"].as_array().map(Vec::len), Some(3), "{q}");
    assert_eq!(q["leader"], st["leader"], "{q}");
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args([
            "--url",
            &format!("http://{}", nodes[1].mgmt()),
            "cluster_status",
        ])
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "st.orders\tleader={}",
            st["leader"].as_str().unwrap()
        )),
        "{text}"
    );
    assert!(text.contains("followers=warren@n"), "{text}");
    // Delete on node 2: gone everywhere.
    let dch = c2.create_channel().await.unwrap();
    dch.queue_delete("st.orders".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    for n in &nodes {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let c = n.connect().await;
            let ch = c.create_channel().await.unwrap();
            let gone = ch
                .queue_declare(
                    "st.orders".into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .is_err();
            if gone {
                break;
            }
            assert!(Instant::now() < deadline, "stream still on {}", n.name);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_killed_under_confirmed_load_loses_nothing_confirmed() {
    let _serial = SERIAL.lock().await;
    let started = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_stream(&c, "st.failover").await;
    drop(c);
    let st = stream_status(&nodes[0], "st.failover").await;
    let leader = st["leader"].as_str().unwrap().to_string();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let survivors: Vec<usize> = (0..3).filter(|i| *i != li).collect();
    let pc = nodes[survivors[0]].connect().await;
    let pch = pc.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    // Publish on a survivor (forwarded to the leader); kill the leader
    // once 1,500 are confirmed; republish whatever was not confirmed.
    let mut confirmed: BTreeSet<u32> = BTreeSet::new();
    let mut nacked = 0u32;
    let mut republished = 0u32;
    let mut killed_at = None;
    let mut resumed_after = None;
    let mut next = 0u32;
    let mut retry: Vec<u32> = Vec::new();
    while confirmed.len() < 4000 {
        assert!(
            started.elapsed() < Duration::from_secs(50),
            "publishing stalled: {} confirmed",
            confirmed.len()
        );
        let mut ids: Vec<u32> = std::mem::take(&mut retry);
        republished += ids.len() as u32;
        while ids.len() < 100 {
            ids.push(next);
            next += 1;
        }
        let mut pending = Vec::new();
        for i in &ids {
            let conf = pch
                .basic_publish(
                    "".into(),
                    "st.failover".into(),
                    BasicPublishOptions::default(),
                    format!("s-{i}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            pending.push((*i, conf));
        }
        let mut window_nacks = 0;
        for (i, conf) in pending {
            match tokio::time::timeout(Duration::from_secs(20), conf).await {
                Ok(Ok(c)) if c.is_ack() => {
                    confirmed.insert(i);
                }
                _ => {
                    window_nacks += 1;
                    retry.push(i);
                }
            }
        }
        nacked += window_nacks;
        if window_nacks > 0 {
            tokio::time::sleep(Duration::from_millis(200)).await;
        } else if killed_at.is_some() && resumed_after.is_none() {
            resumed_after = killed_at.map(|k: Instant| k.elapsed());
        }
        if killed_at.is_none() && confirmed.len() >= 1500 {
            nodes[li].kill();
            killed_at = Some(Instant::now());
        }
    }
    let st = stream_status(&nodes[survivors[0]], "st.failover").await;
    let new_leader = st["leader"].as_str().unwrap().to_string();
    assert_ne!(new_leader, leader, "{st}");
    // Every survivor serves the same log: every confirmed message, offsets
    // contiguous from 0.
    let mut logs = Vec::new();
    for &i in &survivors {
        let got = read_stream(
            &nodes[i],
            "st.failover",
            usize::MAX,
            Duration::from_secs(3),
            Duration::from_secs(20),
        )
        .await;
        for (k, (off, _)) in got.iter().enumerate() {
            assert_eq!(
                *off, k as i64,
                "offsets not contiguous on {}",
                nodes[i].name
            );
        }
        let ids: Vec<u32> = got
            .iter()
            .map(|(_, b)| {
                b.strip_prefix("s-")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or_else(|| panic!("corrupt body {b:?} on {}", nodes[i].name))
            })
            .collect();
        let distinct: BTreeSet<u32> = ids.iter().copied().collect();
        let missing = confirmed.difference(&distinct).count();
        assert_eq!(
            missing, 0,
            "{missing} confirmed messages missing on {}",
            nodes[i].name
        );
        logs.push((
            nodes[i].name.clone(),
            got.len(),
            ids.len() - distinct.len(),
            ids,
        ));
    }
    assert!(logs[0].3 == logs[1].3, "the survivors' logs differ");
    // The old leader comes back as a follower: its unconfirmed tail is
    // cut and it copies the new leader's log.
    nodes[li].start();
    let back = read_stream(
        &nodes[li],
        "st.failover",
        logs[0].1,
        Duration::from_secs(5),
        Duration::from_secs(25),
    )
    .await;
    let back_ids: Vec<u32> = back
        .iter()
        .map(|(_, b)| {
            b.strip_prefix("s-")
                .and_then(|n| n.parse().ok())
                .unwrap_or(u32::MAX)
        })
        .collect();
    assert_eq!(
        back.len(),
        logs[0].1,
        "the old leader serves {} messages",
        back.len()
    );
    assert!(
        back_ids == logs[0].3,
        "the old leader's log differs from the survivors'"
    );
    let st = stream_status(&nodes[li], "st.failover").await;
    assert_eq!(st["leader"].as_str(), Some(new_leader.as_str()), "{st}");
    let cut = nodes[li]
        .p()
        .log_text()
        .matches("cut back to where its log matches the leader's")
        .count();
    println!("old leader {leader}: its log was cut back {cut} time(s) after the restart");
    println!(
        "stream leader {leader} killed after 1500 confirms; new leader {new_leader}; confirmed {}, nacked/unanswered {nacked}, republished {republished}; log {} messages on each survivor and on the restarted old leader, {} duplicates; confirms resumed {:?} after the kill; test took {:?}",
        confirmed.len(),
        logs[0].1,
        logs[0].2,
        resumed_after,
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_follower_restarted_catches_up_and_serves_the_full_log() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_stream(&c, "st.catchup").await;
    let st = stream_status(&nodes[0], "st.catchup").await;
    let leader = st["leader"].as_str().unwrap().to_string();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let fi = (0..3).find(|i| *i != li).unwrap();
    let pi = (0..3).find(|i| *i != li && *i != fi).unwrap();
    let pc = nodes[pi].connect().await;
    let pch = pc.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, _) = publish_confirmed(&pch, "st.catchup", 0..300, 100).await;
    assert_eq!(ok.len(), 300);
    nodes[fi].kill();
    // A majority (leader + one follower) still confirms.
    let (ok, nacked) = publish_confirmed(&pch, "st.catchup", 300..2000, 100).await;
    assert_eq!((ok.len(), nacked), (1700, 0));
    nodes[fi].start();
    let got = read_stream(
        &nodes[fi],
        "st.catchup",
        2000,
        Duration::from_secs(10),
        Duration::from_secs(30),
    )
    .await;
    let want: Vec<(i64, String)> = (0..2000).map(|i| (i, format!("s-{i}"))).collect();
    assert_eq!(
        got.len(),
        2000,
        "restarted follower serves {} messages",
        got.len()
    );
    assert!(got == want, "the restarted follower's log differs");
}

/// A test CA and a node certificate it signed (for 127.0.0.1/localhost, good
/// for both ends of a connection), written as PEM files under `dir` with
/// the given prefix; returns the config file naming them.
fn node_pki(dir: &std::path::Path, prefix: &str) -> PathBuf {
    use rcgen::{
        BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair, KeyUsagePurpose,
    };
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("{prefix} cluster CA"));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    p.distinguished_name.push(DnType::CommonName, "warren node");
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let cert = p.signed_by(&key, &ca).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let f = |n: &str| dir.join(format!("{prefix}-{n}"));
    std::fs::write(f("ca.pem"), ca.pem()).unwrap();
    std::fs::write(f("node.pem"), cert.pem()).unwrap();
    std::fs::write(f("node.key"), key.serialize_pem()).unwrap();
    let conf = f("cluster-tls.toml");
    std::fs::write(
        &conf,
        format!(
            "[cluster]\ntls_cert_file = {:?}\ntls_key_file = {:?}\ntls_ca_file = {:?}\n",
            f("node.pem"),
            f("node.key"),
            f("ca.pem")
        ),
    )
    .unwrap();
    conf
}

/// With cluster.tls_* set, nodes talk mutual TLS: the cluster forms and a
/// quorum queue replicates over it; a node whose certificate comes from
/// another CA is refused (the cluster secret alone does not let it in).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_talk_mutual_tls_and_refuse_a_certificate_from_another_ca() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let good = node_pki(&tmp.path().join("pki"), "good");
    let rogue = node_pki(&tmp.path().join("pki"), "rogue");
    let nodes = cluster_with(3, &tmp, &["--config", good.to_str().unwrap()]).await;
    for n in &nodes {
        assert!(
            n.p().log_text().contains("inter-node connections use TLS"),
            "{} did not enable TLS",
            n.name
        );
    }
    let c1 = nodes[0].connect().await;
    declare_quorum(&c1, "qq.tls").await;
    let c2 = nodes[1].connect().await;
    let ch = c2.create_channel().await.unwrap();
    publish_each_confirmed(&ch, "qq.tls", "t", 50).await;
    let c3 = nodes[2].connect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive_count(&c3, "qq.tls").await != 50 {
        assert!(Instant::now() < deadline, "replica on node 3 not caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A node with the right secret but a certificate from another CA.
    let seed = nodes[0]
        .args
        .iter()
        .position(|a| a == "--cluster-port")
        .map(|i| nodes[0].args[i + 1].clone())
        .unwrap();
    let mut stranger = Node {
        name: "warren@rogue".into(),
        dir: tmp.path().join("rogue"),
        args: vec![
            "--node-name".into(),
            "warren@rogue".into(),
            "--cluster-port".into(),
            free_port().to_string(),
            "--cluster-secret".into(),
            "test-cookie".into(),
            "--seed".into(),
            format!("127.0.0.1:{seed}"),
            "--config".into(),
            rogue.to_str().unwrap().into(),
        ],
        proc: None,
    };
    stranger.start();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !nodes[0].p().log_text().contains("TLS failed") {
        assert!(
            Instant::now() < deadline,
            "node 1 never refused the rogue node's TLS:\n{}",
            nodes[0].p().log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = nodes[0].api("/api/cluster").await;
    let names: Vec<&str> = st["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|n| n["name"].as_str())
        .collect();
    assert!(!names.contains(&"warren@rogue"), "{st}");
    stranger.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_on_a_node_without_a_replica_is_read_from_the_leader() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    let ch = c1.create_channel().await.unwrap();
    let mut args = stream_args();
    args.insert("x-initial-cluster-size".into(), AMQPValue::LongInt(2));
    ch.queue_declare(
        "st.remote".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let st = stream_status(&nodes[0], "st.remote").await;
    let members: Vec<String> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap().to_string())
        .collect();
    assert_eq!(members.len(), 2, "{st}");
    let oi = nodes
        .iter()
        .position(|n| !members.contains(&n.name))
        .unwrap();
    // Publish on the node without a replica (forwarded), with confirms.
    let oc = nodes[oi].connect().await;
    let pch = oc.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, nacked) = publish_confirmed(&pch, "st.remote", 0..500, 100).await;
    assert_eq!((ok.len(), nacked), (500, 0));
    // Read it there: chunks come from the leader.
    let got = read_stream(
        &nodes[oi],
        "st.remote",
        500,
        Duration::from_secs(5),
        Duration::from_secs(20),
    )
    .await;
    let want: Vec<(i64, String)> = (0..500).map(|i| (i, format!("s-{i}"))).collect();
    assert!(got == want, "remote read differs: {} messages", got.len());
    // A live consumer there gets new messages as they are committed.
    let cch = oc.create_channel().await.unwrap();
    cch.basic_qos(100, BasicQosOptions::default())
        .await
        .unwrap();
    let mut cargs = FieldTable::default();
    cargs.insert("x-stream-offset".into(), AMQPValue::LongLongInt(490));
    let mut consumer = cch
        .basic_consume(
            "st.remote".into(),
            "live".into(),
            BasicConsumeOptions::default(),
            cargs,
        )
        .await
        .unwrap();
    let (ok, _) = publish_confirmed(&pch, "st.remote", 500..520, 20).await;
    assert_eq!(ok.len(), 20);
    let mut seen = Vec::new();
    while seen.len() < 30 {
        let d = within(10, consumer.next()).await.unwrap().unwrap();
        seen.push(String::from_utf8_lossy(&d.data).to_string());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: Vec<String> = (490..520).map(|i| format!("s-{i}")).collect();
    assert_eq!(seen, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_survives_a_whole_cluster_crash_and_restart() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    declare_stream(&c, "st.restart").await;
    stream_status(&nodes[2], "st.restart").await;
    let pch = c.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, _) = publish_confirmed(&pch, "st.restart", 0..1000, 100).await;
    assert_eq!(ok.len(), 1000);
    drop(pch);
    drop(c);
    for n in nodes.iter_mut() {
        n.kill();
    }
    for n in nodes.iter_mut() {
        n.start();
    }
    // Every confirmed message, on every node, without publishing more.
    let want: Vec<(i64, String)> = (0..1000).map(|i| (i, format!("s-{i}"))).collect();
    for n in &nodes {
        let got = read_stream(
            n,
            "st.restart",
            1000,
            Duration::from_secs(8),
            Duration::from_secs(30),
        )
        .await;
        if got.len() != 1000 {
            for m in &nodes {
                for line in m.p().log_text().lines().filter(|l| l.contains("stream")) {
                    eprintln!("{}: {line}", m.name);
                }
            }
        }
        assert_eq!(
            got.len(),
            1000,
            "{} serves {} after the restart",
            n.name,
            got.len()
        );
        assert!(got == want, "{} serves a different log", n.name);
    }
    // And it takes new messages after the old ones.
    let c = nodes[1].connect().await;
    let pch = c.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, _) = publish_confirmed(&pch, "st.restart", 1000..1100, 100).await;
    assert_eq!(ok.len(), 100);
    let got = read_stream(
        &nodes[2],
        "st.restart",
        1100,
        Duration::from_secs(5),
        Duration::from_secs(20),
    )
    .await;
    let want: Vec<(i64, String)> = (0..1100).map(|i| (i, format!("s-{i}"))).collect();
    assert!(got == want, "after the restart: {} messages", got.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_follower_behind_retention_restarts_at_the_leaders_first_offset() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    let c = nodes[0].connect().await;
    let ch = c.create_channel().await.unwrap();
    let mut args = stream_args();
    args.insert(
        "x-stream-max-segment-size-bytes".into(),
        AMQPValue::LongInt(20_000),
    );
    args.insert("x-max-length-bytes".into(), AMQPValue::LongInt(60_000));
    ch.queue_declare(
        "st.retention".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let st = stream_status(&nodes[0], "st.retention").await;
    let leader = st["leader"].as_str().unwrap().to_string();
    let li = nodes.iter().position(|n| n.name == leader).unwrap();
    let fi = (0..3).find(|i| *i != li).unwrap();
    let pch = nodes[li].connect().await.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let (ok, _) = publish_confirmed(&pch, "st.retention", 0..100, 100).await;
    assert_eq!(ok.len(), 100);
    nodes[fi].kill();
    // ~1 KB messages: far more than the 60 kB kept, in many segments.
    let pad = "x".repeat(1000);
    let mut confirmed = 0;
    for w in 0..10u32 {
        let mut pending = Vec::new();
        for i in 0..100u32 {
            let n = 100 + w * 100 + i;
            let conf = pch
                .basic_publish(
                    "".into(),
                    "st.retention".into(),
                    BasicPublishOptions::default(),
                    format!("s-{n}-{pad}").as_bytes(),
                    persistent(),
                )
                .await
                .unwrap();
            pending.push(conf);
        }
        for conf in pending {
            if within(20, conf).await.unwrap().is_ack() {
                confirmed += 1;
            }
        }
    }
    assert_eq!(confirmed, 1000);
    // Let retention run on the leader (it deletes whole old segments).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let on_leader = read_stream(
        &nodes[li],
        "st.retention",
        usize::MAX,
        Duration::from_secs(3),
        Duration::from_secs(15),
    )
    .await;
    let first = on_leader.first().map(|(o, _)| *o).unwrap();
    assert!(
        first > 100,
        "retention removed nothing on the leader (first {first})"
    );
    nodes[fi].start();
    // The follower restarts its log at the leader's first offset and
    // serves what the leader has, at the same offsets.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = read_stream(
            &nodes[fi],
            "st.retention",
            on_leader.len(),
            Duration::from_secs(3),
            Duration::from_secs(15),
        )
        .await;
        if got == on_leader {
            assert!(
                nodes[fi]
                    .p()
                    .log_text()
                    .contains("restarted at the leader's first offset"),
                "the follower caught up without a reset"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "follower serves {} messages from {:?}; the leader {} from {first}",
            got.len(),
            got.first().map(|g| g.0),
            on_leader.len()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// x-dead-letter-strategy = at-least-once: rejected messages of a quorum
/// queue stay held while its dead-letter route leads nowhere, reach the
/// target quorum queue once it exists, and only then leave the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_dead_lettering_holds_messages_until_a_target_confirms() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    let ch = c1.create_channel().await.unwrap();
    let mut args = quorum_args();
    for (k, v) in [
        ("x-dead-letter-exchange", ""),
        ("x-dead-letter-routing-key", "qq.alo.dlq"),
        ("x-dead-letter-strategy", "at-least-once"),
        ("x-overflow", "reject-publish"),
    ] {
        args.insert(k.into(), AMQPValue::LongString(v.into()));
    }
    ch.queue_declare(
        "qq.alo".into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    publish_each_confirmed(&ch, "qq.alo", "d", 40).await;
    // Reject every message (no requeue) through node 2: the dead-letter
    // target does not exist yet.
    let c2 = nodes[1].connect().await;
    let rch = c2.create_channel().await.unwrap();
    let mut rejected = 0;
    while rejected < 40 {
        match rch
            .basic_get("qq.alo".into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            Some(m) => {
                m.delivery
                    .reject(BasicRejectOptions { requeue: false })
                    .await
                    .unwrap();
                rejected += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(passive_count(&c2, "qq.alo").await, 0, "held, not ready");
    // The target appears: the held messages get there, each once at least.
    declare_quorum(&nodes[2].connect().await, "qq.alo.dlq").await;
    let c3 = nodes[2].connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while passive_count(&c3, "qq.alo.dlq").await < 40 {
        assert!(
            Instant::now() < deadline,
            "held dead letters never reached the new target"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let gch = c3.create_channel().await.unwrap();
    let mut got = BTreeSet::new();
    while let Some(m) = gch
        .basic_get("qq.alo.dlq".into(), BasicGetOptions::default())
        .await
        .unwrap()
    {
        let body = String::from_utf8(m.delivery.data.clone()).unwrap();
        let death = m
            .delivery
            .properties
            .headers()
            .as_ref()
            .and_then(|h| h.inner().get("x-death").cloned());
        assert!(death.is_some(), "x-death on {body}");
        got.insert(body);
        m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: BTreeSet<String> = (0..40).map(|i| format!("d-{i}")).collect();
    assert_eq!(got, want);
    // Settled: nothing is sent again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(passive_count(&c3, "qq.alo.dlq").await, 0);
}
