//! Definitions: export, wipe, import, export again; a RabbitMQ file imports.

use crate::common::*;
use crate::http::call;
use serde_json::{Value, json};

async fn setup(broker: &std::sync::Arc<warren::broker::Broker>) {
    for (m, p, b) in [
        ("PUT", "/api/vhosts/app", None),
        (
            "PUT",
            "/api/users/alice",
            Some(json!({"password": "a", "tags": ["management"]})),
        ),
        (
            "PUT",
            "/api/permissions/app/alice",
            Some(json!({"configure": "^a", "write": ".*", "read": ".*"})),
        ),
        (
            "PUT",
            "/api/exchanges/app/events",
            Some(json!({"type": "topic", "durable": true})),
        ),
        (
            "PUT",
            "/api/exchanges/app/fan",
            Some(
                json!({"type": "fanout", "durable": true, "arguments": {"alternate-exchange": "events"}}),
            ),
        ),
        (
            "PUT",
            "/api/queues/app/orders",
            Some(json!({"durable": true, "arguments": {"x-max-length": 10}})),
        ),
        (
            "PUT",
            "/api/queues/app/audit",
            Some(json!({"durable": true})),
        ),
        (
            "POST",
            "/api/bindings/app/e/events/q/orders",
            Some(json!({"routing_key": "order.*"})),
        ),
        (
            "POST",
            "/api/bindings/app/e/fan/e/events",
            Some(json!({"routing_key": ""})),
        ),
        (
            "POST",
            "/api/bindings/app/e/events/q/audit",
            Some(json!({"routing_key": "#", "arguments": {"x-k": "v"}})),
        ),
        (
            "PUT",
            "/api/policies/app/ttl",
            Some(
                json!({"pattern": "^audit$", "definition": {"message-ttl": 60000}, "priority": 1, "apply-to": "queues"}),
            ),
        ),
    ] {
        let (s, e) = call(broker, m, p, b).await;
        assert!(s.is_success(), "{m} {p}: {s} {e}");
    }
}

#[tokio::test]
async fn round_trip() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    setup(&broker).await;
    let (_, first) = call(&broker, "GET", "/api/definitions", None).await;
    assert_eq!(first["queues"].as_array().unwrap().len(), 2);
    assert_eq!(first["bindings"].as_array().unwrap().len(), 3);
    // wipe
    let (s, _) = call(&broker, "DELETE", "/api/vhosts/app", None).await;
    assert_eq!(s, 204);
    call(&broker, "DELETE", "/api/users/alice", None).await;
    let (_, wiped) = call(&broker, "GET", "/api/definitions", None).await;
    assert_eq!(wiped["queues"], json!([]));
    assert_eq!(wiped["policies"], json!([]));
    // import and export again
    let (s, e) = call(&broker, "POST", "/api/definitions", Some(first.clone())).await;
    assert_eq!(s, 204, "{e}");
    let (_, second) = call(&broker, "GET", "/api/definitions", None).await;
    assert_eq!(first, second);
    // and into a fresh broker
    let b2 = TestBroker::start().await;
    let broker2 = b2.handle.as_ref().unwrap().broker.clone();
    call(&broker2, "POST", "/api/definitions", Some(first.clone())).await;
    let (_, third) = call(&broker2, "GET", "/api/definitions", None).await;
    assert_eq!(first["queues"], third["queues"]);
    assert_eq!(first["bindings"], third["bindings"]);
    assert_eq!(first["permissions"], third["permissions"]);
}

#[tokio::test]
async fn imports_a_rabbitmq_export() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/ops/fixtures/rabbitmq-definitions.json"
    ))
    .unwrap();
    let d: Value = serde_json::from_str(&text).unwrap();
    let (s, e) = call(&broker, "POST", "/api/definitions", Some(d)).await;
    assert_eq!(s, 204, "{e}");
    let (_, q) = call(&broker, "GET", "/api/queues/shop/orders.created", None).await;
    assert_eq!(q["durable"], true);
    assert_eq!(q["arguments"]["x-message-ttl"], 86400000);
    let (_, bs) = call(&broker, "GET", "/api/bindings/shop", None).await;
    assert!(
        bs.as_array()
            .unwrap()
            .iter()
            .any(|b| b["source"] == "shop.events" && b["routing_key"] == "order.created")
    );
    // The user's RabbitMQ password hash works for AMQP logins ("s3cret").
    let url = format!("amqp://shop-app:s3cret@{}/shop", b.addr);
    lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
        .await
        .expect("imported user logs in");
    let (_, tags) = call(&broker, "GET", "/api/users/ops", None).await;
    assert_eq!(tags["tags"], json!(["administrator", "monitoring"]));
}
