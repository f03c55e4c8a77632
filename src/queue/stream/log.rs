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
