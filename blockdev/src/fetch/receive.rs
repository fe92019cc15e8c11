//! Reading one streamed answer: each chunk is verified and stored as soon
//! as its bytes are in, waiting readers are woken chunk by chunk, and no
//! more than the range asked for is ever read or buffered.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::Ordering::Relaxed;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::time::{timeout_at, Instant};

use super::link::PIECE_BYTES;
use super::{ChunkFetcher, FetchError, Kind, Progress, Slot};
use crate::cache::CacheError;

/// What one answer brought.
#[derive(Debug, Default)]
pub(super) struct Received {
    /// Chunks verified and stored.
    pub stored: u64,
    /// Chunks that failed verification, and why; reading stopped at the first.
    pub corrupt: Vec<(u64, String)>,
    /// Chunks whose bytes never came (the answer failed, was cut short or
    /// stopped being read).
    pub unreceived: Vec<u64>,
    /// Why the answer did not deliver everything, and whether trying this
    /// source again may help.
    pub failure: Option<(String, bool)>,
    /// The server behind the source that answered, if it named one.
    pub server: Option<String>,
}

impl Received {
    fn failed(segment: &[u64], reason: String, transient: bool) -> Self {
        Received {
            unreceived: segment.to_vec(),
            failure: Some((reason, transient)),
            ..Received::default()
        }
    }
}

enum Rejected {
    Corrupt(String),
    Cache(CacheError),
}

/// Batches of chunks verified at once while an answer is read: two keep
/// both cores of a small node busy when the link outruns one.
const MAX_VERIFYING: usize = 2;

impl ChunkFetcher {
    /// Asks `slot`'s source for the stored bytes of `segment` (chunks
    /// adjacent in the blob, in blob order) and takes in what comes, by
    /// `limit` at the latest.
    pub(super) async fn receive(
        &self,
        slot: &Slot,
        segment: &[u64],
        limit: Instant,
        progress: &watch::Sender<Progress>,
        kind: Kind,
    ) -> Result<Received, FetchError> {
        let entry = |c: u64| &self.index.chunks[c as usize];
        let start = entry(segment[0]).offset;
        let end = entry(segment[segment.len() - 1]).stored_range().end;
        let len = end - start;
        let asked = Instant::now();
        let sent = self.link.send();
        let timed_out = || format!("timed out after {:?}", self.config.request_timeout);
        let answer = match timeout_at(limit, slot.source.read_range(start..end)).await {
            Err(_elapsed) => return Ok(Received::failed(segment, timed_out(), true)),
            Ok(Err(e)) => return Ok(Received::failed(segment, e.to_string(), e.is_transient())),
            Ok(Ok(answer)) => answer,
        };
        let mut out = Received {
            server: answer.server.clone(),
            ..Received::default()
        };
        let mut body = answer.body;
        let mut buf = BytesMut::new();
        // Chunks being verified while the next bytes come in, oldest first.
        let mut verifying = VecDeque::new();
        let mut next = 0;
        let mut received = 0u64;
        let mut first_byte = None;
        // Where the piece of the answer being sampled began: bytes, time.
        let mut piece_start = (0u64, Instant::now());
        while next < segment.len() {
            let mut piece = match timeout_at(limit, body.next()).await {
                Err(_elapsed) => {
                    out.failure =
                        Some((format!("{} ({received} of {len} bytes)", timed_out()), true));
                    break;
                }
                Ok(None) => {
                    let reason = format!("answer ended after {received} of {len} bytes");
                    out.failure = Some((reason, true));
                    break;
                }
                Ok(Some(Err(e))) => {
                    out.failure = Some((e.to_string(), e.is_transient()));
                    break;
                }
                Ok(Some(Ok(piece))) => piece,
            };
            if first_byte.is_none() {
                let now = Instant::now();
                first_byte = Some(now);
                piece_start.1 = now;
            }
            slot.counters.bytes.fetch_add(piece.len() as u64, Relaxed);
            let room = len - received;
            let overlong = piece.len() as u64 > room;
            if overlong {
                // Not believed, not buffered: the chunks before the excess
                // are still verified like any others.
                piece.truncate(room as usize);
                slot.counters.overlong_answers.fetch_add(1, Relaxed);
                out.failure = Some((
                    format!("answer is longer than the {len} bytes asked for"),
                    false,
                ));
            }
            received += piece.len() as u64;
            if received - piece_start.0 >= PIECE_BYTES {
                let now = Instant::now();
                self.link
                    .sample_piece(received - piece_start.0, now - piece_start.1);
                piece_start = (received, now);
            }
            buf.extend_from_slice(&piece);
            let mut ready = Vec::new();
            while let Some(&c) = segment.get(next) {
                let need = entry(c).stored_len as usize;
                if buf.len() < need {
                    break;
                }
                ready.push((c, buf.split_to(need).freeze()));
                next += 1;
            }
            if let Some(&(last, _)) = ready.last() {
                let position = entry(last).stored_range().end;
                verifying.push_back(self.verify_and_store(
                    slot,
                    ready,
                    kind,
                    progress.clone(),
                    position,
                ));
            }
            while verifying.len() > MAX_VERIFYING {
                let batch = verifying.pop_front().expect("more than none");
                self.take_verified(batch.await, &mut out)?;
            }
            if overlong || !out.corrupt.is_empty() {
                break;
            }
        }
        while let Some(batch) = verifying.pop_front() {
            self.take_verified(batch.await, &mut out)?;
        }
        // A chunk that failed verification is retried, not left out.
        let corrupt: Vec<u64> = out.corrupt.iter().map(|(c, _)| *c).collect();
        out.unreceived = segment[next..].to_vec();
        out.unreceived.retain(|c| !corrupt.contains(c));
        if let Some(first) = first_byte {
            self.link
                .sample(sent, first - asked, received, first.elapsed());
        }
        Ok(out)
    }

    /// Takes a batch's verification outcomes into `out`.
    fn take_verified(
        &self,
        outcomes: Vec<(u64, Result<(), Rejected>)>,
        out: &mut Received,
    ) -> Result<(), FetchError> {
        for (chunk, outcome) in outcomes {
            match outcome {
                Ok(()) => out.stored += 1,
                Err(Rejected::Corrupt(reason)) => out.corrupt.push((chunk, reason)),
                Err(Rejected::Cache(source)) => {
                    return Err(FetchError::Cache {
                        layer: self.layer.clone(),
                        chunk,
                        source,
                    })
                }
            }
        }
        Ok(())
    }

    /// Starts decoding and verifying each chunk of `ready`, storing the
    /// good ones and counting both, then moving the fetch's `progress` to
    /// `position` (the end of the batch), which wakes the readers waiting
    /// for them. Off the async threads: zstd and sha256 take time that
    /// readers should not wait behind. Started, not awaited: the answer's
    /// next bytes come in meanwhile, so a stream is not slowed to the pace
    /// of one core.
    fn verify_and_store(
        &self,
        slot: &Slot,
        ready: Vec<(u64, Bytes)>,
        kind: Kind,
        progress: watch::Sender<Progress>,
        position: u64,
    ) -> impl Future<Output = Vec<(u64, Result<(), Rejected>)>> {
        let index = self.index.clone();
        let cache = self.cache.clone();
        let (counters, stats) = (slot.counters.clone(), self.stats.clone());
        let chunks: Vec<u64> = ready.iter().map(|(c, _)| *c).collect();
        let task = tokio::task::spawn_blocking(move || {
            let outcomes: Vec<_> = ready
                .into_iter()
                .map(|(c, stored)| {
                    let outcome = match index.decode_chunk(c, &stored) {
                        // The stored bytes first (kept only for P2P serving):
                        // a peer server that sees the chunk present finds
                        // them too.
                        Ok(data) => cache
                            .store_stored(&index, c, &stored)
                            .and_then(|()| cache.store(c, index.image_range(c).start, &data))
                            .map_err(Rejected::Cache),
                        Err(e) => Err(Rejected::Corrupt(e.to_string())),
                    };
                    (c, outcome)
                })
                .collect();
            // Counted before the readers wake, who may look.
            for (_, outcome) in &outcomes {
                match outcome {
                    Ok(()) => {
                        counters.chunks.fetch_add(1, Relaxed);
                        if kind == Kind::Stream {
                            stats.prefetch.startup_chunks.fetch_add(1, Relaxed);
                        }
                    }
                    Err(Rejected::Corrupt(_)) => {
                        counters.corrupt_chunks.fetch_add(1, Relaxed);
                    }
                    Err(Rejected::Cache(_)) => {}
                }
            }
            // Batches end out of order: the position only moves forward.
            progress.send_modify(|p| p.position = p.position.max(position));
            outcomes
        });
        async move {
            task.await.unwrap_or_else(|e| {
                chunks
                    .into_iter()
                    .map(|c| {
                        let reason = format!("verification task failed: {e}");
                        (c, Err(Rejected::Corrupt(reason)))
                    })
                    .collect()
            })
        }
    }
}
