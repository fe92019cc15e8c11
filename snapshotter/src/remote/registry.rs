//! The image's registry, as the remote path uses it: a client per image
//! reference with this daemon's settings and credentials, and, behind
//! [`ManifestSource`], the manifests that say which layers are lazybd
//! layers (unit tests serve those from memory).

use async_trait::async_trait;
use bytes::Bytes;
use lazybd_blockdev::registry::{RegistryAuth, RegistryClient, RegistryError, RegistryOptions};
use tracing::debug;

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
    /// With the CRI keychain, each credential it has for the repository is
    /// tried (working ones first, then those of running pulls), then the
    /// docker config's; the first the registry accepts is the one the
    /// layer's chunks are fetched with ([`client`]).
    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Bytes, RegistryError> {
        let Some(keychain) = &self.registry.keychain else {
            let client = client(&self.registry, image_ref)?;
            return Ok(client.manifest_by_digest(digest).await?.bytes);
        };
        let mut refused = None;
        for auth in keychain
            .candidates(image_ref)
            .into_iter()
            .map(Some)
            .chain([None])
        {
            let client = client_with(&self.registry, image_ref, auth.clone())?;
            match client.manifest_by_digest(digest).await {
                Ok(m) => {
                    if let Some(auth) = &auth {
                        keychain.worked(image_ref, auth);
                    }
                    return Ok(m.bytes);
                }
                // Asking with other credentials will not fix a registry
                // that is down.
                Err(e) if e.is_transient() => return Err(e),
                Err(e) => {
                    debug!("{image_ref}: manifest {digest} with one of its credentials: {e}");
                    refused = Some(e);
                }
            }
        }
        Err(refused.expect("the docker config's credentials are always tried"))
    }
}

/// A client for the repository `image_ref` names: over plain HTTP if its
/// registry is listed so, with the credentials CRI gave for it (the CRI
/// keychain), else the docker config's.
pub fn client(registry: &RegistryConfig, image_ref: &str) -> Result<RegistryClient, RegistryError> {
    let auth = registry.keychain.as_ref().and_then(|k| k.get(image_ref));
    client_with(registry, image_ref, auth)
}

/// [`client`] with `auth`, or the docker config's credentials for `None`.
fn client_with(
    registry: &RegistryConfig,
    image_ref: &str,
    auth: Option<RegistryAuth>,
) -> Result<RegistryClient, RegistryError> {
    let host = image_ref.split('/').next().unwrap_or_default();
    let opts = RegistryOptions {
        plain_http: registry.plain_http.iter().any(|h| h == host),
        docker_config: registry.docker_config.clone(),
        hosts_dir: registry.config_path.clone(),
        ..RegistryOptions::default()
    };
    match auth {
        Some(auth) => RegistryClient::with_auth(image_ref, &opts, auth),
        None => RegistryClient::new(image_ref, &opts),
    }
}
