//! Retention: `x-max-length-bytes` and `x-max-age` delete whole old
//! segments, never the active one. The stream actor plans it from its
//! view (no I/O) on a timer and whenever a segment is sealed, drops the
//! segments from the view first, and removes the files on a blocking
//! thread: appends never wait for it.

use super::reader::LogView;
use super::segment::{index_path, log_path};
use super::settings::StreamSettings;
use std::path::Path;

/// How many of the oldest segments retention deletes now.
pub fn plan(view: &LogView, s: &StreamSettings, now_ms: i64) -> usize {
    let n = view.segments.len();
    let mut total = view.bytes();
    let mut k = 0;
    while k + 1 < n {
        let seg = &view.segments[k].summary;
        let by_size = s.max_length_bytes.is_some_and(|m| total > m);
        let by_age = s.max_age_ms.is_some_and(|a| {
            seg.last_ts
                .is_some_and(|t| t < now_ms.saturating_sub(a as i64))
        });
        if !(by_size || by_age) {
            break;
        }
        total -= seg.size;
        k += 1;
    }
    k
}

/// Deletes the files of segments already dropped from the view.
pub fn remove_segments(dir: &Path, bases: &[u64]) {
    for &b in bases {
        for p in [log_path(dir, b), index_path(dir, b)] {
            if let Err(e) = std::fs::remove_file(&p)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %p.display(), "could not delete a stream segment past its retention: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::stream::reader::SegView;
    use crate::queue::stream::segment::SegmentSummary;
    use std::sync::Arc;

    fn view(segs: &[(u64, i64)]) -> (tempfile::NamedTempFile, LogView) {
        let f = tempfile::NamedTempFile::new().unwrap();
        let mut v = LogView::default();
        for (i, (size, ts)) in segs.iter().enumerate() {
            v.segments.push_back(SegView {
                summary: SegmentSummary {
                    base: i as u64 * 10,
                    size: *size,
                    end: i as u64 * 10 + 10,
                    last_ts: Some(*ts),
                    ..Default::default()
                },
                file: Arc::new(f.reopen().unwrap()),
            });
        }
        (f, v)
    }

    #[test]
    fn by_size_and_age_never_the_active_segment() {
        let (_f, v) = view(&[(100, 1), (100, 2), (100, 3)]);
        let s = |b: Option<u64>, a: Option<u64>| StreamSettings {
            max_length_bytes: b,
            max_age_ms: a,
            ..Default::default()
        };
        assert_eq!(plan(&v, &s(None, None), 10), 0);
        assert_eq!(plan(&v, &s(Some(250), None), 10), 1);
        assert_eq!(plan(&v, &s(Some(0), None), 10), 2);
        assert_eq!(plan(&v, &s(None, Some(8)), 10), 1);
        assert_eq!(plan(&v, &s(None, Some(1)), 1000), 2);
    }
}
