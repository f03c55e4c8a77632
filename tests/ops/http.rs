//! HTTP helpers: in-process (`router().oneshot`) and over a real socket.
#![allow(dead_code)]

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use serde_json::Value;
use std::sync::Arc;
use tower::ServiceExt;
use warren::broker::Broker;

pub fn basic(user: &str, pass: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
    )
}

/// One request through the router, as guest unless `auth` is given.
pub async fn call(
    broker: &Arc<Broker>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    call_as(broker, Some(("guest", "guest")), method, path, body).await
}

pub async fn call_as(
    broker: &Arc<Broker>,
    auth: Option<(&str, &str)>,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> (StatusCode, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("content-type", "application/json");
    if let Some((u, p)) = auth {
        req = req.header("authorization", basic(u, p));
    }
    let req = req
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let resp = warren::mgmt::router(broker.clone())
        .oneshot(req)
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    let v = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
    };
    (status, v)
}

/// A GET over a real socket; returns (status, body text).
pub fn get_socket(
    addr: std::net::SocketAddr,
    path: &str,
    auth: Option<(&str, &str)>,
) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let a = auth
        .map(|(u, p)| format!("Authorization: {}\r\n", basic(u, p)))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\n{a}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = out
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (status, body)
}
