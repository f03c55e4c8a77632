//! Routing through each exchange type, the default exchange, and
//! mandatory returns.
use crate::common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation, ExchangeKind};

async fn bind(ch: &lapin::Channel, q: &str, ex: &str, key: &str) {
    ch.queue_bind(
        q.into(),
        ex.into(),
        key.into(),
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn direct_exchange_routes_by_exact_key() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "logs-direct".into(),
        ExchangeKind::Direct,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "errors").await;
    declare_queue(&ch, "all").await;
    bind(&ch, "errors", "logs-direct", "error").await;
    for sev in ["info", "warning", "error"] {
        bind(&ch, "all", "logs-direct", sev).await;
    }
    for (sev, body) in [
        ("info", "i1"),
        ("error", "e1"),
        ("warning", "w1"),
        ("debug", "d1"),
        ("error", "e2"),
        ("Error", "E"),
    ] {
        publish(&ch, "logs-direct", sev, body.as_bytes()).await;
    }
    assert_eq!(drain(&ch, "errors").await, vec!["e1", "e2"]);
    assert_eq!(drain(&ch, "all").await, vec!["i1", "e1", "w1", "e2"]);
}

#[tokio::test]
async fn direct_exchange_same_queue_bound_twice_gets_one_copy() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "dup").await;
    bind(&ch, "dup", "amq.direct", "k").await;
    bind(&ch, "dup", "amq.direct", "k").await; // idempotent
    publish(&ch, "amq.direct", "k", b"one").await;
    assert_eq!(drain(&ch, "dup").await, vec!["one"]);
}

#[tokio::test]
async fn fanout_pub_sub_every_queue_gets_everything() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "logs".into(),
        ExchangeKind::Fanout,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let q1 = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let q2 = ch
        .queue_declare(
            "".into(),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    bind(&ch, q1.name().as_str(), "logs", "ignored").await;
    bind(&ch, q2.name().as_str(), "logs", "").await;
    let expected: Vec<String> = (0..20).map(|i| format!("log-{i}")).collect();
    for (i, m) in expected.iter().enumerate() {
        publish(&ch, "logs", &format!("rk{i}"), m.as_bytes()).await;
    }
    assert_eq!(drain(&ch, q1.name().as_str()).await, expected);
    assert_eq!(drain(&ch, q2.name().as_str()).await, expected);
}

#[tokio::test]
async fn topic_exchange_matches_tutorial_table() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        "topic_logs".into(),
        ExchangeKind::Topic,
        Default::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    declare_queue(&ch, "Q1").await;
    declare_queue(&ch, "Q2").await;
    bind(&ch, "Q1", "topic_logs", "*.orange.*").await;
    bind(&ch, "Q2", "topic_logs", "*.*.rabbit").await;
    bind(&ch, "Q2", "topic_logs", "lazy.#").await;
    let keys = [
        "quick.orange.rabbit",
        "lazy.orange.elephant",
        "quick.orange.fox",
        "lazy.brown.fox",
        "lazy.pink.rabbit",
        "quick.brown.fox",
        "orange",
        "quick.orange.new.rabbit",
        "lazy.orange.new.rabbit",
        "quick.orange.male.rabbit",
        "lazy",
    ];
    for k in keys {
        publish(&ch, "topic_logs", k, k.as_bytes()).await;
    }
    assert_eq!(
        drain(&ch, "Q1").await,
        vec![
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "quick.orange.fox"
        ]
    );
    assert_eq!(
        drain(&ch, "Q2").await,
        vec![
            "quick.orange.rabbit",
            "lazy.orange.elephant",
            "lazy.brown.fox",
            "lazy.pink.rabbit",
            "lazy.orange.new.rabbit",
            "lazy"
        ]
    );
}

#[tokio::test]
async fn topic_exchange_wildcard_edge_cases() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let patterns = [
        "#", "*", "a.#", "#.c", "a.#.z", "*.#", "#.#", "a.*.*", "", "a..b",
    ];
    // (The empty key is covered by topic_empty_routing_key_has_zero_words.)
    let keys = [
        "a", "c", "a.b", "b.c", "a.z", "a.b.z", "a.b.c.z", "a.b.c", "x.y", "a..b",
    ];
    for (i, p) in patterns.iter().enumerate() {
        let q = format!("tq{i}");
        declare_queue(&ch, &q).await;
        bind(&ch, &q, "amq.topic", p).await;
    }
    for k in keys {
        publish(&ch, "amq.topic", k, format!("<{k}>").as_bytes()).await;
    }
    let expect: [&[&str]; 10] = [
        // "#": everything
        &[
            "a", "c", "a.b", "b.c", "a.z", "a.b.z", "a.b.c.z", "a.b.c", "x.y", "a..b",
        ],
        // "*": exactly one word
        &["a", "c"],
        // "a.#"
        &["a", "a.b", "a.z", "a.b.z", "a.b.c.z", "a.b.c", "a..b"],
        // "#.c"
        &["c", "b.c", "a.b.c"],
        // "a.#.z"
        &["a.z", "a.b.z", "a.b.c.z"],
        // "*.#": at least one word
        &[
            "a", "c", "a.b", "b.c", "a.z", "a.b.z", "a.b.c.z", "a.b.c", "x.y", "a..b",
        ],
        // "#.#"
        &[
            "a", "c", "a.b", "b.c", "a.z", "a.b.z", "a.b.c.z", "a.b.c", "x.y", "a..b",
        ],
        // "a.*.*"
        &["a.b.z", "a.b.c", "a..b"],
        // "": only the empty key
        &[],
        // "a..b": empty middle word
        &["a..b"],
    ];
    let mut wrong = Vec::new();
    for (i, want) in expect.iter().enumerate() {
        let got = drain(&ch, &format!("tq{i}")).await;
        let want: Vec<String> = want.iter().map(|k| format!("<{k}>")).collect();
        if got != want {
            wrong.push(format!(
                "pattern {:?}: got {got:?}, want {want:?}",
                patterns[i]
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[tokio::test]
async fn topic_empty_routing_key_has_zero_words() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let patterns = ["#", "*", "*.#", "", "#.#"];
    for (i, p) in patterns.iter().enumerate() {
        let q = format!("tqe{i}");
        declare_queue(&ch, &q).await;
        bind(&ch, &q, "amq.topic", p).await;
    }
    publish(&ch, "amq.topic", "", b"empty").await;
    let got: Vec<usize> = {
        let mut v = Vec::new();
        for i in 0..patterns.len() {
            if !drain(&ch, &format!("tqe{i}")).await.is_empty() {
                v.push(i);
            }
        }
        v
    };
    // "#", "" and "#.#" match the empty key; "*" and "*.#" need one word.
    assert_eq!(got, vec![0, 3, 4]);
}

#[tokio::test]
async fn topic_unbind_stops_matching() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "tu").await;
    bind(&ch, "tu", "amq.topic", "a.*").await;
    bind(&ch, "tu", "amq.topic", "#.b").await;
    ch.queue_unbind(
        "tu".into(),
        "amq.topic".into(),
        "a.*".into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    publish(&ch, "amq.topic", "a.x", b"1").await;
    publish(&ch, "amq.topic", "a.b", b"2").await;
    assert_eq!(drain(&ch, "tu").await, vec!["2"]);
}

fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[tokio::test]
async fn headers_exchange_all_and_any() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "h-all").await;
    declare_queue(&ch, "h-any").await;
    declare_queue(&ch, "h-default").await;
    ch.queue_bind(
        "h-all".into(),
        "amq.headers".into(),
        "".into(),
        Default::default(),
        table(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "h-any".into(),
        "amq.headers".into(),
        "".into(),
        Default::default(),
        table(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("log")),
        ]),
    )
    .await
    .unwrap();
    // No x-match: defaults to all.
    ch.queue_bind(
        "h-default".into(),
        "amq.headers".into(),
        "".into(),
        Default::default(),
        table(&[("format", s("zip")), ("n", AMQPValue::LongInt(1))]),
    )
    .await
    .unwrap();
    let msgs: Vec<(&str, FieldTable)> = vec![
        (
            "pdf-report",
            table(&[("format", s("pdf")), ("type", s("report"))]),
        ),
        (
            "pdf-log",
            table(&[("format", s("pdf")), ("type", s("log"))]),
        ),
        (
            "zip-report",
            table(&[("format", s("zip")), ("type", s("report"))]),
        ),
        ("pdf-only", table(&[("format", s("pdf"))])),
        ("none", FieldTable::default()),
        (
            "pdf-report-extra",
            table(&[
                ("format", s("pdf")),
                ("type", s("report")),
                ("extra", AMQPValue::Boolean(true)),
            ]),
        ),
        (
            "zip-1",
            table(&[("format", s("zip")), ("n", AMQPValue::LongInt(1))]),
        ),
        (
            "zip-2",
            table(&[("format", s("zip")), ("n", AMQPValue::LongInt(2))]),
        ),
    ];
    for (body, headers) in msgs {
        ch.basic_publish(
            "amq.headers".into(),
            "any-key".into(),
            Default::default(),
            body.as_bytes(),
            BasicProperties::default().with_headers(headers),
        )
        .await
        .unwrap();
    }
    assert_eq!(
        drain(&ch, "h-all").await,
        vec!["pdf-report", "pdf-report-extra"]
    );
    assert_eq!(
        drain(&ch, "h-any").await,
        vec!["pdf-report", "pdf-log", "pdf-only", "pdf-report-extra"]
    );
    assert_eq!(drain(&ch, "h-default").await, vec!["zip-1"]);
}

#[tokio::test]
async fn headers_binding_ignores_x_prefixed_binding_args() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "hx").await;
    ch.queue_bind(
        "hx".into(),
        "amq.match".into(),
        "".into(),
        Default::default(),
        table(&[
            ("x-match", s("all")),
            ("x-custom", s("whatever")),
            ("k", s("v")),
        ]),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "amq.match".into(),
        "".into(),
        Default::default(),
        b"hit",
        BasicProperties::default().with_headers(table(&[("k", s("v"))])),
    )
    .await
    .unwrap();
    assert_eq!(drain(&ch, "hx").await, vec!["hit"]);
}

#[tokio::test]
async fn default_exchange_routes_by_queue_name() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "by-name").await;
    publish(&ch, "", "by-name", b"yes").await;
    publish(&ch, "", "no-such-queue", b"dropped").await;
    publish(&ch, "", "BY-NAME", b"case-sensitive").await;
    assert_eq!(drain(&ch, "by-name").await, vec!["yes"]);
}

#[tokio::test]
async fn mandatory_unroutable_is_returned_with_312_no_route() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let conf = ch
        .basic_publish(
            "amq.direct".into(),
            "nobody-home".into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            b"bounce",
            BasicProperties::default().with_message_id("m-1".into()),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    let Confirmation::Ack(Some(ret)) = conf else {
        panic!("expected ack with returned message, got {conf:?}")
    };
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(ret.delivery.routing_key.as_str(), "nobody-home");
    assert_eq!(ret.delivery.data, b"bounce");
    assert_eq!(
        ret.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m-1")
    );
}

#[tokio::test]
async fn mandatory_to_default_exchange_missing_queue_is_returned() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    declare_queue(&ch, "exists").await;
    ch.basic_publish(
        "".into(),
        "missing".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"r",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_publish(
        "".into(),
        "exists".into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"ok",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let returned = within(5, ch.wait_for_confirms()).await.unwrap();
    assert_eq!(returned.len(), 1);
    assert_eq!(returned[0].reply_code, 312);
    assert_eq!(returned[0].delivery.routing_key.as_str(), "missing");
    assert_eq!(returned[0].delivery.data, b"r");
    assert_eq!(drain(&ch, "exists").await, vec!["ok"]);
}

#[tokio::test]
async fn non_mandatory_unroutable_is_silently_dropped() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let conf = ch
        .basic_publish(
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            b"lost",
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    assert_eq!(conf, Confirmation::Ack(None));
}

#[tokio::test]
async fn routing_preserves_exchange_and_routing_key_on_delivery() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "meta").await;
    bind(&ch, "meta", "amq.topic", "x.*").await;
    publish(&ch, "amq.topic", "x.y", b"m").await;
    settle().await;
    let m = ch
        .basic_get("meta".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.exchange.as_str(), "amq.topic");
    assert_eq!(m.delivery.routing_key.as_str(), "x.y");
    assert!(!m.delivery.redelivered);
    assert_eq!(m.message_count, 0);
}
