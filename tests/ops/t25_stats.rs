//! Channels, consumers and message rates as RabbitMQ's management API shows
//! them; x-delayed-message exchanges declared over HTTP.

use crate::common::*;
use crate::http::call;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use serde_json::{Value, json};

fn find(list: &Value, pred: impl Fn(&Value) -> bool) -> &Value {
    list.as_array()
        .unwrap()
        .iter()
        .find(|v| pred(v))
        .unwrap_or_else(|| panic!("not found in {list}"))
}

fn channel_of<'a>(list: &'a Value, ch: &lapin::Channel) -> &'a Value {
    find(list, |c| c["number"] == ch.id())
}

#[tokio::test]
async fn channel_and_consumer_fields() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let conn = b.connect().await;
    let cons = conn.create_channel().await.unwrap();
    declare_queue(&cons, "work").await;
    cons.basic_qos(17, BasicQosOptions::default())
        .await
        .unwrap();
    let mut args = FieldTable::default();
    args.insert("x-priority".into(), AMQPValue::LongInt(5));
    let mut consumer = cons
        .basic_consume(
            "work".into(),
            "c-17".into(),
            BasicConsumeOptions::default(),
            args,
        )
        .await
        .unwrap();
    let publ = conn.create_channel().await.unwrap();
    publ.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    for i in 0..3 {
        publ.basic_publish(
            "".into(),
            "work".into(),
            BasicPublishOptions::default(),
            format!("m{i}").as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let mut tags = Vec::new();
    for _ in 0..3 {
        let d = within(5, consumer.next()).await.unwrap().unwrap();
        tags.push(d.delivery_tag);
    }
    let global = conn.create_channel().await.unwrap();
    global
        .basic_qos(5, BasicQosOptions { global: true })
        .await
        .unwrap();
    let tx = conn.create_channel().await.unwrap();
    tx.tx_select().await.unwrap();
    settle().await;

    let (s, chs) = call(&broker, "GET", "/api/channels", None).await;
    assert_eq!(s, 200);
    assert_eq!(chs.as_array().unwrap().len(), 4);
    let c = channel_of(&chs, &cons);
    for f in [
        "name",
        "number",
        "user",
        "vhost",
        "connection_details",
        "prefetch_count",
        "global_prefetch_count",
        "messages_unacknowledged",
        "messages_unconfirmed",
        "messages_uncommitted",
        "acks_uncommitted",
        "consumer_count",
        "confirm",
        "transactional",
        "state",
    ] {
        assert!(c.get(f).is_some(), "{f} missing in {c}");
    }
    assert_eq!(c["prefetch_count"], 17);
    assert_eq!(c["global_prefetch_count"], 0);
    assert_eq!(c["messages_unacknowledged"], 3);
    assert_eq!(c["consumer_count"], 1);
    assert_eq!(c["confirm"], false);
    assert_eq!(c["transactional"], false);
    let p = channel_of(&chs, &publ);
    assert_eq!(p["confirm"], true);
    assert_eq!(p["messages_unconfirmed"], 0);
    assert_eq!(p["consumer_count"], 0);
    let g = channel_of(&chs, &global);
    assert_eq!(g["global_prefetch_count"], 5);
    assert_eq!(g["prefetch_count"], 0);
    let t = channel_of(&chs, &tx);
    assert_eq!(t["transactional"], true);
    // the same through the connection and the vhost
    let conn_name = c["connection_details"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, one) = call(
        &broker,
        "GET",
        &format!("/api/channels/{}", enc(c["name"].as_str().unwrap())),
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(one["prefetch_count"], 17);
    let (_, per_conn) = call(
        &broker,
        "GET",
        &format!("/api/connections/{}/channels", enc(&conn_name)),
        None,
    )
    .await;
    assert_eq!(per_conn.as_array().unwrap().len(), 4);
    let (_, per_vhost) = call(&broker, "GET", "/api/vhosts/%2F/channels", None).await;
    assert_eq!(per_vhost.as_array().unwrap().len(), 4);

    // consumers
    let ex = conn.create_channel().await.unwrap();
    declare_queue(&ex, "solo").await;
    let _solo = ex
        .basic_consume(
            "solo".into(),
            "c-excl".into(),
            BasicConsumeOptions {
                no_ack: true,
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    settle().await;
    let (_, list) = call(&broker, "GET", "/api/consumers", None).await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let c17 = find(&list, |c| c["consumer_tag"] == "c-17");
    for f in [
        "consumer_tag",
        "queue",
        "channel_details",
        "ack_required",
        "prefetch_count",
        "exclusive",
        "active",
        "activity_status",
        "arguments",
    ] {
        assert!(c17.get(f).is_some(), "{f} missing in {c17}");
    }
    assert_eq!(c17["queue"], json!({"name": "work", "vhost": "/"}));
    assert_eq!(c17["ack_required"], true);
    assert_eq!(c17["prefetch_count"], 17);
    assert_eq!(c17["exclusive"], false);
    assert_eq!(c17["active"], true);
    assert_eq!(c17["activity_status"], "up");
    assert_eq!(c17["arguments"], json!({"x-priority": 5}));
    assert_eq!(c17["channel_details"]["number"], cons.id());
    assert_eq!(
        c17["channel_details"]["connection_name"],
        conn_name.as_str()
    );
    let ce = find(&list, |c| c["consumer_tag"] == "c-excl");
    assert_eq!(ce["ack_required"], false);
    assert_eq!(ce["exclusive"], true);
    let (_, in_vhost) = call(&broker, "GET", "/api/consumers/%2F", None).await;
    assert_eq!(in_vhost.as_array().unwrap().len(), 2);

    // acks move the unacked count; cancel removes the consumer
    cons.basic_ack(tags[1], BasicAckOptions { multiple: true })
        .await
        .unwrap();
    settle().await;
    let (_, chs) = call(&broker, "GET", "/api/channels", None).await;
    assert_eq!(channel_of(&chs, &cons)["messages_unacknowledged"], 1);
    cons.basic_cancel("c-17".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    settle().await;
    let (_, list) = call(&broker, "GET", "/api/consumers", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let (_, chs) = call(&broker, "GET", "/api/channels", None).await;
    assert_eq!(channel_of(&chs, &cons)["consumer_count"], 0);
    // closing a channel removes it
    ex.close(200, "bye".into()).await.unwrap();
    settle().await;
    let (_, list) = call(&broker, "GET", "/api/consumers", None).await;
    assert_eq!(list, json!([]));
    let (_, chs) = call(&broker, "GET", "/api/channels", None).await;
    assert_eq!(chs.as_array().unwrap().len(), 4);
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[tokio::test]
async fn single_active_consumer_status() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    ch.queue_declare("sac".into(), QueueDeclareOptions::default(), args)
        .await
        .unwrap();
    // (lapin cancels a consumer when its handle is dropped: keep them.)
    let mut keep = Vec::new();
    for tag in ["first", "second"] {
        let c = ch
            .basic_consume(
                "sac".into(),
                tag.into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        keep.push(c);
    }
    settle().await;
    let (_, list) = call(&broker, "GET", "/api/consumers", None).await;
    let first = find(&list, |c| c["consumer_tag"] == "first");
    let second = find(&list, |c| c["consumer_tag"] == "second");
    assert_eq!(
        (first["active"].clone(), first["activity_status"].clone()),
        (json!(true), json!("single_active"))
    );
    assert_eq!(
        (second["active"].clone(), second["activity_status"].clone()),
        (json!(false), json!("waiting"))
    );
}

#[tokio::test]
async fn overview_and_exchange_message_stats() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "q").await;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let send = |x: &'static str, k: &'static str, mandatory: bool| {
        let ch = ch.clone();
        async move {
            ch.basic_publish(
                x.into(),
                k.into(),
                BasicPublishOptions {
                    mandatory,
                    ..Default::default()
                },
                b"m",
                BasicProperties::default(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };
    for _ in 0..3 {
        send("", "q", false).await;
    }
    send("amq.direct", "nowhere", true).await; // returned
    send("amq.direct", "nowhere", false).await; // dropped
    let c2 = conn.create_channel().await.unwrap();
    let mut consumer = c2
        .basic_consume(
            "q".into(),
            "c".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        let d = within(5, consumer.next()).await.unwrap().unwrap();
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    c2.basic_cancel("c".into(), BasicCancelOptions::default())
        .await
        .unwrap();
    let g = conn.create_channel().await.unwrap();
    assert!(
        g.basic_get("q".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_none()
    );
    send("", "q", false).await;
    settle().await;
    assert!(
        g.basic_get("q".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .is_some()
    );
    settle().await;
    let want = json!({
        "publish": 6, "confirm": 6, "return_unroutable": 1, "drop_unroutable": 1,
        "deliver": 3, "deliver_no_ack": 0, "get": 0, "get_no_ack": 1, "get_empty": 1,
        "deliver_get": 4, "redeliver": 0, "ack": 3,
    });
    let check = |o: &Value| {
        let ms = &o["message_stats"];
        for (k, v) in want.as_object().unwrap() {
            assert_eq!(&ms[k], v, "{k} in {ms}");
            assert!(
                ms[format!("{k}_details")]["rate"].is_number(),
                "{k}_details in {ms}"
            );
        }
    };
    let (_, o) = call(&broker, "GET", "/api/overview", None).await;
    check(&o);
    for f in [
        "connections",
        "channels",
        "exchanges",
        "queues",
        "consumers",
    ] {
        assert!(o["object_totals"].get(f).is_some(), "{f}");
    }
    for f in ["messages", "messages_ready", "messages_unacknowledged"] {
        assert!(o["queue_totals"].get(f).is_some(), "{f}");
    }
    assert_eq!(o["object_totals"]["connections"], 1);
    assert_eq!(o["object_totals"]["queues"], 1);
    // The totals outlive the connection.
    conn.close(200, "bye".into()).await.unwrap();
    settle().await;
    let (_, o) = call(&broker, "GET", "/api/overview", None).await;
    check(&o);
    assert_eq!(o["object_totals"]["connections"], 0);

    let (_, x) = call(&broker, "GET", "/api/exchanges/%2F/amq.default", None).await;
    assert_eq!(x["message_stats"]["publish_in"], 4, "{x}");
    assert_eq!(x["message_stats"]["publish_out"], 4);
    assert!(x["message_stats"]["publish_in_details"]["rate"].is_number());
    let (_, x) = call(&broker, "GET", "/api/exchanges/%2F/amq.direct", None).await;
    assert_eq!(x["message_stats"]["publish_in"], 2, "{x}");
    assert_eq!(x["message_stats"]["publish_out"], 0);
    // HTTP publishes count too
    let (s, _) = call(
        &broker,
        "POST",
        "/api/exchanges/%2F/amq.direct/publish",
        Some(json!({"routing_key": "nowhere", "payload": "p", "properties": {}})),
    )
    .await;
    assert_eq!(s, 200);
    let (_, x) = call(&broker, "GET", "/api/exchanges/%2F/amq.direct", None).await;
    assert_eq!(x["message_stats"]["publish_in"], 3);
    let (_, o) = call(&broker, "GET", "/api/overview", None).await;
    assert_eq!(o["message_stats"]["publish"], 7);
}

#[tokio::test]
async fn delayed_exchange_declared_over_http() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let (s, e) = call(
        &broker,
        "PUT",
        "/api/exchanges/%2F/later",
        Some(json!({"type": "x-delayed-message", "durable": true, "arguments": {"x-delayed-type": "direct"}})),
    )
    .await;
    assert_eq!(s, 201, "{e}");
    let (_, x) = call(&broker, "GET", "/api/exchanges/%2F/later", None).await;
    assert_eq!(x["type"], "x-delayed-message");
    assert_eq!(x["arguments"]["x-delayed-type"], "direct");
    // the same declaration again is fine; a different type is not
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/exchanges/%2F/later",
        Some(json!({"type": "x-delayed-message", "durable": true, "arguments": {"x-delayed-type": "direct"}})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/exchanges/%2F/later",
        Some(json!({"type": "direct", "durable": true})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, e) = call(
        &broker,
        "PUT",
        "/api/exchanges/%2F/bad",
        Some(json!({"type": "x-delayed-message"})),
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        e["reason"]
            .as_str()
            .unwrap()
            .contains("'x-delayed-type' must be an existing exchange type"),
        "{e}"
    );
    // exported as RabbitMQ does (type x-delayed-message)
    let (_, d) = call(&broker, "GET", "/api/definitions", None).await;
    let ex = find(&d["exchanges"], |e| e["name"] == "later");
    assert_eq!(ex["type"], "x-delayed-message");

    // used over AMQP: a passive declare and an equivalent one agree, and a
    // message with x-delay arrives after its delay.
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut dargs = FieldTable::default();
    dargs.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    ch.exchange_declare(
        "later".into(),
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        dargs,
    )
    .await
    .unwrap();
    declare_queue(&ch, "dq").await;
    ch.queue_bind(
        "dq".into(),
        "later".into(),
        "k".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("x-delay".into(), AMQPValue::LongInt(300));
    ch.basic_publish(
        "later".into(),
        "k".into(),
        BasicPublishOptions::default(),
        b"late",
        BasicProperties::default().with_headers(headers),
    )
    .await
    .unwrap();
    settle().await;
    assert_eq!(message_count(&conn, "dq").await, 0, "held for its delay");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(drain(&ch, "dq").await, vec!["late".to_string()]);
}
