//! Bodies in segment files (`warren::store::MessageStore`) vs bodies in sled,
//! for the ARCHITECTURE.md storage decision.
//!
//!     cargo bench --bench store_compare
//!
//! Environment: `STORE_BENCH_MESSAGES` (default 1,000,000), `STORE_BENCH_DIR`
//! (default: a temp dir under `target/`, so the same disk as the build).
//!
//! Workload: 1 KB bodies, publish in windows of 256 messages, wait until the
//! window is durable (one group commit: completions for the store,
//! `flush_async` for sled), then ack (remove) the whole window. Reports
//! msgs/s, syncs, and bytes on disk after everything has been acked. Then,
//! for the segment store only: a pipelined run (4 publishers, natural group
//! commit), and recovery of 1M stored, unacked messages.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;
use warren::store::{Completion, MessageParts, MessageStore, StoreOptions};

const WINDOW: u64 = 256;

fn parts(body: &Bytes) -> MessageParts {
    MessageParts {
        exchange: Bytes::from_static(b"amq.direct"),
        routing_key: Bytes::from_static(b"bench"),
        raw_properties: Bytes::from_static(&[0x10, 0x00, 0x02]), // delivery_mode = 2
        body: body.clone(),
    }
}

/// (apparent bytes, allocated bytes) of everything under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut total = (0, 0);
    let Ok(rd) = std::fs::read_dir(dir) else {
        return total;
    };
    for e in rd.flatten() {
        let Ok(md) = e.metadata() else { continue };
        if md.is_dir() {
            let (a, b) = disk_usage(&e.path());
            total.0 += a;
            total.1 += b;
        } else {
            total.0 += md.len();
            total.1 += md.blocks() * 512;
        }
    }
    total
}

/// Bytes this process has caused to be written to storage (Linux).
fn write_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("write_bytes: ")
                    .and_then(|v| v.trim().parse().ok())
            })
        })
        .unwrap_or(0)
}

fn mb(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

async fn segment_store_windowed(dir: &Path, n: u64, body: &Bytes) {
    let (store, _) = MessageStore::open(dir, StoreOptions::default()).expect("open");
    let (tx, mut rx) = mpsc::unbounded_channel();
    let w0 = write_bytes();
    let t = Instant::now();
    let mut gid = 0;
    while gid < n {
        let gids: Vec<u64> = (gid + 1..=(gid + WINDOW).min(n)).collect();
        for &g in &gids {
            let tx = tx.clone();
            let done: Completion = Box::new(move |r| drop(tx.send(r)));
            store
                .append(g, vec![1], parts(body), Some(done))
                .await
                .expect("append");
        }
        for _ in &gids {
            rx.recv().await.expect("completion").expect("durable");
        }
        gid += gids.len() as u64;
        store.ack(1, gids).await.expect("ack");
    }
    store.sync().await.expect("sync");
    let secs = t.elapsed().as_secs_f64();
    let st = store.stats();
    let (apparent, alloc) = disk_usage(dir);
    println!(
        "segment store, windowed : {:>9.0} msgs/s  {:>6.2} s  fsyncs {:>6} (avg {} µs)  written {:.0} MiB  on disk after ack-all: {:.1} MiB apparent, {:.1} MiB allocated, {} segment(s)",
        n as f64 / secs,
        secs,
        st.fsyncs,
        st.avg_fsync_us,
        mb(write_bytes() - w0),
        mb(apparent),
        mb(alloc),
        st.segments
    );
    store.close().await.expect("close");
}

async fn segment_store_pipelined(dir: &Path, n: u64, body: &Bytes) {
    let (store, _) = MessageStore::open(dir, StoreOptions::default()).expect("open");
    let t = Instant::now();
    let publishers = 4u64;
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let store = store.clone();
        let body = body.clone();
        tasks.push(tokio::spawn(async move {
            // Up to WINDOW unconfirmed per publisher; ack each as it confirms.
            let (tx, mut rx) = mpsc::unbounded_channel();
            let permits = Arc::new(tokio::sync::Semaphore::new(WINDOW as usize));
            let mine = n / publishers;
            let acker = {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut left = mine;
                    let mut batch = Vec::new();
                    while left > 0 {
                        let Some(g) = rx.recv().await else { break };
                        batch.push(g);
                        while let Ok(g) = rx.try_recv() {
                            batch.push(g);
                        }
                        left -= batch.len() as u64;
                        store.ack(p, std::mem::take(&mut batch)).await.expect("ack");
                    }
                })
            };
            for i in 0..mine {
                let g = i * publishers + p + 1;
                let permit = Arc::clone(&permits).acquire_owned().await.expect("permit");
                let tx = tx.clone();
                let done: Completion = Box::new(move |r| {
                    r.expect("durable");
                    drop(permit);
                    let _ = tx.send(g);
                });
                store
                    .append(g, vec![p], parts(&body), Some(done))
                    .await
                    .expect("append");
            }
            acker.await.expect("acker");
        }));
    }
    for t in tasks {
        t.await.expect("publisher");
    }
    store.sync().await.expect("sync");
    let secs = t.elapsed().as_secs_f64();
    let st = store.stats();
    println!(
        "segment store, 4 pubs   : {:>9.0} msgs/s  {:>6.2} s  fsyncs {:>6} (avg {} µs, {:.0} msgs per fsync)  on disk after ack-all: {:.1} MiB",
        n as f64 / secs,
        secs,
        st.fsyncs,
        st.avg_fsync_us,
        n as f64 / st.fsyncs.max(1) as f64,
        mb(disk_usage(dir).0)
    );
    store.close().await.expect("close");
}

async fn segment_store_recovery(dir: &Path, n: u64, body: &Bytes) {
    let (store, _) = MessageStore::open(dir, StoreOptions::default()).expect("open");
    for g in 1..=n {
        store
            .append(g, vec![1], parts(body), None)
            .await
            .expect("append");
    }
    store.close().await.expect("close");
    let t = Instant::now();
    let (store, rec) = MessageStore::open(dir, StoreOptions::default()).expect("reopen");
    let secs = t.elapsed().as_secs_f64();
    let st = store.stats();
    println!(
        "segment store, recovery : {} messages ({:.0} MiB) in {:.2} s (page cache warm); index {:.1} MiB = {:.1} B/message",
        rec.messages,
        mb(disk_usage(dir).0),
        secs,
        mb(st.index_bytes),
        st.index_bytes as f64 / rec.messages.max(1) as f64
    );
    store.close().await.expect("close");
}

async fn sled_windowed(dir: &Path, n: u64, body: &Bytes) {
    let db = sled::open(dir.join("sled")).expect("sled open");
    let msgs = db.open_tree("msgs").expect("tree");
    // Same record bytes as the segment store would write, minus framing.
    let p = parts(body);
    let mut rec = Vec::with_capacity(1100);
    rec.extend_from_slice(&1u64.to_le_bytes());
    rec.extend_from_slice(&p.exchange);
    rec.extend_from_slice(&p.routing_key);
    rec.extend_from_slice(&p.raw_properties);
    rec.extend_from_slice(&p.body);
    let w0 = write_bytes();
    let t = Instant::now();
    let mut flushes = 0u64;
    let mut gid = 0;
    while gid < n {
        let end = (gid + WINDOW).min(n);
        for g in gid + 1..=end {
            msgs.insert(g.to_be_bytes(), rec.as_slice())
                .expect("insert");
        }
        db.flush_async().await.expect("flush");
        flushes += 1;
        for g in gid + 1..=end {
            msgs.remove(g.to_be_bytes()).expect("remove");
        }
        gid = end;
    }
    db.flush_async().await.expect("flush");
    let secs = t.elapsed().as_secs_f64();
    let (apparent, alloc) = disk_usage(&dir.join("sled"));
    println!(
        "sled, windowed          : {:>9.0} msgs/s  {:>6.2} s  flushes {:>6}                 written {:.0} MiB  on disk after ack-all: {:.1} MiB apparent, {:.1} MiB allocated",
        n as f64 / secs,
        secs,
        flushes + 1,
        mb(write_bytes() - w0),
        mb(apparent),
        mb(alloc)
    );
    drop(msgs);
    drop(db);
}

fn main() {
    // `cargo bench` passes `--bench`; ignore arguments.
    let n: u64 = std::env::var("STORE_BENCH_MESSAGES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let base = std::env::var("STORE_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("target")
                .join("store_bench")
        });
    std::fs::create_dir_all(&base).expect("bench dir");
    let body = Bytes::from(vec![b'x'; 1024]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "{n} messages of 1 KiB, window {WINDOW}, data under {}",
        base.display()
    );
    rt.block_on(async {
        let run = |name: &str| {
            tempfile::Builder::new()
                .prefix(name)
                .tempdir_in(&base)
                .expect("tempdir")
        };
        let d = run("seg-win");
        segment_store_windowed(d.path(), n, &body).await;
        drop(d);
        let d = run("seg-pipe");
        segment_store_pipelined(d.path(), n, &body).await;
        drop(d);
        let d = run("sled-win");
        sled_windowed(d.path(), n, &body).await;
        drop(d);
        let d = run("seg-rec");
        segment_store_recovery(d.path(), n, &body).await;
        drop(d);
    });
}
