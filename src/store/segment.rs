//! Segment files, ack files and the in-memory index of one segment.
//!
//! Owns the byte formats (see the table in [`crate::store`]) and the
//! [`Segment`] shared by the writer thread and readers. Nothing here spawns
//! threads or decides *when* to write; [`super::writer`] does.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use super::{Gid, MessageParts, QueueId, StoreError};

/// Record kind byte of a message record in a `.seg` file.
pub(crate) const KIND_MESSAGE: u8 = 1;
/// Ack-file record kind: (queue, gid) settled, the reference is gone.
pub(crate) const ACK_ACK: u8 = 1;
/// Ack-file record kind: (queue, gid) was handed to a consumer at least once.
pub(crate) const ACK_DELIVERED: u8 = 2;
/// Size of one ack-file record: u8 kind, u64 queue, u64 gid.
pub(crate) const ACK_RECORD_LEN: u64 = 17;
/// `length` + `crc` in front of every segment record.
pub(crate) const HEADER_LEN: usize = 8;
/// Smallest valid payload: kind, gid, n_queues, and the four length prefixes.
const MIN_PAYLOAD: usize = 1 + 8 + 2 + 1 + 1 + 4 + 4;
/// Largest segment (and so the largest offset) the index can address with u32.
pub(crate) const MAX_SEGMENT_SIZE: u64 = 1 << 31;
/// Largest payload accepted when reading back: a record never spans more
/// than one segment's worth of bytes plus one message, and AMQP bodies are
/// capped far below this. Anything larger is a torn or corrupt length field.
const MAX_PAYLOAD: usize = (1 << 31) - 1;

/// `<dir>/00000000000000000042.seg`.
pub(crate) fn seg_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:020}.seg"))
}

/// `<dir>/00000000000000000042.acks`.
pub(crate) fn acks_path(dir: &Path, no: u64) -> PathBuf {
    dir.join(format!("{no:020}.acks"))
}

/// Parses `00000000000000000042.seg` / `.acks` into `(42, "seg")`.
pub(crate) fn parse_file_name(name: &str) -> Option<(u64, &str)> {
    let (stem, ext) = name.split_once('.')?;
    if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let no = stem.parse().ok()?;
    match ext {
        "seg" | "acks" => Some((no, ext)),
        _ => None,
    }
}

/// Encoded size of a message record, header included.
pub(crate) fn record_len(queues: usize, parts: &MessageParts) -> usize {
    HEADER_LEN
        + 1
        + 8
        + 2
        + queues * 8
        + 1
        + parts.exchange.len()
        + 1
        + parts.routing_key.len()
        + 4
        + parts.raw_properties.len()
        + 4
        + parts.body.len()
}

/// Checks what the record format can hold, before anything is queued.
pub(crate) fn validate(queues: &[QueueId], parts: &MessageParts) -> Result<(), StoreError> {
    if queues.is_empty() {
        return Err(StoreError::Invalid(
            "a message must be stored for at least one queue".into(),
        ));
    }
    if queues.len() > usize::from(u16::MAX) {
        return Err(StoreError::Invalid(format!(
            "{} queues for one message; at most 65535",
            queues.len()
        )));
    }
    if parts.exchange.len() > 255 || parts.routing_key.len() > 255 {
        return Err(StoreError::Invalid(
            "exchange name or routing key longer than 255 bytes".into(),
        ));
    }
    if record_len(queues.len(), parts) - HEADER_LEN > MAX_PAYLOAD {
        return Err(StoreError::Invalid("message larger than 2 GiB".into()));
    }
    Ok(())
}

/// Appends one message record to `buf`. `validate` must have accepted it.
pub(crate) fn encode_record(buf: &mut Vec<u8>, gid: Gid, queues: &[QueueId], parts: &MessageParts) {
    let start = buf.len();
    let payload_len = record_len(queues.len(), parts) - HEADER_LEN;
    buf.extend_from_slice(&(payload_len as u32).to_le_bytes());
    buf.extend_from_slice(&[0; 4]); // crc, filled below
    buf.push(KIND_MESSAGE);
    buf.extend_from_slice(&gid.to_le_bytes());
    buf.extend_from_slice(&(queues.len() as u16).to_le_bytes());
    for q in queues {
        buf.extend_from_slice(&q.to_le_bytes());
    }
    buf.push(parts.exchange.len() as u8);
    buf.extend_from_slice(&parts.exchange);
    buf.push(parts.routing_key.len() as u8);
    buf.extend_from_slice(&parts.routing_key);
    buf.extend_from_slice(&(parts.raw_properties.len() as u32).to_le_bytes());
    buf.extend_from_slice(&parts.raw_properties);
    buf.extend_from_slice(&(parts.body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&parts.body);
    let crc = crc32fast::hash(&buf[start + HEADER_LEN..]);
    buf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Appends one ack-file record to `buf`.
pub(crate) fn encode_ack(buf: &mut Vec<u8>, kind: u8, queue: QueueId, gid: Gid) {
    buf.push(kind);
    buf.extend_from_slice(&queue.to_le_bytes());
    buf.extend_from_slice(&gid.to_le_bytes());
}

/// Decodes one ack-file record (exactly 17 bytes).
pub(crate) fn decode_ack(rec: &[u8]) -> Option<(u8, QueueId, Gid)> {
    let kind = *rec.first()?;
    let queue = u64::from_le_bytes(rec.get(1..9)?.try_into().ok()?);
    let gid = u64::from_le_bytes(rec.get(9..17)?.try_into().ok()?);
    Some((kind, queue, gid))
}

/// Splits a record header into `(payload length, crc)`, rejecting lengths no
/// writer produces (a torn or zero-filled tail).
pub(crate) fn parse_header(h: &[u8; HEADER_LEN]) -> Option<(usize, u32)> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    (MIN_PAYLOAD..=MAX_PAYLOAD)
        .contains(&len)
        .then_some((len, crc))
}

/// The head of a payload that recovery needs: gid and queue ids. `None` if
/// the payload is not a well-formed message record.
pub(crate) fn parse_payload_head(p: &[u8]) -> Option<(Gid, &[u8])> {
    if *p.first()? != KIND_MESSAGE {
        return None;
    }
    let gid = u64::from_le_bytes(p.get(1..9)?.try_into().ok()?);
    let n = u16::from_le_bytes(p.get(9..11)?.try_into().ok()?) as usize;
    let queues = p.get(11..11 + n * 8)?;
    Some((gid, queues))
}

/// Cuts a verified payload (kind onwards) into message parts, sharing `p`.
fn parse_parts(p: &Bytes) -> Option<(Gid, MessageParts)> {
    let (gid, queues) = parse_payload_head(p)?;
    let mut at = 11 + queues.len();
    let mut take = |len_bytes: usize| -> Option<Bytes> {
        let lb = p.get(at..at + len_bytes)?;
        let len = match len_bytes {
            1 => lb[0] as usize,
            _ => u32::from_le_bytes(lb.try_into().ok()?) as usize,
        };
        at += len_bytes;
        let s = (at + len <= p.len()).then(|| p.slice(at..at + len))?;
        at += len;
        Some(s)
    };
    let exchange = take(1)?;
    let routing_key = take(1)?;
    let raw_properties = take(4)?;
    let body = take(4)?;
    Some((
        gid,
        MessageParts {
            exchange,
            routing_key,
            raw_properties,
            body,
        },
    ))
}

/// The in-memory index of one segment: which gids it holds, where, and how
/// many queues still reference each. Three parallel vectors rather than a
/// `Vec<(u64, u32, u16)>` so an entry costs 14 bytes, not 16 with padding.
#[derive(Default)]
pub(crate) struct SegIndex {
    gids: Vec<Gid>,
    offsets: Vec<u32>,
    refs: Vec<u16>,
    /// Sum of `refs`: the segment may be deleted when this is 0.
    pub(crate) live_refs: u64,
    /// Entries with `refs > 0`; drives compaction.
    live_msgs: u64,
}

impl SegIndex {
    /// Adds a message, keeping `gids` sorted (gids arrive nearly in order, so
    /// the insert position is almost always the end).
    pub(crate) fn insert(&mut self, gid: Gid, offset: u32, refs: u16) {
        let pos = match self.gids.last() {
            Some(&last) if last >= gid => self.gids.partition_point(|&g| g < gid),
            _ => self.gids.len(),
        };
        self.gids.insert(pos, gid);
        self.offsets.insert(pos, offset);
        self.refs.insert(pos, refs);
        self.live_refs += u64::from(refs);
        if refs > 0 {
            self.live_msgs += 1;
        }
    }

    fn find(&self, gid: Gid) -> Option<usize> {
        self.gids.binary_search(&gid).ok()
    }

    /// Offset of a message that still has a live reference.
    pub(crate) fn offset_of(&self, gid: Gid) -> Option<u32> {
        let i = self.find(gid)?;
        (self.refs.get(i).copied().unwrap_or(0) > 0)
            .then(|| self.offsets.get(i).copied())
            .flatten()
    }

    /// Whether `gid` is here with a live reference.
    pub(crate) fn is_live(&self, gid: Gid) -> bool {
        self.offset_of(gid).is_some()
    }

    /// Drops one reference. Returns false when the gid is unknown or already
    /// has no references (a duplicate ack), which is then ignored.
    pub(crate) fn release(&mut self, gid: Gid) -> bool {
        let Some(i) = self.find(gid) else {
            return false;
        };
        match self.refs.get_mut(i) {
            Some(r) if *r > 0 => {
                *r -= 1;
                self.live_refs -= 1;
                if *r == 0 {
                    self.live_msgs -= 1;
                }
                true
            }
            _ => false,
        }
    }

    /// Number of entries (live or not).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.gids.len()
    }

    /// Forgets dead entries once they are three quarters of the index, so a
    /// long-lived segment with a few stragglers does not pin memory for
    /// every message it ever held. Amortised O(1) per ack.
    pub(crate) fn maybe_compact(&mut self) {
        let len = self.gids.len();
        if len < 1024 || self.live_msgs * 4 > len as u64 {
            return;
        }
        let mut w = 0;
        for r in 0..len {
            if self.refs[r] > 0 {
                self.gids[w] = self.gids[r];
                self.offsets[w] = self.offsets[r];
                self.refs[w] = self.refs[r];
                w += 1;
            }
        }
        self.gids.truncate(w);
        self.offsets.truncate(w);
        self.refs.truncate(w);
        self.shrink();
    }

    /// Releases spare capacity (on sealing and after compaction).
    pub(crate) fn shrink(&mut self) {
        self.gids.shrink_to_fit();
        self.offsets.shrink_to_fit();
        self.refs.shrink_to_fit();
    }

    /// Heap bytes held, for stats.
    pub(crate) fn heap_bytes(&self) -> usize {
        self.gids.capacity() * 8 + self.offsets.capacity() * 4 + self.refs.capacity() * 2
    }
}

/// One segment as seen by readers and the writer: its number, a read handle,
/// and its index. The writer thread holds its own append handle for the
/// active segment.
pub(crate) struct Segment {
    pub(crate) no: u64,
    pub(crate) path: PathBuf,
    file: File,
    index: RwLock<SegIndex>,
    /// Smallest and largest gid ever inserted (never shrinks: conservative
    /// ranges keep the segment lookup correct after compaction).
    min_gid: AtomicU64,
    max_gid: AtomicU64,
    /// Bytes of the `.seg` and `.acks` files, for stats.
    pub(crate) seg_bytes: AtomicU64,
    pub(crate) ack_bytes: AtomicU64,
}

impl Segment {
    pub(crate) fn new(
        no: u64,
        path: PathBuf,
        file: File,
        index: SegIndex,
        seg_bytes: u64,
        ack_bytes: u64,
    ) -> Self {
        let seg = Segment {
            no,
            path,
            file,
            index: RwLock::new(SegIndex::default()),
            min_gid: AtomicU64::new(u64::MAX),
            max_gid: AtomicU64::new(0),
            seg_bytes: AtomicU64::new(seg_bytes),
            ack_bytes: AtomicU64::new(ack_bytes),
        };
        if let (Some(&lo), Some(&hi)) = (index.gids.first(), index.gids.last()) {
            seg.note_range(lo, hi);
        }
        *seg.index_mut() = index;
        seg
    }

    pub(crate) fn index(&self) -> RwLockReadGuard<'_, SegIndex> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn index_mut(&self) -> RwLockWriteGuard<'_, SegIndex> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Widens the gid range; call after inserting.
    pub(crate) fn note_range(&self, lo: Gid, hi: Gid) {
        self.min_gid.fetch_min(lo, Ordering::Release);
        self.max_gid.fetch_max(hi, Ordering::Release);
    }

    pub(crate) fn may_contain(&self, gid: Gid) -> bool {
        self.min_gid.load(Ordering::Acquire) <= gid && gid <= self.max_gid.load(Ordering::Acquire)
    }

    pub(crate) fn min_gid(&self) -> Gid {
        self.min_gid.load(Ordering::Acquire)
    }

    /// Reads and verifies the record at `offset` with positioned reads; safe
    /// to call from any thread while the writer appends.
    pub(crate) fn read_at(&self, gid: Gid, offset: u32) -> Result<MessageParts, StoreError> {
        let io_err = |e: io::Error| StoreError::io("read", &self.path, e);
        let corrupt = |detail: &str| StoreError::Corrupt {
            path: self.path.clone(),
            offset: u64::from(offset),
            detail: detail.to_string(),
        };
        // One read usually gets the whole record; a second one fetches the
        // rest of a large message. The record is then copied into a buffer
        // of its own size: the message's body points into it for as long as
        // the message is held, so a 4 KiB read buffer per 100-byte message
        // would multiply the memory of a backlog being drained.
        let mut first = [0u8; 4096];
        let n = read_some_at(&self.file, &mut first, u64::from(offset)).map_err(io_err)?;
        let header: [u8; HEADER_LEN] = first
            .get(..HEADER_LEN)
            .filter(|_| n >= HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or_else(|| corrupt("record header cut short"))?;
        let (len, crc) = parse_header(&header).ok_or_else(|| corrupt("bad record length"))?;
        let total = HEADER_LEN + len;
        let buf = if n < total {
            let mut buf = vec![0u8; total];
            buf[..n].copy_from_slice(&first[..n]);
            self.file
                .read_exact_at(&mut buf[n..], u64::from(offset) + n as u64)
                .map_err(io_err)?;
            buf
        } else {
            first[..total].to_vec()
        };
        let payload = Bytes::from(buf).slice(HEADER_LEN..);
        if crc32fast::hash(&payload) != crc {
            return Err(corrupt("record checksum mismatch"));
        }
        let (found, parts) =
            parse_parts(&payload).ok_or_else(|| corrupt("malformed message record"))?;
        if found != gid {
            return Err(corrupt(&format!("expected message {gid}, found {found}")));
        }
        Ok(parts)
    }
}

/// Fills as much of `buf` as the file has from `offset` (short only at EOF).
fn read_some_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_roundtrip_and_names() {
        let parts = MessageParts {
            exchange: Bytes::from_static(b"x"),
            routing_key: Bytes::from_static(b"rk"),
            raw_properties: Bytes::from_static(b"\x01\x02"),
            body: Bytes::from_static(b"hello"),
        };
        let mut buf = Vec::new();
        encode_record(&mut buf, 7, &[1, 2], &parts);
        assert_eq!(buf.len(), record_len(2, &parts));
        let (len, crc) = parse_header(buf[..8].try_into().unwrap()).unwrap();
        let payload = Bytes::from(buf[8..].to_vec());
        assert_eq!(len, payload.len());
        assert_eq!(crc32fast::hash(&payload), crc);
        let (gid, p) = parse_parts(&payload).unwrap();
        assert_eq!(gid, 7);
        assert_eq!(p.body, parts.body);
        assert_eq!(p.routing_key, parts.routing_key);
        assert_eq!(p.raw_properties, parts.raw_properties);
        assert_eq!(
            parse_file_name("00000000000000000042.seg"),
            Some((42, "seg"))
        );
        assert_eq!(
            parse_file_name("00000000000000000042.acks"),
            Some((42, "acks"))
        );
        assert_eq!(parse_file_name("42.seg"), None);
        assert_eq!(
            seg_path(Path::new("/d"), 1),
            PathBuf::from("/d/00000000000000000001.seg")
        );
    }

    #[test]
    fn index_out_of_order_and_compaction() {
        let mut ix = SegIndex::default();
        for g in [1u64, 2, 4, 3, 5] {
            ix.insert(g, g as u32 * 10, 1);
        }
        assert_eq!(ix.gids, vec![1, 2, 3, 4, 5]);
        assert_eq!(ix.offset_of(3), Some(30));
        assert!(ix.release(3));
        assert!(!ix.release(3), "duplicate ack is ignored");
        assert_eq!(ix.offset_of(3), None);
        let mut big = SegIndex::default();
        for g in 0..2000u64 {
            big.insert(g, 0, 1);
        }
        for g in 0..1900u64 {
            big.release(g);
        }
        big.maybe_compact();
        assert_eq!(big.len(), 100);
        assert!(big.is_live(1950));
    }
}
