//! Server-side consumer offsets (LavinMQ semantics): for each tracked
//! consumer tag, the last offset it acked. Kept in memory by the stream
//! actor and written to `<stream dir>/offsets` by the writer thread
//! (write to a temporary file, fdatasync, rename), so it survives restarts.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const FILE: &str = "offsets";

/// Stored offsets by consumer tag.
pub type Offsets = BTreeMap<String, u64>;

/// Reads the stored offsets (empty when there are none or the file is
/// unreadable, which is logged).
pub fn load(dir: &Path) -> Offsets {
    match std::fs::read(dir.join(FILE)) {
        Ok(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(dir = %dir.display(), "stored stream consumer offsets are unreadable ({e}); starting without them");
            Offsets::new()
        }),
        Err(_) => Offsets::new(),
    }
}

/// Serialises offsets for [`save`].
pub fn encode(o: &Offsets) -> Vec<u8> {
    serde_json::to_vec(o).unwrap_or_default()
}

/// Replaces the stored offsets atomically.
pub fn save(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = dir.join(format!("{FILE}.tmp"));
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    std::fs::rename(&tmp, dir.join(FILE))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let d = tempfile::tempdir().unwrap();
        assert!(load(d.path()).is_empty());
        let mut o = Offsets::new();
        o.insert("reader-1".into(), 41);
        save(d.path(), &encode(&o)).unwrap();
        assert_eq!(load(d.path()), o);
    }
}
