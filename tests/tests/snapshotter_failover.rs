//! lazybd-snapshotter restarted and upgraded under a running container
//! (private containerd, `ctr run` with the lazybd runtime) whose readers
//! read the files of a still-lazy layer one after another: with
//! `lazybd fd-holder` keeping the FUSE session, reads made while the daemon
//! is gone wait and are answered by the next daemon, and every file's bytes
//! are intact.
//!
//! That reads really happen in the gap is proved, not assumed: prefetch,
//! traces and lazy readahead are off, the files are large and random, and
//! each reader visits them in an order far apart in the blob, so no demand
//! window fetched them first. During the gap the test samples the kernel's
//! count of requests waiting on the session (`/sys/fs/fuse/connections/N/
//! waiting`) and, afterwards, finds reads that started while the daemon was
//! gone and ended after the next one was up.
//!
//! Nothing here waits without a deadline: the readers write their results
//! to a directory bind-mounted from the host, which the test reads directly
//! (no `ctr exec` into a container whose reads may hang), and a test that
//! fails while its daemon is gone aborts the FUSE connection it created
//! before containerd kills the container, so no reader stays stuck on it.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use lazybd_tests::containerd::{Containerd, LazyRun, LAZYBD_RUNTIME};
use std::sync::Arc;

use lazybd_tests::fdstore::{FdHolder, SystemdStore};
use lazybd_tests::images::{publish_lazy_files, FilesImage};
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric_sum, plain_http_config, SnapshotterDaemon};

/// Files per up to four reader containers: 48 for one container.
const FILES_PER_4_CONTAINERS: usize = 48;
/// Larger than the fetcher's largest demand window (1 MiB of blob): a
/// window opened by one file's miss reaches at most the next file.
const FILE_SIZE: usize = 1 << 20;
/// Readers running at once in each reader container, each on its own share
/// of the files.
const READERS: usize = 3;
/// Files visited about this far apart (the first of these coprime with the
/// number of files): consecutive reads are far apart in the blob.
const STRIDES: [usize; 3] = [7, 11, 13];
/// Reader containers run at once by the SIGKILL case: 1, or more to
/// measure a restart under many (docs/benchmarks.md). The others run one.
const CONTAINERS_ENV: &str = "LAZYBD_FAILOVER_CONTAINERS";
/// How long the daemon stays away (well within the 60 s read deadline).
const GAP: Duration = Duration::from_secs(2);

/// A node: a registry with the files image, the snapshotter with an fd
/// store, a private containerd. Fields drop in order: containerd first,
/// then the snapshotter, the store, the rest.
struct Node {
    fuse: FuseConnection,
    ctd: Containerd,
    snapshotter: SnapshotterDaemon,
    store: Store,
    img: FilesImage,
    /// Where the reader containers' `/out` directories are on the host.
    out: PathBuf,
    /// The out directories of the reader containers started so far.
    readers: Vec<PathBuf>,
    /// Reader containers [`Node::run_readers`] starts.
    containers: usize,
    registry: Registry,
    _tmp: tempfile::TempDir,
}

/// Where the FUSE session waits while the daemon is gone.
enum Store {
    Holder(FdHolder),
    Systemd(Arc<SystemdStore>),
}

impl Node {
    fn start(systemd: bool) -> Node {
        Self::with_containers(systemd, 1)
    }

    /// A node whose [`run_readers`](Self::run_readers) starts `containers`
    /// reader containers, each on its own share of the files (more files
    /// for more containers, so that every reader still has files to read
    /// after the first few).
    fn with_containers(systemd: bool, containers: usize) -> Node {
        let tmp = tempfile::tempdir().unwrap();
        let registry = Registry::start();
        let files = FILES_PER_4_CONTAINERS * containers.div_ceil(4);
        let img = publish_lazy_files(tmp.path(), &registry, files, FILE_SIZE);
        let dir = tmp.path().join("snapshotter");
        std::fs::create_dir_all(&dir).unwrap();
        let ctd_dir = lazybd_tests::containerd::new_dir();
        // lazy_read_ahead_kb is top-level: before any table.
        let config = "lazy_read_ahead_kb = 0\n".to_owned()
            + &plain_http_config(&registry)
            + &format!(
                "[containerd]\naddress = \"{}\"\n",
                lazybd_tests::containerd::socket_in(ctd_dir.path()).display()
            )
            + "[prefetch]\non_task_start = false\n[trace]\nrecord = false\nreplay = false\n";
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
            .in_dir(ctd_dir)
            .proxy_snapshotter(snapshotter.proxy())
            .namespace("default")
            .start();
        let out = ctd.lazybd_pull(&img.image.image);
        assert!(out.contains("2 attached lazily"), "{out}");
        let fuse = FuseConnection::of(&snapshotter.root.join("lazy/fuse"));
        let out = tmp.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        Node {
            fuse,
            ctd,
            snapshotter,
            store,
            img,
            out,
            readers: Vec::new(),
            containers,
            registry,
            _tmp: tmp,
        }
    }

    fn holder(&mut self) -> &mut FdHolder {
        match &mut self.store {
            Store::Holder(h) => h,
            Store::Systemd(_) => panic!("no holder"),
        }
    }

    /// Starts the node's reader containers, each with [`READERS`] readers
    /// that read their share of the files (`pause` seconds apart), each
    /// writing to `/out/rN` one line per file: `START END SHA256
    /// /files/NAME` (uptime seconds), or `START END FAIL /files/NAME
    /// ERROR`, then `DONE`. Each container's `/out` is a directory of its
    /// own under [`Node::out`]. Returns the containers' ids.
    fn run_readers(&mut self, pause: &str) -> Vec<String> {
        let files = self.img.files.len();
        let stride = STRIDES
            .into_iter()
            .find(|s| gcd(*s, files) == 1)
            .expect("a stride coprime with the number of files");
        let order: Vec<String> = (0..files)
            .map(|i| self.img.files[(i * stride) % files].0.clone())
            .collect();
        let all_readers = self.containers * READERS;
        let ids = (0..self.containers)
            .map(|c| {
                // All start together once every container runs (starting
                // many takes a while): `go` in each one's out directory.
                let mut script = String::from(
                    "while [ ! -e /out/go ]; do busybox sleep 0.1; done; r() { n=$1; shift; for f in \"$@\"; do read s _ < /proc/uptime; \
                     if h=$(busybox sha256sum /files/$f 2>&1); then o=\"$h\"; else o=\"FAIL /files/$f $h\"; fi; \
                     read e _ < /proc/uptime; echo \"$s $e $o\" >> /out/r$n; ",
                );
                script += &format!("busybox sleep {pause}; done; echo DONE >> /out/r$n; }}; ");
                for r in 0..READERS {
                    let share: Vec<&str> = order
                        .iter()
                        .skip(c * READERS + r)
                        .step_by(all_readers)
                        .map(String::as_str)
                        .collect();
                    script += &format!("r {r} {} & ", share.join(" "));
                }
                script += "wait; exec busybox sleep 3600";
                let (id, out) = self.run(&script);
                self.readers.push(out);
                id
            })
            .collect::<Vec<String>>();
        for out in &self.readers {
            std::fs::write(out.join("go"), "").unwrap();
        }
        ids
    }

    /// Starts a container of the image running `script` with a new out
    /// directory as `/out`; its id and that directory.
    fn run(&self, script: &str) -> (String, PathBuf) {
        // runc's state is per runtime root, shared by the tests running at
        // once in this process and by earlier runs: unique ids.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let id = format!(
            "reader-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let out = self.out.join(&id);
        std::fs::create_dir_all(&out).unwrap();
        let mount = format!("type=bind,src={},dst=/out,options=rbind:rw", out.display());
        self.ctd.ctr_ok(
            &LazyRun {
                image: &self.img.image.image,
                id: &id,
                detach: true,
                runtime: Some(LAZYBD_RUNTIME),
                options: &["--mount", &mount],
                cmd: &["/bin/sh", "-c", script],
            }
            .args(),
        );
        (id, out)
    }

    /// Readers started so far, in all reader containers.
    fn reader_count(&self) -> usize {
        self.readers.len() * READERS
    }

    /// Every reader's lines so far.
    fn lines(&self) -> Vec<Line> {
        self.readers
            .iter()
            .flat_map(|dir| (0..READERS).map(move |r| dir.join(format!("r{r}"))))
            .flat_map(|file| {
                let text = std::fs::read_to_string(file).unwrap_or_default();
                let mut lines: Vec<Line> = text.lines().map(Line::parse).collect();
                for i in 1..lines.len() {
                    lines[i].since = lines[i - 1].end;
                }
                lines
            })
            .collect()
    }

    /// Waits (at most `within`) until the readers wrote `n` lines.
    fn wait_lines(&self, n: usize, within: Duration) -> Vec<Line> {
        let deadline = Instant::now() + within;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "the readers wrote {} of {n} lines within {within:?}: {lines:#?}\n{}",
                lines.len(),
                self.snapshotter.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until every reader is done; returns the file lines.
    fn wait_done(&self, within: Duration) -> Vec<Line> {
        assert_eq!(self.readers.len(), self.containers, "one run of readers");
        let lines = self.wait_lines(self.img.files.len() + self.reader_count(), within);
        lines.into_iter().filter(|l| l.file.is_some()).collect()
    }

    /// SIGKILL of the snapshotter, the gap, a new daemon on the same config:
    /// the readers finish with every file intact; what crossed the gap.
    fn kill_and_restart(&mut self) -> GapReport {
        let down = uptime();
        self.snapshotter.kill();
        let (most_waiting, during) = self.gap();
        assert!(
            during <= self.reader_count(),
            "{during} reads completed without the daemon"
        );
        let up = uptime();
        self.snapshotter.start_again();
        let lines = self.wait_done(Duration::from_secs(90));
        self.assert_all_read_intact(&lines);
        across_the_gap(self, &lines, down, up, most_waiting)
    }

    /// While the daemon is gone: for [`GAP`], the most requests the kernel
    /// had waiting on the session at once, and the lines written meanwhile.
    fn gap(&self) -> (u64, usize) {
        let at_loss = self.lines().len();
        let until = Instant::now() + GAP;
        let mut most = 0;
        while Instant::now() < until {
            most = most.max(self.fuse.waiting());
            std::thread::sleep(Duration::from_millis(20));
        }
        (most, self.lines().len() - at_loss)
    }

    /// Every file read exactly once, with its bytes intact; no read failed.
    fn assert_all_read_intact(&self, lines: &[Line]) {
        let failed: Vec<&Line> = lines.iter().filter(|l| l.failed).collect();
        assert!(
            failed.is_empty(),
            "failed reads: {failed:#?}\n{}",
            self.snapshotter.log()
        );
        for (name, sha) in &self.img.files {
            let got: Vec<&Line> = lines
                .iter()
                .filter(|l| l.file.as_deref() == Some(name))
                .collect();
            assert!(
                got.len() == 1 && got[0].sha.as_deref() == Some(sha.as_str()),
                "/files/{name}: want {sha} once, got {got:#?}"
            );
        }
    }

    /// Stops and removes containers (containerd may still be reconnecting
    /// to the restarted snapshotter: retried, bounded).
    fn remove(&self, ids: &[String]) {
        for id in ids {
            self.remove_one(id);
        }
    }

    fn remove_one(&self, id: &str) {
        // Its task may have exited already (its init died in a gap).
        let _ = self.ctd.ctr(&["task", "kill", "-s", "KILL", id]);
        self.ctd.wait_task(30, id, "STOPPED");
        self.ctd.ctr_ok(&["task", "rm", id]);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.ctd.ctr(&["container", "rm", id]).status.success() {
            assert!(Instant::now() < deadline, "container rm {id}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// One line of a reader.
#[derive(Debug)]
struct Line {
    start: f64,
    end: f64,
    /// When this reader's previous read ended (its pause and the fork and
    /// exec of `sha256sum` come between, and any of them may wait on the
    /// lazy layer too): `start` for its first read.
    since: f64,
    file: Option<String>,
    sha: Option<String>,
    failed: bool,
    raw: String,
}

impl Line {
    fn parse(raw: &str) -> Line {
        let mut words = raw.split_whitespace();
        let start = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
        let end = words.next().and_then(|w| w.parse().ok()).unwrap_or(0.0);
        let third = words.next();
        let failed = third == Some("FAIL");
        let (sha, path) = if failed {
            (None, words.next())
        } else {
            (third.map(str::to_owned), words.next())
        };
        Line {
            start,
            end,
            since: start,
            file: path
                .and_then(|p| p.strip_prefix("/files/"))
                .map(str::to_owned),
            sha,
            failed: failed || (raw != "DONE" && path.is_none()),
            raw: raw.to_owned(),
        }
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Seconds since boot, the clock the readers stamp their lines with.
fn uptime() -> f64 {
    std::fs::read_to_string("/proc/uptime")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// The kernel's FUSE connection of a mount: how many requests wait on it,
/// and where to abort it.
struct FuseConnection {
    dir: PathBuf,
}

impl FuseConnection {
    fn of(mountpoint: &Path) -> FuseConnection {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(mountpoint).unwrap().dev();
        // FUSE superblocks have anonymous devices (major 0): the kernel
        // names the connection by the minor.
        assert_eq!(nix::sys::stat::major(dev), 0, "{}", mountpoint.display());
        let dir = PathBuf::from(format!(
            "/sys/fs/fuse/connections/{}",
            nix::sys::stat::minor(dev)
        ));
        assert!(dir.join("waiting").exists(), "{}", dir.display());
        FuseConnection { dir }
    }

    fn waiting(&self) -> u64 {
        std::fs::read_to_string(self.dir.join("waiting"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Node {
    /// A test that failed while the daemon was gone would leave readers
    /// stuck on its session (the fd store still holds it), and containerd's
    /// cleanup waiting on them: abort the session first. A running daemon
    /// answers them and shuts down cleanly on its own.
    fn drop(&mut self) {
        if std::thread::panicking() && !self.snapshotter.running() {
            let _ = std::fs::write(self.fuse.dir.join("abort"), "1");
            // Nobody will detach the layers: their mounts go with the last
            // user (the loop devices clear themselves then).
            let (mounts, _) = lazybd_tests::lazy_layers::leftovers(&self.snapshotter.root);
            for m in mounts.iter().rev() {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

/// What the gap did to the readers.
struct GapReport {
    /// Reads that started while the daemon was gone (or were in flight
    /// when it went) and were answered once the next daemon was up.
    reads_across: usize,
    /// Requests the kernel had waiting on the session at once in the gap.
    most_waiting: u64,
    /// The longest step of a reader (pause, exec, read).
    longest: f64,
}

/// The readers waited across the gap (`down`..`up`, uptime seconds) and
/// were answered after `up`: a reader's step (pause, exec, read) takes
/// about half a second, so one that made no progress from shortly after
/// `down` until `up` waited on the session.
fn across_the_gap(node: &Node, lines: &[Line], down: f64, up: f64, most_waiting: u64) -> GapReport {
    let across: Vec<&Line> = lines
        .iter()
        .filter(|l| l.since <= down + 0.5 && l.end >= up)
        .collect();
    let longest = lines.iter().map(|l| l.end - l.since).fold(0.0, f64::max);
    let longest_read = lines.iter().map(|l| l.end - l.start).fold(0.0, f64::max);
    let first_answer = across.iter().map(|l| l.end).fold(f64::MAX, f64::min);
    let last_answer = across.iter().map(|l| l.end).fold(0.0, f64::max);
    // For comparison: what a read took when no daemon went away.
    let longest_other = lines
        .iter()
        .filter(|l| l.end < down || l.start > up)
        .map(|l| l.end - l.start)
        .fold(0.0, f64::max);
    eprintln!(
        "gap {:.2}s: {} reads across it, at most {most_waiting} requests waiting, \
         first of them answered {:.2}s after the daemon went, the last {:.2}s, longest step {longest:.2}s, longest read {longest_read:.2}s \
         (outside the gap {longest_other:.2}s): {:#?}",
        up - down,
        across.len(),
        first_answer - down,
        last_answer - down,
        across.iter().map(|l| &l.raw).collect::<Vec<_>>()
    );
    assert!(
        most_waiting > 0,
        "no request waited on the FUSE session while the daemon was gone: \
         the gap proved nothing\n{}",
        node.snapshotter.log()
    );
    assert!(
        !across.is_empty(),
        "no read was waiting when the next daemon came: {lines:#?}"
    );
    GapReport {
        reads_across: across.len(),
        most_waiting,
        longest,
    }
}

/// The new daemon resumed its predecessor's session, served reads itself
/// (its own counters start at zero) and failed none.
fn assert_resumed_and_served(snapshotter: &SnapshotterDaemon) {
    let log = snapshotter.log();
    assert!(
        log.contains("resumed the FUSE session"),
        "no resume in the log:\n{log}"
    );
    let metrics = snapshotter.metrics();
    assert_eq!(
        metric_sum(&metrics, "lazybd_read_errors_total"),
        0.0,
        "{metrics}"
    );
    assert!(
        metric_sum(&metrics, "lazybd_cache_misses_total") > 0.0,
        "the resumed daemon fetched nothing:\n{metrics}"
    );
}

/// The loop devices under the snapshotter's root, by number (a layer that
/// completes moves its device onto the cache file: the same device).
fn loop_numbers(snapshotter: &SnapshotterDaemon) -> Vec<u32> {
    let mut numbers: Vec<u32> = lazybd_tests::lazy_layers::leftovers(&snapshotter.root)
        .1
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    numbers.sort_unstable();
    numbers
}

/// Also the restart under many containers: `LAZYBD_FAILOVER_CONTAINERS=20`
/// runs 20 reader containers (docs/benchmarks.md has the figures).
#[test]
fn sigkill_and_restart_under_reading_containers_fail_no_read() {
    require_root!();
    let containers = match std::env::var(CONTAINERS_ENV) {
        Ok(n) => n
            .parse()
            .ok()
            .filter(|n| (1..=64).contains(n))
            .unwrap_or_else(|| panic!("{CONTAINERS_ENV}={n}: a number from 1 to 64")),
        Err(_) => 1,
    };
    let mut node = Node::with_containers(false, containers);
    let ids = node.run_readers("0.4");
    node.wait_lines(2 * node.reader_count(), Duration::from_secs(60));

    let report = node.kill_and_restart();
    assert!(report.reads_across >= 1 && report.most_waiting >= 1);
    assert!(
        report.longest < 30.0,
        "a reader stalled {}s",
        report.longest
    );
    assert_resumed_and_served(&node.snapshotter);
    node.remove(&ids);
}

#[test]
fn a_planned_upgrade_under_reading_containers_fails_no_read_and_detaches_nothing() {
    require_root!();
    let mut node = Node::start(false);
    let ids = node.run_readers("0.4");
    node.wait_lines(2 * node.reader_count(), Duration::from_secs(60));
    let loops_before = loop_numbers(&node.snapshotter);

    // SIGTERM: the daemon hands over and exits; a new binary starts.
    let down = uptime();
    node.snapshotter.stop();
    let log = node.snapshotter.log();
    assert!(log.contains("handed over"), "{log}");
    assert!(
        !log.contains("detached layer"),
        "SIGTERM detached a layer:\n{log}"
    );
    assert_eq!(
        loop_numbers(&node.snapshotter),
        loops_before,
        "the loop devices changed while nobody served"
    );
    let (most_waiting, during) = node.gap();
    assert!(
        during <= node.reader_count(),
        "{during} reads completed without the daemon"
    );
    let up = uptime();
    node.snapshotter.start_again();

    let lines = node.wait_done(Duration::from_secs(90));
    node.assert_all_read_intact(&lines);
    across_the_gap(&node, &lines, down, up, most_waiting);
    assert_resumed_and_served(&node.snapshotter);
    assert_eq!(
        loop_numbers(&node.snapshotter),
        loops_before,
        "the new daemon did not adopt the same loop devices"
    );
    node.remove(&ids);
}

/// The holder dies while the daemon serves: nothing breaks. A new holder
/// comes; the daemon gives it its session, and a SIGKILL of the daemon
/// afterwards fails no read.
#[test]
fn the_holder_dying_under_a_serving_daemon_breaks_nothing() {
    require_root!();
    let mut node = Node::start(false);
    let ids = node.run_readers("0.3");
    node.wait_lines(node.reader_count(), Duration::from_secs(60));

    node.holder().kill();
    let at_loss = node.lines().len();
    let lines = node.wait_lines(at_loss + 2 * node.reader_count(), Duration::from_secs(60));
    assert!(
        lines.iter().all(|l| !l.failed),
        "reads failed after the holder died: {lines:#?}"
    );

    node.holder().start_again();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node
        .snapshotter
        .log()
        .contains("is back; gave it this daemon's descriptors")
    {
        assert!(
            Instant::now() < deadline,
            "the daemon did not give the new holder its session:\n{}",
            node.snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let down = uptime();
    node.snapshotter.kill();
    let (most_waiting, _) = node.gap();
    let up = uptime();
    node.snapshotter.start_again();
    let lines = node.wait_done(Duration::from_secs(90));
    node.assert_all_read_intact(&lines);
    across_the_gap(&node, &lines, down, up, most_waiting);
    assert_resumed_and_served(&node.snapshotter);
    node.remove(&ids);
}

/// The daemon dies with reads it took from the kernel and had not answered
/// (their fetches hang on a frozen registry): the next daemon has the
/// kernel resend them (`FUSE_NOTIFY_RESEND`) and answers them.
#[test]
fn sigkill_with_reads_in_flight_fails_no_read() {
    require_root!();
    let mut node = Node::start(false);
    let ids = node.run_readers("0.4");
    node.wait_lines(2 * node.reader_count(), Duration::from_secs(60));

    let frozen = node.registry.freeze();
    // Every reader's next read misses and its fetch hangs: the daemon has
    // taken those requests from the kernel.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node.fuse.waiting() < READERS as u64 {
        assert!(
            Instant::now() < deadline,
            "only {} requests waiting on the frozen registry",
            node.fuse.waiting()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let in_flight = node.fuse.waiting();
    let down = uptime();
    node.snapshotter.kill();
    drop(frozen);
    let (most_waiting, during) = node.gap();
    assert_eq!(during, 0, "reads completed without the daemon");
    let up = uptime();
    node.snapshotter.start_again();

    let lines = node.wait_done(Duration::from_secs(90));
    node.assert_all_read_intact(&lines);
    eprintln!("{in_flight} requests in flight at SIGKILL");
    let report = across_the_gap(&node, &lines, down, up, most_waiting);
    assert!(
        report.reads_across >= READERS,
        "{} reads across the gap",
        report.reads_across
    );
    assert_resumed_and_served(&node.snapshotter);
    node.remove(&ids);
}

#[test]
fn sigkill_and_restart_fail_no_read_with_systemds_fd_store() {
    require_root!();
    let mut node = Node::start(true);
    let Store::Systemd(store) = &node.store else {
        unreachable!()
    };
    let store = store.clone();
    assert_eq!(store.ready_count(), 1, "READY=1 once serving");
    let ids = node.run_readers("0.4");
    node.wait_lines(2 * node.reader_count(), Duration::from_secs(60));

    node.kill_and_restart();
    assert_resumed_and_served(&node.snapshotter);
    assert_eq!(store.ready_count(), 2);
    node.remove(&ids);
}

/// The holder dies, and then the daemon too, with no holder back: no worse
/// than without an fd store. The session dies with the daemon, so reads in
/// the gap fail (and a process that pages in a file of the layer, like the
/// readers' shell, may die of SIGBUS); the next daemon starts without a
/// store, mounts a new session, attaches the layers again and points the
/// old loop devices under the running containers at its files: those
/// containers read every file intact again, a new container of the image
/// too, and nothing is left mounted or attached once the containers and
/// the daemon are gone.
#[test]
fn the_holder_and_then_the_daemon_dying_fail_reads_only_until_the_next_daemon_serves() {
    require_root!();
    let mut node = Node::start(false);
    // A container that only sleeps through the gap: it pages nothing in.
    let (idle, _) = node.run("exec busybox sleep 3600");
    let ids = node.run_readers("0.4");
    node.wait_lines(2 * node.reader_count(), Duration::from_secs(60));

    node.holder().kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.snapshotter.log().contains("went away") {
        assert!(
            Instant::now() < deadline,
            "the daemon did not notice the holder going:\n{}",
            node.snapshotter.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let loops_before = loop_numbers(&node.snapshotter);
    let log_before = node.snapshotter.log().len();

    let down = uptime();
    node.snapshotter.kill();
    std::thread::sleep(GAP);
    node.snapshotter.start_again();
    // With nothing holding the FUSE session, a read fails at once until
    // the next daemon serves, which `start_again` waits for: the gap ends
    // then, not when the daemon was started (a read started while it was
    // attaching its layers again failed in CI, on a loaded node).
    let up = uptime();
    let log = node.snapshotter.log()[log_before..].to_owned();
    assert!(!log.contains("resumed the FUSE session"), "{log}");
    assert!(
        log.contains("from a previous run: kept for its layer"),
        "the next daemon did not find the containers' loop devices:\n{log}"
    );

    // The running containers read through their old mounts again.
    let listing = node.ctd.ctr_ok(&[
        "task",
        "exec",
        "--exec-id",
        "after",
        &idle,
        "/bin/sh",
        "-c",
        "busybox sha256sum /files/*",
    ]);
    for (name, sha) in &node.img.files {
        assert!(
            listing.contains(&format!("{sha}  /files/{name}")),
            "/files/{name} after the restart: {listing}"
        );
    }
    // The readers: what they read is intact; reads failed only in the gap.
    std::thread::sleep(Duration::from_secs(2));
    let lines: Vec<Line> = node
        .lines()
        .into_iter()
        .filter(|l| l.file.is_some())
        .collect();
    let failed: Vec<&Line> = lines.iter().filter(|l| l.failed).collect();
    assert!(
        failed.iter().all(|l| l.end >= down && l.start < up),
        "reads failed outside the gap: {failed:#?}\n{log}"
    );
    for l in lines.iter().filter(|l| !l.failed) {
        let name = l.file.as_deref().unwrap();
        let want = &node.img.files.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(l.sha.as_deref(), Some(want.as_str()), "{l:#?}");
    }
    let metrics = node.snapshotter.metrics();
    assert_eq!(
        metric_sum(&metrics, "lazybd_read_errors_total"),
        0.0,
        "{metrics}"
    );
    eprintln!(
        "holder and daemon dead for {:.2}s: the readers wrote {} lines ({} failed, {} started \
         after the restart); loop devices {loops_before:?} before, {:?} after the restart",
        up - down,
        lines.len(),
        failed.len(),
        lines.iter().filter(|l| l.start >= up).count(),
        loop_numbers(&node.snapshotter)
    );

    // A new container of the same image, on the new daemon's mounts.
    node.remove(&ids);
    node.remove(std::slice::from_ref(&idle));
    node.readers.clear();
    let ids = node.run_readers("0");
    let lines = node.wait_done(Duration::from_secs(90));
    node.assert_all_read_intact(&lines);
    node.remove(&ids);
    eprintln!(
        "loop devices once every container is gone: {:?}",
        loop_numbers(&node.snapshotter)
    );

    // Nothing leaks: once containerd and the daemon are gone, nothing is
    // mounted or attached under its root.
    let root = node.snapshotter.root.clone();
    drop(node);
    lazybd_tests::lazy_layers::wait_nothing_left(&root);
}
