//! Registry flags shared by the subcommands that talk to a registry.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use lazybd_blockdev::convert::ImageStore;
use lazybd_blockdev::source::ChunkSource;
use oci_spec::image::ImageManifest;

#[derive(clap::Args)]
pub struct RegistryArgs {
    /// Talk plain HTTP to the registry (only for registries on loopback or a
    /// trusted network).
    #[arg(long)]
    pub plain_http: bool,
    /// Docker config file with registry credentials (default
    /// $DOCKER_CONFIG/config.json, then ~/.docker/config.json).
    #[arg(long)]
    pub docker_config: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn store(&self, reference: &str) -> Result<Box<dyn ImageStore>> {
        bail!("{reference}: registry references are not supported yet")
    }

    pub async fn image_sources(
        &self,
        reference: &str,
    ) -> Result<(ImageManifest, Vec<Arc<dyn ChunkSource>>)> {
        bail!("{reference}: registry references are not supported yet")
    }
}
