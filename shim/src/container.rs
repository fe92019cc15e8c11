//! A container: its bundle, rootfs mounts, runc, its init process and execs.
//! The methods here do the work of one request each; the task service
//! decides when they may run and publishes the events.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use containerd_shim::{
    asynchronous::{io::Stdio, util::read_spec},
    mount::umount_recursive,
};
use containerd_shim_protos::api::{CreateTaskRequest, ExecProcessRequest, Mount};
use log::warn;
use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::{
    error::{io_context, Error, Result},
    oom::OomWatcher,
    options::RuntimeOptions,
    process::{Process, State},
    reaper::Reaper,
    runc::{is_not_running, Runc},
};

pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub runc: Runc,
    pub init: Process,
    pub execs: HashMap<String, Process>,
    /// What containerd asked to mount as the rootfs (empty: the bundle has it).
    pub rootfs: Vec<Mount>,
    pub oom: Option<Arc<OomWatcher>>,
    /// Without its own PID namespace, the container's other processes
    /// outlive its init unless killed when it exits (Go: ShouldKillAllOnExit).
    pub kill_all_on_exit: bool,
}

/// Exec ids become file names in the bundle.
fn check_exec_id(exec_id: &str) -> Result<()> {
    if exec_id.is_empty()
        || exec_id.len() > 200
        || exec_id.contains('/')
        || exec_id.starts_with('.')
        || exec_id.contains('\0')
    {
        return Err(Error::InvalidArgument(format!("exec id {exec_id:?}")));
    }
    Ok(())
}

fn shares_pid_namespace(spec: &Spec) -> bool {
    let own = spec
        .linux()
        .as_ref()
        .and_then(|linux| linux.namespaces().as_ref())
        .is_some_and(|namespaces| {
            namespaces
                .iter()
                .any(|ns| ns.typ() == LinuxNamespaceType::Pid && ns.path().is_none())
        });
    !own
}

async fn read_pid(path: &Path) -> Result<u32> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(io_context(format!("read {}", path.display())))?;
    text.trim().parse().map_err(|e| {
        Error::io(
            format!("pid in {}", path.display()),
            std::io::Error::other(e),
        )
    })
}

async fn mount_rootfs(mounts: &[Mount], rootfs: &Path) -> Result<()> {
    for m in mounts {
        if let Err(e) = containerd_shim::asynchronous::util::mount_rootfs(m, rootfs).await {
            unmount_rootfs(rootfs);
            return Err(e.into());
        }
    }
    Ok(())
}

pub fn unmount_rootfs(rootfs: &Path) {
    if let Err(e) = umount_recursive(rootfs.to_str(), 0) {
        warn!("unmount {}: {e}", rootfs.display());
    }
}

impl Container {
    /// Mounts the rootfs and runs `runc create`; on failure nothing is left.
    pub async fn create(req: &CreateTaskRequest, namespace: &str, reaper: &Reaper) -> Result<Self> {
        if !req.checkpoint.is_empty() || !req.parent_checkpoint.is_empty() {
            return Err(Error::Unimplemented("restore from a checkpoint".into()));
        }
        let bundle = PathBuf::from(&req.bundle);
        let options = RuntimeOptions::decode(req.options.as_ref())?;
        options.save(&bundle).await?;
        let runc = options.runc(namespace, &bundle);
        let spec = read_spec(&bundle).await?;

        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            tokio::fs::create_dir_all(&rootfs)
                .await
                .map_err(io_context(format!("mkdir {}", rootfs.display())))?;
            mount_rootfs(&req.rootfs, &rootfs).await?;
        }
        let mut init = Process::new(
            "",
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        );
        match Self::create_init(&mut init, &req.id, &bundle, &runc, reaper).await {
            Ok(pid) => init.pid = pid,
            Err(e) => {
                init.io.abort().await;
                if let Err(e) = runc.delete(reaper, &req.id, true).await {
                    if !is_not_running(&e) {
                        warn!("cleanup of failed create {}: {e}", req.id);
                    }
                }
                if !req.rootfs.is_empty() {
                    unmount_rootfs(&rootfs);
                }
                return Err(e);
            }
        }
        Ok(Self {
            id: req.id.clone(),
            bundle,
            runc,
            init,
            execs: HashMap::new(),
            rootfs: req.rootfs.to_vec(),
            oom: None,
            kill_all_on_exit: shares_pid_namespace(&spec),
        })
    }

    async fn create_init(
        init: &mut Process,
        id: &str,
        bundle: &Path,
        runc: &Runc,
        reaper: &Reaper,
    ) -> Result<u32> {
        let console = init.console_socket()?;
        let stdio = init.open_stdio()?;
        let pid_file = bundle.join("init.pid");
        runc.create(
            reaper,
            id,
            bundle,
            &pid_file,
            console.as_ref().map(|c| c.path()),
            stdio,
        )
        .await?;
        if let Some(console) = &console {
            init.attach_console(console).await?;
        }
        read_pid(&pid_file).await
    }

    pub fn process(&self, exec_id: &str) -> Result<&Process> {
        if exec_id.is_empty() {
            return Ok(&self.init);
        }
        self.execs
            .get(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of {}", self.id)))
    }

    pub fn process_mut(&mut self, exec_id: &str) -> Result<&mut Process> {
        if exec_id.is_empty() {
            return Ok(&mut self.init);
        }
        let id = &self.id;
        self.execs
            .get_mut(exec_id)
            .ok_or_else(|| Error::NotFound(format!("exec {exec_id} of {id}")))
    }

    /// `runc start` of the init.
    pub async fn start(&mut self, reaper: &Reaper) -> Result<u32> {
        if self.init.state != State::Created {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not in the created state",
                self.id
            )));
        }
        self.runc.start(reaper, &self.id).await?;
        self.init.state = State::Running;
        Ok(self.init.pid)
    }

    /// Registers an exec process; it runs on start.
    pub fn add_exec(&mut self, req: &ExecProcessRequest) -> Result<()> {
        check_exec_id(&req.exec_id)?;
        if self.execs.contains_key(&req.exec_id) {
            return Err(Error::AlreadyExists(format!("exec {}", req.exec_id)));
        }
        if self.init.state == State::Stopped {
            return Err(Error::FailedPrecondition(format!(
                "container {} is stopped",
                self.id
            )));
        }
        let spec = req
            .spec
            .as_ref()
            .map(|spec| spec.value.clone())
            .filter(|value| !value.is_empty())
            .ok_or_else(|| Error::InvalidArgument("exec without a process spec".into()))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&spec)
            .map_err(|e| Error::InvalidArgument(format!("exec process spec: {e}")))?;
        let mut process = Process::new(
            &req.exec_id,
            Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal),
        );
        process.spec = spec;
        self.execs.insert(req.exec_id.clone(), process);
        Ok(())
    }

    /// `runc exec` of a registered exec process.
    pub async fn start_exec(&mut self, exec_id: &str, reaper: &Reaper) -> Result<u32> {
        if self.init.state != State::Running {
            return Err(Error::FailedPrecondition(format!(
                "container {} is not running",
                self.id
            )));
        }
        let (bundle, id, runc) = (self.bundle.clone(), self.id.clone(), self.runc.clone());
        let process = self.process_mut(exec_id)?;
        if process.state != State::Created {
            return Err(Error::FailedPrecondition(format!(
                "exec {exec_id} already started"
            )));
        }
        let spec_file = bundle.join(format!("exec-{exec_id}.json"));
        let pid_file = bundle.join(format!("exec-{exec_id}.pid"));
        let started = async {
            tokio::fs::write(&spec_file, &process.spec)
                .await
                .map_err(io_context(format!("write {}", spec_file.display())))?;
            let console = process.console_socket()?;
            let stdio = process.open_stdio()?;
            runc.exec(
                reaper,
                &id,
                &spec_file,
                &pid_file,
                console.as_ref().map(|c| c.path()),
                stdio,
            )
            .await?;
            if let Some(console) = &console {
                process.attach_console(console).await?;
            }
            read_pid(&pid_file).await
        }
        .await;
        let _ = tokio::fs::remove_file(&spec_file).await;
        let _ = tokio::fs::remove_file(&pid_file).await;
        match started {
            Ok(pid) => {
                process.pid = pid;
                process.state = State::Running;
                Ok(pid)
            }
            Err(e) => {
                process.io.abort().await;
                process.io = process.io.renew();
                Err(e)
            }
        }
    }

    /// Signals a process: the init through runc (which can reach all of
    /// them), an exec directly.
    pub async fn kill(&self, exec_id: &str, signal: u32, all: bool, reaper: &Reaper) -> Result<()> {
        let process = self.process(exec_id)?;
        let finished = || Error::NotFound(format!("process already finished ({})", self.id));
        if exec_id.is_empty() {
            if process.state == State::Stopped && !all {
                return Err(finished());
            }
            return match self.runc.kill(reaper, &self.id, signal, all).await {
                Err(e) if is_not_running(&e) => Err(finished()),
                other => other,
            };
        }
        if process.state != State::Running || process.pid == 0 {
            return Err(finished());
        }
        let signal = nix::sys::signal::Signal::try_from(signal as i32)
            .map_err(|_| Error::InvalidArgument(format!("signal {signal}")))?;
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(process.pid as i32), signal).map_err(
            |e| match e {
                nix::errno::Errno::ESRCH => finished(),
                e => Error::io(format!("kill {}", process.pid), e.into()),
            },
        )
    }

    /// Takes a stopped exec out; the caller shuts its io down.
    pub fn take_exec(&mut self, exec_id: &str) -> Result<Process> {
        let process = self.process(exec_id)?;
        if matches!(process.state, State::Running | State::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete running exec {exec_id}"
            )));
        }
        Ok(self.execs.remove(exec_id).expect("looked up above"))
    }

    /// Whether [`Container::delete`] may run.
    pub fn check_deletable(&self) -> Result<()> {
        if matches!(self.init.state, State::Running | State::Paused) {
            return Err(Error::FailedPrecondition(format!(
                "cannot delete running container {}",
                self.id
            )));
        }
        Ok(())
    }

    /// `runc delete`, stdio drained, rootfs unmounted.
    pub async fn delete(&mut self, reaper: &Reaper) -> Result<()> {
        match self.runc.delete(reaper, &self.id, false).await {
            Err(e) if !is_not_running(&e) => return Err(e),
            _ => {}
        }
        if let Some(oom) = self.oom.take() {
            oom.stop();
        }
        self.init.io.shutdown().await;
        for exec in self.execs.values() {
            exec.io.abort().await;
        }
        if !self.rootfs.is_empty() {
            unmount_rootfs(&self.bundle.join("rootfs"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_ids_that_are_not_file_names_are_rejected() {
        assert!(check_exec_id("exec-1").is_ok());
        for bad in ["", "../x", "a/b", ".hidden", "a\0b"] {
            assert!(check_exec_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn kill_all_on_exit_follows_the_pid_namespace() {
        let own: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid"},{"type":"mount"}]}}"#,
        )
        .unwrap();
        assert!(!shares_pid_namespace(&own));
        let joined: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"pid","path":"/proc/1/ns/pid"}]}}"#,
        )
        .unwrap();
        assert!(shares_pid_namespace(&joined));
        let host: Spec = serde_json::from_str(
            r#"{"ociVersion":"1.0.2","linux":{"namespaces":[{"type":"mount"}]}}"#,
        )
        .unwrap();
        assert!(shares_pid_namespace(&host));
    }
}
