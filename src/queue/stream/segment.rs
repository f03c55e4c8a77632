//! Segment files: `<base offset, 20 digits>.log` holds chunks back to back;
//! `.index` holds a sparse index, one 24-byte entry (offset u64, timestamp
//! i64, position u64, big-endian) at most every [`INDEX_INTERVAL`] bytes of
//! log, plus one for the last chunk once the segment is sealed.
//!
//! [`ActiveSegment`] is the one being appended to (owned by the writer
//! thread); [`SealedSegment`] is a full one, immutable until retention
//! deletes it. Opening the active segment validates every chunk's CRC and
//! truncates a torn tail: what was confirmed was fdatasynced, so it is
//! before the tear.

use super::chunk::{ChunkHeader, HEADER_LEN};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// Bytes of log between two index entries, at least.
pub const INDEX_INTERVAL: u64 = 4096;
/// Bytes of one index entry.
pub const INDEX_ENTRY_LEN: usize = 24;

/// One sparse-index entry: where the chunk starting at `offset` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// First offset of the chunk.
    pub offset: u64,
    /// Its timestamp.
    pub timestamp_ms: i64,
    /// Its position in the log file.
    pub pos: u64,
}

impl IndexEntry {
    fn to_bytes(self) -> [u8; INDEX_ENTRY_LEN] {
        let mut b = [0u8; INDEX_ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_be_bytes());
        b[8..16].copy_from_slice(&self.timestamp_ms.to_be_bytes());
        b[16..24].copy_from_slice(&self.pos.to_be_bytes());
        b
    }

    fn from_bytes(b: &[u8]) -> Option<IndexEntry> {
        Some(IndexEntry {
            offset: u64::from_be_bytes(b.get(0..8)?.try_into().ok()?),
            timestamp_ms: i64::from_be_bytes(b.get(8..16)?.try_into().ok()?),
            pos: u64::from_be_bytes(b.get(16..24)?.try_into().ok()?),
        })
    }
}

/// `<dir>/<base:020>.log`.
pub fn log_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.log"))
}

/// `<dir>/<base:020>.index`.
pub fn index_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{base:020}.index"))
}

/// What a reader needs to know about a segment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SegmentSummary {
    /// First offset (from the file name).
    pub base: u64,
    /// Valid bytes.
    pub size: u64,
    /// Offset after the last message.
    pub end: u64,
    /// Timestamp of the first chunk.
    pub first_ts: Option<i64>,
    /// Timestamp of the last chunk.
    pub last_ts: Option<i64>,
    /// First offset and position of the last chunk.
    pub last_chunk: Option<(u64, u64)>,
    /// The sparse index.
    pub index: Vec<IndexEntry>,
}

impl SegmentSummary {
    fn empty(base: u64) -> Self {
        SegmentSummary {
            base,
            end: base,
            ..Default::default()
        }
    }

    /// Accounts for a chunk written at `pos`; returns the index entry it
    /// got, if any.
    pub fn add_chunk(&mut self, h: &ChunkHeader, pos: u64) -> Option<IndexEntry> {
        self.size = pos + h.total_len();
        self.end = h.next_offset();
        self.first_ts.get_or_insert(h.timestamp_ms);
        self.last_ts = Some(h.timestamp_ms);
        self.last_chunk = Some((h.first, pos));
        let due = self
            .index
            .last()
            .is_none_or(|e| pos >= e.pos + INDEX_INTERVAL);
        due.then(|| {
            let e = IndexEntry {
                offset: h.first,
                timestamp_ms: h.timestamp_ms,
                pos,
            };
            self.index.push(e);
            e
        })
    }
}

/// Reads the chunk header at `pos`, or None at end of file or on garbage.
pub fn read_header(file: &File, pos: u64) -> io::Result<Option<ChunkHeader>> {
    let mut b = [0u8; HEADER_LEN];
    match file.read_exact_at(&mut b, pos) {
        Ok(()) => Ok(ChunkHeader::parse(&b)),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(e),
    }
}

/// Scans a segment chunk by chunk from the start. With `verify`, every
/// chunk's CRC is checked; the scan stops at the first chunk that is
/// incomplete, corrupt or not contiguous in offsets.
pub fn scan(file: &File, base: u64, verify: bool) -> io::Result<SegmentSummary> {
    let len = file.metadata()?.len();
    let mut s = SegmentSummary::empty(base);
    let mut pos = 0u64;
    let mut buf = Vec::new();
    while pos + HEADER_LEN as u64 <= len {
        let Some(h) = read_header(file, pos)? else {
            break;
        };
        if h.first != s.end || pos + h.total_len() > len {
            break;
        }
        if verify {
            buf.resize((h.total_len() - HEADER_LEN as u64) as usize, 0);
            file.read_exact_at(&mut buf, pos + HEADER_LEN as u64)?;
            if !h.verify(&buf) {
                break;
            }
        }
        s.add_chunk(&h, pos);
        pos += h.total_len();
    }
    Ok(s)
}

/// `s` cut back to the chunks that end at or before offset `to`: headers
/// are read from the last sparse-index entry before `to` on.
pub fn scan_upto(file: &File, s: &SegmentSummary, to: u64) -> io::Result<SegmentSummary> {
    let k = s.index.partition_point(|e| e.offset <= to);
    let start = k.checked_sub(1).and_then(|k| s.index.get(k)).copied();
    let mut out = SegmentSummary {
        base: s.base,
        size: start.map_or(0, |e| e.pos),
        end: start.map_or(s.base, |e| e.offset),
        first_ts: None,
        last_ts: None,
        last_chunk: None,
        index: s.index[..k.saturating_sub(1)].to_vec(),
    };
    let len = file.metadata()?.len();
    let mut pos = out.size;
    while pos + HEADER_LEN as u64 <= len {
        let Some(h) = read_header(file, pos)? else {
            break;
        };
        if h.first != out.end || h.next_offset() > to || pos + h.total_len() > len {
            break;
        }
        out.add_chunk(&h, pos);
        pos += h.total_len();
    }
    if out.size > 0 {
        out.first_ts = s.first_ts.or(out.first_ts);
    }
    Ok(out)
}

fn write_index(dir: &Path, base: u64, index: &[IndexEntry], sync: bool) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(index.len() * INDEX_ENTRY_LEN);
    for e in index {
        bytes.extend_from_slice(&e.to_bytes());
    }
    let f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(index_path(dir, base))?;
    f.write_all_at(&bytes, 0)?;
    if sync {
        f.sync_data()?;
    }
    Ok(())
}

/// A full segment: summarised from its index file (one header read),
/// falling back to a header scan when the index is missing or stale.
#[derive(Debug)]
pub struct SealedSegment {
    /// What readers need.
    pub summary: SegmentSummary,
}

impl SealedSegment {
    /// Opens a sealed segment.
    pub fn open(dir: &Path, base: u64) -> io::Result<SealedSegment> {
        let file = File::open(log_path(dir, base))?;
        let len = file.metadata()?.len();
        if let Some(s) = Self::from_index(dir, base, &file, len)? {
            return Ok(SealedSegment { summary: s });
        }
        tracing::warn!(base, dir = %dir.display(), "stream segment index missing or stale; rebuilding it");
        let s = scan(&file, base, false)?;
        write_index(dir, base, &with_last(&s), true)?;
        Ok(SealedSegment { summary: s })
    }

    fn from_index(
        dir: &Path,
        base: u64,
        file: &File,
        len: u64,
    ) -> io::Result<Option<SegmentSummary>> {
        let Ok(bytes) = std::fs::read(index_path(dir, base)) else {
            return Ok(None);
        };
        if bytes.is_empty() || bytes.len() % INDEX_ENTRY_LEN != 0 {
            return Ok(None);
        }
        let index: Vec<IndexEntry> = bytes
            .chunks(INDEX_ENTRY_LEN)
            .filter_map(IndexEntry::from_bytes)
            .collect();
        let (Some(first), Some(last)) = (index.first().copied(), index.last().copied()) else {
            return Ok(None);
        };
        if first.pos != 0 || first.offset != base {
            return Ok(None);
        }
        let Some(h) = read_header(file, last.pos)? else {
            return Ok(None);
        };
        if h.first != last.offset || last.pos + h.total_len() != len {
            return Ok(None);
        }
        // The sealing entry for the last chunk is not part of the sparse
        // index proper; keep it (it only makes seeks cheaper).
        Ok(Some(SegmentSummary {
            base,
            size: len,
            end: h.next_offset(),
            first_ts: Some(first.timestamp_ms),
            last_ts: Some(h.timestamp_ms),
            last_chunk: Some((h.first, last.pos)),
            index,
        }))
    }
}

/// The index plus an entry for the last chunk (what a sealed index holds).
fn with_last(s: &SegmentSummary) -> Vec<IndexEntry> {
    let mut index = s.index.clone();
    if let (Some((off, pos)), Some(ts)) = (s.last_chunk, s.last_ts)
        && index.last().is_none_or(|e| e.pos != pos)
    {
        index.push(IndexEntry {
            offset: off,
            timestamp_ms: ts,
            pos,
        });
    }
    index
}

/// The segment being appended to. Owned by the writer thread.
#[derive(Debug)]
pub struct ActiveSegment {
    dir: PathBuf,
    log: File,
    /// What has been written to it (and, after [`ActiveSegment::sync`], is
    /// durable).
    pub summary: SegmentSummary,
    unsynced_index: usize,
}

impl ActiveSegment {
    /// Starts a new, empty segment whose first offset is `base`.
    pub fn create(dir: &Path, base: u64) -> io::Result<ActiveSegment> {
        let log = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(log_path(dir, base))?;
        write_index(dir, base, &[], false)?;
        File::open(dir)?.sync_all()?;
        Ok(ActiveSegment {
            dir: dir.to_path_buf(),
            log,
            summary: SegmentSummary::empty(base),
            unsynced_index: 0,
        })
    }

    /// Reopens the last segment after a restart or crash: validates every
    /// chunk, truncates whatever follows the last valid one, rewrites the
    /// index.
    pub fn recover(dir: &Path, base: u64) -> io::Result<ActiveSegment> {
        let log = OpenOptions::new()
            .read(true)
            .write(true)
            .open(log_path(dir, base))?;
        let len = log.metadata()?.len();
        let summary = scan(&log, base, true)?;
        if summary.size < len {
            tracing::warn!(
                base,
                dir = %dir.display(),
                valid = summary.size,
                len,
                "stream segment has a torn or corrupt tail (unconfirmed writes); truncating it"
            );
            log.set_len(summary.size)?;
            log.sync_all()?;
        }
        write_index(dir, base, &summary.index, false)?;
        Ok(ActiveSegment {
            dir: dir.to_path_buf(),
            log,
            unsynced_index: summary.index.len(),
            summary,
        })
    }

    /// First offset of this segment.
    pub fn base(&self) -> u64 {
        self.summary.base
    }

    /// Writes one encoded chunk at the end. Not durable until [`sync`](Self::sync).
    pub fn append(&mut self, h: &ChunkHeader, bytes: &[u8]) -> io::Result<Option<IndexEntry>> {
        let pos = self.summary.size;
        self.log.write_all_at(bytes, pos)?;
        Ok(self.summary.add_chunk(h, pos))
    }

    /// Makes everything appended durable (one fdatasync). The index is
    /// written but not synced: it is rebuilt from the log on recovery.
    pub fn sync(&mut self) -> io::Result<()> {
        self.log.sync_data()?;
        if self.unsynced_index < self.summary.index.len() {
            let f = OpenOptions::new()
                .append(true)
                .create(true)
                .open(index_path(&self.dir, self.base()))?;
            let mut bytes = Vec::new();
            for e in &self.summary.index[self.unsynced_index..] {
                bytes.extend_from_slice(&e.to_bytes());
            }
            use std::io::Write;
            (&f).write_all(&bytes)?;
            self.unsynced_index = self.summary.index.len();
        }
        Ok(())
    }

    /// Undoes appends after a failed write or sync: back to `size` bytes.
    pub fn truncate(&mut self, to: &SegmentSummary) -> io::Result<()> {
        self.log.set_len(to.size)?;
        self.summary = to.clone();
        self.unsynced_index = self.unsynced_index.min(self.summary.index.len());
        write_index(&self.dir, self.base(), &self.summary.index, false)
    }

    /// Seals the segment: durable log, index with the last chunk, synced.
    pub fn seal(self) -> io::Result<SealedSegment> {
        self.log.sync_data()?;
        write_index(&self.dir, self.base(), &with_last(&self.summary), true)?;
        Ok(SealedSegment {
            summary: self.summary,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream::chunk::{encode, tests::msg};

    fn chunk(first: u64, n: usize, ts: i64) -> (ChunkHeader, Vec<u8>) {
        let msgs: Vec<_> = (0..n)
            .map(|i| msg(format!("m{}", first + i as u64).as_bytes(), None))
            .collect();
        let mut out = Vec::new();
        let h = encode(first, ts, &msgs, 16, &mut out);
        (h, out)
    }

    #[test]
    fn names_are_twenty_digits() {
        let d = Path::new("/x");
        assert_eq!(log_path(d, 20), Path::new("/x/00000000000000000020.log"));
        assert_eq!(index_path(d, 0), Path::new("/x/00000000000000000000.index"));
    }

    #[test]
    fn torn_tail_is_truncated_and_sealed_reopens_from_index() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = ActiveSegment::create(dir.path(), 0).unwrap();
        let mut next = 0;
        for i in 0..50 {
            let (h, b) = chunk(next, 1 + i % 7, 1000 + i as i64);
            a.append(&h, &b).unwrap();
            next = h.next_offset();
        }
        a.sync().unwrap();
        let good = a.summary.clone();
        // Half a chunk more, as if killed mid-write.
        let (_, b) = chunk(next, 5, 2000);
        a.log.write_all_at(&b[..b.len() / 2], good.size).unwrap();
        drop(a);
        let a = ActiveSegment::recover(dir.path(), 0).unwrap();
        assert_eq!(a.summary, good);
        assert_eq!(
            std::fs::metadata(log_path(dir.path(), 0)).unwrap().len(),
            good.size
        );
        let s = a.seal().unwrap();
        assert_eq!(s.summary.end, next);
        let again = SealedSegment::open(dir.path(), 0).unwrap();
        assert_eq!(again.summary.end, next);
        assert_eq!(again.summary.size, good.size);
        assert_eq!(again.summary.last_ts, good.last_ts);
        assert_eq!(again.summary.last_chunk, good.last_chunk);
        // A deleted index is rebuilt by a scan.
        std::fs::remove_file(index_path(dir.path(), 0)).unwrap();
        let rebuilt = SealedSegment::open(dir.path(), 0).unwrap();
        assert_eq!(rebuilt.summary.end, next);
    }
}
