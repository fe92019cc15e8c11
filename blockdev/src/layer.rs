//! One lazily loaded layer: its verified index, its chunk cache and fetcher,
//! and reads of its uncompressed image at any offset.
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
use tracing::info;

use crate::cache::{CacheError, ChunkCache, IMAGE_FILE};
use crate::fetch::{read_verified, ChunkFetcher, FetchConfig, ReadError};
use crate::format::{sha256, ChunkKind, Footer, Index, Sha256Digest, FOOTER_LEN};
use crate::gate::PriorityGate;
use crate::p2p::ServedLayer;
use crate::source::ChunkSource;
use crate::stats::Stats;

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
    #[error("layer {digest}: saving the index to {path}: {source}")]
    SaveIndex {
        digest: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
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
    /// The blob digest (`sha256:...`): the layer's identity.
    pub digest: String,
    pub blob_size: u64,
    /// `(index_offset, index_length)` from the descriptor annotations; saves a
    /// round trip and is checked against the footer.
    pub index_location: Option<(u64, u64)>,
    /// Asked in order for every missing range.
    pub sources: Vec<Arc<dyn ChunkSource>>,
}

pub struct LazyLayer {
    digest: String,
    index: Arc<Index>,
    cache: Arc<ChunkCache>,
    fetcher: Arc<ChunkFetcher>,
    stats: Arc<Stats>,
    config: FetchConfig,
}

impl LazyLayer {
    /// Opens the layer in `dir`: the saved index if it is valid for this blob,
    /// else the index fetched (and verified) from the sources; then the cache.
    /// `gate` is the node's priority between reads and prefetches.
    pub async fn open(
        dir: &Path,
        src: LayerSource,
        stats: Arc<Stats>,
        config: FetchConfig,
        gate: Arc<PriorityGate>,
    ) -> Result<Self, LayerError> {
        let (index, index_digest) = load_index(dir, &src, &config).await?;
        let index = Arc::new(index);
        // Opening reads the bitmap file: not on the async threads.
        let (cache_dir, cache_index) = (dir.to_owned(), index.clone());
        let opened = tokio::task::spawn_blocking(move || {
            ChunkCache::open(&cache_dir, cache_index, index_digest)
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
            .with_gate(gate),
        );
        Ok(LazyLayer {
            digest: src.digest,
            index,
            cache,
            fetcher,
            stats,
            config,
        })
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
    pub fn missing_stored_bytes(&self, chunks: std::ops::Range<u64>) -> u64 {
        chunks
            .filter(|&c| !self.cache.is_present(c))
            .map(|c| &self.index.chunks[c as usize])
            .filter(|e| e.kind != ChunkKind::Zero)
            .map(|e| u64::from(e.stored_len))
            .sum()
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }

    pub fn index(&self) -> &Index {
        &self.index
    }

    pub fn image_size(&self) -> u64 {
        self.index.image_size
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

    /// Reads image bytes, fetching missing chunks first; fails after the
    /// read deadline if they cannot be had.
    pub async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, ReadError> {
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
#[async_trait]
impl ServedLayer for LazyLayer {
    fn digest(&self) -> &str {
        LazyLayer::digest(self)
    }

    fn index(&self) -> &Index {
        LazyLayer::index(self)
    }

    async fn read(&self, offset: u64, size: u32) -> Result<Vec<u8>, String> {
        LazyLayer::read(self, offset, size)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The blob's tail (index + footer) from `dir/index` if it is valid for this
/// blob, else from the sources; returns the index and the sha256 of its bytes.
async fn load_index(
    dir: &Path,
    src: &LayerSource,
    config: &FetchConfig,
) -> Result<(Index, Sha256Digest), LayerError> {
    let path = dir.join(INDEX_FILE);
    let save_err = |source| LayerError::SaveIndex {
        digest: src.digest.clone(),
        path: path.clone(),
        source,
    };
    if let Ok(tail) = std::fs::read(&path) {
        if let Ok(parsed) = parse_tail(&tail, src) {
            return Ok(parsed);
        }
    }
    let index_err = |failures: String| LayerError::Index {
        digest: src.digest.clone(),
        failures,
    };
    let tail_len = match src.index_location {
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
        |b| parse_tail(b, src).map(|p| (b.to_vec(), p)),
    )
    .await
    .map_err(index_err)?;
    std::fs::create_dir_all(dir).map_err(save_err)?;
    save_atomically(&path, &tail).map_err(save_err)?;
    Ok(parsed)
}

fn parse_tail(tail: &[u8], src: &LayerSource) -> Result<(Index, Sha256Digest), String> {
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
    Ok((index, sha256(bytes)))
}

fn save_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}
