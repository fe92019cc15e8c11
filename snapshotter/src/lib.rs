//! lazybd-snapshotter: a containerd snapshotter (proxy plugin) that
//! behaves like containerd's overlayfs snapshotter for ordinary layers and
//! attaches lazybd layers lazily instead of letting containerd download
//! them (docs/snapshotter.md).

pub mod config;
pub mod containerd_events;
pub mod control;
pub mod cri_keychain;
pub mod error;
pub mod filter;
pub mod metrics;
pub mod mounts;
pub mod remote;
pub mod service;
pub mod store;
pub mod tasks;
pub mod traces;
