//! The chunk: the unit of writing, reading and checksumming in a stream
//! log. One chunk holds a batch of consecutive messages.
//!
//! Layout (all integers big-endian):
//!
//! ```text
//! header (40 bytes)
//!   0  magic      u32  "WSC1"
//!   4  first      u64  offset of the first message
//!  12  count      u32  messages in the chunk
//!  16  timestamp  i64  ms since the epoch when written (non-decreasing)
//!  24  bloom_len  u32  bytes of Bloom filter after the header (0 = none)
//!  28  data_len   u32  bytes of records after the filter
//!  32  crc        u32  CRC32 of header[0..32] + filter + records
//!  36  epoch      u32  leader epoch of a replicated stream (0 otherwise; not
//!                        covered by the CRC: only compared at failover)
//! filter (bloom_len bytes)
//! records, count times:
//!   len u32 (bytes that follow in this record)
//!   exchange_len u8, exchange, routing_key_len u8, routing_key,
//!   filter_len u16 (0xffff = no filter value), filter value,
//!   properties_len u32, properties (AMQP content-header property list),
//!   body (the rest)
//! ```

use super::filter::Bloom;
use crate::broker::headers::value_str;
use crate::queue::message::Message;
use bytes::{Buf, Bytes};
use std::sync::Arc;

/// Bytes in a chunk header.
pub const HEADER_LEN: usize = 40;
const MAGIC: u32 = 0x5753_4331;
const NO_FILTER: u16 = 0xffff;

/// A decoded chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    /// Offset of the first message.
    pub first: u64,
    /// Number of messages.
    pub count: u32,
    /// Write time, ms since the epoch.
    pub timestamp_ms: i64,
    /// Bloom filter bytes.
    pub bloom_len: u32,
    /// Record bytes.
    pub data_len: u32,
    /// Checksum of everything but itself.
    pub crc: u32,
}

impl ChunkHeader {
    /// Header + filter + records.
    pub fn total_len(&self) -> u64 {
        HEADER_LEN as u64 + u64::from(self.bloom_len) + u64::from(self.data_len)
    }

    /// Offset after the last message.
    pub fn next_offset(&self) -> u64 {
        self.first + u64::from(self.count)
    }

    /// Parses a header; None if the bytes are not one (bad magic or size).
    pub fn parse(b: &[u8]) -> Option<ChunkHeader> {
        let mut b = b.get(..HEADER_LEN)?;
        if b.get_u32() != MAGIC {
            return None;
        }
        let h = ChunkHeader {
            first: b.get_u64(),
            count: b.get_u32(),
            timestamp_ms: b.get_i64(),
            bloom_len: b.get_u32(),
            data_len: b.get_u32(),
            crc: b.get_u32(),
        };
        (h.count > 0).then_some(h)
    }

    fn head_bytes(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..12].copy_from_slice(&self.first.to_be_bytes());
        b[12..16].copy_from_slice(&self.count.to_be_bytes());
        b[16..24].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[24..28].copy_from_slice(&self.bloom_len.to_be_bytes());
        b[28..32].copy_from_slice(&self.data_len.to_be_bytes());
        b
    }

    /// Checks the CRC against the filter and records that follow the header.
    pub fn verify(&self, rest: &[u8]) -> bool {
        if rest.len() as u64 != self.total_len() - HEADER_LEN as u64 {
            return false;
        }
        let mut h = crc32fast::Hasher::new();
        h.update(&self.head_bytes());
        h.update(rest);
        h.finalize() == self.crc
    }
}

/// The `x-stream-filter-value` header of a message, if any.
pub fn filter_value(m: &Message) -> Option<String> {
    m.properties
        .headers()
        .as_ref()?
        .inner()
        .get("x-stream-filter-value")
        .and_then(value_str)
}

/// Encodes `msgs` as one chunk starting at offset `first`, appending it to
/// `out`. Returns its header.
pub fn encode(
    first: u64,
    timestamp_ms: i64,
    msgs: &[Arc<Message>],
    filter_size: usize,
    out: &mut Vec<u8>,
) -> ChunkHeader {
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    let filters: Vec<Option<String>> = msgs.iter().map(|m| filter_value(m)).collect();
    let mut bloom = Bloom::new(filter_size);
    for f in &filters {
        bloom.insert(f.as_deref().map(str::as_bytes));
    }
    let bloom = bloom.into_bytes();
    out.extend_from_slice(&bloom);
    let data_start = out.len();
    for (m, f) in msgs.iter().zip(&filters) {
        let ex = &m.exchange[..m.exchange.len().min(255)];
        let rk = &m.routing_key[..m.routing_key.len().min(255)];
        let fv = f.as_deref().map(|s| &s.as_bytes()[..s.len().min(0xfffe)]);
        let len = 1
            + ex.len()
            + 1
            + rk.len()
            + 2
            + fv.map_or(0, <[u8]>::len)
            + 4
            + m.raw_properties.len()
            + m.body.len();
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(ex.len() as u8);
        out.extend_from_slice(ex);
        out.push(rk.len() as u8);
        out.extend_from_slice(rk);
        match fv {
            Some(v) => {
                out.extend_from_slice(&(v.len() as u16).to_be_bytes());
                out.extend_from_slice(v);
            }
            None => out.extend_from_slice(&NO_FILTER.to_be_bytes()),
        }
        out.extend_from_slice(&(m.raw_properties.len() as u32).to_be_bytes());
        out.extend_from_slice(&m.raw_properties);
        out.extend_from_slice(&m.body);
    }
    let mut h = ChunkHeader {
        first,
        count: msgs.len() as u32,
        timestamp_ms,
        bloom_len: bloom.len() as u32,
        data_len: (out.len() - data_start) as u32,
        crc: 0,
    };
    let mut c = crc32fast::Hasher::new();
    c.update(&h.head_bytes());
    c.update(&out[start + HEADER_LEN..]);
    h.crc = c.finalize();
    out[start..start + 32].copy_from_slice(&h.head_bytes());
    out[start + 32..start + 36].copy_from_slice(&h.crc.to_be_bytes());
    h
}

/// Stamps a replicated stream's leader epoch into an encoded chunk's
/// header (bytes 36..40).
pub fn set_epoch(chunk: &mut [u8], epoch: u32) {
    if let Some(b) = chunk.get_mut(36..40) {
        b.copy_from_slice(&epoch.to_be_bytes());
    }
}

/// The epoch stamped in an encoded chunk header (0 when too short).
pub fn epoch_of(header: &[u8]) -> u32 {
    header
        .get(36..40)
        .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// One stored message, its parts cut from the chunk buffer without copying.
#[derive(Debug, Clone)]
pub struct Record {
    /// Exchange published to.
    pub exchange: Bytes,
    /// Routing key.
    pub routing_key: Bytes,
    /// `x-stream-filter-value`, if set.
    pub filter: Option<Bytes>,
    /// Raw content-header property list.
    pub properties: Bytes,
    /// Body.
    pub body: Bytes,
}

/// Splits the record section of a chunk. None if it is malformed. The
/// fields are cut by position and sliced out of `data` once each (no
/// reference-count traffic for the length prefixes).
pub fn records(data: Bytes, count: u32) -> Option<Vec<Record>> {
    let mut out = Vec::with_capacity(count as usize);
    let d = &data[..];
    let mut pos = 0usize;
    for _ in 0..count {
        let len = u32::from_be_bytes(d.get(pos..pos + 4)?.try_into().ok()?) as usize;
        let end = (pos + 4).checked_add(len).filter(|e| *e <= d.len())?;
        let mut p = pos + 4;
        // The next `n` bytes of this record, as a range.
        let mut take = |n: usize| {
            let r = p..p.checked_add(n).filter(|e| *e <= end)?;
            p = r.end;
            Some(r)
        };
        let exl = d[take(1)?.start] as usize;
        let exchange = take(exl)?;
        let rkl = d[take(1)?.start] as usize;
        let routing_key = take(rkl)?;
        let f = take(2)?;
        let fl = u16::from_be_bytes([d[f.start], d[f.start + 1]]);
        let filter = if fl == NO_FILTER {
            None
        } else {
            Some(take(fl as usize)?)
        };
        let pl = take(4)?;
        let pl = u32::from_be_bytes(d[pl].try_into().ok()?) as usize;
        let properties = take(pl)?;
        out.push(Record {
            exchange: data.slice(exchange),
            routing_key: data.slice(routing_key),
            filter: filter.map(|r| data.slice(r)),
            properties: data.slice(properties),
            body: data.slice(p..end),
        });
        pos = end;
    }
    (pos == d.len()).then_some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use amq_protocol::protocol::BasicProperties;
    use amq_protocol::types::{AMQPValue, FieldTable};

    /// A message as the publishing channel would build it.
    pub fn msg(body: &[u8], filter: Option<&str>) -> Arc<Message> {
        let mut props = BasicProperties::default().with_delivery_mode(2);
        if let Some(f) = filter {
            let mut t = FieldTable::default();
            t.insert(
                "x-stream-filter-value".into(),
                AMQPValue::LongString(f.into()),
            );
            props = props.with_headers(t);
        }
        Arc::new(Message {
            exchange: Bytes::from_static(b"ex"),
            routing_key: Bytes::from_static(b"rk"),
            raw_properties: crate::protocol::frame::encode_properties(&props),
            properties: props,
            body: Bytes::copy_from_slice(body),
        })
    }

    #[test]
    fn round_trip() {
        let msgs = vec![msg(b"one", None), msg(b"two", Some("ca")), msg(b"", None)];
        let mut out = vec![7u8];
        let h = encode(42, 1000, &msgs, 16, &mut out);
        let bytes = Bytes::from(out).slice(1..);
        assert_eq!(bytes.len() as u64, h.total_len());
        let parsed = ChunkHeader::parse(&bytes).unwrap();
        assert_eq!(parsed, h);
        assert!(parsed.verify(&bytes[HEADER_LEN..]));
        let data = bytes.slice(HEADER_LEN + h.bloom_len as usize..);
        let recs = records(data, h.count).unwrap();
        assert_eq!(recs.len(), 3);
        assert_eq!(&recs[1].body[..], b"two");
        assert_eq!(recs[1].filter.as_deref(), Some(&b"ca"[..]));
        assert_eq!(recs[0].filter, None);
        assert_eq!(recs[0].properties, msgs[0].raw_properties);
        // Truncated or padded record sections are refused, never a panic.
        let whole = bytes.slice(HEADER_LEN + h.bloom_len as usize..);
        for cut in 0..whole.len() {
            assert!(records(whole.slice(..cut), h.count).is_none(), "cut {cut}");
        }
        let mut padded = whole.to_vec();
        padded.push(0);
        assert!(records(Bytes::from(padded), h.count).is_none());
        // A flipped bit is caught.
        let mut bad = bytes.to_vec();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(!parsed.verify(&bad[HEADER_LEN..]));
    }
}
