//! The CRI keychain: registry credentials from kubelet's image pulls.
//!
//! kubelet sends an image's pull secret in CRI `PullImageRequest.auth` to
//! containerd, which never passes it to a proxy snapshotter. With
//! `[cri_keychain]`, kubelet's image service endpoint is this daemon: every
//! ImageService call is forwarded unchanged to containerd's CRI. A
//! PullImage's credentials are tried for the Prepares of that pull while it
//! runs, and kept (on disk, for restarts) only once containerd reports the
//! pull succeeded ([`keychain`] says which credentials win).

mod file;
mod keychain;

use std::path::PathBuf;

use containerd_snapshots::tonic::{self, transport::Channel, Request, Response, Status};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::{
    ImageFsInfoRequest, ImageFsInfoResponse, ImageStatusRequest, ImageStatusResponse,
    ListImagesRequest, ListImagesResponse, PullImageRequest, PullImageResponse, RemoveImageRequest,
    RemoveImageResponse,
};
use serde::Deserialize;

pub use keychain::{repository, Keychain, PendingPull};

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
        // Dropped (the pull failed, or kubelet gave up and this future is
        // dropped): the credentials are no longer tried and never kept.
        let pending = match (&msg.image, &msg.auth) {
            (Some(image), Some(auth)) => self.keychain.begin_pull(&image.image, auth),
            _ => None,
        };
        let reply = self.upstream.clone().pull_image(forward(request)).await;
        if let (Ok(_), Some(pending)) = (&reply, pending) {
            pending.succeeded();
        }
        reply
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
