//! Classic queues across the cluster: a queue lives on the node that
//! declared it and every other node forwards to it (as RabbitMQ).

use super::*;
use common::expect_amqp_error;

/// Passive declare through `node` until the queue is known there; its
/// message count.
async fn passive_until_known(node: &Node, name: &str) -> u32 {
    let conn = node.connect().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ch = conn.create_channel().await.unwrap();
        match ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
        {
            Ok(q) => return q.message_count(),
            Err(e) => assert!(
                Instant::now() < deadline,
                "{name} never became known on {}: {e}",
                node.name
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until a passive declare through `conn` reports `want` messages.
async fn wait_count(conn: &Connection, name: &str, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(25);
    loop {
        let n = passive_count(conn, name).await;
        if n == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: {n} messages, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The passive declare error (code, text) through `conn`.
async fn passive_error(conn: &Connection, name: &str) -> (u16, String) {
    let ch = conn.create_channel().await.unwrap();
    expect_amqp_error(
        ch.queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await,
    )
}

/// The passive declare error code through `conn`, None if it exists.
async fn passive_error_or_none(conn: &Connection, name: &str) -> Option<u16> {
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
    .err()
    .and_then(|e| common::amqp_error(&e))
    .map(|(code, _)| code)
}

fn durable() -> QueueDeclareOptions {
    QueueDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_declared_on_one_node_is_used_from_every_node() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let nodes = cluster(3, &tmp).await;
    let c1 = nodes[0].connect().await;
    let ch1 = c1.create_channel().await.unwrap();
    ch1.exchange_declare(
        "cx".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch1.queue_declare("cq".into(), durable(), FieldTable::default())
        .await
        .unwrap();
    ch1.queue_bind(
        "cq".into(),
        "cx".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();

    // Node 2 knows it (passive declare), and the binding reached it.
    assert_eq!(passive_until_known(&nodes[1], "cq").await, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = nodes[1].api("/api/queues/%2f/cq/bindings").await;
        let bound = b
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["source"] == "cx"));
        if bound {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "binding never reached node 2: {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // An exclusive queue stays on its node, but its name is taken
    // everywhere: locked (405) for other nodes' connections.
    ch1.queue_declare(
        "mine-only".into(),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    let c2 = nodes[1].connect().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ch = c2.create_channel().await.unwrap();
        let (code, text) = expect_amqp_error(
            ch.queue_declare(
                "mine-only".into(),
                QueueDeclareOptions::default(),
                FieldTable::default(),
            )
            .await,
        );
        if code == 405 {
            break;
        }
        assert!(Instant::now() < deadline, "{code} {text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A durable classic queue cannot be redeclared differently elsewhere.
    let c3 = nodes[2].connect().await;
    let bad = c3.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        bad.queue_declare(
            "cq".into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
    );
    assert_eq!(code, 406, "{text}");
    let ch3 = c3.create_channel().await.unwrap();

    // Confirmed publishes through node 2: via the exchange and via the
    // default exchange, mandatory (none returned: both routes reach it).
    let pch = c2.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mandatory = BasicPublishOptions {
        mandatory: true,
        ..Default::default()
    };
    for i in 0..50u32 {
        pch.basic_publish(
            "cx".into(),
            "k".into(),
            mandatory,
            format!("a-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    for i in 0..50u32 {
        pch.basic_publish(
            "".into(),
            "cq".into(),
            mandatory,
            format!("b-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    let returned = within(20, pch.wait_for_confirms()).await.unwrap();
    assert!(returned.is_empty(), "returned: {}", returned.len());
    // Confirmed = enqueued at home.
    assert_eq!(passive_count(&c1, "cq").await, 100);
    assert_eq!(passive_count(&c2, "cq").await, 100);

    // basic.get on node 2.
    let gch = c2.create_channel().await.unwrap();
    let got = gch
        .basic_get("cq".into(), BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"a-0");
    assert_eq!(got.message_count, 99);
    got.delivery.ack(BasicAckOptions::default()).await.unwrap();
    wait_count(&c1, "cq", 99).await;

    // Consumed with manual acks on node 3: all, once, in order.
    let cch = c3.create_channel().await.unwrap();
    cch.basic_qos(10, BasicQosOptions::default()).await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "cq".into(),
            "on-n3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 99 {
        let d = within(20, consumer.next()).await.unwrap().unwrap();
        assert!(!d.redelivered);
        got.push(String::from_utf8(d.data.clone()).unwrap());
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let want: Vec<String> = (1..50)
        .map(|i| format!("a-{i}"))
        .chain((0..50).map(|i| format!("b-{i}")))
        .collect();
    assert_eq!(got, want);
    wait_count(&c1, "cq", 0).await;
    cch.basic_cancel("on-n3".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // An auto-delete queue of node 1 goes, everywhere, when its last
    // consumer (on node 2) cancels.
    ch1.queue_declare(
        "ad".into(),
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    passive_until_known(&nodes[1], "ad").await;
    let ach = c2.create_channel().await.unwrap();
    // Held: lapin cancels a consumer whose handle is dropped.
    let _ad_consumer = ach
        .basic_consume(
            "ad".into(),
            "ad-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        ch1.queue_declare(
            "ad".into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .consumer_count(),
        1
    );
    ach.basic_cancel("ad-consumer".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let gone1 = passive_error_or_none(&c1, "ad").await;
        let gone2 = passive_error_or_none(&c2, "ad").await;
        if gone1 == Some(404) && gone2 == Some(404) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auto-delete queue still there: {gone1:?} {gone2:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Management on node 2 lists it once, on its home node.
    let qs = nodes[1].api("/api/queues").await;
    let mine: Vec<&Value> = qs
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["name"] == "cq")
        .collect();
    assert_eq!(mine.len(), 1, "{qs}");
    assert_eq!(mine[0]["node"], "warren@n1", "{}", mine[0]);
    assert_eq!(mine[0]["state"], "running", "{}", mine[0]);

    // Purge from node 3 takes effect on node 1.
    for i in 0..5u32 {
        pch.basic_publish(
            "".into(),
            "cq".into(),
            BasicPublishOptions::default(),
            format!("c-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    within(20, pch.wait_for_confirms()).await.unwrap();
    assert_eq!(passive_count(&c1, "cq").await, 5);
    assert_eq!(
        ch3.queue_purge("cq".into(), QueuePurgeOptions::default())
            .await
            .unwrap(),
        5
    );
    assert_eq!(passive_count(&c1, "cq").await, 0);

    // Delete from node 3: gone on node 1 at once, and from every node.
    let ch3 = c3.create_channel().await.unwrap();
    ch3.queue_delete("cq".into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let (code, _) = passive_error(&c1, "cq").await;
    assert_eq!(code, 404);
    let (code, _) = passive_error(&c3, "cq").await;
    assert_eq!(code, 404);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ch = c2.create_channel().await.unwrap();
        let r = ch
            .queue_declare(
                "cq".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if r.is_err() {
            break;
        }
        assert!(Instant::now() < deadline, "cq still known on node 2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The name is free again: node 3 declares its own.
    let ch3 = c3.create_channel().await.unwrap();
    ch3.queue_declare(
        "cq".into(),
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let qs = nodes[0].api("/api/queues/%2f/cq").await;
    assert_eq!(qs["node"], "warren@n3", "{qs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_classic_queue_whose_home_is_down_is_absent_until_it_returns() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    {
        let c1 = nodes[0].connect().await;
        let ch1 = c1.create_channel().await.unwrap();
        ch1.queue_declare("hq".into(), durable(), FieldTable::default())
            .await
            .unwrap();
    }
    passive_until_known(&nodes[1], "hq").await;
    let c2 = nodes[1].connect().await;
    let pch = c2.create_channel().await.unwrap();
    pch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..10u32 {
        pch.basic_publish(
            "".into(),
            "hq".into(),
            BasicPublishOptions::default(),
            format!("m-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    within(20, pch.wait_for_confirms()).await.unwrap();
    // A consumer on node 2 holds them unacked.
    let cch = c2.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "hq".into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10u32 {
        let d = within(20, consumer.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("m-{i}").as_bytes());
    }

    // Home node killed: the consumer is cancelled (basic.cancel).
    nodes[0].kill();
    let end = within(20, consumer.next()).await;
    assert!(end.is_none(), "consumer not cancelled: {end:?}");
    // Declares on node 2 fail with RabbitMQ's error.
    let ch = c2.create_channel().await.unwrap();
    let (code, text) = expect_amqp_error(
        ch.queue_declare("hq".into(), durable(), FieldTable::default())
            .await,
    );
    assert_eq!(code, 404);
    assert!(
        text.contains(
            "home node 'warren@n1' of durable queue 'hq' in vhost '/' is down or inaccessible"
        ),
        "{text}"
    );
    let (code, _) = passive_error(&c2, "hq").await;
    assert_eq!(code, 404);
    // Publishes to it are unroutable meanwhile (returned when mandatory).
    let conf = pch
        .basic_publish(
            "".into(),
            "hq".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"lost",
            persistent(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert!(conf.is_ack());
    assert!(conf.take_message().is_some(), "not returned");
    // Management still lists it, down, on its home node.
    let q = nodes[1].api("/api/queues/%2f/hq").await;
    assert_eq!(q["state"], "down", "{q}");
    assert_eq!(q["node"], "warren@n1", "{q}");

    // Home back: the persisted messages are consumable from node 2 again,
    // without a redeclare.
    nodes[0].start();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ch = c2.create_channel().await.unwrap();
        let r = ch
            .queue_declare(
                "hq".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Ok(q) = r {
            if q.message_count() == 10 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "hq not back on node 2 after its home restarted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let cch = c2.create_channel().await.unwrap();
    let mut consumer = cch
        .basic_consume(
            "hq".into(),
            "again".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..10u32 {
        let d = within(20, consumer.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("m-{i}").as_bytes());
        assert!(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let c2b = nodes[1].connect().await;
    wait_count(&c2b, "hq", 0).await;
    cch.basic_cancel("again".into(), BasicCancelOptions::default())
        .await
        .unwrap();

    // A node holding deliveries dies: the home takes them back.
    for i in 0..3u32 {
        pch.basic_publish(
            "".into(),
            "hq".into(),
            BasicPublishOptions::default(),
            format!("n-{i}").as_bytes(),
            persistent(),
        )
        .await
        .unwrap();
    }
    within(20, pch.wait_for_confirms()).await.unwrap();
    let c3 = nodes[2].connect().await;
    let ch3 = c3.create_channel().await.unwrap();
    let mut held = ch3
        .basic_consume(
            "hq".into(),
            "on-n3".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        if tokio::time::timeout(Duration::from_secs(10), held.next())
            .await
            .is_err()
        {
            let q = nodes[0].api("/api/queues/%2f/hq").await;
            panic!("the consumer on node 3 got nothing; the home node reports {q}");
        }
    }
    let c1 = nodes[0].connect().await;
    wait_count(&c1, "hq", 0).await;
    nodes[2].kill();
    wait_count(&c1, "hq", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forgetting_a_node_frees_the_names_of_its_classic_queues() {
    let _serial = SERIAL.lock().await;
    let tmp = tempfile::tempdir().unwrap();
    let mut nodes = cluster(3, &tmp).await;
    {
        let c3 = nodes[2].connect().await;
        let ch3 = c3.create_channel().await.unwrap();
        ch3.queue_declare("fq".into(), durable(), FieldTable::default())
            .await
            .unwrap();
    }
    passive_until_known(&nodes[0], "fq").await;
    nodes[2].kill();
    let c1 = nodes[0].connect().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ch = c1.create_channel().await.unwrap();
        let r = ch
            .queue_declare(
                "fq".into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        let err = r.err().and_then(|e| common::amqp_error(&e));
        if err
            .as_ref()
            .is_some_and(|(code, text)| *code == 404 && text.contains("home node 'warren@n3'"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "{err:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_warrenctl"))
        .args(["--url", &format!("http://{}", nodes[0].mgmt())])
        .args(["forget_cluster_node", "warren@n3"])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // The name is free: node 1 declares its own queue under it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ch = c1.create_channel().await.unwrap();
        if ch
            .queue_declare("fq".into(), durable(), FieldTable::default())
            .await
            .is_ok()
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "fq still taken by the forgotten node"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let q = nodes[0].api("/api/queues/%2f/fq").await;
    assert_eq!(q["node"], "warren@n1", "{q}");
    assert_eq!(q["state"], "running", "{q}");
}
