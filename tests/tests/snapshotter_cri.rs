//! lazybd-snapshotter under CRI, as on a node: containerd's CRI plugin with
//! `snapshotter = "lazybd"` and `disable_snapshot_annotations = false`
//! pulls a converted image from a registry with CRI PullImage (every layer
//! attached lazily, nothing downloaded in full), then a pod and a container
//! run on it through containerd-shim-lazybd-v2, reading a few files; with
//! prefetch on task-start, the container's start makes its layers local.

use k8s_cri::v1::ContainerState;
use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd::cri::LAZYBD_HANDLER;
use lazybd_tests::images::noise;
use lazybd_tests::lazy_node::LazyNode;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric, metric_sum};
use sha2::{Digest, Sha256};

#[test]
fn cri_pull_attaches_layers_lazily_and_a_pod_runs_on_them() {
    require_root!();
    // No prefetch on task-start: what was fetched is what the container read.
    let node = LazyNode::with_cri("[prefetch]\non_task_start = false\n");
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);

    let image_ref = ctd.pull_image(lazy);
    let image = ctd.image_status(lazy).expect("pulled image in CRI's store");
    assert_eq!(image.id, image_ref);
    let layers = snapshotter.control(&serde_json::json!({"op": "layers"}));
    let layers = layers["layers"].as_array().expect("layers").clone();
    assert_eq!(layers.len(), 3, "lazy layers after PullImage: {layers:?}");
    assert!(
        layers.iter().all(|l| l["state"] == "lazy"),
        "every layer attached, none complete: {layers:?}"
    );

    let pod = ctd.run_pod("lazy-pod", LAZYBD_HANDLER);
    // Files from every layer (not /etc/hostname: CRI bind-mounts the pod's).
    let id = ctd.create_container(
        &pod,
        "app",
        lazy,
        &[
            "/bin/sh",
            "-c",
            "cat /opq/new /data/small.txt; [ -e /etc/removed ] || echo whiteout kept; exec /bin/busybox sleep 2147483647",
        ],
    );
    ctd.start_container(&id);
    ctd.wait_for(30, "the container's log", || {
        ctd.container_log(&pod, "app").0.lines().count() >= 3
    });
    assert_eq!(
        ctd.container_log(&pod, "app").0,
        "the only file left in opq\nhello from a small file\nwhiteout kept\n"
    );
    let (code, out, err) = ctd.exec_sync(&id, &["/bin/cat", "/data/link", "/etc/owned"]);
    assert_eq!(
        (code, out.as_str(), err.as_str()),
        (0, "hello from a small file\nowned by 1234:5678\n", "")
    );

    // The shim told the snapshotter which layers the container runs on.
    let listing = ok(&lazybd(&[
        &"layers",
        &"--control",
        &snapshotter.control,
        &"--json",
    ]));
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("layers --json");
    let on_layers: Vec<_> = listing["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|l| {
            l["containers"]
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == &format!("k8s.io/{id}")[..]))
        })
        .collect();
    assert_eq!(on_layers.len(), 3, "container on every layer: {listing}");

    // A few small files were read: a small part of the image was fetched.
    let metrics = snapshotter.metrics();
    let fetched_chunks = metric(&metrics, r#"lazybd_source_chunks_total{source="registry"}"#);
    let total_chunks = metric_sum(&metrics, "lazybd_layer_chunks{");
    assert!(
        fetched_chunks > 0.0 && fetched_chunks * 4.0 < total_chunks,
        "fetched {fetched_chunks} of {total_chunks} chunks"
    );
    let fetched_bytes = metric(&metrics, r#"lazybd_source_bytes_total{source="registry"}"#);
    eprintln!(
        "fetched {fetched_chunks} of {total_chunks} chunks, {fetched_bytes} bytes of a {} byte image",
        image.size
    );
    assert!(
        fetched_bytes * 4.0 < image.size as f64,
        "fetched {fetched_bytes} bytes of a {} byte image",
        image.size
    );

    ctd.stop_container(&id, 0);
    assert_eq!(ctd.container_state(&id), ContainerState::ContainerExited);
    ctd.remove_container(&id);
    ctd.stop_pod(&pod.id);
    ctd.remove_pod(&pod.id);
    ctd.wait_for(30, "the shim to exit", || ctd.shims().is_empty());
    ctd.wait_for(30, "container mounts to go", || ctd.mounts().is_empty());
}

/// With prefetch on task-start (the default), the container's start sets
/// its layers fetching in the background until every one is local, and
/// the container reads the same bytes before and after.
#[test]
fn task_start_through_cri_prefetches_the_layers_until_local() {
    require_root!();
    let node = LazyNode::with_cri("");
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    ctd.pull_image(lazy);
    let pod = ctd.run_pod("prefetch-pod", LAZYBD_HANDLER);
    let id = ctd.create_container(&pod, "app", lazy, &["/bin/busybox", "sleep", "2147483647"]);
    ctd.start_container(&id);
    let mut big = noise(1, 6 << 20);
    big[2 << 20..4 << 20].fill(0);
    let want = format!("{}  /data/big\n", hex::encode(Sha256::digest(&big)));
    let sha = || ctd.exec_sync(&id, &["/bin/busybox", "sha256sum", "/data/big"]);
    assert_eq!(sha(), (0, want.clone(), String::new()));
    ctd.wait_for(120, "every layer local", || {
        let layers = snapshotter.control(&serde_json::json!({"op": "layers"}));
        layers["layers"]
            .as_array()
            .is_some_and(|l| l.len() == 3 && l.iter().all(|l| l["state"] == "local"))
    });
    assert_eq!(sha(), (0, want, String::new()));
    ctd.stop_pod(&pod.id);
    ctd.remove_pod(&pod.id);
    ctd.wait_for(30, "the shim to exit", || ctd.shims().is_empty());
}
