//! The lazy layer core of lazybd.
pub mod format;
