//! The user path through a real containerd 1.6: lazybd-snapshotter as a
//! proxy plugin, `lazybd pull` of a converted image (every layer attached
//! lazily, nothing downloaded in full), `ctr run --snapshotter lazybd` of
//! it; and the same for an ordinary image, which is unpacked normally.

use lazybd_tests::containerd::LazyRun;
use lazybd_tests::lazy_node::LazyNode;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric, metric_sum};

#[test]
fn lazybd_pull_and_ctr_run_start_a_container_from_lazy_layers() {
    require_root!();
    let node = LazyNode::with_ctr("");
    let (ctd, snapshotter, lazy) = (&node.ctd, &node.snapshotter, &node.img.image);
    let plugins = ctd.ctr_ok(&["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains("lazybd")
                && l.trim_end().ends_with("ok")),
        "{plugins}"
    );

    let out = node.pull(lazy);
    assert!(out.contains("3 layers: 3 attached lazily"), "{out}");
    let stdout = ctd.ctr_ok(
        &LazyRun {
            image: lazy,
            id: "lazy-1",
            cmd: &["/bin/sh", "-c", "cat /etc/hostname /data/small.txt"],
            ..LazyRun::default()
        }
        .args(),
    );
    assert_eq!(stdout, "lazybd-2\nhello from a small file\n");

    // The container read a few files: a small part of the image was fetched.
    let metrics = snapshotter.metrics();
    let fetched = metric(&metrics, r#"lazybd_source_chunks_total{source="registry"}"#);
    let total = metric_sum(&metrics, "lazybd_layer_chunks{");
    assert!(
        fetched > 0.0 && fetched * 2.0 < total,
        "fetched {fetched} of {total} chunks"
    );

    // Pulling again finds everything in place.
    let out = node.pull(lazy);
    assert!(out.contains("3 already present"), "{out}");

    // An ordinary image through the same path is unpacked normally.
    let plain = node.registry.reference("rich:v1");
    let out = node.pull(&plain);
    assert!(
        out.contains("3 layers: 0 attached lazily") && out.contains("3 unpacked"),
        "{out}"
    );
    let stdout = ctd.ctr_ok(
        &LazyRun {
            image: &plain,
            id: "plain-1",
            cmd: &["/bin/cat", "/etc/hostname"],
            ..LazyRun::default()
        }
        .args(),
    );
    assert_eq!(stdout, "lazybd-2\n");

    ctd.ctr_ok(&["image", "rm", lazy, &plain]);
}
