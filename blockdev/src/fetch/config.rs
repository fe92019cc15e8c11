use std::time::Duration;

/// How hard and how long the fetcher tries. Defaults suit a registry over a
/// datacenter network; tests shorten them.
#[derive(Debug, Clone)]
pub struct FetchConfig {
    /// Limit for one range request to one source.
    pub request_timeout: Duration,
    /// A read that cannot be served within this fails with EIO (and the log
    /// says why) instead of hanging. Also bounds each fetch's retries.
    pub read_deadline: Duration,
    /// First wait after every source failed; doubles up to `backoff_max`.
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    /// Adjacent missing chunks are fetched in one request up to this many
    /// stored bytes.
    pub max_request_bytes: u64,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            request_timeout: Duration::from_secs(10),
            read_deadline: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_request_bytes: 8 << 20,
        }
    }
}
