//! What a P2P server parses of a request (the query string and what is in
//! it: digests, anchors, ranges, trace keys and layer chains; the registry
//! credentials header; a ticket) and what a client parses of a reply
//! (announce, keys): any input must not panic, and parsing is bounded.
//!
//! Input, newline-separated: the query string, the credentials header
//! value, a ticket, then a reply body (the rest).
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use lazybd_blockdev::oci::{valid_digest, LayerId};
use lazybd_blockdev::p2p::ticket::{TicketSigner, TicketVerifier, MAX_TICKET_LEN};
use lazybd_blockdev::p2p::wire::{
    auth_from_header, auth_to_header, parse_query, query, AnnounceReply, KeysReply, MAX_CHAIN,
    MAX_QUERY_PAIRS,
};
use lazybd_blockdev::trace::valid_key;
use libfuzzer_sys::fuzz_target;

/// One signing key for the whole run (generating one per input would
/// spend the budget on key generation).
fn keys() -> &'static (TicketSigner, TicketVerifier) {
    static KEYS: OnceLock<(TicketSigner, TicketVerifier)> = OnceLock::new();
    KEYS.get_or_init(|| {
        let signer = TicketSigner::generate().expect("a signing key");
        let verifier = TicketVerifier::from_published(signer.published()).expect("its keys");
        (signer, verifier)
    })
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(4, '\n');
    let mut next = || parts.next().unwrap_or("");
    let (q, header, ticket, reply) = (next(), next(), next(), next());

    let params = parse_query(q);
    assert!(params.len() <= MAX_QUERY_PAIRS);
    for k in [query::START, query::END, query::SIZE] {
        if let Some(v) = params.get(k) {
            let _ = v.parse::<u64>();
        }
    }
    for k in [query::DIGEST, query::BLOB, query::ANCHOR] {
        if let Some(v) = params.get(k) {
            let _ = valid_digest(v);
        }
    }
    if let Some(k) = params.get(query::KEY) {
        let _ = valid_key(k);
    }
    if let Some(chain) = params.get(query::CHAIN) {
        for id in chain.split(',').take(MAX_CHAIN + 1) {
            if let Ok(id) = LayerId::parse(id) {
                assert_eq!(LayerId::parse(id.as_str()).ok(), Some(id.clone()));
            }
        }
    }

    if let Ok(auth) = auth_from_header(header) {
        let back = auth_from_header(&auth_to_header(&auth)).expect("round trip");
        assert_eq!(auth_to_header(&back), auth_to_header(&auth));
    }

    let (signer, verifier) = keys();
    // Forged or mangled tickets: refused, never a panic; over-long ones
    // before anything is decoded.
    let verdict = verifier.verify(ticket, 0);
    assert!(ticket.len() <= MAX_TICKET_LEN || verdict.is_err());
    // A real ticket for whatever the query named admits exactly its holder.
    let blob = params.get(query::BLOB).map_or("", |b| b.as_str());
    let anchor = params.get(query::ANCHOR).map_or("", |a| a.as_str());
    let holder = "10.0.0.1:7070";
    let (wire, _) = signer.sign(holder, blob, anchor, Duration::from_secs(60));
    if wire.len() <= MAX_TICKET_LEN {
        let claims = verifier.verify(&wire, 0).expect("our own ticket verifies");
        let owner = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        assert!(claims.permit(blob, anchor, owner).is_ok());
        assert!(claims
            .permit(blob, anchor, IpAddr::V4(Ipv4Addr::LOCALHOST))
            .is_err());
    }

    let _ = serde_json::from_str::<AnnounceReply>(reply);
    if let Ok(keys) = serde_json::from_str::<KeysReply>(reply) {
        let _ = TicketVerifier::from_published(&keys.keys);
    }
});
