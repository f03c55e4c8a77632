//! Opening a stream's directory: finds the segments, summarises the sealed
//! ones from their indexes, recovers the last one (CRC scan, torn tail
//! truncated) and hands the active segment to the writer and a
//! [`LogView`] to the actor.

use super::reader::{LogView, SegView};
use super::segment::{ActiveSegment, SealedSegment, log_path};
use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// The segment base offsets in `dir`, ascending.
pub fn segment_bases(dir: &Path) -> io::Result<Vec<u64>> {
    let mut bases = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(stem) = name.strip_suffix(".log")
            && stem.len() == 20
            && let Ok(b) = stem.parse::<u64>()
        {
            bases.push(b);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

/// Opens (or creates) the log in `dir`.
pub fn open(dir: &Path) -> io::Result<(ActiveSegment, LogView)> {
    std::fs::create_dir_all(dir)?;
    let bases = segment_bases(dir)?;
    let mut view = LogView::default();
    let Some((&last, sealed)) = bases.split_last() else {
        let active = ActiveSegment::create(dir, 0)?;
        view.push_segment(0, Arc::new(File::open(log_path(dir, 0))?));
        return Ok((active, view));
    };
    for &b in sealed {
        let s = SealedSegment::open(dir, b)?;
        if let Some(prev) = view.segments.back()
            && prev.summary.end != b
        {
            tracing::warn!(dir = %dir.display(), expected = prev.summary.end, found = b, "stream segments are not contiguous");
        }
        view.segments.push_back(SegView {
            summary: s.summary,
            file: Arc::new(File::open(log_path(dir, b))?),
        });
    }
    let active = ActiveSegment::recover(dir, last)?;
    view.segments.push_back(SegView {
        summary: active.summary.clone(),
        file: Arc::new(File::open(log_path(dir, last))?),
    });
    Ok((active, view))
}

/// Cuts the log in `dir` back to offset `to` (a chunk boundary): segments
/// starting after it are deleted, the one it falls in is truncated there
/// and becomes the active segment (an empty one at `to` when nothing is
/// left). Only a replica's never-committed chunks are ever cut.
pub fn truncate(dir: &Path, to: u64) -> io::Result<ActiveSegment> {
    let bases = segment_bases(dir)?;
    let (keep, drop): (Vec<u64>, Vec<u64>) = bases.iter().partition(|b| **b <= to);
    super::retention::remove_segments(dir, &drop);
    let Some(&last) = keep.last() else {
        return ActiveSegment::create(dir, to);
    };
    let mut active = ActiveSegment::recover(dir, last)?;
    if active.summary.end > to {
        let file = File::open(log_path(dir, last))?;
        let cut = super::segment::scan_upto(&file, &active.summary, to)?;
        active.truncate(&cut)?;
        active.sync()?;
    }
    Ok(active)
}

/// A replica's last known committed offset (0 when never written).
pub fn read_commit(dir: &Path) -> u64 {
    std::fs::read(dir.join(super::writer::COMMIT_FILE))
        .ok()
        .and_then(|b| {
            b.get(..8)
                .map(|b| u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]))
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream::chunk::{encode, tests::msg};
    use crate::queue::stream::reader::{OffsetSpec, resolve};

    /// Two segments of 3-message chunks: 0..30 in the first, 30..45 in the
    /// second.
    fn log(dir: &Path) -> LogView {
        let mut next = 0u64;
        for (base, chunks) in [(0u64, 10), (30, 5)] {
            let mut a = ActiveSegment::create(dir, base).unwrap();
            for _ in 0..chunks {
                let msgs: Vec<_> = (0..3)
                    .map(|i| msg(format!("m{}", next + i).as_bytes(), None))
                    .collect();
                let mut out = Vec::new();
                let h = encode(next, 1000, &msgs, 16, &mut out);
                a.append(&h, &out).unwrap();
                next = h.next_offset();
            }
            if base == 0 {
                a.seal().unwrap();
            } else {
                a.sync().unwrap();
            }
        }
        open(dir).unwrap().1
    }

    fn offsets(v: &LogView) -> Vec<u64> {
        let mut c = resolve(v, OffsetSpec::First).unwrap();
        let mut out = vec![];
        while let Some(ch) = v.read_chunk(&mut c).unwrap() {
            out.extend(ch.header.first..ch.header.next_offset());
        }
        out
    }

    #[test]
    fn limited_views_and_truncation_cut_at_chunk_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let v = log(dir.path());
        assert_eq!(offsets(&v), (0..45).collect::<Vec<_>>());
        // A committed view inside the first segment, at its end, and in
        // the second.
        for to in [12u64, 30, 39, 45] {
            let l = v.limited(to).unwrap();
            assert_eq!(l.next_offset(), to);
            assert_eq!(offsets(&l), (0..to).collect::<Vec<_>>(), "limited to {to}");
        }
        // Truncating into the sealed segment removes the second one and
        // reopens the first as the active segment.
        let a = truncate(dir.path(), 21).unwrap();
        assert_eq!((a.base(), a.summary.end), (0, 21));
        assert_eq!(segment_bases(dir.path()).unwrap(), vec![0]);
        drop(a);
        let (a, v) = open(dir.path()).unwrap();
        assert_eq!(a.summary.end, 21);
        assert_eq!(offsets(&v), (0..21).collect::<Vec<_>>());
        drop(a);
        // Truncating to nothing leaves an empty log at that offset.
        let a = truncate(dir.path(), 0).unwrap();
        assert_eq!((a.base(), a.summary.end, a.summary.size), (0, 0, 0));
    }
}
