//! An OCI distribution registry, as lazybd uses it: manifests, whole blobs
//! (verified), byte ranges of lazybd blobs, and pushes.
//!
//! Every request, the bearer-token flow included, goes through one reqwest
//! client per endpoint whose answers are bounded ([`bounded`], [`push`]);
//! `oci-client` gives the reference and credential types. On top: credentials
//! from the docker config file, containerd's hosts.toml mirrors, plain HTTP
//! only when asked for, deadlines, retries of transient failures, and errors
//! that say whether asking again can help (the fetcher's source fallback
//! depends on that).

mod bounded;
mod credentials;
pub mod hosts;
mod push;
mod reference;
#[cfg(test)]
mod tests_hostile;
mod tls;

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
pub use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use thiserror::Error;
use tracing::{debug, warn};

use crate::oci::{
    digest_of, MAX_METADATA_LEN, MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST, MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
};

pub use credentials::{credentials_for, CredentialsError};

/// Manifest media types we ask for (and understand).
const ACCEPTED_MANIFESTS: &[&str] = &[
    MEDIA_OCI_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_DOCKER_LIST,
];

const USER_AGENT: &str = concat!("lazybd/", env!("CARGO_PKG_VERSION"));

/// Attempts for whole-object operations (manifests, blobs, pushes). Range
/// reads are attempted once: the chunk fetcher owns their retries and
/// deadline, and may prefer another source.
const ATTEMPTS: u32 = 3;

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("{reference}: not a valid image reference: {message}")]
    BadReference { reference: String, message: String },
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    /// Worth asking again later: connection trouble, timeouts, 5xx, 429.
    #[error("{what}: {message}")]
    Transient { what: String, message: String },
    /// Asking again will not help: not found, denied, invalid.
    #[error("{what}: {message}")]
    Permanent { what: String, message: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl RegistryError {
    pub fn is_transient(&self) -> bool {
        matches!(self, RegistryError::Transient { .. })
    }
}

/// How to reach registries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Speak HTTP instead of HTTPS (for a registry on loopback or a trusted
    /// network; never the default).
    pub plain_http: bool,
    /// Docker config file for credentials; `None`: `$DOCKER_CONFIG/config.json`
    /// or `~/.docker/config.json`, if present.
    pub docker_config: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Longest wait for the next bytes of a response.
    pub read_timeout: Duration,
    /// containerd's registry host configuration (`config_path`, e.g.
    /// `/etc/containerd/certs.d`): mirrors, CAs, `skip_verify` per registry
    /// ([`hosts`]). `None`: the registry alone, as configured here.
    pub hosts_dir: Option<PathBuf>,
    /// PEM files of CAs trusted besides the system's (from hosts.toml).
    pub ca_files: Vec<PathBuf>,
    /// Accept any certificate (hosts.toml's `skip_verify`).
    pub skip_verify: bool,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            plain_http: false,
            docker_config: None,
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(30),
            hosts_dir: None,
            ca_files: Vec::new(),
            skip_verify: false,
        }
    }
}

impl RegistryOptions {
    /// These options for `endpoint` of a registry's hosts.toml.
    fn for_endpoint(&self, endpoint: &hosts::Endpoint) -> RegistryOptions {
        RegistryOptions {
            plain_http: endpoint.plain_http,
            ca_files: endpoint.ca.clone(),
            skip_verify: endpoint.skip_verify,
            hosts_dir: None,
            ..self.clone()
        }
    }

    /// The CA certificates to trust besides the system's, read now.
    fn extra_roots(&self) -> Result<Vec<Vec<u8>>, RegistryError> {
        self.ca_files
            .iter()
            .map(|path| {
                std::fs::read(path).map_err(|source| RegistryError::Io {
                    what: format!("reading the CA file {}", path.display()),
                    source,
                })
            })
            .collect()
    }
}

/// A manifest or index as the registry stored it.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Bytes,
    pub media_type: String,
    pub digest: String,
}

/// One repository of one registry, named by an image reference.
pub struct RegistryClient {
    reference: Reference,
    auth: RegistryAuth,
    /// Every request; answers streamed, cut off at their limit.
    bounded: bounded::BoundedClient,
    /// The registry's mirrors from its hosts.toml, in order: asked first
    /// for what their capabilities allow; the registry itself is asked
    /// when none answers.
    mirrors: Vec<Mirror>,
}

/// A mirror: a client for the same repository at another host.
struct Mirror {
    client: RegistryClient,
    capabilities: hosts::Capabilities,
}

impl RegistryClient {
    /// `reference` is `HOST[:PORT]/REPO[:TAG][@DIGEST]` (Docker Hub names
    /// like `busybox` work too).
    pub fn new(reference: &str, opts: &RegistryOptions) -> Result<Self, RegistryError> {
        let parsed = reference::parse(reference)?;
        let registry = parsed.resolve_registry().to_owned();
        let auth = credentials_for(&registry, opts.docker_config.as_deref())?;
        Self::build(parsed, opts, auth)
    }

    /// Like [`new`](Self::new) with explicit credentials instead of the
    /// docker config's: the super node uses the credentials its client sent,
    /// so it reads only what that client may read.
    pub fn with_auth(
        reference: &str,
        opts: &RegistryOptions,
        auth: RegistryAuth,
    ) -> Result<Self, RegistryError> {
        let parsed = reference::parse(reference)?;
        Self::build(parsed, opts, auth)
    }

    /// The client for `parsed`, with the mirrors, CAs and `skip_verify` its
    /// registry's hosts.toml names (when `opts.hosts_dir` is set).
    fn build(
        parsed: Reference,
        opts: &RegistryOptions,
        auth: RegistryAuth,
    ) -> Result<Self, RegistryError> {
        let registry = parsed.resolve_registry().to_owned();
        let Some(dir) = &opts.hosts_dir else {
            return Self::endpoint(parsed, opts, auth);
        };
        let config = hosts::endpoints(dir, &registry).map_err(|e| RegistryError::Permanent {
            what: format!("{registry}: the registry host configuration"),
            message: e.to_string(),
        })?;
        let Some(config) = config else {
            return Self::endpoint(parsed, opts, auth);
        };
        for skipped in &config.skipped {
            warn!("{registry}: hosts.toml entry left out: {skipped}");
        }
        let mut origin = None;
        let mut mirrors = Vec::new();
        for endpoint in &config.endpoints {
            let endpoint_opts = opts.for_endpoint(endpoint);
            if endpoint.host == registry {
                origin = Some(endpoint_opts);
                continue;
            }
            let mut reference = parsed.clone();
            reference.set_mirror_registry(endpoint.host.clone());
            // A mirror gets its own host's credentials (as containerd sends
            // them), never the registry's.
            let mirror_auth = credentials_for(&endpoint.host, opts.docker_config.as_deref())?;
            mirrors.push(Mirror {
                client: Self::endpoint(reference, &endpoint_opts, mirror_auth)?,
                capabilities: endpoint.capabilities,
            });
        }
        let mut client = Self::endpoint(parsed, origin.as_ref().unwrap_or(opts), auth)?;
        client.mirrors = mirrors;
        Ok(client)
    }

    /// A client for exactly the host `parsed` resolves to.
    fn endpoint(
        parsed: Reference,
        opts: &RegistryOptions,
        auth: RegistryAuth,
    ) -> Result<Self, RegistryError> {
        install_crypto_provider();
        let registry = parsed.resolve_registry().to_owned();
        let roots = opts.extra_roots()?;
        let bounded = bounded::BoundedClient::new(opts, &roots, USER_AGENT)?;
        debug!(%registry, auth = ?auth, "registry client");
        Ok(RegistryClient {
            reference: parsed,
            auth,
            bounded,
            mirrors: Vec::new(),
        })
    }

    /// What `op` gives from the first mirror that `can` allows to be asked
    /// and that answers, else from the registry itself; a mirror's failure
    /// is logged and the next one asked.
    async fn first_answer<'a, T, Fut>(
        &'a self,
        what: &str,
        can: fn(&hosts::Capabilities) -> bool,
        op: impl Fn(&'a Self) -> Fut,
    ) -> Result<T, RegistryError>
    where
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        for mirror in self.mirrors.iter().filter(|m| can(&m.capabilities)) {
            match op(&mirror.client).await {
                Ok(v) => return Ok(v),
                Err(e) => warn!(
                    "{what}: mirror {} failed, asking the next: {e}",
                    mirror.client.registry_host()
                ),
            }
        }
        op(self).await
    }

    /// What a bounded GET of `reference` needs of this client.
    fn target<'a>(&'a self, reference: &'a Reference) -> bounded::Target<'a> {
        bounded::Target {
            reference,
            auth: &self.auth,
        }
    }

    /// `host[:port]` this client connects to (a mirror's own host).
    fn registry_host(&self) -> String {
        self.reference.resolve_registry().to_owned()
    }

    /// `host/repo:tag` for messages.
    pub fn describe(&self) -> String {
        self.reference.whole()
    }

    /// `host[:port]` of the registry.
    pub fn registry(&self) -> &str {
        self.reference.registry()
    }

    pub fn repository(&self) -> &str {
        self.reference.repository()
    }

    /// The credentials this client uses (forwarded to a super node).
    pub fn auth(&self) -> &RegistryAuth {
        &self.auth
    }

    /// The manifest (or index) the reference names: from the first mirror
    /// that may resolve it (a digest reference: that may pull), else the
    /// registry.
    pub async fn manifest(&self) -> Result<RawManifest, RegistryError> {
        let by_digest = self.reference.digest().is_some();
        let can = if by_digest {
            |c: &hosts::Capabilities| c.pull
        } else {
            |c: &hosts::Capabilities| c.resolve
        };
        self.first_answer("manifest", can, |c| c.fetch_manifest(&c.reference))
            .await
    }

    /// A manifest of the same repository by digest (an index's entries).
    pub async fn manifest_by_digest(&self, digest: &str) -> Result<RawManifest, RegistryError> {
        self.first_answer(
            "manifest",
            |c| c.pull,
            |c| c.manifest_by_digest_here(digest),
        )
        .await
    }

    async fn manifest_by_digest_here(&self, digest: &str) -> Result<RawManifest, RegistryError> {
        let m = self.fetch_manifest(&self.by_digest(digest)).await?;
        if m.digest != digest {
            return Err(RegistryError::Permanent {
                what: format!("{}@{digest}", self.reference.repository()),
                message: format!("registry answered manifest {}", m.digest),
            });
        }
        Ok(m)
    }

    async fn fetch_manifest(&self, reference: &Reference) -> Result<RawManifest, RegistryError> {
        let what = format!("manifest {}", reference.whole());
        let name = manifest_name(reference);
        let url = self.bounded.url(reference, "manifests", &name);
        let accept = ACCEPTED_MANIFESTS.join(", ");
        let (bytes, headers) = self
            .retry(&what, || {
                let target = self.target(reference);
                let (url, accept, what) = (&url, &accept, &what);
                async move {
                    self.bounded
                        .get(&target, url, accept, MAX_METADATA_LEN as usize, what)
                        .await
                }
            })
            .await?;
        let digest = digest_of(&bytes);
        let claimed = headers
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .filter(|d| d.starts_with("sha256:"));
        for expected in [reference.digest(), claimed].into_iter().flatten() {
            if expected != digest {
                return Err(RegistryError::Permanent {
                    what,
                    message: format!("expected {expected}, the content has digest {digest}"),
                });
            }
        }
        // Current tools write `mediaType` into manifests; older OCI ones are
        // told apart by their shape.
        let media_type = media_type_of(&bytes).ok_or_else(|| RegistryError::Permanent {
            what: what.clone(),
            message: "not a JSON image manifest or index".into(),
        })?;
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// A small blob (an image config), digest verified: from the first
    /// mirror that answers, else the registry.
    pub async fn blob(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        self.first_answer("blob", |c| c.pull, |c| c.blob_here(digest))
            .await
    }

    async fn blob_here(&self, digest: &str) -> Result<Vec<u8>, RegistryError> {
        let what = format!("blob {}@{digest}", self.reference.repository());
        let url = self.bounded.url(&self.reference, "blobs", digest);
        let (bytes, _) = self
            .retry(&what, || {
                let target = self.target(&self.reference);
                let (url, what) = (&url, &what);
                async move {
                    self.bounded
                        .get(&target, url, "", MAX_METADATA_LEN as usize, what)
                        .await
                }
            })
            .await?;
        let actual = digest_of(&bytes);
        if actual != digest {
            return Err(RegistryError::Permanent {
                what,
                message: format!("content has digest {actual}"),
            });
        }
        Ok(bytes.to_vec())
    }

    /// A whole blob of `size` bytes (as its descriptor says) into `path`
    /// (created or truncated), digest verified, from the first mirror that
    /// answers, else the registry. More than `size` bytes is a permanent
    /// error: a registry cannot fill the disk with one blob.
    pub async fn blob_to_file(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<(), RegistryError> {
        self.first_answer(
            "blob",
            |c| c.pull,
            |c| c.blob_to_file_here(digest, size, path),
        )
        .await
    }

    async fn blob_to_file_here(
        &self,
        digest: &str,
        size: u64,
        path: &Path,
    ) -> Result<(), RegistryError> {
        let what = format!("blob {}@{digest}", self.reference.repository());
        let url = self.bounded.url(&self.reference, "blobs", digest);
        let (len, actual) = self
            .retry(&what, || {
                let target = self.target(&self.reference);
                let (url, what) = (&url, &what);
                async move {
                    let mut file = tokio::fs::File::create(path).await.map_err(|source| {
                        RegistryError::Io {
                            what: format!("creating {}", path.display()),
                            source,
                        }
                    })?;
                    self.bounded
                        .to_file(&target, url, size, &mut file, what)
                        .await
                }
            })
            .await?;
        if actual != digest || len != size {
            return Err(RegistryError::Permanent {
                what,
                message: format!("content has digest {actual} and {len} bytes, not {size}"),
            });
        }
        Ok(())
    }

    /// The bytes `range` of blob `digest`, as they arrive: at most the range
    /// (a registry that ignores Range has the rest of its answer skipped and
    /// cut off, never buffered); a short body ends early, which the caller
    /// sees by counting. An error answer is read only for its message
    /// (4 KiB). Asked of the first mirror that answers, else the registry.
    pub async fn blob_range_stream(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<BlobStream, RegistryError> {
        self.first_answer(
            "blob range",
            |c| c.pull,
            |c| c.blob_range_stream_here(digest, range.clone()),
        )
        .await
    }

    async fn blob_range_stream_here(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<BlobStream, RegistryError> {
        let what = format!(
            "blob {}@{digest} bytes {}-{}",
            self.reference.repository(),
            range.start,
            range.end
        );
        let len = range.end.saturating_sub(range.start);
        let url = self.bounded.url(&self.reference, "blobs", digest);
        let target = self.target(&self.reference);
        let response = self
            .bounded
            .range(&target, &url, range.clone(), &what)
            .await?;
        let skip = if response.status() == reqwest::StatusCode::PARTIAL_CONTENT {
            0
        } else {
            warn!("{what}: the registry ignored the Range header");
            range.start
        };
        let body = response
            .bytes_stream()
            .map(|piece| piece.map_err(std::io::Error::other));
        Ok(window(Box::pin(body), skip, len)
            .map(move |piece| {
                piece.map_err(|e| RegistryError::Transient {
                    what: what.clone(),
                    message: e.to_string(),
                })
            })
            .boxed())
    }

    /// [`blob_range_stream`](Self::blob_range_stream), collected: exactly
    /// the range's bytes or an error.
    pub async fn blob_range(
        &self,
        digest: &str,
        range: Range<u64>,
    ) -> Result<Bytes, RegistryError> {
        let len = range.end.saturating_sub(range.start);
        let what = format!(
            "blob {}@{digest} bytes {range:?}",
            self.reference.repository()
        );
        let mut stream = self.blob_range_stream(digest, range).await?;
        let mut out = BytesMut::new();
        while let Some(piece) = stream.next().await {
            out.extend_from_slice(&piece?);
        }
        if out.len() as u64 != len {
            return Err(RegistryError::Transient {
                what,
                message: format!("got {} bytes", out.len()),
            });
        }
        Ok(out.freeze())
    }

    /// Pushes `path` as blob `digest` (which the caller computed) unless the
    /// registry already has it.
    pub async fn push_blob_file(&self, digest: &str, path: &Path) -> Result<(), RegistryError> {
        let what = format!("pushing {} as {digest}", path.display());
        let io = |source| RegistryError::Io {
            what: what.clone(),
            source,
        };
        let size = std::fs::metadata(path).map_err(io)?.len();
        // Streamed from the file, opened again for every request sent.
        let body = || {
            let file = std::fs::File::open(path).map_err(io)?;
            let stream = tokio_util::io::ReaderStream::with_capacity(
                tokio::fs::File::from_std(file),
                1 << 20,
            );
            Ok(reqwest::Body::wrap_stream(stream))
        };
        self.push_blob_with(digest, size, body, &what).await
    }

    /// Pushes a small blob; returns its digest.
    pub async fn push_blob(&self, bytes: &[u8]) -> Result<String, RegistryError> {
        let digest = digest_of(bytes);
        let what = format!("pushing blob {digest}");
        let data = Bytes::copy_from_slice(bytes);
        let body = || Ok(reqwest::Body::from(data.clone()));
        self.push_blob_with(&digest, data.len() as u64, body, &what)
            .await?;
        Ok(digest)
    }

    /// Uploads blob `digest` unless the registry has it, retried.
    async fn push_blob_with(
        &self,
        digest: &str,
        len: u64,
        body: impl Fn() -> Result<reqwest::Body, RegistryError>,
        what: &str,
    ) -> Result<(), RegistryError> {
        let target = self.target(&self.reference);
        self.retry(what, || async {
            if self.bounded.has_blob(&target, digest, what).await? {
                return Ok(());
            }
            self.bounded
                .upload_blob(&target, digest, len, &body, what)
                .await
        })
        .await
    }

    /// Pushes a manifest under the reference's tag; returns its digest.
    pub async fn push_manifest(
        &self,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        self.push_manifest_to(&self.reference, bytes, media_type)
            .await
    }

    /// Pushes a manifest by its digest only (an index's entry).
    pub async fn push_manifest_by_digest(
        &self,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        self.push_manifest_to(&self.by_digest(&digest_of(bytes)), bytes, media_type)
            .await
    }

    async fn push_manifest_to(
        &self,
        reference: &Reference,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, RegistryError> {
        let what = format!("pushing manifest {}", reference.whole());
        let data = Bytes::copy_from_slice(bytes);
        let target = self.target(reference);
        let name = manifest_name(reference);
        self.retry(&what, || {
            self.bounded
                .put_manifest(&target, &name, data.clone(), media_type, &what)
        })
        .await?;
        Ok(digest_of(bytes))
    }

    fn by_digest(&self, digest: &str) -> Reference {
        Reference::with_digest(
            self.reference.registry().to_owned(),
            self.reference.repository().to_owned(),
            digest.to_owned(),
        )
    }

    /// Runs `op` until it succeeds, fails for good, or [`ATTEMPTS`] ran;
    /// transient failures wait 200 ms, then four times longer each.
    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, RegistryError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = Duration::from_millis(200);
        for attempt in 1.. {
            match op().await {
                Err(e) if attempt < ATTEMPTS && e.is_transient() => {
                    warn!("{what}: attempt {attempt} failed, retrying in {delay:?}: {e}");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                }
                done => return done,
            }
        }
        unreachable!("the loop returns on its last attempt")
    }
}

/// What `reference` names in `/v2/NAME/manifests/`: its digest, else its tag.
fn manifest_name(reference: &Reference) -> String {
    reference
        .digest()
        .or(reference.tag())
        .unwrap_or("latest")
        .to_owned()
}

/// The bytes of a blob range, in order, as the registry sends them.
pub type BlobStream = futures_util::stream::BoxStream<'static, Result<Bytes, RegistryError>>;

/// Bytes `[skip, skip + len)` of `stream`: what comes before is dropped, what
/// comes after is never read.
fn window<S>(
    stream: S,
    skip: u64,
    len: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    S: futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send + Unpin,
{
    futures_util::stream::unfold(
        (stream, 0u64, 0u64),
        move |(mut stream, mut pos, mut sent)| async move {
            while sent < len {
                let mut piece = match stream.next().await? {
                    Ok(piece) => piece,
                    Err(e) => return Some((Err(e), (stream, pos, len))),
                };
                let start = pos;
                pos += piece.len() as u64;
                if pos <= skip {
                    continue;
                }
                let from = skip.saturating_sub(start) as usize;
                let piece = piece.split_off(from);
                let take = (len - sent).min(piece.len() as u64) as usize;
                sent += take as u64;
                return Some((Ok(piece.slice(..take)), (stream, pos, sent)));
            }
            None
        },
    )
}

/// The media type a manifest declares, or the one its shape implies.
fn media_type_of(bytes: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        manifests: Option<serde_json::Value>,
        layers: Option<serde_json::Value>,
    }
    let p: Probe = serde_json::from_slice(bytes).ok()?;
    match (p.media_type, p.manifests, p.layers) {
        (Some(m), _, _) => Some(m),
        (None, Some(_), _) => Some(MEDIA_OCI_INDEX.to_owned()),
        (None, None, Some(_)) => Some(MEDIA_OCI_MANIFEST.to_owned()),
        _ => None,
    }
}

/// reqwest is built without a default TLS crypto provider so that one is
/// chosen here, once: ring, which builds without cmake or a C++ toolchain.
pub(crate) fn install_crypto_provider() {
    // Fails only when a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_types_from_shape() {
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"manifests":[]}"#).as_deref(),
            Some(MEDIA_OCI_INDEX)
        );
        assert_eq!(
            media_type_of(br#"{"schemaVersion":2,"config":{},"layers":[]}"#).as_deref(),
            Some(MEDIA_OCI_MANIFEST)
        );
        assert_eq!(
            media_type_of(format!(r#"{{"mediaType":"{MEDIA_DOCKER_LIST}"}}"#).as_bytes())
                .as_deref(),
            Some(MEDIA_DOCKER_LIST)
        );
        assert_eq!(media_type_of(b"<html>"), None);
    }

    #[test]
    fn bad_references_are_errors() {
        let e = RegistryClient::new("UPPER/Case:tag", &RegistryOptions::default());
        assert!(matches!(e, Err(RegistryError::BadReference { .. })));
    }
}
