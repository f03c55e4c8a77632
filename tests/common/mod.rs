//! Test fixtures: a real Warren on an ephemeral loopback port, and helpers
//! to talk to it with lapin or raw bytes.
#![allow(dead_code)]

use lapin::{Connection, ConnectionProperties};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use warren::config::Config;
use warren::server::{self, ServerHandle};

/// A broker running in this process on 127.0.0.1:0.
pub struct TestBroker {
    pub handle: Option<ServerHandle>,
    pub addr: SocketAddr,
    /// Management API address (mgmt and metrics listen on free ports).
    pub mgmt_addr: Option<SocketAddr>,
    /// Prometheus metrics address.
    pub metrics_addr: Option<SocketAddr>,
    pub dir: tempfile::TempDir,
}

fn init_logs() {
    if std::env::var("WARREN_TEST_VERBOSE").is_ok() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("debug")
            .try_init();
    }
}

impl TestBroker {
    pub async fn start() -> TestBroker {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(tweak: impl FnOnce(&mut Config)) -> TestBroker {
        init_logs();
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = Config::default();
        cfg.amqp.port = 0;
        cfg.mgmt.port = 0;
        cfg.metrics.port = 0;
        cfg.storage.data_dir = dir.path().to_path_buf();
        cfg.mgmt.port = 0;
        cfg.metrics.port = 0;
        tweak(&mut cfg);
        let handle = server::start(Arc::new(cfg)).await.expect("server starts");
        let addr = handle.amqp_addr;
        TestBroker {
            mgmt_addr: handle.mgmt_addr,
            metrics_addr: handle.metrics_addr,
            handle: Some(handle),
            addr,
            dir,
        }
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }

    pub async fn connect(&self) -> Connection {
        Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("connect")
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.shutdown().await;
        }
    }
}

/// Waits for `fut` at most `secs` seconds, failing the test otherwise.
pub async fn within<T>(secs: u64, fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), fut)
        .await
        .expect("timed out")
}

// ---------------------------------------------------------------------------
// lapin helpers

/// The (reply code, reply text) of an AMQP error (channel.close or
/// connection.close) carried by a lapin error, if it is one.
pub fn amqp_error(e: &lapin::Error) -> Option<(u16, String)> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(a) => Some((a.get_id(), a.get_message().to_string())),
        _ => None,
    }
}

/// Unwraps the AMQP error of a result that must have failed with one.
#[track_caller]
pub fn expect_amqp_error<T: std::fmt::Debug>(r: lapin::Result<T>) -> (u16, String) {
    match r {
        Ok(v) => panic!("expected an AMQP error, got Ok({v:?})"),
        Err(e) => amqp_error(&e).unwrap_or_else(|| panic!("expected an AMQP error, got {e:?}")),
    }
}

/// Declares a plain (non-durable, non-exclusive) queue.
pub async fn declare_queue(ch: &lapin::Channel, name: &str) -> lapin::Queue {
    ch.queue_declare(
        name.into(),
        lapin::options::QueueDeclareOptions::default(),
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("queue.declare")
}

/// Publishes `body` with default properties.
pub async fn publish(ch: &lapin::Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    ch.basic_publish(
        exchange.into(),
        routing_key.into(),
        lapin::options::BasicPublishOptions::default(),
        body,
        lapin::BasicProperties::default(),
    )
    .await
    .expect("basic.publish");
}

/// Drains a queue with basic.get (auto-ack), returning the bodies in order.
/// Waits briefly first so that in-flight publishes have been routed.
pub async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<String> {
    settle().await;
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).into_owned());
    }
    out
}

/// Lets in-flight frames be processed (publishes are asynchronous).
pub async fn settle() {
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Queue message count via passive declare on a fresh channel.
pub async fn message_count(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("passive declare");
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

// ---------------------------------------------------------------------------
// Raw AMQP over TCP, for what lapin will not send.

use amq_protocol::frame::{AMQPFrame, WriteContext, gen_frame, parse_frame};
use amq_protocol::protocol::{AMQPClass, connection as conn_m};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream a [`RawClient`] talks over: TCP, or TLS over TCP.
pub trait RawIo: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> RawIo for T {}

pub const AMQP_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// A raw AMQP 0-9-1 client.
pub struct RawClient {
    pub stream: Box<dyn RawIo>,
    buf: Vec<u8>,
    /// Server properties from connection.start (after `handshake`).
    pub server_properties: lapin::types::FieldTable,
    /// Tune parameters the server proposed.
    pub tune: Option<conn_m::Tune>,
}

/// What `RawClient::next` saw.
#[derive(Debug)]
pub enum RawEvent {
    Frame(AMQPFrame),
    /// Bytes that are not a frame (e.g. a protocol header).
    Bytes(Vec<u8>),
    Eof,
}

/// Encodes one frame.
pub fn encode_frame(f: &AMQPFrame) -> Vec<u8> {
    let ctx = WriteContext::from(Vec::new());
    gen_frame::<Vec<u8>>(f)(ctx)
        .expect("gen frame")
        .into_inner()
        .0
}

/// Encodes a frame from its parts (type, channel, payload), with a chosen end octet.
pub fn raw_frame(kind: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut v = vec![kind];
    v.extend_from_slice(&channel.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v.push(end);
    v
}

impl RawClient {
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect(addr).await.expect("tcp connect");
        stream.set_nodelay(true).ok();
        RawClient::over(stream)
    }

    /// A client over an already connected stream (e.g. a TLS session).
    pub fn over(stream: impl RawIo + 'static) -> RawClient {
        RawClient {
            stream: Box::new(stream),
            buf: Vec::new(),
            server_properties: Default::default(),
            tune: None,
        }
    }

    /// Connects and completes the handshake as guest on "/", answering tune
    /// with the server's own values except `heartbeat`.
    pub async fn handshake(addr: SocketAddr, heartbeat: u16) -> RawClient {
        RawClient::connect(addr)
            .await
            .handshake_as_guest(heartbeat)
            .await
    }

    /// Completes the handshake (as `handshake` does) on a fresh client.
    pub async fn handshake_as_guest(self, heartbeat: u16) -> RawClient {
        let mut c = self;
        c.send(AMQP_HEADER).await;
        match c.method().await {
            (0, AMQPClass::Connection(conn_m::AMQPMethod::Start(s))) => {
                c.server_properties = s.server_properties
            }
            other => panic!("expected connection.start, got {other:?}"),
        }
        c.send_method(
            0,
            AMQPClass::Connection(conn_m::AMQPMethod::StartOk(conn_m::StartOk {
                client_properties: Default::default(),
                mechanism: "PLAIN".into(),
                response: "\0guest\0guest".into(),
                locale: "en_US".into(),
            })),
        )
        .await;
        let tune = match c.method().await {
            (0, AMQPClass::Connection(conn_m::AMQPMethod::Tune(t))) => t,
            other => panic!("expected connection.tune, got {other:?}"),
        };
        c.send_method(
            0,
            AMQPClass::Connection(conn_m::AMQPMethod::TuneOk(conn_m::TuneOk {
                channel_max: tune.channel_max,
                frame_max: tune.frame_max,
                heartbeat,
            })),
        )
        .await;
        c.tune = Some(tune);
        c.send_method(
            0,
            AMQPClass::Connection(conn_m::AMQPMethod::Open(conn_m::Open {
                virtual_host: "/".into(),
            })),
        )
        .await;
        match c.method().await {
            (0, AMQPClass::Connection(conn_m::AMQPMethod::OpenOk(_))) => {}
            other => panic!("expected connection.open-ok, got {other:?}"),
        }
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
    }

    pub async fn send_frame(&mut self, f: &AMQPFrame) {
        let b = encode_frame(f);
        self.send(&b).await;
    }

    pub async fn send_method(&mut self, channel: u16, m: AMQPClass) {
        self.send_frame(&AMQPFrame::Method(channel, m)).await;
    }

    /// Opens channel `ch` and waits for open-ok.
    pub async fn open_channel(&mut self, ch: u16) {
        use amq_protocol::protocol::channel as chan_m;
        self.send_method(
            ch,
            AMQPClass::Channel(chan_m::AMQPMethod::Open(chan_m::Open {})),
        )
        .await;
        match self.method().await {
            (c, AMQPClass::Channel(chan_m::AMQPMethod::OpenOk(_))) if c == ch => {}
            other => panic!("expected channel.open-ok on {ch}, got {other:?}"),
        }
    }

    /// Next frame (or EOF), waiting at most 5 s.
    pub async fn next(&mut self) -> RawEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            if self.buf.len() >= 8 && &self.buf[..4] == b"AMQP" {
                let b: Vec<u8> = self.buf.drain(..8).collect();
                return RawEvent::Bytes(b);
            }
            if self.buf.len() >= 7 {
                let size = u32::from_be_bytes([self.buf[3], self.buf[4], self.buf[5], self.buf[6]])
                    as usize;
                if self.buf.len() >= size + 8 {
                    let bytes: Vec<u8> = self.buf.drain(..size + 8).collect();
                    match parse_frame(&bytes[..]) {
                        Ok((_, f)) => return RawEvent::Frame(f),
                        Err(e) => panic!("server sent an unparsable frame {bytes:?}: {e:?}"),
                    }
                }
            }
            // Straight into `buf` (a 64 KiB array here would make every
            // future holding a read too big for a test thread's stack).
            self.buf.reserve(65536);
            let before = self.buf.len();
            let n = match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf))
                .await
            {
                Err(_) => panic!("timed out waiting for a frame"),
                Ok(Err(_)) => 0, // reset counts as closed
                Ok(Ok(n)) => n,
            };
            if n == 0 {
                self.buf.truncate(before);
                if self.buf.is_empty() {
                    return RawEvent::Eof;
                }
                return RawEvent::Bytes(std::mem::take(&mut self.buf));
            }
        }
    }

    /// Next method frame, skipping heartbeats.
    pub async fn method(&mut self) -> (u16, AMQPClass) {
        loop {
            match self.next().await {
                RawEvent::Frame(AMQPFrame::Heartbeat) => continue,
                RawEvent::Frame(AMQPFrame::Method(ch, m)) => return (ch, m),
                other => panic!("expected a method frame, got {other:?}"),
            }
        }
    }

    /// Reads until connection.close, answers close-ok, returns (code, text, class, method).
    pub async fn expect_connection_close(&mut self) -> (u16, String, u16, u16) {
        loop {
            match self.next().await {
                RawEvent::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(conn_m::AMQPMethod::Close(c)),
                )) => {
                    self.send_method(
                        0,
                        AMQPClass::Connection(conn_m::AMQPMethod::CloseOk(conn_m::CloseOk {})),
                    )
                    .await;
                    return (
                        c.reply_code,
                        c.reply_text.to_string(),
                        c.class_id,
                        c.method_id,
                    );
                }
                RawEvent::Frame(_) => continue,
                other => panic!("expected connection.close, got {other:?}"),
            }
        }
    }

    /// Reads until channel.close on `ch`, returns (code, text).
    pub async fn expect_channel_close(&mut self, ch: u16) -> (u16, String) {
        use amq_protocol::protocol::channel as chan_m;
        loop {
            match self.next().await {
                RawEvent::Frame(AMQPFrame::Method(
                    c,
                    AMQPClass::Channel(chan_m::AMQPMethod::Close(cl)),
                )) if c == ch => {
                    return (cl.reply_code, cl.reply_text.to_string());
                }
                RawEvent::Frame(AMQPFrame::Method(
                    0,
                    AMQPClass::Connection(conn_m::AMQPMethod::Close(cl)),
                )) => {
                    panic!(
                        "expected channel.close, got connection.close {} {}",
                        cl.reply_code, cl.reply_text
                    )
                }
                RawEvent::Frame(_) => continue,
                other => panic!("expected channel.close, got {other:?}"),
            }
        }
    }

    /// Reads (discarding frames) until the server closes the socket.
    pub async fn expect_eof(&mut self) {
        loop {
            match self.next().await {
                RawEvent::Eof => return,
                _ => continue,
            }
        }
    }
}

/// Watches a channel for a server-side channel.close: lapin hands the close
/// reason to the channel's consumers, so this holds a consumer (on a
/// server-named exclusive queue) whose stream yields the error. Create it
/// before the asynchronous method (basic.publish, basic.ack...) that should
/// make the server close the channel, then call `error()`.
pub struct ChannelWatch(lapin::Consumer);

pub async fn watch_channel(ch: &lapin::Channel) -> ChannelWatch {
    let q = ch
        .queue_declare(
            "".into(),
            lapin::options::QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("watch queue");
    let c = ch
        .basic_consume(
            q.name().clone(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .expect("watch consumer");
    ChannelWatch(c)
}

impl ChannelWatch {
    /// Waits (at most 5 s) for the channel to be closed by the server and
    /// returns (reply code, reply text).
    pub async fn error(mut self) -> (u16, String) {
        use futures_lite::StreamExt;
        within(5, async {
            loop {
                match self.0.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        break amqp_error(&e)
                            .unwrap_or_else(|| panic!("expected an AMQP error, got {e:?}"));
                    }
                    None => panic!("channel ended without an error"),
                }
            }
        })
        .await
    }
}
