//! A private containerd 1.6 (Debian's) with its own root, state, socket and
//! config (extra TOML appended, e.g. a proxy plugin), CRI disabled; `ctr`
//! against it. Stopped, and its containers' mounts undone, on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct ContainerdDaemon {
    child: Option<Child>,
    dir: PathBuf,
    pub socket: PathBuf,
}

impl ContainerdDaemon {
    pub fn start(dir: &Path, extra_config: &str) -> ContainerdDaemon {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
                 [debug]\n  level = \"info\"\n{extra_config}",
                root = dir.join("root").display(),
                state = dir.join("state").display(),
                sock = socket.display(),
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start containerd (apt install containerd; hack/install-deps.sh does)");
        let mut d = ContainerdDaemon {
            child: Some(child),
            dir: dir.to_owned(),
            socket,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !d.ctr(&["version"]).status.success() {
            if let Some(status) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("containerd exited with {status}:\n{}", d.log());
            }
            assert!(
                Instant::now() < deadline,
                "containerd did not serve in 30 s:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        d
    }

    /// `ctr --address SOCKET ARGS...`.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run ctr")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for ContainerdDaemon {
    fn drop(&mut self) {
        // Tasks first (their shims outlive containerd otherwise).
        let tasks = self.ctr(&["task", "ls", "-q"]);
        for id in String::from_utf8_lossy(&tasks.stdout).lines() {
            let _ = self.ctr(&["task", "kill", "-s", "SIGKILL", id]);
            let _ = self.ctr(&["task", "delete", "-f", id]);
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for m in lazybd_blockdev::device::mounts::mounts_under(&self.dir)
            .unwrap_or_default()
            .iter()
            .rev()
        {
            let _ = nix::mount::umount2(m.as_path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}
