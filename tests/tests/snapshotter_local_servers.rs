//! The snapshotter's local servers under hostile local load: a flood of
//! half-sent requests to the metrics port (it once grew the daemon by
//! hundreds of MiB and stopped the server for good at EMFILE), idle
//! connections on the control socket, and callers that are not root. The
//! daemon's memory stays bounded (VmRSS from /proc), honest clients are
//! answered, and the sockets carry their own modes, not the umask's.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::time::{Duration, Instant};

use lazybd_tests::bin_path;
use lazybd_tests::require_root;
use lazybd_tests::snapshotter::SnapshotterDaemon;

/// Resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kib << 10
}

/// Lets this test process hold `n` sockets.
fn allow_fds(n: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < n {
        setrlimit(Resource::RLIMIT_NOFILE, n.min(hard), hard).unwrap();
    }
}

/// `n` connections to `addr`, each with the start of a request whose head
/// never ends (`pad` bytes of one header, as far as the socket takes them).
fn half_sent_requests(addr: &str, n: usize, pad: usize) -> Vec<TcpStream> {
    let mut head = b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-Pad: ".to_vec();
    head.resize(head.len() + pad, b'a');
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut s) = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(2))
        else {
            continue;
        };
        s.set_write_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let _ = s.write_all(&head);
        out.push(s);
    }
    out
}

/// `GET /metrics` as an honest client: (status, seconds it took).
fn honest_scrape(addr: &str) -> (u16, f64) {
    let start = Instant::now();
    let (status, _) = lazybd_tests::http::request(None, "GET", addr, "/metrics", &[], b"");
    (status, start.elapsed().as_secs_f64())
}

#[test]
fn metrics_answer_under_a_flood_of_half_sent_requests_and_memory_stays_bounded() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = SnapshotterDaemon::start(tmp.path(), "");
    let (pid, addr) = (snapshotter.pid(), snapshotter.metrics_address());
    assert_eq!(honest_scrape(&addr).0, 200);
    let before = rss(pid);
    allow_fds(4096);
    let flood = half_sent_requests(&addr, 2000, 100 << 10);
    assert!(flood.len() > 1500, "only {} connections made", flood.len());
    let (status, secs) = honest_scrape(&addr);
    let grown = rss(pid).saturating_sub(before);
    assert_eq!(status, 200, "{}", snapshotter.log());
    assert!(secs < 5.0, "/metrics took {secs:.1}s under the flood");
    assert!(
        grown < 64 << 20,
        "the flood grew the daemon by {} MiB",
        grown >> 20
    );
    drop(flood);
}

#[test]
fn accept_errors_do_not_stop_the_metrics_server() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = SnapshotterDaemon::start(tmp.path(), "");
    let (pid, addr) = (snapshotter.pid(), snapshotter.metrics_address());
    // Few descriptors left: a modest flood runs the daemon out (EMFILE).
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    let limit = format!("--nofile={}", open + 16);
    let out = Command::new("prlimit")
        .args(["--pid", &pid.to_string(), &limit])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    allow_fds(1024);
    let flood = half_sent_requests(&addr, 200, 16);
    // Accepts fail now; the server must keep going.
    std::thread::sleep(Duration::from_secs(1));
    // While the flood still holds its connections, and after.
    assert_eq!(honest_scrape(&addr).0, 200, "{}", snapshotter.log());
    assert!(
        snapshotter.log().contains("Too many open files"),
        "the flood did not reach EMFILE:\n{}",
        snapshotter.log()
    );
    drop(flood);
    assert_eq!(honest_scrape(&addr).0, 200, "{}", snapshotter.log());
}

/// One request line on the control socket as user `uid`: the reply line,
/// or what went wrong.
fn control_as(socket: &std::path::Path, uid: u32) -> Result<String, String> {
    let out = Command::new(bin_path("lazybd"))
        .arg("layers")
        .arg("--json")
        .arg("--control")
        .arg(socket)
        .uid(uid)
        .gid(uid)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[test]
fn sockets_have_their_own_modes_and_the_control_api_checks_its_callers() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    // Others may reach the directory; the sockets' own modes decide.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("s");
    let snapshotter = SnapshotterDaemon::start(&dir, "");
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&snapshotter.socket), 0o600);
    assert_eq!(mode(&snapshotter.control), 0o600);
    assert!(control_as(&snapshotter.control, 0).is_ok());
    let nobody = control_as(&snapshotter.control, 65534).unwrap_err();
    assert!(nobody.contains("ermission denied"), "{nobody}");
    drop(snapshotter);

    // Another user allowed: the socket opens to all, the uid decides.
    let dir = tmp.path().join("t");
    let snapshotter = SnapshotterDaemon::start(&dir, "control_allowed_uids = [4242]\n");
    assert_eq!(mode(&snapshotter.control), 0o666);
    let layers = control_as(&snapshotter.control, 4242).unwrap();
    assert!(layers.contains("[]"), "{layers}");
    assert!(control_as(&snapshotter.control, 65534).is_err());
    assert!(
        snapshotter.log().contains("uid 65534"),
        "the refusal is logged:\n{}",
        snapshotter.log()
    );
}

#[test]
fn idle_and_overlong_control_connections_do_not_block_the_control_api() {
    require_root!();
    let tmp = tempfile::tempdir().unwrap();
    let snapshotter = SnapshotterDaemon::start(tmp.path(), "");
    let pid = snapshotter.pid();
    let before = rss(pid);
    allow_fds(4096);
    let mut idle = Vec::new();
    for i in 0..1000 {
        let Ok(mut s) = UnixStream::connect(&snapshotter.control) else {
            continue;
        };
        s.set_write_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        // Some send nothing, some a line that never ends.
        if i % 2 == 0 {
            let _ = s.write_all(&vec![b'{'; 256 << 10]);
        }
        idle.push(s);
    }
    let start = Instant::now();
    let reply = snapshotter.control(&serde_json::json!({"op": "layers"}));
    assert_eq!(reply["layers"], serde_json::json!([]), "{reply}");
    assert!(start.elapsed() < Duration::from_secs(5));
    let grown = rss(pid).saturating_sub(before);
    assert!(grown < 64 << 20, "grew by {} MiB", grown >> 20);
    // An overlong line gets an error, not a buffer of its size.
    let mut s = UnixStream::connect(&snapshotter.control).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b' '; 1 << 20]);
    let mut reply = String::new();
    let _ = s.read_to_string(&mut reply);
    assert!(reply.is_empty() || reply.contains("error"), "{reply}");
    drop(idle);
}
