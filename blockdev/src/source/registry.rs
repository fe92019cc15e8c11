//! A lazybd blob in an OCI registry, read by HTTP range requests.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;

use futures_util::StreamExt;

use super::{Answer, ChunkSource, SourceError};
use crate::registry::RegistryClient;

pub struct RegistrySource {
    client: Arc<RegistryClient>,
    digest: String,
}

impl RegistrySource {
    /// Blob `digest` of the repository `client` names; one client can be
    /// shared by all layers of an image (it caches the auth token).
    pub fn new(client: Arc<RegistryClient>, digest: &str) -> Self {
        RegistrySource {
            client,
            digest: digest.to_owned(),
        }
    }
}

#[async_trait]
impl ChunkSource for RegistrySource {
    fn name(&self) -> &str {
        "registry"
    }

    async fn read_range(&self, range: Range<u64>) -> Result<Answer, SourceError> {
        let body = self
            .client
            .blob_range_stream(&self.digest, range)
            .await
            .map_err(source_error)?;
        Ok(Answer::streamed(
            body.map(|piece| piece.map_err(source_error)),
        ))
    }
}

fn source_error(e: crate::registry::RegistryError) -> SourceError {
    if e.is_transient() {
        SourceError::Transient(e.to_string())
    } else {
        SourceError::Permanent(e.to_string())
    }
}
