//! Management API shapes, auth and errors, as RabbitMQ documents them.

use crate::common::*;
use crate::http::{call, call_as, get_socket};
use serde_json::{Value, json};

fn has(v: &Value, fields: &[&str]) {
    for f in fields {
        assert!(v.get(f).is_some(), "field '{f}' missing in {v}");
    }
}

#[tokio::test]
async fn objects_have_rabbitmq_fields() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "q1").await;
    publish(&ch, "", "q1", b"one").await;
    publish(&ch, "", "q1", b"two").await;
    settle().await;

    let (s, q) = call(&broker, "GET", "/api/queues/%2F/q1", None).await;
    assert_eq!(s, 200);
    has(
        &q,
        &[
            "name",
            "vhost",
            "durable",
            "auto_delete",
            "exclusive",
            "arguments",
            "type",
            "state",
            "messages",
            "messages_ready",
            "messages_unacknowledged",
            "consumers",
            "memory",
            "message_stats",
        ],
    );
    assert_eq!(q["messages_ready"], 2);
    assert_eq!(q["type"], "classic");
    assert_eq!(q["message_stats"]["publish"], 2);
    assert!(q["message_stats"]["ack_details"]["rate"].is_number());
    assert!(
        q["message_stats"]["deliver_get_details"]
            .get("rate")
            .is_some()
    );

    let (_, list) = call(&broker, "GET", "/api/queues", None).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (_, o) = call(&broker, "GET", "/api/overview", None).await;
    has(
        &o,
        &[
            "management_version",
            "rabbitmq_version",
            "node",
            "object_totals",
            "queue_totals",
            "message_stats",
            "listeners",
        ],
    );
    assert_eq!(o["object_totals"]["queues"], 1);
    assert_eq!(o["object_totals"]["connections"], 1);
    let (_, n) = call(&broker, "GET", "/api/nodes", None).await;
    has(
        &n[0],
        &[
            "name",
            "running",
            "mem_used",
            "mem_limit",
            "mem_alarm",
            "disk_free",
            "disk_free_limit",
            "disk_free_alarm",
            "uptime",
        ],
    );
    let (_, c) = call(&broker, "GET", "/api/connections", None).await;
    let c0 = &c[0];
    has(
        c0,
        &[
            "name",
            "user",
            "vhost",
            "channels",
            "peer_host",
            "peer_port",
            "client_properties",
            "state",
        ],
    );
    assert_eq!(c0["user"], "guest");
    assert_eq!(c0["channels"], 1);
    assert!(c0["name"].as_str().unwrap().contains(" -> "));
    let (_, chs) = call(&broker, "GET", "/api/channels", None).await;
    assert_eq!(chs.as_array().unwrap().len(), 1);
    let (_, ex) = call(&broker, "GET", "/api/exchanges/%2F/amq.topic", None).await;
    has(
        &ex,
        &[
            "name",
            "vhost",
            "type",
            "durable",
            "auto_delete",
            "internal",
            "arguments",
        ],
    );
    let (_, vh) = call(&broker, "GET", "/api/vhosts", None).await;
    assert_eq!(vh[0]["name"], "/");
    let (_, u) = call(&broker, "GET", "/api/users", None).await;
    has(
        &u[0],
        &["name", "password_hash", "hashing_algorithm", "tags"],
    );
    let (_, p) = call(&broker, "GET", "/api/permissions", None).await;
    assert_eq!(
        p[0],
        json!({"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"})
    );

    // consumers
    let _consumer = ch
        .basic_consume(
            "q1".into(),
            "tag-1".into(),
            lapin::options::BasicConsumeOptions::default(),
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    settle().await;
    let (_, cons) = call(&broker, "GET", "/api/consumers", None).await;
    assert_eq!(cons[0]["consumer_tag"], "tag-1", "{cons}");
    assert_eq!(cons[0]["queue"]["name"], "q1");
    assert_eq!(cons[0]["channel_details"]["connection_name"], c0["name"]);

    // close the connection with 320
    let path = format!(
        "/api/connections/{}",
        c0["name"]
            .as_str()
            .unwrap()
            .replace(' ', "%20")
            .replace('>', "%3E")
    );
    let (s, _) = call(&broker, "DELETE", &path, None).await;
    assert_eq!(s, 204);
    let mut closed = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        if !conn.status().connected() {
            closed = true;
            break;
        }
    }
    assert!(closed, "connection still open after DELETE");
}

#[tokio::test]
async fn writes_publish_get_peek_purge() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/exchanges/%2F/ex1",
        Some(json!({"type": "topic", "durable": true})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/queues/%2F/qa",
        Some(json!({"durable": true, "arguments": {"x-max-length": 100}})),
    )
    .await;
    assert_eq!(s, 201);
    let (s, _) = call(
        &broker,
        "POST",
        "/api/bindings/%2F/e/ex1/q/qa",
        Some(json!({"routing_key": "a.#"})),
    )
    .await;
    assert_eq!(s, 201);
    let (_, bs) = call(&broker, "GET", "/api/bindings/%2F/e/ex1/q/qa", None).await;
    assert_eq!(bs[0]["routing_key"], "a.#");
    let (_, bs) = call(&broker, "GET", "/api/queues/%2F/qa/bindings", None).await;
    assert_eq!(
        bs.as_array().unwrap().len(),
        2,
        "default binding + a.#: {bs}"
    );
    for i in 0..3 {
        let (s, r) = call(
            &broker,
            "POST",
            "/api/exchanges/%2F/ex1/publish",
            Some(
                json!({"routing_key": "a.b", "payload": format!("m{i}"), "payload_encoding": "string", "properties": {"delivery_mode": 2}}),
            ),
        )
        .await;
        assert_eq!((s.as_u16(), r), (200, json!({"routed": true})));
    }
    let (_, r) = call(
        &broker,
        "POST",
        "/api/exchanges/%2F/ex1/publish",
        Some(json!({"routing_key": "zz", "payload": "x", "properties": {}})),
    )
    .await;
    assert_eq!(r, json!({"routed": false}));
    let (_, peek) = call(&broker, "GET", "/api/queues/%2F/qa/peek?count=2", None).await;
    assert_eq!(peek.as_array().unwrap().len(), 2);
    assert_eq!(peek[0]["payload"], "m0");
    let (_, got) = call(
        &broker,
        "POST",
        "/api/queues/%2F/qa/get",
        Some(json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"})),
    )
    .await;
    assert_eq!(got[0]["payload"], "m0");
    assert_eq!(got[0]["message_count"], 2);
    let (_, q) = call(&broker, "GET", "/api/queues/%2F/qa", None).await;
    assert_eq!(q["messages"], 3);
    let (_, got) = call(
        &broker,
        "POST",
        "/api/queues/%2F/qa/get",
        Some(json!({"count": 5, "ackmode": "ack_requeue_false"})),
    )
    .await;
    assert_eq!(got.as_array().unwrap().len(), 3);
    assert_eq!(got[0]["redelivered"], true);
    call(
        &broker,
        "POST",
        "/api/exchanges/%2F/ex1/publish",
        Some(json!({"routing_key": "a", "payload": "p", "properties": {}})),
    )
    .await;
    let (s, _) = call(&broker, "DELETE", "/api/queues/%2F/qa/contents", None).await;
    assert_eq!(s, 204);
    let (_, q) = call(&broker, "GET", "/api/queues/%2F/qa", None).await;
    assert_eq!(q["messages"], 0);
    let props = bs[1]["properties_key"]
        .as_str()
        .unwrap()
        .replace('#', "%23");
    let (s, _) = call(
        &broker,
        "DELETE",
        &format!("/api/bindings/%2F/e/ex1/q/qa/{props}"),
        None,
    )
    .await;
    assert_eq!(s, 204);
    let (s, _) = call(&broker, "DELETE", "/api/queues/%2F/qa", None).await;
    assert_eq!(s, 204);
    let (s, _) = call(&broker, "DELETE", "/api/exchanges/%2F/ex1", None).await;
    assert_eq!(s, 204);
    let (s, e) = call(&broker, "GET", "/api/queues/%2F/qa", None).await;
    assert_eq!(s, 404);
    assert!(e.get("error").is_some() && e.get("reason").is_some());
    let (_, h) = call(&broker, "GET", "/api/health/checks/alarms", None).await;
    assert_eq!(h["status"], "ok");
    let (_, a) = call(&broker, "GET", "/api/aliveness-test/%2F", None).await;
    assert_eq!(a["status"], "ok");
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/policies/%2F/p1",
        Some(json!({"pattern": "^q", "definition": {"max-length": 5}, "apply-to": "queues"})),
    )
    .await;
    assert_eq!(s, 201);
    let (_, ps) = call(&broker, "GET", "/api/policies", None).await;
    assert_eq!(
        ps[0],
        json!({"vhost": "/", "name": "p1", "pattern": "^q", "apply-to": "queues", "definition": {"max-length": 5}, "priority": 0})
    );
}

#[tokio::test]
async fn errors_and_auth() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let (s, e) = call_as(&broker, None, "GET", "/api/overview", None).await;
    assert_eq!(s, 401);
    assert_eq!(e["error"], "not_authorised");
    let (s, _) = call_as(
        &broker,
        Some(("guest", "bad")),
        "GET",
        "/api/overview",
        None,
    )
    .await;
    assert_eq!(s, 401);
    call(
        &broker,
        "PUT",
        "/api/users/mon",
        Some(json!({"password": "m", "tags": "monitoring"})),
    )
    .await;
    call(
        &broker,
        "PUT",
        "/api/users/plain",
        Some(json!({"password": "p", "tags": ""})),
    )
    .await;
    let (s, _) = call_as(&broker, Some(("mon", "m")), "GET", "/api/queues", None).await;
    assert_eq!(s, 200);
    let (s, e) = call_as(&broker, Some(("mon", "m")), "PUT", "/api/vhosts/x", None).await;
    assert_eq!(
        (s.as_u16(), e["reason"].as_str().unwrap()),
        (401, "Not administrator user")
    );
    let (s, _) = call_as(&broker, Some(("plain", "p")), "GET", "/api/overview", None).await;
    assert_eq!(s, 401);
    let (s, _) = call(&broker, "GET", "/api/nothing-here", None).await;
    assert_eq!(s, 404);
    let (s, _) = call(&broker, "POST", "/api/overview", None).await;
    assert_eq!(s, 405);
    let (s, e) = call(
        &broker,
        "PUT",
        "/api/queues/%2F/qq",
        Some(json!({"arguments": {"x-max-length": "ten"}})),
    )
    .await;
    assert_eq!(s, 400, "{e}");
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/permissions/%2F/plain",
        Some(json!({"configure": "(", "write": "", "read": ""})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = call(&broker, "GET", "/api/queues/nope", None).await;
    assert_eq!(s, 404);
}

#[tokio::test]
async fn real_socket() {
    let b = TestBroker::start().await;
    let addr = b.mgmt_addr.expect("mgmt listening");
    let (s, body) = tokio::task::spawn_blocking(move || {
        get_socket(addr, "/api/overview", Some(("guest", "guest")))
    })
    .await
    .unwrap();
    assert_eq!(s, 200);
    assert!(body.contains("\"rabbitmq_version\""));
    let (s, _) = tokio::task::spawn_blocking(move || get_socket(addr, "/api/overview", None))
        .await
        .unwrap();
    assert_eq!(s, 401);
}
