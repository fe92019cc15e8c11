//! A private `lazybd-snapshotter` on a temp root and socket, and a gRPC
//! client to it (containerd's own Snapshots API client).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use containerd_client::services::v1::snapshots::snapshots_client::SnapshotsClient;
use containerd_client::tonic::transport::Channel;

use crate::bin_path;

pub struct SnapshotterDaemon {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    pub control: PathBuf,
    config: PathBuf,
    log: PathBuf,
}

impl SnapshotterDaemon {
    /// Starts the daemon with `root` as its root and `config_toml` as its
    /// config file (written next to it).
    pub fn start(dir: &Path, config_toml: &str) -> SnapshotterDaemon {
        let config = dir.join("snapshotter.toml");
        std::fs::write(&config, config_toml).unwrap();
        let mut d = SnapshotterDaemon {
            child: None,
            root: dir.join("root"),
            socket: dir.join("snapshotter.sock"),
            control: dir.join("control.sock"),
            config,
            log: dir.join("snapshotter.log"),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(bin_path("lazybd-snapshotter"))
            .arg("--root")
            .arg(&self.root)
            .arg("--address")
            .arg(&self.socket)
            .arg("--control-address")
            .arg(&self.control)
            .args(["--metrics-address", "127.0.0.1:0"])
            .arg("--config")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start lazybd-snapshotter");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("lazybd-snapshotter exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "lazybd-snapshotter did not serve in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait: the daemon detaches its lazy layers and exits.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "lazybd-snapshotter ignored SIGTERM for 30 s:\n{}",
                        self.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILL, as a crash would: nothing is detached or unmounted.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub async fn client(&self) -> SnapshotsClient<Channel> {
        SnapshotsClient::new(containerd_client::connect(&self.socket).await.unwrap())
    }

    /// `GET /metrics` (the port is the one the daemon logged last).
    pub fn metrics(&self) -> String {
        use std::io::{Read, Write};
        let log = self.log();
        let addr = log
            .rsplit("metrics on http://")
            .next()
            .and_then(|rest| rest.split('/').next())
            .filter(|_| log.contains("metrics on http://"))
            .expect("the daemon logs its metrics address")
            .to_owned();
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut reply = String::new();
        stream.read_to_string(&mut reply).unwrap();
        assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        reply
    }

    /// One request line to the control API, its reply parsed.
    pub fn control(&self, request: &serde_json::Value) -> serde_json::Value {
        use std::io::{BufRead, Write};
        let mut stream = std::os::unix::net::UnixStream::connect(&self.control).unwrap();
        writeln!(stream, "{request}").unwrap();
        let mut line = String::new();
        std::io::BufReader::new(&stream)
            .read_line(&mut line)
            .unwrap();
        serde_json::from_str(&line).unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for SnapshotterDaemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The value of the sample `name` (with its labels) in a metrics text.
pub fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{metrics}"))
}

/// The sum of every sample whose line starts with `prefix`.
pub fn metric_sum(metrics: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Mounts what a snapshotter returned at `target`, as containerd would;
/// unmounted on drop.
pub struct Mounted {
    target: PathBuf,
}

impl Mounted {
    pub fn new(mounts: &[containerd_client::types::Mount], target: &Path) -> Mounted {
        use nix::mount::{mount, MsFlags};
        assert_eq!(mounts.len(), 1, "{mounts:?}");
        let m = &mounts[0];
        let read_only = m.options.iter().any(|o| o == "ro");
        match m.r#type.as_str() {
            "bind" => {
                mount(
                    Some(m.source.as_str()),
                    target,
                    None::<&str>,
                    MsFlags::MS_BIND | MsFlags::MS_REC,
                    None::<&str>,
                )
                .unwrap();
                if read_only {
                    mount(
                        None::<&str>,
                        target,
                        None::<&str>,
                        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
                        None::<&str>,
                    )
                    .unwrap();
                }
            }
            "overlay" => {
                let data: Vec<&str> = m
                    .options
                    .iter()
                    .map(String::as_str)
                    .filter(|o| *o != "ro" && *o != "rw")
                    .collect();
                let flags = if read_only {
                    MsFlags::MS_RDONLY
                } else {
                    MsFlags::empty()
                };
                mount(
                    Some("overlay"),
                    target,
                    Some("overlay"),
                    flags,
                    Some(data.join(",").as_str()),
                )
                .unwrap_or_else(|e| panic!("mount {m:?}: {e}"));
            }
            other => panic!("unexpected mount type {other}"),
        }
        Mounted {
            target: target.to_owned(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.target, nix::mount::MntFlags::MNT_DETACH);
    }
}
