//! Model test of the stream log (as sled's `fuzz_model`): random appends
//! through the real writer thread, reopens, and torn tails (garbage or a
//! half-written chunk after the last confirmed one, as a SIGKILL mid-write
//! leaves), checked against a `Vec` of confirmed bodies.

use super::chunk;
use super::log;
use super::reader::{LogView, OffsetSpec, resolve};
use super::segment::{SegmentSummary, log_path};
use super::settings::StreamSettings;
use super::writer::{self, CommitItem, WriteReq};
use crate::broker::ConnCmd;
use crate::queue::ConfirmTo;
use crate::queue::stream::chunk::tests::msg;
use proptest::prelude::*;
use std::io::Write;
use std::path::Path;
use tokio::sync::mpsc;

struct Open {
    tx: mpsc::Sender<WriteReq>,
    events: mpsc::UnboundedReceiver<Vec<CommitItem>>,
    view: LogView,
}

fn open(dir: &Path, settings: &StreamSettings) -> Open {
    let (active, view) = log::open(dir).unwrap();
    let (tx, events) = writer::start(
        "model",
        dir.to_path_buf(),
        active,
        settings.clone(),
        16,
        false,
    )
    .unwrap();
    Open { tx, events, view }
}

fn close(o: Open) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    o.tx.blocking_send(WriteReq::Stop(tx)).unwrap();
    rx.blocking_recv().unwrap();
}

fn read_all(view: &LogView, spec: OffsetSpec) -> Vec<Vec<u8>> {
    let mut c = resolve(view, spec).unwrap();
    let mut out = vec![];
    while let Some(ch) = view.read_chunk(&mut c).unwrap() {
        let recs = chunk::records(ch.data, ch.header.count).unwrap();
        for (i, r) in recs.into_iter().enumerate() {
            if ch.header.first + i as u64 >= c.from {
                out.push(r.body.to_vec());
            }
        }
    }
    out
}

#[derive(Debug, Clone)]
enum Op {
    Append(Vec<usize>),
    Reopen,
    Garbage(Vec<u8>),
    HalfChunk(usize),
    ReadFrom(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec(0usize..300, 1..20).prop_map(Op::Append),
        1 => Just(Op::Reopen),
        1 => proptest::collection::vec(any::<u8>(), 1..100).prop_map(Op::Garbage),
        1 => (1usize..10).prop_map(Op::HalfChunk),
        2 => any::<usize>().prop_map(Op::ReadFrom),
    ]
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let b = *log::segment_bases(dir).unwrap().last().unwrap();
    log_path(dir, b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]
    #[test]
    fn log_matches_model(ops in proptest::collection::vec(op(), 1..40)) {
        let dir = tempfile::tempdir().unwrap();
        let settings = StreamSettings { max_segment_size: 3000, ..Default::default() };
        let mut model: Vec<Vec<u8>> = vec![];
        let mut o = open(dir.path(), &settings);
        let (ctx, mut crx) = mpsc::unbounded_channel::<ConnCmd>();
        for op in ops {
            match op {
                Op::Append(sizes) => {
                    let bodies: Vec<Vec<u8>> = sizes.iter().enumerate().map(|(i, n)| vec![(model.len() + i) as u8; *n]).collect();
                    let msgs = bodies.iter().map(|b| msg(b, None)).collect();
                    let confirm = ConfirmTo { conn: ctx.clone(), channel: 1, seqs: vec![model.len() as u64] };
                    o.tx.blocking_send(WriteReq::Append { msgs, confirm: Some(confirm) }).unwrap();
                    match crx.blocking_recv().unwrap() {
                        ConnCmd::Confirm { nack, .. } => prop_assert!(!nack),
                        _ => prop_assert!(false, "unexpected command"),
                    }
                    for it in o.events.blocking_recv().unwrap() {
                        match it {
                            CommitItem::Segment { base, file } => o.view.push_segment(base, file),
                            CommitItem::Chunk { seg, header, pos } => o.view.add_chunk(seg, &header, pos),
                            _ => prop_assert!(false, "replication item from a single-node writer"),
                        }
                    }
                    model.extend(bodies);
                }
                Op::Reopen => {
                    close(o);
                    o = open(dir.path(), &settings);
                }
                Op::Garbage(bytes) => {
                    close(o);
                    let mut f = std::fs::OpenOptions::new().append(true).open(last_segment(dir.path())).unwrap();
                    f.write_all(&bytes).unwrap();
                    o = open(dir.path(), &settings);
                }
                Op::HalfChunk(n) => {
                    close(o);
                    let msgs: Vec<_> = (0..n).map(|i| msg(&[0xEE; 50][..i * 5], None)).collect();
                    let mut buf = vec![];
                    chunk::encode(model.len() as u64, 0, &msgs, 16, &mut buf);
                    let mut f = std::fs::OpenOptions::new().append(true).open(last_segment(dir.path())).unwrap();
                    f.write_all(&buf[..buf.len() - 1]).unwrap();
                    o = open(dir.path(), &settings);
                }
                Op::ReadFrom(i) => {
                    let i = if model.is_empty() { 0 } else { i % model.len() };
                    prop_assert_eq!(read_all(&o.view, OffsetSpec::Offset(i as u64)), model[i.min(model.len())..].to_vec());
                }
            }
            prop_assert_eq!(o.view.next_offset(), model.len() as u64);
            prop_assert_eq!(o.view.first_offset(), 0);
            prop_assert_eq!(read_all(&o.view, OffsetSpec::First), model.clone());
            let sizes: u64 = o.view.segments.iter().map(|s| s.summary.size).sum();
            let on_disk: u64 = log::segment_bases(dir.path()).unwrap().iter().map(|b| std::fs::metadata(log_path(dir.path(), *b)).unwrap().len()).sum();
            prop_assert_eq!(sizes, on_disk);
            let _ = SegmentSummary::default();
        }
        close(o);
    }
}
