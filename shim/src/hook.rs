//! The lifecycle hook: the shim tells the lazybd snapshotter when a task
//! starts and exits, so it can prefetch that container's lazy layers in the
//! background. Fire and forget: the notification runs in its own task with a
//! short deadline, so a missing or stuck snapshotter never delays or fails a
//! container; a failure is one log line.

use std::{path::PathBuf, sync::Arc, time::Duration};

use log::{debug, info};
use serde::Serialize;
use tokio::{io::AsyncWriteExt, net::UnixStream};

/// Where the snapshotter's control API listens unless `LAZYBD_CONTROL_SOCKET` says otherwise.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/lazybd/control.sock";
/// Connect plus write; the container does not wait for it either way.
const NOTIFY_DEADLINE: Duration = Duration::from_millis(500);

/// What happened to a task, as sent to the snapshotter (one JSON line).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum TaskEvent {
    TaskStart {
        namespace: String,
        container_id: String,
        pid: u32,
        bundle: String,
        /// The rootfs mounts containerd passed (the snapshotter recognises its own).
        rootfs: Vec<RootfsMount>,
    },
    TaskExit {
        namespace: String,
        container_id: String,
        pid: u32,
        exit_status: u32,
    },
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RootfsMount {
    #[serde(rename = "type")]
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Called on task start and exit; implementations must return at once.
pub trait LifecycleHook: Send + Sync {
    fn notify(&self, event: TaskEvent);
}

/// Sends each event to the snapshotter's control socket.
pub struct ControlSocketHook {
    socket: PathBuf,
}

impl ControlSocketHook {
    pub fn new(socket: PathBuf) -> Arc<Self> {
        Arc::new(Self { socket })
    }

    /// The socket from `LAZYBD_CONTROL_SOCKET`, else [`DEFAULT_CONTROL_SOCKET`].
    pub fn from_env() -> Arc<Self> {
        let socket = std::env::var_os("LAZYBD_CONTROL_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_CONTROL_SOCKET));
        Self::new(socket)
    }
}

impl LifecycleHook for ControlSocketHook {
    fn notify(&self, event: TaskEvent) {
        let socket = self.socket.clone();
        tokio::spawn(async move {
            let mut line = match serde_json::to_vec(&event) {
                Ok(line) => line,
                Err(e) => return info!("hook: cannot encode {event:?}: {e}"),
            };
            line.push(b'\n');
            let sent = tokio::time::timeout(NOTIFY_DEADLINE, async {
                let mut stream = UnixStream::connect(&socket).await?;
                stream.write_all(&line).await?;
                stream.shutdown().await
            })
            .await;
            match sent {
                Ok(Ok(())) => debug!("hook: told {} {event:?}", socket.display()),
                Ok(Err(e)) => info!("hook: snapshotter at {} not told: {e}", socket.display()),
                Err(_) => info!(
                    "hook: snapshotter at {} not told: no answer within {NOTIFY_DEADLINE:?}",
                    socket.display()
                ),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_one_json_line_each() {
        let start = TaskEvent::TaskStart {
            namespace: "default".into(),
            container_id: "c1".into(),
            pid: 42,
            bundle: "/b".into(),
            rootfs: vec![RootfsMount {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec!["lowerdir=/l".into()],
            }],
        };
        let json: serde_json::Value = serde_json::to_value(&start).unwrap();
        assert_eq!(json["event"], "task-start");
        assert_eq!(json["rootfs"][0]["type"], "overlay");
        let exit = TaskEvent::TaskExit {
            namespace: "default".into(),
            container_id: "c1".into(),
            pid: 42,
            exit_status: 137,
        };
        assert_eq!(serde_json::to_value(&exit).unwrap()["event"], "task-exit");
    }
}
