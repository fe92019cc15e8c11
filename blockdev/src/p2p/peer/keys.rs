//! The super node's public ticket keys as this node knows them: from
//! `ticket_keys_file`, or fetched from the super node (`GET /v1/keys`) at
//! start, while none are known, and when a ticket names a key not seen yet
//! (a rotation, a restarted super node), at most every
//! [`REFRESH_EVERY`].

use std::net::IpAddr;
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use super::{lock, PeerNode};
use crate::p2p::http::{read_limited, MAX_SMALL_BODY};
use crate::p2p::ticket::{unix_now, Claims, TicketError, TicketVerifier};
use crate::p2p::wire::{path, BlobId, KeysReply};
use crate::p2p::P2pError;

const REFRESH_EVERY: Duration = Duration::from_secs(10);

pub struct Keys {
    /// From a file: never replaced by the super node's answer.
    fixed: bool,
    verifier: RwLock<TicketVerifier>,
    last_fetch: Mutex<Option<Instant>>,
}

impl Keys {
    pub fn new(file: Option<&Path>) -> Result<Self, P2pError> {
        let (fixed, verifier) = match file {
            Some(f) => (true, TicketVerifier::load(f)?),
            None => (false, TicketVerifier::default()),
        };
        Ok(Keys {
            fixed,
            verifier: RwLock::new(verifier),
            last_fetch: Mutex::default(),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn verify(&self, wire: &str) -> Result<Claims, TicketError> {
        self.verifier
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .verify(wire, unix_now())
    }
}

impl PeerNode {
    /// Fetches the super node's public keys (over TLS unless insecure
    /// operation is allowed, which `P2pConfig::check` enforced).
    pub(super) async fn refresh_keys(&self) -> Result<(), String> {
        if self.keys.fixed {
            return Ok(());
        }
        *lock(&self.keys.last_fetch) = Some(Instant::now());
        let url = format!("{}{}", self.config.supernode, path::KEYS);
        let resp = self
            .authed(self.client.get(url))
            .timeout(self.config.supernode_timeout())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if !resp.status().is_success() {
            return Err(format!("HTTP {}", resp.status()));
        }
        let body = read_limited(resp, MAX_SMALL_BODY).await?;
        let reply: KeysReply = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
        let verifier = TicketVerifier::from_published(&reply.keys)?;
        if verifier.is_empty() {
            return Err("the super node published no keys".into());
        }
        *self
            .keys
            .verifier
            .write()
            .unwrap_or_else(|e| e.into_inner()) = verifier;
        Ok(())
    }

    /// The claims of `wire` if it is a valid ticket for `id` held by
    /// `caller`.
    pub(super) async fn check_ticket(
        &self,
        wire: &str,
        id: &BlobId,
        caller: IpAddr,
    ) -> Result<Claims, TicketError> {
        let mut verified = self.keys.verify(wire);
        if matches!(verified, Err(TicketError::UnknownKey(_))) && !self.keys.fixed {
            let due = lock(&self.keys.last_fetch).is_none_or(|t| t.elapsed() >= REFRESH_EVERY);
            if due {
                if let Err(e) = self.refresh_keys().await {
                    tracing::warn!("ticket keys from the super node: {e}");
                }
                verified = self.keys.verify(wire);
            }
        }
        let claims = verified?;
        claims.permit(&id.digest, &id.anchor, caller)?;
        Ok(claims)
    }
}
