//! The six RabbitMQ tutorials driven with lapin (crates.io), as automated checks.
//!
//! Build: `CARGO_TARGET_DIR=<cache>/lapin/target cargo build --release` in this
//! directory (standalone crate, not part of the warren workspace).
//!
//! Run: `AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f lapin-tutorials SCENARIO`
//! with SCENARIO one of hello_world, work_queues, publish_subscribe, routing,
//! topics, rpc, rpc_direct_reply_to.  Exits 0 on success; on failure the last
//! line printed is the reason (what was expected and what was got).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_lite::StreamExt;
use lapin::{
    options::*, types::FieldTable, BasicProperties, Channel, Connection, ConnectionProperties,
    ExchangeKind,
};

const WAIT: Duration = Duration::from_secs(15);
const GRACE: Duration = Duration::from_millis(400);

type R<T> = Result<T, String>;

macro_rules! ensure {
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err(format!($($arg)+));
        }
    };
}

fn expect_eq<T: PartialEq + std::fmt::Debug>(what: &str, got: &T, want: &T) -> R<()> {
    if got != want {
        return Err(format!("{what}: expected {want:?}, got {got:?}"));
    }
    Ok(())
}

trait Must<T> {
    fn must(self, what: &str) -> R<T>;
}
impl<T> Must<T> for lapin::Result<T> {
    fn must(self, what: &str) -> R<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

fn reply_code<T>(r: &lapin::Result<T>) -> Option<u16> {
    match r {
        Err(e) => match e.kind() {
            lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
            _ => None,
        },
        Ok(_) => None,
    }
}

fn random_hex(n: usize) -> String {
    // no rand crate: mix time, pid and a counter through a simple xorshift
    use std::sync::atomic::{AtomicU64, Ordering};
    static CTR: AtomicU64 = AtomicU64::new(0);
    let t = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
    let mut x = t ^ ((std::process::id() as u64) << 32) ^ CTR.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    let mut s = String::new();
    while s.len() < 2 * n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.push_str(&format!("{:016x}", x));
    }
    s.truncate(2 * n);
    s
}

struct Ctx {
    url: String,
    run: String,
}

impl Ctx {
    fn name(&self, base: &str) -> String {
        format!("conf.{base}.{}", self.run)
    }
    async fn dial(&self) -> R<Connection> {
        tokio::time::timeout(Duration::from_secs(10), Connection::connect(&self.url, ConnectionProperties::default()))
            .await
            .map_err(|_| "connect: timed out after 10s".to_string())?
            .must("connect")
    }
}

async fn channel(c: &Connection) -> R<Channel> {
    c.create_channel().await.must("channel.open")
}

async fn publish(ch: &Channel, exchange: &str, key: &str, body: &str, props: BasicProperties) -> R<()> {
    ch.basic_publish(exchange.into(), key.into(), BasicPublishOptions::default(), body.as_bytes(), props)
        .await
        .must("basic.publish")?;
    Ok(())
}

fn text() -> BasicProperties {
    BasicProperties::default().with_content_type("text/plain".into())
}

async fn wait_for<F: Fn() -> bool>(cond: F, d: Duration) -> bool {
    let deadline = Instant::now() + d;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// An auto-ack consumer recording "routing_key|body" of every delivery.
#[derive(Default)]
struct SubState {
    got: Vec<String>,
    bodies: Vec<String>,
    problems: Vec<String>,
}

struct Sub {
    queue: String,
    st: Arc<Mutex<SubState>>,
    ch: Channel,
}

impl Sub {
    async fn new(c: &Connection, queue: &str, exchange: &str, keys: &[&str]) -> R<Sub> {
        let ch = channel(c).await?;
        let queue = if queue.is_empty() {
            // tutorial style: server-named, exclusive queue
            let q = ch
                .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
                .await
                .must("queue.declare")?;
            q.name().as_str().to_string()
        } else {
            queue.to_string()
        };
        for k in keys {
            ch.queue_bind(queue.as_str().into(), exchange.into(), (*k).into(), QueueBindOptions::default(), FieldTable::default())
                .await
                .must("queue.bind")?;
        }
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
            .await
            .must("basic.consume")?;
        let st = Arc::new(Mutex::new(SubState::default()));
        let st2 = st.clone();
        tokio::spawn(async move {
            while let Some(d) = consumer.next().await {
                let mut s = st2.lock().unwrap();
                match d {
                    Ok(d) => {
                        let body = String::from_utf8_lossy(&d.data).to_string();
                        s.got.push(format!("{}|{}", d.routing_key.as_str(), body));
                        s.bodies.push(body);
                        if d.redelivered {
                            s.problems.push(format!("fresh message flagged redelivered: {:?}", String::from_utf8_lossy(&d.data)));
                        }
                    }
                    Err(e) => {
                        s.problems.push(format!("consumer error: {e}"));
                        break;
                    }
                }
            }
        });
        Ok(Sub { queue, st, ch })
    }
    fn size(&self) -> usize {
        self.st.lock().unwrap().got.len()
    }
    fn snapshot(&self) -> Vec<String> {
        self.st.lock().unwrap().got.clone()
    }
    fn bodies(&self) -> Vec<String> {
        self.st.lock().unwrap().bodies.clone()
    }
    fn problems(&self) -> Vec<String> {
        self.st.lock().unwrap().problems.clone()
    }
}

// ------------------------------------------------------------------ 1
async fn hello_world(cx: &Ctx) -> R<String> {
    let q = cx.name("hello");
    let n = 10;
    let sender = cx.dial().await?;
    let receiver = cx.dial().await?;
    let ch = channel(&sender).await?;
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.must("queue.declare")?;
    // redeclaring with identical arguments is idempotent
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.must("queue.declare (again)")?;
    let mut want = vec![];
    for i in 0..n {
        let body = format!("Hello World! #{i}");
        publish(&ch, "", &q, &body, text()).await?;
        want.push(body);
    }
    // receive.rs: its own connection, declares the queue too, auto-ack
    let rch = channel(&receiver).await?;
    rch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.must("queue.declare (receiver)")?;
    let mut consumer = rch
        .basic_consume(q.as_str().into(), "hello-rx".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .must("basic.consume")?;
    let mut got = vec![];
    let deadline = Instant::now() + WAIT;
    while got.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, consumer.next()).await {
            Ok(Some(Ok(d))) => {
                ensure!(d.exchange.as_str() == "", "delivery exchange {:?}, expected \"\"", d.exchange.as_str());
                expect_eq("routing key", &d.routing_key.as_str().to_string(), &q)?;
                ensure!(!d.redelivered, "fresh message flagged redelivered");
                got.push(String::from_utf8_lossy(&d.data).to_string());
            }
            Ok(Some(Err(e))) => return Err(format!("consumer: {e}")),
            Ok(None) => return Err("consumer stream ended".into()),
            Err(_) => return Err(format!("received {} of {n} messages", got.len())),
        }
    }
    rch.basic_cancel("hello-rx".into(), BasicCancelOptions::default()).await.must("basic.cancel")?;
    // grace: nothing more may arrive (the consumer is cancelled, the queue was drained)
    if let Ok(Some(Ok(d))) = tokio::time::timeout(GRACE, consumer.next()).await {
        return Err(format!("unexpected extra delivery {:?}", String::from_utf8_lossy(&d.data)));
    }
    expect_eq("bodies", &got, &want)?;

    for i in 0..3 {
        publish(&ch, "", &q, &format!("get #{i}"), text()).await?;
    }
    for i in 0..3u32 {
        let m = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.must("basic.get")?;
        let m = m.ok_or_else(|| format!("basic.get #{i} returned get-empty"))?;
        expect_eq(&format!("basic.get #{i}"), &String::from_utf8_lossy(&m.delivery.data).to_string(), &format!("get #{i}"))?;
        expect_eq(&format!("basic.get #{i} message_count"), &m.message_count, &(2 - i))?;
    }
    let m = ch.basic_get(q.as_str().into(), BasicGetOptions { no_ack: true }).await.must("basic.get")?;
    ensure!(m.is_none(), "basic.get on drained queue did not return get-empty");
    let left = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.must("queue.delete")?;
    expect_eq("queue.delete-ok message_count", &left, &0)?;
    let _ = sender.close(200, "bye".into()).await;
    let _ = receiver.close(200, "bye".into()).await;
    Ok(format!("ok: {n} consumed in order, 3 fetched with message_count 2,1,0"))
}

// ------------------------------------------------------------------ 2
async fn work_queues(cx: &Ctx) -> R<String> {
    let q = cx.name("task_queue");
    let n = 20usize;
    let conn = cx.dial().await?;
    let ch = channel(&conn).await?;
    ch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default()).await.must("queue.declare")?;
    let ch2 = channel(&conn).await?;
    let res = ch2.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await;
    ensure!(res.is_err(), "redeclaring a durable queue as non-durable did not fail");
    expect_eq("reply code for inequivalent redeclare", &reply_code(&res), &Some(406))?;

    #[derive(Default)]
    struct W {
        per: HashMap<&'static str, Vec<String>>,
        total: usize,
        problems: Vec<String>,
    }
    let w = Arc::new(Mutex::new(W::default()));
    let mut conns = vec![];
    for (label, delay) in [("fast", 10u64), ("slow", 600u64)] {
        let wc = cx.dial().await?;
        let wch = channel(&wc).await?;
        wch.queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), FieldTable::default()).await.must("queue.declare (worker)")?;
        wch.basic_qos(1, BasicQosOptions::default()).await.must("basic.qos")?;
        let mut consumer = wch
            .basic_consume(q.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .must("basic.consume")?;
        let w2 = w.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = consumer.next().await {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                let body = String::from_utf8_lossy(&d.data).to_string();
                {
                    let mut s = w2.lock().unwrap();
                    if d.redelivered {
                        s.problems.push(format!("redelivered {body}"));
                    }
                    if *d.properties.delivery_mode() != Some(2) {
                        s.problems.push(format!("delivery_mode {:?} for {body}", d.properties.delivery_mode()));
                    }
                    s.per.entry(label).or_default().push(body);
                    s.total += 1;
                }
                if let Err(e) = d.ack(BasicAckOptions::default()).await {
                    w2.lock().unwrap().problems.push(format!("ack: {e}"));
                }
            }
        });
        conns.push(wc);
    }
    let mut want = vec![];
    for i in 0..n {
        let body = format!("task {i}{}", ".".repeat(i % 3));
        publish(&ch, "", &q, &body, text().with_delivery_mode(2)).await?;
        want.push(body);
    }
    let done = wait_for(|| w.lock().unwrap().total >= n, WAIT).await;
    tokio::time::sleep(GRACE + Duration::from_millis(600)).await;
    let s = w.lock().unwrap();
    let total = s.total;
    ensure!(done, "only {total} of {n} tasks processed");
    ensure!(s.problems.is_empty(), "{}", s.problems.join("; "));
    let fast = s.per.get("fast").cloned().unwrap_or_default();
    let slow = s.per.get("slow").cloned().unwrap_or_default();
    let mut all: Vec<String> = fast.iter().chain(slow.iter()).cloned().collect();
    all.sort();
    let mut sorted = want.clone();
    sorted.sort();
    expect_eq("processed tasks (each exactly once)", &all, &sorted)?;
    ensure!(!fast.is_empty() && !slow.is_empty(), "not both workers got work: fast={} slow={}", fast.len(), slow.len());
    ensure!(slow.len() <= n / 4, "prefetch=1 fair dispatch not honoured: slow worker got {} of {n}", slow.len());
    for (label, l) in [("fast", &fast), ("slow", &slow)] {
        let mut ordered = l.clone();
        ordered.sort_by_key(|b| want.iter().position(|x| x == b));
        expect_eq(&format!("{label} worker's share in publish order"), l, &ordered)?;
    }
    drop(s);
    let st = ch
        .queue_declare(q.as_str().into(), QueueDeclareOptions { passive: true, durable: true, ..Default::default() }, FieldTable::default())
        .await
        .must("queue.declare passive")?;
    expect_eq("queue depth after all acks", &st.message_count(), &0)?;
    ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.must("queue.delete")?;
    let (nf, ns) = (fast.len(), slow.len());
    for c in conns {
        let _ = c.close(200, "bye".into()).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(format!("ok: fast={nf} slow={ns}"))
}

// ------------------------------------------------------------------ 3
async fn publish_subscribe(cx: &Ctx) -> R<String> {
    let ex = cx.name("logs");
    let n = 10;
    let (pubc, c1, c2) = (cx.dial().await?, cx.dial().await?, cx.dial().await?);
    let ch = channel(&pubc).await?;
    ch.exchange_declare(ex.as_str().into(), ExchangeKind::Fanout, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .must("exchange.declare")?;
    let a = Sub::new(&c1, "", &ex, &[""]).await?;
    let b = Sub::new(&c2, "", &ex, &[""]).await?;
    for s in [&a, &b] {
        ensure!(s.queue.starts_with("amq.gen-"), "server-named queue {:?} does not start with amq.gen-", s.queue);
    }
    ensure!(a.queue != b.queue, "two server-named queues got the same name");
    let mut want = vec![];
    for i in 0..n {
        let body = format!("log line {i}");
        publish(&ch, &ex, &format!("ignored.{i}"), &body, text()).await?;
        want.push(body);
    }
    let ok = wait_for(|| a.size() >= n && b.size() >= n, WAIT).await;
    tokio::time::sleep(GRACE).await;
    ensure!(ok, "received {} and {} of {n}", a.size(), b.size());
    expect_eq("subscriber 1", &a.bodies(), &want)?;
    expect_eq("subscriber 2", &b.bodies(), &want)?;
    for s in [&a, &b] {
        ensure!(s.problems().is_empty(), "{}", s.problems().join("; "));
    }
    ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default()).await.must("exchange.delete")?;
    for c in [pubc, c1, c2] {
        let _ = c.close(200, "bye".into()).await;
    }
    Ok(format!("ok: 2 subscribers x {n} messages"))
}

// ------------------------------------------------------------------ 4
async fn routing(cx: &Ctx) -> R<String> {
    let ex = cx.name("direct_logs");
    let (pubc, c1, c2) = (cx.dial().await?, cx.dial().await?, cx.dial().await?);
    let ch = channel(&pubc).await?;
    ch.exchange_declare(ex.as_str().into(), ExchangeKind::Direct, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .must("exchange.declare")?;
    let err_only = Sub::new(&c1, "", &ex, &["error"]).await?;
    let iwe = Sub::new(&c2, "", &ex, &["info", "warning", "error"]).await?;
    let (mut want_err, mut want_iwe) = (vec![], vec![]);
    let sevs = ["info", "warning", "error", "debug", "error", "info", "critical", "warning", "error", "debug"];
    for (i, sev) in sevs.iter().enumerate() {
        let body = format!("{sev}: message {i}");
        publish(&ch, &ex, sev, &body, text()).await?;
        if *sev == "error" {
            want_err.push(format!("{sev}|{body}"));
        }
        if ["info", "warning", "error"].contains(sev) {
            want_iwe.push(format!("{sev}|{body}"));
        }
    }
    let ok = wait_for(|| err_only.size() >= want_err.len() && iwe.size() >= want_iwe.len(), WAIT).await;
    tokio::time::sleep(GRACE).await;
    ensure!(ok, "received {}/{} and {}/{}", err_only.size(), want_err.len(), iwe.size(), want_iwe.len());
    expect_eq("error-only consumer", &err_only.snapshot(), &want_err)?;
    expect_eq("info+warning+error consumer", &iwe.snapshot(), &want_iwe)?;
    // after queue.unbind of "info", the second consumer gets no more info messages
    iwe.ch
        .queue_unbind(iwe.queue.as_str().into(), ex.as_str().into(), "info".into(), FieldTable::default())
        .await
        .must("queue.unbind")?;
    publish(&ch, &ex, "info", "info: after unbind", text()).await?;
    publish(&ch, &ex, "warning", "warning: after unbind", text()).await?;
    let ok = wait_for(|| iwe.size() > want_iwe.len(), WAIT).await;
    tokio::time::sleep(GRACE).await;
    ensure!(ok, "no delivery after unbind");
    want_iwe.push("warning|warning: after unbind".into());
    expect_eq("info+warning+error consumer after unbinding info", &iwe.snapshot(), &want_iwe)?;
    expect_eq("error-only consumer (unchanged)", &err_only.snapshot(), &want_err)?;
    ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default()).await.must("exchange.delete")?;
    for c in [pubc, c1, c2] {
        let _ = c.close(200, "bye".into()).await;
    }
    Ok("ok: exact severities per consumer, unbind honoured".into())
}

// ------------------------------------------------------------------ 5
async fn topics(cx: &Ctx) -> R<String> {
    let ex = cx.name("topic_logs");
    let order = ["Q1", "Q2", "all", "kern", "critical", "mid"];
    let bindings: HashMap<&str, Vec<&str>> = HashMap::from([
        ("Q1", vec!["*.orange.*"]),
        ("Q2", vec!["*.*.rabbit", "lazy.#"]),
        ("all", vec!["#"]),
        ("kern", vec!["kern.*"]),
        ("critical", vec!["*.critical"]),
        ("mid", vec!["#.fox.#"]),
    ]);
    let table = [
        ("quick.orange.rabbit", "Q1 Q2 all"),
        ("lazy.orange.elephant", "Q1 Q2 all"),
        ("quick.orange.fox", "Q1 all mid"),
        ("lazy.brown.fox", "Q2 all mid"),
        ("lazy.pink.rabbit", "Q2 all"),
        ("quick.brown.fox", "all mid"),
        ("orange", "all"),
        ("quick.orange.new.rabbit", "all"),
        ("lazy.orange.new.rabbit", "Q2 all"),
        ("quick.orange.male.rabbit", "all"),
        ("lazy", "Q2 all"),
        ("kern.critical", "all kern critical"),
        ("kern", "all"),
        ("kern.disk.critical", "all"),
        ("a.critical", "all critical"),
        ("fox", "all mid"),
        ("a.b.fox.c.d", "all mid"),
        ("foxes.orange.x", "Q1 all"),
    ];
    let (pubc, sc) = (cx.dial().await?, cx.dial().await?);
    let ch = channel(&pubc).await?;
    ch.exchange_declare(ex.as_str().into(), ExchangeKind::Topic, ExchangeDeclareOptions::default(), FieldTable::default())
        .await
        .must("exchange.declare")?;
    let mut subs = HashMap::new();
    let mut want: HashMap<&str, Vec<String>> = HashMap::new();
    for qn in order {
        subs.insert(qn, Sub::new(&sc, "", &ex, &bindings[qn]).await?);
        want.insert(qn, vec![]);
    }
    for (i, (key, queues)) in table.iter().enumerate() {
        let body = format!("{key} #{i}");
        publish(&ch, &ex, key, &body, text()).await?;
        for qn in queues.split_whitespace() {
            want.get_mut(qn).unwrap().push(format!("{key}|{body}"));
        }
    }
    wait_for(|| order.iter().all(|qn| subs[qn].size() >= want[qn].len()), WAIT).await;
    tokio::time::sleep(GRACE).await;
    let keys = |l: &[String]| l.iter().map(|s| s.split('|').next().unwrap().to_string()).collect::<Vec<_>>();
    for qn in order {
        let got = subs[qn].snapshot();
        if got != want[qn] {
            return Err(format!("queue {qn} bound {:?}: expected keys {:?}, got {:?}", bindings[qn], keys(&want[qn]), keys(&got)));
        }
    }
    ch.exchange_delete(ex.as_str().into(), ExchangeDeleteOptions::default()).await.must("exchange.delete")?;
    for c in [pubc, sc] {
        let _ = c.close(200, "bye".into()).await;
    }
    Ok(format!("ok: {} routing keys x {} queues match the table", table.len(), order.len()))
}

// ------------------------------------------------------------------ 6
fn fib(n: u64) -> u64 {
    let (mut a, mut b) = (0u64, 1u64);
    for _ in 0..n {
        (a, b) = (b, a + b);
    }
    a
}

async fn rpc(cx: &Ctx, direct: bool) -> R<String> {
    let q = cx.name("rpc_queue");
    let (sc, cc) = (cx.dial().await?, cx.dial().await?);

    // server: prefetch 1, manual ack, replies to reply_to with the correlation id
    let sch = channel(&sc).await?;
    sch.queue_declare(q.as_str().into(), QueueDeclareOptions::default(), FieldTable::default()).await.must("queue.declare")?;
    sch.basic_qos(1, BasicQosOptions::default()).await.must("basic.qos")?;
    let mut reqs = sch
        .basic_consume(q.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .must("basic.consume")?;
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let problems: Arc<Mutex<Vec<String>>> = Arc::default();
    {
        let (seen, problems, sch) = (seen.clone(), problems.clone(), sch.clone());
        tokio::spawn(async move {
            while let Some(Ok(d)) = reqs.next().await {
                let n: u64 = String::from_utf8_lossy(&d.data).parse().unwrap_or(0);
                let reply_to = d.properties.reply_to().clone().map(|s| s.as_str().to_string()).unwrap_or_default();
                seen.lock().unwrap().push(reply_to.clone());
                let mut props = BasicProperties::default();
                if let Some(c) = d.properties.correlation_id().clone() {
                    props = props.with_correlation_id(c);
                }
                let r = sch
                    .basic_publish("".into(), reply_to.as_str().into(), BasicPublishOptions::default(), fib(n).to_string().as_bytes(), props)
                    .await;
                let r = match r {
                    Ok(_) => d.ack(BasicAckOptions::default()).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    problems.lock().unwrap().push(format!("server: {e}"));
                }
            }
        });
    }

    // client
    let cch = channel(&cc).await?;
    let reply_to = if direct {
        "amq.rabbitmq.reply-to".to_string()
    } else {
        let rq = cch
            .queue_declare("".into(), QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() }, FieldTable::default())
            .await
            .must("queue.declare (callback queue)")?;
        rq.name().as_str().to_string()
    };
    // direct reply-to: consume (no-ack) from the pseudo-queue before publishing, same channel
    let mut replies = cch
        .basic_consume(reply_to.as_str().into(), "".into(), BasicConsumeOptions { no_ack: true, ..Default::default() }, FieldTable::default())
        .await
        .must("basic.consume (replies)")?;
    #[derive(Default)]
    struct C {
        pending: HashMap<String, bool>,
        got: HashMap<String, String>,
        stray: Vec<String>,
    }
    let c = Arc::new(Mutex::new(C::default()));
    {
        let c = c.clone();
        tokio::spawn(async move {
            while let Some(Ok(d)) = replies.next().await {
                let corr = d.properties.correlation_id().clone().map(|s| s.as_str().to_string()).unwrap_or_default();
                let body = String::from_utf8_lossy(&d.data).to_string();
                let mut s = c.lock().unwrap();
                if s.pending.remove(&corr).is_some() {
                    s.got.insert(corr, body);
                } else {
                    s.stray.push(format!("{corr}={body}"));
                }
            }
        });
    }
    let send = |n: u64| {
        let corr = random_hex(12);
        c.lock().unwrap().pending.insert(corr.clone(), true);
        let props = BasicProperties::default().with_reply_to(reply_to.as_str().into()).with_correlation_id(corr.as_str().into());
        let cch = cch.clone();
        let q = q.clone();
        async move {
            publish(&cch, "", &q, &n.to_string(), props).await?;
            Ok::<String, String>(corr)
        }
    };
    let has = |corrs: Vec<String>| {
        let c = c.clone();
        move || {
            let s = c.lock().unwrap();
            corrs.iter().all(|k| s.got.contains_key(k))
        }
    };
    let mut calls = 0;
    for n in [0u64, 1, 2, 10, 30] {
        let corr = send(n).await?;
        calls += 1;
        ensure!(wait_for(has(vec![corr.clone()]), WAIT).await, "no reply for fib({n})");
        let r = c.lock().unwrap().got[&corr].clone();
        expect_eq(&format!("fib({n})"), &r, &fib(n).to_string())?;
    }
    let mut in_flight = vec![];
    for n in [5u64, 7, 11, 13, 17, 19, 23, 29] {
        let corr = send(n).await?;
        calls += 1;
        in_flight.push((corr, n));
    }
    ensure!(wait_for(has(in_flight.iter().map(|(k, _)| k.clone()).collect()), WAIT).await, "pipelined replies missing");
    tokio::time::sleep(GRACE).await;
    {
        let s = c.lock().unwrap();
        for (corr, n) in &in_flight {
            expect_eq(&format!("pipelined fib({n})"), &s.got[corr], &fib(*n).to_string())?;
        }
        ensure!(s.stray.is_empty(), "unexpected replies: {:?}", s.stray);
    }
    let p = problems.lock().unwrap().clone();
    ensure!(p.is_empty(), "{}", p.join("; "));
    let seen = seen.lock().unwrap().clone();
    expect_eq("requests seen by server", &seen.len(), &calls)?;
    for r in &seen {
        if direct {
            ensure!(r.starts_with("amq.rabbitmq.reply-to."), "server saw reply_to {r:?}, expected amq.rabbitmq.reply-to.<token>");
        } else {
            expect_eq("reply_to seen by server", r, &reply_to)?;
        }
    }
    channel(&cc).await?.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await.must("queue.delete")?;
    for c in [sc, cc] {
        let _ = c.close(200, "bye".into()).await;
    }
    Ok(format!("ok: {calls} calls answered with matching correlation ids"))
}

#[tokio::main]
async fn main() {
    let scenario = std::env::args().nth(1).unwrap_or_default();
    let cx = Ctx {
        url: std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into()),
        run: random_hex(5),
    };
    let res = match scenario.as_str() {
        "hello_world" => hello_world(&cx).await,
        "work_queues" => work_queues(&cx).await,
        "publish_subscribe" => publish_subscribe(&cx).await,
        "routing" => routing(&cx).await,
        "topics" => topics(&cx).await,
        "rpc" => rpc(&cx, false).await,
        "rpc_direct_reply_to" => rpc(&cx, true).await,
        _ => {
            println!("usage: lapin-tutorials hello_world|work_queues|publish_subscribe|routing|topics|rpc|rpc_direct_reply_to");
            std::process::exit(2);
        }
    };
    match res {
        Ok(msg) => {
            println!("{msg}");
            std::process::exit(0);
        }
        Err(e) => {
            println!("{e}");
            std::process::exit(1);
        }
    }
}
