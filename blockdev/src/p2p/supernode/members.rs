//! `announce` and `leave`: the peer trees, and the tickets that go with a
//! place in them. A caller joins a layer's tree, learns who holds the layer
//! and gets a ticket for it only after showing it may read the blob: the
//! registry accepts its credentials, or it shows a ticket of ours for the
//! layer that is still fresh (then the registry is not asked again). Its
//! place in the tree is its own address as this server sees the TCP
//! connection, never one it names: the IP in `addr` must be that one (or
//! unspecified), only the port is the caller's choice.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tracing::{debug, warn};

use super::{Refusal, Supernode};
use crate::p2p::http::{self, Body};
use crate::p2p::ticket::{canonical, unix_now, Claims, MAX_TICKET_LEN};
use crate::p2p::wire::{header, query, AnnounceReply, BlobId};

impl Supernode {
    pub(super) async fn announce(
        &self,
        req: &Request<Incoming>,
        q: &HashMap<String, String>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Refusal> {
        let id = blob_id(q)?;
        let member = self.member(q, remote)?;
        self.counters.announces.fetch_add(1, Relaxed);
        let shown = req
            .headers()
            .get(header::TICKET)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= MAX_TICKET_LEN);
        let (ticket, claims) = match shown.and_then(|t| self.fresh(t, &id, &member, remote.ip())) {
            Some(c) => (shown.unwrap_or_default().to_owned(), c),
            None => {
                let get = |k: &str| q.get(k).map_or("", |v| v.as_str());
                let auth_header = req
                    .headers()
                    .get(header::REGISTRY_AUTH)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                let (client, cred) =
                    self.registry_client(get(query::REGISTRY), get(query::REPO), auth_header)?;
                self.authorize(&client, &id.digest, cred).await?;
                self.counters.tickets_signed.fetch_add(1, Relaxed);
                self.signer
                    .sign(&member, &id.digest, &id.anchor, self.config.ticket_ttl)
            }
        };
        self.access.record(&claims, remote.ip());
        let ancestors = self
            .membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .announce(&tree_key(&id), &member, Instant::now())
            .unwrap_or_default();
        debug!("layer {id}: {member} joins below {ancestors:?}");
        Ok(http::json(&AnnounceReply {
            ancestors,
            heartbeat_ms: (self.config.member_ttl.as_millis() / 3) as u64,
            member,
            ticket,
        }))
    }

    pub(super) fn leave(
        &self,
        q: &HashMap<String, String>,
        remote: SocketAddr,
    ) -> Result<Response<Body>, Refusal> {
        let id = blob_id(q)?;
        let member = self.member(q, remote)?;
        self.membership
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .leave(&tree_key(&id), &member);
        Ok(http::respond(StatusCode::OK, ""))
    }

    /// The claims of `ticket` if we signed it for this layer and member and
    /// it has more than half its life left (else a new one is signed).
    fn fresh(&self, ticket: &str, id: &BlobId, member: &str, caller: IpAddr) -> Option<Claims> {
        let claims = self.verifier.verify(ticket, unix_now()).ok()?;
        claims.permit(&id.digest, &id.anchor, caller).ok()?;
        let half = self.config.ticket_ttl.as_secs() / 2;
        (claims.holder == member && claims.remaining(unix_now()) > half).then_some(claims)
    }

    /// The caller's place in the trees: the IP it connected from and the
    /// port it names. A different IP in `addr` is refused.
    fn member(&self, q: &HashMap<String, String>, remote: SocketAddr) -> Result<String, Refusal> {
        let addr: SocketAddr = q
            .get(query::ADDR)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| (StatusCode::BAD_REQUEST, "addr must be ip:port".to_owned()))?;
        let seen = canonical(remote.ip());
        if !addr.ip().is_unspecified() && canonical(addr.ip()) != seen {
            self.counters.foreign_addresses.fetch_add(1, Relaxed);
            warn!(
                "{remote} announced the address {addr}, not its own: refused (a node must \
                 reach the super node from the address it serves on, without NAT)"
            );
            return Err((
                StatusCode::FORBIDDEN,
                format!("addr {addr} is not the address you connect from ({seen})"),
            ));
        }
        Ok(SocketAddr::new(seen, addr.port()).to_string())
    }
}

fn blob_id(q: &HashMap<String, String>) -> Result<BlobId, Refusal> {
    let id = BlobId::new(
        q.get(query::BLOB).map_or("", |v| v),
        q.get(query::ANCHOR).map_or("", |v| v),
    );
    if !id.is_valid() {
        return Err((StatusCode::BAD_REQUEST, "bad blob or anchor".into()));
    }
    Ok(id)
}

/// Trees are per layer: blob digest and anchor.
fn tree_key(id: &BlobId) -> String {
    format!("{}@{}", id.digest, id.anchor)
}
