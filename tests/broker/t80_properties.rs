//! Message properties, header tables and large bodies pass through
//! untouched.
use crate::common::*;
use futures_lite::StreamExt;
use lapin::BasicProperties;
use lapin::options::*;
use lapin::types::{AMQPValue, ByteArray, DecimalValue, FieldArray, FieldTable, LongString};

fn rich_headers() -> FieldTable {
    let mut nested = FieldTable::default();
    nested.insert("inner".into(), AMQPValue::LongString("deep".into()));
    nested.insert("n".into(), AMQPValue::LongLongInt(-5));
    let mut h = FieldTable::default();
    h.insert("bool".into(), AMQPValue::Boolean(true));
    h.insert("i8".into(), AMQPValue::ShortShortInt(-8));
    h.insert("u8".into(), AMQPValue::ShortShortUInt(200));
    h.insert("i16".into(), AMQPValue::ShortInt(-1600));
    h.insert("u16".into(), AMQPValue::ShortUInt(60000));
    h.insert("i32".into(), AMQPValue::LongInt(-320000));
    h.insert("u32".into(), AMQPValue::LongUInt(4_000_000_000));
    h.insert("i64".into(), AMQPValue::LongLongInt(-6_400_000_000));
    h.insert("f32".into(), AMQPValue::Float(1.5));
    h.insert("f64".into(), AMQPValue::Double(-2.25));
    h.insert(
        "dec".into(),
        AMQPValue::DecimalValue(DecimalValue {
            scale: 2,
            value: 12345,
        }),
    );
    h.insert(
        "str".into(),
        AMQPValue::LongString(LongString::from("héllo wörld".as_bytes().to_vec())),
    );
    h.insert(
        "bytes".into(),
        AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 2, 255])),
    );
    h.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
    h.insert("void".into(), AMQPValue::Void);
    h.insert(
        "array".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![
            AMQPValue::LongInt(1),
            AMQPValue::LongString("two".into()),
            AMQPValue::Boolean(false),
        ])),
    );
    h.insert("table".into(), AMQPValue::FieldTable(nested));
    h
}

fn all_properties() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("gzip".into())
        .with_headers(rich_headers())
        .with_delivery_mode(2)
        .with_priority(7)
        .with_correlation_id("corr-42".into())
        .with_reply_to("some-reply-queue".into())
        .with_expiration("60000".into())
        .with_message_id("msg-1".into())
        .with_timestamp(1_650_000_000)
        .with_type("order.created".into())
        .with_user_id("guest".into())
        .with_app_id("warren-tests".into())
        .with_cluster_id("cluster-x".into())
}

#[tokio::test]
async fn all_basic_properties_and_header_types_pass_through_consume() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "props").await;
    let props = all_properties();
    ch.basic_publish(
        "".into(),
        "props".into(),
        Default::default(),
        b"{}",
        props.clone(),
    )
    .await
    .unwrap();
    let mut c = ch
        .basic_consume(
            "props".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(3, c.next()).await.unwrap().unwrap();
    assert_eq!(d.properties, props);
    assert_eq!(d.data, b"{}");
}

#[tokio::test]
async fn properties_pass_through_basic_get_and_fanout() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    for q in ["pg1", "pg2"] {
        declare_queue(&ch, q).await;
        ch.queue_bind(
            q.into(),
            "amq.fanout".into(),
            "".into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    }
    let props = all_properties();
    ch.basic_publish(
        "amq.fanout".into(),
        "rk".into(),
        Default::default(),
        b"p",
        props.clone(),
    )
    .await
    .unwrap();
    settle().await;
    for q in ["pg1", "pg2"] {
        let m = ch
            .basic_get(q.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.delivery.properties, props, "queue {q}");
    }
}

#[tokio::test]
async fn empty_properties_and_empty_body() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "empty").await;
    ch.basic_publish(
        "".into(),
        "empty".into(),
        Default::default(),
        b"",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    settle().await;
    let m = ch
        .basic_get("empty".into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.properties, BasicProperties::default());
    assert!(m.delivery.data.is_empty());
}

#[tokio::test]
async fn user_id_must_match_authenticated_user() {
    let b = TestBroker::start().await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "uid").await;
    let w = watch_channel(&ch).await;
    ch.basic_publish(
        "".into(),
        "uid".into(),
        Default::default(),
        b"x",
        BasicProperties::default().with_user_id("alice".into()),
    )
    .await
    .unwrap();
    let (code, text) = w.error().await;
    assert_eq!(
        (code, text.as_str()),
        (
            406,
            "PRECONDITION_FAILED - user_id property set to 'alice' but authenticated user was 'guest'"
        )
    );
}

#[tokio::test]
async fn one_megabyte_body_arrives_intact() {
    let b = TestBroker::start_with(|c| c.amqp.frame_max = 16_384).await;
    let conn = b.connect().await;
    assert_eq!(conn.configuration().frame_max(), 16_384);
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "big").await;
    let body: Vec<u8> = (0..1_048_576u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    ch.confirm_select(Default::default()).await.unwrap();
    let conf = ch
        .basic_publish(
            "".into(),
            "big".into(),
            Default::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    assert!(within(5, conf).await.unwrap().is_ack());
    let mut c = ch
        .basic_consume(
            "big".into(),
            "".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert_eq!(d.data.len(), body.len());
    assert!(d.data == body, "body corrupted");
    // And via basic.get, after a second publish.
    ch.basic_publish(
        "".into(),
        "big".into(),
        Default::default(),
        &body,
        BasicProperties::default(),
    )
    .await
    .unwrap();
    let d = within(5, c.next()).await.unwrap().unwrap();
    assert!(d.data == body, "second body corrupted");
}

#[tokio::test]
async fn body_sizes_around_frame_boundaries_arrive_intact() {
    // (lapin never answers tune with less than 8192, so 8192 is the smallest
    // frame_max testable with it.)
    let b = TestBroker::start_with(|c| c.amqp.frame_max = 8192).await;
    let conn = b.connect().await;
    assert_eq!(conn.configuration().frame_max(), 8192);
    let ch = conn.create_channel().await.unwrap();
    declare_queue(&ch, "edges").await;
    let sizes = [0usize, 1, 8183, 8184, 8185, 16_368, 16_369, 100_000];
    for (i, n) in sizes.iter().enumerate() {
        let body = vec![(i as u8).wrapping_add(1); *n];
        ch.basic_publish(
            "".into(),
            "edges".into(),
            Default::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    settle().await;
    for (i, n) in sizes.iter().enumerate() {
        let m = ch
            .basic_get("edges".into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .unwrap();
        assert_eq!(m.delivery.data.len(), *n, "message {i}");
        assert!(
            m.delivery
                .data
                .iter()
                .all(|b| *b == (i as u8).wrapping_add(1))
        );
    }
}
