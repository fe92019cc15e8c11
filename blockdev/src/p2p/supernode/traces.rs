//! The super node's store of startup traces (crate::trace), one file per
//! key under `<cache_dir>/traces/`, so a node that starts an image for the
//! first time can replay what another node recorded. Traces are checked
//! before they are stored (a stored trace is one any node can decode) and
//! the number kept is bounded.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::StatusCode;
use tracing::warn;

use crate::trace::{valid_key, Trace, MAX_TRACE_BYTES};

/// Traces kept at most; a new key beyond that is refused (507).
pub const MAX_TRACES: usize = 4096;
/// Longest a client may take to send a trace.
const BODY_DEADLINE: Duration = Duration::from_secs(10);

pub struct TraceStore {
    dir: PathBuf,
}

type Reply = (StatusCode, Bytes);

fn reply(status: StatusCode, msg: impl Into<String>) -> Reply {
    (status, Bytes::from(msg.into()))
}

impl TraceStore {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(TraceStore {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, Reply> {
        if !valid_key(key) {
            return Err(reply(StatusCode::BAD_REQUEST, "bad trace key\n"));
        }
        Ok(self.dir.join(key))
    }

    pub async fn get(&self, key: &str) -> Reply {
        let path = match self.path(key) {
            Ok(p) => p,
            Err(r) => return r,
        };
        match tokio::fs::read(&path).await {
            Ok(bytes) => (StatusCode::OK, Bytes::from(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                reply(StatusCode::NOT_FOUND, "no trace for this key\n")
            }
            Err(e) => {
                warn!("reading trace {}: {e}", path.display());
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "reading the trace failed\n",
                )
            }
        }
    }

    /// Stores the body as the trace of `key` (replacing an older one).
    pub async fn put(&self, key: &str, body: Incoming) -> Reply {
        let path = match self.path(key) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let collected =
            tokio::time::timeout(BODY_DEADLINE, Limited::new(body, MAX_TRACE_BYTES).collect())
                .await;
        let bytes = match collected {
            Ok(Ok(c)) => c.to_bytes(),
            Ok(Err(e)) => {
                warn!("trace {key}: body refused: {e}");
                return reply(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!("trace body refused (at most {MAX_TRACE_BYTES} bytes): {e}\n"),
                );
            }
            Err(_) => {
                warn!("trace {key}: body not received within {BODY_DEADLINE:?}");
                return reply(StatusCode::REQUEST_TIMEOUT, "trace body too slow\n");
            }
        };
        if let Err(e) = Trace::decode(&bytes) {
            warn!("trace {key}: refused: {e}");
            return reply(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
        if !path.exists() && self.count() >= MAX_TRACES {
            warn!("trace {key}: refused, {MAX_TRACES} traces stored already");
            return reply(StatusCode::INSUFFICIENT_STORAGE, "trace store full\n");
        }
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let written = async {
            tokio::fs::write(&tmp, &bytes).await?;
            tokio::fs::rename(&tmp, &path).await
        }
        .await;
        match written {
            Ok(()) => reply(StatusCode::OK, ""),
            Err(e) => {
                warn!("storing trace {}: {e}", path.display());
                let _ = std::fs::remove_file(&tmp);
                reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "storing the trace failed\n",
                )
            }
        }
    }

    fn count(&self) -> usize {
        std::fs::read_dir(&self.dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter(|e| valid_key(&e.file_name().to_string_lossy()))
                    .count()
            })
            .unwrap_or(0)
    }
}
