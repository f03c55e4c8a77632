//! `--null-broker PORT`: a do-nothing AMQP peer used to calibrate the
//! generator's own CPU cost. It completes the handshake, answers setup methods,
//! discards publishes (confirming them with multiple=true once per read), and
//! after basic.consume streams pre-encoded deliveries as fast as the socket
//! takes them. It is not a broker: publishes and deliveries are unrelated.

use crate::conn::{self, Error, FRAME_METHOD, Result, be16};
use amq_protocol::frame::{AMQPFrame, parse_frame};
use amq_protocol::protocol::{AMQPClass, basic, channel, confirm, connection, exchange, queue};
use amq_protocol::types::{FieldTable, LongString, ShortString};
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};

const FRAME_MAX: u32 = 131072;

pub fn serve(port: u16, body_size: usize) -> Result<i32> {
    let l = TcpListener::bind(("127.0.0.1", port))
        .map_err(|e| Error::Io(format!("cannot listen on 127.0.0.1:{port}"), e))?;
    eprintln!(
        "warren-perf null broker listening on 127.0.0.1:{port} (deliveries of {body_size} B)"
    );
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        std::thread::spawn(move || {
            if let Err(e) = handle(s, body_size)
                && !matches!(&e, Error::Io(_, ioe) if ioe.kind() == io::ErrorKind::UnexpectedEof)
            {
                eprintln!("null broker: connection ended: {e}");
            }
        });
    }
    Ok(0)
}

fn send(s: &mut TcpStream, ch: u16, m: AMQPClass) -> Result<()> {
    let mut out = Vec::new();
    conn::encode(&AMQPFrame::Method(ch, m), &mut out);
    s.write_all(&out).map_err(|e| Error::Io("write".into(), e))
}

fn handle(mut s: TcpStream, body_size: usize) -> Result<()> {
    let _ = s.set_nodelay(true);
    let mut hdr = [0u8; 8];
    s.read_exact(&mut hdr)
        .map_err(|e| Error::Io("read".into(), e))?;
    if &hdr != b"AMQP\x00\x00\x09\x01" {
        let _ = s.write_all(b"AMQP\x00\x00\x09\x01");
        return Err(Error::Protocol("bad protocol header".into()));
    }
    send(
        &mut s,
        0,
        AMQPClass::Connection(connection::AMQPMethod::Start(connection::Start {
            version_major: 0,
            version_minor: 9,
            server_properties: FieldTable::default(),
            mechanisms: LongString::from("PLAIN"),
            locales: LongString::from("en_US"),
        })),
    )?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut a, mut e) = (0usize, 0usize);
    let mut confirms = false;
    let mut published = 0u64;
    let mut out = Vec::with_capacity(4096);
    let stop = Arc::new(AtomicBool::new(false));
    let mut source: Option<std::thread::JoinHandle<()>> = None;
    let result = (|| -> Result<()> {
        loop {
            // parse all complete frames
            while let Some((ty, ch, len)) = conn::scan_frame(&buf[a..e], FRAME_MAX as usize)? {
                let f = &buf[a..a + len];
                let p = &f[7..len - 1];
                a += len;
                if ty != FRAME_METHOD {
                    continue;
                }
                match (be16(p, 0), be16(p, 2)) {
                    (Some(60), Some(40)) => {
                        published += 1;
                        continue;
                    }
                    (Some(60), Some(80)) => continue,
                    _ => {}
                }
                let m = match parse_frame(f) {
                    Ok((_, AMQPFrame::Method(_, m))) => m,
                    _ => return Err(Error::Protocol("unparsable method".into())),
                };
                use AMQPClass as C;
                let reply = match m {
                    C::Connection(connection::AMQPMethod::StartOk(_)) => Some(C::Connection(
                        connection::AMQPMethod::Tune(connection::Tune {
                            channel_max: 2047,
                            frame_max: FRAME_MAX,
                            heartbeat: 0,
                        }),
                    )),
                    C::Connection(connection::AMQPMethod::TuneOk(_)) => None,
                    C::Connection(connection::AMQPMethod::Open(_)) => Some(C::Connection(
                        connection::AMQPMethod::OpenOk(connection::OpenOk {}),
                    )),
                    C::Connection(connection::AMQPMethod::Close(_)) => {
                        send(
                            &mut s,
                            0,
                            C::Connection(connection::AMQPMethod::CloseOk(connection::CloseOk {})),
                        )?;
                        return Ok(());
                    }
                    C::Channel(channel::AMQPMethod::Open(_)) => {
                        Some(C::Channel(channel::AMQPMethod::OpenOk(channel::OpenOk {})))
                    }
                    C::Queue(queue::AMQPMethod::Declare(d)) => {
                        Some(C::Queue(queue::AMQPMethod::DeclareOk(queue::DeclareOk {
                            queue: d.queue,
                            message_count: 0,
                            consumer_count: 0,
                        })))
                    }
                    C::Queue(queue::AMQPMethod::Bind(_)) => {
                        Some(C::Queue(queue::AMQPMethod::BindOk(queue::BindOk {})))
                    }
                    C::Queue(queue::AMQPMethod::Delete(_)) => {
                        Some(C::Queue(queue::AMQPMethod::DeleteOk(queue::DeleteOk {
                            message_count: 0,
                        })))
                    }
                    C::Exchange(exchange::AMQPMethod::Declare(_)) => Some(C::Exchange(
                        exchange::AMQPMethod::DeclareOk(exchange::DeclareOk {}),
                    )),
                    C::Basic(basic::AMQPMethod::Qos(_)) => {
                        Some(C::Basic(basic::AMQPMethod::QosOk(basic::QosOk {})))
                    }
                    C::Confirm(confirm::AMQPMethod::Select(_)) => {
                        confirms = true;
                        Some(C::Confirm(confirm::AMQPMethod::SelectOk(
                            confirm::SelectOk {},
                        )))
                    }
                    C::Basic(basic::AMQPMethod::Consume(c)) => {
                        send(
                            &mut s,
                            ch,
                            C::Basic(basic::AMQPMethod::ConsumeOk(basic::ConsumeOk {
                                consumer_tag: c.consumer_tag.clone(),
                            })),
                        )?;
                        let w = s.try_clone().map_err(|e| Error::Io("dup".into(), e))?;
                        let st = stop.clone();
                        let tag = c.consumer_tag.to_string();
                        source = Some(std::thread::spawn(move || {
                            stream_deliveries(w, ch, &tag, body_size, &st)
                        }));
                        None
                    }
                    _ => None,
                };
                if let Some(r) = reply {
                    send(&mut s, ch, r)?;
                }
            }
            if confirms && published > 0 {
                out.clear();
                conn::put_ack(&mut out, 1, published, true);
                s.write_all(&out)
                    .map_err(|e| Error::Io("write".into(), e))?;
            }
            buf.copy_within(a..e, 0);
            e -= a;
            a = 0;
            let n = s
                .read(&mut buf[e..])
                .map_err(|e| Error::Io("read".into(), e))?;
            if n == 0 {
                return Err(Error::Io(
                    "eof".into(),
                    io::Error::from(io::ErrorKind::UnexpectedEof),
                ));
            }
            e += n;
        }
    })();
    stop.store(true, Relaxed);
    let _ = s.shutdown(std::net::Shutdown::Both);
    if let Some(h) = source {
        let _ = h.join();
    }
    result
}

fn stream_deliveries(mut w: TcpStream, ch: u16, tag: &str, body_size: usize, stop: &AtomicBool) {
    // One delivery: basic.deliver + header + body (timestamp patched per batch).
    let mut one = Vec::new();
    let start = one.len();
    one.push(FRAME_METHOD);
    one.extend_from_slice(&ch.to_be_bytes());
    one.extend_from_slice(&[0; 4]);
    one.extend_from_slice(&60u16.to_be_bytes());
    one.extend_from_slice(&60u16.to_be_bytes());
    conn::put_shortstr(&mut one, tag.as_bytes());
    let tag_off = one.len();
    one.extend_from_slice(&0u64.to_be_bytes());
    one.push(0);
    conn::put_shortstr(&mut one, b"");
    conn::put_shortstr(&mut one, b"warren-perf");
    let size = (one.len() - start - 7) as u32;
    one[start + 3..start + 7].copy_from_slice(&size.to_be_bytes());
    one.push(conn::FRAME_END);
    conn::put_header(&mut one, ch, body_size as u64, None, None, None);
    let body = vec![b'n'; body_size.max(8)];
    let ts_off = conn::put_body(&mut one, ch, &body, FRAME_MAX);
    let n = (128 * 1024 / one.len()).clamp(1, 4096);
    let mut batch = Vec::with_capacity(n * one.len());
    for _ in 0..n {
        batch.extend_from_slice(&one);
    }
    let _ = ShortString::from("");
    let mut dtag = 0u64;
    while !stop.load(Relaxed) {
        let ts = crate::now_ns().to_be_bytes();
        for k in 0..n {
            dtag += 1;
            let o = k * one.len();
            batch[o + tag_off..o + tag_off + 8].copy_from_slice(&dtag.to_be_bytes());
            batch[o + ts_off..o + ts_off + 8].copy_from_slice(&ts);
        }
        if w.write_all(&batch).is_err() {
            return;
        }
    }
}
