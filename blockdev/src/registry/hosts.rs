//! containerd's registry host configuration, read as containerd 1.6 reads it
//! (`config_path`, `<dir>/<host>/hosts.toml`, docs/hosts.md of containerd),
//! so one directory configures containerd and lazybd alike.
//!
//! For a registry `host[:port]` the first directory of `host_port_`,
//! `host[:port]` and `_default` under the config path that exists is used.
//! Its `hosts.toml` lists mirrors (`[host."URL"]`, in file order) and the
//! registry itself (`server`, last); without one, `*.crt` files in the
//! directory are CAs of the registry itself. Each entry has `capabilities`
//! (`pull`, `resolve`, `push`; default all three), `ca` (a file or a list,
//! relative to the directory), `skip_verify` and `client` certificates.
//!
//! What the registry client cannot do, it says instead of ignoring: a
//! `client` certificate or `override_path` (or a path other than `/v2`)
//! leaves that endpoint out, with the reason, and the next one is asked.
//! `header` tables are not sent.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

/// hosts.toml is a few entries; a larger file is refused, not read.
const MAX_HOSTS_FILE: u64 = 1 << 20;

#[derive(Debug, Error)]
pub enum HostsError {
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What an endpoint may be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    pub pull: bool,
    pub resolve: bool,
    pub push: bool,
}

impl Capabilities {
    const ALL: Capabilities = Capabilities {
        pull: true,
        resolve: true,
        push: true,
    };
}

/// One place to reach a registry's content: a mirror or the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `host[:port]` to connect to.
    pub host: String,
    /// HTTP instead of HTTPS (`http://` in hosts.toml).
    pub plain_http: bool,
    pub capabilities: Capabilities,
    /// PEM files of CAs trusted for this endpoint, besides the system's.
    pub ca: Vec<PathBuf>,
    pub skip_verify: bool,
}

/// A registry's endpoints as its host directory configures them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostsConfig {
    /// In the order they are asked: mirrors first, the registry last.
    pub endpoints: Vec<Endpoint>,
    /// Entries left out, each with the reason.
    pub skipped: Vec<String>,
}

/// The endpoints of `registry` (`host[:port]`) under `config_path`. `None`
/// when no directory applies: the registry alone, as without a config path.
pub fn endpoints(config_path: &Path, registry: &str) -> Result<Option<HostsConfig>, HostsError> {
    let Some(dir) = host_dir(config_path, registry) else {
        return Ok(None);
    };
    let file = dir.join("hosts.toml");
    let text = match read_bounded(&file) {
        Ok(t) => t,
        Err(HostsError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
            return Ok(Some(HostsConfig {
                endpoints: vec![cert_files_only(&dir, registry)?],
                skipped: Vec::new(),
            }));
        }
        Err(e) => return Err(e),
    };
    parse(&text, &dir, registry).map(Some)
}

/// containerd's `hostPaths`: `host_port_`, then `host[:port]`, then
/// `_default`; the first that exists.
fn host_dir(config_path: &Path, registry: &str) -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some((host, port)) = registry.rsplit_once(':') {
        if !host.is_empty() {
            candidates.push(config_path.join(format!("{host}_{port}_")));
        }
    }
    candidates.push(config_path.join(registry));
    candidates.push(config_path.join("_default"));
    candidates.into_iter().find(|p| p.is_dir())
}

fn read_bounded(path: &Path) -> Result<String, HostsError> {
    use std::io::Read;
    let io = |source| HostsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(io)?
        .take(MAX_HOSTS_FILE + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(HostsError::Invalid {
            path: path.to_owned(),
            message: format!("larger than {MAX_HOSTS_FILE} bytes"),
        });
    }
    Ok(text)
}

/// A string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The keys of one entry (the top level is the `server` entry).
#[derive(Debug, Default, Deserialize)]
struct EntryToml {
    capabilities: Option<Vec<String>>,
    ca: Option<OneOrMany>,
    client: Option<toml::Value>,
    skip_verify: Option<bool>,
    override_path: Option<bool>,
    // `header` is read by containerd only: lazybd's client sends none.
}

#[derive(Debug, Deserialize)]
struct HostsToml {
    server: Option<String>,
    #[serde(default)]
    host: toml::Table,
    #[serde(flatten)]
    top: EntryToml,
}

fn parse(text: &str, dir: &Path, registry: &str) -> Result<HostsConfig, HostsError> {
    let file = dir.join("hosts.toml");
    let invalid = |message: String| HostsError::Invalid {
        path: file.clone(),
        message,
    };
    let doc: HostsToml = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    // `host` keeps file order (toml's preserve_order): mirrors are asked
    // in the order the operator wrote them.
    for (url, entry) in doc.host {
        let entry: EntryToml = entry
            .try_into()
            .map_err(|e: toml::de::Error| invalid(format!("host {url:?}: {e}")))?;
        match endpoint(&url, entry, dir) {
            Ok(e) => out.push(e),
            Err(reason) => skipped.push(format!("{url}: {reason}")),
        }
    }
    let server = doc.server.unwrap_or_else(|| default_server(registry));
    match endpoint(&server, doc.top, dir) {
        Ok(e) => out.push(e),
        Err(reason) => skipped.push(format!("{server}: {reason}")),
    }
    Ok(HostsConfig {
        endpoints: out,
        skipped,
    })
}

/// Without hosts.toml: the registry itself, with the directory's `*.crt`
/// files as its CAs (Docker's certs.d convention, which containerd reads).
fn cert_files_only(dir: &Path, registry: &str) -> Result<Endpoint, HostsError> {
    let io = |source| HostsError::Io {
        path: dir.to_owned(),
        source,
    };
    let mut ca: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    ca.sort();
    let server = default_server(registry);
    let (plain_http, host) = split_url(&server).expect("the default server is a URL");
    Ok(Endpoint {
        host,
        plain_http,
        capabilities: Capabilities::ALL,
        ca,
        skip_verify: false,
    })
}

/// containerd's default: Docker Hub's real host, else HTTPS to the name.
fn default_server(registry: &str) -> String {
    if registry == "docker.io" {
        "https://registry-1.docker.io".into()
    } else {
        format!("https://{registry}")
    }
}

/// `(plain_http, host[:port])` of `scheme://host[:port][/path]`, and the
/// path; `None` when it is not such a URL.
fn split_url(url: &str) -> Option<(bool, String)> {
    let (plain_http, rest) = if let Some(r) = url.strip_prefix("https://") {
        (false, r)
    } else if let Some(r) = url.strip_prefix("http://") {
        (true, r)
    } else {
        return None;
    };
    let host = rest.split('/').next().unwrap_or_default();
    (!host.is_empty()).then(|| (plain_http, host.to_owned()))
}

/// One entry as an endpoint, or why it cannot be used.
fn endpoint(url: &str, entry: EntryToml, dir: &Path) -> Result<Endpoint, String> {
    let (plain_http, host) =
        split_url(url).ok_or_else(|| "not an http:// or https:// URL".to_owned())?;
    let path = url
        .split_once("://")
        .and_then(|(_, r)| r.split_once('/'))
        .map_or("", |(_, p)| p)
        .trim_end_matches('/');
    if entry.override_path == Some(true) || !(path.is_empty() || path == "v2") {
        return Err("a path other than /v2 (override_path) is not supported".into());
    }
    if entry.client.is_some() {
        return Err("client certificates are not supported".into());
    }
    let capabilities = match entry.capabilities {
        None => Capabilities::ALL,
        Some(caps) => {
            let mut c = Capabilities {
                pull: false,
                resolve: false,
                push: false,
            };
            for cap in caps {
                match cap.as_str() {
                    "pull" => c.pull = true,
                    "resolve" => c.resolve = true,
                    "push" => c.push = true,
                    other => return Err(format!("unknown capability {other:?}")),
                }
            }
            c
        }
    };
    let ca = entry
        .ca
        .map(OneOrMany::into_vec)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let p = PathBuf::from(p);
            if p.is_absolute() {
                p
            } else {
                dir.join(p)
            }
        })
        .collect();
    Ok(Endpoint {
        host,
        plain_http,
        capabilities,
        ca,
        skip_verify: entry.skip_verify.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, host: &str, text: &str) -> PathBuf {
        let d = dir.join(host);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("hosts.toml"), text).unwrap();
        d
    }

    #[test]
    fn mirrors_in_file_order_then_the_server() {
        let tmp = tempfile::tempdir().unwrap();
        let d = write(
            tmp.path(),
            "registry.example_5000_",
            r#"
server = "https://registry.example:5000"
ca = "origin-ca.pem"

[host."http://mirror-b:5000"]
  capabilities = ["pull"]

[host."https://mirror-a:443/v2"]
  capabilities = ["pull", "resolve"]
  ca = ["/etc/a.pem", "b.pem"]
  skip_verify = true
"#,
        );
        let HostsConfig {
            endpoints: eps,
            skipped,
        } = endpoints(tmp.path(), "registry.example:5000")
            .unwrap()
            .unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(
            hosts,
            ["mirror-b:5000", "mirror-a:443", "registry.example:5000"]
        );
        assert!(eps[0].plain_http && !eps[0].capabilities.resolve && eps[0].capabilities.pull);
        assert_eq!(eps[1].ca, [PathBuf::from("/etc/a.pem"), d.join("b.pem")]);
        assert!(eps[1].skip_verify && !eps[1].capabilities.push);
        assert_eq!(eps[2].ca, [d.join("origin-ca.pem")]);
        assert_eq!(eps[2].capabilities, Capabilities::ALL);
    }

    #[test]
    fn directory_lookup_follows_containerd() {
        let tmp = tempfile::tempdir().unwrap();
        assert!(endpoints(tmp.path(), "r.example").unwrap().is_none());
        write(tmp.path(), "_default", "[host.\"http://cache:5000\"]\n");
        let eps = endpoints(tmp.path(), "r.example")
            .unwrap()
            .unwrap()
            .endpoints;
        assert_eq!(eps[0].host, "cache:5000");
        assert_eq!(eps[1].host, "r.example");
        write(
            tmp.path(),
            "r.example:5000",
            "server = \"http://r.example:5000\"\n",
        );
        let eps = endpoints(tmp.path(), "r.example:5000")
            .unwrap()
            .unwrap()
            .endpoints;
        assert_eq!(eps.len(), 1);
        assert!(eps[0].plain_http);
        let eps = endpoints(tmp.path(), "docker.io")
            .unwrap()
            .unwrap()
            .endpoints;
        assert_eq!(eps[1].host, "registry-1.docker.io");
    }

    #[test]
    fn cert_files_without_hosts_toml() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("r.example");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.crt"), "x").unwrap();
        std::fs::write(d.join("client.key"), "x").unwrap();
        let eps = endpoints(tmp.path(), "r.example")
            .unwrap()
            .unwrap()
            .endpoints;
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].ca, [d.join("ca.crt")]);
    }

    #[test]
    fn what_cannot_be_done_is_left_out_with_the_reason() {
        let tmp = tempfile::tempdir().unwrap();
        write(
            tmp.path(),
            "r.example",
            r#"
[host."https://m1/custom/path"]
  override_path = true
[host."https://m2"]
  client = [["/c.pem", "/k.pem"]]
[host."ftp://m3"]
[host."https://m4"]
  capabilities = ["fly"]
[host."https://m5"]
"#,
        );
        let HostsConfig {
            endpoints: eps,
            skipped,
        } = endpoints(tmp.path(), "r.example").unwrap().unwrap();
        let hosts: Vec<&str> = eps.iter().map(|e| e.host.as_str()).collect();
        assert_eq!(hosts, ["m5", "r.example"]);
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(skipped[0].contains("override_path"), "{skipped:?}");
        assert!(skipped[1].contains("client certificates"), "{skipped:?}");
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        write(tmp.path(), "r.example", "server = [\n");
        let e = endpoints(tmp.path(), "r.example").unwrap_err();
        assert!(e.to_string().contains("hosts.toml"), "{e}");
        write(
            tmp.path(),
            "r2.example",
            "[host.\"https://m\"]\nskip_verify = \"yes\"\n",
        );
        assert!(endpoints(tmp.path(), "r2.example").is_err());
        let big = "#".repeat((MAX_HOSTS_FILE + 10) as usize);
        write(tmp.path(), "r3.example", &big);
        assert!(endpoints(tmp.path(), "r3.example")
            .unwrap_err()
            .to_string()
            .contains("larger"));
    }
}
