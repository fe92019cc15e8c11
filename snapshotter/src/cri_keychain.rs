//! The CRI keychain: registry credentials from kubelet's image pulls.
//!
//! kubelet sends an image's pull secret in CRI `PullImageRequest.auth` to
//! containerd, which never passes it to a proxy snapshotter. With
//! `[cri_keychain]`, kubelet's image service endpoint is this daemon: every
//! ImageService call is forwarded unchanged to containerd's CRI, and a
//! PullImage's credentials are kept for its repository first, so the
//! Prepares of that pull can fetch the lazybd layers with them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use containerd_snapshots::tonic::{self, transport::Channel, Request, Response, Status};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    AuthConfig, ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use lazybd_blockdev::registry::RegistryAuth;
use serde::Deserialize;
use tracing::{info, warn};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriKeychainConfig {
    /// The unix socket kubelet's `--image-service-endpoint` names.
    pub listen: PathBuf,
    /// containerd's CRI socket, where every call is forwarded.
    #[serde(default = "default_containerd_cri")]
    pub containerd_cri: PathBuf,
}

fn default_containerd_cri() -> PathBuf {
    "/run/containerd/containerd.sock".into()
}

/// Repositories with credentials kept; over it the map starts again (the
/// next pull of each image records its credentials anew).
const MAX_REPOSITORIES: usize = 4096;

/// Credentials per repository (`host/path`, normalized as containerd does).
#[derive(Default)]
pub struct Keychain {
    creds: Mutex<HashMap<String, (String, String)>>,
}

impl std::fmt::Debug for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.creds.lock().map(|c| c.len()).unwrap_or_default();
        f.debug_struct("Keychain")
            .field("repositories", &n)
            .finish()
    }
}

impl Keychain {
    /// Credentials a pull of `image_ref` brought, if any.
    pub fn get(&self, image_ref: &str) -> Option<RegistryAuth> {
        let repo = repository(image_ref)?;
        let creds = self.creds.lock().unwrap_or_else(|e| e.into_inner());
        creds
            .get(&repo)
            .map(|(user, password)| RegistryAuth::Basic(user.clone(), password.clone()))
    }

    fn record(&self, image_ref: &str, auth: &AuthConfig) {
        let Some(repo) = repository(image_ref) else {
            warn!("cri keychain: cannot parse image reference {image_ref:?}; its credentials are not kept");
            return;
        };
        let creds = if !auth.username.is_empty() {
            (auth.username.clone(), auth.password.clone())
        } else if !auth.identity_token.is_empty() {
            // As for a docker config's identity token (see
            // lazybd_blockdev::registry::credentials_for).
            ("<token>".to_owned(), auth.identity_token.clone())
        } else {
            // `auth` (base64) and `registry_token` are not used by kubelet's
            // pull secrets, which it splits into username and password.
            warn!("cri keychain: pull of {image_ref} has credentials without a username or identity token; not kept");
            return;
        };
        let mut map = self.creds.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_REPOSITORIES && !map.contains_key(&repo) {
            map.clear();
        }
        map.insert(repo, creds);
    }
}

/// `host/path` of an image reference, with docker.io's defaults applied as
/// containerd normalizes names (`busybox` -> `docker.io/library/busybox`),
/// tag and digest dropped.
fn repository(image_ref: &str) -> Option<String> {
    let name = image_ref.split('@').next()?;
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    if name.is_empty() {
        return None;
    }
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => (f, r.to_owned()),
        _ => ("docker.io", name.to_owned()),
    };
    let first = if first == "index.docker.io" {
        "docker.io"
    } else {
        first
    };
    let rest = if first == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    Some(format!("{first}/{rest}"))
}

/// The ImageService kubelet talks to: containerd's, with the keychain in
/// front of PullImage.
pub struct ImageProxy {
    upstream: ImageServiceClient<Channel>,
    keychain: std::sync::Arc<Keychain>,
}

impl ImageProxy {
    /// Connects lazily: containerd may start after this daemon.
    pub fn new(config: &CriKeychainConfig, keychain: std::sync::Arc<Keychain>) -> Self {
        let path = config.containerd_cri.clone();
        // The URI is required by tonic and unused: the connector dials the socket.
        let channel = tonic::transport::Endpoint::from_static("http://containerd-cri")
            .connect_with_connector_lazy(UnixConnector(path));
        ImageProxy {
            upstream: ImageServiceClient::new(channel),
            keychain,
        }
    }
}

#[derive(Clone)]
struct UnixConnector(PathBuf);

impl tonic::codegen::Service<tonic::codegen::http::Uri> for UnixConnector {
    type Response = tokio::net::UnixStream;
    type Error = std::io::Error;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: tonic::codegen::http::Uri) -> Self::Future {
        let path = self.0.clone();
        Box::pin(async move {
            tokio::net::UnixStream::connect(&path).await.map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("connecting to containerd's CRI at {}: {e}", path.display()),
                )
            })
        })
    }
}

/// The incoming request as one to containerd: same message and metadata
/// (kubelet's `grpc-timeout` bounds the forwarded call too; dropping the
/// incoming call when kubelet gives up cancels it).
fn forward<T>(request: Request<T>) -> Request<T> {
    let (metadata, extensions, message) = request.into_parts();
    Request::from_parts(metadata, extensions, message)
}

#[tonic::async_trait]
impl ImageService for ImageProxy {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        self.upstream.clone().list_images(forward(request)).await
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        self.upstream.clone().image_status(forward(request)).await
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let msg = request.get_ref();
        if let (Some(image), Some(auth)) = (&msg.image, &msg.auth) {
            self.keychain.record(&image.image, auth);
            info!(
                "cri keychain: credentials for {} kept for its pull",
                image.image
            );
        }
        self.upstream.clone().pull_image(forward(request)).await
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        self.upstream.clone().remove_image(forward(request)).await
    }

    async fn image_fs_info(
        &self,
        request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        self.upstream.clone().image_fs_info(forward(request)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_are_normalized_like_containerd() {
        for (r, want) in [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io/library/busybox"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox",
            ),
            ("me/app@sha256:abcd", "docker.io/me/app"),
            ("127.0.0.1:5000/rich:lazy", "127.0.0.1:5000/rich"),
            ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b"),
            ("localhost/x:1", "localhost/x"),
            (
                "reg.example.com/team/app:v1@sha256:ab",
                "reg.example.com/team/app",
            ),
        ] {
            assert_eq!(repository(r).as_deref(), Some(want), "{r}");
        }
        assert_eq!(repository(""), None);
    }

    #[test]
    fn credentials_are_kept_per_repository() {
        let k = Keychain::default();
        let auth = AuthConfig {
            username: "u".into(),
            password: "p".into(),
            ..Default::default()
        };
        k.record("127.0.0.1:5000/rich:lazy", &auth);
        assert!(matches!(
            k.get("127.0.0.1:5000/rich:other"),
            Some(RegistryAuth::Basic(u, p)) if u == "u" && p == "p"
        ));
        assert!(k.get("127.0.0.1:5000/poor:lazy").is_none());
        k.record("x:1", &AuthConfig::default());
        assert!(k.get("x:1").is_none());
    }
}
