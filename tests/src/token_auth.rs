//! A token server for docker-registry's `auth: token` mode, so the bearer
//! flow is tested against the real registry: the registry answers 401 with
//! `WWW-Authenticate: Bearer realm=...`, the client asks this server for a
//! token (with basic credentials), and the registry checks the token's
//! signature against the certificate written here.
//!
//! The JWT is assembled by hand (header.claims.signature, ES256): ten lines
//! that need no JWT crate and show exactly what the registry checks.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;

use crate::serve::{ServerThread, POLL};

pub const SERVICE: &str = "lazybd-test-registry";
pub const ISSUER: &str = "lazybd-test-issuer";

pub struct TokenServer {
    _thread: ServerThread,
    port: u16,
    /// Tokens handed out with some access granted.
    pub granted: Arc<AtomicU64>,
}

impl TokenServer {
    /// Starts the server; writes the signing certificate to `cert_pem` for
    /// the registry's `rootcertbundle`. Only `user`/`password` get access.
    pub fn start(cert_pem: &Path, user: &str, password: &str) -> TokenServer {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["lazybd-token".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(cert_pem, cert.pem()).unwrap();
        let signer = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &SystemRandom::new(),
        )
        .unwrap();
        let x5c = STANDARD.encode(cert.der());
        let expected = format!("Basic {}", STANDARD.encode(format!("{user}:{password}")));

        let server = tiny_http::Server::http("127.0.0.1:0").unwrap();
        let port = server.server_addr().to_ip().unwrap().port();
        let granted = Arc::new(AtomicU64::new(0));
        let counter = granted.clone();
        let thread = ServerThread::spawn(move |stop| {
            while !stop.load(Ordering::SeqCst) {
                let Ok(Some(request)) = server.recv_timeout(POLL) else {
                    continue;
                };
                let authorized = request
                    .headers()
                    .iter()
                    .any(|h| h.field.equiv("Authorization") && h.value.as_str() == expected);
                if !authorized {
                    let _ = request.respond(
                        tiny_http::Response::from_string("bad credentials").with_status_code(401),
                    );
                    continue;
                }
                let access = requested_access(request.url());
                if !access.is_empty() {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                let token = sign_jwt(&signer, &x5c, access);
                let body = json!({"token": token, "expires_in": 300}).to_string();
                let _ = request.respond(tiny_http::Response::from_string(body));
            }
        });
        TokenServer {
            _thread: thread,
            port,
            granted,
        }
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }
}

/// `scope=repository:NAME:pull,push` query parameters -> the JWT `access`
/// claim, granting everything asked for (credentials were checked).
fn requested_access(url: &str) -> Vec<serde_json::Value> {
    let query = url.split_once('?').map(|(_, q)| q).unwrap_or("");
    form_urlencoded::parse(query.as_bytes())
        .filter(|(k, _)| k == "scope")
        .filter_map(|(_, scope)| {
            let mut parts = scope.splitn(3, ':');
            let (kind, name, actions) = (parts.next()?, parts.next()?, parts.next()?);
            Some(json!({
                "type": kind,
                "name": name,
                "actions": actions.split(',').collect::<Vec<_>>(),
            }))
        })
        .collect()
}

fn sign_jwt(signer: &EcdsaKeyPair, x5c: &str, access: Vec<serde_json::Value>) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = json!({"typ": "JWT", "alg": "ES256", "x5c": [x5c]});
    let claims = json!({
        "iss": ISSUER,
        "sub": "lazybd-test-user",
        "aud": SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now,
        "jti": format!("lazybd-{now}-{}", access.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = signer
        .sign(&SystemRandom::new(), signing_input.as_bytes())
        .unwrap();
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
}
