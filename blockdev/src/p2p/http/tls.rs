//! TLS for the P2P servers and clients: one cluster CA, no system roots.

use std::path::Path;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::p2p::config::TlsConfig;
use crate::p2p::P2pError;

pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, P2pError> {
    let certs: Result<Vec<_>, _> = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_err(path, e))?
        .collect();
    let certs = certs.map_err(|e| tls_err(path, e))?;
    if certs.is_empty() {
        return Err(tls_err(path, "no certificates in the file"));
    }
    Ok(certs)
}

pub fn tls_err(path: &Path, e: impl std::fmt::Display) -> P2pError {
    P2pError::Tls(format!("{}: {e}", path.display()))
}

pub fn server_tls(cfg: &TlsConfig) -> Result<TlsAcceptor, P2pError> {
    crate::registry::install_crypto_provider();
    let certs = load_certs(&cfg.cert)?;
    let key = PrivateKeyDer::from_pem_file(&cfg.key).map_err(|e| tls_err(&cfg.key, e))?;
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_err(&cfg.cert, e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client configuration trusting only the cluster CA in `ca`.
pub fn client_tls(ca: &Path) -> Result<rustls::ClientConfig, P2pError> {
    crate::registry::install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    for cert in load_certs(ca)? {
        roots.add(cert).map_err(|e| tls_err(ca, e))?;
    }
    Ok(rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth())
}
