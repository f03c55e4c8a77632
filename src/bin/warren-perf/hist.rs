//! Fixed-size log-linear latency histogram (HDR-style, ~1.6% relative error).
//!
//! Values are nanoseconds. Values below 128 get exact buckets; above that every
//! power of two is split into 64 linear sub-buckets. 3776 buckets cover all u64.
//! Each histogram has exactly one writer thread (its consumer), so recording is a
//! relaxed load + store (no locked instruction); the reporter thread reads
//! concurrently and may see a slightly stale count, which is fine for reporting.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

const SUB_BITS: u32 = 6;
const SUB: u64 = 1 << SUB_BITS; // 64
pub const BUCKETS: usize = ((64 - SUB_BITS) as usize) * SUB as usize + SUB as usize; // 3776

#[inline]
pub fn bucket_of(v: u64) -> usize {
    if v < 2 * SUB {
        v as usize
    } else {
        let e = 63 - v.leading_zeros(); // >= 7
        let shift = e - SUB_BITS;
        (shift as usize) * SUB as usize + (v >> shift) as usize
    }
}

/// Representative value (middle of the bucket) in ns.
pub fn value_of(idx: usize) -> u64 {
    if idx < (2 * SUB) as usize {
        idx as u64
    } else {
        let shift = (idx / SUB as usize) as u32 - 1;
        let m = (idx % SUB as usize) as u64 + SUB;
        let low = m << shift;
        low + ((1u64 << shift) >> 1)
    }
}

pub struct Histogram {
    buckets: Box<[AtomicU64]>,
}

impl Histogram {
    pub fn new() -> Self {
        let mut v = Vec::with_capacity(BUCKETS);
        v.resize_with(BUCKETS, || AtomicU64::new(0));
        Histogram {
            buckets: v.into_boxed_slice(),
        }
    }

    /// Single-writer record.
    #[inline]
    pub fn record(&self, ns: u64) {
        let b = &self.buckets[bucket_of(ns)];
        b.store(b.load(Relaxed) + 1, Relaxed);
    }

    /// Add this histogram's counts into `acc`.
    pub fn add_to(&self, acc: &mut [u64]) {
        for (a, b) in acc.iter_mut().zip(self.buckets.iter()) {
            *a += b.load(Relaxed);
        }
    }
}

/// Percentiles (ns) from a plain bucket-count slice. `qs` in [0,1].
pub fn percentiles(counts: &[u64], qs: &[f64]) -> Option<Vec<u64>> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let mut out = Vec::with_capacity(qs.len());
    for &q in qs {
        let target = ((q * total as f64).ceil() as u64).clamp(1, total);
        let mut acc = 0u64;
        let mut val = 0;
        for (i, &c) in counts.iter().enumerate() {
            acc += c;
            if acc >= target {
                val = value_of(i);
                break;
            }
        }
        out.push(val);
    }
    Some(out)
}

pub fn max_value(counts: &[u64]) -> Option<u64> {
    counts.iter().rposition(|&c| c > 0).map(value_of)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn roundtrip() {
        for v in [
            0u64,
            1,
            127,
            128,
            129,
            1000,
            123_456,
            10_000_000_000,
            u64::MAX,
        ] {
            let b = bucket_of(v);
            assert!(b < BUCKETS);
            let r = value_of(b);
            let err = (r as f64 - v as f64).abs() / (v.max(1) as f64);
            assert!(err < 0.02, "v={v} r={r}");
        }
    }
}
