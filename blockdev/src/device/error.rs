//! What can go wrong attaching, detaching and setting up layers.

use std::path::PathBuf;

use thiserror::Error;

use super::config::{AttachStep, LOOP_CLEAR_WAIT};
use crate::layer::LayerError;

#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("invalid layer digest or anchor {0:?}: expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("layer {digest}: {step}: {source}")]
    Step {
        digest: String,
        step: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {digest}: injected failure before {step:?}")]
    Injected { digest: String, step: AttachStep },
    #[error("layer {digest}: loop device {device} still attached {LOOP_CLEAR_WAIT:?} after unmount (held open by another process?)")]
    LoopStillAttached { digest: String, device: PathBuf },
    #[error("setting up {root}: {source}")]
    Setup {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("background task failed: {0}")]
    Task(String),
    #[error("layer {0} is not attached")]
    NotAttached(String),
}
