//! The converter's view of a registry repository.
//!
//! The converter is synchronous (layers convert on threads, mkfs.erofs is a
//! child process), the registry client async; this store owns a small
//! runtime and blocks on it, so `convert_image` must not be called from
//! inside another tokio runtime.

use std::path::Path;
use std::sync::Arc;

use tokio::runtime::Runtime;

use super::{ConvertError, ImageStore};
use crate::oci::{MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST};
use crate::registry::{RegistryClient, RegistryOptions};

pub struct RegistryStore {
    runtime: Runtime,
    client: Arc<RegistryClient>,
}

impl RegistryStore {
    pub fn new(reference: &str, opts: &RegistryOptions) -> Result<Self, ConvertError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("lazybd-registry")
            .enable_all()
            .build()
            .map_err(|e| ConvertError::Io {
                what: "starting the registry client runtime".into(),
                source: e,
            })?;
        Ok(RegistryStore {
            runtime,
            client: Arc::new(RegistryClient::new(reference, opts)?),
        })
    }
}

impl ImageStore for RegistryStore {
    fn describe(&self) -> String {
        self.client.describe()
    }

    fn manifest(&self) -> Result<(Vec<u8>, String, String), ConvertError> {
        let m = self.runtime.block_on(self.client.manifest())?;
        Ok((m.bytes.to_vec(), m.media_type, m.digest))
    }

    fn manifest_by_digest(&self, digest: &str) -> Result<Vec<u8>, ConvertError> {
        let m = self
            .runtime
            .block_on(self.client.manifest_by_digest(digest))?;
        Ok(m.bytes.to_vec())
    }

    fn blob(&self, digest: &str) -> Result<Vec<u8>, ConvertError> {
        Ok(self.runtime.block_on(self.client.blob(digest))?)
    }

    fn blob_to_file(&self, digest: &str, size: u64, path: &Path) -> Result<(), ConvertError> {
        Ok(self
            .runtime
            .block_on(self.client.blob_to_file(digest, size, path))?)
    }

    fn put_blob(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self.runtime.block_on(self.client.push_blob(bytes))?)
    }

    fn put_blob_file(&self, digest: &str, path: &Path) -> Result<(), ConvertError> {
        Ok(self
            .runtime
            .block_on(self.client.push_blob_file(digest, path))?)
    }

    fn put_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self
            .runtime
            .block_on(self.client.push_manifest(bytes, MEDIA_OCI_MANIFEST))?)
    }

    fn put_platform_manifest(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self.runtime.block_on(
            self.client
                .push_manifest_by_digest(bytes, MEDIA_OCI_MANIFEST),
        )?)
    }

    fn put_index(&self, bytes: &[u8]) -> Result<String, ConvertError> {
        Ok(self
            .runtime
            .block_on(self.client.push_manifest(bytes, MEDIA_OCI_INDEX))?)
    }
}
