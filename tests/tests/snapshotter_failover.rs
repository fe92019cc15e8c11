//! lazybd-snapshotter restarted and upgraded under a running container
//! (containerd, `ctr run` with the lazybd runtime) that reads the files of
//! a still-lazy layer one after another: with an fd store keeping the FUSE
//! session, reads made while the daemon is gone wait and then succeed, and
//! every file's bytes are intact. Prefetch and traces are off, so every
//! file is fetched on demand while the daemon comes and goes.
//!
//! The page cache is dropped right after the daemon goes, so the reads in
//! the gap really reach the FUSE file; that they waited is checked by the
//! reader making (almost) no progress until the daemon is back.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lazybd_tests::containerd::{Containerd, LAZYBD_RUNTIME};
use lazybd_tests::fdstore::{FdHolder, SystemdStore};
use lazybd_tests::images::{publish_lazy_files, FilesImage};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric_or_zero, plain_http_config, SnapshotterDaemon};

const FILES: usize = 120;
const FILE_SIZE: usize = 96 << 10;
/// How long the daemon stays away (well within the 60 s read deadline).
const GAP: Duration = Duration::from_secs(2);

/// Reads every file once, 0.1 s apart, one line per file (its sha256, or
/// FAIL and the error), then DONE.
const READER: &str = "for f in /files/*; do \
    if s=$(busybox sha256sum \"$f\" 2>&1); then echo \"$s\"; else echo \"FAIL $f $s\"; fi >> /tmp/sums; \
    busybox sleep 0.1; done; echo DONE >> /tmp/sums; exec busybox sleep 3600";

enum Store {
    Holder(FdHolder),
    Systemd(Arc<SystemdStore>),
}

/// Fields drop in order: containerd first, then the snapshotter, its fd
/// store, the registry and the files.
struct Node {
    ctd: Containerd,
    snapshotter: SnapshotterDaemon,
    store: Store,
    img: FilesImage,
    _registry: Registry,
    _tmp: tempfile::TempDir,
}

impl Node {
    fn start(systemd: bool) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::start();
        let img = publish_lazy_files(tmp.path(), &registry, FILES, FILE_SIZE);
        let config = plain_http_config(&registry)
            + "[prefetch]\non_task_start = false\n[trace]\nrecord = false\nreplay = false\n";
        let dir = tmp.path().join("snapshotter");
        std::fs::create_dir_all(&dir).unwrap();
        let (snapshotter, store) = if systemd {
            let store = Arc::new(SystemdStore::start(&dir));
            let config = config + "[restart]\nfd_store = \"systemd\"\n";
            let s = SnapshotterDaemon::start_under_systemd(&dir, &config, store.clone());
            (s, Store::Systemd(store))
        } else {
            let holder = FdHolder::start(&dir);
            let config = config + &holder.snapshotter_config();
            (
                SnapshotterDaemon::start(&dir, &config),
                Store::Holder(holder),
            )
        };
        let ctd = Containerd::builder()
            .proxy_snapshotter(snapshotter.proxy())
            .namespace("default")
            .start();
        let out = lazybd_tests::cli::ok(&lazybd_tests::cli::lazybd(&[
            &"pull",
            &"--plain-http",
            &"--address",
            &ctd.socket(),
            &img.image.image,
        ]));
        assert!(out.contains("2 attached lazily"), "{out}");
        Node {
            ctd,
            snapshotter,
            store,
            img,
            _registry: registry,
            _tmp: tmp,
        }
    }

    fn holder(&mut self) -> &mut FdHolder {
        match &mut self.store {
            Store::Holder(h) => h,
            Store::Systemd(_) => panic!("no holder"),
        }
    }

    /// Starts container c1 running [`READER`].
    fn run_reader(&self) {
        self.ctd.ctr_ok(&[
            "run",
            "-d",
            "--snapshotter",
            "lazybd",
            "--runtime",
            LAZYBD_RUNTIME,
            &self.img.image.image,
            "c1",
            "/bin/sh",
            "-c",
            READER,
        ]);
    }

    /// The reader's output so far.
    fn sums(&self) -> String {
        let id = format!(
            "cat{}",
            EXEC.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = self
            .ctd
            .ctr(&["task", "exec", "--exec-id", &id, "c1", "/bin/busybox", "cat", "/tmp/sums"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Waits (bounded) until the reader wrote `n` lines; returns them.
    fn wait_lines(&self, n: usize, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let s = self.sums();
            if s.lines().count() >= n {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "the reader wrote {} of {n} lines within {within:?}:\n{s}\n{}",
                s.lines().count(),
                self.snapshotter.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The daemon is gone: drop the page cache so the reader's next reads
    /// reach the FUSE file, wait [`GAP`] and check it made no progress
    /// (its reads wait); returns the lines written when it went away.
    fn gap(&self) -> usize {
        std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
        let at_loss = self.sums().lines().count();
        std::thread::sleep(GAP);
        let waiting: Vec<String> = std::fs::read_dir("/sys/fs/fuse/connections")
            .map(|d| {
                d.flatten()
                    .map(|e| {
                        format!(
                            "{:?}={}",
                            e.file_name(),
                            std::fs::read_to_string(e.path().join("waiting")).unwrap_or_default().trim()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!("DEBUG waiting {waiting:?} pid {:?}\n{}", self.snapshotter.pid(), self.sums());
        let before_back = self.sums().lines().count();
        assert!(
            before_back <= at_loss + 2,
            "the reader went on from {at_loss} to {before_back} lines without the daemon: \
             its reads did not reach the FUSE session\n{}",
            self.snapshotter.log()
        );
        assert!(
            at_loss < FILES,
            "the reader finished before the daemon went away"
        );
        at_loss
    }

    /// Every file read once, with its bytes intact, and no failed read.
    fn assert_all_read_intact(&self, sums: &str) {
        let failed: Vec<&str> = sums.lines().filter(|l| l.starts_with("FAIL")).collect();
        assert!(failed.is_empty(), "failed reads: {failed:#?}");
        self.assert_files_intact(sums);
    }

    fn assert_files_intact(&self, sums: &str) {
        for (path, sha) in &self.img.files {
            let line = format!("{sha}  {path}");
            assert!(
                sums.lines().any(|l| l == line),
                "{path}: want {sha}, got:\n{sums}"
            );
        }
    }

    /// Stops and removes c1 (containerd may still be reconnecting to the
    /// restarted snapshotter: retried, bounded).
    fn remove_reader(&self) {
        self.ctd.ctr_ok(&["task", "kill", "-s", "KILL", "c1"]);
        self.ctd.wait_task(30, "c1", "STOPPED");
        self.ctd.ctr_ok(&["task", "rm", "c1"]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.ctd.ctr(&["container", "rm", "c1"]).status.success() {
            assert!(Instant::now() < deadline, "container rm c1");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

static EXEC: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// The daemon resumed its predecessor's session (and says so).
fn assert_resumed(snapshotter: &SnapshotterDaemon) {
    let log = snapshotter.log();
    assert!(
        log.contains("resumed the FUSE session"),
        "no resume in the log:\n{log}"
    );
    let metrics = snapshotter.metrics();
    assert_eq!(
        metric_or_zero(&metrics, "lazybd_read_errors_total"),
        0.0,
        "{metrics}"
    );
}

#[test]
fn sigkill_and_restart_under_a_reading_container_fails_no_read_with_the_holder() {
    require_root!();
    let mut node = Node::start(false);
    node.run_reader();
    node.wait_lines(15, Duration::from_secs(60));

    node.snapshotter.kill();
    node.gap();
    node.snapshotter.start_again();

    let sums = node.wait_lines(FILES + 1, Duration::from_secs(120));
    node.assert_all_read_intact(&sums);
    assert_resumed(&node.snapshotter);
    node.remove_reader();
}

#[test]
fn a_planned_upgrade_under_a_reading_container_fails_no_read_and_detaches_nothing() {
    require_root!();
    let mut node = Node::start(false);
    node.run_reader();
    node.wait_lines(15, Duration::from_secs(60));
    let loops_before = lazybd_tests::lazy_layers::leftovers(&node.snapshotter.root).1;

    // SIGTERM: the daemon hands over and exits; a new binary starts.
    node.snapshotter.stop();
    let log = node.snapshotter.log();
    assert!(log.contains("handed over"), "{log}");
    assert!(
        !log.contains("detached layer"),
        "SIGTERM detached a layer:\n{log}"
    );
    // Nothing was detached: the same loop devices, still on their files.
    let loops_gap = lazybd_tests::lazy_layers::leftovers(&node.snapshotter.root).1;
    assert_eq!(loops_gap, loops_before);
    node.gap();
    node.snapshotter.start_again();

    let sums = node.wait_lines(FILES + 1, Duration::from_secs(120));
    node.assert_all_read_intact(&sums);
    assert_resumed(&node.snapshotter);
    // The new daemon adopted the same devices.
    assert_eq!(
        lazybd_tests::lazy_layers::leftovers(&node.snapshotter.root).1,
        loops_before
    );
    node.remove_reader();
}

#[test]
fn sigkill_and_restart_fail_no_read_with_systemds_fd_store() {
    require_root!();
    let node = Node::start(true);
    let Store::Systemd(store) = &node.store else {
        unreachable!()
    };
    assert_eq!(store.ready_count(), 1, "READY=1 once serving");
    assert!(
        store.names().iter().any(|n| n.ends_with(".state")),
        "{:?}",
        store.names()
    );
    let mut node = node;
    node.run_reader();
    node.wait_lines(15, Duration::from_secs(60));

    node.snapshotter.kill();
    node.gap();
    node.snapshotter.start_again();

    let sums = node.wait_lines(FILES + 1, Duration::from_secs(120));
    node.assert_all_read_intact(&sums);
    assert_resumed(&node.snapshotter);
    let Store::Systemd(store) = &node.store else {
        unreachable!()
    };
    assert_eq!(store.ready_count(), 2);
    node.remove_reader();
}

/// The holder dies while the daemon serves: nothing breaks. Then the daemon
/// dies too: reads in that gap fail as without a holder (no worse), and the
/// next daemon recovers the container's reads (it finds the old loop
/// devices). Once the holder is back, the daemon gives it its session
/// again, and a further SIGKILL fails no read.
#[test]
fn the_holder_dying_breaks_nothing_until_the_daemon_dies_too() {
    require_root!();
    let mut node = Node::start(false);
    node.run_reader();
    node.wait_lines(10, Duration::from_secs(60));

    node.holder().kill();
    let at_holder_loss = node.sums().lines().count();
    let sums = node.wait_lines(at_holder_loss + 10, Duration::from_secs(60));
    assert!(
        !sums.contains("FAIL"),
        "reads failed after the holder died:\n{sums}"
    );

    // Now the daemon dies too, with nobody holding its session.
    node.snapshotter.kill();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    std::thread::sleep(GAP);
    node.snapshotter.start_again();
    let sums = node.wait_lines(FILES + 1, Duration::from_secs(180));
    // Reads in the gap may have failed (as without a holder); every read
    // after the daemon was back succeeded.
    let lines: Vec<&str> = sums.lines().collect();
    let last_fail = lines.iter().rposition(|l| l.starts_with("FAIL"));
    if let Some(i) = last_fail {
        assert!(
            i < lines.len() - 10,
            "reads still failed after the daemon was back:\n{sums}"
        );
    }
    // The container reads every file intact again.
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let all = node.ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "all",
        "c1",
        "/bin/sh",
        "-c",
        "sha256sum /files/*",
    ]);
    node.assert_files_intact(&all);

    // The holder comes back; the running daemon gives it its session.
    node.holder().start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node
        .snapshotter
        .log()
        .contains("is back; gave it this daemon's descriptors")
    {
        assert!(Instant::now() < deadline, "{}", node.snapshotter.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    // A second reader pass across another SIGKILL fails nothing.
    node.ctd.ctr_ok(&[
        "task",
        "exec",
        "-d",
        "--exec-id",
        "again",
        "c1",
        "/bin/sh",
        "-c",
        "busybox rm /tmp/sums; for f in /files/*; do if s=$(busybox sha256sum \"$f\" 2>&1); \
         then echo \"$s\"; else echo \"FAIL $f $s\"; fi >> /tmp/sums; busybox sleep 0.1; done; \
         echo DONE >> /tmp/sums",
    ]);
    node.wait_lines(15, Duration::from_secs(60));
    node.snapshotter.kill();
    node.gap();
    node.snapshotter.start_again();
    let sums = node.wait_lines(FILES + 1, Duration::from_secs(120));
    node.assert_all_read_intact(&sums);
    node.remove_reader();
}

#[test]
fn debug_gap() {
    require_root!();
    let mut node = Node::start(false);
    node.run_reader();
    node.wait_lines(5, Duration::from_secs(60));
    let mnt = node.snapshotter.root.join("lazy/mnt");
    for e in std::fs::read_dir(&mnt).unwrap().flatten() {
        eprintln!("DEBUG mnt {:?} {:?}", e.path(), lazybd_blockdev::device::mounts::mount_info(&e.path()));
    }
    for (n, b) in lazybd_tests::lazy_layers::leftovers(&node.snapshotter.root).1 {
        eprintln!("DEBUG loop{n} {b:?} dio={:?}", std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")));
    }
    node.snapshotter.kill();
    std::thread::sleep(Duration::from_millis(300));
    for (n, b) in lazybd_tests::lazy_layers::leftovers(&node.snapshotter.root).1 {
        eprintln!("DEBUG after kill loop{n} {b:?}");
    }
    let target = std::fs::read_dir(&mnt).unwrap().flatten().map(|e| e.path().join("files/f100")).find(|p| std::path::Path::new(p.parent().unwrap()).exists()).unwrap();
    std::fs::write("/proc/sys/vm/drop_caches", "3").unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let t2 = target.clone();
    std::thread::spawn(move || { let r = std::fs::read(&t2).map(|d| d.len()); let _ = tx.send(r); });
    eprintln!("DEBUG direct read {:?}: {:?}", target, rx.recv_timeout(Duration::from_secs(3)));
    eprintln!("DEBUG sums\n{}", node.sums());
    std::thread::sleep(Duration::from_secs(1));
    node.snapshotter.start_again();
    eprintln!("DEBUG after restart: {:?}", rx.recv_timeout(Duration::from_secs(10)));
    let hl = node.holder().log();
    for l in hl.lines().chain(node.snapshotter.log().lines()).filter(|l| !l.contains("attached lazily") && !l.contains("cache opened")) {
        eprintln!("DEBUG LOG {l}");
    }
    node.remove_reader();
}
