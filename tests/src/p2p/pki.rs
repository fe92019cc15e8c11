//! The secure setup of a P2P test: one test CA, one certificate for the
//! super node and every node address, and a cluster token; the super
//! node's flags and the nodes' `[p2p]` lines that use them, and registry
//! credentials in a docker config for nodes of a private image.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use super::{Fabric, PROXY_PORT};

pub const TOKEN: &str = "cluster-secret-1";

pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub token: PathBuf,
}

impl Pki {
    /// Writes the CA, a certificate for the hub and every node of `f`, and
    /// the token under `dir`.
    pub fn new(dir: &Path, f: &Fabric) -> Pki {
        let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        // Distinct names: OpenSSL (curl) takes subject == issuer for self-signed.
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "lazybd test CA");
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut names = vec![f.hub_ip()];
        names.extend((0..f.nodes.len()).map(|i| f.node_ip(i)));
        let mut leaf = rcgen::CertificateParams::new(names).unwrap();
        leaf.distinguished_name
            .push(rcgen::DnType::CommonName, "lazybd p2p");
        let cert = leaf.signed_by(&key, &ca).unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let pki = Pki {
            ca: dir.join("ca.pem"),
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            token: dir.join("token"),
        };
        std::fs::write(&pki.ca, ca.pem()).unwrap();
        std::fs::write(&pki.cert, cert.pem()).unwrap();
        std::fs::write(&pki.key, key.serialize_pem()).unwrap();
        std::fs::write(&pki.token, format!("{TOKEN}\n")).unwrap();
        pki
    }

    /// `lazybd-supernode` flags: TLS and the token.
    pub fn supernode_args(&self) -> Vec<OsString> {
        vec![
            "--tls-cert".into(),
            self.cert.clone().into(),
            "--tls-key".into(),
            self.key.clone().into(),
            "--tls-ca".into(),
            self.ca.clone().into(),
            "--cluster-token-file".into(),
            self.token.clone().into(),
        ]
    }

    /// The `[p2p]` lines of a node: the token and the `[p2p.tls]` table.
    pub fn node_toml(&self) -> String {
        format!(
            "cluster_token_file = \"{}\"\n[p2p.tls]\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\n",
            self.token.display(),
            self.cert.display(),
            self.key.display(),
            self.ca.display()
        )
    }

    /// `curl` arguments trusting the test CA, with the token if `token`.
    pub fn curl_args(&self, token: bool) -> Vec<String> {
        let mut a = vec!["--cacert".to_owned(), self.ca.display().to_string()];
        if token {
            a.extend(["-H".to_owned(), format!("X-Lazybd-Token: {TOKEN}")]);
        }
        a
    }
}

/// A docker config with `user:password` for the registry as the nodes name
/// it (the hub's proxy), at `path`.
pub fn docker_config(path: &Path, f: &Fabric, user: &str, password: &str) -> PathBuf {
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    std::fs::write(
        path,
        format!(
            r#"{{"auths":{{"{}:{PROXY_PORT}":{{"auth":"{auth}"}}}}}}"#,
            f.hub_ip()
        ),
    )
    .unwrap();
    path.to_owned()
}
