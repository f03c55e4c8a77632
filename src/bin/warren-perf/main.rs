//! warren-perf: a lean PerfTest-style AMQP 0-9-1 load generator.
//!
//! One OS thread per connection with blocking sockets and large buffered
//! reads/writes. Publishers write batches of pre-encoded messages (only the
//! 8-byte send timestamp at the start of each body is patched per message);
//! consumers scan incoming bytes with a zero-allocation frame scanner. See
//! benches/README.md for usage.

mod conn;
mod hist;
mod null;
mod work;

use clap::Parser;
use conn::{Conn, Error, Target};
use hist::Histogram;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "warren-perf",
    about = "PerfTest-style AMQP 0-9-1 load generator",
    version
)]
pub struct Cli {
    /// Broker URI
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Number of producers
    #[arg(short = 'x', long = "producers", default_value_t = 1)]
    pub producers: usize,
    /// Number of consumers
    #[arg(short = 'y', long = "consumers", default_value_t = 1)]
    pub consumers: usize,
    /// Message body size in bytes (min 8: the first 8 bytes carry the send timestamp)
    #[arg(short = 's', long = "size", default_value_t = 12)]
    pub size: usize,
    /// Queue name (with --queues N or --fanout N, "-<i>" is appended)
    #[arg(short = 'u', long = "queue", default_value = "warren-perf")]
    pub queue: String,
    /// Exchange to publish to ("" = default exchange; otherwise a direct exchange is declared)
    #[arg(short = 'e', long = "exchange", default_value = "")]
    pub exchange: String,
    /// Routing key (default: the queue name)
    #[arg(short = 'k', long = "routing-key")]
    pub routing_key: Option<String>,
    /// Persistent messages (delivery_mode=2) and durable queues
    #[arg(short = 'f', long = "persistent")]
    pub persistent: bool,
    /// Publisher confirms: max outstanding unconfirmed messages per producer (0 = no confirms)
    #[arg(short = 'c', long = "confirm", default_value_t = 0)]
    pub confirm: u32,
    /// Consumer prefetch (basic.qos; 0 = unlimited)
    #[arg(short = 'q', long = "qos", default_value_t = 0)]
    pub qos: u16,
    /// Auto-ack (no_ack consumers)
    #[arg(short = 'a', long = "autoack")]
    pub autoack: bool,
    /// Manual ack: multi-ack (multiple=true) every N messages; 1 = ack each message
    #[arg(short = 'A', long = "multi-ack-every", default_value_t = 1)]
    pub multi_ack: u32,
    /// Publishing rate limit per producer in msg/s (0 = unlimited)
    #[arg(short = 'r', long = "rate", default_value_t = 0)]
    pub rate: u64,
    /// Run time in seconds (0 = until message counts are reached)
    #[arg(short = 'z', long = "time", default_value_t = 0)]
    pub time: u64,
    /// Messages to publish per producer (0 = unlimited)
    #[arg(short = 'C', long = "pmessages", default_value_t = 0)]
    pub pmessages: u64,
    /// Messages to consume per consumer (0 = unlimited)
    #[arg(short = 'D', long = "cmessages", default_value_t = 0)]
    pub cmessages: u64,
    /// Number of queues: producer i and consumer i use queue i mod N
    #[arg(long = "queues", default_value_t = 1)]
    pub queues: usize,
    /// Declare a fanout exchange bound to N queues, one consumer per queue
    #[arg(long = "fanout", default_value_t = 0)]
    pub fanout: usize,
    /// RPC round trips: -y server threads answer requests, -x clients with one outstanding request each
    #[arg(long = "rpc")]
    pub rpc: bool,
    /// Open N idle connections and hold them for -z seconds
    #[arg(long = "idle-connections", default_value_t = 0)]
    pub idle_connections: usize,
    /// Do not declare queues/exchanges/bindings
    #[arg(long = "no-declare")]
    pub no_declare: bool,
    /// Queues and exchanges already exist (same as --no-declare)
    #[arg(long = "predeclared")]
    pub predeclared: bool,
    /// Delete the queues at the end of the run
    #[arg(long = "delete-queues")]
    pub delete_queues: bool,
    /// Declare the queues as quorum queues (durable, x-queue-type=quorum), as PerfTest's --quorum-queue
    #[arg(long = "quorum-queue")]
    pub quorum_queue: bool,
    /// Extra queue.declare arguments, PerfTest style: "k=v,k2=v2" (integer values are sent as longs)
    #[arg(long = "queue-args", value_name = "K=V,...")]
    pub queue_args: Option<String>,
    /// Declare the queues as streams (durable, x-queue-type=stream)
    #[arg(long = "stream")]
    pub stream: bool,
    /// Consumers read a stream from this x-stream-offset (first, last, next,
    /// an offset, or an interval like 10m); needs --qos > 0
    #[arg(long = "stream-offset", value_name = "SPEC")]
    pub stream_offset: Option<String>,
    /// Print the final summary as one JSON object line on stdout (rate lines go to stderr)
    #[arg(long = "json")]
    pub json: bool,
    /// Suppress the per-second rate lines
    #[arg(long = "quiet")]
    pub quiet: bool,
    /// Calibration: run a do-nothing AMQP peer on 127.0.0.1:PORT that confirms every
    /// publish and streams deliveries of -s bytes after basic.consume (not a broker)
    #[arg(long = "null-broker", value_name = "PORT")]
    pub null_broker: Option<u16>,
}

// ---------------------------------------------------------------------------
// Shared state

static T0: OnceLock<Instant> = OnceLock::new();

#[repr(C)]
struct Timespec {
    sec: i64,
    nsec: i64,
}

/// CLOCK_MONOTONIC in ns (absolute, so timestamps are comparable between
/// warren-perf processes on the same machine). vDSO call, ~20 ns.
#[inline]
pub fn now_ns() -> u64 {
    let mut ts = Timespec { sec: 0, nsec: 0 };
    // SAFETY: clock_gettime writes a struct timespec into ts.
    let rc = unsafe { clock_gettime(1, &mut ts) };
    if rc != 0 {
        return T0.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1;
    }
    ts.sec as u64 * 1_000_000_000 + ts.nsec as u64
}

#[repr(align(128))]
pub struct Stats {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub consumed: AtomicU64,
    pub last_ns: AtomicU64,
    pub done: AtomicBool,
    pub hist: Option<Histogram>,
}

impl Stats {
    pub fn new(with_hist: bool) -> Arc<Stats> {
        Arc::new(Stats {
            published: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            nacked: AtomicU64::new(0),
            consumed: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            done: AtomicBool::new(false),
            hist: with_hist.then(Histogram::new),
        })
    }
}

pub struct Shared {
    pub stop: AtomicBool,
    pub errors: Mutex<Vec<String>>,
    pub ready: AtomicU64,
    pub blocked_warned: AtomicBool,
}

impl Shared {
    pub fn fail(&self, who: &str, e: &Error) {
        if let Ok(mut v) = self.errors.lock() {
            v.push(format!("{who}: {e}"));
        }
        self.stop.store(true, Relaxed);
    }
    pub fn stopping(&self) -> bool {
        self.stop.load(Relaxed)
    }
}

// ---------------------------------------------------------------------------
// CPU / memory accounting via getrusage(2) (std already links libc).

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Timeval {
    sec: i64,
    usec: i64,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct Rusage {
    utime: Timeval,
    stime: Timeval,
    maxrss: i64,
    rest: [i64; 13],
}

#[repr(C)]
struct Rlimit {
    cur: u64,
    max: u64,
}

pub static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_sig: i32) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Relaxed);
}

unsafe extern "C" {
    fn signal(sig: i32, handler: extern "C" fn(i32)) -> usize;
    fn clock_gettime(clock: i32, ts: *mut Timespec) -> i32;
    fn getrusage(who: i32, usage: *mut Rusage) -> i32;
    fn getrlimit(resource: i32, rlim: *mut Rlimit) -> i32;
    fn setrlimit(resource: i32, rlim: *const Rlimit) -> i32;
}

/// (user+sys CPU seconds, max RSS KiB) of this process.
pub fn cpu_and_rss() -> (f64, u64) {
    let mut r = Rusage::default();
    // SAFETY: getrusage writes a struct rusage (matching layout on 64-bit Linux) into r.
    let rc = unsafe { getrusage(0, &mut r) };
    if rc != 0 {
        return proc_self_cpu();
    }
    let t = |tv: Timeval| tv.sec as f64 + tv.usec as f64 / 1e6;
    (t(r.utime) + t(r.stime), r.maxrss.max(0) as u64)
}

fn proc_self_cpu() -> (f64, u64) {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = s.rsplit_once(')').map(|x| x.1).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ((ticks(11) + ticks(12)) / 100.0, 0)
}

fn raise_nofile() {
    const RLIMIT_NOFILE: i32 = 7;
    let mut r = Rlimit { cur: 0, max: 0 };
    // SAFETY: plain libc calls on a local struct.
    unsafe {
        if getrlimit(RLIMIT_NOFILE, &mut r) == 0 && r.cur < r.max {
            r.cur = r.max;
            let _ = setrlimit(RLIMIT_NOFILE, &r);
        }
    }
}

// ---------------------------------------------------------------------------

pub struct Plan {
    pub target: Target,
    pub cli: Cli,
    /// Queue names
    pub queues: Vec<String>,
    /// exchange to publish to
    pub exchange: String,
}

impl Plan {
    pub fn producer_rk(&self, i: usize) -> String {
        if self.cli.fanout > 0 {
            return self.cli.routing_key.clone().unwrap_or_default();
        }
        if let Some(k) = &self.cli.routing_key
            && self.queues.len() == 1
        {
            return k.clone();
        }
        self.queues[i % self.queues.len()].clone()
    }
    pub fn consumer_queue(&self, i: usize) -> &str {
        &self.queues[i % self.queues.len()]
    }
}

fn build_plan(cli: Cli) -> Result<Plan, Error> {
    let target = Target::parse(&cli.uri)?;
    if cli.size < 8 {
        return Err(Error::Config(
            "-s must be at least 8 (the body carries an 8-byte timestamp)".into(),
        ));
    }
    if cli.size > 512 * 1024 * 1024 {
        return Err(Error::Config(
            "-s larger than 512 MiB is not supported".into(),
        ));
    }
    if cli.fanout > 0 && cli.queues > 1 {
        return Err(Error::Config(
            "--fanout and --queues are mutually exclusive".into(),
        ));
    }
    if cli.queues == 0 {
        return Err(Error::Config("--queues must be at least 1".into()));
    }
    if cli.confirm > 1_000_000 {
        return Err(Error::Config(
            "-c window larger than 1000000 is not supported".into(),
        ));
    }
    let n = if cli.fanout > 0 {
        cli.fanout
    } else {
        cli.queues
    };
    let queues: Vec<String> = if n == 1 {
        vec![cli.queue.clone()]
    } else {
        (0..n).map(|i| format!("{}-{i}", cli.queue)).collect()
    };
    let exchange = if cli.fanout > 0 && cli.exchange.is_empty() {
        "warren-perf-fanout".to_string()
    } else {
        cli.exchange.clone()
    };
    Ok(Plan {
        target,
        cli,
        queues,
        exchange,
    })
}

fn declare(plan: &Plan) -> Result<(), Error> {
    let c = &plan.cli;
    if c.no_declare || c.predeclared || c.idle_connections > 0 {
        return Ok(());
    }
    let mut conn = Conn::connect(&plan.target, "warren-perf setup")?;
    conn.channel_open(1)?;
    if c.rpc {
        conn.queue_declare(1, &plan.queues[0], false, false, false)?;
        Conn::close_stream(&mut conn.stream, conn.frame_max);
        return Ok(());
    }
    if !plan.exchange.is_empty() {
        let kind = if c.fanout > 0 { "fanout" } else { "direct" };
        conn.exchange_declare(1, &plan.exchange, kind, c.persistent)?;
    }
    for kv in c
        .queue_args
        .iter()
        .flat_map(|a| a.split(','))
        .filter(|kv| !kv.is_empty())
    {
        let Some((k, v)) = kv.split_once('=') else {
            return Err(Error::Config(format!(
                "--queue-args: '{kv}' is not key=value"
            )));
        };
        let v = match v.parse::<i64>() {
            Ok(n) => amq_protocol::types::AMQPValue::LongLongInt(n),
            Err(_) => amq_protocol::types::AMQPValue::LongString(v.into()),
        };
        conn.declare_args.insert(k.into(), v);
    }
    for (i, q) in plan.queues.iter().enumerate() {
        // auto-delete: a queue goes away when its last consumer leaves, so runs don't
        // inherit each other's backlog (a queue that never had a consumer stays).
        if c.stream {
            // Streams are durable and never auto-delete.
            conn.declare_args.insert(
                "x-queue-type".into(),
                amq_protocol::types::AMQPValue::LongString("stream".into()),
            );
            conn.queue_declare(1, q, true, false, false)?;
        } else if c.quorum_queue {
            // Quorum queues are durable and never auto-delete.
            conn.declare_args.insert(
                "x-queue-type".into(),
                amq_protocol::types::AMQPValue::LongString("quorum".into()),
            );
            conn.queue_declare(1, q, true, false, false)?;
        } else {
            conn.queue_declare(1, q, c.persistent, false, true)?;
        }
        if !plan.exchange.is_empty() {
            let rk = if c.fanout > 0 {
                String::new()
            } else {
                plan.producer_rk(i)
            };
            conn.queue_bind(1, q, &plan.exchange, &rk)?;
        }
    }
    Conn::close_stream(&mut conn.stream, conn.frame_max);
    Ok(())
}

fn delete_queues(plan: &Plan) -> Result<(), Error> {
    let mut conn = Conn::connect(&plan.target, "warren-perf cleanup")?;
    conn.channel_open(1)?;
    for q in &plan.queues {
        conn.queue_delete(1, q)?;
    }
    Conn::close_stream(&mut conn.stream, conn.frame_max);
    Ok(())
}

fn fmt_lat(ns: u64) -> String {
    if ns < 10_000 {
        format!("{:.1}µs", ns as f64 / 1e3)
    } else if ns < 10_000_000 {
        format!("{}µs", ns / 1000)
    } else {
        format!("{:.1}ms", ns as f64 / 1e6)
    }
}

struct Totals {
    published: u64,
    confirmed: u64,
    nacked: u64,
    consumed: u64,
}

fn totals(all: &[Arc<Stats>]) -> Totals {
    let mut t = Totals {
        published: 0,
        confirmed: 0,
        nacked: 0,
        consumed: 0,
    };
    for s in all {
        t.published += s.published.load(Relaxed);
        t.confirmed += s.confirmed.load(Relaxed);
        t.nacked += s.nacked.load(Relaxed);
        t.consumed += s.consumed.load(Relaxed);
    }
    t
}

fn hist_snapshot(all: &[Arc<Stats>], acc: &mut [u64]) {
    acc.iter_mut().for_each(|x| *x = 0);
    for s in all {
        if let Some(h) = &s.hist {
            h.add_to(acc);
        }
    }
}

fn main() {
    let cli = Cli::parse();
    T0.get_or_init(Instant::now);
    raise_nofile();
    // Ctrl-C / SIGTERM end the run early but still print the summary.
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        signal(2, on_sigint);
        signal(15, on_sigint);
    }
    let json = cli.json;
    if let Some(port) = cli.null_broker {
        let code = null::serve(port, cli.size).unwrap_or_else(|e| {
            eprintln!("warren-perf: {e}");
            1
        });
        std::process::exit(code);
    }
    let plan = match build_plan(cli) {
        Ok(p) => Arc::new(p),
        Err(e) => {
            eprintln!("warren-perf: {e}");
            std::process::exit(2);
        }
    };
    let code = match run(plan) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("warren-perf: {e}");
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": e.to_string() })
                );
            }
            1
        }
    };
    std::process::exit(code);
}

fn run(plan: Arc<Plan>) -> Result<i32, Error> {
    let cli = &plan.cli;
    if cli.idle_connections > 0 {
        return work::idle(&plan);
    }
    declare(&plan)?;

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        ready: AtomicU64::new(0),
        blocked_warned: AtomicBool::new(false),
    });

    let (n_prod, n_cons) = if cli.fanout > 0 && !cli.rpc {
        (
            cli.producers,
            if cli.consumers == 0 {
                0
            } else {
                cli.fanout.max(cli.consumers)
            },
        )
    } else {
        (cli.producers, cli.consumers)
    };
    let mut all: Vec<Arc<Stats>> = Vec::new();
    let mut handles = Vec::new();

    // Consumer-only runs (draining a backlog) are timed from before the consumers
    // connect; otherwise from when all consumers are ready and producers start.
    let early = (n_prod == 0).then(|| (cpu_and_rss().0, now_ns()));
    // Consumers (or RPC servers) first; wait until they are all consuming.
    let mut cons_stats = Vec::new();
    for i in 0..n_cons {
        let st = Stats::new(!cli.rpc);
        all.push(st.clone());
        cons_stats.push(st.clone());
        let (p, sh) = (plan.clone(), shared.clone());
        let h = std::thread::Builder::new()
            .name(format!("consumer-{i}"))
            .spawn(move || {
                let r = if p.cli.rpc {
                    work::rpc_server(&p, i, &st, &sh)
                } else {
                    work::consumer(&p, i, &st, &sh)
                };
                if let Err(e) = r {
                    sh.fail(&format!("consumer {i}"), &e);
                }
                st.done.store(true, Relaxed);
            })
            .map_err(|e| Error::Io("cannot spawn thread".into(), e))?;
        handles.push(h);
    }
    let setup_deadline = Instant::now() + Duration::from_secs(60);
    while shared.ready.load(Relaxed) < n_cons as u64
        && !shared.stopping()
        && !INTERRUPTED.load(Relaxed)
    {
        if Instant::now() > setup_deadline {
            shared.fail(
                "setup",
                &Error::Protocol("consumers did not start within 60 s".into()),
            );
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }

    let (cpu0, t_start) = early.unwrap_or_else(|| (cpu_and_rss().0, now_ns()));
    let mut prod_stats = Vec::new();
    if !shared.stopping() {
        for i in 0..n_prod {
            let st = Stats::new(cli.rpc);
            all.push(st.clone());
            prod_stats.push(st.clone());
            let (p, sh) = (plan.clone(), shared.clone());
            let h = std::thread::Builder::new()
                .name(format!("producer-{i}"))
                .spawn(move || {
                    let r = if p.cli.rpc {
                        work::rpc_client(&p, i, &st, &sh)
                    } else {
                        work::producer(&p, i, &st, &sh)
                    };
                    if let Err(e) = r {
                        sh.fail(&format!("producer {i}"), &e);
                    }
                    st.last_ns.store(now_ns(), Relaxed);
                    st.done.store(true, Relaxed);
                })
                .map_err(|e| Error::Io("cannot spawn thread".into(), e))?;
            handles.push(h);
        }
    }

    // Reporter loop.
    let rate_out = |s: String| {
        if cli.quiet {
            return;
        }
        if cli.json {
            eprintln!("{s}")
        } else {
            println!("{s}")
        }
    };
    // In RPC mode the server threads' counters are not round trips: report clients only.
    let rep_stats: Vec<Arc<Stats>> = if cli.rpc {
        prod_stats.clone()
    } else {
        all.clone()
    };
    let mut prev = totals(&rep_stats);
    let mut prev_h = vec![0u64; hist::BUCKETS];
    let mut cur_h = vec![0u64; hist::BUCKETS];
    let mut delta_h = vec![0u64; hist::BUCKETS];
    let mut next_tick = t_start + 1_000_000_000;
    let mut last_progress = (now_ns(), 0u64);
    let expected_consume: Option<u64> = if cli.cmessages > 0 {
        Some(cli.cmessages * n_cons as u64)
    } else if cli.pmessages > 0 && n_cons > 0 && !cli.rpc {
        let per_queue_copies = if cli.fanout > 0 {
            n_cons.min(plan.queues.len()) as u64
        } else {
            1
        };
        Some(cli.pmessages * n_prod as u64 * per_queue_copies)
    } else {
        None
    };
    loop {
        std::thread::sleep(Duration::from_millis(20));
        let now = now_ns();
        let elapsed = now - t_start;
        if now >= next_tick {
            let t = totals(&rep_stats);
            let dt = (now - (next_tick - 1_000_000_000)) as f64 / 1e9;
            hist_snapshot(&all, &mut cur_h);
            for i in 0..hist::BUCKETS {
                delta_h[i] = cur_h[i] - prev_h[i].min(cur_h[i]);
            }
            std::mem::swap(&mut prev_h, &mut cur_h);
            let lat = match hist::percentiles(&delta_h, &[0.5, 0.99]) {
                Some(v) => format!("latency p50 {} p99 {}", fmt_lat(v[0]), fmt_lat(v[1])),
                None => "latency -".into(),
            };
            let label = if cli.rpc {
                ("requests", "replies")
            } else {
                ("published", "consumed")
            };
            rate_out(format!(
                "{:>6.1}s  {} {:>9.0}/s  confirmed {:>9.0}/s  {} {:>9.0}/s  {}",
                elapsed as f64 / 1e9,
                label.0,
                (t.published - prev.published) as f64 / dt,
                (t.confirmed - prev.confirmed) as f64 / dt,
                label.1,
                (t.consumed - prev.consumed) as f64 / dt,
                lat
            ));
            prev = t;
            next_tick += 1_000_000_000;
        }
        if shared.stopping() {
            break;
        }
        if INTERRUPTED.load(Relaxed) {
            eprintln!("warren-perf: interrupted, stopping");
            break;
        }
        if cli.time > 0 && elapsed >= cli.time * 1_000_000_000 {
            break;
        }
        let prods_done = prod_stats.iter().all(|s| s.done.load(Relaxed));
        let cons_done = cons_stats.iter().all(|s| s.done.load(Relaxed));
        if prods_done && cons_done {
            break;
        }
        if prods_done && cli.time == 0 && !cli.rpc {
            let c = totals(&cons_stats).consumed;
            if n_cons == 0 {
                break;
            }
            if let Some(exp) = expected_consume
                && c >= exp
                && cli.cmessages == 0
            {
                break;
            }
            if c != last_progress.1 {
                last_progress = (now, c);
            } else if cli.cmessages == 0 && now - last_progress.0 > 5_000_000_000 {
                eprintln!(
                    "warren-perf: no messages consumed for 5 s after producers finished; stopping"
                );
                break;
            }
        }
        if prods_done && cli.rpc && n_prod > 0 {
            break;
        }
    }
    let t_end = now_ns();
    shared.stop.store(true, Relaxed);
    for h in handles {
        let _ = h.join();
    }
    let (cpu1, maxrss) = cpu_and_rss();
    if cli.delete_queues
        && !cli.rpc
        && let Err(e) = delete_queues(&plan)
    {
        eprintln!("warren-perf: deleting queues failed: {e}");
    }

    // Summary
    let t = totals(&all);
    let pt = totals(&prod_stats);
    let ct = totals(&cons_stats);
    let dur = (t_end - t_start) as f64 / 1e9;
    let prod_end = prod_stats
        .iter()
        .map(|s| s.last_ns.load(Relaxed))
        .max()
        .unwrap_or(t_end)
        .min(t_end);
    let cons_end = cons_stats
        .iter()
        .map(|s| s.last_ns.load(Relaxed))
        .max()
        .unwrap_or(0);
    let pub_time = if pt.published > 0 {
        (prod_end.saturating_sub(t_start)) as f64 / 1e9
    } else {
        0.0
    };
    let cons_time = if ct.consumed > 0 {
        (cons_end.saturating_sub(t_start)) as f64 / 1e9
    } else {
        0.0
    };
    let rate = |n: u64, secs: f64| if secs > 0.0 { n as f64 / secs } else { 0.0 };
    let (published, consumed) = if cli.rpc {
        (pt.published, pt.consumed)
    } else {
        (pt.published, ct.consumed)
    };
    let publish_rate = rate(
        published,
        if cli.time > 0 {
            dur
        } else {
            pub_time.max(1e-9)
        },
    );
    let consume_rate = if cli.rpc {
        rate(consumed, dur)
    } else {
        rate(
            consumed,
            if cli.time > 0 {
                dur
            } else {
                cons_time.max(1e-9)
            },
        )
    };
    let confirm_rate = rate(
        t.confirmed,
        if cli.time > 0 {
            dur
        } else {
            pub_time.max(1e-9)
        },
    );
    hist_snapshot(&all, &mut cur_h);
    let pct = hist::percentiles(&cur_h, &[0.5, 0.95, 0.99, 0.999]);
    let maxlat = hist::max_value(&cur_h);
    let cpu = cpu1 - cpu0;
    let msgs = published.max(consumed);
    let cpu_per_msg = if msgs > 0 {
        cpu * 1e6 / msgs as f64
    } else {
        0.0
    };
    let errors: Vec<String> = shared.errors.lock().map(|v| v.clone()).unwrap_or_default();
    let us = |v: u64| (v as f64 / 100.0).round() / 10.0;

    if cli.json {
        let lat = pct.as_ref().map(|p| {
            serde_json::json!({"p50": us(p[0]), "p95": us(p[1]), "p99": us(p[2]), "p999": us(p[3]), "max": maxlat.map(us)})
        });
        let j = serde_json::json!({
            "ok": errors.is_empty(),
            "mode": if cli.rpc { "rpc" } else if cli.fanout > 0 { "fanout" } else { "queue" },
            "producers": n_prod, "consumers": n_cons, "size": cli.size, "queues": plan.queues.len(),
            "duration_s": dur, "publish_time_s": pub_time, "consume_time_s": cons_time,
            "published": published, "confirmed": t.confirmed, "nacked": t.nacked, "consumed": consumed,
            "publish_rate": publish_rate.round(), "confirm_rate": confirm_rate.round(), "consume_rate": consume_rate.round(),
            "latency_us": lat,
            "cpu_s": (cpu * 1e4).round() / 1e4, "cpu_us_per_msg": (cpu_per_msg * 1000.0).round() / 1000.0,
            "max_rss_kb": maxrss,
            "errors": errors,
        });
        println!("{j}");
    } else {
        println!("--- warren-perf summary ---");
        println!("duration          {dur:.2} s");
        if cli.rpc {
            println!(
                "round trips       {consumed} ({consume_rate:.0}/s, {} clients, {} servers)",
                n_prod, n_cons
            );
        } else {
            println!(
                "published         {published} ({publish_rate:.0} msg/s over {:.2} s)",
                if cli.time > 0 { dur } else { pub_time }
            );
            if cli.confirm > 0 {
                println!(
                    "confirmed         {} ({confirm_rate:.0} msg/s), nacked {}",
                    t.confirmed, t.nacked
                );
            }
            println!(
                "consumed          {consumed} ({consume_rate:.0} msg/s over {:.2} s)",
                if cli.time > 0 { dur } else { cons_time }
            );
        }
        match &pct {
            Some(p) => println!(
                "latency           p50 {} p95 {} p99 {} p99.9 {} max {}",
                fmt_lat(p[0]),
                fmt_lat(p[1]),
                fmt_lat(p[2]),
                fmt_lat(p[3]),
                maxlat.map(fmt_lat).unwrap_or_default()
            ),
            None => println!("latency           - (no messages consumed)"),
        }
        println!(
            "generator CPU     {cpu:.2} s user+sys = {cpu_per_msg:.3} µs/msg, max RSS {} MiB",
            maxrss / 1024
        );
        for e in &errors {
            println!("error             {e}");
        }
    }
    if !errors.is_empty() {
        for e in &errors {
            eprintln!("warren-perf: {e}");
        }
        return Ok(1);
    }
    Ok(0)
}
