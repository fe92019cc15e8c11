//! One lazily loaded layer: its verified index, its chunk cache and fetcher,
//! and reads of its uncompressed image at any offset.
//!
//! The layer is bound to the image that names it through its anchor (the
//! sha256 of its index, [`LayerSource::anchor`]): a tail, saved or fetched
//! from any source, is used only if its index hashes to the anchor, and
//! every chunk is checked against that index. Its [`LayerId`] (the anchor)
//! is what the node keys it by; the blob digest only says what to fetch.
//!
//! Files in the layer's directory: `index` (the blob's tail: index and footer,
//! so re-attaching works without the network), `image` and `chunks.map` (the
//! cache, see [`crate::cache`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use thiserror::Error;
use tracing::{info, warn};

use crate::cache::{CacheError, ChunkCache, IMAGE_FILE};
use crate::fetch::{
    read_verified, ChunkFetcher, FetchConfig, LazyReadAhead, LinkEstimate, ReadError,
};
use crate::format::{
    max_index_len, sha256, ChunkKind, Footer, Index, Sha256Digest, FOOTER_LEN, FORMAT_VERSION,
};
use crate::gate::PriorityGate;
use crate::oci::{digest_hex, LayerId, OciError};
use crate::p2p::ServedLayer;
use crate::source::ChunkSource;
use crate::stats::Stats;
use crate::trace::{LayerTrace, Recorder};

pub const INDEX_FILE: &str = "index";

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("layer {digest}: fetching its index failed: {failures}")]
    Index { digest: String, failures: String },
    #[error("layer {digest}: index annotations (offset {offset}, length {length}) do not fit the blob size {blob_size}")]
    BadLocation {
        digest: String,
        offset: u64,
        length: u64,
        blob_size: u64,
    },
    #[error("layer {digest}: its annotations claim a {length}-byte index; the format's largest is {max} bytes")]
    IndexTooLong {
        digest: String,
        length: u64,
        max: u64,
    },
    #[error("layer {digest}: saving the index to {path}: {source}")]
    SaveIndex {
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("layer {digest}: {source}")]
    BadIdentity {
        digest: String,
        #[source]
        source: OciError,
    },
    #[error("layer {digest}: {source}")]
    Cache {
        digest: String,
        #[source]
        source: CacheError,
    },
}

/// Where a layer's bytes are and what is known about them up front.
#[derive(Clone)]
pub struct LayerSource {
    /// The blob digest (`sha256:...`): what to fetch from the sources.
    pub digest: String,
    /// `sha256:` + the sha256 of the index, from the layer descriptor of the
    /// image's manifest (`lazybd.index-digest`): the only tail accepted, and
    /// the layer's identity. `None` only for an unanchored (version 1) layer
    /// its operator allowed.
    pub anchor: Option<String>,
    pub blob_size: u64,
    /// `(index_offset, index_length)` from the descriptor annotations; saves a
    /// round trip and is checked against the footer.
    pub index_location: Option<(u64, u64)>,
    /// Asked in order for every missing range.
    pub sources: Vec<Arc<dyn ChunkSource>>,
    /// The source layer's diff_id, when the image says it: recorded in
    /// startup traces so `lazybd convert --profile` can use them.
    pub diff_id: Option<String>,
}

/// What the layers of a node share.
#[derive(Clone)]
pub struct NodeContext {
    pub stats: Arc<Stats>,
    pub fetch: FetchConfig,
    /// The priority between reads and prefetches.
    pub gate: Arc<PriorityGate>,
    /// What the link to the sources moves: sizes demand windows.
    pub link: Arc<LinkEstimate>,
    /// How far the node's lazy devices read ahead.
    pub read_ahead: LazyReadAhead,
}

impl NodeContext {
    pub fn new(fetch: FetchConfig) -> Self {
        NodeContext {
            stats: Arc::default(),
            fetch,
            gate: PriorityGate::new(),
            link: Arc::default(),
            read_ahead: LazyReadAhead::default(),
        }
    }
}

impl LayerSource {
    /// The layer's identity on the node: its anchor, or its blob digest in
    /// the namespace of unanchored layers.
    pub fn id(&self) -> Result<LayerId, OciError> {
        LayerId::of(&self.digest, self.anchor.as_deref())
    }
}

pub struct LazyLayer {
    id: LayerId,
    digest: String,
    diff_id: Option<String>,
    index: Arc<Index>,
    cache: Arc<ChunkCache>,
    fetcher: Arc<ChunkFetcher>,
    stats: Arc<Stats>,
    config: FetchConfig,
    recorder: Recorder,
    /// The startup stream, stopped when the layer goes.
    _stream: AbortOnDrop,
}

struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl LazyLayer {
    /// Opens the layer in `dir`: the saved index if it is valid for this blob,
    /// else the index fetched (and verified) from the sources; then the cache.
    /// Starts streaming the blob's startup chunks (its prefetch area) at once.
    pub async fn open(
        dir: &Path,
        src: LayerSource,
        node: &NodeContext,
    ) -> Result<Self, LayerError> {
        let (stats, config) = (node.stats.clone(), node.fetch.clone());
        let id = src.id().map_err(|source| LayerError::BadIdentity {
            digest: src.digest.clone(),
            source,
        })?;
        let anchor = anchor_of(&src)?;
        let (index, index_digest) = load_index(dir, &src, anchor.as_ref(), &config).await?;
        let index = Arc::new(index);
        // Opening reads the bitmap file: not on the async threads.
        let (cache_dir, cache_index) = (dir.to_owned(), index.clone());
        let keep_stored = config.keep_stored;
        let opened = tokio::task::spawn_blocking(move || {
            ChunkCache::open_with(&cache_dir, cache_index, index_digest, keep_stored)
        })
        .await
        .map_err(|e| LayerError::Cache {
            digest: src.digest.clone(),
            source: CacheError::Io {
                path: dir.to_owned(),
                op: "open task",
                source: std::io::Error::other(e.to_string()),
            },
        })?;
        let (cache, report) = opened.map_err(|source| LayerError::Cache {
            digest: src.digest.clone(),
            source,
        })?;
        info!(
            "layer {}: cache opened: {} of {} chunks present{}{}",
            src.digest,
            report.present,
            index.chunk_count(),
            match (report.left_open, report.to_verify) {
                (false, _) => String::new(),
                (true, 0) => ", left open by a process of this boot or complete: trusted".into(),
                (true, n) => format!(
                    ", left open before a reboot: {n} chunks count as missing until verified"
                ),
            },
            if report.created { ", new" } else { "" },
        );
        let cache = Arc::new(cache);
        let fetcher = Arc::new(
            ChunkFetcher::new(
                &src.digest,
                index.clone(),
                cache.clone(),
                src.sources,
                stats.clone(),
                config.clone(),
            )
            .on_node(node.gate.clone(), node.link.clone(), node.read_ahead),
        );
        let stream = AbortOnDrop(fetcher.start_stream());
        Ok(LazyLayer {
            id,
            digest: src.digest,
            diff_id: src.diff_id,
            index,
            cache,
            fetcher,
            stats,
            config,
            recorder: Recorder::default(),
            _stream: stream,
        })
    }

    /// Fetches and verifies the layer's index ahead of its open, into
    /// `dir` (where [`open`](Self::open) then finds it): a pull's later
    /// layers get their index while the link is still quiet, instead of
    /// behind the earlier layers' startup streams.
    pub async fn fetch_index(
        dir: &Path,
        src: &LayerSource,
        config: &FetchConfig,
    ) -> Result<(), LayerError> {
        let anchor = anchor_of(src)?;
        load_index(dir, src, anchor.as_ref(), config)
            .await
            .map(drop)
    }

    /// Starts (or restarts, empty) recording what this layer's reads touch.
    pub fn start_recording(&self) {
        self.recorder.start(self.index.image_size);
    }

    /// Ends the recording: what was read, as a layer of a startup trace.
    pub fn stop_recording(&self) -> LayerTrace {
        let ranges: Vec<[u64; 2]> = self
            .recorder
            .stop()
            .into_iter()
            .map(|r| [r.start, r.end - r.start])
            .collect();
        LayerTrace {
            layer: self.id.clone(),
            diff_id: self.diff_id.clone(),
            ranges,
            narrow: None,
        }
    }

    fn record(&self, offset: u64, len: u64) {
        let started = self.recorder.read(offset, len);
        if started > 0 {
            let counters = &self.stats.trace;
            counters
                .recorded_ranges
                .fetch_add(started, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The chunks covering a trace's ranges of this layer, first read first.
    pub fn chunks_of(&self, trace: &LayerTrace) -> Vec<u64> {
        let mut seen = std::collections::HashSet::new();
        trace
            .ranges()
            .flat_map(|r| self.index.chunks_for(r.start, r.end - r.start))
            .filter(|&c| seen.insert(c))
            .collect()
    }

    pub fn fetcher(&self) -> &Arc<ChunkFetcher> {
        &self.fetcher
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    pub fn fetch_config(&self) -> &FetchConfig {
        &self.config
    }

    /// Every chunk is in the local cache file (verified when it was stored).
    pub fn is_complete(&self) -> bool {
        self.cache.present_count() == self.index.chunk_count()
    }

    /// The cache file holding the uncompressed image: once the layer is
    /// complete, a loop device can read it directly.
    pub fn image_path(&self) -> PathBuf {
        self.cache.dir().join(IMAGE_FILE)
    }

    /// Stored (compressed) bytes of the missing chunks in `chunks`: what
    /// fetching them costs on the network.
    pub fn missing_stored_bytes(&self, chunks: &[u64]) -> u64 {
        chunks
            .iter()
            .copied()
            .filter(|&c| !self.cache.is_present(c))
            .map(|c| &self.index.chunks[c as usize])
            .filter(|e| e.kind != ChunkKind::Zero)
            .map(|e| u64::from(e.stored_len))
            .sum()
    }

    /// The blob digest (what is fetched); the layer may be attached for
    /// another blob with the same anchor too.
    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn id(&self) -> &LayerId {
        &self.id
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn image_size(&self) -> u64 {
        self.index.image_size
    }

    /// Chunk `c` is in the cache.
    pub fn is_present(&self, c: u64) -> bool {
        self.cache.is_present(c)
    }

    pub fn chunks_present(&self) -> u64 {
        self.cache.present_count()
    }

    /// Clamps a read to the image: past the end reads nothing.
    fn span(&self, offset: u64, size: u32) -> u64 {
        self.index
            .image_size
            .saturating_sub(offset)
            .min(u64::from(size))
    }

    /// Serves the read from the cache file if every chunk it touches is
    /// present, into `buf[..n]` (returns `n`); `None` means it must wait for
    /// a fetch (use [`read`](Self::read)). `buf` only ever grows, so a reused
    /// buffer is neither reallocated nor zeroed on the hot path.
    pub fn read_cached(
        &self,
        offset: u64,
        size: u32,
        buf: &mut Vec<u8>,
    ) -> Option<Result<usize, ReadError>> {
        let started = Instant::now();
        let len = self.span(offset, size);
        let chunks = self.index.chunks_for(offset, len);
        if !chunks.clone().all(|c| self.cache.is_present(c)) {
            return None;
        }
        self.record(offset, len);
        self.stats.cache_hits.fetch_add(
            chunks.end - chunks.start,
            std::sync::atomic::Ordering::Relaxed,
        );
        if buf.len() < len as usize {
            buf.resize(len as usize, 0);
        }
        let result = self
            .read_present(offset, &mut buf[..len as usize])
            .map(|()| len as usize);
        self.stats
            .record_read(started.elapsed(), len, result.is_ok());
        Some(result)
    }

    /// Reads `buf.len()` image bytes at `offset` if every chunk they touch
    /// is present; never fetches, and is neither a container's read (no
    /// trace, no read counters) nor an error worth a warning when they are
    /// missing (`NotFound`). For the page-cache warming (`device::warm`).
    pub fn read_if_present(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let len = buf.len() as u64;
        if offset
            .checked_add(len)
            .is_none_or(|end| end > self.index.image_size)
        {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!("[{offset}, +{len}) is past the image"),
            ));
        }
        let chunks = self.index.chunks_for(offset, len);
        if !chunks.clone().all(|c| self.cache.is_present(c)) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("[{offset}, +{len}) is not all cached"),
            ));
        }
        self.read_present(offset, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    }

    /// Reads image bytes, fetching missing chunks first; fails after the
    /// read deadline if they cannot be had.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, ReadError> {
        self.record(offset, self.span(offset, size));
        self.read_unrecorded(offset, size).await
    }

    /// [`read`](Self::read) for readers other than the layer's container
    /// (peers), which a startup trace must not include.
    async fn read_unrecorded(&self, offset: u64, size: u32) -> Result<Vec<u8>, ReadError> {
        let started = Instant::now();
        let len = self.span(offset, size);
        let result = match self
            .fetcher
            .ensure(self.index.chunks_for(offset, len))
            .await
        {
            Ok(()) => {
                let mut buf = vec![0u8; len as usize];
                self.read_present(offset, &mut buf).map(|()| buf)
            }
            Err(e) => Err(e),
        };
        self.stats
            .record_read(started.elapsed(), len, result.is_ok());
        result
    }

    fn read_present(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        self.cache
            .read_at(buf, offset)
            .map_err(|source| ReadError::Cache {
                layer: self.digest.clone(),
                source,
            })
    }

    /// Chunks of an unclean cache wait for [`verify_pending`](Self::verify_pending).
    pub fn needs_verify(&self) -> bool {
        self.cache.has_pending()
    }

    /// Re-hashes the chunks an unclean cache claimed but could not trust
    /// (see [`crate::cache`]); blocking, for a background thread.
    pub fn verify_pending(&self) -> Result<crate::cache::VerifyReport, CacheError> {
        self.cache.verify_pending()
    }

    /// Makes the cache bitmap durable up to now (called periodically).
    pub fn persist(&self) -> Result<(), CacheError> {
        self.cache.persist()
    }

    /// Persists and marks the cache clean. Fetches still running keep their
    /// own handle on the cache; what they store later is simply not persisted.
    pub fn close(self) -> Result<(), CacheError> {
        let LazyLayer { cache, fetcher, .. } = self;
        cache.persist()?;
        drop(fetcher);
        match Arc::try_unwrap(cache) {
            Ok(cache) => cache.close(),
            // A fetch task still holds the cache; leaving it "open" makes the
            // next open re-verify, which is always safe.
            Err(_) => Ok(()),
        }
    }
}

/// What the P2P peer server reads of a layer it serves to other nodes.
/// Its reads are not recorded in startup traces.
#[async_trait]
impl ServedLayer for LazyLayer {
    fn digest(&self) -> &str {
        LazyLayer::digest(self)
    }

    fn index(&self) -> &Index {
        LazyLayer::index(self)
    }

    /// The anchor the layer was checked against; an unanchored layer is
    /// told apart in the P2P trees by the hash of its index all the same.
    fn anchor(&self) -> String {
        match LazyLayer::id(self).anchor() {
            Some(anchor) => anchor.to_owned(),
            None => format!(
                "sha256:{}",
                hex::encode(crate::format::sha256(&self.index.to_bytes()))
            ),
        }
    }

    async fn ensure(&self, chunks: &[u64]) -> Result<(), String> {
        // Runs of chunks adjacent in the image, each one ensure (the
        // fetcher plans its requests by blob order itself).
        let mut runs: Vec<std::ops::Range<u64>> = Vec::new();
        let mut sorted = chunks.to_vec();
        sorted.sort_unstable();
        for c in sorted {
            match runs.last_mut() {
                Some(r) if r.end == c => r.end += 1,
                _ => runs.push(c..c + 1),
            }
        }
        let all = futures_util::future::join_all(runs.into_iter().map(|r| self.fetcher.ensure(r)));
        all.await
            .into_iter()
            .collect::<Result<Vec<()>, _>>()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn stored(&self, chunk: u64) -> Result<Option<Vec<u8>>, String> {
        self.cache
            .read_stored(&self.index, chunk)
            .map_err(|e| e.to_string())
    }

    fn image_chunk(&self, chunk: u64) -> Result<Vec<u8>, String> {
        let r = self.index.image_range(chunk);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        self.read_present(r.start, &mut buf)
            .map(|()| buf)
            .map_err(|e| e.to_string())
    }
}

/// The layer's anchor as bytes (`None`: an unanchored layer).
fn anchor_of(src: &LayerSource) -> Result<Option<Sha256Digest>, LayerError> {
    src.anchor
        .as_deref()
        .map(anchor_bytes)
        .transpose()
        .map_err(|source| LayerError::BadIdentity {
            digest: src.digest.clone(),
            source,
        })
}

/// The anchor's 32 bytes.
fn anchor_bytes(anchor: &str) -> Result<Sha256Digest, OciError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(digest_hex(anchor)?, &mut out)
        .map_err(|_| OciError::BadDigest(anchor.to_owned()))?;
    Ok(out)
}

/// The longest index of any format version (version 2's entries are the
/// longer ones).
const MAX_INDEX_LEN: u64 = max_index_len(FORMAT_VERSION);

/// The blob's tail (index + footer) from `dir/index` if it is valid for this
/// blob and hashes to `anchor`, else from the sources (a source whose tail
/// does not is rejected, and the next one asked); returns the index and the
/// sha256 of its bytes.
async fn load_index(
    dir: &Path,
    src: &LayerSource,
    anchor: Option<&Sha256Digest>,
    config: &FetchConfig,
) -> Result<(Index, Sha256Digest), LayerError> {
    let path = dir.join(INDEX_FILE);
    let save_err = |source| LayerError::SaveIndex {
        digest: src.digest.clone(),
        path: path.clone(),
        source,
    };
    if let Ok(tail) = std::fs::read(&path) {
        match parse_tail(&tail, src, anchor) {
            Ok(parsed) => return Ok(parsed),
            // Never trusted: the tail is fetched (and checked) again.
            Err(e) => {
                warn!(
                    "layer {}: saved index {} discarded: {e}",
                    src.digest,
                    path.display()
                );
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    let index_err = |failures: String| LayerError::Index {
        digest: src.digest.clone(),
        failures,
    };
    let tail_len = match src.index_location {
        // Fetched whole before its footer can say how long it really is:
        // a hostile descriptor must not make that a GiB.
        Some((_, length)) if length > MAX_INDEX_LEN => {
            return Err(LayerError::IndexTooLong {
                digest: src.digest.clone(),
                length,
                max: MAX_INDEX_LEN,
            })
        }
        Some((offset, length)) => {
            let fits = offset
                .checked_add(length)
                .and_then(|e| e.checked_add(FOOTER_LEN))
                == Some(src.blob_size);
            if !fits {
                return Err(LayerError::BadLocation {
                    digest: src.digest.clone(),
                    offset,
                    length,
                    blob_size: src.blob_size,
                });
            }
            length + FOOTER_LEN
        }
        None => {
            let start = src.blob_size.checked_sub(FOOTER_LEN).ok_or_else(|| {
                index_err(format!(
                    "blob size {} is smaller than a footer",
                    src.blob_size
                ))
            })?;
            let footer = read_verified(
                &src.sources,
                config,
                &format!("layer {} footer", src.digest),
                start..src.blob_size,
                |b| {
                    let f = Footer::parse(b).map_err(|e| e.to_string())?;
                    f.check_blob_len(src.blob_size).map_err(|e| e.to_string())?;
                    Ok(f)
                },
            )
            .await
            .map_err(index_err)?;
            footer.index_length + FOOTER_LEN
        }
    };
    let (tail, parsed) = read_verified(
        &src.sources,
        config,
        &format!("layer {} index", src.digest),
        src.blob_size - tail_len..src.blob_size,
        |b| parse_tail(b, src, anchor).map(|p| (b.to_vec(), p)),
    )
    .await
    .map_err(index_err)?;
    std::fs::create_dir_all(dir).map_err(save_err)?;
    save_atomically(&path, &tail).map_err(save_err)?;
    Ok(parsed)
}

fn parse_tail(
    tail: &[u8],
    src: &LayerSource,
    anchor: Option<&Sha256Digest>,
) -> Result<(Index, Sha256Digest), String> {
    let footer = Footer::parse(tail).map_err(|e| e.to_string())?;
    footer
        .check_blob_len(src.blob_size)
        .map_err(|e| e.to_string())?;
    if let Some((offset, length)) = src.index_location {
        if (footer.index_offset, footer.index_length) != (offset, length) {
            return Err(format!(
                "footer locates the index at ({}, {}), annotations say ({offset}, {length})",
                footer.index_offset, footer.index_length
            ));
        }
    }
    if tail.len() as u64 != footer.index_length + FOOTER_LEN {
        return Err(format!(
            "tail is {} bytes, footer needs {}",
            tail.len(),
            footer.index_length + FOOTER_LEN
        ));
    }
    let bytes = &tail[..footer.index_length as usize];
    let index = Index::parse(bytes, &footer).map_err(|e| e.to_string())?;
    // A well-formed tail that is not the anchor's is another layer's.
    let digest = sha256(bytes);
    if let Some(anchor) = anchor.filter(|a| **a != digest) {
        return Err(format!(
            "the index's sha256:{} is not the layer's anchor sha256:{}",
            hex::encode(digest),
            hex::encode(anchor)
        ));
    }
    Ok((index, digest))
}

/// Not synced: a saved index is checked like a fetched one when it is
/// loaded, so one a crash left torn is fetched again, and the attach that
/// saves it does not wait for the disk.
fn save_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{write_blob, Layout};
    use crate::source::FileSource;

    /// A blob of `image` (4 KiB chunks) in `dir/name`, and its anchor.
    fn blob(dir: &Path, name: &str, image: &[u8]) -> (PathBuf, u64, String) {
        let layout = Layout::fixed(image.len() as u64, 4096).unwrap();
        let mut bytes = Vec::new();
        let written = write_blob(image, &mut bytes, &layout).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        let anchor = format!("sha256:{}", hex::encode(written.anchor()));
        (path, written.blob_len, anchor)
    }

    fn source(name: &str, path: &Path, size: u64, anchor: &str) -> LayerSource {
        LayerSource {
            digest: crate::oci::digest_of(b"the blob"),
            anchor: Some(anchor.to_owned()),
            blob_size: size,
            index_location: None,
            sources: vec![Arc::new(FileSource::open(name, path).unwrap())],
            diff_id: None,
        }
    }

    /// Counts what it is asked; serves nothing.
    struct Counting(std::sync::atomic::AtomicU64);

    #[async_trait]
    impl ChunkSource for Counting {
        fn name(&self) -> &str {
            "counting"
        }

        async fn read_range(
            &self,
            range: std::ops::Range<u64>,
        ) -> Result<crate::source::Answer, crate::source::SourceError> {
            self.0
                .fetch_add(range.end - range.start, std::sync::atomic::Ordering::SeqCst);
            Err(crate::source::SourceError::Permanent("nothing here".into()))
        }
    }

    #[tokio::test]
    async fn an_index_longer_than_any_format_allows_is_never_asked_for() {
        let tmp = tempfile::tempdir().unwrap();
        let asked = Arc::new(Counting(Default::default()));
        let length = 1 << 30;
        let src = LayerSource {
            digest: crate::oci::digest_of(b"the blob"),
            anchor: Some(crate::oci::digest_of(b"an index")),
            blob_size: 4096 + length + FOOTER_LEN,
            index_location: Some((4096, length)),
            sources: vec![asked.clone()],
            diff_id: None,
        };
        let e = LazyLayer::fetch_index(tmp.path(), &src, &FetchConfig::default())
            .await
            .unwrap_err();
        assert!(matches!(e, LayerError::IndexTooLong { .. }), "{e}");
        assert_eq!(asked.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn only_the_anchors_tail_is_used_from_any_source_or_the_disk() {
        let tmp = tempfile::tempdir().unwrap();
        // Same length, other bytes: a foreign tail parses for this blob.
        let (honest, size, anchor) = blob(
            tmp.path(),
            "honest",
            &crate::format::sha256(b"a").repeat(512),
        );
        let (foreign, foreign_size, foreign_anchor) = blob(
            tmp.path(),
            "foreign",
            &crate::format::sha256(b"b").repeat(512),
        );
        assert_eq!(size, foreign_size);
        assert_ne!(anchor, foreign_anchor);
        let config = FetchConfig::default();
        let want = anchor_bytes(&anchor).unwrap();

        // A lying source first: rejected, the next one serves.
        let mut src = source("liar", &foreign, size, &anchor);
        src.sources
            .push(Arc::new(FileSource::open("honest", &honest).unwrap()));
        let dir = tmp.path().join("layer");
        let (_, digest) = load_index(&dir, &src, Some(&want), &config).await.unwrap();
        assert_eq!(digest, want);
        let saved = std::fs::read(dir.join(INDEX_FILE)).unwrap();

        // Only liars: a clear error naming the anchor.
        let liar = source("liar", &foreign, size, &anchor);
        let e = load_index(&tmp.path().join("other"), &liar, Some(&want), &config)
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not the layer's anchor"), "{e}");

        // A saved tail that is not the anchor's is discarded, not trusted.
        let foreign_dir = tmp.path().join("foreign-layer");
        let foreign_src = source("foreign", &foreign, size, &foreign_anchor);
        let theirs = anchor_bytes(&foreign_anchor).unwrap();
        load_index(&foreign_dir, &foreign_src, Some(&theirs), &config)
            .await
            .unwrap();
        std::fs::copy(foreign_dir.join(INDEX_FILE), dir.join(INDEX_FILE)).unwrap();
        let honest_only = source("honest", &honest, size, &anchor);
        let (_, digest) = load_index(&dir, &honest_only, Some(&want), &config)
            .await
            .unwrap();
        assert_eq!(digest, want);
        assert_eq!(std::fs::read(dir.join(INDEX_FILE)).unwrap(), saved);

        // Unanchored (an operator's choice): any well-formed tail.
        let mut unanchored = source("foreign", &foreign, size, &anchor);
        unanchored.anchor = None;
        let (_, digest) = load_index(&tmp.path().join("v1"), &unanchored, None, &config)
            .await
            .unwrap();
        assert_eq!(digest, theirs);
    }
}
