//! Why a layer cannot be served lazily. Prepare turns each of these into a
//! fallback (containerd unpacks the layer itself) and logs it, except the
//! refusals of docs/security.md ([`RemoteError::is_refusal`]), which it
//! returns to containerd: every variant names the image and digests, and
//! keeps the underlying error as its source and in its message.

use std::sync::Arc;

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
    /// A version 1 layer: nothing ties the bytes served for it to the image.
    #[error(
        "layer {layer} of {image_ref} is a version 1 lazybd layer without a content anchor; \
         lazybd-snapshotter attaches such layers only with `[remote] \
         allow_unanchored_layers = true` in its config (docs/security.md); convert the \
         image again to give it one"
    )]
    Unanchored { image_ref: String, layer: String },
    /// containerd would name the snapshot after other content than the
    /// layer's: its chain ID is not the one of the parent and the anchor.
    #[error(
        "layer {layer} of {image_ref}: containerd asks for snapshot {target}, but {chain}; \
         refusing to attach a layer under another layer's snapshot name (its image config \
         does not name the anchor on its descriptor, docs/security.md)"
    )]
    ChainMismatch {
        image_ref: String,
        layer: String,
        target: String,
        /// What the name should be, and why.
        chain: String,
    },
    /// The blockdev core could not attach the layer (its index could not
    /// be fetched or verified, FUSE, loop device, mount).
    #[error("attaching layer {digest}: {source}")]
    Attach {
        digest: String,
        #[source]
        source: DeviceError,
    },
    /// The error of an attach that others waited for too
    /// (`crate::remote::attaching`).
    #[error(transparent)]
    Shared(Arc<RemoteError>),
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
            RemoteError::Shared(e) => e.is_transient(),
            RemoteError::TooLarge { .. }
            | RemoteError::BadManifest { .. }
            | RemoteError::NoSuchLayer { .. }
            | RemoteError::NotLazy { .. }
            | RemoteError::BadAnnotations { .. }
            | RemoteError::Unanchored { .. }
            | RemoteError::ChainMismatch { .. } => false,
        }
    }

    /// The layer is refused by the node's trust rules (docs/security.md),
    /// not merely unavailable: Prepare answers containerd with this error
    /// instead of falling back (containerd cannot unpack a lazybd layer
    /// itself, so the fallback would only hide the reason).
    pub fn is_refusal(&self) -> bool {
        match self {
            RemoteError::Shared(e) => e.is_refusal(),
            e => matches!(
                e,
                RemoteError::Unanchored { .. } | RemoteError::ChainMismatch { .. }
            ),
        }
    }
}
