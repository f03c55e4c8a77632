//! Opening the message store: scan segments in order, verify every record's
//! CRC, truncate torn tails, apply ack files, rebuild the index and the
//! per-queue recovery lists, delete segments nothing refers to.
//!
//! Runs once, on the caller's thread, before the writer thread exists.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, Read};
use std::path::Path;
use std::sync::Arc;

use tracing::{info, warn};

use super::segment::{
    self, ACK_ACK, ACK_DELIVERED, ACK_RECORD_LEN, HEADER_LEN, SegIndex, Segment, acks_path,
    seg_path,
};
use super::{Gid, QueueId, RecoveredMessage, Recovery, StoreError};

/// Reads `dir` (creating it if missing) into the sealed segments that still
/// hold live references, plus what each queue gets back, and the number
/// for the next segment (above every file seen).
pub(crate) fn recover(dir: &Path) -> Result<(Vec<Arc<Segment>>, Recovery, u64), StoreError> {
    let started = std::time::Instant::now();
    fs::create_dir_all(dir).map_err(|e| StoreError::io("create directory", dir, e))?;
    let mut segs = BTreeMap::new();
    let mut acks = HashSet::new();
    for entry in fs::read_dir(dir).map_err(|e| StoreError::io("list directory", dir, e))? {
        let entry = entry.map_err(|e| StoreError::io("list directory", dir, e))?;
        let name = entry.file_name();
        match name.to_str().and_then(segment::parse_file_name) {
            Some((no, "seg")) => {
                segs.insert(no, ());
            }
            Some((no, _)) => {
                acks.insert(no);
            }
            None if name == "LOCK" => {}
            None => {
                warn!(file = ?entry.path(), "ignoring unknown file in the message store directory")
            }
        }
    }
    let next_no = segs.keys().chain(acks.iter()).max().map_or(1, |n| n + 1);
    // An ack file whose segment is gone was being deleted at a crash.
    for no in acks.iter().filter(|no| !segs.contains_key(no)) {
        remove(&acks_path(dir, *no))?;
    }

    let mut rec = Recovery::default();
    let mut live_segments = Vec::new();
    let mut payload = Vec::new();
    for &no in segs.keys() {
        let (acked, delivered, ack_len) = read_acks(&acks_path(dir, no))?;
        let path = seg_path(dir, no);
        let mut index = SegIndex::default();
        let seg_len = scan_segment(&path, &mut payload, |gid, queues, offset, body_len| {
            rec.max_gid = rec.max_gid.max(gid);
            let mut live = 0u16;
            for q in queues.chunks_exact(8) {
                let q = u64::from_le_bytes([q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7]]);
                if acked.contains(&(q, gid)) {
                    continue;
                }
                live += 1;
                let delivered = delivered.contains(&(q, gid));
                rec.queues.entry(q).or_default().push(RecoveredMessage {
                    gid,
                    delivered,
                    size: body_len.min(u64::from(u32::MAX)) as u32,
                });
            }
            if live > 0 {
                index.insert(gid, offset, live);
                rec.messages += 1;
                rec.bytes += body_len;
            }
        })?;
        if index.live_refs == 0 {
            remove(&path)?;
            remove(&acks_path(dir, no))?;
            continue;
        }
        index.shrink();
        let file = File::open(&path).map_err(|e| StoreError::io("open", &path, e))?;
        live_segments.push(Arc::new(Segment::new(
            no, path, file, index, seg_len, ack_len,
        )));
    }
    for list in rec.queues.values_mut() {
        // Nearly sorted already (segment order, gids almost ascending).
        list.sort_unstable_by_key(|m| m.gid);
    }
    info!(
        segments = live_segments.len(),
        messages = rec.messages,
        queues = rec.queues.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "message store recovered"
    );
    Ok((live_segments, rec, next_no))
}

/// Scans one segment, calling `each(gid, queue id bytes, offset, body len)`
/// per valid record, and truncates the file after the last valid one.
/// Returns the (possibly truncated) length.
fn scan_segment(
    path: &Path,
    payload: &mut Vec<u8>,
    mut each: impl FnMut(Gid, &[u8], u32, u64),
) -> Result<u64, StoreError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| StoreError::io("open", path, e))?;
    let file_len = file
        .metadata()
        .map_err(|e| StoreError::io("stat", path, e))?
        .len();
    let mut r = BufReader::with_capacity(1 << 20, &file);
    let mut pos = 0u64;
    let mut why = None;
    while pos < file_len {
        let mut header = [0u8; HEADER_LEN];
        if pos + HEADER_LEN as u64 > file_len {
            why = Some("record header cut short");
            break;
        }
        r.read_exact(&mut header)
            .map_err(|e| StoreError::io("read", path, e))?;
        let Some((len, crc)) = segment::parse_header(&header) else {
            why = Some("invalid record length");
            break;
        };
        if pos + (HEADER_LEN + len) as u64 > file_len {
            why = Some("record cut short");
            break;
        }
        payload.resize(len, 0);
        r.read_exact(payload)
            .map_err(|e| StoreError::io("read", path, e))?;
        if crc32fast::hash(payload) != crc {
            why = Some("checksum mismatch");
            break;
        }
        let Some((gid, queues)) = segment::parse_payload_head(payload) else {
            why = Some("malformed record");
            break;
        };
        let body_len = body_len_of(payload, queues.len()).unwrap_or(0);
        let Ok(offset) = u32::try_from(pos) else {
            why = Some("record beyond the 4 GiB a segment may hold");
            break;
        };
        each(gid, queues, offset, body_len);
        pos += (HEADER_LEN + len) as u64;
    }
    if let Some(why) = why {
        warn!(
            file = %path.display(),
            at = pos,
            dropped_bytes = file_len - pos,
            reason = why,
            "truncating torn tail of message segment (unconfirmed writes from a crash)"
        );
        file.set_len(pos)
            .map_err(|e| StoreError::io("truncate", path, e))?;
        file.sync_all()
            .map_err(|e| StoreError::io("fsync", path, e))?;
    }
    Ok(pos)
}

/// Body length of a verified payload with `qbytes` bytes of queue ids.
fn body_len_of(p: &[u8], qbytes: usize) -> Option<u64> {
    let mut at = 11 + qbytes;
    at += 1 + *p.get(at)? as usize; // exchange
    at += 1 + *p.get(at)? as usize; // routing key
    let props = u32::from_le_bytes(p.get(at..at + 4)?.try_into().ok()?) as usize;
    at += 4 + props;
    Some(u64::from(u32::from_le_bytes(
        p.get(at..at + 4)?.try_into().ok()?,
    )))
}

type PairSet = HashSet<(QueueId, Gid)>;

/// Loads an ack file (missing = empty), truncating a torn last record.
fn read_acks(path: &Path) -> Result<(PairSet, PairSet, u64), StoreError> {
    let mut acked = HashSet::new();
    let mut delivered = HashSet::new();
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((acked, delivered, 0)),
        Err(e) => return Err(StoreError::io("read", path, e)),
    };
    let whole = data.len() as u64 / ACK_RECORD_LEN * ACK_RECORD_LEN;
    if whole != data.len() as u64 {
        warn!(file = %path.display(), at = whole, "truncating torn ack record");
        let f = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(|e| StoreError::io("open", path, e))?;
        f.set_len(whole)
            .map_err(|e| StoreError::io("truncate", path, e))?;
    }
    for rec in data.chunks_exact(ACK_RECORD_LEN as usize) {
        match segment::decode_ack(rec) {
            Some((ACK_ACK, q, g)) => {
                acked.insert((q, g));
            }
            Some((ACK_DELIVERED, q, g)) => {
                delivered.insert((q, g));
            }
            // Zero-filled blocks after a crash: nothing was recorded there.
            _ => {}
        }
    }
    Ok((acked, delivered, whole))
}

fn remove(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io("delete", path, e)),
    }
}

/// Deletes a segment and then its ack file (in that order: a crash in
/// between leaves an orphan ack file, which the next open removes).
pub(crate) fn remove_segment(dir: &Path, no: u64) -> Result<(), StoreError> {
    remove(&seg_path(dir, no))?;
    remove(&acks_path(dir, no))
}
