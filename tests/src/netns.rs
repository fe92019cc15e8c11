//! Named network namespaces (`ip netns`, under /run/netns) for the tests
//! that need their own networks (the eni plugin's, the P2P fabric), and the
//! two ways into one: a thread of the test (sockets keep the netns they were
//! made in) and a process the test starts. Only the network namespace is
//! entered, so mounts made inside stay visible to the test.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Runs `ip ARGS` and returns stdout; panics with stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs `ip ARGS` for cleanup: failures (already gone) are fine.
pub fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).stderr(Stdio::null()).status();
}

/// A named network namespace, deleted on drop (which also deletes every
/// link inside it).
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `name`, first deleting a leftover of that name (a crashed
    /// earlier run would make `add` fail).
    pub fn create(name: &str) -> Netns {
        ip_quiet(&["netns", "del", name]);
        ip(&["netns", "add", name]);
        Netns { name: name.into() }
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Deletes it now (the pod netns vanishing before CNI DEL).
    pub fn delete(&self) {
        ip(&["netns", "del", &self.name]);
    }

    /// Runs `f` on a thread that joined this netns.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        in_netns(&self.name, f)
    }

    /// `cmd` will start inside this netns (network only).
    pub fn enter(&self, cmd: &mut Command) {
        enter_netns(cmd, &self.name);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        ip_quiet(&["netns", "del", &self.name]);
    }
}

fn netns_file(name: &str) -> std::fs::File {
    let path = Path::new("/run/netns").join(name);
    std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Runs `f` on a thread that joined netns `name` (a thread's netns is its
/// own; sockets keep the netns they were made in).
pub fn in_netns<T: Send + 'static>(name: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let fd = netns_file(name);
    std::thread::spawn(move || {
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

/// `cmd` will start inside netns `name` (network only).
pub fn enter_netns(cmd: &mut Command, name: &str) {
    let fd = netns_file(name);
    // SAFETY: setns is async-signal-safe; `fd` stays open in the closure.
    unsafe {
        cmd.pre_exec(move || {
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(std::io::Error::from)
        });
    }
}
