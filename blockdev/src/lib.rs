//! The lazy layer core of lazybd.
pub mod cache;
pub mod device;
pub mod fetch;
pub mod format;
pub mod layer;
pub mod source;
pub mod stats;
