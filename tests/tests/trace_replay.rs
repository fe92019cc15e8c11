//! Startup traces across two nodes: snapshotter A records which chunks a
//! "container" (an overlay over three lazy layers plus a `task-start` on the
//! control socket) reads in its first seconds, stores the trace and uploads
//! it to a `lazybd-supernode` (behind a cluster token); snapshotter B, on a
//! fresh root with the same super node, replays it when the container
//! snapshot is prepared, so the same reads find every traced chunk present
//! (0 on-demand misses on traced chunks). Then bad traces: a corrupt local
//! file and a corrupt super node answer are refused with a log line, and the
//! container still reads correct data; the super node refuses corrupt and
//! oversized uploads.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use containerd_client::types::Mount;
use lazybd_blockdev::trace::trace_key;
use lazybd_tests::http;
use lazybd_tests::images::{registry_with_lazy_rich, LazyImage};
use lazybd_tests::lazy_layers::{leftovers, wait_nothing_left, walk};
use lazybd_tests::snapshots_api::{attach_layers, prepare, remove};
use lazybd_tests::snapshotter::{metric, Mounted, SnapshotterDaemon};
use lazybd_tests::supernode::Supernode;
use lazybd_tests::{free_port, require_root};

const TOKEN: &str = "trace-test-token";

/// A super node on 127.0.0.1 behind the cluster token.
fn supernode(dir: &Path, registry: &str) -> Supernode {
    std::fs::create_dir_all(dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, TOKEN).unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    Supernode::start(
        dir,
        &listen,
        registry,
        &[&"--cluster-token-file", &token],
        None,
    )
}

/// A request to the super node with token `token`; the status code.
fn request(sn: &Supernode, method: &str, path: &str, token: &str, body: &[u8]) -> u16 {
    http::request(
        None,
        method,
        &sn.addr,
        path,
        &[("x-lazybd-token", token)],
        body,
    )
    .0
}

fn node_config(registry: &str, supernode: Option<&Supernode>) -> String {
    let mut c = format!(
        "[registry]\nplain_http = [\"{registry}\"]\n[prefetch]\non_task_start = false\n\
         [trace]\nrecord_secs = 2\n"
    );
    if let Some(sn) = supernode {
        c += &format!(
            "[p2p]\nsupernode = \"http://{}\"\nlisten = \"127.0.0.1:{}\"\n\
             cluster_token = \"{TOKEN}\"\nsupernode_timeout_ms = 5000\n",
            sn.addr,
            free_port()
        );
    }
    c
}

/// Attaches the image's layers (the CRI labels of an unpack) and prepares
/// a container snapshot on them; returns its mounts.
async fn container(d: &SnapshotterDaemon, img: &LazyImage) -> Vec<Mount> {
    let mut c = d.client().await;
    let parent = attach_layers(&mut c, &img.image, img, || d.log()).await;
    prepare(&mut c, "container", &parent, HashMap::new())
        .await
        .unwrap()
}

async fn cleanup(d: &mut SnapshotterDaemon, img: &LazyImage) {
    let mut c = d.client().await;
    // Best effort: the test is cleaning up.
    let _ = remove(&mut c, "container").await;
    for chain in img.chain_ids().iter().rev() {
        // Best effort: the test is cleaning up.
        let _ = remove(&mut c, chain).await;
    }
    d.stop();
    wait_nothing_left(&d.root);
}

/// What the "container" reads at start: a few files, in a fixed order.
fn startup_reads(rootfs: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let files: Vec<PathBuf> = walk(rootfs)
        .into_iter()
        .filter(|p| std::fs::symlink_metadata(rootfs.join(p)).unwrap().is_file())
        .collect();
    assert!(files.len() >= 3, "{files:?}");
    files
        .into_iter()
        .step_by(2)
        .take(4)
        .map(|p| {
            let data = std::fs::read(rootfs.join(&p)).unwrap();
            (p, data)
        })
        .collect()
}

fn wait_metric(d: &SnapshotterDaemon, name: &str, at_least: f64) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let m = d.metrics();
        if metric(&m, name) >= at_least {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{name} < {at_least} after 60 s:\n{m}\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_recorded_on_one_node_is_replayed_on_another_before_the_reads() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();
    // Keyed by the layers' identities (their anchors), not their digests.
    let key = trace_key(&img.anchors);
    let sn = supernode(&t.join("sn"), &registry.host());

    // Node A records and uploads.
    std::fs::create_dir(t.join("a")).unwrap();
    let mut a = SnapshotterDaemon::start(&t.join("a"), &node_config(&registry.host(), Some(&sn)));
    let mounts = container(&a, &img).await;
    let rootfs_a = t.join("a/rootfs");
    std::fs::create_dir(&rootfs_a).unwrap();
    let mounted = Mounted::new(&mounts, &rootfs_a);
    let reply = a.task_start("c1", &mounts);
    assert_eq!(reply["layers"].as_array().unwrap().len(), 3, "{reply}");
    let expected = startup_reads(&rootfs_a);
    let m = wait_metric(&a, "lazybd_traces_uploaded_total", 1.0);
    let recorded = metric(&m, "lazybd_trace_recorded_ranges_total");
    assert!(recorded > 0.0, "{m}");
    assert_eq!(metric(&m, "lazybd_traces_stored_total"), 1.0, "{m}");
    assert!(a.root.join("traces").join(&key).exists());
    assert!(
        sn.cache().join("traces").join(&key).exists(),
        "{}",
        sn.log()
    );
    drop(mounted);
    cleanup(&mut a, &img).await;

    // Node B, fresh root: the Prepare of the container snapshot replays it.
    std::fs::create_dir(t.join("b")).unwrap();
    let mut b = SnapshotterDaemon::start(&t.join("b"), &node_config(&registry.host(), Some(&sn)));
    let mounts = container(&b, &img).await;
    let trace = lazybd_blockdev::trace::Trace::decode(
        &std::fs::read(a.root.join("traces").join(&key)).unwrap(),
    )
    .unwrap();
    assert_eq!(trace.range_count() as f64, recorded);
    let m = wait_metric(&b, "lazybd_trace_replays_total", trace.layers.len() as f64);
    assert_eq!(metric(&m, "lazybd_traces_downloaded_total"), 1.0, "{m}");
    assert!(
        metric(&m, "lazybd_trace_replayed_chunks_total") > 0.0,
        "{m}"
    );
    let rootfs_b = t.join("b/rootfs");
    std::fs::create_dir(&rootfs_b).unwrap();
    let mounted = Mounted::new(&mounts, &rootfs_b);
    b.task_start("c1", &mounts);
    assert!(
        startup_reads(&rootfs_b) == expected,
        "node B read other data"
    );
    let m = b.metrics();
    assert_eq!(metric(&m, "lazybd_trace_demand_misses_total"), 0.0, "{m}");
    // It had a trace: nothing recorded, nothing uploaded.
    assert_eq!(metric(&m, "lazybd_trace_recorded_ranges_total"), 0.0, "{m}");
    drop(mounted);
    cleanup(&mut b, &img).await;

    // The super node refuses what is not a trace, or too large, or
    // unauthenticated, or not named with its layer chain (this test runs on
    // the nodes' address, which holds tickets for those layers).
    let path = format!("/v1/trace?key={key}&chain={}", img.anchors.join(","));
    assert_eq!(
        request(&sn, "GET", &format!("/v1/trace?key={key}"), TOKEN, b""),
        400
    );
    let other_chain = format!("/v1/trace?key={key}&chain={}", img.anchors[0]);
    assert_eq!(request(&sn, "GET", &other_chain, TOKEN, b""), 400);
    assert_eq!(request(&sn, "PUT", &path, TOKEN, b"{\"version\":2,"), 400);
    let too_large = vec![b' '; lazybd_blockdev::trace::MAX_TRACE_BYTES + 1];
    assert_eq!(request(&sn, "PUT", &path, TOKEN, &too_large), 413);
    assert_eq!(request(&sn, "PUT", "/v1/trace?key=../x", TOKEN, b"{}"), 400);
    assert_eq!(request(&sn, "GET", &path, "wrong", b""), 401);
    assert_eq!(request(&sn, "GET", &path, TOKEN, b""), 200);
    // Its /metrics wants the token too, also as a Prometheus bearer token.
    assert_eq!(request(&sn, "GET", "/metrics", "wrong", b""), 401);
    let bearer = format!("Bearer {TOKEN}");
    let (status, metrics) = http::request(
        None,
        "GET",
        &sn.addr,
        "/metrics",
        &[("authorization", &bearer)],
        b"",
    );
    let metrics = String::from_utf8_lossy(&metrics);
    assert_eq!(status, 200, "{metrics}");
    assert!(
        metrics.contains("lazybd_supernode_traces_stored_total 1\n"),
        "{metrics}"
    );

    // Node C: a corrupt local trace and a corrupt super node answer (its
    // file damaged on disk) are refused; the container reads correct data.
    std::fs::write(sn.cache().join("traces").join(&key), b"\x00garbage").unwrap();
    std::fs::create_dir_all(t.join("c/root/traces")).unwrap();
    std::fs::write(t.join("c/root/traces").join(&key), vec![b'x'; 2 << 20]).unwrap();
    let mut c = SnapshotterDaemon::start(&t.join("c"), &node_config(&registry.host(), Some(&sn)));
    let mounts = container(&c, &img).await;
    let rootfs_c = t.join("c/rootfs");
    std::fs::create_dir(&rootfs_c).unwrap();
    let mounted = Mounted::new(&mounts, &rootfs_c);
    assert!(
        startup_reads(&rootfs_c) == expected,
        "node C read other data"
    );
    let m = c.metrics();
    assert!(metric(&m, "lazybd_traces_rejected_total") >= 2.0, "{m}");
    assert_eq!(metric(&m, "lazybd_trace_replayed_chunks_total"), 0.0, "{m}");
    let log = c.log();
    assert!(
        log.contains("ignored") && log.contains("no replay"),
        "{log}"
    );
    drop(mounted);
    cleanup(&mut c, &img).await;
}

/// A SIGTERM during a record window still detaches every layer: the
/// recording does not keep the snapshotter alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_during_the_record_window_detaches_the_layers() {
    require_root!();
    let (tmp, registry, img) = registry_with_lazy_rich();
    let t = tmp.path();
    std::fs::create_dir(t.join("a")).unwrap();
    let config =
        node_config(&registry.host(), None).replace("record_secs = 2", "record_secs = 600");
    let mut a = SnapshotterDaemon::start(&t.join("a"), &config);
    let mounts = container(&a, &img).await;
    let rootfs = t.join("a/rootfs");
    std::fs::create_dir(&rootfs).unwrap();
    let mounted = Mounted::new(&mounts, &rootfs);
    a.task_start("c1", &mounts);
    startup_reads(&rootfs);
    assert!(metric(&a.metrics(), "lazybd_trace_recorded_ranges_total") > 0.0);
    drop(mounted);
    a.stop();
    let log = a.log();
    assert!(!log.contains("stay attached"), "{log}");
    assert!(log.contains("detached layer"), "{log}");
    let (mounts, loops) = leftovers(&a.root);
    assert!(
        mounts.is_empty() && loops.is_empty(),
        "{mounts:?} {loops:?}\n{log}"
    );
}
