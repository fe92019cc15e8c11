//! lazybd-snapshotter: filled by the snapshotter work (issue: containerd remote snapshotter).
