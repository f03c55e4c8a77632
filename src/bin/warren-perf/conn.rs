//! Blocking AMQP 0-9-1 connection: handshake and synchronous setup methods are
//! encoded/decoded with amq-protocol; the hot paths (publishing, consuming) use
//! pre-encoded templates and the hand-written frame scanner in this module.

use amq_protocol::frame::{AMQPFrame, ProtocolVersion, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};
use amq_protocol::types::{AMQPValue, FieldTable, LongString, ShortString};
use amq_protocol::uri::AMQPUri;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::time::Duration;

pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

#[derive(Debug)]
pub enum Error {
    Io(String, io::Error),
    Protocol(String),
    /// Broker closed the channel or connection: (what, code, text, class, method)
    Closed(&'static str, u16, String, u16, u16),
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(ctx, _) if ctx.ends_with('?') => write!(f, "{ctx}"),
            Error::Io(ctx, e) => write!(f, "{ctx}: {e}"),
            Error::Protocol(m) => write!(f, "protocol error: {m}"),
            Error::Closed(what, code, text, c, m) => {
                write!(f, "broker closed the {what}: {code} {text}")?;
                if *c != 0 || *m != 0 {
                    write!(f, " (caused by class {c} method {m})")?;
                }
                Ok(())
            }
            Error::Config(m) => write!(f, "{m}"),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

fn proto<T>(m: impl Into<String>) -> Result<T> {
    Err(Error::Protocol(m.into()))
}

#[derive(Clone, Debug)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

impl Target {
    pub fn parse(uri: &str) -> Result<Target> {
        let u: AMQPUri = uri
            .parse()
            .map_err(|e| Error::Config(format!("invalid --uri {uri:?}: {e}")))?;
        if matches!(u.scheme, amq_protocol::uri::AMQPScheme::AMQPS) {
            return Err(Error::Config(
                "amqps:// is not supported by warren-perf".into(),
            ));
        }
        Ok(Target {
            host: u.authority.host,
            port: u.authority.port,
            user: u.authority.userinfo.username,
            pass: u.authority.userinfo.password,
            vhost: u.vhost,
        })
    }
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Zero-allocation frame header scan. Returns Some((type, channel, payload range end))
/// when a complete frame is at the start of `b`, None when more bytes are needed.
#[inline]
pub fn scan_frame(b: &[u8], max: usize) -> Result<Option<(u8, u16, usize)>> {
    if b.len() < 7 {
        return Ok(None);
    }
    let ty = b[0];
    let ch = u16::from_be_bytes([b[1], b[2]]);
    let size = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
    if size > max {
        if b[0] == b'A' {
            return proto("broker answered with a protocol header: it does not support AMQP 0-9-1");
        }
        return proto(format!("frame of {size} bytes exceeds frame_max {max}"));
    }
    if b.len() < size + 8 {
        return Ok(None);
    }
    if b[7 + size] != FRAME_END {
        return proto(format!(
            "bad frame end byte 0x{:02x} (frame type {ty})",
            b[7 + size]
        ));
    }
    Ok(Some((ty, ch, size + 8)))
}

#[inline]
pub fn be16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}
#[inline]
pub fn be64(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_be_bytes(s.try_into().unwrap_or([0; 8])))
}

/// Decode connection.close / channel.close payloads (after class+method ids).
pub fn decode_close(what: &'static str, p: &[u8]) -> Error {
    let code = be16(p, 4).unwrap_or(0);
    let tl = p.get(6).copied().unwrap_or(0) as usize;
    let text = p
        .get(7..7 + tl)
        .map(|t| String::from_utf8_lossy(t).into_owned())
        .unwrap_or_default();
    let c = be16(p, 7 + tl).unwrap_or(0);
    let m = be16(p, 9 + tl).unwrap_or(0);
    Error::Closed(what, code, text, c, m)
}

pub fn encode(frame: &AMQPFrame, out: &mut Vec<u8>) {
    let buf = std::mem::take(out);
    match cookie_gen(frame, buf) {
        Ok(b) => *out = b,
        Err(e) => panic!("internal error: frame encoding failed: {e}"),
    }
}

fn cookie_gen(frame: &AMQPFrame, buf: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    use amq_protocol::frame::WriteContext;
    let ctx = WriteContext::from(buf);
    gen_frame(frame)(ctx)
        .map(|c| c.write)
        .map_err(|e| format!("{e:?}"))
}

pub fn method(ch: u16, m: AMQPClass) -> AMQPFrame {
    AMQPFrame::Method(ch, m)
}

pub struct Conn {
    pub stream: TcpStream,
    pub rbuf: Vec<u8>,
    pub rstart: usize,
    pub rend: usize,
    pub frame_max: u32,
    wbuf: Vec<u8>,
    what: String,
    /// Arguments sent with queue.declare (e.g. x-queue-type=stream).
    pub declare_args: FieldTable,
    /// Arguments sent with basic.consume (e.g. x-stream-offset).
    pub consume_args: FieldTable,
}

pub const RBUF: usize = 1 << 20;

impl Conn {
    pub fn connect(t: &Target, name: &str) -> Result<Conn> {
        let addr = t.addr();
        let addrs: Vec<_> = addr
            .to_socket_addrs()
            .map_err(|e| Error::Io(format!("cannot resolve {addr}"), e))?
            .collect();
        let mut last = None;
        let mut stream = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, Duration::from_secs(5)) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = match stream {
            Some(s) => s,
            None => {
                let e = last.unwrap_or_else(|| io::Error::other("no address"));
                let ctx = if e.kind() == io::ErrorKind::ConnectionRefused {
                    format!("connection refused to {addr} — is the broker running?")
                } else {
                    format!("cannot connect to {addr}")
                };
                return Err(Error::Io(ctx, e));
            }
        };
        let _ = stream.set_nodelay(true);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| Error::Io("setsockopt".into(), e))?;
        let mut c = Conn {
            stream,
            rbuf: vec![0; RBUF],
            rstart: 0,
            rend: 0,
            declare_args: FieldTable::default(),
            consume_args: FieldTable::default(),
            frame_max: 131072,
            wbuf: Vec::with_capacity(4096),
            what: addr,
        };
        c.handshake(t, name)?;
        Ok(c)
    }

    fn io_err(&self, ctx: &str, e: io::Error) -> Error {
        Error::Io(format!("{ctx} ({})", self.what), e)
    }

    pub fn send(&mut self, f: &AMQPFrame) -> Result<()> {
        self.wbuf.clear();
        let mut w = std::mem::take(&mut self.wbuf);
        encode(f, &mut w);
        let r = self.stream.write_all(&w);
        self.wbuf = w;
        r.map_err(|e| self.io_err("write failed", e))
    }

    /// Read one complete raw frame; returns (type, channel, start, end) of the whole frame in rbuf.
    fn read_raw(&mut self) -> Result<(u8, u16, usize, usize)> {
        loop {
            let max = (self.frame_max as usize).max(131072);
            if let Some((ty, ch, len)) = scan_frame(&self.rbuf[self.rstart..self.rend], max)? {
                let s = self.rstart;
                self.rstart += len;
                return Ok((ty, ch, s, s + len));
            }
            if self.rstart > 0 {
                self.rbuf.copy_within(self.rstart..self.rend, 0);
                self.rend -= self.rstart;
                self.rstart = 0;
            }
            if self.rend == self.rbuf.len() {
                return proto("frame larger than read buffer");
            }
            let n = match self.stream.read(&mut self.rbuf[self.rend..]) {
                Ok(0) => {
                    return Err(self.io_err(
                        "broker closed the TCP connection",
                        io::Error::from(io::ErrorKind::UnexpectedEof),
                    ));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(self.io_err("timed out waiting for the broker", e));
                }
                Err(e) => return Err(self.io_err("read failed", e)),
            };
            self.rend += n;
        }
    }

    /// Wait for the next method frame (skipping heartbeats), decoded with amq-protocol.
    pub fn recv_method(&mut self) -> Result<(u16, AMQPClass)> {
        loop {
            let (ty, ch, s, e) = self.read_raw()?;
            match ty {
                FRAME_HEARTBEAT => continue,
                FRAME_METHOD => {
                    let p = &self.rbuf[s + 7..e - 1];
                    match (be16(p, 0), be16(p, 2)) {
                        (Some(10), Some(50)) => {
                            let err = decode_close("connection", p);
                            let _ = self.send(&method(
                                0,
                                AMQPClass::Connection(connection::AMQPMethod::CloseOk(
                                    connection::CloseOk {},
                                )),
                            ));
                            return Err(err);
                        }
                        (Some(20), Some(40)) => return Err(decode_close("channel", p)),
                        _ => {}
                    }
                    return match parse_frame(&self.rbuf[s..e]) {
                        Ok((_, AMQPFrame::Method(ch, m))) => Ok((ch, m)),
                        Ok(_) => proto("unexpected frame"),
                        Err(err) => proto(format!(
                            "cannot parse method frame on channel {ch}: {err:?}"
                        )),
                    };
                }
                t => return proto(format!("unexpected frame type {t} during setup")),
            }
        }
    }

    fn handshake(&mut self, t: &Target, name: &str) -> Result<()> {
        self.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .map_err(|e| self.io_err("write failed", e))?;
        let _ = ProtocolVersion::amqp_0_9_1();
        let (_, m) = self.recv_method()?;
        match m {
            AMQPClass::Connection(connection::AMQPMethod::Start(s)) => {
                let mechs = s.mechanisms.to_string();
                if !mechs.split(' ').any(|m| m == "PLAIN") {
                    return Err(Error::Protocol(format!(
                        "broker does not offer PLAIN auth (offers {mechs})"
                    )));
                }
            }
            other => return proto(format!("expected connection.start, got {other:?}")),
        }
        let mut props = FieldTable::default();
        props.insert(
            ShortString::from("product"),
            AMQPValue::LongString(LongString::from("warren-perf")),
        );
        props.insert(
            ShortString::from("connection_name"),
            AMQPValue::LongString(LongString::from(name.to_string())),
        );
        let mut caps = FieldTable::default();
        for c in [
            "publisher_confirms",
            "consumer_cancel_notify",
            "basic.nack",
            "connection.blocked",
            "authentication_failure_close",
        ] {
            caps.insert(ShortString::from(c), AMQPValue::Boolean(true));
        }
        props.insert(
            ShortString::from("capabilities"),
            AMQPValue::FieldTable(caps),
        );
        let resp = format!("\0{}\0{}", t.user, t.pass);
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::StartOk(connection::StartOk {
                client_properties: props,
                mechanism: ShortString::from("PLAIN"),
                response: LongString::from(resp),
                locale: ShortString::from("en_US"),
            })),
        ))?;
        let (_, m) = match self.recv_method() {
            Err(Error::Io(_, e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset
                ) =>
            {
                return Err(Error::Io(
                    format!(
                        "broker dropped the connection during login — wrong user/password for {:?}?",
                        t.user
                    ),
                    e,
                ));
            }
            r => r?,
        };
        let tune = match m {
            AMQPClass::Connection(connection::AMQPMethod::Tune(t)) => t,
            AMQPClass::Connection(connection::AMQPMethod::Secure(_)) => {
                return proto("broker asked for connection.secure; only PLAIN is supported");
            }
            other => return proto(format!("expected connection.tune, got {other:?}")),
        };
        let frame_max = if tune.frame_max == 0 {
            131072
        } else {
            tune.frame_max
        };
        self.frame_max = frame_max;
        if self.rbuf.len() < frame_max as usize * 2 {
            self.rbuf.resize(frame_max as usize * 2, 0);
        }
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::TuneOk(connection::TuneOk {
                channel_max: tune.channel_max,
                frame_max,
                heartbeat: 0,
            })),
        ))?;
        self.send(&method(
            0,
            AMQPClass::Connection(connection::AMQPMethod::Open(connection::Open {
                virtual_host: ShortString::from(t.vhost.clone()),
            })),
        ))?;
        match self.recv_method()?.1 {
            AMQPClass::Connection(connection::AMQPMethod::OpenOk(_)) => {}
            other => return proto(format!("expected connection.open-ok, got {other:?}")),
        }
        Ok(())
    }

    /// Send a method and wait for the expected reply (by class/method id).
    fn rpc(&mut self, ch: u16, m: AMQPClass, what: &str) -> Result<AMQPClass> {
        let want_class = m.get_amqp_class_id();
        self.send(&method(ch, m))?;
        loop {
            let (rch, r) = self.recv_method()?;
            if rch == ch && r.get_amqp_class_id() == want_class {
                return Ok(r);
            }
            // Ignore unrelated frames (e.g. basic.ack from an earlier confirm).
            let _ = what;
        }
    }

    pub fn channel_open(&mut self, ch: u16) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Channel(channel::AMQPMethod::Open(channel::Open {})),
            "channel.open",
        )?;
        Ok(())
    }

    pub fn queue_declare(
        &mut self,
        ch: u16,
        q: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
    ) -> Result<String> {
        let r = self.rpc(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Declare(queue::Declare {
                queue: ShortString::from(q.to_string()),
                passive: false,
                durable,
                exclusive,
                auto_delete,
                nowait: false,
                arguments: self.declare_args.clone(),
            })),
            "queue.declare",
        )?;
        match r {
            AMQPClass::Queue(queue::AMQPMethod::DeclareOk(ok)) => Ok(ok.queue.to_string()),
            other => proto(format!("expected queue.declare-ok, got {other:?}")),
        }
    }

    pub fn exchange_declare(&mut self, ch: u16, x: &str, kind: &str, durable: bool) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Exchange(exchange::AMQPMethod::Declare(exchange::Declare {
                exchange: ShortString::from(x.to_string()),
                kind: ShortString::from(kind.to_string()),
                passive: false,
                durable,
                auto_delete: false,
                internal: false,
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "exchange.declare",
        )?;
        Ok(())
    }

    pub fn queue_bind(&mut self, ch: u16, q: &str, x: &str, rk: &str) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Bind(queue::Bind {
                queue: ShortString::from(q.to_string()),
                exchange: ShortString::from(x.to_string()),
                routing_key: ShortString::from(rk.to_string()),
                nowait: false,
                arguments: FieldTable::default(),
            })),
            "queue.bind",
        )?;
        Ok(())
    }

    pub fn queue_delete(&mut self, ch: u16, q: &str) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Queue(queue::AMQPMethod::Delete(queue::Delete {
                queue: ShortString::from(q.to_string()),
                if_unused: false,
                if_empty: false,
                nowait: false,
            })),
            "queue.delete",
        )?;
        Ok(())
    }

    pub fn qos(&mut self, ch: u16, prefetch: u16) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Qos(basic::Qos {
                prefetch_count: prefetch,
                global: false,
            })),
            "basic.qos",
        )?;
        Ok(())
    }

    pub fn confirm_select(&mut self, ch: u16) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Confirm(confirm::AMQPMethod::Select(confirm::Select {
                nowait: false,
            })),
            "confirm.select",
        )?;
        Ok(())
    }

    pub fn consume(
        &mut self,
        ch: u16,
        q: &str,
        tag: &str,
        no_ack: bool,
        exclusive: bool,
    ) -> Result<()> {
        self.rpc(
            ch,
            AMQPClass::Basic(basic::AMQPMethod::Consume(basic::Consume {
                queue: ShortString::from(q.to_string()),
                consumer_tag: ShortString::from(tag.to_string()),
                no_local: false,
                no_ack,
                exclusive,
                nowait: false,
                arguments: self.consume_args.clone(),
            })),
            "basic.consume",
        )?;
        Ok(())
    }

    /// Bytes already read past the last parsed setup frame.
    pub fn pending(&self) -> &[u8] {
        &self.rbuf[self.rstart..self.rend]
    }

    /// Best-effort graceful close: connection.close, wait briefly for close-ok.
    pub fn close_stream(stream: &mut TcpStream, frame_max: u32) {
        let mut out = Vec::new();
        encode(
            &method(
                0,
                AMQPClass::Connection(connection::AMQPMethod::Close(connection::Close {
                    reply_code: 200,
                    reply_text: ShortString::from("bye"),
                    class_id: 0,
                    method_id: 0,
                })),
            ),
            &mut out,
        );
        if stream.write_all(&out).is_err() {
            return;
        }
        let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut buf = vec![0u8; 256 * 1024];
        let (mut s, mut e) = (0usize, 0usize);
        let max = (frame_max as usize).max(131072);
        while std::time::Instant::now() < deadline {
            loop {
                match scan_frame(&buf[s..e], max) {
                    Ok(Some((ty, _, len))) => {
                        let p = &buf[s + 7..s + len - 1];
                        if ty == FRAME_METHOD
                            && be16(p, 0) == Some(10)
                            && matches!(be16(p, 2), Some(51) | Some(50))
                        {
                            let _ = stream.shutdown(Shutdown::Both);
                            return;
                        }
                        s += len;
                    }
                    Ok(None) => break,
                    Err(_) => return,
                }
            }
            buf.copy_within(s..e, 0);
            e -= s;
            s = 0;
            if e == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            match stream.read(&mut buf[e..]) {
                Ok(0) => return,
                Ok(n) => e += n,
                Err(err)
                    if matches!(
                        err.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
        let _ = stream.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// Hand-encoded content frames (used for RPC replies and templates).

pub fn put_shortstr(out: &mut Vec<u8>, s: &[u8]) {
    let n = s.len().min(255);
    out.push(n as u8);
    out.extend_from_slice(&s[..n]);
}

/// Append a basic.publish method frame.
pub fn put_publish(out: &mut Vec<u8>, ch: u16, exchange: &[u8], rk: &[u8]) {
    let start = out.len();
    out.push(FRAME_METHOD);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&60u16.to_be_bytes());
    out.extend_from_slice(&40u16.to_be_bytes());
    out.extend_from_slice(&[0, 0]);
    put_shortstr(out, exchange);
    put_shortstr(out, rk);
    out.push(0);
    let size = (out.len() - start - 7) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Append a content header frame with optional correlation-id / reply-to / delivery-mode.
pub fn put_header(
    out: &mut Vec<u8>,
    ch: u16,
    body_size: u64,
    corr: Option<&[u8]>,
    reply_to: Option<&[u8]>,
    delivery_mode: Option<u8>,
) {
    let start = out.len();
    out.push(FRAME_HEADER);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&60u16.to_be_bytes());
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&body_size.to_be_bytes());
    let mut flags = 0u16;
    if delivery_mode.is_some() {
        flags |= 0x1000;
    }
    if corr.is_some() {
        flags |= 0x0400;
    }
    if reply_to.is_some() {
        flags |= 0x0200;
    }
    out.extend_from_slice(&flags.to_be_bytes());
    if let Some(d) = delivery_mode {
        out.push(d);
    }
    if let Some(c) = corr {
        put_shortstr(out, c);
    }
    if let Some(r) = reply_to {
        put_shortstr(out, r);
    }
    let size = (out.len() - start - 7) as u32;
    out[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    out.push(FRAME_END);
}

/// Append body frames for `body`, split at frame_max. Returns offset of the body's first byte.
pub fn put_body(out: &mut Vec<u8>, ch: u16, body: &[u8], frame_max: u32) -> usize {
    let chunk = (frame_max as usize).saturating_sub(8).max(4096);
    let mut first = out.len() + 7;
    if body.is_empty() {
        first = usize::MAX;
    }
    for part in body.chunks(chunk) {
        out.push(FRAME_BODY);
        out.extend_from_slice(&ch.to_be_bytes());
        out.extend_from_slice(&(part.len() as u32).to_be_bytes());
        out.extend_from_slice(part);
        out.push(FRAME_END);
    }
    first
}

/// (correlation-id, reply-to)
pub type CorrReply<'a> = (Option<&'a [u8]>, Option<&'a [u8]>);

/// Parse correlation-id and reply-to from a content header payload.
pub fn header_props(p: &[u8]) -> Option<CorrReply<'_>> {
    let flags = be16(p, 12)?;
    let mut i = 14usize;
    let shortstr = |i: &mut usize| -> Option<&[u8]> {
        let n = *p.get(*i)? as usize;
        let s = p.get(*i + 1..*i + 1 + n)?;
        *i += 1 + n;
        Some(s)
    };
    if flags & 0x8000 != 0 {
        shortstr(&mut i)?;
    }
    if flags & 0x4000 != 0 {
        shortstr(&mut i)?;
    }
    if flags & 0x2000 != 0 {
        let n = u32::from_be_bytes(p.get(i..i + 4)?.try_into().ok()?) as usize;
        i = i.checked_add(4 + n)?;
    }
    if flags & 0x1000 != 0 {
        i += 1;
    }
    if flags & 0x0800 != 0 {
        i += 1;
    }
    let corr = if flags & 0x0400 != 0 {
        Some(shortstr(&mut i)?)
    } else {
        None
    };
    let reply = if flags & 0x0200 != 0 {
        Some(shortstr(&mut i)?)
    } else {
        None
    };
    Some((corr, reply))
}

/// basic.ack method frame (multiple flag).
pub fn put_ack(out: &mut Vec<u8>, ch: u16, tag: u64, multiple: bool) {
    out.push(FRAME_METHOD);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(&60u16.to_be_bytes());
    out.extend_from_slice(&80u16.to_be_bytes());
    out.extend_from_slice(&tag.to_be_bytes());
    out.push(multiple as u8);
    out.push(FRAME_END);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scanner_and_encoders_roundtrip() {
        let mut out = Vec::new();
        put_publish(&mut out, 1, b"x", b"rk");
        let hs = out.len();
        put_header(&mut out, 1, 9, Some(b"c1"), Some(b"reply"), Some(2));
        let bs = out.len();
        let off = put_body(&mut out, 1, b"123456789", 4096 + 8);
        assert_eq!(&out[off..off + 9], b"123456789");
        // Frames scan back in order and amq-protocol agrees with the encoding.
        let (ty, ch, len) = scan_frame(&out, 1 << 20).unwrap().unwrap();
        assert_eq!((ty, ch, len), (FRAME_METHOD, 1, hs));
        assert!(matches!(
            parse_frame(&out[..hs]),
            Ok((_, AMQPFrame::Method(1, _)))
        ));
        let (ty, _, len) = scan_frame(&out[hs..], 1 << 20).unwrap().unwrap();
        assert_eq!((ty, len), (FRAME_HEADER, bs - hs));
        match parse_frame(&out[hs..bs]) {
            Ok((_, AMQPFrame::Header(1, h))) => {
                assert_eq!(h.body_size, 9);
                assert_eq!(
                    h.properties.correlation_id().as_ref().map(|s| s.as_str()),
                    Some("c1")
                );
                assert_eq!(
                    h.properties.reply_to().as_ref().map(|s| s.as_str()),
                    Some("reply")
                );
                assert_eq!(*h.properties.delivery_mode(), Some(2));
            }
            other => panic!("{other:?}"),
        }
        let (corr, reply) = header_props(&out[hs + 7..bs - 1]).unwrap();
        assert_eq!((corr, reply), (Some(&b"c1"[..]), Some(&b"reply"[..])));
        // Incomplete and malformed input.
        assert!(scan_frame(&out[..5], 1 << 20).unwrap().is_none());
        assert!(scan_frame(&out[..hs - 1], 1 << 20).unwrap().is_none());
        let mut bad = out[..hs].to_vec();
        bad[hs - 1] = 0;
        assert!(scan_frame(&bad, 1 << 20).is_err());
        assert!(scan_frame(&[1, 0, 0, 0xff, 0xff, 0xff, 0xff], 1 << 20).is_err());
        assert!(header_props(&[0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0x04, 0, 50]).is_none());
        let e = decode_close(
            "channel",
            &[0, 20, 0, 40, 1, 0x94, 3, b'b', b'a', b'd', 0, 50, 0, 10],
        );
        assert_eq!(
            e.to_string(),
            "broker closed the channel: 404 bad (caused by class 50 method 10)"
        );
        assert!(matches!(
            decode_close("connection", &[0, 10]),
            Error::Closed(_, 0, _, 0, 0)
        ));
    }
}
