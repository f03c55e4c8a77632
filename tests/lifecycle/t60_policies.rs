//! Policies set through the management HTTP API and applied to queues and
//! exchanges: existing and future objects, argument precedence (lower of
//! the two for numeric limits), priority between policies, clearing, and
//! persistence across a restart.

use crate::common::*;
use crate::util::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One HTTP request to the management listener as guest; returns the status.
async fn http(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    within(10, s.read_to_end(&mut out)).await.unwrap();
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let text = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, text)
}

async fn set_policy(
    b: &TestBroker,
    name: &str,
    pattern: &str,
    apply_to: &str,
    priority: i64,
    def: Value,
) {
    let body =
        json!({"pattern": pattern, "apply-to": apply_to, "priority": priority, "definition": def});
    let (st, text) = http(
        b.mgmt_addr.unwrap(),
        "PUT",
        &format!("/api/policies/%2F/{name}"),
        Some(body),
    )
    .await;
    assert!(st == 201 || st == 204, "set policy {name}: {st} {text}");
}

async fn clear_policy(b: &TestBroker, name: &str) {
    let (st, text) = http(
        b.mgmt_addr.unwrap(),
        "DELETE",
        &format!("/api/policies/%2F/{name}"),
        None,
    )
    .await;
    assert_eq!(st, 204, "clear policy {name}: {text}");
}

async fn publish_n(ch: &lapin::Channel, queue: &str, n: usize) {
    for i in 0..n {
        publish(ch, "", queue, i.to_string().as_bytes()).await;
    }
}

#[tokio::test]
async fn message_ttl_policy_applies_to_existing_and_later_queues() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "ttl.a").await;
    declare_queue(&ch, "other").await;
    set_policy(
        &b,
        "ttl",
        "^ttl\\.",
        "queues",
        0,
        json!({"message-ttl": 100}),
    )
    .await;
    declare_queue(&ch, "ttl.b").await;
    for q in ["ttl.a", "ttl.b", "other"] {
        publish(&ch, "", q, b"m").await;
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        message_count(&conn, "ttl.a").await,
        0,
        "existing queue follows the policy"
    );
    assert_eq!(
        message_count(&conn, "ttl.b").await,
        0,
        "queue declared later follows the policy"
    );
    assert_eq!(
        message_count(&conn, "other").await,
        1,
        "unmatched queue keeps its message"
    );
    let (st, text) = http(b.mgmt_addr.unwrap(), "GET", "/api/queues/%2F/ttl.a", None).await;
    assert_eq!(st, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        v["policy"],
        json!("ttl"),
        "management shows the applied policy: {text}"
    );
}

#[tokio::test]
async fn dead_letter_exchange_policy_dead_letters_rejected_messages() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "dlx".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "dead").await;
    ch.queue_bind(
        "dead".into(),
        "dlx".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "work").await;
    set_policy(
        &b,
        "dl",
        "^work$",
        "all",
        0,
        json!({"dead-letter-exchange": "dlx"}),
    )
    .await;
    publish(&ch, "", "work", b"bad").await;
    settle().await;
    let m = ch
        .basic_get("work".into(), BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert_eq!(drain(&ch, "dead").await, vec!["bad"]);
}

#[tokio::test]
async fn lower_of_argument_and_policy_for_limits_and_argument_wins_for_dlx() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    set_policy(
        &b,
        "len",
        "^len\\.",
        "queues",
        0,
        json!({"max-length": 2, "dead-letter-exchange": "from-policy"}),
    )
    .await;
    ch.queue_declare(
        "len.arg5".into(),
        QueueDeclareOptions::default(),
        args(&[("x-max-length", AMQPValue::LongInt(5))]),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "len.arg1".into(),
        QueueDeclareOptions::default(),
        args(&[("x-max-length", AMQPValue::LongInt(1))]),
    )
    .await
    .unwrap();
    // x-dead-letter-exchange argument wins over the policy's.
    ch.exchange_declare(
        "from-arg".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.exchange_declare(
        "from-policy".into(),
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "got-arg").await;
    declare_queue(&ch, "got-policy").await;
    ch.queue_bind(
        "got-arg".into(),
        "from-arg".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "got-policy".into(),
        "from-policy".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "len.dlx".into(),
        QueueDeclareOptions::default(),
        args(&[("x-dead-letter-exchange", s("from-arg"))]),
    )
    .await
    .unwrap();
    publish_n(&ch, "len.arg5", 5).await;
    publish_n(&ch, "len.arg1", 5).await;
    publish_n(&ch, "len.dlx", 3).await;
    assert_eq!(
        drain(&ch, "len.arg5").await,
        vec!["3", "4"],
        "policy's lower max-length applies"
    );
    assert_eq!(
        drain(&ch, "len.arg1").await,
        vec!["4"],
        "argument's lower max-length applies"
    );
    assert_eq!(drain(&ch, "len.dlx").await, vec!["1", "2"]);
    assert_eq!(
        drain(&ch, "got-arg").await,
        vec!["0"],
        "drop-head victim goes to the argument's DLX"
    );
    // The other two queues have no DLX argument: the policy's applies
    // (3 + 4 drop-head victims).
    assert_eq!(drain(&ch, "got-policy").await.len(), 7);
}

#[tokio::test]
async fn highest_priority_policy_wins_and_clearing_stops_it() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "prio.q").await;
    set_policy(&b, "low", "^prio", "queues", 1, json!({"max-length": 1})).await;
    set_policy(&b, "high", "^prio\\.", "all", 5, json!({"max-length": 3})).await;
    publish_n(&ch, "prio.q", 5).await;
    assert_eq!(
        drain(&ch, "prio.q").await,
        vec!["2", "3", "4"],
        "only the higher-priority policy applies"
    );
    clear_policy(&b, "high").await;
    publish_n(&ch, "prio.q", 3).await;
    assert_eq!(
        drain(&ch, "prio.q").await,
        vec!["2"],
        "the remaining policy applies"
    );
    clear_policy(&b, "low").await;
    publish_n(&ch, "prio.q", 3).await;
    assert_eq!(
        drain(&ch, "prio.q").await,
        vec!["0", "1", "2"],
        "no policy: no limit"
    );
    // apply-to exchanges does not touch queues.
    set_policy(
        &b,
        "ex-only",
        "^prio",
        "exchanges",
        9,
        json!({"max-length": 1}),
    )
    .await;
    publish_n(&ch, "prio.q", 2).await;
    assert_eq!(drain(&ch, "prio.q").await, vec!["0", "1"]);
}

#[tokio::test]
async fn max_length_policy_with_reject_publish_overflow() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "capped").await;
    set_policy(
        &b,
        "cap",
        "^capped$",
        "queues",
        0,
        json!({"max-length": 2, "overflow": "reject-publish"}),
    )
    .await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut acks = Vec::new();
    for i in 0..4 {
        let c = ch
            .basic_publish(
                "".into(),
                "capped".into(),
                BasicPublishOptions::default(),
                i.to_string().as_bytes(),
                lapin::BasicProperties::default(),
            )
            .await
            .unwrap();
        acks.push(within(5, c).await.unwrap().is_ack());
    }
    assert_eq!(
        acks,
        vec![true, true, false, false],
        "publishes over the limit are nacked"
    );
    assert_eq!(drain(&ch, "capped").await, vec!["0", "1"]);
}

#[tokio::test]
async fn alternate_exchange_policy_on_exchange_and_argument_wins() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for (e, k) in [
        ("ae.src", lapin::ExchangeKind::Direct),
        ("ae.alt", lapin::ExchangeKind::Fanout),
        ("ae.alt2", lapin::ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(
            e.into(),
            k,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    ch.exchange_declare(
        "ae.own".into(),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        args(&[("alternate-exchange", s("ae.alt2"))]),
    )
    .await
    .unwrap();
    declare_queue(&ch, "caught").await;
    declare_queue(&ch, "caught2").await;
    ch.queue_bind(
        "caught".into(),
        "ae.alt".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "caught2".into(),
        "ae.alt2".into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "ae.src", "nowhere", b"before").await;
    set_policy(
        &b,
        "ae",
        "^ae\\.(src|own)$",
        "exchanges",
        0,
        json!({"alternate-exchange": "ae.alt"}),
    )
    .await;
    publish(&ch, "ae.src", "nowhere", b"after").await;
    publish(&ch, "ae.own", "nowhere", b"own").await;
    assert_eq!(drain(&ch, "caught").await, vec!["after"]);
    assert_eq!(
        drain(&ch, "caught2").await,
        vec!["own"],
        "alternate-exchange argument wins"
    );
    clear_policy(&b, "ae").await;
    publish(&ch, "ae.src", "nowhere", b"cleared").await;
    assert!(drain(&ch, "caught").await.is_empty());
}

/// The management address a separately started warren logged.
fn process_mgmt_addr(p: &crate::process::WarrenProcess) -> SocketAddr {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = p.log_text();
        let key = "management API listening on http://";
        if let Some(i) = log.rfind(key) {
            let rest = &log[i + key.len()..];
            let a = rest
                .split_whitespace()
                .next()
                .unwrap()
                .trim_end_matches(|c: char| !c.is_ascii_digit());
            return a.parse().unwrap();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no mgmt line in log:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn policies_survive_a_restart() {
    use crate::process::WarrenProcess;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let p = WarrenProcess::start(&data);
    {
        let mgmt = process_mgmt_addr(&p);
        let conn = lapin::Connection::connect(&p.url(), lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "keep.q".into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        let body = json!({"pattern": "^keep\\.", "apply-to": "queues", "priority": 0, "definition": {"max-length": 1}});
        let (st, text) = http(mgmt, "PUT", "/api/policies/%2F/keep", Some(body)).await;
        assert!(st == 201 || st == 204, "{st} {text}");
        let _ = conn.close(200, "bye".into()).await;
    }
    p.stop();
    let p = WarrenProcess::start(&data);
    let mgmt = process_mgmt_addr(&p);
    let (st, text) = http(mgmt, "GET", "/api/policies/%2F", None).await;
    assert_eq!(st, 200);
    assert!(
        text.contains("\"keep\""),
        "policy listed after restart: {text}"
    );
    let conn = lapin::Connection::connect(&p.url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    publish_n(&ch, "keep.q", 3).await;
    assert_eq!(
        drain(&ch, "keep.q").await,
        vec!["2"],
        "recovered queue follows the stored policy"
    );
    declare_queue(&ch, "keep.new").await;
    publish_n(&ch, "keep.new", 3).await;
    assert_eq!(drain(&ch, "keep.new").await, vec!["2"]);
    let _ = conn.close(200, "bye".into()).await;
    p.stop();
}

#[tokio::test]
async fn lowering_max_length_by_policy_trims_the_existing_backlog() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "backlog").await;
    publish_n(&ch, "backlog", 10).await;
    settle().await;
    // Oldest messages go first (drop-head), at once, as in RabbitMQ.
    set_policy(
        &b,
        "trim",
        "^backlog$",
        "queues",
        0,
        json!({"max-length": 3}),
    )
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while message_count(&conn, "backlog").await != 3 {
        assert!(std::time::Instant::now() < deadline, "backlog not trimmed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(drain(&ch, "backlog").await, vec!["7", "8", "9"]);
}
