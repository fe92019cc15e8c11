//! The holder's rules with real sockets and descriptors: a pipe's write end
//! stands for a session descriptor; the read end sees EOF exactly when the
//! holder (and everyone else) closed it.

use super::*;
use std::io::Read;

fn start(dir: &Path) -> PathBuf {
    let socket = dir.join("holder.sock");
    let holder = Holder::bind(&socket).unwrap();
    std::thread::spawn(move || holder.run());
    socket
}

fn client(socket: &Path, key: &str, deadline: Duration) -> Arc<Client> {
    Client::connect(socket, key, deadline, Arc::default()).unwrap()
}

/// A pipe: (read end, write end).
fn pipe() -> (std::fs::File, OwnedFd) {
    let (r, w) = nix::unistd::pipe().unwrap();
    (std::fs::File::from(r), w)
}

/// Whether every write end of the pipe is closed (read sees EOF), waiting
/// at most `within`.
fn closed_within(r: &mut std::fs::File, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    nix::fcntl::fcntl(
        &*r,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    loop {
        let mut b = [0u8; 1];
        match r.read(&mut b) {
            Ok(0) => return true,
            _ if Instant::now() >= deadline => return false,
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

#[test]
fn a_next_daemon_gets_what_the_last_one_put() {
    let dir = tempfile::tempdir().unwrap();
    let socket = start(dir.path());
    let (mut r, w) = pipe();
    let first = client(&socket, "k", Duration::from_secs(30));
    assert!(first.inherited().is_empty());
    first.put("k.dev0", w.as_fd()).unwrap();
    first.serving().unwrap();
    drop(w);
    drop(first); // the daemon dies

    let next = client(&socket, "k", Duration::from_secs(30));
    let got = next.inherited();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, "k.dev0");
    // Another key sees nothing of it.
    assert!(client(&socket, "other", Duration::from_secs(30))
        .inherited()
        .is_empty());
    drop(got);
    // The holder still has its copy: nothing closed the pipe.
    assert!(!closed_within(&mut r, Duration::from_millis(200)));
    next.remove("k.dev0").unwrap();
    assert!(closed_within(&mut r, Duration::from_secs(2)));
}

#[test]
fn descriptors_go_when_no_daemon_serves_within_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let socket = start(dir.path());
    let (mut r, w) = pipe();
    let first = client(&socket, "k", Duration::from_millis(600));
    first.put("k.dev0", w.as_fd()).unwrap();
    first.serving().unwrap();
    drop(w);
    drop(first);
    // A crash loop: daemons that connect and die before serving do not
    // restart the countdown.
    for _ in 0..3 {
        let c = client(&socket, "k", Duration::from_millis(600));
        drop(c.inherited());
        drop(c);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        closed_within(&mut r, Duration::from_secs(2)),
        "the holder kept the session past its deadline"
    );
}

#[test]
fn serving_stops_the_countdown() {
    let dir = tempfile::tempdir().unwrap();
    let socket = start(dir.path());
    let (mut r, w) = pipe();
    let first = client(&socket, "k", Duration::from_millis(500));
    first.put("k.dev0", w.as_fd()).unwrap();
    first.serving().unwrap();
    drop(w);
    drop(first);
    let next = client(&socket, "k", Duration::from_millis(500));
    drop(next.inherited());
    next.serving().unwrap();
    assert!(!closed_within(&mut r, Duration::from_millis(1200)));
    drop(next);
    assert!(closed_within(&mut r, Duration::from_secs(2)));
}
