//! `ctr run` through containerd-shim-lazybd-v2 against a private containerd
//! 1.6, side by side with containerd's own io.containerd.runc.v2: exit codes,
//! stdio and the task event sequence must be the same.

use std::{process::Child, time::Duration};

use lazybd_tests::containerd::{Containerd, EventRecorder, LAZYBD_RUNTIME, RUNC_RUNTIME};

/// What one runtime did in the scenarios, to compare runtimes.
#[derive(Debug, PartialEq)]
struct Observed {
    exit_codes: Vec<(String, i32)>,
    events: Vec<(String, Vec<String>)>,
    exit_statuses: Vec<(String, Vec<u64>)>,
}

fn code(out: &std::process::Output) -> i32 {
    out.status.code().unwrap_or(-1)
}

fn wait_child(child: &mut Child, secs: u64) -> i32 {
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    panic!("ctr did not finish within {secs}s");
}

fn scenarios(ctd: &Containerd, events: &EventRecorder, runtime: &str, prefix: &str) -> Observed {
    let rootfs = ctd.rootfs();
    let rootfs = rootfs.to_str().unwrap();
    let run = |id: &str, extra: &[&str]| -> Vec<String> {
        let mut args = vec!["run", "--rm", "--runtime", runtime, "--rootfs", rootfs, id];
        args.extend_from_slice(extra);
        args.into_iter().map(str::to_owned).collect()
    };
    let mut exit_codes = Vec::new();
    let ids: Vec<String> = ["echo", "fail", "stdio", "sigkill", "sigterm"]
        .iter()
        .map(|s| format!("{prefix}-{s}"))
        .collect();

    // echo: stdout through the fifo, exit 0
    let out = ctd.ctr(&args(&run(&ids[0], &["/bin/echo", "hello", "world"])));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello world\n",
        "{runtime}"
    );
    exit_codes.push(("echo".into(), code(&out)));

    // exit 1
    let out = ctd.ctr(&args(&run(&ids[1], &["/bin/sh", "-c", "exit 1"])));
    exit_codes.push(("exit 1".into(), code(&out)));

    // stdin to cat, stdout and stderr apart
    let out = ctd.ctr_with_input(
        &args(&run(&ids[2], &["/bin/sh", "-c", "cat; echo to-stderr >&2"])),
        &ids[2],
        b"line one\nline two\n",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "line one\nline two\n",
        "{runtime}"
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("to-stderr"),
        "{runtime}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exit_codes.push(("stdio".into(), code(&out)));

    // SIGKILL to the init: 137
    let mut child = ctd
        .ctr_cmd(&args(&run(&ids[3], &["/bin/sleep", "300"])))
        .spawn()
        .unwrap();
    ctd.wait_task(30, &ids[3], "RUNNING");
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", &ids[3]]);
    exit_codes.push(("SIGKILL".into(), wait_child(&mut child, 60)));

    // SIGTERM to an exec (an init ignores it: it is pid 1): 143
    let id = &ids[4];
    ctd.ctr_ok(&[
        "run",
        "-d",
        "--runtime",
        runtime,
        "--rootfs",
        rootfs,
        id,
        "/bin/sleep",
        "300",
    ]);
    let mut exec = ctd
        .ctr_cmd(&[
            "task",
            "exec",
            "--exec-id",
            "sleeper",
            id,
            "/bin/sleep",
            "300",
        ])
        .spawn()
        .unwrap();
    ctd.wait_for(30, "exec running", || {
        ctd.ctr_ok(&["task", "ps", id]).lines().count() == 3
    });
    ctd.ctr_ok(&["task", "kill", "--exec-id", "sleeper", "-s", "SIGTERM", id]);
    exit_codes.push(("exec SIGTERM".into(), wait_child(&mut exec, 60)));
    ctd.ctr_ok(&["task", "kill", "-s", "SIGKILL", id]);
    ctd.wait_task(30, id, "STOPPED");
    ctd.ctr_ok(&["task", "rm", id]);
    ctd.ctr_ok(&["containers", "rm", id]);
    // Events are delivered asynchronously.
    std::thread::sleep(Duration::from_millis(500));
    let mut observed = Observed {
        exit_codes,
        events: Vec::new(),
        exit_statuses: Vec::new(),
    };
    for id in &ids {
        let short = id.split_once('-').unwrap().1.to_string();
        let seen = events.task_events(&ctd.namespace, id);
        observed
            .events
            .push((short.clone(), seen.iter().map(|(t, _)| t.clone()).collect()));
        observed.exit_statuses.push((
            short,
            seen.iter()
                .filter(|(t, _)| t == "/tasks/exit")
                .map(|(_, e)| e["exit_status"].as_u64().unwrap_or(0))
                .collect(),
        ));
    }
    observed
}

fn args(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn exit_codes_stdio_and_events_match_runc_v2() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    let events = EventRecorder::start(&ctd, "run");
    let ours = scenarios(&ctd, &events, LAZYBD_RUNTIME, "lz");
    let theirs = scenarios(&ctd, &events, RUNC_RUNTIME, "rc");

    let expected_codes: Vec<(String, i32)> = [
        ("echo", 0),
        ("exit 1", 1),
        ("stdio", 0),
        ("SIGKILL", 137),
        ("exec SIGTERM", 143),
    ]
    .iter()
    .map(|(s, c)| (s.to_string(), *c))
    .collect();
    assert_eq!(ours.exit_codes, expected_codes);
    let plain = [
        "/tasks/create",
        "/tasks/start",
        "/tasks/exit",
        "/tasks/delete",
    ];
    assert_eq!(ours.events[0].1, plain, "echo events");
    assert_eq!(
        ours.events[4].1,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ],
        "exec events"
    );
    assert_eq!(ours.exit_statuses[3].1, [137]);
    assert_eq!(ours.exit_statuses[4].1, [143, 137]);
    assert_eq!(ours, theirs, "lazybd shim vs io.containerd.runc.v2");
    assert!(ctd.runc_containers().is_empty(), "runc state left behind");
}

#[test]
fn image_rootfs_is_mounted_for_the_task_and_unmounted_after() {
    lazybd_tests::require_root!();
    let ctd = Containerd::start();
    ctd.import_busybox("lazybd.test/busybox:1");
    let out = ctd.ctr_ok(&[
        "run",
        "--rm",
        "--runtime",
        LAZYBD_RUNTIME,
        "lazybd.test/busybox:1",
        "img1",
        "/bin/sh",
        "-c",
        "ls /bin/busybox && cat /proc/self/mountinfo",
    ]);
    assert!(out.contains("/bin/busybox"), "{out}");
    // The rootfs the shim mounted from the snapshotter's overlay mounts.
    assert!(
        out.lines()
            .any(|l| l.contains(" / / ") && l.contains("overlay")),
        "root is not the snapshot overlay: {out}"
    );
    ctd.wait_for(20, "rootfs unmounted", || ctd.task_mounts().is_empty());
    assert!(ctd.shim_pids().is_empty(), "shim left running");
}
