//! Registry flags shared by the subcommands that talk to a registry.

use std::ffi::OsString;
use std::path::PathBuf;

use lazybd_blockdev::registry::RegistryOptions;

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
    /// containerd's registry host configuration directory (its
    /// `config_path`, e.g. /etc/containerd/certs.d): mirrors, CAs and
    /// skip_verify from each registry's hosts.toml, as `ctr --hosts-dir`.
    #[arg(long, value_name = "DIR")]
    pub hosts_dir: Option<PathBuf>,
}

impl RegistryArgs {
    pub fn options(&self) -> RegistryOptions {
        RegistryOptions {
            plain_http: self.plain_http,
            docker_config: self.docker_config.clone(),
            hosts_dir: self.hosts_dir.clone(),
            ..RegistryOptions::default()
        }
    }

    /// The same flags, to pass on to a child `lazybd` process.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = Vec::new();
        if self.plain_http {
            args.push("--plain-http".into());
        }
        if let Some(c) = &self.docker_config {
            args.push("--docker-config".into());
            args.push(c.into());
        }
        if let Some(d) = &self.hosts_dir {
            args.push("--hosts-dir".into());
            args.push(d.into());
        }
        args
    }
}
