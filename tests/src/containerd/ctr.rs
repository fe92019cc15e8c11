//! `ctr` against the harness's containerd, each call bounded by a deadline,
//! and what the tests read through it: tasks, events, Tasks.Update.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::Containerd;
use crate::daemon::Daemon;

/// Any ctr call that takes longer has hung.
const CTR_DEADLINE_SECS: &str = "120";

/// `ctr -a SOCKET -n NAMESPACE ARGS...` under timeout(1).
pub(super) fn command(socket: &Path, namespace: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("timeout");
    cmd.args(["-k", "5", CTR_DEADLINE_SECS, "ctr", "-a"])
        .arg(socket)
        .args(["-n", namespace])
        .args(args)
        .stdin(Stdio::null());
    cmd
}

/// `ctr run` of an image on the lazybd snapshotter: the arguments, for
/// [`Containerd::ctr_ok`] and the other ctr calls.
///
/// ```ignore
/// ctd.ctr_ok(&LazyRun { image, id: "c1", detach: true, cmd: &["sleep", "9"], ..LazyRun::default() }.args());
/// ```
#[derive(Debug, Default, Clone, Copy)]
pub struct LazyRun<'a> {
    pub image: &'a str,
    pub id: &'a str,
    /// `-d` (the task keeps running), else `--rm` (ctr waits for the
    /// command and removes the container).
    pub detach: bool,
    /// The runtime; `None`: containerd's default (runc's shim).
    pub runtime: Option<&'a str>,
    /// More options before the image, e.g. `["--mount", "type=bind,..."]`.
    pub options: &'a [&'a str],
    pub cmd: &'a [&'a str],
}

impl<'a> LazyRun<'a> {
    pub fn args(&self) -> Vec<&'a str> {
        let mut args = vec![
            "run",
            if self.detach { "-d" } else { "--rm" },
            "--snapshotter",
            "lazybd",
        ];
        if let Some(runtime) = self.runtime {
            args.extend(["--runtime", runtime]);
        }
        args.extend(self.options);
        args.extend([self.image, self.id]);
        args.extend(self.cmd);
        args
    }
}

impl Containerd {
    /// A ctr command in this containerd's namespace, to spawn as the caller
    /// likes (e.g. on a pty).
    pub fn ctr_cmd(&self, args: &[&str]) -> Command {
        command(&self.socket(), &self.namespace, args)
    }

    /// Runs ctr; returns its output whatever the exit status.
    pub fn ctr(&self, args: &[&str]) -> Output {
        self.ctr_cmd(args).output().expect("run ctr")
    }

    /// Runs ctr and returns stdout; panics with stderr and the log on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let out = self.ctr(args);
        assert!(
            out.status.success(),
            "ctr {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.log_tail()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs ctr in containerd namespace `namespace` (not this harness's:
    /// the caller removes what it makes there); returns its output.
    pub fn ctr_in(&self, namespace: &str, args: &[&str]) -> Output {
        command(&self.socket(), namespace, args)
            .output()
            .expect("run ctr")
    }

    /// The lines ctr printed, whatever its exit status (for cleanup, when
    /// containerd may be gone).
    pub(super) fn ctr_lines(&self, args: &[&str]) -> Vec<String> {
        String::from_utf8_lossy(&self.ctr(args).stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Runs ctr (a `ctr run` of task `id`) and writes `stdin` to it once the
    /// task runs, then closes it. ctr turns that EOF into CloseIO only once
    /// it has the task: input that ends earlier leaves the process's stdin
    /// open under the Go shim as under ours (the shim holds the fifo, as
    /// containerd expects, until CloseIO).
    pub fn ctr_with_input(&self, args: &[&str], id: &str, stdin: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .ctr_cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        self.wait_task(60, id, "RUNNING");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).unwrap();
        drop(input);
        child.wait_with_output().unwrap()
    }

    /// `(id, status)` of the tasks `ctr task ls` shows.
    pub fn tasks(&self) -> Vec<(String, String)> {
        self.ctr_ok(&["task", "ls"])
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<_> = line.split_whitespace().collect();
                (fields.len() >= 3).then(|| (fields[0].to_string(), fields[2].to_string()))
            })
            .collect()
    }

    /// Waits up to `secs` until task `id` has `status` (RUNNING, STOPPED, ...).
    pub fn wait_task(&self, secs: u64, id: &str, status: &str) {
        self.wait_for(secs, &format!("{id} {status}"), || {
            self.tasks().iter().any(|(t, st)| t == id && st == status)
        });
    }

    /// Sets task `id`'s memory limit through containerd's Tasks.Update (ctr
    /// 1.6 has no `task update`), as CRI's UpdateContainerResources does.
    pub fn update_memory_limit(&self, id: &str, bytes: i64) {
        use containerd_client::{
            services::v1::{tasks_client::TasksClient, UpdateTaskRequest},
            tonic::Request,
            with_namespace,
        };
        let resources = serde_json::json!({"memory": {"limit": bytes}});
        let req = UpdateTaskRequest {
            container_id: id.to_string(),
            resources: Some(prost_types::Any {
                // containerd's type URL for runtime-spec types, JSON-encoded.
                type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
                value: serde_json::to_vec(&resources).unwrap(),
            }),
            annotations: Default::default(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let channel = containerd_client::connect(self.socket()).await.unwrap();
            let req = with_namespace!(req, self.namespace.as_str());
            TasksClient::new(channel)
                .update(req)
                .await
                .unwrap_or_else(|e| panic!("update {id}: {e}\n{}", self.log_tail()));
        });
    }
}

/// `ctr events` recording in the background until dropped.
pub struct EventRecorder {
    _ctr: Daemon,
    out: PathBuf,
}

impl EventRecorder {
    pub fn start(ctd: &Containerd, name: &str) -> EventRecorder {
        let out = ctd.dir().join(format!("events-{name}.txt"));
        let mut cmd = Command::new("ctr");
        cmd.arg("-a").arg(ctd.socket()).arg("events");
        let ctr = Daemon::spawn("ctr events", cmd, &out);
        // ctr subscribes asynchronously; give it a moment before events flow.
        std::thread::sleep(Duration::from_millis(300));
        EventRecorder { _ctr: ctr, out }
    }

    /// `(topic, json)` of the task events seen so far for container `id` in
    /// `namespace`.
    pub fn task_events(&self, namespace: &str, id: &str) -> Vec<(String, serde_json::Value)> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                // "<date> <time> <zone> <zone> <namespace> <topic> <json>"
                let mut parts = line.splitn(7, ' ');
                let ns = parts.nth(4)?;
                let topic = parts.next()?;
                let json: serde_json::Value = serde_json::from_str(parts.next()?).ok()?;
                (ns == namespace && topic.starts_with("/tasks/") && json["container_id"] == id)
                    .then(|| (topic.to_string(), json))
            })
            .collect()
    }

    pub fn topics(&self, namespace: &str, id: &str) -> Vec<String> {
        self.task_events(namespace, id)
            .into_iter()
            .map(|(topic, _)| topic)
            .collect()
    }
}
