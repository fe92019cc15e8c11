//! The daemon's TOML configuration (docs/snapshotter.md lists every key).
//! Unknown keys are errors: a typo must not silently fall back to a default.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Snapshots, metadata and the lazy layers' caches.
    pub root: PathBuf,
    /// The Snapshots gRPC socket containerd's proxy plugin dials.
    pub address: PathBuf,
    /// The control API socket (the shim's task events, `lazybd layers`).
    pub control_address: PathBuf,
    /// Users besides root that may use the control API (the shim and
    /// `lazybd layers` run as root). Empty: the socket is 0600 for root;
    /// otherwise 0666, and each caller's uid is checked (SO_PEERCRED).
    pub control_allowed_uids: Vec<u32>,
    /// `host:port` for Prometheus metrics at `/metrics`; empty: none.
    pub metrics_address: String,
    /// Reads of lazy layers that no source can serve fail with EIO after
    /// this many seconds instead of hanging the container.
    pub read_deadline_secs: u64,
    /// Readahead (KiB) of a lazy layer's device until the layer is
    /// complete, at most: below this it follows the link (half a round
    /// trip's worth, none on a slow link), since readahead of a lazy layer
    /// fetches what may never be read; 0: none. Startup profiles must be
    /// recorded with at least this (`lazybd convert --record-read-ahead-kb`).
    pub lazy_read_ahead_kb: u32,
    /// Read the part of a lazy layer its container reads first into the
    /// page cache once it has arrived, ahead of the container
    /// (docs/blockdev.md#warming).
    pub warm_startup: bool,
    pub registry: RegistryConfig,
    /// What the remote (lazy) path accepts (docs/security.md).
    pub remote: RemoteConfig,
    pub prefetch: PrefetchConfig,
    pub cache: CacheConfig,
    /// Startup traces (docs/snapshotter.md#startup-traces).
    pub trace: crate::traces::TraceConfig,
    /// P2P distribution (docs/p2p.md); absent: registry only.
    pub p2p: Option<lazybd_blockdev::p2p::P2pConfig>,
    /// The CRI image-service proxy that keeps kubelet's pull credentials;
    /// absent: credentials come from the docker config only.
    pub cri_keychain: Option<crate::cri_keychain::CriKeychainConfig>,
    /// containerd, whose task events start the prefetch and the traces of
    /// containers under any runtime.
    pub containerd: ContainerdConfig,
    /// How the FUSE session survives a restart (docs/operations.md).
    pub restart: RestartConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdConfig {
    /// containerd's gRPC socket; its `/tasks/start` and `/tasks/exit`
    /// events act like the task events of `containerd-shim-lazybd-v2`, so
    /// containers under `io.containerd.runc.v2` get the same prefetch,
    /// handoff and traces. Empty: not watched (only our shim reports).
    pub address: PathBuf,
    /// The containerd namespaces watched; empty: all.
    pub namespaces: Vec<String>,
    /// The name containerd knows this snapshotter by (`[proxy_plugins.NAME]`):
    /// containers on other snapshotters are left alone.
    pub snapshotter: String,
}

impl Default for ContainerdConfig {
    fn default() -> Self {
        ContainerdConfig {
            address: "/run/containerd/containerd.sock".into(),
            namespaces: Vec::new(),
            snapshotter: "lazybd".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RestartConfig {
    /// Where the FUSE session's descriptors wait while the daemon is down:
    /// `auto` (systemd's fd store when systemd runs us, else the fd holder
    /// if its socket exists, else none), `systemd`, `holder` or `none`.
    pub fd_store: String,
    /// The socket of `lazybd fd-holder`.
    pub fd_holder: PathBuf,
}

impl Default for RestartConfig {
    fn default() -> Self {
        RestartConfig {
            fd_store: "auto".into(),
            fd_holder: lazybd_blockdev::device::holder::DEFAULT_SOCKET.into(),
        }
    }
}

impl RestartConfig {
    pub fn fd_store(&self) -> anyhow::Result<lazybd_blockdev::device::FdStoreKind> {
        lazybd_blockdev::device::FdStoreKind::parse(&self.fd_store, &self.fd_holder)
            .map_err(|e| anyhow::anyhow!("[restart] {e}"))
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RemoteConfig {
    /// Attach version 1 layers lazily, which carry no content anchor:
    /// nothing then ties the bytes served for them to their image, so every
    /// registry, mirror, super node and peer that serves them must be
    /// trusted. Off: Prepare refuses them with an error naming this key.
    pub allow_unanchored_layers: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PrefetchConfig {
    /// A `task-start` event fetches every lazy layer of that container fully
    /// in the background; complete layers then read the local cache file.
    pub on_task_start: bool,
    /// Bandwidth of all background prefetches together, bytes per second;
    /// 0 = unlimited. On-demand reads are never limited and always go first.
    pub rate_bytes_per_sec: u64,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        PrefetchConfig {
            on_task_start: true,
            rate_bytes_per_sec: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Disk space for the chunk caches of all lazy layers; 0 = unlimited.
    /// The default, 20 GiB, keeps a node that never set it from filling
    /// its disk with the caches of images it no longer runs.
    /// Over it, caches of detached layers are removed, least recently used
    /// first; caches of attached layers are never removed.
    pub capacity_bytes: u64,
    /// How often the capacity is enforced (besides after every detach).
    pub evict_interval_secs: u64,
}

/// 20 GiB: room for the layers a node runs, bounded on every node.
pub const DEFAULT_CACHE_CAPACITY: u64 = 20 << 30;

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity_bytes: DEFAULT_CACHE_CAPACITY,
            evict_interval_secs: 60,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Registries (`host[:port]`) spoken to over plain HTTP; all others use
    /// HTTPS.
    pub plain_http: Vec<String>,
    /// Docker config file with registry credentials (default
    /// `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`).
    pub docker_config: Option<PathBuf>,
    /// containerd's registry host configuration, its `config_path` (e.g.
    /// `/etc/containerd/certs.d`): each registry's `hosts.toml` names its
    /// mirrors (range reads go to them first, in order), CAs and
    /// `skip_verify`, as for containerd. Unset: none.
    pub config_path: Option<PathBuf>,
    /// Credentials of CRI pulls (`[cri_keychain]`), used before the docker
    /// config's; set at startup, not a config key.
    #[serde(skip)]
    pub keychain: Option<std::sync::Arc<crate::cri_keychain::Keychain>>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            root: "/var/lib/lazybd-snapshotter".into(),
            address: "/run/lazybd/snapshotter.sock".into(),
            control_address: "/run/lazybd/control.sock".into(),
            control_allowed_uids: Vec::new(),
            metrics_address: "127.0.0.1:9880".into(),
            read_deadline_secs: 60,
            lazy_read_ahead_kb: lazybd_blockdev::device::NodeConfig::LAZY_READ_AHEAD_KB,
            warm_startup: true,
            registry: RegistryConfig::default(),
            remote: RemoteConfig::default(),
            prefetch: PrefetchConfig::default(),
            cache: CacheConfig::default(),
            trace: crate::traces::TraceConfig::default(),
            p2p: None,
            cri_keychain: None,
            containerd: ContainerdConfig::default(),
            restart: RestartConfig::default(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> anyhow::Result<Config> {
        use anyhow::Context;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("config {}", path.display()))
    }

    pub fn read_deadline(&self) -> Duration {
        Duration::from_secs(self.read_deadline_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: Config =
            toml::from_str("root = \"/r\"\n[registry]\nplain_http = [\"127.0.0.1:5000\"]\n")
                .unwrap();
        assert_eq!(c.root, PathBuf::from("/r"));
        assert_eq!(c.read_deadline_secs, 60);
        assert_eq!(c.registry.plain_http, ["127.0.0.1:5000"]);
        assert!(c.prefetch.on_task_start);
        assert_eq!(c.cache.capacity_bytes, 20 << 30);
        let c: Config = toml::from_str(
            "[prefetch]\non_task_start = false\nrate_bytes_per_sec = 1048576\n\
             [cache]\ncapacity_bytes = 10737418240\n",
        )
        .unwrap();
        assert!(!c.prefetch.on_task_start);
        assert_eq!(c.prefetch.rate_bytes_per_sec, 1 << 20);
        assert_eq!(c.cache.capacity_bytes, 10 << 30);
        assert_eq!(c.cache.evict_interval_secs, 60);
        assert!(toml::from_str::<Config>("[cache]\ncapacity = 1\n").is_err());
        assert!(c.trace.record && c.trace.replay);
        assert_eq!(c.trace.record_secs, 10);
        let c: Config = toml::from_str("[trace]\nrecord = false\nrecord_secs = 3\n").unwrap();
        assert!(!c.trace.record && c.trace.replay);
        assert_eq!(c.trace.record_secs, 3);
        assert!(toml::from_str::<Config>("[trace]\nrecord_sec = 3\n").is_err());
        assert_eq!(c.restart.fd_store, "auto");
        let c: Config =
            toml::from_str("[restart]\nfd_store = \"holder\"\nfd_holder = \"/h\"\n").unwrap();
        assert_eq!(
            c.restart.fd_store().unwrap(),
            lazybd_blockdev::device::FdStoreKind::Holder("/h".into())
        );
        let c: Config = toml::from_str("[restart]\nfd_store = \"sometimes\"\n").unwrap();
        assert!(c.restart.fd_store().is_err());
        assert!(!c.remote.allow_unanchored_layers);
        let c: Config = toml::from_str("[remote]\nallow_unanchored_layers = true\n").unwrap();
        assert!(c.remote.allow_unanchored_layers);
        assert!(toml::from_str::<Config>("[remote]\nallow_unanchored = true\n").is_err());
        // A stock node: containerd's default socket, every namespace.
        assert_eq!(
            c.containerd.address,
            PathBuf::from("/run/containerd/containerd.sock")
        );
        assert!(c.containerd.namespaces.is_empty());
        assert_eq!(c.containerd.snapshotter, "lazybd");
        let c: Config =
            toml::from_str("[containerd]\naddress = \"\"\nnamespaces = [\"k8s.io\"]\n").unwrap();
        assert_eq!(c.containerd.address, PathBuf::new());
        assert_eq!(c.containerd.namespaces, ["k8s.io"]);
        assert!(toml::from_str::<Config>("[containerd]\nsocket = \"/x\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml::from_str::<Config>("rot = \"/r\"\n").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        assert!(toml::from_str::<Config>("[registry]\nplain = []\n").is_err());
    }
}
