//! Message totals counted on the message path (cheap relaxed atomics on
//! each queue's [`QueueMetrics`](crate::queue::QueueMetrics)), and the
//! per-queue rates management shows, computed from two samples.

use crate::queue::QueueRef;
use crate::queue::core::Envelope;
use std::sync::atomic::Ordering;

/// Counts deliveries (consumer deliveries and basic.get) from `q`.
pub fn count_deliveries(q: &QueueRef, msgs: &[Envelope]) {
    q.metrics
        .delivered
        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
    let re = msgs.iter().filter(|e| e.redelivered).count() as u64;
    if re > 0 {
        q.metrics.redelivered.fetch_add(re, Ordering::Relaxed);
    }
}

/// A queue's totals: (published, delivered, redelivered, acked).
pub fn totals(q: &QueueRef) -> (u64, u64, u64, u64) {
    let m = &q.metrics;
    (
        m.published.load(Ordering::Relaxed),
        m.delivered.load(Ordering::Relaxed),
        m.redelivered.load(Ordering::Relaxed),
        m.acked.load(Ordering::Relaxed),
    )
}
