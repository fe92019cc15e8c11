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
    /// stored bytes (the startup stream is not limited: it is one range).
    pub max_request_bytes: u64,
    /// The most a demand fetch adds after the chunks a reader missed (the
    /// chunks stored next in the blob, which are likely read next): the
    /// window itself follows the link, see `fetch::link`.
    pub window_max: u64,
    /// A reader whose chunk the startup stream will reach only after this
    /// many more bytes fetches it itself instead of waiting.
    pub lookahead: u64,
    /// Also keep each fetched chunk's stored (compressed) bytes in the cache,
    /// for the P2P peer server to send on unchanged (`crate::cache`). On when
    /// the node serves its layers to peers.
    pub keep_stored: bool,
}

impl Default for FetchConfig {
    fn default() -> Self {
        FetchConfig {
            request_timeout: Duration::from_secs(10),
            read_deadline: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            max_request_bytes: 8 << 20,
            window_max: 1 << 20,
            lookahead: 1 << 20,
            keep_stored: false,
        }
    }
}
