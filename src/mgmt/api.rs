//! The management API handlers: RabbitMQ's paths and JSON shapes.
//!
//! Reads need a user tagged management, monitoring, policymaker or
//! administrator (management users see only vhosts they have permissions
//! on); writes need administrator (policies: policymaker).

use super::json::{json_to_table, table_to_json, value_to_json};
use super::{ApiError, AppState, Caller, ops};
use crate::broker::conns::ChannelStats;
use crate::broker::exchange::{Binding, Exchange};
use crate::broker::{Broker, VHost};
use crate::queue::QueueRef;
use amq_protocol::protocol::BasicProperties;
use amq_protocol::types::{AMQPValue, FieldTable, ShortString};
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

type R = Result<Response, ApiError>;

/// The product version RabbitMQ clients and tools see.
pub const RABBITMQ_VERSION: &str = "3.13.7";

fn ok_json(v: Value) -> R {
    Ok(Json(v).into_response())
}

fn no_content() -> R {
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn created() -> R {
    Ok(StatusCode::CREATED.into_response())
}

static NODE_NAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Sets this process's node name (from the cluster configuration).
pub fn set_node_name(name: &str) {
    let _ = NODE_NAME.set(name.to_string());
}

/// Every route.
pub fn routes() -> axum::Router<AppState> {
    axum::Router::new()
        .route("/api/overview", get(overview))
        .route("/api/whoami", get(whoami))
        .route("/api/nodes", get(nodes))
        .route("/api/nodes/{node}", get(node))
        .route("/api/cluster", get(super::cluster::get_status))
        .route("/api/cluster/join", post(super::cluster::post_join))
        .route("/api/cluster/forget", post(super::cluster::post_forget))
        .route("/api/cluster/members", post(super::cluster::post_members))
        .route("/api/cluster/grow", post(super::cluster::post_grow))
        .route("/api/cluster/shrink", post(super::cluster::post_shrink))
        .route("/api/connections", get(connections))
        .route(
            "/api/connections/{name}",
            get(connection).delete(close_connection),
        )
        .route("/api/vhosts/{vhost}/connections", get(vhost_connections))
        .route("/api/channels", get(channels))
        .route("/api/channels/{name}", get(channel))
        .route("/api/connections/{name}/channels", get(connection_channels))
        .route("/api/vhosts/{vhost}/channels", get(vhost_channels))
        .route("/api/consumers", get(consumers))
        .route("/api/consumers/{vhost}", get(consumers_vhost))
        .route("/api/exchanges", get(exchanges))
        .route("/api/exchanges/{vhost}", get(exchanges_vhost))
        .route(
            "/api/exchanges/{vhost}/{name}",
            get(exchange).put(put_exchange).delete(delete_exchange),
        )
        .route("/api/exchanges/{vhost}/{name}/publish", post(publish))
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/source",
            get(exchange_bindings_source),
        )
        .route(
            "/api/exchanges/{vhost}/{name}/bindings/destination",
            get(exchange_bindings_destination),
        )
        .route("/api/queues", get(queues))
        .route("/api/queues/{vhost}", get(queues_vhost))
        .route(
            "/api/queues/{vhost}/{name}",
            get(queue).put(put_queue).delete(delete_queue),
        )
        .route(
            "/api/super-streams/{vhost}/{name}",
            axum::routing::put(put_super_stream),
        )
        .route(
            "/api/queues/{vhost}/{name}/contents",
            axum::routing::delete(purge_queue),
        )
        .route("/api/queues/{vhost}/{name}/get", post(get_messages))
        .route("/api/queues/{vhost}/{name}/peek", get(peek_messages))
        .route("/api/queues/{vhost}/{name}/bindings", get(queue_bindings))
        .route("/api/bindings", get(bindings))
        .route("/api/bindings/{vhost}", get(bindings_vhost))
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}",
            get(bindings_between).post(post_binding),
        )
        .route(
            "/api/bindings/{vhost}/e/{source}/{dtype}/{dest}/{props}",
            get(binding).delete(delete_binding),
        )
        .route("/api/vhosts", get(vhosts))
        .route(
            "/api/vhosts/{vhost}",
            get(vhost).put(put_vhost).delete(delete_vhost),
        )
        .route("/api/vhosts/{vhost}/permissions", get(vhost_permissions))
        .route("/api/users", get(users))
        .route(
            "/api/users/{name}",
            get(user).put(put_user).delete(delete_user),
        )
        .route("/api/users/{name}/permissions", get(user_permissions))
        .route("/api/permissions", get(permissions))
        .route("/api/topic-permissions", get(topic_permissions))
        .route(
            "/api/topic-permissions/{vhost}",
            get(topic_permissions_vhost),
        )
        .route(
            "/api/topic-permissions/{vhost}/{user}",
            get(topic_permission)
                .put(put_topic_permission)
                .delete(delete_topic_permission),
        )
        .route(
            "/api/topic-permissions/{vhost}/{user}/{exchange}",
            get(topic_permission_exchange).delete(delete_topic_permission_exchange),
        )
        .route(
            "/api/vhosts/{vhost}/topic-permissions",
            get(topic_permissions_vhost),
        )
        .route(
            "/api/users/{name}/topic-permissions",
            get(user_topic_permissions),
        )
        .route(
            "/api/permissions/{vhost}/{user}",
            get(permission)
                .put(put_permission)
                .delete(delete_permission),
        )
        .route("/api/policies", get(policies))
        .route("/api/policies/{vhost}", get(policies_vhost))
        .route(
            "/api/policies/{vhost}/{name}",
            get(policy).put(put_policy).delete(delete_policy),
        )
        .route(
            "/api/definitions",
            get(export_definitions).post(import_definitions),
        )
        .route("/api/health/checks/alarms", get(health_alarms))
        .route("/api/aliveness-test/{vhost}", get(aliveness))
        .fallback(|| async { ApiError::not_found() })
        .method_not_allowed_fallback(|| async {
            ApiError {
                status: StatusCode::METHOD_NOT_ALLOWED,
                error: "Method Not Allowed",
                reason: "Method Not Allowed".into(),
            }
        })
}

// ---------------------------------------------------------------------------
// node-wide

/// This node's name, RabbitMQ style.
pub fn node_name() -> String {
    if let Some(n) = NODE_NAME.get() {
        return n.clone();
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    format!("warren@{host}")
}

fn rate(v: f64) -> Value {
    super::stats::rate(v)
}

async fn overview(State(st): State<AppState>, caller: Caller) -> R {
    let b = &st.broker;
    let (mut ready, mut unacked, mut consumers, mut nqueues, mut nex) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    for v in visible_vhosts(b, &caller) {
        nex += v.exchanges.len() as u64;
        for q in all_queues(&v) {
            nqueues += 1;
            let c = q.stats().await.unwrap_or_default();
            ready += c.ready;
            unacked += c.unacked;
            consumers += c.consumers;
        }
    }
    // Message totals: every open connection the caller sees, plus (for
    // those who see everything) connections that have closed.
    let mut totals = if caller.sees_all() {
        b.mgmt_stats.retired.load()
    } else {
        super::stats::Counts::default()
    };
    for c in b.connections.iter().filter(|c| caller.can_see(b, &c.vhost)) {
        totals.add(&c.stats.load());
    }
    let rates = if caller.sees_all() {
        b.mgmt_stats.overview.rates(&totals.0)
    } else {
        Vec::new()
    };
    let conns: Vec<_> = b
        .connections
        .iter()
        .filter(|c| caller.can_see(b, &c.vhost))
        .map(|c| c.channel_numbers().len())
        .collect();
    let cfg = &b.config;
    let mut listeners = vec![
        json!({"node": node_name(), "protocol": "amqp", "ip_address": cfg.amqp.bind, "port": cfg.amqp.port}),
        json!({"node": node_name(), "protocol": "http", "ip_address": cfg.mgmt.bind, "port": cfg.mgmt.port}),
        json!({"node": node_name(), "protocol": "http/prometheus", "ip_address": cfg.metrics.bind, "port": cfg.metrics.port}),
    ];
    if cfg.tls.enabled {
        let bind = if cfg.tls.bind.is_empty() {
            &cfg.amqp.bind
        } else {
            &cfg.tls.bind
        };
        listeners.push(json!({"node": node_name(), "protocol": "amqp/ssl", "ip_address": bind, "port": cfg.tls.port}));
    }
    ok_json(json!({
        "management_version": RABBITMQ_VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "Warren",
        "product_version": env!("CARGO_PKG_VERSION"),
        "erlang_version": "n/a",
        "cluster_name": node_name(),
        "node": node_name(),
        "message_stats": super::stats::overview_json(&totals, &rates),
        "queue_totals": {"messages": ready + unacked, "messages_details": rate(0.0), "messages_ready": ready,
                         "messages_ready_details": rate(0.0), "messages_unacknowledged": unacked,
                         "messages_unacknowledged_details": rate(0.0)},
        "object_totals": {"connections": conns.len(), "channels": conns.iter().sum::<usize>(), "exchanges": nex,
                          "queues": nqueues, "consumers": consumers},
        "listeners": listeners,
        "contexts": [{"node": node_name(), "description": "RabbitMQ Management", "path": "/", "port": cfg.mgmt.port.to_string()}],
    }))
}

async fn whoami(caller: Caller) -> R {
    ok_json(json!({"name": caller.user.name, "tags": caller.user.tags}))
}

fn node_json(b: &Broker) -> Value {
    let l = &b.limits;
    let alarm = b.alarm().borrow().clone();
    let mem_used = l.memory_used.load(Ordering::Relaxed);
    let mem_limit = l.memory_bytes.load(Ordering::Relaxed);
    let disk_free = l.disk_free.load(Ordering::Relaxed);
    let disk_limit = l.disk_free_bytes.load(Ordering::Relaxed);
    json!({
        "name": node_name(),
        "type": "disc",
        "running": true,
        "os_pid": std::process::id().to_string(),
        "mem_used": mem_used,
        "mem_limit": mem_limit,
        "mem_alarm": alarm.as_deref().is_some_and(|a| a.contains("memory")),
        "disk_free": disk_free,
        "disk_free_limit": disk_limit,
        "disk_free_alarm": alarm.as_deref().is_some_and(|a| a.contains("disk")),
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "uptime": super::metrics::uptime_ms(),
        "rates_mode": "basic",
    })
}

async fn nodes(State(st): State<AppState>, _c: Caller) -> R {
    let mut out = vec![node_json(&st.broker)];
    // Other cluster members, as far as this node knows them.
    if let Some(c) = st.broker.cluster.get() {
        for (id, info) in c.members() {
            if id != c.me.id {
                out.push(json!({"name": info.name, "type": "disc", "running": c.alive(id)}));
            }
        }
    }
    ok_json(Value::Array(out))
}

async fn node(State(st): State<AppState>, _c: Caller, Path(n): Path<String>) -> R {
    if n != node_name() {
        return Err(ApiError::not_found());
    }
    ok_json(node_json(&st.broker))
}

async fn health_alarms(State(st): State<AppState>, _c: Caller) -> R {
    match st.broker.alarm().borrow().clone() {
        None => ok_json(json!({"status": "ok"})),
        Some(reason) => Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(
                json!({"status": "failed", "reason": format!("resource alarm(s) in effect: {reason}"),
                        "alarms": [{"node": node_name(), "resource": if reason.contains("disk") {"disk"} else {"memory"}}]}),
            ),
        )
            .into_response()),
    }
}

async fn aliveness(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    let b = &st.broker;
    if !caller.can_see(b, &vh) {
        return Err(ApiError::unauthorised("Access refused."));
    }
    let q = ops::declare_queue(
        b,
        &vh,
        "aliveness-test",
        false,
        false,
        FieldTable::default(),
    )
    .await?;
    ops::publish(
        b,
        &vh,
        "",
        "aliveness-test",
        BasicProperties::default(),
        bytes::Bytes::from_static(b"test_message"),
    )
    .await?;
    let got = ops::get(b, &q, 1, false).await;
    if got
        .first()
        .and_then(|(e, _)| e.msg.as_ref())
        .is_some_and(|m| &m.body[..] == b"test_message")
    {
        ok_json(json!({"status": "ok"}))
    } else {
        Ok((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "failed", "reason": "message not received"})),
        )
            .into_response())
    }
}

// ---------------------------------------------------------------------------
// connections, channels, consumers

fn visible_vhosts(b: &Broker, caller: &Caller) -> Vec<Arc<VHost>> {
    let mut v: Vec<Arc<VHost>> = b
        .vhosts
        .iter()
        .filter(|v| caller.can_see(b, v.key()))
        .map(|v| v.value().clone())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

fn all_queues(v: &VHost) -> Vec<Arc<QueueRef>> {
    let mut q: Vec<Arc<QueueRef>> = v.queues.iter().map(|q| q.value().clone()).collect();
    q.sort_by(|a, b| a.name.cmp(&b.name));
    q
}

fn conn_json(c: &crate::broker::conns::ConnInfo) -> Value {
    let props = table_to_json(&c.client_properties);
    json!({
        "name": c.name,
        "node": node_name(),
        "vhost": c.vhost,
        "user": c.user,
        "state": "running",
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "auth_mechanism": "PLAIN",
        "ssl": false,
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "channels": c.channel_numbers().len(),
        "channel_max": c.channel_max,
        "frame_max": c.frame_max,
        "timeout": c.heartbeat,
        "connected_at": c.connected_at,
        "client_properties": props,
        "user_provided_name": c.client_properties.inner().get("connection_name").map(value_to_json),
    })
}

fn visible_conns(b: &Broker, caller: &Caller) -> Vec<crate::broker::conns::ConnInfo> {
    let mut v: Vec<_> = b
        .connections
        .iter()
        .filter(|c| caller.sees_all() || c.user == caller.user.name)
        .map(|c| c.value().clone())
        .collect();
    v.sort_by_key(|c| c.id);
    v
}

async fn connections(State(st): State<AppState>, caller: Caller) -> R {
    ok_json(Value::Array(
        visible_conns(&st.broker, &caller)
            .iter()
            .map(conn_json)
            .collect(),
    ))
}

async fn vhost_connections(
    State(st): State<AppState>,
    caller: Caller,
    Path(vh): Path<String>,
) -> R {
    ops::vhost(&st.broker, &vh)?;
    ok_json(Value::Array(
        visible_conns(&st.broker, &caller)
            .iter()
            .filter(|c| c.vhost == vh)
            .map(conn_json)
            .collect(),
    ))
}

fn find_conn(
    b: &Broker,
    caller: &Caller,
    name: &str,
) -> Result<crate::broker::conns::ConnInfo, ApiError> {
    visible_conns(b, caller)
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(ApiError::not_found)
}

async fn connection(State(st): State<AppState>, caller: Caller, Path(name): Path<String>) -> R {
    ok_json(conn_json(&find_conn(&st.broker, &caller, &name)?))
}

async fn close_connection(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> R {
    let c = find_conn(&st.broker, &caller, &name)?;
    if !caller.is_admin() && c.user != caller.user.name {
        return Err(ApiError::unauthorised("Not administrator user"));
    }
    let reason = headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin")
        .to_string();
    let _ = c.tx.send(crate::broker::ConnCmd::ForceClose { reason });
    no_content()
}

fn channel_json(c: &crate::broker::conns::ConnInfo, n: u16, st: &ChannelStats) -> Value {
    let r = Ordering::Relaxed;
    json!({
        "name": format!("{} ({n})", c.name),
        "number": n,
        "node": node_name(),
        "vhost": c.vhost,
        "user": c.user,
        "state": "running",
        "connection_details": {"name": c.name, "peer_host": c.peer.ip().to_string(), "peer_port": c.peer.port()},
        "prefetch_count": st.prefetch_count.load(r),
        "global_prefetch_count": st.global_prefetch_count.load(r),
        "messages_unacknowledged": st.messages_unacknowledged.load(r),
        "messages_unconfirmed": st.messages_unconfirmed.load(r),
        "messages_uncommitted": st.messages_uncommitted.load(r),
        "acks_uncommitted": st.acks_uncommitted.load(r),
        "pending_raft_commands": 0,
        "consumer_count": st.consumer_count.load(r),
        "confirm": st.confirm.load(r),
        "transactional": st.transactional.load(r),
    })
}

fn channels_of<'a>(
    conns: impl IntoIterator<Item = &'a crate::broker::conns::ConnInfo>,
) -> Vec<Value> {
    let mut out = Vec::new();
    for c in conns {
        for (n, st) in c.channel_stats() {
            out.push(channel_json(c, n, &st));
        }
    }
    out
}

async fn channels(State(st): State<AppState>, caller: Caller) -> R {
    ok_json(Value::Array(channels_of(&visible_conns(
        &st.broker, &caller,
    ))))
}

async fn channel(State(st): State<AppState>, caller: Caller, Path(name): Path<String>) -> R {
    channels_of(&visible_conns(&st.broker, &caller))
        .into_iter()
        .find(|c| c["name"] == name.as_str())
        .map_or_else(|| Err(ApiError::not_found()), ok_json)
}

async fn connection_channels(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> R {
    let c = find_conn(&st.broker, &caller, &name)?;
    ok_json(Value::Array(channels_of([&c])))
}

async fn vhost_channels(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    ops::vhost(&st.broker, &vh)?;
    let conns: Vec<_> = visible_conns(&st.broker, &caller)
        .into_iter()
        .filter(|c| c.vhost == vh)
        .collect();
    ok_json(Value::Array(channels_of(&conns)))
}

/// Consumers as RabbitMQ's /api/consumers shows them, from the channels'
/// records (no queue is asked). With a single active consumer, the queue's
/// oldest consumer is the active one (consumer ids increase).
async fn consumer_list(
    b: &Broker,
    caller: &Caller,
    only: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let conns: Vec<_> = b.connections.iter().map(|c| c.value().clone()).collect();
    let mut all = Vec::new();
    for c in &conns {
        for (n, st) in c.channel_stats() {
            for m in st.consumer_list() {
                all.push((c, n, m));
            }
        }
    }
    let mut oldest: HashMap<u64, u64> = HashMap::new();
    for (_, _, m) in &all {
        let e = oldest.entry(m.queue_id).or_insert(m.id);
        *e = (*e).min(m.id);
    }
    all.retain(|(_, _, m)| only.is_none_or(|o| o == m.vhost) && caller.can_see(b, &m.vhost));
    all.sort_by(|a, b| (&a.2.vhost, &a.2.queue, a.2.id).cmp(&(&b.2.vhost, &b.2.queue, b.2.id)));
    Ok(all
        .iter()
        .map(|(c, n, m)| {
            let active = !m.single_active || oldest.get(&m.queue_id) == Some(&m.id);
            let status = match (m.single_active, active) {
                (false, _) => "up",
                (true, true) => "single_active",
                (true, false) => "waiting",
            };
            json!({
                "consumer_tag": m.tag,
                "queue": {"name": m.queue, "vhost": m.vhost},
                "channel_details": {
                    "name": format!("{} ({n})", c.name),
                    "number": n,
                    "node": node_name(),
                    "connection_name": c.name,
                    "user": c.user,
                    "peer_host": c.peer.ip().to_string(),
                    "peer_port": c.peer.port(),
                },
                "ack_required": m.ack_required,
                "prefetch_count": m.prefetch_count,
                "exclusive": m.exclusive,
                "active": active,
                "activity_status": status,
                "arguments": table_to_json(&m.arguments),
            })
        })
        .collect())
}

async fn consumers(State(st): State<AppState>, caller: Caller) -> R {
    ok_json(Value::Array(
        consumer_list(&st.broker, &caller, None).await?,
    ))
}

async fn consumers_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    ops::vhost(&st.broker, &vh)?;
    ok_json(Value::Array(
        consumer_list(&st.broker, &caller, Some(&vh)).await?,
    ))
}

// ---------------------------------------------------------------------------
// exchanges

fn exchange_json(v: &VHost, e: &Exchange) -> Value {
    let vhost = &v.name;
    let policy = crate::broker::policy::for_exchange(v, &e.name).map(|p| p.name.clone());
    let (i, o) = (
        e.stats.publish_in.load(Ordering::Relaxed),
        e.stats.publish_out.load(Ordering::Relaxed),
    );
    let r = e.stats.sampler.rates(&[i, o]);
    json!({
        "name": e.name,
        "vhost": vhost,
        "type": e.type_name(),
        "message_stats": {
            "publish_in": i, "publish_in_details": rate(r.first().copied().unwrap_or(0.0)),
            "publish_out": o, "publish_out_details": rate(r.get(1).copied().unwrap_or(0.0)),
        },
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": table_to_json(&e.arguments),
        "user_who_performed_action": "",
        "policy": policy,
    })
}

fn sorted_exchanges(v: &VHost) -> Vec<Arc<Exchange>> {
    let mut e: Vec<Arc<Exchange>> = v.exchanges.iter().map(|e| e.value().clone()).collect();
    e.sort_by(|a, b| a.name.cmp(&b.name));
    e
}

async fn exchanges(State(st): State<AppState>, caller: Caller) -> R {
    let mut out = Vec::new();
    for v in visible_vhosts(&st.broker, &caller) {
        out.extend(sorted_exchanges(&v).iter().map(|e| exchange_json(&v, e)));
    }
    ok_json(Value::Array(out))
}

fn seen_vhost(b: &Broker, caller: &Caller, vh: &str) -> Result<Arc<VHost>, ApiError> {
    let v = ops::vhost(b, vh)?;
    if !caller.can_see(b, vh) {
        return Err(ApiError::unauthorised("Access refused."));
    }
    Ok(v)
}

async fn exchanges_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    ok_json(Value::Array(
        sorted_exchanges(&v)
            .iter()
            .map(|e| exchange_json(&v, e))
            .collect(),
    ))
}

async fn exchange(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let name = exchange_id(name);
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    let e = v.exchange(&name).ok_or_else(ApiError::not_found)?;
    ok_json(exchange_json(&v, &e))
}

/// RabbitMQ's API names the default exchange "amq.default" in paths.
fn exchange_id(name: String) -> String {
    if name == "amq.default" {
        String::new()
    } else {
        name
    }
}

fn body_json(body: &axum::body::Bytes) -> Result<Value, ApiError> {
    if body.iter().all(|c| c.is_ascii_whitespace()) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("body is not valid JSON: {e}")))
}

fn field_bool(v: &Value, k: &str, default: bool) -> bool {
    match v.get(k) {
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) => s == "true",
        _ => default,
    }
}

fn field_str<'a>(v: &'a Value, k: &str) -> Option<&'a str> {
    v.get(k).and_then(Value::as_str)
}

async fn put_exchange(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    let name = exchange_id(name);
    caller.require_admin()?;
    let b = body_json(&body)?;
    let existed = ops::vhost(&st.broker, &vh)?.exchange(&name).is_some();
    let kind = field_str(&b, "type").unwrap_or("direct");
    ops::declare_exchange(
        &st.broker,
        &vh,
        &name,
        kind,
        field_bool(&b, "durable", true),
        field_bool(&b, "auto_delete", false),
        field_bool(&b, "internal", false),
        json_to_table(b.get("arguments").unwrap_or(&Value::Null)),
    )
    .await?;
    if existed { no_content() } else { created() }
}

#[derive(Deserialize, Default)]
struct DeleteQuery {
    #[serde(rename = "if-unused")]
    if_unused: Option<bool>,
    #[serde(rename = "if-empty")]
    if_empty: Option<bool>,
}

async fn delete_exchange(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    Query(q): Query<DeleteQuery>,
) -> R {
    let name = exchange_id(name);
    caller.require_admin()?;
    ops::delete_exchange(&st.broker, &vh, &name, q.if_unused.unwrap_or(false)).await?;
    no_content()
}

/// basic properties from the management API's JSON shape.
fn properties_from_json(p: &Value) -> BasicProperties {
    let mut props = BasicProperties::default();
    let s = |k: &str| field_str(p, k).map(ShortString::from);
    if let Some(v) = s("content_type") {
        props = props.with_content_type(v);
    }
    if let Some(v) = s("content_encoding") {
        props = props.with_content_encoding(v);
    }
    if let Some(v) = p.get("delivery_mode").and_then(Value::as_u64) {
        props = props.with_delivery_mode(v as u8);
    }
    if let Some(v) = p.get("priority").and_then(Value::as_u64) {
        props = props.with_priority(v as u8);
    }
    if let Some(v) = s("correlation_id") {
        props = props.with_correlation_id(v);
    }
    if let Some(v) = s("reply_to") {
        props = props.with_reply_to(v);
    }
    if let Some(v) = s("expiration") {
        props = props.with_expiration(v);
    }
    if let Some(v) = s("message_id") {
        props = props.with_message_id(v);
    }
    if let Some(v) = p.get("timestamp").and_then(Value::as_u64) {
        props = props.with_timestamp(v);
    }
    if let Some(v) = s("type") {
        props = props.with_type(v);
    }
    if let Some(v) = s("user_id") {
        props = props.with_user_id(v);
    }
    if let Some(v) = s("app_id") {
        props = props.with_app_id(v);
    }
    if let Some(h) = p.get("headers").filter(|h| h.is_object()) {
        props = props.with_headers(json_to_table(h));
    }
    props
}

fn properties_to_json(p: &BasicProperties) -> Value {
    let mut m = serde_json::Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    put(
        "content_type",
        p.content_type().as_ref().map(|v| v.as_str().into()),
    );
    put(
        "content_encoding",
        p.content_encoding().as_ref().map(|v| v.as_str().into()),
    );
    put("headers", p.headers().as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode().map(Into::into));
    put("priority", p.priority().map(Into::into));
    put(
        "correlation_id",
        p.correlation_id().as_ref().map(|v| v.as_str().into()),
    );
    put("reply_to", p.reply_to().as_ref().map(|v| v.as_str().into()));
    put(
        "expiration",
        p.expiration().as_ref().map(|v| v.as_str().into()),
    );
    put(
        "message_id",
        p.message_id().as_ref().map(|v| v.as_str().into()),
    );
    put("timestamp", p.timestamp().map(Into::into));
    put("type", p.kind().as_ref().map(|v| v.as_str().into()));
    put("user_id", p.user_id().as_ref().map(|v| v.as_str().into()));
    put("app_id", p.app_id().as_ref().map(|v| v.as_str().into()));
    Value::Object(m)
}

async fn publish(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    let name = exchange_id(name);
    let b = body_json(&body)?;
    let bk = &st.broker;
    ops::vhost(bk, &vh)?;
    crate::auth::permissions::check(
        &bk.users,
        &caller.user.name,
        &vh,
        crate::auth::permissions::Perm::Write,
        crate::auth::permissions::ResourceKind::Exchange,
        &name,
    )
    .map_err(|e| ApiError::unauthorised(e.text))?;
    let rk =
        field_str(&b, "routing_key").ok_or_else(|| ApiError::bad_request("routing_key missing"))?;
    if let Some(ex) = ops::vhost(bk, &vh)?.exchange(&name) {
        crate::auth::topic::check(
            &bk.users,
            &caller.user.name,
            &vh,
            &ex,
            crate::auth::permissions::Perm::Write,
            rk,
        )
        .map_err(|e| ApiError::unauthorised(e.text))?;
    }
    let payload =
        field_str(&b, "payload").ok_or_else(|| ApiError::bad_request("payload missing"))?;
    let body = match field_str(&b, "payload_encoding").unwrap_or("string") {
        "string" => bytes::Bytes::copy_from_slice(payload.as_bytes()),
        "base64" => {
            use base64::Engine;
            bytes::Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(payload)
                    .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
            )
        }
        other => {
            return Err(ApiError::bad_request(format!(
                "unknown payload_encoding '{other}'"
            )));
        }
    };
    let props = properties_from_json(b.get("properties").unwrap_or(&Value::Null));
    let routed = ops::publish(bk, &vh, &name, rk, props, body).await?;
    ok_json(json!({"routed": routed}))
}

fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    json!({
        "source": source,
        "vhost": vhost,
        "destination": b.dest.name(),
        "destination_type": b.dest.kind(),
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": props_key(&b.routing_key, &b.arguments),
    })
}

/// RabbitMQ's binding "properties key": the routing key, plus "~" and a
/// hash of the arguments when there are any ("~" alone for an empty key).
pub fn props_key(rk: &str, args: &FieldTable) -> String {
    if args.inner().is_empty() {
        if rk.is_empty() {
            "~".into()
        } else {
            rk.replace('%', "%25").replace('/', "%2F")
        }
    } else {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        table_to_json(args).to_string().hash(&mut h);
        format!("{}~{:x}", rk, h.finish() & 0xffff_ffff)
    }
}

/// Every binding of a vhost: the default exchange's implicit ones first,
/// as RabbitMQ lists them.
fn vhost_bindings(v: &VHost) -> Vec<Value> {
    let mut out: Vec<Value> = all_queues(v)
        .iter()
        .map(|q| {
            json!({"source": "", "vhost": v.name, "destination": q.name, "destination_type": "queue",
                   "routing_key": q.name, "arguments": {}, "properties_key": q.name})
        })
        .collect();
    for e in sorted_exchanges(v) {
        if e.name.is_empty() {
            continue;
        }
        for b in e.bindings() {
            out.push(binding_json(&v.name, &e.name, &b));
        }
    }
    out
}

async fn bindings(State(st): State<AppState>, caller: Caller) -> R {
    let mut out = Vec::new();
    for v in visible_vhosts(&st.broker, &caller) {
        out.extend(vhost_bindings(&v));
    }
    ok_json(Value::Array(out))
}

async fn bindings_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    ok_json(Value::Array(vhost_bindings(&v)))
}

async fn exchange_bindings_source(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let name = exchange_id(name);
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    v.exchange(&name).ok_or_else(ApiError::not_found)?;
    bindings_where(&v, |b| b["source"] == name.as_str())
}

async fn exchange_bindings_destination(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let name = exchange_id(name);
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    v.exchange(&name).ok_or_else(ApiError::not_found)?;
    bindings_where(&v, |b| {
        b["destination"] == name.as_str() && b["destination_type"] == "exchange"
    })
}

async fn queue_bindings(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    v.queue(&name).ok_or_else(ApiError::not_found)?;
    bindings_where(&v, |b| {
        b["destination"] == name.as_str() && b["destination_type"] == "queue"
    })
}

/// The vhost's bindings that satisfy `pred`, as a JSON array.
fn bindings_where(v: &VHost, pred: impl Fn(&Value) -> bool) -> R {
    ok_json(Value::Array(
        vhost_bindings(v).into_iter().filter(|b| pred(b)).collect(),
    ))
}

fn dest_is_queue(dtype: &str) -> Result<bool, ApiError> {
    match dtype {
        "q" => Ok(true),
        "e" => Ok(false),
        _ => Err(ApiError::not_found()),
    }
}

fn bindings_matching(
    v: &VHost,
    source: &str,
    to_queue: bool,
    dest: &str,
) -> Result<Vec<Value>, ApiError> {
    let src = v.exchange(source).ok_or_else(ApiError::not_found)?;
    let found = if to_queue {
        v.queue(dest).is_some()
    } else {
        v.exchange(dest).is_some()
    };
    if !found {
        return Err(ApiError::not_found());
    }
    Ok(src
        .bindings()
        .iter()
        .filter(|b| b.dest.is(to_queue, dest))
        .map(|b| binding_json(&v.name, source, b))
        .collect())
}

async fn bindings_between(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, source, dtype, dest)): Path<(String, String, String, String)>,
) -> R {
    let source = exchange_id(source);
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    ok_json(Value::Array(bindings_matching(
        &v,
        &source,
        dest_is_queue(&dtype)?,
        &dest,
    )?))
}

async fn post_binding(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, source, dtype, dest)): Path<(String, String, String, String)>,
    body: axum::body::Bytes,
) -> R {
    let source = exchange_id(source);
    caller.require_admin()?;
    let b = body_json(&body)?;
    let to_queue = dest_is_queue(&dtype)?;
    let rk = field_str(&b, "routing_key").unwrap_or("");
    let args = json_to_table(b.get("arguments").unwrap_or(&Value::Null));
    let key = props_key(rk, &args);
    // Topic authorisation on the source, as a channel's queue.bind does.
    if let Some(ex) = ops::vhost(&st.broker, &vh)?.exchange(&source) {
        crate::auth::topic::check(
            &st.broker.users,
            &caller.user.name,
            &vh,
            &ex,
            crate::auth::permissions::Perm::Read,
            rk,
        )
        .map_err(|e| ApiError::unauthorised(e.text))?;
    }
    ops::bind(&st.broker, &vh, &source, to_queue, &dest, rk, args).await?;
    let loc = format!("{}/{key}", key.len());
    Ok((StatusCode::CREATED, [(axum::http::header::LOCATION, loc)]).into_response())
}

async fn binding(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> R {
    let source = exchange_id(source);
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    let all = bindings_matching(&v, &source, dest_is_queue(&dtype)?, &dest)?;
    all.into_iter()
        .find(|b| b["properties_key"] == props.as_str())
        .map_or_else(|| Err(ApiError::not_found()), ok_json)
}

async fn delete_binding(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, source, dtype, dest, props)): Path<(String, String, String, String, String)>,
) -> R {
    let source = exchange_id(source);
    caller.require_admin()?;
    let to_queue = dest_is_queue(&dtype)?;
    let v = ops::vhost(&st.broker, &vh)?;
    let src = v.exchange(&source).ok_or_else(ApiError::not_found)?;
    let b = src
        .bindings()
        .into_iter()
        .find(|b| b.dest.is(to_queue, &dest) && props_key(&b.routing_key, &b.arguments) == props)
        .ok_or_else(ApiError::not_found)?;
    ops::unbind(
        &st.broker,
        &vh,
        &source,
        to_queue,
        &dest,
        &b.routing_key,
        &b.arguments,
    )
    .await?;
    no_content()
}

// ---------------------------------------------------------------------------
// queues

/// Message rates: the last sample per queue id.
fn rates(q: &QueueRef) -> (f64, f64, f64) {
    use std::sync::{Mutex, OnceLock};
    static SAMPLES: OnceLock<
        Mutex<HashMap<u64, (std::time::Instant, (u64, u64, u64, u64), (f64, f64, f64))>>,
    > = OnceLock::new();
    let now = std::time::Instant::now();
    let t = super::stats::totals(q);
    let Ok(mut m) = SAMPLES.get_or_init(Default::default).lock() else {
        return (0.0, 0.0, 0.0);
    };
    let entry = m.entry(q.id).or_insert((now, t, (0.0, 0.0, 0.0)));
    let dt = now.duration_since(entry.0).as_secs_f64();
    if dt >= 1.0 {
        let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / dt;
        entry.2 = (r(t.0, entry.1.0), r(t.1, entry.1.1), r(t.3, entry.1.3));
        entry.0 = now;
        entry.1 = t;
    }
    entry.2
}

/// A queue as RabbitMQ's management API shows it.
pub async fn queue_json(b: &Broker, q: &QueueRef) -> Value {
    let policy = b
        .vhost(&q.vhost)
        .and_then(|v| crate::broker::policy::for_queue(&v, &q.name, &q.args.queue_type))
        .map(|p| p.name.clone());
    let c = q.stats().await.unwrap_or_default();
    let quorum = if q.is_quorum() {
        super::cluster::quorum_replicas(b, &q.vhost, &q.name)
    } else if q.is_stream() {
        super::cluster::stream_replicas(b, &q.vhost, &q.name)
    } else {
        None
    };
    let (published, delivered, redelivered, acked) = super::stats::totals(q);
    let (pr, dr, ar) = rates(q);
    let owner = q
        .exclusive_owner
        .and_then(|id| b.connections.get(&id).map(|c| c.name.clone()));
    json!({
        "name": q.name,
        "vhost": q.vhost,
        "durable": q.durable,
        "auto_delete": q.auto_delete,
        "exclusive": q.exclusive_owner.is_some(),
        "owner_pid_details": owner.map(|n| json!({"name": n})),
        "arguments": table_to_json(&q.arguments),
        "type": q.args.queue_type,
        "node": if q.home.is_some() { crate::cluster::classic::home_name(b, q) } else { node_name() },
        "leader": quorum.as_ref().and_then(|r| r.0.clone()),
        "members": quorum.as_ref().map(|r| r.1.clone()),
        "online": quorum.as_ref().map(|r| r.2.clone()),
        // A classic queue of another node whose home is down: "down", and
        // the counts are the last ones its home reported.
        "state": if q.is_absent() { "down" } else { "running" },
        "counts_stale": q.is_absent(),
        "policy": policy,
        "messages": c.ready + c.unacked,
        "messages_details": rate(0.0),
        "messages_ready": c.ready,
        "messages_ready_details": rate(0.0),
        "messages_unacknowledged": c.unacked,
        "messages_unacknowledged_details": rate(0.0),
        "messages_ram": c.in_memory,
        "messages_paged_out": c.ready.saturating_sub(c.in_memory),
        "message_bytes": c.ready_bytes,
        "message_bytes_ready": c.ready_bytes,
        "consumers": c.consumers,
        "consumer_utilisation": if c.consumers > 0 { 1.0 } else { 0.0 },
        "memory": c.ready_bytes + 1024,
        "message_stats": {
            "publish": published, "publish_details": rate(pr),
            "deliver_get": delivered, "deliver_get_details": rate(dr),
            "redeliver": redelivered, "redeliver_details": rate(0.0),
            "ack": acked, "ack_details": rate(ar),
        },
    })
}

async fn queues(State(st): State<AppState>, caller: Caller) -> R {
    let mut out = Vec::new();
    for v in visible_vhosts(&st.broker, &caller) {
        for q in all_queues(&v) {
            out.push(queue_json(&st.broker, &q).await);
        }
    }
    ok_json(Value::Array(out))
}

async fn queues_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    let mut out = Vec::new();
    for q in all_queues(&v) {
        out.push(queue_json(&st.broker, &q).await);
    }
    ok_json(Value::Array(out))
}

async fn queue(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    let q = v.queue(&name).ok_or_else(ApiError::not_found)?;
    ok_json(queue_json(&st.broker, &q).await)
}

async fn put_super_stream(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    let n = b.get("partitions").and_then(Value::as_u64).unwrap_or(3) as u32;
    ops::add_super_stream(&st.broker, &vh, &name, n).await?;
    created()
}

async fn put_queue(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    let existed = ops::vhost(&st.broker, &vh)?.queue(&name).is_some();
    let mut args = json_to_table(b.get("arguments").unwrap_or(&Value::Null));
    if let Some(t) = field_str(&b, "type") {
        args.insert(
            ShortString::from("x-queue-type"),
            AMQPValue::LongString(t.into()),
        );
    }
    ops::declare_queue(
        &st.broker,
        &vh,
        &name,
        field_bool(&b, "durable", true),
        field_bool(&b, "auto_delete", false),
        args,
    )
    .await?;
    if existed { no_content() } else { created() }
}

async fn delete_queue(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    Query(dq): Query<DeleteQuery>,
) -> R {
    caller.require_admin()?;
    let q = ops::queue(&st.broker, &vh, &name)?;
    ops::delete_queue_ref(
        &q,
        dq.if_unused.unwrap_or(false),
        dq.if_empty.unwrap_or(false),
    )
    .await?;
    no_content()
}

async fn purge_queue(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let q = ops::queue(&st.broker, &vh, &name)?;
    if !caller.is_admin() {
        crate::auth::permissions::check(
            &st.broker.users,
            &caller.user.name,
            &vh,
            crate::auth::permissions::Perm::Read,
            crate::auth::permissions::ResourceKind::Queue,
            &name,
        )
        .map_err(|e| ApiError::unauthorised(e.text))?;
    }
    ops::purge_queue(&q).await;
    no_content()
}

fn message_json(
    m: &crate::queue::message::Message,
    redelivered: bool,
    remaining: u64,
    encoding: &str,
) -> Value {
    let (payload, enc) = match (encoding, std::str::from_utf8(&m.body)) {
        ("auto", Ok(s)) => (s.to_string(), "string"),
        _ => {
            use base64::Engine;
            (
                base64::engine::general_purpose::STANDARD.encode(&m.body),
                "base64",
            )
        }
    };
    json!({
        "payload_bytes": m.body.len(),
        "redelivered": redelivered,
        "exchange": m.exchange_str(),
        "routing_key": m.routing_key_str(),
        "message_count": remaining,
        "properties": properties_to_json(&m.properties),
        "payload": payload,
        "payload_encoding": enc,
    })
}

async fn get_messages(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    let b = body_json(&body)?;
    let q = ops::queue(&st.broker, &vh, &name)?;
    crate::auth::permissions::check(
        &st.broker.users,
        &caller.user.name,
        &vh,
        crate::auth::permissions::Perm::Read,
        crate::auth::permissions::ResourceKind::Queue,
        &name,
    )
    .map_err(|e| ApiError::unauthorised(e.text))?;
    let count = b.get("count").and_then(Value::as_u64).unwrap_or(1) as usize;
    let requeue = match field_str(&b, "ackmode").unwrap_or("ack_requeue_true") {
        "ack_requeue_true" | "reject_requeue_true" => true,
        "ack_requeue_false" | "reject_requeue_false" => false,
        other => return Err(ApiError::bad_request(format!("unknown ackmode '{other}'"))),
    };
    let encoding = field_str(&b, "encoding").unwrap_or("auto").to_string();
    let got = ops::get(&st.broker, &q, count, requeue).await;
    let out: Vec<Value> = got
        .iter()
        .filter_map(|(e, left)| {
            e.msg
                .as_ref()
                .map(|m| message_json(m, e.redelivered, *left, &encoding))
        })
        .collect();
    ok_json(Value::Array(out))
}

#[derive(Deserialize)]
struct PeekQuery {
    count: Option<usize>,
}

async fn peek_messages(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    Query(pq): Query<PeekQuery>,
) -> R {
    seen_vhost(&st.broker, &caller, &vh)?;
    let q = ops::queue(&st.broker, &vh, &name)?;
    let msgs = ops::peek(&q, pq.count.unwrap_or(1)).await;
    let total = msgs.len() as u64;
    let out: Vec<Value> = msgs
        .iter()
        .enumerate()
        .map(|(i, (m, r))| message_json(m, *r, total - i as u64 - 1, "auto"))
        .collect();
    ok_json(Value::Array(out))
}

// ---------------------------------------------------------------------------
// vhosts, users, permissions

async fn vhost_json(b: &Broker, v: &VHost) -> Value {
    let (mut ready, mut unacked) = (0, 0);
    for q in all_queues(v) {
        let c = q.stats().await.unwrap_or_default();
        ready += c.ready;
        unacked += c.unacked;
    }
    let _ = b;
    json!({"name": v.name, "description": "", "tags": [], "default_queue_type": "classic", "tracing": false,
           "messages": ready + unacked, "messages_ready": ready, "messages_unacknowledged": unacked,
           "cluster_state": {node_name(): "running"}, "metadata": {"description": "", "tags": []}})
}

async fn vhosts(State(st): State<AppState>, caller: Caller) -> R {
    let mut out = Vec::new();
    for v in visible_vhosts(&st.broker, &caller) {
        out.push(vhost_json(&st.broker, &v).await);
    }
    ok_json(Value::Array(out))
}

async fn vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    let v = seen_vhost(&st.broker, &caller, &vh)?;
    ok_json(vhost_json(&st.broker, &v).await)
}

async fn put_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    caller.require_admin()?;
    if ops::add_vhost(&st.broker, &vh).await? {
        created()
    } else {
        no_content()
    }
}

async fn delete_vhost(State(st): State<AppState>, caller: Caller, Path(vh): Path<String>) -> R {
    caller.require_admin()?;
    ops::delete_vhost(&st.broker, &vh).await?;
    no_content()
}

fn user_json(u: &crate::auth::User) -> Value {
    let d = crate::auth::store::UserDef::of(u);
    json!({"name": d.name, "password_hash": d.password_hash, "hashing_algorithm": d.hashing_algorithm, "tags": d.tags, "limits": {}})
}

async fn users(State(st): State<AppState>, caller: Caller) -> R {
    caller.require_admin()?;
    ok_json(Value::Array(
        st.broker.users.list().iter().map(user_json).collect(),
    ))
}

async fn user(State(st): State<AppState>, caller: Caller, Path(name): Path<String>) -> R {
    caller.require_admin()?;
    ok_json(user_json(
        &st.broker.users.get(&name).ok_or_else(ApiError::not_found)?,
    ))
}

/// Creates or updates a user from RabbitMQ's JSON (password or
/// password_hash, tags as a list or a comma-separated string).
pub async fn apply_user(b: &Broker, name: &str, body: &Value) -> Result<bool, ApiError> {
    let tags = match body.get("tags") {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Some(Value::String(s)) => crate::auth::store::split_tags(s),
        _ => Vec::new(),
    };
    let existing = b.users.get(name);
    let hash = if let Some(p) = field_str(body, "password") {
        crate::auth::hash_password(p)
    } else if let Some(h) = field_str(body, "password_hash") {
        let def = crate::auth::store::UserDef {
            name: name.into(),
            password_hash: h.into(),
            hashing_algorithm: field_str(body, "hashing_algorithm")
                .unwrap_or(crate::auth::store::SHA256)
                .into(),
            tags: vec![],
            limits: Default::default(),
        };
        def.hash_bytes().ok_or_else(|| {
            ApiError::bad_request(format!(
                "unsupported password hash for user '{name}' (only {} is supported)",
                crate::auth::store::SHA256
            ))
        })?
    } else if let Some(u) = &existing {
        u.password_hash.clone()
    } else {
        return Err(ApiError::bad_request(
            "password or password_hash must be set",
        ));
    };
    b.users.add_hashed(name, hash, tags);
    if let (Some(st), Some(u)) = (&b.storage, b.users.get(name)) {
        crate::auth::store::put_user(&st.defs, &crate::auth::store::UserDef::of(&u)).await?;
    }
    Ok(existing.is_none())
}

async fn put_user(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    if apply_user(&st.broker, &name, &b).await? {
        created()
    } else {
        no_content()
    }
}

async fn delete_user(State(st): State<AppState>, caller: Caller, Path(name): Path<String>) -> R {
    caller.require_admin()?;
    if !st.broker.users.remove(&name) {
        return Err(ApiError::not_found());
    }
    if let Some(s) = &st.broker.storage {
        crate::auth::store::delete_user(&s.defs, &name).await?;
    }
    no_content()
}

fn perm_json(user: &str, vhost: &str, p: &crate::auth::permissions::Permission) -> Value {
    json!({"user": user, "vhost": vhost, "configure": p.configure, "write": p.write, "read": p.read})
}

async fn permissions(State(st): State<AppState>, caller: Caller) -> R {
    caller.require_admin()?;
    ok_json(Value::Array(
        st.broker
            .users
            .permissions()
            .iter()
            .map(|(u, v, p)| perm_json(u, v, p))
            .collect(),
    ))
}

async fn vhost_permissions(
    State(st): State<AppState>,
    caller: Caller,
    Path(vh): Path<String>,
) -> R {
    caller.require_admin()?;
    ops::vhost(&st.broker, &vh)?;
    ok_json(Value::Array(
        st.broker
            .users
            .permissions()
            .iter()
            .filter(|(_, v, _)| *v == vh)
            .map(|(u, v, p)| perm_json(u, v, p))
            .collect(),
    ))
}

async fn user_permissions(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> R {
    caller.require_admin()?;
    st.broker.users.get(&name).ok_or_else(ApiError::not_found)?;
    ok_json(Value::Array(
        st.broker
            .users
            .permissions()
            .iter()
            .filter(|(u, _, _)| *u == name)
            .map(|(u, v, p)| perm_json(u, v, p))
            .collect(),
    ))
}

async fn permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
) -> R {
    caller.require_admin()?;
    let p = st
        .broker
        .users
        .permission(&user, &vh)
        .ok_or_else(ApiError::not_found)?;
    ok_json(perm_json(&user, &vh, &p))
}

/// Sets a permission (vhost and user must exist).
pub async fn apply_permission(
    b: &Broker,
    vh: &str,
    user: &str,
    body: &Value,
) -> Result<bool, ApiError> {
    ops::vhost(b, vh).map_err(|_| ApiError::bad_request(format!("vhost '{vh}' does not exist")))?;
    b.users
        .get(user)
        .ok_or_else(|| ApiError::bad_request(format!("user '{user}' does not exist")))?;
    let f = |k: &str| {
        field_str(body, k)
            .map(String::from)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be set")))
    };
    let (c, w, r) = (f("configure")?, f("write")?, f("read")?);
    let p = crate::auth::permissions::Permission::new(&c, &w, &r)
        .map_err(|e| ApiError::bad_request(format!("invalid regular expression: {e}")))?;
    let existed = b.users.permission(user, vh).is_some();
    if let Some(st) = &b.storage {
        crate::auth::store::put_permission(
            &st.defs,
            &crate::auth::store::PermissionDef::of(user, vh, &p),
        )
        .await?;
    }
    b.users.set_permission(user, vh, p);
    Ok(!existed)
}

async fn put_permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    if apply_permission(&st.broker, &vh, &user, &b).await? {
        created()
    } else {
        no_content()
    }
}

async fn delete_permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
) -> R {
    caller.require_admin()?;
    if !st.broker.users.clear_permission(&user, &vh) {
        return Err(ApiError::not_found());
    }
    if let Some(s) = &st.broker.storage {
        crate::auth::store::delete_permission(&s.defs, &user, &vh).await?;
    }
    no_content()
}

// ---------------------------------------------------------------------------
// topic permissions (RabbitMQ's topic authorisation)

fn topic_perm_json(user: &str, vhost: &str, p: &crate::auth::topic::TopicPermission) -> Value {
    json!({"user": user, "vhost": vhost, "exchange": p.exchange, "write": p.write, "read": p.read})
}

fn topic_perms_where(b: &Broker, pred: impl Fn(&str, &str) -> bool) -> Vec<Value> {
    b.users
        .topic_permissions()
        .iter()
        .filter(|(u, v, _)| pred(u, v))
        .map(|(u, v, p)| topic_perm_json(u, v, p))
        .collect()
}

async fn topic_permissions(State(st): State<AppState>, caller: Caller) -> R {
    caller.require_admin()?;
    ok_json(Value::Array(topic_perms_where(&st.broker, |_, _| true)))
}

async fn topic_permissions_vhost(
    State(st): State<AppState>,
    caller: Caller,
    Path(vh): Path<String>,
) -> R {
    caller.require_admin()?;
    ops::vhost(&st.broker, &vh)?;
    ok_json(Value::Array(topic_perms_where(&st.broker, |_, v| v == vh)))
}

async fn user_topic_permissions(
    State(st): State<AppState>,
    caller: Caller,
    Path(name): Path<String>,
) -> R {
    caller.require_admin()?;
    st.broker.users.get(&name).ok_or_else(ApiError::not_found)?;
    ok_json(Value::Array(topic_perms_where(&st.broker, |u, _| {
        u == name
    })))
}

/// One user's topic permissions in a vhost: 404 when there are none (or no
/// such user or vhost), as RabbitMQ.
fn user_vhost_topic_perms(b: &Broker, vh: &str, user: &str) -> Result<Vec<Value>, ApiError> {
    ops::vhost(b, vh)?;
    b.users.get(user).ok_or_else(ApiError::not_found)?;
    let v = topic_perms_where(b, |u, v| u == user && v == vh);
    if v.is_empty() {
        return Err(ApiError::not_found());
    }
    Ok(v)
}

async fn topic_permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
) -> R {
    caller.require_admin()?;
    ok_json(Value::Array(user_vhost_topic_perms(
        &st.broker, &vh, &user,
    )?))
}

async fn topic_permission_exchange(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user, _exchange)): Path<(String, String, String)>,
) -> R {
    caller.require_admin()?;
    // RabbitMQ answers with the user's topic permissions in the vhost.
    ok_json(Value::Array(user_vhost_topic_perms(
        &st.broker, &vh, &user,
    )?))
}

/// Sets a topic permission from RabbitMQ's JSON (exchange, write, read;
/// vhost and user must exist). True when the user had none in the vhost
/// (RabbitMQ then answers 201, otherwise 204).
pub async fn apply_topic_permission(
    b: &Broker,
    vh: &str,
    user: &str,
    body: &Value,
) -> Result<bool, ApiError> {
    if ops::vhost(b, vh).is_err() || b.users.get(user).is_none() {
        return Err(ApiError::bad_request("vhost_or_user_not_found"));
    }
    let f = |k: &str| {
        field_str(body, k)
            .map(String::from)
            .ok_or_else(|| ApiError::bad_request(format!("[{{key_missing,{k}}}]")))
    };
    let (x, w, r) = (f("exchange")?, f("write")?, f("read")?);
    let p = crate::auth::topic::TopicPermission::new(user, vh, &x, &w, &r)
        .map_err(|e| ApiError::bad_request(format!("invalid regular expression: {e}")))?;
    let had = b.users.topic_permissions_of(user, vh).is_some();
    if let Some(st) = &b.storage {
        crate::auth::store::put_topic_permission(
            &st.defs,
            &crate::auth::store::TopicPermissionDef::of(user, vh, &p),
        )
        .await?;
    }
    b.users.set_topic_permission(user, vh, p);
    Ok(!had)
}

async fn put_topic_permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    if apply_topic_permission(&st.broker, &vh, &user, &b).await? {
        created()
    } else {
        no_content()
    }
}

async fn clear_topic(b: &Broker, vh: &str, user: &str, exchange: Option<&str>) -> R {
    if b.users.topic_permissions_of(user, vh).is_none() {
        return Err(ApiError::not_found());
    }
    b.users.clear_topic_permissions(user, vh, exchange);
    if let Some(s) = &b.storage {
        crate::auth::store::delete_topic_permissions(&s.defs, Some(user), Some(vh), exchange)
            .await?;
    }
    no_content()
}

async fn delete_topic_permission(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user)): Path<(String, String)>,
) -> R {
    caller.require_admin()?;
    clear_topic(&st.broker, &vh, &user, None).await
}

async fn delete_topic_permission_exchange(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, user, exchange)): Path<(String, String, String)>,
) -> R {
    caller.require_admin()?;
    clear_topic(&st.broker, &vh, &user, Some(&exchange)).await
}

// ---------------------------------------------------------------------------
// policies (stored here; crate::broker::policy applies them)

use super::definitions::PolicyDef;

fn policies_in(b: &Broker, vhost: Option<&str>) -> Result<Vec<PolicyDef>, ApiError> {
    let Some(st) = &b.storage else {
        return Ok(Vec::new());
    };
    Ok(st
        .defs
        .list::<PolicyDef>(crate::store::defs::Table::Policies)?
        .into_iter()
        .map(|(_, p)| p)
        .filter(|p| vhost.is_none_or(|v| v == p.vhost))
        .collect())
}

async fn policies(State(st): State<AppState>, _c: Caller) -> R {
    ok_json(serde_json::to_value(policies_in(&st.broker, None)?).unwrap_or_default())
}

async fn policies_vhost(State(st): State<AppState>, _c: Caller, Path(vh): Path<String>) -> R {
    ops::vhost(&st.broker, &vh)?;
    ok_json(serde_json::to_value(policies_in(&st.broker, Some(&vh))?).unwrap_or_default())
}

async fn policy(
    State(st): State<AppState>,
    _c: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    let p = policies_in(&st.broker, Some(&vh))?
        .into_iter()
        .find(|p| p.name == name)
        .ok_or_else(ApiError::not_found)?;
    ok_json(serde_json::to_value(p).unwrap_or_default())
}

async fn put_policy(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> R {
    caller.require_policymaker()?;
    let mut b = body_json(&body)?;
    ops::vhost(&st.broker, &vh)?;
    if let Value::Object(m) = &mut b {
        m.insert("name".into(), name.clone().into());
        m.insert("vhost".into(), vh.clone().into());
    }
    let p: PolicyDef = serde_json::from_value(b)
        .map_err(|e| ApiError::bad_request(format!("invalid policy: {e}")))?;
    let existed = policies_in(&st.broker, Some(&vh))?
        .iter()
        .any(|x| x.name == name);
    super::definitions::put_policy(&st.broker, &p).await?;
    if existed { no_content() } else { created() }
}

async fn delete_policy(
    State(st): State<AppState>,
    caller: Caller,
    Path((vh, name)): Path<(String, String)>,
) -> R {
    caller.require_policymaker()?;
    let Some(s) = &st.broker.storage else {
        return Err(ApiError::not_found());
    };
    let key = crate::store::defs::Definitions::key(&[&vh, &name]);
    if !s
        .defs
        .delete(crate::store::defs::Table::Policies, &key)
        .await?
    {
        return Err(ApiError::not_found());
    }
    s.defs
        .replicate(crate::store::defs::DefChange::DeletePolicy(
            vh.clone(),
            name.clone(),
        ));
    crate::broker::policy::reload(&st.broker, &vh).await;
    no_content()
}

// ---------------------------------------------------------------------------
// definitions

async fn export_definitions(State(st): State<AppState>, caller: Caller) -> R {
    caller.require_admin()?;
    ok_json(super::definitions::export(&st.broker)?)
}

async fn import_definitions(
    State(st): State<AppState>,
    caller: Caller,
    body: axum::body::Bytes,
) -> R {
    caller.require_admin()?;
    let b = body_json(&body)?;
    super::definitions::import(&st.broker, &b).await?;
    no_content()
}
