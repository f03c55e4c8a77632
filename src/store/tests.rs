//! Tests of the message store: unit scenarios, a proptest model with reboots
//! and torn-tail crashes, and a real SIGKILL of a child process.

use super::*;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::Mutex;
use std::sync::atomic::AtomicUsize;

use proptest::prelude::*;

fn parts(gid: Gid, len: usize) -> MessageParts {
    MessageParts {
        exchange: Bytes::from(format!("x{}", gid % 7)),
        routing_key: Bytes::from(format!("rk.{gid}")),
        raw_properties: Bytes::from(vec![(gid % 251) as u8; (gid % 5) as usize]),
        body: Bytes::from(
            (0..len)
                .map(|i| (gid as usize + i) as u8)
                .collect::<Vec<u8>>(),
        ),
    }
}

fn opts(segment_size: u64) -> StoreOptions {
    StoreOptions {
        segment_size,
        channel_capacity: 1024,
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Appends and waits for the completion.
async fn append_wait(
    s: &MessageStore,
    gid: Gid,
    queues: Vec<QueueId>,
    p: MessageParts,
) -> Result<(), StoreError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    s.append(gid, queues, p, Some(Box::new(move |r| drop(tx.send(r)))))
        .await?;
    rx.await.unwrap()
}

fn seg_files(dir: &Path) -> Vec<(u64, PathBuf)> {
    let mut v: Vec<_> = fs::read_dir(dir.join("msgs"))
        .unwrap()
        .filter_map(|e| {
            let e = e.unwrap();
            let name = e.file_name().into_string().unwrap();
            match segment::parse_file_name(&name) {
                Some((no, "seg")) => Some((no, e.path())),
                _ => None,
            }
        })
        .collect();
    v.sort();
    v
}

fn dir_bytes(dir: &Path) -> u64 {
    fs::read_dir(dir.join("msgs"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

fn gids_of(rec: &Recovery, q: QueueId) -> Vec<Gid> {
    rec.queues
        .get(&q)
        .map(|v| v.iter().map(|m| m.gid).collect())
        .unwrap_or_default()
}

#[test]
fn read_returns_exact_parts_before_and_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, rec) = MessageStore::open(dir.path(), opts(4096)).unwrap();
        assert!(rec.queues.is_empty());
        for gid in 1..=50u64 {
            append_wait(&s, gid, vec![1, 2], parts(gid, gid as usize * 37))
                .await
                .unwrap();
        }
        // Large message: bigger than the first speculative read and the segment.
        append_wait(&s, 51, vec![1], parts(51, 100_000))
            .await
            .unwrap();
        for gid in 1..=51u64 {
            assert_eq!(
                s.read(gid).unwrap(),
                parts(
                    gid,
                    if gid == 51 {
                        100_000
                    } else {
                        gid as usize * 37
                    }
                )
            );
        }
        assert!(matches!(s.read(999), Err(StoreError::NotFound(999))));
        s.close().await.unwrap();

        let (s, rec) = MessageStore::open(dir.path(), opts(4096)).unwrap();
        assert_eq!(gids_of(&rec, 1), (1..=51).collect::<Vec<_>>());
        assert_eq!(gids_of(&rec, 2), (1..=50).collect::<Vec<_>>());
        assert_eq!(rec.max_gid, 51);
        assert_eq!(rec.messages, 51);
        for gid in 1..=51u64 {
            assert_eq!(
                s.read(gid).unwrap(),
                parts(
                    gid,
                    if gid == 51 {
                        100_000
                    } else {
                        gid as usize * 37
                    }
                )
            );
        }
        s.close().await.unwrap();
    });
}

#[test]
fn out_of_order_gids_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(200)).unwrap();
        // Each record is ~100 bytes: segments hold two, and gids interleave.
        for gid in [2u64, 1, 4, 3, 6, 5, 9, 7, 8, 10] {
            append_wait(&s, gid, vec![1], parts(gid, 60)).await.unwrap();
        }
        for gid in 1..=10u64 {
            assert_eq!(s.read(gid).unwrap(), parts(gid, 60), "gid {gid}");
        }
        s.ack(1, vec![1, 2, 3]).await.unwrap();
        s.sync().await.unwrap();
        assert!(s.read(2).is_err());
        assert_eq!(s.read(4).unwrap(), parts(4, 60));
        s.close().await.unwrap();
        let (s, rec) = MessageStore::open(dir.path(), opts(200)).unwrap();
        assert_eq!(gids_of(&rec, 1), (4..=10).collect::<Vec<_>>());
        s.close().await.unwrap();
    });
}

#[test]
fn group_commit_many_appends_few_fsyncs() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (s, _) = MessageStore::open(dir.path(), StoreOptions::default()).unwrap();
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for t in 0..8u64 {
            let s = s.clone();
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            tasks.push(tokio::spawn(async move {
                for i in 0..1250u64 {
                    let gid = i * 8 + t + 1;
                    let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
                    let done: Completion = Box::new(move |r| match r {
                        Ok(()) => drop(ok.fetch_add(1, Ordering::SeqCst)),
                        Err(_) => drop(failed.fetch_add(1, Ordering::SeqCst)),
                    });
                    s.append(gid, vec![t], parts(gid, 1024), Some(done))
                        .await
                        .unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        s.sync().await.unwrap();
        assert_eq!(ok.load(Ordering::SeqCst), 10_000);
        assert_eq!(failed.load(Ordering::SeqCst), 0);
        let fsyncs = s.stats().fsyncs;
        assert!(fsyncs < 1_000, "{fsyncs} fsyncs for 10,000 appends");
        s.close().await.unwrap();
        let (s, rec) = MessageStore::open(dir.path(), StoreOptions::default()).unwrap();
        assert_eq!(rec.messages, 10_000);
        for t in 0..8u64 {
            assert_eq!(
                gids_of(&rec, t),
                (0..1250).map(|i| i * 8 + t + 1).collect::<Vec<_>>()
            );
        }
        s.close().await.unwrap();
    });
}

#[test]
fn acked_segments_are_deleted_and_space_reclaimed() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        let total = 200_000u64;
        let mut peak_segments = 0;
        for chunk in 0..(total / 1000) {
            let gids: Vec<Gid> = (chunk * 1000 + 1..=chunk * 1000 + 1000).collect();
            for &gid in &gids {
                s.append(gid, vec![1], parts(gid, 100), None).await.unwrap();
            }
            // Ack the chunk before the previous one, so some segments hold
            // acked and unacked messages at once.
            if chunk > 0 {
                s.ack(1, ((chunk - 1) * 1000 + 1..=chunk * 1000).collect())
                    .await
                    .unwrap();
            }
            peak_segments = peak_segments.max(s.stats().segments);
        }
        s.ack(1, (total - 999..=total).collect()).await.unwrap();
        s.sync().await.unwrap();
        let st = s.stats();
        assert!(peak_segments >= 2, "never rolled: {peak_segments}");
        assert_eq!(st.live_refs, 0);
        assert_eq!(st.segments, 1, "only the active segment is left: {st:?}");
        // Fully acked segments are gone, including a fully acked active one
        // past a quarter of segment_size.
        assert!(st.bytes_on_disk < (1 << 20) / 4 + (64 << 10), "{st:?}");
        assert!(
            dir_bytes(dir.path()) <= 2 << 20,
            "{} bytes on disk",
            dir_bytes(dir.path())
        );
        s.close().await.unwrap();
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(rec.messages, 0);
        // Every file was deleted, so nothing is left to report a gid from.
        assert_eq!(rec.max_gid, 0);
        assert_eq!(dir_bytes(dir.path()), 0);
        s.close().await.unwrap();
    });
}

#[test]
fn fanout_body_stored_once_and_kept_until_last_ack() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        let p = parts(1, 1000);
        append_wait(&s, 1, vec![1, 2, 3, 4, 5], p.clone())
            .await
            .unwrap();
        let segs = seg_files(dir.path());
        assert_eq!(segs.len(), 1);
        assert_eq!(
            fs::metadata(&segs[0].1).unwrap().len(),
            segment::record_len(5, &p) as u64,
            "one record"
        );
        assert_eq!(s.stats().live_refs, 5);
        for q in 1..=4 {
            s.ack(q, vec![1]).await.unwrap();
        }
        s.close().await.unwrap();

        // Reopen: the segment is sealed now, still referenced by queue 5.
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(rec.queues.len(), 1);
        assert_eq!(gids_of(&rec, 5), vec![1]);
        assert!(segs[0].1.exists());
        assert_eq!(s.read(1).unwrap(), p);
        s.ack(5, vec![1]).await.unwrap();
        s.sync().await.unwrap();
        assert!(!segs[0].1.exists(), "last reference gone: segment deleted");
        assert!(!segment::acks_path(&dir.path().join("msgs"), segs[0].0).exists());
        s.close().await.unwrap();
    });
}

#[test]
fn torn_tail_is_truncated_and_earlier_messages_survive() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        for gid in 1..=10 {
            append_wait(&s, gid, vec![7], parts(gid, 300))
                .await
                .unwrap();
        }
        s.close().await.unwrap();
        let (_, seg) = seg_files(dir.path()).pop().unwrap();
        let good_len = fs::metadata(&seg).unwrap().len();

        // Garbage after the last record: a plausible length, then junk.
        let mut f = OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&200u32.to_le_bytes()).unwrap();
        f.write_all(&[0xAB; 150]).unwrap();
        drop(f);
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(gids_of(&rec, 7), (1..=10).collect::<Vec<_>>());
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            good_len,
            "garbage cut off"
        );
        append_wait(&s, 11, vec![7], parts(11, 300)).await.unwrap();
        s.close().await.unwrap();

        // Cut the last record in half: it is dropped, the rest stays.
        let (_, seg) = seg_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&seg).unwrap().len();
        OpenOptions::new()
            .write(true)
            .open(&seg)
            .unwrap()
            .set_len(len - 100)
            .unwrap();
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(gids_of(&rec, 7), (1..=10).collect::<Vec<_>>());
        assert!(!seg.exists(), "left with no record, the segment is deleted");
        for gid in 1..=10 {
            assert_eq!(s.read(gid).unwrap(), parts(gid, 300));
        }
        s.close().await.unwrap();

        // A flipped bit in a record fails its CRC: that record and the ones
        // after it in the segment are dropped, never returned corrupt.
        let (_, seg) = seg_files(dir.path())
            .into_iter()
            .find(|(_, p)| fs::metadata(p).unwrap().len() > 0)
            .unwrap();
        let mut bytes = fs::read(&seg).unwrap();
        let rec_len = segment::record_len(1, &parts(5, 300));
        bytes[rec_len * 4 + 100] ^= 0x01; // inside message 5's record
        fs::write(&seg, &bytes).unwrap();
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(gids_of(&rec, 7), (1..=4).collect::<Vec<_>>());
        s.close().await.unwrap();
    });
}

#[test]
fn torn_ack_record_is_truncated() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        for gid in 1..=5 {
            append_wait(&s, gid, vec![1], parts(gid, 10)).await.unwrap();
        }
        s.ack(1, vec![1, 2]).await.unwrap();
        s.delivered(1, vec![3]).await.unwrap();
        s.close().await.unwrap();
        let (no, _) = seg_files(dir.path()).pop().unwrap();
        let acks = segment::acks_path(&dir.path().join("msgs"), no);
        let mut f = OpenOptions::new().append(true).open(&acks).unwrap();
        f.write_all(&[1, 0, 0, 0]).unwrap(); // 4 bytes of a 17-byte record
        drop(f);
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(fs::metadata(&acks).unwrap().len(), 3 * 17);
        let q = &rec.queues[&1];
        assert_eq!(
            q.iter().map(|m| (m.gid, m.delivered)).collect::<Vec<_>>(),
            vec![(3, true), (4, false), (5, false)]
        );
        s.close().await.unwrap();
    });
}

#[test]
fn write_error_reaches_waiters_and_leaves_store_consistent() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        for gid in 1..=5 {
            append_wait(&s, gid, vec![1], parts(gid, 500)).await.unwrap();
        }
        let before = s.stats();
        s.shared().fail_writes.store(1, Ordering::SeqCst);
        let err = append_wait(&s, 6, vec![1], parts(6, 500)).await.unwrap_err();
        assert!(matches!(&err, StoreError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull));
        assert!(err.to_string().contains("disk space"), "{err}");
        assert!(s.read(6).is_err());
        assert_eq!(s.stats().live_refs, before.live_refs);
        assert_eq!(s.stats().bytes_on_disk, before.bytes_on_disk, "partial write undone");
        // The store keeps working.
        append_wait(&s, 7, vec![1], parts(7, 500)).await.unwrap();
        assert_eq!(s.read(7).unwrap(), parts(7, 500));
        s.close().await.unwrap();
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(gids_of(&rec, 1), vec![1, 2, 3, 4, 5, 7]);
        s.close().await.unwrap();
    });
}

#[test]
fn closed_store_rejects_and_invalid_input_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    rt().block_on(async {
        let (s, _) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        let other = s.clone();
        assert!(matches!(
            s.append(1, vec![], parts(1, 1), None).await,
            Err(StoreError::Invalid(_))
        ));
        let mut p = parts(1, 1);
        p.routing_key = Bytes::from(vec![b'a'; 256]);
        assert!(matches!(
            s.append(1, vec![1], p, None).await,
            Err(StoreError::Invalid(_))
        ));
        // Duplicate queue ids count once.
        append_wait(&s, 1, vec![3, 3, 3], parts(1, 1))
            .await
            .unwrap();
        assert_eq!(s.stats().live_refs, 1);
        s.close().await.unwrap();
        assert!(matches!(
            other.append(2, vec![1], parts(2, 1), None).await,
            Err(StoreError::Closed)
        ));
        assert!(matches!(other.sync().await, Err(StoreError::Closed)));
        assert_eq!(other.read(1).unwrap(), parts(1, 1), "reads still work");
        let (s, rec) = MessageStore::open(dir.path(), opts(1 << 20)).unwrap();
        assert_eq!(gids_of(&rec, 3), vec![1]);
        s.close().await.unwrap();
    });
}

// ---------------------------------------------------------------------------
// Model test.

#[derive(Debug, Clone)]
enum MOp {
    /// Append one message (two with swapped gids when `swap`).
    Append {
        queues: BTreeSet<QueueId>,
        len: usize,
        swap: bool,
    },
    Ack {
        q: QueueId,
        pick: usize,
        n: usize,
    },
    Delivered {
        q: QueueId,
        pick: usize,
    },
    DropQueue {
        q: QueueId,
    },
    Sync,
    Read {
        pick: usize,
    },
    Reboot,
    /// Close, then cut the last segment somewhere after the last sync point
    /// (and maybe append junk): a torn write at a crash.
    Crash {
        cut: f64,
        junk: Option<Vec<u8>>,
    },
}

fn mop() -> impl Strategy<Value = MOp> {
    let queue = 1..=4u64;
    prop_oneof![
        8 => (prop::collection::btree_set(1..=4u64, 1..=3), 0..300usize, prop::bool::weighted(0.15))
            .prop_map(|(queues, len, swap)| MOp::Append { queues, len, swap }),
        4 => (queue.clone(), any::<usize>(), 1..4usize).prop_map(|(q, pick, n)| MOp::Ack { q, pick, n }),
        2 => (queue.clone(), any::<usize>()).prop_map(|(q, pick)| MOp::Delivered { q, pick }),
        1 => queue.prop_map(|q| MOp::DropQueue { q }),
        2 => Just(MOp::Sync),
        2 => any::<usize>().prop_map(|pick| MOp::Read { pick }),
        1 => Just(MOp::Reboot),
        1 => (0.0..1.0f64, prop::option::of(prop::collection::vec(any::<u8>(), 1..64)))
            .prop_map(|(cut, junk)| MOp::Crash { cut, junk }),
    ]
}

struct MMsg {
    /// Live queues and their delivered flag.
    live: BTreeMap<QueueId, bool>,
    len: usize,
    /// Appended before the last sync/close: may not be lost.
    synced: bool,
}

struct Model {
    msgs: BTreeMap<Gid, MMsg>,
    next_gid: Gid,
    /// Last segment and its length at the last sync: a crash cuts after it.
    sync_point: (u64, u64),
}

impl Model {
    fn live_of(&self, q: QueueId) -> Vec<Gid> {
        self.msgs
            .iter()
            .filter(|(_, m)| m.live.contains_key(&q))
            .map(|(g, _)| *g)
            .collect()
    }

    fn live_refs(&self) -> u64 {
        self.msgs.values().map(|m| m.live.len() as u64).sum()
    }

    fn mark_synced(&mut self, dir: &Path) {
        for m in self.msgs.values_mut() {
            m.synced = true;
        }
        let (no, path) = seg_files(dir).pop().unwrap();
        self.sync_point = (no, fs::metadata(path).unwrap().len());
    }

    /// Checks a recovery against the model; unsynced messages may be gone.
    fn check_recovery(&mut self, rec: &Recovery, s: &MessageStore) {
        let mut got: BTreeMap<Gid, BTreeMap<QueueId, bool>> = BTreeMap::new();
        for (q, list) in &rec.queues {
            assert!(
                list.windows(2).all(|w| w[0].gid < w[1].gid),
                "queue {q} not ascending: {list:?}"
            );
            for m in list {
                assert!(m.gid <= rec.max_gid);
                got.entry(m.gid).or_default().insert(*q, m.delivered);
            }
        }
        for (gid, queues) in &got {
            let m = self
                .msgs
                .get(gid)
                .unwrap_or_else(|| panic!("recovered gid {gid} the model does not hold"));
            assert_eq!(&m.live, queues, "gid {gid}: live queues / delivered flags");
        }
        self.msgs.retain(|gid, m| {
            if !got.contains_key(gid) {
                assert!(!m.synced, "synced gid {gid} lost");
                return false;
            }
            true
        });
        assert_eq!(rec.messages, self.msgs.len() as u64);
        for (gid, m) in &self.msgs {
            assert_eq!(
                s.read(*gid).unwrap(),
                parts(*gid, m.len),
                "read {gid} after reopen"
            );
        }
    }
}

type Outcome = (Gid, Result<(), StoreError>);

fn run_model(ops: Vec<MOp>, segment_size: u64) {
    let dir = tempfile::tempdir().unwrap();
    let rt = rt();
    let completions: Arc<Mutex<Vec<Outcome>>> = Arc::default();
    let (mut s, _) = MessageStore::open(dir.path(), opts(segment_size)).unwrap();
    let mut m = Model {
        msgs: BTreeMap::new(),
        next_gid: 1,
        sync_point: (0, 0),
    };
    m.mark_synced(dir.path());
    for op in ops {
        rt.block_on(async {
            match op {
                MOp::Append { queues, len, swap } => {
                    let gids = if swap {
                        vec![m.next_gid + 1, m.next_gid]
                    } else {
                        vec![m.next_gid]
                    };
                    m.next_gid += gids.len() as u64;
                    for gid in gids {
                        let c = Arc::clone(&completions);
                        let done: Completion = Box::new(move |r| c.lock().unwrap().push((gid, r)));
                        s.append(
                            gid,
                            queues.iter().copied().collect(),
                            parts(gid, len),
                            Some(done),
                        )
                        .await
                        .unwrap();
                        let live = queues.iter().map(|q| (*q, false)).collect();
                        m.msgs.insert(
                            gid,
                            MMsg {
                                live,
                                len,
                                synced: false,
                            },
                        );
                    }
                }
                MOp::Ack { q, pick, n } => {
                    let live = m.live_of(q);
                    if live.is_empty() {
                        return;
                    }
                    let start = pick % live.len();
                    let gids: Vec<Gid> = live[start..(start + n).min(live.len())].to_vec();
                    for g in &gids {
                        let msg = m.msgs.get_mut(g).unwrap();
                        msg.live.remove(&q);
                        if msg.live.is_empty() {
                            m.msgs.remove(g);
                        }
                    }
                    s.ack(q, gids).await.unwrap();
                }
                MOp::Delivered { q, pick } => {
                    let live = m.live_of(q);
                    if let Some(&g) = live.get(pick % live.len().max(1)) {
                        m.msgs.get_mut(&g).unwrap().live.insert(q, true);
                        s.delivered(q, vec![g]).await.unwrap();
                    }
                }
                MOp::DropQueue { q } => {
                    let gids = m.live_of(q);
                    for g in &gids {
                        let msg = m.msgs.get_mut(g).unwrap();
                        msg.live.remove(&q);
                        if msg.live.is_empty() {
                            m.msgs.remove(g);
                        }
                    }
                    s.drop_queue(q, gids).await.unwrap();
                }
                MOp::Sync => {
                    s.sync().await.unwrap();
                    m.mark_synced(dir.path());
                    assert_eq!(s.stats().live_refs, m.live_refs());
                }
                MOp::Read { pick } => {
                    // Only synced messages are guaranteed visible to read().
                    let synced: Vec<_> = m.msgs.iter().filter(|(_, x)| x.synced).collect();
                    if let Some((gid, msg)) = synced.get(pick % synced.len().max(1)) {
                        assert_eq!(s.read(**gid).unwrap(), parts(**gid, msg.len));
                    }
                }
                MOp::Reboot | MOp::Crash { .. } => {
                    s.clone().close().await.unwrap();
                    if let MOp::Crash { cut, junk } = &op {
                        let (no, path) = seg_files(dir.path()).pop().unwrap();
                        let len = fs::metadata(&path).unwrap().len();
                        let lo = if no == m.sync_point.0 {
                            m.sync_point.1
                        } else {
                            0
                        };
                        let at = lo + ((len - lo) as f64 * cut) as u64;
                        let f = OpenOptions::new().write(true).open(&path).unwrap();
                        f.set_len(at).unwrap();
                        if let Some(junk) = junk {
                            OpenOptions::new()
                                .append(true)
                                .open(&path)
                                .unwrap()
                                .write_all(junk)
                                .unwrap();
                        }
                    } else {
                        // A clean close loses nothing.
                        for msg in m.msgs.values_mut() {
                            msg.synced = true;
                        }
                    }
                    let (s2, rec) = MessageStore::open(dir.path(), opts(segment_size)).unwrap();
                    s = s2;
                    m.check_recovery(&rec, &s);
                    m.mark_synced(dir.path());
                    assert_eq!(s.stats().live_refs, m.live_refs());
                }
            }
        });
    }
    rt.block_on(async {
        s.sync().await.unwrap();
        assert_eq!(s.stats().live_refs, m.live_refs());
        s.close().await.unwrap();
    });
    for (gid, r) in completions.lock().unwrap().iter() {
        assert!(r.is_ok(), "completion of {gid}: {r:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn model_matches_store(
        ops in prop::collection::vec(mop(), 1..80),
        segment_size in prop_oneof![Just(1u64), Just(400), Just(3000), Just(1 << 20)],
    ) {
        run_model(ops, segment_size);
    }
}

// ---------------------------------------------------------------------------
// SIGKILL: a child process appends as fast as it can and prints every gid
// whose completion reported Ok; the parent kills it at a random moment, then
// every printed gid must be recovered, intact.

const CHILD_ENV: &str = "WARREN_STORE_SIGKILL_CHILD";

fn crash_child(dir: &Path) {
    let start: Gid = std::env::var("WARREN_STORE_SIGKILL_START")
        .unwrap()
        .parse()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (s, _) = MessageStore::open(dir, opts(256 << 10)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let mut gid = start;
        while std::time::Instant::now() < deadline {
            let g = gid;
            let done: Completion = Box::new(move |r| {
                if r.is_ok() {
                    println!("CONFIRMED {g}");
                }
            });
            s.append(
                g,
                vec![1, 1 + g % 3],
                parts(g, (g % 2000) as usize),
                Some(done),
            )
            .await
            .unwrap();
            if g.is_multiple_of(10) {
                s.ack(1, vec![g - 5]).await.unwrap();
            }
            gid += 1;
        }
    });
}

#[test]
fn sigkill_loses_no_confirmed_message() {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        crash_child(Path::new(&dir));
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut confirmed = BTreeSet::new();
    let mut start = 1;
    for round in 0..4u64 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::sigkill_loses_no_confirmed_message",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .env("WARREN_STORE_SIGKILL_START", start.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stop_after = 300 + round * 700;
        let mut seen = 0;
        for line in std::io::BufReader::new(child.stdout.take().unwrap()).lines() {
            let line = line.unwrap();
            if let Some(g) = line.strip_prefix("CONFIRMED ") {
                let g: Gid = g.parse().unwrap();
                confirmed.insert(g);
                seen += 1;
                if seen == stop_after {
                    child.kill().unwrap(); // SIGKILL
                    break;
                }
            }
        }
        child.wait().unwrap();
        rt().block_on(async {
            let (s, rec) = MessageStore::open(dir.path(), opts(256 << 10)).unwrap();
            let q1: BTreeSet<Gid> = gids_of(&rec, 1).into_iter().collect();
            for g in &confirmed {
                // gids ≡ 5 (mod 10) are acked by the child: they may be gone.
                if g % 10 != 5 {
                    assert!(q1.contains(g), "round {round}: confirmed gid {g} lost");
                }
                if q1.contains(g) {
                    assert_eq!(s.read(*g).unwrap(), parts(*g, (*g % 2000) as usize));
                }
            }
            start = rec.max_gid.max(start) + 1;
            s.close().await.unwrap();
        });
    }
    assert!(confirmed.len() > 3000);
}
