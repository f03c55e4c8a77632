//! The ready list: messages waiting for a consumer, in publish order, with
//! a bounded in-memory window.
//!
//! `head` holds the next messages to deliver, bodies in memory, up to the
//! window size. `tail` holds the rest; a stored (persistent, durable) message
//! in the tail may have its body dropped from memory ("paged out") once the
//! store has it, and is read back when it moves to the head. Every id in
//! `head` is smaller than every id in `tail`, so the two together are one
//! list in publish order. Transient messages cannot be paged and keep their
//! bodies wherever they are.

use super::core::{Envelope, MsgId};
use super::message::Message;
use std::collections::VecDeque;
use std::sync::Arc;

/// Ready messages in publish order.
#[derive(Debug, Default)]
pub struct ReadyList {
    head: VecDeque<Envelope>,
    tail: VecDeque<Envelope>,
    /// Index in `tail` of the first entry not yet considered for paging.
    cursor: usize,
    bytes: u64,
    window: usize,
}

impl ReadyList {
    /// An empty list keeping at most `window` bodies in memory at the head.
    pub fn new(window: usize) -> Self {
        ReadyList {
            window: window.max(1),
            ..Default::default()
        }
    }

    /// Number of ready messages.
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    /// True when nothing is ready.
    pub fn is_empty(&self) -> bool {
        self.head.is_empty() && self.tail.is_empty()
    }

    /// Sum of body sizes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Appends a new message.
    pub fn push_back(&mut self, env: Envelope) {
        self.bytes += u64::from(env.size);
        if self.tail.is_empty() && self.head.len() < self.window {
            self.head.push_back(env);
        } else {
            self.tail.push_back(env);
        }
    }

    /// Takes the oldest message. Its body may be paged out (`msg` None).
    pub fn pop_front(&mut self) -> Option<Envelope> {
        let env = match self.head.pop_front() {
            Some(e) => e,
            None => {
                let e = self.tail.pop_front()?;
                self.cursor = self.cursor.saturating_sub(1);
                e
            }
        };
        self.bytes -= u64::from(env.size);
        Some(env)
    }

    /// The oldest message, if any.
    pub fn front(&self) -> Option<&Envelope> {
        self.head.front().or_else(|| self.tail.front())
    }

    /// Puts a message back at its publish-order position (requeue).
    pub fn insert_sorted(&mut self, env: Envelope) {
        self.bytes += u64::from(env.size);
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

        /// Removes the message with this id, wherever it is.
    pub fn remove_id(&mut self, id: MsgId) -> Option<Envelope> {
        let e = if let Ok(i) = self.head.binary_search_by_key(&id, |e| e.id) {
            self.head.remove(i)
        } else if let Ok(i) = self.tail.binary_search_by_key(&id, |e| e.id) {
            if i < self.cursor {
                self.cursor -= 1;
            }
            self.tail.remove(i)
        } else {
            None
        };
        if let Some(e) = &e {
            self.bytes -= u64::from(e.size);
        }
        e
    }

    /// Removes everything; returns what was removed.
    pub fn drain_all(&mut self) -> Vec<Envelope> {
        self.bytes = 0;
        self.cursor = 0;
        let mut v: Vec<Envelope> = self.head.drain(..).collect();
        v.extend(self.tail.drain(..));
        v
    }

    /// Removes the oldest message matching `pred` at the very front only
    /// while `pred` holds (used for expiry at the head).
    pub fn pop_front_while(&mut self, mut pred: impl FnMut(&Envelope) -> bool) -> Vec<Envelope> {
        let mut out = Vec::new();
        while self.front().is_some_and(&mut pred) {
            if let Some(e) = self.pop_front() {
                out.push(e);
            }
        }
        out
    }

    /// Drops bodies of stored messages in the tail that `can_page(gid)`
    /// says the store can give back. Stops at the first stored message the
    /// store does not have yet, to retry later.
    pub fn page_out(&mut self, mut can_page: impl FnMut(u64) -> bool) -> usize {
        let mut n = 0;
        while let Some(e) = self.tail.get_mut(self.cursor) {
            if e.gid != 0 && e.msg.is_some() {
                if !can_page(e.gid) {
                    break;
                }
                e.msg = None;
                n += 1;
            }
            self.cursor += 1;
        }
        n
    }

    /// Moves messages from the tail into the head window, reading paged-out
    /// bodies with `load`. A body that cannot be read is returned in the
    /// second vector (the caller reports and drops it).
    pub fn page_in(&mut self, mut load: impl FnMut(u64) -> Option<Arc<Message>>) -> Vec<Envelope> {
        let mut lost = Vec::new();
        while self.head.len() < self.window {
            let Some(mut e) = self.tail.pop_front() else {
                break;
            };
            self.cursor = self.cursor.saturating_sub(1);
            if e.msg.is_none() {
                match load(e.gid) {
                    Some(m) => e.msg = Some(m),
                    None => {
                        self.bytes -= u64::from(e.size);
                        lost.push(e);
                        continue;
                    }
                }
            }
            self.head.push_back(e);
        }
        lost
    }

    /// Iterates in publish order.
    pub fn iter(&self) -> impl Iterator<Item = &Envelope> {
        self.head.iter().chain(self.tail.iter())
    }

    /// Number of bodies held in memory.
    pub fn in_memory(&self) -> usize {
        self.head.len() + self.tail.iter().filter(|e| e.msg.is_some()).count()
    }

    /// Ids in order (tests).
    pub fn ids(&self) -> Vec<MsgId> {
        self.iter().map(|e| e.id).collect()
    }
}
