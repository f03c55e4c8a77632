//! The wire: cutting frames out of the read buffer and writing frames into the
//! write buffer.
//!
//! Frames are cut by hand (7-byte header, payload, frame-end octet) so that the
//! size is checked against the negotiated `frame_max` before anything is
//! allocated, and so that body frames become `Bytes` slices of the read buffer
//! without a copy. Method payloads and content headers are decoded with
//! amq-protocol's nom parsers. The hot outgoing frames (deliver, content
//! header, body, confirm ack) are written by hand; everything else goes through
//! amq-protocol's generator. This module never touches broker state.

use super::error::{AmqpError, code};
use amq_protocol::frame::{AMQPContentHeader, WriteContext, gen_frame};
use amq_protocol::protocol::{AMQPClass, BasicProperties, basic::gen_properties};
use bytes::{BufMut, Bytes, BytesMut};

/// Frame type octets.
pub const FRAME_METHOD: u8 = 1;
/// Content header frame.
pub const FRAME_HEADER: u8 = 2;
/// Content body frame.
pub const FRAME_BODY: u8 = 3;
/// Heartbeat frame.
pub const FRAME_HEARTBEAT: u8 = 8;
/// Frame-end octet.
pub const FRAME_END: u8 = 0xCE;
/// Bytes of framing around a payload: 7-byte header + frame-end.
pub const FRAME_OVERHEAD: usize = 8;

/// The protocol header a 0-9-1 client sends, and that we answer with when a
/// client sends anything else.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// One frame cut out of the read buffer.
#[derive(Debug)]
pub struct RawFrame {
    /// Frame type octet.
    pub kind: u8,
    /// Channel number.
    pub channel: u16,
    /// Payload (without header and frame-end).
    pub payload: Bytes,
}

/// Cuts the next frame from `buf`. `Ok(None)` means "need more bytes".
///
/// The declared size is checked against `frame_max` before waiting for (and
/// so buffering) the payload, so a peer cannot make us allocate more than one
/// frame's worth.
pub fn cut_frame(buf: &mut BytesMut, frame_max: u32) -> Result<Option<RawFrame>, AmqpError> {
    if buf.len() < 7 {
        return Ok(None);
    }
    let kind = buf[0];
    let channel = u16::from_be_bytes([buf[1], buf[2]]);
    let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]);
    if !matches!(
        kind,
        FRAME_METHOD | FRAME_HEADER | FRAME_BODY | FRAME_HEARTBEAT
    ) {
        return Err(AmqpError::new(
            code::FRAME_ERROR,
            format!("unknown frame type {kind} on channel {channel}"),
        ));
    }
    // frame_max counts the whole frame, header and end octet included;
    // like RabbitMQ we allow 8 octets of fudge, so a payload up to
    // frame_max itself is accepted.
    if u64::from(size) > u64::from(frame_max) {
        return Err(AmqpError::new(
            code::FRAME_ERROR,
            format!(
                "type {kind}, all octets = {} (frame size {} exceeds negotiated frame_max {frame_max})",
                size as u64 + FRAME_OVERHEAD as u64,
                size as u64 + FRAME_OVERHEAD as u64
            ),
        ));
    }
    let total = size as usize + FRAME_OVERHEAD;
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    if buf[total - 1] != FRAME_END {
        return Err(AmqpError::new(
            code::FRAME_ERROR,
            format!(
                "frame end octet is {:#04x}, expected 0xce (type {kind}, channel {channel}, size {size})",
                buf[total - 1]
            ),
        ));
    }
    let mut frame = buf.split_to(total);
    let _ = frame.split_to(7);
    frame.truncate(size as usize);
    Ok(Some(RawFrame {
        kind,
        channel,
        payload: frame.freeze(),
    }))
}

/// Class and method ids at the start of a method payload.
pub fn method_ids(payload: &[u8]) -> Option<(u16, u16)> {
    if payload.len() < 4 {
        return None;
    }
    Some((
        u16::from_be_bytes([payload[0], payload[1]]),
        u16::from_be_bytes([payload[2], payload[3]]),
    ))
}

/// Decodes a method payload. Unknown classes or methods are 540 NOT_IMPLEMENTED
/// (as RabbitMQ's `unknown_method`), malformed arguments 502 SYNTAX_ERROR.
pub fn parse_method(payload: &[u8]) -> Result<AMQPClass, AmqpError> {
    let (class_id, method_id) = method_ids(payload).ok_or_else(|| {
        AmqpError::new(
            code::FRAME_ERROR,
            format!("method frame too short ({} bytes)", payload.len()),
        )
    })?;
    if !known_method(class_id, method_id) {
        return Err(AmqpError::new(
            code::NOT_IMPLEMENTED,
            format!("unknown method: class {class_id}, method {method_id}"),
        )
        .on(class_id, method_id));
    }
    match amq_protocol::protocol::parse_class(payload) {
        Ok((rest, class)) if rest.is_empty() => Ok(class),
        Ok((rest, _)) => Err(AmqpError::new(
            code::FRAME_ERROR,
            format!(
                "{} trailing bytes after method {class_id}.{method_id}",
                rest.len()
            ),
        )
        .on(class_id, method_id)),
        Err(_) => Err(AmqpError::new(
            code::SYNTAX_ERROR,
            format!("malformed arguments for method {class_id}.{method_id}"),
        )
        .on(class_id, method_id)),
    }
}

/// True for class/method pairs defined by AMQP 0-9-1 (with RabbitMQ extensions).
fn known_method(class_id: u16, method_id: u16) -> bool {
    match class_id {
        10 => matches!(
            method_id,
            10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51 | 60 | 61 | 70 | 71
        ),
        20 => matches!(method_id, 10 | 11 | 20 | 21 | 40 | 41),
        30 => matches!(method_id, 10 | 11),
        40 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 51),
        50 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31 | 40 | 41 | 50 | 51),
        60 => matches!(
            method_id,
            10 | 11
                | 20
                | 21
                | 30
                | 31
                | 40
                | 50
                | 60
                | 70
                | 71
                | 72
                | 80
                | 90
                | 100
                | 110
                | 111
                | 120
        ),
        85 => matches!(method_id, 10 | 11),
        90 => matches!(method_id, 10 | 11 | 20 | 21 | 30 | 31),
        _ => false,
    }
}

/// A decoded content header: sizes and properties, plus the raw property
/// bytes so deliveries can re-emit them untouched without re-encoding.
#[derive(Debug, Clone)]
pub struct ContentHeader {
    /// Content class (60 for basic).
    pub class_id: u16,
    /// Total body size announced by the publisher.
    pub body_size: u64,
    /// Decoded properties.
    pub properties: BasicProperties,
    /// Property flags and property list exactly as received.
    pub raw_properties: Bytes,
}

/// Decodes a content header payload.
pub fn parse_header(payload: &Bytes) -> Result<ContentHeader, AmqpError> {
    if payload.len() < 14 {
        return Err(AmqpError::new(
            code::FRAME_ERROR,
            format!("content header frame too short ({} bytes)", payload.len()),
        ));
    }
    let class_id = u16::from_be_bytes([payload[0], payload[1]]);
    let mut sz = [0u8; 8];
    sz.copy_from_slice(&payload[4..12]);
    let body_size = u64::from_be_bytes(sz);
    let raw = payload.slice(12..);
    let properties = match amq_protocol::protocol::basic::parse_properties(&raw[..]) {
        Ok((rest, p)) if rest.is_empty() => p,
        _ => {
            return Err(AmqpError::new(
                code::SYNTAX_ERROR,
                "malformed content header properties".to_string(),
            ));
        }
    };
    Ok(ContentHeader {
        class_id,
        body_size,
        properties,
        raw_properties: raw,
    })
}

/// Encodes properties into their wire form (flags + list).
pub fn encode_properties(props: &BasicProperties) -> Bytes {
    let ctx = WriteContext::from(Vec::with_capacity(64));
    match gen_properties::<Vec<u8>>(props)(ctx) {
        Ok(ctx) => Bytes::from(ctx.into_inner().0),
        // Generating into a Vec cannot run out of space; keep an empty
        // property list rather than fail a delivery.
        Err(_) => Bytes::from_static(&[0, 0]),
    }
}

/// Writes any method frame through amq-protocol's generator.
pub fn write_method(out: &mut BytesMut, channel: u16, class: AMQPClass) {
    write_frame(out, &amq_protocol::frame::AMQPFrame::Method(channel, class));
}

/// Writes any frame through amq-protocol's generator.
pub fn write_frame(out: &mut BytesMut, frame: &amq_protocol::frame::AMQPFrame) {
    let ctx = WriteContext::from(Vec::with_capacity(64));
    if let Ok(ctx) = gen_frame::<Vec<u8>>(frame)(ctx) {
        out.extend_from_slice(&ctx.into_inner().0);
    }
}

/// Writes a content header frame with raw property bytes.
pub fn write_header(out: &mut BytesMut, channel: u16, body_size: u64, raw_properties: &[u8]) {
    let size = 12 + raw_properties.len(); // class(2) weight(2) body size(8) + props
    out.reserve(size + FRAME_OVERHEAD);
    out.put_u8(FRAME_HEADER);
    out.put_u16(channel);
    out.put_u32(size as u32);
    out.put_u16(60);
    out.put_u16(0);
    out.put_u64(body_size);
    out.extend_from_slice(raw_properties);
    out.put_u8(FRAME_END);
}

/// Writes the body in frames no larger than `frame_max`.
pub fn write_body(out: &mut BytesMut, channel: u16, body: &[u8], frame_max: u32) {
    let max_payload = (frame_max as usize).saturating_sub(FRAME_OVERHEAD).max(1);
    for chunk in body.chunks(max_payload) {
        out.reserve(chunk.len() + FRAME_OVERHEAD);
        out.put_u8(FRAME_BODY);
        out.put_u16(channel);
        out.put_u32(chunk.len() as u32);
        out.extend_from_slice(chunk);
        out.put_u8(FRAME_END);
    }
}

fn put_short_str(out: &mut BytesMut, s: &[u8]) {
    let n = s.len().min(255);
    out.put_u8(n as u8);
    out.extend_from_slice(&s[..n]);
}

/// Writes basic.deliver (60.60) by hand: it is on the hot path.
pub fn write_deliver(
    out: &mut BytesMut,
    channel: u16,
    consumer_tag: &[u8],
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
) {
    let ct = consumer_tag.len().min(255);
    let ex = exchange.len().min(255);
    let rk = routing_key.len().min(255);
    let size = 4 + 1 + ct + 8 + 1 + 1 + ex + 1 + rk;
    out.reserve(size + FRAME_OVERHEAD);
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(size as u32);
    out.put_u16(60);
    out.put_u16(60);
    put_short_str(out, consumer_tag);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u8(FRAME_END);
}

/// Writes basic.get-ok (60.71) by hand.
pub fn write_get_ok(
    out: &mut BytesMut,
    channel: u16,
    delivery_tag: u64,
    redelivered: bool,
    exchange: &[u8],
    routing_key: &[u8],
    message_count: u32,
) {
    let ex = exchange.len().min(255);
    let rk = routing_key.len().min(255);
    let size = 4 + 8 + 1 + 1 + ex + 1 + rk + 4;
    out.reserve(size + FRAME_OVERHEAD);
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(size as u32);
    out.put_u16(60);
    out.put_u16(71);
    out.put_u64(delivery_tag);
    out.put_u8(u8::from(redelivered));
    put_short_str(out, exchange);
    put_short_str(out, routing_key);
    out.put_u32(message_count);
    out.put_u8(FRAME_END);
}

/// Writes a publisher-confirm basic.ack (60.80) or basic.nack (60.120).
pub fn write_confirm(out: &mut BytesMut, channel: u16, tag: u64, multiple: bool, nack: bool) {
    let size: u32 = 4 + 8 + 1;
    out.reserve(size as usize + FRAME_OVERHEAD);
    out.put_u8(FRAME_METHOD);
    out.put_u16(channel);
    out.put_u32(size);
    out.put_u16(60);
    out.put_u16(if nack { 120 } else { 80 });
    out.put_u64(tag);
    // nack: bit 0 multiple, bit 1 requeue (always 0 for confirms)
    out.put_u8(u8::from(multiple));
    out.put_u8(FRAME_END);
}

/// Writes a heartbeat frame.
pub fn write_heartbeat(out: &mut BytesMut) {
    out.extend_from_slice(&[FRAME_HEARTBEAT, 0, 0, 0, 0, 0, 0, FRAME_END]);
}

/// Builds the content header structure for amq-protocol based writers.
pub fn header_struct(body_size: u64, properties: BasicProperties) -> AMQPContentHeader {
    AMQPContentHeader {
        class_id: 60,
        body_size,
        properties,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amq_protocol::frame::{AMQPFrame, parse_frame};

    #[test]
    fn cut_waits_for_whole_frame_and_checks_end() {
        let mut b = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 2, 9][..]);
        assert!(cut_frame(&mut b, 4096).unwrap().is_none());
        b.extend_from_slice(&[9, FRAME_END, 8]);
        let f = cut_frame(&mut b, 4096).unwrap().unwrap();
        assert_eq!((f.kind, f.channel, &f.payload[..]), (1, 1, &[9u8, 9][..]));
        assert_eq!(&b[..], &[8]);
        let mut bad = BytesMut::from(&[1u8, 0, 1, 0, 0, 0, 1, 9, 0][..]);
        assert_eq!(
            cut_frame(&mut bad, 4096).unwrap_err().code,
            code::FRAME_ERROR
        );
    }

    #[test]
    fn oversized_frame_rejected_before_buffering() {
        let mut b = BytesMut::from(&[3u8, 0, 1, 0x7f, 0xff, 0xff, 0xff][..]);
        assert_eq!(
            cut_frame(&mut b, 131072).unwrap_err().code,
            code::FRAME_ERROR
        );
    }

    #[test]
    fn hand_written_frames_parse_with_amq_protocol() {
        let mut out = BytesMut::new();
        write_deliver(&mut out, 3, b"ctag", 42, true, b"ex", b"rk");
        let (_, f) = parse_frame(&out[..]).unwrap();
        match f {
            AMQPFrame::Method(
                3,
                AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Deliver(d)),
            ) => {
                assert_eq!(d.delivery_tag, 42);
                assert!(d.redelivered);
                assert_eq!(d.consumer_tag.as_str(), "ctag");
                assert_eq!(d.routing_key.as_str(), "rk");
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut out = BytesMut::new();
        let props = BasicProperties::default().with_delivery_mode(2);
        let raw = encode_properties(&props);
        write_header(&mut out, 1, 5, &raw);
        let (_, f) = parse_frame(&out[..]).unwrap();
        match f {
            AMQPFrame::Header(1, h) => {
                assert_eq!(h.body_size, 5);
                assert_eq!(h.properties.delivery_mode(), &Some(2));
            }
            other => panic!("unexpected {other:?}"),
        }
        let mut out = BytesMut::new();
        write_confirm(&mut out, 1, 7, true, false);
        let (_, f) = parse_frame(&out[..]).unwrap();
        assert!(
            matches!(f, AMQPFrame::Method(1, AMQPClass::Basic(amq_protocol::protocol::basic::AMQPMethod::Ack(a))) if a.delivery_tag == 7 && a.multiple)
        );
    }

    proptest::proptest! {
        /// Arbitrary bytes never panic the decoders.
        #[test]
        fn decoders_never_panic_on_garbage(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048)) {
            fuzz_decode(&data, 4096);
        }

        /// Valid frames with one byte flipped or the stream cut short never
        /// panic either (the fuzz target's seed corpus, in miniature).
        #[test]
        fn decoders_never_panic_on_mutated_frames(pos in 0usize..200, byte in proptest::num::u8::ANY, cut in 0usize..200) {
            let mut out = BytesMut::new();
            write_deliver(&mut out, 1, b"ctag", 1, false, b"ex", b"key");
            let props = BasicProperties::default().with_delivery_mode(2).with_correlation_id("c".into());
            write_header(&mut out, 1, 3, &encode_properties(&props));
            write_body(&mut out, 1, b"abc", 4096);
            let mut v = out.to_vec();
            let p = pos % v.len();
            v[p] = byte;
            v.truncate(v.len() - cut % v.len());
            fuzz_decode(&v, 4096);
            let mut payload = vec![0u8, 60, 0, 40, 0, 0];
            payload.extend_from_slice(&v);
            let _ = parse_method(&payload);
        }
    }

    #[test]
    fn body_split_by_frame_max() {
        let mut out = BytesMut::new();
        write_body(&mut out, 1, &[7u8; 10000], 4096);
        let mut n = 0;
        let mut total = 0;
        while let Some(f) = cut_frame(&mut out, 4096).unwrap() {
            n += 1;
            total += f.payload.len();
        }
        assert_eq!((n, total), (3, 10000));
    }
}

/// Runs arbitrary bytes through everything that decodes client input without
/// a socket: frame cutting, method parsing, content header parsing. Used by
/// the fuzz targets and the garbage-input tests; it must never panic.
pub fn fuzz_decode(data: &[u8], frame_max: u32) -> usize {
    let mut buf = BytesMut::from(data);
    let mut frames = 0;
    while let Ok(Some(f)) = cut_frame(&mut buf, frame_max) {
        frames += 1;
        match f.kind {
            FRAME_METHOD => {
                let _ = parse_method(&f.payload);
            }
            FRAME_HEADER => {
                let _ = parse_header(&f.payload);
            }
            _ => {}
        }
    }
    // Method payloads on their own, as if framing were valid.
    let _ = parse_method(data);
    let _ = parse_header(&Bytes::copy_from_slice(data));
    frames
}
