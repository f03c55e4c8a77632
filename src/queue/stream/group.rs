//! Consumer groups over streams (Kafka semantics, RabbitMQ's "single active
//! consumer per partition" for super streams), over AMQP 0-9-1.
//!
//! A consumer joins group G on a stream by passing the basic.consume
//! argument `x-stream-group: G`. A client reading a super stream subscribes
//! to every partition (NAME-0..NAME-(N-1)) with the same group name. A
//! *member* is one channel (connection id, channel number): its consumers
//! on the partitions belong to it, and it leaves with basic.cancel (of its
//! last consumer), channel.close or the end of its connection.
//!
//! The coordinator (this module) keeps, per (broker data directory, vhost,
//! group), who is subscribed to which partition and decides which member
//! reads each partition ([`assign`]): partitions in natural name order
//! (`s-2` before `s-10`), each to the subscribed member with the fewest
//! partitions so far, ties to the oldest member (lowest connection id, then
//! channel). When every member subscribes to every partition this is
//! "sorted members round-robin over sorted partitions". The assignment is
//! recomputed when a member joins or leaves, and each partition whose
//! reader changed is told with a [`GroupEvent`] on its stream actor's group
//! inbox. Only consume, cancel and channel close come here: publishing and
//! delivering never touch the coordinator.
//!
//! The partition's stream actor does the rest (`actor.rs`): only the
//! assigned consumer gets deliveries; the others stay attached and receive
//! nothing. No basic.cancel is sent to them, as for single active consumer
//! on classic and quorum queues in RabbitMQ over AMQP 0-9-1: a cancelled
//! consumer could not be given the partition back later. On a handover the
//! new reader waits (at most `HANDOFF_WAIT`) until the previous reader's
//! deliveries are settled or it is gone, then starts at the group's
//! committed position on that partition: the first offset the group has
//! not settled (stored per stream in `offsets`, written like tracked
//! consumer offsets, so it survives restarts). Messages the previous reader
//! had not acked when it left are delivered again; nothing acked is.

use crate::queue::core::{ConsumerId, Owner};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tracing::debug;

/// What the coordinator tells a partition's stream actor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GroupEvent {
    /// From now on `consumer` (None: nobody) reads this partition for `group`.
    Assign {
        /// Group name.
        group: Arc<str>,
        /// The consumer of the assigned member on this partition.
        consumer: Option<ConsumerId>,
    },
}

/// A stream actor's group inbox.
pub type GroupTx = mpsc::UnboundedSender<GroupEvent>;

/// A group: per broker (its data directory), vhost and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GroupKey {
    /// The broker's data directory (two brokers in one process, as in
    /// tests, never share groups).
    pub data_dir: PathBuf,
    /// Vhost.
    pub vhost: String,
    /// Group name.
    pub group: Arc<str>,
}

#[derive(Debug)]
struct Sub {
    partition: Arc<str>,
    member: Owner,
    consumer: ConsumerId,
    tx: GroupTx,
}

#[derive(Debug, Default)]
struct Group {
    subs: Vec<Sub>,
    /// Partition -> consumer currently assigned.
    assigned: BTreeMap<Arc<str>, ConsumerId>,
}

static GROUPS: Mutex<Option<HashMap<GroupKey, Group>>> = Mutex::new(None);

fn with_groups<T>(f: impl FnOnce(&mut HashMap<GroupKey, Group>) -> T) -> T {
    let mut g = GROUPS.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(HashMap::new))
}

/// Adds `consumer` (of `member`) on `partition` to the group and
/// rebalances.
pub fn join(
    key: &GroupKey,
    partition: &Arc<str>,
    member: Owner,
    consumer: ConsumerId,
    tx: &GroupTx,
) {
    with_groups(|groups| {
        let g = groups.entry(key.clone()).or_default();
        g.subs.push(Sub {
            partition: partition.clone(),
            member,
            consumer,
            tx: tx.clone(),
        });
        rebalance(key, g);
    });
}

/// Removes `consumer` from the group (basic.cancel) and rebalances.
pub fn leave(key: &GroupKey, consumer: ConsumerId) {
    remove(key, |s| s.consumer == consumer);
}

/// Removes every consumer of `member` from the group at once (its channel
/// closed: one rebalance, not one per partition, so its partitions do not
/// move back and forth while each partition's actor hears of the close)
/// and rebalances.
pub fn leave_member(key: &GroupKey, member: Owner) {
    remove(key, |s| s.member == member);
}

fn remove(key: &GroupKey, gone: impl Fn(&Sub) -> bool) {
    with_groups(|groups| {
        let Some(g) = groups.get_mut(key) else {
            return;
        };
        let before = g.subs.len();
        g.subs.retain(|s| !gone(s));
        if g.subs.len() != before {
            rebalance(key, g);
        }
        if g.subs.is_empty() {
            groups.remove(key);
        }
    });
}

/// The current assignment of a group: partition -> member (for tests and
/// diagnostics).
pub fn members(key: &GroupKey) -> BTreeMap<String, Owner> {
    with_groups(|groups| {
        let Some(g) = groups.get(key) else {
            return BTreeMap::new();
        };
        g.assigned
            .iter()
            .filter_map(|(p, c)| {
                let s = g.subs.iter().find(|s| s.consumer == *c)?;
                Some((p.to_string(), s.member))
            })
            .collect()
    })
}

fn rebalance(key: &GroupKey, g: &mut Group) {
    let pairs: Vec<(Arc<str>, Owner)> = g
        .subs
        .iter()
        .map(|s| (s.partition.clone(), s.member))
        .collect();
    let plan = assign(&pairs);
    let mut next: BTreeMap<Arc<str>, ConsumerId> = BTreeMap::new();
    for (p, m) in &plan {
        // A member subscribed twice to one partition reads with its first consumer.
        if let Some(c) = g
            .subs
            .iter()
            .filter(|s| s.partition == *p && s.member == *m)
            .map(|s| s.consumer)
            .min()
        {
            next.insert(p.clone(), c);
        }
    }
    let mut partitions: Vec<&Arc<str>> = g.assigned.keys().chain(next.keys()).collect();
    partitions.sort();
    partitions.dedup();
    for p in partitions {
        let now = next.get(p).copied();
        if g.assigned.get(p).copied() == now {
            continue;
        }
        debug!(group = %key.group, vhost = %key.vhost, partition = %p, consumer = ?now, "stream group partition reassigned");
        let mut sent: Vec<&GroupTx> = Vec::new();
        for s in g.subs.iter().filter(|s| s.partition == *p) {
            if sent.iter().any(|t| t.same_channel(&s.tx)) {
                continue;
            }
            sent.push(&s.tx);
            let _ = s.tx.send(GroupEvent::Assign {
                group: key.group.clone(),
                consumer: now,
            });
        }
    }
    g.assigned = next;
}

/// Natural order of partition names: "s-2" before "s-10".
fn natural_key(name: &str) -> (&str, u64, &str) {
    let digits = name.len() - name.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    let (stem, num) = name.split_at(name.len() - digits);
    (stem, num.parse().unwrap_or(0), name)
}

/// The assignment: given (partition, member) subscriptions, which member
/// reads each partition. Deterministic: partitions in natural name order,
/// each to the subscribed member with the fewest partitions so far, ties
/// to the lowest (connection id, channel).
pub fn assign(subs: &[(Arc<str>, Owner)]) -> BTreeMap<Arc<str>, Owner> {
    let mut partitions: Vec<&Arc<str>> = subs.iter().map(|(p, _)| p).collect();
    partitions.sort_by(|a, b| natural_key(a).cmp(&natural_key(b)));
    partitions.dedup();
    let mut load: HashMap<(u64, u16), usize> = HashMap::new();
    let mut out = BTreeMap::new();
    for p in partitions {
        let best = subs
            .iter()
            .filter(|(q, _)| q == p)
            .map(|(_, m)| *m)
            .min_by_key(|m| {
                (
                    load.get(&(m.conn, m.channel)).copied().unwrap_or(0),
                    m.conn,
                    m.channel,
                )
            });
        if let Some(m) = best {
            *load.entry((m.conn, m.channel)).or_insert(0) += 1;
            out.insert(p.clone(), m);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn o(conn: u64) -> Owner {
        Owner { conn, channel: 1 }
    }

    fn all(members: &[u64], parts: &[&str]) -> Vec<(Arc<str>, Owner)> {
        let mut v = Vec::new();
        for m in members {
            for p in parts {
                v.push((Arc::from(*p), o(*m)));
            }
        }
        v
    }

    fn owners(a: &BTreeMap<Arc<str>, Owner>) -> Vec<(String, u64)> {
        let mut v: Vec<_> = a.iter().map(|(p, m)| (p.to_string(), m.conn)).collect();
        v.sort_by(|x, y| natural_key(&x.0).cmp(&natural_key(&y.0)));
        v
    }

    #[test]
    fn round_robin_over_sorted_partitions() {
        let parts = ["s-0", "s-1", "s-2", "s-3"];
        let a = assign(&all(&[7, 3], &parts));
        assert_eq!(
            owners(&a),
            vec![
                ("s-0".into(), 3),
                ("s-1".into(), 7),
                ("s-2".into(), 3),
                ("s-3".into(), 7)
            ]
        );
        // Order of subscription does not matter.
        let mut rev = all(&[3, 7], &parts);
        rev.reverse();
        assert_eq!(assign(&rev), a);
        // One member: everything.
        assert!(assign(&all(&[9], &parts)).values().all(|m| m.conn == 9));
        // Natural order: s-10 after s-9.
        let many: Vec<String> = (0..12).map(|i| format!("s-{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let a = assign(&all(&[1, 2, 3], &refs));
        for (i, p) in many.iter().enumerate() {
            assert_eq!(a[&Arc::from(p.as_str())].conn, [1, 2, 3][i % 3], "{p}");
        }
    }

    #[test]
    fn partial_subscriptions_stay_balanced() {
        // Member 1 reads only p-0; member 2 everything.
        let mut subs = all(&[2], &["p-0", "p-1", "p-2"]);
        subs.push((Arc::from("p-0"), o(1)));
        let a = assign(&subs);
        assert_eq!(
            owners(&a),
            vec![("p-0".into(), 1), ("p-1".into(), 2), ("p-2".into(), 2)]
        );
    }

    #[test]
    fn coordinator_sends_changes_only() {
        let key = GroupKey {
            data_dir: PathBuf::from("/nonexistent/group-test"),
            vhost: "/".into(),
            group: Arc::from("g"),
        };
        let (tx0, mut rx0) = mpsc::unbounded_channel();
        let (tx1, mut rx1) = mpsc::unbounded_channel();
        let p0: Arc<str> = Arc::from("s-0");
        let p1: Arc<str> = Arc::from("s-1");
        let drain = |rx: &mut mpsc::UnboundedReceiver<GroupEvent>| {
            let mut v = Vec::new();
            while let Ok(GroupEvent::Assign { consumer, .. }) = rx.try_recv() {
                v.push(consumer);
            }
            v
        };
        // Member A (conn 1): consumers 10 (s-0), 11 (s-1).
        join(&key, &p0, o(1), 10, &tx0);
        join(&key, &p1, o(1), 11, &tx1);
        assert_eq!(drain(&mut rx0), vec![Some(10)]);
        assert_eq!(drain(&mut rx1), vec![Some(11)]);
        // Member B (conn 2) joins: s-1 moves to it, s-0 is not told anything.
        join(&key, &p0, o(2), 20, &tx0);
        join(&key, &p1, o(2), 21, &tx1);
        assert_eq!(drain(&mut rx0), Vec::<Option<u64>>::new());
        assert_eq!(drain(&mut rx1), vec![Some(21)]);
        assert_eq!(members(&key).len(), 2);
        // A's channel closes: s-0 moves to B in one step; the second
        // partition's close finds nothing left to remove.
        leave_member(&key, o(1));
        leave(&key, 11);
        assert_eq!(drain(&mut rx0), vec![Some(20)]);
        assert_eq!(drain(&mut rx1), Vec::<Option<u64>>::new());
        // Cancelled one by one: a partition left without subscribers is
        // not told (its actor has no group consumer left to care).
        leave(&key, 20);
        leave(&key, 21);
        assert_eq!(drain(&mut rx0), Vec::<Option<u64>>::new());
        assert_eq!(drain(&mut rx1), Vec::<Option<u64>>::new());
        assert!(members(&key).is_empty());
    }
}
