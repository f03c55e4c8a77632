//! The stream writer: one OS thread per stream (it blocks in fdatasync,
//! which must never happen on the async runtime) owning the active
//! segment.
//!
//! Group commit: it takes everything that arrived while the previous
//! batch was being written, encodes it into chunks, writes them and
//! fdatasyncs once; only then are the publishers' confirms sent and the
//! actor told about the new chunks (readers never see unsynced data).
//! A full segment is sealed and a new one started on the way.

use super::chunk::{self, ChunkHeader};
use super::segment::{ActiveSegment, log_path};
use super::settings::StreamSettings;
use super::tracking;
use crate::broker::ConnCmd;
use crate::queue::ConfirmTo;
use crate::queue::message::Message;
use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, warn};

/// Messages per chunk, at most.
const CHUNK_MAX_MSGS: usize = 4096;
/// Bytes of bodies per chunk, about.
const CHUNK_MAX_BYTES: usize = 1 << 20;

/// The writer's inbox.
#[derive(Debug)]
pub enum WriteReq {
    /// Append messages; confirm to the publisher once durable.
    Append {
        /// In publish order.
        msgs: Vec<Arc<Message>>,
        /// Confirm target.
        confirm: Option<ConfirmTo>,
    },
    /// Replace the stored consumer offsets (serialised).
    SaveOffsets(Vec<u8>),
    /// Finish what is queued, close the files and stop.
    Stop(oneshot::Sender<()>),
}

/// What a commit changed, in order.
#[derive(Debug)]
pub enum CommitItem {
    /// A new (active) segment, with a read handle.
    Segment {
        /// Its first offset.
        base: u64,
        /// Read handle.
        file: Arc<File>,
    },
    /// A durable chunk.
    Chunk {
        /// Segment base.
        seg: u64,
        /// Header.
        header: ChunkHeader,
        /// Position in the segment.
        pos: u64,
    },
}

/// Starts the writer thread for a stream.
pub fn start(
    name: &str,
    dir: PathBuf,
    active: ActiveSegment,
    settings: StreamSettings,
    inbox: usize,
) -> io::Result<(
    mpsc::Sender<WriteReq>,
    mpsc::UnboundedReceiver<Vec<CommitItem>>,
)> {
    let (tx, rx) = mpsc::channel(inbox.max(1));
    // Unbounded: one message per fdatasync, consumed by the stream actor.
    let (etx, erx) = mpsc::unbounded_channel();
    let last_ts = active.summary.last_ts.unwrap_or(0);
    let w = Writer {
        dir,
        active: Some(active),
        settings,
        events: etx,
        last_ts,
    };
    std::thread::Builder::new()
        .name(format!("wstream-{name}"))
        .spawn(move || w.run(rx))?;
    Ok((tx, erx))
}

struct Writer {
    dir: PathBuf,
    active: Option<ActiveSegment>,
    settings: StreamSettings,
    events: mpsc::UnboundedSender<Vec<CommitItem>>,
    last_ts: i64,
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<WriteReq>) {
        let mut reqs = Vec::new();
        while let Some(r) = rx.blocking_recv() {
            reqs.push(r);
            while reqs.len() < 4096 {
                match rx.try_recv() {
                    Ok(r) => reqs.push(r),
                    Err(_) => break,
                }
            }
            if let Some(stop) = self.process(&mut reqs) {
                drop(self.active.take());
                let _ = stop.send(());
                return;
            }
        }
    }

    fn process(&mut self, reqs: &mut Vec<WriteReq>) -> Option<oneshot::Sender<()>> {
        let mut msgs = Vec::new();
        let mut confirms = Vec::new();
        let mut offsets = None;
        let mut stop = None;
        for r in reqs.drain(..) {
            match r {
                WriteReq::Append { msgs: m, confirm } => {
                    msgs.extend(m);
                    confirms.extend(confirm);
                }
                WriteReq::SaveOffsets(b) => offsets = Some(b),
                WriteReq::Stop(s) => stop = Some(s),
            }
        }
        let mut items = Vec::new();
        let ok = if msgs.is_empty() {
            true
        } else {
            match self.append(&msgs, &mut items) {
                Ok(()) => true,
                Err(e) => {
                    error!(dir = %self.dir.display(), "appending to the stream failed, publishers get basic.nack: {e}");
                    false
                }
            }
        };
        for c in confirms {
            let _ = c.conn.send(ConnCmd::Confirm {
                channel: c.channel,
                seqs: c.seqs,
                nack: !ok,
            });
        }
        if !items.is_empty() {
            let _ = self.events.send(items);
        }
        if let Some(b) = offsets
            && let Err(e) = tracking::save(&self.dir, &b)
        {
            warn!(dir = %self.dir.display(), "could not store stream consumer offsets: {e}");
        }
        stop
    }

    /// Writes `msgs` as chunks and syncs. `items` gets what became durable
    /// (also on failure: chunks in a segment sealed before the failure).
    fn append(&mut self, msgs: &[Arc<Message>], items: &mut Vec<CommitItem>) -> io::Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("the stream writer has no active segment"));
        };
        let before = active.summary.clone();
        let mut pending = Vec::new();
        let mut buf = Vec::new();
        let res = (|| -> io::Result<()> {
            let mut start = 0;
            while start < msgs.len() {
                let mut end = start;
                let mut bytes = 0;
                while end < msgs.len() && end - start < CHUNK_MAX_MSGS && bytes < CHUNK_MAX_BYTES {
                    bytes += msgs[end].body.len() + msgs[end].raw_properties.len();
                    end += 1;
                }
                let group = &msgs[start..end];
                start = end;
                self.last_ts = self.last_ts.max(now_ms());
                let Some(active) = self.active.as_mut() else {
                    return Err(io::Error::other(
                        "the stream writer lost its active segment",
                    ));
                };
                buf.clear();
                let h = chunk::encode(
                    active.summary.end,
                    self.last_ts,
                    group,
                    self.settings.filter_size,
                    &mut buf,
                );
                if active.summary.size > 0
                    && active.summary.size + h.total_len() > self.settings.max_segment_size
                {
                    let next = active.summary.end;
                    if let Some(full) = self.active.take() {
                        full.seal()?;
                    }
                    items.append(&mut pending);
                    let fresh = ActiveSegment::create(&self.dir, next)?;
                    items.push(CommitItem::Segment {
                        base: next,
                        file: Arc::new(File::open(log_path(&self.dir, next))?),
                    });
                    self.active = Some(fresh);
                }
                let Some(active) = self.active.as_mut() else {
                    return Err(io::Error::other(
                        "the stream writer lost its active segment",
                    ));
                };
                let pos = active.summary.size;
                active.append(&h, &buf)?;
                pending.push(CommitItem::Chunk {
                    seg: active.base(),
                    header: h,
                    pos,
                });
            }
            if let Some(active) = self.active.as_mut() {
                active.sync()?;
            }
            Ok(())
        })();
        match res {
            Ok(()) => {
                items.append(&mut pending);
                Ok(())
            }
            Err(e) => {
                if let Some(active) = self.active.as_mut() {
                    let to = if active.base() == before.base {
                        before
                    } else {
                        super::segment::SegmentSummary {
                            base: active.base(),
                            end: active.base(),
                            ..Default::default()
                        }
                    };
                    if let Err(e2) = active.truncate(&to) {
                        error!(dir = %self.dir.display(), "could not undo a failed stream append: {e2}");
                    }
                }
                Err(e)
            }
        }
    }
}
