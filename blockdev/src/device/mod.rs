//! The lazy block device: each attached layer is a file in our FUSE
//! filesystem, a read-only loop device on that file, and EROFS mounted from
//! the loop device. [`LayerManager`] is the API the snapshotter and `lazybd
//! mount` use.

pub mod eviction;
pub mod fuse;
pub mod loopdev;
mod manager;
pub mod mounts;
mod orphans;
mod undo;

pub use manager::{
    AttachStep, AttachedLayer, DeviceError, LayerManager, LayerState, LayerStatus, NodeConfig,
    PrefetchStart,
};
