//! Which credentials a repository's layers are fetched with.
//!
//! Three kinds, by how much they are trusted:
//! - **committed**: brought by a PullImage that succeeded (containerd
//!   fetched the image with them), kept on disk ([`super::file`]) so that
//!   layers attached with them still read after a restart;
//! - **verified**: credentials the registry accepted for a Prepare in this
//!   run (in memory);
//! - **pending**: those of PullImage calls still running. Their Prepares
//!   need them before the pull can succeed, so they are tried, but only
//!   after the others, and they are never kept unless the pull succeeds.
//!
//! So a pull with wrong credentials, running or failed, never replaces
//! working ones: the last *successful* pull wins, not the last caller.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use k8s_cri::v1::AuthConfig;
use lazybd_blockdev::registry::RegistryAuth;
use tracing::{error, info, warn};

use super::file::{KeyFile, Stored, StoredCreds};

/// Repositories with credentials kept; over it the oldest commit goes.
const MAX_REPOSITORIES: usize = 4096;
/// PullImage calls of one repository whose credentials are tried at once;
/// more push out the oldest.
const MAX_PENDING_PER_REPOSITORY: usize = 8;

#[derive(Clone, PartialEq, Eq)]
struct Creds {
    username: String,
    password: String,
}

impl Creds {
    fn auth(&self) -> RegistryAuth {
        RegistryAuth::Basic(self.username.clone(), self.password.clone())
    }
}

#[derive(Default)]
struct State {
    committed: HashMap<String, (Creds, u64)>,
    verified: HashMap<String, Creds>,
    /// (pull id, credentials), oldest first.
    pending: HashMap<String, Vec<(u64, Creds)>>,
    next_id: u64,
    next_stamp: u64,
}

/// Credentials per repository (`host/path`, normalized as containerd does).
#[derive(Default)]
pub struct Keychain {
    state: Mutex<State>,
    /// `None`: in memory only (unit tests).
    file: Option<KeyFile>,
}

impl std::fmt::Debug for Keychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state();
        f.debug_struct("Keychain")
            .field("committed", &s.committed.len())
            .field("pending", &s.pending.len())
            .finish()
    }
}

impl Keychain {
    /// The keychain kept in directory `dir`, with what it already holds.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let (file, stored) = KeyFile::open(dir)?;
        let mut state = State::default();
        for (repo, c) in stored.repositories {
            state.next_stamp = state.next_stamp.max(c.stamp + 1);
            let creds = Creds {
                username: c.username,
                password: c.password,
            };
            state.committed.insert(repo, (creds, c.stamp));
        }
        if !state.committed.is_empty() {
            info!(
                "cri keychain: credentials of {} repositories from {}",
                state.committed.len(),
                dir.display()
            );
        }
        Ok(Keychain {
            state: Mutex::new(state),
            file: Some(file),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The credentials to fetch `image_ref`'s layers with: those the
    /// registry accepted in this run, else those of its last successful pull.
    pub fn get(&self, image_ref: &str) -> Option<RegistryAuth> {
        let repo = repository(image_ref)?;
        let s = self.state();
        s.verified
            .get(&repo)
            .or_else(|| s.committed.get(&repo).map(|(c, _)| c))
            .map(Creds::auth)
    }

    /// Every credential worth trying for `image_ref`, best first: accepted
    /// in this run, last successful pull, then running pulls (newest first).
    pub fn candidates(&self, image_ref: &str) -> Vec<RegistryAuth> {
        let Some(repo) = repository(image_ref) else {
            return Vec::new();
        };
        let s = self.state();
        let mut out: Vec<&Creds> = Vec::new();
        let pending = s.pending.get(&repo).into_iter().flatten().rev();
        for c in s
            .verified
            .get(&repo)
            .into_iter()
            .chain(s.committed.get(&repo).map(|(c, _)| c))
            .chain(pending.map(|(_, c)| c))
        {
            if !out.contains(&c) {
                out.push(c);
            }
        }
        out.into_iter().map(Creds::auth).collect()
    }

    /// The registry accepted `auth` for `image_ref`'s repository.
    pub fn worked(&self, image_ref: &str, auth: &RegistryAuth) {
        let (Some(repo), RegistryAuth::Basic(username, password)) = (repository(image_ref), auth)
        else {
            return;
        };
        let mut s = self.state();
        if s.verified.len() >= MAX_REPOSITORIES && !s.verified.contains_key(&repo) {
            s.verified.clear();
        }
        s.verified.insert(
            repo,
            Creds {
                username: username.clone(),
                password: password.clone(),
            },
        );
    }

    /// A PullImage of `image_ref` with `auth` starts: its credentials are
    /// tried for its Prepares until the returned guard is dropped, and kept
    /// if [`PendingPull::succeeded`] is called.
    pub fn begin_pull(self: &Arc<Self>, image_ref: &str, auth: &AuthConfig) -> Option<PendingPull> {
        let Some(repo) = repository(image_ref) else {
            warn!("cri keychain: cannot parse image reference {image_ref:?}; its credentials are not kept");
            return None;
        };
        let creds = if !auth.username.is_empty() {
            Creds {
                username: auth.username.clone(),
                password: auth.password.clone(),
            }
        } else if !auth.identity_token.is_empty() {
            // As for a docker config's identity token (see
            // lazybd_blockdev::registry::credentials_for).
            Creds {
                username: "<token>".to_owned(),
                password: auth.identity_token.clone(),
            }
        } else {
            // `auth` (base64) and `registry_token` are not used by kubelet's
            // pull secrets, which it splits into username and password.
            warn!("cri keychain: pull of {image_ref} has credentials without a username or identity token; not kept");
            return None;
        };
        let mut s = self.state();
        let id = s.next_id;
        s.next_id += 1;
        let list = s.pending.entry(repo.clone()).or_default();
        if list.len() >= MAX_PENDING_PER_REPOSITORY {
            list.remove(0);
        }
        list.push((id, creds.clone()));
        Some(PendingPull {
            keychain: self.clone(),
            image_ref: image_ref.to_owned(),
            repo,
            id,
            creds,
        })
    }

    fn commit(&self, image_ref: &str, repo: &str, creds: &Creds) {
        let mut s = self.state();
        if s.committed.get(repo).is_some_and(|(c, _)| c == creds) {
            return info!("cri keychain: credentials for {image_ref} kept (unchanged)");
        }
        if s.committed.len() >= MAX_REPOSITORIES && !s.committed.contains_key(repo) {
            let oldest = s
                .committed
                .iter()
                .min_by_key(|(_, (_, stamp))| *stamp)
                .map(|(r, _)| r.clone());
            if let Some(oldest) = oldest {
                s.committed.remove(&oldest);
            }
        }
        let stamp = s.next_stamp;
        s.next_stamp += 1;
        s.committed.insert(repo.to_owned(), (creds.clone(), stamp));
        // Written under the lock, so the file follows the commit order.
        if let Some(file) = &self.file {
            let stored = Stored {
                version: 1,
                repositories: s
                    .committed
                    .iter()
                    .map(|(r, (c, stamp))| {
                        let c = StoredCreds {
                            username: c.username.clone(),
                            password: c.password.clone(),
                            stamp: *stamp,
                        };
                        (r.clone(), c)
                    })
                    .collect(),
            };
            if let Err(e) = file.save(&stored) {
                return error!(
                    "cri keychain: credentials for {image_ref} kept in memory only: {e}"
                );
            }
        }
        info!("cri keychain: credentials for {image_ref} kept (the pull succeeded)");
    }
}

/// The credentials of one running PullImage; dropped: no longer tried.
pub struct PendingPull {
    keychain: Arc<Keychain>,
    image_ref: String,
    repo: String,
    id: u64,
    creds: Creds,
}

impl PendingPull {
    /// containerd pulled the image with these credentials: keep them.
    pub fn succeeded(self) {
        self.keychain
            .commit(&self.image_ref, &self.repo, &self.creds);
    }
}

impl Drop for PendingPull {
    fn drop(&mut self) {
        let mut s = self.keychain.state();
        if let Some(list) = s.pending.get_mut(&self.repo) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                s.pending.remove(&self.repo);
            }
        }
    }
}

/// `host/path` of an image reference, with docker.io's defaults applied as
/// containerd normalizes names (`busybox` -> `docker.io/library/busybox`),
/// tag and digest dropped.
pub fn repository(image_ref: &str) -> Option<String> {
    let name = image_ref.split('@').next()?;
    let name = match name.rsplit_once(':') {
        Some((n, tag)) if !tag.contains('/') => n,
        _ => name,
    };
    if name.is_empty() {
        return None;
    }
    let (first, rest) = match name.split_once('/') {
        Some((f, r)) if f.contains('.') || f.contains(':') || f == "localhost" => (f, r.to_owned()),
        _ => ("docker.io", name.to_owned()),
    };
    let first = if first == "index.docker.io" {
        "docker.io"
    } else {
        first
    };
    let rest = if first == "docker.io" && !rest.contains('/') {
        format!("library/{rest}")
    } else {
        rest
    };
    Some(format!("{first}/{rest}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn auth(user: &str, password: &str) -> AuthConfig {
        AuthConfig {
            username: user.into(),
            password: password.into(),
            ..Default::default()
        }
    }

    fn basic(user: &str, password: &str) -> RegistryAuth {
        RegistryAuth::Basic(user.into(), password.into())
    }

    #[test]
    fn repositories_are_normalized_like_containerd() {
        for (r, want) in [
            ("busybox", "docker.io/library/busybox"),
            ("busybox:1.36", "docker.io/library/busybox"),
            (
                "docker.io/library/busybox:latest",
                "docker.io/library/busybox",
            ),
            ("me/app@sha256:abcd", "docker.io/me/app"),
            ("127.0.0.1:5000/rich:lazy", "127.0.0.1:5000/rich"),
            ("127.0.0.1:5000/a/b", "127.0.0.1:5000/a/b"),
            ("localhost/x:1", "localhost/x"),
            (
                "reg.example.com/team/app:v1@sha256:ab",
                "reg.example.com/team/app",
            ),
        ] {
            assert_eq!(repository(r).as_deref(), Some(want), "{r}");
        }
        assert_eq!(repository(""), None);
    }

    #[test]
    fn credentials_are_kept_per_repository_once_the_pull_succeeds() {
        let k = Arc::new(Keychain::default());
        let pull = k
            .begin_pull("127.0.0.1:5000/rich:lazy", &auth("u", "p"))
            .unwrap();
        // Tried for the pull's own Prepares, not yet kept.
        assert_eq!(k.candidates("127.0.0.1:5000/rich:x"), [basic("u", "p")]);
        assert!(k.get("127.0.0.1:5000/rich:other").is_none());
        pull.succeeded();
        assert_eq!(k.get("127.0.0.1:5000/rich:other"), Some(basic("u", "p")));
        assert!(k.get("127.0.0.1:5000/poor:lazy").is_none());
        assert!(k.begin_pull("x:1", &AuthConfig::default()).is_none());
    }

    #[test]
    fn a_failed_pull_never_replaces_working_credentials() {
        let k = Arc::new(Keychain::default());
        k.begin_pull("r.io/app:1", &auth("u", "good"))
            .unwrap()
            .succeeded();
        let wrong = k.begin_pull("r.io/app:1", &auth("u", "wrong")).unwrap();
        // While it runs: the working ones first.
        assert_eq!(
            k.candidates("r.io/app:1"),
            [basic("u", "good"), basic("u", "wrong")]
        );
        assert_eq!(k.get("r.io/app"), Some(basic("u", "good")));
        drop(wrong);
        assert_eq!(k.candidates("r.io/app:1"), [basic("u", "good")]);
        assert_eq!(k.get("r.io/app"), Some(basic("u", "good")));
        // Rotated credentials: a later successful pull replaces them.
        k.begin_pull("r.io/app:2", &auth("u", "new"))
            .unwrap()
            .succeeded();
        assert_eq!(k.get("r.io/app"), Some(basic("u", "new")));
    }

    #[test]
    fn accepted_credentials_go_first() {
        let k = Arc::new(Keychain::default());
        let _a = k.begin_pull("r.io/app:1", &auth("a", "1")).unwrap();
        let _b = k.begin_pull("r.io/app:1", &auth("b", "2")).unwrap();
        assert_eq!(k.candidates("r.io/app"), [basic("b", "2"), basic("a", "1")]);
        k.worked("r.io/app", &basic("a", "1"));
        assert_eq!(k.get("r.io/app"), Some(basic("a", "1")));
        assert_eq!(k.candidates("r.io/app"), [basic("a", "1"), basic("b", "2")]);
    }

    #[test]
    fn committed_credentials_survive_a_restart_in_a_root_only_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cri-keychain");
        let k = Arc::new(Keychain::open(&dir).unwrap());
        k.begin_pull("r.io/app:1", &auth("u", "p"))
            .unwrap()
            .succeeded();
        drop(k.begin_pull("r.io/app:1", &auth("u", "wrong")));
        let path = k.file.as_ref().unwrap().path();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains("wrong"), "{text}");
        let again = Keychain::open(&dir).unwrap();
        assert_eq!(again.get("r.io/app:2"), Some(basic("u", "p")));
        // A file others could read (or write) is not trusted.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(Keychain::open(&dir).unwrap().get("r.io/app"), None);
        // A directory others could enter is closed again.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        Keychain::open(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
    }

    #[test]
    fn a_full_keychain_drops_the_oldest_commit() {
        let k = Arc::new(Keychain::default());
        for i in 0..=MAX_REPOSITORIES {
            k.begin_pull(&format!("r.io/app{i}"), &auth("u", "p"))
                .unwrap()
                .succeeded();
        }
        assert!(k.get("r.io/app0").is_none());
        assert!(k.get("r.io/app1").is_some());
        assert!(k.get(&format!("r.io/app{MAX_REPOSITORIES}")).is_some());
    }
}
