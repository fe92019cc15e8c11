//! One verified range read outside the chunk path (the layer index): the same
//! source order, timeouts, backoff and deadline as chunk fetches.

use std::ops::Range;
use std::sync::Arc;

use tokio::time::{timeout_at, Instant};
use tracing::warn;

use super::retry::{describe, SourceReport};
use super::FetchConfig;
use crate::source::{ChunkSource, Verdict};

/// Reads `range` of the blob from the first source whose bytes `verify`
/// accepts. A rejected answer counts as that source's permanent failure
/// (transient if the source has other servers to ask).
/// On failure returns what every source did.
pub async fn read_verified<T>(
    sources: &[Arc<dyn ChunkSource>],
    config: &FetchConfig,
    what: &str,
    range: Range<u64>,
    verify: impl Fn(&[u8]) -> Result<T, String>,
) -> Result<T, String> {
    let deadline = Instant::now() + config.read_deadline;
    let mut reports: Vec<SourceReport> = sources.iter().map(|s| SourceReport::new(&**s)).collect();
    let mut backoff = config.backoff_initial;
    loop {
        for (source, report) in sources.iter().zip(&mut reports) {
            if report.given_up {
                continue;
            }
            report.attempts += 1;
            let limit = deadline.min(Instant::now() + config.request_timeout);
            let len = range.end - range.start;
            let read = async {
                let answer = source.read_range(range.clone()).await?;
                let server = answer.server.clone();
                answer.collect(len).await.map(|bytes| (bytes, server))
            };
            match timeout_at(limit, read).await {
                Ok(Ok((bytes, server))) => {
                    let verified = verify(&bytes);
                    let verdict = match &verified {
                        Ok(_) => Verdict::Verified { chunks: 0 },
                        Err(e) => Verdict::Corrupt(e.clone()),
                    };
                    let routed = server
                        .as_deref()
                        .is_some_and(|server| source.verdict(server, &range, &verdict));
                    match verified {
                        Ok(value) => return Ok(value),
                        Err(e) => {
                            warn!("{what} from source {} rejected: {e}", source.name());
                            // Permanent, unless the source can ask another
                            // server next time.
                            report.fail(format!("rejected: {e}"), routed);
                        }
                    }
                }
                Ok(Err(e)) => report.fail(e.to_string(), e.is_transient()),
                Err(_) => report.fail(
                    format!("timed out after {:?}", config.request_timeout),
                    true,
                ),
            }
        }
        if reports.iter().all(|r| r.given_up) || Instant::now() + backoff >= deadline {
            return Err(describe(&reports));
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(config.backoff_max);
    }
}
