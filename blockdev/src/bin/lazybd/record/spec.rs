//! What the recording runs: the image's entrypoint as a container runtime
//! would start it (its `Entrypoint` + `Cmd`, `Env`, `WorkingDir`, `User`),
//! as an OCI runtime spec for runc. The defaults (mounts, capabilities,
//! masked paths) are containerd's, so the workload reads at start what it
//! reads under containerd; it has its own pid, mount, ipc, uts and network
//! namespaces, and the network namespace has no interfaces but `lo`.

use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;

use anyhow::{bail, Context, Result};
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::Mode;
use serde_json::{json, Value};

/// containerd's PATH for images whose `Env` has none.
const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Largest /etc/passwd or /etc/group read from an image.
const MAX_ACCOUNTS_FILE: u64 = 1 << 20;
/// containerd's default capabilities (Docker's).
const CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// The process an image's config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `User` as the image says it: empty, `user`, `uid`, `user:group`, ...
    pub user: String,
}

impl Workload {
    /// From an image config (the JSON document, whose `config` object holds
    /// the runtime settings).
    pub fn from_image_config(image_config: &Value) -> Result<Self> {
        let c = &image_config["config"];
        let strings = |key: &str| -> Result<Vec<String>> {
            match &c[key] {
                Value::Null => Ok(Vec::new()),
                Value::Array(items) => items
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .with_context(|| format!("image config: {key} holds a non-string"))
                    })
                    .collect(),
                _ => bail!("image config: {key} is not a list of strings"),
            }
        };
        let mut args = strings("Entrypoint")?;
        args.extend(strings("Cmd")?);
        if args.is_empty() {
            bail!(
                "the image has neither an Entrypoint nor a Cmd: there is nothing to run to \
                 record a startup profile (convert it with --profile FILE instead)"
            );
        }
        let mut env = strings("Env")?;
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push(DEFAULT_PATH.to_owned());
        }
        let text = |key: &str| c[key].as_str().unwrap_or_default().to_owned();
        let cwd = Some(text("WorkingDir"))
            .filter(|d| !d.is_empty())
            .unwrap_or_else(|| "/".to_owned());
        if !cwd.starts_with('/') {
            bail!("image config: WorkingDir {cwd:?} is not an absolute path");
        }
        Ok(Workload {
            args,
            env,
            cwd,
            user: text("User"),
        })
    }
}

/// Whom the workload runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// Resolves an image's `User` as containerd does: names through the
/// image's own /etc/passwd and /etc/group (read inside `rootfs`, so a
/// symlink in the image cannot point at the host's files); a numeric user
/// not in /etc/passwd gets group 0; a name that is not there is an error.
/// Supplementary groups are the /etc/group entries that list the user.
pub fn resolve_user(user: &str, rootfs: &Path) -> Result<User> {
    let passwd = read_in_root(rootfs, "etc/passwd")?;
    let group = read_in_root(rootfs, "etc/group")?;
    resolve_user_in(user, &passwd, &group)
}

fn resolve_user_in(user: &str, passwd: &str, group: &str) -> Result<User> {
    let accounts = parse_colon_file(passwd);
    let groups = parse_colon_file(group);
    let (name_part, group_part) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    // The passwd entry (name, uid, gid) of the user, if there is one.
    let entry = if name_part.is_empty() {
        Some(("root".to_owned(), 0, 0))
    } else if let Ok(uid) = name_part.parse::<u32>() {
        accounts
            .iter()
            .find(|a| a.get(2).and_then(|u| u.parse().ok()) == Some(uid))
            .map(|a| {
                (
                    a[0].clone(),
                    uid,
                    a.get(3).and_then(|g| g.parse().ok()).unwrap_or(0),
                )
            })
            .or(Some((String::new(), uid, 0)))
    } else {
        let a = accounts
            .iter()
            .find(|a| a[0] == name_part)
            .with_context(|| format!("user {name_part:?} is not in the image's /etc/passwd"))?;
        let num = |i: usize| a.get(i).and_then(|v| v.parse::<u32>().ok());
        let (Some(uid), Some(gid)) = (num(2), num(3)) else {
            bail!("the image's /etc/passwd entry of {name_part:?} has no numeric uid and gid");
        };
        Some((name_part.to_owned(), uid, gid))
    };
    let (name, uid, mut gid) = entry.expect("every branch yields an entry");
    match group_part {
        None => {}
        Some(g) if g.parse::<u32>().is_ok() => gid = g.parse()?,
        Some(g) => {
            gid = groups
                .iter()
                .find(|e| e[0] == g)
                .and_then(|e| e.get(2)?.parse().ok())
                .with_context(|| format!("group {g:?} is not in the image's /etc/group"))?;
        }
    }
    let mut additional_gids: Vec<u32> = groups
        .iter()
        .filter(|e| {
            !name.is_empty()
                && e.get(3)
                    .is_some_and(|members| members.split(',').any(|m| m == name))
        })
        .filter_map(|e| e.get(2)?.parse().ok())
        .filter(|&g| g != gid)
        .collect();
    additional_gids.sort_unstable();
    additional_gids.dedup();
    Ok(User {
        uid,
        gid,
        additional_gids,
    })
}

/// The fields of each non-comment line of a colon-separated file.
fn parse_colon_file(text: &str) -> Vec<Vec<String>> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.split(':').map(str::to_owned).collect())
        .collect()
}

/// A small file of the image, resolved inside `rootfs` (symlinks and `..`
/// stay in it); missing: empty.
fn read_in_root(rootfs: &Path, path: &str) -> Result<String> {
    let root = std::fs::File::open(rootfs).with_context(|| format!("{}", rootfs.display()))?;
    let how = OpenHow::new()
        .flags(OFlag::O_RDONLY | OFlag::O_CLOEXEC)
        .mode(Mode::empty())
        .resolve(ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS);
    let fd = match openat2(root.as_fd(), path, how) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::ENOENT) => return Ok(String::new()),
        Err(e) => return Err(e).with_context(|| format!("opening the image's /{path}")),
    };
    let mut text = String::new();
    std::fs::File::from(fd)
        .take(MAX_ACCOUNTS_FILE + 1)
        .read_to_string(&mut text)
        .with_context(|| format!("reading the image's /{path}"))?;
    if text.len() as u64 > MAX_ACCOUNTS_FILE {
        bail!("the image's /{path} is larger than {MAX_ACCOUNTS_FILE} bytes");
    }
    Ok(text)
}

/// The OCI runtime spec (runc's `config.json`) running `w` as `user` on
/// `rootfs` (writable: the overlay's upper layer is a throwaway tmpfs).
pub fn runtime_spec(w: &Workload, user: &User, rootfs: &Path, hostname: &str) -> Value {
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let mount = |dest: &str, kind: &str, source: &str, options: &[&str]| json!({"destination": dest, "type": kind, "source": source, "options": options});
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": user.uid, "gid": user.gid, "additionalGids": user.additional_gids},
            "args": w.args,
            "env": w.env,
            "cwd": w.cwd,
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "noNewPrivileges": false,
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            mount("/proc", "proc", "proc", &["nosuid", "noexec", "nodev"]),
            mount("/dev", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
            mount("/dev/pts", "devpts", "devpts",
                  &["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
            mount("/dev/shm", "tmpfs", "shm", &["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
            mount("/dev/mqueue", "mqueue", "mqueue", &["nosuid", "noexec", "nodev"]),
            mount("/sys", "sysfs", "sysfs", &["nosuid", "noexec", "nodev", "ro"]),
            mount("/run", "tmpfs", "tmpfs", &["nosuid", "strictatime", "mode=755", "size=65536k"]),
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
                {"type": "network"},
            ],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap",
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
            ],
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(c: Value) -> Value {
        json!({"architecture": "amd64", "os": "linux", "config": c})
    }

    #[test]
    fn the_workload_is_entrypoint_then_cmd_with_the_image_env() {
        let w = Workload::from_image_config(&config(json!({
            "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo ready"],
            "Env": ["A=1"], "WorkingDir": "/app", "User": "app:staff",
        })))
        .unwrap();
        assert_eq!(w.args, ["/bin/sh", "-c", "echo ready"]);
        assert_eq!(w.env, ["A=1", DEFAULT_PATH]);
        assert_eq!((w.cwd.as_str(), w.user.as_str()), ("/app", "app:staff"));

        let w = Workload::from_image_config(&config(json!({
            "Cmd": ["python3"], "Env": ["PATH=/opt/bin"], "Entrypoint": null,
        })))
        .unwrap();
        assert_eq!(
            (w.args, w.env, w.cwd),
            (
                vec!["python3".to_owned()],
                vec!["PATH=/opt/bin".to_owned()],
                "/".to_owned()
            )
        );
    }

    #[test]
    fn an_image_without_entrypoint_or_cmd_or_with_bad_fields_is_refused() {
        for bad in [
            json!({}),
            json!({"Entrypoint": [], "Cmd": null}),
            json!({"Entrypoint": "/bin/sh"}),
            json!({"Cmd": ["x", 1]}),
            json!({"Cmd": ["x"], "WorkingDir": "app"}),
        ] {
            assert!(
                Workload::from_image_config(&config(bad.clone())).is_err(),
                "{bad}"
            );
        }
        let err = Workload::from_image_config(&config(json!({}))).unwrap_err();
        assert!(
            err.to_string().contains("neither an Entrypoint nor a Cmd"),
            "{err}"
        );
    }

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
        # a comment\n\
        app:x:1000:1001::/home/app:/bin/sh\n\
        svc:x:998:997::/:/bin/false\n";
    const GROUP: &str = "root:x:0:\nstaff:x:50:app,svc\napp:x:1001:\nextra:x:60:app\n";

    #[test]
    fn users_resolve_like_containerd() {
        let r = |u: &str| resolve_user_in(u, PASSWD, GROUP).unwrap();
        let user = |uid, gid, extra: &[u32]| User {
            uid,
            gid,
            additional_gids: extra.to_vec(),
        };
        assert_eq!(r(""), user(0, 0, &[]));
        assert_eq!(r("app"), user(1000, 1001, &[50, 60]));
        assert_eq!(r("1000"), user(1000, 1001, &[50, 60]));
        // A uid not in passwd: group 0, no supplementary groups.
        assert_eq!(r("4242"), user(4242, 0, &[]));
        assert_eq!(r("app:staff"), user(1000, 50, &[60]));
        assert_eq!(r("svc:7"), user(998, 7, &[50]));
        assert_eq!(r("5:6"), user(5, 6, &[]));
        for bad in ["nobody", "app:nogroup", "nobody:0"] {
            assert!(resolve_user_in(bad, PASSWD, GROUP).is_err(), "{bad}");
        }
        // Names need the files; numbers do not.
        assert!(resolve_user_in("app", "", "").is_err());
        assert_eq!(resolve_user_in("7:8", "", "").unwrap(), user(7, 8, &[]));
    }

    #[test]
    fn accounts_are_read_inside_the_rootfs() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("etc")).unwrap();
        // An absolute symlink resolves inside the rootfs, not on the host.
        std::fs::write(t.path().join("mine"), "me:x:7:8::/:/bin/sh\n").unwrap();
        std::os::unix::fs::symlink("/mine", t.path().join("etc/passwd")).unwrap();
        assert_eq!(
            read_in_root(t.path(), "etc/passwd").unwrap(),
            "me:x:7:8::/:/bin/sh\n"
        );
        assert_eq!(read_in_root(t.path(), "etc/group").unwrap(), "");
        std::os::unix::fs::symlink("../../../../etc/hostname", t.path().join("etc/group")).unwrap();
        assert_eq!(read_in_root(t.path(), "etc/group").unwrap(), "");
        assert_eq!(resolve_user("me", t.path()).unwrap().uid, 7);
    }

    #[test]
    fn the_spec_runs_the_workload_in_its_own_namespaces() {
        let w = Workload {
            args: vec!["/bin/true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            user: String::new(),
        };
        let user = User {
            uid: 1,
            gid: 2,
            additional_gids: vec![3],
        };
        let s = runtime_spec(&w, &user, Path::new("/r/rootfs"), "h");
        assert_eq!(s["process"]["args"], json!(["/bin/true"]));
        assert_eq!(
            s["process"]["user"],
            json!({"uid": 1, "gid": 2, "additionalGids": [3]})
        );
        assert_eq!(s["root"]["path"], "/r/rootfs");
        let ns: Vec<&str> = s["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["type"].as_str().unwrap())
            .collect();
        assert_eq!(ns, ["pid", "ipc", "uts", "mount", "network"]);
    }
}
