//! The super node's store of startup traces (crate::trace), one file per
//! key under `<cache_dir>/traces/`, so a node that starts an image for the
//! first time can replay what another node recorded. Traces are checked
//! before they are stored (a stored trace is one any node can decode) and
//! the number kept is bounded.
//!
//! Who may write (the caller's tickets are checked before, in `mod.rs`): the
//! first writer of a key owns it (its IP is kept beside the trace as
//! `<key>.owner`); another node's write is refused (409) until the trace is
//! [`OWNER_TTL`] old, after which anyone with tickets for the image's
//! layers may replace it. The owner may replace its own at any time.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

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
/// How long the first writer of a trace owns it.
pub const OWNER_TTL: Duration = Duration::from_secs(24 * 3600);

pub struct TraceStore {
    dir: PathBuf,
    /// One write at a time: the owner check and the write go together.
    writing: tokio::sync::Mutex<()>,
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
            writing: tokio::sync::Mutex::new(()),
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

    /// Stores the body as the trace of `key` written by `writer`, unless
    /// another writer owns it (see the module docs). `layers_held` tells
    /// whether the writer holds tickets for every layer the trace names.
    pub async fn put(
        &self,
        key: &str,
        writer: IpAddr,
        body: Incoming,
        layers_held: impl Fn(&Trace) -> bool,
    ) -> Reply {
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
        let trace = match Trace::decode(&bytes) {
            Ok(t) => t,
            Err(e) => {
                warn!("trace {key}: refused: {e}");
                return reply(StatusCode::BAD_REQUEST, format!("{e}\n"));
            }
        };
        if !layers_held(&trace) {
            warn!("trace {key} from {writer}: names layers it holds no ticket for");
            return reply(
                StatusCode::FORBIDDEN,
                "the trace names layers you hold no ticket for\n",
            );
        }
        let _one_writer = self.writing.lock().await;
        if let Some(owner) = self.owner(key, &path) {
            if owner != writer {
                warn!("trace {key}: {writer} may not replace the trace of {owner}");
                return reply(
                    StatusCode::CONFLICT,
                    "another node's trace is stored for this key\n",
                );
            }
        }
        if !path.exists() && self.count() >= MAX_TRACES {
            warn!("trace {key}: refused, {MAX_TRACES} traces stored already");
            return reply(StatusCode::INSUFFICIENT_STORAGE, "trace store full\n");
        }
        let tmp = self.dir.join(format!(".{key}.tmp"));
        let owner_path = self.dir.join(format!("{key}.owner"));
        let written = async {
            // The owner first: a crash between the two leaves an owner
            // without a trace, which the next write of that owner fixes.
            tokio::fs::write(&tmp, writer.to_string()).await?;
            tokio::fs::rename(&tmp, &owner_path).await?;
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

    /// The owner of the trace at `path`, while it owns it.
    fn owner(&self, key: &str, path: &Path) -> Option<IpAddr> {
        let age = std::fs::metadata(path)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| SystemTime::now().duration_since(t).ok())?;
        if age >= OWNER_TTL {
            return None;
        }
        std::fs::read_to_string(self.dir.join(format!("{key}.owner")))
            .ok()?
            .trim()
            .parse()
            .ok()
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
