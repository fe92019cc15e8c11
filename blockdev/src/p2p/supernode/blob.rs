//! `GET /v1/blob`: byte ranges of registry blobs out of the block cache.
//! The caller's credentials are checked with the registry first, the size
//! it names is checked against the registry's, room in the response budget
//! is reserved for what the answer holds at once, and then the blocks are
//! streamed in order as they come (a few ahead), each fetched from the
//! registry once however many wait for it, and not at all once nobody
//! does.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tracing::warn;

use super::block_cache::BlockKey;
use super::{Refusal, Supernode};
use crate::oci::valid_digest;
use crate::p2p::http::{self, Body};
use crate::p2p::wire::{header, query, MAX_RANGE};
use crate::registry::RegistryClient;

/// `Err((transient, why))`.
pub type BlockResult = Result<Bytes, (bool, String)>;

/// Blocks fetched ahead of the one being written, per answer.
const BLOCKS_AHEAD: usize = 3;

impl Supernode {
    pub(super) async fn blob(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        q: &HashMap<String, String>,
    ) -> Result<Response<Body>, Refusal> {
        let bad = |m: &str| (StatusCode::BAD_REQUEST, m.to_owned());
        let get = |k: &str| q.get(k).ok_or_else(|| bad(&format!("missing {k}")));
        let num = |k: &str| -> Result<u64, Refusal> {
            get(k)?.parse().map_err(|_| bad(&format!("bad {k}")))
        };
        let (registry, repo, digest) = (
            get(query::REGISTRY)?,
            get(query::REPO)?,
            get(query::DIGEST)?,
        );
        let (size, start, end) = (num(query::SIZE)?, num(query::START)?, num(query::END)?);
        if !valid_digest(digest) {
            return Err(bad("bad digest"));
        }
        if !(start < end && end <= size && end - start <= MAX_RANGE) {
            return Err(bad("bad range"));
        }
        let auth_header = req
            .headers()
            .get(header::REGISTRY_AUTH)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let (client, cred) = self.registry_client(registry, repo, auth_header)?;
        self.authorize(&client, digest, cred).await?;
        self.check_size(&client, digest, size).await?;
        let bs = self.config.block_size;
        let room = self
            .budget
            .reserve(
                (end - start).min(bs * (BLOCKS_AHEAD as u64 + 2)),
                self.config.registry_timeout,
            )
            .await
            .ok_or_else(|| (StatusCode::SERVICE_UNAVAILABLE, "busy, try again".into()))?;

        let blocks: Vec<u64> = (start / bs..=(end - 1) / bs).collect();
        let (me, registry, digest) = (self.clone(), registry.clone(), digest.clone());
        let part = move |b: u64| {
            let (me, client) = (me.clone(), client.clone());
            let key = BlockKey {
                registry: registry.clone(),
                digest: digest.clone(),
                block: b,
            };
            async move {
                let block = me.block(key, client, size).await;
                slice(block, b, bs, start, end)
            }
        };
        // The first block before the answer starts, so a refusal or a
        // registry failure gets its status; the rest as they come.
        let first = part.clone()(blocks[0]).await.map_err(|(transient, msg)| {
            let status = if transient {
                StatusCode::BAD_GATEWAY
            } else {
                StatusCode::FORBIDDEN
            };
            (status, msg)
        })?;
        self.counters.served_requests.fetch_add(1, Relaxed);
        let counters = self.counters.clone();
        let rest = stream::iter(blocks.into_iter().skip(1))
            .map(part)
            .buffered(BLOCKS_AHEAD);
        let body = stream::once(async move { Ok(first) })
            .chain(rest)
            .map(move |piece| {
                let piece = piece.map_err(|(_, msg)| {
                    warn!("blob answer cut short: {msg}");
                    std::io::Error::other(msg)
                })?;
                counters.served_bytes.fetch_add(piece.len() as u64, Relaxed);
                Ok(piece)
            });
        Ok(http::streamed(end - start, body, Some(room)))
    }

    /// Block `key` of a blob of `size` bytes: cached, or fetched from the
    /// registry (one fetch however many wait, within the registry slots).
    async fn block(&self, key: BlockKey, client: Arc<RegistryClient>, size: u64) -> BlockResult {
        if let Some(b) = self.cache.get(&key).await {
            self.counters.block_hits.fetch_add(1, Relaxed);
            return Ok(b);
        }
        let bs = self.config.block_size;
        let from = key.block.saturating_mul(bs);
        let range = from..from.saturating_add(bs).min(size);
        let timeout = self.config.registry_timeout;
        let (cache, counters, slots) = (
            self.cache.clone(),
            self.counters.clone(),
            self.registry_slots.clone(),
        );
        let (result, leader) = self
            .flights
            .run(key.clone(), timeout + Duration::from_secs(1), || {
                async move {
                    // A flight that ended between our lookup and now stored it.
                    if let Some(b) = cache.get(&key).await {
                        return Ok(b);
                    }
                    let Ok(_slot) = slots.acquire_owned().await else {
                        return Err((true, "shutting down".to_owned()));
                    };
                    counters.block_misses.fetch_add(1, Relaxed);
                    counters.registry_requests.fetch_add(1, Relaxed);
                    let fetched =
                        tokio::time::timeout(timeout, client.blob_range(&key.digest, range)).await;
                    let result = match fetched {
                        Ok(Ok(b)) => Ok(b),
                        Ok(Err(e)) => Err((e.is_transient(), e.to_string())),
                        Err(_) => Err((true, format!("registry timed out after {timeout:?}"))),
                    };
                    match &result {
                        // Stored before the flight ends, so a request arriving
                        // just after finds it cached instead of fetching again.
                        Ok(b) => {
                            counters.registry_bytes.fetch_add(b.len() as u64, Relaxed);
                            if let Err(e) = cache.put(key, b).await {
                                warn!("{e}");
                            }
                        }
                        Err(_) => {
                            counters.registry_errors.fetch_add(1, Relaxed);
                        }
                    }
                    result
                }
            })
            .await;
        if !leader {
            self.counters.block_hits.fetch_add(1, Relaxed);
        }
        result.unwrap_or_else(|e| Err((true, format!("block fetch: {e:?}"))))
    }
}

/// The part of block `b` (of `bs` bytes) inside `start..end`.
fn slice(block: BlockResult, b: u64, bs: u64, start: u64, end: u64) -> BlockResult {
    let block = block?;
    let block_start = b.saturating_mul(bs);
    let from = start.saturating_sub(block_start);
    let to = end.min(block_start.saturating_add(bs)) - block_start;
    if from >= to || to > block.len() as u64 {
        return Err((true, format!("block {b} is short ({} bytes)", block.len())));
    }
    Ok(block.slice(from as usize..to as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slices_cover_exactly_the_range() {
        let bs = 10;
        let block = |b: u64, len: usize| Ok(Bytes::from(vec![b as u8; len]));
        // Range 5..27 over blocks 0, 1, 2 (the last 8 bytes long).
        let parts: Vec<Bytes> = [(0, 10), (1, 10), (2, 8)]
            .into_iter()
            .map(|(b, len)| slice(block(b, len), b, bs, 5, 27).unwrap())
            .collect();
        assert_eq!(parts.iter().map(Bytes::len).collect::<Vec<_>>(), [5, 10, 7]);
        // A block shorter than the range needs is refused, not passed on.
        assert!(slice(block(2, 3), 2, bs, 5, 27).is_err());
    }
}
