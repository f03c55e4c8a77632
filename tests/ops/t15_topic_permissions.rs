//! Topic permissions (RabbitMQ's topic authorisation): routing keys checked
//! on topic exchanges at publish (write) and bind (read), {username}
//! expansion, the management API, definitions and warrenctl.

use crate::common::*;
use crate::http::call;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use serde_json::json;

fn refused(perm: &str, key: &str, exchange: &str) -> String {
    format!(
        "ACCESS_REFUSED - {perm} access to topic '{key}' in exchange '{exchange}' in vhost '/' refused for user 'bob'"
    )
}

async fn ok(
    broker: &std::sync::Arc<warren::broker::Broker>,
    m: &str,
    p: &str,
    b: serde_json::Value,
) -> u16 {
    let (s, e) = call(broker, m, p, Some(b)).await;
    assert!(s.is_success(), "{m} {p}: {s} {e}");
    s.as_u16()
}

/// Publishes with confirms; Ok when acked, the AMQP error when refused.
async fn confirmed(ch: &lapin::Channel, exchange: &str, key: &str) -> Result<(), (u16, String)> {
    let r = match ch
        .basic_publish(
            exchange.into(),
            key.into(),
            BasicPublishOptions::default(),
            b"m",
            BasicProperties::default(),
        )
        .await
    {
        Ok(c) => c.await.map(|_| ()),
        Err(e) => Err(e),
    };
    r.map_err(|e| amqp_error(&e).unwrap_or_else(|| panic!("not an AMQP error: {e:?}")))
}

async fn confirm_channel(conn: &Connection) -> lapin::Channel {
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch
}

async fn bind(ch: &lapin::Channel, q: &str, x: &str, key: &str) -> Result<(), (u16, String)> {
    ch.queue_bind(
        q.into(),
        x.into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .map_err(|e| amqp_error(&e).unwrap_or_else(|| panic!("not an AMQP error: {e:?}")))
}

#[tokio::test]
async fn topic_permission_matrix() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    ok(
        &broker,
        "PUT",
        "/api/users/bob",
        json!({"password": "bob", "tags": "management"}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/permissions/%2F/bob",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/exchanges/%2F/events",
        json!({"type": "topic"}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/exchanges/%2F/free",
        json!({"type": "topic"}),
    )
    .await;
    // {username} is expanded; the first topic permission in the vhost is
    // "created", the next one (another exchange) an update.
    let s = ok(
        &broker,
        "PUT",
        "/api/topic-permissions/%2F/bob",
        json!({"exchange": "amq.topic", "write": "^{username}\\.", "read": "^(public|{username})\\."}),
    )
    .await;
    assert_eq!(s, 201);
    let s = ok(
        &broker,
        "PUT",
        "/api/topic-permissions/%2F/bob",
        json!({"exchange": "events", "write": "^a\\.", "read": ""}),
    )
    .await;
    assert_eq!(s, 204);

    let bob = Connection::connect(
        &format!("amqp://bob:bob@{}/%2f", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    // publish: write pattern against the routing key
    let ch = confirm_channel(&bob).await;
    confirmed(&ch, "amq.topic", "bob.orders").await.unwrap();
    let e = confirmed(&ch, "amq.topic", "alice.orders")
        .await
        .unwrap_err();
    assert_eq!(e, (403, refused("write", "alice.orders", "amq.topic")));
    let ch = confirm_channel(&bob).await;
    confirmed(&ch, "events", "a.1").await.unwrap();
    // not topic exchanges, and topic exchanges without a permission: free
    confirmed(&ch, "amq.direct", "alice.orders").await.unwrap();
    confirmed(&ch, "free", "anything.at.all").await.unwrap();
    let e = confirmed(&ch, "events", "b.1").await.unwrap_err();
    assert_eq!(e, (403, refused("write", "b.1", "events")));

    // bind: read pattern against the binding key
    let ch = bob.create_channel().await.unwrap();
    declare_queue(&ch, "bob-q").await;
    bind(&ch, "bob-q", "amq.topic", "public.#").await.unwrap();
    bind(&ch, "bob-q", "amq.topic", "bob.*").await.unwrap();
    bind(&ch, "bob-q", "amq.direct", "alice.x").await.unwrap();
    // "" is "^$": only the empty key
    bind(&ch, "bob-q", "events", "").await.unwrap();
    let e = bind(&ch, "bob-q", "amq.topic", "alice.*")
        .await
        .unwrap_err();
    assert_eq!(e, (403, refused("read", "alice.*", "amq.topic")));
    let ch = bob.create_channel().await.unwrap();
    let e = bind(&ch, "bob-q", "events", "a.1").await.unwrap_err();
    assert_eq!(e, (403, refused("read", "a.1", "events")));
    // unbind is checked too
    let ch = bob.create_channel().await.unwrap();
    let e = ch
        .queue_unbind(
            "bob-q".into(),
            "amq.topic".into(),
            "alice.*".into(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&e).unwrap())
        .unwrap_err();
    assert_eq!(e, (403, refused("read", "alice.*", "amq.topic")));
    // exchange.bind: the source's read pattern
    let ch = bob.create_channel().await.unwrap();
    ch.exchange_bind(
        "free".into(),
        "amq.topic".into(),
        "bob.#".into(),
        ExchangeBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let e = ch
        .exchange_bind(
            "free".into(),
            "amq.topic".into(),
            "alice.#".into(),
            ExchangeBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| amqp_error(&e).unwrap())
        .unwrap_err();
    assert_eq!(e, (403, refused("read", "alice.#", "amq.topic")));

    // guest has no topic permissions: everything goes
    let guest = b.connect().await;
    let gch = confirm_channel(&guest).await;
    confirmed(&gch, "amq.topic", "alice.orders").await.unwrap();
    let gch = guest.create_channel().await.unwrap();
    bind(&gch, "bob-q", "amq.topic", "alice.*").await.unwrap();

    // management: publishing over HTTP is checked as well
    let http_publish = |key: &'static str| {
        let broker = broker.clone();
        async move {
            crate::http::call_as(
                &broker,
                Some(("bob", "bob")),
                "POST",
                "/api/exchanges/%2F/amq.topic/publish",
                Some(json!({"routing_key": key, "payload": "p", "properties": {}})),
            )
            .await
        }
    };
    let (s, e) = http_publish("bob.x").await;
    assert_eq!(s, 200, "{e}");
    let (s, e) = http_publish("alice.x").await;
    assert_eq!(s, 401, "{e}");
    assert_eq!(e["reason"], refused("write", "alice.x", "amq.topic"));

    // Clearing the permission reaches the open connection.
    let (s, _) = call(
        &broker,
        "DELETE",
        "/api/topic-permissions/%2F/bob/amq.topic",
        None,
    )
    .await;
    assert_eq!(s, 204);
    let ch = confirm_channel(&bob).await;
    confirmed(&ch, "amq.topic", "alice.orders").await.unwrap();
    let e = confirmed(&ch, "events", "b.2").await.unwrap_err();
    assert_eq!(e, (403, refused("write", "b.2", "events")));
}

#[tokio::test]
async fn vhost_expansion() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    ok(&broker, "PUT", "/api/vhosts/tenant-1", json!({})).await;
    ok(
        &broker,
        "PUT",
        "/api/users/bob",
        json!({"password": "bob", "tags": ""}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/permissions/tenant-1/bob",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/topic-permissions/tenant-1/bob",
        json!({"exchange": "amq.topic", "write": "^{vhost}\\.{username}$", "read": ".*"}),
    )
    .await;
    let bob = Connection::connect(
        &format!("amqp://bob:bob@{}/tenant-1", b.addr),
        ConnectionProperties::default(),
    )
    .await
    .unwrap();
    let ch = confirm_channel(&bob).await;
    confirmed(&ch, "amq.topic", "tenant-1.bob").await.unwrap();
    let e = confirmed(&ch, "amq.topic", "tenant-2.bob")
        .await
        .unwrap_err();
    assert_eq!(
        e,
        (
            403,
            "ACCESS_REFUSED - write access to topic 'tenant-2.bob' in exchange 'amq.topic' in vhost 'tenant-1' refused for user 'bob'".into()
        )
    );
}

#[tokio::test]
async fn topic_permissions_api_and_definitions() {
    let b = TestBroker::start().await;
    let broker = b.handle.as_ref().unwrap().broker.clone();
    ok(&broker, "PUT", "/api/vhosts/app", json!({})).await;
    ok(
        &broker,
        "PUT",
        "/api/users/bob",
        json!({"password": "bob", "tags": ""}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/topic-permissions/app/bob",
        json!({"exchange": "amq.topic", "write": "^{username}\\.", "read": ".*"}),
    )
    .await;
    ok(
        &broker,
        "PUT",
        "/api/topic-permissions/%2F/bob",
        json!({"exchange": "amq.topic", "write": "", "read": "^x"}),
    )
    .await;
    let expected_app = json!({"user": "bob", "vhost": "app", "exchange": "amq.topic", "write": "^{username}\\.", "read": ".*"});
    let expected_root =
        json!({"user": "bob", "vhost": "/", "exchange": "amq.topic", "write": "", "read": "^x"});
    let (s, all) = call(&broker, "GET", "/api/topic-permissions", None).await;
    assert_eq!(s, 200);
    assert_eq!(all, json!([expected_root, expected_app]));
    let (_, one) = call(&broker, "GET", "/api/topic-permissions/app/bob", None).await;
    assert_eq!(one, json!([expected_app]));
    let (_, v) = call(&broker, "GET", "/api/vhosts/app/topic-permissions", None).await;
    assert_eq!(v, json!([expected_app]));
    let (_, u) = call(&broker, "GET", "/api/users/bob/topic-permissions", None).await;
    assert_eq!(u, json!([expected_root, expected_app]));
    // errors: RabbitMQ's shapes
    let (s, _) = call(&broker, "GET", "/api/topic-permissions/app/guest", None).await;
    assert_eq!(s, 404);
    let (s, e) = call(
        &broker,
        "PUT",
        "/api/topic-permissions/nope/bob",
        Some(json!({"exchange": "amq.topic", "write": ".*", "read": ".*"})),
    )
    .await;
    assert_eq!(
        (s.as_u16(), e["reason"].as_str()),
        (400, Some("vhost_or_user_not_found"))
    );
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/topic-permissions/app/bob",
        Some(json!({"exchange": "amq.topic", "write": "(", "read": ".*"})),
    )
    .await;
    assert_eq!(s, 400);
    let (s, _) = call(
        &broker,
        "PUT",
        "/api/topic-permissions/app/bob",
        Some(json!({"write": ".*", "read": ".*"})),
    )
    .await;
    assert_eq!(s, 400);
    // not for non-administrators
    ok(
        &broker,
        "PUT",
        "/api/users/mon",
        json!({"password": "m", "tags": "monitoring"}),
    )
    .await;
    let (s, _) = crate::http::call_as(
        &broker,
        Some(("mon", "m")),
        "GET",
        "/api/topic-permissions",
        None,
    )
    .await;
    assert_eq!(s, 401);

    // definitions: exported, wiped, imported back identically
    let (_, defs) = call(&broker, "GET", "/api/definitions", None).await;
    assert_eq!(
        defs["topic_permissions"],
        json!([expected_root, expected_app])
    );
    let (s, _) = call(&broker, "DELETE", "/api/topic-permissions/app/bob", None).await;
    assert_eq!(s, 204);
    let (s, _) = call(&broker, "DELETE", "/api/topic-permissions/app/bob", None).await;
    assert_eq!(s, 404);
    call(&broker, "DELETE", "/api/users/bob", None).await;
    let (_, wiped) = call(&broker, "GET", "/api/topic-permissions", None).await;
    assert_eq!(
        wiped,
        json!([]),
        "deleting the user drops its topic permissions"
    );
    let (s, e) = call(&broker, "POST", "/api/definitions", Some(defs.clone())).await;
    assert_eq!(s, 204, "{e}");
    let (_, again) = call(&broker, "GET", "/api/definitions", None).await;
    assert_eq!(again["topic_permissions"], defs["topic_permissions"]);
    assert_eq!(again, defs);
    // deleting a vhost drops its topic permissions
    call(&broker, "DELETE", "/api/vhosts/app", None).await;
    let (_, left) = call(&broker, "GET", "/api/topic-permissions", None).await;
    assert_eq!(left, json!([expected_root]));
}

#[test]
fn warrenctl_and_restart() {
    use crate::process::WarrenProcess;
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mgmt = |p: &WarrenProcess, nth: usize| {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let log = p.log_text();
            let key = "management API listening on http://";
            if let Some((i, _)) = log.match_indices(key).nth(nth - 1) {
                return log[i + key.len()..]
                    .split_whitespace()
                    .next()
                    .unwrap()
                    .trim_end_matches(|c: char| !c.is_ascii_digit())
                    .to_string();
            }
            assert!(std::time::Instant::now() < deadline, "{log}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };
    let ctl = |addr: &str, args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_warrenctl"))
            .args(["-n", addr])
            .args(args)
            .env_remove("WARRENCTL_USER")
            .env_remove("WARRENCTL_PASS")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let p = WarrenProcess::start(&data);
    let a = mgmt(&p, 1);
    assert_eq!(ctl(&a, &["add_user", "bob", "pw"]).0, 0);
    let (c, out) = ctl(
        &a,
        &[
            "set_topic_permissions",
            "bob",
            "amq.topic",
            "^{username}-",
            "^{username}-",
        ],
    );
    assert_eq!(c, 0);
    assert_eq!(
        out,
        "Setting topic permissions on \"amq.topic\" for user \"bob\" in vhost \"/\" ...\n"
    );
    assert_eq!(
        ctl(&a, &["set_topic_permissions", "bob", "amq.match", ".*", ""]).0,
        0
    );
    p.stop();
    let p = WarrenProcess::start(&data);
    let a = mgmt(&p, 2);
    let (c, out) = ctl(&a, &["list_topic_permissions"]);
    assert_eq!(c, 0);
    assert_eq!(
        out,
        "Listing topic permissions for vhost \"/\" ...\nuser\texchange\twrite\tread\nbob\tamq.match\t.*\t\nbob\tamq.topic\t^{username}-\t^{username}-\n"
    );
    let (_, out) = ctl(&a, &["-q", "list_user_topic_permissions", "bob"]);
    assert_eq!(
        out,
        "/\tamq.match\t.*\t\n/\tamq.topic\t^{username}-\t^{username}-\n"
    );
    assert_eq!(
        ctl(&a, &["clear_topic_permissions", "bob", "amq.match"]).0,
        0
    );
    let (_, out) = ctl(&a, &["-q", "list_topic_permissions"]);
    assert_eq!(out, "bob\tamq.topic\t^{username}-\t^{username}-\n");
    assert_eq!(ctl(&a, &["clear_topic_permissions", "bob"]).0, 0);
    let (_, out) = ctl(&a, &["-q", "list_topic_permissions"]);
    assert_eq!(out, "");
    assert_eq!(ctl(&a, &["clear_topic_permissions", "bob"]).0, 65);
    p.stop();
}
