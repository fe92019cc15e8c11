//! The user path through a real containerd 1.6: lazybd-snapshotter as a
//! proxy plugin, `lazybd pull` of a converted image (every layer attached
//! lazily, nothing downloaded in full), `ctr run --snapshotter lazybd` of
//! it; and the same for an ordinary image, which is unpacked normally.

use std::path::Path;

use lazybd_tests::cli::{lazybd, ok};
use lazybd_tests::containerd_daemon::ContainerdDaemon;
use lazybd_tests::images::publish_lazy_rich;
use lazybd_tests::registry::Registry;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::{metric, metric_sum, SnapshotterDaemon};

fn run_ok(ctd: &ContainerdDaemon, args: &[&str]) -> String {
    let out = ctd.ctr(args);
    assert!(
        out.status.success(),
        "ctr {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        ctd.log()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn pull(ctd: &ContainerdDaemon, image: &str) -> String {
    ok(&lazybd(&[
        &"pull",
        &"--plain-http",
        &"--address",
        &ctd.socket,
        &image,
    ]))
}

#[test]
fn lazybd_pull_and_ctr_run_start_a_container_from_lazy_layers() {
    if !require_root("lazybd_pull_and_ctr_run_start_a_container_from_lazy_layers") {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let registry = Registry::start();
    publish_lazy_rich(t, &registry);
    let lazy = registry.reference("rich:lazy");

    let snapshotter = SnapshotterDaemon::start(
        &dir(t, "snapshotter"),
        &format!("[registry]\nplain_http = [\"{}\"]\n", registry.host()),
    );
    let ctd = ContainerdDaemon::start(
        &t.join("containerd"),
        &format!(
            "[proxy_plugins]\n  [proxy_plugins.lazybd]\n    type = \"snapshot\"\n    address = \"{}\"\n",
            snapshotter.socket.display()
        ),
    );
    let plugins = run_ok(&ctd, &["plugins", "ls"]);
    assert!(
        plugins
            .lines()
            .any(|l| l.contains("io.containerd.snapshotter.v1")
                && l.contains("lazybd")
                && l.trim_end().ends_with("ok")),
        "{plugins}"
    );

    let out = pull(&ctd, &lazy);
    assert!(out.contains("3 layers: 3 attached lazily"), "{out}");
    let stdout = run_ok(
        &ctd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazybd",
            &lazy,
            "lazy-1",
            "/bin/sh",
            "-c",
            "cat /etc/hostname /data/small.txt",
        ],
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
    let out = pull(&ctd, &lazy);
    assert!(out.contains("3 already present"), "{out}");

    // An ordinary image through the same path is unpacked normally.
    let plain = registry.reference("rich:v1");
    let out = pull(&ctd, &plain);
    assert!(
        out.contains("3 layers: 0 attached lazily") && out.contains("3 unpacked"),
        "{out}"
    );
    let stdout = run_ok(
        &ctd,
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lazybd",
            &plain,
            "plain-1",
            "/bin/cat",
            "/etc/hostname",
        ],
    );
    assert_eq!(stdout, "lazybd-2\n");

    run_ok(&ctd, &["image", "rm", &lazy, &plain]);
}

fn dir(t: &Path, name: &str) -> std::path::PathBuf {
    let d = t.join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}
