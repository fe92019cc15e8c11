//! The task service containerd calls (served as both `containerd.task.v2.Task`
//! and `containerd.task.v3.Task`, which are wire-identical).
//!
//! Locking: one lock over the shim's containers. Start holds it across
//! `runc start` and publishing TaskStart, and exits are processed under it,
//! so TaskStart/TaskExecStarted always precede the TaskExit of the same
//! process (the Go shim's `eventSendMu`).

use std::{collections::HashMap, sync::Arc};

use async_trait::async_trait;
use containerd_shim::{
    asynchronous::ExitSignal, util::convert_to_any, Task, TtrpcContext, TtrpcResult,
};
use containerd_shim_protos::{
    api::{
        CheckpointTaskRequest, CloseIORequest, ConnectRequest, ConnectResponse, CreateTaskRequest,
        CreateTaskResponse, DeleteRequest, DeleteResponse, Empty, ExecProcessRequest, KillRequest,
        PauseRequest, PidsRequest, PidsResponse, ResizePtyRequest, ResumeRequest, ShutdownRequest,
        StartRequest, StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse,
        UpdateTaskRequest, WaitRequest, WaitResponse,
    },
    events::task::{
        TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskIO, TaskPaused,
        TaskResumed, TaskStart,
    },
    shim::oci::ProcessDetails,
    types::task::ProcessInfo,
};
use log::{debug, info, warn};
use tokio::sync::{mpsc, Mutex, MutexGuard};

use crate::{
    container::Container,
    error::{Error, Result},
    events::Events,
    hook::{LifecycleHook, RootfsMount, TaskEvent},
    metrics,
    oom::OomWatcher,
    process::{timestamp_field, State},
    reaper::{Exit, Reaper},
};

pub struct TaskService {
    shared: Arc<Shared>,
}

struct Shared {
    namespace: String,
    containers: Mutex<HashMap<String, Container>>,
    reaper: Arc<Reaper>,
    events: Arc<Events>,
    hook: Arc<dyn LifecycleHook>,
    exit: Arc<ExitSignal>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        reaper: Arc<Reaper>,
        exits: mpsc::UnboundedReceiver<Exit>,
        events: Arc<Events>,
        hook: Arc<dyn LifecycleHook>,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let shared = Arc::new(Shared {
            namespace: namespace.to_string(),
            containers: Mutex::new(HashMap::new()),
            reaper,
            events,
            hook,
            exit,
        });
        tokio::spawn(shared.clone().handle_exits(exits));
        Self { shared }
    }
}

fn not_found(id: &str) -> Error {
    Error::NotFound(format!("container {id}"))
}

impl Shared {
    async fn handle_exits(self: Arc<Self>, mut exits: mpsc::UnboundedReceiver<Exit>) {
        while let Some(exit) = exits.recv().await {
            self.process_exit(exit).await;
        }
    }

    async fn process_exit(&self, exit: Exit) {
        let pid = exit.pid as u32;
        let mut containers = self.containers.lock().await;
        for c in containers.values_mut() {
            if c.init.pid == pid && c.init.state != State::Stopped {
                if c.kill_all_on_exit {
                    if let Err(e) = c
                        .runc
                        .kill(&self.reaper, &c.id, libc::SIGKILL as u32, true)
                        .await
                    {
                        debug!("kill the rest of {} after its init exited: {e}", c.id);
                    }
                }
                if let Some(oom) = &c.oom {
                    oom.report().await;
                }
                c.init.set_exited(exit.status, exit.at);
                info!("container {} exited with {}", c.id, exit.status);
                self.send_exit(&c.id, &c.id, pid, exit).await;
                self.hook.notify(TaskEvent::TaskExit {
                    namespace: self.namespace.clone(),
                    container_id: c.id.clone(),
                    pid,
                    exit_status: exit.status,
                });
                return;
            }
            if let Some(p) = c
                .execs
                .values_mut()
                .find(|p| p.pid == pid && p.state != State::Stopped)
            {
                p.set_exited(exit.status, exit.at);
                let exec_id = p.exec_id.clone();
                self.send_exit(&c.id, &exec_id, pid, exit).await;
                return;
            }
        }
        debug!("exit of pid {pid} ({}) belongs to no process", exit.status);
    }

    async fn send_exit(&self, container_id: &str, id: &str, pid: u32, exit: Exit) {
        self.events
            .send(TaskExit {
                container_id: container_id.to_string(),
                id: id.to_string(),
                pid,
                exit_status: exit.status,
                exited_at: timestamp_field(Some(exit.at)),
                ..Default::default()
            })
            .await;
    }

    async fn lock(&self) -> MutexGuard<'_, HashMap<String, Container>> {
        self.containers.lock().await
    }
}

fn get<'a>(containers: &'a HashMap<String, Container>, id: &str) -> Result<&'a Container> {
    containers.get(id).ok_or_else(|| not_found(id))
}

fn get_mut<'a>(
    containers: &'a mut HashMap<String, Container>,
    id: &str,
) -> Result<&'a mut Container> {
    containers.get_mut(id).ok_or_else(|| not_found(id))
}

#[async_trait]
impl Task for TaskService {
    async fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        let containers = self.shared.lock().await;
        let c = get(&containers, &req.id)?;
        let process = c.process(&req.exec_id)?;
        Ok(process.state_response(&c.id, &c.bundle.to_string_lossy()))
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        if containers.contains_key(&req.id) {
            return Err(Error::AlreadyExists(format!("container {}", req.id)).into());
        }
        let mut c = Container::create(&req, &s.namespace, &s.reaper).await?;
        let pid = c.init.pid;
        info!("created container {} (pid {pid})", req.id);
        // Watched from create on: the init process waits in `runc init`
        // until start, so the counter's baseline is read before the
        // container can run, let alone be OOM-killed. Read at start, a
        // container killed within microseconds had no TaskOOM.
        match OomWatcher::start(&c.id, pid, s.events.clone()) {
            Ok(watcher) => c.oom = Some(watcher),
            Err(e) => warn!("no OOM events for {}: {e}", c.id),
        }
        s.events
            .send(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: Some(TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                })
                .into(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            })
            .await;
        containers.insert(req.id.clone(), c);
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        let c = get_mut(&mut containers, &req.id)?;
        let pid = if req.exec_id.is_empty() {
            let pid = c.start(&s.reaper).await?;
            s.events
                .send(TaskStart {
                    container_id: c.id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
            s.hook.notify(TaskEvent::TaskStart {
                namespace: s.namespace.clone(),
                container_id: c.id.clone(),
                pid,
                bundle: c.bundle.to_string_lossy().into_owned(),
                rootfs: c
                    .rootfs
                    .iter()
                    .map(|m| RootfsMount {
                        kind: m.type_.clone(),
                        source: m.source.clone(),
                        options: m.options.to_vec(),
                    })
                    .collect(),
            });
            pid
        } else {
            let pid = c.start_exec(&req.exec_id, &s.reaper).await?;
            s.events
                .send(TaskExecStarted {
                    container_id: c.id.clone(),
                    exec_id: req.exec_id.clone(),
                    pid,
                    ..Default::default()
                })
                .await;
            pid
        };
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        let c = get_mut(&mut containers, &req.id)?;
        if !req.exec_id.is_empty() {
            let process = c.take_exec(&req.exec_id)?;
            drop(containers);
            // Drained outside the lock: output may still be in flight.
            process.io.shutdown().await;
            let exit = process.exit_info();
            return Ok(DeleteResponse {
                pid: process.pid,
                exit_status: exit.map(|e| e.status).unwrap_or_default(),
                exited_at: timestamp_field(exit.map(|e| e.at)),
                ..Default::default()
            });
        }
        c.check_deletable()?;
        let mut c = containers.remove(&req.id).expect("looked up above");
        drop(containers);
        if let Err(e) = c.delete(&s.reaper).await {
            s.lock().await.insert(req.id.clone(), c);
            return Err(e.into());
        }
        let exit = c.init.exit_info();
        let (status, exited_at) = (
            exit.map(|e| e.status).unwrap_or_default(),
            timestamp_field(exit.map(|e| e.at)),
        );
        info!("deleted container {}", c.id);
        s.events
            .send(TaskDelete {
                container_id: c.id.clone(),
                pid: c.init.pid,
                exit_status: status,
                exited_at: exited_at.clone(),
                ..Default::default()
            })
            .await;
        Ok(DeleteResponse {
            pid: c.init.pid,
            exit_status: status,
            exited_at,
            ..Default::default()
        })
    }

    async fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let s = &self.shared;
        let containers = s.lock().await;
        let c = get(&containers, &req.id)?;
        let pids = c.runc.ps(&s.reaper, &c.id).await?;
        let processes = pids
            .into_iter()
            .map(|pid| {
                let exec = c.execs.values().find(|p| p.pid == pid);
                let info = exec.and_then(|p| {
                    let details = ProcessDetails {
                        exec_id: p.exec_id.clone(),
                        ..Default::default()
                    };
                    convert_to_any(Box::new(details)).ok()
                });
                ProcessInfo {
                    pid,
                    info: info.into(),
                    ..Default::default()
                }
            })
            .collect();
        Ok(PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: PauseRequest) -> TtrpcResult<Empty> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        let c = get_mut(&mut containers, &req.id)?;
        if c.init.state != State::Running {
            return Err(
                Error::FailedPrecondition(format!("container {} is not running", c.id)).into(),
            );
        }
        c.runc.pause(&s.reaper, &c.id).await?;
        c.init.state = State::Paused;
        s.events
            .send(TaskPaused {
                container_id: c.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: ResumeRequest) -> TtrpcResult<Empty> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        let c = get_mut(&mut containers, &req.id)?;
        if c.init.state != State::Paused {
            return Err(
                Error::FailedPrecondition(format!("container {} is not paused", c.id)).into(),
            );
        }
        c.runc.resume(&s.reaper, &c.id).await?;
        c.init.state = State::Running;
        s.events
            .send(TaskResumed {
                container_id: c.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(Error::Unimplemented("checkpoint (no criu support in lazybd-shim)".into()).into())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        let s = &self.shared;
        let containers = s.lock().await;
        let c = get(&containers, &req.id)?;
        c.kill(&req.exec_id, req.signal, req.all, &s.reaper).await?;
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: ExecProcessRequest) -> TtrpcResult<Empty> {
        let s = &self.shared;
        let mut containers = s.lock().await;
        let c = get_mut(&mut containers, &req.id)?;
        c.add_exec(&req)?;
        s.events
            .send(TaskExecAdded {
                container_id: c.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(&self, _ctx: &TtrpcContext, req: ResizePtyRequest) -> TtrpcResult<Empty> {
        let containers = self.shared.lock().await;
        let process = get(&containers, &req.id)?.process(&req.exec_id)?;
        // Like the Go shim: resizing a process without a terminal does nothing.
        if let Some(pty) = &process.pty {
            crate::console::resize(pty, req.width, req.height)?;
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: CloseIORequest) -> TtrpcResult<Empty> {
        let containers = self.shared.lock().await;
        let process = get(&containers, &req.id)?.process(&req.exec_id)?;
        if req.stdin {
            process.io.close_input();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: UpdateTaskRequest) -> TtrpcResult<Empty> {
        let s = &self.shared;
        let containers = s.lock().await;
        let c = get(&containers, &req.id)?;
        let resources = req
            .resources
            .as_ref()
            .map(|r| r.value.as_slice())
            .unwrap_or_default();
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(resources)
            .map_err(|e| Error::InvalidArgument(format!("resources: {e}")))?;
        c.runc.update(&s.reaper, &c.id, resources).await?;
        Ok(Empty::new())
    }

    async fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        let exited = {
            let containers = self.shared.lock().await;
            get(&containers, &req.id)?.process(&req.exec_id)?.wait()
        };
        let exit = exited.await.ok_or_else(|| {
            Error::NotFound(format!(
                "{} {} deleted while waited for",
                req.id, req.exec_id
            ))
        })?;
        Ok(WaitResponse {
            exit_status: exit.status,
            exited_at: timestamp_field(Some(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        let pid = {
            let containers = self.shared.lock().await;
            let c = get(&containers, &req.id)?;
            if c.init.state == State::Stopped {
                return Err(
                    Error::FailedPrecondition(format!("container {} is stopped", c.id)).into(),
                );
            }
            c.init.pid
        };
        let stats = metrics::collect(pid).await?;
        Ok(StatsResponse {
            stats: Some(stats).into(),
            ..Default::default()
        })
    }

    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: ConnectRequest,
    ) -> TtrpcResult<ConnectResponse> {
        let containers = self.shared.lock().await;
        let task_pid = containers.get(&req.id).map(|c| c.init.pid).unwrap_or(0);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            ..Default::default()
        })
    }

    async fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // One shim may serve a whole pod: it leaves only with its last container.
        if self.shared.lock().await.is_empty() {
            info!("no containers left, shutting down");
            self.shared.exit.signal();
        }
        Ok(Empty::new())
    }
}
