//! Wire-level robustness, driven with raw bytes: protocol header
//! negotiation, framing errors, frames on the wrong channel or out of order.
//! Each framing error must close only the offending connection.
use crate::common::*;
use amq_protocol::frame::AMQPFrame;
use amq_protocol::protocol::{AMQPClass, basic, queue as q_m};
use futures_lite::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;

/// A lapin connection publishing and consuming while the raw one misbehaves.
async fn assert_other_connection_fine(b: &TestBroker, tag: &str) {
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = format!("healthy-{tag}");
    declare_queue(&ch, &q).await;
    let mut consumer = ch
        .basic_consume(
            q.as_str().into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    for i in 0..5 {
        let d = within(3, consumer.next()).await.unwrap().unwrap();
        assert_eq!(d.data, format!("{i}").as_bytes());
    }
    conn.close(200, "ok".into()).await.unwrap();
}

#[tokio::test]
async fn wrong_protocol_header_gets_amqp_0_9_1_header_and_close() {
    let b = TestBroker::start().await;
    for bad in [
        &b"AMQP\x00\x00\x08\x00"[..],
        b"AMQP\x01\x01\x00\x0a",
        b"GET / HT",
    ] {
        let mut raw = RawClient::connect(b.addr).await;
        raw.send(bad).await;
        match raw.next().await {
            RawEvent::Bytes(v) => assert_eq!(v, AMQP_HEADER.to_vec(), "for {bad:?}"),
            other => panic!("expected the protocol header, got {other:?}"),
        }
        assert!(matches!(raw.next().await, RawEvent::Eof));
    }
}

#[tokio::test]
async fn garbage_after_handshake_is_frame_error() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.send(b"\x09\x00\x01\x00\x00\x00\x04junk\xce").await; // frame type 9 does not exist
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 501);
    assert!(text.starts_with("FRAME_ERROR - "), "{text}");
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "garbage").await;
}

#[tokio::test]
async fn random_garbage_after_handshake_closes_connection_with_frame_error() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.send(b"this is definitely not AMQP at all\r\n").await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 501, "{text}");
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "garbage2").await;
}

#[tokio::test]
async fn oversized_frame_is_frame_error() {
    let b = TestBroker::start_with(|c| c.amqp.frame_max = 8192).await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    // Announce a body frame far larger than frame_max; send only its header.
    let mut hdr = vec![3u8, 0, 1];
    hdr.extend_from_slice(&100_000u32.to_be_bytes());
    raw.send(&hdr).await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 501);
    assert!(text.starts_with("FRAME_ERROR - "), "{text}");
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "oversized").await;
}

#[tokio::test]
async fn frame_slightly_over_frame_max_is_tolerated_like_rabbitmq() {
    // RabbitMQ accepts payloads up to frame_max (not frame_max - 8), because
    // many clients get the overhead wrong. A publish whose single body frame
    // is frame_max + 8 octets long on the wire must go through.
    let b = TestBroker::start_with(|c| c.amqp.frame_max = 4096).await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Queue(q_m::AMQPMethod::Declare(q_m::Declare {
            queue: "fudge".into(),
            ..Default::default()
        })),
    )
    .await;
    raw.method().await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "fudge".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    let body = vec![b'x'; 4096];
    raw.send_frame(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: body.len() as u64,
            properties: Default::default(),
        },
    ))
    .await;
    raw.send(&raw_frame(3, 1, &body, 0xCE)).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "fudge".into(),
            no_ack: true,
        })),
    )
    .await;
    match raw.method().await {
        (1, AMQPClass::Basic(basic::AMQPMethod::GetOk(_))) => {}
        other => panic!("expected get-ok, got {other:?}"),
    }
}

#[tokio::test]
async fn bad_frame_end_octet_is_frame_error() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    let mut f = encode_frame(&AMQPFrame::Method(
        1,
        AMQPClass::Queue(q_m::AMQPMethod::Declare(q_m::Declare {
            queue: "q".into(),
            ..Default::default()
        })),
    ));
    *f.last_mut().unwrap() = 0x00;
    raw.send(&f).await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 501);
    assert!(text.starts_with("FRAME_ERROR - "), "{text}");
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "frameend").await;
}

#[tokio::test]
async fn method_on_unopened_channel_is_channel_error() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.send_method(
        5,
        AMQPClass::Queue(q_m::AMQPMethod::Declare(q_m::Declare {
            queue: "q".into(),
            ..Default::default()
        })),
    )
    .await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 504);
    assert!(text.starts_with("CHANNEL_ERROR - "), "{text}");
    assert!(text.contains("expected 'channel.open'"), "{text}");
    raw.expect_eof().await;
}

#[tokio::test]
async fn body_frame_without_publish_is_unexpected_frame() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send(&raw_frame(3, 1, b"hello", 0xCE)).await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 505);
    assert!(text.starts_with("UNEXPECTED_FRAME - "), "{text}");
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "body").await;
}

#[tokio::test]
async fn header_frame_without_publish_is_unexpected_frame() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send_frame(&AMQPFrame::Header(
        1,
        amq_protocol::frame::AMQPContentHeader {
            class_id: 60,
            body_size: 3,
            properties: Default::default(),
        },
    ))
    .await;
    let (code, _text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 505);
}

#[tokio::test]
async fn method_in_the_middle_of_content_is_unexpected_frame() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "x".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "x".into(),
            no_ack: true,
        })),
    )
    .await;
    let (code, text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 505);
    assert!(
        text.starts_with("UNEXPECTED_FRAME - expected content header for class 60"),
        "{text}"
    );
}

#[tokio::test]
async fn method_in_the_middle_of_content_reply_text_matches_rabbitmq() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
            exchange: "".into(),
            routing_key: "x".into(),
            mandatory: false,
            immediate: false,
        })),
    )
    .await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Get(basic::Get {
            queue: "x".into(),
            no_ack: true,
        })),
    )
    .await;
    let (code, text, class, method) = raw.expect_connection_close().await;
    assert_eq!(code, 505);
    assert_eq!(
        text,
        "UNEXPECTED_FRAME - expected content header for class 60, got non content header frame instead"
    );
    assert_eq!((class, method), (60, 40));
}

#[tokio::test]
async fn unknown_class_id_is_not_implemented() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send(&raw_frame(1, 1, &[0, 99, 0, 10], 0xCE)).await;
    let (code, _text, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 540);
    raw.expect_eof().await;
    assert_other_connection_fine(&b, "class").await;
}

#[tokio::test]
async fn heartbeat_on_nonzero_channel_is_rejected() {
    let b = TestBroker::start().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send(&raw_frame(8, 1, &[], 0xCE)).await;
    let (code, _text, _, _) = raw.expect_connection_close().await;
    // RabbitMQ treats it as an unexpected frame (505); 501 is also acceptable
    // per the spec.
    assert!(code == 505 || code == 501, "code {code}");
}

#[tokio::test]
async fn frame_error_during_consume_does_not_stall_other_connections() {
    let b = TestBroker::start().await;
    // A raw client consuming from a queue with unacked messages, then
    // sending garbage.
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "shared-q").await;
    for i in 0..3 {
        publish(&ch, "", "shared-q", format!("{i}").as_bytes()).await;
    }
    settle().await;
    let mut raw = RawClient::handshake(b.addr, 0).await;
    raw.open_channel(1).await;
    raw.send_method(
        1,
        AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
            queue: "shared-q".into(),
            consumer_tag: "raw".into(),
            no_local: false,
            no_ack: false,
            exclusive: false,
            nowait: false,
            arguments: Default::default(),
        })),
    )
    .await;
    raw.method().await; // consume-ok
    raw.send(b"\x01\x00\x01\xff\xff\xff\xff").await;
    let (code, _, _, _) = raw.expect_connection_close().await;
    assert_eq!(code, 501);
    raw.expect_eof().await;
    // The three unacked messages are back, in order.
    let bodies = drain(&ch, "shared-q").await;
    assert_eq!(bodies, vec!["0", "1", "2"]);
}
