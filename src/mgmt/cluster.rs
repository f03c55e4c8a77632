//! Cluster status and membership over HTTP (Warren's own paths; RabbitMQ
//! keeps these in rabbitmqctl): GET /api/cluster, POST /api/cluster/join,
//! POST /api/cluster/forget. `warrenctl cluster_status`, `join_cluster` and
//! `forget_cluster_node` use them.

use super::{ApiError, AppState, Caller};
use crate::broker::Broker;
use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

type R = Result<Response, ApiError>;

/// Replica placement of a quorum queue: (leader, members, online members).
pub fn quorum_replicas(
    b: &Broker,
    vhost: &str,
    name: &str,
) -> Option<(Option<String>, Vec<String>, Vec<String>)> {
    let c = b.cluster.get()?;
    let def = c
        .meta
        .lock()
        .ok()?
        .queues
        .get(&(vhost.to_string(), name.to_string()))
        .cloned()?;
    let name_of = |id: u64| {
        c.nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("node-{id}"))
    };
    let leader = c.leader_of(&def.group()).map(name_of);
    let members: Vec<String> = def.members.iter().map(|m| name_of(*m)).collect();
    let online: Vec<String> = def
        .members
        .iter()
        .filter(|m| c.alive(**m))
        .map(|m| name_of(*m))
        .collect();
    Some((leader, members, online))
}

/// Replica placement of a replicated stream: (leader, members, online
/// members). None for a stream that is not replicated.
pub fn stream_replicas(
    b: &Broker,
    vhost: &str,
    name: &str,
) -> Option<(Option<String>, Vec<String>, Vec<String>)> {
    let c = b.cluster.get()?;
    let def = crate::queue::stream::replica::def_of(c, vhost, name)?;
    let name_of = |id: u64| {
        c.nodes
            .get(&id)
            .map(|n| n.name.clone())
            .unwrap_or_else(|| format!("node-{id}"))
    };
    let members: Vec<String> = def.members.iter().map(|m| name_of(*m)).collect();
    let online: Vec<String> = def
        .members
        .iter()
        .filter(|m| c.alive(**m))
        .map(|m| name_of(*m))
        .collect();
    Some((Some(name_of(def.leader)), members, online))
}

/// The cluster as this node sees it.
pub fn status_json(b: &Broker) -> Value {
    let Some(c) = b.cluster.get() else {
        return json!({"nodes": [], "quorum_queues": []});
    };
    let meta_leader = c.leader_of(crate::cluster::types::META_GROUP);
    let nodes: Vec<Value> = c
        .members()
        .into_iter()
        .map(|(id, info)| {
            json!({
                "name": if info.name.is_empty() { format!("node-{id}") } else { info.name },
                "address": info.addr,
                "running": c.alive(id),
                "metadata_leader": meta_leader == Some(id),
                "this_node": id == c.me.id,
            })
        })
        .collect();
    let defs: Vec<_> = c
        .meta
        .lock()
        .map(|m| m.queues.values().cloned().collect())
        .unwrap_or_default();
    let queues: Vec<Value> = defs
        .iter()
        .map(|d| {
            let (leader, members, online) =
                quorum_replicas(b, &d.vhost, &d.name).unwrap_or((None, Vec::new(), Vec::new()));
            json!({"vhost": d.vhost, "name": d.name, "leader": leader, "members": members, "online": online})
        })
        .collect();
    let sdefs: Vec<crate::cluster::types::StreamDef> = c
        .meta
        .lock()
        .map(|m| m.streams.values().cloned().collect())
        .unwrap_or_default();
    let streams: Vec<Value> = sdefs
        .iter()
        .map(|d| {
            let (leader, members, online) =
                stream_replicas(b, &d.vhost, &d.name).unwrap_or((None, Vec::new(), Vec::new()));
            json!({"vhost": d.vhost, "name": d.name, "leader": leader, "members": members, "online": online, "epoch": d.epoch})
        })
        .collect();
    json!({
        "cluster_name": "warren",
        "this_node": c.me.info.name,
        "nodes": nodes,
        "quorum_queues": queues,
        "streams": streams,
    })
}

/// GET /api/cluster.
pub async fn get_status(State(st): State<AppState>, _c: Caller) -> R {
    Ok(Json(status_json(&st.broker)).into_response())
}

/// POST /api/cluster/join {"seed": "host:port"}: this node joins the
/// cluster that node belongs to.
pub async fn post_join(State(st): State<AppState>, caller: Caller, Json(body): Json<Value>) -> R {
    if !caller.is_admin() {
        return Err(ApiError::unauthorised("Not administrator user"));
    }
    let Some(seed) = body.get("seed").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "body must be {\"seed\": \"host:port\"}",
        ));
    };
    let Some(c) = st.broker.cluster.get().cloned() else {
        return Err(ApiError::bad_request(
            "clustering is not running on this node",
        ));
    };
    c.join_via(seed)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot join through {seed}: {e}")))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// POST /api/cluster/forget {"node": "warren@host"}: removes a node.
pub async fn post_forget(State(st): State<AppState>, caller: Caller, Json(body): Json<Value>) -> R {
    if !caller.is_admin() {
        return Err(ApiError::unauthorised("Not administrator user"));
    }
    let Some(node) = body.get("node").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "body must be {\"node\": \"warren@host\"}",
        ));
    };
    let Some(c) = st.broker.cluster.get().cloned() else {
        return Err(ApiError::bad_request(
            "clustering is not running on this node",
        ));
    };
    let id = crate::cluster::types::node_id(node);
    if !c.members().iter().any(|(m, _)| *m == id) {
        return Err(ApiError::not_found());
    }
    c.forget(id)
        .await
        .map_err(|e| ApiError::bad_request(format!("cannot remove {node}: {e}")))?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// POST /api/cluster/members {"vhost", "queue", "node", "action": "add" |
/// "delete"}: one quorum queue gains or loses a replica (rabbitmq-queues
/// add_member / delete_member).
pub async fn post_members(
    State(st): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> R {
    if !caller.is_admin() {
        return Err(ApiError::unauthorised("Not administrator user"));
    }
    let s = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string()
    };
    let (vhost, queue, node, action) = (s("vhost"), s("queue"), s("node"), s("action"));
    let vhost = if vhost.is_empty() {
        "/".to_string()
    } else {
        vhost
    };
    if queue.is_empty() || node.is_empty() || !(action == "add" || action == "delete") {
        return Err(ApiError::bad_request(
            "body must be {\"vhost\", \"queue\", \"node\", \"action\": \"add\"|\"delete\"}",
        ));
    }
    let id = crate::cluster::types::node_id(&node);
    crate::queue::quorum::change_member(&st.broker, &vhost, &queue, id, action == "add")
        .await
        .map_err(ApiError::bad_request)?;
    Ok(axum::http::StatusCode::NO_CONTENT.into_response())
}

/// POST /api/cluster/grow {"node"} and /api/cluster/shrink {"node"}: add the
/// node to every quorum queue, or remove it from every one (rabbitmq-queues
/// grow / shrink). Answers with what was done per queue.
pub async fn post_grow(st: State<AppState>, caller: Caller, body: Json<Value>) -> R {
    grow_or_shrink(st, caller, body, true).await
}

/// See [`post_grow`].
pub async fn post_shrink(st: State<AppState>, caller: Caller, body: Json<Value>) -> R {
    grow_or_shrink(st, caller, body, false).await
}

async fn grow_or_shrink(
    State(st): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
    add: bool,
) -> R {
    if !caller.is_admin() {
        return Err(ApiError::unauthorised("Not administrator user"));
    }
    let Some(node) = body.get("node").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "body must be {\"node\": \"warren@host\"}",
        ));
    };
    let Some(c) = st.broker.cluster.get().cloned() else {
        return Err(ApiError::bad_request(
            "clustering is not running on this node",
        ));
    };
    let id = crate::cluster::types::node_id(node);
    let defs: Vec<_> = c
        .meta
        .lock()
        .map(|m| m.queues.values().cloned().collect())
        .unwrap_or_default();
    let mut out = Vec::new();
    for d in defs {
        if d.members.contains(&id) == add {
            continue;
        }
        let r = crate::queue::quorum::change_member(&st.broker, &d.vhost, &d.name, id, add).await;
        out.push(json!({"vhost": d.vhost, "name": d.name, "result": match r { Ok(()) => "ok".to_string(), Err(e) => e }}));
    }
    Ok(Json(Value::Array(out)).into_response())
}
