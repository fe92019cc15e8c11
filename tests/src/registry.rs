//! A private Debian `docker-registry` (distribution 2.8) on 127.0.0.1, with
//! its own storage dir and port, optionally behind htpasswd basic auth or
//! bearer tokens from a [`TokenServer`];
//! stopped and removed on drop.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::daemon::Daemon;
use crate::token_auth::{TokenServer, ISSUER, SERVICE};

/// How clients must authenticate.
enum Auth {
    Anonymous,
    Htpasswd {
        user: String,
        password: String,
    },
    Token {
        user: String,
        password: String,
        server: TokenServer,
    },
}

pub struct Registry {
    daemon: Option<Daemon>,
    dir: tempfile::TempDir,
    port: u16,
    auth: Auth,
    /// What else the registry is: a pull-through cache, a TLS server.
    role: Role,
}

enum Role {
    Plain,
    /// A pull-through cache (`proxy.remoteurl`) of the registry at this URL.
    MirrorOf(String),
    /// HTTPS with a certificate for 127.0.0.1 signed by a private CA, whose
    /// certificate is the PEM file at `ca`.
    Tls {
        ca: PathBuf,
    },
}

impl Registry {
    /// An anonymous registry.
    pub fn start() -> Registry {
        Self::launch(tempdir(), Auth::Anonymous)
    }

    /// A registry that wants basic auth as `user`/`password`.
    pub fn start_with_htpasswd(user: &str, password: &str) -> Registry {
        let (user, password) = (user.to_owned(), password.to_owned());
        Self::launch(tempdir(), Auth::Htpasswd { user, password })
    }

    /// A registry that wants bearer tokens from a [`TokenServer`], which
    /// hands them out for basic auth as `user`/`password`.
    pub fn start_with_token_auth(user: &str, password: &str) -> Registry {
        let dir = tempdir();
        let server = TokenServer::start(&dir.path().join("token.pem"), user, password);
        let (user, password) = (user.to_owned(), password.to_owned());
        Self::launch(
            dir,
            Auth::Token {
                user,
                password,
                server,
            },
        )
    }

    /// A pull-through cache of `origin` (docker-registry's proxy mode), as
    /// a registry mirror is run.
    pub fn start_mirror_of(origin: &Registry) -> Registry {
        let mut reg = Self::new(tempdir(), Auth::Anonymous);
        reg.role = Role::MirrorOf(format!("http://{}", origin.host()));
        reg.spawn();
        reg
    }

    /// An HTTPS registry whose certificate a private CA signed; the CA's
    /// PEM file is [`ca`](Self::ca).
    pub fn start_tls() -> Registry {
        let dir = tempdir();
        let ca = write_tls_files(dir.path());
        let mut reg = Self::new(dir, Auth::Anonymous);
        reg.role = Role::Tls { ca };
        reg.spawn();
        reg
    }

    /// The private CA of a [`start_tls`](Self::start_tls) registry.
    pub fn ca(&self) -> Option<&Path> {
        match &self.role {
            Role::Tls { ca } => Some(ca),
            _ => None,
        }
    }

    /// Blob GETs the registry answered so far (its access log): what it
    /// sent, e.g. to a mirror.
    pub fn blob_gets(&self) -> usize {
        std::fs::read_to_string(self.dir.path().join("registry.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"GET /v2/") && l.contains("/blobs/sha256:"))
            .count()
    }

    fn new(dir: tempfile::TempDir, auth: Auth) -> Registry {
        Registry {
            daemon: None,
            dir,
            port: 0,
            auth,
            role: Role::Plain,
        }
    }

    fn launch(dir: tempfile::TempDir, auth: Auth) -> Registry {
        let mut reg = Self::new(dir, auth);
        reg.spawn();
        reg
    }

    fn spawn(&mut self) {
        self.port = crate::free_port();
        let auth = match &self.auth {
            Auth::Anonymous => String::new(),
            Auth::Htpasswd { user, password } => {
                let hash = bcrypt::hash(password, 4).unwrap();
                let file = self.dir.path().join("htpasswd");
                std::fs::write(&file, format!("{user}:{hash}\n")).unwrap();
                format!(
                    "auth:\n  htpasswd:\n    realm: lazybd-test\n    path: {}\n",
                    file.display()
                )
            }
            Auth::Token { server, .. } => format!(
                "auth:\n  token:\n    realm: {}\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
                server.realm(),
                self.dir.path().join("token.pem").display()
            ),
        };
        let role = match &self.role {
            Role::Plain => String::new(),
            Role::MirrorOf(url) => format!("proxy:\n  remoteurl: {url}\n"),
            Role::Tls { .. } => format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                self.dir.path().join("cert.pem").display(),
                self.dir.path().join("key.pem").display()
            ),
        };
        let (http_extra, top_extra) = match self.role {
            Role::Tls { .. } => (role, String::new()),
            _ => (String::new(), role),
        };
        let config = self.dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: false\n\
                 storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                 http:\n  addr: 127.0.0.1:{}\n{http_extra}{auth}{top_extra}",
                self.storage().display(),
                self.port
            ),
        )
        .unwrap();
        let mut cmd = Command::new("docker-registry");
        cmd.arg("serve").arg(&config);
        let log = self.dir.path().join("registry.log");
        let mut daemon = Daemon::spawn("docker-registry", cmd, &log);
        let port = self.port;
        daemon.wait_ready(
            Duration::from_secs(20),
            &format!("listener on port {port}"),
            || TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        self.daemon = Some(daemon);
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/repo_and_tag`.
    pub fn reference(&self, repo_and_tag: &str) -> String {
        format!("{}/{repo_and_tag}", self.host())
    }

    pub fn storage(&self) -> PathBuf {
        self.dir.path().join("storage")
    }

    /// Where the registry keeps blob `digest` on disk (filesystem driver
    /// layout), so tests can corrupt it behind the registry's back.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.storage()
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// The bytes of blob `digest` as the registry stores them.
    pub fn read_blob(&self, digest: &str) -> Vec<u8> {
        std::fs::read(self.blob_file(digest))
            .unwrap_or_else(|e| panic!("blob {digest} in {}: {e}", self.host()))
    }

    /// Stores `data` as blob `digest` of repository `repo` straight into the
    /// registry's storage, as a malicious or compromised registry serves it
    /// (the registry refuses an upload whose bytes do not hash to its
    /// digest; from the storage it serves whatever is there).
    pub fn plant_blob(&self, repo: &str, digest: &str, data: &[u8]) {
        let file = self.blob_file(digest);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, data).unwrap();
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        let link = self
            .storage()
            .join("docker/registry/v2/repositories")
            .join(repo)
            .join("_layers/sha256")
            .join(hex);
        std::fs::create_dir_all(&link).unwrap();
        std::fs::write(link.join("link"), digest).unwrap();
    }

    /// PUTs `manifest` (an OCI image manifest) as `repo:tag`; the registry
    /// checks that the blobs it names are in `repo`. Returns its digest.
    pub fn put_manifest(&self, repo: &str, tag: &str, manifest: &[u8]) -> String {
        // The registry parses the body as the Content-Type says: an index
        // names its own media type.
        let media_type = serde_json::from_slice::<serde_json::Value>(manifest)
            .ok()
            .and_then(|v| v["mediaType"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "application/vnd.oci.image.manifest.v1+json".to_owned());
        let (status, body) = crate::http::request(
            None,
            "PUT",
            &self.host(),
            &format!("/v2/{repo}/manifests/{tag}"),
            &[("Content-Type", &media_type)],
            manifest,
        );
        assert_eq!(
            status,
            201,
            "PUT {repo}:{tag}: {}",
            String::from_utf8_lossy(&body)
        );
        lazybd_blockdev::oci::digest_of(manifest)
    }

    fn credentials(&self) -> Option<(&str, &str)> {
        match &self.auth {
            Auth::Anonymous => None,
            Auth::Htpasswd { user, password } | Auth::Token { user, password, .. } => {
                Some((user, password))
            }
        }
    }

    /// Tokens the token server handed out with some access (0 without one).
    pub fn tokens_granted(&self) -> u64 {
        match &self.auth {
            Auth::Token { server, .. } => server.granted.load(Ordering::Relaxed),
            _ => 0,
        }
    }

    /// A docker config file with this registry's credentials.
    pub fn docker_config(&self) -> PathBuf {
        let (user, password) = self.credentials().expect("registry has auth");
        let auth = base64_encode(format!("{user}:{password}").as_bytes());
        let path = self.dir.path().join("docker-config.json");
        std::fs::write(
            &path,
            format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, self.host()),
        )
        .unwrap();
        path
    }

    /// Copies `oci:LAYOUT:TAG` to `REPO:TAG` here with skopeo, independent
    /// of lazybd's own registry client.
    pub fn push_layout(&self, layout: &Path, tag: &str, repo_and_tag: &str) {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--quiet", "--dest-tls-verify=false"]);
        if let Some((user, password)) = self.credentials() {
            cmd.arg(format!("--dest-creds={user}:{password}"));
        }
        let out = cmd
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}", self.reference(repo_and_tag)))
            .output()
            .expect("run skopeo");
        assert!(
            out.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Freezes the registry (SIGSTOP) until the guard drops (SIGCONT):
    /// requests to it are accepted by the kernel and never answered, so a
    /// client's fetches stay in flight as long as the test wants.
    pub fn freeze(&self) -> Frozen {
        let pid = self
            .daemon
            .as_ref()
            .and_then(Daemon::pid)
            .expect("a running registry");
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
        Frozen(pid)
    }

    /// Kills the registry (the storage stays): it is "down", at once.
    pub fn stop(&mut self) {
        if let Some(mut daemon) = self.daemon.take() {
            daemon.kill();
        }
    }
}

/// A private CA and a certificate for 127.0.0.1 it signed, under `dir`
/// (`ca.pem`, `cert.pem`, `key.pem`); returns the CA's path.
fn write_tls_files(dir: &Path) -> PathBuf {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "lazybd test registry CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, "lazybd test registry");
    let cert = leaf.signed_by(&key, &ca).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    dir.join("ca.pem")
}

/// A [`Registry::freeze`]; thawed on drop.
pub struct Frozen(nix::unistd::Pid);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("lazybd-registry-")
        .tempdir()
        .unwrap()
}

fn base64_encode(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(data)
}
