//! Worker threads: producers, consumers, RPC client/server, idle connections.

use crate::conn::{
    self, Conn, Error, FRAME_BODY, FRAME_HEADER, FRAME_HEARTBEAT, FRAME_METHOD, Result, be16, be64,
};
use crate::{Plan, Shared, Stats, now_ns};
use amq_protocol::frame::{AMQPContentHeader, AMQPFrame};
use amq_protocol::protocol::{AMQPClass, basic};
use amq_protocol::types::ShortString;
use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const POLL: Duration = Duration::from_millis(100);
const WRITE_TARGET: usize = 128 * 1024;

// ---------------------------------------------------------------------------
// Fast-path reader over a blocking socket.

pub struct Reader {
    stream: TcpStream,
    pub buf: Vec<u8>,
    s: usize,
    e: usize,
    max: usize,
}

impl Reader {
    fn new(conn: &Conn, stream: TcpStream) -> Result<Reader> {
        stream
            .set_read_timeout(Some(POLL))
            .map_err(|e| Error::Io("setsockopt".into(), e))?;
        let max = conn.frame_max as usize;
        let size = (max * 2 + 16).max(conn::RBUF);
        let mut buf = vec![0u8; size];
        let p = conn.pending();
        buf[..p.len()].copy_from_slice(p);
        Ok(Reader {
            stream,
            buf,
            s: 0,
            e: p.len(),
            max: max.max(4096),
        })
    }

    /// Read more bytes. Ok(false) on poll timeout.
    fn fill(&mut self) -> Result<bool> {
        if self.s > 0 {
            self.buf.copy_within(self.s..self.e, 0);
            self.e -= self.s;
            self.s = 0;
        }
        if self.e == self.buf.len() {
            return Err(Error::Protocol(
                "incoming frame larger than read buffer".into(),
            ));
        }
        match self.stream.read(&mut self.buf[self.e..]) {
            Ok(0) => Err(Error::Io(
                "broker closed the TCP connection".into(),
                io::Error::from(io::ErrorKind::UnexpectedEof),
            )),
            Ok(n) => {
                self.e += n;
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(Error::Io("read failed".into(), e)),
        }
    }

    /// Next complete frame: (type, payload start, payload end) as indices into buf.
    #[inline]
    fn next(&mut self) -> Result<Option<(u8, usize, usize)>> {
        match conn::scan_frame(&self.buf[self.s..self.e], self.max)? {
            Some((ty, _ch, len)) => {
                let a = self.s + 7;
                self.s += len;
                Ok(Some((ty, a, self.s - 1)))
            }
            None => Ok(None),
        }
    }
}

/// Common handling of method frames the fast paths don't care about.
/// Returns (class, method) for the caller or an error for close/cancel.
#[inline]
fn method_ids(p: &[u8], shared: &Shared) -> Result<(u16, u16)> {
    let (c, m) = match (be16(p, 0), be16(p, 2)) {
        (Some(c), Some(m)) => (c, m),
        _ => return Err(Error::Protocol("truncated method frame".into())),
    };
    match (c, m) {
        (10, 50) => Err(conn::decode_close("connection", p)),
        (20, 40) => Err(conn::decode_close("channel", p)),
        (60, 30) => Err(Error::Protocol(
            "consumer cancelled by the broker (queue deleted?)".into(),
        )),
        (10, 60) => {
            if !shared.blocked_warned.swap(true, Relaxed) {
                let n = p.get(4).copied().unwrap_or(0) as usize;
                let reason = p
                    .get(5..5 + n)
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                eprintln!("warren-perf: broker blocked publishing connections: {reason}");
            }
            Ok((c, m))
        }
        _ => Ok((c, m)),
    }
}

/// Incremental delivery assembly (basic.deliver → header → body frames).
#[derive(Default)]
struct Delivery {
    active: bool,
    header_seen: bool,
    tag: u64,
    remaining: u64,
    ts: u64,
    ts_bytes: usize,
}

impl Delivery {
    fn start(&mut self, p: &[u8]) -> Result<()> {
        // class(2) method(2) consumer_tag(shortstr) delivery_tag(u64) ...
        let n = *p
            .get(4)
            .ok_or_else(|| Error::Protocol("truncated basic.deliver".into()))?
            as usize;
        self.tag =
            be64(p, 5 + n).ok_or_else(|| Error::Protocol("truncated basic.deliver".into()))?;
        self.active = true;
        self.header_seen = false;
        self.ts = 0;
        self.ts_bytes = 0;
        Ok(())
    }
    /// Returns true if the message is complete (empty body).
    fn header(&mut self, p: &[u8]) -> Result<bool> {
        if !self.active || self.header_seen {
            return Err(Error::Protocol("unexpected content header frame".into()));
        }
        self.remaining =
            be64(p, 4).ok_or_else(|| Error::Protocol("truncated content header".into()))?;
        self.header_seen = true;
        if self.remaining == 0 {
            self.active = false;
            return Ok(true);
        }
        Ok(false)
    }
    /// Returns true if the message is complete.
    #[inline]
    fn body(&mut self, p: &[u8]) -> Result<bool> {
        if !self.active || !self.header_seen {
            return Err(Error::Protocol("unexpected content body frame".into()));
        }
        let mut i = 0;
        while self.ts_bytes < 8 && i < p.len() {
            self.ts = (self.ts << 8) | p[i] as u64;
            self.ts_bytes += 1;
            i += 1;
        }
        let len = p.len() as u64;
        if len > self.remaining {
            return Err(Error::Protocol("content body longer than announced".into()));
        }
        self.remaining -= len;
        if self.remaining == 0 {
            self.active = false;
            return Ok(true);
        }
        Ok(false)
    }
    /// Send timestamp if the body carried one that looks valid.
    #[inline]
    fn timestamp(&self, now: u64) -> Option<u64> {
        (self.ts_bytes == 8 && self.ts != 0 && self.ts <= now).then_some(self.ts)
    }
}

/// write_all that keeps checking the stop flag while the socket is blocked.
fn write_all_stop(stream: &mut TcpStream, mut buf: &[u8], shared: &Shared) -> Result<bool> {
    while !buf.is_empty() {
        match stream.write(buf) {
            Ok(0) => {
                return Err(Error::Io(
                    "write failed".into(),
                    io::Error::from(io::ErrorKind::WriteZero),
                ));
            }
            Ok(n) => buf = &buf[n..],
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                if shared.stopping() {
                    return Ok(false);
                }
            }
            Err(e) => {
                if shared.stopping() {
                    return Ok(false);
                }
                let ctx = if e.kind() == io::ErrorKind::BrokenPipe
                    || e.kind() == io::ErrorKind::ConnectionReset
                {
                    "broker closed the connection while we were writing"
                } else {
                    "write failed"
                };
                return Err(Error::Io(ctx.into(), e));
            }
        }
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Consumer

pub fn consumer(plan: &Plan, idx: usize, st: &Stats, shared: &Shared) -> Result<()> {
    let cli = &plan.cli;
    let queue = plan.consumer_queue(idx).to_string();
    let mut c = Conn::connect(&plan.target, &format!("warren-perf consumer {idx}"))?;
    c.channel_open(1)?;
    if cli.qos > 0 {
        c.qos(1, cli.qos)?;
    }
    if let Some(spec) = &cli.stream_offset {
        use amq_protocol::types::AMQPValue;
        let v = match spec.parse::<i64>() {
            Ok(n) => AMQPValue::LongLongInt(n),
            Err(_) => AMQPValue::LongString(spec.as_str().into()),
        };
        c.consume_args.insert("x-stream-offset".into(), v);
    }
    c.consume(1, &queue, &format!("warren-perf-{idx}"), cli.autoack, false)?;
    let stream = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    let mut wstream = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    let mut rd = Reader::new(&c, stream)?;
    shared.ready.fetch_add(1, Relaxed);

    let mut ack_every = cli.multi_ack.max(1) as u64;
    if cli.qos > 0 && ack_every > cli.qos as u64 {
        ack_every = cli.qos as u64; // never wait for more messages than prefetch allows
    }
    let multiple = ack_every > 1;
    let hist = st.hist.as_ref();
    let mut dv = Delivery::default();
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024);
    let mut unacked = 0u64;
    let mut total = 0u64;
    let limit = cli.cmessages;
    'outer: loop {
        if shared.stopping() {
            break;
        }
        if !rd.fill()? {
            continue;
        }
        let now = now_ns();
        let mut n = 0u64;
        while let Some((ty, a, b)) = rd.next()? {
            let done = match ty {
                FRAME_METHOD => {
                    let p = &rd.buf[a..b];
                    match method_ids(p, shared)? {
                        (60, 60) => {
                            dv.start(p)?;
                            false
                        }
                        _ => false,
                    }
                }
                FRAME_HEADER => dv.header(&rd.buf[a..b])?,
                FRAME_BODY => dv.body(&rd.buf[a..b])?,
                FRAME_HEARTBEAT => false,
                t => return Err(Error::Protocol(format!("unknown frame type {t}"))),
            };
            if done {
                n += 1;
                if let (Some(h), Some(ts)) = (hist, dv.timestamp(now)) {
                    h.record(now - ts);
                }
                if !cli.autoack {
                    unacked += 1;
                    if unacked >= ack_every {
                        conn::put_ack(&mut out, 1, dv.tag, multiple);
                        unacked = 0;
                    }
                }
                if limit > 0 && total + n >= limit {
                    if unacked > 0 {
                        conn::put_ack(&mut out, 1, dv.tag, true);
                    }
                    total += n;
                    st.consumed.store(total, Relaxed);
                    st.last_ns.store(now, Relaxed);
                    if !out.is_empty() {
                        write_all_stop(&mut wstream, &out, shared)?;
                        out.clear();
                    }
                    break 'outer;
                }
            }
        }
        if n > 0 {
            total += n;
            st.consumed.store(total, Relaxed);
            st.last_ns.store(now, Relaxed);
        }
        if !out.is_empty() {
            write_all_stop(&mut wstream, &out, shared)?;
            out.clear();
        }
    }
    Conn::close_stream(&mut wstream, c.frame_max);
    Ok(())
}

// ---------------------------------------------------------------------------
// Producer

/// Counts publisher confirms exactly, handling multiple=true and out-of-order
/// single acks without allocating in the common (in-order) case.
#[derive(Default)]
struct ConfirmTracker {
    watermark: u64,
    singles: BTreeSet<u64>,
}

impl ConfirmTracker {
    fn on(&mut self, tag: u64, multiple: bool) -> u64 {
        if tag <= self.watermark {
            return 0;
        }
        if multiple {
            let above: Vec<u64> = if self.singles.is_empty() {
                Vec::new()
            } else {
                self.singles.range(..=tag).copied().collect()
            };
            for t in &above {
                self.singles.remove(t);
            }
            let n = tag - self.watermark - above.len() as u64;
            self.watermark = tag;
            self.advance();
            n
        } else if tag == self.watermark + 1 {
            self.watermark = tag;
            self.advance();
            1
        } else if self.singles.insert(tag) {
            1
        } else {
            0
        }
    }
    fn advance(&mut self) {
        while !self.singles.is_empty() && self.singles.remove(&(self.watermark + 1)) {
            self.watermark += 1;
        }
    }
}

struct ProdSync {
    settled: AtomicU64, // acks + nacks
    waiting: AtomicBool,
    wake_at: AtomicU64,
    stop_reader: AtomicBool,
}

fn producer_reader(
    mut rd: Reader,
    st: &Stats,
    ps: &ProdSync,
    shared: &Shared,
    writer: std::thread::Thread,
) -> Result<()> {
    let mut tr = ConfirmTracker::default();
    let (mut acked, mut nacked) = (0u64, 0u64);
    loop {
        if ps.stop_reader.load(Relaxed) || shared.stopping() {
            return Ok(());
        }
        if !rd.fill()? {
            continue;
        }
        let mut changed = false;
        while let Some((ty, a, b)) = rd.next()? {
            if ty != FRAME_METHOD {
                continue; // basic.return content etc.
            }
            let p = &rd.buf[a..b];
            match method_ids(p, shared)? {
                (60, 80) | (60, 120) => {
                    let tag =
                        be64(p, 4).ok_or_else(|| Error::Protocol("truncated basic.ack".into()))?;
                    let multiple = p.get(12).copied().unwrap_or(0) & 1 != 0;
                    let n = tr.on(tag, multiple);
                    if be16(p, 2) == Some(80) {
                        acked += n;
                    } else {
                        nacked += n;
                    }
                    changed = true;
                }
                (10, 61) => {}
                _ => {}
            }
        }
        if changed {
            st.confirmed.store(acked, Relaxed);
            st.nacked.store(nacked, Relaxed);
            ps.settled.store(acked + nacked, Relaxed);
            if ps.waiting.load(Relaxed) && acked + nacked >= ps.wake_at.load(Relaxed) {
                writer.unpark();
            }
        }
    }
}

/// Pre-encode one message: publish method + content header via amq-protocol, body frames by hand.
/// Returns (bytes, offset of the first body byte).
fn encode_message(plan: &Plan, rk: &str, frame_max: u32) -> (Vec<u8>, usize) {
    let cli = &plan.cli;
    let mut out = Vec::with_capacity(cli.size + 256);
    conn::encode(
        &AMQPFrame::Method(
            1,
            AMQPClass::Basic(basic::AMQPMethod::Publish(basic::Publish {
                exchange: ShortString::from(plan.exchange.clone()),
                routing_key: ShortString::from(rk.to_string()),
                mandatory: false,
                immediate: false,
            })),
        ),
        &mut out,
    );
    let mut props = basic::AMQPProperties::default();
    if cli.persistent {
        props = props.with_delivery_mode(2);
    }
    conn::encode(
        &AMQPFrame::Header(
            1,
            AMQPContentHeader {
                class_id: 60,
                body_size: cli.size as u64,
                properties: props,
            },
        ),
        &mut out,
    );
    let mut body = vec![b'w'; cli.size];
    body[..8].copy_from_slice(&[0; 8]);
    let off = conn::put_body(&mut out, 1, &body, frame_max);
    (out, off)
}

pub fn producer(plan: &Plan, idx: usize, st: &Stats, shared: &Shared) -> Result<()> {
    let cli = &plan.cli;
    let rk = plan.producer_rk(idx);
    let mut c = Conn::connect(&plan.target, &format!("warren-perf producer {idx}"))?;
    c.channel_open(1)?;
    let window = cli.confirm as u64;
    if window > 0 {
        c.confirm_select(1)?;
    }
    let (msg, ts_off) = encode_message(plan, &rk, c.frame_max);
    let mlen = msg.len();
    let mut batch_n = (WRITE_TARGET / mlen).clamp(1, 4096);
    if window > 0 {
        batch_n = batch_n.min(window as usize);
    }
    let mut batch = Vec::with_capacity(batch_n * mlen);
    for _ in 0..batch_n {
        batch.extend_from_slice(&msg);
    }

    let rstream = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    let rd = Reader::new(&c, rstream)?;
    let mut w = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    w.set_write_timeout(Some(POLL))
        .map_err(|e| Error::Io("setsockopt".into(), e))?;
    let ps = Arc::new(ProdSync {
        settled: AtomicU64::new(0),
        waiting: AtomicBool::new(false),
        wake_at: AtomicU64::new(0),
        stop_reader: AtomicBool::new(false),
    });

    let result = std::thread::scope(|s| {
        let me = std::thread::current();
        let ps2 = ps.clone();
        let reader = s.spawn(move || producer_reader(rd, st, &ps2, shared, me));
        let r = producer_loop(plan, st, shared, &ps, &mut w, &mut batch, mlen, ts_off);
        ps.stop_reader.store(true, Relaxed);
        let rr = reader
            .join()
            .unwrap_or_else(|_| Err(Error::Protocol("reader thread panicked".into())));
        r.and(rr)
    });
    Conn::close_stream(&mut w, c.frame_max);
    result
}

#[allow(clippy::too_many_arguments)]
fn producer_loop(
    plan: &Plan,
    st: &Stats,
    shared: &Shared,
    ps: &ProdSync,
    w: &mut TcpStream,
    batch: &mut [u8],
    mlen: usize,
    ts_off: usize,
) -> Result<()> {
    let cli = &plan.cli;
    let window = cli.confirm as u64;
    let limit = cli.pmessages;
    let batch_n = (batch.len() / mlen) as u64;
    let rate = cli.rate as f64;
    // Write at most ~1000 times per second when rate limited.
    let min_chunk = ((rate / 1000.0).floor()).clamp(1.0, batch_n as f64);
    let cap = (rate / 50.0).max(min_chunk);
    let mut tokens = if rate > 0.0 { 1.0 } else { 0.0 };
    let mut last = now_ns();
    let mut published = 0u64;
    loop {
        if shared.stopping() {
            return Ok(());
        }
        let mut n = batch_n;
        if limit > 0 {
            if published >= limit {
                break;
            }
            n = n.min(limit - published);
        }
        if window > 0 {
            let outstanding = published - ps.settled.load(Relaxed).min(published);
            let free = window.saturating_sub(outstanding);
            // Hysteresis: once the window is full, resume only when a quarter of it
            // (or what is left to send) is free, so writes stay batched.
            let need = (window / 4).clamp(1, n);
            if free < need {
                let wake_at = published + need - window;
                ps.wake_at.store(wake_at, Relaxed);
                ps.waiting.store(true, Relaxed);
                if ps.settled.load(Relaxed) < wake_at {
                    std::thread::park_timeout(Duration::from_millis(10));
                }
                ps.waiting.store(false, Relaxed);
                continue;
            }
            n = n.min(free);
        }
        if rate > 0.0 {
            let now = now_ns();
            tokens = (tokens + (now - last) as f64 * rate / 1e9).min(cap);
            last = now;
            let need = min_chunk.min(n as f64);
            if tokens < need {
                let wait = ((need - tokens) / rate * 1e9) as u64;
                std::thread::sleep(Duration::from_nanos(wait.clamp(50_000, 100_000_000)));
                continue;
            }
            n = n.min(tokens as u64);
            tokens -= n as f64;
        }
        let ts = now_ns().to_be_bytes();
        let n = n as usize;
        for k in 0..n {
            let o = k * mlen + ts_off;
            batch[o..o + 8].copy_from_slice(&ts);
        }
        if !write_all_stop(w, &batch[..n * mlen], shared)? {
            return Ok(());
        }
        published += n as u64;
        st.published.store(published, Relaxed);
    }
    // Count reached: wait for outstanding confirms (up to 60 s).
    if window > 0 {
        let deadline = now_ns() + 60_000_000_000;
        while ps.settled.load(Relaxed) < published && !shared.stopping() {
            if now_ns() > deadline {
                return Err(Error::Protocol(format!(
                    "timed out waiting for confirms: {} of {published} settled",
                    ps.settled.load(Relaxed)
                )));
            }
            ps.wake_at.store(published, Relaxed);
            ps.waiting.store(true, Relaxed);
            if ps.settled.load(Relaxed) < published {
                std::thread::park_timeout(Duration::from_millis(10));
            }
        }
        ps.waiting.store(false, Relaxed);
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// RPC

pub fn rpc_server(plan: &Plan, idx: usize, st: &Stats, shared: &Shared) -> Result<()> {
    let queue = plan.queues[0].clone();
    let mut c = Conn::connect(&plan.target, &format!("warren-perf rpc server {idx}"))?;
    c.channel_open(1)?;
    c.consume(1, &queue, &format!("warren-perf-rpc-{idx}"), true, false)?;
    let stream = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    let mut w = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    w.set_write_timeout(Some(POLL))
        .map_err(|e| Error::Io("setsockopt".into(), e))?;
    let mut rd = Reader::new(&c, stream)?;
    shared.ready.fetch_add(1, Relaxed);
    let frame_max = c.frame_max;
    let (mut reply_to, mut corr, mut body) = (Vec::new(), Vec::new(), Vec::new());
    let mut dv = Delivery::default();
    let mut out = Vec::with_capacity(64 * 1024);
    let mut served = 0u64;
    loop {
        if shared.stopping() {
            break;
        }
        if !rd.fill()? {
            continue;
        }
        while let Some((ty, a, b)) = rd.next()? {
            let p = &rd.buf[a..b];
            let done = match ty {
                FRAME_METHOD => {
                    if method_ids(p, shared)? == (60, 60) {
                        dv.start(p)?;
                        body.clear();
                        reply_to.clear();
                        corr.clear();
                    }
                    false
                }
                FRAME_HEADER => {
                    let (cid, rt) = conn::header_props(p)
                        .ok_or_else(|| Error::Protocol("malformed content header".into()))?;
                    corr.extend_from_slice(cid.unwrap_or_default());
                    reply_to.extend_from_slice(rt.unwrap_or_default());
                    dv.header(p)?
                }
                FRAME_BODY => {
                    body.extend_from_slice(p);
                    dv.body(p)?
                }
                _ => false,
            };
            if done {
                served += 1;
                if reply_to.is_empty() {
                    continue;
                }
                conn::put_publish(&mut out, 1, b"", &reply_to);
                conn::put_header(&mut out, 1, body.len() as u64, Some(&corr), None, None);
                conn::put_body(&mut out, 1, &body, frame_max);
            }
        }
        st.consumed.store(served, Relaxed);
        if !out.is_empty() {
            write_all_stop(&mut w, &out, shared)?;
            out.clear();
        }
    }
    Conn::close_stream(&mut w, frame_max);
    Ok(())
}

pub fn rpc_client(plan: &Plan, idx: usize, st: &Stats, shared: &Shared) -> Result<()> {
    let cli = &plan.cli;
    let request_queue = plan.queues[0].clone();
    let mut c = Conn::connect(&plan.target, &format!("warren-perf rpc client {idx}"))?;
    c.channel_open(1)?;
    let reply_q = format!("warren-perf-reply-{}-{idx}", std::process::id());
    c.queue_declare(1, &reply_q, false, true, true)?;
    c.consume(1, &reply_q, "warren-perf-reply", true, true)?;
    let stream = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    let mut w = c
        .stream
        .try_clone()
        .map_err(|e| Error::Io("dup socket".into(), e))?;
    w.set_write_timeout(Some(POLL))
        .map_err(|e| Error::Io("setsockopt".into(), e))?;
    let mut rd = Reader::new(&c, stream)?;

    let mut msg = Vec::new();
    conn::put_publish(&mut msg, 1, b"", request_queue.as_bytes());
    let hdr = msg.len();
    conn::put_header(
        &mut msg,
        1,
        cli.size as u64,
        Some(b"0000000000000000"),
        Some(reply_q.as_bytes()),
        None,
    );
    let corr_off = hdr + 7 + 14 + 1;
    let body = vec![b'r'; cli.size];
    let ts_off = conn::put_body(&mut msg, 1, &body, c.frame_max);
    let hist = st.hist.as_ref();
    let mut dv = Delivery::default();
    let mut seq = 0u64;
    let mut want = [0u8; 16];
    let limit = cli.pmessages;
    'outer: while !shared.stopping() && (limit == 0 || seq < limit) {
        seq += 1;
        let digits = format_seq(seq);
        msg[corr_off..corr_off + 16].copy_from_slice(&digits);
        want.copy_from_slice(&digits);
        msg[ts_off..ts_off + 8].copy_from_slice(&now_ns().to_be_bytes());
        if !write_all_stop(&mut w, &msg, shared)? {
            break;
        }
        st.published.store(seq, Relaxed);
        // Wait for the matching reply.
        let mut corr_ok = false;
        loop {
            if shared.stopping() {
                break 'outer;
            }
            let mut got = false;
            while let Some((ty, a, b)) = rd.next()? {
                let p = &rd.buf[a..b];
                let done = match ty {
                    FRAME_METHOD => {
                        if method_ids(p, shared)? == (60, 60) {
                            dv.start(p)?;
                        }
                        false
                    }
                    FRAME_HEADER => {
                        let (cid, _) = conn::header_props(p)
                            .ok_or_else(|| Error::Protocol("malformed content header".into()))?;
                        corr_ok = cid == Some(&want[..]);
                        dv.header(p)?
                    }
                    FRAME_BODY => dv.body(p)?,
                    _ => false,
                };
                if done && corr_ok {
                    got = true;
                }
            }
            if got {
                let now = now_ns();
                if let (Some(h), Some(ts)) = (hist, dv.timestamp(now)) {
                    h.record(now - ts);
                }
                st.consumed.store(seq, Relaxed);
                break;
            }
            rd.fill()?;
        }
    }
    Conn::close_stream(&mut w, c.frame_max);
    Ok(())
}

fn format_seq(mut v: u64) -> [u8; 16] {
    let mut d = [b'0'; 16];
    for i in (0..16).rev() {
        d[i] = b'0' + (v % 10) as u8;
        v /= 10;
    }
    d
}

// ---------------------------------------------------------------------------
// Idle connections

pub fn idle(plan: &Plan) -> std::result::Result<i32, Error> {
    let cli = &plan.cli;
    let n = cli.idle_connections;
    let t0 = now_ns();
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let mut c = Conn::connect(&plan.target, &format!("warren-perf idle {i}"))
            .map_err(|e| Error::Config(format!("idle connection {i} of {n}: {e}")))?;
        c.channel_open(1)?;
        // Keep only the socket; drop the 1 MiB read buffer.
        let fm = c.frame_max;
        let s = c
            .stream
            .try_clone()
            .map_err(|e| Error::Io("dup socket".into(), e))?;
        drop(c);
        conns.push((s, fm));
    }
    let open_s = (now_ns() - t0) as f64 / 1e9;
    eprintln!(
        "warren-perf: holding {n} idle connections (opened in {open_s:.2} s) for {} s",
        cli.time
    );
    let hold = Duration::from_secs(cli.time);
    let start = std::time::Instant::now();
    // Check every 100ms for the broker closing any of them.
    let mut probe = [0u8; 64];
    let mut closed = 0usize;
    while start.elapsed() < hold && !crate::INTERRUPTED.load(Relaxed) {
        std::thread::sleep(POLL);
        for (s, _) in conns.iter_mut().take(8) {
            let _ = s.set_nonblocking(true);
            if let Ok(0) = s.read(&mut probe) {
                closed += 1;
            }
            let _ = s.set_nonblocking(false);
        }
        if closed > 0 {
            break;
        }
    }
    for (s, fm) in conns.iter_mut() {
        Conn::close_stream(s, *fm);
    }
    let (cpu, rss) = crate::cpu_and_rss();
    if cli.json {
        println!(
            "{}",
            serde_json::json!({"ok": closed == 0, "mode": "idle", "connections": n, "open_time_s": open_s,
                "held_s": start.elapsed().as_secs_f64(), "cpu_s": cpu, "max_rss_kb": rss})
        );
    } else {
        println!("--- warren-perf summary ---");
        println!(
            "idle connections  {n} opened in {open_s:.2} s, held {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
    if closed > 0 {
        eprintln!("warren-perf: the broker closed idle connections");
        return Ok(1);
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirm_tracker_counts_exactly() {
        let mut t = ConfirmTracker::default();
        assert_eq!(t.on(1, false), 1);
        assert_eq!(t.on(3, false), 1); // out of order single
        assert_eq!(t.on(3, false), 0); // duplicate
        assert_eq!(t.on(5, true), 3); // 2, 4, 5 (3 already counted)
        assert_eq!(t.on(4, false), 0); // below watermark
        assert_eq!(t.on(6, false), 1);
        assert_eq!(t.on(10, true), 4);
        assert_eq!(t.watermark, 10);
        assert!(t.singles.is_empty());
    }

    #[test]
    fn delivery_assembly_and_malformed_input() {
        let mut d = Delivery::default();
        // deliver: class 60 method 60, ctag "t", tag 7, redelivered, exch, rk
        let mut p = vec![0, 60, 0, 60, 1, b't'];
        p.extend_from_slice(&7u64.to_be_bytes());
        d.start(&p).unwrap();
        assert_eq!(d.tag, 7);
        let mut h = vec![0, 60, 0, 0];
        h.extend_from_slice(&10u64.to_be_bytes());
        h.extend_from_slice(&[0, 0]);
        assert!(!d.header(&h).unwrap());
        let ts = 12345u64.to_be_bytes();
        assert!(!d.body(&ts[..5]).unwrap());
        let mut rest = ts[5..].to_vec();
        rest.extend_from_slice(&[1, 2]);
        assert!(d.body(&rest).unwrap());
        assert_eq!(d.timestamp(20000), Some(12345));
        assert_eq!(d.timestamp(100), None);
        // malformed: truncated deliver, body without header, oversize body
        assert!(Delivery::default().start(&[0, 60, 0, 60, 9]).is_err());
        assert!(Delivery::default().body(&[1]).is_err());
        d.start(&p).unwrap();
        d.header(&h).unwrap();
        assert!(d.body(&[0u8; 11]).is_err());
    }
}
