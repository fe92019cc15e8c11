//! Driving the runc binary.
//!
//! Hand-written rather than the `runc` crate: that crate pins oci-spec 0.7
//! (the shim uses 0.10), and it waits on its children itself, which races with
//! the shim's subreaper loop. Every command here is spawned through the
//! [`Reaper`] and killed when it overruns its deadline.

use std::{
    io::Write,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use log::warn;
use tokio::{io::AsyncReadExt, net::unix::pipe};

use crate::{
    error::{io_context, Error, Result},
    reaper::Reaper,
};

/// How long one runc command may run before the shim kills it and fails the
/// request: well above a slow `runc create` on a loaded node.
const COMMAND_DEADLINE: Duration = Duration::from_secs(60);

/// The runc binary and its global flags for one container.
#[derive(Clone, Debug)]
pub struct Runc {
    pub binary: PathBuf,
    pub root: PathBuf,
    pub systemd_cgroup: bool,
    pub no_pivot_root: bool,
    /// runc's own log (json), where it reports why create or exec failed
    /// while the process's stdio belong to the container.
    pub log: PathBuf,
}

/// What the container process gets as stdin/stdout/stderr when runc starts it.
pub struct ProcessStdio {
    pub stdin: Option<OwnedFd>,
    pub stdout: Option<OwnedFd>,
    pub stderr: Option<OwnedFd>,
}

fn stdio_of(fd: Option<OwnedFd>) -> Stdio {
    fd.map(Stdio::from).unwrap_or_else(Stdio::null)
}

impl Runc {
    /// The command line for `args`, with the global flags.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root").arg(&self.root);
        cmd.arg("--log")
            .arg(&self.log)
            .args(["--log-format", "json"]);
        if self.systemd_cgroup {
            cmd.arg("--systemd-cgroup");
        }
        cmd.args(args);
        cmd
    }

    /// `runc create`; the init's pid lands in `pid_file`.
    pub async fn create(
        &self,
        reaper: &Reaper,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> Result<()> {
        let mut cmd = self.command(&["create", "--bundle"]);
        cmd.arg(bundle);
        if self.no_pivot_root {
            cmd.arg("--no-pivot");
        }
        cmd.arg("--pid-file").arg(pid_file);
        if let Some(socket) = console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_with_stdio(reaper, "create", cmd, stdio).await
    }

    /// `runc exec --detach` of the process spec in `process_file`.
    pub async fn exec(
        &self,
        reaper: &Reaper,
        id: &str,
        process_file: &Path,
        pid_file: &Path,
        console_socket: Option<&Path>,
        stdio: ProcessStdio,
    ) -> Result<()> {
        let mut cmd = self.command(&["exec", "--detach", "--process"]);
        cmd.arg(process_file).arg("--pid-file").arg(pid_file);
        if let Some(socket) = console_socket {
            cmd.arg("--console-socket").arg(socket);
        }
        cmd.arg(id);
        self.run_with_stdio(reaper, "exec", cmd, stdio).await
    }

    pub async fn start(&self, reaper: &Reaper, id: &str) -> Result<()> {
        self.run(reaper, &["start", id], None).await.map(drop)
    }

    pub async fn kill(&self, reaper: &Reaper, id: &str, signal: u32, all: bool) -> Result<()> {
        let signal = signal.to_string();
        let mut args = vec!["kill"];
        if all {
            args.push("--all");
        }
        args.extend([id, &signal]);
        self.run(reaper, &args, None).await.map(drop)
    }

    pub async fn delete(&self, reaper: &Reaper, id: &str, force: bool) -> Result<()> {
        let args: &[&str] = if force {
            &["delete", "--force", id]
        } else {
            &["delete", id]
        };
        self.run(reaper, args, None).await.map(drop)
    }

    pub async fn pause(&self, reaper: &Reaper, id: &str) -> Result<()> {
        self.run(reaper, &["pause", id], None).await.map(drop)
    }

    pub async fn resume(&self, reaper: &Reaper, id: &str) -> Result<()> {
        self.run(reaper, &["resume", id], None).await.map(drop)
    }

    /// `runc update` with `resources` (LinuxResources as JSON) on stdin.
    pub async fn update(&self, reaper: &Reaper, id: &str, resources: &[u8]) -> Result<()> {
        self.run(reaper, &["update", "--resources", "-", id], Some(resources))
            .await
            .map(drop)
    }

    /// The pids of every process in the container.
    pub async fn ps(&self, reaper: &Reaper, id: &str) -> Result<Vec<u32>> {
        let out = self
            .run(reaper, &["ps", "--format", "json", id], None)
            .await?;
        // runc prints `null` for a container without processes.
        let pids: Option<Vec<u32>> = serde_json::from_slice(&out).map_err(|e| Error::Runc {
            command: "ps".into(),
            message: format!("unreadable output: {e}"),
        })?;
        Ok(pids.unwrap_or_default())
    }

    /// Runs a command whose output the shim reads; returns its stdout.
    async fn run(&self, reaper: &Reaper, args: &[&str], input: Option<&[u8]>) -> Result<Vec<u8>> {
        let name = args[0];
        let mut cmd = self.command(args);
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let (mut child, exit) = reaper
            .spawn(&mut cmd)
            .map_err(io_context(format!("spawn {}", self.binary.display())))?;
        if let (Some(mut stdin), Some(input)) = (child.stdin.take(), input) {
            // Small (a resources document); a pipe buffer holds it whole.
            stdin
                .write_all(input)
                .map_err(io_context(format!("write runc {name} input")))?;
        }
        let stdout = read_pipe(child.stdout.take().map(OwnedFd::from));
        let stderr = read_pipe(child.stderr.take().map(OwnedFd::from));
        let waited = tokio::time::timeout(COMMAND_DEADLINE, async {
            let (out, err) = tokio::join!(stdout, stderr);
            (exit.await, out, err)
        })
        .await;
        let (status, out, err) = match waited {
            Ok(done) => done,
            Err(_) => return Err(self.overran(name, &mut child)),
        };
        match status {
            Ok(0) => Ok(out),
            status => Err(Error::Runc {
                command: name.into(),
                message: failure(status, &String::from_utf8_lossy(&err)),
            }),
        }
    }

    /// Runs create or exec, whose stdio belong to the container process:
    /// runc reports failures only in its log.
    async fn run_with_stdio(
        &self,
        reaper: &Reaper,
        name: &str,
        mut cmd: Command,
        stdio: ProcessStdio,
    ) -> Result<()> {
        cmd.stdin(stdio_of(stdio.stdin))
            .stdout(stdio_of(stdio.stdout))
            .stderr(stdio_of(stdio.stderr));
        let spawned = reaper.spawn(&mut cmd);
        // The command holds the container's pipe ends; only the process may keep them.
        drop(cmd);
        let (mut child, exit) =
            spawned.map_err(io_context(format!("spawn {}", self.binary.display())))?;
        let status = match tokio::time::timeout(COMMAND_DEADLINE, exit).await {
            Ok(status) => status,
            Err(_) => return Err(self.overran(name, &mut child)),
        };
        match status {
            Ok(0) => Ok(()),
            status => Err(Error::Runc {
                command: name.into(),
                message: failure(status, &last_log_error(&self.log)),
            }),
        }
    }

    fn overran(&self, name: &str, child: &mut std::process::Child) -> Error {
        warn!("runc {name} ran past {COMMAND_DEADLINE:?}, killing it");
        let _ = child.kill();
        Error::DeadlineExceeded(format!("runc {name}"))
    }
}

fn failure(
    status: std::result::Result<u32, tokio::sync::oneshot::error::RecvError>,
    detail: &str,
) -> String {
    let status = match status {
        Ok(code) => format!("exit status {code}"),
        Err(_) => "exit status lost".to_string(),
    };
    format!("{status}: {}", detail.trim())
}

async fn read_pipe(fd: Option<OwnedFd>) -> Vec<u8> {
    let mut out = Vec::new();
    let Some(fd) = fd else { return out };
    match pipe::Receiver::from_owned_fd(fd) {
        Ok(mut rx) => {
            if let Err(e) = rx.read_to_end(&mut out).await {
                warn!("read runc output: {e}");
            }
        }
        Err(e) => warn!("read runc output: {e}"),
    }
    out
}

/// The message of the last error runc logged, which is why it failed.
pub fn last_log_error(log: &Path) -> String {
    let Ok(text) = std::fs::read_to_string(log) else {
        return String::new();
    };
    text.lines()
        .rev()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .find(|entry| entry["level"] == "error")
        .and_then(|entry| entry["msg"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// runc's answer for a process or container that is already gone.
pub fn is_not_running(e: &Error) -> bool {
    match e {
        Error::Runc { message, .. } => {
            message.contains("not running")
                || message.contains("does not exist")
                || message.contains("process already finished")
        }
        _ => false,
    }
}
