//! How a node's layer manager is set up ([`NodeConfig`]), and the attach
//! steps a test can make fail.

use std::path::PathBuf;
use std::time::Duration;

use crate::fetch::FetchConfig;

/// How long detach waits for the kernel to clear a loop device.
pub(super) const LOOP_CLEAR_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Cache, FUSE mount and EROFS mounts live here; one manager per root.
    pub root: PathBuf,
    pub fetch: FetchConfig,
    /// How often new chunks' bits are made durable (a crash loses at most
    /// this much fetching, never correctness).
    pub persist_interval: Duration,
    /// Loop devices read the FUSE file with O_DIRECT: one page cache (the
    /// block device's) instead of two, and with FUSE async DIO several reads
    /// in flight; about 4x the sequential throughput of buffered loop reads
    /// when the cache is in memory (docs/benchmarks.md).
    pub loop_direct_io: bool,
    /// Readahead of the loop device of a complete layer in KiB (more 1 MiB
    /// reads in flight for sequential readers); 0 keeps the kernel default.
    pub read_ahead_kb: u32,
    /// Readahead of the loop device of a layer that is not complete, in KiB
    /// at most (0: none), until its handoff raises it to `read_ahead_kb`.
    /// With `lazy_read_ahead_follows_link` the link decides below that
    /// ([`readahead`](super::readahead)): readahead of a lazy layer fetches
    /// what may never be read (a container's start reads 13.5 MiB of the
    /// python image with none, 19.7 MiB at 128 KiB), which a slow link pays
    /// for, while on a fast one larger reads, some of them ahead of the
    /// reader, save more than the bytes cost (docs/benchmarks.md).
    pub lazy_read_ahead_kb: u32,
    /// The readahead of lazy layers follows the link estimate, up to
    /// `lazy_read_ahead_kb`; off: always `lazy_read_ahead_kb` (a recording
    /// that must not depend on the link).
    pub lazy_read_ahead_follows_link: bool,
    /// FUSE request threads (reads of cached chunks run on them).
    pub fuse_threads: usize,
    /// Once a lazy layer's startup stream has brought the narrow part of
    /// its prefetch area, read it into the page cache of the layer's files
    /// ahead of the container ([`warm`](super::warm)); off: the container's
    /// reads go through FUSE one readahead at a time (and a recording, which
    /// must see them, keeps it off).
    pub warm_startup: bool,
    /// Fault injection for tests: fail the attach right before this step.
    pub fail_attach_at: Option<AttachStep>,
    /// Bandwidth of all background prefetches together, bytes per second;
    /// 0 = unlimited. On-demand reads are never limited.
    pub prefetch_rate: u64,
    /// Complete layers read their local cache file instead of FUSE. Off only
    /// to measure the FUSE path (the read benchmark).
    pub handoff: bool,
    /// Where the FUSE session's descriptors wait while no daemon runs, so
    /// that the next one resumes it (docs/operations.md).
    pub fd_store: super::FdStoreKind,
}

impl NodeConfig {
    /// `lazy_read_ahead_kb` unless configured.
    pub const LAZY_READ_AHEAD_KB: u32 = crate::fetch::LazyReadAhead::DEFAULT_MAX_KB;

    pub fn new(root: impl Into<PathBuf>) -> Self {
        NodeConfig {
            root: root.into(),
            fetch: FetchConfig::default(),
            persist_interval: Duration::from_secs(1),
            loop_direct_io: true,
            read_ahead_kb: 4096,
            lazy_read_ahead_kb: Self::LAZY_READ_AHEAD_KB,
            lazy_read_ahead_follows_link: true,
            fuse_threads: 2,
            warm_startup: true,
            fail_attach_at: None,
            prefetch_rate: 0,
            handoff: true,
            fd_store: super::FdStoreKind::None,
        }
    }

    /// Where the caches of all layers live.
    pub fn caches_dir(&self) -> PathBuf {
        self.root.join("layers")
    }

    /// Where the cache of the layer whose file name is `name` lives.
    pub fn cache_dir(&self, name: &str) -> PathBuf {
        self.caches_dir().join(name)
    }

    /// Where the FUSE file system is mounted: one file per lazy layer.
    pub fn fuse_dir(&self) -> PathBuf {
        self.root.join("fuse")
    }

    /// The FUSE file of the layer whose file name is `name`.
    pub fn fuse_file(&self, name: &str) -> PathBuf {
        self.fuse_dir().join(name)
    }

    /// Where the layers' EROFS mounts are.
    pub fn mounts_dir(&self) -> PathBuf {
        self.root.join("mnt")
    }

    /// The EROFS mount of the layer whose file name is `name`.
    pub fn mountpoint(&self, name: &str) -> PathBuf {
        self.mounts_dir().join(name)
    }
}

/// The steps of an attach, in order (for fault injection).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachStep {
    /// Adding the layer's file to the FUSE directory.
    FuseFile,
    /// Attaching the loop device.
    Loop,
    /// Mounting EROFS.
    Mount,
    /// After everything succeeded (tests the final rollback).
    Register,
}
