//! Which NICs the node's operator has offered to `eni`. ADD moves nothing
//! else, whatever MAC the request names.
//!
//! Two sources; either is enough:
//! * the network config: its `mac` and `allowedMacs`;
//! * the registry `<stateDir>/available/<12 hex digits of the MAC>`, kept by
//!   whatever hot-plugs ENIs. One file per ENI holding one JSON object:
//!   `{}` offers the ENI to any pod; `podUID`, `podNamespace`, `podName`
//!   bind it to one pod (every key given must equal `K8S_POD_UID`,
//!   `K8S_POD_NAMESPACE`, `K8S_POD_NAME` in `CNI_ARGS`, which the runtime
//!   fills from the sandbox, not from anything the pod's author writes).
//!   The agent writes it under a temporary name in the same directory and
//!   renames it: one atomic step, so eni never sees half an entry.
//!
//! The registry is trusted only as far as its directory is: it must be a
//! real directory owned by the plugin's user and not writable by group or
//! others; entries must be regular files. An entry that cannot be read or
//! parsed (a torn write, a typo'd key) refuses; it never offers.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::config::NetConf;
use crate::env::Env;
use crate::error::{CniError, Result};
use crate::mac::Mac;

/// The registry's directory under the state dir.
pub const REGISTRY_DIR: &str = "available";
/// An entry is a few dozen bytes; anything larger is not one.
const MAX_ENTRY_BYTES: u64 = 4096;

/// Why ADD may take the ENI (for the log).
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// `mac` or `allowedMacs` in the network config.
    Config,
    /// A registry entry, at this path.
    Registry(PathBuf),
}

/// A registry entry: which pod the ENI is for. No key: any pod.
#[derive(Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    #[serde(rename = "podUID")]
    pub pod_uid: Option<String>,
    #[serde(rename = "podNamespace")]
    pub pod_namespace: Option<String>,
    #[serde(rename = "podName")]
    pub pod_name: Option<String>,
}

impl Entry {
    /// Refuses unless every binding it carries matches the pod in `env`.
    fn admits(&self, env: &Env, mac: Mac, path: &Path) -> Result<()> {
        for (want, arg) in [
            (&self.pod_uid, "K8S_POD_UID"),
            (&self.pod_namespace, "K8S_POD_NAMESPACE"),
            (&self.pod_name, "K8S_POD_NAME"),
        ] {
            let Some(want) = want else { continue };
            let have = env.arg(arg);
            if have != Some(want.as_str()) {
                return Err(CniError::NotPermitted(format!(
                    "ENI {mac} is offered to the pod with {arg}={want} ({}), not to this one \
                     ({arg}={})",
                    path.display(),
                    have.unwrap_or("<unset>")
                )));
            }
        }
        Ok(())
    }
}

/// Decides whether ADD for `env` may take the ENI with `mac`.
pub fn check(conf: &NetConf, env: &Env, mac: Mac) -> Result<Offer> {
    if conf.offers(mac) {
        return Ok(Offer::Config);
    }
    let dir = conf.state_dir.join(REGISTRY_DIR);
    let path = dir.join(mac.hex());
    let not_offered = || {
        CniError::NotPermitted(format!(
            "ENI {mac} is not offered to eni: it is neither the config's mac nor in its \
             allowedMacs, and {} does not exist",
            path.display()
        ))
    };
    match std::fs::symlink_metadata(&dir) {
        Ok(meta) => trusted_dir(&dir, &meta)?,
        Err(e) if e.kind() == ErrorKind::NotFound => return Err(not_offered()),
        Err(e) => return Err(CniError::io(format!("stat {}", dir.display()), e)),
    }
    let entry = match read_entry(&path) {
        Ok(Some(entry)) => entry,
        Ok(None) => return Err(not_offered()),
        Err(why) => {
            return Err(CniError::NotPermitted(format!(
                "ENI {mac}: registry entry {} is not usable ({why}); the agent must rename a \
                 complete JSON object into place",
                path.display()
            )))
        }
    };
    entry.admits(env, mac, &path)?;
    Ok(Offer::Registry(path))
}

/// Only root (the plugin's user) may decide what is offered.
fn trusted_dir(dir: &Path, meta: &std::fs::Metadata) -> Result<()> {
    let euid = nix::unistd::geteuid().as_raw();
    let why = if !meta.is_dir() {
        Some("is not a directory".to_string())
    } else if meta.uid() != euid {
        Some(format!("is owned by uid {}, not {euid}", meta.uid()))
    } else if meta.mode() & 0o022 != 0 {
        Some(format!(
            "is writable by group or others (mode {:o})",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(CniError::NotPermitted(format!(
            "the ENI registry {} {why}; refusing to trust it",
            dir.display()
        ))),
        None => Ok(()),
    }
}

/// Ok(None): no entry. Err: an entry that is there but not valid.
fn read_entry(path: &Path) -> std::result::Result<Option<Entry>, String> {
    // O_NOFOLLOW: a symlink could hand the decision to a file elsewhere;
    // O_NONBLOCK: a FIFO planted here must not hang the plugin.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path);
    let file = match file {
        Ok(f) => f,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err("it is a symlink".into())
        }
        Err(e) => return Err(e.to_string()),
    };
    let meta = file.metadata().map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err("it is not a regular file".into());
    }
    let mut bytes = Vec::new();
    File::take(file, MAX_ENTRY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > MAX_ENTRY_BYTES {
        return Err(format!("it is larger than {MAX_ENTRY_BYTES} bytes"));
    }
    serde_json::from_slice(&bytes).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::os::unix::fs::PermissionsExt;

    const MAC: &str = "02:00:00:00:00:2a";

    fn conf(dir: &Path, extra: serde_json::Value) -> NetConf {
        let mut v = json!({"cniVersion": "1.1.0", "name": "n", "type": "eni",
                           "stateDir": dir});
        v.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        NetConf::parse(v.to_string().as_bytes()).unwrap()
    }

    fn env(args: &str) -> Env {
        let args = args.to_string();
        Env::from_vars(move |k| match k {
            "CNI_COMMAND" => Some("VERSION".into()),
            "CNI_ARGS" => Some(args.clone()),
            _ => None,
        })
        .unwrap()
    }

    fn registry(dir: &Path) -> PathBuf {
        let reg = dir.join(REGISTRY_DIR);
        std::fs::create_dir_all(&reg).unwrap();
        std::fs::set_permissions(&reg, std::fs::Permissions::from_mode(0o700)).unwrap();
        reg
    }

    fn mac() -> Mac {
        MAC.parse().unwrap()
    }

    #[test]
    fn config_mac_and_allowlist_offer() {
        let dir = tempfile::tempdir().unwrap();
        let c = conf(dir.path(), json!({"mac": MAC}));
        assert_eq!(check(&c, &env(""), mac()).unwrap(), Offer::Config);
        let c = conf(
            dir.path(),
            json!({"allowedMacs": ["02:00:00:00:00:01", MAC]}),
        );
        assert_eq!(check(&c, &env(""), mac()).unwrap(), Offer::Config);
    }

    #[test]
    fn nothing_offered_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = conf(dir.path(), json!({"allowedMacs": ["02:00:00:00:00:01"]}));
        let e = check(&c, &env(""), mac()).unwrap_err();
        assert_eq!(e.code(), 105);
        assert!(e.to_string().contains(MAC), "{e}");
        registry(dir.path());
        assert_eq!(check(&c, &env(""), mac()).unwrap_err().code(), 105);
    }

    #[test]
    fn registry_entries_offer_and_bind() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let c = conf(dir.path(), json!({}));
        let path = reg.join("02000000002a");
        let pod = env("K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1;K8S_POD_UID=u1");
        std::fs::write(&path, "{}").unwrap();
        assert_eq!(
            check(&c, &env(""), mac()).unwrap(),
            Offer::Registry(path.clone())
        );
        std::fs::write(
            &path,
            r#"{"podUID":"u1","podNamespace":"shop","podName":"web-1"}"#,
        )
        .unwrap();
        assert!(check(&c, &pod, mac()).is_ok());
        for (entry, needle) in [
            (r#"{"podUID":"u2"}"#, "u2"),
            (r#"{"podNamespace":"other"}"#, "other"),
            (r#"{"podName":"web-2"}"#, "web-2"),
        ] {
            std::fs::write(&path, entry).unwrap();
            let e = check(&c, &pod, mac()).unwrap_err();
            assert_eq!(e.code(), 105, "{entry}");
            assert!(e.to_string().contains(needle), "{e}");
        }
        // Bound, but the runtime did not say which pod this is.
        std::fs::write(&path, r#"{"podUID":"u1"}"#).unwrap();
        let e = check(&c, &env(""), mac()).unwrap_err();
        assert!(e.to_string().contains("<unset>"), "{e}");
    }

    #[test]
    fn unusable_entries_refuse() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        let c = conf(dir.path(), json!({}));
        let path = reg.join("02000000002a");
        for bad in ["", "{", "[]", r#"{"podUid":"typo"}"#] {
            std::fs::write(&path, bad).unwrap();
            let e = check(&c, &env(""), mac()).unwrap_err();
            assert_eq!(e.code(), 105, "{bad:?}");
        }
        std::fs::write(&path, vec![b' '; 5000]).unwrap();
        assert!(check(&c, &env(""), mac())
            .unwrap_err()
            .to_string()
            .contains("larger"));
        std::fs::remove_file(&path).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::fs::write(&elsewhere, "{}").unwrap();
        std::os::unix::fs::symlink(&elsewhere, &path).unwrap();
        assert!(check(&c, &env(""), mac())
            .unwrap_err()
            .to_string()
            .contains("symlink"));
        std::fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert!(check(&c, &env(""), mac())
            .unwrap_err()
            .to_string()
            .contains("regular file"));
    }

    #[test]
    fn a_registry_others_can_write_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let reg = registry(dir.path());
        std::fs::write(reg.join("02000000002a"), "{}").unwrap();
        let c = conf(dir.path(), json!({}));
        std::fs::set_permissions(&reg, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check(&c, &env(""), mac()).unwrap_err();
        assert!(e.to_string().contains("writable"), "{e}");
        std::fs::set_permissions(&reg, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(check(&c, &env(""), mac()).is_ok());
    }
}
