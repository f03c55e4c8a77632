//! The ready list: messages waiting for a consumer, in delivery order, with
//! a bounded in-memory window.
//!
//! Messages sit in lanes, one per priority level (a queue without
//! x-max-priority has exactly one lane, so the common case pays nothing for
//! priorities). Delivery order is: the highest non-empty lane first, publish
//! order within a lane.
//!
//! In each lane, `head` holds the next messages to deliver, bodies in
//! memory; `tail` holds the rest. The heads of all lanes together hold at
//! most the window. A stored (persistent, durable) message in a tail may
//! have its body dropped from memory ("paged out") once the store has it,
//! and is read back when it moves to a head. Within a lane every id in
//! `head` is smaller than every id in `tail`, so the two together are one
//! list in publish order. Transient messages cannot be paged and keep their
//! bodies wherever they are.

use super::core::{Envelope, MsgId};
use super::message::Message;
use std::collections::VecDeque;
use std::sync::Arc;

/// One priority level: publish order, head window + paged tail.
#[derive(Debug, Default)]
struct Lane {
    head: VecDeque<Envelope>,
    tail: VecDeque<Envelope>,
    /// Index in `tail` of the first entry not yet considered for paging.
    cursor: usize,
}

impl Lane {
    fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    fn is_empty(&self) -> bool {
        self.head.is_empty() && self.tail.is_empty()
    }

    fn front(&self) -> Option<&Envelope> {
        self.head.front().or_else(|| self.tail.front())
    }

    fn pop_front(&mut self) -> Option<Envelope> {
        match self.head.pop_front() {
            Some(e) => Some(e),
            None => {
                let e = self.tail.pop_front()?;
                self.cursor = self.cursor.saturating_sub(1);
                Some(e)
            }
        }
    }

    fn insert_sorted(&mut self, env: Envelope) {
        match self.tail.front() {
            Some(t) if env.id > t.id => {
                let pos = self.tail.partition_point(|e| e.id < env.id);
                if pos < self.cursor {
                    self.cursor += 1;
                }
                self.tail.insert(pos, env);
            }
            _ => {
                let pos = self.head.partition_point(|e| e.id < env.id);
                self.head.insert(pos, env);
            }
        }
    }

    fn remove_id(&mut self, id: MsgId) -> Option<Envelope> {
        if let Ok(i) = self.head.binary_search_by_key(&id, |e| e.id) {
            self.head.remove(i)
        } else if let Ok(i) = self.tail.binary_search_by_key(&id, |e| e.id) {
            if i < self.cursor {
                self.cursor -= 1;
            }
            self.tail.remove(i)
        } else {
            None
        }
    }

    fn page_out(&mut self, can_page: &mut impl FnMut(u64) -> bool) -> (usize, bool) {
        let mut n = 0;
        while let Some(e) = self.tail.get_mut(self.cursor) {
            if e.gid != 0 && e.msg.is_some() {
                if !can_page(e.gid) {
                    return (n, false);
                }
                e.msg = None;
                n += 1;
            }
            self.cursor += 1;
        }
        (n, true)
    }

    fn iter(&self) -> impl Iterator<Item = &Envelope> {
        self.head.iter().chain(self.tail.iter())
    }
}

/// Ready messages in delivery order.
#[derive(Debug)]
pub struct ReadyList {
    /// Index = priority. One lane without priorities.
    lanes: Vec<Lane>,
    len: usize,
    /// Messages in the heads of all lanes.
    heads: usize,
    bytes: u64,
    window: usize,
}

impl Default for ReadyList {
    fn default() -> Self {
        ReadyList::new(1)
    }
}

impl ReadyList {
    /// An empty list keeping at most `window` bodies in memory at the head.
    pub fn new(window: usize) -> Self {
        Self::with_priorities(window, 0)
    }

    /// An empty list with priorities 0..=`max_priority` (0: no priorities).
    pub fn with_priorities(window: usize, max_priority: u8) -> Self {
        ReadyList {
            lanes: (0..=max_priority).map(|_| Lane::default()).collect(),
            len: 0,
            heads: 0,
            bytes: 0,
            window: window.max(1),
        }
    }

    /// The highest priority level (0 without priorities).
    pub fn max_priority(&self) -> u8 {
        (self.lanes.len() - 1) as u8
    }

    fn lane_of(&self, env: &Envelope) -> usize {
        usize::from(env.priority).min(self.lanes.len() - 1)
    }

    /// The highest non-empty lane.
    fn top(&self) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        (0..self.lanes.len())
            .rev()
            .find(|i| !self.lanes[*i].is_empty())
    }

    /// Number of ready messages.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is ready.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sum of body sizes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a new message (to the end of its priority level).
    pub fn push_back(&mut self, env: Envelope) {
        self.bytes += u64::from(env.size);
        self.len += 1;
        let room = self.heads < self.window;
        let i = self.lane_of(&env);
        let lane = &mut self.lanes[i];
        if lane.tail.is_empty() && room {
            lane.head.push_back(env);
            self.heads += 1;
        } else {
            lane.tail.push_back(env);
        }
    }

    fn took(&mut self, from_head: bool, env: &Envelope) {
        self.len -= 1;
        if from_head {
            self.heads -= 1;
        }
        self.bytes -= u64::from(env.size);
    }

    /// Takes the next message to deliver. Its body may be paged out (`msg` None).
    pub fn pop_front(&mut self) -> Option<Envelope> {
        let i = self.top()?;
        let from_head = !self.lanes[i].head.is_empty();
        let env = self.lanes[i].pop_front()?;
        self.took(from_head, &env);
        Some(env)
    }

    /// The next message to deliver, if any.
    pub fn front(&self) -> Option<&Envelope> {
        self.lanes[self.top()?].front()
    }

    /// Puts a message back at its publish-order position within its
    /// priority (requeue).
    pub fn insert_sorted(&mut self, env: Envelope) {
        self.bytes += u64::from(env.size);
        self.len += 1;
        let i = self.lane_of(&env);
        let before = self.lanes[i].head.len();
        self.lanes[i].insert_sorted(env);
        self.heads += self.lanes[i].head.len() - before;
    }

    /// Removes the message with this id, wherever it is.
    pub fn remove_id(&mut self, id: MsgId) -> Option<Envelope> {
        for i in 0..self.lanes.len() {
            let before = self.lanes[i].head.len();
            if let Some(e) = self.lanes[i].remove_id(id) {
                let from_head = self.lanes[i].head.len() < before;
                self.took(from_head, &e);
                return Some(e);
            }
        }
        None
    }

    /// Removes everything; returns what was removed (in delivery order).
    pub fn drain_all(&mut self) -> Vec<Envelope> {
        self.bytes = 0;
        self.len = 0;
        self.heads = 0;
        let mut v = Vec::new();
        for lane in self.lanes.iter_mut().rev() {
            lane.cursor = 0;
            v.extend(lane.head.drain(..));
            v.extend(lane.tail.drain(..));
        }
        v
    }

    /// Removes messages at the front of each priority level while `pred`
    /// holds (used for expiry at the head).
    pub fn pop_front_while(&mut self, mut pred: impl FnMut(&Envelope) -> bool) -> Vec<Envelope> {
        let mut out = Vec::new();
        for i in (0..self.lanes.len()).rev() {
            while self.lanes[i].front().is_some_and(&mut pred) {
                let from_head = !self.lanes[i].head.is_empty();
                if let Some(e) = self.lanes[i].pop_front() {
                    self.took(from_head, &e);
                    out.push(e);
                }
            }
        }
        out
    }

    /// The earliest non-zero expiry among the fronts of the priority levels.
    pub fn front_expiry(&self) -> Option<u64> {
        self.lanes
            .iter()
            .filter_map(|l| l.front())
            .map(|e| e.expires)
            .filter(|e| *e != 0)
            .min()
    }

    /// Drops bodies of stored messages in the tails that `can_page(gid)`
    /// says the store can give back. Stops at the first stored message the
    /// store does not have yet, to retry later.
    pub fn page_out(&mut self, mut can_page: impl FnMut(u64) -> bool) -> usize {
        let mut n = 0;
        for lane in self.lanes.iter_mut() {
            let (k, more) = lane.page_out(&mut can_page);
            n += k;
            if !more {
                break;
            }
        }
        n
    }

    /// Moves messages from the tails into the head window (highest priority
    /// first), reading paged-out bodies with `load`. A body that cannot be
    /// read is returned (the caller reports and drops it).
    pub fn page_in(&mut self, mut load: impl FnMut(u64) -> Option<Arc<Message>>) -> Vec<Envelope> {
        let mut lost = Vec::new();
        for i in (0..self.lanes.len()).rev() {
            while self.heads < self.window {
                let lane = &mut self.lanes[i];
                let Some(mut e) = lane.tail.pop_front() else {
                    break;
                };
                lane.cursor = lane.cursor.saturating_sub(1);
                if e.msg.is_none() {
                    match load(e.gid) {
                        Some(m) => e.msg = Some(m),
                        None => {
                            self.len -= 1;
                            self.bytes -= u64::from(e.size);
                            lost.push(e);
                            continue;
                        }
                    }
                }
                lane.head.push_back(e);
                self.heads += 1;
            }
        }
        lost
    }

    /// Iterates in delivery order.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Envelope> {
        self.lanes
            .iter_mut()
            .rev()
            .flat_map(|l| l.head.iter_mut().chain(l.tail.iter_mut()))
    }

    /// Messages in delivery order.
    pub fn iter(&self) -> impl Iterator<Item = &Envelope> {
        self.lanes.iter().rev().flat_map(|l| l.iter())
    }

    /// Number of bodies held in memory.
    pub fn in_memory(&self) -> usize {
        self.lanes
            .iter()
            .map(|l| l.head.len() + l.tail.iter().filter(|e| e.msg.is_some()).count())
            .sum()
    }

    /// Ids in delivery order (tests).
    pub fn ids(&self) -> Vec<MsgId> {
        self.iter().map(|e| e.id).collect()
    }

    /// (priority, id) in delivery order (tests).
    pub fn keyed_ids(&self) -> Vec<(u8, MsgId)> {
        self.lanes
            .iter()
            .enumerate()
            .rev()
            .flat_map(|(p, l)| l.iter().map(move |e| (p as u8, e.id)))
            .collect()
    }

    /// Checks the internal counters (tests).
    pub fn check(&self) -> bool {
        self.len == self.lanes.iter().map(Lane::len).sum::<usize>()
            && self.heads == self.lanes.iter().map(|l| l.head.len()).sum::<usize>()
            && self.lanes.iter().all(|l| {
                let ids: Vec<MsgId> = l.iter().map(|e| e.id).collect();
                ids.windows(2).all(|w| w[0] < w[1])
            })
    }
}
