//! The connection task: one per client, owning the socket and every channel
//! on it.
//!
//! It reads bytes, cuts frames and hands each to its channel; it receives
//! deliveries and confirms from queue actors on its inbox; and it coalesces
//! everything it has to send into one buffer written with as few syscalls as
//! possible. Reading and writing are both non-blocking in one `select!`, so
//! a client that stops reading cannot stop us from reading its frames (up to
//! a bound, after which we stop reading too). Errors become wire replies here
//! and only here: a soft error closes its channel, a hard one the connection.

use super::channel::Channel;
use super::error::{AmqpError, code};
use super::frame::{self, RawFrame};
use super::socket::Socket;
use crate::broker::{Broker, ConnCmd, ConnTx, VHost};
use crate::queue::core::{ConsumerId, MsgId, Outcome, Owner};
use crate::queue::message::Message;
use crate::queue::{ConfirmTo, QueueCmd, QueueRef};
use amq_protocol::protocol::{AMQPClass, connection as conn_m};
use amq_protocol::types::{AMQPValue, FieldTable, LongString};
use bytes::BytesMut;
use std::collections::HashMap;

/// Hashes a channel number as itself, spread by a multiply: several channel
/// lookups happen per published message, and SipHash for a u16 showed in
/// profiles.
#[derive(Debug, Default, Clone, Copy)]
pub struct ChannelHasher(u64);

impl std::hash::Hasher for ChannelHasher {
    fn finish(&self) -> u64 {
        self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8) | u64::from(*b);
        }
    }

    fn write_u16(&mut self, n: u16) {
        self.0 = u64::from(n);
    }
}

/// A connection's channels by number.
pub(crate) type ChannelMap = HashMap<u16, Channel, std::hash::BuildHasherDefault<ChannelHasher>>;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::{debug, info, warn};

/// Stop taking deliveries from the inbox while this much is unwritten.
const OUT_SOFT_LIMIT: usize = 1 << 20;
/// Stop reading the socket while this much is unwritten.
const OUT_HARD_LIMIT: usize = 8 << 20;
/// How long a throttled publisher waits between reads (flow control): it
/// starts short and doubles while the queue stays over its threshold.
const FLOW_PAUSE_MIN: Duration = Duration::from_millis(1);
/// The longest pause: a publisher is slowed, never stopped.
const FLOW_PAUSE_MAX: Duration = Duration::from_millis(500);
/// How long we wait for close-ok after sending connection.close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(3);

/// What the client told us it supports (client-properties capabilities).
#[derive(Debug, Default, Clone, Copy)]
pub struct ClientCaps {
    /// Server-initiated basic.cancel.
    pub consumer_cancel_notify: bool,
    /// connection.blocked / unblocked.
    pub connection_blocked: bool,
}

/// Publishes and settlements gathered while processing one read, sent to
/// each queue as one command per queue.
#[derive(Default)]
pub(crate) struct Pending {
    stores: Vec<PendingStore>,
    publishes: Vec<PendingPublish>,
    settles: Vec<(Arc<QueueRef>, Outcome, Vec<MsgId>)>,
    credits: Vec<(Arc<QueueRef>, ConsumerId, u32)>,
}

/// A persistent message bound for durable queues: written to the store
/// before the queues see it; its confirm waits for the group commit.
pub(crate) struct PendingStore {
    pub gid: u64,
    pub queues: Vec<u64>,
    pub msg: Arc<Message>,
    pub confirm: Option<(u16, u64)>,
}

struct PendingPublish {
    channel: u16,
    queue: Arc<QueueRef>,
    msgs: Vec<(Arc<Message>, u64)>,
    seqs: Vec<u64>,
    confirm: bool,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.stores.is_empty()
            && self.publishes.is_empty()
            && self.settles.is_empty()
            && self.credits.is_empty()
    }
}

/// One client connection.
pub(crate) struct Connection {
    pub id: u64,
    pub broker: Arc<Broker>,
    pub peer: SocketAddr,
    stream: Socket,
    inbuf: BytesMut,
    pub out: BytesMut,
    pub frame_max: u32,
    pub channel_max: u16,
    heartbeat: u16,
    pub vhost: Arc<VHost>,
    pub user: String,
    pub channels: ChannelMap,
    pub tx: ConnTx,
    rx: mpsc::UnboundedReceiver<ConnCmd>,
    pub caps: ClientCaps,
    pub pending: Pending,
    pub pending_undeliverable: Vec<(Arc<QueueRef>, MsgId)>,
    pub exclusive_queues: Vec<Arc<QueueRef>>,
    closing: Option<Instant>,
    last_read: Instant,
    last_write: Instant,
    /// Queues this connection published to in its last batch (flow control).
    recent_targets: Vec<Arc<QueueRef>>,
    /// While a recent target is overloaded, reads wait until this instant.
    throttle_until: Option<Instant>,
    throttle_pause: Duration,
    /// The client sent connection.close (we answered close-ok).
    client_closed: bool,
    /// The last read filled most of the buffer: read in bigger chunks.
    busy_reads: bool,
    /// Blocked by a resource alarm (publishers only).
    blocked: bool,
    alarm_reason: Option<String>,
    /// Has published at least once: only publishers stop being read while
    /// blocked, as in RabbitMQ.
    pub has_published: bool,
    /// Open channels as shown by management (broker.connections).
    channel_list: crate::broker::conns::ChannelList,
    /// Message totals (overview), published to `conn_stats` once per turn.
    pub msg_stats: crate::mgmt::stats::LocalStats,
    conn_stats: Arc<crate::mgmt::stats::MsgCounters>,
    /// The user's topic permissions in this vhost (see `auth::topic`).
    pub(crate) topic_perms: crate::auth::topic::TopicCache,
}

/// Serves one accepted socket until it closes. Never panics on client input.
/// `peer` and `local` are the TCP addresses (for a TLS connection, those of
/// the TCP socket the TLS session runs on, not of the internal socket pair).
pub async fn serve(
    mut stream: Socket,
    peer: SocketAddr,
    local: SocketAddr,
    id: u64,
    broker: Arc<Broker>,
) {
    let timeout = Duration::from_millis(broker.config.amqp.handshake_timeout_ms);
    let hs = match tokio::time::timeout(timeout, handshake(&mut stream, peer, &broker)).await {
        Ok(Ok(hs)) => hs,
        Ok(Err(why)) => {
            info!("connection closed during handshake: {why}");
            return;
        }
        Err(_) => {
            info!("client did not complete the AMQP handshake within {timeout:?}; closing");
            return;
        }
    };
    tracing::Span::current().record("user", hs.user.as_str());
    tracing::Span::current().record("vhost", hs.vhost.name.as_str());
    info!(
        frame_max = hs.frame_max,
        channel_max = hs.channel_max,
        heartbeat = hs.heartbeat,
        "connection open (user '{}', vhost '{}')",
        hs.user,
        hs.vhost.name
    );
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let channel_list = Arc::new(std::sync::Mutex::new(Vec::new()));
    let conn_stats = Arc::new(crate::mgmt::stats::MsgCounters::default());
    let topic_perms = crate::auth::topic::TopicCache::load(&broker.users, &hs.user, &hs.vhost.name);
    broker.connections.insert(
        id,
        crate::broker::conns::ConnInfo {
            id,
            name: crate::broker::conns::ConnInfo::name_of(peer, local),
            peer,
            local,
            user: hs.user.clone(),
            vhost: hs.vhost.name.clone(),
            client_properties: hs.client_properties,
            connected_at: crate::broker::conns::now_ms(),
            frame_max: hs.frame_max,
            channel_max: hs.channel_max,
            heartbeat: hs.heartbeat,
            channels: channel_list.clone(),
            stats: conn_stats.clone(),
            tx: tx.clone(),
        },
    );
    let mut conn = Connection {
        id,
        broker,
        peer,
        stream,
        // Idle connections should cost little: buffers grow on demand.
        inbuf: if hs.leftover.is_empty() {
            BytesMut::new()
        } else {
            hs.leftover
        },
        out: BytesMut::new(),
        frame_max: hs.frame_max,
        channel_max: hs.channel_max,
        heartbeat: hs.heartbeat,
        vhost: hs.vhost,
        user: hs.user,
        channels: ChannelMap::default(),
        tx,
        rx,
        caps: hs.caps,
        pending: Pending::default(),
        pending_undeliverable: Vec::new(),
        exclusive_queues: Vec::new(),
        closing: None,
        last_read: now,
        last_write: now,
        recent_targets: Vec::new(),
        throttle_until: None,
        throttle_pause: Duration::ZERO,
        client_closed: false,
        busy_reads: false,
        blocked: false,
        alarm_reason: None,
        has_published: false,
        channel_list,
        msg_stats: Default::default(),
        conn_stats,
        topic_perms,
    };
    let why = conn.run().await;
    conn.cleanup().await;
    // Its totals stay in the overview after it is gone.
    conn.msg_stats.publish_to(&conn.conn_stats);
    conn.broker.mgmt_stats.retired.add(&conn.msg_stats.counts);
    conn.broker.connections.remove(&id);
    info!(peer = %conn.peer, user = %conn.user, "connection closed: {why}");
}

struct Handshake {
    frame_max: u32,
    channel_max: u16,
    heartbeat: u16,
    vhost: Arc<VHost>,
    user: String,
    caps: ClientCaps,
    leftover: BytesMut,
    client_properties: FieldTable,
}

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::default();
    for c in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(c.into(), AMQPValue::Boolean(true));
    }
    let mut p = FieldTable::default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v.as_bytes().to_vec()));
    p.insert("product".into(), s("Warren"));
    p.insert("version".into(), s(env!("CARGO_PKG_VERSION")));
    p.insert("platform".into(), s("Rust"));
    p.insert("copyright".into(), s("Warren contributors"));
    p.insert(
        "information".into(),
        s("An AMQP 0-9-1 broker for RabbitMQ clients"),
    );
    p.insert("cluster_name".into(), s("warren"));
    p.insert("capabilities".into(), AMQPValue::FieldTable(caps));
    p
}

/// Reads frames during the handshake (before channels exist).
struct HsReader<'a> {
    stream: &'a mut Socket,
    buf: BytesMut,
}

impl HsReader<'_> {
    async fn method(&mut self) -> Result<AMQPClass, String> {
        loop {
            match frame::cut_frame(&mut self.buf, 131_072) {
                Ok(Some(f)) => match f.kind {
                    frame::FRAME_HEARTBEAT => continue,
                    frame::FRAME_METHOD if f.channel == 0 => {
                        return frame::parse_method(&f.payload).map_err(|e| e.text);
                    }
                    k => {
                        return Err(format!(
                            "unexpected frame type {k} on channel {} during handshake",
                            f.channel
                        ));
                    }
                },
                Ok(None) => {}
                Err(e) => return Err(e.text),
            }
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(4096);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("client closed the socket".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("read error: {e}")),
            }
        }
    }
}

async fn send_close(stream: &mut Socket, err: &AmqpError) {
    let mut out = BytesMut::new();
    frame::write_method(
        &mut out,
        0,
        AMQPClass::Connection(conn_m::AMQPMethod::Close(conn_m::Close {
            reply_code: err.code,
            reply_text: err.reply_text(),
            class_id: err.class_id,
            method_id: err.method_id,
        })),
    );
    let _ = stream.write_all(&out).await;
    // Give the client a moment to read it and answer close-ok.
    let mut scratch = [0u8; 512];
    let _ = tokio::time::timeout(Duration::from_millis(500), stream.read(&mut scratch)).await;
}

fn parse_credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = parts.next()?;
            let pass = parts.next()?;
            Some((
                String::from_utf8(user.to_vec()).ok()?,
                String::from_utf8(pass.to_vec()).ok()?,
            ))
        }
        "AMQPLAIN" => {
            let mut framed = (response.len() as u32).to_be_bytes().to_vec();
            framed.extend_from_slice(response);
            let (_, table) = amq_protocol::types::parsing::parse_field_table(&framed[..]).ok()?;
            let get = |k: &str| {
                table
                    .inner()
                    .get(k)
                    .and_then(crate::broker::headers::value_str)
            };
            Some((get("LOGIN")?, get("PASSWORD")?))
        }
        _ => None,
    }
}

async fn handshake(
    stream: &mut Socket,
    peer: SocketAddr,
    broker: &Arc<Broker>,
) -> Result<Handshake, String> {
    let mut header = [0u8; 8];
    stream
        .read_exact(&mut header)
        .await
        .map_err(|e| format!("no protocol header: {e}"))?;
    if &header != frame::PROTOCOL_HEADER {
        let _ = stream.write_all(frame::PROTOCOL_HEADER).await;
        let _ = stream.shutdown().await;
        return Err(format!(
            "bad protocol header {header:?}; answered with AMQP 0-9-1's"
        ));
    }
    let mut out = BytesMut::new();
    frame::write_method(
        &mut out,
        0,
        AMQPClass::Connection(conn_m::AMQPMethod::Start(conn_m::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: server_properties(),
            mechanisms: "PLAIN AMQPLAIN".into(),
            locales: "en_US".into(),
        })),
    );
    stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut rd = HsReader {
        stream,
        // Handshake frames are a few hundred bytes; grows if needed.
        buf: BytesMut::with_capacity(1024),
    };

    let start_ok = match rd.method().await? {
        AMQPClass::Connection(conn_m::AMQPMethod::StartOk(s)) => s,
        other => {
            let e = AmqpError::new(code::COMMAND_INVALID, "expected connection.start-ok")
                .on(other.get_amqp_class_id(), other.get_amqp_method_id());
            send_close(rd.stream, &e).await;
            return Err(e.text);
        }
    };
    let mut caps = ClientCaps::default();
    if let Some(AMQPValue::FieldTable(c)) = start_ok.client_properties.inner().get("capabilities") {
        let on = |k: &str| matches!(c.inner().get(k), Some(AMQPValue::Boolean(true)));
        caps.consumer_cancel_notify = on("consumer_cancel_notify");
        caps.connection_blocked = on("connection.blocked");
    }
    let mechanism = start_ok.mechanism.as_str().to_string();
    if mechanism != "PLAIN" && mechanism != "AMQPLAIN" {
        let e = AmqpError::new(
            code::COMMAND_INVALID,
            format!("unknown authentication mechanism '{mechanism}'"),
        )
        .on(10, 11);
        send_close(rd.stream, &e).await;
        return Err(e.text);
    }
    let refused = || {
        AmqpError::new(
            code::ACCESS_REFUSED,
            format!("Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."),
        )
        .on(10, 11)
    };
    let Some((user, pass)) = parse_credentials(&mechanism, start_ok.response.as_bytes()) else {
        send_close(rd.stream, &refused()).await;
        return Err(format!("malformed {mechanism} credentials"));
    };
    if let Err(why) = broker.users.login(&user, &pass, peer.ip().is_loopback()) {
        let detail = match why {
            crate::auth::LoginError::BadCredentials => {
                format!("user '{user}': invalid credentials")
            }
            crate::auth::LoginError::LoopbackOnly => {
                format!("user '{user}' can only connect via localhost (it is in loopback_users)")
            }
        };
        warn!("login refused: {detail}");
        send_close(rd.stream, &refused()).await;
        return Err(detail);
    }

    let cfg = &broker.config.amqp;
    let mut out = BytesMut::new();
    frame::write_method(
        &mut out,
        0,
        AMQPClass::Connection(conn_m::AMQPMethod::Tune(conn_m::Tune {
            channel_max: cfg.channel_max,
            frame_max: cfg.frame_max,
            heartbeat: cfg.heartbeat,
        })),
    );
    rd.stream.write_all(&out).await.map_err(|e| e.to_string())?;
    let tune_ok = match rd.method().await? {
        AMQPClass::Connection(conn_m::AMQPMethod::TuneOk(t)) => t,
        other => {
            let e = AmqpError::new(code::COMMAND_INVALID, "expected connection.tune-ok")
                .on(other.get_amqp_class_id(), other.get_amqp_method_id());
            send_close(rd.stream, &e).await;
            return Err(e.text);
        }
    };
    let frame_max = if tune_ok.frame_max == 0 {
        cfg.frame_max
    } else {
        tune_ok.frame_max
    };
    let channel_max = if tune_ok.channel_max == 0 {
        cfg.channel_max
    } else {
        tune_ok.channel_max
    };
    let bad = if frame_max < 4096 {
        Some(format!("frame_max={frame_max} < 4096 min size"))
    } else if frame_max > cfg.frame_max {
        Some(format!(
            "frame_max={frame_max} > {} max size",
            cfg.frame_max
        ))
    } else if channel_max > cfg.channel_max {
        Some(format!(
            "negotiated channel_max = {channel_max} higher than the maximum allowed value ({})",
            cfg.channel_max
        ))
    } else {
        None
    };
    if let Some(why) = bad {
        let e = AmqpError::new(code::NOT_ALLOWED, why).on(10, 31);
        send_close(rd.stream, &e).await;
        return Err(e.text);
    }

    let open = match rd.method().await? {
        AMQPClass::Connection(conn_m::AMQPMethod::Open(o)) => o,
        other => {
            let e = AmqpError::new(code::COMMAND_INVALID, "expected connection.open")
                .on(other.get_amqp_class_id(), other.get_amqp_method_id());
            send_close(rd.stream, &e).await;
            return Err(e.text);
        }
    };
    let vhost_name = open.virtual_host.as_str();
    let vhost = match broker.vhost(vhost_name) {
        Some(v) if broker.users.can_access(&user, vhost_name) => v,
        Some(_) => {
            let e = AmqpError::new(
                code::NOT_ALLOWED,
                format!("access to vhost '{vhost_name}' refused for user '{user}'"),
            )
            .on(10, 40);
            send_close(rd.stream, &e).await;
            return Err(e.text);
        }
        None => {
            let e = AmqpError::new(code::NOT_ALLOWED, format!("vhost {vhost_name} not found"))
                .on(10, 40);
            send_close(rd.stream, &e).await;
            return Err(e.text);
        }
    };
    let mut out = BytesMut::new();
    frame::write_method(
        &mut out,
        0,
        AMQPClass::Connection(conn_m::AMQPMethod::OpenOk(conn_m::OpenOk {})),
    );
    rd.stream.write_all(&out).await.map_err(|e| e.to_string())?;
    Ok(Handshake {
        frame_max,
        channel_max,
        heartbeat: tune_ok.heartbeat,
        vhost,
        user,
        caps,
        leftover: rd.buf,
        client_properties: start_ok.client_properties,
    })
}

impl Connection {
    async fn run(&mut self) -> String {
        let mut shutdown = self.broker.shutdown.clone();
        let mut alarm = self.broker.alarm();
        alarm.mark_changed();
        let hb = (self.heartbeat > 0).then(|| Duration::from_secs(u64::from(self.heartbeat)));
        // Grows on first use: an idle connection holds no command buffer.
        let mut cmds: Vec<ConnCmd> = Vec::new();
        // The heartbeat timer keeps its own schedule: other events must not
        // push it back.
        let mut next_tick = Instant::now() + hb.map_or(Duration::from_secs(3600), |h| h / 2);
        loop {
            // Frames already buffered (e.g. left from the handshake).
            if let Err(why) = self.process_input().await {
                return why;
            }
            if let Err(why) = self.flush_pending().await {
                return why;
            }
            if let Err(e) = self.write_out() {
                return format!("write error: {e}");
            }
            // A quiet connection gives its (small) buffers back at once
            // instead of at the next heartbeat tick, so thousands of idle
            // connections hold none; busy ones keep theirs.
            if !self.busy_reads && self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
                self.inbuf = BytesMut::new();
            }
            if self.out.is_empty() && self.out.capacity() > 0 && self.out.capacity() <= 16 * 1024 {
                self.out = BytesMut::new();
            }
            if let Some(deadline) = self.closing {
                if self.client_closed {
                    return "closed by the client (connection.close)".into();
                }
                if Instant::now() >= deadline {
                    return "client did not answer connection.close in time".into();
                }
            }
            // Flow control: a publisher to a queue that is not keeping up
            // reads one buffer per pause. The pause is bounded, so it can
            // slow a publisher but never deadlock one that also consumes.
            let now = Instant::now();
            let throttled = match self.throttle_until {
                Some(t) if now < t => true,
                Some(_) => {
                    self.throttle_until = None;
                    false
                }
                None => {
                    if self.recent_targets.iter().any(|q| q.is_overloaded()) {
                        // Back off harder the longer the queue stays over.
                        self.throttle_pause =
                            (self.throttle_pause * 2).clamp(FLOW_PAUSE_MIN, FLOW_PAUSE_MAX);
                        self.throttle_until = Some(now + self.throttle_pause);
                        true
                    } else {
                        self.throttle_pause = Duration::ZERO;
                        false
                    }
                }
            };
            let read_ok = self.out.len() < OUT_HARD_LIMIT && !self.blocked && !throttled;
            let inbox_ok = self.out.len() < OUT_SOFT_LIMIT && self.closing.is_none();
            let want_write = !self.out.is_empty();
            let mut tick = match self.closing {
                Some(d) => d.min(next_tick),
                None => next_tick,
            };
            if let Some(t) = self.throttle_until {
                tick = tick.min(t);
            }
            tokio::select! {
                r = self.stream.readable(), if read_ok => {
                    if r.is_err() { return "socket error".into(); }
                    // Small reads for quiet connections, large ones for busy.
                    if self.inbuf.capacity() - self.inbuf.len() < 4096 {
                        self.inbuf.reserve(if self.busy_reads { 64 * 1024 } else { 8 * 1024 });
                    }
                                        let room = self.inbuf.capacity() - self.inbuf.len();
                    // Under flow control, take small bites so a throttled
                    // publisher gets few messages in per pause.
                    let res = if self.throttle_pause > Duration::ZERO {
                        let mut bite = [0u8; 2048];
                        self.stream.try_read(&mut bite).map(|n| {
                            self.inbuf.extend_from_slice(&bite[..n]);
                            n
                        })
                    } else {
                        self.stream.try_read_buf(&mut self.inbuf)
                    };
                    match res {
                        Ok(0) => return "client closed the TCP connection".into(),
                        Ok(n) => {
                            self.last_read = Instant::now();
                            self.busy_reads = n * 4 >= room * 3;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return format!("read error: {e}"),
                    }
                }
                _ = self.stream.writable(), if want_write => {}
                n = self.rx.recv_many(&mut cmds, 64), if inbox_ok => {
                    if n == 0 { return "inbox closed".into(); }
                    for cmd in cmds.drain(..) {
                        if let Err(why) = self.handle_cmd(cmd).await {
                            return why;
                        }
                    }
                }
                _ = tokio::time::sleep_until(tick) => {
                    if Instant::now() < next_tick {
                        // A flow-control pause ended; nothing else is due.
                        continue;
                    }
                    next_tick = Instant::now() + hb.map_or(Duration::from_secs(3600), |h| h / 2);
                    self.shrink_idle_buffers();
                    if let Some(h) = hb {
                        if self.closing.is_none() {
                            if self.last_read.elapsed() > h * 2 {
                                warn!("missed heartbeats from client, timeout: {}s; closing", h.as_secs());
                                return "heartbeat timeout".into();
                            }
                            if self.last_write.elapsed() >= h / 4 {
                                frame::write_heartbeat(&mut self.out);
                            }
                        }
                    }
                }
                r = alarm.changed() => {
                    if r.is_ok() {
                        let reason = alarm.borrow_and_update().clone();
                        self.on_alarm(reason);
                    }
                }
                _ = shutdown.changed() => {
                    if self.closing.is_none() {
                        self.start_close(&AmqpError::new(code::CONNECTION_FORCED, "broker forced connection closure with reason 'shutdown'"));
                    }
                }
            }
        }
    }

    /// Tracks the resource alarm. As in RabbitMQ, only connections that
    /// publish are blocked (and told so); consumers keep going.
    fn on_alarm(&mut self, reason: Option<String>) {
        self.alarm_reason = reason;
        self.update_blocked();
    }

    /// Sends connection.blocked / unblocked when this connection's state
    /// changes (called on alarm changes and on the first publish).
    pub fn update_blocked(&mut self) {
        let should = self.alarm_reason.is_some() && self.has_published;
        if should == self.blocked {
            return;
        }
        self.blocked = should;
        if should {
            info!(
                "resource alarm: no longer reading from this publisher ({})",
                self.alarm_reason.as_deref().unwrap_or("")
            );
        }
        if !self.caps.connection_blocked {
            return;
        }
        match &self.alarm_reason {
            Some(r) if should => {
                let reason = super::error::short(r);
                self.write_method(
                    0,
                    AMQPClass::Connection(conn_m::AMQPMethod::Blocked(conn_m::Blocked { reason })),
                );
            }
            _ => self.write_method(
                0,
                AMQPClass::Connection(conn_m::AMQPMethod::Unblocked(conn_m::Unblocked {})),
            ),
        }
    }

    /// Gives back buffer memory of a connection that has gone quiet.
    fn shrink_idle_buffers(&mut self) {
        if self.inbuf.is_empty() && self.inbuf.capacity() > 0 {
            self.inbuf = BytesMut::new();
        }
        if self.out.is_empty() && self.out.capacity() > 0 {
            self.out = BytesMut::new();
        }
    }

    /// Writes as much of `out` as the socket takes without blocking.
    fn write_out(&mut self) -> std::io::Result<()> {
        while !self.out.is_empty() {
            match self.stream.try_write(&self.out) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    let _ = self.out.split_to(n);
                    self.last_write = Instant::now();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.out.is_empty() && self.out.capacity() > 4 * OUT_SOFT_LIMIT {
            self.out = BytesMut::new();
        }
        Ok(())
    }

    /// Processes every complete frame in the input buffer.
    async fn process_input(&mut self) -> Result<(), String> {
        loop {
            let f = match frame::cut_frame(&mut self.inbuf, self.frame_max) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    self.sync_channel_list();
                    return Ok(());
                }
                Err(e) => {
                    // The stream is no longer in sync: close and discard the rest.
                    self.inbuf.clear();
                    self.start_close(&e);
                    let _ = self.write_out();
                    return Err(format!("closed with {}: {}", e.code, e.text));
                }
            };
            if let Some(done) = self.closing_frame(&f) {
                return done;
            }
            if let Err(e) = self.handle_frame(f).await {
                if let Some(ch) = e.1.filter(|_| e.0.is_soft()) {
                    self.close_channel(ch, &e.0).await;
                } else {
                    info!("closing connection: {}", e.0.text);
                    self.start_close(&e.0);
                }
            }
        }
    }

    /// While closing, only close/close-ok matter. Returns Some when the
    /// connection is done.
    fn closing_frame(&mut self, f: &RawFrame) -> Option<Result<(), String>> {
        self.closing?;
        if f.kind == frame::FRAME_METHOD && f.channel == 0 {
            match frame::parse_method(&f.payload) {
                Ok(AMQPClass::Connection(conn_m::AMQPMethod::CloseOk(_))) => {
                    return Some(Err("closed by server, client acknowledged".into()));
                }
                Ok(AMQPClass::Connection(conn_m::AMQPMethod::Close(_))) => {
                    self.write_method(
                        0,
                        AMQPClass::Connection(conn_m::AMQPMethod::CloseOk(conn_m::CloseOk {})),
                    );
                    let _ = self.write_out();
                    return Some(Err("closed by both sides".into()));
                }
                _ => {}
            }
        }
        Some(Ok(()))
    }

    /// Sends connection.close and waits (bounded) for close-ok.
    pub fn start_close(&mut self, e: &AmqpError) {
        if self.closing.is_some() {
            return;
        }
        self.write_method(
            0,
            AMQPClass::Connection(conn_m::AMQPMethod::Close(conn_m::Close {
                reply_code: e.code,
                reply_text: e.reply_text(),
                class_id: e.class_id,
                method_id: e.method_id,
            })),
        );
        self.closing = Some(Instant::now() + CLOSE_TIMEOUT);
    }

    /// Writes a method frame to the output buffer.
    pub fn write_method(&mut self, channel: u16, m: AMQPClass) {
        frame::write_method(&mut self.out, channel, m);
    }

    /// Dispatches one frame. Errors carry the channel they belong to.
    async fn handle_frame(&mut self, f: RawFrame) -> Result<(), (AmqpError, Option<u16>)> {
        match f.kind {
            frame::FRAME_HEARTBEAT => {
                if f.channel != 0 {
                    return Err((
                        AmqpError::new(
                            code::FRAME_ERROR,
                            format!("heartbeat frame on channel {}", f.channel),
                        ),
                        None,
                    ));
                }
                Ok(())
            }
            _ if f.channel == 0 => self.handle_channel0(f).await.map_err(|e| (e, None)),
            _ => {
                let ch = f.channel;
                self.handle_channel_frame(f)
                    .await
                    .map_err(|e| (e, Some(ch)))
            }
        }
    }

    async fn handle_channel0(&mut self, f: RawFrame) -> Result<(), AmqpError> {
        if f.kind != frame::FRAME_METHOD {
            return Err(AmqpError::new(
                code::CHANNEL_ERROR,
                format!("content frame (type {}) on channel 0", f.kind),
            ));
        }
        let m = frame::parse_method(&f.payload)?;
        match m {
            AMQPClass::Connection(conn_m::AMQPMethod::Close(c)) => {
                debug!(code = c.reply_code, text = %c.reply_text, "client closed the connection");
                // Flush what we owe queues before the goodbye.
                let _ = self.flush_pending().await;
                self.write_method(
                    0,
                    AMQPClass::Connection(conn_m::AMQPMethod::CloseOk(conn_m::CloseOk {})),
                );
                let _ = self.write_out();
                self.closing = Some(Instant::now());
                self.client_closed = true;
                Ok(())
            }
            AMQPClass::Connection(
                conn_m::AMQPMethod::Blocked(_) | conn_m::AMQPMethod::Unblocked(_),
            ) => Ok(()),
            AMQPClass::Connection(conn_m::AMQPMethod::UpdateSecret(_)) => {
                self.write_method(
                    0,
                    AMQPClass::Connection(conn_m::AMQPMethod::UpdateSecretOk(
                        conn_m::UpdateSecretOk {},
                    )),
                );
                Ok(())
            }
            other => Err(AmqpError::new(
                code::COMMAND_INVALID,
                format!(
                    "method {}.{} is not valid on channel 0",
                    other.get_amqp_class_id(),
                    other.get_amqp_method_id()
                ),
            )
            .on(other.get_amqp_class_id(), other.get_amqp_method_id())),
        }
    }

    /// Closes a channel after a soft error: channel.close to the client, its
    /// resources released at once (as RabbitMQ does), frames dropped until
    /// the client answers close-ok.
    pub async fn close_channel(&mut self, ch: u16, e: &AmqpError) {
        debug!(channel = ch, "closing channel: {}", e.text);
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        if chan.closing {
            return;
        }
        chan.closing = true;
        chan.content = None;
        self.write_method(
            ch,
            AMQPClass::Channel(amq_protocol::protocol::channel::AMQPMethod::Close(
                amq_protocol::protocol::channel::Close {
                    reply_code: e.code,
                    reply_text: e.reply_text(),
                    class_id: e.class_id,
                    method_id: e.method_id,
                },
            )),
        );
        self.release_channel(ch).await;
    }

    /// Gives back everything a channel holds: its consumers, its unacked
    /// deliveries (requeued), its direct reply-to registration.
    pub async fn release_channel(&mut self, ch: u16) {
        let _ = self.flush_pending().await;
        let Some(chan) = self.channels.get_mut(&ch) else {
            return;
        };
        let touched: Vec<Arc<QueueRef>> = chan.touched.drain().map(|(_, q)| q).collect();
        chan.consumers.clear();
        chan.stats.remove_consumer(None);
        chan.unacked.clear();
        chan.unconfirmed.clear();
        if let Some(dr) = chan.direct_reply.take() {
            self.broker.direct_reply.remove(&dr.key);
        }
        let owner = Owner {
            conn: self.id,
            channel: ch,
        };
        for q in touched {
            let _ = q.send(QueueCmd::ChannelClosed { owner }).await;
        }
    }

    async fn handle_cmd(&mut self, cmd: ConnCmd) -> Result<(), String> {
        match cmd {
            ConnCmd::Deliver {
                channel,
                consumer,
                tag,
                queue,
                msgs,
            } => {
                self.deliver(channel, consumer, &tag, queue, msgs);
            }
            ConnCmd::Confirm {
                channel,
                seqs,
                nack,
            } => self.on_confirms(channel, &seqs, nack),
            ConnCmd::ConsumerCancelled {
                channel,
                consumer,
                revoked,
            } => self.on_server_cancel(channel, consumer, revoked),
            ConnCmd::DirectReply { channel, msg } => self.deliver_direct_reply(channel, &msg),
            ConnCmd::ForceClose { reason } => {
                self.start_close(&AmqpError::new(code::CONNECTION_FORCED, reason));
            }
        }
        Ok(())
    }

    /// Sends every batched publish and settlement to its queue.
    pub async fn flush_pending(&mut self) -> Result<(), String> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        self.recent_targets.clear();
        for p in &pending.publishes {
            if !self.recent_targets.iter().any(|q| q.id == p.queue.id) {
                self.recent_targets.push(p.queue.clone());
            }
        }
        // Store first: the queues must never see (and ack) a message the
        // store has not been asked to write.
        if let Some(storage) = self.broker.storage.clone() {
            for s in pending.stores {
                let done: Option<crate::store::Completion> = s.confirm.map(|(channel, seq)| {
                    let tx = self.tx.clone();
                    Box::new(move |r: Result<(), crate::store::StoreError>| {
                        if let Err(e) = &r {
                            tracing::error!(
                                "persisting a message failed, publisher gets basic.nack: {e}"
                            );
                        }
                        let _ = tx.send(ConnCmd::Confirm {
                            channel,
                            seqs: vec![seq],
                            nack: r.is_err(),
                        });
                    }) as crate::store::Completion
                });
                if let Err(e) = storage
                    .msgs
                    .append(s.gid, s.queues, s.msg.parts(), done)
                    .await
                {
                    tracing::error!("cannot persist message: {e}");
                    if let Some((channel, seq)) = s.confirm {
                        self.on_confirms(channel, &[seq], true);
                    }
                }
            }
        }
        for p in pending.publishes {
            p.queue
                .metrics
                .published
                .fetch_add(p.msgs.len() as u64, std::sync::atomic::Ordering::Relaxed);
            p.queue
                .inflight
                .fetch_add(p.msgs.len() as u64, std::sync::atomic::Ordering::Relaxed);
            let confirm = p.confirm.then(|| ConfirmTo {
                conn: self.tx.clone(),
                channel: p.channel,
                seqs: p.seqs.clone(),
            });
            if !p
                .queue
                .send(QueueCmd::Publish {
                    msgs: p.msgs,
                    confirm,
                })
                .await
                && p.confirm
            {
                // Queue deleted meanwhile: the message is gone with it, which
                // RabbitMQ confirms too.
                self.on_confirms(p.channel, &p.seqs, false);
            }
        }
        for (q, outcome, ids) in pending.settles {
            if outcome == Outcome::Ack {
                q.metrics
                    .acked
                    .fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }
            let _ = q.send(QueueCmd::Settle { ids, outcome }).await;
        }
        for (q, consumer, n) in pending.credits {
            let _ = q.send(QueueCmd::Credit { consumer, n }).await;
        }
        Ok(())
    }

    /// Queues a message for the store in this read's batch.
    pub fn pend_store(&mut self, item: PendingStore) {
        self.pending.stores.push(item);
    }

    /// Queues a message for `queue` in this read's batch.
    pub fn pend_publish(
        &mut self,
        channel: u16,
        queue: &Arc<QueueRef>,
        msg: Arc<Message>,
        gid: u64,
        seq: Option<u64>,
    ) {
        let entry = match self
            .pending
            .publishes
            .iter_mut()
            .find(|p| p.channel == channel && p.queue.id == queue.id)
        {
            Some(e) => e,
            None => {
                self.pending.publishes.push(PendingPublish {
                    channel,
                    queue: queue.clone(),
                    msgs: Vec::new(),
                    seqs: Vec::new(),
                    confirm: seq.is_some(),
                });
                let last = self.pending.publishes.len() - 1;
                &mut self.pending.publishes[last]
            }
        };
        entry.msgs.push((msg, gid));
        if let Some(s) = seq {
            entry.seqs.push(s);
        }
    }

    /// Queues a settlement in this read's batch.
    pub fn pend_settle(&mut self, queue: &Arc<QueueRef>, outcome: Outcome, id: MsgId) {
        if outcome == Outcome::Ack {
            // Counted here (while the input is processed), so the turn's
            // stats sync already includes it.
            self.msg_stats.add(crate::mgmt::stats::Counts::ACK, 1);
        }
        match self
            .pending
            .settles
            .iter_mut()
            .find(|(q, o, _)| q.id == queue.id && *o == outcome)
        {
            Some((_, _, ids)) => ids.push(id),
            None => self
                .pending
                .settles
                .push((queue.clone(), outcome, vec![id])),
        }
    }

    /// Queues flow credit for a no-ack consumer.
    pub fn pend_credit(&mut self, queue: &Arc<QueueRef>, consumer: ConsumerId, n: u32) {
        match self
            .pending
            .credits
            .iter_mut()
            .find(|(q, c, _)| q.id == queue.id && *c == consumer)
        {
            Some((_, _, k)) => *k += n,
            None => self.pending.credits.push((queue.clone(), consumer, n)),
        }
    }

    /// Connection is over: release every channel, delete exclusive queues.
    async fn cleanup(&mut self) {
        let _ = self.flush_pending().await;
        let ids: Vec<u16> = self.channels.keys().copied().collect();
        for ch in ids {
            self.release_channel(ch).await;
        }
        self.channels.clear();
        let _ = self.write_out();
        let _ = self.stream.shutdown().await;
        for q in std::mem::take(&mut self.exclusive_queues) {
            let (tx, rx) = oneshot::channel();
            if q.send(QueueCmd::Delete {
                if_unused: false,
                if_empty: false,
                reply: Some(tx),
            })
            .await
            {
                let _ = tokio::time::timeout(Duration::from_secs(5), rx).await;
            }
        }
    }

    /// Refreshes what management shows: the channel list (when it
    /// changed), each channel's gauges and the message totals. Called once
    /// per turn of the loop; relaxed stores and an uncontended lock.
    fn sync_channel_list(&mut self) {
        for c in self.channels.values() {
            c.publish_stats();
        }
        self.msg_stats.publish_to(&self.conn_stats);
        if let Ok(mut l) = self.channel_list.lock() {
            let stale = l.len() != self.channels.len()
                || l.iter().any(|(n, st)| {
                    self.channels
                        .get(n)
                        .is_none_or(|c| !Arc::ptr_eq(st, &c.stats))
                });
            if stale {
                *l = self
                    .channels
                    .iter()
                    .map(|(n, c)| (*n, c.stats.clone()))
                    .collect();
                l.sort_unstable_by_key(|x| x.0);
            }
        }
    }

    /// Shorthand for the vhost name in reply texts.
    pub fn vname(&self) -> &str {
        &self.vhost.name
    }
}
