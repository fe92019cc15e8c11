//! Asking the sources in order until every chunk of a run is stored: one
//! request per run of chunks adjacent in the blob, a source that failed for
//! good skipped, the rest retried after a backoff, all within the read
//! deadline.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use tokio::sync::watch;
use tokio::time::Instant;
use tracing::warn;

use super::receive::Received;
use super::{ChunkFetcher, FetchError, Kind, Progress, Slot};
use crate::source::{ChunkSource, Verdict};

/// How often one round asks a source again at once after it shunned the
/// server that sent bad bytes (it has a few ancestors at most; this only
/// bounds a source that keeps claiming another server).
const MAX_REASKS: u32 = 8;

impl ChunkFetcher {
    /// Tries the sources in order, then again after a backoff, until every
    /// chunk is stored, every source failed for good, or the deadline passed.
    pub(super) async fn fetch_chunks(
        &self,
        mut pending: Vec<u64>,
        progress: &watch::Sender<Progress>,
        kind: Kind,
    ) -> Result<(), FetchError> {
        let (first, last) = (pending[0], pending[pending.len() - 1]);
        let started = Instant::now();
        let deadline = started + self.config.read_deadline;
        let mut reports: Vec<SourceReport> = self
            .sources
            .iter()
            .map(|s| SourceReport::new(&*s.source))
            .collect();
        let mut backoff = self.config.backoff_initial;
        loop {
            for (slot, report) in self.sources.iter().zip(&mut reports) {
                if report.given_up {
                    continue;
                }
                pending = self
                    .fetch_from(slot, report, pending, deadline, progress, kind)
                    .await?;
                if pending.is_empty() {
                    return Ok(());
                }
            }
            let now = Instant::now();
            let out_of_time = now + backoff >= deadline;
            if out_of_time || reports.iter().all(|r| r.given_up) {
                return Err(FetchError::Unavailable {
                    layer: self.layer.clone(),
                    first,
                    last,
                    elapsed: now - started,
                    failures: describe(&reports),
                });
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    /// Asks one source for the pending chunks (one request per run of
    /// chunks adjacent in the blob); returns the chunks still missing.
    async fn fetch_from(
        &self,
        slot: &Slot,
        report: &mut SourceReport,
        pending: Vec<u64>,
        deadline: Instant,
        progress: &watch::Sender<Progress>,
        kind: Kind,
    ) -> Result<Vec<u64>, FetchError> {
        let max_bytes = match kind {
            // Planned as ranges already (`stream`).
            Kind::Stream | Kind::Replay => u64::MAX,
            _ => self.config.max_request_bytes,
        };
        let runs = {
            let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
            self.plan(&pending, max_bytes, 0, &inflight)
        };
        let mut still_missing = Vec::new();
        let mut queue: VecDeque<Vec<u64>> = runs.into();
        let mut reasks = 0;
        while let Some(segment) = queue.pop_front() {
            if report.given_up {
                still_missing.extend(segment);
                continue;
            }
            report.attempts += 1;
            slot.counters.requests.fetch_add(1, Relaxed);
            let limit = deadline.min(Instant::now() + self.config.request_timeout);
            let received = self.receive(slot, &segment, limit, progress, kind).await?;
            let Received {
                corrupt,
                unreceived,
                failure,
                server,
                ..
            } = &received;
            if let Some((reason, transient)) = failure {
                report.fail(reason.clone(), *transient);
                slot.counters.errors.fetch_add(1, Relaxed);
            }
            let routed = self.give_verdict(slot, &segment, &received);
            let mut again: Vec<u64> = corrupt.iter().map(|(c, _)| *c).collect();
            again.extend(unreceived);
            if again.is_empty() {
                continue;
            }
            // The source shunned the server that failed it and has another
            // one: ask it again at once.
            let ask_again = routed && reasks < MAX_REASKS;
            let from = server
                .as_deref()
                .map_or(String::new(), |s| format!(" (server {s})"));
            for (chunk, reason) in corrupt {
                warn!(
                    "layer {}: chunk {chunk} from source {}{from} failed verification, \
                     not used; {}: {reason}",
                    self.layer,
                    slot.source.name(),
                    if ask_again {
                        "asking the source again"
                    } else {
                        "trying the next source"
                    }
                );
            }
            if ask_again {
                reasks += 1;
                let runs = {
                    let inflight = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
                    self.plan(&again, max_bytes, 0, &inflight)
                };
                for run in runs.into_iter().rev() {
                    queue.push_front(run);
                }
                continue;
            }
            // A source that served bad bytes is not asked again for this
            // fetch (it may well serve them again), unless it answers from
            // several servers: then it stays in for the next round.
            if let Some((chunk, reason)) = corrupt.last() {
                report.fail(format!("chunk {chunk} corrupt: {reason}"), server.is_some());
            }
            still_missing.extend(again);
        }
        still_missing.sort_unstable();
        still_missing.dedup();
        Ok(still_missing)
    }

    /// Tells a source that picks among servers what its answer was worth;
    /// whether it has another server to ask right away.
    fn give_verdict(&self, slot: &Slot, segment: &[u64], received: &Received) -> bool {
        let Some(server) = received.server.as_deref() else {
            return false;
        };
        let verdict = match (received.corrupt.first(), &received.failure) {
            (Some((_, reason)), _) => Verdict::Corrupt(reason.clone()),
            (None, None) => Verdict::Verified {
                chunks: received.stored,
            },
            (None, Some((reason, _))) => Verdict::Failed(reason.clone()),
        };
        let first = self.index.chunks[segment[0] as usize].offset;
        let last = self.index.chunks[segment[segment.len() - 1] as usize]
            .stored_range()
            .end;
        slot.source.verdict(server, &(first..last), &verdict)
    }
}

pub(super) struct SourceReport {
    source: String,
    pub(super) attempts: u32,
    last_error: Option<String>,
    /// Failed in a way retrying will not fix; skipped for the rest of this fetch.
    pub(super) given_up: bool,
}

impl SourceReport {
    pub(super) fn new(source: &dyn ChunkSource) -> Self {
        SourceReport {
            source: source.name().to_owned(),
            attempts: 0,
            last_error: None,
            given_up: false,
        }
    }

    pub(super) fn fail(&mut self, error: String, transient: bool) {
        self.last_error = Some(error);
        self.given_up |= !transient;
    }
}

/// One line naming what every source did, for the log and the error.
pub(super) fn describe(reports: &[SourceReport]) -> String {
    let mut out = String::new();
    for r in reports {
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(
            out,
            "{}: {} ({} attempts)",
            r.source,
            r.last_error.as_deref().unwrap_or("not tried"),
            r.attempts
        );
    }
    if out.is_empty() {
        out.push_str("no sources configured");
    }
    out
}
