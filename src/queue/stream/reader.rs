//! Reading a stream: the read-side view of the segments ([`LogView`], owned
//! by the stream actor and kept up to date from the writer's commits), the
//! one place where an offset specification becomes a position
//! ([`resolve`]), and reading the chunk at a consumer's cursor.
//!
//! Readers only ever see committed (fdatasynced) chunks: the view grows
//! when the writer reports a commit, never earlier.

use super::chunk::{ChunkHeader, HEADER_LEN};
use super::segment::{SegmentSummary, read_header};
use super::settings::parse_age;
use amq_protocol::types::AMQPValue;
use bytes::Bytes;
use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// Where a consumer starts, as given in `x-stream-offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The first message still in the stream.
    First,
    /// The start of the last chunk.
    Last,
    /// Only messages published from now on.
    Next,
    /// This offset (clamped to the stream).
    Offset(u64),
    /// N messages before the end.
    FromEnd(u64),
    /// The first chunk written at or after this time (ms since the epoch).
    Timestamp(i64),
}

/// Parses a consumer's `x-stream-offset` argument (absent = "next"), as
/// RabbitMQ: "first", "last", "next", an offset, an AMQP timestamp
/// (seconds), or an interval ("30m", "2h", "7D", "10s") back from `now_ms`.
/// A negative integer -N means N messages before the end (a Warren
/// extension).
pub fn parse_offset_arg(v: Option<&AMQPValue>, now_ms: i64) -> Result<OffsetSpec, String> {
    let Some(v) = v else {
        return Ok(OffsetSpec::Next);
    };
    if let AMQPValue::Timestamp(secs) = v {
        return Ok(OffsetSpec::Timestamp((*secs as i64).saturating_mul(1000)));
    }
    if let Some(i) = crate::broker::headers::value_int(v) {
        return Ok(if i >= 0 {
            OffsetSpec::Offset(i as u64)
        } else {
            OffsetSpec::FromEnd(i.unsigned_abs())
        });
    }
    if let Some(s) = crate::broker::headers::value_str(v) {
        return match s.as_str() {
            "first" => Ok(OffsetSpec::First),
            "last" => Ok(OffsetSpec::Last),
            "next" => Ok(OffsetSpec::Next),
            other => match parse_age(other) {
                Some(ms) => Ok(OffsetSpec::Timestamp(now_ms.saturating_sub(ms as i64))),
                None => Err(format!("invalid x-stream-offset '{other}'")),
            },
        };
    }
    Err(format!(
        "invalid x-stream-offset of type {}",
        crate::queue::args::type_name(v)
    ))
}

/// One segment as readers see it.
#[derive(Debug, Clone)]
pub struct SegView {
    /// Committed extent, index, timestamps.
    pub summary: SegmentSummary,
    /// A read handle (positioned reads only, shared by all consumers).
    pub file: Arc<File>,
}

/// The segments readers may read, oldest first; the last is the active one.
#[derive(Debug, Default, Clone)]
pub struct LogView {
    /// Oldest first.
    pub segments: VecDeque<SegView>,
}

/// A consumer's read position: the next chunk to read and the first offset
/// it still wants from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    /// Base offset of the segment holding the next chunk.
    pub seg: u64,
    /// Position of the next chunk in that segment.
    pub pos: u64,
    /// Messages before this offset are skipped.
    pub from: u64,
}

/// A chunk read from disk, checksum verified.
#[derive(Debug, Clone)]
pub struct ReadChunk {
    /// Its header.
    pub header: ChunkHeader,
    /// Its Bloom filter (empty: no filter values in the chunk).
    pub bloom: Bytes,
    /// Its records.
    pub data: Bytes,
}

/// What [`LogView::read_chunk_if`] found.
#[derive(Debug, Clone)]
pub enum Read {
    /// The chunk, read and verified.
    Chunk(ReadChunk),
    /// Only its header: the caller did not want it.
    Skipped(ChunkHeader),
}

impl LogView {
    /// The first offset still in the stream.
    pub fn first_offset(&self) -> u64 {
        self.segments.front().map_or(0, |s| s.summary.base)
    }

    /// The offset the next published message gets.
    pub fn next_offset(&self) -> u64 {
        self.segments.back().map_or(0, |s| s.summary.end)
    }

    /// Bytes on disk in all segments.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.summary.size).sum()
    }

    fn index_of(&self, base: u64) -> Option<usize> {
        self.segments
            .binary_search_by_key(&base, |s| s.summary.base)
            .ok()
    }

    /// A new segment started by the writer.
    pub fn push_segment(&mut self, base: u64, file: Arc<File>) {
        if self.index_of(base).is_none() {
            self.segments.push_back(SegView {
                summary: SegmentSummary {
                    base,
                    end: base,
                    ..Default::default()
                },
                file,
            });
        }
    }

    /// A committed chunk of segment `seg` at `pos`.
    pub fn add_chunk(&mut self, seg: u64, h: &ChunkHeader, pos: u64) {
        if let Some(i) = self.index_of(seg) {
            self.segments[i].summary.add_chunk(h, pos);
        }
    }

    fn at_end(&self) -> Cursor {
        match self.segments.back() {
            Some(s) => Cursor {
                seg: s.summary.base,
                pos: s.summary.size,
                from: s.summary.end,
            },
            None => Cursor {
                seg: 0,
                pos: 0,
                from: 0,
            },
        }
    }

    fn at_start(&self) -> Cursor {
        let base = self.first_offset();
        Cursor {
            seg: base,
            pos: 0,
            from: base,
        }
    }

    /// First chunk at or after `pos` in segment `i` for which `stop` holds.
    fn scan_until(
        &self,
        i: usize,
        mut pos: u64,
        stop: impl Fn(&ChunkHeader) -> bool,
    ) -> io::Result<Option<(u64, ChunkHeader)>> {
        let s = &self.segments[i];
        while pos < s.summary.size {
            let Some(h) = read_header(&s.file, pos)? else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("no chunk header at {pos} in segment {}", s.summary.base),
                ));
            };
            if stop(&h) {
                return Ok(Some((pos, h)));
            }
            pos += h.total_len();
        }
        Ok(None)
    }

    fn seek_offset(&self, n: u64) -> io::Result<Cursor> {
        let i = self
            .segments
            .partition_point(|s| s.summary.base <= n)
            .saturating_sub(1);
        let Some(s) = self.segments.get(i) else {
            return Ok(self.at_end());
        };
        let k = s.summary.index.partition_point(|e| e.offset <= n);
        let start = k
            .checked_sub(1)
            .and_then(|k| s.summary.index.get(k))
            .map_or(0, |e| e.pos);
        Ok(match self.scan_until(i, start, |h| h.next_offset() > n)? {
            Some((pos, _)) => Cursor {
                seg: s.summary.base,
                pos,
                from: n,
            },
            None => self.at_end(),
        })
    }

    fn seek_time(&self, t: i64) -> io::Result<Cursor> {
        let Some(i) = self
            .segments
            .iter()
            .position(|s| s.summary.last_ts.is_some_and(|l| l >= t))
        else {
            return Ok(self.at_end());
        };
        let s = &self.segments[i];
        let k = s.summary.index.partition_point(|e| e.timestamp_ms < t);
        let start = k
            .checked_sub(1)
            .and_then(|k| s.summary.index.get(k))
            .map_or(0, |e| e.pos);
        Ok(match self.scan_until(i, start, |h| h.timestamp_ms >= t)? {
            Some((pos, h)) => Cursor {
                seg: s.summary.base,
                pos,
                from: h.first,
            },
            None => self.at_end(),
        })
    }

    /// The encoded bytes (header, filter, records, as on disk) of the
    /// chunk at `cur`, with its header, moving `cur` past it; None at the
    /// end. A replicated stream's leader ships these to followers.
    pub fn read_raw(&self, cur: &mut Cursor) -> io::Result<Option<(ChunkHeader, Vec<u8>)>> {
        let Some(Read::Skipped(h)) = self.read_chunk_if(cur, |_| false)? else {
            return Ok(None);
        };
        let Some(i) = self.index_of(cur.seg) else {
            return Ok(None);
        };
        let pos = cur.pos - h.total_len();
        let mut buf = vec![0u8; h.total_len() as usize];
        self.segments[i].file.read_exact_at(&mut buf, pos)?;
        Ok(Some((h, buf)))
    }

    /// The epoch stamped in the chunk ending at `from` (a replicated
    /// stream's consistency check): None when the view starts at `from`,
    /// `u32::MAX` when no chunk ends exactly there.
    pub fn epoch_before(&self, from: u64) -> Option<u32> {
        if from <= self.first_offset() {
            return None;
        }
        let found = (|| -> io::Result<Option<u32>> {
            let mut cur = self.seek_offset(from - 1)?;
            let Some(Read::Skipped(h)) = self.read_chunk_if(&mut cur, |_| false)? else {
                return Ok(None);
            };
            if h.next_offset() != from {
                return Ok(None);
            }
            let Some(i) = self.index_of(cur.seg) else {
                return Ok(None);
            };
            let mut b = [0u8; HEADER_LEN];
            self.segments[i]
                .file
                .read_exact_at(&mut b, cur.pos - h.total_len())?;
            Ok(Some(super::chunk::epoch_of(&b)))
        })();
        Some(found.ok().flatten().unwrap_or(u32::MAX))
    }

    /// The part of this view up to offset `to` (a chunk boundary): what a
    /// replica may serve when `to` is its committed offset. Reads chunk
    /// headers of the segment `to` falls in, from its nearest index entry.
    pub fn limited(&self, to: u64) -> io::Result<LogView> {
        let mut out = LogView::default();
        for s in &self.segments {
            if s.summary.base > to && !out.segments.is_empty() {
                break;
            }
            if s.summary.end <= to {
                out.segments.push_back(s.clone());
                continue;
            }
            let summary = super::segment::scan_upto(&s.file, &s.summary, to)?;
            out.segments.push_back(SegView {
                summary,
                file: s.file.clone(),
            });
            break;
        }
        Ok(out)
    }

    /// Reads the chunk at `cur` and moves `cur` past it; None when the
    /// reader is at the end of what is committed. A cursor in a segment
    /// that retention deleted moves to the new first message.
    pub fn read_chunk(&self, cur: &mut Cursor) -> io::Result<Option<ReadChunk>> {
        Ok(match self.read_chunk_if(cur, |_| true)? {
            Some(Read::Chunk(c)) => Some(c),
            _ => None,
        })
    }

    /// Like [`read_chunk`](Self::read_chunk), but reads only the header
    /// when `want` says the chunk is not needed (already cached, or all
    /// before the cursor's offset), returning it as skipped.
    pub fn read_chunk_if(
        &self,
        cur: &mut Cursor,
        want: impl Fn(&ChunkHeader) -> bool,
    ) -> io::Result<Option<Read>> {
        loop {
            let Some(i) = self.index_of(cur.seg) else {
                let first = self.first_offset();
                if cur.seg < first || self.segments.is_empty() {
                    if self.segments.is_empty() {
                        return Ok(None);
                    }
                    *cur = Cursor {
                        seg: first,
                        pos: 0,
                        from: cur.from.max(first),
                    };
                    continue;
                }
                // Not a segment base: re-resolve the offset.
                *cur = self.seek_offset(cur.from)?;
                if self.index_of(cur.seg).is_none() {
                    return Ok(None);
                }
                continue;
            };
            let s = &self.segments[i];
            if cur.pos >= s.summary.size {
                match self.segments.get(i + 1) {
                    Some(n) => {
                        *cur = Cursor {
                            seg: n.summary.base,
                            pos: 0,
                            from: cur.from,
                        };
                        continue;
                    }
                    _ => return Ok(None),
                }
            }
            let Some(h) = read_header(&s.file, cur.pos)? else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "no chunk header at {} in segment {}",
                        cur.pos, s.summary.base
                    ),
                ));
            };
            if !want(&h) {
                cur.pos += h.total_len();
                return Ok(Some(Read::Skipped(h)));
            }
            let mut rest = vec![0u8; (h.total_len() - HEADER_LEN as u64) as usize];
            s.file
                .read_exact_at(&mut rest, cur.pos + HEADER_LEN as u64)?;
            if !h.verify(&rest) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "chunk at offset {} (segment {}, position {}) fails its CRC",
                        h.first, s.summary.base, cur.pos
                    ),
                ));
            }
            cur.pos += h.total_len();
            let rest = Bytes::from(rest);
            let bloom = rest.slice(..h.bloom_len as usize);
            let data = rest.slice(h.bloom_len as usize..);
            return Ok(Some(Read::Chunk(ReadChunk {
                header: h,
                bloom,
                data,
            })));
        }
    }
}

/// Turns an offset specification into a read position. The one place
/// where "first", "last", "next", offsets and timestamps are interpreted.
pub fn resolve(view: &LogView, spec: OffsetSpec) -> io::Result<Cursor> {
    let (first, next) = (view.first_offset(), view.next_offset());
    match spec {
        OffsetSpec::First => Ok(view.at_start()),
        OffsetSpec::Next => Ok(view.at_end()),
        OffsetSpec::Last => Ok(view
            .segments
            .iter()
            .rev()
            .find_map(|s| {
                s.summary.last_chunk.map(|(off, pos)| Cursor {
                    seg: s.summary.base,
                    pos,
                    from: off,
                })
            })
            .unwrap_or_else(|| view.at_end())),
        OffsetSpec::Offset(n) if n >= next => Ok(view.at_end()),
        OffsetSpec::Offset(n) if n <= first => Ok(view.at_start()),
        OffsetSpec::Offset(n) => view.seek_offset(n),
        OffsetSpec::FromEnd(k) => resolve(view, OffsetSpec::Offset(next.saturating_sub(k))),
        OffsetSpec::Timestamp(t) => view.seek_time(t),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream::chunk::{encode, tests::msg};
    use crate::queue::stream::segment::ActiveSegment;

    /// Three segments of chunks of 3 messages each: offsets 0..27, chunk
    /// k written at time 1000 + 10 k.
    fn view() -> (tempfile::TempDir, LogView) {
        let dir = tempfile::tempdir().unwrap();
        let mut v = LogView::default();
        let mut next = 0u64;
        for _seg in 0..3 {
            let mut a = ActiveSegment::create(dir.path(), next).unwrap();
            v.push_segment(
                next,
                Arc::new(File::open(super::super::segment::log_path(dir.path(), next)).unwrap()),
            );
            for _ in 0..3 {
                let msgs: Vec<_> = (0..3)
                    .map(|i| msg(format!("m{}", next + i).as_bytes(), None))
                    .collect();
                let mut out = Vec::new();
                let h = encode(next, 1000 + 10 * (next as i64 / 3), &msgs, 16, &mut out);
                let pos = a.summary.size;
                a.append(&h, &out).unwrap();
                v.add_chunk(a.base(), &h, pos);
                next = h.next_offset();
            }
            a.sync().unwrap();
        }
        (dir, v)
    }

    fn offsets(v: &LogView, mut c: Cursor) -> Vec<u64> {
        let mut out = vec![];
        while let Some(ch) = v.read_chunk(&mut c).unwrap() {
            out.extend((ch.header.first..ch.header.next_offset()).filter(|o| *o >= c.from));
        }
        out
    }

    #[test]
    fn every_spec() {
        let (_d, v) = view();
        assert_eq!((v.first_offset(), v.next_offset()), (0, 27));
        let at = |s| offsets(&v, resolve(&v, s).unwrap());
        assert_eq!(at(OffsetSpec::First), (0..27).collect::<Vec<_>>());
        assert_eq!(at(OffsetSpec::Last), vec![24, 25, 26]);
        assert_eq!(at(OffsetSpec::Next), Vec::<u64>::new());
        assert_eq!(at(OffsetSpec::Offset(10)), (10..27).collect::<Vec<_>>());
        assert_eq!(at(OffsetSpec::Offset(9)), (9..27).collect::<Vec<_>>());
        assert_eq!(at(OffsetSpec::Offset(500)), Vec::<u64>::new());
        assert_eq!(at(OffsetSpec::FromEnd(4)), vec![23, 24, 25, 26]);
        assert_eq!(at(OffsetSpec::FromEnd(400)), (0..27).collect::<Vec<_>>());
        // Chunk 5 (offsets 15..18) was written at 1050.
        assert_eq!(
            at(OffsetSpec::Timestamp(1045)),
            (15..27).collect::<Vec<_>>()
        );
        assert_eq!(
            at(OffsetSpec::Timestamp(1050)),
            (15..27).collect::<Vec<_>>()
        );
        assert_eq!(at(OffsetSpec::Timestamp(0)), (0..27).collect::<Vec<_>>());
        assert_eq!(at(OffsetSpec::Timestamp(99_999)), Vec::<u64>::new());
        // Retention removed the first segment: a cursor there moves on.
        let mut v = v;
        let c = resolve(&v, OffsetSpec::First).unwrap();
        v.segments.pop_front();
        assert_eq!(offsets(&v, c), (9..27).collect::<Vec<_>>());
    }

    #[test]
    fn parse_specs() {
        let s = |v: AMQPValue| parse_offset_arg(Some(&v), 1_000_000);
        assert_eq!(parse_offset_arg(None, 0), Ok(OffsetSpec::Next));
        assert_eq!(
            s(AMQPValue::LongString("first".into())),
            Ok(OffsetSpec::First)
        );
        assert_eq!(
            s(AMQPValue::LongString("last".into())),
            Ok(OffsetSpec::Last)
        );
        assert_eq!(
            s(AMQPValue::LongString("next".into())),
            Ok(OffsetSpec::Next)
        );
        assert_eq!(s(AMQPValue::LongLongInt(15)), Ok(OffsetSpec::Offset(15)));
        assert_eq!(s(AMQPValue::LongInt(-3)), Ok(OffsetSpec::FromEnd(3)));
        assert_eq!(s(AMQPValue::Timestamp(5)), Ok(OffsetSpec::Timestamp(5000)));
        assert_eq!(
            s(AMQPValue::LongString("10s".into())),
            Ok(OffsetSpec::Timestamp(990_000))
        );
        assert!(s(AMQPValue::LongString("soon".into())).is_err());
        assert!(s(AMQPValue::Boolean(true)).is_err());
    }
}
