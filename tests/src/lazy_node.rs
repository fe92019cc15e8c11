//! A node with lazybd on it, as the containerd-level snapshotter tests need
//! one: a registry with the rich image and its conversion, lazybd-snapshotter
//! reading it over plain HTTP and following the task events of a private
//! containerd, which has the snapshotter as its `lazybd` proxy plugin: under
//! CRI, or driven by `ctr` and `lazybd pull` in namespace `default`.

use crate::containerd::Containerd;
use crate::images::{registry_with_lazy_rich, LazyImage};
use crate::registry::Registry;
use crate::snapshotter::{plain_http_config, SnapshotterDaemon};

/// Fields drop in order: containerd first, then the snapshotter (lazy layers
/// are served by it and must outlive the containers on them), then the
/// registry and the files.
pub struct LazyNode {
    pub ctd: Containerd,
    pub snapshotter: SnapshotterDaemon,
    pub img: LazyImage,
    pub registry: Registry,
    pub tmp: tempfile::TempDir,
}

impl LazyNode {
    /// containerd with CRI on lazybd (`snapshotter = "lazybd"`, snapshot
    /// annotations on); `snapshotter_config` is appended to the
    /// snapshotter's config.
    pub fn with_cri(snapshotter_config: &str) -> LazyNode {
        Self::start(snapshotter_config, |ctd, registry| {
            ctd.cri_snapshotter("lazybd")
                .plain_http_registry(&registry.host())
        })
    }

    /// containerd without CRI, `ctr` in namespace `default` (where `lazybd
    /// pull` puts images).
    pub fn with_ctr(snapshotter_config: &str) -> LazyNode {
        Self::start(snapshotter_config, |ctd, _| ctd.namespace("default"))
    }

    fn start(
        snapshotter_config: &str,
        containerd: impl FnOnce(
            crate::containerd::ContainerdBuilder,
            &Registry,
        ) -> crate::containerd::ContainerdBuilder,
    ) -> LazyNode {
        let (tmp, registry, img) = registry_with_lazy_rich();
        // The snapshotter starts first (containerd's proxy plugin dials it),
        // so it learns containerd's socket before containerd runs, and
        // connects to it once it does.
        let ctd_dir = crate::containerd::new_dir();
        let events = format!(
            "[containerd]\naddress = \"{}\"\n",
            crate::containerd::socket_in(ctd_dir.path()).display()
        );
        let snapshotter = SnapshotterDaemon::start(
            &tmp.path().join("snapshotter"),
            &(plain_http_config(&registry) + &events + snapshotter_config),
        );
        let builder = Containerd::builder()
            .in_dir(ctd_dir)
            .proxy_snapshotter(snapshotter.proxy());
        let ctd = containerd(builder, &registry).start();
        LazyNode {
            ctd,
            snapshotter,
            img,
            registry,
            tmp,
        }
    }

    /// `lazybd pull --plain-http` of `image` into this node's containerd.
    pub fn pull(&self, image: &str) -> String {
        self.ctd.lazybd_pull(image)
    }
}
