//! Connection-level behaviour: open/close, channels, channel_max, server
//! properties, heartbeats, authentication and vhost access.
use crate::common::*;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, channel as chan_m};
use lapin::types::AMQPValue;
use lapin::{Connection, ConnectionProperties};
use std::time::{Duration, Instant};

#[tokio::test]
async fn connection_opens_and_closes_cleanly() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    assert!(conn.status().connected());
    assert_eq!(conn.status().vhost().as_str(), "/");
    let ch = conn.create_channel().await.unwrap();
    assert!(ch.status().connected());
    ch.close(200, "bye".into()).await.unwrap();
    conn.close(200, "bye".into()).await.unwrap();
    assert!(!conn.status().connected());
    assert!(conn.create_channel().await.is_err());
}

#[tokio::test]
async fn negotiated_tune_values_match_config() {
    let b = TestBroker::start_with(|c| {
        c.amqp.frame_max = 65_536;
        c.amqp.channel_max = 100;
        c.amqp.heartbeat = 30;
    })
    .await;
    let conn = b.connect().await;
    let cfg = conn.configuration();
    assert_eq!(cfg.frame_max(), 65_536);
    assert_eq!(cfg.channel_max(), 100);
    assert_eq!(cfg.heartbeat(), 30);
}

#[tokio::test]
async fn many_channels_work_independently() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let mut chans = Vec::new();
    for _ in 0..50 {
        chans.push(conn.create_channel().await.unwrap());
    }
    for (i, ch) in chans.iter().enumerate() {
        let q = format!("many-{i}");
        declare_queue(ch, &q).await;
        publish(ch, "", &q, format!("body-{i}").as_bytes()).await;
    }
    for (i, ch) in chans.iter().enumerate() {
        let q = format!("many-{i}");
        assert_eq!(drain(ch, &q).await, vec![format!("body-{i}")]);
    }
    // Closing one channel leaves the others usable.
    chans[0].close(200, "done".into()).await.unwrap();
    publish(&chans[1], "", "many-1", b"again").await;
    assert_eq!(drain(&chans[1], "many-1").await, vec!["again".to_string()]);
}

#[tokio::test]
async fn channel_max_is_negotiated_and_lapin_cannot_exceed_it() {
    let b = TestBroker::start_with(|c| c.amqp.channel_max = 10).await;
    let conn = b.connect().await;
    assert_eq!(conn.configuration().channel_max(), 10);
    let mut chans = Vec::new();
    for _ in 0..10 {
        chans.push(conn.create_channel().await.unwrap());
    }
    let err = conn.create_channel().await.unwrap_err();
    assert!(
        matches!(err.kind(), lapin::ErrorKind::ChannelsLimitReached),
        "{err:?}"
    );
    // The ten open channels still work.
    declare_queue(&chans[9], "cm").await;
}

#[tokio::test]
async fn opening_more_channels_than_channel_max_closes_connection_with_530() {
    let b = TestBroker::start_with(|c| c.amqp.channel_max = 10).await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    for ch in 1..=10 {
        raw.open_channel(ch).await;
    }
    raw.send_method(
        11,
        AMQPClass::Channel(chan_m::AMQPMethod::Open(chan_m::Open {})),
    )
    .await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 530);
    assert_eq!(
        text,
        "NOT_ALLOWED - number of channels opened (10) has reached the negotiated channel_max (10)"
    );
}

#[tokio::test]
async fn channel_number_above_channel_max_is_refused() {
    let b = TestBroker::start_with(|c| c.amqp.channel_max = 10).await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.send_method(
        11,
        AMQPClass::Channel(chan_m::AMQPMethod::Open(chan_m::Open {})),
    )
    .await;
    let (code, _text, _, _) = raw.expect_connection_close().await;
    // RabbitMQ refuses it as a hard error (connection closed); the exact code
    // depends on how the limit is hit.
    assert!(code == 530 || code == 504, "code {code}");
    raw.expect_eof().await;
}

#[tokio::test]
async fn server_properties_advertise_rabbitmq_capabilities() {
    let b = TestBroker::start().await;
    let raw = RawClient::handshake(b.addr, 0).await;
    let props = raw.server_properties.inner();
    for k in ["product", "version", "platform"] {
        assert!(
            matches!(props.get(k), Some(AMQPValue::LongString(_))),
            "missing {k}: {props:?}"
        );
    }
    let Some(AMQPValue::FieldTable(caps)) = props.get("capabilities") else {
        panic!("no capabilities table: {props:?}")
    };
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        assert_eq!(
            caps.inner().get(c),
            Some(&AMQPValue::Boolean(true)),
            "capability {c}"
        );
    }
}

#[tokio::test]
async fn server_sends_heartbeats_at_negotiated_interval() {
    let b = TestBroker::start_with(|c| c.amqp.heartbeat = 1).await;
    let mut raw = RawClient::handshake(b.addr, 1).await;
    assert_eq!(raw.tune.as_ref().unwrap().heartbeat, 1);
    let t = Instant::now();
    match raw.next().await {
        RawEvent::Frame(AMQPFrame::Heartbeat) => {}
        other => panic!("expected a heartbeat, got {other:?}"),
    }
    assert!(
        t.elapsed() < Duration::from_millis(1600),
        "first heartbeat after {:?}",
        t.elapsed()
    );
}

#[tokio::test]
async fn silent_client_is_disconnected_after_missed_heartbeats() {
    let b = TestBroker::start_with(|c| c.amqp.heartbeat = 1).await;
    let mut raw = RawClient::handshake(b.addr, 1).await;
    let t = Instant::now();
    within(5, raw.expect_eof()).await;
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(1500) && e <= Duration::from_millis(3500),
        "disconnected after {e:?}"
    );
}

#[tokio::test]
async fn lapin_client_with_heartbeats_stays_connected() {
    let b = TestBroker::start_with(|c| c.amqp.heartbeat = 1).await;
    let conn = b.connect().await;
    assert_eq!(conn.configuration().heartbeat(), 1);
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "hb").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(conn.status().connected());
    publish(&ch, "", "hb", b"still here").await;
    assert_eq!(drain(&ch, "hb").await, vec!["still here".to_string()]);
}

#[tokio::test]
async fn heartbeat_disabled_by_client_keeps_silent_connection() {
    let b = TestBroker::start_with(|c| c.amqp.heartbeat = 1).await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // Still open: a channel can be opened.
    raw.open_channel(1).await;
}

#[tokio::test]
async fn wrong_password_is_refused_with_403() {
    let b = TestBroker::start().await;
    let url = format!("amqp://guest:nope@{}/%2f", b.addr);
    let err = within(
        5,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .unwrap_err();
    let (code, text) = amqp_error(&err).unwrap_or_else(|| panic!("not an AMQP error: {err:?}"));
    assert_eq!(code, 403);
    assert_eq!(
        text,
        "ACCESS_REFUSED - Login was refused using authentication mechanism PLAIN. For details see the broker logfile."
    );
}

#[tokio::test]
async fn unknown_user_is_refused_with_403() {
    let b = TestBroker::start().await;
    let url = format!("amqp://nobody:guest@{}/%2f", b.addr);
    let err = within(
        5,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .unwrap_err();
    assert_eq!(amqp_error(&err).map(|e| e.0), Some(403), "{err:?}");
}

#[tokio::test]
async fn unknown_vhost_is_refused_with_530() {
    let b = TestBroker::start().await;
    let url = format!("amqp://guest:guest@{}/nosuch", b.addr);
    let err = within(
        5,
        Connection::connect(&url, ConnectionProperties::default()),
    )
    .await
    .unwrap_err();
    let (code, text) = amqp_error(&err).unwrap_or_else(|| panic!("not an AMQP error: {err:?}"));
    assert_eq!(code, 530);
    assert_eq!(text, "NOT_ALLOWED - vhost nosuch not found");
}

#[tokio::test]
async fn client_close_releases_server_side_and_other_connections_unaffected() {
    let b = TestBroker::start().await;
    let c1 = b.connect().await;
    let c2 = b.connect().await;
    let ch2 = c2.create_channel().await.unwrap();
    declare_queue(&ch2, "iso").await;
    c1.close(200, "bye".into()).await.unwrap();
    publish(&ch2, "", "iso", b"x").await;
    assert_eq!(drain(&ch2, "iso").await, vec!["x".to_string()]);
}
