//! containerd's own snapshotter conformance suite (containerd 1.6's
//! `snapshots/testsuite`, Go, from Debian's
//! golang-github-containerd-containerd-dev) against lazybd-snapshotter
//! through containerd's proxy client: tests/conformance/snapshotter_test.go.

use std::process::Command;

use lazybd_tests::{bin_path, require_root};

#[test]
fn containerd_snapshotter_testsuite_passes() {
    require_root!();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance");
    let out = Command::new("go")
        .args(["test", "-count=1", "-v", "."])
        .current_dir(&dir)
        // Debian ships containerd's Go sources for GOPATH builds, offline.
        .env("GO111MODULE", "off")
        .env("GOPATH", "/usr/share/gocode")
        .env("GOFLAGS", "")
        .env("GOCACHE", dir.join("../../target/go-build"))
        .env("LAZYBD_SNAPSHOTTER", bin_path("lazybd-snapshotter"))
        .output()
        .expect("run go (apt install golang-go golang-github-containerd-containerd-dev)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "conformance suite failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The suite really ran: its 128-layer test among the others.
    assert!(
        stdout.contains("--- PASS: TestLazybdSnapshotter/128LayersMount"),
        "{stdout}"
    );
    assert!(!stdout.contains("--- FAIL"), "{stdout}");
}
