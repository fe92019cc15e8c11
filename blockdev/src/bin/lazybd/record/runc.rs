//! One run of the workload under runc, bounded: `runc run` in the
//! foreground (it creates, starts, waits for and deletes the container),
//! with its own state root so nothing is shared with a containerd on the
//! host. It ends when the workload exits, at the deadline or at a signal;
//! whatever ended it, the container is killed and deleted and the state
//! root removed before [`Runc::run`] returns.

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tokio::process::{Child, Command};
use tracing::{debug, warn};

use super::interrupt::Interrupt;

/// How long `runc run` may take to return after its container was killed,
/// and `runc kill` / `delete` to answer.
const STOP_WAIT: Duration = Duration::from_secs(10);

/// How a run ended.
#[derive(Debug)]
pub enum Ended {
    /// The workload exited by itself (a status that is not 0 includes runc
    /// failing to start it).
    Exited(ExitStatus, Duration),
    /// It was still running at the deadline and was stopped.
    Deadline,
    /// A signal asked us to stop (its name).
    Interrupted(&'static str),
}

pub struct Runc {
    bin: PathBuf,
    /// runc's `--root`: its container state, ours alone.
    state: PathBuf,
    id: String,
}

impl Runc {
    /// `bin` as given if it has a slash, else found on PATH.
    pub fn find(bin: &Path, state: PathBuf, id: String) -> Result<Self> {
        let found = if bin.components().count() > 1 {
            Some(bin.to_owned())
        } else {
            std::env::var_os("PATH").and_then(|path| {
                std::env::split_paths(&path)
                    .map(|dir| dir.join(bin))
                    .find(|p| p.is_file())
            })
        };
        let Some(bin) = found.filter(|p| p.is_file()) else {
            bail!(
                "{} not found: recording a startup profile runs the image's entrypoint with \
                 runc (Debian package runc), or name it with --runc PATH",
                bin.display()
            );
        };
        Ok(Runc { bin, state, id })
    }

    fn command(&self) -> Command {
        let mut c = Command::new(&self.bin);
        c.arg("--root").arg(&self.state);
        c
    }

    /// Runs the container of `bundle` (its config.json) with stdout and
    /// stderr to `log`, until it exits, `limit` passed or `interrupt` fired.
    pub async fn run(
        &self,
        bundle: &Path,
        log: std::fs::File,
        limit: Duration,
        interrupt: &mut Interrupt,
    ) -> Result<Ended> {
        let started = Instant::now();
        let mut child = self
            .command()
            .arg("run")
            .arg("--bundle")
            .arg(bundle)
            .arg(&self.id)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Our own process group: a Ctrl-C on the terminal reaches us,
            // and we stop the container in order, not runc half-way.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        let ended = tokio::select! {
            status = child.wait() => {
                let status = status.context("waiting for runc")?;
                Ended::Exited(status, started.elapsed())
            }
            () = tokio::time::sleep(limit) => Ended::Deadline,
            name = interrupt.recv() => Ended::Interrupted(name),
        };
        if !matches!(ended, Ended::Exited(..)) {
            self.stop(&mut child).await;
        }
        self.delete().await;
        Ok(ended)
    }

    /// Kills the container (its pid namespace goes with its init) and waits
    /// for `runc run` to return; kills `runc run` itself if it does not.
    async fn stop(&self, child: &mut Child) {
        match self.quick(&["kill", &self.id, "KILL"]).await {
            Ok(_) => {}
            Err(e) => warn!("runc kill {}: {e:#}", self.id),
        }
        match tokio::time::timeout(STOP_WAIT, child.wait()).await {
            Ok(_) => {}
            Err(_) => {
                warn!(
                    "runc run {} did not return {STOP_WAIT:?} after the kill; killing it",
                    self.id
                );
                let _ = child.kill().await;
            }
        }
    }

    /// Deletes the container if it is still there, then runc's state root.
    async fn delete(&self) {
        // `runc run` deletes its container when it returns; this is for the
        // paths where it did not get to.
        if let Err(e) = self.quick(&["delete", "--force", &self.id]).await {
            let gone = format!("{e:#}").contains("does not exist");
            if !gone {
                warn!("runc delete {}: {e:#}", self.id);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.state) {
            if e.kind() != std::io::ErrorKind::NotFound {
                warn!("removing runc's state {}: {e}", self.state.display());
            }
        }
    }

    /// A short runc command, bounded by [`STOP_WAIT`].
    async fn quick(&self, args: &[&str]) -> Result<()> {
        let out = tokio::time::timeout(
            STOP_WAIT,
            self.command()
                .args(args)
                .stdin(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await
        .with_context(|| format!("no answer within {STOP_WAIT:?}"))??;
        if !out.status.success() {
            bail!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        debug!("runc {}: done", args.join(" "));
        Ok(())
    }
}
