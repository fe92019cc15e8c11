//! What a P2P server parses of a request (the query string, the registry
//! credentials header) and what a client parses of an announce reply:
//! any input must not panic, and parsing is bounded.
//!
//! Input: the query string, a newline, the credentials header value, a
//! newline, an announce reply body.
#![no_main]

use lazybd_blockdev::oci::valid_digest;
use lazybd_blockdev::p2p::wire::{
    auth_from_header, auth_to_header, parse_query, query, AnnounceReply, MAX_QUERY_PAIRS,
};
use lazybd_blockdev::trace::valid_key;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\n');
    let (q, header, reply) = (
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
        parts.next().unwrap_or(""),
    );
    let params = parse_query(q);
    assert!(params.len() <= MAX_QUERY_PAIRS);
    for k in [query::START, query::END, query::SIZE] {
        if let Some(v) = params.get(k) {
            let _ = v.parse::<u64>();
        }
    }
    for k in [query::DIGEST, query::BLOB] {
        if let Some(v) = params.get(k) {
            let _ = valid_digest(v);
        }
    }
    if let Some(k) = params.get(query::KEY) {
        let _ = valid_key(k);
    }
    if let Ok(auth) = auth_from_header(header) {
        let back = auth_from_header(&auth_to_header(&auth)).expect("round trip");
        assert_eq!(auth_to_header(&back), auth_to_header(&auth));
    }
    let _ = serde_json::from_str::<AnnounceReply>(reply);
});
