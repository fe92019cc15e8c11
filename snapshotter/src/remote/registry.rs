//! The image's registry, as the remote path uses it: a client per image
//! reference with this daemon's settings and credentials, and, behind
//! [`ManifestSource`], the manifests that say which layers are lazybd
//! layers (unit tests serve those from memory).

use async_trait::async_trait;
use bytes::Bytes;
use lazybd_blockdev::registry::{RegistryClient, RegistryError, RegistryOptions};

use crate::config::RegistryConfig;

/// Where manifests come from.
#[async_trait]
pub trait ManifestSource: Send + Sync {
    /// The manifest `digest` of the repository `image_ref` names, as served.
    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Bytes, RegistryError>;
}

/// Manifests from the image's registry.
pub struct RegistryManifests {
    registry: RegistryConfig,
}

impl RegistryManifests {
    pub fn new(registry: RegistryConfig) -> Self {
        RegistryManifests { registry }
    }
}

#[async_trait]
impl ManifestSource for RegistryManifests {
    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Bytes, RegistryError> {
        let client = client(&self.registry, image_ref)?;
        Ok(client.manifest_by_digest(digest).await?.bytes)
    }
}

/// A client for the repository `image_ref` names: over plain HTTP if its
/// registry is listed so, with the credentials CRI gave for it (the CRI
/// keychain), else the docker config's.
pub fn client(registry: &RegistryConfig, image_ref: &str) -> Result<RegistryClient, RegistryError> {
    let host = image_ref.split('/').next().unwrap_or_default();
    let opts = RegistryOptions {
        plain_http: registry.plain_http.iter().any(|h| h == host),
        docker_config: registry.docker_config.clone(),
        ..RegistryOptions::default()
    };
    let keychain = registry.keychain.as_ref();
    match keychain.and_then(|k| k.get(image_ref)) {
        Some(auth) => RegistryClient::with_auth(image_ref, &opts, auth),
        None => RegistryClient::new(image_ref, &opts),
    }
}
