//! The lazy layer core of lazybd.
pub mod cache;
pub mod format;
pub mod stats;
