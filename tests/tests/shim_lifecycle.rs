//! containerd-shim-lazybd-v2 under a private containerd 1.6, driven by `ctr`
//! as an operator would: TTY and resize, pause/resume, ps, metrics, update,
//! OOM, many containers at once, a containerd restart and a killed shim.
//! Where the behaviour is containerd's contract, the same scenario runs with
//! containerd's own io.containerd.runc.v2 and the two must agree.

use std::{
    io::{Read, Write},
    os::fd::{AsRawFd, OwnedFd},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use lazybd_tests::containerd::{Containerd, EventRecorder, LAZYBD_RUNTIME, RUNC_RUNTIME};

/// `ctr run -d` of the busybox rootfs with `runtime`.
fn run_detached(ctd: &Containerd, runtime: &str, id: &str, extra: &[&str], cmd: &[&str]) {
    let rootfs = ctd.rootfs();
    let mut args = vec!["run", "-d", "--runtime", runtime];
    args.extend_from_slice(extra);
    args.extend(["--rootfs", rootfs.to_str().unwrap(), id]);
    args.extend_from_slice(cmd);
    ctd.ctr_ok(&args);
}

fn remove(ctd: &Containerd, id: &str) {
    ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
    ctd.wait_task(60, id, "STOPPED");
    ctd.ctr_ok(&["task", "rm", id]);
    ctd.ctr_ok(&["containers", "rm", id]);
}

fn topics(events: &EventRecorder, ctd: &Containerd, id: &str) -> Vec<String> {
    events.topics(&ctd.namespace, id)
}

/// Waits until `id`'s events end with `last` (events arrive asynchronously).
fn events_until(events: &EventRecorder, ctd: &Containerd, id: &str, last: &str) -> Vec<String> {
    ctd.wait_for(30, &format!("{id}: event {last}"), || {
        topics(events, ctd, id).last().map(String::as_str) == Some(last)
    });
    topics(events, ctd, id)
}

/// A pty pair whose slave is `ctr`'s controlling terminal, as in a shell.
struct Terminal {
    master: std::fs::File,
    child: Child,
}

fn set_winsize(fd: &impl AsRawFd, rows: u16, cols: u16) {
    let ws = nix::libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCSWINSZ, &ws) };
    assert_eq!(rc, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
}

impl Terminal {
    fn spawn(ctd: &Containerd, args: &[&str], rows: u16, cols: u16) -> Terminal {
        let pty = nix::pty::openpty(None, None).unwrap();
        set_winsize(&pty.master, rows, cols);
        let slave: OwnedFd = pty.slave;
        let mut cmd = ctd.ctr_cmd(args);
        cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave));
        // SAFETY: setsid and ioctl are async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if nix::libc::setsid() < 0 || nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd.spawn().unwrap();
        let master = std::fs::File::from(pty.master);
        // SAFETY: fcntl on our own descriptor.
        unsafe {
            let flags = nix::libc::fcntl(master.as_raw_fd(), nix::libc::F_GETFL);
            nix::libc::fcntl(
                master.as_raw_fd(),
                nix::libc::F_SETFL,
                flags | nix::libc::O_NONBLOCK,
            );
        }
        Terminal { master, child }
    }

    /// Reads what the terminal shows until `want` appears (at most `secs`).
    fn read_until(&mut self, seen: &mut String, want: &str, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            match self.master.read(&mut buf) {
                Ok(0) => return seen.contains(want),
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                // EIO: the slave side is closed (ctr exited).
                Err(_) => return seen.contains(want),
            }
            if seen.contains(want) {
                return true;
            }
        }
        false
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asks the shell in the terminal for its size until `want` shows (bounded).
fn ask_until(term: &mut Terminal, seen: &mut String, want: &str) -> bool {
    for _ in 0..60 {
        term.master.write_all(b"size\r").unwrap();
        if term.read_until(seen, want, 1) {
            return true;
        }
    }
    false
}

/// `ctr run -t`: the process gets a terminal of the caller's size, and a
/// resize of the caller's terminal reaches it (ctr sends ResizePty on SIGWINCH).
fn tty_and_resize(ctd: &Containerd, runtime: &str, id: &str) {
    let rootfs = ctd.rootfs();
    let mut term = Terminal::spawn(
        ctd,
        &[
            "run",
            "--rm",
            "-t",
            "--runtime",
            runtime,
            "--rootfs",
            rootfs.to_str().unwrap(),
            id,
            "/bin/sh",
            "-c",
            // ctr sends its terminal's size right after Start, so the process
            // may begin before it: the size is asked for until it shows.
            "while read line; do [ \"$line\" = quit ] && exit 7; stty size; done",
        ],
        33,
        77,
    );
    let mut seen = String::new();
    assert!(
        ask_until(&mut term, &mut seen, "33 77"),
        "{runtime}: initial size not seen: {seen:?}\n{}",
        ctd.log_tail()
    );
    set_winsize(&term.master, 40, 100);
    // SIGWINCH reaches ctr asynchronously, and so does its ResizePty.
    assert!(
        ask_until(&mut term, &mut seen, "40 100"),
        "{runtime}: resize not seen: {seen:?}"
    );
    term.master.write_all(b"quit\r").unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = term.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "{runtime}: ctr -t did not exit");
        let mut buf = [0u8; 4096];
        let _ = term.master.read(&mut buf);
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(7), "{runtime}: exit code through -t");
}

#[test]
fn tty_with_resize_like_runc_v2() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    tty_and_resize(&ctd, RUNC_RUNTIME, "tty-rc");
    tty_and_resize(&ctd, LAZYBD_RUNTIME, "tty-lz");
}

/// Pause/resume, ps with an exec, a memory limit update and metrics: the
/// events and the metric names each runtime reports, to compare.
fn control_scenario(
    ctd: &Containerd,
    events: &EventRecorder,
    runtime: &str,
    id: &str,
) -> Vec<String> {
    run_detached(ctd, runtime, id, &[], &["/bin/sleep", "600"]);
    ctd.wait_task(60, id, "RUNNING");

    ctd.ctr_ok(&["task", "pause", id]);
    ctd.wait_task(60, id, "PAUSED");
    ctd.ctr_ok(&["task", "resume", id]);
    ctd.wait_task(60, id, "RUNNING");

    // ps: the init and a detached exec, by pid.
    ctd.ctr_ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "side",
        id,
        "/bin/sleep",
        "600",
    ]);
    let ps = ctd.ctr_ok(&["task", "ps", id]);
    let pids: Vec<&str> = ps.lines().skip(1).collect();
    assert_eq!(pids.len(), 2, "{runtime}: ps {ps}");

    // metrics, after a memory limit update (CRI's UpdateContainerResources).
    ctd.update_memory_limit(id, 67108864);
    let metrics = ctd.ctr_ok(&["task", "metrics", id]);
    let table: Vec<(String, String)> = metrics
        .lines()
        .skip_while(|l| !l.starts_with("METRIC"))
        .skip(1)
        .filter_map(|l| {
            let (name, value) = l.trim().split_once(char::is_whitespace)?;
            Some((name.to_string(), value.trim().to_string()))
        })
        .collect();
    let value = |name: &str| {
        table
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{runtime}: no {name} in {metrics}"))
    };
    assert_eq!(
        value("memory.limit_in_bytes"),
        "67108864",
        "{runtime}: {metrics}"
    );
    assert_ne!(value("memory.usage_in_bytes"), "0", "{runtime}: {metrics}");
    assert_ne!(value("cpuacct.usage"), "0", "{runtime}: {metrics}");
    assert_eq!(value("pids.current"), "2", "{runtime}: {metrics}");
    let names: Vec<String> = table.into_iter().map(|(n, _)| n).collect();

    remove(ctd, id);
    let mut observed = events_until(events, ctd, id, "/tasks/delete");
    observed.extend(names);
    observed
}

#[test]
fn pause_resume_ps_metrics_update_like_runc_v2() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    let events = EventRecorder::start(&ctd, "control");
    let ours = control_scenario(&ctd, &events, LAZYBD_RUNTIME, "ctl-lz");
    let theirs = control_scenario(&ctd, &events, RUNC_RUNTIME, "ctl-rc");
    assert_eq!(
        ours,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete",
            // then the metric names `ctr task metrics` shows
            "memory.usage_in_bytes",
            "memory.limit_in_bytes",
            "memory.stat.cache",
            "cpuacct.usage",
            "cpuacct.usage_percpu",
            "pids.current",
            "pids.limit"
        ]
    );
    assert_eq!(ours, theirs, "lazybd shim vs io.containerd.runc.v2");
}

/// A process that outgrows its memory limit: TaskOOM before TaskExit, 137.
fn oom_scenario(
    ctd: &Containerd,
    events: &EventRecorder,
    runtime: &str,
    id: &str,
) -> (Vec<String>, i32) {
    let rootfs = ctd.rootfs();
    // dd's 64 MiB buffer is touched in full by the read from /dev/zero.
    // It starts a second after the task: runc-v2 arms its OOM watch only
    // after start and would miss a kill that comes sooner (ours watches
    // from create on), and the two are compared.
    let out = ctd.ctr(&[
        "run",
        "--rm",
        "--runtime",
        runtime,
        "--memory-limit",
        "16777216",
        "--rootfs",
        rootfs.to_str().unwrap(),
        id,
        "/bin/sh",
        "-c",
        "sleep 1; exec /bin/dd if=/dev/zero of=/dev/null bs=64M count=1",
    ]);
    let code = out.status.code().unwrap_or(-1);
    (events_until(events, ctd, id, "/tasks/delete"), code)
}

#[test]
fn oom_kill_reports_task_oom_before_exit_like_runc_v2() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    let events = EventRecorder::start(&ctd, "oom");
    let (ours, code) = oom_scenario(&ctd, &events, LAZYBD_RUNTIME, "oom-lz");
    assert_eq!(code, 137, "OOM-killed exit code");
    assert_eq!(
        ours,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/oom",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let (theirs, their_code) = oom_scenario(&ctd, &events, RUNC_RUNTIME, "oom-rc");
    assert_eq!(
        (ours, code),
        (theirs, their_code),
        "lazybd shim vs io.containerd.runc.v2"
    );
}

#[test]
fn fifty_containers_at_once_all_cleaned_up() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    let rootfs = ctd.rootfs();
    let rootfs = rootfs.to_str().unwrap().to_string();
    let ids: Vec<String> = (0..50).map(|i| format!("many-{i}")).collect();
    let children: Vec<_> = ids
        .iter()
        .map(|id| {
            ctd.ctr_cmd(&[
                "run",
                "--rm",
                "--runtime",
                LAZYBD_RUNTIME,
                "--rootfs",
                &rootfs,
                id,
                "/bin/sh",
                "-c",
                &format!("echo {id}; exit 3"),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
        })
        .collect();
    for (id, child) in ids.iter().zip(children) {
        let out = child.wait_with_output().unwrap();
        assert_eq!(
            (
                String::from_utf8_lossy(&out.stdout).trim(),
                out.status.code()
            ),
            (id.as_str(), Some(3)),
            "{id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    ctd.wait_for(30, "every shim gone", || ctd.shim_pids().is_empty());
    assert!(ctd.tasks().is_empty(), "tasks left: {:?}", ctd.tasks());
    assert!(ctd.runc_containers().is_empty(), "runc state left");
    assert!(
        ctd.task_mounts().is_empty(),
        "rootfs mounts left: {:?}",
        ctd.task_mounts()
    );
}

#[test]
fn containerd_restart_reconnects_to_running_shims() {
    lazybd_tests::require_root!();
    let mut ctd = Containerd::start();
    run_detached(&ctd, LAZYBD_RUNTIME, "keep-1", &[], &["/bin/sleep", "600"]);
    run_detached(&ctd, LAZYBD_RUNTIME, "keep-2", &[], &["/bin/sleep", "600"]);
    ctd.wait_task(60, "keep-1", "RUNNING");
    ctd.wait_task(60, "keep-2", "RUNNING");
    let shims = ctd.shim_pids();
    assert_eq!(shims.len(), 2, "one shim per container");

    ctd.restart();
    let mut tasks = ctd.tasks();
    tasks.sort();
    assert_eq!(
        tasks,
        [
            ("keep-1".to_string(), "RUNNING".to_string()),
            ("keep-2".to_string(), "RUNNING".to_string())
        ]
    );
    let mut after = ctd.shim_pids();
    after.sort();
    let mut before = shims;
    before.sort();
    assert_eq!(after, before, "the same shims serve after the restart");
    // The reconnected shim still executes and reports exits.
    let out = ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "late",
        "keep-1",
        "/bin/echo",
        "still here",
    ]);
    assert_eq!(out.trim(), "still here");
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", "keep-1"]);
    ctd.wait_task(60, "keep-1", "STOPPED");
    remove(&ctd, "keep-1");
    remove(&ctd, "keep-2");
    ctd.wait_for(30, "shims gone", || ctd.shim_pids().is_empty());
}

#[test]
fn killed_shim_is_cleaned_up_by_containerd() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    let events = EventRecorder::start(&ctd, "killed");
    ctd.import_busybox("lazybd.test/busybox:killed");
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        LAZYBD_RUNTIME,
        "lazybd.test/busybox:killed",
        "victim",
        "/bin/sleep",
        "600",
    ]);
    ctd.wait_task(60, "victim", "RUNNING");
    let init: i32 = ctd
        .ctr_ok(&["task", "ls"])
        .lines()
        .find(|l| l.starts_with("victim"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|p| p.parse().ok())
        .expect("init pid");
    let shims = ctd.shim_pids();
    assert_eq!(shims.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(shims[0] as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // containerd notices the dead shim, runs `shim delete` and reports the
    // exit (137, as for runc-v2's) and the delete.
    let seen = events_until(&events, &ctd, "victim", "/tasks/delete");
    assert_eq!(
        seen,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    let exit = events.task_events(&ctd.namespace, "victim");
    assert_eq!(exit[2].1["exit_status"], 137);
    ctd.wait_for(30, "container process gone", || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(init), None).is_err()
    });
    ctd.ctr(&["task", "rm", "victim"]);
    ctd.ctr_ok(&["containers", "rm", "victim"]);
    assert!(ctd.runc_containers().is_empty(), "runc state left");
    ctd.wait_for(30, "rootfs unmounted", || ctd.task_mounts().is_empty());
}

#[test]
fn runc_options_come_from_the_runtime_config_file() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    // A runc that leaves a mark, so the test sees which binary the shim ran.
    let mark = ctd.dir().join("wrapped-runc.log");
    let wrapper = ctd.dir().join("wrapped-runc");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho \"$@\" >> {}\nexec runc \"$@\"\n",
            mark.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let config = ctd.dir().join("shim.toml");
    std::fs::write(&config, format!("BinaryName = \"{}\"\n", wrapper.display())).unwrap();
    let rootfs = ctd.rootfs();
    let run = |id: &str| {
        ctd.ctr(&[
            "run",
            "--rm",
            "--runtime",
            LAZYBD_RUNTIME,
            "--runtime-config-path",
            config.to_str().unwrap(),
            "--rootfs",
            rootfs.to_str().unwrap(),
            id,
            "/bin/echo",
            "wrapped",
        ])
    };
    let out = run("cfg-ok");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "wrapped",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let calls = std::fs::read_to_string(&mark).expect("the configured runc was not run");
    assert!(calls.lines().any(|l| l.contains("create")), "{calls}");

    // A typo in the file fails the container with the reason, and leaves no shim.
    std::fs::write(&config, "BinaryNam = \"runc\"\n").unwrap();
    let out = run("cfg-bad");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BinaryNam"), "{err}");
    ctd.ctr(&["containers", "rm", "cfg-bad"]);
    ctd.wait_for(30, "no shim left", || ctd.shim_pids().is_empty());
}

#[test]
fn a_failed_start_leaves_no_process_and_no_socket() {
    lazybd_tests::require_root!();
    // A containerd whose event socket is not there: the server cannot publish
    // events, so it must fail, and `start` must clean up after it.
    let bundle = tempfile::tempdir().unwrap();
    std::fs::write(
        bundle.path().join("config.json"),
        r#"{"ociVersion":"1.0.2"}"#,
    )
    .unwrap();
    let address = bundle.path().join("no-containerd.sock");
    let id = format!("failed-start-{}", std::process::id());
    let out = std::process::Command::new(lazybd_tests::bin_path("containerd-shim-lazybd-v2"))
        .args(["-namespace", "lbt", "-id", &id, "-address"])
        .arg(&address)
        .arg("start")
        .current_dir(bundle.path())
        .env(
            "TTRPC_ADDRESS",
            bundle.path().join("no-containerd.sock.ttrpc"),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "start succeeded without containerd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("shim server exited during start"), "{err}");
    assert!(
        !bundle.path().join("address").exists(),
        "address file written"
    );
    // The socket is named sha256(<containerd address>/<namespace>/<group>).
    use sha2::Digest;
    let name = hex::encode(sha2::Sha256::digest(format!(
        "{}/lbt/{id}",
        address.display()
    )));
    let socket = std::path::Path::new("/run/containerd/s").join(name);
    assert!(!socket.exists(), "{} left behind", socket.display());
    let left: Vec<_> = lazybd_tests::leaks::command_lines()
        .filter(|(_, cmdline)| cmdline.contains(&id))
        .collect();
    assert!(left.is_empty(), "a shim process is left");
}
