//! The lazy layer core of lazybd.
pub mod cache;
pub mod convert;
pub mod device;
pub mod fetch;
pub mod format;
pub mod gate;
pub mod layer;
pub mod oci;
pub mod p2p;
pub mod prefetch;
pub mod registry;
pub mod source;
pub mod stats;
pub mod trace;
