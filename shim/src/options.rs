//! Runtime options containerd passes on `start` (stdin) and in `Create`.
//!
//! containerd (and CRI for `io.containerd.runc.*` runtime types) sends runc's
//! `containerd.runc.v1.Options`; CRI sends `runtimeoptions.v1.Options`
//! (`type_url`, `config_path`) for any other runtime type. The type URL is
//! checked before decoding: decoding one as the other silently yields garbage
//! (rust-extensions issue 377).

use std::path::{Path, PathBuf};

use containerd_shim::asynchronous::util::{read_options, write_options};
use containerd_shim_protos::{
    protobuf::{well_known_types::any::Any, CodedInputStream, Message},
    shim::oci::Options,
};
use log::info;
use serde::Deserialize;

use crate::{error::Error, error::Result, runc::Runc};

const RUNC_OPTIONS: &str = "containerd.runc.v1.Options";
const CRI_RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";
/// Where runc keeps container state unless the options say otherwise; the
/// namespace is appended, as the Go shim does.
const DEFAULT_RUNC_ROOT: &str = "/run/containerd/runc";

/// The runc options in effect for a container.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RuntimeOptions {
    pub runc: Options,
    /// `config_path` of CRI's `runtimeoptions.v1.Options`, if that is what came.
    pub config_path: Option<String>,
}

/// The message name of a type URL (`type.googleapis.com/x.y.Z` or `x.y.Z`).
fn type_name(url: &str) -> &str {
    url.rsplit('/').next().unwrap_or(url)
}

impl RuntimeOptions {
    /// Decodes `any` after checking its type; an absent or empty `Any` means defaults.
    pub fn decode(any: Option<&Any>) -> Result<Self> {
        let Some(any) = any.filter(|a| !a.type_url.is_empty()) else {
            return Ok(Self::default());
        };
        match type_name(&any.type_url) {
            RUNC_OPTIONS => Ok(Self {
                runc: Options::parse_from_bytes(&any.value).map_err(|e| {
                    Error::InvalidArgument(format!("{RUNC_OPTIONS}: {e}"))
                })?,
                config_path: None,
            }),
            CRI_RUNTIME_OPTIONS => {
                let config_path = decode_cri_config_path(&any.value)?;
                let runc = match config_path.as_str() {
                    "" => Options::default(),
                    path => read_config_file(Path::new(path))?,
                };
                Ok(Self {
                    runc,
                    config_path: Some(config_path),
                })
            }
            other => Err(Error::InvalidArgument(format!(
                "unsupported runtime options type {other:?} (want {RUNC_OPTIONS} or {CRI_RUNTIME_OPTIONS})"
            ))),
        }
    }

    /// Kept in the bundle so `delete` can find runc after the shim died.
    pub async fn save(&self, bundle: &Path) -> Result<()> {
        Ok(write_options(bundle, &self.runc).await?)
    }

    /// What [`RuntimeOptions::save`] kept, or defaults when nothing was saved.
    pub async fn load(bundle: &Path) -> Self {
        match read_options(bundle).await {
            Ok(runc) => Self {
                runc,
                config_path: None,
            },
            Err(e) => {
                info!("no saved runtime options in {}: {e}", bundle.display());
                Self::default()
            }
        }
    }

    /// runc for a container of `namespace` in `bundle`.
    pub fn runc(&self, namespace: &str, bundle: &Path) -> Runc {
        let binary = match self.runc.binary_name.as_str() {
            "" => PathBuf::from("runc"),
            name => PathBuf::from(name),
        };
        let root = match self.runc.root.as_str() {
            "" => PathBuf::from(DEFAULT_RUNC_ROOT),
            root => PathBuf::from(root),
        };
        Runc {
            binary,
            root: root.join(namespace),
            systemd_cgroup: self.runc.systemd_cgroup,
            no_pivot_root: self.runc.no_pivot_root,
            log: bundle.join("log.json"),
        }
    }
}

/// The runc options a CRI runtime's `ConfigPath` file sets: containerd 1.6
/// and 1.7 pass a runtime's `options` table as runc options only to
/// `io.containerd.runc.*` runtimes, so under CRI this file is how runc's
/// binary, root and cgroup driver are chosen for the lazybd runtime.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "PascalCase")]
struct ConfigFile {
    #[serde(default)]
    binary_name: String,
    #[serde(default)]
    root: String,
    #[serde(default)]
    systemd_cgroup: bool,
    #[serde(default)]
    no_pivot_root: bool,
    #[serde(default)]
    shim_cgroup: String,
}

/// A runtime config file is a few lines; a bigger one (or a device that
/// never ends, like /dev/zero) is refused, not read into memory.
const MAX_CONFIG_FILE: u64 = 64 << 10;

fn read_config_file(path: &Path) -> Result<Options> {
    use std::io::Read;
    let bad =
        |e: String| Error::InvalidArgument(format!("runtime config file {}: {e}", path.display()));
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    if !file.metadata().map_err(|e| bad(e.to_string()))?.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let mut text = String::new();
    file.take(MAX_CONFIG_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_CONFIG_FILE {
        return Err(bad(format!("longer than {MAX_CONFIG_FILE} bytes")));
    }
    parse_config(&text).map_err(bad)
}

/// The runc options a runtime config file's text sets.
pub fn parse_config(text: &str) -> std::result::Result<Options, String> {
    let file: ConfigFile = toml::from_str(text).map_err(|e| e.to_string())?;
    Ok(Options {
        binary_name: file.binary_name,
        root: file.root,
        systemd_cgroup: file.systemd_cgroup,
        no_pivot_root: file.no_pivot_root,
        shim_cgroup: file.shim_cgroup,
        ..Default::default()
    })
}

/// `runtimeoptions.v1.Options.config_path` (field 2); the crate set has no
/// generated type for CRI's runtimeoptions, and two string fields do not
/// justify a protobuf build step.
pub fn decode_cri_config_path(bytes: &[u8]) -> Result<String> {
    let bad = |e: containerd_shim_protos::protobuf::Error| {
        Error::InvalidArgument(format!("{CRI_RUNTIME_OPTIONS}: {e}"))
    };
    let mut input = CodedInputStream::from_bytes(bytes);
    let mut config_path = String::new();
    while let Some(tag) = input.read_raw_tag_or_eof().map_err(bad)? {
        match tag {
            // field 2, length-delimited
            0x12 => config_path = input.read_string().map_err(bad)?,
            tag => input
                .skip_field(
                    containerd_shim_protos::protobuf::rt::WireType::new(tag & 7).ok_or_else(
                        || {
                            Error::InvalidArgument(format!(
                                "{CRI_RUNTIME_OPTIONS}: bad wire type in tag {tag}"
                            ))
                        },
                    )?,
                )
                .map_err(bad)?,
        }
    }
    Ok(config_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn any(type_url: &str, value: Vec<u8>) -> Any {
        Any {
            type_url: type_url.into(),
            value,
            ..Default::default()
        }
    }

    #[test]
    fn runc_options_are_decoded_and_drive_runc() {
        let opts = Options {
            binary_name: "/usr/local/bin/crun".into(),
            root: "/run/alt".into(),
            systemd_cgroup: true,
            ..Default::default()
        };
        let any = any("containerd.runc.v1.Options", opts.write_to_bytes().unwrap());
        let decoded = RuntimeOptions::decode(Some(&any)).unwrap();
        assert_eq!(decoded.runc, opts);
        let runc = decoded.runc("k8s.io", Path::new("/b"));
        assert_eq!(runc.binary, PathBuf::from("/usr/local/bin/crun"));
        assert_eq!(runc.root, PathBuf::from("/run/alt/k8s.io"));
        assert!(runc.systemd_cgroup);
    }

    /// CRI's `runtimeoptions.v1.Options`: type_url "x" (field 1), then `path` (field 2).
    fn cri_options(path: &str) -> Any {
        let mut value = vec![0x0a, 1, b'x', 0x12, path.len() as u8];
        value.extend_from_slice(path.as_bytes());
        any("type.googleapis.com/runtimeoptions.v1.Options", value)
    }

    #[test]
    fn cri_runtime_options_are_not_read_as_runc_options() {
        let decoded = RuntimeOptions::decode(Some(&cri_options(""))).unwrap();
        assert_eq!(decoded.config_path.as_deref(), Some(""));
        assert_eq!(decoded.runc, Options::default());
        let runc = decoded.runc("default", Path::new("/b"));
        assert_eq!(runc.binary, PathBuf::from("runc"));
        assert_eq!(runc.root, PathBuf::from("/run/containerd/runc/default"));
    }

    #[test]
    fn a_cri_config_file_sets_the_runc_options() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("shim.toml");
        std::fs::write(
            &path,
            "BinaryName = \"/usr/local/bin/crun\"\nRoot = \"/run/alt\"\nSystemdCgroup = true\n",
        )
        .unwrap();
        let decoded = RuntimeOptions::decode(Some(&cri_options(path.to_str().unwrap()))).unwrap();
        let runc = decoded.runc("k8s.io", Path::new("/b"));
        assert_eq!(runc.binary, PathBuf::from("/usr/local/bin/crun"));
        assert_eq!(runc.root, PathBuf::from("/run/alt/k8s.io"));
        assert!(runc.systemd_cgroup);

        std::fs::write(&path, "BinaryNam = \"typo\"\n").unwrap();
        let err = RuntimeOptions::decode(Some(&cri_options(path.to_str().unwrap()))).unwrap_err();
        assert!(err.to_string().contains("BinaryNam"), "{err}");
        // Not a regular file: refused, never read (/dev/zero would not end).
        let err = RuntimeOptions::decode(Some(&cri_options("/dev/zero"))).unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        std::fs::write(&path, "#".repeat(1 << 20)).unwrap();
        let err = RuntimeOptions::decode(Some(&cri_options(path.to_str().unwrap()))).unwrap_err();
        assert!(err.to_string().contains("longer than"), "{err}");
        let missing = dir.path().join("missing.toml");
        let err =
            RuntimeOptions::decode(Some(&cri_options(missing.to_str().unwrap()))).unwrap_err();
        assert!(err.to_string().contains("missing.toml"), "{err}");
    }

    #[test]
    fn unknown_and_corrupt_options_are_rejected() {
        let err = RuntimeOptions::decode(Some(&any("example.com/Other", vec![1]))).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        let err =
            RuntimeOptions::decode(Some(&any("containerd.runc.v1.Options", vec![0x0a, 50, 1])))
                .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
        assert_eq!(
            RuntimeOptions::decode(None).unwrap(),
            RuntimeOptions::default()
        );
    }
}
