//! Errors of the Snapshots service, and the gRPC codes containerd turns
//! back into its errdefs (NotFound, AlreadyExists, FailedPrecondition, ...).

use containerd_snapshots::tonic::Status;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("snapshot {0:?} not found")]
    NotFound(String),
    #[error("snapshot {0:?} already exists")]
    AlreadyExists(String),
    /// The request does not fit the snapshot's state (wrong kind, has
    /// children, parent not committed).
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A remote layer is not attached (yet): asking again may work.
    #[error("{0}")]
    Unavailable(String),
    #[error("metadata store: {0}")]
    Store(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl SnapshotError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> SnapshotError {
        let what = what.into();
        move |source| SnapshotError::Io { what, source }
    }
}

impl From<SnapshotError> for Status {
    fn from(e: SnapshotError) -> Status {
        let msg = e.to_string();
        match e {
            SnapshotError::NotFound(_) => Status::not_found(msg),
            SnapshotError::AlreadyExists(_) => Status::already_exists(msg),
            SnapshotError::FailedPrecondition(_) => Status::failed_precondition(msg),
            SnapshotError::InvalidArgument(_) => Status::invalid_argument(msg),
            SnapshotError::Unavailable(_) => Status::unavailable(msg),
            SnapshotError::Store(_) | SnapshotError::Io { .. } => Status::internal(msg),
        }
    }
}

macro_rules! store_error {
    ($($t:ty),*) => {$(
        impl From<$t> for SnapshotError {
            fn from(e: $t) -> Self {
                SnapshotError::Store(e.to_string())
            }
        }
    )*};
}
store_error!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    serde_json::Error
);
