//! Why a layer cannot be served lazily. Prepare turns each of these into a
//! fallback (containerd unpacks the layer itself) and logs it, so every
//! variant names the image and digests, and keeps the underlying error as
//! its source and in its message.

use lazybd_blockdev::device::DeviceError;
use lazybd_blockdev::oci::OciError;
use lazybd_blockdev::registry::RegistryError;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RemoteError {
    /// No registry client for the image: a bad reference, or credentials
    /// that cannot be read.
    #[error("registry client for {image_ref}: {source}")]
    Client {
        image_ref: String,
        #[source]
        source: RegistryError,
    },
    #[error("fetching manifest {digest} of {image_ref}: {source}")]
    Fetch {
        image_ref: String,
        digest: String,
        #[source]
        source: RegistryError,
    },
    #[error("manifest {digest} of {image_ref} is too large ({len} bytes)")]
    TooLarge {
        image_ref: String,
        digest: String,
        len: u64,
    },
    #[error("manifest {digest} of {image_ref}: {source}")]
    BadManifest {
        image_ref: String,
        digest: String,
        #[source]
        source: oci_spec::OciSpecError,
    },
    #[error("manifest {manifest} of {image_ref} has no layer {layer}")]
    NoSuchLayer {
        image_ref: String,
        manifest: String,
        layer: String,
    },
    #[error("layer {layer} of {image_ref} is not a lazybd layer (media type {media_type})")]
    NotLazy {
        image_ref: String,
        layer: String,
        media_type: String,
    },
    #[error("layer {layer} of {image_ref}: {source}")]
    BadAnnotations {
        image_ref: String,
        layer: String,
        #[source]
        source: OciError,
    },
    /// The blockdev core could not attach the layer (its index could not
    /// be fetched or verified, FUSE, loop device, mount).
    #[error("attaching layer {digest}: {source}")]
    Attach {
        digest: String,
        #[source]
        source: DeviceError,
    },
}

impl RemoteError {
    /// Asking again later may work: the registry or the network had
    /// trouble, or the attach failed (its index could not be fetched, a
    /// device step failed). The rest is about the image and stays so.
    pub fn is_transient(&self) -> bool {
        match self {
            RemoteError::Client { source, .. } | RemoteError::Fetch { source, .. } => {
                source.is_transient()
            }
            RemoteError::Attach { .. } => true,
            RemoteError::TooLarge { .. }
            | RemoteError::BadManifest { .. }
            | RemoteError::NoSuchLayer { .. }
            | RemoteError::NotLazy { .. }
            | RemoteError::BadAnnotations { .. } => false,
        }
    }
}
