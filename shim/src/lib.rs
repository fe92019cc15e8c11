//! containerd-shim-lazybd-v2.
