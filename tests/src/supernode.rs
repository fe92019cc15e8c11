//! A private `lazybd-supernode`: its cache under `DIR/cache`, its log at
//! `DIR/log`, ready once it prints `listening on`; optionally inside a
//! network namespace. Killed on drop.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::bin_path;
use crate::daemon::Daemon;

pub struct Supernode {
    daemon: Daemon,
    /// `ip:port` it listens on.
    pub addr: String,
    pub dir: PathBuf,
}

impl Supernode {
    /// `lazybd-supernode --listen LISTEN --registry REGISTRY --plain-http
    /// --cache-dir DIR/cache ARGS...`, inside `netns` if given.
    pub fn start(
        dir: &Path,
        listen: &str,
        registry: &str,
        args: &[&dyn AsRef<OsStr>],
        netns: Option<&str>,
    ) -> Supernode {
        std::fs::create_dir_all(dir).unwrap();
        let mut cmd = Command::new(bin_path("lazybd-supernode"));
        cmd.args(["--listen", listen, "--registry", registry, "--plain-http"])
            .arg("--cache-dir")
            .arg(dir.join("cache"));
        for arg in args {
            cmd.arg(arg);
        }
        if let Some(ns) = netns {
            crate::netns::enter_netns(&mut cmd, ns);
        }
        let (daemon, _) = Daemon::spawn_announcing(
            "lazybd-supernode",
            cmd,
            &dir.join("log"),
            "listening on",
            Duration::from_secs(20),
        );
        Supernode {
            daemon,
            addr: listen.to_owned(),
            dir: dir.to_owned(),
        }
    }

    /// Where it keeps blocks and traces.
    pub fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    pub fn log(&self) -> String {
        self.daemon.log()
    }

    pub fn pid(&self) -> u32 {
        self.daemon.pid().expect("super node running")
    }

    /// SIGKILL: the super node is down.
    pub fn kill(&mut self) {
        self.daemon.kill();
    }
}

impl Drop for Supernode {
    fn drop(&mut self) {
        self.kill();
    }
}
