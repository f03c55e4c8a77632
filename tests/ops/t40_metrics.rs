//! Prometheus scrape.

use crate::common::*;
use crate::http::get_socket;

#[tokio::test]
async fn scrape() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "mq").await;
    publish(&ch, "", "mq", b"x").await;
    publish(&ch, "", "mq", b"y").await;
    settle().await;
    let addr = b.metrics_addr.expect("metrics listening");
    let (s, text) = tokio::task::spawn_blocking(move || get_socket(addr, "/metrics", None))
        .await
        .unwrap();
    assert_eq!(s, 200);
    for name in [
        "rabbitmq_connections 1",
        "rabbitmq_channels 1",
        "rabbitmq_queue_messages_ready{vhost=\"/\",queue=\"mq\"} 2",
        "rabbitmq_queue_messages_unacked{vhost=\"/\",queue=\"mq\"} 0",
        "rabbitmq_queue_consumers{vhost=\"/\",queue=\"mq\"} 0",
        "rabbitmq_queue_messages_published_total{vhost=\"/\",queue=\"mq\"} 2",
        "# TYPE rabbitmq_process_resident_memory_bytes gauge",
        "rabbitmq_disk_space_available_bytes",
        "rabbitmq_alarms_memory_used_watermark 0",
        "rabbitmq_alarms_free_disk_space_watermark 0",
        "rabbitmq_global_messages_received_total 2",
        "warren_store_fsync_latency_seconds",
    ] {
        assert!(text.contains(name), "missing '{name}' in:\n{text}");
    }
}
