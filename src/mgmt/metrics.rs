//! Prometheus metrics in the text exposition format, on their own port
//! (RabbitMQ's rabbitmq_prometheus serves 15692). Names follow
//! rabbitmq_prometheus where one exists; Warren-only ones start `warren_`.

use crate::broker::Broker;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use std::fmt::Write;
use std::sync::Arc;
use std::sync::OnceLock;
use std::sync::atomic::Ordering;
use std::time::Instant;

static STARTED: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the metrics were first asked for (≈ broker start).
pub fn uptime_ms() -> u64 {
    STARTED.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// The metrics routes.
pub fn router(broker: Arc<Broker>) -> axum::Router {
    let _ = uptime_ms();
    axum::Router::new()
        .route("/metrics", get(scrape))
        .with_state(broker)
}

async fn scrape(State(b): State<Arc<Broker>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&b).await,
    )
}

fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric.
pub async fn render(b: &Broker) -> String {
    let mut out = String::with_capacity(4096);
    let l = &b.limits;
    let alarm = b.alarm().borrow().clone();
    let conns: Vec<usize> = b
        .connections
        .iter()
        .map(|c| c.channel_numbers().len())
        .collect();
    let g = |out: &mut String, name: &str, help: &str, v: f64| {
        family(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    };
    g(
        &mut out,
        "rabbitmq_connections",
        "Connections currently open",
        conns.len() as f64,
    );
    g(
        &mut out,
        "rabbitmq_channels",
        "Channels currently open",
        conns.iter().sum::<usize>() as f64,
    );
    g(
        &mut out,
        "rabbitmq_process_resident_memory_bytes",
        "Memory used in bytes",
        crate::broker::alarms::resident_bytes() as f64,
    );
    g(
        &mut out,
        "rabbitmq_resident_memory_limit_bytes",
        "Memory high watermark in bytes",
        l.memory_bytes.load(Ordering::Relaxed) as f64,
    );
    g(
        &mut out,
        "rabbitmq_disk_space_available_bytes",
        "Disk space available in bytes",
        l.disk_free.load(Ordering::Relaxed) as f64,
    );
    g(
        &mut out,
        "rabbitmq_disk_space_available_limit_bytes",
        "Free disk space low watermark in bytes",
        l.disk_free_bytes.load(Ordering::Relaxed) as f64,
    );
    let mem_alarm = alarm.as_deref().is_some_and(|a| a.contains("memory"));
    let disk_alarm = alarm.as_deref().is_some_and(|a| a.contains("disk"));
    g(
        &mut out,
        "rabbitmq_alarms_memory_used_watermark",
        "is 1 if VM memory watermark alarm is in effect",
        f64::from(u8::from(mem_alarm)),
    );
    g(
        &mut out,
        "rabbitmq_alarms_free_disk_space_watermark",
        "is 1 if free disk space watermark alarm is in effect",
        f64::from(u8::from(disk_alarm)),
    );
    g(
        &mut out,
        "rabbitmq_erlang_uptime_seconds",
        "Node uptime",
        uptime_ms() as f64 / 1000.0,
    );

    let mut queues = Vec::new();
    for v in b.vhosts.iter() {
        for q in v.queues.iter() {
            queues.push(q.value().clone());
        }
    }
    queues.sort_by(|a, b| (&a.vhost, &a.name).cmp(&(&b.vhost, &b.name)));
    let mut rows = Vec::with_capacity(queues.len());
    for q in &queues {
        rows.push((
            q.clone(),
            q.stats().await.unwrap_or_default(),
            super::stats::totals(q),
        ));
    }
    g(
        &mut out,
        "rabbitmq_queues",
        "Queues available",
        queues.len() as f64,
    );
    let per_queue: [(
        &str,
        &str,
        &str,
        fn(&crate::queue::core::Counts, (u64, u64, u64, u64)) -> u64,
    ); 8] = [
        (
            "rabbitmq_queue_messages_ready",
            "gauge",
            "Messages ready to be delivered to consumers",
            |c, _| c.ready,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "gauge",
            "Messages delivered to consumers but not yet acknowledged",
            |c, _| c.unacked,
        ),
        (
            "rabbitmq_queue_messages",
            "gauge",
            "Sum of ready and unacknowledged messages",
            |c, _| c.ready + c.unacked,
        ),
        (
            "rabbitmq_queue_consumers",
            "gauge",
            "Consumers on a queue",
            |c, _| c.consumers,
        ),
        (
            "rabbitmq_queue_messages_published_total",
            "counter",
            "Messages published to a queue",
            |_, t| t.0,
        ),
        (
            "rabbitmq_queue_messages_delivered_total",
            "counter",
            "Messages delivered to consumers (including basic.get)",
            |_, t| t.1,
        ),
        (
            "rabbitmq_queue_messages_redelivered_total",
            "counter",
            "Messages redelivered to consumers",
            |_, t| t.2,
        ),
        (
            "rabbitmq_queue_messages_acked_total",
            "counter",
            "Messages acknowledged by consumers",
            |_, t| t.3,
        ),
    ];
    for (name, kind, help, f) in per_queue {
        family(&mut out, name, kind, help);
        for (q, c, t) in &rows {
            let _ = writeln!(
                out,
                "{name}{{vhost=\"{}\",queue=\"{}\"}} {}",
                esc(&q.vhost),
                esc(&q.name),
                f(c, *t)
            );
        }
    }
    let sum = |i: usize| {
        rows.iter()
            .map(|(_, _, t)| [t.0, t.1, t.2, t.3][i])
            .sum::<u64>()
    };
    for (i, (name, help)) in [
        (
            "rabbitmq_global_messages_received_total",
            "Messages received from publishers (per target queue)",
        ),
        (
            "rabbitmq_global_messages_delivered_total",
            "Messages delivered to consumers",
        ),
        (
            "rabbitmq_global_messages_redelivered_total",
            "Messages redelivered to consumers",
        ),
        (
            "rabbitmq_global_messages_acknowledged_total",
            "Messages acknowledged by consumers",
        ),
    ]
    .iter()
    .enumerate()
    {
        family(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {}", sum(i));
    }
    if let Some(st) = &b.storage {
        let s = st.msgs.stats();
        g(
            &mut out,
            "warren_store_fsync_latency_seconds",
            "Latency of the last message store fdatasync",
            s.last_fsync_us as f64 / 1e6,
        );
        g(
            &mut out,
            "warren_store_fsync_latency_avg_seconds",
            "Mean latency of message store fdatasyncs",
            s.avg_fsync_us as f64 / 1e6,
        );
        family(
            &mut out,
            "warren_store_fsyncs_total",
            "counter",
            "fdatasync calls on message store segments (one per group commit)",
        );
        let _ = writeln!(out, "warren_store_fsyncs_total {}", s.fsyncs);
        g(
            &mut out,
            "warren_store_segments",
            "Message store segment files",
            s.segments as f64,
        );
        g(
            &mut out,
            "warren_store_bytes_on_disk",
            "Bytes of message store segment and ack files",
            s.bytes_on_disk as f64,
        );
    }
    out
}
