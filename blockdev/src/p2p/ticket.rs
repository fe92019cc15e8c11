//! Tickets: what a peer asks before it serves a chunk. The super node signs
//! one (Ed25519) for a caller after the registry has accepted the caller's
//! credentials for the blob, binding it to the blob (digest and anchor), to
//! the caller's address as the super node saw it on the TCP connection, and
//! to an expiry. A peer checks the signature with the super node's public
//! keys, the blob it is asked for, and that the request comes from the
//! ticket's address; nodes hold no private key, so they cannot make one.
//!
//! Wire form: `hex(claims JSON) "." hex(signature)`, the signature over a
//! domain prefix and the claims' bytes exactly as sent (nothing is
//! re-encoded before checking).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::rand::SystemRandom;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{PrivatePkcs8KeyDer, SubjectPublicKeyInfoDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use thiserror::Error;

use super::P2pError;

const DOMAIN: &[u8] = b"lazybd p2p ticket v1\0";
/// Longest ticket accepted on the wire (a real one is well under 1 KiB).
pub const MAX_TICKET_LEN: usize = 2048;
/// How far a peer's clock may be behind the super node's.
const CLOCK_SKEW: u64 = 30;
/// DER prefix of an Ed25519 SubjectPublicKeyInfo (RFC 8410), before the key.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// What a ticket says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Claims {
    /// The key that signed it.
    pub kid: String,
    /// `ip:port`: the holder's peer address, its IP as the super node saw it.
    pub holder: String,
    /// The blob digest.
    pub blob: String,
    /// The layer's anchor (`sha256:` of its index); empty when unknown.
    pub anchor: String,
    /// Unix seconds.
    pub expires: u64,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum TicketError {
    #[error("no ticket")]
    Missing,
    #[error("malformed ticket")]
    Malformed,
    #[error("ticket signed by unknown key {0}")]
    UnknownKey(String),
    #[error("bad ticket signature")]
    BadSignature,
    #[error("ticket expired")]
    Expired,
    #[error("ticket is for another blob")]
    OtherBlob,
    #[error("ticket belongs to {holder}, not to {caller}")]
    OtherHolder { holder: String, caller: IpAddr },
}

impl Claims {
    /// Whether these (verified) claims let `caller` read blob
    /// (`blob`, `anchor`).
    pub fn permit(&self, blob: &str, anchor: &str, caller: IpAddr) -> Result<(), TicketError> {
        if self.blob != blob || self.anchor != anchor {
            return Err(TicketError::OtherBlob);
        }
        if holder_ip(&self.holder) != Some(canonical(caller)) {
            return Err(TicketError::OtherHolder {
                holder: self.holder.clone(),
                caller,
            });
        }
        Ok(())
    }

    /// Seconds of validity left at `now`.
    pub fn remaining(&self, now: u64) -> u64 {
        self.expires.saturating_sub(now)
    }
}

/// The IP of an `ip:port` holder address.
pub fn holder_ip(holder: &str) -> Option<IpAddr> {
    holder.parse::<SocketAddr>().ok().map(|a| canonical(a.ip()))
}

/// IPv4-mapped IPv6 addresses as IPv4, so both spellings of one client match.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A public key as the super node publishes it (`GET /v1/keys`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishedKey {
    pub id: String,
    /// Hex of the 32-byte Ed25519 public key.
    pub ed25519: String,
}

fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// The super node's signing key, and the older public keys it still
/// publishes while tickets they signed may be in use (key rotation).
pub struct TicketSigner {
    key: Ed25519KeyPair,
    kid: String,
    published: Vec<PublishedKey>,
}

impl TicketSigner {
    /// The key in `path` (PKCS#8 PEM, as `openssl genpkey -algorithm
    /// ed25519` writes it), publishing also the public keys in `previous`
    /// (SPKI PEM, `openssl pkey -pubout`).
    pub fn load(path: &Path, previous: &[&Path]) -> Result<Self, P2pError> {
        let der = PrivatePkcs8KeyDer::from_pem_file(path).map_err(|e| key_err(path, e))?;
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der.secret_pkcs8_der())
            .map_err(|e| key_err(path, format!("not an Ed25519 key: {e}")))?;
        let mut signer = Self::from_key(key);
        for p in previous {
            let public = load_public_key(p)?;
            signer.published.push(PublishedKey {
                id: key_id(&public),
                ed25519: hex::encode(public),
            });
        }
        Ok(signer)
    }

    /// A fresh random key: tickets signed with it die with the process.
    pub fn generate() -> Result<Self, P2pError> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| P2pError::Tls("generating a ticket key failed".into()))?;
        let key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
            .map_err(|e| P2pError::Tls(format!("generated ticket key: {e}")))?;
        Ok(Self::from_key(key))
    }

    fn from_key(key: Ed25519KeyPair) -> Self {
        let public = key.public_key().as_ref().to_vec();
        let kid = key_id(&public);
        TicketSigner {
            published: vec![PublishedKey {
                id: kid.clone(),
                ed25519: hex::encode(&public),
            }],
            key,
            kid,
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The public keys tickets are checked with: this key first.
    pub fn published(&self) -> &[PublishedKey] {
        &self.published
    }

    /// A ticket for `holder` to read (`blob`, `anchor`) for `ttl`.
    pub fn sign(&self, holder: &str, blob: &str, anchor: &str, ttl: Duration) -> (String, Claims) {
        let claims = Claims {
            kid: self.kid.clone(),
            holder: holder.to_owned(),
            blob: blob.to_owned(),
            anchor: anchor.to_owned(),
            expires: unix_now() + ttl.as_secs(),
        };
        let payload = serde_json::to_vec(&claims).expect("plain data serialises");
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&payload);
        let sig = self.key.sign(&msg);
        let wire = format!("{}.{}", hex::encode(&payload), hex::encode(sig.as_ref()));
        (wire, claims)
    }
}

/// The public keys a node checks tickets with.
#[derive(Debug, Default, Clone)]
pub struct TicketVerifier {
    keys: HashMap<String, Vec<u8>>,
}

impl TicketVerifier {
    pub fn from_published(keys: &[PublishedKey]) -> Result<Self, String> {
        let mut out = HashMap::new();
        for k in keys.iter().take(16) {
            let public = hex::decode(&k.ed25519)
                .ok()
                .filter(|p| p.len() == 32)
                .ok_or_else(|| format!("key {}: not a 32-byte Ed25519 key", k.id))?;
            out.insert(key_id(&public), public);
        }
        Ok(TicketVerifier { keys: out })
    }

    /// The public keys in `path` (one or more SPKI PEM blocks).
    pub fn load(path: &Path) -> Result<Self, P2pError> {
        let iter = SubjectPublicKeyInfoDer::pem_file_iter(path).map_err(|e| key_err(path, e))?;
        let mut keys = HashMap::new();
        for spki in iter {
            let spki = spki.map_err(|e| key_err(path, e))?;
            let public = ed25519_from_spki(&spki)
                .ok_or_else(|| key_err(path, "not an Ed25519 public key (openssl pkey -pubout)"))?;
            keys.insert(key_id(&public), public);
        }
        if keys.is_empty() {
            return Err(key_err(path, "no public keys in the file"));
        }
        Ok(TicketVerifier { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn knows(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The claims of `wire` if one of our keys signed it and it has not
    /// expired at `now` (unix seconds). The caller checks what it permits.
    pub fn verify(&self, wire: &str, now: u64) -> Result<Claims, TicketError> {
        if wire.is_empty() {
            return Err(TicketError::Missing);
        }
        if wire.len() > MAX_TICKET_LEN {
            return Err(TicketError::Malformed);
        }
        let (payload, sig) = wire.split_once('.').ok_or(TicketError::Malformed)?;
        let payload = hex::decode(payload).map_err(|_| TicketError::Malformed)?;
        let sig = hex::decode(sig).map_err(|_| TicketError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|_| TicketError::Malformed)?;
        let public = self
            .keys
            .get(&claims.kid)
            .ok_or_else(|| TicketError::UnknownKey(claims.kid.clone()))?;
        let mut msg = DOMAIN.to_vec();
        msg.extend_from_slice(&payload);
        UnparsedPublicKey::new(&ED25519, public)
            .verify(&msg, &sig)
            .map_err(|_| TicketError::BadSignature)?;
        if claims.expires.saturating_add(CLOCK_SKEW) < now {
            return Err(TicketError::Expired);
        }
        Ok(claims)
    }
}

fn ed25519_from_spki(spki: &[u8]) -> Option<Vec<u8>> {
    let key = spki.strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    (key.len() == 32).then(|| key.to_vec())
}

fn load_public_key(path: &Path) -> Result<Vec<u8>, P2pError> {
    let spki = SubjectPublicKeyInfoDer::from_pem_file(path).map_err(|e| key_err(path, e))?;
    ed25519_from_spki(&spki)
        .ok_or_else(|| key_err(path, "not an Ed25519 public key (openssl pkey -pubout)"))
}

fn key_err(path: &Path, e: impl std::fmt::Display) -> P2pError {
    P2pError::Config {
        path: path.to_owned(),
        message: format!("ticket key: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BLOB: &str = "sha256:aaaa";
    const ANCHOR: &str = "sha256:bbbb";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_signed_ticket_permits_its_holder_and_blob_only() {
        let signer = TicketSigner::generate().unwrap();
        let verifier = TicketVerifier::from_published(signer.published()).unwrap();
        let (wire, _) = signer.sign("10.0.0.7:7070", BLOB, ANCHOR, Duration::from_secs(60));
        let claims = verifier.verify(&wire, unix_now()).unwrap();
        assert_eq!(claims.permit(BLOB, ANCHOR, ip("10.0.0.7")), Ok(()));
        assert_eq!(claims.permit(BLOB, ANCHOR, ip("::ffff:10.0.0.7")), Ok(()));
        assert!(matches!(
            claims.permit(BLOB, ANCHOR, ip("10.0.0.8")),
            Err(TicketError::OtherHolder { .. })
        ));
        assert_eq!(
            claims.permit(BLOB, "sha256:cccc", ip("10.0.0.7")),
            Err(TicketError::OtherBlob)
        );
        assert_eq!(
            claims.permit("sha256:dddd", ANCHOR, ip("10.0.0.7")),
            Err(TicketError::OtherBlob)
        );
        assert_eq!(
            verifier.verify(&wire, unix_now() + 120),
            Err(TicketError::Expired)
        );
    }

    #[test]
    fn forged_altered_and_foreign_tickets_are_refused() {
        let signer = TicketSigner::generate().unwrap();
        let verifier = TicketVerifier::from_published(signer.published()).unwrap();
        let (wire, claims) = signer.sign("10.0.0.7:7070", BLOB, ANCHOR, Duration::from_secs(60));
        // The claims changed to another holder, signature kept.
        let mut other = claims.clone();
        other.holder = "10.0.0.9:7070".into();
        let sig = wire.split_once('.').unwrap().1;
        let altered = format!("{}.{sig}", hex::encode(serde_json::to_vec(&other).unwrap()));
        assert_eq!(
            verifier.verify(&altered, unix_now()),
            Err(TicketError::BadSignature)
        );
        // Another super node's key (a node cannot sign with ours).
        let rogue = TicketSigner::generate().unwrap();
        let (forged, _) = rogue.sign("10.0.0.9:7070", BLOB, ANCHOR, Duration::from_secs(60));
        assert!(matches!(
            verifier.verify(&forged, unix_now()),
            Err(TicketError::UnknownKey(_))
        ));
        for bad in ["", "zz", "00.00", &"a".repeat(MAX_TICKET_LEN + 1)] {
            assert!(verifier.verify(bad, unix_now()).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_load_from_openssl_pem_files() {
        let dir = tempfile::tempdir().unwrap();
        // `openssl genpkey -algorithm ed25519` and `openssl pkey -pubout`
        // of one key (RFC 8410 test vector).
        let private = "-----BEGIN PRIVATE KEY-----\n\
            MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
            -----END PRIVATE KEY-----\n";
        let public = "-----BEGIN PUBLIC KEY-----\n\
            MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=\n\
            -----END PUBLIC KEY-----\n";
        std::fs::write(dir.path().join("k"), private).unwrap();
        std::fs::write(dir.path().join("k.pub"), public).unwrap();
        let signer = TicketSigner::load(&dir.path().join("k"), &[]).unwrap();
        let verifier = TicketVerifier::load(&dir.path().join("k.pub")).unwrap();
        let (wire, _) = signer.sign("10.0.0.7:7070", BLOB, ANCHOR, Duration::from_secs(60));
        assert!(verifier.verify(&wire, unix_now()).is_ok());
        // Rotation: the old key is still published beside the new one.
        let newer = TicketSigner::load(&dir.path().join("k"), &[&dir.path().join("k.pub")]);
        assert_eq!(newer.unwrap().published().len(), 2);
    }
}
