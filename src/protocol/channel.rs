//! Channel state machines and the AMQP method handlers.
//!
//! A channel lives inside its connection task (the only one that touches
//! it). A publish is a small state machine: basic.publish, then a content
//! header, then body frames until the announced size is reached; anything
//! else in between is 505 UNEXPECTED_FRAME. Handlers return `AmqpError`; the
//! connection decides whether that closes the channel or the connection.

use super::connection::{Connection, PendingStore};
use super::error::{AmqpError, code, short};
use super::frame::{self, ContentHeader, RawFrame};
use crate::broker::exchange::{Binding, Destination, Exchange};
use crate::broker::{ConnCmd, ReplyTarget};
use crate::queue::args::check_equivalent;
use crate::queue::core::{ConsumerId, ConsumerSpec, Envelope, MsgId, Outcome, Owner, SharedLimit};
use crate::queue::message::Message;
use crate::queue::{QueueCmd, QueueRef};
use amq_protocol::protocol::{
    AMQPClass, access, basic, channel as chan_m, confirm, exchange as ex_m, queue as q_m, tx,
};
use bytes::{Bytes, BytesMut};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::oneshot;

/// The pseudo queue for direct reply-to.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A publish whose content is still arriving.
pub(crate) struct Incoming {
    exchange: Bytes,
    routing_key: Bytes,
    mandatory: bool,
    header: Option<ContentHeader>,
    body: Vec<Bytes>,
    received: u64,
}

/// A delivery waiting for ack.
#[derive(Debug, Clone)]
pub(crate) struct UnackedEntry {
    tag: u64,
    queue: Arc<QueueRef>,
    id: MsgId,
    shared: bool,
    /// The consumer it was delivered to (0 for basic.get).
    consumer: ConsumerId,
    /// The queue took it back (consumer timeout): settling it is a no-op.
    revoked: bool,
}

/// A consumer on this channel.
pub(crate) struct ConsumerEntry {
    id: ConsumerId,
    queue: Arc<QueueRef>,
    no_ack: bool,
}

pub(crate) struct DirectReply {
    tag: String,
    pub key: String,
}

#[derive(Default)]
pub(crate) struct TxState {
    publishes: Vec<(Arc<Message>, bool)>,
    settles: Vec<(UnackedEntry, Outcome)>,
}

/// One open channel.
pub(crate) struct Channel {
    pub closing: bool,
    pub content: Option<Incoming>,
    next_tag: u64,
    pub unacked: VecDeque<UnackedEntry>,
    pub consumers: HashMap<String, ConsumerEntry>,
    prefetch: u16,
    shared: Option<Arc<SharedLimit>>,
    confirm: bool,
    next_seq: u64,
    pub unconfirmed: BTreeMap<u64, (u32, bool)>,
    tx: Option<TxState>,
    pub touched: HashMap<u64, Arc<QueueRef>>,
    pub direct_reply: Option<DirectReply>,
    exchange_cache: Option<Arc<Exchange>>,
    last_queue: Option<String>,
    /// What management shows of this channel (see `publish_stats`).
    pub stats: Arc<crate::broker::conns::ChannelStats>,
}

impl Channel {
    fn new() -> Self {
        Channel {
            closing: false,
            content: None,
            next_tag: 1,
            unacked: VecDeque::new(),
            consumers: HashMap::new(),
            prefetch: 0,
            shared: None,
            confirm: false,
            next_seq: 1,
            unconfirmed: BTreeMap::new(),
            tx: None,
            touched: HashMap::new(),
            direct_reply: None,
            exchange_cache: None,
            last_queue: None,
            stats: Arc::default(),
        }
    }

    /// Copies the gauges management shows into `stats` (relaxed stores,
    /// once per turn of the connection loop).
    pub(crate) fn publish_stats(&self) {
        let s = &self.stats;
        let r = Ordering::Relaxed;
        s.prefetch_count.store(u32::from(self.prefetch), r);
        s.global_prefetch_count
            .store(self.shared.as_ref().map_or(0, |x| x.limit.load(r)), r);
        s.messages_unacknowledged
            .store(self.unacked.len() as u64, r);
        s.messages_unconfirmed
            .store(self.unconfirmed.len() as u64, r);
        s.consumer_count.store(
            (self.consumers.len() + usize::from(self.direct_reply.is_some())) as u32,
            r,
        );
        s.confirm.store(self.confirm, r);
        s.transactional.store(self.tx.is_some(), r);
        let (p, a) = self
            .tx
            .as_ref()
            .map_or((0, 0), |t| (t.publishes.len(), t.settles.len()));
        s.messages_uncommitted.store(p as u64, r);
        s.acks_uncommitted.store(a as u64, r);
    }

    /// Removes and returns the entries an ack/nack/reject covers.
    fn take_unacked(&mut self, tag: u64, multiple: bool) -> Result<Vec<UnackedEntry>, AmqpError> {
        if multiple {
            if tag == 0 {
                return Ok(self.unacked.drain(..).collect());
            }
            let n = self.unacked.partition_point(|e| e.tag <= tag);
            if n == 0 {
                return Err(AmqpError::precondition(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            return Ok(self.unacked.drain(..n).collect());
        }
        match self.unacked.binary_search_by_key(&tag, |e| e.tag) {
            Ok(i) => Ok(self.unacked.remove(i).into_iter().collect()),
            Err(_) => Err(AmqpError::precondition(format!(
                "unknown delivery tag {tag}"
            ))),
        }
    }
}

fn random_token() -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut s = String::with_capacity(22);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    let mut x = h.finish();
    let mut h2 = std::collections::hash_map::RandomState::new().build_hasher();
    h2.write_u64(x);
    let mut y = h2.finish();
    for i in 0..22 {
        let v = if i < 11 { &mut x } else { &mut y };
        s.push(ALPHABET[(*v & 63) as usize] as char);
        *v >>= 6;
    }
    s
}

fn utf8(b: &Bytes, what: &str) -> Result<(), AmqpError> {
    std::str::from_utf8(b).map(|_| ()).map_err(|_| {
        AmqpError::new(code::SYNTAX_ERROR, format!("{what} is not valid UTF-8")).on(60, 40)
    })
}

/// Reads a short string at `pos` as a zero-copy slice.
fn short_str_at(p: &Bytes, pos: &mut usize) -> Option<Bytes> {
    let len = *p.get(*pos)? as usize;
    let start = *pos + 1;
    let end = start.checked_add(len)?;
    if end > p.len() {
        return None;
    }
    *pos = end;
    Some(p.slice(start..end))
}

/// Hand-decoded basic.publish: exchange and routing key stay slices of the
/// frame, with no allocation.
fn parse_publish(p: &Bytes) -> Result<(Bytes, Bytes, bool, bool), AmqpError> {
    let bad = || AmqpError::new(code::SYNTAX_ERROR, "malformed basic.publish arguments").on(60, 40);
    let mut pos = 6; // class, method, reserved ticket
    let exchange = short_str_at(p, &mut pos).ok_or_else(bad)?;
    let routing_key = short_str_at(p, &mut pos).ok_or_else(bad)?;
    let bits = *p.get(pos).ok_or_else(bad)?;
    if pos + 1 != p.len() {
        return Err(bad());
    }
    utf8(&exchange, "exchange name")?;
    utf8(&routing_key, "routing key")?;
    Ok((exchange, routing_key, bits & 1 != 0, bits & 2 != 0))
}

impl Connection {
    fn chan(&mut self, ch: u16) -> Result<&mut Channel, AmqpError> {
        self.channels
            .get_mut(&ch)
            .ok_or_else(|| AmqpError::new(code::CHANNEL_ERROR, format!("channel {ch} is not open")))
    }

    fn check_exclusive(&self, q: &QueueRef) -> Result<(), AmqpError> {
        match q.exclusive_owner {
            Some(owner) if owner != self.id => Err(AmqpError::queue_locked(self.vname(), &q.name)),
            _ => Ok(()),
        }
    }

    /// Resolves a queue name ("" = the channel's last declared queue).
    fn find_queue(&mut self, ch: u16, name: &str) -> Result<Arc<QueueRef>, AmqpError> {
        let name = if name.is_empty() {
            self.chan(ch)?
                .last_queue
                .clone()
                .ok_or_else(|| AmqpError::new(code::NOT_FOUND, "no previously declared queue"))?
        } else {
            name.to_string()
        };
        let q = self
            .vhost
            .queue(&name)
            .ok_or_else(|| AmqpError::queue_not_found(self.vname(), &name))?;
        self.check_exclusive(&q)?;
        if q.home.is_some() {
            // A classic queue of another node: 404 while that node is down.
            crate::cluster::classic::check_home(&self.broker, &q)?;
        }
        Ok(q)
    }

    fn find_exchange(&self, name: &str) -> Result<Arc<Exchange>, AmqpError> {
        self.vhost
            .exchange(name)
            .ok_or_else(|| AmqpError::exchange_not_found(self.vname(), name))
    }

    /// Handles a frame on channel N (N > 0).
    pub(crate) async fn handle_channel_frame(&mut self, f: RawFrame) -> Result<(), AmqpError> {
        let ch = f.channel;
        if ch > self.channel_max {
            return Err(AmqpError::new(
                code::NOT_ALLOWED,
                format!(
                    "number of channels opened ({}) has reached the negotiated channel_max ({})",
                    self.channels.len(),
                    self.channel_max
                ),
            ));
        }
        let Some(chan) = self.channels.get_mut(&ch) else {
            // Only channel.open is valid on a channel that is not open.
            if f.kind == frame::FRAME_METHOD {
                if let Some((20, 10)) = frame::method_ids(&f.payload) {
                    frame::parse_method(&f.payload)?;
                    self.channels.insert(ch, Channel::new());
                    self.write_method(
                        ch,
                        AMQPClass::Channel(chan_m::AMQPMethod::OpenOk(chan_m::OpenOk {})),
                    );
                    return Ok(());
                }
            }
            return Err(AmqpError::new(
                code::CHANNEL_ERROR,
                format!(
                    "expected 'channel.open' on channel {ch}, got a frame of type {}",
                    f.kind
                ),
            ));
        };
        if chan.closing {
            // Waiting for close-ok: drop everything else.
            if f.kind == frame::FRAME_METHOD {
                match frame::method_ids(&f.payload) {
                    Some((20, 41)) => {
                        self.channels.remove(&ch);
                    }
                    Some((20, 40)) => {
                        self.write_method(
                            ch,
                            AMQPClass::Channel(chan_m::AMQPMethod::CloseOk(chan_m::CloseOk {})),
                        );
                        self.channels.remove(&ch);
                    }
                    _ => {}
                }
            }
            return Ok(());
        }
        match f.kind {
            frame::FRAME_METHOD => {
                if chan.content.is_some() {
                    return Err(AmqpError::new(
                        code::UNEXPECTED_FRAME,
                        "expected content header for class 60, got non content header frame instead".to_string(),
                    )
                    .on(60, 40));
                }
                if let Some((60, 40)) = frame::method_ids(&f.payload) {
                    let (exchange, routing_key, mandatory, immediate) = parse_publish(&f.payload)?;
                    if immediate {
                        return Err(
                            AmqpError::new(code::NOT_IMPLEMENTED, "immediate=true").on(60, 40)
                        );
                    }
                    if !self.has_published {
                        self.has_published = true;
                        self.update_blocked();
                    }
                    let chan = self.chan(ch)?;
                    chan.content = Some(Incoming {
                        exchange,
                        routing_key,
                        mandatory,
                        header: None,
                        body: Vec::new(),
                        received: 0,
                    });
                    return Ok(());
                }
                let m = frame::parse_method(&f.payload)?;
                let (cid, mid) = (m.get_amqp_class_id(), m.get_amqp_method_id());
                self.flush_pending().await.map_err(AmqpError::internal)?;
                let span = tracing::debug_span!("ch", ch);
                tracing::Instrument::instrument(self.handle_method(ch, m), span)
                    .await
                    .map_err(|e| e.on(cid, mid))
            }
            frame::FRAME_HEADER => {
                let max = self.broker.config.amqp.max_message_size;
                let Some(inc) = chan.content.as_mut().filter(|i| i.header.is_none()) else {
                    return Err(AmqpError::new(
                        code::UNEXPECTED_FRAME,
                        format!("unexpected content header frame on channel {ch}"),
                    ));
                };
                let h = frame::parse_header(&f.payload)?;
                if h.class_id != 60 {
                    return Err(AmqpError::new(
                        code::UNEXPECTED_FRAME,
                        format!(
                            "content header for class {} does not match basic.publish",
                            h.class_id
                        ),
                    ));
                }
                if h.body_size > max {
                    chan.content = None;
                    return Err(AmqpError::precondition(format!(
                        "message size {} is larger than configured max size {max}",
                        h.body_size
                    ))
                    .on(60, 40));
                }
                let done = h.body_size == 0;
                inc.header = Some(h);
                if done {
                    self.complete_publish(ch).await?;
                }
                Ok(())
            }
            frame::FRAME_BODY => {
                let Some(inc) = chan.content.as_mut().filter(|i| i.header.is_some()) else {
                    return Err(AmqpError::new(
                        code::UNEXPECTED_FRAME,
                        format!("unexpected content body frame on channel {ch}"),
                    ));
                };
                let size = inc.header.as_ref().map_or(0, |h| h.body_size);
                inc.received += f.payload.len() as u64;
                if inc.received > size {
                    return Err(AmqpError::new(
                        code::FRAME_ERROR,
                        format!(
                            "content body exceeds the {size} bytes announced in its header (channel {ch})"
                        ),
                    ));
                }
                inc.body.push(f.payload);
                if inc.received == size {
                    self.complete_publish(ch).await?;
                }
                Ok(())
            }
            k => Err(AmqpError::new(
                code::FRAME_ERROR,
                format!("unexpected frame type {k}"),
            )),
        }
    }

    /// The last content frame of a publish arrived: build the message and route it.
    async fn complete_publish(&mut self, ch: u16) -> Result<(), AmqpError> {
        let chan = self.chan(ch)?;
        let Some(inc) = chan.content.take() else {
            return Ok(());
        };
        let Some(header) = inc.header else {
            return Ok(());
        };
        let body = if inc.body.len() == 1 {
            inc.body.into_iter().next().unwrap_or_default()
        } else {
            let mut b = BytesMut::with_capacity(inc.received as usize);
            for part in inc.body {
                b.extend_from_slice(&part);
            }
            b.freeze()
        };
        let mut properties = header.properties;
        let mut raw_properties = header.raw_properties;
        if let Some(exp) = properties.expiration() {
            let why = match exp.as_str().parse::<i64>() {
                Ok(n) if n < 0 => Some(format!("{{value_negative,{n}}}")),
                Ok(_) => None,
                Err(_) => Some("no_integer".to_string()),
            };
            if let Some(why) = why {
                return Err(
                    AmqpError::precondition(format!("invalid expiration '{exp}': {why}"))
                        .on(60, 40),
                );
            }
        }
        if let Some(uid) = properties.user_id() {
            if uid.as_str() != self.user {
                return Err(AmqpError::precondition(format!(
                    "user_id property set to '{uid}' but authenticated user was '{}'",
                    self.user
                ))
                .on(60, 40));
            }
        }
        let chan = self.chan(ch)?;
        if properties.reply_to().as_ref().map(|r| r.as_str()) == Some(DIRECT_REPLY_TO) {
            let key = match &chan.direct_reply {
                Some(dr) => dr.key.clone(),
                None => {
                    return Err(
                        AmqpError::precondition("fast reply consumer does not exist").on(60, 40),
                    );
                }
            };
            properties = properties.with_reply_to(short(&key));
            raw_properties = frame::encode_properties(&properties);
        }
        let msg = Arc::new(Message {
            exchange: inc.exchange,
            routing_key: inc.routing_key,
            properties,
            raw_properties,
            body,
        });
        if chan.tx.is_some() {
            // Exchange must exist now (as RabbitMQ checks at publish time).
            let ex = self.publish_exchange(ch, msg.exchange_str())?;
            self.check_topic(
                &ex,
                crate::auth::permissions::Perm::Write,
                msg.routing_key_str(),
            )
            .map_err(|e| e.on(60, 40))?;
            if let Some(t) = self.chan(ch)?.tx.as_mut() {
                t.publishes.push((msg, inc.mandatory));
            }
            return Ok(());
        }
        self.route_publish(ch, msg, inc.mandatory)
    }

    fn publish_exchange(&mut self, ch: u16, name: &str) -> Result<Arc<Exchange>, AmqpError> {
        let chan = self.chan(ch)?;
        if let Some(e) = &chan.exchange_cache {
            if e.name.len() == name.len() && (name.is_empty() || e.name == name) && !e.is_deleted()
            {
                return Ok(e.clone());
            }
        }
        // Checked on a cache miss only: the cached exchange was authorised.
        self.check_perm(
            crate::auth::permissions::Perm::Write,
            crate::auth::permissions::ResourceKind::Exchange,
            name,
        )?;
        let ex = self.find_exchange(name)?;
        if ex.internal {
            return Err(AmqpError::new(
                code::ACCESS_REFUSED,
                format!(
                    "cannot publish to internal exchange '{name}' in vhost '{}'",
                    self.vname()
                ),
            ));
        }
        self.chan(ch)?.exchange_cache = Some(ex.clone());
        Ok(ex)
    }

    /// Routes one complete message and hands it to its queues (batched).
    fn route_publish(
        &mut self,
        ch: u16,
        msg: Arc<Message>,
        mandatory: bool,
    ) -> Result<(), AmqpError> {
        let ex = self.publish_exchange(ch, msg.exchange_str())?;
        self.check_topic(
            &ex,
            crate::auth::permissions::Perm::Write,
            msg.routing_key_str(),
        )
        .map_err(|e| e.on(60, 40))?;
        if ex.delayed {
            if let Some(delay) = crate::broker::delayed::delay_of(&msg) {
                self.msg_stats.published(&ex, 0, None);
                return self.publish_delayed(ch, msg, delay);
            }
        }
        let mut targets: Vec<Arc<QueueRef>> = Vec::new();
        let mut routed_direct = false;
        let rk = msg.routing_key_str();
        if ex.name.is_empty() && rk.starts_with("amq.rabbitmq.reply-to.") {
            if let Some(t) = self.broker.direct_reply.get(rk).map(|t| t.value().clone()) {
                routed_direct = t
                    .conn
                    .send(ConnCmd::DirectReply {
                        channel: t.channel,
                        msg: msg.clone(),
                    })
                    .is_ok();
            }
        } else {
            self.vhost
                .route(&ex, rk, msg.properties.headers().as_ref(), &mut targets);
        }
        let chan = self.chan(ch)?;
        let seq = if chan.confirm {
            let s = chan.next_seq;
            chan.next_seq += 1;
            Some(s)
        } else {
            None
        };
        let unroutable = (targets.is_empty() && !routed_direct).then_some(mandatory);
        self.msg_stats.published(&ex, targets.len(), unroutable);
        if targets.is_empty() {
            if !routed_direct && mandatory {
                self.write_return(ch, &msg, code::NO_ROUTE, "NO_ROUTE");
            }
            if let Some(s) = seq {
                self.write_confirms(ch, vec![s], false);
            }
            return Ok(());
        }
        // Persistent messages routed to durable queues are written to the
        // store once (for all those queues) and confirmed after the group
        // commit; the store counts as one more party to the confirm.
        let mut gid = 0;
        if msg.is_persistent() && self.broker.storage.is_some() {
            let stored: Vec<u64> = targets
                .iter()
                .filter(|q| q.uses_message_store())
                .map(|q| q.id)
                .collect();
            if !stored.is_empty() {
                gid = self.broker.next_gid();
                self.pend_store(PendingStore {
                    gid,
                    queues: stored,
                    msg: msg.clone(),
                    confirm: seq.map(|s| (ch, s)),
                });
            }
        }
        if let Some(s) = seq {
            let parties = targets.len() as u32 + u32::from(gid != 0);
            self.chan(ch)?.unconfirmed.insert(s, (parties, false));
        }
        for q in &targets {
            let g = if q.uses_message_store() { gid } else { 0 };
            self.pend_publish(ch, q, msg.clone(), g, seq);
        }
        Ok(())
    }

    /// A message for an x-delayed-message exchange with a positive x-delay:
    /// held by the scheduler (and, when persistent, in the store under the
    /// delayed pseudo-queue) until due, then routed. Confirmed once held
    /// (persistent ones once on disk); mandatory cannot be honoured, as with
    /// RabbitMQ's plugin.
    fn publish_delayed(&mut self, ch: u16, msg: Arc<Message>, delay: u64) -> Result<(), AmqpError> {
        use crate::broker::delayed::{DELAYED_QUEUE_ID, Delayed, stored_copy};
        let due = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
            .saturating_add(delay);
        let chan = self.chan(ch)?;
        let seq = if chan.confirm {
            let s = chan.next_seq;
            chan.next_seq += 1;
            Some(s)
        } else {
            None
        };
        let mut gid = 0;
        if msg.is_persistent() && self.broker.storage.is_some() {
            gid = self.broker.next_gid();
            let copy = Arc::new(stored_copy(&msg, due, self.vname()));
            self.pend_store(PendingStore {
                gid,
                queues: vec![DELAYED_QUEUE_ID],
                msg: copy,
                confirm: seq.map(|s| (ch, s)),
            });
            if let Some(s) = seq {
                self.chan(ch)?.unconfirmed.insert(s, (1, false));
            }
        } else if let Some(s) = seq {
            self.write_confirms(ch, vec![s], false);
        }
        let vhost = self.vname().to_string();
        match self.broker.delayed.get() {
            Some(s) => s.schedule(Delayed {
                due,
                vhost,
                msg,
                gid,
            }),
            None => {
                return Err(AmqpError::internal(
                    "delayed message scheduler is not running",
                ));
            }
        }
        Ok(())
    }

    fn write_return(&mut self, ch: u16, msg: &Message, reply_code: u16, text: &str) {
        self.write_method(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Return(basic::Return {
                reply_code,
                reply_text: short(text),
                exchange: short(msg.exchange_str()),
                routing_key: short(msg.routing_key_str()),
            })),
        );
        frame::write_header(
            &mut self.out,
            ch,
            msg.body.len() as u64,
            &msg.raw_properties,
        );
        frame::write_body(&mut self.out, ch, &msg.body, self.frame_max);
    }

    /// Writes confirms for settled publish sequence numbers, folding them
    /// into one `multiple` ack when nothing older is still outstanding.
    fn write_confirms(&mut self, ch: u16, mut tags: Vec<u64>, nack: bool) {
        let Some(chan) = self.channels.get(&ch) else {
            return;
        };
        if tags.is_empty() || chan.closing {
            return;
        }
        if !nack {
            self.msg_stats
                .add(crate::mgmt::stats::Counts::CONFIRM, tags.len() as u64);
        }
        tags.sort_unstable();
        let max = tags[tags.len() - 1];
        let oldest_pending = chan.unconfirmed.keys().next().copied();
        if tags.len() > 1 && oldest_pending.is_none_or(|o| o > max) {
            frame::write_confirm(&mut self.out, ch, max, true, nack);
        } else {
            for t in tags {
                frame::write_confirm(&mut self.out, ch, t, false, nack);
            }
        }
    }

    /// Confirms (or nacks) from a queue.
    pub(crate) fn on_confirms(&mut self, ch: u16, seqs: &[u64], nack: bool) {
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        let mut acked = Vec::new();
        let mut nacked = Vec::new();
        for s in seqs {
            if let Some(e) = chan.unconfirmed.get_mut(s) {
                e.0 = e.0.saturating_sub(1);
                e.1 |= nack;
                if e.0 == 0 {
                    let was_nacked = e.1;
                    chan.unconfirmed.remove(s);
                    if was_nacked {
                        nacked.push(*s)
                    } else {
                        acked.push(*s)
                    }
                }
            }
        }
        self.write_confirms(ch, nacked, true);
        self.write_confirms(ch, acked, false);
    }

    /// Writes deliveries for one consumer.
    pub(crate) fn deliver(
        &mut self,
        ch: u16,
        consumer: ConsumerId,
        tag: &str,
        queue: Arc<QueueRef>,
        msgs: Vec<Envelope>,
    ) {
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            // Channel gone: the queue requeues what it had sent it when it
            // processes ChannelClosed.
            return;
        };
        let Some(entry) = chan.consumers.get(tag).filter(|c| c.id == consumer) else {
            // Cancelled meanwhile: give the messages back untouched.
            for e in &msgs {
                self.pend_settle(&queue, Outcome::Undeliverable, e.id);
            }
            return;
        };
        let no_ack = entry.no_ack;
        let shared = chan.shared.is_some();
        chan.touched
            .entry(queue.id)
            .or_insert_with(|| queue.clone());
        let n = msgs.len() as u32;
        self.msg_stats.delivered(&queue, &msgs, no_ack);
        for env in msgs {
            let Some(m) = &env.msg else {
                // The queue always loads bodies before delivering; if one
                // is missing, put the message back rather than send garbage.
                tracing::error!(queue = %queue.name, "delivery without a body; returning it to the queue");
                self.pending_undeliverable.push((queue.clone(), env.id));
                continue;
            };
            let dtag = chan.next_tag;
            chan.next_tag += 1;
            frame::write_deliver(
                &mut self.out,
                ch,
                tag.as_bytes(),
                dtag,
                env.redelivered,
                &m.exchange,
                &m.routing_key,
            );
            frame::write_header(&mut self.out, ch, m.body.len() as u64, &m.raw_properties);
            frame::write_body(&mut self.out, ch, &m.body, self.frame_max);
            if !no_ack {
                chan.unacked.push_back(UnackedEntry {
                    tag: dtag,
                    queue: queue.clone(),
                    id: env.id,
                    shared,
                    consumer,
                    revoked: false,
                });
            }
        }
        // Written: the queue may send more (flow credit, every consumer).
        self.pend_credit(&queue, consumer, n);
        for (q, id) in std::mem::take(&mut self.pending_undeliverable) {
            self.pend_settle(&q, Outcome::Undeliverable, id);
        }
    }

    /// The server cancelled a consumer (queue deleted).
    pub(crate) fn on_server_cancel(&mut self, ch: u16, consumer: ConsumerId, revoked: bool) {
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            return;
        };
        if revoked {
            // The queue already returned this consumer's deliveries: a late
            // ack or nack of their tags must not reach the queue (the
            // message may be with another consumer by then).
            let mut shared_n = 0;
            for e in chan
                .unacked
                .iter_mut()
                .filter(|e| e.consumer == consumer && !e.revoked)
            {
                e.revoked = true;
                if e.shared {
                    e.shared = false;
                    shared_n += 1;
                }
            }
            if let Some(shared) = chan.shared.as_ref().filter(|_| shared_n > 0) {
                shared.release(shared_n);
            }
        }
        let Some(tag) = chan
            .consumers
            .iter()
            .find(|(_, c)| c.id == consumer)
            .map(|(t, _)| t.clone())
        else {
            return;
        };
        chan.consumers.remove(&tag);
        chan.stats.remove_consumer(Some(&tag));
        if self.caps.consumer_cancel_notify {
            self.write_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::Cancel(basic::Cancel {
                    consumer_tag: short(&tag),
                    nowait: true,
                })),
            );
        }
    }

    /// A reply for this channel's direct reply-to consumer.
    pub(crate) fn deliver_direct_reply(&mut self, ch: u16, msg: &Message) {
        let Some(chan) = self.channels.get_mut(&ch).filter(|c| !c.closing) else {
            return;
        };
        let Some(dr) = &chan.direct_reply else { return };
        let dtag = chan.next_tag;
        chan.next_tag += 1;
        frame::write_deliver(
            &mut self.out,
            ch,
            dr.tag.as_bytes(),
            dtag,
            false,
            &msg.exchange,
            &msg.routing_key,
        );
        frame::write_header(
            &mut self.out,
            ch,
            msg.body.len() as u64,
            &msg.raw_properties,
        );
        frame::write_body(&mut self.out, ch, &msg.body, self.frame_max);
    }

    async fn handle_method(&mut self, ch: u16, m: AMQPClass) -> Result<(), AmqpError> {
        match m {
            AMQPClass::Channel(chan_m::AMQPMethod::Close(_)) => {
                self.release_channel(ch).await;
                self.channels.remove(&ch);
                self.write_method(
                    ch,
                    AMQPClass::Channel(chan_m::AMQPMethod::CloseOk(chan_m::CloseOk {})),
                );
                Ok(())
            }
            AMQPClass::Channel(chan_m::AMQPMethod::CloseOk(_)) => Ok(()),
            AMQPClass::Channel(chan_m::AMQPMethod::Open(_)) => Err(AmqpError::new(
                code::CHANNEL_ERROR,
                format!("second 'channel.open' seen on channel {ch}"),
            )),
            AMQPClass::Channel(chan_m::AMQPMethod::Flow(f)) => {
                if !f.active {
                    return Err(AmqpError::new(code::NOT_IMPLEMENTED, "active=false"));
                }
                self.write_method(
                    ch,
                    AMQPClass::Channel(chan_m::AMQPMethod::FlowOk(chan_m::FlowOk { active: true })),
                );
                Ok(())
            }
            AMQPClass::Channel(chan_m::AMQPMethod::FlowOk(_)) => Ok(()),
            AMQPClass::Access(access::AMQPMethod::Request(_)) => {
                self.write_method(
                    ch,
                    AMQPClass::Access(access::AMQPMethod::RequestOk(access::RequestOk {})),
                );
                Ok(())
            }
            AMQPClass::Exchange(m) => self.exchange_method(ch, m).await,
            AMQPClass::Queue(m) => self.queue_method(ch, m).await,
            AMQPClass::Basic(m) => self.basic_method(ch, m).await,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(s)) => {
                let chan = self.chan(ch)?;
                if chan.tx.is_some() {
                    return Err(AmqpError::precondition(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                chan.confirm = true;
                if !s.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Confirm(confirm::AMQPMethod::SelectOk(confirm::SelectOk {})),
                    );
                }
                Ok(())
            }
            AMQPClass::Tx(m) => self.tx_method(ch, m).await,
            other => Err(AmqpError::new(
                code::COMMAND_INVALID,
                format!(
                    "method {}.{} is not valid from a client on channel {ch}",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )),
        }
    }

    async fn tx_method(&mut self, ch: u16, m: tx::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            tx::AMQPMethod::Select(_) => {
                let chan = self.chan(ch)?;
                if chan.confirm {
                    return Err(AmqpError::precondition(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if chan.tx.is_none() {
                    chan.tx = Some(TxState::default());
                }
                self.write_method(ch, AMQPClass::Tx(tx::AMQPMethod::SelectOk(tx::SelectOk {})));
                Ok(())
            }
            tx::AMQPMethod::Commit(_) => {
                let chan = self.chan(ch)?;
                let Some(state) = chan.tx.as_mut().map(std::mem::take) else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                for (entry, outcome) in state.settles {
                    self.settle_entry(ch, entry, outcome);
                }
                for (msg, mandatory) in state.publishes {
                    self.route_publish(ch, msg, mandatory)?;
                }
                self.flush_pending().await.map_err(AmqpError::internal)?;
                self.write_method(ch, AMQPClass::Tx(tx::AMQPMethod::CommitOk(tx::CommitOk {})));
                Ok(())
            }
            tx::AMQPMethod::Rollback(_) => {
                let chan = self.chan(ch)?;
                let Some(state) = chan.tx.as_mut().map(std::mem::take) else {
                    return Err(AmqpError::precondition("channel is not transactional"));
                };
                // Acks in the rolled-back transaction never happened: the
                // deliveries are outstanding again.
                for (entry, _) in state.settles {
                    let pos = chan.unacked.partition_point(|e| e.tag < entry.tag);
                    chan.unacked.insert(pos, entry);
                }
                self.write_method(
                    ch,
                    AMQPClass::Tx(tx::AMQPMethod::RollbackOk(tx::RollbackOk {})),
                );
                Ok(())
            }
            _ => Err(AmqpError::new(
                code::COMMAND_INVALID,
                "unexpected tx method from client",
            )),
        }
    }

    fn settle_entry(&mut self, ch: u16, entry: UnackedEntry, outcome: Outcome) {
        if entry.shared {
            if let Some(shared) = self.channels.get(&ch).and_then(|c| c.shared.clone()) {
                shared.release(1);
            }
        }
        if !entry.revoked {
            self.pend_settle(&entry.queue, outcome, entry.id);
        }
    }

    async fn exchange_method(&mut self, ch: u16, m: ex_m::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            ex_m::AMQPMethod::Declare(d) => {
                let name = d.exchange.as_str();
                let vname = self.vname().to_string();
                if d.passive {
                    self.find_exchange(name)?;
                } else {
                    // x-delayed-message routes as its x-delayed-type (RabbitMQ's plugin).
                    let (kind, delayed) =
                        crate::broker::exchange::declared_kind(d.kind.as_str(), &d.arguments)?;
                    if name.is_empty() {
                        return Err(AmqpError::new(
                            code::ACCESS_REFUSED,
                            "operation not permitted on the default exchange",
                        ));
                    }
                    if name.starts_with("amq.") && self.vhost.exchange(name).is_none() {
                        return Err(AmqpError::new(
                            code::ACCESS_REFUSED,
                            format!("exchange name '{name}' contains reserved prefix 'amq.*'"),
                        ));
                    }
                    self.check_perm(
                        crate::auth::permissions::Perm::Configure,
                        crate::auth::permissions::ResourceKind::Exchange,
                        name,
                    )?;
                    if let Some(ae) = d.arguments.inner().get("alternate-exchange") {
                        if crate::broker::headers::value_str(ae).is_none() {
                            return Err(AmqpError::precondition(format!(
                                "invalid arg 'alternate-exchange' for exchange '{name}' in vhost '{vname}': {{unacceptable_type,{}}}",
                                crate::queue::args::type_name(ae)
                            )));
                        }
                    }
                    let mut built = Exchange::new(
                        name,
                        kind,
                        d.durable,
                        d.auto_delete,
                        d.internal,
                        d.arguments.clone(),
                    );
                    if delayed {
                        built = built.into_delayed();
                    }
                    let new = Arc::new(built);
                    let existing = self
                        .vhost
                        .exchanges
                        .entry(name.to_string())
                        .or_insert(new.clone())
                        .value()
                        .clone();
                    if Arc::ptr_eq(&existing, &new) && new.durable {
                        if let Some(st) = &self.broker.storage {
                            st.put_exchange(&vname, &new).await.map_err(|e| {
                                AmqpError::internal(format!(
                                    "cannot record durable exchange '{name}': {e}"
                                ))
                            })?;
                        }
                    }
                    let ineq = |arg: &str, got: String, cur: String| {
                        AmqpError::precondition(format!(
                            "inequivalent arg '{arg}' for exchange '{name}' in vhost '{vname}': received '{got}' but current is '{cur}'"
                        ))
                    };
                    if existing.kind != kind || existing.delayed != delayed {
                        return Err(ineq(
                            "type",
                            d.kind.to_string(),
                            existing.type_name().into(),
                        ));
                    }
                    if existing.durable != d.durable {
                        return Err(ineq(
                            "durable",
                            d.durable.to_string(),
                            existing.durable.to_string(),
                        ));
                    }
                    if existing.auto_delete != d.auto_delete {
                        return Err(ineq(
                            "auto_delete",
                            d.auto_delete.to_string(),
                            existing.auto_delete.to_string(),
                        ));
                    }
                    if existing.internal != d.internal {
                        return Err(ineq(
                            "internal",
                            d.internal.to_string(),
                            existing.internal.to_string(),
                        ));
                    }
                    let a = d.arguments.inner().get("alternate-exchange");
                    let b = existing.arguments.inner().get("alternate-exchange");
                    if a != b {
                        let show = |v: Option<&amq_protocol::types::AMQPValue>| {
                            v.map(crate::queue::args::show)
                                .unwrap_or_else(|| "none".into())
                        };
                        return Err(ineq("alternate-exchange", show(a), show(b)));
                    }
                }
                if !d.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Exchange(ex_m::AMQPMethod::DeclareOk(ex_m::DeclareOk {})),
                    );
                }
                Ok(())
            }
            ex_m::AMQPMethod::Delete(d) => {
                let name = d.exchange.as_str();
                if name.is_empty() {
                    return Err(AmqpError::new(
                        code::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                if name.starts_with("amq.") {
                    return Err(AmqpError::new(
                        code::ACCESS_REFUSED,
                        format!(
                            "deletion of system exchange '{name}' in vhost '{}' not allowed",
                            self.vname()
                        ),
                    ));
                }
                self.check_perm(
                    crate::auth::permissions::Perm::Configure,
                    crate::auth::permissions::ResourceKind::Exchange,
                    name,
                )?;
                if let Some(ex) = self.vhost.exchange(name) {
                    if d.if_unused && ex.binding_count() > 0 {
                        return Err(AmqpError::precondition(format!(
                            "exchange '{name}' in vhost '{}' in use",
                            self.vname()
                        )));
                    }
                    let gone = self.vhost.delete_exchange(name);
                    self.forget_exchanges(gone).await;
                }
                if !d.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Exchange(ex_m::AMQPMethod::DeleteOk(ex_m::DeleteOk {})),
                    );
                }
                Ok(())
            }
            ex_m::AMQPMethod::Bind(b) => {
                self.check_perm(
                    crate::auth::permissions::Perm::Write,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.destination.as_str(),
                )?;
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.source.as_str(),
                )?;
                let (src, dst) = self.e2e_pair(b.source.as_str(), b.destination.as_str())?;
                self.check_topic(
                    &src,
                    crate::auth::permissions::Perm::Read,
                    b.routing_key.as_str(),
                )?;
                let binding = Binding {
                    dest: Destination::Exchange(dst),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments.clone(),
                };
                if src.bind(binding.clone())? {
                    self.persist_binding(&src, &binding, true).await?;
                }
                if !b.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Exchange(ex_m::AMQPMethod::BindOk(ex_m::BindOk {})),
                    );
                }
                Ok(())
            }
            ex_m::AMQPMethod::Unbind(b) => {
                self.check_perm(
                    crate::auth::permissions::Perm::Write,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.destination.as_str(),
                )?;
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.source.as_str(),
                )?;
                let (src, dst) = self.e2e_pair(b.source.as_str(), b.destination.as_str())?;
                self.check_topic(
                    &src,
                    crate::auth::permissions::Perm::Read,
                    b.routing_key.as_str(),
                )?;
                let (removed, left) = src.unbind(
                    false,
                    b.destination.as_str(),
                    b.routing_key.as_str(),
                    &b.arguments,
                );
                if removed {
                    let binding = Binding {
                        dest: Destination::Exchange(dst),
                        routing_key: b.routing_key.to_string(),
                        arguments: b.arguments.clone(),
                    };
                    self.persist_binding(&src, &binding, false).await?;
                }
                if removed && left == 0 && src.auto_delete {
                    let gone = self.vhost.delete_exchange(&src.name);
                    self.forget_exchanges(gone).await;
                }
                if !b.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Exchange(ex_m::AMQPMethod::UnbindOk(ex_m::UnbindOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::new(
                code::COMMAND_INVALID,
                "unexpected exchange method from client",
            )),
        }
    }

    /// Records (or forgets) a binding in the store when it is durable.
    async fn persist_binding(
        &self,
        src: &Exchange,
        b: &Binding,
        add: bool,
    ) -> Result<(), AmqpError> {
        let Some(st) = &self.broker.storage else {
            return Ok(());
        };
        if !crate::broker::persist::binding_is_durable(src, &b.dest) {
            return Ok(());
        }
        let def = crate::broker::persist::BindingDef::of(self.vname(), &src.name, b);
        let r = if add {
            st.put_binding(&def).await
        } else {
            st.delete_binding(&def).await
        };
        r.map_err(|e| {
            AmqpError::internal(format!("cannot record binding from '{}': {e}", src.name))
        })
    }

    /// Forgets deleted durable exchanges in the store.
    async fn forget_exchanges(&self, names: Vec<String>) {
        let Some(st) = &self.broker.storage else {
            return;
        };
        for n in names {
            if let Err(e) = st.delete_exchange(self.vname(), &n).await {
                tracing::error!(
                    "cannot remove exchange '{n}' from the definitions store: {e}; it may reappear after a restart"
                );
            }
        }
    }

    fn e2e_pair(
        &self,
        source: &str,
        destination: &str,
    ) -> Result<(Arc<Exchange>, Arc<Exchange>), AmqpError> {
        if source.is_empty() || destination.is_empty() {
            return Err(AmqpError::new(
                code::ACCESS_REFUSED,
                "operation not permitted on the default exchange",
            ));
        }
        let dst = self.find_exchange(destination)?;
        let src = self.find_exchange(source)?;
        Ok((src, dst))
    }

    async fn queue_method(&mut self, ch: u16, m: q_m::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            q_m::AMQPMethod::Declare(d) => self.queue_declare(ch, d).await,
            q_m::AMQPMethod::Bind(b) => {
                let q = self.find_queue(ch, b.queue.as_str())?;
                self.check_perm(
                    crate::auth::permissions::Perm::Write,
                    crate::auth::permissions::ResourceKind::Queue,
                    &q.name,
                )?;
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.exchange.as_str(),
                )?;
                let ex = self.find_exchange(b.exchange.as_str())?;
                if ex.name.is_empty() {
                    return Err(AmqpError::new(
                        code::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.check_topic(
                    &ex,
                    crate::auth::permissions::Perm::Read,
                    b.routing_key.as_str(),
                )?;
                let binding = Binding {
                    dest: Destination::Queue(q),
                    routing_key: b.routing_key.to_string(),
                    arguments: b.arguments.clone(),
                };
                if ex.bind(binding.clone())? {
                    self.persist_binding(&ex, &binding, true).await?;
                }
                if !b.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Queue(q_m::AMQPMethod::BindOk(q_m::BindOk {})),
                    );
                }
                Ok(())
            }
            q_m::AMQPMethod::Unbind(b) => {
                let q = self.find_queue(ch, b.queue.as_str())?;
                self.check_perm(
                    crate::auth::permissions::Perm::Write,
                    crate::auth::permissions::ResourceKind::Queue,
                    &q.name,
                )?;
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Exchange,
                    b.exchange.as_str(),
                )?;
                let ex = self.find_exchange(b.exchange.as_str())?;
                if ex.name.is_empty() {
                    return Err(AmqpError::new(
                        code::ACCESS_REFUSED,
                        "operation not permitted on the default exchange",
                    ));
                }
                self.check_topic(
                    &ex,
                    crate::auth::permissions::Perm::Read,
                    b.routing_key.as_str(),
                )?;
                let (removed, left) =
                    ex.unbind(true, &q.name, b.routing_key.as_str(), &b.arguments);
                if removed {
                    let binding = Binding {
                        dest: Destination::Queue(q.clone()),
                        routing_key: b.routing_key.to_string(),
                        arguments: b.arguments.clone(),
                    };
                    self.persist_binding(&ex, &binding, false).await?;
                }
                if removed && left == 0 && ex.auto_delete {
                    let gone = self.vhost.delete_exchange(&ex.name);
                    self.forget_exchanges(gone).await;
                }
                self.write_method(
                    ch,
                    AMQPClass::Queue(q_m::AMQPMethod::UnbindOk(q_m::UnbindOk {})),
                );
                Ok(())
            }
            q_m::AMQPMethod::Purge(p) => {
                let q = self.find_queue(ch, p.queue.as_str())?;
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Queue,
                    &q.name,
                )?;
                let (tx, rx) = oneshot::channel();
                let n = if q.send(QueueCmd::Purge { reply: tx }).await {
                    rx.await.unwrap_or(0)
                } else {
                    0
                };
                if !p.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Queue(q_m::AMQPMethod::PurgeOk(q_m::PurgeOk {
                            message_count: n as u32,
                        })),
                    );
                }
                Ok(())
            }
            q_m::AMQPMethod::Delete(d) => {
                let name = if d.queue.as_str().is_empty() {
                    self.chan(ch)?.last_queue.clone().unwrap_or_default()
                } else {
                    d.queue.to_string()
                };
                self.check_perm(
                    crate::auth::permissions::Perm::Configure,
                    crate::auth::permissions::ResourceKind::Queue,
                    &name,
                )?;
                let mut count = 0;
                if let Some(q) = self.vhost.queue(&name) {
                    self.check_exclusive(&q)?;
                    if q.home.is_some() {
                        crate::cluster::classic::check_home(&self.broker, &q)?;
                    }
                    let (tx, rx) = oneshot::channel();
                    if q.send(QueueCmd::Delete {
                        if_unused: d.if_unused,
                        if_empty: d.if_empty,
                        reply: Some(tx),
                    })
                    .await
                    {
                        count = rx.await.unwrap_or(Ok(0))?;
                    }
                    self.exclusive_queues.retain(|x| x.id != q.id);
                }
                if !d.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Queue(q_m::AMQPMethod::DeleteOk(q_m::DeleteOk {
                            message_count: count as u32,
                        })),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::new(
                code::COMMAND_INVALID,
                "unexpected queue method from client",
            )),
        }
    }

    async fn queue_declare(&mut self, ch: u16, d: q_m::Declare) -> Result<(), AmqpError> {
        let vname = self.vname().to_string();
        let mut name = d.queue.to_string();
        if d.passive {
            if name == DIRECT_REPLY_TO {
                self.write_declare_ok(ch, &name, 0, 0, d.nowait);
                return Ok(());
            }
            let q = self.find_queue(ch, &name)?;
            let c = q.stats().await.unwrap_or_default();
            self.chan(ch)?.last_queue = Some(q.name.clone());
            self.write_declare_ok(ch, &q.name, c.ready, c.consumers, d.nowait);
            return Ok(());
        }
        if name.is_empty() {
            name = format!("amq.gen-{}", random_token());
        } else if name.starts_with("amq.") {
            return Err(AmqpError::new(
                code::ACCESS_REFUSED,
                format!("queue name '{name}' contains reserved prefix 'amq.*'"),
            ));
        }
        self.check_perm(
            crate::auth::permissions::Perm::Configure,
            crate::auth::permissions::ResourceKind::Queue,
            &name,
        )?;
        let spec = crate::broker::declare::NewQueue {
            name: name.clone(),
            durable: d.durable,
            exclusive_owner: d.exclusive.then_some(self.id),
            auto_delete: d.auto_delete,
            arguments: d.arguments.clone(),
        };
        let (q, created) =
            crate::broker::declare::declare_queue(&self.broker, &self.vhost, spec).await?;
        if q.home.is_some() {
            crate::cluster::classic::check_home(&self.broker, &q)?;
        }
        if created && d.exclusive {
            self.exclusive_queues.push(q.clone());
        }
        self.check_exclusive(&q)?;
        let ineq = |arg: &str, got: bool, cur: bool| {
            AmqpError::precondition(format!(
                "inequivalent arg '{arg}' for queue '{name}' in vhost '{vname}': received '{got}' but current is '{cur}'"
            ))
        };
        if q.durable != d.durable {
            return Err(ineq("durable", d.durable, q.durable));
        }
        if q.auto_delete != d.auto_delete {
            return Err(ineq("auto_delete", d.auto_delete, q.auto_delete));
        }
        if q.exclusive_owner.is_some() != d.exclusive {
            return Err(AmqpError::queue_locked(&vname, &name));
        }
        check_equivalent(&q.arguments, &d.arguments, &name, &vname)?;
        // A redeclare counts as use (x-expires).
        let _ = q.tx.try_send(QueueCmd::Touch);
        let c = q.stats().await.unwrap_or_default();
        self.chan(ch)?.last_queue = Some(name.clone());
        self.write_declare_ok(ch, &name, c.ready, c.consumers, d.nowait);
        Ok(())
    }

    fn write_declare_ok(
        &mut self,
        ch: u16,
        name: &str,
        messages: u64,
        consumers: u64,
        nowait: bool,
    ) {
        if nowait {
            return;
        }
        self.write_method(
            ch,
            AMQPClass::Queue(q_m::AMQPMethod::DeclareOk(q_m::DeclareOk {
                queue: short(name),
                message_count: messages.min(u64::from(u32::MAX)) as u32,
                consumer_count: consumers.min(u64::from(u32::MAX)) as u32,
            })),
        );
    }

    async fn basic_method(&mut self, ch: u16, m: basic::AMQPMethod) -> Result<(), AmqpError> {
        match m {
            basic::AMQPMethod::Qos(q) => {
                // prefetch_size is accepted only as 0, as in RabbitMQ.
                if q.prefetch_count > 0 || !q.global {
                    let chan = self.chan(ch)?;
                    if q.global {
                        let shared = chan
                            .shared
                            .get_or_insert_with(|| Arc::new(SharedLimit::default()));
                        shared
                            .limit
                            .store(u32::from(q.prefetch_count), Ordering::Relaxed);
                    } else {
                        chan.prefetch = q.prefetch_count;
                    }
                } else if let Some(s) = &self.chan(ch)?.shared {
                    s.limit.store(0, Ordering::Relaxed);
                }
                self.kick_consumed_queues(ch).await;
                self.write_method(
                    ch,
                    AMQPClass::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})),
                );
                Ok(())
            }
            basic::AMQPMethod::Consume(c) => self.basic_consume(ch, c).await,
            basic::AMQPMethod::Cancel(c) => {
                let tag = c.consumer_tag.to_string();
                let chan = self.chan(ch)?;
                if let Some(dr) = chan.direct_reply.as_ref().filter(|d| d.tag == tag) {
                    let key = dr.key.clone();
                    chan.direct_reply = None;
                    self.broker.direct_reply.remove(&key);
                } else if let Some(entry) = chan.consumers.remove(&tag) {
                    chan.stats.remove_consumer(Some(&tag));
                    let (tx, rx) = oneshot::channel();
                    if entry
                        .queue
                        .send(QueueCmd::Cancel {
                            consumer: entry.id,
                            reply: Some(tx),
                        })
                        .await
                    {
                        let _ = rx.await;
                    }
                }
                if !c.nowait {
                    self.write_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::CancelOk(basic::CancelOk {
                            consumer_tag: c.consumer_tag,
                        })),
                    );
                }
                Ok(())
            }
            basic::AMQPMethod::Get(g) => {
                let q = self.find_queue(ch, g.queue.as_str())?;
                if q.is_stream() {
                    return Err(AmqpError::new(
                        code::NOT_IMPLEMENTED,
                        format!(
                            "basic.get not supported by stream queues queue '{}' in vhost '{}'",
                            q.name, q.vhost
                        ),
                    ));
                }
                self.check_perm(
                    crate::auth::permissions::Perm::Read,
                    crate::auth::permissions::ResourceKind::Queue,
                    &q.name,
                )?;
                let (tx, rx) = oneshot::channel();
                let owner = Owner {
                    conn: self.id,
                    channel: ch,
                };
                let got = if q
                    .send(QueueCmd::Get {
                        owner,
                        no_ack: g.no_ack,
                        reply: tx,
                    })
                    .await
                {
                    rx.await.ok().flatten()
                } else {
                    None
                };
                self.msg_stats
                    .got(&q, got.as_ref().map(|(e, _)| e), g.no_ack);
                match got {
                    None => {
                        self.write_method(
                            ch,
                            AMQPClass::Basic(basic::AMQPMethod::GetEmpty(basic::GetEmpty {})),
                        );
                    }
                    Some((env, left)) => {
                        let Some(m) = env.msg.clone() else {
                            return Err(AmqpError::internal(format!(
                                "message body of queue '{}' could not be read",
                                q.name
                            )));
                        };
                        let chan = self.chan(ch)?;
                        let dtag = chan.next_tag;
                        chan.next_tag += 1;
                        if !g.no_ack {
                            chan.touched.entry(q.id).or_insert_with(|| q.clone());
                            chan.unacked.push_back(UnackedEntry {
                                tag: dtag,
                                queue: q.clone(),
                                id: env.id,
                                shared: false,
                                consumer: 0,
                                revoked: false,
                            });
                        }
                        frame::write_get_ok(
                            &mut self.out,
                            ch,
                            dtag,
                            env.redelivered,
                            &m.exchange,
                            &m.routing_key,
                            left.min(u64::from(u32::MAX)) as u32,
                        );
                        frame::write_header(
                            &mut self.out,
                            ch,
                            m.body.len() as u64,
                            &m.raw_properties,
                        );
                        frame::write_body(&mut self.out, ch, &m.body, self.frame_max);
                    }
                }
                Ok(())
            }
            basic::AMQPMethod::Ack(a) => {
                self.settle(ch, a.delivery_tag, a.multiple, Outcome::Ack)
                    .await
            }
            basic::AMQPMethod::Reject(r) => {
                let o = if r.requeue {
                    Outcome::Requeue
                } else {
                    Outcome::Discard
                };
                self.settle(ch, r.delivery_tag, false, o).await
            }
            basic::AMQPMethod::Nack(n) => {
                let o = if n.requeue {
                    Outcome::Requeue
                } else {
                    Outcome::Discard
                };
                self.settle(ch, n.delivery_tag, n.multiple, o).await
            }
            basic::AMQPMethod::Recover(_) | basic::AMQPMethod::RecoverAsync(_) => {
                let is_sync = matches!(m, basic::AMQPMethod::Recover(_));
                self.settle(ch, 0, true, Outcome::Requeue).await?;
                if is_sync {
                    self.write_method(
                        ch,
                        AMQPClass::Basic(basic::AMQPMethod::RecoverOk(basic::RecoverOk {})),
                    );
                }
                Ok(())
            }
            _ => Err(AmqpError::new(
                code::COMMAND_INVALID,
                "unexpected basic method from client",
            )),
        }
    }

    async fn settle(
        &mut self,
        ch: u16,
        tag: u64,
        multiple: bool,
        outcome: Outcome,
    ) -> Result<(), AmqpError> {
        let chan = self.chan(ch)?;
        let entries = chan.take_unacked(tag, multiple)?;
        let any_shared = entries.iter().any(|e| e.shared);
        if let Some(t) = chan.tx.as_mut() {
            if outcome != Outcome::Requeue || tag != 0 {
                t.settles.extend(entries.into_iter().map(|e| (e, outcome)));
                return Ok(());
            }
        }
        for e in entries {
            self.settle_entry(ch, e, outcome);
        }
        if any_shared {
            self.flush_pending().await.map_err(AmqpError::internal)?;
            self.kick_consumed_queues(ch).await;
        }
        Ok(())
    }

    async fn kick_consumed_queues(&mut self, ch: u16) {
        let Some(chan) = self.channels.get(&ch) else {
            return;
        };
        let queues: Vec<Arc<QueueRef>> = chan.consumers.values().map(|c| c.queue.clone()).collect();
        for q in queues {
            let _ = q.send(QueueCmd::Kick).await;
        }
    }

    async fn basic_consume(&mut self, ch: u16, c: basic::Consume) -> Result<(), AmqpError> {
        let mut tag = c.consumer_tag.to_string();
        if tag.is_empty() {
            tag = format!("amq.ctag-{}", random_token());
        }
        let chan = self.chan(ch)?;
        if chan.consumers.contains_key(&tag)
            || chan.direct_reply.as_ref().is_some_and(|d| d.tag == tag)
        {
            return Err(AmqpError::new(
                code::NOT_ALLOWED,
                format!("attempt to reuse consumer tag '{tag}'"),
            ));
        }
        if c.queue.as_str() == DIRECT_REPLY_TO {
            if !c.no_ack {
                return Err(AmqpError::precondition("reply consumer cannot acknowledge"));
            }
            if chan.direct_reply.is_some() {
                return Err(AmqpError::precondition("reply consumer already set"));
            }
            let key = format!("{DIRECT_REPLY_TO}.{}", random_token());
            chan.direct_reply = Some(DirectReply {
                tag: tag.clone(),
                key: key.clone(),
            });
            self.broker.direct_reply.insert(
                key,
                ReplyTarget {
                    conn: self.tx.clone(),
                    channel: ch,
                },
            );
        } else {
            let q = self.find_queue(ch, c.queue.as_str())?;
            self.check_perm(
                crate::auth::permissions::Perm::Read,
                crate::auth::permissions::ResourceKind::Queue,
                &q.name,
            )?;
            let id = self.broker.next_id();
            let conn_id = self.id;
            let chan = self.chan(ch)?;
            let spec = ConsumerSpec {
                id,
                owner: Owner {
                    conn: conn_id,
                    channel: ch,
                },
                prefetch: u32::from(chan.prefetch),
                no_ack: c.no_ack,
                exclusive: c.exclusive,
                shared: chan.shared.clone(),
                flow_window: self.broker.config.queue.delivery_window,
                priority: 0,
                timeout: None,
            };
            let (tx, rx) = oneshot::channel();
            let sent = q
                .send(QueueCmd::Consume {
                    spec,
                    conn: self.tx.clone(),
                    tag: tag.clone().into(),
                    reply: tx,
                    args: c.arguments.clone(),
                })
                .await;
            if !sent {
                return Err(AmqpError::queue_not_found(self.vname(), &q.name));
            }
            match rx.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(AmqpError::queue_not_found(self.vname(), &q.name)),
            }
            let chan = self.chan(ch)?;
            chan.touched.entry(q.id).or_insert_with(|| q.clone());
            chan.stats.add_consumer(crate::broker::conns::ConsumerMeta {
                id,
                tag: tag.clone(),
                queue_id: q.id,
                queue: q.name.clone(),
                vhost: q.vhost.clone(),
                single_active: q.args.single_active_consumer,
                ack_required: !c.no_ack,
                exclusive: c.exclusive,
                prefetch_count: u32::from(chan.prefetch),
                arguments: c.arguments.clone(),
            });
            chan.consumers.insert(
                tag.clone(),
                ConsumerEntry {
                    id,
                    queue: q,
                    no_ack: c.no_ack,
                },
            );
        }
        if !c.nowait {
            self.write_method(
                ch,
                AMQPClass::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                    consumer_tag: short(&tag),
                })),
            );
        }
        Ok(())
    }
}

/// The hand-written basic.publish decoder, exposed for fuzzing.
pub fn fuzz_publish(payload: &Bytes) -> bool {
    parse_publish(payload).is_ok()
}
