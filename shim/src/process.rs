//! One process of a container (its init or an exec): pid, state, exit, and
//! the stdio the shim copies between runc and containerd's fifos.

use std::{os::fd::OwnedFd, time::SystemTime};

use containerd_shim::asynchronous::io::{IoTasks, Pty, Stdio};
use containerd_shim_protos::{
    api::{StateResponse, Status},
    protobuf::{well_known_types::timestamp::Timestamp, MessageField},
};
use tokio::{net::unix::pipe, sync::watch};

use crate::{
    console::ConsoleSocket,
    error::{io_context, Result},
    runc::ProcessStdio,
};

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct ExitInfo {
    pub status: u32,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

pub struct Process {
    /// Empty for the init process.
    pub exec_id: String,
    pub pid: u32,
    pub state: State,
    pub stdio: Stdio,
    pub io: IoTasks,
    pub pty: Option<Pty>,
    /// The OCI process spec (JSON) of an exec; empty for the init.
    pub spec: Vec<u8>,
    exit: watch::Sender<Option<ExitInfo>>,
}

impl Process {
    pub fn new(exec_id: &str, stdio: Stdio) -> Self {
        Self {
            exec_id: exec_id.to_string(),
            pid: 0,
            state: State::Created,
            stdio,
            io: IoTasks::default(),
            pty: None,
            spec: Vec::new(),
            exit: watch::channel(None).0,
        }
    }

    pub fn exit_info(&self) -> Option<ExitInfo> {
        *self.exit.borrow()
    }

    pub fn set_exited(&mut self, status: u32, at: SystemTime) {
        self.state = State::Stopped;
        self.exit.send_replace(Some(ExitInfo { status, at }));
    }

    /// Resolves once the process has exited (at once if it has).
    pub fn wait(&self) -> impl std::future::Future<Output = Option<ExitInfo>> + Send + 'static {
        let mut exit = self.exit.subscribe();
        async move {
            exit.wait_for(Option::is_some)
                .await
                .ok()
                .and_then(|exit| *exit)
        }
    }

    /// Pipes for the process's stdio, whose shim ends are copied to and from
    /// containerd's fifos; a terminal process gets none (runc hands the
    /// terminal over the console socket instead).
    pub fn open_stdio(&self) -> Result<ProcessStdio> {
        let none = ProcessStdio {
            stdin: None,
            stdout: None,
            stderr: None,
        };
        if self.stdio.terminal {
            return Ok(none);
        }
        let mut stdio = none;
        if !self.stdio.stdin.is_empty() {
            let (rx, tx) = std::io::pipe().map_err(io_context("stdin pipe"))?;
            let tx =
                pipe::Sender::from_owned_fd(OwnedFd::from(tx)).map_err(io_context("stdin pipe"))?;
            self.io.copy_from_fifo(&self.stdio.stdin, tx)?;
            stdio.stdin = Some(rx.into());
        }
        for (path, slot) in [
            (&self.stdio.stdout, &mut stdio.stdout),
            (&self.stdio.stderr, &mut stdio.stderr),
        ] {
            if path.is_empty() {
                continue;
            }
            let (rx, tx) = std::io::pipe().map_err(io_context("output pipe"))?;
            let rx = pipe::Receiver::from_owned_fd(OwnedFd::from(rx))
                .map_err(io_context("output pipe"))?;
            self.io.copy_to_fifo(rx, path)?;
            *slot = Some(tx.into());
        }
        Ok(stdio)
    }

    /// The console socket runc sends the terminal over, for a terminal process.
    pub fn console_socket(&self) -> Result<Option<ConsoleSocket>> {
        self.stdio.terminal.then(ConsoleSocket::new).transpose()
    }

    /// Starts copying the terminal runc sent to and from the fifos.
    pub async fn attach_console(&mut self, socket: &ConsoleSocket) -> Result<()> {
        let pty = Pty::new(socket.receive_master().await?)?;
        if !self.stdio.stdin.is_empty() {
            self.io.copy_from_fifo(&self.stdio.stdin, pty.clone())?;
        }
        if !self.stdio.stdout.is_empty() {
            self.io.copy_to_fifo(pty.clone(), &self.stdio.stdout)?;
        }
        self.pty = Some(pty);
        Ok(())
    }

    pub fn state_response(&self, id: &str, bundle: &str) -> StateResponse {
        let exit = self.exit_info();
        StateResponse {
            id: id.to_string(),
            bundle: bundle.to_string(),
            pid: self.pid,
            status: match self.state {
                State::Created => Status::CREATED,
                State::Running => Status::RUNNING,
                State::Paused => Status::PAUSED,
                State::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: self.stdio.stdin.clone(),
            stdout: self.stdio.stdout.clone(),
            stderr: self.stdio.stderr.clone(),
            terminal: self.stdio.terminal,
            exit_status: exit.map(|e| e.status).unwrap_or_default(),
            exited_at: exit.map(|e| timestamp(e.at)).into(),
            exec_id: self.exec_id.clone(),
            ..Default::default()
        }
    }
}

pub fn timestamp(at: SystemTime) -> Timestamp {
    let since = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    Timestamp {
        seconds: since.as_secs() as i64,
        nanos: since.subsec_nanos() as i32,
        ..Default::default()
    }
}

pub fn timestamp_field(at: Option<SystemTime>) -> MessageField<Timestamp> {
    at.map(timestamp).into()
}
