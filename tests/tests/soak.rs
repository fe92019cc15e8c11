//! The soak (issue 16): for a bounded time (`LAZYBD_SOAK_SECONDS`, default
//! 150), containers start and stop in a loop through a private containerd
//! on lazybd-snapshotter with P2P (a super node, and a peer node that holds
//! the image) and background prefetch on. Each round runs one container
//! under our shim and one under containerd's runc shim, execs into one, and
//! removes both; every other round the image is removed too and pulled again
//! in the next, so its layers attach, fetch over P2P, prefetch, hand off to
//! their cache files and detach again (a one-byte cache capacity removes
//! the caches of detached layers).
//!
//! Afterwards, compared with the same quiet state after a warm-up: no
//! leaked descriptor (snapshotter, super node, containerd), mount or loop
//! device under the test's directories, FUSE connection without a mount,
//! network namespace (no process left in the containers' cgroups, no
//! namespace descriptor held), or process (shims, runc state, anything
//! naming the test's directories); and the snapshotter's and the super
//! node's resident memory flat. The figures are printed; they are in
//! docs/benchmarks.md ("Soak"), with the command that reproduces them.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lazybd_blockdev::device::{loopdev, mounts};
use lazybd_tests::containerd::{self, Containerd, LazyRun, LAZYBD_RUNTIME, RUNC_RUNTIME};
use lazybd_tests::images::registry_with_lazy_rich;
use lazybd_tests::lazy_layers::walk;
use lazybd_tests::leaks::{self, Fds, Seen};
use lazybd_tests::p2p::{
    hub_proxy, hub_supernode, snapshotter_node_with, Fabric, Node, PROXY_PORT,
};
use lazybd_tests::snapshotter::{metric_or_zero, SnapshotterDaemon};
use lazybd_tests::supernode::Supernode;
use lazybd_tests::{bin_path, require_root};

/// How long the loop runs unless `LAZYBD_SOAK_SECONDS` says otherwise
/// (CI runs the default; longer runs are by hand).
const DEFAULT_SECONDS: u64 = 150;
/// Rounds before the footprint the end is compared with: the first pulls
/// grow pools, caches and the allocator's arenas to their working size.
const WARM_UP_ROUNDS: u32 = 4;
/// Connection pools open and close sockets on their own clock (idle ones
/// close after 90 s): this many more at the end is churn, not a leak.
const SOCKET_SLACK: usize = 32;
/// Resident memory may grow this much (KiB), or a fifth, whichever is
/// more, without being a leak: the allocator's arenas settle over the
/// first hundreds of rounds (measured: +4 MiB after 60 rounds, +5.4 after
/// 320, +7.4 after 690, from 41 MiB). A leak of tens of KiB per round,
/// or of a container's or a layer's state, is far more.
const RSS_SLACK_KIB: u64 = 12 << 10;

/// The node under soak and how it is driven.
struct Soak<'a> {
    ctd: &'a Containerd,
    snapshotter: &'a SnapshotterDaemon,
    supernode: &'a Supernode,
    /// The node's netns, where `lazybd pull` must run to reach the hub.
    netns: &'a str,
    image: String,
    /// Where everything the test makes lives.
    dirs: Vec<PathBuf>,
    /// Every container process seen, with its network namespace's inode.
    containers: Vec<(String, Seen, u64)>,
}

/// What the node holds when nothing runs on it and no image is pulled.
#[derive(Debug)]
struct Footprint {
    snapshotter_fds: Fds,
    supernode_fds: Fds,
    containerd_fds: Fds,
    snapshotter_rss_kib: u64,
    supernode_rss_kib: u64,
    mounts: BTreeSet<PathBuf>,
    loops: BTreeSet<(u32, PathBuf)>,
    unmounted_fuse: BTreeSet<u64>,
    /// All FUSE connections of the machine (other tests' too): reported.
    fuse_connections: usize,
    processes: BTreeMap<u32, String>,
}

impl Soak<'_> {
    fn containerd_pid(&self) -> u32 {
        let config = self.ctd.dir().join("config.toml");
        let found = leaks::processes_naming(&[&config]);
        let mut pids = found
            .iter()
            .filter(|(_, cmd)| cmd.starts_with("containerd ") || cmd.contains("-- containerd "));
        *pids.next().expect("containerd runs").0
    }

    fn footprint(&self) -> Footprint {
        let (mut mounts, mut loops) = (BTreeSet::new(), BTreeSet::new());
        for dir in &self.dirs {
            mounts.extend(mounts::mounts_under(dir).expect("read mountinfo"));
            loops.extend(loopdev::attached_under(dir));
        }
        let dirs: Vec<&Path> = self.dirs.iter().map(PathBuf::as_path).collect();
        Footprint {
            snapshotter_fds: Fds::of(self.snapshotter.pid()),
            supernode_fds: Fds::of(self.supernode.pid()),
            containerd_fds: Fds::of(self.containerd_pid()),
            snapshotter_rss_kib: leaks::memory_kib(self.snapshotter.pid(), "VmRSS"),
            supernode_rss_kib: leaks::memory_kib(self.supernode.pid(), "VmRSS"),
            mounts,
            loops,
            unmounted_fuse: leaks::unmounted_fuse_connections(),
            fuse_connections: std::fs::read_dir("/sys/fs/fuse/connections")
                .map(|d| d.count())
                .unwrap_or(0),
            processes: leaks::processes_naming(&dirs),
        }
    }

    fn image_present(&self) -> bool {
        self.ctd
            .ctr_ok(&["images", "ls", "-q"])
            .lines()
            .any(|l| l == self.image)
    }

    /// `lazybd pull` in the node's netns: every layer attached lazily.
    fn pull(&self) {
        let mut cmd = Command::new(bin_path("lazybd"));
        cmd.args(["pull", "--plain-http", "--namespace", &self.ctd.namespace])
            .arg("--address")
            .arg(self.ctd.socket())
            .arg(&self.image);
        lazybd_tests::netns::enter_netns(&mut cmd, self.netns);
        let out = cmd.output().expect("run lazybd pull");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains("3 attached lazily"),
            "lazybd pull: {stdout}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.snapshotter.log()
        );
    }

    /// The pid `ctr task ls` shows for task `id`.
    fn task_pid(&self, id: &str) -> u32 {
        self.ctd
            .ctr_ok(&["task", "ls"])
            .lines()
            .find_map(|line| {
                let fields: Vec<_> = line.split_whitespace().collect();
                (fields.first() == Some(&id)).then(|| fields[1].parse().ok())?
            })
            .unwrap_or_else(|| panic!("no pid for task {id}"))
    }

    /// One round: two containers (our shim, runc's) start, read the image,
    /// take an exec, and are removed; with `remove_image`, once the layers
    /// are complete (prefetched), the image goes and its layers detach.
    fn round(&mut self, n: u32, remove_image: bool) {
        if !self.image_present() {
            self.pull();
        }
        let ids = [format!("soak{n}-shim"), format!("soak{n}-runc")];
        for (id, runtime) in ids.iter().zip([LAZYBD_RUNTIME, RUNC_RUNTIME]) {
            self.ctd.ctr_ok(
                &LazyRun {
                    image: &self.image,
                    id,
                    detach: true,
                    runtime: Some(runtime),
                    cmd: &[
                        "sh",
                        "-c",
                        "cat /etc/hostname /data/small.txt >/dev/null && exec sleep 600",
                    ],
                    ..LazyRun::default()
                }
                .args(),
            );
        }
        for id in &ids {
            self.ctd.wait_task(60, id, "RUNNING");
            let pid = self.task_pid(id);
            let seen = Seen::now(pid).expect("the container's process runs");
            let netns = std::fs::metadata(format!("/proc/{pid}/ns/net"))
                .expect("its netns")
                .ino();
            self.containers.push((id.clone(), seen, netns));
            let out = self.ctd.ctr_ok(&[
                "task",
                "exec",
                "--exec-id",
                &format!("x{n}"),
                id,
                "sh",
                "-c",
                "md5sum /data/big >/dev/null && cat /data/small.txt",
            ]);
            assert_eq!(out, "hello from a small file\n");
        }
        for id in &ids {
            self.ctd.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            self.ctd.wait_task(60, id, "STOPPED");
            self.ctd.ctr_ok(&["task", "rm", id]);
            self.ctd.ctr_ok(&["containers", "rm", id]);
        }
        if remove_image {
            // The task starts began a background prefetch of every layer.
            self.snapshotter.wait_all_local(Duration::from_secs(60));
            self.ctd.ctr_ok(&["images", "rm", "--sync", &self.image]);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !self.snapshotter.layer_states().is_empty() {
                assert!(
                    Instant::now() < deadline,
                    "layers still attached 30 s after the image went: {:?}\n{}",
                    self.snapshotter.layer_states(),
                    self.snapshotter.log()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Processes left in the cgroups (any controller) of this harness's
    /// containerd namespace, where runc puts its containers.
    fn processes_in_container_cgroups(&self) -> Vec<(PathBuf, String)> {
        let mut left = Vec::new();
        let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") else {
            return left;
        };
        for controller in controllers.flatten() {
            let ns = controller.path().join(&self.ctd.namespace);
            let mut stack = vec![ns];
            while let Some(dir) = stack.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(e.path());
                    }
                }
                let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                if !procs.trim().is_empty() {
                    left.push((dir, procs.trim().replace('\n', " ")));
                }
            }
        }
        left
    }
}

fn soak_seconds() -> u64 {
    match std::env::var("LAZYBD_SOAK_SECONDS") {
        Ok(s) => s.parse().expect("LAZYBD_SOAK_SECONDS: whole seconds"),
        Err(_) => DEFAULT_SECONDS,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The memory bound: what `start` may grow to without being a leak.
fn rss_bound(start_kib: u64) -> u64 {
    start_kib + (start_kib / 5).max(RSS_SLACK_KIB)
}

#[test]
fn pods_start_and_stop_for_minutes_without_leaking() {
    require_root!();
    let seconds = soak_seconds();
    let (tmp, registry, _img) = registry_with_lazy_rich();
    let fabric = Fabric::new(30, 2);
    let hub = fabric.hub_ip();
    let _proxy = hub_proxy(&fabric, &registry);
    let supernode = hub_supernode(&fabric, &tmp.path().join("sn"), 1, 30_000, &[]);
    let image = format!("{hub}:{PROXY_PORT}/rich:lazy");
    // A peer that has read the whole image, first in every layer's tree
    // (fanout 1): the node's chunks come from it (or from the super node),
    // not from the registry.
    let peer = Node::mount(&fabric, tmp.path(), 1, &image, "", &[]);
    for p in walk(&peer.dir) {
        if peer.dir.join(&p).is_file() {
            std::fs::read(peer.dir.join(&p)).unwrap();
        }
    }
    // The snapshotter follows containerd's task events (runc's containers
    // prefetch too) and keeps no cache of a detached layer.
    let ctd_dir = containerd::new_dir();
    let snapshotter = snapshotter_node_with(
        &fabric,
        tmp.path(),
        0,
        &format!(
            "[containerd]\naddress = \"{}\"\n[prefetch]\non_task_start = true\n\
             [cache]\ncapacity_bytes = 1\n",
            containerd::socket_in(ctd_dir.path()).display()
        ),
    );
    let ctd = Containerd::builder()
        .in_dir(ctd_dir)
        .proxy_snapshotter(snapshotter.proxy())
        .start();
    let mut soak = Soak {
        ctd: &ctd,
        snapshotter: &snapshotter,
        supernode: &supernode,
        netns: &fabric.nodes[0].name,
        image,
        dirs: vec![tmp.path().to_owned(), ctd.dir().to_owned()],
        containers: Vec::new(),
    };

    for n in 0..WARM_UP_ROUNDS {
        soak.round(n, n % 2 == 1);
    }
    let before = soak.footprint();
    let series_before = snapshotter.metrics().lines().count();
    let started = Instant::now();
    let mut rounds = 0;
    // The snapshotter's RSS after each round, to show its course.
    let mut rss_kib = Vec::new();
    // Ends on a round that removes the image: the state `before` was in.
    while started.elapsed() < Duration::from_secs(seconds) || rounds % 2 == 1 {
        soak.round(WARM_UP_ROUNDS + rounds, rounds % 2 == 1);
        rounds += 1;
        rss_kib.push(leaks::memory_kib(snapshotter.pid(), "VmRSS"));
    }
    let peak_rss_kib = rss_kib.iter().copied().max().unwrap_or(0);
    let course: Vec<String> = (1..=4)
        .map(|q| format!("{:.1}", mib(rss_kib[(rss_kib.len() * q / 4).max(1) - 1])))
        .collect();
    let elapsed = started.elapsed();
    // Loop devices an overlay held clear a moment after it goes; sockets
    // of finished requests close.
    let mut after = soak.footprint();
    let settle = Instant::now() + Duration::from_secs(20);
    while Instant::now() < settle
        && (after.mounts != before.mounts
            || after.loops != before.loops
            || !after
                .snapshotter_fds
                .grown_since(&before.snapshotter_fds)
                .is_empty())
    {
        std::thread::sleep(Duration::from_millis(500));
        after = soak.footprint();
    }
    let hwm = leaks::memory_kib(snapshotter.pid(), "VmHWM");
    let supernode_hwm = leaks::memory_kib(supernode.pid(), "VmHWM");
    let metrics = snapshotter.metrics();
    let series_after = metrics.lines().count();
    let chunks = |source: &str| {
        metric_or_zero(
            &metrics,
            &format!("lazybd_source_chunks_total{{source=\"{source}\"}}"),
        )
    };
    let containers = soak.containers.len();
    println!(
        "soak: {rounds} rounds ({containers} containers in all, {} image pulls) in {:.0} s \
         after {WARM_UP_ROUNDS} warm-up rounds\n\
         snapshotter fds {} -> {} ({} -> {} sockets), super node fds {} -> {}, \
         containerd fds {} -> {}\n\
         mounts {} -> {}, loop devices {} -> {}, FUSE connections (machine) {} -> {}, \
         unmounted {} -> {}\n\
         snapshotter RSS {:.1} -> {:.1} MiB (after each quarter of the rounds: {}; \
         peak sampled {:.1}, VmHWM {:.1}); super node RSS {:.1} -> {:.1} MiB (VmHWM {:.1})\n\
         chunks from peer {}, super node {}, registry {}; metrics lines {series_before} -> \
         {series_after}",
        (WARM_UP_ROUNDS + rounds).div_ceil(2),
        elapsed.as_secs_f64(),
        before.snapshotter_fds.total(),
        after.snapshotter_fds.total(),
        before.snapshotter_fds.sockets,
        after.snapshotter_fds.sockets,
        before.supernode_fds.total(),
        after.supernode_fds.total(),
        before.containerd_fds.total(),
        after.containerd_fds.total(),
        before.mounts.len(),
        after.mounts.len(),
        before.loops.len(),
        after.loops.len(),
        before.fuse_connections,
        after.fuse_connections,
        before.unmounted_fuse.len(),
        after.unmounted_fuse.len(),
        mib(before.snapshotter_rss_kib),
        mib(after.snapshotter_rss_kib),
        course.join(", "),
        mib(peak_rss_kib),
        mib(hwm),
        mib(before.supernode_rss_kib),
        mib(after.supernode_rss_kib),
        mib(supernode_hwm),
        chunks("peer"),
        chunks("supernode"),
        chunks("registry"),
    );

    // The soak ran what it claims: P2P served the node.
    assert!(rounds >= 2, "only {rounds} rounds in {seconds} s");
    assert!(
        chunks("peer") + chunks("supernode") > 0.0,
        "no chunk came over P2P:\n{metrics}"
    );
    // Metrics series are per layer and source, not per container or round.
    assert_eq!(
        series_after, series_before,
        "metrics series grew:\n{metrics}"
    );
    // Descriptors.
    for (who, b, a) in [
        (
            "snapshotter",
            &before.snapshotter_fds,
            &after.snapshotter_fds,
        ),
        ("super node", &before.supernode_fds, &after.supernode_fds),
        ("containerd", &before.containerd_fds, &after.containerd_fds),
    ] {
        assert!(
            a.grown_since(b).is_empty(),
            "{who} holds more descriptors after {rounds} rounds: {:?}",
            a.grown_since(b)
        );
        assert!(
            a.sockets <= b.sockets + SOCKET_SLACK,
            "{who}: {} sockets after {rounds} rounds, {} before",
            a.sockets,
            b.sockets
        );
    }
    // Mounts, loop devices, FUSE connections.
    assert_eq!(after.mounts, before.mounts, "mounts left");
    assert_eq!(after.loops, before.loops, "loop devices left");
    let orphans: Vec<_> = after
        .unmounted_fuse
        .difference(&before.unmounted_fuse)
        .collect();
    assert!(
        orphans.is_empty(),
        "FUSE connections without a mount: {orphans:?}"
    );
    // Processes and network namespaces: every container process is gone,
    // nothing is left in their cgroups, no shim or runc state remains, and
    // nothing new names the test's directories.
    for (id, seen, _) in &soak.containers {
        assert!(
            !seen.alive(),
            "container {id}'s process {} still runs",
            seen.pid
        );
    }
    let in_cgroups = soak.processes_in_container_cgroups();
    assert!(in_cgroups.is_empty(), "processes left: {in_cgroups:?}");
    assert!(ctd.shims().is_empty(), "shims left: {:?}", ctd.shims());
    assert!(
        ctd.runc_containers().is_empty(),
        "runc state left: {:?}",
        ctd.runc_containers()
    );
    let new: BTreeMap<_, _> = after
        .processes
        .iter()
        .filter(|(pid, _)| !before.processes.contains_key(pid))
        .collect();
    assert!(new.is_empty(), "processes left: {new:?}");
    let netns: BTreeSet<u64> = soak.containers.iter().map(|c| c.2).collect();
    for (who, fds) in [
        ("snapshotter", &after.snapshotter_fds),
        ("containerd", &after.containerd_fds),
    ] {
        assert!(
            !fds.others.contains_key("net:[..]"),
            "{who} holds a network namespace: {fds:?} (containers' were {netns:?})"
        );
    }
    // Memory.
    assert!(
        after.snapshotter_rss_kib <= rss_bound(before.snapshotter_rss_kib),
        "snapshotter RSS grew from {:.1} to {:.1} MiB in {rounds} rounds",
        mib(before.snapshotter_rss_kib),
        mib(after.snapshotter_rss_kib)
    );
    assert!(
        after.supernode_rss_kib <= rss_bound(before.supernode_rss_kib),
        "super node RSS grew from {:.1} to {:.1} MiB in {rounds} rounds",
        mib(before.supernode_rss_kib),
        mib(after.supernode_rss_kib)
    );
    drop(soak);
    drop((ctd, snapshotter, peer, supernode));
}
