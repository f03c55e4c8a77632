//! Stream queues (`x-queue-type: stream`): an append-only log that
//! consumers read from their own positions, as RabbitMQ streams over AMQP
//! 0-9-1, plus server-side offset tracking and filtering.
//!
//! | file | owns |
//! |---|---|
//! | `settings.rs` | stream declare arguments (retention, segment size, filter size) |
//! | `chunk.rs` | the chunk format: header, CRC32, Bloom filter, records |
//! | `segment.rs` | segment files and the sparse index; `ActiveSegment` / `SealedSegment`; torn-tail truncation |
//! | `log.rs` | opening a stream directory |
//! | `writer.rs` | the writer thread: group commit, one fdatasync per batch, then confirms |
//! | `reader.rs` | the read view, offset specifications (`resolve`), reading chunks |
//! | `retention.rs` | deleting whole old segments by size and age |
//! | `tracking.rs` | server-side consumer offsets |
//! | `filter.rs` | Bloom filters and consumer filter specs |
//! | `group.rs` | consumer groups (`x-stream-group`): the coordinator and the partition assignment |
//! | `actor.rs` | the stream actor: the `QueueCmd` interface, consumers, credit, deliveries; replication roles (leader ships, follower appends) |
//! | `replica.rs` | cluster mode: declare/delete through the metadata group, replicas on member nodes, forwarding handles elsewhere, failover |
//!
//! Files live in `<data_dir>/streams/<vhost>/<queue>/` (names escaped).
//! Tasks: one actor task per stream (never blocks in fsync), one writer OS
//! thread per stream. The actor reads chunks with positioned reads; the
//! writer alone writes.

pub mod actor;
pub mod chunk;
pub mod filter;
pub mod group;
pub mod log;
pub mod reader;
pub mod replica;
pub mod retention;
pub mod segment;
pub mod settings;
pub mod tracking;
pub mod writer;

#[cfg(test)]
mod model_tests;

pub use actor::{StreamInit, spawn};

use crate::protocol::error::AmqpError;
use std::path::{Path, PathBuf};

/// Escapes a vhost or queue name into one safe path component: bytes
/// other than ASCII letters, digits, `-`, `_` and `.` become `%XX`
/// (and a leading `.` too, so "." and ".." cannot escape).
pub fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for (i, b) in name.bytes().enumerate() {
        let keep = b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0);
        if keep {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    if out.is_empty() {
        out.push('%');
    }
    out
}

/// RabbitMQ's declare checks for a new stream (`rabbit_queue_type_util`):
/// streams are durable, not exclusive, not auto-delete.
pub fn check_declare(
    name: &str,
    vhost: &str,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
) -> Result<(), AmqpError> {
    let bad = if auto_delete {
        "auto-delete"
    } else if exclusive {
        "exclusive-owner"
    } else if !durable {
        "non-durable"
    } else {
        return Ok(());
    };
    Err(AmqpError::precondition(format!(
        "invalid property '{bad}' for queue '{name}' in vhost '{vhost}'"
    )))
}

/// The directory of a stream.
pub fn stream_dir(data_dir: &Path, vhost: &str, queue: &str) -> PathBuf {
    data_dir
        .join("streams")
        .join(escape(vhost))
        .join(escape(queue))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping() {
        assert_eq!(escape("/"), "%2F");
        assert_eq!(escape("a.b-c_d"), "a.b-c_d");
        assert_eq!(escape(".."), "%2E.");
        assert_eq!(escape(""), "%");
        assert_eq!(
            stream_dir(Path::new("/d"), "/", "q"),
            Path::new("/d/streams/%2F/q")
        );
    }
}
