//! The lazy layer core of lazybd: a node reads a lazybd layer
//! (docs/format.md) without downloading it. See docs/blockdev.md and
//! docs/p2p.md.
//!
//! The flow of a read that misses: [`device`] serves it from a layer's FUSE
//! file (under a loop device and EROFS); the [`layer`] finds the chunks it
//! needs missing from its [`cache`]; the [`fetch`]er asks the layer's
//! [`source`]s in order (the peers and the super node of [`p2p`], then the
//! [`registry`], or a file) for one range per run of chunks, verifies every
//! chunk once against the [`format`](mod@format)'s index, and stores it. [`prefetch`]
//! fetches the rest of a layer in the background, yielding to reads through
//! the [`gate`].
//!
//! Each module imports only modules on lines below its own:
//!
//! ```text
//! device             layers as FUSE file -> loop device -> EROFS; LayerManager
//! prefetch           whole layers and trace replays, behind reads
//! layer              one blob: index, cache and fetcher; reads at any offset
//! fetch              missing chunks made present, verified, with a deadline
//! source             where chunks come from: file, registry, peer, super node
//! p2p                the node's peer, the super node, their wire contract
//! registry, trace    the OCI distribution client; startup traces
//! erofs              which inode's data lies where in a layer's image
//! cache, oci         verified chunks on disk; media types, digests, labels
//! format, gate, stats  the blob's chunks, index and footer; read-before-
//!                    background priority; counters
//! ```
//!
//! [`convert`] (OCI image to lazybd image) stands beside the read path and
//! uses only `erofs`, `format`, `oci` and `registry`; [`local_server`] (sockets,
//! peer checks and connection slots of the node's local control servers)
//! uses nothing of it.

pub mod cache;
pub mod convert;
pub mod device;
pub mod erofs;
pub mod fetch;
pub mod format;
pub mod gate;
pub mod layer;
pub mod local_server;
pub mod oci;
pub mod p2p;
pub mod prefetch;
pub mod registry;
pub mod source;
pub mod stats;
pub mod trace;
