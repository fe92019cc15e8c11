//! TLS for registry clients: the system's CA roots, read once per process
//! and only when a registry is first spoken to over TLS.
//!
//! reqwest's own rustls setup (`rustls-platform-verifier`) reads every root
//! each time a client is built: the bundle file and then each of the ~150
//! files of `/etc/ssl/certs`, before the first request. On a node with cold
//! page caches that took 15-30 ms of every `lazybd pull` (which talks plain
//! HTTP to a local registry as often as not) and of each image's first
//! Prepare in the snapshotter, which builds a client per image. Here the
//! verifier is built on the first certificate it checks, from roots shared
//! by the whole process; reqwest gets the finished `rustls::ClientConfig`.

use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::RegistryError;

/// The TLS setup of a registry client: the system's roots plus `extra`
/// (PEM), or no verification at all with `skip_verify`.
pub fn client_config(
    extra: &[Vec<u8>],
    skip_verify: bool,
) -> Result<rustls::ClientConfig, RegistryError> {
    super::install_crypto_provider();
    let provider = CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()));
    let mut extra_roots = Vec::new();
    for pem in extra {
        for cert in CertificateDer::pem_slice_iter(pem) {
            extra_roots.push(cert.map_err(|e| bad_config(format!("a CA certificate: {e}")))?);
        }
    }
    let verifier = Arc::new(LazyRoots {
        extra: extra_roots,
        skip_verify,
        provider: provider.clone(),
        verifier: OnceLock::new(),
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad_config(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    // reqwest is built without HTTP/2.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

fn bad_config(message: String) -> RegistryError {
    RegistryError::Permanent {
        what: "setting up TLS".into(),
        message,
    }
}

/// The system's roots, read on first use.
fn system_roots() -> &'static [CertificateDer<'static>] {
    static ROOTS: OnceLock<Vec<CertificateDer<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            tracing::warn!("reading the system's CA certificates: {e}");
        }
        found.certs
    })
}

/// WebPKI verification against the system's roots and the extra ones,
/// built on the first certificate to check; with `skip_verify`, any
/// certificate is accepted (the handshake's signatures are still checked,
/// so the session is with the certificate's key).
#[derive(Debug)]
struct LazyRoots {
    extra: Vec<CertificateDer<'static>>,
    skip_verify: bool,
    provider: Arc<CryptoProvider>,
    verifier: OnceLock<Result<Arc<WebPkiServerVerifier>, rustls::Error>>,
}

impl LazyRoots {
    fn verifier(&self) -> Result<&Arc<WebPkiServerVerifier>, rustls::Error> {
        self.verifier
            .get_or_init(|| {
                let mut roots = RootCertStore::empty();
                for cert in &self.extra {
                    roots.add(cert.clone())?;
                }
                // Unparsable system roots are skipped, as the platform verifier does.
                roots.add_parsable_certificates(system_roots().iter().cloned());
                if roots.is_empty() {
                    return Err(rustls::Error::General(
                        "no CA certificates in the system's store, none configured".into(),
                    ));
                }
                WebPkiServerVerifier::builder_with_provider(roots.into(), self.provider.clone())
                    .build()
                    .map_err(|e| rustls::Error::General(e.to_string()))
            })
            .as_ref()
            .map_err(Clone::clone)
    }
}

impl ServerCertVerifier for LazyRoots {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.skip_verify {
            return Ok(ServerCertVerified::assertion());
        }
        self.verifier()?.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_roots_are_parsed_when_the_client_is_built() {
        let config = client_config(&[], false).unwrap();
        assert_eq!(config.alpn_protocols, [b"http/1.1".to_vec()]);
        let e = client_config(
            &[b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".to_vec()],
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("CA certificate"), "{e}");
    }
}
