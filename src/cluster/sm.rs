//! Pieces every state machine shares: applied position, membership, and
//! the snapshot stubs of the metadata group (it takes no snapshots: its log
//! holds only quorum queue declarations and deletions; quorum queues have
//! real snapshots, see `queue::quorum`).

use super::types::{NodeId, NodeInfo, TypeConfig};
use openraft::storage::{RaftSnapshotBuilder, Snapshot};
use openraft::{EntryPayload, ErrorSubject, ErrorVerb, LogId, StorageError, StoredMembership};

/// Where a state machine is.
#[derive(Debug, Default, Clone)]
pub struct Applied {
    /// Last applied log id.
    pub last: Option<LogId<NodeId>>,
    /// Last applied membership.
    pub membership: StoredMembership<NodeId, NodeInfo>,
}

impl Applied {
    /// Records an entry as applied; returns its command, if it has one.
    pub fn take(&mut self, e: openraft::Entry<TypeConfig>) -> Option<super::types::Cmd> {
        self.last = Some(e.log_id);
        match e.payload {
            EntryPayload::Blank => None,
            EntryPayload::Normal(c) => Some(c),
            EntryPayload::Membership(m) => {
                self.membership = StoredMembership::new(Some(e.log_id), m);
                None
            }
        }
    }
}

/// Snapshot builder that refuses: snapshots are off (SnapshotPolicy::Never).
pub struct NoSnapshot;

impl RaftSnapshotBuilder<TypeConfig> for NoSnapshot {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        Err(StorageError::from_io_error(
            ErrorSubject::Snapshot(None),
            ErrorVerb::Write,
            std::io::Error::other("snapshots are not implemented for this group"),
        ))
    }
}

/// The error for an install-snapshot request.
pub fn no_install() -> StorageError<NodeId> {
    StorageError::from_io_error(
        ErrorSubject::Snapshot(None),
        ErrorVerb::Write,
        std::io::Error::other("snapshots are not implemented; the follower must replay the log"),
    )
}
