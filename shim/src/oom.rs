//! TaskOOM for a container's cgroup, on cgroup v1 and v2.
//!
//! The kernel's `oom_kill` counter (v1 `memory.oom_control`, v2
//! `memory.events`) is the truth; the eventfd (v1) or inotify watch (v2) only
//! says when to look. The exit path looks too, under the same lock, before it
//! publishes TaskExit, so an OOM kill is always reported before the exit it
//! caused (CRI derives the `OOMKilled` reason from that order).

use std::{
    fs::File,
    os::fd::{AsFd, AsRawFd, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use containerd_shim_protos::events::task::TaskOOM;
use log::{debug, warn};
use nix::sys::{
    eventfd::{EfdFlags, EventFd},
    inotify::{AddWatchFlags, InitFlags, Inotify},
};
use tokio::{io::unix::AsyncFd, sync::Mutex, task::JoinHandle};

use crate::{
    error::{io_context, Result},
    events::Events,
};

pub struct OomWatcher {
    container_id: String,
    /// The file holding the `oom_kill` counter.
    counter: PathBuf,
    reported: Mutex<u64>,
    events: Arc<Events>,
    trigger: std::sync::Mutex<Option<JoinHandle<()>>>,
}

/// The memory cgroup directory of `pid` and whether it is cgroup v2.
fn memory_cgroup(pid: u32) -> Result<(PathBuf, bool)> {
    let path = format!("/proc/{pid}/cgroup");
    let text = std::fs::read_to_string(&path).map_err(io_context(format!("read {path}")))?;
    let mut unified = None;
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(dir)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if controllers.split(',').any(|c| c == "memory") {
            let dir = dir.trim_start_matches('/');
            return Ok((Path::new("/sys/fs/cgroup/memory").join(dir), false));
        }
        if id == "0" && controllers.is_empty() {
            unified = Some(Path::new("/sys/fs/cgroup").join(dir.trim_start_matches('/')));
        }
    }
    match unified {
        Some(dir) if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() => Ok((dir, true)),
        _ => Err(crate::error::Error::NotFound(format!(
            "memory cgroup of pid {pid}"
        ))),
    }
}

/// The `oom_kill` count in a v1 `memory.oom_control` or v2 `memory.events`.
pub fn parse_oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

fn read_oom_kills(counter: &Path) -> Option<u64> {
    std::fs::read_to_string(counter)
        .ok()
        .map(|text| parse_oom_kills(&text))
}

impl OomWatcher {
    /// Watches the memory cgroup of the container whose init is `pid`.
    pub fn start(container_id: &str, pid: u32, events: Arc<Events>) -> Result<Arc<Self>> {
        let (dir, v2) = memory_cgroup(pid)?;
        let counter = dir.join(if v2 {
            "memory.events"
        } else {
            "memory.oom_control"
        });
        let baseline = read_oom_kills(&counter).unwrap_or(0);
        let watcher = Arc::new(Self {
            container_id: container_id.to_string(),
            counter: counter.clone(),
            reported: Mutex::new(baseline),
            events,
            trigger: std::sync::Mutex::new(None),
        });
        let trigger = if v2 {
            let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
                .map_err(|e| crate::error::Error::io("inotify", e.into()))?;
            inotify
                .add_watch(&counter, AddWatchFlags::IN_MODIFY)
                .map_err(|e| {
                    crate::error::Error::io(format!("watch {}", counter.display()), e.into())
                })?;
            let fd = register(OwnedFd::from(inotify), "inotify")?;
            tokio::spawn(watcher.clone().run(fd, None))
        } else {
            let (efd, control) = register_v1(&dir, &counter)?;
            tokio::spawn(watcher.clone().run(efd, Some(control)))
        };
        *watcher.trigger.lock().unwrap_or_else(|e| e.into_inner()) = Some(trigger);
        Ok(watcher)
    }

    /// Publishes TaskOOM if the cgroup saw an OOM kill not reported yet.
    pub async fn report(&self) {
        let mut reported = self.reported.lock().await;
        let Some(kills) = read_oom_kills(&self.counter) else {
            return;
        };
        if kills > *reported {
            *reported = kills;
            debug!("container {} oom kills: {kills}", self.container_id);
            self.events
                .send(TaskOOM {
                    container_id: self.container_id.clone(),
                    ..Default::default()
                })
                .await;
        }
    }

    /// Stops watching (the container is gone).
    pub fn stop(&self) {
        if let Some(task) = self
            .trigger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            task.abort();
        }
    }

    /// `_registered` is the v1 `memory.oom_control` the eventfd was registered
    /// against, kept open for as long as the registration is used.
    async fn run(self: Arc<Self>, fd: AsyncFd<OwnedFd>, _registered: Option<File>) {
        loop {
            let mut ready = match fd.readable().await {
                Ok(ready) => ready,
                Err(e) => return warn!("oom watch of {} failed: {e}", self.container_id),
            };
            // Drain the notification; its content does not matter.
            let mut buf = [0u8; 4096];
            let _ = nix::unistd::read(fd.get_ref(), &mut buf);
            ready.clear_ready();
            if read_oom_kills(&self.counter).is_none() {
                // v1 signals the eventfd when the cgroup is removed.
                return debug!("oom watch of {} ended: cgroup gone", self.container_id);
            }
            self.report().await;
        }
    }
}

/// Registers an eventfd for OOM notifications of a v1 memory cgroup.
fn register_v1(dir: &Path, oom_control: &Path) -> Result<(AsyncFd<OwnedFd>, File)> {
    let efd = EventFd::from_flags(EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
        .map_err(|e| crate::error::Error::io("eventfd", e.into()))?;
    let control =
        File::open(oom_control).map_err(io_context(format!("open {}", oom_control.display())))?;
    let event_control = dir.join("cgroup.event_control");
    // One write: the kernel parses each write(2) as a whole registration.
    let registration = format!("{} {}", efd.as_fd().as_raw_fd(), control.as_raw_fd());
    std::fs::write(&event_control, registration)
        .map_err(io_context(format!("write {}", event_control.display())))?;
    let efd = register(OwnedFd::from(efd), "eventfd")?;
    Ok((efd, control))
}

fn register(fd: OwnedFd, what: &str) -> Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the descriptor, so it stays open and the same
    // for as long as the registration lives.
    unsafe { AsyncFd::register(fd) }
        .map_err(std::io::Error::from)
        .map_err(io_context(format!("register {what}")))
}

impl Drop for OomWatcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::parse_oom_kills;

    #[test]
    fn oom_kill_counter_is_read_from_v1_and_v2_files() {
        assert_eq!(
            parse_oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n"),
            3
        );
        assert_eq!(
            parse_oom_kills("low 0\nhigh 0\nmax 5\noom 2\noom_kill 1\noom_group_kill 0\n"),
            1
        );
        assert_eq!(parse_oom_kills("oom_kill_disable 0\nunder_oom 0\n"), 0);
        assert_eq!(parse_oom_kills("oom_kill x\n"), 0);
    }
}
