//! Who may read what, as the super node establishes it: registry clients
//! per (registry, repository, credentials); the registry's "yes" to a
//! caller's credentials for a blob (a one-byte read, remembered for
//! `auth_ttl`); a blob's size, checked against the registry once instead of
//! believed; and which caller addresses hold an unexpired ticket for which
//! layer (for the trace endpoints). Every map is bounded: its keys come
//! from callers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use futures_util::StreamExt;
use hyper::StatusCode;
use sha2::{Digest, Sha256};

use super::{Refusal, Supernode};
use crate::oci::LayerId;
use crate::p2p::ticket::{canonical, unix_now, Claims};
use crate::p2p::wire::auth_from_header;
use crate::registry::{RegistryClient, RegistryOptions};

const MAX_CLIENTS: usize = 256;
const MAX_AUTH_ENTRIES: usize = 4096;
const MAX_SIZES: usize = 65536;
const MAX_HOLDINGS: usize = 1 << 16;

/// Registry, repository, sha256 of the credentials header.
type ClientKey = (String, String, [u8; 32]);
/// Registry, repository, blob digest, sha256 of the credentials header.
type AuthKey = (String, String, String, [u8; 32]);

#[derive(Default)]
pub struct Access {
    clients: Mutex<HashMap<ClientKey, Arc<RegistryClient>>>,
    /// When the registry last accepted these credentials for this blob.
    authorized: Mutex<HashMap<AuthKey, Instant>>,
    /// Blob sizes the registry confirmed, by (registry, digest).
    sizes: Mutex<HashMap<(String, String), u64>>,
    /// (caller IP, digest or anchor) -> unix time its ticket expires.
    holdings: Mutex<HashMap<(IpAddr, String), u64>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Access {
    /// Remembers that the holder of `claims` may read its layer.
    pub fn record(&self, claims: &Claims, ip: IpAddr) {
        let mut h = lock(&self.holdings);
        if h.len() >= MAX_HOLDINGS {
            let now = unix_now();
            h.retain(|_, exp| *exp > now);
            if h.len() >= MAX_HOLDINGS {
                // Full of live tickets: forget some; their holders cannot
                // use traces until their next announce.
                let victims: Vec<_> = h.keys().take(MAX_HOLDINGS / 8).cloned().collect();
                for v in victims {
                    h.remove(&v);
                }
            }
        }
        let ip = canonical(ip);
        h.insert((ip, claims.blob.clone()), claims.expires);
        if !claims.anchor.is_empty() {
            h.insert((ip, claims.anchor.clone()), claims.expires);
        }
    }

    /// Whether `ip` holds an unexpired ticket for `layer` (a digest or an
    /// anchor).
    pub fn holds(&self, ip: IpAddr, layer: &str) -> bool {
        lock(&self.holdings)
            .get(&(canonical(ip), layer.to_owned()))
            .is_some_and(|exp| *exp > unix_now())
    }

    /// Whether `ip` holds an unexpired ticket for the layer `id` names: its
    /// anchor, or the blob digest of an unanchored layer.
    pub fn holds_layer(&self, ip: IpAddr, id: &LayerId) -> bool {
        match (id.anchor(), id.unanchored_blob()) {
            (Some(anchor), _) => self.holds(ip, anchor),
            (None, Some(blob)) => self.holds(ip, blob),
            (None, None) => false,
        }
    }
}

impl Supernode {
    /// Checks `registry` is served here and returns the client for these
    /// credentials (the header as sent), and their hash.
    pub(super) fn registry_client(
        &self,
        registry: &str,
        repo: &str,
        auth_header: &str,
    ) -> Result<(Arc<RegistryClient>, [u8; 32]), Refusal> {
        if !self.config.registries.iter().any(|r| r == registry) {
            return Err((
                StatusCode::FORBIDDEN,
                format!("registry {registry} is not served here"),
            ));
        }
        if repo.is_empty() || repo.len() > 256 {
            return Err((StatusCode::BAD_REQUEST, "bad repo".into()));
        }
        let auth = auth_from_header(auth_header).map_err(|e| (StatusCode::BAD_REQUEST, e))?;
        let cred: [u8; 32] = Sha256::digest(auth_header.as_bytes()).into();
        let key = (registry.to_owned(), repo.to_owned(), cred);
        let mut clients = lock(&self.access.clients);
        if let Some(c) = clients.get(&key) {
            return Ok((c.clone(), cred));
        }
        let opts = RegistryOptions {
            plain_http: self.config.plain_http,
            read_timeout: self.config.registry_timeout,
            ..RegistryOptions::default()
        };
        let client = RegistryClient::with_auth(&format!("{registry}/{repo}"), &opts, auth)
            .map(Arc::new)
            .map_err(|e| (StatusCode::BAD_REQUEST, e.to_string()))?;
        if clients.len() >= MAX_CLIENTS {
            clients.clear();
        }
        clients.insert(key, client.clone());
        Ok((client, cred))
    }

    /// Passes when the registry recently let these credentials read this
    /// blob; else asks it (one byte) now.
    pub(super) async fn authorize(
        &self,
        client: &RegistryClient,
        digest: &str,
        cred: [u8; 32],
    ) -> Result<(), Refusal> {
        let key = (
            client.registry().to_owned(),
            client.repository().to_owned(),
            digest.to_owned(),
            cred,
        );
        let now = Instant::now();
        {
            let mut a = lock(&self.access.authorized);
            if a.get(&key)
                .is_some_and(|t| now.duration_since(*t) < self.config.auth_ttl)
            {
                return Ok(());
            }
            if a.len() >= MAX_AUTH_ENTRIES {
                let ttl = self.config.auth_ttl;
                a.retain(|_, t| now.duration_since(*t) < ttl);
                if a.len() >= MAX_AUTH_ENTRIES {
                    a.clear();
                }
            }
        }
        let _slot = self.registry_slot().await?;
        self.counters.auth_probes.fetch_add(1, Relaxed);
        let probe = tokio::time::timeout(
            self.config.registry_timeout,
            client.blob_range(digest, 0..1),
        )
        .await;
        match probe {
            Ok(Ok(_)) => {
                lock(&self.access.authorized).insert(key, now);
                Ok(())
            }
            Ok(Err(e)) if !e.is_transient() => {
                self.counters.auth_denied.fetch_add(1, Relaxed);
                Err((StatusCode::FORBIDDEN, format!("registry refused: {e}")))
            }
            Ok(Err(e)) => Err((StatusCode::BAD_GATEWAY, format!("registry: {e}"))),
            Err(_) => Err((StatusCode::GATEWAY_TIMEOUT, "registry timed out".into())),
        }
    }

    /// Whether blob `digest` is `size` bytes long, as the registry says: a
    /// read of the two bytes from its supposed last one returns exactly one
    /// (registries clip a range at the blob's end; a range starting past it
    /// is refused). Checked once per blob; a client naming another size is
    /// refused (400), so a size it makes up never creates cache entries or
    /// registry work.
    pub(super) async fn check_size(
        &self,
        client: &RegistryClient,
        digest: &str,
        size: u64,
    ) -> Result<(), Refusal> {
        let key = (client.registry().to_owned(), digest.to_owned());
        let wrong = || {
            self.counters.wrong_sizes.fetch_add(1, Relaxed);
            (
                StatusCode::BAD_REQUEST,
                format!("blob {digest} is not {size} bytes long"),
            )
        };
        if let Some(&known) = lock(&self.access.sizes).get(&key) {
            return if known == size { Ok(()) } else { Err(wrong()) };
        }
        if size == 0 {
            return Err(wrong());
        }
        let _slot = self.registry_slot().await?;
        self.counters.size_probes.fetch_add(1, Relaxed);
        let gateway = |e: String| (StatusCode::BAD_GATEWAY, format!("registry: {e}"));
        let probe = async {
            let mut body = client.blob_range_stream(digest, size - 1..size + 1).await?;
            let mut got = 0usize;
            while let Some(piece) = body.next().await {
                got += piece?.len();
            }
            Ok::<_, crate::registry::RegistryError>(got)
        };
        match tokio::time::timeout(self.config.registry_timeout, probe).await {
            Ok(Ok(1)) => {}
            Ok(Ok(_)) => return Err(wrong()),
            Ok(Err(e)) if e.is_transient() => return Err(gateway(e.to_string())),
            // Refused: there is no byte at `size - 1`.
            Ok(Err(_)) => return Err(wrong()),
            Err(_) => return Err(gateway("timed out".into())),
        }
        let mut sizes = lock(&self.access.sizes);
        if sizes.len() >= MAX_SIZES {
            sizes.clear();
        }
        sizes.insert(key, size);
        Ok(())
    }

    /// One of the registry slots (shared with block fetches), so callers
    /// with ever new credentials cannot make unbounded registry work.
    async fn registry_slot(&self) -> Result<tokio::sync::OwnedSemaphorePermit, Refusal> {
        let busy = || (StatusCode::SERVICE_UNAVAILABLE, "registry busy".to_owned());
        tokio::time::timeout(
            self.config.registry_timeout,
            self.registry_slots.clone().acquire_owned(),
        )
        .await
        .map_err(|_| busy())?
        .map_err(|_| busy())
    }
}
