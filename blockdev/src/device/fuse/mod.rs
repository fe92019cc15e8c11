//! The FUSE filesystem: one flat read-only directory with one file per
//! attached layer, and the session that serves it, which can outlive the
//! daemon and be resumed by the next one.
//!
//! # Why a FUSE server of our own
//!
//! Resuming a session means serving an already initialised `/dev/fuse`
//! descriptor without INIT (the kernel did INIT with the previous daemon)
//! and sending `FUSE_NOTIFY_RESEND`. `fuser` (what we used before) always
//! performs INIT and has neither. `fuse-backend-rs` (Nydus's) has both, but
//! answers every request before `handle_message` returns: a read that must
//! fetch would hold a FUSE thread for up to the read deadline, where we
//! answer misses from the tokio runtime and keep the FUSE threads for
//! cached reads; it also brings nix 0.24, vm-memory and a virtio stack. A
//! patched, vendored fuser is ~11k lines to carry for a two-line change.
//! Our filesystem needs fourteen opcodes of a stable kernel ABI, so the
//! server is written here ([`abi`], [`channel`], [`ops`], [`session`]).
//!
//! # Crash and handover rules
//!
//! 1. A session's descriptors are every `/dev/fuse` fd a FUSE thread reads
//!    (the session fd and its clones) and a sealed memfd with what INIT
//!    negotiated and which mount they serve. All of them go to the fd store
//!    as soon as the session exists, and leave it only when it is
//!    unmounted. While the store holds them the kernel keeps the connection
//!    (and every request in it) alive: a reader waits, it does not fail.
//! 2. A request read but not answered stays on the processing list of the
//!    descriptor it was read from. The store holds every descriptor, so no
//!    such request is ever dropped by the kernel when a daemon dies; the
//!    next daemon sends `FUSE_NOTIFY_RESEND` before any of its threads
//!    reads, and the kernel queues them again (marked as resent).
//! 3. A late reply of a daemon that handed over finds its request gone
//!    (resent requests left that list) and the kernel refuses it: a request
//!    is never answered twice.
//! 4. Inode numbers come from layer names, so the next daemon serves the
//!    files the kernel (and the loop devices on them) already know. Until a
//!    layer is attached again its requests wait ([`LayerFiles::restoring`]);
//!    when the restore ends, the rest fail (reads with EIO).
//! 5. A session is resumed only if the memfd says it serves this mount
//!    (same path, same superblock) and the kernel offered resend (Linux
//!    6.9+). Anything else is discarded, which aborts the connection, and
//!    the node recovers the old way (`orphans.rs`).

pub mod abi;
mod channel;
mod files;
mod ops;
mod session;

pub use files::{inode_of, LayerFiles};
pub(in crate::device) use session::MAX_READAHEAD;
pub use session::{FuseMount, SessionState, STATE_FD};
