//! The image's registry, as the remote path uses it: a client per image
//! reference with this daemon's settings and credentials ([`Clients`]
//! keeps them), and, behind [`ManifestSource`], the manifests that say
//! which layers are lazybd layers (unit tests serve those from memory).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

/// Manifests from the image's registry, with the clients the image's
/// chunks are fetched with.
pub struct RegistryManifests {
    registry: RegistryConfig,
    clients: Arc<Clients>,
}

impl RegistryManifests {
    pub fn new(registry: RegistryConfig, clients: Arc<Clients>) -> Self {
        RegistryManifests { registry, clients }
    }
}

#[async_trait]
impl ManifestSource for RegistryManifests {
    /// With the CRI keychain, each credential it has for the repository is
    /// tried (working ones first, then those of running pulls), then the
    /// docker config's; the first the registry accepts is the one the
    /// layer's chunks are fetched with ([`Clients::get`]).
    async fn manifest(&self, image_ref: &str, digest: &str) -> Result<Bytes, RegistryError> {
        let Some(keychain) = &self.registry.keychain else {
            let client = self.clients.get(&self.registry, image_ref)?;
            return Ok(client.manifest_by_digest(digest).await?.bytes);
        };
        let mut refused = None;
        for auth in keychain
            .candidates(image_ref)
            .into_iter()
            .map(Some)
            .chain([None])
        {
            let client = self
                .clients
                .get_with(&self.registry, image_ref, auth.clone())?;
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

/// Clients kept at most: an image's layers share one (one connection pool,
/// one token), so this many images being prepared at once.
const CLIENTS_KEPT: usize = 64;
/// A kept client is made again after this long, so that a changed docker
/// config or CA file is read again.
const CLIENT_TTL: Duration = Duration::from_secs(600);

/// The registry clients of recently attached images, by image reference
/// and credentials. Building a client reads the system's CA certificates
/// (a few ms, tens when they are not cached), and each new client opens a
/// connection and asks the registry how to authenticate: once per image
/// instead of once per layer.
#[derive(Default)]
pub struct Clients {
    kept: Mutex<VecDeque<Kept>>,
}

struct Kept {
    image_ref: String,
    auth: Option<RegistryAuth>,
    made: Instant,
    client: Arc<RegistryClient>,
}

impl Clients {
    /// The client for the repository `image_ref` names: over plain HTTP if
    /// its registry is listed so, with the credentials CRI gave for it (the
    /// CRI keychain), else the docker config's; made once for every image
    /// reference and set of credentials.
    pub fn get(
        &self,
        registry: &RegistryConfig,
        image_ref: &str,
    ) -> Result<Arc<RegistryClient>, RegistryError> {
        let auth = registry.keychain.as_ref().and_then(|k| k.get(image_ref));
        self.get_with(registry, image_ref, auth)
    }

    /// The client for `image_ref` with `auth` (`None`: the docker
    /// config's credentials), made once for each.
    pub fn get_with(
        &self,
        registry: &RegistryConfig,
        image_ref: &str,
        auth: Option<RegistryAuth>,
    ) -> Result<Arc<RegistryClient>, RegistryError> {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept.retain(|k| k.made.elapsed() < CLIENT_TTL);
        if let Some(k) = kept
            .iter()
            .find(|k| k.image_ref == image_ref && k.auth == auth)
        {
            return Ok(k.client.clone());
        }
        let client = Arc::new(client_with(registry, image_ref, auth.clone())?);
        if kept.len() == CLIENTS_KEPT {
            kept.pop_front();
        }
        kept.push_back(Kept {
            image_ref: image_ref.to_owned(),
            auth,
            made: Instant::now(),
            client: client.clone(),
        });
        Ok(client)
    }
}

/// A new client for `image_ref` with `auth`, or the docker config's
/// credentials for `None`.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_images_layers_share_one_client_per_reference() {
        let registry = RegistryConfig {
            plain_http: vec!["127.0.0.1:5000".into()],
            ..RegistryConfig::default()
        };
        let clients = Clients::default();
        let a = clients.get(&registry, "127.0.0.1:5000/app:1").unwrap();
        let again = clients.get(&registry, "127.0.0.1:5000/app:1").unwrap();
        let other = clients.get(&registry, "127.0.0.1:5000/app:2").unwrap();
        assert!(Arc::ptr_eq(&a, &again), "made once");
        assert!(
            !Arc::ptr_eq(&a, &other),
            "another reference, another client"
        );
        for i in 0..CLIENTS_KEPT {
            clients
                .get(&registry, &format!("127.0.0.1:5000/app:n{i}"))
                .unwrap();
        }
        let kept = clients.kept.lock().unwrap().len();
        assert_eq!(kept, CLIENTS_KEPT, "bounded");
        let a_later = clients.get(&registry, "127.0.0.1:5000/app:1").unwrap();
        assert!(!Arc::ptr_eq(&a, &a_later), "the oldest went first");
    }
}
