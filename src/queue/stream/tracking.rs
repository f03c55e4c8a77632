//! Server-side consumer offsets (LavinMQ semantics): for each tracked
//! consumer tag, the last offset it acked; and for each consumer group
//! reading this stream (see `group.rs`), its committed position: the first
//! offset the group has not settled. Kept in memory by the stream actor and
//! written to `<stream dir>/offsets` by the writer thread (write to a
//! temporary file, fdatasync, rename), so they survive restarts.
//!
//! The file is JSON: `{"consumers": {tag: offset}, "groups": {name:
//! position}}`; a plain `{tag: offset}` map (the format before groups) is
//! still read.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

const FILE: &str = "offsets";

/// Stored offsets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offsets {
    /// Last acked offset by tracked consumer tag.
    #[serde(default)]
    pub consumers: BTreeMap<String, u64>,
    /// Committed position (next offset to read) by consumer group.
    #[serde(default)]
    pub groups: BTreeMap<String, u64>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Stored {
    Current(Offsets),
    ConsumersOnly(BTreeMap<String, u64>),
}

/// Reads the stored offsets (empty when there are none or the file is
/// unreadable, which is logged).
pub fn load(dir: &Path) -> Offsets {
    match std::fs::read(dir.join(FILE)) {
        Ok(b) => match serde_json::from_slice::<Stored>(&b) {
            Ok(Stored::Current(o)) => o,
            Ok(Stored::ConsumersOnly(consumers)) => Offsets {
                consumers,
                ..Default::default()
            },
            Err(e) => {
                tracing::warn!(dir = %dir.display(), "stored stream consumer offsets are unreadable ({e}); starting without them");
                Offsets::default()
            }
        },
        Err(_) => Offsets::default(),
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
        assert_eq!(load(d.path()), Offsets::default());
        let mut o = Offsets::default();
        o.consumers.insert("reader-1".into(), 41);
        o.groups.insert("billing".into(), 7);
        save(d.path(), &encode(&o)).unwrap();
        assert_eq!(load(d.path()), o);
        // The format before groups: a plain map of consumer offsets.
        save(d.path(), br#"{"reader-1": 41, "groups": 3}"#).unwrap();
        let old = load(d.path());
        assert_eq!(old.consumers.get("reader-1"), Some(&41));
        assert_eq!(old.consumers.get("groups"), Some(&3));
        assert!(old.groups.is_empty());
    }
}
