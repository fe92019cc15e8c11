//! Errors of the Snapshots service, and the gRPC codes containerd turns
//! back into its errdefs (NotFound, AlreadyExists, FailedPrecondition, ...).

use containerd_snapshots::tonic::Status;
use thiserror::Error;

use crate::remote::RemoteError;

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
    /// A lazybd layer cannot be served lazily. Prepare falls back to an
    /// ordinary snapshot instead of returning this.
    #[error(transparent)]
    Remote(#[from] RemoteError),
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
            SnapshotError::Remote(e) if e.is_transient() => Status::unavailable(msg),
            SnapshotError::Remote(_) => Status::failed_precondition(msg),
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

#[cfg(test)]
mod tests {
    use containerd_snapshots::tonic::Code;
    use lazybd_blockdev::device::DeviceError;
    use lazybd_blockdev::registry::RegistryError;

    use super::*;

    #[test]
    fn remote_errors_map_to_codes_and_keep_their_reason() {
        let attach = SnapshotError::from(RemoteError::Attach {
            digest: "sha256:ab".into(),
            source: DeviceError::NotAttached("sha256:ab".into()),
        });
        // The whole chain is in the message the log and containerd see.
        assert_eq!(
            attach.to_string(),
            "attaching layer sha256:ab: layer sha256:ab is not attached"
        );
        assert_eq!(Status::from(attach).code(), Code::Unavailable);
        let fetch = |source| RemoteError::Fetch {
            image_ref: "r.test/app:v1".into(),
            digest: "sha256:cd".into(),
            source,
        };
        let down = fetch(RegistryError::Transient {
            what: "r.test".into(),
            message: "connection refused".into(),
        });
        assert_eq!(
            Status::from(SnapshotError::from(down)).code(),
            Code::Unavailable
        );
        let denied = fetch(RegistryError::Permanent {
            what: "r.test".into(),
            message: "denied".into(),
        });
        let status = Status::from(SnapshotError::from(denied));
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(
            status.message(),
            "fetching manifest sha256:cd of r.test/app:v1: r.test: denied"
        );
    }
}
