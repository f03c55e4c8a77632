//! Message totals counted on the message path, and the rates management
//! shows, computed from two samples.
//!
//! - per queue: relaxed atomics on each queue's
//!   [`QueueMetrics`](crate::queue::QueueMetrics);
//! - per connection (the overview's publish, confirm, deliver, get, ack,
//!   ...): plain counters in the connection task ([`LocalStats`]), copied
//!   into the connection's registry entry ([`MsgCounters`]) once per loop
//!   turn, so the hot path does no atomic read-modify-write; when a
//!   connection ends its totals move to the broker's [`BrokerStats`];
//! - per exchange (publish_in / publish_out): summed per connection turn in
//!   [`LocalStats`] and added to the exchange's atomics once per turn.

use crate::broker::exchange::Exchange;
use crate::queue::QueueRef;
use crate::queue::core::Envelope;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Counts deliveries (consumer deliveries and basic.get) from `q`; returns
/// how many were redeliveries.
pub fn count_deliveries(q: &QueueRef, msgs: &[Envelope]) -> u64 {
    q.metrics
        .delivered
        .fetch_add(msgs.len() as u64, Ordering::Relaxed);
    let re = msgs.iter().filter(|e| e.redelivered).count() as u64;
    if re > 0 {
        q.metrics.redelivered.fetch_add(re, Ordering::Relaxed);
    }
    re
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

/// The overview's message counters, RabbitMQ's names, in this order.
pub const FIELDS: [&str; 11] = [
    "publish",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "redeliver",
    "ack",
];

/// Message totals as plain numbers (one connection's, or a sum).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Counts(pub [u64; 11]);

#[allow(missing_docs)]
impl Counts {
    pub const PUBLISH: usize = 0;
    pub const CONFIRM: usize = 1;
    pub const RETURN_UNROUTABLE: usize = 2;
    pub const DROP_UNROUTABLE: usize = 3;
    pub const DELIVER: usize = 4;
    pub const DELIVER_NO_ACK: usize = 5;
    pub const GET: usize = 6;
    pub const GET_NO_ACK: usize = 7;
    pub const GET_EMPTY: usize = 8;
    pub const REDELIVER: usize = 9;
    pub const ACK: usize = 10;

    /// Adds another set of totals.
    pub fn add(&mut self, o: &Counts) {
        for (a, b) in self.0.iter_mut().zip(o.0) {
            *a += b;
        }
    }
}

/// Message totals readable from other tasks.
#[derive(Debug, Default)]
pub struct MsgCounters([AtomicU64; 11]);

impl MsgCounters {
    /// The current values.
    pub fn load(&self) -> Counts {
        let mut c = Counts::default();
        for (v, a) in c.0.iter_mut().zip(&self.0) {
            *v = a.load(Ordering::Relaxed);
        }
        c
    }

    fn store(&self, c: &Counts) {
        for (a, v) in self.0.iter().zip(c.0) {
            a.store(v, Ordering::Relaxed);
        }
    }

    /// Adds to the totals.
    pub fn add(&self, c: &Counts) {
        for (a, v) in self.0.iter().zip(c.0) {
            if v > 0 {
                a.fetch_add(v, Ordering::Relaxed);
            }
        }
    }

    /// Adds one to a counter (paths that are not hot: the HTTP API).
    pub fn incr(&self, field: usize) {
        if let Some(a) = self.0.get(field) {
            a.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A connection task's own counters (no atomics on the message path).
#[derive(Debug, Default)]
pub struct LocalStats {
    /// Totals since the connection opened.
    pub counts: Counts,
    /// Exchanges published to since the last [`LocalStats::publish_to`]:
    /// (exchange, messages in, queue deliveries out).
    exchanges: Vec<(Arc<Exchange>, u64, u64)>,
}

impl LocalStats {
    /// A message published to `ex` reached `routed` queues; `unroutable`
    /// says what happened to one that reached none (Some(true): returned
    /// to a mandatory publisher; Some(false): dropped; None: held, e.g.
    /// by a delayed exchange, or delivered by direct reply-to).
    pub fn published(&mut self, ex: &Arc<Exchange>, routed: usize, unroutable: Option<bool>) {
        let c = &mut self.counts.0;
        c[Counts::PUBLISH] += 1;
        match unroutable {
            Some(true) => c[Counts::RETURN_UNROUTABLE] += 1,
            Some(false) => c[Counts::DROP_UNROUTABLE] += 1,
            None => {}
        }
        match self
            .exchanges
            .iter_mut()
            .find(|(e, _, _)| Arc::ptr_eq(e, ex))
        {
            Some((_, i, o)) => {
                *i += 1;
                *o += routed as u64;
            }
            None => self.exchanges.push((ex.clone(), 1, routed as u64)),
        }
    }

    /// Deliveries to a consumer (counted on the queue too).
    pub fn delivered(&mut self, q: &QueueRef, msgs: &[Envelope], no_ack: bool) {
        let re = count_deliveries(q, msgs);
        let c = &mut self.counts.0;
        c[if no_ack {
            Counts::DELIVER_NO_ACK
        } else {
            Counts::DELIVER
        }] += msgs.len() as u64;
        c[Counts::REDELIVER] += re;
    }

    /// A basic.get answered with a message (`Some`) or get-empty.
    pub fn got(&mut self, q: &QueueRef, got: Option<&Envelope>, no_ack: bool) {
        let Some(env) = got else {
            self.counts.0[Counts::GET_EMPTY] += 1;
            return;
        };
        let re = count_deliveries(q, std::slice::from_ref(env));
        let c = &mut self.counts.0;
        c[if no_ack {
            Counts::GET_NO_ACK
        } else {
            Counts::GET
        }] += 1;
        c[Counts::REDELIVER] += re;
    }

    /// Adds to one counter.
    pub fn add(&mut self, field: usize, n: u64) {
        if let Some(c) = self.counts.0.get_mut(field) {
            *c += n;
        }
    }

    /// Makes the totals visible in `shared` and adds the exchange counts
    /// gathered since the last call to the exchanges.
    pub fn publish_to(&mut self, shared: &MsgCounters) {
        shared.store(&self.counts);
        for (ex, i, o) in self.exchanges.drain(..) {
            ex.stats.publish_in.fetch_add(i, Ordering::Relaxed);
            if o > 0 {
                ex.stats.publish_out.fetch_add(o, Ordering::Relaxed);
            }
        }
    }
}

/// An exchange's totals.
#[derive(Debug, Default)]
pub struct ExchangeStats {
    /// Messages published into it.
    pub publish_in: AtomicU64,
    /// Queue deliveries it routed (a message routed to two queues counts twice).
    pub publish_out: AtomicU64,
    /// Rate samples.
    pub sampler: Sampler,
}

/// Broker-wide: totals of connections that have closed, and the overview's
/// rate samples.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Totals of closed connections (and of HTTP publishes).
    pub retired: MsgCounters,
    /// Overview rate samples.
    pub overview: Sampler,
}

/// Turns monotonically growing totals into per-second rates: the rates
/// over the last window of at least a second.
#[derive(Debug, Default)]
pub struct Sampler(Mutex<Option<Sample>>);

/// When, the totals then, the rates computed then.
type Sample = (Instant, Vec<u64>, Vec<f64>);

impl Sampler {
    /// Rates of `totals` (same order each call); zeros until a second has
    /// passed since the first sample.
    pub fn rates(&self, totals: &[u64]) -> Vec<f64> {
        let now = Instant::now();
        let Ok(mut g) = self.0.lock() else {
            return vec![0.0; totals.len()];
        };
        let entry = g.get_or_insert_with(|| (now, totals.to_vec(), vec![0.0; totals.len()]));
        if entry.1.len() != totals.len() {
            *entry = (now, totals.to_vec(), vec![0.0; totals.len()]);
        }
        let dt = now.duration_since(entry.0).as_secs_f64();
        if dt >= 1.0 {
            entry.2 = totals
                .iter()
                .zip(&entry.1)
                .map(|(a, b)| a.saturating_sub(*b) as f64 / dt)
                .collect();
            entry.0 = now;
            entry.1 = totals.to_vec();
        }
        entry.2.clone()
    }
}

/// `{"rate": r}` rounded as RabbitMQ shows it.
pub fn rate(v: f64) -> Value {
    json!({ "rate": (v * 10.0).round() / 10.0 })
}

/// The overview's message_stats object: every counter with its
/// `_details`, plus deliver_get (deliver + deliver_no_ack + get + get_no_ack).
pub fn overview_json(c: &Counts, rates: &[f64]) -> Value {
    let mut m = serde_json::Map::new();
    let r = |i: usize| rates.get(i).copied().unwrap_or(0.0);
    for (i, f) in FIELDS.iter().enumerate() {
        m.insert((*f).into(), c.0[i].into());
        m.insert(format!("{f}_details"), rate(r(i)));
    }
    let dg = [
        Counts::DELIVER,
        Counts::DELIVER_NO_ACK,
        Counts::GET,
        Counts::GET_NO_ACK,
    ];
    m.insert(
        "deliver_get".into(),
        dg.iter().map(|i| c.0[*i]).sum::<u64>().into(),
    );
    m.insert(
        "deliver_get_details".into(),
        rate(dg.iter().map(|i| r(*i)).sum()),
    );
    Value::Object(m)
}
