//! The shim is a child subreaper: runc forks the container processes and
//! exits, so they are re-parented to the shim, which must collect every exit.
//! A single `waitpid(-1)` loop reaps everything; commands the shim itself
//! runs (runc) register their pid under the same lock that dispatch takes, so
//! no exit is lost to a race between spawning and reaping, and nothing else in
//! the process may wait on a child (no `tokio::process`).

use std::{
    collections::HashMap,
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::SystemTime,
};

use log::{debug, warn};
use nix::{
    errno::Errno,
    sys::wait::{waitpid, WaitPidFlag, WaitStatus},
    unistd::Pid,
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, oneshot},
};

/// A reaped process that no command of the shim was waiting for: a container
/// process (init or exec), or an orphan re-parented to the shim.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    pub pid: i32,
    /// The exit code, or 128 + the signal that killed it, as the Go shim reports.
    pub status: u32,
    pub at: SystemTime,
}

pub struct Reaper {
    state: Mutex<State>,
}

struct State {
    waiters: HashMap<i32, oneshot::Sender<u32>>,
    exits: mpsc::UnboundedSender<Exit>,
}

impl Reaper {
    /// Makes this process a child subreaper and starts reaping on SIGCHLD.
    /// Exits of processes nobody waits for go to the returned channel.
    pub fn start() -> std::io::Result<(Arc<Reaper>, mpsc::UnboundedReceiver<Exit>)> {
        nix::sys::prctl::set_child_subreaper(true).map_err(std::io::Error::from)?;
        let mut sigchld = signal(SignalKind::child())?;
        let (tx, rx) = mpsc::unbounded_channel();
        let reaper = Arc::new(Reaper {
            state: Mutex::new(State {
                waiters: HashMap::new(),
                exits: tx,
            }),
        });
        let looping = reaper.clone();
        tokio::spawn(async move {
            // A child may have exited before the handler was installed.
            looping.reap_all();
            while sigchld.recv().await.is_some() {
                looping.reap_all();
            }
        });
        Ok((reaper, rx))
    }

    /// Spawns `cmd`; the receiver yields its exit status once reaped.
    pub fn spawn(&self, cmd: &mut Command) -> std::io::Result<(Child, oneshot::Receiver<u32>)> {
        // Held across the spawn: dispatch cannot see this pid before its waiter exists.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        state.waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    fn reap_all(&self) {
        loop {
            match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => self.dispatch(pid.as_raw(), code as u32),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.dispatch(pid.as_raw(), 128 + sig as u32)
                }
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    warn!("waitpid failed: {e}");
                    return;
                }
            }
        }
    }

    fn dispatch(&self, pid: i32, status: u32) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(waiter) = state.waiters.remove(&pid) {
            let _ = waiter.send(status);
            return;
        }
        debug!("reaped pid {pid} status {status}");
        let _ = state.exits.send(Exit {
            pid,
            status,
            at: SystemTime::now(),
        });
    }
}
