//! The `start` action: find or launch the shim server for this container and
//! print its ttrpc address.
//!
//! Containers of one pod share one shim (grouped by the
//! `io.kubernetes.cri.sandbox-id` annotation, as the Go runc-v2 shim does): if
//! the group's socket answers, its address is reused. Otherwise `start` binds
//! the socket itself and passes it to the server it launches, so a second
//! `start` for the same pod sees it at once, and reports only after the
//! server signalled that it serves; a server that fails or hangs is killed,
//! so a failed start leaves no process behind.

use std::{
    io::Read,
    os::{
        fd::{AsRawFd, OwnedFd},
        unix::{
            net::{UnixListener, UnixStream},
            process::CommandExt,
        },
    },
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context};
use containerd_shim::{cgroup::set_cgroup_and_oom_score, socket_address, Flags};
use containerd_shim_protos::protobuf::{well_known_types::any::Any, Message};

use crate::{options::RuntimeOptions, server::LISTENER_FD};

/// Annotations whose value names the shim group, in order of precedence.
const GROUP_LABELS: [&str; 2] = [
    "io.containerd.runc.v2.group",
    "io.kubernetes.cri.sandbox-id",
];
/// How long the new server may take to start serving.
const SERVER_START_DEADLINE: Duration = Duration::from_secs(10);
/// What the server writes to `start` once it serves.
pub(crate) const SERVER_READY: &[u8] = b"serving\n";

/// The shim group of the container in `bundle`: its pod, else itself.
pub fn grouping(bundle: &Path, id: &str) -> String {
    let spec = std::fs::read(bundle.join("config.json"))
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
    spec.as_ref()
        .and_then(|spec| {
            GROUP_LABELS
                .iter()
                .find_map(|label| spec["annotations"][label].as_str())
        })
        .filter(|group| !group.is_empty())
        .unwrap_or(id)
        .to_string()
}

pub fn start(flags: &Flags) -> anyhow::Result<String> {
    if std::env::var_os("TTRPC_ADDRESS").is_none() {
        bail!("TTRPC_ADDRESS is not set: start must be run by containerd");
    }
    let bundle = std::env::current_dir().context("bundle dir")?;
    let group = grouping(&bundle, &flags.id);
    let address = socket_address(&flags.address, &flags.namespace, &group);
    let path = address.trim_start_matches("unix://");

    if UnixStream::connect(path).is_ok() {
        std::fs::write("address", &address).context("write address")?;
        return Ok(address);
    }
    // A dead shim's socket: nobody answers on it.
    let _ = std::fs::remove_file(path);
    if let Some(dir) = Path::new(path).parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("mkdir {}", dir.display()))?;
    }
    let listener = bind_private(Path::new(path)).with_context(|| format!("bind {path}"))?;
    let launched = launch_server(flags, &address, listener, &read_start_options()?);
    if let Err(e) = launched {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    std::fs::write("address", &address).context("write address")?;
    Ok(address)
}

/// Binds the shim's socket with mode 0600 (only containerd, as root, may
/// drive the shim): bound in a fresh 0700 directory beside `path`, given its
/// mode, then renamed into place, so it never exists at `path` with the
/// umask's mode. (`lazybd_blockdev::local_server::bind_unix` does the same
/// for the other daemons; the shim does not depend on blockdev.)
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    let private = parent.join(format!(".bind-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let bound = (|| {
        let temp = private.join("s");
        let listener = UnixListener::bind(&temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&temp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// The runtime options containerd pipes to `start` (may be empty).
fn read_start_options() -> anyhow::Result<RuntimeOptions> {
    let mut input = Vec::new();
    std::io::stdin()
        .take(1 << 20)
        .read_to_end(&mut input)
        .context("read stdin")?;
    if input.is_empty() {
        return Ok(RuntimeOptions::default());
    }
    let any = Any::parse_from_bytes(&input).context("runtime options on stdin")?;
    Ok(RuntimeOptions::decode(Some(&any))?)
}

fn launch_server(
    flags: &Flags,
    address: &str,
    listener: UnixListener,
    options: &RuntimeOptions,
) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("own path")?;
    let mut cmd = Command::new(exe);
    cmd.args([
        "-namespace",
        &flags.namespace,
        "-id",
        &flags.id,
        "-address",
        &flags.address,
    ])
    .args(["-socket", address])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    // Not in containerd's process group: signals to it must not reach the shim.
    .process_group(0);
    if flags.debug {
        cmd.arg("-debug");
    }
    let listener_fd = listener.as_raw_fd();
    // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if listener_fd == LISTENER_FD {
                let flags = libc::fcntl(LISTENER_FD, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(LISTENER_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(listener_fd, LISTENER_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("launch the shim server")?;
    drop(listener);
    let ready = wait_released(&mut child);
    let confined = ready.and_then(|()| {
        set_cgroup_and_oom_score(child.id(), &options.runc.shim_cgroup)
            .map_err(|e| anyhow!("confine the shim server: {e}"))
    });
    if let Err(e) = confined {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    Ok(())
}

/// Waits until the server says it serves and closes its stdout, or exits, or
/// overruns the deadline.
fn wait_released(child: &mut std::process::Child) -> anyhow::Result<()> {
    let stdout = child.stdout.take().expect("piped");
    let mut file = std::fs::File::from(OwnedFd::from(stdout));
    let raw = file.as_raw_fd();
    let deadline = Instant::now() + SERVER_START_DEADLINE;
    let mut said = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("shim server did not start serving within {SERVER_START_DEADLINE:?}");
        }
        let mut poll = [libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe {
            libc::poll(
                poll.as_mut_ptr(),
                1,
                left.as_millis().min(i32::MAX as u128) as i32,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("wait for the shim server");
        }
        if n == 0 {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) => break,
            // Bounded: the server writes one short line.
            Ok(n) if said.len() < SERVER_READY.len() => said.extend_from_slice(&buf[..n]),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("wait for the shim server"),
        }
    }
    if said.starts_with(SERVER_READY) {
        return Ok(());
    }
    // Its stdout closed without the line: it is exiting. Bounded all the same.
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().context("shim server status")? {
            bail!(
                "shim server exited during start ({status}); see containerd's log for the shim log"
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("shim server closed its stdout without serving and did not exit within {SERVER_START_DEADLINE:?}; killed it");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pods_share_a_group_and_other_containers_are_their_own() {
        let dir = std::env::temp_dir().join(format!("lazybd-shim-grouping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |annotations: serde_json::Value| {
            std::fs::write(
                dir.join("config.json"),
                serde_json::json!({"ociVersion": "1.0.2", "annotations": annotations}).to_string(),
            )
            .unwrap();
        };
        write(serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod1"}));
        assert_eq!(grouping(&dir, "c1"), "pod1");
        write(
            serde_json::json!({"io.kubernetes.cri.sandbox-id": "pod1", "io.containerd.runc.v2.group": "g"}),
        );
        assert_eq!(grouping(&dir, "c1"), "g");
        write(serde_json::json!({}));
        assert_eq!(grouping(&dir, "c1"), "c1");
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(grouping(&dir, "c2"), "c2", "no config.json: own group");
    }

    #[test]
    fn the_shim_socket_is_bound_for_root_only() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("s").join("shim.sock");
        std::fs::create_dir(path.parent().unwrap()).unwrap();
        // A stale socket is replaced.
        std::fs::write(&path, b"").unwrap();
        let _listener = bind_private(&path).unwrap();
        // Bound as usual it would have 0777 less the umask.
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        UnixStream::connect(&path).unwrap();
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["shim.sock"], "no private dir left");
    }
}
