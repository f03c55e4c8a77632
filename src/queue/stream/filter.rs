//! Stream filtering as RabbitMQ 3.13: a publisher tags a message with the
//! `x-stream-filter-value` header; each chunk carries a small Bloom filter
//! of the values in it, so a consumer with `x-stream-filter` skips whole
//! chunks that cannot match without decoding them. Warren then checks each
//! message exactly, so (unlike RabbitMQ over AMQP 0-9-1) consumers never
//! see a false positive.
//!
//! The hash is FNV-1a (stable across Rust releases: the filter is on disk).

use crate::broker::headers::value_str;
use amq_protocol::types::{AMQPValue, FieldTable};

/// The pseudo value recorded in a chunk's filter when the chunk holds
/// messages without a filter value (for `x-stream-match-unfiltered`).
const UNFILTERED: &[u8] = b"\0unfiltered";
/// Bits set per value.
const K: u64 = 3;

fn fnv1a(v: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in v {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn bit_indexes(v: &[u8], bits: u64) -> impl Iterator<Item = u64> {
    let h = fnv1a(v);
    let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
    (0..K).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bits)
}

/// A Bloom filter being built for one chunk.
#[derive(Debug, Clone)]
pub struct Bloom {
    bits: Vec<u8>,
    any: bool,
}

impl Bloom {
    /// An empty filter of `size` bytes.
    pub fn new(size: usize) -> Bloom {
        Bloom {
            bits: vec![0; size.max(1)],
            any: false,
        }
    }

    /// Records a message's filter value (None: an unfiltered message).
    pub fn insert(&mut self, value: Option<&[u8]>) {
        let v = value.unwrap_or(UNFILTERED);
        if value.is_some() {
            self.any = true;
        }
        let bits = self.bits.len() as u64 * 8;
        for i in bit_indexes(v, bits) {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    /// The bytes to store; empty when no message in the chunk had a filter
    /// value (such chunks hold only unfiltered messages).
    pub fn into_bytes(self) -> Vec<u8> {
        if self.any { self.bits } else { Vec::new() }
    }
}

fn may_contain(bits: &[u8], v: &[u8]) -> bool {
    if bits.is_empty() {
        return false;
    }
    let n = bits.len() as u64 * 8;
    bit_indexes(v, n).all(|i| {
        bits.get((i / 8) as usize)
            .is_some_and(|b| b & (1 << (i % 8)) != 0)
    })
}

/// What a filtering consumer asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterSpec {
    /// Accepted filter values.
    pub values: Vec<Vec<u8>>,
    /// Also deliver messages published without a filter value.
    pub match_unfiltered: bool,
}

impl FilterSpec {
    /// From consumer arguments (`x-stream-filter`: a string or an array of
    /// strings; `x-stream-match-unfiltered`: bool). None when not filtering.
    pub fn from_args(args: &FieldTable) -> Option<FilterSpec> {
        let values: Vec<Vec<u8>> = match args.inner().get("x-stream-filter")? {
            AMQPValue::FieldArray(a) => a
                .as_slice()
                .iter()
                .filter_map(value_str)
                .map(String::into_bytes)
                .collect(),
            other => vec![value_str(other)?.into_bytes()],
        };
        let match_unfiltered = matches!(
            args.inner().get("x-stream-match-unfiltered"),
            Some(AMQPValue::Boolean(true))
        );
        Some(FilterSpec {
            values,
            match_unfiltered,
        })
    }

    /// Whether a chunk with this stored filter may hold a matching message.
    pub fn chunk_may_match(&self, bloom: &[u8]) -> bool {
        if bloom.is_empty() {
            // Only unfiltered messages in it.
            return self.match_unfiltered;
        }
        self.values.iter().any(|v| may_contain(bloom, v))
            || (self.match_unfiltered && may_contain(bloom, UNFILTERED))
    }

    /// Whether a message with this filter value is delivered.
    pub fn matches(&self, value: Option<&[u8]>) -> bool {
        match value {
            Some(v) => self.values.iter().any(|x| x == v),
            None => self.match_unfiltered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bloom_has_no_false_negatives() {
        let mut b = Bloom::new(16);
        b.insert(Some(b"california"));
        b.insert(None);
        let bits = b.into_bytes();
        let ca = FilterSpec {
            values: vec![b"california".to_vec()],
            match_unfiltered: false,
        };
        assert!(ca.chunk_may_match(&bits));
        let unf = FilterSpec {
            values: vec![b"nowhere-at-all".to_vec()],
            match_unfiltered: true,
        };
        assert!(unf.chunk_may_match(&bits));
        // Most unrelated values are rejected by a 128-bit filter with 2 values.
        let misses = (0..100)
            .filter(|i| {
                !FilterSpec {
                    values: vec![format!("v{i}").into_bytes()],
                    match_unfiltered: false,
                }
                .chunk_may_match(&bits)
            })
            .count();
        assert!(misses > 80, "{misses}");
    }

    #[test]
    fn unfiltered_only_chunk() {
        let mut b = Bloom::new(16);
        b.insert(None);
        let bits = b.into_bytes();
        assert!(bits.is_empty());
        assert!(
            !FilterSpec {
                values: vec![b"x".to_vec()],
                match_unfiltered: false
            }
            .chunk_may_match(&bits)
        );
        assert!(
            FilterSpec {
                values: vec![b"x".to_vec()],
                match_unfiltered: true
            }
            .chunk_may_match(&bits)
        );
    }
}
