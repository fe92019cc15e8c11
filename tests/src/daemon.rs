//! One lifecycle for every process a test runs in the background
//! (containerd, lazybd-snapshotter, the super node, docker-registry, `ctr
//! events`): spawn with its output in a log file, wait for readiness with a
//! deadline, stop with SIGTERM and SIGKILL after a bound. Drop stops it, so a
//! failing test leaves no process behind.
//!
//! Every failure message carries the tail of the daemon's log: a test that
//! fails on a daemon shows why without anyone digging for the file.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// How many log lines a failure message shows.
const TAIL_LINES: usize = 40;
/// How long [`Daemon::stop`] waits after SIGTERM unless told otherwise.
const DEFAULT_GRACE: Duration = Duration::from_secs(15);

/// How a [`Daemon::stop`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running (never started, or already stopped or killed).
    NotRunning,
    /// It exited within the grace period.
    Exited(ExitStatus),
    /// It ignored SIGTERM for the grace period and was SIGKILLed.
    Killed,
}

/// A background process of a test, its stdout and stderr appended to a log.
pub struct Daemon {
    name: String,
    child: Option<Child>,
    log: PathBuf,
    grace: Duration,
}

impl Daemon {
    /// Spawns `cmd` (stdin closed, stdout and stderr appended to `log`).
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let file = open_log(log);
        cmd.stdin(Stdio::null())
            .stdout(file.try_clone().expect("clone log file"))
            .stderr(file);
        Self::start(name, cmd, log)
    }

    /// Spawns `cmd` (stdin closed, stderr appended to `log`) and waits up to
    /// `within` for its first stdout line, which must start with `prefix`
    /// (how the super node says it serves). The rest of stdout goes to the
    /// log too. Returns the daemon and that line.
    pub fn spawn_announcing(
        name: &str,
        mut cmd: Command,
        log: &Path,
        prefix: &str,
        within: Duration,
    ) -> (Daemon, String) {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(open_log(log));
        let mut daemon = Self::start(name, cmd, log);
        let stdout = daemon.child.as_mut().and_then(|c| c.stdout.take());
        let stdout = stdout.expect("piped stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut rest = open_log(log);
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stdout);
            let mut line = String::new();
            let _ = reader.read_line(&mut line);
            let _ = rest.write_all(line.as_bytes());
            let _ = tx.send(line);
            // Ends at EOF, when the daemon exits.
            let _ = std::io::copy(&mut reader, &mut rest);
        });
        let line = rx.recv_timeout(within).unwrap_or_default();
        if !line.starts_with(prefix) {
            daemon.kill();
            panic!(
                "{name} did not say {prefix:?} within {within:?} (said {line:?}){}",
                daemon.tail_note()
            );
        }
        (daemon, line)
    }

    fn start(name: &str, mut cmd: Command, log: &Path) -> Daemon {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("start {name} ({cmd:?}): {e} (hack/install-deps.sh)"));
        Daemon {
            name: name.to_owned(),
            child: Some(child),
            log: log.to_owned(),
            grace: DEFAULT_GRACE,
        }
    }

    /// How long [`Daemon::stop`] waits after SIGTERM before SIGKILL.
    pub fn with_grace(mut self, grace: Duration) -> Daemon {
        self.grace = grace;
        self
    }

    /// Polls `ready` until it holds; panics with the log's tail if the
    /// daemon exits first or `within` passes (`what` says what was awaited).
    pub fn wait_ready(&mut self, within: Duration, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        loop {
            if ready() {
                return;
            }
            if let Some(status) = self.exited() {
                panic!(
                    "{} exited with {status} before {what}{}",
                    self.name,
                    self.tail_note()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: no {what} within {within:?}{}",
                self.name,
                self.tail_note()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits up to `within` for the daemon to exit by itself (one that must
    /// refuse to start); its status, or None if it still runs.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The exit status, if it has exited (reaped here).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.exited().is_none()
    }

    /// SIGTERM, then SIGKILL if it has not exited within the grace period.
    pub fn stop(&mut self) -> Stopped {
        let Some(mut child) = self.child.take() else {
            return Stopped::NotRunning;
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Stopped::Exited(status);
        }
        let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return Stopped::Exited(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "{}: ignored SIGTERM for {:?}; killing it",
            self.name, self.grace
        );
        let _ = child.kill();
        let _ = child.wait();
        Stopped::Killed
    }

    /// SIGKILL, as a crash would: the daemon cleans nothing up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The log's last lines, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
    }

    fn tail_note(&self) -> String {
        format!(
            "\n--- last lines of {} ---\n{}",
            self.log.display(),
            self.log_tail()
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

fn open_log(path: &Path) -> std::fs::File {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open log {}: {e}", path.display()))
}
