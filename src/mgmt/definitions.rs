//! RabbitMQ's definitions format: export (GET /api/definitions) and import
//! (POST), so a file exported from RabbitMQ imports into Warren and back.
//!
//! Export is deterministic (every list sorted) so that export → import →
//! export gives the same document. Only durable things are exported, as
//! RabbitMQ does: durable exchanges (not the built-in ones), durable
//! non-exclusive queues, and bindings between them.

use super::ApiError;
use super::json::{json_to_table, table_to_json};
use super::ops;
use crate::broker::Broker;
use crate::broker::exchange::Destination;
use crate::store::defs::{Definitions, Table};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A policy in RabbitMQ's JSON shape, stored in the Policies table as is
/// (the policy engine applies them).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyDef {
    /// Vhost.
    pub vhost: String,
    /// Name.
    pub name: String,
    /// Regular expression over queue/exchange names.
    pub pattern: String,
    /// "queues", "exchanges", "all", "classic_queues", "quorum_queues", "streams".
    #[serde(rename = "apply-to", default = "all")]
    pub apply_to: String,
    /// Keys such as max-length, message-ttl, dead-letter-exchange.
    #[serde(default)]
    pub definition: serde_json::Map<String, Value>,
    /// Higher wins.
    #[serde(default)]
    pub priority: i64,
}

fn all() -> String {
    "all".into()
}

/// Stores a policy (validating its pattern).
pub async fn put_policy(b: &Broker, p: &PolicyDef) -> Result<(), ApiError> {
    regex::Regex::new(&p.pattern)
        .map_err(|e| ApiError::bad_request(format!("invalid pattern '{}': {e}", p.pattern)))?;
    if ![
        "queues",
        "exchanges",
        "all",
        "classic_queues",
        "quorum_queues",
        "streams",
    ]
    .contains(&p.apply_to.as_str())
    {
        return Err(ApiError::bad_request(format!(
            "invalid apply-to '{}'",
            p.apply_to
        )));
    }
    if p.definition.is_empty() {
        return Err(ApiError::bad_request("policy definition must not be empty"));
    }
    let st = b
        .storage
        .as_ref()
        .ok_or_else(|| ApiError::internal("no definitions store"))?;
    st.defs
        .put(Table::Policies, &Definitions::key(&[&p.vhost, &p.name]), p)
        .await?;
    if let Ok(v) = serde_json::to_value(p) {
        st.defs.replicate(crate::store::defs::DefChange::Import(
            json!({ "policies": [v] }).to_string(),
        ));
    }
    crate::broker::policy::reload(b, &p.vhost).await;
    Ok(())
}

/// The broker's definitions as RabbitMQ exports them.
pub fn export(b: &Broker) -> Result<Value, ApiError> {
    let users: Vec<Value> = b
        .users
        .list()
        .iter()
        .map(|u| serde_json::to_value(crate::auth::store::UserDef::of(u)).unwrap_or_default())
        .collect();
    let mut vnames: Vec<String> = b.vhosts.iter().map(|v| v.key().clone()).collect();
    vnames.sort();
    let vhosts: Vec<Value> = vnames
        .iter()
        .map(|n| json!({"name": n, "description": "", "tags": [], "metadata": {"description": "", "tags": []}, "limits": []}))
        .collect();
    let permissions: Vec<Value> = b
        .users
        .permissions()
        .iter()
        .map(|(u, v, p)| json!({"user": u, "vhost": v, "configure": p.configure, "write": p.write, "read": p.read}))
        .collect();
    let topic_permissions: Vec<Value> = b
        .users
        .topic_permissions()
        .iter()
        .map(|(u, v, p)| {
            serde_json::to_value(crate::auth::store::TopicPermissionDef::of(u, v, p))
                .unwrap_or_default()
        })
        .collect();
    let policies: Vec<Value> = match &b.storage {
        Some(st) => st
            .defs
            .list::<PolicyDef>(Table::Policies)?
            .into_iter()
            .map(|(_, p)| serde_json::to_value(p).unwrap_or_default())
            .collect(),
        None => Vec::new(),
    };
    let mut queues = Vec::new();
    let mut exchanges = Vec::new();
    let mut bindings = Vec::new();
    for vn in &vnames {
        let Some(v) = b.vhost(vn) else { continue };
        let mut qs: Vec<_> = v
            .queues
            .iter()
            .map(|q| q.value().clone())
            // Durable and not exclusive, here or (a proxy) on another node.
            .filter(|q| q.durable && q.exclusive_owner.is_none())
            .collect();
        qs.sort_by(|a, b| a.name.cmp(&b.name));
        for q in qs {
            queues.push(
                json!({"name": q.name, "vhost": vn, "durable": true, "auto_delete": q.auto_delete,
                               "arguments": table_to_json(&q.arguments)}),
            );
        }
        let mut es: Vec<_> = v.exchanges.iter().map(|e| e.value().clone()).collect();
        es.sort_by(|a, b| a.name.cmp(&b.name));
        for e in &es {
            if e.durable && !e.name.is_empty() && !e.name.starts_with("amq.") {
                exchanges.push(
                    json!({"name": e.name, "vhost": vn, "type": e.type_name(), "durable": true,
                                      "auto_delete": e.auto_delete, "internal": e.internal,
                                      "arguments": table_to_json(&e.arguments)}),
                );
            }
            for bd in e.bindings() {
                if !crate::broker::persist::binding_is_durable(e, &bd.dest) {
                    continue;
                }
                let dtype = match bd.dest {
                    Destination::Queue(_) => "queue",
                    Destination::Exchange(_) => "exchange",
                };
                bindings.push(
                    json!({"source": e.name, "vhost": vn, "destination": bd.dest.name(),
                                     "destination_type": dtype, "routing_key": bd.routing_key,
                                     "arguments": table_to_json(&bd.arguments)}),
                );
            }
        }
    }
    let key = |v: &Value| {
        format!(
            "{}\0{}\0{}\0{}\0{}",
            v["vhost"], v["source"], v["destination_type"], v["destination"], v["routing_key"]
        ) + &v["arguments"].to_string()
    };
    bindings.sort_by_key(key);
    Ok(json!({
        "rabbit_version": super::api::RABBITMQ_VERSION,
        "rabbitmq_version": super::api::RABBITMQ_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "users": users,
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": [],
        "global_parameters": [],
        "policies": policies,
        "queues": queues,
        "exchanges": exchanges,
        "bindings": bindings,
    }))
}

fn list<'a>(d: &'a Value, k: &str) -> &'a [Value] {
    d.get(k)
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

fn s<'a>(v: &'a Value, k: &str) -> &'a str {
    v.get(k).and_then(Value::as_str).unwrap_or("")
}

fn flag(v: &Value, k: &str, default: bool) -> bool {
    v.get(k).and_then(Value::as_bool).unwrap_or(default)
}

/// Imports a definitions document: vhosts, users, permissions, topic
/// permissions, policies, exchanges, queues, bindings, in that order. Objects that already exist
/// are left as they are when equivalent. Every object is tried; the first
/// failures are reported together (400).
pub async fn import(b: &std::sync::Arc<Broker>, d: &Value) -> Result<(), ApiError> {
    if !d.is_object() {
        return Err(ApiError::bad_request("definitions must be a JSON object"));
    }
    let mut errors: Vec<String> = Vec::new();
    let mut note = |what: String, r: Result<(), ApiError>| {
        if let Err(e) = r {
            errors.push(format!("{what}: {}", e.reason));
        }
    };
    for v in list(d, "vhosts") {
        note(
            format!("vhost '{}'", s(v, "name")),
            ops::add_vhost(b, s(v, "name")).await.map(|_| ()),
        );
    }
    for u in list(d, "users") {
        note(
            format!("user '{}'", s(u, "name")),
            super::api::apply_user(b, s(u, "name"), u).await.map(|_| ()),
        );
    }
    for p in list(d, "permissions") {
        note(
            format!("permission of '{}' on '{}'", s(p, "user"), s(p, "vhost")),
            super::api::apply_permission(b, s(p, "vhost"), s(p, "user"), p)
                .await
                .map(|_| ()),
        );
    }
    for p in list(d, "topic_permissions") {
        note(
            format!(
                "topic permission of '{}' on exchange '{}' in '{}'",
                s(p, "user"),
                s(p, "exchange"),
                s(p, "vhost")
            ),
            super::api::apply_topic_permission(b, s(p, "vhost"), s(p, "user"), p)
                .await
                .map(|_| ()),
        );
    }
    for p in list(d, "policies") {
        let r = match serde_json::from_value::<PolicyDef>(p.clone()) {
            Ok(pd) => put_policy(b, &pd).await,
            Err(e) => Err(ApiError::bad_request(e.to_string())),
        };
        note(format!("policy '{}'", s(p, "name")), r);
    }
    for e in list(d, "exchanges") {
        let r = ops::declare_exchange(
            b,
            s(e, "vhost"),
            s(e, "name"),
            s(e, "type"),
            flag(e, "durable", true),
            flag(e, "auto_delete", false),
            flag(e, "internal", false),
            json_to_table(e.get("arguments").unwrap_or(&Value::Null)),
        )
        .await;
        note(
            format!("exchange '{}' in vhost '{}'", s(e, "name"), s(e, "vhost")),
            r,
        );
    }
    for q in list(d, "queues") {
        let r = ops::declare_queue(
            b,
            s(q, "vhost"),
            s(q, "name"),
            flag(q, "durable", true),
            flag(q, "auto_delete", false),
            json_to_table(q.get("arguments").unwrap_or(&Value::Null)),
        )
        .await
        .map(|_| ());
        note(
            format!("queue '{}' in vhost '{}'", s(q, "name"), s(q, "vhost")),
            r,
        );
    }
    for bd in list(d, "bindings") {
        let r = ops::bind(
            b,
            s(bd, "vhost"),
            s(bd, "source"),
            s(bd, "destination_type") == "queue",
            s(bd, "destination"),
            s(bd, "routing_key"),
            json_to_table(bd.get("arguments").unwrap_or(&Value::Null)),
        )
        .await;
        note(
            format!(
                "binding from '{}' to '{}' in vhost '{}'",
                s(bd, "source"),
                s(bd, "destination"),
                s(bd, "vhost")
            ),
            r,
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "some definitions could not be imported: {}",
            errors.join("; ")
        )))
    }
}
