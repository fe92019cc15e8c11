//! containerd-shim-lazybd-v2: a containerd runtime v2 shim over runc.
//!
//! The flow of a request: `server` accepts it on the ttrpc socket and hands it
//! to `service` (the Task service), which works on a `container` and its
//! `process`es through `runc`; exits come from the `reaper`, events go out
//! through `events`, and the `hook` tells the lazybd snapshotter about task
//! starts and exits.

pub mod console;
pub mod container;
pub mod delete;
pub mod error;
pub mod events;
pub mod hook;
pub mod metrics;
pub mod oom;
pub mod options;
pub mod process;
pub mod reaper;
pub mod runc;
pub mod server;
pub mod service;
pub mod start;

/// The runtime name containerd users select this shim with.
pub const RUNTIME_NAME: &str = "io.containerd.lazybd.v2";
