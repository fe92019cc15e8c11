//! Registry credentials from the docker config file, the file `docker login`,
//! `skopeo login --authfile` and `crane auth login` write; its `auths`,
//! `credHelpers` and `credsStore` entries are read by `docker_credential`.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use docker_credential::{CredentialRetrievalError, DockerCredential};
use oci_client::secrets::RegistryAuth;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CredentialsError {
    #[error("reading docker config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credentials for {registry} in {path}: {message}")]
    Lookup {
        registry: String,
        path: PathBuf,
        message: String,
    },
}

/// The credentials for `registry` (`host[:port]`), anonymous if there are none.
///
/// `config`: an explicit docker config file (it must exist); `None` looks at
/// `$DOCKER_CONFIG/config.json`, then `~/.docker/config.json`, and treats a
/// missing file as "no credentials".
pub fn credentials_for(
    registry: &str,
    config: Option<&Path>,
) -> Result<RegistryAuth, CredentialsError> {
    let path = match config {
        Some(p) => p.to_owned(),
        None => match default_config_path() {
            Some(p) if p.is_file() => p,
            _ => return Ok(RegistryAuth::Anonymous),
        },
    };
    let file = File::open(&path).map_err(|source| CredentialsError::Read {
        path: path.clone(),
        source,
    })?;
    let server = config_key(registry);
    match docker_credential::get_credential_from_reader(BufReader::new(file), &server) {
        Ok(DockerCredential::UsernamePassword(user, password)) => {
            Ok(RegistryAuth::Basic(user, password))
        }
        // An identity token is an OAuth2 refresh token; registries that issue
        // them also accept it as the password of the `<token>` user in the
        // token request, which is the basic-auth flow the client runs.
        Ok(DockerCredential::IdentityToken(token)) => {
            Ok(RegistryAuth::Basic("<token>".into(), token))
        }
        Err(CredentialRetrievalError::NoCredentialConfigured) => Ok(RegistryAuth::Anonymous),
        Err(e) => Err(CredentialsError::Lookup {
            registry: registry.to_owned(),
            path,
            message: e.to_string(),
        }),
    }
}

fn default_config_path() -> Option<PathBuf> {
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")))?;
    Some(dir.join("config.json"))
}

/// Docker keeps Docker Hub's credentials under its legacy index URL.
fn config_key(registry: &str) -> String {
    match registry {
        "docker.io" | "index.docker.io" | "registry-1.docker.io" => {
            "https://index.docker.io/v1/".into()
        }
        other => other.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), json).unwrap();
        f
    }

    #[test]
    fn basic_auth_from_auths() {
        // "user:pa:ss" base64: passwords may contain colons.
        let f = config(r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYTpzcw=="}}}"#);
        match credentials_for("127.0.0.1:5000", Some(f.path())).unwrap() {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("user", "pa:ss")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn other_registries_are_anonymous() {
        let f = config(r#"{"auths":{"127.0.0.1:5000":{"auth":"dXNlcjpwYXNz"}}}"#);
        assert!(matches!(
            credentials_for("127.0.0.1:5001", Some(f.path())).unwrap(),
            RegistryAuth::Anonymous
        ));
    }

    #[test]
    fn broken_configs_are_errors() {
        let f = config(r#"{"auths":{"r":{"auth":"not base64!"}}}"#);
        assert!(matches!(
            credentials_for("r", Some(f.path())),
            Err(CredentialsError::Lookup { .. })
        ));
        assert!(matches!(
            credentials_for("r", Some(Path::new("/nonexistent/config.json"))),
            Err(CredentialsError::Read { .. })
        ));
    }
}
