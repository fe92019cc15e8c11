//! The lazy block device: each attached layer is a file in our FUSE
//! filesystem, a read-only loop device on that file, and EROFS mounted from
//! the loop device. [`LayerManager`] is the API the snapshotter and `lazybd
//! mount` use.
//!
//! Layout under the root:
//!
//! ```text
//! root/fuse/<layer>         the FUSE file of each attached layer (one FUSE mount)
//! root/layers/<layer>/      index, image, chunks.map, prefetch: the layer's cache (kept across detach)
//! root/mnt/<layer>/         the layer's EROFS mount
//! ```
//!
//! Layers are keyed by their identity ([`LayerId`](crate::oci::LayerId):
//! the anchor, not the blob digest, see docs/security.md), and `<layer>` is
//! its file name (`sha256-<anchor hex>`, or `unanchored-sha256-<blob hex>`):
//! two images that name one blob digest with different anchors never share
//! an attachment or a cache. Attaching again after a restart on the same
//! root reuses the saved index (checked against the anchor again) and cache. Every attach
//! step registers its undo, so a failure at any step leaves nothing behind;
//! detach unmounts EROFS, lets the loop device clear itself, removes the
//! FUSE file and closes the cache cleanly.
//!
//! A layer whose cache is complete is *local*: its loop device reads the
//! cache's image file directly (switched with `LOOP_CHANGE_FD` once the last
//! chunk arrived, or attached that way when the cache was complete already),
//! and FUSE and this process are out of its data path.
//!
//! The FUSE session outlives the daemon when an fd store keeps its
//! descriptors (`fdstore.rs`, `holder.rs`): the next daemon resumes it and
//! adopts the mounts (`resume.rs`), so reads wait through a restart instead
//! of failing.
//!
//! Files by role: `manager.rs` is the facade and owns the state; one file per
//! operation: `attach.rs` (with its blocking steps), `detach.rs` (and
//! shutdown), `prefetch.rs` (the background jobs), `trace.rs` (record and
//! replay startup traces), `warm.rs` (a layer's startup part into the page
//! cache), `handoff.rs` (to the local file, and the periodic
//! persist), `resume.rs` (restart and handover); `table.rs` is the
//! attachment table and the status it reports, `config.rs` and `error.rs`
//! the public settings and errors. Below them: `fuse/` (our FUSE server),
//! `fdstore.rs` and `holder.rs`, `loopdev.rs`, `mounts.rs`, `orphans.rs`,
//! `eviction.rs`, `undo.rs`.

mod attach;
mod config;
mod detach;
mod error;
pub mod eviction;
pub mod fdstore;
pub mod fuse;
mod handoff;
pub mod holder;
pub mod loopdev;
mod manager;
pub mod mounts;
mod orphans;
mod prefetch;
mod readahead;
mod resume;
mod table;
mod trace;
mod undo;
mod warm;

pub use config::{AttachStep, NodeConfig};
pub use error::DeviceError;
pub use fdstore::FdStoreKind;
pub use manager::LayerManager;
pub use prefetch::PrefetchStart;
pub use table::{AttachedLayer, LayerState, LayerStatus};
